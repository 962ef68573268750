"""Distributed training over MPI (CPU ranks), against the single-process run as the reference.

- `dsv3 grads` under mpirun with data parallelism, expert parallelism and both: the loss and every gradient
  equal the one-process run on the same global batch (fp32, <= 1e-6 relative per tensor).
- `dsv3 train`: a 50-step loss curve with ZeRO-1 data parallelism and with expert parallelism follows the
  one-process curve to 1e-5; a checkpoint written by 4 ranks resumes on 1 and on 2 ranks with the same
  next-step loss as the 4-rank run that continued.
- Faults: a rank killed mid-run, a rank that stops taking part (hangs) and ranks started with different
  configs all end the job with an error, well under 60 s.
Each mpirun is bounded by a timeout; CI runs as root on 2 cores (--allow-run-as-root --oversubscribe).
"""
import json
import os
import pathlib
import shutil
import signal
import subprocess
import time

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

ROOT = pathlib.Path(__file__).resolve().parents[2]
TINY = ROOT / "tests" / "data" / "train-tiny.json"
MPIRUN = shutil.which("mpirun")
pytestmark = pytest.mark.skipif(MPIRUN is None, reason="mpirun not installed (openmpi-bin)")


def mpi(np_, *args, env=None):
    cmd = [MPIRUN, "--allow-run-as-root", "--oversubscribe", "-np", str(np_)]
    for k in env or {}:
        cmd += ["-x", k]
    return cmd + [str(a) for a in args]


def run(cmd, timeout=240, env=None):
    e = dict(os.environ)
    e.update(env or {})
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout, env=e)


def rel(a, b):
    a, b = a.astype(np.float64), b.astype(np.float64)
    nb = np.linalg.norm(b)
    return float(np.linalg.norm(a - b) / nb) if nb > 0 else float(np.linalg.norm(a))


@pytest.fixture(scope="module")
def model(tmp_path_factory, dsv3_bin):
    """tests/data/train-tiny.json (2 layers, one MoE layer of 8 experts, top-2, MTP) with wider random weights."""
    d = tmp_path_factory.mktemp("dist")
    cfg = json.loads(TINY.read_text())
    cfg["initializer_range"] = 0.1
    (d / "config.json").write_text(json.dumps(cfg))
    r = run([dsv3_bin, "init", "--config", d / "config.json", "--output", d / "m", "--dtype", "f32", "--seed", "5"])
    assert r.returncode == 0, r.stderr
    ids = np.random.default_rng(7).integers(0, cfg["vocab_size"], size=(4, 24), dtype=np.int32)
    save_file({"input_ids": ids}, str(d / "in.safetensors"))
    return d


GRAD_ARGS = ["--mtp", "--balance-alpha", "0.01"]


@pytest.fixture(scope="module")
def single_grads(model, dsv3_bin):
    r = run([dsv3_bin, "grads", "--model", model / "m", "--input", model / "in.safetensors", "--output",
             model / "g1.safetensors", *GRAD_ARGS])
    assert r.returncode == 0, r.stderr
    return load_file(str(model / "g1.safetensors"))


def chunked_single_grads(model, dsv3_bin, chunks):
    """The single process on the same global batch, accumulated over the ranks' slices: `dsv3 grads` on each
    slice of B / chunks sequences, averaged in fp64 (the batch loss is the mean over equal-length sequences)."""
    ids = load_file(str(model / "in.safetensors"))["input_ids"]
    n = ids.shape[0] // chunks
    acc = None
    for c in range(chunks):
        src, out = model / f"in_c{chunks}_{c}.safetensors", model / f"g_c{chunks}_{c}.safetensors"
        save_file({"input_ids": ids[c * n:(c + 1) * n].copy()}, str(src))
        r = run([dsv3_bin, "grads", "--model", model / "m", "--input", src, "--output", out, *GRAD_ARGS])
        assert r.returncode == 0, r.stderr
        g = {k: v.astype(np.float64) / chunks for k, v in load_file(str(out)).items()}
        acc = g if acc is None else {k: acc[k] + g[k] for k in acc}
    return acc


@pytest.mark.parametrize("np_,layout", [(2, []), (2, ["--ep", "2"]), (4, ["--ep", "2", "--dp", "2"]),
                                        (4, ["--ep", "4"])])
