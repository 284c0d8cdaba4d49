"""YAML text -> plain data, with a line for every node and problems collected, not raised.

The policy loader (:mod:`lbw_policy.policy`) and the policy-test loader
(:mod:`lbw_policy.policytest`) read their files through here: ``yaml.SafeLoader`` semantics
(plain data only: no tags, no objects), bounded size (:data:`MAX_BYTES`; :data:`MAX_NODES`
while composing and again after alias expansion, :data:`MAX_CHARS` of scalar text after alias
expansion, :data:`MAX_DEPTH`), duplicate and non-string keys refused, and every problem
reported with its file, line and YAML path (:class:`Collector`), its quoted parts cut to
:data:`MAX_QUOTE` characters.

Hostile input is rejected before it can cost time or memory: composing stops at the
``MAX_NODES``-th node (a 4 MiB list of one-character items would otherwise build millions of
nodes), aliases are counted, never expanded, so an anchors bomb (aliases of aliases) or a large
string repeated by aliases (whose schema error message would quote it whole) is refused before
the schema runs, and a text over 256 KiB is scanned by libyaml (:func:`_loader`).

Lines are what an editor shows: they count ``"\n"`` only (a ``"\r\n"`` file counts the same).
YAML also breaks lines at U+0085, U+2028, U+2029 and a lone ``"\r"``; inside a quoted string
those would shift every later line number, so the loader's marks are recounted
(:class:`_Loader`). Nesting deeper than :data:`MAX_DEPTH` is refused at the line and path of the
first node too deep, however deep the document goes (composing stops there, before Python's
recursion limit).
"""

from __future__ import annotations

import bisect
import difflib
import functools
import json
import math
import re
from typing import Any, Optional, Sequence

import yaml
from yaml.events import AliasEvent, ScalarEvent
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from lbw_policy.errors import (PolicyBoundsError, PolicyReferenceError, PolicySchemaError,
                               PolicySyntaxError, Problem)

__all__ = ["Collector", "decode", "parse", "check_plain", "format_path", "node_line", "found",
           "suggest", "path_key", "MAX_BYTES", "MAX_NODES", "MAX_DEPTH", "MAX_INT", "PathT",
           "MAX_CHARS", "MAX_QUOTE", "read_source"]

PathT = tuple  # of str (mapping keys) and int (list indices)

#: Largest policy file read, in bytes.
MAX_BYTES = 4 << 20
#: Most YAML nodes a document may hold once its aliases are expanded.
MAX_NODES = 10_000
#: Deepest nesting of mappings and lists.
MAX_DEPTH = 64
#: Largest integer magnitude accepted (beyond it floats lose integer precision).
MAX_INT = 10**15
#: Most characters of scalar text (keys and values) a document may hold once its aliases are
#: expanded: a file without aliases stays under it (it is MAX_BYTES).
MAX_CHARS = MAX_BYTES
#: Longest text quoted from the document in a problem message (message, expected, found, hint).
MAX_QUOTE = 300

_TAG = "tag:yaml.org,2002:"
_PLAIN_TAGS = {_TAG + t for t in ("str", "int", "float", "bool", "null", "seq", "map")}
_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_KINDS = (PolicySyntaxError, PolicySchemaError, PolicyReferenceError, PolicyBoundsError)


def read_source(path: Any, what: str, error: type) -> bytes:
    """The bytes of a policy or policy-test file, at most :data:`MAX_BYTES`, regular files only
    (:func:`lbw_policy.safeio.read_bytes`: a FIFO or ``/dev/zero`` is refused without reading).

    :param error: the :class:`~lbw_policy.errors.PolicyError` subclass to raise.
    :raises FileNotFoundError: the file does not exist.
    :raises error: it is not a regular file, larger than the limit, or unreadable.
    """
    from lbw_policy.safeio import InputTooLargeError, NotRegularFileError, read_bytes

    try:
        return read_bytes(path, MAX_BYTES, what)
    except FileNotFoundError:
        raise
    except InputTooLargeError as exc:
        raise error(f"{what} too large", file=str(path), line=1, found=str(exc).split(": ", 1)[-1],
                    expected=f"at most {MAX_BYTES} bytes (4 MiB)") from None
    except NotRegularFileError as exc:
        raise error(f"cannot read {what}: {exc}", file=str(path)) from None
    except OSError as exc:
        raise error(f"cannot read {what}: {exc.strerror or exc}", file=str(path)) from None


