"""skip_step's on-device gate (``gate: device``): the update is kept or undone by a select on
the device, with no host sync. Checked bitwise on CPU for AdamW, Adam and SGD; on CUDA under
``torch.cuda.set_sync_debug_mode("error")`` (skipped without a GPU)."""

from __future__ import annotations

import copy

import pytest
import torch

from actuator_helpers import (HEAD, OPTIMIZERS, assert_same, forward_backward, make, opt_state,
                              params, records, run_step)
from lbw_policy.actuators import SkipStep
from lbw_policy.adapters.guard import Guard
from lbw_policy.errors import ActuatorError
from lbw_policy.policy import loads_policy


def _gated(kind, **kw):
    model, opt = make(kind, **kw)
    skip = SkipStep(max_consecutive=2, gate="device")
    skip.attach(opt)
    return model, opt, skip


def _warm(model, opt):
    forward_backward(model, 0)
    opt.step()
    opt.zero_grad()


@pytest.mark.parametrize("kind", OPTIMIZERS)
def test_a_false_gate_undoes_the_step_bitwise_even_with_nan_gradients(kind):
    model, opt, skip = _gated(kind)
    _warm(model, opt)
    weights, state = params(model), opt_state(opt)
    for scale in (1.0, float("nan")):
        forward_backward(model, 1, scale=scale)
        skip.arm(torch.tensor(False))
        assert run_step(opt, [skip]) is True  # optimizer.step() ran ...
        assert_same(params(model), weights)  # ... and was undone: weights, moments, step count
        assert_same(opt_state(opt), state)
        opt.zero_grad()
    assert skip.device_consecutive().item() == 2 and skip.host_syncs == 0


@pytest.mark.parametrize("kind", OPTIMIZERS)
def test_a_true_gate_is_exactly_the_plain_step(kind):
    model, opt, skip = _gated(kind)
    _warm(model, opt)
    ref_model, ref_opt = copy.deepcopy((model, opt))
    for s in range(1, 4):
        forward_backward(model, s)
        forward_backward(ref_model, s)
        skip.arm(torch.tensor(True))
        run_step(opt, [skip])
        ref_opt.step()
        opt.zero_grad()
        ref_opt.zero_grad()
    assert_same(params(model), params(ref_model))
    assert_same(opt_state(opt), opt_state(ref_opt))
    assert skip.device_consecutive().item() == 0


def test_max_consecutive_is_enforced_on_the_device():
    model, opt, skip = _gated("adamw")
    _warm(model, opt)
    kept = []
    for s in range(1, 5):  # gate false four times: 2 skips, then forced keep, then skip again
        forward_backward(model, s)
        before = params(model)
        skip.arm(torch.tensor(False))
        run_step(opt, [skip])
        kept.append(not all(torch.equal(a, b) for a, b in zip(params(model), before)))
        opt.zero_grad()
    assert kept == [False, False, True, False]
    assert skip.state_dict()["device_consecutive"] == 1


def test_first_step_before_the_state_exists_reads_the_gate_on_the_host():
    model, opt, skip = _gated("adamw")
    weights = params(model)
    forward_backward(model, 0)
    skip.arm(torch.tensor(False))
    assert run_step(opt, [skip]) is False  # decided on the host (one sync, once)
    assert skip.host_syncs == 1 and not opt.state
    assert_same(params(model), weights)


def test_arm_needs_a_0_dim_tensor_and_returns_the_gate_in_force():
    skip = SkipStep(max_consecutive=1)
    assert skip.arm(torch.tensor(False)).item() is False  # the guard arms it from gate rules
    skip.after_step(None, True, 0)  # the gated step: one device skip in a row
    assert skip.arm(torch.tensor(False)).item() is True  # max_consecutive=1: kept on the device
    with pytest.raises(ValueError, match="keep must be a 0-dim bool tensor"):
        SkipStep(gate="device").arm(torch.tensor([True]))


def test_device_gate_through_the_guard(tmp_path):
    """User code arms the gate between backward and guard.step; a rule-decided skip still
    vetoes the step on the host."""
    text = HEAD + """\
actuators:
  skip_step: {max_consecutive: 3, gate: device}
rules: []
"""
    model, opt = make()
    guard = Guard(opt, loads_policy(text), model=model, log_dir=tmp_path / "run")
    _warm(model, opt)
    weights, state = params(model), opt_state(opt)
    loss = forward_backward(model, 1, scale=float("nan"))
    guard.actuators["skip_step"].arm(torch.isfinite(loss))  # no sync
    with pytest.warns(UserWarning, match="optimizer.step\\(\\) was called outside"):
        result = guard.step(loss)  # _warm stepped the optimizer itself: warned, once
    assert result.skipped is False  # the guard called optimizer.step(); the gate undid it
    assert_same(params(model), weights)
    assert_same(opt_state(opt), state)
    guard.close()
    assert records(tmp_path / "run")[-1]["event"] == "run_end"


@pytest.mark.gpu
def test_cuda_gate_makes_no_host_sync():
    model, _ = make("adamw")
    model.cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=0.01, weight_decay=0.1, capturable=True)
    skip = SkipStep(max_consecutive=2, gate="device")
    skip.attach(opt)
    x, y = torch.randn(32, 8, device="cuda"), torch.randn(32, 2, device="cuda")
    for s in range(2):
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()  # state created
        opt.zero_grad()
    weights, state = params(model), opt_state(opt)
    loss = torch.nn.functional.mse_loss(model(x), y) * float("nan")
    loss.backward()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        skip.arm(torch.isfinite(loss))
        assert run_step(opt, [skip]) is True
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert_same(params(model), weights)
    assert_same(opt_state(opt), state)


@pytest.mark.gpu
def test_cuda_gate_refuses_step_counts_on_the_cpu():
    model = torch.nn.Linear(4, 2).cuda()
    opt = torch.optim.AdamW(model.parameters(), foreach=True)
    with pytest.raises(ActuatorError, match=r"gate: device needs the step counts on the device, "
                                            r"but param group 0 of AdamW keeps state\['step'\] on the CPU"):
        SkipStep(gate="device").attach(opt)
