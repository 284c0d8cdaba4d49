"""benchmarks/early_warning.py on a hand-written run directory."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _module():
    spec = importlib.util.spec_from_file_location("early_warning", ROOT / "benchmarks" / "early_warning.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


POLICY = """
apiVersion: lbw-policy/v1
kind: Policy
metadata: {name: ew-test}
mode: audit
detectors:
  loss: {type: loss_spike}
  tr: {type: grad_norm_trend, every: 2}
actuators:
  lr_scale: {min: 0.1, max: 1.0}
rules:
  - name: trend
    when:
      all:
        - {signal: tr.slope, op: ">", value: 0.1}
        - {signal: tr.p, op: "<", value: 0.05}
    then: [{actuator: lr_scale, multiply: 0.5}]
  - name: spike
    when: {signal: loss.zscore, op: ">", value: 4}
    then: [{actuator: lr_scale, multiply: 0.5}]
"""


def test_loss_event_and_first_crossings(tmp_path):
    ew = _module()
    (tmp_path / "policy.yaml").write_text(POLICY)
    losses = [3.0, 2.5, 2.2, 2.3, 2.4, 2.45, 2.6, 2.1, "NaN", 4.0]
    # tr is due on even steps only; its p crosses at step 2, its slope at step 4, both at
    # once first at step 6
    tr = {0: (0.0, 1.0), 2: (0.05, 0.01), 4: (0.2, 0.2), 6: (0.3, 0.04), 8: ("NaN", 0.0)}
    zs = [0, 0, 0, 0, 0, 0, 1.0, 0, "NaN", 9.0]
    with open(tmp_path / "telemetry.jsonl", "w") as f:
        for step, loss in enumerate(losses):
            sig = {"loss.zscore": zs[step]}
            if step in tr:
                sig.update({"tr.slope": tr[step][0], "tr.p": tr[step][1]})
            f.write(json.dumps({"step": step, "loss": loss, "signals": sig}) + "\n")
        f.write('{"step": 10, "loss": 1.0, "sig')   # torn last line: ignored
    (tmp_path / "decisions.jsonl").write_text(
        json.dumps({"event": "fired", "rule": "trend", "step": 6}) + "\n")
    rep = ew.analyse(tmp_path, margin=0.3)
    # running minimum 2.2 at step 2; 2.6 > 2.2 + 0.3 at step 6
    assert rep["loss_event"] == 6 and rep["loss_at_event"] == 2.6
    leaves = {(x["signal"], x["op"]): x for x in rep["leaves"]}
    assert leaves[("tr.slope", ">")]["first_step"] == 4 and leaves[("tr.slope", ">")]["lead"] == 2
    assert leaves[("tr.p", "<")]["first_step"] == 2
    assert leaves[("loss.zscore", ">")]["first_step"] == 9 and leaves[("loss.zscore", ">")]["lead"] == -3
    rules = {r["rule"]: r for r in rep["rules"]}
    assert rules["trend"] == {"rule": "trend", "first_held": 6, "first_fired": 6, "lead": 0}
    assert rules["spike"]["first_fired"] is None
    md = ew.to_markdown(rep)
    assert "at step **6**" in md and "| `tr.slope` | > 0.1 | 4 | +2 |" in md
    assert ew.main([str(tmp_path), "--format", "json"]) == 0
