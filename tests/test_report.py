"""`loraplace report` on synthetic study folders (the exact on-disk layout, no training)."""

from __future__ import annotations

import csv
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
from scipy import stats as sps
from synthetic import make_study
from typer.testing import CliRunner

from loraplace.cli import app
from loraplace.errors import LoraplaceError
from loraplace.placement.arms import parse_param_count
from loraplace.report import write_report
from loraplace.report.analysis import build_arms, build_groups
from loraplace.report.load import load_studies
from loraplace.report.stats import holm, paired_bootstrap, t_interval

FIGURES = ["pareto_params", "pareto_time", "eval_loss", "loss_curves", "time_throughput", "placement"]
RESAMPLES = 2000
EFFECTS = {"full": -0.30, "attention": -0.25, "ffn": -0.25, "qv": -0.10}


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> Path:
    return make_study(tmp_path_factory.mktemp("s") / "study", EFFECTS, seeds=(0, 1, 2), seed_sd=0.03)


@pytest.fixture(scope="module")
def report(study) -> Path:
    return write_report([study], budget=20_000, resamples=RESAMPLES)


def _csv(path: Path) -> list[dict]:
    with path.open() as f:
        return list(csv.DictReader(f))


def _runs(study: Path) -> list[dict]:
    return json.loads((study / "results.json").read_text())["runs"]


def test_report_writes_every_artifact(study, report):
    out = report.parent
    assert report == study / "report" / "report.html"
    assert (out / "report.md").is_file() and (out / "recommendations.json").is_file()
    for name in FIGURES:
        png = out / "figures" / f"{name}.png"
        assert png.stat().st_size > 10_000 and (out / "figures" / f"{name}.svg").is_file()
        from PIL import Image

        with Image.open(png) as im:
            assert im.info["dpi"] == pytest.approx((300, 300), abs=0.5)
            assert im.width >= 1500  # 300 dpi at several inches
    for table in ("summary", "comparison", "runs", "setup", "perplexity-synthetic"):
        for ext in ("md", "csv", "tex"):
            assert (out / "tables" / f"{table}.{ext}").is_file(), f"{table}.{ext}"


def test_summary_shows_mean_sd_and_t_ci_of_the_stored_runs(study, report):
    runs = [r for r in _runs(study) if r["status"] == "ok"]
    rows = {r["strategy"]: r for r in _csv(report.parent / "tables" / "summary.csv")}
    md = (report.parent / "report.md").read_text()
    for strategy in EFFECTS:
        iv = t_interval([r["eval_loss"] for r in runs if r["strategy"] == strategy])
        row = rows[strategy]
        assert float(row["eval_loss_mean"]) == pytest.approx(iv.mean)
        assert float(row["eval_loss_sd"]) == pytest.approx(iv.sd)
        assert (float(row["eval_loss_ci_low"]), float(row["eval_loss_ci_high"])) == pytest.approx((iv.low, iv.high))
        assert f"[{iv.low:.4f}, {iv.high:.4f}]" in md
        ppl = t_interval([r["perplexity"] for r in runs if r["strategy"] == strategy])
        assert float(row["perplexity_mean"]) == pytest.approx(ppl.mean)
    assert rows["base"]["eval_loss_ci_low"] == ""  # one run: undefined, not invented


