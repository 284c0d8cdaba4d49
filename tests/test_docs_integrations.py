"""Every ``python`` block of docs/integrations.md runs as written (tiny model, a few steps), with
the names the page lists (model, batches, loader, log_dir, hf_model, hf_dataset, output_dir)."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest
import torch

from integration_helpers import batches, corpus, demo_gpt
from lbw_policy.decision_log import verify_log

DOC = Path(__file__).resolve().parents[1] / "docs" / "integrations.md"


def _blocks() -> list:
    text = DOC.read_text(encoding="utf-8")
    out = []
    for m in re.finditer(r"^```python\n(.*?)^```", text, flags=re.S | re.M):
        heading = re.findall(r"^## (.+)$", text[:m.start()], flags=re.M)[-1]
        out.append(pytest.param(m.group(1), id=re.sub(r"\W+", "-", heading.lower()).strip("-")))
    return out


BLOCKS = _blocks()


def test_the_page_has_a_recipe_per_stack():
    ids = {p.id for p in BLOCKS}
    assert {"plain-loop", "mixed-precision-gradscaler-fp16-bf16", "gradient-accumulation",
            "hugging-face-trainer", "accelerate", "lightning"} <= ids


@pytest.mark.parametrize("code", BLOCKS)
def test_recipe_runs(code, tmp_path):
    for lib in ("transformers", "accelerate", "lightning"):
        if re.search(rf"^\s*(from|import) {lib}\b", code, flags=re.M) and importlib.util.find_spec(lib) is None:
            pytest.skip(f"{lib} not installed")
    c = corpus()
    data = batches(c, 8, batch=4)
    xs, ys = zip(*data)
    ns = {"model": demo_gpt(c.vocab_size), "batches": data, "log_dir": str(tmp_path / "run"),
          "loader": torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.cat(xs), torch.cat(ys)),
                                                batch_size=4),
          "output_dir": str(tmp_path / "out")}
    if "hf_model" in code:
        import transformers

        torch.manual_seed(0)
        ns["hf_model"] = transformers.GPT2LMHeadModel(transformers.GPT2Config(
            vocab_size=c.vocab_size, n_positions=32, n_embd=64, n_layer=2, n_head=2))
        ns["hf_dataset"] = [{"input_ids": x, "labels": x} for xb, _ in data for x in xb]
    exec(compile(code, str(DOC), "exec"), ns)  # noqa: S102 - the page's own recipe
    log = tmp_path / "run" / "decisions.jsonl"
    assert log.exists() and verify_log(log).ok
    assert (tmp_path / "run" / "summary.json").exists()  # the recipe closed the guard
