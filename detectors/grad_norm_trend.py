"""``grad_norm_trend``: robust trend of the log gradient norm over a window, with its
Mann-Kendall significance.

Over the last ``window`` finite, positive norms seen at due steps, ``y_i = ln(norm_i)`` observed
at step ``x_i`` (the grad norm is the step's shared reduction, ``Telemetry.grad_norm``)::

    slope  = median over pairs x_i < x_j of (y_j - y_i) / (x_j - x_i)     # Theil-Sen; ln units per step
    growth = exp(slope * (max x - min x)) - 1                           # fitted relative growth over the window
    S      = sum over pairs x_i < x_j of sign(y_j - y_i)                  # Mann-Kendall statistic
    var S  = (n (n-1) (2n+5) - sum_ties t (t-1) (2t+5)) / 18
    Z      = (S - sign(S)) / sqrt(var S)                                 # continuity-corrected
    p      = erfc(|Z| / sqrt 2)                                          # two-sided p-value

Sources: ``slope`` is the median of pairwise slopes as ``scipy.stats.theilslopes`` (Theil 1950;
Sen 1968); the test is Mann (1945) / Kendall (1975) with the tie correction of Hipel & McLeod
(1994), as in ``pymannkendall.original_test``. A small ``p`` with a positive ``slope`` says the gradient
norm is growing, not just noisy.

Signals (0-dim tensors): ``slope`` (ln-norm per step), ``growth`` (dimensionless; 0.5 = +50 %),
``p`` (in [0, 1]). Warm-up: until ``min_points`` finite norms are in the window, ``slope = 0``,
``growth = 0``, ``p = 1`` (never fires). Non-finite or zero norms are not entered (they never
poison the window nor push a finite norm out of it).

Computation: a device ring buffer of ``window`` values; every pair at once (``window^2``
elements: 4,096 for the default 64), the median by a masked sort, ``p`` with
``torch.special.erfc``, all on the norm's device: no host sync.

Params: ``window`` (evaluations kept, default 64, 4..1024), ``min_points`` (finite norms before
emitting, default 16, 3..window).
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import torch

from lbw_policy.base import Detector

from ._ring import Ring, masked_median

__all__ = ["GradNormTrend", "theil_sen_mann_kendall"]


def theil_sen_mann_kendall(y: torch.Tensor, x: torch.Tensor, valid: torch.Tensor) -> dict:
    """Theil-Sen slope and Mann-Kendall test of ``y`` against ``x`` over the entries where
    ``valid`` is true (all three ``(..., n)``, any order along the last dim; leading dims are
    independent series, computed in one pass). Returns tensors of shape ``(...)``: ``slope``,
    ``S``, ``var``, ``z``, ``p``, ``n`` and ``span`` (``max x - min x``). NaN ``slope`` when no
    pair has distinct ``x``."""
    dx = x.unsqueeze(-2) - x.unsqueeze(-1)                    # (..., n, n): dx[i, j] = x_j - x_i
    dy = y.unsqueeze(-2) - y.unsqueeze(-1)
    both = valid.unsqueeze(-2) & valid.unsqueeze(-1)
    pair = both & (dx > 0)
    slopes = torch.where(pair, dy / torch.where(pair, dx, 1.0), 0.0)
    flat = slopes.shape[:-2] + (-1,)
    slope = masked_median(slopes.reshape(flat), pair.reshape(flat))
    s = torch.where(pair, torch.sign(dy), 0.0).sum(dim=(-2, -1))
    n = valid.sum(dim=-1).to(y.dtype)
    ties = (both & (dy == 0)).sum(dim=-2).to(y.dtype)        # t_j: size of j's tie group
    tie_term = torch.where(valid, (ties - 1) * (2 * ties + 5), 0.0).sum(dim=-1)
    var = (n * (n - 1) * (2 * n + 5) - tie_term) / 18.0
    z = torch.where(var > 0, (s - torch.sign(s)) / torch.sqrt(torch.clamp(var, min=1e-300)), 0.0)
    p = torch.special.erfc(z.abs() / math.sqrt(2.0))
    span = torch.where(valid, x, -math.inf).amax(dim=-1) - torch.where(valid, x, math.inf).amin(dim=-1)
    return {"slope": slope, "S": s, "var": var, "z": z, "p": p, "n": n, "span": span}


class GradNormTrend(Detector):
    name = "grad_norm_trend"
    signals = ("slope", "growth", "p")
    reductions = {"slope": "same", "growth": "same", "p": "same"}  # from the global grad norm
    params_schema = {
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "window": {"type": "integer", "minimum": 4, "maximum": 1024,
                       "description": "evaluations kept in the window; default 64"},
            "min_points": {"type": "integer", "minimum": 3,
                           "description": "finite norms in the window before emitting; default 16"},
        },
    }

    @classmethod
    def validate_params(cls, params: Mapping[str, Any]) -> None:
        window, mp = params.get("window", 64), params.get("min_points", 16)
        if mp > window:
            raise ValueError(f"min_points ({mp}) must be <= window ({window})")

    def __init__(self, window: int = 64, min_points: int = 16) -> None:
        self.validate_params({"window": window, "min_points": min_points})
        super().__init__(window=window, min_points=min_points)
        self.window = int(window)
        self.min_points = int(min_points)
        self.ring = Ring(self.window)

    @torch.no_grad()
    def compute(self, telemetry) -> dict:
        norm = telemetry.grad_norm
        self.ring.push(torch.log(norm.to(torch.float64 if norm.device.type != "mps" else torch.float32)),
                       telemetry.step)
        r = self.ring
        st = theil_sen_mann_kendall(r.values, r.steps, r.valid)
        warm = st["n"] >= self.min_points
        slope = torch.where(warm, torch.nan_to_num(st["slope"], nan=0.0), 0.0)
        return {"slope": slope,
                "growth": torch.where(warm, torch.expm1(slope * st["span"]), 0.0),
                "p": torch.where(warm, st["p"], 1.0)}

    def state_dict(self) -> dict:
        return {"ring": self.ring.state_dict()}

    def load_state_dict(self, state) -> None:
        self.ring.load_state_dict(state.get("ring", {}))
