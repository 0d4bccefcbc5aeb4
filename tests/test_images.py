"""fastgen.images: the grid layout, PNG files through Pillow, and refusals of what cannot be drawn."""
import os

import numpy as np
import pytest
import torch
from PIL import Image

from fastgen import images


@pytest.mark.parametrize("channels, mode", [(1, "L"), (3, "RGB")])
def test_save_grid_writes_the_grid_as_a_png(tmp_path, channels, mode):
    x = torch.rand(5, channels, 4, 6, generator=torch.Generator().manual_seed(0)) * 2 - 1
    pixels = images.save_grid(x, tmp_path / "g.png", value_range=(-1, 1), nrow=3, padding=2, scale=2)
    assert pixels.shape == (2 * (8 + 2) + 2, 3 * (12 + 2) + 2, channels)
    with Image.open(tmp_path / "g.png") as image:
        assert image.format == "PNG" and image.mode == mode
        read = np.asarray(image)
    assert np.array_equal(read.reshape(pixels.shape), pixels.numpy())


def test_grid_maps_the_value_range_and_clips():
    x = torch.tensor([-1.0, 0.0, 1.0, 5.0]).reshape(1, 1, 1, 4)
    assert images.grid(x, value_range=(-1, 1), padding=0)[0, :, 0].tolist() == [0, 128, 255, 255]


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_save_grid_refuses_non_finite_pixels_and_writes_nothing(tmp_path, bad):
    x = torch.zeros(4, 1, 8, 8)
    x[1, 0, 2, 3] = bad
    x[3, 0, 0, 0] = bad
    with pytest.raises(ValueError, match="images contains 2 non-finite values"):
        images.save_grid(x, tmp_path / "g.png")
    assert not (tmp_path / "g.png").exists()


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(scale=0), ValueError, "scale must be an integer >= 1"),
    (dict(scale=1.5), TypeError, "scale must be an integer"),
    (dict(padding=-1), ValueError, "padding must be an integer >= 0"),
    (dict(nrow=0), ValueError, "nrow must be an integer >= 1"),
    (dict(value_range=(1, 1)), ValueError, "value_range must be"),
    (dict(value_range=(0, float("nan"))), ValueError, "value_range must be"),
    (dict(value_range="ab"), TypeError, "value_range must be a pair of numbers"),
])
def test_grid_names_a_bad_layout_argument(kwargs, error, match):
    with pytest.raises(error, match=match):
        images.grid(torch.zeros(2, 1, 4, 4), **kwargs)


@pytest.mark.parametrize("x", [torch.zeros(2, 2, 4, 4), torch.zeros(4, 4), torch.zeros(0, 1, 4, 4), "grid"])
def test_grid_names_bad_images(x):
    with pytest.raises(ValueError, match="images must"):
        images.grid(x)


@pytest.mark.parametrize("pixels", [torch.zeros(4, 4), torch.zeros(4, 4, 2, dtype=torch.uint8),
                                    torch.zeros(4, dtype=torch.uint8)])
def test_write_png_names_bad_pixels(tmp_path, pixels):
    with pytest.raises(ValueError, match="pixels must be a uint8"):
        images.write_png(tmp_path / "p.png", pixels)


def test_save_npz_writes_pixels_in_0_1_whole_or_in_blocks(tmp_path):
    x = torch.rand(5, 3, 4, 6) * 2.4 - 1.2  # some values outside [-1, 1]: clipped
    images.save_npz(x, tmp_path / "a.npz", value_range=(-1, 1))
    with np.load(tmp_path / "a.npz") as arrays:
        assert arrays.files == ["samples"]
        a = arrays["samples"]
    assert a.dtype == np.float32 and a.shape == (5, 3, 4, 6)
    assert np.array_equal(a, ((x + 1) / 2).clamp(0, 1).numpy())
    images.save_npz(iter([x[:2], x[2:3], x[3:]]), tmp_path / "b.npz", value_range=(-1, 1), shape=x.shape)
    with np.load(tmp_path / "b.npz") as arrays:
        assert np.array_equal(arrays["samples"], a)


@pytest.mark.parametrize("blocks, message", [
    (lambda x: [x[:2], x[2:4]], "must add up to 5 images, got 4"),
    (lambda x: [x[:2], x[2:, :, :3]], "must be blocks of"),
    (lambda x: [x[:2], x[2:].clone().fill_(float("nan"))], "non-finite"),
])
def test_save_npz_leaves_the_old_file_when_a_block_is_wrong(tmp_path, blocks, message):
    x = torch.rand(5, 1, 4, 4)
    (tmp_path / "x.npz").write_bytes(b"old")
    with pytest.raises(ValueError, match=message):
        images.save_npz(blocks(x), tmp_path / "x.npz", shape=x.shape)
    assert (tmp_path / "x.npz").read_bytes() == b"old" and os.listdir(tmp_path) == ["x.npz"]


def test_sample_paths_must_be_png_or_npz():
    images.check_samples_path("a/b.PNG")
    images.check_samples_path("b.npz")
    with pytest.raises(ValueError, match=r"out must end in .png or .npz .*, got 'x.jpg'"):
        images.check_samples_path("x.jpg", "out")
