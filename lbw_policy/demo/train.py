"""The main job: a small pre-LN GPT trained with AdamW under a policy, every decision logged.

Used by ``lbw-policy run`` and by the benchmarks. The loop is written to be read in one go,
nanoGPT-style: data -> model -> AdamW + warm-up/cosine schedule -> ``guard.step(loss)``.

Distributed data parallel: ``nproc > 1`` starts that many processes (gloo on the CPU, NCCL on
CUDA, one GPU each); a job started by ``torchrun`` (``WORLD_SIZE`` set) joins its process group.
The model is wrapped in ``DistributedDataParallel``, each rank draws its own batches, the guards
reduce their signals across ranks (docs/distributed.md), and rank 0 writes the run directory.
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
from lbw_policy.progress import Progress

__all__ = ["TrainConfig", "train", "lr_lambda"]


def model_device(model: torch.nn.Module) -> int:
    """The CUDA device index of ``model``'s parameters (for DDP's ``device_ids``)."""
    return next(model.parameters()).device.index


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
    progress: bool = True           # tqdm progress bar on stderr (lbw_policy.progress.Progress)
    nproc: int = 1                  # processes of a DDP run started here (1: this process only)
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
    if config.nproc < 1:
        raise ValueError(f"nproc must be >= 1, found {config.nproc}")
    if config.nproc > 1:
        return _spawn(config)
    started = _join_torchrun(config)
    # Denormals in Adam state make CPU steps ~5x slower; the setting is process-wide, so it is
    # put back when training ends.
    flush = config.device == "cpu" and torch.set_flush_denormal(True)
    try:
        return _train(config)
    finally:
        if flush:
            torch.set_flush_denormal(False)
        if started:
            torch.distributed.destroy_process_group()


def _spawn(config: TrainConfig) -> dict:
    """Run :func:`train` on ``config.nproc`` processes (torch.multiprocessing, a file store in
    a temporary directory); return rank 0's summary.

    :raises RuntimeError: a rank failed (its traceback is printed by torch), or
        ``--device cuda`` with fewer GPUs than processes.
    """
    import dataclasses
    import tempfile

    import torch.multiprocessing as mp

    if config.device.startswith("cuda") and torch.cuda.device_count() < config.nproc:
        raise RuntimeError(f"--nproc {config.nproc} on CUDA needs {config.nproc} GPUs, found "
                           f"{torch.cuda.device_count()}")
    # what a user can get wrong fails here, once, not in every rank
    load_policy(resolve_policy_path(config.policy))
    if config.data is not None and not Path(config.data).is_file():
        raise FileNotFoundError(f"--data {config.data}: no such file")
    out = Path(config.out or f"runs/{time.strftime('%Y%m%d-%H%M%S')}-lr{config.lr:g}-s{config.seed}")
    config = dataclasses.replace(config, out=str(out))
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_rank_main, args=(config, os.path.join(tmp, "store")), nprocs=config.nproc,
                 join=True)
    return json.loads((out / "summary.json").read_text(encoding="utf-8"))


def _rank_main(rank: int, config: TrainConfig, store: str) -> None:
    """One process of :func:`_spawn`: join the group, train, leave."""
    import dataclasses

    cuda = config.device.startswith("cuda")
    backend = "nccl" if cuda else "gloo"
    # the machine's cores shared by the ranks: oversubscribed threads make CPU steps far slower
    torch.set_num_threads(max(1, torch.get_num_threads() // config.nproc))
    torch.distributed.init_process_group(backend, init_method=f"file://{store}", rank=rank,
                                         world_size=config.nproc)
    try:
        train(dataclasses.replace(config, nproc=1, device=f"cuda:{rank}" if cuda else config.device,
                                  progress=config.progress and rank == 0))
    except BaseException:
        torch.distributed.destroy_process_group()
        raise
    leave_process_group()


def leave_process_group() -> None:
    """End a spawned rank that finished its work: collect the garbage that may still hold the
    process group (while the interpreter is whole), destroy the group, flush the output and
    exit with status 0 without the interpreter's finalization. Gloo's worker threads can
    outlive ``destroy_process_group`` through such references, and their destruction during
    finalization aborts the process now and then ("terminate called without an active
    exception", SIGABRT), which ``torch.multiprocessing.spawn`` reports as a failed rank after a
    run that succeeded (seen in this project's tests; the mechanism is discussed in
    pytorch/pytorch#179291). Everything the rank writes is closed before this is called."""
    import gc
    import logging
    import sys

    gc.collect()
    torch.distributed.destroy_process_group()
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(0)


def _join_torchrun(config: TrainConfig) -> bool:
    """Join the process group of a ``torchrun`` launch (``WORLD_SIZE`` > 1 in the environment)
    unless one is initialized already. :returns: whether this call initialized it."""
    dist = torch.distributed
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not dist.is_available() or dist.is_initialized():
        return False
    cuda = config.device.startswith("cuda")
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if cuda else "gloo")
    return True


def _train(config: TrainConfig) -> dict:
    policy = load_policy(resolve_policy_path(config.policy))
    dist = torch.distributed
    distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    rank = dist.get_rank() if distributed else 0
    if distributed and config.device == "cuda":
        config.device = f"cuda:{torch.cuda.current_device()}"
    torch.manual_seed(config.seed)
    corpus = CharCorpus(load_text(config.data, max_bytes=config.max_corpus_bytes if config.data is None else None))
    gen = torch.Generator().manual_seed(config.seed + 1_000_003 * rank)  # each rank its batches
    val = corpus.fixed_batches("val", config.eval_batches, config.batch_size, config.block_size, seed=1234)
    model = GPT(GPTConfig(vocab_size=corpus.vocab_size, block_size=config.block_size, n_layer=config.n_layer,
                          n_head=config.n_head, n_embd=config.n_embd)).to(config.device)
    # fused on CUDA: one kernel, and the device gate skips a non-finite step through found_inf
    fused = True if torch.device(config.device).type == "cuda" else None
    net = model  # what the loop calls: the model, or its DDP wrapper (gradients averaged)
    if distributed:
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[model_device(model)] if config.device.startswith("cuda") else None)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, betas=tuple(config.betas),
                                  eps=config.eps, weight_decay=config.weight_decay, fused=fused)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(config))
    out = Path(config.out or f"runs/{time.strftime('%Y%m%d-%H%M%S')}-lr{config.lr:g}-s{config.seed}")
    guard = Guard(optimizer, policy, model=model, log_dir=out,
                  labels={"job": "lbw-policy run", "data": config.data or "<stdlib>", "seed": config.seed},
                  sign_key=config.sign_key, witness=_witness(config.witness),
                  checkpoint_every=config.checkpoint_every)

    halted = None
    losses = []
    t0 = time.perf_counter()
    try:  # the bar only: `lbw-policy run` prints its own summary, with the losses
        with Progress(guard, total=config.steps, summary=False,
                      disable=not config.progress or rank != 0) as progress:
            for _ in range(config.steps):
                x, y = corpus.get_batch("train", config.batch_size, config.block_size, gen)
                x, y = x.to(config.device), y.to(config.device)
                _, loss = net(x, y)
                loss.backward()
                result = guard.step(loss)     # detect -> decide -> log -> actuate -> step or skip
                optimizer.zero_grad(set_to_none=True)
                scheduler.step()
                losses.append(result.loss)
                progress.update(result)
    except TrainingHalted as exc:
        halted = {"step": exc.step, "rule": exc.rule, "message": str(exc)}
    elapsed = time.perf_counter() - t0
    gsum = guard.close()
    if rank != 0:  # rank 0 evaluates and writes the summary
        return {**gsum, "rank": rank, "run_dir": str(out), "halted": halted}
    val_loss = evaluate(model, [(a.to(config.device), b.to(config.device)) for a, b in val])
    summary = {
        "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(config).items()},
        "policy": {"name": policy.name, "revision": policy.revision, "source": str(policy.source),
                   "mode": policy.mode},
        "vocab_size": corpus.vocab_size,
        "params": model.num_params(),
        "world_size": dist.get_world_size() if distributed else 1,
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
