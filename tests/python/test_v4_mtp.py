"""DeepSeek-V4 MTP block (mtp.0.*) against an independent torch reference built from transformers' own
DeepseekV4DecoderLayer: `dsv3 init` writes a model with an MTP block, its weights are perturbed, `dsv3 logits`
gives mtp_logits.1; transformers loads the main model (it drops mtp.*) and, from a copy of the checkpoint where the
MTP block's tensors are renamed to layer L = num_hidden_layers (so transformers' own name conversion loads them), a
decoder layer for layer id L. The MTP input X0 = hnorm(X) h_proj^T + enorm(embed(id_{t+1})) e_proj^T is computed
here from the spec's formulas, fed into that layer, then the MTP block's hc_head, norm and the shared head."""
import json
import pathlib
import subprocess

import numpy as np
import pytest

CFG = dict(
    architectures=["DeepseekV4ForCausalLM"], model_type="deepseek_v4", vocab_size=96, hidden_size=32,
    moe_intermediate_size=16, num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
    q_lora_rank=16, o_groups=2, o_lora_rank=8, qk_rope_head_dim=8, n_routed_experts=4, n_shared_experts=1,
    num_experts_per_tok=2, routed_scaling_factor=1.5, scoring_func="sqrtsoftplus", num_hash_layers=1,
    compress_rates={"compressed_sparse_attention": 4, "heavily_compressed_attention": 8}, sliding_window=8,
    index_n_heads=2, index_head_dim=16, index_topk=16, hc_mult=2, hc_sinkhorn_iters=20, max_position_embeddings=64,
    rope_theta=10000.0, compress_rope_theta=160000.0, rms_norm_eps=1e-6, initializer_range=0.2,
    num_nextn_predict_layers=1, bos_token_id=0, eos_token_id=1, tie_word_embeddings=False, torch_dtype="float32",
)
MAIN = ["sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention"]
T = 24


def run(*args):
    return subprocess.run([str(a) for a in args], capture_output=True, text=True)


def make_model(dsv3_bin, d, mtp_type):
    from safetensors.numpy import load_file, save_file
    d.mkdir()
    cfg = dict(CFG, layer_types=MAIN + [mtp_type])
    (d / "cfg.json").write_text(json.dumps(cfg))
    r = run(dsv3_bin, "init", "--config", d / "cfg.json", "--output", d / "m", "--seed", "3")
    assert r.returncode == 0, r.stderr
    # Away from the special init values (norms 1, mHC base 0, biases 0): every tensor gets noise.
    t = load_file(str(d / "m" / "model.safetensors"))
    rng = np.random.default_rng(4)
    t = {k: (v + rng.normal(0, 0.1, v.shape).astype(np.float32)) if v.dtype == np.float32 else v for k, v in t.items()}
    save_file(t, str(d / "m" / "model.safetensors"), metadata={"format": "pt"})
    return d / "m", cfg, t


