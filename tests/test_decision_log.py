"""Tests for lbw_policy.decision_log: the hash-chained JSON Lines decision log."""

from __future__ import annotations

import hashlib
import json
import math
import re
import tempfile
from pathlib import Path

import pytest
from hypothesis import given, settings, strategies as st

from lbw_policy.decision_log import (
    GENESIS, RESERVED_KEYS, SCHEMA, DecisionLog, canonical_json, iter_records, read_log,
    record_hash, sanitize, verify_log,
)
from lbw_policy.errors import DecisionLogError

RUN = {"run_id": "r1", "rank": 0, "versions": {"lbw-policy": "0.1.0"}}


def _events():
    """Five caller records: run_start, fired, action, resolved, run_end."""
    return [
        {"step": 0, "event": "run_start", "policy": {"name": "p", "revision": "ab" * 32}},
        {"step": 7, "event": "fired", "rule": "loss_spike", "mode": "enforce",
         "signals": {"loss.zscore": 4.5, "tiny": 1e-05, "note": "caf\u00e9 \u001f"}},
        {"step": 7, "event": "action", "rule": "loss_spike",
         "actions": [{"actuator": "lr_scale", "requested": 0.5, "applied": 0.5,
                      "clamped": False, "before": 0.001, "after": 0.0005}]},
        {"step": 12, "event": "resolved", "rule": "loss_spike"},
        {"step": 20, "event": "run_end"},
    ]


def _write_log(path: Path, events=None) -> list[dict]:
    with DecisionLog(path, run=RUN) as log:
        return [log.append(e) for e in (_events() if events is None else events)]


