"""Actuators through the guard: actuator signals and declarative escalation (skip -> rollback
-> halt), rollback's restore and batch skipping, halt's checkpoint, the loader's checks of
actuator signal names, and param-group changes unwinding around a user's LR scheduler."""

from __future__ import annotations

import pytest
import torch

from actuator_helpers import (HEAD, Spy, assert_same, decisions_of, forward_backward, make,
                              opt_state, params, records, registry)
from lbw_policy import TrainingHalted
from lbw_policy.adapters.guard import Guard
from lbw_policy.decision_log import verify_log
from lbw_policy.errors import PolicyReferenceError
from lbw_policy.policy import loads_policy

REG = registry()


def _policy(body: str):
    return loads_policy(HEAD + body, registry=REG)


def _actions(recs, name):
    return [(r["step"], r["event"], a["verb"], a["requested"], a["applied"], a["clamped"],
             a["before"], a["after"]) for r in decisions_of(recs) for a in r.get("actions", [])
            if a["actuator"] == name]


# ---------------------------------------------------------------------- the loader

def test_rules_may_read_signals_of_configured_actuators_only():
    body = """\
detectors:
  d: {type: schedule, params: {at: {bad: [1]}}}
actuators:
  skip_step: {max_consecutive: 2}
  rollback: {every: 5}
rules:
  - name: escalate
    when: {all: [{signal: d.bad, op: ">", value: 0}, {signal: skip_step.exhausted, op: ">", value: 0}]}
    then: [{actuator: rollback}]
  - name: thrash
    when: {signal: rollback.count_in_window, op: ">=", value: 2}
    then: [{actuator: skip_step}]
"""
    assert _policy(body).rules[0].signals() == ["d.bad", "skip_step.exhausted"]
    with pytest.raises(PolicyReferenceError, match=r"rules\[0\]\.when\.all\[1\]\.signal: unknown signal "
                                                   r"'skip_step.exhaustd'.*did you mean 'skip_step.exhausted'"):
        _policy(body.replace("skip_step.exhausted", "skip_step.exhaustd"))
    with pytest.raises(PolicyReferenceError, match=r"unknown signal 'halt.count'"):
        _policy(body.replace("rollback.count_in_window", "halt.count"))
    unconfigured = body.replace("  rollback: {every: 5}\n", "").replace(
        "then: [{actuator: rollback}]", "then: [{actuator: skip_step}]").replace(
        "- name: thrash", "- name: thrash2")
    with pytest.raises(PolicyReferenceError, match=r"unknown signal 'rollback.count_in_window'"):
        _policy(unconfigured)
    clash = body.replace("  d: {type: schedule", "  skip_step: {type: schedule, params: {at: {x: [1]}}}\n  d: {type: schedule")
    with pytest.raises(PolicyReferenceError, match=r"detectors.skip_step: detector id 'skip_step' is also "
                                                   r"the name of a configured actuator that publishes signals"):
        _policy(clash)


# ---------------------------------------------------------------------- escalation

ESCALATION = """\
detectors:
  d: {type: schedule, params: {at: {bad: [5, 6, 7, 8, 20, 21, 22, 23, 24, 25, 26, 27]}}}
actuators:
  skip_step: {max_consecutive: 3}
  rollback: {every: 4, keep: 2, min_age: 2, skip_batches: 1, max_rollbacks: 1, window: 100}
  halt: {}
rules:
  - name: bad-and-exhausted
    priority: 10
    when: {all: [{signal: d.bad, op: ">", value: 0}, {signal: skip_step.exhausted, op: ">", value: 0}]}
    then: [{actuator: rollback}]
  - name: bad
    when: {signal: d.bad, op: ">", value: 0}
    then: [{actuator: skip_step}]
"""


