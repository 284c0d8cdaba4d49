"""Tests for the demo workload: lbw_policy.demo.data and lbw_policy.demo.gpt."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from lbw_policy.demo.data import MIN_CHARS, CharCorpus, load_text, stdlib_corpus
from lbw_policy.demo.gpt import GPT, GPTConfig, evaluate

SHAKESPEARE = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"


@pytest.fixture(scope="module")
def shakespeare() -> CharCorpus:
    if not SHAKESPEARE.is_file():
        pytest.skip(f"{SHAKESPEARE} not present")
    return CharCorpus(load_text(SHAKESPEARE))


@pytest.fixture
def small_corpus() -> CharCorpus:
    return CharCorpus("abcdefghij" * 100)  # 1000 tokens: train 900, val 100


# ---- data ---------------------------------------------------------------------------------------


def test_stdlib_corpus_nonempty_deterministic_python_source():
    a = stdlib_corpus(max_bytes=200_000)
    b = stdlib_corpus(max_bytes=200_000)
    assert a == b
    assert len(a) == 200_000
    assert "def " in a and "import " in a
    # A shorter corpus is a prefix of a longer one: same file order.
    assert stdlib_corpus(max_bytes=50_000) == a[:50_000]


def test_stdlib_corpus_rejects_nonpositive_size():
    with pytest.raises(ValueError, match="max_bytes must be positive"):
        stdlib_corpus(max_bytes=0)


def test_load_text_none_is_stdlib():
    assert load_text(None, max_bytes=100_000) == stdlib_corpus(max_bytes=100_000)


def test_load_text_missing_file_names_path(tmp_path):
    missing = tmp_path / "nope.txt"
    with pytest.raises(FileNotFoundError, match="text file not found: .*nope.txt"):
        load_text(missing)


def test_load_text_too_short(tmp_path):
    f = tmp_path / "short.txt"
    f.write_text("hello world\n", encoding="utf-8")
    with pytest.raises(ValueError, match="too short to train on: 12 characters"):
        load_text(f)
    with pytest.raises(ValueError, match=f"too short to train on: {MIN_CHARS - 1} characters"):
        load_text(None, max_bytes=MIN_CHARS - 1)


def test_load_text_invalid_utf8_is_replaced(tmp_path):
    f = tmp_path / "bad.txt"
    f.write_bytes(b"ab\xffcd" * 2000)
    text = load_text(f)
    assert "\ufffd" in text and len(text) == 5 * 2000


def test_load_text_max_bytes(shakespeare):
    text = load_text(SHAKESPEARE, max_bytes=10_000)
    assert len(text) == 10_000
    assert text.startswith("First Citizen:")


def test_shakespeare_vocab_and_split(shakespeare):
    c = shakespeare
    assert c.vocab_size == 65 == len(c.chars)
    assert c.chars == sorted(c.chars)
    assert c.data.dtype == torch.long
    n = len(c.data)
    assert len(c.val) == int(n * 0.1)
    assert len(c.train) + len(c.val) == n
    assert torch.equal(torch.cat([c.train, c.val]), c.data)


def test_encode_decode_round_trip(shakespeare):
    s = "To be, or not to be: that is the question.\n"
    ids = shakespeare.encode(s)
    assert ids.dtype == torch.long and ids.shape == (len(s),)
    assert shakespeare.decode(ids) == s
    assert shakespeare.decode(ids.tolist()) == s
    assert shakespeare.decode(shakespeare.train[:500]) == load_text(SHAKESPEARE)[:500]


def test_encode_decode_errors(small_corpus):
    with pytest.raises(ValueError, match="character 'z' is not in the vocabulary"):
        small_corpus.encode("abz")
    with pytest.raises(ValueError, match=r"token id 10 is outside \[0, 10\)"):
        small_corpus.decode([0, 10])


def test_corpus_constructor_errors():
    with pytest.raises(ValueError, match="text is empty"):
        CharCorpus("")
    with pytest.raises(ValueError, match=r"val_fraction must be in \(0, 1\), got 1.5"):
        CharCorpus("abc", val_fraction=1.5)


def test_get_batch_shapes_and_targets(shakespeare):
    B, T = 8, 32
    g = torch.Generator().manual_seed(123)
    x, y = shakespeare.get_batch("train", B, T, g)
    assert x.shape == (B, T) and y.shape == (B, T)
    assert x.dtype == torch.long and y.dtype == torch.long
    assert torch.equal(x[:, 1:], y[:, :-1])
    # Recover the offsets from the same generator state and check against the corpus tensor.
    ix = torch.randint(len(shakespeare.train) - T, (B,), generator=torch.Generator().manual_seed(123))
    for b, i in enumerate(ix.tolist()):
        assert torch.equal(x[b], shakespeare.train[i : i + T])
        assert torch.equal(y[b], shakespeare.train[i + 1 : i + T + 1])


def test_get_batch_reproducible_by_seed(shakespeare):
    def draw(seed):
        g = torch.Generator().manual_seed(seed)
        return [shakespeare.get_batch("val", 4, 16, g) for _ in range(3)]

    a, b, c = draw(7), draw(7), draw(8)
    assert all(torch.equal(x1, x2) and torch.equal(y1, y2) for (x1, y1), (x2, y2) in zip(a, b))
    assert not all(torch.equal(x1, x2) for (x1, _), (x2, _) in zip(a, c))
    # Successive draws from one generator differ.
    assert not torch.equal(a[0][0], a[1][0])


def test_get_batch_window_stays_in_split(small_corpus):
    # val has 100 tokens; T = 99 leaves exactly one possible offset (0).
    x, y = small_corpus.get_batch("val", 3, 99, torch.Generator().manual_seed(0))
    for b in range(3):
        assert torch.equal(x[b], small_corpus.val[:99])
        assert torch.equal(y[b], small_corpus.val[1:])


def test_fixed_batches_deterministic(shakespeare):
    a = shakespeare.fixed_batches("val", 4, 8, 32, seed=0)
    b = shakespeare.fixed_batches("val", 4, 8, 32, seed=0)
    c = shakespeare.fixed_batches("val", 4, 8, 32, seed=1)
    assert len(a) == 4
    assert all(torch.equal(x1, x2) and torch.equal(y1, y2) for (x1, y1), (x2, y2) in zip(a, b))
    assert not torch.equal(a[0][0], c[0][0])
    assert all(x.shape == (8, 32) for x, _ in a)


def test_batch_errors(small_corpus):
    g = torch.Generator().manual_seed(0)
    with pytest.raises(ValueError, match="unknown split 'test'; expected 'train' or 'val'"):
        small_corpus.get_batch("test", 2, 8, g)
    with pytest.raises(
        ValueError, match="val split has 100 tokens, too few for block_size 100 .need at least 101"
    ):
        small_corpus.get_batch("val", 2, 100, g)
    with pytest.raises(ValueError, match="batch_size and block_size must be >= 1, got 0 and 8"):
        small_corpus.get_batch("train", 0, 8, g)
    with pytest.raises(ValueError, match="n_batches must be >= 1, got 0"):
        small_corpus.fixed_batches("val", 0, 2, 8, seed=0)


# ---- model --------------------------------------------------------------------------------------


def test_config_rejects_indivisible_heads():
    with pytest.raises(ValueError, match=r"n_embd \(130\) must be divisible by n_head \(4\)"):
        GPTConfig(vocab_size=65, n_embd=130, n_head=4)


def test_gpt_forward_shapes_and_init_loss():
    torch.manual_seed(0)
    V = 65
    model = GPT(GPTConfig(vocab_size=V, block_size=32, n_layer=2, n_head=4, n_embd=64))
    idx = torch.randint(V, (3, 20))
    logits, loss = model(idx)
    assert logits.shape == (3, 20, V) and loss is None
    logits, loss = model(idx, torch.randint(V, (3, 20)))
    assert loss.dim() == 0
    assert abs(loss.item() - math.log(V)) < 0.3


def test_gpt_structure_for_detectors():
    model = GPT(GPTConfig(vocab_size=10, n_layer=3, n_embd=32, n_head=2))
    names = dict(model.named_modules())
    for i in range(3):
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            assert isinstance(names[f"blocks.{i}.attn.{proj}"], torch.nn.Linear)
    assert model.lm_head.weight is model.wte.weight
    # Tied matrix counted once.
    assert model.num_params() == sum(p.numel() for p in set(model.parameters()))
    assert model.num_params(non_embedding=True) == model.num_params() - 64 * 32
    # Residual projections scaled by 1/sqrt(2 * n_layer).
    std = torch.cat([names[f"blocks.{i}.attn.out_proj"].weight.flatten() for i in range(3)]).std()
    assert abs(std.item() - 0.02 / math.sqrt(6)) < 0.001


def test_gpt_is_causal():
    torch.manual_seed(0)
    V, T, t = 20, 16, 6
    model = GPT(GPTConfig(vocab_size=V, block_size=T, n_embd=32, n_head=4)).eval()
    idx = torch.randint(V, (2, T))
    idx2 = idx.clone()
    idx2[:, t + 1 :] = (idx[:, t + 1 :] + 1) % V  # change every token after position t
    with torch.no_grad():
        a, _ = model(idx)
        b, _ = model(idx2)
    torch.testing.assert_close(a[:, : t + 1], b[:, : t + 1])
    assert not torch.allclose(a[:, t + 1 :], b[:, t + 1 :])


def test_gpt_input_errors():
    model = GPT(GPTConfig(vocab_size=10, block_size=8, n_embd=16, n_head=2))
    with pytest.raises(ValueError, match="sequence length 9 exceeds block_size 8"):
        model(torch.zeros(1, 9, dtype=torch.long))
    with pytest.raises(ValueError, match=r"idx must be \(B, T\), got shape \(8,\)"):
        model(torch.zeros(8, dtype=torch.long))
    with pytest.raises(ValueError, match=r"targets shape \(1, 7\) does not match idx shape \(1, 8\)"):
        model(torch.zeros(1, 8, dtype=torch.long), torch.zeros(1, 7, dtype=torch.long))


def test_evaluate_restores_mode_and_matches_manual(small_corpus):
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=small_corpus.vocab_size, block_size=8, n_embd=16, n_head=2))
    batches = small_corpus.fixed_batches("val", 3, 2, 8, seed=0)
    model.train()
    got = evaluate(model, batches)
    assert model.training
    with torch.no_grad():
        want = sum(model(x, y)[1].item() for x, y in batches) / 3
    assert got == pytest.approx(want, rel=1e-6)
    model.eval()
    evaluate(model, batches)
    assert not model.training
    with pytest.raises(ValueError, match="batches is empty"):
        evaluate(model, [])


def test_short_training_lowers_loss(shakespeare):
    torch.set_flush_denormal(True)
    torch.manual_seed(0)
    B, T, steps = 16, 64, 60
    model = GPT(GPTConfig(vocab_size=shakespeare.vocab_size, block_size=T))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    val = shakespeare.fixed_batches("val", 4, B, T, seed=0)
    before = evaluate(model, val)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        x, y = shakespeare.get_batch("train", B, T, g)
        _, loss = model(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    after = evaluate(model, val)
    assert abs(before - math.log(65)) < 0.3
    # From ~4.17 nats (uniform over 65) to below ~3.3: the model has at least learned unigram
    # statistics (character entropy of the text is ~3.3 nats).
    assert after < before - 0.8, (before, after)
