"""DeepSeek-V4 training under mpirun (data parallelism on CPU ranks) against the single process on the same global
batch: every train and validation loss of a 12-step run (MTP and the balance loss on) within 1e-5 relative, with
AdamW and with Muon, on 2 and 4 ranks; a checkpoint written by 2 ranks resumes in one process with the losses the
2-rank run went on to have; options the V4 trainer does not support under mpirun get one-line errors."""
import json
import shutil
import subprocess

import numpy as np
import pytest

from test_v4_train import CFG

MPIRUN = shutil.which("mpirun")
pytestmark = pytest.mark.skipif(MPIRUN is None, reason="mpirun not installed (openmpi-bin)")


def run(cmd, timeout=240):
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout,
                          env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})


def mpi(n, *args):
    return [MPIRUN, "--allow-run-as-root", "--oversubscribe", "-np", str(n), "-x", "OMP_NUM_THREADS", *args]


@pytest.fixture(scope="module")
def setup(tmp_path_factory, dsv3_bin):
    d = tmp_path_factory.mktemp("v4dist")
    rng = np.random.default_rng(0)
    words = "the cat sat on a mat and then ran to see the dog who was big and red".split()
    (d / "a.txt").write_text("\n\n".join(" ".join(rng.choice(words, size=rng.integers(5, 30))) for _ in range(300)))
    assert run([dsv3_bin, "prepare-data", "--tokenizer", "bytes", "--input", d / "a.txt", "--output", d / "data"]).returncode == 0
    cfg = dict(CFG, num_nextn_predict_layers=1)
    (d / "config.json").write_text(json.dumps(cfg))
    return d


def args(setup, out, *extra):
    return ["train", "--config", setup / "config.json", "--data", setup / "data", "--out", out, "--batch", "4",
            "--seq", "32", "--steps", "12", "--lr", "3e-3", "--min-lr", "3e-4", "--warmup", "2", "--seed", "1",
            "--eval-every", "6", "--eval-batches", "2", "--mtp-lambda", "0.3", "--balance-alpha", "0.01",
            "--no-report", *extra]


def losses(out):
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines() if l]
    return [(r["type"], r["step"], r["loss"] if r["type"] == "train" else r["val_loss"]) for r in rows]


def close(a, b, tol=1e-5):
    assert [x[:2] for x in a] == [x[:2] for x in b]
    worst = max(abs(x[2] - y[2]) / abs(y[2]) for x, y in zip(a, b))
    assert worst <= tol, (worst, a, b)
    return worst


@pytest.mark.parametrize("optimizer,ranks", [("adamw", 2), ("muon", 2), ("adamw", 4)])
def test_v4_data_parallel_follows_single_process(tmp_path, dsv3_bin, setup, optimizer, ranks):
    one = run([dsv3_bin, *args(setup, tmp_path / "one", "--optimizer", optimizer)])
    assert one.returncode == 0, one.stderr
    many = run(mpi(ranks, dsv3_bin, *args(setup, tmp_path / "many", "--optimizer", optimizer)))
    assert many.returncode == 0, many.stderr
    assert f"data-parallel over {ranks} ranks" in many.stderr, many.stderr
    close(losses(tmp_path / "many"), losses(tmp_path / "one"))


def test_v4_two_rank_checkpoint_resumes_in_one_process(tmp_path, dsv3_bin, setup):
    full = run(mpi(2, dsv3_bin, *args(setup, tmp_path / "full", "--optimizer", "muon")))
    assert full.returncode == 0, full.stderr
    part = run(mpi(2, dsv3_bin, *args(setup, tmp_path / "part", "--optimizer", "muon", "--stop-after", "7")))
    assert part.returncode == 0, part.stderr
    res = run([dsv3_bin, "train", "--resume", tmp_path / "part" / "checkpoint", "--out", tmp_path / "part"])
    assert res.returncode == 0, res.stderr
    close(losses(tmp_path / "part"), losses(tmp_path / "full"))


def test_v4_unsupported_distributed_options(tmp_path, dsv3_bin, setup):
    for extra, needle in ((["--ep", "2"], "expert parallelism"), (["--batch", "3"], "multiple of the 2 ranks")):
        a = args(setup, tmp_path / "x")
        if extra[0] == "--batch":
            a[a.index("--batch") + 1] = extra[1]
            extra = []
        r = run(mpi(2, dsv3_bin, *a, *extra))
        assert r.returncode != 0
        assert needle in r.stderr, r.stderr
