"""dsv3 tokenize/detokenize give exactly what Hugging Face `tokenizers` gives, on DeepSeek-V3's tokenizer and
on variants of it that use other tokenizer.json features, over a large varied corpus: Python standard-library
sources read from this machine, generated multilingual / emoji / whitespace / digit text, random code
points, and every Unicode code point in context."""
import json
import os
import random

import pytest

import tokenizer_corpus
from dsv3_cli import BUNDLED, ROOT, run

tokenizers = pytest.importorskip("tokenizers")

TOKENIZER_JSON = os.path.join(BUNDLED, "tokenizer.json")


@pytest.fixture(scope="module")
def hf():
    return tokenizers.Tokenizer.from_file(TOKENIZER_JSON)


@pytest.fixture(scope="module")
def corpus():
    texts = tokenizer_corpus.edge_texts()
    texts += tokenizer_corpus.stdlib_sources(stride=4)
    texts += tokenizer_corpus.generated_texts(2500)
    texts += tokenizer_corpus.random_codepoint_texts(2500)
    return texts


def every_code_point_in_context(seed=5):
    """Each code point (surrogates excepted) once, next to letters, digits, spaces, punctuation, CJK, emoji."""
    cps = [c for c in range(0x110000) if not (0xD800 <= c <= 0xDFFF)]
    rng = random.Random(seed)
    rng.shuffle(cps)
    ctx = [" ", "a", "1", "!", "\n", "中", " a", "é", "😀", "  ", "\t", "ー", ""]
    return ["".join(chr(c) + rng.choice(ctx) for c in cps[i:i + 48]) for i in range(0, len(cps), 48)]


def encode_both(hf_tok, texts, args=()):
    want = [e.ids for e in hf_tok.encode_batch(texts, add_special_tokens="--add-special" in args)]
    got = [o["ids"] for o in run(["tokenize"] + list(args), [{"text": t} for t in texts])]
    return want, got


def assert_same_ids(texts, want, got):
    assert len(got) == len(want)
    bad = [i for i in range(len(want)) if want[i] != got[i]]
    if bad:
        i = bad[0]
        pytest.fail(f"{len(bad)} of {len(texts)} texts differ; first: {texts[i][:200]!r}\nHF:   {want[i][:40]}\ndsv3: {got[i][:40]}")


def test_fixture_refs():
    refs = [json.loads(l) for l in open(os.path.join(ROOT, "tests", "data", "tokenizer_refs.jsonl"), encoding="utf-8")]
    got = run(["tokenize"], [{"text": r["text"]} for r in refs])
    assert [g["ids"] for g in got] == [r["ids"] for r in refs]
    got = run(["tokenize", "--add-special"], [{"text": r["text"]} for r in refs])
    assert [g["ids"] for g in got] == [r["ids_with_special"] for r in refs]
    got = run(["detokenize"], [{"ids": r["ids"]} for r in refs])
    assert [g["text"] for g in got] == [r["decoded"] for r in refs]


def test_corpus_matches_hf(hf, corpus):
    want, got = encode_both(hf, corpus)
    assert_same_ids(corpus, want, got)
    assert sum(map(len, got)) > 500_000  # the corpus is large


def test_every_code_point_matches_hf(hf):
    texts = every_code_point_in_context()
    want, got = encode_both(hf, texts)
    assert_same_ids(texts, want, got)


def test_add_special_and_bos(hf):
    texts = ["Hello", "", "<｜User｜>hi"]
    want, got = encode_both(hf, texts, ["--add-special"])
    assert got == want  # DeepSeek-V3's post-processor (ByteLevel) adds nothing
    bos = run(["tokenize", "--add-bos"], [{"text": t} for t in texts])
    assert [b["ids"] for b in bos] == [[0] + w for w in want]  # tokenizer_config.json: add_bos_token true


def test_decode_matches_hf(hf):
    rng = random.Random(3)
    vocab = hf.get_vocab_size()
    seqs = [[rng.randrange(vocab) for _ in range(rng.randint(0, 30))] for _ in range(2000)]
    # Sequences that cut multi-byte characters between tokens, and special tokens among text.
    seqs += [hf.encode(t).ids[:k] for t in ("😀🎉 中文", "naïve café") for k in range(6)]
    seqs += [[0, 19923, 128803, 1, 28927, 0, 225, 128814], [999999, 5, -1 & 0x7FFFFFFF]]
    for skip in (False, True):
        want = [hf.decode(s, skip_special_tokens=skip) for s in seqs]
        got = run(["detokenize"] + (["--skip-special"] if skip else []), [{"ids": s} for s in seqs])
        assert [g["text"] for g in got] == want


