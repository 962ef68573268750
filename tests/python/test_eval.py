"""`dsv3 eval` against independent references: perplexity and bits per byte recomputed from `dsv3 logits`
(rolling windows redone here), multiple-choice log-likelihoods equal to lm-evaluation-harness' own numbers
(`lm_eval` with `local-completions` against `dsv3 serve` on the same local task, tests/python/lm_eval_tasks/),
generation with answer extraction and sandboxed code (pass@k) on a steered model whose output is known."""
import json
import math
import pathlib
import subprocess

import numpy as np
import pytest

from steered_model import copy_tokenizer, make_steered, small_config
from test_server import start_server, stop_server

from safetensors.numpy import load_file, save_file

HERE = pathlib.Path(__file__).resolve().parent
TASKS = HERE / "lm_eval_tasks"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, dsv3_bin, test_data):
    d = tmp_path_factory.mktemp("evalm")
    small_config(test_data, d / "config.json")
    subprocess.run([dsv3_bin, "init", "--config", str(d / "config.json"), "--output", str(d / "m"), "--seed", "5",
                    "--dtype", "f32"], check=True)
    copy_tokenizer(d / "m")
    return d / "m"


def run_eval(dsv3_bin, *args):
    p = subprocess.run([dsv3_bin, "eval", *map(str, args)], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout)


def seq_logprobs(dsv3_bin, model_dir, ids, tmp):
    """log p(ids[t] | ids[:t]) for t >= 1 from `dsv3 logits`, in float64."""
    save_file({"input_ids": np.array([ids], dtype=np.int32)}, str(tmp / "in.safetensors"))
    subprocess.run([dsv3_bin, "logits", "--model", str(model_dir), "--input", str(tmp / "in.safetensors"),
                    "--output", str(tmp / "out.safetensors")], check=True)
    lg = load_file(str(tmp / "out.safetensors"))["logits"][0].astype(np.float64)
    lsm = lg - lg.max(-1, keepdims=True)
    lsm -= np.log(np.exp(lsm).sum(-1, keepdims=True))
    return np.array([lsm[t - 1, ids[t]] for t in range(1, len(ids))])


def test_perplexity_and_bits_per_byte(dsv3_bin, model_dir, tmp_path):
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    texts = ["The quick brown fox jumps over the lazy dog. " * 3, "Zwölf Boxkämpfer jagen Viktor quer über den Sylter Deich."]
    files = []
    for i, t in enumerate(texts):
        (tmp_path / f"d{i}.txt").write_text(t)
        files.append(tmp_path / f"d{i}.txt")
    bos = 0
    docs = [tok.encode(t, add_special_tokens=False).ids for t in texts]
    # One window per document: the reference is the full-sequence log-likelihood of [BOS] + doc.
    r = run_eval(dsv3_bin, "perplexity", "--model", model_dir, "--input", *files)
    ll = sum(seq_logprobs(dsv3_bin, model_dir, [bos] + d, tmp_path).sum() for d in docs)
    ntok, nbytes = sum(map(len, docs)), sum(len(t.encode()) for t in texts)
    assert r["tokens"] == ntok and r["bytes"] == nbytes and r["windows"] == 2
    assert abs(r["loglikelihood"] - ll) < 1e-4 * ntok
    assert abs(r["perplexity"] - math.exp(-ll / ntok)) < 1e-4 * r["perplexity"]
    assert abs(r["bits_per_byte"] - (-ll / math.log(2) / nbytes)) < 1e-4
    # Rolling windows of 8 tokens predicting 3 new tokens each, recomputed here window by window.
    ctx, stride = 8, 3
    r2 = run_eval(dsv3_bin, "perplexity", "--model", model_dir, "--input", files[1], "--context", ctx, "--stride", stride)
    full = [bos] + docs[1]
    ref = 0.0
    for a in range(1, len(full), stride):
        b = min(len(full), a + stride)
        start = max(0, b - ctx)
        lp = seq_logprobs(dsv3_bin, model_dir, full[start:b], tmp_path)
        ref += lp[a - start - 1:].sum()
    assert abs(r2["loglikelihood"] - ref) < 1e-4 * len(docs[1])
    assert r2["windows"] == len(range(1, len(full), stride))


