"""``spectral_entropy``: normalized spectral entropy of each attention head's QK bilinear form.

For attention layer ``l`` and head ``h`` with query and key weights ``W_{Q,h}``, ``W_{K,h}``
(each ``(hs, d)``: the head's rows of the projection), the pre-softmax logit of tokens ``x``,
``y`` is ``x^T A_h y`` with ``A_h = W_{Q,h}^T W_{K,h}`` (``d x d``, rank <= hs). With
``s_1..s_r`` its ``r = hs`` largest singular values::

    p_k = s_k / sum_j s_j
    H   = -sum_k p_k ln p_k / ln r                  # in [0, 1]; 1 = flat spectrum, 0 = rank one

The **update term** since the previous evaluation, with ``dW = W_now - W_prev``, is the
first-order change of the form at ``W_prev``::

    dA_h = dW_{Q,h}^T W_{K,h,prev} + W_{Q,h,prev}^T dW_{K,h}      # rank <= 2 hs

and its entropy is taken the same way with ``r = min(d, 2 hs)``. A collapsing entropy (the form
concentrating on few directions) and a low-rank update precede attention-logit growth
(arXiv 2606.28116; Zhai et al. 2303.06296 "entropy collapse"). Biases are not part of ``A_h``.

Computation (no ``d x d`` matrix, no full SVD): ``A_h = F G^T`` with ``F = W_{Q,h}^T``,
``G = W_{K,h}^T`` (``d x hs``). With reduced QR ``F = U_F R_F``, ``G = U_G R_G``, the nonzero
singular values of ``A_h`` are those of the small ``R_F R_G^T`` (``hs x hs``), because ``U_F``,
``U_G`` have orthonormal columns. The update term is ``[dF, F] [G, dG]^T``: QR of the
``d x 2hs`` factors, SVD of a ``2hs x 2hs`` matrix. All heads of a layer are one batched call,
on the device where the weights live, in float32 (or the weights' wider dtype). On CUDA the
batched QR/SVD synchronise with the host once per layer (cuSOLVER's error check): run it every
N steps with the policy's ``every:``.

Signals (0-dim tensors):

- ``min``: smallest ``H`` over every layer and head (dimensionless).
- ``drop``: largest fall of a layer's minimum below its warm-up baseline,
  ``max_l (base_l - min_h H_{l,h})`` where ``base_l`` is the mean of that layer's minimum over
  the first ``warmup`` evaluations; ``0.0`` during warm-up (never fires).
- ``worst_layer`` / ``worst_head``: the layer index (module order, from 0) and head of the
  ``(l, h)`` whose ``H`` moved most from its own warm-up baseline, ``argmax |H - base|``;
  ``-1`` during warm-up.
- ``update_min``: smallest update-term entropy over layers and heads; NaN on the first
  evaluation (no previous weights) and when no layer's weights changed (skipped steps); a
  layer whose weights did not change (frozen) is left out.
  Emitted only with ``update: true``.
- ``layer<i>.min`` for ``i < layers``: layer ``i``'s minimum over heads.
- ``cost_ms``: host wall-clock time of this evaluation in milliseconds (a Python float).

Params: ``q_pattern`` (default ``"*.attn.q_proj"``), ``k_pattern`` (default
``"*.attn.k_proj"``), ``mha_pattern`` (``nn.MultiheadAttention`` modules to include, default
``"*"``; ``""`` for none), ``n_head`` (default: the projections' parent's ``n_head`` /
``num_heads`` attribute), ``warmup`` (evaluations averaged into the baseline, default 3),
``update`` (compute the update term, default true), ``layers`` (number of ``layer<i>.min``
signals, default 0). Layer discovery is described in ``detectors/_attention.py``.

Errors: :meth:`setup` raises ``ValueError`` when no attention layer matches, the patterns pair
up badly, the head count is unknown, or ``layers`` exceeds the layers found.

Sources: arXiv 2606.28116 (QK spectral entropy as an early-warning signal); Roy & Vetterli
2007, "The effective rank: a measure of effective dimensionality" (EUSIPCO), for the
normalized spectral entropy.
"""

