"""Model-structure detectors (spectral_entropy, attention_logits, logit_divergence, moe_router)
against references computed independently with numpy / scipy on CPU."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.special
import torch
from torch import nn

from lbw_policy.demo.gpt import GPT, GPTConfig
from lbw_policy.detectors import AttentionLogits, LogitDivergence, MoERouter, SpectralEntropy
from lbw_policy.detectors.spectral_entropy import (_round_robin_index, factored_entropy,
                                                   factored_entropy_sync_free, jacobi_singular_values,
                                                   normalized_spectral_entropy, r_factor)
from lbw_policy.telemetry import Telemetry


class _Opt:
    def __init__(self, params=()):
        self.param_groups = [{"params": list(params), "lr": 0.1}]


def _tel(step=0):
    return Telemetry(step, torch.tensor(1.0), _Opt())


def _gpt(seed=0, n_embd=32, n_head=4, n_layer=2):
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=11, block_size=16, n_layer=n_layer, n_head=n_head, n_embd=n_embd))


def _np(t):
    return t.detach().double().numpy()


def _entropy_np(s, r):
    s = np.asarray(s, dtype=float)[:r]
    p = s / s.sum()
    p = p[p > 0]
    return float(-(p * np.log(p)).sum() / math.log(r))


def _ref_heads(wq, wk, n_head, n_kv=None):
    """H per head from the full d x d bilinear form, by numpy's SVD."""
    n_kv = n_kv or n_head
    hs = wq.shape[0] // n_head
    out = []
    for h in range(n_head):
        kh = h // (n_head // n_kv)
        a = wq[h * hs:(h + 1) * hs].T @ wk[kh * hs:(kh + 1) * hs]       # (d, d)
        out.append(_entropy_np(np.linalg.svd(a, compute_uv=False), hs))
    return np.array(out)


def _ref_update(wq0, wk0, wq1, wk1, n_head):
    hs = wq0.shape[0] // n_head
    r = min(wq0.shape[1], 2 * hs)
    out = []
    for h in range(n_head):
        sl = slice(h * hs, (h + 1) * hs)
        da = (wq1[sl] - wq0[sl]).T @ wk0[sl] + wq0[sl].T @ (wk1[sl] - wk0[sl])
        out.append(_entropy_np(np.linalg.svd(da, compute_uv=False), r))
    return np.array(out)


def _layer_weights(model, i):
    attn = model.blocks[i].attn
    return _np(attn.q_proj.weight), _np(attn.k_proj.weight)


# ----------------------------------------------------------------------------- spectral_entropy

def test_spectral_entropy_matches_full_svd_and_tracks_updates():
    model = _gpt()
    det = SpectralEntropy(warmup=1, layers=2)
    det.setup(model, None)
    assert [s.name for s in det.sites] == ["blocks.0.attn", "blocks.1.attn"]
    w0 = [_layer_weights(model, i) for i in range(2)]
    ref0 = [_ref_heads(q, k, 4) for q, k in w0]
    out = det.compute(_tel(0))
    assert float(out["min"]) == pytest.approx(min(r.min() for r in ref0), abs=1e-5)
    assert float(out["layer1.min"]) == pytest.approx(ref0[1].min(), abs=1e-5)
    assert math.isnan(float(out["update_min"]))                   # no previous weights yet
    assert float(out["drop"]) == 0.0 and float(out["worst_layer"]) == -1.0   # warm-up
    assert isinstance(out["cost_ms"], float) and out["cost_ms"] > 0

    # an "optimizer step": small random changes, plus head 2 of layer 1 collapsing to rank one
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for blk in model.blocks:
            for lin in (blk.attn.q_proj, blk.attn.k_proj):
                lin.weight.add_(0.01 * torch.randn(lin.weight.shape, generator=gen))
        q = model.blocks[1].attn.q_proj.weight
        q[16:24] = torch.outer(torch.randn(8, generator=gen), torch.randn(32, generator=gen)) * 0.05
    w1 = [_layer_weights(model, i) for i in range(2)]
    ref1 = [_ref_heads(q, k, 4) for q, k in w1]
    upd = [_ref_update(*w0[i], *w1[i], 4) for i in range(2)]
    out = det.compute(_tel(1))
    assert float(out["update_min"]) == pytest.approx(min(u.min() for u in upd), abs=1e-5)
    assert float(out["layer0.min"]) == pytest.approx(ref1[0].min(), abs=1e-5)
    assert float(out["min"]) == pytest.approx(ref1[1][2], abs=1e-5) and float(out["min"]) < 0.05
    base_min = [r.min() for r in ref0]
    assert float(out["drop"]) == pytest.approx(max(b - r.min() for b, r in zip(base_min, ref1)), abs=1e-5)
    assert (float(out["worst_layer"]), float(out["worst_head"])) == (1.0, 2.0)


