"""The Python package (`pip install .`, `import dsv3`) against the dsv3 binary, which is the reference here: both
link the same library, so the package must give the binary's results bit for bit.

- logits (and MTP logits) equal `dsv3 logits` bit for bit, as NumPy arrays over the engine's buffer (no copy);
  loglikelihood equals a float64 log-softmax of those logits computed here with NumPy.
- streaming generation equals `dsv3 generate` (its streamed text and its ids; greedy, seeded sampling, MTP
  speculative decoding with its draft counts).
- dsv3.train: two steps equal `dsv3 train` (losses, gradient norms, MaxVio, validation, saved weights).
- tokenizer and chat template equal `dsv3 tokenize` / `detokenize` / `chat-template`.
- serve(): answers the openai client and raw HTTP in-process, then shuts down (port closed, model free).
- bad arguments raise dsv3.InputError / dsv3.Error with the engine's message; Ctrl-C stops generation and
  training (which saves first); the GIL is released during compute.

`./run test` installs the package into the build folder and sets DSV3_PYPKG to it; without it these tests use
an installed dsv3, or skip when there is none.
"""
import gc
import json
import os
import pathlib
import socket
import subprocess
import sys
import textwrap
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pytest

from dsv3_cli import minimal_tokenizer_dir

ROOT = pathlib.Path(__file__).resolve().parents[2]
PYPKG = os.environ.get("DSV3_PYPKG")
if PYPKG:
    sys.path.insert(0, PYPKG)
    import dsv3  # noqa: E402  (must import: ./run test built it)
else:
    dsv3 = pytest.importorskip("dsv3")
from safetensors.numpy import load_file, save_file  # noqa: E402

TINY = ROOT / "tests" / "data" / "train-tiny.json"
CHAT = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{{ eos_token }}{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def run(args, **kw):
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, **kw)


def child_env():
    env = dict(os.environ)
    if PYPKG:
        env["PYTHONPATH"] = PYPKG + os.pathsep + env.get("PYTHONPATH", "")
    return env


@pytest.fixture(scope="module")
def text_model(tmp_path_factory, dsv3_bin):
    """A tiny random model (vocabulary 320) with a small byte-level tokenizer and a chat template."""
    d = tmp_path_factory.mktemp("pkg")
    tok = minimal_tokenizer_dir(d / "tok", CHAT)
    cfg = json.loads(TINY.read_text())
    cfg["max_position_embeddings"] = 16384
    (d / "config.json").write_text(json.dumps(cfg))
    r = run([dsv3_bin, "init", "--config", d / "config.json", "--output", d / "m", "--seed", "5", "--tokenizer", tok])
    assert r.returncode == 0, r.stderr
    return d / "m"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, dsv3_bin):
    d = tmp_path_factory.mktemp("pkgdata")
    rng = np.random.default_rng(0)
    words = "the cat sat on a mat and then ran to see the dog who was big and red".split()
    (d / "a.txt").write_text("\n\n".join(" ".join(rng.choice(words, size=rng.integers(5, 30))) for _ in range(200)))
    r = run([dsv3_bin, "prepare-data", "--tokenizer", "bytes", "--input", d / "a.txt", "--output", d / "data"])
    assert r.returncode == 0, r.stderr
    return d / "data"


# ---- the installed package

def test_package_files():
    pkg = pathlib.Path(dsv3.__file__).parent
    assert (pkg / "_core.pyi").is_file(), "type stubs of the extension are missing"
    assert "class Model" in (pkg / "_core.pyi").read_text()
    assert (pkg / "py.typed").is_file()
    assert (pkg / "data" / "tokenizers" / "deepseek-v3" / "tokenizer.json").is_file()
    assert dsv3.Model.generate.__doc__ and dsv3.train.__doc__
    assert issubclass(dsv3.InputError, dsv3.Error) and issubclass(dsv3.InputError, ValueError)


# ---- logits and loglikelihood