def test_recommendations_follow_from_the_numbers(study, report):
    studies = load_studies([study])
    arms = build_arms(studies)
    (g,) = build_groups(studies, arms, resamples=RESAMPLES)
    recs = json.loads((report.parent / "recommendations.json").read_text())["synthetic"]
    by_kind = {r["kind"]: r for r in recs}

    lora = {a.key: a for a in g.lora_arms}
    best = min(lora.values(), key=lambda a: a.loss.mean)
    assert by_kind["best"]["numbers"]["strategy"] == best.key == "full"
    assert by_kind["best"]["numbers"]["eval_loss"] == pytest.approx(best.loss.mean)
    # "cannot separate" exactly for the arms whose paired test against the best is not significant after
    # Holm's adjustment over every pair of arms in the group (base included)
    arms_ok = [a for a in g.arms if a.n]
    pairs = [(a, b) for i, a in enumerate(arms_ok) for b in arms_ok[i + 1:]]
    adjusted = dict(zip([(a.key, b.key) for a, b in pairs], holm([g.compare(a, b).p_value for a, b in pairs])))
    p_vs_best = {k: adjusted.get((k, best.key), adjusted.get((best.key, k))) for k in lora if k != best.key}
    ties = sorted(k for k, p in p_vs_best.items() if p >= 0.05)
    assert sorted(by_kind["best"]["numbers"]["indistinguishable"]) == ties
    assert f"{best.loss.mean:.4f}" in by_kind["best"]["text"] and "95% CI" in by_kind["best"]["text"]

    within = [a for a in lora.values() if a.trainable_params <= 20_000]
    pick = min(within, key=lambda a: a.loss.mean)
    assert by_kind["budget"]["numbers"]["strategy"] == pick.key
    c = g.compare(pick, best)
    assert f"{c.diff:+.3g}" in by_kind["budget"]["text"]

    # attention and ffn have the same true effect: a tie the data cannot separate
    c = g.compare(lora["attention"], lora["ffn"])
    assert c.low < 0 < c.high
    text = by_kind["budget"]["text"]
    assert "not separable" in text and "ffn" in text and "attention" in text
    # qv is the cheapest and clearly worse; every strategy beats the base model here
    assert "Every strategy improves significantly on the base model" in by_kind["base"]["text"]
    assert by_kind["knee"]["numbers"]["front"][0] == "qv"


def test_comparison_table_marks_non_significant_differences(report):
    rows = {r["strategy"]: r for r in _csv(report.parent / "tables" / "comparison.csv")}
    assert set(rows) == {"base", "attention", "ffn", "qv"}
    assert all(r["reference"] == "full" for r in rows.values())
    assert rows["qv"]["significant"] == "True" and float(rows["qv"]["diff"]) > 0
    md = (report.parent / "tables" / "comparison.md").read_text()
    assert "Holm" in md and "verdict" in md


def test_latex_tables_are_booktabs_and_escaped(report):
    tex = (report.parent / "tables" / "summary.tex").read_text()
    for cmd in ("\\toprule", "\\midrule", "\\bottomrule", "\\begin{tabular}{lrrrrrlrlrrrr}", "\\label{tab:summary}"):
        assert cmd in tex
    assert not re.search(r"(?<!\\)% of full", tex) and "\\% of full" in tex
    assert "$\\pm$" in tex and "±" not in tex


def test_html_is_self_contained(report):
    html = report.read_text()
    assert html.count('<img src="data:image/png;base64,') == len(FIGURES)
    refs = re.findall(r'(?:src|href)\s*=\s*"([^"]*)"', html)
    assert refs and all(r.startswith(("data:", "#")) for r in refs), [r for r in refs if not r.startswith("data:")]
    assert "http://" not in html and "https://" not in html
    assert "<script" not in html
    for heading in ("Recommendations", "Results per strategy", "Paired comparisons", "Figures",
                    "Perplexity methodology check", "Setup"):
        assert heading in html


def test_perplexity_section_names_the_mismatch_and_missing_fields(report):
    md = (report.parent / "report.md").read_text()
    section = md.split("## Perplexity methodology check")[1].split("## Setup")[0]
    assert "exp(token-weighted mean NLL)" in section
    assert "mean of per-example perplexities" in section and "mean of per-batch exp(loss)" in section
    assert "is explained by" in section
    assert "not recorded" in section and "nll_sum_all_tokens" in section and "n_pad" in section


def test_setup_lists_model_data_hyperparameters_versions_hardware(report):
    md = (report.parent / "tables" / "setup.md").read_text()
    for key in ("synthetic/model", "synthetic/data", "LoRA r", "learning rate", "transformers version", "device"):
        assert key in md


def test_one_seed_shows_undefined_ci_and_still_tests_pairs(tmp_path):
    study = make_study(tmp_path / "one", {"full": -0.3, "attention": -0.1}, seeds=(0,))
    html = write_report([study], resamples=RESAMPLES)
    md = (html.parent / "report.md").read_text()
    assert "undefined (n=1)" in md and "no seed-level confidence interval" in md
    rows = {r["strategy"]: r for r in _csv(html.parent / "tables" / "comparison.csv")}
    assert float(rows["attention"]["p_value"]) < 0.05  # paired over examples even with one seed
    assert "No parameter budget was given" in md
    assert "One seed per strategy: no error bars" in md


