"""Importing this module registers every built-in rule."""

from . import functions, modules  # noqa: F401
