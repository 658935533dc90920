"""Eval-side levers keep the numbers: selective logits, all-token sums, length-grouped batches.

Tiny random-init Llama models from a config: no downloads, a few seconds.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from loraplace.data import IGNORE_INDEX, PadCollator
from loraplace.run.evaluation import evaluate_nll, token_nll, token_nll_all

PAD = 0


def tiny_llama(tie: bool = True):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=tie, pad_token_id=PAD)
    model = LlamaForCausalLM(config).eval()
    model.config.use_cache = False
    return model


def examples(n: int = 7, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        length = int(torch.randint(4, 20, (1,), generator=g))
        ids = torch.randint(1, 97, (length,), generator=g).tolist()
        prompt = int(torch.randint(1, length - 1, (1,), generator=g))
        out.append({"input_ids": ids, "labels": [IGNORE_INDEX] * prompt + ids[prompt:], "length": length})
    return out


class ListDataset(list):
    column_names = ("input_ids", "labels", "length")

    def __getitem__(self, key):
        if key == "length":
            return [ex["length"] for ex in self]
        return list.__getitem__(self, key)


def reference(model, batch):
    """Plain full-logits NLL per row over labels, over all real tokens, and over padding."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    nll = F.cross_entropy(logits[:, :-1].transpose(1, 2), batch["input_ids"][:, 1:], reduction="none")
    labels = batch["labels"][:, 1:]
    real = batch["attention_mask"][:, 1:].bool()
    return (nll * (labels != IGNORE_INDEX)).sum(1), (nll * real).sum(1), (nll * ~real).sum(1)


@pytest.mark.parametrize("tie", [True, False])
def test_selective_logits_equal_full_logits(tie):
    model = tiny_llama(tie)
    batch = PadCollator(PAD)(examples())
    with torch.no_grad():
        sel, n_sel = token_nll(model, batch, selective=True)
        full, n_full = token_nll(model, batch, selective=False)
        ref, _, _ = reference(model, batch)
    assert torch.equal(n_sel, n_full)
    torch.testing.assert_close(sel, full, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sel, ref, rtol=1e-5, atol=1e-5)


