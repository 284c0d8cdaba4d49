"""Exponentially weighted mean and variance, and the scalar helpers the per-step statistics
share (used by ``loss_spike`` and ``grad_norm``).

Update (Finch 2009, "Incremental calculation of weighted mean and variance", eqs. 140-143),
for decay ``alpha`` in (0, 1) and a finite observation ``x``::

    delta = x - mean
    mean  = mean + (1 - alpha) * delta
    var   = alpha * (var + (1 - alpha) * delta**2)

The first finite observation sets ``mean = x, var = 0``. Non-finite observations leave the
statistics untouched (they never poison them).

Representation: the statistics follow their input. A 0-dim tensor on an accelerator keeps
everything there as float64 (float32 on MPS) tensors: no host sync. On the CPU, where the value
already sits in host memory, the detectors read it as a Python float first
(``Telemetry.loss_scalar`` / ``grad_norm_scalar``, :func:`lbw_policy.telemetry.host`; switch:
``Telemetry(host_scalars=...)``) and the same formulas run on floats: IEEE double arithmetic, bit for bit what float64 tensors give
(except ``sqrt``: ``math.sqrt`` is correctly rounded, torch's CPU float64 ``sqrt`` is off by
one ulp for about 1 % of inputs), without the per-op dispatch cost of 0-dim tensors (about
10 us each; a z-score and its EMA update are some 30 of them).
"""

from __future__ import annotations

import math
from typing import Union

import torch

from ._ring import to_device

Scalar = Union[float, torch.Tensor]


def where(cond, a, b):
    """``torch.where`` for a tensor condition, ``a if cond else b`` for a Python bool."""
    if isinstance(cond, torch.Tensor):
        return torch.where(cond, a, b)
    return a if cond else b


def isfinite(x: Scalar):
    """``torch.isfinite`` for a tensor, ``math.isfinite`` for a float."""
    return torch.isfinite(x) if isinstance(x, torch.Tensor) else math.isfinite(x)


def sqrt(x: Scalar) -> Scalar:
    """``torch.sqrt`` for a tensor; for a float the same IEEE result (NaN below 0, where
    ``math.sqrt`` would raise)."""
    if isinstance(x, torch.Tensor):
        return torch.sqrt(x)
    return math.sqrt(x) if x >= 0 else math.nan


def clamp_min(x: Scalar, low: float) -> Scalar:
    """``torch.clamp(x, min=low)``; for a float ``max(x, low)``, NaN staying NaN as in torch."""
    if isinstance(x, torch.Tensor):
        return torch.clamp(x, min=low)
    return x if (x >= low or x != x) else low


class EMAStat:
    def __init__(self, alpha: float) -> None:
        self.alpha = float(alpha)
        self.mean: Scalar | None = None
        self.var: Scalar | None = None
        self.count: Scalar | None = None  # finite observations seen

    def _init(self, x: Scalar) -> None:
        if not isinstance(x, torch.Tensor):
            self.mean = self.var = self.count = 0.0
            return
        dtype = torch.float64 if x.device.type in ("cpu", "cuda") else torch.float32
        self.mean = torch.zeros((), dtype=dtype, device=x.device)
        self.var = torch.zeros((), dtype=dtype, device=x.device)
        self.count = torch.zeros((), dtype=dtype, device=x.device)

    def adopt(self, x: Scalar) -> Scalar:
        """Hold the statistics in ``x``'s representation (floats for a float, tensors on ``x``'s
        device) and return ``x`` in the statistics' dtype. A change of representation (a resumed
        state, restored as floats, meeting a device tensor) converts once, without a host-device
        sync: floats are written on the device by a fill (``torch.full``), tensors on another
        device are copied device to device (never read back with ``float()``)."""
        if self.mean is None:
            self._init(x)
        elif isinstance(x, torch.Tensor):
            if not isinstance(self.mean, torch.Tensor):
                state = (self.mean, self.var, self.count)
                self._init(x)
                self.mean, self.var, self.count = (torch.full((), float(v), dtype=self.mean.dtype, device=x.device)
                                                   for v in state)
            elif self.mean.device != x.device:
                dtype = torch.float64 if x.device.type in ("cpu", "cuda") else torch.float32
                self.mean, self.var, self.count = (to_device(t, x.device, dtype)
                                                   for t in (self.mean, self.var, self.count))
        elif isinstance(self.mean, torch.Tensor):
            self.mean, self.var, self.count = float(self.mean), float(self.var), float(self.count)
        return x.to(self.mean.dtype) if isinstance(x, torch.Tensor) else float(x)

    def update(self, x: Scalar, finite=None) -> None:
        """Fold ``x`` (a 0-dim tensor or a float) into the statistics if it is finite.

        :param finite: ``isfinite(x)`` when the caller has it already (saves the ops).
        """
        x = self.adopt(x)
        if finite is None:
            finite = isfinite(x)
        xs = where(finite, x, self.mean)
        first = self.count == 0
        delta = xs - self.mean               # 0 for a non-finite x: the mean stays as it is
        self.mean = where(first, xs, self.mean + (1.0 - self.alpha) * delta)
        new_var = where(first, 0.0, self.alpha * (self.var + (1.0 - self.alpha) * delta * delta))
        self.var = where(finite, new_var, self.var)
        self.count = self.count + finite     # bool promotes to the count's dtype

    def state_dict(self) -> dict:
        if self.mean is None:
            return {}
        return {"mean": float(self.mean), "var": float(self.var), "count": float(self.count)}

    def load_state_dict(self, state: dict) -> None:
        """Restore as floats; the first :meth:`update` or :meth:`adopt` moves them to its
        input's representation."""
        if not state:
            self.mean = self.var = self.count = None
            return
        self.mean, self.var, self.count = float(state["mean"]), float(state["var"]), float(state["count"])