def _lines(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines(keepends=True)


def _rehash(rec: dict) -> bytes:
    """A record with a freshly computed hash, as its line (what a careful forger would write)."""
    rec = dict(rec)
    rec["hash"] = record_hash(rec)
    return canonical_json(rec) + b"\n"


# --- writing and the chain -------------------------------------------------------------------


def test_chain_of_records_verifies(tmp_path):
    path = tmp_path / "decisions.jsonl"
    written = _write_log(path)
    report = verify_log(path)
    assert report.ok
    assert report.problems == [] and report.warnings == []
    assert report.records == 5
    assert report.head == written[-1]["hash"]
    assert [r["seq"] for r in written] == [0, 1, 2, 3, 4]
    assert [r["id"] for r in written] == ["r1.0", "r1.1", "r1.2", "r1.3", "r1.4"]
    assert written[0]["prev"] == GENESIS == "0" * 64
    for before, after in zip(written, written[1:]):
        assert after["prev"] == before["hash"]
    assert read_log(path).records == written
    assert list(iter_records(path)) == written


def test_record_fields_and_hash_match_an_independent_computation(tmp_path):
    path = tmp_path / "decisions.jsonl"
    first = _write_log(path, [{"step": 3, "event": "fired", "signals": {"loss": 2.5}}])[0]
    assert set(first) == {"schema", "seq", "id", "time", "run", "step", "event", "signals",
                          "prev", "hash"}
    assert first["schema"] == SCHEMA == "lbw-policy/decision/v1"
    assert first["run"] == RUN
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", first["time"])

    body = {k: v for k, v in first.items() if k != "hash"}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    assert first["hash"] == hashlib.sha256(text.encode("utf-8")).hexdigest()
    assert record_hash(first) == first["hash"]
    # The line on disk is exactly the canonical JSON of the full record plus "\n".
    full = json.dumps(first, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    assert path.read_bytes() == full.encode("utf-8") + b"\n"


def test_creates_parent_directories_and_fsync_mode_works(tmp_path):
    path = tmp_path / "a" / "b" / "decisions.jsonl"
    with DecisionLog(path, fsync=True) as log:
        rec = log.append({"event": "run_end"})
    assert rec["id"] == "run.0" and rec["run"] == {}
    assert verify_log(path).ok


def test_append_after_close_raises_and_close_is_idempotent(tmp_path):
    log = DecisionLog(tmp_path / "d.jsonl")
    assert not log.closed
    log.close()
    log.close()
    assert log.closed
    with pytest.raises(DecisionLogError, match="is closed"):
        log.append({"event": "fired"})


def test_second_writer_on_the_same_file_is_refused(tmp_path):
    pytest.importorskip("fcntl")
    path = tmp_path / "d.jsonl"
    with DecisionLog(path):
        with pytest.raises(DecisionLogError, match="another writer holds it"):
            DecisionLog(path)


@pytest.mark.parametrize("key", RESERVED_KEYS)
def test_reserved_keys_are_rejected_and_nothing_is_written(tmp_path, key):
    path = tmp_path / "d.jsonl"
    with DecisionLog(path) as log:
        log.append({"event": "run_start"})
        size = path.stat().st_size
        with pytest.raises(ValueError, match=rf"reserved key\(s\) \['{key}'\]"):
            log.append({"event": "fired", key: 1})
        assert path.stat().st_size == size
        assert log.seq == 1


def test_non_mapping_record_is_a_type_error(tmp_path):
    with DecisionLog(tmp_path / "d.jsonl") as log:
        with pytest.raises(TypeError, match="must be a mapping, got list"):
            log.append([("event", "fired")])


# --- sanitize ---------------------------------------------------------------------------------


class _Scalar:
    """Stands in for a numpy/torch scalar: has ``item()``."""

    def __init__(self, value):
        self.value = value

    def item(self):
        return self.value


class _Vector:
    """Stands in for a multi-element tensor: ``item()`` refuses, ``tolist()`` works."""

    def item(self):
        raise ValueError("only one element tensors can be converted to Python scalars")

    def tolist(self):
        return [1.0, float("nan")]


def test_non_finite_signals_are_sanitized_and_the_file_is_strict_json(tmp_path):
    path = tmp_path / "d.jsonl"
    with DecisionLog(path) as log:
        rec = log.append({"event": "fired", "signals": {
            "loss": float("nan"), "grad_norm": float("inf"), "neg": float("-inf"),
            "scalar": _Scalar(float("inf")), "pair": (1, 2.5)}})
    assert rec["signals"] == {"loss": "NaN", "grad_norm": "Infinity", "neg": "-Infinity",
                              "scalar": "Infinity", "pair": [1, 2.5]}

    def no_constants(name):
        raise AssertionError(f"non-standard JSON constant {name} in the log")

    line = path.read_bytes().decode("utf-8")
    assert json.loads(line, parse_constant=no_constants) == rec
    assert verify_log(path).ok


def test_sanitize_converts_to_plain_json_data():
    class Thing:
        def __str__(self):
            return "<thing>"

    cyclic: list = [1]
    cyclic.append(cyclic)
    data = {1: (True, None), "s": {3, 1, 2}, "x": _Scalar(2), "v": _Vector(), "t": Thing(),
            "nested": [{"f": -0.0, "n": _Scalar(float("-inf"))}], "c": cyclic,
            "bad": "a\ud800b"}
    assert sanitize(data) == {
        "1": [True, None], "s": [1, 2, 3], "x": 2, "v": [1.0, "NaN"], "t": "<thing>",
        "nested": [{"f": -0.0, "n": "-Infinity"}], "c": [1, "<cycle>"], "bad": "a?b"}
    canonical_json(sanitize(data))  # does not raise


def test_canonical_json_is_sorted_compact_utf8_and_rejects_nan():
    assert canonical_json({"b": 1, "a": ["\u00e9", 0.5]}) == '{"a":["\u00e9",0.5],"b":1}'.encode()
    with pytest.raises(ValueError):
        canonical_json({"x": math.nan})


# --- tampering --------------------------------------------------------------------------------


def test_every_single_byte_edit_is_detected(tmp_path):
    path = tmp_path / "d.jsonl"
    _write_log(path, [{"event": "run_start"},
                      {"event": "fired", "signals": {"z": 1e-05, "s": "\u00e9\u001f"}},
                      {"event": "run_end"}])
    original = path.read_bytes()
    assert verify_log(path).ok
    last = len(original) - 1
    with open(path, "r+b", buffering=0) as fh:
        for pos, byte in enumerate(original):
            # A bit flip, an ASCII case flip (1e-05 -> 1E-05 and \u001f -> \u001F keep the value,
            # so only the canonical-form check sees them) and a newline (splits a line in two).
            for new in sorted({byte ^ 0x01, byte ^ 0x20, 0x0A} - {byte}):
                fh.seek(pos)
                fh.write(bytes([new]))
                report = verify_log(path)
                _check_flip(report, pos, byte, new, pos == last)
            fh.seek(pos)
            fh.write(bytes([byte]))
    assert path.read_bytes() == original


def _check_flip(report, pos, byte, new, final_newline):
    if final_newline:
        # The final "\n" replaced: the last line is now torn. Torn is what a crash mid-write
        # leaves, so it is a warning and the two complete records before it verify.
        assert report.ok, (pos, new, report.problems)
        assert report.records == 2
        assert report.warnings[0].startswith("torn last line")
    else:
        assert not report.ok, f"edit of byte {pos} ({byte:#x} -> {new:#x}) undetected"


def test_edited_record_is_reported_on_its_line(tmp_path):
    path = tmp_path / "d.jsonl"
    _write_log(path)
    lines = _lines(path)
    lines[1] = lines[1].replace(b'"loss.zscore":4.5', b'"loss.zscore":3.5')
    path.write_bytes(b"".join(lines))
    assert verify_log(path).problems == ["line 2: hash mismatch (record edited)"]


def test_edited_record_with_recomputed_hash_breaks_the_next_prev(tmp_path):
    path = tmp_path / "d.jsonl"
    written = _write_log(path)
    forged = dict(written[1], signals={"loss.zscore": 1.0})
    lines = _lines(path)
    lines[1] = _rehash(forged)
    path.write_bytes(b"".join(lines))
    assert verify_log(path).problems == [
        "line 3: prev does not match hash of line 2 (record deleted or reordered)"]


def test_non_canonical_formatting_is_an_edit(tmp_path):
    path = tmp_path / "d.jsonl"
    _write_log(path)
    lines = _lines(path)
    lines[1] = lines[1].replace(b',"seq":', b', "seq":')
    path.write_bytes(b"".join(lines))
    assert verify_log(path).problems == ["line 2: not in canonical JSON form (line edited)"]


def test_inserted_copy_of_a_record_is_detected(tmp_path):
    path = tmp_path / "d.jsonl"
    _write_log(path)
    lines = _lines(path)
    lines.insert(2, lines[1])  # replay seq 1 after itself
    path.write_bytes(b"".join(lines))
    report = verify_log(path)
    assert not report.ok
    assert report.problems == [
        "line 3: seq 1 expected 2 (record inserted or deleted)",
        "line 3: prev does not match hash of line 2 (record deleted or reordered)"]


def test_inserted_forged_record_with_valid_hash_is_detected(tmp_path):
    path = tmp_path / "d.jsonl"
    written = _write_log(path)
    forged = dict(written[2], prev=written[1]["hash"], seq=2, id="r1.2", step=8)
    lines = _lines(path)
    lines.insert(2, _rehash(forged))
    path.write_bytes(b"".join(lines))
    assert verify_log(path).problems == [
        "line 4: seq 2 expected 3 (record inserted or deleted)",
        "line 4: prev does not match hash of line 3 (record deleted or reordered)"]


def test_deleted_middle_record_is_detected(tmp_path):
    path = tmp_path / "d.jsonl"
    _write_log(path)
    lines = _lines(path)
    del lines[2]
    path.write_bytes(b"".join(lines))
    report = verify_log(path)
    assert report.records == 4
    assert report.problems == [
        "line 3: seq 3 expected 2 (record inserted or deleted)",
        "line 3: prev does not match hash of line 2 (record deleted or reordered)"]


def test_deleted_first_record_is_detected(tmp_path):
    path = tmp_path / "d.jsonl"
    _write_log(path)
    path.write_bytes(b"".join(_lines(path)[1:]))
    assert verify_log(path).problems == [
        "line 1: seq 1 expected 0 (record inserted or deleted)",
        "line 1: prev of the first record is not GENESIS (records deleted from the start, or "
        "the log was spliced)"]


def test_reordered_records_are_detected(tmp_path):
    path = tmp_path / "d.jsonl"
    _write_log(path)
    lines = _lines(path)
    lines[1], lines[2] = lines[2], lines[1]
    path.write_bytes(b"".join(lines))
    assert verify_log(path).problems == [
        "line 2: seq 2 expected 1 (record inserted or deleted)",
        "line 2: prev does not match hash of line 1 (record deleted or reordered)",
        "line 3: seq 1 expected 3 (record inserted or deleted)",
        "line 3: prev does not match hash of line 2 (record deleted or reordered)",
        "line 4: seq 3 expected 2 (record inserted or deleted)",
        "line 4: prev does not match hash of line 3 (record deleted or reordered)"]


def test_deleted_last_record_is_detected_against_the_summary(tmp_path):
    path = tmp_path / "d.jsonl"
    written = _write_log(path)
    path.write_bytes(b"".join(_lines(path)[:-1]))
    # The shorter chain is internally valid; only the missing run_end hints at it.
    alone = verify_log(path)
    assert alone.ok
    assert alone.warnings == ["no run_end record: the log may be truncated or the run still going"]
    report = verify_log(path, expected_count=5, expected_head=written[-1]["hash"])
    assert not report.ok
    assert report.problems == [
        "log has 4 records, summary.json says 5: records deleted from the end",
        f"log head {written[-2]['hash']!r} does not match summary.json head "
        f"{written[-1]['hash']!r}: the last record was changed, deleted or followed by others"]
    assert verify_log(path, expected_count=4, expected_head=written[-2]["hash"]).ok


def test_records_appended_after_the_run_are_detected_against_the_summary(tmp_path):
    path = tmp_path / "d.jsonl"
    written = _write_log(path)
    with DecisionLog(path, run=RUN) as log:
        log.append({"event": "fired"})
    report = verify_log(path, expected_count=5, expected_head=written[-1]["hash"])
    assert report.problems[0] == \
        "log has 6 records, summary.json says 5: records appended after the run ended"


def test_unparseable_and_foreign_lines_are_problems(tmp_path):
    path = tmp_path / "d.jsonl"
    _write_log(path)
    lines = _lines(path)
    lines[1] = b'{"broken\n'
    lines[3] = json.dumps({"schema": "x", "seq": 3}).encode() + b"\n"
    path.write_bytes(b"".join(lines))
    report = verify_log(path)
    assert report.problems == [
        "line 2: not valid JSON",
        "line 4: schema 'x' unknown (expected 'lbw-policy/decision/v1')"]
    assert read_log(path).bad_lines == [(2, "not valid JSON")]
    assert [r["seq"] for r in read_log(path).records] == [0, 2, 3, 4]


def test_complete_but_unparseable_last_line_is_a_problem_not_a_torn_write(tmp_path):
    path = tmp_path / "d.jsonl"
    _write_log(path)
    lines = _lines(path)
    lines[-1] = lines[-1][:40] + b"\n"
    path.write_bytes(b"".join(lines))
    assert verify_log(path).problems == ["line 5: not valid JSON"]


def test_report_format(tmp_path):
    path = tmp_path / "d.jsonl"
    written = _write_log(path)
    first, unsigned = verify_log(path).format().splitlines()
    assert first == f"{path}: OK: 5 records, chain intact, head {written[-1]['hash']}"
    assert unsigned.startswith("  unsigned log: its hash chain detects accidental damage and "
                               "naive edits only")
    path.write_bytes(b"".join(_lines(path)[1:-1]))
    text = verify_log(path).format()
    assert text.splitlines() == [
        f"{path}: FAILED: 2 problem(s) in 3 records", unsigned,
        "  problem: line 1: seq 1 expected 0 (record inserted or deleted)",
        "  problem: line 1: prev of the first record is not GENESIS (records deleted from the "
        "start, or the log was spliced)",
        "  warning: no run_end record: the log may be truncated or the run still going"]


def test_empty_log_and_halt_as_last_event(tmp_path):
    empty = tmp_path / "empty.jsonl"
    DecisionLog(empty).close()
    report = verify_log(empty)
    assert (report.ok, report.records, report.head) == (True, 0, GENESIS)
    assert report.warnings == ["log is empty: no complete records"]
    halted = tmp_path / "halted.jsonl"
    _write_log(halted, [{"event": "run_start"}, {"event": "halt", "rule": "nan_loss"}])
    assert verify_log(halted).warnings == []


# --- torn tail and resume ---------------------------------------------------------------------


TORN = b'{"schema":"lbw'  # 14 bytes: a crash in the middle of writing a line


def test_torn_tail_is_a_warning_and_the_records_before_it_verify(tmp_path):
    path = tmp_path / "d.jsonl"
    written = _write_log(path, _events()[:3])
    with open(path, "ab") as fh:
        fh.write(TORN)
    report = verify_log(path)
    assert report.ok
    assert report.records == 3 and report.head == written[-1]["hash"]
    assert report.warnings == [
        "torn last line (14 bytes) at line 4: the run was interrupted while writing; the complete "
        "records before it verify",
        "no run_end record: the log may be truncated or the run still going"]
    read = read_log(path)
    assert (read.torn_tail, read.torn_bytes, read.bad_lines) == (True, 14, [])
    assert read.records == written
    assert list(iter_records(path)) == written


def test_reopening_a_torn_log_truncates_it_and_continues_the_chain(tmp_path):
    path = tmp_path / "d.jsonl"
    written = _write_log(path, _events()[:3])
    clean_size = path.stat().st_size
    with open(path, "ab") as fh:
        fh.write(TORN)
    with DecisionLog(path, run=RUN) as log:
        assert log.recovered_torn_bytes == 14
        assert path.stat().st_size == clean_size
        assert (log.seq, log.last_hash) == (3, written[-1]["hash"])
        more = [log.append(e) for e in _events()[3:]]
    assert [r["seq"] for r in more] == [3, 4]
    assert more[0]["prev"] == written[-1]["hash"]
    report = verify_log(path)
    assert report.ok and report.warnings == [] and report.records == 5
    assert read_log(path).records == written + more


def test_reopening_a_complete_but_unparseable_last_line_truncates_it(tmp_path):
    path = tmp_path / "d.jsonl"
    _write_log(path, _events()[:2])
    with open(path, "ab") as fh:
        fh.write(b'{"sch\x00\x00\n')
    with DecisionLog(path) as log:
        assert log.recovered_torn_bytes == 8
        assert log.seq == 2
    assert verify_log(path).records == 2


def test_reopening_a_clean_log_continues_without_recovery(tmp_path):
    path = tmp_path / "d.jsonl"
    _write_log(path, _events()[:2])
    with DecisionLog(path, run={"run_id": "r2"}) as log:
        assert log.recovered_torn_bytes == 0
        rec = log.append({"event": "run_end"})
    assert (rec["seq"], rec["id"], rec["run"]) == (2, "r2.2", {"run_id": "r2"})
    assert verify_log(path).ok


def test_reopening_with_a_damaged_earlier_line_refuses_and_leaves_the_file(tmp_path):
    path = tmp_path / "d.jsonl"
    _write_log(path)
    lines = _lines(path)
    lines[1] = b"not json\n"
    damaged = b"".join(lines)
    path.write_bytes(damaged)
    with pytest.raises(DecisionLogError, match=r"d\.jsonl: line 2 is not valid JSON; refusing"):
        DecisionLog(path)
    assert path.read_bytes() == damaged


def test_reopening_with_an_edited_last_record_refuses(tmp_path):
    path = tmp_path / "d.jsonl"
    _write_log(path)
    path.write_bytes(path.read_bytes().replace(b'"step":20', b'"step":21'))
    with pytest.raises(DecisionLogError, match=r"last record \(seq 4\) is not a valid"):
        DecisionLog(path)


# --- property: round trip ---------------------------------------------------------------------


# No subnormals: tests/conftest.py calls torch.set_flush_denormal(True), which sets the process's
# flush-to-zero mode, and hypothesis refuses to draw subnormal floats under it.
_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_subnormal=False)
    | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.tuples(inner, inner)
    | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12)
