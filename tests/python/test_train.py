"""dsv3 training against independent references, end to end through the binary.

- `dsv3 grads` against transformers' autograd on configs the fixtures do not cover (no q LoRA, YaRN, bf16
  weights), and against bench/torch_train.py (a plain PyTorch DeepSeek-V3) for MTP (D = 2, chained) and the
  sequence-wise balance loss, which transformers does not have.
- `dsv3 train`: exact resume, checkpoints that transformers loads with the same logits as `dsv3 logits`, a
  transformers-made model that trains, and bad input (corrupt shards, vocabulary mismatch, NaN loss, failed
  save, Ctrl-C).
"""
import json
import os
import pathlib
import signal
import struct
import subprocess
import sys
import time

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from safetensors.numpy import load_file, save_file  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[2]
TINY = ROOT / "tests" / "data" / "train-tiny.json"

BASE = dict(
    vocab_size=320, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=3,
    num_attention_heads=2, num_key_value_heads=2, q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=16,
    qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2,
    n_group=4, topk_group=2, routed_scaling_factor=2.5, norm_topk_prob=True, first_k_dense_replace=1,
    max_position_embeddings=256, rope_theta=10000.0, rms_norm_eps=1e-6, initializer_range=0.05,
    topk_method="noaux_tc", scoring_func="sigmoid", rope_interleave=True, tie_word_embeddings=False,
    bos_token_id=0, eos_token_id=1, num_nextn_predict_layers=0,
)


def rel(a, b):
    return float(np.linalg.norm(a.astype(np.float64) - b) / max(np.linalg.norm(b.astype(np.float64)), 1e-30))


def run(args, **kw):
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, **kw)


def hf_model(tmp_path, overrides, dtype=torch.float32, seed=1234):
    cfg = dict(BASE)
    cfg.update(overrides)
    torch.manual_seed(seed)
    model = transformers.DeepseekV3ForCausalLM(transformers.DeepseekV3Config(**cfg)).eval()
    g = torch.Generator().manual_seed(99)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name:
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.05 * torch.rand(b.shape, generator=g))
    out = tmp_path / "hf"
    model.to(dtype).save_pretrained(out)
    model = transformers.DeepseekV3ForCausalLM.from_pretrained(out, dtype=torch.float32, attn_implementation="eager")
    return model, out, cfg


def ours_like_hf(got, name, shape):
    """dsv3 writes experts un-grouped (hub names); transformers 5 holds them fused: gate_up_proj [E, 2I, H]
    (gate rows first) and down_proj [E, H, I]."""
    if name.endswith("mlp.experts.gate_up_proj") or name.endswith("mlp.experts.down_proj"):
        pre = name.rsplit(".", 1)[0]
        E = shape[0]
        if name.endswith("gate_up_proj"):
            return np.stack([np.concatenate([got[f"grad.{pre}.{e}.gate_proj.weight"], got[f"grad.{pre}.{e}.up_proj.weight"]])
                             for e in range(E)])
        return np.stack([got[f"grad.{pre}.{e}.down_proj.weight"] for e in range(E)])
    return got["grad." + name]


GRAD_CASES = {
    "q_proj_yarn": dict(q_lora_rank=None, n_group=1, topk_group=1, norm_topk_prob=False,
                        rope_scaling=dict(type="yarn", factor=4.0, original_max_position_embeddings=64, beta_fast=32,
                                          beta_slow=1, mscale=1.0, mscale_all_dim=1.0)),
    "bf16_all_moe": dict(first_k_dense_replace=0, n_routed_experts=12, n_group=4, topk_group=2, num_experts_per_tok=3),
}


@pytest.mark.parametrize("case", sorted(GRAD_CASES))
def test_grads_match_transformers(tmp_path, dsv3_bin, case):
    dtype = torch.bfloat16 if case.startswith("bf16") else torch.float32
    model, mdir, cfg = hf_model(tmp_path, GRAD_CASES[case], dtype)
    T = 100 if "yarn" in case else 24
    ids = np.random.default_rng(3).integers(0, cfg["vocab_size"], size=(2, T), dtype=np.int32)
    save_file({"input_ids": ids}, str(tmp_path / "in.safetensors"))
    r = run([dsv3_bin, "grads", "--model", mdir, "--input", tmp_path / "in.safetensors", "--output", tmp_path / "g.safetensors"])
    assert r.returncode == 0, r.stderr
    got = load_file(str(tmp_path / "g.safetensors"))
    t = torch.from_numpy(ids).long()
    model.train()
    loss = model(t, labels=t).loss
    loss.backward()
    assert abs(float(got["loss"][0]) - loss.item()) / loss.item() < 1e-5
    n = 0
    for name, p in model.named_parameters():
        assert rel(ours_like_hf(got, name, p.shape), p.grad.numpy()) < 1e-4, f"{case}: {name}"
        n += 1
    assert n > 20


