"""Hugging Face ``Trainer`` integration (``pip install lbw-policy[hf]``).

``Trainer`` has no seam that hands a callback the loss, so the integration is a small mixin
over its documented override points (``training_step``, ``log``, ``create_optimizer``,
``train``) plus a ``TrainerCallback`` for the checkpoint and the end of the run::

    from lbw_policy.integrations.transformers import GuardedTrainer
    trainer = GuardedTrainer(model=model, args=args, train_dataset=ds,
                             guard={"policy": "default", "log_dir": "runs/hf"})
    trainer.train()                       # or train(resume_from_checkpoint=True)

``guard`` holds the :class:`~lbw_policy.adapters.guard.Guard` arguments; the Trainer's own
optimizer (``create_optimizer``) is wrapped in a :class:`GuardedOptimizer`. Alternatively pass
``optimizers=(GuardedOptimizer(AdamW(...), ...), scheduler)`` yourself. With your own Trainer
subclass (``SFTTrainer``, ...), use ``class MyTrainer(GuardedTrainerMixin, SFTTrainer)``.

What it does, per optimizer step (``Trainer`` calls ``optimizer.step()`` once per
``gradient_accumulation_steps`` micro-batches, through Accelerate):

- **loss**: every ``training_step`` records its micro-batch loss (the Trainer returns it divided
  by the accumulation count, so it is multiplied back); the guard governs on their mean.
- **clipping**: ``TrainingArguments.max_grad_norm`` (default 1.0) would clip *before* the
  guard's detectors read the gradient norm, hiding a spike from them. The mixin moves the clip
  into the guard (``Guard(clip_grad_norm=...)``: same threshold, applied after the detectors,
  right before the optimizer step) and sets ``max_grad_norm = 0`` on its own copy of the
  arguments (the ``TrainingArguments`` you passed are left as they were). The Trainer then
  logs ``grad_norm`` itself (unclipped, its own extra reduction).
- **logging**: each training log gets :func:`~lbw_policy.integrations.optimizer.guard_metrics`
  (``lbw/<detector>.<signal>``, ``lbw/lr_scale``, ``lbw/decisions``, ...); ``learning_rate`` becomes the *effective* rate of the last step
  (after ``lr_scale`` / ``lr_cap``), the scheduler's rate is ``lbw/scheduled_lr``. Every
  reporting integration (TensorBoard, W&B, MLflow) receives them through ``Trainer.log``.
- **checkpoints**: ``on_save`` writes the guard's state to ``<checkpoint>/lbw_guard.pt``;
  ``train(resume_from_checkpoint=...)`` loads it back at ``on_train_begin`` (after the Trainer
  restored model, optimizer, scheduler and RNG), so the resumed run makes the same decisions;
  with a ``guard={...}`` dict the guard is built with ``resume=True`` then, so it continues the
  same ``log_dir`` (a ``GuardedOptimizer`` you pass yourself needs ``resume=True``).
- **end**: ``on_train_end`` closes the guard (``run_end`` record, ``summary.json``).
- **DeepSpeed**: refused with :class:`~lbw_policy.integrations.UnsupportedStack`.

Skipped steps: ``optimizer.step()`` is always called (the guard decides inside it), so
Accelerate reports ``optimizer_step_was_skipped = False`` and the scheduler advances on a
step the guard or the scaler skipped, as in a plain torch loop.
"""

from __future__ import annotations

import copy
import os
from typing import Any, Optional

import torch
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint

from lbw_policy.integrations import refuse_deepspeed
from lbw_policy.integrations.optimizer import GuardedOptimizer, guard_metrics

__all__ = ["GuardedTrainer", "GuardedTrainerMixin", "GuardTrainerCallback", "GUARD_STATE_FILE"]

#: the guard's state inside a Trainer checkpoint directory (``torch.save``)
GUARD_STATE_FILE = "lbw_guard.pt"


class GuardTrainerCallback(TrainerCallback):
    """Checkpoint, resume and close the trainer's guard (added by :class:`GuardedTrainerMixin`).

    :param trainer: the :class:`GuardedTrainerMixin` trainer.
    """

    def __init__(self, trainer: "GuardedTrainerMixin") -> None:
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        trainer = self.trainer
        refuse_deepspeed("transformers.GuardedTrainer", trainer.is_deepspeed_enabled)
        guarded = trainer.guarded_optimizer
        path = trainer._lbw_resume_from
        trainer._lbw_resume_from = None
        if path is not None:
            file = os.path.join(path, GUARD_STATE_FILE)
            if not os.path.exists(file):
                raise FileNotFoundError(
                    f"{file} is missing: the checkpoint {path} was not saved by a GuardedTrainer, "
                    f"so the guard cannot continue its decisions (start a new guard log instead)")
            guarded.load_guard_state_dict(torch.load(file, weights_only=False))

    def on_save(self, args, state, control, **kwargs):
        folder = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        if os.path.isdir(folder) and state.is_world_process_zero:
            torch.save(self.trainer.guarded_optimizer.guard_state_dict(),
                       os.path.join(folder, GUARD_STATE_FILE))

    def on_train_end(self, args, state, control, **kwargs):
        self.trainer.guarded_optimizer.close()


