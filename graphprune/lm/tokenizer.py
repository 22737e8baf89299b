"""Tokenizers for the language-model corpus (data stage): a byte-level BPE trained on the train
split with Hugging Face ``tokenizers``, or plain UTF-8 bytes when that library is absent.

Both are saved as a ``tokenizer.json`` that ``transformers.PreTrainedTokenizerFast`` (and
``AutoTokenizer``) loads; the byte tokenizer's file is written by hand, so it needs nothing.
:func:`encode` turns text into ids with any of them (or with a plain callable).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from typing import Any

import torch

from .._validate import check_choice, check_int
from ..errors import ConfigError
from ._deps import has, need

EOS = "<|endoftext|>"
KINDS = ("auto", "bpe", "byte")


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's printable stand-in for each byte (the alphabet of byte-level BPE)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) \
        + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255 and ``<|endoftext|>`` as 256; no dependency.

    >>> t = ByteTokenizer()
    >>> t.encode("hé")
    [104, 195, 169]
    >>> t.decode(t.encode("hé" + EOS))
    'hé<|endoftext|>'
    """

    vocab_size = 257
    eos_token_id = 256

    def encode(self, text: str) -> list[int]:
        ids: list[int] = []
        for i, part in enumerate(text.split(EOS)):
            if i:
                ids.append(self.eos_token_id)
            ids.extend(part.encode("utf-8"))
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        out, run = [], bytearray()
        for i in ids:
            if int(i) == self.eos_token_id:
                out.append(run.decode("utf-8", errors="replace") + EOS)
                run = bytearray()
            else:
                run.append(int(i))
        return "".join(out) + run.decode("utf-8", errors="replace")

    def tokenizer_json(self) -> dict[str, Any]:
        """The Hugging Face ``tokenizer.json`` encoding exactly as :meth:`encode` does."""
        b2u = bytes_to_unicode()
        return {
            "version": "1.0", "truncation": None, "padding": None,
            "added_tokens": [{"id": self.eos_token_id, "content": EOS, "single_word": False,
                              "lstrip": False, "rstrip": False, "normalized": False, "special": True}],
            "normalizer": None,
            "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
                              "use_regex": False},
            "post_processor": None,
            "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True,
                        "use_regex": True},
            "model": {"type": "BPE", "dropout": None, "unk_token": None,
                      "continuing_subword_prefix": None, "end_of_word_suffix": None,
                      "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                      "vocab": {b2u[b]: b for b in range(256)}, "merges": []},
        }


def train_bpe(texts: Sequence[str], vocab_size: int = 4096) -> Any:
    """A byte-level BPE (``tokenizers.Tokenizer``) of ``vocab_size`` ids trained on ``texts``;
    the same texts give the same merges. ``<|endoftext|>`` is id 0.

    Raises:
        ConfigError: ``tokenizers`` is not installed, or ``vocab_size`` < 257.
    """
    check_int(vocab_size, "vocab_size", "train_bpe", low=257)
    tk = need("tokenizers", "train_bpe")
    tok = tk.Tokenizer(tk.models.BPE())
    tok.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tk.decoders.ByteLevel()
    trainer = tk.trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS], show_progress=False,
                                     initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(list(texts), trainer=trainer)
    return tok


def resolve_kind(kind: str) -> str:
    """``'auto'`` becomes ``'bpe'`` where ``tokenizers`` is installed, else ``'byte'``."""
    check_choice(kind, "kind", "train_tokenizer", KINDS)
    return ("bpe" if has("tokenizers") else "byte") if kind == "auto" else kind


def train_tokenizer(texts: Sequence[str], out_dir: str, kind: str = "auto", vocab_size: int = 4096,
                    model_max_length: int = 2048) -> str:
    """Write ``tokenizer.json`` and ``tokenizer_config.json`` for ``texts`` into ``out_dir``
    (an existing directory, e.g. a model being staged); returns the resolved kind.

    >>> import tempfile
    >>> d = tempfile.mkdtemp()
    >>> train_tokenizer(["some text"], d, kind="byte")
    'byte'

    Raises:
        ConfigError: an unknown ``kind``, or ``'bpe'`` without ``tokenizers`` installed.
    """
    from ..io import atomic_write_text

    kind = resolve_kind(kind)
    if kind == "byte":
        atomic_write_text(os.path.join(out_dir, "tokenizer.json"),
                          json.dumps(ByteTokenizer().tokenizer_json(), ensure_ascii=False, indent=1))
    else:
        tok = train_bpe(texts, vocab_size)
        atomic_write_text(os.path.join(out_dir, "tokenizer.json"), tok.to_str(pretty=True))
    atomic_write_text(os.path.join(out_dir, "tokenizer_config.json"), json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": EOS, "bos_token": EOS,
         "model_max_length": model_max_length, "clean_up_tokenization_spaces": False}, indent=1))
    return kind


