"""benchmarks/recipe.py never scores a model left in --work by an older recipe as today's run."""
import dataclasses
import importlib.util
import json
import pathlib

from pipelines import train

ROOT = pathlib.Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("recipe_study", ROOT / "benchmarks" / "recipe.py")
recipe = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(recipe)


def _argv(tmp_path, *flags):
    return [ROOT / "pipelines" / "train.py", "--shards", tmp_path / "shards", *recipe.BASE, *flags,
            "--time-budget", "1800s", "--seed", "0", "--name", "default-b1800-s0",
            "--output", tmp_path / "model"]


def _model_trained_with(tmp_path, argv, **train_changes) -> pathlib.Path:
    """A model dir whose training.json records the recipe `argv` resolves to, with changes."""
    cfg = train.resolve_config(train.build_parser().parse_args([str(x) for x in argv[1:]]))
    record = json.loads(json.dumps(dataclasses.asdict(cfg)))
    record["train"].update(train_changes)
    record["model"]["num_classes"] = 751  # set from the shards at train time, not a recipe field
    model = tmp_path / "model"
    model.mkdir()
    (model / "training.json").write_text(json.dumps({"config": record}))
    return model


def test_a_model_of_todays_recipe_is_reused(tmp_path):
    argv = _argv(tmp_path)
    assert recipe.stale_fields(argv, _model_trained_with(tmp_path, argv)) == []


def test_a_changed_default_makes_the_model_stale(tmp_path):
    # the command is the same before and after a default changes: only the record tells
    argv = _argv(tmp_path)
    old_lr = train.resolve_config(train.build_parser().parse_args(["--shards", "x"])).train.lr / 2
    model = _model_trained_with(tmp_path, argv, lr=old_lr)
    assert recipe.stale_fields(argv, model) == ["train.lr"]


def test_a_lever_flag_must_match_the_record(tmp_path):
    model = _model_trained_with(tmp_path, _argv(tmp_path))
    assert recipe.stale_fields(_argv(tmp_path, "--warmup-frac", "0"), model) == ["train.warmup_frac"]


def test_fields_the_record_predates_are_not_compared(tmp_path):
    argv = _argv(tmp_path)
    model = _model_trained_with(tmp_path, argv)
    rec = json.loads((model / "training.json").read_text())
    del rec["config"]["train"]["schedule"]
    (model / "training.json").write_text(json.dumps(rec))
    assert recipe.stale_fields(argv, model) == []

