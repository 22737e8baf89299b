"""Every setting of a pruning run, once: the frozen ``PruneConfig``.

``prune``, ``make_plan``, the recipe's prune stage and the ``graphprune prune`` command all take
this one value; the command's options are generated from its fields (``add_arguments``), so the
parameter list exists in one place. Validation happens when the value is built, with one sentence
shape: "The 'sparsity' parameter of prune must be a float in [0, 1). Got 1.5 instead."

    >>> cfg = graphprune.PruneConfig(method="l1", sparsity=0.4, round_to=8)
    >>> r = graphprune.prune(model, x, cfg)
    >>> r = graphprune.prune(model, x, sparsity=0.4, method="l1")   # the same, as keywords
"""

from __future__ import annotations

import argparse
import numbers
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from ._validate import check_choice, check_fraction, check_int
from .errors import ConfigError, did_you_mean

TRACERS = ("auto", "fx", "export", "regions")  # graph capture (capture.trace)
GQA_MODES = ("group", "query")  # grouped-query heads (capture.trace)
TARGETS = ("target_macs", "target_params", "target_latency")
DEVICES = "'cpu', 'cuda', 'cuda:N' or 'auto'"


def _opt(help: str, *, cli: str | None = "", choices: Callable[[], Any] | tuple | None = None,
         **extra: Any) -> dict[str, Any]:
    """Field metadata: the help text and how the field appears on the command line
    (``cli=None``: not an option; ``""``: ``--field-name``)."""
    return {"help": help, "cli": cli, "choices": choices, **extra}


def _round_to_arg(text: str) -> int | str:
    """``--round-to``: an int, or 'auto'."""
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an int or 'auto', got {text!r}") from None


def _criteria() -> list[str]:
    from .criteria import list_criteria

    return sorted(list_criteria())


