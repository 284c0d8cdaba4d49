"""Hugging Face Trainer: a GPT2LMHeadModel from a small GPT2Config (2 layers, d 64), built
locally (no download), trained char-level on Tiny Shakespeare for 60 steps at a high learning
rate with the default policy."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from integration_helpers import corpus, decisions, events  # noqa: E402
from lbw_policy.decision_log import read_log  # noqa: E402
from lbw_policy.integrations import UnsupportedStack  # noqa: E402
from lbw_policy.integrations.transformers import GUARD_STATE_FILE, GuardedTrainer  # noqa: E402

STEPS, LR, BLOCK = 60, 2e-2, 32


class Windows(torch.utils.data.Dataset):
    def __init__(self, ids: torch.Tensor, n: int, block: int = BLOCK) -> None:
        g = torch.Generator().manual_seed(0)
        self.starts = torch.randint(len(ids) - block, (n,), generator=g)
        self.ids, self.block = ids, block

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, i):
        x = self.ids[self.starts[i]:self.starts[i] + self.block]
        return {"input_ids": x, "labels": x}


@pytest.fixture(scope="module")
def data():
    c = corpus()
    return c.vocab_size, Windows(c.train, 8 * STEPS)


def _model(vocab: int):
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=vocab, n_positions=BLOCK, n_embd=64, n_layer=2,
                                  n_head=2, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return transformers.GPT2LMHeadModel(cfg)


def _trainer(data, out, log_dir, resume=None, **extra):
    vocab, ds = data
    args = transformers.TrainingArguments(
        output_dir=str(out), max_steps=STEPS, per_device_train_batch_size=8, learning_rate=LR,
        lr_scheduler_type="constant", logging_steps=5, save_steps=30, save_strategy="steps",
        report_to="none", use_cpu=True, seed=0, disable_tqdm=True, dataloader_num_workers=0,
        **extra)
    guard = {"policy": "default", "log_dir": str(log_dir)}
    if resume is not None:
        guard["resume"] = resume
    return GuardedTrainer(model=_model(vocab), args=args, train_dataset=ds, guard=guard)


def _decisions(log_dir, since=0):
    return [(r["step"], r["event"], r["rule"],
             [(a["actuator"], a["applied"]) for a in r.get("actions", [])])
            for r in decisions(log_dir) if r["step"] >= since]


def test_trainer_is_governed_logged_checkpointed_and_resumes_the_same(data, tmp_path):
    trainer = _trainer(data, tmp_path / "out", tmp_path / "log")
    assert trainer.args.max_grad_norm == 0.0  # the clip moved into the guard
    trainer.train()
    guard = trainer.guarded_optimizer.guard
    assert guard.clip_grad_norm == 1.0 and guard.step_count == STEPS
    recs = _decisions(tmp_path / "log")
    assert any(e == "fired" for _, e, _, _ in recs)  # the high LR draws decisions
    # the Trainer's logs carry the guard's signals and the effective learning rate
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert all("lbw/loss.zscore" in h and "lbw/lr_scale" in h for h in logs)
    scaled = [h for h in logs if h["lbw/lr_scale"] < 1.0]
    assert scaled, "the policy braked the learning rate at some logged step"
    for h in logs:
        assert h["lbw/scheduled_lr"] == pytest.approx(LR)
        assert h["learning_rate"] <= LR * (1 + 1e-9)
    assert any(h["learning_rate"] < LR for h in logs)
    # the log verifies with the CLI
    out = subprocess.run([sys.executable, "-m", "lbw_policy.cli", "verify", str(tmp_path / "log")],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    assert (tmp_path / "out" / "checkpoint-30" / GUARD_STATE_FILE).exists()

    # resume from the Trainer's checkpoint: the same decisions from step 30 on (the guard is
    # built with resume=True by train(resume_from_checkpoint=...) itself)
    resumed = _trainer(data, tmp_path / "out", tmp_path / "log2")
    resumed.train(resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-30"))
    assert resumed.guarded_optimizer.guard.step_count == STEPS
    assert events(tmp_path / "log2", "resume")
    assert _decisions(tmp_path / "log2", since=30) == _decisions(tmp_path / "log", since=30)
    assert _decisions(tmp_path / "log", since=30), "decisions after the checkpoint to compare"


def test_the_callers_training_arguments_keep_their_clip(data, tmp_path):
    vocab, ds = data
    args = transformers.TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True,
                                          max_grad_norm=1.0)
    trainer = GuardedTrainer(model=_model(vocab), args=args, train_dataset=ds,
                             guard={"policy": "default", "log_dir": str(tmp_path / "log")})
    assert trainer.args.max_grad_norm == 0.0 and args.max_grad_norm == 1.0


def test_a_resumed_trainer_continues_its_own_decision_log(data, tmp_path):
    """train(resume_from_checkpoint=...) into the run's own log_dir needs no resume flag."""
    first = _trainer(data, tmp_path / "out", tmp_path / "log")
    first.train()
    again = _trainer(data, tmp_path / "out", tmp_path / "log")
    again.train(resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-30"))
    assert events(tmp_path / "log", "resume")
    out = subprocess.run([sys.executable, "-m", "lbw_policy.cli", "verify", str(tmp_path / "log")],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_plain_optimizer_and_deepspeed_are_refused(data, tmp_path):
    vocab, ds = data
    model = _model(vocab)
    args = transformers.TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True)
    with pytest.raises(TypeError, match="wrap it: GuardedOptimizer"):
        GuardedTrainer(model=model, args=args, train_dataset=ds,
                       optimizers=(torch.optim.AdamW(model.parameters()), None))
    with pytest.raises(TypeError, match="needs guard="):
        GuardedTrainer(model=model, args=args, train_dataset=ds)
    from lbw_policy.integrations import refuse_deepspeed

    with pytest.raises(UnsupportedStack, match="DeepSpeed is not supported yet"):
        refuse_deepspeed("transformers.GuardedTrainer", True)
