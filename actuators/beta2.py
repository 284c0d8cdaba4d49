"""``beta2``: a bounded change of Adam's / AdamW's second-moment decay ``beta2``.

A smaller ``beta2`` makes ``exp_avg_sq`` follow the recent gradient scale faster (the EMA's
memory is about ``1 / (1 - beta2)`` steps: 1000 at 0.999, 20 at 0.95), so after a gradient
spike or a shift in gradient scale the denominators adapt instead of under- or over-estimating
for a thousand steps. Changing ``beta2`` during training is established practice (PaLM,
arXiv 2204.02311, uses a step-dependent ``beta2``); here a rule changes it, within bounds, and
recovery returns it to the user's value.

What it changes: the second element of ``group["betas"]`` of every param group, written right
before ``optimizer.step()`` and put back right after, like ``lr_scale``: the optimizer's own
``betas`` (and its ``state_dict``) are never overwritten, so recovery restores the user's
value exactly. While the actuator is neutral it touches nothing. Note that Adam's bias
correction ``1 - beta2 ** step`` then uses the changed value; after a few hundred steps the
correction is ~1 either way.

Command: ``{actuator: beta2, set: b}`` (``0 < b < 1``): use ``b`` in every param group.

Bounds (``actuators.beta2``):

- ``min`` (default 0.9), ``max`` (default 0.9999), in (0, 1): a commanded value is clamped to
  ``[min, max]``. The optimizer's own value is the neutral value; it is always allowed (the
  bounds limit what rules may set, not what the user configured).
- ``max_change_per_step`` (default: unlimited): the largest absolute change per command, from
  the value in force; ``[min, max]`` wins where both cannot hold (from a user's value outside
  the bounds, the first command lands on the nearest bound).
- ``recover: {step, every}`` (default: none): while no firing rule holds ``beta2``, ``every``
  steps after the last change the value moves toward the optimizer's own (param group 0's) by
  at most ``step`` (absolute); within ``step`` of it, it returns to neutral.

``before`` / ``after`` in the log are the values of param group 0 (the optimizer's own when
neutral). Signal: ``beta2.value`` (the value in force, group 0's).

:raises ActuatorError: at attach, when a param group has no ``betas`` (SGD, ...) or holds them
    as tensors.
"""

from __future__ import annotations

import math
from typing import Any, Optional

from lbw_policy.base import Action, Actuator
from lbw_policy.errors import ActuatorError

__all__ = ["Beta2"]