def test_spectral_entropy_state_round_trip_continues_identically():
    model = _gpt(seed=3)
    a = SpectralEntropy(warmup=2)
    a.setup(model, None)
    a.compute(_tel(0))
    with torch.no_grad():
        model.blocks[0].attn.k_proj.weight.mul_(1.1)
    a.compute(_tel(1))
    b = SpectralEntropy(warmup=2)
    b.setup(model, None)
    b.load_state_dict(a.state_dict())
    with torch.no_grad():
        model.blocks[1].attn.q_proj.weight.add_(0.02)
    oa, ob = a.compute(_tel(2)), b.compute(_tel(2))
    for key in ("min", "drop", "worst_layer", "worst_head", "update_min"):
        assert float(oa[key]) == float(ob[key]), key


class _MHANet(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
        self.other = nn.Linear(16, 16)

    def forward(self, x, mask=None):
        return self.attn(x, x, x, attn_mask=mask, need_weights=False)[0]


def test_spectral_entropy_multihead_attention_and_grouped_query():
    torch.manual_seed(0)
    net = _MHANet()
    det = SpectralEntropy(q_pattern="none", k_pattern="none")
    det.setup(net, None)
    w = _np(net.attn.in_proj_weight)
    ref = _ref_heads(w[:16], w[16:32], 2)
    assert float(det.compute(_tel())["min"]) == pytest.approx(ref.min(), abs=1e-5)

    class GQA(nn.Module):
        def __init__(self):
            super().__init__()
            self.q = nn.Linear(16, 16)   # 4 query heads of 4
            self.k = nn.Linear(16, 8)    # 2 key heads
    net = nn.Sequential(GQA())
    det = SpectralEntropy(q_pattern="*.q", k_pattern="*.k", n_head=4)
    det.setup(net, None)
    ref = _ref_heads(_np(net[0].q.weight), _np(net[0].k.weight), 4, n_kv=2)
    assert float(det.compute(_tel())["min"]) == pytest.approx(ref.min(), abs=1e-5)


def test_spectral_entropy_setup_errors_name_the_problem():
    with pytest.raises(ValueError, match=r"no attention layer found: no sibling query/key projections named "
                                         r"q_proj\+k_proj.*projections .*: 0 \(4->4\)"):
        SpectralEntropy().setup(nn.Sequential(nn.Linear(4, 4)), None)
    with pytest.raises(ValueError, match=r"no attention layer found: q_pattern '\*\.attn\.q_proj'"):
        SpectralEntropy(q_pattern="*.attn.q_proj", k_pattern="*.attn.k_proj").setup(nn.Sequential(nn.Linear(4, 4)), None)
    with pytest.raises(ValueError, match=r"params\.layers is 3 but the model has 2 attention layers"):
        SpectralEntropy(layers=3).setup(_gpt(), None)
    with pytest.raises(ValueError, match=r"needs the model"):
        SpectralEntropy().setup(None, None)
    net = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
    with pytest.raises(ValueError, match=r"cannot tell the number of heads of '0'.*set the detector's `n_head`"):
        SpectralEntropy(q_pattern="0", k_pattern="1").setup(net, None)



# ------------------------------------------- spectral_entropy: the CUDA route, checked on the CPU

def _lapack64(f, g):
    """Float64 LAPACK entropy of ``f g^T``: the exact values both routes approximate."""
    f, g = f.double(), g.double()
    s = torch.linalg.svdvals(torch.linalg.qr(f, mode="r").R @ torch.linalg.qr(g, mode="r").R.mT)
    return normalized_spectral_entropy(s)


def _factor_cases():
    gen = torch.Generator().manual_seed(0)

    def rnd(*shape):
        return torch.randn(*shape, generator=gen)

    def orth(*shape):
        return torch.linalg.qr(rnd(*shape)).Q

    dq, p, pk = rnd(6, 40, 16), rnd(6, 40, 16), rnd(6, 40, 16)
    return {
        "random": (rnd(6, 48, 16), rnd(6, 48, 16)),
        "graded 1e-6": (orth(6, 64, 32) * torch.logspace(0, -6, 32), orth(6, 64, 32)),
        "trained-like": (rnd(4, 64, 32) @ torch.diag(torch.logspace(0, -2, 32)), rnd(4, 64, 32) * 0.02),
        "update, keys unchanged": (torch.cat([dq * 1e-3, p], -1), torch.cat([pk, torch.zeros_like(pk)], -1)),
        "d < 2 hs": (rnd(4, 24, 32), rnd(4, 24, 32)),
        "d_q != d_k": (rnd(4, 20, 16), rnd(4, 12, 16)),
        "odd hs": (rnd(3, 30, 7), rnd(3, 30, 7)),
        "hs 128 (update 2hs of 64)": (rnd(2, 160, 128), rnd(2, 160, 128)),
        "hs 256 (6 sweeps)": (rnd(2, 300, 256), rnd(2, 300, 256)),
        "zero": (torch.zeros(2, 16, 8), rnd(2, 16, 8)),
    }


@pytest.mark.parametrize("case", list(_factor_cases()))
def test_spectral_entropy_sync_free_route_matches_the_lapack_route(case):
    """The CUDA route (QR, QR passes, one-sided Jacobi; no cuSOLVER error check) gives the CPU
    route's values: within 1e-6 of factored_entropy (float32 LAPACK, itself up to ~2e-7 off) and
    within 1e-9 of float64 LAPACK; NaN where the form is zero."""
    f, g = _factor_cases()[case]
    new = factored_entropy_sync_free(f, g)
    old = factored_entropy(f, g).double()
    exact = _lapack64(f, g)
    assert new.dtype == torch.float64 and new.shape == old.shape
    assert torch.equal(new.isnan(), old.isnan()) and torch.equal(new.isnan(), exact.isnan())
    ok = ~exact.isnan()
    assert (new[ok] - exact[ok]).abs().max().item() <= 1e-9 if ok.any() else True
    assert (new[ok] - old[ok]).abs().max().item() <= 1e-6 if ok.any() else True


def test_jacobi_singular_values_of_mixed_sizes_in_one_run():
    """Cores of different sizes (square, non-square, odd) share one Jacobi run (zero-padded):
    each gets its own singular values, those of LAPACK."""
    gen = torch.Generator().manual_seed(2)
    cores = [torch.randn(3, 7, 7, generator=gen, dtype=torch.float64),
             torch.randn(2, 10, 10, generator=gen, dtype=torch.float64),
             torch.randn(2, 12, 9, generator=gen, dtype=torch.float64),
             torch.randn(1, 5, 11, generator=gen, dtype=torch.float64)]
    got = jacobi_singular_values(cores)
    for c, s in zip(cores, got):
        assert s.shape == (c.shape[0], min(c.shape[1:]))
        torch.testing.assert_close(s.sort(-1, descending=True).values, torch.linalg.svdvals(c), rtol=1e-12, atol=1e-12)


def test_r_factor_in_row_blocks_is_the_r_of_the_whole():
    gen = torch.Generator().manual_seed(3)
    for m, k, block in ((300, 16, 64), (257, 8, 16), (64, 16, 32), (100, 40, 64)):
        x = torch.randn(3, m, k, generator=gen, dtype=torch.float64)
        r = r_factor(x, block=block)
        assert r.shape == (3, min(m, k), k)
        torch.testing.assert_close(r.mT @ r, x.mT @ x, rtol=1e-10, atol=1e-10)


def test_round_robin_order_meets_every_pair_once_per_sweep_and_returns():
    """The gather index of the Jacobi rounds moves rows as the circle method: in n - 1 rounds
    every pair of rows is a pair once, and every row is back in its place."""
    for n in (2, 4, 6, 8, 10, 32):
        idx = _round_robin_index(n, torch.device("cpu"))
        rows = torch.arange(n, dtype=torch.float64)                    # player id of each row
        z = torch.complex(rows[0::2, None].expand(-1, n), rows[1::2, None].expand(-1, n))
        met = set()
        for _ in range(n - 1):
            met |= {frozenset((int(a), int(b))) for a, b in zip(z.real[:, 0], z.imag[:, 0])}
            z = torch.view_as_complex(torch.view_as_real(z).reshape(-1)[idx].view(n // 2, n, 2))
        assert len(met) == n * (n - 1) // 2, n
        assert torch.equal(z.real[:, 0], rows[0::2]) and torch.equal(z.imag[:, 0], rows[1::2]), n


def _evaluations(model, layers, steps=5, seed=1, **kw):
    """Both routes of the detector over ``steps`` evaluations with weight changes between them
    (step 2: layer 0 frozen; step 3: nothing moves, a skipped step), then a third detector on
    the CUDA route restored from the CPU route's state after evaluation 2."""
    dets = {}
    for solver in ("lapack", "jacobi"):
        d = SpectralEntropy(warmup=2, layers=layers, **kw)
        d.solver = solver
        d.setup(model, None)
        dets[solver] = d
    gen = torch.Generator().manual_seed(seed)
    linears = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.MultiheadAttention))]
    outs = []
    for step in range(steps):
        outs.append({k: d.compute(_tel(step)) for k, d in dets.items()})
        if step == 1:
            restored = SpectralEntropy(warmup=2, layers=layers, **kw)
            restored.solver = "jacobi"
            restored.setup(model, None)
            restored.load_state_dict(dets["lapack"].state_dict())
            dets["restored"] = restored
        with torch.no_grad():
            for i, m in enumerate(linears):
                if step == 3 or (step == 2 and i < 2):
                    continue
                w = m.in_proj_weight if isinstance(m, nn.MultiheadAttention) else m.weight
                w.add_(0.05 * torch.randn(w.shape, generator=gen))
    return outs