from __future__ import annotations

import math
import time
from typing import Any, Mapping, Optional

import torch

from lbw_policy.base import Detector

from ._attention import SITE_PARAMS_SCHEMA, find_attention_sites

__all__ = ["SpectralEntropy", "normalized_spectral_entropy", "factored_entropy"]


def normalized_spectral_entropy(s: torch.Tensor) -> torch.Tensor:
    """``-sum p ln p / ln r`` over the last dim of singular values ``s`` ``(..., r)``, ``r >= 2``;
    NaN where every singular value is 0."""
    r = s.shape[-1]
    p = s / s.sum(dim=-1, keepdim=True)
    return -torch.special.xlogy(p, p).sum(dim=-1) / math.log(r)


def factored_entropy(f: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Normalized spectral entropy of ``f @ g^T`` for batches ``f`` ``(n, d1, k)``, ``g``
    ``(n, d2, k)``, without forming it: QR of both factors, SVD of ``R_f R_g^T``. Returns
    ``(n,)``."""
    rf = torch.linalg.qr(f, mode="r").R                       # (n, min(d1, k), k)
    rg = torch.linalg.qr(g, mode="r").R                       # (n, min(d2, k), k)
    s = torch.linalg.svdvals(rf @ rg.transpose(-1, -2))       # (n, min(d1, d2, k))
    return normalized_spectral_entropy(s)


class SpectralEntropy(Detector):
    name = "spectral_entropy"
    signals = ("min", "drop", "worst_layer", "worst_head", "update_min", "cost_ms")
    params_schema = {
        "type": "object",
        "additionalProperties": False,
        "properties": {
            **SITE_PARAMS_SCHEMA,
            "warmup": {"type": "integer", "minimum": 1,
                       "description": "evaluations averaged into the baseline; default 3"},
            "update": {"type": "boolean", "description": "compute the update-term entropy; default true"},
            "layers": {"type": "integer", "minimum": 0, "maximum": 1024,
                       "description": "emit layer<i>.min for the first `layers` layers; default 0"},
        },
    }

    def __init__(self, q_pattern: str = "*.attn.q_proj", k_pattern: str = "*.attn.k_proj",
                 mha_pattern: str = "*", n_head: Optional[int] = None, warmup: int = 3,
                 update: bool = True, layers: int = 0) -> None:
        super().__init__(q_pattern=q_pattern, k_pattern=k_pattern, mha_pattern=mha_pattern,
                         n_head=n_head, warmup=warmup, update=update, layers=layers)
        self.warmup = int(warmup)
        self.update = bool(update)
        self.layers = int(layers)
        self.sites: list = []
        self.evals = 0                                  # evaluations so far
        self._base_sum: Optional[torch.Tensor] = None   # (n_heads_total,) sum of H in warm-up
        self._base_min_sum: Optional[torch.Tensor] = None  # (n_layers,) sum of layer minima
        self._prev: Optional[list] = None               # [(Qf, Kf)] at the previous evaluation

    @classmethod
    def signals_for(cls, params: Mapping[str, Any]) -> tuple[str, ...]:
        names = ["min", "drop", "worst_layer", "worst_head"]
        if params.get("update", True):
            names.append("update_min")
        names.append("cost_ms")
        names += [f"layer{i}.min" for i in range(int(params.get("layers", 0)))]
        return tuple(names)

    def setup(self, model, optimizer) -> None:
        p = self.params
        self.sites = find_attention_sites(model, p["q_pattern"], p["k_pattern"], p["mha_pattern"] or None,
                                          p["n_head"], who="spectral_entropy")
        if self.layers > len(self.sites):
            raise ValueError(f"spectral_entropy: params.layers is {self.layers} but the model has "
                             f"{len(self.sites)} attention layers ({[s.name for s in self.sites]})")
        layer_of, head_of = [], []
        for i, s in enumerate(self.sites):
            layer_of += [i] * s.n_head
            head_of += list(range(s.n_head))
        self._layer_of = torch.tensor(layer_of, dtype=torch.float64)
        self._head_of = torch.tensor(head_of, dtype=torch.float64)

    @torch.no_grad()
    def compute(self, telemetry) -> dict:
        if not self.sites:
            raise RuntimeError("spectral_entropy: setup() was not called (the guard calls it with the model)")
        t0 = time.perf_counter()
        ents, layer_mins, upd, prev = [], [], [], []
        for i, site in enumerate(self.sites):
            qf, kf = site.factors()                             # (nh, d_q, hs), (nh, d_k, hs)
            h = factored_entropy(qf, kf)                        # (nh,)
            ents.append(h)
            layer_mins.append(h.min())
            if self.update:
                if self._prev is not None:
                    pq, pk = (t.to(qf.device, qf.dtype) for t in self._prev[i])
                    upd.append(factored_entropy(torch.cat([qf - pq, pq], dim=-1),    # (nh, d_q, 2hs)
                                                torch.cat([pk, kf - pk], dim=-1)))   # (nh, d_k, 2hs)
                prev.append((qf.clone(), kf.clone()))
        flat = torch.cat(ents).to(torch.float64)                # (total heads,)
        mins = torch.stack(layer_mins).to(torch.float64)        # (layers,)
        out = {"min": mins.min()}
        if self.evals < self.warmup:
            self._base_sum = flat if self._base_sum is None else self._base_sum.to(flat.device) + flat
            self._base_min_sum = mins if self._base_min_sum is None else self._base_min_sum.to(flat.device) + mins
            out["drop"] = torch.zeros_like(out["min"])
            out["worst_layer"] = out["worst_head"] = torch.full_like(out["min"], -1.0)
        else:
            base = self._base_sum.to(flat.device) / self.warmup
            base_min = self._base_min_sum.to(flat.device) / self.warmup
            out["drop"] = (base_min - mins).max()
            moved = torch.nan_to_num((flat - base).abs(), nan=math.inf)  # a NaN head counts as moved most
            idx = moved.argmax()
            out["worst_layer"] = torch.take(self._layer_of.to(flat.device), idx)  # take: no host sync
            out["worst_head"] = torch.take(self._head_of.to(flat.device), idx)
        if self.update:
            # NaN heads (a layer whose weights did not change) are left out; all NaN -> NaN
            u = torch.cat(upd).to(torch.float64) if upd else torch.full((1,), math.nan, dtype=torch.float64)
            out["update_min"] = torch.nan_to_num(u, nan=math.inf).min().nan_to_num(posinf=math.nan)
            self._prev = prev
        for i in range(self.layers):
            out[f"layer{i}.min"] = mins[i]
        self.evals += 1
        out["cost_ms"] = (time.perf_counter() - t0) * 1e3      # host time; on CUDA the SVDs sync
        return out

    def state_dict(self) -> dict:
        return {
            "evals": self.evals,
            "base_sum": None if self._base_sum is None else self._base_sum.tolist(),
            "base_min_sum": None if self._base_min_sum is None else self._base_min_sum.tolist(),
            # The previous evaluation's factors, so the first update term after a resume is the
            # same as without one: 2 * (d * n_head * hs) numbers per layer.
            "prev": None if self._prev is None else [[q.tolist(), k.tolist()] for q, k in self._prev],
        }

    def load_state_dict(self, state) -> None:
        self.evals = int(state.get("evals", 0))
        bs, bm = state.get("base_sum"), state.get("base_min_sum")
        self._base_sum = None if bs is None else torch.tensor(bs, dtype=torch.float64)
        self._base_min_sum = None if bm is None else torch.tensor(bm, dtype=torch.float64)
        prev = state.get("prev")
        self._prev = None if prev is None else [(torch.tensor(q), torch.tensor(k)) for q, k in prev]
