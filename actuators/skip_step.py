"""``skip_step``: skip this step's ``optimizer.step()``.

A skipped step leaves the weights and the whole optimizer state untouched: for AdamW the
``exp_avg`` and ``exp_avg_sq`` moments, the ``step`` count (so bias correction does not
advance) and the decoupled weight decay (applied inside ``step()``) all stay as they were. The
gradients are left for the caller's ``zero_grad``.

Command: ``{actuator: skip_step}`` (bare).

Bounds: ``max_consecutive`` (default 3): at most this many consecutive skipped steps; a further
request is refused (logged with ``applied: false, clamped: true``) so a persistent condition
cannot freeze training; escalate with another rule (e.g. ``halt``) for that case.

Source: the skip-step of OLMo-core (``SkipStepOptimizer``) and LBW-Guard (arXiv 2605.19008).
"""

from __future__ import annotations

from typing import Any

from lbw_policy.base import Action, Actuator


class SkipStep(Actuator):
    name = "skip_step"
    bounds_schema = {
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "max_consecutive": {"type": "integer", "minimum": 1,
                                "description": "most consecutive skipped steps; default 3"},
        },
    }
    commands = {"apply": {"type": "null"}}

    def __init__(self, max_consecutive: int = 3) -> None:
        super().__init__(max_consecutive=max_consecutive)
        self.max_consecutive = int(max_consecutive)
        self.consecutive = 0
        self.pending = False

    def plan(self, verb: str, value: Any, step: int) -> Action:
        allowed = self.consecutive < self.max_consecutive
        return Action(self.name, verb, requested=True, applied=allowed, clamped=not allowed,
                      before=self.consecutive, after=self.consecutive + 1 if allowed else 0,
                      note=None if allowed else f"max_consecutive={self.max_consecutive} reached; step taken")

    def commit(self, action: Action) -> None:
        if action.applied:
            self.pending = True

    def before_step(self, optimizer) -> bool:
        return not self.pending

    def after_step(self, optimizer, stepped: bool) -> None:
        self.consecutive = 0 if stepped else self.consecutive + 1
        self.pending = False

    def state_dict(self) -> dict:
        return {"consecutive": self.consecutive}

    def load_state_dict(self, state) -> None:
        self.consecutive = int(state["consecutive"])
        self.pending = False