@pytest.mark.parametrize("model", ["gpt", "gqa", "mha"])
def test_spectral_entropy_cuda_route_gives_the_cpu_route_signals(model):
    """The detector on the CUDA route (solver "jacobi", forced here on the CPU) emits the CPU
    route's signals, evaluation after evaluation and after a restore: within 2e-6, worst_layer /
    worst_head equal, NaN where the CPU route has NaN (update_min of a step that moved nothing)."""
    if model == "gpt":
        net, layers, kw = _gpt(seed=5), 2, {}
    elif model == "mha":
        torch.manual_seed(5)
        net, layers, kw = _MHANet(), 1, {"q_pattern": "none", "k_pattern": "none"}
    else:
        class GQA(nn.Module):
            def __init__(self):
                super().__init__()
                self.q = nn.Linear(16, 16)   # 4 query heads of 4
                self.k = nn.Linear(16, 8)    # 2 key heads
        torch.manual_seed(5)
        net, layers, kw = nn.Sequential(GQA(), GQA()), 2, {"q_pattern": "*.q", "k_pattern": "*.k", "n_head": 4}
    outs = _evaluations(net, layers, **kw)
    assert math.isnan(float(outs[4]["lapack"]["update_min"]))     # evaluation 4: nothing moved
    for step, out in enumerate(outs):
        ref = out["lapack"]
        for solver in [k for k in out if k != "lapack"]:
            got = out[solver]
            assert set(got) == set(ref)
            for key in ref:
                if key == "cost_ms":
                    continue
                a, b = float(ref[key]), float(got[key])
                assert got[key].dtype == torch.float64 and got[key].dim() == 0, key
                if key in ("worst_layer", "worst_head"):
                    assert a == b, (step, solver, key)
                elif math.isnan(a):
                    assert math.isnan(b), (step, solver, key)
                else:
                    assert abs(a - b) <= 2e-6, (step, solver, key, a, b)



