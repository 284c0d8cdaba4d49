"""Every built-in actuator on AdamW, Adam and SGD (momentum): what it changes, compared bitwise
with the plain optimizer doing the same by hand, and the clear error when it cannot act."""

from __future__ import annotations

import copy

import pytest
import torch

from actuator_helpers import (OPTIMIZERS, assert_same, forward_backward, make, opt_state, params,
                              run_step)
from lbw_policy.actuators import (Beta2, GradClip, Halt, LRScale, MomentumReset, Rollback,
                                  SkipStep, WeightDecayScale)
from lbw_policy.base import ActuatorContext
from lbw_policy.errors import ActuatorError


def _attached(actuator, opt, model=None):
    actuator.bind(ActuatorContext(model=model))
    actuator.attach(opt)
    return actuator


def _twin(model, opt):
    """An independent copy of the model and its optimizer (state and hyperparameters)."""
    return copy.deepcopy((model, opt))


def _warm(model, opt, steps=2):
    """A few plain steps so the optimizer state exists."""
    for s in range(steps):
        forward_backward(model, s)
        opt.step()
        opt.zero_grad()


# ---------------------------------------------------------------------- what each one accepts

@pytest.mark.parametrize("kind", OPTIMIZERS)
def test_every_actuator_attaches_to_adamw_adam_and_sgd_or_says_why_not(kind):
    model, opt = make(kind)
    for cls in (LRScale, SkipStep, MomentumReset, GradClip, WeightDecayScale, Rollback, Halt):
        _attached(cls(), opt, model)
    if kind == "sgd":
        with pytest.raises(ActuatorError, match=r"^beta2 needs an optimizer with 'betas' in its param "
                                                r"groups \(Adam, AdamW\); SGD has none$"):
            _attached(Beta2(), opt, model)
        with pytest.raises(ActuatorError, match=r"^momentum_reset: second_moment needs an optimizer "
                                                r"with a second moment \(Adam, AdamW\); SGD has none$"):
            _attached(MomentumReset(second_moment=True), opt, model)
    else:
        _attached(Beta2(), opt, model)
        _attached(MomentumReset(second_moment=True), opt, model)


def test_attach_errors_name_the_problem_and_the_fix():
    model, _ = make()
    plain_sgd = torch.optim.SGD(model.parameters(), lr=0.1)  # momentum=0, weight_decay=0
    with pytest.raises(ActuatorError, match=r"param group 0 of SGD has momentum=0, so there is no "
                                            r"momentum buffer to reset"):
        _attached(MomentumReset(), plain_sgd, model)
    no_wd = torch.optim.SGD(model.parameters(), lr=0.1)
    del no_wd.param_groups[0]["weight_decay"]
    with pytest.raises(ActuatorError, match=r"^weight_decay_scale: param group 0 of SGD has no "
                                            r"'weight_decay'$"):
        _attached(WeightDecayScale(), no_wd, model)
    rms = torch.optim.RMSprop(model.parameters(), lr=0.1)
    with pytest.raises(ActuatorError, match=r"momentum_reset knows Adam, AdamW .* and SGD with "
                                            r"momentum .*; got RMSprop"):
        _attached(MomentumReset(), rms, model)
    with pytest.raises(ActuatorError, match=r"^beta2 needs .*; RMSprop has none$"):
        _attached(Beta2(), rms, model)
    with pytest.raises(ActuatorError, match=r"momentum_reset: groups lists param group 3, but "
                                            r"RMSprop has 1 param group"):
        _attached(MomentumReset(groups=[3]), rms, model)
    with pytest.raises(ActuatorError, match=r"^rollback needs the model to snapshot and restore: "
                                            r"build the guard with Guard\(optimizer, policy, model=model\)$"):
        _attached(Rollback(), plain_sgd, None)
    other = torch.nn.Linear(2, 2)
    mixed = torch.optim.AdamW(list(model.parameters()) + [other.weight])
    with pytest.raises(ActuatorError, match=r"param group 0 of AdamW holds a tensor of shape \(2, 2\) "
                                            r"that is not a parameter of the model"):
        _attached(Rollback(), mixed, model)


# ---------------------------------------------------------------------- momentum_reset

