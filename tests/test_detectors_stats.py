"""Statistical detectors (loss_spike variants, grad_norm_trend, the device ring buffer) against
references computed independently with numpy / scipy / plain Python."""

from __future__ import annotations

import math
from collections import deque

import numpy as np
import pytest
import scipy.stats
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lbw_policy.detectors import GradNormTrend, LossSpike
from lbw_policy.detectors._ring import Ring, masked_median, to_device
from lbw_policy.detectors.grad_norm_trend import theil_sen_mann_kendall
from lbw_policy.errors import PolicyError
from lbw_policy.policy import loads_policy
from lbw_policy.telemetry import Telemetry


class _Opt:
    def __init__(self, params=()):
        self.param_groups = [{"params": list(params), "lr": 0.1}]


def _tel(step, loss, params=()):
    return Telemetry(step, torch.tensor(loss), _Opt(params))


def _f32(xs):
    """The float32-rounded values the detector sees (the loss tensor is float32)."""
    return [float(np.float32(x)) for x in xs]


SERIES = [3.0, 2.9, 2.95, 2.8, 2.85, 2.7, 2.75, 2.72, 6.0, 2.7, float("nan"), 2.65, float("inf"),
          2.6, 2.62, 2.9, 3.1, 3.3, 3.2, 3.5, 3.4]


# ----------------------------------------------------------------------------- ring / median

@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(-1e6, 1e6, allow_nan=False, allow_subnormal=False), min_size=1, max_size=40),
       st.data())
def test_masked_median_matches_numpy(values, data):
    mask = data.draw(st.lists(st.booleans(), min_size=len(values), max_size=len(values)))
    got = masked_median(torch.tensor(values, dtype=torch.float64), torch.tensor(mask))
    kept = [v for v, m in zip(values, mask) if m]
    if not kept:
        assert math.isnan(float(got))
    else:
        assert float(got) == pytest.approx(float(np.median(kept)), rel=1e-12, abs=1e-12)


def test_ring_keeps_the_last_finite_values():
    ring = Ring(3)
    for i, x in enumerate([1.0, 2.0, float("nan"), 4.0]):
        ring.push(torch.tensor(x), step=i)
    held = sorted((s, v) for s, v, ok in zip(ring.steps.tolist(), ring.values.tolist(), ring.valid.tolist()) if ok)
    assert held == [(0.0, 1.0), (1.0, 2.0), (3.0, 4.0)] and int(ring.count) == 3
    for i, x in enumerate([5.0, float("inf"), -float("inf")]):
        ring.push(torch.tensor(x), step=4 + i)
    held = sorted((s, v) for s, v, ok in zip(ring.steps.tolist(), ring.values.tolist(), ring.valid.tolist()) if ok)
    assert held == [(1.0, 2.0), (3.0, 4.0), (4.0, 5.0)]
    copy = Ring(3)
    copy.load_state_dict(ring.state_dict())
    assert torch.equal(copy.values, ring.values) and torch.equal(copy.valid, ring.valid)
    assert int(copy.pos) == int(ring.pos)



def test_ring_restored_stays_in_host_memory_until_its_first_push_and_to_device():
    """A restored ring is built in host memory (torch.tensor(list, device="cuda") would be a
    blocking copy) and moved by ensure() on its first push; to_device is a no-op on the same
    device and converts the dtype on request."""
    ring = Ring(4)
    for i, x in enumerate([3.0, 1.0, 2.0]):
        ring.push(torch.tensor(x), step=i)
    copy = Ring(4)
    copy.load_state_dict(ring.state_dict())
    assert copy.values.device.type == "cpu" and copy.values.dtype == torch.float64
    for r in (ring, copy):
        r.push(torch.tensor(5.0), step=3)
    assert torch.equal(copy.values, ring.values) and torch.equal(copy.steps, ring.steps)
    assert torch.equal(copy.valid, ring.valid) and int(copy.pos) == int(ring.pos)
    t = torch.arange(3, dtype=torch.float64)
    assert to_device(t, "cpu") is t
    assert to_device(t, "cpu", torch.float32).dtype == torch.float32


# ----------------------------------------------------------------------------- loss_spike: mad

def _ref_mad(series, window, warmup, eps=1e-8):
    hist = deque(maxlen=window)
    z, med = [], []
    for x in series:
        if hist:
            m = float(np.median(hist))
            mad = float(np.median(np.abs(np.array(hist) - m)))
            zz = (x - m) / math.sqrt((1.4826 * mad) ** 2 + eps)
        else:
            m, zz = math.nan, 0.0
        if not math.isfinite(x):
            z.append(math.nan)
        else:
            z.append(zz if len(hist) >= warmup else 0.0)
            hist.append(x)
        med.append(m)
    return z, med


