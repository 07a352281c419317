#!/usr/bin/env python3
"""PyTorch side of `make bench` (issue 11): bt's default model run by PyTorch at its best, fp32, CPU.

    python tests/bench_torch.py [--threads N] [--compile] [--quick] [--seconds S]

Prints one JSON object per line on stdout (progress goes to stderr):
  {"row":"info", "torch":..., "blas":..., "threads":N, "python":..., ...}      always first
  {"row":"check", ...}       the batched model here against tests/reference.py (asserted at startup)
  {"row":"train_vanilla" | "train_bt_frozen_full" | "train_bt_frozen_step" | "train_bt_joint",
   "value":tok/s, "unit":"tok/s", "impl":"torch <version> eager|compile", "threads":N, ...}
  {"row":"rss_baseline" | "peak_rss", "value":MiB, ...}   ru_maxrss before / after the training rows
  {"row":"decode_vanilla_b1" | "decode_vanilla_b32" | "decode_bt_b1" | "decode_bt_b32", ...}
  {"row":"sgemm", "shape":[M,K,N], "value":GFLOP/s, ...}  torch.mm, C[M,N] = A[M,K] B[K,N]
  {"row":"sgemm_peak", "shape":[M,K,N], "value":GFLOP/s, ...}   best square-ish shape
A row that fails (e.g. torch.compile on this torch) is printed with "error" instead of "value".

The model is bt's default: vocab 48, d_model 128, 4 layers, 4 heads, SwiGLU 384, RMSNorm eps 1e-5,
half-split RoPE theta 10000, tied head; Cache Processor per layer: width 64, 1 block, 4 heads,
SwiGLU 192, top-k 4, newline schedule (tests/MODEL_SPEC.md). Parameters are named and initialised
by reference.py; this file only stores wq|wk|wv as one [3C, C] matrix and w1|w3 as one [2F, C]
matrix (one matmul each instead of three and two: same numbers), keeps the KV cache as
[B, heads, T, head_size], precomputes the RoPE tables, and uses one full causal pass for vanilla
training (which the segment loop equals: tests/test_bt.cpp, "the segment loop with the processor
off equals one full causal pass"). Nothing loops over batch rows.

Data: chain task (README.md, "Tasks"), n = 2..8 operations, one n per batch of 32 (every row has the same
newline positions), tokens = BOS + characters (no padding needed: a chain example with n operations
is 8n+6 tokens). The timed loop cycles through the 7 layouts (T = 22..70, mean 46); tokens/s counts B*T per
training step. Loss: reference.py's loss_fn (targets after the question line), as cross_entropy.
AdamW (lr 3e-3, betas 0.9/0.95, weight decay 0.1 on matrices) with clip_grad_norm_ 1.0, using
the fastest implementation the torch at hand has (fused, else foreach).

Decoding (bt's `generate`): the prompt is BOS + question + "\\n"; the processor fires before each
newline is read (so also before the prompt's own newline); then one token at a time with the KV
cache until '$'. Generated tokens = T - q - 1 per row (q = the question's newline position); the
greedy argmax is computed at every step, but the token fed back is the example's own, so the
segment layout (and the number of processor firings) is fixed, shared by all rows of the batch
and independent of the (untrained) weights. tokens/s = generated tokens / time (prefill included).
"""
import argparse
import json
import math
import os
import platform
import random
import re
import resource
import sys
import time


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=0,
                    help="torch.set_num_threads (default: $OMP_NUM_THREADS, else 2)")
    ap.add_argument("--compile", action="store_true",
                    help="also run train_vanilla and the decode rows through torch.compile")
    ap.add_argument("--quick", action="store_true", help="about 5x shorter: a smoke test")
    ap.add_argument("--seconds", type=float, default=0,
                    help="timed seconds per row (default 5, 1 with --quick)")
    return ap.parse_args()


ARGS = parse_args()
THREADS = ARGS.threads or int(os.environ.get("OMP_NUM_THREADS") or 2)
for _v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):   # before torch loads
    os.environ[_v] = str(THREADS)

import torch                                   # noqa: E402
import torch.nn.functional as F                # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import reference as R                          # noqa: E402

