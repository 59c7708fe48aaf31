"""The pictures: layout of the grids and valid PNG files."""

import matplotlib.image
import numpy as np
import pytest

from pureflax import viz


def test_tile_puts_class_r_on_row_r():
    images = np.repeat(np.arange(10, dtype=np.float32), 10)[:, None] * np.ones((1, 784), np.float32)
    grid = viz.tile(images, 10, 10)
    assert grid.shape == (280, 280)
    for r in range(10):
        assert np.all(grid[r * 28 : (r + 1) * 28] == r)


def test_tile_keeps_each_image_upright():
    image = np.arange(784, dtype=np.float32)
    grid = viz.tile(np.stack([image, image]), 1, 2)
    np.testing.assert_array_equal(grid[:, :28], image.reshape(28, 28))


def test_tile_rejects_the_wrong_count():
    with pytest.raises(ValueError, match=r"expected \(4, 784\)"):
        viz.tile(np.zeros((3, 784)), 2, 2)


def test_files_are_pngs(tmp_path):
    rng = np.random.default_rng(0)
    viz.save_samples(rng.random((100, 784)), tmp_path / "s.png")
    viz.save_reconstructions(rng.random((40, 784)), rng.random((40, 784)), tmp_path / "r.png")
    viz.save_loss_curve([100, 200, 300], {"loss": [3.0, 2.0, 1.5], "kl": [0.5, 0.6, 0.7]}, tmp_path / "l.png", 1.4)
    for name in ("s.png", "r.png", "l.png"):
        with open(tmp_path / name, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
        image = matplotlib.image.imread(tmp_path / name)
        assert image.ndim == 3 and min(image.shape[:2]) > 100
