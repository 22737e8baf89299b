"""Stage 4: scores -> Plan, a frozen, versioned, JSON value: which channels each group keeps.

A plan is keyed by group name (the module path of the group's first producer), so it can be
saved, edited by hand (change a count, pin a layer), diffed, and replayed on a fresh instance of
the same architecture. The mask files are derived from it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import numpy as np

from ._validate import check_fraction, check_int
from .opmatch import Selector
from .errors import ConfigError, PlanError
from .graph import ChannelGraph, Group
from .io import atomic_write_text
from .sparsity import n_kept

PLAN_VERSION = 1


@dataclass(frozen=True)
class GroupPlan:
    """Of ``size`` channels, keep the (sorted) indices ``keep``.

    Example:
        >>> graphprune.GroupPlan(size=8, keep=(0, 2, 5)).removed   # (1, 3, 4, 6, 7)
    """

    size: int
    keep: tuple[int, ...]

    @property
    def removed(self) -> tuple[int, ...]:
        k = set(self.keep)
        return tuple(i for i in range(self.size) if i not in k)


@dataclass(frozen=True)
class Plan:
    """Channels to keep per group, plus free-form ``meta`` (method, sparsity, model...).

    Example:
        >>> r.plan.save("plan.json")                 # edit a count, delete a group to pin it
        >>> graphprune.prune(fresh, x, plan=graphprune.Plan.load("plan.json"))
    """

    groups: Mapping[str, GroupPlan]
    meta: Mapping[str, Any] = field(default_factory=dict)
    version: int = PLAN_VERSION

    def __post_init__(self) -> None:
        object.__setattr__(self, "groups", MappingProxyType(dict(self.groups)))
        object.__setattr__(self, "meta", MappingProxyType(dict(self.meta)))

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        return {
            "format": "graphprune.plan",
            "version": self.version,
            "meta": dict(self.meta),
            "groups": {k: {"size": g.size, "keep": list(g.keep)} for k, g in self.groups.items()},
        }

    def to_json(self) -> str:
        """JSON with one line per group, easy to read, edit and diff."""
        d = self.to_dict()
        groups = ",\n".join(f"  {json.dumps(k)}: {json.dumps(v)}" for k, v in d["groups"].items())
        return ("{\n"
                f' "format": {json.dumps(d["format"])},\n'
                f' "version": {d["version"]},\n'
                f' "meta": {json.dumps(d["meta"])},\n'
                f' "groups": {{\n{groups}\n }}\n'
                "}")

    def save(self, path: str) -> None:
        """Write the plan as JSON (atomically)."""
        atomic_write_text(path, self.to_json() + "\n")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], source: str = "plan") -> Plan:
        if not isinstance(d, Mapping) or d.get("format") != "graphprune.plan":
            raise PlanError(f"{source} is not a graphprune plan (expected a JSON object with "
                            "\"format\": \"graphprune.plan\").")
        if d.get("version") != PLAN_VERSION:
            raise PlanError(f"{source} has plan version {d.get('version')!r}; this graphprune "
                            f"reads version {PLAN_VERSION}.")
        groups = {}
        for name, g in dict(d.get("groups", {})).items():
            try:
                size, keep = int(g["size"]), tuple(int(i) for i in g["keep"])
            except (KeyError, TypeError, ValueError) as e:
                raise PlanError(f"{source}: group '{name}' must have an int 'size' and a list of "
                                f"int 'keep'. Got {g!r}.") from e
            groups[name] = GroupPlan(size, tuple(sorted(set(keep))))
        return cls(groups=groups, meta=dict(d.get("meta", {})))

    @classmethod
    def from_json(cls, text: str, source: str = "plan") -> Plan:
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise PlanError(f"{source} is not valid JSON: {e}") from e
        return cls.from_dict(d, source)

    @classmethod
    def load(cls, path: str) -> Plan:
        """Read a plan written by ``save`` (or edited by hand)."""
        from .io import read_file

        return cls.from_json(read_file(path, "plan file", PlanError, text=True),
                             source=f"plan file '{path}'")

    # ------------------------------------------------------------------ views
    @property
    def channels(self) -> dict[str, tuple[int, int]]:
        """Group name -> (channels before, channels after)."""
        return {k: (g.size, len(g.keep)) for k, g in self.groups.items()}

    def summary(self) -> str:
        lines = [f"{'group':<48} {'before':>7} {'after':>7}"]
        for k, (a, b) in self.channels.items():
            lines.append(f"{k:<48} {a:>7} {b:>7}")
        return "\n".join(lines)

    def validate(self, graph: ChannelGraph) -> None:
        """Check the plan against ``graph``: groups exist, sizes match, indices valid."""
        names = {g.name for g in graph.groups}
        unknown = [k for k in self.groups if k not in names]
        if unknown:
            from .errors import did_you_mean

            raise PlanError(
                f"the plan names {len(unknown)} group(s) the model does not have: "
                f"{', '.join(unknown[:5])}{' ...' if len(unknown) > 5 else ''}."
                f"{did_you_mean(unknown[0], names)} Is the plan from another architecture?")
        for k, gp in self.groups.items():
            g = graph.group(k)
            if gp.size != g.size:
                raise PlanError(f"plan group '{k}' has size {gp.size} but the model's group has "
                                f"{g.size} channels: the plan is from another architecture or width.")
            if not gp.keep:
                raise PlanError(f"plan group '{k}' keeps no channel: every group keeps at least one.")
            if gp.keep[0] < 0 or gp.keep[-1] >= g.size:
                bad = gp.keep[-1] if gp.keep[-1] >= g.size else gp.keep[0]
                raise PlanError(f"plan group '{k}' keeps index {bad} outside [0, {g.size}).")
            if len(gp.keep) < g.size and not g.prunable:
                raise PlanError(f"plan group '{k}' removes channels but the group cannot be pruned: "
                                f"{g.reason}.")


# ---------------------------------------------------------------------- how much to keep
def keep_count(n: int, sparsity: float, round_to: int = 1) -> int:
    """Channels kept of ``n`` at ``sparsity``: at least one (or ``round_to``), the nearest
    multiple of ``round_to`` where possible: ``graphprune.sparsity.n_kept``, the exact rule every
    stage shares (0.58 of 100 keeps 42)."""
    return n_kept(n, sparsity, round_to=round_to)


@dataclass(frozen=True)
class LayerConfig:
    """One entry of an NNI-style config list; later entries override earlier ones.

    ``op_types`` are module class names (``"Conv2d"``; ``"default"`` = Conv and Linear),
    ``op_names`` module paths (shell globs allowed); a group matches if one of its producer modules
    matches. ``exclude=True`` leaves matching groups alone.

    Raises:
        ConfigError: an unknown key or a bad sparsity (an entry without op_types selects the
            default layers, or any class when it names op_names).

    Example:
        >>> graphprune.LayerConfig.from_any({"op_names": ["layer4.*"], "sparsity": 0.3})
    """

    sparsity: float | None = None
    op_types: tuple[str, ...] = ()
    op_names: tuple[str, ...] = ()
    exclude: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "op_types", _as_tuple(self.op_types, "op_types"))
        object.__setattr__(self, "op_names", _as_tuple(self.op_names, "op_names"))
        if self.exclude:
            if self.sparsity is not None:
                raise ConfigError("A config list entry with 'exclude': True takes no 'sparsity'.")
        elif self.sparsity is None:
            raise ConfigError("A config list entry must give 'sparsity' (or 'exclude': True).")
        else:
            check_fraction(self.sparsity, "sparsity", "a config list entry")

    @classmethod
    def from_any(cls, e: Any) -> LayerConfig:
        if isinstance(e, LayerConfig):
            return e
        if not isinstance(e, Mapping):
            raise ConfigError(f"A config list entry must be a dict. Got {type(e).__name__} instead.")
        allowed = {"sparsity", "op_types", "op_names", "exclude", "sparsity_per_layer"}
        bad = set(e) - allowed
        if bad:
            from .errors import did_you_mean

            k = sorted(bad)[0]
            raise ConfigError(f"Unknown key '{k}' in a config list entry. Allowed: "
                              f"{', '.join(sorted(allowed))}.{did_you_mean(k, allowed)}")
        sp = e.get("sparsity", e.get("sparsity_per_layer"))
        return cls(sp, tuple(e.get("op_types", ())), tuple(e.get("op_names", ())),
                   bool(e.get("exclude", False)))

    def to_dict(self) -> dict[str, Any]:
        """The entry as written in a config list."""
        d: dict[str, Any] = {}
        if self.op_types:
            d["op_types"] = list(self.op_types)
        if self.op_names:
            d["op_names"] = list(self.op_names)
        if self.exclude:
            d["exclude"] = True
        else:
            d["sparsity"] = self.sparsity
        return d

    def matches(self, group: Group, modules: Mapping[str, Any]) -> bool:
        """Does one of the group's producers match (the defaults of ``opmatch.Selector``)?"""
        sel = Selector(self.op_types or (None if self.op_names else ("default",)), self.op_names)
        mods = [m.module for m in group.sources] or group.modules
        return any(sel.selects(m, modules.get(m)) for m in mods)