def test_all_token_sums_match_reference():
    model = tiny_llama()
    feats = examples()
    batch = PadCollator(PAD)(feats)
    with torch.no_grad():
        s, n, extra = token_nll_all(model, batch, PAD)
        s_sel, n_sel = token_nll(model, batch)
        ref_label, ref_all, ref_pad = reference(model, batch)
    torch.testing.assert_close(s, s_sel, rtol=1e-5, atol=1e-5)
    assert torch.equal(n, n_sel)
    torch.testing.assert_close(extra.nll_sum_all, ref_all, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(extra.nll_sum_pad, ref_pad, rtol=1e-5, atol=1e-5)
    width = batch["input_ids"].shape[1]
    assert extra.n_all.tolist() == [len(f["input_ids"]) - 1 for f in feats]
    assert extra.n_pad.tolist() == [width - len(f["input_ids"]) for f in feats]


def test_evaluate_nll_all_tokens_and_length_batches():
    model = tiny_llama()
    data = ListDataset(examples(11, seed=3))
    collator = PadCollator(PAD)
    kw = dict(batch_size=4, device=torch.device("cpu"), autocast_dtype=None)
    plain = evaluate_nll(model, data, collator, **kw)
    full = evaluate_nll(model, data, collator, all_tokens=True, **kw)
    grouped = evaluate_nll(model, data, collator, by_length=True, **kw)
    assert plain.nll_sums_all == [] and plain.n_pad == []
    assert full.n_tokens == plain.n_tokens and grouped.n_tokens == plain.n_tokens
    assert full.batch_of == plain.batch_of == [i // 4 for i in range(11)]
    assert math.isclose(full.loss, plain.loss, rel_tol=1e-5)
    assert math.isclose(grouped.loss, plain.loss, rel_tol=1e-5)
    for i, ex in enumerate(data):  # dataset order is kept, whatever the batching
        assert full.n_tokens_all[i] == ex["length"] - 1
        assert plain.nll_sums[i] == pytest.approx(grouped.nll_sums[i], rel=1e-4)
    longest = [max(data[j]["length"] for j in range(len(data)) if j // 4 == b) for b in range(3)]
    assert full.n_pad == [longest[i // 4] - data[i]["length"] for i in range(11)]
    expected_pad = padding_nll_by_hand(model, [[data[j]["input_ids"] for j in range(b * 4, min(b * 4 + 4, 11))]
                                              for b in range(3)])
    assert sum(n > 0 for n in full.n_pad) >= 5
    assert full.nll_sums_pad == pytest.approx(expected_pad, rel=1e-5, abs=1e-5)
    assert len(set(grouped.batch_of)) == 3


def padding_nll_by_hand(model, batches: list[list[list[int]]]) -> list[float]:
    """Per example, in order: the NLL of predicting the pad token at each padding position j of its
    right-padded batch row, from the log-softmax of the model's logits at position j-1."""
    out = []
    with torch.no_grad():
        for rows in batches:
            width = max(len(r) for r in rows)
            ids = torch.tensor([r + [PAD] * (width - len(r)) for r in rows])
            mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
            logp = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits.double(), dim=-1)
            for i, r in enumerate(rows):
                out.append(-sum(logp[i, j - 1, PAD].item() for j in range(len(r), width)))
    return out


def test_chunked_vocab_projection_same_numbers(monkeypatch):
    """The vocabulary projection in blocks of positions (no (B, T, V) logits) gives the numbers of
    the unchunked projection: all-token and padding sums per row, and token_nll without gradients."""
    import loraplace.run.evaluation as ev

    model = tiny_llama()
    batch = PadCollator(PAD)(examples(9, seed=5))
    width = batch["input_ids"].shape[1]
    with torch.no_grad():
        s0, n0, e0 = token_nll_all(model, batch, PAD, chunk=10**9)
        s1, n1, e1 = token_nll_all(model, batch, PAD, chunk=3)
        t0, _ = token_nll(model, batch)
        monkeypatch.setattr(ev, "EVAL_CHUNK", 4)
        monkeypatch.setattr(ev._nll_chunked, "__defaults__", (4,))
        t1, _ = token_nll(model, batch)
        _, ref_all, ref_pad = reference(model, batch)
    assert width > 3 and torch.equal(n0, n1)
    torch.testing.assert_close(s1, s0, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(e1.nll_sum_all, e0.nll_sum_all, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(e1.nll_sum_pad, e0.nll_sum_pad, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(e1.nll_sum_all, ref_all, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(e1.nll_sum_pad, ref_pad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(t1, t0, rtol=1e-6, atol=1e-6)


def test_all_token_sums_make_no_full_logits(monkeypatch):
    """No vocabulary projection sees more than ``chunk`` positions in the all-token sums."""
    model = tiny_llama()
    batch = PadCollator(PAD)(examples(6, seed=2))
    head = model.get_output_embeddings()
    seen = []
    hook = head.register_forward_hook(lambda m, i, o: seen.append(tuple(o.shape)))
    try:
        with torch.no_grad():
            token_nll_all(model, batch, PAD, chunk=5)
    finally:
        hook.remove()
    assert seen and all(len(s) == 2 and s[0] <= 5 for s in seen)


def _loss_and_grads(model, batch, autocast: bool):
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        nll, n = token_nll(model, batch)
    loss = nll.sum() / n.sum()
    loss.backward()
    return nll.detach(), {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("autocast", [False, True])
def test_training_loss_in_blocks_keeps_loss_and_gradients(monkeypatch, autocast):
    """The training loss's vocabulary projection in recomputed blocks gives the loss and every
    parameter's gradient of the model's own full logits (a second code path), in float32 and
    under bf16 autocast, and keeps no tensor of N x vocab elements for backward."""
    import loraplace.run.evaluation as ev

    model = tiny_llama(tie=True).train()
    batch = PadCollator(PAD)(examples(9, seed=3))
    n_labelled = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    monkeypatch.setattr(ev, "TRAIN_CHUNK_ELEMENTS", 97 * 16)  # 16 positions per block
    assert n_labelled > 3 * ev.train_chunk(97)
    sizes = []

    def pack(t):
        sizes.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        nll, grads = _loss_and_grads(model, batch, autocast)
    # the reference: F.cross_entropy over the model's own (B, T, V) logits
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    labels = batch["labels"][:, 1:]
    ref = F.cross_entropy(logits[:, :-1].transpose(1, 2), labels, reduction="none", ignore_index=IGNORE_INDEX).sum(1)
    (ref.sum() / n_labelled).backward()
    tol = dict(rtol=2e-2, atol=2e-2) if autocast else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(nll, ref.detach(), **tol)
    for name, p in model.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(grads[name], p.grad, **tol, msg=name)
    def logits_saved():  # logits, their float copy, the log-softmax: (positions, 97)
        return [s for s in sizes if s and s[-1] == 97 and math.prod(s) > 16 * 97]

    assert logits_saved() == []  # no more than a block's positions kept for backward
    # and with blocks of everything at once, the same numbers (the unchunked path)
    monkeypatch.setattr(ev, "TRAIN_CHUNK_ELEMENTS", 10**9)
    sizes.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        nll_one, grads_one = _loss_and_grads(model, batch, autocast)
    assert logits_saved()  # (the check above can see them: the unchunked loss keeps (N, V) tensors)
    same = tol if autocast else dict(rtol=1e-5, atol=1e-6)  # bf16: a block's weight gradients add up in bf16
    torch.testing.assert_close(nll, nll_one, rtol=1e-6, atol=1e-5)
    for name in grads:
        torch.testing.assert_close(grads[name], grads_one[name], **same, msg=name)


@pytest.mark.parametrize("mask_dropout", ["peft", "mask", "shared"])
def test_blocks_recomputed_with_the_forwards_dropout_masks(monkeypatch, mask_dropout):
    """An adapted lm_head with LoRA dropout: the recomputation in backward uses the forward's masks,
    so the gradients are those of the logged loss, and it leaves the random stream where the
    forward left it (later masks unchanged). The reference runs the same blocks without
    recomputation (a plain call instead of the checkpoint), so it draws the same masks once.
    With PEFT's nn.Dropout, loraplace's own (MaskDropout, torch.rand) as in training, and shared masks
    (lora.dropout_masks=shared, whose cache must not hand the recomputation the forward's output)."""
    from peft import LoraConfig, get_peft_model

    import loraplace.run.evaluation as ev
    from loraplace.run.training import use_mask_dropout

    model = get_peft_model(tiny_llama(tie=False), LoraConfig(r=4, lora_alpha=8, lora_dropout=0.5,
                                                             target_modules=["lm_head", "q_proj"]))
    model.train()
    if mask_dropout != "peft":  # loraplace's own dropout, one mask per adapter or shared per input
        assert use_mask_dropout(model, shared=mask_dropout == "shared") > 0
    batch = PadCollator(PAD)(examples(9, seed=3))
    monkeypatch.setattr(ev, "TRAIN_CHUNK_ELEMENTS", 97 * 16)  # 16 positions per block
    assert int((batch["labels"][:, 1:] != IGNORE_INDEX).sum()) > 3 * ev.train_chunk(97)

    def run():
        torch.manual_seed(1234)
        nll, grads = _loss_and_grads(model, batch, autocast=False)
        return nll, grads, torch.rand(4)  # what the next dropout mask would draw from

    nll, grads, after = run()
    monkeypatch.setattr(ev, "checkpoint", lambda fn, *args, **kwargs: fn(*args))  # same blocks, no recomputation
    ref_nll, ref_grads, ref_after = run()
    torch.testing.assert_close(nll, ref_nll, rtol=0, atol=0)
    assert set(grads) == set(ref_grads) and any("lm_head.lora_A" in k for k in grads)
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-6, atol=1e-7, msg=name)
    assert torch.equal(after, ref_after)