_records = st.dictionaries(
    st.text(max_size=8).filter(lambda k: k not in RESERVED_KEYS), _json_values, max_size=5)


@settings(max_examples=60, deadline=None)
@given(st.lists(_records, max_size=6))
def test_random_records_round_trip_and_verify(records):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "d.jsonl"
        with DecisionLog(path, run=RUN) as log:
            written = [log.append(r) for r in records]
        for rec, full in zip(records, written):
            clean = sanitize(rec)
            assert {k: full[k] for k in clean} == clean
        read = read_log(path)
        assert read.records == written
        assert (read.torn_tail, read.bad_lines) == (False, [])
        report = verify_log(path, expected_count=len(records),
                            expected_head=written[-1]["hash"] if written else GENESIS)
        assert report.ok, report.problems


def test_reopening_refuses_a_whole_last_line_that_is_no_record(tmp_path):
    """A crash leaves a line without its newline (or zero-filled blocks); a complete line that
    is no record is an edit. Reopening must not erase it: it refuses, the file untouched."""
    path = tmp_path / "d.jsonl"
    _write_log(path, _events()[:2])
    with open(path, "ab") as fh:
        fh.write(b'{"forged": tru}\n')
    before = path.read_bytes()
    with pytest.raises(DecisionLogError, match="line 3 is not valid JSON; refusing to append"):
        DecisionLog(path)
    assert path.read_bytes() == before
