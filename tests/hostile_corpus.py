"""A hostile-input corpus for the loaders and the CLI (issue 17), generated on the fly.

``python tests/hostile_corpus.py DIR`` writes the corpus into ``DIR`` and runs every case through
``lbw_policy.cli.main`` in this one fresh process, after a baseline (``validate`` of a good
policy). It prints one JSON line: the baseline's seconds and ``ru_maxrss``, and per case its exit
code, seconds, peak-RSS growth over the baseline (KiB) and output. ``tests/test_hostile.py``
asserts on it. Each case is a list of CLI arguments and the ``FILE:LINE`` its output must name
(``None`` where the file has no line: special files).
"""

from __future__ import annotations

import io
import json
import os
import resource
import sys
import time
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

GOOD = """apiVersion: lbw-policy/v1
kind: Policy
metadata: {name: good, owner: me, description: fine}
detectors:
  loss: {type: loss_spike, params: {alpha: 0.9, warmup: 5}}
actuators:
  lr_scale: {min: 0.1, max: 1.0}
rules:
  - name: brake
    when: {signal: loss.zscore, op: ">", value: 4.0}
    then: [{actuator: lr_scale, multiply: 0.5}]
"""

HEAD = "apiVersion: lbw-policy/v1\nkind: Policy\n"


