"""Language models for measuring LLM pruning: a corpus that ships with Python, tokenizers, a
small LLaMA-style reference model trained once and cached, held-out perplexity, calibration
windows from text, and a toy language for tests.

The flow: ``stdlib_corpus()`` (data) -> ``pretrained_lm()`` (tokenizer + model, cached) ->
``corpus_calibration``/``text_calibration`` (calibration ids) -> prune -> ``perplexity``.
Importing this package imports neither ``transformers`` nor ``tokenizers``; the functions that
need them import them and raise a ConfigError naming the ``hf`` extra when they are missing.

>>> import torch, graphprune.lm as lm
>>> round(lm.perplexity(lambda ids: torch.zeros(*ids.shape, 7), torch.arange(20) % 7, seq_len=5), 3)
7.0
"""

from .cache import cache_root
from .calib import corpus_calibration, random_windows, text_calibration
from .corpus import Corpus, Document, make_corpus, stdlib_corpus, stdlib_documents
from .job import model_tokenizer, text_data
from .pruning import prune_lm
from .eval import logits_of, mean_nll, nll, perplexity, tokens_per_second, unigram_perplexity
from .tokenizer import ByteTokenizer, encode, encode_documents, load_tokenizer, train_tokenizer
from .toy import ToyLanguage, toy_decoder, toy_language, train_toy_decoder
from .train import LMSpec, TrainedLM, llama_config, pretrained_lm, train_causal_lm

__all__ = [
    "ByteTokenizer", "Corpus", "Document", "LMSpec", "ToyLanguage", "TrainedLM", "cache_root",
    "corpus_calibration", "encode", "encode_documents", "llama_config", "load_tokenizer",
    "logits_of", "make_corpus", "mean_nll", "model_tokenizer", "nll", "perplexity", "pretrained_lm",
    "prune_lm", "random_windows", "text_data",
    "stdlib_corpus", "stdlib_documents", "text_calibration", "tokens_per_second", "toy_decoder",
    "toy_language", "train_causal_lm", "train_tokenizer", "train_toy_decoder", "unigram_perplexity",
]
