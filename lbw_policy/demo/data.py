"""Character-level text data for the demo workload.

A real text file (or, with no file, the running interpreter's own standard library) becomes a
:class:`CharCorpus`: a vocabulary of the characters it contains, one ``torch.long`` tensor of
token ids, and a train / validation split taken in order (first 90 % train, last 10 % validation),
so validation text is never seen in training.

Batches are drawn with an explicit ``torch.Generator``: the same seed gives the same batches, which
is what makes a governed run and its replay comparable.
"""

from __future__ import annotations

import os
import sysconfig
from pathlib import Path
from typing import Optional, Sequence, Union

import torch

__all__ = ["MIN_CHARS", "stdlib_corpus", "load_text", "CharCorpus"]

# Shortest text worth training on, in characters. Below this the validation split (10 %) cannot
# hold even a few blocks of the default block_size (64).
MIN_CHARS = 4096

# Directory names under the stdlib that are not "the standard library" as a reader knows it:
# installed packages, test suites, and two large legacy tools.
_SKIP_DIRS = frozenset(
    {"site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3", "__pycache__"}
)


def stdlib_corpus(max_bytes: int = 2_000_000) -> str:
    """Concatenate the running interpreter's standard-library ``*.py`` sources into one text.

    Files are taken from ``sysconfig.get_paths()["stdlib"]`` in sorted relative-path order (POSIX
    separators), skipping the directories ``site-packages``, ``dist-packages``, ``test``,
    ``tests``, ``idlelib``, ``lib2to3`` and ``__pycache__``. Each file is read as UTF-8 with
    ``errors="replace"`` and files are joined with a newline. The result is cut at ``max_bytes``
    characters, so it is deterministic for a given interpreter installation.

    :param max_bytes: the most characters to return (default 2,000,000, about 2 MB of source).
    :returns: the concatenated source text, ``len(text) <= max_bytes``.
    :raises ValueError: if ``max_bytes`` is not positive.
    :raises FileNotFoundError: if the stdlib directory holds no ``*.py`` file (e.g. a frozen or
        zip-only interpreter); pass a text file to :func:`load_text` instead.
    """
    if max_bytes <= 0:
        raise ValueError(f"max_bytes must be positive, got {max_bytes}")
    root = Path(sysconfig.get_paths()["stdlib"])
    files: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in _SKIP_DIRS]  # prune in place
        rel = Path(dirpath).relative_to(root)
        files.extend((rel / f).as_posix() for f in filenames if f.endswith(".py"))
    if not files:
        raise FileNotFoundError(
            f"no *.py files found under the standard-library directory {str(root)!r}; "
            "pass a text file path instead"
        )
    files.sort()
    parts: list[str] = []
    total = 0
    for name in files:
        text = (root / name).read_text(encoding="utf-8", errors="replace")
        parts.append(text)
        total += len(text) + 1  # +1 for the joining newline
        if total >= max_bytes:
            break
    return "\n".join(parts)[:max_bytes]


def load_text(
    path: Union[str, "os.PathLike[str]", None], max_bytes: Optional[int] = None
) -> str:
    """Read the training text: a UTF-8 file, or the standard-library corpus when ``path`` is None.

    :param path: a text file, read as UTF-8 with ``errors="replace"``; ``None`` means
        :func:`stdlib_corpus`.
    :param max_bytes: keep only the first ``max_bytes`` characters; ``None`` keeps the whole file
        (or, for the stdlib corpus, its default of 2,000,000 characters).
    :returns: the text, at least :data:`MIN_CHARS` characters long.
    :raises FileNotFoundError: if ``path`` does not exist; the message names the path.
    :raises ValueError: if the text is shorter than :data:`MIN_CHARS` characters
        (``"too short to train on: N characters"``), or ``max_bytes`` is not positive.
    """
    if max_bytes is not None and max_bytes <= 0:
        raise ValueError(f"max_bytes must be positive or None, got {max_bytes}")
    if path is None:
        text = stdlib_corpus() if max_bytes is None else stdlib_corpus(max_bytes)
        where = "the standard-library corpus"
    else:
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(
                f"text file not found: {str(p)!r} "
                "(give an existing UTF-8 text file, or no path to use the standard-library corpus)"
            )
        text = p.read_text(encoding="utf-8", errors="replace")
        if max_bytes is not None:
            text = text[:max_bytes]
        where = repr(str(p))
    if len(text) < MIN_CHARS:
        raise ValueError(
            f"{where} is too short to train on: {len(text)} characters "
            f"(need at least {MIN_CHARS})"
        )
    return text


