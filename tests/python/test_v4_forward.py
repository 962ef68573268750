"""DeepSeek-V4 through the CLI: `dsv3 generate` (greedy) and `dsv3 logits` on the tiny-v4-fwd fixture
(tools/make_v4_logits_fixture.py) against transformers' DeepseekV4ForCausalLM.

The stored references are checked always; if transformers is importable, the same model directory is loaded
with transformers here and the greedy tokens and logits are regenerated on the fly and compared too.
"""
import json
import subprocess

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file


def run(dsv3_bin, *args):
    return subprocess.run([dsv3_bin, *args], capture_output=True, text=True)


def fixture(test_data):
    d = test_data / "tiny-v4-fwd"
    return d, load_file(str(d / "reference.safetensors"))


def dsv3_greedy(dsv3_bin, d, prompt, n):
    r = run(dsv3_bin, "generate", "--model", str(d), "--prompt-ids", ",".join(map(str, prompt)), "-n", str(n), "--json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)["output_ids"]


def dsv3_logits(dsv3_bin, d, ids, tmp_path):
    save_file({"input_ids": ids.astype(np.int32)}, str(tmp_path / "in.safetensors"))
    r = run(dsv3_bin, "logits", "--model", str(d), "--input", str(tmp_path / "in.safetensors"),
            "--output", str(tmp_path / "out.safetensors"))
    assert r.returncode == 0, r.stderr
    return load_file(str(tmp_path / "out.safetensors"))["logits"]


def test_v4_generate_greedy_equals_stored_transformers_tokens(dsv3_bin, test_data):
    d, ref = fixture(test_data)
    prompt, gen = ref["gen_prompt"].tolist(), ref["gen_output"].tolist()
    assert dsv3_greedy(dsv3_bin, d, prompt, len(gen) - len(prompt)) == gen[len(prompt):]


def test_v4_logits_equal_stored_transformers_logits(dsv3_bin, test_data, tmp_path):
    d, ref = fixture(test_data)
    got = dsv3_logits(dsv3_bin, d, ref["input_ids"], tmp_path)
    want = ref["logits"]
    assert got.shape == want.shape
    assert np.abs(got - want).max() / np.abs(want).max() <= 1e-4


def test_v4_against_transformers_on_the_fly(dsv3_bin, test_data, tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    if not hasattr(transformers, "DeepseekV4ForCausalLM"):
        pytest.skip(f"transformers {transformers.__version__} has no deepseek_v4")
    d, _ = fixture(test_data)
    model = transformers.DeepseekV4ForCausalLM.from_pretrained(d, dtype=torch.float32, attn_implementation="eager",
                                                               experts_implementation="eager").eval()
    rng = np.random.default_rng(2026)
    ids = rng.integers(2, model.config.vocab_size, size=(1, 30), dtype=np.int32)  # a new prompt, 30 tokens
    with torch.no_grad():
        want = model(torch.from_numpy(ids).long()).logits.numpy()
        prompt = torch.from_numpy(ids[:, :9]).long()
        gen = model.generate(prompt, max_new_tokens=16, do_sample=False, eos_token_id=None, pad_token_id=0,
                             attention_mask=torch.ones_like(prompt))[0, 9:].tolist()
    got = dsv3_logits(dsv3_bin, d, ids, tmp_path)
    assert np.abs(got - want).max() / np.abs(want).max() <= 1e-4
    assert dsv3_greedy(dsv3_bin, d, ids[0, :9].tolist(), 16) == gen


def test_v4_cli_errors_are_one_line(dsv3_bin, test_data, tmp_path):
    d, _ = fixture(test_data)
    for args, want in [
        (["generate", "--model", str(d), "--prompt-ids", "3,128", "-n", "2"], "out of range for vocab_size"),
        (["generate", "--model", str(d), "--prompt-ids", ",".join(["3"] * 257), "-n", "2"], "max_position_embeddings"),
        (["generate", "--model", str(d), "--prompt-ids", "3,4", "--device", "cuda"], "CPU only"),
        (["generate", "--model", str(d), "--prompt-ids", "3,4", "--speculative", "mtp"], "speculative"),
    ]:
        r = run(dsv3_bin, *args)
        assert r.returncode != 0 and r.stderr.startswith("error:") and want in r.stderr, (args, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    save_file({"input_ids": np.zeros((2, 3, 4), dtype=np.int32)}, str(tmp_path / "bad.safetensors"))
    r = run(dsv3_bin, "logits", "--model", str(d), "--input", str(tmp_path / "bad.safetensors"),
            "--output", str(tmp_path / "o.safetensors"))
    assert r.returncode != 0 and "input_ids must be [B, T]" in r.stderr, r.stderr
