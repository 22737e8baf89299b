"""Importing this module registers every built-in rule."""

from . import (  # noqa: F401
    aten, detection, einsum, functional_layers, hf_layers, matmul, nn_attention, nn_modules, recurrent,
    torch_ops, tv_layers, ultralytics_layers,
)