@pytest.mark.parametrize("kind", OPTIMIZERS)
def test_momentum_reset_zeroes_the_first_moment_only_and_warms_the_lr_up(kind):
    model, opt = make(kind, lr=0.01)
    _warm(model, opt)
    ref_model, ref_opt = _twin(model, opt)
    reset = _attached(MomentumReset(warmup=4), opt, model)
    before = opt_state(opt)
    act = reset.plan("apply", None, step=2)
    assert (act.applied, act.clamped) == (True, False)
    assert act.before == {"resets": 0, "lr_factor": 1.0, "warmup_left": 0}
    assert act.after == {"resets": 1, "lr_factor": 0.25, "warmup_left": 4}
    first = "momentum_buffer" if kind == "sgd" else "exp_avg"
    assert act.extra["zeroed"] == [first] and act.extra["groups"] == [0]
    reset.commit(act)
    for st, old in zip(opt_state(opt), before):
        assert torch.count_nonzero(st[first]) == 0
        for key in st:
            if key != first:
                assert torch.equal(st[key], old[key]), key  # exp_avg_sq and step kept
    # The reference does the same by hand: zero the buffer, lr x k/4 on the k-th step.
    for st in ref_opt.state.values():
        st[first].zero_()
    for k, factor in enumerate((0.25, 0.5, 0.75, 1.0, 1.0)):
        forward_backward(model, 10 + k)
        forward_backward(ref_model, 10 + k)
        run_step(opt, [reset])
        assert opt.param_groups[0]["lr"] == 0.01  # the user's lr is put back
        ref_opt.param_groups[0]["lr"] = 0.01 * factor
        ref_opt.step()
        opt.zero_grad()
        ref_opt.zero_grad()
        assert_same(params(model), params(ref_model))
    assert reset.warmup_left == 0 and reset.signal_values()["resets"] == 1


@pytest.mark.parametrize("kind", ["adamw", "adam"])
def test_momentum_reset_second_moment_and_min_interval(kind):
    model, opt = make(kind, amsgrad=True)
    _warm(model, opt)
    reset = _attached(MomentumReset(second_moment=True, min_interval=5), opt, model)
    act = reset.plan("apply", None, step=2)
    assert act.extra["zeroed"] == ["exp_avg", "exp_avg_sq"]
    reset.commit(act)
    for st in opt.state.values():
        for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
            assert torch.count_nonzero(st[key]) == 0, key
        assert st["step"].item() == 2
    refused = reset.plan("apply", None, step=6)
    assert (refused.applied, refused.clamped, refused.before, refused.after) == \
        (False, True, {"resets": 1, "lr_factor": 1.0, "warmup_left": 0},
         {"resets": 1, "lr_factor": 1.0, "warmup_left": 0})
    assert refused.note == "min_interval=5 steps since the reset at step 2 not reached; refused"
    assert reset.plan("apply", None, step=7).applied is True


# ---------------------------------------------------------------------- weight_decay_scale, beta2

@pytest.mark.parametrize("kind", OPTIMIZERS)
def test_weight_decay_scale_equals_the_optimizer_with_scaled_weight_decay(kind):
    model, opt = make(kind, wd=0.2)
    _warm(model, opt)
    ref_model, ref_opt = _twin(model, opt)
    wd = _attached(WeightDecayScale(min=0.1, max=1.0), opt, model)
    act = wd.plan("multiply", 0.25, step=2)
    assert (act.requested, act.applied, act.before, act.after) == (0.25, 0.25, 1.0, 0.25)
    wd.commit(act)
    forward_backward(model, 5)
    forward_backward(ref_model, 5)
    run_step(opt, [wd])
    ref_opt.param_groups[0]["weight_decay"] = 0.2 * 0.25
    ref_opt.step()
    assert opt.param_groups[0]["weight_decay"] == 0.2
    assert_same(params(model), params(ref_model))
    assert_same(opt_state(opt), opt_state(ref_opt))


@pytest.mark.parametrize("kind", ["adamw", "adam"])
def test_beta2_equals_the_optimizer_with_that_beta2_and_recovers_to_the_users(kind):
    model, opt = make(kind, betas=(0.9, 0.999))
    _warm(model, opt)
    ref_model, ref_opt = _twin(model, opt)
    b2 = _attached(Beta2(min=0.95, max=0.999, max_change_per_step=0.04,
                         recover={"step": 0.02, "every": 2}), opt, model)
    act = b2.plan("set", 0.9, step=2)  # below min, and more than 0.04 from 0.999
    assert (act.requested, act.applied, act.clamped, act.before, act.after) == \
        (0.9, 0.959, True, 0.999, 0.959)
    b2.commit(act)
    forward_backward(model, 5)
    forward_backward(ref_model, 5)
    run_step(opt, [b2])
    ref_opt.param_groups[0]["betas"] = (0.9, 0.959)
    ref_opt.step()
    assert opt.param_groups[0]["betas"] == (0.9, 0.999)
    assert_same(params(model), params(ref_model))
    assert_same(opt_state(opt), opt_state(ref_opt))
    moves = []
    for s in range(3, 9):
        a = b2.recover(s)
        if a is not None:
            b2.commit(a)
            moves.append((s, a.before, a.after))
    assert moves == [(4, 0.959, 0.979), (6, 0.979, 0.999)]
    assert b2.value is None and b2.signal_values() == {"value": 0.999}


