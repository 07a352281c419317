// bt.cpp -- the Bottlenecked Transformer (arXiv 2505.16950) in one file of plain C++.
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
// Design of record: DESIGN.md in the shared folder; the exact model spec: tests/MODEL_SPEC.md.
//
// Sections: errors and small utilities -> vocabulary -> config -> parameters -> one transformer
// block -> backbone and run state -> THE CACHE PROCESSOR -> training through time -> optimizer ->
// tasks and data -> decoding and evaluation -> checkpoints (safetensors) -> command line.
#include <algorithm>
#include <chrono>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <set>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>
#include <sys/resource.h>

#include "tensor.hpp"

// --device cuda: a build with CUDA (make USE_CUDA=1: nvcc and -DUSE_CUDA) also compiles kernels.cu,
// whose launchers cuda::<op> take the arguments of the ops in tensor.hpp (and of the processor's
// steps below), as device pointers. tests/test_kernels.cpp defines BT_DEVICE itself and compiles
// kernels.cu with g++ through tests/cuda_on_cpu.hpp, so the device path runs in make test too.
#if defined(USE_CUDA) || defined(__CUDACC__)
#ifndef BT_DEVICE
#define BT_DEVICE
#endif
#endif
#ifdef BT_DEVICE
#include "kernels.cu"
#endif

// =============================================================================================
// Errors and small utilities
// =============================================================================================

// Every user-facing failure is a BtError: main() prints its one-line message and exits with its
// code (2: bad input or usage, 1: internal failure). Tests catch it.
struct BtError : std::runtime_error {
    int code;
    BtError(int c, const std::string& m) : std::runtime_error(m), code(c) {}
};

static std::string strf(const char* fmt, ...) {
    char buf[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    return buf;
}
#define BAD_INPUT(...) throw BtError(2, strf(__VA_ARGS__))
#define INTERNAL(...) throw BtError(1, strf(__VA_ARGS__))

static void zero(float* p, long n) { memset(p, 0, sizeof(float) * n); }
static void copy_floats(float* dst, const float* src, long n) { memcpy(dst, src, sizeof(float) * n); }
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
// Where the ops run: the CPU, or a CUDA device (--device cuda)
//
// Every op call of the model goes through OP(): OP(matmul_forward(out, inp, W, WT, N, IC, OC)) runs
// tensor.hpp's matmul_forward, or under --device cuda kernels.cu's cuda::matmul_forward with the
// same arguments. Without CUDA compiled in, OP(call) is just the call. There is one copy of the
// model's code (block_forward, bottleneck_step, forward_sequence, ...) for both.
// On the device, the buffers the ops touch (weights, gradients, AdamW moments, activations, the KV
// cache, the undo log) live in device memory. The few numbers the host needs (tokens in; the loss,
// logits and gradient norm out) go through to_device / to_host: explicit copies on the device,
// nothing at all on the CPU, where the host's copy and the ops' buffer are the same memory.
// =============================================================================================
#ifdef BT_DEVICE
static bool g_device = false;   // --device cuda (tests switch it on around a device run)
#define OP(call) (g_device ? cuda::call : ::call)
#else
static const bool g_device = false;
#define OP(call) ::call
#endif

// Device memory owned by a Model or a RunState, freed with it. Empty on the CPU.
struct DeviceMem {
    void* p = nullptr;
    DeviceMem() = default;
    DeviceMem(const DeviceMem&) = delete;
    DeviceMem& operator=(const DeviceMem&) = delete;
    ~DeviceMem() { release(); }
    void alloc(size_t bytes);   // replaces what it held; the new memory is zeroed
    void release();
};
#ifdef BT_DEVICE
void DeviceMem::alloc(size_t bytes) {
    release();
    cudaCheck(cudaMalloc(&p, bytes ? bytes : 1));
    cudaCheck(cudaMemset(p, 0, bytes));
}
void DeviceMem::release() {
    if (p) cudaCheck(cudaFree(p));
    p = nullptr;
}
#else
void DeviceMem::alloc(size_t) { INTERNAL("this bt was built without CUDA (make USE_CUDA=1)"); }
void DeviceMem::release() {}
#endif

// copy bytes from the host to the ops' buffer, from an ops' buffer to the host, or between two
// ops' buffers: cudaMemcpy with a device, memcpy without one
enum CopyDir { HOST_TO_DEVICE, DEVICE_TO_HOST, DEVICE_TO_DEVICE };
static void copy_bytes(void* dst, const void* src, size_t bytes, CopyDir dir) {
#ifdef BT_DEVICE
    static const cudaMemcpyKind kind[] = {cudaMemcpyHostToDevice, cudaMemcpyDeviceToHost, cudaMemcpyDeviceToDevice};
    cudaCheck(cudaMemcpy(dst, src, bytes, kind[dir]));
#else
    (void)dir;
    memcpy(dst, src, bytes);
#endif
}
// On the CPU dst == src for these two (the host copy IS the buffer): nothing to do.
static void to_device(void* dst, const void* src, size_t bytes) {
    if (dst != src && bytes) copy_bytes(dst, src, bytes, HOST_TO_DEVICE);
}
static void to_host(void* dst, const void* src, size_t bytes) {
    if (dst != src && bytes) copy_bytes(dst, src, bytes, DEVICE_TO_HOST);
}
static void device_copy(void* dst, const void* src, size_t bytes) { copy_bytes(dst, src, bytes, DEVICE_TO_DEVICE); }
// wait for the device's queued work (timings); nothing to wait for on the CPU
static void device_sync() {
#ifdef BT_DEVICE
    if (g_device) cudaCheck(cudaDeviceSynchronize());
#endif
}

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
// Config: model sizes. The processor is present iff dp > 0.
// =============================================================================================
struct Config {
    int V = VOCAB_SIZE;   // vocabulary size
    int C = 128;          // d_model
    int L = 4;            // backbone layers
    int NH = 4;           // heads (head size C/NH)
    int F = 384;          // SwiGLU hidden width
    int T = 256;          // max sequence length (sizes buffers; RoPE needs no table)
    float theta = 10000.0f, eps = 1e-5f;
    // Cache Processor (DESIGN §4)
    int dp = 0;           // processor width; 0 = no processor
    int np = 1;           // processor blocks per backbone layer
    int nhp = 4;          // processor heads
    int fp = 0;           // processor SwiGLU hidden width
    int k = 4;            // top-k reconsolidated older entries per layer (newline schedule)
    int periodic = 0;     // 0: newline schedule; N > 0: periodic:N (whole cache every N tokens)
    // pause-token baseline (DESIGN §7): this many PAUSE tokens are fed after every newline
    int pause = 0;
};

static void validate_config(const Config& c) {
    if (c.C <= 0 || c.L <= 0 || c.NH <= 0 || c.F <= 0 || c.T < 2)
        BAD_INPUT("model sizes must be positive (d_model %d, layers %d, heads %d, ffn %d, max_seq_len %d)", c.C, c.L,
                  c.NH, c.F, c.T);
    if (c.C % c.NH != 0 || (c.C / c.NH) % 2 != 0)
        BAD_INPUT("heads (%d) must divide d_model (%d) into an even head size (RoPE rotates pairs)", c.NH, c.C);
    if (c.V != VOCAB_SIZE) BAD_INPUT("vocab_size is %d, bt's vocabulary has %d tokens", c.V, VOCAB_SIZE);
    if (c.dp > 0) {
        if (c.np <= 0 || c.nhp <= 0 || c.fp <= 0 || c.k < 0 || c.k > 64 || c.periodic < 0)
            BAD_INPUT("processor sizes must be positive, k at most 64 (width %d, layers %d, heads %d, ffn %d, k %d)", c.dp, c.np,
                      c.nhp, c.fp, c.k);
        if (c.dp % c.nhp != 0 || (c.dp / c.nhp) % 2 != 0)
            BAD_INPUT("processor heads (%d) must divide the processor width (%d) into an even head size", c.nhp, c.dp);
    }
    if (c.pause < 0 || c.pause > 64) BAD_INPUT("pause must be in [0, 64], got %d", c.pause);
}

// the text a pause model reads: P PAUSE tokens ('_') after every newline
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
    float* w_in;                 // (dp, 2C)   KV-token projection
    std::vector<BlockW> blocks;  // np blocks of width dp
    float* final_norm;           // (dp)
    float* w_out;                // (2C, dp)   back to [dK | dV]; starts at zero
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
    w->proc.resize(c.dp > 0 ? c.L : 0);
    for (int l = 0; l < (int)w->proc.size(); l++) {
        ProcW& p = w->proc[l];
        std::string pre = "proc." + std::to_string(l) + ".";
        add(&p.w_in, pre + "w_in", {c.dp, 2 * c.C}, 0, true);
        p.blocks.resize(c.np);
        for (int i = 0; i < c.np; i++) add_block(p.blocks[i], pre + "blocks." + std::to_string(i) + ".", c.dp, c.fp, true);
        add(&p.final_norm, pre + "final_norm", {c.dp}, 1, true);
        add(&p.w_out, pre + "w_out", {2 * c.C, c.dp}, 2, true);
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
        if (p.kind == 4) std /= sqrtf(2.0f * (p.proc ? M.cfg.np : M.cfg.L));
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
struct BlockDims { int C, NH, HS, F; };

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
                          const BlockDims& d, const int* pos, int s, int e, int B, int T, int causal, float theta,
                          float eps) {
    int C = d.C, N = (e - s) * B;
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
                           const float* x, const BlockW& w, const BlockDims& d, const int* pos, int s, int e, int B,
                           int T, int causal, float theta) {
    int C = d.C, F = d.F, N = (e - s) * B;
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
    std::vector<float*> xs;   // np+1 of (S,B,dp): residual stream through the processor blocks
    std::vector<BlockActs> blocks;  // np
    float *lnf, *rstdf;       // (S,B,dp), (S,B)
    float* delta;             // (S,B,2C) W_out output: [dK | dV] before the gate
    // gradients (training only)
    float *dx, *dlnf, *ddelta, *du;  // (S,B,dp) (S,B,dp) (S,B,2C) (S,B,2C)
    float *dk, *dv;                   // (S,B,dp) the blocks' own keys and values
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
    BlockScratch sc;                   // sized for the wider of backbone and processor
    // Cache Processor
    ProcActs pa;
    std::vector<UndoRecord> undo;      // one record per (boundary, layer), in firing order
    std::vector<int> undo_sel;         // the records' entries (CPU; reserved, so appending allocates nothing)
    std::vector<float> undo_u;
    int* dev_undo_sel = nullptr;       // --device cuda: the entries in device memory, of the capacity
    float* dev_undo_u = nullptr;       //   the vectors reserve on the CPU; filled up to undo_*_n
    long undo_sel_n = 0, undo_u_n = 0, undo_sel_cap = 0, undo_u_cap = 0;
    std::vector<int> bounds;           // segment starts of the current batch, then T (segment_bounds)
    int n_tok = 0;                     // positions filled so far (decoding)
    const Weights* wt = nullptr;       // the backbone's matrices transposed, for the forward's matmuls
                                       // (a Decoder's own copy); nullptr: each matmul transposes its W
};

static void carve_run_state(Carver& cv, RunState& S, const Config& c, int T, int B, bool train) {
    long TB = (long)T * B;
    BlockDims d{c.C, c.NH, c.C / c.NH, c.F};
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
        carve_block_scratch(cv, S.sc, std::max(c.C, c.dp), std::max(c.F, c.fp), (T + c.k) * (long)B);
    }
    if (c.dp > 0) {
        int Sn = T + c.k;   // most entries one firing can rewrite (periodic: the whole cache)
        long SB = (long)Sn * B;
        BlockDims pd{c.dp, c.nhp, c.dp / c.nhp, c.fp};
        ProcActs& p = S.pa;
        p.scores = cv.take((long)B * T);
        p.u = cv.take(SB * 2 * c.C);
        p.xs.resize(c.np + 1);
        p.blocks.resize(c.np);
        for (int i = 0; i <= c.np; i++) p.xs[i] = cv.take(SB * c.dp);
        for (int i = 0; i < c.np; i++) carve_block_acts(cv, p.blocks[i], pd, Sn, B);
        p.lnf = cv.take(SB * c.dp); p.rstdf = cv.take(SB); p.delta = cv.take(SB * 2 * c.C);
        if (train) {
            p.dx = cv.take(SB * c.dp); p.dlnf = cv.take(SB * c.dp);
            p.ddelta = cv.take(SB * 2 * c.C); p.du = cv.take(SB * 2 * c.C);
            p.dk = cv.take(SB * c.dp); p.dv = cv.take(SB * c.dp);
        }
    }
}

