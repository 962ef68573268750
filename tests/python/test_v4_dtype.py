"""DeepSeek-V4 with --dtype bf16 through the CLI (model/v4_weights.h): on the released FP8/FP4 layout (tiny-v4) the
bf16-resident model holds the fp32 path's values exactly, so `logits` agree to fp32 summation order and greedy
`generate` gives the same tokens; `info --dtype bf16` reports about half the fp32 weight bytes; fp8 and unknown
dtypes are one-line errors.
"""
import json
import subprocess

import numpy as np
from safetensors.numpy import load_file, save_file


def run(dsv3_bin, *args):
    return subprocess.run([dsv3_bin, *args], capture_output=True, text=True)


def test_v4_info_reports_bf16_weight_bytes(dsv3_bin, test_data):
    d = str(test_data / "tiny-v4")
    f32 = json.loads(run(dsv3_bin, "info", "--model", d, "--json").stdout)
    r = run(dsv3_bin, "info", "--model", d, "--json", "--dtype", "bf16")
    assert r.returncode == 0, r.stderr
    b = json.loads(r.stdout)
    assert f32["weights_dtype"] == "f32" and b["weights_dtype"] == "bf16"
    assert b["weight_bytes_f32"] == f32["weight_bytes"]
    # Every parameter is 4 bytes in fp32 (total_params counts the main model; tiny-v4 has no MTP tensors).
    assert f32["weight_bytes"] >= 4 * f32["total_params"]
    # bf16: the matrices at 2 bytes, the small fp32 tensors (mHC, sinks, ape, router, norms, biases) at 4.
    assert 0.5 * f32["weight_bytes"] < b["weight_bytes"] < 0.55 * f32["weight_bytes"]
    assert b["bf16_rounded_tensors"] == 0  # FP8 / FP4 / BF16 checkpoint: exact
    text = run(dsv3_bin, "info", "--model", d, "--dtype", "bf16").stdout
    assert "bf16 matrices" in text and "held exactly" in text
    fwd = json.loads(run(dsv3_bin, "info", "--model", str(test_data / "tiny-v4-fwd"), "--json", "--dtype", "bf16").stdout)
    assert fwd["bf16_rounded_tensors"] > 0  # transformers' fp32 save: rounded


def test_v4_bf16_logits_and_generate_equal_fp32_on_release_layout(dsv3_bin, test_data, tmp_path):
    d = str(test_data / "tiny-v4")
    ids = np.random.default_rng(4).integers(0, 64, size=(2, 40), dtype=np.int32)
    save_file({"input_ids": ids}, str(tmp_path / "in.safetensors"))
    out = {}
    for dt in ("f32", "bf16"):
        r = run(dsv3_bin, "logits", "--model", d, "--dtype", dt, "--input", str(tmp_path / "in.safetensors"),
                "--output", str(tmp_path / f"{dt}.safetensors"))
        assert r.returncode == 0, r.stderr
        out[dt] = load_file(str(tmp_path / f"{dt}.safetensors"))["logits"]
    err = np.abs(out["bf16"] - out["f32"]).max() / np.abs(out["f32"]).max()
    assert err < 1e-5, err
    gens = [json.loads(run(dsv3_bin, "generate", "--model", d, "--dtype", dt, "--prompt-ids", "3,9,27,17,5", "-n", "20",
                           "--json", "--ignore-eos").stdout)["output_ids"] for dt in ("auto", "bf16")]
    assert gens[0] == gens[1] and len(gens[0]) == 20


def test_v4_unsupported_dtypes_are_one_line_errors(dsv3_bin, test_data):
    d = str(test_data / "tiny-v4")
    for dt, want in (("fp8", "not fp8 yet"), ("f16", "unknown --dtype 'f16'")):
        r = run(dsv3_bin, "generate", "--model", d, "--dtype", dt, "--prompt-ids", "1,2", "-n", "1")
        assert r.returncode == 1 and want in r.stderr and r.stderr.strip().count("\n") == 0, r.stderr