def load_tokenizer(path: str) -> Any:
    """The tokenizer saved in directory ``path``: a ``PreTrainedTokenizerFast`` when
    ``transformers`` is installed, else a ``tokenizers.Tokenizer``, else (byte-level files only)
    a :class:`ByteTokenizer`.

    Raises:
        ConfigError: ``path`` has no ``tokenizer.json``, or it is BPE and neither library is
            installed.
    """
    file = os.path.join(path, "tokenizer.json")
    if not os.path.isfile(file):
        raise ConfigError(f"load_tokenizer: '{path}' holds no tokenizer.json. Give the directory a "
                          "model or train_tokenizer wrote.")
    if has("transformers"):
        from transformers import PreTrainedTokenizerFast

        return PreTrainedTokenizerFast.from_pretrained(path)
    if has("tokenizers"):
        import tokenizers

        return tokenizers.Tokenizer.from_file(file)
    with open(file, encoding="utf-8") as f:
        if json.load(f) == ByteTokenizer().tokenizer_json():
            return ByteTokenizer()
    need("tokenizers", f"load_tokenizer('{path}')")


def eos_id(tokenizer: Any) -> int | None:
    """The end-of-text id of ``tokenizer`` (None if it has none)."""
    i = getattr(tokenizer, "eos_token_id", None)
    if i is None and hasattr(tokenizer, "token_to_id"):  # a tokenizers.Tokenizer
        i = tokenizer.token_to_id(EOS)
    return None if i is None else int(i)


def encode(tokenizer: Any | Callable[[str], Sequence[int]], text: str) -> list[int]:
    """``text`` as a list of ids, without added special tokens, with any tokenizer: a
    ``transformers`` tokenizer, a ``tokenizers.Tokenizer``, a :class:`ByteTokenizer`, or a
    callable ``str -> ids``.

    >>> encode(ByteTokenizer(), "ab")
    [97, 98]

    Raises:
        ConfigError: ``tokenizer`` is none of these, or returns something that is not ids.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)  # a fast transformers tokenizer
    mod = type(tokenizer).__module__
    if backend is not None:
        ids: Any = backend.encode(text, add_special_tokens=False).ids
    elif mod.startswith("tokenizers"):
        ids = tokenizer.encode(text, add_special_tokens=False).ids
    elif mod.startswith("transformers"):
        ids = tokenizer.encode(text, add_special_tokens=False)
    elif hasattr(tokenizer, "encode"):
        ids = tokenizer.encode(text)
    elif callable(tokenizer):
        ids = tokenizer(text)
    else:
        raise ConfigError("The 'tokenizer' parameter of encode must be a transformers or tokenizers "
                          "tokenizer, a ByteTokenizer or a callable str -> ids. "
                          f"Got {type(tokenizer).__name__} instead.")
    if isinstance(ids, torch.Tensor):
        ids = ids.reshape(-1).tolist()
    if not isinstance(ids, (list, tuple)) or not all(isinstance(i, int) for i in ids):
        raise ConfigError(f"The tokenizer {type(tokenizer).__name__} returned {type(ids).__name__} "
                          "for a text; expected a list of int ids.")
    return list(ids)


def encode_documents(tokenizer: Any, texts: Sequence[str]) -> torch.Tensor:
    """One 1-D int64 stream of ``texts``, each followed by the tokenizer's end-of-text id (or
    a newline's ids when it has none), as corpora are concatenated for language modelling."""
    backend = getattr(tokenizer, "backend_tokenizer", tokenizer)
    if type(backend).__module__.startswith("tokenizers"):  # fast path: batch encoding
        encoded = [e.ids for e in backend.encode_batch(list(texts), add_special_tokens=False)]
    else:
        encoded = [encode(tokenizer, t) for t in texts]
    sep = eos_id(tokenizer)
    sep_ids = [sep] if sep is not None else encode(tokenizer, "\n\n")
    out: list[int] = []
    for ids in encoded:
        out.extend(ids)
        out.extend(sep_ids)
    return torch.tensor(out, dtype=torch.long)
