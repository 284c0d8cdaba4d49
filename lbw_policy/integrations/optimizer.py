"""A :class:`GuardedOptimizer`: a :class:`Guard` that *is* a ``torch.optim.Optimizer``.

Frameworks only step real optimizers: Hugging Face ``Trainer`` takes ``optimizers=(opt, sched)``,
Accelerate's ``prepare`` wraps ``Optimizer`` instances, Lightning steps what
``configure_optimizers`` returns, and ``GradScaler.step`` calls ``optimizer.step()``. A
``GuardedOptimizer`` wraps the optimizer you built (AdamW, ...) and a :class:`Guard` over it:

- its ``param_groups``, ``state`` and ``defaults`` are the inner optimizer's own objects, so a
  scheduler built on either acts on the same dicts the ``lr_scale`` actuator scales;
- ``state_dict()`` / ``load_state_dict()`` / ``zero_grad()`` are the inner optimizer's (a
  torch-shaped ``state_dict``: a checkpoint loads into a bare AdamW); the guard's own state is
  :meth:`guard_state_dict` / :meth:`load_guard_state_dict`, which the integrations save in the
  framework's checkpoint;
- ``step()`` runs one :meth:`Guard.step` (sense, govern, then the inner ``step()`` or the skip).

The step's loss (the guard's loss detectors need it) comes, in this order, from ``step(loss=)``,
from the losses recorded with :meth:`observe_loss` since the last step (their mean: gradient
accumulation calls it once per micro-batch), or from the value ``closure()`` returns (Lightning).

Mixed precision: the class sets ``_step_supports_amp_scaling``, torch's seam for optimizers that
handle loss scaling, so ``GradScaler.step(guarded)`` always calls :meth:`step` and hands over
``grad_scale`` (the scale still in the gradients, or ``None`` once ``scaler.unscale_`` ran) and
``found_inf`` as attributes. :meth:`step` unscales the gradients in place (so detectors and the
inner optimizer see true gradients) and passes ``found_inf`` to :meth:`Guard.step`: an overflow is
recorded as ``scaler_skipped`` and touches nothing else; a non-finite loss is governed as a real
fault. ``GradScaler.update()`` then lowers the scale as usual. bf16 autocast needs nothing.

Schedulers: a step the guard or the scaler skips is still a step of the schedule whenever the
framework calls ``step()``: the scheduler advances (Accelerate's ``optimizer_step_was_skipped``
is ``False``, since ``step()`` was called). That is torch's own plain-loop behaviour.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Optional, Union

import torch

from lbw_policy.adapters.guard import Guard, StepResult

__all__ = ["GuardedOptimizer", "guard_metrics"]


class GuardedOptimizer(torch.optim.Optimizer):
    """A ``torch.optim.Optimizer`` whose ``step()`` is a guarded step (module docstring).

    :param optimizer: the inner ``torch.optim.Optimizer`` (AdamW, Adam, SGD, ...).
    :param policy: as :class:`Guard` (a Policy, a YAML path or a built-in name; default
        ``"default"``).
    :param guard: an already built :class:`Guard` over ``optimizer`` (then ``policy`` and
        ``guard_kwargs`` must be left out).
    :param guard_kwargs: the other :class:`Guard` arguments (``model``, ``log_dir``,
        ``clip_grad_norm``, ``resume``, ...).
    :raises TypeError: ``optimizer`` is not a ``torch.optim.Optimizer`` (or is already guarded).
    :raises ValueError: ``guard`` governs another optimizer, or comes with ``guard_kwargs``.
    :raises PolicyError, ActuatorError, FileExistsError: as :class:`Guard`.
    """

    # torch.amp.GradScaler: call step() even on an overflow, with grad_scale / found_inf set
    _step_supports_amp_scaling = True

    def __init__(self, optimizer: torch.optim.Optimizer,
                 policy: Union[str, os.PathLike, Any] = "default", *,
                 guard: Optional[Guard] = None, **guard_kwargs: Any) -> None:
        if not isinstance(optimizer, torch.optim.Optimizer) or isinstance(optimizer, GuardedOptimizer):
            raise TypeError(f"GuardedOptimizer wraps a torch.optim.Optimizer that is not guarded "
                            f"yet, got {type(optimizer).__name__}")
        if guard is not None:
            if guard.optimizer is not optimizer:
                raise ValueError("guard governs another optimizer than the one given")
            if guard_kwargs:
                raise ValueError(f"pass either guard= or the Guard arguments, not both "
                                 f"(got {sorted(guard_kwargs)})")
        # torch.optim.Optimizer.__init__ sets up the step hooks; its param groups go to a
        # scratch list here, then param_groups / state become the inner optimizer's own.
        self._inner = optimizer
        self._scratch: Optional[dict] = {"param_groups": [], "state": {}}
        super().__init__([{"params": list(g["params"])} for g in optimizer.param_groups],
                         optimizer.defaults)
        self._scratch = None
        self.defaults = optimizer.defaults
        self.guard = guard if guard is not None else Guard(optimizer, policy, **guard_kwargs)
        self._losses: list = []
        #: what the last :meth:`step` did (``None`` before the first)
        self.last_result: Optional[StepResult] = None

    # the inner optimizer's own objects (a scheduler on either acts on the same dicts)
    @property
    def param_groups(self) -> list:  # type: ignore[override]
        return self._scratch["param_groups"] if self._scratch is not None else self._inner.param_groups

    @param_groups.setter
    def param_groups(self, value: list) -> None:
        if self._scratch is not None:
            self._scratch["param_groups"] = value
        else:
            self._inner.param_groups = value

    @property
    def state(self) -> Any:  # type: ignore[override]
        return self._scratch["state"] if self._scratch is not None else self._inner.state

    @state.setter
    def state(self, value: Any) -> None:
        if self._scratch is not None:
            self._scratch["state"] = value
        else:
            self._inner.state = value

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        """The inner optimizer."""
        return self._inner

    def __repr__(self) -> str:
        return f"GuardedOptimizer({self._inner!r}, policy={self.guard.policy.name!r})"

    # ------------------------------------------------------------------ torch.optim interface
    def state_dict(self) -> dict:  # type: ignore[override]
        """The inner optimizer's ``state_dict()`` (torch-shaped)."""
        return self._inner.state_dict()

    def load_state_dict(self, state_dict: dict) -> None:  # type: ignore[override]
        """Load into the inner optimizer (torch-shaped, e.g. saved from a bare AdamW)."""
        self._inner.load_state_dict(state_dict)

    def zero_grad(self, set_to_none: bool = True) -> None:  # type: ignore[override]
        self._inner.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group: dict) -> None:  # type: ignore[override]
        if self._scratch is not None:  # torch.optim.Optimizer.__init__
            super().add_param_group(param_group)
        else:
            self._inner.add_param_group(param_group)

    # ------------------------------------------------------------------ the step
    def observe_loss(self, loss: Union[torch.Tensor, float]) -> None:
        """Record one micro-batch's loss (a per-micro-batch mean; detached here, no sync). The
        next :meth:`step` governs on the mean of the losses recorded since the last one."""
        self._losses.append(loss.detach() if isinstance(loss, torch.Tensor) else float(loss))

    def _step_loss(self, loss: Any, closure_loss: Any) -> Any:
        if loss is not None:
            return loss
        if self._losses:
            losses = self._losses
            if all(isinstance(x, torch.Tensor) for x in losses):
                return torch.stack([x.reshape(()).float() for x in losses]).mean()
            return sum(float(x) for x in losses) / len(losses)
        if closure_loss is not None:
            return closure_loss
        raise ValueError("GuardedOptimizer.step() has no loss for the guard: pass step(loss=...), "
                         "call observe_loss(loss) after each backward, or step(closure) with a "
                         "closure that returns the loss")

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Any]] = None, *,  # type: ignore[override]
             loss: Any = None) -> Any:
        """One guarded step: ``closure()`` first when given (it runs the backward), then
        :meth:`Guard.step` on the step's loss (module docstring).

        :param closure: as ``torch.optim.Optimizer.step``: re-evaluates the model and returns
            the loss.
        :param loss: the step's loss (overrides the observed losses and the closure's).
        :return: what ``closure()`` returned, or ``None``.
        :raises ValueError: no loss at all.
        :raises TrainingHalted: the policy halted training (see :meth:`Guard.step`).
        """
        closure_loss = None
        if closure is not None:
            with torch.enable_grad():
                closure_loss = closure()
        step_loss = self._step_loss(loss, closure_loss)
        self._losses = []
        # GradScaler's seam (_step_supports_amp_scaling): attributes set around this call
        grad_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)
        if grad_scale is not None:  # still scaled: unscale in place (device ops, no sync)
            inv = grad_scale.double().reciprocal().float()
            for group in self.param_groups:
                for p in group["params"]:
                    if p.grad is not None:
                        p.grad.mul_(inv.to(device=p.grad.device, dtype=p.grad.dtype))
        self.last_result = self.guard.step(step_loss, found_inf=found_inf)
        return closure_loss

    # ------------------------------------------------------------------ the guard's state
    def guard_state_dict(self) -> dict:
        """:meth:`Guard.state_dict` plus the losses observed for the coming step."""
        return {"guard": self.guard.state_dict(),
                "observed_losses": [float(x) for x in self._losses]}

    def load_guard_state_dict(self, state: dict) -> None:
        """Restore :meth:`guard_state_dict` (see :meth:`Guard.load_state_dict`; the guard must
        have been built with ``resume=True`` when it continues the same log directory)."""
        self.guard.load_state_dict(state["guard"])
        self._losses = [float(x) for x in state.get("observed_losses", [])]

    def close(self) -> dict:
        """:meth:`Guard.close`."""
        return self.guard.close()


