"""Stress benchmark: lbw-policy against AdamW and its peers, side by side in one run (issue 6).

Work: the demo pre-LN GPT (character level, d=128, 2 layers, 4 heads, context 64, batch 32,
300 steps; 15 warm-up steps then cosine to 10%; AdamW betas (0.9, 0.95), eps 1e-8, no weight
decay) on a text file (90/10 split, fixed validation batches), CPU by default.

Methods (same model init, data order and seeds):

    adamw        plain AdamW
    clip         AdamW + torch.nn.utils.clip_grad_norm_(1.0)
    zclip        AdamW + ZClip (PyPI `zclip`, its defaults)
    spam         SPAM (PyPI `pytorch-optimizer`, its defaults but our betas/eps/weight decay)
    stablespam   StableSPAM (same)
    lbwguard     AdamW + LBW-Guard's Eval controller (arXiv 2605.19008), implemented here from
                 its documentation (:class:`LBWGuardEval`), independently of the engine
    lbw          AdamW governed by policies/default.yaml
    lbw-guard-eval  AdamW governed by policies/lbw-guard-eval.yaml (the same controller as a
                 policy; tests/test_lbw_guard_eval.py checks it follows LBWGuardEval)
    lbw-audit    AdamW under policies/audit-only.yaml (must equal plain AdamW: a correctness check)

Grid: learning rates x seeds. Faults at the best AdamW learning rate of the grid, from step 100:
``lr30`` (learning rate x30 for 30 steps), ``noise`` (10 batches of uniformly random tokens),
``grad1e3`` (all gradients x1e3 for one step).

Metrics per run: final validation loss (nats), diverged (a non-finite loss), spike count (steps
after warm-up whose loss exceeds the EMA of the earlier losses, decay 0.9, by more than 0.5
nats), step of the first governance action that changed training, steps per second. Per method:
LR sensitivity as defined by Wortsman et al. (arXiv 2309.14322): the mean over the grid of
min(loss, ln V) minus the best loss of any method at any learning rate in the same run (losses
are means over seeds).

Usage::

    python benchmarks/stress.py --data ../shared/data/tinyshakespeare.txt --out benchmarks/results/shakespeare
    python benchmarks/stress.py --report benchmarks/results/shakespeare   # tables + PNGs from results.jsonl

Raw results go to ``<out>/results.jsonl`` (one JSON object per run); runs already there are not
repeated, so an interrupted benchmark resumes.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("adamw", "clip", "zclip", "spam", "stablespam", "lbwguard", "lbw", "lbw-guard-eval",
           "lbw-audit")
#: the policy each governed method runs (``lbw`` runs ``RunSpec.policy``)
GOVERNED = {"lbw": None, "lbw-guard-eval": "lbw-guard-eval", "lbw-audit": None}
FAULTS = ("lr30", "noise", "grad1e3")
FAULT_START = 100


@dataclass(frozen=True)
class RunSpec:
    method: str
    lr: float
    seed: int
    fault: str = "none"
    data: str = ""
    steps: int = 300
    batch_size: int = 32
    block_size: int = 64
    n_layer: int = 2
    n_head: int = 4
    n_embd: int = 128
    warmup_steps: int = 15
    min_lr_ratio: float = 0.1
    eval_batches: int = 20
    device: str = "cpu"
    policy: str = "default"
    audit_policy: str = "audit-only"

    @property
    def key(self) -> str:
        return f"{self.method}|{self.lr:g}|{self.seed}|{self.fault}"


def _lr_factor(spec: RunSpec, step: int) -> float:
    if step < spec.warmup_steps:
        f = (step + 1) / spec.warmup_steps
    else:
        span = max(1, spec.steps - 1 - spec.warmup_steps)
        p = min(1.0, (step - spec.warmup_steps) / span)
        f = spec.min_lr_ratio + 0.5 * (1 - spec.min_lr_ratio) * (1 + math.cos(math.pi * p))
    if spec.fault == "lr30" and FAULT_START <= step < FAULT_START + 30:
        f *= 30.0
    return f


class LBWGuardEval:
    """LBW-Guard's Eval controller, from its documentation (arXiv 2605.19008; PyPI ``lbw-guard``
    1.1.3, ``lbw/governor.py``), written without the engine: the reference the policy
    ``policies/lbw-guard-eval.yaml`` is checked against.

    Every ``stats_freq`` steps, the first step included: ``x`` = the maximum over parameter
    tensors of ``mean(g ** 2)``; ``ema`` = ``x`` at the first collection, then
    ``decay * ema + (1 - decay) * x``; ``ratio = x / (ema + eps)``; ``flip`` = the sign of
    ``sum(all g) / numel`` differs from the previous collection's. Then ``ratio > 1.5``: scale
    ``max(lo, 0.7 * scale)``; else ``ratio > 1.1`` or ``flip``: ``max(lo, 0.85 * scale)``; else
    ``min(1, scale + 0.01)``. The scale multiplies the scheduled learning rate until the next
    collection. A non-finite ``x`` does not enter the EMA (the documentation does not say; the
    policy's detector does the same).
    """

    def __init__(self, stats_freq: int = 10, decay: float = 0.85, eps: float = 1e-12,
                 lo: float = 0.1) -> None:
        self.stats_freq, self.decay, self.eps, self.lo = stats_freq, decay, eps, lo
        self.scale = 1.0
        self.ema: Optional[float] = None
        self.sign: Optional[int] = None
        self.steps = 0

    def update(self, params) -> float:
        """Call after ``backward()``, before the optimizer step; returns this step's scale."""
        if self.steps % self.stats_freq == 0:
            grads = [p.grad for p in params if p.grad is not None]
            if grads:
                x = max(float(g.float().pow(2).mean()) for g in grads)
                mean = sum(float(g.float().sum()) for g in grads) / sum(g.numel() for g in grads)
                sign = (mean > 0) - (mean < 0)
                if math.isfinite(x):
                    self.ema = x if self.ema is None else self.decay * self.ema + (1 - self.decay) * x
                elif self.ema is None:
                    self.ema = 0.0
                ratio = x / (self.ema + self.eps)
                flip = self.sign is not None and sign != self.sign
                self.sign = sign
                if ratio > 1.5:
                    self.scale = max(self.lo, 0.7 * self.scale)
                elif ratio > 1.1 or flip:
                    self.scale = max(self.lo, 0.85 * self.scale)
                else:
                    self.scale = min(1.0, self.scale + 0.01)
        self.steps += 1
        return self.scale


def run_one(spec: RunSpec, out_dir: str, threads: int = 1) -> dict:
    """Train one (method, lr, seed, fault) and return its metrics."""
    import torch

    torch.set_num_threads(threads)
    if spec.device == "cpu":
        torch.set_flush_denormal(True)
    from lbw_policy.demo.data import CharCorpus, load_text
    from lbw_policy.demo.gpt import GPT, GPTConfig, evaluate

    corpus = CharCorpus(load_text(spec.data))
    torch.manual_seed(spec.seed)
    model = GPT(GPTConfig(vocab_size=corpus.vocab_size, block_size=spec.block_size, n_layer=spec.n_layer,
                          n_head=spec.n_head, n_embd=spec.n_embd)).to(spec.device)
    params = list(model.parameters())
    common = dict(lr=spec.lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0)
    guard = zclip = lbwguard = None
    if spec.method == "spam":
        from pytorch_optimizer import SPAM

        optimizer = SPAM(params, **common)
    elif spec.method == "stablespam":
        from pytorch_optimizer import StableSPAM

        optimizer = StableSPAM(params, **common)
    else:
        optimizer = torch.optim.AdamW(params, **common)
    if spec.method == "zclip":
        from zclip import ZClip

        zclip = ZClip()
    if spec.method == "lbwguard":
        lbwguard = LBWGuardEval()
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _lr_factor(spec, s))
    run_dir = Path(out_dir) / "runs" / spec.key.replace("|", "_")
    if spec.method in GOVERNED:
        from lbw_policy import Guard

        if run_dir.exists():  # a re-run starts a fresh log
            for f in run_dir.iterdir():
                f.unlink()
        policy = {"lbw": spec.policy, "lbw-audit": spec.audit_policy}.get(spec.method) \
            or GOVERNED[spec.method]
        guard = Guard(optimizer, policy, model=model, log_dir=run_dir, run_id=spec.key.replace("|", "_"))

    gen = torch.Generator().manual_seed(spec.seed)
    fault_gen = torch.Generator().manual_seed(10_000 + spec.seed)
    val = corpus.fixed_batches("val", spec.eval_batches, spec.batch_size, spec.block_size, seed=1234)
    losses: list[float] = []
    lrs: list[float] = []
    first_action: Optional[int] = None
    diverged = False
    t0 = time.perf_counter()
    for step in range(spec.steps):
        x, y = corpus.get_batch("train", spec.batch_size, spec.block_size, gen)
        if spec.fault == "noise" and FAULT_START <= step < FAULT_START + 10:
            x = torch.randint(corpus.vocab_size, x.shape, generator=fault_gen)
            y = torch.randint(corpus.vocab_size, y.shape, generator=fault_gen)
        x, y = x.to(spec.device), y.to(spec.device)
        _, loss = model(x, y)
        loss.backward()
        if spec.fault == "grad1e3" and step == FAULT_START:
            for p in params:
                if p.grad is not None:
                    p.grad.mul_(1e3)
        if guard is not None:
            result = guard.step(loss)
            loss_value, lr_value = result.loss, result.lr
            if first_action is None and any(
                    r.get("enforced") and r["event"] in ("fired", "action")
                    and any(a.get("before") != a.get("after") for a in r.get("actions", []))
                    for r in result.decisions):
                first_action = step
        else:
            if spec.method == "clip":
                torch.nn.utils.clip_grad_norm_(params, 1.0)
            elif zclip is not None:
                zclip.step(model)
            scheduled = [g["lr"] for g in optimizer.param_groups]
            if lbwguard is not None:  # the scale multiplies the scheduled rate for this step
                scale = lbwguard.update(params)
                for g in optimizer.param_groups:
                    g["lr"] *= scale
            lr_value = optimizer.param_groups[0]["lr"]
            optimizer.step()
            for g, lr in zip(optimizer.param_groups, scheduled):
                g["lr"] = lr  # the scheduler's value back: the scale never compounds
            loss_value = loss.item()  # host sync; the governed path gets the loss from its one transfer
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        losses.append(loss_value)
        lrs.append(float(lr_value))
        if not math.isfinite(loss_value):
            diverged = True
    elapsed = time.perf_counter() - t0
    if guard is not None:
        guard.close()
    val_loss = evaluate(model, [(a.to(spec.device), b.to(spec.device)) for a, b in val])
    diverged = diverged or not math.isfinite(val_loss)
    return {**asdict(spec), "key": spec.key, "vocab_size": corpus.vocab_size,
            "final_val_loss": val_loss if math.isfinite(val_loss) else None,
            "final_train_loss": losses[-1] if math.isfinite(losses[-1]) else None,
            "diverged": diverged, "spikes": count_spikes(losses, start=spec.warmup_steps),
            "first_action_step": first_action, "steps_per_second": spec.steps / elapsed,
            "losses": [round(v, 5) if math.isfinite(v) else None for v in losses],
            "lrs": [float(f"{v:.6g}") for v in lrs],
            "run_dir": str(run_dir) if guard is not None else None}