def decode(raw: bytes, source: str) -> str:
    if len(raw) > MAX_BYTES:
        raise PolicySyntaxError(f"policy file too large: {len(raw)} bytes", file=source,
                                line=1, expected=f"at most {MAX_BYTES} bytes")
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise PolicySyntaxError(f"not UTF-8 text at byte {exc.start}", file=source,
                                line=raw.count(b"\n", 0, exc.start) + 1,
                                hint="save the policy as UTF-8 YAML text") from None


class _TooDeep(Exception):
    """Composing stopped at a node deeper than :data:`MAX_DEPTH` (its mark and YAML path)."""

    def __init__(self, mark: Any, path: PathT) -> None:
        super().__init__(path)
        self.mark, self.path = mark, path


class _TooManyNodes(Exception):
    def __init__(self, line: int) -> None:
        self.line = line


class _Composing:
    """The composing rules of both loaders: stop at the first node deeper than
    :data:`MAX_DEPTH` (:class:`_TooDeep`), and at the :data:`MAX_NODES`-th node
    (:class:`_TooManyNodes`; an alias is not a new node: aliases are counted, expanded, by
    :func:`_count_nodes`)."""

    _composed = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        # index: the key node of a mapping value, the position in a list, None for a key
        self._path.append(index.value if isinstance(index, ScalarNode) else index)
        try:
            alias = self.check_event(AliasEvent)
            # a node at depth MAX_DEPTH + 1 (a plain key there is not: its value is)
            if len(self._path) > MAX_DEPTH + 1 and not alias and \
                    (index is not None or not self.check_event(ScalarEvent)):
                raise _TooDeep(self.peek_event().start_mark,
                               tuple(p for p in self._path[1:] if p is not None))
            if not alias:
                self._composed += 1
                if self._composed > MAX_NODES:
                    raise _TooManyNodes(self.peek_event().start_mark.line + 1)
            return super().compose_node(parent, index)  # type: ignore[misc]
        finally:
            self._path.pop()


class _Loader(_Composing, yaml.SafeLoader):
    """``yaml.SafeLoader`` with two changes, both for the error messages:

    * marks count lines by ``"\n"`` only (:meth:`get_mark`): what an editor shows, whatever
      U+2028 / U+2029 / U+0085 / a lone ``"\r"`` a string holds;
    * composing stops at the first node deeper than :data:`MAX_DEPTH`
      (:meth:`_Composing.compose_node` raises :class:`_TooDeep` with its mark and path; it
      also stops at the :data:`MAX_NODES`-th node). PyYAML's composer recurses once per
      level, so a 1000-deep ``not`` chain would otherwise hit Python's recursion limit before
      any line is known; and stopping there reads no further (PyYAML's scanner is quadratic in
      the depth of flow collections).
    """

    def __init__(self, text: str) -> None:
        self._newlines = [m.start() for m in re.finditer("\n", text)]
        super().__init__(text)
        self._path: list = []  # the keys / indices of the nodes being composed

    def get_mark(self) -> Any:
        mark = super().get_mark()
        line = bisect.bisect_left(self._newlines, mark.index)  # "\n" before the mark
        mark.line = line
        mark.column = mark.index - (self._newlines[line - 1] + 1 if line else 0)
        return mark


#: Texts longer than this are scanned by libyaml (when PyYAML was built with it): the pure-Python
#: scanner needs about 1 s per MiB (3.6 s for a 4 MiB comment), libyaml a few milliseconds. The
#: events are composed by the same Python composer (:class:`_Composing`), their marks recounted
#: the same way; only the wording of a YAML syntax error can differ. Policies are far smaller:
#: they keep the pure-Python path.
_FAST_SCAN_CHARS = 256 << 10

