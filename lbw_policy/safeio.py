"""Bounded reads of files a user or an attacker may hand us: regular files only, up to a limit.

Every file the CLI and the loaders read (policies, policy tests, decision logs, telemetry,
``summary.json``, keys, witness files) goes through :func:`read_bytes` or :func:`iter_lines`:

* the file is opened with ``O_NONBLOCK`` and checked with ``os.fstat`` *before* any read, so a
  FIFO, a character device (``/dev/zero``, a terminal) or a socket is refused at once instead of
  blocking or streaming forever (:class:`NotRegularFileError`);
* a whole-file read stops at ``limit`` bytes (:class:`InputTooLargeError`, naming the limit);
* a line reader holds at most ``max_line`` bytes of one line in memory; a longer line is
  reported (its length counted while it is skipped), never loaded.

Limits used by lbw-policy (bytes; each module names its own constant):

==========================  ============  ===============================================
file                        limit         where
==========================  ============  ===============================================
policy file                 4 MiB         :data:`lbw_policy.yamlsource.MAX_BYTES`
policy test file            4 MiB         :data:`lbw_policy.policytest.MAX_TEST_BYTES`
decision log, one line      1 MiB         :data:`lbw_policy.decision_log.MAX_LINE_BYTES`
telemetry, one line         1 MiB         :data:`lbw_policy.telemetry_log.MAX_LINE_BYTES`
``summary.json``            1 MiB         :data:`MAX_SUMMARY_BYTES`
key file (PEM)              64 KiB        :data:`lbw_policy.signing.MAX_KEY_BYTES`
witness file, one line      64 KiB        :data:`lbw_policy.signing.MAX_WITNESS_LINE`
==========================  ============  ===============================================

Decision logs and telemetry have no whole-file limit: they are streamed line by line, so their
memory is bounded by the line limit and their time by the file's size on disk.
"""

from __future__ import annotations

import os
import stat
from typing import IO, Iterator, NamedTuple, Optional, Union

__all__ = ["InputError", "NotRegularFileError", "InputTooLargeError", "open_regular",
           "read_bytes", "iter_lines", "Line", "MAX_SUMMARY_BYTES", "human_bytes"]

#: Largest ``summary.json`` read.
MAX_SUMMARY_BYTES = 1 << 20

PathLike = Union[str, "os.PathLike[str]"]
_CHUNK = 1 << 16


class InputError(ValueError):
    """A file cannot be read safely. :ivar path: the file, as given."""

    def __init__(self, message: str, path: PathLike) -> None:
        super().__init__(message)
        self.path = str(path)


class NotRegularFileError(InputError):
    """The path is a FIFO, a device, a socket or a directory, not a regular file."""


class InputTooLargeError(InputError):
    """The file (or one line of it) is larger than the limit. :ivar limit: bytes allowed."""

    def __init__(self, message: str, path: PathLike, limit: int) -> None:
        super().__init__(message, path)
        self.limit = limit


def human_bytes(n: int) -> str:
    """``4194304`` -> ``"4 MiB"``; exact binary units, else bytes."""
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift and n % (1 << shift) == 0:
            return f"{n >> shift} {unit}"
    return f"{n} bytes"


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a regular file"


def open_regular(path: PathLike, what: str = "file") -> IO[bytes]:
    """Open ``path`` for binary reading if, and only if, it is a regular file.

    Opens with ``O_NONBLOCK`` (opening a FIFO without a writer does not wait), checks
    ``os.fstat`` on the open descriptor (no race with a swapped path), then returns an ordinary
    buffered file object.

    :param what: what the file is, for messages (``"policy file"``).
    :raises FileNotFoundError: it does not exist.
    :raises NotRegularFileError: it is a directory, FIFO, device or socket.
    :raises OSError: it cannot be opened (permissions, ...).
    """
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0) \
        | getattr(os, "O_CLOEXEC", 0)
    fd = os.open(os.fspath(path), flags)
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise NotRegularFileError(f"{what} {str(path)!r} is {_kind(mode)}, not a regular "
                                      "file: refusing to read it", path)
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_bytes(path: PathLike, limit: int, what: str = "file") -> bytes:
    """The whole content of a regular file of at most ``limit`` bytes.

    :raises InputTooLargeError: the file is larger than ``limit`` (checked on ``st_size`` before
        reading and again while reading, for a file that grows).
    :raises FileNotFoundError, NotRegularFileError, OSError: as :func:`open_regular`.
    """
    with open_regular(path, what) as fh:
        size = os.fstat(fh.fileno()).st_size
        if size > limit:
            raise _too_large(path, what, limit, size)
        data = fh.read(limit + 1)
    if len(data) > limit:
        raise _too_large(path, what, limit, None)
    return data


def _too_large(path: PathLike, what: str, limit: int, size: Optional[int]) -> InputTooLargeError:
    found = f"{size} bytes" if size is not None else f"more than {limit} bytes"
    return InputTooLargeError(f"{what} {str(path)!r} is too large: {found}, the limit is "
                              f"{human_bytes(limit)}", path, limit)


class Line(NamedTuple):
    """One line of :func:`iter_lines`.

    :ivar lineno: 1-based line number.
    :ivar offset: byte offset of its first byte.
    :ivar raw: its bytes including the ``\\n`` (the last line may lack it), or ``None`` when it
        is longer than ``max_line`` (it was skipped, not loaded).
    :ivar size: its length in bytes, ``\\n`` included.
    :ivar newline: it ends with ``\\n``.
    """

    lineno: int
    offset: int
    raw: Optional[bytes]
    size: int
    newline: bool


def iter_lines(path: PathLike, max_line: int, what: str = "file") -> Iterator[Line]:
    """Stream the lines of a regular file, holding at most ``max_line`` bytes of one line.

    :raises FileNotFoundError, NotRegularFileError, OSError: as :func:`open_regular`.
    """
    with open_regular(path, what) as fh:
        yield from _lines_of(fh, max_line)


def _lines_of(fh: IO[bytes], max_line: int) -> Iterator[Line]:
    offset, lineno = 0, 0
    while True:
        raw = fh.readline(max_line + 1)
        if not raw:
            return
        lineno += 1
        if len(raw) <= max_line or raw.endswith(b"\n"):
            yield Line(lineno, offset, raw, len(raw), raw.endswith(b"\n"))
            offset += len(raw)
            continue
        size, newline = len(raw), False  # too long: count the rest without keeping it
        while True:
            chunk = fh.readline(_CHUNK)
            size += len(chunk)
            if not chunk or chunk.endswith(b"\n"):
                newline = chunk.endswith(b"\n")
                break
        yield Line(lineno, offset, None, size, newline)
        offset += size
