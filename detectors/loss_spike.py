"""``loss_spike``: the training loss against its own recent history: EMA z-score, robust
median/MAD z-score, or one-sided CUSUM (``method``).

``method: ema`` (default). With ``mean_{t-1}`` and ``var_{t-1}`` the exponentially weighted
mean and variance of the finite losses *before* step t (Finch 2009 update, see
``detectors/_ema.py``)::

    zscore_t = (loss_t - mean_{t-1}) / sqrt(var_{t-1} + eps)
    delta_t  = loss_t - mean_{t-1}                     # nats

``method: mad``. With ``med_{t-1}`` and ``MAD_{t-1}`` the median and the median absolute
deviation of the last ``window`` finite losses before step t (1.4826 makes MAD a consistent
estimate of the standard deviation for normal noise; Hampel 1974, Rousseeuw & Croux 1993)::

    zscore_t = (loss_t - med_{t-1}) / sqrt((1.4826 MAD_{t-1})^2 + eps)
    delta_t  = loss_t - med_{t-1}                      # nats

A single spike moves neither the median nor the MAD much, so the next spike is still seen.

``method: cusum``. One-sided (upper) CUSUM of the EMA z-scores (Page 1954), slack ``k``::

    cusum_t = max(0, cusum_{t-1} + zscore_t - k)       # in standard deviations

It accumulates a sustained small rise that no single z-score shows; a policy compares it with
a decision interval ``h`` (4 to 5 is usual for k = 0.5). It is not reset by the detector.

Signals (0-dim tensors on an accelerator, Python floats on the CPU: see ``detectors/_ema.py``),
by method:

- ``ema``: ``zscore``, ``ema`` (``mean_t`` after this step, nats), ``delta``.
- ``mad``: ``zscore``, ``median`` (``med_{t-1}``, nats), ``delta``.
- ``cusum``: ``cusum``, ``zscore``, ``ema``, ``delta``.

``zscore`` (and ``cusum``, which then stays 0) is ``0.0`` during warm-up, the first ``warmup``
finite losses, so a warm-up never fires; ``zscore`` and ``delta`` are ``NaN`` when the loss is
non-finite (the engine treats NaN as false; use ``nonfinite`` for NaN/Inf), and a non-finite loss
never enters the statistics or the CUSUM. ``delta`` is emitted from the second finite loss on.

Params: ``method`` (``ema`` | ``mad`` | ``cusum``, default ``ema``); ``alpha`` (EMA decay in
(0, 1), default 0.97, an effective window of about 1/(1-alpha) = 33 steps; ema, cusum);
``window`` (losses kept, default 64; mad); ``k`` (CUSUM slack in standard deviations, default
0.5; cusum); ``warmup`` (finite losses before z-scores are emitted, default 25, minimum 2;
at most ``window`` for mad); ``eps`` (variance floor, default 1e-8 nats^2).

Source: the EMA z-score spike test of LBW-Guard (arXiv 2605.19008) and OLMo-core's loss-spike
monitor; MAD z-score: Iglewicz & Hoaglin 1993; CUSUM: Page 1954, Montgomery "Introduction to
Statistical Quality Control" ch. 9.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import torch

from lbw_policy.base import Detector

from ._ema import EMAStat, clamp_min, isfinite, sqrt, where
from ._ring import Ring, masked_median

__all__ = ["LossSpike"]

_SIGNALS = {"ema": ("zscore", "ema", "delta"), "mad": ("zscore", "median", "delta"),
            "cusum": ("cusum", "zscore", "ema", "delta")}
_ONLY = {"alpha": ("ema", "cusum"), "window": ("mad",), "k": ("cusum",)}
MAD_SCALE = 1.4826  # 1 / Phi^-1(3/4): MAD -> standard deviation for normal data


class LossSpike(Detector):
    name = "loss_spike"
    signals = _SIGNALS["ema"]
    reductions = {"zscore": "max", "delta": "max"}  # the most alarming rank; ema: mean
    params_schema = {
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "method": {"enum": ["ema", "mad", "cusum"], "description": "statistic; default ema"},
            "alpha": {"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 1,
                      "description": "EMA decay in (0, 1); default 0.97 (ema, cusum)"},
            "window": {"type": "integer", "minimum": 3, "maximum": 4096,
                       "description": "losses kept for median/MAD; default 64 (mad)"},
            "k": {"type": "number", "minimum": 0,
                  "description": "CUSUM slack in standard deviations; default 0.5 (cusum)"},
            "warmup": {"type": "integer", "minimum": 2,
                       "description": "finite losses before z-scores are emitted; default 25"},
            "eps": {"type": "number", "exclusiveMinimum": 0,
                    "description": "variance floor in nats^2; default 1e-8"},
        },
    }

    @classmethod
    def signals_for(cls, params: Mapping[str, Any]) -> tuple[str, ...]:
        return _SIGNALS[params.get("method", "ema")]

    @classmethod
    def validate_params(cls, params: Mapping[str, Any]) -> None:
        method = params.get("method", "ema")
        for key, methods in _ONLY.items():
            if key in params and method not in methods:
                raise ValueError(f"{key} applies to method {' or '.join(methods)} only, "
                                 f"not method {method!r}; remove it")
        if method == "mad" and params.get("warmup", 25) > params.get("window", 64):
            raise ValueError(f"warmup ({params.get('warmup', 25)}) must be <= window "
                             f"({params.get('window', 64)}) for method 'mad'")

    def __init__(self, method: str = "ema", alpha: float = 0.97, warmup: int = 25, eps: float = 1e-8,
                 window: int = 64, k: float = 0.5) -> None:
        if method not in _SIGNALS:
            raise ValueError(f"method must be one of {sorted(_SIGNALS)}, got {method!r}")
        params = {"method": method, "warmup": warmup, "eps": eps}
        if method == "mad":
            params["window"] = window
        else:
            params["alpha"] = alpha
        if method == "cusum":
            params["k"] = k
        self.validate_params(params)
        super().__init__(**params)
        self.method = method
        self.warmup = int(warmup)
        self.eps = float(eps)
        self.k = float(k)
        self.stat = EMAStat(alpha)
        self.ring = Ring(window) if method == "mad" else None
        self.cusum = None

    @torch.no_grad()
    def compute(self, telemetry):
        if self.method == "mad":
            return self._mad(telemetry.loss)
        stat = self.stat
        x = stat.adopt(telemetry.loss_scalar)  # a float on the CPU, a float64 tensor on a device
        finite = isfinite(x)
        warm = stat.count >= self.warmup
        delta = x - stat.mean
        z = delta / sqrt(stat.var + self.eps)
        zscore = where(finite, where(warm, z, 0.0), math.nan)
        delta_out = where(finite, where(stat.count >= 1, delta, 0.0), math.nan)
        stat.update(x, finite)
        out = {"zscore": zscore, "ema": stat.mean, "delta": delta_out}
        if self.method == "cusum":
            prev = 0.0 if self.cusum is None else self.cusum   # a float after load_state_dict
            if not isinstance(z, torch.Tensor):
                prev = float(prev)
            elif isinstance(prev, torch.Tensor):
                prev = prev.to(z.device)
            else:
                prev = torch.full((), prev, dtype=z.dtype, device=z.device)
            step = clamp_min(prev + z - self.k, 0.0)
            self.cusum = where(finite & warm, step, prev)
            out = {"cusum": self.cusum, **out}
        return out

    def _mad(self, loss: torch.Tensor) -> dict:
        ring = self.ring
        ring.ensure(loss.device)
        x = loss.to(ring.values.dtype)
        finite = torch.isfinite(x)
        count = ring.valid.sum(dim=-1, keepdim=True)                  # (1,)
        n = count.squeeze(-1)
        med = masked_median(ring.values, ring.valid, count)
        mad = masked_median((ring.values - med).abs(), ring.valid, count)
        delta = x - med
        z = delta / torch.sqrt((MAD_SCALE * mad) ** 2 + self.eps)
        out = {"zscore": torch.where(finite, torch.where(n >= self.warmup, z, 0.0), math.nan),
               "median": torch.where(n >= 1, med, math.nan),
               "delta": torch.where(finite, torch.where(n >= 1, delta, 0.0), math.nan)}
        ring.push(x, 0)
        return out

    def state_dict(self) -> dict:
        if self.method == "mad":
            return {"ring": self.ring.state_dict()}
        state = {"ema": self.stat.state_dict()}
        if self.method == "cusum":
            state["cusum"] = None if self.cusum is None else float(self.cusum)
        return state

    def load_state_dict(self, state) -> None:
        if self.method == "mad":
            self.ring.load_state_dict(state.get("ring", {}))
            return
        self.stat.load_state_dict(state.get("ema", {}))
        if self.method == "cusum":
            c = state.get("cusum")
            self.cusum = None if c is None else float(c)  # moved to the device at the next compute
