"""`loraplace report` on synthetic study folders (the exact on-disk layout, no training)."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from loraplace.cli import app
from loraplace.errors import LoraplaceError
from loraplace.report import parse_budget, write_report
from loraplace.report.analysis import build_arms, build_groups
from loraplace.report.load import load_studies
from loraplace.report.stats import t_interval
from loraplace.report.synthetic import make_study

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
    # "cannot separate" exactly for the arms whose paired test against the best is not significant
    ties = sorted(k for k, a in lora.items() if a is not best and g.compare(a, best).p_value >= 0.05)
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
    for cmd in ("\\toprule", "\\midrule", "\\bottomrule", "\\begin{tabular}{lrrrrrlrlrrr}", "\\label{tab:summary}"):
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


@pytest.mark.parametrize("text,value", [("500000", 500_000), ("500k", 500_000), ("2M", 2_000_000), ("1e6", 1_000_000),
                                        ("12,000", 12_000), ("6.3M", 6_300_000)])
def test_parse_budget(text, value):
    assert parse_budget(text) == value
