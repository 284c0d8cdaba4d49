"""``lr_cap``: cap this step's learning rate at a multiple of its recent level.

The actuator keeps, for every param group ``g``, the reference of the ``lr_jump`` detector: the
larger of the median of the last ``window`` positive scheduled learning rates (``group["lr"]`` as
the user or their scheduler set it) and the last trusted rate (:mod:`lbw_policy.lr_history`),
recorded at the start of every guard step. When a rule commands it, for
that step only::

    factor_g = min(1, ratio * reference_g / lr_g)
    group["lr"] is multiplied by factor_g right before optimizer.step() and restored right after

So the step uses at most ``ratio`` x the recent level, whatever else scales the rate
(``lr_scale`` multiplies too; the product does not depend on the order of the two). Nothing
persists: the next step is capped again only if a rule commands it again, so the cap ends the
moment the fault does, without a recovery ramp. A group without history is not capped.

Command: ``{actuator: lr_cap, ratio: r}`` (``r > 0``): cap the step at ``r`` x the reference.
Bounds (``actuators.lr_cap``): ``window`` (int >= 1, default 100) and ``trust`` (> 1, default 3.0):
use the ``lr_jump`` detector's;
``min_ratio`` (default 0.1): a smaller requested ``r`` is clamped up to it.

Each action logs ``requested`` / ``applied`` (the ratio), ``before`` (group 0's scheduled rate)
and ``after`` (group 0's capped rate), plus ``reference`` and ``factor``. Signals: none. Works
with every ``torch.optim`` optimizer whose param groups have ``lr``.

Source: this project's companion of the ``lr_jump`` detector (``detectors/lr_jump.py``).
"""

from __future__ import annotations

from typing import Any, Optional

from lbw_policy.base import Action, Actuator
from lbw_policy.lr_history import LRHistory, scheduled_lrs
from lbw_policy.errors import ActuatorError

__all__ = ["LRCap"]


class LRCap(Actuator):
    """Per-step cap of the learning rate relative to its recent median (module docstring).

    :param window: scheduled rates kept per param group (default 100).
    :param min_ratio: smallest ratio a rule may request (default 0.1).
    :param trust: the ``lr_jump`` detector's ``trust`` (default 3.0).
    """

    name = "lr_cap"
    bounds_schema = {
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "window": {"type": "integer", "minimum": 1,
                       "description": "scheduled rates kept per param group; default 100"},
            "min_ratio": {"type": "number", "exclusiveMinimum": 0,
                          "description": "smallest ratio a rule may request; default 0.1"},
            "trust": {"type": "number", "exclusiveMinimum": 1,
                      "description": "the lr_jump detector's trust; default 3.0"},
        },
    }
    commands = {"ratio": {"type": "number", "exclusiveMinimum": 0}}

    def __init__(self, window: int = 100, min_ratio: float = 0.1, trust: float = 3.0) -> None:
        super().__init__(window=window, min_ratio=min_ratio, trust=trust)
        self.history = LRHistory(window, trust)
        self.min_ratio = float(min_ratio)
        self._lrs: list = []
        self._refs: list = []
        self._ratio: Optional[float] = None
        self._saved: Optional[list] = None

    def attach(self, optimizer) -> None:
        groups = getattr(optimizer, "param_groups", None)
        if not groups or any("lr" not in g for g in groups):
            raise ActuatorError(f"lr_cap needs a torch.optim.Optimizer whose param groups have 'lr', "
                                f"got {type(optimizer).__name__}")

    def observe(self, telemetry) -> None:
        self._lrs = scheduled_lrs(telemetry.optimizer)
        self._refs = self.history.references(self._lrs)
        self.history.push(self._lrs, self._refs)

    def _factors(self, ratio: float) -> list:
        return [min(1.0, ratio * ref / lr) if ref and lr > 0 else 1.0
                for lr, ref in zip(self._lrs, self._refs)]

    def plan(self, verb: str, value: Any, step: int) -> Action:
        if verb != "ratio":
            raise ValueError(f"lr_cap: unknown verb {verb!r}; expected 'ratio'")
        requested = float(value)
        applied = max(requested, self.min_ratio)
        factors = self._factors(applied)
        lr0 = self._lrs[0] if self._lrs else None
        return Action(self.name, verb, requested=requested, applied=applied,
                      clamped=applied != requested, before=lr0,
                      after=None if lr0 is None else lr0 * factors[0],
                      extra={"reference": self._refs[0] if self._refs else None,
                             "factor": factors[0] if factors else 1.0})

    def commit(self, action: Action) -> None:
        self._ratio = float(action.applied)

    def before_step(self, optimizer, step: int) -> bool:
        if self._ratio is not None:
            groups = optimizer.param_groups
            self._saved = [group["lr"] for group in groups]
            for group, factor in zip(groups, self._factors(self._ratio)):
                group["lr"] = group["lr"] * factor
        return True

    def after_step(self, optimizer, stepped: bool, step: int) -> None:
        if self._saved is not None:
            for group, value in zip(optimizer.param_groups, self._saved):
                group["lr"] = value
        self._saved = None
        self._ratio = None

    def state_dict(self) -> dict:
        return self.history.state_dict()

    def load_state_dict(self, state) -> None:
        self.history.load_state_dict(state)