def count_spikes(losses: list, start: int = 15, alpha: float = 0.9, threshold: float = 0.5) -> int:
    """Steps ``t >= start`` whose loss exceeds the EMA (decay ``alpha``) of the earlier finite
    losses by more than ``threshold`` nats; a non-finite loss counts as a spike."""
    ema = None
    spikes = 0
    for t, x in enumerate(losses):
        if x is None or not math.isfinite(x):
            spikes += t >= start
            continue
        if ema is not None and t >= start and x - ema > threshold:
            spikes += 1
        ema = x if ema is None else alpha * ema + (1 - alpha) * x
    return spikes


# ----------------------------------------------------------------------------------------- driver
def _load(path: Path) -> dict:
    done = {}
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                r = json.loads(line)
                done[r["key"]] = r
    return done


def _run_all(specs: list, out: Path, jobs: int, threads: int, results_file: Path) -> dict:
    from tqdm import tqdm

    done = _load(results_file)
    todo = [s for s in specs if s.key not in done]
    if not todo:
        return done
    with ProcessPoolExecutor(max_workers=jobs) as pool, open(results_file, "a", encoding="utf-8") as fh, \
            tqdm(total=len(todo), desc="runs", unit="run") as bar:
        futures = {pool.submit(run_one, s, str(out), threads): s for s in todo}
        for fut in as_completed(futures):
            r = fut.result()
            fh.write(json.dumps(r) + "\n")
            fh.flush()
            done[r["key"]] = r
            bar.set_postfix(last=f"{r['method']} lr={r['lr']:g} {r['fault']}: {r['final_val_loss']}")
            bar.update(1)
    return done