def test_round_trip_valid_utf8(corpus):
    texts = corpus[:400] + tokenizer_corpus.generated_texts(300, seed=11)
    ids = run(["tokenize"], [{"text": t} for t in texts])
    back = run(["detokenize"], ids)
    assert [b["text"] for b in back] == texts


def test_invalid_utf8_encodes(hf):
    rng = random.Random(17)
    blobs = [bytes(rng.randrange(256) for _ in range(rng.randint(1, 200))) for _ in range(300)]
    blobs += [b"\xff", b"\xc3", b"\xe2\x28\xa1", b"\xf0\x9f\x98", b"ab\xf0\x9f\x98\x80cd\xed\xa0\x80", b"\xc0\xaf" * 10]
    ids = run(["tokenize"], [{"bytes": list(b)} for b in blobs])
    assert len(ids) == len(blobs)
    # Byte-level BPE keeps every byte, so HF's own decoder returns the input with invalid parts replaced.
    assert [hf.decode(i["ids"], skip_special_tokens=False) for i in ids] == \
        [b.decode("utf-8", errors="replace") for b in blobs]
    # Valid UTF-8 given as bytes tokenizes like the same text.
    text = "héllo 世界 😀"
    assert run(["tokenize"], [{"bytes": list(text.encode())}]) == run(["tokenize"], [{"text": text}])


def test_tokenizer_argument_forms():
    line = [{"text": "Hello, world!"}]
    want = [{"ids": [19923, 14, 2058, 3]}]
    assert run(["tokenize"], line) == want
    assert run(["tokenize", "--tokenizer", "deepseek-v3"], line) == want
    assert run(["tokenize", "--tokenizer", BUNDLED], line) == want
    assert run(["tokenize", "--tokenizer", TOKENIZER_JSON], line) == want
    proc = run(["tokenize", "--tokenizer", "/nonexistent/dir"], line, check=False)
    assert proc.returncode == 1 and b"not found" in proc.stderr


def test_bad_json_line_names_the_line():
    import subprocess
    from dsv3_cli import dsv3_bin
    p = subprocess.run([dsv3_bin(), "tokenize"], input=b'{"text": "a"}\n\n{"text": \n', capture_output=True)
    assert p.returncode == 1 and b"line 3" in p.stderr
    p = subprocess.run([dsv3_bin(), "detokenize"], input=b'{"ids": [1, "x"]}\n', capture_output=True)
    assert p.returncode == 1 and b"line 1" in p.stderr


# ---- other tokenizer.json features, on DeepSeek-V3's vocabulary

def variant(base, **changes):
    data = json.loads(json.dumps(base))
    for key, value in changes.items():
        if key == "added":
            data["added_tokens"] += value
        else:
            data[key] = value
    return data


def split(pattern, behavior="Isolated", invert=False, kind="Regex"):
    return {"type": "Split", "pattern": {kind: pattern}, "behavior": behavior, "invert": invert}