class CharCorpus:
    """A text encoded at character level, split in order into train and validation tensors.

    The vocabulary is the sorted set of distinct characters of the *whole* text, so every
    validation character has an id. Token ids are ``torch.long``.

    Attributes:
        chars: the vocabulary, sorted; ``chars[i]`` is the character of id ``i``.
        vocab_size: ``len(chars)``.
        stoi: character -> id.
        data: the whole text encoded, shape ``(N,)``.
        train: the first ``N - n_val`` ids, shape ``(N_train,)``.
        val: the last ``n_val = int(N * val_fraction)`` ids, shape ``(N_val,)``.

    :param text: the corpus; must be non-empty.
    :param val_fraction: share of the text (taken from its end) held out for validation,
        ``0 < val_fraction < 1`` (default 0.1).
    :raises ValueError: if ``text`` is empty or ``val_fraction`` is outside ``(0, 1)``.
    """

    def __init__(self, text: str, val_fraction: float = 0.1) -> None:
        if not text:
            raise ValueError("text is empty: nothing to build a vocabulary from")
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
        self.chars: list[str] = sorted(set(text))
        self.vocab_size: int = len(self.chars)
        self.stoi: dict[str, int] = {c: i for i, c in enumerate(self.chars)}
        self.data: torch.Tensor = self.encode(text)  # (N,)
        n_val = int(len(self.data) * val_fraction)
        n_train = len(self.data) - n_val
        self.train: torch.Tensor = self.data[:n_train]  # (N_train,)
        self.val: torch.Tensor = self.data[n_train:]  # (N_val,)

    def __repr__(self) -> str:
        return (
            f"CharCorpus(vocab_size={self.vocab_size}, train={len(self.train)}, "
            f"val={len(self.val)})"
        )

    def encode(self, s: str) -> torch.Tensor:
        """Map a string to token ids, shape ``(len(s),)``, dtype ``torch.long``.

        :raises ValueError: if ``s`` holds a character outside the vocabulary.
        """
        try:
            ids = [self.stoi[c] for c in s]
        except KeyError as e:
            raise ValueError(f"character {e.args[0]!r} is not in the vocabulary") from None
        return torch.tensor(ids, dtype=torch.long)

    def decode(self, ids: Union[torch.Tensor, Sequence[int]]) -> str:
        """Map token ids (a 1-D tensor or a sequence of ints) back to a string.

        :raises ValueError: if an id is outside ``[0, vocab_size)``.
        """
        if isinstance(ids, torch.Tensor):
            ids = ids.reshape(-1).tolist()
        out = []
        for i in ids:
            if not 0 <= i < self.vocab_size:
                raise ValueError(f"token id {i} is outside [0, {self.vocab_size})")
            out.append(self.chars[i])
        return "".join(out)

    def _split(self, split: str) -> torch.Tensor:
        if split == "train":
            return self.train
        if split == "val":
            return self.val
        raise ValueError(f"unknown split {split!r}; expected 'train' or 'val'")

    def get_batch(
        self, split: str, batch_size: int, block_size: int, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Draw ``batch_size`` random windows of ``block_size`` tokens from a split.

        Offsets are drawn uniformly from ``[0, len(split) - block_size)`` with ``generator``, so the
        same generator state gives the same batch.

        :param split: ``"train"`` or ``"val"``.
        :param batch_size: B, number of windows (>= 1).
        :param block_size: T, tokens per window (>= 1).
        :param generator: a CPU ``torch.Generator`` that supplies the offsets.
        :returns: ``(x, y)``, both ``(B, T)`` ``torch.long`` on the CPU, with
            ``y[b, t] == split_data[offset_b + t + 1]`` (the next token of ``x[b, t]``).
        :raises ValueError: on an unknown split, a non-positive size, or a split shorter than
            ``block_size + 1`` tokens.
        """
        data = self._split(split)
        if batch_size < 1 or block_size < 1:
            raise ValueError(
                f"batch_size and block_size must be >= 1, got {batch_size} and {block_size}"
            )
        if len(data) < block_size + 1:
            raise ValueError(
                f"{split} split has {len(data)} tokens, too few for block_size {block_size} "
                f"(need at least {block_size + 1}); use a longer text or a smaller block_size"
            )
        ix = torch.randint(len(data) - block_size, (batch_size,), generator=generator)  # (B,)
        pos = ix[:, None] + torch.arange(block_size)  # (B, T)
        return data[pos], data[pos + 1]

    def fixed_batches(
        self, split: str, n_batches: int, batch_size: int, block_size: int, seed: int
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """A deterministic list of ``n_batches`` batches, e.g. a validation set.

        Equivalent to ``n_batches`` calls of :meth:`get_batch` with a fresh generator seeded with
        ``seed``; the same arguments always give the same batches.

        :returns: a list of ``(x, y)`` pairs, each ``(B, T)`` ``torch.long``.
        :raises ValueError: as :meth:`get_batch`, or if ``n_batches < 1``.
        """
        if n_batches < 1:
            raise ValueError(f"n_batches must be >= 1, got {n_batches}")
        g = torch.Generator().manual_seed(seed)
        return [self.get_batch(split, batch_size, block_size, g) for _ in range(n_batches)]