@pytest.mark.gpu
def test_spectral_entropy_on_cuda_takes_the_sync_free_route_with_the_cpu_values():
    """On CUDA weights the detector takes the sync-free route by itself (under
    set_sync_debug_mode("error"), first evaluation included) and emits, evaluation after
    evaluation, the CPU route's signals on a CPU copy of the same weights: within 2e-6, with
    the same worst layer and head. Factors of more than 256 rows go through the block QR."""
    for cfg in (dict(n_embd=32, n_head=4), dict(n_embd=320, n_head=5)):     # the second: d > 256
        torch.manual_seed(7)
        cpu = GPT(GPTConfig(vocab_size=11, block_size=16, n_layer=2, **cfg))
        gpu = GPT(GPTConfig(vocab_size=11, block_size=16, n_layer=2, **cfg)).cuda()
        gpu.load_state_dict(cpu.state_dict())
        a, b = SpectralEntropy(warmup=1, layers=2), SpectralEntropy(warmup=1, layers=2)
        a.setup(cpu, None)
        b.setup(gpu, None)
        gen = torch.Generator().manual_seed(1)
        tel = Telemetry(0, torch.tensor(1.0, device="cuda"), _Opt())
        for step in range(3):
            ref = a.compute(_tel(step))
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
            try:
                got = b.compute(tel)
            finally:
                torch.cuda.set_sync_debug_mode(0)
            for key in ref:
                if key == "cost_ms":
                    continue
                assert got[key].device.type == "cuda", key
                x, y = float(ref[key]), float(got[key])
                assert (math.isnan(x) and math.isnan(y)) or abs(x - y) <= 2e-6, (cfg, step, key, x, y)
            with torch.no_grad():
                for m_cpu, m_gpu in zip(cpu.modules(), gpu.modules()):
                    if isinstance(m_cpu, nn.Linear):
                        delta = 0.05 * torch.randn(m_cpu.weight.shape, generator=gen)
                        m_cpu.weight.add_(delta)
                        m_gpu.weight.add_(delta.cuda())


