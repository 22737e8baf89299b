"""Selection and least-squares refit of one consumer layer from sums over calibration tokens
(the per-block work of ``blockwise``).

A consumer (``o_proj`` reading the heads, ``down_proj`` reading the MLP channels) sees inputs
``X`` (N, F) and must produce ``R`` (N, O), the part of the ORIGINAL block output that it is
responsible for. Everything the methods need is a sum over tokens, accumulated batch by batch
(memory F^2, independent of N): per-channel sums and sums of squares (Wanda-sp, FLAP, FLAP's
mean compensation), the Gram ``X^T X`` and ``X^T R`` (least squares, and the Gram-matrix form of
LASSO / ThiNet selection in ``graphprune.datadriven.select``). Sums are accumulated in float32
(as SparseGPT accumulates its Hessian) and solved in float64.

Every fifth token (at most ``HELD_MAX`` of them) is also kept as it is: when the refit is
ill-posed (fewer than four tokens per unknown) the ridge penalty is chosen by the error on those
tokens of a fit on all the others, as ``datadriven.reconstruct`` chooses it on samples; the
held-out predictions come from the dual side of the system (one solve per penalty with as
many right-hand sides as held-out tokens, not as many as outputs).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..criteria.activation import ChannelStats
from ..datadriven.select import GroupStats

HOLDOUT = 5  # every HOLDOUT-th token is a candidate held-out row of the ridge search
HELD_MAX = 1024  # held-out rows kept per consumer
RIDGE = 1e-5  # relative to the mean diagonal of the Gram (datadriven.reconstruct's default)
GRID = (1e-5, 1e-3, 1e-2, 1e-1, 1.0)


def _acc(a: torch.Tensor | None, b: torch.Tensor) -> torch.Tensor:
    return b if a is None else a.add_(b)


@dataclass
class FitStats:
    """Sums over the calibration tokens of one consumer's input ``X`` and target ``R``;
    ``full`` adds the Gram and cross terms that least squares and LASSO/greedy need."""

    full: bool
    n: int = 0
    total: torch.Tensor | None = None  # (F,) sum of x, float64
    sumsq: torch.Tensor | None = None  # (F,) sum of x^2, float64
    gram: torch.Tensor | None = None  # (F, F) X^T X, float32
    cross: torch.Tensor | None = None  # (F, O) X^T R, float32
    rsum: torch.Tensor | None = None  # (O,) sum of R, float64
    rsq: float = 0.0  # sum of R^2
    held_x: list[torch.Tensor] = field(default_factory=list)
    held_r: list[torch.Tensor] = field(default_factory=list)
    _row: int = 0

    def add(self, X: torch.Tensor, R: torch.Tensor | None = None) -> None:
        """Add a batch: ``X`` (..., F) inputs and ``R`` (..., O) targets."""
        X = X.reshape(-1, X.shape[-1]).float()
        f64 = torch.float64
        self.n += X.shape[0]
        self.total = _acc(self.total, X.sum(0, dtype=f64))
        self.sumsq = _acc(self.sumsq, X.square().sum(0, dtype=f64))
        if self.full:
            R = R.reshape(-1, R.shape[-1]).float()
            self.gram = _acc(self.gram, X.T @ X)
            self.cross = _acc(self.cross, X.T @ R)
            self.rsum = _acc(self.rsum, R.sum(0, dtype=f64))
            self.rsq += float(R.double().square().sum())
            rows = torch.arange(self._row, self._row + X.shape[0], device=X.device) % HOLDOUT == 0
            room = HELD_MAX - sum(x.shape[0] for x in self.held_x)
            idx = rows.nonzero().flatten()[:max(room, 0)]
            if idx.numel():
                self.held_x.append(X[idx].clone())
                self.held_r.append(R[idx].clone())
        self._row += X.shape[0]

    def channel_stats(self) -> ChannelStats:
        """What Wanda-sp and FLAP read (``criteria.activation``)."""
        return ChannelStats(self.n, self.total.cpu().numpy(), self.sumsq.cpu().numpy())


# ---------------------------------------------------------------------- selection
def group_stats(stats: FitStats, W: torch.Tensor, unit: np.ndarray, pos: np.ndarray,
                n_units: int) -> GroupStats:
    """``GroupStats`` of ``datadriven.select`` for a Linear consumer ``W`` (O, F) whose input
    column ``pos[i]`` belongs to unit ``unit[i]``: ``Z_u = X[:, cols(u)] W[:, cols(u)]^T`` is a
    unit's contribution, ``G[u, v] = <Z_u, Z_v>`` and ``xy[u] = <Z_u, R>``, both over every
    token and output, divided by ``||R||^2`` (the same normalisation as ``consumer_stats``)."""
    dev = stats.gram.device
    Wf = W.detach().to(dev, torch.float32)
    cols = torch.as_tensor(pos, dtype=torch.long, device=dev)
    units = torch.as_tensor(unit, dtype=torch.long, device=dev)
    Wc = Wf[:, cols]  # (O, E)
    Gch = (stats.gram[cols][:, cols] * (Wc.T @ Wc)).double()  # (E, E)
    xy_ch = (Wc.T * stats.cross[cols]).sum(1).double()  # (E,)
    G = torch.zeros(n_units, cols.numel(), dtype=torch.float64, device=dev).index_add_(0, units, Gch)
    G = torch.zeros(n_units, n_units, dtype=torch.float64, device=dev).index_add_(1, units, G)
    xy = torch.zeros(n_units, dtype=torch.float64, device=dev).index_add_(0, units, xy_ch)
    scale = stats.rsq if stats.rsq > 0 else 1.0
    return GroupStats((G / scale).cpu().numpy(), (xy / scale).cpu().numpy(), stats.n * W.shape[0])


# ---------------------------------------------------------------------- refit
@dataclass
class Fit:
    weight: torch.Tensor  # (O, F), zeros on removed columns
    bias: torch.Tensor | None  # (O,) or None
    info: dict[str, Any]


def _system(s: FitStats, keep: torch.Tensor, intercept: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The normal equations ``A sol = B`` over the kept columns (and a ones column), float64."""
    G = s.gram[keep][:, keep].double()
    C = s.cross[keep].double()
    if not intercept:
        return G, C
    t = s.total[keep]
    top = torch.cat([G, t[:, None]], 1)
    bottom = torch.cat([t, torch.tensor([float(s.n)], dtype=G.dtype, device=G.device)])[None]
    return torch.cat([top, bottom], 0), torch.cat([C, s.rsum[None]], 0)