@dataclass(frozen=True)
class PruneConfig:
    """How to prune: what to remove, how much, how to choose and refit, how to capture and check.

    Give ``sparsity`` *or* one target (``target_macs``, ``target_params``, ``target_latency``);
    with neither, 50% of every prunable group's channels go. ``target_latency`` keeps a fraction
    of the model's onnxruntime CPU latency measured on this machine (a latency table: minutes to
    measure once, then read from ``latency_table``); see ``graphprune.latency``.

    Raises:
        ConfigError: a bad value, with the parameter named and the accepted values.
        RegistryError: an unknown method (the closest registered name is suggested).

    Example:
        >>> cfg = PruneConfig(method="lasso", reconstruct=True, target_macs=0.5)
        >>> graphprune.prune(model, x, cfg, calibration=images)
        >>> graphprune.prune(model, x, target_latency=0.5, latency_table="out/latency")
    """

    method: str = field(default="l1", metadata=_opt(
        "channel criterion or selector: l1, l2, fpgm, bn_scale, random (data-free); taylor, "
        "lasso, greedy (use calibration data)", choices=_criteria))
    sparsity: float | None = field(default=None, metadata=_opt(
        "fraction of each group's channels removed, in [0, 1) (0.5 when no target is given)",
        type=float))
    target_macs: float | None = field(default=None, metadata=_opt(
        "keep this fraction of the MACs (the sparsity is searched for)", type=float))
    target_params: float | None = field(default=None, metadata=_opt(
        "keep this fraction of the parameters (the sparsity is searched for)", type=float))
    target_latency: float | None = field(default=None, metadata=_opt(
        "keep this fraction of the model's onnxruntime CPU latency on this machine (measured once "
        "into a latency table; channels go where they cost most latency per unit of importance)",
        type=float))
    latency_table: str | None = field(default=None, metadata=_opt(
        "latency table: a .json file or a folder where measurements are read from, or stored "
        "after measuring (default: ~/.cache/graphprune/latency); also sets round_to='auto'",
        metavar="PATH"))
    latency_threads: int = field(default=2, metadata=_opt(
        "onnxruntime threads the latency is measured with (as deployed)", type=int))
    latency_rounds: int = field(default=20, metadata=_opt(
        "with target_latency: interleaved rounds timing the pruned model against the dense one "
        "(0: predicted latency only, no timing)", type=int))
    round_to: int | str = field(default=1, metadata=_opt(
        "keep channel counts a multiple of this; 'auto': the rounding measured fast in "
        "onnxruntime (the latency table's, else this CPU's channel block, e.g. 16)",
        type=_round_to_arg, metavar="N|auto"))
    global_pruning: bool = field(default=False, metadata=_opt(
        "rank channels across groups instead of the same sparsity everywhere"))
    max_group_sparsity: float = field(default=0.9, metadata=_opt(
        "with global pruning or a target: no group loses more than this fraction", type=float))
    config: tuple = field(default=(), metadata=_opt(
        "NNI-style list of {sparsity, op_types, op_names, exclude} entries (later entries win); "
        "on the command line a YAML/JSON file", metavar="FILE"))
    ignore: tuple = field(default=(), metadata=_opt(
        "modules (paths, classes or module objects) whose parameters must not change; on the "
        "command line a module path, repeatable", action="append", metavar="PATH"))
    reconstruct: bool = field(default=False, metadata=_opt(
        "refit every consumer of a pruned group by least squares on calibration data"))
    sequential: bool = field(default=True, metadata=_opt(
        "data-driven runs take each group's inputs from the model pruned so far"))
    seed: int = field(default=0, metadata=_opt(
        "random seed of selection and sampling (a recipe's top-level seed sets it)", cli=None))
    plan: str | None = field(default=None, metadata=_opt(
        "apply this saved plan (plan.json) instead of choosing channels", metavar="FILE"))
    tracer: str = field(default="auto", metadata=_opt(
        "graph capture: torch.fx, torch.export, traceable submodules as regions, or fx falling back "
        "to export, then regions", choices=TRACERS))
    gqa: str = field(default="group", metadata=_opt(
        "grouped-query attention: remove a key/value head with its query heads ('group'), or keep "
        "every key/value head and remove query heads, the same number in every group ('query')",
        choices=GQA_MODES))
    device: str | None = field(default=None, metadata=_opt(
        "where pruning runs (calibration, selection, reconstruction) and the pruned model lives: "
        "cpu, cuda, cuda:N or auto (a GPU if there is one); None = where the model is",
        metavar="DEVICE"))
    verify: bool | str | None = field(default=None, metadata=_opt(
        "check the pruned model's shapes: True (every layer), 'full' (every value), False; None "
        "= graphprune.checks().verify", cli=None))
    strict: bool | None = field(default=None, metadata=_opt(
        "a crashing channel rule raises instead of freezing its channels; None = "
        "graphprune.checks().strict", cli=None))

    def __post_init__(self) -> None:
        owner = "prune"
        from .criteria import get_criterion

        get_criterion(self.method)  # RegistryError listing the methods, with a suggestion
        if self.sparsity is not None:
            check_fraction(self.sparsity, "sparsity", owner)
        for name in TARGETS:
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, numbers.Real)
                                  or not 0.0 < float(v) <= 1.0):
                raise ConfigError(f"The '{name}' parameter of {owner} must be a float in (0, 1]. "
                                  f"Got {v!r} instead.", param=name)
        targets = [n for n in TARGETS if getattr(self, n) is not None]
        if len(targets) > 1:
            raise ConfigError(f"Give one target, not both '{targets[0]}' and '{targets[1]}'.",
                              param=targets[1])
        if targets and self.sparsity is not None:
            raise ConfigError(f"Give either 'sparsity' or a target ('{targets[0]}'), not both: the "
                              "target decides the sparsity.", param="sparsity")
        r = self.round_to
        if r != "auto" and (isinstance(r, bool) or not isinstance(r, numbers.Integral) or r < 1):
            raise ConfigError(f"The 'round_to' parameter of {owner} must be an int >= 1 or 'auto'. "
                              f"Got {r!r} instead.", param="round_to")
        if self.latency_table is not None and not isinstance(self.latency_table, str):
            raise ConfigError(f"The 'latency_table' parameter of {owner} must be a path (a .json "
                              f"file or a folder). Got {type(self.latency_table).__name__} instead "
                              "(pass a LatencyTable object to prune(..., latency_table=...)).",
                              param="latency_table")
        check_int(self.latency_threads, "latency_threads", owner, low=1)
        check_int(self.latency_rounds, "latency_rounds", owner)
        object.__setattr__(self, "device", _device_name(self.device, owner))
        check_fraction(self.max_group_sparsity, "max_group_sparsity", owner)
        check_int(self.seed, "seed", owner)
        check_choice(self.tracer, "tracer", owner, TRACERS)
        check_choice(self.gqa, "gqa", owner, GQA_MODES)
        if self.verify is not None:
            check_choice(self.verify, "verify", owner, (True, False, "full"))
        if self.plan is not None and not isinstance(self.plan, str):
            raise ConfigError(f"The 'plan' parameter of {owner} must be a path to a plan file. Got "
                              f"{type(self.plan).__name__} instead (pass a Plan object to "
                              "prune(..., plan=...)).", param="plan")
        from .plan import LayerConfig

        entries = self.config or ()
        if isinstance(entries, Mapping) or not isinstance(entries, (list, tuple)):
            raise ConfigError(f"The 'config' parameter of {owner} must be a list of entries such as "
                              f"{{'op_types': ['Conv2d'], 'sparsity': 0.5}}. Got {entries!r} instead.",
                              param="config")
        object.__setattr__(self, "config", tuple(LayerConfig.from_any(e) for e in entries))
        ign = self.ignore
        object.__setattr__(self, "ignore", tuple(ign) if isinstance(ign, (list, tuple)) else (ign,))

    # ------------------------------------------------------------------ derived
    @property
    def effective_sparsity(self) -> float:
        """The uniform sparsity a run starts from (0.5 when neither it nor a target is given)."""
        return 0.5 if self.sparsity is None else float(self.sparsity)

    @property
    def target(self) -> tuple[str, float] | None:
        """('macs' | 'params' | 'latency', fraction kept), if a budget replaces the sparsity."""
        for name in TARGETS:
            v = getattr(self, name)
            if v is not None:
                return name.removeprefix("target_"), float(v)
        return None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready settings (what a recipe and a report record)."""
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["config"] = [e.to_dict() for e in self.config]
        d["ignore"] = [i if isinstance(i, str) else getattr(i, "__name__", repr(i))
                       for i in self.ignore]
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], source: str = "the prune settings") -> PruneConfig:
        """Build from a mapping; an unknown key is an error naming the closest field."""
        if not isinstance(d, Mapping):
            raise ConfigError(f"{source} must be a mapping. Got {type(d).__name__} instead.")
        known = {f.name for f in fields(cls)}
        for k in d:
            if k not in known:
                raise ConfigError(f"Unknown key '{k}' in {source}. Allowed: "
                                  f"{', '.join(sorted(known))}.{did_you_mean(k, known)}", param=k)
        return cls(**dict(d))

    def replace(self, **changes: Any) -> PruneConfig:
        """A copy with ``changes`` (validated); an unknown name is a ConfigError."""
        return resolve(self, changes)


def _device_name(device: Any, owner: str) -> str | None:
    """``device`` as stored: None, 'auto', 'cpu', 'cuda' or 'cuda:N' (a ``torch.device`` is
    accepted and written as its string). Whether CUDA is there is checked when the run starts."""
    if device is None:
        return None
    name = str(device) if type(device).__name__ == "device" else device
    ok = isinstance(name, str) and (name in ("auto", "cpu", "cuda")
                                    or (name.startswith("cuda:") and name[5:].isdigit()))
    if not ok:
        hint = (" (the meta device holds no weights: prune a model that has them)"
                if str(name).startswith("meta") else "")
        raise ConfigError(f"The 'device' parameter of {owner} must be {DEVICES}. Got {device!r} "
                          f"instead.{hint}", param="device")
    return name


def resolve(config: PruneConfig | Mapping[str, Any] | None, options: Mapping[str, Any],
            owner: str = "prune") -> PruneConfig:
    """``config`` (or the defaults) with keyword ``options`` applied on top.

    Raises:
        ConfigError: an option that is not a field (with the closest name), or a bad value.
    """
    if config is None:
        base: dict[str, Any] = {}
    elif isinstance(config, PruneConfig):
        base = {f.name: getattr(config, f.name) for f in fields(config)}
    elif isinstance(config, Mapping):
        base = dict(config)
    else:
        raise ConfigError(f"The settings of {owner} must be a PruneConfig or a dict. Got "
                          f"{type(config).__name__} instead (an NNI-style list goes to config=[...]).")
    known = {f.name for f in fields(PruneConfig)}
    for k in options:
        if k not in known:
            raise ConfigError(f"{owner}() got an unknown setting '{k}'. Settings: "
                              f"{', '.join(sorted(known))}.{did_you_mean(k, known)}", param=k)
    # how much to prune is one choice: a sparsity or a target given here replaces the base's
    amount = ("sparsity", *TARGETS)
    if any(options.get(k) is not None for k in amount):
        base = {k: v for k, v in base.items() if k not in amount}
    return PruneConfig.from_dict({**base, **options})


# ---------------------------------------------------------------------- command line
def flag(name: str) -> str:
    """The command-line option of a field: ``target_macs`` -> ``--target-macs``."""
    f = {f.name: f for f in fields(PruneConfig)}[name]
    return f.metadata.get("cli") or "--" + name.replace("_", "-")


def add_arguments(parser: argparse.ArgumentParser, only: tuple[str, ...] | None = None,
                  shown: PruneConfig | None = None) -> None:
    """Add an option for every command-line field of ``PruneConfig``. Parsed defaults stay
    ``None`` (what is not given comes from the recipe); the help shows ``shown``'s values."""
    shown = shown or PruneConfig()
    for f in fields(PruneConfig):
        md = f.metadata
        if md.get("cli") is None or (only is not None and f.name not in only):
            continue
        default = getattr(shown, f.name)
        kw: dict[str, Any] = {"dest": f.name, "default": None}
        choices = md.get("choices")
        if callable(choices):
            choices = choices()
        if f.type == "bool":
            kw["action"] = argparse.BooleanOptionalAction
        elif md.get("action"):
            kw["action"] = md["action"]
        else:
            if md.get("type"):
                kw["type"] = md["type"]
            if choices:
                kw["choices"] = list(choices)
        if md.get("metavar"):
            kw["metavar"] = md["metavar"]
        suffix = "" if default in (None, (), "") else f" (default {default})"
        kw["help"] = md["help"] + suffix
        parser.add_argument(flag(f.name), **kw)


