"""dsv3 quantize --format fp8 against references written here: the DeepSeek-V3 FP8 hub layout, codes and block
scales reproduced bit for bit by NumPy (e4m3 rounding by torch's float8_e4m3fn cast), the checkpoint loaded by
transformers (dequantized on the CPU) with the same weights and logits as dsv3, malformed inputs refused; and
the 1x128 / 128x1 activation quantizers of core/fp8 against the same NumPy reference (hidden debug command)."""
import json
import struct
import subprocess

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

# Every quantized dimension a multiple of 128 where transformers needs it: transformers 5.24 derives the block
# size from the scale grid (rows // grid rows), which is only right for whole 128x128 blocks.
ALIGNED = {
    "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "vocab_size": 320,
    "hidden_size": 256, "intermediate_size": 384, "moe_intermediate_size": 128, "num_hidden_layers": 2,
    "first_k_dense_replace": 1, "num_attention_heads": 2, "num_key_value_heads": 2, "q_lora_rank": 128,
    "kv_lora_rank": 128, "qk_nope_head_dim": 64, "qk_rope_head_dim": 128, "v_head_dim": 64,
    "n_routed_experts": 4, "n_shared_experts": 1, "num_experts_per_tok": 2, "n_group": 2, "topk_group": 1,
    "routed_scaling_factor": 2.5, "norm_topk_prob": True, "topk_method": "noaux_tc", "scoring_func": "sigmoid",
    "num_nextn_predict_layers": 0, "max_position_embeddings": 64, "rope_theta": 10000, "rms_norm_eps": 1e-6,
    "initializer_range": 0.02, "bos_token_id": 0, "eos_token_id": 1, "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
}

# Scales stay normal (core/fp8.h): amax / 448 of a tile of tiny values would underflow to 0 (x / 0 = inf, 0 / 0 = NaN).
MIN_SCALE = np.float32(2.0 ** -126)


def run(dsv3_bin, *args, check=True):
    p = subprocess.run([dsv3_bin, *map(str, args)], capture_output=True, text=True)
    if check:
        assert p.returncode == 0, p.stderr
    return p


def make_model(tmp_path, dsv3_bin, cfg=ALIGNED, name="m", dtype="bf16"):
    c = tmp_path / f"{name}.json"
    c.write_text(json.dumps(cfg))
    out = tmp_path / name
    run(dsv3_bin, "init", "--config", c, "--output", out, "--dtype", dtype, "--seed", 3)
    return out


def header(path):
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        h = json.loads(f.read(n))
    h.pop("__metadata__", None)
    return h


def as_f32(a):
    """safetensors.numpy gives bf16 as ml_dtypes or raw uint16 depending on versions; go through torch."""
    return a.astype(np.float32) if a.dtype != np.uint16 else (a.astype(np.uint32) << 16).view(np.float32)


def load_f32(path):
    import safetensors.torch
    return {k: v.float().numpy() if v.dtype != torch.float8_e4m3fn else v for k, v in safetensors.torch.load_file(path).items()}


def e4m3(x):
    """Round-to-nearest-even fp32 -> e4m3fn codes (uint8); values here are within +-448 by construction."""
    return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(torch.float8_e4m3fn).view(torch.uint8).numpy()


def e4m3_value(codes):
    return torch.from_numpy(codes).view(torch.float8_e4m3fn).float().numpy()


