"""Training-side speed levers keep results correct: bf16 frozen base weights under autocast give
the same numbers as float32 weights under autocast, adapters stay float32, and the base model
comes back in float32 so the next run's adapters are created as before."""

import torch
from peft import LoraConfig, get_peft_model
from test_evaluation_nll import PAD, ListDataset, examples, tiny_llama

from loraplace.config import TrainSettings
from loraplace.data import PadCollator
from loraplace.run.evaluation import token_nll
from loraplace.run.training import frozen_weights_as, train_adapters

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def peft_tiny(seed=0):
    base = tiny_llama()
    torch.manual_seed(seed)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=TARGETS,
                                            task_type="CAUSAL_LM"))
    for name, p in model.named_parameters():  # non-zero B so that the adapters matter
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.02)
    return base, model


def loss_and_grads(model, batch, autocast_dtype=None):
    """One token-mean loss and its adapter gradients (cleared afterwards), optionally under autocast."""
    with torch.autocast("cpu", dtype=autocast_dtype, enabled=autocast_dtype is not None):
        s, n = token_nll(model, batch)
    loss = s.sum() / n.sum()
    loss.backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


def test_bf16_frozen_weights_same_loss_and_grads_under_autocast():
    base, model = peft_tiny()
    model.train()
    batch = PadCollator(PAD)(examples())
    ref_loss, ref_grads = loss_and_grads(model, batch, torch.bfloat16)
    with frozen_weights_as(model, torch.bfloat16):
        lora = [p for n, p in model.named_parameters() if "lora_" in n]
        frozen = [m.base_layer.weight for m in model.modules() if hasattr(m, "base_layer") and hasattr(m.base_layer, "weight")]
        assert lora and all(p.dtype == torch.float32 and p.requires_grad for p in lora)
        assert frozen and all(w.dtype == torch.bfloat16 for w in frozen)
        assert base.get_input_embeddings().weight.dtype == torch.float32  # tied head stays float32
        assert all(m.weight.dtype == torch.float32 for n, m in base.named_modules() if n.endswith("norm"))
        loss, grads = loss_and_grads(model, batch, torch.bfloat16)
    torch.testing.assert_close(loss, ref_loss, rtol=0, atol=0)
    for k in ref_grads:
        torch.testing.assert_close(grads[k], ref_grads[k], rtol=0, atol=0)
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_base_comes_back_float32_and_new_adapters_start_float32():
    base, model = peft_tiny()
    with frozen_weights_as(model, torch.bfloat16):
        pass
    model.unload()
    torch.manual_seed(1)
    again = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, task_type="CAUSAL_LM"))
    fresh_base = tiny_llama()
    torch.manual_seed(1)
    fresh = get_peft_model(fresh_base, LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, task_type="CAUSAL_LM"))
    a = {n: p for n, p in again.named_parameters() if "lora_A" in n}
    b = {n: p for n, p in fresh.named_parameters() if "lora_A" in n}
    assert a.keys() == b.keys()
    for n in a:  # identical float32 initialisation, not rounded through bfloat16
        assert a[n].dtype == torch.float32
        torch.testing.assert_close(a[n], b[n], rtol=0, atol=0)


def test_train_adapters_bf16_keeps_adapters_float32(tmp_path):
    _, model = peft_tiny()
    data = ListDataset(examples(16, seed=5))

    import datasets

    ds = datasets.Dataset.from_list(list(data))
    seen = []
    layer = model.get_base_model().model.layers[0].self_attn.q_proj.base_layer
    handle = layer.register_forward_hook(lambda mod, inp, out: seen.append((torch.is_grad_enabled(), out.dtype)))
    settings = TrainSettings(max_steps=2, batch_size=4, logging_steps=1, eval_every=0)
    out = train_adapters(model, ds, PadCollator(PAD), settings, seed=0, precision="bf16",
                         device=torch.device("cpu"), output_dir=tmp_path / "t")
    handle.remove()
    assert out.steps == 2 and out.real_tokens > 0
    trained = {dtype for grad, dtype in seen if grad}
    checked = {dtype for grad, dtype in seen if not grad}
    assert trained == {torch.bfloat16}  # the warm-up and training matmuls ran under bf16 autocast
    assert checked == {torch.float32}  # the selective-logits check: float32, no autocast, no grad
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_mask_dropout_matches_dropout_distribution():
    from loraplace.run.training import MaskDropout

    torch.manual_seed(0)
    x = torch.ones(200_000)
    drop = MaskDropout(0.1).train()
    y = drop(x)
    kept = y != 0
    assert abs(kept.float().mean().item() - 0.9) < 0.005
    torch.testing.assert_close(y[kept], torch.full_like(y[kept], 1 / 0.9))
    assert abs(y.mean().item() - 1.0) < 0.01  # unbiased, like nn.Dropout
    assert torch.equal(drop.eval()(x), x)


def test_use_mask_dropout_swaps_peft_dropout():
    from loraplace.run.training import MaskDropout, use_mask_dropout

    base = tiny_llama()
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules=TARGETS,
                                            task_type="CAUSAL_LM"))
    assert use_mask_dropout(model) == 2 * len(TARGETS)  # 2 layers
    assert all(isinstance(m.lora_dropout["default"], MaskDropout) for m in model.modules() if hasattr(m, "lora_dropout"))


