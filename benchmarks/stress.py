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
``grad1e3`` (all gradients x1e3 for one step). Slow-onset faults (``lr-ramp``, ``attn-lowp``,
``wd-grow``, ``eps-grow``, ``combo``; issue 16) grow geometrically from ``--fault-start`` at
``--onset-rate`` a step: see "Slow-onset faults" below (:func:`fault_severity`), the one place
that defines them.

Metrics per run: final validation loss (nats), diverged (a non-finite loss), spike count (steps
after warm-up whose loss exceeds the EMA of the earlier losses, decay 0.9, by more than 0.5
nats), step of the first governance action that changed training, steps per second, and the
step a ``halt`` rule stopped the run at (``halted_step``; the run's losses stop there and its
final validation loss is the model's at the halt; ``None`` otherwise). With ``repair_at_halt``
the run does not end at its first halt: the attention fault is removed (the kernel fixed) and
training resumes from the halt checkpoint (``halted_step`` is still that halt's step); a second
halt ends it (``halted_again_step``; ``None`` otherwise). Per method:
LR sensitivity as defined by Wortsman et al. (arXiv 2309.14322): the mean over the grid of
min(loss, ln V) minus the method's own best loss on the grid (losses are means over seeds).

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
SLOW_FAULTS = ("lr-ramp", "attn-lowp", "wd-grow", "eps-grow", "combo")
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
    fault_start: int = FAULT_START    # first step of a slow-onset fault
    onset_rate: float = 1.03          # its growth factor per step
    fault_bits: int = 3               # attn-lowp: mantissa bits kept in the attention logits
    max_severity: float = 1e6         # cap of the growth factor
    # the generalization matrix (issue 15, benchmarks/matrix.py); see "Models, initializations
    # and tokenizations" below
    model: str = "demo"               # "demo" (lbw_policy.demo.gpt) or "gpt2" (HF GPT2LMHeadModel)
    init: str = "default"             # "default" (the model's own) or "fan-in"
    tokenizer: str = "char"           # "char", "byte" or "bpe"
    bpe_vocab: int = 512              # vocabulary size of the BPE trained on the train split
    weight_decay: float = 0.0         # AdamW's decoupled weight decay
    # issue 16, enforce mode: at a halt, repair the attention fault and resume from the halt
    # checkpoint (what an operator does after attention-kernel-error: fix the kernel, resume);
    # a learning-rate or weight-decay fault goes on
    repair_at_halt: bool = False

    @property
    def key(self) -> str:
        fault = self.fault
        if fault in SLOW_FAULTS:
            fault += f"@{self.fault_start}x{self.onset_rate:g}"
            if fault.startswith(("attn-lowp", "combo")):
                fault += f"b{self.fault_bits}"
        return f"{self.method}|{self.lr:g}|{self.seed}|{fault}"


# ---------------------------------------------------------------------- slow-onset faults (issue 16)
#
# Every slow-onset fault is defined here and nowhere else. From step ``fault_start`` (t0) on, the
# fault's severity grows geometrically at ``onset_rate`` (r) a step, capped at ``max_severity``:
#
#     s(t) = 1                                     for t < t0
#     s(t) = min(r ** (t - t0 + 1), max_severity)  for t >= t0
#
# and each fault scales one thing by s(t) (a fault the run does not have leaves it alone):
#
#     lr-ramp     learning rate         lr(t) = schedule(t) * s(t)           (LambdaLR factor)
#     attn-lowp   attention logits      z = round_b(s(t) * q.k / sqrt(hs))   (every SDPA call)
#     wd-grow     AdamW weight decay    wd(t) = WD_FAULT * s(t)              (0 before t0)
#     eps-grow    Adam epsilon          eps(t) = eps * s(t)                  (a stall, not a blow-up)
#     combo       lr-ramp and attn-lowp together, the same s(t)
#
# attn-lowp is low-precision attention with a drifting softmax scale: every
# torch.nn.functional.scaled_dot_product_attention call of the forward (intercepted by a
# TorchFunctionMode, so it works on any model that uses SDPA) computes its logits explicitly,
# multiplies them by s(t) (a softmax temperature error growing from 1) and rounds them to
# ``fault_bits`` explicit mantissa bits (bfloat16 keeps 7), round to nearest, as low-precision
# attention kernels do (arXiv 2606.28116 injects such faults); the backward passes the rounding
# straight through (the gradient of the unrounded logits). Masks: ``is_causal`` and ``attn_mask``
# (bool: True = attend; float: added), as SDPA defines them; no dropout (the demo uses none).

#: Base weight decay of ``wd-grow`` (the benchmark's AdamW has none): wd(t) = WD_FAULT * s(t).
WD_FAULT = 0.1


# ------------------------------------------------- models, initializations and tokenizations (issue 15)
#
# The stress benchmark's default cell is the demo GPT on characters. The generalization matrix
# (benchmarks/matrix.py) varies, one RunSpec field each:
#
#     model      "demo": lbw_policy.demo.gpt.GPT (nanoGPT-style init, std 0.02, tied head);
#                "gpt2": transformers.GPT2LMHeadModel from a GPT2Config of the same shape (its own
#                init: std 0.02, residual projections 0.02 / sqrt(2 n_layer); fused c_attn; tied
#                head; dropout 0), the loss computed here on the unshifted targets
#     init       "default": the model's own; "fan-in": every weight matrix and embedding table
#                re-drawn from a normal of std 1 / sqrt(fan_in) truncated at +-2 std (fan_in =
#                n_embd for embeddings; the truncated draw's std is 0.88 / sqrt(fan_in)), biases 0,
#                LayerNorm untouched
#     tokenizer  "char": one id per distinct character; "byte": the UTF-8 bytes (V = 256);
#                "bpe": a byte-level BPE (PyPI ``tokenizers``) of ``bpe_vocab`` ids trained on the
#                first 90 % of the text's characters; the whole text is then encoded and split
#                90/10 by tokens, as the other corpora (the validation tokens lie in the text the
#                BPE did not see, a little under the last 10 % of it)
#     weight_decay  AdamW's (applied to every parameter, as the peers do)

#: models the harness builds (RunSpec.model)
MODELS = ("demo", "gpt2")
INITS = ("default", "fan-in")
TOKENIZERS = ("char", "byte", "bpe")


def _bpe_ids(text: str, train_chars: int, vocab: int) -> tuple:
    from tokenizers import ByteLevelBPETokenizer

    tok = ByteLevelBPETokenizer()
    tok.train_from_iterator([text[:train_chars]], vocab_size=vocab, min_frequency=2, show_progress=False)
    return tok.encode(text).ids, tok.get_vocab_size()


_CORPORA: dict = {}


def build_corpus(spec: RunSpec):
    """The corpus of ``spec``: a :class:`lbw_policy.demo.data.CharCorpus` (``tokenizer="char"``)
    or the same class over byte or BPE ids (90/10 split in order; the BPE is trained on the first
    90 % of the text only). Cached per process."""
    import torch

    from lbw_policy.demo.data import CharCorpus, load_text

    key = (spec.data, spec.tokenizer, spec.bpe_vocab)
    if key in _CORPORA:
        return _CORPORA[key]
    text = load_text(spec.data)
    if spec.tokenizer == "char":
        corpus = CharCorpus(text)
    elif spec.tokenizer in ("byte", "bpe"):
        if spec.tokenizer == "byte":
            ids, vocab = list(text.encode("utf-8")), 256
        else:
            ids, vocab = _bpe_ids(text, int(len(text) * 0.9), spec.bpe_vocab)
        corpus = CharCorpus.__new__(CharCorpus)     # the same batching code over other ids
        corpus.chars, corpus.stoi = [], {}
        corpus.vocab_size = vocab
        corpus.data = torch.tensor(ids, dtype=torch.long)
        n_val = max(1, int(len(corpus.data) * 0.1))
        corpus.train, corpus.val = corpus.data[:-n_val], corpus.data[-n_val:]
    else:
        raise ValueError(f"unknown tokenizer {spec.tokenizer!r}; choose from {TOKENIZERS}")
    _CORPORA[key] = corpus
    return corpus


def build_model(spec: RunSpec, vocab_size: int):
    """The model of ``spec`` (seeded by the caller), called as ``model(x, y) -> (logits, loss)``
    with ``x, y`` of shape ``(B, T)``; the loss is the mean cross-entropy in nats."""
    import torch
    import torch.nn.functional as F

    if spec.model == "demo":
        from lbw_policy.demo.gpt import GPT, GPTConfig

        model = GPT(GPTConfig(vocab_size=vocab_size, block_size=spec.block_size, n_layer=spec.n_layer,
                              n_head=spec.n_head, n_embd=spec.n_embd))
    elif spec.model == "gpt2":
        from transformers import GPT2Config, GPT2LMHeadModel

        class GPT2LM(torch.nn.Module):
            def __init__(self):
                super().__init__()
                cfg = GPT2Config(vocab_size=vocab_size, n_positions=spec.block_size, n_embd=spec.n_embd,
                                 n_layer=spec.n_layer, n_head=spec.n_head, resid_pdrop=0.0, embd_pdrop=0.0,
                                 attn_pdrop=0.0, bos_token_id=None, eos_token_id=None)
                self.lm = GPT2LMHeadModel(cfg)

            def forward(self, idx, targets=None):
                logits = self.lm(input_ids=idx, use_cache=False).logits
                loss = None if targets is None else F.cross_entropy(
                    logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
                return logits, loss

        model = GPT2LM()
    else:
        raise ValueError(f"unknown model {spec.model!r}; choose from {MODELS}")
    if spec.init == "fan-in":
        with torch.no_grad():
            for name, p in model.named_parameters():
                if p.dim() < 2:         # biases to 0; LayerNorm gains (1-D) untouched
                    if name.endswith("bias"):
                        p.zero_()
                    continue
                # nn.Linear / nn.Embedding store (out, in) / (V, d); HF Conv1D stores (in, out)
                conv1d = type(_owner(model, name)).__name__ == "Conv1D"
                fan_in = p.shape[1] if not conv1d else p.shape[0]
                std = 1.0 / math.sqrt(fan_in)
                torch.nn.init.trunc_normal_(p, std=std, a=-2 * std, b=2 * std)
    elif spec.init != "default":
        raise ValueError(f"unknown init {spec.init!r}; choose from {INITS}")
    return model


def _owner(model, name: str):
    mod = model
    for part in name.split(".")[:-1]:
        mod = getattr(mod, part)
    return mod


def fault_severity(spec: RunSpec, step: int) -> float:
    """``s(t)`` of a slow-onset fault (the formula above); 1.0 before ``fault_start`` and for a
    run without a slow-onset fault. Dimensionless."""
    if spec.fault not in SLOW_FAULTS or step < spec.fault_start:
        return 1.0
    exponent = step - spec.fault_start + 1
    cap = math.log(spec.max_severity) / math.log(spec.onset_rate) if spec.onset_rate > 1 else math.inf
    return spec.max_severity if exponent >= cap else spec.onset_rate ** exponent


def round_mantissa(x, bits: int):
    """``x`` rounded to nearest with ``bits`` explicit mantissa bits (``frexp``: ``x = m 2^e``,
    ``|m|`` in [0.5, 1); ``m`` rounded to a multiple of ``2^-(bits + 1)``); infinities and NaN
    kept, same dtype. ``bits = 7`` is bfloat16's rounding of a float32 (no subnormal changes)."""
    import torch

    m, e = torch.frexp(x)
    scale = float(2 ** (bits + 1))
    r = torch.ldexp(torch.round(m * scale) / scale, e)
    return torch.where(torch.isfinite(x), r, x)


def _lowp_attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False,
                    gain: float = 1.0, bits: int = 3):
    """SDPA with the ``attn-lowp`` fault: logits ``gain * scale * q k^T`` rounded to ``bits``
    mantissa bits (straight-through backward). Shapes as SDPA: ``(..., L, E)`` queries,
    ``(..., S, E)`` keys, ``(..., S, Ev)`` values -> ``(..., L, Ev)``."""
    import torch

    if enable_gqa and k.shape[-3] != q.shape[-3]:
        rep = q.shape[-3] // k.shape[-3]
        k, v = k.repeat_interleave(rep, -3), v.repeat_interleave(rep, -3)
    s = (1.0 / math.sqrt(q.shape[-1]) if scale is None else scale) * gain
    z = (q @ k.transpose(-2, -1)) * s
    z = z + (round_mantissa(z.detach(), bits) - z.detach())          # straight-through rounding
    L, S = z.shape[-2], z.shape[-1]
    if is_causal:
        keep = torch.ones(L, S, dtype=torch.bool, device=z.device).tril()
        z = z.masked_fill(~keep, -math.inf)
    if attn_mask is not None:
        z = z.masked_fill(~attn_mask, -math.inf) if attn_mask.dtype == torch.bool else z + attn_mask
    return torch.softmax(z, dim=-1) @ v


def attention_fault(spec: RunSpec, step: int, repaired: bool = False):
    """A context manager for step ``step``'s forward: the ``attn-lowp`` / ``combo`` fault from
    ``fault_start`` on (every SDPA call replaced, see above), else nothing; nothing once
    ``repaired`` (``RunSpec.repair_at_halt``)."""
    import contextlib

    import torch
    from torch.overrides import TorchFunctionMode

    if spec.fault not in ("attn-lowp", "combo") or step < spec.fault_start or repaired:
        return contextlib.nullcontext()
    sdpa = torch.nn.functional.scaled_dot_product_attention
    gain, bits = fault_severity(spec, step), spec.fault_bits

    class _LowPrecisionAttention(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func is sdpa:
                return _lowp_attention(*args, **kwargs, gain=gain, bits=bits)
            return func(*args, **kwargs)

    return _LowPrecisionAttention()


def optimizer_fault(spec: RunSpec, step: int, optimizer, eps: float) -> None:
    """Set step ``step``'s weight decay (``wd-grow``) or epsilon (``eps-grow``) on every param
    group; nothing for other faults or before ``fault_start``."""
    if step < spec.fault_start or spec.fault not in ("wd-grow", "eps-grow"):
        return
    s = fault_severity(spec, step)
    for group in optimizer.param_groups:
        if spec.fault == "wd-grow":
            group["weight_decay"] = WD_FAULT * s
        else:
            group["eps"] = eps * s


def _lr_factor(spec: RunSpec, step: int) -> float:
    if step < spec.warmup_steps:
        f = (step + 1) / spec.warmup_steps
    else:
        span = max(1, spec.steps - 1 - spec.warmup_steps)
        p = min(1.0, (step - spec.warmup_steps) / span)
        f = spec.min_lr_ratio + 0.5 * (1 - spec.min_lr_ratio) * (1 + math.cos(math.pi * p))
    if spec.fault == "lr30" and FAULT_START <= step < FAULT_START + 30:
        f *= 30.0
    if spec.fault in ("lr-ramp", "combo"):
        f *= fault_severity(spec, step)
    return f


def _resume_from_halt(guard, model, optimizer, policy, run_dir: Path, spec: RunSpec):
    """Close the halted ``guard``, load ``run_dir/halt-checkpoint.pt`` (model, optimizer, guard
    state: ``actuators/_checkpoint.py``) and return a guard resumed on the same decision log."""
    import torch

    guard.close()
    ckpt = torch.load(run_dir / "halt-checkpoint.pt", weights_only=True)
    model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    resumed = _guard(optimizer, policy, model, run_dir, spec, resume=True)
    resumed.load_state_dict(ckpt["guard"])
    return resumed


def _guard(optimizer, policy, model, run_dir: Path, spec: RunSpec, resume: bool = False):
    """The run's guard on ``run_dir`` (``resume``: continue its decision log)."""
    from lbw_policy import Guard

    return Guard(optimizer, policy, model=model, log_dir=run_dir, run_id=spec.key.replace("|", "_"),
                 resume=resume)


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
    from lbw_policy.demo.gpt import evaluate

    corpus = build_corpus(spec)
    torch.manual_seed(spec.seed)
    model = build_model(spec, corpus.vocab_size).to(spec.device)
    params = list(model.parameters())
    common = dict(lr=spec.lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=spec.weight_decay)
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
        from lbw_policy import TrainingHalted

        if run_dir.exists():  # a re-run starts a fresh log
            for f in run_dir.iterdir():
                f.unlink()
        policy = {"lbw": spec.policy, "lbw-audit": spec.audit_policy}.get(spec.method) \
            or GOVERNED[spec.method]
        guard = _guard(optimizer, policy, model, run_dir, spec)

    gen = torch.Generator().manual_seed(spec.seed)
    fault_gen = torch.Generator().manual_seed(10_000 + spec.seed)
    val = corpus.fixed_batches("val", spec.eval_batches, spec.batch_size, spec.block_size, seed=1234)
    losses: list[float] = []
    lrs: list[float] = []
    first_action: Optional[int] = None
    diverged = False
    halted: Optional[int] = None
    halted_again: Optional[int] = None   # repair_at_halt: a halt after the repair ends the run
    repaired = False
    t0 = time.perf_counter()
    for step in range(spec.steps):
        x, y = corpus.get_batch("train", spec.batch_size, spec.block_size, gen)
        if spec.fault == "noise" and FAULT_START <= step < FAULT_START + 10:
            x = torch.randint(corpus.vocab_size, x.shape, generator=fault_gen)
            y = torch.randint(corpus.vocab_size, y.shape, generator=fault_gen)
        x, y = x.to(spec.device), y.to(spec.device)
        optimizer_fault(spec, step, optimizer, common["eps"])
        stop = False
        while True:   # once; again after a repaired halt (repair_at_halt), on the same batch
            with attention_fault(spec, step, repaired):
                _, loss = model(x, y)
            loss.backward()
            if spec.fault == "grad1e3" and step == FAULT_START:
                for p in params:
                    if p.grad is not None:
                        p.grad.mul_(1e3)
            if guard is None:
                break
            try:
                result = guard.step(loss)
            except TrainingHalted:   # a halt rule (enforce mode): the run ends here, un-stepped
                if first_action is None:
                    first_action = step
                if repaired:         # halted again after the repair: the run ends here
                    halted_again = step
                elif spec.repair_at_halt:
                    # the operator's response: fix the kernel, resume from the halt checkpoint,
                    # redo the halted step with the repaired kernel
                    halted, repaired = step, True
                    guard = _resume_from_halt(guard, model, optimizer, policy, run_dir, spec)
                    optimizer.zero_grad(set_to_none=True)
                    continue
                else:
                    halted = step
                stop = True
            break
        if stop:
            break
        if guard is not None:
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
    ran = len(losses)   # steps completed (a halted step is not)
    val_loss = evaluate(model, [(a.to(spec.device), b.to(spec.device)) for a, b in val])
    diverged = diverged or not math.isfinite(val_loss)
    return {**asdict(spec), "key": spec.key, "vocab_size": corpus.vocab_size,
            "final_val_loss": val_loss if math.isfinite(val_loss) else None,
            "final_train_loss": losses[-1] if losses and math.isfinite(losses[-1]) else None,
            "diverged": diverged, "spikes": count_spikes(losses, start=spec.warmup_steps),
            "first_action_step": first_action, "halted_step": halted,
            "halted_again_step": halted_again,
            "steps_per_second": ran / elapsed if ran else None,
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
    parser.add_argument("--fault-start", type=int, default=FAULT_START, help="first step of a slow-onset fault (default 100)")
    parser.add_argument("--onset-rate", type=float, default=1.03, help="slow-onset growth factor per step (default 1.03)")
    parser.add_argument("--fault-bits", type=int, default=3, help="attn-lowp: mantissa bits kept (default 3)")
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
    bad = set(faults) - set(FAULTS) - set(SLOW_FAULTS)
    if bad:
        parser.error(f"unknown faults {sorted(bad)}; choose from {list(FAULTS + SLOW_FAULTS)}")
    if args.onset_rate <= 1.0 or args.fault_bits < 1:
        parser.error("--onset-rate must be > 1 and --fault-bits >= 1")
    shape.update(fault_start=args.fault_start, onset_rate=args.onset_rate, fault_bits=args.fault_bits)
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