BYTE_LEVEL = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def variants(base):
    added = lambda content, **kw: dict({"id": 0, "content": content, "single_word": False, "lstrip": False,
                                        "rstrip": False, "normalized": False, "special": False}, **kw)
    return {
        "gpt2_bytelevel_regex": variant(base, pre_tokenizer={"type": "ByteLevel", "add_prefix_space": False,
                                                             "trim_offsets": True, "use_regex": True}),
        "bytelevel_prefix_space": variant(base, pre_tokenizer={"type": "Sequence", "pretokenizers": [
            split(r"\p{N}{1,3}"), {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True}]}),
        "llama3_split": variant(base, pre_tokenizer={"type": "Sequence", "pretokenizers": [split(LLAMA3_PATTERN), BYTE_LEVEL]}),
        "split_behaviors": variant(base, pre_tokenizer={"type": "Sequence", "pretokenizers": [
            split(r"\s+", "MergedWithPrevious"), split(r"[.,!?]", "MergedWithNext"), split(r"\p{N}", "Contiguous"),
            split("the", "Removed", kind="String"), split(r"[aeiou]+", "Isolated", invert=True), BYTE_LEVEL]}),
        "split_removed_inverted": variant(base, pre_tokenizer={"type": "Sequence", "pretokenizers": [
            split(r"\p{L}+", "Removed", invert=True), split(r"x*", "MergedWithPrevious"), BYTE_LEVEL]}),
        "normalizers": variant(base, normalizer={"type": "Sequence", "normalizers": [
            {"type": "Replace", "pattern": {"String": "  "}, "content": " "},
            {"type": "Replace", "pattern": {"Regex": r"\d+"}, "content": "#"},
            {"type": "Strip", "strip_left": True, "strip_right": True},
            {"type": "Prepend", "prepend": "▁"}]}),
        "added_token_flags": variant(base, added=[
            added("hello", single_word=True), added(" world", lstrip=True, rstrip=True, normalized=True),
            added("<mask>", lstrip=True, rstrip=True, special=True), added("ab", normalized=True),
            added("abc", special=True), added("中文", single_word=True, normalized=True)]),
        "template_post_processor": variant(base, post_processor={
            "type": "TemplateProcessing", "single": [{"SpecialToken": {"id": "<｜begin▁of▁sentence｜>", "type_id": 0}},
                                                     {"Sequence": {"id": "A", "type_id": 0}},
                                                     {"SpecialToken": {"id": "<｜end▁of▁sentence｜>", "type_id": 0}}],
            "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {"<｜begin▁of▁sentence｜>": {"id": "<｜begin▁of▁sentence｜>", "ids": [0], "tokens": ["<｜begin▁of▁sentence｜>"]},
                               "<｜end▁of▁sentence｜>": {"id": "<｜end▁of▁sentence｜>", "ids": [1], "tokens": ["<｜end▁of▁sentence｜>"]}}}),
        "ignore_merges": variant(base, model=dict(base["model"], ignore_merges=True)),
        "no_decoder": variant(base, decoder=None),
    }


@pytest.fixture(scope="module")
def base_json():
    """DeepSeek-V3's tokenizer cut to its first 12,000 merges (ids renumbered densely): the same pipeline,
    a vocabulary that loads in a fraction of the time."""
    data = json.load(open(TOKENIZER_JSON, encoding="utf-8"))
    vocab = data["model"]["vocab"]
    merges = data["model"]["merges"][:12000]
    keep = {t for t in vocab if len(t) == 1} | {a["content"] for a in data["added_tokens"] if a["content"] in vocab}
    for m in merges:
        a, b = m.split(" ") if isinstance(m, str) else m
        keep.update((a, b, a + b))
    ordered = sorted(keep, key=lambda t: vocab[t])
    data["model"]["vocab"] = {t: i for i, t in enumerate(ordered)}
    data["model"]["merges"] = merges
    return data


VARIANT_NAMES = ["gpt2_bytelevel_regex", "bytelevel_prefix_space", "llama3_split", "split_behaviors",
                 "split_removed_inverted", "normalizers", "added_token_flags", "template_post_processor", "ignore_merges",
                 "no_decoder"]


@pytest.mark.parametrize("name", VARIANT_NAMES)
def test_tokenizer_json_variants_match_hf(name, base_json, tmp_path):
    data = variants(base_json)[name]
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    hf_tok = tokenizers.Tokenizer.from_file(str(path))
    texts = tokenizer_corpus.edge_texts() + tokenizer_corpus.generated_texts(400, seed=21)
    texts += tokenizer_corpus.stdlib_sources(max_files=6)
    texts += ["hello world hello, say hello", "ahello hello_ <mask>  x  <mask>y", " world world  world ",
              "abc ab abcd 中文 a中文b 中文。", "the then other 123 4567 x.y,z!", "  padded  text  12  "]
    for args in ([], ["--add-special"]):
        want, got = encode_both(hf_tok, texts, ["--tokenizer", str(path)] + args)
        assert_same_ids(texts, want, got)
    seqs = [hf_tok.encode(t).ids for t in texts[:50]]
    for skip in (False, True):
        got = run(["detokenize", "--tokenizer", str(path)] + (["--skip-special"] if skip else []), [{"ids": s} for s in seqs])
        assert [g["text"] for g in got] == [hf_tok.decode(s, skip_special_tokens=skip) for s in seqs]
