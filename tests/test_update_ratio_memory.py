"""update_ratio without a second copy of the model: a tensor larger than ``sketch`` is measured
on a fixed systematic sample of its elements (memory O(sketch) per tensor), smaller ones
exactly as before (bit-identical); the sketch estimate against a hand computation under AdamW."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lbw_policy.demo.gpt import GPT, GPTConfig
from lbw_policy.detectors import UpdateRatio
from lbw_policy.detectors.update_ratio import DEFAULT_SKETCH, _dense, _stride_for
from lbw_policy.telemetry import Telemetry


def _held_bytes(obj, seen=None) -> int:
    """Bytes of every tensor reachable from ``obj``'s attributes (through lists, tuples, dicts
    and named tuples), each storage counted once."""
    seen = set() if seen is None else seen
    if isinstance(obj, torch.Tensor):
        st = obj.untyped_storage()
        if st.data_ptr() in seen:
            return 0
        seen.add(st.data_ptr())
        return st.nbytes()
    if isinstance(obj, dict):
        return sum(_held_bytes(v, seen) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_held_bytes(v, seen) for v in obj)
    if isinstance(obj, UpdateRatio):
        return sum(_held_bytes(v, seen) for v in vars(obj).values())
    return 0


def _step(det, opt, step, grads):
    """One due step: compute, optimizer step, after_step. Returns compute's output."""
    for p, g in zip((p for group in opt.param_groups for p in group["params"]), grads):
        p.grad = g.clone()
    tel = Telemetry(step, torch.tensor(1.0), opt)
    out = det.compute(tel)
    opt.step()
    det.after_step(tel, True)
    return out


def _by_hand(params, opt, grads):
    """Exact per-tensor ||dW|| and ||W|| (float64) of one step of ``opt`` with ``grads``."""
    for p, g in zip(params, grads):
        p.grad = g.clone()
    before = [p.detach().double().clone() for p in params]
    opt.step()
    d = [torch.linalg.vector_norm(p.detach().double() - b).item() for p, b in zip(params, before)]
    w = [torch.linalg.vector_norm(b).item() for b in before]
    return d, w


def _global(d, w, ids):
    return math.sqrt(sum(d[i] ** 2 for i in ids)) / math.sqrt(sum(w[i] ** 2 for i in ids))


def _linears(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 1024)).to(dtype)


# ----------------------------------------------------------------------------- memory

@pytest.mark.parametrize("sketch", [None, 4096])
def test_persistent_memory_is_far_below_a_copy_of_the_weights(sketch):
    net = _linears()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    det = UpdateRatio() if sketch is None else UpdateRatio(sketch=sketch)
    det.setup(net, opt)
    copy_bytes = sum(p.numel() * p.element_size() for p in net.parameters() if p.dim() >= 2)  # 8 MiB
    largest = max(p.numel() * p.element_size() for p in net.parameters())                    # 4 MiB
    after_setup = _held_bytes(det)
    gen = torch.Generator().manual_seed(0)
    for step in range(3):
        out = _step(det, opt, step, [torch.randn(p.shape, generator=gen) for p in net.parameters()])
    assert set(out) >= {"ratio", "max", "worst"}
    held = _held_bytes(det)
    m = DEFAULT_SKETCH if sketch is None else sketch
    # two sketched matrices: at most m float32 values each, plus a few small vectors
    assert after_setup <= held <= 2 * m * 4 + 4096
    assert held < largest / 4 and held < copy_bytes / 8                # 482 KiB against 8 MiB
    if sketch == 4096:
        assert held < copy_bytes / 200                                  # 33 KiB


def test_exact_mode_holds_a_full_copy():
    """The counter sees the copy the exact path keeps (``sketch: 0``), so the test above counts."""
    net = _linears()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    det = UpdateRatio(sketch=0)
    det.setup(net, opt)
    _step(det, opt, 0, [torch.randn(p.shape) for p in net.parameters()])
    assert _held_bytes(det) >= sum(p.numel() * p.element_size() for p in net.parameters() if p.dim() >= 2)


