// bt.cpp -- the Bottlenecked Transformer (arXiv 2505.16950) in plain C++: the model program.
//
// A small Llama-style decoder (the backbone) plus a Cache Processor: one small non-causal
// transformer block per backbone layer that rewrites the KV cache in place, through a gated
// residual, at the end of every reasoning line ("the bottleneck step", search for it below).
// Training walks the line segments forward, then back through time with an undo log.
//
// Build and run:   make && ./bt train --task chain --out chain.safetensors
//                  ./bt eval --ckpt chain.safetensors --task chain
// On a GPU:        make USE_CUDA=1 && ./bt train --device cuda ...   (every op through kernels.cu)
// Tests:           make test        (tests/test_bt.cpp includes this file with BT_TESTING)
// The exact model: tests/MODEL_SPEC.md; the choices the paper leaves open: README.md, "Design choices".
//
// Where to start reading: forward_sequence (training through time: the segments forward, the
// bottleneck step at each boundary), then bottleneck_step (its four steps, numbered), then
// backward_sequence (the walk back with the undo log). Set a breakpoint on bottleneck_step and
// watch S.acts[l].k change (README, "Stepping through the bottleneck step in gdb").
//
// Beside it: tensor.hpp (every op, forward and backward, in plain loops), io.hpp (errors, files,
// safetensors), cli.hpp (flags, commands, typed run settings), device.hpp (where the ops run),
// tasks.hpp (the four tasks as text), decode_batched.hpp (the fast decoder evaluation uses) and
// kernels.cu (the ops on a GPU). lab/lab.cpp includes this file and adds bt experiment, bt probe
// and bt bench (make builds that).
//
// Contents, top to bottom:
//   small utilities, Rng, Carver
//   where the ops run .......................... OP(): the CPU, or --device cuda (device.hpp)
//   vocabulary ................................. 48 tokens, one per character
//   config ..................................... sizes; CONFIG_KEYS: every key, flag and range once
//   parameters ................................. one table of every tensor; init; the model
//   one transformer block ...................... block_forward, block_backward (backbone and processor)
//   run state .................................. activations, the KV cache, the undo log, gradients
//   the backbone ............................... backbone_forward/backward over a segment [s,e);
//                                                the latent-rollout baseline's fed-back inputs
//   THE CACHE PROCESSOR ........................ select, gather, transform, write back: bottleneck_step
//                                                and its backward, layer by layer, from the undo log
//   training through time ...................... segment_bounds, forward_sequence, backward_sequence
//   optimizer .................................. AdamW, warmup and cosine, clipping
//   tasks and data ............................. batches and the training stream (the tasks: tasks.hpp)
//   decoding ................................... Decoder (the reference), generate, --trace, eviction
//   the batched decoder ........................ decode_batched.hpp: the fast path, and the threads
//   evaluation ................................. evaluate: greedy answers line by line
//   checkpoints ................................ save_model, load_model (safetensors + metadata)
//   command line ............................... bt train (and --resume), eval, generate, score; main
#include <algorithm>
#include <chrono>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <memory>
#include <set>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>
#include <sys/resource.h>

#include "tensor.hpp"
#include "io.hpp"       // errors (BtError), strf, files, a JSON reader, safetensors
#include "cli.hpp"      // flags, parsed arguments, the table of commands

// =============================================================================================
// Small utilities (errors, strf and files are in io.hpp)
// =============================================================================================

static void zero(float* p, long n) {
    parallel_for(n, n * ELEM_WORK, [&](long i0, long i1) { memset(p + i0, 0, sizeof(float) * (i1 - i0)); });
}
static void copy_floats(float* dst, const float* src, long n) {   // both threads from a training step's size up
    parallel_for(n, n * ELEM_WORK, [&](long i0, long i1) { memcpy(dst + i0, src + i0, sizeof(float) * (i1 - i0)); });
}
static void copy_ints(int* dst, const int* src, long n) { memcpy(dst, src, sizeof(int) * n); }