# ---------------------------------------------------------------------- grad_clip

@pytest.mark.parametrize("kind", OPTIMIZERS)
def test_grad_clip_clips_to_k_times_the_running_mean(kind):
    model, opt = make(kind)
    clip = _attached(GradClip(min=1.0, max=4.0, alpha=0.5, warmup=3), opt, model)
    norms = []
    for s in range(3):  # warm-up: inactive (k unset), the mean follows the norm
        forward_backward(model, s)
        norms.append(torch.nn.utils.get_total_norm([p.grad for p in model.parameters()]).item())
        grads = [p.grad.clone() for p in model.parameters()]
        run_step(opt, [clip])
        assert_same([p.grad for p in model.parameters()], grads)  # untouched
        opt.zero_grad()
    mean = norms[0]
    for n in norms[1:]:
        mean = 0.5 * mean + 0.5 * n
    assert clip.state_dict()["mean"] == pytest.approx(mean, rel=1e-6)
    act = clip.plan("set", 8.0, step=3)
    assert (act.requested, act.applied, act.clamped, act.before, act.after) == (8.0, 4.0, True, None, 4.0)
    clip.commit(act)
    forward_backward(model, 3, scale=100.0)  # a spike
    spike = torch.nn.utils.get_total_norm([p.grad for p in model.parameters()]).item()
    grads = [p.grad.clone() for p in model.parameters()]
    clip.before_step(opt, 0)
    coef = min(1.0, 4.0 * mean / (spike + 1e-6))
    assert coef < 0.1
    for p, g in zip(model.parameters(), grads):
        torch.testing.assert_close(p.grad, g * coef, rtol=1e-5, atol=0)
    # The mean takes the clipped norm (4 x mean), not the spike.
    assert clip.state_dict()["mean"] == pytest.approx(0.5 * mean + 0.5 * 4.0 * mean, rel=1e-5)
    clip.after_step(opt, True, 0)


def test_grad_clip_max_norm_is_clip_grad_norm_from_the_first_step_and_caps_k():
    """``max_norm`` clips every step from the first exactly as ``clip_grad_norm_(max_norm)``
    (no warm-up, no rule), and with ``k`` active the smaller threshold wins."""
    model, opt = make()
    ref_model, _ = make()
    ref_model.load_state_dict(model.state_dict())
    clip = _attached(GradClip(max_norm=0.05, warmup=2), opt, model)
    for s in range(3):
        forward_backward(model, s, scale=10.0)
        forward_backward(ref_model, s, scale=10.0)
        norm = torch.nn.utils.clip_grad_norm_(ref_model.parameters(), 0.05)
        assert norm > 0.05                     # the ceiling acts at this scale
        clip.before_step(opt, s)
        for p, q in zip(model.parameters(), ref_model.parameters()):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=0)
        clip.after_step(opt, True, s)
        opt.zero_grad()
        ref_model.zero_grad()
    assert clip.state_dict()["mean"] == pytest.approx(0.05, rel=1e-5)   # the mean of clipped norms
    clip.commit(clip.plan("set", 1.0, step=3))                          # k * m = 0.05 ...
    clip.max_norm = 0.01                                                 # ... above the ceiling
    forward_backward(model, 3, scale=10.0)
    clip.before_step(opt, 3)
    assert torch.nn.utils.get_total_norm([p.grad for p in model.parameters()]).item() == pytest.approx(0.01, rel=1e-4)
    clip.after_step(opt, True, 3)
    opt.zero_grad()
    mean = clip.state_dict()["mean"]
    clip.max_norm = 1e3                                                  # now k * m is the smaller
    forward_backward(model, 4, scale=10.0)
    clip.before_step(opt, 4)
    assert torch.nn.utils.get_total_norm([p.grad for p in model.parameters()]).item() == pytest.approx(mean, rel=1e-4)
    assert clip.signal_values() == {"k": 1.0, "active": 1}


