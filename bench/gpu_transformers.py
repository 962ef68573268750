#!/usr/bin/env python3
"""The transformers peer of bench/gpu_bench.cpp, measured in the same run on the same GPU.

Builds DeepseekV3ForCausalLM from the same config.json with random bf16 weights made on the GPU and times the
same work: prefill of one 2048-token prompt (logits of the last row), then decode steps of one token per sequence
at batch 1 and batch 32 after a 128-token prompt (KV cache, logits stay on the GPU). Prints one JSON object.
Usage: python3 bench/gpu_transformers.py --config bench/configs/infer-m.json [--json out.json] [--steps 16]
"""
import argparse
import json
import sys
import time

import torch


def now():
    torch.cuda.synchronize()
    return time.perf_counter()


@torch.no_grad()
def prefill(model, T, V, reps):
    times = []
    for i in range(reps + 1):
        ids = torch.randint(0, V, (1, T), device="cuda")
        t = now()
        model(input_ids=ids, use_cache=False, logits_to_keep=1)
        if i:  # the first run is warm-up
            times.append(now() - t)
    times.sort()
    return times[len(times) // 2]


@torch.no_grad()
def decode(model, B, steps, V, prompt=128):
    ids = torch.randint(0, V, (B, prompt), device="cuda")
    out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
    pkv = out.past_key_values
    nxt = torch.randint(0, V, (B, 1), device="cuda")
    for _ in range(3):
        out = model(input_ids=nxt, past_key_values=pkv, use_cache=True)
        pkv = out.past_key_values
    t = now()
    for _ in range(steps):
        out = model(input_ids=nxt, past_key_values=pkv, use_cache=True)
        pkv = out.past_key_values
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
    return (now() - t) / steps


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="bench/configs/infer-m.json")
    ap.add_argument("--json")
    ap.add_argument("--steps", type=int, default=16)
    args = ap.parse_args()

    import transformers
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    cfg = json.load(open(args.config))
    config = DeepseekV3Config(**cfg)
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    t0 = time.perf_counter()
    with torch.device("cuda"):
        model = DeepseekV3ForCausalLM(config)
    model.eval()
    torch.cuda.synchronize()
    V = config.vocab_size
    res = {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "params_B": sum(p.numel() for p in model.parameters()) / 1e9,
        "build_s": time.perf_counter() - t0,
    }
    impls = ["eager"]
    if hasattr(model, "set_experts_implementation"):
        impls.append("grouped_mm")
    for impl in impls:
        try:
            if impl != "eager":
                model.set_experts_implementation(impl)
            s = prefill(model, 2048, V, 3)
            res[f"prefill_2048_{impl}"] = {"s": s, "tok_s": 2048 / s}
        except Exception as e:  # an experts backend this version lacks
            res[f"prefill_2048_{impl}"] = {"error": str(e)[:200]}
    if len(impls) > 1:
        model.set_experts_implementation("eager")
    s1 = decode(model, 1, args.steps, V)
    res["decode_b1_eager"] = {"s_per_step": s1, "tok_s": 1 / s1}
    s32 = decode(model, 32, max(4, args.steps // 2), V)
    res["decode_b32_eager"] = {"s_per_step": s32, "tok_s": 32 / s32}
    print(json.dumps(res))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)


if __name__ == "__main__":
    sys.exit(main())
