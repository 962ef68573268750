#!/usr/bin/env python3
"""Makes the DeepSeek-V3.2 (DSA) reference fixture tests/data/tiny-v32 with Hugging Face transformers.

A random small `deepseek_v32` model (fp32, eager attention): 3 layers (1 dense + 2 MoE), group-limited sigmoid
routing with a non-zero selection bias, YaRN x4 with mscale_all_dim, and a lightning indexer per layer whose
`index_topk` (6) is far below the sequence length (24), so the DSA selection changes most rows' key sets.
Norm weights and LayerNorm biases are perturbed so that every term matters.

Writes config.json + model.safetensors (save_pretrained, hub layout), reference.safetensors (input_ids
[2, 24] int32, logits [2, 24, V] fp32, gen_prompt, gen_output = prompt + 16 greedy tokens from transformers'
cached generate(), `loss` = mean cross-entropy of logits[:, :-1] against input_ids[:, 1:] and `grad.<name>`
for every parameter by torch autograd, in the hub names; the indexer runs under no_grad in transformers, so its
gradients are absent, i.e. zero) and case.json. Refuses to write a fixture whose top-k selection is nearly tied anywhere
(torch.topk's tie order is implementation-defined, so a near tie would make the reference fragile).

Usage: python3 tools/make_v32_fixture.py OUT_DIR
"""
import json
import sys
from pathlib import Path

import numpy as np
import torch
import transformers
from safetensors.numpy import save_file
from transformers.models.deepseek_v32 import modeling_deepseek_v32 as mv32

CFG = dict(
    vocab_size=256, hidden_size=48, intermediate_size=96, moe_intermediate_size=24, num_hidden_layers=3,
    num_attention_heads=4, num_key_value_heads=4, q_lora_rank=32, kv_lora_rank=24, qk_nope_head_dim=8,
    qk_rope_head_dim=8, v_head_dim=12, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2,
    n_group=4, topk_group=2, routed_scaling_factor=2.5, norm_topk_prob=True, first_k_dense_replace=1,
    max_position_embeddings=128, rms_norm_eps=1e-6, initializer_range=0.1, tie_word_embeddings=False,
    bos_token_id=0, eos_token_id=1, index_topk=6, index_head_dim=16, index_n_heads=8,
    rope_parameters=dict(rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=32,
                         beta_fast=32.0, beta_slow=1.0, mscale=1.0, mscale_all_dim=1.0),
)
B, T, GEN_PROMPT, GEN_NEW = 2, 24, 8, 16

min_gap = [float("inf")]


def check_margin(orig):
    """Wraps the indexer: records the smallest gap between the k-th and (k+1)-th visible index score."""

    def forward(self, hidden_states, q_resid, position_embeddings, attention_mask, position_ids, cache=None):
        idx = orig(self, hidden_states, q_resid, position_embeddings, attention_mask, position_ids, cache=cache)
        # Recompute the scores the same way to measure the selection margin (the cache already holds the keys).
        bsz, s, _ = hidden_states.shape
        cos, sin = position_embeddings
        q = self.wq_b(q_resid).view(bsz, s, self.n_heads, self.head_dim)
        q_rot, q_pass = torch.split(q, [self.qk_rope_head_dim, self.head_dim - self.qk_rope_head_dim], dim=-1)
        q_rot, _ = mv32.apply_rotary_pos_emb(q_rot, q_rot, cos, sin, unsqueeze_dim=2)
        q = torch.cat([q_rot, q_pass], dim=-1)
        k = cache.layers[self.layer_idx].indexer_keys if cache is not None else None
        if k is None:
            kk = self.k_norm(self.wk(hidden_states)).unsqueeze(2)
            k_rot, k_pass = torch.split(kk, [self.qk_rope_head_dim, self.head_dim - self.qk_rope_head_dim], dim=-1)
            k_rot, _ = mv32.apply_rotary_pos_emb(k_rot, k_rot, cos, sin, unsqueeze_dim=2)
            k = torch.cat([k_rot, k_pass], dim=-1).squeeze(2)
        sc = torch.relu(torch.matmul(q, k.transpose(-1, -2).unsqueeze(1)) * self.softmax_scale)
        w = self.weights_proj(hidden_states) * self.n_heads ** -0.5
        scores = torch.matmul(w.unsqueeze(-2), sc).squeeze(-2)  # [B, S, T]
        visible = attention_mask == 0 if attention_mask.dtype != torch.bool else attention_mask
        for b in range(bsz):
            for i in range(s):
                v = scores[b, i][visible[b, i]].sort(descending=True).values
                if v.numel() > self.index_topk:
                    min_gap[0] = min(min_gap[0], float(v[self.index_topk - 1] - v[self.index_topk]))
        return idx

    return forward


