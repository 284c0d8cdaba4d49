"""Locating attention layers and the output head in a model, shared by ``spectral_entropy``,
``attention_logits`` and ``logit_divergence``.

**Projections.** A *projection* is an ``nn.Linear`` (weight ``(out, in)``) or a Hugging Face
``Conv1D`` (GPT-2 family; weight ``(in, out)``, the transpose; recognised by its class name and
its ``nf`` attribute, so ``transformers`` is not imported). Weights are always returned as
``(rows, in_features)`` views of the live parameters, detached.

**Attention layers**, in the model's ``named_modules()`` order, without configuration:

- *separate query and key projections*: a module whose children include one of the sibling
  pairs ``q_proj``/``k_proj`` (HF Llama, Mistral, Qwen, OPT, the demo GPT), ``wq``/``wk``
  (torchtitan, Meta Llama), ``q``/``k`` (T5, independently written GPTs), ``query``/``key``
  (BERT), ``q_lin``/``k_lin`` (DistilBERT), ``to_q``/``to_k`` (diffusers),
  ``query_proj``/``key_proj``; both children projections (:data:`QK_PAIRS`).
- *one fused q, k, v projection* named ``c_attn`` (nanoGPT, HF GPT-2), ``qkv``, ``qkv_proj``
  (Phi-3), ``Wqkv`` (MPT), ``wqkv`` (InternLM) or ``to_qkv`` (:data:`FUSED_NAMES`), whose output
  features are ``[q | k | v]``: ``n_head * hs`` query features, then ``n_kv_head * hs`` key
  features, then as many value features. Layouts that interleave q, k and v per head
  (GPT-NeoX, Falcon ``query_key_value``) are not recognised.
- ``nn.MultiheadAttention`` modules matching ``mha_pattern`` (default ``"*"``): query and key
  weights from ``in_proj_weight`` rows ``[0, E)`` and ``[E, 2E)``, or ``q_proj_weight`` /
  ``k_proj_weight`` when the key dimension differs; heads from ``num_heads``.

**Overrides** (``fnmatch`` patterns over module names): ``q_pattern`` and ``k_pattern`` together
pick the query and key projections, paired in module order (nothing else is searched by name);
``qkv_pattern`` picks fused projections. ``mha_pattern`` is applied in every mode (``""``: none).

**Heads.** The number of query heads ``n_head`` is the ``n_head`` param when given; otherwise
the first of the layer module and its ancestors (up to the model) that has an int attribute
``n_head``, ``num_heads``, ``n_heads`` or ``num_attention_heads`` (:data:`HEAD_ATTRS`), else a
``head_dim`` attribute (then ``n_head = query features / head_dim``), else a ``config`` with one
of those attributes (HF models). A key projection with fewer output features than the query's
is grouped-query attention (``n_kv_head = key features / hs``): query head ``h`` reads key head
``h // (n_head // n_kv_head)``. A fused projection needs ``n_kv_head`` to split it: an attribute
``n_kv_head``, ``n_kv_heads``, ``num_kv_heads`` or ``num_key_value_heads`` (:data:`KV_HEAD_ATTRS`;
same search), else ``n_kv_head = n_head`` (three equal thirds).

Rotary position embeddings and QK-norm (Llama, Mistral, Qwen3, torchtitan) act after the
projections: the logits measured from projection outputs are those of the un-rotated,
un-normalised queries and keys (the same norms; the position-dependent phase is left out).

**Values and output projection** (for ``attention_logits``' kernel check): the value features
are the third block of a fused projection, or a sibling of the query projection named as the
pair's value (:data:`V_NAMES`: ``v_proj``, ``wv``, ``v``, ``value``, ``v_lin``, ``to_v``,
``value_proj``); the output projection, whose input is the attention's merged heads ``(B, T,
n_head * hs)``, is a sibling named ``o_proj``, ``out_proj``, ``c_proj``, ``wo``, ``o``,
``out_lin``, ``proj`` or ``dense`` (:data:`OUT_NAMES`) with ``n_head * hs`` input features.
For ``nn.MultiheadAttention`` both come from the module (``in_proj_weight`` rows ``[2E, 3E)``,
``out_proj``). :func:`kernel_check_obstacles` lists what keeps a layer's attention output from
being recomputed from its projections.

**Output head** (:func:`find_output_head`): HF ``model.get_output_embeddings()`` when the model
has it; otherwise the first ``nn.Linear`` whose weight is an ``nn.Embedding``'s weight (tied, as
nanoGPT), else the last ``nn.Linear`` whose ``out_features`` is a vocabulary size (an
``nn.Embedding``'s ``num_embeddings``, or the model's ``config.vocab_size``).
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

__all__ = ["AttentionSite", "find_attention_sites", "find_output_head", "is_projection", "repeat_heads",
           "kernel_check_obstacles", "layer_scale", "position_rotation", "QK_PAIRS", "FUSED_NAMES", "HEAD_ATTRS", "KV_HEAD_ATTRS", "V_NAMES",
           "OUT_NAMES"]

#: Sibling (query, key) projection names found without configuration.
QK_PAIRS = (("q_proj", "k_proj"), ("wq", "wk"), ("q", "k"), ("query", "key"), ("q_lin", "k_lin"),
            ("to_q", "to_k"), ("query_proj", "key_proj"))
#: Value projections, by the index of their (query, key) pair in :data:`QK_PAIRS`.
V_NAMES = ("v_proj", "wv", "v", "value", "v_lin", "to_v", "value_proj")
#: Output projections (merged heads in), siblings of the query projection.
OUT_NAMES = ("o_proj", "out_proj", "c_proj", "wo", "o", "out_lin", "proj", "dense")
#: Children that normalise queries or keys after the projection (QK-norm).
QK_NORM_NAMES = ("q_norm", "k_norm", "q_layernorm", "k_layernorm", "query_layernorm", "key_layernorm")
#: Float attributes of an attention layer that give its attention-weight dropout.
ATTN_DROPOUT_ATTRS = ("attention_dropout", "attn_dropout", "attn_pdrop", "dropout_p", "dropout")
#: Float attributes of an attention layer that give its softmax scale (HF ``scaling``).
SCALE_ATTRS = ("scaling", "softmax_scale", "scale")
#: Names of fused ``[q | k | v]`` projections found without configuration.
FUSED_NAMES = ("c_attn", "qkv", "qkv_proj", "Wqkv", "wqkv", "to_qkv")
#: Attributes giving the number of query heads.
HEAD_ATTRS = ("n_head", "num_heads", "n_heads", "num_attention_heads")
#: Attributes giving the number of key/value heads (grouped-query attention).
KV_HEAD_ATTRS = ("n_kv_head", "n_kv_heads", "num_kv_heads", "num_key_value_heads")
_HEAD_ATTRS = HEAD_ATTRS   # the former private name

#: JSON Schema properties shared by the detectors that locate attention layers
#: (``spectral_entropy``, ``attention_logits``).
SITE_PARAMS_SCHEMA = {
    "q_pattern": {"type": "string", "minLength": 1,
                  "description": "fnmatch pattern of the query projections (with k_pattern); "
                                 "default: found by name (q_proj, wq, q, query, ...)"},
    "k_pattern": {"type": "string", "minLength": 1,
                  "description": "fnmatch pattern of the key projections (with q_pattern)"},
    "qkv_pattern": {"type": "string", "minLength": 1,
                    "description": "fnmatch pattern of fused [q|k|v] projections; default: found by name "
                                   "(c_attn, qkv, qkv_proj, Wqkv, ...)"},
    "mha_pattern": {"type": "string",
                    "description": "fnmatch pattern of nn.MultiheadAttention modules; default '*', '' for none"},
    "n_head": {"type": "integer", "minimum": 1,
               "description": "attention heads; default: from the layer's attributes or config"},
}

#: ``q_pattern`` and ``k_pattern`` come together (JSON Schema ``dependentRequired``).
SITE_PARAMS_DEPENDENCIES = {"q_pattern": ["k_pattern"], "k_pattern": ["q_pattern"]}


def is_projection(mod: nn.Module) -> bool:
    """True for an ``nn.Linear`` and for a Hugging Face ``Conv1D`` (class name ``Conv1D``, a 2-D
    ``weight`` of shape ``(in, nf)``)."""
    if isinstance(mod, nn.Linear):
        return True
    w = getattr(mod, "weight", None)
    return (type(mod).__name__ == "Conv1D" and isinstance(w, torch.Tensor) and w.dim() == 2
            and getattr(mod, "nf", None) == w.shape[1])


def _out_features(mod: nn.Module) -> int:
    return mod.out_features if isinstance(mod, nn.Linear) else mod.weight.shape[1]


def _in_features(mod: nn.Module) -> int:
    return mod.in_features if isinstance(mod, nn.Linear) else mod.weight.shape[0]


def _rows(mod: nn.Module, lo: int, hi: int) -> torch.Tensor:
    """Rows ``[lo, hi)`` of the projection's ``(out, in)`` weight, a detached view."""
    w = mod.weight.detach()
    return w[lo:hi] if isinstance(mod, nn.Linear) else w[:, lo:hi].t()