def guard_metrics(guarded: GuardedOptimizer) -> dict:
    """The guard's state as flat ``lbw/...`` metrics (floats) for a framework's logger: the
    latest signals ``lbw/<detector>.<signal>``, ``lbw/lr_scale``, ``lbw/lr`` (the effective
    learning rate of the last step), ``lbw/decisions`` (decision records so far: fired, action,
    resolved, recover, error, halt), ``lbw/skipped_steps`` and ``lbw/scaler_skipped``."""
    guard = guarded.guard
    out = {f"lbw/{k}": float(v) for k, v in guard.governor.latest.items()
           if isinstance(v, (int, float)) and not isinstance(v, bool)}
    summary = guard.summary()
    events = summary["decisions_by_event"]
    out["lbw/decisions"] = float(sum(n for e, n in events.items() if e != "scaler_skipped"))
    out["lbw/skipped_steps"] = float(summary["skipped_steps"])
    out["lbw/scaler_skipped"] = float(events.get("scaler_skipped", 0))
    if "lr_scale" in guard.actuators:
        out["lbw/lr_scale"] = float(guard.actuators["lr_scale"].state_dict().get("scale", 1.0))
    last = guarded.last_result
    if last is not None and last.lr == last.lr:
        out["lbw/lr"] = float(last.lr)
    return out
