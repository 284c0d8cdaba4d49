"""lbw-policy: declarative, auditable training-control governance for PyTorch.

Public surface::

    from lbw_policy import Guard, load_policy, TrainingHalted

``Guard`` (and everything that needs torch) is imported lazily, so ``import lbw_policy`` and the
policy engine work without loading torch.
"""

from __future__ import annotations

__version__ = "0.1.0"

from lbw_policy.errors import (  # noqa: E402
    ActuatorError,
    DecisionLogError,
    PluginError,
    PolicyError,
    TrainingHalted,
)
from lbw_policy.hookspecs import hookimpl  # noqa: E402

__all__ = [
    "__version__",
    "Guard",
    "StepResult",
    "Policy",
    "load_policy",
    "loads_policy",
    "Detector",
    "Actuator",
    "Action",
    "hookimpl",
    "register_plugin",
    "PolicyError",
    "PluginError",
    "ActuatorError",
    "DecisionLogError",
    "TrainingHalted",
]

_LAZY = {
    "Guard": ("lbw_policy.adapters.guard", "Guard"),
    "StepResult": ("lbw_policy.adapters.guard", "StepResult"),
    "Policy": ("lbw_policy.policy", "Policy"),
    "load_policy": ("lbw_policy.policy", "load_policy"),
    "loads_policy": ("lbw_policy.policy", "loads_policy"),
    "Detector": ("lbw_policy.base", "Detector"),
    "Actuator": ("lbw_policy.base", "Actuator"),
    "Action": ("lbw_policy.base", "Action"),
    "register_plugin": ("lbw_policy.plugins", "register_plugin"),
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        value = getattr(importlib.import_module(module), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'lbw_policy' has no attribute {name!r}")
