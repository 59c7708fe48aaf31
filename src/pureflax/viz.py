"""Pictures of a run: the sample grid, reconstructions and the loss curve (PNG files)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def tile(images: np.ndarray, rows: int, cols: int, side: int = 28) -> np.ndarray:
    """Arrange ``rows * cols`` flat images into one (rows*side, cols*side) array, row-major.

    Examples:
        >>> tile(np.zeros((6, 784)), 2, 3).shape
        (56, 84)
    """
    images = np.asarray(images, dtype=np.float32)
    if images.shape != (rows * cols, side * side):
        raise ValueError(f"tile: expected {(rows * cols, side * side)} images, got {images.shape}")
    grid = images.reshape(rows, cols, side, side)
    return np.einsum("ikjl", grid).reshape(rows * side, cols * side)  # the tutorial's layout


def _save_image(array: np.ndarray, path: Path, title: str, ylabels: Sequence[str] = ()) -> None:
    fig, ax = plt.subplots(figsize=(array.shape[1] / 40, array.shape[0] / 40 + 0.5), dpi=100)
    ax.imshow(np.clip(array, 0.0, 1.0), cmap="gray", vmin=0.0, vmax=1.0)
    ax.set_title(title, fontsize=9)
    ax.set_xticks([])
    if ylabels:
        side = array.shape[0] // len(ylabels)
        ax.set_yticks([side * i + side / 2 for i in range(len(ylabels))], labels=list(ylabels), fontsize=7)
    else:
        ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def save_samples(samples: np.ndarray, path: str | Path, num_classes: int = 10) -> None:
    """Save a grid of generated digits: row r holds the samples of class r."""
    rows = num_classes
    cols = len(samples) // rows
    _save_image(tile(samples, rows, cols), Path(path), "samples: row r = class r", [str(r) for r in range(rows)])


def save_reconstructions(originals: np.ndarray, recons: np.ndarray, path: str | Path, cols: int = 10) -> None:
    """Save pairs of rows: test images, then their reconstructions beneath them."""
    originals = np.asarray(originals)[: (len(originals) // cols) * cols]
    recons = np.asarray(recons)[: len(originals)]
    pairs = len(originals) // cols
    rows = np.concatenate(
        [np.stack([originals[i * cols : (i + 1) * cols], recons[i * cols : (i + 1) * cols]]) for i in range(pairs)]
    ).reshape(2 * pairs * cols, -1)
    labels = ["input", "recon"] * pairs
    _save_image(tile(rows, 2 * pairs, cols), Path(path), "test images and their reconstructions", labels)


def save_loss_curve(steps: Sequence[int], losses: dict[str, Sequence[float]], path: str | Path, test_loss: float | None = None) -> None:
    """Plot each named training curve against the global step, and the final test loss."""
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    for name, values in losses.items():
        ax.plot(steps, values, label=name, linewidth=1)
    if test_loss is not None and len(steps):
        ax.scatter([steps[-1]], [test_loss], color="black", zorder=3, label=f"test loss {test_loss:.2f}")
    ax.set_xlabel("step")
    ax.set_ylabel("mean over the last log window")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title("training loss (loss = mse + kl_weight * kl)")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
