"""``init=lora_ga`` and ``init=corda``: computed once through PEFT's own preprocessing and initialiser,
stored as each module's start, and applied in a run exactly as PEFT applies them (A, B and the
rewritten base weights), checked against PEFT called directly, against the gradient's SVD computed
here with autograd, and against the base model's own output."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.lora.config import CordaConfig, LoraGAConfig
from peft.tuners.lora.corda import preprocess_corda
from peft.tuners.lora.loraga import preprocess_loraga
from test_baselines import one_batch
from test_evaluation_nll import tiny_llama
from test_init import _bits, _spec

from loraplace.adapters import check_init, save_base_weights, unload_adapters
from loraplace.errors import LoraplaceError
from loraplace.methods import INITIALISERS, method_of
from loraplace.methods.starts import A_KEY, B_KEY, START_SEED
from loraplace.placement.params import trainable_params
from loraplace.placement.resolve import resolve_placement
from loraplace.placement.strategies import parse_strategy
from loraplace.records import RunSpec

STRATEGY = "attention[r=2]+mlp.down[r=4]"  # mixed ranks: a rank_pattern


def _placement(model, strategy: str = STRATEGY):
    return resolve_placement(model, parse_strategy(strategy), 4, 8.0)


def _run_wrap(model, strategy: str, state: dict):
    """The model wrapped as a run wraps an arm with a data-driven init: the method's config (PEFT's
    default init), the base weights saved, then the stored state applied by the method."""
    spec: RunSpec = _spec(strategy)
    placement, config, _ = method_of(strategy).adapters(model, spec, "CAUSAL_LM")
    saved = save_base_weights(model, placement, parse_strategy(strategy).init)
    peft_model = get_peft_model(model, config)
    init = parse_strategy(strategy).init
    INITIALISERS.get_entry(init).apply(peft_model, state)
    return peft_model, placement, saved


def _peft_directly(model, init: str, batch):
    """PEFT's own LoRA-GA / CorDA, called as its documentation shows, targets and ranks written out."""
    extra = {"lora_ga_config": LoraGAConfig()} if init == "lora_ga" else {
        "corda_config": CordaConfig(corda_method="ipm", verbose=False)}
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, task_type="CAUSAL_LM",
                        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"],
                        rank_pattern={"q_proj": 2, "k_proj": 2, "v_proj": 2, "o_proj": 2}, init_lora_weights=init,
                        **extra)
    torch.manual_seed(START_SEED)
    if init == "lora_ga":
        def train_step():
            for b in batch:
                model(**b).loss.backward()
        preprocess_loraga(model, config, train_step)
    else:
        @torch.no_grad()
        def run_model():  # one example per pass, padding removed, as CorDA calibrates
            for b in batch:
                for ids, mask in zip(b["input_ids"], b["attention_mask"]):
                    model(input_ids=ids[mask.bool()][None])
        preprocess_corda(model, config, run_model=run_model)
    return get_peft_model(model, config)


