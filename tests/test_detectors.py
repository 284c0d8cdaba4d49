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


def test_grad_norm_reduction_is_shared_by_every_detector():
    p = torch.nn.Parameter(torch.zeros(4))
    p.grad = torch.tensor([1.0, float("nan"), 0.0, 0.0])
    tel = Telemetry(0, torch.tensor(1.0), _Opt([p]))
    g = GradNorm().compute(tel)["norm"]
    assert tel.grad_norm is g  # the same cached tensor: one reduction per step
    out = NonFinite().compute(tel)
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
