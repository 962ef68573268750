#!/usr/bin/env python3
"""Makes the DeepSeek-V4 gradient fixture tests/data/tiny-v4-grad with Hugging Face transformers autograd.

Loads the tiny-v4-fwd model (tools/make_v4_logits_fixture.py: 5 layers sliding / CSA / HCA / CSA / HCA, 2 hash
layers, 3 mHC streams, fp32, eager attention and experts), runs the causal-LM loss (labels = input_ids, mean
cross-entropy over the B * (T - 1) shifted targets) on the fixture's two 38-token rows in one batch, and
back-propagates. Parameters without a gradient (the lightning indexer: its output is top-k indices) are
written as zeros.

Writes, under OUT_DIR: config.json (copied), model.safetensors holding every parameter's GRADIENT under the
parameter's checkpoint name (save_pretrained of the model with each parameter replaced by its gradient, so the
C++ loader reads it into the same flat layout as the weights; buffers tid2eid / selection biases are saved
unchanged), reference.safetensors (input_ids [2, 38] int32, loss [1] fp32) and case.json.

Usage: python3 tools/make_v4_grad_fixture.py FWD_DIR OUT_DIR
"""
import json
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
import transformers
from safetensors.numpy import load_file, save_file


def main():
    src, out = Path(sys.argv[1]), Path(sys.argv[2])
    out.mkdir(parents=True, exist_ok=True)
    model = transformers.DeepseekV4ForCausalLM.from_pretrained(src, dtype=torch.float32, attn_implementation="eager",
                                                               experts_implementation="eager")
    model.eval()  # no dropout exists; eval only fixes the mode
    ids = load_file(str(src / "reference.safetensors"))["input_ids"].astype(np.int32)
    x = torch.from_numpy(ids).long()
    out_ = model(input_ids=x, labels=x, use_cache=False)
    out_.loss.backward()
    none = []
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.grad is None:
                none.append(name)
                p.zero_()
            else:
                p.copy_(p.grad)
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        shutil.copy(Path(tmp) / "model.safetensors", out / "model.safetensors")
    shutil.copy(src / "config.json", out / "config.json")
    save_file({"input_ids": ids, "loss": np.array([out_.loss.item()], dtype=np.float32)},
              str(out / "reference.safetensors"))
    case = {"case": out.name, "from": src.name, "batch": int(ids.shape[0]), "seq": int(ids.shape[1]),
            "loss": out_.loss.item(), "no_gradient": none,
            "reference": f"transformers {transformers.__version__} DeepseekV4ForCausalLM autograd, float32, eager "
                         f"attention and experts, use_cache=False, torch {torch.__version__}"}
    (out / "case.json").write_text(json.dumps(case, indent=2) + "\n")
    print(json.dumps({k: v for k, v in case.items() if k != "no_gradient"}), len(none), "parameters without gradient")


if __name__ == "__main__":
    main()
