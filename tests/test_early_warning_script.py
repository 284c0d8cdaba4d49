"""benchmarks/early_warning.py on a hand-written run directory."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

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


def test_held_steps_count_a_rules_for_like_the_engine(tmp_path):
    """A rule with ``for: 3`` fires on the third consecutive step its condition holds (signals
    held between emissions): the replay (``held_steps``, ``analyse``'s ``first_held``) says the
    same, not the first step the condition holds."""
    ew = _module()
    (tmp_path / "policy.yaml").write_text(POLICY.replace(
        "    when: {signal: loss.zscore, op: \">\", value: 4}\n",
        "    when: {signal: loss.zscore, op: \">\", value: 4}\n    for: 3\n"))
    zs = [0, 5, 5, 0, 5, None, None, 5, 0]           # None: not emitted this step (held)
    with open(tmp_path / "telemetry.jsonl", "w") as f:
        for step, z in enumerate(zs):
            f.write(json.dumps({"step": step, "loss": 2.0, "signals": {} if z is None else {"loss.zscore": z}}) + "\n")
    policy = ew.load_policy(tmp_path / "policy.yaml")
    assert policy.rules[-1].name == "spike" and policy.rules[-1].for_ == 3
    held = ew.held_steps(policy, ew.read_telemetry(tmp_path / "telemetry.jsonl"))
    assert held["spike"] == [6, 7]
    rules = {r["rule"]: r for r in ew.analyse(tmp_path)["rules"]}
    assert rules["spike"]["first_held"] == 6


# ------------------------------------------------------------------------ the lead-time study

SHAKESPEARE = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"

STUDY_POLICY = """
apiVersion: lbw-policy/v1
kind: Policy
metadata: {name: ew-study-test}
mode: audit
detectors:
  loss: {type: loss_spike}
  tr: {type: grad_norm_trend}
  upd: {type: update_ratio}
  nan: {type: nonfinite}
actuators:
  lr_scale: {min: 0.1, max: 1.0}
rules:
  - name: spike
    when: {signal: loss.zscore, op: ">", value: 4}
    then: [{actuator: lr_scale, multiply: 0.5}]
  - name: trend
    when: {signal: tr.slope, op: ">", value: 0.1}
    then: [{actuator: lr_scale, multiply: 0.5}]
  - name: upd-a
    when: {signal: upd.max, op: ">", value: 0.2}
    then: [{actuator: lr_scale, multiply: 0.5}]
  - name: upd-b
    when: {signal: upd.ratio, op: ">", value: 0.1}
    then: [{actuator: lr_scale, multiply: 0.5}]
  - name: nan
    when: {signal: nan.any, op: ">", value: 0}
    then: [{actuator: lr_scale, multiply: 0.5}]
"""


def _study_run(tmp_path, fired, losses):
    (tmp_path / "policy.yaml").write_text(STUDY_POLICY)
    with open(tmp_path / "telemetry.jsonl", "w") as f:
        for step, loss in enumerate(losses):
            f.write(json.dumps({"step": step, "loss": loss, "signals": {}}) + "\n")
    (tmp_path / "decisions.jsonl").write_text("".join(
        json.dumps({"event": "fired", "rule": rule, "step": step}) + "\n" for rule, step in fired))


def test_lead_row_separates_pre_fault_alarms_from_warnings_and_classifies_detectors(tmp_path):
    ew = _module()
    losses = [4.3, 3.0, 2.8, 2.7, 2.6, 2.6, 2.7, 2.95, 4.5, None]   # event at 7 (2.95 > 2.6 + 0.3)
    # upd: upd-b fires before the fault (step 2: a false alarm), upd-a at 4 and upd-b again at 5;
    # the loss-only trend fires at 6; nan at 9
    _study_run(tmp_path, [("upd-b", 2), ("upd-a", 4), ("upd-b", 5), ("trend", 6), ("nan", 9)], losses)
    result = {"key": "k", "fault": "lr-ramp", "seed": 0, "lr": 3e-3, "onset_rate": 1.05, "fault_start": 3,
              "steps": 10, "losses": [v if v is not None else None for v in losses], "vocab_size": 65,
              "final_val_loss": None, "run_dir": str(tmp_path)}
    row = ew.lead_row(result, margin=0.3)
    d = row["detectors"]
    assert {k: v["kind"] for k, v in d.items()} == {"loss": "loss-only", "tr": "loss-only", "upd": "mechanism",
                                                      "nan": "neutral"}
    assert (d["upd"]["warning"], d["upd"]["pre_fault"], d["upd"]["lead"]) == (4, 2, 3)
    assert (d["tr"]["warning"], d["tr"]["lead"]) == (6, 1)
    assert d["loss"]["warning"] is None and d["nan"]["warning"] == 9
    assert row["loss_event"] == 7 and row["first_mechanism"] == 4 and row["first_loss_only"] == 6
    assert row["mechanism_lead"] == 3 and row["mechanism_before_loss_only"] is True
    assert row["false_alarms"] == ["upd-b"]
    # 4.5 > ln 65 = 4.17 and > the loss at step 0 (4.3): divergence at 8
    assert row["divergence"] == 8
    # the same run clean: every mechanism rule that fired is a false alarm, nothing is a lead
    clean = ew.lead_row({**result, "fault": "none"}, margin=0.3)
    assert clean["false_alarms"] == ["upd-a", "upd-b"] and clean["detectors"]["upd"]["warning"] == 2
    summary = ew.summarise([row, clean])
    (cell,) = summary["cells"]
    assert cell["mean_mechanism_lead"] == 3 and cell["goal_met"] is False      # 3 < 50
    assert summary["zero_false_alarms"] is False
    # two onset rates: the plot gets its lead-against-rate panel
    other = {**row, "onset_rate": 1.02, "detectors": {**row["detectors"], "upd": {**d["upd"], "lead": 60}}}
    ew.plot_leads([row, other, clean], tmp_path / "leads.png")
    assert (tmp_path / "leads.png").stat().st_size > 10_000
    assert [c["onset_rate"] for c in ew.summarise([row, other])["cells"]] == [1.02, 1.05]
    # the goal is judged on the seeds with a loss event: a seed whose loss never left its running
    # minimum has nothing to lead; a cell without any loss event has no verdict
    far = {**row, "seed": 1, "mechanism_lead": 60, "first_mechanism": 1}
    quiet = {**row, "seed": 2, "loss_event": None, "mechanism_lead": None}
    assert ew.summarise([far, quiet])["cells"][0]["goal_met"] is True
    assert ew.summarise([far, row])["cells"][0]["goal_met"] is False          # one seed leads by 3
    assert ew.summarise([quiet])["cells"][0]["goal_met"] is None
    assert "| no loss event |" in ew.study_markdown([quiet], ew.summarise([quiet]),
                                                    {"policy": "p", "lr": 3e-3, "steps": 10, "fault_start": 3,
                                                     "margin": 0.3})


def _cell_row(seed, event, lead, *, start=100, before=True, fault="lr-ramp", rate=1.05):
    """A lead-time row as ``lead_row`` writes it, reduced to what ``summarise`` reads."""
    warned = None if lead is None else event - lead
    return {"key": f"lbw|0.003|{seed}|{fault}", "fault": fault, "seed": seed, "lr": 3e-3, "onset_rate": rate,
            "fault_start": start, "steps": 300, "loss_event": event, "divergence": None, "final_val_loss": 2.0,
            "detectors": {"upd": {"kind": "mechanism", "warning": warned, "pre_fault": None, "rules": [],
                                  "lead": lead}},
            "first_mechanism": warned, "first_loss_only": None, "mechanism_lead": lead,
            "mechanism_before_loss_only": None if lead is None else before, "false_alarms": []}


def test_the_goal_is_the_mean_lead_and_the_ceiling_says_where_no_warning_could_meet_it():
    """Issue 16 states its goals as means over seeds: leads of 60 and 45 meet it (mean 52.5),
    not the stricter every-seed reading; a seed with an event but no warning, or warned by a
    loss-only detector first, misses it whatever the others' leads; the ceiling is the mean of
    (loss event - fault start), and a cell below 50 is marked as out of any detector's reach."""
    ew = _module()
    (cell,) = ew.summarise([_cell_row(0, 190, 60), _cell_row(1, 170, 45)])["cells"]
    assert cell["mean_mechanism_lead"] == 52.5 and cell["min_mechanism_lead"] == 45
    assert cell["goal_met"] is True and cell["goal_met_every_seed"] is False
    assert cell["lead_ceiling"] == 80.0                                         # (90 + 70) / 2
    (cell,) = ew.summarise([_cell_row(0, 300, 200), _cell_row(1, 170, None)])["cells"]
    assert cell["goal_met"] is False and cell["goal_met_every_seed"] is False   # seed 1 never warned
    (cell,) = ew.summarise([_cell_row(0, 290, 150), _cell_row(1, 290, 150, before=False)])["cells"]
    assert cell["goal_met"] is False                                           # a loss-only rule first
    fast = [_cell_row(s, 140 + 5 * s, 40 + 5 * s, fault="combo") for s in range(3)]
    summary = ew.summarise(fast)
    (cell,) = summary["cells"]
    assert cell["lead_ceiling"] == 45.0 and cell["goal_met"] is False
    md = ew.study_markdown(fast, summary, {"policy": "p", "lr": 3e-3, "steps": 300, "fault_start": 100,
                                           "margin": 0.3})
    assert "| combo | 1.05 | 3 | 3 | 0 | +45.0 | 40 | 45.0 | 3/3 | missed (ceiling < 50) | missed |" in md
    both = ew.summarise([_cell_row(0, 190, 60), _cell_row(1, 170, 45)])
    md = ew.study_markdown([], both, {"policy": "p", "lr": 3e-3, "steps": 300, "fault_start": 100, "margin": 0.3})
    assert "| 80.0 | 2/2 | met | missed |" in md


def test_report_rewrites_a_studys_tables_from_its_lead_times_json(tmp_path, capsys):
    """``--report DIR``: the summary, the markdown and the plot again from the recorded rows (no
    telemetry); a directory without a report, or with another file there, is a usage error."""
    ew = _module()
    rows = [_cell_row(0, 190, 60), _cell_row(1, 170, 45), {**_cell_row(0, None, None), "fault": "none",
                                                          "onset_rate": None, "fault_start": None}]
    config = {"policy": "p", "lr": 3e-3, "steps": 300, "fault_start": 100, "margin": 0.3}
    out = tmp_path / "study"
    out.mkdir()
    (out / "lead_times.json").write_text(json.dumps({"config": config, "summary": {"stale": True}, "runs": rows}))
    assert ew.main(["--report", str(out)]) == 0
    rep = json.loads((out / "lead_times.json").read_text())
    assert rep["runs"] == rows and rep["summary"] == ew.summarise(rows)
    md = (out / "lead_times.md").read_text()
    assert "| met | missed |" in md and capsys.readouterr().out == md + "\n"
    assert (out / "lead_times.png").stat().st_size > 10_000
    for bad in (None, "{not json", json.dumps({"runs": []}), json.dumps({"config": {}, "runs": [{"fault": "x"}]})):
        d = tmp_path / f"bad{len(str(bad))}"
        d.mkdir()
        if bad is not None:
            (d / "lead_times.json").write_text(bad)
        with pytest.raises(SystemExit):
            ew.main(["--report", str(d)])
        assert "lead_times.json" in capsys.readouterr().err


def test_a_study_refuses_to_resume_a_directory_of_runs_trained_otherwise(tmp_path, capsys):
    """Runs are resumed by key (method, lr, seed, fault), which holds no policy, shape or
    repair flag: a study under another policy into a directory with runs is refused before any
    training, naming what differs; more seeds, faults or rates, another margin, or the same
    corpus at another path resume; an empty directory, or one without runs, starts fresh."""
    ew = _module()
    out = tmp_path / "study"
    out.mkdir()
    config = {"data": "/elsewhere/data/tinyshakespeare.txt", "policy": "early-warning", "lr": 3e-3, "steps": 300,
              "fault_start": 100, "faults": ["lr-ramp"], "rates": [1.05], "seeds": [0], "margin": 0.3}
    (out / "config.json").write_text(json.dumps(config))
    ew._check_resume(out, {**config, "policy": "other"})            # no results.jsonl: nothing to mix
    (out / "results.jsonl").write_text('{"key": "lbw|0.003|0|lr-ramp@100x1.05"}\n')
    ew._check_resume(out, {**config, "data": str(SHAKESPEARE), "seeds": [0, 1, 2], "faults": ["combo"],
                           "rates": [1.02], "margin": 0.5})
    with pytest.raises(ValueError, match="policy: 'early-warning' there, 'other' now"):
        ew._check_resume(out, {**config, "policy": "other"})
    with pytest.raises(ValueError, match="repair_at_halt: None there, True now"):
        ew._check_resume(out, {**config, "repair_at_halt": True})
    with pytest.raises(ValueError, match="data: 'data/tinyshakespeare.txt' there, 'wikitext-2/tinyshakespeare.txt' now"):
        ew._check_resume(out, {**config, "data": "/x/wikitext-2/tinyshakespeare.txt"})
    ew._check_resume(out, {**config, "policy_revision": "b97cde27c06b"})   # none recorded: by name
    (out / "config.json").write_text(json.dumps({**config, "policy_revision": "b97cde27c06b"}))
    with pytest.raises(ValueError, match="policy_revision: 'b97cde27c06b' there, '0123456789ab' now"):
        ew._check_resume(out, {**config, "policy_revision": "0123456789ab"})   # the file was edited
    before = (out / "results.jsonl").read_text()
    with pytest.raises(SystemExit):
        ew.main(["--study", str(out), "--tiny", "--data", str(SHAKESPEARE), "--policy", "default"])
    assert "holds runs of another study" in capsys.readouterr().err
    assert (out / "results.jsonl").read_text() == before and not (out / "runs").exists()
    with pytest.raises(SystemExit):             # a policy that does not load: refused before training
        ew.main(["--study", str(tmp_path / "z"), "--tiny", "--data", str(SHAKESPEARE), "--policy", "no-such"])
    assert "--policy no-such" in capsys.readouterr().err and not (tmp_path / "z" / "results.jsonl").exists()


def test_tiny_study_end_to_end(tmp_path):
    """``--study --tiny``: every fault and both clean runs, reports written; the loss event and
    the fault injection checked against the harness' own per-step losses and learning rates."""
    ew = _module()
    out = tmp_path / "study"
    assert ew.main(["--study", str(out), "--tiny", "--data", str(SHAKESPEARE), "--format", "json"]) == 0
    rep = json.loads((out / "lead_times.json").read_text())
    assert (out / "lead_times.png").stat().st_size > 10_000 and "| lr-ramp | 1.15 |" in (out / "lead_times.md").read_text()
    results = {r["key"]: r for r in map(json.loads, (out / "results.jsonl").read_text().splitlines())}
    rows = rep["runs"]
    assert sorted(r["fault"] for r in rows) == ["attn-lowp", "combo", "lr-ramp", "none", "none", "wd-grow"]
    for row in rows:
        losses = results[row["key"]]["losses"]
        best, event = float("inf"), None
        for step, loss in enumerate(losses):
            best = min(best, loss)
            if loss > best + 0.3 and step >= (row["fault_start"] or 0):
                event = step
                break
        assert row["loss_event"] == event
        for det in row["detectors"].values():
            if det["warning"] is not None and event is not None:
                assert det["lead"] == event - det["warning"]
    start, rate = 20, 1.15
    clean = results["lbw|0.003|0|none"]
    ramp = results[f"lbw|0.003|0|lr-ramp@{start}x{rate:g}"]
    for t, (a, b) in enumerate(zip(ramp["lrs"], clean["lrs"])):
        assert a / b == pytest.approx(rate ** (t - start + 1) if t >= start else 1.0, rel=1e-5)
    # faults leave every step before their first untouched; the attention fault changes the
    # loss of its first step, the weight-decay fault (applied by that step's update) the next
    for key, first in ((f"attn-lowp@{start}x{rate:g}b3", start), (f"wd-grow@{start}x{rate:g}", start + 1)):
        losses = results[f"lbw|0.003|0|{key}"]["losses"]
        assert losses[:first] == clean["losses"][:first] and losses[first] != clean["losses"][first]
    assert rep["summary"]["clean"][1]["lr"] == pytest.approx(9e-3)


def test_tiny_study_of_a_matrix_cell_trains_that_cells_model(tmp_path):
    """``--cell``: the study trains a generalization-matrix cell (here HF GPT-2, fan-in init,
    UTF-8 bytes, weight decay 0.1, batch 16) with --tiny's small shape; an unknown cell is a
    usage error naming the cells."""
    ew = _module()
    out = tmp_path / "cell"
    assert ew.main(["--study", str(out), "--tiny", "--cell", "gpt2-fanin-byte-wd-b16", "--faults", "lr-ramp"]) == 0
    results = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert len(results) == 3                    # lr-ramp, clean at lr and at 3x lr
    for r in results:
        assert (r["model"], r["init"], r["tokenizer"], r["weight_decay"], r["vocab_size"]) == \
            ("gpt2", "fan-in", "byte", 0.1, 256)
        assert r["batch_size"] == 8 and r["n_embd"] == 32   # --tiny's shape wins over the cell's
        assert r["data"].endswith("tinyshakespeare.txt")
    with pytest.raises(SystemExit):
        ew.main(["--study", str(tmp_path / "x"), "--tiny", "--cell", "no-such-cell"])
    with pytest.raises(SystemExit):             # a cell names its own corpus
        ew.main(["--study", str(tmp_path / "y"), "--tiny", "--cell", "gpt2-fanin-byte-wd-b16", "--data", "x.txt"])
    assert not (tmp_path / "y").exists()


def test_a_study_of_clean_runs_only_reports_false_alarms_without_a_lead_table(tmp_path):
    """``--faults ''``: only the clean runs (at lr and 3x lr, per seed), for a false-alarm check on
    fresh seeds or models; no fault table and no lead plot, and a plot left by an earlier study is removed."""
    ew = _module()
    out = tmp_path / "clean"
    out.mkdir()
    (out / "lead_times.png").write_bytes(b"stale")
    assert ew.main(["--study", str(out), "--tiny", "--data", str(SHAKESPEARE), "--faults", ""]) == 0
    rep = json.loads((out / "lead_times.json").read_text())
    assert [(r["fault"], r["seed"]) for r in rep["runs"]] == [("none", 0), ("none", 0)]
    assert rep["summary"]["cells"] == [] and len(rep["summary"]["clean"]) == 2
    md = (out / "lead_times.md").read_text()
    assert "clean runs only" in md and "| fault | onset rate |" not in md
    assert not (out / "lead_times.png").exists()


def test_events_count_from_the_fault_and_one_bad_batch_is_not_a_divergence():
    ew = _module()
    # a one-batch spike at step 3 (before the fault at step 6), then a slow rise after it
    losses = [4.0, 3.5, 3.0, 4.6, 2.9, 2.8, 2.9, 3.0, 3.2, 4.5, 4.6, 4.7, 4.8, 4.9, 5.0]
    rows = [{"step": i, "loss": v} for i, v in enumerate(losses)]
    assert ew.loss_event(rows, 0.3) == 3
    assert ew.loss_event(rows, 0.3, start=6) == 8            # 3.2 > 2.8 + 0.3
    v = 60                                                    # bound max(ln 60, 4.0) = 4.09 nats
    assert ew.divergence_step(losses, v) == 9                # 5 steps above 4.09 from step 9
    assert ew.divergence_step(losses[:13], v) is None         # only 4 such steps
    assert ew.divergence_step(losses[:5] + [None], v, start=2) == 5


def test_calibration_by_replay_silences_the_clean_runs_and_only_raises_thresholds(tmp_path):
    """benchmarks/calibrate_early_warning.py on two tiny studies (pooled): the calibrated policy
    loads, no calibrated rule holds on the clean tuning runs' recorded signals, every threshold
    moved away from the shipped one or stayed, and conjunctions (the trend rules: slope and
    p-value) and p-values are kept as shipped."""
    import sys

    ew = _module()
    out, clean_only = tmp_path / "study", tmp_path / "clean"
    assert ew.main(["--study", str(out), "--tiny", "--data", str(SHAKESPEARE), "--format", "json"]) == 0
    assert ew.main(["--study", str(clean_only), "--tiny", "--data", str(SHAKESPEARE), "--faults", ""]) == 0
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import calibrate_early_warning as cal
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    assert cal.main([str(out), str(clean_only), "--tune-seeds", "0", "--out", str(tmp_path / "cal")]) == 0
    report = json.loads((tmp_path / "cal" / "calibrated.json").read_text())
    assert report["clean_runs"] == 4                      # 2 clean runs in each study
    assert {"update-growth", "weight-norm-collapse"} <= {t["rule"] for t in report["thresholds"]}
    for t in report["thresholds"]:
        assert (t["calibrated"] >= t["shipped"]) if t["op"].startswith(">") else (t["calibrated"] <= t["shipped"])
        if t["rule"] in ("update-growth", "weight-norm-collapse", "grad-norm-growth") or t["signal"].endswith("_p"):
            assert t["calibrated"] == t["shipped"] and t["clean"] is None, t
    assert any(t["calibrated"] != t["shipped"] for t in report["thresholds"])
    kept = {t["rule"] for t in report["thresholds"] if t["clean"] is None}
    policy = ew.load_policy(tmp_path / "cal" / "early-warning-calibrated.yaml")
    for study in (out, clean_only):
        for r in map(json.loads, (study / "results.jsonl").read_text().splitlines()):
            if r["fault"] == "none":
                held = ew.held_steps(policy, ew.read_telemetry(Path(r["run_dir"]) / "telemetry.jsonl"))
                rules = {name for name in held if ew._kind(policy, ew._rule_detectors(policy)[name]) == "mechanism"}
                assert rules <= kept, (r["key"], rules - kept)
    md = (tmp_path / "cal" / "calibrated.md").read_text()
    assert f"## Tuning seeds [0]: `{out}`" in md and f"## Tuning seeds [0]: `{clean_only}`" in md
    with pytest.raises(SystemExit):                       # not a study
        cal.main([str(tmp_path / "cal")])
    with pytest.raises(SystemExit):                       # a seed no study ran
        cal.main([str(out), "--tune-seeds", "7"])
    with pytest.raises(SystemExit):                       # no seed at all
        cal.main([str(out), "--tune-seeds", ""])


def test_calibration_leaves_conjunctions_negations_and_p_values_alone():
    import sys

    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import calibrate_early_warning as cal
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    cond = {"any": [{"signal": "a.x", "op": ">", "value": 1},
                    {"all": [{"signal": "a.y", "op": ">", "value": 1}, {"signal": "a.trend_p", "op": "<", "value": 0.01}]},
                    {"not": {"signal": "a.z", "op": "<", "value": 1}}]}
    assert [leaf["signal"] for leaf in cal.calibratable_leaves(cond)] == ["a.x"]
    assert cal.is_p_value("gtrend.p") and cal.is_p_value("upd.wnorm_trend_p") and not cal.is_p_value("qk.drop")


def test_the_enforce_copy_of_the_early_warning_policy_differs_only_in_mode_and_name():
    import yaml

    shipped = yaml.safe_load((ROOT / "policies" / "early-warning.yaml").read_text())
    enforce = yaml.safe_load((ROOT / "benchmarks" / "policies" / "early-warning-enforce.yaml").read_text())
    assert (shipped["mode"], enforce["mode"]) == ("audit", "enforce")
    for doc in (shipped, enforce):
        del doc["mode"], doc["metadata"]["name"]
    assert shipped == enforce


def _study_dir(path: Path, lr: float, finals: dict) -> Path:
    """A study directory holding only what --compare reads: ``finals`` maps (fault, rate, lr) to
    one final loss per seed."""
    path.mkdir()
    (path / "config.json").write_text(json.dumps({"lr": lr}))
    rows = []
    for (fault, rate, x), losses in finals.items():
        for seed, v in enumerate(losses):
            rows.append({"fault": fault if fault == "none" else f"{fault}@100x{rate}", "onset_rate": rate,
                         "lr": x, "seed": seed, "vocab_size": 65, "final_val_loss": v})
    (path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_compare_caps_divergences_at_ln_v_and_checks_each_goal_cell(tmp_path, capsys):
    ew = _module()
    lnv = math.log(65)
    audit = _study_dir(tmp_path / "audit", 0.003, {
        ("none", None, 0.003): [2.0, 2.2], ("none", None, 0.009): [2.5, 2.5],
        ("lr-ramp", 1.03, 0.003): [3.0, float("nan")],        # mean (3 + ln V) / 2: a goal cell
        ("wd-grow", 1.03, 0.003): [2.3, 2.3]})                # +0.2: not a goal cell
    enforce = _study_dir(tmp_path / "enforce", 0.003, {
        ("none", None, 0.003): [2.2, 2.2], ("none", None, 0.009): [2.4, 2.4],
        ("lr-ramp", 1.03, 0.003): [2.25, 1e9],                # 1e9 > ln V: a divergence, capped
        ("wd-grow", 1.03, 0.003): [2.9, 2.9]})
    good = _study_dir(tmp_path / "good", 0.003, {
        ("none", None, 0.003): [2.2, 2.2], ("lr-ramp", 1.03, 0.003): [2.25, 2.29],
        ("wd-grow", 1.03, 0.003): [2.9, 2.9]})
    table = ew.compare([audit, enforce, good])
    ramp = next(line for line in table.splitlines() if line.startswith("| lr-ramp at 1.03"))
    cells = [c.strip() for c in ramp.strip("|").split("|")]
    assert cells[1] == f"{(3.0 + lnv) / 2:.3f} ({(3.0 + lnv) / 2 - 2.1:+.3f})"
    assert cells[3] == f"{(2.25 + lnv) / 2 - 2.2:+.3f}" and cells[5] == "+0.070 **met**" and cells[-1] == "yes"
    wd = next(line for line in table.splitlines() if line.startswith("| wd-grow at 1.03"))
    assert wd.rstrip().endswith("| no |") and "**met**" not in wd   # worse, but not a goal cell
    assert "enforce: within 0.1 of its own clean run in 0 of 1 goal cells" in table
    assert "good: within 0.1 of its own clean run in 1 of 1 goal cells" in table
    assert "clean at lr 0.009: audit 2.500, enforce 2.400" in table
    assert ew.main(["--compare", str(audit), str(good)]) == 0 and "| lr-ramp at 1.03" in capsys.readouterr().out
    (tmp_path / "rerun").mkdir()                             # two studies of the same name: told apart
    twin = _study_dir(tmp_path / "rerun" / "enforce", 0.003, {
        ("none", None, 0.003): [2.2, 2.2], ("lr-ramp", 1.03, 0.003): [2.25, 2.29]})
    table = ew.compare([audit, enforce, twin])
    assert f"{enforce}: within 0.1 of its own clean run in 0 of 1 goal cells" in table
    assert f"{twin}: within 0.1 of its own clean run in 1 of 1 goal cells" in table
    with pytest.raises(SystemExit):
        ew.main(["--compare", str(audit)])                     # one directory: nothing to compare
    _study_dir(tmp_path / "other", 0.01, {("none", None, 0.01): [2.0]})
    with pytest.raises(ValueError, match="different learning rates"):
        ew.compare([audit, tmp_path / "other"])
    with pytest.raises(ValueError, match="no such file"):
        ew.compare([audit, tmp_path / "missing"])
    (tmp_path / "good" / "config.json").unlink()
    with pytest.raises(ValueError, match="good/config.json: not a study's config"):
        ew.compare([audit, good])


def test_the_default_plus_trend_warnings_policy_is_the_default_plus_the_shipped_trend_conditions():
    import yaml

    load = lambda p: yaml.safe_load((ROOT / p).read_text())  # noqa: E731
    default, ew = load("policies/default.yaml"), load("policies/early-warning.yaml")
    both = load("benchmarks/policies/default-early-warning.yaml")
    assert both["mode"] == default["mode"] == "enforce" and both["actuators"] == default["actuators"]
    upd = dict(default["detectors"]["upd"], params=ew["detectors"]["upd"]["params"])
    assert both["detectors"] == dict(default["detectors"], upd=upd)
    ew_rules = {r["name"]: r for r in ew["rules"]}
    trend = ["update-growth", "weight-norm-collapse"]
    assert [r["name"] for r in both["rules"]] == [r["name"] for r in default["rules"]] + trend
    assert both["rules"][:len(default["rules"])] == default["rules"]
    for rule in both["rules"][len(default["rules"]):]:
        assert rule.pop("priority") == 35       # above update-rms-boost (30), below its brake (40)
        # the default's own braking step (x0.5 within its [0.01, 1]): x0.9 did worse there
        assert rule.pop("then") == [{"actuator": "lr_scale", "multiply": 0.5}]
        assert rule == {k: v for k, v in ew_rules[rule["name"]].items() if k != "then"}


def test_an_enforced_halt_ends_the_run_and_the_comparison_shows_where(tmp_path, capsys):
    """The enforce copy of the early-warning policy halts a run whose attention kernel is faulty
    (``attention-kernel-error``): the harness records the step and stops there (the validation
    loss is the model's at the halt), and ``--compare`` names the step."""
    ew = _module()
    audit, enforce = tmp_path / "audit", tmp_path / "enforce"
    assert ew.main(["--study", str(audit), "--tiny", "--data", str(SHAKESPEARE), "--faults", "attn-lowp"]) == 0
    assert ew.main(["--study", str(enforce), "--tiny", "--data", str(SHAKESPEARE), "--faults", "attn-lowp",
                    "--policy", str(ROOT / "benchmarks" / "policies" / "early-warning-enforce.yaml")]) == 0
    runs = {r["key"]: r for r in map(json.loads, (enforce / "results.jsonl").read_text().splitlines())}
    faulted = runs["lbw|0.003|0|attn-lowp@20x1.15b3"]
    step = faulted["halted_step"]
    assert step is not None and 20 <= step < 60 and len(faulted["losses"]) == step
    assert runs["lbw|0.003|0|none"]["halted_step"] is None and len(runs["lbw|0.003|0|none"]["losses"]) == 60
    decisions = (enforce / "runs" / "lbw_0.003_0_attn-lowp@20x1.15b3" / "decisions.jsonl").read_text()
    assert '"event":"halt"' in decisions and "attention-kernel-error" in decisions
    audited = {r["key"]: r for r in map(json.loads, (audit / "results.jsonl").read_text().splitlines())}
    assert audited["lbw|0.003|0|attn-lowp@20x1.15b3"]["halted_step"] is None   # audit mode: logged only
    capsys.readouterr()
    assert ew.main(["--compare", str(audit), str(enforce)]) == 0
    assert f"halted at {step})" in capsys.readouterr().out

    # --repair-at-halt: the same halt, then the kernel is fixed and the run resumes from the halt
    # checkpoint on the same (verifiable) decision log, to the end
    from lbw_policy.decision_log import verify_log

    repaired = tmp_path / "repaired"
    assert ew.main(["--study", str(repaired), "--tiny", "--data", str(SHAKESPEARE), "--faults", "attn-lowp",
                    "--policy", str(ROOT / "benchmarks" / "policies" / "early-warning-enforce.yaml"),
                    "--repair-at-halt"]) == 0
    rruns = {r["key"]: r for r in map(json.loads, (repaired / "results.jsonl").read_text().splitlines())}
    resumed = rruns["lbw|0.003|0|attn-lowp@20x1.15b3"]
    assert resumed["repair_at_halt"] and resumed["halted_step"] == step and len(resumed["losses"]) == 60
    assert resumed["losses"][:step] == faulted["losses"]        # the same run up to the halt
    assert resumed["final_val_loss"] != faulted["final_val_loss"]
    assert rruns["lbw|0.003|0|none"]["losses"] == runs["lbw|0.003|0|none"]["losses"]   # nothing halts
    run_dir = repaired / "runs" / "lbw_0.003_0_attn-lowp@20x1.15b3"
    recs = [json.loads(line) for line in (run_dir / "decisions.jsonl").read_text().splitlines()]
    events = [r["event"] for r in recs]
    assert events.index("halt") < events.index("resume")
    assert [r["step"] for r in recs if r["event"] == "fired" and r["rule"] == "attention-kernel-error"] == [step]
    assert verify_log(run_dir / "decisions.jsonl").ok
    tel = [json.loads(line) for line in (run_dir / "telemetry.jsonl").read_text().splitlines()]
    after = [t["signals"]["attn.kernel_error"] for t in tel
             if t["step"] > step and "attn.kernel_error" in t["signals"]]
    assert after and max(after) < 1e-5                         # the repaired kernel reads rounding
    capsys.readouterr()
    assert ew.main(["--compare", str(audit), str(repaired)]) == 0
    assert f"halted at {step} and resumed repaired" in capsys.readouterr().out


def test_kernel_error_floor_script_separates_working_kernels_from_the_fault(capsys):
    """``benchmarks/kernel_error_floor.py``: float32 SDPA reads float rounding, bfloat16 SDPA
    stays under the early-warning threshold (0.02) and the 3-bit ``attn-lowp`` kernel is above
    it once the logits are large; bad arguments are clear errors."""
    spec = importlib.util.spec_from_file_location("kernel_error_floor", ROOT / "benchmarks" / "kernel_error_floor.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main(["--scales", "100"]) == 0
    rows = {line.split(" | ")[1]: float(line.rstrip(" |").split(" | ")[-1])
            for line in capsys.readouterr().out.splitlines() if line.startswith("| 100 |")}
    assert rows["float32 SDPA"] < 1e-5
    assert 1e-4 < rows["bfloat16 SDPA (autocast)"] < 0.02
    assert rows["3-bit logits"] > 0.02 and rows["3-bit logits x2"] > rows["3-bit logits"]
    for bad in (["--scales", "x"], ["--bits", "0"]):
        with pytest.raises(SystemExit):
            mod.main(bad)


def test_final_losses_tell_a_resumed_run_from_one_halted_again(tmp_path):
    """``--compare``'s reading of a ``--repair-at-halt`` study: a run resumed after its halt
    counts as resumed (its final loss), one halted again after the resume as halted, at the
    second step."""
    ew = _module()
    study = tmp_path / "repaired"
    study.mkdir()
    (study / "config.json").write_text(json.dumps({"lr": 0.003}))
    row = dict(lr=0.003, onset_rate=1.05, vocab_size=65, final_val_loss=2.2, repair_at_halt=True)
    rows = [dict(row, fault="combo@100x1.05b3", seed=0, halted_step=100, halted_again_step=None),
            dict(row, fault="combo@100x1.05b3", seed=1, halted_step=100, halted_again_step=140),
            dict(row, fault="none", seed=0, halted_step=None, halted_again_step=None)]
    (study / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cells, config = ew._final_losses(study)
    key = ("combo", 1.05, 0.003)
    assert cells[key] == [2.2, 2.2]
    assert config["resumed"] == {key: [100]} and config["halted"] == {key: [140]}
