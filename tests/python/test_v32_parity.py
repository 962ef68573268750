"""dsv3 against Hugging Face transformers' DeepSeek-V3.2 (`deepseek_v32`, DSA) on configs beyond the fixture.

Each case builds a DeepseekV32ForCausalLM with random weights (perturbed norms, LayerNorm biases and selection
biases), saves it with save_pretrained, then compares `dsv3 logits` (fp32) with transformers (fp32, eager)
and `dsv3 generate` greedy output with transformers' cached greedy generation (the indexer keys cached).
`index_topk` is well below the sequence length, so the indexer's top-k selection decides most key sets.
Tolerance: ||logits - ref|| / ||ref|| <= 1e-4. `dsv3 info` reports the indexer and its cache bytes.
"""
import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
if not hasattr(transformers, "DeepseekV32Config"):
    pytest.skip("this transformers has no deepseek_v32", allow_module_level=True)
from safetensors.numpy import load_file, save_file  # noqa: E402
from transformers.models.deepseek_v32 import modeling_deepseek_v32 as mv32  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2] / "tools"))
import make_v32_fixture as margin  # noqa: E402  (check_margin: the top-k selection gap, as in the fixture)

BASE = dict(
    vocab_size=300, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=3,
    num_attention_heads=4, num_key_value_heads=4, q_lora_rank=40, kv_lora_rank=32, qk_nope_head_dim=16,
    qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2,
    n_group=2, topk_group=1, routed_scaling_factor=2.5, norm_topk_prob=True, first_k_dense_replace=1,
    max_position_embeddings=256, rms_norm_eps=1e-6, initializer_range=0.1, tie_word_embeddings=False,
    bos_token_id=0, eos_token_id=1, index_topk=5, index_head_dim=16, index_n_heads=8,
)

CASES = {
    # every layer MoE (explicit mlp_layer_types), wider indexer heads, plain RoPE
    "all_moe_topk5": dict(mlp_layer_types=["sparse"] * 3, index_head_dim=24, index_n_heads=12),
    # two dense layers, a long sequence against a small top-k
    "two_dense_topk3": dict(first_k_dense_replace=2, num_hidden_layers=4, index_topk=3, n_group=4, topk_group=2,
                            index_n_heads=16),
}


