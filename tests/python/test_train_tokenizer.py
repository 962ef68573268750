"""A tokenizer trained by `dsv3 train-tokenizer` loads in Hugging Face `tokenizers`, which encodes held-out
text to the same ids as dsv3; it keeps DeepSeek-V3's special tokens first and its chat template."""
import json
import os
import subprocess
import time

import pytest

import tokenizer_corpus
from dsv3_cli import dsv3_bin, run

tokenizers = pytest.importorskip("tokenizers")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    d = tmp_path_factory.mktemp("train")
    stdlib = tokenizer_corpus.stdlib_sources(stride=2)
    (d / "code.txt").write_text("\n".join(stdlib)[:4_500_000], encoding="utf-8")
    (d / "multilingual.txt").write_text(
        "\n".join(tokenizer_corpus.generated_texts(2500, seed=5)) + "\n<｜User｜>hello<｜Assistant｜>hi<｜end▁of▁sentence｜>",
        encoding="utf-8")
    out = d / "tok"
    t0 = time.time()
    proc = subprocess.run([dsv3_bin(), "train-tokenizer", "--input", str(d / "code.txt"), str(d / "multilingual.txt"),
                           "--vocab-size", "4096", "--output", str(out)], capture_output=True)
    seconds = time.time() - t0
    assert proc.returncode == 0, proc.stderr.decode()
    return out, seconds


def test_trains_quickly(trained):
    _, seconds = trained
    assert seconds < 30, f"training a 4096-token vocabulary on ~5 MB took {seconds:.1f}s"


def test_layout(trained):
    out, _ = trained
    data = json.load(open(out / "tokenizer.json", encoding="utf-8"))
    vocab = data["model"]["vocab"]
    assert len(vocab) == 4096
    assert vocab["<｜begin▁of▁sentence｜>"] == 0 and vocab["<｜end▁of▁sentence｜>"] == 1
    for t in ("<｜User｜>", "<｜Assistant｜>", "<｜tool▁calls▁begin｜>", "<｜tool▁call▁begin｜>", "<｜tool▁sep｜>",
              "<｜tool▁call▁end｜>", "<｜tool▁calls▁end｜>", "<｜tool▁outputs▁begin｜>", "<｜tool▁output▁begin｜>",
              "<｜tool▁output▁end｜>", "<｜tool▁outputs▁end｜>"):
        assert vocab[t] < 13
    deepseek = json.load(open(os.path.join(os.path.dirname(__file__), "..", "..", "data", "tokenizers", "deepseek-v3",
                                           "tokenizer.json"), encoding="utf-8"))
    assert data["pre_tokenizer"] == deepseek["pre_tokenizer"]
    config = json.load(open(out / "tokenizer_config.json", encoding="utf-8"))
    assert config["add_bos_token"] is True and "<｜Assistant｜>" in config["chat_template"]
    # No merge was learned across a special token that appeared in the corpus.
    assert not any("ï½ľUser" in t for t in vocab)


def test_hf_encodes_held_out_text_identically(trained):
    out, _ = trained
    hf = tokenizers.Tokenizer.from_file(str(out / "tokenizer.json"))
    held_out = tokenizer_corpus.stdlib_sources()[1::2][:80]
    held_out += tokenizer_corpus.generated_texts(800, seed=77) + tokenizer_corpus.random_codepoint_texts(800, seed=78)
    held_out += tokenizer_corpus.edge_texts()
    want = [e.ids for e in hf.encode_batch(held_out, add_special_tokens=True)]
    got = [o["ids"] for o in run(["tokenize", "--tokenizer", str(out), "--add-special"], [{"text": t} for t in held_out])]
    assert got == want
    back = run(["detokenize", "--tokenizer", str(out)], [{"ids": i} for i in got])
    assert [b["text"] for b in back] == [hf.decode(i, skip_special_tokens=False) for i in want] == held_out


def test_trained_chat_template(trained):
    out, _ = trained
    msgs = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]
    text = run(["chat-template", "--tokenizer-dir", str(out)], [{"messages": msgs, "add_generation_prompt": False}])
    assert text[0]["text"] == "<｜begin▁of▁sentence｜><｜User｜>Hi<｜Assistant｜>Hello.<｜end▁of▁sentence｜>"
    ids = run(["tokenize", "--tokenizer", str(out)], [text[0]])[0]["ids"]
    assert ids[0] == 0 and ids[-1] == 1 and 2 in ids and 3 in ids


def test_vocab_size_too_small_is_rejected(tmp_path):
    (tmp_path / "a.txt").write_text("hello world", encoding="utf-8")
    proc = subprocess.run([dsv3_bin(), "train-tokenizer", "--input", str(tmp_path / "a.txt"), "--vocab-size", "200",
                           "--output", str(tmp_path / "out")], capture_output=True)
    assert proc.returncode == 1
    err = proc.stderr.decode()
    assert "--vocab-size 200 is too small" in err and "269" in err
    assert not (tmp_path / "out" / "tokenizer.json").exists()
