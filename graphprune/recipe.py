"""A recipe: the stages of a prune-then-export run (model, data, prune, finetune, quantize, code,
export) as one validated, JSON/YAML-serialisable value. The report records it, so a run can be
repeated exactly with ``graphprune prune --recipe recipe.json``."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from ._validate import check_choice, check_fraction, check_int
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
    calibration_samples: int = 256
    eval_samples: int = 2048


@dataclass
class PruneStage:
    method: str = "lasso"
    sparsity: float | None = 0.5
    target_macs: float | None = None
    target_params: float | None = None
    reconstruct: bool = True
    sequential: bool = True
    round_to: int = 1
    global_pruning: bool = False
    max_group_sparsity: float = 0.9
    config: list[dict[str, Any]] = field(default_factory=list)  # per-layer overrides (NNI style)
    ignore: list[str] = field(default_factory=list)
    plan: str | None = None
    tracer: str = "auto"  # auto | fx | export


@dataclass
class FinetuneStage:
    epochs: int = 5
    lr: float = 1e-3
    batch_size: int = 64


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
    prune: PruneStage = field(default_factory=PruneStage)
    finetune: FinetuneStage = field(default_factory=FinetuneStage)
    quantize: QuantizeStage = field(default_factory=QuantizeStage)
    code: CodeStage = field(default_factory=CodeStage)
    export: ExportStage = field(default_factory=ExportStage)
    seed: int = 0
    sensitivity: bool = False
    version: int = RECIPE_VERSION

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

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
            stage_cls = {"model": ModelStage, "data": DataStage, "prune": PruneStage,
                         "finetune": FinetuneStage, "quantize": QuantizeStage, "code": CodeStage,
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
        p = self.prune
        from .criteria import get_criterion

        get_criterion(p.method)
        if p.sparsity is not None:
            check_fraction(p.sparsity, "sparsity", "the prune stage")
        for name in ("target_macs", "target_params"):
            if getattr(p, name) is not None:
                check_fraction(getattr(p, name), name, "the prune stage", allow_one=True)
        check_int(p.round_to, "round_to", "the prune stage", low=1)
        check_choice(p.tracer, "tracer", "the prune stage", ("auto", "fx", "export"))
        check_int(self.finetune.epochs, "epochs", "the finetune stage")
        check_int(self.model.train_epochs, "train_epochs", "the model stage")
        check_int(self.data.calibration_samples, "calibration_samples", "the data stage", low=1)
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
