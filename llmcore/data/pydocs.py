"""The builtin corpus: Python's own documentation, as documents and as questions about it.

The documentation ships inside every CPython install, so the default pipeline needs no
network: the ``pydoc_data`` language-reference topics and the docstrings of the standard
library, read with :mod:`ast` (nothing is imported, so no module side effects), one document
per topic and per ~3 KB of a module, laid out like ``pydoc`` output. The SFT set asks about a
topic, module, class or function and answers with its documented text; the synthetic tasks
with checkable answers (:mod:`llmcore.data.tasks`) draw their words from the same topics.

The corpus depends on the Python version that runs the stage (its docs change between
releases); the corpus manifest records that version.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import re
import sysconfig
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from llmcore.data.corpus import Conversation, Document

_SKIP_PARTS = {"test", "tests", "idlelib", "lib2to3", "site-packages", "dist-packages",
               "turtledemo", "ensurepip", "__pycache__", "tkinter", "__phello__"}


@dataclass(frozen=True)
class DocEntry:
    """One documented object: a topic, module, class or function."""

    kind: str  # topic | module | class | function
    name: str
    signature: str
    doc: str


def _stdlib_files() -> list[tuple[str, Path]]:
    root = Path(sysconfig.get_paths()["stdlib"])
    out = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if any(p in _SKIP_PARTS or p.startswith(("test_", "config-")) for p in rel.parts):
            continue
        parts = list(rel.with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        if not parts or any(not p.isidentifier() for p in parts):
            continue
        out.append((".".join(parts), path))
    return out


def _signature(node: ast.FunctionDef | ast.AsyncFunctionDef) -> str:
    try:
        args = ast.unparse(node.args)
    except Exception:  # pragma: no cover - ast.unparse handles every valid tree
        args = "..."
    return f"{node.name}({args})"


def _collect_entries(body: list[ast.stmt], prefix: str, depth: int, out: list[DocEntry]) -> None:
    """Documented public classes and functions (and methods of top-level classes)."""
    for node in body:
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            continue
        if node.name.startswith("_") and node.name != "__init__":
            continue
        doc = ast.get_docstring(node)
        qual = f"{prefix}.{node.name}"
        if isinstance(node, ast.ClassDef):
            if doc:
                out.append(DocEntry("class", qual, f"class {qual}", doc))
            if depth == 0:
                _collect_entries(node.body, qual, depth + 1, out)
        elif doc:
            out.append(DocEntry("function", qual, f"{prefix}.{_signature(node)}", doc))


def stdlib_entries() -> Iterator[tuple[str, list[DocEntry]]]:
    """``(module name, entries)`` for each stdlib module, in a stable order."""
    for modname, entries in _parsed_stdlib():
        yield modname, list(entries)


@functools.lru_cache(maxsize=1)
def _parsed_stdlib() -> tuple[tuple[str, tuple[DocEntry, ...]], ...]:
    """Every stdlib module parsed once per process: the documents, the doc questions and the
    spelling words all read it (~3 s a parse)."""
    return tuple((m, tuple(es)) for m, es in _parse_stdlib())


def _parse_stdlib() -> Iterator[tuple[str, list[DocEntry]]]:
    for modname, path in _stdlib_files():
        try:
            tree = ast.parse(path.read_bytes())
        except (SyntaxError, ValueError):
            continue
        entries = []
        mdoc = ast.get_docstring(tree)
        if mdoc:
            entries.append(DocEntry("module", modname, modname, mdoc))
        _collect_entries(tree.body, modname, 0, entries)
        if entries:
            yield modname, entries


def pydoc_topics() -> list[DocEntry]:
    from pydoc_data.topics import topics

    out = []
    for key in sorted(topics):
        text = topics[key].strip()
        title = text.splitlines()[0].strip() if text else key
        out.append(DocEntry("topic", key, title, text))
    return out


def builtin_documents(max_chars: int = 3000) -> Iterator[Document]:
    """Pydoc topics, and stdlib modules formatted like ``pydoc`` output.

    A module's entries are grouped into documents of about ``max_chars`` (whole entries only),
    so that the few huge modules do not make the val split a lottery of a handful of files.
    """
    for entry in pydoc_topics():
        yield Document(entry.doc, f"builtin:topic/{entry.name}", group=topic_group(entry.name))
    for modname, entries in stdlib_entries():
        group = module_group(modname)
        parts: list[str] = []
        size = 0
        for e in entries:
            if e.kind == "module":
                part = f"Help on module {modname}:\n\n{e.doc}"
            else:
                body = "\n".join("    " + ln if ln else "" for ln in e.doc.splitlines())
                part = f"{e.signature}\n{body}"
            if parts and size + len(part) > max_chars:
                yield Document("\n\n".join(parts), f"builtin:module/{modname}", group=group)
                parts, size = [f"Help on module {modname} (continued):"], 0
            parts.append(part)
            size += len(part)
        yield Document("\n\n".join(parts), f"builtin:module/{modname}", group=group)


def _without_docstrings(source: str) -> str | None:
    """The source with every docstring cut out (None if it does not parse).

    The documentation corpus (and so its validation split) is made of these docstrings:
    training on the code with them left in would show the model the validation text.
    """
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return None
    lines = source.splitlines(keepends=True)
    cut: list[tuple[int, int, str]] = []  # (first line, last line, replacement), 1-based
    for node in ast.walk(tree):
        if not isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef,
                                 ast.AsyncFunctionDef)) or not node.body:
            continue
        first = node.body[0]
        if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) \
                and isinstance(first.value.value, str):
            alone = len(node.body) == 1  # a body of only a docstring needs a statement
            indent = " " * first.col_offset
            cut.append((first.lineno, first.end_lineno or first.lineno,
                        f"{indent}...\n" if alone else ""))
    for start, end, text in sorted(cut, reverse=True):
        lines[start - 1 : end] = [text]
    return "".join(lines)


def stdlib_code_documents(max_chars: int = 4000) -> Iterator[Document]:
    """The standard library's Python source (tests and docstrings left out), in pieces of
    about ``max_chars`` that end before a top-level statement, as training documents only.

    Only for training: the held-out splits stay the documentation, the same set with or
    without the code, so bits per byte on them compare across the two. A piece belongs to its
    module's group and is left out when that group is held out (the code of a held-out module
    would show its names and comments).
    """
    for modname, path in _stdlib_files():
        if modname.startswith("pydoc_data"):  # the reference topics: documentation, as data
            continue
        try:
            text = _without_docstrings(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, OSError):
            continue
        if not text:
            continue
        piece: list[str] = []
        size = 0
        for line in text.splitlines(keepends=True):
            top_level = line[:1] not in (" ", "\t", "\n", ")", "]", "}", "#", "")
            # cut before a top-level statement, or anywhere in a statement far too long
            if (size > max_chars and top_level) or size > 4 * max_chars:
                yield Document("".join(piece), f"builtin:code/{modname}",
                               group=module_group(modname), train_only=True)
                piece, size = [], 0
            piece.append(line)
            size += len(line)
        if "".join(piece).strip():
            yield Document("".join(piece), f"builtin:code/{modname}",
                           group=module_group(modname), train_only=True)


def first_paragraphs(text: str, max_chars: int = 600) -> str:
    """Leading paragraphs of a docstring, whole paragraphs only, at most ``max_chars``."""
    paras = [p.strip() for p in re.split(r"\n\s*\n", text.strip()) if p.strip()]
    out: list[str] = []
    for p in paras:
        if out and len("\n\n".join(out + [p])) > max_chars:
            break
        out.append(p)
    answer = "\n\n".join(out)
    return answer if len(answer) <= max_chars * 2 else answer[: max_chars * 2].rsplit(" ", 1)[0]


_DOC_QUESTIONS = {
    "topic": ("Explain {title} in Python.", "What does the Python reference say about {title}?"),
    "module": ("What is the Python `{name}` module for?", "Describe the `{name}` module."),
    "class": ("What is `{name}`?", "Describe the class `{name}`."),
    "function": ("What does `{name}` do?", "Explain `{sig}`."),
}
SYSTEM_PROMPT = "You are a helpful assistant who answers questions about Python precisely."


def topic_group(name: str) -> str:
    """The split group of a reference topic: the topic itself."""
    return f"topic:{name}"


def module_group(modname: str) -> str:
    """The split group of a stdlib module: its top-level package (``email.mime.text`` ->
    ``module:email``), so that a package's modules, which repeat each other's text, stay
    together. Near-copies across packages (``posixpath`` and ``ntpath``) are joined later, by
    their shared text (:func:`llmcore.data.splits.merge_near_copies`)."""
    return f"module:{modname.split('.')[0]}"


def doc_conversations(min_chars: int = 40) -> Iterator[Conversation]:
    """A question about each documented topic/module/class/function, answered from its doc.

    Each belongs to the group of the document its answer is cut from, so the question, its
    answer and the document land in one split."""
    entries = [(topic_group(e.name), e) for e in pydoc_topics()] + [
        (module_group(m), e) for m, es in stdlib_entries() for e in es]
    for group, e in entries:
        answer = first_paragraphs(e.doc)
        if len(answer) < min_chars:
            continue
        templates = _DOC_QUESTIONS[e.kind]
        pick = int(hashlib.sha256(e.name.encode()).hexdigest()[:8], 16) % len(templates)
        title = e.signature.strip('"*')
        question = templates[pick].format(name=e.name, sig=e.signature, title=title)
        yield Conversation((("user", question), ("assistant", answer)),
                           f"builtin:doc/{e.kind}", "doc", answer, pool=(group,))


@functools.lru_cache(maxsize=4)
def docstring_words(min_len: int = 3, max_len: int = 10, min_count: int = 2) -> tuple[str, ...]:
    """Plain lowercase words of the standard library's docstrings seen ``min_count`` times or
    more, sorted (stable for one Python version): the pool spelling trains on beyond the
    word list (:func:`llmcore.data.tasks.task_pools`)."""
    counts: Counter[str] = Counter()
    for _, entries in stdlib_entries():
        for e in entries:
            counts.update(w for w in re.findall(r"\b[a-z]+\b", e.doc)
                          if min_len <= len(w) <= max_len)
    return tuple(sorted(w for w, c in counts.items() if c >= min_count))


def word_list(min_len: int = 3, max_len: int = 10, size: int = 2400) -> list[str]:
    """The most frequent plain lowercase words of the pydoc topics (stable for a Python version)."""
    counts: Counter[str] = Counter()
    for e in pydoc_topics():
        counts.update(w for w in re.findall(r"\b[a-z]+\b", e.doc) if min_len <= len(w) <= max_len)
    return sorted(w for w, _ in counts.most_common(size))
