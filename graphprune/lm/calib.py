"""Calibration tokens for one-shot LLM pruning (calibration stage of the LM flow): random
windows of a text, as SparseGPT, Wanda and FLAP sample windows of C4.

Each of ``n_samples`` windows starts at a uniformly drawn token offset of the text's id stream
(seeded; windows may overlap, as theirs do). The text must hold at least ``n_samples x seq_len``
tokens, so that the windows can cover ``n_samples x seq_len`` distinct tokens.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch

from .._validate import check_int
from ..errors import ConfigError
from .tokenizer import encode

_TEXT_SUFFIXES = (".txt", ".text", ".md", ".rst")


def random_windows(ids: torch.Tensor | Sequence[int], n_samples: int, seq_len: int, seed: int = 0,
                   source: str = "the text") -> torch.Tensor:
    """``(n_samples, seq_len)`` windows of the 1-D id stream ``ids`` at seeded random offsets.

    >>> random_windows(torch.arange(100), 2, 10, seed=0).shape
    torch.Size([2, 10])

    Raises:
        ConfigError: fewer than ``n_samples * seq_len`` ids.
    """
    check_int(n_samples, "n_samples", "random_windows", low=1)
    check_int(seq_len, "seq_len", "random_windows", low=1)
    ids = torch.as_tensor(ids).reshape(-1).long()
    need = n_samples * seq_len
    if ids.numel() < need:
        raise ConfigError(
            f"{source} holds {ids.numel():,} tokens; {n_samples} calibration windows of {seq_len} "
            f"tokens need at least {need:,}. Give a longer text, fewer samples or a shorter seq_len.")
    g = torch.Generator().manual_seed(int(seed))
    starts = torch.randint(0, ids.numel() - seq_len + 1, (n_samples,), generator=g)
    return torch.stack([ids[s:s + seq_len] for s in starts.tolist()])


def read_text(path_or_text: str | os.PathLike) -> tuple[str, str]:
    """``(text, description)``: a ``PathLike`` or a one-line string naming an existing file is
    read (UTF-8); a one-line string ending in ``.txt``/``.text``/``.md``/``.rst`` must be one;
    any other string is the text itself.

    Raises:
        ConfigError: a path that does not exist or cannot be read as UTF-8 text.
    """
    if isinstance(path_or_text, os.PathLike) or (
            isinstance(path_or_text, str) and "\n" not in path_or_text and len(path_or_text) < 4096
            and (os.path.isfile(path_or_text) or path_or_text.lower().endswith(_TEXT_SUFFIXES))):
        path = os.fspath(path_or_text)
        try:
            with open(path, encoding="utf-8") as f:
                return f.read(), f"the text file '{path}'"
        except FileNotFoundError as e:
            raise ConfigError(f"The calibration text file '{path}' does not exist.") from e
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"cannot read the calibration text file '{path}' as UTF-8 text: "
                              f"{getattr(e, 'strerror', None) or e}.") from e
    if not isinstance(path_or_text, str):
        raise ConfigError("The 'path_or_text' parameter of text_calibration must be a path or a str. "
                          f"Got {type(path_or_text).__name__} instead.")
    return path_or_text, "the calibration text"


def text_calibration(path_or_text: str | os.PathLike, tokenizer: Any, n_samples: int = 128,
                     seq_len: int = 256, seed: int = 0) -> torch.Tensor:
    """Calibration token ids ``(n_samples, seq_len)``: random windows of a text file's (or a
    string's) tokens.

    >>> from graphprune.lm.tokenizer import ByteTokenizer
    >>> text_calibration("hello world " * 100, ByteTokenizer(), n_samples=4, seq_len=32).shape
    torch.Size([4, 32])

    Raises:
        ConfigError: a missing or unreadable file; a text with fewer than
            ``n_samples * seq_len`` tokens.
    """
    text, what = read_text(path_or_text)
    return random_windows(encode(tokenizer, text), n_samples, seq_len, seed, source=what)


def corpus_calibration(tokenizer: Any, n_samples: int = 128, seq_len: int = 256, seed: int = 0,
                       corpus: Any = None) -> torch.Tensor:
    """Calibration windows from the train split of ``corpus`` (default: the standard library
    corpus, :func:`graphprune.lm.corpus.stdlib_corpus`), never from validation or test text.

    Raises:
        ConfigError: the split holds fewer than ``n_samples * seq_len`` tokens.
    """
    from .corpus import stdlib_corpus
    from .tokenizer import encode_documents

    corpus = corpus if corpus is not None else stdlib_corpus()
    ids = encode_documents(tokenizer, [d.text for d in corpus.train])
    return random_windows(ids, n_samples, seq_len, seed, source="the corpus' train split")
