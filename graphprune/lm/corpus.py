"""English text that ships with Python, as a language-modelling corpus (data stage of the LM flow).

Documents: every ``pydoc_data.topics`` topic (the language reference pages ``help()`` shows), the
docstrings of each pure-Python standard-library module (read from the source with :mod:`ast`, so
nothing is imported and no side effect runs; one document per file, each docstring under its
qualified name), and the ``*.txt``/``*.rst`` files shipped beside them. Packages that Linux
distributions split out or leave out (tkinter, idlelib, turtle, distutils, lib2to3, ensurepip,
the test suite) and build-specific files (``_sysconfigdata*``) are excluded, so the corpus is the
same on every machine with the same Python version. Documents go to train / validation / test
by a hash of their name: a document never straddles two splits, and adding one moves no other.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import json
import os
import sys
import sysconfig
import tokenize
from dataclasses import dataclass

from .._validate import check_choice
from ..errors import ConfigError

CORPUS_VERSION = 1  # bump when the rules that pick or format documents change
SPLITS = ("train", "validation", "test")
# Directory and file names (at any depth) that vary by distribution or are not documentation.
_EXCLUDED = frozenset({
    "site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test", "idlelib",
    "tkinter", "turtle.py", "turtledemo", "distutils", "lib2to3", "ensurepip", "__phello__",
    "encodings",  # a hundred codec tables sharing one generated docstring
    "pydoc_data",  # read through its module, below
})


@dataclass(frozen=True)
class Document:
    """One unit of the corpus: ``name`` ("pydoc:for", "stdlib:json/decoder.py") and its text."""

    name: str
    text: str


@dataclass(frozen=True)
class Corpus:
    """Documents split into ``train``, ``validation`` and ``test`` (tuples sorted by name)."""

    train: tuple[Document, ...]
    validation: tuple[Document, ...]
    test: tuple[Document, ...]

    def split(self, name: str) -> tuple[Document, ...]:
        """The documents of split ``name`` ('train', 'validation' or 'test')."""
        return getattr(self, check_choice(name, "split", "Corpus.split", SPLITS))

    def text(self, name: str) -> str:
        """The split as one string, documents separated by a blank line."""
        return "\n\n".join(d.text for d in self.split(name))

    @functools.cached_property
    def fingerprint(self) -> str:
        """sha256 over every split's document names and texts (keys caches of trained models)."""
        h = hashlib.sha256()
        for s in SPLITS:
            for d in self.split(s):
                h.update(f"{s}\0{d.name}\0{len(d.text)}\0".encode())
                h.update(d.text.encode("utf-8"))
        return h.hexdigest()

    def stats(self) -> dict[str, dict[str, int]]:
        """``{split: {"documents": n, "characters": n}}``."""
        return {s: {"documents": len(self.split(s)), "characters": sum(len(d.text) for d in self.split(s))}
                for s in SPLITS}


def _docstrings(tree: ast.Module, module: str) -> list[str]:
    """Every docstring of a module, in source order, each under its qualified name."""
    out: list[str] = []

    def visit(node: ast.AST, qual: str) -> None:
        doc = ast.get_docstring(node, clean=True)  # type: ignore[arg-type]
        if doc and doc.strip():
            out.append(f"{qual}\n{doc.strip()}")
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                visit(child, f"{qual}.{child.name}")

    visit(tree, module)
    return out


def _module_name(rel: str) -> str:
    parts = rel[:-3].split("/")
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _source_files(root: str) -> list[tuple[str, str]]:
    """``(relative path, path)`` of the standard library's documentation sources, sorted."""
    out = []
    for d, dirs, files in os.walk(root):
        rel_dir = os.path.relpath(d, root).replace(os.sep, "/")
        dirs[:] = sorted(x for x in dirs if x not in _EXCLUDED and not x.startswith("config-"))
        for f in sorted(files):
            if f in _EXCLUDED or f.startswith("_sysconfigdata") or not f.endswith((".py", ".txt", ".rst")):
                continue
            out.append((f if rel_dir == "." else f"{rel_dir}/{f}", os.path.join(d, f)))
    return sorted(out)


def _read_document(rel: str, path: str) -> str:
    """The text of one source file: its docstrings (``.py``) or its contents (``.txt``/``.rst``);
    ``""`` for a file this interpreter cannot read."""
    try:
        if rel.endswith(".py"):
            with tokenize.open(path) as fh:  # honours the file's coding cookie
                return "\n\n".join(_docstrings(ast.parse(fh.read()), _module_name(rel)))
        with open(path, encoding="utf-8") as fh:
            return fh.read().strip()
    except (SyntaxError, ValueError, UnicodeDecodeError, OSError):
        return ""  # not Python (or text) this interpreter reads: not part of its docs