def build(d: Path) -> dict:
    """Write the corpus; ``{name: (argv, file_line or None)}``."""
    d.mkdir(parents=True, exist_ok=True)
    cases: dict = {}

    def policy(name: str, text: str, line) -> None:
        path = d / f"{name}.yaml"
        path.write_text(text, encoding="utf-8")
        cases[name] = (["validate", str(path)], f"{path}:{line}:" if line else None)

    (d / "good.yaml").write_text(GOOD)
    # 1. anchors bomb ("billion laughs"): 9 levels of 9 aliases each
    lines = [HEAD + "metadata: {name: lol}\nrules: []\nx0: &x0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    for i in range(1, 10):
        lines.append(f"x{i}: &x{i} [" + ", ".join([f"*x{i - 1}"] * 9) + "]")
    policy("alias_bomb", "\n".join(lines) + "\n", 1)
    # 2. a 200 KB string repeated by aliases where a string is expected (the schema error
    #    message would quote the whole instance)
    big = "A" * 200_000
    policy("alias_string_repeat", HEAD + f"s: &s {big}\nmetadata:\n  name: [" +
           ", ".join(["*s"] * 2_000) + "]\nrules: []\n", 1)
    # 3. merge keys bomb: each level merges the previous one 8 times
    text = HEAD + "metadata: {name: m}\nrules: []\nm0: &m0 {" + ", ".join(
        f"k{j}: v" for j in range(8)) + "}\n"
    for i in range(1, 8):
        text += f"m{i}: &m{i} {{<<: [" + ", ".join([f"*m{i - 1}"] * 8) + f"], own{i}: v}}\n"
    policy("merge_bomb", text, 1)
    # 4. size: over 4 MiB
    policy("size_bomb", HEAD + "# " + "x" * (4 << 20) + "\n", 1)
    # 5. many nodes under the size limit: one million list items (about 4 MB)
    policy("many_nodes", HEAD + "metadata: {name: n}\nrules:\n" + "- 0\n" * 1_000_000, 9994)
    # 6. a 3 MiB description: the schema's length limit, the message quotes 300 characters
    policy("huge_description", HEAD + "metadata:\n  name: d\n  description: " + "D" * (3 << 20)
           + "\nrules: []\n", 5)
    # 7. huge numbers: a 100,000-digit integer, a float that overflows to infinity
    policy("huge_int", HEAD + "metadata: {name: i}\nrules:\n  - name: r\n    priority: "
           + "9" * 100_000 + "\n    when: {signal: a.b, op: '>', value: 1}\n    then: []\n", 6)
    policy("huge_float", HEAD + "metadata: {name: f}\nrules:\n  - name: r\n    when: {signal: "
           "a.b, op: '>', value: 1.0e+999999}\n    then: []\n", 6)
    # 8. nesting 20,000 deep (beyond Python's recursion limit)
    policy("deep_nesting", HEAD + "metadata: {name: n}\nrules: " + "[" * 20_000 + "]" * 20_000
           + "\n", 4)
    # 9. a 3 MiB mapping key, and a rule name of 1 MiB
    policy("huge_key", HEAD + "metadata: {name: k}\nrules: []\n" + "K" * (3 << 20) + ": 1\n", 5)
    policy("huge_rule_name", HEAD + "metadata: {name: k}\nrules:\n  - name: " + "r" * (1 << 20)
           + "\n    when: {signal: a.b, op: '>', value: 1}\n    then: []\n", 5)
    # 10. thousands of invalid rules, each 500 characters: every error quoted, none whole
    policy("many_errors", HEAD + "metadata: {name: e}\nrules:\n" +
           "".join(f"  - {'e' * 500}\n" for _ in range(2_000)), 5)
    # 11. special files: a FIFO, /dev/zero, a directory, for every reader
    fifo = d / "fifo"
    os.mkfifo(fifo)
    run = d / "run"
    run.mkdir()
    (run / "decisions.jsonl").write_text("")
    os.mkfifo(run / "telemetry.jsonl")
    os.mkfifo(run / "summary.json")
    special = {"fifo": str(fifo), "devzero": "/dev/zero", "dir": str(d)}
    for kind, path in special.items():
        cases[f"validate_{kind}"] = (["validate", path], None)
        cases[f"test_{kind}"] = (["test", path], None) if kind != "dir" else \
            (["test", str(d / "good.yaml")], None)  # a directory of tests is a feature
        cases[f"verify_{kind}"] = (["verify", path], None) if kind != "dir" else \
            (["verify", str(run / "missing")], None)
        cases[f"audit_{kind}"] = (["audit", path], None)
        cases[f"replay_policy_{kind}"] = (["replay", str(run), "--policy", path], None)
        cases[f"run_policy_{kind}"] = (["run", "--policy", path, "--steps", "1",
                                        "--no-progress", "--out", str(d / f"out_{kind}")], None)
        cases[f"verify_key_{kind}"] = (["verify", str(run), "--public-key", path], None)
    cases["replay_fifo_telemetry"] = (["replay", str(run), "--policy", str(d / "good.yaml")],
                                      None)
    cases["verify_fifo_summary"] = (["verify", str(run)], None)
    # 12. 200 MB lines (sparse files: NUL bytes) in a decision log, a telemetry file and a
    #     witness file: read in bounded pieces, never whole (the RSS check would see 200 MB)
    big = 120 << 20
    with open(d / "long.jsonl", "wb") as fh:
        fh.write(b"{")
        fh.truncate(big)
    cases["verify_long_line"] = (["verify", "--no-summary", str(d / "long.jsonl")], None)
    with open(d / "nul.jsonl", "wb") as fh:
        fh.truncate(big)
        fh.seek(big)
        fh.write(b"\n")
    cases["verify_nul_line"] = (["verify", "--no-summary", str(d / "nul.jsonl")], None)
    run2 = d / "run2"
    run2.mkdir()
    (run2 / "decisions.jsonl").write_text("")
    with open(run2 / "telemetry.jsonl", "wb") as fh:
        fh.truncate(big)
    cases["replay_long_telemetry"] = (["replay", str(run2), "--policy", str(d / "good.yaml"),
                                       "--strict"], None)
    # audit reads a damaged log and reports it (exit 0, "chain FAILED"): bounded all the same
    cases["audit_long_line"] = (["audit", str(d / "nul.jsonl")], None)
    # 13. JSON nested 200,000 deep (beyond Python's recursion limit) in a decision log, a
    #     summary.json and a witness file: a damaged line, never an internal error
    deep = "[" * 200_000 + "]" * 200_000 + "\n"
    run3 = d / "run3"
    run3.mkdir()
    (run3 / "decisions.jsonl").write_text(deep)
    (run3 / "summary.json").write_text('{"log": ' + "[" * 5_000 + "]" * 5_000 + "}")
    (d / "deep_witness.jsonl").write_text(deep)
    from lbw_policy.signing import generate_keypair

    generate_keypair(d, "key")
    cases["verify_deep_json"] = (["verify", str(run3)], None)
    cases["audit_deep_json"] = (["audit", str(run3)], None)
    cases["verify_deep_witness"] = (["verify", str(run3), "--no-summary", "--public-key",
                                     str(d / "key.pub"), "--witness",
                                     str(d / "deep_witness.jsonl")], None)
    return cases


def _run(argv: list) -> tuple:
    from lbw_policy.cli import main

    out, err = io.StringIO(), io.StringIO()
    t0 = time.perf_counter()
    with redirect_stdout(out), redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as exc:  # argparse usage errors
            code = exc.code
    return code, time.perf_counter() - t0, out.getvalue() + err.getvalue()


def _maxrss_kib() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux


def main() -> None:
    d = Path(sys.argv[1])
    only = sys.argv[2:]
    cases = build(d)
    _run(["validate", str(d / "good.yaml")])  # warm the imports and the plugin registry
    code, base_s, _ = _run(["validate", str(d / "good.yaml")])
    assert code == 0
    base_rss = _maxrss_kib()
    results = {}
    for name, (argv, where) in cases.items():
        if only and name not in only:
            continue
        code, seconds, text = _run(argv)
        results[name] = {"argv": argv, "code": code, "seconds": seconds, "where": where,
                         "rss_growth_kib": _maxrss_kib() - base_rss,
                         "output": text if len(text) < 4000 else text[:2500] + "\n...\n" + text[-1000:]}
    print(json.dumps({"baseline_seconds": base_s, "baseline_rss_kib": base_rss,
                      "cases": results}))


if __name__ == "__main__":
    main()