if getattr(yaml, "__with_libyaml__", False):
    from yaml._yaml import CParser as _CParser  # the C scanner and parser (events only)

    class _CLoader(_Composing, yaml.composer.Composer, _CParser,
                   yaml.constructor.SafeConstructor, yaml.resolver.Resolver):
        """libyaml's events, composed in Python (``Composer`` before ``CParser`` in the MRO:
        its ``get_single_node`` is used, with :class:`_Composing`'s limits); event marks are
        recounted by ``"\n"`` as :meth:`_Loader.get_mark` does (libyaml's mark ``index``
        counts characters too)."""

        def __init__(self, text: str) -> None:
            self._newlines = [m.start() for m in re.finditer("\n", text)]
            _CParser.__init__(self, text)
            yaml.composer.Composer.__init__(self)
            yaml.constructor.SafeConstructor.__init__(self)
            yaml.resolver.Resolver.__init__(self)
            self._path: list = []

        def _fix(self, event: Any) -> Any:
            # libyaml's marks are its own type; a recounted one is yaml.error.Mark
            if event is not None and not isinstance(event.start_mark, yaml.error.Mark):
                event.start_mark = _recount(event.start_mark, self._newlines)
                event.end_mark = _recount(event.end_mark, self._newlines)
            return event

        def peek_event(self) -> Any:
            return self._fix(super().peek_event())

        def get_event(self) -> Any:
            return self._fix(super().get_event())
else:  # pragma: no cover - PyYAML without libyaml
    _CLoader = None


def _recount(mark: Any, newlines: list) -> Any:
    """``mark`` with its line and column counted by ``"\n"`` only."""
    if mark is None:
        return None
    line = bisect.bisect_left(newlines, mark.index)
    column = mark.index - (newlines[line - 1] + 1 if line else 0)
    return yaml.error.Mark(mark.name, mark.index, line, column, None, None)


def _loader(text: str) -> Any:
    """The pure-Python loader for a policy-sized text, libyaml's scanner for a larger one."""
    if len(text) > _FAST_SCAN_CHARS and _CLoader is not None:
        return _CLoader(text)
    return _Loader(text)


