"""`dsv3 info` on DeepSeek-V4 checkpoints, and clear errors for what is not supported yet (serving).

The tiny-v4 fixture (tools/make_v4_fixture.py) is in the release layout with FP8/FP4 tensors. The expected
parameter count is that of transformers' DeepseekV4ForCausalLM for the same config (reference.json); the cache
figures follow from the config: a window of sliding_window x head_dim per layer, (head_dim + index_head_dim) / m
values per token on CSA layers and head_dim / m' on HCA layers.
"""
import json
import shutil
import subprocess


def run(dsv3_bin, *args):
    return subprocess.run([dsv3_bin, *args], capture_output=True, text=True)


def test_v4_info_reports_params_and_cache(dsv3_bin, test_data):
    d = test_data / "tiny-v4"
    ref = json.loads((d / "reference.json").read_text())
    cfg = json.loads((d / "config.json").read_text())
    r = run(dsv3_bin, "info", "--model", str(d), "--json")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["model_type"] == "deepseek_v4"
    assert info["total_params"] == ref["num_parameters"]
    assert info["hash_layers"] == cfg["num_hash_layers"]
    lt = info["layer_types"]
    for name in ("sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention"):
        assert lt[name]["layers"] == ref["layer_types"].count(name)
    hd, m, m2 = cfg["head_dim"], ref["compress_rates"]["compressed_sparse_attention"], \
        ref["compress_rates"]["heavily_compressed_attention"]
    csa = (hd + cfg["index_head_dim"]) / m
    hca = hd / m2
    assert lt["compressed_sparse_attention"]["values_per_token_per_layer"] == csa
    assert lt["heavily_compressed_attention"]["values_per_token_per_layer"] == hca
    per_token = csa * lt["compressed_sparse_attention"]["layers"] + hca * lt["heavily_compressed_attention"]["layers"]
    assert info["cache_bytes_per_token_bf16"] == per_token * 2
    window = cfg["sliding_window"] * hd * cfg["num_hidden_layers"]
    assert info["cache_bytes_1m_context_bf16"] == (per_token * 2 ** 20 + window) * 2
    text = run(dsv3_bin, "info", "--model", str(d))
    assert text.returncode == 0 and "DeepSeek-V4" in text.stdout and "1M-token context" in text.stdout


def test_v4_errors_are_one_line(dsv3_bin, test_data, tmp_path):
    d = tmp_path / "m"
    shutil.copytree(test_data / "tiny-v4", d)
    # The release layout (FP8 / FP4) runs after dequantization; commands without a V4 path yet (bench) say so
    # in one line and exit 1.
    r = run(dsv3_bin, "generate", "--model", str(d), "--prompt-ids", "1,2,3", "-n", "2", "--json")
    assert r.returncode == 0 and len(json.loads(r.stdout)["output_ids"]) == 2, r.stderr
    r = run(dsv3_bin, "bench", "--model", str(d))
    assert r.returncode == 1 and r.stderr.startswith("error:") and "DeepSeek-V4" in r.stderr, r.stderr
    # A malformed schedule names the field.
    cfg = json.loads((d / "config.json").read_text())
    cfg["compress_ratios"] = [0, 4, 32, 4, 0]
    (d / "config.json").write_text(json.dumps(cfg))
    r = run(dsv3_bin, "info", "--model", str(d))
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1 and "compress_ratios" in r.stderr, r.stderr
    # A truncated checkpoint names the file.
    shutil.copy(test_data / "tiny-v4" / "config.json", d / "config.json")
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) // 2])
    r = run(dsv3_bin, "info", "--model", str(d))
    assert r.returncode == 1 and "model.safetensors" in r.stderr, r.stderr
