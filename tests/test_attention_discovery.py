"""Attention layers and output heads found without configuration (detectors/_attention.py), in the
model families people train: HF GPT-2 (fused Conv1D ``c_attn``), HF Llama / Mistral (grouped-query
``q_proj`` / ``k_proj``), ``nn.MultiheadAttention``, nanoGPT (fused ``nn.Linear`` ``c_attn``),
torchtitan (``wq`` / ``wk``, ``n_kv_heads``), an independently written GPT (``q`` / ``k``, head
``head``); each built from a config, no downloads. The shipped early-warning policy starts on every
one of them and emits finite signals."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lbw_policy.adapters.guard import Guard
from lbw_policy.detectors._attention import find_attention_sites, find_output_head
from lbw_policy.detectors.attention_logits import AttentionLogits
from lbw_policy.detectors.logit_divergence import LogitDivergence
from lbw_policy.detectors.spectral_entropy import SpectralEntropy
from lbw_policy.telemetry import Telemetry

V, T, B = 37, 8, 2


def _tel(step=0):
    return Telemetry(step, torch.tensor(1.0), None, None)


# ----------------------------------------------------------------- hand-written model families

class NanoAttention(nn.Module):
    """nanoGPT's CausalSelfAttention: one fused nn.Linear c_attn -> [q | k | v]."""

    def __init__(self, d=32, n_head=4):
        super().__init__()
        self.c_attn = nn.Linear(d, 3 * d)
        self.c_proj = nn.Linear(d, d)
        self.n_head, self.n_embd = n_head, d

    def forward(self, x):
        b, t, c = x.shape
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        q, k, v = (z.view(b, t, self.n_head, c // self.n_head).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).reshape(b, t, c))


class TitanAttention(nn.Module):
    """torchtitan's Attention: wq / wk / wv / wo, n_heads, n_kv_heads (grouped-query)."""

    def __init__(self, d=32, n_heads=4, n_kv_heads=2):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, d // n_heads
        self.wq = nn.Linear(d, n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(d, n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(d, n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(n_heads * self.head_dim, d, bias=False)

    def forward(self, x):
        b, t, _ = x.shape
        q = self.wq(x).view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.wk(x).view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.wv(x).view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)
        rep = self.n_heads // self.n_kv_heads
        k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.wo(y.transpose(1, 2).reshape(b, t, -1))


class IndepBlock(nn.Module):
    """An independently written block (issue 16): projections ``q``, ``k``, ``v``, ``o`` directly
    on the block, heads only as ``head_dim``."""

    def __init__(self, d=32, head_dim=8):
        super().__init__()
        self.head_dim = head_dim
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.ff = nn.Linear(d, d)

    def forward(self, x):
        b, t, c = x.shape
        q, k, v = (p(x).view(b, t, -1, self.head_dim).transpose(1, 2) for p in (self.q, self.k, self.v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, c)
        x = x + self.o(y)
        return x + self.ff(torch.relu(x))


class MHABlock(nn.Module):
    def __init__(self, d=32, heads=4):
        super().__init__()
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.mask = torch.triu(torch.ones(T, T, dtype=torch.bool), diagonal=1)

    def forward(self, x):
        return x + self.attn(x, x, x, attn_mask=self.mask[:x.shape[1], :x.shape[1]], need_weights=False)[0]


class Wrapped(nn.Module):
    def __init__(self, d, blocks):
        super().__init__()
        self.tok = nn.Embedding(V, d)
        self.blocks = nn.ModuleList(blocks)
        self.norm = nn.LayerNorm(d)

    def trunk(self, idx):
        x = self.tok(idx)
        for b in self.blocks:
            x = x + b(x) if not isinstance(b, (IndepBlock, MHABlock)) else b(x)
        return self.norm(x)


class TiedLM(Wrapped):
    """Output head tied to the input embedding (nanoGPT): lm_head.weight is tok.weight."""

    def __init__(self, d, blocks):
        super().__init__(d, blocks)
        self.lm_head = nn.Linear(d, V, bias=False)
        self.lm_head.weight = self.tok.weight

    def forward(self, idx):
        return self.lm_head(self.trunk(idx))


class UntiedLM(Wrapped):
    """Untied output head named ``head``, followed by an unrelated small Linear (a value head)."""

    def __init__(self, d, blocks):
        super().__init__(d, blocks)
        self.head = nn.Linear(d, V)
        self.value = nn.Linear(d, 1)

    def forward(self, idx):
        h = self.trunk(idx)
        return self.head(h) + 0 * self.value(h)


def nano(seed=0):
    torch.manual_seed(seed)
    return TiedLM(32, [NanoAttention(), NanoAttention()])


def titan(seed=0):
    torch.manual_seed(seed)
    return UntiedLM(32, [TitanAttention(), TitanAttention()])


def indep(seed=0):
    torch.manual_seed(seed)
    return UntiedLM(32, [IndepBlock(), IndepBlock()])


def mha(seed=0):
    torch.manual_seed(seed)
    return TiedLM(32, [MHABlock(), MHABlock()])


def _hf():
    return pytest.importorskip("transformers")


def hf_gpt2(seed=0):
    tr = _hf()
    torch.manual_seed(seed)
    cfg = tr.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=V, n_positions=T, bos_token_id=0,
                        eos_token_id=0, attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0)
    cfg._attn_implementation = "eager"
    return tr.GPT2LMHeadModel(cfg)


def hf_llama(seed=0, cls="Llama"):
    tr = _hf()
    torch.manual_seed(seed)
    cfg = getattr(tr, f"{cls}Config")(num_hidden_layers=2, hidden_size=32, num_attention_heads=4,
                                       num_key_value_heads=2, intermediate_size=64, vocab_size=V,
                                       max_position_embeddings=T, bos_token_id=0, eos_token_id=0)
    cfg._attn_implementation = "eager"
    return getattr(tr, f"{cls}ForCausalLM")(cfg)


def hf_mistral(seed=0):
    return hf_llama(seed, "Mistral")


def _logits(model, idx):
    out = model(idx)
    return out.logits if hasattr(out, "logits") else out


# ---------------------------------------------------------------- independent references (numpy)

def _np(t):
    return t.detach().double().numpy()


def ref_entropies(wq, wk, nh, nkv):
    """Normalized spectral entropy of W_{Q,h}^T W_{K,g(h)} per head, by a full numpy SVD."""
    hs = wq.shape[0] // nh
    out = []
    for h in range(nh):
        g = h // (nh // nkv)
        a = wq[h * hs:(h + 1) * hs].T @ wk[g * hs:(g + 1) * hs]
        s = np.linalg.svd(a, compute_uv=False)[:hs]
        p = s / s.sum()
        out.append(-(p * np.log(p)).sum() / math.log(hs))
    return np.array(out)


def ref_logit_stats(q, k, nh, nkv):
    """(max logit, per-head mean causal attention entropy) from projected q (B, T, nh*hs), k."""
    b, t, _ = q.shape
    hs = q.shape[-1] // nh
    qh = q.reshape(b, t, nh, hs).transpose(0, 2, 1, 3)
    kh = np.repeat(k.reshape(b, t, nkv, hs).transpose(0, 2, 1, 3), nh // nkv, axis=1)
    z = qh @ kh.transpose(0, 1, 3, 2) / math.sqrt(hs)
    mask = np.triu(np.ones((t, t), bool), 1)
    z = np.where(mask, -np.inf, z)
    a = np.exp(z - z.max(-1, keepdims=True))
    a /= a.sum(-1, keepdims=True)
    ent = -np.where(a > 0, a * np.log(np.where(a > 0, a, 1)), 0).sum(-1)
    return z.max(), ent.mean(axis=(0, 2))


# ---------------------------------------------------------------------------- discovery itself

# family -> (builder, layer names, n_head, n_kv_head, head size, output head)
FAMILIES = {
    "hf-gpt2": (hf_gpt2, ["transformer.h.0.attn", "transformer.h.1.attn"], 4, 4, 8, "lm_head"),
    "hf-llama": (hf_llama, ["model.layers.0.self_attn", "model.layers.1.self_attn"], 4, 2, 8, "lm_head"),
    "hf-mistral": (hf_mistral, ["model.layers.0.self_attn", "model.layers.1.self_attn"], 4, 2, 8, "lm_head"),
    "nanogpt": (nano, ["blocks.0", "blocks.1"], 4, 4, 8, "lm_head"),
    "torchtitan": (titan, ["blocks.0", "blocks.1"], 4, 2, 8, "head"),
    "independent": (indep, ["blocks.0", "blocks.1"], 4, 4, 8, "head"),
    "mha": (mha, ["blocks.0.attn", "blocks.1.attn"], 4, 4, 8, "lm_head"),
}


def _qk_weights(family, model, layer):
    """The query and key weights (rows, in) of a layer, read from the model by hand."""
    if family == "hf-gpt2":
        w = model.transformer.h[layer].attn.c_attn.weight.T           # Conv1D: (in, out)
        return w[:32], w[32:64]
    if family in ("hf-llama", "hf-mistral"):
        a = model.model.layers[layer].self_attn
        return a.q_proj.weight, a.k_proj.weight
    blk = model.blocks[layer]
    if family == "nanogpt":
        return blk.c_attn.weight[:32], blk.c_attn.weight[32:64]
    if family == "torchtitan":
        return blk.wq.weight, blk.wk.weight
    if family == "independent":
        return blk.q.weight, blk.k.weight
    return blk.attn.in_proj_weight[:32], blk.attn.in_proj_weight[32:64]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_sites_heads_and_weights_are_found_without_configuration(family):
    build, names, nh, nkv, hs, head = FAMILIES[family]
    model = build()
    sites = find_attention_sites(model)
    assert [s.name for s in sites] == names
    assert [(s.n_head, s.n_kv_head, s.head_dim) for s in sites] == [(nh, nkv, hs)] * len(names)
    for _ in range(2):
        for i, s in enumerate(sites):
            wq, wk = s.weights()
            rq, rk = _qk_weights(family, model, i)
            assert torch.equal(wq, rq.detach()) and torch.equal(wk, rk.detach())
        with torch.no_grad():       # views of the live parameters: a change to the model shows
            for p in model.parameters():
                p.add_(torch.randn_like(p))
    assert find_output_head(model) == head


@pytest.mark.parametrize("family", list(FAMILIES))
def test_spectral_entropy_matches_numpy_on_each_family(family):
    build, names, nh, nkv, hs, _ = FAMILIES[family]
    model = build(seed=3)
    det = SpectralEntropy(layers=len(names), update=False)
    det.setup(model, None)
    out = det.compute(_tel())
    for i in range(len(names)):
        wq, wk = _qk_weights(family, model, i)
        ref = ref_entropies(_np(wq), _np(wk), nh, nkv)
        assert float(out[f"layer{i}.min"]) == pytest.approx(ref.min(), abs=2e-5)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_attention_logits_match_numpy_on_each_family(family):
    build, names, nh, nkv, hs, _ = FAMILIES[family]
    model = build(seed=4).train()
    det = AttentionLogits(max_batch=B, max_queries=T)
    det.setup(model, None)
    # capture the inputs of each layer's projections to recompute q and k by hand
    inputs = {}
    def keep(mod, args, kwargs, key):
        inputs[key] = (args[0] if args else kwargs["hidden_states"]).detach()
    hooks = [m.register_forward_pre_hook(lambda mod, a, kw, key=n: keep(mod, a, kw, key), with_kwargs=True)
             for n, m in model.named_modules() if n in names]
    idx = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(0))
    _logits(model, idx)
    out = det.compute(_tel())
    for h in hooks:
        h.remove()
    maxes, ents = [], []
    for i, name in enumerate(names):
        x = _np(inputs[name])
        wq, wk = (_np(w) for w in _qk_weights(family, model, i))
        if family == "hf-gpt2":
            bias = _np(model.transformer.h[i].attn.c_attn.bias)
            bq, bk = bias[:32], bias[32:64]
        elif family == "nanogpt":
            bias = _np(model.blocks[i].c_attn.bias)
            bq, bk = bias[:32], bias[32:64]
        elif family == "mha":
            bias = _np(model.blocks[i].attn.in_proj_bias)
            bq, bk = bias[:32], bias[32:64]
        elif family == "independent":
            bq, bk = _np(model.blocks[i].q.bias), _np(model.blocks[i].k.bias)
        else:
            bq, bk = 0.0, 0.0
        mx, ent = ref_logit_stats(x @ wq.T + bq, x @ wk.T + bk, nh, nkv)
        maxes.append(mx)
        ents.append(ent)
    assert float(out["max_logit"]) == pytest.approx(max(maxes), rel=1e-5)
    assert float(out["min_entropy"]) == pytest.approx(min(e.min() for e in ents), rel=1e-5)
    det.close()


def test_hf_gpt2_attention_entropy_is_that_of_the_models_own_attention_weights():
    """GPT-2 (no rotary embedding): the detector's entropy equals the entropy of the attention
    probabilities the model itself returns (eager attention, ``output_attentions``)."""
    model = hf_gpt2(seed=6).train()
    det = AttentionLogits(max_batch=B, max_queries=T)
    det.setup(model, None)
    idx = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(1))
    att = model(idx, output_attentions=True).attentions                      # per layer (B, nh, T, T)
    out = det.compute(_tel())
    ents = []
    for a in att:
        a = a.detach().double().numpy()
        ents.append((-np.where(a > 0, a * np.log(np.where(a > 0, a, 1)), 0).sum(-1)).mean(axis=(0, 2)))
    assert float(out["min_entropy"]) == pytest.approx(min(e.min() for e in ents), rel=1e-5)


# ------------------------------------------------------------------- overrides and errors

def test_patterns_override_discovery_and_errors_list_the_candidates():
    model = indep()
    # override: only layer 1's projections
    sites = find_attention_sites(model, "blocks.1.q", "blocks.1.k")
    assert [s.name for s in sites] == ["blocks.1"] and sites[0].n_head == 4
    with pytest.raises(ValueError, match=r"set both q_pattern and k_pattern"):
        find_attention_sites(model, q_pattern="*.q")

    class Odd(nn.Module):      # a fused projection under a name nothing knows
        def __init__(self):
            super().__init__()
            self.n_head = 2
            self.in_layer = nn.Linear(16, 48)
            self.out_layer = nn.Linear(16, 16)
    net = nn.Sequential(Odd())
    with pytest.raises(ValueError, match=r"no attention layer found: no sibling query/key projections named "
                                         r"q_proj\+k_proj/wq\+wk.*no fused projection named c_attn.*"
                                         r"0\.in_layer \(16->48\), 0\.out_layer \(16->16\).*qkv_pattern"):
        find_attention_sites(net, who="spectral_entropy")
    (site,) = find_attention_sites(net, qkv_pattern="*.in_layer")
    assert (site.name, site.n_head, site.head_dim, site.q_range, site.k_range) == ("0", 2, 8, (0, 16), (16, 32))
    with pytest.raises(ValueError, match=r"qkv_pattern '\*\.nothing' matched no projection"):
        find_attention_sites(net, qkv_pattern="*.nothing")

    class NoHeads(nn.Module):
        def __init__(self):
            super().__init__()
            self.q_proj, self.k_proj = nn.Linear(16, 16), nn.Linear(16, 16)
    with pytest.raises(ValueError, match=r"cannot tell the number of heads of '0'.*set the detector's `n_head`"):
        find_attention_sites(nn.Sequential(NoHeads()))
    assert find_attention_sites(nn.Sequential(NoHeads()), n_head=2)[0].head_dim == 8

    class BadFused(nn.Module):
        def __init__(self):
            super().__init__()
            self.n_head = 4
            self.c_attn = nn.Linear(16, 40)   # not (4 + 2 * 4) * hs
    with pytest.raises(ValueError, match=r"fused projection 0\.c_attn has 40 output features"):
        find_attention_sites(nn.Sequential(BadFused()))


def test_fused_grouped_query_projection_is_split_by_kv_heads():
    class Phi3Like(nn.Module):   # qkv_proj: (n_head + 2 n_kv_head) * hs outputs
        def __init__(self):
            super().__init__()
            self.num_heads, self.num_key_value_heads = 4, 2
            self.qkv_proj = nn.Linear(32, (4 + 2 * 2) * 8)
    torch.manual_seed(0)
    net = nn.Sequential(Phi3Like())
    (site,) = find_attention_sites(net)
    assert (site.n_head, site.n_kv_head, site.head_dim, site.q_range, site.k_range) == (4, 2, 8, (0, 32), (32, 48))
    w = net[0].qkv_proj.weight
    det = SpectralEntropy(update=False)
    det.setup(net, None)
    ref = ref_entropies(_np(w[:32]), _np(w[32:48]), 4, 2)
    assert float(det.compute(_tel())["min"]) == pytest.approx(ref.min(), abs=2e-5)


def test_output_head_discovery():
    # tied (nanoGPT) and untied with a later small Linear (value head): the one onto the vocabulary
    assert find_output_head(nano()) == "lm_head"
    assert find_output_head(indep()) == "head"
    with pytest.raises(ValueError, match=r"no output head found: no nn.Linear onto a vocabulary size \(\[5\]\)"
                                         r".*\['0 \(4->4\)'\].*params.module"):
        find_output_head(nn.Sequential(nn.Linear(4, 4), nn.Embedding(5, 4)))
    # tied wins over "last": a later Linear onto the same size (an auxiliary head) is not taken
    class TiedThenAux(TiedLM):
        def __init__(self):
            super().__init__(32, [NanoAttention()])
            self.aux = nn.Linear(32, V)
    assert find_output_head(TiedThenAux()) == "lm_head"
    # the detector hooks it: log Z of the head's output
    model = indep(seed=2).train()
    det = LogitDivergence(warmup=1)
    det.setup(model, None)
    assert det.module_name == "head"
    idx = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(0))
    logits = model(idx)
    ref = torch.logsumexp(logits.detach().double(), -1).mean()
    assert float(det.compute(_tel())["logz"]) == pytest.approx(float(ref), rel=1e-6)


# ------------------------------------------------------- the shipped policy starts on each family

@pytest.mark.parametrize("family", list(FAMILIES))
def test_early_warning_policy_starts_and_signals_are_finite(family, tmp_path):
    build = FAMILIES[family][0]
    model = build(seed=1).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    guard = Guard(opt, "early-warning", model=model, log_dir=tmp_path)
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        idx = torch.randint(0, V, (B, T), generator=gen)
        logits = _logits(model, idx)
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, V), idx[:, 1:].reshape(-1))
        loss.backward()
        res = guard.step(loss)
        opt.zero_grad(set_to_none=True)
    guard.close()
    sig = res.signals
    for name in ("qk.min", "qk.drop", "attn.max_logit", "attn.min_entropy", "logz.logz",
                 "logz.drift", "adam.frac_large", "upd.max", "loss.zscore"):
        assert name in sig and math.isfinite(sig[name]), (name, sig.get(name))
    assert 0.0 < sig["qk.min"] <= 1.0 and sig["attn.max_logit"] > 0 and sig["logz.logz"] > 0
    assert not [r for r in res.decisions if r.get("event") == "error"]


