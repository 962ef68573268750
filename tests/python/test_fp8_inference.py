"""`--dtype fp8` through the CLI: greedy decoding over the latent cache equals the argmax of the full-sequence
FP8 logits step by step (both decode paths), the server answers with fp8 weights, bench and info report the
fp8 weight bytes, a bad --dtype is one error line."""
import json
import socket
import subprocess
import time
import urllib.request

import numpy as np
from safetensors.numpy import load_file, save_file


def run(args, check=True):
    p = subprocess.run([str(a) for a in args], capture_output=True, text=True)
    if check:
        assert p.returncode == 0, p.stderr
    return p


def test_fp8_generate_equals_fp8_logits_argmax(tmp_path, dsv3_bin, test_data):
    model = test_data / "tiny-fp8"
    prompt = [5, 6, 7, 8, 9]
    n = 6
    outs = []
    for extra in ([], ["--no-absorb"]):
        r = run([dsv3_bin, "generate", "--model", model, "--dtype", "fp8", "--prompt-ids", ",".join(map(str, prompt)),
                 "-n", n, "--temperature", "0", "--json", *extra])
        outs.append(json.loads(r.stdout)["output_ids"])
    assert outs[0] == outs[1]
    seq = prompt + outs[0]
    save_file({"input_ids": np.array([seq[:-1]], np.int32)}, str(tmp_path / "in.safetensors"))
    run([dsv3_bin, "logits", "--model", model, "--dtype", "fp8", "--input", tmp_path / "in.safetensors",
         "--output", tmp_path / "out.safetensors"])
    logits = load_file(str(tmp_path / "out.safetensors"))["logits"][0]
    assert list(logits.argmax(-1)[len(prompt) - 1:]) == outs[0]


def test_fp8_serve_bench_info(tmp_path, dsv3_bin, test_data):
    # The server needs a model with the bundled tokenizer's vocabulary: a small random bf16 one, quantized at load.
    cfg = json.loads((test_data / "tiny-fp8" / "config.json").read_text())
    cfg.pop("quantization_config")
    cfg.update(vocab_size=129280, hidden_size=128, max_position_embeddings=256)
    (tmp_path / "c.json").write_text(json.dumps(cfg))
    srv_model = tmp_path / "srv"
    run([dsv3_bin, "init", "--config", tmp_path / "c.json", "--output", srv_model, "--seed", "2"])
    model = test_data / "tiny-fp8"
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    p = subprocess.Popen([dsv3_bin, "serve", "--model", srv_model, "--dtype", "fp8", "--port", str(port),
                          "--served-model-name", "tiny"],
                         stderr=subprocess.PIPE, text=True)
    try:
        base = f"http://127.0.0.1:{port}"
        for _ in range(300):
            try:
                urllib.request.urlopen(base + "/health", timeout=1)
                break
            except Exception:
                assert p.poll() is None, p.stderr.read()
                time.sleep(0.1)
        req = urllib.request.Request(base + "/v1/completions", method="POST", headers={"Content-Type": "application/json"},
                                     data=json.dumps({"model": "tiny", "prompt": "Hello there", "max_tokens": 6, "temperature": 0,
                                                      "ignore_eos": True}).encode())
        body = json.loads(urllib.request.urlopen(req, timeout=60).read())
        assert body["usage"]["completion_tokens"] == 6
    finally:
        p.terminate()
        p.wait(timeout=10)
    b = json.loads(run([dsv3_bin, "bench", "--model", model, "--dtype", "fp8", "--prefill-tokens", "16", "--prompt", "8",
                        "--gen", "4", "--json"]).stdout)
    b16 = json.loads(run([dsv3_bin, "bench", "--model", model, "--dtype", "bf16", "--prefill-tokens", "16", "--prompt",
                          "8", "--gen", "4", "--json"]).stdout)
    assert b["weights_dtype"].startswith("fp8") and b["decode_tokens_per_s"] > 0
    assert b["weight_bytes_per_step"] < 0.8 * b16["weight_bytes_per_step"]
    i8 = json.loads(run([dsv3_bin, "info", "--model", model, "--dtype", "fp8", "--json"]).stdout)
    i16 = json.loads(run([dsv3_bin, "info", "--model", model, "--dtype", "bf16", "--json"]).stdout)
    assert i8["weights_dtype"] == "fp8" and i8["weight_bytes"] < 0.75 * i16["weight_bytes"]
    r = run([dsv3_bin, "logits", "--model", model, "--dtype", "fp4", "--input", "x", "--output", "y"], check=False)
    assert r.returncode == 1 and r.stderr.startswith("error: ")
