"""``lr_jump``: the scheduled learning rate jumped far above its recent level.

A learning-rate fault (a scheduler bug, a wrong unit in a config, a resumed run with the wrong
schedule, a restart that multiplies the rate) does its damage in the very first step that uses
it: every loss- or update-based signal measures a step *after* it was taken. The scheduled rate
itself is known before the step, on the host, for free. At a due step, for each param group
``g`` with scheduled learning rate ``lr_g`` (``group["lr"]`` as the user or their scheduler set
it, before any actuator scales it)::

    median_g    = median of the last `window` positive scheduled rates of group g (earlier steps)
    trusted_g   = the last earlier rate of group g with lr <= trust * its own reference
    reference_g = max(median_g, trusted_g)
    jump_g      = lr_g / reference_g            (1.0 while group g has no history)
    jump        = max_g jump_g

The median makes the reference robust: a fault shorter than ``window / 2`` steps never becomes
the reference, while a deliberate change of the rate (a new schedule) becomes the reference
after ``window / 2`` steps. The trusted previous rate keeps a rising schedule from reading as a
jump: any warm-up (linear from 0, cosine, OneCycleLR's curved ramp, warm-up-stable-decay) is
compared with its own previous value, so ``jump`` is its per-step ratio (``<= 2``, reached at the
second step of a linear ramp from 0), while a fault (``> trust`` x in one step) is never trusted
and stays compared with the last good rate. A decaying schedule (cosine, ReduceLROnPlateau)
gives ``jump <= 1``; a warm restart of a cosine schedule gives up to ``1 / min_lr_ratio``, so
set the rule's threshold above it when you use restarts. (``lr_scale`` and ``lr_cap`` act
around the step and put the scheduled rate back: they never enter the history.)

Signals (host floats, no device work): ``jump`` (dimensionless, max over groups), ``lr`` (group
0's scheduled learning rate) and ``reference`` (group 0's reference; ``lr`` while it has no
history). The rates are Python floats, as torch's optimizers and schedulers keep them: reading
them waits for no device. (A learning rate held as a CUDA tensor, which torch allows, would be
read back by ``float()``: a host-device sync per step.)

Params: ``window`` (int >= 1, default 100 steps); ``trust`` (number > 1, default 3.0: set it to
the threshold of the rule that reads ``jump``). The ``lr_cap`` actuator keeps the same reference
(same ``window`` and ``trust``, :mod:`lbw_policy.lr_history`) to cap the step's learning rate;
see ``docs/actuators.md``.

Source: the median-of-window reference is the robust baseline of Hampel's filter; the check is
this project's (it complements loss-based detectors, which cannot see a step before it is taken).
"""

from __future__ import annotations

from typing import Any, Optional

from lbw_policy.base import Detector
from lbw_policy.lr_history import LRHistory, scheduled_lrs

__all__ = ["LRJump"]


def jumps(lrs: list, references: list) -> list:
    """``lr / reference`` per group; 1.0 where the reference is missing."""
    return [lr / ref if ref else 1.0 for lr, ref in zip(lrs, references)]


class LRJump(Detector):
    """Scheduled learning rate over the median of its recent history (module docstring).

    :param window: history length in due steps (default 100).
    :param trust: largest per-step ratio still trusted as the schedule's own move (default 3.0).
    """

    name = "lr_jump"
    signals = ("jump", "lr", "reference")
    reductions = {"jump": "same", "lr": "same", "reference": "same"}  # the schedule is global
    params_schema = {
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "window": {"type": "integer", "minimum": 1,
                       "description": "scheduled rates kept per param group; default 100"},
            "trust": {"type": "number", "exclusiveMinimum": 1,
                      "description": "a rate within trust x its reference becomes the trusted "
                                     "previous rate; default 3.0 (the rule's threshold)"},
        },
    }

    def __init__(self, window: int = 100, trust: float = 3.0) -> None:
        super().__init__(window=window, trust=trust)
        self.history = LRHistory(window, trust)
        self.optimizer: Optional[Any] = None

    def setup(self, model, optimizer, every: int = 1) -> None:
        self.every = int(every)
        self.optimizer = optimizer

    def compute(self, telemetry):
        lrs = scheduled_lrs(telemetry.optimizer)
        refs = self.history.references(lrs)
        self.history.push(lrs, refs)
        ref0 = refs[0] if refs[0] else lrs[0]
        return {"jump": max(jumps(lrs, refs)), "lr": lrs[0], "reference": ref0}

    def state_dict(self) -> dict:
        return self.history.state_dict()

    def load_state_dict(self, state) -> None:
        self.history.load_state_dict(state)