static double now_seconds() {
    return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

// splitmix64: a small, well-mixed, seedable generator. Every random draw in bt comes from one.
struct Rng {
    uint64_t s;
    explicit Rng(uint64_t seed) : s(seed) {}
    uint64_t next() {
        uint64_t z = (s += 0x9E3779B97F4A7C15ull);
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
        z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
        return z ^ (z >> 31);
    }
    int randint(int lo, int hi) { return lo + (int)(next() % (uint64_t)(hi - lo + 1)); }  // [lo, hi]
    float uniform() { return (next() >> 40) * (1.0f / 16777216.0f); }                   // [0, 1)
    float normal() {  // Box-Muller
        float u1 = uniform(), u2 = uniform();
        if (u1 < 1e-7f) u1 = 1e-7f;
        return sqrtf(-2.0f * logf(u1)) * cosf(6.2831853f * u2);
    }
};

// A buffer carved into named pieces: call the setup once with base == nullptr to count, then
// again with the allocated base to hand out pointers. Used for params, activations, scratch.
struct Carver {
    float* base;
    long off = 0;
    float* take(long n) { float* p = base ? base + off : nullptr; off += n; return p; }
};

// =============================================================================================
// Where the ops run (device.hpp): every op call of the model goes through OP(), which runs
// tensor.hpp's op, or under --device cuda kernels.cu's op with the same arguments. There is one
// copy of the model's code for both; to_device / to_host copy the few numbers the host needs
// (nothing at all on the CPU).
// =============================================================================================
#include "device.hpp"

// =============================================================================================
// Vocabulary: one token per character, plus PAD and BOS (tests/MODEL_SPEC.md)
// =============================================================================================
enum { PAD = 0, BOS = 1, PAUSE = 2, NEWLINE = 3 };
static const char* VOCAB_CHARS = "\0\1_\n0123456789+-*=#$,;abcdefghijklmnopqrstuvwxyz";
static const int VOCAB_SIZE = 48;

static int char_to_token(char ch) {
    if (ch == '\0' || ch == '\1') return -1;
    for (int i = 2; i < VOCAB_SIZE; i++)
        if (VOCAB_CHARS[i] == ch) return i;
    return -1;
}
static char token_to_char(int t) { return (t >= 2 && t < VOCAB_SIZE) ? VOCAB_CHARS[t] : '?'; }

// a token as printable text: "\n" for a newline, "<pad>" and "<bos>" for the specials
static std::string token_str(int t) {
    if (t == PAD) return "<pad>";
    if (t == BOS) return "<bos>";
    if (t == NEWLINE) return "\\n";
    return std::string(1, token_to_char(t));
}

// BOS + the characters of text. `where` names the source for the error message.
static std::vector<int> tokenize(const std::string& text, const std::string& where) {
    std::vector<int> out = {BOS};
    int line = 1, col = 1;
    for (char ch : text) {
        int t = char_to_token(ch);
        if (t < 0)
            BAD_INPUT("%s: line %d, column %d: character '%s' (byte 0x%02x) is not in the vocabulary "
                      "(digits, a-z, and + - * = # $ , ; _ and newline)",
                      where.c_str(), line, col, std::string(1, ch).c_str(), (unsigned char)ch);
        out.push_back(t);
        if (ch == '\n') { line++; col = 1; } else col++;
    }
    return out;
}

// =============================================================================================
// Config: model sizes. The processor is present iff proc_width > 0. In shape comments C is
// d_model and Cp the processor width.
// =============================================================================================
struct Config {
    int V = VOCAB_SIZE;   // vocabulary size
    int C = 128;          // d_model
    int L = 4;            // backbone layers
    int NH = 4;           // heads (head size C/NH)
    int F = 384;          // SwiGLU hidden width
    int T = 256;          // max sequence length (sizes buffers; RoPE needs no table)
    float theta = 10000.0f, eps = 1e-5f;
    // Cache Processor (tests/MODEL_SPEC.md, "Cache Processor")
    int proc_width = 0;   // processor width; 0 = no processor
    int proc_layers = 1;  // processor blocks per backbone layer
    int proc_heads = 4;   // processor heads
    int proc_ffn = 0;     // processor SwiGLU hidden width
    int k = 4;            // top-k reconsolidated older entries per layer (newline schedule)
    int periodic = 0;     // 0: newline schedule; N > 0: periodic:N (whole cache every N tokens)
    // pause-token baseline (README, "Design choices"): this many PAUSE tokens after every newline
    int pause = 0;
    // latent-rollout baseline (tests/MODEL_SPEC.md, "Latent rollout"): this many latent positions
    // after every newline, each fed the previous position's final normed state instead of a token
    int latent = 0;
};

// Every integer of the config once: its checkpoint metadata key, its bt train flag, and the range
// both accept. PROC keys exist iff proc_width > 0; an OPTIONAL key is 0 when absent.
enum KeyKind { BACKBONE_KEY, PROC_KEY, OPTIONAL_KEY };
struct ConfigKey { const char* key; const char* flag; int Config::*field; int lo, hi; KeyKind kind; };
static const ConfigKey CONFIG_KEYS[] = {
    {"vocab_size", "", &Config::V, 1, 1 << 16, BACKBONE_KEY},
    {"d_model", "d-model", &Config::C, 2, 1 << 14, BACKBONE_KEY},
    {"n_layers", "layers", &Config::L, 1, 256, BACKBONE_KEY},
    {"n_heads", "heads", &Config::NH, 1, 1024, BACKBONE_KEY},
    {"ffn_hidden", "ffn", &Config::F, 1, 1 << 16, BACKBONE_KEY},
    {"max_seq_len", "max-seq-len", &Config::T, 2, 1 << 15, BACKBONE_KEY},
    {"proc_width", "proc-width", &Config::proc_width, 1, 1 << 14, PROC_KEY},
    {"proc_layers", "proc-layers", &Config::proc_layers, 1, 64, PROC_KEY},
    {"proc_heads", "proc-heads", &Config::proc_heads, 1, 1024, PROC_KEY},
    {"proc_ffn_hidden", "proc-ffn", &Config::proc_ffn, 1, 1 << 16, PROC_KEY},
    {"k", "k", &Config::k, 0, 64, PROC_KEY},
    {"pause", "pause", &Config::pause, 1, 64, OPTIONAL_KEY},
    {"latent", "latent", &Config::latent, 1, 64, OPTIONAL_KEY},
};
static const ConfigKey& config_key(const char* key) {
    for (auto& k : CONFIG_KEYS)
        if (!strcmp(k.key, key) || !strcmp(k.flag, key)) return k;
    INTERNAL("no config key '%s'", key);
}
static bool key_present(const ConfigKey& k, const Config& c) {
    return k.kind == BACKBONE_KEY || (k.kind == PROC_KEY ? c.proc_width > 0 : c.*k.field != 0);
}

static void validate_config(const Config& c) {
    for (auto& k : CONFIG_KEYS)
        if (key_present(k, c) && (c.*k.field < k.lo || c.*k.field > k.hi))
            BAD_INPUT("%s %d is out of range [%d, %d]", k.key, c.*k.field, k.lo, k.hi);
    if (c.C % c.NH != 0 || (c.C / c.NH) % 2 != 0)
        BAD_INPUT("heads (%d) must divide d_model (%d) into an even head size (RoPE rotates pairs)", c.NH, c.C);
    if (c.V != VOCAB_SIZE) BAD_INPUT("vocab_size is %d, bt's vocabulary has %d tokens", c.V, VOCAB_SIZE);
    if (c.proc_width > 0 && (c.proc_width % c.proc_heads != 0 || (c.proc_width / c.proc_heads) % 2 != 0))
        BAD_INPUT("processor heads (%d) must divide the processor width (%d) into an even head size", c.proc_heads,
                  c.proc_width);
    if (c.periodic < 0) BAD_INPUT("periodic must not be negative, got %d", c.periodic);
    if (c.latent > 0 && (c.pause > 0 || c.proc_width > 0))
        BAD_INPUT("a latent model (latent %d) has no PAUSE tokens and no processor (pause %d, proc_width %d)", c.latent,
                  c.pause, c.proc_width);
}

// The text a pause or latent model reads: P PAUSE tokens ('_') after every newline, where P is its
// pause or latent count (inserted_after_newline). A latent model's PAUSE positions are its latent
// positions: their input is not the PAUSE embedding (backbone_forward).
static int inserted_after_newline(const Config& c) { return c.pause + c.latent; }
static std::string insert_pauses(const std::string& text, int P) {
    if (P == 0) return text;
    std::string out;
    for (char ch : text) {
        out += ch;
        if (ch == '\n') out.append(P, '_');
    }
    return out;
}

// =============================================================================================
// Parameters: one table lists every tensor once; sizes, pointers, init, checkpoint names and
// test labels all come from it.
// =============================================================================================
struct BlockW {                  // one pre-norm transformer block (backbone or processor), width C
    float* attn_norm;            // (C)
    float *wq, *wk, *wv, *wo;    // (C,C) each
    float* mlp_norm;             // (C)
    float *w1, *w3;              // (F,C)
    float* w2;                   // (C,F)
};
struct ProcW {                   // the Cache Processor of one backbone layer
    float* w_in;                 // (Cp, 2C)   KV-token projection
    std::vector<BlockW> blocks;  // proc_layers blocks of width Cp
    float* final_norm;           // (Cp)
    float* w_out;                // (2C, Cp)   back to [dK | dV]; starts at zero
    float* gate;                 // (1)        g; the write-back is scaled by sigmoid(g)
};
struct Weights {
    float* tok_emb;              // (V,C), also the LM head (tied)
    std::vector<BlockW> layers;  // L
    float* final_norm;           // (C)
    std::vector<ProcW> proc;     // L when the processor is present, else empty
};
struct ParamInfo {
    std::string name;
    std::vector<int> shape;
    long offset, numel;
    bool decay;   // AdamW weight decay (matrices only)
    bool proc;    // part of the Cache Processor
    int kind;     // 0 normal init, 1 ones (norm gains), 2 zeros (w_out), 3 gate (-2), 4 residual proj
};

// Walk every tensor in canonical order: bind w's pointers into base (may be nullptr while
// counting) and, when table != nullptr, describe each tensor. Returns the total size.
static long layout_params(const Config& c, Weights* w, float* base, std::vector<ParamInfo>* table) {
    Carver cv{base};
    auto add = [&](float** slot, const std::string& name, std::vector<int> shape, int kind, bool proc) {
        long n = 1;
        for (int d : shape) n *= d;
        long off = cv.off;
        *slot = cv.take(n);
        if (table) table->push_back({name, shape, off, n, shape.size() == 2, proc, kind});
    };
    auto add_block = [&](BlockW& b, const std::string& p, int C, int F, bool proc) {
        add(&b.attn_norm, p + "attn_norm", {C}, 1, proc);
        add(&b.wq, p + "wq", {C, C}, 0, proc);
        add(&b.wk, p + "wk", {C, C}, 0, proc);
        add(&b.wv, p + "wv", {C, C}, 0, proc);
        add(&b.wo, p + "wo", {C, C}, 4, proc);
        add(&b.mlp_norm, p + "mlp_norm", {C}, 1, proc);
        add(&b.w1, p + "w1", {F, C}, 0, proc);
        add(&b.w2, p + "w2", {C, F}, 4, proc);
        add(&b.w3, p + "w3", {F, C}, 0, proc);
    };
    w->layers.resize(c.L);
    add(&w->tok_emb, "tok_emb", {c.V, c.C}, 0, false);
    for (int l = 0; l < c.L; l++) add_block(w->layers[l], "layers." + std::to_string(l) + ".", c.C, c.F, false);
    add(&w->final_norm, "final_norm", {c.C}, 1, false);
    w->proc.resize(c.proc_width > 0 ? c.L : 0);
    for (int l = 0; l < (int)w->proc.size(); l++) {
        ProcW& p = w->proc[l];
        std::string pre = "proc." + std::to_string(l) + ".";
        add(&p.w_in, pre + "w_in", {c.proc_width, 2 * c.C}, 0, true);
        p.blocks.resize(c.proc_layers);
        for (int i = 0; i < c.proc_layers; i++) add_block(p.blocks[i], pre + "blocks." + std::to_string(i) + ".", c.proc_width, c.proc_ffn, true);
        add(&p.final_norm, pre + "final_norm", {c.proc_width}, 1, true);
        add(&p.w_out, pre + "w_out", {2 * c.C, c.proc_width}, 2, true);
        add(&p.gate, pre + "gate", {1}, 3, true);
    }
    return cv.off;
}

struct Model {
    Config cfg;
    std::vector<ParamInfo> table;
    long n_params = 0, n_backbone = 0;   // processor tensors come after the backbone's
    std::vector<float> params, grads, m, v;  // (n_params) each: weights, gradients, AdamW moments
    Weights w, g;                            // named pointers into params and grads (or their device copies)
    int adam_t = 0;                          // AdamW steps taken
    // --device cuda (model_upload): the four buffers again, in one device allocation
    // params | grads | m | v, and w, g point there. The vectors above then only stage init,
    // --init, loading and saving (model_download brings the trained numbers back).
    DeviceMem dmem;
    float *dev_params = nullptr, *dev_grads = nullptr, *dev_m = nullptr, *dev_v = nullptr;  // (n_params) each
    Model() = default;
    Model(const Model& o) { *this = o; }
    Model& operator=(const Model& o);        // a copy owns its buffers: w and g point into the copy's
};

static void model_build(Model& M, const Config& c) {
    validate_config(c);
    M.cfg = c;
    M.table.clear();
    M.n_params = layout_params(c, &M.w, nullptr, &M.table);
    M.params.assign(M.n_params, 0.0f);
    M.grads.assign(M.n_params, 0.0f);
    M.m.assign(M.n_params, 0.0f);
    M.v.assign(M.n_params, 0.0f);
    layout_params(c, &M.w, M.params.data(), nullptr);
    layout_params(c, &M.g, M.grads.data(), nullptr);
    M.n_backbone = M.n_params;
    for (auto& p : M.table)
        if (p.proc) { M.n_backbone = p.offset; break; }
    M.adam_t = 0;
    M.dmem.release();
    M.dev_params = M.dev_grads = M.dev_m = M.dev_v = nullptr;
}

// --device cuda: copy the four buffers to the device and point w and g there
static void model_upload(Model& M) {
    if (M.cfg.latent)
        BAD_INPUT("--device cuda does not run latent models (their positions go one at a time through the host): "
                  "use --device cpu");
    long n = M.n_params;
    M.dmem.alloc(sizeof(float) * 4 * n);
    float* base = (float*)M.dmem.p;
    M.dev_params = base; M.dev_grads = base + n; M.dev_m = base + 2 * n; M.dev_v = base + 3 * n;
    to_device(M.dev_params, M.params.data(), sizeof(float) * n);
    to_device(M.dev_grads, M.grads.data(), sizeof(float) * n);
    to_device(M.dev_m, M.m.data(), sizeof(float) * n);
    to_device(M.dev_v, M.v.data(), sizeof(float) * n);
    layout_params(M.cfg, &M.w, M.dev_params, nullptr);
    layout_params(M.cfg, &M.g, M.dev_grads, nullptr);
}
// the weights and AdamW moments back into the host vectors (before a save); nothing on the CPU
static void model_download(Model& M) {
    if (!M.dev_params) return;
    to_host(M.params.data(), M.dev_params, sizeof(float) * M.n_params);
    to_host(M.m.data(), M.dev_m, sizeof(float) * M.n_params);
    to_host(M.v.data(), M.dev_v, sizeof(float) * M.n_params);
}

Model& Model::operator=(const Model& o) {
    if (this == &o) return *this;
    cfg = o.cfg; table = o.table; n_params = o.n_params; n_backbone = o.n_backbone;
    params = o.params; grads = o.grads; m = o.m; v = o.v; adam_t = o.adam_t;
    layout_params(cfg, &w, params.data(), nullptr);
    layout_params(cfg, &g, grads.data(), nullptr);
    dmem.release();
    dev_params = dev_grads = dev_m = dev_v = nullptr;
    if (o.dev_params) {   // a device model: the copy gets device buffers of its own, copied there
        model_upload(*this);
        device_copy(dev_params, o.dev_params, sizeof(float) * 4 * n_params);
    }
    return *this;
}

// Init: every matrix N(0, 1/fan_in) (fan_in = its input width; the embedding's is d_model), the
// residual projections (wo, w2) further scaled by 1/sqrt(2 x blocks in the stack) as in GPT-2, norm
// gains 1, the processor's w_out 0 (an untrained processor is an exact no-op) and its gate -2.
// (GPT-2's fixed 0.02 is tuned for width 768; at width 128 it left chain training ~4x slower.)
static void init_params(Model& M, float* start, float* end, uint64_t seed) {
    Rng rng(seed);
    for (auto& p : M.table) {
        float* x = M.params.data() + p.offset;
        if (x < start || x >= end) continue;
        float std = 1.0f / sqrtf((float)p.shape.back());
        if (p.kind == 4) std /= sqrtf(2.0f * (p.proc ? M.cfg.proc_layers : M.cfg.L));
        for (long i = 0; i < p.numel; i++) {
            float r = rng.normal();
            switch (p.kind) {
                case 1: x[i] = 1.0f; break;
                case 2: x[i] = 0.0f; break;
                case 3: x[i] = -2.0f; break;
                default: x[i] = std * r; break;
            }
        }
    }
}
static void model_init_random(Model& M, uint64_t seed) {
    init_params(M, M.params.data(), M.params.data() + M.n_params, seed);
}

// =============================================================================================
// One pre-norm transformer block, shared by the backbone (causal, over the KV cache) and the
// Cache Processor (non-causal, over the rewritten set):
//   x2 = x + Attn(RMSNorm(x)) Wo^T ;  out = x2 + W2( silu(W1 h) * W3 h ),  h = RMSNorm(x2)
// All buffers are time-major (T,B,·): row t*B+b. A call computes rows [s,e); its attention reads
// keys (and writes k,v) in rows [0,e). For the backbone, the k and v buffers ARE the KV cache.
// =============================================================================================
struct BlockDims { int C, NH, HS, F; float theta, eps; };   // width, heads, head size, SwiGLU width
static BlockDims backbone_dims(const Config& c) { return {c.C, c.NH, c.C / c.NH, c.F, c.theta, c.eps}; }
static BlockDims proc_dims(const Config& c) {
    return {c.proc_width, c.proc_heads, c.proc_width / c.proc_heads, c.proc_ffn, c.theta, c.eps};
}

// A call works on rows [s,e) of time-major (T,B,·) buffers: row t*B+b. T is also the row stride
// of the attention matrix. The backbone attends causally (over the KV cache), a processor block
// over all its rows.
struct Span { int s, e, B, T; };
enum Attention { NON_CAUSAL = 0, CAUSAL = 1 };

struct BlockActs {          // saved activations of one block, capacity (T,B)
    float* ln1;             // (T,B,C)    RMSNorm(x)
    float* rstd1;           // (T,B)
    float* q;               // (T,B,C)    queries after RoPE
    float *k, *v;           // (T,B,C)    keys after RoPE and values: the KV cache
    float* att;             // (T,B,NH,T) attention probabilities (row stride T)
    float* y;               // (T,B,C)    attention output, heads concatenated
    float* x2;              // (T,B,C)    x + y Wo^T
    float* ln2;             // (T,B,C)    RMSNorm(x2)
    float* rstd2;           // (T,B)
    float *h1, *h3;         // (T,B,F)    W1 h, W3 h
    float* g;               // (T,B,F)    silu(h1) * h3
};
static void carve_block_acts(Carver& cv, BlockActs& a, const BlockDims& d, int T, int B) {
    long TB = (long)T * B;
    a.ln1 = cv.take(TB * d.C); a.rstd1 = cv.take(TB); a.q = cv.take(TB * d.C);
    a.k = cv.take(TB * d.C); a.v = cv.take(TB * d.C); a.att = cv.take(TB * d.NH * T);
    a.y = cv.take(TB * d.C); a.x2 = cv.take(TB * d.C); a.ln2 = cv.take(TB * d.C); a.rstd2 = cv.take(TB);
    a.h1 = cv.take(TB * d.F); a.h3 = cv.take(TB * d.F); a.g = cv.take(TB * d.F);
}

struct BlockScratch {       // gradient scratch for one block's backward, capacity (T,B)
    float *dx2, *dln, *dy, *dq, *dqr, *dkr;  // (T,B,C)
    float *dh1, *dh3, *dg;                    // (T,B,F)
};
static void carve_block_scratch(Carver& cv, BlockScratch& s, int C, int F, long TB) {
    s.dx2 = cv.take(TB * C); s.dln = cv.take(TB * C); s.dy = cv.take(TB * C);
    s.dq = cv.take(TB * C); s.dqr = cv.take(TB * C); s.dkr = cv.take(TB * C);
    s.dh1 = cv.take(TB * F); s.dh3 = cv.take(TB * F); s.dg = cv.take(TB * F);
}

// out (T,B,C) rows [s,e) = block(x rows [s,e)); pos (T*B) is the RoPE position of every row;
// T is the row stride of a.att. wt: w's matrices transposed (a Decoder's), or nullptr (each
// matmul then transposes its own).
static void block_forward(float* out, BlockActs& a, const float* x, const BlockW& w, const BlockW* wt,
                          const BlockDims& d, const int* pos, Span sp, Attention causal) {
    int s = sp.s, e = sp.e, B = sp.B, T = sp.T, C = d.C, N = (e - s) * B;
    float theta = d.theta, eps = d.eps;
    long r0 = (long)s * B;
    auto WT = [&](float* BlockW::*f) -> const float* { return wt ? wt->*f : nullptr; };
    // attention half: ln1 = RMSNorm(x); q,k,v = ln1 Wq^T, Wk^T, Wv^T; RoPE on q and k
    OP(rmsnorm_forward(a.ln1 + r0 * C, a.rstd1 + r0, x + r0 * C, w.attn_norm, N, C, eps));
    OP(matmul_forward(a.q + r0 * C, a.ln1 + r0 * C, w.wq, WT(&BlockW::wq), N, C, C));
    OP(matmul_forward(a.k + r0 * C, a.ln1 + r0 * C, w.wk, WT(&BlockW::wk), N, C, C));
    OP(matmul_forward(a.v + r0 * C, a.ln1 + r0 * C, w.wv, WT(&BlockW::wv), N, C, C));
    OP(rope_forward(a.q + r0 * C, a.q + r0 * C, pos + r0, N, d.NH, d.HS, theta));
    OP(rope_forward(a.k + r0 * C, a.k + r0 * C, pos + r0, N, d.NH, d.HS, theta));
    OP(attention_forward(a.y + r0 * C, a.att + r0 * d.NH * T, a.q + r0 * C, a.k, a.v, e - s, e, T, s, causal, B,
                         d.NH, d.HS));
    // x2 = x + y Wo^T
    OP(matmul_forward(a.x2 + r0 * C, a.y + r0 * C, w.wo, WT(&BlockW::wo), N, C, C));
    OP(residual_forward(a.x2 + r0 * C, a.x2 + r0 * C, x + r0 * C, (long)N * C));
    // MLP half: out = x2 + (silu(ln2 W1^T) * ln2 W3^T) W2^T
    OP(rmsnorm_forward(a.ln2 + r0 * C, a.rstd2 + r0, a.x2 + r0 * C, w.mlp_norm, N, C, eps));
    OP(matmul_forward(a.h1 + r0 * d.F, a.ln2 + r0 * C, w.w1, WT(&BlockW::w1), N, C, d.F));
    OP(matmul_forward(a.h3 + r0 * d.F, a.ln2 + r0 * C, w.w3, WT(&BlockW::w3), N, C, d.F));
    OP(swiglu_forward(a.g + r0 * d.F, a.h1 + r0 * d.F, a.h3 + r0 * d.F, (long)N * d.F));
    OP(matmul_forward(out + r0 * C, a.g + r0 * d.F, w.w2, WT(&BlockW::w2), N, d.F, C));
    OP(residual_forward(out + r0 * C, out + r0 * C, a.x2 + r0 * C, (long)N * C));
}

// The backward of block_forward over rows [s,e).
//   dx (T,B,C): on entry d(out) in rows [s,e); on exit d(x) there.
//   dk, dv (T,B,C): gradients w.r.t. the cache (keys after RoPE), ACCUMULATED over rows [0,e);
//     rows [s,e) must already hold everything later readers added (the walk back through time
//     guarantees it) because this call consumes them for the k and v projections.
//   gw: weight gradients, or nullptr for a frozen block (activation gradients still flow).
static void block_backward(float* dx, float* dk, float* dv, BlockW* gw, BlockScratch& sc, const BlockActs& a,
                           const float* x, const BlockW& w, const BlockDims& d, const int* pos, Span sp,
                           Attention causal) {
    int s = sp.s, e = sp.e, B = sp.B, T = sp.T, C = d.C, F = d.F, N = (e - s) * B;
    float theta = d.theta;
    long r0 = (long)s * B, nC = (long)N * C, nF = (long)N * F;
    auto G = [&](float* BlockW::*f) { return gw ? gw->*f : nullptr; };
    // forward did out = x2 + g W2^T and g = silu(h1) * h3, h = ln2 W^T
    OP(zero(sc.dg + r0 * F, nF));
    OP(matmul_backward(sc.dg + r0 * F, G(&BlockW::w2), dx + r0 * C, a.g + r0 * F, w.w2, N, F, C));
    OP(zero(sc.dh1 + r0 * F, nF));
    OP(zero(sc.dh3 + r0 * F, nF));
    OP(swiglu_backward(sc.dh1 + r0 * F, sc.dh3 + r0 * F, sc.dg + r0 * F, a.h1 + r0 * F, a.h3 + r0 * F, nF));
    OP(zero(sc.dln + r0 * C, nC));
    OP(matmul_backward(sc.dln + r0 * C, G(&BlockW::w1), sc.dh1 + r0 * F, a.ln2 + r0 * C, w.w1, N, C, F));
    OP(matmul_backward(sc.dln + r0 * C, G(&BlockW::w3), sc.dh3 + r0 * F, a.ln2 + r0 * C, w.w3, N, C, F));
    // forward did ln2 = RMSNorm(x2) and out = x2 + ..., so dx2 = dout + RMSNorm'(dln)
    OP(copy_floats(sc.dx2 + r0 * C, dx + r0 * C, nC));
    OP(rmsnorm_backward(sc.dx2 + r0 * C, G(&BlockW::mlp_norm), sc.dln + r0 * C, a.x2 + r0 * C, w.mlp_norm,
                        a.rstd2 + r0, N, C));
    // forward did x2 = x + y Wo^T
    OP(zero(sc.dy + r0 * C, nC));
    OP(matmul_backward(sc.dy + r0 * C, G(&BlockW::wo), sc.dx2 + r0 * C, a.y + r0 * C, w.wo, N, C, C));
    // attention: dq for our queries, dk and dv into the cache for every key they read
    OP(zero(sc.dq + r0 * C, nC));
    OP(attention_backward(sc.dq + r0 * C, dk, dv, sc.dy + r0 * C, a.att + r0 * d.NH * T, a.q + r0 * C, a.k, a.v,
                          e - s, e, T, s, causal, B, d.NH, d.HS));
    // forward rotated q and k in place; undo the rotation on their gradients
    OP(zero(sc.dqr + r0 * C, nC));
    OP(rope_backward(sc.dqr + r0 * C, sc.dq + r0 * C, pos + r0, N, d.NH, d.HS, theta));
    OP(zero(sc.dkr + r0 * C, nC));
    OP(rope_backward(sc.dkr + r0 * C, dk + r0 * C, pos + r0, N, d.NH, d.HS, theta));
    // forward did q,k,v = ln1 W^T
    OP(zero(sc.dln + r0 * C, nC));
    OP(matmul_backward(sc.dln + r0 * C, G(&BlockW::wq), sc.dqr + r0 * C, a.ln1 + r0 * C, w.wq, N, C, C));
    OP(matmul_backward(sc.dln + r0 * C, G(&BlockW::wk), sc.dkr + r0 * C, a.ln1 + r0 * C, w.wk, N, C, C));
    OP(matmul_backward(sc.dln + r0 * C, G(&BlockW::wv), dv + r0 * C, a.ln1 + r0 * C, w.wv, N, C, C));
    // forward did ln1 = RMSNorm(x) and x2 = x + ..., so dx = dx2 + RMSNorm'(dln)
    OP(copy_floats(dx + r0 * C, sc.dx2 + r0 * C, nC));
    OP(rmsnorm_backward(dx + r0 * C, G(&BlockW::attn_norm), sc.dln + r0 * C, x + r0 * C, w.attn_norm, a.rstd1 + r0,
                        N, C));
}

// =============================================================================================
// Run state: activations, the KV cache and gradient buffers for a batch of B sequences of up to
// T positions. One buffer, carved once (the batch text and the segment list are still small
// per-step allocations).
// =============================================================================================
struct UndoRecord {   // what one firing of one layer's processor overwrote
    int layer, s, e;  // the boundary came after segment [s,e)
    int nS;           // entries rewritten per sequence
    long sel_off;     // into undo_sel: (nS,B) positions, ascending per sequence
    long u_off;       // into undo_u:   (nS,B,2C) [K|V] of those entries before the rewrite
};

struct ProcActs {             // one firing of one layer's processor, capacity (S,B), S = T + k
    int* sel;                 // (S,B) positions rewritten (row n*B+b), ascending per b
    float* scores;            // (B,T) attention mass per prior position (-inf once chosen)
    float* u;                 // (S,B,2C) KV-tokens before W_in: [K | V] gathered from the cache
    std::vector<float*> xs;   // proc_layers+1 of (S,B,Cp): residual stream through the processor blocks
    std::vector<BlockActs> blocks;  // proc_layers
    float *lnf, *rstdf;       // (S,B,Cp), (S,B)
    float* delta;             // (S,B,2C) W_out output: [dK | dV] before the gate
    // gradients (training only)
    float *dx, *dlnf, *ddelta, *du;  // (S,B,Cp) (S,B,Cp) (S,B,2C) (S,B,2C)
    float *dk, *dv;                   // (S,B,Cp) the blocks' own keys and values
};

struct RunState {
    int B = 0, T = 0;                  // capacity
    bool train = false;
    bool dev = false;                  // built for --device cuda: every buffer below is device memory
    std::vector<float> mem;
    std::vector<int> imem;
    DeviceMem dmem, dimem;             // --device cuda: mem and imem's buffers (and the undo log's entries)
    int *tokens, *targets;             // (T,B) input token, and the token it should predict
    int* pos;                          // (T*B) position t of row t*B+b (RoPE)
    float* weight;                     // (T,B) loss weight of each prediction: 1/count or 0
    // What the host writes or reads. On the CPU these are the buffers themselves (h_tokens ==
    // tokens, ...); under --device cuda host copies, moved explicitly by to_device / to_host.
    int *h_tokens, *h_targets, *h_pos;       // (T,B), (T,B), (T*B)   in imem
    float *h_weight, *h_losses, *h_logits;   // (T,B), (T,B), (T,B,V) in hmem (device) or mem (CPU)
    std::vector<float> hmem;
    std::vector<float*> xs;            // L+1 of (T,B,C): residual stream into each layer, out of the last
    std::vector<BlockActs> acts;       // L
    float *lnf, *rstdf;                // (T,B,C), (T,B)
    float *logits, *probs, *losses;    // (T,B,V), (T,B,V), (T,B)
    // training
    std::vector<float*> dK, dV;        // L of (T,B,C): gradient w.r.t. each cache entry, summed over
                                       // every later reader as the backward walk goes back in time
    float *dx, *dlnf, *dlogits;        // (T,B,C), (T,B,C), (T,B,V)
    float* dlatent = nullptr;          // (B,C) latent models: the gradient of a latent input, carried
                                       //   back to the state it copied (latent_grad_from_input)
    BlockScratch sc;                   // sized for the wider of backbone and processor
    // Cache Processor
    ProcActs pa;
    std::vector<UndoRecord> undo;      // one record per (boundary, layer), in firing order
    int* undo_sel = nullptr;           // the records' entries, filled up to undo_sel_n and undo_u_n:
    float* undo_u = nullptr;           //   where the other buffers are (host, or device memory)
    long undo_sel_n = 0, undo_u_n = 0, undo_sel_cap = 0, undo_u_cap = 0;
    std::unique_ptr<int[]> undo_sel_host;     // their storage on the CPU (left uninitialised: most
    std::unique_ptr<float[]> undo_u_host;     //   runs never fill the capacity)
    std::vector<int> bounds;           // segment starts of the current batch, then T (segment_bounds)
    int n_tok = 0;                     // positions filled so far (decoding)
    const Weights* wt = nullptr;       // the model's matrices transposed, for the forward's matmuls
                                       // (a Decoder's or a TrainRun's copy); nullptr: each matmul
                                       // transposes its W
};

static void carve_run_state(Carver& cv, RunState& S, const Config& c, int T, int B, bool train) {
    long TB = (long)T * B;
    BlockDims d = backbone_dims(c);
    S.xs.resize(c.L + 1);
    S.acts.resize(c.L);
    for (int l = 0; l <= c.L; l++) S.xs[l] = cv.take(TB * c.C);
    for (int l = 0; l < c.L; l++) carve_block_acts(cv, S.acts[l], d, T, B);
    S.lnf = cv.take(TB * c.C); S.rstdf = cv.take(TB);
    S.logits = cv.take(TB * c.V); S.probs = cv.take(TB * c.V); S.losses = cv.take(TB); S.weight = cv.take(TB);
    S.dK.assign(c.L, nullptr);
    S.dV.assign(c.L, nullptr);
    if (train) {
        for (int l = 0; l < c.L; l++) { S.dK[l] = cv.take(TB * c.C); S.dV[l] = cv.take(TB * c.C); }
        S.dx = cv.take(TB * c.C); S.dlnf = cv.take(TB * c.C); S.dlogits = cv.take(TB * c.V);
        if (c.latent > 0) S.dlatent = cv.take((long)B * c.C);
        carve_block_scratch(cv, S.sc, std::max(c.C, c.proc_width), std::max(c.F, c.proc_ffn), (T + c.k) * (long)B);
    }
    if (c.proc_width > 0) {
        int nS_max = T + c.k;   // most entries one firing can rewrite (periodic: the whole cache)
        long SB = (long)nS_max * B;
        BlockDims pd = proc_dims(c);
        ProcActs& p = S.pa;
        p.scores = cv.take((long)B * T);
        p.u = cv.take(SB * 2 * c.C);
        p.xs.resize(c.proc_layers + 1);
        p.blocks.resize(c.proc_layers);
        for (int i = 0; i <= c.proc_layers; i++) p.xs[i] = cv.take(SB * c.proc_width);
        for (int i = 0; i < c.proc_layers; i++) carve_block_acts(cv, p.blocks[i], pd, nS_max, B);
        p.lnf = cv.take(SB * c.proc_width); p.rstdf = cv.take(SB); p.delta = cv.take(SB * 2 * c.C);
        if (train) {
            p.dx = cv.take(SB * c.proc_width); p.dlnf = cv.take(SB * c.proc_width);
            p.ddelta = cv.take(SB * 2 * c.C); p.du = cv.take(SB * 2 * c.C);
            p.dk = cv.take(SB * c.proc_width); p.dv = cv.take(SB * c.proc_width);
        }
    }
}

static void run_state_build(RunState& S, const Config& c, int T, int B, bool train) {
    if (T > c.T) BAD_INPUT("a sequence of %d tokens is longer than the model's context (max_seq_len %d)", T, c.T);
    S.B = B; S.T = T; S.train = train; S.dev = g_device;
    Carver count{nullptr};
    carve_run_state(count, S, c, T, B, train);
    int nS_max = T + c.k;
    long TB = (long)T * B, n_int = TB * 3 + (long)nS_max * B;
    // the undo log: enough for the whole cache rewritten at every boundary of a periodic schedule
    // (sum over boundaries of e), or for newline (every position once plus k recalled per boundary)
    long rows = c.proc_width == 0 ? 0 : c.periodic > 0 ? (long)T * (T / c.periodic + 1) : (long)T * (1 + c.k);
    long cap_sel = rows * B * c.L, cap_u = rows * B * 2 * c.C * c.L;
    S.imem.assign(n_int, 0);
    float* fbase = nullptr;
    int* ibase = nullptr;
    S.undo_u_cap = cap_u;
    S.undo_sel_cap = cap_sel;
    if (S.dev) {   // device memory, zeroed like the vectors; the undo log's entries after the rest
        S.dmem.alloc(sizeof(float) * (count.off + cap_u));
        S.dimem.alloc(sizeof(int) * (n_int + cap_sel));
        fbase = (float*)S.dmem.p;
        ibase = (int*)S.dimem.p;
        S.undo_u = fbase + count.off;
        S.undo_sel = ibase + n_int;
        S.hmem.assign(TB * (2 + c.V), 0.0f);
    } else {
        S.dmem.release(); S.dimem.release();
        S.undo_u_host.reset(cap_u ? new float[cap_u] : nullptr);
        S.undo_sel_host.reset(cap_sel ? new int[cap_sel] : nullptr);
        S.undo_u = S.undo_u_host.get();
        S.undo_sel = S.undo_sel_host.get();
        assign_zeros(S.mem, count.off, train);
        fbase = S.mem.data();
        ibase = S.imem.data();
    }
    Carver cv{fbase};
    carve_run_state(cv, S, c, T, B, train);
    S.tokens = ibase;
    S.targets = S.tokens + TB;
    S.pos = S.targets + TB;
    S.pa.sel = S.pos + TB;
    S.h_tokens = S.imem.data();
    S.h_targets = S.h_tokens + TB;
    S.h_pos = S.h_targets + TB;
    S.h_weight = S.dev ? S.hmem.data() : S.weight;
    S.h_losses = S.dev ? S.hmem.data() + TB : S.losses;
    S.h_logits = S.dev ? S.hmem.data() + 2 * TB : S.logits;
    for (long r = 0; r < TB; r++) S.h_pos[r] = (int)(r / B);
    to_device(S.pos, S.h_pos, sizeof(int) * TB);
    S.bounds.reserve(T + 1);   // so that a training step allocates nothing
    if (c.proc_width > 0) S.undo.reserve(T * c.L);
}

// =============================================================================================
// The backbone over one segment of positions [s,e) of the batch (rows s*B .. e*B), reading and
// extending the KV cache. One call with [0,T) is the ordinary full causal pass.
// =============================================================================================
// Latent rollout: a row whose token is PAUSE at position s reads, instead of the PAUSE embedding,
// the same sequence's final normed state at s-1 (the vector its logits came from):
//   x0[s,b] = lnf[s-1,b]
// A latent position can only open a segment (segment_bounds, the decoders cut before each one), so
// that lnf[s-1] is already computed; the host's tokens say which rows are latent.
static void latent_inputs_forward(RunState& S, int s, int e, int C) {
    for (int t = s + 1; t < e; t++)
        for (int b = 0; b < S.B; b++)
            if (S.h_tokens[(long)t * S.B + b] == PAUSE) INTERNAL("latent position %d inside segment [%d,%d)", t, s, e);
    if (s == 0) return;
    for (int b = 0; b < S.B; b++)
        if (S.h_tokens[(long)s * S.B + b] == PAUSE)
            copy_floats(S.xs[0] + ((long)s * S.B + b) * C, S.lnf + ((long)(s - 1) * S.B + b) * C, C);
}

static void backbone_forward(const Model& M, RunState& S, int s, int e) {
    const Config& c = M.cfg;
    int B = S.B, N = (e - s) * B;
    long r0 = (long)s * B;
    BlockDims d = backbone_dims(c);
    OP(embedding_forward(S.xs[0] + r0 * c.C, S.tokens + r0, M.w.tok_emb, N, c.C));
    if (c.latent > 0) latent_inputs_forward(S, s, e, c.C);
    for (int l = 0; l < c.L; l++)
        block_forward(S.xs[l + 1], S.acts[l], S.xs[l], M.w.layers[l], S.wt ? &S.wt->layers[l] : nullptr, d, S.pos,
                      Span{s, e, B, S.T}, CAUSAL);
    OP(rmsnorm_forward(S.lnf + r0 * c.C, S.rstdf + r0, S.xs[c.L] + r0 * c.C, M.w.final_norm, N, c.C, c.eps));
    // LM head tied to the embedding: logits = lnf tok_emb^T
    OP(matmul_forward(S.logits + r0 * c.V, S.lnf + r0 * c.C, M.w.tok_emb, S.wt ? S.wt->tok_emb : nullptr, N, c.C, c.V));
    if (S.train)
        OP(crossentropy_forward(S.losses + r0, S.probs + r0 * c.V, S.logits + r0 * c.V, S.targets + r0, S.weight + r0,
                                N, c.V));
}

// The backward of backbone_forward for segment [s,e). Cache gradients dK, dV from later segments
// must already be in place. train_weights = false: a frozen backbone (activation grads only).
// The backward of latent_inputs_forward, in two halves, as the walk back meets them:
//   from the latent segment [s,..): dlatent[b] = d x0[s,b] (then d x0[s,b] = 0: PAUSE's embedding
//     was not read there);
//   in the segment before, ending at e = s: dlnf[e-1,b] += dlatent[b], beside its logits' gradient.
static void latent_grad_from_input(RunState& S, int s, int C) {
    for (int b = 0; s > 0 && b < S.B; b++)
        if (S.h_tokens[(long)s * S.B + b] == PAUSE) {
            float* dx0 = S.dx + ((long)s * S.B + b) * C;
            copy_floats(S.dlatent + (long)b * C, dx0, C);
            zero(dx0, C);
        }
}
static void latent_grad_into_state(RunState& S, int e, int C) {
    for (int b = 0; e < S.n_tok && b < S.B; b++)
        if (S.h_tokens[(long)e * S.B + b] == PAUSE) {
            float* d = S.dlnf + ((long)(e - 1) * S.B + b) * C;
            for (int i = 0; i < C; i++) d[i] += S.dlatent[(long)b * C + i];
        }
}

static void backbone_backward(Model& M, RunState& S, int s, int e, bool train_weights) {
    const Config& c = M.cfg;
    int B = S.B, N = (e - s) * B;
    long r0 = (long)s * B;
    BlockDims d = backbone_dims(c);
    float* gemb = train_weights ? M.g.tok_emb : nullptr;
    OP(zero(S.dlogits + r0 * c.V, (long)N * c.V));
    OP(crossentropy_backward(S.dlogits + r0 * c.V, S.probs + r0 * c.V, S.targets + r0, S.weight + r0, 1.0f, N, c.V));
    OP(zero(S.dlnf + r0 * c.C, (long)N * c.C));
    OP(matmul_backward(S.dlnf + r0 * c.C, gemb, S.dlogits + r0 * c.V, S.lnf + r0 * c.C, M.w.tok_emb, N, c.C, c.V));
    if (c.latent > 0) latent_grad_into_state(S, e, c.C);
    OP(zero(S.dx + r0 * c.C, (long)N * c.C));
    OP(rmsnorm_backward(S.dx + r0 * c.C, train_weights ? M.g.final_norm : nullptr, S.dlnf + r0 * c.C,
                        S.xs[c.L] + r0 * c.C, M.w.final_norm, S.rstdf + r0, N, c.C));
    for (int l = c.L - 1; l >= 0; l--)
        block_backward(S.dx, S.dK[l], S.dV[l], train_weights ? &M.g.layers[l] : nullptr, S.sc, S.acts[l], S.xs[l],
                       M.w.layers[l], d, S.pos, Span{s, e, B, S.T}, CAUSAL);
    if (c.latent > 0) latent_grad_from_input(S, s, c.C);
    if (gemb) OP(embedding_backward(gemb, S.dx + r0 * c.C, S.tokens + r0, N, c.C));
}

// =============================================================================================
// THE CACHE PROCESSOR -- "the bottleneck step"
//
// At the boundary after segment [s,e), for every backbone layer l independently:
//   1. select:     the top-k older positions p < s by the attention mass segment [s,e) gave them
//   2. gather:     u = [K_l[p] | V_l[p]] for p in S = topk ∪ [s,e)         (KV-tokens, 2C wide)
//   3. transform:  delta = W_out FinalNorm( Blocks_noncausal( W_in u ) )   (RoPE at positions p)
//   4. write back: K_l[p] += sigmoid(g) delta[:C],  V_l[p] += sigmoid(g) delta[C:]   (in place)
// The pre-rewrite values u go to the undo log, which the backward walk uses to restore the cache.
// Set a breakpoint on bottleneck_step and watch S.acts[l].k change.
// =============================================================================================

// The selection score of position p for sequence b: the mean over heads h and the segment's
// queries t in [s,e) of att[t,b,h,p].   att (T,B,NH,T)
static float attention_mass(const float* att, int s, int e, int b, int p, int B, int NH, int T) {
    float acc = 0.0f;
    for (int t = s; t < e; t++)
        for (int h = 0; h < NH; h++) acc += att[(((long)t * B + b) * NH + h) * T + p];
    return acc / (float)(NH * (e - s));
}

// 1. select. sel (nS,B) gets, per sequence, the chosen older positions ascending and then s..e-1.
//    score(p) = mean over heads h and queries t in [s,e) of att[t,b,h,p]; ties go to the smaller p.
//    periodic schedule: S = [0,e), the whole cache. Returns nS.
static int select_forward(int* sel, float* scores, const float* att, int s, int e, int B, int NH, int T, int k,
                          int periodic) {
    if (periodic) {
        for (int n = 0; n < e; n++)
            for (int b = 0; b < B; b++) sel[(long)n * B + b] = n;
        return e;
    }
    int kk = std::min(k, s), nS = kk + (e - s);
    for (int b = 0; b < B; b++) {
        float* score = scores + (long)b * T;
        for (int p = 0; p < s; p++) score[p] = attention_mass(att, s, e, b, p, B, NH, T);
        // top-kk by repeated argmax (k is small); strict > keeps the smaller position on ties.
        // A chosen position's score is then set to -inf so it is not chosen again.
        int chosen[64];
        for (int r = 0; r < kk; r++) {
            int best = 0;
            for (int p = 1; p < s; p++)
                if (score[p] > score[best]) best = p;
            score[best] = -INFINITY;
            chosen[r] = best;
        }
        std::sort(chosen, chosen + kk);
        for (int r = 0; r < kk; r++) sel[(long)r * B + b] = chosen[r];
        for (int t = s; t < e; t++) sel[(long)(kk + t - s) * B + b] = t;
    }
    return nS;
}

// 2. gather: u[n,b,:] = [ K[sel[n,b], b, :] | V[sel[n,b], b, :] ]      u (nS,B,2C), K,V (T,B,C)
static void gather_forward(float* u, const float* K, const float* V, const int* sel, int nS, int B, int C) {
    parallel_for((long)nS * B, (long)nS * B * C, [&](long r0, long r1) {
        for (long r = r0; r < r1; r++) {
            long src = ((long)sel[r] * B + r % B) * C;
            memcpy(u + r * 2 * C, K + src, sizeof(float) * C);
            memcpy(u + r * 2 * C + C, V + src, sizeof(float) * C);
        }
    });
}
// forward copied cache rows into u, so dK[sel] += du[:C], dV[sel] += du[C:]. The positions of one
// sequence are distinct, so rows never collide.
static void gather_backward(float* dK, float* dV, const float* du, const int* sel, int nS, int B, int C) {
    parallel_for((long)nS * B, (long)nS * B * C, [&](long r0, long r1) {
        for (long r = r0; r < r1; r++) {
            long dst = ((long)sel[r] * B + r % B) * C;
            for (int c = 0; c < C; c++) {
                dK[dst + c] += du[r * 2 * C + c];
                dV[dst + c] += du[r * 2 * C + C + c];
            }
        }
    });
}

// 3. transform: x0 = u W_in^T; proc_layers non-causal blocks with RoPE at the original positions;
//    delta = RMSNorm(x) W_out^T.   u (nS,B,2C) -> delta (nS,B,2C)
//    wt: w's matrices transposed (a Decoder's), or nullptr (each matmul transposes its own)
static void transform_forward(ProcActs& p, const ProcW& w, const ProcW* wt, const Config& c, int nS, int B) {
    int N = nS * B;
    BlockDims d = proc_dims(c);
    OP(matmul_forward(p.xs[0], p.u, w.w_in, wt ? wt->w_in : nullptr, N, 2 * c.C, c.proc_width));
    for (int i = 0; i < c.proc_layers; i++)
        block_forward(p.xs[i + 1], p.blocks[i], p.xs[i], w.blocks[i], wt ? &wt->blocks[i] : nullptr, d, p.sel,
                      Span{0, nS, B, nS}, NON_CAUSAL);
    OP(rmsnorm_forward(p.lnf, p.rstdf, p.xs[c.proc_layers], w.final_norm, N, c.proc_width, c.eps));
    OP(matmul_forward(p.delta, p.lnf, w.w_out, wt ? wt->w_out : nullptr, N, c.proc_width, 2 * c.C));
}
// the backward of transform_forward: ddelta -> du (accumulated) and the weight grads gw
static void transform_backward(float* du, ProcW& gw, RunState& S, const ProcW& w, const Config& c, int nS, int B) {
    ProcActs& p = S.pa;
    int N = nS * B;
    BlockDims d = proc_dims(c);
    OP(zero(p.dlnf, (long)N * c.proc_width));
    OP(matmul_backward(p.dlnf, gw.w_out, p.ddelta, p.lnf, w.w_out, N, c.proc_width, 2 * c.C));
    OP(zero(p.dx, (long)N * c.proc_width));
    OP(rmsnorm_backward(p.dx, gw.final_norm, p.dlnf, p.xs[c.proc_layers], w.final_norm, p.rstdf, N, c.proc_width));
    for (int i = c.proc_layers - 1; i >= 0; i--) {
        OP(zero(p.dk, (long)N * c.proc_width));  // the blocks' own keys and values: nothing outside reads them
        OP(zero(p.dv, (long)N * c.proc_width));
        block_backward(p.dx, p.dk, p.dv, &gw.blocks[i], S.sc, p.blocks[i], p.xs[i], w.blocks[i], d, p.sel,
                       Span{0, nS, B, nS}, NON_CAUSAL);
    }
    OP(matmul_backward(du, gw.w_in, p.dx, p.u, w.w_in, N, 2 * c.C, c.proc_width));
}

// 4. write back, in place: K[sel] += sigmoid(g) delta[:C], V[sel] += sigmoid(g) delta[C:]
static float sigmoidf(float x) { return sigmoid_fixed(x); }
static void write_back_forward(float* K, float* V, const float* delta, const float* gate, const int* sel, int nS,
                               int B, int C) {
    float sg = sigmoidf(gate[0]);
    parallel_for((long)nS * B, (long)nS * B * C, [&](long r0, long r1) {
        for (long r = r0; r < r1; r++) {
            long dst = ((long)sel[r] * B + r % B) * C;
            for (int c = 0; c < C; c++) {
                K[dst + c] += sg * delta[r * 2 * C + c];
                V[dst + c] += sg * delta[r * 2 * C + C + c];
            }
        }
    });
}
// forward did post = pre + sigmoid(g) delta. The identity part needs nothing: d(pre) = d(post)
// stays in dK, dV. Here: ddelta = sigmoid(g) d(post) and dg += sigmoid'(g) sum d(post) . delta
// (a serial sum: one gate, fixed order). Unlike the other backwards, ddelta is WRITTEN, not added
// to: it is a scratch buffer that only this firing's transform_backward reads.
static void write_back_backward(float* ddelta, float* dgate, const float* dK, const float* dV, const float* delta,
                                const float* gate, const int* sel, int nS, int B, int C) {
    float sg = sigmoidf(gate[0]);
    double acc = 0.0;
    for (long r = 0; r < (long)nS * B; r++) {
        long src = ((long)sel[r] * B + r % B) * C;
        for (int c = 0; c < C; c++) {
            float gk = dK[src + c], gv = dV[src + c];
            ddelta[r * 2 * C + c] = sg * gk;
            ddelta[r * 2 * C + C + c] = sg * gv;
            acc += (double)gk * delta[r * 2 * C + c] + (double)gv * delta[r * 2 * C + C + c];
        }
    }
    if (dgate) dgate[0] += (float)(acc * sg * (1.0 - sg));
}

// ---- the undo log: a record per firing and layer (on the host), its entries (sel and the
// pre-rewrite [K|V]) appended to S.undo_sel and S.undo_u (host or device memory, like the cache).
// undo_sel_of and undo_u_of are how everything reads them.
static void undo_clear(RunState& S) {
    S.undo.clear();
    S.undo_sel_n = S.undo_u_n = 0;
}
static const int* undo_sel_of(const RunState& S, const UndoRecord& rec) { return S.undo_sel + rec.sel_off; }  // (nS,B)
static const float* undo_u_of(const RunState& S, const UndoRecord& rec) { return S.undo_u + rec.u_off; }     // (nS,B,2C)
// log layer l's firing after segment [s,e) before it overwrites: sel (nS,B), u (nS,B,2C)
static void undo_push(RunState& S, int l, int s, int e, int nS, const int* sel, const float* u, int C) {
    long n_sel = (long)nS * S.B, n_u = n_sel * 2 * C;
    if (S.undo_sel_n + n_sel > S.undo_sel_cap || S.undo_u_n + n_u > S.undo_u_cap)
        INTERNAL("the undo log is full (entries %ld + %ld of %ld, positions %ld + %ld of %ld)", S.undo_u_n, n_u,
                 S.undo_u_cap, S.undo_sel_n, n_sel, S.undo_sel_cap);
    S.undo.push_back({l, s, e, nS, S.undo_sel_n, S.undo_u_n});
    OP(copy_ints(S.undo_sel + S.undo_sel_n, sel, n_sel));
    OP(copy_floats(S.undo_u + S.undo_u_n, u, n_u));
    S.undo_sel_n += n_sel;
    S.undo_u_n += n_u;
}

// the inverse of gather, a copy: K[sel[n,b], b, :] = u[n,b,:C], V[sel[n,b], b, :] = u[n,b,C:]
// K,V (T,B,C), u (nS,B,2C), sel (nS,B)
static void scatter_rows(float* K, float* V, const float* u, const int* sel, int nS, int B, int C) {
    for (long r = 0; r < (long)nS * B; r++) {
        long dst = ((long)sel[r] * B + r % B) * C;
        memcpy(K + dst, u + r * 2 * C, sizeof(float) * C);
        memcpy(V + dst, u + r * 2 * C + C, sizeof(float) * C);
    }
}

// Put the pre-rewrite values of one record back into the cache (bitwise exact).
static void undo_restore(RunState& S, const UndoRecord& rec, int C) {
    BlockActs& a = S.acts[rec.layer];
    OP(scatter_rows(a.k, a.v, undo_u_of(S, rec), undo_sel_of(S, rec), rec.nS, S.B, C));
}

// THE BOTTLENECK STEP: fire the processor of every layer at the boundary after segment [s,e).
static void bottleneck_step(const Model& M, RunState& S, int s, int e) {
    const Config& c = M.cfg;
    ProcActs& p = S.pa;
    int B = S.B;
    for (int l = 0; l < c.L; l++) {
        BlockActs& a = S.acts[l];
        int nS = OP(select_forward(p.sel, p.scores, a.att, s, e, B, c.NH, S.T, c.k, c.periodic));  // 1. select
        OP(gather_forward(p.u, a.k, a.v, p.sel, nS, B, c.C));                                       // 2. gather
        undo_push(S, l, s, e, nS, p.sel, p.u, c.C);
        transform_forward(p, M.w.proc[l], S.wt ? &S.wt->proc[l] : nullptr, c, nS, B);               // 3. transform
        OP(write_back_forward(a.k, a.v, p.delta, M.w.proc[l].gate, p.sel, nS, B, c.C));             // 4. write back
    }
}

// The backward of one layer's firing. On entry dK, dV hold d(post); on exit d(pre), the cache is
// restored to its pre-rewrite state, and the processor's weight gradients are accumulated.
static void bottleneck_step_backward_layer(Model& M, RunState& S, const UndoRecord& rec) {
    const Config& c = M.cfg;
    ProcActs& p = S.pa;
    int B = S.B, l = rec.layer, nS = rec.nS;
    undo_restore(S, rec, c.C);
    // recompute this firing's activations from the logged inputs (cheaper than storing them all)
    OP(copy_ints(p.sel, undo_sel_of(S, rec), (long)nS * B));
    OP(copy_floats(p.u, undo_u_of(S, rec), (long)nS * B * 2 * c.C));
    transform_forward(p, M.w.proc[l], nullptr, c, nS, B);
    OP(write_back_backward(p.ddelta, M.g.proc[l].gate, S.dK[l], S.dV[l], p.delta, M.w.proc[l].gate, p.sel, nS, B,
                           c.C));
    OP(zero(p.du, (long)nS * B * 2 * c.C));
    transform_backward(p.du, M.g.proc[l], S, M.w.proc[l], c, nS, B);
    OP(gather_backward(S.dK[l], S.dV[l], p.du, p.sel, nS, B, c.C));
}

// =============================================================================================
// Training through time
//
// forward_sequence walks the segments: backbone on segment j over the current cache, then the
// bottleneck step at the boundary. backward_sequence walks back: segment j's backward adds to the
// cache gradients of every entry it read; at boundary j the undo log restores the cache and the
// processor's backward turns d(post) into d(pre). bptt step clears the cache gradients once the
// walk has passed a boundary (the paper's truncation).
// =============================================================================================
struct TrainMode {
    bool use_proc = false;      // fire the processor at boundaries
    bool segmented = false;     // walk segments even without a processor (tests: must equal one pass)
    bool train_backbone = true; // backbone weights get gradients
    bool bptt_step = false;     // truncate at every boundary
    bool pause_row_only = false; // pause-frozen: only the PAUSE row of tok_emb learns
};

// Is position t (holding token tok) a boundary, where the processor fires before tok is read?
// Newline schedule: every '\n' after the start. Periodic: every N positions. Training and
// decoding both ask here.
static bool is_boundary(const Config& c, int t, int tok) {
    return t > 0 && (c.periodic > 0 ? t % c.periodic == 0 : tok == NEWLINE);
}

// Segment starts for a batch into S.bounds: 0, every boundary (a latent model: every latent
// position), then T (the end). All sequences of a batch share their newline positions, so
// sequence 0 decides.
static const std::vector<int>& segment_bounds(const Config& c, RunState& S, int T) {
    std::vector<int>& b = S.bounds;
    b.clear();
    b.push_back(0);
    for (int t = 1; t < T; t++) {
        int tok = S.h_tokens[(long)t * S.B];
        if (c.latent > 0 ? tok == PAUSE : is_boundary(c, t, tok)) b.push_back(t);   // latent: before each latent position
    }
    b.push_back(T);
    return b;
}

// Loss weights: prediction t (of token t+1) counts iff t+1 lies after the question's newline and
// token t+1 is not PAD or PAUSE. weight = 1/count, so the summed loss is the batch mean.
static int set_targets(RunState& S, int T) {
    int B = S.B, count = 0;
    for (int b = 0; b < B; b++) {
        int q = -1;
        for (int t = 0; t < T; t++) {
            int nt = t + 1 < T ? S.h_tokens[(long)(t + 1) * B + b] : PAD;
            if (q < 0 && S.h_tokens[(long)t * B + b] == NEWLINE) q = t;
            bool ok = q >= 0 && t + 1 > q && nt != PAD && nt != PAUSE;
            S.h_targets[(long)t * B + b] = nt;
            S.h_weight[(long)t * B + b] = ok ? 1.0f : 0.0f;
            count += ok;
        }
    }
    for (long r = 0; r < (long)T * B; r++) S.h_weight[r] = count ? S.h_weight[r] / count : 0.0f;
    return count;
}

// the batch's tokens, targets and loss weights to where the ops read them (nothing on the CPU)
static void upload_batch(RunState& S, int T) {
    long n = (long)T * S.B;
    to_device(S.tokens, S.h_tokens, sizeof(int) * n);
    to_device(S.targets, S.h_targets, sizeof(int) * n);
    to_device(S.weight, S.h_weight, sizeof(float) * n);
}

// a model and a run state must live where the ops run (a test that forgets gets an error, not a crash)
static void check_placement(const Model& M, const RunState& S) {
    if ((M.dev_params != nullptr) != g_device || S.dev != g_device)
        INTERNAL("the model (%s) or the run state (%s) is not where the ops run (%s)", M.dev_params ? "cuda" : "cpu",
                 S.dev ? "cuda" : "cpu", g_device ? "cuda" : "cpu");
}

// Forward over the whole batch (tokens already in S.tokens, T positions). Returns the mean loss.
// after_boundary(j), if given, runs right after the rewrite that follows segment j (tests).
static float forward_sequence(const Model& M, RunState& S, int T, const TrainMode& mode,
                              void (*after_boundary)(const RunState&, int, void*) = nullptr, void* ctx = nullptr) {
    check_placement(M, S);
    set_targets(S, T);
    upload_batch(S, T);
    undo_clear(S);
    if (!mode.use_proc && !mode.segmented && M.cfg.latent == 0) {   // the segment loop is one causal pass
        backbone_forward(M, S, 0, T);
    } else {
        const std::vector<int>& b = segment_bounds(M.cfg, S, T);
        for (size_t j = 0; j + 1 < b.size(); j++) {
            backbone_forward(M, S, b[j], b[j + 1]);
            if (mode.use_proc && j + 2 < b.size()) {
                bottleneck_step(M, S, b[j], b[j + 1]);
                if (after_boundary) after_boundary(S, (int)j, ctx);
            }
        }
    }
    double loss = 0.0;
    to_host(S.h_losses, S.losses, sizeof(float) * T * S.B);
    for (long r = 0; r < (long)T * S.B; r++) loss += (double)S.h_losses[r] * S.h_weight[r];
    S.n_tok = T;
    return (float)loss;
}

// Backward through time; gradients accumulate into M.grads (the caller zeroes them).
static void backward_sequence(Model& M, RunState& S, int T, const TrainMode& mode) {
    const Config& c = M.cfg;
    long n = (long)T * S.B * c.C;   // the cache gradients' rows in use
    for (int l = 0; l < c.L; l++) { OP(zero(S.dK[l], n)); OP(zero(S.dV[l], n)); }
    if (!mode.use_proc && !mode.segmented && c.latent == 0) { backbone_backward(M, S, 0, T, mode.train_backbone); return; }
    const std::vector<int>& b = segment_bounds(c, S, T);
    int nseg = (int)b.size() - 1;
    int r = (int)S.undo.size();   // undo records are consumed from the end
    for (int j = nseg - 1; j >= 0; j--) {
        if (mode.use_proc && j < nseg - 1) {   // undo the rewrite that followed segment j
            for (int l = c.L - 1; l >= 0; l--) bottleneck_step_backward_layer(M, S, S.undo[--r]);
            if (mode.bptt_step)
                for (int l = 0; l < c.L; l++) { OP(zero(S.dK[l], n)); OP(zero(S.dV[l], n)); }
        }
        // a frozen backbone's first segment only feeds earlier rewrites: there are none
        if (mode.use_proc && !mode.train_backbone && j == 0) break;
        backbone_backward(M, S, b[j], b[j + 1], mode.train_backbone);
    }
    // every undo record has been consumed: the cache is again exactly what segment 0 wrote
}

// =============================================================================================
// Optimizer: AdamW with linear warmup then cosine decay to lr/10, and global-norm clipping
// (torch.nn.utils.clip_grad_norm_ semantics). Only the trainable tensors are touched.
// =============================================================================================
struct OptConfig {
    float lr = 3e-3f, wd = 0.1f, b1 = 0.9f, b2 = 0.95f, eps = 1e-8f, clip = 1.0f;   // the CLI defaults
    int warmup = 100, steps = 1000;
};

static float lr_at(const OptConfig& o, int t) {   // t: 0-based step
    if (t < o.warmup) return o.lr * (t + 1) / o.warmup;
    float lr_min = 0.1f * o.lr;
    double progress = (double)(t - o.warmup) / std::max(1, o.steps - o.warmup);
    return lr_min + 0.5f * (o.lr - lr_min) * (float)(1.0 + cos(M_PI * progress));
}

// The part of tensor p that learns, as [off, off + n) of the flat parameters; false if none does.
static bool trainable_span(const Model& M, const ParamInfo& p, const TrainMode& mode, long* off, long* n) {
    *off = p.offset; *n = p.numel;
    if (mode.pause_row_only) {   // pause-frozen: the PAUSE embedding row alone
        *off = p.offset + (long)PAUSE * M.cfg.C; *n = M.cfg.C;
        return p.name == "tok_emb";
    }
    return p.proc || mode.train_backbone;
}

// acc + sum_i x[i]^2 in double (the gradient norm). x (n). Eight running sums, x[i] into sum
// i mod 8, each in index order, added as dot8 adds its sums, then the last n mod 8 in order. One
// running sum waited on its last add at every element (1 ms a step, on one core, while the other
// idled); eight are one AVX-512 register, or two AVX2 ones. (A float's square is exact in double,
// so an fma would give the same bits.) The 8 sums are a GCC vector of 8 doubles, lane by lane
// IEEE arithmetic on any target; a plain array of 8 was left scalar by g++.
static double sum_squares(double acc, const float* x, long n) {
    typedef float float8 __attribute__((vector_size(32)));
    typedef double double8 __attribute__((vector_size(64)));
    double8 s = {};
    long i = 0;
    for (; i + 8 <= n; i += 8) {
        float8 v;
        memcpy(&v, x + i, sizeof v);
        double8 d = __builtin_convertvector(v, double8);
        s += d * d;
    }
    acc += ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7]));
    for (; i < n; i++) acc += (double)x[i] * x[i];
    return acc;
}
// x[i] *= a  (gradient clipping). x (n)
static void scale_inplace(float* x, float a, long n) {
    for (long i = 0; i < n; i++) x[i] *= a;
}