def test_a_policy_with_only_one_of_q_pattern_and_k_pattern_is_refused_at_load():
    from lbw_policy.errors import PolicyError
    from lbw_policy.policy import loads_policy

    text = """apiVersion: lbw-policy/v1
kind: Policy
metadata: {name: t}
detectors:
  attn: {type: attention_logits, params: {qkv_pattern: "*.c_attn"}}
  qk: {type: spectral_entropy, params: {q_pattern: "*.q"}}
actuators:
  lr_scale: {min: 0.1, max: 1.0}
rules:
  - name: r
    when: {signal: qk.min, op: "<", value: 0.1}
    then: [{actuator: lr_scale, multiply: 0.5}]
"""
    with pytest.raises(PolicyError, match=r":6: detectors\.qk\.params: 'k_pattern' is a dependency of 'q_pattern'"):
        loads_policy(text)
    assert loads_policy(text.replace('q_pattern: "*.q"', 'q_pattern: "*.q", k_pattern: "*.k"')).name == "t"


# ------------------------------------------------------------ the kernel check (kernel_error)

class _WrongScale(torch.overrides.TorchFunctionMode):
    """Every ``scaled_dot_product_attention`` call with its softmax scale multiplied by ``gain``:
    a faulty attention kernel, invisible in the projections."""

    def __init__(self, gain):
        super().__init__()
        self.gain = gain

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is F.scaled_dot_product_attention:
            kwargs["scale"] = self.gain / math.sqrt(args[0].shape[-1])
        return func(*args, **kwargs)


