"""Shared pieces of the integration tests: the demo GPT on Tiny Shakespeare, char-level, tiny."""

from __future__ import annotations

from pathlib import Path

import torch

from lbw_policy.decision_log import read_log
from lbw_policy.demo.data import CharCorpus, load_text
from lbw_policy.demo.gpt import GPT, GPTConfig

SHAKESPEARE = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"


def corpus() -> CharCorpus:
    return CharCorpus(load_text(SHAKESPEARE, max_bytes=200_000))


def demo_gpt(vocab: int, seed: int = 0, block: int = 32) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=vocab, block_size=block, n_layer=1, n_head=2, n_embd=32))


def batches(c: CharCorpus, n: int, seed: int = 0, batch: int = 8, block: int = 32) -> list:
    return c.fixed_batches("train", n, batch, block, seed)


def decisions(log_dir) -> list:
    """Records of rule decisions and actions (not meta events, not scaler skips)."""
    return [r for r in read_log(Path(log_dir) / "decisions.jsonl").records
            if r["event"] in ("fired", "action", "resolved", "recover", "halt", "error")]


def events(log_dir, event: str) -> list:
    return [r for r in read_log(Path(log_dir) / "decisions.jsonl").records if r["event"] == event]
