"""``loraplace plan`` on every family (config folders, no weights): the layer x role matrix, the
exact module names in --json, --match-budget; budget-matched arms in a study, end to end on a
tiny random-init GPT-2."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from loraplace.cli import app

runner = CliRunner()


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


def invoke(*args) -> tuple[int, str]:
    result = runner.invoke(app, list(args))
    return result.exit_code, result.output


def _configs():
    import transformers as tf

    small = dict(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64, vocab_size=100)
    return {
        "gpt2": tf.GPT2Config(n_embd=32, n_layer=4, n_head=2, vocab_size=100, n_positions=64),
        "gptj": tf.GPTJConfig(n_embd=32, n_layer=4, n_head=2, vocab_size=100, n_positions=64, rotary_dim=8),
        "gpt_neox": tf.GPTNeoXConfig(**small),
        "opt": tf.OPTConfig(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, ffn_dim=64, vocab_size=100,
                            word_embed_proj_dim=32),
        "bloom": tf.BloomConfig(hidden_size=32, n_layer=4, n_head=2, vocab_size=100),
        "falcon": tf.FalconConfig(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, vocab_size=100),
        "llama": tf.LlamaConfig(**small),
        "mistral": tf.MistralConfig(**small),
        "qwen2": tf.Qwen2Config(**small),
        "gemma": tf.GemmaConfig(**small, head_dim=16),
        "phi3": tf.Phi3Config(**small, pad_token_id=0),
        "mixtral": tf.MixtralConfig(**small, num_key_value_heads=2, num_local_experts=4),
        "bert": tf.BertConfig(**small),
        "roberta": tf.RobertaConfig(**small),
        "t5": tf.T5Config(d_model=32, d_kv=16, d_ff=64, num_layers=4, num_heads=2, vocab_size=100),
        "bart": tf.BartConfig(d_model=32, encoder_layers=4, decoder_layers=4, encoder_attention_heads=2,
                              decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, vocab_size=100),
    }


EXPECTED_COLUMNS = {
    "gpt2": ["attn.qkv", "attn.o", "mlp.up", "mlp.down"],
    "gptj": ["attn.q", "attn.k", "attn.v", "attn.o", "mlp.up", "mlp.down"],
    "gpt_neox": ["attn.qkv", "attn.o", "mlp.up", "mlp.down"],
    "opt": ["attn.q", "attn.k", "attn.v", "attn.o", "mlp.up", "mlp.down"],
    "bloom": ["attn.qkv", "attn.o", "mlp.up", "mlp.down"],
    "falcon": ["attn.qkv", "attn.o", "mlp.up", "mlp.down"],
    "llama": ["attn.q", "attn.k", "attn.v", "attn.o", "mlp.gate", "mlp.up", "mlp.down"],
    "mistral": ["attn.q", "attn.k", "attn.v", "attn.o", "mlp.gate", "mlp.up", "mlp.down"],
    "qwen2": ["attn.q", "attn.k", "attn.v", "attn.o", "mlp.gate", "mlp.up", "mlp.down"],
    "gemma": ["attn.q", "attn.k", "attn.v", "attn.o", "mlp.gate", "mlp.up", "mlp.down"],
    "phi3": ["attn.qkv", "attn.o", "mlp.gate_up", "mlp.down"],
    "mixtral": ["attn.q", "attn.k", "attn.v", "attn.o", "mlp.gate_up", "mlp.down"],
    "bert": ["attn.q", "attn.k", "attn.v", "attn.o", "mlp.up", "mlp.down"],
    "roberta": ["attn.q", "attn.k", "attn.v", "attn.o", "mlp.up", "mlp.down"],
    "t5": ["attn.q", "attn.k", "attn.v", "attn.o", "xattn.q", "xattn.k", "xattn.v", "xattn.o", "mlp.up", "mlp.down"],
    "bart": ["attn.q", "attn.k", "attn.v", "attn.o", "xattn.q", "xattn.k", "xattn.v", "xattn.o", "mlp.up",
             "mlp.down"],
}
ENCODER_DECODER = {"t5", "bart"}


def _meta_model(family: str):
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoModelForSequenceClassification

    auto = (AutoModelForSeq2SeqLM if family in ENCODER_DECODER else
            AutoModelForSequenceClassification if family in ("bert", "roberta") else AutoModelForCausalLM)
    with torch.device("meta"):
        return auto.from_config(_configs()[family])


@pytest.fixture(scope="module")
def config_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("configs")
    dirs = {}
    for family, config in _configs().items():
        config.save_pretrained(root / family)
        dirs[family] = root / family
    return dirs


@pytest.mark.parametrize("family", sorted(EXPECTED_COLUMNS))
def test_plan_matrix_on_every_family(config_dirs, family):
    code, output = invoke("plan", "-m", str(config_dirs[family]), "-s", "full,attention@last:2[r=8],ffn@every:2",
                          "--r", "4", "--json")
    assert code == 0, output
    plan = json.loads(output)
    rows = {r["strategy"]: r for r in plan["strategies"]}
    columns = EXPECTED_COLUMNS[family]
    stacks = list(rows["full"]["stacks"])
    assert len(stacks) == (2 if family in ENCODER_DECODER else 1)
    full = rows["full"]["matrix"]
    assert [c for c in full["columns"] if c not in ("embed", "lm_head")] == columns
    assert [(r["stack"], r["layers"]) for r in full["rows"]] == [(s, "0-3") for s in stacks]
    # Cross-attention only exists in the decoder.
    for r in full["rows"]:
        has_cross = family in ENCODER_DECODER and "decoder" in r["stack"]
        assert r["cells"] == {c: (4 if not c.startswith("xattn.") or has_cross else None) for c in columns}
    attn_rows = rows["attention@last:2[r=8]"]["matrix"]["rows"]
    assert [(r["stack"], r["layers"]) for r in attn_rows] == [(s, span) for s in stacks for span in ("0-1", "2-3")]
    for r in attn_rows:
        adapted = {c for c, v in r["cells"].items() if v is not None}
        assert all(v == 8 for v in r["cells"].values() if v is not None)
        assert adapted <= {c for c in columns if "attn." in c} and (bool(adapted) == (r["layers"] == "2-3"))
    ffn_rows = rows["ffn@every:2"]["matrix"]["rows"]
    assert [r["layers"] for r in ffn_rows] == ["0", "1", "2", "3"] * len(stacks)
    # --json lists every exact module name with its role, layer and rank.
    modules = rows["full"]["modules"]
    assert len({m["name"] for m in modules}) == len(modules) and all(m["r"] == 4 for m in modules)
    assert {m["role"] for m in modules} == set(columns)
    # Parameter counts from the weights of a model built from the same config (not from the plan's
    # shapes): LoRA adds r * (in + out) per module, per expert for a 3-D MoE parameter. A weight is
    # (out, in) for nn.Linear and (in, out) for GPT-2's Conv1D: either way in + out is the sum of its
    # last two dimensions.
    model = _meta_model(family)
    expected = {}
    for m in modules:
        weight = model.get_parameter(m["name"]) if m.get("is_parameter") else model.get_submodule(m["name"]).weight
        experts = weight.shape[0] if weight.dim() == 3 else 1
        expected[m["name"]] = 4 * experts * (weight.shape[-1] + weight.shape[-2])
    assert {m["name"]: m["params"] for m in modules} == expected
    assert rows["full"]["trainable_params"] == sum(expected.values())


def test_plan_table_shows_the_matrix(config_dirs):
    code, output = invoke("plan", "-m", str(config_dirs["t5"]), "-s", "cross-attention@last:1")
    assert code == 0, output
    assert "cross-attention@last:1: rank per layer and role" in output
    assert "decoder.block" in output and "encoder.block" in output
    matrix = [[cell.strip() for cell in line.split("│")] for line in output.splitlines()
              if line.startswith(("encoder.block", "decoder.block"))]
    # stack, layers, 4 self-attention, 4 cross-attention and 2 FFN columns
    assert matrix == [
        ["encoder.block", "0-3"] + ["·"] * 10,
        ["decoder.block", "0-2"] + ["·"] * 10,
        ["decoder.block", "3"] + ["·"] * 4 + ["16"] * 4 + ["·"] * 2,
    ]


def test_plan_dialogpt_medium_match_budget_full():
    code, output = invoke("plan", "-m", "microsoft/DialoGPT-medium", "-s", "full,attention,ffn",
                          "--match-budget", "full", "--json")
    assert code == 0, output
    plan = json.loads(output)
    # DialoGPT-medium: 24 blocks, hidden 1024, FFN 4096. Per block and rank: c_attn 1024 + 3072,
    # attn.c_proj 1024 + 1024, c_fc 1024 + 4096, mlp.c_proj 4096 + 1024.
    attention, ffn = 24 * ((1024 + 3072) + (1024 + 1024)), 24 * ((1024 + 4096) + (4096 + 1024))
    full = 16 * (attention + ffn)
    assert plan["match_budget"] == "full" and plan["budget_target"] == full == 6_291_456
    rows = {r["strategy"]: r for r in plan["strategies"]}
    assert list(rows) == ["full", "attention", "attention~full", "ffn", "ffn~full"]
    counts = {k: r["trainable_params"] for k, r in rows.items()}
    # attention~full: rank 42 everywhere plus 1 on the 24 c_attn modules (4096 each) is exact.
    # ffn~full: rank 25 everywhere leaves 147,456; one more rank on 29 of the 48 modules (5120 each)
    # overshoots by 1,024, on 28 it falls 4,096 short.
    assert counts == {"full": full, "attention": 16 * attention, "attention~full": 42 * attention + 24 * 4096,
                      "ffn": 16 * ffn, "ffn~full": 25 * ffn + 29 * 5120}
    matched = [counts["full"], counts["attention~full"], counts["ffn~full"]]
    assert max(matched) / min(matched) - 1 <= 0.01
    assert rows["attention~full"]["ranks"] == {"attn.qkv": [43], "attn.o": [42]}
    assert rows["ffn~full"]["budget"]["achieved"] == 6_292_480 and rows["full"]["budget"] is None
    assert {m["r"] for m in rows["ffn~full"]["modules"]} == {25, 26}


def test_plan_smollm2_match_budget_full_table():
    code, output = invoke("plan", "-m", "HuggingFaceTB/SmolLM2-135M-Instruct", "-s", "full,attention,ffn",
                          "--match-budget", "full")
    assert code == 0, output
    assert "budget-matched to full = 4,884,480 parameters" in output
    for text in ("attention~full", "ffn~full", "4,885,056", "+0.01%", "+0.00%", "mlp.gate: 25/26"):
        assert text in output, text


def test_plan_with_a_parameter_count_budget():
    code, output = invoke("plan", "-m", "microsoft/DialoGPT-medium", "-s", "qkv_only_is_not_a_role", "--json")
    assert code == 2 and "unknown role or strategy name at 'qkv_only_is_not_a_role'" in output
    code, output = invoke("plan", "-m", "microsoft/DialoGPT-medium", "-s", "attention", "--match-budget", "3M",
                          "--json")
    assert code == 0, output
    row = json.loads(output)["strategies"][1]
    assert row["strategy"] == "attention~3000000" and abs(row["trainable_params"] - 3_000_000) <= 4096


@pytest.mark.parametrize("args, fragment", [
    (["--match-budget", "fulll"], "match_budget 'fulll' is neither a parameter count"),
    (["--match-budget", "0"], "a parameter budget must be at least 1"),
    (["-s", "attention@last:99"], "asks for 99 layers but the model has 24 (0-23)"),
    (["-s", "ffn[r=8]+attention[r=4]", "--match-budget", "full"], "sets r= on every term"),
])
def test_plan_errors_are_one_line(args, fragment):
    code, output = invoke("plan", "-m", "microsoft/DialoGPT-medium", *args)
    assert code == 2, output
    assert output.strip().startswith("error:") and "Traceback" not in output
    assert fragment in " ".join(output.split()), output


def test_study_arms_and_config_errors(tmp_path):
    from loraplace.config import load_study
    from loraplace.errors import LoraplaceError
    from loraplace.study.specs import run_specs

    config = load_study(None, {"strategies": "full,attention@last:1/2,ffn", "match_budget": "full",
                               "seeds": "0,1", "include_base": False})
    specs = run_specs(config, tmp_path)
    # A label with characters unsafe in folder names (":" and "/") gets them replaced by "_" and the
    # first 8 hex digits of the SHA-256 of the exact label appended.
    tag = lambda arm: "." + hashlib.sha256(arm.encode()).hexdigest()[:8]  # noqa: E731
    half = f"attention@last_1_2{tag('attention@last:1/2')}-s0"
    half_matched = f"attention@last_1_2~full{tag('attention@last:1/2~full')}-s0"
    assert [(s.run_id, s.strategy) for s in specs[:5]] == [
        ("full-s0", "full"), (half, "attention@last:1/2"),
        (half_matched, "attention@last:1/2~full"), ("ffn-s0", "ffn"), ("ffn~full-s0", "ffn~full")]
    # Seed 1 runs the same five arms, the order rotated by one (so no arm is always timed first).
    arms = ["full", "attention@last:1/2", "attention@last:1/2~full", "ffn", "ffn~full"]
    assert [(s.strategy, s.seed) for s in specs] == [(a, 0) for a in arms] + [(a, 1) for a in arms[1:] + arms[:1]]
    assert specs[9].run_id == "full-s1"
    assert Path(specs[2].run_dir) == tmp_path / "runs" / half_matched
    assert load_study(None, {"match_budget": "6.3M"}).match_budget == 6_300_000
    with pytest.raises(LoraplaceError, match=r"match_budget 'nope' is neither"):
        load_study(None, {"match_budget": "nope"})
    with pytest.raises(LoraplaceError, match=r"needs a free rank, but ffn\[r=8\] sets r= on every term"):
        load_study(None, {"strategies": "ffn[r=8],attention", "match_budget": "full"})
    # "attn.*" and "attn.?" sanitise to the same text; the hash of the exact label keeps them apart.
    both = run_specs(load_study(None, {"strategies": "attn.*,attn.?", "include_base": False}), tmp_path)
    assert [s.run_id for s in both] == [f"attn._{tag('attn.*')}-s0", f"attn._{tag('attn.?')}-s0"]
    assert len({s.run_dir for s in both}) == 2


# ------------------------------------------------------------------ end to end on a tiny GPT-2
def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([f"Add {a} and {b}. The answer is {a + b}." for a in range(20) for b in range(5)], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")


def test_budget_matched_study_end_to_end(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    model_dir = tmp_path / "gpt2"
    tokenizer = _tokenizer()
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=2, n_positions=256)
                    ).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    data = tmp_path / "alpaca.json"
    data.write_text(json.dumps([{"instruction": f"Add {i} and {i + 1}.", "input": "", "output": f"{2 * i + 1}"}
                                for i in range(24)]))
    out = tmp_path / "study"
    result = runner.invoke(app, ["run", "--model", str(model_dir), "--dataset", str(data), "-o", str(out),
                                 "--strategies", "full,attention", "--match-budget", "full", "include_base=false",
                                 "train.max_steps=1", "train.batch_size=4", "data.eval_size=4", "train.eval_every=0"])
    assert result.exit_code == 0, result.output
    runs = {r["run_id"]: r for r in json.loads((out / "results.json").read_text())["runs"]}
    assert list(runs) == ["full-s0", "attention-s0", "attention~full-s0"]
    assert all(r["status"] == "ok" for r in runs.values()), [r["error"] for r in runs.values()]
    full, matched = runs["full-s0"], runs["attention~full-s0"]
    # attention per rank: 2 * ((32 + 96) + (32 + 32)) = 384; full at r=16 = 16 * 2 * 512 = 16,384;
    # 16,384 / 384 = 42.67: rank 42 everywhere and 43 on the two larger c_attn modules gives 16,384.
    assert full["trainable_params"] == matched["trainable_params"] == 16_384
    assert matched["ranks"] == {"attn.qkv": [43], "attn.o": [42]} and matched["r"] is None
    assert matched["match_budget"] == "full" and matched["budget_target"] == 16_384
    assert matched["budget_deviation_pct"] == 0.0 and runs["attention-s0"]["trainable_params"] == 6_144
    modules = json.loads((out / "runs" / "attention~full-s0" / "modules.json").read_text())
    assert modules["budget"]["method"] == "uniform+1"
    table = (out / "results.md").read_text()
    assert "| attention~full-s0 | ok | 16,384 |" in table and "| attention-s0 | ok | 6,144 |" in table
    assert "attention~full-s0" in (out / "results.csv").read_text()
