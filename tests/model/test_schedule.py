"""Budgeted training arithmetic (model/schedule.py) and its config fields: pure, no Ray."""
import itertools
import math

import pytest

from model.config import TrainConfig, load_config
from model.schedule import (
    BudgetPlan,
    budget_lr_factor,
    format_duration,
    parse_duration,
    planned_epochs,
    progress_milestones,
)


@pytest.mark.parametrize("text,seconds", [("30m", 1800), ("1800s", 1800), ("1h", 3600),
                                          ("1.5h", 5400), ("90", 90), (" 2M ", 120), (45, 45)])
def test_parse_duration(text, seconds):
    assert parse_duration(text) == seconds
    assert parse_duration(format_duration(seconds)) == seconds


@pytest.mark.parametrize("bad", ["", "30x", "-5m", "0s", "m", "1h30", "nan", True])
def test_parse_duration_refuses_bad_text(bad):
    with pytest.raises(ValueError, match="time budget"):
        parse_duration(bad)


def test_planned_epochs_fills_the_budget_and_never_shrinks_below_done():
    assert planned_epochs(1800, elapsed_s=60, epochs_done=1) == 30
    assert planned_epochs(1800, elapsed_s=62, epochs_done=1) == 29   # 29 x 62 = 1798 <= 1800
    assert planned_epochs(100, elapsed_s=150, epochs_done=1) == 1    # first epoch overran
    assert planned_epochs(100, elapsed_s=95, epochs_done=5) == 5     # 19 s epochs: no 6th fits
    assert planned_epochs(100, elapsed_s=76, epochs_done=4) == 5
    with pytest.raises(ValueError):
        planned_epochs(100, elapsed_s=10, epochs_done=0)


def test_budget_plan_replans_from_the_mean_pace_and_stops_at_the_budget():
    plan = BudgetPlan(100.0)
    assert plan.more() and plan.total_epochs == 1
    epochs = 0
    durations = [10.0, 10.0, 20.0, 20.0, 20.0, 20.0, 20.0]  # the machine slows down midway
    while plan.more():
        plan.record(durations[epochs])
        epochs += 1
    assert plan.trained_s <= 100.0 and epochs == 6  # 10+10+20*4 = 100; a 7th would overrun
    again = BudgetPlan.from_dict(plan.as_dict())
    assert again == plan and not again.more()
    with pytest.raises(ValueError):
        BudgetPlan(0)
    again.rebudget(200.0)  # resumed with twice the budget: 100 s more at 100/6 s per epoch
    assert again.total_epochs == 12 and again.more()


def test_step_schedule_in_fractions_of_the_run():
    kw = {"schedule": "step", "warmup_frac": 0.1, "warmup_factor": 0.01, "milestone_fracs": (0.7, 0.9)}
    f = [budget_lr_factor(e, 20, **kw) for e in range(20)]
    assert f[0] == pytest.approx(0.01)                       # warm-up starts low
    assert f[1] == pytest.approx(0.01 * 0.5 + 0.5)           # halfway through the 2-epoch warm-up
    assert f[2:14] == pytest.approx([1.0] * 12)
    assert f[14:18] == pytest.approx([0.1] * 4)              # epoch 14 = 0.7 of 20
    assert f[18:] == pytest.approx([0.01] * 2)
    assert progress_milestones(20, (0.7, 0.9)) == (14, 18)
    # the same shape for a run three times as long
    g = [budget_lr_factor(e, 60, **kw) for e in range(60)]
    assert g.index(0.1) == 42 and g[6] == 1.0 and g[5] < 1.0


def test_cosine_schedule_decays_smoothly_after_warm_up():
    f = [budget_lr_factor(e, 10, "cosine", 0.2, 0.01) for e in range(10)]
    assert f[0] == pytest.approx(0.01) and f[2] == pytest.approx(1.0)
    assert all(a > b for a, b in itertools.pairwise(f[2:])) and f[-1] > 0
    assert f[6] == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))
    with pytest.raises(ValueError, match="unknown schedule"):
        budget_lr_factor(0, 10, "linear")


def test_config_fields_are_validated():
    cfg = load_config(None, ["train.time_budget_s=1800", "train.schedule=cosine",
                             "train.milestone_fracs=[0.5, 0.8]", "data.erase_prob=0"])
    assert cfg.train.time_budget_s == 1800 and cfg.train.milestone_fracs == (0.5, 0.8)
    for bad, msg in [({"schedule": "linear"}, "unknown schedule"),
                     ({"milestone_fracs": (0.9, 0.5)}, "milestone_fracs"),
                     ({"milestone_fracs": (1.5,)}, "milestone_fracs"),
                     ({"warmup_frac": 1.0}, "warmup_frac"),
                     ({"time_budget_s": -1.0}, "time_budget_s")]:
        with pytest.raises(ValueError, match=msg):
            TrainConfig(**bad)
    with pytest.raises(ValueError, match="erase_prob"):
        load_config(None, ["data.erase_prob=2"])
