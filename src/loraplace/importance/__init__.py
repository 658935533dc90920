"""Importance scores of LoRA slots, the input of automatic placement: for every module a LoRA
adapter can go on, a curve of the predicted gain of a rank-k adapter there
(:mod:`~loraplace.importance.scores`: ``gradient``, ``adam``, ``activation``, ``weight``, registered
in ``SCORES``; :mod:`~loraplace.importance.pilot`: ``pilot``, a short LoRA training run), the
streaming spectrum that reads them without storing every weight gradient
(:mod:`~loraplace.importance.spectrum`), and the files they are written to
(:mod:`~loraplace.importance.output`: ``loraplace-importance/1`` JSON, CSV, heatmap).

Importing this package loads torch; matplotlib loads only when a heatmap is drawn.
"""

from loraplace.importance.output import heatmap, role_shares, slot_rows, write_importance
from loraplace.importance.pilot import PILOT_LR, PILOT_RANK, PILOT_STEPS, pilot_curve, pilot_energies
from loraplace.importance.scores import (
    FORMAT,
    SCORES,
    ImportanceResult,
    Score,
    ScoringSetup,
    SlotScore,
    adam_curve,
    energy_curve,
    get_score,
    hill_alpha,
    load_for_scoring,
    score_batches,
    score_model,
    score_setup,
    score_slots,
    scored_slots,
)
from loraplace.importance.spectrum import SpectrumAccumulator

__all__ = [
    "FORMAT", "ImportanceResult", "SCORES", "Score", "ScoringSetup", "SlotScore", "SpectrumAccumulator", "adam_curve",
    "energy_curve", "get_score",
    "heatmap",
    "hill_alpha", "load_for_scoring", "PILOT_LR", "PILOT_RANK", "PILOT_STEPS", "pilot_curve", "pilot_energies",
    "role_shares", "score_batches", "score_model", "score_setup", "score_slots",
    "scored_slots", "slot_rows", "write_importance",
]
