"""Hostile input (issue 17): every case of tests/hostile_corpus.py is rejected with exit 1 or 2
(never 0, never 4 "internal error"), in under 2 s over a `validate` baseline and under 100 MB
of peak RSS over it, naming FILE:LINE where the file has a line. The corpus runs in one fresh
process (its RSS is not the test runner's)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent

pytestmark = pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs POSIX FIFOs")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("hostile")
    env = dict(os.environ, PYTHONPATH=str(HERE.parent), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(HERE / "hostile_corpus.py"), str(d / "corpus")],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


def _cases(corpus):
    return corpus["cases"].items()


def test_the_corpus_covers_bombs_sizes_numbers_strings_and_special_files(corpus):
    names = set(corpus["cases"])
    for kind in ("alias_bomb", "alias_string_repeat", "merge_bomb", "size_bomb", "many_nodes",
                 "huge_description", "huge_int", "huge_float", "deep_nesting", "huge_key",
                 "huge_rule_name", "many_errors", "verify_long_line", "replay_long_telemetry"):
        assert kind in names
    for reader in ("validate", "test", "verify", "audit", "replay_policy", "run_policy",
                   "verify_key"):
        for special in ("fifo", "devzero", "dir"):
            assert f"{reader}_{special}" in names


def test_every_case_is_rejected_never_an_internal_error(corpus):
    audits = ("audit_long_line", "audit_deep_json")  # audit reports a damaged log, exit 0
    bad = {n: (r["code"], r["output"][-300:]) for n, r in _cases(corpus)
           if r["code"] not in (1, 2) and n not in audits}
    assert not bad
    for name in audits:
        audit = corpus["cases"][name]
        assert audit["code"] == 0 and "chain FAILED (1 problem(s)" in audit["output"], name
    deep = corpus["cases"]["verify_deep_json"]["output"]
    assert "nested too deep" in deep, deep


def test_every_case_is_fast_and_small(corpus):
    base = corpus["baseline_seconds"]
    slow = {n: round(r["seconds"], 2) for n, r in _cases(corpus) if r["seconds"] - base >= 2.0}
    assert not slow
    big = {n: r["rss_growth_kib"] // 1024 for n, r in _cases(corpus)
           if r["rss_growth_kib"] >= 100 * 1024}
    assert not big


def test_policy_problems_name_file_and_line_and_quote_little(corpus):
    for name, r in _cases(corpus):
        if r["where"]:
            assert r["where"] in r["output"], (name, r["output"][:500])
            for line in r["output"].splitlines():
                assert len(line) < 800, (name, line[:200])


def test_special_files_are_refused_by_name(corpus):
    for name, r in _cases(corpus):
        if name.endswith(("_fifo", "_devzero")) and not name.startswith("audit"):
            kind = "a FIFO (named pipe)" if name.endswith("fifo") else "a character device"
            assert f"is {kind}, not a regular file" in r["output"] or "no telemetry" in \
                r["output"], (name, r["output"])
    assert "summary.json" in corpus["cases"]["verify_fifo_summary"]["output"]
    assert "is a FIFO (named pipe), not a regular file" in \
        corpus["cases"]["verify_fifo_summary"]["output"]


def test_long_lines_are_reported_not_loaded(corpus):
    cases = corpus["cases"]
    assert "line 1: longer than 1048576 bytes (125829120 bytes; not a record), without a " \
        "final newline" in cases["verify_long_line"]["output"]
    assert "line 1: longer than 1048576 bytes (125829121 bytes; not a record)" in \
        cases["verify_nul_line"]["output"]
    assert "telemetry line 1: longer than 1048576 bytes (125829120 bytes); skipped" in \
        cases["replay_long_telemetry"]["output"]
