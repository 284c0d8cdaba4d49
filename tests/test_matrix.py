"""The generalization matrix of issue 15: the harness's other models, initializations and
tokenizations (benchmarks/stress.py), the goal checks and an end-to-end smoke run
(benchmarks/matrix.py)."""

from __future__ import annotations

import importlib
import json
import math
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"
sys.path.insert(0, str(ROOT / "benchmarks"))
st = importlib.import_module("stress")
mx = importlib.import_module("matrix")

needs_data = pytest.mark.skipif(not DATA.exists(), reason="needs ../shared/data/tinyshakespeare.txt")


def _spec(**kw):
    return st.RunSpec(method="adamw", lr=1e-3, seed=0, **{"data": str(DATA), "n_embd": 64, "n_head": 2,
                                                           "n_layer": 2, "block_size": 32, **kw})


@needs_data
def test_byte_and_bpe_corpora_split_in_order_with_their_vocabularies():
    text = DATA.read_text(encoding="utf-8")
    byte = st.build_corpus(_spec(tokenizer="byte"))
    assert byte.vocab_size == 256 and bytes(byte.data.tolist()) == text.encode("utf-8")
    assert len(byte.val) == int(len(byte.data) * 0.1) and torch.equal(torch.cat([byte.train, byte.val]), byte.data)
    bpe = st.build_corpus(_spec(tokenizer="bpe", bpe_vocab=300))
    assert bpe.vocab_size == 300 and int(bpe.data.max()) < 300
    assert len(bpe.data) < 0.8 * len(text)              # merges shorten the text
    x, y = bpe.get_batch("train", 4, 16, torch.Generator().manual_seed(0))
    assert x.shape == (4, 16) and torch.equal(x[:, 1:], y[:, :-1])
    with pytest.raises(ValueError, match="unknown tokenizer"):
        st.build_corpus(_spec(tokenizer="sentencepiece"))


def test_gpt2_model_starts_near_uniform_and_fan_in_init_sets_the_weight_scale():
    torch.manual_seed(0)
    model = st.build_model(_spec(model="gpt2"), vocab_size=97)
    x, y = torch.randint(97, (2, 32)), torch.randint(97, (2, 32))
    logits, loss = model(x, y)
    assert logits.shape == (2, 32, 97) and abs(loss.item() - math.log(97)) < 0.2
    torch.manual_seed(0)
    fan = st.build_model(_spec(model="gpt2", init="fan-in"), vocab_size=97)
    c_attn = fan.lm.transformer.h[0].attn.c_attn.weight        # HF Conv1D: (in, out)
    mlp_proj = fan.lm.transformer.h[0].mlp.c_proj.weight       # (4 d, d): fan-in 4 d
    trunc = 0.8796                                              # std of N(0, 1) truncated at +-2
    assert c_attn.std().item() == pytest.approx(trunc / math.sqrt(64), rel=0.05)
    assert mlp_proj.std().item() == pytest.approx(trunc / math.sqrt(256), rel=0.05)
    assert fan.lm.transformer.h[0].ln_1.weight.eq(1).all()     # LayerNorm untouched
    torch.manual_seed(0)
    demo = st.build_model(_spec(init="fan-in"), vocab_size=97)
    assert demo.wte.weight.std().item() == pytest.approx(trunc / math.sqrt(64), rel=0.05)
    assert demo.blocks[0].mlp.proj.weight.std().item() == pytest.approx(trunc / math.sqrt(256), rel=0.05)
    with pytest.raises(ValueError, match="unknown model"):
        st.build_model(_spec(model="llama"), vocab_size=97)


def _row(method, lr, loss, fault="none", seed=0):
    return {"method": method, "lr": lr, "seed": seed, "fault": fault, "final_val_loss": loss,
            "vocab_size": 65, "key": f"{method}|{lr:g}|{seed}|{fault}"}


