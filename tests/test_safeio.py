"""lbw_policy.safeio and the bounded YAML reader (issue 17)."""

from __future__ import annotations

import os

import pytest

from lbw_policy.errors import PolicySchemaError, PolicySyntaxError
from lbw_policy.policy import loads_policy
from lbw_policy.safeio import (InputTooLargeError, NotRegularFileError, iter_lines, read_bytes)
from lbw_policy.yamlsource import MAX_NODES, MAX_QUOTE


def test_read_bytes_names_the_limit(tmp_path):
    path = tmp_path / "f"
    path.write_bytes(b"x" * 11)
    assert read_bytes(path, 11, "thing") == b"x" * 11
    with pytest.raises(InputTooLargeError, match=r"thing '.*f' is too large: 11 bytes, the "
                                                 r"limit is 10 bytes") as info:
        read_bytes(path, 10, "thing")
    assert info.value.limit == 10
    with pytest.raises(InputTooLargeError, match="the limit is 1 KiB"):
        path.write_bytes(b"x" * 1025)
        read_bytes(path, 1024, "thing")


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs POSIX FIFOs")
def test_a_fifo_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)  # no writer: an ordinary open() would block forever
    with pytest.raises(NotRegularFileError, match="is a FIFO \\(named pipe\\), not a regular file"):
        read_bytes(fifo, 10, "policy file")
    with pytest.raises(NotRegularFileError, match="is a directory"):
        read_bytes(tmp_path, 10, "policy file")
    if os.path.exists("/dev/zero"):
        with pytest.raises(NotRegularFileError, match="is a character device"):
            list(iter_lines("/dev/zero", 10))


def test_iter_lines_skips_a_long_line_keeping_offsets(tmp_path):
    path = tmp_path / "log"
    path.write_bytes(b"ab\n" + b"x" * 100 + b"\ncd")
    lines = list(iter_lines(path, 10))
    assert [(ln.lineno, ln.offset, ln.raw, ln.size, ln.newline) for ln in lines] == [
        (1, 0, b"ab\n", 3, True), (2, 3, None, 101, True), (3, 104, b"cd", 2, False)]


def test_a_large_policy_is_scanned_fast_with_the_same_lines():
    # over the libyaml threshold (256 KiB): the same composer, the same lines
    pad = "# " + "x" * 300_000 + "\n"
    text = pad + ("apiVersion: lbw-policy/v1\nkind: Policy\nmetadata: {name: p}\nrules:\n"
                  "  - name: r\n    when: {signal: a.b, op: '>', value: 1}\n    then: []\n")
    with pytest.raises(PolicySchemaError) as info:
        loads_policy(text)
    assert str(info.value).startswith("<string>:8: rules[0].then: too few items")


def test_composing_stops_at_the_node_limit():
    text = "apiVersion: lbw-policy/v1\nkind: Policy\nrules:\n" + "- 0\n" * (MAX_NODES + 10)
    with pytest.raises(PolicySyntaxError, match="document too large; expected at most 10000 "
                                                "nodes"):
        loads_policy(text)


def test_aliases_are_bounded_by_the_characters_they_expand_to():
    text = ("apiVersion: lbw-policy/v1\nkind: Policy\ns: &s " + "A" * 100_000 +
            "\nmetadata: {name: [" + ", ".join(["*s"] * 50) + "]}\nrules: []\n")
    with pytest.raises(PolicySyntaxError, match="expected at most 4194304 characters of text, "
                                                "found 5100051 characters"):
        loads_policy(text)


def test_problem_text_quotes_at_most_max_quote_characters():
    text = ("apiVersion: lbw-policy/v1\nkind: Policy\nmetadata: {name: n, owner: " + "o" * 5000
            + "}\nrules: []\nunknown_" + "k" * 900 + ": 1\n")
    with pytest.raises(PolicySchemaError) as info:
        loads_policy(text)
    for problem in info.value.problems:
        for part in (problem.message, problem.found, problem.expected, problem.path):
            assert part is None or len(part) <= MAX_QUOTE
    assert "metadata.owner: string too long; expected at most 256 characters, found 5000 " \
        "characters" in str(info.value)


@pytest.mark.parametrize("pad", [0, 300_000])  # the pure-Python scanner, then libyaml's
def test_lines_count_line_feeds_only_on_both_scanners(pad):
    text = ("# " + "x" * pad + "\n" + "apiVersion: lbw-policy/v1\nkind: Policy\n"
            "metadata: {name: p, description: \"a\u2028b\u2029c\\u0085d\"}\nrules:\n"
            "  - name: r\n    when: {signal: a.b, op: '>', value: 1}\n    then: []\n")
    with pytest.raises(PolicySchemaError) as info:
        loads_policy(text)
    assert str(info.value).startswith("<string>:8: rules[0].then: too few items")
