"""Lightning integration (``pip install lbw-policy[lightning]``).

Return a :class:`~lbw_policy.integrations.optimizer.GuardedOptimizer` from
``configure_optimizers`` and add a :class:`GuardCallback` to the ``Trainer``::

    class Lit(L.LightningModule):
        def configure_optimizers(self):
            return GuardedOptimizer(torch.optim.AdamW(self.parameters(), lr=3e-4), "default",
                                    model=self, log_dir="runs/lit")

    trainer = L.Trainer(accumulate_grad_batches=4, callbacks=[GuardCallback()])

Lightning steps the optimizer as ``optimizer.step(closure)``; the closure runs
``training_step``, the backward, ``on_before_optimizer_step`` and Lightning's gradient clipping;
:meth:`GuardedOptimizer.step` runs it first, then the guard's step. With
``accumulate_grad_batches=N`` Lightning calls ``step`` once every ``N`` batches, so the guard
acts once per optimizer step, on the mean loss of the ``N`` micro-batches (recorded in
``on_before_backward``, where Lightning hands over each loss divided by ``N``).

- **clipping**: Lightning clips inside the closure, before the guard's detectors read the norm.
  With ``gradient_clip_val`` set (algorithm ``"norm"``) the callback moves the clip into the
  guard (``Guard(clip_grad_norm=...)``: after the detectors, before the step) and sets the
  Trainer's ``gradient_clip_val`` to ``None``; ``"value"`` clipping is refused.
- **mixed precision**: ``precision="bf16-mixed"`` needs nothing. With ``"16-mixed"`` Lightning
  calls ``scaler.step(guarded)``: an overflow is a ``scaler_skipped`` record (Lightning leaves
  the unscaling to optimizers with ``_step_supports_amp_scaling``; the guard does it). Lightning
  hands ``on_before_backward`` the scaled loss, so the callback divides it by
  ``scaler.get_scale()`` (on CUDA one host read per micro-batch).
- **logging**: after each optimizer step the callback logs
  :func:`~lbw_policy.integrations.optimizer.guard_metrics` with ``pl_module.log_dict``
  (``lbw/lr`` is the effective learning rate, ``lbw/lr_scale`` the scale, ...), so every
  Lightning logger (TensorBoard, W&B, MLflow, CSV) shows them.
- **checkpoints**: the callback's ``state_dict`` is the guard's state, so Lightning saves it in
  every checkpoint and ``fit(ckpt_path=...)`` restores it (applied at ``on_train_start``, after
  Lightning restored the optimizer). Build the guard with ``resume=True`` to continue the same
  ``log_dir``.
- **end**: ``on_train_end`` closes the guard (``run_end`` record, ``summary.json``).
- **DeepSpeed**: refused with :class:`~lbw_policy.integrations.UnsupportedStack`.
"""

from __future__ import annotations

from typing import Any, Optional

from lightning.pytorch import Callback

from lbw_policy.integrations import refuse_deepspeed
from lbw_policy.integrations.optimizer import GuardedOptimizer, guard_metrics

__all__ = ["GuardCallback"]


class GuardCallback(Callback):
    """Feed, log, checkpoint and close the :class:`GuardedOptimizer` that
    ``configure_optimizers`` returned (module docstring).

    :param log_metrics: log :func:`guard_metrics` after each optimizer step (default ``True``).
    :raises TypeError: (at fit start) no optimizer is a :class:`GuardedOptimizer`, or several are.
    :raises ValueError: (at fit start) ``gradient_clip_algorithm="value"``.
    :raises UnsupportedStack: (at fit start) the DeepSpeed strategy.
    """

    def __init__(self, log_metrics: bool = True) -> None:
        self.log_metrics = bool(log_metrics)
        self.guarded: Optional[GuardedOptimizer] = None
        self._pending: Optional[dict] = None
        self._logged_step = -1

    @property
    def state_key(self) -> str:
        return "lbw_policy.GuardCallback"

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        strategy = type(trainer.strategy).__name__
        refuse_deepspeed("lightning.GuardCallback", "DeepSpeed" in strategy)
        guarded = [o for o in trainer.optimizers if isinstance(o, GuardedOptimizer)]
        if len(guarded) != 1:
            raise TypeError(f"GuardCallback needs configure_optimizers to return one "
                            f"GuardedOptimizer, found {len(guarded)} among "
                            f"{[type(o).__name__ for o in trainer.optimizers]}")
        self.guarded = guarded[0]
        if trainer.gradient_clip_val:
            algorithm = getattr(trainer.gradient_clip_algorithm, "value",
                                trainer.gradient_clip_algorithm)
            if algorithm not in (None, "norm"):
                raise ValueError(f"GuardCallback: gradient_clip_algorithm={algorithm!r} clips "
                                 f"before the guard's detectors and cannot move into the guard; "
                                 f"use gradient_clip_algorithm='norm' (then the guard clips, "
                                 f"after its detectors) or no clipping")
            if self.guarded.guard.clip_grad_norm is None:
                self.guarded.guard.clip_grad_norm = float(trainer.gradient_clip_val)
            trainer.gradient_clip_val = None  # the guard clips, after its detectors

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        if self._pending is not None:  # restored by Lightning before the optimizer existed
            self.guarded.load_guard_state_dict(self._pending)
            self._pending = None

    def on_before_backward(self, trainer: Any, pl_module: Any, loss: Any) -> None:
        if self.guarded is None or not pl_module.training:
            return
        # Lightning divides each micro-batch loss by accumulate_grad_batches and, with
        # "16-mixed", hands over the loss already multiplied by the GradScaler's scale
        loss = loss.detach() * trainer.accumulate_grad_batches
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        if scaler is not None and scaler.is_enabled():
            # get_scale() reads the scale on the host (on CUDA a sync per micro-batch)
            loss = loss / scaler.get_scale()
        self.guarded.observe_loss(loss)

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        guarded = self.guarded
        if not self.log_metrics or guarded is None or guarded.last_result is None:
            return
        if guarded.guard.step_count - 1 != self._logged_step:  # an optimizer step just ran
            self._logged_step = guarded.guard.step_count - 1
            pl_module.log_dict(guard_metrics(guarded), on_step=True, on_epoch=False)

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        if self.guarded is not None:
            self.guarded.close()

    def state_dict(self) -> dict:
        return {} if self.guarded is None else self.guarded.guard_state_dict()

    def load_state_dict(self, state_dict: dict) -> None:
        self._pending = dict(state_dict) if state_dict else None
