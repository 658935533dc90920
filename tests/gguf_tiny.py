"""A tiny Llama written as a GGUF file with the ``gguf`` package's writer (float32 tensors and a
byte-level BPE tokenizer in its metadata): for the tests of GGUF model input, without downloads."""

from __future__ import annotations

import numpy as np


def write_tiny_gguf(path, hidden=32, layers=2, heads=4, kv=2, ff=64, seed=0):
    import gguf

    rng = np.random.default_rng(seed)
    # byte-level BPE vocabulary: printable bytes as GPT-2 maps them, plus a few merges
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("\u00a1"), ord("\u00ac") + 1)) + list(range(ord("\u00ae"), ord("\u00ff") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b); cs.append(256 + n); n += 1
    chars = [chr(c) for c in cs]
    merges = ["Ġ t", "Ġ a", "h e", "i n", "r e", "o n", "Ġt he", "e r"]
    tokens = ["<|endoftext|>"] + chars + [m.replace(" ", "") for m in merges]
    V = len(tokens)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(512); w.add_embedding_length(hidden); w.add_block_count(layers)
    w.add_feed_forward_length(ff); w.add_head_count(heads); w.add_head_count_kv(kv)
    w.add_rope_dimension_count(hidden // heads); w.add_layer_norm_rms_eps(1e-5); w.add_vocab_size(V)
    w.add_rope_freq_base(10000.0)
    w.add_tokenizer_model("gpt2"); w.add_tokenizer_pre("default"); w.add_token_list(tokens)
    w.add_token_types([3] + [1] * (V - 1)); w.add_token_merges(merges)
    w.add_bos_token_id(0); w.add_eos_token_id(0)
    d = hidden // heads
    t = lambda *s: (rng.standard_normal(s) * 0.05).astype(np.float32)
    w.add_tensor("token_embd.weight", t(V, hidden))
    for i in range(layers):
        w.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(hidden, np.float32))
        w.add_tensor(f"blk.{i}.attn_q.weight", t(heads * d, hidden))
        w.add_tensor(f"blk.{i}.attn_k.weight", t(kv * d, hidden))
        w.add_tensor(f"blk.{i}.attn_v.weight", t(kv * d, hidden))
        w.add_tensor(f"blk.{i}.attn_output.weight", t(hidden, heads * d))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(hidden, np.float32))
        w.add_tensor(f"blk.{i}.ffn_gate.weight", t(ff, hidden))
        w.add_tensor(f"blk.{i}.ffn_up.weight", t(ff, hidden))
        w.add_tensor(f"blk.{i}.ffn_down.weight", t(hidden, ff))
    w.add_tensor("output_norm.weight", np.ones(hidden, np.float32))
    w.add_tensor("output.weight", t(V, hidden))
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