@pytest.mark.parametrize("name", ["tiny-fp32", "tiny-mtp", "tiny-fp8"])
def test_logits_equal_cli_bit_for_bit(tmp_path, dsv3_bin, test_data, name):
    mdir = test_data / name
    cfg = json.loads((mdir / "config.json").read_text())
    ids = np.random.default_rng(7).integers(0, cfg["vocab_size"], size=(2, 19)).astype(np.int32)
    save_file({"input_ids": ids}, str(tmp_path / "in.safetensors"))
    r = run([dsv3_bin, "logits", "--model", mdir, "--input", tmp_path / "in.safetensors",
             "--output", tmp_path / "out.safetensors"])
    assert r.returncode == 0, r.stderr
    ref = load_file(str(tmp_path / "out.safetensors"))
    m = dsv3.Model(mdir)
    logits, mtp = m.logits(ids, mtp=True)
    assert logits.dtype == np.float32 and logits.shape == ref["logits"].shape
    assert np.array_equal(logits, ref["logits"])  # bit for bit (no NaNs in these logits)
    assert not logits.flags.owndata and logits.base is not None  # a view of the engine's buffer
    assert len(mtp) == cfg.get("num_nextn_predict_layers", 0)
    for k, a in enumerate(mtp, 1):
        assert np.array_equal(a, ref[f"mtp_logits.{k}"])
    one = m.logits(ids[1].tolist())  # a [T] list gives [T, V]
    assert one.shape == ref["logits"].shape[1:]
    del m, one
    gc.collect()
    assert np.array_equal(logits, ref["logits"])  # the array owns the buffer: it outlives the model


def test_loglikelihood_matches_log_softmax(test_data):
    m = dsv3.Model(test_data / "tiny-fp32")
    ids = np.random.default_rng(3).integers(0, m.vocab_size, size=(3, 11))
    lg = m.logits(ids).astype(np.float64)
    mx = lg.max(-1, keepdims=True)
    ls = lg - mx - np.log(np.exp(lg - mx).sum(-1, keepdims=True))
    want = np.take_along_axis(ls[:, :-1], ids[:, 1:, None], -1)[..., 0]
    got = m.loglikelihood(ids)
    assert got.shape == (3, 10) and got.dtype == np.float64
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-9)
    # context + continuation: the continuation's entries of the one-sequence array (batch 1 rounds differently)
    ctx, cont = ids[0, :6].tolist(), ids[0, 6:].tolist()
    one = m.loglikelihood(ids[0])
    assert one.shape == (10,) and np.abs(one - want[0]).max() < 1e-4
    assert m.loglikelihood(ctx, cont) == one[5:].sum()


# ---- generation

def test_streaming_generation_equals_cli(dsv3_bin, text_model):
    prompt = "the cat sat"
    r = run([dsv3_bin, "generate", "--model", text_model, "--prompt", prompt, "-n", "40", "--temperature", "0"])
    assert r.returncode == 0, r.stderr
    rj = run([dsv3_bin, "generate", "--model", text_model, "--prompt", prompt, "-n", "40", "--temperature", "0", "--json"])
    assert rj.returncode == 0, rj.stderr
    ref = json.loads(rj.stdout)
    m = dsv3.Model(text_model)
    stream = m.generate(prompt, 40, stream=True)
    pieces = list(stream)
    assert prompt + "".join(pieces) + "\n" == r.stdout  # what the CLI streamed, piece for piece
    assert stream.ids == ref["output_ids"] and stream.completion.ids == ref["output_ids"]
    assert stream.completion.finish_reason == ref["finish_reason"]
    whole = m.generate(prompt, 40)
    assert whole.ids == ref["output_ids"] and whole.text == ref["text"]
    # token-id prompts and seeded sampling follow the CLI too
    rs = run([dsv3_bin, "generate", "--model", text_model, "--prompt-ids", "5,6,7,8", "-n", "24", "--temperature", "0.9",
              "--top-k", "40", "--top-p", "0.9", "--seed", "11", "--json"])
    assert rs.returncode == 0, rs.stderr
    s = m.generate([5, 6, 7, 8], 24, temperature=0.9, top_k=40, top_p=0.9, seed=11, ignore_eos=True)
    assert s.ids == json.loads(rs.stdout)["output_ids"] and s.new_tokens == 24
    # MTP speculative decoding (this model has one MTP module): the CLI's tokens and draft counts
    rm = run([dsv3_bin, "generate", "--model", text_model, "--prompt-ids", "5,6,7,8", "-n", "24", "--temperature", "0",
              "--speculative", "mtp", "--ignore-eos", "--json"])
    assert rm.returncode == 0, rm.stderr
    want = json.loads(rm.stdout)
    sp = m.generate([5, 6, 7, 8], 24, ignore_eos=True, speculative="mtp")
    assert sp.ids == want["output_ids"] and (sp.drafted, sp.accepted) == (want["drafted"], want["accepted"])
    assert sp.drafted > 0


