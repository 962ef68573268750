#!/usr/bin/env python3
"""How far a bf16 run of the reference implementation itself lands from the fp32 fixture logits.

Loads each fixture with transformers in bfloat16 on the GPU (eager attention, bf16 activations, as in the dsv3
CUDA backend) and prints ||logits_bf16 - reference|| / ||reference|| per case, with the share of rows whose own
error exceeds 5% (one expert chosen differently by the router changes a row far more than rounding does).
Usage: python3 bench/gpu_fixture_bf16.py tests/data
"""
import json
import os
import sys

import torch
from safetensors.torch import load_file


def main():
    root = sys.argv[1] if len(sys.argv) > 1 else "tests/data"
    from transformers import DeepseekV3ForCausalLM

    out = {}
    for case in ["tiny-fp32", "tiny-bf16-yarn"]:
        d = os.path.join(root, case)
        ref = load_file(os.path.join(d, "reference.safetensors"))
        ids = ref["input_ids"].long().cuda()
        want = ref["logits"].float().cuda()
        res = {}
        for dt in [torch.float32, torch.bfloat16]:
            try:
                m = DeepseekV3ForCausalLM.from_pretrained(d, dtype=dt, attn_implementation="eager").cuda().eval()
                with torch.no_grad():
                    got = m(input_ids=ids).logits.float()
                diff = (got - want).reshape(-1, want.shape[-1])
                row = diff.norm(dim=1) / want.reshape(-1, want.shape[-1]).norm(dim=1)
                res[str(dt).split(".")[-1]] = {
                    "rel_err": float((got - want).norm() / want.norm()),
                    "rows_over_5pct": float((row > 0.05).float().mean()),
                    "median_row_err": float(row.median()),
                }
            except Exception as e:  # a case this transformers cannot load
                res[str(dt).split(".")[-1]] = {"error": str(e)[:160]}
        out[case] = res
        print(case, json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