static void run_state_build(RunState& S, const Config& c, int T, int B, bool train) {
    if (T > c.T) BAD_INPUT("a sequence of %d tokens is longer than the model's context (max_seq_len %d)", T, c.T);
    S.B = B; S.T = T; S.train = train; S.dev = g_device;
    Carver count{nullptr};
    carve_run_state(count, S, c, T, B, train);
    int Sn = T + c.k;
    long TB = (long)T * B, n_int = TB * 3 + (long)Sn * B;
    // the undo log: enough for the whole cache rewritten at every boundary of a periodic schedule
    // (sum over boundaries of e), or for newline (every position once plus k recalled per boundary)
    long rows = c.dp == 0 ? 0 : c.periodic > 0 ? (long)T * (T / c.periodic + 1) : (long)T * (1 + c.k);
    long cap_sel = rows * B * c.L, cap_u = rows * B * 2 * c.C * c.L;
    S.imem.assign(n_int, 0);
    float* fbase = nullptr;
    int* ibase = nullptr;
    if (S.dev) {   // device memory, zeroed like the vectors; the undo log's entries after the rest
        S.dmem.alloc(sizeof(float) * (count.off + cap_u));
        S.dimem.alloc(sizeof(int) * (n_int + cap_sel));
        fbase = (float*)S.dmem.p;
        ibase = (int*)S.dimem.p;
        S.dev_undo_u = fbase + count.off; S.undo_u_cap = cap_u;
        S.dev_undo_sel = ibase + n_int; S.undo_sel_cap = cap_sel;
        S.hmem.assign(TB * (2 + c.V), 0.0f);
    } else {
        S.dmem.release(); S.dimem.release();
        S.dev_undo_u = nullptr; S.dev_undo_sel = nullptr; S.undo_u_cap = S.undo_sel_cap = 0;
        S.mem.assign(count.off, 0.0f);
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
    if (c.dp > 0) {
        S.undo.reserve(T * c.L);
        if (!S.dev) {
            S.undo_sel.reserve(cap_sel);
            S.undo_u.reserve(cap_u);
        }
    }
}

// =============================================================================================
// The backbone over one segment of positions [s,e) of the batch (rows s*B .. e*B), reading and
// extending the KV cache. One call with [0,T) is the ordinary full causal pass.
// =============================================================================================
static void backbone_forward(const Model& M, RunState& S, int s, int e) {
    const Config& c = M.cfg;
    int B = S.B, N = (e - s) * B;
    long r0 = (long)s * B;
    BlockDims d{c.C, c.NH, c.C / c.NH, c.F};
    OP(embedding_forward(S.xs[0] + r0 * c.C, S.tokens + r0, M.w.tok_emb, N, c.C));
    for (int l = 0; l < c.L; l++)
        block_forward(S.xs[l + 1], S.acts[l], S.xs[l], M.w.layers[l], S.wt ? &S.wt->layers[l] : nullptr, d, S.pos, s, e,
                      B, S.T, 1, c.theta, c.eps);
    OP(rmsnorm_forward(S.lnf + r0 * c.C, S.rstdf + r0, S.xs[c.L] + r0 * c.C, M.w.final_norm, N, c.C, c.eps));
    // LM head tied to the embedding: logits = lnf tok_emb^T
    OP(matmul_forward(S.logits + r0 * c.V, S.lnf + r0 * c.C, M.w.tok_emb, S.wt ? S.wt->tok_emb : nullptr, N, c.C, c.V));
    if (S.train)
        OP(crossentropy_forward(S.losses + r0, S.probs + r0 * c.V, S.logits + r0 * c.V, S.targets + r0, S.weight + r0,
                                N, c.V));
}

// The backward of backbone_forward for segment [s,e). Cache gradients dK, dV from later segments
// must already be in place. train_weights = false: a frozen backbone (activation grads only).
static void backbone_backward(Model& M, RunState& S, int s, int e, bool train_weights) {
    const Config& c = M.cfg;
    int B = S.B, N = (e - s) * B;
    long r0 = (long)s * B;
    BlockDims d{c.C, c.NH, c.C / c.NH, c.F};
    float* gemb = train_weights ? M.g.tok_emb : nullptr;
    OP(zero(S.dlogits + r0 * c.V, (long)N * c.V));
    OP(crossentropy_backward(S.dlogits + r0 * c.V, S.probs + r0 * c.V, S.targets + r0, S.weight + r0, 1.0f, N, c.V));
    OP(zero(S.dlnf + r0 * c.C, (long)N * c.C));
    OP(matmul_backward(S.dlnf + r0 * c.C, gemb, S.dlogits + r0 * c.V, S.lnf + r0 * c.C, M.w.tok_emb, N, c.C, c.V));
    OP(zero(S.dx + r0 * c.C, (long)N * c.C));
    OP(rmsnorm_backward(S.dx + r0 * c.C, train_weights ? M.g.final_norm : nullptr, S.dlnf + r0 * c.C,
                        S.xs[c.L] + r0 * c.C, M.w.final_norm, S.rstdf + r0, N, c.C));
    for (int l = c.L - 1; l >= 0; l--)
        block_backward(S.dx, S.dK[l], S.dV[l], train_weights ? &M.g.layers[l] : nullptr, S.sc, S.acts[l], S.xs[l],
                       M.w.layers[l], d, S.pos, s, e, B, S.T, 1, c.theta);
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
        float* sc = scores + (long)b * T;
        for (int p = 0; p < s; p++) sc[p] = attention_mass(att, s, e, b, p, B, NH, T);
        // top-kk by repeated argmax (k is small); strict > keeps the smaller position on ties.
        // A chosen position's score is then set to -inf so it is not chosen again.
        int chosen[64];
        for (int r = 0; r < kk; r++) {
            int best = 0;
            for (int p = 1; p < s; p++)
                if (sc[p] > sc[best]) best = p;
            sc[best] = -INFINITY;
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

// 3. transform: x0 = u W_in^T; np non-causal blocks with RoPE at the original positions;
//    delta = RMSNorm(x) W_out^T.   u (nS,B,2C) -> delta (nS,B,2C)
//    wt: w's matrices transposed (a Decoder's), or nullptr (each matmul transposes its own)
static void transform_forward(ProcActs& p, const ProcW& w, const ProcW* wt, const Config& c, int nS, int B) {
    int N = nS * B;
    BlockDims d{c.dp, c.nhp, c.dp / c.nhp, c.fp};
    OP(matmul_forward(p.xs[0], p.u, w.w_in, wt ? wt->w_in : nullptr, N, 2 * c.C, c.dp));
    for (int i = 0; i < c.np; i++)
        block_forward(p.xs[i + 1], p.blocks[i], p.xs[i], w.blocks[i], wt ? &wt->blocks[i] : nullptr, d, p.sel, 0, nS,
                      B, nS, 0, c.theta, c.eps);
    OP(rmsnorm_forward(p.lnf, p.rstdf, p.xs[c.np], w.final_norm, N, c.dp, c.eps));
    OP(matmul_forward(p.delta, p.lnf, w.w_out, wt ? wt->w_out : nullptr, N, c.dp, 2 * c.C));
}
// the backward of transform_forward: ddelta -> du (accumulated) and the weight grads gw
static void transform_backward(float* du, ProcW& gw, RunState& S, const ProcW& w, const Config& c, int nS, int B) {
    ProcActs& p = S.pa;
    int N = nS * B;
    BlockDims d{c.dp, c.nhp, c.dp / c.nhp, c.fp};
    OP(zero(p.dlnf, (long)N * c.dp));
    OP(matmul_backward(p.dlnf, gw.w_out, p.ddelta, p.lnf, w.w_out, N, c.dp, 2 * c.C));
    OP(zero(p.dx, (long)N * c.dp));
    OP(rmsnorm_backward(p.dx, gw.final_norm, p.dlnf, p.xs[c.np], w.final_norm, p.rstdf, N, c.dp));
    for (int i = c.np - 1; i >= 0; i--) {
        OP(zero(p.dk, (long)N * c.dp));  // the blocks' own keys and values: nothing outside reads them
        OP(zero(p.dv, (long)N * c.dp));
        block_backward(p.dx, p.dk, p.dv, &gw.blocks[i], S.sc, p.blocks[i], p.xs[i], w.blocks[i], d, p.sel, 0, nS, B,
                       nS, 0, c.theta);
    }
    OP(matmul_backward(du, gw.w_in, p.dx, p.u, w.w_in, N, 2 * c.C, c.dp));
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

// ---- the undo log: a record per firing and layer, its entries (sel and the pre-rewrite [K|V])
// appended to S.undo_sel, S.undo_u on the CPU, or to device buffers of the same capacity under
// --device cuda (the records themselves stay on the host).
static void undo_clear(RunState& S) {
    S.undo.clear(); S.undo_sel.clear(); S.undo_u.clear();
    S.undo_sel_n = S.undo_u_n = 0;
}
static const int* undo_sel_of(const RunState& S, const UndoRecord& rec) {    // (nS,B)
    return (S.dev ? S.dev_undo_sel : S.undo_sel.data()) + rec.sel_off;
}
static const float* undo_u_of(const RunState& S, const UndoRecord& rec) {    // (nS,B,2C)
    return (S.dev ? S.dev_undo_u : S.undo_u.data()) + rec.u_off;
}
// log layer l's firing after segment [s,e) before it overwrites: sel (nS,B), u (nS,B,2C)
static void undo_push(RunState& S, int l, int s, int e, int nS, const int* sel, const float* u, int C) {
    long n_sel = (long)nS * S.B, n_u = n_sel * 2 * C;
    if (!S.dev) {
        S.undo.push_back({l, s, e, nS, (long)S.undo_sel.size(), (long)S.undo_u.size()});
        S.undo_sel.insert(S.undo_sel.end(), sel, sel + n_sel);
        S.undo_u.insert(S.undo_u.end(), u, u + n_u);
        return;
    }
    if (S.undo_sel_n + n_sel > S.undo_sel_cap || S.undo_u_n + n_u > S.undo_u_cap)
        INTERNAL("the undo log on the device is full (%ld + %ld of %ld numbers)", S.undo_u_n, n_u, S.undo_u_cap);
    S.undo.push_back({l, s, e, nS, S.undo_sel_n, S.undo_u_n});
    OP(copy_ints(S.dev_undo_sel + S.undo_sel_n, sel, n_sel));
    OP(copy_floats(S.dev_undo_u + S.undo_u_n, u, n_u));
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

// Segment starts for a batch into S.bounds: 0, every boundary, then T (the end). All sequences of
// a batch share their newline positions, so sequence 0 decides.
static const std::vector<int>& segment_bounds(const Config& c, RunState& S, int T) {
    std::vector<int>& b = S.bounds;
    b.clear();
    b.push_back(0);
    for (int t = 1; t < T; t++)
        if (is_boundary(c, t, S.h_tokens[(long)t * S.B])) b.push_back(t);
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
    if (!mode.use_proc && !mode.segmented) {   // no processor: the segment loop is one full causal pass
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
    if (!mode.use_proc && !mode.segmented) { backbone_backward(M, S, 0, T, mode.train_backbone); return; }
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

// acc + sum_i x[i]^2 in double, one running sum in index order (the gradient norm). x (n)
static double sum_squares(double acc, const float* x, long n) {
    for (long i = 0; i < n; i++) acc += (double)x[i] * x[i];
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
// Tasks: synthetic arithmetic, one reasoning step per line (DESIGN §6). An example's text is
// "question\nline\n...\n#answer$" (no BOS). The size of an example is its number of steps.
// =============================================================================================
enum Task { TASK_CHAIN, TASK_ADD, TASK_VAR, TASK_MUL, TASK_FILE };
struct TaskInfo { const char* name; int train_lo, train_hi, ood_lo, ood_hi; };
static const TaskInfo TASKS[] = {
    {"chain", 2, 8, 9, 16},   // n operations mod 10
    {"add", 1, 6, 7, 12},     // n-digit + n-digit, one column per line
    {"var", 2, 6, 8, 12},     // chain depth, with distractors
    {"mul", 1, 3, 4, 5},      // n-digit x n-digit, one line per digit of the multiplier
};
static const int N_TASKS = 4;

static Task parse_task(const std::string& s) {
    for (int i = 0; i < N_TASKS; i++)
        if (s == TASKS[i].name) return (Task)i;
    BAD_INPUT("unknown task '%s' (expected chain, add, var or mul)", s.c_str());
}

static int apply_op(int a, char op, int d) {
    int r = op == '+' ? a + d : op == '-' ? a - d : a * d;
    return ((r % 10) + 10) % 10;
}

// chain: "1*4-0+3\n1*4=4\n4-0=4\n4+3=7\n#7$"
static std::string gen_chain(Rng& r, int n) {
    int a = r.randint(0, 9);
    std::string q = std::to_string(a), lines;
    for (int i = 0; i < n; i++) {
        char op = "+-*"[r.randint(0, 2)];
        int d = r.randint(0, 9), res = apply_op(a, op, d);
        q += op + std::to_string(d);
        lines += "\n" + std::to_string(a) + op + std::to_string(d) + "=" + std::to_string(res);
        a = res;
    }
    return q + lines + "\n#" + std::to_string(a) + "$";
}

// add, digits least-significant first: "891+721\n8+7+0=5,1\n9+2+1=2,1\n1+1+1=3,0\n#523$"
// (a final carry of 1 becomes one more answer digit)
static std::string gen_add(Rng& r, int n) {
    std::vector<int> a(n), b(n);
    for (int i = 0; i < n; i++) a[i] = r.randint(0, 9);
    for (int i = 0; i < n; i++) b[i] = r.randint(0, 9);
    std::string q, lines, ans;
    for (int i = 0; i < n; i++) q += (char)('0' + a[i]);
    q += '+';
    for (int i = 0; i < n; i++) q += (char)('0' + b[i]);
    int carry = 0;
    for (int i = 0; i < n; i++) {
        int s = a[i] + b[i] + carry;
        lines += strf("\n%d+%d+%d=%d,%d", a[i], b[i], carry, s % 10, s / 10);
        ans += (char)('0' + s % 10);
        carry = s / 10;
    }
    if (carry) ans += '1';
    return q + lines + "\n#" + ans + "$";
}

// var: "t=b+0;a=o-2;q=x+7;o=q*4;x=0\nx=0\nq=x+7=7\no=q*4=8\na=o-2=6\n#6$"
// A chain of `depth` assignments from a constant, shuffled among distractors whose right-hand
// variable is never defined. 2 distractors up to depth 7, 4 beyond (the OOD sizes).
static std::string gen_var(Rng& r, int depth) {
    int nd = depth <= 7 ? 2 : 4;
    if (depth + 2 * nd > 26) BAD_INPUT("var depth %d needs more than the 26 letters (at most 18)", depth);
    std::string letters = "abcdefghijklmnopqrstuvwxyz";
    for (int i = 25; i > 0; i--) std::swap(letters[i], letters[r.randint(0, i)]);
    std::vector<std::string> assigns;
    std::string lines;
    int val = r.randint(0, 9);
    assigns.push_back(strf("%c=%d", letters[0], val));
    lines += strf("\n%c=%d", letters[0], val);
    for (int i = 1; i < depth; i++) {
        char op = "+-*"[r.randint(0, 2)];
        int d = r.randint(0, 9);
        val = apply_op(val, op, d);
        assigns.push_back(strf("%c=%c%c%d", letters[i], letters[i - 1], op, d));
        lines += strf("\n%c=%c%c%d=%d", letters[i], letters[i - 1], op, d, val);
    }
    for (int i = 0; i < nd; i++)
        assigns.push_back(strf("%c=%c%c%d", letters[depth + 2 * i], letters[depth + 2 * i + 1], "+-*"[r.randint(0, 2)],
                               r.randint(0, 9)));
    for (int i = (int)assigns.size() - 1; i > 0; i--) std::swap(assigns[i], assigns[r.randint(0, i)]);
    std::string q;
    for (size_t i = 0; i < assigns.size(); i++) q += (i ? ";" : "") + assigns[i];
    return q + lines + "\n#" + std::to_string(val) + "$";
}

// mul, numbers least-significant digit first: "21*43\n840,840\n0630,8040\n#8040$" is 12 x 34.
// Line i holds the shifted partial product a * b_i * 10^i and the running sum, each written with
// n+1+i digits (zeros fill the high end), so every example of a size has the same layout; the
// answer has 2n digits.
static std::string digits_lsb(uint64_t x, int width) {
    std::string s;
    for (int i = 0; i < width; i++, x /= 10) s += (char)('0' + x % 10);
    return s;
}
static std::string gen_mul(Rng& r, int n) {
    std::string qa, qb;
    uint64_t a = 0, b = 0, p10 = 1;
    for (int i = 0; i < n; i++, p10 *= 10) {
        int da = r.randint(0, 9), db = r.randint(0, 9);
        qa += (char)('0' + da); qb += (char)('0' + db);
        a += da * p10; b += db * p10;
    }
    std::string lines;
    uint64_t sum = 0, shift = 1;
    for (int i = 0; i < n; i++, shift *= 10) {
        uint64_t part = a * (uint64_t)(qb[i] - '0') * shift;
        sum += part;
        lines += "\n" + digits_lsb(part, n + 1 + i) + "," + digits_lsb(sum, n + 1 + i);
    }
    return qa + "*" + qb + lines + "\n#" + digits_lsb(sum, 2 * n) + "$";
}

static std::string question_of(const std::string& text) { return text.substr(0, text.find('\n')); }

// Held-out split: a question whose FNV-1a hash is 0 mod 8 is for evaluation only; the training
// stream never contains it, so the two splits are disjoint by construction.
static bool is_eval_question(const std::string& q) {
    uint64_t h = 1469598103934665603ull;
    for (char ch : q) h = (h ^ (unsigned char)ch) * 1099511628211ull;
    return h % 8 == 0;
}

static std::string gen_example(Task task, Rng& r, int size, bool eval_split) {
    for (;;) {
        std::string t = task == TASK_CHAIN ? gen_chain(r, size) : task == TASK_ADD ? gen_add(r, size)
                       : task == TASK_VAR   ? gen_var(r, size) : gen_mul(r, size);
        if (is_eval_question(question_of(t)) == eval_split) return t;
    }
}

// ---- examples from a text file: one example per block of lines, blocks separated by a blank line
struct Example { std::string text; int size; };

// the whole file as bytes; what names a missing file in the error
static std::string read_file(const std::string& path, const char* what) {
    std::ifstream f(path, std::ios::binary);
    if (!f) BAD_INPUT("%s: cannot open the %s (does the file exist?)", path.c_str(), what);
    return std::string((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
}

// Examples in the task text format, separated by blank lines. path only names the source in errors.
static std::vector<Example> parse_examples(const std::string& text, const std::string& path) {
    std::istringstream f(text);
    std::vector<Example> out;
    std::vector<std::string> cur;
    int lineno = 0, start = 1;
    std::string line;
    auto finish = [&]() {
        if (cur.empty()) return;
        if (cur.size() < 2)
            BAD_INPUT("%s: line %d: an example needs a question line and an answer line '#...$'", path.c_str(), start);
        const std::string& last = cur.back();
        if (last.size() < 3 || last[0] != '#' || last.back() != '$')
            BAD_INPUT("%s: line %d: the last line of an example must look like '#<answer>$', got '%s'", path.c_str(),
                      start + (int)cur.size() - 1, last.c_str());
        std::string text;
        for (size_t i = 0; i < cur.size(); i++) text += (i ? "\n" : "") + cur[i];
        out.push_back({text, (int)cur.size() - 2});
        cur.clear();
    };
    while (std::getline(f, line)) {
        lineno++;
        if (!line.empty() && line.back() == '\r') line.pop_back();
        if (line.empty()) { finish(); continue; }
        for (size_t i = 0; i < line.size(); i++)
            if (char_to_token(line[i]) < 0 || line[i] == '\n')
                BAD_INPUT("%s: line %d, column %d: character '%c' (byte 0x%02x) is not in the vocabulary", path.c_str(),
                          lineno, (int)i + 1, line[i], (unsigned char)line[i]);
        if (cur.empty()) start = lineno;
        cur.push_back(line);
    }
    finish();
    if (out.empty()) BAD_INPUT("%s: no examples found (examples are separated by blank lines)", path.c_str());
    return out;
}

static std::vector<Example> read_examples(const std::string& path) {
    return parse_examples(read_file(path, "data file"), path);
}

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
    int pause = 0;                                  // PAUSE tokens after every newline (pause models)
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
struct Decoder {
    const Model* M;
    RunState S;         // B = 1, T = max_seq_len, no gradients. Row t of the cache is "slot" t
    int seg_start = 0;  // first slot of the current segment (line)
    bool use_proc = false;
    FILE* trace = nullptr;
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

// wt_mem = every tensor of M at its own offset, each matrix (rows, cols) stored as (cols, rows)
static void transpose_weights(const Model& M, std::vector<float>& wt_mem, Weights& wt) {
    wt_mem.assign(M.n_params, 0.0f);
    for (const ParamInfo& p : M.table) {
        const float* src = M.params.data() + p.offset;
        float* dst = wt_mem.data() + p.offset;
        if (p.shape.size() == 2) transpose(dst, src, p.shape[0], p.shape[1]);
        else copy_floats(dst, src, p.numel);
    }
    layout_params(M.cfg, &wt, wt_mem.data(), nullptr);
}

static void decoder_init(Decoder& D, const Model& M, int evict = 0) {
    D.M = &M;
    run_state_build(D.S, M.cfg, M.cfg.T, 1, false);
    D.use_proc = M.cfg.dp > 0;
    if (evict > 0 && D.use_proc) BAD_INPUT("eviction is a baseline for a vanilla model; this one has a processor");
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

static void print_trace(const Decoder& D, int s, int e);


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
            if (D.trace) print_trace(D, D.seg_start, t);
            D.seg_start = chunk = t;
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

// Greedy continuation of prompt (text, no BOS) until '$' or the context is full. A pause model
// is fed its PAUSE tokens after every newline (prompt and output); they are never emitted.
static std::string generate(Decoder& D, const std::string& prompt) {
    static const std::vector<int> pauses(64, PAUSE);   // P <= 64 (validate_config)
    int P = D.M->cfg.pause;
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

// --trace: what the bottleneck step just did, layer by layer
static void print_trace(const Decoder& D, int s, int e) {
    const RunState& S = D.S;
    const Config& c = D.M->cfg;
    std::string span;
    for (int t = s; t < e; t++) span += token_str(S.tokens[t]);
    fprintf(D.trace, "[bottleneck] after positions %d..%d \"%s\"\n", s, e - 1, span.c_str());
    int first = (int)S.undo.size() - c.L;   // this boundary's records, one per layer
    for (int l = 0; l < c.L; l++) {
        const UndoRecord& rec = S.undo[first + l];
        const int* sel = S.undo_sel.data() + rec.sel_off;
        const float* u = S.undo_u.data() + rec.u_off;
        const BlockActs& a = S.acts[l];
        // relative update sizes over the rewritten entries: ||post - pre|| / ||pre||
        double dk = 0, nk = 0, dv = 0, nv = 0;
        for (int n = 0; n < rec.nS; n++)
            for (int i = 0; i < c.C; i++) {
                float pk = u[(long)n * 2 * c.C + i], pv = u[(long)n * 2 * c.C + c.C + i];
                float qk = a.k[(long)sel[n] * c.C + i], qv = a.v[(long)sel[n] * c.C + i];
                dk += (qk - pk) * (qk - pk); nk += pk * pk; dv += (qv - pv) * (qv - pv); nv += pv * pv;
            }
        fprintf(D.trace, "  layer %d gate %.3f |dK|/|K| %.4f |dV|/|V| %.4f recalled:", l,
                sigmoidf(D.M->w.proc[l].gate[0]), sqrt(dk / (nk + 1e-30)), sqrt(dv / (nv + 1e-30)));
        int nrec = rec.nS - (e - s);
        if (c.periodic) nrec = 0;
        for (int n = 0; n < nrec; n++) {
            float sc = attention_mass(a.att, s, e, 0, sel[n], 1, c.NH, S.T);   // recomputed: B = 1
            fprintf(D.trace, " %d'%s'(%.3f)", sel[n], token_str(S.tokens[sel[n]]).c_str(), sc);
        }
        fprintf(D.trace, "%s\n", c.periodic ? " (periodic: the whole cache)" : "");
    }
}

// =============================================================================================
// The batched decoder: B sequences decode in one pass, lock-step by position.
// Row t*B+b of its run state holds sequence b's token at position t (the layout training uses),
// so one backbone_forward over positions [s,e) runs every sequence and each matmul sees (e-s)*B
// rows. Every op is per row or per (sequence, head), and every matmul output is one fma chain over
// k in a fixed order whatever the number of rows (tensor.hpp), so each sequence gets the same bits
// as alone in a Decoder (a test checks tokens and logits with tolerance 0).
// - At each step all sequences are at the same position t. Sequence b's token at t is forced (its
//   prompt, the PAUSE tokens a pause model gets after each newline) or its own greedy choice from
//   its logits at t-1; prompts of different lengths are fine.
// - A finished sequence ('$', or the context full) leaves the batch: the others move down to
//   fill its slot and the row stride B shrinks (batch_compact). The run state is carved for
//   B_cap sequences, and buffers sized in whole rows of B_cap hold any B <= B_cap.
// - The processor: the sequences whose token at t is a boundary are rewritten before reading it,
//   each on its own segment [seg_start_b, t). Those that share a segment start fire together
//   through the same bottleneck_step: in place when they are the whole batch (with examples of
//   one layout, as in bt eval, nearly always), else gathered into a sub-batch G.
// - Not batched: eviction (each sequence compacts its cache at its own newlines, so slots part
//   from positions and lock-step cannot hold) and --device cuda; both keep one Decoder per
//   sequence (evaluate, bench_decode), as does --trace (bt generate).
// =============================================================================================
struct BatchDecoder {
    const Model* M = nullptr;
    RunState S;                   // B_cap sequences, T = max_seq_len, no gradients. S.B: the
                                  // sequences decoding now (the row stride); S.n_tok: positions fed
    int B_cap = 0;
    bool use_proc = false;
    std::vector<int> seg_start;   // (B_cap) first position of each sequence's current segment
    std::vector<char> fires;      // (B_cap) scratch: does sequence b fire before this position
    std::vector<int> group;       // (B_cap) scratch: the sequences of one firing group, or of a compaction
    // a firing group of n < B sequences is gathered into G at stride n; G is carved for G_cap
    // sequences, which grows in powers of 2
    RunState G;
    int G_cap = 0;
    std::vector<float> wt_mem;    // (n_params) the model's matrices transposed, as a Decoder keeps them
    Weights wt;
};

static void batch_init(BatchDecoder& BD, const Model& M, int B) {
    if (g_device) INTERNAL("the batched decoder runs on the CPU; --device cuda decodes with one Decoder per sequence");
    BD.M = &M;
    run_state_build(BD.S, M.cfg, M.cfg.T, B, false);
    BD.B_cap = B;
    BD.use_proc = M.cfg.dp > 0;
    BD.seg_start.assign(B, 0);
    BD.fires.assign(B, 0);
    BD.group.assign(B, 0);
    transpose_weights(M, BD.wt_mem, BD.wt);
    BD.S.wt = &BD.wt;
}

// the row stride of S becomes B: row r is position r / B (RoPE)
static void batch_set_stride(RunState& S, int B) {
    S.B = B;
    for (long r = 0; r < (long)S.T * B; r++) S.h_pos[r] = (int)(r / B);   // on the CPU h_pos is pos
}
// start n <= B_cap empty sequences
static void batch_reset(BatchDecoder& BD, int n) {
    if (n > BD.B_cap) INTERNAL("%d sequences for a batched decoder of %d", n, BD.B_cap);
    batch_set_stride(BD.S, n);
    BD.S.n_tok = 0;
    std::fill(BD.seg_start.begin(), BD.seg_start.end(), 0);
}

// Drop the sequences with drop[b] set: the others keep their order in slots 0..B'-1 and the row
// stride becomes B'. Moved, for positions [0,n_tok): what later steps read, K and V of every
// layer (the cache) and the attention rows from the earliest current segment on (the processor's
// select reads a segment's rows); and the tokens, for whoever looks. The other activations of
// earlier positions (their logits too) are never read again and stay behind. Row p*B'+j never
// lies after row p*B+b (j <= b, B' <= B), so moving in row order overwrites no row still to move.
static void batch_compact(BatchDecoder& BD, const char* drop) {
    RunState& S = BD.S;
    const Config& c = BD.M->cfg;
    int B = S.B, nb = 0, s0 = S.n_tok;
    int* from = BD.group.data();   // (B') the slot each new slot comes from
    for (int b = 0; b < B; b++)
        if (!drop[b]) { from[nb++] = b; s0 = std::min(s0, BD.seg_start[b]); }
    if (nb == B) return;
    long W_att = (long)c.NH * S.T;   // one row of att: (NH,T)
    for (int p = 0; p < S.n_tok; p++)
        for (int j = 0; j < nb; j++) {
            long dst = (long)p * nb + j, src = (long)p * B + from[j];
            for (int l = 0; l < c.L; l++) {
                memmove(S.acts[l].k + dst * c.C, S.acts[l].k + src * c.C, sizeof(float) * c.C);
                memmove(S.acts[l].v + dst * c.C, S.acts[l].v + src * c.C, sizeof(float) * c.C);
                if (p >= s0) memmove(S.acts[l].att + dst * W_att, S.acts[l].att + src * W_att, sizeof(float) * W_att);
            }
            S.h_tokens[dst] = S.h_tokens[src];
        }
    for (int j = 0; j < nb; j++) BD.seg_start[j] = BD.seg_start[from[j]];
    batch_set_stride(S, nb);
}

// rows [p0,p1) of one sequence from a (T,Bs,W) buffer into a (T,Bd,W) one:
// dst[p, bd, :] = src[p, bs, :]
static void copy_sequence_rows(float* dst, int Bd, int bd, const float* src, int Bs, int bs, int p0, int p1, long W) {
    for (int p = p0; p < p1; p++)
        memcpy(dst + ((long)p * Bd + bd) * W, src + ((long)p * Bs + bs) * W, sizeof(float) * W);
}

// K and V rows of the positions in sel (nS,n), between the batch's cache a (T,B,C) and a group's
// g (T,n,C): g[sel[r,j], j] = a[sel[r,j], group[j]] (to_group), or the other way
static void copy_selected_rows(BlockActs& g, BlockActs& a, const int* sel, int nS, int n, const int* group, int B,
                               int C, bool to_group) {
    size_t bytes = sizeof(float) * C;
    for (long r = 0; r < (long)nS * n; r++) {
        long gi = ((long)sel[r] * n + r % n) * C, ai = ((long)sel[r] * B + group[r % n]) * C;
        if (to_group) {
            memcpy(g.k + gi, a.k + ai, bytes);
            memcpy(g.v + gi, a.v + ai, bytes);
        } else {
            memcpy(a.k + ai, g.k + gi, bytes);
            memcpy(a.v + ai, g.v + gi, bytes);
        }
    }
}

// Fire the processor for the n sequences BD.group[0..n), all with segment [s,t). The whole batch
// is rewritten in place. Fewer are gathered into G: per layer, the segment's attention rows, then
// select_forward there (as bottleneck_step will do, with the same result) names the cache entries
// the firing reads and rewrites, and only those K, V rows are copied; bottleneck_step runs on G's
// n sequences, and the rows its undo log lists (the same entries) go back.
static void batch_fire_group(BatchDecoder& BD, int s, int t, int n) {
    RunState& S = BD.S;
    const Config& c = BD.M->cfg;
    if (n == S.B) {
        undo_clear(S);   // decoding never walks back: keep the log to one firing
        bottleneck_step(*BD.M, S, s, t);
        return;
    }
    if (n > BD.G_cap) {
        int cap = 1;
        while (cap < n) cap *= 2;
        BD.G_cap = std::min(cap, BD.B_cap);
        run_state_build(BD.G, c, c.T, BD.G_cap, false);
        BD.G.wt = &BD.wt;   // the processor's matmuls read the transposed weights too
    }
    RunState& G = BD.G;
    G.B = n;   // the stride of this group; bottleneck_step reads no positions from G.pos
    long W_att = (long)c.NH * S.T;   // one row of att: (NH,T)
    for (int l = 0; l < c.L; l++) {
        for (int j = 0; j < n; j++) copy_sequence_rows(G.acts[l].att, n, j, S.acts[l].att, S.B, BD.group[j], s, t, W_att);
        int nS = select_forward(G.pa.sel, G.pa.scores, G.acts[l].att, s, t, n, c.NH, S.T, c.k, c.periodic);
        copy_selected_rows(G.acts[l], S.acts[l], G.pa.sel, nS, n, BD.group.data(), S.B, c.C, true);
    }
    undo_clear(G);
    bottleneck_step(*BD.M, G, s, t);
    for (const UndoRecord& rec : G.undo)
        copy_selected_rows(G.acts[rec.layer], S.acts[rec.layer], undo_sel_of(G, rec), rec.nS, n, BD.group.data(), S.B,
                           c.C, false);
}

// The sequences with BD.fires[b] set, grouped by segment start: each group fires on [s,t) and
// its segments then start at t. Groups go in order of their first sequence.
static void batch_fire(BatchDecoder& BD, int t) {
    int B = BD.S.B;
    for (int b0 = 0; b0 < B; b0++) {
        if (!BD.fires[b0]) continue;
        int s = BD.seg_start[b0], n = 0;
        for (int b = b0; b < B; b++)
            if (BD.fires[b] && BD.seg_start[b] == s) { BD.group[n++] = b; BD.fires[b] = 0; }
        batch_fire_group(BD, s, t, n);
        for (int j = 0; j < n; j++) BD.seg_start[BD.group[j]] = t;
    }
}

// Append n positions to every sequence: toks (n,B), sequence b's token at position n_tok+i is
// toks[i*B+b]. As decoder_feed: the backbone runs chunk by chunk, and before a position whose
// token is a boundary for some sequences, those are rewritten on the segment they just ended.
static void batch_feed(BatchDecoder& BD, const int* toks, int n) {
    RunState& S = BD.S;
    const Config& c = BD.M->cfg;
    int B = S.B;
    if (S.n_tok + n > S.T) BAD_INPUT("the sequence would exceed the model's context of %d tokens", S.T);
    int chunk = S.n_tok;
    for (int i = 0; i < n; i++) {
        int t = S.n_tok;
        const int* tk = toks + (long)i * B;   // (B) the tokens at position t
        bool any = false;
        for (int b = 0; b < B; b++) {
            BD.fires[b] = BD.use_proc && is_boundary(c, t, tk[b]) && t > BD.seg_start[b];
            any = any || BD.fires[b];
        }
        if (any) {
            if (t > chunk) backbone_forward(*BD.M, S, chunk, t);
            batch_fire(BD, t);
            chunk = t;
        }
        copy_ints(S.h_tokens + (long)t * B, tk, B);
        S.n_tok++;
    }
    if (S.n_tok > chunk) backbone_forward(*BD.M, S, chunk, S.n_tok);
}

// sequence b's logits at the last position fed: (V)
static const float* batch_logits(const BatchDecoder& BD, int b) {
    return BD.S.logits + ((long)(BD.S.n_tok - 1) * BD.S.B + b) * BD.M->cfg.V;
}

// Greedy continuations of up to B_cap prompts at once; out[i] is what generate() writes for
// prompt i. seq[i] is its tokens: the prompt (PAUSE tokens inserted), then its choices and the
// pauses after each chosen newline; the first S.n_tok of them are in the cache. Slot b holds
// prompt id[b]. Each step, a sequence whose tokens are all fed chooses the next one (as generate
// does), the finished leave the batch, and every position that all the others know goes in at
// once (the prompts' common length first, then one). logits (tests): every position's logits of
// prompt i, (positions fed, V), are appended to (*logits)[i].
static std::vector<std::string> batch_generate(BatchDecoder& BD, const std::vector<std::string>& prompts,
                                               std::vector<std::vector<float>>* logits = nullptr) {
    RunState& S = BD.S;
    int T = S.T, V = BD.M->cfg.V, P = BD.M->cfg.pause, n = (int)prompts.size();
    std::vector<std::vector<int>> seq(n);
    std::vector<std::string> out(n);
    for (int i = 0; i < n; i++) {
        seq[i] = tokenize(insert_pauses(prompts[i], P), "prompt");
        if ((int)seq[i].size() > T) BAD_INPUT("the sequence would exceed the model's context of %d tokens", T);
    }
    if (logits) logits->assign(n, {});
    batch_reset(BD, n);
    std::vector<int> id(n), toks((long)T * n);   // (B) the prompt in each slot; (m,B) one feed's tokens
    std::vector<char> done(n);                   // (B) finished this step
    for (int i = 0; i < n; i++) id[i] = i;
    const int END = char_to_token('$');
    for (;;) {
        int B = S.B, t = S.n_tok, m = T - t, left = 0;
        for (int b = 0; b < B; b++) {
            std::vector<int>& sq = seq[id[b]];
            done[b] = 0;
            if ((int)sq.size() == t) {   // all fed: choose, unless the context is full
                if (t == T) { done[b] = 1; continue; }
                int tok = greedy_token(batch_logits(BD, b), V);
                out[id[b]] += token_to_char(tok);
                if (tok == END) { done[b] = 1; continue; }   // '$' is never fed
                sq.push_back(tok);
                if (tok == NEWLINE && P > 0 && t + 1 + P <= T) sq.insert(sq.end(), P, PAUSE);
            }
            m = std::min(m, (int)sq.size() - t);
            id[left++] = id[b];   // the slots that stay, in order (as batch_compact moves them)
        }
        batch_compact(BD, done.data());
        if (S.B == 0) break;
        for (int i = 0; i < m; i++)
            for (int b = 0; b < S.B; b++) toks[(long)i * S.B + b] = seq[id[b]][t + i];
        batch_feed(BD, toks.data(), m);
        for (int b = 0; logits && b < S.B; b++)
            for (int p = t; p < t + m; p++) {
                const float* z = S.logits + ((long)p * S.B + b) * V;
                (*logits)[id[b]].insert((*logits)[id[b]].end(), z, z + V);
            }
    }
    return out;
}

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

// Run work(i, thread, ctx) for i in [0,n) over `threads` OpenMP threads (dynamically: items take
// different times). An exception may not leave an OpenMP region: the first is kept and rethrown.
static void for_each_item(int n, int threads, void (*work)(int, int, void*), void* ctx) {
    std::string error;
    int error_code = 0;
    (void)threads;   // without OpenMP: one thread
    #pragma omp parallel num_threads(threads) if (threads > 1)
    {
        int thread = 0;
#ifdef _OPENMP
        thread = omp_get_thread_num();
#endif
        #pragma omp for schedule(dynamic)
        for (int i = 0; i < n; i++) {
            if (error_code) continue;
            try {
                work(i, thread, ctx);
            } catch (BtError& e) {
                #pragma omp critical
                if (!error_code) { error_code = e.code; error = e.what(); }
            } catch (std::exception& e) {
                #pragma omp critical
                if (!error_code) { error_code = 1; error = e.what(); }
            }
        }
    }
    if (error_code) throw BtError(error_code, error);
}
static int max_threads() {
#ifdef _OPENMP
    return omp_get_max_threads();
#else
    return 1;
#endif
}

// ---- one Decoder per thread, one example at a time: the path for eviction and the device (one
// thread there: kernels.cu is launched from one host thread at a time)
struct EachCtx { std::vector<Decoder>* D; const std::vector<std::string>* texts; std::vector<std::string>* outs; };
static void generate_one(int i, int thread, void* ctx) {
    EachCtx& x = *(EachCtx*)ctx;
    (*x.outs)[i] = generate((*x.D)[thread], question_of((*x.texts)[i]) + "\n");
}
static void generate_each(std::vector<std::string>& outs, const Model& M, const std::vector<std::string>& texts,
                          int evict) {
    int threads = g_device ? 1 : std::max(1, std::min(max_threads(), (int)texts.size()));
    std::vector<Decoder> D(threads);
    for (Decoder& d : D) decoder_init(d, M, evict);
    EachCtx x{&D, &texts, &outs};
    for_each_item((int)texts.size(), threads, generate_one, &x);
}

// ---- batched: the examples go, in order, into batches of B <= EVAL_BATCH, the last maybe
// shorter (100 on 2 threads: 16 of 6 and one of 4), for the threads to share; each thread
// decodes its batches with its own batched decoder, whose ops run on that thread alone. Not one
// batch across the threads: a decoding step's ops are small (6 rows x 128 x 128 is far below
// PAR_MIN), and a parallel region per op loses badly to another process on the same cores.
// 6 sequences: bt eval's chain sets (100 per size, sizes 2..16) on 2 threads took 2.25-2.36 s
// and 1.60-1.68 s in batches of 6 (a trained model with a processor, and its vanilla backbone),
// 2.5-2.6 s and 1.8 s in batches of 4, 8 or 12, and 3.1-3.2 s and 2.3 s one sequence at a
// time: more rows per matmul pay less than a batch's cache (B x the positions written so far,
// every layer) costs once it no longer stays close to the core.
static const int EVAL_BATCH = 6;

// The batched decoders of evaluate, one per thread. bt eval keeps them across its sizes: a run
// state is about 16 MB per sequence (max_seq_len 256), and building one costs about as much as
// decoding a small size. Reused, they take the model's weights again (it may have been trained).
struct EvalDecoders {
    int B = 0;                            // sequences per decoder
    Config cfg;                           // the config they were built for
    std::vector<BatchDecoder> per_thread;
};

struct BatchCtx {
    EvalDecoders* E; const std::vector<std::string>* texts; std::vector<std::string>* outs; int B;
};
static void generate_batch(int i, int thread, void* ctx) {
    BatchCtx& x = *(BatchCtx*)ctx;
    int n = (int)x.texts->size(), i0 = i * x.B, i1 = std::min(n, i0 + x.B);
    std::vector<std::string> prompts;
    for (int j = i0; j < i1; j++) prompts.push_back(question_of((*x.texts)[j]) + "\n");
    std::vector<std::string> got = batch_generate(x.E->per_thread[thread], prompts);
    for (int j = i0; j < i1; j++) (*x.outs)[j] = got[j - i0];
}
// n examples into batches: B sequences each (at most EVAL_BATCH, and at least one batch per
// thread), decoded by `threads` decoders; returns the number of batches
static int eval_batches(int n, int* B, int* threads) {
    int th = std::max(1, std::min(max_threads(), n));
    int n_batches = std::max(th, (n + EVAL_BATCH - 1) / EVAL_BATCH);
    *B = (n + n_batches - 1) / n_batches;
    n_batches = (n + *B - 1) / *B;
    *threads = std::min(th, n_batches);
    return n_batches;
}

static void generate_batched(std::vector<std::string>& outs, const Model& M, const std::vector<std::string>& texts,
                             EvalDecoders* keep = nullptr) {
    int n = (int)texts.size();
    if (n == 0) return;
    int B = 0, threads = 0, n_batches = eval_batches(n, &B, &threads);
    EvalDecoders fresh;
    EvalDecoders& E = keep ? *keep : fresh;
    // Config is plain ints and floats: memcmp compares every field
    bool reuse = E.B == B && (int)E.per_thread.size() >= threads && memcmp(&E.cfg, &M.cfg, sizeof(Config)) == 0;
    if (reuse) {
        for (BatchDecoder& BD : E.per_thread) { BD.M = &M; transpose_weights(M, BD.wt_mem, BD.wt); }
    } else {
        E.per_thread = std::vector<BatchDecoder>(threads);
        E.B = B;
        E.cfg = M.cfg;
        for (BatchDecoder& BD : E.per_thread) batch_init(BD, M, B);
    }
    BatchCtx x{&E, &texts, &outs, B};
    for_each_item(n_batches, threads, generate_batch, &x);
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

static std::vector<std::string> eval_set(Task task, int size, int count, uint64_t seed) {
    Rng r(seed * 1000003ull + size);
    std::vector<std::string> out;
    for (int i = 0; i < count; i++) out.push_back(gen_example(task, r, size, true));
    return out;
}

// =============================================================================================
// Checkpoints: safetensors. 8-byte little-endian header length N, N bytes of JSON
//   {"__metadata__": {"d_model": "128", ...}, "tok_emb": {"dtype": "F32", "shape": [48,128],
//    "data_offsets": [0, 24576]}, ...}
// then the raw data. bt writes float32 only and validates everything before trusting a file.
// =============================================================================================

// ---- a small JSON reader, enough for safetensors headers (objects, arrays, strings, numbers)
struct Json {
    enum Kind { NUL, NUM, STR, ARR, OBJ } kind = NUL;
    double num = 0;
    std::string str;
    std::vector<Json> arr;
    std::vector<std::pair<std::string, Json>> obj;
    const Json* get(const std::string& k) const {
        for (auto& kv : obj)
            if (kv.first == k) return &kv.second;
        return nullptr;
    }
};

struct JsonParser {
    const std::string& s;
    size_t i = 0;
    std::string where;
    [[noreturn]] void fail(const char* what) {
        BAD_INPUT("%s: bad JSON header at byte %zu: %s", where.c_str(), i, what);
    }
    void ws() { while (i < s.size() && (s[i] == ' ' || s[i] == '\n' || s[i] == '\t' || s[i] == '\r')) i++; }
    std::string string() {
        if (s[i] != '"') fail("expected a string");
        std::string out;
        for (i++; i < s.size() && s[i] != '"'; i++) {
            if (s[i] == '\\') {
                if (++i >= s.size()) break;
                char e = s[i];
                if (e == 'n') out += '\n'; else if (e == 't') out += '\t'; else if (e == 'u') {
                    if (i + 4 >= s.size()) fail("truncated \\u escape");
                    out += (char)strtol(s.substr(i + 1, 4).c_str(), nullptr, 16);
                    i += 4;
                } else out += e;
            } else out += s[i];
        }
        if (i >= s.size()) fail("unterminated string");
        i++;
        return out;
    }
    Json value(int depth) {
        if (depth > 16) fail("nested too deeply");
        ws();
        if (i >= s.size()) fail("unexpected end");
        Json j;
        char ch = s[i];
        if (ch == '{') {
            j.kind = Json::OBJ; i++; ws();
            if (i < s.size() && s[i] == '}') { i++; return j; }
            for (;;) {
                ws();
                if (i >= s.size()) fail("unexpected end in object");
                std::string k = string();
                ws();
                if (i >= s.size() || s[i] != ':') fail("expected ':'");
                i++;
                j.obj.push_back({k, value(depth + 1)});
                ws();
                if (i < s.size() && s[i] == ',') { i++; continue; }
                if (i < s.size() && s[i] == '}') { i++; return j; }
                fail("expected ',' or '}'");
            }
        } else if (ch == '[') {
            j.kind = Json::ARR; i++; ws();
            if (i < s.size() && s[i] == ']') { i++; return j; }
            for (;;) {
                j.arr.push_back(value(depth + 1));
                ws();
                if (i < s.size() && s[i] == ',') { i++; continue; }
                if (i < s.size() && s[i] == ']') { i++; return j; }
                fail("expected ',' or ']'");
            }
        } else if (ch == '"') {
            j.kind = Json::STR; j.str = string();
        } else if (ch == '-' || (ch >= '0' && ch <= '9')) {
            char* end;
            j.kind = Json::NUM; j.num = strtod(s.c_str() + i, &end);
            i = end - s.c_str();
        } else if (s.compare(i, 4, "null") == 0) {
            i += 4;
        } else if (s.compare(i, 4, "true") == 0 || s.compare(i, 5, "false") == 0) {   // read as 1 and 0
            j.kind = Json::NUM; j.num = s[i] == 't';
            i += s[i] == 't' ? 4 : 5;
        } else fail("unexpected character");
        return j;
    }
};

struct Tensor { std::vector<int> shape; std::vector<float> data; };
struct SafeFile {
    std::map<std::string, std::string> meta;
    std::map<std::string, Tensor> tensors;
};

// Every field is checked before it is trusted: header length against the file size, JSON,
// dtype, shapes, offsets inside the data and not overlapping. path only names the source in errors.
static SafeFile parse_safetensors(const std::string& bytes, const std::string& path) {
    if (bytes.size() < 8) BAD_INPUT("%s: %zu bytes is too short for a safetensors file", path.c_str(), bytes.size());
    uint64_t n = 0;
    for (int b = 7; b >= 0; b--) n = (n << 8) | (unsigned char)bytes[b];
    if (n > bytes.size() - 8)
        BAD_INPUT("%s: header length %llu runs past the end of the file (%zu bytes): not a safetensors file, or truncated", path.c_str(),
                  (unsigned long long)n, bytes.size());
    std::string header = bytes.substr(8, n);
    JsonParser jp{header, 0, path};
    Json root = jp.value(0);
    if (root.kind != Json::OBJ) BAD_INPUT("%s: the header is not a JSON object", path.c_str());
    size_t data0 = 8 + n, data_len = bytes.size() - data0;
    SafeFile out;
    std::vector<std::pair<uint64_t, uint64_t>> ranges;
    for (auto& kv : root.obj) {
        const std::string& name = kv.first;
        const Json& t = kv.second;
        if (name == "__metadata__") {
            if (t.kind != Json::OBJ) BAD_INPUT("%s: __metadata__ is not an object", path.c_str());
            for (auto& m : t.obj) {
                if (m.second.kind != Json::STR) BAD_INPUT("%s: metadata '%s' is not a string", path.c_str(), m.first.c_str());
                out.meta[m.first] = m.second.str;
            }
            continue;
        }
        const Json *dt = t.get("dtype"), *sh = t.get("shape"), *of = t.get("data_offsets");
        if (t.kind != Json::OBJ || !dt || !sh || !of || dt->kind != Json::STR || sh->kind != Json::ARR ||
            of->kind != Json::ARR || of->arr.size() != 2)
            BAD_INPUT("%s: tensor '%s' needs dtype, shape and data_offsets [begin, end]", path.c_str(), name.c_str());
        if (dt->str != "F32")
            BAD_INPUT("%s: tensor '%s' has dtype %s; bt reads F32 only", path.c_str(), name.c_str(), dt->str.c_str());
        Tensor T;
        uint64_t numel = 1;
        for (auto& d : sh->arr) {
            if (d.kind != Json::NUM || d.num < 0 || d.num > 1e9 || d.num != (double)(long)d.num)
                BAD_INPUT("%s: tensor '%s' has a bad dimension in its shape", path.c_str(), name.c_str());
            T.shape.push_back((int)d.num);
            numel *= (uint64_t)d.num;
            if (numel > data_len / 4)   // also stops the product from wrapping around 2^64
                BAD_INPUT("%s: tensor '%s' has a shape with more elements than the file's %zu data bytes hold", path.c_str(),
                          name.c_str(), data_len);
        }
        double b0 = of->arr[0].num, b1 = of->arr[1].num;
        if (of->arr[0].kind != Json::NUM || of->arr[1].kind != Json::NUM || !(b0 >= 0) || !(b1 >= b0) ||
            !(b1 <= (double)data_len) || b0 != (double)(uint64_t)b0 || b1 != (double)(uint64_t)b1)
            BAD_INPUT("%s: tensor '%s' has data_offsets [%.0f, %.0f] outside the %zu data bytes", path.c_str(),
                      name.c_str(), b0, b1, data_len);
        if ((uint64_t)(b1 - b0) != numel * 4)
            BAD_INPUT("%s: tensor '%s' holds %.0f bytes but its shape needs %llu", path.c_str(), name.c_str(), b1 - b0,
                      (unsigned long long)(numel * 4));
        ranges.push_back({(uint64_t)b0, (uint64_t)b1});
        T.data.resize(numel);
        if (numel) memcpy(T.data.data(), bytes.data() + data0 + (size_t)b0, numel * 4);
        out.tensors[name] = std::move(T);
    }
    std::sort(ranges.begin(), ranges.end());
    for (size_t i = 1; i < ranges.size(); i++)
        if (ranges[i].first < ranges[i - 1].second)
            BAD_INPUT("%s: two tensors overlap in the data section (bytes %llu..%llu)", path.c_str(),
                      (unsigned long long)ranges[i].first, (unsigned long long)ranges[i - 1].second);
    return out;
}

static SafeFile read_safetensors(const std::string& path) { return parse_safetensors(read_file(path, "checkpoint"), path); }

static std::string json_escape(const std::string& s) {
    std::string o;
    for (char ch : s) {
        if (ch == '"' || ch == '\\') o += '\\';
        o += ch;
    }
    return o;
}

// Written to path + ".tmp" and renamed, so a crash never leaves half a file.
static void write_file(const std::string& path, const std::string& text) {
    std::string tmp = path + ".tmp";
    FILE* f = fopen(tmp.c_str(), "wb");
    if (!f) BAD_INPUT("%s: cannot write (does the folder exist?)", tmp.c_str());
    bool ok = fwrite(text.data(), 1, text.size(), f) == text.size();
    ok = (fclose(f) == 0) && ok;
    if (!ok || rename(tmp.c_str(), path.c_str()) != 0) INTERNAL("%s: write failed (disk full?)", path.c_str());
}

struct OutTensor { std::string name; std::vector<int> shape; const float* data; };

// A safetensors file, written atomically by write_file.
static void write_safetensors(const std::string& path, std::vector<OutTensor> ts,
                              const std::map<std::string, std::string>& meta) {
    std::sort(ts.begin(), ts.end(), [](const OutTensor& a, const OutTensor& b) { return a.name < b.name; });
    std::string h = "{\"__metadata__\":{";
    bool first = true;
    for (auto& kv : meta) {
        h += strf("%s\"%s\":\"%s\"", first ? "" : ",", json_escape(kv.first).c_str(), json_escape(kv.second).c_str());
        first = false;
    }
    h += "}";
    uint64_t off = 0;
    for (auto& t : ts) {
        long n = 1;
        std::string shape;
        for (size_t i = 0; i < t.shape.size(); i++) { n *= t.shape[i]; shape += (i ? "," : "") + std::to_string(t.shape[i]); }
        h += strf(",\"%s\":{\"dtype\":\"F32\",\"shape\":[%s],\"data_offsets\":[%llu,%llu]}", json_escape(t.name).c_str(),
                  shape.c_str(), (unsigned long long)off, (unsigned long long)(off + 4 * n));
        off += 4 * n;
    }
    h += "}";
    while ((8 + h.size()) % 8) h += ' ';
    std::string bytes(8, '\0');
    for (int b = 0; b < 8; b++) bytes[b] = (char)(unsigned char)((uint64_t)h.size() >> (8 * b));
    bytes += h;
    for (auto& t : ts) {
        long n = 1;
        for (int d : t.shape) n *= d;
        bytes.append((const char*)t.data, sizeof(float) * n);
    }
    write_file(path, bytes);
}

// ---- model config <-> metadata: one table of the integer keys, with the ranges a loader accepts
struct ConfigKey { const char* key; int Config::*field; int lo, hi; bool proc; };
static const ConfigKey CONFIG_KEYS[] = {
    {"vocab_size", &Config::V, 1, 1 << 16, false},    {"d_model", &Config::C, 2, 1 << 14, false},
    {"n_layers", &Config::L, 1, 256, false},          {"n_heads", &Config::NH, 1, 1024, false},
    {"ffn_hidden", &Config::F, 1, 1 << 16, false},    {"max_seq_len", &Config::T, 2, 1 << 15, false},
    {"proc_width", &Config::dp, 1, 1 << 14, true},    {"proc_layers", &Config::np, 1, 64, true},
    {"proc_heads", &Config::nhp, 1, 1024, true},      {"proc_ffn_hidden", &Config::fp, 1, 1 << 16, true},
    {"k", &Config::k, 0, 64, true},
};

static std::map<std::string, std::string> config_meta(const Config& c) {
    std::map<std::string, std::string> m = {{"format", "bt"}, {"rope_theta", strf("%g", c.theta)},
                                            {"norm_eps", strf("%g", c.eps)}};
    for (auto& k : CONFIG_KEYS)
        if (!k.proc || c.dp > 0) m[k.key] = std::to_string(c.*k.field);
    if (c.dp > 0) m["schedule"] = c.periodic ? strf("periodic:%d", c.periodic) : "newline";
    if (c.pause > 0) m["pause"] = std::to_string(c.pause);
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
        if (!k.proc || proc) {
            double v = num(k.key, k.lo, k.hi);
            if (v != (int)v) BAD_INPUT("%s: metadata '%s' must be a whole number", path.c_str(), k.key);
            c.*k.field = (int)v;
        }
    c.theta = (float)num("rope_theta", 1, 1e9);
    c.eps = (float)num("norm_eps", 0, 1);
    if (!proc) c.dp = 0;
    else c.periodic = m.count("schedule") ? parse_schedule(m.at("schedule")) : 0;
    c.pause = m.count("pause") ? (int)num("pause", 0, 64) : 0;
    try { validate_config(c); } catch (BtError& e) { BAD_INPUT("%s: %s", path.c_str(), e.what()); }
    return c;
}

static void save_model(const Model& M, const std::string& path, std::map<std::string, std::string> extra = {}) {
    std::vector<OutTensor> ts;
    for (auto& p : M.table) ts.push_back({p.name, p.shape, M.params.data() + p.offset});
    auto meta = config_meta(M.cfg);
    for (auto& kv : extra) meta[kv.first] = kv.second;
    write_safetensors(path, ts, meta);
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
struct FlagSpec { const char* name; const char* def; const char* help; };
static const FlagSpec FLAGS[] = {
    {"task", "chain", "chain | add | var | mul: the synthetic task"},
    {"data", "", "train or evaluate on a text file of examples separated by blank lines"},
    {"ckpt", "", "checkpoint to read (.safetensors)"},
    {"out", "bt.safetensors", "checkpoint to write"},
    {"init", "", "start from this backbone checkpoint"},
    {"model", "vanilla", "vanilla | bt (backbone + Cache Processor) | pause | pause-frozen (PAUSE tokens after newlines)"},
    {"pause", "4", "PAUSE tokens after every newline (--model pause, pause-frozen)"},
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
    {"joint", "", "train backbone and processor together (from scratch without --init)"},
    {"log-every", "50", "print a progress line every N steps"},
    {"save-every", "100", "also write the checkpoint (and its .state) every N steps (0: only at the end)"},
    {"resume", "", "continue the run saved in this checkpoint and its .state.safetensors exactly"},
    {"sizes", "", "problem sizes to evaluate, A..B (default: training and OOD ranges)"},
    {"n", "100", "evaluation examples per size"},
    {"prompt", "", "question to continue (a newline is added if missing)"},
    {"trace", "", "print what every bottleneck step selects and changes"},
    {"text-file", "", "examples to score"},
    {"regime", "both", "experiment: v4 (frozen backbone) | v1 (end to end) | both"},
    {"seeds", "3", "experiment: seeds 1..S for every arm"},
    {"stage1", "300", "experiment v4: steps of the stage-1 backbone"},
    {"stage2", "300", "experiment v4: steps every arm gets on top of it"},
    {"arms", "", "experiment: only these arms, comma-separated (the controls always run)"},
    {"results", "results", "experiment, probe: folder for results/<task>/ (experiment runs are kept there and resumed)"},
    {"evict", "0", "H2O-style eviction: at each newline keep this many older cache entries (0: off)"},
    {"quick", "", "a short run (a smoke test, not for the figures)"},
    {"backbone", "", "probe: the processor-free model to compare with (default: --ckpt with its processor off)"},
    {"torch", "", "PyTorch's rows, JSON lines from tests/bench_torch.py (FILE[,FILE...]; make bench writes them)"},
    {"device", "cpu", "cpu | cuda: where the ops run (cuda: kernels.cu on the GPU, from make USE_CUDA=1)"},
};
static const char* BOOL_FLAGS[] = {"joint", "trace", "quick"};

struct Command { const char* name; const char* flags; const char* help; };
static const Command COMMANDS[] = {
    {"train", "task data out init model steps batch lr warmup wd clip seed d-model layers heads ffn max-seq-len "
              "proc-width proc-layers proc-heads proc-ffn k schedule bptt joint pause log-every save-every resume "
              "device",
     "train a model (vanilla backbone, or a Cache Processor on top with --model bt)"},
    {"eval", "ckpt task data sizes n seed evict device", "greedy decoding accuracy per problem size"},
    {"generate", "ckpt prompt trace device", "greedy continuation of a prompt"},
    {"score", "ckpt text-file device", "log-probability of every target token of the examples in a file"},
    {"experiment", "task regime seeds stage1 stage2 steps n d-model layers heads batch arms results",
     "every arm of DESIGN §7 on a task, several seeds: results/<task>/results.md and plots (resumable)"},
    {"probe", "ckpt backbone task sizes n seed results",
     "linear probes on cache entries before and after each rewrite, and update statistics (what a rewrite keeps)"},
    {"bench", "quick torch device",
     "tokens/s for training and decoding, matmul GFLOP/s, memory (beside PyTorch: make bench)"},
};

struct Args {
    std::string cmd;
    std::map<std::string, std::string> v;
    std::set<std::string> given;
    bool has(const std::string& k) const { return given.count(k) > 0; }
    std::string str(const std::string& k) const { return v.at(k); }
    double num(const std::string& k, double lo, double hi) const {
        char* end;
        const std::string& s = v.at(k);
        double x = strtod(s.c_str(), &end);
        if (s.empty() || *end != 0 || std::isnan(x)) BAD_INPUT("--%s '%s' is not a number (try bt %s --help)", k.c_str(), s.c_str(), cmd.c_str());
        if (x < lo || x > hi) BAD_INPUT("--%s %s is out of range [%g, %g] (try bt %s --help)", k.c_str(), s.c_str(), lo, hi, cmd.c_str());
        return x;
    }
    int integer(const std::string& k, int lo, int hi) const {
        double x = num(k, lo, hi);
        if (x != (int)x) BAD_INPUT("--%s must be a whole number, got %s", k.c_str(), v.at(k).c_str());
        return (int)x;
    }
};

static void print_usage(FILE* f) {
    fprintf(f, "usage: bt <command> [--flag value ...]     (bt <command> --help lists its flags)\n\ncommands:\n");
    for (auto& c : COMMANDS) fprintf(f, "  %-9s %s\n", c.name, c.help);
}

static void print_command_help(const Command& c) {
    printf("usage: bt %s [--flag value ...]\n%s\n\nflags (default in brackets):\n", c.name, c.help);
    std::stringstream ss(c.flags);
    std::string f;
    while (ss >> f)
        for (auto& fs : FLAGS)
            if (f == fs.name) printf("  --%-12s %s%s%s%s\n", fs.name, fs.help, fs.def[0] ? " [" : "", fs.def, fs.def[0] ? "]" : "");
}

// returns false when help was printed
static bool parse_args(Args& a, int argc, char** argv) {
    if (argc < 2) { print_usage(stderr); throw BtError(2, "no command given"); }
    a.cmd = argv[1];
    if (a.cmd == "--help" || a.cmd == "-h" || a.cmd == "help") { print_usage(stdout); return false; }
    const Command* cmd = nullptr;
    for (auto& c : COMMANDS)
        if (a.cmd == c.name) cmd = &c;
    if (!cmd) BAD_INPUT("unknown command '%s' (commands: train, eval, generate, score, experiment, probe, bench; try bt --help)", a.cmd.c_str());
    std::set<std::string> allowed;
    std::stringstream ss(cmd->flags);
    std::string f;
    while (ss >> f) allowed.insert(f);
    for (auto& fs : FLAGS) a.v[fs.name] = fs.def;
    for (int i = 2; i < argc; i++) {
        std::string s = argv[i];
        if (s == "--help" || s == "-h") { print_command_help(*cmd); return false; }
        if (s.rfind("--", 0) != 0) BAD_INPUT("unexpected argument '%s' (flags look like --name value)", s.c_str());
        std::string name = s.substr(2);
        if (!allowed.count(name))
            BAD_INPUT("bt %s has no option --%s (try bt %s --help)", a.cmd.c_str(), name.c_str(), a.cmd.c_str());
        bool boolean = false;
        for (auto* b : BOOL_FLAGS) boolean |= name == b;
        if (boolean) { a.v[name] = "1"; a.given.insert(name); continue; }
        if (i + 1 >= argc) BAD_INPUT("--%s needs a value (try bt %s --help)", name.c_str(), a.cmd.c_str());
        a.v[name] = argv[++i];
        a.given.insert(name);
    }
    return true;
}

// the GPU's name (the emulation in tests/cuda_on_cpu.hpp names itself)
static std::string device_name() {
#ifdef BT_DEVICE
    cudaDeviceProp prop;
    cudaCheck(cudaGetDeviceProperties(&prop, 0));
    return prop.name;
#else
    return "none";
#endif
}

// --device cpu | cuda: cuda sends every op through kernels.cu (OP) and puts the buffers on the GPU.
// Call before any model or run state is built.
static void use_device(const Args& a) {
    std::string d = a.str("device");
    if (d == "cpu") return;
    if (d != "cuda") BAD_INPUT("--device must be cpu or cuda, got '%s'", d.c_str());
#ifndef BT_DEVICE
    BAD_INPUT("this bt was built without CUDA: --device cuda needs a build with make USE_CUDA=1");
#else
    int n = 0;
    cudaError_t err = cudaGetDeviceCount(&n);
    if (err != cudaSuccess || n == 0)
        BAD_INPUT("--device cuda: no CUDA GPU found (%s); use --device cpu",
                  err != cudaSuccess ? cudaGetErrorString(err) : "0 devices");
    g_device = true;
#endif
}

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
// the model's config for bt train: from --init (its backbone, and its processor if it has one)
// or from the size flags; processor flags override, and need --model bt
static Config train_config(const Args& a, bool is_bt, bool is_pause, SafeFile* init) {
    Config c;
    if (a.has("init")) {
        for (const char* f : {"d-model", "layers", "heads", "ffn", "max-seq-len"})
            if (a.has(f)) BAD_INPUT("--%s cannot change a model that comes from --init", f);
        *init = read_safetensors(a.str("init"));
        c = config_from_meta(init->meta, a.str("init"));
    } else {
        c.C = a.integer("d-model", 2, 1 << 14); c.L = a.integer("layers", 1, 256); c.NH = a.integer("heads", 1, 1024);
        c.F = a.integer("ffn", 0, 1 << 16); if (c.F == 0) c.F = 3 * c.C;
        c.T = a.integer("max-seq-len", 2, 1 << 15);
    }
    if (is_pause) c.pause = a.integer("pause", 1, 64);
    else if (a.has("pause")) BAD_INPUT("--pause needs --model pause or pause-frozen");
    if (!is_bt) {
        for (const char* f : {"proc-width", "proc-layers", "proc-heads", "proc-ffn", "k", "schedule", "bptt", "joint"})
            if (a.has(f)) BAD_INPUT("--%s is a processor flag: it needs --model bt", f);
        c.dp = 0;
        return c;
    }
    bool keep = c.dp > 0;   // keep an --init processor's settings unless a flag says otherwise
    if (!keep || a.has("proc-width")) { c.dp = a.integer("proc-width", 0, 1 << 14); if (c.dp == 0) c.dp = c.C / 2; }
    if (!keep || a.has("proc-layers")) c.np = a.integer("proc-layers", 1, 64);
    if (!keep || a.has("proc-heads")) c.nhp = a.integer("proc-heads", 1, 1024);
    if (!keep || a.has("proc-ffn")) { c.fp = a.integer("proc-ffn", 0, 1 << 16); if (c.fp == 0) c.fp = 3 * c.dp; }
    if (!keep || a.has("k")) c.k = a.integer("k", 0, 64);
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
    if (mode.use_proc)
        printf("  processor width %d, blocks %d, heads %d, ffn %d, k %d, schedule %s, bptt %s, backbone %s\n", c.dp,
               c.np, c.nhp, c.fp, c.k, c.periodic ? strf("periodic:%d", c.periodic).c_str() : "newline",
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

// state first, then the checkpoint; each is written atomically (a temporary file, then rename)
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
    write_safetensors(state_path(R.out), ts, meta);
    save_model(M, R.out, {{"task", R.task}, {"step", std::to_string(R.step)}});
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
    std::string sp = state_path(ckpt);
    SafeFile f = read_safetensors(ckpt);
    if (config_meta(config_from_meta(f.meta, ckpt)) != config_meta(R.M.cfg))
        BAD_INPUT("%s: its config differs from the run saved in %s", ckpt.c_str(), sp.c_str());
    copy_tensors(R.M, f, ckpt, false);
    R.step = (int)meta_int(state, "step", 0, R.o.steps, sp);
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
    bool is_bt = model == "bt", is_pause = model == "pause" || model == "pause-frozen";
    if (!is_bt && !is_pause && model != "vanilla")
        BAD_INPUT("--model must be vanilla, bt, pause or pause-frozen, got '%s'", model.c_str());
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
    R.task = a.has("data") ? "file" : a.str("task");
    for (auto& f : a.given)
        if (f != "resume" && f != "log-every" && f != "save-every" && f != "out" && f != "device")
            R.flags[f] = a.str(f);   // (--device is not part of the run: it may resume elsewhere)

    SafeFile init;
    if (given.has("resume")) {   // the model's config comes from the checkpoint, not from --init
        SafeFile ck = read_safetensors(a.str("out"));
        model_build(R.M, config_from_meta(ck.meta, a.str("out")));
    } else {
        model_build(R.M, train_config(a, is_bt, is_pause, &init));
        model_init_random(R.M, seed);
        if (a.has("init")) copy_tensors(R.M, init, a.str("init"), true);   // a processor new to it keeps its init
    }
    R.mode.use_proc = is_bt;
    R.mode.train_backbone = !is_bt || a.has("joint");
    R.mode.bptt_step = bptt == "step";
    R.mode.pause_row_only = model == "pause-frozen";
    R.D = train_data(a, seed);
    R.D.pause = R.M.cfg.pause;
    int T = max_tokens(R.D);
    run_state_build(R.S, R.M.cfg, T, R.B, true);
    if (given.has("resume")) restore_run(R, state, a.str("out"));
    if (g_device) model_upload(R.M);   // --device cuda: weights, gradients and moments to the GPU
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

// the Args of `bt train <flags>`, for runs started from inside bt (experiment, bench, tests)
static Args train_args_from(std::vector<std::string> flags) {
    flags.insert(flags.begin(), {"bt", "train"});
    std::vector<char*> argv;
    for (auto& f : flags) argv.push_back((char*)f.c_str());
    Args a;
    parse_args(a, (int)argv.size(), argv.data());
    return a;
}

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
    if (evict && M.cfg.dp) BAD_INPUT("--evict is a baseline for a vanilla model; %s has a processor", a.str("ckpt").c_str());
    if (g_device) model_upload(M);
    printf("bt eval | %s | %s | processor %s%s%s\n", a.str("ckpt").c_str(), build_flags().c_str(), M.cfg.dp ? "on" : "none",
           M.cfg.pause ? strf(" | %d PAUSE after newlines", M.cfg.pause).c_str() : "",
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
static void cmd_generate(const Args& a) {
    if (!a.has("ckpt")) BAD_INPUT("bt generate needs --ckpt FILE");
    if (!a.has("prompt")) BAD_INPUT("bt generate needs --prompt TEXT (a question, e.g. --prompt '1*4-0+3')");
    use_device(a);
    if (a.has("trace") && g_device) BAD_INPUT("--trace reads the cache on the host: run it with --device cpu");
    Model M;
    load_model(M, a.str("ckpt"));
    if (g_device) model_upload(M);
    Decoder D;
    decoder_init(D, M);
    if (a.has("trace")) D.trace = stdout;
    if (a.has("trace") && M.cfg.dp == 0) printf("(this checkpoint has no processor: there is no bottleneck step to trace)\n");
    std::string p = a.str("prompt");
    // the shell gives a literal backslash-n: accept it as a newline
    for (size_t i; (i = p.find("\\n")) != std::string::npos;) p.replace(i, 2, "\n");
    if (p.empty() || p.back() != '\n') p += '\n';
    std::string out = generate(D, p);
    printf("%s%s\n", p.c_str(), out.c_str());
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
    mode.use_proc = M.cfg.dp > 0;
    printf("position\ttoken\tlogprob\n");
    double total = 0.0;
    for (auto& e : ex) {
        RunState S;
        std::string text = insert_pauses(e.text, M.cfg.pause);
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

// =============================================================================================
// bt experiment: every arm of DESIGN §7 on one task, trained on the same data stream with the same
// budget per seed, evaluated in distribution and at every OOD size. Each finished run is kept as
// results/<task>/runs/<run>.json (+ its checkpoint), so an interrupted experiment resumes where it
// stopped (a half-trained run resumes from its last checkpoint); then results.md and the plots.
//   v4 (frozen backbone): stage 1 trains a vanilla backbone for --stage1 steps; every arm then
//       gets --stage2 more steps from it: vanilla+extra, bt (k 4, bptt step and full), bt k 0,
//       pause P (the backbone fine-tuned with P PAUSE after newlines), pause-frozen (only PAUSE's row).
//   v1 (end to end from scratch, --steps each): vanilla, bt joint, bt joint periodic:16,
//       vanilla-large (about the parameters of backbone + processor), and evict B (H2O at decoding
//       on the v1 vanilla model; no training).
// =============================================================================================
struct ArmSpec {
    const char* regime;   // "v4" or "v1"
    const char* name;
    const char* flags;    // bt train flags beyond the shared ones
    int evict;            // > 0: no training, evaluate the v1 vanilla model with this budget
};
static const ArmSpec ARMS[] = {
    {"v4", "vanilla+extra", "--model vanilla", 0},
    {"v4", "bt", "--model bt --bptt step", 0},
    {"v4", "bt-full", "--model bt --bptt full", 0},
    {"v4", "bt-k0", "--model bt --k 0 --bptt step", 0},
    {"v4", "pause1", "--model pause --pause 1", 0},
    {"v4", "pause4", "--model pause --pause 4", 0},
    {"v4", "pause16", "--model pause --pause 16", 0},
    {"v4", "pause4-frozen", "--model pause-frozen --pause 4", 0},
    {"v1", "vanilla", "--model vanilla", 0},
    {"v1", "bt-joint", "--model bt --joint", 0},
    {"v1", "bt-joint-periodic16", "--model bt --joint --schedule periodic:16", 0},
    {"v1", "vanilla-large", "--model vanilla --d-model LARGE", 0},
    {"v1", "evict4", "", 4},
    {"v1", "evict8", "", 8},
    {"v1", "evict16", "", 16},
};

struct RunResult {   // one arm, one seed
    std::string regime, arm;
    int seed = 0, steps = 0;
    long params = 0;
    double seconds = 0, flops = 0;        // training time; forward FLOPs per token
    std::vector<float> loss;              // per step
    std::vector<int> sizes;
    std::vector<double> answer, lines, first_wrong;   // per size
    double id_answer = 0, ood_answer = 0, ood_lines = 0, ood_first_wrong = 0;
};

struct Experiment {
    Task task;
    std::string dir;                      // results/<task>
    std::vector<std::string> common;      // flags every training run shares (task, batch)
    std::vector<std::string> size;        // the model size (runs that start from --init take it from there)
    int stage1, stage2, steps, n_eval, large_width;
    std::vector<std::string> arms;        // which arms (names), empty: all
};

static std::vector<std::string> split_words(const std::string& s) {
    std::vector<std::string> out;
    std::stringstream ss(s);
    std::string w;
    while (ss >> w) out.push_back(w);
    return out;
}

// forward FLOPs per token of the model: every matmul (2 per multiply-add) and attention's two
// products over an average context of (T+1)/2; training is 3x (forward, then dx and dW)
static double flops_per_token(const Config& c, double T) {
    double mm = (double)c.L * (4.0 * c.C * c.C + 3.0 * c.C * c.F) + (double)c.C * c.V;
    double att = (double)c.L * 2.0 * c.C * (T + 1) / 2;
    return 2.0 * (mm + att);
}

// forward FLOPs per token of M on one example: the backbone (flops_per_token) plus, with a
// processor, its work at every boundary (W_in, its blocks, W_out over the rewritten entries)
static double model_flops(const Model& M, const std::string& text) {
    const Config& c = M.cfg;
    std::vector<int> toks = tokenize(insert_pauses(text, c.pause), "flops");
    double T = (double)toks.size(), total = T * flops_per_token(c, T);
    if (c.dp > 0) {
        int start = 0;
        for (int t = 1; t < (int)toks.size(); t++)
            if (is_boundary(c, t, toks[t])) {
                double nS = c.periodic ? t : (t - start) + std::min(c.k, start);
                double per_row = 2.0 * (2 * c.C * c.dp + c.np * (4.0 * c.dp * c.dp + 3.0 * c.dp * c.fp) + c.dp * 2 * c.C);
                total += c.L * (nS * per_row + c.np * 4.0 * nS * nS * c.dp / 2);
                start = t;
            }
    }
    return total / T;
}

static std::string run_name(const std::string& regime, const std::string& arm, int seed) {
    std::string a = arm;
    for (auto& ch : a) if (ch == '+') ch = 'p';
    return strf("%s-%s-s%d", regime.c_str(), a.c_str(), seed);
}

static std::string run_json(const RunResult& r) {
    auto arr = [](const auto& v, const char* fmt) {
        std::string s = "[";
        for (size_t i = 0; i < v.size(); i++) s += (i ? "," : "") + strf(fmt, (double)v[i]);
        return s + "]";
    };
    return strf("{\"regime\":\"%s\",\"arm\":\"%s\",\"seed\":%d,\"steps\":%d,\"params\":%ld,\"seconds\":%.2f,"
                "\"flops\":%.0f,\"id_answer\":%.4f,\"ood_answer\":%.4f,\"ood_lines\":%.4f,\"ood_first_wrong\":%.3f,",
                r.regime.c_str(), r.arm.c_str(), r.seed, r.steps, r.params, r.seconds, r.flops, r.id_answer,
                r.ood_answer, r.ood_lines, r.ood_first_wrong) +
           "\"sizes\":" + arr(r.sizes, "%.0f") + ",\"answer\":" + arr(r.answer, "%.4f") + ",\"lines\":" +
           arr(r.lines, "%.4f") + ",\"first_wrong\":" + arr(r.first_wrong, "%.3f") + ",\"loss\":" +
           arr(r.loss, "%.5f") + "}\n";
}

static bool read_run_json(const std::string& path, RunResult* r) {
    std::ifstream f(path);
    if (!f) return false;
    std::string s((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
    JsonParser jp{s, 0, path};
    Json j = jp.value(0);
    auto num = [&](const char* k) {
        const Json* v = j.get(k);
        if (!v || v->kind != Json::NUM) BAD_INPUT("%s: '%s' is missing (delete the file to rerun that arm)", path.c_str(), k);
        return v->num;
    };
    auto str = [&](const char* k) {
        const Json* v = j.get(k);
        return v && v->kind == Json::STR ? v->str : std::string();
    };
    auto arr = [&](const char* k, auto& out) {
        const Json* v = j.get(k);
        if (!v || v->kind != Json::ARR) BAD_INPUT("%s: '%s' is missing (delete the file to rerun that arm)", path.c_str(), k);
        out.clear();
        for (auto& x : v->arr) out.push_back(x.num);
    };
    r->regime = str("regime"); r->arm = str("arm");
    r->seed = (int)num("seed"); r->steps = (int)num("steps"); r->params = (long)num("params");
    r->seconds = num("seconds"); r->flops = num("flops");
    r->id_answer = num("id_answer"); r->ood_answer = num("ood_answer"); r->ood_lines = num("ood_lines");
    r->ood_first_wrong = num("ood_first_wrong");
    arr("sizes", r->sizes); arr("answer", r->answer); arr("lines", r->lines); arr("first_wrong", r->first_wrong);
    arr("loss", r->loss);
    return true;
}

// every size from the task's smallest training size to its largest OOD size, n examples each
static void evaluate_run(RunResult& r, const Model& M, Task task, int n, int evict) {
    const TaskInfo& ti = TASKS[task];
    EvalResult id, ood;
    for (int s = ti.train_lo; s <= ti.ood_hi; s++) {
        if (s > ti.train_hi && s < ti.ood_lo) continue;
        EvalResult e = evaluate(M, eval_set(task, s, n, 1), evict);
        r.sizes.push_back(s);
        r.answer.push_back((double)e.answer_ok / e.n);
        r.lines.push_back((double)e.lines_ok / e.n);
        r.first_wrong.push_back(e.first_wrong_n ? e.first_wrong_sum / e.first_wrong_n : 0.0);
        add_result(s <= ti.train_hi ? id : ood, e);
    }
    r.id_answer = (double)id.answer_ok / id.n;
    r.ood_answer = (double)ood.answer_ok / ood.n;
    r.ood_lines = (double)ood.lines_ok / ood.n;
    r.ood_first_wrong = ood.first_wrong_n ? ood.first_wrong_sum / ood.first_wrong_n : 0.0;
}

// Train (or resume, or reuse) one run; returns its result. init: a checkpoint to start from.
static RunResult experiment_run(const Experiment& X, const std::string& regime, const std::string& arm,
                                std::vector<std::string> flags, int steps, int seed, const std::string& init,
                                int evict, const std::string& evict_ckpt) {
    std::string base = X.dir + "/runs/" + run_name(regime, arm, seed);
    RunResult r;
    if (read_run_json(base + ".json", &r)) {
        if (r.steps != steps)
            BAD_INPUT("%s.json was trained for %d steps, this experiment asks %d: delete %s/runs to start over",
                      base.c_str(), r.steps, steps, X.dir.c_str());
        printf("  %-22s seed %d: done before (%s.json)\n", arm.c_str(), seed, base.c_str());
        return r;
    }
    r.regime = regime; r.arm = arm; r.seed = seed; r.steps = steps;
    // v1's vanilla with --steps equal to --stage1 is the very run v4's backbone was (same flags, seed and
    // data; training is deterministic): take its checkpoint and results instead of training it twice.
    std::string backbone = X.dir + "/runs/" + run_name("v4", "backbone", seed);
    RunResult b;
    if (regime == "v1" && arm == "vanilla" && read_run_json(backbone + ".json", &b) && b.steps == steps) {
        write_file(base + ".safetensors", read_file(backbone + ".safetensors", "v4 backbone checkpoint"));
        b.regime = regime; b.arm = arm;
        write_file(base + ".json", run_json(b));
        remove(state_path(base + ".safetensors").c_str());   // a half-trained copy of it, if one was left
        printf("  %-22s seed %d: the same run as v4's backbone (%s)\n", arm.c_str(), seed, backbone.c_str());
        return b;
    }
    Model M;
    if (evict > 0) {
        load_model(M, evict_ckpt);
    } else {
        std::vector<std::string> all = {"--seed", std::to_string(seed), "--steps", std::to_string(steps), "--out",
                                        base + ".safetensors", "--log-every", "1000000", "--save-every", "100"};
        all.insert(all.end(), X.common.begin(), X.common.end());
        all.insert(all.end(), flags.begin(), flags.end());
        if (!init.empty()) all.insert(all.end(), {"--init", init, "--lr", "0.001"});
        else if (std::find(flags.begin(), flags.end(), "--d-model") == flags.end()) all.insert(all.end(), X.size.begin(), X.size.end());
        else all.insert(all.end(), X.size.begin() + 2, X.size.end());   // vanilla-large sets its own width
        bool resume = std::ifstream(state_path(base + ".safetensors")).good();
        if (resume) all = {"--resume", base + ".safetensors", "--log-every", "1000000"};
        TrainRun R;
        R.quiet = true;
        train_setup(R, train_args_from(all));
        if (resume) printf("  %-22s seed %d: resuming at step %d\n", arm.c_str(), seed, R.step);
        double t0 = now_seconds();
        int chunk = std::max(1, steps / 10);
        while (R.step < steps) {
            train_steps(R, std::min(steps, R.step + chunk));
            double el = now_seconds() - t0;
            printf("\r  %-22s seed %d: step %5d/%d  loss %.4f  %s", arm.c_str(), seed, R.step, steps,
                   R.losses.back(), fmt_time(el).c_str());
            fflush(stdout);
        }
        save_run(R);
        r.seconds = now_seconds() - t0;
        r.loss = R.losses;
        M = R.M;
    }
    r.params = M.n_params;
    r.flops = model_flops(M, [&] { Rng g(3); return gen_example(X.task, g, TASKS[X.task].train_hi, true); }());
    evaluate_run(r, M, X.task, X.n_eval, evict);
    printf("\r  %-22s seed %d: %s, ID %.3f, OOD %.3f (all lines %.3f)                 \n", arm.c_str(), seed,
           evict ? "no training" : fmt_time(r.seconds).c_str(), r.id_answer, r.ood_answer, r.ood_lines);
    write_file(base + ".json", run_json(r));
    remove(state_path(base + ".safetensors").c_str());   // finished: the JSON and the checkpoint are what stays
    return r;
}

// ---- plots: small SVG files written by hand (no plotting dependency)
static const char* PALETTE[] = {"#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b",
                                "#e377c2", "#7f7f7f", "#bcbd22", "#17becf", "#000000", "#aec7e8"};

struct Plot {   // a frame with axes in data coordinates x0..x1, y0..y1
    std::string svg;
    double W = 640, H = 400, L = 60, R = 170, T = 30, B = 45, x0, x1, y0, y1;
    double px(double x) const { return L + (x - x0) / (x1 - x0) * (W - L - R); }
    double py(double y) const { return H - B - (y - y0) / (y1 - y0) * (H - T - B); }
};

static Plot plot_begin(const std::string& title, const std::string& xl, const std::string& yl, double x0, double x1,
                       double y0, double y1) {
    Plot p;
    p.x0 = x0; p.x1 = x1; p.y0 = y0; p.y1 = y1;
    p.svg = strf("<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"%.0f\" height=\"%.0f\" font-family=\"sans-serif\" "
                 "font-size=\"11\">\n<rect width=\"100%%\" height=\"100%%\" fill=\"white\"/>\n", p.W, p.H);
    p.svg += strf("<text x=\"%.0f\" y=\"18\" font-size=\"13\">%s</text>\n", p.L, title.c_str());
    p.svg += strf("<rect x=\"%.0f\" y=\"%.0f\" width=\"%.0f\" height=\"%.0f\" fill=\"none\" stroke=\"#444\"/>\n", p.L, p.T,
                  p.W - p.L - p.R, p.H - p.T - p.B);
    for (int i = 0; i <= 4; i++) {
        double x = x0 + (x1 - x0) * i / 4, y = y0 + (y1 - y0) * i / 4;
        p.svg += strf("<text x=\"%.1f\" y=\"%.0f\" text-anchor=\"middle\">%g</text>\n", p.px(x), p.H - p.B + 14,
                      std::round(x * 100) / 100);
        p.svg += strf("<text x=\"%.0f\" y=\"%.1f\" text-anchor=\"end\">%g</text>\n", p.L - 4, p.py(y) + 4,
                      std::round(y * 100) / 100);
    }
    p.svg += strf("<text x=\"%.0f\" y=\"%.0f\" text-anchor=\"middle\">%s</text>\n", (p.L + p.W - p.R) / 2, p.H - 8, xl.c_str());
    p.svg += strf("<text x=\"14\" y=\"%.0f\" transform=\"rotate(-90 14 %.0f)\" text-anchor=\"middle\">%s</text>\n",
                  (p.T + p.H - p.B) / 2, (p.T + p.H - p.B) / 2, yl.c_str());
    return p;
}

static void plot_series(Plot& p, const std::vector<double>& xs, const std::vector<double>& ys, int i,
                        const std::string& label, bool markers) {
    const char* col = PALETTE[i % 12];
    std::string pts;
    for (size_t j = 0; j < xs.size(); j++) pts += strf("%.1f,%.1f ", p.px(xs[j]), p.py(std::min(p.y1, std::max(p.y0, ys[j]))));
    p.svg += strf("<polyline points=\"%s\" fill=\"none\" stroke=\"%s\" stroke-width=\"1.5\"/>\n", pts.c_str(), col);
    if (markers)
        for (size_t j = 0; j < xs.size(); j++)
            p.svg += strf("<circle cx=\"%.1f\" cy=\"%.1f\" r=\"2.5\" fill=\"%s\"/>\n", p.px(xs[j]), p.py(ys[j]), col);
    double ly = p.T + 8 + 15 * i;
    p.svg += strf("<line x1=\"%.0f\" y1=\"%.0f\" x2=\"%.0f\" y2=\"%.0f\" stroke=\"%s\" stroke-width=\"2\"/>", p.W - p.R + 10,
                  ly, p.W - p.R + 28, ly, col);
    p.svg += strf("<text x=\"%.0f\" y=\"%.0f\">%s</text>\n", p.W - p.R + 32, ly + 4, label.c_str());
}

static void plot_end(Plot& p, const std::string& path) { write_file(path, p.svg + "</svg>\n"); }

// ---- tables over seeds
static double mean_of(const std::vector<double>& v) {
    double s = 0;
    for (double x : v) s += x;
    return v.empty() ? 0 : s / v.size();
}
static double sd_of(const std::vector<double>& v) {   // sample standard deviation (n - 1)
    if (v.size() < 2) return 0;
    double m = mean_of(v), s = 0;
    for (double x : v) s += (x - m) * (x - m);
    return sqrt(s / (v.size() - 1));
}
static std::string pm(const std::vector<double>& v, const char* fmt = "%.3f") {
    if (v.empty()) return "-";
    return v.size() < 2 ? strf(fmt, mean_of(v)) : strf(fmt, mean_of(v)) + " ± " + strf(fmt[1] == '+' ? "%.3f" : fmt, sd_of(v));
}

// Which earlier positions each layer reconsolidated at each boundary, for one OOD example decoded
// by a model with a processor: one panel per layer, a row per boundary, a column per position;
// grey = the line being consolidated, dark = an older entry recalled (top-k).
static void plot_reconsolidation(const Model& M, Task task, const std::string& title, const std::string& path) {
    Rng g(11);
    std::string ex = gen_example(task, g, TASKS[task].ood_lo, true);
    Decoder D;
    decoder_init(D, M);
    std::string out = generate(D, question_of(ex) + "\n");
    const Config& c = M.cfg;
    int n = D.S.n_tok, nb = (int)D.S.undo.size() / c.L;
    double cell = std::max(2.0, std::min(8.0, 900.0 / (c.L * (n + 4)))), pw = cell * (n + 4);
    double W = 20 + c.L * pw, H = 70 + cell * std::max(nb, 1) + 20;
    std::string s = strf("<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"%.0f\" height=\"%.0f\" font-family=\"sans-serif\" "
                         "font-size=\"11\">\n<rect width=\"100%%\" height=\"100%%\" fill=\"white\"/>\n", W, H);
    s += strf("<text x=\"10\" y=\"16\" font-size=\"13\">%s</text>\n", title.c_str());
    std::string q = question_of(ex);
    s += strf("<text x=\"10\" y=\"32\">question %s (size %d); rows: boundaries (one per generated line), columns: "
              "positions; grey: the line consolidated, dark: older entries recalled</text>\n", q.c_str(), TASKS[task].ood_lo);
    for (int l = 0; l < c.L; l++) {
        double x0 = 10 + l * pw, y0 = 50;
        s += strf("<text x=\"%.0f\" y=\"%.0f\">layer %d</text>\n", x0, y0 - 4, l);
        s += strf("<rect x=\"%.1f\" y=\"%.1f\" width=\"%.1f\" height=\"%.1f\" fill=\"none\" stroke=\"#ccc\"/>\n", x0, y0,
                  cell * n, cell * nb);
        for (int j = 0; j < nb; j++) {
            const UndoRecord& rec = D.S.undo[(size_t)j * c.L + l];
            const int* sel = D.S.undo_sel.data() + rec.sel_off;
            int nrec = c.periodic ? 0 : rec.nS - (rec.e - rec.s);
            for (int t = rec.s; t < rec.e; t++)
                s += strf("<rect x=\"%.1f\" y=\"%.1f\" width=\"%.1f\" height=\"%.1f\" fill=\"#ddd\"/>\n", x0 + cell * t,
                          y0 + cell * j, cell, cell);
            for (int i = 0; i < nrec; i++)
                s += strf("<rect x=\"%.1f\" y=\"%.1f\" width=\"%.1f\" height=\"%.1f\" fill=\"#222\"/>\n",
                          x0 + cell * sel[i], y0 + cell * j, cell, cell);
        }
    }
    write_file(path, s + "</svg>\n");
}

// results.md and the plots of one regime
static std::string regime_report(const Experiment& X, const std::string& regime, const std::vector<RunResult>& all,
                                 const std::string& control) {
    std::vector<std::string> arms;
    for (auto& r : all)
        if (r.regime == regime && std::find(arms.begin(), arms.end(), r.arm) == arms.end()) arms.push_back(r.arm);
    if (arms.empty()) return "";
    auto runs_of = [&](const std::string& arm) {
        std::vector<const RunResult*> v;
        for (auto& r : all)
            if (r.regime == regime && r.arm == arm) v.push_back(&r);
        return v;
    };
    auto control_of = [&](int seed) -> const RunResult* {
        for (auto* r : runs_of(control))
            if (r->seed == seed) return r;
        return nullptr;
    };
    const TaskInfo& ti = TASKS[X.task];
    std::string md = strf("\n| arm | params | steps | train time | fwd MFLOP/token | ID answer | OOD answer | OOD all-lines "
                          "| OOD first wrong line | ΔID vs %s | ΔOOD vs %s |\n|---|---|---|---|---|---|---|---|---|---|---|\n",
                          control.c_str(), control.c_str());
    for (auto& arm : arms) {
        std::vector<double> id, ood, lines, fw, t, did, dood;
        const RunResult* any = nullptr;
        for (auto* r : runs_of(arm)) {
            any = r;
            id.push_back(r->id_answer); ood.push_back(r->ood_answer); lines.push_back(r->ood_lines);
            fw.push_back(r->ood_first_wrong); t.push_back(r->seconds);
            if (const RunResult* c = control_of(r->seed)) {
                did.push_back(r->id_answer - c->id_answer);
                dood.push_back(r->ood_answer - c->ood_answer);
            }
        }
        bool is_control = arm == control;
        md += strf("| %s | %ld | %d | %s | %.3f | %s | %s | %s | %s | %s | %s |\n", arm.c_str(), any->params, any->steps,
                   any->loss.empty() ? "-" : fmt_time(mean_of(t)).c_str(), any->flops / 1e6, pm(id).c_str(), pm(ood).c_str(), pm(lines).c_str(),
                   pm(fw, "%.1f").c_str(), is_control || did.empty() ? "-" : pm(did, "%+.3f").c_str(),
                   is_control || dood.empty() ? "-" : pm(dood, "%+.3f").c_str());
    }
    // accuracy per size
    const RunResult* first = runs_of(arms[0])[0];
    md += "\nAnswer accuracy per problem size (mean over seeds; sizes " + strf("%d..%d", ti.train_lo, ti.train_hi) +
          " are in distribution):\n\n| arm |";
    for (int s : first->sizes) md += strf(" %d |", s);
    md += "\n|---|";
    for (size_t i = 0; i < first->sizes.size(); i++) md += "---|";
    md += "\n";
    Plot acc = plot_begin(strf("%s, %s: answer accuracy by problem size (training sizes shaded)", TASKS[X.task].name,
                               regime.c_str()), "problem size", "answer accuracy", first->sizes.front(),
                          first->sizes.back(), 0, 1);
    acc.svg += strf("<rect x=\"%.1f\" y=\"%.0f\" width=\"%.1f\" height=\"%.0f\" fill=\"#000\" fill-opacity=\"0.07\"/>\n",
                    acc.px(ti.train_lo), acc.T, acc.px(ti.train_hi) - acc.px(ti.train_lo), acc.H - acc.T - acc.B);
    double max_steps = 1;
    for (auto& arm : arms) max_steps = std::max(max_steps, (double)runs_of(arm)[0]->loss.size());
    std::vector<std::vector<double>> loss_x(arms.size()), loss_y(arms.size());
    double max_loss = 0.1;
    for (size_t ai = 0; ai < arms.size(); ai++) {
        auto runs = runs_of(arms[ai]);
        std::vector<double> xs, ys;
        md += "| " + arms[ai] + " |";
        for (size_t i = 0; i < first->sizes.size(); i++) {
            std::vector<double> v;
            for (auto* r : runs)
                if (i < r->answer.size()) v.push_back(r->answer[i]);
            md += strf(" %.2f |", mean_of(v));
            xs.push_back(first->sizes[i]);
            ys.push_back(mean_of(v));
        }
        md += "\n";
        plot_series(acc, xs, ys, (int)ai, arms[ai], true);
        size_t n = runs[0]->loss.size();
        if (n == 0) continue;
        int win = std::max(1, (int)n / 50);
        std::vector<double> lx, ly;
        for (size_t t = 0; t < n; t += std::max(1, win / 2)) {
            double acc_l = 0;
            int cnt = 0;
            for (auto* r : runs)
                for (size_t u = t; u < std::min(n, t + win) && u < r->loss.size(); u++) { acc_l += r->loss[u]; cnt++; }
            lx.push_back((double)t);
            ly.push_back(acc_l / std::max(cnt, 1));
            if (t >= n / 20) max_loss = std::max(max_loss, ly.back());   // the first 5% would squash the rest
        }
        loss_x[ai] = lx; loss_y[ai] = ly;
    }
    Plot loss = plot_begin(strf("%s, %s: training loss (mean over seeds, smoothed)", TASKS[X.task].name, regime.c_str()),
                           "step", "loss", 0, max_steps, 0, max_loss);
    for (size_t ai = 0; ai < arms.size(); ai++)
        if (!loss_x[ai].empty()) plot_series(loss, loss_x[ai], loss_y[ai], (int)ai, arms[ai], false);
    plot_end(acc, X.dir + "/accuracy_" + regime + ".svg");
    plot_end(loss, X.dir + "/loss_" + regime + ".svg");
    md += strf("\n![accuracy by size](accuracy_%s.svg) ![loss](loss_%s.svg)\n", regime.c_str(), regime.c_str());
    return md;
}

// the width of vanilla-large: the smallest d_model (a multiple of 2 x heads) whose vanilla model
// has at least as many parameters as backbone + processor
static int large_width(const Config& base) {
    Config bt = base;
    bt.dp = base.C / 2; bt.np = 1; bt.nhp = 4; bt.fp = 3 * bt.dp;
    Weights w;
    long want = layout_params(bt, &w, nullptr, nullptr);
    for (int C = base.C;; C += 2 * base.NH) {
        Config v = base;
        v.C = C; v.F = 3 * C;
        if (layout_params(v, &w, nullptr, nullptr) >= want) return C;
    }
}

static void cmd_experiment(const Args& a) {
    Experiment X;
    X.task = parse_task(a.str("task"));
    std::string regime = a.str("regime");
    if (regime != "v4" && regime != "v1" && regime != "both") BAD_INPUT("--regime must be v4, v1 or both, got '%s'", regime.c_str());
    int seeds = a.integer("seeds", 1, 100);
    X.stage1 = a.integer("stage1", 1, 10000000);
    X.stage2 = a.integer("stage2", 1, 10000000);
    X.steps = a.integer("steps", 1, 10000000);
    X.n_eval = a.integer("n", 1, 100000);
    X.dir = a.str("results") + "/" + TASKS[X.task].name;
    Config base;
    base.C = a.integer("d-model", 2, 1 << 14); base.L = a.integer("layers", 1, 256); base.NH = a.integer("heads", 1, 1024);
    base.F = 3 * base.C;
    validate_config(base);
    X.large_width = large_width(base);
    X.common = {"--task", TASKS[X.task].name, "--batch", a.str("batch")};
    X.size = {"--d-model", std::to_string(base.C), "--layers", std::to_string(base.L), "--heads", std::to_string(base.NH)};
    a.integer("batch", 1, 100000);
    std::set<std::string> only;
    if (a.has("arms")) {
        std::stringstream ss(a.str("arms"));
        std::string w;
        while (std::getline(ss, w, ',')) {
            bool known = false;
            for (auto& arm : ARMS) known |= w == arm.name;
            if (!known) BAD_INPUT("unknown arm '%s' (see bt experiment --help)", w.c_str());
            only.insert(w);
        }
    }
    std::filesystem::create_directories(X.dir + "/runs");
    bool v4 = regime != "v1", v1 = regime != "v4";
    printf("bt experiment | %s | %s | regime %s | seeds %d\n", TASKS[X.task].name, build_flags().c_str(), regime.c_str(), seeds);
    printf("  model d_model %d, layers %d, heads %d, batch %s (vanilla-large: d_model %d); v4: stage 1 %d steps, "
           "stage 2 %d; v1: %d steps; eval %d per size\n", base.C, base.L, base.NH, a.str("batch").c_str(),
           X.large_width, X.stage1, X.stage2, X.steps, X.n_eval);
    // the plan: every run in order, with a rough cost (vanilla steps) for the ETA
    struct Job { std::string regime, arm, init, evict_ckpt; std::vector<std::string> flags; int steps, seed, evict; double cost; };
    std::vector<Job> jobs;
    auto cost_of = [](const std::string& flags, int steps) {
        double f = flags.find("--model bt") != std::string::npos ? 2.5 : 1.0;
        size_t p = flags.find("--pause ");
        if (p != std::string::npos) f += atoi(flags.c_str() + p + 8) / 8.0;   // P tokens after every ~8-token line
        if (flags.find("--d-model") != std::string::npos) f = 1.5;
        return f * steps + 30;                                                // + evaluation
    };
    for (int seed = 1; seed <= seeds; seed++) {
        std::string init = X.dir + "/runs/" + run_name("v4", "backbone", seed) + ".safetensors";
        std::string vanilla = X.dir + "/runs/" + run_name("v1", "vanilla", seed) + ".safetensors";
        if (v4) jobs.push_back({"v4", "backbone", "", "", {"--model", "vanilla"}, X.stage1, seed, 0, cost_of("", X.stage1)});
        for (auto& arm : ARMS) {
            std::string r = arm.regime, name = arm.name, flags = arm.flags;
            bool control = name == "vanilla+extra" || name == "vanilla";   // the controls always run
            if ((r == "v4" && !v4) || (r == "v1" && !v1) || !(only.empty() || only.count(name) || control)) continue;
            size_t at = flags.find("LARGE");
            if (at != std::string::npos) flags.replace(at, 5, std::to_string(X.large_width));
            int steps = r == "v4" ? X.stage2 : X.steps;
            jobs.push_back({r, name, r == "v4" ? init : "", vanilla, split_words(flags), steps, seed, arm.evict,
                            arm.evict ? 30.0 : cost_of(flags, steps)});
        }
    }
    double total = 0, done = 0;
    for (auto& j : jobs) total += j.cost;
    double t0 = now_seconds();
    std::vector<RunResult> all;
    for (size_t i = 0; i < jobs.size(); i++) {
        const Job& j = jobs[i];
        double el = now_seconds() - t0;
        printf("[%zu/%zu] %s %s seed %d | elapsed %s | ETA %s\n", i + 1, jobs.size(), j.regime.c_str(), j.arm.c_str(),
               j.seed, fmt_time(el).c_str(), done > 0 && el > 5 ? fmt_time(el / done * (total - done)).c_str() : "-");
        fflush(stdout);
        double before = now_seconds();
        all.push_back(experiment_run(X, j.regime, j.arm, j.flags, j.steps, j.seed, j.init, j.evict, j.evict_ckpt));
        if (now_seconds() - before > 1) done += j.cost;   // runs found done before do not teach the ETA
        else total -= j.cost;
    }
    // the report
    double train_seconds = 0;   // v1's vanilla taken from v4's backbone (same steps) is counted once
    bool shared = v4 && v1 && X.stage1 == X.steps;
    for (auto& r : all) train_seconds += shared && r.regime == "v1" && r.arm == "vanilla" ? 0 : r.seconds;
    std::string md = strf("# %s: does the bottleneck help?\n\nWritten by `bt experiment --task %s --regime %s --seeds %d "
                          "--stage1 %d --stage2 %d --steps %d --d-model %d --layers %d --heads %d --batch %s --n %d%s` "
                          "(%s; training time summed over the runs: %s). Every arm of a regime sees the same data stream and budget "
                          "per seed. Mean ± sample standard deviation over seeds; Δ columns: per-seed difference from the "
                          "regime's control, then mean ± sd. ID sizes %d..%d, OOD %d..%d, %d examples per size.\n",
                          TASKS[X.task].name, TASKS[X.task].name, regime.c_str(), seeds, X.stage1, X.stage2, X.steps,
                          base.C, base.L, base.NH, a.str("batch").c_str(), X.n_eval,
                          a.has("arms") ? (" --arms " + a.str("arms")).c_str() : "", build_flags().c_str(),
                          fmt_time(train_seconds).c_str(), TASKS[X.task].train_lo, TASKS[X.task].train_hi,
                          TASKS[X.task].ood_lo, TASKS[X.task].ood_hi, X.n_eval);
    // the numbers that led to the budgets: written by hand (pilot runs) in calibration.md beside results.md
    std::ifstream cal(X.dir + "/calibration.md");
    if (cal.good()) {
        std::stringstream ss;
        ss << cal.rdbuf();
        md += "\n## Calibration: how the sizes and budgets were chosen\n\n(from calibration.md)\n\n" + ss.str();
    }
    if (v4) {
        md += "\n## v4: a processor on a frozen backbone\n\nStage 1 trained a vanilla backbone for " +
              std::to_string(X.stage1) + " steps (row `backbone`: where every arm starts); every arm then trained " +
              std::to_string(X.stage2) + " more steps at lr 1e-3. Control: `vanilla+extra`.\n";
        md += regime_report(X, "v4", all, "vanilla+extra");
    }
    if (v1) {
        md += "\n## v1: end to end from scratch\n\nEvery arm trained " + std::to_string(X.steps) +
              " steps from scratch. `evictB`: the v1 vanilla model decoding with H2O-style eviction (B older entries "
              "kept at each newline). Control: `vanilla`.\n";
        md += regime_report(X, "v1", all, "vanilla");
    }
    // the heatmap: v1's newline-schedule model if it ran, else v4's bt (both recall k entries per boundary)
    bool joint = v1 && std::ifstream(X.dir + "/runs/" + run_name("v1", "bt-joint", 1) + ".safetensors").good();
    std::string bt_run = X.dir + "/runs/" + run_name(joint ? "v1" : "v4", joint ? "bt-joint" : "bt", 1) + ".safetensors";
    if (std::ifstream(bt_run).good()) {
        Model M;
        load_model(M, bt_run);
        plot_reconsolidation(M, X.task, strf("%s: what the processor recalls (%s, seed 1)", TASKS[X.task].name,
                                             joint ? "v1 bt-joint" : "v4 bt"), X.dir + "/reconsolidation.svg");
        md += "\n## Which entries get reconsolidated\n\n![reconsolidation](reconsolidation.svg)\n";
    }
    write_file(X.dir + "/results.md", md);
    printf("\n%s\nwrote %s/results.md and its plots in %s\n", md.c_str(), X.dir.c_str(), fmt_time(now_seconds() - t0).c_str());
}

// =============================================================================================
// bt probe: what does a rewrite remove, and what does it keep?
//
// The paper's story: next-token training makes each cache entry memorise its prefix (high
// I(X;Z)); a rewrite can trade that detail for what the rest of the reasoning needs (I(Z;Y)).
// Linear probes make both visible. On test examples (teacher-forced on the reference text) we
// collect every cache entry that gets consolidated, per layer, K and V apart, at three stages:
//   backbone  what the processor-free model writes there (--backbone, or --ckpt, processor off)
//   before    what the Bottlenecked model's backbone writes there, before its line's rewrite
//   after     the same entry right after that rewrite (the bottleneck step at the line's end)
// and fit a softmax regression per (stage, layer, K/V, target) on half of the examples, scored
// on the other half. Targets:
//   token         the token at that position (how much of the prefix the entry memorises)
//   next result   a quantity of the NEXT reasoning line (future_labels), and
//   next operand  another one: what the model will need, not what it has read
// Chance: always answering the most common training label.
// Update statistics: ||ΔK||/||K|| and ||ΔV||/||V|| per layer for consolidated (the line just
// written) and reconsolidated (top-k older) entries, and where the top-k picks land.
// =============================================================================================
enum { PROBE_TOKEN, PROBE_RESULT, PROBE_OPERAND, N_TARGETS };
static const char* TARGET_NAMES[N_TARGETS] = {"token", "next result", "next operand"};
enum { STAGE_BACKBONE, STAGE_BEFORE, STAGE_AFTER, N_STAGES };
static const char* STAGE_NAMES[N_STAGES] = {"backbone", "before", "after"};

// ---- the probe: softmax regression  p(y | x) = softmax(W [z; 1]),  z = (x - mu) / sd
struct Probe {
    int D = 0, K = 0;                     // features, classes
    std::vector<float> mu, sd;            // (D) standardisation from the training rows
    std::vector<float> W;                 // (K, D+1), the last column is the bias
};
struct ProbeFit { Probe probe; double train_acc = 0, test_acc = 0, chance = 0; long n_train = 0, n_test = 0; };

// z rows (N, D+1) of x rows (N, D): standardised, then a constant 1 for the bias
static void probe_features(std::vector<float>& z, const Probe& P, const float* x, long N) {
    int D1 = P.D + 1;
    z.resize((size_t)N * D1);
    for (long n = 0; n < N; n++) {
        for (int d = 0; d < P.D; d++) z[n * D1 + d] = (x[n * P.D + d] - P.mu[d]) / P.sd[d];
        z[n * D1 + P.D] = 1.0f;
    }
}

// probs (N, K) of the rows x (N, D)
static void probe_predict(std::vector<float>& probs, const Probe& P, const float* x, long N) {
    std::vector<float> z, logits((size_t)N * P.K), loss(N), w(N, 0.0f);
    std::vector<int> tgt(N, 0);
    probe_features(z, P, x, N);
    probs.resize((size_t)N * P.K);
    matmul_forward(logits.data(), z.data(), P.W.data(), nullptr, (int)N, P.D + 1, P.K);
    crossentropy_forward(loss.data(), probs.data(), logits.data(), tgt.data(), w.data(), (int)N, P.K);
}

static int argmax_row(const float* p, int K) {
    int best = 0;
    for (int i = 1; i < K; i++)
        if (p[i] > p[best]) best = i;
    return best;
}

// Fit on the rows with is_test[n] == 0, score on the rest. x (N, D), y (N) in 0..K-1.
// Loss: mean cross-entropy, AdamW (decoupled decay l2), minibatches of 256 in an order shuffled
// each epoch by a seeded RNG (a fit is reproducible); at least `epochs` passes and `min_steps`
// updates, so a small set still converges.
static ProbeFit probe_fit(const float* x, const int* y, const char* is_test, long N, int D, int K, uint64_t seed,
                          int epochs = 30, int min_steps = 1500, float lr = 0.01f, float l2 = 1e-3f) {
    ProbeFit F;
    Probe& P = F.probe;
    P.D = D; P.K = K;
    std::vector<long> train, test;
    for (long n = 0; n < N; n++) (is_test[n] ? test : train).push_back(n);
    F.n_train = (long)train.size(); F.n_test = (long)test.size();
    if (train.empty() || test.empty()) INTERNAL("a probe needs training and test rows (%ld, %ld)", F.n_train, F.n_test);
    // standardisation from the training rows (a constant feature gets sd 1)
    P.mu.assign(D, 0.0f); P.sd.assign(D, 1.0f);
    for (int d = 0; d < D; d++) {
        double s = 0, s2 = 0;
        for (long n : train) { s += x[n * D + d]; s2 += (double)x[n * D + d] * x[n * D + d]; }
        double m = s / train.size(), var = s2 / train.size() - m * m;
        P.mu[d] = (float)m;
        P.sd[d] = var > 1e-12 ? (float)sqrt(var) : 1.0f;
    }
    // chance: the most common training label, scored on the test rows
    std::vector<long> count(K, 0);
    for (long n : train) count[y[n]]++;
    int major = (int)(std::max_element(count.begin(), count.end()) - count.begin());
    long hits = 0;
    for (long n : test) hits += y[n] == major;
    F.chance = (double)hits / test.size();
    // the training rows, standardised once
    int D1 = D + 1, BS = 256;
    std::vector<float> xt((size_t)train.size() * D), z;
    for (size_t i = 0; i < train.size(); i++) memcpy(&xt[i * D], x + train[i] * D, sizeof(float) * D);
    probe_features(z, P, xt.data(), (long)train.size());
    P.W.assign((size_t)K * D1, 0.0f);
    std::vector<float> g(P.W.size()), m(P.W.size(), 0.0f), v(P.W.size(), 0.0f);
    std::vector<float> zb((size_t)BS * D1), logits((size_t)BS * K), probs((size_t)BS * K), dlogits((size_t)BS * K), loss(BS), w(BS);
    std::vector<int> yb(BS);
    std::vector<long> order(train.size());
    for (size_t i = 0; i < order.size(); i++) order[i] = (long)i;
    Rng r(seed);
    int t = 0, per_epoch = (int)((order.size() + BS - 1) / BS);
    epochs = std::max(epochs, (min_steps + per_epoch - 1) / per_epoch);
    for (int ep = 0; ep < epochs; ep++) {
        for (long i = (long)order.size() - 1; i > 0; i--) std::swap(order[i], order[r.randint(0, (int)i)]);
        for (size_t b0 = 0; b0 < order.size(); b0 += BS) {
            int nb = (int)std::min((size_t)BS, order.size() - b0);
            for (int i = 0; i < nb; i++) {
                memcpy(&zb[(size_t)i * D1], &z[(size_t)order[b0 + i] * D1], sizeof(float) * D1);
                yb[i] = y[train[order[b0 + i]]];
                w[i] = 1.0f / nb;
            }
            matmul_forward(logits.data(), zb.data(), P.W.data(), nullptr, nb, D1, K);
            crossentropy_forward(loss.data(), probs.data(), logits.data(), yb.data(), w.data(), nb, K);
            zero(dlogits.data(), (long)nb * K);
            crossentropy_backward(dlogits.data(), probs.data(), yb.data(), w.data(), 1.0f, nb, K);
            zero(g.data(), (long)g.size());
            matmul_backward(nullptr, g.data(), dlogits.data(), zb.data(), P.W.data(), nb, D1, K);
            adamw_update(P.W.data(), m.data(), v.data(), g.data(), (long)g.size(), lr, 0.9f, 0.999f, 1e-8f, l2, ++t);
        }
    }
    // accuracy on both parts
    std::vector<float> pr;
    auto accuracy = [&](const std::vector<long>& rows) {
        std::vector<float> xs(rows.size() * D);
        for (size_t i = 0; i < rows.size(); i++) memcpy(&xs[i * D], x + rows[i] * D, sizeof(float) * D);
        probe_predict(pr, P, xs.data(), (long)rows.size());
        long ok = 0;
        for (size_t i = 0; i < rows.size(); i++) ok += argmax_row(&pr[i * K], K) == y[rows[i]];
        return (double)ok / rows.size();
    };
    F.train_acc = accuracy(train);
    F.test_acc = accuracy(test);
    return F;
}

// ---- the future quantities, read off the reference text. For reasoning line i (1-based; line 0 is
// the question) of an example, two digits (-1 where the line has none):
//   chain "4-0=4", var "q=x+7=7": result = the value after the last '=', operand = the digit before it
//   add "8+7+0=5,1": result = the carry out (the next carry), operand = the column's first digit
//   mul line i "part,sum": result = digit i-1 of the sum (the answer digit line i fixes for good),
//                          operand = digit i-1 of the multiplier (the digit line i multiplies by)
static int digit_of(char ch) { return ch >= '0' && ch <= '9' ? ch - '0' : -1; }
static void future_labels(Task task, const std::vector<std::string>& lines, int i, int* result, int* operand) {
    const std::string& ln = lines[i];
    *result = *operand = -1;
    if (ln.empty()) return;
    if (task == TASK_CHAIN || task == TASK_VAR) {
        size_t eq = ln.rfind('=');
        *result = digit_of(ln.back());
        *operand = eq != std::string::npos && eq > 0 ? digit_of(ln[eq - 1]) : -1;
    } else if (task == TASK_ADD) {
        *result = digit_of(ln.back());
        *operand = digit_of(ln[0]);
    } else if (task == TASK_MUL) {
        size_t comma = ln.find(','), star = lines[0].find('*');
        std::string sum = comma == std::string::npos ? "" : ln.substr(comma + 1);
        std::string mult = star == std::string::npos ? "" : lines[0].substr(star + 1);
        *result = i - 1 < (int)sum.size() ? digit_of(sum[i - 1]) : -1;
        *operand = i - 1 < (int)mult.size() ? digit_of(mult[i - 1]) : -1;
    }
}

// ---- update statistics
// relative size of one entry's update: ||post - pre|| / ||pre||   pre, post (C)
static double rel_update(const float* pre, const float* post, int C) {
    double d2 = 0, p2 = 0;
    for (int c = 0; c < C; c++) {
        double d = (double)post[c] - pre[c];
        d2 += d * d;
        p2 += (double)pre[c] * pre[c];
    }
    return p2 > 0 ? sqrt(d2 / p2) : 0.0;
}

struct UpdateStats {   // per layer, summed over the rewrites of a test set
    int L = 0;
    std::vector<double> dk[2], dv[2];   // [0 consolidated, 1 reconsolidated]: sum of ||ΔK||/||K||, ||ΔV||/||V||
    std::vector<long> n[2];             // entries counted
    std::vector<long> picks, picks_question;  // top-k picks, and those inside the question
    std::vector<double> uniform_question;     // the same count expected of a uniform pick among p < s
};
static void update_stats_init(UpdateStats& U, int L) {
    U.L = L;
    for (int i = 0; i < 2; i++) { U.dk[i].assign(L, 0); U.dv[i].assign(L, 0); U.n[i].assign(L, 0); }
    U.picks.assign(L, 0); U.picks_question.assign(L, 0); U.uniform_question.assign(L, 0);
}

// Count one firing of layer l (batch of one) at the boundary after segment [s,e): sel (nS) the
// rewritten positions, u (nS, 2C) their [K|V] before, K, V (T, C) the cache after. Positions below
// q_end are the question (BOS, question).
static void update_stats_add(UpdateStats& U, int l, int s, int e, const int* sel, int nS, const float* u,
                             const float* K, const float* V, int C, int q_end) {
    for (int i = 0; i < nS; i++) {
        int p = sel[i], kind = p < s ? 1 : 0;
        U.dk[kind][l] += rel_update(u + (long)i * 2 * C, K + (long)p * C, C);
        U.dv[kind][l] += rel_update(u + (long)i * 2 * C + C, V + (long)p * C, C);
        U.n[kind][l]++;
        if (kind == 1) {
            U.picks[l]++;
            U.picks_question[l] += p < q_end;
            U.uniform_question[l] += (double)std::min(q_end, s) / s;
        }
    }
    (void)e;
}

// ---- collection
struct ProbeData {
    int L = 0, C = 0;
    std::vector<int> example, pos;                    // per row: which example, which position
    std::vector<int> label[N_TARGETS];                // per row (-1: none)
    std::vector<float> feat[N_STAGES][2];             // per stage, K/V: (rows, L, C)
    UpdateStats U;
};

struct BoundaryCtx { ProbeData* P; long row0; int q_end; };

// after_boundary hook of forward_sequence (batch of one): the rewrite after segment j just ran.
// Its undo records hold every rewritten entry's value before, the cache holds the value after.
static void probe_after_boundary(const RunState& S, int j, void* ctx) {
    BoundaryCtx& X = *(BoundaryCtx*)ctx;
    ProbeData& P = *X.P;
    int L = P.L, C = P.C;
    for (int l = 0; l < L; l++) {
        const UndoRecord& rec = S.undo[(size_t)j * L + l];
        const int* sel = S.undo_sel.data() + rec.sel_off;
        const float* u = S.undo_u.data() + rec.u_off;
        const float *K = S.acts[l].k, *V = S.acts[l].v;
        update_stats_add(P.U, l, rec.s, rec.e, sel, rec.nS, u, K, V, C, X.q_end);
        for (int i = 0; i < rec.nS; i++) {
            int p = sel[i];
            if (p < rec.s) continue;   // consolidated entries only: each is probed once, at its line's end
            long at = ((X.row0 + p) * L + l) * C;
            memcpy(&P.feat[STAGE_BEFORE][0][at], u + (long)i * 2 * C, sizeof(float) * C);
            memcpy(&P.feat[STAGE_BEFORE][1][at], u + (long)i * 2 * C + C, sizeof(float) * C);
            memcpy(&P.feat[STAGE_AFTER][0][at], K + (long)p * C, sizeof(float) * C);
            memcpy(&P.feat[STAGE_AFTER][1][at], V + (long)p * C, sizeof(float) * C);
        }
    }
}

// Run one example through both models and append its rows: every position of every segment
// that gets consolidated (all but the last, the answer line).
static void probe_collect(ProbeData& P, const Model& M, const Model& Mb, Task task, const std::string& text, int ex) {
    RunState S;
    std::vector<int> toks = tokenize(text, "example");
    int T = (int)toks.size(), L = P.L, C = P.C;
    run_state_build(S, M.cfg, T, 1, false);
    memcpy(S.tokens, toks.data(), sizeof(int) * T);
    const std::vector<int> b = segment_bounds(M.cfg, S, T);
    int nseg = (int)b.size() - 1, rows = b[nseg - 1];
    std::vector<std::string> lines = split_lines(text);
    if ((int)lines.size() != nseg) INTERNAL("probe: %d lines but %d segments", (int)lines.size(), nseg);
    long row0 = (long)P.pos.size();
    for (int j = 0; j + 1 < nseg; j++) {
        int res = -1, opd = -1;
        if (j + 1 < nseg - 1) future_labels(task, lines, j + 1, &res, &opd);   // line j+1 is a reasoning line
        for (int p = b[j]; p < b[j + 1]; p++) {
            P.example.push_back(ex); P.pos.push_back(p);
            P.label[PROBE_TOKEN].push_back(toks[p]);
            P.label[PROBE_RESULT].push_back(res);
            P.label[PROBE_OPERAND].push_back(opd);
        }
    }
    for (int st = 0; st < N_STAGES; st++)
        for (int kv = 0; kv < 2; kv++) P.feat[st][kv].resize((size_t)(row0 + rows) * L * C);
    // the processor-free model: one causal pass
    RunState Sb;
    run_state_build(Sb, Mb.cfg, T, 1, false);
    memcpy(Sb.tokens, toks.data(), sizeof(int) * T);
    forward_sequence(Mb, Sb, T, TrainMode{});
    for (int p = 0; p < rows; p++)
        for (int l = 0; l < L; l++) {
            long at = ((row0 + p) * L + l) * C;
            memcpy(&P.feat[STAGE_BACKBONE][0][at], Sb.acts[l].k + (long)p * C, sizeof(float) * C);
            memcpy(&P.feat[STAGE_BACKBONE][1][at], Sb.acts[l].v + (long)p * C, sizeof(float) * C);
        }
    // the Bottlenecked model, segment by segment, with the hook after every rewrite
    TrainMode mode;
    mode.use_proc = true;
    BoundaryCtx ctx{&P, row0, b[1]};
    forward_sequence(M, S, T, mode, probe_after_boundary, &ctx);
}

// One cell of the probe table: the fit of target tg on stage st, layer l, K (kv 0) or V (kv 1).
struct ProbeCell { int tg, st, l, kv; ProbeFit fit; };

static std::vector<ProbeCell> probe_fit_all(const ProbeData& P, const std::vector<char>& example_is_test) {
    std::vector<ProbeCell> cells;
    for (int tg = 0; tg < N_TARGETS; tg++)
        for (int l = 0; l < P.L; l++)
            for (int kv = 0; kv < 2; kv++)
                for (int st = 0; st < N_STAGES; st++) cells.push_back({tg, st, l, kv, {}});
    #pragma omp parallel for schedule(dynamic)
    for (size_t i = 0; i < cells.size(); i++) {
        ProbeCell& cell = cells[i];
        const std::vector<int>& lab = P.label[cell.tg];
        std::vector<float> x;
        std::vector<int> y;
        std::vector<char> test;
        for (size_t r = 0; r < lab.size(); r++) {
            if (lab[r] < 0) continue;
            const float* f = &P.feat[cell.st][cell.kv][(r * P.L + cell.l) * P.C];
            x.insert(x.end(), f, f + P.C);
            y.push_back(lab[r]);
            test.push_back(example_is_test[P.example[r]]);
        }
        int K = cell.tg == PROBE_TOKEN ? VOCAB_SIZE : 10;
        cell.fit = probe_fit(x.data(), y.data(), test.data(), (long)y.size(), P.C, K, 1000 + i);
    }
    return cells;
}

static const ProbeCell& probe_cell(const std::vector<ProbeCell>& cells, int tg, int st, int l, int kv) {
    for (auto& c : cells)
        if (c.tg == tg && c.st == st && c.l == l && c.kv == kv) return c;
    INTERNAL("no probe cell %d %d %d %d", tg, st, l, kv);
}

// ---- plots: grouped bars, one panel per target; groups = layer x {K, V}; bars = the stages
static std::string probe_svg(const std::vector<ProbeCell>& cells, int L, const std::string& title) {
    double gw = 3 * 14 + 10, pw = 2 * L * gw + 40, ph = 220, W = 20 + N_TARGETS * pw, H = ph + 110;
    std::string s = strf("<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"%.0f\" height=\"%.0f\" font-family=\"sans-serif\" "
                         "font-size=\"11\">\n<rect width=\"100%%\" height=\"100%%\" fill=\"white\"/>\n", W, H);
    s += strf("<text x=\"10\" y=\"16\" font-size=\"13\">%s</text>\n", title.c_str());
    for (int st = 0; st < N_STAGES; st++)
        s += strf("<rect x=\"%d\" y=\"24\" width=\"10\" height=\"10\" fill=\"%s\"/><text x=\"%d\" y=\"33\">%s</text>\n",
                  10 + st * 90, PALETTE[st], 24 + st * 90, STAGE_NAMES[st]);
    s += "<text x=\"290\" y=\"33\">dashed: chance (most common label)</text>\n";
    for (int tg = 0; tg < N_TARGETS; tg++) {
        double x0 = 30 + tg * pw, y0 = 70, y1 = y0 + ph;
        s += strf("<text x=\"%.0f\" y=\"%.0f\">%s: held-out accuracy</text>\n", x0, y0 - 10, TARGET_NAMES[tg]);
        s += strf("<line x1=\"%.0f\" y1=\"%.0f\" x2=\"%.0f\" y2=\"%.0f\" stroke=\"#444\"/>\n", x0, y1, x0 + 2 * L * gw, y1);
        for (int i = 0; i <= 4; i++)
            s += strf("<text x=\"%.0f\" y=\"%.0f\" text-anchor=\"end\" fill=\"#666\">%.2g</text>\n", x0 - 2, y1 - ph * i / 4 + 4, i / 4.0);
        for (int l = 0; l < L; l++)
            for (int kv = 0; kv < 2; kv++) {
                double gx = x0 + (2 * l + kv) * gw;
                for (int st = 0; st < N_STAGES; st++) {
                    double a = probe_cell(cells, tg, st, l, kv).fit.test_acc;
                    s += strf("<rect x=\"%.1f\" y=\"%.1f\" width=\"12\" height=\"%.1f\" fill=\"%s\"/>\n", gx + st * 14,
                              y1 - ph * a, ph * a, PALETTE[st]);
                }
                double ch = probe_cell(cells, tg, 0, l, kv).fit.chance;
                s += strf("<line x1=\"%.1f\" y1=\"%.1f\" x2=\"%.1f\" y2=\"%.1f\" stroke=\"#000\" stroke-dasharray=\"3,2\"/>\n",
                          gx - 2, y1 - ph * ch, gx + 3 * 14, y1 - ph * ch);
                s += strf("<text x=\"%.1f\" y=\"%.0f\" text-anchor=\"middle\">%s%d</text>\n", gx + 20, y1 + 14, kv ? "V" : "K", l);
            }
    }
    return s + "</svg>\n";
}

// mean ||ΔK||/||K|| and ||ΔV||/||V|| per layer, consolidated vs reconsolidated; and the share of
// top-k picks inside the question beside what a uniform pick would give
static std::string updates_svg(const UpdateStats& U, const std::string& title) {
    int L = U.L;
    double gw = 4 * 14 + 16, pw = L * gw + 40, ph = 200;
    double W = 40 + pw + L * 40 + 260, H = ph + 100, top = 0;
    for (int l = 0; l < L; l++)
        for (int k = 0; k < 2; k++)
            if (U.n[k][l]) top = std::max({top, U.dk[k][l] / U.n[k][l], U.dv[k][l] / U.n[k][l]});
    top = top > 0 ? top * 1.1 : 1;
    std::string s = strf("<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"%.0f\" height=\"%.0f\" font-family=\"sans-serif\" "
                         "font-size=\"11\">\n<rect width=\"100%%\" height=\"100%%\" fill=\"white\"/>\n", W, H);
    s += strf("<text x=\"10\" y=\"16\" font-size=\"13\">%s</text>\n", title.c_str());
    const char* names[4] = {"|dK|/|K| consolidated", "|dV|/|V| consolidated", "|dK|/|K| reconsolidated",
                            "|dV|/|V| reconsolidated"};
    for (int i = 0; i < 4; i++)
        s += strf("<rect x=\"%d\" y=\"24\" width=\"10\" height=\"10\" fill=\"%s\"/><text x=\"%d\" y=\"33\">%s</text>\n",
                  10 + i * 150, PALETTE[i], 24 + i * 150, names[i]);
    double x0 = 40, y1 = 60 + ph;
    s += strf("<line x1=\"%.0f\" y1=\"%.0f\" x2=\"%.0f\" y2=\"%.0f\" stroke=\"#444\"/>\n", x0, y1, x0 + L * gw, y1);
    for (int i = 0; i <= 4; i++)
        s += strf("<text x=\"%.0f\" y=\"%.0f\" text-anchor=\"end\" fill=\"#666\">%.2g</text>\n", x0 - 2, y1 - ph * i / 4 + 4, top * i / 4);
    for (int l = 0; l < L; l++) {
        double v[4] = {U.n[0][l] ? U.dk[0][l] / U.n[0][l] : 0, U.n[0][l] ? U.dv[0][l] / U.n[0][l] : 0,
                       U.n[1][l] ? U.dk[1][l] / U.n[1][l] : 0, U.n[1][l] ? U.dv[1][l] / U.n[1][l] : 0};
        for (int i = 0; i < 4; i++)
            s += strf("<rect x=\"%.1f\" y=\"%.1f\" width=\"12\" height=\"%.1f\" fill=\"%s\"/>\n", x0 + l * gw + i * 14,
                      y1 - ph * v[i] / top, ph * v[i] / top, PALETTE[i]);
        s += strf("<text x=\"%.1f\" y=\"%.0f\" text-anchor=\"middle\">layer %d</text>\n", x0 + l * gw + 28, y1 + 14, l);
    }
    // the selection panel: share of picks in the question (bar) against uniform (dashed)
    double x2 = x0 + L * gw + 60;
    s += strf("<text x=\"%.0f\" y=\"52\">share of top-k picks in the question</text>\n", x2 - 30);
    s += strf("<line x1=\"%.0f\" y1=\"%.0f\" x2=\"%.0f\" y2=\"%.0f\" stroke=\"#444\"/>\n", x2, y1, x2 + L * 40, y1);
    for (int i = 0; i <= 4; i++)
        s += strf("<text x=\"%.0f\" y=\"%.0f\" text-anchor=\"end\" fill=\"#666\">%.2g</text>\n", x2 - 4, y1 - ph * i / 4 + 4, i / 4.0);
    for (int l = 0; l < L; l++) {
        double q = U.picks[l] ? (double)U.picks_question[l] / U.picks[l] : 0;
        double un = U.picks[l] ? U.uniform_question[l] / U.picks[l] : 0;
        s += strf("<rect x=\"%.1f\" y=\"%.1f\" width=\"24\" height=\"%.1f\" fill=\"%s\"/>\n", x2 + l * 40, y1 - ph * q, ph * q, PALETTE[4]);
        s += strf("<line x1=\"%.1f\" y1=\"%.1f\" x2=\"%.1f\" y2=\"%.1f\" stroke=\"#000\" stroke-dasharray=\"3,2\"/>\n",
                  x2 + l * 40 - 3, y1 - ph * un, x2 + l * 40 + 27, y1 - ph * un);
        s += strf("<text x=\"%.1f\" y=\"%.0f\" text-anchor=\"middle\">L%d</text>\n", x2 + l * 40 + 12, y1 + 14, l);
    }
    s += strf("<text x=\"%.0f\" y=\"%.0f\">dashed: a uniform pick among the older entries</text>\n", x2 - 30, y1 + 30);
    return s + "</svg>\n";
}

// ---- one rewrite, entry by entry (--trace and the README walk-through): the boundary after
// reasoning line j of one example. Per layer: every rewritten entry, its update size, and what
// the probes (each stage's own) give the true label before and after.
struct TraceCtx { int j; int L, C; std::vector<std::vector<int>> sel; std::vector<std::vector<float>> u, K, V; int s, e; };
static void trace_after_boundary(const RunState& S, int j, void* ctx) {
    TraceCtx& X = *(TraceCtx*)ctx;
    if (j != X.j) return;
    for (int l = 0; l < X.L; l++) {
        const UndoRecord& rec = S.undo[(size_t)j * X.L + l];
        X.s = rec.s; X.e = rec.e;
        X.sel[l].assign(S.undo_sel.data() + rec.sel_off, S.undo_sel.data() + rec.sel_off + rec.nS);
        X.u[l].assign(S.undo_u.data() + rec.u_off, S.undo_u.data() + rec.u_off + (long)rec.nS * 2 * X.C);
        X.K[l].assign(S.acts[l].k, S.acts[l].k + (long)S.T * X.C);
        X.V[l].assign(S.acts[l].v, S.acts[l].v + (long)S.T * X.C);
    }
}

static double probe_p(const Probe& P, const float* x, int label) {
    std::vector<float> pr;
    probe_predict(pr, P, x, 1);
    return label >= 0 ? pr[label] : NAN;
}

static std::string probe_trace(const Model& M, const std::vector<ProbeCell>& cells, Task task, const std::string& text) {
    const Config& c = M.cfg;
    std::vector<int> toks = tokenize(text, "example");
    int T = (int)toks.size();
    RunState S;
    run_state_build(S, c, T, 1, false);
    memcpy(S.tokens, toks.data(), sizeof(int) * T);
    std::vector<int> b = segment_bounds(c, S, T);
    int nseg = (int)b.size() - 1;
    std::vector<std::string> lines = split_lines(text);
    TraceCtx X;
    X.j = std::max(1, (nseg - 2) / 2); X.L = c.L; X.C = c.C;
    X.sel.resize(c.L); X.u.resize(c.L); X.K.resize(c.L); X.V.resize(c.L);
    TrainMode mode;
    mode.use_proc = true;
    forward_sequence(M, S, T, mode, trace_after_boundary, &X);
    int res = -1, opd = -1;
    future_labels(task, lines, X.j + 1, &res, &opd);
    std::string q = text;
    for (auto& ch : q) if (ch == '\n') ch = '|';
    std::string o = strf("Example `%s` (| is a newline). The bottleneck step after line %d `%s` (positions %d..%d; "
                         "position 0 is BOS). The next line is `%s`: next result %d, next operand %d.\n\n",
                         q.c_str(), X.j, lines[X.j].c_str(), X.s, X.e - 1, lines[X.j + 1].c_str(), res, opd);
    o += "| layer | pos | token | kind | \\|ΔK\\|/\\|K\\| | \\|ΔV\\|/\\|V\\| | p(token) from K: before → after | "
         "p(next result) from V: before → after |\n|---|---|---|---|---|---|---|---|\n";
    for (int l = 0; l < c.L; l++)
        for (size_t i = 0; i < X.sel[l].size(); i++) {
            int p = X.sel[l][i];
            const float *uk = &X.u[l][i * 2 * c.C], *uv = uk + c.C, *pk = &X.K[l][(long)p * c.C], *pv = &X.V[l][(long)p * c.C];
            bool cons = p >= X.s;
            std::string pt = "-", pr = "-";
            if (cons) {
                pt = strf("%.2f → %.2f", probe_p(probe_cell(cells, PROBE_TOKEN, STAGE_BEFORE, l, 0).fit.probe, uk, toks[p]),
                          probe_p(probe_cell(cells, PROBE_TOKEN, STAGE_AFTER, l, 0).fit.probe, pk, toks[p]));
                if (res >= 0)
                    pr = strf("%.2f → %.2f", probe_p(probe_cell(cells, PROBE_RESULT, STAGE_BEFORE, l, 1).fit.probe, uv, res),
                              probe_p(probe_cell(cells, PROBE_RESULT, STAGE_AFTER, l, 1).fit.probe, pv, res));
            }
            std::string tk = token_str(toks[p]);
            if (tk == "\n") tk = "\\n";
            o += strf("| %d | %d | `%s` | %s | %.3f | %.3f | %s | %s |\n", l, p, tk.c_str(),
                      cons ? "consolidated" : p < b[1] ? "recalled (question)" : "recalled (earlier line)",
                      rel_update(uk, pk, c.C), rel_update(uv, pv, c.C), pt.c_str(), pr.c_str());
        }
    return o;
}

static std::string probe_report(const ProbeData& P, const std::vector<ProbeCell>& cells, const std::string& what) {
    std::string o = what;
    for (int tg = 0; tg < N_TARGETS; tg++) {
        const ProbeFit& f0 = probe_cell(cells, tg, 0, 0, 0).fit;
        o += strf("\n### Probe: %s (held-out accuracy; %ld training rows, %ld test rows)\n\n", TARGET_NAMES[tg], f0.n_train,
                  f0.n_test);
        o += "| layer | K/V | backbone | before | after | chance |\n|---|---|---|---|---|---|\n";
        for (int l = 0; l < P.L; l++)
            for (int kv = 0; kv < 2; kv++) {
                o += strf("| %d | %s |", l, kv ? "V" : "K");
                for (int st = 0; st < N_STAGES; st++) o += strf(" %.3f |", probe_cell(cells, tg, st, l, kv).fit.test_acc);
                o += strf(" %.3f |\n", probe_cell(cells, tg, 0, l, kv).fit.chance);
            }
    }
    const UpdateStats& U = P.U;
    o += "\n### Update sizes and selection\n\nMean relative update per rewritten entry; `picks in question`: the share of "
         "top-k (reconsolidated) picks that lie in the question (BOS and the question line), beside the share a uniform "
         "pick among the older entries would give.\n\n"
         "| layer | consolidated: entries | \\|ΔK\\|/\\|K\\| | \\|ΔV\\|/\\|V\\| | reconsolidated: entries | \\|ΔK\\|/\\|K\\| | "
         "\\|ΔV\\|/\\|V\\| | picks in question | uniform |\n|---|---|---|---|---|---|---|---|---|\n";
    auto ratio = [](double a, long n) { return n ? a / n : 0.0; };
    for (int l = 0; l < U.L; l++)
        o += strf("| %d | %ld | %.3f | %.3f | %ld | %.3f | %.3f | %.3f | %.3f |\n", l, U.n[0][l], ratio(U.dk[0][l], U.n[0][l]),
                  ratio(U.dv[0][l], U.n[0][l]), U.n[1][l], ratio(U.dk[1][l], U.n[1][l]), ratio(U.dv[1][l], U.n[1][l]),
                  ratio((double)U.picks_question[l], U.picks[l]), ratio(U.uniform_question[l], U.picks[l]));
    return o;
}

static void cmd_probe(const Args& a) {
    if (!a.has("ckpt")) BAD_INPUT("bt probe needs --ckpt (a checkpoint with a processor, e.g. from bt train --model bt)");
    Task task = parse_task(a.str("task"));
    Model M, Mb;
    load_model(M, a.str("ckpt"));
    const Config& c = M.cfg;
    if (c.dp == 0) BAD_INPUT("%s has no processor: bt probe compares a Bottlenecked model with its backbone", a.str("ckpt").c_str());
    if (c.periodic) BAD_INPUT("%s rewrites every %d tokens: bt probe follows lines (newline schedule) only", a.str("ckpt").c_str(), c.periodic);
    std::string bname = "--ckpt with its processor off";
    if (a.has("backbone")) {
        load_model(Mb, a.str("backbone"));
        if (Mb.cfg.C != c.C || Mb.cfg.L != c.L || Mb.cfg.pause)
            BAD_INPUT("--backbone %s must be a plain model of the same width and depth (d_model %d, %d layers)",
                      a.str("backbone").c_str(), c.C, c.L);
        bname = a.str("backbone");
    }
    const Model& B = a.has("backbone") ? Mb : M;   // the processor-free pass never fires a processor
    int lo = TASKS[task].train_lo, hi = TASKS[task].train_hi, n = a.integer("n", 2, 100000);
    if (a.has("sizes")) parse_sizes(a.str("sizes"), &lo, &hi, 64);
    uint64_t seed = (uint64_t)a.integer("seed", 0, 1 << 30);
    std::vector<std::string> texts;
    for (int s = lo; s <= hi; s++)
        for (auto& t : eval_set(task, s, n, seed)) texts.push_back(t);
    // collect: every example through both models
    double t0 = now_seconds();
    ProbeData P;
    P.L = c.L; P.C = c.C;
    update_stats_init(P.U, c.L);
    std::vector<char> is_test;
    for (size_t i = 0; i < texts.size(); i++) {
        probe_collect(P, M, B, task, texts[i], (int)i);
        is_test.push_back(i % 2);   // examples alternate: odd ones are held out
    }
    printf("bt probe | %s | %s | backbone: %s | sizes %d..%d, %d each: %zu examples, %zu cache entries per layer (%.1fs)\n",
           a.str("ckpt").c_str(), TASKS[task].name, bname.c_str(), lo, hi, n, texts.size(), P.pos.size(), now_seconds() - t0);
    printf("fitting %d probes (softmax regression, at least 30 epochs and 1500 steps each)...\n", N_TARGETS * N_STAGES * 2 * c.L);
    fflush(stdout);
    std::vector<ProbeCell> cells = probe_fit_all(P, is_test);
    // report
    std::string name = std::filesystem::path(a.str("ckpt")).stem().string();
    std::string dir = a.str("results") + "/" + TASKS[task].name;
    std::filesystem::create_directories(dir);
    std::string md = strf("# What a rewrite removes and keeps: %s on %s\n\nWritten by `bt probe --task %s --ckpt %s%s%s --n %d "
                          "--seed %d` (%s). Entries: every cache entry of every line that gets consolidated (all but the "
                          "answer line), teacher-forced on held-out questions of sizes %d..%d; probes fit on even-numbered "
                          "examples and are scored on odd ones. Stages: `backbone` = the processor-free model (%s); "
                          "`before` / `after` = the Bottlenecked model's entry just before / after the rewrite at the end of "
                          "its line. `next result` / `next operand`: quantities of the next reasoning line (see "
                          "`future_labels` in bt.cpp), probed on the entries of the line before it.\n",
                          name.c_str(), TASKS[task].name, TASKS[task].name, a.str("ckpt").c_str(),
                          a.has("backbone") ? " --backbone " : "", a.has("backbone") ? a.str("backbone").c_str() : "", n,
                          (int)seed, build_flags().c_str(), lo, hi, bname.c_str());
    md = probe_report(P, cells, md);
    md += "\n![probes](probe-" + name + ".svg) ![updates](updates-" + name + ".svg)\n";
    size_t shown = ((size_t)((hi - lo) / 2) * n) | 1;   // a held-out (odd) example of the middle size
    md += "\n### One rewrite, entry by entry\n\n" + probe_trace(M, cells, task, texts[shown]);
    write_file(dir + "/probe-" + name + ".md", md);
    write_file(dir + "/probe-" + name + ".svg", probe_svg(cells, c.L, strf("%s, %s: linear probes on cache entries", TASKS[task].name, name.c_str())));
    write_file(dir + "/updates-" + name + ".svg", updates_svg(P.U, strf("%s, %s: relative update per entry", TASKS[task].name, name.c_str())));
    printf("\n%s\nwrote %s/probe-%s.md and its plots in %.1fs\n", md.c_str(), dir.c_str(), name.c_str(), now_seconds() - t0);
}

// =============================================================================================
// bt bench: training and decoding tokens/s, matmul GFLOP/s at the model's shapes, peak memory,
// and how training cost grows with width and with the number of boundaries. make bench first runs
// the same model in PyTorch (tests/bench_torch.py: Debian's torch, and PyPI's in a venv, eager and
// compiled) and hands its JSON lines to --torch, so the table shows bt / fastest PyTorch per row.
// =============================================================================================
struct BenchRow {
    std::string key, label, unit;   // key: as tests/bench_torch.py names the row
    double bt = 0;
};

// a run set up as bt train would; frozen: the backbone gets no weight updates (as with --init)
static void bench_run(TrainRun& R, const std::vector<std::string>& flags, bool frozen) {
    R.quiet = true;
    train_setup(R, train_args_from(flags));
    if (frozen) R.mode.train_backbone = false;
}

// training tokens/s over `steps` steps after 2 warm-up steps; sizes lo..hi of chain (0: the task's)
static double bench_train(const std::vector<std::string>& flags, bool frozen, int steps, int lo = 0, int hi = 0,
                          double* mean_T = nullptr) {
    TrainRun R;
    bench_run(R, flags, frozen);
    if (lo > 0) {
        R.D.lo = lo; R.D.hi = hi;
        run_state_build(R.S, R.M.cfg, max_tokens(R.D), R.B, true);
    }
    R.o.steps = steps + 2;
    train_steps(R, 2);
    R.tokens = 0;
    double t0 = now_seconds();
    train_steps(R, steps + 2);
    device_sync();   // the last optimizer step may still be running on the device
    double dt = now_seconds() - t0;
    if (mean_T) *mean_T = (double)R.tokens / R.B / steps;
    return R.tokens / dt;
}

// bench_decode's batched run, split as evaluate splits examples (eval_batches): batch i holds
// sequences [i*B, i*B+B), each fed its seqs[b] (all but the final '$'), first the positions
// every prompt of the batch has in one feed, then one position of every sequence per step (PAD
// past a sequence's end); after each position a sequence chooses greedily, from its prompt's
// last position to its next-to-last, as a Decoder would.
struct BenchDecodeCtx {
    std::vector<BatchDecoder>* BD; const std::vector<std::vector<int>>* seqs; const std::vector<int>* qlen;
    int B, rounds;
};
static void bench_decode_batch(int i, int thread, void* ctx) {
    BenchDecodeCtx& x = *(BenchDecodeCtx*)ctx;
    BatchDecoder& BD = (*x.BD)[thread];
    const std::vector<std::vector<int>>& seqs = *x.seqs;
    const std::vector<int>& qlen = *x.qlen;
    int b0 = i * x.B, nb = std::min(x.B, (int)seqs.size() - b0), q = BD.M->cfg.T, end = 0;
    for (int j = 0; j < nb; j++) { q = std::min(q, qlen[b0 + j]); end = std::max(end, (int)seqs[b0 + j].size() - 1); }
    std::vector<int> toks((long)end * nb, PAD);   // (end,nb)
    for (int t = 0; t < end; t++)
        for (int j = 0; j < nb; j++)
            if (t + 1 < (int)seqs[b0 + j].size()) toks[(long)t * nb + j] = seqs[b0 + j][t];
    for (int round = 0; round < x.rounds; round++) {
        batch_reset(BD, nb);
        batch_feed(BD, toks.data(), q);
        volatile int sink = 0;
        for (int t = q - 1; t < end; t++) {   // positions [0,t] are fed
            if (t >= q) batch_feed(BD, &toks[(long)t * nb], 1);
            for (int j = 0; j < nb; j++)
                if (t >= qlen[b0 + j] - 1 && t + 1 < (int)seqs[b0 + j].size())
                    sink = greedy_token(batch_logits(BD, j), BD.M->cfg.V);
        }
        (void)sink;
    }
}
static void bench_decode_batched(const Model& M, const std::vector<std::vector<int>>& seqs, const std::vector<int>& qlen,
                                 int rounds) {
    int B = 0, threads = 0, n_batches = eval_batches((int)seqs.size(), &B, &threads);
    std::vector<BatchDecoder> BD(threads);
    for (BatchDecoder& d : BD) batch_init(d, M, B);
    BenchDecodeCtx x{&BD, &seqs, &qlen, B, rounds};
    for_each_item(n_batches, threads, bench_decode_batch, &x);
}

// Decoding with the KV cache, one token at a time after the prompt (BOS, question, newline): the
// greedy choice is computed at every step as generate() does, but the example's own next token
// is fed back, so every run decodes the same tokens and the processor fires at the same newlines
// (tests/bench_torch.py does the same). B = 1: one Decoder. B > 1: the B sequences in batched
// decoders, one per thread, as bt eval decodes (lock-step, one position of every sequence of a
// batch per step); on the device, where there is no batched decoder, B Decoders one after
// another. Returns generated tokens (one per greedy choice) per second, prefill included.
static double bench_decode(const Model& M, int B, int rounds) {
    Rng r(99);
    std::vector<std::vector<int>> seqs;
    std::vector<int> qlen;
    for (int i = 0; i < B; i++) {
        std::string ex = gen_example(TASK_CHAIN, r, 8, true);
        seqs.push_back(tokenize(ex, "bench"));
        qlen.push_back((int)question_of(ex).size() + 2);   // BOS, the question, its newline
    }
    long tokens = 0;
    for (int i = 0; i < B; i++) tokens += (long)(seqs[i].size() - qlen[i]) * rounds;
    double t0 = now_seconds();
    if (B > 1 && !g_device) {
        bench_decode_batched(M, seqs, qlen, rounds);
        return tokens / (now_seconds() - t0);
    }
    Decoder D;
    decoder_init(D, M);
    for (int j = 0; j < B * rounds; j++) {
        const std::vector<int>& tk = seqs[j % B];
        decoder_reset(D);
        decoder_feed(D, tk.data(), qlen[j % B]);
        volatile int sink = decoder_argmax(D);
        for (size_t t = qlen[j % B]; t + 1 < tk.size(); t++) {   // '$', the last, is chosen, never fed
            decoder_feed(D, &tk[t], 1);
            sink = decoder_argmax(D);
        }
        (void)sink;
    }
    return tokens / (now_seconds() - t0);
}

// GFLOP/s of out = inp W^T, (N,IC) x (OC,IC), forward; fast or naive. Under --device cuda:
// kernels.cu's matmul_forward on device copies of the same numbers (fast is ignored there).
static double bench_matmul(int N, int IC, int OC, bool fast, double seconds) {
    std::vector<float> inp((long)N * IC), W((long)OC * IC), out((long)N * OC);
    Rng r(5);
    for (auto& x : inp) x = r.normal();
    for (auto& x : W) x = r.normal();
    float *pi = inp.data(), *pw = W.data(), *po = out.data();
    DeviceMem dm;
    if (g_device) {
        dm.alloc(sizeof(float) * (inp.size() + W.size() + out.size()));
        pi = (float*)dm.p; pw = pi + inp.size(); po = pw + W.size();
        to_device(pi, inp.data(), sizeof(float) * inp.size());
        to_device(pw, W.data(), sizeof(float) * W.size());
    }
    long reps = 0;
    double t0 = now_seconds(), t;
    do {
        if (fast || g_device) OP(matmul_forward(po, pi, pw, nullptr, N, IC, OC));
        else matmul_forward_naive(po, pi, pw, N, IC, OC);
        device_sync();
        reps++;
        t = now_seconds() - t0;
    } while (t < seconds);
    return 2.0 * N * IC * OC * reps / t / 1e9;
}

static double peak_rss_mib() {
    struct rusage u;
    getrusage(RUSAGE_SELF, &u);
    return u.ru_maxrss / 1024.0;
}

// PyTorch's rows: for each key, the best value over every file and implementation
struct TorchBest { double value = 0; std::string impl; };
static std::map<std::string, TorchBest> read_torch_rows(const std::string& files, std::vector<std::string>* infos) {
    std::map<std::string, TorchBest> best;
    std::stringstream ss(files);
    std::string path;
    while (std::getline(ss, path, ',')) {
        std::ifstream f(path);
        if (!f) { infos->push_back(path + ": missing (that PyTorch did not run)"); continue; }
        std::string line;
        while (std::getline(f, line)) {
            if (line.empty() || line[0] != '{') continue;
            JsonParser jp{line, 0, path};
            Json j = jp.value(0);
            const Json *row = j.get("row"), *val = j.get("value"), *impl = j.get("impl");
            if (!row || row->kind != Json::STR) continue;
            if (row->str == "info" || row->str == "check") {
                std::string s;
                for (auto& kv : j.obj)
                    if (kv.second.kind == Json::STR) s += kv.first + " " + kv.second.str + ", ";
                    else if (kv.second.kind == Json::NUM) s += kv.first + " " + strf("%g", kv.second.num) + ", ";
                infos->push_back(path + ": " + s);
                continue;
            }
            if (!val || val->kind != Json::NUM) {
                const Json* err = j.get("error");
                infos->push_back(row->str + " (" + (impl && impl->kind == Json::STR ? impl->str : "?") + ") failed: " +
                                 (err && err->kind == Json::STR ? err->str.substr(0, 160) : "no value"));
                continue;
            }
            std::string key = row->str;
            if (const Json* sh = j.get("shape"); sh && key == "sgemm")
                for (auto& d : sh->arr) key += strf("_%d", (int)d.num);
            bool lower_better = key == "peak_rss";
            TorchBest& b = best[key];
            if (b.impl.empty() || (lower_better ? val->num < b.value : val->num > b.value))
                b = {val->num, impl && impl->kind == Json::STR ? impl->str : "?"};
        }
    }
    return best;
}

// --device cuda: the same rows where they mean the same thing on the GPU (training, decoding one
// sequence at a time, kernels.cu's plain matmul kernel, the scaling rows); no CPU-only rows (the
// naive CPU loop, batch-32 decoding with a decoder per CPU thread, resident memory) and no PyTorch
// column (tests/bench_torch.py measures on the CPU).
static void cmd_bench(const Args& a) {
    use_device(a);
    bool quick = a.has("quick"), dev = g_device;
    int steps = quick ? 3 : 20, rounds = quick ? 1 : 4;
    double mm_seconds = quick ? 0.2 : 1.0;
    std::vector<std::string> infos;
    std::map<std::string, TorchBest> torch;
    if (a.has("torch") && !dev) torch = read_torch_rows(a.str("torch"), &infos);
    if (a.has("torch") && dev) infos.push_back("not compared: tests/bench_torch.py measures PyTorch on the CPU");
    printf("bt bench%s | %s | default model (d_model 128, 4 layers, processor width 64, k 4), chain, batch 32\n",
           dev ? " --device cuda" : "", build_flags().c_str());
    for (auto& s : infos) printf("  torch: %s\n", s.c_str());
    fflush(stdout);

    std::vector<BenchRow> rows;
    auto add = [&](const std::string& key, const std::string& label, const std::string& unit, double v) {
        rows.push_back({key, label, unit, v});
        fprintf(stderr, "  measured %-34s %10.1f %s\n", label.c_str(), v, unit.c_str());
    };
    const std::vector<std::string> base = {"--task", "chain", "--batch", "32", "--seed", "1"};
    std::vector<std::string> bt = base;
    bt.insert(bt.end(), {"--model", "bt", "--joint"});
    std::vector<std::string> step = bt;
    step.insert(step.end(), {"--bptt", "step"});
    double mean_T = 0;
    double van = bench_train(base, false, steps, 0, 0, &mean_T);
    add("train_vanilla", "train vanilla", "tok/s", van);
    add("train_bt_frozen_full", "train bt frozen, bptt full", "tok/s", bench_train(bt, true, steps));
    add("train_bt_frozen_step", "train bt frozen, bptt step", "tok/s", bench_train(step, true, steps));
    add("train_bt_joint", "train bt joint", "tok/s", bench_train(bt, false, steps));

    Model V, P;
    { TrainRun R; bench_run(R, base, false); V = R.M; }
    { TrainRun R; bench_run(R, bt, false); P = R.M; }
    int nth = max_threads();
    add("decode_vanilla_b1", "decode vanilla, batch 1", "tok/s", bench_decode(V, 1, rounds * 8));
    if (!dev) add("decode_vanilla_b32", "decode vanilla, batch 32", "tok/s", bench_decode(V, 32, rounds));
    add("decode_bt_b1", "decode bt, batch 1", "tok/s", bench_decode(P, 1, rounds * 8));
    if (!dev) add("decode_bt_b32", "decode bt, batch 32", "tok/s", bench_decode(P, 32, rounds));

    // the training step's matmuls at batch 32 x ~40 positions: q/k/v/o, w1/w3, w2, the output head
    const int shapes[][3] = {{1280, 128, 128}, {1280, 128, 384}, {1280, 384, 128}, {1280, 128, 48}, {1024, 1024, 1024}};
    double mm_sum = 0;
    int mm_n = 0;
    for (auto& sh : shapes) {
        std::string key = strf("sgemm_%d_%d_%d", sh[0], sh[1], sh[2]);
        double g = bench_matmul(sh[0], sh[1], sh[2], true, mm_seconds);
        add(key, strf("matmul %dx%d->%d%s", sh[0], sh[1], sh[2], dev ? " (plain kernel)" : ""), "GFLOP/s", g);
        if (sh[0] == 1280) { mm_sum += g; mm_n++; }
    }
    if (!dev)
        add("naive_1280_128_384", "matmul 1280x128->384 (naive loop)", "GFLOP/s",
            bench_matmul(1280, 128, 384, false, mm_seconds));
    double model_gflops = van * 3 * flops_per_token(V.cfg, mean_T) / 1e9;
    add("train_vanilla_gflops", "train vanilla, model FLOP/s", "GFLOP/s", model_gflops);

    // how the cost grows: width, and the number of boundaries (chain n = lines = boundaries)
    for (int C : {64, 256}) {
        std::vector<std::string> f = base;
        f.insert(f.end(), {"--d-model", std::to_string(C)});
        add(strf("train_vanilla_d%d", C), strf("train vanilla, d_model %d", C), "tok/s", bench_train(f, false, steps));
    }
    for (int n : {4, 8, 16}) {
        double T = 0;
        double v = bench_train(bt, true, steps, n, n, &T);
        add(strf("train_bt_frozen_full_n%d", n), strf("train bt frozen full, %d boundaries (T %.0f)", n, T), "tok/s", v);
    }
    // how it scales with threads: the main rows again on one thread (OMP_NUM_THREADS=1 for these)
#ifdef _OPENMP
    if (!dev && nth > 1) {
        omp_set_num_threads(1);
        add("train_vanilla_1t", "train vanilla, 1 thread", "tok/s", bench_train(base, false, steps));
        add("train_bt_joint_1t", "train bt joint, 1 thread", "tok/s", bench_train(bt, false, steps));
        add("decode_vanilla_b1_1t", "decode vanilla, batch 1, 1 thread", "tok/s", bench_decode(V, 1, rounds * 8));
        add("decode_vanilla_b32_1t", "decode vanilla, batch 32, 1 thread", "tok/s", bench_decode(V, 32, rounds));
        omp_set_num_threads(nth);
    }
#endif
    if (!dev) add("peak_rss", "peak resident memory", "MiB", peak_rss_mib());

    // the table
    double peak = torch.count("sgemm_peak") ? torch["sgemm_peak"].value : 0;
    if (torch.count("sgemm_1024_1024_1024")) peak = std::max(peak, torch["sgemm_1024_1024_1024"].value);
    if (dev) printf("\n%-46s %12s\n", "row", "bt (cuda)");
    else printf("\n%-46s %12s %12s  %-28s %8s\n", "row", "bt", "PyTorch", "(fastest PyTorch)", "bt/torch");
    for (auto& r : rows) {
        auto it = torch.find(r.key);
        if (dev) {
            printf("%-46s %12.1f\n", (r.label + " " + r.unit).c_str(), r.bt);
            continue;
        }
        if (r.key == "train_vanilla_gflops" && peak > 0) {
            printf("%-46s %12.1f %12.1f  %-28s %7.0f%%\n", (r.label + " / sgemm peak").c_str(), r.bt, peak,
                   "OpenBLAS sgemm 1024^3", 100 * r.bt / peak);
            continue;
        }
        if (it == torch.end()) {
            printf("%-46s %12.1f %12s  %-28s %8s\n", (r.label + " " + r.unit).c_str(), r.bt, "-", "", "");
            continue;
        }
        double ratio = r.key == "peak_rss" ? it->second.value / r.bt : r.bt / it->second.value;
        printf("%-46s %12.1f %12.1f  %-28s %7.2fx%s\n", (r.label + " " + r.unit).c_str(), r.bt, it->second.value,
               it->second.impl.substr(0, 28).c_str(), ratio, r.key == "peak_rss" ? " less" : "");
    }
    if (mm_n && !torch.empty()) {
        double tsum = 0;
        int tn = 0;
        for (auto& sh : shapes)
            if (sh[0] == 1280 && torch.count(strf("sgemm_%d_%d_%d", sh[0], sh[1], sh[2]))) {
                tsum += torch[strf("sgemm_%d_%d_%d", sh[0], sh[1], sh[2])].value;
                tn++;
            }
        if (tn == mm_n) printf("%-46s %12.1f %12.1f  %-28s %7.0f%%\n", "matmul at the model's shapes (mean GFLOP/s)",
                               mm_sum / mm_n, tsum / tn, "OpenBLAS sgemm, same shapes", 100 * mm_sum / tsum);
    }
    if (dev)
        printf("\nOn %s through kernels.cu: plain kernels (one thread per output, no shared memory),\n"
               "launched one op at a time from one host thread. Decoding feeds the reference continuation token\n"
               "by token (the greedy choice is computed at each step), one sequence at a time. FLOPs per\n"
               "training token: %.2f MFLOP (3 x forward at mean T %.1f).\n", device_name().c_str(),
               3 * flops_per_token(V.cfg, mean_T) / 1e6, mean_T);
    else
        printf("\nthreads: %d. Decoding feeds the reference continuation token by token (the greedy choice is\n"
               "computed at each step); batch 32 = 32 sequences in batched decoders, as bt eval runs them.\n"
               "FLOPs per training token: %.2f MFLOP (3 x forward at mean T %.1f).\n", nth, 3 * flops_per_token(V.cfg, mean_T) / 1e6, mean_T);
}

#ifndef BT_TESTING
int main(int argc, char** argv) {
    try {
        Args a;
        if (!parse_args(a, argc, argv)) return 0;
        if (a.cmd == "train") cmd_train(a);
        else if (a.cmd == "eval") cmd_eval(a);
        else if (a.cmd == "generate") cmd_generate(a);
        else if (a.cmd == "score") cmd_score(a);
        else if (a.cmd == "bench") cmd_bench(a);
        else if (a.cmd == "experiment") cmd_experiment(a);
        else if (a.cmd == "probe") cmd_probe(a);
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