// a flat buffer where the ops read it: the host vector, or its device copy under --device cuda
static float* live(std::vector<float>& host, float* dev) { return dev ? dev : host.data(); }

// Returns the gradient norm before clipping.
static float optimizer_step(Model& M, const OptConfig& o, int t, const TrainMode& mode) {
    float *P = live(M.params, M.dev_params), *G = live(M.grads, M.dev_grads);
    float *Mo = live(M.m, M.dev_m), *Vo = live(M.v, M.dev_v);
    double ss = 0.0;
    long off, n;
    for (auto& p : M.table)
        if (trainable_span(M, p, mode, &off, &n)) ss = OP(sum_squares(ss, G + off, n));
    float norm = (float)sqrt(ss);
    float coef = o.clip / (norm + 1e-6f);
    if (coef < 1.0f)
        for (auto& p : M.table)
            if (trainable_span(M, p, mode, &off, &n)) OP(scale_inplace(G + off, coef, n));
    M.adam_t++;
    float lr = lr_at(o, t);
    for (auto& p : M.table)
        if (trainable_span(M, p, mode, &off, &n))
            OP(adamw_update(P + off, Mo + off, Vo + off, G + off, n, lr, o.b1, o.b2, o.eps, p.decay ? o.wd : 0.0f,
                            M.adam_t));
    return norm;
}