def test_buffers_are_allocated_once_and_follow_new_parameters():
    net = _linears()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    det = UpdateRatio(sketch=4096, groups=2)    # no setup: one group so far, built at compute
    for step in range(3):
        _step(det, opt, step, [torch.randn(p.shape) for p in net.parameters()])
        if step == 0:
            ptrs = [b.data_ptr() for b in det._layout.buffers]
    assert [b.data_ptr() for b in det._layout.buffers] == ptrs     # no allocation per step
    extra = nn.Parameter(torch.ones(100, 100))                   # 10000 > 4096: sketched
    opt.add_param_group({"params": [extra], "lr": 0.5})
    _step(det, opt, 3, [1e-3 * torch.randn(p.shape) for p in net.parameters()] + [torch.ones(100, 100)])
    out = det.compute(Telemetry(4, torch.tensor(1.0), opt))
    assert len(det._layout.buffers) == 3 and len(det._layout.sketched) == 3
    # a constant change of a constant tensor: every sample gives the exact ratio
    assert float(out["group1.ratio"]) == pytest.approx(0.5, rel=1e-6)
    assert float(out["group1.max"]) == pytest.approx(0.5, rel=1e-6)
    assert float(out["worst"]) == 4.0


# ----------------------------------------------------------------------------- the sample

@pytest.mark.parametrize("n,m", [(1000, 64), (1024, 256), (65537, 65536), (98304, 65536), (768 * 3072, 4096),
                                 (4096 * 11008, 65536)])
