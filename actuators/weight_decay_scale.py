"""``weight_decay_scale``: a bounded multiplicative scale on every param group's weight decay.

The effective weight decay of each param group at a step is ``group["weight_decay"] * scale``.
Exactly like ``lr_scale``, the scaled value is written right before ``optimizer.step()`` and the
user's value is put back right after: the optimizer's own values (and its ``state_dict``) are
never overwritten, so recovery restores the user's weight decay exactly.

What it changes: AdamW's decoupled decay (``param *= 1 - lr * weight_decay``, inside ``step()``),
Adam's and SGD's L2 term (``grad += weight_decay * param``). A group with ``weight_decay = 0``
stays at 0 (a no-decay group for biases and norms is left alone).

Commands: ``multiply: f`` and ``set: s`` (``f, s > 0``). Bounds: ``min`` (default 0.01), ``max``
(default 1.0), ``max_change_per_step``, ``recover: {factor, every}``; same semantics as
``lr_scale`` (``actuators/_scale.py``). Signal: ``weight_decay_scale.scale``.

:raises ActuatorError: at attach, when a param group has no ``weight_decay`` or every group's
    weight decay is 0 (the scale could change nothing).
"""

from __future__ import annotations

from lbw_policy.errors import ActuatorError

from ._scale import ScaleActuator, scale_bounds_schema

__all__ = ["WeightDecayScale"]


class WeightDecayScale(ScaleActuator):
    """Bounded scale on ``group["weight_decay"]``. See the module docstring."""

    name = "weight_decay_scale"
    hyperparameter = "weight_decay"
    bounds_schema = scale_bounds_schema("weight decay")

    def attach(self, optimizer) -> None:
        super().attach(optimizer)
        if all(float(g["weight_decay"]) == 0.0 for g in optimizer.param_groups):
            raise ActuatorError(
                f"weight_decay_scale: every param group of {type(optimizer).__name__} has "
                "weight_decay=0, so a scale cannot change anything; give the optimizer a weight "
                "decay > 0 or remove weight_decay_scale from the policy")
