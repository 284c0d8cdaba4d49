"""Per-call cost of each built-in detector on the demo GPT, against a plain training step.

Usage::

    python benchmarks/detector_cost.py [--steps 30] [--warmup 5] [--device cpu] [--policy early-warning]
                                        [--format markdown|json]

The model is the demo job's default (``lbw-policy run``: 2 layers, 4 heads, width 128, context
64, batch 32, vocabulary 65, AdamW), fed random tokens. In one process, for each detector:

- ``plain step``: forward + backward + ``optimizer.step()`` + ``zero_grad``, no detector,
  timed alternately with the detector's steps so both see the same machine load;
- ``compute``: the detector's ``compute(telemetry)`` plus its ``after_step`` (ms per call),
  with its forward hooks attached; ``ratio`` = compute / plain step. Times are the best of the
  timed calls (``timeit``'s advice on a shared machine: the minimum is what the code costs, the
  rest is other load); medians are kept too;
- ``hooks``: for detectors with forward hooks, the best training-mode forward time with them
  minus the best without, alternated (the capture cost paid on every forward, due or not;
  resolution a few tenths of a ms on a shared machine); 0 for the others;
- ``per step at every: N``: (compute / N + hooks) / plain step, the amortised overhead at the
  cadence ``--policy`` gives the detector's type (1 when it has none); for ``attention_logits``,
  whose hooks capture only the forwards of due steps under a guard, (compute + hooks) / N.

Also: a whole ``Guard.step`` under ``--policy`` (default ``early-warning``) against ``optimizer.step``,
and ``spectral_entropy``'s factored route against a full ``d x d`` SVD of the same forms.
CUDA timings synchronise before reading the clock.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from typing import Callable

import torch

from lbw_policy.adapters.guard import Guard
from lbw_policy.demo.gpt import GPT, GPTConfig
from lbw_policy.plugins import get_registry
from lbw_policy.policy import load_policy, resolve_policy_path
from lbw_policy.telemetry import Telemetry

#: (label, detector type, params)
CASES = [
    ("loss_spike (ema)", "loss_spike", {}),
    ("loss_spike (mad, window 64)", "loss_spike", {"method": "mad", "window": 64, "warmup": 16}),
    ("loss_spike (cusum)", "loss_spike", {"method": "cusum"}),
    ("grad_norm", "grad_norm", {}),
    ("nonfinite", "nonfinite", {}),
    ("grad_norm_trend (window 32)", "grad_norm_trend", {"window": 32, "min_points": 16}),
    ("grad_norm_trend (window 64)", "grad_norm_trend", {"window": 64}),
    ("update_ratio", "update_ratio", {}),
    ("update_ratio (trend window 48)", "update_ratio", {"trend_window": 48, "trend_start": 15}),
    ("adam_update_stats", "adam_update_stats", {}),
    ("spectral_entropy", "spectral_entropy", {}),
    ("spectral_entropy (update: false)", "spectral_entropy", {"update": False}),
    ("attention_logits", "attention_logits", {"max_batch": 4}),
    ("attention_logits (kernel_check)", "attention_logits", {"max_batch": 4, "kernel_check": True}),
    ("logit_divergence", "logit_divergence", {}),
]
#: detectors whose forward hooks, under a guard, capture only the forwards of due steps
DUE_STEP_CAPTURE = {"attention_logits", "logit_divergence"}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable, device: torch.device) -> float:
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return (time.perf_counter() - t0) * 1e3


class Bench:
    def __init__(self, device: str, seed: int = 0) -> None:
        self.device = torch.device(device)
        torch.manual_seed(seed)
        self.model = GPT(GPTConfig(vocab_size=65, block_size=64, n_layer=2, n_head=4, n_embd=128)).to(self.device)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=3e-4, betas=(0.9, 0.95))
        self.gen = torch.Generator().manual_seed(seed)

    def batch(self):
        x = torch.randint(0, 65, (32, 64), generator=self.gen).to(self.device)
        return x, torch.roll(x, -1, dims=1)

    def fwd_bwd(self):
        x, y = self.batch()
        _, loss = self.model(x, y)
        loss.backward()
        return loss

    def plain_step(self) -> float:
        """One timed plain training step (ms)."""
        def one():
            self.fwd_bwd()
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
        return _timed(one, self.device)

    def detector(self, type_: str, params: dict, steps: int, warmup: int) -> dict:
        """Alternate a plain step and a step with the detector, so both see the same machine
        load; then, for a detector with forward hooks, alternate forward+backward with and
        without its hooks."""
        det = get_registry().detectors[type_].cls(**params)
        det.setup(self.model, self.opt)
        plain, comp = [], []
        try:
            for i in range(warmup + steps):
                tp = self.plain_step()
                loss = self.fwd_bwd()
                tel = Telemetry(i, loss, self.opt, self.model)
                tel.grad_norm  # the guard's shared reduction: not the detector's cost

                def call():
                    out = det.compute(tel)
                    for v in out.values():   # the guard's stacking of the step's signals
                        if isinstance(v, torch.Tensor):
                            v.reshape(()).to(torch.float64)
                    return out

                tc = _timed(call, self.device)
                self.opt.step()
                tc += _timed(lambda: det.after_step(tel, True), self.device)
                self.opt.zero_grad(set_to_none=True)
                if i >= warmup:
                    plain.append(tp)
                    comp.append(tc)
        finally:
            det.close()
        hooks = 0.0
        if type_ in ("attention_logits", "logit_divergence", "moe_router"):
            # training-mode forwards (where the hooks run), alternated with and without them
            x, _ = self.batch()
            with_h, without_h = [], []
            for _ in range(3 * steps):
                det.setup(self.model, self.opt)
                with_h.append(_timed(lambda: self.model(x), self.device))
                det.close()
                without_h.append(_timed(lambda: self.model(x), self.device))
            hooks = min(with_h) - min(without_h)
        return {"plain": min(plain), "plain_median": statistics.median(plain), "compute": min(comp),
                "compute_median": statistics.median(comp), "hooks": hooks}

    def guard(self, policy, steps: int, warmup: int) -> dict:
        """Alternate a plain step and a step through a Guard under ``policy``."""
        plain, governed = [], []
        with tempfile.TemporaryDirectory() as tmp:
            guard = Guard(self.opt, policy, model=self.model, log_dir=tmp)
            try:
                for i in range(warmup + steps):
                    tp = self.plain_step()

                    def one():
                        loss = self.fwd_bwd()
                        guard.step(loss)
                        self.opt.zero_grad(set_to_none=True)
                    tg = _timed(one, self.device)
                    if i >= warmup:
                        plain.append(tp)
                        governed.append(tg)
            finally:
                guard.close()
        return {"plain": min(plain), "guard": min(governed), "plain_median": statistics.median(plain),
                "guard_median": statistics.median(governed)}


def factored_vs_full(b: Bench, reps: int) -> dict:
    """Best time of the entropies of every head's QK form (base and update term) by the
    factored route ``spectral_entropy`` uses, against ``svdvals`` of the full ``d x d`` matrices."""
    from lbw_policy.detectors._attention import find_attention_sites
    from lbw_policy.detectors.spectral_entropy import factored_entropy, normalized_spectral_entropy

    sites = find_attention_sites(b.model, "*.attn.q_proj", "*.attn.k_proj")
    factors = [s.factors() for s in sites]
    prev = [(q + 0.01 * torch.randn_like(q), k + 0.01 * torch.randn_like(k)) for q, k in factors]

    def factored():
        for (q, k), (pq, pk) in zip(factors, prev):
            factored_entropy(q, k)
            factored_entropy(torch.cat([q - pq, pq], -1), torch.cat([pk, k - pk], -1))

    def full():
        for (q, k), (pq, pk) in zip(factors, prev):
            hs = q.shape[-1]
            normalized_spectral_entropy(torch.linalg.svdvals(q @ k.mT)[..., :hs])
            d = (q - pq) @ pk.mT + pq @ (k - pk).mT
            normalized_spectral_entropy(torch.linalg.svdvals(d)[..., :2 * hs])

    with torch.no_grad():
        tf = min(_timed(factored, b.device) for _ in range(reps))
        tu = min(_timed(full, b.device) for _ in range(reps))
    return {"factored_ms": tf, "full_svd_ms": tu}


def run(steps: int, warmup: int, device: str, policy_name: str = "early-warning") -> dict:
    if device == "cpu":
        torch.set_flush_denormal(True)  # as the demo job: denormals in Adam state slow CPU steps
    policy = load_policy(resolve_policy_path(policy_name))
    cadence = {spec.type: spec.every for spec in policy.detectors.values()}
    b = Bench(device)
    rows = []
    for label, type_, params in CASES:
        every = cadence.get(type_, 1)
        r = b.detector(type_, params, steps, warmup)
        hooks = max(0.0, r["hooks"])
        per_step = (r["compute"] + hooks) / every if type_ in DUE_STEP_CAPTURE else r["compute"] / every + hooks
        rows.append({"detector": label, "type": type_, "params": params, "every": every,
                     "plain_ms": r["plain"], "plain_median_ms": r["plain_median"], "compute_ms": r["compute"],
                     "compute_median_ms": r["compute_median"], "hooks_ms": r["hooks"],
                     "ratio": r["compute"] / r["plain"], "per_step_ratio": per_step / r["plain"]})
    g = b.guard(policy, steps, warmup)
    svd = factored_vs_full(b, steps)
    plains = [r["plain_ms"] for r in rows] + [g["plain"]]
    return {"device": device, "torch": torch.__version__, "threads": torch.get_num_threads(),
            "policy": policy_name,
            "steps": steps, "plain_step_ms": statistics.median(plains), "plain_step_ms_min": min(plains),
            "plain_step_ms_max": max(plains), "guard": g, "spectral": svd, "rows": rows}


def to_markdown(res: dict) -> str:
    out = [f"Demo GPT (2 x 128, 4 heads, batch 32 x 64, AdamW) on {res['device']}, torch {res['torch']}, "
           f"{res['threads']} thread{'s' if res['threads'] != 1 else ''}, {res['steps']} timed calls per case; times are the best of them "
           f"(median in brackets). Plain training step (forward, backward, AdamW step), timed "
           f"alternately with each case: **{res['plain_step_ms']:.1f} ms** (per case "
           f"{res['plain_step_ms_min']:.1f} to {res['plain_step_ms_max']:.1f}).", "",
           "| detector | compute ms / call | ratio to plain step | hooks ms / step | every | overhead per step |",
           "|---|---|---|---|---|---|"]
    for r in res["rows"]:
        out.append(f"| {r['detector']} | {r['compute_ms']:.2f} ({r['compute_median_ms']:.2f}) | {r['ratio']:.3f} | "
                   f"{r['hooks_ms']:+.2f} | {r['every']} | {100 * r['per_step_ratio']:.1f} % |")
    g = res["guard"]
    out += ["", f"Whole step under `{res['policy']}` (forward + backward + `Guard.step`): "
            f"{g['guard']:.1f} ms ({g['guard_median']:.1f}) against {g['plain']:.1f} ms "
            f"({g['plain_median']:.1f}) plain, {g['guard'] / g['plain']:.2f}x."]
    sv = res["spectral"]
    out += ["", f"Spectral entropy of every head's QK form and update term, both layers: "
            f"{sv['factored_ms']:.2f} ms by QR of the factors and SVD of the small core, "
            f"{sv['full_svd_ms']:.2f} ms by `svdvals` of the full d x d matrices "
            f"({sv['full_svd_ms'] / sv['factored_ms']:.1f}x)."]
    return "\n".join(out)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=30, help="timed calls per case (default 30)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed calls first (default 5)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--policy", default="early-warning",
                        help="policy file or built-in name: the cadence column and the whole-step line "
                             "(default early-warning)")
    parser.add_argument("--format", choices=("markdown", "json"), default="markdown")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    res = run(args.steps, args.warmup, args.device, args.policy)
    print(json.dumps(res, indent=2) if args.format == "json" else to_markdown(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
