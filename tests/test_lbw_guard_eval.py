"""policies/lbw-guard-eval.yaml follows LBW-Guard's Eval controller, as implemented
independently in benchmarks/stress.py (``LBWGuardEval``): the same scale at every step on the
same gradients."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from lbw_policy import Guard
from lbw_policy.policy import load_policy, resolve_policy_path

ROOT = Path(__file__).resolve().parents[1]


def _stress():
    spec = importlib.util.spec_from_file_location("stress", ROOT / "benchmarks" / "stress.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("stress", mod)  # its dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


def _gradients(step: int, shapes, gen):
    """Gradients with growth spells, single spikes and sign flips of the mean entry."""
    amp = 1.0 + 0.02 * (step % 37)
    if step in (40, 41, 90):
        amp *= 3.0            # spikes: ratio > 1.5
    if 60 <= step < 75:
        amp *= 1.25           # a moderate rise: 1.1 < ratio < 1.5 at its first collection
    sign = -1.0 if (step // 50) % 2 else 1.0   # the mean gradient flips sign every 50 steps
    return [amp * torch.randn(s, generator=gen) + sign * 0.3 for s in shapes]


@pytest.mark.parametrize("seed", [0, 1])
def test_the_policy_and_the_reference_give_the_same_scale_at_every_step(tmp_path, seed):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Linear(16, 4))
    params = list(model.parameters())
    opt = torch.optim.AdamW(params, lr=1e-3)
    guard = Guard(opt, "lbw-guard-eval", model=model, log_dir=tmp_path / "run")
    ref = _stress().LBWGuardEval()
    gen = torch.Generator().manual_seed(seed)
    ours, theirs, lrs = [], [], []
    for step in range(160):
        for p, g in zip(params, _gradients(step, [p.shape for p in params], gen)):
            p.grad = g
        theirs.append(ref.update(params))
        result = guard.step(torch.tensor(2.0))
        ours.append(result.lr_scale)
        lrs.append(result.lr)
    guard.close()
    assert ours == pytest.approx(theirs, rel=1e-12, abs=1e-12)
    assert lrs == pytest.approx([1e-3 * s for s in theirs], rel=1e-9)
    # every branch of the controller was taken, so the comparison covers them all
    assert min(theirs) < 0.6            # 0.7x / 0.85x brakes
    assert any(b > a for a, b in zip(theirs, theirs[1:]))   # +0.01 raises
    changes = {round(b / a, 6) for a, b in zip(theirs, theirs[1:]) if b < a}
    assert {0.7, 0.85} <= changes


def test_the_policy_loads_and_acts_once_per_collection(tmp_path):
    policy = load_policy(resolve_policy_path("lbw-guard-eval"))
    assert [r.name for r in policy.rules] == ["gms-brake-hard", "gms-brake", "gms-raise"]
    model = torch.nn.Linear(4, 4)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    guard = Guard(opt, policy, model=model, log_dir=tmp_path / "run")
    acting = []
    for step in range(25):
        model.weight.grad = torch.full((4, 4), 0.1)
        model.bias.grad = torch.full((4,), 0.1)
        result = guard.step(1.0)
        if any(a for r in result.decisions for a in r.get("actions", [])):
            acting.append(step)
    guard.close()
    assert acting == [0, 10, 20]
