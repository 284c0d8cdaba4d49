"""grad_normalize (AdaGN, arXiv 2502.17055): each tensor's gradient against a float64 reference
written from the paper's formulas, tensors without a gradient or with a zero one, resume from
its state_dict, the guard in enforce and audit mode, and the loader's checks of its bounds."""

from __future__ import annotations

import math

import pytest
import torch

from actuator_helpers import HEAD, forward_backward, make, params, registry, run_step
from lbw_policy.actuators import GradNormalize
from lbw_policy.adapters.guard import Guard
from lbw_policy.errors import PolicyError
from lbw_policy.policy import loads_policy

REG = registry()


class Reference:
    """AdaGN per tensor, in float64 Python: m, v EMAs of the norm and its square, bias-corrected
    ratio, g * c / n; a tensor whose norm is 0 is left alone and its statistics do not move."""

    def __init__(self, gamma1=0.7, gamma2=0.9, eps=1e-8):
        self.g1, self.g2, self.eps = gamma1, gamma2, eps
        self.stats: dict = {}

    def apply(self, named_grads):
        out = {}
        for name, g in named_grads.items():
            if g is None:
                continue
            n = math.sqrt(sum(float(x) ** 2 for x in g.double().flatten()))
            if n == 0:
                out[name] = g.double().clone()
                continue
            m, v, t = self.stats.get(name, (0.0, 0.0, 0))
            m, v, t = self.g1 * m + (1 - self.g1) * n, self.g2 * v + (1 - self.g2) * n * n, t + 1
            self.stats[name] = (m, v, t)
            c = (m / (1 - self.g1 ** t)) / (math.sqrt(v / (1 - self.g2 ** t)) + self.eps)
            out[name] = g.double() * (c / n)
        return out


def _grads(model, step):
    """Gradients of a deterministic batch, scaled by a factor that swings from step to step (so
    the norm statistics matter); the first layer's bias gets a zero gradient at step 2."""
    model.zero_grad(set_to_none=True)
    forward_backward(model, step, scale=(1.0, 30.0, 0.5, 4.0, 1.0, 0.01)[step % 6])
    if step == 2:
        model[0].bias.grad.zero_()
    if step == 3:
        model[2].bias.grad = None  # a tensor without a gradient this step


@pytest.mark.parametrize("gammas", [(0.7, 0.9), (0.5, 0.99)])
def test_each_tensor_follows_the_papers_formulas(gammas):
    model, opt = make("sgd", lr=0.01, wd=0.0)
    act = GradNormalize(gamma1=gammas[0], gamma2=gammas[1])
    act.attach(opt)
    ref = Reference(*gammas)
    names = dict(model.named_parameters())
    for step in range(8):
        _grads(model, step)
        expected = ref.apply({n: (p.grad.detach().clone() if p.grad is not None else None)
                              for n, p in names.items()})
        act.before_step(opt, step)
        for n, p in names.items():
            if p.grad is None:
                assert n not in expected
                continue
            assert torch.allclose(p.grad.double(), expected[n], rtol=2e-6, atol=1e-12), (step, n)
    # the zeroed bias kept its gradient at 0 and its statistics where they were
    assert ref.stats["0.bias"][2] == 7
    # after the first step every tensor's gradient has norm n / (n + eps), i.e. 1
    model2, opt2 = make("sgd", lr=0.01, wd=0.0)
    act2 = GradNormalize()
    act2.attach(opt2)
    _grads(model2, 1)  # the x30 batch
    act2.before_step(opt2, 0)
    for p in model2.parameters():
        assert float(p.grad.norm()) == pytest.approx(1.0, rel=1e-6)


def test_a_resumed_actuator_continues_bitwise():
    def run(split):
        model, opt = make("adamw", lr=0.01)
        act = GradNormalize()
        act.attach(opt)
        for step in range(10):
            if step == split:
                state = act.state_dict()
                act = GradNormalize()
                act.attach(opt)
                act.load_state_dict(state)
            _grads(model, step)
            run_step(opt, [act], step)
        return params(model), act.state_dict()

    whole, whole_state = run(None)
    split, split_state = run(5)
    for a, b in zip(whole, split):
        assert torch.equal(a, b)
    assert whole_state == split_state
    assert whole_state["stats"]["0"][2] == 10  # position 0 (the first weight): 10 updates


def _guard_policy(mode: str):
    return loads_policy(HEAD + f"""\
mode: {mode}
detectors:
  nan: {{type: nonfinite}}
actuators:
  skip_step: {{}}
  grad_normalize: {{gamma1: 0.7, gamma2: 0.9}}
rules:
  - {{name: skip, when: {{signal: nan.any, op: ">", value: 0}}, then: [{{actuator: skip_step}}]}}
""", registry=REG)


@pytest.mark.parametrize("mode", ["enforce", "audit"])
def test_through_the_guard(tmp_path, mode):
    """Enforce: the same weights as AdamW stepped on the reference's normalized gradients. Audit:
    plain AdamW's weights (nothing is changed)."""
    model, opt = make("adamw", lr=0.01)
    guard = Guard(opt, _guard_policy(mode), model=model, log_dir=tmp_path / "g", registry=REG)
    ref_model, ref_opt = make("adamw", lr=0.01)
    ref = Reference()
    for step in range(6):
        _grads(model, step)
        guard.step(torch.tensor(1.0))
        opt.zero_grad(set_to_none=True)
        _grads(ref_model, step)
        if mode == "enforce":
            normalized = ref.apply({n: p.grad for n, p in ref_model.named_parameters()})
            for n, p in ref_model.named_parameters():
                if p.grad is not None:
                    p.grad.copy_(normalized[n].float())
        ref_opt.step()
    guard.close()
    for a, b in zip(model.parameters(), ref_model.parameters()):
        assert torch.allclose(a, b, rtol=0, atol=1e-6)
    plain_model, plain_opt = make("adamw", lr=0.01)
    for step in range(6):
        _grads(plain_model, step)
        plain_opt.step()
    moved = max(float((a - b).detach().abs().max())
                for a, b in zip(model.parameters(), plain_model.parameters()))
    if mode == "audit":
        assert moved == 0.0
    else:
        assert moved > 1e-4  # normalization changed the run


def test_bounds_are_checked_where_the_policy_says_them():
    body = """\
detectors:
  nan: {type: nonfinite}
actuators:
  grad_normalize: {gamma1: 1.0}
rules: []
"""
    with pytest.raises(PolicyError, match=r"actuators\.grad_normalize\.gamma1"):
        loads_policy(HEAD + body, registry=REG)
    with pytest.raises(PolicyError, match=r"actuators\.grad_normalize"):
        loads_policy(HEAD + body.replace("gamma1: 1.0", "beta: 0.5"), registry=REG)
