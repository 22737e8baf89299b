"""Channel rule for ``torch.einsum`` (and ``aten.einsum``), read from its equation.

Every operand dim gets a letter (``...`` expands to shared broadcast letters; without ``->`` the
output is the broadcast letters then the letters seen once, sorted). Channel axes are then matched
letter by letter:

- a letter of the output passes the channels of every operand on it to the output dim, coupled
  element by element (``bhnd,bhmd->bhnm`` keeps whole heads ``h`` of queries, keys and scores);
- a contracted letter (in two or more operands, not in the output) couples the operands'
  channels on it element by element, like the ``K`` of a matrix product; the other letters of a
  channel axis spanning a contracted one (the heads of a (heads, head_dim) axis) carry on to the
  output, so the contracted positions of each go together;
- an operand that is full-size on a letter but has no channel there pins that letter's size;
- a letter repeated in one operand (a diagonal or a trace), a letter summed over in a single
  operand, a channel axis that broadcasts, and equations that cannot be read freeze the channels
  involved, with the reason.

A channel axis spanning several dims (heads x head_dim split by a view) is matched as a whole
when the other operand has the same structure, letter by letter (``Builder.along``) otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.fx as fx

from ..trace import TensorSpec
from .common import empty_like_spec, freeze_inputs, out_spec
from .elements import Axis, Builder, TInfo
from .registry import op_rule


class EquationError(ValueError):
    """An einsum equation this rule cannot read (the channels involved are frozen)."""


def parse_equation(equation: str, ndims: list[int]) -> tuple[list[list[str]], list[str]]:
    """The label of every dim of every operand, and of every output dim.

    Letters label themselves; the dims covered by ``...`` get the labels ``'.0'``, ``'.1'``...
    aligned to the right across operands (numpy broadcasting).

    Example:
        >>> parse_equation("b...d,de->b...e", [3, 2])
        ([['b', '.0', 'd'], ['d', 'e']], ['b', '.0', 'e'])

    Raises:
        EquationError: the equation does not fit the operands.
    """
    eq = equation.replace(" ", "")
    lhs, arrow, rhs = eq.partition("->")
    terms = lhs.split(",")
    if len(terms) != len(ndims):
        raise EquationError(f"{len(terms)} operand terms for {len(ndims)} operands")
    n_ell = []
    for t, nd in zip(terms, ndims):
        named = t.replace("...", "")
        if not named.isalpha() and named:
            raise EquationError(f"term {t!r} has a character that is not a letter")
        if "..." in t:
            if t.count("...") > 1 or nd < len(named):
                raise EquationError(f"term {t!r} does not fit a {nd}-dim operand")
            n_ell.append(nd - len(named))
        elif len(named) != nd:
            raise EquationError(f"term {t!r} does not fit a {nd}-dim operand")
        else:
            n_ell.append(0)
    width = max(n_ell, default=0)
    ell = [f".{i}" for i in range(width)]
    labels = []
    for t, k in zip(terms, n_ell):
        head, dots, tail = t.partition("...")
        labels.append(list(head) + (ell[width - k:] if dots else []) + list(tail))
    if arrow:
        head, dots, tail = rhs.partition("...")
        if not (head + tail).isalpha() and head + tail:
            raise EquationError(f"output {rhs!r} has a character that is not a letter")
        out = list(head) + (ell if dots else []) + list(tail)
        if len(set(out)) != len(out) or not set(out) <= {x for lb in labels for x in lb}:
            raise EquationError(f"output {rhs!r} repeats a letter or names one no operand has")
    else:
        letters = [x for lb in labels for x in lb if not x.startswith(".")]
        out = ell + sorted(x for x in set(letters) if letters.count(x) == 1)
    return labels, out


def einsum_macs(equation: str, shapes: list[tuple[int, ...]]) -> int:
    """Multiply-accumulates of an einsum of two or more operands of these shapes, evaluated as one
    product: the product of every letter's size (0 for one operand or an unreadable equation).

    Example:
        >>> einsum_macs("bhnd,bhmd->bhnm", [(2, 4, 6, 8), (2, 4, 5, 8)])
        1920
    """
    if len(shapes) < 2:
        return 0
    try:
        labels, _ = parse_equation(equation, [len(s) for s in shapes])
    except EquationError:
        return 0
    size: dict[str, int] = {}
    for lb, s in zip(labels, shapes):
        for x, n in zip(lb, s):
            size[x] = max(size.get(x, 1), n)
    return int(np.prod(list(size.values()), dtype=np.int64))


@dataclass
class _View:
    """A channel axis of one operand, seen through the letters of its dims."""

    op: int
    axis: Axis
    letters: tuple[str, ...]  # letter of each axis dim, in canonical order
    grid: np.ndarray  # the axis' elements, dims in canonical order


def _operands(node: fx.Node) -> tuple[str, list[Any]] | None:
    """(equation, operands) of ``torch.einsum(eq, *ops)``, ``einsum(eq, [ops])``, the sublist
    form ``einsum(a, [0, 1], b, [1, 2], [0, 2])`` and ``aten.einsum(eq, [ops])``."""
    args = list(node.args) + list(node.kwargs.get("tensors", []) or [])
    if args and isinstance(args[0], str):
        ops = args[1:]
        if len(ops) == 1 and isinstance(ops[0], (list, tuple)):
            ops = list(ops[0])
        return args[0], ops
    if len(args) >= 2 and isinstance(args[1], (list, tuple)):  # sublist form
        pairs, out = (args, None) if len(args) % 2 == 0 else (args[:-1], args[-1])
        letters = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"

        def term(sub: Any) -> str:
            return "".join("..." if s is Ellipsis else letters[s] for s in sub)

        eq = ",".join(term(s) for s in pairs[1::2])
        if out is not None:
            eq += "->" + term(out)
        return eq, list(pairs[0::2])
    return None


@op_rule(torch.einsum, torch.functional.einsum, getattr(torch.ops.aten.einsum, "default", None))
def einsum(b: Builder, node: fx.Node, m: Any = None) -> Any:
    spec = out_spec(b, node)
    parsed = _operands(node)
    if not isinstance(spec, TensorSpec) or parsed is None:
        freeze_inputs(b, node, f"einsum in a form graphprune cannot read at '{node.name}'")
        return empty_like_spec(spec)
    eq, ops = parsed
    specs = [b.spec(o) for o in ops]
    try:
        if not all(isinstance(s, TensorSpec) for s in specs):
            raise EquationError("an operand is not a tensor")
        labels, out = parse_equation(eq, [s.ndim for s in specs])
        size: dict[str, int] = {}
        for lb, s in zip(labels, specs):
            for x, n in zip(lb, s.shape):
                size[x] = max(size.get(x, 1), n)
        if tuple(size[x] for x in out) != spec.shape:
            raise EquationError(f"the output shape {spec.shape} does not follow the equation")
    except EquationError as e:
        freeze_inputs(b, node, f"einsum '{eq}' at '{node.name}': {e}")
        return TInfo(spec.shape)
    return _Einsum(b, node, eq, ops, specs, labels, out, size).run()


class _Einsum:
    """One einsum call: its operands' channel axes matched letter by letter."""

    def __init__(self, b: Builder, node: fx.Node, eq: str, ops: list[Any], specs: list[TensorSpec],
                 labels: list[list[str]], out: list[str], size: dict[str, int]):
        self.b, self.node, self.ops, self.specs, self.labels = b, node, ops, specs, labels
        self.out_dim = {x: i for i, x in enumerate(out)}
        self.size = size
        self.why = f"einsum '{eq}' at '{node.name}'"
        self.infos = [b.info(o) for o in ops]

    def key(self, x: str) -> tuple[int, Any]:
        """Canonical letter order: output letters by output dim, then contracted letters."""
        return (0, self.out_dim[x]) if x in self.out_dim else (1, x)

    def full(self, k: int, x: str) -> bool:
        """Operand ``k`` has letter ``x`` at full size (it does not broadcast along it)."""
        return any(lb == x and n == self.size[x] for lb, n in zip(self.labels[k], self.specs[k].shape))

    def n_full(self, x: str) -> int:
        return sum(self.full(j, x) for j in range(len(self.ops)))

    def run(self) -> TInfo:
        views = self._views()
        views = self._pin(views)
        structures: dict[tuple[str, ...], list[_View]] = {}
        for v in views:
            structures.setdefault(v.letters, []).append(v)
        for vs in structures.values():  # the same letters: element by element
            for v in vs[1:]:
                self.b.couple(vs[0].grid.ravel(), v.grid.ravel())
        self._across(structures)
        return self._output(structures)

    def _views(self) -> list[_View]:
        b = self.b
        diag = {x for lb in self.labels for x in lb if lb.count(x) > 1}
        views = []
        for k, info in enumerate(self.infos):
            for a in info.axes if info is not None else []:
                letters = [self.labels[k][d] for d in a.dims]
                if set(letters) & diag:
                    b.freeze(a.elems(), f"{self.why} repeats a letter in one operand (a diagonal)")
                elif any(self.specs[k].shape[d] != self.size[x] for d, x in zip(a.dims, letters)):
                    b.freeze(a.elems(), f"{self.why} broadcasts a channel axis")
                elif any(x not in self.out_dim and self.n_full(x) < 2 for x in letters):
                    b.freeze(a.elems(), f"{self.why} sums over channels of one operand")
                else:
                    order = sorted(range(len(letters)), key=lambda i: self.key(letters[i]))
                    views.append(_View(k, a, tuple(letters[i] for i in order),
                                       np.transpose(a.grid(), order)))
        return views

    def _pin(self, views: list[_View]) -> list[_View]:
        """An operand full-size on a letter without a (live) channel there fixes that letter's
        size: a channel axis lying on such letters only is frozen, which may pin others."""
        n = len(self.ops)
        while True:
            covered = {(v.op, x) for v in views for x in v.letters}
            pinned = {id(v): [i for i, x in enumerate(v.letters)
                              if any(self.full(j, x) and (j, x) not in covered for j in range(n))]
                      for v in views}
            stuck = [v for v in views if len(pinned[id(v)]) == len(v.letters)]
            if not stuck:
                break
            for v in stuck:
                self.b.freeze(v.axis.elems(), f"{self.why} combines channels with a tensor of "
                                              "fixed size")
            views = [v for v in views if len(pinned[id(v)]) < len(v.letters)]
        for v in views:  # these dims of a multi-dim axis never shrink: their positions go together
            for i in pinned[id(v)]:
                rows = np.moveaxis(v.grid, i, -1).reshape(-1, v.grid.shape[i])
                self.b.couple(np.repeat(rows[:, :1], rows.shape[1] - 1, axis=1), rows[:, 1:])
        return views

    def _across(self, structures: dict[tuple[str, ...], list[_View]]) -> None:
        """Different axis structures sharing a letter agree on it, position by position."""
        by_letter: dict[str, list[tuple[str, ...]]] = {}
        for s in structures:
            for x in s:
                by_letter.setdefault(x, []).append(s)
        for x, ss in by_letter.items():
            if len(ss) < 2:
                continue
            reps = [self._along(structures[s][0], x) for s in ss]
            for r in reps[1:]:
                self.b.couple(reps[0], r)

    def _along(self, v: _View, x: str) -> np.ndarray:
        return along_grid(self.b, v.grid, v.letters.index(x))

    def _output(self, structures: dict[tuple[str, ...], list[_View]]) -> TInfo:
        b = self.b
        spec = out_spec(b, self.node)
        out = TInfo(spec.shape)
        places = []
        for letters, vs in structures.items():
            self._roles(vs)
            o = [x for x in letters if x in self.out_dim]
            if not o:
                continue  # contracted entirely: the coupling above is all
            g = vs[0].grid
            if len(o) < len(letters):  # the contracted positions of each output entry go together
                flat = g.reshape(int(np.prod(g.shape[:len(o)])), -1)
                b.couple(np.repeat(flat[:, :1], flat.shape[1] - 1, axis=1), flat[:, 1:])
                g = flat[:, 0].reshape(g.shape[:len(o)])
            # a weight alone on its output letters produces those channels (``bi,oi->bo``)
            produced = any(self._is_param(v) for v in vs) and not any(
                not self._is_param(v) for v in vs)
            places.append((tuple(self.out_dim[x] for x in o), g, produced))
        placed: dict[tuple[int, ...], Axis] = {}
        for dims, g, produced in sorted(places, key=lambda p: -len(p[0])):
            if produced:
                b.source(g.ravel())
            if dims in placed:
                b.couple(placed[dims].elems(), g.ravel())
                continue
            na = b.new_axis(self.node.name, dims, g.shape)
            b.couple(na.elems(), g.ravel())
            overlap = [a for a in placed.values() if set(a.dims) & set(dims)]
            for a in overlap:  # another structure on the same dims: agree dim by dim
                for d in set(a.dims) & set(dims):
                    b.couple(b.along(TInfo(spec.shape, [a]), d), b.along(TInfo(spec.shape, [na]), d))
            if not overlap:
                placed[dims] = na
                out.axes.append(na)
        return out

    def _is_param(self, v: _View) -> bool:
        return isinstance(self.ops[v.op], fx.Node) and self.ops[v.op] in self.b.param_nodes

    def _roles(self, vs: list[_View]) -> None:
        """A weight's dims on output letters produce channels ('out') unless another operand
        carries them too (then it scales them: 'param'); on contracted letters it consumes ('in')."""
        shared = any(not self._is_param(v) for v in vs)
        for v in vs:
            if self._is_param(v):
                roles = {d: ("in" if self.labels[v.op][d] not in self.out_dim else
                             "param" if shared else "out") for d in v.axis.dims}
                self.b.set_roles(self.ops[v.op], roles)


def along_grid(b: Builder, g: np.ndarray, i: int) -> np.ndarray:
    """One representative element per index of dim ``i`` of an element grid; the positions
    along the other dims are coupled to it (they can only go together)."""
    rows = np.moveaxis(g, i, 0).reshape(g.shape[i], -1)
    b.couple(np.repeat(rows[:, :1], rows.shape[1] - 1, axis=1), rows[:, 1:])
    return rows[:, 0].copy()
