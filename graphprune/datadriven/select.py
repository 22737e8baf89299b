"""Data-driven channel selection: ThiNet's greedy selection (Luo et al., ICCV 2017) and LASSO
channel selection (He et al., ICCV 2017).

The selectors work on ``GroupStats``: the Gram matrix of each unit's contribution to
its consumers' outputs, sampled on calibration data. For unit ``u`` and consumer ``j``,
``Z_u[s, o] = sum_{c in u, k} P_j[s, c, k] W_j[o, c, k]`` at sampled positions ``s`` and every
output ``o``; ``G = sum_j Z^T Z / ||t_j||^2`` and ``xy = sum_j Z^T t_j / ||t_j||^2`` where ``t_j``
is the part of consumer ``j``'s original output that the group's channels must produce (original
output minus the other inputs' contributions and the bias). Normalising by ``||t_j||^2`` weighs
every consumer of a group (all convs reading a residual stream, the layers after a concat)
equally.

``Z`` is never formed: with ``X = P`` flattened to (S, C*K), ``sum_{s,o} Z_c Z_c' =
sum_{k,k'} (X^T X)[ck, c'k'] (W^T W)[ck, c'k']``, so one consumer costs ``(S + O) (C K)^2`` instead
of ``S O C^2`` and every output channel counts (ThiNet had to sample outputs).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ..criteria.registry import selector
from ..graph import Group
from .collect import Samples

CHUNK_BYTES = 64 << 20  # working memory per block of the Gram


@dataclass
class GroupStats:
    gram: np.ndarray  # (U, U)
    xy: np.ndarray  # (U,)
    rows: int


def _groups(m: nn.Module) -> int:
    return 1 if isinstance(m, nn.Linear) else m.groups


def _hadamard_gram(X: torch.Tensor, W: torch.Tensor, K: int) -> torch.Tensor:
    """``sum_{k,k'} (X^T X) * (W^T W)`` per channel pair: X (S, n*K), W (O, n*K) -> (n, n),
    in blocks of channels so that the working memory stays under ``CHUNK_BYTES``."""
    F = X.shape[1]
    n = F // K
    step = max(1, CHUNK_BYTES // (8 * K * F))
    out = X.new_empty(n, n)
    for a in range(0, n, step):
        sl = slice(a * K, min(n, a + step) * K)
        blk = (X[:, sl].T @ X) * (W[:, sl].T @ W)  # (b*K, n*K)
        out[a:a + step] = blk.reshape(-1, K, n, K).sum((1, 3))
    return out


def consumer_stats(m: nn.Module, s: Samples, target: torch.Tensor, units: np.ndarray,
                   chans: np.ndarray, n_units: int, alive: torch.Tensor, path: str = ""
                   ) -> tuple[np.ndarray, np.ndarray, int]:
    """Gram and target correlation of the group's units for one consumer (float64 numpy).

    ``units[i]`` is the unit owning the consumer's input channel ``chans[i]``; ``alive`` (C_in
    bool) marks the consumer's inputs that are still there. Works where the samples live."""
    P = s.P  # (S, C, K)
    S, C, K = P.shape
    dev = P.device
    g = _groups(m)
    O = target.shape[1]
    ipg, opg = C // g, O // g
    W = m.weight.detach().float().reshape(O, ipg, K).to(dev)  # (O, C/g, K)
    bias = m.bias.detach().float().to(dev) if m.bias is not None else P.new_zeros(O)
    cs = torch.as_tensor(chans, dtype=torch.long, device=dev)
    us = torch.as_tensor(units, dtype=torch.long, device=dev)
    mask = alive.to(dev).clone()
    mask[cs] = False  # the other live inputs of this consumer
    Xq = P.reshape(S, g, ipg, K)
    Wq = W.reshape(g, opg, ipg, K)
    t = target.to(dev) - bias  # what this group's channels must produce, (S, O)
    if bool(mask.any()):
        t = t - torch.einsum("sgik,goik->sgo", Xq * mask.reshape(1, g, ipg, 1), Wq).reshape(S, O)
    scale = float((t * t).sum())
    if scale <= 0:
        scale = 1.0
    nc = cs.numel()
    if g == 1:
        Xg = P[:, cs].reshape(S, nc * K)
        Wg = W[:, cs].reshape(O, nc * K)
        Gch = _hadamard_gram(Xg, Wg, K)  # (nc, nc)
        xy = (Xg * (t @ Wg)).sum(0).reshape(nc, K).sum(1)
    else:  # block-diagonal: only channels of the same conv group interact
        q, loc = cs // ipg, cs % ipg
        qs, qpos = torch.unique(q, return_inverse=True)
        Xs = Xq[:, qs].reshape(S, qs.numel(), ipg * K)  # (S, nq, ipg*K)
        Ws = Wq[qs].reshape(qs.numel(), opg, ipg * K)  # (nq, opg, ipg*K)
        H = torch.einsum("sqi,sqj->qij", Xs, Xs) * torch.einsum("qoi,qoj->qij", Ws, Ws)
        Gq = H.reshape(-1, ipg, K, ipg, K).sum((2, 4))  # (nq, ipg, ipg)
        same = q[:, None] == q[None, :]
        Gch = Gq[qpos[:, None], loc[:, None], loc[None, :]] * same
        tq = t.reshape(S, g, opg)[:, qs]  # (S, nq, opg)
        tw = torch.einsum("sqo,qoi->sqi", tq, Ws)
        xyq = (Xs * tw).sum(0).reshape(-1, ipg, K).sum(-1)  # (nq, ipg)
        xy = xyq[qpos, loc]
    Gu = torch.zeros(n_units, nc, dtype=torch.float64, device=dev).index_add_(0, us, Gch.double())
    Gu = torch.zeros(n_units, n_units, dtype=torch.float64, device=dev).index_add_(1, us, Gu)
    xyu = torch.zeros(n_units, dtype=torch.float64, device=dev).index_add_(0, us, xy.double())
    return (Gu / scale).cpu().numpy(), (xyu / scale).cpu().numpy(), S * O


