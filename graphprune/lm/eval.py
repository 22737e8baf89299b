"""Held-out perplexity of a causal language model (evaluation stage of the LM flow).

WikiText-2 style: the test stream is cut into non-overlapping windows of ``seq_len`` tokens
(the incomplete tail is dropped), each window is scored on its own, every token after a
window's first is predicted from the tokens before it in the window, and the negative
log-likelihoods are summed in float64. Works for any Hugging Face causal LM (called with
``use_cache=False``) and for a plain callable ``ids (B, L) -> logits (B, L, V)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from .._validate import check_int
from ..errors import InputError


def _is_hf(model: Any) -> bool:
    return any(c.__module__.startswith("transformers.") for c in type(model).__mro__)


def logits_of(model: Any, ids: torch.Tensor) -> torch.Tensor:
    """``model``'s next-token logits ``(B, L, V)`` for ``ids`` ``(B, L)``.

    Raises:
        InputError: the model returns something that is not ``(B, L, V)`` logits.
    """
    out = model(input_ids=ids, use_cache=False) if _is_hf(model) else model(ids)
    if hasattr(out, "logits"):
        out = out.logits
    elif isinstance(out, (tuple, list)) and out:
        out = out[0]
    if not isinstance(out, torch.Tensor) or out.dim() != 3 or tuple(out.shape[:2]) != tuple(ids.shape):
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise InputError(f"{type(model).__name__} returned {got} for token ids of shape "
                         f"{tuple(ids.shape)}; a causal LM must return logits of shape "
                         f"({ids.shape[0]}, {ids.shape[1]}, vocab) (or an output with .logits).")
    return out


def windows(token_ids: torch.Tensor | Sequence[int], seq_len: int, owner: str = "perplexity"
            ) -> torch.Tensor:
    """Non-overlapping ``(n, seq_len)`` windows of a 1-D id stream (a 2-D input is taken as the
    windows themselves).

    Raises:
        InputError: ids that are not integers, or fewer than one window of them.
    """
    ids = torch.as_tensor(token_ids)
    if ids.dtype.is_floating_point or ids.dtype == torch.bool or ids.dim() not in (1, 2):
        raise InputError(f"The 'token_ids' parameter of {owner} must be a 1-D stream or 2-D windows "
                         f"of integer ids. Got {ids.dtype} of shape {tuple(ids.shape)} instead.")
    if ids.dim() == 2:
        return ids.long()
    n = ids.numel() // seq_len
    if n == 0:
        raise InputError(f"{owner}: {ids.numel()} tokens make no window of seq_len={seq_len}. "
                         "Give more text or a smaller seq_len.")
    return ids[: n * seq_len].long().view(n, seq_len)


def nll(model: Any, token_ids: torch.Tensor | Sequence[int], seq_len: int = 256, batch_size: int = 8,
        max_windows: int | None = None) -> tuple[float, int]:
    """``(summed negative log-likelihood in nats, number of predicted tokens)`` over the
    windows of ``token_ids`` (the first ``max_windows`` of them, if given)."""
    check_int(seq_len, "seq_len", "perplexity", low=2)
    check_int(batch_size, "batch_size", "perplexity", low=1)
    w = windows(token_ids, seq_len)
    if max_windows is not None:
        w = w[: check_int(max_windows, "max_windows", "perplexity", low=1)]
    module = model if isinstance(model, torch.nn.Module) else None
    params = list(module.parameters()) if module is not None else []
    device = params[0].device if params else torch.device("cpu")
    was_training = module.training if module is not None else False
    if module is not None:
        module.eval()
    total, count = torch.zeros((), dtype=torch.float64), 0
    try:
        with torch.no_grad():
            for i in range(0, w.shape[0], batch_size):
                x = w[i:i + batch_size].to(device)  # (B, L)
                logits = logits_of(model, x)[:, :-1]  # (B, L-1, V)
                tok = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(),
                                      x[:, 1:].reshape(-1), reduction="none")
                total += tok.double().sum().cpu()
                count += tok.numel()
    finally:
        if module is not None:
            module.train(was_training)
    return float(total), count


def mean_nll(model: Any, token_ids: torch.Tensor | Sequence[int], seq_len: int = 256,
             batch_size: int = 8, max_windows: int | None = None) -> float:
    """Mean negative log-likelihood per predicted token (nats) on held-out ``token_ids``."""
    total, count = nll(model, token_ids, seq_len, batch_size, max_windows)
    return total / count


def perplexity(model: Any, token_ids: torch.Tensor | Sequence[int], seq_len: int = 256,
               batch_size: int = 8, max_windows: int | None = None) -> float:
    """exp(mean NLL) of ``model`` on non-overlapping ``seq_len`` windows of ``token_ids``.

    >>> import torch
    >>> uniform = lambda ids: torch.zeros(*ids.shape, 50)
    >>> round(perplexity(uniform, torch.arange(100) % 50, seq_len=10), 3)
    50.0

    Raises:
        InputError: ids that are not integers or make no window; a model output that is not
            ``(B, L, V)`` logits.
        ConfigError: ``seq_len`` < 2 or ``batch_size`` < 1.
    """
    return math.exp(mean_nll(model, token_ids, seq_len, batch_size, max_windows))


def unigram_perplexity(train_ids: torch.Tensor, test_ids: torch.Tensor, vocab_size: int) -> float:
    """Perplexity on ``test_ids`` of the add-one-smoothed unigram distribution of ``train_ids``:
    the baseline a language model must beat (a uniform model scores ``vocab_size``)."""
    counts = torch.bincount(torch.as_tensor(train_ids).reshape(-1), minlength=vocab_size).double() + 1
    logp = counts.log() - counts.sum().log()
    return math.exp(-float(logp[torch.as_tensor(test_ids).reshape(-1)].mean()))


def tokens_per_second(model: Any, ids: torch.Tensor, repeats: int = 5,
                      timer: Callable[[], float] | None = None) -> float:
    """Median forward throughput of ``model`` on the ``(B, L)`` batch ``ids`` (tokens/s), after
    one warm-up call, under ``torch.no_grad``."""
    import statistics
    import time

    timer = timer or time.perf_counter
    times = []
    with torch.no_grad():
        logits_of(model, ids)
        for _ in range(check_int(repeats, "repeats", "tokens_per_second", low=1)):
            t = timer()
            logits_of(model, ids)
            times.append(timer() - t)
    return ids.numel() / statistics.median(times)