torch.set_num_threads(THREADS)
SECONDS = ARGS.seconds or (1.0 if ARGS.quick else 5.0)
BATCH = 32
SIZES = list(range(2, 9))                      # chain n, one per batch
CFG = dict(vocab_size=48, d_model=128, n_layers=4, n_heads=4, ffn_hidden=384, max_seq_len=8 * 8 + 6,
           rope_theta=10000, norm_eps=1e-5,
           proc_width=64, proc_layers=1, proc_heads=4, proc_ffn_hidden=192, k=4)
L, C, NH, V = CFG["n_layers"], CFG["d_model"], CFG["n_heads"], CFG["vocab_size"]
EPS, TMAX = CFG["norm_eps"], CFG["max_seq_len"]
HAS_SDPA = hasattr(F, "scaled_dot_product_attention")
BUILD = "debian" if "/usr/lib/python3/dist-packages" in torch.__file__ else "pip"
IMPL = f"torch {torch.__version__} eager"


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def emit(row, **kw):
    print(json.dumps({"row": row, **kw}), flush=True)


# ---------------------------------------------------------------- data (README.md, "Tasks": chain)
def chain_text(rng, n):
    """e.g. '1*4-0+3\\n1*4=4\\n4-0=4\\n4+3=7\\n#7$' (digits mod 10)."""
    acc = rng.randrange(10)
    q, lines = str(acc), []
    for _ in range(n):
        op, d = rng.choice("+-*"), rng.randrange(10)
        r = {"+": acc + d, "-": acc - d, "*": acc * d}[op] % 10
        q += op + str(d)
        lines.append(f"{acc}{op}{d}={r}")
        acc = r
    return q + "\n" + "\n".join(lines) + f"\n#{acc}$"


class Batch:
    def __init__(self, texts):
        self.tokens = torch.tensor([[R.BOS] + R.encode(t) for t in texts])
        B, T = self.tokens.shape
        self.B, self.T = B, T
        self.bounds = R.newline_bounds(self.tokens)
        assert all((self.tokens[b] == R.NL).nonzero()[:, 0].tolist() == self.bounds for b in range(B))
        self.q = self.bounds[0]                                  # the question's newline
        tgt = self.tokens[:, self.q + 1:].clone()                # targets of positions q .. T-2
        tgt[(tgt == R.PAD) | (tgt == R.PAUSE)] = -100
        self.tgt = tgt.reshape(-1)


def make_batches(B, seed):
    rng = random.Random(seed)
    return [Batch([chain_text(rng, n) for _ in range(B)]) for n in SIZES]


# ---------------------------------------------------------------- parameters
BB_NAMES = R.backbone_names(L)
PROC_NAMES = R.proc_names(L, CFG["proc_layers"])


def fuse(W):
    """reference.py's parameter dict -> this file's: wq|wk|wv -> wqkv, w1|w3 -> w13 (new leaves)."""
    P = {}
    for n, w in W.items():
        w = w.detach()
        pre, last = n.rsplit(".", 1) if "." in n else ("", n)
        pre = pre + "." if pre else ""
        if last in ("wk", "wv", "w3"):
            continue
        if last == "wq":
            P[pre + "wqkv"] = torch.cat([w, W[pre + "wk"].detach(), W[pre + "wv"].detach()], 0)
        elif last == "w1":
            P[pre + "w13"] = torch.cat([w, W[pre + "w3"].detach()], 0)
        else:
            P[n] = w.clone()
    return {n: w.contiguous() for n, w in P.items()}


def unfuse_grads(G):
    """Gradients named as in reference.py."""
    out = {}
    for n, g in G.items():
        pre, last = n.rsplit(".", 1) if "." in n else ("", n)
        pre = pre + "." if pre else ""
        if last == "wqkv":
            for nm, part in zip(("wq", "wk", "wv"), g.chunk(3, 0)):
                out[pre + nm] = part
        elif last == "w13":
            for nm, part in zip(("w1", "w3"), g.chunk(2, 0)):
                out[pre + nm] = part
        else:
            out[n] = g
    return out


def is_proc(name):
    return name.startswith("proc.")


