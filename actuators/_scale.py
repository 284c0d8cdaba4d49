"""The bounded multiplicative scale shared by ``lr_scale`` and ``weight_decay_scale``.

A :class:`ScaleActuator` controls one number, ``scale`` (neutral value 1.0), and applies it to one
param-group hyperparameter *around* ``optimizer.step()``: right before the step every param
group's value is multiplied by ``scale``; right after, the value found before is put back. So the
user's value (or their scheduler's) is never overwritten and the scale never compounds with it,
and ``optimizer.state_dict()`` always holds the user's values.

Commands: ``multiply: f`` requests ``scale * f``; ``set: s`` requests ``s`` (``f, s > 0``);
``add: d`` requests ``scale + d`` (an additive increase, or a decrease for ``d < 0``).

Bounds, applied in this order to every command and every recovery move:

- ``min`` (default 0.01, at most 1), ``max`` (default 1.0, from 1 to 1e6): the scale stays in
  ``[min, max]``. It starts at 1.0 (the value as scheduled), so ``[min, max]`` must contain 1: a
  policy that does not is refused when it loads, never applied silently from step 0.
- ``max_change_per_step`` (default: unlimited): the largest absolute change of the scale in one
  step.
- ``recover: {factor, every}`` (default: no recovery): while no firing rule holds the actuator,
  ``every`` steps after the last change the scale moves toward 1.0 by ``factor`` (``scale *
  factor`` below 1.0, ``scale / factor`` above), never past 1.0; ``factor > 1``.

Every plan reports ``requested`` (the scale asked for, rounded to 12 significant digits),
``applied`` (the scale taken), ``clamped`` (``applied != requested``) and ``before`` / ``after``.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar, Optional

from lbw_policy.base import Action, Actuator
from lbw_policy.errors import ActuatorError

__all__ = ["ScaleActuator", "scale_bounds_schema"]


def _round(x: float) -> float:
    return float(f"{x:.12g}")


#: Largest scale, factor or change a policy may write: anything beyond makes no hyperparameter
#: sense, and 1e300-sized values overflow the optimizer's arithmetic mid-step.
MAX_SCALE = 1e6


def scale_bounds_schema(what: str) -> dict:
    """JSON Schema of a scale actuator's bounds; ``what`` names the hyperparameter in words."""
    return {
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "min": {"type": "number", "exclusiveMinimum": 0, "maximum": 1.0,
                    "description": f"smallest scale of the {what}, <= 1 (the scale starts at "
                                   "1: the value as scheduled); default 0.01"},
            "max": {"type": "number", "minimum": 1.0, "maximum": MAX_SCALE,
                    "description": f"largest scale of the {what}, in [1, {MAX_SCALE:g}]; "
                                   "default 1.0"},
            "max_change_per_step": {"type": "number", "exclusiveMinimum": 0,
                                    "maximum": MAX_SCALE,
                                    "description": "largest absolute change of the scale per step"},
            "recover": {
                "type": "object",
                "additionalProperties": False,
                "required": ["factor", "every"],
                "description": "move the scale toward 1.0 by `factor` every `every` steps while "
                               "no rule holds it",
                "properties": {
                    "factor": {"type": "number", "exclusiveMinimum": 1, "maximum": MAX_SCALE,
                               "description": "recovery factor > 1"},
                    "every": {"type": "integer", "minimum": 1,
                              "description": "steps between recovery moves"},
                },
            },
        },
    }


class ScaleActuator(Actuator):
    """A bounded scale on the param-group value ``hyperparameter`` (see the module docstring).

    :param min: smallest scale (default 0.01, > 0).
    :param max: largest scale (default 1.0, >= ``min``).
    :param max_change_per_step: largest absolute change of the scale in one step (default
        ``None``: unlimited).
    :param recover: ``{"factor": f > 1, "every": n >= 1}`` or ``None`` (no recovery).
    :raises ValueError: ``min > max``.
    """

    hyperparameter: ClassVar[str] = ""
    commands = {
        "multiply": {"type": "number", "exclusiveMinimum": 0, "maximum": MAX_SCALE},
        "set": {"type": "number", "exclusiveMinimum": 0, "maximum": MAX_SCALE},
        "add": {"type": "number", "minimum": -MAX_SCALE, "maximum": MAX_SCALE},
    }
    signals = ("scale",)

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
        self.scale = 1.0  # [min, max] contains 1 (the schema's bounds)
        self.last_change_step = -1
        self._saved: Optional[list] = None

    @classmethod
    def validate_bounds(cls, bounds) -> None:
        lo, hi = bounds.get("min", 0.01), bounds.get("max", 1.0)
        if lo is not None and hi is not None and lo > hi:
            raise ValueError(f"min ({lo}) must be <= max ({hi})")

    def attach(self, optimizer) -> None:
        groups = getattr(optimizer, "param_groups", None)
        if not groups:
            raise ActuatorError(f"{self.name} needs a torch.optim.Optimizer with param_groups, "
                                f"got {type(optimizer).__name__}")
        key = self.hyperparameter
        for i, group in enumerate(groups):
            if key not in group:
                raise ActuatorError(f"{self.name}: param group {i} of {type(optimizer).__name__} "
                                    f"has no {key!r}")
        self.optimizer = optimizer

    def signal_values(self) -> dict:
        return {"scale": self.scale}

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
        elif verb == "add":  # additive increase (LBW-Guard's +0.01 per calm collection)
            target = self.scale + float(value)
        else:
            raise ValueError(f"{self.name}: unknown verb {verb!r}; expected 'multiply', 'set' "
                             f"or 'add'")
        target = _round(target)
        applied = self._clamp(target)
        return Action(self.name, verb, requested=target, applied=applied,
                      clamped=not math.isclose(applied, target, rel_tol=1e-12, abs_tol=0.0),
                      before=self.scale, after=applied, step=step)

    def commit(self, action: Action) -> None:
        # Any committed command or recovery restarts the `every` count of recovery.
        self.last_change_step = (action.step if action.step is not None else self.last_change_step)
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
                      step=step)

    def before_step(self, optimizer, step: int) -> bool:
        key = self.hyperparameter
        self._saved = [group[key] for group in optimizer.param_groups]
        if self.scale != 1.0:
            for group, value in zip(optimizer.param_groups, self._saved):
                group[key] = value * self.scale
        return True

    def after_step(self, optimizer, stepped: bool, step: int) -> None:
        if self._saved is not None:
            for group, value in zip(optimizer.param_groups, self._saved):
                group[self.hyperparameter] = value
            self._saved = None

    def state_dict(self) -> dict:
        return {"scale": self.scale, "last_change_step": self.last_change_step}

    def load_state_dict(self, state) -> None:
        self.scale = float(state["scale"])
        self.last_change_step = int(state["last_change_step"])
