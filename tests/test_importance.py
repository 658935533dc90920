"""Importance scores: the streaming spectrum against numpy, each score against a value computed
another way (autograd weight gradients, a covariance known by construction, a power-law
spectrum), the model left untouched, the files, and the command."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from loraplace.data import IGNORE_INDEX, PadCollator, prepare_data
from loraplace.importance import (
    ImportanceResult,
    SpectrumAccumulator,
    hill_alpha,
    load_for_scoring,
    score_batches,
    score_slots,
    write_importance,
)
from loraplace.importance.scores import weight_eigenvalues
from loraplace.run.evaluation import token_nll


def _products(m: int, n: int, steps: int = 6, rank: int | None = None, noise: float = 0.0, seed: int = 0):
    """Pairs (A_t (T, m), B_t (T, n)); with ``rank``, sum A^T B has that rank (decaying scales) plus noise."""
    g = torch.Generator().manual_seed(seed)
    if rank is None:
        return [(torch.randn(40, m, generator=g), torch.randn(40, n, generator=g)) for _ in range(steps)]
    U, V = torch.randn(m, rank, generator=g), torch.randn(n, rank, generator=g)
    scales = torch.tensor([2.0 ** -i for i in range(rank)])
    pairs = []
    for _ in range(steps):
        Z = torch.randn(64, rank, generator=g)
        pairs.append((Z @ (U * scales).T + noise * torch.randn(64, m, generator=g),
                      Z @ V.T + noise * torch.randn(64, n, generator=g)))
    return pairs


def _numpy_singular_values(pairs) -> np.ndarray:
    G = sum(A.double().numpy().T @ B.double().numpy() for A, B in pairs)
    return np.linalg.svd(G, compute_uv=False)


# ---------------------------------------------------------------------------------- spectrum
def test_exact_accumulator_equals_numpy_svd_of_the_summed_matrix():
    pairs = _products(23, 17)
    acc = SpectrumAccumulator(23, 17, 6)
    assert acc.exact and acc.approximation == "exact" and acc.state_floats == 23 * 17
    for A, B in pairs:
        acc.update(A, B)
    assert acc.rows == 6 * 40
    np.testing.assert_allclose(acc.singular_values().numpy(), _numpy_singular_values(pairs)[:6], rtol=1e-5)
    # More values than the matrix has: padded with zeros.
    assert acc.singular_values(20).numpy()[17:].tolist() == [0.0, 0.0, 0.0]


@pytest.mark.parametrize("m,n", [(300, 200), (200, 300)])
def test_sketch_is_close_on_a_decaying_spectrum_and_smaller(m, n):
    pairs = _products(m, n, rank=5, noise=1e-3)
    acc = SpectrumAccumulator(m, n, 8, mode="sketch")
    assert not acc.exact and acc.approximation == "sketch (k=17, l=35)"
    assert acc.transposed == (n > m)
    assert acc.state_floats == max(m, n) * 17 + 35 * min(m, n) < m * n
    for A, B in pairs:
        acc.update(A, B)
    exact = _numpy_singular_values(pairs)
    estimate = acc.singular_values().numpy()
    np.testing.assert_allclose(estimate[:5], exact[:5], rtol=0.02)
    np.testing.assert_allclose(np.cumsum(estimate**2), np.cumsum(exact[:8] ** 2), rtol=0.01)
    again = SpectrumAccumulator(m, n, 8, mode="sketch")  # fixed seed: the same test matrices
    assert torch.equal(again.omega, acc.omega) and torch.equal(again.psi, acc.psi)
    for A, B in pairs:
        again.update(A, B)
    np.testing.assert_allclose(again.singular_values().numpy(), estimate, rtol=1e-6)
    with pytest.raises(ValueError, match="rank 8"):
        acc.singular_values(9)


def test_auto_mode_sketches_only_large_matrices():
    assert SpectrumAccumulator(576, 1536, 64).exact  # below EXACT_MAX_FLOATS
    assert not SpectrumAccumulator(2048, 5632, 64).exact
    assert SpectrumAccumulator(4096, 100, 64).exact  # a sketch would not be smaller


def _power_law_products(m: int, n: int, energies: torch.Tensor, seed: int = 0):
    """One pair (A, B) with ``A^T B = U diag(sqrt(energies)) V^T`` for random orthonormal U, V."""
    g = torch.Generator().manual_seed(seed)
    N = energies.numel()
    U = torch.linalg.qr(torch.randn(m, N, generator=g))[0]
    V = torch.linalg.qr(torch.randn(n, N, generator=g))[0]
    return energies.sqrt().float()[:, None] * U.T, V.T.contiguous()


def _curve(acc: SpectrumAccumulator, pairs) -> np.ndarray:
    for A, B in pairs:
        acc.update(A, B)
    return np.cumsum(acc.singular_values().numpy() ** 2)


SAME_SPECTRUM_SPREAD = 0.3
"""Stated bound (spectrum.score_mode): slots of one spectrum, read by one estimator, give curves
within 30% of each other at rank 32 on 600 singular values, sigma_i^2 ~ i^-0.5 to i^-2 (measured
up to 25%); one exact and one sketched slot differ by up to 3.9x there."""


def test_slots_of_one_spectrum_get_one_estimator_and_agree(monkeypatch):
    """Two slots with the same 600 singular values (sigma_i^2 = i^-0.5), one over the (lowered) exact
    threshold and one under it: read one by one, the sketched slot's curve is far above the exact
    one; read as one score (score_mode), both are sketched and agree within the stated bound."""
    from loraplace.importance import spectrum
    from loraplace.importance.spectrum import score_mode

    monkeypatch.setattr(spectrum, "EXACT_MAX_FLOATS", 2**19)
    rank, energies = 32, torch.arange(1, 601, dtype=torch.float64) ** -0.5
    big, small = (1200, 620), (600, 640)  # 744000 entries (over 2^19) and 384000 (under)
    pairs = {shape: [_power_law_products(*shape, energies, seed=i)] for i, shape in enumerate((big, small))}
    exact = np.cumsum(energies[:rank].numpy())

    # One by one (the per-slot rule): one slot sketched, the other exact.
    alone = {shape: SpectrumAccumulator(*shape, rank) for shape in pairs}
    assert not alone[big].exact and alone[small].exact
    mixed = {shape: _curve(acc, pairs[shape]) for shape, acc in alone.items()}
    np.testing.assert_allclose(mixed[small], exact, rtol=1e-5)
    assert np.max(mixed[big] / mixed[small] - 1) > 5 * SAME_SPECTRUM_SPREAD  # the tilt: measured 3.1

    # As one score: both sketched with the same (k, l), curves within the bound.
    mode = score_mode(pairs, rank)
    assert mode == "sketch"
    scored = {shape: SpectrumAccumulator(*shape, rank, mode=mode) for shape in pairs}
    assert {acc.approximation for acc in scored.values()} == {"sketch (k=65, l=131)"}
    curves = {shape: _curve(acc, pairs[shape]) for shape, acc in scored.items()}
    assert np.max(np.abs(curves[big] / curves[small] - 1)) <= SAME_SPECTRUM_SPREAD  # measured 0.22
    # No slot over the threshold: every slot exact; explicit modes apply to all.
    assert score_mode([small, (64, 64)], rank) == "exact"
    assert score_mode([small], rank, "sketch") == "sketch" and score_mode([big], rank, "exact") == "exact"
    with pytest.raises(ValueError, match="unknown mode"):
        score_mode([small], rank, "fast")


@pytest.mark.parametrize("power", [0.5, 1.0])
def test_sketch_error_bound_against_numpy_svd(power):
    """The stated error of the sketch (spectrum.score_mode) against numpy's SVD of the summed
    matrix: each sketched curve point lies between about the exact one and the total energy
    ||G||_F^2 (up by at most the energy beyond it: k/(l-k-1) = 1 times that tail), and several
    sketches of one spectrum spread within the stated bound."""
    rank, energies = 32, torch.arange(1, 601, dtype=torch.float64) ** -power
    curves = []
    for seed, shape in enumerate([(900, 620), (600, 640)]):
        pairs = [_power_law_products(*shape, energies, seed=seed)]
        reference = _numpy_singular_values(pairs) ** 2
        exact, total = np.cumsum(reference[:rank]), float(np.sum(reference))
        acc = SpectrumAccumulator(*shape, rank, mode="sketch", seed=seed)
        assert acc.l - acc.k - 1 == acc.k  # l = 2k + 1: the tail counts once
        curve = _curve(acc, pairs)
        assert np.all(curve >= 0.97 * exact) and np.all(curve <= 1.03 * total)
        curves.append(curve)
    assert np.max(np.abs(curves[0] / curves[1] - 1)) <= SAME_SPECTRUM_SPREAD


def test_gradient_score_reads_every_slot_with_one_estimator(monkeypatch, tiny_llama_dir, alpaca_file):
    """A threshold under the MLP slots (64 x 32) but over attention (32 x 32): every slot is
    sketched alike, and the result names one estimator."""
    from transformers import AutoModelForCausalLM

    from loraplace.importance import spectrum

    monkeypatch.setattr(spectrum, "EXACT_MAX_FLOATS", 1500)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    batches, _ = _train_batches(tiny_llama_dir, alpaca_file)
    for score in ("gradient", "activation"):
        result = score_slots(model, batches, score, 4)
        assert result.approximation == "sketch (k=9, l=19)", score
        assert {s.approximation for s in result.slots} == {"sketch (k=9, l=19)"}, score


# ----------------------------------------------------------------------------------- helpers
def _train_batches(model_dir, alpaca_file, n=2, size=4):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    data = prepare_data(str(alpaca_file), tokenizer, eval_size=8, max_length=128, split_seed=1234)
    return score_batches(data.train, PadCollator(tokenizer.pad_token_id), batches=n, batch_size=size), data


def _snapshot(model):
    return ({k: v.clone() for k, v in model.state_dict().items()},
            [(n, p.requires_grad) for n, p in model.named_parameters()],
            [(n, m.training) for n, m in model.named_modules()],
            sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
                for m in model.modules()))


def _assert_unchanged(model, before):
    state, flags, modes, hooks = before
    after = model.state_dict()
    assert all(torch.equal(state[k], after[k]) for k in state)
    assert [(n, p.requires_grad) for n, p in model.named_parameters()] == flags
    assert [(n, m.training) for n, m in model.named_modules()] == modes
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
               for m in model.modules()) == hooks
    assert all(p.grad is None for p in model.parameters())


def _reference_gradient_curves(model, names, batches, max_rank, nll_fn=token_nll):
    """Autograd: the slot weights' .grad of each batch's token-mean loss, averaged, then svdvals."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    modules = {n: model.get_submodule(n) for n in names}
    for m in modules.values():
        m.weight.requires_grad_(True)
    for batch in batches:
        nll_sum, n_tokens, *_ = nll_fn(model, batch)
        (nll_sum.sum() / n_tokens.sum()).backward()
    curves = {n: torch.cumsum(torch.linalg.svdvals(m.weight.grad / len(batches)) ** 2, 0)[:max_rank]
              for n, m in modules.items()}
    for m in modules.values():
        m.weight.grad = None
    return curves


