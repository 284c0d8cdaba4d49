"""Tests for ``lbw-policy audit`` (lbw_policy.audit) on a real governed run with hand-placed
disturbances (tests/runhelpers.py): a loss spike at step 20 braked and clamped by min 0.2,
non-finite steps 30 and 31 skipped. Expected decisions are worked out from the policy:

    step 20  spike-brake fired      lr_scale 1 -> 0.2 (requested 0.1, clamped by min)
    step 22  spike-brake resolved   (keep_firing_for 1)
    step 25  recover                lr_scale 0.2 -> 0.4 (every 5 steps, factor 2)
    step 30  nonfinite-skip fired   skip_step 0 -> 1; lr_scale 0.4 -> 0.2
    step 31  nonfinite-skip action  skip_step 1 -> 2; lr_scale 0.2 -> 0.2 (requested 0.1, clamped)
    step 32  nonfinite-skip resolved
    steps 36, 41, 46 recover        lr_scale 0.4, 0.8, 1.0
"""

from __future__ import annotations

import json

import pytest
from runhelpers import AUDIT_POLICY, AUDIT_SCALE_AT, make_run

from lbw_policy import audit
from lbw_policy.cli import main

EXPECTED = [(20, "fired", "spike-brake"), (22, "resolved", "spike-brake"), (25, "recover", None),
            (30, "fired", "nonfinite-skip"), (31, "action", "nonfinite-skip"),
            (32, "resolved", "nonfinite-skip"), (36, "recover", None), (41, "recover", None),
            (46, "recover", None)]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("audit") / "run"
    make_run(run_dir, AUDIT_POLICY, steps=50, scale_at=AUDIT_SCALE_AT)
    return run_dir


def decisions(records):
    return [(r["step"], r["event"], r["rule"]) for r in records
            if r["event"] not in ("run_start", "run_end")]


def test_the_run_made_the_expected_decisions(run):
    log = audit.load_audit(run)
    assert log.chain.ok
    assert decisions(log.records) == EXPECTED


def test_every_record_carries_owner_revision_run_and_step_and_run_start_the_description(run):
    log = audit.load_audit(run / "decisions.jsonl")
    revisions = {r["policy"]["revision"] for r in log.records}
    assert len(revisions) == 1 and len(revisions.pop()) == 64
    for r in log.records:
        assert r["policy"]["owner"] == "Ada Lovelace <ada@example.org>"
        assert r["policy"]["name"] == "audit-fixture"
        assert r["run"]["run_id"] == "run" and isinstance(r["step"], int)
        # the description is in run_start only (issue 17: it is not copied into every record)
        if r["event"] == "run_start":
            assert r["policy"]["description"] == "Brake on loss spikes, skip non-finite steps."
        else:
            assert "description" not in r["policy"]
    # ... and the audit still shows it for each decision (from its run_start)
    rec = next(r for r in log.records if r["event"] == "fired")
    assert audit.explain(log, rec["id"])["policy"]["description"] == \
        "Brake on loss spikes, skip non-finite steps."
    rows = audit.flat_rows(log.records)
    assert {row["description"] for row in rows} == {"Brake on loss spikes, skip non-finite steps."}


def test_summary_tables(run):
    log = audit.load_audit(run)
    s = audit.summarize(log.records)
    assert s["by_rule"] == {"nonfinite-skip": {"fired": 1, "action": 1, "resolved": 1, "total": 3},
                            "spike-brake": {"fired": 1, "resolved": 1, "total": 2}}
    assert s["by_actuator"] == {
        "lr_scale": {"actions": 7, "applied": 7, "clamped": 2, "refused": 0, "failed": 0,
                     "enforced": 7},
        "skip_step": {"actions": 2, "applied": 2, "clamped": 0, "refused": 0, "failed": 0,
                      "enforced": 2}}
    assert s["by_event"] == {"recover": 4, "fired": 2, "resolved": 2, "run_start": 1,
                             "action": 1, "run_end": 1}


