#!/usr/bin/env python3
"""Tokenizer encoding throughput: dsv3 against Hugging Face `tokenizers`, same machine, same text, same run.

Corpus: Python standard-library sources from this machine plus generated multilingual text (see
tests/python/tokenizer_corpus.py), one document per line. Both sides encode exactly the same documents
without special tokens, and the ids are checked to be identical before any number is reported.

  single thread: dsv3 encodes document by document on one thread; HF runs encode_batch with Rayon and
                 TOKENIZERS_PARALLELISM disabled (its fastest single-thread path, no Python per document)
  batch:         dsv3 encode_batch (OpenMP over documents, all cores); HF encode_batch (Rayon, all cores)

Each figure is the best of --repeat passes after a warm-up pass (both tokenizers cache words); dsv3's
first, cold-cache pass is reported as well.

Usage: python3 bench/bench_tokenizer.py [--dsv3 build/dsv3] [--tokenizer data/tokenizers/deepseek-v3]
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(ROOT, "tests", "python"))
import tokenizer_corpus  # noqa: E402

HF_WORKER = r"""
import json, sys, time
from tokenizers import Tokenizer
tok = Tokenizer.from_file(sys.argv[1])
docs = [json.loads(l)["text"] for l in open(sys.argv[2], encoding="utf-8")]
repeat = int(sys.argv[3])
tok.encode_batch(docs, add_special_tokens=False)  # warm-up
best = min(
    (lambda t0: (tok.encode_batch(docs, add_special_tokens=False), time.perf_counter() - t0)[1])(time.perf_counter())
    for _ in range(repeat))
ids = [e.ids for e in tok.encode_batch(docs, add_special_tokens=False)]
print(json.dumps({"seconds": best, "tokens": sum(map(len, ids)), "checksum": hash(tuple(map(tuple, ids)))}))
"""


def hf_run(tokenizer_json, corpus, repeat, threads):
    env = dict(os.environ)
    if threads == 1:
        env["TOKENIZERS_PARALLELISM"] = "false"
        env["RAYON_NUM_THREADS"] = "1"
    else:
        env["TOKENIZERS_PARALLELISM"] = "true"
        env["RAYON_NUM_THREADS"] = str(threads)
    out = subprocess.run([sys.executable, "-c", HF_WORKER, tokenizer_json, corpus, str(repeat)], env=env,
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dsv3", default=os.environ.get("DSV3_BIN", os.path.join(ROOT, "build", "dsv3")))
    ap.add_argument("--tokenizer", default=os.path.join(ROOT, "data", "tokenizers", "deepseek-v3"))
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--generated", type=int, default=20000, help="generated multilingual documents to add")
    args = ap.parse_args()

    docs = tokenizer_corpus.stdlib_sources() + tokenizer_corpus.generated_texts(args.generated)
    with tempfile.NamedTemporaryFile("w", suffix=".jsonl", delete=False, encoding="utf-8") as f:
        for d in docs:
            f.write(json.dumps({"text": d}) + "\n")
        corpus = f.name
    try:
        nbytes = sum(len(d.encode("utf-8")) for d in docs)
        tokenizer_json = os.path.join(args.tokenizer, "tokenizer.json")

        # Same ids first: a fast wrong tokenizer is not a result.
        out = subprocess.run([args.dsv3, "tokenize", "--tokenizer", args.tokenizer], stdin=open(corpus, "rb"),
                             capture_output=True, check=True)
        ours = [json.loads(l)["ids"] for l in out.stdout.decode().splitlines()]
        from tokenizers import Tokenizer
        theirs = [e.ids for e in Tokenizer.from_file(tokenizer_json).encode_batch(docs, add_special_tokens=False)]
        same = sum(a == b for a, b in zip(ours, theirs))
        if same != len(docs) or len(ours) != len(docs):
            sys.exit(f"ids differ on {len(docs) - same} of {len(docs)} documents; not benchmarking")

        ds = json.loads(subprocess.run(
            [args.dsv3, "tokenize", "--tokenizer", args.tokenizer, "--bench", corpus, "--threads", str(args.threads),
             "--repeat", str(args.repeat)], capture_output=True, text=True, check=True).stdout)
        hf1 = hf_run(tokenizer_json, corpus, args.repeat, 1)
        hfn = hf_run(tokenizer_json, corpus, args.repeat, args.threads)
    finally:
        os.unlink(corpus)

    mb = nbytes / 1e6
    hf1_mbs, hfn_mbs = mb / hf1["seconds"], mb / hfn["seconds"]
    print(f"corpus: {len(docs)} documents, {mb:.1f} MB, {ds['tokens']} tokens (ids identical to HF on every document)")
    print(f"machine: {os.cpu_count()} logical CPUs; batch runs use {args.threads} threads")
    print()
    print("| | dsv3 MB/s | HF tokenizers MB/s | dsv3 / HF |")
    print("| --- | ---: | ---: | ---: |")
    print(f"| single thread | {ds['single_mb_s']:.1f} | {hf1_mbs:.1f} | {ds['single_mb_s'] / hf1_mbs:.2f}x |")
    print(f"| single thread, cold word cache (dsv3 first pass) | {ds['single_cold_mb_s']:.1f} | | |")
    print(f"| batch, {args.threads} threads | {ds['batch_mb_s']:.1f} | {hfn_mbs:.1f} | {ds['batch_mb_s'] / hfn_mbs:.2f}x |")
    print(f"| batch scaling over single thread | {ds['batch_mb_s'] / ds['single_mb_s']:.2f}x | {hfn_mbs / hf1_mbs:.2f}x | |")


if __name__ == "__main__":
    main()
