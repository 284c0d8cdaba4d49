"""The slow-onset faults of benchmarks/stress.py (issue 16): the severity formula, the mantissa
rounding against bfloat16, the faulty attention against torch's own SDPA, and its injection into
the demo GPT's forward."""

from __future__ import annotations

import importlib
import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]


def _stress():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    return importlib.import_module("stress")   # in sys.modules: its dataclass and pickling need that


st = _stress()


def _spec(**kw):
    return st.RunSpec(method="adamw", lr=1e-3, seed=0, **{"steps": 300, **kw})


def test_severity_grows_geometrically_from_the_fault_start_and_is_capped():
    spec = _spec(fault="lr-ramp", fault_start=100, onset_rate=1.05, max_severity=100.0)
    assert [st.fault_severity(spec, t) for t in (0, 99)] == [1.0, 1.0]
    assert st.fault_severity(spec, 100) == pytest.approx(1.05)
    assert st.fault_severity(spec, 140) == pytest.approx(1.05 ** 41)
    assert st.fault_severity(spec, 299) == 100.0                         # 1.05^200 capped
    assert st.fault_severity(_spec(fault="lr30"), 150) == 1.0            # not a slow-onset fault
    # the learning-rate factor: schedule x severity, for lr-ramp and combo only
    for fault in ("lr-ramp", "combo"):
        s = _spec(fault=fault, fault_start=100, onset_rate=1.05)
        assert st._lr_factor(s, 150) == pytest.approx(st._lr_factor(_spec(), 150) * 1.05 ** 51)
    assert st._lr_factor(_spec(fault="attn-lowp"), 150) == st._lr_factor(_spec(), 150)
    # keys: slow faults carry their start, rate (and bits); the old faults' keys are unchanged
    assert _spec(fault="combo", fault_start=80, onset_rate=1.02).key == "adamw|0.001|0|combo@80x1.02b3"
    assert _spec(fault="lr30").key == "adamw|0.001|0|lr30"


def test_round_mantissa_with_7_bits_is_bfloat16_rounding():
    x = torch.randn(10_000, generator=torch.Generator().manual_seed(0)) * 10.0 ** torch.randint(-6, 6, (10_000,))
    assert torch.equal(st.round_mantissa(x, 7), x.to(torch.bfloat16).float())
    r = st.round_mantissa(x, 2)                        # unit roundoff 2^-(bits+1): |error| <= 2^-3 |x|
    err = (r - x).abs() / x.abs()
    assert (err <= 2.0 ** -3 * (1 + 1e-6)).all() and err.max() > 2.0 ** -4
    assert (st.round_mantissa(r, 2) == r).all()        # representable values stay
    assert st.round_mantissa(torch.tensor([1.0, 0.0, -3.0]), 1).tolist() == [1.0, 0.0, -3.0]
    special = torch.tensor([math.inf, -math.inf, math.nan])
    assert st.round_mantissa(special, 3)[:2].tolist() == [math.inf, -math.inf]
    assert math.isnan(st.round_mantissa(special, 3)[2])


def test_faulty_attention_is_sdpa_at_full_precision_and_unit_gain():
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 3, 6, 8, generator=g, dtype=torch.float64) for _ in range(3))
    for kw in ({"is_causal": True}, {}, {"attn_mask": torch.rand(6, 6, generator=g) > 0.3},
               {"attn_mask": torch.randn(6, 6, generator=g, dtype=torch.float64)}, {"scale": 0.7}):
        ref = F.scaled_dot_product_attention(q, k, v, **kw)
        got = st._lowp_attention(q, k, v, **kw, gain=1.0, bits=60)
        torch.testing.assert_close(got, ref)
    # gain g is SDPA with its scale times g; few bits change the result, and grads flow through
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=3.0 / math.sqrt(8))
    torch.testing.assert_close(st._lowp_attention(q, k, v, is_causal=True, gain=3.0, bits=60), ref)
    qg = q.clone().requires_grad_()
    out = st._lowp_attention(qg, k, v, is_causal=True, gain=3.0, bits=2)
    assert (out - ref).abs().max() > 1e-3
    out.sum().backward()
    assert torch.isfinite(qg.grad).all() and qg.grad.abs().sum() > 0
    # grouped-query attention as SDPA's enable_gqa
    kv = k[:, :1], v[:, :1]
    ref = F.scaled_dot_product_attention(q, *kv, is_causal=True, enable_gqa=True)
    torch.testing.assert_close(st._lowp_attention(q, *kv, is_causal=True, enable_gqa=True, bits=60), ref)


def test_attention_fault_reaches_the_demo_gpt_from_its_first_step():
    from lbw_policy.demo.gpt import GPT, GPTConfig

    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=11, block_size=8, n_layer=2, n_head=2, n_embd=16))
    x = torch.randint(0, 11, (2, 8), generator=torch.Generator().manual_seed(0))
    spec = _spec(fault="attn-lowp", fault_start=5, onset_rate=2.0, fault_bits=60)
    clean, _ = model(x)
    with st.attention_fault(spec, 4):          # before the start: nothing
        same, _ = model(x)
    assert torch.equal(same, clean)
    with st.attention_fault(spec, 6):          # gain 2^2 = 4 on every layer's logits
        got, _ = model(x)
    blocks = [b.attn for b in model.blocks]
    saved = [b.forward for b in blocks]
    try:                                       # reference: SDPA with the scale times 4, by hand
        def sharper(attn, h):
            B, T, C = h.shape
            nh, hs = attn.n_head, C // attn.n_head
            q, k, v = (p(h).view(B, T, nh, hs).transpose(1, 2) for p in (attn.q_proj, attn.k_proj, attn.v_proj))
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=4.0 / math.sqrt(hs))
            return attn.out_proj(y.transpose(1, 2).reshape(B, T, C))
        for b in blocks:
            b.forward = (lambda h, b=b: sharper(b, h))
        ref, _ = model(x)
    finally:
        for b, f in zip(blocks, saved):
            b.forward = f
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_optimizer_fault_sets_weight_decay_or_epsilon_from_the_start():
    p = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.AdamW([p], lr=1e-3, eps=1e-8, weight_decay=0.0)
    spec = _spec(fault="wd-grow", fault_start=10, onset_rate=1.1)
    st.optimizer_fault(spec, 9, opt, 1e-8)
    assert opt.param_groups[0]["weight_decay"] == 0.0
    st.optimizer_fault(spec, 12, opt, 1e-8)
    assert opt.param_groups[0]["weight_decay"] == pytest.approx(st.WD_FAULT * 1.1 ** 3)
    st.optimizer_fault(_spec(fault="eps-grow", fault_start=10, onset_rate=1.1), 10, opt, 1e-8)
    assert opt.param_groups[0]["eps"] == pytest.approx(1.1e-8)
