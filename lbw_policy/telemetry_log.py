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
from typing import Iterator, Union

from lbw_policy.decision_log import sanitize
from lbw_policy.records import from_json_number
from lbw_policy.safeio import iter_lines

__all__ = ["open_telemetry", "telemetry_line", "read_telemetry", "iter_telemetry",
           "MAX_LINE_BYTES"]

#: Longest telemetry line read (a row is ~100 bytes per signal); longer lines are skipped
#: with a warning, never loaded.
MAX_LINE_BYTES = 1 << 20


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
    """Read a ``telemetry.jsonl`` leniently (:func:`iter_telemetry`, collected).

    :returns: ``(rows, warnings)``: rows are dicts ``{step, loss, lr, skipped, signals}`` with
        ``"NaN"`` / ``"Infinity"`` strings turned back into floats; a torn last line (a killed
        run), a damaged line or one longer than :data:`MAX_LINE_BYTES` is skipped with a warning
        naming its line.
    :raises FileNotFoundError: the file does not exist (or is not a regular file).
    """
    warnings: list = []
    return list(iter_telemetry(path, warnings)), warnings


def iter_telemetry(path: Union[str, "os.PathLike[str]"], warnings: list) -> Iterator[dict]:
    """Stream the rows of a ``telemetry.jsonl``, one line in memory at a time (see
    :func:`read_telemetry`); warnings are appended to ``warnings`` as lines are read.

    :raises FileNotFoundError: the file does not exist, or is a FIFO, device or directory
        (checked before the first row).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no telemetry at {str(path)!r}: replay needs the "
                                "telemetry.jsonl a governed run writes beside its decision log "
                                "(a regular file)")
    return _rows(path, warnings)


def _rows(path: Path, warnings: list) -> Iterator[dict]:
    for ln in iter_lines(path, MAX_LINE_BYTES, "telemetry file"):
        if ln.raw is None:
            warnings.append(f"telemetry line {ln.lineno}: longer than {MAX_LINE_BYTES} bytes "
                            f"({ln.size} bytes); skipped")
            continue
        if not ln.raw.strip():
            continue
        try:
            row = json.loads(ln.raw.decode("utf-8"))
            if not isinstance(row, dict) or not isinstance(row.get("step"), int) or \
                    not isinstance(row.get("signals", {}), dict):
                raise ValueError("not a telemetry row")
        except (ValueError, UnicodeDecodeError, RecursionError):
            what = "torn last line (the run was interrupted)" if not ln.newline else "damaged line"
            warnings.append(f"telemetry line {ln.lineno}: {what}; skipped")
            continue
        row["signals"] = {k: from_json_number(v) for k, v in (row.get("signals") or {}).items()}
        row["loss"] = from_json_number(row.get("loss"))
        yield row