def test_mtp_and_balance_grads_match_torch_reference(tmp_path, dsv3_bin):
    cfg = json.loads(TINY.read_text())
    cfg["num_nextn_predict_layers"] = 2  # module 2 consumes module 1's block output: the chain is checked
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    mdir = tmp_path / "m"
    assert run([dsv3_bin, "init", "--config", tmp_path / "cfg.json", "--output", mdir, "--dtype", "f32", "--seed", "5"]).returncode == 0
    ids = np.random.default_rng(4).integers(0, cfg["vocab_size"], size=(3, 20), dtype=np.int32)
    save_file({"input_ids": ids}, str(tmp_path / "in.safetensors"))
    common = ["--mtp", "--mtp-lambda", "0.3", "--balance-alpha", "0.01"]
    r = run([dsv3_bin, "grads", "--model", mdir, "--input", tmp_path / "in.safetensors", "--output", tmp_path / "g.safetensors", *common])
    assert r.returncode == 0, r.stderr
    r = run([sys.executable, ROOT / "bench" / "torch_train.py", "--model", mdir, "--input", tmp_path / "in.safetensors",
             "--grads", tmp_path / "ref.safetensors", *common])
    assert r.returncode == 0, r.stderr
    got, ref = load_file(str(tmp_path / "g.safetensors")), load_file(str(tmp_path / "ref.safetensors"))
    assert abs(got["loss"][0] - ref["loss"][0]) / ref["loss"][0] < 1e-5
    for k in ref:
        if k.startswith("grad."):
            assert rel(got[k], ref[k]) < 1e-4, k
    assert np.linalg.norm(got["grad.model.layers.3.eh_proj.weight"]) > 0  # module 2 was trained
    # Without --mtp an MTP model reports the main-model loss only, and its MTP tensors get zero gradients.
    r = run([dsv3_bin, "grads", "--model", mdir, "--input", tmp_path / "in.safetensors", "--output", tmp_path / "g0.safetensors"])
    assert r.returncode == 0, r.stderr
    g0 = load_file(str(tmp_path / "g0.safetensors"))
    assert abs(g0["loss"][0] - ref["main_loss"][0]) / ref["main_loss"][0] < 1e-5
    assert not g0["grad.model.layers.2.eh_proj.weight"].any()


# ---- training runs on a tiny corpus ----------------------------------------------------------------------

def write_shard(path, toks, vocab, magic=b"DSV3TOK1"):
    with open(path, "wb") as f:
        f.write(magic + struct.pack("<IIQQ", 1, vocab, len(toks), 0))
        f.write(np.asarray(toks, dtype="<u4").tobytes())


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, dsv3_bin):
    d = tmp_path_factory.mktemp("corpus")
    rng = np.random.default_rng(0)
    words = "the cat sat on a mat and then ran to see the dog who was big and red".split()
    text = "\n\n".join(" ".join(rng.choice(words, size=rng.integers(5, 30))) for _ in range(300))
    (d / "a.txt").write_text(text)
    r = run([dsv3_bin, "prepare-data", "--tokenizer", "bytes", "--input", d / "a.txt", "--output", d / "data"])
    assert r.returncode == 0, r.stderr
    return d / "data"


TRAIN = ["--config", TINY, "--batch", "4", "--seq", "32", "--lr", "3e-3", "--warmup", "3", "--log-every", "1",
         "--eval-every", "4", "--eval-batches", "2"]


def losses(out):
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines() if l]
    return [(r["type"], r["step"], r.get("loss", r.get("val_loss")), r.get("mtp_loss")) for r in rows]


def test_resume_is_bit_identical(tmp_path, dsv3_bin, corpus):
    a, b = tmp_path / "a", tmp_path / "b"
    r = run([dsv3_bin, "train", *TRAIN, "--data", corpus, "--steps", "8", "--out", a, "--no-report"])
    assert r.returncode == 0, r.stderr
    r = run([dsv3_bin, "train", *TRAIN, "--data", corpus, "--steps", "8", "--out", b, "--stop-after", "4", "--save-dtype", "bf16"])
    assert r.returncode == 0, r.stderr
    assert json.loads((b / "checkpoint" / "trainer_state.json").read_text())["step"] == 4
    r = run([dsv3_bin, "train", "--resume", b / "checkpoint"])
    assert r.returncode == 0, r.stderr
    la, lb = losses(a), losses(b)
    assert len(la) == len(lb) == 8 + 2
    assert la == lb  # every train and validation loss, to the last bit
    assert (b / "report.html").exists() and "<svg" in (b / "report.html").read_text()


