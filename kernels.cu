// kernels.cu -- CUDA versions of the ops in tensor.hpp (forward and backward) and of the Cache
// Processor's steps in bt.cpp, one plain kernel per op, launched by a function with the CPU op's
// name and argument list in namespace cuda:  cuda::matmul_forward(out, inp, W, WT, N, IC, OC).
// Every pointer a launcher takes is a device pointer. bt --device cuda (make USE_CUDA=1) runs the
// whole model through these launchers: bt.cpp's OP(call) picks cuda::call instead of the CPU op.
// A few launchers exist for that alone: clipping (after adamw_update), the undo log's restore,
// zeroing and copies (at the end).
//
// The rules, so that a kernel reads like the loop it replaces and gives the same numbers:
//   * each CUDA thread computes its own outputs: no shared memory, no __syncthreads, no atomicAdd.
//     A weight gradient is one thread per weight element that loops over the rows in order.
//   * sums run in the same order as the CPU loop (same start, same association), so results are
//     deterministic and match the CPU ops to the last bit or so: only fused multiply-adds differ
//     (nvcc fuses a*b + c by default; g++ -O2 and up with -march=native may fuse differently in
//     the kernel and in tensor.hpp's tiled matmul). At -O1 on the CPU every kernel is bit-identical.
//   * backward kernels ACCUMULATE (+=) like tensor.hpp; a nullptr weight gradient is skipped.
//   * rows are time-major (r = t*B + b), as everywhere in bt.
//
// Without nvcc (g++ -x c++), tests/cuda_on_cpu.hpp stands in for CUDA: a launch loops over every
// block and thread on the CPU. tests/test_kernels.cpp runs every kernel that way in `make test`,
// and on a real GPU under `make USE_CUDA=1 test`, comparing each with its CPU op.
#ifndef BT_KERNELS_CU   // an include guard: bt.cpp and the tests may both include this file
#define BT_KERNELS_CU
#include <cmath>
#include <cstdio>
#include <cstdlib>

#ifdef __CUDACC__
// LAUNCH(kernel, grid, block, args...): one spelling for both compilers
#define LAUNCH(kernel, grid, block, ...) kernel<<<(grid), (block)>>>(__VA_ARGS__)
#else
#include "tests/cuda_on_cpu.hpp"
#endif

// every CUDA call and every launch is checked: file, line and CUDA's message, then exit 1
#define cudaCheck(err) cuda_check((err), __FILE__, __LINE__)
static void cuda_check(cudaError_t err, const char* file, int line) {
    if (err == cudaSuccess) return;
    fprintf(stderr, "CUDA error at %s:%d: %s\n", file, line, cudaGetErrorString(err));
    exit(1);
}

