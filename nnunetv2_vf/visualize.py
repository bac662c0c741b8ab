"""Pictures people look at: prediction overlays on the image, per case, with a legend of the label names."""
from __future__ import annotations

import os
from typing import Mapping

import numpy as np

OVERLAY_ALPHA = 0.55


def label_colours(n_labels: int) -> list[tuple]:
    """RGBA colour of each label value 0..n_labels-1 as drawn in the overlays (value 0 = background, transparent)."""
    import matplotlib

    cmap = matplotlib.colormaps["tab10"]
    return [(0.0, 0.0, 0.0, 0.0)] + [(*cmap(i % 10)[:3], OVERLAY_ALPHA) for i in range(1, n_labels)]


def label_names_from_dataset_json(dataset_json: Mapping) -> dict[int, str]:
    """``{value: name}`` of the foreground labels in an nnU-Net dataset.json ("labels": {"name": value, ...}).

    Region-based labels (a list of values) are named by their first value; the background (0) is left out.
    """
    names = {}
    for name, value in dataset_json.get("labels", {}).items():
        value = value[0] if isinstance(value, (list, tuple)) else value
        if int(value) != 0:
            names[int(value)] = str(name)
    return names


def overlay_figure(image: np.ndarray, reference: np.ndarray | None, prediction: np.ndarray, title: str = "",
                   label_names: Mapping[int, str] | None = None):
    """The matplotlib figure :func:`save_overlay` writes (for inspection before saving); close it when done."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    label_names = dict(label_names or {})
    focus = reference if reference is not None and reference.any() else prediction
    centre = [int(round(c.mean())) for c in np.nonzero(focus)] if focus.any() else [s // 2 for s in image.shape]
    n_labels = int(max(prediction.max(), 0 if reference is None else reference.max(), *label_names, 0)) + 1
    colours = label_colours(n_labels)
    cmap = ListedColormap(colours)
    rows = [("reference", reference)] if reference is not None else []
    rows.append(("prediction", prediction))
    lo, hi = np.percentile(image, (0.5, 99.5))
    fig, axes = plt.subplots(len(rows), 3, figsize=(9, 3 * len(rows) + 0.4), squeeze=False)
    for r, (name, labels) in enumerate(rows):
        for axis in range(3):
            img = np.take(image, centre[axis], axis=axis)
            lab = np.take(labels, centre[axis], axis=axis)
            ax = axes[r, axis]
            ax.imshow(img, cmap="gray", vmin=lo, vmax=hi, interpolation="nearest")
            ax.imshow(lab, cmap=cmap, vmin=0, vmax=max(n_labels - 1, 1), interpolation="nearest")
            ax.set_title(f"{name}, axis {axis} slice {centre[axis]}", fontsize=8)
            ax.axis("off")
    # legend: every foreground label of the dataset (named ones, plus any unnamed value that occurs), in its colour
    present = {v for v in range(1, n_labels)
               if (prediction == v).any() or (reference is not None and (reference == v).any())}
    values = sorted(set(label_names) | present)
    handles = [Patch(facecolor=colours[v], edgecolor=colours[v][:3], label=label_names.get(v, f"label {v}"))
               for v in values]
    if handles:
        fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=8, frameon=False)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.06 if handles else 0, 1, 1))
    return fig


def save_overlay(image: np.ndarray, reference: np.ndarray | None, prediction: np.ndarray, path: str | os.PathLike,
                 title: str = "", label_names: Mapping[int, str] | None = None) -> None:
    """Three orthogonal slices through the label-richest point: image, reference (if any), prediction, and a legend
    naming each label in its overlay colour (``label_names``: ``{value: name}``, e.g. from
    :func:`label_names_from_dataset_json`; unnamed values are called "label N").

    Arrays are [D, H, W] (nnU-Net/SimpleITK array order); labels are integers with 0 = background.
    """
    import matplotlib.pyplot as plt

    fig = overlay_figure(image, reference, prediction, title, label_names)
    try:
        fig.savefig(path, dpi=100)
    finally:
        plt.close(fig)
