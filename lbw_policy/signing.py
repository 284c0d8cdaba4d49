"""Signed checkpoints of the decision log (Ed25519, from the ``cryptography`` package).

The hash chain of :mod:`lbw_policy.decision_log` is unkeyed: anyone who can write the run
directory can rewrite the log and recompute every hash. A signed log adds what the transparency
logs do (RFC 6962 / RFC 9162 "signed tree heads", Sigstore's checkpoints): every
``checkpoint_every`` records, and when the writer closes the log, the writer appends a
**checkpoint** record, an ordinary chained record whose ``checkpoint`` field is the signed
statement

.. code-block:: json

    {"schema": "lbw-policy/checkpoint/v1", "run_id": "...", "dir": "<run directory name>",
     "key": "ed25519:<sha256 of the raw public key, hex>", "count": 200,
     "head": "<hash of record 199>", "time": "2026-...Z", "final": false}

and whose ``signature`` field is the base64 Ed25519 signature of that statement's canonical JSON
(:func:`~lbw_policy.decision_log.canonical_json`). ``count`` records come before the checkpoint
and ``head`` is the hash of the last of them, so one valid signature vouches for every record
before it (each hash covers the previous one). ``final: true`` marks the checkpoint written at
close: a signed log whose last record is not a valid final checkpoint is incomplete.

A **witness** receives each signed checkpoint as it is written, somewhere the run directory's
writers cannot reach (another file, stdout, a logger, a callable that posts it elsewhere). With
it, ``verify`` also detects records cut from the end after the last checkpoint the witness saw,
and a log rewritten later by someone holding the private key.

Keys: PEM files, PKCS#8 private key (written mode 0600) and SubjectPublicKeyInfo public key
(:func:`generate_keypair`, ``lbw-policy keygen``).
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import warnings
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Optional, Union

from lbw_policy.decision_log import canonical_json
from lbw_policy.safeio import InputError, iter_lines, read_bytes

__all__ = ["CHECKPOINT_SCHEMA", "WITNESS_SCHEMA", "MAX_KEY_BYTES", "MAX_WITNESS_LINE",
           "SigningKeyError", "Signer", "generate_keypair", "load_signer", "load_public_key",
           "fingerprint", "verify_signature", "Witness", "read_witness", "statement",
           "make_witness", "SIGN_KEY_ENV"]

#: ``schema`` of a signed checkpoint statement.
CHECKPOINT_SCHEMA = "lbw-policy/checkpoint/v1"
#: ``schema`` of a witness line.
WITNESS_SCHEMA = "lbw-policy/witness/v1"
#: Largest key file read (a PEM Ed25519 key is about 120 bytes).
MAX_KEY_BYTES = 64 << 10
#: Longest witness line read (one is about 500 bytes).
MAX_WITNESS_LINE = 64 << 10
#: Environment variable naming the private key file, read by :class:`~lbw_policy.Guard` when
#: its ``sign_key`` is not given.
SIGN_KEY_ENV = "LBW_POLICY_SIGN_KEY"

PathLike = Union[str, "os.PathLike[str]"]


class SigningKeyError(ValueError):
    """A key file cannot be used: not found, not PEM, not Ed25519, or the wrong kind of key."""


def _crypto():
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    return serialization, ed25519


def fingerprint(public_key: Any) -> str:
    """``"ed25519:" + sha256(raw 32-byte public key).hexdigest()``.

    :param public_key: an ``Ed25519PublicKey``.
    """
    serialization, _ = _crypto()
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return "ed25519:" + hashlib.sha256(raw).hexdigest()


class Signer:
    """An Ed25519 private key that signs checkpoint statements.

    :param private_key: an ``Ed25519PrivateKey``.
    :ivar fingerprint: :func:`fingerprint` of its public key.
    """

    algorithm = "ed25519"

    def __init__(self, private_key: Any) -> None:
        _, ed25519 = _crypto()
        if not isinstance(private_key, ed25519.Ed25519PrivateKey):
            raise SigningKeyError(f"expected an Ed25519 private key, found "
                                  f"{type(private_key).__name__}")
        self._key = private_key
        self.public_key = private_key.public_key()
        self.fingerprint = fingerprint(self.public_key)

    def sign(self, statement: Mapping[str, Any]) -> str:
        """Base64 (standard alphabet) Ed25519 signature of ``canonical_json(statement)``."""
        return base64.b64encode(self._key.sign(canonical_json(statement))).decode("ascii")

    def __repr__(self) -> str:
        return f"Signer({self.fingerprint})"


def verify_signature(public_key: Any, statement: Any, signature: Any) -> bool:
    """``True`` iff ``signature`` (base64) is ``public_key``'s signature of ``statement``.
    Anything malformed (not a mapping, not base64, non-JSON values) is ``False``, never raised."""
    from cryptography.exceptions import InvalidSignature

    if not isinstance(statement, Mapping) or not isinstance(signature, str):
        return False
    try:
        raw = base64.b64decode(signature.encode("ascii"), validate=True)
        public_key.verify(raw, canonical_json(statement))
    except (InvalidSignature, ValueError, TypeError, UnicodeEncodeError):
        return False
    return True


def generate_keypair(directory: PathLike, name: str = "lbw-policy") -> tuple:
    """Write a new Ed25519 key pair: ``DIR/NAME.key`` (PKCS#8 PEM, mode 0600) and
    ``DIR/NAME.pub`` (SubjectPublicKeyInfo PEM). Existing files are never overwritten.

    :returns: ``(key_path, pub_path, fingerprint)``.
    :raises FileExistsError: either file exists.
    :raises SigningKeyError: ``name`` is empty or contains a path separator.
    """
    serialization, ed25519 = _crypto()
    if not name or "/" in name or os.sep in name or name in (".", ".."):
        raise SigningKeyError(f"key name {name!r}: expected a plain file name without '/'")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    key_path, pub_path = directory / f"{name}.key", directory / f"{name}.pub"
    for p in (key_path, pub_path):
        if p.exists():
            raise FileExistsError(f"{p} exists: refusing to overwrite a key (choose another "
                                  "--name or directory)")
    key = ed25519.Ed25519PrivateKey.generate()
    private_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
    public_pem = key.public_key().public_bytes(serialization.Encoding.PEM,
                                               serialization.PublicFormat.SubjectPublicKeyInfo)
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(private_pem)
    os.chmod(key_path, 0o600)  # in case the umask made it stricter, it stays exactly 0600
    fd = os.open(pub_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    with os.fdopen(fd, "wb") as fh:
        fh.write(public_pem)
    return key_path, pub_path, fingerprint(key.public_key())


def _read_key(path: PathLike, what: str) -> bytes:
    try:
        return read_bytes(path, MAX_KEY_BYTES, what)
    except FileNotFoundError:
        raise SigningKeyError(f"{what} {str(path)!r} not found (create a key pair with "
                              "`lbw-policy keygen DIR`)") from None
    except InputError as exc:
        raise SigningKeyError(str(exc)) from None
    except OSError as exc:
        raise SigningKeyError(f"{what} {str(path)!r}: {exc.strerror or exc}") from None


def load_signer(source: Any) -> Signer:
    """A :class:`Signer` from a private key file (PEM, PKCS#8, unencrypted), an
    ``Ed25519PrivateKey``, or a :class:`Signer` (returned as is).

    :raises SigningKeyError: the file is missing, unreadable, not a PEM private key, or not
        Ed25519 (a public key given by mistake is named as such).
    """
    if isinstance(source, Signer):
        return source
    serialization, ed25519 = _crypto()
    if isinstance(source, ed25519.Ed25519PrivateKey):
        return Signer(source)
    if not isinstance(source, (str, os.PathLike)):
        raise SigningKeyError(f"sign_key: expected a key file path or an Ed25519PrivateKey, "
                              f"found {type(source).__name__}")
    data = _read_key(source, "private key file")
    if b"PUBLIC KEY" in data and b"PRIVATE KEY" not in data:
        raise SigningKeyError(f"{str(source)!r} is a public key; signing needs the private key "
                              "(NAME.key, not NAME.pub)")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise SigningKeyError(f"private key file {str(source)!r} is not an unencrypted PEM "
                              f"private key: {exc}") from None
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise SigningKeyError(f"private key file {str(source)!r} holds a "
                              f"{type(key).__name__}; lbw-policy signs with Ed25519 keys "
                              "(`lbw-policy keygen`)")
    return Signer(key)


def load_public_key(source: Any) -> Any:
    """An ``Ed25519PublicKey`` from a PEM file (SubjectPublicKeyInfo), or passed through.

    :raises SigningKeyError: the file is missing, unreadable, not PEM, not Ed25519, or a
        private key (give the ``.pub`` file).
    """
    serialization, ed25519 = _crypto()
    if isinstance(source, ed25519.Ed25519PublicKey):
        return source
    data = _read_key(source, "public key file")
    if b"PRIVATE KEY" in data:
        raise SigningKeyError(f"{str(source)!r} is a private key; verify with the public key "
                              "(NAME.pub) and keep the private key with the training job")
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError) as exc:
        raise SigningKeyError(f"public key file {str(source)!r} is not a PEM public key: "
                              f"{exc}") from None
    if not isinstance(key, ed25519.Ed25519PublicKey):
        raise SigningKeyError(f"public key file {str(source)!r} holds a {type(key).__name__}, "
                              "not an Ed25519 key")
    return key


class Witness:
    """Where signed checkpoints are reported besides the log: a file path (one JSON line
    appended per checkpoint, flushed), a ``logging.Logger`` (``INFO``, the JSON line), a
    callable (called with the witness entry, a dict), or a list of these.

    A witness that fails (disk full, a callable that raises) does not stop training: it is
    warned about once and the checkpoint stays in the log. Targets are called after the
    checkpoint is on disk, while the log's lock is held: a callable that talks to a network
    should queue the entry and return.

    Entry: ``{"schema": WITNESS_SCHEMA, "checkpoint": <signed statement>, "signature": str}``.
    """

    def __init__(self, targets: Any) -> None:
        if targets is None:
            targets = []
        elif isinstance(targets, (str, os.PathLike, logging.Logger)) or callable(targets):
            targets = [targets]
        self.targets = []
        for t in targets:
            if isinstance(t, (str, os.PathLike)):
                self.targets.append(Path(t))
            elif isinstance(t, logging.Logger) or callable(t):
                self.targets.append(t)
            else:
                raise TypeError(f"witness: expected a file path, a logging.Logger or a "
                                f"callable, found {type(t).__name__}")
        self._warned = False

    def __bool__(self) -> bool:
        return bool(self.targets)

    def report(self, statement: Mapping[str, Any], signature: str) -> None:
        """Send one signed checkpoint to every target."""
        entry = {"schema": WITNESS_SCHEMA, "checkpoint": dict(statement), "signature": signature}
        line = json.dumps(entry, sort_keys=True, separators=(",", ":"))
        for t in self.targets:
            try:
                if isinstance(t, Path):
                    with open(t, "a", encoding="utf-8") as fh:
                        fh.write(line + "\n")
                elif isinstance(t, logging.Logger):
                    t.info("%s", line)
                else:
                    t(entry)
            except Exception as exc:  # noqa: BLE001 - the witness must not stop training
                if not self._warned:
                    self._warned = True
                    warnings.warn(f"witness {t!r} failed ({type(exc).__name__}: {exc}); the "
                                  "checkpoints stay in the decision log", stacklevel=3)


def read_witness(path: PathLike) -> Iterator[tuple]:
    """Stream a witness file: ``(line, entry)`` for each line that is a witness entry, and
    ``(line, None)`` for a damaged or foreign line (lines longer than
    :data:`MAX_WITNESS_LINE` included).

    :raises FileNotFoundError, NotRegularFileError, OSError: as
        :func:`lbw_policy.safeio.open_regular`.
    """
    for ln in iter_lines(path, MAX_WITNESS_LINE, "witness file"):
        if ln.raw is None:
            yield ln.lineno, None
            continue
        try:
            entry = json.loads(ln.raw.decode("utf-8"))
        except (ValueError, UnicodeDecodeError, RecursionError):  # nested too deep: damaged
            yield ln.lineno, None
            continue
        if (isinstance(entry, dict) and entry.get("schema") == WITNESS_SCHEMA
                and isinstance(entry.get("checkpoint"), dict)):
            yield ln.lineno, entry
        else:
            yield ln.lineno, None


def statement(*, run_id: str, directory: str, key: str, count: int, head: str, time: str,
              final: bool) -> dict:
    """The checkpoint statement that is signed (see the module docstring)."""
    return {"schema": CHECKPOINT_SCHEMA, "run_id": run_id, "dir": directory, "key": key,
            "count": count, "head": head, "time": time, "final": bool(final)}


def witness_heads(entries: Iterable[tuple], run_ids: Iterable[Any], dirs: Iterable[Any] = (),
                  key: Optional[str] = None) -> list:
    """``[(line, statement, signature)]`` of the witness entries of this log: those of one of
    its ``run_ids``, and those signed by ``key`` in one of its run directories ``dirs`` (a
    resumed session under another run id, whose records may have been cut from the log)."""
    run_ids, dirs = set(run_ids), set(dirs)
    return [(line, e["checkpoint"], e.get("signature")) for line, e in entries
            if e is not None and (e["checkpoint"].get("run_id") in run_ids
                                  or (key is not None and e["checkpoint"].get("key") == key
                                      and e["checkpoint"].get("dir") in dirs))]


def make_witness(witness: Any) -> Optional[Witness]:
    """``None`` -> ``None``; a :class:`Witness` as is; anything else wrapped."""
    if witness is None or isinstance(witness, Witness):
        return witness
    return Witness(witness)



_STATEMENT_KEYS = ("schema", "run_id", "dir", "key", "count", "head", "time", "final")
#: The fields of a checkpoint record: nothing else, so that even the last one holds nothing
#: unsigned (its other fields follow from the statement and the record before it).
_CHECKPOINT_RECORD_KEYS = frozenset(("schema", "seq", "id", "time", "run", "step", "event",
                                     "checkpoint", "signature", "prev", "hash"))
_UNSIGNED = ("unsigned log: its hash chain detects accidental damage and naive edits only; "
             "anyone who can write the run directory can rewrite, cut or extend it (and its "
             "summary.json) undetected. Sign runs with a key (lbw-policy keygen; run "
             "--sign-key) and verify with --public-key (docs/decision-log.md, Threat model)")


class CheckpointVerifier:
    """The signature half of :func:`lbw_policy.decision_log.verify_log`, fed one parsed
    record at a time (streaming), then :meth:`finish`.

    Without ``public_key`` it only reports whether the log is signed. With it, the log must
    have been signed by that key (``run_start``'s ``signing.key``), every checkpoint must be
    valid (schema, key, signature, ``count``/``head`` equal to its place in the chain, the
    log's run id, the expected run identity), and the last valid checkpoint must be ``final``
    with nothing after it. Each problem names its line and what it means.

    :param public_key: an ``Ed25519PublicKey`` or a PEM file, or ``None``.
    :param run_id: the run the log must belong to; ``None``: the checkpoints' ``dir`` must be
        ``directory``.
    :param witness: a witness file to hold the log against, or ``None``.
    :param directory: the name of the directory the log is in now.
    """

    def __init__(self, public_key: Any = None, *, run_id: Optional[str] = None,
                 witness: Optional[PathLike] = None, directory: str = "") -> None:
        self.key = load_public_key(public_key) if public_key is not None else None
        self.key_fp = fingerprint(self.key) if self.key is not None else None
        self.expected_run_id, self.witness, self.directory = run_id, witness, directory
        self.signed: Optional[bool] = None
        self.log_key: Optional[str] = None
        self.log_run_id: Any = None
        self.run_ids: set = set()  # every run_start's run id (a resumed log may hold several)
        self.dirs: set = set()  # the run directory names its valid checkpoints were signed in
        self.checkpoints = 0
        self.valid = 0
        self.last_good: Optional[tuple] = None  # (line, count, final)
        self.tail_first: Optional[int] = None  # first line not covered by last_good
        self.tail_last = 0
        self.tail_records = 0
        self.after_final_event: Any = None  # event of the first record after a final checkpoint
        self.heads: dict = {}  # count -> head of each valid checkpoint
        self.problems: list = []
        self._identity_reported = False
        self._first = True
        self._current_run: Any = None  # run id of the latest run_start
        self._spliced = False
        self._prev_run: Any = None  # `run` labels of the previous record
        self._last_step: Any = None  # the last integer `step` seen

    def record(self, lineno: int, rec: dict) -> None:
        """Take the next parsed record (lines that do not parse are the chain's problems)."""
        run = rec.get("run")
        run_id = run.get("run_id") if isinstance(run, dict) else None
        event = rec.get("event")
        if self._first:
            self._first = False
            self.log_run_id = run_id
        if event == "run_start":
            self._current_run = run_id
            if isinstance(run_id, str):
                self.run_ids.add(run_id)
        elif run_id != self._current_run and self.key is not None and not self._spliced:
            self._spliced = True
            self.problems.append(f"line {lineno}: a record of run {run_id!r} in run "
                                 f"{self._current_run!r} (spliced in from another run's log)")
        if event == "run_start":
            sig = rec.get("signing")
            key = sig.get("key") if isinstance(sig, dict) else None
            if self.signed is None:
                self.signed, self.log_key = key is not None, key
            elif self.signed and key != self.log_key and self.key is not None:
                self.problems.append(f"line {lineno}: this run_start names signing key "
                                     f"{key!r}, the log's first one {self.log_key!r} (another "
                                     "run's records spliced in, or signing switched off)")
        try:
            if event == "checkpoint" and rec.get("schema") is not None:
                self.checkpoints += 1
                if self.key is not None and self.log_key == self.key_fp:
                    self._checkpoint(lineno, rec)
                    return
            self._uncovered(lineno, event)
        finally:
            self._prev_run = run
            if type(rec.get("step")) is int:
                self._last_step = rec["step"]

    def _uncovered(self, lineno: int, event: Any) -> None:
        if self.key is not None:
            if self.tail_first is None:
                self.tail_first = lineno
                final = self.last_good is not None and self.last_good[2]
                self.after_final_event = event if final else None
            self.tail_last = lineno
            self.tail_records += 1

    def _checkpoint(self, lineno: int, rec: dict) -> None:
        stmt, signature = rec.get("checkpoint"), rec.get("signature")
        since = f"line {self.last_good[0] + 1}" if self.last_good else "line 1"
        where = f"line {lineno} (checkpoint, seq {rec.get('seq')!r})"
        bad = None
        if not isinstance(stmt, dict) or any(k not in stmt for k in _STATEMENT_KEYS) \
                or stmt.get("schema") != CHECKPOINT_SCHEMA:
            bad = f"{where}: malformed checkpoint statement (edited or forged)"
        elif stmt["key"] != self.key_fp:
            bad = (f"{where}: signed statement names key {stmt['key']!r}, not the given key "
                   f"{self.key_fp!r} (forged or spliced in)")
        elif not verify_signature(self.key, stmt, signature):
            bad = (f"{where}: signature invalid: the checkpoint was forged or edited after "
                   "signing")
        elif stmt["count"] != rec.get("seq") or stmt["head"] != rec.get("prev"):
            bad = (f"{where}: the key signed a head of {stmt['count']!r} records "
                   f"({str(stmt['head'])[:16]}...), but {rec.get('seq')!r} records with head "
                   f"{str(rec.get('prev'))[:16]}... come before it: records from {since} to "
                   f"line {lineno - 1} were rewritten, deleted or inserted and the chain "
                   "rebuilt (or this checkpoint was moved)")
        elif stmt["run_id"] != self._current_run:
            bad = (f"{where}: signed for run {stmt['run_id']!r}, but it sits in run "
                   f"{self._current_run!r}: spliced in from another run's log")
        elif (set(rec) != _CHECKPOINT_RECORD_KEYS or rec.get("run") != self._prev_run
              or rec.get("step") != self._last_step or rec.get("time") != stmt["time"]
              or rec.get("id") != f"{stmt['run_id']}.{rec.get('seq')}"):
            extra = sorted(set(rec) - _CHECKPOINT_RECORD_KEYS)
            bad = (f"{where}: the record around the signed statement was edited (its fields "
                   "must follow from the statement and the record before it"
                   + (f"; unsigned extra fields {extra}" if extra else "") + ")")
        if bad is None and not self._identity_reported:
            if self.expected_run_id is not None and stmt["run_id"] != self.expected_run_id:
                bad = (f"{where}: log swap: this log was signed for run {stmt['run_id']!r}, "
                       f"the run expected is {self.expected_run_id!r}")
            elif self.expected_run_id is None and stmt["dir"] != self.directory:
                bad = (f"{where}: log swap: this log was signed in a run directory named "
                       f"{stmt['dir']!r} (run {stmt['run_id']!r}) and lies in "
                       f"{self.directory!r}: another run's log was put here, or the directory "
                       "was renamed (then check the run's identity with --run-id RUN_ID)")
            self._identity_reported = bad is not None
        if bad is not None:
            self.problems.append(bad)
            if self.tail_first is None:
                self.tail_first = lineno
            self.tail_last = lineno
            self.tail_records += 1
            return
        self.valid += 1
        self.dirs.add(stmt["dir"])
        self.last_good = (lineno, stmt["count"], bool(stmt["final"]))
        self.heads[stmt["count"]] = (stmt["head"], lineno)
        self.tail_first, self.tail_records, self.after_final_event = None, 0, None

    def finish(self, count: int) -> tuple:
        """``(problems, warnings, status line)`` once every record was fed."""
        warnings: list = []
        if count == 0 or self.signed is None:
            if self.key is not None and count:
                self.problems.append("no run_start record: cannot tell which key signed this "
                                     "log (not a log a guard wrote, or its start was cut off)")
            return self.problems, warnings, "" if not count else _UNSIGNED
        if self.key is None:
            if not self.signed:
                return self.problems, warnings, _UNSIGNED
            return self.problems, warnings, (
                f"signed log (key {self.log_key}, {self.checkpoints} checkpoint(s)); "
                "signatures NOT checked: pass --public-key FILE to check them")
        if not self.signed:
            self.problems.append(
                "the log is unsigned (its run_start names no signing key), but a public key "
                "was given: the run was not signed, or its signing was stripped by rewriting "
                "the whole log")
            return self.problems, warnings, _UNSIGNED
        if self.log_key != self.key_fp:
            self.problems.append(
                f"the log is signed by key {self.log_key}, not by the given key {self.key_fp}: "
                "refusing it (verify with that run's public key, or the log is not the one "
                "you expect)")
            return self.problems, warnings, f"signed by another key ({self.log_key})"
        self._tail()
        self._witness(warnings)
        covered = self.last_good[1] if self.last_good else 0
        status = (f"signed by {self.key_fp}: {self.valid} of {self.checkpoints} checkpoint(s) "
                  f"valid; the last valid one covers {covered} of {count} records")
        if not self.problems:
            status = (f"signed by {self.key_fp}: {self.valid} checkpoint(s) valid, the final one "
                      f"covers all {covered} records before it")
        return self.problems, warnings, status

    def _tail(self) -> None:
        if self.last_good is None:
            self.problems.append("no valid signed checkpoint: no record of this log is covered "
                                 "by a signature of the given key")
            return
        line, covered, final = self.last_good
        if self.tail_records:
            lines = f"lines {self.tail_first}..{self.tail_last} ({self.tail_records} record(s))"
            if final and self.after_final_event != "run_start":
                cause = ("they were appended after the run closed its log with its final "
                         "checkpoint: forged or added later, whatever summary.json says")
            else:
                cause = ("the run was killed before it closed its log, or records were cut "
                         "from the end and others appended; a witness file (--witness) tells "
                         "a crash from a truncation")
            self.problems.append(f"{lines} after the last valid checkpoint (line {line}, "
                                 f"{covered} records) are not covered by any signature: {cause}")
        elif not final:
            self.problems.append(
                f"the log ends at line {line} with a checkpoint that is not final: the run was "
                f"killed right after it, or the records after it were cut off (tail "
                f"truncation; the first {covered} records are intact). Without a witness a "
                "crash and a truncation look the same; a witness file (--witness) tells which")

    def _witness(self, warnings: list) -> None:
        if self.witness is None:
            return
        covered = self.last_good[1] if self.last_good else 0
        seen = witness_heads(read_witness(self.witness), self.run_ids or {self.log_run_id},
                             self.dirs or {self.directory}, self.key_fp)
        if not seen:
            warnings.append(f"the witness file {str(self.witness)!r} has no checkpoint of run "
                            f"{self.log_run_id!r}: it is not this run's witness, or the witness "
                            "was lost")
            return
        for wline, stmt, signature in seen:
            where = f"witness line {wline}"
            if stmt.get("key") != self.key_fp or not verify_signature(self.key, stmt, signature):
                self.problems.append(f"{where}: not a valid signature of the given key "
                                     "(the witness file was edited)")
                continue
            n, head = stmt.get("count"), stmt.get("head")
            if n in self.heads:
                if self.heads[n][0] != head:
                    self.problems.append(
                        f"{where}: the witness saw a signed head of {n} records "
                        f"({str(head)[:16]}...); the log's checkpoint at line "
                        f"{self.heads[n][1]} signs another ({self.heads[n][0][:16]}...): the "
                        "log was rewritten and re-signed after the witness saw it (someone "
                        "holding the private key)")
            elif isinstance(n, int) and n > covered:
                self.problems.append(
                    f"{where}: tail truncated: the witness saw a signed checkpoint of {n} "
                    f"records{' (final)' if stmt.get('final') else ''}, the log's last valid "
                    f"checkpoint covers {covered}: records were cut from the end")
            else:
                self.problems.append(
                    f"{where}: the witness saw a signed checkpoint of {n!r} records that the "
                    "log does not hold: the log was rewritten (someone holding the private key)")