def parse(text: str, col: "Collector") -> Any:
    """Text -> plain data; fills ``col.lines``; syntax problems go to ``col`` (returns None)."""
    at = text.find("\x00")
    if at >= 0:
        col.add(PolicySyntaxError, (), f"not a text file: NUL character at offset {at}",
                line=text.count("\n", 0, at) + 1)
    elif not text.strip():
        col.add(PolicySyntaxError, (), "empty policy file", line=None)
    if col.items:
        return None
    loader = None
    try:
        loader = _loader(text)
        node = loader.get_single_node()
        if node is None:
            col.add(PolicySyntaxError, (), "empty policy file", hint="it holds only comments")
            return None
        size, chars = _count_nodes(node, col) or (None, None)
        if size is not None and size > MAX_NODES:
            col.add(PolicySyntaxError, (), "document too large once its aliases are expanded",
                    expected=f"at most {MAX_NODES} nodes", found=f"{size} nodes" if size < 10**12
                    else f"more than 1e{len(str(size)) - 1} nodes",
                    hint="a policy needs no deep alias chains (this looks like an anchors "
                    "bomb)", line=node_line(node))
        elif chars is not None and chars > MAX_CHARS:
            col.add(PolicySyntaxError, (), "document too large once its aliases are expanded",
                    expected=f"at most {MAX_CHARS} characters of text",
                    found=f"{chars} characters" if chars < 10**12
                    else f"more than 1e{len(str(chars)) - 1} characters",
                    hint="aliases repeat a large value (an anchors bomb); write each value "
                    "once", line=node_line(node))
        if not col.items:
            _walk(node, (), node_line(node), 0, col)
        if col.items:
            return None
        try:
            return loader.construct_document(node)
        except (ValueError, KeyError, IndexError, TypeError, yaml.constructor.ConstructorError):
            _unreadable(node, (), col)  # a plain tag whose text it cannot read: !!bool maybe
            if not col.items:
                col.add(PolicySyntaxError, (), "a tagged value cannot be read",
                        hint="remove the YAML tags (!!int, !!float, !!bool)")
            return None
    except yaml.reader.ReaderError as exc:
        col.add(PolicySyntaxError, (), f"invalid character: {exc.reason} (#x{exc.character:04x})"
                if isinstance(exc.character, int) else f"invalid character: {exc.reason}",
                line=text.count("\n", 0, exc.position) + 1)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        if mark is not None and not isinstance(mark, yaml.error.Mark):  # libyaml's: recount
            mark = _recount(mark, [m.start() for m in re.finditer("\n", text)])
        if "single document" in (exc.context or ""):  # ComposerError: a second document
            message = "a policy file holds exactly one YAML document; found a second one"
        else:
            message = "invalid YAML: " + "; ".join(t for t in (exc.context, exc.problem) if t)
        indent = any(s in message for s in ("mapping values are not allowed",
                                             "expected <block end>", "could not find expected ':'",
                                             "did not find expected key"))
        tab = "'\\t'" in message  # found character '\t' that cannot start any token
        col.add(PolicySyntaxError, (), message, line=mark.line + 1 if mark else None,
                hint="check the indentation of this line and the one above it: YAML nests by "
                "indentation, with spaces only" if indent else "YAML indents with spaces only: "
                "replace the tab with spaces" if tab else None)
    except yaml.YAMLError as exc:
        col.add(PolicySyntaxError, (), f"invalid YAML: {exc}")
    except _TooDeep as exc:
        col.add(PolicySyntaxError, exc.path, "nesting too deep",
                expected=f"at most {MAX_DEPTH} levels", line=exc.mark.line + 1,
                hint="a policy needs a few levels; generate flat `all`/`any` lists, not chains")
    except RecursionError:
        col.add(PolicySyntaxError, (), "nesting too deep", expected=f"at most {MAX_DEPTH} levels")
    except _TooManyNodes as exc:
        col.add(PolicySyntaxError, (), "document too large", expected=f"at most {MAX_NODES} "
                "nodes (mappings, lists and scalars)", found=f"more, by line {exc.line}",
                hint="a policy is a few hundred lines; this is not one", line=exc.line)
    finally:
        if loader is not None:
            loader.dispose()
    return None


def _count_nodes(root: Node, col: "Collector") -> Optional[tuple]:
    """``(nodes, characters of scalar text)`` with aliases expanded, computed without expanding
    (memoized per node)."""
    memo: dict[int, tuple] = {}
    active: set[int] = set()

    def size(node: Node, depth: int) -> tuple:
        if depth > MAX_DEPTH:  # deeper through aliases: _walk reports it at its line and path
            return 1, 0
        if id(node) in active:
            col.add(PolicySyntaxError, (), "recursive alias: a node contains itself",
                    line=node_line(node), hint="a policy is a tree; remove the self-reference")
            raise RecursionError
        if id(node) not in memo:
            active.add(id(node))
            if isinstance(node, ScalarNode):
                memo[id(node)] = (1, len(node.value))
            else:
                children = node.value if isinstance(node, SequenceNode) else \
                    [n for pair in node.value for n in pair]
                sizes = [size(child, depth + 1) for child in children]
                memo[id(node)] = (1 + sum(n for n, _ in sizes), sum(c for _, c in sizes))
            active.discard(id(node))
        return memo[id(node)]

    try:
        return size(root, 0)
    except RecursionError:
        if not col.items:
            col.add(PolicySyntaxError, (), "nesting too deep",
                    expected=f"at most {MAX_DEPTH} levels")
        return None


