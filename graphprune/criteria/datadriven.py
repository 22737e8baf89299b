"""Data-driven criteria: ThiNet's greedy selection (Luo et al., ICCV 2017), LASSO channel
selection (He et al., ICCV 2017), first-order Taylor importance (Molchanov et al., CVPR 2019)
and network slimming's BatchNorm scale (Liu et al., ICCV 2017).

The selection criteria work on ``GroupStats``: the Gram matrix of each unit's contribution to
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

from ..collect import Samples
from ..graph import Group
from .registry import ScoreContext, criterion, selector

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


# ---------------------------------------------------------------------- data-based scores
@criterion("bn_scale")
def bn_scale(group: Group, ctx: ScoreContext) -> np.ndarray:
    """|gamma| of the group's BatchNorm layers, summed (network slimming, Liu et al. ICCV 2017);
    groups without a BatchNorm fall back to l1."""
    total = np.zeros(group.size)
    found = False
    for m in group.members:
        mod = ctx.graph.builder.modules.get(m.module) if ctx.graph is not None else None
        if m.param.endswith(".weight") and isinstance(mod, nn.modules.batchnorm._BatchNorm):
            w = ctx.params[m.param].detach().abs().double().numpy()
            total += np.bincount(m.unit, weights=w[m.index], minlength=group.size)
            found = True
    if not found:
        from .magnitude import l1

        return l1(group, ctx)
    return total


@criterion("taylor", needs_data=True)
def taylor(group: Group, ctx: ScoreContext) -> np.ndarray:
    """First-order Taylor importance (Molchanov et al., CVPR 2019): per calibration batch,
    (sum over the channel's parameters of gradient x weight)^2, averaged over batches. The loss is
    cross-entropy against the labels, or against the model's own predictions if there are none."""
    per_batch = ctx.cache.get("taylor")
    if per_batch is None:
        per_batch = ctx.cache["taylor"] = _taylor_terms(ctx)
    total = np.zeros(group.size)
    for terms in per_batch:
        unit_sum = np.zeros(group.size)
        for m in group.members:
            v = terms.get((m.param, m.dim)) if m.role != "in" else None  # the channel's own params
            if v is not None:
                unit_sum += np.bincount(m.unit, weights=v[m.index], minlength=group.size)
        total += unit_sum ** 2
    return total / max(1, len(per_batch))


def _taylor_terms(ctx: ScoreContext) -> list[dict[tuple[str, int], np.ndarray]]:
    """Per batch: for every (parameter, dim) member key, sum of grad*weight per index."""
    import copy

    graph = ctx.graph
    model = copy.deepcopy(graph.model).eval()
    params = dict(model.named_parameters())
    keys = sorted({(m.param, m.dim) for m in graph.builder.members if m.param in params})
    out = []
    for xs, y in ctx.calibration:
        model.zero_grad(set_to_none=True)
        logits = model(*xs)
        if isinstance(logits, (tuple, list)):
            logits = logits[0]
        target = y if y is not None else logits.detach().argmax(-1)
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                 target.reshape(-1))
        loss.backward()
        terms = {}
        for p, d in keys:
            w = params[p]
            if w.grad is None:
                continue
            gw = (w.grad * w).detach().double()
            other = [i for i in range(gw.ndim) if i != d]
            terms[(p, d)] = (gw.sum(dim=other) if other else gw).numpy()
        out.append(terms)
    return out

