#!/usr/bin/env python3
"""PyTorch reference for bt (tests/MODEL_SPEC.md): writes the tensors the C++ tests compare against.

    /usr/bin/python3 tests/reference.py [--out DIR]      # DIR defaults to <repo>/weights

DIR/ref_backbone.safetensors   a tiny backbone: weights, one batch, logits, loss, every gradient and
                               the losses of 10 AdamW steps on that batch.
DIR/ref_processor.safetensors  backbone + Cache Processor: the segment loop with the newline and
                               periodic:8 schedules, selections, rewritten caches, gradients (bptt
                               full / step, frozen / joint).
DIR/ref_latent.safetensors     the latent rollout baseline (Coconut-style, latent = 2): a backbone whose
                               input at every PAUSE position is the previous position's normed final
                               state; weights, tokens, logits, loss, the fed-back inputs, every gradient.
Only the standard library and torch; the safetensors files are written and read by hand. The reader
and writer need no torch, so tests/check_format.py can import them from a venv without it.
The float32 results depend on the BLAS kernels: the committed files come from OpenBLAS's AVX2 kernels,
so on an AVX-512 machine OPENBLAS_CORETYPE=Haswell reproduces them byte for byte.
"""
import argparse
import json
import math
import struct
import sys
import time
from array import array
from pathlib import Path

try:                      # torch is needed to build the references, not to read or write files
    import torch
    import torch.nn.functional as F
except ImportError:
    torch = None

# ---------------------------------------------------------------- vocabulary (spec: V = 48)
PAD, BOS, PAUSE, NL = 0, 1, 2, 3
VOCAB = ["<pad>", "<bos>", "_", "\n"] + list("0123456789+-*=#$,;") + [chr(c) for c in range(97, 123)]
assert len(VOCAB) == 48


def encode(text):
    """One token per character; '_' is PAUSE."""
    return [VOCAB.index(ch) for ch in text]


TEXT0, TEXT1 = "1*4-0+3\n1*4=4\n4-0=4\n4+3=7\n#7$", "5+9*2-7\n5+9=4\n4*2=8\n8-7=1\n#1$"
EX0 = [BOS] + encode(TEXT0) + [PAD]
EX1 = [BOS] + encode(TEXT1) + [PAUSE]
LATENT = 2   # latent positions after every newline (the latent rollout reference)


def with_latent(text, p):
    """p PAUSE placeholders after every newline: "a\nb\n" -> "a\n__b\n__" for p = 2."""
    return text.replace("\n", "\n" + "_" * p)


BACKBONE_CFG = dict(vocab_size=48, d_model=32, n_layers=2, n_heads=2, ffn_hidden=96, max_seq_len=64,
                    rope_theta=10000, norm_eps=1e-5)
TRAIN_CFG = dict(lr=0.01, weight_decay=0.1, beta1=0.9, beta2=0.95, adam_eps=1e-8, warmup=3, steps=10,
                 clip=1.0)
PROC_CFG = dict(proc_width=16, proc_layers=1, proc_heads=2, proc_ffn_hidden=48, k=2, schedule_periodic=8)
BLOCK = ["attn_norm", "wq", "wk", "wv", "wo", "mlp_norm", "w1", "w2", "w3"]


# ---------------------------------------------------------------- safetensors, stdlib only
def write_safetensors(path, tensors, metadata):
    """tensors: {name: (shape, array('f'))}. Layout: u64 LE header length N, N bytes of JSON
    (padded with spaces so that 8+N is a multiple of 8), then the F32 LE data of the tensors in
    sorted-name order, contiguous from offset 0."""
    header, blobs, off = {"__metadata__": {k: str(v) for k, v in metadata.items()}}, [], 0
    for name in sorted(tensors):
        shape, data = tensors[name]
        assert len(data) == math.prod(shape) > 0, name
        raw = _le(data).tobytes()
        header[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [off, off + len(raw)]}
        blobs.append(raw)
        off += len(raw)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-(8 + len(text)) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text + b"".join(blobs))


def read_safetensors(path):
    """-> (metadata dict, {name: (shape list, array('f'))}); F32 only."""
    buf = Path(path).read_bytes()
    (n,) = struct.unpack_from("<Q", buf, 0)
    header = json.loads(buf[8:8 + n])
    meta, data, out = header.pop("__metadata__", {}), buf[8 + n:], {}
    for name, h in header.items():
        assert h["dtype"] == "F32", (name, h["dtype"])
        begin, end = h["data_offsets"]
        a = array("f")
        a.frombytes(data[begin:end])
        assert len(a) == math.prod(h["shape"]), name
        out[name] = (h["shape"], _le(a))
    return meta, out


