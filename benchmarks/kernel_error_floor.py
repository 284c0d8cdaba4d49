"""The floor and the fault level of ``attention_logits``' ``kernel_error`` (issue 16): what a
correct kernel reads (float32 SDPA; bfloat16 SDPA under ``torch.autocast``) and what the stress
harness' ``attn-lowp`` fault reads (logits rounded to ``--bits`` mantissa bits, times a gain),
on the demo GPT at its initialization and with its query and key weights scaled up (sharper
attention, larger logits, as after training). The ``attention-kernel-error`` threshold of
``policies/early-warning.yaml`` (0.02) was set from this, before any study run.

Usage::

    python benchmarks/kernel_error_floor.py [--scales 1,20,100,1000] [--bits 3] [--threads 1]

Prints one markdown row per case: the query/key weight scale, the kernel, the largest logit
and ``kernel_error`` (relative, dimensionless).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
import stress  # noqa: E402  (benchmarks/stress.py: the attn-lowp fault)

from lbw_policy.demo.gpt import GPT, GPTConfig  # noqa: E402
from lbw_policy.detectors.attention_logits import AttentionLogits  # noqa: E402
from lbw_policy.telemetry import Telemetry  # noqa: E402


class _Lowp(TorchFunctionMode):
    """Every ``scaled_dot_product_attention`` call as the stress harness' ``attn-lowp`` fault."""

    def __init__(self, gain: float, bits: int):
        super().__init__()
        self.gain, self.bits = gain, bits

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.nn.functional.scaled_dot_product_attention:
            return stress._lowp_attention(*args, **kwargs, gain=self.gain, bits=self.bits)
        return func(*args, **kwargs)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scales", default="1,20,100,1000", help="factors on the query and key weights")
    parser.add_argument("--bits", type=int, default=3, help="mantissa bits of the faulty kernel")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    try:
        scales = [float(v) for v in args.scales.split(",")]
    except ValueError:
        parser.error(f"--scales {args.scales!r}: comma-separated numbers expected")
    if args.bits < 1 or any(v <= 0 for v in scales):
        parser.error("--bits must be >= 1 and every --scales value > 0")
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=65, block_size=64, n_layer=2, n_head=4, n_embd=128)).train()
    det = AttentionLogits(kernel_check=True)
    det.setup(model, None)
    idx = torch.randint(0, 65, (8, 64), generator=torch.Generator().manual_seed(1))
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    print("| q/k weight scale | kernel | max logit | kernel_error |\n|---|---|---|---|")
    for scale in scales:
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "q_proj.weight" in n or "k_proj.weight" in n:
                    p.copy_(base[n] * scale ** 0.5)
        cases = [("float32 SDPA", None), ("bfloat16 SDPA (autocast)", "bf16"),
                 (f"{args.bits}-bit logits", (1.0, args.bits)), (f"{args.bits}-bit logits x1.1", (1.1, args.bits)),
                 (f"{args.bits}-bit logits x2", (2.0, args.bits))]
        for label, case in cases:
            if case == "bf16":
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    model(idx)
            elif case is None:
                model(idx)
            else:
                with _Lowp(*case):
                    model(idx)
            out = det.compute(Telemetry(0, torch.tensor(1.0), None, None))
            print(f"| {scale:g} | {label} | {float(out['max_logit']):.3g} | {float(out['kernel_error']):.2g} |")
    det.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
