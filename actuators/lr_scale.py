"""``lr_scale``: a bounded multiplicative scale on every param group's learning rate.

The effective learning rate of each param group at a step is ``group["lr"] * scale``, where
``group["lr"]`` is whatever the user or their LR scheduler set for this step. The scale is
written into ``group["lr"]`` right before ``optimizer.step()`` and the scheduler's value is put
back right after, so a scheduler never overwrites the scale and the scale never compounds
with the schedule (``torch.optim.lr_scheduler`` reads back an unscaled ``lr``, and
``optimizer.state_dict()`` holds the scheduler's values).

Commands:

- ``{actuator: lr_scale, multiply: f}``: request ``scale * f`` (``f > 0``).
- ``{actuator: lr_scale, set: s}``: request ``s`` (``s > 0``).
- ``{actuator: lr_scale, add: d}``: request ``scale + d`` (LBW-Guard's additive increase).

Bounds (``actuators.lr_scale`` in the policy), applied in this order:

- ``min`` (default 0.01), ``max`` (default 1.0): the scale is clamped to ``[min, max]``.
- ``max_change_per_step`` (default: unlimited): the largest absolute change of the scale in one
  step, e.g. 0.5 lets one command take 1.0 to 0.5 but not to 0.25.
- ``recover: {factor, every}`` (default: no recovery): while no firing rule commands
  ``lr_scale``, every ``every`` steps after the last change the scale moves toward 1.0 by
  ``factor`` (``scale * factor`` below 1.0, ``scale / factor`` above), never past 1.0 and
  within the same bounds. ``factor > 1``.

Signal: ``lr_scale.scale`` (the scale in force, before this step's commands).

A request the bounds changed is logged with ``clamped: true``, ``requested`` the scale asked for
and ``applied`` the scale taken. Works with every ``torch.optim`` optimizer whose param groups
have ``lr``. Source: the bounded LR governor of LBW-Guard (arXiv 2605.19008); multiplicative
reduce / cooldown semantics follow ``ReduceLROnPlateau``.
"""

from __future__ import annotations

from ._scale import ScaleActuator, scale_bounds_schema

__all__ = ["LRScale"]


class LRScale(ScaleActuator):
    """Bounded scale on ``group["lr"]``. See the module docstring and ``ScaleActuator``."""

    name = "lr_scale"
    hyperparameter = "lr"
    bounds_schema = scale_bounds_schema("learning rate")