def _kernel_det(model, **params):
    import warnings
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        det = AttentionLogits(max_batch=B, max_queries=T, kernel_check=True, **params)
        det.setup(model, None)
    return det, [str(w.message) for w in caught if "kernel_check" in str(w.message)]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_kernel_error_is_rounding_on_a_float32_kernel_and_rotary_models_are_skipped(family):
    build = FAMILIES[family][0]
    model = build(seed=2).train()
    det, warned = _kernel_det(model)
    _logits(model, torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(1)))
    err = float(det.compute(_tel())["kernel_error"])
    if family in ("hf-llama", "hf-mistral"):
        assert math.isnan(err)
        assert len(warned) == 1 and "rotary" in warned[0] and "model.layers.0.self_attn" in warned[0]
    else:
        assert not warned
        assert 0.0 <= err < 1e-5
    det.close()


def test_kernel_check_is_off_by_default():
    model = nano(seed=0).train()
    det = AttentionLogits(max_batch=B, max_queries=T)
    det.setup(model, None)
    _logits(model, torch.randint(0, V, (B, T)))
    assert "kernel_error" not in det.compute(_tel())


@pytest.mark.parametrize("family", ["nanogpt", "torchtitan", "independent"])
def test_kernel_error_of_a_kernel_with_the_wrong_softmax_scale_matches_numpy(family):
    build, names, nh, nkv, hs, _ = FAMILIES[family]
    model = build(seed=5).train()
    with torch.no_grad():   # sharper attention than at init, so the scale error shows
        for n, p in model.named_parameters():
            if p.dim() == 2 and n.split(".")[-2] in ("c_attn", "wq", "wk", "q", "k"):
                p.mul_(3.0)
    det, _ = _kernel_det(model)
    idx = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(3))
    _logits(model, idx)      # a first, healthy evaluation (a layer wrong at its first is dropped)
    assert float(det.compute(_tel())["kernel_error"]) < 1e-5
    inputs = {}
    hooks = [m.register_forward_pre_hook(lambda mod, a, key=n: inputs.__setitem__(key, a[0].detach()))
             for n, m in model.named_modules() if n in names]
    with _WrongScale(1.5):
        _logits(model, idx)
    err = float(det.compute(_tel())["kernel_error"])
    for h in hooks:
        h.remove()
    mask = np.triu(np.ones((T, T), bool), 1)

    def attend(q, k, v, gain):
        qh = q.reshape(B, T, nh, hs).transpose(0, 2, 1, 3)
        kh = np.repeat(k.reshape(B, T, nkv, hs).transpose(0, 2, 1, 3), nh // nkv, axis=1)
        vh = np.repeat(v.reshape(B, T, nkv, hs).transpose(0, 2, 1, 3), nh // nkv, axis=1)
        z = np.where(mask, -np.inf, gain * (qh @ kh.transpose(0, 1, 3, 2)) / math.sqrt(hs))
        a = np.exp(z - z.max(-1, keepdims=True))
        return (a / a.sum(-1, keepdims=True)) @ vh

    errors = []
    for i, name in enumerate(names):
        x = _np(inputs[name])
        blk = model.blocks[i]
        if family == "nanogpt":
            w, b = _np(blk.c_attn.weight), _np(blk.c_attn.bias)
            qkv = x @ w.T + b
            q, k, v = qkv[..., :32], qkv[..., 32:64], qkv[..., 64:]
        elif family == "torchtitan":
            q, k, v = (x @ _np(p.weight).T for p in (blk.wq, blk.wk, blk.wv))
        else:
            q, k, v = (x @ _np(p.weight).T + _np(p.bias) for p in (blk.q, blk.k, blk.v))
        got, ref = attend(q, k, v, 1.5), attend(q, k, v, 1.0)
        errors.append(np.linalg.norm(got - ref) / np.linalg.norm(ref))
    assert max(errors) > 0.01
    assert err == pytest.approx(max(errors), rel=1e-4)
    det.close()


def test_kernel_error_of_multihead_attention_sees_a_changed_output():
    model = mha(seed=1).train()
    # a "kernel" whose output is 10 % too large, hooked before the detector's own hook
    scale = [1.0]
    for blk in model.blocks:
        blk.attn.register_forward_hook(lambda mod, a, out: (out[0] * scale[0],) + tuple(out[1:]))
    det, warned = _kernel_det(model)
    assert not warned
    idx = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(0))
    _logits(model, idx)
    assert float(det.compute(_tel())["kernel_error"]) < 1e-5
    scale[0] = 1.1
    _logits(model, idx)
    assert float(det.compute(_tel())["kernel_error"]) == pytest.approx(0.1, rel=1e-4)


def test_kernel_check_skips_layers_it_cannot_recompute_and_says_why():
    model = nano(seed=0)
    model.blocks[0].q_norm = nn.LayerNorm(8)           # QK-norm
    model.blocks[1].attn_dropout = nn.Dropout(0.1)     # attention dropout
    det, warned = _kernel_det(model)
    assert len(warned) == 1
    assert "skips 2 of 2" in warned[0] and "QK-norm (q_norm)" in warned[0] and "p = 0.1" in warned[0]
    assert "kernel_error will be NaN" in warned[0]
    model = indep(seed=0)
    del model.blocks[1].o                               # no output projection
    det, warned = _kernel_det(model)
    assert len(warned) == 1 and "skips 1 of 2" in warned[0] and "'blocks.1'" in warned[0]
    assert "no output projection found" in warned[0]


def test_the_early_warning_policy_halts_on_a_wrong_kernel_in_enforce_mode(tmp_path):
    import yaml

    from lbw_policy import TrainingHalted

    doc = yaml.safe_load((Path(__file__).resolve().parents[1] / "policies" / "early-warning.yaml").read_text())
    doc["mode"] = "enforce"
    pol = tmp_path / "ew-enforce.yaml"
    pol.write_text(yaml.safe_dump(doc))
    model = nano(seed=1).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    guard = Guard(opt, str(pol), model=model, log_dir=tmp_path / "run")
    gen = torch.Generator().manual_seed(0)
    for step in range(11):   # attn is due every 10 steps: healthy at step 0, faulty at step 10
        idx = torch.randint(0, V, (B, T), generator=gen)
        with _WrongScale(4.0 if step == 10 else 1.0):
            logits = _logits(model, idx)
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, V), idx[:, 1:].reshape(-1))
        loss.backward()
        if step < 10:
            assert guard.step(loss).signals["attn.kernel_error"] < 1e-5
            opt.zero_grad(set_to_none=True)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(TrainingHalted, match="attention-kernel-error"):
        guard.step(loss)
    guard.close()
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))   # the step never ran
    assert (tmp_path / "run" / "halt-checkpoint.pt").exists()


