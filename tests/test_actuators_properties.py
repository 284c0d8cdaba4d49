"""Property tests (hypothesis): over random sequences of commands, recoveries and steps, every
value an actuator applies stays inside the policy's bounds, and what its plan reports
(``requested``, ``applied``, ``clamped``, ``before``, ``after``) is what it did. The last test
checks the same through the guard, against the decision log and the optimizer itself."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from actuator_helpers import HEAD, Spy, decisions_of, forward_backward, make, records, registry
from lbw_policy.actuators import (Beta2, GradClip, LRScale, MomentumReset, Rollback, SkipStep,
                                  WeightDecayScale)
from lbw_policy.adapters.guard import Guard
from lbw_policy.base import ActuatorContext
from lbw_policy.policy import loads_policy

FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
EPS = 1e-9


class FakeOptimizer:
    """Param groups only: what the hyperparameter actuators touch."""

    def __init__(self, lr=0.1, weight_decay=0.01, beta2=0.999, groups=2):
        self.param_groups = [{"params": [], "lr": lr * (i + 1), "weight_decay": weight_decay,
                              "betas": (0.9, beta2)} for i in range(groups)]
        self.state = {}


def _r12(x):
    return float(f"{x:.12g}")


positive = st.floats(min_value=1e-3, max_value=50.0, allow_nan=False)
ops = st.lists(st.one_of(
    st.tuples(st.just("multiply"), positive),
    st.tuples(st.just("set"), positive),
    st.tuples(st.just("recover"), st.integers(min_value=1, max_value=30)),
), min_size=1, max_size=30)


@st.composite
def scale_bounds(draw):
    lo = draw(st.floats(min_value=0.001, max_value=1.0))  # [min, max] contains 1: the start
    hi = draw(st.floats(min_value=1.0, max_value=4.0))
    bounds = {"min": lo, "max": hi}
    if draw(st.booleans()):
        bounds["max_change_per_step"] = draw(st.floats(min_value=0.01, max_value=2.0))
    if draw(st.booleans()):
        bounds["recover"] = {"factor": draw(st.floats(min_value=1.01, max_value=3.0)),
                             "every": draw(st.integers(min_value=1, max_value=10))}
    return bounds


@pytest.mark.parametrize("cls", [LRScale, WeightDecayScale])
@FAST
@given(bounds=scale_bounds(), seq=ops)
def test_scale_actuators_stay_in_bounds_and_report_truthfully(cls, bounds, seq):
    a = cls(**bounds)
    opt = FakeOptimizer()
    a.attach(opt)
    key = cls.hyperparameter
    base = [g[key] for g in opt.param_groups]
    lo, hi, mc = bounds["min"], bounds["max"], bounds.get("max_change_per_step")
    step = 0
    for verb, value in seq:
        before = a.scale
        if verb == "recover":
            step += value
            act = a.recover(step)
            if act is None:
                continue
            assert act.requested == _r12(min(1.0, before * a.recover_factor) if before < 1.0
                                         else max(1.0, before / a.recover_factor))
        else:
            step += 1
            act = a.plan(verb, value, step)
            assert act.requested == _r12(before * value if verb == "multiply" else value)
        assert act.before == before
        assert lo - EPS <= act.applied <= hi + EPS
        if mc is not None:
            assert abs(act.applied - before) <= mc + 1e-9
        assert act.clamped == (not math.isclose(act.applied, act.requested, rel_tol=1e-12))
        assert act.after == act.applied
        a.commit(act)
        assert a.scale == act.applied
        # What the optimizer sees during the step, and what it holds after.
        a.before_step(opt, 0)
        for g, b in zip(opt.param_groups, base):
            assert g[key] == b * a.scale
        a.after_step(opt, True, 0)
        assert [g[key] for g in opt.param_groups] == base


@FAST
@given(lo=st.floats(min_value=0.5, max_value=0.99),
       width=st.floats(min_value=0.0, max_value=0.5, allow_subnormal=False),
       own=st.sampled_from([0.9, 0.95, 0.98, 0.999, 0.9999]),
       mc=st.one_of(st.none(), st.floats(min_value=0.001, max_value=0.2)),
       rstep=st.floats(min_value=0.001, max_value=0.1),
       seq=st.lists(st.one_of(st.tuples(st.just("set"), st.floats(min_value=0.01, max_value=0.99999)),
                              st.tuples(st.just("recover"), st.integers(min_value=1, max_value=20))),
                    min_size=1, max_size=30))
def test_beta2_stays_in_bounds_or_at_the_users_value(lo, width, own, mc, rstep, seq):
    hi = min(0.99999, lo + width)
    a = Beta2(min=lo, max=hi, max_change_per_step=mc, recover={"step": rstep, "every": 3})
    opt = FakeOptimizer(beta2=own)
    a.attach(opt)
    step = 0
    for verb, value in seq:
        before = a.current()
        if verb == "recover":
            step += value
            act = a.recover(step)
            if act is None:
                continue
        else:
            step += 1
            act = a.plan("set", value, step)
            assert act.requested == _r12(value)
            assert act.clamped == (not math.isclose(act.applied, act.requested, rel_tol=1e-12))
            if mc is not None and lo <= before <= hi:  # from outside, [min, max] wins
                assert abs(act.applied - before) <= mc + 1e-9
        assert act.before == before
        assert lo - EPS <= act.applied <= hi + EPS or act.applied == own
        a.commit(act)
        assert a.current() == act.after == act.applied
        a.before_step(opt, 0)
        assert all(g["betas"] == (0.9, a.current()) for g in opt.param_groups)
        a.after_step(opt, True, 0)
        assert all(g["betas"] == (0.9, own) for g in opt.param_groups)


@FAST
@given(lo=st.floats(min_value=0.1, max_value=5.0),
       width=st.floats(min_value=0.0, max_value=5.0, allow_subnormal=False),
       seq=st.lists(st.one_of(st.tuples(st.just("set"), positive),
                              st.tuples(st.just("multiply"), positive),
                              st.tuples(st.just("recover"), st.integers(min_value=1, max_value=9))),
                    min_size=1, max_size=30))
def test_grad_clip_k_stays_in_bounds(lo, width, seq):
    a = GradClip(min=lo, max=lo + width, default=None, recover={"every": 4})
    step = 0
    for verb, value in seq:
        before = a.k
        if verb == "recover":
            step += value
            act = a.recover(step)
            if act is None:
                continue
            assert act.after is None
        else:
            step += 1
            act = a.plan(verb, value, step)
            assert lo - EPS <= act.applied <= lo + width + EPS
            assert act.clamped == (not math.isclose(act.applied, act.requested, rel_tol=1e-12))
        assert act.before == before
        a.commit(act)
        assert a.k == act.after
        assert a.signal_values()["k"] == (-1.0 if a.k is None else a.k)


@FAST
@given(max_consecutive=st.integers(min_value=1, max_value=4),
       steps=st.lists(st.tuples(st.booleans(), st.booleans()), min_size=1, max_size=40))
def test_skip_step_never_skips_more_than_max_consecutive(max_consecutive, steps):
    """Each step: (a rule requests a skip, another actuator vetoes the step)."""
    a = SkipStep(max_consecutive=max_consecutive)
    own_streak = 0
    for request, other_veto in steps:
        exhausted = a.signal_values()["exhausted"]
        if request:
            act = a.plan("apply", None, 0)
            assert act.applied == (not exhausted) and act.clamped == bool(exhausted)
            assert act.before == a.consecutive
            a.commit(act)
        vetoed = not a.before_step(None, 0)
        assert vetoed == (request and not exhausted)  # applied <=> the step was vetoed
        taken = not vetoed and not other_veto
        a.after_step(None, taken, 0)
        own_streak = own_streak + 1 if vetoed else (0 if taken else own_streak)
        assert own_streak <= max_consecutive
        assert a.consecutive == own_streak


@FAST
@given(min_interval=st.integers(min_value=1, max_value=10), warmup=st.integers(min_value=0, max_value=6),
       requests=st.lists(st.booleans(), min_size=1, max_size=40))
def test_momentum_reset_spacing_and_warmup_factor(min_interval, warmup, requests):
    model, opt = make("adamw")
    a = MomentumReset(warmup=warmup, min_interval=min_interval)
    a.attach(opt)
    resets = []
    for step, request in enumerate(requests):
        if request:
            act = a.plan("apply", None, step)
            expected = not resets or step - resets[-1] >= min_interval
            assert act.applied == expected and act.clamped == (not expected)
            a.commit(act)
            if act.applied:
                resets.append(step)
                assert a.warmup_left == warmup
        a.before_step(opt, 0)
        factor = opt.param_groups[0]["lr"] / 0.01
        if resets and warmup and step - resets[-1] < warmup:
            assert factor == pytest.approx((step - resets[-1] + 1) / warmup)
        else:
            assert factor == 1.0
        a.after_step(opt, True, 0)
        assert opt.param_groups[0]["lr"] == 0.01
    assert all(b - a_ >= min_interval for a_, b in zip(resets, resets[1:]))


@settings(max_examples=25, deadline=None)
@given(max_rollbacks=st.integers(min_value=1, max_value=3), window=st.integers(min_value=1, max_value=30),
       commands=st.lists(st.booleans(), min_size=1, max_size=40))
def test_rollback_never_exceeds_max_rollbacks_in_any_window(max_rollbacks, window, commands):
    model = torch.nn.Linear(2, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    a = Rollback(every=3, keep=2, max_rollbacks=max_rollbacks, window=window, on_exhausted="refuse")
    a.bind(ActuatorContext(model=model))
    a.attach(opt)
    done = []
    for step, command in enumerate(commands):
        if command:
            act = a.plan("apply", None, step)
            in_window = sum(1 for d in done if d > step - window)
            if in_window >= max_rollbacks:
                assert act.applied is False and "max_rollbacks" in act.note
                assert a.signal_values()["exhausted"] == 1 or a._step != step
            a.commit(act)
            if act.applied:
                done.append(step)
                assert a.skipping == 1
        a.before_step(opt, step)
        a.after_step(opt, True, step)
        for s in done:
            assert sum(1 for d in done if s - window < d <= s) <= max_rollbacks


# ---------------------------------------------------------------------- through the guard

GUARD_POLICY = """\
detectors:
  d: {{type: schedule, params: {{values: {{pick: {picks}}}}}}}