def _le(a):
    """array('f') <-> little-endian bytes (a byte swap on big-endian hosts)."""
    if sys.byteorder == "big":
        a = array("f", a)
        a.byteswap()
    return a


# ---------------------------------------------------------------- model (all functional)
def rmsnorm(x, w, eps):
    # h = x / sqrt(mean(x*x over the last dim) + eps) * w
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * w


def rope(z, pos, theta):
    """Half-split RoPE on head vectors z [..., n, D] at positions pos (broadcastable to [..., n]):
    out[i] = z[i] cos a - z[i+D/2] sin a, out[i+D/2] = z[i] sin a + z[i+D/2] cos a,
    a = pos * theta^(-2i/D). Angles in float64, then cast to z's dtype."""
    half = z.shape[-1] // 2
    freq = float(theta) ** (-2.0 * torch.arange(half, dtype=torch.float64) / z.shape[-1])
    a = pos.to(torch.float64)[..., None] * freq
    cos, sin = a.cos().to(z.dtype), a.sin().to(z.dtype)
    z1, z2 = z[..., :half], z[..., half:]
    return torch.cat([z1 * cos - z2 * sin, z1 * sin + z2 * cos], -1)


def split(x, nh):   # [B, n, C] -> [B, nh, n, C/nh]: head hh = channels [hh*HS, (hh+1)*HS)
    B, n, C = x.shape
    return x.view(B, n, nh, C // nh).transpose(1, 2)


def merge(x):       # [B, nh, n, HS] -> [B, n, nh*HS]
    B, nh, n, hs = x.shape
    return x.transpose(1, 2).reshape(B, n, nh * hs)


def block(W, pre, x, pos, nh, cfg, past=None):
    """Pre-norm block `pre` (backbone `layers.l.` or processor `proc.l.blocks.i.`) on x [B, n, width].
    past=(K, V) [B, s, width] (backbone): causal attention over past ++ this segment at positions
    pos = [s, e) (1-D). past=None (processor): full, non-causal attention; pos [B, 1, n].
    Returns (x, K, V, att): K, V now cover [0, e) (keys after RoPE), att [B, nh, n, keys]."""
    theta, eps = cfg["rope_theta"], cfg["norm_eps"]
    h = rmsnorm(x, W[pre + "attn_norm"], eps)
    q = rope(split(h @ W[pre + "wq"].T, nh), pos, theta)
    k = merge(rope(split(h @ W[pre + "wk"].T, nh), pos, theta))
    v = h @ W[pre + "wv"].T
    if past is not None:
        k, v = torch.cat([past[0], k], 1), torch.cat([past[1], v], 1)
    s = q @ split(k, nh).transpose(-1, -2) / math.sqrt(q.shape[-1])
    if past is not None:   # query at position t sees keys p <= t
        s = s.masked_fill(~(torch.arange(k.shape[1])[None, :] <= pos[:, None]), float("-inf"))
    att = torch.softmax(s, -1)
    x = x + merge(att @ split(v, nh)) @ W[pre + "wo"].T
    h = rmsnorm(x, W[pre + "mlp_norm"], eps)
    x = x + (F.silu(h @ W[pre + "w1"].T) * (h @ W[pre + "w3"].T)) @ W[pre + "w2"].T
    return x, k, v, att


def select(att, s, e, k, whole):
    """Rewrite set S [B, n_S] (ascending) and the top-k prior positions [B, min(k,s)] (None for
    periodic). score(p) = mean over heads and queries t in [s,e) of att[b,h,t,p], p < s; no gradient;
    stable sort of -score so ties go to the smaller position."""
    B = att.shape[0]
    if whole:
        return torch.arange(e).expand(B, e), None
    score = att.detach()[:, :, :, :s].mean(dim=(1, 2))                      # [B, s]
    top = torch.sort(-score, dim=1, stable=True).indices[:, :min(k, s)]
    top = torch.sort(top, dim=1).values
    return torch.cat([top, torch.arange(s, e).expand(B, e - s)], 1), top


def process(W, l, K, V, S, cfg):
    """Cache Processor of layer l: u = [K[b,S], V[b,S]] (2C); x = u w_in^T; blocks (non-causal, RoPE
    at the positions S); d = rmsnorm(x) w_out^T; K[b,S] += sigmoid(g) d[:, :C], V[b,S] += ... d[:, C:].
    Out of place: post = pre + scatter(delta), exact (pre + 0) for the entries not in S."""
    pre, C, bi = f"proc.{l}.", K.shape[2], torch.arange(K.shape[0])[:, None]
    x = torch.cat([K[bi, S], V[bi, S]], -1) @ W[pre + "w_in"].T
    for i in range(cfg["proc_layers"]):
        x = block(W, f"{pre}blocks.{i}.", x, S[:, None, :], cfg["proc_heads"], cfg)[0]
    d = torch.sigmoid(W[pre + "gate"]) * (rmsnorm(x, W[pre + "final_norm"], cfg["norm_eps"])
                                          @ W[pre + "w_out"].T)
    dK = torch.zeros_like(K).index_put((bi, S), d[..., :C])
    dV = torch.zeros_like(V).index_put((bi, S), d[..., C:])
    return K + dK, V + dV


def run(W, tokens, cfg, bounds=(), proc=None):
    """Segment loop. bounds: boundary positions; proc: None (processor off) or dict(k, whole, bptt).
    Returns logits [B, T, V] and a trace per boundary: (top-k per layer, K per layer, V per layer)."""
    B, T = tokens.shape
    L, C = cfg["n_layers"], cfg["d_model"]
    K = [torch.zeros(B, 0, C, dtype=W["tok_emb"].dtype) for _ in range(L)]
    V = list(K)
    edges, logits, trace = [0, *bounds, T], [], []
    for s, e in zip(edges[:-1], edges[1:]):
        pos, x, atts = torch.arange(s, e), W["tok_emb"][tokens[:, s:e]], []
        for l in range(L):
            x, K[l], V[l], att = block(W, f"layers.{l}.", x, pos, cfg["n_heads"], cfg, (K[l], V[l]))
            atts.append(att)
        logits.append(rmsnorm(x, W["final_norm"], cfg["norm_eps"]) @ W["tok_emb"].T)
        if proc is None or e == T:
            continue
        if proc["bptt"] == "step":   # truncate: the whole cache is detached before the rewrite
            K, V = [k.detach() for k in K], [v.detach() for v in V]
        tops = []
        for l in range(L):
            S, top = select(atts[l], s, e, proc["k"], proc["whole"])
            K[l], V[l] = process(W, l, K[l], V[l], S, cfg)
            tops.append(top)
        trace.append((tops, list(K), list(V)))
    return torch.cat(logits, 1), trace


def latent_positions(tokens):
    """The latent positions: those whose token is PAUSE, the same in every row, never position 0."""
    lat = (tokens[0] == PAUSE).nonzero()[:, 0].tolist()
    assert all((row == PAUSE).nonzero()[:, 0].tolist() == lat for row in tokens) and 0 not in lat
    return lat


def backbone_segment(W, x, s, K, V, cfg):
    """The layers on input vectors x [B, n, C] at positions [s, s+n), causal over the cache K, V (lists
    per layer, extended in place). Returns h = rmsnorm(x_L, final_norm), so logits = h tok_emb^T."""
    pos = torch.arange(s, s + x.shape[1])
    for l in range(cfg["n_layers"]):
        x, K[l], V[l], _ = block(W, f"layers.{l}.", x, pos, cfg["n_heads"], cfg, (K[l], V[l]))
    return rmsnorm(x, W["final_norm"], cfg["norm_eps"])


def run_latent(W, tokens, cfg, detach=False):
    """Latent rollout: the backbone, but the input at a latent position t (token PAUSE) is
    h[t-1] = rmsnorm(x_L[t-1], final_norm), the vector behind logits[t-1], not tok_emb[PAUSE]; a chain
    over consecutive latent positions. Segments: every latent position alone, the token runs between
    them whole; one KV cache throughout. detach: feed h[t-1].detach() (the chain carries no gradient).
    Returns logits [B, T, V] and the fed-back inputs [B, n_latent, C] in position order."""
    B, T = tokens.shape
    lat = latent_positions(tokens)
    K = [torch.zeros(B, 0, cfg["d_model"], dtype=W["tok_emb"].dtype) for _ in range(cfg["n_layers"])]
    V = list(K)
    edges = sorted({0, T, *lat, *(p + 1 for p in lat)})
    hs, fed = [], []
    for s, e in zip(edges[:-1], edges[1:]):
        if s in lat:   # e = s + 1; hs[-1] ends at position s - 1
            x = hs[-1][:, -1:].detach() if detach else hs[-1][:, -1:]
            fed.append(x)
        else:
            x = W["tok_emb"][tokens[:, s:e]]
        hs.append(backbone_segment(W, x, s, K, V, cfg))
    return torch.cat(hs, 1) @ W["tok_emb"].T, torch.cat(fed, 1)


def loss_fn(logits, tokens):
    """Mean of -log p(tokens[t+1] | logits[t]) over targets t+1 > q (q = first newline of the example)
    that are neither PAD nor PAUSE."""
    T = tokens.shape[1]
    q = (tokens == NL).int().argmax(1)
    tgt = tokens[:, 1:]
    m = (torch.arange(1, T)[None, :] > q[:, None]) & (tgt != PAD) & (tgt != PAUSE)
    lp = torch.log_softmax(logits[:, :-1], -1).gather(-1, tgt[..., None])[..., 0]
    return -lp[m].sum() / m.sum()


# ---------------------------------------------------------------- parameters
def backbone_names(n_layers):
    return (["tok_emb"] + [f"layers.{i}.{b}" for i in range(n_layers) for b in BLOCK]
            + ["final_norm"])


def proc_names(n_layers, proc_layers):
    return [n for l in range(n_layers) for n in
            [f"proc.{l}.w_in"] + [f"proc.{l}.blocks.{i}.{b}" for i in range(proc_layers) for b in BLOCK]
            + [f"proc.{l}.final_norm", f"proc.{l}.w_out", f"proc.{l}.gate"]]


def param_shape(name, cfg):
    """[out_features, in_features] for matrices, [width] for norms; processor blocks use its sizes."""
    last, C, V, Fh = name.split(".")[-1], cfg["d_model"], cfg["vocab_size"], cfg["ffn_hidden"]
    if name.startswith("proc."):
        p = cfg["proc_width"]
        if last in ("w_in", "w_out", "gate"):
            return {"w_in": [p, 2 * C], "w_out": [2 * C, p], "gate": [1]}[last]
        C, Fh = p, cfg["proc_ffn_hidden"]
    if last.endswith("norm"):
        return [C]
    return {"tok_emb": [V, C], "w1": [Fh, C], "w3": [Fh, C], "w2": [C, Fh]}.get(last, [C, C])


def init_params(names, cfg):
    """In the order of `names`: tok_emb randn*0.5, matrices randn*0.1, norms 1+0.1*randn, gate -1."""
    W = {}
    for n in names:
        shape = param_shape(n, cfg)
        if n == "tok_emb":
            W[n] = torch.randn(shape) * 0.5
        elif n.endswith("norm"):
            W[n] = 1 + 0.1 * torch.randn(shape)
        elif n.endswith("gate"):
            W[n] = torch.full(shape, -1.0)
        else:
            W[n] = torch.randn(shape) * 0.1
    return {n: w.requires_grad_() for n, w in W.items()}


def grads(loss, W, names):
    return dict(zip(names, torch.autograd.grad(loss, [W[n] for n in names])))


# ---------------------------------------------------------------- AdamW
def lr_at(t, tc):
    """Linear warmup over W steps, then cosine from lr to lr_min = 0.1 lr."""
    lr, Wu, S = tc["lr"], tc["warmup"], tc["steps"]
    if t < Wu:
        return lr * (t + 1) / Wu
    return 0.1 * lr + 0.5 * (lr - 0.1 * lr) * (1 + math.cos(math.pi * (t - Wu) / max(1, S - Wu)))


def adamw_losses(W0, tokens, cfg, tc):
    """Loss before each AdamW step on one batch. torch.optim.AdamW (single-tensor path):
    p -= lr*wd*p; m = b1 m + (1-b1) g; v = b2 v + (1-b2) g^2;
    p -= lr/(1-b1^t) * m / (sqrt(v)/sqrt(1-b2^t) + eps); weight decay on 2-D tensors only;
    gradients first clipped to global norm `clip` (torch.nn.utils.clip_grad_norm_)."""
    W = {n: w.detach().clone().requires_grad_() for n, w in W0.items()}
    groups = [{"params": [w for w in W.values() if w.dim() == 2], "weight_decay": tc["weight_decay"]},
              {"params": [w for w in W.values() if w.dim() != 2], "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=tc["lr"], betas=(tc["beta1"], tc["beta2"]), eps=tc["adam_eps"],
                            foreach=False)
    losses = []
    for t in range(tc["steps"]):
        for g in opt.param_groups:
            g["lr"] = lr_at(t, tc)
        opt.zero_grad()
        loss = loss_fn(run(W, tokens, cfg)[0], tokens)
        losses.append(loss.item())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(W.values()), tc["clip"])
        opt.step()
    return torch.tensor(losses)


# ---------------------------------------------------------------- the two files
def newline_bounds(tokens):
    return [int(p) for p in (tokens[0] == NL).nonzero()[:, 0] if p > 0]


def build_backbone(cfg, tc, tokens):
    names = backbone_names(cfg["n_layers"])
    W = init_params(names, cfg)
    logits = run(W, tokens, cfg)[0]
    loss = loss_fn(logits, tokens)
    out = {**W, "tokens": tokens, "logits": logits, "loss": loss.reshape(1)}
    out.update({f"grad.{n}": g for n, g in grads(loss, W, names).items()})
    out["adamw_losses"] = adamw_losses(W, tokens, cfg, tc)
    assert abs(out["adamw_losses"][0].item() - loss.item()) < 1e-6
    return out


def build_processor(cfg, tokens):
    bb, pn = backbone_names(cfg["n_layers"]), proc_names(cfg["n_layers"], cfg["proc_layers"])
    W = init_params(bb + pn, cfg)
    nl, per = newline_bounds(tokens), list(range(cfg["schedule_periodic"], tokens.shape[1],
                                                 cfg["schedule_periodic"]))
    out = {**W, "tokens": tokens}
    out["plain.logits"] = run(W, tokens, cfg)[0]
    off = run(W, tokens, cfg, nl)[0]   # the segment loop with the processor off = one causal pass
    assert (off - out["plain.logits"]).abs().max() < 1e-5

    def case(tag, bounds, whole, bptt, names, save_trace):
        logits, trace = run(W, tokens, cfg, bounds, dict(k=cfg["k"], whole=whole, bptt=bptt))
        loss = loss_fn(logits, tokens)
        out.update({f"{tag}.grad.{n}": g for n, g in grads(loss, W, names).items()})
        if not save_trace:
            return
        case_name = tag.split("_")[0]
        out[f"{case_name}.logits"], out[f"{case_name}.loss"] = logits, loss.reshape(1)
        for j, (tops, Ks, Vs) in enumerate(trace):
            for l in range(cfg["n_layers"]):
                if tops[l] is not None and tops[l].numel():
                    out[f"{case_name}.sel.{j}.{l}"] = tops[l]
                out[f"{case_name}.cache_k.{j}.{l}"], out[f"{case_name}.cache_v.{j}.{l}"] = Ks[l], Vs[l]
                if j and tops[l] is not None:   # rewrite j leaves prior entries outside S as they were
                    keep = torch.ones(len(Ks[l]), bounds[j - 1], dtype=torch.bool)   # [0, s)
                    keep[torch.arange(len(Ks[l]))[:, None], tops[l]] = False
                    assert torch.equal(Ks[l][:, :bounds[j - 1]][keep], trace[j - 1][1][l][keep])

    case("newline_full", nl, False, "full", pn, True)
    case("newline_step", nl, False, "step", pn, False)
    case("newline_joint", nl, False, "full", bb + pn, False)
    case("newline_joint_step", nl, False, "step", bb + pn, False)
    case("periodic_full", per, True, "full", pn, True)
    fd_check(W, tokens, cfg, nl, out)
    return out


def fd_check(W, tokens, cfg, bounds, out):
    """Central finite differences in float64 for a few processor entries (bptt full, newline)."""
    W64 = {n: w.detach().double().requires_grad_() for n, w in W.items()}
    proc = dict(k=cfg["k"], whole=False, bptt="full")

    def loss64():
        return loss_fn(run(W64, tokens, cfg, bounds, proc)[0], tokens)
    logits, trace = run(W64, tokens, cfg, bounds, proc)
    g64 = grads(loss_fn(logits, tokens), W64, [n for n in W64 if n.startswith("proc.")])
    for j, (tops, _, _) in enumerate(trace[1:], 1):   # no near-ties: float64 selects the same
        assert all(torch.equal(t, out[f"newline.sel.{j}.{l}"]) for l, t in enumerate(tops))
    for name, idx in [("proc.0.w_in", (3, 40)), ("proc.1.gate", (0,)), ("proc.0.blocks.0.wq", (1, 2)),
                      ("proc.1.w_out", (5, 7)), ("proc.0.blocks.0.attn_norm", (4,))]:
        fd, ag = central_diff(loss64, W64[name], idx), g64[name][idx].item()
        g32 = out[f"newline_full.grad.{name}"][idx].item()
        print(f"  fd check {name}{list(idx)}: autograd64 {ag:+.9e} fd {fd:+.9e} float32 {g32:+.6e}")
        assert abs(fd - ag) <= 1e-5 * abs(ag) + 1e-9 and abs(g32 - ag) <= 1e-3 * abs(ag) + 1e-7


def central_diff(loss64, w, idx, h=1e-6):
    """(loss(w[idx] + h) - loss(w[idx] - h)) / 2h, w[idx] restored afterwards."""
    orig = w.detach()[idx].item()
    with torch.no_grad():
        w[idx] = orig + h
        lp = loss64().item()
        w[idx] = orig - h
        lm = loss64().item()
        w[idx] = orig
    return (lp - lm) / (2 * h)


def build_latent(cfg, tokens):
    """The latent rollout reference, with its self-checks."""
    names, lat = backbone_names(cfg["n_layers"]), latent_positions(tokens)
    W = init_params(names, cfg)
    logits, fed = run_latent(W, tokens, cfg)
    loss = loss_fn(logits, tokens)
    out = {**W, "tokens": tokens, "logits": logits, "loss": loss.reshape(1), "latent_inputs": fed}
    out.update({f"grad.{n}": g for n, g in grads(loss, W, names).items()})
    with torch.no_grad():
        # the prefix before the first latent position is the plain backbone
        plain = run(W, tokens, cfg)[0]
        assert (logits[:, :lat[0]] - plain[:, :lat[0]]).abs().max() < 1e-5
        assert (logits[:, lat[0]:] - plain[:, lat[0]:]).abs().max() > 1e-2
        # fed[:, j] is the vector behind logits[lat[j] - 1]
        assert (fed @ W["tok_emb"].T - logits[:, [p - 1 for p in lat]]).abs().max() < 1e-5
        # given the fed-back inputs, the segment loop is one causal pass
        x = W["tok_emb"][tokens].index_put((torch.arange(len(tokens))[:, None], torch.tensor(lat)), fed)
        K = [torch.zeros(len(tokens), 0, cfg["d_model"]) for _ in range(cfg["n_layers"])]
        one = backbone_segment(W, x, 0, K, list(K), cfg) @ W["tok_emb"].T
        assert (one - logits).abs().max() < 1e-5
    # the gradient through the chain matters: detaching the fed-back inputs changes every gradient
    logits_d = run_latent(W, tokens, cfg, detach=True)[0]
    assert torch.equal(logits_d, logits)
    gd = grads(loss_fn(logits_d, tokens), W, names)
    assert out["grad.tok_emb"].abs().max() > 0
    for n in names:
        g = out[f"grad.{n}"]
        assert (g - gd[n]).abs().max() > 1e-3 * g.abs().max(), n
    print(f"  max |grad.tok_emb| = {out['grad.tok_emb'].abs().max().item():.3e}, detached chain: "
          f"max |diff| = {(out['grad.tok_emb'] - gd['tok_emb']).abs().max().item():.3e}")
    fd_check_latent(W, tokens, cfg, out)
    return out


def fd_check_latent(W, tokens, cfg, out):
    """Central finite differences in float64 for a few backbone entries of the latent rollout, against
    autograd64 (chain kept) and the float32 gradient in the file; `detached` is autograd64 without the
    chain, for scale."""
    W64 = {n: w.detach().double().requires_grad_() for n, w in W.items()}

    def loss64(detach=False):
        return loss_fn(run_latent(W64, tokens, cfg, detach)[0], tokens)
    g64, g64d = grads(loss64(), W64, list(W64)), grads(loss64(True), W64, list(W64))
    for name, idx in [("layers.0.wq", (1, 2)), ("layers.1.w2", (5, 7)), ("final_norm", (4,)),
                      ("layers.0.attn_norm", (9,)), ("tok_emb", (NL, 7)),
                      ("tok_emb", (VOCAB.index("4"), 3))]:   # rows of real tokens: '\n' and '4'
        fd, ag = central_diff(loss64, W64[name], idx), g64[name][idx].item()
        g32 = out[f"grad.{name}"][idx].item()
        print(f"  fd check {name}{list(idx)}: autograd64 {ag:+.9e} fd {fd:+.9e} float32 {g32:+.6e} "
              f"detached {g64d[name][idx].item():+.6e}")
        assert abs(fd - ag) <= 1e-5 * abs(ag) + 1e-9 and abs(g32 - ag) <= 1e-3 * abs(ag) + 1e-7


# ---------------------------------------------------------------- main
def save(path, tensors, meta):
    raw = {n: (list(t.shape), array("f", t.detach().float().reshape(-1).tolist()))
           for n, t in tensors.items()}
    write_safetensors(path, raw, meta)
    meta2, back = read_safetensors(path)   # self-check: the file reads back bit for bit
    assert meta2 == {k: str(v) for k, v in meta.items()} and back.keys() == raw.keys()
    for n, (shape, a) in raw.items():
        assert back[n][0] == shape and back[n][1].tobytes() == a.tobytes(), n
    return Path(path).stat().st_size


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent.parent / "weights"))
    out_dir = Path(ap.parse_args().out)
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    torch.manual_seed(1234)
    tokens = torch.tensor([EX0, EX1])
    assert tokens.shape == (2, 31) and newline_bounds(tokens) == [8, 14, 20, 26]
    assert (tokens[1] == NL).nonzero()[:, 0].tolist() == [8, 14, 20, 26]
    cfg, tc = dict(BACKBONE_CFG), dict(TRAIN_CFG)

    ref1 = build_backbone(cfg, tc, tokens)
    p1 = out_dir / "ref_backbone.safetensors"
    n1 = save(p1, ref1, {**cfg, **tc})
    print(f"wrote {p1}: {len(ref1)} tensors, {n1} bytes, loss {ref1['loss'].item():.6f}, adamw_losses "
          f"{ref1['adamw_losses'][0]:.4f} -> {ref1['adamw_losses'][-1]:.4f}")

    cfg2 = {**cfg, **PROC_CFG}
    ref2 = build_processor(cfg2, tokens)
    for key in ["newline_full.grad.proc.0.w_in", "newline_step.grad.proc.0.w_in",
                "newline_full.grad.proc.1.gate", "newline_joint.grad.tok_emb",
                "periodic_full.grad.proc.1.blocks.0.wv"]:
        assert ref2[key].abs().max() > 0, key
        print(f"  max |{key}| = {ref2[key].abs().max().item():.3e}")
    p2 = out_dir / "ref_processor.safetensors"
    n2 = save(p2, ref2, {**cfg2, **tc})
    print(f"wrote {p2}: {len(ref2)} tensors, {n2} bytes, newline.loss {ref2['newline.loss'].item():.6f}, "
          f"periodic.loss {ref2['periodic.loss'].item():.6f}, {time.time() - t0:.1f}s")

    torch.manual_seed(4321)   # after the two files above, so that they do not depend on this one
    tokens3 = torch.tensor([[BOS] + encode(with_latent(t, LATENT)) + [PAD] for t in (TEXT0, TEXT1)])
    lat = latent_positions(tokens3)
    assert tokens3.shape == (2, 39) and tokens3.shape[1] <= cfg["max_seq_len"]
    assert lat == [9, 10, 17, 18, 25, 26, 33, 34] and newline_bounds(tokens3) == [8, 16, 24, 32]
    cfg3 = {**cfg, "latent": LATENT}
    ref3 = build_latent(cfg3, tokens3)
    assert ref3["latent_inputs"].shape == (2, len(lat), cfg["d_model"])
    p3 = out_dir / "ref_latent.safetensors"
    n3 = save(p3, ref3, {**cfg3, **tc})
    print(f"wrote {p3}: {len(ref3)} tensors, {n3} bytes, loss {ref3['loss'].item():.6f}, "
          f"latent positions {lat}, {time.time() - t0:.1f}s")


if __name__ == "__main__":
    main()
