"""Built-in detectors against values computed independently, in plain Python."""

from __future__ import annotations

import math

import pytest
import torch

from lbw_policy.detectors import GradNorm, LossSpike, NonFinite
from lbw_policy.telemetry import Telemetry


def _ref_ema_z(series, alpha, warmup, eps=1e-8):
    """Reference: z_t against the weighted mean/variance of the finite losses before t."""
    mean = var = None
    n = 0
    out = []
    for x in series:
        if not math.isfinite(x):
            out.append(math.nan)
            continue
        if n >= warmup:
            out.append((x - mean) / math.sqrt(var + eps))
        else:
            out.append(0.0)
        if n == 0:
            mean, var = x, 0.0
        else:
            d = x - mean
            mean = mean + (1 - alpha) * d
            var = alpha * (var + (1 - alpha) * d * d)
        n += 1
    return out


class _Opt:
    """Just enough of an optimizer for Telemetry: param_groups."""

    def __init__(self, params):
        self.param_groups = [{"params": list(params), "lr": 0.1}]


def _tel(step, loss, params=()):
    return Telemetry(step, torch.tensor(loss), _Opt(params))


def test_loss_spike_matches_hand_computed_series():
    series = [3.0, 2.9, 2.95, 2.8, 2.85, 2.7, 2.75, 2.72, 6.0, 2.7, float("nan"), 2.65, float("inf"), 2.6]
    det = LossSpike(alpha=0.8, warmup=3)
    # The loss tensor is float32: the reference sees the same rounded values.
    expected = _ref_ema_z([float(torch.tensor(x)) for x in series], alpha=0.8, warmup=3)
    got = [float(det.compute(_tel(i, x))["zscore"]) for i, x in enumerate(series)]
    for g, e in zip(got, expected):
        if math.isnan(e):
            assert math.isnan(g)
        else:
            assert g == pytest.approx(e, rel=1e-9, abs=1e-9)
    # The spike at index 8 is far above 4 sigma; nothing during warm-up fires.
    assert got[8] > 4 and got[:3] == [0.0, 0.0, 0.0]
    # delta = loss - EMA of the earlier finite losses, from the second loss on (no warm-up).
    det = LossSpike(alpha=0.5, warmup=10)
    deltas = [float(det.compute(_tel(i, x))["delta"]) for i, x in enumerate([2.0, 3.0, 2.0, float("nan"), 4.0])]
    # means before each step: -, 2.0, 2.5, 2.25, 2.25 (the NaN is skipped)
    assert deltas[:3] == [0.0, 1.0, -0.5] and math.isnan(deltas[3]) and deltas[4] == 1.75


def test_loss_spike_nonfinite_never_poisons_statistics():
    clean = LossSpike(alpha=0.9, warmup=2)
    dirty = LossSpike(alpha=0.9, warmup=2)
    for i, x in enumerate([2.0, 2.1, 1.9, 2.05]):
        clean.compute(_tel(i, x))
        dirty.compute(_tel(i, x))
        dirty.compute(_tel(i, float("nan")))
        dirty.compute(_tel(i, float("-inf")))
    assert dirty.state_dict() == clean.state_dict()
    a = float(clean.compute(_tel(9, 2.5))["zscore"])
    b = float(dirty.compute(_tel(9, 2.5))["zscore"])
    assert a == b and a > 0


def test_loss_spike_state_dict_round_trip_continues_identically():
    a = LossSpike(alpha=0.9, warmup=2)
    for i, x in enumerate([2.0, 2.2, 1.8, 2.1]):
        a.compute(_tel(i, x))
    b = LossSpike(alpha=0.9, warmup=2)
    b.load_state_dict(a.state_dict())
    for i, x in enumerate([2.4, 1.7, 5.0]):
        assert float(a.compute(_tel(i, x))["zscore"]) == float(b.compute(_tel(i, x))["zscore"])


def test_grad_norm_is_global_l2_and_ratio_to_ema():
    p1 = torch.nn.Parameter(torch.zeros(3))
    p2 = torch.nn.Parameter(torch.zeros(2, 2))
    det = GradNorm(alpha=0.5, warmup=2)
    grads = [([3.0, 0.0, 0.0], [[0.0, 4.0], [0.0, 0.0]]),   # norm 5
             ([1.0, 0.0, 0.0], [[0.0, 0.0], [0.0, 0.0]]),   # norm 1
             ([6.0, 0.0, 0.0], [[8.0, 0.0], [0.0, 0.0]])]   # norm 10
    norms = []
    ratios = []
    for i, (g1, g2) in enumerate(grads):
        p1.grad = torch.tensor(g1)
        p2.grad = torch.tensor(g2)
        out = det.compute(Telemetry(i, torch.tensor(1.0), _Opt([p1, p2])))
        norms.append(float(out["norm"]))
        ratios.append(float(out["ratio"]))
    assert norms == pytest.approx([5.0, 1.0, 10.0])
    # EMA: 5 (first), then 5 + 0.5*(1-5) = 3; ratio at step 2 = 10 / 3; warm-up gives 1.0 before.
    assert ratios == pytest.approx([1.0, 1.0, 10.0 / 3.0])


