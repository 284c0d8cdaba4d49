"""The learning-rate fault pair: the ``lr_jump`` detector and the ``lr_cap`` actuator, alone, in
a guard on a real AdamW with a real scheduler, composed with ``lr_scale``, in audit mode and
through a resume."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from actuator_helpers import HEAD, Spy, decisions_of, forward_backward, make, params, records, registry
from lbw_policy.adapters.guard import Guard
from lbw_policy.detectors.lr_jump import LRJump
from lbw_policy.errors import PolicyError
from lbw_policy.policy import loads_policy
from lbw_policy.telemetry import Telemetry

STEPS, WARMUP, FAULT = 160, 15, range(100, 130)
REG = registry()


def schedule(step: int, fault: bool = True) -> float:
    """The stress benchmark's shape: linear warm-up, cosine to 10%, x30 for steps 100-129."""
    if step < WARMUP:
        f = (step + 1) / WARMUP
    else:
        p = (step - WARMUP) / (STEPS - 1 - WARMUP)
        f = 0.1 + 0.45 * (1 + math.cos(math.pi * p))
    return f * (30.0 if fault and step in FAULT else 1.0)


def _policy(body: str, mode: str = "enforce"):
    return loads_policy(HEAD + f"mode: {mode}\n" + body, registry=REG)


CAP = """\
detectors:
  lr: {type: lr_jump, params: {window: 100}}
actuators:
  lr_cap: {window: 100}
  spy: {}
rules:
  - name: lr-jump-cap
    when: {signal: lr.jump, op: ">", value: 3.0}
    then: [{actuator: lr_cap, ratio: 1.0}]
"""


def test_jump_is_the_scheduled_lr_over_the_median_or_the_last_trusted_rate():
    model, opt = make(lr=1e-3)
    det = LRJump(window=100)
    det.setup(model, opt)
    lrs, got = [], []
    for s in range(STEPS):
        opt.param_groups[0]["lr"] = 1e-3 * schedule(s)
        out = det.compute(Telemetry(s, torch.tensor(1.0), opt, model))
        lrs.append(opt.param_groups[0]["lr"])
        got.append(out)
    trusted = lrs[0]
    for s in range(1, STEPS):
        # hand-computed: max(median of the previous 100, the last rate within 3x its reference)
        ref = max(float(np.median(lrs[max(0, s - 100):s])), trusted)
        assert got[s]["jump"] == pytest.approx(lrs[s] / ref, rel=1e-12)
        assert got[s]["reference"] == pytest.approx(ref, rel=1e-12)
        assert got[s]["lr"] == lrs[s]
        if lrs[s] <= 3.0 * ref:
            trusted = lrs[s]
    # the warm-up compares with its previous step (ratio (s+1)/s), the decay with the median
    assert got[2]["reference"] == lrs[1] and got[2]["jump"] == pytest.approx(1.5)
    assert got[99]["reference"] == pytest.approx(float(np.median(lrs[0:99])), rel=1e-12)
    # the faulty rates are never trusted: the whole fault compares with the last good rate
    assert all(got[s]["reference"] == pytest.approx(max(float(np.median(lrs[s - 100:s])), lrs[99]))
               for s in FAULT)
    assert got[0] == {"jump": 1.0, "lr": lrs[0], "reference": lrs[0]}  # no history yet
    # The warm-up and the decay stay below 2 (a threshold of 3 never fires on them); every
    # faulty step is far above (the 30 faulty rates never become the median of 100).
    clean = [g["jump"] for s, g in enumerate(got) if s not in FAULT]
    assert max(clean) <= 2.0 + 1e-12
    assert min(got[s]["jump"] for s in FAULT) > 5.0  # 30x, over a median of earlier, higher rates


def test_zero_rates_are_no_reference_and_groups_are_separate():
    model, _ = make()
    opt = torch.optim.AdamW([{"params": [model[0].weight]}, {"params": [model[2].weight], "lr": 0.5}], lr=0.0)
    det = LRJump(window=4)
    det.setup(model, opt)
    tel = lambda s: Telemetry(s, torch.tensor(1.0), opt, model)  # noqa: E731
    assert det.compute(tel(0))["jump"] == 1.0  # group 0 at lr 0: never a reference
    opt.param_groups[0]["lr"] = 1e-3
    assert det.compute(tel(1))["jump"] == 1.0  # group 0 still has no history; group 1 is flat
    opt.param_groups[1]["lr"] = 5.0
    assert det.compute(tel(2))["jump"] == pytest.approx(10.0)  # group 1 jumped, group 0 did not
    assert det.state_dict() == {"rings": [[1e-3, 1e-3], [0.5, 0.5, 5.0]], "trusted": [1e-3, 0.5]}


def _run(tmp_path, policy, name, fault=True, scale_at=None):
    model, opt = make(lr=1e-3, wd=0.0)
    Spy.seen = []
    effective, recs = [], None
    with Guard(opt, policy, model=model, log_dir=tmp_path / name, registry=REG) as guard:
        for s in range(STEPS):
            opt.param_groups[0]["lr"] = 1e-3 * schedule(s, fault)
            result = guard.step(forward_backward(model, s))
            opt.zero_grad(set_to_none=True)
            # the scheduler's value is back in the param group after the step
            assert opt.param_groups[0]["lr"] == 1e-3 * schedule(s, fault)
            effective.append(result.lr)
    recs = records(tmp_path / name)
    return model, effective, recs