def test_stride_is_the_smallest_coprime_to_n_and_keeps_at_most_m_samples(n, m):
    s = _stride_for(n, m)
    assert math.gcd(s, n) == 1 and s * m >= n
    assert all(math.gcd(t, n) != 1 for t in range(-(-n // m), s))         # the smallest such
    assert max(-(-(n - o) // s) for o in range(s)) <= m                     # every start: <= m samples


def test_horvitz_thompson_estimate_is_unbiased():
    """The mean of ``s * ||x[o::s]||^2`` over the starts ``o`` is ``||x||^2``: each element is in
    exactly one of the ``s`` samples."""
    n, m = 1000, 64
    x = torch.randn(n, dtype=torch.float64) * torch.linspace(0.1, 3.0, n, dtype=torch.float64)
    s = _stride_for(n, m)
    est = torch.tensor([s * float(x[o::s].pow(2).sum()) for o in range(s)], dtype=torch.float64)
    assert float(est.mean()) == pytest.approx(float(x.pow(2).sum()), rel=1e-12)


def test_dense_layouts_are_sketched_and_a_tensor_with_gaps_is_measured_exactly():
    base = torch.randn(64, 32, 3, 3)
    assert _dense(base) and _dense(base.permute(1, 0, 2, 3)) and _dense(torch.randn(30, 40).t())
    assert _dense(base.to(memory_format=torch.channels_last)) and _dense(torch.randn(1, 1000)[:, :])
    assert not _dense(base[:, :16]) and not _dense(torch.randn(100, 100)[::2])
    big = torch.randn(400, 300)
    ps = [nn.Parameter(big.t()), nn.Parameter(torch.randn(300, 400)[::1, :200]),
          nn.Parameter(torch.randn(64, 32, 3, 3).to(memory_format=torch.channels_last))]
    opt = torch.optim.SGD(ps, lr=0.1)
    det = UpdateRatio(sketch=4096)
    det.setup(None, opt)
    assert det._layout.sketched == (0, 2) and det._layout.exact == (1,)
    grads = [torch.full(p.shape, 1.0).to(memory_format=torch.channels_last) if p.dim() == 4
             else torch.full(p.shape, 1.0) for p in ps]
    w = [torch.linalg.vector_norm(p.detach().double()).item() for p in ps]
    _step(det, opt, 0, grads)
    out = det.compute(Telemetry(1, torch.tensor(1.0), opt))
    d = [0.1 * math.sqrt(p.numel()) for p in ps]                 # a constant change
    per = [d[i] / w[i] for i in range(3)]
    assert float(out["ratio"]) == pytest.approx(_global(d, w, range(3)), rel=0.05)
    assert float(out["max"]) == pytest.approx(max(per), rel=0.05)


# ----------------------------------------------------------------------------- accuracy

@pytest.mark.parametrize("sketch,tol", [(None, 0.015), (4096, 0.06)])
def test_sketch_matches_the_exact_ratio_under_adamw(sketch, tol):
    """Against a hand computation (copy the weights, step, norms in float64) over AdamW steps,
    two groups with learning rates 10x apart; biases (1-dim) are measured exactly."""
    net = _linears(1)
    groups = [{"params": list(net[0].parameters()), "lr": 1e-4}, {"params": list(net[2].parameters()), "lr": 1e-3}]
    params = [p for g in groups for p in g["params"]]
    det = UpdateRatio(groups=2, matrices_only=False, **({} if sketch is None else {"sketch": sketch}))
    ref_net = _linears(1)
    ref_params = [p for m in (ref_net[0], ref_net[2]) for p in m.parameters()]
    opt = torch.optim.AdamW(groups, weight_decay=0.1)
    ref_opt = torch.optim.AdamW([{"params": ref_params[:2], "lr": 1e-4}, {"params": ref_params[2:], "lr": 1e-3}],
                                weight_decay=0.1)
    det.setup(net, opt)
    assert det._layout.sketched == (0, 2) and det._layout.exact == (1, 3)
    gen = torch.Generator().manual_seed(2)
    ref = None
    for step in range(6):
        row_scale = [(1 + torch.arange(p.shape[0]) / 256).reshape(-1, *[1] * (p.dim() - 1)) for p in params]
        grads = [torch.randn(p.shape, generator=gen) * r for p, r in zip(params, row_scale)]
        out = _step(det, opt, step, grads)
        if ref is not None:
            d, w = ref
            per = [d[i] / w[i] for i in range(4)]
            assert float(out["ratio"]) == pytest.approx(_global(d, w, range(4)), rel=tol)
            assert float(out["group0.ratio"]) == pytest.approx(_global(d, w, [0, 1]), rel=tol)
            assert float(out["group1.ratio"]) == pytest.approx(_global(d, w, [2, 3]), rel=tol)
            assert float(out["group0.max"]) == pytest.approx(max(per[:2]), rel=tol)
            assert float(out["max"]) == pytest.approx(max(per), rel=tol)
            count = sum(p.numel() for p in ref_params)
            assert float(out["rms"]) == pytest.approx(math.sqrt(sum(x * x for x in d) / count), rel=tol)
            top, second = sorted(per)[-1], sorted(per)[-2]
            if top > second * (1 + 3 * tol):                                 # clearly ahead
                assert float(out["worst"]) == per.index(top)
            else:
                assert per[int(out["worst"])] >= second
        ref = _by_hand(ref_params, ref_opt, grads)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_sketch_any_weight_dtype(dtype):
    """Half and float64 weights sampled in their own dtype (norms accumulated in float32 or
    float64), against the hand computation of the same step on a twin model."""
    net, twin = _linears(3, dtype), _linears(3, dtype)
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    det = UpdateRatio(sketch=4096)
    det.setup(net, opt)
    gen = torch.Generator().manual_seed(3)
    grads = [torch.randn(p.shape, generator=gen).to(dtype) for p in net.parameters()]
    _step(det, opt, 0, grads)
    d, w = _by_hand(list(twin.parameters()), torch.optim.SGD(twin.parameters(), lr=0.05), grads)
    out = det.compute(Telemetry(1, torch.tensor(1.0), opt))
    assert out["ratio"].dtype == torch.float64
    assert float(out["ratio"]) == pytest.approx(_global(d, w, [0, 2]), rel=0.06)
    assert float(out["max"]) == pytest.approx(max(d[0] / w[0], d[2] / w[2]), rel=0.06)


def test_mixed_dtypes_sketched_one_by_one():
    torch.manual_seed(0)
    ps = [nn.Parameter(torch.randn(300, 40).to(dt)) for dt in (torch.float32, torch.float64, torch.bfloat16)]
    opt = torch.optim.SGD(ps, lr=0.1)
    det = UpdateRatio(sketch=1000)
    det.setup(None, opt)
    assert det._layout.how[0] is None and len(det._layout.sketched) == 3
    grads = [torch.full(p.shape, 2.0, dtype=p.dtype) for p in ps]
    w = [torch.linalg.vector_norm(p.detach().double()).item() for p in ps]
    _step(det, opt, 0, grads)
    out = det.compute(Telemetry(1, torch.tensor(1.0), opt))
    d = [0.2 * math.sqrt(p.numel()) for p in ps]                   # a constant change: exact in the sketch
    assert float(out["ratio"]) == pytest.approx(_global(d, w, range(3)), rel=0.05)


# ----------------------------------------------------------------------------- exact path, skipped step

def test_small_tensors_are_bit_identical_to_the_exact_path_on_the_demo_gpt():
    """Every tensor of the demo GPT is at most 65536 elements: the default measures them all
    exactly, the same numbers to the last bit as ``sketch: 0``."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=65, block_size=64, n_layer=2, n_head=4, n_embd=128))
    assert max(p.numel() for p in model.parameters()) <= DEFAULT_SKETCH
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    dets = [UpdateRatio(groups=1), UpdateRatio(groups=1, sketch=0), UpdateRatio(groups=1, sketch=None)]
    for d in dets:
        d.setup(model, opt)
    assert dets[0]._layout.sketched == () and dets[0]._layout.scale is None
    x = torch.randint(0, 65, (4, 64), generator=torch.Generator().manual_seed(0))
    for step in range(4):
        _, loss = model(x, torch.roll(x, -1, 1))
        loss.backward()
        tel = Telemetry(step, loss, opt, model)
        outs = [d.compute(tel) for d in dets]
        opt.step()
        for d in dets:
            d.after_step(tel, True)
        opt.zero_grad(set_to_none=True)
        assert outs[0].keys() == outs[1].keys() == outs[2].keys()
        for k in outs[0]:
            assert torch.equal(outs[0][k], outs[1][k]) and torch.equal(outs[0][k], outs[2][k]), k


def test_mixed_exact_and_sketched_keep_the_exact_tensors_bit_identical():
    """In a model with both, the exactly measured tensors' ratios are those of ``sketch: 0``."""
    torch.manual_seed(0)
    small = nn.Parameter(torch.randn(8, 8))
    big = nn.Parameter(torch.randn(200, 100))
    opt = torch.optim.SGD([{"params": [small], "lr": 1.0}, {"params": [big], "lr": 1e-3}])
    sk, ex = UpdateRatio(groups=2, sketch=500), UpdateRatio(groups=2, sketch=0)
    for d in (sk, ex):
        d.setup(None, opt)
    gens = [torch.randn(8, 8), torch.randn(200, 100)]
    for step in range(2):
        tel = Telemetry(step, torch.tensor(1.0), opt)
        small.grad, big.grad = gens[0].clone(), gens[1].clone()
        o_sk, o_ex = sk.compute(tel), ex.compute(tel)
        opt.step()
        sk.after_step(tel, True)
        ex.after_step(tel, True)
    assert torch.equal(o_sk["group0.ratio"], o_ex["group0.ratio"])       # the small tensor: exact
    assert torch.equal(o_sk["max"], o_ex["max"]) and float(o_sk["worst"]) == 0.0
    assert float(o_sk["group1.ratio"]) == pytest.approx(float(o_ex["group1.ratio"]), rel=0.1)


def test_sketched_skipped_step_is_zero_and_without_after_step_measures_since_the_copy():
    net = _linears(5)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    det = UpdateRatio(sketch=4096)
    det.setup(net, opt)
    for p in net.parameters():
        p.grad = torch.full_like(p, 0.5)
    tel = Telemetry(0, torch.tensor(1.0), opt)
    det.compute(tel)
    det.after_step(tel, False)                  # skipped: the weights did not move
    out = det.compute(Telemetry(1, torch.tensor(1.0), opt))
    assert float(out["ratio"]) == 0.0 and float(out["max"]) == 0.0 and float(out["group0.ratio"]) == 0.0
    w = [torch.linalg.vector_norm(p.detach().double()).item() for p in net.parameters()]
    opt.step()
    opt.step()                                  # two steps, no after_step in between
    out = det.compute(Telemetry(2, torch.tensor(1.0), opt))
    d = [0.1 * 0.5 * 2 * math.sqrt(p.numel()) for p in net.parameters()]  # constant change: exact in the sketch
    assert float(out["ratio"]) == pytest.approx(_global(d, w, [0, 2]), rel=0.03)


def test_sketch_param_in_a_policy():
    from lbw_policy.policy import PolicyError, loads_policy

    text = """apiVersion: lbw-policy/v1
kind: Policy
metadata: {name: t}
detectors:
  upd: {type: update_ratio, params: {sketch: %s, seed: 3}}
actuators:
  lr_scale: {min: 0.1, max: 1.0}
rules:
  - name: r
    when: {signal: upd.ratio, op: ">", value: 0.1}
    then: [{actuator: lr_scale, multiply: 0.5}]
"""
    for ok in ("4096", "0", "null"):
        loads_policy(text % ok)
    with pytest.raises(PolicyError):
        loads_policy(text % "-1")
    with pytest.raises(PolicyError):
        loads_policy(text % "1.5")


# ----------------------------------------------------------------------------- CUDA

@pytest.mark.gpu
def test_sketched_path_without_host_sync_on_cuda():
    """Sketched (and mixed) measurement under torch.cuda.set_sync_debug_mode("error"), and the
    values against the exact ones."""
    dev = torch.device("cuda")
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 64)).to(dev).to(torch.bfloat16)
    opt = torch.optim.AdamW([{"params": list(net[0].parameters())}, {"params": list(net[2].parameters())}], lr=1e-3)
    dets = [UpdateRatio(groups=2, matrices_only=False), UpdateRatio(groups=2, matrices_only=False, sketch=0)]
    for d in dets:
        d.setup(net, opt)
    assert dets[0]._layout.sketched == (0,)
    x = torch.randn(32, 1024, device=dev, dtype=torch.bfloat16)
    for step in range(4):
        net(x).float().pow(2).mean().backward()
        tel = Telemetry(step, torch.ones((), device=dev), opt)
        if step:
            torch.cuda.set_sync_debug_mode("error")
        try:
            outs = [d.compute(tel) for d in dets]
        finally:
            torch.cuda.set_sync_debug_mode(0)
        opt.step()
        torch.cuda.set_sync_debug_mode("error")
        try:
            for d in dets:
                d.after_step(tel, True)
        finally:
            torch.cuda.set_sync_debug_mode(0)
        opt.zero_grad(set_to_none=True)
        if step:
            for v in outs[0].values():
                assert v.device.type == "cuda" and v.dim() == 0
            for k in ("ratio", "max", "group0.ratio", "group1.ratio"):
                assert float(outs[0][k]) == pytest.approx(float(outs[1][k]), rel=0.03), k
            assert torch.equal(outs[0]["group1.ratio"], outs[1]["group1.ratio"])   # exact tensors only