def test_skip_then_rollback_then_halt_with_checkpoint(tmp_path):
    model, opt = make(lr=0.05)
    guard = Guard(opt, _policy(ESCALATION), model=model, log_dir=tmp_path / "run", registry=REG)
    weights = {}
    skipped = []
    with pytest.raises(TrainingHalted) as info:
        for s in range(40):
            weights[s] = params(model)
            result = guard.step(forward_backward(model, s))
            skipped.append(result.skipped)
            opt.zero_grad()
    recs = records(tmp_path / "run")
    # 5, 6, 7 skipped by skip_step; at 8 it is exhausted: rollback to the newest snapshot at
    # least 2 steps old (4), skipping step 8 and one more batch (9).
    assert skipped[:12] == [False] * 5 + [True] * 5 + [False] * 2
    assert _actions(recs, "skip_step")[:4] == [
        (5, "fired", "apply", True, True, False, 0, 1), (6, "action", "apply", True, True, False, 1, 2),
        (7, "action", "apply", True, True, False, 2, 3),
        (8, "action", "apply", True, False, True, 3, 0)]
    roll = _actions(recs, "rollback")
    assert roll[0] == (8, "fired", "apply", True, True, False, 8, 4)
    assert_same(weights[4], weights[10])  # restored at 8, nothing stepped through 9
    # 20..22 skipped, 23 exhausted again: a second rollback exceeds max_rollbacks=1: halt.
    assert roll[1][:6] == (23, "fired", "apply", True, False, True)
    assert info.value.step == 23 and info.value.rule == "bad-and-exhausted"
    assert str(info.value) == ("training halted at step 23 by rule 'bad-and-exhausted'; signals: "
                               "d.bad=1, skip_step.exhausted=1")
    fired = [r for r in recs if r["step"] == 23 and r["event"] == "fired"][0]
    act = fired["actions"][0]
    assert act["halt"] is True and act["note"] == ("max_rollbacks=1 within window=100 steps "
                                                   "reached; escalating to halt")
    path = str(tmp_path / "run" / "halt-checkpoint.pt")
    assert act["checkpoint"] == path and recs[-1]["event"] == "halt" and recs[-1]["checkpoint"] == path
    ckpt = torch.load(path, weights_only=True)
    assert ckpt["format"] == "lbw-policy/halt-checkpoint/v1" and ckpt["step"] == 23
    assert ckpt["actuator"] == "rollback"
    assert_same(list(ckpt["model"].values()), params(model))
    assert ckpt["guard"]["step"] == 23 and ckpt["guard"]["actuators"]["rollback"]["history"] == [8]
    assert set(ckpt["optimizer"]) == {"state", "param_groups"}
    assert verify_log(tmp_path / "run" / "decisions.jsonl").ok


def test_halt_saves_a_checkpoint_unless_told_not_to(tmp_path):
    body = """\
detectors:
  d: {type: schedule, params: {at: {stop: [3]}}}
actuators:
  halt: {checkpoint: CHECKPOINT}
rules:
  - {name: stop, when: {signal: d.stop, op: ">", value: 0}, then: [{actuator: halt}]}
"""
    for flag in ("true", "false"):
        model, opt = make()
        log_dir = tmp_path / flag
        guard = Guard(opt, _policy(body.replace("CHECKPOINT", flag)), model=model, log_dir=log_dir,
                      registry=REG)
        with pytest.raises(TrainingHalted, match=r"^training halted at step 3 by rule 'stop'"):
            for s in range(5):
                guard.step(forward_backward(model, s))
                opt.zero_grad()
        recs = records(log_dir)
        path = log_dir / "halt-checkpoint.pt"
        if flag == "true":
            assert recs[-1]["checkpoint"] == str(path) and recs[-2]["actions"][0]["checkpoint"] == str(path)
            ckpt = torch.load(path, weights_only=True)
            assert ckpt["actuator"] == "halt" and ckpt["guard"]["step"] == 3
            assert_same(list(ckpt["model"].values()), params(model))
            assert_same([s for s in ckpt["optimizer"]["state"].values()], opt_state(opt))
        else:
            assert not path.exists() and "checkpoint" not in recs[-1]
            assert recs[-2]["actions"][0]["checkpoint"] is None


def test_refused_rollback_escalates_through_a_rule_on_its_signal(tmp_path):
    body = """\
detectors:
  d: {type: schedule, params: {at: {go: [3, 6]}}}
actuators:
  rollback: {every: 2, max_rollbacks: 1, window: 50, on_exhausted: refuse}
  halt: {checkpoint: false}
rules:
  - {name: stop, priority: 5, when: {all: [{signal: d.go, op: ">", value: 0}, {signal: rollback.exhausted, op: ">", value: 0}]}, then: [{actuator: halt}]}
  - {name: back, when: {signal: d.go, op: ">", value: 0}, then: [{actuator: rollback}]}
"""
    model, opt = make()
    guard = Guard(opt, _policy(body), model=model, log_dir=tmp_path / "run", registry=REG)
    with pytest.raises(TrainingHalted, match=r"^training halted at step 6 by rule 'stop'; signals: "
                                             r"d.go=1, rollback.exhausted=1$"):
        for s in range(10):
            guard.step(forward_backward(model, s))
            opt.zero_grad()
    # At 6 both rules fire: the rollback (lower priority) is refused and logged so; stop halts.
    assert _actions(records(tmp_path / "run"), "rollback") == [
        (3, "fired", "apply", True, True, False, 3, 2), (6, "fired", "apply", True, False, True, 6, 6)]


# ---------------------------------------------------------------------- param groups + scheduler

