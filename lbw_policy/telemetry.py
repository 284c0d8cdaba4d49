"""What one training step exposes to detectors.

A :class:`Telemetry` is built by the guard once per step and shared by every detector, so
expensive quantities are computed once: the global gradient norm is one reduction per step,
however many detectors read it (DESIGN.md, performance contract).
"""

from __future__ import annotations

from typing import Any, Iterator, Optional

import torch

__all__ = ["Telemetry"]


class Telemetry:
    """Per-step view of the loss, optimizer and model.

    :param step: 0-based count of ``Guard.step`` calls.
    :param loss: the step's loss, a 0-dim tensor (detached here; no host sync).
    :param optimizer: the governed ``torch.optim.Optimizer``.
    :param model: the model, or ``None`` when the guard was built without one.
    """

    def __init__(self, step: int, loss: torch.Tensor, optimizer: torch.optim.Optimizer,
                 model: Optional[torch.nn.Module] = None) -> None:
        if not isinstance(loss, torch.Tensor):
            loss = torch.as_tensor(float(loss))
        if loss.numel() != 1:
            raise ValueError(f"loss must be a scalar tensor, got shape {tuple(loss.shape)}")
        self.step = step
        self.loss = loss.detach().reshape(())
        self.optimizer = optimizer
        self.model = model
        self._grad_norm: Optional[torch.Tensor] = None
        self._grads: Optional[list] = None
        self.cache: dict[str, Any] = {}  # detectors may share other per-step results here

    @property
    def device(self) -> torch.device:
        """The loss's device."""
        return self.loss.device

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
    def grad_norm(self) -> torch.Tensor:
        """Global L2 norm of all gradients, a 0-dim float32 tensor on the gradients' device.

        Computed on first access and cached for the step (one reduction, shared). Non-finite
        gradients give a non-finite norm. ``0.0`` when no parameter has a gradient.
        """
        if self._grad_norm is None:
            grads = self.grads()
            if not grads:
                self._grad_norm = torch.zeros((), device=self.device)
            else:
                self._grad_norm = torch.nn.utils.get_total_norm(
                    grads, norm_type=2.0, error_if_nonfinite=False).float()
        return self._grad_norm