def _as_tuple(v: Any, name: str) -> tuple[str, ...]:
    if isinstance(v, str):
        return (v,)
    if not isinstance(v, Sequence) or not all(isinstance(x, str) for x in v):
        raise ConfigError(f"'{name}' in a config list entry must be a list of str. Got {v!r}.")
    return tuple(v)


def group_sparsities(graph: ChannelGraph, sparsity: float, config: Sequence[Any] | None,
                     ignore: Sequence[Any] = ()) -> dict[str, tuple[float, str | None]]:
    """Target sparsity per prunable group, and why a group is left alone (or None)."""
    types = {n: type(m).__name__ for n, m in graph.modules.items()}
    entries = [LayerConfig.from_any(e) for e in (config or [])]
    ignored_names, ignored_types = _split_ignore(graph, ignore)
    out: dict[str, tuple[float, str | None]] = {}
    matched = [False] * len(entries)
    for g in graph.groups:
        if not g.prunable:
            continue
        s, why = (sparsity if not entries else 0.0), (None if not entries else "no config entry")
        for k, e in enumerate(entries):
            if e.matches(g, graph.modules):
                matched[k] = True
                s, why = (0.0, "excluded by config") if e.exclude else (e.sparsity, None)
        hit = [m for m in g.modules if m in ignored_names or types.get(m) in ignored_types]
        if hit:
            s, why = 0.0, f"touches ignored module '{hit[0]}'"
        out[g.name] = (s, why)
    unused = [entries[k] for k in range(len(entries)) if not matched[k]]
    if unused and not any(matched):
        raise ConfigError(
            f"No prunable group matches the config list entry {unused[0]}: check 'op_types' "
            f"(class names such as {', '.join(sorted(set(types.values()))[:4])}) and 'op_names' "
            "(module paths, globs allowed).")
    return out