def test_grads_equal_single_process(model, dsv3_bin, single_grads, np_, layout):
    out = model / f"g{np_}{''.join(layout)}.safetensors"
    r = run(mpi(np_, dsv3_bin, "grads", "--model", model / "m", "--input", model / "in.safetensors", "--output", out,
                *GRAD_ARGS, *layout))
    assert r.returncode == 0, r.stdout + r.stderr
    got = load_file(str(out))
    assert set(got) == set(single_grads)
    assert abs(float(got["loss"][0]) - float(single_grads["loss"][0])) <= 1e-6 * abs(float(single_grads["loss"][0]))
    # Against the single process summed over the same slices as the ranks: <= 1e-6 per tensor.
    sliced = chunked_single_grads(model, dsv3_bin, np_)
    worst = max(rel(got[k], sliced[k]) for k in single_grads if k != "loss")
    assert worst <= 1e-6, worst
    # Against the one-call global-batch run the fp32 reassociation of the token sums (sum|terms| / |sum| of
    # cancelling gradients) alone moves this model's gradients by about 1e-6: the single process's own sliced and
    # one-call results differ by `noise`. The ranks may differ from the one-call run by no more than 1.5x that.
    noise = max(rel(sliced[k], single_grads[k]) for k in single_grads if k != "loss")
    worst_global = max(rel(got[k], single_grads[k]) for k in single_grads if k != "loss")
    assert worst_global <= max(1e-6, 1.5 * noise), (worst_global, noise)
    assert sum(1 for k in got if ".experts." in k) == 2 * 8 * 3  # every expert of both MoE layers (main, MTP)
    print(f"np {np_} {layout}: worst gradient relative difference {worst:.2e} (sliced single process), "
          f"{worst_global:.2e} (one-call single process, whose own sliced/one-call noise is {noise:.2e})")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, dsv3_bin):
    d = tmp_path_factory.mktemp("distcorpus")
    rng = np.random.default_rng(0)
    words = "the cat sat on a mat and then ran to see the dog who was big and red".split()
    (d / "a.txt").write_text("\n\n".join(" ".join(rng.choice(words, size=rng.integers(5, 30))) for _ in range(300)))
    r = run([dsv3_bin, "prepare-data", "--tokenizer", "bytes", "--input", d / "a.txt", "--output", d / "data"])
    assert r.returncode == 0, r.stderr
    return d / "data"


TRAIN = ["--config", TINY, "--batch", "4", "--seq", "32", "--lr", "3e-3", "--warmup", "3", "--log-every", "10",
         "--eval-every", "25", "--eval-batches", "2", "--balance-alpha", "0.01", "--no-report"]


def curve(out):
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines() if l]
    return [(r["type"], r["step"], r.get("loss", r.get("val_loss")), (r.get("mtp_loss") or [None])[0]) for r in rows]


def assert_same_curve(a, b, tol, moved=0.0):
    assert [x[:2] for x in a] == [x[:2] for x in b]
    worst = 0.0
    for x, y in zip(a, b):
        for u, v in zip(x[2:], y[2:]):
            if u is not None:
                assert abs(u - v) <= tol * abs(v), (x, y)
                worst = max(worst, abs(u - v) / abs(v))
    print(f"loss curve: worst relative difference {worst:.2e} over {len(a)} rows")
    # The curve moved (the comparison is not between two flat lines).
    assert a[0][2] - [x for x in a if x[0] == "train"][-1][2] > moved


@pytest.fixture(scope="module")
def single_curve(tmp_path_factory, dsv3_bin, corpus):
    out = tmp_path_factory.mktemp("single") / "run"
    r = run([dsv3_bin, "train", *TRAIN, "--data", corpus, "--steps", "50", "--out", out])
    assert r.returncode == 0, r.stderr
    return curve(out)


@pytest.mark.parametrize("np_,layout", [(2, ["--dp", "2"]), (4, ["--ep", "2", "--dp", "2"])])
def test_50_steps_follow_single_process_curve(tmp_path, dsv3_bin, corpus, single_curve, np_, layout):
    out = tmp_path / "run"
    r = run(mpi(np_, dsv3_bin, "train", *TRAIN, "--data", corpus, "--steps", "50", "--out", out, *layout), timeout=400)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "ZeRO-1" in r.stderr
    got = curve(out)
    assert len(got) == 50 + 2
    assert_same_curve(got, single_curve, 1e-5, moved=0.5)