def given_options(args: argparse.Namespace) -> dict[str, Any]:
    """The ``PruneConfig`` fields given on the command line (files read, lists made tuples)."""
    out: dict[str, Any] = {}
    for f in fields(PruneConfig):
        if f.metadata.get("cli") is None:
            continue
        v = getattr(args, f.name, None)
        if v is None:
            continue
        if f.name == "config":
            v = read_config_list(v)
        out[f.name] = tuple(v) if isinstance(v, list) else v
    return out


def read_config_list(path: str) -> list[Any]:
    """An NNI-style config list from a YAML or JSON file."""
    from .io import read_file

    text = read_file(path, "config file", ConfigError, text=True)
    try:
        import yaml

        d = yaml.safe_load(text)
    except Exception as e:
        raise ConfigError(f"config file '{path}' is not valid YAML/JSON: {e}") from e
    if isinstance(d, Mapping) and "config" in d:
        d = d["config"]
    if not isinstance(d, list):
        raise ConfigError(f"config file '{path}' must hold a list of entries such as "
                          f"{{op_types: [Conv2d], sparsity: 0.5}}. Got {type(d).__name__}.")
    return d


def cli_message(e: Exception) -> str:
    """A library error about a setting, reworded for the command line (naming the option)."""
    param = getattr(e, "param", None)
    msg = str(e)
    names = {f.name for f in fields(PruneConfig) if f.metadata.get("cli") is not None}
    if param in names:
        for owner in ("prune", "make_plan"):
            msg = msg.replace(f"The '{param}' parameter of {owner}", flag(param))
    if isinstance(e, ConfigError):
        for name in names:
            msg = msg.replace(f"'{name}'", flag(name))
    return msg