def test_repeat_heads_is_repeat_interleave():
    from lbw_policy.detectors._attention import repeat_heads

    gen = torch.Generator().manual_seed(0)
    for shape, dim, times in (((3, 5, 4), 0, 2), ((2, 3, 7, 4), 1, 3), ((2, 3, 4), -1, 2)):
        x = torch.randn(*shape, generator=gen)
        for t in (x, x.transpose(-1, -2)):
            assert torch.equal(repeat_heads(t, times, dim), t.repeat_interleave(times, dim=dim))


# ----------------------------------------------------------------------------- attention_logits

def _capture_linear(model):
    seen = {}
    handles = []
    for name, mod in model.named_modules():
        if name.endswith("attn.q_proj") or name.endswith("attn.k_proj"):
            handles.append(mod.register_forward_hook(
                lambda m, a, o, name=name: seen.__setitem__(name, o.detach().double().numpy())))
    return seen, handles


def _ref_logits(q, k, n_head, causal=True, mask=None):
    """q (B, Tq, C) last Tq positions, k (B, T, C): max logit and per-head mean entropy."""
    b, tq, c = q.shape
    t = k.shape[1]
    hs = c // n_head
    qh = q.reshape(b, tq, n_head, hs).transpose(0, 2, 1, 3)
    kh = k.reshape(b, t, n_head, hs).transpose(0, 2, 1, 3)
    z = qh @ kh.transpose(0, 1, 3, 2) / math.sqrt(hs)            # (B, nh, Tq, T)
    add = np.zeros((tq, t))
    if causal:
        i = np.arange(tq)[:, None] + (t - tq)
        add[np.arange(t)[None, :] > i] = -np.inf
    if mask is not None:
        add = add + mask
    z = z + add
    a = np.exp(z - scipy.special.logsumexp(z, axis=-1, keepdims=True))
    ent = -np.where(a > 0, a * np.log(np.where(a > 0, a, 1)), 0).sum(-1)
    return z.max(), ent.mean(axis=(0, 2))


def test_attention_logits_matches_numpy_on_the_captured_slice():
    model = _gpt(seed=2).train()
    det = AttentionLogits(max_batch=2, max_queries=5)
    det.setup(model, None)
    seen, handles = _capture_linear(model)
    x = torch.randint(0, 11, (3, 12), generator=torch.Generator().manual_seed(0))
    _, loss = model(x, x)
    loss.backward()
    out = det.compute(_tel())
    maxes, ents = [], []
    for i in range(2):
        q, k = seen[f"blocks.{i}.attn.q_proj"][:2, -5:], seen[f"blocks.{i}.attn.k_proj"][:2]
        mx, ent = _ref_logits(q, k, 4)
        maxes.append(mx)
        ents.append(ent)
    ents = np.array(ents)
    assert float(out["max_logit"]) == pytest.approx(max(maxes), rel=1e-5)
    assert float(out["min_entropy"]) == pytest.approx(ents.min(), rel=1e-5)
    assert float(out["min_layer_entropy"]) == pytest.approx(ents.mean(axis=1).min(), rel=1e-5)
    assert float(out["min_layer_entropy"]) > float(out["min_entropy"])   # the heads differ
    layer, head = np.unravel_index(ents.argmin(), ents.shape)
    assert (float(out["worst_layer"]), float(out["worst_head"])) == (layer, head)
    # measured once: without a new training forward the next evaluation emits nothing
    assert det.compute(_tel(1)) == {}
    model.eval()
    model(x)
    assert det.compute(_tel(2)) == {}                 # eval-mode forwards are not captured
    det.close()
    model.train()
    model(x)
    assert det.compute(_tel(3)) == {}                 # hooks removed
    for h in handles:
        h.remove()


def test_attention_logits_multihead_attention_entropy_is_that_of_the_returned_weights():
    torch.manual_seed(1)
    net = _MHANet().train()
    det = AttentionLogits(q_pattern="none", k_pattern="none", max_batch=8, max_queries=64)
    det.setup(net, None)
    x = torch.randn(2, 6, 16) * 3
    causal = torch.triu(torch.ones(6, 6, dtype=torch.bool), diagonal=1)
    with torch.enable_grad():
        net(x, causal)
    out = det.compute(_tel())
    # independent: MultiheadAttention's own attention weights
    with torch.no_grad():
        _, w = net.attn(x, x, x, attn_mask=causal, need_weights=True, average_attn_weights=False)
    w = w.double().numpy()                                        # (B, nh, T, T)
    ent = -np.where(w > 0, w * np.log(np.where(w > 0, w, 1)), 0).sum(-1).mean(axis=(0, 2))
    assert float(out["min_entropy"]) == pytest.approx(ent.min(), rel=1e-5)
    wi = _np(net.attn.in_proj_weight)
    bi = _np(net.attn.in_proj_bias)
    xn = x.double().numpy()
    mx, _ = _ref_logits(xn @ wi[:16].T + bi[:16], xn @ wi[16:32].T + bi[16:32], 2)
    assert float(out["max_logit"]) == pytest.approx(mx, rel=1e-5)