def main():
    out = Path(sys.argv[1])
    config = transformers.DeepseekV32Config(**CFG)
    torch.manual_seed(20260)
    model = transformers.DeepseekV32ForCausalLM(config).eval()
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name:
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            elif name.endswith("k_norm.bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.05 * torch.rand(b.shape, generator=g))
    model.save_pretrained(out)
    model = transformers.DeepseekV32ForCausalLM.from_pretrained(out, dtype=torch.float32,
                                                                attn_implementation="eager").eval()
    mv32.DeepseekV32Indexer.forward = check_margin(mv32.DeepseekV32Indexer.forward)
    rng = np.random.default_rng(11)
    ids = rng.integers(2, CFG["vocab_size"], size=(B, T), dtype=np.int32)
    with torch.no_grad():
        logits = model(torch.from_numpy(ids).long(), use_cache=False).logits.numpy()
        prompt = torch.from_numpy(ids[:1, :GEN_PROMPT]).long()
        gen = model.generate(prompt, max_new_tokens=GEN_NEW, do_sample=False, min_new_tokens=GEN_NEW,
                             attention_mask=torch.ones_like(prompt))
    if not min_gap[0] > 1e-4:
        sys.exit(f"top-k selection margin {min_gap[0]} is too small: pick another seed")
    # Loss and gradients (fp32 autograd), experts split into the hub's per-expert names.
    model.zero_grad()
    x = torch.from_numpy(ids).long()
    lg = model(x, use_cache=False).logits
    loss = torch.nn.functional.cross_entropy(lg[:, :-1].reshape(-1, lg.shape[-1]), x[:, 1:].reshape(-1))
    loss.backward()
    ref = {"input_ids": ids, "logits": logits.astype(np.float32), "gen_prompt": ids[0, :GEN_PROMPT].copy(),
           "gen_output": gen[0].numpy().astype(np.int32), "loss": np.array([loss.item()], dtype=np.float32)}
    I = CFG["moe_intermediate_size"]
    for name, p in model.named_parameters():
        g = (p.grad if p.grad is not None else torch.zeros_like(p)).detach().float().numpy()
        if name.endswith("mlp.experts.gate_up_proj"):  # [E, 2I, H] = [gate; up]
            pre = name[: -len("gate_up_proj")]
            for e in range(g.shape[0]):
                ref[f"grad.{pre}{e}.gate_proj.weight"] = np.ascontiguousarray(g[e, :I])
                ref[f"grad.{pre}{e}.up_proj.weight"] = np.ascontiguousarray(g[e, I:])
        elif name.endswith("mlp.experts.down_proj"):  # [E, H, I]
            pre = name[: -len("down_proj")]
            for e in range(g.shape[0]):
                ref[f"grad.{pre}{e}.down_proj.weight"] = np.ascontiguousarray(g[e])
        else:
            ref["grad." + name] = g
    save_file(ref, str(out / "reference.safetensors"))
    case = {"case": out.name,
            "description": "DeepSeek-V3.2: 3 layers (1 dense + 2 MoE), lightning indexer top-6 of 24 tokens, YaRN x4",
            "batch": B, "seq": T, "gen_prompt_len": GEN_PROMPT, "gen_new_tokens": GEN_NEW,
            "min_topk_margin": min_gap[0],
            "reference": f"transformers {transformers.__version__} DeepseekV32ForCausalLM, float32, eager attention,"
                         f" torch {torch.__version__}"}
    (out / "case.json").write_text(json.dumps(case, indent=2) + "\n")
    print(json.dumps(case))


if __name__ == "__main__":
    main()