// every gradient to 0, before a step's backward
static void zero_grads(Model& M) { OP(zero(live(M.grads, M.dev_grads), M.n_params)); }

// =============================================================================================
// Tasks and data (tasks.hpp: the generators, the held-out split, example files). Here: batches,
// and the training stream that draws them.
// =============================================================================================
#include "tasks.hpp"

// ---- batches: B examples with the same layout, time-major into S.tokens, PAD after the end
// Returns T. All sequences must have their newlines at the same positions.
static int load_batch(RunState& S, const std::vector<std::string>& texts) {
    int B = (int)texts.size(), T = 0;
    std::vector<std::vector<int>> toks(B);
    for (int b = 0; b < B; b++) {
        toks[b] = tokenize(texts[b], "example");
        T = std::max(T, (int)toks[b].size());
    }
    if (T > S.T) BAD_INPUT("a sequence of %d tokens is longer than the model's context (max %d)", T, S.T);
    for (int b = 0; b < B; b++)
        for (int t = 0; t < T; t++) {
            int tk = t < (int)toks[b].size() ? toks[b][t] : PAD;
            S.h_tokens[(long)t * B + b] = tk;
            if (b > 0 && (tk == NEWLINE) != (S.h_tokens[(long)t * B] == NEWLINE))
                INTERNAL("batch examples 0 and %d have their newlines at different positions (%d)", b, t);
        }
    return T;
}