def test_stream_close_frees_the_model(text_model):
    m = dsv3.Model(text_model)
    s = m.generate([5, 6, 7], 2000, ignore_eos=True, stream=True)
    next(iter(s))
    with pytest.raises(dsv3.Error, match="busy"):
        m.logits([[1, 2, 3]])
    s.close()
    assert len(s.ids) < 2000
    assert m.logits([[1, 2, 3]]).shape == (1, 3, m.vocab_size)


def test_chat_uses_the_template(dsv3_bin, text_model):
    m = dsv3.Model(text_model)
    msgs = [{"role": "user", "content": "hi"}]
    text = m.tokenizer.apply_chat_template(msgs, add_generation_prompt=True)
    r = run([dsv3_bin, "chat-template", "--tokenizer", text_model],
            input=json.dumps({"messages": msgs, "add_generation_prompt": True}) + "\n")
    assert r.returncode == 0, r.stderr
    assert text == json.loads(r.stdout)["text"]
    c = m.chat(msgs, 8)
    assert c.ids == m.generate(m.tokenizer.encode(text), 8).ids


# ---- tokenizer

def test_tokenizer_equals_cli(dsv3_bin):
    tok = dsv3.Tokenizer()  # bundled DeepSeek-V3
    texts = ["Hello, world!", "naïve café 😀 — 123456", "  spaces\n\ttabs"]
    r = run([dsv3_bin, "tokenize", "--add-bos"], input="".join(json.dumps({"text": t}) + "\n" for t in texts))
    assert r.returncode == 0, r.stderr
    want = [json.loads(l)["ids"] for l in r.stdout.splitlines()]
    assert [tok.encode(t, add_bos=True) for t in texts] == want
    assert tok.encode_batch(texts) == [w[1:] for w in want]
    assert [tok.decode(w[1:]) for w in want] == texts
    assert tok.encode("Hello, world!") == [19923, 14, 2058, 3]


# ---- training

TRAIN = dict(config=str(TINY), batch=4, seq=32, lr=3e-3, warmup=3, log_every=1, eval_every=2, eval_batches=2)


def test_train_two_steps_equal_cli(tmp_path, dsv3_bin, corpus):
    a, b = tmp_path / "cli", tmp_path / "py"
    r = run([dsv3_bin, "train", "--config", TINY, "--batch", "4", "--seq", "32", "--lr", "3e-3", "--warmup", "3",
             "--log-every", "1", "--eval-every", "2", "--eval-batches", "2", "--data", corpus, "--steps", "2",
             "--out", a, "--no-report"])
    assert r.returncode == 0, r.stderr
    cli = [json.loads(l) for l in (a / "metrics.jsonl").read_text().splitlines() if l]
    records = []
    res = dsv3.train(**TRAIN, data=corpus, steps=2, out=b, report=False, on_step=records.append)
    assert res.step == 2 and not res.interrupted and pathlib.Path(res.checkpoint) == b / "checkpoint"
    assert [x["type"] for x in records] == ["train", "train", "val"]
    for got, want in zip(records, cli):
        for k in ("type", "step", "loss", "mtp_loss", "grad_norm", "lr", "maxvio", "load", "val_loss", "val_acc"):
            assert got.get(k) == want.get(k), k  # exact: the same doubles
    wa = load_file(str(a / "checkpoint" / "model.safetensors"))
    wb = load_file(str(b / "checkpoint" / "model.safetensors"))
    assert wa.keys() == wb.keys() and all(np.array_equal(wa[k], wb[k]) for k in wa)


