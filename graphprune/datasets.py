"""Real data that ships inside installed packages (no download): scikit-learn's 8x8 digits and
crops of its sample photographs."""

from __future__ import annotations

import numpy as np
import torch


def digits(test_fraction: float = 0.25, seed: int = 0
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """scikit-learn's 1797 handwritten 8x8 digits as ``(x_train, y_train, x_test, y_test)``:
    inputs ``(N, 1, 8, 8)`` float32 standardised with the training split's statistics, labels
    int64. The split is stratified and seeded."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = d.images.astype(np.float32)[:, None]  # (N, 1, 8, 8), values 0..16
    xtr, xte, ytr, yte = train_test_split(x, d.target, test_size=test_fraction,
                                          random_state=seed, stratify=d.target)
    mean, std = xtr.mean(), xtr.std()
    f = lambda a: torch.from_numpy((a - mean) / std)  # noqa: E731
    return f(xtr), torch.from_numpy(ytr).long(), f(xte), torch.from_numpy(yte).long()


def sample_crops(n: int, size: int = 224, seed: int = 0) -> torch.Tensor:
    """``n`` random ``size``x``size`` RGB crops of scikit-learn's two sample photos, normalised
    with the ImageNet mean/std: realistic calibration images for ImageNet-size models."""
    from sklearn.datasets import load_sample_images

    imgs = [torch.from_numpy(im).permute(2, 0, 1).float() / 255 for im in load_sample_images().images]
    g = torch.Generator().manual_seed(seed)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    out = []
    for i in range(n):
        im = imgs[i % len(imgs)]
        scale = float(torch.empty(1).uniform_(0.35, 0.9, generator=g))
        side = int(min(im.shape[1:]) * scale)
        top = int(torch.randint(0, im.shape[1] - side + 1, (1,), generator=g))
        left = int(torch.randint(0, im.shape[2] - side + 1, (1,), generator=g))
        crop = im[:, top:top + side, left:left + side]
        crop = torch.nn.functional.interpolate(crop[None], size=(size, size), mode="bilinear",
                                               align_corners=False)[0]
        if float(torch.rand(1, generator=g)) < 0.5:
            crop = crop.flip(-1)
        out.append((crop - mean) / std)
    return torch.stack(out)
