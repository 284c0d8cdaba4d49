"""The main job: a small pre-LN GPT trained with AdamW under a policy, every decision logged.

Used by ``lbw-policy run`` and by the benchmarks. The loop is written to be read in one go,
nanoGPT-style: data -> model -> AdamW + warm-up/cosine schedule -> ``guard.step(loss)``.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import torch

from lbw_policy.adapters.guard import Guard
from lbw_policy.demo.data import CharCorpus, load_text
from lbw_policy.demo.gpt import GPT, GPTConfig, evaluate
from lbw_policy.errors import TrainingHalted
from lbw_policy.policy import load_policy, resolve_policy_path

__all__ = ["TrainConfig", "train", "lr_lambda"]


@dataclass
class TrainConfig:
    """Configuration of the demo run. Defaults are the stress benchmark's (issue 6)."""

    data: Optional[str] = None      # text file; None = the interpreter's standard-library sources
    policy: str = "default"         # policy file or built-in name (default, audit-only)
    steps: int = 300                # optimizer steps (governed steps, skipped ones included)
    lr: float = 3e-3                # peak learning rate of AdamW
    warmup_steps: int = 15          # linear warm-up from lr/warmup_steps to lr
    min_lr_ratio: float = 0.1       # cosine decays to lr * min_lr_ratio at the last step
    batch_size: int = 32            # B, sequences per step
    block_size: int = 64            # T, context length in characters
    n_layer: int = 2                # transformer blocks
    n_head: int = 4                 # attention heads
    n_embd: int = 128               # model width d
    betas: tuple = (0.9, 0.95)      # AdamW (beta1, beta2)
    eps: float = 1e-8               # AdamW epsilon
    weight_decay: float = 0.0       # AdamW decoupled weight decay
    seed: int = 0                   # model init and batch order
    device: str = "cpu"             # "cpu" or "cuda"
    eval_batches: int = 20          # fixed validation batches for the final loss
    out: Optional[str] = None       # run directory; default runs/<timestamp>-lr<lr>-s<seed>
    max_corpus_bytes: int = 2_000_000  # cap on the stdlib corpus when data is None
    progress: bool = True           # tqdm progress bar on stderr
    sign_key: Optional[str] = None  # private key file to sign the decision log (None: the file
                                    # named by LBW_POLICY_SIGN_KEY, if set; else unsigned)
    witness: Optional[str] = None   # where signed checkpoints also go: a file, or "-" for stdout
    checkpoint_every: int = 100     # records between signed checkpoints (and one at the end)


def lr_lambda(config: TrainConfig):
    """Multiplier of the peak LR at step s: linear warm-up over ``warmup_steps`` then cosine
    decay to ``min_lr_ratio`` at ``steps - 1`` (nanoGPT's ``get_lr``)."""

    def f(s: int) -> float:
        if s < config.warmup_steps:
            return (s + 1) / config.warmup_steps
        span = max(1, config.steps - 1 - config.warmup_steps)
        progress = min(1.0, (s - config.warmup_steps) / span)
        return config.min_lr_ratio + 0.5 * (1.0 - config.min_lr_ratio) * (1.0 + math.cos(math.pi * progress))

    return f


def _witness(target: Optional[str]):
    """``"-"``: print each signed checkpoint to stdout as one JSON line (a witness file when
    stdout is saved: ``verify --witness`` skips the other lines); a path: that file."""
    if target != "-":
        return target
    return lambda entry: print(json.dumps(entry, sort_keys=True, separators=(",", ":")), flush=True)


def train(config: TrainConfig) -> dict:
    """Run the job; return the summary (also written to ``<out>/summary.json``).

    :raises FileNotFoundError: the data or policy file does not exist.
    :raises PolicyError: the policy is invalid (before any training).
    """
    if config.device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was given but torch.cuda.is_available() is False")
    # Denormals in Adam state make CPU steps ~5x slower; the setting is process-wide, so it is
    # put back when training ends.
    flush = config.device == "cpu" and torch.set_flush_denormal(True)
    try:
        return _train(config)
    finally:
        if flush:
            torch.set_flush_denormal(False)


def _train(config: TrainConfig) -> dict:
    policy = load_policy(resolve_policy_path(config.policy))
    torch.manual_seed(config.seed)
    corpus = CharCorpus(load_text(config.data, max_bytes=config.max_corpus_bytes if config.data is None else None))
    gen = torch.Generator().manual_seed(config.seed)
    val = corpus.fixed_batches("val", config.eval_batches, config.batch_size, config.block_size, seed=1234)
    model = GPT(GPTConfig(vocab_size=corpus.vocab_size, block_size=config.block_size, n_layer=config.n_layer,
                          n_head=config.n_head, n_embd=config.n_embd)).to(config.device)
    # fused on CUDA: one kernel, and the device gate skips a non-finite step through found_inf
    fused = True if torch.device(config.device).type == "cuda" else None
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, betas=tuple(config.betas),
                                  eps=config.eps, weight_decay=config.weight_decay, fused=fused)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(config))
    out = Path(config.out or f"runs/{time.strftime('%Y%m%d-%H%M%S')}-lr{config.lr:g}-s{config.seed}")
    guard = Guard(optimizer, policy, model=model, log_dir=out,
                  labels={"job": "lbw-policy run", "data": config.data or "<stdlib>", "seed": config.seed},
                  sign_key=config.sign_key, witness=_witness(config.witness),
                  checkpoint_every=config.checkpoint_every)

    bar = None
    if config.progress:
        from tqdm import tqdm

        bar = tqdm(total=config.steps, desc="train", unit="step", dynamic_ncols=True)
    halted = None
    losses = []
    t0 = time.perf_counter()
    try:
        for _ in range(config.steps):
            x, y = corpus.get_batch("train", config.batch_size, config.block_size, gen)
            x, y = x.to(config.device), y.to(config.device)
            _, loss = model(x, y)
            loss.backward()
            result = guard.step(loss)     # detect -> decide -> log -> actuate -> step or skip
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            losses.append(result.loss)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{result.loss:.3f}", lr=f"{result.lr:.2e}",
                                decisions=sum(v for k, v in guard.counts.items() if k.startswith("event:")),
                                refresh=False)
    except TrainingHalted as exc:
        halted = {"step": exc.step, "rule": exc.rule, "message": str(exc)}
    finally:
        if bar is not None:
            bar.close()
    elapsed = time.perf_counter() - t0
    gsum = guard.close()
    val_loss = evaluate(model, [(a.to(config.device), b.to(config.device)) for a, b in val])
    summary = {
        "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(config).items()},
        "policy": {"name": policy.name, "revision": policy.revision, "source": str(policy.source),
                   "mode": policy.mode},
        "vocab_size": corpus.vocab_size,
        "params": model.num_params(),
        "steps_run": guard.step_count,
        "final_train_loss": losses[-1] if losses else None,
        "final_val_loss": val_loss,
        "halted": halted,
        "steps_per_second": guard.step_count / elapsed if elapsed > 0 else None,
        **gsum,
        "run_dir": str(out),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2, allow_nan=True) + "\n", encoding="utf-8")
    return summary
