#!/usr/bin/env python3
"""Makes the DeepSeek-V4 forward fixture tests/data/tiny-v4-fwd with Hugging Face transformers.

A random small `deepseek_v4` model (fp32, eager attention, eager experts) with every layer type and enough
tokens for the compressors to matter: 5 layers (sliding, CSA, HCA, CSA, HCA), the first 2 hash-routed
(tid2eid), 3 mHC streams, CSA rate 4 with a lightning indexer keeping 3 entries, HCA rate 8, a window of 6
tokens (smaller than the HCA rate, so the window and the compressed entries do not overlap), YaRN on the
compress rope table. The reference sequences have 38 tokens: 9 closed CSA windows, 4 HCA windows, open
windows at the end. Every parameter that transformers initializes to a constant (norm weights, sinks,
position biases, mHC base / scale, selection biases) is perturbed so that every term matters.

Writes, under OUT_DIR: config.json + model.safetensors (save_pretrained: fp32, transformers' checkpoint
names), reference.safetensors (input_ids [2, 38] int32, logits [2, 38, V] fp32 of one forward per row,
gen_prompt [12] and gen_output = prompt + 24 greedy tokens from transformers' cached generate(), which
decodes through the compressor / indexer cache) and case.json (versions, the smallest selection margins).
Refuses a seed whose indexer or router top-k, or a greedy step, is nearly tied (torch.topk's tie order is
implementation-defined), so the reference is robust to fp32 summation order.

Usage: python3 tools/make_v4_logits_fixture.py OUT_DIR [SEED]
"""
import json
import sys
from pathlib import Path

import numpy as np
import torch
import transformers
from safetensors.numpy import save_file
from transformers.models.deepseek_v4 import modeling_deepseek_v4 as mv4

CFG = dict(
    vocab_size=128, hidden_size=32, moe_intermediate_size=32, num_hidden_layers=5, num_attention_heads=4,
    head_dim=32, q_lora_rank=24, num_experts_per_tok=2, n_routed_experts=4, o_groups=2, o_lora_rank=16,
    sliding_window=6, index_n_heads=8, index_head_dim=16, index_topk=3, hc_mult=3, hc_sinkhorn_iters=20,
    max_position_embeddings=256, routed_scaling_factor=1.5, rope_theta=10000.0, compress_rope_theta=160000.0,
    partial_rotary_factor=0.25, swiglu_limit=0.5, initializer_range=0.2,
    layer_types=["sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention",
                 "compressed_sparse_attention", "heavily_compressed_attention"],
    mlp_layer_types=["hash_moe", "hash_moe", "moe", "moe", "moe"],
    compress_rates={"compressed_sparse_attention": 4, "heavily_compressed_attention": 8},
    rope_parameters=dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=16, beta_fast=32,
                         beta_slow=1),
    bos_token_id=0, eos_token_id=1, tie_word_embeddings=False,
)
B, T, GEN_PROMPT, GEN_NEW = 2, 38, 12, 24
margins = {"indexer": float("inf"), "router": float("inf"), "greedy": float("inf")}
_positions = [None]


def watch_margins():
    """Wraps the indexer and the router to record the smallest gap between the k-th and (k+1)-th candidate."""
    idx_fwd, scorer_fwd, router_fwd = mv4.DeepseekV4Indexer.forward, mv4.DeepseekV4IndexerScorer.forward, \
        mv4.DeepseekV4TopKRouter.forward

    def indexer(self, hidden_states, q_residual, position_ids, cache, layer_idx):
        _positions[0] = position_ids
        return idx_fwd(self, hidden_states, q_residual, position_ids, cache, layer_idx)

    def scorer(self, q, compressed_kv, hidden_states):
        s = scorer_fwd(self, q, compressed_kv, hidden_states)  # [B, S, T_e]
        k = CFG["index_topk"]
        m = CFG["compress_rates"]["compressed_sparse_attention"]
        visible = (_positions[0] + 1) // m  # [B, S]
        for b in range(s.shape[0]):
            for i in range(s.shape[1]):
                v = s[b, i, : int(visible[b, i])].sort(descending=True).values
                if v.numel() > k:
                    margins["indexer"] = min(margins["indexer"], float(v[k - 1] - v[k]))
        return s

    def router(self, hidden_states):
        out = router_fwd(self, hidden_states)
        logits = out[0]
        sel = (self.score_fn(logits) + self.e_score_correction_bias).sort(dim=-1, descending=True).values
        margins["router"] = min(margins["router"], float((sel[:, self.top_k - 1] - sel[:, self.top_k]).min()))
        return out

    mv4.DeepseekV4Indexer.forward = indexer
    mv4.DeepseekV4IndexerScorer.forward = scorer
    mv4.DeepseekV4TopKRouter.forward = router