class FusedGQA(nn.Module):
    """A fused ``qkv`` projection with fewer key/value heads: ``[q (4 heads) | k (2) | v (2)]``."""

    def __init__(self, d=32, n_head=4, n_kv_head=2):
        super().__init__()
        self.n_head, self.n_kv_head, self.hs = n_head, n_kv_head, d // n_head
        self.qkv = nn.Linear(d, (n_head + 2 * n_kv_head) * self.hs)
        self.proj = nn.Linear(d, d)

    def forward(self, x):
        b, t, _ = x.shape
        q, k, v = self.qkv(x).split([self.n_head * self.hs, self.n_kv_head * self.hs, self.n_kv_head * self.hs], -1)
        q = q.view(b, t, self.n_head, self.hs).transpose(1, 2)
        k, v = (z.view(b, t, self.n_kv_head, self.hs).transpose(1, 2) for z in (k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        return self.proj(y.transpose(1, 2).reshape(b, t, -1))


def test_kernel_error_on_a_fused_grouped_query_projection_and_on_a_slice_of_the_batch():
    torch.manual_seed(0)
    model = TiedLM(32, [FusedGQA(), FusedGQA()]).train()
    with torch.no_grad():
        for blk in model.blocks:
            blk.qkv.weight[:48].mul_(3.0)      # sharper attention (query and key rows)
    import warnings
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        det = AttentionLogits(max_batch=1, max_queries=5, kernel_check=True)
        det.setup(model, None)
    assert not caught
    idx = torch.randint(0, V, (3, T), generator=torch.Generator().manual_seed(1))
    _logits(model, idx)
    assert float(det.compute(_tel())["kernel_error"]) < 1e-5   # the value block and slices line up
    with _WrongScale(2.0):
        _logits(model, idx)
    assert float(det.compute(_tel())["kernel_error"]) > 0.01


def test_a_layer_whose_kernel_differs_at_its_first_evaluation_is_dropped_with_a_warning():
    model = nano(seed=0).train()
    with torch.no_grad():
        for blk in model.blocks:
            blk.c_attn.weight[:64].mul_(4.0)
    det, _ = _kernel_det(model)
    idx = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(0))
    with _WrongScale(3.0):             # the model's own scale differs from 1/sqrt(hs), from the start
        _logits(model, idx)
    with pytest.warns(UserWarning) as caught:
        out = det.compute(_tel())
    assert [str(w.message).split(":")[1] for w in caught] == [
        f" kernel_check drops layer 'blocks.{i}'" for i in (0, 1)]
    assert math.isnan(float(out["kernel_error"]))
    with _WrongScale(3.0):
        _logits(model, idx)
    assert math.isnan(float(det.compute(_tel())["kernel_error"]))   # dropped for good, no new warning


def test_a_kernel_that_overflows_counts_as_an_infinite_error():
    model = nano(seed=0).train()
    det, _ = _kernel_det(model)
    idx = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(0))
    _logits(model, idx)
    det.compute(_tel())
    # an attention output that overflowed, ahead of the detector's own pre-hook
    model.blocks[1].c_proj.register_forward_pre_hook(lambda mod, a: (a[0] * float("inf"),), prepend=True)
    _logits(model, idx)
    assert float(det.compute(_tel())["kernel_error"]) == math.inf


