"""FP8 inference accuracy of a model: `dsv3 logits --dtype fp8` against `--dtype f32` on held-out tokens.

  python3 bench/fp8_accuracy.py --dsv3 build/dsv3 --model runs/demo/run/checkpoint --data runs/demo/data

Prints the relative logit error ||fp8 - f32|| / ||f32|| and the top-1 agreement over B x T positions taken
from the validation tokens of a `dsv3 prepare-data` directory (val.bin: int32 token ids after a header).
"""
import argparse
import json
import os
import subprocess
import tempfile

import numpy as np
from safetensors.numpy import load_file, save_file


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dsv3", default="build/dsv3")
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    a = ap.parse_args()
    meta = json.load(open(os.path.join(a.data, "meta.json")))
    n = meta["val_tokens"]
    toks = np.fromfile(os.path.join(a.data, "val.bin"), dtype=np.int32)[-n:]
    need = a.batch * a.seq
    if len(toks) < need:
        raise SystemExit(f"only {len(toks)} validation tokens, need {need}")
    step = (len(toks) - a.seq) // a.batch
    ids = np.stack([toks[i * step:i * step + a.seq] for i in range(a.batch)]).astype(np.int32)
    with tempfile.TemporaryDirectory() as d:
        save_file({"input_ids": ids}, os.path.join(d, "in.safetensors"))
        out = {}
        for dt in ("f32", "fp8"):
            o = os.path.join(d, f"{dt}.safetensors")
            subprocess.run([a.dsv3, "logits", "--model", a.model, "--input", os.path.join(d, "in.safetensors"),
                            "--output", o, "--dtype", dt], check=True)
            out[dt] = load_file(o)["logits"].reshape(need, -1).astype(np.float64)
    ref, got = out["f32"], out["fp8"]
    rel = np.linalg.norm(got - ref) / np.linalg.norm(ref)
    top1 = float(np.mean(got.argmax(1) == ref.argmax(1)))
    print(json.dumps({"positions": need, "rel_logit_error": rel, "top1_agreement": top1}))


if __name__ == "__main__":
    main()
