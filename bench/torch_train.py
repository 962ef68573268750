#!/usr/bin/env python3
"""A faithful DeepSeek-V3 training step in plain PyTorch: MLA (q LoRA, decoupled RoPE/YaRN), DeepSeekMoE with
sigmoid group-limited routing and shared experts, MTP modules, the sequence-wise balance loss, AdamW with
global-norm clipping. Two uses:

  bench:     python3 bench/torch_train.py --config bench/configs/cpu-s.json --batch 8 --seq 256 --steps 5
             prints one JSON line with tokens/s (the peer of `dsv3 train` in bench/train_vs_torch.sh)
  reference: python3 bench/torch_train.py --model DIR --input IN.safetensors --grads OUT.safetensors --mtp ...
             loads a hub directory and writes loss + grad.<hub name> (what `dsv3 grads` writes), so the tests
             can check dsv3's MTP and balance-loss gradients against autograd.

Experts are stored grouped ([E, I, H]) and computed per expert on the tokens routed to it (as transformers'
eager MoE does); attention uses scaled_dot_product_attention.
"""
import argparse
import json
import math
import os
import time

import torch
import torch.nn as nn
import torch.nn.functional as F


def rope_tables(cfg, max_pos):
    d = cfg["qk_rope_head_dim"]
    base = cfg.get("rope_theta", 10000.0)
    inv = 1.0 / (base ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    attn = 1.0
    rs = cfg.get("rope_scaling") or {}
    if rs.get("type", rs.get("rope_type")) == "yarn":
        s = rs["factor"]
        L0 = rs.get("original_max_position_embeddings")
        if L0:
            s = cfg["max_position_embeddings"] / L0
        bf, bs = rs.get("beta_fast", 32), rs.get("beta_slow", 1)

        def corr(rot):
            return d * math.log(L0 / (rot * 2 * math.pi)) / (2 * math.log(base))
        low, high = max(math.floor(corr(bf)), 0), min(math.ceil(corr(bs)), d - 1)
        if low == high:
            high += 0.001
        j = torch.arange(d // 2, dtype=torch.float64)
        ramp = ((j - low) / (high - low)).clamp(0, 1)
        inv = (inv / s) * ramp + inv * (1 - ramp)

        def ms(s, m):
            return 1.0 if s <= 1 else 0.1 * m * math.log(s) + 1.0
        m, mad = rs.get("mscale", 1), rs.get("mscale_all_dim", 0)
        attn = ms(s, m) / ms(s, mad) if (m and mad) else ms(s, 1.0)
    inv = inv.float()
    ang = torch.arange(max_pos, dtype=torch.float32)[:, None] * inv[None, :]
    return (ang.double().cos() * attn).float(), (ang.double().sin() * attn).float()


def softmax_scale(cfg):
    sc = (cfg["qk_nope_head_dim"] + cfg["qk_rope_head_dim"]) ** -0.5
    rs = cfg.get("rope_scaling") or {}
    if rs.get("type", rs.get("rope_type")) == "yarn":
        mad = rs.get("mscale_all_dim", 0)
        if mad:
            m = 0.1 * mad * math.log(rs["factor"]) + 1.0
            sc = sc * m * m
    return sc


def rope(x, cos, sin):
    """Interleaved pairs (x[2j], x[2j+1]) rotated by angle j; x [..., T, d], cos/sin [T, d/2]."""
    a, b = x[..., 0::2], x[..., 1::2]
    return torch.stack((a * cos - b * sin, b * cos + a * sin), dim=-1).flatten(-2)


class RMSNorm(nn.Module):
    def __init__(self, d, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))
        self.eps = eps

    def forward(self, x):
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))


