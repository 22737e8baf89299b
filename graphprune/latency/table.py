"""Latency stage, the value users keep: ``LatencyTable``, a frozen, versioned, JSON measurement
of one model shape on one machine (CPU, threads, onnxruntime version, provider).

It holds the fitted kernel models (``model.py``), the variants they were fitted on, the NCHWc
block, the whole-model latencies of uniformly pruned variants at several channel roundings (the
measured steps ``round_to='auto'`` is chosen from), and the dense latency. ``predict_ms(widths)``
gives the latency of any channel counts; ``curves()`` each group's step curve; ``summary()`` a
readable table; ``plot()`` the curves (matplotlib, when installed).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from ..errors import ConfigError, GraphPruneError
from ..io import atomic_write_text
from .model import KernelModel, Predictor, pad

TABLE_FORMAT = "graphprune.latency_table"
TABLE_VERSION = 3  # 2: untimed warm-up runs open every turn; 3: power-law calibration (exponent)


class LatencyTableError(GraphPruneError, ValueError):
    """A latency table file is unreadable, malformed, or from another model or machine."""


@dataclass(frozen=True)
class Sample:
    """One measured variant: the widths of the groups it cut, and its latency on every clock
    (``measure.CLOCKS``: median and 25th percentile of wall-clock runs; profiled kernels at their
    25th percentile plus the time between them). ``kind`` is 'design' (fitted on) or 'uniform'
    (``sparsity`` and ``round_to`` as ``prune`` takes them)."""

    kind: str
    widths: Mapping[str, int]
    ms: Mapping[str, float]
    sparsity: float | None = None
    round_to: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "widths", MappingProxyType({k: int(v) for k, v in self.widths.items()}))
        object.__setattr__(self, "ms", MappingProxyType({k: float(v) for k, v in self.ms.items()}))

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"kind": self.kind, "ms": dict(self.ms), "widths": dict(self.widths)}
        if self.sparsity is not None:
            d["sparsity"], d["round_to"] = self.sparsity, self.round_to
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Sample:
        return cls(str(d["kind"]), dict(d["widths"]), dict(d["ms"]),
                   None if d.get("sparsity") is None else float(d["sparsity"]),
                   None if d.get("round_to") is None else int(d["round_to"]))


@dataclass(frozen=True)
class LatencyTable:
    """Measured latency model of one model shape on one machine.

    Example:
        >>> t = LatencyTable.build(model, torch.randn(1, 3, 224, 224), threads=2,
        ...                        cache="out/latency")          # minutes once, then instant
        >>> print(t.summary())
        >>> t.predict_ms({"features.2.conv.0.0": 48})            # other groups whole
        >>> t.round_to                                          # the rounding that stays fast
    """

    key: Mapping[str, Any]
    dense_ms: float
    block: int
    exponent: float
    sizes: Mapping[str, int]
    kernels: tuple[KernelModel, ...]
    samples: tuple[Sample, ...]
    round_to: int
    unmatched: tuple[str, ...] = ()
    meta: Mapping[str, Any] = field(default_factory=dict)
    version: int = TABLE_VERSION

    def __post_init__(self) -> None:
        object.__setattr__(self, "key", MappingProxyType(_json_copy(self.key)))
        object.__setattr__(self, "sizes", MappingProxyType({k: int(v) for k, v in self.sizes.items()}))
        object.__setattr__(self, "kernels", tuple(self.kernels))
        object.__setattr__(self, "samples", tuple(self.samples))
        object.__setattr__(self, "unmatched", tuple(self.unmatched))
        object.__setattr__(self, "meta", MappingProxyType(_json_copy(self.meta)))

    # ------------------------------------------------------------------ building
    @classmethod
    def build(cls, model: Any, example_inputs: Any, graph: Any = None, **options: Any) -> LatencyTable:
        """Measure ``model`` (see ``graphprune.latency.build_table`` for the options)."""
        from .build import build_table

        return build_table(model, example_inputs, graph, **options)

    @staticmethod
    def normalize_key(key: Mapping[str, Any]) -> dict[str, Any]:
        """``key`` as stored (JSON types), to compare with ``table.key``."""
        return _json_copy(key)

    # ------------------------------------------------------------------ predictions
    @property
    def predictor(self) -> Predictor:
        p = self.__dict__.get("_predictor")
        if p is None:
            p = Predictor(self.kernels, self.sizes, self.block)
            object.__setattr__(self, "_predictor", p)
        return p

    def full_widths(self, widths: Mapping[str, int] | None = None) -> dict[str, int]:
        """Every measured group's width: ``widths`` where given, else its size."""
        out = dict(self.sizes)
        for g, w in (widths or {}).items():
            if g in out:
                out[g] = min(int(w), out[g])
        return out

    def predict_ms(self, widths: Mapping[str, int]) -> float:
        """Predicted median latency (ms) with these channels kept per group (others whole)."""
        return self.dense_ms * self.predict_ratio(widths)

    def predict_ratio(self, widths: Mapping[str, int]) -> float:
        """Predicted latency relative to the dense model's: ``(kernels / dense kernels) **
        exponent`` (``build.calibrate``)."""
        return self.ratio_of(self.predictor.total(self.full_widths(widths)))

    def ratio_of(self, kernel_ms: float) -> float:
        """Latency / dense of a model whose kernels the predictor sums to ``kernel_ms``."""
        dense = self.predictor.total(dict(self.sizes))
        if dense <= 0:  # no kernel time modelled: nothing to predict a change from
            return 1.0
        return (max(kernel_ms, 0.0) / dense) ** self.exponent

    def kernel_budget(self, ratio: float) -> float:
        """The predictor's kernel milliseconds at which latency / dense is ``ratio``."""
        return self.predictor.total(dict(self.sizes)) * max(ratio, 0.0) ** (1.0 / self.exponent)

    def aligned(self, widths: Mapping[str, int]) -> bool:
        """Whether every cut group keeps a multiple of ``round_to`` (the widths measured fast)."""
        return all(int(w) >= self.sizes.get(g, 0) or int(w) % self.round_to == 0
                   for g, w in widths.items() if g in self.sizes)

    def curves(self) -> dict[str, list[tuple[int, float]]]:
        """Per group: (width, predicted latency change in ms vs dense, others whole) at every
        multiple of the block, the steps of the curve."""
        p, full = self.predictor, dict(self.sizes)
        total = p.total(full)
        out = {}
        for g, size in self.sizes.items():
            ws = sorted({*range(self.block, size, self.block), size})
            base = p.group_ms(g, full)
            out[g] = [(w, self.dense_ms * (self.ratio_of(total + p.group_ms(g, {**full, g: w}) - base) - 1))
                      for w in ws]
        return out

    @property
    def clock(self) -> str:
        """How latency is read (``measure.CLOCKS``): 'median' wall-clock runs on a quiet machine;
        their 'quartile' (25th percentile) when other processes preempt some runs; 'profile'
        (profiled kernels, preemption-free) when they preempt most: whichever the kernel model
        fitted first (``build.calibrate``)."""
        return str(self.meta.get("clock", "median"))

    def measured_ms(self, sample: Sample) -> float:
        return sample.ms[self.clock]

    def uniform_ratios(self) -> dict[int, list[tuple[float, float]]]:
        """Measured latency / dense of uniformly pruned variants, per ``round_to``: the steps."""
        dense = next(self.measured_ms(s) for s in self.samples if not s.widths)
        out: dict[int, list[tuple[float, float]]] = {}
        for s in self.samples:
            if s.kind == "uniform":
                out.setdefault(int(s.round_to), []).append((float(s.sparsity),
                                                             self.measured_ms(s) / dense))
        return {r: sorted(v) for r, v in sorted(out.items())}

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        return {
            "format": TABLE_FORMAT, "version": self.version, "key": _plain(self.key),
            "dense_ms": self.dense_ms, "block": self.block, "exponent": self.exponent,
            "round_to": self.round_to, "meta": _plain(self.meta), "sizes": dict(self.sizes),
            "unmatched": list(self.unmatched),
            "curves": {g: [[w, round(ms, 5)] for w, ms in c] for g, c in self.curves().items()},
            "kernels": [k.to_dict() for k in self.kernels],
            "samples": [s.to_dict() for s in self.samples],
        }

    @classmethod
    def from_dict(cls, d: Any, source: str = "latency table") -> LatencyTable:
        if not isinstance(d, Mapping) or d.get("format") != TABLE_FORMAT:
            raise LatencyTableError(f"{source} is not a graphprune latency table (expected "
                                    f"'format': '{TABLE_FORMAT}').")
        if d.get("version") != TABLE_VERSION:
            raise LatencyTableError(f"{source} has version {d.get('version')!r}; this graphprune "
                                    f"reads version {TABLE_VERSION}. Rebuild the table.")
        exponent = d.get("exponent")
        if not isinstance(exponent, (int, float)) or not 0 < exponent < 10:
            raise LatencyTableError(f"{source} is malformed: 'exponent' must be a number in (0, 10). "
                                    f"Got {exponent!r} instead. Rebuild the table.")
        try:
            return cls(key=d["key"], dense_ms=float(d["dense_ms"]), block=int(d["block"]),
                       exponent=float(d["exponent"]), sizes=dict(d["sizes"]),
                       kernels=tuple(KernelModel.from_dict(k) for k in d["kernels"]),
                       samples=tuple(Sample.from_dict(s) for s in d["samples"]),
                       round_to=int(d["round_to"]), unmatched=tuple(d.get("unmatched", ())),
                       meta=dict(d.get("meta", {})))
        except (KeyError, TypeError, ValueError) as e:
            raise LatencyTableError(f"{source} is malformed: {type(e).__name__}: {e}.") from e

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1, sort_keys=False) + "\n"

    @classmethod
    def from_json(cls, text: str, source: str = "latency table") -> LatencyTable:
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise LatencyTableError(f"{source} is not valid JSON: {e}.") from e
        return cls.from_dict(d, source)

    def save(self, path: str | os.PathLike) -> None:
        """Write the table as JSON, atomically."""
        atomic_write_text(path, self.to_json())

    @classmethod
    def load(cls, path: str | os.PathLike) -> LatencyTable:
        """Read a table written by ``save``."""
        from ..io import read_file

        return cls.from_json(read_file(path, "latency table", LatencyTableError, text=True),
                             source=f"latency table '{os.fspath(path)}'")

    def __eq__(self, other: object) -> bool:
        return isinstance(other, LatencyTable) and self._fields() == other._fields()

    def __hash__(self) -> int:
        return hash(json.dumps(_plain(self.key), sort_keys=True))

    def _fields(self) -> tuple:
        return (dict(self.key), self.dense_ms, self.block, self.exponent, dict(self.sizes),
                self.kernels, tuple(s.to_dict().__repr__() for s in self.samples), self.round_to,
                self.unmatched, dict(self.meta), self.version)

    # ------------------------------------------------------------------ views
    def summary(self, max_rows: int = 40) -> str:
        """Machine, dense latency, the measured roundings, and each group's step curve."""
        m = self.key.get("machine", {})
        lines = [f"latency table: {self.key.get('model', {}).get('class', '?')} on {m.get('cpu', '?')}, "
                 f"{m.get('threads')} threads, onnxruntime {m.get('onnxruntime')} "
                 f"({', '.join(m.get('providers', []))})",
                 f"dense {self.dense_ms:.3f} ms ({self.clock} clock); {len(self.kernels)} kernels over "
                 f"{len(self.sizes)} groups; NCHWc block {self.block}; round_to='auto' -> {self.round_to}"]
        if self.unmatched:
            lines.append(f"{len(self.unmatched)} kernel(s) follow no single group (kept fixed): "
                         f"{', '.join(self.unmatched[:3])}")
        ur = self.uniform_ratios()
        if ur:
            lines.append("measured latency / dense, uniform pruning (sparsity: ratio):")
            for r, pts in ur.items():
                lines.append(f"  round_to={r:<3} " + "  ".join(f"{s:.1f}: {q:.3f}" for s, q in pts))
        lines.append(f"{'group':<40} {'size':>5}  latency change (ms) at width (others whole)")
        curves = self.curves()
        for g in list(self.sizes)[:max_rows]:
            c = curves[g]
            pick = c if len(c) <= 6 else [c[int(round(i * (len(c) - 1) / 5))] for i in range(6)]
            lines.append(f"{g:<40} {self.sizes[g]:>5}  " + "  ".join(f"{w}:{ms:+.3f}" for w, ms in pick))
        if len(self.sizes) > max_rows:
            lines.append(f"... {len(self.sizes) - max_rows} more groups")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return (f"LatencyTable({self.key.get('model', {}).get('class', '?')}: dense {self.dense_ms:.3f} ms, "
                f"{len(self.sizes)} groups, round_to={self.round_to})")

    def plot(self, path: str | os.PathLike | None = None, groups: Sequence[str] | None = None,
             max_groups: int = 16):
        """Plot each group's step curve (latency change vs width) and the measured uniform
        ratios; save to ``path`` (atomically) if given. Needs matplotlib.

        Raises:
            ConfigError: matplotlib is not installed.
        """
        try:
            import matplotlib

            if path is not None:
                matplotlib.use("Agg", force=False)
            import matplotlib.pyplot as plt
        except ImportError as e:
            raise ConfigError("LatencyTable.plot needs matplotlib: pip install matplotlib.") from e
        curves = self.curves()
        names = list(groups) if groups is not None else sorted(
            curves, key=lambda g: min(ms for _, ms in curves[g]))[:max_groups]
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4.5))
        for g in names:
            ws, ms = zip(*curves[g])
            a1.step([w / self.sizes[g] for w in ws], ms, where="pre", label=g)
        a1.set_xlabel("fraction of the group's channels kept")
        a1.set_ylabel("latency change vs dense (ms)")
        a1.set_title(f"step curves (block {self.block})")
        a1.legend(fontsize=6)
        for r, pts in self.uniform_ratios().items():
            s, q = zip(*pts)
            a2.plot(s, q, marker="o", label=f"round_to={r}")
        a2.axhline(1.0, color="grey", lw=0.8)
        a2.set_xlabel("uniform sparsity")
        a2.set_ylabel("measured latency / dense")
        a2.legend(fontsize=8)
        fig.tight_layout()
        if path is not None:
            from ..io import atomic_path

            with atomic_path(path) as tmp:
                fig.savefig(tmp, format=os.path.splitext(os.fspath(path))[1][1:] or "png", dpi=110)
            plt.close(fig)
        return fig


def _plain(v: Any) -> Any:
    if isinstance(v, Mapping):
        return {str(k): _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    return v


def _json_copy(v: Mapping[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(_plain(v)))


def key_digest(key: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(_plain(key), sort_keys=True).encode()).hexdigest()[:16]


def aligned_widths(size: int, step: int, lowest: int = 1) -> list[int]:
    """Widths a group of ``size`` may keep at rounding ``step``: multiples of it, and ``size``."""
    return sorted({w for w in range(step, size, step) if w >= lowest} | {size})


__all__ = ["LatencyTable", "LatencyTableError", "Sample", "aligned_widths", "key_digest", "pad"]