# ---------------------------------------------------------------------------------- gradient
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_gradient_score_equals_autograd_weight_gradients_and_leaves_the_model_as_it_was(
        family, tiny_llama_dir, tiny_gpt2_dir, alpaca_file):
    from transformers import AutoModelForCausalLM

    model_dir = tiny_llama_dir if family == "llama" else tiny_gpt2_dir
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    model.train()  # scoring runs in eval mode and must restore this
    model.get_submodule(next(n for n, _ in model.named_modules() if n.endswith("0.mlp"))).eval()  # mixed modes
    model.get_input_embeddings().weight.requires_grad_(False)  # mixed flags
    batches, _ = _train_batches(model_dir, alpaca_file)
    before = _snapshot(model)
    result = score_slots(model, batches, "gradient", 4)
    _assert_unchanged(model, before)

    assert result.batches == 2 and result.batch_size == 4 and result.approximation == "exact"
    assert result.tokens == sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in batches)
    assert result.seconds > 0 and result.memory_kind == "rss" and result.peak_memory_mib > 0
    expected_slots = 14 if family == "llama" else 8  # 7 roles x 2 layers; GPT-2: 4 roles x 2 layers
    assert len(result.slots) == expected_slots
    reference = _reference_gradient_curves(model, [s.name for s in result.slots], batches, 4)
    for slot in result.slots:
        assert len(slot.curve) == 4 and slot.curve[0] > 0
        np.testing.assert_allclose(slot.curve, reference[slot.name].numpy(), rtol=1e-4, err_msg=slot.name)