// The training data stream: one size per batch (so newlines line up), drawn from rng.
struct DataStream {
    Task task = TASK_CHAIN;
    int lo = 0, hi = 0;
    std::vector<Example> file;                      // TASK_FILE
    std::map<std::string, std::vector<int>> by_layout;  // file examples grouped by newline layout
    int pause = 0;                                  // PAUSE positions after every newline (pause and latent models)
    Rng rng{1};
};

static std::string layout_key(const std::string& text) {
    std::string k;
    for (size_t i = 0; i < text.size(); i++)
        if (text[i] == '\n') k += std::to_string(i) + ",";
    // only newline positions go into the key, so the answer line (after the last newline) may
    // differ in length within a group
    return k;
}

static std::vector<std::string> next_batch(DataStream& D, int B) {
    std::vector<std::string> out;
    if (D.task == TASK_FILE) {
        const Example& first = D.file[D.rng.next() % D.file.size()];
        const std::vector<int>& same = D.by_layout[layout_key(first.text)];
        for (int b = 0; b < B; b++) out.push_back(insert_pauses(D.file[same[D.rng.next() % same.size()]].text, D.pause));
        return out;
    }
    int size = D.rng.randint(D.lo, D.hi);
    for (int b = 0; b < B; b++) out.push_back(insert_pauses(gen_example(D.task, D.rng, size, false), D.pause));
    return out;
}

// longest token count the stream can produce (sizes the run state)
static int max_tokens(const DataStream& D) {
    int T = 0;
    if (D.task == TASK_FILE) {
        for (auto& e : D.file) T = std::max(T, (int)insert_pauses(e.text, D.pause).size() + 1);
        return T;
    }
    Rng r(7);
    for (int s = D.lo; s <= D.hi; s++)
        for (int i = 0; i < 4; i++)
            T = std::max(T, (int)insert_pauses(gen_example(D.task, r, s, false), D.pause).size() + 1);
    return T + 2;   // add's final carry digit may not show up in 4 draws
}

// =============================================================================================
// Decoding: feed tokens into a B=1 run state, firing the processor before every boundary token
// exactly as training does (so decoding and scoring see the same caches).
// =============================================================================================

// What one bottleneck step did, read from the cache and the undo log right after it (--trace,
// --trace-html, the lab's recall picture; rewrite_record below). Nothing here feeds the model.
struct RewriteLayer {
    float gate;                 // sigmoid(g): the share of delta written back
    int n_recalled;             // the first n_recalled of sel are older entries (top-k), the rest s..e-1
    std::vector<int> sel;       // (nS) the positions rewritten, as select_forward chose them
    std::vector<float> score;   // (s) selection score of every older position p < s (empty: periodic)
    std::vector<float> dk, dv;  // (nS) ||post - pre|| of each rewritten entry's K and V
    std::vector<float> k, v;    // (nS) ||pre||
};
struct Rewrite {
    int s, e;                           // the segment [s,e) that just ended
    std::vector<RewriteLayer> layers;   // L
};

struct Decoder {
    const Model* M;
    RunState S;         // B = 1, T = max_seq_len, no gradients. Row t of the cache is "slot" t
    int seg_start = 0;  // first slot of the current segment (line)
    bool use_proc = false;
    FILE* trace = nullptr;           // --trace: each rewrite printed here (print_trace)
    bool keep_rewrites = false;      // --trace-html, the lab's pictures: each rewrite kept below
    std::vector<Rewrite> rewrites;   // one per boundary, in order (decoder_reset clears it)
    // H2O-style eviction (the evict baseline, a vanilla model only): at each newline keep the
    // `evict` older slots with the most cumulative attention, plus the line just written
    int evict = 0;               // budget B; 0: no eviction
    int next_pos = 0;            // position of the next token (slots and positions part when evicting)
    std::vector<float> score;    // (T) attention each slot has received, summed over layers, heads, queries
    std::vector<int> keep;       // (T) scratch for the slots kept
    // the model's matrices transposed once (S.wt points here), so that a one-row matmul does not
    // transpose its weight every token; the model must not change while the decoder lives
    std::vector<float> wt_mem;   // (n_params)
    Weights wt;
};

// wt_mem's copy of every tensor p of M for which pick(p), at p's own offset: a matrix (rows, cols)
// stored as (cols, rows), anything else as it is. The threads take whole tensors.
template <class Pick> static void transpose_into(const Model& M, std::vector<float>& wt_mem, Pick pick) {
    parallel_for((long)M.table.size(), M.n_params, [&](long i0, long i1) {
        for (long i = i0; i < i1; i++) {
            const ParamInfo& p = M.table[i];
            if (!pick(p)) continue;
            const float* src = M.params.data() + p.offset;
            float* dst = wt_mem.data() + p.offset;
            if (p.shape.size() == 2) transpose(dst, src, p.shape[0], p.shape[1]);
            else copy_floats(dst, src, p.numel);
        }
    });
}
// wt = every tensor of M transposed into wt_mem (n_params)
static void transpose_weights(const Model& M, std::vector<float>& wt_mem, Weights& wt) {
    wt_mem.assign(M.n_params, 0.0f);
    transpose_into(M, wt_mem, [](const ParamInfo&) { return true; });
    layout_params(M.cfg, &wt, wt_mem.data(), nullptr);
}

static void decoder_init(Decoder& D, const Model& M, int evict = 0) {
    D.M = &M;
    run_state_build(D.S, M.cfg, M.cfg.T, 1, false);
    D.use_proc = M.cfg.proc_width > 0;
    if (evict > 0 && (D.use_proc || M.cfg.latent || M.cfg.pause))
        BAD_INPUT("eviction is a baseline for a vanilla model; this one has a processor, pause or latent positions");
    if (evict > 0 && g_device) BAD_INPUT("--evict runs on the CPU only: drop --device cuda");
    D.evict = evict;
    if (!g_device) {   // the device's matmuls read W itself
        transpose_weights(M, D.wt_mem, D.wt);
        D.S.wt = &D.wt;
    }
    D.score.assign(M.cfg.T, 0.0f);
    D.keep.assign(M.cfg.T, 0);
}
static void decoder_reset(Decoder& D) {
    D.S.n_tok = 0; D.seg_start = 0; D.next_pos = 0;
    undo_clear(D.S);
    std::fill(D.score.begin(), D.score.end(), 0.0f);
    D.rewrites.clear();
}

// the backbone on slots [s,e); with eviction on, add the attention they paid to every slot
static void decoder_forward(Decoder& D, int s, int e) {
    const Config& c = D.M->cfg;
    to_device(D.S.tokens + s, D.S.h_tokens + s, sizeof(int) * (e - s));   // B = 1: slot t is row t
    to_device(D.S.pos + s, D.S.h_pos + s, sizeof(int) * (e - s));
    backbone_forward(*D.M, D.S, s, e);
    if (!D.evict) return;
    for (int l = 0; l < c.L; l++)
        for (int p = 0; p < e; p++) D.score[p] += attention_mass(D.S.acts[l].att, s, e, 0, p, 1, c.NH, D.S.T) * (e - s);
}

