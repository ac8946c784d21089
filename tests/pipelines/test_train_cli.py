"""train.py's arguments, without Ray: defaults come from model/config.py, bad values are one line."""
import dataclasses

import pytest

from model.config import Config, field_default
from pipelines import train
from pipelines._cli import run_main


def _help_of(parser, option):
    return next(a.help for a in parser._actions if option in a.option_strings)


def test_every_shortcut_maps_to_a_config_field_and_shows_its_default():
    p = train.build_parser()
    sections = {f.name: type(getattr(Config(), f.name)) for f in dataclasses.fields(Config)}
    for opt, key, _, _ in train.SHORTCUTS:
        section, name = key.split(".")
        value = field_default(sections[section], name)
        assert f"({train.default_text(key)}) [{key}]" in _help_of(p, opt)
        if value != "":
            shown = str(value).lower() if isinstance(value, bool) else str(value)
            assert train.default_text(key) == shown, key
    assert "(256 128)" in _help_of(p, "--input-size")


def test_help_follows_a_changed_dataclass_default(monkeypatch):
    from model import config

    fields = {f.name: f for f in dataclasses.fields(config.TrainConfig)}
    monkeypatch.setattr(fields["epochs"], "default", 7)
    assert "(7) [train.epochs]" in _help_of(train.build_parser(), "--epochs")


def test_no_option_given_keeps_the_dataclass_defaults():
    cfg = train.resolve_config(train.build_parser().parse_args([]))
    assert cfg == Config()


@pytest.mark.parametrize("argv, match", [
    (["--eval-every", "-2"], "eval_every must be >= -1"),
    (["--name", "../elsewhere"], "name must be a name of letters"),
    (["--loader-threads", "0"], "loader_threads must be >= 1"),
    (["--milestones", "70", "40"], "milestones must be epochs >= 0 in increasing order"),
])
def test_bad_values_are_refused_by_the_config(argv, match, capsys):
    with pytest.raises(SystemExit) as e:
        run_main(train.main, [*argv, "--print-config"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and match in err, err
