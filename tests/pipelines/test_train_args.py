"""train.py's recipe options resolve to the config without starting Ray (fast)."""
import pytest

from pipelines import train
from pipelines._cli import run_main


def _cfg(argv):
    return train.resolve_config(train.build_parser().parse_args(argv))


def test_no_recipe_flags_is_the_recommended_recipe():
    cfg = _cfg(["--shards", "x"])
    assert cfg.model.pooling == "rmac" and cfg.model.flip_test is True
    assert cfg.train.time_budget_s == 0 and cfg.train.ctl_weight > 0


def test_budget_and_levers_reach_the_config():
    cfg = _cfg(["--shards", "x", "--time-budget", "30m", "--schedule", "cosine", "--warmup-frac", "0.2",
                "--milestone-fracs", "0.5", "0.8", "--flip-test", "false", "--pooling", "gem",
                "--erase-prob", "0", "--crop-pad", "4", "--neck-feat", "before"])
    assert cfg.train.time_budget_s == 1800 and cfg.train.schedule == "cosine"
    assert cfg.train.warmup_frac == 0.2 and cfg.train.milestone_fracs == (0.5, 0.8)
    assert cfg.model.flip_test is False and cfg.model.pooling == "gem" and cfg.model.neck_feat == "before"
    assert cfg.data.erase_prob == 0 and cfg.data.crop_pad == 4


@pytest.mark.parametrize("argv,msg", [
    (["--time-budget", "30x"], "not a duration"),
    (["--time-budget", "0s"], "must be > 0"),
    (["--time-budget", "30m", "--epochs", "5"], "--time-budget sizes the run itself"),
    (["--time-budget", "30m", "--milestone-fracs", "0.9", "0.5"], "milestone_fracs"),
    (["--schedule", "linear"], "unknown schedule"),
    (["--flip-test", "maybe"], "model.flip_test"),
])
def test_bad_recipe_options_are_one_line_errors(argv, msg, capsys):
    with pytest.raises(SystemExit) as e:
        run_main(train.main, ["--shards", "x", "--print-config", *argv])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and msg in err and "\n" not in err
