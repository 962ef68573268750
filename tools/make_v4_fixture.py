#!/usr/bin/env python3
"""Makes the DeepSeek-V4 checkpoint fixture tests/data/tiny-v4 (config parsing and quantized loading).

A random small `deepseek_v4` model from transformers (every layer type: sliding, CSA, HCA; one hash layer;
2 mHC streams), written in the release checkpoint layout the hub uses: release tensor names, FP8 e4m3 block
weights with UE8M0 (F8_E8M0) 128x128 scales, FP4 e2m1 routed experts packed two per int8 byte (low nibble =
even column) with one UE8M0 scale per 32 columns, the rest in bf16/fp32. The config.json uses the legacy keys of
the released files (compress_ratios with a trailing MTP entry, compress_rate_hca, num_hash_layers,
qk_rope_head_dim, a flat rope_scaling, top-level expert_dtype).

reference.json holds what transformers makes of that config (DeepseekV4Config: layer_types, mlp_layer_types,
compress_rates, rope_parameters, qk_rope_head_dim), the parameter count of transformers' model, and
reference.safetensors the dequantized fp32 values of a few quantized tensors, computed here with numpy from
the stored codes (the exact rule of the spec: code value x 2^(byte - 127)).

Usage: python3 tools/make_v4_fixture.py OUT_DIR
"""
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
import transformers
from safetensors.numpy import save_file as save_np
from safetensors.torch import load_file, save_file

CFG = dict(
    vocab_size=64, hidden_size=64, moe_intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
    head_dim=32, q_lora_rank=48, num_experts_per_tok=2, n_routed_experts=4, o_groups=2, o_lora_rank=16,
    sliding_window=8, index_n_heads=2, index_head_dim=16, index_topk=3, hc_mult=2, max_position_embeddings=512,
    routed_scaling_factor=1.5, rope_theta=10000.0, compress_rope_theta=160000.0,
)
LEGACY = dict(
    compress_ratios=[0, 4, 128, 4, 0],  # one extra trailing entry, as the released configs carry for MTP
    compress_rate_hca=8, num_hash_layers=1, qk_rope_head_dim=8,
    rope_scaling=dict(type="yarn", factor=4.0, original_max_position_embeddings=128, beta_fast=32, beta_slow=1),
)
FP4_LUT = np.array([0, .5, 1, 1.5, 2, 3, 4, 6, -0., -.5, -1, -1.5, -2, -3, -4, -6], dtype=np.float32)


def hub_name(n):
    """transformers save_pretrained name -> release name."""
    n = n.replace("model.embed_tokens.weight", "embed.weight").replace("model.norm.weight", "norm.weight")
    n = n.replace("model.hc_head.hc_", "hc_head_").replace("lm_head.weight", "head.weight")
    if n.startswith("model."):
        n = n[len("model."):]
    return n.replace(".attn.norm.weight", ".attn.kv_norm.weight")