def test_multihead_attention_sequence_first_and_a_padding_mask():
    torch.manual_seed(0)
    attn = nn.MultiheadAttention(32, 4)      # batch_first=False: (T, B, E)
    model = nn.Module()
    model.attn = attn
    det, warned = _kernel_det(model.train())
    assert not warned
    x = torch.randn(T, B, 32)
    mask = torch.triu(torch.ones(T, T, dtype=torch.bool), 1)
    attn(x, x, x, attn_mask=mask, need_weights=False)
    assert float(det.compute(_tel())["kernel_error"]) < 1e-5
    # with a key padding mask the forward is not checked (queries and keys still are)
    attn(x, x, x, attn_mask=mask, key_padding_mask=torch.zeros(B, T, dtype=torch.bool), need_weights=False)
    with pytest.warns(UserWarning, match="captured no values"):
        out = det.compute(_tel())
    assert math.isnan(float(out["kernel_error"])) and math.isfinite(float(out["max_logit"]))


def test_kernel_check_sees_a_rotary_buffer_and_ignores_an_identity_qk_norm():
    model = titan(seed=0)
    model.register_buffer("freqs_cis", torch.zeros(T, 4))
    _, warned = _kernel_det(model)
    assert len(warned) == 1 and "buffer freqs_cis" in warned[0]
    model = nano(seed=0)
    for blk in model.blocks:
        blk.q_norm, blk.k_norm = nn.Identity(), nn.Identity()     # timm's QK-norm when off
    _, warned = _kernel_det(model)
    assert not warned


def test_a_rule_on_kernel_error_needs_kernel_check():
    from lbw_policy.errors import PolicyError
    from lbw_policy.policy import loads_policy

    text = """apiVersion: lbw-policy/v1
kind: Policy
metadata: {name: t}
detectors:
  attn: {type: attention_logits}
actuators:
  halt: {}
rules:
  - name: r
    when: {signal: attn.kernel_error, op: ">", value: 0.02}
    then: [{actuator: halt}]
"""
    with pytest.raises(PolicyError, match="kernel_check: true"):
        loads_policy(text)
    loads_policy(text.replace("{type: attention_logits}", "{type: attention_logits, params: {kernel_check: true}}"))
