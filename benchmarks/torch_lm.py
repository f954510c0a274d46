#!/usr/bin/env python3
"""PyTorch peer of bench_lm: the same decoder LM, trained the same way, timed the same way.

Models (match bench_lm.cpp exactly in sizes and algorithm):
  dense          SwiGLU FFN of width d_ff
  moe            plain MoE: softmax top-k router over E experts (SwiGLU, width expert_hidden)
  mixed-fourier  two expert groups (LM, MT) of E/2 experts each, a top-k router per group
                 whose logits add a projection of log(1 + |rfft(h)|) (normalised per token),
                 mixed by a learned per-token group gate (Mix-MoE, combination mode b)
Every model: RMSNorm pre-norm blocks, RoPE (rotate-half), causal attention, tied head, AdamW.

Prints one JSON line: tokens/s (median over timed steps), peak RSS, settings.
Run with the Debian interpreter (/usr/bin/python3, package python3-torch).
"""
import argparse
import json
import math
import os
import resource
import statistics
import time

import torch
import torch.nn as nn
import torch.nn.functional as F


class RMSNorm(nn.Module):
    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def rope(x, theta=10000.0):  # x (B, T, H, Dh), rotate-half convention
    _, t, _, dh = x.shape
    half = dh // 2
    freq = theta ** (-torch.arange(half, dtype=torch.float32) * 2.0 / dh)
    ang = torch.arange(t, dtype=torch.float32)[:, None] * freq[None, :]  # (T, Dh/2)
    cos = torch.cat([ang.cos(), ang.cos()], -1)[None, :, None, :]
    sin = torch.cat([ang.sin(), ang.sin()], -1)[None, :, None, :]
    rot = torch.cat([-x[..., half:], x[..., :half]], -1)
    return x * cos + rot * sin


class Attention(nn.Module):
    def __init__(self, d, heads):
        super().__init__()
        self.h, self.dh = heads, d // heads
        self.wq, self.wk, self.wv, self.wo = (nn.Linear(d, d, bias=False) for _ in range(4))

    def forward(self, x):
        b, t, c = x.shape
        q = rope(self.wq(x).view(b, t, self.h, self.dh)).transpose(1, 2)
        k = rope(self.wk(x).view(b, t, self.h, self.dh)).transpose(1, 2)
        v = self.wv(x).view(b, t, self.h, self.dh).transpose(1, 2)
        s = (q @ k.transpose(-1, -2)) / math.sqrt(self.dh)
        mask = torch.ones(t, t, dtype=torch.bool).triu(1)
        p = s.masked_fill(mask, float("-inf")).softmax(-1)
        return self.wo((p @ v).transpose(1, 2).reshape(b, t, c))


class SwiGLU(nn.Module):
    def __init__(self, d, hidden):
        super().__init__()
        self.w_gate = nn.Linear(d, hidden, bias=False)
        self.w_up = nn.Linear(d, hidden, bias=False)
        self.w_down = nn.Linear(hidden, d, bias=False)

    def forward(self, x):
        return self.w_down(F.silu(self.w_gate(x)) * self.w_up(x))


def fourier_features(h):  # per token: normalised log(1 + |rfft(h)|) over the hidden axis
    f = torch.log1p(torch.fft.rfft(h, dim=-1).abs())
    return (f - f.mean(-1, keepdim=True)) / (f.std(-1, unbiased=False, keepdim=True) + 1e-5)