def _chol(A: torch.Tensor, lam: float) -> torch.Tensor:
    A = A.clone()
    A.diagonal().add_(lam)
    L, info = torch.linalg.cholesky_ex(A)
    if int(info) != 0:  # not positive definite in float64: a little more ridge
        A.diagonal().add_(lam * 10 + 1e-12 * float(A.diagonal().abs().max()))
        L = torch.linalg.cholesky(A)
    return L


def _error_removed(s: FitStats, Wk: torch.Tensor, b: torch.Tensor | None, keep: torch.Tensor) -> float:
    """sum over tokens of ||X_k Wk^T + b - R||^2 from the sums (Wk: (O, K) float64)."""
    G = s.gram[keep][:, keep]
    Wf = Wk.float()
    e = float(((Wf @ G) * Wf).sum()) - 2 * float((Wf.T * s.cross[keep]).sum()) + s.rsq
    if b is not None:
        e += 2 * float(b @ (Wk @ s.total[keep])) + s.n * float(b @ b) - 2 * float(b @ s.rsum)
    return max(e, 0.0)


def _penalty(s: FitStats, A: torch.Tensor, B: torch.Tensor, keep: torch.Tensor, intercept: bool,
             scale: float) -> tuple[float, str]:
    """The ridge penalty: ``RIDGE`` when the system is well posed, else the grid value whose
    fit without the held-out tokens predicts them best."""
    K = A.shape[0]
    n_held = sum(x.shape[0] for x in s.held_x)
    if s.n >= 4 * K or n_held < 10 or s.n - n_held < 1:
        return RIDGE * scale, "ridge 1e-5"
    Xv = torch.cat(s.held_x)[:, keep].double()
    if intercept:
        Xv = torch.cat([Xv, torch.ones(Xv.shape[0], 1, dtype=Xv.dtype, device=Xv.device)], 1)
    Rv = torch.cat(s.held_r).double()
    At, Bt = A - Xv.T @ Xv, B - Xv.T @ Rv
    errs = []
    for g in GRID:
        Z = torch.cholesky_solve(Xv.T, _chol(At, g * scale))  # (K, n_held)
        errs.append(float((Z.T @ Bt - Rv).square().sum()))
    best = int(np.argmin(errs))
    return GRID[best] * scale, f"ridge {GRID[best]:g} (held-out)"


def refit(W: torch.Tensor, b0: torch.Tensor | None, stats: FitStats, keep_cols: np.ndarray,
          intercept: bool, fallback_bias: torch.Tensor | None = None) -> Fit:
    """Least-squares weights over the kept input columns (and a bias if ``intercept``) so that
    ``X_keep W^T + b`` matches the target; ridge, float64 solve on the stats' device. A refit
    that does not beat the layer with its columns merely removed (with ``fallback_bias``,
    FLAP's mean compensation, if given) on the calibration tokens is discarded."""
    s = stats
    dev = s.gram.device
    keep = torch.as_tensor(np.asarray(keep_cols, dtype=np.int64), device=dev)
    K = keep.numel()
    Wd = W.detach().to(dev, torch.float64)
    base_b = fallback_bias if fallback_bias is not None else b0
    base_b = base_b.detach().to(dev, torch.float64) if base_b is not None else None
    A, B = _system(s, keep, intercept)
    scale = float(A.diagonal()[:K].mean()) + 1e-30
    lam, how = _penalty(s, A, B, keep, intercept, scale)
    sol = torch.cholesky_solve(B, _chol(A, lam))  # (K [+1], O)
    # at the ridge solution, ||X sol - R||^2 = rsq - <sol, B> - lam ||sol||^2
    after = max(s.rsq - float((sol * B).sum()) - lam * float(sol.square().sum()), 0.0)
    before = _error_removed(s, Wd[:, keep], base_b, keep)
    Wk, bk = sol[:K].T, (sol[K] if intercept else None)
    info = {"rows": s.n, "penalty": how}
    if after > before:
        Wk, bk, after = Wd[:, keep], base_b, before
        info["note"] = "refit discarded: no lower error on the calibration tokens"
    norm = max(s.rsq, 1e-30)
    info.update(rel_err_removed=(before / norm) ** 0.5, rel_err_refit=(after / norm) ** 0.5)
    new = torch.zeros_like(Wd)
    new[:, keep] = Wk
    return Fit(new.to(W.device, W.dtype), bk.to(W.device, W.dtype) if bk is not None else None, info)
