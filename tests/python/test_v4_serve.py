"""DeepSeek-V4 behind `dsv3 serve` and `dsv3 chat`: the tiny-v4-fwd fixture (matched to transformers in
test_v4_forward.py) with its embedding, head and hash-routing table widened to the DeepSeek-V3 tokenizer's
129,280 tokens, so text round-trips. Concurrent greedy completions from the server must equal `dsv3 generate`
on the same prompts (the engine batches V4 sequences in one step, each through its own cache); bad requests get
HTTP errors; chat answers a line from stdin. With `--speculative mtp` (a model with an MTP block) greedy
completions still equal `dsv3 generate`; without an MTP block the option is a one-line error."""
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


def test_v4_serve_without_an_mtp_block_refuses_mtp_speculation(dsv3_bin, v4_text_model):
    # tiny-v4-fwd comes from transformers, which writes no mtp.* tensors.
    r = subprocess.run([dsv3_bin, "serve", "--model", str(v4_text_model), "--port", str(free_port()),
                        "--speculative", "mtp"], capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "MTP block" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


@pytest.fixture(scope="module")
def v4_mtp_text_model(tmp_path_factory, dsv3_bin):
    """A V4 model with a sliding MTP block whose drafts are right about half the time: `dsv3 init` with the
    tokenizer's vocabulary, every weight perturbed, the main layers' outputs (attention wo_b, expert w2) scaled to
    3% so the main model is close to (not equal to) a bigram table of the current token, and an MTP block that is
    exactly that bigram table (block outputs and h_proj zero, e_proj identity, enorm 1, its norm = the main norm:
    it drafts f(next token)). Greedy text is then token-dependent, the cache matters, and both the accepted and the
    rejected (cache restored) verify paths run."""
    from test_v4_mtp import CFG, MAIN
    d = tmp_path_factory.mktemp("v4spec")
    cfg = dict(CFG, vocab_size=VOCAB, max_position_embeddings=256, layer_types=MAIN + ["sliding_attention"])
    (d / "cfg.json").write_text(json.dumps(cfg))
    r = subprocess.run([dsv3_bin, "init", "--config", str(d / "cfg.json"), "--output", str(d / "m"), "--seed", "3"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    w = load_file(str(d / "m" / "model.safetensors"))
    rng = np.random.default_rng(4)
    w = {k: (v + rng.normal(0, 0.1, v.shape).astype(np.float32)) if v.dtype == np.float32 else v for k, v in w.items()}
    outs = ("attn.wo_b.weight", ".w2.weight")
    for k in w:
        if k.endswith(outs):
            w[k] = w[k] * (0.03 if k.startswith("layers.") else 0.0)
    w["mtp.0.h_proj.weight"] = np.zeros_like(w["mtp.0.h_proj.weight"])
    w["mtp.0.e_proj.weight"] = np.eye(cfg["hidden_size"], dtype=np.float32)
    w["mtp.0.enorm.weight"] = np.ones(cfg["hidden_size"], np.float32)
    w["mtp.0.norm.weight"] = w["norm.weight"].copy()
    save_file(w, str(d / "m" / "model.safetensors"), metadata={"format": "pt"})
    return d / "m"


def metric(base, name):
    import urllib.request
    with urllib.request.urlopen(base + "/metrics", timeout=30) as r:
        for line in r.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    raise AssertionError(name)


def test_v4_serve_speculative_mtp_equals_generate(dsv3_bin, v4_mtp_text_model):
    """`serve --speculative mtp` on V4: concurrent greedy completions (draft with MTP block 0, verify [current,
    draft] in one pass, restore the cache on a rejected draft) equal plain `dsv3 generate`, including one that ends
    at the 256-token context; seeded sampled requests (not speculated, as on V3) equal `dsv3 generate` with the
    same seed; /metrics reports the drafts and the acceptance rate."""
    m = v4_mtp_text_model
    prompts = ["The quick brown fox", "Hello there, how", "DeepSeek-V4 keeps a window of", "1 2 3 4"]
    want = [generate_text(dsv3_bin, m, p, 16) for p in prompts]
    long_ids = [int(x) for x in np.random.default_rng(6).integers(100, VOCAB, size=256 - 12)]
    r = subprocess.run([dsv3_bin, "generate", "--model", str(m), "--prompt-ids", ",".join(map(str, long_ids)),
                        "-n", "12", "--temperature", "0", "--ignore-eos", "--json"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    r = subprocess.run([dsv3_bin, "detokenize"], input=json.dumps({"ids": json.loads(r.stdout)["output_ids"]}),
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    want_long = json.loads(r.stdout)["text"]
    r = subprocess.run([dsv3_bin, "generate", "--model", str(m), "--prompt", prompts[0], "-n", "12", "--temperature",
                        "0.8", "--seed", "7", "--ignore-eos", "--json"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    want_sampled = json.loads(r.stdout)["text"]
    p, base = start_server(dsv3_bin, m, "--kv-cache-tokens", "4096", "--speculative", "mtp")
    try:
        def complete(body):
            return post(base, "/v1/completions", dict({"model": "tiny", "ignore_eos": True}, **body))
        bodies = [{"prompt": q, "max_tokens": 16, "temperature": 0} for q in prompts]
        bodies += [{"prompt": long_ids, "max_tokens": 12, "temperature": 0}]
        bodies += [{"prompt": prompts[0], "max_tokens": 12, "temperature": 0.8, "seed": 7}] * 2
        with cf.ThreadPoolExecutor(len(bodies)) as ex:
            got = list(ex.map(complete, bodies))
        for (status, body), w in zip(got, want + [want_long, want_sampled, want_sampled]):
            assert status == 200, body
            assert body["choices"][0]["text"] == w
        drafted, accepted = metric(base, "dsv3_spec_drafts_total"), metric(base, "dsv3_spec_accepted_total")
        rate = metric(base, "dsv3_spec_acceptance_rate")
        print(f"[v4 serve speculative] {accepted:.0f} of {drafted:.0f} drafts accepted ({rate:.0%})")
        assert 0 < accepted < drafted and abs(rate - accepted / drafted) < 1e-9  # both verify paths ran
    finally:
        stop_server(p)


def test_v4_chat_answers_from_stdin(dsv3_bin, v4_text_model):
    r = subprocess.run([dsv3_bin, "chat", "--model", str(v4_text_model), "-n", "6", "--temperature", "0"],
                       input="Hello\n/exit\n", capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "tokens" in r.stderr and r.stdout.strip() != ""
