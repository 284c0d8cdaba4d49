"""Accelerate: a GuardedOptimizer through prepare(), gradient_accumulation_steps=4 (one guard
step per optimizer step, on the mean micro-batch loss), save_state / load_state carrying the
guard."""

from __future__ import annotations

import pytest
import torch

accelerate = pytest.importorskip("accelerate")

from integration_helpers import batches, corpus, decisions, demo_gpt  # noqa: E402
from lbw_policy.integrations.accelerate import GuardState, guard_metrics, register_guard  # noqa: E402
from lbw_policy.integrations.optimizer import GuardedOptimizer  # noqa: E402

ACC = 4


@pytest.fixture(scope="module")
def chars():
    return corpus()


def _setup(chars, log_dir, resume=False):
    from accelerate.utils import GradientAccumulationPlugin

    accelerator = accelerate.Accelerator(
        cpu=True, gradient_accumulation_plugin=GradientAccumulationPlugin(num_steps=ACC, sync_with_dataloader=False))
    model = demo_gpt(chars.vocab_size)
    guarded = GuardedOptimizer(torch.optim.AdamW(model.parameters(), lr=2e-2), "default",
                               model=model, log_dir=log_dir, resume=resume, clip_grad_norm=1.0)
    model, opt = accelerator.prepare(model, guarded)
    register_guard(accelerator, guarded)
    return accelerator, model, opt, guarded


def _train(accelerator, model, opt, guarded, data, per_step=None):
    micro = []
    for x, y in data:
        with accelerator.accumulate(model):
            _, loss = model(x, y)
            accelerator.backward(loss)
            guarded.observe_loss(loss)
            micro.append(float(loss.detach()))
            before = guarded.guard.step_count
            opt.step()
            opt.zero_grad()
            if accelerator.sync_gradients:
                assert guarded.guard.step_count == before + 1
                assert guarded.last_result.loss == pytest.approx(sum(micro[-ACC:]) / ACC, rel=1e-6)
                if per_step is not None:
                    per_step.append(guard_metrics(guarded))
            else:
                assert guarded.guard.step_count == before  # no guard step mid-accumulation


def test_one_guard_step_per_optimizer_step_and_checkpoint(chars, tmp_path):
    data = batches(chars, 16 * ACC, batch=4)
    cut = 2  # mid-way through the brake the high learning rate draws at step 1
    acc, model, opt, guarded = _setup(chars, tmp_path / "a")
    assert isinstance(opt, accelerate.optimizer.AcceleratedOptimizer) and opt.optimizer is guarded
    metrics = []
    _train(acc, model, opt, guarded, data[:cut * ACC], metrics)
    assert guarded.guard.step_count == cut
    acc.save_state(str(tmp_path / "ckpt"))
    _train(acc, model, opt, guarded, data[cut * ACC:], metrics)
    assert guarded.guard.step_count == 16
    first = [(r["step"], r["event"], r["rule"]) for r in decisions(tmp_path / "a")]
    assert first, "the high learning rate draws decisions"
    guarded.close()

    # a new process's view: fresh objects, load_state, the same second half
    acc2, model2, opt2, guarded2 = _setup(chars, tmp_path / "b")
    acc2.load_state(str(tmp_path / "ckpt"))
    assert guarded2.guard.step_count == cut
    again = []
    _train(acc2, model2, opt2, guarded2, data[cut * ACC:], again)
    assert again == metrics[cut:]  # same signals, scale and counts at every step
    second = [(r["step"], r["event"], r["rule"]) for r in decisions(tmp_path / "b")]
    assert second == [d for d in first if d[0] >= cut] and second, "decisions after the checkpoint"
    guarded2.close()


def test_register_guard_checks_its_input(chars, tmp_path):
    acc = accelerate.Accelerator(cpu=True)
    with pytest.raises(TypeError, match="needs the GuardedOptimizer"):
        register_guard(acc, torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1))
    model = demo_gpt(chars.vocab_size)
    guarded = GuardedOptimizer(torch.optim.AdamW(model.parameters()), model=model, log_dir=tmp_path / "g")
    state = register_guard(acc, guarded)
    assert isinstance(state, GuardState) and state.state_dict()["guard"]["step"] == 0
    guarded.close()