def test_lr_scale_and_momentum_warmup_compose_with_a_scheduler_and_unwind(tmp_path):
    body = """\
detectors:
  d: {type: schedule, params: {at: {spike: [2]}}}
actuators:
  lr_scale: {min: 0.1, max: 1.0}
  momentum_reset: {warmup: 4}
  spy: {}
rules:
  - name: spike
    when: {signal: d.spike, op: ">", value: 0}
    then: [{actuator: lr_scale, set: 0.5}, {actuator: momentum_reset}]
"""
    model, opt = make(lr=1.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (s + 1))
    Spy.seen = []
    with Guard(opt, _policy(body), model=model, log_dir=tmp_path / "run", registry=REG) as guard:
        for s in range(8):
            result = guard.step(forward_backward(model, s))
            opt.zero_grad()
            sched.step()
            assert opt.param_groups[0]["lr"] == pytest.approx(1.0 / (s + 2))  # the scheduler's own
            assert result.lr == Spy.seen[-1]["lr"]
    factors = [0, 0, 0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    expected = [1.0, 0.5] + [0.5 * f / (s + 1) for s, f in enumerate(factors) if s >= 2]
    assert [x["lr"] for x in Spy.seen] == pytest.approx(expected, rel=1e-12)


def test_every_actuator_configured_but_quiet_is_bit_identical_to_plain_adamw(tmp_path):
    """Configured actuators that no rule commands change nothing: not the weights, not the
    optimizer state, not the param groups (rollback's snapshots are copies)."""
    policy = loads_policy(HEAD + """\
actuators:
  lr_scale: {min: 0.1, recover: {factor: 2.0, every: 1}}
  skip_step: {}
  grad_clip: {default: null}
  momentum_reset: {warmup: 5}
  weight_decay_scale: {}
  beta2: {}
  rollback: {every: 3}
  halt: {}
rules: []
""", registry=REG)
    model, opt = make(lr=0.01)
    ref_model, ref_opt = make(lr=0.01)
    with Guard(opt, policy, model=model, log_dir=tmp_path / "run", registry=REG) as guard:
        for s in range(12):
            guard.step(forward_backward(model, s))
            forward_backward(ref_model, s)
            ref_opt.step()
            opt.zero_grad()
            ref_opt.zero_grad()
    assert_same(params(model), params(ref_model))
    assert_same(opt_state(opt), opt_state(ref_opt))
    assert opt.param_groups[0]["lr"] == 0.01 and opt.param_groups[0]["betas"] == (0.9, 0.999)
    assert decisions_of(records(tmp_path / "run")) == []
    assert [s["step"] for s in guard.actuators["rollback"].snapshots] == [6, 9]


# ---------------------------------------------------------------------- grad_clip's max_norm

CLIP_ONLY = """\
mode: enforce
detectors:
  gnorm: {type: grad_norm}
actuators:
  grad_clip: {max_norm: 1.0}
rules: []
"""


@pytest.mark.parametrize("policy", ["clip-only", "default"])
def test_a_policy_clip_then_a_smaller_guard_clip_reuses_the_kept_norm(tmp_path, monkeypatch, policy):
    """``grad_clip: {max_norm: 1.0}`` clips every step (the step's gradients end at norm 1.0
    without a guard clip); ``Guard(clip_grad_norm=0.5)`` then clips again from the norm the
    policy's actuators kept, with no second global reduction. Under the default the last of them
    is ``grad_normalize`` (its per-tensor norms are its own, not a global reduction)."""
    pol = _policy(CLIP_ONLY) if policy == "clip-only" else "default"
    real = torch.nn.utils.get_total_norm
    for guard_clip, expected in ((None, 1.0), (0.5, 0.5)):
        model, opt = make(lr=1e-4)
        guard = Guard(opt, pol, model=model, log_dir=tmp_path / f"{policy}-{guard_clip}",
                      clip_grad_norm=guard_clip, registry=REG)
        calls = []
        monkeypatch.setattr(torch.nn.utils, "get_total_norm",
                            lambda *a, **k: calls.append(1) or real(*a, **k))
        for s in range(3):
            forward_backward(model, s, scale=100.0)
            raw = real([p.grad for p in model.parameters()]).item()
            guard.step(torch.tensor(1.0))
            assert raw > 1.0
            after = real([p.grad for p in model.parameters()]).item()
            if policy == "clip-only" or guard_clip is not None:
                assert after == pytest.approx(expected, rel=1e-4)
            else:  # clipped to 1.0, then each of the 4 tensors normalized: about sqrt(4)
                assert 1.5 < after < 2.5
            opt.zero_grad(set_to_none=True)
        guard.close()
        monkeypatch.setattr(torch.nn.utils, "get_total_norm", real)
        assert len(calls) == 3  # one reduction a step (the telemetry's, shared); none for the clips


def test_audit_mode_does_not_keep_a_steps_gradients_alive(tmp_path):
    """In audit mode grad_clip and grad_normalize never run before_step; the step's gradients
    must still be freed by the user's ``zero_grad(set_to_none=True)``."""
    import weakref

    model, opt = make(lr=1e-4)
    guard = Guard(opt, "audit-only", model=model, log_dir=tmp_path / "a")
    for s in range(2):
        forward_backward(model, s)
        guard.step(torch.tensor(1.0))
        ref = weakref.ref(next(model.parameters()).grad)
        opt.zero_grad(set_to_none=True)
        assert ref() is None
    guard.close()