def test_checkpoint_loads_in_transformers_with_same_logits(tmp_path, dsv3_bin, corpus):
    out = tmp_path / "run"
    r = run([dsv3_bin, "train", *TRAIN, "--data", corpus, "--steps", "6", "--out", out])
    assert r.returncode == 0, r.stderr
    ck = out / "checkpoint"
    model = transformers.DeepseekV3ForCausalLM.from_pretrained(ck, dtype=torch.float32, attn_implementation="eager").eval()
    ids = np.random.default_rng(1).integers(0, 257, size=(2, 40), dtype=np.int32)
    save_file({"input_ids": ids}, str(tmp_path / "in.safetensors"))
    r = run([dsv3_bin, "logits", "--model", ck, "--input", tmp_path / "in.safetensors", "--output", tmp_path / "o.safetensors"])
    assert r.returncode == 0, r.stderr
    with torch.no_grad():
        ref = model(torch.from_numpy(ids).long()).logits.numpy()
    assert rel(load_file(str(tmp_path / "o.safetensors"))["logits"], ref) < 1e-4
    # The trained selection biases travelled too (they are not zero after bias updates).
    b = dict(model.named_buffers())["model.layers.1.mlp.gate.e_score_correction_bias"]
    assert float(b.abs().sum()) > 0


def test_transformers_made_model_trains(tmp_path, dsv3_bin, corpus):
    _, mdir, _ = hf_model(tmp_path, dict(num_hidden_layers=2, vocab_size=257))
    out = tmp_path / "run"
    r = run([dsv3_bin, "train", "--init-from", mdir, "--data", corpus, "--batch", "4", "--seq", "32", "--steps", "12",
             "--lr", "3e-3", "--warmup", "2", "--out", out, "--no-report"])
    assert r.returncode == 0, r.stderr
    ls = [l for t, _, l, _ in losses(out) if t == "train"]
    assert all(np.isfinite(ls)) and np.mean(ls[-3:]) < np.mean(ls[:3]) - 0.3, ls


def test_bad_shards_are_rejected(tmp_path, dsv3_bin, corpus):
    import shutil
    for name, mutate, msg in [
        ("magic", lambda p: p.write_bytes(b"NOTATOK1" + p.read_bytes()[8:]), "bad magic"),
        ("truncated", lambda p: p.write_bytes(p.read_bytes()[:-6]), "truncated"),
        ("header", lambda p: p.write_bytes(p.read_bytes()[:10]), "truncated"),
    ]:
        d = tmp_path / name
        shutil.copytree(corpus, d)
        mutate(d / "train_0000.bin")
        r = run([dsv3_bin, "train", *TRAIN, "--data", d, "--steps", "2", "--out", tmp_path / ("o" + name)])
        assert r.returncode == 1 and msg in r.stderr and r.stderr.startswith("error:"), (name, r.stderr)


def test_tokenizer_larger_than_model_vocab_is_rejected(tmp_path, dsv3_bin):
    d = tmp_path / "data"
    d.mkdir()
    write_shard(d / "train_0000.bin", np.arange(1000) % 400, 400)
    (d / "meta.json").write_text(json.dumps({"vocab_size": 400, "eos_id": 1}))
    r = run([dsv3_bin, "train", *TRAIN, "--data", d, "--steps", "2", "--out", tmp_path / "o"])
    assert r.returncode == 1 and "vocab_size is 320" in r.stderr, r.stderr


def test_nan_loss_stops_and_keeps_last_checkpoint(tmp_path, dsv3_bin, corpus):
    out = tmp_path / "run"
    r = run([dsv3_bin, "train", *TRAIN, "--data", corpus, "--steps", "3", "--out", out, "--no-report"])
    assert r.returncode == 0, r.stderr
    before = (out / "checkpoint" / "model.safetensors").read_bytes()
    r = run([dsv3_bin, "train", "--resume", out / "checkpoint", "--steps", "40", "--lr", "1e30", "--clip", "0"])
    assert r.returncode == 1 and "not finite" in r.stderr, r.stderr
    assert "last good checkpoint" in r.stderr
    assert (out / "checkpoint" / "model.safetensors").read_bytes() == before


def test_failed_save_keeps_previous_checkpoint(tmp_path, dsv3_bin, corpus):
    out = tmp_path / "run"
    r = run([dsv3_bin, "train", *TRAIN, "--data", corpus, "--steps", "2", "--out", out, "--no-report"])
    assert r.returncode == 0, r.stderr
    files = {p.name: p.read_bytes() for p in (out / "checkpoint").iterdir()}
    env = dict(os.environ, DSV3_FAULT_INJECT="save")
    r = run([dsv3_bin, "train", "--resume", out / "checkpoint", "--steps", "4"], env=env)
    assert r.returncode == 1 and "previous checkpoint is untouched" in r.stderr, r.stderr
    assert {p.name: p.read_bytes() for p in (out / "checkpoint").iterdir()} == files
    assert not [p for p in out.iterdir() if p.name.startswith(".checkpoint")]  # no temporaries left


