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


def f64_device(device: torch.device) -> torch.device:
    """Where float64 work happens: the same device, unless it has no float64 (Apple MPS)."""
    return torch.device("cpu") if device.type == "mps" else device


def _spd_solve(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """Solve the batch of SPD systems ``A X = B`` (Cholesky; LU where it fails)."""
    L, info = torch.linalg.cholesky_ex(A)
    if bool((info == 0).all()):
        return torch.cholesky_solve(B, L)
    return torch.linalg.solve(A, B)


def _plus(A: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    A = A.clone()
    A.diagonal(dim1=-2, dim2=-1).add_(lam[:, None])
    return A


def _solve(X: torch.Tensor, Y: torch.Tensor, lam: torch.Tensor,
           gram: torch.Tensor | None = None) -> torch.Tensor:
    """Ridge solutions ``(X^T X + lam I)^-1 X^T Y`` for a batch X (B, S, F), Y (B, S, O), lam (B,),
    through the smaller of the F x F (primal) and S x S (dual) systems (``gram``: that system's
    matrix, if already computed)."""
    _, S, F = X.shape
    Xt = X.transpose(1, 2)
    if S < F:  # (X^T X + lam)^-1 X^T = X^T (X X^T + lam)^-1
        return Xt @ _spd_solve(_plus(X @ Xt if gram is None else gram, lam), Y)
    return _spd_solve(_plus(Xt @ X if gram is None else gram, lam), Xt @ Y)


def _ridge(X: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
    """Ridge least squares for a batch of problems, X (B, S, F), Y (B, S, O) -> (B, F, O), the
    penalty relative to the mean diagonal of X^T X. With fewer than 4 samples per feature the
    problem is ill-posed, so each problem's penalty is chosen from a small grid by the error on a
    held-out fifth of the samples (the held-out predictions come from the smaller of the primal
    and dual systems, with the fewer right-hand sides; one Gram serves every solve)."""
    _, S, F = X.shape
    scale = (X * X).sum(1).mean(-1) + 1e-12  # (B,) mean diagonal of X^T X
    if S >= 4 * F or S < 10:
        return _solve(X, Y, RIDGE * scale)
    g = torch.Generator().manual_seed(S * 31 + F)
    perm = torch.randperm(S, generator=g).to(X.device)
    va, tr = perm[: S // 5], perm[S // 5:]
    Xt = X.transpose(1, 2)
    if tr.numel() < F:  # dual: held-out predictions = K[va, tr] (K[tr, tr] + lam)^-1 Y[tr]
        K = X @ Xt  # (B, S, S)
        A, left, right = K[:, tr][:, :, tr], K[:, va][:, :, tr], Y[:, tr]
        full = K if S < F else None
    else:  # primal: held-out predictions = X[va] (G - X[va]^T X[va] + lam)^-1 X[tr]^T Y[tr]
        full = Xt @ X  # (B, F, F)
        Xva = X[:, va]
        A, left = full - Xva.transpose(1, 2) @ Xva, Xva
        right = Xt[:, :, tr] @ Y[:, tr]
    grid = torch.tensor([RIDGE, 1e-3, 1e-2, 1e-1, 1.0], dtype=X.dtype, device=X.device)
    errs = []
    for lam in grid:
        Al = _plus(A, lam * scale)
        if left.shape[1] < right.shape[2]:
            pred = _spd_solve(Al, left.transpose(1, 2)).transpose(1, 2) @ right
        else:
            pred = left @ _spd_solve(Al, right)
        errs.append((pred - Y[:, va]).square().sum((1, 2)))
    return _solve(X, Y, grid[torch.stack(errs).argmin(0)] * scale, full)


def _groups(m: nn.Module) -> int:
    return 1 if isinstance(m, nn.Linear) else m.groups


def refit(m: nn.Module, s: Samples, target: torch.Tensor, alive: torch.Tensor,
          intercept: str | None) -> Refit:
    """Refit ``m`` (Conv1d/2d or Linear) on samples ``s`` so that its output matches ``target``.

    ``alive`` (C_in bool) marks the inputs that remain; ``intercept`` is 'bias', 'bn' or None.
    The solves run in float64 on the samples' device (the errors reported are float32); conv
    groups with the same number of live inputs are solved as one batch. The result is on the
    layer's device and dtype.
    """
    dev = f64_device(s.P.device)
    f32, f64 = torch.float32, torch.float64
    P, Y = s.P.to(dev, f32), target.to(dev, f32)  # (S, C, K), (S, O)
    w = m.weight.detach()
    S, C, K = P.shape
    g = _groups(m)
    O = Y.shape[1]
    opg, ipg = O // g, C // g
    W = w.to(dev, f32).reshape(O, ipg, K)  # (O, C/g, K)
    b0 = m.bias.detach().to(dev, f32) if m.bias is not None else torch.zeros(O, dtype=f32, device=dev)
    new_w = torch.zeros_like(W)
    new_b = b0.clone()
    shift = torch.zeros(O, dtype=f32, device=dev)
    pred_before = torch.empty_like(Y)
    pred_after = torch.empty_like(Y)
    note = ""
    al = alive.to(dev).reshape(g, ipg)
    counts = al.sum(1)
    ar = torch.arange(opg, device=dev)
    for f in torch.unique(counts).tolist():
        qs = (counts == f).nonzero().flatten()  # conv groups with f live inputs
        nq = qs.numel()
        live = al[qs].nonzero()[:, 1].reshape(nq, f)  # (nq, f) local input index
        oi = qs[:, None] * opg + ar  # (nq, opg) outputs of those groups
        X = P[:, qs[:, None] * ipg + live].reshape(S, nq, f * K).transpose(0, 1)  # (nq, S, fK)
        Wk = W[oi[:, :, None], live[:, None, :]].reshape(nq, opg, f * K)
        bq = b0[oi]  # (nq, opg)
        pred_before[:, oi] = (X @ Wk.transpose(1, 2) + bq[:, None, :]).transpose(0, 1)
        if f * K > MAX_FEATURES or f == 0:
            note = f"not refitted: {f * K} inputs per group (limit {MAX_FEATURES})"
            new_w[oi[:, :, None], live[:, None, :]] = W[oi[:, :, None], live[:, None, :]]
            pred_after[:, oi] = pred_before[:, oi]
            continue
        if intercept is not None:
            X = torch.cat([X, torch.ones(nq, S, 1, dtype=f32, device=dev)], dim=2)
        Yq = Y[:, oi].transpose(0, 1)  # (nq, S, opg)
        if intercept is None:
            Yq = Yq - bq[:, None, :]
        sol = _ridge(X.to(f64), Yq.to(f64)).to(f32)  # (nq, F[+1], opg)
        new_w[oi[:, :, None], live[:, None, :]] = sol[:, :f * K].transpose(1, 2).reshape(nq, opg, f, K)
        if intercept == "bias":
            new_b[oi] = sol[:, -1]
        elif intercept == "bn":
            shift[oi] = sol[:, -1]
        pa = X @ sol + (0 if intercept is not None else bq[:, None, :])
        pred_after[:, oi] = pa.transpose(0, 1)
    yn = Y.norm().clamp_min(1e-30)
    eb = float((Y - pred_before).norm() / yn)
    ea = float((Y - pred_after).norm() / yn)
    if ea > eb:  # refit is worse on its own samples (ill-posed): keep the layer as it was
        new_w = W * al.repeat_interleave(opg, dim=0)[:, :, None]
        new_b, shift, pred_after, ea = b0, torch.zeros_like(shift), pred_before, eb
        note = note or "refit discarded: no lower error on the samples"
    cos = float(torch.nn.functional.cosine_similarity(pred_after.flatten(), Y.flatten(), dim=0))
    dt, wd = w.dtype, w.device
    return Refit(new_w.reshape(w.shape).to(wd, dt),
                 new_b.to(wd, dt) if m.bias is not None else None,
                 shift.to(wd, dt) if intercept == "bn" else None, eb, ea, cos, note)
