"""Readable score maps: one large cell must not flatten the colour scale of the rest."""

from __future__ import annotations

import numpy as np
import pytest

from loraplace.importance.output import heat_cells, heatmap
from loraplace.importance.scores import ImportanceResult, SlotScore
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


def _importance(gains: dict[tuple[str, str, int], float]) -> ImportanceResult:
    """A one-rank score of 64 x 64 slots (``(stack, role, layer) -> gain at r=1``)."""
    slots = [SlotScore(name=f"{stack}.{layer}.{role}", role=role, stack=stack, layer=layer, in_features=64,
                       out_features=64, curve=(gain,)) for (stack, role, layer), gain in gains.items()]
    return ImportanceResult(score="gradient", max_rank=1, slots=slots, tokens=100, batches=1, batch_size=1,
                            seconds=1.0, peak_memory_mib=None, memory_kind=None, method="", approximation="exact")


def test_the_importance_map_spreads_the_slots_an_outlier_would_flatten(tmp_path):
    # 12 layers x 2 roles with gains 1.0-2.1, the last layer's down projection 400x the rest
    gains = {("model.layers", role, layer): 1.0 + 0.1 * layer for layer in range(12) for role in ("attn.q", "mlp.down")}
    gains[("model.layers", "mlp.down", 11)] = 800.0
    cells = heat_cells(_importance(gains), r=1)
    assert cells.note == " (log scale)" and cells.roles == ["attn.q", "mlp.down"]
    grid = cells.grids["model.layers"]
    positions = np.asarray(cells.norm(grid))
    others = positions[:, 0]  # attn.q: 1.0 .. 2.1 of 800, all below 0.003 of the maximum when linear
    assert (2.1 / 800.0) < 0.003 and others.max() - others.min() > 0.1
    assert positions[11, 1] == pytest.approx(1.0) and np.all(np.diff(others) > 0)  # the order is kept
    png, svg = heatmap(_importance(gains), tmp_path / "map", r=1)
    assert png.is_file() and svg.is_file()


def test_two_stacks_share_one_scale():
    gains = {("encoder.block", "attn.q", 0): 1.0, ("encoder.block", "attn.q", 1): 2.0,
             ("decoder.block", "attn.q", 0): 4.0, ("decoder.block", "attn.q", 1): 8.0}
    cells = heat_cells(_importance(gains), r=1)
    assert cells.note == ""  # 1-8: an 8x span stays linear, as shares of the maximum
    assert np.allclose(cells.norm(cells.grids["encoder.block"][:, 0]), [1 / 8, 2 / 8])
    assert np.allclose(cells.norm(cells.grids["decoder.block"][:, 0]), [4 / 8, 1.0])