class MLA(nn.Module):
    def __init__(self, c):
        super().__init__()
        H, nh = c["hidden_size"], c["num_attention_heads"]
        self.nh, self.dn, self.dr, self.dv, self.r = nh, c["qk_nope_head_dim"], c["qk_rope_head_dim"], c["v_head_dim"], c["kv_lora_rank"]
        self.qr = c.get("q_lora_rank")
        eps = c["rms_norm_eps"]
        if self.qr:
            self.q_a_proj = nn.Linear(H, self.qr, bias=False)
            self.q_a_layernorm = RMSNorm(self.qr, eps)
            self.q_b_proj = nn.Linear(self.qr, nh * (self.dn + self.dr), bias=False)
        else:
            self.q_proj = nn.Linear(H, nh * (self.dn + self.dr), bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(H, self.r + self.dr, bias=False)
        self.kv_a_layernorm = RMSNorm(self.r, eps)
        self.kv_b_proj = nn.Linear(self.r, nh * (self.dn + self.dv), bias=False)
        self.o_proj = nn.Linear(nh * self.dv, H, bias=False)
        self.scale = softmax_scale(c)

    def forward(self, x, cos, sin):
        B, T, _ = x.shape
        q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x))) if self.qr else self.q_proj(x)
        q = q.view(B, T, self.nh, self.dn + self.dr).transpose(1, 2)
        q_nope, q_pe = q[..., :self.dn], rope(q[..., self.dn:], cos, sin)
        a = self.kv_a_proj_with_mqa(x)
        c, k_pe = self.kv_a_layernorm(a[..., :self.r]), rope(a[..., self.r:], cos, sin)[:, None]
        kv = self.kv_b_proj(c).view(B, T, self.nh, self.dn + self.dv).transpose(1, 2)
        k = torch.cat((kv[..., :self.dn], k_pe.expand(B, self.nh, T, self.dr)), -1)
        qq = torch.cat((q_nope, q_pe), -1)
        o = F.scaled_dot_product_attention(qq, k, kv[..., self.dn:], is_causal=True, scale=self.scale)
        return self.o_proj(o.transpose(1, 2).reshape(B, T, self.nh * self.dv))