# ---------------------------------------------------------------- the batched model
class Rope:
    """Half-split RoPE tables for head size hs at positions [0, T): angles in float64 as in
    reference.rope, so rot() gives the same numbers. rot(z) = z*cos2 + swap_halves(z)*sin2 with
    cos2 = [cos, cos], sin2 = [-sin, sin]."""

    def __init__(self, hs, T, theta):
        half = hs // 2
        freq = float(theta) ** (-2.0 * torch.arange(half, dtype=torch.float64) / hs)
        a = torch.arange(T, dtype=torch.float64)[:, None] * freq
        cos, sin = a.cos().float(), a.sin().float()
        self.cos, self.sin = torch.cat([cos, cos], -1), torch.cat([-sin, sin], -1)


ROPE_BB = Rope(C // NH, TMAX, CFG["rope_theta"])
ROPE_P = Rope(CFG["proc_width"] // CFG["proc_heads"], TMAX, CFG["rope_theta"])
CAUSAL = torch.full((TMAX, TMAX), float("-inf")).triu(1)        # additive: key p > query t


def rot(z, cos, sin):
    half = z.shape[-1] // 2
    return z * cos + torch.cat([z[..., half:], z[..., :half]], -1) * sin


def rmsnorm(x, w):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + EPS) * w


def attend(q, k, v, mask, probs):
    """softmax(q k^T / sqrt(d) + mask) v; q [B,h,n,d], k, v [B,h,t,d], mask additive [n,t] or None.
    probs: also return the attention probabilities (the processor's selection needs them), which
    rules out the fused kernel."""
    if HAS_SDPA and not probs:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask), None
    s = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    if mask is not None:
        s = s + mask
    a = torch.softmax(s, -1)
    return a @ v, a


def block(P, pre, x, cos, sin, nh, past=None, mask=None, probs=False):
    """Pre-norm block on x [B,n,width]; past (K, V) [B,nh,s,hs]: this segment's keys/values
    (keys after RoPE) are appended. Returns x, K, V (now over [0, s+n)), probs or None."""
    B, n, Cw = x.shape
    hs = Cw // nh
    h = rmsnorm(x, P[pre + "attn_norm"])
    qkv = F.linear(h, P[pre + "wqkv"]).view(B, n, 3, nh, hs).permute(2, 0, 3, 1, 4)   # [3,B,nh,n,hs]
    qk = rot(qkv[:2], cos, sin)
    q, k, v = qk[0], qk[1], qkv[2]
    if past is not None:
        k, v = torch.cat([past[0], k], 2), torch.cat([past[1], v], 2)
    y, att = attend(q, k, v, mask, probs)
    x = x + F.linear(y.transpose(1, 2).reshape(B, n, Cw), P[pre + "wo"])
    a, b = F.linear(rmsnorm(x, P[pre + "mlp_norm"]), P[pre + "w13"]).chunk(2, -1)
    x = x + F.linear(F.silu(a) * b, P[pre + "w2"])
    return x, k, v, att


def vanilla_hidden(P, tokens):
    """One full causal pass (= the segment loop with the processor off). -> final-normed [B,T,C]."""
    T = tokens.shape[1]
    x = F.embedding(tokens, P["tok_emb"])
    for l in range(L):
        x = block(P, f"layers.{l}.", x, ROPE_BB.cos[:T], ROPE_BB.sin[:T], NH, mask=CAUSAL[:T, :T])[0]
    return rmsnorm(x, P["final_norm"])


def process(P, l, K, V, S):
    """Cache Processor of layer l on K, V [B,nh,t,hs] at positions S [B,nS] (ascending). Out of
    place: returns new K, V with K[b,:,S] = pre + sigmoid(g) * dK (the others are the same values)."""
    Kt, Vt, idx, k_new, v_new = proc_rewrite(P, l, K, V, S)
    return Kt.index_put(idx, k_new).transpose(1, 2), Vt.index_put(idx, v_new).transpose(1, 2)


