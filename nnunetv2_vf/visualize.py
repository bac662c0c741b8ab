"""Pictures people look at: prediction overlays on the image, per case."""
from __future__ import annotations

import os

import numpy as np


def _label_colours(n_labels: int):
    import matplotlib

    cmap = matplotlib.colormaps["tab10"]
    return [cmap(i % 10) for i in range(n_labels)]


def save_overlay(image: np.ndarray, reference: np.ndarray | None, prediction: np.ndarray, path: str | os.PathLike,
                 title: str = "") -> None:
    """Three orthogonal slices through the label-richest point: image, reference (if any), prediction.

    Arrays are [D, H, W] (nnU-Net/SimpleITK array order); labels are integers with 0 = background.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap

    focus = reference if reference is not None and reference.any() else prediction
    centre = [int(round(c.mean())) for c in np.nonzero(focus)] if focus.any() else [s // 2 for s in image.shape]
    n_labels = int(max(prediction.max(), 0 if reference is None else reference.max())) + 1
    cmap = ListedColormap([(0, 0, 0, 0)] + [(*c[:3], 0.55) for c in _label_colours(n_labels)[1:]])
    rows = [("reference", reference)] if reference is not None else []
    rows.append(("prediction", prediction))
    lo, hi = np.percentile(image, (0.5, 99.5))
    fig, axes = plt.subplots(len(rows), 3, figsize=(9, 3 * len(rows)), squeeze=False)
    for r, (name, labels) in enumerate(rows):
        for axis in range(3):
            img = np.take(image, centre[axis], axis=axis)
            lab = np.take(labels, centre[axis], axis=axis)
            ax = axes[r, axis]
            ax.imshow(img, cmap="gray", vmin=lo, vmax=hi, interpolation="nearest")
            ax.imshow(lab, cmap=cmap, vmin=0, vmax=max(n_labels - 1, 1), interpolation="nearest")
            ax.set_title(f"{name}, axis {axis} slice {centre[axis]}", fontsize=8)
            ax.axis("off")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
