"""``attention_logits``: the largest pre-softmax attention logit and the lowest attention
entropy of a head and of a layer (the mean over its heads), from the queries and keys of the
latest training forward pass.

For layer ``l``, head ``h``, query position ``i`` and key position ``j`` (``j <= i`` when
``causal``), with ``q``, ``k`` the head's projected queries and keys::

    z_{ij}   = scale * q_i . k_j                      # scale: see Params
    a_{ij}   = softmax_j(z_{ij})
    E_{l,h}  = mean over sequences b and queries i of  -sum_j a_{ij} ln a_{ij}     # nats

Signals (0-dim tensors):

- ``max_logit``: ``max z`` over layers, heads, sequences, queries and (unmasked) keys.
  Uncontrolled growth of this logit precedes loss divergence (Dehghani et al. 2302.05442;
  Wortsman et al. 2309.14322, "attention logit growth").
- ``min_entropy``: ``min_{l,h} E_{l,h}`` in nats. Entropy collapse precedes instability
  (Zhai et al. 2303.06296). With ``causal``, query ``i`` sees ``i + 1`` keys, so the largest
  possible value is the mean of ``ln(i + 1)``, not ``ln T``.
- ``min_layer_entropy``: ``min_l mean_h E_{l,h}`` in nats: the lowest over layers of the mean
  entropy of a layer's heads (Zhai et al. 2303.06296 track entropy per head and averaged over
  heads). One head can be sharp by design (a previous-token head is) while its layer's other
  heads still spread their attention; a collapse brings the layer's mean down.
- ``worst_layer`` / ``worst_head``: where ``min_entropy`` is attained (layer index in module
  order, from 0).

Capture and cost: forward hooks on the query/key projections (``nn.Linear`` or HF ``Conv1D``;
outputs ``(B, T, n_head * hs)``; one hook on a fused ``[q | k | v]`` projection, whose query
and key features are sliced out) or on ``nn.MultiheadAttention`` (inputs ``query``, ``key``; projected
here with ``in_proj_weight``), found as in ``detectors/_attention.py``. On every training-mode
forward of a due step a hook copies a bounded slice, the first ``max_batch`` sequences and the
last ``max_queries`` query positions (all key positions), so the cost is one small copy per
projection and the memory held is ``2 * layers * max_batch * T * d`` numbers. The logits are
formed only when the detector is due (``every:``), from the latest capture, at a cost of
``max_batch * n_head * max_queries * T * (2 hs + 8)`` flops per layer. Eval-mode forwards are not
captured, and neither are the forwards of steps the detector is not due on: after each step
the guard's call to :meth:`after_step` arms the hooks only when the next step is due
(``every:``, set by the guard; without a guard every training forward is captured). With
gradient accumulation the last micro-batch is the one measured. A due step with
no capture since the previous evaluation emits nothing (the signals keep their values).

Masks: ``causal`` (default true) masks ``j > i``. For ``nn.MultiheadAttention`` an ``is_causal``
argument or a 2-D ``attn_mask`` (bool: ``True`` = not allowed; float: added to the logits) given
to the forward is applied too; other masks (``key_padding_mask``, 3-D) are ignored.

Rotary embeddings and QK-norm applied after the projections (Llama, Mistral, torchtitan) are
not in the measured logits: they are those of the projected, un-rotated queries and keys
(``detectors/_attention.py``).

**Kernel check** (``kernel_check: true``; off by default): one more signal,

- ``kernel_error``: ``max_l ||o_l - o*_l||_F / ||o*_l||_F``, where ``o_l`` is what the layer's
  attention kernel returned (the input of its output projection, the merged heads ``(B, Tq,
  n_head * hs)``; for ``nn.MultiheadAttention`` the module's output) and ``o*_l`` the same
  slice recomputed here in float32 as ``softmax(z) v`` from the captured queries, keys and
  values (then ``out_proj`` for MHA). Dimensionless; about 1e-7 for a float32 kernel, about 1e-3
  for bfloat16 SDPA on the CPU (``benchmarks/kernel_error_floor.py``); NaN when no layer is
  checked.

It watches the attention kernel itself, not the learning dynamics: a low-precision attention
kernel, a wrong softmax scale or a faulty fused kernel (the faults that arXiv 2606.28116
injects) change ``o`` but not the projections, so the recomputation shows them from the first
faulted forward. Layers whose output cannot be recomputed from their projections are skipped,
with a warning at :meth:`setup` naming them and why (:func:`kernel_check_obstacles`): rotary or
ALiBi position encodings (Llama, Mistral, Qwen, torchtitan), QK-norm, attention dropout above
0, no value or output projection found. What that static look cannot see (a scale, mask,
position bias or layout of the model's own) shows at the layer's first evaluation: a layer
whose first ``kernel_error`` is above :data:`FIRST_EVALUATION_TOLERANCE` (0.1) is dropped from
the check, with a warning (at once on the CPU; on an accelerator at :meth:`close`, as reading the
value would make the step wait), so a kernel faulty from step 0 is not caught. A kernel output that
is not finite while the recomputation is counts as ``inf``. Masks as above; a padding mask the
model applies inside its attention is not seen, so enable the check on unpadded batches only.
The recomputation runs in float32 (TF32 where ``torch.backends.cuda.matmul.allow_tf32`` is set:
about 1e-3, still well under a threshold of 0.02). Cost when due: one more ``(B, nh, Tq, T) x
(B, nh, T, hs)`` product per layer, and the hooks copy the values and the output projection's
input (``4 * layers * max_batch * T * d`` numbers held in all, with the queries and keys).

Params: ``q_pattern``, ``k_pattern``, ``qkv_pattern``, ``mha_pattern``, ``n_head`` (layer
discovery and its overrides, as ``spectral_entropy``),
``causal`` (default true), ``scale`` (default: the layer module's own float ``scaling``,
``softmax_scale`` or ``scale`` attribute, as HF GPT-2 keeps its inverse-layer-index scaling,
else ``1/sqrt(hs)``), ``max_batch`` (default 4),
``max_queries`` (default 256), ``kernel_check`` (default false). No warm-up: the signals are
meaningful from the first step.

:raises ValueError: (in :meth:`setup`) as ``spectral_entropy``'s layer discovery;
    (in :meth:`compute`) a projection output that is not ``(B, T, features)``.
"""