def stdlib_documents(root: str | None = None) -> list[Document]:
    """The standard library's documents, sorted by name (``root`` defaults to this Python's).

    >>> docs = stdlib_documents()
    >>> any(d.name == "stdlib:json/__init__.py" for d in docs)
    True
    """
    import pydoc_data.topics

    root = os.path.abspath(root or sysconfig.get_paths()["stdlib"])
    docs = [Document(f"pydoc:{k}", v.strip()) for k, v in sorted(pydoc_data.topics.topics.items())
            if v.strip()]
    for rel, path in _source_files(root):
        text = _read_document(rel, path)
        if text:
            docs.append(Document(f"stdlib:{rel}", text))
    return sorted(docs, key=lambda doc: doc.name)


def _sources_key(root: str) -> str:
    """A key that changes when any source of the corpus (or this module's rules) changes."""
    import pydoc_data.topics

    h = hashlib.sha256(f"{CORPUS_VERSION}\0{sys.version}\0{root}".encode())
    for rel, path in _source_files(root) + [("pydoc_data/topics.py", pydoc_data.topics.__file__)]:
        st = os.stat(path)
        h.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
    return h.hexdigest()[:20]


def split_of(name: str, fractions: tuple[float, float, float]) -> str:
    """The split a document named ``name`` belongs to: a fixed hash of the name against the
    cumulative ``fractions`` of (train, validation, test)."""
    u = int.from_bytes(hashlib.sha256(name.encode("utf-8")).digest()[:8], "big") / 2.0 ** 64
    if u < fractions[0]:
        return "train"
    return "validation" if u < fractions[0] + fractions[1] else "test"


def make_corpus(documents: list[Document], fractions: tuple[float, float, float] = (0.85, 0.05, 0.10)
                ) -> Corpus:
    """Split ``documents`` by name hash into a :class:`Corpus`.

    Raises:
        ConfigError: ``fractions`` are not three non-negative numbers summing to 1, or a split
            would be empty.
    """
    fr = tuple(float(f) for f in fractions) if isinstance(fractions, (tuple, list)) else ()
    if len(fr) != 3 or min(fr) < 0 or abs(sum(fr) - 1.0) > 1e-9:
        raise ConfigError("The 'fractions' parameter of make_corpus must be three non-negative "
                          f"numbers (train, validation, test) summing to 1. Got {fractions!r} instead.")
    parts: dict[str, list[Document]] = {s: [] for s in SPLITS}
    for d in sorted(documents, key=lambda doc: doc.name):
        parts[split_of(d.name, fr)].append(d)  # type: ignore[arg-type]
    empty = [s for s in SPLITS if not parts[s]]
    if empty:
        raise ConfigError(f"make_corpus: the {', '.join(empty)} split of {len(documents)} documents is "
                          f"empty with fractions {fr}. Give more documents or larger fractions.")
    return Corpus(*(tuple(parts[s]) for s in SPLITS))


@functools.lru_cache(maxsize=4)
def stdlib_corpus(fractions: tuple[float, float, float] = (0.85, 0.05, 0.10),
                  cache_dir: str | None = None) -> Corpus:
    """The standard library's English text, split 85/5/10 by document.

    Parsing every module takes seconds, so the documents are kept in ``cache_dir`` (default
    ``~/.cache/graphprune/lm``; see :func:`graphprune.lm.cache_root`) under a key of the source
    files' names, sizes and times; a missing or unwritable cache only costs the time.

    >>> c = stdlib_corpus()
    >>> c.stats()["test"]["documents"] > 10
    True
    """
    from ..io import atomic_write_text
    from .cache import cache_root

    root = os.path.abspath(sysconfig.get_paths()["stdlib"])
    path = os.path.join(cache_root(cache_dir), f"corpus-{_sources_key(root)}.json")
    docs = None
    try:
        with open(path, encoding="utf-8") as f:
            docs = [Document(n, t) for n, t in json.load(f)["documents"]]
    except (OSError, ValueError, KeyError, TypeError):
        pass  # no (or a broken) cache entry: read the sources
    if docs is None:
        docs = stdlib_documents(root)
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            atomic_write_text(path, json.dumps({"documents": [[d.name, d.text] for d in docs]}))
        except OSError:
            pass  # no writable cache: read the sources again next time
    return make_corpus(docs, fractions)
