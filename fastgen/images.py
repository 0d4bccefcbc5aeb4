"""Image grids and PNG files (Pillow), and sample arrays as .npz (NumPy), written atomically.

    from fastgen import images
    images.save_grid(x, "grid.png", value_range=(-1, 1))   # x: [N, C, H, W] with C = 1 or 3
    images.save_npz(x, "samples.npz", value_range=(-1, 1)) # np.load("samples.npz")["samples"]: float32 in [0, 1]
"""
import math
import os
import zipfile

import numpy as np
import torch
from PIL import Image

from fastgen import _checks
from fastgen._files import atomic_write


def _check_images(images) -> None:
    """A [N >= 1, C in (1, 3), H, W] tensor of finite values; ValueError naming ``images`` otherwise."""
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"images must be a [N, C, H, W] tensor with C = 1 or 3, got "
                         f"{tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__}")
    if images.shape[0] == 0:
        raise ValueError("images must hold at least one image, got 0")
    _check_finite(images)


def _check_finite(images: torch.Tensor) -> None:
    """No NaN or inf: a broken model's samples are refused, never written as plausible pixels."""
    if images.is_floating_point():
        bad = images.numel() - int(torch.isfinite(images).sum())
        if bad:
            raise ValueError(f"images contains {bad} non-finite values (NaN or inf); a broken model's samples "
                             f"are refused rather than drawn as black or white pixels")


def _check_layout(value_range, scale, padding, nrow):
    """(low, high, scale, padding, nrow) checked: low < high finite, scale >= 1, padding >= 0, nrow >= 1 or None."""
    try:
        low, high = (float(v) for v in value_range)
    except (TypeError, ValueError):
        raise TypeError(f"value_range must be a pair of numbers (low, high), got {value_range!r}") from None
    if not (math.isfinite(low) and math.isfinite(high) and low < high):
        raise ValueError(f"value_range must be (low, high) with finite low < high, got {value_range!r}")
    if _checks.as_int(scale, "scale") < 1:
        raise ValueError(f"scale must be an integer >= 1, got {scale}")
    if _checks.as_int(padding, "padding") < 0:
        raise ValueError(f"padding must be an integer >= 0, got {padding}")
    if nrow is not None and _checks.as_int(nrow, "nrow") < 1:
        raise ValueError(f"nrow must be an integer >= 1 or None, got {nrow}")
    return low, high, scale, padding, nrow


def _pixels(images: torch.Tensor, low: float, high: float) -> torch.Tensor:
    """Floats in [low, high] -> float32 in [0, 1] on the CPU (outside values clipped)."""
    return ((images.detach().float().cpu() - low) / (high - low)).clamp(0, 1)


def grid(images: torch.Tensor, *, nrow: int = None, padding: int = 1, value_range=(0.0, 1.0), scale: int = 1):
    """[N, C, H, W] floats in ``value_range`` -> a uint8 [rows * (H + p) + p, cols * (W + p) + p, C] grid,
    images row-major, ``nrow`` per row (default: a square), on a mid-grey background (the padding), each
    pixel repeated ``scale`` times. Values outside ``value_range`` are clipped; NaN or inf is an error."""
    _check_images(images)
    low, high, scale, padding, nrow = _check_layout(value_range, scale, padding, nrow)
    n, c, h, w = images.shape
    nrow = nrow or math.ceil(math.sqrt(n))
    rows = math.ceil(n / nrow)
    pixels = _pixels(images, low, high).mul(255).round().to(torch.uint8)
    if scale > 1:
        pixels = pixels.repeat_interleave(scale, dim=2).repeat_interleave(scale, dim=3)
        h, w = h * scale, w * scale
    out = torch.full((rows * (h + padding) + padding, nrow * (w + padding) + padding, c), 128, dtype=torch.uint8)
    for k in range(n):
        r, col = divmod(k, nrow)
        top, left = padding + r * (h + padding), padding + col * (w + padding)
        out[top:top + h, left:left + w] = pixels[k].permute(1, 2, 0)
    return out


