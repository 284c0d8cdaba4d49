"""Built-in actuators, registered as a default plugin through ``register_actuators``.

Each actuator is one module; see ``docs/actuators.md`` for what each changes, its bounds and its
recovery.
"""

from lbw_policy.hookspecs import hookimpl

from .halt import Halt
from .lr_scale import LRScale
from .skip_step import SkipStep

__all__ = ["Halt", "LRScale", "SkipStep"]


@hookimpl
def register_actuators(register):
    register(LRScale)
    register(SkipStep)
    register(Halt)
