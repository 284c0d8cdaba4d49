"""``lr_scale``: a bounded multiplicative scale on every param group's learning rate.

The effective learning rate of each param group at a step is ``group["lr"] * scale``, where
``group["lr"]`` is whatever the user or their LR scheduler set for this step. The scale is
written into ``group["lr"]`` right before ``optimizer.step()`` and the scheduler's value is put
back right after, so a scheduler never overwrites the scale and the scale never compounds
with the schedule (``torch.optim.lr_scheduler`` reads back an unscaled ``lr``).

Commands:

- ``{actuator: lr_scale, multiply: f}``: request ``scale * f`` (``f > 0``).
- ``{actuator: lr_scale, set: s}``: request ``s`` (``s > 0``).

Bounds (``actuators.lr_scale`` in the policy), applied in this order:

- ``min`` (default 0.01), ``max`` (default 1.0): the scale is clamped to ``[min, max]``.
- ``max_change_per_step`` (default: unlimited): the largest absolute change of the scale in one
  step, e.g. 0.5 lets one command take 1.0 to 0.5 but not to 0.25.
- ``recover: {factor, every}`` (default: no recovery): while no firing rule commands
  ``lr_scale``, every ``every`` steps after the last change the scale moves toward 1.0 by
  ``factor`` (``scale * factor`` below 1.0, ``scale / factor`` above), never past 1.0 and
  within the same bounds. ``factor > 1``.

A request the bounds changed is logged with ``clamped: true``, ``requested`` the scale asked for
and ``applied`` the scale taken. Source: the bounded LR governor of LBW-Guard (arXiv
2605.19008); multiplicative reduce / cooldown semantics follow ``ReduceLROnPlateau``.
"""

from __future__ import annotations

import math
from typing import Any, Optional

from lbw_policy.base import Action, Actuator


def _round(x: float) -> float:
    return float(f"{x:.12g}")


class LRScale(Actuator):
    name = "lr_scale"
    bounds_schema = {
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "min": {"type": "number", "exclusiveMinimum": 0, "description": "smallest scale; default 0.01"},
            "max": {"type": "number", "exclusiveMinimum": 0, "description": "largest scale; default 1.0"},
            "max_change_per_step": {"type": "number", "exclusiveMinimum": 0,
                                    "description": "largest absolute change of the scale per step"},
            "recover": {
                "type": "object",
                "additionalProperties": False,
                "required": ["factor", "every"],
                "description": "move the scale toward 1.0 by `factor` every `every` steps while no rule holds it",
                "properties": {
                    "factor": {"type": "number", "exclusiveMinimum": 1, "description": "recovery factor > 1"},
                    "every": {"type": "integer", "minimum": 1, "description": "steps between recovery moves"},
                },
            },
        },
    }
    commands = {
        "multiply": {"type": "number", "exclusiveMinimum": 0},
        "set": {"type": "number", "exclusiveMinimum": 0},
    }

    def __init__(self, min: float = 0.01, max: float = 1.0,
                 max_change_per_step: Optional[float] = None,
                 recover: Optional[dict] = None) -> None:
        super().__init__(min=min, max=max, max_change_per_step=max_change_per_step, recover=recover)
        self.validate_bounds(self.bounds)
        self.min = float(min)
        self.max = float(max)
        self.max_change = None if max_change_per_step is None else float(max_change_per_step)
        self.recover_factor = None if not recover else float(recover["factor"])
        self.recover_every = None if not recover else int(recover["every"])
        self.scale = 1.0 if self.min <= 1.0 <= self.max else self.max
        self.last_change_step = -1
        self._saved_lrs: Optional[list] = None

    @classmethod
    def validate_bounds(cls, bounds) -> None:
        lo, hi = bounds.get("min", 0.01), bounds.get("max", 1.0)
        if lo is not None and hi is not None and lo > hi:
            raise ValueError(f"min ({lo}) must be <= max ({hi})")

    def attach(self, optimizer) -> None:
        from lbw_policy.errors import ActuatorError

        for i, group in enumerate(getattr(optimizer, "param_groups", None) or []):
            if "lr" not in group:
                raise ActuatorError(f"lr_scale: param group {i} of {type(optimizer).__name__} has no 'lr'")
        if not getattr(optimizer, "param_groups", None):
            raise ActuatorError(f"lr_scale needs a torch.optim.Optimizer with param_groups, got {type(optimizer).__name__}")
        self.optimizer = optimizer

    def _clamp(self, target: float) -> float:
        value = min(self.max, max(self.min, target))
        if self.max_change is not None:
            value = min(self.scale + self.max_change, max(self.scale - self.max_change, value))
        return _round(value)

    def plan(self, verb: str, value: Any, step: int) -> Action:
        if verb == "multiply":
            target = self.scale * float(value)
        elif verb == "set":
            target = float(value)
        else:
            raise ValueError(f"lr_scale: unknown verb {verb!r}; expected 'multiply' or 'set'")
        target = _round(target)
        applied = self._clamp(target)
        return Action(self.name, verb, requested=target, applied=applied,
                      clamped=not math.isclose(applied, target, rel_tol=1e-12, abs_tol=0.0),
                      before=self.scale, after=applied, extra={"step": step})

    def commit(self, action: Action) -> None:
        # Any committed command or recovery restarts the `every` count of recovery.
        self.last_change_step = action.extra.get("step", self.last_change_step)
        self.scale = float(action.after)

    def recover(self, step: int) -> Optional[Action]:
        if self.recover_factor is None or self.scale == 1.0:
            return None
        if step - self.last_change_step < self.recover_every:
            return None
        if self.scale < 1.0:
            target = min(1.0, self.scale * self.recover_factor)
        else:
            target = max(1.0, self.scale / self.recover_factor)
        target = _round(target)
        applied = self._clamp(target)
        if applied == self.scale:
            return None
        return Action(self.name, "recover", requested=target, applied=applied,
                      clamped=applied != target, before=self.scale, after=applied,
                      extra={"step": step})

    def before_step(self, optimizer) -> bool:
        self._saved_lrs = [group["lr"] for group in optimizer.param_groups]
        if self.scale != 1.0:
            for group, lr in zip(optimizer.param_groups, self._saved_lrs):
                group["lr"] = lr * self.scale
        return True

    def after_step(self, optimizer, stepped: bool) -> None:
        if self._saved_lrs is not None:
            for group, lr in zip(optimizer.param_groups, self._saved_lrs):
                group["lr"] = lr
            self._saved_lrs = None

    def state_dict(self) -> dict:
        return {"scale": self.scale, "last_change_step": self.last_change_step}

    def load_state_dict(self, state) -> None:
        self.scale = float(state["scale"])
        self.last_change_step = int(state["last_change_step"])