def test_perplexity_over_prepared_shards(dsv3_bin, model_dir, tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text("one small document.\n\nanother one, a little longer than the first.\n")
    subprocess.run([dsv3_bin, "prepare-data", "--tokenizer", str(model_dir), "--input", str(corpus), "--output",
                    str(tmp_path / "data"), "--doc-sep", "blank"], check=True, capture_output=True)
    shards = sorted((tmp_path / "data").glob("*.bin"))
    r = run_eval(dsv3_bin, "perplexity", "--model", model_dir, "--shards", *shards)
    n = sum((s.stat().st_size - 32) // 4 for s in shards)
    assert r["tokens"] == n and r["documents"] >= 2 and r["bits_per_byte"] > 0


def test_bad_eval_inputs(dsv3_bin, model_dir, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q", "choices": ["a"], "answer": 3}\n')
    for args in (["mc", "--model", model_dir, "--task", bad], ["mc", "--model", model_dir, "--task", tmp_path / "none.jsonl"],
                 ["perplexity", "--model", model_dir], ["code", "--model", model_dir, "--task", bad, "--samples", "1", "--k", "2"]):
        p = subprocess.run([dsv3_bin, "eval", *map(str, args)], capture_output=True, text=True)
        assert p.returncode == 1 and p.stderr.startswith("error: ") and len(p.stderr.strip().splitlines()) == 1, p.stderr
    (tmp_path / "junk.jsonl").write_text("{not json\n")
    p = subprocess.run([dsv3_bin, "eval", "mc", "--model", str(model_dir), "--task", str(tmp_path / "junk.jsonl")],
                       capture_output=True, text=True)
    assert p.returncode == 1 and "junk.jsonl:1" in p.stderr


def test_multiple_choice_equals_lm_eval_against_dsv3_serve(dsv3_bin, model_dir, tmp_path):
    pytest.importorskip("lm_eval")
    # transformers 5 loads DeepSeek-V3's tokenizer as a ByteLevel TokenizersBackend that adds no BOS, whatever
    # lm-eval's add_bos_token says: compare with dsv3 eval --no-bos.
    ours = run_eval(dsv3_bin, "mc", "--model", model_dir, "--task", TASKS / "tiny_mc.jsonl", "--log-samples",
                    tmp_path / "ours.jsonl", "--no-bos")
    mine = [json.loads(l) for l in (tmp_path / "ours.jsonl").read_text().splitlines()]
    p, base = start_server(dsv3_bin, model_dir)
    try:
        out = tmp_path / "lm"
        cmd = ["python3", "-m", "lm_eval", "--model", "local-completions", "--model_args",
               f"model=tiny,base_url={base}/v1/completions,tokenizer={model_dir},tokenizer_backend=huggingface,"
               "num_concurrent=2,max_retries=1,tokenized_requests=True",
               "--tasks", "tiny_mc", "--include_path", str(TASKS), "--log_samples", "--output_path", str(out)]
        r = subprocess.run(cmd, capture_output=True, text=True, cwd=TASKS, timeout=600,
                           env={**__import__("os").environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1",
                                "TOKENIZERS_PARALLELISM": "false"})
        assert r.returncode == 0, r.stderr[-4000:]
    finally:
        stop_server(p)
    samples = [json.loads(l) for f in out.rglob("samples_tiny_mc_*.jsonl") for l in f.read_text().splitlines()]
    results = json.loads(next(out.rglob("results_*.json")).read_text())["results"]["tiny_mc"]
    assert len(samples) == len(mine) == 6
    for s in samples:
        theirs = [float(x[0][0]) if isinstance(x[0], list) else float(x[0]) for x in s["resps"]]
        np.testing.assert_allclose(theirs, mine[s["doc_id"]]["loglikelihoods"], atol=1e-4)
    assert abs(results["acc,none"] - ours["acc"]) < 1e-9 and abs(results["acc_norm,none"] - ours["acc_norm"]) < 1e-9


# Steered chains (DeepSeek-V3 token ids, checked below): the generation prompt's last token ":" -> " 42\n\n",
# the code prompt's last token '."""\n' -> "    return a + b".
GEN = [28, 223, 3180, 271]
CODE = [77319, 361, 1354, 260, 940, 291]


@pytest.fixture(scope="module")
def steered(tmp_path_factory, dsv3_bin, test_data):
    from tokenizers import Tokenizer
    t = Tokenizer.from_file(str(HERE.parents[1] / "data/tokenizers/deepseek-v3/tokenizer.json"))
    assert t.decode(GEN[1:]) == " 42\n\n" and t.decode(CODE[1:]) == "    return a + b"
    eos = json.loads((test_data / "tiny-mtp" / "config.json").read_text())["eos_token_id"]
    return make_steered(dsv3_bin, test_data, tmp_path_factory.mktemp("esteer"), [GEN + [eos], CODE + [eos]])


def test_generation_exact_match(dsv3_bin, steered, tmp_path):
    task = tmp_path / "gsm.jsonl"
    task.write_text(json.dumps({"question": "What is 6 times 7?", "answer": "6 * 7 = 42\n#### 42"}) + "\n" +
                    json.dumps({"question": "What is 6 times 7?", "answer": "#### 41"}) + "\n")
    r = run_eval(dsv3_bin, "gen", "--model", steered, "--task", task, "--log-samples", tmp_path / "s.jsonl")
    s = [json.loads(l) for l in (tmp_path / "s.jsonl").read_text().splitlines()]
    assert [x["output"] for x in s] == [" 42", " 42"] and [x["extracted"] for x in s] == ["42", "42"]
    assert r["exact_match"] == 0.5 and r["documents"] == 2


def test_code_pass_at_k_in_the_sandbox(dsv3_bin, steered, tmp_path):
    prompt = 'def add(a, b):\n    """Sum."""\n'
    good = {"task_id": "t/0", "prompt": prompt, "entry_point": "add", "canonical_solution": "    return a + b\n",
            "test": "def check(f):\n    assert f(2, 3) == 5\n"}
    wrong = dict(good, task_id="t/1", test="def check(f):\n    assert f(2, 3) == 6\n")
    hang = dict(good, task_id="t/2", canonical_solution="    while True:\n        pass\n")
    task = tmp_path / "he.jsonl"
    task.write_text("".join(json.dumps(x) + "\n" for x in (good, wrong, hang)))
    ref = run_eval(dsv3_bin, "code", "--model", steered, "--task", task, "--references", "--timeout", "3",
                   "--cpu-seconds", "2", "--log-samples", tmp_path / "ref.jsonl")
    assert abs(ref["pass@1"] - 1 / 3) < 1e-9 and ref["timeouts"] == 1, (tmp_path / "ref.jsonl").read_text()
    # Generated: the steered model writes "    return a + b" for every sample (temperature 0 via logit margin).
    r = run_eval(dsv3_bin, "code", "--model", steered, "--task", task, "--samples", "2", "--k", "1", "2",
                 "--temperature", "0", "--log-samples", tmp_path / "s.jsonl")
    s = [json.loads(l) for l in (tmp_path / "s.jsonl").read_text().splitlines()]
    assert len(s) == 6 and all(x["completion"] == "    return a + b" for x in s)
    assert [x["passed"] for x in s] == [True, True, False, False, True, True]
    assert abs(r["pass@1"] - 2 / 3) < 1e-9 and abs(r["pass@2"] - 2 / 3) < 1e-9 and r["samples_passed"] == 4
