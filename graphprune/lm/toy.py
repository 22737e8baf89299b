"""A toy language and a tiny LLaMA-style decoder that learns it in seconds: the language-model
fixture of the tests (pruning a decoder must be checked on one that has learnt something).

The language is a second-order Markov chain over ``vocab_size`` tokens: each pair of previous
tokens allows ``branching`` successors with fixed skewed probabilities. Predicting well needs the
token two steps back, i.e. attention; a model that sees only the current token is stuck at the
bigram entropy. Both entropies and the best achievable loss are known exactly, so a test can
assert that a decoder has learnt the language, not just its unigram statistics.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from .._validate import check_int
from ..errors import ConfigError
from ._deps import need


@dataclass(frozen=True)
class ToyLanguage:
    """A second-order Markov chain: ``table[a, b]`` is the distribution of the token after
    ``a, b`` (``(V, V, V)``, rows summing to 1). Build it with :func:`toy_language`."""

    table: torch.Tensor
    seed: int

    @property
    def vocab_size(self) -> int:
        return int(self.table.shape[-1])

    def sample(self, n: int, seq_len: int, seed: int = 0) -> torch.Tensor:
        """``n`` sequences ``(n, seq_len)``: two uniform start tokens, then the chain.

        >>> toy_language().sample(2, 8).shape
        torch.Size([2, 8])
        """
        check_int(n, "n", "ToyLanguage.sample", low=1)
        check_int(seq_len, "seq_len", "ToyLanguage.sample", low=2)
        g = torch.Generator().manual_seed(int(seed))
        x = torch.empty(n, seq_len, dtype=torch.long)
        x[:, :2] = torch.randint(0, self.vocab_size, (n, 2), generator=g)
        for t in range(2, seq_len):
            x[:, t] = torch.multinomial(self.table[x[:, t - 2], x[:, t - 1]], 1, generator=g)[:, 0]
        return x

    def true_probs(self, seqs: torch.Tensor) -> torch.Tensor:
        """``p(x_t | x_<t)`` of the language at every predicted position ``(n, L-1)`` (the second
        start token is uniform)."""
        first = torch.full((seqs.shape[0],), 1.0 / self.vocab_size)  # (n,)
        rest = self.table[seqs[:, :-2], seqs[:, 1:-1], seqs[:, 2:]]  # (n, L-2)
        return torch.cat([first[:, None], rest], 1)

    def optimal_loss(self, seqs: torch.Tensor) -> float:
        """The lowest mean next-token loss (nats) any model can reach on ``seqs``."""
        return float(-self.true_probs(seqs).double().log().mean())

    def unigram_entropy(self, seqs: torch.Tensor) -> float:
        """Entropy (nats) of the token frequencies of ``seqs``: the loss of a model that ignores
        context."""
        p = torch.bincount(seqs.reshape(-1), minlength=self.vocab_size).double()
        p = p[p > 0] / p.sum()
        return float(-(p * p.log()).sum())

    def bigram_entropy(self, seqs: torch.Tensor) -> float:
        """Conditional entropy (nats) of a token given only the one before it, measured on
        ``seqs``: the best loss without looking two tokens back."""
        V = self.vocab_size
        c = torch.bincount(seqs[:, :-1].reshape(-1) * V + seqs[:, 1:].reshape(-1),
                           minlength=V * V).double().view(V, V)
        joint = c / c.sum()
        cond = c / c.sum(1, keepdim=True).clamp_min(1)
        m = joint > 0
        return float(-(joint[m] * cond[m].log()).sum())


def toy_language(vocab_size: int = 24, branching: int = 3, seed: int = 0) -> ToyLanguage:
    """A random (seeded) second-order Markov language: every context ``a, b`` has ``branching``
    successors with probabilities proportional to 1, 1/2, 1/4, ...

    >>> lang = toy_language(vocab_size=24, branching=3, seed=0)
    >>> lang.table.shape
    torch.Size([24, 24, 24])

    Raises:
        ConfigError: ``branching`` not in [1, vocab_size].
    """
    V = check_int(vocab_size, "vocab_size", "toy_language", low=2)
    k = check_int(branching, "branching", "toy_language", low=1)
    if k > V:
        raise ConfigError(f"The 'branching' parameter of toy_language must be an int in [1, vocab_size="
                          f"{V}]. Got {k} instead.")
    g = torch.Generator().manual_seed(int(seed))
    w = torch.tensor([0.5 ** i for i in range(k)])
    w = w / w.sum()
    table = torch.zeros(V, V, V)
    succ = torch.rand(V, V, V, generator=g).argsort(-1)[..., :k]  # (V, V, k) distinct successors
    table.scatter_(-1, succ, w.expand(V, V, k).contiguous())
    return ToyLanguage(table, int(seed))


def toy_decoder(vocab_size: int, hidden_size: int = 64, num_layers: int = 2, num_heads: int = 4,
                num_kv_heads: int = 2, intermediate_size: int = 176, max_len: int = 64, seed: int = 0
                ) -> Any:
    """A randomly initialised (seeded) LLaMA-style ``transformers.LlamaForCausalLM``: GQA (4 query
    heads over 2 key/value heads), RoPE, RMSNorm, SwiGLU, untied embeddings.

    Raises:
        ConfigError: ``transformers`` is not installed.
    """
    tf = need("transformers", "toy_decoder")
    cfg = tf.LlamaConfig(vocab_size=vocab_size, hidden_size=hidden_size,
                         intermediate_size=intermediate_size, num_hidden_layers=num_layers,
                         num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
                         max_position_embeddings=max_len, rms_norm_eps=1e-5, tie_word_embeddings=False,
                         attention_bias=False, mlp_bias=False, bos_token_id=None, eos_token_id=None,
                         pad_token_id=None)
    with torch.random.fork_rng(devices=[]):  # the caller's random state is left as it was
        torch.manual_seed(seed)
        return tf.LlamaForCausalLM(cfg).eval()


def train_toy_decoder(lang: ToyLanguage | None = None, steps: int = 200, batch_size: int = 32,
                      seq_len: int = 32, lr: float = 1e-2, seed: int = 0, **model_kwargs: Any) -> Any:
    """A :func:`toy_decoder` trained on fresh samples of ``lang`` (default :func:`toy_language`)
    with AdamW and cosine decay; deterministic for a seed (single-threaded CPU). Returns it in
    eval mode.

    >>> from graphprune.lm import mean_nll
    >>> lang = toy_language()
    >>> model = train_toy_decoder(lang)         # ~5 s on one core  # doctest: +SKIP
    >>> test = lang.sample(64, 32, seed=1)
    >>> mean_nll(model, test, seq_len=32) < lang.bigram_entropy(test)   # doctest: +SKIP
    True
    """
    from .train import next_token_step

    lang = lang or toy_language()
    check_int(steps, "steps", "train_toy_decoder", low=1)
    model = toy_decoder(lang.vocab_size, max_len=seq_len, seed=seed, **model_kwargs)
    data = lang.sample(steps * batch_size, seq_len, seed=seed + 1000).view(steps, batch_size, seq_len)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 20) * 0.5 * (1 + math.cos(math.pi * s / steps)))
    model.train()
    for x in data:
        next_token_step(model, opt, x)
        sched.step()
    return model.eval()
