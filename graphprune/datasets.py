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

    imgs = [torch.from_numpy(np.array(im)).permute(2, 0, 1).float() / 255
            for im in load_sample_images().images]
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


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_IMG = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def load_data(spec: str, input_shape: tuple[int, ...] | None = None, *, max_items: int = 2048
              ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
    """Data for the CLI's ``--data``: ``(calib_x, calib_y, eval_x, eval_y)``.

    ``digits`` (scikit-learn's, train split to calibrate, test split to evaluate); a ``.npz``
    with ``x``/``y`` (or ``x_train``/``y_train``/``x_test``/``y_test``); a ``.npy`` of inputs;
    or a folder of images (labels from sub-folder names, resized to ``input_shape`` and
    normalised with the ImageNet mean/std). Without separate splits, the first 80% calibrate
    and the last 20% evaluate.
    """
    import os

    from .errors import InputError

    if spec == "digits":
        xtr, ytr, xte, yte = digits()
        return xtr, ytr, xte, yte
    if spec.lower().endswith((".txt", ".text", ".md", ".rst")):
        raise InputError(f"The data source '{spec}' is a text file: text calibrates a Hugging Face "
                         "causal language model loaded from a local directory (model spec "
                         "'hf:DIR'). This model takes tensors"
                         + (f" of shape {tuple(input_shape)}" if input_shape else "")
                         + ": give 'digits', a .npz/.npy file or a folder of images.", param="data")
    if not os.path.exists(spec):
        raise InputError(f"The data source '{spec}' does not exist (expected 'digits', a .npz/.npy "
                         "file or a folder of images).", param="data")
    if os.path.isdir(spec):
        x, y = _image_folder(spec, input_shape, max_items)
    elif spec.endswith(".npz"):
        try:
            d = np.load(spec, allow_pickle=False)
        except Exception as e:
            raise InputError(f"cannot read '{spec}' as .npz: {e}") from e
        keys = set(d.files)
        if {"x_train", "x_test"} <= keys:
            f = lambda k: torch.from_numpy(d[k]) if k in keys else None  # noqa: E731
            return (f("x_train").float(), _long(f("y_train")), f("x_test").float(),
                    _long(f("y_test")))
        if "x" not in keys:
            raise InputError(f"'{spec}' must hold an array 'x' (and optionally 'y'), or "
                             f"x_train/x_test. It holds: {', '.join(sorted(keys))}.")
        x = torch.from_numpy(d["x"]).float()
        y = _long(torch.from_numpy(d["y"])) if "y" in keys else None
    elif spec.endswith(".npy"):
        try:
            x, y = torch.from_numpy(np.load(spec, allow_pickle=False)).float(), None
        except Exception as e:
            raise InputError(f"cannot read '{spec}' as .npy: {e}") from e
    else:
        raise InputError(f"The data source '{spec}' is not 'digits', a .npz/.npy file or a folder.",
                         param="data")
    if x.shape[0] < 2:
        raise InputError(f"The data source '{spec}' holds {x.shape[0]} sample(s); at least 2 are "
                         "needed.", param="data")
    cut = max(1, int(0.8 * x.shape[0]))
    return x[:cut], None if y is None else y[:cut], x[cut:], None if y is None else y[cut:]


def _long(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.long()


def _image_folder(path: str, input_shape: tuple[int, ...] | None, max_items: int):
    import os

    from PIL import Image

    from .errors import InputError

    if input_shape is None or len(input_shape) != 4:
        raise InputError("A folder of images needs the model's input shape (N, C, H, W) to size the "
                         "images.", param="input_shape")
    _, c, h, w = input_shape
    try:
        entries = sorted(os.listdir(path))
    except OSError as e:
        raise InputError(f"cannot read data folder '{path}': {e.strerror}.") from e
    classes = [e for e in entries if os.path.isdir(os.path.join(path, e))]
    files: list[tuple[str, int | None]] = []
    if classes:
        for k, cl in enumerate(classes):
            for f in sorted(os.listdir(os.path.join(path, cl))):
                if f.lower().endswith(_IMG):
                    files.append((os.path.join(path, cl, f), k))
    else:
        files = [(os.path.join(path, f), None) for f in entries if f.lower().endswith(_IMG)]
    if not files:
        raise InputError(f"data folder '{path}' holds no images ({', '.join(_IMG)}).")
    g = np.random.default_rng(0)
    order = g.permutation(len(files))[:max_items]
    xs, ys = [], []
    mean = torch.tensor(IMAGENET_MEAN[:c] if c == 3 else [0.5] * c).view(c, 1, 1)
    std = torch.tensor(IMAGENET_STD[:c] if c == 3 else [0.5] * c).view(c, 1, 1)
    for i in order:
        f, label = files[i]
        try:
            im = Image.open(f).convert("RGB" if c == 3 else "L").resize((w, h))
        except Exception as e:
            raise InputError(f"cannot read image '{f}': {e}") from e
        t = torch.from_numpy(np.asarray(im, dtype=np.float32) / 255)
        t = t.permute(2, 0, 1) if t.ndim == 3 else t[None]
        xs.append((t - mean) / std)
        ys.append(label)
    y = torch.tensor(ys) if all(v is not None for v in ys) else None
    return torch.stack(xs), y
