"""Image grids and PNG files (Pillow), written atomically.

    from fastgen import images
    images.save_grid(x, "grid.png", value_range=(-1, 1))   # x: [N, C, H, W] with C = 1 or 3
"""
import math

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


def grid(images: torch.Tensor, *, nrow: int = None, padding: int = 1, value_range=(0.0, 1.0), scale: int = 1):
    """[N, C, H, W] floats in ``value_range`` -> a uint8 [rows * (H + p) + p, cols * (W + p) + p, C] grid,
    images row-major, ``nrow`` per row (default: a square), on a mid-grey background (the padding), each
    pixel repeated ``scale`` times. Values outside ``value_range`` are clipped; NaN or inf is an error."""
    _check_images(images)
    low, high, scale, padding, nrow = _check_layout(value_range, scale, padding, nrow)
    n, c, h, w = images.shape
    nrow = nrow or math.ceil(math.sqrt(n))
    rows = math.ceil(n / nrow)
    pixels = ((images.detach().float().cpu() - low) / (high - low)).clamp(0, 1).mul(255).round().to(torch.uint8)
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