def write_png(path, pixels: torch.Tensor) -> None:
    """Write a uint8 [H, W] or [H, W, C] (C = 1 grey, 3 RGB) tensor as an 8-bit PNG, atomically: a write
    that fails midway leaves the file that was at ``path`` as it was."""
    is_tensor = isinstance(pixels, torch.Tensor)
    if (not is_tensor or pixels.dtype != torch.uint8 or pixels.dim() not in (2, 3)
            or (pixels.dim() == 3 and pixels.shape[2] not in (1, 3))):
        got = f"{pixels.dtype} {tuple(pixels.shape)}" if is_tensor else type(pixels).__name__
        raise ValueError(f"pixels must be a uint8 [H, W] or [H, W, C] tensor with C = 1 or 3, got {got}")
    if pixels.dim() == 3 and pixels.shape[2] == 1:
        pixels = pixels[:, :, 0]
    image = Image.fromarray(pixels.detach().cpu().contiguous().numpy())  # mode "L" (grey) or "RGB"
    with atomic_write(path, "wb") as f:
        image.save(f, format="PNG")


def save_grid(images: torch.Tensor, path, **grid_kwargs) -> torch.Tensor:
    """``write_png(path, grid(images, **grid_kwargs))``; returns the grid."""
    pixels = grid(images, **grid_kwargs)
    write_png(path, pixels)
    return pixels


NPZ_KEY = "samples"  # np.load(path)[NPZ_KEY]


def save_npz(images, path, *, value_range=(0.0, 1.0), shape=None) -> None:
    """Write [N, C, H, W] floats in ``value_range`` as float32 pixel values in [0, 1] (outside values
    clipped; NaN or inf is an error) under the key ``samples`` of a .npz file, atomically.

    ``images`` is one tensor, or an iterable of [n_i, C, H, W] blocks written in order one at a time
    (so a file larger than memory can be written; ``shape``: the whole array's [N, C, H, W], the n_i
    summing to N). A block that breaks the shape or holds NaN removes the half-written file: the file
    that was at ``path`` is left as it was."""
    low, high = _check_layout(value_range, 1, 0, None)[:2]
    if isinstance(images, torch.Tensor):
        images, shape = [images], images.shape
    elif shape is None:
        raise ValueError("shape must be given with an iterable of image blocks: the whole array's [N, C, H, W]")
    shape = tuple(_checks.shape(shape))
    if len(shape) != 4 or shape[0] == 0:
        raise ValueError(f"images must be [N, C, H, W] with N >= 1, got shape {shape}")
    with atomic_write(path, "wb") as f:
        # what np.savez writes (a zip member samples.npy), streamed: the header, then each block's bytes
        with zipfile.ZipFile(f, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as archive, \
                archive.open(f"{NPZ_KEY}.npy", "w", force_zip64=True) as member:
            np.lib.format.write_array_header_2_0(member, {"descr": "<f4", "fortran_order": False, "shape": shape})
            written = 0
            for block in images:
                if (not isinstance(block, torch.Tensor) or block.shape[1:] != shape[1:]
                        or written + block.shape[0] > shape[0]):
                    got = tuple(block.shape) if isinstance(block, torch.Tensor) else type(block).__name__
                    raise ValueError(f"images must be blocks of [n, {', '.join(map(str, shape[1:]))}] adding up to "
                                     f"{shape[0]} images, got a block {got} after {written}")
                _check_finite(block)
                member.write(_pixels(block, low, high).contiguous().numpy().astype("<f4", copy=False).tobytes())
                written += block.shape[0]
            if written != shape[0]:
                raise ValueError(f"images must add up to {shape[0]} images, got {written}")


SAMPLE_SUFFIXES = (".png", ".npz")  # what save_samples writes: a PNG grid, or the array


def check_samples_path(path, name: str = "path") -> None:
    """``path`` ends in one of SAMPLE_SUFFIXES; ValueError naming ``name`` and them otherwise (checked
    before any work)."""
    suffix = os.path.splitext(os.fspath(path))[1].lower()
    if suffix not in SAMPLE_SUFFIXES:
        raise ValueError(f"{name} must end in {' or '.join(SAMPLE_SUFFIXES)} (a PNG grid, or the samples as a NumPy "
                         f"array), got {os.fspath(path)!r}")


def save_samples(images, path, *, value_range=(0.0, 1.0), scale: int = 1, shape=None) -> None:
    """Samples [N, C, H, W] in ``value_range`` to ``path`` by its suffix: ``.png`` a grid (``save_grid``,
    each pixel ``scale`` times), ``.npz`` the array (``save_npz``; ``images`` may then be an iterable
    of blocks with ``shape``)."""
    check_samples_path(path)
    if os.path.splitext(os.fspath(path))[1].lower() == ".npz":
        save_npz(images, path, value_range=value_range, shape=shape)
    else:
        save_grid(images if isinstance(images, torch.Tensor) else torch.cat(list(images)), path,
                  value_range=value_range, scale=scale)
