"""``grad_norm``: the global L2 norm of the gradients, and its ratio to its own EMA.

Formulas::

    norm_t  = sqrt(sum_p ||grad_p||_2^2)          # computed once per step by Telemetry
    ratio_t = norm_t / ema_{t-1}                  # dimensionless; 1.0 during warm-up

where ``ema`` is the exponentially weighted mean of the finite norms (decay ``alpha``, Finch
2009 update, ``detectors/_ema.py``). Units: ``norm`` in the loss's units per parameter unit
(nats per unit weight for a cross-entropy loss); ``ratio`` dimensionless.

Params: ``alpha`` (default 0.9), ``warmup`` (finite norms before ``ratio`` is emitted, default
10). Non-finite norms are emitted as they are and never enter the EMA.

Source: the global norm is ``torch.nn.utils.get_total_norm`` (the quantity
``clip_grad_norm_`` clips); the ratio-to-running-mean test is ZClip's (arXiv 2504.02507) and
LBW-Guard's (arXiv 2605.19008) trigger.
"""

from __future__ import annotations

import torch

from lbw_policy.base import Detector

from ._ema import EMAStat, clamp_min, where


class GradNorm(Detector):
    name = "grad_norm"
    signals = ("norm", "ratio")
    reductions = {"norm": "same", "ratio": "same"}  # gradients are all-reduced before the step
    params_schema = {
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "alpha": {"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 1,
                      "description": "EMA decay in (0, 1); default 0.9"},
            "warmup": {"type": "integer", "minimum": 1,
                       "description": "finite norms before `ratio` is emitted; default 10"},
        },
    }

    def __init__(self, alpha: float = 0.9, warmup: int = 10) -> None:
        super().__init__(alpha=alpha, warmup=warmup)
        self.warmup = int(warmup)
        self.stat = EMAStat(alpha)

    def compute(self, telemetry):
        norm = telemetry.grad_norm_scalar    # a float on the CPU, a float32 tensor on a device
        stat = self.stat
        x = stat.adopt(norm)
        warm = stat.count >= self.warmup
        ratio = where(warm, x / clamp_min(stat.mean, 1e-12), 1.0)
        stat.update(x)
        return {"norm": norm, "ratio": ratio}

    def state_dict(self) -> dict:
        return {"ema": self.stat.state_dict()}

    def load_state_dict(self, state) -> None:
        self.stat.load_state_dict(state.get("ema", {}))
