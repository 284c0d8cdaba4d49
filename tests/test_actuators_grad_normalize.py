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
        act.after_step(opt, True, step)  # the step was taken: the statistics are kept
        for n, p in names.items():
            if p.grad is None:
                assert n not in expected
                continue
            assert torch.allclose(p.grad.double(), expected[n], rtol=2e-6, atol=1e-12), (step, n)
    # positions 1 (the first bias, zeroed at step 2) and 3 (no gradient at step 3): 7 updates
    counts = {pos: s[2] for pos, s in act.state_dict()["stats"].items()}
    assert counts == {"0": 8, "1": 7, "2": 8, "3": 7}
    # after the first step every tensor's gradient has norm n / (n + eps), i.e. 1
    model2, opt2 = make("sgd", lr=0.01, wd=0.0)
    act2 = GradNormalize()
    act2.attach(opt2)
    _grads(model2, 1)  # the x30 batch
    act2.before_step(opt2, 0)
    for p in model2.parameters():
        assert float(p.grad.norm()) == pytest.approx(1.0, rel=1e-6)


@pytest.mark.parametrize("split", [3, 4, 5])
def test_a_resumed_actuator_continues_bitwise(split):
    """Split at 4: the state is saved right after a step where one param had no gradient."""
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
    resumed, resumed_state = run(split)
    for a, b in zip(whole, resumed):
        assert torch.equal(a, b)
    assert whole_state == resumed_state
    assert whole_state["stats"]["0"][2] == 10  # position 0 (the first weight): 10 updates
    assert whole_state["stats"]["3"][2] == 9   # position 3 had no gradient at step 3


def test_statistics_move_only_when_the_step_is_taken_and_only_for_finite_norms():
    model, opt = make("sgd", lr=0.01, wd=0.0)
    act = GradNormalize()
    act.attach(opt)
    _grads(model, 0)
    act.before_step(opt, 0)
    act.after_step(opt, True, 0)
    before = act.state_dict()
    _grads(model, 1)                      # the x30 batch, vetoed by skip_step
    act.before_step(opt, 1)
    act.after_step(opt, False, 1)
    assert act.state_dict() == before
    _grads(model, 4)
    model[0].weight.grad[0, 0] = float("nan")
    model[2].weight.grad[0, 0] = 1e30     # finite, but its square overflows float32
    nan_grad = model[0].weight.grad.clone()
    big_grad = model[2].weight.grad.clone()
    act.before_step(opt, 4)
    act.after_step(opt, True, 4)
    after = act.state_dict()["stats"]
    assert after["0"] == before["stats"]["0"] and after["2"] == before["stats"]["2"]
    assert after["1"][2] == 2 and after["3"][2] == 2
    assert torch.equal(model[0].weight.grad.nan_to_num(7.0), nan_grad.nan_to_num(7.0))
    assert torch.equal(model[2].weight.grad, big_grad)  # left alone


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_gradients_use_float32_norms(dtype):
    """bf16 / fp16 gradients: the norms are taken in float32 (an fp16 tensor whose norm
    exceeds 65504 is still normalized), the result matches the reference to the dtype's
    rounding."""
    p = torch.nn.Parameter(torch.zeros(64, 64, dtype=dtype))
    q = torch.nn.Parameter(torch.zeros(8, dtype=dtype))
    opt = torch.optim.SGD([p, q], lr=0.1)
    act = GradNormalize()
    act.attach(opt)
    ref = Reference()
    gen = torch.Generator().manual_seed(0)
    for step in range(4):
        scale = 3000.0 if dtype == torch.float16 else 1e5  # fp16: norm about 1.9e5 > 65504
        p.grad = (torch.randn(64, 64, generator=gen) * scale * (step + 1)).to(dtype)
        q.grad = torch.randn(8, generator=gen).to(dtype)
        expected = ref.apply({"p": p.grad.float(), "q": q.grad.float()})
        act.before_step(opt, step)
        act.after_step(opt, True, step)
        assert torch.isfinite(p.grad).all()
        assert torch.allclose(p.grad.double(), expected["p"], rtol=2e-2, atol=1e-4)
        assert torch.allclose(q.grad.double(), expected["q"], rtol=2e-2, atol=1e-4)
    if dtype == torch.float16:
        assert float(torch.linalg.vector_norm(p.grad.float())) < 2.0  # normalized, not skipped