def proc_rewrite(P, l, K, V, S):
    """-> K, V as [B,t,nh,hs] views, the index (rows, S), and the rewritten entries [B,nS,nh,hs]."""
    B, nh, t, hs = K.shape
    nS, pre = S.shape[1], f"proc.{l}."
    bi = torch.arange(B)[:, None]
    Kt, Vt = K.transpose(1, 2), V.transpose(1, 2)                  # [B,t,nh,hs] views
    kg, vg = Kt[bi, S], Vt[bi, S]                                  # [B,nS,nh,hs]
    x = F.linear(torch.cat([kg.reshape(B, nS, C), vg.reshape(B, nS, C)], -1), P[pre + "w_in"])
    cos, sin = ROPE_P.cos[S][:, None], ROPE_P.sin[S][:, None]     # [B,1,nS,hsp]
    for i in range(CFG["proc_layers"]):
        x = block(P, f"{pre}blocks.{i}.", x, cos, sin, CFG["proc_heads"])[0]   # full attention
    d = torch.sigmoid(P[pre + "gate"]) * F.linear(rmsnorm(x, P[pre + "final_norm"]), P[pre + "w_out"])
    dk, dv = d[..., :C].reshape(B, nS, nh, hs), d[..., C:].reshape(B, nS, nh, hs)
    return Kt, Vt, (bi, S), kg + dk, vg + dv


def bt_hidden(P, tokens, bounds, bptt, skip_first=True):
    """The segment loop with the processor at every boundary (reference.run with proc). Returns the
    final-normed hidden states of positions [bounds[0], T) (skip_first) or [0, T)."""
    B, T = tokens.shape
    x_all = F.embedding(tokens, P["tok_emb"])
    K, Vc, outs = [None] * L, [None] * L, []
    edges = [0, *bounds, T]
    for s, e in zip(edges[:-1], edges[1:]):
        last, x, atts = e == T, x_all[:, s:e], []
        cos, sin, mask = ROPE_BB.cos[s:e], ROPE_BB.sin[s:e], CAUSAL[s:e, :e]
        for l in range(L):
            past = None if s == 0 else (K[l], Vc[l])
            x, K[l], Vc[l], att = block(P, f"layers.{l}.", x, cos, sin, NH, past, mask, probs=not last)
            atts.append(att)
        if s > 0 or not skip_first:
            outs.append(x)
        if last:
            break
        if bptt == "step":        # as reference.run: the whole cache is detached before the rewrite
            K, Vc = [k.detach() for k in K], [v.detach() for v in Vc]
        for l in range(L):
            S = R.select(atts[l], s, e, CFG["k"], False)[0]
            K[l], Vc[l] = process(P, l, K[l], Vc[l], S)
    return rmsnorm(torch.cat(outs, 1), P["final_norm"])


def batch_loss(P, h, batch):
    """reference.loss_fn on hidden states h of positions [q, T): logits only where targets count."""
    z = F.linear(h[:, :-1], P["tok_emb"])
    return F.cross_entropy(z.reshape(-1, V), batch.tgt, ignore_index=-100)


def vanilla_loss(P, tokens, q, tgt):
    z = F.linear(vanilla_hidden(P, tokens)[:, q:-1], P["tok_emb"])
    return F.cross_entropy(z.reshape(-1, V), tgt, ignore_index=-100)


# ---------------------------------------------------------------- decoding with a KV cache
class Decoder:
    """B rows with the same layout; caches [B,nh,TMAX,hs] per layer, written in place."""

    def __init__(self, P, B, use_proc, compiled=False):
        hs = C // NH
        self.P, self.B, self.use_proc = P, B, use_proc
        self.K = [torch.zeros(B, NH, TMAX, hs) for _ in range(L)]
        self.V = [torch.zeros(B, NH, TMAX, hs) for _ in range(L)]
        self.acc = [torch.zeros(B, TMAX) for _ in range(L)]   # attention mass of this segment's queries
        self.fwd, self.fire = dec_forward, dec_fire
        if compiled:
            self.fwd = torch.compile(dec_forward, dynamic=True)
            self.fire = torch.compile(dec_fire, dynamic=True)

    def generate(self, batch, collect=None):
        """Returns the number of generated tokens (all rows); collect: list to receive the logits
        fed to each argmax, as (position, [B,V])."""
        tok, T, q = batch.tokens, batch.T, batch.q
        nl = set(batch.bounds)
        P, K, Vv, acc, up = self.P, self.K, self.V, self.acc, self.use_proc
        for a in acc:
            a.zero_()
        z = self.fwd(P, K, Vv, acc, tok[:, :q], 0, up)                  # prefill: BOS + question
        seg = 0
        if up:
            self.fire(P, K, Vv, acc, 0, q)
            seg = q
        z = self.fwd(P, K, Vv, acc, tok[:, q:q + 1], q, up)             # the prompt's newline
        gen = 0
        for t in range(q + 1, T):
            if collect is not None:
                collect.append((t - 1, z))
            self.greedy = z[:, R.NL:].argmax(-1) + R.NL   # PAD, BOS, PAUSE never emitted; the
            gen += 1                                      # example's own token is fed (docstring)
            if t == T - 1:                      # '$': stop
                break
            if up and t in nl:
                self.fire(P, K, Vv, acc, seg, t)
                seg = t
            z = self.fwd(P, K, Vv, acc, tok[:, t:t + 1], t, up)
        return gen * self.B