def best_adamw_lr(results: dict, lrs: list, seeds: list) -> float:
    def mean_loss(lr):
        vals = [results.get(f"adamw|{lr:g}|{s}|none", {}).get("final_val_loss") for s in seeds]
        vals = [v for v in vals if v is not None]
        return sum(vals) / len(vals) if len(vals) == len(seeds) else math.inf
    return min(lrs, key=mean_loss)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"),
                        help="text file (default: ../shared/data/tinyshakespeare.txt)")
    parser.add_argument("--out", default=None, help="output directory (default: benchmarks/results/<data name>)")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--lrs", default="1e-3,3e-3,1e-2,3e-2,1e-1,3e-1")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--faults", default=",".join(FAULTS), help="faults to run at the best AdamW LR ('' for none)")
    parser.add_argument("--fault-lr", type=float, default=None, help="LR for the faults (default: best AdamW LR of the grid)")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--block-size", type=int, default=64)
    parser.add_argument("--n-layer", type=int, default=2)
    parser.add_argument("--n-head", type=int, default=4)
    parser.add_argument("--n-embd", type=int, default=128)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--policy", default="default", help="policy of the lbw method (default: default)")
    parser.add_argument("--jobs", type=int, default=2, help="parallel runs (default 2)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run (default 1)")
    parser.add_argument("--report", metavar="DIR", default=None, help="only write tables and plots from DIR/results.jsonl")
    args = parser.parse_args(argv)

    sys.path.insert(0, str(Path(__file__).parent))
    from report import write_report  # benchmarks/report.py

    if args.report:
        print(write_report(Path(args.report)))
        return 0
    data = str(Path(args.data).resolve())
    corpus_name = Path(data).parent.name if Path(data).name in ("valid.txt", "test.txt") else Path(data).stem
    out = Path(args.out) if args.out else ROOT / "benchmarks" / "results" / corpus_name
    out.mkdir(parents=True, exist_ok=True)
    methods = [m for m in args.methods.split(",") if m]
    unknown = set(methods) - set(METHODS)
    if unknown:
        parser.error(f"unknown methods {sorted(unknown)}; choose from {list(METHODS)}")
    lrs = [float(v) for v in args.lrs.split(",")]
    seeds = [int(v) for v in args.seeds.split(",")]
    shape = dict(data=data, steps=args.steps, batch_size=args.batch_size, block_size=args.block_size,
                 n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd, device=args.device,
                 policy=args.policy)
    (out / "config.json").write_text(json.dumps({**shape, "methods": methods, "lrs": lrs, "seeds": seeds,
                                                 "faults": args.faults}, indent=2) + "\n")
    results_file = out / "results.jsonl"
    grid = [RunSpec(method=m, lr=lr, seed=s, **shape) for lr in lrs for s in seeds for m in methods]
    results = _run_all(grid, out, args.jobs, args.threads, results_file)
    faults = [f for f in args.faults.split(",") if f]
    if faults:
        fault_lr = args.fault_lr if args.fault_lr is not None else best_adamw_lr(results, lrs, seeds)
        specs = [RunSpec(method=m, lr=fault_lr, seed=s, fault=f, **shape)
                 for f in faults for s in seeds for m in methods]
        specs += [RunSpec(method=m, lr=fault_lr, seed=s, **shape) for s in seeds for m in methods]
        _run_all(specs, out, args.jobs, args.threads, results_file)
    print(write_report(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