def _walk(node: Node, path: PathT, line: int, depth: int, col: "Collector") -> None:
    """Record lines; refuse non-plain tags, non-string and duplicate keys, deep nesting."""
    col.lines.setdefault(format_path(path), line)
    if depth > MAX_DEPTH:
        col.add(PolicySyntaxError, path, "nesting too deep", expected=f"at most {MAX_DEPTH} levels",
                line=node_line(node))
    elif node.tag not in _PLAIN_TAGS:
        if node.tag == _TAG + "timestamp":
            col.add(PolicySyntaxError, path, "a date or time is not plain data",
                    found=repr(node.value),
                    hint="quote it to make it a string", line=node_line(node))
        else:
            tag = node.tag.replace(_TAG, "!!")
            col.add(PolicySyntaxError, path, f"YAML tag {tag!r} is not allowed",
                    expected="plain data (mappings, lists, strings, numbers, booleans, null)",
                    hint="remove the tag; a policy never constructs objects", line=node_line(node))
    elif isinstance(node, SequenceNode):
        for i, child in enumerate(node.value):
            _walk(child, path + (i,), node_line(child), depth + 1, col)
    elif isinstance(node, MappingNode):
        for key, (knode, vnode) in _mapping_pairs(node, path, col, depth).items():
            _walk(vnode, path + (key,), node_line(knode), depth + 1, col)


def _mapping_pairs(node: MappingNode, path: PathT, col: "Collector", depth: int) -> dict:
    """``{key: (key_node, value_node)}``; merge keys (``<<``) expanded, explicit keys winning."""
    explicit: dict = {}
    merged: dict = {}
    for knode, vnode in node.value:
        if knode.tag == _TAG + "merge":
            sources = vnode.value if isinstance(vnode, SequenceNode) else [vnode]
            for src in sources:
                if not isinstance(src, MappingNode) or depth > MAX_DEPTH:
                    col.add(PolicySyntaxError, path, "a merge key `<<` takes a mapping or a list "
                            "of mappings", line=node_line(knode))
                    continue
                for k, pair in _mapping_pairs(src, path, col, depth + 1).items():
                    merged.setdefault(k, pair)
            continue
        if not isinstance(knode, ScalarNode) or knode.tag != _TAG + "str":
            scalar = isinstance(knode, ScalarNode)
            col.add(PolicySyntaxError, path, "mapping keys must be strings",
                    found=repr(knode.value) if scalar else "a " + knode.id, line=node_line(knode),
                    hint="quote the key (YAML reads unquoted yes/no/on/off as booleans)"
                    if scalar else None)
            continue
        key = knode.value
        if key in explicit:
            col.add(PolicySyntaxError, path + (key,), f"duplicate key {key!r}",
                    hint=f"it is already on line {node_line(explicit[key][0])}; YAML would silently "
                    "keep the last one, remove one of them", line=node_line(knode))
            continue
        explicit[key] = (knode, vnode)
    for key, pair in merged.items():
        explicit.setdefault(key, pair)
    return explicit


def _unreadable(node: Node, path: PathT, col: "Collector") -> None:
    """Report each scalar whose explicit plain tag cannot read its text (``!!bool maybe``,
    ``!!int abc``), with its line."""
    if isinstance(node, ScalarNode):
        if node.tag in _PLAIN_TAGS and node.tag != _TAG + "str":
            try:
                yaml.constructor.SafeConstructor().construct_object(node)
            except Exception:  # noqa: BLE001 - any failure to read the text is the finding
                kind = node.tag.replace(_TAG, "")
                if kind == "int" and len(node.value) > 20:  # Python refuses > 4300 digits
                    col.add(PolicySyntaxError, path, "number too large", expected="an integer "
                            "within +-1e15", found=f"a number of {len(node.value)} digits",
                            line=node_line(node))
                    return
                col.add(PolicySyntaxError, path, f"{node.value!r} is not a valid {kind}",
                        line=node_line(node), hint=f"remove the !!{kind} tag, or write a "
                        f"value YAML reads as {kind}")
    elif isinstance(node, SequenceNode):
        for i, child in enumerate(node.value):
            _unreadable(child, path + (i,), col)
    elif isinstance(node, MappingNode):
        for knode, vnode in node.value:
            _unreadable(vnode, path + (str(knode.value),), col)


