#!/usr/bin/env python3
"""Rewrites an fp32 DeepSeek-V4 model directory (e.g. `dsv3 init --config configs/X.json`) in the released
checkpoint layout, as tools/make_v4_fixture.py quantizes (numpy only, no torch):
  - attention wq_a / wq_b / wkv / wo_a / wo_b, indexer wq_b, shared experts, MTP e_proj / h_proj: FP8 e4m3 codes
    (F8_E4M3) with UE8M0 (F8_E8M0) 128x128 block scales 2^ceil(log2(amax / 448));
  - routed experts: FP4 e2m1 codes packed two per int8 byte (low nibble = even column) with one UE8M0 scale per
    row per 32 columns, 2^ceil(log2(amax / 6));
  - hc_* (mHC), attn_sink, ape, ffn.gate.bias: F32; every other float tensor BF16; tid2eid unchanged.
config.json gets the release's quantization_config and expert_dtype. Used to measure memory on a larger random
V4 model in the release layout (README, --dtype bf16).

Usage: python3 tools/v4_release_layout.py IN_DIR OUT_DIR
"""
import json
import struct
import sys
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file

FP8_KEYS = (".attn.wq_a.", ".attn.wq_b.", ".attn.wkv.", ".attn.wo_a.", ".attn.wo_b.", ".attn.indexer.wq_b.",
            ".ffn.shared_experts.", ".e_proj.", ".h_proj.")
FP4_MAG = np.array([0, .5, 1, 1.5, 2, 3, 4, 6], dtype=np.float32)


def e4m3_table():
    """Values of the e4m3fn codes 0..126 (non-negative, increasing; 127 is NaN)."""
    v = []
    for c in range(127):
        e, m = c >> 3, c & 7
        v.append(m / 8 * 2.0 ** -6 if e == 0 else (1 + m / 8) * 2.0 ** (e - 7))
    return np.array(v, dtype=np.float64)


E4M3 = e4m3_table()


def nearest_code(x, table):
    """Index of the nearest entry of an increasing table for |x|."""
    a = np.abs(x)
    hi = np.clip(np.searchsorted(table, a), 1, len(table) - 1)
    lo = hi - 1
    return np.where(a - table[lo] <= table[hi] - a, lo, hi)


def ue8m0(s):
    return (np.log2(s).astype(np.int64) + 127).astype(np.uint8)


def fp8_quant(w):
    N, K = w.shape
    sn, sk = -(-N // 128), -(-K // 128)
    amax = np.zeros((sn, sk))
    for i in range(sn):
        for j in range(sk):
            amax[i, j] = np.abs(w[i * 128:(i + 1) * 128, j * 128:(j + 1) * 128]).max()
    s = 2.0 ** np.ceil(np.log2(np.maximum(amax, 1e-30) / 448.0))
    x = w / np.kron(s, np.ones((128, 128)))[:N, :K]
    codes = nearest_code(x, E4M3).astype(np.uint8) | (np.signbit(x).astype(np.uint8) << 7)
    return codes, ue8m0(s)


def fp4_quant(w):
    N, K = w.shape
    blocks = w.reshape(N, K // 32, 32)
    s = 2.0 ** np.ceil(np.log2(np.maximum(np.abs(blocks).max(-1), 1e-30) / 6.0))
    x = (blocks / s[..., None]).reshape(N, K)
    code = nearest_code(x, FP4_MAG).astype(np.uint8) | (np.signbit(x).astype(np.uint8) << 3)
    return (code[:, 0::2] | (code[:, 1::2] << 4)).astype(np.uint8), ue8m0(s)


def bf16(x):
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    return ((u + 0x7fff + ((u >> 16) & 1)) >> 16).astype(np.uint16)  # round to nearest even (finite inputs)


def write_safetensors(path, tensors):
    """tensors: name -> (dtype string, shape, bytes)."""
    header, off = {}, 0
    for n, (dt, shape, b) in tensors.items():
        header[n] = {"dtype": dt, "shape": list(shape), "data_offsets": [off, off + len(b)]}
        off += len(b)
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)))
        f.write(h)
        for _, _, b in tensors.values():
            f.write(b)


def main():
    src, out = Path(sys.argv[1]), Path(sys.argv[2])
    out.mkdir(parents=True, exist_ok=True)
    sd = load_file(str(src / "model.safetensors"))
    t = {}
    for n in sorted(sd):
        w = sd[n]
        base = n[: -len(".weight")] if n.endswith(".weight") else n
        if w.dtype.kind in "iu":
            t[n] = ("I64", w.shape, w.astype(np.int64).tobytes())
        elif ".ffn.experts." in n and w.ndim == 2:
            p, s = fp4_quant(w.astype(np.float64))
            t[n] = ("I8", p.shape, p.tobytes())
            t[base + ".scale"] = ("F8_E8M0", s.shape, s.tobytes())
        elif w.ndim == 2 and n.endswith(".weight") and any(k in n for k in FP8_KEYS):
            c, s = fp8_quant(w.astype(np.float64))
            t[n] = ("F8_E4M3", c.shape, c.tobytes())
            t[base + ".scale"] = ("F8_E8M0", s.shape, s.tobytes())
        elif "hc_" in n or "attn_sink" in n or n.endswith(".ape") or n.endswith("gate.bias"):
            t[n] = ("F32", w.shape, w.astype(np.float32).tobytes())
        else:
            t[n] = ("BF16", w.shape, bf16(w).tobytes())
    write_safetensors(out / "model.safetensors", t)
    cfg = json.loads((src / "config.json").read_text())
    cfg.update(torch_dtype="bfloat16", expert_dtype="fp4",
               quantization_config=dict(quant_method="fp8", activation_scheme="dynamic", fmt="e4m3", scale_fmt="ue8m0",
                                        weight_block_size=[128, 128]))
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")


if __name__ == "__main__":
    main()
