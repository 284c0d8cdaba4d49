"""``loss_spike``: EMA z-score of the training loss.

Formula, with ``mean_{t-1}`` and ``var_{t-1}`` the exponentially weighted mean and variance of
the finite losses *before* step t (Finch 2009 update, see ``detectors/_ema.py``)::

    zscore_t = (loss_t - mean_{t-1}) / sqrt(var_{t-1} + eps)
    delta_t  = loss_t - mean_{t-1}                     # nats

Signals (all 0-dim tensors):

- ``zscore``: dimensionless; ``0.0`` during warm-up (the first ``warmup`` finite losses), so a
  warm-up never fires; ``NaN`` when the loss is non-finite (the engine treats NaN as false;
  use the ``nonfinite`` detector for NaN/Inf).
- ``ema``: ``mean_t`` after folding in this step's loss (nats).
- ``delta``: ``loss_t - mean_{t-1}`` (nats), emitted from the second finite loss on (the mean
  needs no warm-up, only the variance does), so an absolute threshold such as ``delta > 0.5``
  sees a blow-up during the first steps of training; ``0.0`` for the first loss.

Params: ``alpha`` (EMA decay in (0, 1), default 0.97, an effective window of about
1/(1-alpha) = 33 steps), ``warmup`` (finite losses before z-scores are emitted, default 25,
minimum 2), ``eps`` (variance floor, default 1e-8 nats^2).

Non-finite losses never enter the statistics. Source: the EMA z-score spike test used by
LBW-Guard (arXiv 2605.19008) and OLMo-core's loss-spike monitor.
"""

from __future__ import annotations

import math

import torch

from lbw_policy.base import Detector

from ._ema import EMAStat


class LossSpike(Detector):
    name = "loss_spike"
    signals = ("zscore", "ema", "delta")
    params_schema = {
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "alpha": {"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 1,
                      "description": "EMA decay in (0, 1); default 0.97"},
            "warmup": {"type": "integer", "minimum": 2,
                       "description": "finite losses before z-scores are emitted; default 25"},
            "eps": {"type": "number", "exclusiveMinimum": 0,
                    "description": "variance floor in nats^2; default 1e-8"},
        },
    }

    def __init__(self, alpha: float = 0.97, warmup: int = 25, eps: float = 1e-8) -> None:
        super().__init__(alpha=alpha, warmup=warmup, eps=eps)
        self.warmup = int(warmup)
        self.eps = float(eps)
        self.stat = EMAStat(alpha)

    def compute(self, telemetry):
        loss = telemetry.loss
        stat = self.stat
        if stat.mean is None:
            stat._init(loss)
        x = loss.to(stat.mean.dtype)
        finite = torch.isfinite(x)
        warm = stat.count >= self.warmup
        delta = x - stat.mean
        z = delta / torch.sqrt(stat.var + self.eps)
        zero = torch.zeros_like(z)
        nan = torch.full_like(z, math.nan)
        zscore = torch.where(finite, torch.where(warm, z, zero), nan)
        delta_out = torch.where(finite, torch.where(stat.count >= 1, delta, zero), nan)
        stat.update(x)
        return {"zscore": zscore, "ema": stat.mean, "delta": delta_out}

    def state_dict(self) -> dict:
        return {"ema": self.stat.state_dict()}

    def load_state_dict(self, state) -> None:
        self.stat.load_state_dict(state.get("ema", {}))
