"""Importing this module registers every built-in rule."""

from . import aten, functional, functions, matmul, modules, transformer  # noqa: F401