class MLP(nn.Module):
    def __init__(self, H, I):
        super().__init__()
        self.gate_proj = nn.Linear(H, I, bias=False)
        self.up_proj = nn.Linear(H, I, bias=False)
        self.down_proj = nn.Linear(I, H, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class MoE(nn.Module):
    def __init__(self, c):
        super().__init__()
        H, I, E = c["hidden_size"], c["moe_intermediate_size"], c["n_routed_experts"]
        self.E, self.K, self.G, self.TG = E, c["num_experts_per_tok"], c.get("n_group", 1), c.get("topk_group", 1)
        self.norm, self.scaling = c.get("norm_topk_prob", True), c.get("routed_scaling_factor", 1.0)
        self.gate = nn.Linear(H, E, bias=False)
        self.register_buffer("e_score_correction_bias", torch.zeros(E))
        self.w_gate = nn.Parameter(torch.empty(E, I, H))
        self.w_up = nn.Parameter(torch.empty(E, I, H))
        self.w_down = nn.Parameter(torch.empty(E, H, I))
        ns = c.get("n_shared_experts") or 0
        self.shared_experts = MLP(H, I * ns) if ns else None

    def route(self, h):
        s = torch.sigmoid(self.gate(h))
        sel = s.detach() + self.e_score_correction_bias
        N = sel.shape[0]
        if self.G > 1:
            gs = sel.view(N, self.G, -1).topk(2, dim=-1).values.sum(-1)
            gi = gs.topk(self.TG, dim=-1).indices
            mask = torch.zeros_like(gs).scatter_(1, gi, 1).bool()
            mask = mask[:, :, None].expand(N, self.G, self.E // self.G).reshape(N, self.E)
            sel = sel.masked_fill(~mask, 0.0)
        idx = sel.topk(self.K, dim=-1).indices
        w = s.gather(1, idx)
        if self.norm:
            w = w / (w.sum(-1, keepdim=True) + 1e-20)
        return s, idx, w * self.scaling

    def forward(self, x):
        B, T, H = x.shape
        h = x.reshape(-1, H)
        s, idx, w = self.route(h)
        out = self.shared_experts(h) if self.shared_experts is not None else torch.zeros_like(h)
        for e in range(self.E):
            tok, slot = torch.where(idx == e)
            if tok.numel() == 0:
                continue
            xe = h[tok]
            ye = F.linear(F.silu(F.linear(xe, self.w_gate[e])) * F.linear(xe, self.w_up[e]), self.w_down[e])
            out = out.index_add(0, tok, ye * w[tok, slot, None])
        self.last = (s.view(B, T, -1), idx.view(B, T, -1))
        return out.view(B, T, H)


class Block(nn.Module):
    def __init__(self, c, li):
        super().__init__()
        eps = c["rms_norm_eps"]
        self.input_layernorm, self.post_attention_layernorm = RMSNorm(c["hidden_size"], eps), RMSNorm(c["hidden_size"], eps)
        self.self_attn = MLA(c)
        moe = c.get("n_routed_experts") and li >= c.get("first_k_dense_replace", 0) and li % c.get("moe_layer_freq", 1) == 0
        self.mlp = MoE(c) if moe else MLP(c["hidden_size"], c["intermediate_size"])

    def forward(self, x, cos, sin):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        return x + self.mlp(self.post_attention_layernorm(x))


class MTP(nn.Module):
    def __init__(self, c, li):
        super().__init__()
        H, eps = c["hidden_size"], c["rms_norm_eps"]
        self.enorm, self.hnorm, self.head_norm = RMSNorm(H, eps), RMSNorm(H, eps), RMSNorm(H, eps)
        self.eh_proj = nn.Linear(2 * H, H, bias=False)
        self.block = Block(c, li)


class DeepSeekV3(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.c = c
        H, V, L = c["hidden_size"], c["vocab_size"], c["num_hidden_layers"]
        self.embed_tokens = nn.Embedding(V, H)
        self.layers = nn.ModuleList(Block(c, i) for i in range(L))
        self.norm = RMSNorm(H, c["rms_norm_eps"])
        self.lm_head = nn.Linear(H, V, bias=False)
        self.mtp = nn.ModuleList(MTP(c, L + k) for k in range(c.get("num_nextn_predict_layers", 0)))
        cos, sin = rope_tables(c, c["max_position_embeddings"])
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def moes(self):
        return [m for m in self.modules() if isinstance(m, MoE)]

    def loss(self, ids, mtp=True, lam=0.3, alpha=0.0):
        B, T = ids.shape
        x = self.embed_tokens(ids)
        for blk in self.layers:
            x = blk(x, self.cos[:T], self.sin[:T])
        hn = self.norm(x)
        main = F.cross_entropy(self.lm_head(hn[:, :-1]).flatten(0, 1), ids[:, 1:].flatten())
        total, mtp_losses = main, []
        D = len(self.mtp) if mtp and lam > 0 else 0
        h = hn
        for k in range(1, D + 1):
            Tk = T - k - 1
            if Tk < 1:
                break
            m = self.mtp[k - 1]
            e = m.enorm(self.embed_tokens(ids[:, k:k + Tk]))
            x = m.eh_proj(torch.cat((e, m.hnorm(h[:, :Tk])), -1))
            h = m.block(x, self.cos[:Tk], self.sin[:Tk])
            lk = F.cross_entropy(self.lm_head(m.head_norm(h)).flatten(0, 1), ids[:, k + 1:k + 1 + Tk].flatten())
            mtp_losses.append(lk)
            total = total + lam / D * lk
        if alpha > 0:
            for moe in self.moes():
                if not hasattr(moe, "last"):
                    continue
                s, idx = moe.last
                Bq, Tq, E = s.shape
                cnt = torch.zeros(Bq, E).scatter_add_(1, idx.reshape(Bq, -1), torch.ones(Bq, Tq * moe.K))
                f = cnt * E / (moe.K * Tq)
                P = (s / s.sum(-1, keepdim=True)).mean(1)
                total = total + alpha * (f * P).sum(-1).mean()
                del moe.last
        return total, main, mtp_losses


def hub_names(model):
    """(hub name, tensor, expert index or None) for every parameter and selection bias."""
    c = model.c
    L = c["num_hidden_layers"]
    out = [("model.embed_tokens.weight", model.embed_tokens.weight, None), ("model.norm.weight", model.norm.weight, None),
           ("lm_head.weight", model.lm_head.weight, None)]

    def block(prefix, blk):
        for n, p in list(blk.named_parameters()) + list(blk.named_buffers()):
            if n.startswith("mlp.w_"):
                which = {"mlp.w_gate": "gate_proj", "mlp.w_up": "up_proj", "mlp.w_down": "down_proj"}[n]
                for e in range(p.shape[0]):
                    out.append((f"{prefix}mlp.experts.{e}.{which}.weight", p, e))
            elif n == "mlp.e_score_correction_bias":
                out.append((prefix + "mlp.gate.e_score_correction_bias", p, None))
            else:
                out.append((prefix + n, p, None))
    for i, blk in enumerate(model.layers):
        block(f"model.layers.{i}.", blk)
    for k, m in enumerate(model.mtp):
        p = f"model.layers.{L + k}."
        for n in ("enorm", "hnorm", "eh_proj"):
            out.append((p + n + ".weight", getattr(m, n).weight, None))
        out.append((p + "shared_head.norm.weight", m.head_norm.weight, None))
        block(p, m.block)
    return out


def load_hub(model, d):
    from safetensors.torch import load_file
    sd = {}
    for f in sorted(os.listdir(d)):
        if f.endswith(".safetensors"):
            sd.update(load_file(os.path.join(d, f)))
    with torch.no_grad():
        for name, t, e in hub_names(model):
            src = sd[name].float()
            (t[e] if e is not None else t).copy_(src)


def build(cfg, seed):
    torch.manual_seed(seed)
    m = DeepSeekV3(cfg)
    std = cfg.get("initializer_range", 0.02)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if p.dim() >= 2:
                p.normal_(0, std)
    return m


def reference(args):
    cfg = json.load(open(os.path.join(args.model, "config.json")))
    m = DeepSeekV3(cfg)
    load_hub(m, args.model)
    from safetensors.numpy import load_file, save_file
    ids = torch.from_numpy(load_file(args.input)["input_ids"]).long()
    total, main, mtp = m.loss(ids, mtp=args.mtp, lam=args.mtp_lambda, alpha=args.balance_alpha)
    total.backward()
    out = {"loss": total.detach().reshape(1).numpy(), "main_loss": main.detach().reshape(1).numpy()}
    for name, t, e in hub_names(m):
        if name.endswith("e_score_correction_bias"):
            continue
        g = t.grad if t.grad is not None else torch.zeros_like(t)
        out["grad." + name] = (g[e] if e is not None else g).contiguous().numpy()
    save_file(out, args.grads)


def bench(args):
    torch.set_num_threads(args.threads)
    cfg = json.load(open(args.config))
    m = build(cfg, args.seed)
    decay = [p for p in m.parameters() if p.dim() >= 2]
    other = [p for p in m.parameters() if p.dim() < 2]
    kw = {}
    try:
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": other, "weight_decay": 0.0}],
                                lr=3e-4, betas=(0.9, 0.95), eps=1e-8, fused=True)
        kw["fused"] = True
    except Exception:
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": other, "weight_decay": 0.0}],
                                lr=3e-4, betas=(0.9, 0.95), eps=1e-8)
    g = torch.Generator().manual_seed(args.seed)
    V = cfg["vocab_size"]
    times, losses = [], []
    for step in range(args.warmup + args.steps):
        ids = torch.randint(0, V, (args.batch, args.seq), generator=g)
        t0 = time.perf_counter()
        total, main, mtp = m.loss(ids, mtp=True, lam=0.3, alpha=1e-4)
        opt.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
        opt.step()
        if step >= args.warmup:
            times.append(time.perf_counter() - t0)
        losses.append(main.item())
    tok = args.batch * args.seq
    print(json.dumps({"impl": "pytorch", "torch": torch.__version__, "threads": args.threads, "batch": args.batch,
                      "seq": args.seq, "steps": args.steps, "tokens_per_s": tok * len(times) / sum(times),
                      "step_s": sum(times) / len(times), "first_loss": losses[0], "last_loss": losses[-1], **kw}))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--model")
    ap.add_argument("--input")
    ap.add_argument("--grads")
    ap.add_argument("--mtp", action="store_true")
    ap.add_argument("--mtp-lambda", type=float, default=0.3)
    ap.add_argument("--balance-alpha", type=float, default=0.0)
    args = ap.parse_args()
    if args.model:
        reference(args)
    else:
        bench(args)


if __name__ == "__main__":
    main()