# ---------------------------------------------------------------------- selectors
@selector("lasso")
def lasso(group: Group, stats: GroupStats, n_keep: int) -> tuple[np.ndarray, np.ndarray]:
    """LASSO regression of the consumers' outputs on the channels' contributions, the penalty
    following the LARS-lasso path (scikit-learn) to the point where exactly the target number of
    channels is non-zero (He et al., ICCV 2017)."""
    from sklearn.linear_model import lars_path_gram

    G, xy = stats.gram, stats.xy
    U = G.shape[0]
    G = G + np.eye(U) * (1e-10 * max(float(np.trace(G)) / U, 1e-30))
    _, _, coefs = lars_path_gram(Xy=xy, Gram=G, n_samples=max(stats.rows, 1), method="lasso",
                                 max_iter=8 * U)
    nnz = (coefs != 0).sum(axis=0)
    hit = np.flatnonzero(nnz == n_keep)
    j = hit[0] if hit.size else (np.flatnonzero(nnz >= n_keep)[0] if (nnz >= n_keep).any()
                                 else coefs.shape[1] - 1)
    beta = coefs[:, j]
    score = np.abs(beta) * np.sqrt(np.clip(np.diag(G), 0, None))
    keep = np.sort(np.argsort(-score, kind="stable")[:n_keep])
    return keep, score


@selector("greedy")
def greedy(group: Group, stats: GroupStats, n_keep: int) -> tuple[np.ndarray, np.ndarray]:
    """ThiNet (Luo et al., ICCV 2017): repeatedly remove the channel whose removal adds least
    to the squared error of the consumers' outputs, until the target count remains."""
    G = stats.gram
    U = G.shape[0]
    removed = np.zeros(U, dtype=bool)
    acc = np.zeros(U)  # sum of G[:, t] over removed t
    cur = 0.0
    order = []
    diag = np.diag(G)
    for _ in range(U - n_keep):
        cost = cur + 2 * acc + diag
        cost[removed] = np.inf
        c = int(np.argmin(cost))
        order.append(c)
        removed[c] = True
        cur = float(cost[c])
        acc += G[:, c]
    score = np.full(U, float(U))
    score[order] = np.arange(len(order))  # removed earlier = less important
    return np.flatnonzero(~removed), score