def make_model(tmp_path, overrides):
    cfg = dict(BASE)
    cfg.update(overrides)
    config = transformers.DeepseekV32Config(**cfg)
    torch.manual_seed(4321)
    model = transformers.DeepseekV32ForCausalLM(config).eval()
    g = torch.Generator().manual_seed(77)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name:
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            elif name.endswith("k_norm.bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.05 * torch.rand(b.shape, generator=g))
    out = tmp_path / "model"
    model.save_pretrained(out)
    model = transformers.DeepseekV32ForCausalLM.from_pretrained(out, dtype=torch.float32,
                                                                attn_implementation="eager").eval()
    return model, out, cfg


@pytest.mark.parametrize("case", sorted(CASES))
def test_v32_logits_and_greedy_match_transformers(tmp_path, dsv3_bin, case, monkeypatch):
    model, mdir, cfg = make_model(tmp_path, CASES[case])
    monkeypatch.setattr(mv32.DeepseekV32Indexer, "forward", margin.check_margin(mv32.DeepseekV32Indexer.forward))
    monkeypatch.setattr(margin, "min_gap", [float("inf")])
    rng = np.random.default_rng(3)
    T = 40 if "topk3" in case else 20
    ids = rng.integers(2, cfg["vocab_size"], size=(2, T), dtype=np.int32)
    save_file({"input_ids": ids}, str(tmp_path / "in.safetensors"))
    subprocess.run([dsv3_bin, "logits", "--model", str(mdir), "--input", str(tmp_path / "in.safetensors"),
                    "--output", str(tmp_path / "out.safetensors")], check=True)
    got = load_file(str(tmp_path / "out.safetensors"))["logits"]
    with torch.no_grad():
        ref = model(torch.from_numpy(ids).long(), use_cache=False).logits.numpy()
    rel = np.linalg.norm(got - ref) / np.linalg.norm(ref)
    # torch.topk's order among tied index scores is unspecified: the cases are chosen tie-free (checked here).
    assert margin.min_gap[0] > 1e-4, f"{case}: the top-k selection has a near tie ({margin.min_gap[0]}): change the case"
    assert rel <= 1e-4, f"{case}: logits rel error {rel}"

    prompt = ids[0, :7].tolist()
    with torch.no_grad():
        gen = model.generate(torch.tensor([prompt]), max_new_tokens=14, do_sample=False, eos_token_id=None,
                             pad_token_id=0)[0, len(prompt):].tolist()
    r = subprocess.run([dsv3_bin, "generate", "--model", str(mdir), "--prompt-ids", ",".join(map(str, prompt)),
                        "--max-new-tokens", "14", "--temperature", "0", "--json"], check=True, capture_output=True,
                       text=True)
    assert json.loads(r.stdout)["output_ids"] == gen, case

    info = json.loads(subprocess.run([dsv3_bin, "info", "--model", str(mdir), "--json"], check=True,
                                     capture_output=True, text=True).stdout)
    assert info["model_type"] == "deepseek_v32"
    per_layer = cfg["kv_lora_rank"] + cfg["qk_rope_head_dim"] + cfg["index_head_dim"]
    assert info["kv_cache_values_per_token_per_layer"] == per_layer
    assert info["kv_cache_bytes_per_token_bf16"] == cfg["num_hidden_layers"] * per_layer * 2
    assert info["total_params"] == sum(p.numel() for p in model.parameters())


def test_v32_grads_and_training(tmp_path, dsv3_bin, case="all_moe_topk5"):
    """`dsv3 grads` on a V3.2 model: loss and gradients against torch autograd through transformers (the indexer
    runs under no_grad there: its gradients are zero, and dsv3's AdamW leaves it untouched)."""
    model, mdir, cfg = make_model(tmp_path, CASES[case])
    ids = np.random.default_rng(5).integers(2, cfg["vocab_size"], size=(2, 20), dtype=np.int32)
    save_file({"input_ids": ids}, str(tmp_path / "in.safetensors"))
    r = subprocess.run([dsv3_bin, "grads", "--model", str(mdir), "--input", str(tmp_path / "in.safetensors"),
                        "--output", str(tmp_path / "g.safetensors")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    got = load_file(str(tmp_path / "g.safetensors"))
    t = torch.from_numpy(ids).long()
    loss = model(t, labels=t).loss
    loss.backward()
    assert abs(float(got["loss"][0]) - loss.item()) / loss.item() < 1e-5
    I = cfg["moe_intermediate_size"]
    n = 0
    for name, p in model.named_parameters():
        want = p.grad.numpy() if p.grad is not None else np.zeros(p.shape, np.float32)
        if name.endswith("experts.gate_up_proj"):
            pre = "grad." + name[: -len("gate_up_proj")]
            mine = np.stack([np.concatenate([got[f"{pre}{e}.gate_proj.weight"], got[f"{pre}{e}.up_proj.weight"]])
                             for e in range(p.shape[0])])
        elif name.endswith("experts.down_proj"):
            pre = "grad." + name[: -len("down_proj")]
            mine = np.stack([got[f"{pre}{e}.down_proj.weight"] for e in range(p.shape[0])])
        else:
            mine = got["grad." + name]
        if ".indexer." in name:
            assert p.grad is None and not mine.any(), name
        else:
            assert np.linalg.norm(mine - want) / np.linalg.norm(want) < 1e-4, name
        n += 1
    assert n > 40 and I > 0


def test_v32_init_serve_and_batching_match_transformers(tmp_path, dsv3_bin, test_data, monkeypatch):
    """`dsv3 init` writes a V3.2 directory transformers loads; `dsv3 serve` on it (DeepSeek-V3's vocabulary, so
    the bundled tokenizer applies) answers concurrent greedy completions with transformers' greedy tokens."""
    openai = pytest.importorskip("openai")
    tokenizers = pytest.importorskip("tokenizers")
    import concurrent.futures as cf
    import socket
    import time
    import urllib.request
    cfg = json.loads((test_data / "tiny-v32" / "config.json").read_text())
    cfg.update(vocab_size=129280, index_topk=4)  # max_position 128 = 4 x 32: YaRN factor consistent
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    mdir = tmp_path / "m"
    subprocess.run([dsv3_bin, "init", "--config", str(tmp_path / "config.json"), "--output", str(mdir), "--seed", "5",
                    "--dtype", "f32"], check=True, capture_output=True)
    model = transformers.AutoModelForCausalLM.from_pretrained(mdir, dtype=torch.float32,
                                                              attn_implementation="eager").eval()
    assert type(model).__name__ == "DeepseekV32ForCausalLM"
    tok = tokenizers.Tokenizer.from_file(str(test_data.parents[1] / "data" / "tokenizers" / "deepseek-v3" /
                                             "tokenizer.json"))
    # Prompts whose top-k selections are tie-free all along (checked; repeated tokens, for one, tie exactly).
    prompts = [[5, 900, 31, 7000, 12, 64000, 3, 77, 2048], [100, 2000, 30000], [9, 8, 7, 6, 5000],
               [1234, 4321, 77777, 11]]
    monkeypatch.setattr(mv32.DeepseekV32Indexer, "forward", margin.check_margin(mv32.DeepseekV32Indexer.forward))
    monkeypatch.setattr(margin, "min_gap", [float("inf")])
    want = []
    for p in prompts:
        with torch.no_grad():
            ids = model.generate(torch.tensor([p]), max_new_tokens=10, do_sample=False, eos_token_id=None,
                                 pad_token_id=0)[0, len(p):].tolist()
        want.append(tok.decode(ids, skip_special_tokens=True))  # as the server renders text
    assert margin.min_gap[0] > 1e-4, margin.min_gap[0]
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    srv = subprocess.Popen([dsv3_bin, "serve", "--model", str(mdir), "--port", str(port), "--served-model-name", "v32"],
                           stderr=subprocess.PIPE, text=True)
    try:
        for _ in range(300):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1)
                break
            except Exception:
                assert srv.poll() is None, srv.stderr.read()
                time.sleep(0.1)
        c = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", timeout=120, max_retries=0)

        def ask(p):
            return c.completions.create(model="v32", prompt=p, max_tokens=10, temperature=0).choices[0].text

        with cf.ThreadPoolExecutor(len(prompts)) as ex:  # concurrent: prefill and decode steps share batches
            got = list(ex.map(ask, prompts))
        assert got == want
    finally:
        srv.terminate()
        srv.wait(timeout=10)