// Eviction at a newline: slots [0, seg_start) compete, the `evict` with the most cumulative
// attention stay (ties to the earlier slot), the current line [seg_start, n_tok) stays; the cache
// (K and V of every layer), tokens, positions and scores are compacted in order. Keys already
// carry their rotation, so a kept entry keeps its position.
static void evict_step(Decoder& D) {
    RunState& S = D.S;
    const Config& c = D.M->cfg;
    int old = D.seg_start;
    if (old <= D.evict) return;
    int n = 0;
    for (int p = 0; p < old; p++) {   // rank of p among the older slots: how many beat it
        int beat = 0;
        for (int q = 0; q < old; q++) beat += D.score[q] > D.score[p] || (D.score[q] == D.score[p] && q < p);
        if (beat < D.evict) D.keep[n++] = p;
    }
    for (int p = old; p < S.n_tok; p++) D.keep[n++] = p;
    for (int i = 0; i < n; i++) {   // keep[] ascends, so each move goes to a slot at or before its source
        int from = D.keep[i];
        for (int l = 0; l < c.L; l++) {
            memmove(S.acts[l].k + (long)i * c.C, S.acts[l].k + (long)from * c.C, sizeof(float) * c.C);
            memmove(S.acts[l].v + (long)i * c.C, S.acts[l].v + (long)from * c.C, sizeof(float) * c.C);
        }
        S.tokens[i] = S.tokens[from]; S.pos[i] = S.pos[from]; D.score[i] = D.score[from];
    }
    for (int i = n; i < S.n_tok; i++) D.score[i] = 0.0f;
    S.n_tok = n;
}

static void trace_rewrite(Decoder& D, int s, int e);


// Append n tokens. Runs the backbone chunk by chunk; before a boundary token it fires the
// bottleneck step on the segment that just ended.
static void decoder_feed(Decoder& D, const int* toks, int n) {
    RunState& S = D.S;
    const Config& c = D.M->cfg;
    if (S.n_tok + n > S.T) BAD_INPUT("the sequence would exceed the model's context of %d tokens", S.T);
    int chunk = S.n_tok;
    for (int i = 0; i < n; i++) {
        int t = S.n_tok;
        if (D.use_proc && is_boundary(c, t, toks[i]) && t > D.seg_start) {
            if (t > chunk) decoder_forward(D, chunk, t);
            bottleneck_step(*D.M, S, D.seg_start, t);
            if (D.trace || D.keep_rewrites) trace_rewrite(D, D.seg_start, t);
            D.seg_start = chunk = t;
        }
        if (c.latent > 0 && toks[i] == PAUSE && t > chunk) {   // a latent position opens its own chunk
            decoder_forward(D, chunk, t);
            chunk = t;
        }
        if (D.evict && toks[i] == NEWLINE && t > D.seg_start) {
            if (D.seg_start > D.evict) {   // more older entries than the budget: evict
                if (t > chunk) decoder_forward(D, chunk, t);
                evict_step(D);
                chunk = t = S.n_tok;
            }
            D.seg_start = t;
        }
        S.h_tokens[t] = toks[i];
        S.h_pos[t] = D.next_pos++;
        S.n_tok++;
    }
    if (S.n_tok > chunk) decoder_forward(D, chunk, S.n_tok);
}

// the greedy choice from one row of logits z (V); PAD, BOS and PAUSE are never emitted
static int greedy_token(const float* z, int V) {
    int best = NEWLINE;
    for (int i = NEWLINE; i < V; i++)
        if (z[i] > z[best]) best = i;
    return best;
}
// greedy choice at the last position
static int decoder_argmax(const Decoder& D) {
    long row = (long)(D.S.n_tok - 1) * D.M->cfg.V;
    to_host(D.S.h_logits + row, D.S.logits + row, sizeof(float) * D.M->cfg.V);
    return greedy_token(D.S.h_logits + row, D.M->cfg.V);
}

// Greedy continuation of prompt (text, no BOS) until '$' or the context is full. A pause or
// latent model is fed its PAUSE positions after every newline (prompt and output); nothing is
// emitted there.
static std::string generate(Decoder& D, const std::string& prompt) {
    static const std::vector<int> pauses(64, PAUSE);   // P <= 64 (CONFIG_KEYS)
    int P = inserted_after_newline(D.M->cfg);
    decoder_reset(D);
    std::vector<int> toks = tokenize(insert_pauses(prompt, P), "prompt");
    decoder_feed(D, toks.data(), (int)toks.size());
    std::string out;
    // stop when the context is full: in positions, not slots (eviction frees slots but positions
    // only grow, so a model that never writes '$' would otherwise decode for ever)
    while (D.S.n_tok < D.S.T && D.next_pos < D.S.T) {
        int t = decoder_argmax(D);
        out += token_to_char(t);
        if (out.back() == '$') break;
        decoder_feed(D, &t, 1);
        if (t == NEWLINE && P > 0 && D.S.n_tok + P <= D.S.T) decoder_feed(D, pauses.data(), P);
    }
    return out;
}

// the record of the step that just fired after segment [s,e) (the last L undo records)
static Rewrite rewrite_record(const Decoder& D, int s, int e) {
    const RunState& S = D.S;
    const Config& c = D.M->cfg;
    Rewrite r{s, e, std::vector<RewriteLayer>(c.L)};
    int first = (int)S.undo.size() - c.L;   // this boundary's records, one per layer
    for (int l = 0; l < c.L; l++) {
        const UndoRecord& rec = S.undo[first + l];
        const int* sel = undo_sel_of(S, rec);
        const float* u = undo_u_of(S, rec);   // (nS, 2C) [K | V] before the rewrite
        const BlockActs& a = S.acts[l];
        RewriteLayer& w = r.layers[l];
        w.gate = sigmoidf(D.M->w.proc[l].gate[0]);
        w.n_recalled = c.periodic ? 0 : rec.nS - (e - s);
        w.sel.assign(sel, sel + rec.nS);
        // score(p) = mean over heads and the segment's queries of att[t,h,p], as select_forward
        // computed it (recomputed: select_forward marks its picks -inf)
        if (!c.periodic)
            for (int p = 0; p < s; p++) w.score.push_back(attention_mass(a.att, s, e, 0, p, 1, c.NH, S.T));
        // per entry n: ||K_post - K_pre||, ||K_pre|| (and V's)
        for (int n = 0; n < rec.nS; n++) {
            double dk = 0, nk = 0, dv = 0, nv = 0;
            for (int i = 0; i < c.C; i++) {
                float pk = u[(long)n * 2 * c.C + i], pv = u[(long)n * 2 * c.C + c.C + i];
                float qk = a.k[(long)sel[n] * c.C + i], qv = a.v[(long)sel[n] * c.C + i];
                dk += (qk - pk) * (qk - pk); nk += pk * pk; dv += (qv - pv) * (qv - pv); nv += pv * pv;
            }
            w.dk.push_back((float)sqrt(dk)); w.k.push_back((float)sqrt(nk));
            w.dv.push_back((float)sqrt(dv)); w.v.push_back((float)sqrt(nv));
        }
    }
    return r;
}

// --trace: one rewrite, layer by layer: the gate, ||dK||/||K|| and ||dV||/||V|| over the entries
// rewritten, and the recalled positions with their tokens and scores
static void print_trace(FILE* f, const Decoder& D, const Rewrite& r) {
    const RunState& S = D.S;
    std::string span;
    for (int t = r.s; t < r.e; t++) span += token_str(S.tokens[t]);
    fprintf(f, "[bottleneck] after positions %d..%d \"%s\"\n", r.s, r.e - 1, span.c_str());
    for (size_t l = 0; l < r.layers.size(); l++) {
        const RewriteLayer& w = r.layers[l];
        double dk = 0, nk = 0, dv = 0, nv = 0;
        for (size_t n = 0; n < w.sel.size(); n++) {
            dk += (double)w.dk[n] * w.dk[n]; nk += (double)w.k[n] * w.k[n];
            dv += (double)w.dv[n] * w.dv[n]; nv += (double)w.v[n] * w.v[n];
        }
        fprintf(f, "  layer %zu gate %.3f |dK|/|K| %.4f |dV|/|V| %.4f recalled:", l, w.gate, sqrt(dk / (nk + 1e-30)),
                sqrt(dv / (nv + 1e-30)));
        for (int n = 0; n < w.n_recalled; n++)
            fprintf(f, " %d'%s'(%.3f)", w.sel[n], token_str(S.tokens[w.sel[n]]).c_str(), w.score[w.sel[n]]);
        fprintf(f, "%s\n", D.M->cfg.periodic ? " (periodic: the whole cache)" : "");
    }
}

// after the bottleneck step on [s,e): print it (--trace) and/or keep it (keep_rewrites)
static void trace_rewrite(Decoder& D, int s, int e) {
    Rewrite r = rewrite_record(D, s, e);
    if (D.trace) print_trace(D.trace, D, r);
    if (D.keep_rewrites) D.rewrites.push_back(std::move(r));
}

// =============================================================================================
// The batched decoder (decode_batched.hpp): B sequences in one run state, lock-step by position,
// the same bits per sequence as a Decoder; and generate_batched / generate_each, which spread
// evaluation's examples over the threads (one Decoder per thread for eviction and the device).
// =============================================================================================
#include "decode_batched.hpp"

// =============================================================================================
// Evaluation: greedy decoding from "question\n", compared line by line with the reference.
// =============================================================================================
struct EvalResult {
    int n = 0, answer_ok = 0, lines_ok = 0;
    double first_wrong_sum = 0;   // over examples with a wrong line: the 1-based index of the first
    int first_wrong_n = 0;
    std::vector<std::string> mistakes;
};

static std::vector<std::string> split_lines(const std::string& s) {
    std::vector<std::string> out;
    std::stringstream ss(s);
    std::string l;
    while (std::getline(ss, l, '\n')) out.push_back(l);
    return out;
}

// score one generated completion against the reference text (both without the question line)
static void eval_one(EvalResult& R, const std::string& want, const std::string& got) {
    R.n++;
    auto w = split_lines(want), g = split_lines(got);
    std::string wa = w.back(), ga = g.empty() ? "" : g.back();
    R.answer_ok += (wa == ga);
    if (got == want) { R.lines_ok++; return; }
    for (size_t i = 0; i < w.size(); i++) {
        std::string gi = i < g.size() ? g[i] : "(nothing)";
        if (gi != w[i]) {
            R.first_wrong_sum += i + 1;
            R.first_wrong_n++;
            if (R.mistakes.size() < 3)
                R.mistakes.push_back(strf("model wrote %s on line %d, want %s", gi.c_str(), (int)i + 1, w[i].c_str()));
            break;
        }
    }
}

// Evaluate on examples (text with the full reference): batched, except for eviction and the
// device. keep: batched decoders to reuse (and leave built) across calls, or nullptr.
static EvalResult evaluate(const Model& M, const std::vector<std::string>& texts, int evict = 0,
                           EvalDecoders* keep = nullptr) {
    int n = (int)texts.size();
    std::vector<std::string> outs(n);
    if (evict || g_device) generate_each(outs, M, texts, evict);
    else generate_batched(outs, M, texts, keep);
    EvalResult R;
    for (int i = 0; i < n; i++) eval_one(R, texts[i].substr(texts[i].find('\n') + 1), outs[i]);
    return R;
}

// =============================================================================================
// Checkpoints: safetensors. 8-byte little-endian header length N, N bytes of JSON
//   {"__metadata__": {"d_model": "128", ...}, "tok_emb": {"dtype": "F32", "shape": [48,128],
//    "data_offsets": [0, 24576]}, ...}
// then the raw data. bt writes float32 only and validates everything before trusting a file
// (io.hpp: read_safetensors, write_safetensors). Here: which tensors and metadata a checkpoint holds.
// =============================================================================================

// ---- model config <-> metadata, through CONFIG_KEYS (next to Config)
static std::map<std::string, std::string> config_meta(const Config& c) {
    std::map<std::string, std::string> m = {{"format", "bt"}, {"rope_theta", strf("%g", c.theta)},
                                            {"norm_eps", strf("%g", c.eps)}};
    for (auto& k : CONFIG_KEYS)
        if (key_present(k, c)) m[k.key] = std::to_string(c.*k.field);
    if (c.proc_width > 0) m["schedule"] = c.periodic ? strf("periodic:%d", c.periodic) : "newline";
    return m;
}

static int parse_schedule(const std::string& s) {   // 0 for newline, N for periodic:N
    if (s == "newline") return 0;
    if (s.rfind("periodic:", 0) == 0) {
        char* end;
        long n = strtol(s.c_str() + 9, &end, 10);
        if (*end == 0 && n > 0 && n < 100000) return (int)n;
    }
    BAD_INPUT("bad schedule '%s' (expected newline or periodic:N with N > 0)", s.c_str());
}

static Config config_from_meta(const std::map<std::string, std::string>& m, const std::string& path) {
    auto num = [&](const char* k, double lo, double hi) -> double {
        auto it = m.find(k);
        if (it == m.end()) BAD_INPUT("%s: metadata has no '%s': not a bt checkpoint?", path.c_str(), k);
        char* end;
        double v = strtod(it->second.c_str(), &end);
        if (*end != 0 || it->second.empty() || !(v >= lo && v <= hi))
            BAD_INPUT("%s: metadata '%s' = '%s' is not a number in [%g, %g]", path.c_str(), k, it->second.c_str(), lo, hi);
        return v;
    };
    Config c;
    bool proc = m.count("proc_width") > 0;
    for (auto& k : CONFIG_KEYS)
        if (k.kind == BACKBONE_KEY || (k.kind == PROC_KEY && proc) || (k.kind == OPTIONAL_KEY && m.count(k.key))) {
            double v = num(k.key, k.lo, k.hi);
            if (v != (int)v) BAD_INPUT("%s: metadata '%s' must be a whole number", path.c_str(), k.key);
            c.*k.field = (int)v;
        }
    c.theta = (float)num("rope_theta", 1, 1e9);
    c.eps = (float)num("norm_eps", 0, 1);
    if (!proc) c.proc_width = 0;
    else c.periodic = m.count("schedule") ? parse_schedule(m.at("schedule")) : 0;
    try { validate_config(c); } catch (BtError& e) { BAD_INPUT("%s: %s", path.c_str(), e.what()); }
    return c;
}

static void save_model(const Model& M, const std::string& path, std::map<std::string, std::string> extra = {},
                       bool commit = true) {
    std::vector<OutTensor> ts;
    for (auto& p : M.table) ts.push_back({p.name, p.shape, M.params.data() + p.offset});
    auto meta = config_meta(M.cfg);
    for (auto& kv : extra) meta[kv.first] = kv.second;
    write_safetensors(path, ts, meta, commit);
}

// Copy the tensors of f into M by name. Every backbone tensor must be there with the right shape;
// processor tensors must be there too unless allow_missing_proc (then they keep their init).
static void copy_tensors(Model& M, const SafeFile& f, const std::string& path, bool allow_missing_proc) {
    for (auto& p : M.table) {
        auto it = f.tensors.find(p.name);
        if (it == f.tensors.end()) {
            if (p.proc && allow_missing_proc) continue;
            BAD_INPUT("%s: tensor '%s' is missing", path.c_str(), p.name.c_str());
        }
        if (it->second.shape != p.shape) {
            std::string want, got;
            for (int d : p.shape) want += (want.empty() ? "" : ",") + std::to_string(d);
            for (int d : it->second.shape) got += (got.empty() ? "" : ",") + std::to_string(d);
            BAD_INPUT("%s: tensor '%s' has shape [%s] but the config needs [%s]", path.c_str(), p.name.c_str(),
                      got.c_str(), want.c_str());
        }
        std::copy(it->second.data.begin(), it->second.data.end(), M.params.begin() + p.offset);
    }
}

static void load_model(Model& M, const std::string& path) {
    SafeFile f = read_safetensors(path);
    model_build(M, config_from_meta(f.meta, path));
    copy_tensors(M, f, path, false);
    std::set<std::string> known;
    for (auto& p : M.table) known.insert(p.name);
    for (auto& kv : f.tensors)
        if (!known.count(kv.first))
            BAD_INPUT("%s: unexpected tensor '%s' (checkpoint from another config?)", path.c_str(), kv.first.c_str());
}

