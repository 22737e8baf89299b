"""Least-squares reconstruction of a consumer layer after some of its inputs were removed
(He et al., ICCV 2017; Luo et al., ICCV 2017).

On sampled calibration positions, the consumer's weights over its remaining inputs (and an
intercept) are refitted so that its output matches the ORIGINAL model's output: a ridge-regularised
normal-equation solve per conv group. The intercept absorbs the constant the removed channels
contributed (BatchNorm beta through the activation, a producer's bias); it goes into the
consumer's bias, or into the running mean of the BatchNorm that directly follows a bias-free
consumer. A refit that does not lower the error on the samples is discarded.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .collect import Samples

MAX_FEATURES = 4096  # per conv group; larger layers are left as they are (reported)
RIDGE = 1e-5  # relative to the mean diagonal of X^T X (searched upwards when ill-posed)


@dataclass
class Refit:
    weight: torch.Tensor  # full-size weight, zeros on removed inputs
    bias: torch.Tensor | None  # new bias (if the layer has one)
    shift: torch.Tensor | None  # intercept for a following BatchNorm (bias-free layer)
    err_before: float  # relative error on the samples with the inputs merely removed
    err_after: float
    cos_after: float
    note: str = ""


def _solve(A: torch.Tensor, B: torch.Tensor, lam: float) -> torch.Tensor:
    A = A.clone()
    A.diagonal().add_(lam)
    return torch.linalg.solve(A, B)


def _ridge(X: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
    """Ridge least squares. With fewer than 4 samples per feature the problem is ill-posed, so
    the penalty is chosen on a held-out fifth of the samples from a small grid."""
    S, F = X.shape
    A, B = X.T @ X, X.T @ Y
    scale = float(A.diagonal().mean()) + 1e-12
    if S >= 4 * F or S < 10:
        return _solve(A, B, RIDGE * scale)
    g = torch.Generator().manual_seed(S * 31 + F)
    perm = torch.randperm(S, generator=g)
    va, tr = perm[: S // 5], perm[S // 5:]
    At, Bt = X[tr].T @ X[tr], X[tr].T @ Y[tr]
    best, best_lam = float("inf"), RIDGE
    for lam in (RIDGE, 1e-3, 1e-2, 1e-1, 1.0):
        W = _solve(At, Bt, lam * scale)
        err = float(((X[va] @ W - Y[va]) ** 2).sum())
        if err < best:
            best, best_lam = err, lam
    return _solve(A, B, best_lam * scale)


def _groups(m: nn.Module) -> int:
    return 1 if isinstance(m, nn.Linear) else m.groups


def refit(m: nn.Module, s: Samples, target: torch.Tensor, alive: torch.Tensor,
          intercept: str | None) -> Refit:
    """Refit ``m`` (Conv1d/2d or Linear) on samples ``s`` so that its output matches ``target``.

    ``alive`` (C_in bool) marks the inputs that remain; ``intercept`` is 'bias', 'bn' or None.
    """
    P, Y = s.P.double(), target.double()  # (S, C, K), (S, O)
    w = m.weight.detach()
    S = P.shape[0]
    g = _groups(m)
    O = Y.shape[1]
    opg = O // g
    ipg = P.shape[1] // g
    W = w.double().reshape(O, w.shape[1], -1)  # (O, C/g, K)
    b0 = m.bias.detach().double() if m.bias is not None else torch.zeros(O, dtype=torch.float64)
    new_w = W.clone()
    new_b = b0.clone()
    shift = torch.zeros(O, dtype=torch.float64)
    pred_before = torch.empty_like(Y)
    pred_after = torch.empty_like(Y)
    note = ""
    for k in range(g):
        oi = slice(k * opg, (k + 1) * opg)
        live = alive[k * ipg:(k + 1) * ipg].nonzero().flatten()
        X = P[:, k * ipg:(k + 1) * ipg][:, live].reshape(S, -1)  # (S, F)
        Wk = W[oi][:, live].reshape(opg, -1)  # (O/g, F)
        pred_before[:, oi] = X @ Wk.T + b0[oi]
        new_w[oi] = 0
        if X.shape[1] > MAX_FEATURES or X.shape[1] == 0:
            note = f"not refitted: {X.shape[1]} inputs per group (limit {MAX_FEATURES})"
            new_w[oi][:, live] = W[oi][:, live]
            pred_after[:, oi] = pred_before[:, oi]
            continue
        if intercept is not None:
            X = torch.cat([X, torch.ones(S, 1, dtype=X.dtype)], dim=1)
        Yk = Y[:, oi] if intercept is not None else Y[:, oi] - b0[oi]
        sol = _ridge(X, Yk)  # (F[+1], O/g)
        coef = sol[:-1] if intercept is not None else sol
        blk = new_w[oi]
        blk[:, live] = coef.T.reshape(opg, live.numel(), -1)
        new_w[oi] = blk
        if intercept is not None:
            c = sol[-1]
            if intercept == "bias":
                new_b[oi] = c
            else:
                shift[oi] = c
        pred_after[:, oi] = X @ sol + (0 if intercept is not None else b0[oi])
    yn = Y.norm().clamp_min(1e-30)
    eb = float((Y - pred_before).norm() / yn)
    ea = float((Y - pred_after).norm() / yn)
    if ea > eb:  # refit is worse on its own samples (ill-posed): keep the layer as it was
        new_w = W * 1.0
        for k in range(g):
            dead = (~alive[k * ipg:(k + 1) * ipg]).nonzero().flatten()
            new_w[k * opg:(k + 1) * opg, dead] = 0
        new_b, shift, pred_after, ea = b0, torch.zeros(O, dtype=torch.float64), pred_before, eb
        note = note or "refit discarded: no lower error on the samples"
    cos = float(torch.nn.functional.cosine_similarity(pred_after.flatten(), Y.flatten(), dim=0))
    dt = w.dtype
    return Refit(new_w.reshape(w.shape).to(dt),
                 new_b.to(dt) if m.bias is not None else None,
                 shift.to(dt) if intercept == "bn" else None, eb, ea, cos, note)