def dec_forward(P, K, Vv, acc, toks, t0, probs):
    """Feed toks [B,n] at positions [t0, t0+n); returns the last position's logits [B,V]."""
    B, n = toks.shape
    e, hs = t0 + n, C // NH
    x = F.embedding(toks, P["tok_emb"])
    cos, sin = ROPE_BB.cos[t0:e], ROPE_BB.sin[t0:e]
    mask = None if n == 1 else CAUSAL[t0:e, :e]
    for l in range(L):
        pre = f"layers.{l}."
        h = rmsnorm(x, P[pre + "attn_norm"])
        qkv = F.linear(h, P[pre + "wqkv"]).view(B, n, 3, NH, hs).permute(2, 0, 3, 1, 4)
        qk = rot(qkv[:2], cos, sin)
        K[l][:, :, t0:e] = qk[1]
        Vv[l][:, :, t0:e] = qkv[2]
        y, att = attend(qk[0], K[l][:, :, :e], Vv[l][:, :, :e], mask, probs)
        if probs:
            acc[l][:, :e] += att.sum((1, 2))
        x = x + F.linear(y.transpose(1, 2).reshape(B, n, C), P[pre + "wo"])
        a, b = F.linear(rmsnorm(x, P[pre + "mlp_norm"]), P[pre + "w13"]).chunk(2, -1)
        x = x + F.linear(F.silu(a) * b, P[pre + "w2"])
    return F.linear(rmsnorm(x[:, -1], P["final_norm"]), P["tok_emb"])


def dec_fire(P, K, Vv, acc, s, e):
    """The processor at the boundary after segment [s, e), in place on the caches."""
    B = K[0].shape[0]
    for l in range(L):
        top = torch.sort(-acc[l][:, :s], dim=1, stable=True).indices[:, :min(CFG["k"], s)]
        S = torch.cat([torch.sort(top, dim=1).values, torch.arange(s, e).expand(B, e - s)], 1)
        Kt, Vt, idx, k_new, v_new = proc_rewrite(P, l, K[l][:, :, :e], Vv[l][:, :, :e], S)
        Kt.index_put_(idx, k_new)             # in place: Kt is a view of the cache
        Vt.index_put_(idx, v_new)
        acc[l].zero_()