# ----------------------------------------------------------------------------- logit_divergence

def test_logit_divergence_mean_log_partition_and_drift():
    model = _gpt(seed=4).train()
    det = LogitDivergence(warmup=2, max_batch=2)
    det.setup(model, None)
    gen = torch.Generator().manual_seed(0)
    refs = []
    outs = []
    for step in range(4):
        lz = []
        for _ in range(2 if step == 1 else 1):         # step 1: two micro-batches, both counted
            x = torch.randint(0, 11, (3, 10), generator=gen)
            logits, _ = model(x)
            lz.append(scipy.special.logsumexp(_np(logits)[:2], axis=-1).reshape(-1))
        lz = np.concatenate(lz)
        refs.append((lz.mean(), lz.max()))
        outs.append(det.compute(_tel(step)))
        with torch.no_grad():
            model.lm_head.weight.mul_(1.5)              # logits grow: log Z drifts up
    for (mean, mx), out in zip(refs, outs):
        assert float(out["logz"]) == pytest.approx(mean, rel=1e-6)
        assert float(out["max_logz"]) == pytest.approx(mx, rel=1e-6)
    base = (refs[0][0] + refs[1][0]) / 2
    assert [float(o["drift"]) for o in outs[:2]] == [0.0, 0.0]
    assert float(outs[3]["drift"]) == pytest.approx(refs[3][0] - base, rel=1e-6) and float(outs[3]["drift"]) > 0
    assert det.compute(_tel(9)) == {}
    with pytest.raises(ValueError, match=r"params\.module 'head' must match exactly one module, matched 0"):
        LogitDivergence(module="head").setup(model, None)
    det.close()



def test_logit_divergence_start_keeps_early_steps_out_of_the_baseline():
    """With ``start``, evaluations before that step report log Z with a zero drift and do not
    enter the baseline: the baseline is the mean over the first ``warmup`` evaluations at steps
    >= start, and later drifts are measured from it."""
    model = _gpt(seed=4).train()
    det = LogitDivergence(warmup=2, max_batch=2, start=10)
    det.setup(model, None)
    gen = torch.Generator().manual_seed(0)
    refs, outs = [], []
    for step in (0, 5, 10, 15, 20):
        x = torch.randint(0, 11, (3, 10), generator=gen)
        logits, _ = model(x)
        refs.append(scipy.special.logsumexp(_np(logits)[:2], axis=-1).mean())
        outs.append(det.compute(_tel(step)))
        with torch.no_grad():
            model.lm_head.weight.mul_(1.5)
    assert [float(o["logz"]) for o in outs] == pytest.approx(refs, rel=1e-6)
    assert [float(o["drift"]) for o in outs[:4]] == [0.0] * 4       # 0, 5: before start; 10, 15: baseline
    base = (refs[2] + refs[3]) / 2                                   # steps 10 and 15, not 0 and 5
    assert float(outs[4]["drift"]) == pytest.approx(refs[4] - base, rel=1e-6)
    assert float(outs[4]["drift"]) != pytest.approx(refs[4] - (refs[0] + refs[1]) / 2, rel=1e-3)
    assert det.state_dict()["evals"] == 3
    det.close()
    with pytest.raises(ValueError, match="start >= 0"):
        LogitDivergence(start=-1)


@pytest.mark.parametrize("save_after", [0, 2])   # before start; inside the baseline's window
def test_logit_divergence_with_start_resumes_identically(save_after):
    """Saved before ``start`` or half-way through the baseline, restored into a fresh detector:
    every later output equals the uninterrupted detector's."""
    model = _gpt(seed=7).train()
    steps = (0, 5, 10, 15, 20, 25)
    gen = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, 11, (3, 10), generator=gen) for _ in steps]
    a = LogitDivergence(warmup=2, max_batch=2, start=10)
    a.setup(model, None)
    b = None
    outs_a, outs_b = [], []
    for i, (step, x) in enumerate(zip(steps, batches)):
        model(x)
        outs_a.append(a.compute(_tel(step)))
        if b is not None:
            outs_b.append(b.compute(_tel(step)))
        if i == save_after:
            b = LogitDivergence(warmup=2, max_batch=2, start=10)
            b.setup(model, None)
            b.load_state_dict(a.state_dict())
    for oa, ob in zip(outs_a[save_after + 1:], outs_b, strict=True):
        assert {k: float(v) for k, v in oa.items()} == {k: float(v) for k, v in ob.items()}
    assert float(outs_a[-1]["drift"]) != 0.0
    a.close()
    b.close()


