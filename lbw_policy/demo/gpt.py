"""A small pre-LN GPT for the demo workload (after nanoGPT's ``model.py``, Karpathy).

Token + learned position embeddings, ``n_layer`` blocks of
``x = x + attn(ln1(x)); x = x + mlp(ln2(x))``, a final LayerNorm and an output head tied to the
token embedding. Attention keeps separate ``q_proj`` / ``k_proj`` / ``v_proj`` / ``out_proj``
layers so that detectors can find the query and key projections by module name
(``blocks.0.attn.q_proj``, pattern ``*.attn.q_proj``).

Shapes: B batch, T sequence length (<= block_size), C = n_embd, nh = n_head, hs = C // nh,
V = vocab_size. Losses are mean cross-entropy in nats per token.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["GPTConfig", "CausalSelfAttention", "MLP", "Block", "GPT", "evaluate"]


@dataclass
class GPTConfig:
    """Model size and regularisation. Defaults give ~0.4 M parameters at a 65-character vocab."""

    vocab_size: int  # number of distinct tokens (characters); from CharCorpus.vocab_size
    block_size: int = 64  # longest sequence the model accepts (size of the position table), tokens
    n_layer: int = 2  # number of transformer blocks
    n_head: int = 4  # attention heads per block; must divide n_embd
    n_embd: int = 128  # residual stream width C (head size hs = n_embd // n_head)
    dropout: float = 0.0  # dropout probability on attention weights and residual branches (train only)
    bias: bool = True  # bias terms in Linear and LayerNorm layers (nanoGPT: False is a little faster)

    def __post_init__(self) -> None:
        if self.vocab_size < 1 or self.block_size < 1 or self.n_layer < 1 or self.n_head < 1:
            raise ValueError(
                "vocab_size, block_size, n_layer and n_head must be >= 1, got "
                f"{self.vocab_size}, {self.block_size}, {self.n_layer}, {self.n_head}"
            )
        if self.n_embd % self.n_head != 0:
            raise ValueError(
                f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head}); "
                f"e.g. n_embd={self.n_head * max(1, round(self.n_embd / self.n_head))}"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with separate q / k / v / out projections.

    Input and output ``(B, T, C)``. Uses ``F.scaled_dot_product_attention(is_causal=True)``,
    so position ``t`` attends only to positions ``<= t``.
    """

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        if config.n_embd % config.n_head != 0:
            raise ValueError(
                f"n_embd ({config.n_embd}) must be divisible by n_head ({config.n_head})"
            )
        C = config.n_embd
        self.n_head = config.n_head
        self.q_proj = nn.Linear(C, C, bias=config.bias)
        self.k_proj = nn.Linear(C, C, bias=config.bias)
        self.v_proj = nn.Linear(C, C, bias=config.bias)
        self.out_proj = nn.Linear(C, C, bias=config.bias)  # residual projection
        self.dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        nh, hs = self.n_head, C // self.n_head
        q = self.q_proj(x).view(B, T, nh, hs).transpose(1, 2)  # (B, nh, T, hs)
        k = self.k_proj(x).view(B, T, nh, hs).transpose(1, 2)  # (B, nh, T, hs)
        v = self.v_proj(x).view(B, T, nh, hs).transpose(1, 2)  # (B, nh, T, hs)
        y = F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True
        )  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C): heads side by side
        return self.resid_dropout(self.out_proj(y))


class MLP(nn.Module):
    """Position-wise feed-forward: ``C -> 4C -> GELU -> C``, input and output ``(B, T, C)``."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU()
        self.proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)  # residual projection
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.proj(self.gelu(self.fc(x))))  # (B, T, 4C) inside, (B, T, C) out


class Block(nn.Module):
    """One pre-LN transformer block: ``x + attn(ln1(x))`` then ``x + mlp(ln2(x))``."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))  # (B, T, C)
        x = x + self.mlp(self.ln2(x))  # (B, T, C)
        return x