def test_sigint_saves_and_exits_cleanly(tmp_path, dsv3_bin, corpus):
    out = tmp_path / "run"
    p = subprocess.Popen([str(a) for a in [dsv3_bin, "train", *TRAIN, "--data", corpus, "--steps", "100000",
                                            "--out", out, "--no-report"]], stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while time.time() < deadline and not (out / "metrics.jsonl").exists():
        time.sleep(0.1)
    time.sleep(1.0)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 0, err
    st = json.loads((out / "checkpoint" / "trainer_state.json").read_text())
    assert 0 < st["step"] < 100000 and "interrupted" in err


def test_plot_command(tmp_path, dsv3_bin, corpus):
    out = tmp_path / "run"
    assert run([dsv3_bin, "train", *TRAIN, "--data", corpus, "--steps", "4", "--out", out, "--no-report"]).returncode == 0
    r = run([dsv3_bin, "plot", "--metrics", out / "metrics.jsonl", "--output", tmp_path / "r.html"])
    assert r.returncode == 0, r.stderr
    html = (tmp_path / "r.html").read_text()
    assert html.count("<svg") >= 4 and "MaxVio" in html and "Expert load" in html


def test_plot_compares_runs(tmp_path, dsv3_bin):
    # Two hand-written metrics files: the table must hold each run's last validation loss and the relative
    # difference to the first (computed here independently).
    runs = {"bf16": [4.0, 3.0], "fp8": [4.1, 3.03]}
    paths = []
    for name, vals in runs.items():
        p = tmp_path / f"{name}.jsonl"
        lines = []
        for i, v in enumerate(vals):
            lines.append(json.dumps({"type": "train", "step": 10 * (i + 1), "loss": v + 0.1}))
            lines.append(json.dumps({"type": "val", "step": 10 * (i + 1), "val_loss": v, "val_acc": 0.1}))
        p.write_text("\n".join(lines) + "\n")
        paths.append(p)
    out = tmp_path / "cmp.html"
    r = run([dsv3_bin, "plot", "--metrics", *paths, "--labels", "bf16", "fp8", "--output", out])
    assert r.returncode == 0, r.stderr
    html = out.read_text()
    assert html.count("<svg") == 2 and "bf16 validation" in html and "fp8 train" in html
    assert "3.0300" in html and f"{100 * (3.03 - 3.0) / 3.0:+.3f}%" in html
    for bad in (["--labels", "only-one"], []):
        if not bad:
            r = run([dsv3_bin, "plot", "--metrics", paths[0], "--labels", "x", "--output", out])
        else:
            r = run([dsv3_bin, "plot", "--metrics", *paths, *bad, "--output", out])
        assert r.returncode == 1 and r.stderr.startswith("error:") and r.stderr.count("\n") == 1, r.stderr


def test_unknown_device_is_a_one_line_error(tmp_path, dsv3_bin, corpus):
    for cmd in (["train", *TRAIN, "--data", corpus, "--steps", "2", "--out", tmp_path / "o"],
                ["bench-train", "--config", TINY, "--batch", "1", "--seq", "8"]):
        r = run([dsv3_bin, *cmd, "--device", "nonsense"])
        assert r.returncode == 1, r.stderr
        assert r.stderr.startswith("error:") and r.stderr.count("\n") == 1, r.stderr
        assert "nonsense" in r.stderr and "cpu, cuda or cuda:N" in r.stderr, r.stderr


def test_bench_train_runs_on_cpu(dsv3_bin):
    r = run([dsv3_bin, "bench-train", "--config", TINY, "--batch", "2", "--seq", "16", "--steps", "2", "--warmup", "1",
             "--json"])
    assert r.returncode == 0, r.stderr
    j = json.loads(r.stdout)
    assert j["device"] == "cpu" and j["mtp"] is True and "mfu" not in j
    assert j["tokens_per_s"] > 0 and j["ms_per_step"] > 0 and np.isfinite(j["last_loss"])
    # 2 layers (1 dense, 1 MoE with 2 of 8 routed experts + 1 shared), lm_head, and the MTP module + lm_head again
    cfg = json.loads(TINY.read_text())
    H, V = cfg["hidden_size"], cfg["vocab_size"]
    assert j["active_params_per_token"] > 2 * V * H
    assert j["active_params_per_token"] < j["total_params"] + V * H
    r = run([dsv3_bin, "bench-train", "--config", TINY, "--batch", "1", "--seq", "8", "--steps", "1", "--warmup", "0",
             "--peak-tflops", "1"])
    assert r.returncode == 0 and "MFU" in r.stdout, r.stdout + r.stderr
