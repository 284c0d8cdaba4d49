"""``weight_decay_scale``: a bounded multiplicative scale on every param group's weight decay.

The effective weight decay of each param group at a step is ``group["weight_decay"] * scale``.
Exactly like ``lr_scale``, the scaled value is written right before ``optimizer.step()`` and the
user's value is put back right after: the optimizer's own values (and its ``state_dict``) are
never overwritten, so recovery restores the user's weight decay exactly.

What it changes: AdamW's decoupled decay (``param *= 1 - lr * weight_decay``, inside ``step()``),
Adam's and SGD's L2 term (``grad += weight_decay * param``). A group with ``weight_decay = 0``
stays at 0 (a no-decay group for biases and norms is left alone). The value is read at every
step, so a weight decay that a schedule raises from 0 later is scaled from then on.

Commands: ``multiply: f``, ``set: s`` (``f, s > 0``) and ``add: d``. Bounds: ``min`` (default
0.01), ``max`` (default 1.0), ``max_change_per_step``, ``recover: {factor, every}``; same
semantics as ``lr_scale`` (``actuators/_scale.py``). Signal: ``weight_decay_scale.scale``.

:raises ActuatorError: at attach, when a param group has no ``weight_decay``.

An optimizer whose every group has weight decay 0 at attach is accepted: the scale changes
nothing until something (a schedule, the user) raises a group's weight decay above 0, and a
policy that ships a weight-decay brake (``early-warning.yaml``) runs unchanged without decay.
A command planned while every group's weight decay is 0 carries the note "weight_decay is 0 in
every param group: nothing to scale now" in the decision log (the scale still moves, and acts
on a decay raised later).
"""

from __future__ import annotations

from ._scale import ScaleActuator, scale_bounds_schema

__all__ = ["WeightDecayScale"]


class WeightDecayScale(ScaleActuator):
    """Bounded scale on ``group["weight_decay"]``. See the module docstring."""

    name = "weight_decay_scale"
    hyperparameter = "weight_decay"
    bounds_schema = scale_bounds_schema("weight decay")

    def plan(self, verb, value, step):
        action = super().plan(verb, value, step)
        optimizer = getattr(self, "optimizer", None)
        if optimizer is not None and all(float(g["weight_decay"]) == 0.0
                                         for g in optimizer.param_groups):
            # the scale moves, but nothing it multiplies is above 0 now: say so in the log
            action.note = "weight_decay is 0 in every param group: nothing to scale now"
        return action