class GuardedTrainerMixin:
    """Mix into a ``transformers.Trainer`` (first in the bases) to govern its optimizer steps
    (module docstring).

    :param guard: :class:`~lbw_policy.adapters.guard.Guard` arguments (``policy``, ``log_dir``,
        ``resume``, ...) used to wrap the Trainer's own optimizer; leave it out when
        ``optimizers=(GuardedOptimizer(...), scheduler)`` is given.
    :raises TypeError: neither a ``guard`` nor a :class:`GuardedOptimizer` was given.
    :raises UnsupportedStack: DeepSpeed is enabled (checked here and again at train start).
    """

    def __init__(self, *args: Any, guard: Optional[dict] = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        refuse_deepspeed(f"transformers.{type(self).__name__}", self.is_deepspeed_enabled)
        given = self.optimizer
        if given is not None and not isinstance(given, GuardedOptimizer):
            raise TypeError(f"{type(self).__name__}: optimizers=(...) holds a "
                            f"{type(given).__name__}; wrap it: GuardedOptimizer(optimizer, policy, "
                            f"model=model, log_dir=...)")
        if given is None and guard is None:
            raise TypeError(f"{type(self).__name__} needs guard={{'policy': ..., 'log_dir': ...}} "
                            f"or optimizers=(GuardedOptimizer(...), scheduler)")
        if given is not None and guard is not None:
            raise TypeError(f"{type(self).__name__}: pass guard= or a GuardedOptimizer, not both")
        self._lbw_guard_kwargs = guard
        self._lbw_resume_from: Optional[str] = None
        # the clip moves into the guard: after the detectors, before the step
        self._lbw_clip = self.args.max_grad_norm if self.args.max_grad_norm else None
        self.args = copy.copy(self.args)  # the caller's TrainingArguments stay as given
        self.args.max_grad_norm = 0.0
        if given is not None:
            self._take_clip(given)
        self.add_callback(GuardTrainerCallback(self))

    def _take_clip(self, guarded: GuardedOptimizer) -> None:
        if self._lbw_clip and guarded.guard.clip_grad_norm is None:
            guarded.guard.clip_grad_norm = float(self._lbw_clip)

    @property
    def guarded_optimizer(self) -> GuardedOptimizer:
        """The :class:`GuardedOptimizer` this trainer steps.

        :raises RuntimeError: before ``train()`` created the optimizer."""
        opt = self.optimizer
        while opt is not None and not isinstance(opt, GuardedOptimizer):
            opt = getattr(opt, "optimizer", None)  # Accelerate's AcceleratedOptimizer
        if opt is None:
            raise RuntimeError("the optimizer is created by train(); no guard yet")
        return opt

    def create_optimizer(self, model=None):
        if self.optimizer is None:
            inner = super().create_optimizer(model)
            kwargs = dict(self._lbw_guard_kwargs)
            kwargs.setdefault("model", self.model)
            if self._lbw_resume_from is not None:  # train(resume_from_checkpoint=...): the
                kwargs.setdefault("resume", True)  # decision log goes on; state loads later
            self.optimizer = GuardedOptimizer(inner, **kwargs)
            self._take_clip(self.optimizer)
        return self.optimizer

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        # the Trainer returns each micro-batch's share of the step's mean loss: x count
        self.guarded_optimizer.observe_loss(loss * self.current_gradient_accumulation_steps)
        return loss

    def log(self, logs: dict, start_time: Optional[float] = None) -> None:
        if "loss" in logs and self.optimizer is not None:
            guarded = self.guarded_optimizer
            logs.update(guard_metrics(guarded))
            last = guarded.last_result
            if "learning_rate" in logs and last is not None and last.lr == last.lr:
                logs["lbw/scheduled_lr"] = logs["learning_rate"]
                logs["learning_rate"] = last.lr  # the effective rate of the last step
        super().log(logs, start_time)

    def train(self, resume_from_checkpoint: Any = None, *args: Any, **kwargs: Any):
        path = resume_from_checkpoint
        if path is True:
            path = get_last_checkpoint(self.args.output_dir)
        self._lbw_resume_from = path if isinstance(path, (str, os.PathLike)) else None
        return super().train(resume_from_checkpoint, *args, **kwargs)


class GuardedTrainer(GuardedTrainerMixin, Trainer):
    """``transformers.Trainer`` with a guard (see :class:`GuardedTrainerMixin`)."""
