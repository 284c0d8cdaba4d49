"""Built-in detectors, registered as a default plugin through ``register_detectors``.

Each detector is one module; see ``docs/detectors.md`` for the catalogue.
"""

from lbw_policy.hookspecs import hookimpl

from .grad_norm import GradNorm
from .loss_spike import LossSpike
from .nonfinite import NonFinite

__all__ = ["GradNorm", "LossSpike", "NonFinite"]


@hookimpl
def register_detectors(register):
    register(LossSpike)
    register(GradNorm)
    register(NonFinite)
