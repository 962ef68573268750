"""Varied text for tokenizer parity tests and benchmarks, built from nothing but the local machine.

Real text the tests did not pick: Python standard-library source files read from this Python
installation. Generated text: multilingual words, emoji sequences, whitespace runs, digit runs,
special-token look-alikes and random code points, from a seeded generator so failures reproduce.
"""
import os
import random
import sysconfig

# Pools of characters the generator mixes; each entry is (start, end) inclusive or a literal string.
SCRIPTS = {
    "latin": "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ",
    "accented": "àáâãäåæçèéêëìíîïðñòóôõöøùúûüýþÿĀāĂăĄąĆćČčĎďĒēĘęĚěĞğĪīİıŁłŃńŇňŌōŐőŒœŘřŚśŞşŠšŢţŤťŪūŮůŰűŸŹźŻżŽžẞ",
    "cyrillic": "абвгдеёжзийклмнопрстуфхцчшщъыьэюяАБВГДЕЁЖЗИЙКЛМНОПРСТУФХЦЧШЩЪЫЬЭЮЯіїєґ",
    "greek": "αβγδεζηθικλμνξοπρστυφχψωΑΒΓΔΕΖΗΘΙΚΛΜΝΞΟΠΡΣΤΥΦΧΨΩάέήίόύώ",
    "arabic": "ابتثجحخدذرزسشصضطظعغفقكلمنهويءآأؤإئىةًٌٍَُِّْ",
    "hebrew": "אבגדהוזחטיכלמנסעפצקרשתםןףךץ",
    "devanagari": "अआइईउऊएऐओऔकखगघङचछजझञटठडढणतथदधनपफबभमयरलवशषसहािीुूृेैोौं्",
    "thai": "กขคฆงจฉชซฌญฎฏฐฑฒณดตถทธนบปผฝพฟภมยรลวศษสหฬอฮะัาำิีึืุู่้๊๋",
    "cjk": (0x4E00, 0x9FFF),
    "cjk_ext_a": (0x3400, 0x4DBF),
    "hiragana": (0x3041, 0x3096),
    "katakana": (0x30A1, 0x30FA),
    "hangul": (0xAC00, 0xD7A3),
    "fullwidth": (0xFF01, 0xFF5E),
    "digits": "0123456789",
    "other_digits": "٠١٢٣٤٥٦٧٨٩۰۱۲۳०१२३४५६७८९０１２３４５６７８９²³¹¼½¾ⅠⅡⅢⅣ①②③",
    "punct": "!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~¡¿«»‹›“”‘’„‚–—…·•§¶†‡‰′″※。、，．！？；：「」『』（）【】《》〈〉",
    "symbols": "©®™°±×÷∑∏∫√∞≈≠≤≥←↑→↓↔⇒⇔∀∃∈∉∩∪⊂⊃⊆⊇∧∨¬€£¥₹₽¢♠♣♥♦★☆✓✗♪",
    "marks": "\u0300\u0301\u0302\u0303\u0308\u030a\u0327\u0331\u0360\u20dd\u0e31\u093e",
    "emoji": ["😀", "🎉", "👍🏽", "🇺🇸", "🇨🇳", "👨‍👩‍👧‍👦", "❤️", "🩷", "🫶", "🦀", "🧑🏿‍💻", "✌🏻", "🏳️‍🌈", "1️⃣", "🫠"],
    "spaces": [" ", "  ", "    ", "\t", "\n", "\n\n", "\r\n", "\r", "\u00a0", "\u3000", "\u2028", "\u2029",
               "\u180e", "\u200b", "\u0085", "\u000b", "\u000c", "\u2003", "\u202f", " \n ", "\t\n"],
    "specials": ["<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>", "<｜tool▁sep｜>",
                 "<|EOT|>", "<｜place▁holder▁no▁7｜>", "<｜User", "｜>", "<think>", "</s>", "<s>", "<|endoftext|>"],
}


def _pick(rng, pool):
    if isinstance(pool, tuple):
        return chr(rng.randint(pool[0], pool[1]))
    return rng.choice(pool)


def generated_texts(n, seed=1234):
    """n strings mixing words of random scripts with spaces, digits, punctuation, emoji and specials."""
    rng = random.Random(seed)
    names = list(SCRIPTS)
    out = []
    for _ in range(n):
        parts = []
        for _ in range(rng.randint(1, 40)):
            name = rng.choice(names)
            if name in ("emoji", "spaces", "specials"):
                parts.append(_pick(rng, SCRIPTS[name]))
            elif name == "digits":
                parts.append("".join(_pick(rng, SCRIPTS[name]) for _ in range(rng.randint(1, 12))))
            else:
                parts.append("".join(_pick(rng, SCRIPTS[name]) for _ in range(rng.randint(1, 9))))
            if rng.random() < 0.5:
                parts.append(rng.choice([" ", " ", " ", "", "\n", ", ", ". "]))
        out.append("".join(parts))
    return out


def random_codepoint_texts(n, seed=99, max_len=64):
    """Strings of random code points from the whole range (no surrogates): any valid UTF-8 text."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        chars = []
        for _ in range(rng.randint(1, max_len)):
            r = rng.random()
            if r < 0.4:
                cp = rng.randint(0x20, 0x7E)
            elif r < 0.5:
                cp = rng.randint(0, 0x20)
            elif r < 0.8:
                cp = rng.randint(0x80, 0xFFFF)
            else:
                cp = rng.randint(0x10000, 0x10FFFF)
            if 0xD800 <= cp <= 0xDFFF:
                cp = 0xFFFD
            chars.append(chr(cp))
        out.append("".join(chars))
    return out


def stdlib_sources(max_files=None, max_bytes_per_file=60000, stride=1):
    """Python standard-library source files (real code and prose we did not write), as text."""
    root = sysconfig.get_paths()["stdlib"]
    paths = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in ("site-packages", "__pycache__", "test", "tests", "idle_test"))
        for f in sorted(filenames):
            if f.endswith((".py", ".txt", ".rst")):
                paths.append(os.path.join(dirpath, f))
    paths = paths[::stride]
    if max_files is not None:
        paths = paths[:max_files]
    out = []
    for p in paths:
        try:
            with open(p, encoding="utf-8") as fh:
                out.append(fh.read(max_bytes_per_file))
        except (UnicodeDecodeError, OSError):
            continue
    return out


def edge_texts():
    """Hand-made edge cases: long runs, mixed whitespace, digits, specials next to text."""
    return [
        "",
        " ",
        "a" * 5000,
        " " * 3000,
        "\n" * 500,
        "\t \t \n" * 200,
        "1" * 1000,
        "１２３４５６７８９０" * 50,
        "😀" * 300,
        "ab" * 2000,
        "x " * 2000,
        "中文" * 1000,
        "<｜User｜>" * 20 + "hi" + "<｜Assistant｜>",
        "<｜begin▁of▁sentence｜><｜begin▁of▁sentence｜>",
        "a<｜User｜>b  <｜Assistant｜>  c",
        "word\u00a0word\u3000word\u2028word\u180eword",
        "  \n\n  \t\tindent\r\n\r\n",
        "!!!!!!!!!!!!!!!!!!!!?????????........,,,,,,",
        "don't can't won't I'll you're we've she'd",
        "$1,234,567.89 ¥1000 €20 ₹500",
        "e\u0301e\u0301 a\u0308o\u0308 n\u0303",
        "\u0301\u0301\u0301 start with marks",
        "mixed中文English123数字😀emoji\ttab",
    ]