class ExpertGroup(nn.Module):
    """Top-k routing over this group's experts; tokens sorted by expert, one GEMM chain per expert."""

    def __init__(self, d, experts, hidden, top_k, fourier):
        super().__init__()
        self.experts = nn.ModuleList(SwiGLU(d, hidden) for _ in range(experts))
        self.router = nn.Linear(d, experts, bias=False)
        self.fourier = nn.Linear(d // 2 + 1, experts, bias=False) if fourier else None
        self.k = top_k

    def forward(self, x):  # x (N, C)
        logits = self.router(x)
        if self.fourier is not None:
            logits = logits + self.fourier(fourier_features(x))
        probs = logits.softmax(-1)
        gates, idx = probs.topk(self.k, dim=-1)  # (N, K)
        gates = gates / gates.sum(-1, keepdim=True)
        flat_e = idx.reshape(-1)
        order = torch.argsort(flat_e, stable=True)
        tokens = torch.arange(x.shape[0]).repeat_interleave(self.k)[order]
        counts = torch.bincount(flat_e, minlength=len(self.experts)).tolist()
        xs = x[tokens]
        outs, start = [], 0
        for e, n in enumerate(counts):
            if n:
                outs.append(self.experts[e](xs[start:start + n]))
            start += n
        y = torch.cat(outs) * gates.reshape(-1)[order][:, None]
        return torch.zeros_like(x).index_add_(0, tokens, y)


class MixedMoE(nn.Module):
    def __init__(self, d, groups, experts_per_group, hidden, top_k, fourier):
        super().__init__()
        self.groups = nn.ModuleList(ExpertGroup(d, experts_per_group, hidden, top_k, fourier) for _ in range(groups))
        self.group_gate = nn.Linear(d, groups, bias=False) if groups > 1 else None

    def forward(self, x):
        if self.group_gate is None:
            return self.groups[0](x)
        w = self.group_gate(x).softmax(-1)  # (N, G)
        return sum(w[:, g:g + 1] * grp(x) for g, grp in enumerate(self.groups))


class Block(nn.Module):
    def __init__(self, a):
        super().__init__()
        self.norm1, self.norm2 = RMSNorm(a.d_model), RMSNorm(a.d_model)
        self.attn = Attention(a.d_model, a.heads)
        if a.model == "dense":
            self.ffn = SwiGLU(a.d_model, a.d_ff)
        elif a.model == "moe":
            self.ffn = MixedMoE(a.d_model, 1, a.experts, a.expert_hidden, a.top_k, False)
        else:
            self.ffn = MixedMoE(a.d_model, 2, a.experts // 2, a.expert_hidden, a.group_top_k, True)

    def forward(self, x):
        b, t, c = x.shape
        x = x + self.attn(self.norm1(x))
        return x + self.ffn(self.norm2(x).reshape(b * t, c)).reshape(b, t, c)


class LM(nn.Module):
    def __init__(self, a):
        super().__init__()
        self.embed = nn.Embedding(a.vocab, a.d_model)
        nn.init.normal_(self.embed.weight, std=0.02)  # as mixmoe's ModelConfig::init_std
        self.blocks = nn.ModuleList(Block(a) for _ in range(a.layers))
        self.norm = RMSNorm(a.d_model)

    def forward(self, ids):
        x = self.embed(ids)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x) @ self.embed.weight.t()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=["dense", "moe", "mixed-fourier"], default="dense")
    p.add_argument("--vocab", type=int, default=8000)
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--d-ff", type=int, default=1024)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--expert-hidden", type=int, default=512)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--group-top-k", type=int, default=1)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=2, help="torch threads; 0 keeps torch's default")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()

    torch.manual_seed(a.seed)
    if a.threads > 0:
        torch.set_num_threads(a.threads)
    model = LM(a)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4)
    gen = torch.Generator().manual_seed(a.seed)
    times = []
    loss = None
    for step in range(a.warmup + a.steps):
        ids = torch.randint(0, a.vocab, (a.batch, a.seq + 1), generator=gen)
        t0 = time.perf_counter()
        logits = model(ids[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, a.vocab), ids[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step >= a.warmup:
            times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    print(json.dumps({
        "impl": "pytorch", "model": a.model, "torch": torch.__version__, "threads": torch.get_num_threads(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "default"),
        "tokens_per_s": a.batch * a.seq / med, "step_ms_median": med * 1e3, "step_ms_min": min(times) * 1e3,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
        "params": sum(p.numel() for p in model.parameters()), "final_loss": float(loss),
    }))


if __name__ == "__main__":
    main()