def test_checkpoint_of_4_ranks_resumes_on_1_and_2(tmp_path, dsv3_bin, corpus):
    args = [*TRAIN, "--data", corpus, "--steps", "6"]
    full, part = tmp_path / "full", tmp_path / "part"
    r = run(mpi(4, dsv3_bin, "train", *args, "--out", full, "--ep", "2"))
    assert r.returncode == 0, r.stdout + r.stderr
    r = run(mpi(4, dsv3_bin, "train", *args, "--out", part, "--ep", "2", "--stop-after", "3"))
    assert r.returncode == 0, r.stdout + r.stderr
    ck = part / "checkpoint"
    # One hub directory with every expert (rank 0 wrote the gathered model).
    idx = json.loads((ck / "trainer_state.json").read_text())
    assert idx["step"] == 3
    ref = {s: l for t, s, l, _ in curve(full) if t == "train"}
    for ranks, extra in [(1, []), (2, ["--ep", "2"])]:
        d = tmp_path / f"resume{ranks}"
        shutil.copytree(part, d)
        cmd = [dsv3_bin, "train", "--resume", d / "checkpoint", *extra]
        r = run(cmd if ranks == 1 else mpi(ranks, *cmd))
        assert r.returncode == 0, r.stdout + r.stderr
        got = {s: l for t, s, l, _ in curve(d) if t == "train"}
        assert sorted(got) == list(range(1, 7))
        for s in (4, 5, 6):
            assert abs(got[s] - ref[s]) <= 1e-5 * ref[s], (ranks, s, got[s], ref[s])