def test_gradient_score_finds_the_only_slot_that_can_change_the_loss(tiny_llama_dir, alpaca_file):
    """Zero v/o of every layer, up/down of layer 0 and down of layer 1: only layer 1's mlp.down
    has both an input (its gate and up are live) and a path to the loss."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.v_proj.weight.zero_()
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.model.layers[0].mlp.up_proj.weight.zero_()
    batches, _ = _train_batches(tiny_llama_dir, alpaca_file)
    result = score_slots(model, batches, "gradient", 4)
    gains = {s.name: s.gain(4) for s in result.slots}
    top = max(gains, key=gains.get)
    assert top == "model.layers.1.mlp.down_proj" and gains[top] > 0
    assert all(g <= 1e-12 * gains[top] for n, g in gains.items() if n != top)


def _encoder_model(family: str, vocab: int):
    """A tiny random T5 (seq2seq) or BERT (classification) model and its task."""
    from transformers import BertConfig, BertForSequenceClassification, T5Config, T5ForConditionalGeneration

    from loraplace.run.tasks import get_task

    torch.manual_seed(0)
    if family == "t5":
        config = T5Config(vocab_size=vocab, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                          decoder_start_token_id=0, pad_token_id=0)
        return T5ForConditionalGeneration(config), get_task("seq2seq")
    config = BertConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, num_labels=3, pad_token_id=0)
    return BertForSequenceClassification(config), get_task("classification")


def _encoder_batches(family: str, pad_source: int = 0, pad_target: int = 0, seed: int = 0):
    """Two batches of 3 rows, all of one length, with ``pad_source`` / ``pad_target`` padding columns appended."""
    g = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(2):
        ids = torch.cat([torch.randint(3, 200, (3, 7), generator=g), torch.zeros(3, pad_source, dtype=torch.long)], 1)
        mask = (torch.arange(ids.shape[1]) < 7).long().expand(3, -1).clone()
        if family == "t5":
            labels = torch.cat([torch.randint(3, 200, (3, 5), generator=g),
                                torch.full((3, pad_target), IGNORE_INDEX)], 1)
        else:
            labels = torch.randint(0, 3, (3,), generator=g)
        batches.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return batches


@pytest.mark.parametrize("family", ["t5", "bert"])
def test_gradient_score_of_encoder_models_equals_autograd_with_the_task_loss(family):
    model, task = _encoder_model(family, 256)
    batches = _encoder_batches(family)
    before = _snapshot(model)
    result = score_slots(model, batches, "gradient", 3, nll_fn=task.nll)
    _assert_unchanged(model, before)
    roles = {s.role for s in result.slots}
    assert roles >= ({"xattn.q", "xattn.k", "xattn.v", "xattn.o"} if family == "t5" else {"attn.q", "mlp.down"})
    reference = _reference_gradient_curves(model, [s.name for s in result.slots], batches, 3, task.nll)
    for slot in result.slots:
        assert slot.curve[0] > 0, slot.name
        np.testing.assert_allclose(slot.curve, reference[slot.name].numpy(), rtol=1e-4, err_msg=slot.name)


# -------------------------------------------------------------------------------- activation
@pytest.mark.parametrize("family", ["llama", "gpt2", "t5", "bert"])
def test_activation_score_ignores_padding(family, tiny_llama_dir, tiny_gpt2_dir):
    """Padding appended to the source (and, for T5, to the decoder's targets) changes no real
    token's activations, so with the right token masks it changes no covariance."""
    from transformers import AutoModelForCausalLM

    from loraplace.run.tasks import get_task

    if family in ("t5", "bert"):
        model, task = _encoder_model(family, 256)
        plain, padded = _encoder_batches(family), _encoder_batches(family, pad_source=3, pad_target=2)
    else:
        model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir if family == "llama" else tiny_gpt2_dir)
        task = get_task("causal-lm")
        plain = _encoder_batches("bert")
        padded = _encoder_batches("bert", pad_source=3)
        for batch in plain + padded:
            batch["labels"] = torch.where(batch["attention_mask"].bool(), batch["input_ids"], IGNORE_INDEX)
    a = score_slots(model, plain, "activation", 3, nll_fn=task.nll)
    b = score_slots(model, padded, "activation", 3, nll_fn=task.nll)
    assert not a.warnings and not b.warnings and a.tokens == b.tokens
    for x, y in zip(a.slots, b.slots):
        assert x.curve[0] > 0
        np.testing.assert_allclose(y.curve, x.curve, rtol=1e-4, err_msg=x.name)


