"""Exponentially weighted mean and variance kept as device tensors (shared by detectors).

Update (Finch 2009, "Incremental calculation of weighted mean and variance", eqs. 140-143),
for decay ``alpha`` in (0, 1) and a finite observation ``x``::

    delta = x - mean
    mean  = mean + (1 - alpha) * delta
    var   = alpha * (var + (1 - alpha) * delta**2)

The first finite observation sets ``mean = x, var = 0``. Non-finite observations leave the
statistics untouched (they never poison them). Everything stays on the device: no host sync.
"""

from __future__ import annotations

import torch


class EMAStat:
    def __init__(self, alpha: float) -> None:
        self.alpha = float(alpha)
        self.mean: torch.Tensor | None = None
        self.var: torch.Tensor | None = None
        self.count: torch.Tensor | None = None  # finite observations seen

    def _init(self, x: torch.Tensor) -> None:
        dtype = torch.float64 if x.device.type in ("cpu", "cuda") else torch.float32
        self.mean = torch.zeros((), dtype=dtype, device=x.device)
        self.var = torch.zeros((), dtype=dtype, device=x.device)
        self.count = torch.zeros((), dtype=dtype, device=x.device)

    def update(self, x: torch.Tensor, finite: torch.Tensor | None = None) -> None:
        """Fold ``x`` (0-dim tensor) into the statistics if it is finite.

        :param finite: ``torch.isfinite(x)`` when the caller has it already (saves the ops).
        """
        if self.mean is None:
            self._init(x)
        x = x.to(self.mean.dtype)
        if finite is None:
            finite = torch.isfinite(x)
        xs = torch.where(finite, x, self.mean)
        first = self.count == 0
        delta = xs - self.mean               # 0 for a non-finite x: the mean stays as it is
        self.mean = torch.where(first, xs, self.mean + (1.0 - self.alpha) * delta)
        new_var = torch.where(first, 0.0, self.alpha * (self.var + (1.0 - self.alpha) * delta * delta))
        self.var = torch.where(finite, new_var, self.var)
        self.count = self.count + finite     # bool promotes to the count's dtype

    def state_dict(self) -> dict:
        if self.mean is None:
            return {}
        return {"mean": float(self.mean), "var": float(self.var), "count": float(self.count)}

    def load_state_dict(self, state: dict, device: torch.device | str = "cpu") -> None:
        if not state:
            self.mean = self.var = self.count = None
            return
        self._init(torch.zeros((), device=device))
        self.mean.fill_(state["mean"])
        self.var.fill_(state["var"])
        self.count.fill_(state["count"])
