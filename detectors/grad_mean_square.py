"""``grad_mean_square``: LBW-Guard's gradient statistic: the largest per-tensor mean square
gradient against its EMA, and the sign flip of the mean gradient.

Every ``stats_freq`` steps (steps ``0, stats_freq, 2 * stats_freq, ...``; 0-based, so the first
step collects), with ``g_p`` the gradient of parameter tensor ``p``::

    x_t    = max_p mean(g_p ** 2)                    # (loss unit / weight unit) ** 2
    ema_t  = x_t                       at the first collection
           = decay * ema_{t-1} + (1 - decay) * x_t   afterwards   (decay 0.85)
    ratio  = x_t / (ema_t + eps)                      # dimensionless; the EMA already updated
    s_t    = sign(sum_p sum(g_p) / sum_p numel(g_p))  # the sign of the mean gradient entry
    flip   = 1.0 if s_t != s_{t-1} (a previous collection exists) else 0.0

Signals: ``fresh`` (1.0 on a collection step, 0.0 between: rules that should act once per
collection read it), ``ms`` (``x_t``), ``ratio`` and ``flip`` (held between collections).
Params: ``stats_freq`` (default 10), ``decay`` (default 0.85), ``eps`` (default 1e-12). A
non-finite ``x_t`` is emitted but does not enter the EMA (our choice; the source does not say).

Source: the controller of LBW-Guard's Eval edition (arXiv 2605.19008; PyPI ``lbw-guard``
1.1.3, ``lbw/governor.py``), as documented there: collected every ``stats_freq = 10`` steps and
at the first step, EMA decay 0.85, ``ratio = x / (EMA + 1e-12)``. ``policies/lbw-guard-eval.yaml``
is that controller written as a policy; ``benchmarks/stress.py``'s ``lbwguard`` peer is an
independent reference implementation, and a test checks both give the same scale trajectory.

Cost: one ``torch._foreach_norm`` over the gradients and one sum per tensor on collection steps;
nothing in between. The statistics stay on the gradients' device (no host sync).
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch

from lbw_policy.base import Detector


class GradMeanSquare(Detector):
    name = "grad_mean_square"
    signals = ("fresh", "ms", "ratio", "flip")
    # gradients are all-reduced before the step (DDP): every rank holds the same values
    reductions = {"fresh": "same", "ms": "same", "ratio": "same", "flip": "same"}
    sharding = ("it takes the mean square of whole gradient tensors, and FSDP2 shards them "
                "across ranks")
    params_schema = {
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "stats_freq": {"type": "integer", "minimum": 1,
                           "description": "steps between collections; default 10"},
            "decay": {"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 1,
                      "description": "EMA decay of the statistic; default 0.85"},
            "eps": {"type": "number", "exclusiveMinimum": 0, "maximum": 1,
                    "description": "added to the EMA in the ratio's denominator; default 1e-12"},
        },
    }

    def __init__(self, stats_freq: int = 10, decay: float = 0.85, eps: float = 1e-12) -> None:
        super().__init__(stats_freq=stats_freq, decay=decay, eps=eps)
        self.stats_freq = int(stats_freq)
        self.decay = float(decay)
        self.eps = float(eps)
        self.ema: Optional[Any] = None    # float or 0-dim tensor
        self.sign: Optional[Any] = None   # the previous collection's sign
        self.held = {"ms": 0.0, "ratio": 1.0, "flip": 0.0}

    def compute(self, telemetry):
        grads = telemetry.grads()
        if telemetry.step % self.stats_freq or not grads:
            return {"fresh": 0.0, **self.held}
        norms = torch.stack(torch._foreach_norm(grads)).float()
        numels = torch.tensor([g.numel() for g in grads], dtype=torch.float32, device=norms.device)
        x = (norms * norms / numels).max()
        total = torch.stack([g.sum(dtype=torch.float32) for g in grads]).sum()
        sign = torch.sign(total / float(sum(g.numel() for g in grads)))
        finite = torch.isfinite(x)
        if self.ema is None:
            ema = torch.where(finite, x, torch.zeros_like(x))
        else:
            previous = torch.as_tensor(self.ema, dtype=x.dtype, device=x.device)
            ema = torch.where(finite, self.decay * previous + (1.0 - self.decay) * x, previous)
        self.ema = ema
        ratio = x / (ema + self.eps)
        flip = (torch.zeros_like(x) if self.sign is None
                else (sign != torch.as_tensor(self.sign, device=sign.device)).float())
        self.sign = sign
        self.held = {"ms": x, "ratio": ratio, "flip": flip}
        return {"fresh": 1.0, **self.held}

    def state_dict(self) -> dict:
        def f(v):  # read at checkpoint time only
            return None if v is None else float(v)

        return {"ema": f(self.ema), "sign": f(self.sign),
                "held": {k: f(v) for k, v in self.held.items()}}

    def load_state_dict(self, state) -> None:
        self.ema = state.get("ema")
        self.sign = state.get("sign")
        held = state.get("held") or {}
        self.held = {k: (math.nan if held.get(k) is None else float(held[k]))
                     for k in ("ms", "ratio", "flip")} if held else self.held
