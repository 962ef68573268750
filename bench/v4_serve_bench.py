"""Decode tokens/s of `dsv3 serve` with several concurrent greedy streams (a DeepSeek-V4 model directory, or any):
each round times 1 stream and then --clients streams together, back to back, from one asyncio client loop (so
the client's own CPU time stays small next to the server's); prints every round and the medians.

  python3 bench/v4_serve_bench.py --bin build/dsv3 --model DIR [--clients 8] [--tokens 64] [--rounds 5]
                                  [--char-tokenizer]
--char-tokenizer writes a character-level tokenizer (ids 2.. printable ASCII, <bos> 0, <eos> 1) into DIR, for a
model made by `dsv3 init` without one (e.g. configs/demo-v4.json). Prompts are token ids, streams ignore EOS.
"""
import argparse
import asyncio
import json
import pathlib
import socket
import statistics
import subprocess
import time
import urllib.request


CHARS = [chr(c) for c in range(32, 127)] + ["\n"]


def write_char_tokenizer(d):
    special = lambda i, t: {"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
                            "normalized": False, "special": True}
    tok = {"version": "1.0", "truncation": None, "padding": None,
           "added_tokens": [special(0, "<bos>"), special(1, "<eos>")], "normalizer": None, "pre_tokenizer": None,
           "post_processor": None, "decoder": None,
           "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                     "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                     "vocab": {"<bos>": 0, "<eos>": 1, **{c: i + 2 for i, c in enumerate(CHARS)}}, "merges": []}}
    pathlib.Path(d, "tokenizer.json").write_text(json.dumps(tok))
    pathlib.Path(d, "tokenizer_config.json").write_text(json.dumps({"bos_token": "<bos>", "eos_token": "<eos>"}))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def stream(port, n_tokens, prompt):
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    body = json.dumps({"model": "m", "prompt": prompt, "max_tokens": n_tokens, "temperature": 0, "stream": True,
                       "stream_options": {"include_usage": True}, "ignore_eos": True}).encode()
    writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body) + body)
    await writer.drain()
    usage = None
    while True:
        line = await reader.readline()
        if not line or line.strip() == b"data: [DONE]":
            break
        if line.startswith(b"data: ") and b'"usage"' in line:
            ev = json.loads(line[6:])
            usage = ev.get("usage") or usage
    writer.close()
    assert usage, "no usage in the stream"
    return usage["completion_tokens"]


def tokens_per_s(port, n_tokens, clients):
    async def run():
        t0 = time.time()
        toks = await asyncio.gather(*(stream(port, n_tokens, [3 + i, 17 + i, 40 + i, 5]) for i in range(clients)))
        return sum(toks) / (time.time() - t0)
    return asyncio.run(run())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--char-tokenizer", action="store_true")
    a = ap.parse_args()
    if a.char_tokenizer:
        write_char_tokenizer(a.model)
    port = free_port()
    p = subprocess.Popen([a.bin, "serve", "--model", a.model, "--port", str(port), "--max-batch", "32",
                          "--served-model-name", "m"], stderr=subprocess.DEVNULL)
    try:
        for _ in range(300):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1)
                break
            except Exception:
                if p.poll() is not None:
                    raise SystemExit("server exited")
                time.sleep(0.1)
        tokens_per_s(port, 8, a.clients)  # warm-up
        single, multi = [], []
        for r in range(a.rounds):
            single.append(tokens_per_s(port, a.tokens, 1))
            multi.append(tokens_per_s(port, a.tokens, a.clients))
            print(f"round {r}: 1 stream {single[-1]:.0f} tokens/s, {a.clients} streams {multi[-1]:.0f} tokens/s")
        print(f"median: 1 stream {statistics.median(single):.0f} tokens/s, {a.clients} streams "
              f"{statistics.median(multi):.0f} tokens/s")
    finally:
        p.terminate()
        p.wait(timeout=10)


if __name__ == "__main__":
    main()
