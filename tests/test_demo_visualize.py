"""Overlay pictures carry a legend naming each label (from dataset.json) in the colour it is drawn with."""
from __future__ import annotations

import json

import numpy as np
import pytest
from matplotlib.colors import to_rgb

from nnunetv2_vf.demo import DEMO_DATA
from nnunetv2_vf.visualize import label_colours, label_names_from_dataset_json, overlay_figure, save_overlay


def _case():
    rng = np.random.default_rng(0)
    image = rng.normal(size=(12, 16, 14)).astype(np.float32)
    reference = np.zeros(image.shape, np.uint8)
    reference[4:8, 5:9, 4:7] = 1
    reference[4:8, 9:12, 4:7] = 2
    prediction = reference.copy()
    prediction[4:8, 9:12, 4:7] = 0  # the prediction misses label 2: the legend still names it
    return image, reference, prediction


def test_label_names_come_from_dataset_json():
    names = label_names_from_dataset_json(json.loads((DEMO_DATA / "dataset.json").read_text()))
    assert names == {1: "Anterior", 2: "Posterior"}
    assert label_names_from_dataset_json({"labels": {"background": 0, "whole": [1, 2], "core": 2}}) == \
        {1: "whole", 2: "core"}


def test_overlay_legend_names_labels_in_their_colours(tmp_path):
    image, reference, prediction = _case()
    names = {1: "anterior", 2: "posterior"}
    fig = overlay_figure(image, reference, prediction, "case", names)
    try:
        assert len(fig.legends) == 1
        legend = fig.legends[0]
        assert [t.get_text() for t in legend.get_texts()] == ["anterior", "posterior"]
        colours = label_colours(3)
        for value, handle in zip((1, 2), legend.legend_handles):
            assert handle.get_facecolor()[:3] == pytest.approx(to_rgb(colours[value][:3]))
        # the overlay images use the same colours: the label layer's colormap maps value v to colours[v]
        label_layers = [ax.get_images()[1] for ax in fig.axes if len(ax.get_images()) == 2]
        assert len(label_layers) == 6  # reference and prediction rows, three axes each
        for value in (1, 2):
            assert label_layers[0].cmap(label_layers[0].norm(value))[:3] == pytest.approx(colours[value][:3])
    finally:
        import matplotlib.pyplot as plt

        plt.close(fig)


def test_unnamed_labels_get_a_generic_name_and_png_is_written(tmp_path):
    image, reference, prediction = _case()
    prediction[0, 0, 0] = 3  # a value dataset.json does not name
    fig = overlay_figure(image, reference, prediction, "", {1: "anterior", 2: "posterior"})
    try:
        assert [t.get_text() for t in fig.legends[0].get_texts()] == ["anterior", "posterior", "label 3"]
    finally:
        import matplotlib.pyplot as plt

        plt.close(fig)
    path = tmp_path / "overlay.png"
    save_overlay(image, reference, prediction, path, "title", {1: "anterior", 2: "posterior"})
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
