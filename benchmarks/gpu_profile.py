"""Where a governed step's time goes on a GPU: ``torch.profiler`` over N steps of the
GPT-2-small-shaped demo GPT (as ``benchmarks/gpu_check.py`` builds it), plain and governed by each
policy, top operators by self CPU time and by self CUDA time, and the host wall time per step.

    python benchmarks/gpu_profile.py --out OUT [--policy default --policy early-warning] [--steps 20]

``--tiny`` runs a small model on the CPU (a smoke test). Writes ``OUT/profile.txt``.
"""

from __future__ import annotations

import argparse
import importlib.util
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def main(argv=None) -> int:
    import torch
    from torch.profiler import ProfilerActivity, profile

    gc = _gpu_check()
    gc._ensure_importable()  # lbw_policy from an uninstalled checkout (the GPU machine)
    from lbw_policy import Guard
    from lbw_policy.demo.gpt import GPTConfig

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--policy", action="append", default=None)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--tiny", action="store_true")
    args = p.parse_args(argv)
    cuda = torch.cuda.is_available() and not args.tiny
    dev = torch.device("cuda" if cuda else "cpu")
    cfg = (GPTConfig(vocab_size=256, block_size=1024, n_layer=12, n_head=12, n_embd=768) if cuda
           else GPTConfig(vocab_size=64, block_size=32, n_layer=2, n_head=2, n_embd=64))
    batch = 8 if cuda else 4
    tokens = torch.randint(0, cfg.vocab_size, (200_000,), device=dev)
    batches = gc.DeviceBatches(tokens, batch, cfg.block_size, seed=0)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    lines = []
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    for arm in ["plain"] + (args.policy or ["default", "early-warning"]):
        model, opt = gc.make_model(cfg, dev, 6e-4)
        guard = None if arm == "plain" else Guard(opt, str(gc._policy(arm)), model=model,
                                                  log_dir=Path(tempfile.mkdtemp()) / arm)
        for _ in range(110):  # warm-up past every detector's warm-up and cadence (lcm 100)
            gc.train_step(model, opt, guard, batches, cuda)
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with profile(activities=acts) as prof:
            for _ in range(args.steps):
                gc.train_step(model, opt, guard, batches, cuda)
            if cuda:
                torch.cuda.synchronize()
        wall = (time.perf_counter() - t0) / args.steps * 1e3
        lines.append(f"===== {arm}: {wall:.2f} ms a step (wall, under the profiler)")
        lines.append(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
        if cuda:
            lines.append(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=15))
        if guard is not None:
            guard.close()
        print(lines[-2 if cuda else -1][:4000], flush=True)
    (out / "profile.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"wrote {out / 'profile.txt'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
