"""dsv3 against Hugging Face transformers on configs that are not in the fixtures.

Each case builds a DeepseekV3ForCausalLM with random weights (perturbed norms and selection biases so that
every term matters), saves it with save_pretrained (hub layout), then compares `dsv3 logits` (fp32) with
transformers' logits (fp32, eager attention) and `dsv3 generate` greedy output with transformers' cached
greedy generation. Tolerance: ||logits - ref|| / ||ref|| <= 1e-4 (what the issue requires of fp32 compute).
"""
import json
import subprocess

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from safetensors.numpy import load_file, save_file  # noqa: E402

BASE = dict(
    vocab_size=512, hidden_size=64, intermediate_size=160, moe_intermediate_size=32, num_hidden_layers=3,
    num_attention_heads=4, num_key_value_heads=4, q_lora_rank=48, kv_lora_rank=32, qk_nope_head_dim=16,
    qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2,
    n_group=2, topk_group=1, routed_scaling_factor=2.5, norm_topk_prob=True, first_k_dense_replace=1,
    max_position_embeddings=256, rope_theta=10000.0, rms_norm_eps=1e-6, initializer_range=0.05,
    topk_method="noaux_tc", scoring_func="sigmoid", rope_interleave=True, tie_word_embeddings=False,
    bos_token_id=0, eos_token_id=1, num_nextn_predict_layers=0,
)

CASES = {
    "q_proj_no_shared": dict(q_lora_rank=None, n_shared_experts=0, n_group=1, topk_group=1),
    "all_moe_unnormalized": dict(first_k_dense_replace=0, norm_topk_prob=False, routed_scaling_factor=1.7,
                                 n_routed_experts=12, n_group=4, topk_group=2, num_experts_per_tok=3),
    "four_layers_two_dense": dict(first_k_dense_replace=2, num_hidden_layers=4, n_group=4, topk_group=3,
                                  num_experts_per_tok=4),
    "yarn_mscale_all_dim": dict(rope_scaling=dict(type="yarn", factor=8.0, original_max_position_embeddings=32,
                                                  beta_fast=32, beta_slow=1, mscale=0.707, mscale_all_dim=0.707),
                                max_position_embeddings=256),
    "two_shared_wide_heads": dict(n_shared_experts=2, num_attention_heads=6, num_key_value_heads=6,
                                  qk_nope_head_dim=24, qk_rope_head_dim=16, v_head_dim=20, kv_lora_rank=40),
}


def make_model(tmp_path, overrides, dtype):
    cfg = dict(BASE)
    cfg.update(overrides)
    config = transformers.DeepseekV3Config(**cfg)
    torch.manual_seed(1234)
    model = transformers.DeepseekV3ForCausalLM(config).eval()
    g = torch.Generator().manual_seed(99)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name:
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.05 * torch.rand(b.shape, generator=g))  # keeps biased scores positive
    out = tmp_path / "model"
    model.to(dtype).save_pretrained(out)
    model = transformers.DeepseekV3ForCausalLM.from_pretrained(out, dtype=torch.float32,
                                                               attn_implementation="eager").eval()
    return model, out, cfg


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_and_greedy_match_transformers(tmp_path, dsv3_bin, case):
    dtype = torch.bfloat16 if case.startswith("two_shared") else torch.float32
    model, mdir, cfg = make_model(tmp_path, CASES[case], dtype)
    rng = np.random.default_rng(7)
    T = 90 if "yarn" in case else 20
    ids = rng.integers(2, cfg["vocab_size"], size=(2, T), dtype=np.int32)
    save_file({"input_ids": ids}, str(tmp_path / "in.safetensors"))
    subprocess.run([dsv3_bin, "logits", "--model", str(mdir), "--input", str(tmp_path / "in.safetensors"),
                    "--output", str(tmp_path / "out.safetensors")], check=True)
    got = load_file(str(tmp_path / "out.safetensors"))["logits"]
    with torch.no_grad():
        ref = model(torch.from_numpy(ids).long()).logits.numpy()
    rel = np.linalg.norm(got - ref) / np.linalg.norm(ref)
    assert rel <= 1e-4, f"{case}: logits rel error {rel}"

    prompt = ids[0, :7].tolist()
    with torch.no_grad():
        gen = model.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False, eos_token_id=None,
                             pad_token_id=0)[0, len(prompt):].tolist()
    r = subprocess.run([dsv3_bin, "generate", "--model", str(mdir), "--prompt-ids", ",".join(map(str, prompt)),
                        "--max-new-tokens", "12", "--temperature", "0", "--json"], check=True, capture_output=True,
                       text=True)
    assert json.loads(r.stdout)["output_ids"] == gen, case
