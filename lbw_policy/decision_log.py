"""Hash-chained decision log: JSON Lines writer, reader and verifier.

Pure Python (stdlib only): the log can be read and verified without torch.

Format: UTF-8 JSON Lines, one record per line, every line ends with ``"\\n"`` and is the record's
canonical JSON (:func:`canonical_json`). Each record carries ``schema``, ``seq`` (0-based, one
per line), ``id`` (``"<run_id>.<seq>"``), UTC ``time``, the ``run`` labels, the caller's fields
(``step``, ``policy``, ``mode``, ``rule``, ``event``, ``signals``, ``actions``, ...), ``prev``
(the previous record's ``hash``, :data:`GENESIS` for the first) and ``hash`` (:func:`record_hash`).

Because every line must be canonical, carry the right hash, the next ``seq`` and the previous
hash, :func:`verify_log` detects any edit, insertion or deletion inside the log that did not
recompute the hashes. The chain is unkeyed: whoever can write the file can rewrite it whole, so
it detects accidents and naive edits, not a motivated attacker. Deleting records from the *end*
leaves a valid shorter chain: pass the count and head hash the run recorded elsewhere (its
``summary.json``) to detect that too. A torn last line (a crash mid-write) is a warning, not a
failure; :class:`DecisionLog` cuts it off when it reopens the file.

With a ``signer`` (:mod:`lbw_policy.signing`), the writer appends a signed **checkpoint** record
every ``checkpoint_every`` records and at :meth:`DecisionLog.close`; :func:`verify_log` with the
public key then detects rewrites, deletions, forgeries, splices, swaps and an incomplete tail
(docs/decision-log.md, "Threat model"). Reading is bounded: lines longer than
:data:`MAX_LINE_BYTES` are reported, never loaded, and special files are refused
(:mod:`lbw_policy.safeio`).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator, Optional, Union

from .errors import DecisionLogError
from .safeio import iter_lines

try:  # POSIX advisory lock: one writer per log file.
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "SCHEMA", "GENESIS", "RESERVED_KEYS", "canonical_json", "sanitize", "record_hash",
    "DecisionLog", "LogRead", "read_log", "iter_records", "VerifyReport", "verify_log",
    "MAX_LINE_BYTES", "read_summary_anchor",
]

#: Schema tag written into every record.
SCHEMA = "lbw-policy/decision/v1"
#: ``prev`` of the first record of a log.
GENESIS = "0" * 64
#: Keys :meth:`DecisionLog.append` fills in; a caller's record must not contain them.
RESERVED_KEYS = ("schema", "seq", "id", "time", "prev", "hash")
_REQUIRED = ("schema", "seq", "id", "time", "run", "prev", "hash")
_END_EVENTS = ("run_end", "halt")
#: Longest line read from a decision log (a record is a few KiB; ``run_start`` the largest).
MAX_LINE_BYTES = 1 << 20
_LISTED_NOT_APPLIED = 5  # failed commits listed one by one in verify's warnings

PathLike = Union[str, "os.PathLike[str]"]


def canonical_json(obj: Any) -> bytes:
    """Serialise ``obj`` to canonical JSON: sorted keys, no whitespace, UTF-8, no NaN/Infinity.

    :param obj: plain JSON data (run it through :func:`sanitize` first if unsure).
    :returns: the UTF-8 bytes, without a trailing newline.
    :raises ValueError: ``obj`` holds a non-finite float.
    :raises TypeError: ``obj`` holds something JSON cannot represent.
    """
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False).encode("utf-8")


def sanitize(obj: Any) -> Any:
    """Return a JSON-safe plain-data copy of ``obj``.

    Non-finite floats become ``"NaN"``, ``"Infinity"``, ``"-Infinity"``; tuples, lists and sets
    become lists (sets sorted by canonical JSON); mapping keys become ``str``; an object with an
    ``item()`` method (a numpy or torch scalar) is replaced by what ``item()`` returns (or by
    ``tolist()`` when ``item()`` refuses, e.g. a multi-element tensor); strings that are not
    valid Unicode get ``?`` for the bad code points; anything else becomes ``str(obj)``.
    A container that contains itself is written ``"<cycle>"``.

    :param obj: any value.
    :returns: data made of ``dict``/``list``/``str``/``int``/``float``/``bool``/``None`` only.
    """
    return _sanitize(obj, set())


def _sanitize(obj: Any, active: set) -> Any:
    if obj is None or isinstance(obj, bool):
        return obj
    if isinstance(obj, int):
        return int(obj)
    if isinstance(obj, float):
        if math.isnan(obj):
            return "NaN"
        if math.isinf(obj):
            return "Infinity" if obj > 0 else "-Infinity"
        return float(obj)
    if isinstance(obj, str):
        text = str.__str__(obj)
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:  # lone surrogates
            text = text.encode("utf-8", "replace").decode("utf-8")
        return text
    if isinstance(obj, (Mapping, list, tuple, set, frozenset)):
        if id(obj) in active:
            return "<cycle>"
        active.add(id(obj))
        try:
            if isinstance(obj, Mapping):
                return {_sanitize(k if isinstance(k, str) else str(k), active): _sanitize(v, active)
                        for k, v in obj.items()}
            items = [_sanitize(v, active) for v in obj]
            if isinstance(obj, (set, frozenset)):
                items.sort(key=canonical_json)
            return items
        finally:
            active.discard(id(obj))
    item = getattr(obj, "item", None)
    if callable(item):
        try:
            value = item()
        except (TypeError, ValueError, RuntimeError):
            tolist = getattr(obj, "tolist", None)
            return _sanitize(tolist(), active) if callable(tolist) else str(obj)
        if value is not obj and not callable(getattr(value, "item", None)):
            return _sanitize(value, active)
    return str(obj)


def record_hash(record: Mapping[str, Any]) -> str:
    """Hash of a record: sha256 hex digest of its canonical JSON without the ``"hash"`` key.

    :param record: a full record (its ``hash`` key, if any, is ignored).
    :returns: 64 lowercase hex characters.
    :raises ValueError, TypeError: as :func:`canonical_json`.
    """
    body = {k: v for k, v in record.items() if k != "hash"}
    return hashlib.sha256(canonical_json(body)).hexdigest()


def _utc_now() -> str:
    now = datetime.now(timezone.utc)
    return now.strftime("%Y-%m-%dT%H:%M:%S.") + f"{now.microsecond // 1000:03d}Z"


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _size(raw: bytes) -> int:
    return raw.size if isinstance(raw, _Overlong) else len(raw)


def _parse_line(raw: bytes) -> tuple[Optional[dict], str]:
    """Parse one line (with or without its newline). Returns ``(record, "")`` or ``(None, why)``."""
    if isinstance(raw, _Overlong):
        return None, f"longer than {MAX_LINE_BYTES} bytes ({raw.size} bytes; not a record)"
    body = raw[:-1] if raw.endswith(b"\n") else raw
    if not body.strip():
        return None, "empty line"
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        return None, "not valid UTF-8"
    try:
        obj = json.loads(text, parse_constant=_reject_constant)
    except ValueError:
        return None, "not valid JSON"
    except RecursionError:
        return None, "not a record (JSON nested too deep)"
    if not isinstance(obj, dict):
        return None, f"not a JSON object (found {type(obj).__name__})"
    return obj, ""


def _lines(path: PathLike) -> Iterator[tuple[int, int, bytes]]:
    """Yield ``(lineno, byte_offset, raw)``; ``raw`` keeps its ``\\n`` (the last may lack it).

    A line longer than :data:`MAX_LINE_BYTES` is not loaded: its ``raw`` is a stand-in of the
    same ending (``b"\\x00\\n"`` or ``b"\\x00"``) that :func:`_parse_line` rejects, and
    offsets stay exact. Regular files only (:func:`lbw_policy.safeio.open_regular`).
    """
    for ln in iter_lines(path, MAX_LINE_BYTES, "decision log"):
        raw = ln.raw if ln.raw is not None else _Overlong(ln.size, ln.newline)
        yield ln.lineno, ln.offset, raw


class _Overlong(bytes):
    """Stand-in for a line longer than :data:`MAX_LINE_BYTES`: one NUL (and the ``\\n`` if
    the line had one); ``size`` is the real length."""

    def __new__(cls, size: int, newline: bool) -> "_Overlong":
        obj = super().__new__(cls, b"\x00\n" if newline else b"\x00")
        obj.size = size
        return obj


@dataclass
class LogRead:
    """What :func:`read_log` found.

    :ivar records: parsed records of the complete, parseable lines, in file order.
    :ivar torn_tail: the last line lacks its ``\\n``, or holds NUL bytes and no record (a crash
        mid-write; a whole last line that is no record otherwise is a bad line).
    :ivar torn_bytes: length in bytes of that torn line (0 when there is none).
    :ivar bad_lines: ``(line, reason)`` for unparseable lines before the last one (1-based).
    """

    records: list[dict] = field(default_factory=list)
    torn_tail: bool = False
    torn_bytes: int = 0
    bad_lines: list[tuple[int, str]] = field(default_factory=list)
    torn_line: int = 0  #: 1-based line number of the torn line (0 when there is none).
    torn_offset: int = 0  #: byte offset where the torn line starts (file size when none).


def _scan(path: PathLike, keep: bool) -> LogRead:
    out = LogRead()
    pending: Optional[tuple[int, int, bytes]] = None  # held back until we know it is not last
    end = 0
    for entry in _lines(path):
        if pending is not None:
            record, why = _parse_line(pending[2])
            if record is None:
                out.bad_lines.append((pending[0], why))
            elif keep:
                out.records.append(record)
            else:
                out.records[:] = [record]
        pending = entry
        end = entry[1] + _size(entry[2])
    out.torn_offset = end
    if pending is not None:
        lineno, offset, raw = pending
        record, why = _parse_line(raw)
        # a crash mid-write: the line never got its newline, or the file system extended the
        # file with zero-filled blocks (NUL bytes) that were never written
        if not raw.endswith(b"\n") or (record is None and b"\x00" in raw):
            out.torn_tail, out.torn_bytes = True, _size(raw)
            out.torn_line, out.torn_offset = lineno, offset
        elif record is None:  # a whole line that is no record: damage (an edit), not a crash
            out.bad_lines.append((lineno, why))
        elif keep:
            out.records.append(record)
        else:
            out.records[:] = [record]
    return out


def read_log(path: PathLike) -> LogRead:
    """Read a decision log leniently (no hash checks; use :func:`verify_log` to audit it).

    :param path: the ``.jsonl`` file.
    :returns: a :class:`LogRead`; damaged lines are listed, not raised.
    :raises OSError: the file cannot be read (``FileNotFoundError`` if it does not exist).
    :raises lbw_policy.safeio.NotRegularFileError: it is a FIFO, device or directory.
    """
    return _scan(path, keep=True)


def iter_records(path: PathLike) -> Iterator[dict]:
    """Yield the records of the complete, parseable lines of a log, streaming.

    Damaged lines and a torn last line are skipped silently; use :func:`verify_log` to see them.

    :param path: the ``.jsonl`` file.
    :raises OSError: the file cannot be read.
    """
    for _, _, raw in _lines(path):
        if raw.endswith(b"\n"):
            record, _ = _parse_line(raw)
            if record is not None:
                yield record


class DecisionLog:
    """Append-only writer of a hash-chained decision log.

    Opening an existing non-empty file continues its chain: ``seq`` and ``prev`` follow its last
    record. A torn last line (left by a crash) is cut off first and its size kept in
    :attr:`recovered_torn_bytes`. The file is locked (POSIX ``flock``) so a second writer fails
    fast instead of interleaving lines.

    :param path: the ``.jsonl`` file; parent directories are created.
    :param run: run labels (``run_id``, ``rank``, package and plugin versions, ...), copied
        (sanitized) into every record under ``"run"``; ``run["run_id"]`` (default ``"run"``)
        prefixes record ids.
    :param fsync: ``os.fsync`` after every append (survives power loss, costs a disk flush).
    :param signer: a :class:`lbw_policy.signing.Signer` (or anything
        :func:`lbw_policy.signing.load_signer` takes: a key file path, an ``Ed25519PrivateKey``)
        to sign checkpoints with; ``None`` (default): an unsigned log.
    :param checkpoint_every: with a signer, a checkpoint record follows every this many
        records (default 100; checkpoints themselves do not count), and one more, ``final``,
        at :meth:`close`.
    :param witness: with a signer, where each signed checkpoint is also reported
        (:class:`lbw_policy.signing.Witness`: a file path, a logger, a callable, a list).
    :raises DecisionLogError: an earlier line is damaged, the last record is not a valid
        ``lbw-policy/decision/v1`` record, another writer holds the file, or it cannot be opened.

    :ivar path: the log file, as a :class:`~pathlib.Path`.
    :ivar seq: ``seq`` the next record will get.
    :ivar last_hash: ``hash`` of the last record (:data:`GENESIS` for an empty log).
    :ivar recovered_torn_bytes: bytes of torn tail removed at open (0 if none).
    :ivar signer: the :class:`~lbw_policy.signing.Signer`, or ``None``.
    """

    def __init__(self, path: PathLike, *, run: Optional[Mapping[str, Any]] = None,
                 fsync: bool = False, signer: Any = None, checkpoint_every: int = 100,
                 witness: Any = None) -> None:
        self.path = Path(path)
        self.fsync = bool(fsync)
        self.run: dict = sanitize(dict(run or {}))
        self.run_id = str(self.run.get("run_id", "run"))
        self.seq = 0
        self.last_hash = GENESIS
        self.recovered_torn_bytes = 0
        self._lock = threading.Lock()
        self._file: Any = None
        self.signer = self.witness = None
        if signer is not None:
            from lbw_policy.signing import load_signer, make_witness

            if type(checkpoint_every) is not int or checkpoint_every < 1:
                raise ValueError(f"checkpoint_every: expected an integer >= 1, found "
                                 f"{checkpoint_every!r}")
            self.signer, self.witness = load_signer(signer), make_witness(witness)
            self._dir_name = self.path.resolve().parent.name  # the statement's `dir`
        self.checkpoint_every = checkpoint_every
        self._since_checkpoint = 0  # records appended since the last checkpoint
        self._final_written = False  # the last record written is a final checkpoint
        self._last_step: Any = None
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            created = not self.path.exists()
            self._file = open(self.path, "a+b", buffering=0)  # O_APPEND: writes go to the end
        except OSError as exc:
            raise DecisionLogError(f"decision log {self.path}: cannot open for append: {exc}") from exc
        try:
            self._lock_file()
            self._resume()
            if created and self.fsync:
                _fsync_dir(self.path.parent)
        except BaseException:
            self._file.close()
            raise

    def _lock_file(self) -> None:
        if fcntl is None:  # pragma: no cover
            return
        try:
            fcntl.flock(self._file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            raise DecisionLogError(
                f"decision log {self.path}: another writer holds it ({exc}); give each process "
                "(rank) its own log file") from exc

    def _resume(self) -> None:
        scan = _scan(self.path, keep=False)
        if scan.bad_lines:
            line, why = scan.bad_lines[0]
            raise DecisionLogError(
                f"decision log {self.path}: line {line} is {why}; refusing to append to a damaged "
                f"chain (run `lbw-policy verify {self.path}` to see every problem, or start a new "
                "log file)")
        if scan.torn_tail:
            self._file.truncate(scan.torn_offset)
            if self.fsync:
                os.fsync(self._file.fileno())
            self.recovered_torn_bytes = scan.torn_bytes
        self._size = scan.torn_offset
        if not scan.records:
            return
        last = scan.records[-1]
        seq, stored = last.get("seq"), last.get("hash")
        if (last.get("schema") != SCHEMA or type(seq) is not int or not isinstance(stored, str)
                or _safe_hash(last) != stored):
            raise DecisionLogError(
                f"decision log {self.path}: last record (seq {seq!r}) is not a valid {SCHEMA} "
                f"record (schema {last.get('schema')!r}, hash check failed or fields missing); "
                "refusing to extend it (start a new log file)")
        self.seq, self.last_hash = seq + 1, stored
        if type(last.get("step")) is int:  # a checkpoint names the last step logged
            self._last_step = last["step"]

    @property
    def closed(self) -> bool:
        """``True`` once :meth:`close` has been called (or the log broke on a write error)."""
        return self._file is None or self._file.closed

    def append(self, record: Mapping[str, Any]) -> dict:
        """Sanitize, chain, write and flush one record; returns the full record as written.

        The line is encoded first and written in one ``write`` call, so a crash leaves at worst a
        torn last line, which the next open removes.

        :param record: the caller's fields (``step``, ``policy``, ``mode``, ``rule``, ``event``,
            ``signals``, ``actions``, ...). Values are passed through :func:`sanitize`.
        :returns: ``{"schema", "seq", "id", "time", "run", **record, "prev", "hash"}``.
        :raises ValueError: ``record`` contains a reserved key (:data:`RESERVED_KEYS`).
        :raises TypeError: ``record`` is not a mapping.
        :raises DecisionLogError: the log is closed, or the write failed (the file is rolled
            back to its previous end; if even that fails the log is closed).
        """
        if not isinstance(record, Mapping):
            raise TypeError(f"decision record must be a mapping, got {type(record).__name__}")
        body = sanitize(record)
        clash = [k for k in RESERVED_KEYS if k in body]
        if clash:
            raise ValueError(f"decision record contains reserved key(s) {clash}: the log sets "
                             f"{list(RESERVED_KEYS)} itself; rename those fields")
        with self._lock:
            if self.closed:
                raise DecisionLogError(f"decision log {self.path} is closed")
            full = self._write(body)
            self._final_written = False
            if type(body.get("step")) is int:  # a checkpoint names the last step logged
                self._last_step = body["step"]
            if self.signer is not None:
                self._since_checkpoint += 1
                if self._since_checkpoint >= self.checkpoint_every:
                    self._checkpoint(final=False)
            return full

    def _write(self, body: dict, time: Optional[str] = None) -> dict:
        """Chain, write and flush one record (the lock is held)."""
        seq = self.seq
        full = {"schema": SCHEMA, "seq": seq, "id": f"{self.run_id}.{seq}",
                "time": time or _utc_now(), "run": sanitize(self.run), **body,
                "prev": self.last_hash}
        full["hash"] = record_hash(full)
        data = canonical_json(full) + b"\n"
        try:
            view = memoryview(data)
            while view:  # one write normally; loop only on a partial write
                view = view[self._file.write(view):]
            if self.fsync:
                os.fsync(self._file.fileno())
        except OSError as exc:
            self._roll_back()
            raise DecisionLogError(
                f"decision log {self.path}: writing record seq {seq} failed: {exc}") from exc
        self._size += len(data)
        self.seq, self.last_hash = seq + 1, full["hash"]
        return full

    def checkpoint(self, final: bool = False) -> Optional[dict]:
        """Append a signed checkpoint record now (a signed log only; ``None`` otherwise).

        The record is ``{"event": "checkpoint", "step": <last step logged>, "checkpoint":
        <statement>, "signature": <base64>}``, chained like any other; the statement
        (:func:`lbw_policy.signing.statement`) names the run, this log's directory, the key
        fingerprint, ``count`` = the records before it and ``head`` = the last one's hash. The
        witness, if any, receives it after it is on disk.

        :raises DecisionLogError: the log is closed or the write failed.
        """
        with self._lock:
            if self.closed:
                raise DecisionLogError(f"decision log {self.path} is closed")
            return self._checkpoint(final) if self.signer is not None else None

    def _checkpoint(self, final: bool) -> dict:
        from lbw_policy.signing import statement

        now = _utc_now()
        stmt = statement(run_id=self.run_id, directory=self._dir_name,
                         key=self.signer.fingerprint, count=self.seq, head=self.last_hash,
                         time=now, final=final)
        signature = self.signer.sign(stmt)
        # every field of a checkpoint record follows from the statement and the record before
        # it, so the last record of a log (which no later signature covers) holds nothing
        # unsigned (CheckpointVerifier checks it)
        full = self._write({"step": self._last_step, "event": "checkpoint", "checkpoint": stmt,
                            "signature": signature}, time=now)
        self._since_checkpoint = 0
        self._final_written = final
        if self.witness:
            self.witness.report(stmt, signature)
        return full

    def _roll_back(self) -> None:
        try:
            self._file.truncate(self._size)
        except OSError:
            self._file.close()  # a half-written line stays; refuse further appends

    def close(self) -> None:
        """Write the final signed checkpoint (a signed log with records), flush and close the
        file (idempotent).

        :raises DecisionLogError: the final checkpoint could not be written (the file is
            closed all the same; the log then verifies as incomplete).
        """
        with self._lock:
            if self._file is not None and not self._file.closed:
                try:
                    if self.signer is not None and self.seq and not (
                            self._since_checkpoint == 0 and self._final_written):
                        self._checkpoint(final=True)
                    if self.fsync:
                        os.fsync(self._file.fileno())
                finally:
                    self._file.close()

    def __enter__(self) -> "DecisionLog":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else "open"
        return f"DecisionLog({str(self.path)!r}, seq={self.seq}, {state})"


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # pragma: no cover - e.g. Windows
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def _safe_hash(record: Mapping[str, Any]) -> Optional[str]:
    try:
        return record_hash(record)
    except (TypeError, ValueError):
        return None


@dataclass
class VerifyReport:
    """Outcome of :func:`verify_log`.

    :ivar ok: ``True`` iff :attr:`problems` is empty.
    :ivar records: complete lines in the log (damaged ones included; a torn last line excluded).
    :ivar head: ``hash`` of the last complete record (:data:`GENESIS` for an empty log).
    :ivar problems: what is wrong, each naming its line: ``"line 7: hash mismatch (record
        edited)"``.
    :ivar warnings: what is suspicious but not a broken chain (torn last line, no ``run_end``).
    :ivar path: the file verified.
    :ivar signed: ``True`` when the log's ``run_start`` names a signing key, ``False`` when it
        does not, ``None`` for a log without ``run_start``.
    :ivar signing: one line on what the signatures (or their absence) establish.
    """

    ok: bool
    records: int
    head: str
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    path: str = ""
    signed: Optional[bool] = None
    signing: str = ""

    def format(self) -> str:
        """Human-readable report: a verdict line, the signing status, then one line per
        problem and warning."""
        name = f"{self.path}: " if self.path else ""
        if self.ok:
            lines = [f"{name}OK: {self.records} records, chain intact, head {self.head}"]
        else:
            lines = [f"{name}FAILED: {len(self.problems)} problem(s) in {self.records} records"]
        if self.signing:
            lines.append(f"  {self.signing}")
        lines += [f"  problem: {p}" for p in self.problems]
        lines += [f"  warning: {w}" for w in self.warnings]
        return "\n".join(lines)


def verify_log(path: PathLike, *, expected_count: Optional[int] = None,
               expected_head: Optional[str] = None, public_key: Any = None,
               witness: Optional[PathLike] = None, run_id: Optional[str] = None,
               summary_error: Optional[str] = None) -> VerifyReport:
    """Check a decision log's hash chain line by line.

    Every complete line must be the canonical JSON of a ``lbw-policy/decision/v1`` record whose
    ``hash`` is :func:`record_hash` of it, whose ``seq`` is one more than the previous record's
    (0 first) and whose ``prev`` is the previous record's ``hash`` (:data:`GENESIS` first). So any
    edit, insertion, deletion or reordering inside the log is a problem. A last line without its
    ``\\n`` is a torn write from a crash: a warning, and the records before it still verify. A
    complete last line that does not parse is a problem (an edit, not a crash).

    Deleting records from the end leaves a valid chain; ``expected_count`` and ``expected_head``
    (as recorded in the run's ``summary.json``) catch that.

    A record whose commit failed is followed by an ``error`` record with ``not_applied``
    (:mod:`lbw_policy.governor`): its ``seq`` must name an earlier record of this log holding an
    action of that actuator, else it is a problem; such actions (decided and logged, not
    applied) are warnings, the first five one by one, then their count.

    The chain is unkeyed: an unsigned log that verifies was not damaged by accident nor edited
    naively, nothing more (:attr:`VerifyReport.signing` says so). With ``public_key``, the log
    must be signed by that key and end with a valid final checkpoint covering every record
    (:class:`lbw_policy.signing.CheckpointVerifier`: each failure is named by its line).

    :param path: the ``.jsonl`` file.
    :param expected_count: number of records the run wrote, or ``None`` to skip the check.
    :param expected_head: ``hash`` of the run's last record, or ``None`` to skip the check.
    :param public_key: an Ed25519 public key or its PEM file: check the signed checkpoints.
    :param witness: a witness file (:class:`lbw_policy.signing.Witness`): with
        ``public_key``, every head it saw for this run must be in the log.
    :param run_id: with ``public_key``, the run the log must belong to (default: the log was
        signed in a directory of the name it is in now).
    :param summary_error: why the run's ``summary.json`` could not be used: a problem for an
        unsigned log (its only anchor against records cut from the end), a warning with a key.
    :returns: a :class:`VerifyReport`.
    :raises OSError: the file cannot be read.
    :raises lbw_policy.safeio.NotRegularFileError: it is a FIFO, device or directory.
    :raises lbw_policy.signing.SigningKeyError: ``public_key`` cannot be loaded.
    """
    from lbw_policy.signing import CheckpointVerifier

    signed = CheckpointVerifier(public_key, run_id=run_id, witness=witness,
                                directory=Path(path).resolve().parent.name)
    problems: list[str] = []
    warnings: list[str] = []
    count, head, last = 0, GENESIS, None
    expect_seq: Optional[int] = 0
    expect_prev: Optional[str] = GENESIS  # None: previous line unreadable, skip the prev check
    torn = None
    acted: dict = {}  # seq -> actuators of that record's actions (for not_applied)
    not_applied = 0
    for lineno, _, raw in _lines(path):
        if not raw.endswith(b"\n"):
            if isinstance(raw, _Overlong):  # a crash tears one record, never 1 MiB of one
                count += 1
                problems.append(f"line {lineno}: {_parse_line(raw)[1]}, without a final "
                                "newline: not a record torn by a crash")
                break
            torn = (lineno, _size(raw))
            break
        count += 1
        rec, why = _parse_line(raw)
        if rec is not None:
            try:
                canonical = canonical_json(rec)
            except ValueError:
                rec, why = None, "not valid JSON (number out of range)"
        if rec is None:
            problems.append(f"line {lineno}: {why}")
            expect_prev = None
            expect_seq = None if expect_seq is None else expect_seq + 1
            continue
        if rec.get("event") != "checkpoint":  # a final checkpoint follows run_end
            last = rec
        signed.record(lineno, rec)
        stored = rec.get("hash")
        head = stored if isinstance(stored, str) else ""
        problems += [f"line {lineno}: {p}"
                     for p in _check_record(rec, raw[:-1] == canonical, expect_seq, expect_prev,
                                            lineno)]
        seq = rec.get("seq")
        found, failed = _check_not_applied(rec, acted)
        problems += [f"line {lineno}: {p}" for p in found]
        not_applied += len(failed)
        if not_applied <= _LISTED_NOT_APPLIED:
            warnings += [f"line {lineno}: {w}" for w in failed]
        expect_seq = seq + 1 if type(seq) is int else None
        expect_prev = stored if isinstance(stored, str) else None

    if not_applied > _LISTED_NOT_APPLIED:
        warnings.append(f"{not_applied - _LISTED_NOT_APPLIED} more actions were not applied "
                        "(`lbw-policy audit --event error` lists them)")
    if expected_count is not None and expected_count != count:
        cause = "records deleted from the end" if count < expected_count else \
            "records appended after the run ended"
        problems.append(f"log has {count} records, summary.json says {expected_count}: {cause}")
    if expected_head is not None and expected_head != head:
        problems.append(f"log head {head!r} does not match summary.json head {expected_head!r}: "
                        "the last record was changed, deleted or followed by others")
    if summary_error is not None:
        if signed.key is not None:
            warnings.append(f"summary.json not used ({summary_error}); the signatures cover "
                            "the log without it")
        else:
            problems.append(f"summary.json cannot be used ({summary_error}): it is this "
                            "unsigned log's only record of its length, so records cut from the "
                            "end cannot be detected")
    sign_problems, sign_warnings, status = signed.finish(count)
    problems += sign_problems
    warnings += sign_warnings
    if torn is not None:
        text = (f"torn last line ({torn[1]} bytes) at line {torn[0]}: the run was interrupted "
                "while writing")
        warnings.append(text + ("; the complete records before it verify" if not problems else ""))
    if count == 0:
        warnings.append("log is empty: no complete records")
    elif last is None or last.get("event") not in _END_EVENTS:
        warnings.append("no run_end record: the log may be truncated or the run still going")
    return VerifyReport(ok=not problems, records=count, head=head, problems=problems,
                        warnings=warnings, path=str(path), signed=signed.signed, signing=status)


def _check_not_applied(rec: dict, acted: dict) -> tuple[list[str], list[str]]:
    """Problems and warnings of a record's ``not_applied`` (a failed commit); remembers which
    actuators each record acted on (``acted``: seq -> names)."""
    seq = rec.get("seq")
    names = {a.get("actuator") for a in rec.get("actions") or () if isinstance(a, Mapping)} \
        if isinstance(rec.get("actions"), list) else set()
    if names and type(seq) is int:
        acted[seq] = names
    failed = rec.get("not_applied")
    if failed is None:
        return [], []
    action = failed.get("action") if isinstance(failed, Mapping) else None
    name = action.get("actuator") if isinstance(action, Mapping) else None
    of = failed.get("seq") if isinstance(failed, Mapping) else None
    if type(of) is not int or name not in acted.get(of, ()) or \
            (type(seq) is int and of >= seq):
        return [f"not_applied names record seq {of!r} and actuator {name!r}, which is not an "
                "earlier record of this log with that action (edited or spliced)"], []
    return [], [f"{name} action of record seq {of} ({failed.get('event')}, rule "
                f"{failed.get('rule')}) was not applied: its commit raised {rec.get('error')}"]


def _check_record(rec: dict, canonical: bool, expect_seq: Optional[int],
                  expect_prev: Optional[str], lineno: int) -> list[str]:
    """Problems of one parsed record (without the ``line N:`` prefix)."""
    if rec.get("schema") != SCHEMA:
        if "schema" not in rec:
            return ["schema missing (not a decision record)"]
        return [f"schema {rec['schema']!r} unknown (expected {SCHEMA!r})"]
    found: list[str] = []
    missing = [k for k in _REQUIRED if k not in rec]
    if missing:
        found.append(f"missing field(s) {missing}")
    stored = rec.get("hash")
    if "hash" in rec and stored != _safe_hash(rec):
        found.append("hash mismatch (record edited)")
    elif not canonical:
        found.append("not in canonical JSON form (line edited)")
    seq = rec.get("seq")
    if "seq" in rec and type(seq) is not int:
        found.append(f"seq {seq!r} is not an integer")
    elif expect_seq is not None and seq != expect_seq:
        found.append(f"seq {seq} expected {expect_seq} (record inserted or deleted)")
    prev = rec.get("prev")
    if lineno == 1:
        if prev != GENESIS:
            found.append("prev of the first record is not GENESIS (records deleted from the "
                         "start, or the log was spliced)")
    elif expect_prev is not None and prev != expect_prev:
        found.append(f"prev does not match hash of line {lineno - 1} "
                     "(record deleted or reordered)")
    return found


def read_summary_anchor(path: PathLike) -> tuple:
    """``(records, head)`` from a run's ``summary.json`` (``{"log": {"records": int, "head":
    str}}``), read through :func:`lbw_policy.safeio.read_bytes` (at most
    :data:`lbw_policy.safeio.MAX_SUMMARY_BYTES`).

    :raises FileNotFoundError: there is no such file.
    :raises ValueError: it is not a regular file, too large, not JSON, or lacks those fields
        (the message says which; at most 80 characters of the content are quoted).
    """
    from .safeio import MAX_SUMMARY_BYTES, read_bytes

    raw = read_bytes(path, MAX_SUMMARY_BYTES, "summary file")
    try:
        data = json.loads(raw.decode("utf-8"), parse_constant=_reject_constant)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f"not valid JSON: {str(exc)[:80]}") from None
    except RecursionError:
        raise ValueError("not a summary: JSON nested too deep") from None
    log = data.get("log") if isinstance(data, dict) else None
    if not (isinstance(log, dict) and type(log.get("records")) is int
            and isinstance(log.get("head"), str)):
        raise ValueError("expected {\"log\": {\"records\": int, \"head\": str}}, found "
                         f"{raw[:80].decode('utf-8', 'replace')!r}")
    return log["records"], log["head"]