# ---------------------------------------------------------------- check against reference.py
def check():
    torch.manual_seed(7)
    W = R.init_params(BB_NAMES + PROC_NAMES, CFG)
    P = fuse(W)
    batch = make_batches(3, seed=99)[2]                        # n = 4: T = 38, 5 segments
    tok, bounds = batch.tokens, batch.bounds
    proc_cfg = lambda bptt: dict(k=CFG["k"], whole=False, bptt=bptt)   # noqa: E731
    out = {}
    with torch.no_grad():
        ref_v = R.run(W, tok, CFG)[0]
        ref_b = R.run(W, tok, CFG, bounds, proc_cfg("full"))[0]
        mine_v = F.linear(vanilla_hidden(P, tok), P["tok_emb"])
        mine_b = F.linear(bt_hidden(P, tok, bounds, "full", skip_first=False), P["tok_emb"])
        out["vanilla_logits_maxdiff"] = (mine_v - ref_v).abs().max().item()
        out["bt_logits_maxdiff"] = (mine_b - ref_b).abs().max().item()
        out["bt_vs_vanilla_maxdiff"] = (ref_b - ref_v).abs().max().item()     # the processor matters
        for up, ref, tag in ((False, ref_v, "decode_vanilla"), (True, ref_b, "decode_bt")):
            got = []
            Decoder(P, batch.B, up).generate(batch, got)
            out[f"{tag}_logits_maxdiff"] = max((z - ref[:, t]).abs().max().item() for t, z in got)
    # gradients: frozen full / frozen step / joint, against torch.autograd on reference.run
    for tag, bptt, names in (("frozen_full", "full", PROC_NAMES), ("frozen_step", "step", PROC_NAMES),
                             ("joint", "full", BB_NAMES + PROC_NAMES)):
        ref = R.grads(R.loss_fn(R.run(W, tok, CFG, bounds, proc_cfg(bptt))[0], tok), W, names)
        Pg = {n: w.detach().clone().requires_grad_(is_proc(n) or tag == "joint") for n, w in P.items()}
        loss = batch_loss(Pg, bt_hidden(Pg, tok, bounds, bptt), batch)
        g = unfuse_grads(dict(zip([n for n in Pg if Pg[n].requires_grad],
                                  torch.autograd.grad(loss, [w for w in Pg.values() if w.requires_grad]))))
        assert set(g) == set(names), tag
        out[f"grad_{tag}_relmaxdiff"] = max(((g[n] - ref[n]).abs().max() / ref[n].abs().max().clamp_min(1e-12))
                                            .item() for n in names)
    ref_full = R.grads(R.loss_fn(R.run(W, tok, CFG, bounds, proc_cfg("full"))[0], tok), W, PROC_NAMES)
    ref_step = R.grads(R.loss_fn(R.run(W, tok, CFG, bounds, proc_cfg("step"))[0], tok), W, PROC_NAMES)
    out["grad_full_vs_step_relmaxdiff"] = max(((ref_full[n] - ref_step[n]).abs().max()
                                               / ref_full[n].abs().max()).item() for n in PROC_NAMES)
    Pv = {n: w.detach().clone().requires_grad_(not is_proc(n)) for n, w in P.items() if not is_proc(n)}
    out["vanilla_loss_diff"] = abs(vanilla_loss(Pv, tok, batch.q, batch.tgt).item()
                                   - R.loss_fn(R.run(W, tok, CFG)[0], tok).item())
    log("check against reference.py:", json.dumps(out))
    for k, v in out.items():
        if k == "bt_vs_vanilla_maxdiff":
            assert v > 1e-2, (k, v)
        elif k == "grad_full_vs_step_relmaxdiff":
            assert v > 1e-3, (k, v)
        elif "grad" in k:
            assert v < 1e-3, (k, v)
        else:
            assert v < 1e-4, (k, v)
    emit("check", ok=True, batch=[batch.B, batch.T], **out)


# ---------------------------------------------------------------- timing
def timed(name, work, batches, unit="tok/s", impl=IMPL, warm_all=False, **extra):
    """work(batch) -> tokens. Warm-up (every layout once unless --quick; always with warm_all, so
    that torch.compile has compiled every shape before the clock starts), then whole cycles over
    the layouts for >= SECONDS."""
    n_warm = 2 if ARGS.quick and not warm_all else len(batches)
    try:
        t0 = time.perf_counter()
        for b in batches[:n_warm]:
            work(b)
        warm_s = time.perf_counter() - t0
        toks, i, t0 = 0, 0, time.perf_counter()
        while True:
            toks += work(batches[i % len(batches)])
            i += 1
            el = time.perf_counter() - t0
            if i % len(batches) == 0 and el >= SECONDS:
                break
    except Exception as ex:   # noqa: BLE001  (reported as a row, the bench goes on)
        log(f"{name} ({impl}) failed: {type(ex).__name__}: {ex}")
        emit(name, value=None, unit=unit, impl=impl, threads=THREADS,
             error=f"{type(ex).__name__}: {str(ex)[:300]}")
        return None
    log(f"{name:24s} {toks / el:12.1f} {unit}  ({impl}, {i} batches in {el:.2f}s, warm-up {warm_s:.1f}s)")
    emit(name, value=round(toks / el, 1), unit=unit, impl=impl, threads=THREADS, batches=i,
         seconds=round(el, 3), warmup_s=round(warm_s, 2), **extra)
    return toks / el


