"""Locating attention layers in a model, shared by ``spectral_entropy`` and ``attention_logits``.

Two kinds of attention layer are found, in the model's ``named_modules()`` order:

- separate query and key projections: ``nn.Linear`` modules whose names match ``q_pattern`` and
  ``k_pattern`` (``fnmatch`` patterns such as ``"*.attn.q_proj"``), paired in module order. The
  number of heads is the ``n_head`` param, else the parent module's ``n_head``, ``num_heads``,
  ``n_heads`` or ``num_attention_heads`` attribute. A key projection with fewer output features
  than the query's is grouped-query attention: query head ``h`` reads key head
  ``h // (n_head // n_kv_head)``.
- ``nn.MultiheadAttention`` modules whose names match ``mha_pattern``; heads from ``num_heads``,
  query and key weights from ``in_proj_weight`` (or ``q_proj_weight`` / ``k_proj_weight`` when
  the key dimension differs).

Weights are returned as views ``(rows, in_features)`` of the live parameters, detached.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

__all__ = ["AttentionSite", "find_attention_sites", "repeat_heads"]

_HEAD_ATTRS = ("n_head", "num_heads", "n_heads", "num_attention_heads")

#: JSON Schema properties shared by the detectors that locate attention layers
#: (``spectral_entropy``, ``attention_logits``).
SITE_PARAMS_SCHEMA = {
    "q_pattern": {"type": "string", "minLength": 1,
                  "description": "fnmatch pattern of the query nn.Linear modules; default '*.attn.q_proj'"},
    "k_pattern": {"type": "string", "minLength": 1,
                  "description": "fnmatch pattern of the key nn.Linear modules; default '*.attn.k_proj'"},
    "mha_pattern": {"type": "string",
                    "description": "fnmatch pattern of nn.MultiheadAttention modules; default '*', '' for none"},
    "n_head": {"type": "integer", "minimum": 1,
               "description": "attention heads; default: the parent module's n_head/num_heads"},
}



@dataclass
class AttentionSite:
    """One attention layer.

    :param name: the layer's name (the projections' parent module, or the MHA module).
    :param n_head: query heads.
    :param n_kv_head: key heads (== ``n_head`` unless grouped-query attention).
    :param head_dim: ``hs``, features per head.
    :param q: the query ``nn.Linear`` (``None`` for MHA).
    :param k: the key ``nn.Linear`` (``None`` for MHA).
    :param mha: the ``nn.MultiheadAttention`` (``None`` for separate projections).
    """

    name: str
    n_head: int
    n_kv_head: int
    head_dim: int
    q: Optional[nn.Linear] = None
    k: Optional[nn.Linear] = None
    mha: Optional[nn.MultiheadAttention] = None

    def weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(W_q, W_k)``: ``(n_head * hs, d_q)`` and ``(n_kv_head * hs, d_k)``, detached views."""
        if self.mha is not None:
            m = self.mha
            e = m.embed_dim
            if m.in_proj_weight is not None:
                w = m.in_proj_weight.detach()
                return w[:e], w[e:2 * e]
            return m.q_proj_weight.detach(), m.k_proj_weight.detach()
        return self.q.weight.detach(), self.k.weight.detach()

    def biases(self) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        """``(b_q, b_k)`` or ``None`` each (MHA only; a Linear's output already has its bias)."""
        m = self.mha
        if m is None or m.in_proj_bias is None:
            return None, None
        e = m.embed_dim
        b = m.in_proj_bias.detach()
        return b[:e], b[e:2 * e]

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-head factors of the QK bilinear form ``A_h = W_{Q,h}^T W_{K,h}``:
        ``Qf`` ``(n_head, d_q, hs)`` and ``Kf`` ``(n_head, d_k, hs)`` (key heads repeated for
        grouped-query attention), float32 or wider, on the weights' device."""
        wq, wk = self.weights()
        dtype = torch.promote_types(wq.dtype, torch.float32)
        hs = self.head_dim
        qf = wq.to(dtype).reshape(self.n_head, hs, wq.shape[-1]).transpose(1, 2)
        kf = wk.to(dtype).reshape(self.n_kv_head, hs, wk.shape[-1]).transpose(1, 2)
        if self.n_kv_head != self.n_head:
            kf = repeat_heads(kf, self.n_head // self.n_kv_head, dim=0)
        return qf, kf


def repeat_heads(x: torch.Tensor, times: int, dim: int) -> torch.Tensor:
    """``x.repeat_interleave(times, dim)`` for an int ``times``, as ``unsqueeze`` + ``expand`` +
    ``reshape`` (one copy kernel): the same values, and plainly no host-device sync (the
    tensor-``repeats`` overload of ``repeat_interleave`` reads the output size back from the
    device unless ``output_size`` is given)."""
    dim = dim % x.dim()
    shape = list(x.shape)
    expanded = x.unsqueeze(dim + 1).expand(*shape[:dim + 1], times, *shape[dim + 1:])
    return expanded.reshape(*shape[:dim], shape[dim] * times, *shape[dim + 1:])


def _heads_of(model: nn.Module, parent: str) -> Optional[int]:
    try:
        mod = model.get_submodule(parent) if parent else model
    except AttributeError:
        return None
    for attr in _HEAD_ATTRS:
        val = getattr(mod, attr, None)
        if isinstance(val, int) and val > 0:
            return val
    return None


def find_attention_sites(model: nn.Module, q_pattern: str, k_pattern: str,
                         mha_pattern: Optional[str] = "*", n_head: Optional[int] = None,
                         who: str = "detector") -> list[AttentionSite]:
    """Every attention layer of ``model`` (see the module docstring), in module order.

    :param who: the detector's name, for error messages.
    :raises ValueError: no layer found; the q and k matches differ in number or shape; the head
        count is unknown or does not divide the projections; a head has fewer than 2 features.
    """
    if model is None:
        raise ValueError(f"{who} needs the model: build the guard with Guard(optimizer, policy, model=model)")
    qs, ks, found = [], [], []
    order = {}
    for i, (name, mod) in enumerate(model.named_modules()):
        order[name] = i
        if isinstance(mod, nn.Linear):
            if fnmatch.fnmatchcase(name, q_pattern):
                qs.append((name, mod))
            elif fnmatch.fnmatchcase(name, k_pattern):
                ks.append((name, mod))
        elif isinstance(mod, nn.MultiheadAttention) and mha_pattern and fnmatch.fnmatchcase(name, mha_pattern):
            e, h = mod.embed_dim, mod.num_heads
            found.append((i, AttentionSite(name, h, h, e // h, mha=mod)))
    if len(qs) != len(ks):
        raise ValueError(
            f"{who}: q_pattern {q_pattern!r} matched {len(qs)} nn.Linear modules "
            f"({[n for n, _ in qs][:4]}) but k_pattern {k_pattern!r} matched {len(ks)} "
            f"({[n for n, _ in ks][:4]}); the patterns must pick one query and one key projection per layer")
    for (qn, q), (kn, k) in zip(qs, ks):
        parent = qn.rpartition(".")[0]
        heads = n_head or _heads_of(model, parent)
        if heads is None:
            raise ValueError(f"{who}: cannot tell the number of heads of {parent or qn!r} (no attribute "
                             f"{'/'.join(_HEAD_ATTRS)}); set the detector's `n_head` param")
        if q.out_features % heads:
            raise ValueError(f"{who}: n_head {heads} does not divide {qn}.out_features {q.out_features}")
        hs = q.out_features // heads
        if k.out_features % hs or heads % (k.out_features // hs):
            raise ValueError(f"{who}: key projection {kn} has {k.out_features} output features, expected a "
                             f"multiple of the head size {hs} that divides {heads} heads (query {qn}: "
                             f"{q.out_features})")
        found.append((order[qn], AttentionSite(parent or qn, heads, k.out_features // hs, hs, q=q, k=k)))
    if not found:
        linear = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)][:6]
        raise ValueError(f"{who}: no attention layer found: q_pattern {q_pattern!r} / k_pattern {k_pattern!r} "
                         f"matched no nn.Linear and no nn.MultiheadAttention matched {mha_pattern!r}; "
                         f"the model's Linear modules are named like {linear}")
    sites = [s for _, s in sorted(found, key=lambda t: t[0])]
    for s in sites:
        if s.head_dim < 2:
            raise ValueError(f"{who}: layer {s.name!r} has head size {s.head_dim}; the normalized spectral "
                             "entropy needs at least 2 features per head")
    return sites