def main():
    out = Path(sys.argv[1])
    seed = int(sys.argv[2]) if len(sys.argv) > 2 else 7
    out.mkdir(parents=True, exist_ok=True)
    config = transformers.DeepseekV4Config(**CFG)
    torch.manual_seed(seed)
    model = transformers.DeepseekV4ForCausalLM(config).eval()
    g = torch.Generator().manual_seed(1000 + seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name:
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            elif name.endswith("sinks") or name.endswith("position_bias") or name.endswith(".base") or \
                    name.endswith("hc_base"):
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
            elif name.endswith(".scale") or name.endswith("hc_scale"):
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=g))
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.1 * torch.rand(b.shape, generator=g))
            elif name.endswith("tid2eid"):  # distinct experts per token
                b.copy_(torch.stack([torch.randperm(CFG["n_routed_experts"], generator=g)[: CFG["num_experts_per_tok"]]
                                     for _ in range(CFG["vocab_size"])]))
    model.save_pretrained(out)
    model = transformers.DeepseekV4ForCausalLM.from_pretrained(out, dtype=torch.float32, attn_implementation="eager",
                                                               experts_implementation="eager").eval()
    watch_margins()
    rng = np.random.default_rng(seed)
    ids = rng.integers(2, CFG["vocab_size"], size=(B, T), dtype=np.int32)
    with torch.no_grad():
        logits = np.stack([model(torch.from_numpy(ids[b:b + 1]).long()).logits[0].numpy() for b in range(B)])
        prompt = torch.from_numpy(ids[:1, :GEN_PROMPT]).long()
        gen = model.generate(prompt, max_new_tokens=GEN_NEW, do_sample=False, eos_token_id=None, pad_token_id=0,
                             attention_mask=torch.ones_like(prompt), output_scores=True, return_dict_in_generate=True)
    for s in gen.scores:  # greedy margin: best minus second-best logit of each step
        v = s[0].sort(descending=True).values
        margins["greedy"] = min(margins["greedy"], float(v[0] - v[1]))
    seqs = gen.sequences[0].numpy().astype(np.int32)
    if len(seqs) != GEN_PROMPT + GEN_NEW:
        sys.exit(f"generate stopped after {len(seqs) - GEN_PROMPT} tokens")
    for k, v in margins.items():
        if not v > 1e-4:
            sys.exit(f"{k} selection margin {v} is too small: pick another seed")
    save_file({"input_ids": ids, "logits": logits.astype(np.float32), "gen_prompt": ids[0, :GEN_PROMPT].copy(),
               "gen_output": seqs}, str(out / "reference.safetensors"))
    case = {"case": out.name, "seed": seed,
            "description": "DeepSeek-V4: 5 layers (sliding, CSA, HCA, CSA, HCA), 2 hash layers, 3 mHC streams, "
                           "CSA m=4 top-3, HCA m'=8, window 6, YaRN x4 on the compress table, 38 tokens",
            "batch": B, "seq": T, "gen_prompt_len": GEN_PROMPT, "gen_new_tokens": GEN_NEW,
            "min_margins": margins,
            "reference": f"transformers {transformers.__version__} DeepseekV4ForCausalLM, float32, eager attention "
                         f"and experts, torch {torch.__version__}"}
    (out / "case.json").write_text(json.dumps(case, indent=2) + "\n")
    print(json.dumps(case))


if __name__ == "__main__":
    main()
