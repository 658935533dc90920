"""Synthetic study folders with known effects, in the exact on-disk layout ``loraplace run``
writes (run ids and execution order from :func:`loraplace.study.specs.run_specs`, results
files from the study store): for the report's tests, without training anything."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from loraplace.config import StudyConfig
from loraplace.metrics import perplexity
from loraplace.records import RunResult
from loraplace.study.specs import run_specs
from loraplace.study.store import StudyStore

ROLES = {"attn": ["attn.q", "attn.k", "attn.v", "attn.o"], "mlp": ["mlp.gate", "mlp.up", "mlp.down"]}
# strategy -> (roles it adapts, trainable params per layer and role at r=8, hidden 64)
_STRATEGY_ROLES = {
    "full": ROLES["attn"] + ROLES["mlp"],
    "attention": ROLES["attn"],
    "ffn": ROLES["mlp"],
    "qv": ["attn.q", "attn.v"],
    "mlp-down": ["mlp.down"],
    "attn-o": ["attn.o"],
}


def make_study(study_dir: Path, effects: dict[str, float], *, seeds: Sequence[int] = (0, 1, 2),
               n_examples: int = 60, num_layers: int = 4, base_loss: float = 2.5, seed_sd: float = 0.01,
               example_sd: float = 0.3, noise_sd: float = 0.02, include_base: bool = True, name: str = "synthetic",
               model: str = "synthetic/model", eval_seed: int = 0, failed: Sequence[str] = (),
               extra_fields: bool = False, params: dict[str, int] | None = None,
               order: str | None = "rotate", memory: bool = True, memory_kind: str = "rss",
               diverged: dict[str, str] | None = None, examples: dict[str, tuple[Sequence[float], Sequence[int]]] | None = None,
               train_times: dict[str, float] | None = None, run_fields: dict[str, dict[str, Any]] | None = None) -> Path:
    """Write a study folder whose arm ``s`` has true eval loss ``base_loss + effects[s]``.

    Per-example losses share an example effect (``example_sd``; the pairing), plus independent
    noise per run (``noise_sd``) and a per-seed shift (``seed_sd``). ``failed`` run ids are written
    as failed runs. ``extra_fields`` adds the optional prompt/padding fields to eval_examples.json.

    The fields of newer studies (leave them at their defaults for a study as ``loraplace run``
    writes it now; switch them off to mimic an older folder):

    * ``order``: execution order recorded in ``position``: ``"rotate"`` (the base row first, then
      the arm order rotated by the seed's index, as the study store runs them), ``"fixed"`` (every
      seed in the same arm order), None (no positions recorded).
    * ``memory``: record ``memory_start_mib`` and ``peak_memory_increase_mib`` beside the peak
      (False: only ``peak_memory_mib``, a process peak); ``memory_kind`` names the measure.
    * ``diverged``: run id -> reason; such runs finish ``ok`` but are flagged ``diverged``.
    * ``examples``: strategy (or ``"base"``) -> ``(nll_sum, n_tokens)`` per eval example, used for
      every seed of that arm instead of generated ones (known answers for the statistics).
    * ``train_times``: strategy -> mean training time in seconds (default: 5 s + 0.5 s per role).
    * ``run_fields``: run id -> RunResult fields to override (device, precision, versions, ...).

    ``worse_than_base`` is set as the study store sets it (eval loss above the base run's).
    """
    diverged = diverged or {}
    examples = examples or {}
    run_fields = run_fields or {}
    position = [0]
    study_dir = Path(study_dir)
    strategies = list(effects)
    config = StudyConfig(name=name, model=model, dataset="synthetic/data", strategies=strategies,
                         seeds=list(seeds), include_base=include_base, output=str(study_dir))
    ex_rng = np.random.default_rng(eval_seed)
    n_tok = ex_rng.integers(3, 40, size=n_examples)
    difficulty = ex_rng.normal(0.0, example_sd, size=n_examples)
    rng = np.random.default_rng(1000 + eval_seed)
    versions = {"python": "3.11", "torch": "2.x", "transformers": "5.x", "peft": "0.x", "loraplace": "0.1.0"}
    hidden, r = 64, 8
    results: list[RunResult] = []

    def write_run(run_id: str, kind: str, strategy: str, seed: int, true_loss: float) -> None:
        run_dir = study_dir / "runs" / run_id
        run_dir.mkdir(parents=True, exist_ok=True)
        common = dict(run_id=run_id, kind=kind, strategy=strategy, seed=seed, model=model, dataset="synthetic/data",
                      versions=versions, device="cpu (synthetic)", precision="fp32", memory_kind=memory_kind,
                      position=position[0] if order else None)
        position[0] += 1
        overrides = run_fields.get(run_id, {})
        common.update({k: v for k, v in overrides.items() if k in common})
        overrides = {k: v for k, v in overrides.items() if k not in common}
        if run_id in failed:
            res = RunResult(status="failed", error="RuntimeError: synthetic failure", **common, **overrides)
            (run_dir / "result.json").write_text(res.model_dump_json(indent=2))
            results.append(res)
            return
        shift = 0.0 if kind == "base" else rng.normal(0.0, seed_sd)
        per_tok = np.clip(true_loss + shift + difficulty + rng.normal(0.0, noise_sd, n_examples), 0.05, None)
        nll, toks = per_tok * n_tok, n_tok
        if strategy in examples:
            nll, toks = (np.asarray(v, dtype=float) for v in examples[strategy])
            toks = toks.astype(int)
        ex = {"nll_sum": nll.tolist(), "n_tokens": toks.tolist(), "batch": (np.arange(len(nll)) // 8).tolist()}
        if extra_fields:
            prompt = ex_rng.integers(5, 30, size=n_examples)
            ex["nll_sum_all_tokens"] = (nll + prompt * (true_loss + 1.0)).tolist()
            ex["n_tokens_all"] = (n_tok + prompt).tolist()
            ex["n_pad"] = (40 - n_tok).tolist()
            ex["nll_sum_pad"] = ((40 - n_tok) * 0.01).tolist()
        (run_dir / "eval_examples.json").write_text(json.dumps(ex))
        roles = _STRATEGY_ROLES.get(strategy, ROLES["attn"]) if kind == "lora" else []
        mods = [{"name": f"model.layers.{layer}.{role}", "role": role, "layer": layer, "in_features": hidden,
                 "out_features": hidden, "r": r, "alpha": 16.0} for layer in range(num_layers) for role in roles]
        (run_dir / "modules.json").write_text(json.dumps({"strategy": strategy, "num_layers": num_layers,
                                                          "modules": mods}))
        loss = float(nll.sum() / toks.sum())
        trainable = (params or {}).get(strategy, len(mods) * r * 2 * hidden) if kind == "lora" else 0
        log = []
        if kind == "lora":
            for step in range(1, 21):
                decay = float(np.exp(-step / 5))
                log.append({"loss": float(true_loss + 0.1 + decay + rng.normal(0, 0.02)), "step": step})
                if step % 5 == 0:
                    log.append({"eval_loss": float(true_loss + decay + rng.normal(0, 0.01)), "step": step})
        (run_dir / "train_log.json").write_text(json.dumps(log))
        mean_t = (train_times or {}).get(strategy, 5.0 + 0.5 * len(roles))
        t = float(mean_t + rng.normal(0, 0.2)) if kind == "lora" else None
        start, added = 400.0, 100.0 + trainable / 1000
        mem = (dict(memory_start_mib=start, peak_memory_increase_mib=added, peak_memory_mib=start + added) if memory
               else dict(peak_memory_mib=500.0 + trainable / 1000))
        if kind == "base":
            base_loss_seen[0] = loss
        worse = None if kind == "base" or base_loss_seen[0] is None else loss > base_loss_seen[0]
        flags = dict(diverged=True, diverged_reason=diverged[run_id]) if run_id in diverged else {}
        fields = dict(
            status="ok", r=r if kind == "lora" else None, trainable_params=trainable, total_params=1_000_000 + trainable,
            base_params=1_000_000, trainable_pct=100 * trainable / (1_000_000 + trainable), eval_loss=loss,
            perplexity=perplexity(float(nll.sum()), int(toks.sum())), eval_nll_sum=float(nll.sum()),
            eval_tokens=int(toks.sum()), eval_examples=len(nll), train_time_s=t, train_steps=20 if t else None,
            train_real_tokens=20_000 if t else None, train_tokens_per_s=(20_000 / t) if t else None,
            eval_time_s=0.5, modules=[m["name"] for m in mods], roles=list(dict.fromkeys(roles)),
            worse_than_base=worse, **mem, **flags, **common,
        )
        res = RunResult(**{**fields, **overrides})
        (run_dir / "result.json").write_text(res.model_dump_json(indent=2))
        results.append(res)

    base_loss_seen: list[float | None] = [None]
    specs = {(s.kind, s.strategy, s.seed): s for s in run_specs(config, study_dir)}
    if include_base:
        position[0] = 0
        write_run("base", "base", "base", seeds[0], base_loss + 0.5)
    for index, seed in enumerate(seeds):
        # data drawn in a fixed order (the same numbers whatever ``order``); positions as executed:
        # the study's own order ("rotate"), or every seed in the order of ``effects`` ("fixed")
        for j, strategy in enumerate(strategies):
            spec = specs[("lora", strategy, seed)]
            position[0] = spec.position if order == "rotate" else int(include_base) + index * len(strategies) + j
            write_run(spec.run_id, "lora", strategy, seed, base_loss + effects[strategy])
    study_dir.mkdir(parents=True, exist_ok=True)
    StudyStore(study_dir).save(config, results)
    return study_dir