def test_cell_goals_compare_with_the_best_peer_at_every_learning_rate():
    lrs = (1e-3, 1e-2, 1e-1)
    rows = [_row("adamw", lr, v) for lr, v in zip(lrs, (2.3, 2.5, 3.5))]
    rows += [_row("clip", lr, v) for lr, v in zip(lrs, (2.2, 2.4, 3.4))]
    rows += [_row("lbw", lr, v) for lr, v in zip(lrs, (2.21, 2.3, 2.4))]
    rows += [_row("lbw", 1e-3, 2.25, "noise"), _row("adamw", 1e-3, 2.6, "noise")]
    g = mx.cell_goals(rows)
    assert g["gaps"] == pytest.approx({1e-3: 0.01, 1e-2: -0.1, 1e-1: -1.0})
    # sensitivity: mean loss minus the method's own best: lbw 2.3033 - 2.21, adamw 2.7667 - 2.3
    assert g["sensitivity_ratio"] == pytest.approx((2.30333 - 2.21) / (2.76667 - 2.3), rel=1e-3)
    assert g["faults"]["noise"]["delta"] == pytest.approx(0.04)
    assert g["met"] == {"sensitivity": True, "every_lr": True, "faults": True}
    rows[-5] = _row("lbw", 1e-3, 2.23)                          # now 0.03 above clip at 1e-3
    rows[-2] = _row("lbw", 1e-3, 2.29, "noise")                 # and 0.06 above its clean run
    g = mx.cell_goals(rows)
    assert g["met"] == {"sensitivity": True, "every_lr": False, "faults": False}


@needs_data
def test_tiny_matrix_runs_every_cell_kind_and_writes_the_summary(tmp_path, monkeypatch):
    """A smoke run of two cells (12 steps: the faults start at step 100, so the fault rows are
    clean runs here; what is checked is the plumbing, the summary and the directory guard)."""
    cells = [mx.Cell(c.name, {**c.shape, "data": str(DATA)}, c.held_out) for c in mx.CELLS]   # no download
    monkeypatch.setattr(mx, "CELLS", tuple(cells))
    rc = mx.main(["--tiny", "--out", str(tmp_path), "--cells", "gpt2-bpe,gpt2-fanin-byte-wd-b16",
                  "--faults", "noise", "--jobs", "1"])
    assert rc == 0
    summary = json.loads((tmp_path / "matrix.json").read_text())
    assert set(summary) == {"gpt2-bpe", "gpt2-fanin-byte-wd-b16"}
    assert summary["gpt2-fanin-byte-wd-b16"]["held_out"] is True
    for v in summary.values():
        assert len(v["gaps"]) == 2 and "noise" in v["faults"]
    rows = [json.loads(line) for line in (tmp_path / "gpt2-bpe" / "results.jsonl").read_text().splitlines()]
    assert {(r["model"], r["tokenizer"]) for r in rows} == {("gpt2", "bpe")}
    assert {r["method"] for r in rows} == {"adamw", "clip", "lbw"}
    md = (tmp_path / "matrix.md").read_text()
    assert "Held-out cells" in md and (tmp_path / "gap.png").stat().st_size > 1000
    # a later run with another shape into the same directory is refused, not mixed in
    saved = tmp_path / "gpt2-bpe" / "config.json"
    config = json.loads(saved.read_text())
    config["shape"]["n_embd"] = 999
    saved.write_text(json.dumps(config))
    with pytest.raises(SystemExit):
        mx.main(["--tiny", "--out", str(tmp_path), "--cells", "gpt2-bpe", "--faults", "", "--jobs", "1"])


def test_the_report_lists_halted_runs(tmp_path, capsys):
    """A run that a halt rule stopped (``halted_step``, recorded by the stress harness) is named
    under the tables; a missing report directory is a clear error."""
    cell = mx.CELLS[0]
    rows = [_row(m, lr, v) for m in ("adamw", "clip", "lbw") for lr, v in ((1e-3, 2.3), (1e-2, 2.5))]
    for r in rows:
        r["halted_step"] = None
    rows[-1]["halted_step"] = 42
    (tmp_path / cell.name).mkdir()
    (tmp_path / cell.name / "results.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    md = mx.write_matrix_report(tmp_path, cells=[cell])
    assert f"`{cell.name}` lbw|0.01|0|none at step 42" in md
    rows[-1]["halted_step"] = None
    (tmp_path / cell.name / "results.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert "Halted runs" not in mx.write_matrix_report(tmp_path, cells=[cell])
    with pytest.raises(SystemExit):
        mx.main(["--report", str(tmp_path / "missing")])
    assert "no such directory" in capsys.readouterr().err