def test_perplexity_uses_recorded_prompt_and_padding_fields(tmp_path):
    study = make_study(tmp_path / "x", {"full": -0.3, "attention": -0.2}, seeds=(0,), extra_fields=True,
                       include_base=False)
    html = write_report([study], resamples=200)
    table = (html.parent / "tables" / "perplexity-synthetic.md").read_text()
    assert "not recorded" not in table
    assert "loss including prompt tokens" in table and "pads counted in the token count" in table


def test_failed_runs_are_listed_not_counted(tmp_path):
    study = make_study(tmp_path / "f", {"full": -0.3, "attention": -0.2}, seeds=(0, 1), failed=["attention-s1"])
    html = write_report([study], resamples=200)
    rows = {r["strategy"]: r for r in _csv(html.parent / "tables" / "summary.csv")}
    assert rows["attention"]["n_ok"] == "1" and rows["attention"]["n_failed"] == "1"
    assert "failed: RuntimeError: synthetic failure" in (html.parent / "tables" / "runs.md").read_text()


def test_cli_merges_studies_with_a_shared_eval_set(tmp_path):
    a = make_study(tmp_path / "a", {"full": -0.3, "attention": -0.2}, seeds=(0, 1), name="matched")
    b = make_study(tmp_path / "b", {"full": -0.3, "ffn": -0.25}, seeds=(0, 1), name="unmatched", include_base=False)
    out = tmp_path / "merged"
    res = CliRunner().invoke(app, ["report", str(a), str(b), "--budget", "15k", "--output", str(out)])
    assert res.exit_code == 0, res.output
    rows = {r["strategy"] for r in _csv(out / "tables" / "comparison.csv")}
    assert rows == {"matched/base", "matched/attention", "unmatched/full", "unmatched/ffn"}  # one group
    md = (out / "report.md").read_text()
    assert "matched/full" in md and "unmatched/ffn" in md and "Best within 15,000" in md
    assert "do not share an eval set" not in md


def test_studies_with_different_eval_sets_are_compared_within_groups(tmp_path):
    a = make_study(tmp_path / "a", {"full": -0.3, "attention": -0.2}, seeds=(0,), name="m1", eval_seed=1)
    b = make_study(tmp_path / "b", {"full": -0.3, "attention": -0.2}, seeds=(0,), name="m2", eval_seed=2)
    html = write_report([a, b], resamples=200)
    assert html.parent == tmp_path / "report-a-vs-b"
    md = (html.parent / "report.md").read_text()
    assert "do not share an eval set" in md and "### Group: m1" in md and "### Group: m2" in md
    assert (html.parent / "tables" / "comparison-m1.csv").is_file()


