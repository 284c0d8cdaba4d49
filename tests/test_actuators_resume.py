"""Resume with every actuator: a run saved at step 100 and resumed makes the same decisions and
ends with the same weights, bitwise on CPU, as an uninterrupted 200-step run. The boundary
falls inside live state of each actuator: an LR brake, a weight-decay cut, a lowered beta2, a
clip multiple and a momentum-reset warm-up all recovering across it, grad_normalize's norm EMAs,
and a rollback after the resume to a snapshot taken before it. Both runs end in the same halt at step 199."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch

from actuator_helpers import (HEAD, assert_same, decisions_of, forward_backward, make, opt_state,
                              params, records, registry)
from lbw_policy import TrainingHalted
from lbw_policy.adapters.guard import Guard
from lbw_policy.decision_log import verify_log
from lbw_policy.plugins import get_registry
from lbw_policy.policy import load_policy, loads_policy

REG = registry()
ROOT = Path(__file__).resolve().parents[1]

POLICY = """\
detectors:
  ev:
    type: schedule
    params: {at: {brake: [20, 95], clip: [30, 99], reset: [40, 97, 130], wd: [50, 96], b2: [90, 98],
                  skip: [60, 61, 62, 63, 140, 141], roll: [108], halt: [199]}}
  loss: {type: loss_spike, params: {alpha: 0.9, warmup: 5}}
actuators:
  lr_scale: {min: 0.1, max: 1.0, max_change_per_step: 0.5, recover: {factor: 1.1, every: 3}}
  skip_step: {max_consecutive: 3}
  grad_clip: {min: 1.0, max: 5.0, default: 5.0, alpha: 0.9, warmup: 10, recover: {every: 7}}
  grad_normalize: {gamma1: 0.8}
  momentum_reset: {second_moment: SECOND, warmup: 6, min_interval: 20}
  weight_decay_scale: {min: 0.1, max: 1.0, recover: {factor: 2.0, every: 4}}
BETA2  rollback: {every: 25, keep: 3, min_age: 20, skip_batches: 2, max_rollbacks: 3, window: 200}
  halt: {}
rules:
  - {name: stop, priority: 100, when: {signal: ev.halt, op: ">", value: 0}, then: [{actuator: halt}]}
  - name: skips-exhausted
    priority: 90
    when: {all: [{signal: ev.skip, op: ">", value: 0}, {signal: skip_step.exhausted, op: ">", value: 0}]}
    then: [{actuator: rollback}]
  - {name: skip, priority: 80, when: {signal: ev.skip, op: ">", value: 0}, then: [{actuator: skip_step}]}
  - {name: roll, priority: 70, when: {signal: ev.roll, op: ">", value: 0}, then: [{actuator: rollback}]}
  - {name: brake, when: {signal: ev.brake, op: ">", value: 0}, then: [{actuator: lr_scale, multiply: 0.5}]}
  - {name: clip, when: {signal: ev.clip, op: ">", value: 0}, then: [{actuator: grad_clip, set: 1.5}]}
  - {name: reset, when: {signal: ev.reset, op: ">", value: 0}, then: [{actuator: momentum_reset}]}
  - {name: wd, when: {signal: ev.wd, op: ">", value: 0}, then: [{actuator: weight_decay_scale, multiply: 0.25}]}
