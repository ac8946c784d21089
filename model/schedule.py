"""Training held to a wall-clock budget: durations, epochs sized to the clock, the LR schedule.

With a time budget the run does not know its length in epochs up front. Epoch 0 (the first
warm-up epoch, at the lowest learning rate) measures how long an epoch takes; after every
epoch the plan is re-made from the mean epoch time so far, so a machine that slows down
shortens the run instead of overrunning the budget. The learning-rate schedule is written in
fractions of the planned run (warm-up over the first `warmup_frac`, x gamma at each fraction
in `milestone_fracs`, or a cosine decay), so it stretches or shrinks with the plan.

All functions are pure (numbers in, numbers out) so they are tested without Ray or torch:

    budget = parse_duration("30m")                              # 1800.0
    total = planned_epochs(budget, elapsed_s=62.0, epochs_done=1)   # 29 with 62 s epochs
    f = budget_lr_factor(epoch=3, total_epochs=total, schedule="step",
                         warmup_frac=0.1, warmup_factor=0.01, milestone_fracs=(0.7, 0.9))
"""
from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass

__all__ = ["SCHEDULES", "BudgetPlan", "budget_lr_factor", "format_duration", "parse_duration",
           "planned_epochs", "progress_milestones"]

SCHEDULES = ("step", "cosine")
_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0}
_DURATION = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([smh]?)\s*$", re.IGNORECASE)


def parse_duration(text: str | float) -> float:
    """'30m', '1800s', '1h', '1.5h' or a bare number of seconds -> seconds (float > 0).

    Raises ValueError naming the bad text for anything else (negative, zero, unknown unit).
    """
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        seconds = float(text)
    else:
        m = _DURATION.match(str(text))
        if not m:
            raise ValueError(f"time budget {text!r} is not a duration like 30m, 1800s or 1h")
        seconds = float(m.group(1)) * _UNITS[(m.group(2) or "s").lower()]
    if not math.isfinite(seconds) or seconds <= 0:
        raise ValueError(f"time budget must be > 0 seconds, got {text!r}")
    return seconds


def format_duration(seconds: float) -> str:
    """Seconds -> the shortest exact form parse_duration reads back ('30m', '90s', '1h')."""
    s = float(seconds)
    for unit, size in (("h", 3600.0), ("m", 60.0)):
        if s >= size and s % size == 0:
            return f"{int(s // size)}{unit}"
    return f"{s:g}s"


def planned_epochs(budget_s: float, elapsed_s: float, epochs_done: int) -> int:
    """Total epochs the run should have, judged after `epochs_done` epochs took `elapsed_s`.

    One more epoch is planned for every mean epoch time that still fits in the budget, so the
    run ends at or just under `budget_s` if epochs keep their pace. Never fewer than the
    epochs already done, and at least 1.
    """
    if budget_s <= 0:
        raise ValueError(f"budget_s must be > 0, got {budget_s}")
    if epochs_done < 1:
        raise ValueError("planned_epochs needs at least one measured epoch")
    mean_epoch = max(elapsed_s, 1e-9) / epochs_done
    remaining = budget_s - elapsed_s
    more = math.floor(remaining / mean_epoch + 1e-9) if remaining > 0 else 0
    return epochs_done + max(0, more)


def progress_milestones(total_epochs: int, milestone_fracs: tuple[float, ...]) -> tuple[int, ...]:
    """Fractions of the run -> 0-based epochs where the step decay applies (for logs/records)."""
    return tuple(math.ceil(f * total_epochs - 1e-9) for f in milestone_fracs)


def budget_lr_factor(epoch: int, total_epochs: int, schedule: str = "step",
                     warmup_frac: float = 0.1, warmup_factor: float = 0.01,
                     milestone_fracs: tuple[float, ...] = (0.7, 0.9), gamma: float = 0.1) -> float:
    """Multiplier of the base LR for 0-based `epoch` of a run planned at `total_epochs`.

    progress p = epoch / total_epochs in [0, 1). Warm-up: linear from `warmup_factor` to 1
    over p < warmup_frac (epoch 0 always starts at warmup_factor when warmup_frac > 0).
    "step": x gamma for each milestone fraction f with p >= f. "cosine": after warm-up,
    0.5 * (1 + cos(pi * q)) with q the progress through the rest of the run (never 0: the
    last epoch keeps a small LR).
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; choose from {list(SCHEDULES)}")
    total = max(1, int(total_epochs))
    p = min(max(epoch, 0), total - 1) / total
    warm = 1.0
    if warmup_frac > 0 and p < warmup_frac:
        alpha = p / warmup_frac
        warm = warmup_factor * (1 - alpha) + alpha
    if schedule == "step":
        return warm * gamma ** sum(1 for f in milestone_fracs if p >= f)
    start = warmup_frac if warmup_frac < 1 else 0.0
    q = max(0.0, (p - start) / (1 - start)) if p >= start else 0.0
    return warm * 0.5 * (1 + math.cos(math.pi * q))


@dataclass
class BudgetPlan:
    """The running plan of a budgeted run: seconds trained, epochs done, epochs planned.

    `record(seconds)` after each epoch (its wall time: training, checkpoint, data loading;
    not validation) re-plans `total_epochs`; `more()` says whether another epoch fits.
    Before the first epoch is measured the plan is 1 epoch (epoch 0 runs at progress 0,
    the start of the warm-up, whatever the final length). Stored in checkpoints (as_dict) so
    a resumed run keeps counting against the same budget.
    """

    budget_s: float
    trained_s: float = 0.0
    epochs_done: int = 0
    total_epochs: int = 1

    def __post_init__(self) -> None:
        if not self.budget_s > 0:
            raise ValueError(f"budget_s must be > 0, got {self.budget_s}")

    def record(self, seconds: float) -> int:
        """Add one finished epoch of `seconds`; returns the new planned total."""
        self.trained_s += max(0.0, float(seconds))
        self.epochs_done += 1
        self.total_epochs = planned_epochs(self.budget_s, self.trained_s, self.epochs_done)
        return self.total_epochs

    def more(self) -> bool:
        return self.epochs_done < self.total_epochs

    def rebudget(self, budget_s: float) -> None:
        """A resumed run given another budget: re-plan what is left from the pace so far."""
        if not budget_s > 0:
            raise ValueError(f"budget_s must be > 0, got {budget_s}")
        self.budget_s = float(budget_s)
        if self.epochs_done:
            self.total_epochs = planned_epochs(self.budget_s, self.trained_s, self.epochs_done)

    def as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> BudgetPlan:
        return cls(**{k: d[k] for k in ("budget_s", "trained_s", "epochs_done", "total_epochs")})