def test_loss_spike_mad_matches_numpy_reference():
    det = LossSpike(method="mad", window=6, warmup=4)
    got = [det.compute(_tel(i, x)) for i, x in enumerate(SERIES)]
    ref_z, ref_med = _ref_mad(_f32(SERIES), window=6, warmup=4)
    for g, z, m in zip(got, ref_z, ref_med):
        assert set(g) == {"zscore", "median", "delta"}
        if math.isnan(z):
            assert math.isnan(float(g["zscore"]))
        else:
            assert float(g["zscore"]) == pytest.approx(z, rel=1e-9, abs=1e-9)
        if not math.isnan(m):
            assert float(g["median"]) == pytest.approx(m, rel=1e-12)
    zs = [float(g["zscore"]) for g in got]
    assert zs[:4] == [0.0] * 4          # warm-up never fires
    assert zs[8] > 10                   # the spike
    # the spike moved neither the median nor the MAD much: step 9 is ordinary again
    assert abs(zs[9]) < 2


def test_loss_spike_mad_nonfinite_never_poisons():
    clean, dirty = LossSpike(method="mad", window=5, warmup=2), LossSpike(method="mad", window=5, warmup=2)
    for i, x in enumerate([2.0, 2.1, 1.9, 2.05, 2.2, 1.95, 2.0]):
        clean.compute(_tel(i, x))
        dirty.compute(_tel(i, x))
        dirty.compute(_tel(i, float("nan")))
        dirty.compute(_tel(i, float("-inf")))
    a, b = clean.compute(_tel(9, 2.5)), dirty.compute(_tel(9, 2.5))
    assert float(a["zscore"]) == float(b["zscore"]) and float(a["median"]) == float(b["median"])


# ----------------------------------------------------------------------------- loss_spike: cusum

def _ref_cusum(series, alpha, warmup, k, eps=1e-8):
    mean = var = None
    n = 0
    c = 0.0
    out = []
    for x in series:
        if math.isfinite(x):
            if n >= warmup:
                c = max(0.0, c + (x - mean) / math.sqrt(var + eps) - k)
            if n == 0:
                mean, var = x, 0.0
            else:
                d = x - mean
                mean += (1 - alpha) * d
                var = alpha * (var + (1 - alpha) * d * d)
            n += 1
        out.append(c)
    return out


def test_loss_spike_cusum_matches_reference_and_accumulates_a_small_rise():
    det = LossSpike(method="cusum", alpha=0.8, warmup=3, k=0.5)
    got = [float(det.compute(_tel(i, x))["cusum"]) for i, x in enumerate(SERIES)]
    ref = _ref_cusum(_f32(SERIES), alpha=0.8, warmup=3, k=0.5)
    assert got == pytest.approx(ref, rel=1e-9, abs=1e-9)
    assert got[:3] == [0.0, 0.0, 0.0]
    # a slow drift: no z-score above 3, but the CUSUM climbs past 5
    det = LossSpike(method="cusum", alpha=0.9, warmup=5, k=0.25)
    series = [2.0 + 0.01 * ((i * 7) % 5) for i in range(20)] + [2.05 + 0.02 * i for i in range(20)]
    outs = [det.compute(_tel(i, x)) for i, x in enumerate(series)]
    assert max(float(o["zscore"]) for o in outs) < 3.5 and float(outs[-1]["cusum"]) > 5


def test_loss_spike_state_round_trip_every_method():
    for params in ({"method": "ema"}, {"method": "mad", "window": 8}, {"method": "cusum", "k": 0.3}):
        a = LossSpike(warmup=3, **params)
        for i, x in enumerate([2.0, 2.2, 1.8, 2.1, float("nan"), 2.3]):
            a.compute(_tel(i, x))
        b = LossSpike(warmup=3, **params)
        b.load_state_dict(a.state_dict())
        for i, x in enumerate([2.4, 1.7, 5.0, 2.0]):
            ga, gb = a.compute(_tel(i, x)), b.compute(_tel(i, x))
            assert {k: float(v) for k, v in ga.items()} == {k: float(v) for k, v in gb.items()}, params


POLICY = """
apiVersion: lbw-policy/v1
kind: Policy
metadata: {{name: t}}
detectors:
  d: {{type: {type}, params: {params}}}
actuators:
  skip_step: {{max_consecutive: 2}}
rules:
  - name: r
    when: {{signal: {signal}, op: ">", value: 1}}
    then: [{{actuator: skip_step}}]
"""


@pytest.mark.parametrize("type_, params, message", [
    ("loss_spike", "{method: mad, alpha: 0.9}", r"alpha applies to method ema or cusum only, not method 'mad'"),
    ("loss_spike", "{method: ema, window: 9}", r"window applies to method mad only"),
    ("loss_spike", "{method: mad, window: 8, warmup: 9}", r"warmup \(9\) must be <= window \(8\)"),
    ("loss_spike", "{method: median}", r"median"),
    ("grad_norm_trend", "{window: 8, min_points: 9}", r"min_points \(9\) must be <= window \(8\)"),
])
def test_cross_field_checks_at_policy_load(type_, params, message):
    with pytest.raises(PolicyError, match=message):
        loads_policy(POLICY.format(type=type_, params=params, signal="d.zscore"))


