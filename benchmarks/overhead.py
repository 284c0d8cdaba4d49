"""Overhead benchmark: steps per second of the governed loop vs the plain AdamW loop (issue 6).

Both loops train the demo GPT (same shapes as the stress benchmark) in the same process. They
alternate in blocks of ``--block`` steps (plain, governed, plain, governed, ...) so that machine
noise hits both alike; each round gives one ratio governed/plain of steps per second, and the
report is the median over rounds, with a 95 % bootstrap confidence interval of that median
(``scipy.stats.bootstrap``, percentile method, 2,000 resamples): on a shared machine single rounds
scatter by 10 % or more. A warm-up block of each runs first and is not counted.

With ``--sign`` a third loop runs in the same rounds: the governed loop with a signed decision
log (a fresh Ed25519 key, a checkpoint every ``--checkpoint-every`` records). It reports the
ratio signed/unsigned governed steps per second (the end-to-end cost of signing) and, because a
run writes few records and so few checkpoints, the cost of one checkpoint (sign + chained write,
the median of 200 on a scratch log) as a fraction of a plain step: the price of each checkpoint.

Usage::

    python benchmarks/overhead.py                        # default policy, CPU
    python benchmarks/overhead.py --policy early-warning --device cuda
    python benchmarks/overhead.py --sign                 # + the signed decision log
    python benchmarks/overhead.py --nproc 2 --threads 1    # DDP on 2 processes (gloo)

With ``--nproc N`` both loops are ``DistributedDataParallel`` on N processes (gloo on the CPU),
each rank drawing its own batches; the governed one adds the guard's one all-gather per step
of a ``k``-float vector (``k`` is reported as ``collective_floats``). Rank 0 reports.

Prints the figures and appends a JSON line to ``benchmarks/results/overhead.jsonl``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"))
    parser.add_argument("--policy", action="append", default=None,
                        help="policy file or built-in name; repeat for several (default: default)")
    parser.add_argument("--rounds", type=int, default=8, help="plain/governed rounds (default 8)")
    parser.add_argument("--block", type=int, default=25, help="steps per block (default 25)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--n-layer", type=int, default=2)
    parser.add_argument("--n-head", type=int, default=4)
    parser.add_argument("--n-embd", type=int, default=128)
    parser.add_argument("--block-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast (CUDA)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--sign", action="store_true",
                        help="also run the governed loop with a signed decision log (issue 17; "
                             "one process)")
    parser.add_argument("--checkpoint-every", type=int, default=100,
                        help="with --sign: records between signed checkpoints (default 100)")
    parser.add_argument("--nproc", type=int, default=1,
                        help="DDP processes (gloo; default 1: this process, no DDP)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "overhead.jsonl"))
    args = parser.parse_args(argv)
    if args.sign and args.nproc > 1:
        parser.error("--sign measures one process: drop --nproc")
    if args.nproc > 1:
        import os

        import torch.multiprocessing as mp

        with tempfile.TemporaryDirectory() as tmp:
            mp.spawn(_rank_main, args=(args, os.path.join(tmp, "store")), nprocs=args.nproc,
                     join=True)
        return 0
    return measure(args)


def _rank_main(rank: int, args, store: str) -> None:
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank,
                            world_size=args.nproc)
    try:
        measure(args, rank=rank, world=args.nproc)
    except BaseException:
        dist.destroy_process_group()
        raise
    from lbw_policy.demo.train import leave_process_group

    leave_process_group()       # gc, destroy, exit 0 without the finalization that can abort


def measure(args, rank: int = 0, world: int = 1) -> int:
    """The alternating plain/governed blocks of the module docstring; rank 0 reports."""

    import torch

    from lbw_policy import Guard
    from lbw_policy.demo.data import CharCorpus, load_text
    from lbw_policy.demo.gpt import GPT, GPTConfig

    if args.device == "cpu":
        torch.set_flush_denormal(True)
    if args.threads:
        torch.set_num_threads(args.threads)
    corpus = CharCorpus(load_text(args.data))
    config = GPTConfig(vocab_size=corpus.vocab_size, block_size=args.block_size, n_layer=args.n_layer,
                       n_head=args.n_head, n_embd=args.n_embd)

    def make():
        torch.manual_seed(0)
        model = GPT(config).to(args.device)
        opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0)
        if world > 1:
            model = torch.nn.parallel.DistributedDataParallel(model)
        return model, opt

    def sync():
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()

    def block(model, opt, guard, gen, n):
        sync()
        t0 = time.perf_counter()
        for _ in range(n):
            x, y = corpus.get_batch("train", args.batch_size, args.block_size, gen)
            x, y = x.to(args.device, non_blocking=True), y.to(args.device, non_blocking=True)
            with torch.autocast(device_type=args.device.split(":")[0], dtype=torch.bfloat16, enabled=args.bf16):
                _, loss = model(x, y)
            loss.backward()
            if guard is None:
                opt.step()
            else:
                guard.step(loss)
            opt.zero_grad(set_to_none=True)
        sync()
        return n / (time.perf_counter() - t0)

    results = []
    for policy in args.policy or ["default"]:
        plain_model, plain_opt = make()
        gov_model, gov_opt = make()
        sig_model, sig_opt = make()
        with tempfile.TemporaryDirectory() as tmp:
            guard = Guard(gov_opt, policy, model=gov_model, log_dir=Path(tmp) / "unsigned")
            signed_guard = None
            if args.sign:
                from lbw_policy.signing import generate_keypair

                key, _, _ = generate_keypair(Path(tmp) / "keys", "bench")
                signed_guard = Guard(sig_opt, policy, model=sig_model, log_dir=Path(tmp) / "signed",
                                     sign_key=key, checkpoint_every=args.checkpoint_every)
            g_plain = torch.Generator().manual_seed(1 + rank)
            g_gov = torch.Generator().manual_seed(1 + rank)
            g_sig = torch.Generator().manual_seed(1 + rank)
            block(plain_model, plain_opt, None, g_plain, args.block)  # warm-up, not counted
            block(gov_model, gov_opt, guard, g_gov, args.block)
            if signed_guard is not None:
                block(sig_model, sig_opt, signed_guard, g_sig, args.block)
            plain, governed, signed = [], [], []
            for _ in range(args.rounds):
                plain.append(block(plain_model, plain_opt, None, g_plain, args.block))
                governed.append(block(gov_model, gov_opt, guard, g_gov, args.block))
                if signed_guard is not None:
                    signed.append(block(sig_model, sig_opt, signed_guard, g_sig, args.block))
            k = None
            if guard.reducer is not None:
                names, slots = guard.reducer.layout(0)
                k = 1 + 2 * len(names) + len(slots)
            guard.close()
            sign_row = {}
            if signed_guard is not None:
                signed_guard.close()
                sign_row = _sign_figures(signed, governed, plain, signed_guard, key, Path(tmp))
        ratios = [g / p for g, p in zip(governed, plain)]
        ci = _median_ci(ratios)
        row = {"policy": policy, "device": args.device, "bf16": args.bf16,
               "params": sum(p.numel() for p in plain_model.parameters()),
               "plain_steps_per_s": statistics.median(plain), "governed_steps_per_s": statistics.median(governed),
               "median_ratio": statistics.median(ratios), "median_ratio_ci95": ci,
               "ratios": [round(r, 4) for r in ratios],
               "rounds": args.rounds, "block": args.block, "threads": torch.get_num_threads(),
               "nproc": world, "collective_floats": k,
               "torch": torch.__version__,
               "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **sign_row}
        results.append(row)
        if rank:
            continue
        print(f"{policy:<16} plain {row['plain_steps_per_s']:.2f} steps/s, governed "
              f"{row['governed_steps_per_s']:.2f} steps/s, median ratio {row['median_ratio']:.3f} "
              f"(95 % CI {ci[0]:.3f} to {ci[1]:.3f}; rounds: {', '.join(f'{r:.3f}' for r in ratios)})")
        if sign_row:
            sci = sign_row["sign_ratio_ci95"]
            print(f"{'':<16} signed {sign_row['signed_steps_per_s']:.2f} steps/s, signed/unsigned "
                  f"median ratio {sign_row['sign_ratio']:.3f} (95 % CI {sci[0]:.3f} to {sci[1]:.3f}); "
                  f"{sign_row['checkpoints']} checkpoints in the run; one checkpoint "
                  f"{sign_row['checkpoint_seconds'] * 1e6:.0f} us = "
                  f"{100 * sign_row['checkpoint_fraction_of_step']:.3f} % of a plain step")
    if rank:
        return 0
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "a", encoding="utf-8") as fh:
        for row in results:
            fh.write(json.dumps(row) + "\n")
    return 0


def _sign_figures(signed: list, governed: list, plain: list, signed_guard, key, tmp: Path) -> dict:
    """The signed loop's figures: signed/unsigned ratio per round, and the cost of one
    checkpoint (median of 200 on a scratch signed log) as a fraction of a plain step."""
    from lbw_policy.decision_log import DecisionLog, read_log

    ratios = [s / g for s, g in zip(signed, governed)]
    log = DecisionLog(tmp / "scratch" / "decisions.jsonl", run={"run_id": "bench"}, signer=key,
                      checkpoint_every=10**9)
    log.append({"step": 0, "event": "run_start"})
    times = []
    for _ in range(200):
        t0 = time.perf_counter()
        log.checkpoint()
        times.append(time.perf_counter() - t0)
    log.close()
    checkpoint_s = statistics.median(times)
    records = read_log(signed_guard.log.path).records
    return {"signed_steps_per_s": statistics.median(signed), "sign_ratio": statistics.median(ratios),
            "sign_ratio_ci95": _median_ci(ratios), "sign_ratios": [round(r, 4) for r in ratios],
            "checkpoint_every": signed_guard.log.checkpoint_every,
            "checkpoints": sum(r.get("event") == "checkpoint" for r in records),
            "checkpoint_seconds": checkpoint_s,
            "checkpoint_fraction_of_step": checkpoint_s * statistics.median(plain)}


def _median_ci(ratios: list) -> list:
    """95 % percentile-bootstrap interval of the median of ``ratios`` (fixed seed: the same
    rounds give the same interval)."""
    import numpy as np
    from scipy.stats import bootstrap

    if len(ratios) < 2:
        return [ratios[0], ratios[0]] if ratios else [float("nan"), float("nan")]
    res = bootstrap((np.asarray(ratios),), np.median, confidence_level=0.95, n_resamples=2000,
                    method="percentile", random_state=0)
    return [round(float(res.confidence_interval.low), 4), round(float(res.confidence_interval.high), 4)]


if __name__ == "__main__":
    sys.exit(main())
