"""What one training step exposes to detectors.

A :class:`Telemetry` is built by the guard once per step and shared by every detector, so
expensive quantities are computed once: the global gradient norm is one reduction per step,
however many detectors read it (DESIGN.md, performance contract).
"""

from __future__ import annotations

from typing import Any, Iterator, Optional

import torch

__all__ = ["Telemetry", "host"]


def host(x: Any, enabled: bool = True) -> Any:
    """``x`` as a Python float when it is a CPU tensor (its value is in host memory already:
    reading it waits for no device) and ``enabled``, else ``x`` unchanged. For 0-dim or
    one-element tensors."""
    if enabled and isinstance(x, torch.Tensor) and x.device.type == "cpu":
        return float(x)
    return x


_INTS = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)


class Telemetry:
    """Per-step view of the loss, optimizer and model.

    :param step: 0-based count of ``Guard.step`` calls.
    :param loss: the step's loss, a 0-dim real tensor (detached here; no host sync) or a Python
        number.
    :raises TypeError: the loss is not a real number (a string, a bool, a complex tensor).
    :raises ValueError: the loss has more than one element, or lives on the meta device.
    :param optimizer: the governed ``torch.optim.Optimizer``.
    :param model: the model, or ``None`` when the guard was built without one.
    :param host_scalars: ``True`` (default): :attr:`loss_scalar` and :attr:`grad_norm_scalar`
        read CPU tensors as Python floats, so the per-step scalar statistics
        (``detectors/_ema.py``) run on floats on the CPU. ``False`` keeps them as tensors on the
        CPU too, the way they run on an accelerator (tests check that path on a CPU).
    """

    def __init__(self, step: int, loss: torch.Tensor, optimizer: torch.optim.Optimizer,
                 model: Optional[torch.nn.Module] = None, host_scalars: bool = True) -> None:
        if not isinstance(loss, torch.Tensor):
            if isinstance(loss, bool) or not isinstance(loss, (int, float)):
                raise TypeError(f"loss must be a 0-dim tensor or a real number, found "
                                f"{type(loss).__name__} {loss!r:.60}")
            loss = torch.tensor(float(loss), dtype=torch.float64)
        if loss.numel() != 1:
            raise ValueError(f"loss must be a scalar tensor, got shape {tuple(loss.shape)}")
        if loss.is_complex() or not (loss.is_floating_point() or loss.dtype in _INTS):
            raise TypeError(f"loss must be a real-valued tensor, found dtype {loss.dtype}")
        if loss.device.type == "meta":
            raise ValueError("loss is on the meta device (it has no value); compute it on the "
                             "device that holds the model")
        self.step = step
        self.loss = loss.detach().reshape(())
        self.optimizer = optimizer
        self.model = model
        self.host_scalars = bool(host_scalars)
        self._grad_norm: Optional[torch.Tensor] = None
        #: the global L2 gradient norm after the actuators that rescaled the gradients this step
        #: (``grad_clip``, ``grad_normalize``) set it, a 0-dim float32 tensor on the device;
        #: ``None`` while the gradients are as the detectors saw them. See :attr:`current_grad_norm`.
        self.grad_norm_after: Optional[torch.Tensor] = None
        #: each parameter group's ``lr`` as the optimizer step used it (after ``lr_scale`` /
        #: ``lr_cap`` changed it for the step, before they put it back), set by the Guard just
        #: before ``optimizer.step()``; ``None`` before that, or outside a Guard. The values
        #: are the groups' own objects (floats, or tensors by reference), read by detectors'
        #: ``after_step`` (``update_ratio``'s ``rms_per_lr``).
        self.step_lrs: Optional[list] = None
        self._grads: Optional[list] = None
        self._host: dict[str, Any] = {}  # loss_scalar / grad_norm_scalar, read once per step
        self.cache: dict[str, Any] = {}  # detectors may share other per-step results here

    @property
    def device(self) -> torch.device:
        """The loss's device."""
        return self.loss.device

    @property
    def loss_scalar(self) -> Any:
        """The loss through :func:`host`: a Python float on the CPU, the 0-dim tensor on an
        accelerator. Read once per step, shared by the detectors."""
        if "loss" not in self._host:
            self._host["loss"] = host(self.loss, self.host_scalars)
        return self._host["loss"]

    @property
    def grad_norm_scalar(self) -> Any:
        """:attr:`grad_norm` through :func:`host` (a float on the CPU), read once per step."""
        if "grad_norm" not in self._host:
            self._host["grad_norm"] = host(self.grad_norm, self.host_scalars)
        return self._host["grad_norm"]

    def parameters(self) -> Iterator[torch.Tensor]:
        """Every parameter the optimizer updates, in param-group order."""
        for group in self.optimizer.param_groups:
            yield from group["params"]

    def grads(self) -> list:
        """The gradients of the optimizer's parameters (those that have one)."""
        if self._grads is None:
            self._grads = [p.grad for p in self.parameters() if p.grad is not None]
        return self._grads

    @property
    def current_grad_norm(self) -> torch.Tensor:
        """The gradients' global L2 norm as they are now: :attr:`grad_norm_after` when an
        actuator rescaled them this step, else :attr:`grad_norm` (0-dim float32, on the device;
        no reduction when an actuator kept the norm it left)."""
        return self.grad_norm if self.grad_norm_after is None else self.grad_norm_after

    @property
    def grad_norm(self) -> torch.Tensor:
        """Global L2 norm of all gradients, a 0-dim float32 tensor on the gradients' device.

        Computed on first access and cached for the step (one reduction, shared). With sharded
        (DTensor) gradients it is the norm of the whole model, not of this rank's shard (torch's
        DTensor reduces the partial norms: one scalar all-reduce). Non-finite
        gradients give a non-finite norm. ``0.0`` when no parameter has a gradient.
        """
        if self._grad_norm is None:
            grads = self.grads()
            if not grads:
                self._grad_norm = torch.zeros((), device=self.device)
            else:
                norm = torch.nn.utils.get_total_norm(grads, norm_type=2.0,
                                                     error_if_nonfinite=False)
                if hasattr(norm, "full_tensor"):  # sharded (DTensor) gradients, e.g. FSDP2:
                    norm = norm.full_tensor()     # the whole model's norm, on every rank
                self._grad_norm = norm.float()
        return self._grad_norm
