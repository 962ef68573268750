"""A model whose greedy output is known in advance, for end-to-end tests of output parsing: every attention and
FFN output projection is zeroed, so the final hidden state is the current token's embedding, and lm_head maps
chosen tokens to chosen successors (a first-order chain) by a margin no random row reaches. Built from a
`dsv3 init` directory by editing its safetensors (what transformers would load too)."""
import json
import pathlib
import subprocess

import torch
from safetensors.torch import load_file, save_file

ROOT = pathlib.Path(__file__).resolve().parents[2]
TOKENIZER = ROOT / "data" / "tokenizers" / "deepseek-v3"


def small_config(test_data, out_path, **over):
    cfg = json.loads((test_data / "tiny-mtp" / "config.json").read_text())
    cfg.update(vocab_size=129280, hidden_size=128, intermediate_size=256, moe_intermediate_size=64,
               max_position_embeddings=1024)
    cfg.update(over)
    out_path.write_text(json.dumps(cfg))
    return cfg


def copy_tokenizer(model_dir):
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (model_dir / f).write_bytes((TOKENIZER / f).read_bytes())


def steer(model_dir, chains, margin=40.0):
    """chains: lists of token ids; each token's greedy successor becomes the next id of its list."""
    files = sorted(pathlib.Path(model_dir).glob("*.safetensors"))
    succ = {}
    for ch in chains:
        for a, b in zip(ch, ch[1:]):
            assert succ.get(a, b) == b, f"token {a} has two successors"
            succ[a] = b
    for f in files:
        w = load_file(str(f))
        for k in list(w):
            if k.endswith(("o_proj.weight", "down_proj.weight")):
                w[k] = torch.zeros_like(w[k])
        if "lm_head.weight" in w:
            emb = None
            for g in files:
                e = load_file(str(g))
                if "model.embed_tokens.weight" in e:
                    emb = e["model.embed_tokens.weight"].float()
            head = torch.randn(w["lm_head.weight"].shape, generator=torch.Generator().manual_seed(0)) * 1e-3
            H = emb.shape[1]
            for a, b in succ.items():
                x = emb[a] / emb[a].pow(2).mean().sqrt()  # what the final RMSNorm (weight 1) makes of it
                head[b] += margin * x / H
            w["lm_head.weight"] = head.to(w["lm_head.weight"].dtype)
        save_file(w, str(f), metadata={"format": "pt"})


def make_steered(dsv3_bin, test_data, d, chains):
    small_config(test_data, d / "config.json")
    subprocess.run([dsv3_bin, "init", "--config", str(d / "config.json"), "--output", str(d / "m"), "--seed", "4",
                    "--dtype", "f32"], check=True)
    steer(d / "m", chains)
    copy_tokenizer(d / "m")
    return d / "m"
