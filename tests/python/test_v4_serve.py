"""DeepSeek-V4 behind `dsv3 serve` and `dsv3 chat`: the tiny-v4-fwd fixture (matched to transformers in
test_v4_forward.py) with its embedding, head and hash-routing table widened to the DeepSeek-V3 tokenizer's
129,280 tokens, so text round-trips. Concurrent greedy completions from the server must equal `dsv3 generate`
on the same prompts (the engine batches V4 sequences in one step, each through its own cache); bad requests get
HTTP errors; chat answers a line from stdin."""
import concurrent.futures as cf
import json
import shutil
import subprocess

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from test_server import free_port, post, start_server, stop_server  # noqa: F401  (same helpers)

VOCAB = 129280


@pytest.fixture(scope="module")
def v4_text_model(tmp_path_factory, test_data):
    src = test_data / "tiny-v4-fwd"
    d = tmp_path_factory.mktemp("v4srv")
    cfg = json.loads((src / "config.json").read_text())
    old = cfg["vocab_size"]
    cfg["vocab_size"] = VOCAB
    (d / "config.json").write_text(json.dumps(cfg))
    shutil.copy(src / "generation_config.json", d / "generation_config.json")
    w = load_file(str(src / "model.safetensors"))
    rng = np.random.default_rng(11)
    for k in ("head.weight", "model.embed_tokens.weight"):
        t = w[k]
        extra = rng.normal(0, float(t.std()), size=(VOCAB - old, t.shape[1])).astype(np.float32)
        w[k] = np.concatenate([t, extra])
    for k in [k for k in w if k.endswith("tid2eid")]:
        t = w[k]
        extra = np.stack([rng.permutation(cfg["n_routed_experts"])[: t.shape[1]] for _ in range(VOCAB - old)])
        w[k] = np.concatenate([t, extra.astype(t.dtype)])
    save_file(w, str(d / "model.safetensors"))
    return d


def generate_text(dsv3_bin, model, prompt, n):
    r = subprocess.run([dsv3_bin, "generate", "--model", str(model), "--prompt", prompt, "-n", str(n),
                        "--temperature", "0", "--ignore-eos", "--json"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)["text"]


def test_v4_server_completions_equal_generate(dsv3_bin, v4_text_model):
    prompts = ["The quick brown fox", "Hello there, how", "DeepSeek-V4 keeps a window of"]
    want = [generate_text(dsv3_bin, v4_text_model, p, 10) for p in prompts]
    p, base = start_server(dsv3_bin, v4_text_model, "--kv-cache-tokens", "2048")
    try:
        def complete(prompt):
            return post(base, "/v1/completions", {"model": "tiny", "prompt": prompt, "max_tokens": 10,
                                                  "temperature": 0, "ignore_eos": True})
        with cf.ThreadPoolExecutor(len(prompts)) as ex:
            got = list(ex.map(complete, prompts))
        for prompt, w, (status, body) in zip(prompts, want, got):
            assert status == 200, body
            assert body["usage"]["completion_tokens"] == 10
            assert body["choices"][0]["text"] == w
        # Streaming chat works and ends; a prompt past the 256-token context is refused with HTTP 400.
        status, body = post(base, "/v1/chat/completions", {"model": "tiny", "max_tokens": 4,
                                                           "messages": [{"role": "user", "content": "Hi"}]})
        assert status == 200 and body["usage"]["completion_tokens"] >= 1, body
        status, body = post(base, "/v1/completions", {"model": "tiny", "prompt": "word " * 400, "max_tokens": 4})
        assert status == 400, body
        status, _ = post(base, "/v1/completions", {"model": "tiny", "prompt": [VOCAB + 5], "max_tokens": 4})
        assert status == 400
    finally:
        stop_server(p)


def test_v4_serve_refuses_mtp_speculation(dsv3_bin, v4_text_model):
    r = subprocess.run([dsv3_bin, "serve", "--model", str(v4_text_model), "--port", str(free_port()),
                        "--speculative", "mtp"], capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "MTP" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_v4_chat_answers_from_stdin(dsv3_bin, v4_text_model):
    r = subprocess.run([dsv3_bin, "chat", "--model", str(v4_text_model), "-n", "6", "--temperature", "0"],
                       input="Hello\n/exit\n", capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "tokens" in r.stderr and r.stdout.strip() != ""