_OPEN_UNIT = {"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 1}


class Beta2(Actuator):
    """Bounded, recovering ``beta2`` (module docstring).

    :param min: smallest commanded value (default 0.9).
    :param max: largest commanded value (default 0.9999).
    :param max_change_per_step: largest absolute change per command (default unlimited).
    :param recover: ``{"step": s > 0, "every": n >= 1}`` or ``None``.
    :raises ValueError: ``min > max``.
    """

    name = "beta2"
    bounds_schema = {
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "min": dict(_OPEN_UNIT, description="smallest commanded beta2; default 0.9"),
            "max": dict(_OPEN_UNIT, description="largest commanded beta2; default 0.9999"),
            "max_change_per_step": {"type": "number", "exclusiveMinimum": 0,
                                    "description": "largest absolute change per command"},
            "recover": {
                "type": "object", "additionalProperties": False, "required": ["step", "every"],
                "description": "move toward the optimizer's own beta2 by `step` every `every` "
                               "steps while no rule holds it",
                "properties": {"step": {"type": "number", "exclusiveMinimum": 0},
                               "every": {"type": "integer", "minimum": 1}},
            },
        },
    }
    commands = {"set": dict(_OPEN_UNIT)}
    signals = ("value",)

    def __init__(self, min: float = 0.9, max: float = 0.9999,
                 max_change_per_step: Optional[float] = None,
                 recover: Optional[dict] = None) -> None:
        super().__init__(min=min, max=max, max_change_per_step=max_change_per_step, recover=recover)
        self.validate_bounds(self.bounds)
        self.min, self.max = float(min), float(max)
        self.max_change = None if max_change_per_step is None else float(max_change_per_step)
        self.recover_step = None if not recover else float(recover["step"])
        self.recover_every = None if not recover else int(recover["every"])
        self.value: Optional[float] = None  # None: the optimizer's own
        self.last_change_step = -1
        self._saved: Optional[list] = None

    @classmethod
    def validate_bounds(cls, bounds) -> None:
        lo, hi = bounds.get("min", 0.9), bounds.get("max", 0.9999)
        if lo > hi:
            raise ValueError(f"min ({lo}) must be <= max ({hi})")

    def attach(self, optimizer) -> None:
        kind = type(optimizer).__name__
        for i, group in enumerate(getattr(optimizer, "param_groups", None) or []):
            betas = group.get("betas")
            if betas is None:
                raise ActuatorError(f"beta2 needs an optimizer with 'betas' in its param groups "
                                    f"(Adam, AdamW); {kind} has none")
            if not isinstance(betas[1], (int, float)):
                raise ActuatorError(f"beta2: param group {i} of {kind} holds betas as "
                                    f"{type(betas[1]).__name__}; beta2 changes float betas only")
        if not getattr(optimizer, "param_groups", None):
            raise ActuatorError(f"beta2 needs a torch.optim.Optimizer with param_groups, got {kind}")
        self.optimizer = optimizer

    def own(self) -> float:
        """The optimizer's own beta2 (param group 0)."""
        return float(self.optimizer.param_groups[0]["betas"][1])

    def current(self) -> float:
        """The beta2 in force for param group 0."""
        return self.own() if self.value is None else self.value

    def signal_values(self) -> dict:
        return {"value": self.current()}

    def _limit(self, target: float) -> float:
        cur = self.current()
        value = min(self.max, max(self.min, target))
        if self.max_change is not None:
            value = min(cur + self.max_change, max(cur - self.max_change, value))
            # [min, max] wins: from the user's value outside it, one command may move further.
            value = min(self.max, max(self.min, value))
        return float(f"{value:.12g}")

    def plan(self, verb: str, value: Any, step: int) -> Action:
        if verb != "set":
            raise ValueError(f"beta2: unknown verb {verb!r}; expected 'set'")
        target = float(f"{float(value):.12g}")
        applied = self._limit(target)
        return Action(self.name, verb, requested=target, applied=applied,
                      clamped=not math.isclose(applied, target, rel_tol=1e-12, abs_tol=0.0),
                      before=self.current(), after=applied, step=step, extra={"neutral": False})

    def commit(self, action: Action) -> None:
        self.last_change_step = (action.step if action.step is not None else self.last_change_step)
        self.value = None if action.extra.get("neutral") else float(action.after)

    def recover(self, step: int) -> Optional[Action]:
        if self.recover_step is None or self.value is None:
            return None
        if step - self.last_change_step < self.recover_every:
            return None
        own, cur = self.own(), self.value
        if abs(own - cur) <= self.recover_step + 1e-12:  # (float slack: 0.999 - 0.979 > 0.02)
            return Action(self.name, "recover", requested=own, applied=own, before=cur,
                          after=own, step=step, extra={"neutral": True})
        target = cur + math.copysign(self.recover_step, own - cur)
        applied = float(f"{min(self.max, max(self.min, target)):.12g}")
        if applied == cur:  # own lies outside [min, max] and cur sits on the bound: go neutral
            return Action(self.name, "recover", requested=own, applied=own, before=cur,
                          after=own, step=step, extra={"neutral": True})
        target = float(f"{target:.12g}")
        return Action(self.name, "recover", requested=target, applied=applied,
                      clamped=applied != target, before=cur, after=applied,
                      step=step, extra={"neutral": False})

    def before_step(self, optimizer, step: int) -> bool:
        if self.value is not None:
            self._saved = [group["betas"] for group in optimizer.param_groups]
            for group, betas in zip(optimizer.param_groups, self._saved):
                group["betas"] = (betas[0], self.value)
        return True

    def after_step(self, optimizer, stepped: bool, step: int) -> None:
        if self._saved is not None:
            for group, betas in zip(optimizer.param_groups, self._saved):
                group["betas"] = betas
            self._saved = None

    def state_dict(self) -> dict:
        return {"value": self.value, "last_change_step": self.last_change_step}

    def load_state_dict(self, state) -> None:
        self.value = None if state["value"] is None else float(state["value"])
        self.last_change_step = int(state["last_change_step"])