def test_logit_divergence_restored_mid_step_and_after_warmup_continues_identically():
    """A state saved between a capture and its evaluation, after the warm-up: the restored
    detector (statistics kept as floats, written on the device by a fill when next used) emits
    exactly what the uninterrupted one does, whether it captures more before its evaluation or
    not."""
    model = _gpt(seed=6).train()
    gen = torch.Generator().manual_seed(0)
    a = LogitDivergence(warmup=1, max_batch=2)
    a.setup(model, None)
    model(torch.randint(0, 11, (3, 10), generator=gen))
    a.compute(_tel(0))                                       # warm-up done: a baseline exists
    model(torch.randint(0, 11, (3, 10), generator=gen))      # captured, not yet evaluated
    state = a.state_dict()
    b = LogitDivergence(warmup=1, max_batch=2)               # restored, captures nothing more
    b.load_state_dict(state)
    c = LogitDivergence(warmup=1, max_batch=2)               # restored, captures the next forward
    c.setup(model, None)
    c.load_state_dict(state)
    model(torch.randint(0, 11, (3, 10), generator=gen))      # captured by a and c
    oa, oc = a.compute(_tel(1)), c.compute(_tel(1))
    assert set(oa) == set(oc) == {"logz", "drift", "max_logz"}
    for k in oa:
        assert float(oa[k]) == float(oc[k]) and oc[k].dtype == torch.float64, k
    ob = b.compute(_tel(1))
    assert float(ob["logz"]) == state["sum"] / state["n"] and float(ob["max_logz"]) == state["max"]
    assert float(ob["drift"]) == state["sum"] / state["n"] - state["base_sum"]
    a.close()
    c.close()

# ----------------------------------------------------------------------------- moe_router

class TinyMoE(nn.Module):
    """Top-k mixture of experts: a linear router over E expert MLPs."""

    def __init__(self, d=8, experts=4, top_k=2):
        super().__init__()
        self.router = nn.Linear(d, experts)
        self.experts = nn.ModuleList(nn.Linear(d, d) for _ in range(experts))
        self.top_k = top_k

    def forward(self, x):                                  # (B, T, d)
        logits = self.router(x)                            # (B, T, E)
        w, idx = logits.softmax(-1).topk(self.top_k, dim=-1)
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            gate = (w * (idx == e)).sum(-1, keepdim=True)  # (B, T, 1), 0 when not routed
            out = out + gate * expert(x)
        return out


