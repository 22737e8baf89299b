"""A recipe: the stages of a prune-then-export run (model, data, prune, finetune, quantize, code,
export) as one validated, JSON/YAML-serialisable value. The report records it, so a run can be
repeated exactly with ``graphprune prune --recipe recipe.json``."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from typing import Any

from ._validate import check_choice, check_int
from .config import PruneConfig
from .errors import ConfigError, did_you_mean

RECIPE_VERSION = 1


@dataclass
class ModelStage:
    spec: str = "digits"
    weights: str | None = None
    input_shape: list[int] | None = None
    train_epochs: int = 12  # only for the embedded default without weights (trained, cached)


@dataclass
class DataStage:
    source: str | None = None  # digits, photos, random, a .npz/.npy file or an image folder
    # None: 256, or 64 for ImageNet-size inputs (>= 160x160 pixels: the main job stays minutes on a CPU)
    calibration_samples: int | None = None
    eval_samples: int = 2048


# the main job has data, so unlike a bare ``prune`` call it refits the consumers by default
MAIN_JOB_PRUNE = {"reconstruct": True}


def _main_job_prune() -> PruneConfig:
    return PruneConfig(**MAIN_JOB_PRUNE)


@dataclass
class FinetuneStage:
    epochs: int = 5
    lr: float = 1e-3
    batch_size: int = 64  # the global batch: N processes under torchrun take batch_size / N each
    optimizer: str = "adamw"  # adamw | sgd (momentum 0.9)


@dataclass
class QuantizeStage:
    mode: str = "int8"  # none | int8
    calibrate_method: str = "minmax"


@dataclass
class CodeStage:
    enabled: bool = False
    scheme: str = "kmeans"
    bits: int = 4
    method: str = "huffman"
    finetune_epochs: int = 2


@dataclass
class ExportStage:
    exporter: str = "auto"


@dataclass
class Recipe:
    """Every setting of a run. ``Recipe.from_dict`` validates; ``to_dict`` round-trips."""

    model: ModelStage = field(default_factory=ModelStage)
    data: DataStage = field(default_factory=DataStage)
    prune: PruneConfig = field(default_factory=_main_job_prune)
    finetune: FinetuneStage = field(default_factory=FinetuneStage)
    quantize: QuantizeStage = field(default_factory=QuantizeStage)
    code: CodeStage = field(default_factory=CodeStage)
    export: ExportStage = field(default_factory=ExportStage)
    seed: int = 0
    sensitivity: bool = False
    version: int = RECIPE_VERSION

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        return {k: (v.to_dict() if isinstance(v, PruneConfig) else
                    asdict(v) if is_dataclass(v) else v) for k, v in d.items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "recipe") -> Recipe:
        if not isinstance(d, dict):
            raise ConfigError(f"{source} must be a mapping of stages. Got {type(d).__name__}.")
        if "recipe" in d and isinstance(d["recipe"], dict):  # a report.json
            d = d["recipe"]
        if d.get("version", RECIPE_VERSION) != RECIPE_VERSION:
            raise ConfigError(f"{source} has recipe version {d.get('version')!r}; this graphprune "
                              f"reads version {RECIPE_VERSION}.")
        kw: dict[str, Any] = {}
        top = {f.name: f for f in fields(cls)}
        for k, v in d.items():
            if k not in top:
                raise ConfigError(f"Unknown key '{k}' in {source}. Allowed: {', '.join(top)}."
                                  f"{did_you_mean(k, top)}")
            if k == "prune":
                kw[k] = _prune_stage(v, source)
                continue
            stage_cls = {"model": ModelStage, "data": DataStage, "finetune": FinetuneStage,
                         "quantize": QuantizeStage, "code": CodeStage,
                         "export": ExportStage}.get(k)
            if stage_cls is None:
                kw[k] = v
                continue
            if not isinstance(v, dict):
                raise ConfigError(f"'{k}' in {source} must be a mapping. Got {v!r}.")
            allowed = {f.name for f in fields(stage_cls)}
            for sk in v:
                if sk not in allowed:
                    raise ConfigError(f"Unknown key '{k}.{sk}' in {source}. Allowed: "
                                      f"{', '.join(sorted(allowed))}.{did_you_mean(sk, allowed)}")
            kw[k] = stage_cls(**v)
        r = cls(**kw)
        r.validate()
        return r

    @classmethod
    def load(cls, path: str) -> Recipe:
        from .io import read_file

        text = read_file(path, "recipe", ConfigError, text=True)
        try:
            if path.endswith((".yaml", ".yml")):
                import yaml

                d = yaml.safe_load(text)
            else:
                d = json.loads(text)
        except Exception as e:
            kind = "YAML" if path.endswith((".yaml", ".yml")) else "JSON"
            raise ConfigError(f"recipe '{path}' is not valid {kind}: {e}") from e
        return cls.from_dict(d, f"recipe '{os.path.basename(path)}'")

    def validate(self) -> None:
        """Check every stage (the prune stage validated itself when it was built)."""
        if not isinstance(self.prune, PruneConfig):
            raise ConfigError(f"The prune stage of a recipe must be a PruneConfig. Got "
                              f"{type(self.prune).__name__} instead.")
        check_int(self.finetune.epochs, "epochs", "the finetune stage")
        check_int(self.model.train_epochs, "train_epochs", "the model stage")
        if self.data.calibration_samples is not None:
            check_int(self.data.calibration_samples, "calibration_samples", "the data stage", low=1)
        check_choice(self.finetune.optimizer, "optimizer", "the finetune stage", ("adamw", "sgd"))
        check_choice(self.quantize.mode, "mode", "the quantize stage", ("none", "int8"))
        check_choice(self.export.exporter, "exporter", "the export stage",
                     ("auto", "dynamo", "legacy"))
        check_choice(self.code.method, "method", "the code stage",
                     ("huffman", "linear", "fixed_point", "raw"))
        check_choice(self.code.scheme, "scheme", "the code stage",
                     ("kmeans", "linear", "fixed_point", "naive"))
        if self.finetune.lr <= 0:
            raise ConfigError(f"The 'lr' parameter of the finetune stage must be > 0. Got "
                              f"{self.finetune.lr!r} instead.")


def _prune_stage(v: Any, source: str) -> PruneConfig:
    """The prune stage of a recipe file: the main job's defaults, then the file's settings."""
    if not isinstance(v, dict):
        raise ConfigError(f"'prune' in {source} must be a mapping. Got {v!r}.")
    try:
        return PruneConfig.from_dict({**MAIN_JOB_PRUNE, **v}, source=f"'prune' in {source}")
    except ConfigError as e:
        if "Unknown key" in str(e):
            raise
        raise ConfigError(f"{source}, prune stage: {e}", param=e.param) from e