def test_errors_say_what_to_do(tmp_path):
    with pytest.raises(LoraplaceError, match="does not exist"):
        write_report([tmp_path / "nope"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(LoraplaceError, match="holds no results.json"):
        write_report([tmp_path / "empty"])
    res = CliRunner().invoke(app, ["report", str(tmp_path / "empty")])
    assert res.exit_code == 2 and "holds no results.json" in res.output
    res = CliRunner().invoke(app, ["report", str(tmp_path / "empty"), "--budget", "lots"])
    assert res.exit_code == 2 and "--budget" in res.output


def test_report_and_the_command_line_do_not_import_torch():
    import subprocess
    import sys

    code = ("import sys, loraplace.cli, loraplace.report.write, loraplace.study.specs, loraplace.study.store; "
            "print(sorted(m for m in ('torch', 'peft', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.parametrize("text,value", [("500000", 500_000), ("500k", 500_000), ("2M", 2_000_000), ("1e6", 1_000_000),
                                        ("12,000", 12_000), ("6.3M", 6_300_000)])
def test_parse_budget(text, value):
    assert parse_param_count(text) == value


# ------------------------------------------------------------------ one significance rule (Holm)
def _constructed_examples(n: int = 200, z: float = 2.2, sd: float = 0.5) -> tuple[dict, dict]:
    """Per-example losses (one token each) with known paired differences: attention - full has
    mean d and sd ``sd`` (z = d / (sd / sqrt(n)) = 2.2: two-sided p ~ 0.028, significant alone but
    not after Holm over three pairs); ffn - full has mean d/2 (z = 1.1), attention - ffn mean d/2
    with sd sqrt(2)*sd (z ~ 0.78)."""
    i = np.arange(n)
    base = 2.0 + 0.3 * np.sin(i)
    eps = np.where(i % 2 == 0, 1.0, -1.0)  # +-+-: mean 0, sd 1 exactly
    eta = np.where((i // 2) % 2 == 0, 1.0, -1.0)  # ++--: orthogonal to eps
    d = z * sd / math.sqrt(n)
    losses = {"full": base, "attention": base + d + sd * eps, "ffn": base + d / 2 + sd * eta}
    ones = [1] * n
    z_of = {("attention", "full"): z, ("ffn", "full"): z / 2, ("attention", "ffn"): z / 2 / math.sqrt(2)}
    return {k: (v.tolist(), ones) for k, v in losses.items()}, {k: 2 * (1 - sps.norm.cdf(v)) for k, v in z_of.items()}


def test_recommendations_and_tables_read_the_same_holm_adjusted_p(tmp_path):
    examples, p_normal = _constructed_examples()
    study = make_study(tmp_path / "holm", {"full": 0.0, "attention": 0.0, "ffn": 0.0}, seeds=(0,),
                       include_base=False, examples=examples)
    out = write_report([study], resamples=10_000).parent
    # raw p of each pair, straight from the constructed arrays (the report's bootstrap seed and draws)
    raw = {}
    for a, b in p_normal:
        (na, ta), (nb, tb) = examples[a], examples[b]
        raw[(a, b)] = paired_bootstrap(na, ta, nb, tb, resamples=10_000).p_value
        assert raw[(a, b)] == pytest.approx(p_normal[(a, b)], abs=0.025), (a, b)  # ~ the normal p
    # significant alone, not after Holm over the three pairs
    p_att = raw[("attention", "full")]
    assert p_att < 0.05 and min(1.0, 3 * p_att) >= 0.05
    # the comparison table says "cannot separate" ...
    comp = {r["strategy"]: r for r in _csv(out / "tables" / "comparison.csv")}
    assert float(comp["attention"]["p_value"]) == pytest.approx(p_att)
    assert comp["attention"]["significant"] == "False"
    assert "n.s. (cannot separate)" in (out / "tables" / "comparison.md").read_text()
    # ... and so does the recommendation: attention cannot be separated from full
    recs = {r["kind"]: r for r in json.loads((out / "recommendations.json").read_text())["synthetic"]}
    assert recs["best"]["numbers"]["strategy"] == "full"
    assert sorted(recs["best"]["numbers"]["indistinguishable"]) == ["attention", "ffn"]
    assert "Significantly worse than it" not in recs["best"]["text"]
    assert "Holm p" in recs["best"]["text"]
    # both show the Holm p of the one family: every pair of the three arms
    assert float(comp["attention"]["p_holm"]) == pytest.approx(3 * p_att)
    pairs = {(r["strategy"], r["reference"]): r for r in _csv(out / "tables" / "pairwise.csv")}
    pairs = {k if k in raw else k[::-1]: r for k, r in pairs.items()}
    assert set(pairs) == set(raw)
    for k, p in zip(raw, holm(list(raw.values()))):
        assert float(pairs[k]["p_value"]) == pytest.approx(raw[k])
        assert float(pairs[k]["p_holm"]) == pytest.approx(p)
    md = (out / "report.md").read_text()
    assert md.count("Holm-adjusted as one family") == 2  # stated under the recommendations and in the methods


# -------------------------------------------------------------------------------------- memory
def test_memory_is_the_runs_own_increase_and_says_what_it_measures(tmp_path):
    study = make_study(tmp_path / "m", {"full": -0.3, "attention": -0.2}, seeds=(0, 1), include_base=False)
    out = write_report([study], resamples=200).parent
    rows = {r["strategy"]: r for r in _csv(out / "tables" / "summary.csv")}
    for strategy, roles in (("full", 7), ("attention", 4)):  # synthetic: start 400, added 100 + params/1000
        params = 4 * roles * 8 * 2 * 64
        assert float(rows[strategy]["memory_added_mib_mean"]) == pytest.approx(100 + params / 1000)
        assert float(rows[strategy]["memory_start_mib_mean"]) == pytest.approx(400)
        assert float(rows[strategy]["peak_memory_mib_mean"]) == pytest.approx(500 + params / 1000)
    table = (out / "tables" / "summary.md").read_text()
    assert "added MiB (RSS)" in table and "increase over the loaded model" in table and "process RSS" in table
    assert "†" not in table
    methods = (out / "report.md").read_text().split("## Methods")[1]
    assert "increase over the loaded model" in methods

    cuda = make_study(tmp_path / "c", {"full": -0.3, "attention": -0.2}, seeds=(0,), include_base=False,
                      memory_kind="cuda_max_allocated")
    table = (write_report([cuda], resamples=200).parent / "tables" / "summary.md").read_text()
    assert "added MiB (CUDA alloc.)" in table and "CUDA max allocated" in table


def test_old_folders_fall_back_to_the_process_peak_labelled_as_such(tmp_path):
    study = make_study(tmp_path / "old", {"full": -0.3, "attention": -0.2}, seeds=(0,), include_base=False,
                       memory=False, order=None)
    out = write_report([study], resamples=200).parent
    rows = {r["strategy"]: r for r in _csv(out / "tables" / "summary.csv")}
    assert rows["full"]["memory_added_mib_mean"] == "" and rows["full"]["peak_is_process_peak"] == "True"
    assert float(rows["full"]["peak_memory_mib_mean"]) == pytest.approx(500 + 4 * 7 * 8 * 2 * 64 / 1000)
    table = (out / "tables" / "summary.md").read_text()
    assert "†" in table and "process peak" in table and "earlier runs" in table
    assert "\\dag{}" in (out / "tables" / "summary.tex").read_text()


# ---------------------------------------------------------------------------------- run order
TIME_EFFECTS = {"full": -0.30, "attention": -0.10, "ffn": -0.25}  # ffn: better and faster than attention
TIMES = {"full": 12.0, "attention": 10.0, "ffn": 6.0}


def _time_rec(study: Path) -> tuple[dict, str]:
    out = write_report([study], resamples=300).parent
    recs = {r["kind"]: r for r in json.loads((out / "recommendations.json").read_text())["synthetic"]}
    return recs["dominated_time"], (out / "report.md").read_text()


@pytest.mark.parametrize("seeds", [(0,), (0, 1, 2)])
def test_time_dominance_is_withheld_when_the_arms_always_ran_in_one_order(tmp_path, seeds):
    study = make_study(tmp_path / "fixed", TIME_EFFECTS, seeds=seeds, order="fixed", train_times=TIMES)
    runs = {r["run_id"]: r for r in _runs(study)}
    assert all(runs[f"attention-s{s}"]["position"] < runs[f"ffn-s{s}"]["position"] for s in seeds)
    rec, md = _time_rec(study)
    assert rec["numbers"]["untested_for_order"] == ["attention"]
    assert "attention" not in rec["numbers"]["dominated"]
    assert "untested for order" in rec["text"] and "no time-dominance verdict" in rec["text"]
    assert "Run order: every seed ran the arms in the same relative order" in md  # table and figure notes


def test_time_dominance_stands_when_the_order_rotates_across_seeds(tmp_path):
    study = make_study(tmp_path / "rot", TIME_EFFECTS, seeds=(0, 1, 2), order="rotate", train_times=TIMES)
    runs = {r["run_id"]: r for r in _runs(study)}
    firsts = {runs[f"attention-s{s}"]["position"] < runs[f"ffn-s{s}"]["position"] for s in (0, 1, 2)}
    assert firsts == {True, False}
    rec, md = _time_rec(study)
    assert rec["numbers"]["dominated"] == {"attention": ["ffn"]} and rec["numbers"]["untested_for_order"] == []
    assert "Welch p" in rec["text"] and "arm order varied across seeds" in rec["text"]
    assert "the arm order varied across seeds" in md


def test_time_dominance_says_when_the_order_is_unknown(tmp_path):
    study = make_study(tmp_path / "old", TIME_EFFECTS, seeds=(0, 1, 2), order=None, train_times=TIMES)
    assert all(r["position"] is None for r in _runs(study))
    rec, md = _time_rec(study)
    assert "run order was not recorded" in rec["text"]
    assert "Run order: not recorded" in md


def test_synthetic_positions_follow_the_study_stores_execution_order(tmp_path):
    from loraplace.config import StudyConfig
    from loraplace.study.specs import run_specs

    study = make_study(tmp_path / "s", {"full": -0.3, "attention": -0.2, "ffn": -0.1}, seeds=(0, 1, 2))
    config = StudyConfig.model_validate(json.loads((study / "results.json").read_text())["study"])
    expected = {s.run_id: s.position for s in run_specs(config, study)}
    assert {r["run_id"]: r["position"] for r in _runs(study)} == expected


# ------------------------------------------------------------------- diverged, worse than base
def test_diverged_runs_are_listed_and_kept_out_worse_than_base_runs_flagged(tmp_path):
    reason = "eval loss 10.80 within 2% of ln(vocab) = 10.83"
    study = make_study(tmp_path / "d", {"full": -0.3, "ffn": -0.25, "qv": 0.7}, seeds=(0, 1, 2),
                       diverged={"ffn-s1": reason}, run_fields={"ffn-s1": {"eval_loss": 10.8}})
    runs = {r["run_id"]: r for r in _runs(study)}
    out = write_report([study], resamples=300).parent
    rows = {r["strategy"]: r for r in _csv(out / "tables" / "summary.csv")}
    # diverged: out of the statistics (mean of the two other ffn runs), listed with its reason
    assert rows["ffn"]["n_ok"] == "2" and rows["ffn"]["n_diverged"] == "1"
    assert float(rows["ffn"]["eval_loss_mean"]) == pytest.approx((runs["ffn-s0"]["eval_loss"] + runs["ffn-s2"]["eval_loss"]) / 2)
    comp = {r["strategy"]: r for r in _csv(out / "tables" / "comparison.csv")}
    assert comp["ffn"]["seeds"] == "0 2"
    runs_md = (out / "tables" / "runs.md").read_text()
    assert f"**diverged** (excluded): {reason}" in runs_md
    md = (out / "report.md").read_text()
    assert "Diverged runs (1)" in md and f"`ffn-s1` ({reason})" in md
    recs = json.loads((out / "recommendations.json").read_text())["synthetic"]
    assert all("10.8" not in r["text"] for r in recs)
    # worse than base: qv's true loss is 0.2 above the base model's; flagged, kept in the statistics
    base_loss = runs["base"]["eval_loss"]
    worse = sorted(k for k, r in runs.items() if r["kind"] == "lora" and k != "ffn-s1" and r["eval_loss"] > base_loss)
    assert worse == ["qv-s0", "qv-s1", "qv-s2"]
    assert rows["qv"]["n_ok"] == "3" and rows["qv"]["n_worse_than_base"] == "3" and "qv" in comp
    flagged = sorted(line.split("|")[1].strip() for line in runs_md.splitlines() if line.startswith("| ") and "**worse than base**" in line)
    assert flagged == worse
    assert "worse than the base model (3)" in md and "`qv-s0`, `qv-s1`, `qv-s2`" in md


def test_worse_than_base_is_derived_for_folders_stored_without_the_flag(tmp_path):
    study = make_study(tmp_path / "w", {"full": -0.3, "qv": 0.7}, seeds=(0,))
    data = json.loads((study / "results.json").read_text())
    for r in data["runs"]:
        r.pop("worse_than_base", None)
    (study / "results.json").write_text(json.dumps(data))
    runs_md = (write_report([study], resamples=200).parent / "tables" / "runs.md").read_text()
    assert [line.split("|")[1].strip() for line in runs_md.splitlines()
            if line.startswith("| ") and "worse than base" in line] == ["qv-s0"]


# ---------------------------------------------------------------------------- mixed environments
def test_mixed_environments_are_named_prominently(tmp_path):
    versions = {"python": "3.11", "torch": "2.y", "transformers": "5.x", "peft": "0.x", "loraplace": "0.1.0"}
    study = make_study(tmp_path / "mix", {"full": -0.3, "attention": -0.2}, seeds=(0, 1),
                       run_fields={"full-s1": {"precision": "bf16"}, "attention-s0": {"versions": versions}})
    md = (write_report([study], resamples=200).parent / "report.md").read_text()
    top = md.split("## Recommendations")[0]
    assert "Warning: mixed environments" in top
    assert "**precision**: `fp32` for" in top and "`bf16` for `full-s1`" in top and "eval losses" in top
    assert "**torch version**" in top and "`2.y` for `attention-s0`" in top
    assert "device" not in top.split("Warning")[1].split("Which runs")[0]  # the device is the same everywhere
    assert "(**mixed**)" in md.split("## Setup")[1]


def test_merged_studies_on_different_devices_are_flagged(tmp_path):
    a = make_study(tmp_path / "a", {"full": -0.3, "attention": -0.2}, seeds=(0,), name="gpu",
                   run_fields={r: {"device": "cuda (NVIDIA H200)"} for r in ("base", "full-s0", "attention-s0")})
    b = make_study(tmp_path / "b", {"full": -0.3, "ffn": -0.25}, seeds=(0,), name="cpu", include_base=False)
    md = (write_report([a, b], resamples=200).parent / "report.md").read_text()
    top = md.split("## Recommendations")[0]
    # another device (or a CPU's thread count) is other numerics: the losses are flagged too
    assert "Warning: mixed environments" in top and "because the device (a CPU's thread count included) differs" in top
    assert "`cuda (NVIDIA H200)` for `gpu/base`, `gpu/full-s0`, `gpu/attention-s0`" in top
    assert "`cpu (synthetic)` for `cpu/full-s0`, `cpu/ffn-s0`" in top


def test_one_environment_gives_no_warning(report):
    assert "mixed environments" not in (report.parent / "report.md").read_text().split("## Methods")[0]


def test_a_cheaper_tie_must_be_smaller_by_more_than_one_percent():
    """Arms matched to one budget differ by up to 1%: a tie 0.07% smaller is not "the cheapest option",
    one 10% smaller is; and a same-size tie is not called a dominance."""
    from types import SimpleNamespace

    from loraplace.report.recommend import best_overall, dominated
    from loraplace.report.stats import PairedComparison, t_interval

    def arm(key, params, losses):
        return SimpleNamespace(key=key, kind="lora", trainable_params=params, loss=t_interval(losses), n=len(losses),
                               perplexity=t_interval([2.0, 2.1, 2.2]), accuracy=None)

    class Group:
        def __init__(self, arms):
            self.lora_arms = arms

        def compare(self, a, b):  # every pair a tie, Holm p 0.5
            return PairedComparison(a.key, b.key, 0.001, -0.01, 0.01, 0.4, (0, 1, 2), 10, 100, p_adjusted=0.5)

        def dominated(self, cost):
            return {"b": [self.lora_arms[0]]}

        def points(self, cost):
            return [(a.trainable_params, a.loss.mean) for a in self.lora_arms]

        def arm(self, key):
            return next(a for a in self.lora_arms if a.key == key)

    best = arm("a", 2_162_688, [2.25, 2.26, 2.255])
    same = arm("b", 2_161_280, [2.26, 2.27, 2.265])
    assert "cheapest" not in best_overall(Group([best, same])).text
    smaller = arm("b", 1_946_419, [2.26, 2.27, 2.265])
    assert "**b** is the cheapest" in best_overall(Group([best, smaller])).text
    # b 0.07% larger than a: same size, not dominated
    text = dominated(Group([arm("a", 2_161_280, [2.25, 2.26, 2.255]), arm("b", 2_162_688, [2.26, 2.27, 2.265])]),
                     "params").text
    assert "the same size (within 1%)" in text and "costs no more" not in text