def _split_ignore(graph: ChannelGraph, ignore: Sequence[Any]) -> tuple[set[str], set[str]]:
    names, types = set(), set()
    by_obj = {id(m): n for n, m in graph.modules.items()}
    all_names = set(by_obj.values())
    for item in ignore or ():
        if isinstance(item, type):
            types.add(item.__name__)
        elif isinstance(item, str):
            if item in all_names:
                names.add(item)
                names.update(n for n in all_names if n.startswith(item + "."))
            else:
                from .errors import did_you_mean

                raise ConfigError(f"'ignore' names module '{item}' which the model does not have."
                                  f"{did_you_mean(item, all_names)}")
        elif id(item) in by_obj:
            n = by_obj[id(item)]
            names.add(n)
            names.update(x for x in all_names if x.startswith(n + "."))
        else:
            raise ConfigError(f"'ignore' entries must be module paths, module classes or modules "
                              f"of the model. Got {item!r}.")
    return names, types


def plan_from_scores(graph: ChannelGraph, scores: Mapping[str, np.ndarray],
                     amounts: Mapping[str, int], meta: Mapping[str, Any] | None = None) -> Plan:
    """Keep the ``amounts[g]`` highest-scoring units of each group (ties: lower index first)."""
    groups = {}
    for g in graph.groups:
        n_keep = amounts.get(g.name, g.size)
        if n_keep >= g.size:
            continue
        s = np.asarray(scores[g.name])
        order = np.lexsort((np.arange(g.size), -s))  # descending score, then index
        groups[g.name] = GroupPlan(g.size, tuple(np.sort(order[:n_keep]).tolist()))
    return Plan(groups=groups, meta=dict(meta or {}))


def check_sparsity(sparsity: Any, owner: str = "prune") -> float:
    return check_fraction(sparsity, "sparsity", owner)


def check_round_to(round_to: Any, owner: str = "prune") -> int:
    return check_int(round_to, "round_to", owner, low=1)


def comp_keep_for(graph: ChannelGraph, plan: Plan) -> np.ndarray:
    """Keep flag per channel unit (component) of ``graph`` under ``plan`` (not validated)."""
    keep = np.ones(graph.ncomp, dtype=bool)
    for name, gp in plan.groups.items():
        g = graph.group(name)
        drop = np.ones(g.size, dtype=bool)
        drop[list(gp.keep)] = False
        keep[g.comps[drop]] = False
    return keep