actuators:
  lr_scale: {{min: 0.1, max: 1.0, max_change_per_step: 0.3, recover: {{factor: 1.5, every: 2}}}}
  weight_decay_scale: {{min: 0.2, max: 1.0, recover: {{factor: 2.0, every: 3}}}}
  beta2: {{min: 0.95, max: 0.99, max_change_per_step: 0.02, recover: {{step: 0.01, every: 2}}}}
  spy: {{}}
rules:
  - {{name: a, when: {{signal: d.pick, op: "==", value: 1}}, then: [{{actuator: lr_scale, multiply: 0.25}}]}}
  - {{name: b, when: {{signal: d.pick, op: "==", value: 2}}, then: [{{actuator: lr_scale, set: 3.0}}, {{actuator: beta2, set: 0.5}}]}}
  - {{name: c, when: {{signal: d.pick, op: "==", value: 3}}, then: [{{actuator: weight_decay_scale, multiply: 0.1}}, {{actuator: beta2, set: 0.97}}]}}
"""


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(picks=st.lists(st.integers(min_value=0, max_value=3), min_size=4, max_size=16))
def test_logged_values_are_the_values_the_optimizer_used(tmp_path_factory, picks):
    """Replay the decision log by hand: each actuator's value after a step's records is what the
    optimizer held during that step's ``optimizer.step()`` (seen by a spy), within bounds."""
    reg = registry()
    log_dir = tmp_path_factory.mktemp("run")
    model, opt = make("adamw", lr=0.01, wd=0.1)
    Spy.seen = []
    with Guard(opt, loads_policy(HEAD + GUARD_POLICY.format(picks=picks), registry=reg), model=model,
               log_dir=log_dir, registry=reg) as guard:
        for s in range(len(picks)):
            forward_backward(model, s)
            guard.step(torch.tensor(1.0))
            opt.zero_grad()
    value = {"lr_scale": 1.0, "weight_decay_scale": 1.0, "beta2": 0.999}
    by_step: dict = {}
    for rec in decisions_of(records(log_dir)):
        by_step.setdefault(rec["step"], []).extend(rec.get("actions", []))
    for s, seen in enumerate(Spy.seen):
        for act in by_step.get(s, []):
            name = act["actuator"]
            assert act["before"] == value[name]  # the log's before is the previous after
            assert act["after"] == act["applied"]
            assert act["clamped"] == (act["applied"] != act["requested"])
            value[name] = act["after"]
        assert 0.1 - EPS <= value["lr_scale"] <= 1.0 + EPS
        assert 0.2 - EPS <= value["weight_decay_scale"] <= 1.0 + EPS
        assert 0.95 - EPS <= value["beta2"] <= 0.99 + EPS or value["beta2"] == 0.999
        assert seen["lr"] == pytest.approx(0.01 * value["lr_scale"], rel=1e-12)
        assert seen["weight_decay"] == pytest.approx(0.1 * value["weight_decay_scale"], rel=1e-12)
        assert seen["beta2"] == value["beta2"]
