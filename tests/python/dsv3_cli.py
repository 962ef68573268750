"""Helpers to drive the dsv3 binary (path in DSV3_BIN) from the tokenizer tests."""
import json
import os
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BUNDLED = os.path.join(ROOT, "data", "tokenizers", "deepseek-v3")


def dsv3_bin():
    path = os.environ.get("DSV3_BIN")
    if not path:
        pytest.skip("DSV3_BIN is not set: point it at the dsv3 binary (CTest does) to run the tokenizer tests")
    if not os.path.exists(path):
        pytest.skip(f"DSV3_BIN={path} does not exist; build dsv3 first")
    return path


def run(args, lines, check=True):
    """Runs `dsv3 ARGS` with JSON lines on stdin; returns the parsed output lines (or the process if not check)."""
    inp = "".join(json.dumps(x) + "\n" for x in lines)
    proc = subprocess.run([dsv3_bin()] + args, input=inp.encode("utf-8"), capture_output=True)
    if not check:
        return proc
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    # Split on "\n" only: str.splitlines() would also split inside strings at U+2028, U+0085, ...
    return [json.loads(l) for l in proc.stdout.decode("utf-8").split("\n") if l]


def minimal_tokenizer_dir(path, chat_template, extra_config=None):
    """A small byte-level BPE tokenizer (bytes only, two specials) with the given chat template: loads fast."""
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders
    tok = Tokenizer(models.BPE(vocab={}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    tok.add_special_tokens(["<s>", "</s>"])
    data = json.loads(tok.to_str())
    vocab = {"<s>": 0, "</s>": 1}
    for ch in sorted(alphabet):
        vocab[ch] = len(vocab)
    data["model"]["vocab"] = vocab
    for t in data["added_tokens"]:
        t["id"] = vocab[t["content"]]
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "tokenizer.json"), "w", encoding="utf-8") as f:
        json.dump(data, f, ensure_ascii=False)
    config = {"bos_token": "<s>", "eos_token": "</s>", "chat_template": chat_template}
    config.update(extra_config or {})
    with open(os.path.join(path, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, ensure_ascii=False)
    return path