@dataclass
class AttentionSite:
    """One attention layer.

    :param name: the layer's name (the projections' parent module, or the MHA module).
    :param n_head: query heads.
    :param n_kv_head: key heads (== ``n_head`` unless grouped-query attention).
    :param head_dim: ``hs``, features per head.
    :param q: the query projection (``nn.Linear`` or HF ``Conv1D``; ``None`` for MHA).
    :param k: the key projection (the same module as ``q`` for a fused projection).
    :param mha: the ``nn.MultiheadAttention`` (``None`` otherwise).
    :param q_range: ``(start, stop)``: the query features among ``q``'s output features
        (``None``: all of them).
    :param k_range: the same for the key features of ``k``.
    :param v: the value projection (the same module as ``q`` for a fused projection; ``None``
        when not found, and for MHA).
    :param v_range: the value features among ``v``'s output features.
    :param out: the output projection, input ``(..., n_head * hs)`` (``None`` when not found,
        and for MHA).
    :param module: the layer module (the projections' parent, or the MHA module).
    """

    name: str
    n_head: int
    n_kv_head: int
    head_dim: int
    q: Optional[nn.Module] = None
    k: Optional[nn.Module] = None
    mha: Optional[nn.MultiheadAttention] = None
    q_range: Optional[tuple] = None
    k_range: Optional[tuple] = None
    v: Optional[nn.Module] = None
    v_range: Optional[tuple] = None
    out: Optional[nn.Module] = None
    module: Optional[nn.Module] = None

    @property
    def fused(self) -> bool:
        """True when the query and key features come out of one projection."""
        return self.q is not None and self.q is self.k

    def select(self, which: str, output: torch.Tensor) -> torch.Tensor:
        """The query (``which="q"``), key (``"k"``) or value (``"v"``) features of a projection's
        output ``(..., out_features)``: ``(..., n_head * hs)`` or ``(..., n_kv_head * hs)``, a view."""
        rng = {"q": self.q_range, "k": self.k_range, "v": self.v_range}[which]
        return output if rng is None else output[..., rng[0]:rng[1]]

    def weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(W_q, W_k)``: ``(n_head * hs, d_q)`` and ``(n_kv_head * hs, d_k)``, detached views."""
        if self.mha is not None:
            m = self.mha
            e = m.embed_dim
            if m.in_proj_weight is not None:
                w = m.in_proj_weight.detach()
                return w[:e], w[e:2 * e]
            return m.q_proj_weight.detach(), m.k_proj_weight.detach()
        qr = self.q_range or (0, _out_features(self.q))
        kr = self.k_range or (0, _out_features(self.k))
        return _rows(self.q, *qr), _rows(self.k, *kr)

    def biases(self) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        """``(b_q, b_k)`` or ``None`` each (MHA only; a projection's output already has its bias)."""
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


def _int_attr(obj, names) -> Optional[int]:
    for attr in names:
        val = getattr(obj, attr, None)
        if isinstance(val, int) and not isinstance(val, bool) and val > 0:
            return val
    return None


def _head_info(model: nn.Module, parent: str) -> tuple[Optional[int], Optional[int], Optional[int]]:
    """``(n_head, n_kv_head, head_dim)`` of the layer ``parent`` (``None`` where unknown): the
    first of the module and its ancestors that names heads or a head size (module docstring)."""
    parts = parent.split(".") if parent else []
    for depth in range(len(parts), -1, -1):
        try:
            mod = model.get_submodule(".".join(parts[:depth]))
        except AttributeError:
            continue
        for src in (mod, getattr(mod, "config", None)):
            if src is None:
                continue
            heads, hs = _int_attr(src, HEAD_ATTRS), _int_attr(src, ("head_dim",))
            if heads or hs:
                return heads, _int_attr(src, KV_HEAD_ATTRS), hs
    return None, None, None


def _describe(model: nn.Module, limit: int = 12) -> str:
    """The model's projections (``name (in -> out)``), for error messages."""
    found = [f"{n} ({_in_features(m)}->{_out_features(m)})" for n, m in model.named_modules() if is_projection(m)]
    more = f" and {len(found) - limit} more" if len(found) > limit else ""
    return (", ".join(found[:limit]) + more) if found else "none"


def find_attention_sites(model: nn.Module, q_pattern: Optional[str] = None, k_pattern: Optional[str] = None,
                         mha_pattern: Optional[str] = "*", n_head: Optional[int] = None,
                         who: str = "detector", qkv_pattern: Optional[str] = None) -> list[AttentionSite]:
    """Every attention layer of ``model`` (see the module docstring), in module order.

    :param q_pattern: with ``k_pattern``, ``fnmatch`` patterns of the query and key projections
        (an override: with either given, or ``qkv_pattern``, no layer is found by name).
    :param mha_pattern: ``nn.MultiheadAttention`` modules to include (``None`` or ``""``: none).
    :param n_head: query heads of every layer (default: discovered per layer).
    :param who: the detector's name, for error messages.
    :param qkv_pattern: ``fnmatch`` pattern of fused ``[q | k | v]`` projections (an override).
    :raises ValueError: no model; only one of ``q_pattern`` / ``k_pattern``; no layer found
        (the message lists the model's projections); the q and k matches differ in number or
        shape; the head count is unknown or does not divide the projections; a head has fewer
        than 2 features.
    """
    if model is None:
        raise ValueError(f"{who} needs the model: build the guard with Guard(optimizer, policy, model=model)")
    if (q_pattern is None) != (k_pattern is None):
        raise ValueError(f"{who}: set both q_pattern and k_pattern (query and key projections), or neither; "
                         f"got q_pattern {q_pattern!r}, k_pattern {k_pattern!r}")
    auto = q_pattern is None and qkv_pattern is None
    separate: list = []     # (order, parent, q name, q, k name, k)
    fused: list = []        # (order, parent, name, module)
    found: list = []        # (order, site)
    qs, ks = [], []
    modules = dict(model.named_modules())
    for i, (name, mod) in enumerate(modules.items()):
        if isinstance(mod, nn.MultiheadAttention):
            if mha_pattern and fnmatch.fnmatchcase(name, mha_pattern):
                e, h = mod.embed_dim, mod.num_heads
                found.append((i, AttentionSite(name, h, h, e // h, mha=mod, module=mod)))
            continue
        if auto:
            children = dict(mod.named_children())
            prefix = f"{name}." if name else ""
            pair = next(((a, b) for a, b in QK_PAIRS if is_projection(children.get(a))
                         and is_projection(children.get(b))), None) if children else None
            if pair is not None:
                separate.append((i, name, prefix + pair[0], children[pair[0]], prefix + pair[1], children[pair[1]]))
            else:
                fname = next((f for f in FUSED_NAMES if is_projection(children.get(f))), None)
                if fname is not None:
                    fused.append((i, name, prefix + fname, children[fname]))
        elif is_projection(mod):
            if q_pattern is not None and fnmatch.fnmatchcase(name, q_pattern):
                qs.append((name, mod))
            elif k_pattern is not None and fnmatch.fnmatchcase(name, k_pattern):
                ks.append((name, mod))
            elif qkv_pattern is not None and fnmatch.fnmatchcase(name, qkv_pattern):
                fused.append((i, name.rpartition(".")[0], name, mod))
    if len(qs) != len(ks):
        raise ValueError(
            f"{who}: q_pattern {q_pattern!r} matched {len(qs)} projections "
            f"({[n for n, _ in qs][:4]}) but k_pattern {k_pattern!r} matched {len(ks)} "
            f"({[n for n, _ in ks][:4]}); the patterns must pick one query and one key projection per layer")
    order = {name: i for i, name in enumerate(modules)}
    for (qn, q), (kn, k) in zip(qs, ks):
        parent = qn.rpartition(".")[0]
        separate.append((order[qn], parent, qn, q, kn, k))

    def heads_of(parent: str, label: str, q_features: int) -> tuple[int, Optional[int], Optional[int]]:
        heads, kv, hs = _head_info(model, parent)
        if n_head:
            heads = n_head
        elif heads is None and hs and q_features % hs == 0:
            heads = q_features // hs
        if heads is None:
            raise ValueError(f"{who}: cannot tell the number of heads of {label!r} (no attribute "
                             f"{'/'.join(HEAD_ATTRS + ('head_dim',))} on it, its parents or their config); "
                             "set the detector's `n_head` param")
        return heads, kv, hs

    for i, parent, qn, q, kn, k in separate:
        nq, nk = _out_features(q), _out_features(k)
        heads, _, _ = heads_of(parent, parent or qn, nq)
        if nq % heads:
            raise ValueError(f"{who}: n_head {heads} does not divide {qn}'s {nq} output features")
        hs = nq // heads
        if nk % hs or heads % (nk // hs):
            raise ValueError(f"{who}: key projection {kn} has {nk} output features, expected a "
                             f"multiple of the head size {hs} that divides {heads} heads (query {qn}: {nq})")
        site = AttentionSite(parent or qn, heads, nk // hs, hs, q=q, k=k, q_range=(0, nq), k_range=(0, nk))
        _attach_value_and_output(model, site, parent, qn.rpartition(".")[2])
        found.append((i, site))
    for i, parent, name, mod in fused:
        out = _out_features(mod)
        heads, kv, hs = heads_of(parent, parent or name, out)
        kv = kv or heads
        if hs is None:
            hs = out // (heads + 2 * kv) if out % (heads + 2 * kv) == 0 else 0
        if not hs or (heads + 2 * kv) * hs != out or heads % kv:
            raise ValueError(f"{who}: fused projection {name} has {out} output features; expected "
                             f"(n_head + 2 n_kv_head) * head size with n_head {heads}, n_kv_head {kv}"
                             f"{'' if not hs else f', head size {hs}'} (a [q | k | v] layout); set `n_head`, "
                             "or q_pattern / k_pattern for separate projections")
        site = AttentionSite(parent or name, heads, kv, hs, q=mod, k=mod, q_range=(0, heads * hs),
                             k_range=(heads * hs, (heads + kv) * hs), v=mod,
                             v_range=((heads + kv) * hs, (heads + 2 * kv) * hs))
        _attach_value_and_output(model, site, parent, None)
        found.append((i, site))
    if not found:
        if auto:
            what = (f"no sibling query/key projections named {'/'.join(a + '+' + b for a, b in QK_PAIRS)}, "
                    f"no fused projection named {'/'.join(FUSED_NAMES)}")
        else:
            what = ((f"q_pattern {q_pattern!r} / k_pattern {k_pattern!r} matched no projection"
                     if q_pattern is not None else "")
                    + (", " if q_pattern is not None and qkv_pattern is not None else "")
                    + (f"qkv_pattern {qkv_pattern!r} matched no projection" if qkv_pattern is not None else ""))
        raise ValueError(f"{who}: no attention layer found: {what}, and no nn.MultiheadAttention matched "
                         f"{mha_pattern!r}. The model's projections (nn.Linear / Conv1D, in->out features): "
                         f"{_describe(model)}. Name them with q_pattern and k_pattern (separate query and key "
                         "projections) or qkv_pattern (one fused [q|k|v] projection)")
    sites = [s for _, s in sorted(found, key=lambda t: t[0])]
    for s in sites:
        if s.head_dim < 2:
            raise ValueError(f"{who}: layer {s.name!r} has head size {s.head_dim}; the normalized spectral "
                             "entropy needs at least 2 features per head")
    return sites


def _attach_value_and_output(model: nn.Module, site: AttentionSite, parent: str, q_name: Optional[str]) -> None:
    """Set ``site.module``, and ``site.v`` / ``site.out`` where siblings of the query projection
    are named as :data:`V_NAMES` / :data:`OUT_NAMES` and have the right number of features."""
    try:
        layer = model.get_submodule(parent) if parent else model
    except AttributeError:
        return
    site.module = layer
    children = dict(layer.named_children())
    if site.v is None:
        names = V_NAMES
        pair = next((j for j, (a, _) in enumerate(QK_PAIRS) if a == q_name), None)
        if pair is not None:
            names = (V_NAMES[pair],) + tuple(n for n in V_NAMES if n != V_NAMES[pair])
        nv = site.n_kv_head * site.head_dim
        v = next((children[n] for n in names if is_projection(children.get(n)) and _out_features(children[n]) == nv
                  and children[n] is not site.q and children[n] is not site.k), None)
        if v is not None:
            site.v, site.v_range = v, (0, nv)
    no = site.n_head * site.head_dim
    site.out = next((children[n] for n in OUT_NAMES if is_projection(children.get(n))
                     and _in_features(children[n]) == no and children[n] is not site.q), None)


_ROPE_CLASS = re.compile(r"rotary|(^|[^a-z])rope([^a-z]|$)|^rope|rope(emb|embedding|scaling)")
_ROPE_BUFFERS = ("inv_freq", "freqs_cis", "cos_cached", "sin_cached", "cos", "sin")
_ROPE_CONFIG = ("rope_theta", "rope_scaling", "rope_parameters", "rope_base", "rotary_dim", "rotary_pct",
                "rotary_percentage", "rotary_emb_base")


def position_rotation(model: nn.Module) -> Optional[str]:
    """Why the model's attention logits are not ``q . k`` of its projections' outputs (rotary or
    ALiBi position encodings), or ``None``: a module class named ``*Rotary*`` / ``RoPE*``, a
    buffer ``inv_freq``, ``freqs_cis``, ``cos`` / ``sin`` (``_cached``), or a config with a
    rotary value (``rope_theta``, ``rope_base``, ``rotary_percentage``, ...),
    ``position_embedding_type`` rotary/alibi, a true ``alibi`` or ``attn_config["alibi"]``."""
    for name, mod in model.named_modules():
        if _ROPE_CLASS.search(type(mod).__name__.lower()):
            return f"rotary position embeddings ({type(mod).__name__} {name!r})"
        for b, _ in mod.named_buffers(recurse=False):
            if b in _ROPE_BUFFERS:
                return f"rotary position embeddings (buffer {name + '.' if name else ''}{b})"
        cfg = getattr(mod, "config", None)
        if cfg is not None:
            for attr in _ROPE_CONFIG:
                if getattr(cfg, attr, None) is not None:
                    return f"rotary position embeddings (config.{attr})"
            pet = getattr(cfg, "position_embedding_type", None)
            if isinstance(pet, str) and pet.lower() in ("rotary", "alibi"):
                return f"{pet} position encodings (config.position_embedding_type)"
            attn_cfg = getattr(cfg, "attn_config", None)
            if getattr(cfg, "alibi", False) is True or (isinstance(attn_cfg, dict) and attn_cfg.get("alibi")):
                return "ALiBi position encodings (config alibi)"
    return None


def layer_scale(site: AttentionSite) -> Optional[float]:
    """The softmax scale the layer module declares (a float attribute of :data:`SCALE_ATTRS`,
    e.g. HF GPT-2's ``scaling``, which holds its inverse-layer-index scaling), else ``None``."""
    layer = site.module if site.mha is None else None
    for attr in SCALE_ATTRS:
        val = getattr(layer, attr, None) if layer is not None else None
        if isinstance(val, float) and not isinstance(val, bool) and val > 0:
            return val
    return None


def kernel_check_obstacles(model: nn.Module, site: AttentionSite, rotation: Optional[str] = None) -> list[str]:
    """What keeps ``site``'s attention output from being recomputed exactly as
    ``softmax(scale * q k^T + mask) v`` from its projections' outputs (empty: nothing found):
    no value or output projection found; rotary or ALiBi position encodings in the model
    (``rotation``: :func:`position_rotation`'s answer, computed once per model); QK-norm children
    (:data:`QK_NORM_NAMES`, ``nn.Identity`` ones aside); attention dropout above 0 (an
    ``nn.Dropout`` child whose name contains ``drop`` and ``att``, or an attribute of
    :data:`ATTN_DROPOUT_ATTRS`, float or ``nn.Dropout``); for ``nn.MultiheadAttention``,
    ``dropout``, ``bias_k`` / ``bias_v`` or ``add_zero_attn``. What it cannot see (a scale,
    mask or layout of the model's own) the detector's first evaluation catches instead."""
    why = []
    layer = site.module
    if site.mha is not None:
        m = site.mha
        if m.dropout > 0:
            why.append(f"attention dropout {m.dropout}")
        if m.bias_k is not None or m.add_zero_attn:
            why.append("bias_k / bias_v / add_zero_attn")
    else:
        if site.v is None:
            why.append(f"no value projection found (a sibling named {'/'.join(V_NAMES)})")
        if site.out is None:
            why.append(f"no output projection found (a sibling named {'/'.join(OUT_NAMES)} with "
                       f"{site.n_head * site.head_dim} input features)")
        if layer is not None:
            norms = [n for n, m in layer.named_children() if n in QK_NORM_NAMES and not isinstance(m, nn.Identity)]
            if norms:
                why.append(f"QK-norm ({', '.join(norms)})")
            drops = [(a, getattr(layer, a, None)) for a in ATTN_DROPOUT_ATTRS]
            drops += [(n, m) for n, m in layer.named_children()
                      if isinstance(m, nn.Dropout) and "drop" in n.lower() and "att" in n.lower()]
            for attr, val in drops:
                if isinstance(val, float) and val > 0:
                    why.append(f"attention dropout ({attr} = {val})")
                    break
                if isinstance(val, nn.Dropout) and val.p > 0:
                    why.append(f"attention dropout ({attr}: p = {val.p})")
                    break
    if rotation is None:
        rotation = position_rotation(model)
    if rotation:
        why.append(rotation)
    return why


def find_output_head(model: nn.Module, who: str = "detector") -> str:
    """The name of the module that outputs the vocabulary logits (module docstring): HF
    ``get_output_embeddings()``, else an ``nn.Linear`` tied to an input embedding, else the last
    ``nn.Linear`` onto a vocabulary size.

    :raises ValueError: no model, or no such module (the message lists the last projections
        and the vocabulary sizes looked for).
    """
    if model is None:
        raise ValueError(f"{who} needs the model: build the guard with Guard(optimizer, policy, model=model)")
    names = {id(m): n for n, m in model.named_modules()}
    get = getattr(model, "get_output_embeddings", None)
    if callable(get):
        try:
            head = get()
        except (NotImplementedError, AttributeError):
            head = None
        if isinstance(head, nn.Module) and id(head) in names:
            return names[id(head)]
    embeddings = [m for m in model.modules() if isinstance(m, nn.Embedding)]
    tied = {id(m.weight) for m in embeddings}
    vocab = {m.num_embeddings for m in embeddings}
    size = getattr(getattr(model, "config", None), "vocab_size", None)
    if isinstance(size, int):
        vocab.add(size)
    last = None
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear) and id(mod.weight) in tied:
            return name            # tied to an input embedding: the output head for certain
        if isinstance(mod, nn.Linear) and mod.out_features in vocab:
            last = name
    if last is None:
        linear = [f"{n} ({m.in_features}->{m.out_features})" for n, m in model.named_modules()
                  if isinstance(m, nn.Linear)][-6:]
        raise ValueError(f"{who}: no output head found: no nn.Linear onto a vocabulary size "
                         f"({sorted(vocab) or 'no nn.Embedding, no config.vocab_size'}); the last nn.Linear "
                         f"modules are {linear or 'none'}; name the head with params.module")
    return last
