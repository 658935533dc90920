"""Readable score maps: one large cell must not flatten the colour scale of the rest."""

from __future__ import annotations

import numpy as np
import pytest

from loraplace.report.figures import heat_scale, layer_role_heatmap


def _positions(values: np.ndarray) -> np.ndarray:
    drawn, norm, _ = heat_scale(values)
    return np.ma.filled(norm(np.ma.masked_invalid(drawn)), np.nan)


def test_one_outlier_leaves_the_other_cells_distinguishable():
    rng = np.random.default_rng(0)
    values = rng.uniform(1.0, 3.0, size=(7, 30))
    values[-1, -1] = 500.0  # the last layer's down projection
    values[2, 5] = np.nan  # not scored
    linear = (values - 0) / np.nanmax(values)
    others = np.isfinite(values) & (values < 500)
    assert np.nanmax(linear[others]) - np.nanmin(linear[others]) < 0.01  # what a linear scale shows
    pos = _positions(values)
    assert np.nanmax(pos[others]) - np.nanmin(pos[others]) > 0.15
    assert pos[-1, -1] == pytest.approx(1.0) and np.isnan(pos[2, 5])
    flat_order = np.argsort(values[others]), np.argsort(pos[others])
    assert np.array_equal(*flat_order)  # the colour order is the value order
    assert heat_scale(values)[2] == " (log scale)"


def test_zeros_with_an_outlier_use_percentile_ranks():
    values = np.array([[0.0, 1.0, 2.0], [3.0, 4.0, 1000.0]])
    drawn, norm, note = heat_scale(values)
    assert note == " (percentile rank among cells)"
    assert np.allclose(drawn, [[0, 20, 40], [60, 80, 100]])  # rank / (n - 1), by hand


def test_an_even_map_stays_linear_from_zero():
    values = np.array([[1.0, 2.0], [3.0, 4.0]])
    drawn, norm, note = heat_scale(values)
    assert note == "" and norm.vmin == 0.0
    assert np.allclose(norm(drawn), values / 4.0)


def test_the_figure_names_its_scale(tmp_path):
    cells = [("mlp.down", "model.layers", layer, 1.0 + 0.1 * layer) for layer in range(6)]
    cells.append(("attn.q", "model.layers", 5, 300.0))
    (figure,) = layer_role_heatmap(cells, tmp_path, "map", "title", "gain", "Caption.")
    assert "log scale" in figure.caption and figure.png.is_file()