def make_optimizer(params):
    groups = [{"params": [p for p in params if p.dim() == 2], "weight_decay": 0.1},
              {"params": [p for p in params if p.dim() != 2], "weight_decay": 0.0}]
    for kw in ({"fused": True}, {"foreach": True}, {}):
        try:
            opt = torch.optim.AdamW(groups, lr=3e-3, betas=(0.9, 0.95), eps=1e-8, **kw)
            if kw.get("fused"):        # some versions accept the flag and fail at the first step
                for p in params:
                    p.grad = torch.zeros_like(p)
                opt.step()
                opt.zero_grad(set_to_none=True)
                opt = torch.optim.AdamW(groups, lr=3e-3, betas=(0.9, 0.95), eps=1e-8, **kw)
            return opt, (list(kw) or ["for-loop"])[0]
        except (RuntimeError, TypeError, ValueError):
            continue
    raise RuntimeError("no AdamW")


def clip(params):
    try:
        torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True)
    except TypeError:          # torch < 2.0 has no foreach argument
        torch.nn.utils.clip_grad_norm_(params, 1.0)


def trainer(W, mode, compiled=False):
    """mode: vanilla | frozen_full | frozen_step | joint -> (work(batch) -> tokens, optimizer kind)."""
    P = fuse(W)
    if mode == "vanilla":
        P = {n: w for n, w in P.items() if not is_proc(n)}
    for n, w in P.items():
        w.requires_grad_(mode in ("vanilla", "joint") or is_proc(n))
    params = [w for w in P.values() if w.requires_grad]
    opt, kind = make_optimizer(params)
    fn = torch.compile(vanilla_loss) if compiled else vanilla_loss
    bptt = "step" if mode == "frozen_step" else "full"

    def work(batch):
        opt.zero_grad(set_to_none=True)
        if mode == "vanilla":
            loss = fn(P, batch.tokens, batch.q, batch.tgt)
        else:
            loss = batch_loss(P, bt_hidden(P, batch.tokens, batch.bounds, bptt), batch)
        loss.backward()
        clip(params)
        opt.step()
        return batch.B * batch.T
    return work, kind


def decoder_work(W, B, use_proc, compiled=False):
    dec = Decoder(fuse(W), B, use_proc, compiled)

    def work(batch):
        with torch.no_grad():
            return dec.generate(batch)
    return work


def sgemm_rows():
    """torch.mm at the shapes of one training step (B*T = 32*40 = 1280 tokens), best of 5 trials."""
    M, Fh, P_, Fp, nS = 1280, CFG["ffn_hidden"], CFG["proc_width"], CFG["proc_ffn_hidden"], 32 * 10
    shapes = [  # (M, K, N): C[M,N] = A[M,K] B[K,N]
        (M, C, C), (M, C, Fh), (M, Fh, C), (M, C, V),          # forward: q|k|v|o, w1|w3, w2, head
        (M, V, C),                                             # backward dX of the head (others repeat)
        (C, M, C), (Fh, M, C), (C, M, Fh), (V, M, C),          # weight gradients dW = dY^T X
        (nS, 2 * C, P_), (nS, P_, P_), (nS, P_, Fp), (nS, Fp, P_), (nS, P_, 2 * C),   # processor
    ]
    per = SECONDS / 5 / 4

    def gflops(M, K, N):
        a, b, c = torch.randn(M, K), torch.randn(K, N), torch.empty(M, N)
        for _ in range(3):
            torch.mm(a, b, out=c)
        reps = 1
        while True:                                   # calibrate reps to ~per seconds
            t0 = time.perf_counter()
            for _ in range(reps):
                torch.mm(a, b, out=c)
            el = time.perf_counter() - t0
            if el >= per / 4:
                break
            reps *= 4
        reps = max(1, int(reps * per / el))
        best, tot, tot_t = 0.0, 0, 0.0
        for _ in range(5):
            t0 = time.perf_counter()
            for _ in range(reps):
                torch.mm(a, b, out=c)
            el = time.perf_counter() - t0
            best, tot, tot_t = max(best, 2 * M * K * N * reps / el / 1e9), tot + reps, tot_t + el
        return best, 2 * M * K * N * tot / tot_t / 1e9, reps * 5

    for shp in shapes:
        best, mean, n = gflops(*shp)
        log(f"sgemm {str(list(shp)):18s} {best:8.1f} GFLOP/s (mean {mean:.1f}, {n} reps)")
        emit("sgemm", shape=list(shp), value=round(best, 2), mean=round(mean, 2), reps=n, unit="GFLOP/s",
             impl=f"torch {torch.__version__} mm", threads=THREADS)
    peak = None
    for s in ((256, 512, 1024) if ARGS.quick else (256, 512, 1024, 1536, 2048)):
        best, mean, n = gflops(s, s, s)
        log(f"sgemm square {s:5d}       {best:8.1f} GFLOP/s (mean {mean:.1f}, {n} reps)")
        if peak is None or best > peak[0]:
            peak = (best, [s, s, s])
    emit("sgemm_peak", shape=peak[1], value=round(peak[0], 2), unit="GFLOP/s",
         impl=f"torch {torch.__version__} mm", threads=THREADS)