def test_grad_clip_leaves_non_finite_gradients_and_the_mean_alone():
    model, opt = make()
    clip = _attached(GradClip(default=2.0, warmup=1), opt, model)
    forward_backward(model, 0)
    run_step(opt, [clip])
    opt.zero_grad()
    mean = clip.state_dict()["mean"]
    forward_backward(model, 1, scale=float("inf"))
    grads = [p.grad.clone() for p in model.parameters()]
    clip.before_step(opt, 0)
    for p, g in zip(model.parameters(), grads):
        assert torch.equal(p.grad, g) or (p.grad.isnan() == g.isnan()).all()
    assert clip.state_dict()["mean"] == mean
    assert clip.signal_values() == {"k": 2.0, "active": 1}


# ---------------------------------------------------------------------- skip_step, rollback

@pytest.mark.parametrize("kind", OPTIMIZERS)
def test_skip_step_leaves_weights_and_every_state_tensor_untouched(kind):
    model, opt = make(kind)
    _warm(model, opt)
    skip = _attached(SkipStep(), opt, model)
    weights, state = params(model), opt_state(opt)
    forward_backward(model, 5)
    skip.commit(skip.plan("apply", None, 2))
    assert run_step(opt, [skip]) is False
    assert_same(params(model), weights)
    assert_same(opt_state(opt), state)


@pytest.mark.parametrize("kind", OPTIMIZERS)
def test_rollback_restores_weights_and_state_but_keeps_the_schedule(kind):
    model, opt = make(kind, lr=0.05)
    roll = _attached(Rollback(every=2, keep=2, min_age=1, skip_batches=1), opt, model)
    taken = {}
    for s in range(5):  # snapshots before steps 0, 2 and 4; the ring keeps 2 and 4
        taken[s] = (params(model), opt_state(opt))
        forward_backward(model, s)
        run_step(opt, [roll])
        opt.zero_grad()
    assert [snap["step"] for snap in roll.snapshots] == [2, 4]
    assert roll.signal_values() == {"count_in_window": 0, "exhausted": 0, "snapshots": 2, "skipping": 0}
    opt.param_groups[0]["lr"] = 0.5  # the user's schedule moved on
    act = roll.plan("apply", None, step=5)  # min_age 1: snapshot 4 (4 <= 5 - 1)
    assert (act.applied, act.before, act.after, act.extra["skip_steps"]) == (True, 5, 4, 2)
    roll.commit(act)
    assert_same(params(model), taken[4][0])
    assert_same(opt_state(opt), taken[4][1])
    assert opt.param_groups[0]["lr"] == 0.5
    # This step and skip_batches=1 more are skipped; the ring still holds what it restored.
    forward_backward(model, 5)
    assert run_step(opt, [roll]) is False
    assert run_step(opt, [roll]) is False
    assert run_step(opt, [roll]) is True
    assert [snap["step"] for snap in roll.snapshots] == [2, 4]
    # Restoring again from the same snapshot gives the same state (the ring is not aliased).
    roll.commit(roll.plan("apply", None, step=8))
    assert_same(params(model), taken[4][0])
    assert_same(opt_state(opt), taken[4][1])


def test_weight_decay_scale_on_zero_weight_decay_attaches_and_scales_a_decay_raised_later():
    """Every group at weight_decay=0 at attach (a decay a schedule turns on later) is accepted,
    and once the decay is raised the scale multiplies it in the step."""
    torch.manual_seed(0)
    model, _ = make()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    wds = WeightDecayScale(min=0.01)
    wds.attach(opt)
    action = wds.plan("multiply", 0.25, step=0)
    assert action.note == "weight_decay is 0 in every param group: nothing to scale now"
    wds.commit(action)
    seen = []
    real_step = opt.step

    def spy(*a, **k):
        seen.append(opt.param_groups[0]["weight_decay"])
        return real_step(*a, **k)

    opt.step = spy
    for wd in (0.0, 0.2):
        opt.param_groups[0]["weight_decay"] = wd  # the "schedule"
        wds.before_step(opt, 0)
        opt.step()
        wds.after_step(opt, True, 0)
        assert opt.param_groups[0]["weight_decay"] == wd  # the user's value is put back
    assert seen == [0.0, pytest.approx(0.05, rel=1e-12)]
    assert wds.plan("multiply", 0.5, step=1).note is None  # a decay is in force now