def test_the_cap_takes_exactly_the_faulty_steps_at_the_recent_rate(tmp_path):
    model, effective, recs = _run(tmp_path, _policy(CAP), "capped")
    assert [x["lr"] for x in Spy.seen] == effective  # what the optimizer saw
    for s in range(STEPS):
        scheduled = 1e-3 * schedule(s)
        if s in FAULT:
            ref = float(np.median([1e-3 * schedule(t) for t in range(s - 100, s)]))
            assert effective[s] == pytest.approx(ref, rel=1e-12)
        else:
            assert effective[s] == scheduled
    acts = [(r["step"], r["event"], a) for r in decisions_of(recs) for a in r.get("actions", [])]
    assert [s for s, _, _ in acts] == list(FAULT)
    step, event, a = acts[0]
    assert (event, a["actuator"], a["requested"], a["applied"], a["clamped"]) == ("fired", "lr_cap", 1.0, 1.0, False)
    assert a["before"] == pytest.approx(1e-3 * schedule(100)) and a["after"] == pytest.approx(effective[100])
    assert a["factor"] == pytest.approx(effective[100] / a["before"]) and a["factor"] < 0.1
    assert [r["step"] for r in recs if r["event"] == "resolved"] == [130]


def test_capped_fault_lands_near_the_clean_run_and_uncapped_does_not(tmp_path):
    clean, _, _ = _run(tmp_path, _policy(CAP), "clean", fault=False)
    capped, _, _ = _run(tmp_path, _policy(CAP), "capped")
    raw, _, _ = _run(tmp_path, _policy(CAP, mode="audit"), "audit")  # audit: the fault goes through
    dist = lambda a, b: sum((x - y).norm() ** 2 for x, y in zip(params(a), params(b))) ** 0.5  # noqa: E731
    assert dist(capped, clean) < 0.2 * dist(raw, clean)


def test_audit_mode_logs_the_cap_and_leaves_the_rate_alone(tmp_path):
    _, effective, recs = _run(tmp_path, _policy(CAP, mode="audit"), "audit")
    assert effective == [1e-3 * schedule(s) for s in range(STEPS)]
    assert [r["step"] for r in decisions_of(recs) if r.get("actions")] == list(FAULT)


@pytest.mark.parametrize("order", ["scale-first", "cap-first"])
def test_cap_and_lr_scale_compose_whatever_their_order(tmp_path, order):
    acts = {"scale-first": "  lr_scale: {min: 0.1}\n  lr_cap: {}\n",
            "cap-first": "  lr_cap: {}\n  lr_scale: {min: 0.1}\n"}[order]
    body = f"""\
detectors:
  lr: {{type: lr_jump}}
actuators:
{acts}  spy: {{}}
rules:
  - name: half
    when: {{signal: lr.jump, op: ">", value: 0}}
    then: [{{actuator: lr_scale, set: 0.5}}]
  - name: cap
    when: {{signal: lr.jump, op: ">", value: 3.0}}
    then: [{{actuator: lr_cap, ratio: 2.0}}]
"""
    _, effective, _ = _run(tmp_path, _policy(body), order)
    ref = float(np.median([1e-3 * schedule(t) for t in range(0, 100)]))
    assert effective[100] == pytest.approx(0.5 * 2.0 * ref, rel=1e-12)  # scale x min(sched, 2 ref)
    assert effective[50] == pytest.approx(0.5 * 1e-3 * schedule(50), rel=1e-12)


def test_ratio_below_min_ratio_is_clamped_and_logged(tmp_path):
    policy = _policy(CAP.replace("lr_cap: {window: 100}", "lr_cap: {min_ratio: 0.5}")
                     .replace("ratio: 1.0", "ratio: 0.1"))
    _, effective, recs = _run(tmp_path, policy, "clamped")
    a = next(a for r in decisions_of(recs) for a in r.get("actions", []))
    assert (a["requested"], a["applied"], a["clamped"]) == (0.1, 0.5, True)
    ref = float(np.median([1e-3 * schedule(t) for t in range(0, 100)]))
    assert effective[100] == pytest.approx(0.5 * ref, rel=1e-12)


def test_bad_command_is_rejected_at_load():
    with pytest.raises(PolicyError, match="ratio"):
        _policy(CAP.replace("ratio: 1.0", "ratio: -1"))


def test_resume_keeps_the_histories(tmp_path):
    model, opt = make(lr=1e-3, wd=0.0)
    policy = _policy(CAP)
    guard = Guard(opt, policy, model=model, log_dir=tmp_path / "a", registry=REG)
    for s in range(95):
        opt.param_groups[0]["lr"] = 1e-3 * schedule(s)
        guard.step(forward_backward(model, s))
        opt.zero_grad(set_to_none=True)
    state = json.loads(json.dumps(guard.state_dict()))  # plain data
    guard.close()
    guard2 = Guard(opt, policy, model=model, log_dir=tmp_path / "a", registry=REG, resume=True)
    guard2.load_state_dict(state)
    for s in range(95, 105):
        opt.param_groups[0]["lr"] = 1e-3 * schedule(s)
        result = guard2.step(forward_backward(model, s))
        opt.zero_grad(set_to_none=True)
        if s >= 100:  # without the history the jump would be 1.0 and nothing capped
            ref = float(np.median([1e-3 * schedule(t) for t in range(s - 100, s)]))
            assert result.lr == pytest.approx(ref, rel=1e-12)
    guard2.close()