def blas_line():
    cfg = torch.__config__.show()
    m = re.search(r"BLAS_INFO=([^,\s]+)", cfg)
    blas = "BLAS_INFO=" + (m.group(1) if m else "?")
    if torch.backends.mkl.is_available():
        blas += " (MKL)"
    lib = "/usr/lib/x86_64-linux-gnu/libblas.so.3"
    if "generic" in blas and os.path.exists(lib):     # Debian: the libblas.so.3 alternative
        blas += " -> " + os.path.realpath(lib)
        if "openblas" not in blas:
            blas += " (not OpenBLAS: is libopenblas0-pthread installed?)"
    return blas


def rss_mib():
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def main():
    t_start = time.perf_counter()
    emit("info", torch=torch.__version__, build=BUILD, blas=blas_line(), threads=THREADS,
         python=platform.python_version(), sdpa=HAS_SDPA, compile=ARGS.compile, quick=ARGS.quick,
         seconds_per_row=SECONDS, batch=BATCH, sizes=SIZES,
         mean_T=sum(8 * n + 6 for n in SIZES) / len(SIZES), config=CFG,
         loadavg=[round(x, 2) for x in os.getloadavg()], cpus=os.cpu_count())
    log(f"torch {torch.__version__} ({BUILD}), {blas_line()}, {THREADS} threads")
    check()
    torch.manual_seed(1234)
    W = R.init_params(BB_NAMES + PROC_NAMES, CFG)
    train = make_batches(BATCH, seed=1)
    dec1 = make_batches(1, seed=2)
    emit("rss_baseline", value=rss_mib(), unit="MiB", impl=IMPL, threads=THREADS)
    opt_kind = None
    for mode in ("vanilla", "frozen_full", "frozen_step", "joint"):
        work, opt_kind = trainer(W, mode)
        timed("train_vanilla" if mode == "vanilla" else f"train_bt_{mode}", work, train, optimizer=opt_kind)
    emit("peak_rss", value=rss_mib(), unit="MiB", impl=IMPL, threads=THREADS, after="training rows")
    for up in (False, True):
        for B, batches in ((1, dec1), (32, train)):
            timed(f"decode_{'bt' if up else 'vanilla'}_b{B}", decoder_work(W, B, up), batches)
    if ARGS.compile:
        cimpl = f"torch {torch.__version__} compile"
        if not hasattr(torch, "compile"):
            for row in ("train_vanilla", "decode_vanilla_b1", "decode_vanilla_b32", "decode_bt_b1",
                        "decode_bt_b32"):
                emit(row, value=None, unit="tok/s", impl=cimpl, threads=THREADS,
                     error=f"torch.compile is not in torch {torch.__version__}")
        else:
            try:
                work = trainer(W, "vanilla", compiled=True)[0]
            except Exception as ex:  # noqa: BLE001
                work = None
                emit("train_vanilla", value=None, unit="tok/s", impl=cimpl, threads=THREADS,
                     error=f"{type(ex).__name__}: {str(ex)[:300]}")
            if work:
                timed("train_vanilla", work, train, impl=cimpl, warm_all=True, optimizer=opt_kind)
            for up in (False, True):
                for B, batches in ((1, dec1), (32, train)):
                    timed(f"decode_{'bt' if up else 'vanilla'}_b{B}", decoder_work(W, B, up, True), batches,
                          impl=cimpl, warm_all=True)
    sgemm_rows()
    log(f"done in {time.perf_counter() - t_start:.0f}s, load average now {os.getloadavg()[0]:.2f} "
        f"(timings on a busy machine are not meaningful)")


if __name__ == "__main__":
    main()
