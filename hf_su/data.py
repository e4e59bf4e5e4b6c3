"""The embedded corpus: real English text that every Python installation carries, so nothing is downloaded.

Two sources, both from the running interpreter's standard library:

* ``"topics"``: the Python Language Reference topics that ``help()`` shows (``pydoc_data.topics``), about 0.5 MB
  of prose with code examples, one document per topic;
* ``"docstrings"``: the docstrings of the standard library's own modules, classes and functions, read from the
  source files with :mod:`ast` (nothing is imported or executed), one document per module; about 1.7 MB.

Test suites and package directories are skipped. The order is deterministic (sorted), so a given Python version
always yields the same corpus; ``embedded_corpus_stats()`` reports its size.
"""

from __future__ import annotations

import ast
import os
import sysconfig
from collections.abc import Iterator
from functools import lru_cache

SOURCES = ("topics", "docstrings")

# Standard-library folders that hold tests, vendored copies or platform glue rather than documentation.
_SKIPPED_DIRS = frozenset(
    {
        "test",
        "tests",
        "idle_test",
        "site-packages",
        "dist-packages",
        "__pycache__",
        "lib2to3",
        "turtledemo",
        "ensurepip",
    }
)


def _topic_documents() -> list[str]:
    try:
        from pydoc_data.topics import topics
    except ImportError:  # some distributions strip pydoc_data; the docstrings still serve
        return []
    return [topics[name].strip() for name in sorted(topics) if topics[name].strip()]


def _module_docstrings(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read(), filename=path)
    except (SyntaxError, UnicodeDecodeError, ValueError, OSError):
        return ""
    parts = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node, clean=True)
            if doc and len(doc) >= 40:  # one-liners like "Return self." carry little text
                parts.append(doc)
    return "\n\n".join(parts)


@lru_cache(maxsize=1)
def _docstring_documents() -> tuple[str, ...]:
    stdlib = sysconfig.get_paths()["stdlib"]
    files = []
    for root, dirs, names in os.walk(stdlib):
        dirs[:] = sorted(d for d in dirs if d not in _SKIPPED_DIRS and not d.startswith("."))
        files.extend(os.path.join(root, n) for n in sorted(names) if n.endswith(".py"))
    documents = (_module_docstrings(path) for path in files)
    return tuple(doc for doc in documents if doc)


_LOADERS = {"topics": _topic_documents, "docstrings": _docstring_documents}


def embedded_corpus(sources: str | tuple[str, ...] = SOURCES, *, max_chars: int | None = None) -> Iterator[str]:
    """Yield the documents of the embedded corpus, in a fixed order.

    Args:
        sources: ``"topics"``, ``"docstrings"`` or a tuple of both (the default, topics first).
        max_chars: stop once this many characters have been yielded (the last document is cut to fit).

    Raises:
        ValueError: an unknown source name or a non-positive ``max_chars``.
        RuntimeError: the interpreter carries none of the requested text.
    """
    if isinstance(sources, str):
        sources = (sources,)
    unknown = [s for s in sources if s not in SOURCES]
    if unknown:
        raise ValueError(f"unknown embedded corpus source(s) {unknown}; choose from {SOURCES}")
    if max_chars is not None and max_chars <= 0:
        raise ValueError(f"max_chars must be positive, got {max_chars}")
    remaining = max_chars
    yielded = False
    for source in sources:
        for doc in _LOADERS[source]():
            if remaining is not None:
                doc = doc[:remaining]
                remaining -= len(doc)
            yielded = True
            yield doc
            if remaining is not None and remaining <= 0:
                return
    if not yielded:
        raise RuntimeError(
            f"this Python installation carries none of the embedded corpus sources {sources}; pass your own text"
        )


def embedded_corpus_stats() -> dict[str, int]:
    """Documents and characters per source (and UTF-8 bytes in total), for ``hf-su env`` and the README."""
    stats: dict[str, int] = {}
    total_bytes = 0
    for source in SOURCES:
        docs = _LOADERS[source]()
        stats[f"{source}_documents"] = len(docs)
        stats[f"{source}_chars"] = sum(map(len, docs))
        total_bytes += sum(len(d.encode("utf-8")) for d in docs)
    stats["total_bytes"] = total_bytes
    return stats
