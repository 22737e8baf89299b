"""Sample what a layer sees and produces on calibration data (for data-driven channel selection
and least-squares reconstruction).

For a convolution, ``positions`` output locations are sampled per image (He et al. 2017 sample
10) and the input patch behind each is extracted: ``P`` is ``(S, C_in, K)`` (K = kernel size
product) and ``Y`` the ``(S, C_out)`` outputs there. For a Linear, rows of the input are sampled
(``K = 1``). Positions depend only on (layer path, batch index), so the inputs of a pruned working
copy and the targets of the original model are sampled at the same places. Samples stay on the
device of the activations.

``sample_layers`` runs the whole model with forward hooks (one pass per call); the block-cached
runner (``frontier``) calls the same ``Sampler`` from inside the traced graph.
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


def _positions(path: str, batch: int, n: int, spatial: tuple[int, ...], per_image: int,
               device: torch.device):
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
    return img.to(device), [c.to(device) for c in reversed(coords)]


def conv_out_spatial(m: nn.Module, in_shape: torch.Size) -> tuple[int, ...]:
    """Output spatial size of conv ``m`` for an input of ``in_shape`` (N, C, *spatial)."""
    pad = m._reversed_padding_repeated_twice  # (last dim left, right, ..., first dim left, right)
    nd = len(m.kernel_size)
    out = []
    for d in range(nd):
        lo, hi = pad[2 * (nd - 1 - d)], pad[2 * (nd - 1 - d) + 1]
        span = in_shape[2 + d] + lo + hi - m.dilation[d] * (m.kernel_size[d] - 1) - 1
        out.append(span // m.stride[d] + 1)
    return tuple(out)


def conv_patches(m: nn.Module, x: torch.Tensor, img: torch.Tensor,
                 coords: list[torch.Tensor]) -> torch.Tensor:
    """(S, C_in, K) input patches of ``m`` (Conv1d/2d) behind the sampled output positions."""
    nd = len(coords)
    pad = m._reversed_padding_repeated_twice
    mode = "constant" if m.padding_mode == "zeros" else m.padding_mode
    xp = F.pad(x, pad, mode=mode) if any(pad) else x
    ks, st, dl = m.kernel_size, m.stride, m.dilation
    xp = xp.movedim(1, -1)  # (N, *spatial, C)
    ar = torch.arange(max(ks), device=x.device)
    if nd == 1:
        r = coords[0][:, None] * st[0] + ar[None, :ks[0]] * dl[0]  # (S, k)
        pat = xp[img[:, None], r]  # (S, k, C)
    else:
        r = coords[0][:, None] * st[0] + ar[None, :ks[0]] * dl[0]
        c = coords[1][:, None] * st[1] + ar[None, :ks[1]] * dl[1]
        pat = xp[img[:, None, None], r[:, :, None], c[:, None, :]]  # (S, kh, kw, C)
        pat = pat.reshape(pat.shape[0], -1, pat.shape[-1])
    return pat.transpose(1, 2).contiguous()  # (S, C, K)


class Sampler:
    """Accumulates the sampled inputs and/or outputs of layers, batch by batch."""

    def __init__(self, paths: list[str], calib: Calibration, rows: int):
        self.per_image = max(1, math.ceil(rows / max(1, calib.n_samples)))
        self.got: dict[str, dict[str, list[torch.Tensor]]] = {p: {"P": [], "Y": []} for p in paths}

    def _where(self, m: nn.Module, path: str, batch: int, x: torch.Tensor):
        if isinstance(m, nn.Linear):
            n_rows = x.numel() // x.shape[-1]
            k = min(n_rows, self.per_image * x.shape[0])
            return torch.randperm(n_rows, generator=_gen(path, batch))[:k].to(x.device)
        return _positions(path, batch, x.shape[0], conv_out_spatial(m, x.shape), self.per_image,
                          x.device)

    def inputs(self, m: nn.Module, path: str, batch: int, x: torch.Tensor) -> None:
        where = self._where(m, path, batch, x)
        if isinstance(m, nn.Linear):
            p = x.reshape(-1, x.shape[-1])[where].float().unsqueeze(-1)
        else:
            p = conv_patches(m, x.float(), *where)
        self.got[path]["P"].append(p)

    def outputs(self, m: nn.Module, path: str, batch: int, x: torch.Tensor,
                y: torch.Tensor) -> None:
        where = self._where(m, path, batch, x)
        if isinstance(m, nn.Linear):
            v = y.reshape(-1, y.shape[-1])[where]
        else:
            img, coords = where
            v = y.movedim(1, -1)[(img, *coords)]
        self.got[path]["Y"].append(v.float())

    def result(self) -> dict[str, Samples]:
        out = {}
        for p, d in self.got.items():
            out[p] = Samples(torch.cat(d["P"]) if d["P"] else None,
                             torch.cat(d["Y"]) if d["Y"] else None)
        return out


class _Stop(Exception):
    pass


def batch_inputs(xs: tuple[torch.Tensor, ...], device: torch.device | None) -> tuple:
    """A calibration batch moved to ``device`` (None: left where it is)."""
    return xs if device is None else tuple(t.to(device) for t in xs)


def sample_layers(model: nn.Module, calib: Calibration, paths: list[str], *, rows: int,
                  want_inputs: bool, want_outputs: bool, stop_early: bool = True,
                  device: torch.device | None = None,
                  model_outputs: list | None = None) -> dict[str, Samples]:
    """Run ``model`` over the calibration batches and sample the layers at ``paths``.

    ``rows`` is the number of samples per layer in total; with ``stop_early`` the forward pass of
    each batch stops once every requested layer has run. The batches are moved to ``device``;
    the model's output of each batch is appended to ``model_outputs`` (without ``stop_early``).
    """
    mods = dict(model.named_modules(remove_duplicate=False))
    sampler = Sampler(paths, calib, rows)
    state = {"batch": 0, "seen": set()}

    def hook(m, inp, out, path):
        if path in state["seen"]:
            return  # a module called twice: its first call is sampled
        state["seen"].add(path)
        if want_inputs:
            sampler.inputs(m, path, state["batch"], inp[0])
        if want_outputs:
            sampler.outputs(m, path, state["batch"], inp[0], out)
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
                    y = model(*batch_inputs(xs, device))
                    if model_outputs is not None:
                        model_outputs.append(y)
                except _Stop:
                    pass
    finally:
        for h in handles:
            h.remove()
        model.train(was)
    return sampler.result()


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
