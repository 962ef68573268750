#!/usr/bin/env python3
"""The transformers peer of `dsv3 bench-train`: training tokens/s of DeepseekV3ForCausalLM on the same config.

Random init, fp32 master weights, torch.autocast to bf16 for the forward and backward, SDPA attention,
torch.optim.AdamW(fused=True on a GPU), random token ids; each step is forward + backward + optimizer step of
the next-token loss. transformers has neither MTP nor the sequence-wise balance loss, so compare against a config
without MTP modules (bench/configs/train-s.json has none). Experts run eagerly (a loop over experts); with
`--experts grouped_mm` the grouped-GEMM implementation is used when this transformers has it (else the run is
skipped with a message). Prints one JSON object (and writes it to --json).
Usage: python3 bench/gpu_train_transformers.py --config bench/configs/train-s.json --batch 8 --seq 1024 \
           --steps 10 --json OUT [--device cuda|cpu] [--experts eager|grouped_mm] [--warmup 2]
"""
import argparse
import json
import sys
import time

import torch


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="bench/configs/train-s.json")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--experts", default="eager", choices=["eager", "grouped_mm"])
    ap.add_argument("--json")
    args = ap.parse_args()

    import transformers
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    dev = torch.device(args.device)
    cuda = dev.type == "cuda"
    cfg = json.load(open(args.config))
    cfg.pop("torch_dtype", None)
    config = DeepseekV3Config(**cfg)
    res = {"torch": torch.__version__, "transformers": transformers.__version__, "device": str(dev),
           "batch": args.batch, "seq": args.seq, "steps": args.steps, "experts": args.experts}
    torch.manual_seed(0)
    with dev:
        model = DeepseekV3ForCausalLM._from_config(config, attn_implementation="sdpa", dtype=torch.float32)
    if args.experts != "eager":
        if not hasattr(model, "set_experts_implementation"):
            msg = f"transformers {transformers.__version__} has no experts implementations; skipped"
            print(msg, file=sys.stderr)
            res["skipped"] = msg
            return finish(res, args.json)
        try:
            model.set_experts_implementation(args.experts)
        except Exception as e:  # an implementation this version or device lacks
            msg = f"experts implementation {args.experts} unavailable: {str(e)[:200]}; skipped"
            print(msg, file=sys.stderr)
            res["skipped"] = msg
            return finish(res, args.json)
    model.train()
    res["params"] = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=cuda)
    V = config.vocab_size

    def sync():
        if cuda:
            torch.cuda.synchronize()

    measured, loss = 0.0, float("nan")
    for step in range(args.warmup + args.steps):
        ids = torch.randint(0, V, (args.batch, args.seq), device=dev)
        sync()
        t = time.perf_counter()
        with torch.autocast(dev.type, dtype=torch.bfloat16):
            out = model(input_ids=ids, labels=ids, use_cache=False)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        if step >= args.warmup:
            measured += time.perf_counter() - t
        loss = float(out.loss.detach())
    tokens = args.batch * args.seq * args.steps
    res.update({"tokens_per_s": tokens / measured, "ms_per_step": 1e3 * measured / args.steps, "last_loss": loss})
    if cuda:
        res["peak_memory_GiB"] = torch.cuda.max_memory_allocated() / 2**30
    return finish(res, args.json)


def finish(res, path):
    print(json.dumps(res))
    if path:
        with open(path, "w") as f:
            json.dump(res, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