def test_text_output_has_header_tables_and_decisions(run, capsys):
    assert main(["audit", str(run)]) == 0
    out = capsys.readouterr().out
    assert "(11 records; chain OK, head " in out
    assert "policy        audit-fixture  revision " in out
    assert "  owner       Ada Lovelace <ada@example.org>" in out
    assert "  description Brake on loss spikes, skip non-finite steps." in out
    assert "spike-brake              1         0         1         2" in out
    lines = out.splitlines()
    assert any(line.split()[:4] == ["run.1", "20", "fired", "spike-brake"]
               and line.endswith("lr_scale 1 -> 0.2 (requested 0.1, clamped)") for line in lines)
    assert any(line.split()[:4] == ["run.5", "31", "action", "nonfinite-skip"] for line in lines)


@pytest.mark.parametrize("args, expected", [
    (["--rule", "spike-brake"], [(20, "fired", "spike-brake"), (22, "resolved", "spike-brake")]),
    (["--steps", "30:32"], [(30, "fired", "nonfinite-skip"), (31, "action", "nonfinite-skip"),
                            (32, "resolved", "nonfinite-skip")]),
    (["--steps", "41:49"], [(41, "recover", None), (46, "recover", None)]),
    (["--event", "fired,resolved", "--steps", ":25"], [(20, "fired", "spike-brake"),
                                                      (22, "resolved", "spike-brake")]),
    (["--actuator", "skip_step"], [(30, "fired", "nonfinite-skip"),
                                   (31, "action", "nonfinite-skip")]),
    (["--event", "halt"], []),
])
def test_filters_in_json(run, capsys, args, expected):
    assert main(["audit", str(run), "--format", "json", *args]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert decisions(doc["records"]) == expected
    assert doc["chain"]["ok"] and doc["policies"][0]["owner"] == "Ada Lovelace <ada@example.org>"
    assert sum(doc["summary"]["by_event"].values()) == len(expected)


def test_jsonl_rows_one_per_action(run, capsys):
    assert main(["audit", str(run), "--format", "jsonl", "--steps", "30:31"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(r["step"], r["actuator"], r["before"], r["after"], r["clamped"]) for r in rows] == [
        (30, "skip_step", 0, 1, False), (30, "lr_scale", 0.4, 0.2, False),
        (31, "skip_step", 1, 2, False), (31, "lr_scale", 0.2, 0.2, True)]
    assert {r["owner"] for r in rows} == {"Ada Lovelace <ada@example.org>"}
    assert all(len(r["revision"]) == 64 and r["run_id"] == "run" for r in rows)


def test_explain_a_clamped_decision(run, capsys):
    assert main(["audit", str(run), "--explain", "run.1"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("decision run.1 (seq 1): step 20, fired, ")
    assert "owner        Ada Lovelace <ada@example.org>" in out
    assert "rule         spike-brake (rules[1], " in out and "line 22): priority 50, for 1, " \
        "keep_firing_for 1, cooldown 0" in out
    lines = [line.strip() for line in out.splitlines()]
    assert "condition    TRUE" in out
    assert lines[lines.index("any:                                    TRUE") + 1].startswith(
        "loss.delta > 0.5                      TRUE   (loss.delta = ")
    assert any(line.startswith("gn.ratio > 50") and "false" in line for line in lines)
    assert "lr_scale multiply 0.1: before 1, after 0.2; requested 0.1, applied 0.2, CLAMPED" in lines
    assert "clamped by: min" in lines
    assert 'bounds: max 1, min 0.2, recover {"every": 5, "factor": 2.0}' in lines


def test_explain_json_holds_the_annotated_condition_tree(run, capsys):
    log = audit.load_audit(run)
    seq = next(r["seq"] for r in log.records if r["step"] == 31)
    assert main(["audit", str(run), "--explain", str(seq), "--format", "json"]) == 0
    ex = json.loads(capsys.readouterr().out)
    assert ex["event"] == "action" and ex["rule"]["name"] == "nonfinite-skip"
    assert ex["condition"] == {"signal": "nan.any", "op": ">", "value": 0, "actual": 1.0,
                               "result": True}
    lr = [a for a in ex["actions"] if a["actuator"] == "lr_scale"][0]
    assert (lr["requested"], lr["applied"], lr["clamped"], lr["clamped_by"]) == (0.1, 0.2, True, ["min"])
    assert ex["policy"]["revision"] == log.records[0]["policy"]["revision"]


def test_explain_recover_and_resolved(run):
    log = audit.load_audit(run)
    ex = audit.explain(log, "run.3")
    assert ex["event"] == "recover"
    assert 'no firing rule held lr_scale, so it moved back toward its neutral value as its ' \
        'bounds allow (lr_scale: recover {"every": 5, "factor": 2.0}); carried out' == ex["why"]
    ex = audit.explain(log, "run.2")
    assert ex["condition"]["result"] is False
    assert "keep_firing_for = 1" in ex["why"]


def test_explain_with_another_policy_revision_notes_it(run, tmp_path):
    other = tmp_path / "other.yaml"
    other.write_text(AUDIT_POLICY.replace("value: 0.5", "value: 0.6"), encoding="utf-8")
    ex = audit.explain(audit.load_audit(run), "run.1", policy_file=str(other))
    assert ex["rule"] is None and ex["condition"] is None
    assert "the record was decided under" in ex["notes"][0]
    text = audit.format_explanation(ex)
    assert "signals      gn.ratio = 1, loss.delta = 0.9" in text
    assert "note         policy file" in text


def test_unknown_id_and_bad_steps_are_one_line_errors(run, capsys):
    assert main(["audit", str(run), "--explain", "run.999"]) == 2
    assert "error: no record with id 'run.999'" in capsys.readouterr().err
    assert main(["audit", str(run), "--steps", "9:3"]) == 2
    assert capsys.readouterr().err.strip() == "error: --steps '9:3': the first step is after the last"
    assert main(["audit", str(run.parent / "nope")]) == 2
    assert "error: no decision log at" in capsys.readouterr().err


def test_tampered_log_is_flagged_in_the_header(run, tmp_path, capsys):
    copy = tmp_path / "decisions.jsonl"
    copy.write_bytes((run / "decisions.jsonl").read_bytes().replace(b'"applied":0.2', b'"applied":0.3', 1))
    assert main(["audit", str(copy)]) == 0
    assert "chain FAILED (1 problem(s): run `lbw-policy verify" in capsys.readouterr().out


@pytest.mark.parametrize("spec, expected", [("3:9", (3, 9)), ("3:", (3, None)), (":9", (None, 9)),
                                            ("7", (7, 7)), (None, None)])
def test_parse_steps(spec, expected):
    assert audit.parse_steps(spec) == expected


@pytest.mark.parametrize("spec", ["", ":", "a:b", "1:2:3", "-1:3"])
def test_parse_steps_rejects(spec):
    with pytest.raises(ValueError, match="expected A:B"):
        audit.parse_steps(spec)


def test_record_text_of_errors_halts_and_refusals():
    assert audit.record_text({"event": "error", "where": "detector b (boom)",
                              "error": "RuntimeError: x", "on_error": "continue"}) == \
        "detector b (boom) raised RuntimeError: x [on_error: continue]"
    assert audit.record_text({"event": "halt", "message": "training halted at step 3"}) == \
        "training halted at step 3"
    assert audit.action_text({"actuator": "skip_step", "applied": False, "clamped": True,
                              "note": "max_consecutive=3 reached; step taken"}) == \
        "skip_step refused (max_consecutive=3 reached; step taken)"
    assert audit.record_text({"event": "fired", "enforced": False, "actions": [
        {"actuator": "lr_scale", "applied": 0.5, "before": 1.0, "after": 0.5}]}) == \
        "lr_scale 1 -> 0.5 [audit mode: not applied]"