def test_killed_rank_ends_the_job(tmp_path, dsv3_bin, corpus):
    cmd = mpi(2, dsv3_bin, "train", *TRAIN, "--data", corpus, "--steps", "100000", "--out", tmp_path / "run")
    p = subprocess.Popen([str(c) for c in cmd], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        line = ""
        while "step 10/" not in line:
            line = p.stdout.readline()
            assert line or p.poll() is None, "training did not start"
        ranks = subprocess.run(["pgrep", "-P", str(p.pid)], capture_output=True, text=True).stdout.split()
        assert len(ranks) == 2, ranks
        t0 = time.time()
        os.kill(int(ranks[1]), signal.SIGKILL)
        rest = p.communicate(timeout=60)[0]
        assert time.time() - t0 < 60
        assert p.returncode != 0, rest
        assert "exited on signal 9" in rest, rest  # mpirun names the rank that died
    finally:
        if p.poll() is None:
            p.kill()


def test_hung_rank_times_out_with_an_error(tmp_path, dsv3_bin, corpus):
    env = {"DSV3_FAULT_INJECT": "hang:1", "DSV3_DIST_TIMEOUT": "5"}
    t0 = time.time()
    r = run(mpi(2, dsv3_bin, "train", *TRAIN, "--data", corpus, "--steps", "50", "--out", tmp_path / "run", env=env),
            timeout=60, env=env)
    assert time.time() - t0 < 60
    assert r.returncode != 0
    assert "rank 0: " in r.stderr and "did not complete within 5 s" in r.stderr, r.stderr


def test_different_configs_across_ranks_are_refused(tmp_path, dsv3_bin, corpus):
    other = json.loads(TINY.read_text())
    other["hidden_size"] = 32
    (tmp_path / "other.json").write_text(json.dumps(other))
    base = [*TRAIN[2:], "--data", corpus, "--steps", "3", "--out", tmp_path / "run"]
    cmd = [MPIRUN, "--allow-run-as-root", "--oversubscribe", "-np", "1", dsv3_bin, "train", "--config", TINY, *base,
           ":", "-np", "1", dsv3_bin, "train", "--config", tmp_path / "other.json", *base]
    t0 = time.time()
    r = run(cmd, timeout=60)
    assert r.returncode != 0
    assert "rank 1 was started with a different model config or training options than rank 0" in r.stderr, r.stderr
    assert time.time() - t0 < 60


@pytest.mark.parametrize("layout,batch,msg", [(["--ep", "3"], "4", "--ep x --dp must equal the number of ranks (2)"),
                                              (["--ep", "2"], "3", "must be a multiple of the 2 ranks"),
                                              (["--ep", "2", "--dp", "2"], "4", "must equal the number of ranks (2)")])
def test_bad_layouts_are_one_line_errors(tmp_path, dsv3_bin, corpus, layout, batch, msg):
    args = list(TRAIN)
    args[args.index("--batch") + 1] = batch
    r = run(mpi(2, dsv3_bin, "train", *args, "--data", corpus, "--steps", "2", "--out", tmp_path / "run", *layout),
            timeout=60)
    assert r.returncode != 0
    assert msg in r.stderr, r.stderr


@pytest.mark.parametrize("np_", [2, 4])
@pytest.mark.parametrize("which", ["init", "tiny-mtp"])
def test_expert_parallel_generate_matches_single_greedy(model, dsv3_bin, test_data, np_, which):
    mdir = model / "m" if which == "init" else test_data / which
    args = ["generate", "--model", mdir, "--prompt-ids", "5,6,7,8,9", "-n", "16", "--temperature", "0", "--json",
            "--ignore-eos"]
    r1 = run([dsv3_bin, *args])
    assert r1.returncode == 0, r1.stderr
    rn = run(mpi(np_, dsv3_bin, *args))
    assert rn.returncode == 0, rn.stdout + rn.stderr
    assert rn.stdout.count("output_ids") == 1  # rank 0 prints, the others stay quiet
    ref, got = json.loads(r1.stdout)["output_ids"], json.loads(rn.stdout)["output_ids"]
    assert len(ref) == 16
    assert got == ref


@pytest.mark.parametrize("spec", ["none", "mtp"])
def test_expert_parallel_serve_matches_single_process(tmp_path, dsv3_bin, test_data, spec):
    """rank 0 serves HTTP and schedules; 2 ranks hold 4 experts each. Concurrent greedy requests (batched
    prefill + decode steps, replayed on rank 1) return the single-process server's texts."""
    import socket
    import urllib.request
    from concurrent.futures import ThreadPoolExecutor
    cfg = json.loads((test_data / "tiny-mtp" / "config.json").read_text())
    cfg.update(vocab_size=129280, hidden_size=128, intermediate_size=256, moe_intermediate_size=64,
               max_position_embeddings=1024)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    r = run([dsv3_bin, "init", "--config", tmp_path / "config.json", "--output", tmp_path / "m", "--seed", "3"])
    assert r.returncode == 0, r.stderr

    def start(cmd):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        s.close()
        p = subprocess.Popen([str(c) for c in cmd] + ["--port", str(port)], stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
        base = f"http://127.0.0.1:{port}"
        for _ in range(600):
            try:
                urllib.request.urlopen(base + "/health", timeout=1)
                return p, base
            except Exception:
                assert p.poll() is None, p.stderr.read()
                time.sleep(0.1)
        raise AssertionError("server did not start")

    def complete(base, prompt):
        body = json.dumps({"model": "m", "prompt": prompt, "max_tokens": 12, "temperature": 0}).encode()
        req = urllib.request.Request(base + "/v1/completions", data=body, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as resp:
            j = json.loads(resp.read())
        return j["choices"][0]["text"], j["usage"]["completion_tokens"]

    prompts = ["The quick brown fox", "Once upon a time there was", "1 2 3"]
    out = {}
    opts = ["--model", tmp_path / "m", "--served-model-name", "m", "--speculative", spec]  # mtp: MTP passes replay too
    for name, cmd in [("single", [dsv3_bin, "serve", *opts]), ("ep2", mpi(2, dsv3_bin, "serve", *opts))]:
        p, base = start(cmd)
        try:
            with ThreadPoolExecutor(3) as ex:
                out[name] = list(ex.map(lambda q: complete(base, q), prompts))
        finally:
            p.terminate()
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
    assert all(n == 12 for _, n in out["single"])
    assert out["ep2"] == out["single"]


def test_commands_that_do_not_split_are_refused_under_mpirun(model, dsv3_bin):
    r = run(mpi(2, dsv3_bin, "info", "--model", model / "m"), timeout=60)
    assert r.returncode != 0
    assert "info does not run under mpirun with several ranks" in r.stderr, r.stderr


def test_bench_train_under_mpirun_has_the_single_process_loss(model, dsv3_bin):
    args = ["bench-train", "--config", model / "config.json", "--batch", "4", "--seq", "32", "--steps", "2",
            "--warmup", "1", "--json"]
    r1 = run([dsv3_bin, *args])
    assert r1.returncode == 0, r1.stderr
    r2 = run(mpi(2, dsv3_bin, *args, "--ep", "2"))
    assert r2.returncode == 0, r2.stdout + r2.stderr
    assert r2.stdout.count("tokens_per_s") == 1  # one report, from rank 0
    j1, j2 = json.loads(r1.stdout), json.loads(r2.stdout)
    assert (j2["ranks"], j2["ep"], j2["dp"]) == (2, 2, 1)
    assert j2["total_params"] == j1["total_params"] and j2["active_params_per_token"] == j1["active_params_per_token"]
    assert j2["tokens_per_s"] > 0
    assert abs(j2["last_loss"] - j1["last_loss"]) <= 1e-5 * j1["last_loss"]


def test_init_from_loads_only_the_expert_slice_and_trains_the_same(tmp_path, dsv3_bin, corpus, model):
    args = [*TRAIN[2:], "--init-from", model / "m", "--data", corpus, "--steps", "5"]
    r = run([dsv3_bin, "train", *args, "--out", tmp_path / "one"])
    assert r.returncode == 0, r.stderr
    r = run(mpi(2, dsv3_bin, "train", *args, "--out", tmp_path / "two", "--ep", "2"))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "4 of 8 experts per MoE layer" in r.stderr
    assert_same_curve(curve(tmp_path / "two"), curve(tmp_path / "one"), 1e-5)