class MoENet(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([TinyMoE(), TinyMoE()])

    def forward(self, x):
        for layer in self.layers:
            x = x + layer(x)
        return x


def _ref_router(logits, top_k):
    e = logits.shape[-1]
    r = logits.reshape(-1, e)
    p = scipy.special.softmax(r, axis=-1)
    ent = (-(p * np.log(p)).sum(-1) / math.log(e)).mean()
    idx = np.argsort(-r, axis=-1)[:, :top_k]
    f = np.bincount(idx.reshape(-1), minlength=e) / (r.shape[0] * top_k)
    return ent, e * f.max(), e * (f * p.mean(0)).sum()


def test_moe_router_entropy_imbalance_and_aux_match_numpy():
    torch.manual_seed(0)
    net = MoENet().train()
    det = MoERouter(top_k=2)
    det.setup(net, None)
    assert det.routers == ["layers.0.router", "layers.1.router"]
    seen = {}
    for i, layer in enumerate(net.layers):
        layer.router.register_forward_hook(lambda m, a, o, i=i: seen.setdefault(i, []).append(_np(o)))
    for _ in range(2):                                      # two forwards accumulate
        net(torch.randn(3, 5, 8)).sum().backward()
    refs = [_ref_router(np.concatenate(seen[i]), 2) for i in range(2)]
    out = det.compute(_tel())
    assert float(out["entropy"]) == pytest.approx(min(r[0] for r in refs), rel=1e-6)
    assert float(out["imbalance"]) == pytest.approx(max(r[1] for r in refs), rel=1e-9)
    assert float(out["aux"]) == pytest.approx(max(r[2] for r in refs), rel=1e-6)
    assert float(out["worst_layer"]) == float(np.argmax([r[1] for r in refs]))
    # collapse: layer 1 sends every token to expert 3 first
    with torch.no_grad():
        net.layers[1].router.bias.copy_(torch.tensor([0.0, 0.0, 5.0, 50.0]))
    net(torch.randn(4, 5, 8))
    out = det.compute(_tel(1))
    assert float(out["worst_layer"]) == 1.0
    assert float(out["imbalance"]) == pytest.approx(4 * 0.5)   # top-2: expert 3 takes half the slots
    assert float(out["entropy"]) < 0.01
    # resume mid-accumulation continues identically
    net(torch.randn(2, 5, 8))
    other = MoERouter(top_k=2)
    other.setup(net, None)
    other.load_state_dict(det.state_dict())
    assert {k: float(v) for k, v in other.compute(_tel(2)).items()} == \
        {k: float(v) for k, v in det.compute(_tel(2)).items()}
    det.close()
    other.close()
    with pytest.raises(ValueError, match=r"router_pattern '\*\.gate' matched no module"):
        MoERouter(router_pattern="*.gate").setup(net, None)


def _guard_with(tmp_path, detector: str, signal: str, seed: int, count: str):
    """A demo GPT governed by an audit policy of one detector, ``det``, due every 3 steps (its
    rule never fires), whose method ``count`` logs each call: ``(guard, model, optimizer,
    calls)``."""
    from lbw_policy import Guard
    from lbw_policy.policy import loads_policy

    policy = loads_policy(f"""
apiVersion: lbw-policy/v1
kind: Policy
metadata: {{name: t}}
mode: audit
detectors:
  det: {{{detector}, every: 3}}
actuators:
  skip_step: {{}}
rules:
  - name: r
    when: {{signal: det.{signal}, op: ">", value: 1000000000}}
    then: [{{actuator: skip_step}}]
""")
    model = _gpt(seed=seed).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    guard = Guard(opt, policy, model=model, log_dir=tmp_path)
    det = guard.detectors["det"]
    assert det.every == 3
    calls, real = [], getattr(det, count)
    setattr(det, count, lambda *args: calls.append(1) or real(*args))
    return guard, model, opt, calls


def _train_8_steps(guard, model, opt, calls: list, observe):
    """8 governed steps; returns the steps whose forward grew ``calls`` (the detector's capture
    log) and ``[(StepResult, observe(logits))]`` per step. Closes the guard."""
    gen = torch.Generator().manual_seed(0)
    captured_at, results = [], []
    for step in range(8):
        before = len(calls)
        x = torch.randint(0, 11, (3, 12), generator=gen)
        logits, loss = model(x, x)
        loss.backward()
        if len(calls) > before:
            captured_at.append(step)
        results.append((guard.step(loss), observe(logits)))
        opt.zero_grad(set_to_none=True)
    guard.close()
    return captured_at, results


def test_attention_logits_under_a_guard_captures_only_the_forwards_of_due_steps(tmp_path):
    guard, model, opt, slices = _guard_with(
        tmp_path, "type: attention_logits, params: {max_batch: 2, max_queries: 5}", "max_logit", seed=4,
        count="_slice")
    seen, handles = _capture_linear(model)
    captured_at, results = _train_8_steps(guard, model, opt, slices, lambda logits: [
        _ref_logits(seen[f"blocks.{i}.attn.q_proj"][:2, -5:], seen[f"blocks.{i}.attn.k_proj"][:2], 4)
        for i in range(2)])
    for h in handles:
        h.remove()
    assert captured_at == [0, 3, 6]                  # one q and one k slice per layer, due steps only
    assert len(slices) == 3 * 2 * 2
    for step in (3, 6):                              # the due step's own forward is the one measured
        res, refs = results[step]
        assert res.signals["det.max_logit"] == pytest.approx(max(r[0] for r in refs), rel=1e-5)
        assert res.signals["det.min_entropy"] == pytest.approx(min(r[1].min() for r in refs), rel=1e-5)


def test_logit_divergence_under_a_guard_reads_only_the_forwards_of_due_steps(tmp_path):
    guard, model, opt, captures = _guard_with(
        tmp_path, "type: logit_divergence, params: {warmup: 1, max_batch: 2}", "drift", seed=5, count="_capture")
    captured_at, results = _train_8_steps(
        guard, model, opt, captures, lambda logits: scipy.special.logsumexp(_np(logits)[:2], axis=-1).reshape(-1))
    assert captured_at == [0, 3, 6]
    for step in (0, 3, 6):                            # the due step's own forward, nothing else
        res, lz = results[step]
        assert res.signals["det.logz"] == pytest.approx(lz.mean(), rel=1e-6)
        assert res.signals["det.max_logz"] == pytest.approx(lz.max(), rel=1e-6)
    assert results[6][0].signals["det.drift"] == pytest.approx(results[6][1].mean() - results[0][1].mean(),
                                                                rel=1e-6)
