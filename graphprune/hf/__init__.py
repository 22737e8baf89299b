"""Hugging Face ``transformers`` models in graphprune: load a local ``save_pretrained`` directory,
example inputs, and, after pruning, a config that describes the smaller model, saved and loaded
without pickle (``save_pruned`` / ``load_pruned``). ``transformers`` is the optional extra ``hf``.

    >>> model = graphprune.hf.load("tiny-llama/")          # or any PreTrainedModel
    >>> r = graphprune.prune(model, graphprune.hf.example_inputs(model), sparsity=0.3)
    >>> graphprune.hf.save_pruned(r, "tiny-llama-pruned/")
    >>> small = graphprune.hf.load_pruned("tiny-llama-pruned/")
"""

from .loading import capture_kwargs, example_inputs, is_hf_model, load
from .pruned import load_pruned, save_pruned, update_config

__all__ = ["capture_kwargs", "example_inputs", "is_hf_model", "load", "load_pruned",
           "save_pruned", "update_config"]