// =============================================================================================
// Command line
// =============================================================================================
static const FlagSpec CORE_FLAGS[] = {
    {"task", "chain", "chain | add | var | mul: the synthetic task"},
    {"data", "", "train or evaluate on a text file of examples separated by blank lines"},
    {"ckpt", "", "checkpoint to read (.safetensors)"},
    {"out", "bt.safetensors", "checkpoint to write"},
    {"init", "", "start from this backbone checkpoint"},
    {"model", "vanilla", "vanilla | bt (backbone + Cache Processor) | pause | pause-frozen (PAUSE tokens after newlines) | "
                         "latent (latent positions after newlines, fed the model's own state)"},
    {"pause", "4", "PAUSE tokens after every newline (--model pause, pause-frozen)"},
    {"latent", "4", "latent positions after every newline (--model latent)"},
    {"steps", "1000", "training steps"},
    {"batch", "32", "sequences per batch"},
    {"lr", "0.003", "peak learning rate (AdamW)"},
    {"warmup", "100", "linear warmup steps (at most a tenth of --steps unless given), then cosine to lr/10"},
    {"wd", "0.1", "AdamW weight decay (matrices only)"},
    {"clip", "1.0", "gradient clipping: max global norm"},
    {"seed", "1", "random seed (train: init and data; eval: the evaluation sets)"},
    {"d-model", "128", "backbone width"},
    {"layers", "4", "backbone layers"},
    {"heads", "4", "attention heads"},
    {"ffn", "0", "SwiGLU hidden width (0: 3 x d-model)"},
    {"max-seq-len", "256", "longest sequence the model accepts"},
    {"proc-width", "0", "processor width (0: d-model / 2)"},
    {"proc-layers", "1", "processor blocks per backbone layer"},
    {"proc-heads", "4", "processor attention heads"},
    {"proc-ffn", "0", "processor SwiGLU hidden width (0: 3 x proc-width)"},
    {"k", "4", "older cache entries reconsolidated per layer and boundary (0: consolidation only)"},
    {"schedule", "newline", "newline | periodic:N (rewrite the whole cache every N tokens)"},
    {"bptt", "full", "full (exact gradient through every rewrite) | step (truncate at each boundary)"},
    {"joint", "", "train backbone and processor together (from scratch without --init)", true},
    {"log-every", "50", "print a progress line every N steps"},
    {"save-every", "100", "also write the checkpoint (and its .state) every N steps (0: only at the end)"},
    {"resume", "", "continue the run saved in this checkpoint and its .state.safetensors exactly"},
    {"sizes", "", "problem sizes to evaluate, A..B (default: training and OOD ranges)"},
    {"n", "100", "evaluation examples per size"},
    {"prompt", "", "question to continue (a newline is added if missing)"},
    {"trace", "", "print what every bottleneck step selects and changes", true},
    {"trace-html", "", "write FILE: an HTML page stepping through every rewrite (needs the lab: make builds it)"},
    {"text-file", "", "examples to score"},
    {"evict", "0", "H2O-style eviction: at each newline keep this many older cache entries (0: off)"},
    {"device", "cpu", "cpu | cuda: where the ops run (cuda: kernels.cu on the GPU, from make USE_CUDA=1)"},
};

static std::string build_flags() {
    std::string s = "fp32";
#ifdef _OPENMP
    s += strf(", OpenMP (%d threads)", omp_get_max_threads());
#else
    s += ", no OpenMP";
#endif
    s += std::string(", ") + SIMD_NAME;
#ifdef BT_DEVICE
    s += g_device ? ", device cuda: " + device_name() : ", CUDA built in (--device cpu)";
#endif
    return s;
}

static std::string fmt_time(double s) {
    int t = (int)(s + 0.5);
    return t >= 60 ? strf("%dm%02ds", t / 60, t % 60) : strf("%ds", t);
}

// ---- bt train
// a model size from its flag, in CONFIG_KEYS's range; with a default, 0 means that default
static int size_flag(const Args& a, const char* flag, int dflt = 0) {
    const ConfigKey& k = config_key(flag);
    int v = a.integer(flag, dflt ? 0 : k.lo, k.hi);
    return v == 0 && dflt ? dflt : v;
}

// the model's config for bt train: from --init (its backbone, and its processor if it has one)
// or from the size flags; processor flags override, and need --model bt
static Config train_config(const Args& a, bool is_bt, bool is_pause, bool is_latent, SafeFile* init) {
    Config c;
    if (a.has("init")) {
        for (const char* f : {"d-model", "layers", "heads", "ffn", "max-seq-len"})
            if (a.has(f)) BAD_INPUT("--%s cannot change a model that comes from --init", f);
        *init = read_safetensors(a.str("init"));
        c = config_from_meta(init->meta, a.str("init"));
    } else {
        c.C = size_flag(a, "d-model"); c.L = size_flag(a, "layers"); c.NH = size_flag(a, "heads");
        c.F = size_flag(a, "ffn", 3 * c.C);
        c.T = size_flag(a, "max-seq-len");
    }
    if (is_pause) c.pause = size_flag(a, "pause");
    else if (a.has("pause")) BAD_INPUT("--pause needs --model pause or pause-frozen");
    if (is_latent) c.latent = size_flag(a, "latent");
    else if (a.has("latent")) BAD_INPUT("--latent needs --model latent");
    if (!is_bt) {
        for (const char* f : {"proc-width", "proc-layers", "proc-heads", "proc-ffn", "k", "schedule", "bptt", "joint"})
            if (a.has(f)) BAD_INPUT("--%s is a processor flag: it needs --model bt", f);
        c.proc_width = 0;
        return c;
    }
    bool keep = c.proc_width > 0;   // keep an --init processor's settings unless a flag says otherwise
    if (!keep || a.has("proc-width")) c.proc_width = size_flag(a, "proc-width", c.C / 2);
    if (!keep || a.has("proc-layers")) c.proc_layers = size_flag(a, "proc-layers");
    if (!keep || a.has("proc-heads")) c.proc_heads = size_flag(a, "proc-heads");
    if (!keep || a.has("proc-ffn")) c.proc_ffn = size_flag(a, "proc-ffn", 3 * c.proc_width);
    if (!keep || a.has("k")) c.k = size_flag(a, "k");
    if (!keep || a.has("schedule")) c.periodic = parse_schedule(a.str("schedule"));
    return c;
}

// the training stream: a task's generator over its training sizes, or a file's examples
static DataStream train_data(const Args& a, uint64_t seed) {
    DataStream D;
    D.rng = Rng(seed * 7919 + 17);
    if (a.has("data")) {
        D.task = TASK_FILE;
        D.file = read_examples(a.str("data"));
        for (size_t i = 0; i < D.file.size(); i++) D.by_layout[layout_key(D.file[i].text)].push_back((int)i);
    } else {
        D.task = parse_task(a.str("task"));
        D.lo = TASKS[D.task].train_lo; D.hi = TASKS[D.task].train_hi;
    }
    return D;
}

static void print_train_header(const Args& a, const Model& M, const TrainMode& mode, const OptConfig& o,
                               const DataStream& D, int B, int T, uint64_t seed) {
    const Config& c = M.cfg;
    long n_trainable = 0;
    long off, n;
    for (auto& p : M.table) n_trainable += trainable_span(M, p, mode, &off, &n) ? n : 0;
    printf("bt train | %s | %s\n", a.has("data") ? a.str("data").c_str() : a.str("task").c_str(), build_flags().c_str());
    printf("  model    %s: d_model %d, layers %d, heads %d, ffn %d, vocab %d, max_seq_len %d\n",
           a.str("model").c_str(), c.C, c.L, c.NH, c.F, c.V, c.T);
    if (c.pause)
        printf("  pause    %d PAUSE tokens after every newline; %s learns\n", c.pause,
               mode.pause_row_only ? "only the PAUSE embedding" : "the whole backbone");
    if (c.latent)
        printf("  latent   %d latent positions after every newline, each fed the state before it (one at a time)\n",
               c.latent);
    if (mode.use_proc)
        printf("  processor width %d, blocks %d, heads %d, ffn %d, k %d, schedule %s, bptt %s, backbone %s\n", c.proc_width,
               c.proc_layers, c.proc_heads, c.proc_ffn, c.k, c.periodic ? strf("periodic:%d", c.periodic).c_str() : "newline",
               mode.bptt_step ? "step" : "full", mode.train_backbone ? "trained" : "frozen");
    printf("  params   %ld (backbone %ld, processor %ld), trainable %ld\n", M.n_params, M.n_backbone,
           M.n_params - M.n_backbone, n_trainable);
    printf("  train    steps %d, batch %d, lr %g (warmup %d, cosine to lr/10), wd %g, clip %g, AdamW (0.9, 0.95)\n",
           o.steps, B, o.lr, o.warmup, o.wd, o.clip);
    std::string what = D.task == TASK_FILE ? strf("%zu examples", D.file.size()) : strf("sizes %d..%d", D.lo, D.hi);
    printf("  data     %s, up to %d tokens per sequence, seed %llu%s\n", what.c_str(), T, (unsigned long long)seed,
           a.has("init") ? (", init " + a.str("init")).c_str() : "");
    fflush(stdout);
}

// ---- a training run. Set up once (train_setup: fresh, or --resume), then stepped (train_steps).
// Every --save-every steps and at the end, save_run writes the checkpoint and beside it
// <out>.state.safetensors: the AdamW moments, the step, the data stream's position, the loss of
// every step and the flags of the run, so that --resume continues it as if it had never stopped.
struct TrainRun {
    Model M;
    TrainMode mode;
    OptConfig o;
    DataStream D;
    RunState S;
    std::vector<float> wt_mem;                 // (n_params) M's matrices transposed (S.wt points here), for
    Weights wt;                                //   the forward's matmuls; the trained ones after every step
    int B = 0, log_every = 50, save_every = 0;
    int step = 0;                              // steps completed
    std::vector<float> losses;                 // (step) the loss of every completed step
    std::string out;                           // the checkpoint's path
    std::string task;                          // task name or "file" (checkpoint metadata)
    bool quiet = false;                        // no header, no progress lines (bench, experiment)
    long tokens = 0;                           // tokens trained on in this session (padding included)
    std::map<std::string, std::string> flags;  // the flags given on the command line (for --resume)
};

static std::string state_path(const std::string& ckpt) { return ckpt + ".state.safetensors"; }

// the state and the checkpoint, each to a temporary file; then both renamed, state first
static void save_run(TrainRun& R) {
    model_download(R.M);   // --device cuda: the weights and moments back to the host first
    const Model& M = R.M;
    std::vector<OutTensor> ts;
    for (auto& p : M.table) {
        ts.push_back({"adam_m." + p.name, p.shape, M.m.data() + p.offset});
        ts.push_back({"adam_v." + p.name, p.shape, M.v.data() + p.offset});
    }
    ts.push_back({"loss_curve", {R.step}, R.losses.data()});
    std::map<std::string, std::string> meta = {{"format", "bt-train-state"}, {"step", std::to_string(R.step)},
                                               {"adam_t", std::to_string(M.adam_t)},
                                               {"data_rng", std::to_string(R.D.rng.s)}};
    for (auto& kv : R.flags) meta["flag." + kv.first] = kv.second;
    write_safetensors(state_path(R.out), ts, meta, false);
    save_model(M, R.out, {{"task", R.task}, {"step", std::to_string(R.step)}}, false);
    commit_file(state_path(R.out));   // both written before either replaces its old file: a kill
    commit_file(R.out);               //   leaves a pair that resumes, but between these two renames
}

static long meta_int(const SafeFile& f, const char* key, long lo, long hi, const std::string& path) {
    auto it = f.meta.find(key);
    char* end = nullptr;
    long v = it == f.meta.end() ? 0 : strtol(it->second.c_str(), &end, 10);
    if (it == f.meta.end() || it->second.empty() || *end != 0 || v < lo || v > hi)
        BAD_INPUT("%s: metadata '%s' is missing or out of range [%ld, %ld]", path.c_str(), key, lo, hi);
    return v;
}

// --resume CKPT: the flags of the original run come back from the state file; only these may be given again
static const char* RESUME_FLAGS[] = {"resume", "log-every", "save-every", "device"};

static Args resume_args(const Args& given, SafeFile* state) {
    for (auto& f : given.given) {
        bool ok = false;
        for (auto* r : RESUME_FLAGS) ok |= f == r;
        if (!ok) BAD_INPUT("--%s cannot be given with --resume: the run keeps its own flags", f.c_str());
    }
    std::string sp = state_path(given.str("resume"));
    if (!std::ifstream(sp))
        BAD_INPUT("%s: cannot open it: --resume needs the checkpoint and the state file bt train writes beside it",
                  sp.c_str());
    *state = read_safetensors(sp);
    if (!state->meta.count("format") || state->meta.at("format") != "bt-train-state")
        BAD_INPUT("%s: not a bt training-state file", sp.c_str());
    Args a = given;
    for (auto& kv : state->meta)
        if (kv.first.rfind("flag.", 0) == 0) {
            std::string name = kv.first.substr(5);
            if (!a.v.count(name)) BAD_INPUT("%s: unknown flag '%s' in the saved run", sp.c_str(), name.c_str());
            if (!given.has(name)) { a.v[name] = kv.second; a.given.insert(name); }
        }
    a.v["out"] = given.str("resume");   // the run goes on writing where it was
    return a;
}

// Overwrite a freshly set-up run with the saved one: weights, moments, step, data position, losses.
static void restore_run(TrainRun& R, const SafeFile& state, const std::string& ckpt) {
    std::string sp = state_path(ckpt), tmp = ckpt + ".tmp";
    SafeFile f = read_safetensors(ckpt);
    R.step = (int)meta_int(state, "step", 0, R.o.steps, sp);
    if (meta_int(f, "step", 0, R.o.steps, ckpt) != R.step && std::filesystem::exists(tmp)) {
        // killed between save_run's two renames: the state is the new one, the new checkpoint
        // waits whole in its temporary file. Finish the save.
        SafeFile t = read_safetensors(tmp);
        if (meta_int(t, "step", 0, R.o.steps, tmp) == R.step) {
            commit_file(ckpt);
            f = std::move(t);
        }
    }
    if (config_meta(config_from_meta(f.meta, ckpt)) != config_meta(R.M.cfg))
        BAD_INPUT("%s: its config differs from the run saved in %s", ckpt.c_str(), sp.c_str());
    copy_tensors(R.M, f, ckpt, false);
    if (meta_int(f, "step", 0, R.o.steps, ckpt) != R.step)
        BAD_INPUT("%s is from step %ld but its state file from step %d (interrupted between the two writes?): "
                  "cannot resume exactly", ckpt.c_str(), meta_int(f, "step", 0, R.o.steps, ckpt), R.step);
    R.M.adam_t = (int)meta_int(state, "adam_t", 0, R.o.steps, sp);
    auto rng = state.meta.find("data_rng");
    if (rng == state.meta.end()) BAD_INPUT("%s: metadata 'data_rng' is missing", sp.c_str());
    R.D.rng.s = strtoull(rng->second.c_str(), nullptr, 10);
    auto get = [&](const std::string& name, long n) -> const std::vector<float>& {
        auto it = state.tensors.find(name);
        if (it == state.tensors.end() || (long)it->second.data.size() != n)
            BAD_INPUT("%s: tensor '%s' is missing or has the wrong size", sp.c_str(), name.c_str());
        return it->second.data;
    };
    for (auto& p : R.M.table) {
        auto& m = get("adam_m." + p.name, p.numel);
        auto& v = get("adam_v." + p.name, p.numel);
        std::copy(m.begin(), m.end(), R.M.m.begin() + p.offset);
        std::copy(v.begin(), v.end(), R.M.v.begin() + p.offset);
    }
    R.losses = get("loss_curve", R.step);
}

