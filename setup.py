"""Packages: graphprune/* plus the repository's reference architectures (models/), which ship
inside the package as ``graphprune.models`` so that the embedded default works from a wheel.
Everything else is declared in pyproject.toml."""

from setuptools import find_packages, setup

setup(
    packages=find_packages(include=["graphprune", "graphprune.*"]) + ["graphprune.models"],
    package_dir={"graphprune.models": "models"},
)