def test_grad_norm_reduction_is_shared_by_every_detector(monkeypatch):
    calls = []
    real = torch.nn.utils.get_total_norm
    monkeypatch.setattr(torch.nn.utils, "get_total_norm", lambda *a, **k: calls.append(1) or real(*a, **k))
    p = torch.nn.Parameter(torch.zeros(4))
    p.grad = torch.tensor([1.0, float("nan"), 0.0, 0.0])
    tel = Telemetry(0, torch.tensor(1.0), _Opt([p]))
    g = GradNorm().compute(tel)["norm"]
    assert math.isnan(g) and math.isnan(float(tel.grad_norm))
    out = NonFinite().compute(tel)
    assert len(calls) == 1  # one reduction per step, however many detectors read it
    assert float(out["grads"]) == 1.0 and float(out["loss"]) == 0.0 and float(out["any"]) == 1.0


@pytest.mark.parametrize("loss, grad, expect", [
    (1.0, [1.0, 2.0], (0.0, 0.0, 0.0)),
    (float("nan"), [1.0, 2.0], (1.0, 0.0, 1.0)),
    (float("inf"), [1.0, 2.0], (1.0, 0.0, 1.0)),
    (1.0, [float("inf"), 2.0], (0.0, 1.0, 1.0)),
    (1.0, [3e38, 3e38], (0.0, 1.0, 1.0)),   # the float32 sum of squares overflows
])
def test_nonfinite(loss, grad, expect):
    p = torch.nn.Parameter(torch.zeros(2))
    p.grad = torch.tensor(grad)
    out = NonFinite().compute(Telemetry(0, torch.tensor(loss), _Opt([p])))
    assert (float(out["loss"]), float(out["grads"]), float(out["any"])) == expect


def test_telemetry_rejects_non_scalar_loss():
    with pytest.raises(ValueError, match=r"loss must be a scalar tensor, got shape \(2,\)"):
        Telemetry(0, torch.ones(2), _Opt([]))


def _series(n=300, seed=0):
    """Losses and gradients with noise, a trend, spikes, NaN and Inf."""
    g = torch.Generator().manual_seed(seed)
    losses = (3.0 - torch.linspace(0, 1, n) + 0.05 * torch.randn(n, generator=g)).tolist()
    grads = (1.0 + 0.2 * torch.randn(n, 3, generator=g)).tolist()
    for i in (40, 41, 120):
        losses[i] += 2.0
    for i, bad in ((60, math.nan), (61, math.inf), (200, -math.inf)):
        losses[i] = bad
    grads[90][1] = math.nan
    grads[150][0] = math.inf
    grads[151] = [3e38, 3e38, 0.0]           # the float32 sum of squares overflows
    return losses, grads


@pytest.mark.parametrize("make", [lambda: LossSpike(warmup=5), lambda: LossSpike(method="cusum", warmup=5),
                                  lambda: GradNorm(warmup=5), NonFinite],
                         ids=["ema", "cusum", "grad_norm", "nonfinite"])
def test_cpu_floats_give_bit_for_bit_the_tensor_path(make):
    """On the CPU the statistics run on Python floats (detectors/_ema.py); with the switch off
    they run as float64 tensors, as on an accelerator. Same values, across NaN, Inf, spikes and
    a resume from state_dict at step 150: to the last bit, except where a z-score divides by a
    square root (torch's CPU float64 sqrt is off by one ulp for about 1 % of inputs; math.sqrt
    is correctly rounded)."""
    losses, grads = _series()

    def run(host_scalars):
        p = torch.nn.Parameter(torch.zeros(3))
        det, out = make(), []
        for step, (loss, grad) in enumerate(zip(losses, grads)):
            if step == 150:
                state = det.state_dict()
                det = make()
                det.load_state_dict(state)
            p.grad = torch.tensor(grad)
            values = det.compute(Telemetry(step, torch.tensor(loss), _Opt([p]),
                                           host_scalars=host_scalars))
            assert all(isinstance(v, float) == host_scalars for v in values.values())
            out.append({k: float(v) for k, v in values.items()})
        return out, det.state_dict()

    (tensors, t_state), (floats, f_state) = run(False), run(True)
    assert f_state == t_state                # the EMA itself (no sqrt): bit for bit
    assert [row.keys() for row in floats] == [row.keys() for row in tensors]
    for step, (f, t) in enumerate(zip(floats, tensors)):
        for key in f:
            if key in ("zscore", "cusum"):
                assert math.isclose(f[key], t[key], rel_tol=1e-14, abs_tol=1e-300) or \
                    (math.isnan(f[key]) and math.isnan(t[key])), (step, key, f[key], t[key])
            else:                            # repr: NaN == NaN, and -0.0 != 0.0
                assert repr(f[key]) == repr(t[key]), (step, key, f[key], t[key])
    assert any(math.isnan(v) or math.isinf(v) or v == 1.0 for row in floats for v in row.values())
