"""`dsv3 eval` on a DeepSeek-V4 model directory: the tiny-v4-fwd fixture (vocabulary 128) with a character-level
tokenizer written here (ids 2.. for printable ASCII and newline, <bos> 0, <eos> 1). Perplexity must equal exp(mean NLL)
computed from `dsv3 logits` over the same [BOS] + document (one window, and rolling windows recomputed here);
multiple-choice log-likelihoods must equal the sums of the same log-probabilities; generation runs through the
same engine. Malformed inputs are one-line errors."""
import json
import math
import shutil
import subprocess

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

CHARS = [chr(c) for c in range(32, 127)] + ["\n"]


def tokenizer_json():
    special = lambda i, s: {"id": i, "content": s, "single_word": False, "lstrip": False, "rstrip": False,
                            "normalized": False, "special": True}
    return {"version": "1.0", "truncation": None, "padding": None,
            "added_tokens": [special(0, "<bos>"), special(1, "<eos>")], "normalizer": None, "pre_tokenizer": None,
            "post_processor": None, "decoder": None,
            "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                      "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                      "vocab": {"<bos>": 0, "<eos>": 1, **{c: i + 2 for i, c in enumerate(CHARS)}}, "merges": []}}


def encode(text):
    return [CHARS.index(c) + 2 for c in text]


@pytest.fixture(scope="module")
def v4_model(tmp_path_factory, test_data):
    d = tmp_path_factory.mktemp("v4eval") / "m"
    shutil.copytree(test_data / "tiny-v4-fwd", d)
    (d / "tokenizer.json").write_text(json.dumps(tokenizer_json()))
    (d / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<bos>", "eos_token": "<eos>",
                                                         "add_bos_token": True}))
    return d


def run_eval(dsv3_bin, *args):
    p = subprocess.run([dsv3_bin, "eval", *map(str, args)], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout)


def seq_logprobs(dsv3_bin, model, ids, tmp):
    """log p(ids[t] | ids[:t]) for t >= 1 from `dsv3 logits` (a fresh full-sequence forward), in float64."""
    save_file({"input_ids": np.array([ids], dtype=np.int32)}, str(tmp / "in.safetensors"))
    subprocess.run([dsv3_bin, "logits", "--model", str(model), "--input", str(tmp / "in.safetensors"), "--output",
                    str(tmp / "out.safetensors")], check=True, capture_output=True)
    lg = load_file(str(tmp / "out.safetensors"))["logits"].reshape(len(ids), -1).astype(np.float64)
    lsm = lg - lg.max(-1, keepdims=True)
    lsm -= np.log(np.exp(lsm).sum(-1, keepdims=True))
    return np.array([lsm[t - 1, ids[t]] for t in range(1, len(ids))])


def test_v4_perplexity_equals_logits(dsv3_bin, v4_model, tmp_path):
    texts = ["The quick brown fox jumps over the lazy dog.", "DeepSeek-V4 compresses its keys: 4 to 1, then 128!"]
    files = []
    for i, t in enumerate(texts):
        (tmp_path / f"d{i}.txt").write_text(t)
        files.append(tmp_path / f"d{i}.txt")
    docs = [encode(t) for t in texts]
    r = run_eval(dsv3_bin, "perplexity", "--model", v4_model, "--input", *files)
    nll = -sum(seq_logprobs(dsv3_bin, v4_model, [0] + d, tmp_path).sum() for d in docs)
    ntok = sum(map(len, docs))
    assert r["tokens"] == ntok and r["windows"] == 2 and r["documents"] == 2
    ppl = math.exp(nll / ntok)
    print(f"[v4 eval] perplexity {r['perplexity']:.7f} vs exp(mean NLL) from dsv3 logits {ppl:.7f} "
          f"(rel {abs(r['perplexity'] - ppl) / ppl:.2e})")
    assert abs(r["perplexity"] - ppl) <= 1e-5 * ppl
    assert abs(-r["loglikelihood"] - nll) <= 1e-5 * nll
    # Rolling windows of 16 tokens predicting 5 new ones each (windows longer than the HCA ratio 8 and the CSA
    # ratio 4, so compressed entries take part), recomputed window by window.
    ctx, stride = 16, 5
    r2 = run_eval(dsv3_bin, "perplexity", "--model", v4_model, "--input", files[1], "--context", ctx, "--stride", stride)
    full = [0] + docs[1]
    ref = 0.0
    for a in range(1, len(full), stride):
        b = min(len(full), a + stride)
        start = max(0, b - ctx)
        ref += seq_logprobs(dsv3_bin, v4_model, full[start:b], tmp_path)[a - start - 1:].sum()
    assert r2["windows"] == len(range(1, len(full), stride))
    assert abs(r2["loglikelihood"] - ref) <= 1e-5 * abs(ref)


def test_v4_multiple_choice_and_generation(dsv3_bin, v4_model, tmp_path):
    task = tmp_path / "mc.jsonl"
    docs = [{"question": "Pick a word:", "choices": ["cat", "dog", "bird"], "answer": 1},
            {"question": "2+2=", "choices": ["4", "22"], "answer": 0}]
    task.write_text("".join(json.dumps(d) + "\n" for d in docs))
    r = subprocess.run([dsv3_bin, "eval", "mc", "--model", v4_model, "--task", task, "--template", "{question}",
                        "--target-delimiter", " ", "--log-samples", tmp_path / "s.jsonl"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["documents"] == 2
    samples = [json.loads(l) for l in (tmp_path / "s.jsonl").read_text().splitlines()]
    for d, s in zip(docs, samples):
        for choice, ll in zip(d["choices"], s["loglikelihoods"]):
            ctx = [0] + encode(d["question"])
            lp = seq_logprobs(dsv3_bin, v4_model, ctx + encode(" " + choice), tmp_path)
            assert abs(ll - lp[len(ctx) - 1:].sum()) <= 1e-5 * max(1.0, abs(ll)), (d, choice, ll)
    gen = tmp_path / "gen.jsonl"
    gen.write_text(json.dumps({"question": "What is 1+1?", "answer": "2"}) + "\n")
    r = subprocess.run([dsv3_bin, "eval", "gen", "--model", v4_model, "--task", gen, "-n", "8"], capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr
    assert "exact_match" in json.loads(r.stdout), r.stdout


def test_v4_eval_bad_inputs(dsv3_bin, v4_model, tmp_path, test_data):
    def one_line(args, needle):
        r = subprocess.run([dsv3_bin, "eval", *map(str, args)], capture_output=True, text=True)
        assert r.returncode != 0 and r.stderr.startswith("error:") and r.stderr.count("\n") == 1, r.stderr
        assert needle in r.stderr, r.stderr
    (tmp_path / "d.txt").write_text("hello")
    # The bundled DeepSeek-V3 tokenizer does not fit a 128-token vocabulary.
    one_line(["perplexity", "--model", test_data / "tiny-v4-fwd", "--input", tmp_path / "d.txt"], "vocab_size")
    one_line(["perplexity", "--model", v4_model, "--input", tmp_path / "d.txt", "--device", "cuda"], "CPU")
    one_line(["perplexity", "--model", v4_model, "--input", tmp_path / "d.txt", "--context", "1"], "--context")
