"""Hugging Face Accelerate integration (``pip install lbw-policy[accelerate]``).

Accelerate's ``prepare`` wraps ``torch.optim.Optimizer`` instances in an ``AcceleratedOptimizer``;
a :class:`~lbw_policy.integrations.optimizer.GuardedOptimizer` is one, so it goes through
``prepare`` unchanged::

    guarded = GuardedOptimizer(AdamW(model.parameters(), lr=3e-4), "default", model=model,
                               log_dir="runs/acc", clip_grad_norm=1.0)
    model, opt, loader, sched = accelerator.prepare(model, guarded, loader, sched)
    register_guard(accelerator, guarded)          # save_state / load_state carry the guard
    for x, y in loader:
        with accelerator.accumulate(model):
            loss = loss_fn(model(x), y)
            accelerator.backward(loss)
            guarded.observe_loss(loss)             # every micro-batch
            opt.step(); sched.step(); opt.zero_grad()

- **accumulation**: ``AcceleratedOptimizer.step()`` calls the inner step only when
  ``accelerator.sync_gradients`` (the last micro-batch of a ``gradient_accumulation_steps``
  group), so the guard steps once per optimizer step, on the mean of the observed micro-batch
  losses.
- **clipping**: do not call ``accelerator.clip_grad_norm_`` before the step (it would hide a
  spike from ``grad_norm``); give the threshold to the guard (``clip_grad_norm=``).
- **mixed precision**: ``mixed_precision="fp16"`` uses a ``GradScaler``; Accelerate calls
  ``scaler.step(guarded)``, which :class:`GuardedOptimizer` handles (overflow = a
  ``scaler_skipped`` record). Since ``step()`` is always called, ``optimizer_step_was_skipped``
  stays ``False`` and the scheduler advances on skipped steps, as for a step the guard skips.
- **checkpoints**: :func:`register_guard` registers the guard's state with
  ``accelerator.register_for_checkpointing``; ``save_state`` / ``load_state`` then carry it.
- **logging**: ``accelerator.log(guard_metrics(guarded), step=...)`` sends the signals and
  decisions to the trackers.
- **DeepSpeed**: refused with :class:`~lbw_policy.integrations.UnsupportedStack`.
"""

from __future__ import annotations

from typing import Any

from lbw_policy.integrations import refuse_deepspeed
from lbw_policy.integrations.optimizer import GuardedOptimizer, guard_metrics

__all__ = ["GuardState", "register_guard", "guard_metrics"]


class GuardState:
    """The guard's state as an object Accelerate checkpoints (``state_dict`` /
    ``load_state_dict``; saved with ``torch.save`` as ``custom_checkpoint_<i>.pkl``).

    :param guarded: the :class:`GuardedOptimizer`.
    """

    def __init__(self, guarded: GuardedOptimizer) -> None:
        self.guarded = guarded

    def state_dict(self) -> dict:
        return self.guarded.guard_state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.guarded.load_guard_state_dict(state)


def register_guard(accelerator: Any, guarded: GuardedOptimizer) -> GuardState:
    """Check the stack and register the guard's state for ``save_state`` / ``load_state``.

    :param accelerator: the ``accelerate.Accelerator``.
    :param guarded: the :class:`GuardedOptimizer` passed to ``prepare``.
    :return: the registered :class:`GuardState`.
    :raises UnsupportedStack: DeepSpeed is enabled.
    :raises TypeError: ``guarded`` is not a :class:`GuardedOptimizer`.
    """
    from accelerate.utils import DistributedType

    refuse_deepspeed("accelerate.register_guard",
                     accelerator.distributed_type == DistributedType.DEEPSPEED)
    if not isinstance(guarded, GuardedOptimizer):
        raise TypeError(f"register_guard needs the GuardedOptimizer, got {type(guarded).__name__}")
    state = GuardState(guarded)
    accelerator.register_for_checkpointing(state)
    return state