from __future__ import annotations

import math
import warnings
from typing import Optional

import torch

from lbw_policy.base import Detector

from ._attention import (SITE_PARAMS_DEPENDENCIES, SITE_PARAMS_SCHEMA, find_attention_sites, kernel_check_obstacles,
                         layer_scale, position_rotation, repeat_heads)

#: A layer whose ``kernel_error`` at its first evaluation is above this is dropped from the
#: kernel check (with a warning): its kernel differs from ``softmax(z) v`` by design (a scale,
#: mask, position bias or layout the discovery did not see), not by a fault.
FIRST_EVALUATION_TOLERANCE = 0.1

__all__ = ["AttentionLogits", "logit_stats", "masked_logits"]


def masked_logits(q: torch.Tensor, k: torch.Tensor, scale: float, causal: bool, q_offset: int,
                  mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``scale * q k^T`` with the causal and the additive mask applied (``-inf`` = not allowed).

    :param q: ``(B, nh, Tq, hs)`` queries (the last ``Tq`` positions of the sequence).
    :param k: ``(B, nh, T, hs)`` keys.
    :param q_offset: position of ``q``'s first query in the sequence (``T - Tq``).
    :param mask: optional ``(Tq, T)`` float mask added to the logits.
    :return: ``(B, nh, Tq, T)`` logits.
    """
    z = (q @ k.transpose(-1, -2)) * scale                       # (B, nh, Tq, T)
    tq, t = z.shape[-2], z.shape[-1]
    add = torch.zeros(tq, t, dtype=z.dtype, device=z.device)
    if causal:
        i = torch.arange(tq, device=z.device).unsqueeze(1) + q_offset
        j = torch.arange(t, device=z.device).unsqueeze(0)
        add = add.masked_fill(j > i, -math.inf)
    if mask is not None:
        add = add + mask.to(z.dtype)
    return z + add


def _stats(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    mx = z.amax()
    logp = torch.log_softmax(z, dim=-1)
    # 0 ln 0 = 0: a masked key has logp = -inf and p = 0; a NaN logit stays NaN (NaN * 0).
    ent = -(logp.exp() * logp.nan_to_num(neginf=0.0)).sum(-1)   # (B, nh, Tq)
    return mx, ent.mean(dim=(0, 2))


def logit_stats(q: torch.Tensor, k: torch.Tensor, scale: float, causal: bool, q_offset: int,
                mask: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Max logit and mean row entropy per head.

    :param q: ``(B, nh, Tq, hs)`` queries (the last ``Tq`` positions of the sequence).
    :param k: ``(B, nh, T, hs)`` keys.
    :param q_offset: position of ``q``'s first query in the sequence (``T - Tq``).
    :param mask: optional ``(Tq, T)`` float mask added to the logits (``-inf`` = not allowed).
    :return: ``(max_logit, entropy)``: 0-dim, and ``(nh,)`` in nats.
    """
    return _stats(masked_logits(q, k, scale, causal, q_offset, mask))


class AttentionLogits(Detector):
    name = "attention_logits"
    signals = ("max_logit", "min_entropy", "min_layer_entropy", "worst_layer", "worst_head")
    reductions = {"max_logit": "max", "min_entropy": "min", "min_layer_entropy": "min",
                  "worst_layer": "same", "worst_head": "same",
                  "kernel_error": "max"}
    optional_signals = {"kernel_error": "kernel_check: true"}
    params_schema = {
        "type": "object",
        "additionalProperties": False,
        "dependentRequired": SITE_PARAMS_DEPENDENCIES,
        "properties": {
            **SITE_PARAMS_SCHEMA,
            "causal": {"type": "boolean", "description": "mask keys after the query; default true"},
            "scale": {"type": "number", "exclusiveMinimum": 0,
                      "description": "logit scale; default 1/sqrt(head size)"},
            "max_batch": {"type": "integer", "minimum": 1,
                          "description": "sequences captured per forward; default 4"},
            "max_queries": {"type": "integer", "minimum": 1,
                            "description": "query positions captured (the last ones); default 256"},
            "kernel_check": {"type": "boolean",
                             "description": "also emit kernel_error: the attention output against a float32 "
                                            "recomputation from the captured q, k, v; default false"},
        },
    }

    @classmethod
    def signals_for(cls, params) -> tuple[str, ...]:
        return cls.signals + (("kernel_error",) if params.get("kernel_check") else ())

    def __init__(self, q_pattern: Optional[str] = None, k_pattern: Optional[str] = None,
                 mha_pattern: str = "*", n_head: Optional[int] = None, causal: bool = True,
                 scale: Optional[float] = None, max_batch: int = 4, max_queries: int = 256,
                 qkv_pattern: Optional[str] = None, kernel_check: bool = False) -> None:
        super().__init__(q_pattern=q_pattern, k_pattern=k_pattern, mha_pattern=mha_pattern, n_head=n_head,
                         causal=causal, scale=scale, max_batch=max_batch, max_queries=max_queries,
                         qkv_pattern=qkv_pattern, kernel_check=kernel_check)
        self.kernel_check = bool(kernel_check)
        self._checked: list = []   # per site: True when its output is recomputed (kernel_check)
        self._first: list = []     # per site: its first kernel evaluation is still to come
        self._keep: list = []      # per site: 0-dim bool, false when dropped at its first evaluation
        self._first_error: list = []
        self._scales: list = []    # per site: the softmax scale used
        self._unmeasured_warned = False
        self.causal = bool(causal)
        self.scale = scale
        self.max_batch = int(max_batch)
        self.max_queries = int(max_queries)
        self.sites: list = []
        self._handles: list = []
        self._cap: list = []       # per site: {"q": ..., "k": ..., "mask": ..., "causal": ...}
        self._armed = True         # capture the next training forward (its step is due)

    def setup(self, model, optimizer, every: int = 1) -> None:
        self.every = int(every)
        p = self.params
        self.sites = find_attention_sites(model, p["q_pattern"], p["k_pattern"], p["mha_pattern"] or None,
                                          p["n_head"], who="attention_logits", qkv_pattern=p["qkv_pattern"])
        self._cap = [dict() for _ in self.sites]
        self._checked = [False] * len(self.sites)
        self._first = [True] * len(self.sites)
        self._keep = [None] * len(self.sites)          # per site: 0-dim bool, set at its first evaluation
        self._first_error = [None] * len(self.sites)   # per site: that evaluation's error, until warned
        self._scales = [self.scale if self.scale is not None else (layer_scale(s) or 1.0 / math.sqrt(s.head_dim))
                        for s in self.sites]
        if self.kernel_check:
            skipped = []
            rotation = position_rotation(model) or ""
            for i, site in enumerate(self.sites):
                why = kernel_check_obstacles(model, site, rotation)
                self._checked[i] = not why
                if why:
                    skipped.append(f"{site.name!r} ({'; '.join(why)})")
            if skipped:
                warnings.warn(f"attention_logits: kernel_check skips {len(skipped)} of {len(self.sites)} attention "
                              f"layers, whose output cannot be recomputed from their projections: "
                              f"{', '.join(skipped[:4])}{' ...' if len(skipped) > 4 else ''}"
                              + ("; kernel_error will be NaN" if not any(self._checked) else ""), stacklevel=2)
        for i, site in enumerate(self.sites):
            check = self._checked[i]
            if site.mha is not None:
                self._handles.append(site.mha.register_forward_hook(self._mha_hook(i), with_kwargs=True))
                continue
            if site.fused:   # one [q | k | v] projection: one hook takes every slice
                self._handles.append(site.q.register_forward_hook(self._linear_hook(i, "qkv" if check else "qk")))
            else:
                self._handles.append(site.q.register_forward_hook(self._linear_hook(i, "q")))
                self._handles.append(site.k.register_forward_hook(self._linear_hook(i, "k")))
                if check:
                    self._handles.append(site.v.register_forward_hook(self._linear_hook(i, "v")))
            if check:
                self._handles.append(site.out.register_forward_pre_hook(self._output_hook(i)))

    # -- capture (runs inside the model's forward: cheap, no host sync) ----------------------
    def _slice(self, x: torch.Tensor, queries: bool) -> torch.Tensor:
        x = x.detach()[: self.max_batch]
        if queries:
            x = x[:, -self.max_queries:]
        return x.clone()

    def _linear_hook(self, i: int, which: str):
        """Hook of a projection that outputs the features ``which`` (``"q"``, ``"k"``, ``"v"``,
        ``"qk"`` or ``"qkv"``: one letter per kind) of layer ``i``; each kind is cut out of the
        output by :meth:`AttentionSite.select`."""
        site = self.sites[i]

        def hook(module, args, output):
            if not self._armed or not module.training or not torch.is_grad_enabled():
                return
            if output.dim() != 3:
                self._cap[i]["error"] = (f"attention_logits: {which}-projection of layer {site.name!r} "
                                         f"returned shape {tuple(output.shape)}, expected (B, T, features)")
                return
            for w in which:
                self._cap[i][w] = self._slice(site.select(w, output), w == "q")
            self._cap[i]["T"] = output.shape[1]
        return hook

    def _output_hook(self, i: int):
        """Pre-hook of layer ``i``'s output projection: its input is the attention's output."""
        def hook(module, args):
            if not self._armed or not module.training or not torch.is_grad_enabled() or not args:
                return
            x = args[0]
            if isinstance(x, torch.Tensor) and x.dim() == 3:
                self._cap[i]["o"] = self._slice(x, True)
        return hook

    def _mha_hook(self, i: int):
        def hook(module, args, kwargs, output):
            if not self._armed or not module.training or not torch.is_grad_enabled():
                return
            query = args[0] if len(args) > 0 else kwargs["query"]
            key = args[1] if len(args) > 1 else kwargs["key"]
            if not module.batch_first:
                query, key = query.transpose(0, 1), key.transpose(0, 1)  # (B, T, E)
            if query.dim() != 3:
                self._cap[i]["error"] = (f"attention_logits: nn.MultiheadAttention {self.sites[i].name!r} got an "
                                         f"unbatched query of shape {tuple(query.shape)}; only batched input is measured")
                return
            cap = self._cap[i]
            cap["q"], cap["k"], cap["T"] = self._slice(query, True), self._slice(key, False), key.shape[1]
            mask = kwargs.get("attn_mask", args[5] if len(args) > 5 else None)
            cap["mask"] = mask.detach().clone() if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None
            cap["is_causal"] = bool(kwargs.get("is_causal", args[7] if len(args) > 7 else False))
            if self._checked[i]:
                value = args[2] if len(args) > 2 else kwargs["value"]
                padding = kwargs.get("key_padding_mask", args[3] if len(args) > 3 else None)
                bad_mask = isinstance(mask, torch.Tensor) and mask.dim() != 2
                out = output[0] if isinstance(output, tuple) else output
                if padding is None and not bad_mask:
                    if not module.batch_first:
                        value, out = value.transpose(0, 1), out.transpose(0, 1)
                    cap["v"], cap["o"] = self._slice(value, False), self._slice(out, True)
                else:   # a mask the recomputation cannot apply: no check of this forward
                    cap.pop("v", None)
                    cap.pop("o", None)
        return hook

    # -- evaluation ------------------------------------------------------------------------
    @torch.no_grad()
    def compute(self, telemetry) -> dict:
        maxes, ents, errors = [], [], []
        for i, (site, cap) in enumerate(zip(self.sites, self._cap)):
            if "error" in cap:
                raise ValueError(cap.pop("error"))
            if "q" not in cap or "k" not in cap:
                return {}  # no training forward captured since the last evaluation
            q, k = cap["q"], cap["k"]
            mask = None
            causal = self.causal
            if site.mha is not None:
                wq, wk = site.weights()
                bq, bk = site.biases()
                q = torch.nn.functional.linear(q.to(wq.dtype), wq, bq)
                k = torch.nn.functional.linear(k.to(wk.dtype), wk, bk)
                causal = causal or cap.get("is_causal", False)
                if cap.get("mask") is not None:
                    m = cap["mask"][-q.shape[1]:]
                    mask = torch.zeros(m.shape, dtype=torch.float32, device=m.device).masked_fill(m, -math.inf) \
                        if m.dtype == torch.bool else m
            b, tq, t = q.shape[0], q.shape[1], k.shape[1]
            nh, nkv, hs = site.n_head, site.n_kv_head, site.head_dim
            qh = q.float().reshape(b, tq, nh, hs).transpose(1, 2)     # (B, nh, Tq, hs)
            kh = k.float().reshape(b, t, nkv, hs).transpose(1, 2)     # (B, nkv, T, hs)
            if nkv != nh:
                kh = repeat_heads(kh, nh // nkv, dim=1)                # (B, nh, T, hs)
            z = masked_logits(qh, kh, self._scales[i], causal, t - tq, mask)
            mx, ent = _stats(z)
            maxes.append(mx)
            ents.append(ent)
            if self._checked[i]:
                if "v" in cap and "o" in cap:
                    err = self._kernel_error(site, z, cap["v"], cap["o"])
                    if self._first[i]:
                        self._first[i] = False
                        self._first_evaluation(i, err)
                    # a layer dropped at its first evaluation counts as -inf (below any other)
                    errors.append(torch.where(self._keep[i], err, torch.full_like(err, -math.inf)))
                elif not self._unmeasured_warned:
                    self._unmeasured_warned = True
                    warnings.warn(f"attention_logits: kernel_check captured no values or attention output of "
                                  f"layer {site.name!r} in a forward that had queries and keys (an output "
                                  "projection fed other than (B, T, features), or an nn.MultiheadAttention "
                                  "called with key_padding_mask or a 3-D mask): that layer is not checked "
                                  "in such forwards", stacklevel=2)
        for cap in self._cap:   # measured: the next evaluation needs a new forward
            for key in ("q", "k", "v", "o"):
                cap.pop(key, None)
        max_logit = torch.stack(maxes).max().to(torch.float64)
        per_layer = [e.min() for e in ents]
        heads = [e.argmin() for e in ents]
        lay = torch.stack(per_layer)
        worst = lay.argmin()
        out = {"max_logit": max_logit, "min_entropy": lay.min().to(torch.float64),
               "min_layer_entropy": torch.stack([e.mean() for e in ents]).min().to(torch.float64),
               "worst_layer": worst.to(torch.float64),
               "worst_head": torch.take(torch.stack(heads), worst).to(torch.float64)}  # take: no sync
        if self.kernel_check:
            if errors:
                worst_err = torch.stack(errors).max()
                worst_err = torch.where(torch.isneginf(worst_err), torch.full_like(worst_err, math.nan), worst_err)
                out["kernel_error"] = worst_err.to(torch.float64)
            else:
                out["kernel_error"] = torch.tensor(math.nan, dtype=torch.float64)
        return out

    def _first_evaluation(self, i: int, err: torch.Tensor) -> None:
        """Layer ``i``'s first ``kernel_error``: above :data:`FIRST_EVALUATION_TOLERANCE` (and
        finite) the layer's kernel is not ``softmax(z) v`` by design, so the layer is dropped from
        the check (``self._keep[i]``, a 0-dim bool on the error's device: no host read). The
        warning reads the value: at once on the CPU; on an accelerator at :meth:`close`, so the
        step never waits for it."""
        self._keep[i] = ~(torch.isfinite(err) & (err > FIRST_EVALUATION_TOLERANCE))
        self._first_error[i] = err
        if err.device.type == "cpu":
            self._warn_dropped(stacklevel=4)

    def _warn_dropped(self, stacklevel: int = 2) -> None:
        """Warn once for each layer dropped at its first evaluation (host reads)."""
        for i, (keep, err) in enumerate(zip(self._keep, self._first_error)):
            if err is None or bool(keep):
                continue
            self._first_error[i] = None
            warnings.warn(f"attention_logits: kernel_check drops layer {self.sites[i].name!r}: at its first "
                          f"evaluation its attention output differs from softmax(scale q k^T + mask) v by "
                          f"{float(err):.3g} (relative), more than {FIRST_EVALUATION_TOLERANCE}, so the model "
                          "computes attention differently (a softmax scale, mask, position bias or layout of its "
                          "own; set `scale` or `causal` if they differ from the defaults)", stacklevel=stacklevel)

    @staticmethod
    def _kernel_error(site, z: torch.Tensor, v: torch.Tensor, o: torch.Tensor) -> torch.Tensor:
        """``||o - o*|| / ||o*||`` of one layer (module docstring): ``z`` ``(B, nh, Tq, T)``
        masked logits, ``v`` ``(B, T, d_v)`` captured values (MHA: the value input), ``o``
        ``(B, Tq, n_head * hs)`` the kernel's output (MHA: the module's output). 0-dim float32."""
        b, nh, tq, t = z.shape
        nkv, hs = site.n_kv_head, site.head_dim
        if site.mha is not None:
            m = site.mha
            e = m.embed_dim
            wv = m.in_proj_weight.detach()[2 * e:] if m.in_proj_weight is not None else m.v_proj_weight.detach()
            bv = m.in_proj_bias.detach()[2 * e:] if m.in_proj_bias is not None else None
            v = torch.nn.functional.linear(v.to(wv.dtype), wv, bv)
        vh = v.float().reshape(b, t, nkv, hs).transpose(1, 2)        # (B, nkv, T, hs)
        if nkv != nh:
            vh = repeat_heads(vh, nh // nkv, dim=1)
        ref = (torch.softmax(z, dim=-1) @ vh).transpose(1, 2).reshape(b, tq, nh * hs)
        if site.mha is not None:
            w, bias = site.mha.out_proj.weight.detach(), site.mha.out_proj.bias
            ref = torch.nn.functional.linear(ref, w.float(), None if bias is None else bias.detach().float())
        diff = torch.linalg.vector_norm(o.float() - ref)
        err = diff / torch.linalg.vector_norm(ref).clamp_min(torch.finfo(torch.float32).tiny)
        # a kernel that overflowed (inf or NaN out of finite inputs) is the worst error, not NaN
        broken = ~torch.isfinite(o).all() & torch.isfinite(ref).all()
        return torch.where(broken, torch.full_like(err, math.inf), err)

    def after_step(self, telemetry, stepped: bool) -> None:
        # Arm the hooks for the next step's forwards only if that step is due.
        self._armed = (telemetry.step + 1) % self.every == 0

    def load_state_dict(self, state) -> None:
        self._armed = True   # the guard's step may have moved: capture until the next after_step

    def close(self) -> None:
        if self.kernel_check and self._keep:
            self._warn_dropped()     # layers dropped on an accelerator: warned here, not mid-step
        for h in self._handles:
            h.remove()
        self._handles = []
        self._cap = [dict() for _ in self.sites]