def check_plain(value: Any, path: PathT, col: "Collector") -> None:
    """Finite numbers, integers within +-MAX_INT, strings without lone surrogates (tags and
    keys were checked on the nodes)."""
    if isinstance(value, str):
        if any("\ud800" <= c <= "\udfff" for c in value):
            col.add(PolicySyntaxError, path, "a lone surrogate (\\ud800-\\udfff) in a string",
                    expected="text that is valid Unicode", found=found(value),
                    hint="write the character itself, or both halves of its surrogate pair")
    elif isinstance(value, float):
        if not math.isfinite(value):
            col.add(PolicySyntaxError, path, "non-finite number", expected="a finite number",
                    found=repr(value))
    elif isinstance(value, int) and not isinstance(value, bool):
        if abs(value) > MAX_INT:
            col.add(PolicySyntaxError, path, "number too large", expected="an integer within "
                    "+-1e15", found=found(value))
    elif isinstance(value, (dict, list)):
        for key, item in (value.items() if isinstance(value, dict) else enumerate(value)):
            check_plain(item, path + (key,), col)


class Collector:
    """Problems found so far (with their kind and path) and the path -> line map."""

    def __init__(self, file: str, lines: dict) -> None:
        self.file = file
        self.lines = lines
        self.items: list[tuple[type, PathT, Problem]] = []

    def line_near(self, path: PathT) -> Optional[int]:
        """Line of the node at ``path``, or of its nearest ancestor in the document."""
        while path and format_path(path) not in self.lines:
            path = path[:-1]
        return self.lines.get(format_path(path))

    def add(self, kind: type, path: PathT, message: str, *, line: Any = "near", **kw: Any) -> None:
        message = _clip(message)
        kw = {k: _clip(v) if isinstance(v, str) else v for k, v in kw.items()}
        if line == "near":
            line = self.line_near(path)
        if line is None:  # a whole-file problem (empty, too deep): report it at line 1
            line = 1
        self.items.append((kind, path, Problem(message, file=self.file, line=line,
                                               path=_clip(format_path(path)), **kw)))

    def raise_if_any(self, sort: bool = False) -> None:
        if not self.items:
            return
        unique = {(kind, str(problem)): (kind, path, problem) for kind, path, problem in self.items}
        items = list(unique.values())
        if sort:
            items.sort(key=lambda it: path_key(it[1]))
        kinds = tuple(k for k in _KINDS if any(it[0] is k for it in items))
        raise _error_class(kinds)([it[2] for it in items])


@functools.lru_cache(maxsize=None)
def _error_class(kinds: tuple) -> type:
    """One kind: its class. Several: a class deriving from each, so any ``except`` matches."""
    if len(kinds) == 1:
        return kinds[0]
    return type("+".join(k.__name__ for k in kinds), kinds,
                {"__module__": __name__, "__doc__": "Problems of several kinds."})


def format_path(parts: Sequence) -> str:
    out = ""
    for part in parts:
        if isinstance(part, int):
            out += f"[{part}]"
        elif _IDENT.fullmatch(str(part)):  # not .match: `$` also matches before a final "\n"
            out += ("." if out else "") + str(part)
        else:
            out += "[" + json.dumps(str(part), ensure_ascii=False) + "]"
    return out


def path_key(path: PathT) -> tuple:
    return tuple((0, p, "") if isinstance(p, int) else (1, 0, str(p)) for p in path)


def node_line(node: Node) -> int:
    return node.start_mark.line + 1


def _clip(text: str) -> str:
    """``text`` cut to :data:`MAX_QUOTE` characters (a problem never quotes a huge value)."""
    if len(text) <= MAX_QUOTE:
        return text
    return f"{text[:MAX_QUOTE - 40]}... ({len(text)} characters)"


def found(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def suggest(word: str, candidates: Any) -> Optional[str]:
    close = difflib.get_close_matches(str(word), [str(c) for c in candidates], n=1, cutoff=0.6)
    return f"did you mean {close[0]!r}?" if close else None
