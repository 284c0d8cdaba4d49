"""``telemetry.jsonl``: the per-step inputs of a governed run, written by the guard and read by
replay and plot.

One JSON line per step (fields: docs/decision-log.md, "Telemetry"); non-finite numbers as the
strings ``"NaN"`` / ``"Infinity"`` / ``"-Infinity"`` (:func:`lbw_policy.decision_log.sanitize`).
It is not hash-chained: it records inputs, not decisions.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Union

from lbw_policy.decision_log import sanitize
from lbw_policy.records import from_json_number

__all__ = ["open_telemetry", "telemetry_line", "read_telemetry"]


def open_telemetry(path: Path):
    """Open ``telemetry.jsonl`` for appending, line-buffered (a killed run loses at most the
    line being written); a torn last line left by a crash is cut off first, so the next line
    does not glue onto it."""
    if path.exists():
        with open(path, "r+b") as fh:
            pos = fh.seek(0, os.SEEK_END)
            fh.seek(max(0, pos - 1))
            if pos and fh.read(1) != b"\n":
                while pos > 0:  # find the last newline, reading backwards in chunks
                    start = max(0, pos - 65536)
                    fh.seek(start)
                    cut = fh.read(pos - start).rfind(b"\n")
                    if cut >= 0:
                        fh.truncate(start + cut + 1)
                        break
                    pos = start
                else:
                    fh.truncate(0)
    return open(path, "a", encoding="utf-8", buffering=1)


def telemetry_line(record: dict) -> str:
    """One ``telemetry.jsonl`` line: ``record`` through :func:`sanitize`, or straight to JSON
    when every number in it is already a finite float (the usual step, and the same text)."""
    loss, lr, sched = record["loss"], record["lr"], record.get("scheduled_lr", 0.0)
    if (type(loss) is float and loss - loss == 0.0 and type(lr) is float and lr - lr == 0.0
            and type(sched) is float and sched - sched == 0.0
            and all(type(v) is float and v - v == 0.0 for v in record["signals"].values())):
        return json.dumps(record, separators=(",", ":"))
    return json.dumps(sanitize(record), separators=(",", ":"))


def read_telemetry(path: Union[str, "os.PathLike[str]"]) -> tuple:
    """Read a ``telemetry.jsonl`` leniently.

    :returns: ``(rows, warnings)``: rows are dicts ``{step, loss, lr, skipped, signals}`` with
        ``"NaN"`` / ``"Infinity"`` strings turned back into floats; a torn last line (a killed
        run) or a damaged line is skipped with a warning naming its line.
    :raises FileNotFoundError: the file does not exist.
    """
    rows, warnings = [], []
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no telemetry at {str(path)!r}: replay needs the "
                                "telemetry.jsonl a governed run writes beside its decision log")
    with open(path, "rb") as fh:
        lines = fh.read().split(b"\n")
    last = len(lines) - 1  # the text after the final "\n" ("" for a clean file)
    for i, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        try:
            row = json.loads(raw.decode("utf-8"))
            if not isinstance(row, dict) or not isinstance(row.get("step"), int) or \
                    not isinstance(row.get("signals", {}), dict):
                raise ValueError("not a telemetry row")
        except (ValueError, UnicodeDecodeError):
            what = "torn last line (the run was interrupted)" if i == last + 1 else "damaged line"
            warnings.append(f"telemetry line {i}: {what}; skipped")
            continue
        row["signals"] = {k: from_json_number(v) for k, v in (row.get("signals") or {}).items()}
        row["loss"] = from_json_number(row.get("loss"))
        rows.append(row)
    return rows, warnings