def fp8_quant(w):
    """[N, K] fp32 -> e4m3 codes [N, K] and UE8M0 scales [ceil(N/128), ceil(K/128)] (power-of-two, amax/448)."""
    N, K = w.shape
    sn, sk = -(-N // 128), -(-K // 128)
    scale = torch.empty(sn, sk)
    q = torch.empty(N, K)
    for i in range(sn):
        for j in range(sk):
            blk = w[i * 128:(i + 1) * 128, j * 128:(j + 1) * 128]
            s = 2.0 ** torch.ceil(torch.log2(blk.abs().max().clamp_min(1e-30) / 448.0))
            scale[i, j] = s
            q[i * 128:(i + 1) * 128, j * 128:(j + 1) * 128] = blk / s
    codes = q.to(torch.float8_e4m3fn)
    return codes, scale.to(torch.float8_e8m0fnu)


def fp4_quant(w):
    """[N, K] fp32 -> packed int8 [N, K/2] and UE8M0 scales [N, K/32] (amax/6 rounded up to a power of two)."""
    N, K = w.shape
    blocks = w.view(N, K // 32, 32)
    s = 2.0 ** torch.ceil(torch.log2(blocks.abs().amax(-1).clamp_min(1e-30) / 6.0))
    x = (blocks / s[..., None]).view(N, K)
    lut = torch.from_numpy(FP4_LUT[:8])
    code = (x.abs()[..., None] - lut).abs().argmin(-1)  # nearest magnitude
    code = code | ((x < 0).long() << 3)
    packed = (code[:, 0::2] | (code[:, 1::2] << 4)).to(torch.uint8).view(torch.int8)
    return packed, s.to(torch.float8_e8m0fnu)


def dequant_fp8_np(codes, scale):
    v = codes.to(torch.float32).numpy()
    s = scale.to(torch.float32).numpy()
    return v * np.kron(s, np.ones((128, 128), dtype=np.float32))[: v.shape[0], : v.shape[1]]


def dequant_fp4_np(packed, scale):
    b = packed.view(torch.uint8).numpy().astype(np.int64)
    N = b.shape[0]
    vals = np.empty((N, b.shape[1] * 2), dtype=np.float32)
    vals[:, 0::2] = FP4_LUT[b & 15]
    vals[:, 1::2] = FP4_LUT[b >> 4]
    s = np.exp2(scale.view(torch.uint8).numpy().astype(np.float32) - 127.0)
    return vals * np.repeat(s, 32, axis=1)


def main():
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    config = transformers.DeepseekV4Config(**CFG, **LEGACY)
    torch.manual_seed(404)
    model = transformers.DeepseekV4ForCausalLM(config).eval()
    with tempfile.TemporaryDirectory() as tmp:  # transformers' own checkpoint names (its reverse conversion)
        model.save_pretrained(tmp)
        sd = load_file(str(Path(tmp) / "model.safetensors"))
    g = torch.Generator().manual_seed(8)
    tensors, ref = {}, {}
    for name, t in sorted(sd.items()):
        hn = hub_name(name)
        if t.dtype == torch.int64:  # tid2eid: a random valid table
            tensors[hn] = torch.randint(0, CFG["n_routed_experts"], t.shape, generator=g)
            continue
        t = torch.randn(t.shape, generator=g) * 0.05 if t.ndim == 2 else t + 0.1 * torch.randn(t.shape, generator=g)
        is_expert = ".ffn.experts." in hn
        fp8_able = hn.endswith(".weight") and t.ndim == 2 and any(
            k in hn for k in (".attn.wq_a.", ".attn.wq_b.", ".attn.wkv.", ".attn.wo_a.", ".attn.wo_b.",
                              ".attn.indexer.wq_b.", ".ffn.shared_experts."))
        if is_expert:
            packed, scale = fp4_quant(t)
            tensors[hn], tensors[hn[: -len(".weight")] + ".scale"] = packed, scale
            if hn.startswith("layers.1.ffn.experts.2.") or hn == "layers.0.ffn.experts.0.w2.weight":
                ref[hn] = dequant_fp4_np(packed, scale)
        elif fp8_able:
            codes, scale = fp8_quant(t)
            tensors[hn], tensors[hn[: -len(".weight")] + ".scale"] = codes, scale
            if hn in ("layers.1.attn.wq_b.weight", "layers.2.ffn.shared_experts.w2.weight",
                      "layers.3.attn.indexer.wq_b.weight"):
                ref[hn] = dequant_fp8_np(codes, scale)
        else:
            keep32 = "hc_" in hn or "attn_sink" in hn or ".ape" in hn or hn.endswith("gate.bias")
            tensors[hn] = t.to(torch.float32 if keep32 else torch.bfloat16)
            if hn in ("layers.2.attn.compressor.ape", "layers.0.hc_attn_fn", "embed.weight"):
                ref[hn] = tensors[hn].to(torch.float32).numpy()
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / "model.safetensors"), metadata={"format": "pt"})
    save_np({k: np.ascontiguousarray(v, dtype=np.float32) for k, v in ref.items()}, str(out / "reference.safetensors"))

    hub_cfg = dict(CFG, **LEGACY)
    hub_cfg.update(architectures=["DeepseekV4ForCausalLM"], model_type="deepseek_v4", torch_dtype="bfloat16",
                   expert_dtype="fp4", num_nextn_predict_layers=1,
                   quantization_config=dict(quant_method="fp8", activation_scheme="dynamic", fmt="e4m3",
                                            scale_fmt="ue8m0", weight_block_size=[128, 128]))
    (out / "config.json").write_text(json.dumps(hub_cfg, indent=2) + "\n")
    parsed = transformers.AutoConfig.from_pretrained(out)
    reference = {
        "layer_types": parsed.layer_types, "mlp_layer_types": parsed.mlp_layer_types,
        "compress_rates": parsed.compress_rates, "rope_parameters": parsed.rope_parameters,
        "qk_rope_head_dim": parsed.qk_rope_head_dim, "partial_rotary_factor": parsed.partial_rotary_factor,
        "expert_dtype": parsed.quantization_config.get("expert_dtype") if isinstance(parsed.quantization_config, dict)
        else getattr(parsed.quantization_config, "expert_dtype", None),
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "transformers": transformers.__version__, "torch": torch.__version__,
    }
    (out / "reference.json").write_text(json.dumps(reference, indent=2) + "\n")
    print(json.dumps(reference))


if __name__ == "__main__":
    main()