BETA2_RULE  - {name: loss-spike, when: {signal: loss.zscore, op: ">", value: 3}, then: [{actuator: lr_scale, multiply: 0.8}]}
"""


def _policy(kind):
    adam = kind != "sgd"
    text = (POLICY.replace("SECOND", "true" if adam else "false")
            .replace("BETA2_RULE", "  - {name: b2, when: {signal: ev.b2, op: \">\", value: 0}, "
                                   "then: [{actuator: beta2, set: 0.9}]}\n" if adam else "")
            .replace("BETA2", "  beta2: {min: 0.9, max: 0.99, recover: {step: 0.01, every: 2}}\n"
                              if adam else ""))
    return loads_policy(HEAD + text, registry=REG)


def _setup(kind, policy, log_dir, seed=0):
    model, opt = make(kind, seed=seed, lr=0.02, wd=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1.0 + 0.01 * s))
    guard = Guard(opt, policy, model=model, log_dir=log_dir, registry=REG, resume=True)
    return model, opt, sched, guard


def _train(model, opt, sched, guard, start, stop):
    for s in range(start, stop):
        guard.step(forward_backward(model, s, scale=8.0 if s in (70, 150) else 1.0))
        opt.zero_grad(set_to_none=True)
        sched.step()


def _key(rec):
    return (rec["step"], rec["rule"], rec["event"], rec.get("signals"),
            [(a["actuator"], a["verb"], a["requested"], a["applied"], a["clamped"], a["before"],
              a["after"], a.get("note")) for a in rec.get("actions", [])])


@pytest.mark.parametrize("kind", ["adamw", "adam", "sgd"])
def test_resume_at_100_matches_an_uninterrupted_200_step_run(tmp_path, kind):
    policy = _policy(kind)
    model, opt, sched, guard = _setup(kind, policy, tmp_path / "full")
    with pytest.raises(TrainingHalted, match=r"^training halted at step 199 by rule 'stop'"):
        _train(model, opt, sched, guard, 0, 200)
    full = records(tmp_path / "full")

    m1, o1, s1, g1 = _setup(kind, policy, tmp_path / "resumed")
    _train(m1, o1, s1, g1, 0, 100)
    buffer = io.BytesIO()
    torch.save({"model": m1.state_dict(), "opt": o1.state_dict(), "sched": s1.state_dict(),
                "guard": g1.state_dict()}, buffer)
    g1.close()
    saved = torch.load(io.BytesIO(buffer.getvalue()), weights_only=True)
    # The boundary is inside live state of every actuator.
    acts = saved["guard"]["actuators"]
    assert acts["lr_scale"]["scale"] < 1.0 and acts["weight_decay_scale"]["scale"] < 1.0
    assert acts["grad_clip"]["k"] == 1.5 and acts["momentum_reset"]["warmup_left"] > 0
    assert len(acts["grad_normalize"]["stats"]) == 4  # every tensor's norm EMAs
    assert [s["step"] for s in acts["rollback"]["snapshots"]] == [0, 25, 75]
    if kind != "sgd":
        assert acts["beta2"]["value"] is not None

    m2, o2, s2, g2 = _setup(kind, policy, tmp_path / "resumed", seed=123)
    m2.load_state_dict(saved["model"])
    o2.load_state_dict(saved["opt"])
    s2.load_state_dict(saved["sched"])
    g2.load_state_dict(saved["guard"])
    with pytest.raises(TrainingHalted, match=r"^training halted at step 199 by rule 'stop'"):
        _train(m2, o2, s2, g2, 100, 200)
    resumed = records(tmp_path / "resumed")

    assert [_key(r) for r in decisions_of(resumed)] == [_key(r) for r in decisions_of(full)]
    assert_same(params(m2), params(model))
    assert_same(opt_state(o2), opt_state(opt))
    a = torch.load(tmp_path / "full" / "halt-checkpoint.pt", weights_only=True)
    b = torch.load(tmp_path / "resumed" / "halt-checkpoint.pt", weights_only=True)
    assert_same(list(a["model"].values()), list(b["model"].values()))
    assert verify_log(tmp_path / "resumed" / "decisions.jsonl").ok

    # Every actuator acted, and some after the resume.
    late = [a["actuator"] for r in decisions_of(full) if r["step"] >= 100 for a in r.get("actions", [])]
    expected = {"lr_scale", "skip_step", "grad_clip", "momentum_reset", "weight_decay_scale",
                "rollback", "halt"} | ({"beta2"} if kind != "sgd" else set())
    assert expected <= set(late)
    roll = [(r["step"], x["before"], x["after"]) for r in decisions_of(full)
            for x in r.get("actions", []) if x["actuator"] == "rollback"]
    assert roll == [(63, 63, 25), (108, 108, 75)]  # 108 restores the snapshot saved before 100


def test_the_shipped_all_actuators_policy_runs(tmp_path):
    policy = load_policy(ROOT / "policies" / "all-actuators.yaml")
    builtin = {n for n, r in get_registry().actuators.items() if r.plugin == "lbw_policy.actuators"}
    assert set(policy.actuators) == builtin  # "every built-in actuator in one policy"
    model, opt = make("adamw", lr=0.01)
    with Guard(opt, policy, model=model, log_dir=tmp_path / "run") as guard:
        for s in range(60):
            scale = float("nan") if s in (52, 53) else 30.0 if s == 40 else 1.0
            opt.param_groups[0]["lr"] = 0.2 if s == 30 else 0.01  # one step at 20x the rate
            result = guard.step(forward_backward(model, s, scale=scale))
            if s == 30:
                assert result.lr == pytest.approx(0.01)  # capped at the recent median
            opt.zero_grad()
    recs = records(tmp_path / "run")
    fired = {r["rule"] for r in recs if r["event"] == "fired"}
    assert {"grad-spike", "nonfinite-skip", "lr-jump-cap"} <= fired
    assert all(torch.isfinite(p).all() for p in model.parameters())