def test_train_callback_stops_and_raises(tmp_path, corpus):
    seen = []

    def stop_at_one(rec):
        seen.append(rec["step"])
        return False

    res = dsv3.train(**TRAIN, data=corpus, steps=5, out=tmp_path / "s", report=False, on_step=stop_at_one)
    assert res.interrupted and res.step == 1 and seen == [1]
    assert json.loads((tmp_path / "s" / "checkpoint" / "trainer_state.json").read_text())["step"] == 1

    def boom(rec):
        raise ValueError("from the callback")

    with pytest.raises(ValueError, match="from the callback"):
        dsv3.train(**TRAIN, data=corpus, steps=5, out=tmp_path / "e", report=False, on_step=boom)
    # resume continues from the saved step with the saved options
    res = dsv3.train(resume=tmp_path / "s" / "checkpoint", report=False)
    assert res.step == 5 and not res.interrupted


# ---- serving

def test_serve_in_process(text_model):
    openai = pytest.importorskip("openai")
    m = dsv3.Model(text_model)
    with m.serve(port=0, block=False, served_model_name="tiny") as srv:
        assert srv.running and srv.port > 0
        base = f"http://127.0.0.1:{srv.port}"
        assert json.loads(urllib.request.urlopen(base + "/health", timeout=10).read())
        with pytest.raises(dsv3.Error, match="busy"):
            m.logits([[1, 2]])
        with openai.OpenAI(base_url=srv.url, api_key="none") as c:  # closed: no keep-alive connection delays stop
            r = c.completions.create(model="tiny", prompt=[5, 6, 7], max_tokens=12, temperature=0)
            assert r.usage.completion_tokens >= 1 and r.choices[0].finish_reason in ("stop", "length")
        req = urllib.request.Request(base + "/v1/completions", data=json.dumps({"model": "nope", "prompt": "x"}).encode(),
                                     headers={"Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(req, timeout=10)
        assert e.value.code == 404
    assert not srv.running
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", srv.port), timeout=2)
    assert m.logits([[1, 2]]).shape == (1, 2, m.vocab_size)  # the model is free again
    srv.stop()  # idempotent


def test_serve_rejects_bad_options(text_model):
    m = dsv3.Model(text_model)
    with pytest.raises(dsv3.InputError, match="prefill-chunk"):
        m.serve(port=0, block=False, prefill_chunk=0)
    with pytest.raises(dsv3.InputError, match="max-batch"):
        m.serve(port=0, block=False, max_batch=0)
    with pytest.raises(dsv3.InputError, match="port must be"):
        m.serve(port=70000, block=False)
    with socket.socket() as held:  # a port another program listens on
        held.bind(("127.0.0.1", 0))
        held.listen()
        with pytest.raises(dsv3.InputError, match="cannot listen"):
            m.serve(port=held.getsockname()[1], block=False)
    with m.serve(port=0, block=False) as srv:  # the failures above left the model free
        assert srv.running


# ---- bad arguments, Ctrl-C, the GIL

def test_bad_arguments_raise_clear_errors(tmp_path, test_data, text_model):
    with pytest.raises(dsv3.InputError, match="does not exist"):
        dsv3.Model(tmp_path / "missing")
    with pytest.raises(dsv3.InputError, match="dtype must be"):
        dsv3.Model(test_data / "tiny-fp32", dtype="f16")
    with pytest.raises(dsv3.Error, match="device"):
        dsv3.Model(test_data / "tiny-fp32", device="tpu")
    m = dsv3.Model(test_data / "tiny-fp32")
    with pytest.raises(dsv3.InputError, match="out of range for vocab_size"):
        m.logits([[1, m.vocab_size]])
    with pytest.raises(dsv3.InputError, match="integers"):
        m.logits([[0.5, 1.5]])
    with pytest.raises(dsv3.InputError, match="shape"):
        m.logits(np.zeros((1, 2, 3), dtype=np.int32))
    with pytest.raises(dsv3.InputError, match="out of range"):
        m.logits([[-1, 2]])
    with pytest.raises(dsv3.InputError, match="temperature"):
        m.generate([1, 2], 4, temperature=-1)
    with pytest.raises(dsv3.InputError, match="max_new_tokens"):
        m.generate([1, 2], -3)
    with pytest.raises(dsv3.InputError, match="exceeds max_position_embeddings"):
        m.generate([1] * (m.max_position_embeddings + 1), 1)
    with pytest.raises(dsv3.InputError, match="speculative"):
        m.generate([1, 2], 4, speculative="draft")
    with pytest.raises(dsv3.InputError, match="vocab_size"):  # the bundled tokenizer does not fit this model
        m.generate("text prompt", 4)
    tm = dsv3.Model(text_model)
    with pytest.raises(dsv3.InputError, match="exceeds max_position_embeddings"):  # raised from the stream's thread
        list(tm.generate([1] * (tm.max_position_embeddings + 1), 1, stream=True))
    assert tm.generate([1, 2], 2, ignore_eos=True).new_tokens == 2  # and the model is free again
    with pytest.raises(dsv3.InputError, match="unknown training option 'bogus'"):
        dsv3.train(config=str(TINY), data=str(tmp_path), steps=1, bogus=1)
    with pytest.raises(dsv3.InputError, match="'batch' has the wrong type"):
        dsv3.train(config=str(TINY), data=str(tmp_path), steps=1, batch="four")
    with pytest.raises(dsv3.InputError, match="give --steps or --tokens"):
        dsv3.train(config=str(TINY), data=str(tmp_path))
    with pytest.raises(dsv3.InputError):
        dsv3.Tokenizer(tmp_path / "nothing-here")
    with pytest.raises(dsv3.InputError, match="JSON-serializable"):
        dsv3.Model(text_model).tokenizer.apply_chat_template([{"role": "user", "content": object()}])


def run_interrupted(script, timeout=120):
    """Runs script in a child Python where arm() sends SIGINT to the process 0.5 s later; returns its stdout."""
    code = "import os, signal, threading, time\n" \
           "def arm():\n" \
           "    threading.Timer(0.5, lambda: os.kill(os.getpid(), signal.SIGINT)).start()\n" + textwrap.dedent(script)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout, env=child_env())
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout


def test_ctrl_c_stops_generation(text_model):
    out = run_interrupted(f"""
        import dsv3
        m = dsv3.Model({str(text_model)!r})
        t0 = time.time()
        arm()
        try:
            m.generate([5, 6, 7], 16000, ignore_eos=True)
            print("finished")
        except KeyboardInterrupt:
            print("interrupted", time.time() - t0)
        print(m.logits([[1, 2]]).shape)
        """)
    lines = out.split("\n")
    assert lines[0].startswith("interrupted") and float(lines[0].split()[1]) < 20, out
    assert "(1, 2, 320)" in out


def test_ctrl_c_saves_training(tmp_path, corpus):
    out = run_interrupted(f"""
        import dsv3, json
        arm()
        try:
            dsv3.train(config={str(TINY)!r}, data={str(corpus)!r}, out={str(tmp_path / 'run')!r}, batch=2, seq=16,
                       steps=100000, report=False)
            print("finished")
        except KeyboardInterrupt:
            print("interrupted")
        """)
    assert out.startswith("interrupted"), out
    state = json.loads((tmp_path / "run" / "checkpoint" / "trainer_state.json").read_text())
    assert 0 < state["step"] < 100000


def test_ctrl_c_stops_a_blocking_serve(text_model):
    out = run_interrupted(f"""
        import dsv3
        m = dsv3.Model({str(text_model)!r})
        t0 = time.time()
        arm()
        try:
            m.serve(port=0)
            print("returned")
        except KeyboardInterrupt:
            print("interrupted", time.time() - t0)
        print(m.logits([[1, 2]]).shape)
        """)
    lines = out.split("\n")
    assert lines[0].startswith("interrupted") and float(lines[0].split()[1]) < 20, out
    assert "(1, 2, 320)" in out


def test_gil_is_released_during_compute(test_data):
    m = dsv3.Model(test_data / "tiny-mtp")
    ids = np.random.default_rng(0).integers(0, m.vocab_size, size=(16, 200))
    ticks, stop = [], threading.Event()

    def tick():
        while not stop.is_set():
            ticks.append(time.perf_counter())
            time.sleep(0.0005)

    th = threading.Thread(target=tick)
    th.start()
    time.sleep(0.01)
    t0 = time.perf_counter()
    m.logits(ids)
    t1 = time.perf_counter()
    stop.set()
    th.join()
    inside = [t for t in ticks if t0 < t < t1]
    assert t1 - t0 > 0.01, "the call was too short to tell"
    assert len(inside) >= 3, f"the other thread ran {len(inside)} times during a {t1 - t0:.3f} s call"
