"""Sample what a layer sees and produces on calibration data (for data-driven channel selection
and least-squares reconstruction).

For a convolution, ``positions`` output locations are sampled per image (He et al. 2017 sample
10) and the input patch behind each is extracted: ``P`` is ``(S, C_in, K)`` (K = kernel size
product) and ``Y`` the ``(S, C_out)`` outputs there. For a Linear, rows of the input are sampled
(``K = 1``). Positions depend only on (layer path, batch index), so the inputs of a pruned working
copy and the targets of the original model are sampled at the same places.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..calibration import Calibration

CONV = (nn.Conv1d, nn.Conv2d)


@dataclass
class Samples:
    """Sampled inputs ``P`` (S, C_in, K) and outputs ``Y`` (S, C_out) of one layer."""

    P: torch.Tensor
    Y: torch.Tensor | None = None


def supported(m: nn.Module) -> bool:
    """Layers whose inputs and outputs can be sampled and refitted."""
    return isinstance(m, nn.Linear) or (isinstance(m, CONV) and m.padding_mode in (
        "zeros", "reflect", "replicate", "circular"))


def _gen(path: str, batch: int) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(path.encode()) * 1000003 + batch)


def _positions(path: str, batch: int, n: int, spatial: tuple[int, ...], per_image: int):
    g = _gen(path, batch)
    total = math.prod(spatial)
    k = min(per_image, total)
    flat = torch.stack([torch.randperm(total, generator=g)[:k] for _ in range(n)])  # (N, k)
    img = torch.arange(n).repeat_interleave(k)
    flat = flat.reshape(-1)
    coords = []
    for s in reversed(spatial):
        coords.append(flat % s)
        flat = flat // s
    return img, list(reversed(coords))


def conv_patches(m: nn.Module, x: torch.Tensor, img: torch.Tensor,
                 coords: list[torch.Tensor]) -> torch.Tensor:
    """(S, C_in, K) input patches of ``m`` (Conv1d/2d) behind the sampled output positions."""
    nd = len(coords)
    pad = m._reversed_padding_repeated_twice
    mode = "constant" if m.padding_mode == "zeros" else m.padding_mode
    xp = F.pad(x, pad, mode=mode) if any(pad) else x
    ks, st, dl = m.kernel_size, m.stride, m.dilation
    xp = xp.movedim(1, -1)  # (N, *spatial, C)
    if nd == 1:
        r = coords[0][:, None] * st[0] + torch.arange(ks[0])[None] * dl[0]  # (S, k)
        pat = xp[img[:, None], r]  # (S, k, C)
    else:
        r = coords[0][:, None] * st[0] + torch.arange(ks[0])[None] * dl[0]
        c = coords[1][:, None] * st[1] + torch.arange(ks[1])[None] * dl[1]
        pat = xp[img[:, None, None], r[:, :, None], c[:, None, :]]  # (S, kh, kw, C)
        pat = pat.reshape(pat.shape[0], -1, pat.shape[-1])
    return pat.transpose(1, 2).contiguous()  # (S, C, K)


class _Stop(Exception):
    pass


def sample_layers(model: nn.Module, calib: Calibration, paths: list[str], *, rows: int,
                  want_inputs: bool, want_outputs: bool, stop_early: bool = True
                  ) -> dict[str, Samples]:
    """Run ``model`` over the calibration batches and sample the layers at ``paths``.

    ``rows`` is the number of samples per layer in total; with ``stop_early`` the forward pass of
    each batch stops once every requested layer has run.
    """
    mods = dict(model.named_modules(remove_duplicate=False))
    n_img = max(1, calib.n_samples)
    per_image = max(1, math.ceil(rows / n_img))
    got: dict[str, dict[str, list[torch.Tensor]]] = {p: {"P": [], "Y": []} for p in paths}
    state = {"batch": 0, "seen": set()}

    def hook(m, inp, out, path):
        if path in state["seen"]:
            return  # a module called twice: its first call is sampled
        state["seen"].add(path)
        x, y = inp[0], out
        if isinstance(m, nn.Linear):
            xf, yf = x.reshape(-1, x.shape[-1]), y.reshape(-1, y.shape[-1])
            g = _gen(path, state["batch"])
            k = min(xf.shape[0], per_image * x.shape[0])
            idx = torch.randperm(xf.shape[0], generator=g)[:k]
            if want_inputs:
                got[path]["P"].append(xf[idx].float().unsqueeze(-1))
            if want_outputs:
                got[path]["Y"].append(yf[idx].float())
        else:
            img, coords = _positions(path, state["batch"], x.shape[0], tuple(y.shape[2:]), per_image)
            if want_inputs:
                got[path]["P"].append(conv_patches(m, x.float(), img, coords))
            if want_outputs:
                yy = y.movedim(1, -1)
                got[path]["Y"].append(yy[(img, *coords)].float())
        if stop_early and state["seen"] >= set(paths):
            raise _Stop

    handles = [mods[p].register_forward_hook(lambda m, i, o, p=p: hook(m, i, o, p)) for p in paths]
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            for b, (xs, _) in enumerate(calib):
                state["batch"], state["seen"] = b, set()
                try:
                    model(*xs)
                except _Stop:
                    pass
    finally:
        for h in handles:
            h.remove()
        model.train(was)
    out = {}
    for p in paths:
        P = torch.cat(got[p]["P"]) if got[p]["P"] else None
        Y = torch.cat(got[p]["Y"]) if got[p]["Y"] else None
        out[p] = Samples(P, Y)
    return out


def rows_for(model: nn.Module, paths: list[str], budget_bytes: int, rows_max: int) -> int:
    """How many samples per layer fit in ``budget_bytes`` for the layers at ``paths``."""
    mods = dict(model.named_modules(remove_duplicate=False))
    per_row = 0
    for p in paths:
        m = mods[p]
        if isinstance(m, nn.Linear):
            per_row += m.in_features + m.out_features
        else:
            per_row += m.in_channels * math.prod(m.kernel_size) + m.out_channels
    return max(64, min(rows_max, budget_bytes // max(1, 4 * per_row)))
