"""Built-in actuators, registered as a default plugin through ``register_actuators``.

Each actuator is one module; see ``docs/actuators.md`` for what each changes in the optimizer,
its bounds, its signals and its recovery.
"""

from lbw_policy.hookspecs import hookimpl

from .beta2 import Beta2
from .grad_clip import GradClip
from .grad_normalize import GradNormalize
from .halt import Halt
from .lr_cap import LRCap
from .lr_scale import LRScale
from .momentum_reset import MomentumReset
from .rollback import Rollback
from .skip_step import SkipStep
from .weight_decay_scale import WeightDecayScale

__all__ = ["Beta2", "GradClip", "GradNormalize", "Halt", "LRCap", "LRScale", "MomentumReset", "Rollback", "SkipStep",
           "WeightDecayScale"]


@hookimpl
def register_actuators(register):
    for cls in (LRScale, SkipStep, MomentumReset, GradClip, GradNormalize, WeightDecayScale, Beta2,
                Rollback, Halt, LRCap):
        register(cls)
