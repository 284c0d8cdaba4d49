"""Built-in actuators on a real AdamW: bounds, clamping, recovery, and what a skip leaves alone."""

from __future__ import annotations

import copy

import pytest
import torch

from lbw_policy.actuators import Halt, LRScale, SkipStep
from lbw_policy.errors import ActuatorError


def _adamw(lr=0.1, wd=0.1):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=wd)
    return model, opt


def _backward(model):
    x = torch.randn(8, 4)
    loss = model(x).pow(2).mean()
    loss.backward()
    return loss


def _run_step(opt, actuators, step=0):
    proceed = True
    for a in actuators:
        proceed = a.before_step(opt, step) and proceed
    if proceed:
        opt.step()
    for a in actuators:
        a.after_step(opt, proceed, step)
    return proceed


def test_lr_scale_multiply_clamps_to_min_and_max_change():
    a = LRScale(min=0.1, max=1.0, max_change_per_step=0.3)
    act = a.plan("multiply", 0.5, step=0)
    # requested 0.5, but one step may move at most 0.3: 1.0 -> 0.7
    assert (act.requested, act.applied, act.clamped, act.before, act.after) == (0.5, 0.7, True, 1.0, 0.7)
    a.commit(act)
    for step in range(1, 10):
        a.commit(a.plan("multiply", 0.5, step))
    assert a.scale == 0.1  # never below min
    act = a.plan("set", 5.0, step=10)
    assert act.applied == pytest.approx(0.4) and act.clamped  # max_change from 0.1
    unbounded = LRScale(min=0.05, max=1.0)
    act = unbounded.plan("set", 0.25, 0)
    assert (act.applied, act.clamped) == (0.25, False)


def test_lr_scale_rejects_min_above_max():
    with pytest.raises(ValueError, match=r"min \(0.5\) must be <= max \(0.2\)"):
        LRScale(min=0.5, max=0.2)


def test_lr_scale_recovers_toward_one_every_n_steps():
    a = LRScale(min=0.05, max=1.0, recover={"factor": 2.0, "every": 3})
    a.commit(a.plan("set", 0.2, step=0))
    moves = []
    for s in range(1, 10):
        act = a.recover(s)
        if act is not None:
            a.commit(act)
            moves.append((s, act.before, act.after))
    # every 3 steps after the last change: 0.2 -> 0.4 (step 3) -> 0.8 (6) -> 1.0 (9, capped at 1)
    assert moves == [(3, 0.2, 0.4), (6, 0.4, 0.8), (9, 0.8, 1.0)]
    assert a.recover(20) is None


def test_lr_scale_composes_with_scheduler_without_compounding():
    model, opt = _adamw(lr=1.0, wd=0.0)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    a = LRScale(min=0.01, max=1.0)
    a.attach(opt)
    a.commit(a.plan("set", 0.1, 0))
    seen = []

    class Spy:
        def before_step(self, o, step):
            seen.append(o.param_groups[0]["lr"])
            return True

        def after_step(self, o, stepped, step):
            pass

    for _ in range(3):
        _backward(model)
        _run_step(opt, [a, Spy()])
        opt.zero_grad()
        sched.step()
    # effective lr = scheduler lr (1, 0.5, 0.25) x scale 0.1; the scheduler's own value untouched
    assert seen == pytest.approx([0.1, 0.05, 0.025])
    assert opt.param_groups[0]["lr"] == pytest.approx(0.125)


def test_lr_scale_changes_the_adamw_update_size():
    model, opt = _adamw(lr=0.01, wd=0.0)
    ref_model, ref_opt = copy.deepcopy(model), None
    ref_opt = torch.optim.AdamW(ref_model.parameters(), lr=0.01 * 0.25, weight_decay=0.0)
    a = LRScale(min=0.01)
    a.attach(opt)
    a.commit(a.plan("set", 0.25, 0))
    torch.manual_seed(1)
    _backward(model)
    torch.manual_seed(1)
    _backward(ref_model)
    _run_step(opt, [a])
    ref_opt.step()
    for p, q in zip(model.parameters(), ref_model.parameters()):
        assert torch.equal(p, q)


def test_skip_step_leaves_weights_moments_step_and_weight_decay_untouched():
    model, opt = _adamw(lr=0.1, wd=0.1)
    skip = SkipStep(max_consecutive=2)
    _backward(model)
    _run_step(opt, [skip])            # one real step so AdamW state exists
    opt.zero_grad()
    before_params = [p.detach().clone() for p in model.parameters()]
    before_state = copy.deepcopy(opt.state_dict())
    _backward(model)
    act = skip.plan("apply", None, step=1)
    assert act.applied is True and not act.clamped
    skip.commit(act)
    assert _run_step(opt, [skip]) is False
    for p, q in zip(model.parameters(), before_params):
        assert torch.equal(p, q)
    after_state = opt.state_dict()
    for k, st in before_state["state"].items():
        for name in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(st[name], after_state["state"][k][name]), name


def test_skip_step_refuses_beyond_max_consecutive():
    model, opt = _adamw()
    skip = SkipStep(max_consecutive=2)
    results = []
    for step in range(4):
        act = skip.plan("apply", None, step)
        skip.commit(act)
        results.append((act.applied, act.clamped, _run_step(opt, [skip])))
    # skip, skip, refused (step taken), skip again
    assert results == [(True, False, False), (True, False, False), (False, True, True), (True, False, False)]
    # consecutive: skips in a row; refused: refusals since the last step with no skip request
    assert skip.state_dict() == {"consecutive": 1, "refused": 1, "device_consecutive": 0,
                                 "unresolved": False}
    assert skip.signal_values() == {"consecutive": 1, "exhausted": 0, "refused": 1}


def test_lr_scale_attach_rejects_non_optimizer():
    with pytest.raises(ActuatorError, match="lr_scale needs a torch.optim.Optimizer"):
        LRScale().attach(object())


def test_halt_plans_and_commits():
    h = Halt()
    act = h.plan("apply", None, 3)
    assert (act.before, act.after) == (False, True)
    h.commit(act)
    assert h.halted
