"""Governance inside the training stacks people use (optional extras; ``docs/integrations.md``).

- :class:`~lbw_policy.integrations.optimizer.GuardedOptimizer` (torch only): a Guard that *is* a
  ``torch.optim.Optimizer``, for ``GradScaler``, Accelerate, Lightning and plain loops.
- :mod:`lbw_policy.integrations.transformers` (``pip install lbw-policy[hf]``):
  ``GuardedTrainer`` / ``GuardedTrainerMixin`` for the Hugging Face ``Trainer``.
- :mod:`lbw_policy.integrations.accelerate` (``lbw-policy[accelerate]``): checkpointing the
  guard with ``Accelerator.save_state`` / ``load_state``.
- :mod:`lbw_policy.integrations.lightning` (``lbw-policy[lightning]``): ``GuardCallback``.

Each is a thin layer over the same :class:`~lbw_policy.adapters.guard.Guard` and Governor:
the framework supplies the loss, the step and the checkpoint; the guard does the rest. The
framework modules are imported only when used, so the core stays light.
"""

from __future__ import annotations

from typing import Any

__all__ = ["GuardedOptimizer", "UnsupportedStack", "refuse_deepspeed"]


class UnsupportedStack(RuntimeError):
    """A training stack lbw-policy cannot govern (yet), found where it would otherwise govern
    nothing silently. ``stack`` names it."""

    def __init__(self, message: str, stack: str) -> None:
        super().__init__(message)
        self.stack = stack


def refuse_deepspeed(where: str, enabled: bool) -> None:
    """Raise :class:`UnsupportedStack` when DeepSpeed drives the optimizer.

    DeepSpeed's engine wraps and steps the optimizer itself (ZeRO partitions its state and
    gradients, and its loss scaler skips steps on its own), so a guard around the optimizer the
    user built would see no gradient and govern nothing.

    :param where: the integration, for the message (``"transformers.GuardedTrainer"``).
    :param enabled: whether DeepSpeed is in use.
    :raises UnsupportedStack: when ``enabled``.
    """
    if enabled:
        raise UnsupportedStack(
            f"{where}: DeepSpeed is enabled, and its engine steps the optimizer itself (ZeRO "
            f"shards the gradients and optimizer state), so lbw-policy would govern nothing. "
            f"DeepSpeed is not supported yet: train without it (plain or DDP through torchrun, "
            f"see docs/distributed.md).", stack="deepspeed")


def __getattr__(name: str) -> Any:
    if name == "GuardedOptimizer":
        from lbw_policy.integrations.optimizer import GuardedOptimizer

        return GuardedOptimizer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