def ref_quantize_128x128(w):
    """NumPy reference of fp8::quantize_128x128: per 128x128 block scale = amax / 448 (1 for zeros), code =
    e4m3(w / scale) with the division in fp32."""
    N, K = w.shape
    tn, tk = -(-N // 128), -(-K // 128)
    scales = np.ones((tn, tk), np.float32)
    codes = np.zeros((N, K), np.uint8)
    for i in range(tn):
        for j in range(tk):
            blk = w[i * 128:(i + 1) * 128, j * 128:(j + 1) * 128]
            amax = np.float32(np.abs(blk).max())
            s = np.maximum(np.float32(amax / np.float32(448.0)), MIN_SCALE) if amax > 0 else np.float32(1.0)
            scales[i, j] = s
            codes[i * 128:(i + 1) * 128, j * 128:(j + 1) * 128] = e4m3(blk / s)
    return codes, scales


def release_quantized(name):
    return name.endswith(".weight") and not any(
        name.endswith(s) for s in ("embed_tokens.weight", "lm_head.weight", "mlp.gate.weight", "shared_head.head.weight"))


def test_quantize_writes_the_hub_layout_bit_exactly(tmp_path, dsv3_bin, test_data):
    # Partial edge blocks: the tiny MTP fixture's config (dims 64, 96, ...) in bf16.
    cfg = json.loads((test_data / "tiny-fp8" / "config.json").read_text())
    cfg.pop("quantization_config")
    cfg["hidden_size"], cfg["moe_intermediate_size"] = 200, 72  # edge blocks in both dimensions
    src = make_model(tmp_path, dsv3_bin, cfg, "edge")
    out = tmp_path / "edge-fp8"
    run(dsv3_bin, "quantize", "--model", src, "--output", out, "--format", "fp8")
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc == {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "weight_block_size": [128, 128]}
    hin, hout = header(src / "model.safetensors"), header(out / "model.safetensors")
    # The release's choice of modules: compare with the real fp8 fixture's header (same module names).
    release = header(test_data / "tiny-fp8" / "model.safetensors")
    for name, meta in release.items():
        if name.endswith("_scale_inv"):
            continue
        assert (hout[name]["dtype"] == "F8_E4M3") == (meta["dtype"] == "F8_E4M3"), name
    w_in = load_f32(src / "model.safetensors")
    w_out = load_f32(out / "model.safetensors")
    nq = 0
    for name in hin:
        if release_quantized(name) and len(hin[name]["shape"]) == 2:
            assert hout[name]["dtype"] == "F8_E4M3", name
            scale_shape = [-(-hin[name]["shape"][0] // 128), -(-hin[name]["shape"][1] // 128)]
            assert hout[name + "_scale_inv"] == {**hout[name + "_scale_inv"], "dtype": "F32", "shape": scale_shape}
            codes, scales = ref_quantize_128x128(w_in[name])
            got = w_out[name].view(torch.uint8).numpy()
            assert np.array_equal(got, codes), name
            assert np.array_equal(w_out[name + "_scale_inv"].view(np.uint32), scales.view(np.uint32)), name
            nq += 1
        else:
            assert hout[name]["dtype"] == hin[name]["dtype"], name
            assert np.array_equal(w_out[name], w_in[name]), name
    assert nq > 20
    # dsv3 reads its own output (fp8 layout kept in memory, and dequantized).
    ids = np.array([[5, 6, 7, 8, 9, 10]], np.int32)
    save_file({"input_ids": ids}, str(tmp_path / "ids.safetensors"))
    for dt in ("fp8", "auto"):
        run(dsv3_bin, "logits", "--model", out, "--input", tmp_path / "ids.safetensors",
            "--output", tmp_path / f"l-{dt}.safetensors", "--dtype", dt)


def test_quantized_model_loads_in_transformers_with_our_weights(tmp_path, dsv3_bin):
    import transformers
    src = make_model(tmp_path, dsv3_bin)
    out = tmp_path / "m-fp8"
    run(dsv3_bin, "quantize", "--model", src, "--output", out)
    # No GPU here: transformers dequantizes the fp8 checkpoint at load (FineGrainedFP8Config(dequantize=True)).
    model = transformers.DeepseekV3ForCausalLM.from_pretrained(
        out, dtype=torch.float32, attn_implementation="eager",
        quantization_config=transformers.FineGrainedFP8Config(dequantize=True)).eval()
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    w = load_f32(out / "model.safetensors")
    checked = 0
    for name, t in w.items():
        if isinstance(t, torch.Tensor):  # an fp8 weight: code x block scale, exactly, in fp32
            ours = (e4m3_value(t.view(torch.uint8).numpy()) *
                    np.repeat(np.repeat(w[name + "_scale_inv"], 128, 0), 128, 1)[:t.shape[0], :t.shape[1]])
            theirs = sd[name] if name in sd else None
            if theirs is None:  # transformers fuses experts into one [E, ...] parameter
                continue
            assert np.array_equal(theirs.float().numpy(), ours), name
            checked += 1
    assert checked >= 8
    # Logits of the dequantized model in transformers = dsv3 on the same directory.
    ids = np.array([[3, 14, 15, 92, 65, 35, 89, 79]], np.int32)
    save_file({"input_ids": ids}, str(tmp_path / "ids.safetensors"))
    run(dsv3_bin, "logits", "--model", out, "--input", tmp_path / "ids.safetensors", "--output", tmp_path / "l.safetensors")
    ours = load_file(str(tmp_path / "l.safetensors"))["logits"]
    with torch.no_grad():
        theirs = model(torch.from_numpy(ids).long()).logits.numpy()
    assert np.linalg.norm(ours - theirs) / np.linalg.norm(theirs) < 1e-4


def test_quantize_refuses_bad_input(tmp_path, dsv3_bin, test_data):
    def err(*args):
        p = run(dsv3_bin, "quantize", *args, check=False)
        assert p.returncode == 1 and p.stderr.startswith("error: ") and p.stderr.count("\n") == 1, p.stderr
        return p.stderr
    assert "already quantized" in err("--model", test_data / "tiny-fp8", "--output", tmp_path / "o1")
    assert "does not exist" in err("--model", tmp_path / "nope", "--output", tmp_path / "o2")
    src = make_model(tmp_path, dsv3_bin, dtype="f32")
    assert "--format" in err("--model", src, "--output", tmp_path / "o3", "--format", "int4")
    # NaN in a weight.
    bad = tmp_path / "nan"
    bad.mkdir()
    (bad / "config.json").write_text((src / "config.json").read_text())
    w = load_file(str(src / "model.safetensors"))
    name = "model.layers.0.mlp.up_proj.weight"
    w[name] = w[name].copy()
    w[name][3, 5] = np.nan
    save_file(w, str(bad / "model.safetensors"))
    assert "non-finite" in err("--model", bad, "--output", tmp_path / "o4")
    # A matrix that is not 2-D.
    w = load_file(str(src / "model.safetensors"))
    w[name] = w[name].reshape(-1)
    save_file(w, str(bad / "model.safetensors"))
    assert "2-D" in err("--model", bad, "--output", tmp_path / "o5")
    # An output that cannot be written (a file where the directory should be).
    (tmp_path / "file").write_text("x")
    assert "output" in err("--model", src, "--output", tmp_path / "file" / "sub")


def ref_quantize_tiles(x, rows):
    """NumPy reference of quantize_1x128 (rows=False: per row, 128 columns) or quantize_128x1 (rows=True: per
    column, 128 rows)."""
    xt = x.T if rows else x
    M, K = xt.shape
    kt = -(-K // 128)
    scales = np.ones((M, kt), np.float32)
    codes = np.zeros((M, K), np.uint8)
    for t in range(kt):
        blk = xt[:, t * 128:(t + 1) * 128]
        amax = np.abs(blk).max(axis=1).astype(np.float32)
        s = np.where(amax > 0, np.maximum((amax / np.float32(448.0)).astype(np.float32), MIN_SCALE),
                     np.float32(1.0)).astype(np.float32)
        scales[:, t] = s
        codes[:, t * 128:(t + 1) * 128] = e4m3(blk / s[:, None])
    return (codes.T, scales.T) if rows else (codes, scales)


@pytest.mark.parametrize("tile", ["1x128", "128x1", "128x128"])
def test_tile_quantizers_match_numpy(tmp_path, dsv3_bin, tile):
    rng = np.random.default_rng(5)
    x = (rng.standard_normal((200, 300)) * np.exp(rng.standard_normal((200, 1)) * 3)).astype(np.float32)
    x[7, :] = 0  # an all-zero row: scale 1
    x[9, 10] = 1e30  # saturation of nothing: amax is the value itself
    x[11, 12] = 1e-40  # subnormal input
    x[13, :] = 1e-45  # tiles of the smallest denormal: amax / 448 underflows, the scale stays 2^-126
    x[128:, 256:] = -3e-43  # a tiny 128x128 block, and tiny 128x1 tiles
    save_file({"x": x}, str(tmp_path / "x.safetensors"))
    run(dsv3_bin, "fp8-quantize-debug", "--input", tmp_path / "x.safetensors", "--output", tmp_path / "q.safetensors",
        "--tile", tile)
    q = load_file(str(tmp_path / "q.safetensors"))
    if tile == "128x128":
        codes, scales = ref_quantize_128x128(x)
    else:
        codes, scales = ref_quantize_tiles(x, rows=tile == "128x1")
    assert q["scales"].shape == scales.shape
    assert np.array_equal(q["scales"].view(np.uint32), scales.view(np.uint32))
    assert np.array_equal(q["codes"], codes)
    assert not np.isin(q["codes"], [0x7F, 0xFF]).any()  # no NaN codes