class GPT(nn.Module):
    """A character-level pre-LN GPT.

    Module names: ``wte`` / ``wpe`` (token / position embeddings), ``blocks.{i}.ln1``,
    ``blocks.{i}.attn.{q,k,v,out}_proj``, ``blocks.{i}.ln2``, ``blocks.{i}.mlp.{fc,proj}``,
    ``ln_f``, ``lm_head`` (its weight *is* ``wte.weight``).

    Initialisation as nanoGPT: Linear and Embedding weights ~ N(0, 0.02), biases 0; the residual
    projections (``attn.out_proj``, ``mlp.proj``) ~ N(0, 0.02 / sqrt(2 * n_layer)), so the
    residual stream's variance does not grow with depth (GPT-2 paper). At init the loss is close
    to ``ln(vocab_size)`` nats.

    :param config: a :class:`GPTConfig`.
    """

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.block_size, config.n_embd)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList([Block(config) for _ in range(config.n_layer)])
        self.ln_f = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # weight tying: one (V, C) matrix

        self.apply(self._init_weights)
        resid_std = 0.02 / math.sqrt(2 * config.n_layer)
        for name, p in self.named_parameters():
            if name.endswith("attn.out_proj.weight") or name.endswith("mlp.proj.weight"):
                nn.init.normal_(p, mean=0.0, std=resid_std)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self, non_embedding: bool = False) -> int:
        """Number of parameters (the tied ``wte`` / ``lm_head`` matrix counted once).

        :param non_embedding: leave out the position table ``wpe`` (nanoGPT's convention; the
            token table stays in because it is also the output head).
        """
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.wpe.weight.numel()
        return n

    def forward(
        self, idx: torch.Tensor, targets: Optional[torch.Tensor] = None
    ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Next-token logits, and the loss when ``targets`` are given.

        :param idx: token ids, ``(B, T)`` ``torch.long``, ``T <= block_size``.
        :param targets: next-token ids, ``(B, T)`` ``torch.long``, or ``None``.
        :returns: ``(logits, loss)``: logits ``(B, T, V)``; loss a 0-dim tensor, mean
            cross-entropy over all ``B * T`` positions in nats, or ``None`` without targets.
        :raises ValueError: if ``idx`` is not 2-D, ``T > block_size``, or ``targets`` has a
            different shape from ``idx``.
        """
        if idx.dim() != 2:
            raise ValueError(f"idx must be (B, T), got shape {tuple(idx.shape)}")
        B, T = idx.shape
        if T > self.config.block_size:
            raise ValueError(
                f"sequence length {T} exceeds block_size {self.config.block_size}; "
                "crop the input or build the model with a larger block_size"
            )
        if targets is not None and targets.shape != idx.shape:
            raise ValueError(
                f"targets shape {tuple(targets.shape)} does not match idx shape {tuple(idx.shape)}"
            )
        pos = torch.arange(T, device=idx.device)  # (T,)
        x = self.drop(self.wte(idx) + self.wpe(pos))  # (B, T, C)
        for block in self.blocks:
            x = block(x)  # (B, T, C)
        x = self.ln_f(x)  # (B, T, C)
        logits = self.lm_head(x)  # (B, T, V)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(B * T, -1), targets.reshape(B * T))
        return logits, loss


@torch.no_grad()
def evaluate(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> float:
    """Mean loss of ``model`` over ``batches`` (e.g. from :meth:`CharCorpus.fixed_batches`).

    The model is put in eval mode (no dropout) for the evaluation and returned to its previous
    mode afterwards. Batches are moved to the model's device. Each batch counts equally.

    :param model: a module called as ``model(x, y) -> (logits, loss)``, such as :class:`GPT`.
    :param batches: ``(x, y)`` pairs, each ``(B, T)`` ``torch.long``.
    :returns: mean cross-entropy in nats per token, a Python float.
    :raises ValueError: if ``batches`` is empty.
    """
    was_training = model.training
    device = next(model.parameters()).device
    model.eval()
    try:
        total = torch.zeros((), device=device)
        n = 0
        for x, y in batches:
            _, loss = model(x.to(device), y.to(device))
            total += loss  # stays on the device: no host sync per batch
            n += 1
    finally:
        model.train(was_training)
    if n == 0:
        raise ValueError("batches is empty: nothing to evaluate")
    return total.item() / n  # host-device sync: once, here