static void train_setup(TrainRun& R, const Args& given) {
    SafeFile state;
    Args a = given.has("resume") ? resume_args(given, &state) : given;
    std::string model = a.str("model");
    bool is_bt = model == "bt", is_pause = model == "pause" || model == "pause-frozen", is_latent = model == "latent";
    if (!is_bt && !is_pause && !is_latent && model != "vanilla")
        BAD_INPUT("--model must be vanilla, bt, pause, pause-frozen or latent, got '%s'", model.c_str());
    if (is_latent && g_device)
        BAD_INPUT("--model latent runs on the CPU only (its positions go one at a time through the host): drop --device cuda");
    if (is_bt && !a.has("joint") && !a.has("init"))
        BAD_INPUT("--model bt trains a processor on a frozen backbone: give --init BACKBONE.safetensors, or --joint to "
                  "train both from scratch");
    if (model == "pause-frozen" && !a.has("init"))
        BAD_INPUT("--model pause-frozen trains only the PAUSE embedding of a backbone: give --init BACKBONE.safetensors");
    std::string bptt = a.str("bptt");
    if (bptt != "full" && bptt != "step") BAD_INPUT("--bptt must be full or step, got '%s'", bptt.c_str());
    uint64_t seed = (uint64_t)a.integer("seed", 0, 2000000000);
    OptConfig& o = R.o;
    o.steps = a.integer("steps", 0, 10000000); o.lr = (float)a.num("lr", 0, 10);
    o.warmup = a.integer("warmup", 1, 10000000);
    if (!a.has("warmup")) o.warmup = std::max(1, std::min(o.warmup, o.steps / 10));   // short runs warm up less
    o.wd = (float)a.num("wd", 0, 10); o.clip = (float)a.num("clip", 1e-6, 1e9);
    R.B = a.integer("batch", 1, 100000);
    R.log_every = a.integer("log-every", 1, 1000000000);
    R.save_every = a.integer("save-every", 0, 1000000000);
    R.out = a.str("out");
    check_output_path(R.out);            // before any training, not after it
    check_output_path(state_path(R.out));
    R.task = a.has("data") ? "file" : a.str("task");
    for (auto& f : a.given)
        if (f != "resume" && f != "log-every" && f != "save-every" && f != "out" && f != "device")
            R.flags[f] = a.str(f);   // (--device is not part of the run: it may resume elsewhere)

    SafeFile init;
    if (given.has("resume")) {   // the model's config comes from the checkpoint, not from --init
        SafeFile ck = read_safetensors(a.str("out"));
        model_build(R.M, config_from_meta(ck.meta, a.str("out")));
    } else {
        model_build(R.M, train_config(a, is_bt, is_pause, is_latent, &init));
        model_init_random(R.M, seed);
        if (a.has("init")) copy_tensors(R.M, init, a.str("init"), true);   // a processor new to it keeps its init
    }
    R.mode.use_proc = is_bt;
    R.mode.train_backbone = !is_bt || a.has("joint");
    R.mode.bptt_step = bptt == "step";
    R.mode.pause_row_only = model == "pause-frozen";
    R.D = train_data(a, seed);
    R.D.pause = inserted_after_newline(R.M.cfg);
    int T = max_tokens(R.D);
    run_state_build(R.S, R.M.cfg, T, R.B, true);
    if (given.has("resume")) restore_run(R, state, a.str("out"));
    if (g_device) model_upload(R.M);   // --device cuda: weights, gradients and moments to the GPU
    else {   // the forward passes read the matrices transposed: made once here, then after each step
        transpose_weights(R.M, R.wt_mem, R.wt);
        R.S.wt = &R.wt;
    }
    if (R.quiet) return;
    print_train_header(a, R.M, R.mode, o, R.D, R.B, T, seed);
    if (given.has("resume")) printf("  resume   %s at step %d of %d\n", a.str("out").c_str(), R.step, o.steps);
}

// Run steps until R.step == until. A non-finite loss or gradient stops the run before the
// weights are touched; the checkpoint on disk is then the last one written (a good one).
static void train_steps(TrainRun& R, int until) {
    Model& M = R.M;
    double t_start = now_seconds();
    long tokens = 0;
    int first = R.step;
    while (R.step < until) {
        int t = R.step;   // this step's index, 0-based
        double t0 = now_seconds();
        int Tb = load_batch(R.S, next_batch(R.D, R.B));
        zero_grads(M);
        float loss = forward_sequence(M, R.S, Tb, R.mode);
        if (std::isfinite(loss)) backward_sequence(M, R.S, Tb, R.mode);
        float norm = std::isfinite(loss) ? optimizer_step(M, R.o, t, R.mode) : NAN;
        if (R.S.wt && std::isfinite(norm))   // the matrices this step changed, transposed again
            transpose_into(M, R.wt_mem, [&](const ParamInfo& p) {
                long off, n;   // (each thread its own)
                return trainable_span(M, p, R.mode, &off, &n);
            });
        if (!std::isfinite(norm))
            INTERNAL("step %d: the %s is %g; stopping. The weights were not updated; %s keeps the last checkpoint "
                     "written%s", t + 1, std::isfinite(loss) ? "gradient norm" : "loss",
                     std::isfinite(loss) ? norm : loss, R.out.c_str(),
                     R.save_every ? strf(" (every %d steps)", R.save_every).c_str() : " (none: try --save-every)");
        R.losses.push_back(loss);
        R.step++;
        double dt = now_seconds() - t0, el = now_seconds() - t_start;
        tokens += (long)Tb * R.B;
        R.tokens += (long)Tb * R.B;
        if (!R.quiet && (R.step % R.log_every == 0 || t == first || R.step == R.o.steps)) {
            printf("step %5d/%d | loss %.4f | norm %6.3f | lr %.1e | %6.1f ms | %6.0f tok/s | ETA %s\n", R.step,
                   R.o.steps, loss, norm, lr_at(R.o, t), dt * 1e3, tokens / el,
                   fmt_time(el / (R.step - first) * (R.o.steps - R.step)).c_str());
            fflush(stdout);
        }
        if (R.save_every > 0 && R.step % R.save_every == 0 && R.step < R.o.steps) save_run(R);
    }
}

// a run from typed settings (cli.hpp's TrainSpec), as bt train's command line would give them
static void train_setup(TrainRun& R, const TrainSpec& t) { train_setup(R, spec_args(t)); }

static void cmd_train(const Args& a) {
    use_device(a);
    TrainRun R;
    train_setup(R, a);
    double t0 = now_seconds();
    train_steps(R, R.o.steps);
    save_run(R);
    printf("wrote %s and %s (%ld params) after %d steps in %s\n", R.out.c_str(), state_path(R.out).c_str(),
           R.M.n_params, R.step, fmt_time(now_seconds() - t0).c_str());
}

// ---- bt eval
static void parse_sizes(const std::string& s, int* lo, int* hi, int max) {
    int used = 0;
    if (sscanf(s.c_str(), "%d..%d%n", lo, hi, &used) == 2 && used == (int)s.size() && *lo >= 1 && *hi >= *lo && *hi <= max)
        return;
    if (sscanf(s.c_str(), "%d%n", lo, &used) == 1 && used == (int)s.size() && *lo >= 1 && *lo <= max) { *hi = *lo; return; }
    BAD_INPUT("--sizes '%s' should look like 2..8 (or one size, 5), sizes 1..%d", s.c_str(), max);
}

static void print_eval_row(const std::string& label, const EvalResult& R) {
    printf("%-10s %5d   %6.3f   %9.3f   %s\n", label.c_str(), R.n, (double)R.answer_ok / R.n, (double)R.lines_ok / R.n,
           R.first_wrong_n ? strf("%.1f", R.first_wrong_sum / R.first_wrong_n).c_str() : "-");
}

static void add_result(EvalResult& into, const EvalResult& r) {
    into.n += r.n; into.answer_ok += r.answer_ok; into.lines_ok += r.lines_ok;
    into.first_wrong_sum += r.first_wrong_sum; into.first_wrong_n += r.first_wrong_n;
    for (auto& m : r.mistakes) if (into.mistakes.size() < 3) into.mistakes.push_back(m);
}

static void cmd_eval(const Args& a) {
    if (!a.has("ckpt")) BAD_INPUT("bt eval needs --ckpt FILE");
    int n = a.integer("n", 1, 1000000);
    uint64_t seed = (uint64_t)a.integer("seed", 0, 2000000000);
    Task task = a.has("data") ? TASK_FILE : parse_task(a.str("task"));   // check every flag before printing
    int lo = 0, hi = 0;
    if (task != TASK_FILE) {
        lo = TASKS[task].train_lo; hi = TASKS[task].ood_hi;
        if (a.has("sizes")) parse_sizes(a.str("sizes"), &lo, &hi, task == TASK_VAR ? 18 : 64);
    }
    int evict = a.integer("evict", 0, 1 << 15);
    use_device(a);
    if (evict && g_device) BAD_INPUT("--evict runs on the CPU only: drop --device cuda");
    Model M;
    load_model(M, a.str("ckpt"));
    if (evict && M.cfg.proc_width) BAD_INPUT("--evict is a baseline for a vanilla model; %s has a processor", a.str("ckpt").c_str());
    if (g_device) model_upload(M);
    printf("bt eval | %s | %s | processor %s%s%s\n", a.str("ckpt").c_str(), build_flags().c_str(), M.cfg.proc_width ? "on" : "none",
           M.cfg.pause ? strf(" | %d PAUSE after newlines", M.cfg.pause).c_str() :
           M.cfg.latent ? strf(" | %d latent positions after newlines", M.cfg.latent).c_str() : "",
           evict ? strf(" | evict: %d older entries kept at each newline", evict).c_str() : "");
    printf("%-10s %5s   %6s   %9s   %s\n", "size", "n", "answer", "all-lines", "first wrong line (mean, of wrong)");
    double t0 = now_seconds();
    EvalDecoders keep;   // built once, for every size
    if (a.has("data")) {
        std::vector<Example> ex = read_examples(a.str("data"));
        std::map<int, std::vector<std::string>> by_size;
        for (auto& e : ex) by_size[e.size].push_back(e.text);
        EvalResult all;
        for (auto& kv : by_size) {
            EvalResult r = evaluate(M, kv.second, evict, &keep);
            print_eval_row(std::to_string(kv.first) + " lines", r);
            add_result(all, r);
        }
        print_eval_row("all", all);
        for (auto& m : all.mistakes) printf("  e.g. %s\n", m.c_str());
        return;
    }
    const TaskInfo& ti = TASKS[task];
    EvalResult id, ood;
    for (int s = lo; s <= hi; s++) {
        EvalResult r = evaluate(M, eval_set(task, s, n, seed), evict, &keep);
        print_eval_row(std::to_string(s), r);
        if (s >= ti.train_lo && s <= ti.train_hi) add_result(id, r);
        if (s >= ti.ood_lo && s <= ti.ood_hi) add_result(ood, r);
    }
    if (id.n) print_eval_row(strf("ID %d..%d", std::max(lo, ti.train_lo), std::min(hi, ti.train_hi)), id);
    if (ood.n) print_eval_row(strf("OOD %d..%d", std::max(lo, ti.ood_lo), std::min(hi, ti.ood_hi)), ood);
    for (auto& m : id.mistakes) printf("  ID  e.g. %s\n", m.c_str());
    for (auto& m : ood.mistakes) printf("  OOD e.g. %s\n", m.c_str());
    printf("(%s)\n", fmt_time(now_seconds() - t0).c_str());
}

// ---- bt generate
// --trace-html: lab/trace.cpp sets this at start-up; a bt built from bt.cpp alone has none
static void (*g_trace_html)(const std::string& path, const Args& a, const Decoder& D, const std::string& prompt,
                            const std::string& out) = nullptr;

static void cmd_generate(const Args& a) {
    if (!a.has("ckpt")) BAD_INPUT("bt generate needs --ckpt FILE");
    if (!a.has("prompt")) BAD_INPUT("bt generate needs --prompt TEXT (a question, e.g. --prompt '1*4-0+3')");
    std::string p = a.str("prompt");
    // the shell gives a literal backslash-n: accept it as a newline
    for (size_t i; (i = p.find("\\n")) != std::string::npos;) p.replace(i, 2, "\n");
    if (p.find_first_not_of(" \n") == std::string::npos)
        BAD_INPUT("--prompt is empty: give a question to continue, e.g. --prompt '1*4-0+3'");
    if (p.back() != '\n') p += '\n';
    bool html = a.has("trace-html");
    if (html && !g_trace_html)
        BAD_INPUT("--trace-html needs the lab (lab/trace.cpp), and this bt was built from bt.cpp alone: build it with make");
    use_device(a);
    if ((a.has("trace") || html) && g_device) BAD_INPUT("--trace and --trace-html read the cache on the host: run it with --device cpu");
    Model M;
    load_model(M, a.str("ckpt"));
    if (g_device) model_upload(M);
    Decoder D;
    decoder_init(D, M);
    if (a.has("trace")) D.trace = stdout;
    D.keep_rewrites = html;
    if ((a.has("trace") || html) && M.cfg.proc_width == 0) printf("(this checkpoint has no processor: there is no bottleneck step to trace)\n");
    std::string out = generate(D, p);
    printf("%s%s\n", p.c_str(), out.c_str());
    if (html) {
        g_trace_html(a.str("trace-html"), a, D, p, out);
        printf("wrote %s (%zu rewrites)\n", a.str("trace-html").c_str(), D.rewrites.size());
    }
}

// ---- bt score
static void cmd_score(const Args& a) {
    if (!a.has("ckpt") || !a.has("text-file")) BAD_INPUT("bt score needs --ckpt FILE and --text-file FILE");
    use_device(a);
    Model M;
    load_model(M, a.str("ckpt"));
    if (g_device) model_upload(M);
    std::vector<Example> ex = read_examples(a.str("text-file"));
    TrainMode mode;
    mode.use_proc = M.cfg.proc_width > 0;
    printf("position\ttoken\tlogprob\n");
    double total = 0.0;
    for (auto& e : ex) {
        RunState S;
        std::string text = insert_pauses(e.text, inserted_after_newline(M.cfg));
        int T = (int)text.size() + 1;
        run_state_build(S, M.cfg, T, 1, false);
        load_batch(S, {text});
        forward_sequence(M, S, T, mode);
        to_host(S.h_logits, S.logits, sizeof(float) * T * M.cfg.V);
        for (int t = 0; t + 1 < T; t++) {
            if (S.h_weight[t] == 0.0f) continue;
            const float* z = S.h_logits + (long)t * M.cfg.V;
            float mx = *std::max_element(z, z + M.cfg.V);
            double sum = 0.0;
            for (int i = 0; i < M.cfg.V; i++) sum += exp((double)z[i] - mx);
            double lp = (double)z[S.h_targets[t]] - mx - log(sum);
            total += lp;
            printf("%d\t%s\t%.6f\n", t + 1, token_str(S.h_targets[t]).c_str(), lp);
        }
    }
    printf("total\t%.6f\n", total);
}

// ---- the commands of bt.cpp (lab/lab.cpp adds experiment, probe and bench)
static const Command CORE_COMMANDS[] = {
    {"train", "task data out init model steps batch lr warmup wd clip seed d-model layers heads ffn max-seq-len "
              "proc-width proc-layers proc-heads proc-ffn k schedule bptt joint pause latent log-every save-every resume "
              "device",
     "train a model (vanilla backbone, or a Cache Processor on top with --model bt)", cmd_train},
    {"eval", "ckpt task data sizes n seed evict device", "greedy decoding accuracy per problem size", cmd_eval},
    {"generate", "ckpt prompt trace trace-html device", "greedy continuation of a prompt", cmd_generate},
    {"score", "ckpt text-file device", "log-probability of every target token of the examples in a file", cmd_score},
};
static const bool CORE_COMMANDS_ADDED = add_commands(CORE_COMMANDS, sizeof CORE_COMMANDS / sizeof *CORE_COMMANDS,
                                                     CORE_FLAGS, sizeof CORE_FLAGS / sizeof *CORE_FLAGS);

#ifndef BT_TESTING
int main(int argc, char** argv) {
    try {
        Args a;
        const Command* cmd = parse_args(a, argc, argv);
        if (cmd) cmd->run(a);
        return 0;
    } catch (BtError& e) {
        fprintf(stderr, "bt: error: %s\n", e.what());
        return e.code;
    } catch (std::bad_alloc&) {
        fprintf(stderr, "bt: error: out of memory (try a smaller --batch or --max-seq-len)\n");
        return 1;
    } catch (std::exception& e) {
        fprintf(stderr, "bt: internal error: %s\n", e.what());
        return 1;
    }
}
#endif