namespace cuda {

// 256 threads per block, as many blocks as it takes to give every output its thread (at least
// one block, so an empty launch is still a valid one)
static const int THREADS = 256;
static int blocks_for(long n) { return n > 0 ? (int)((n + THREADS - 1) / THREADS) : 1; }

// this thread's number in a 1-D launch
__device__ inline long thread_index() { return (long)blockIdx.x * blockDim.x + threadIdx.x; }

// after each launch: did it start? (a bad launch is only reported by the next CUDA call)
static void check_launch() { cudaCheck(cudaGetLastError()); }

// ==============================================================================================
// Embedding: out[r, :] = emb[tok[r], :]          out (N,C), tok (N), emb (V,C)
// one thread per output number (r, c)
__global__ void embedding_forward_kernel(float* out, const int* tok, const float* emb, int N, int C) {
    long i = thread_index();
    if (i >= (long)N * C) return;
    long r = i / C, c = i % C;
    out[i] = emb[(long)tok[r] * C + c];
}
void embedding_forward(float* out, const int* tok, const float* emb, int N, int C) {
    LAUNCH(embedding_forward_kernel, blocks_for((long)N * C), THREADS, out, tok, emb, N, C);
    check_launch();
}

// forward copied a row of emb, so demb[tok[r], c] += dout[r, c]. Rows with the same token add into
// the same row of demb, so one thread owns a whole column c of demb and walks the rows r in order
// (the CPU order). V is not an argument, hence columns rather than (token, column) pairs.
__global__ void embedding_backward_kernel(float* demb, const float* dout, const int* tok, int N, int C) {
    long c = thread_index();
    if (c >= C) return;
    for (int r = 0; r < N; r++) demb[(long)tok[r] * C + c] += dout[(long)r * C + c];
}
void embedding_backward(float* demb, const float* dout, const int* tok, int N, int C) {
    LAUNCH(embedding_backward_kernel, blocks_for(C), THREADS, demb, dout, tok, N, C);
    check_launch();
}

// ==============================================================================================
// Matmul (a linear layer without bias): out[n, o] = sum_k inp[n, k] * W[o, k]
// out (N,OC), inp (N,IC), W (OC,IC). One thread per output (n, o), summing k = 0.. in order.
__global__ void matmul_forward_kernel(float* out, const float* inp, const float* W, int N, int IC, int OC) {
    long i = thread_index();
    if (i >= (long)N * OC) return;
    long n = i / OC, o = i % OC;
    float acc = 0.0f;
    for (int k = 0; k < IC; k++) acc = fmaf(inp[n * IC + k], W[o * IC + k], acc);
    out[i] = acc;
}
// WT (the CPU's transposed copy of W, for its one-row matmuls) is not used here: W is read as stored
void matmul_forward(float* out, const float* inp, const float* W, const float* /*WT*/, int N, int IC, int OC) {
    LAUNCH(matmul_forward_kernel, blocks_for((long)N * OC), THREADS, out, inp, W, N, IC, OC);
    check_launch();
}

// forward did out[n,o] = sum_k inp[n,k] W[o,k], so
//   dinp[n, k] += sum_o dout[n,o] * W[o,k]     one thread per (n, k), summing o in order
__global__ void matmul_backward_input_kernel(float* dinp, const float* dout, const float* W, int N, int IC, int OC) {
    long i = thread_index();
    if (i >= (long)N * IC) return;
    long n = i / IC, k = i % IC;
    float acc = 0.0f;
    for (int o = 0; o < OC; o++) acc = fmaf(dout[n * OC + o], W[(long)o * IC + k], acc);
    dinp[i] += acc;
}
//   dW[o, k] += sum_n dout[n,o] * inp[n,k]     one thread per weight (o, k), summing rows n in order
__global__ void matmul_backward_weight_kernel(float* dW, const float* dout, const float* inp, int N, int IC, int OC) {
    long i = thread_index();
    if (i >= (long)OC * IC) return;
    long o = i / IC, k = i % IC;
    float acc = 0.0f;
    for (int n = 0; n < N; n++) acc = fmaf(dout[(long)n * OC + o], inp[(long)n * IC + k], acc);
    dW[i] += acc;
}
void matmul_backward(float* dinp, float* dW, const float* dout, const float* inp, const float* W,
                     int N, int IC, int OC) {
    if (dinp) {
        LAUNCH(matmul_backward_input_kernel, blocks_for((long)N * IC), THREADS, dinp, dout, W, N, IC, OC);
        check_launch();
    }
    if (dW) {
        LAUNCH(matmul_backward_weight_kernel, blocks_for((long)OC * IC), THREADS, dW, dout, inp, N, IC, OC);
        check_launch();
    }
}

// ==============================================================================================
// RMSNorm: rstd[n] = 1 / sqrt(mean_c inp[n,c]^2 + eps);  out[n,c] = inp[n,c] * rstd[n] * w[c]
// out (N,C), rstd (N), inp (N,C), w (C). One thread per row n (it needs the whole row's sum).
__global__ void rmsnorm_forward_kernel(float* out, float* rstd, const float* inp, const float* w, int N, int C,
                                       float eps) {
    long n = thread_index();
    if (n >= N) return;
    const float* x = inp + n * C;
    float ss = 0.0f;
    for (int c = 0; c < C; c++) ss += x[c] * x[c];
    float r = 1.0f / sqrtf(ss / C + eps);
    rstd[n] = r;
    for (int c = 0; c < C; c++) out[n * C + c] = x[c] * r * w[c];
}
void rmsnorm_forward(float* out, float* rstd, const float* inp, const float* w, int N, int C, float eps) {
    LAUNCH(rmsnorm_forward_kernel, blocks_for(N), THREADS, out, rstd, inp, w, N, C, eps);
    check_launch();
}

// forward did out = x * r * w with r = (mean x^2 + eps)^-1/2, so with g = dout * w:
//   dx[c] += r * g[c] - x[c] * r^3 * (sum_c' g[c'] x[c']) / C      one thread per row n
__global__ void rmsnorm_backward_input_kernel(float* dinp, const float* dout, const float* inp, const float* w,
                                              const float* rstd, int N, int C) {
    long n = thread_index();
    if (n >= N) return;
    const float* x = inp + n * C;
    const float* go = dout + n * C;
    float r = rstd[n], dot = 0.0f;
    for (int c = 0; c < C; c++) dot += go[c] * w[c] * x[c];
    float* dx = dinp + n * C;
    for (int c = 0; c < C; c++) dx[c] += r * go[c] * w[c] - x[c] * r * r * r * dot / C;
}
//   dw[c] += sum_n dout[n,c] * x[n,c] * r[n]      one thread per channel c, rows n in order
__global__ void rmsnorm_backward_weight_kernel(float* dw, const float* dout, const float* inp, const float* rstd,
                                               int N, int C) {
    long c = thread_index();
    if (c >= C) return;
    float acc = 0.0f;
    for (int n = 0; n < N; n++) acc += dout[(long)n * C + c] * inp[(long)n * C + c] * rstd[n];
    dw[c] += acc;
}
void rmsnorm_backward(float* dinp, float* dw, const float* dout, const float* inp, const float* w,
                      const float* rstd, int N, int C) {
    LAUNCH(rmsnorm_backward_input_kernel, blocks_for(N), THREADS, dinp, dout, inp, w, rstd, N, C);
    check_launch();
    if (dw) {
        LAUNCH(rmsnorm_backward_weight_kernel, blocks_for(C), THREADS, dw, dout, inp, rstd, N, C);
        check_launch();
    }
}

// ==============================================================================================
// RoPE, half-split: inside every head of size HS, pair i with i + h (h = HS/2) and rotate by
// a = pos * theta^(-2i/HS):
//   out[i] = x[i] cos a - x[i+h] sin a ;  out[i+h] = x[i] sin a + x[i+h] cos a
// out, inp (N, NH*HS); pos (N). out may equal inp: a thread reads its pair before writing it.
// One thread per pair (n, head, i).
//
// tensor.hpp's rope_angle, made callable on the device: the angle and its cos/sin in double, then
// rounded to float
__device__ inline void rope_angle(float* c, float* s, int pos, int i, int HS, float theta) {
    double a = pos * pow((double)theta, -2.0 * i / HS);
    *c = (float)cos(a);
    *s = (float)sin(a);
}

__global__ void rope_forward_kernel(float* out, const float* inp, const int* pos, int N, int NH, int HS,
                                    float theta) {
    int h = HS / 2;
    long t = thread_index();
    if (t >= (long)N * NH * h) return;
    long n = t / ((long)NH * h);
    int hh = (int)(t / h % NH), i = (int)(t % h);
    float c, s;
    rope_angle(&c, &s, pos[n], i, HS, theta);
    long o = n * NH * HS + (long)hh * HS;
    float x0 = inp[o + i], x1 = inp[o + i + h];
    out[o + i] = x0 * c - x1 * s;
    out[o + i + h] = x0 * s + x1 * c;
}
void rope_forward(float* out, const float* inp, const int* pos, int N, int NH, int HS, float theta) {
    LAUNCH(rope_forward_kernel, blocks_for((long)N * NH * (HS / 2)), THREADS, out, inp, pos, N, NH, HS, theta);
    check_launch();
}

// forward was a rotation R(a); its transpose is the rotation by -a, so
//   dx[i] += dout[i] cos a + dout[i+h] sin a ;  dx[i+h] += -dout[i] sin a + dout[i+h] cos a
__global__ void rope_backward_kernel(float* dinp, const float* dout, const int* pos, int N, int NH, int HS,
                                     float theta) {
    int h = HS / 2;
    long t = thread_index();
    if (t >= (long)N * NH * h) return;
    long n = t / ((long)NH * h);
    int hh = (int)(t / h % NH), i = (int)(t % h);
    float c, s;
    rope_angle(&c, &s, pos[n], i, HS, theta);
    long o = n * NH * HS + (long)hh * HS;
    float g0 = dout[o + i], g1 = dout[o + i + h];
    dinp[o + i] += g0 * c + g1 * s;
    dinp[o + i + h] += -g0 * s + g1 * c;
}
void rope_backward(float* dinp, const float* dout, const int* pos, int N, int NH, int HS, float theta) {
    LAUNCH(rope_backward_kernel, blocks_for((long)N * NH * (HS / 2)), THREADS, dinp, dout, pos, N, NH, HS, theta);
    check_launch();
}

// ==============================================================================================
// Multi-head attention, exactly tensor.hpp's layout:
//   query i of example b is row i*B + b and sits at absolute position q0 + i; key j is row j*B + b.
//   If causal, query i sees keys j <= q0 + i (nk = q0 + i + 1 of them), else all Tk keys.
//   att[i,b,h,j] = softmax_j( q[i,b,h,:] . k[j,b,h,:] / sqrt(HS) )
//   out[i,b,h,:] = sum_j att[i,b,h,j] * v[j,b,h,:]
// out (Tq,B,NH*HS), att (Tq,B,NH,ld) with ld >= Tk (entries past the visible keys are 0),
// q (Tq,B,NH*HS), k, v (Tk,B,NH*HS).
//
// tensor.hpp's dot8: the dot product in 8 interleaved partial sums. The same order here gives the
// same scores, so the processor's top-k selection sees the same numbers as on the CPU.
__device__ inline float dot8(const float* x, const float* y, int n) {
    float p[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    int i = 0;
    for (; i + 8 <= n; i += 8)
        for (int u = 0; u < 8; u++) p[u] += x[i + u] * y[i + u];
    float s = ((p[0] + p[1]) + (p[2] + p[3])) + ((p[4] + p[5]) + (p[6] + p[7]));
    for (; i < n; i++) s += x[i] * y[i];
    return s;
}

// one thread per (query i, example b, head h): its row of att and its HS outputs
__global__ void attention_forward_kernel(float* out, float* att, const float* q, const float* k, const float* v,
                                         int Tq, int Tk, int ld, int q0, int causal, int B, int NH, int HS) {
    long t = thread_index();
    if (t >= (long)Tq * B * NH) return;
    int i = (int)(t / ((long)B * NH)), b = (int)(t / NH % B), h = (int)(t % NH);
    int C = NH * HS;
    float scale = 1.0f / sqrtf((float)HS);
    int nk = causal ? q0 + i + 1 : Tk;
    const float* qi = q + ((long)i * B + b) * C + h * HS;
    float* a = att + t * ld;  // t = (i*B + b)*NH + h
    // scores and their max
    float mx = -INFINITY;
    for (int j = 0; j < nk; j++) {
        a[j] = dot8(qi, k + ((long)j * B + b) * C + h * HS, HS) * scale;
        if (a[j] > mx) mx = a[j];
    }
    // softmax
    float sum = 0.0f;
    for (int j = 0; j < nk; j++) { a[j] = expf(a[j] - mx); sum += a[j]; }
    for (int j = 0; j < nk; j++) a[j] /= sum;
    for (int j = nk; j < Tk; j++) a[j] = 0.0f;   // masked keys (columns past Tk are not written)
    // weighted sum of values
    float* oi = out + ((long)i * B + b) * C + h * HS;
    for (int d = 0; d < HS; d++) oi[d] = 0.0f;
    for (int j = 0; j < nk; j++) {
        const float* vj = v + ((long)j * B + b) * C + h * HS;
        for (int d = 0; d < HS; d++) oi[d] += a[j] * vj[d];
    }
}
void attention_forward(float* out, float* att, const float* q, const float* k, const float* v,
                       int Tq, int Tk, int ld, int q0, int causal, int B, int NH, int HS) {
    LAUNCH(attention_forward_kernel, blocks_for((long)Tq * B * NH), THREADS, out, att, q, k, v, Tq, Tk, ld, q0,
           causal, B, NH, HS);
    check_launch();
}

// forward did out = sum_j a_j v_j with a = softmax(s), s_j = q.k_j * scale, so per (i,b,h):
//   da_j = dout . v_j ;  ds_j = a_j (da_j - sum_j' a_j' da_j')
//   dq += scale * sum_j ds_j k_j ;  dk_j += scale * ds_j q ;  dv_j += a_j dout
// dq belongs to a query, dk and dv to a key, so the backward is three kernels: the per-query sum
// adot = sum_j a_j da_j into a scratch buffer, then dq with one thread per query, then dk, dv with
// one thread per key that walks the queries i in order (the CPU order) and recomputes da_j.
//
// adot (Tq,B,NH): one thread per (i, b, h)
__global__ void attention_backward_adot_kernel(float* adot, const float* dout, const float* att, const float* v,
                                               int Tq, int Tk, int ld, int q0, int causal, int B, int NH, int HS) {
    long t = thread_index();
    if (t >= (long)Tq * B * NH) return;
    int i = (int)(t / ((long)B * NH)), b = (int)(t / NH % B), h = (int)(t % NH);
    int C = NH * HS;
    int nk = causal ? q0 + i + 1 : Tk;
    const float* a = att + t * ld;
    const float* go = dout + ((long)i * B + b) * C + h * HS;
    float acc = 0.0f;
    for (int j = 0; j < nk; j++) acc += a[j] * dot8(go, v + ((long)j * B + b) * C + h * HS, HS);
    adot[t] = acc;
}
// dq[i,b,h,:] += scale * sum_j ds_j k_j: one thread per (i, b, h), keys j in order
__global__ void attention_backward_query_kernel(float* dq, const float* adot, const float* dout, const float* att,
                                                const float* k, const float* v, int Tq, int Tk, int ld, int q0,
                                                int causal, int B, int NH, int HS) {
    long t = thread_index();
    if (t >= (long)Tq * B * NH) return;
    int i = (int)(t / ((long)B * NH)), b = (int)(t / NH % B), h = (int)(t % NH);
    int C = NH * HS;
    float scale = 1.0f / sqrtf((float)HS);
    int nk = causal ? q0 + i + 1 : Tk;
    long ro = ((long)i * B + b) * C + h * HS;
    const float* a = att + t * ld;
    for (int j = 0; j < nk; j++) {
        long rj = ((long)j * B + b) * C + h * HS;
        float ds = a[j] * (dot8(dout + ro, v + rj, HS) - adot[t]) * scale;
        for (int d = 0; d < HS; d++) dq[ro + d] += ds * k[rj + d];
    }
}
// dk[j,b,h,:] += scale * sum_i ds_ij q_i ;  dv[j,b,h,:] += sum_i a_ij dout_i
// one thread per (key j, b, h), queries i in order, skipping those that do not see key j
__global__ void attention_backward_key_kernel(float* dk, float* dv, const float* adot, const float* dout,
                                              const float* att, const float* q, const float* v, int Tq, int Tk,
                                              int ld, int q0, int causal, int B, int NH, int HS) {
    long t = thread_index();
    if (t >= (long)Tk * B * NH) return;
    int j = (int)(t / ((long)B * NH)), b = (int)(t / NH % B), h = (int)(t % NH);
    int C = NH * HS;
    float scale = 1.0f / sqrtf((float)HS);
    long rj = ((long)j * B + b) * C + h * HS;
    for (int i = 0; i < Tq; i++) {
        int nk = causal ? q0 + i + 1 : Tk;
        if (j >= nk) continue;
        long qi = ((long)i * B + b) * NH + h;  // this query's (i, b, h) index into att and adot
        long ro = ((long)i * B + b) * C + h * HS;
        float aj = att[qi * ld + j];
        float ds = aj * (dot8(dout + ro, v + rj, HS) - adot[qi]) * scale;
        for (int d = 0; d < HS; d++) {
            dk[rj + d] += ds * q[ro + d];
            dv[rj + d] += aj * dout[ro + d];
        }
    }
}

// a device scratch buffer for adot, grown when needed and kept (like tensor.hpp's scratch)
static float* attention_scratch(long n) {
    static float* buf = nullptr;
    static long cap = 0;
    if (n > cap) {
        if (buf) cudaCheck(cudaFree(buf));
        cudaCheck(cudaMalloc(&buf, sizeof(float) * n));
        cap = n;
    }
    return buf;
}

void attention_backward(float* dq, float* dk, float* dv, const float* dout, const float* att,
                        const float* q, const float* k, const float* v,
                        int Tq, int Tk, int ld, int q0, int causal, int B, int NH, int HS) {
    long nq = (long)Tq * B * NH, nkey = (long)Tk * B * NH;
    float* adot = attention_scratch(nq);
    LAUNCH(attention_backward_adot_kernel, blocks_for(nq), THREADS, adot, dout, att, v, Tq, Tk, ld, q0, causal, B,
           NH, HS);
    check_launch();
    LAUNCH(attention_backward_query_kernel, blocks_for(nq), THREADS, dq, adot, dout, att, k, v, Tq, Tk, ld, q0,
           causal, B, NH, HS);
    check_launch();
    LAUNCH(attention_backward_key_kernel, blocks_for(nkey), THREADS, dk, dv, adot, dout, att, q, v, Tq, Tk, ld, q0,
           causal, B, NH, HS);
    check_launch();
}

// ==============================================================================================
// SwiGLU gate: out = silu(h1) * h3, silu(x) = x * sigmoid(x).   out, h1, h3 (N); one thread each
__global__ void swiglu_forward_kernel(float* out, const float* h1, const float* h3, long N) {
    long i = thread_index();
    if (i >= N) return;
    float sg = 1.0f / (1.0f + expf(-h1[i]));
    out[i] = h1[i] * sg * h3[i];
}
void swiglu_forward(float* out, const float* h1, const float* h3, long N) {
    LAUNCH(swiglu_forward_kernel, blocks_for(N), THREADS, out, h1, h3, N);
    check_launch();
}

// forward did out = h1 sigma(h1) h3, so
//   dh3 += dout * h1 sigma(h1) ;  dh1 += dout * h3 * sigma(h1) (1 + h1 (1 - sigma(h1)))
__global__ void swiglu_backward_kernel(float* dh1, float* dh3, const float* dout, const float* h1, const float* h3,
                                       long N) {
    long i = thread_index();
    if (i >= N) return;
    float sg = 1.0f / (1.0f + expf(-h1[i]));
    dh3[i] += dout[i] * h1[i] * sg;
    dh1[i] += dout[i] * h3[i] * sg * (1.0f + h1[i] * (1.0f - sg));
}
void swiglu_backward(float* dh1, float* dh3, const float* dout, const float* h1, const float* h3, long N) {
    LAUNCH(swiglu_backward_kernel, blocks_for(N), THREADS, dh1, dh3, dout, h1, h3, N);
    check_launch();
}

// ==============================================================================================
// Residual add: out = a + b   (N); one thread each
__global__ void residual_forward_kernel(float* out, const float* a, const float* b, long N) {
    long i = thread_index();
    if (i >= N) return;
    out[i] = a[i] + b[i];
}
void residual_forward(float* out, const float* a, const float* b, long N) {
    LAUNCH(residual_forward_kernel, blocks_for(N), THREADS, out, a, b, N);
    check_launch();
}
// forward did out = a + b, so da += dout and db += dout
__global__ void residual_backward_kernel(float* da, float* db, const float* dout, long N) {
    long i = thread_index();
    if (i >= N) return;
    da[i] += dout[i];
    db[i] += dout[i];
}
void residual_backward(float* da, float* db, const float* dout, long N) {
    LAUNCH(residual_backward_kernel, blocks_for(N), THREADS, da, db, dout, N);
    check_launch();
}

// ==============================================================================================
// Softmax cross-entropy with a per-row weight (0 masks a row out):
//   probs[n,:] = softmax(logits[n,:]);  loss[n] = -log probs[n, target[n]]   (0 where weight is 0)
// probs, logits (N,V); loss, weight (N); target (N). One thread per row n.
__global__ void crossentropy_forward_kernel(float* loss, float* probs, const float* logits, const int* target,
                                            const float* weight, int N, int V) {
    long n = thread_index();
    if (n >= N) return;
    const float* z = logits + n * V;
    float* p = probs + n * V;
    float mx = -INFINITY;
    for (int i = 0; i < V; i++) mx = z[i] > mx ? z[i] : mx;
    float sum = 0.0f;
    for (int i = 0; i < V; i++) { p[i] = expf(z[i] - mx); sum += p[i]; }
    for (int i = 0; i < V; i++) p[i] /= sum;
    // -log p[target] from the logits, which stays finite where p underflows
    loss[n] = weight[n] != 0.0f ? (mx + logf(sum) - z[target[n]]) : 0.0f;
}
void crossentropy_forward(float* loss, float* probs, const float* logits, const int* target, const float* weight,
                          int N, int V) {
    LAUNCH(crossentropy_forward_kernel, blocks_for(N), THREADS, loss, probs, logits, target, weight, N, V);
    check_launch();
}

// forward gave weight * -log softmax(z)[y], so dz[i] += weight * (p[i] - [i == y]) * dloss
// one thread per logit (n, i)
__global__ void crossentropy_backward_kernel(float* dlogits, const float* probs, const int* target,
                                             const float* weight, float dloss, int N, int V) {
    long t = thread_index();
    if (t >= (long)N * V) return;
    long n = t / V, i = t % V;
    if (weight[n] == 0.0f) return;
    float w = weight[n] * dloss;
    dlogits[t] += w * (probs[t] - (i == target[n] ? 1.0f : 0.0f));
}
void crossentropy_backward(float* dlogits, const float* probs, const int* target, const float* weight, float dloss,
                           int N, int V) {
    LAUNCH(crossentropy_backward_kernel, blocks_for((long)N * V), THREADS, dlogits, probs, target, weight, dloss, N,
           V);
    check_launch();
}

// ==============================================================================================
// AdamW, as torch.optim.AdamW, step t >= 1; one thread per parameter:
//   p -= lr * wd * p ;  m = b1 m + (1-b1) g ;  v = b2 v + (1-b2) g^2
//   p -= lr * (m / (1-b1^t)) / (sqrt(v / (1-b2^t)) + eps)
// The bias corrections bc1 = 1-b1^t, bc2 = 1-b2^t are computed once, on the host, as on the CPU.
__global__ void adamw_update_kernel(float* p, float* m, float* v, const float* g, long N, float lr, float b1,
                                    float b2, float eps, float wd, float bc1, float bc2) {
    long i = thread_index();
    if (i >= N) return;
    p[i] -= lr * wd * p[i];
    m[i] = b1 * m[i] + (1.0f - b1) * g[i];
    v[i] = b2 * v[i] + (1.0f - b2) * g[i] * g[i];
    float mh = m[i] / bc1, vh = v[i] / bc2;
    p[i] -= lr * mh / (sqrtf(vh) + eps);
}
void adamw_update(float* p, float* m, float* v, const float* g, long N, float lr, float b1, float b2, float eps,
                  float wd, int t) {
    float bc1 = 1.0f - powf(b1, (float)t), bc2 = 1.0f - powf(b2, (float)t);
    LAUNCH(adamw_update_kernel, blocks_for(N), THREADS, p, m, v, g, N, lr, b1, b2, eps, wd, bc1, bc2);
    check_launch();
}

// ==============================================================================================
// Gradient clipping (bt.cpp's optimizer_step): the squared norm, then a scale.
//
// sum_squares: acc + sum_i x[i]^2 in double.   x (n)
// SUMSQ_PARTS threads each sum one contiguous slice of x in index order into partial[t]; the host
// then adds the partial sums in order. The CPU keeps one running sum instead, so the two agree to
// double rounding, not bitwise (the norm only sets the clipping factor).
static const int SUMSQ_PARTS = 1024;
__global__ void sum_squares_kernel(double* partial, const float* x, long n) {
    long t = thread_index();
    if (t >= SUMSQ_PARTS) return;
    long per = (n + SUMSQ_PARTS - 1) / SUMSQ_PARTS;
    long i0 = t * per, i1 = i0 + per < n ? i0 + per : n;
    double acc = 0.0;
    for (long i = i0; i < i1; i++) acc += (double)x[i] * x[i];
    partial[t] = acc;
}
double sum_squares(double acc, const float* x, long n) {
    static double* partial = nullptr;   // (SUMSQ_PARTS) on the device, allocated once
    static double host[SUMSQ_PARTS];
    if (!partial) cudaCheck(cudaMalloc(&partial, sizeof(double) * SUMSQ_PARTS));
    LAUNCH(sum_squares_kernel, blocks_for(SUMSQ_PARTS), THREADS, partial, x, n);
    check_launch();
    cudaCheck(cudaMemcpy(host, partial, sizeof(double) * SUMSQ_PARTS, cudaMemcpyDeviceToHost));
    for (int t = 0; t < SUMSQ_PARTS; t++) acc += host[t];
    return acc;
}

// scale_inplace: x[i] *= a.   x (n); one thread each
__global__ void scale_inplace_kernel(float* x, float a, long n) {
    long i = thread_index();
    if (i >= n) return;
    x[i] *= a;
}
void scale_inplace(float* x, float a, long n) {
    LAUNCH(scale_inplace_kernel, blocks_for(n), THREADS, x, a, n);
    check_launch();
}

// ==============================================================================================
// THE CACHE PROCESSOR (bt.cpp), at the boundary after segment [s,e), per backbone layer:
//   1. select  2. gather  3. transform  4. write back
// The transform is a small non-causal transformer (matmul, rmsnorm, rope, attention, swiglu,
// residual): on the device it is the same composition of the launchers above, so it has no kernel
// of its own here.
//
// 1. select. score(b, p) = mean over heads h and the segment's queries t in [s,e) of att[t,b,h,p]
//    (bt.cpp's attention_mass, summed in the same order); att (T,B,NH,T), scores (B,T).
__device__ inline float attention_mass(const float* att, int s, int e, int b, int p, int B, int NH, int T) {
    float acc = 0.0f;
    for (int t = s; t < e; t++)
        for (int h = 0; h < NH; h++) acc += att[(((long)t * B + b) * NH + h) * T + p];
    return acc / (float)(NH * (e - s));
}
// one thread per (b, older position p < s)
__global__ void select_scores_kernel(float* scores, const float* att, int s, int e, int B, int NH, int T) {
    long i = thread_index();
    if (i >= (long)B * s) return;
    int b = (int)(i / s), p = (int)(i % s);
    scores[(long)b * T + p] = attention_mass(att, s, e, b, p, B, NH, T);
}
// sel (nS,B) gets, per sequence b, the top-kk older positions ascending, then s..e-1. Top-kk by
// repeated argmax: strict > keeps the smaller position on ties, and a chosen position's score is
// set to -inf (as on the CPU, so scores end up the same too). Periodic schedule: sel = 0..e-1.
// One thread per sequence b (kk is small).
__global__ void select_kernel(int* sel, float* scores, int s, int e, int B, int T, int kk, int periodic) {
    long b = thread_index();
    if (b >= B) return;
    if (periodic) {
        for (int n = 0; n < e; n++) sel[(long)n * B + b] = n;
        return;
    }
    float* sc = scores + b * T;
    int chosen[64];
    for (int r = 0; r < kk; r++) {
        int best = 0;
        for (int p = 1; p < s; p++)
            if (sc[p] > sc[best]) best = p;
        sc[best] = -INFINITY;
        chosen[r] = best;
    }
    // ascending order (insertion sort: kk is small; the positions are distinct)
    for (int r = 1; r < kk; r++)
        for (int q = r; q > 0 && chosen[q - 1] > chosen[q]; q--) {
            int tmp = chosen[q];
            chosen[q] = chosen[q - 1];
            chosen[q - 1] = tmp;
        }
    for (int r = 0; r < kk; r++) sel[(long)r * B + b] = chosen[r];
    for (int t = s; t < e; t++) sel[(long)(kk + t - s) * B + b] = t;
}
// returns nS, which the host knows without looking at the scores
int select_forward(int* sel, float* scores, const float* att, int s, int e, int B, int NH, int T, int k,
                   int periodic) {
    int kk = k < s ? k : s;
    if (!periodic && kk > 64) {
        fprintf(stderr, "cuda::select_forward: k = %d, at most 64 supported\n", k);
        exit(1);
    }
    if (!periodic && s > 0) {
        LAUNCH(select_scores_kernel, blocks_for((long)B * s), THREADS, scores, att, s, e, B, NH, T);
        check_launch();
    }
    LAUNCH(select_kernel, blocks_for(B), THREADS, sel, scores, s, e, B, T, kk, periodic);
    check_launch();
    return periodic ? e : kk + (e - s);
}

// 2. gather: u[n,b,:] = [ K[sel[n,b], b, :] | V[sel[n,b], b, :] ]      u (nS,B,2C), K,V (T,B,C)
// one thread per number of u; row r = n*B + b
__global__ void gather_forward_kernel(float* u, const float* K, const float* V, const int* sel, int nS, int B,
                                      int C) {
    long i = thread_index();
    if (i >= (long)nS * B * 2 * C) return;
    long r = i / (2 * C);
    int c = (int)(i % (2 * C));
    long src = ((long)sel[r] * B + r % B) * C;
    u[i] = c < C ? K[src + c] : V[src + c - C];
}
void gather_forward(float* u, const float* K, const float* V, const int* sel, int nS, int B, int C) {
    LAUNCH(gather_forward_kernel, blocks_for((long)nS * B * 2 * C), THREADS, u, K, V, sel, nS, B, C);
    check_launch();
}
// forward copied cache rows into u, so dK[sel] += du[:C], dV[sel] += du[C:]. The positions of one
// sequence are distinct, so no two threads write the same number. One thread per (r, c).
__global__ void gather_backward_kernel(float* dK, float* dV, const float* du, const int* sel, int nS, int B,
                                       int C) {
    long i = thread_index();
    if (i >= (long)nS * B * C) return;
    long r = i / C;
    int c = (int)(i % C);
    long dst = ((long)sel[r] * B + r % B) * C;
    dK[dst + c] += du[r * 2 * C + c];
    dV[dst + c] += du[r * 2 * C + C + c];
}
void gather_backward(float* dK, float* dV, const float* du, const int* sel, int nS, int B, int C) {
    LAUNCH(gather_backward_kernel, blocks_for((long)nS * B * C), THREADS, dK, dV, du, sel, nS, B, C);
    check_launch();
}

// 4. write back, in place: K[sel] += sigmoid(g) delta[:C], V[sel] += sigmoid(g) delta[C:]
// delta (nS,B,2C), gate (1). One thread per (r, c); each reads the gate itself.
__device__ inline float sigmoidf(float x) { return 1.0f / (1.0f + expf(-x)); }

__global__ void write_back_forward_kernel(float* K, float* V, const float* delta, const float* gate, const int* sel,
                                          int nS, int B, int C) {
    long i = thread_index();
    if (i >= (long)nS * B * C) return;
    long r = i / C;
    int c = (int)(i % C);
    float sg = sigmoidf(gate[0]);
    long dst = ((long)sel[r] * B + r % B) * C;
    K[dst + c] += sg * delta[r * 2 * C + c];
    V[dst + c] += sg * delta[r * 2 * C + C + c];
}
void write_back_forward(float* K, float* V, const float* delta, const float* gate, const int* sel, int nS, int B,
                        int C) {
    LAUNCH(write_back_forward_kernel, blocks_for((long)nS * B * C), THREADS, K, V, delta, gate, sel, nS, B, C);
    check_launch();
}

// forward did post = pre + sigmoid(g) delta; d(pre) = d(post) stays in dK, dV. Here
//   ddelta = sigmoid(g) d(post)                        (WRITTEN, not added: a scratch buffer)
//   dg += sigmoid'(g) sum_r,c d(post) . delta          (in double, one thread, the CPU's order)
__global__ void write_back_backward_kernel(float* ddelta, const float* dK, const float* dV, const float* gate,
                                           const int* sel, int nS, int B, int C) {
    long i = thread_index();
    if (i >= (long)nS * B * C) return;
    long r = i / C;
    int c = (int)(i % C);
    float sg = sigmoidf(gate[0]);
    long src = ((long)sel[r] * B + r % B) * C;
    ddelta[r * 2 * C + c] = sg * dK[src + c];
    ddelta[r * 2 * C + C + c] = sg * dV[src + c];
}
// the gate is one weight, so one thread sums over everything (slow on a GPU, but exact and short)
__global__ void write_back_gate_kernel(float* dgate, const float* dK, const float* dV, const float* delta,
                                       const float* gate, const int* sel, int nS, int B, int C) {
    if (thread_index() != 0) return;
    float sg = sigmoidf(gate[0]);
    double acc = 0.0;
    for (long r = 0; r < (long)nS * B; r++) {
        long src = ((long)sel[r] * B + r % B) * C;
        for (int c = 0; c < C; c++)
            acc += (double)dK[src + c] * delta[r * 2 * C + c] + (double)dV[src + c] * delta[r * 2 * C + C + c];
    }
    dgate[0] += (float)(acc * sg * (1.0 - sg));
}
void write_back_backward(float* ddelta, float* dgate, const float* dK, const float* dV, const float* delta,
                         const float* gate, const int* sel, int nS, int B, int C) {
    LAUNCH(write_back_backward_kernel, blocks_for((long)nS * B * C), THREADS, ddelta, dK, dV, gate, sel, nS, B, C);
    check_launch();
    if (dgate) {
        LAUNCH(write_back_gate_kernel, 1, 1, dgate, dK, dV, delta, gate, sel, nS, B, C);
        check_launch();
    }
}

// The undo log's restore (bt.cpp's scatter_rows), the inverse of gather, a copy:
//   K[sel[n,b], b, :] = u[n,b,:C] ;  V[sel[n,b], b, :] = u[n,b,C:]
// K,V (T,B,C), u (nS,B,2C), sel (nS,B). One thread per (r, c); positions of one sequence are distinct.
__global__ void scatter_rows_kernel(float* K, float* V, const float* u, const int* sel, int nS, int B, int C) {
    long i = thread_index();
    if (i >= (long)nS * B * C) return;
    long r = i / C;
    int c = (int)(i % C);
    long dst = ((long)sel[r] * B + r % B) * C;
    K[dst + c] = u[r * 2 * C + c];
    V[dst + c] = u[r * 2 * C + C + c];
}
void scatter_rows(float* K, float* V, const float* u, const int* sel, int nS, int B, int C) {
    LAUNCH(scatter_rows_kernel, blocks_for((long)nS * B * C), THREADS, K, V, u, sel, nS, B, C);
    check_launch();
}

// ==============================================================================================
// Buffer plumbing for bt.cpp's device path, named after bt.cpp's CPU functions: no kernels, the
// CUDA runtime's own memset and device-to-device copy.
//   zero: p[i] = 0 (n floats; a float 0 is all zero bytes) ;  copy_floats, copy_ints: dst[i] = src[i]
void zero(float* p, long n) { cudaCheck(cudaMemset(p, 0, sizeof(float) * n)); }
void copy_floats(float* dst, const float* src, long n) {
    cudaCheck(cudaMemcpy(dst, src, sizeof(float) * n, cudaMemcpyDeviceToDevice));
}
void copy_ints(int* dst, const int* src, long n) {
    cudaCheck(cudaMemcpy(dst, src, sizeof(int) * n, cudaMemcpyDeviceToDevice));
}

}  // namespace cuda
#endif  // BT_KERNELS_CU
