"""Data-driven channel selection: ThiNet's greedy selection (Luo et al., ICCV 2017) and LASSO
channel selection (He et al., ICCV 2017).

The selectors work on ``GroupStats``: the Gram matrix of each unit's contribution to
its consumers' outputs, sampled on calibration data. For unit ``u`` and consumer ``j``,
``Z_u[s, o] = sum_{c in u, k} P_j[s, c, k] W_j[o, c, k]`` at sampled positions ``s`` and outputs
``o``; ``G = sum_j Z^T Z / ||t_j||^2`` and ``xy = sum_j Z^T t_j / ||t_j||^2`` where ``t_j`` is the
part of consumer ``j``'s original output that the group's channels must produce (original output
minus the other inputs' contributions and the bias). Normalising by ``||t_j||^2`` weighs every
consumer of a group (all convs reading a residual stream, the layers after a concat) equally.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ..criteria.registry import selector
from ..graph import Group
from .collect import Samples

CHUNK_BYTES = 64 << 20  # working memory per contraction chunk
MAX_OUTPUTS = 64  # output channels sampled per position for the Gram (ThiNet samples outputs)


@dataclass
class GroupStats:
    gram: np.ndarray  # (U, U)
    xy: np.ndarray  # (U,)
    rows: int


def full_weight(m: nn.Module) -> torch.Tensor:
    """Weight as (C_out, C_in, K), block-diagonal for grouped convolutions."""
    w = m.weight.detach().float()
    if isinstance(m, nn.Linear):
        return w.unsqueeze(-1)
    o, ipg = w.shape[0], w.shape[1]
    w = w.reshape(o, ipg, -1)
    g = m.groups
    if g == 1:
        return w
    full = w.new_zeros(o, ipg * g, w.shape[-1])
    opg = o // g
    for k in range(g):
        full[k * opg:(k + 1) * opg, k * ipg:(k + 1) * ipg] = w[k * opg:(k + 1) * opg]
    return full


def consumer_stats(m: nn.Module, s: Samples, target: torch.Tensor, units: np.ndarray,
                   chans: np.ndarray, n_units: int, alive: torch.Tensor, path: str
                   ) -> tuple[np.ndarray, np.ndarray, int]:
    """Gram and target correlation of the group's units for one consumer."""
    P = s.P  # (S, C, K)
    W = full_weight(m)  # (O, C, K)
    O = W.shape[0]
    g = torch.Generator().manual_seed(zlib.crc32(path.encode()))
    osub = torch.randperm(O, generator=g)[:MAX_OUTPUTS] if O > MAX_OUTPUTS else torch.arange(O)
    Wo = W[osub]
    bias = m.bias.detach().float()[osub] if m.bias is not None else torch.zeros(osub.numel())
    cs = torch.as_tensor(chans, dtype=torch.long)
    us = torch.as_tensor(units, dtype=torch.long)
    mask = alive.clone()
    mask[cs] = False  # the other live inputs of this consumer
    rest = torch.einsum("sck,ock->so", P * mask[None, :, None], Wo)
    t = target[:, osub] - rest - bias  # what this group's channels must produce
    scale = float((t * t).sum())
    if scale <= 0:
        scale = 1.0
    Pg, Wg = P[:, cs], Wo[:, cs]
    nc, S = cs.numel(), P.shape[0]
    chunk = max(1, CHUNK_BYTES // (4 * max(1, nc) * osub.numel() * 2))
    G = torch.zeros(n_units, n_units, dtype=torch.float64)
    xy = torch.zeros(n_units, dtype=torch.float64)
    for a in range(0, S, chunk):
        z = torch.einsum("sck,ock->cso", Pg[a:a + chunk], Wg)  # (nc, s, O')
        A = torch.zeros(n_units, z.shape[1], z.shape[2]).index_add_(0, us, z).reshape(n_units, -1)
        G += (A @ A.T).double()
        xy += (A @ t[a:a + chunk].reshape(-1)).double()
    return (G / scale).numpy(), (xy / scale).numpy(), S * osub.numel()


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