@pytest.mark.parametrize("mtp_type", ["sliding_attention", "heavily_compressed_attention"])
def test_v4_mtp_logits_match_a_transformers_decoder_layer(dsv3_bin, tmp_path, mtp_type):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    if not hasattr(transformers, "DeepseekV4ForCausalLM"):
        pytest.skip(f"transformers {transformers.__version__} has no deepseek_v4")
    from safetensors.numpy import load_file, save_file
    m, cfg, t = make_model(dsv3_bin, tmp_path / "a", mtp_type)
    r = run(dsv3_bin, "info", "--model", m)
    assert r.returncode == 0 and "1 MTP block" in r.stdout and mtp_type in r.stdout, r.stdout + r.stderr
    ids = np.random.default_rng(5).integers(2, CFG["vocab_size"], size=(1, T)).astype(np.int32)
    save_file({"input_ids": ids}, str(tmp_path / "ids.safetensors"))
    r = run(dsv3_bin, "logits", "--model", m, "--input", tmp_path / "ids.safetensors", "--output",
            tmp_path / "out.safetensors")
    assert r.returncode == 0, r.stderr
    out = load_file(str(tmp_path / "out.safetensors"))
    got_main, got = out["logits"], out["mtp_logits.1"]
    assert got.shape == (1, T - 1, CFG["vocab_size"])

    kw = dict(dtype=torch.float32, attn_implementation="eager", experts_implementation="eager")
    main = transformers.DeepseekV4ForCausalLM.from_pretrained(m, **kw).eval()
    streams = {}
    main.model.hc_head.register_forward_hook(lambda mod, args, res: streams.update(X=args[0].detach().clone()))
    L = CFG["num_hidden_layers"]
    # The MTP block as layer L of an (L + 1)-layer model: its tensors renamed, everything else as is.
    blk = tmp_path / "blk"
    blk.mkdir()
    own = ("e_proj.", "h_proj.", "enorm.", "hnorm.", "norm.", "hc_head_")
    t2 = {k: v for k, v in t.items() if not k.startswith("mtp.")}
    t2.update({f"layers.{L}." + k[6:]: v for k, v in t.items() if k.startswith("mtp.0.") and not k[6:].startswith(own)})
    save_file(t2, str(blk / "model.safetensors"), metadata={"format": "pt"})
    (blk / "config.json").write_text(json.dumps(dict(cfg, num_hidden_layers=L + 1, num_nextn_predict_layers=0)))
    full = transformers.DeepseekV4ForCausalLM.from_pretrained(blk, **kw).eval()
    layer = full.model.layers[L]

    def w(name):
        return torch.from_numpy(t[name].copy())

    def rms(x, weight):
        return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + CFG["rms_norm_eps"]))

    with torch.no_grad():
        want_main = main(torch.from_numpy(ids).long()).logits.numpy()
        X = streams["X"][:, :-1]                                          # [1, T-1, N, d], rows 0..T-2
        nxt = torch.from_numpy(ids[:, 1:]).long()                         # token t+1 of row t
        e = rms(main.model.embed_tokens(nxt), w("mtp.0.enorm.weight"))
        X0 = rms(X, w("mtp.0.hnorm.weight")) @ w("mtp.0.h_proj.weight").T + (e @ w("mtp.0.e_proj.weight").T)[:, :, None]
        # The (L + 1)-layer model with only layer L left, its input replaced by X0, and the MTP block's own head.
        full.model.layers = torch.nn.ModuleList([layer])
        layer.register_forward_pre_hook(lambda mod, args: (X0,) + tuple(args[1:]))
        full.model.hc_head.hc_fn.copy_(w("mtp.0.hc_head_fn"))
        full.model.hc_head.hc_base.copy_(w("mtp.0.hc_head_base"))
        full.model.hc_head.hc_scale.copy_(w("mtp.0.hc_head_scale"))
        full.model.norm.weight.copy_(w("mtp.0.norm.weight"))
        want = full(nxt, use_cache=False).logits.numpy()
    assert np.abs(got_main - want_main).max() / np.abs(want_main).max() < 1e-5  # the main model ignores mtp.*
    err = np.abs(got - want).max() / np.abs(want).max()

    def ce(lg, tgt):
        lg = lg.astype(np.float64)
        mx = lg.max(-1, keepdims=True)
        lse = np.log(np.exp(lg - mx).sum(-1)) + mx[..., 0]
        return float(np.mean(lse - np.take_along_axis(lg, tgt[..., None], -1)[..., 0]))

    tgt = ids[:, 2:].astype(np.int64)
    lerr = abs(ce(got[:, :-1], tgt) - ce(want[:, :-1], tgt)) / ce(want[:, :-1], tgt)
    print(f"[v4 mtp vs transformers layer] {mtp_type}: logits max err / max {err:.2e}, loss rel err {lerr:.2e}")
    assert err <= 1e-4 and lerr <= 1e-4, (err, lerr)


def test_v4_mtp_checkpoint_without_mtp_and_bad_blocks(dsv3_bin, tmp_path):
    from safetensors.numpy import load_file, save_file
    m, cfg, t = make_model(dsv3_bin, tmp_path / "a", "sliding_attention")
    # transformers-made checkpoints have no mtp.*: MTP off, noted by info, logits without mtp_logits
    d = tmp_path / "nomtp"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(cfg))
    save_file({k: v for k, v in t.items() if not k.startswith("mtp.")}, str(d / "model.safetensors"))
    r = run(dsv3_bin, "info", "--model", d)
    assert r.returncode == 0 and "no mtp.* tensors" in r.stdout, r.stdout + r.stderr
    for name, bad in [("mtp.0.h_proj.weight", None), ("mtp.0.e_proj.weight", np.zeros((16, 64), np.float32))]:
        b = tmp_path / name.replace(".", "_")
        b.mkdir()
        (b / "config.json").write_text(json.dumps(cfg))
        tb = {k: v for k, v in t.items() if k != name}
        if bad is not None:
            tb[name] = bad
        save_file(tb, str(b / "model.safetensors"))
        r = run(dsv3_bin, "info", "--model", b)
        assert r.returncode == 1 and r.stderr.startswith("error:") and r.stderr.count("\n") == 1, r.stderr
        assert name in r.stderr, r.stderr


@pytest.mark.parametrize("mtp_type", ["sliding_attention", "heavily_compressed_attention"])
def test_v4_speculative_mtp_equals_plain_greedy(dsv3_bin, tmp_path, mtp_type):
    m, _, _ = make_model(dsv3_bin, tmp_path / "a", mtp_type)

    def gen(*extra, prompt="5,9,17,33,2,70", n=40):
        r = run(dsv3_bin, "generate", "--model", m, "--prompt-ids", prompt, "-n", str(n), "--json", "--ignore-eos", *extra)
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout)

    for prompt, n in [("5,9,17,33,2,70", 40), ("3", 25), (",".join(["7"] * 40), 30)]:  # the last runs into the 64 limit
        plain, spec = gen(prompt=prompt, n=n), gen("--speculative", "mtp", prompt=prompt, n=n)
        assert spec["output_ids"] == plain["output_ids"], (prompt, spec, plain)
        assert spec["drafted"] > 0
    r = run(dsv3_bin, "generate", "--model", m, "--prompt-ids", "1,2", "--speculative", "mtp", "--temperature", "0.7")
    assert r.returncode != 0 and r.stderr.startswith("error:") and "greedy" in r.stderr, r.stderr