def test_activation_score_is_the_known_input_covariance(tiny_llama_dir):
    """Embedding rows sqrt(d) e_i have unit RMS, so layer 0's RMSNorm passes them unchanged: the
    covariance of the q/k/v input is d * diag(share of each token among real tokens)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    d = model.config.hidden_size
    eps = model.config.rms_norm_eps
    with torch.no_grad():
        model.get_input_embeddings().weight.zero_()
        for token in range(8):
            model.get_input_embeddings().weight[token, token] = math.sqrt(d)
    # Tokens 1 and 2 appear 6 and 3 times, 3 twice, 4 once (12 real tokens); 0 pads (4 positions).
    ids = torch.tensor([[1, 1, 1, 2, 3, 4, 0, 0], [1, 1, 1, 2, 2, 3, 0, 0]])
    mask = (ids != 0).long()
    batch = {"input_ids": ids, "attention_mask": mask, "labels": torch.where(mask.bool(), ids, IGNORE_INDEX)}
    result = score_slots(model, [batch], "activation", 4)
    expected = np.cumsum(np.array([6, 3, 2, 1]) / 12 * d / (1 + eps))
    slots = {s.name: s for s in result.slots}
    for role in ("q", "k", "v"):  # q/k/v read one tensor: one covariance, one curve
        np.testing.assert_allclose(slots[f"model.layers.0.self_attn.{role}_proj"].curve, expected, rtol=1e-5)
    assert slots["model.layers.0.mlp.gate_proj"].curve == slots["model.layers.0.mlp.up_proj"].curve
    assert result.tokens == int((batch["labels"][:, 1:] != IGNORE_INDEX).sum()) and not result.warnings


# ------------------------------------------------------------------------------------ weight
def _power_law_eigenvalues(alpha: float, n: int = 400) -> torch.Tensor:
    """Quantiles of a density p(x) ~ x^-alpha on [1, inf): P(X > x) = x^-(alpha - 1)."""
    return (torch.arange(1, n + 1, dtype=torch.float64) / (n + 1)) ** (-1.0 / (alpha - 1))


def test_hill_alpha_recovers_a_power_law_exponent_and_orders_tails():
    for alpha in (2.0, 3.0, 5.0):
        assert hill_alpha(_power_law_eigenvalues(alpha)) == pytest.approx(alpha, rel=0.03)
    assert hill_alpha(_power_law_eigenvalues(2.5)) < hill_alpha(_power_law_eigenvalues(4.0))
    # Through a weight matrix: W = U diag(sqrt(lambda)) V^T has W^T W eigenvalues lambda.
    g = torch.Generator().manual_seed(0)
    U, _ = torch.linalg.qr(torch.randn(200, 200, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(300, 200, generator=g, dtype=torch.float64))
    W = (U * _power_law_eigenvalues(3.0, 200).sqrt()) @ V.T  # (200, 300)
    eig = weight_eigenvalues(W.T.float())
    assert eig.numel() == 200
    assert hill_alpha(eig) == pytest.approx(3.0, rel=0.03)


def test_weight_score_is_alpha_times_size_times_harmonic_number(tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    result = score_slots(model, None, "weight", 5)
    assert result.tokens == 0 and result.batches == 0 and result.dataset is None
    harmonic = np.cumsum(1.0 / np.arange(1, 6))
    for slot in result.slots:
        w = model.get_submodule(slot.name).weight.detach().double().numpy()
        lam = np.sort(np.linalg.svd(w, compute_uv=False) ** 2)[::-1]
        k = lam.size // 2
        alpha = 1 + k / np.log(lam[:k] / lam[k]).sum()
        np.testing.assert_allclose(slot.curve, alpha * (slot.in_features + slot.out_features) * harmonic, rtol=1e-6)


def test_mixture_of_experts_parameters_are_left_out_with_a_note():
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    model = MixtralForCausalLM(MixtralConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                             num_attention_heads=4, num_key_value_heads=2, num_local_experts=2,
                                             num_experts_per_tok=1))
    result = score_slots(model, None, "weight", 3)
    assert {s.role for s in result.slots} == {"attn.q", "attn.k", "attn.v", "attn.o"} and len(result.slots) == 8
    assert any("4 mixture-of-experts parameters" in w for w in result.warnings)
    assert "Mixture-of-experts parameters are not scored" in result.method


# ----------------------------------------------------------------------------------- outputs
def test_writers_round_trip_and_draw(tiny_llama_dir, alpaca_file, tmp_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    batches, _ = _train_batches(tiny_llama_dir, alpaca_file)
    result = score_slots(model, batches, "activation", 4, model_name="tiny", dataset=str(alpaca_file))
    paths = write_importance(result, tmp_path, r=2)
    assert ImportanceResult.from_dict(result.to_dict()) == result
    assert ImportanceResult.load(paths["json"]) == result
    document = json.loads(paths["json"].read_text())
    assert document["format"] == "loraplace-importance/1" and document["dataset"] == str(alpaca_file)
    assert set(document) >= {"score", "model", "max_rank", "batches", "batch_size", "tokens", "seconds",
                             "peak_memory_mib", "memory_kind", "method", "approximation", "slots"}
    assert set(document["slots"][0]) >= {"name", "role", "stack", "layer", "in_features", "out_features", "curve"}
    rows = list(csv.DictReader(paths["csv"].open()))
    assert [r["name"] for r in rows] == [s.name for s in result.slots]
    assert sum(float(r["share_at_r"]) for r in rows) == pytest.approx(1.0)
    first = result.slots[0]
    assert float(rows[0]["gain_per_param_at_r"]) == pytest.approx(first.curve[1] / (2 * first.size))
    for key in ("png", "svg"):
        assert paths[key].stat().st_size > 1000
    assert first.gain(0) == 0.0 and first.gain(4) == first.curve[3]
    with pytest.raises(ValueError, match="max_rank"):
        first.gain(5)


def test_scoring_batches_come_from_the_train_split_only(tiny_llama_dir, alpaca_file):
    setup = load_for_scoring(str(tiny_llama_dir), str(alpaca_file), batches=3, batch_size=4, max_length=128,
                             eval_size=8, device="cpu")
    _, data = _train_batches(tiny_llama_dir, alpaca_file)
    train = {tuple(x) for x in data.train["input_ids"]}
    assert len(setup.batches) == 3
    for batch in setup.batches:
        for ids, mask in zip(batch["input_ids"], batch["attention_mask"]):
            assert tuple(ids[mask.bool()].tolist()) in train
    again = load_for_scoring(str(tiny_llama_dir), str(alpaca_file), batches=3, batch_size=4, max_length=128,
                             eval_size=8, device="cpu")
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(setup.batches, again.batches))


# ---------------------------------------------------------------------------------------- cli
def test_importance_command_writes_every_score(tiny_llama_dir, alpaca_file, tmp_path, monkeypatch):
    from loraplace.cli import app

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    out = tmp_path / "importance"
    result = CliRunner().invoke(app, ["importance", "-m", str(tiny_llama_dir), "-d", str(alpaca_file),
                                      "--batches", "2", "--batch-size", "4", "--max-rank", "4", "--r", "2",
                                      "--eval-size", "8", "-o", str(out)])
    assert result.exit_code == 0, result.output
    for score in ("gradient", "activation", "weight"):
        loaded = ImportanceResult.load(out / f"{score}.json")
        assert loaded.max_rank == 4 and len(loaded.slots) == 14
        assert (out / f"{score}.csv").exists() and (out / f"{score}_heatmap.png").exists()
        assert f"{score} score of" in result.output
    bad = CliRunner().invoke(app, ["importance", "-m", str(tiny_llama_dir), "--score", "fisher", "-o", str(out)])
    assert bad.exit_code == 2 and bad.output.strip().startswith("error:") and "fisher" in bad.output