def test_params_added_later_are_normalized_from_their_first_gradient():
    model, opt = make("sgd", lr=0.01, wd=0.0)
    act = GradNormalize()
    act.attach(opt)
    extra = torch.nn.Parameter(torch.ones(5))
    opt.add_param_group({"params": [extra]})
    extra.grad = torch.full((5,), 40.0)
    _grads(model, 0)
    act.before_step(opt, 0)
    act.after_step(opt, True, 0)
    assert float(extra.grad.norm()) == pytest.approx(1.0, rel=1e-6)
    assert act.state_dict()["stats"]["4"][2] == 1


def test_bad_arguments_and_states_are_refused():
    for kwargs in ({"gamma1": 1.0}, {"gamma2": 0.0}, {"eps": 0.0}):
        with pytest.raises(ValueError, match=r"^grad_normalize: (gamma1|gamma2|eps) must"):
            GradNormalize(**kwargs)
    model, opt = make("sgd", lr=0.01, wd=0.0)
    act = GradNormalize()
    act.attach(opt)
    for bad in ({"stats": {"4": [0.1, 0.1, 1]}}, {"stats": {"0": [0.1, -1.0, 1]}},
                {"stats": {"0": [0.1, 0.1]}}, {}, {"stats": {"x": [0, 0, 0]}}):
        with pytest.raises(ValueError, match=r"^grad_normalize: bad state_dict"):
            act.load_state_dict(bad)


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


@pytest.mark.parametrize("where", ["guard", "policy"])
def test_a_clip_after_it_clips_the_normalized_gradients(tmp_path, where):
    """Guard(clip_grad_norm=) and a grad_clip declared after grad_normalize see the norm the
    normalization left (about sqrt(4) = 2 here), not the norm the detectors saw: the gradients
    the optimizer steps on have a global norm of at most the clip."""
    clip = "  grad_clip: {max_norm: 0.5}\n" if where == "policy" else ""
    policy = loads_policy(HEAD + f"""\
mode: enforce
detectors:
  nan: {{type: nonfinite}}
actuators:
  skip_step: {{}}
  grad_normalize: {{}}
{clip}rules:
  - {{name: skip, when: {{signal: nan.any, op: ">", value: 0}}, then: [{{actuator: skip_step}}]}}
""", registry=REG)
    model, opt = make("sgd", lr=0.01, wd=0.0)
    seen = []
    real_step = opt.step

    def spy(*a, **k):
        seen.append(float(torch.linalg.vector_norm(torch.stack(
            [p.grad.norm() for p in model.parameters()]))))
        return real_step(*a, **k)

    opt.step = spy
    guard = Guard(opt, policy, model=model, log_dir=tmp_path / "g", registry=REG,
                  clip_grad_norm=0.5 if where == "guard" else None)
    for step in (4, 5, 7, 10):  # scales 1.0, 0.01, 30.0, 4.0: raw norms far from 2
        _grads(model, step)
        guard.step(torch.tensor(1.0))
    guard.close()
    assert len(seen) == 4 and all(n == pytest.approx(0.5, rel=1e-4) for n in seen), seen


def test_a_rule_cannot_command_it():
    body = """\
detectors:
  nan: {type: nonfinite}
actuators:
  grad_normalize: {}
rules:
  - {name: r, when: {signal: nan.any, op: ">", value: 0}, then: [{actuator: grad_normalize}]}
"""
    with pytest.raises(PolicyError, match=r"rules\[0\]\.then\[0\]\.actuator: actuator "
                                          r"'grad_normalize' takes no commands"):
        loads_policy(HEAD + body, registry=REG)


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