def _named(peft_model, what: str) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in peft_model.named_parameters() if what in n}


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")
@pytest.mark.parametrize("init", ["lora_ga", "corda"])
def test_the_stored_start_is_what_peft_makes_and_the_model_starts_at_the_base(init):
    batch = one_batch()
    model = tiny_llama()
    reference_model = copy.deepcopy(model)
    base_logits = model(input_ids=batch[0]["input_ids"]).logits
    before = {k: _bits(v) for k, v in model.state_dict().items()}
    strategy = f"attention[r=2]+mlp.down[r=4,init={init}]"
    placement = _placement(model, strategy)
    state = INITIALISERS.get_entry(init).compute(model, placement, batch, "CAUSAL_LM")
    # computing leaves the base model bit for bit as it was, with nothing attached
    assert [k for k, v in model.state_dict().items() if not torch.equal(_bits(v), before[k])] == []
    assert not any(hasattr(m, "_peft_loraga_grad") or hasattr(m, "eigens") for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())  # as tiny_llama made them
    assert sorted(state) == sorted(key.format(m.name) for m in placement.modules for key in (A_KEY, B_KEY))

    ours, placed, saved = _run_wrap(model, strategy, state)
    theirs = _peft_directly(reference_model, init, batch)
    lora_ours, lora_theirs = _named(ours, "lora_"), _named(theirs, "lora_")
    assert list(lora_ours) == list(lora_theirs) and len(lora_ours) == 2 * len(placement.modules)
    assert all(torch.equal(lora_ours[n], lora_theirs[n]) for n in lora_ours)
    assert all(lora_ours[n].abs().sum() > 0 for n in lora_ours if "lora_B" in n)  # B starts non-zero
    base_ours, base_theirs = _named(ours, "base_layer.weight"), _named(theirs, "base_layer.weight")
    assert list(base_ours) == list(base_theirs) and len(base_ours) == len(placement.modules)
    assert all(torch.equal(base_ours[n], base_theirs[n]) for n in base_ours)  # the residual W - s B A
    # the start re-parametrizes the base model: the same outputs, and the plan's parameter count
    torch.testing.assert_close(ours(input_ids=batch[0]["input_ids"]).logits, base_logits, atol=1e-4, rtol=1e-4)
    assert trainable_params(ours) == placed.lora_params
    method_of("attention").check_wrapped(ours, placed, trainable_params(ours))
    # unloading puts every rewritten weight back bit for bit
    assert len(saved) == len(placement.modules)
    restored = unload_adapters(ours, saved)
    assert [k for k, v in restored.state_dict().items() if not torch.equal(_bits(v), before[k])] == []


def test_lora_ga_starts_along_the_gradients_top_singular_directions():
    """A0 spans the top right-singular directions of the loss gradient, and B0 the next left-singular
    ones (PEFT's ArB2r), the gradient computed here by autograd over the same batch."""
    batch = one_batch()
    model = tiny_llama()
    placement = _placement(model, "mlp.down[r=2]")
    state = INITIALISERS.get_entry("lora_ga").compute(model, placement, batch, "CAUSAL_LM")
    probe = copy.deepcopy(model)
    probe.zero_grad()
    probe(**batch[0]).loss.backward()
    for m in placement.modules:
        grad = probe.get_submodule(m.name).weight.grad.double()
        u, s, vh = torch.linalg.svd(grad, full_matrices=False)
        a, b = state[A_KEY.format(m.name)].double(), state[B_KEY.format(m.name)].double()
        # principal cosines between the row space of A0 and the top-2 right-singular vectors
        qa = torch.linalg.qr(a.T).Q
        assert torch.linalg.svdvals(qa.T @ vh[:2].T).min() > 0.99, m.name
        qb = torch.linalg.qr(b).Q
        assert torch.linalg.svdvals(qb.T @ u[:, 2:4]).min() > 0.99, m.name


def test_start_inits_are_refused_where_they_cannot_apply():
    model = tiny_llama()
    for init in ("lora_ga", "corda"):
        with pytest.raises(LoraplaceError, match="quantized base"):
            check_init(model, _placement(model, "attention"), init, quantization="nf4")
        with pytest.raises(LoraplaceError, match="tied to"):  # they rewrite the weight the embedding shares
            check_init(model, _placement(model, "attention+lm_head"), init)
    # a NaN in the data's gradient: one line, nothing left attached, the base untouched
    batch = one_batch()
    before = {k: _bits(v) for k, v in model.state_dict().items()}
    model.model.layers[0].mlp.down_proj.weight.data[0, 0] = float("nan")
    with pytest.raises(LoraplaceError, match="non-finite"):
        INITIALISERS.get_entry("lora_ga").compute(model, _placement(model, "mlp.down"), batch, "CAUSAL_LM")
    assert not any(hasattr(m, "_peft_loraga_grad") for m in model.modules())
    changed = [k for k, v in model.state_dict().items() if not torch.equal(_bits(v), before[k])]
    assert changed == ["model.layers.0.mlp.down_proj.weight"]  # only the NaN written here