def test_signals_depend_on_the_method():
    pol = loads_policy(POLICY.format(type="loss_spike", params="{method: cusum}", signal="d.cusum"))
    assert set(pol.signals()) == {"d.cusum", "d.zscore", "d.ema", "d.delta"}
    with pytest.raises(PolicyError, match=r"unknown signal 'd\.cusum'"):
        loads_policy(POLICY.format(type="loss_spike", params="{method: mad}", signal="d.cusum"))


# ----------------------------------------------------------------------------- grad_norm_trend

def _ref_mann_kendall(y):
    """Mann-Kendall with tie correction and continuity correction (Hipel & McLeod 1994)."""
    y = np.asarray(y, dtype=float)
    n = len(y)
    s = sum(np.sign(y[j] - y[i]) for i in range(n) for j in range(i + 1, n))
    _, t = np.unique(y, return_counts=True)
    var = (n * (n - 1) * (2 * n + 5) - np.sum(t * (t - 1) * (2 * t + 5))) / 18.0
    z = (s - np.sign(s)) / math.sqrt(var) if var > 0 else 0.0
    return s, var, 2 * scipy.stats.norm.sf(abs(z))


@settings(max_examples=40, deadline=None)
@given(st.lists(st.floats(-50, 50, allow_nan=False, allow_subnormal=False), min_size=3, max_size=30))
def test_theil_sen_and_mann_kendall_match_scipy(ys):
    ys = [round(v, 1) for v in ys]   # rounding makes ties common: the tie correction is exercised
    x = torch.arange(len(ys), dtype=torch.float64) * 3.0
    out = theil_sen_mann_kendall(torch.tensor(ys, dtype=torch.float64), x, torch.ones(len(ys), dtype=torch.bool))
    slope = scipy.stats.theilslopes(ys, x.numpy())[0]
    assert float(out["slope"]) == pytest.approx(slope, rel=1e-9, abs=1e-12)
    s, var, p = _ref_mann_kendall(ys)
    assert float(out["S"]) == s and float(out["var"]) == pytest.approx(var)
    assert float(out["p"]) == pytest.approx(p, rel=1e-9, abs=1e-12)


def test_mann_kendall_s_is_kendall_tau_without_ties():
    rng = np.random.default_rng(0)
    y = np.cumsum(rng.normal(0.05, 1.0, 40))
    out = theil_sen_mann_kendall(torch.tensor(y), torch.arange(40.0, dtype=torch.float64), torch.ones(40, dtype=torch.bool))
    tau = scipy.stats.kendalltau(np.arange(40), y).statistic
    assert float(out["S"]) == pytest.approx(tau * 40 * 39 / 2)
    # without the continuity correction the p-value is scipy's asymptotic Kendall test
    z_nc = float(out["S"]) / math.sqrt(float(out["var"]))
    assert 2 * scipy.stats.norm.sf(abs(z_nc)) == pytest.approx(
        scipy.stats.kendalltau(np.arange(40), y, method="asymptotic").pvalue, rel=1e-9)


def _grads(norms):
    p = torch.nn.Parameter(torch.zeros(1))
    for n in norms:
        p.grad = torch.tensor([n], dtype=torch.float32)
        yield p


def test_grad_norm_trend_window_matches_scipy_on_the_last_finite_norms():
    rng = np.random.default_rng(1)
    norms = list(np.exp(0.03 * np.arange(50) + rng.normal(0, 0.2, 50)).astype(np.float32))
    norms[20], norms[33], norms[45] = float("nan"), float("inf"), 0.0   # never entered
    det = GradNormTrend(window=16, min_points=5)
    outs = []
    for step, p in enumerate(_grads(norms)):
        outs.append(det.compute(Telemetry(step, torch.tensor(1.0), _Opt([p]))))
    # reference at the end: the window holds the last 16 finite, positive norms
    steps = [s for s in range(50) if np.isfinite(norms[s]) and norms[s] > 0][-16:]
    y = np.log(np.array([norms[s] for s in steps], dtype=np.float64))
    slope = scipy.stats.theilslopes(y, steps)[0]
    _, _, p = _ref_mann_kendall(y)
    last = outs[-1]
    assert float(last["slope"]) == pytest.approx(slope, rel=1e-9)
    assert float(last["growth"]) == pytest.approx(math.expm1(slope * (steps[-1] - steps[0])), rel=1e-9)
    assert float(last["p"]) == pytest.approx(p, rel=1e-9)
    assert float(last["slope"]) > 0 and float(last["p"]) < 0.05
    # warm-up: fewer than 5 finite norms -> neutral values, never fires
    assert all(float(o["slope"]) == 0 and float(o["p"]) == 1 for o in outs[:4])
    # resume continues identically
    again = GradNormTrend(window=16, min_points=5)
    again.load_state_dict(det.state_dict())
    more = [3.0, 3.5, 4.0]
    for i, p in enumerate(_grads(more)):
        a = det.compute(Telemetry(50 + i, torch.tensor(1.0), _Opt([p])))
        b = again.compute(Telemetry(50 + i, torch.tensor(1.0), _Opt([p])))
        assert {k: float(v) for k, v in a.items()} == {k: float(v) for k, v in b.items()}
