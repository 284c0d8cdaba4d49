"""Lightning: a CPU Trainer on the demo GPT with accumulate_grad_batches=4 and the default
policy at a high learning rate: decisions, logged signals and effective learning rate, a
verifying log, and a resume from a Lightning checkpoint that continues the same decisions."""

from __future__ import annotations

import csv
import subprocess
import sys

import pytest
import torch

L = pytest.importorskip("lightning.pytorch")

from integration_helpers import batches, corpus, decisions, demo_gpt, events  # noqa: E402
from lbw_policy.integrations.lightning import GuardCallback  # noqa: E402
from lbw_policy.integrations.optimizer import GuardedOptimizer  # noqa: E402

ACC, PER_EPOCH, EPOCHS, LR = 4, 8, 4, 2e-2  # 2 optimizer steps per epoch, 8 in all


class Lit(L.LightningModule):
    def __init__(self, vocab: int, log_dir, resume: bool = False) -> None:
        super().__init__()
        self.model = demo_gpt(vocab)
        self.log_dir, self.resume = log_dir, resume

    def training_step(self, batch, batch_idx):
        x, y = batch
        _, loss = self.model(x, y)
        return loss

    def configure_optimizers(self):
        return GuardedOptimizer(torch.optim.AdamW(self.parameters(), lr=LR), "default",
                                model=self.model, log_dir=self.log_dir, resume=self.resume)


@pytest.fixture(scope="module")
def data():
    c = corpus()
    xs, ys = zip(*batches(c, PER_EPOCH, batch=4))
    ds = torch.utils.data.TensorDataset(torch.cat(xs), torch.cat(ys))
    return c.vocab_size, torch.utils.data.DataLoader(ds, batch_size=4, shuffle=False)


def _fit(data, tmp_path, name, ckpt=None, clip=None):
    vocab, loader = data
    lit = Lit(vocab, tmp_path / name)
    saver = L.callbacks.ModelCheckpoint(dirpath=tmp_path / f"{name}-ckpt", save_top_k=-1,
                                        every_n_epochs=1, save_on_train_epoch_end=True)
    cb = GuardCallback()
    trainer = L.Trainer(accelerator="cpu", max_epochs=EPOCHS, accumulate_grad_batches=ACC,
                        callbacks=[cb, saver], logger=L.loggers.CSVLogger(tmp_path, name=name),
                        log_every_n_steps=1, enable_progress_bar=False,
                        enable_model_summary=False, gradient_clip_val=clip)
    trainer.fit(lit, train_dataloaders=loader, ckpt_path=ckpt)
    return trainer, cb


def _decisions(log_dir, since=0):
    return [(r["step"], r["event"], r["rule"],
             [(a["actuator"], a["applied"]) for a in r.get("actions", [])])
            for r in decisions(log_dir) if r["step"] >= since]


def test_lightning_fit_is_governed_logged_and_resumes_the_same(data, tmp_path):
    trainer, cb = _fit(data, tmp_path, "run", clip=1.0)
    guard = cb.guarded.guard
    assert guard.step_count == EPOCHS * PER_EPOCH // ACC  # one guard step per optimizer step
    assert guard.clip_grad_norm == 1.0 and trainer.gradient_clip_val is None
    recs = _decisions(tmp_path / "run")
    assert any(e == "fired" for _, e, _, _ in recs)
    rows = list(csv.DictReader(open(trainer.logger.log_dir + "/metrics.csv")))
    logged = [r for r in rows if r.get("lbw/lr")]
    assert len(logged) == guard.step_count
    assert any(float(r["lbw/lr_scale"]) < 1 for r in logged)
    for r in logged:  # the logged learning rate is the effective one
        assert float(r["lbw/lr"]) == pytest.approx(LR * float(r["lbw/lr_scale"]))
    out = subprocess.run([sys.executable, "-m", "lbw_policy.cli", "verify", str(tmp_path / "run")],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr

    ckpt = sorted((tmp_path / "run-ckpt").glob("epoch=0-*.ckpt"))[0]  # after 2 optimizer steps
    assert "lbw_policy.GuardCallback" in torch.load(ckpt, weights_only=False)["callbacks"]
    _, cb2 = _fit(data, tmp_path, "resumed", ckpt=str(ckpt), clip=1.0)
    assert events(tmp_path / "resumed", "resume")
    assert cb2.guarded.guard.step_count == guard.step_count
    cut = PER_EPOCH // ACC
    assert _decisions(tmp_path / "resumed", since=cut) == _decisions(tmp_path / "run", since=cut)
    assert _decisions(tmp_path / "run", since=cut), "decisions after the checkpoint to compare"


def test_value_clipping_is_refused(data, tmp_path):
    vocab, loader = data
    trainer = L.Trainer(accelerator="cpu", max_steps=1, callbacks=[GuardCallback()], logger=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        enable_checkpointing=False, gradient_clip_val=1.0,
                        gradient_clip_algorithm="value")
    with pytest.raises(ValueError, match="gradient_clip_algorithm='value'"):
        trainer.fit(Lit(vocab, tmp_path / "v"), train_dataloaders=loader)


def test_fp16_gradscaler_overflows_are_scaler_skips(data, tmp_path):
    """Lightning's "16-mixed" plugin with a CPU GradScaler (Lightning itself picks bf16 on a
    CPU): Lightning hands the scaled loss to on_before_backward and calls scaler.step(guarded)."""
    vocab, loader = data
    plugin = L.plugins.precision.MixedPrecision(
        "16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=2.0 ** 24))
    cb = GuardCallback()
    trainer = L.Trainer(accelerator="cpu", max_epochs=2, plugins=[plugin], accumulate_grad_batches=2,
                        callbacks=[cb], logger=False, enable_progress_bar=False,
                        enable_checkpointing=False, enable_model_summary=False)
    trainer.fit(Lit(vocab, tmp_path / "fp16"), train_dataloaders=loader)
    skipped = [r["step"] for r in events(tmp_path / "fp16", "scaler_skipped")]
    assert cb.guarded.guard.step_count == 8 and skipped == list(range(len(skipped))) and skipped
    assert not [r for r in decisions(tmp_path / "fp16") if "nonfinite" in str(r["rule"])]
    assert 2.0 < cb.guarded.last_result.loss < 5.0  # the unscaled loss, in nats
