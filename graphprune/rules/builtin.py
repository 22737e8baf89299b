"""Importing this module registers every built-in rule."""

from . import aten, functional_layers, matmul, nn_attention, nn_modules, recurrent, torch_ops  # noqa: F401
