"""Where the language-model helpers keep what they build once: the parsed corpus, trained
tokenizers and models (``~/.cache/graphprune/lm`` unless the caller names a directory)."""

from __future__ import annotations

import os


def cache_root(cache_dir: str | os.PathLike | None = None) -> str:
    """``cache_dir`` if given, else ``$XDG_CACHE_HOME/graphprune/lm`` (``~/.cache/...``).

    >>> cache_root("/tmp/x")
    '/tmp/x'
    """
    if cache_dir is not None:
        return os.path.abspath(os.fspath(cache_dir))
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "graphprune", "lm")
