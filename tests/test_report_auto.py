"""The report's automatic-placement section on a synthetic study with hand-written importance,
allocation and adapter-norm files (the formats of the design: loraplace-importance/1,
loraplace-allocation/1, runs/<run_id>/adapter_norms.json). Every expected number is computed here
from the files written, not by the report's code."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import numpy as np
import pytest
from scipy import stats as sps
from synthetic import ROLES, make_study

from loraplace.errors import LoraplaceError
from loraplace.report import write_report
from loraplace.report.load import load_study

RESAMPLES = 1000
LAYERS = 4
HIDDEN = 64  # make_study's modules: in = out = 64
# make_study only knows built-in strategies: arms are written under one and relabelled afterwards
EFFECTS = {"full": -0.30, "attention": -0.25, "ffn": -0.22, "qv": -0.28, "mlp-down": -0.26, "attn-o": -0.12,
           "attn.k": -0.20}
RELABEL = {"qv": "auto~attention", "mlp-down": "eva~attention", "attn-o": "auto[mode=worst]~attention"}
# auto~attention trains 16,256 parameters; within 2%: attention (16,384), eva (16,500), worst (16,000);
# attn.k (16,600, +2.1%), ffn and full are not
PARAMS = {"qv": 16_256, "mlp-down": 16_500, "attn-o": 16_000, "attn.k": 16_600}
SAME_BUDGET = {"attention", "eva~attention", "auto[mode=worst]~attention"}
# the auto allocation: layers 0-1 alike, layer 2 uniform, layer 3 differs in attn.o
AUTO_RANKS = {0: {"attn.q": 12, "attn.k": 4, "attn.v": 12, "attn.o": 4},
              1: {"attn.q": 12, "attn.k": 4, "attn.v": 12, "attn.o": 4},
              2: {"attn.q": 8, "attn.k": 8, "attn.v": 8, "attn.o": 8},
              3: {"attn.q": 8, "attn.k": 8, "attn.v": 8, "attn.o": 7}}
SCORING = {"gradient": (4.1, 9_800), "weight": (0.3, 0)}
MAX_RANK = 16
TITLE = "## Where adapters matter: automatic placement"


def _name(layer: int, role: str) -> str:
    return f"model.layers.{layer}.{role}"


def _curves(score: str) -> dict[str, list[float]]:
    """Concave curves a * (1 - exp(-k / 4)), with a per slot drawn per score."""
    rng = np.random.default_rng(len(score))
    k = np.arange(1, MAX_RANK + 1)
    return {_name(layer, role): (rng.uniform(0.2, 1.0) * (1 - np.exp(-k / 4))).tolist()
            for layer in range(LAYERS) for role in ROLES["attn"] + ROLES["mlp"]}


def _relabel(study: Path) -> None:
    """Give the placeholder arms the labels of automatic, EVA and worst-mode arms."""
    data = json.loads((study / "results.json").read_text())
    for row in data["runs"]:
        row["strategy"] = RELABEL.get(row["strategy"], row["strategy"])
        (study / "runs" / row["run_id"] / "result.json").write_text(json.dumps(row))
    data["study"]["strategies"] = [RELABEL.get(s, s) for s in data["study"]["strategies"]]
    (study / "results.json").write_text(json.dumps(data))


def _write_importance(study: Path) -> None:
    (study / "importance").mkdir()
    for score, (seconds, tokens) in SCORING.items():
        curves = _curves(score)
        slots = [{"name": _name(layer, role), "role": role, "stack": None, "layer": layer, "in_features": HIDDEN,
                  "out_features": HIDDEN, "curve": curves[_name(layer, role)]}
                 for layer in range(LAYERS) for role in ROLES["attn"] + ROLES["mlp"]]
        (study / "importance" / f"{score}.json").write_text(json.dumps({
            "format": "loraplace-importance/1", "score": score, "model": "synthetic/model",
            "dataset": None if score == "weight" else "synthetic/data", "max_rank": MAX_RANK, "batches": 4,
            "batch_size": 2, "tokens": tokens, "seconds": seconds, "peak_memory_mib": 12.0, "memory_kind": "rss",
            "method": f"synthetic {score} curves", "approximation": "exact",
            "warnings": [f"{score}: 2 mixture-of-experts parameters left out"], "slots": slots}))


def _auto_modules() -> list[dict]:
    return [{"name": _name(layer, role), "role": role, "stack": None, "layer": layer, "r": r,
             "in_features": HIDDEN, "out_features": HIDDEN, "num_experts": None, "is_parameter": False,
             "alpha": 2.0 * r, "params": r * 2 * HIDDEN}
            for layer, ranks in AUTO_RANKS.items() for role, r in ranks.items()]


def _write_allocation(study: Path) -> None:
    mods = _auto_modules()
    achieved = sum(m["params"] for m in mods)
    curves = _curves("gradient")
    (study / "allocations").mkdir()
    (study / "allocations" / "auto_attention.json").write_text(json.dumps({
        "format": "loraplace-allocation/1", "arm": "auto~attention", "score": "gradient", "mode": "best",
        "draw": None, "step": 1, "max_r": 16, "importance_file": "importance/gradient.json",
        "budget": {"reference": "attention", "target": 16_384, "achieved": achieved,
                   "deviation_pct": 100 * (achieved - 16_384) / 16_384},
        "predicted_gain": sum(curves[m["name"]][m["r"] - 1] for m in mods),
        "ranks": {m["name"]: m["r"] for m in mods},
        "placement": {"strategy": "auto~attention", "family": "llama", "num_layers": LAYERS, "stacks": {"null": LAYERS},
                      "lora_params": achieved, "ranks": {}, "budget": None, "warnings": [], "modules": mods}}))


def _write_norms(study: Path, strategies: tuple[str, ...]) -> dict[str, dict[str, list[float]]]:
    """Random norms per module and seed for the runs of ``strategies``; returns strategy -> name -> norms."""
    rng = np.random.default_rng(7)
    out: dict[str, dict[str, list[float]]] = {}
    for row in json.loads((study / "results.json").read_text())["runs"]:
        if row["strategy"] not in strategies:
            continue
        mods = json.loads((study / "runs" / row["run_id"] / "modules.json").read_text())["modules"]
        recs = [{"name": m["name"], "role": m["role"], "stack": None, "layer": m["layer"], "r": m["r"],
                 "norm": float(rng.uniform(0.1, 2.0))} for m in mods]
        (study / "runs" / row["run_id"] / "adapter_norms.json").write_text(json.dumps({"modules": recs}))
        for m in recs:
            out.setdefault(row["strategy"], {}).setdefault(m["name"], []).append(m["norm"])
    return out


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """The study, its report before the auto files were added, and its report after."""
    root = tmp_path_factory.mktemp("auto")
    study = make_study(root / "study", EFFECTS, seeds=(0, 1, 2), params=PARAMS)
    _relabel(study)
    plain = write_report([study], out_dir=root / "plain", resamples=RESAMPLES)
    _write_importance(study)
    _write_allocation(study)
    norms = _write_norms(study, ("full", "attention"))
    report = write_report([study], out_dir=root / "auto", resamples=RESAMPLES)
    return {"study": study, "plain": plain.parent, "out": report.parent, "norms": norms}


def _csv(path: Path) -> list[dict]:
    with path.open() as f:
        return list(csv.DictReader(f))


def _ok_rows(study: Path) -> list[dict]:
    return [r for r in json.loads((study / "results.json").read_text())["runs"] if r["status"] == "ok"]


def test_section_appears_with_its_heatmaps_and_tables(built):
    out = built["out"]
    md = (out / "report.md").read_text()
    assert md.count(TITLE) == 1
    # after the main comparison and its figures, before the methodological details
    assert md.index("## Paired comparisons") < md.index("## Figures") < md.index(TITLE) < md.index(
        "## Perplexity methodology check")
    for fig in ("importance_gradient", "importance_weight", "adapter_norms_full"):
        assert (out / "figures" / f"{fig}.png").stat().st_size > 10_000, fig
        assert (out / "figures" / f"{fig}.svg").is_file()
        assert f"figures/{fig}.png" in md
    for table in ("importance-cost", "allocation-auto_attention", "allocation-roles-auto_attention",
                  "auto-vs-auto_attention", "adapter-norms", "adapter-norms-modules", "posthoc-spearman",
                  "score-validity", "score-validity-summary"):
        for ext in ("md", "csv", "tex"):
            assert (out / "tables" / f"{table}.{ext}").is_file(), f"{table}.{ext}"
    html = (out / "report.html").read_text()
    assert 'id="auto"' in html and html.count("<img src=\"data:image/png;base64,") == md.count("![")


def test_scoring_cost_is_a_share_of_the_mean_training_time(built):
    times = [r["train_time_s"] for r in _ok_rows(built["study"]) if r["kind"] == "lora"]
    mean_t = sum(times) / len(times)
    rows = {r["score"]: r for r in _csv(built["out"] / "tables" / "importance-cost.csv")}
    md = (built["out"] / "report.md").read_text()
    for score, (seconds, tokens) in SCORING.items():
        share = seconds / mean_t
        assert float(rows[score]["share_of_arm_training_time"]) == pytest.approx(share)
        pct = 100 * share
        shown = f"{pct:.0f}%" if pct >= 10 else f"{pct:.2g}%"
        data = f"{tokens:,} tokens" if tokens else "no data (weights only)"
        assert f"**{score} scoring**: {seconds:.1f} s, {data} = {shown} of one arm's training time" in md
        assert f"Note: {score}: 2 mixture-of-experts parameters left out." in md


def test_allocation_table_shows_the_written_ranks_merged_over_layers(built):
    rows = _csv(built["out"] / "tables" / "allocation-auto_attention.csv")
    got = {r["layers"]: {role: int(r[role]) for role in ROLES["attn"]} for r in rows}
    assert got == {"0-1": AUTO_RANKS[0], "2": AUTO_RANKS[2], "3": AUTO_RANKS[3]}
    roles = {r["role"]: r for r in _csv(built["out"] / "tables" / "allocation-roles-auto_attention.csv")}
    for role in ROLES["attn"]:
        assert int(roles[role]["rank_sum"]) == sum(AUTO_RANKS[layer][role] for layer in AUTO_RANKS)
        assert int(roles[role]["params"]) == 2 * HIDDEN * sum(AUTO_RANKS[layer][role] for layer in AUTO_RANKS)
    assert int(roles["total"]["params"]) == 16_256
    md = (built["out"] / "report.md").read_text()
    assert "achieved 16,256 (-0.78% deviation)" in md


def test_auto_against_exactly_the_arms_of_its_budget_with_the_reports_holm_p(built):
    rows = _csv(built["out"] / "tables" / "auto-vs-auto_attention.csv")
    assert {r["other"] for r in rows} == SAME_BUDGET
    # the very comparisons of the pairwise table (the Holm family), read with auto first
    pairwise = {(r["strategy"], r["reference"]): r for r in _csv(built["out"] / "tables" / "pairwise.csv")}
    for r in rows:
        forward = pairwise.get(("auto~attention", r["other"]))
        sign = 1.0 if forward else -1.0
        ref = forward or pairwise[(r["other"], "auto~attention")]
        assert float(r["diff"]) == pytest.approx(sign * float(ref["diff"]))
        assert float(r["p_holm"]) == pytest.approx(float(ref["p_holm"]))
        significant = float(ref["p_holm"]) < 0.05
        expected = "no significant difference" if not significant else (
            "auto better" if float(r["diff"]) < 0 else "auto worse")
        assert r["verdict"] == expected
    md = (built["out"] / "report.md").read_text()
    sentence = next(line for line in md.splitlines() if line.startswith("**`auto~attention`**:"))
    verdict = {r["other"]: r["verdict"] for r in rows}
    heads = {"auto better": "it beats", "auto worse": "it is worse than",
             "no significant difference": "it is not significantly"}
    hand_clause = sentence.split("the best hand-picked arm at this budget, `attention`")[0]
    assert f"{heads[verdict['attention']]} " in hand_clause
    assert f"{heads[verdict['eva~attention']]} " in sentence.split("EVA, `eva~attention`")[0].split(";")[-1]
    assert "AdaLoRA" not in sentence  # the study has no AdaLoRA arm


def _measured_and_predicted(study: Path, score: str) -> tuple[dict[str, float], dict[str, float], dict[str, str]]:
    """Per LoRA arm: base minus mean eval loss, the sum of the score's curve at each module's rank
    (the auto arm: its allocation; the others: their modules.json), and its role group ("mixed"
    when its modules span attention and FFN)."""
    rows = _ok_rows(study)
    base = next(r["eval_loss"] for r in rows if r["kind"] == "base")
    curves = _curves(score)
    measured, predicted, group = {}, {}, {}
    for strategy in {r["strategy"] for r in rows if r["kind"] == "lora"}:
        runs = [r for r in rows if r["strategy"] == strategy]
        measured[strategy] = base - float(np.mean([r["eval_loss"] for r in runs]))
        if strategy == "auto~attention":
            mods = _auto_modules()
        else:
            mods = json.loads((study / "runs" / runs[0]["run_id"] / "modules.json").read_text())["modules"]
        predicted[strategy] = sum(curves[m["name"]][min(m["r"], MAX_RANK) - 1] for m in mods)
        prefixes = {m["role"].split(".")[0] for m in mods}
        group[strategy] = {"attn": "attention", "mlp": "ffn"}[prefixes.pop()] if len(prefixes) == 1 else "mixed"
    return measured, predicted, group


def test_score_validity_is_spearman_of_predicted_and_measured_gain(built):
    per_arm = {r["arm"]: r for r in _csv(built["out"] / "tables" / "score-validity.csv")}
    summary = {(r["score"], r["scope"]): r for r in _csv(built["out"] / "tables" / "score-validity-summary.csv")}
    for score in SCORING:
        measured, predicted, group = _measured_and_predicted(built["study"], score)
        assert set(per_arm) == set(measured)
        for arm in measured:
            assert float(per_arm[arm]["measured_gain"]) == pytest.approx(measured[arm])
            assert float(per_arm[arm][f"predicted_{score}"]) == pytest.approx(predicted[arm])
        arms = sorted(measured)
        rho, p = sps.spearmanr([predicted[a] for a in arms], [measured[a] for a in arms])
        row = summary[(score, "all arms")]
        assert int(row["n"]) == len(arms) and float(row["rho"]) == pytest.approx(rho)
        assert float(row["p"]) == pytest.approx(p)
        # every arm but full adapts one role group; ffn and eva~attention (written as mlp-down) the FFN
        single = [a for a in arms if group[a] != "mixed"]
        assert {group[a] for a in single} == {"attention", "ffn"} and len(single) == 6
        rho_single = sps.spearmanr([predicted[a] for a in single], [measured[a] for a in single]).statistic
        assert float(summary[(score, "single-group arms")]["rho"]) == pytest.approx(rho_single)
        pairs = [(a, b) for a in single for b in single if a < b and group[a] != group[b]]
        agree = sum((predicted[a] - predicted[b]) * (measured[a] - measured[b]) > 0 for a, b in pairs)
        assert summary[(score, "single-group arms")]["cross_group_agree"] == str(agree)
        assert summary[(score, "single-group arms")]["cross_group_pairs"] == str(len(pairs)) == "8"
    md = (built["out"] / "report.md").read_text()
    assert re.search(r"The gradient score (ranks the arms as training did|agrees with training only weakly, not "
                     r"significantly|does not rank the arms as training did) \(rho = [+-]\d\.\d\d, p = [\d.e<-]+, "
                     r"n = 7\)", md)


def test_posthoc_norms_are_seed_means_and_correlate_with_each_score(built):
    norms = built["norms"]
    rows = [r for r in _csv(built["out"] / "tables" / "adapter-norms-modules.csv")]
    assert {r["arm"] for r in rows} == {"full", "attention"}
    for r in rows:
        assert float(r["norm_mean"]) == pytest.approx(np.mean(norms[r["arm"]][r["name"]]))
        assert r["seeds"] == "3"
    spear = {(r["score"], r["arm"]): r for r in _csv(built["out"] / "tables" / "posthoc-spearman.csv")}
    assert {arm for _, arm in spear} == {"full"}  # only the arm that trained every slot
    for score in SCORING:
        curves = _curves(score)
        names = sorted(norms["full"])
        # gain per parameter at the study's rank (lora.r = 16, make_study's config default)
        gpp = [curves[n][15] / (16 * 2 * HIDDEN) for n in names]
        rho, p = sps.spearmanr(gpp, [np.mean(norms["full"][n]) for n in names])
        assert int(spear[(score, "full")]["modules"]) == len(names) == LAYERS * 7
        assert float(spear[(score, "full")]["rho"]) == pytest.approx(rho)
        assert float(spear[(score, "full")]["p"]) == pytest.approx(p)


def test_a_study_without_the_files_gets_no_section_and_nothing_else_changes(built):
    plain = (built["plain"] / "report.md").read_text()
    assert "automatic placement" not in plain
    assert not any("importance" in p.name or "allocation" in p.name for p in (built["plain"] / "tables").iterdir())
    auto = (built["out"] / "report.md").read_text()
    start, end = auto.index(TITLE), auto.index("## Perplexity methodology check")
    without = auto[:start] + auto[end:]
    # the one other addition: the methods bullet of the section
    assert without.count("\n- Automatic placement: ") == 1
    without = re.sub(r"\n- Automatic placement: [^\n]*", "", without)

    def drop_time(text: str) -> str:
        return re.sub(r"Generated \d{4}-\d\d-\d\d \d\d:\d\d", "Generated", text)

    assert drop_time(without) == drop_time(plain)
    added = ("importance_", "adapter_norms_")
    assert sorted(p.name for p in (built["plain"] / "figures").iterdir()) == sorted(
        p.name for p in (built["out"] / "figures").iterdir() if not p.name.startswith(added))


def test_malformed_files_are_named_with_what_to_do(tmp_path):
    study = make_study(tmp_path / "s", {"full": -0.3}, seeds=(0,))
    (study / "importance").mkdir()
    (study / "importance" / "gradient.json").write_text(json.dumps({"format": "something-else/2"}))
    with pytest.raises(LoraplaceError, match=r"gradient\.json has format 'something-else/2', expected "
                                             r"'loraplace-importance/1'.*move it out"):
        load_study(study)
    (study / "importance" / "gradient.json").unlink()
    (study / "allocations").mkdir()
    (study / "allocations" / "a.json").write_text(json.dumps({"format": "loraplace-allocation/1", "arm": "auto"}))
    with pytest.raises(LoraplaceError, match="a.json lacks placement"):
        load_study(study)


def test_merged_studies_get_the_section_only_for_the_study_with_the_files(tmp_path):
    effects = {"full": -0.3, "attention": -0.25, "qv": -0.28}
    with_files = make_study(tmp_path / "a", effects, seeds=(0, 1), params={"qv": 16_256}, name="with")
    _relabel(with_files)
    _write_importance(with_files)
    _write_allocation(with_files)
    plain = make_study(tmp_path / "b", {"full": -0.3, "attention": -0.25}, seeds=(0, 1), name="plain")
    out = write_report([with_files, plain], out_dir=tmp_path / "r", resamples=200).parent
    md = (out / "report.md").read_text()
    section = md[md.index(TITLE):md.index("## Perplexity methodology check")]
    assert "### Study: with" in section and "Study: plain" not in section
    rows = _csv(out / "tables" / "with-auto-vs-auto_attention.csv")
    assert [r["other"] for r in rows] == ["with/attention"]  # only its own study's arms
    assert (out / "figures" / "with-importance_gradient.png").is_file()


def test_two_studies_with_files_show_every_study_before_training_then_after(tmp_path):
    """The section is two: before training (scores, allocations) and after (auto against its budget,
    post-hoc norms, score validity); with two studies that hold the files, each is headed in both."""
    effects = {"full": -0.3, "attention": -0.25, "qv": -0.28}
    studies = []
    for name in ("one", "two"):
        s = make_study(tmp_path / name, effects, seeds=(0, 1), params={"qv": 16_256}, name=name)
        _relabel(s)
        _write_importance(s)
        _write_allocation(s)
        studies.append(s)
    md = (write_report(studies, out_dir=tmp_path / "r", resamples=200).parent / "report.md").read_text()
    section = md[md.index(TITLE):md.index("## Perplexity methodology check")]
    heads = re.findall(r"^#{3,4} (.*)$", section, flags=re.M)
    assert heads == ["Study: one", "Importance before training", "The chosen allocations",
                     "Study: two", "Importance before training", "The chosen allocations",
                     "Study: one", "Automatic placement against the rest at the same budget",
                     "Do the scores predict what training gave?",
                     "Study: two", "Automatic placement against the rest at the same budget",
                     "Do the scores predict what training gave?"]