def test_eager_attention_same_loss_as_sdpa_and_restored():
    from loraplace.run.training import attention_as

    _, model = peft_tiny()
    batch = PadCollator(PAD)(examples())
    base = model.get_base_model()
    assert base.config._attn_implementation == "sdpa"
    with torch.no_grad():
        ref, _ = token_nll(model, batch)
        with attention_as(model, "eager") as used:
            assert used == "eager" and base.config._attn_implementation == "eager"
            eager, _ = token_nll(model, batch)
    assert base.config._attn_implementation == "sdpa"
    torch.testing.assert_close(eager, ref, rtol=1e-4, atol=1e-4)


def peft_dropout(targets=TARGETS, shared=True, p=0.3):
    from loraplace.run.training import use_mask_dropout

    base = tiny_llama()
    torch.manual_seed(0)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, lora_dropout=p, target_modules=list(targets),
                                            task_type="CAUSAL_LM"))
    for name, q in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(q, std=0.02)
    use_mask_dropout(model, shared=shared)
    return base, model.train()


def dropout_outputs(model, batch):
    """(module name, input, output) of every LoRA dropout call in one training forward."""
    calls = []
    hooks = [m.lora_dropout["default"].register_forward_hook(lambda mod, i, o, n=n: calls.append((n, i[0], o)))
             for n, m in model.named_modules() if hasattr(m, "lora_dropout")]
    try:
        token_nll(model, batch)
    finally:
        for h in hooks:
            h.remove()
    return calls


def test_shared_masks_only_between_adapters_of_one_input():
    """q/k/v of a layer read one tensor and get one dropout output; gate/up likewise; o and down
    (each the only reader of its input) and different layers never share."""
    _, model = peft_dropout()
    calls = dropout_outputs(model, PadCollator(PAD)(examples()))
    out = {name.split("model.layers.")[1]: o for name, _, o in calls}
    for layer in ("0", "1"):
        a = f"{layer}.self_attn."
        m = f"{layer}.mlp."
        assert out[a + "q_proj"] is out[a + "k_proj"] is out[a + "v_proj"]
        assert out[m + "gate_proj"] is out[m + "up_proj"]
        distinct = [out[a + "q_proj"], out[a + "o_proj"], out[m + "gate_proj"], out[m + "down_proj"]]
        assert len({id(t) for t in distinct}) == 4
    assert out["0.self_attn.q_proj"] is not out["1.self_attn.q_proj"]
    # independent masks: every adapter its own output
    _, independent = peft_dropout(shared=False)
    calls = dropout_outputs(independent, PadCollator(PAD)(examples()))
    assert len({id(o) for _, _, o in calls}) == len(calls) == 2 * len(TARGETS)


def test_shared_mask_keeps_each_adapters_dropout():
    """Each adapter's input is still kept with probability 1 - p and scaled by 1 / (1 - p)."""
    from loraplace.run.training import MaskDropout, SharedMasks

    torch.manual_seed(0)
    masks = SharedMasks()
    q, k = MaskDropout(0.3, masks).train(), MaskDropout(0.3, masks).train()
    x = torch.ones(400_000)
    y = q(x)
    assert k(x) is y  # the sibling reads the same tensor: the same draw
    kept = y != 0
    assert abs(kept.float().mean().item() - 0.7) < 0.005
    torch.testing.assert_close(y[kept], torch.full_like(y[kept], 1 / 0.7))
    x2 = x.clone()
    assert k(x2) is not y  # another tensor (same values) draws its own
    x.mul_(1.0)
    assert q(x) is not y  # modified in place since: drawn again
    assert torch.equal(q.eval()(x), x)


def test_shared_mask_bf16_output_is_autocasts_own_cast():
    """Where no two adapters read one tensor (only o_proj and down_proj adapted), shared masks draw
    the same random numbers as independent ones; the dropout output cast to bf16 once gives the
    loss and gradients of autocast's cast in lora_A, bit for bit."""
    batch = PadCollator(PAD)(examples())
    results = []
    for shared in (False, True):
        _, model = peft_dropout(targets=("o_proj", "down_proj"), shared=shared)
        torch.manual_seed(7)
        results.append(loss_and_grads(model, batch, torch.bfloat16))
    (ref_loss, ref_grads), (loss, grads) = results
    assert torch.equal(loss, ref_loss)
    for k in ref_grads:
        assert torch.equal(grads[k], ref_grads[k]), k


def test_shared_masks_same_under_gradient_checkpointing():
    """The recomputation of a checkpointed layer draws the same shared masks as its forward:
    loss and gradients equal with checkpointing on and off (same seed), float32 and bf16."""
    from loraplace.run.training import checkpointing

    batch = PadCollator(PAD)(examples())
    for dtype in (None, torch.bfloat16):
        _, model = peft_dropout()
        torch.manual_seed(3)
        ref_loss, ref_grads = loss_and_grads(model, batch, dtype)
        torch.manual_seed(3)
        with checkpointing(model, True):
            loss, grads = loss_and_grads(model, batch, dtype)
        torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-6)
        for k in ref_grads:
            torch.testing.assert_close(grads[k], ref_grads[k], rtol=1e-5, atol=1e-6, msg=k)
