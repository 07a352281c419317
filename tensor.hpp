// tensor.hpp -- every op bt needs, as a forward/backward pair of plain loops.
//
// Conventions (as in llm.c):
//   * raw float* buffers, row-major, explicit dims; no autograd graph, no classes.
//   * argument order: outputs, saved stats, inputs, weights, dims.
//     backward: input grads, weight grads, dout, saved inputs, dims.
//   * every backward ACCUMULATES (+=) into its gradient buffers; the caller zeroes them.
//   * a weight-gradient pointer may be nullptr: that gradient is skipped (a frozen weight).
//   * OpenMP only over independent outputs (rows of out, output channels of dW, (b,h) in
//     attention), so no float sum is split across threads: results are bit-identical for any
//     OMP_NUM_THREADS.
//   * matrices are stored [out_features, in_features] as in PyTorch's nn.Linear: y = x W^T.
//
// Activations in bt are "time-major": row r = t*B + b for position t and batch element b, so the
// rows of one segment of positions [s,e) are one contiguous block (rows s*B .. e*B).
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

// ----------------------------------------------------------------------------------------------
// Embedding: out[r, :] = emb[tok[r], :]
// out (N,C), tok (N), emb (V,C)
inline void embedding_forward(float* out, const int* tok, const float* emb, int N, int C) {
    #pragma omp parallel for
    for (int r = 0; r < N; r++) {
        const float* e = emb + (long)tok[r] * C;
        for (int c = 0; c < C; c++) out[(long)r * C + c] = e[c];
    }
}

// forward copied a row of emb, so demb[tok[r]] += dout[r]. Rows with the same token add into the
// same row of demb: this loop stays serial so the sum order is fixed.
inline void embedding_backward(float* demb, const float* dout, const int* tok, int N, int C) {
    for (int r = 0; r < N; r++) {
        float* d = demb + (long)tok[r] * C;
        const float* g = dout + (long)r * C;
        for (int c = 0; c < C; c++) d[c] += g[c];
    }
}

// ----------------------------------------------------------------------------------------------
// dot(x, y) over n floats, in 8 interleaved partial sums so the compiler can vectorise it (the
// order is fixed, so the result is still deterministic).
inline float dot8(const float* x, const float* y, int n) {
    float p[8] = {};
    int i = 0;
    for (; i + 8 <= n; i += 8)
        for (int u = 0; u < 8; u++) p[u] += x[i + u] * y[i + u];
    float s = ((p[0] + p[1]) + (p[2] + p[3])) + ((p[4] + p[5]) + (p[6] + p[7]));
    for (; i < n; i++) s += x[i] * y[i];
    return s;
}

// ----------------------------------------------------------------------------------------------
// Matmul (a linear layer without bias): out[n, o] = sum_k inp[n, k] * W[o, k]
// out (N,OC), inp (N,IC), W (OC,IC)
//
// matmul_forward_naive is the reference: one dot product per output.
inline void matmul_forward_naive(float* out, const float* inp, const float* W, int N, int IC, int OC) {
    #pragma omp parallel for
    for (int n = 0; n < N; n++) {
        for (int o = 0; o < OC; o++) {
            float acc = 0.0f;
            for (int k = 0; k < IC; k++) acc += inp[(long)n * IC + k] * W[(long)o * IC + k];
            out[(long)n * OC + o] = acc;
        }
    }
}

// matmul_backward_naive is its reference backward. forward did out[n,o] = sum_k inp[n,k] W[o,k], so
//   dinp[n, :] += sum_o dout[n,o] * W[o, :]      (rows of dinp are independent: parallel over n)
//   dW[o, :]   += sum_n dout[n,o] * inp[n, :]    (rows of dW are independent: parallel over o)
inline void matmul_backward_naive(float* dinp, float* dW, const float* dout, const float* inp, const float* W,
                                  int N, int IC, int OC) {
    if (dinp) {
        #pragma omp parallel for
        for (int n = 0; n < N; n++)
            for (int o = 0; o < OC; o++) {
                float d = dout[(long)n * OC + o];
                for (int k = 0; k < IC; k++) dinp[(long)n * IC + k] += d * W[(long)o * IC + k];
            }
    }
    if (dW) {
        #pragma omp parallel for
        for (int o = 0; o < OC; o++)
            for (int n = 0; n < N; n++) {
                float d = dout[(long)n * OC + o];
                for (int k = 0; k < IC; k++) dW[(long)o * IC + k] += d * inp[(long)n * IC + k];
            }
    }
}

// ---- the fast path: all three products are one row-major kernel, C (+)= A Bm,
//   C (M,Nc), A (M,K), Bm (K,Nc)
// computed on tiles of 6 rows x 16 columns held in registers: 12 accumulators of 8 floats (GCC's
// vector extension, one AVX2 register each; clang reads it too). For each k, two vectors of Bm's
// row k times each of the 6 numbers A[i,k]. Written as plain float loops the compiler kept the
// accumulators in memory and ran at half the speed. Each output is still summed in k order from
// zero, then stored (or added, for the gradients).
static const int MM_TR = 6, MM_TC = 16;
typedef float v8f __attribute__((vector_size(32)));   // 8 floats
inline v8f load8(const float* p) { v8f v; memcpy(&v, p, sizeof v); return v; }

inline void gemm_tile(float* C, int ldc, const float* A, int lda, const float* Bm, int ldb, int K, int add) {
    v8f acc[MM_TR][2] = {};   // acc[i][h] = C[i, 8h .. 8h+7]
    for (int k = 0; k < K; k++) {
        v8f w0 = load8(Bm + (long)k * ldb), w1 = load8(Bm + (long)k * ldb + 8);
        for (int i = 0; i < MM_TR; i++) {
            float a = A[(long)i * lda + k];
            acc[i][0] += a * w0;
            acc[i][1] += a * w1;
        }
    }
    for (int i = 0; i < MM_TR; i++) {
        float row[MM_TC];
        memcpy(row, acc[i], sizeof row);
        for (int j = 0; j < MM_TC; j++) C[(long)i * ldc + j] = (add ? C[(long)i * ldc + j] : 0.0f) + row[j];
    }
}

// a ragged edge: rows [m0,m1) x columns [j0,j1), one sum per output
inline void gemm_edge(float* C, int ldc, const float* A, int lda, const float* Bm, int ldb, int K, int add,
                      int m0, int m1, int j0, int j1) {
    for (int m = m0; m < m1; m++)
        for (int j = j0; j < j1; j++) {
            float acc = 0.0f;
            for (int k = 0; k < K; k++) acc += A[(long)m * lda + k] * Bm[(long)k * ldb + j];
            C[(long)m * ldc + j] = (add ? C[(long)m * ldc + j] : 0.0f) + acc;
        }
}

// C (M,Nc) (+)= A (M,K) Bm (K,Nc); tiles are independent outputs, so they split across threads
inline void gemm(float* C, const float* A, const float* Bm, int M, int K, int Nc, int add) {
    int ntr = (M + MM_TR - 1) / MM_TR, ntc = (Nc + MM_TC - 1) / MM_TC;
    #pragma omp parallel for collapse(2)
    for (int ti = 0; ti < ntr; ti++)
        for (int tj = 0; tj < ntc; tj++) {
            int m0 = ti * MM_TR, j0 = tj * MM_TC;
            int m1 = m0 + MM_TR < M ? m0 + MM_TR : M, j1 = j0 + MM_TC < Nc ? j0 + MM_TC : Nc;
            if (m1 - m0 == MM_TR && j1 - j0 == MM_TC)
                gemm_tile(C + (long)m0 * Nc + j0, Nc, A + (long)m0 * K, K, Bm + j0, Nc, K, add);
            else
                gemm_edge(C, Nc, A, K, Bm, Nc, K, add, m0, m1, j0, j1);
        }
}

// out[j, i] = in[i, j]: a (cols, rows) copy of in (rows, cols), in a per-thread scratch
inline float* transposed(const float* in, int rows, int cols, int slot) {
    thread_local std::vector<float> scratch[2];
    std::vector<float>& s = scratch[slot];
    if (s.size() < (size_t)rows * cols) s.resize((size_t)rows * cols);
    float* out = s.data();
    #pragma omp parallel for
    for (int j = 0; j < cols; j++)
        for (int i = 0; i < rows; i++) out[(long)j * rows + i] = in[(long)i * cols + j];
    return out;
}

// the few-rows path (decoding feeds one row at a time): the naive loop with each dot product in
// 8 interleaved partial sums (dot8), which vectorises, and the outputs split across threads
inline void matmul_forward_rows(float* out, const float* inp, const float* W, int N, int IC, int OC) {
    #pragma omp parallel for collapse(2) if ((long)N * OC * IC >= 32768)
    for (int n = 0; n < N; n++)
        for (int o = 0; o < OC; o++) out[(long)n * OC + o] = dot8(inp + (long)n * IC, W + (long)o * IC, IC);
}

// out = inp W^T: Bm = W^T (IC,OC)
inline void matmul_forward(float* out, const float* inp, const float* W, int N, int IC, int OC) {
    if (N < MM_TR || OC < MM_TC) { matmul_forward_rows(out, inp, W, N, IC, OC); return; }
    gemm(out, inp, transposed(W, OC, IC, 0), N, IC, OC, 0);
}

// dinp += dout W (Bm = W as stored, (OC,IC));  dW += dout^T inp (A = dout^T (OC,N), Bm = inp)
inline void matmul_backward(float* dinp, float* dW, const float* dout, const float* inp, const float* W,
                            int N, int IC, int OC) {
    if (N < MM_TR || IC < MM_TC || OC < MM_TR) { matmul_backward_naive(dinp, dW, dout, inp, W, N, IC, OC); return; }
    if (dinp) gemm(dinp, dout, W, N, OC, IC, 1);
    if (dW) gemm(dW, transposed(dout, N, OC, 1), inp, OC, N, IC, 1);
}

// ----------------------------------------------------------------------------------------------
// RMSNorm: rstd[n] = 1 / sqrt(mean_c inp[n,c]^2 + eps);  out[n,c] = inp[n,c] * rstd[n] * w[c]
// out (N,C), rstd (N), inp (N,C), w (C)
inline void rmsnorm_forward(float* out, float* rstd, const float* inp, const float* w, int N, int C, float eps) {
    #pragma omp parallel for
    for (int n = 0; n < N; n++) {
        const float* x = inp + (long)n * C;
        float ss = 0.0f;
        for (int c = 0; c < C; c++) ss += x[c] * x[c];
        float r = 1.0f / sqrtf(ss / C + eps);
        rstd[n] = r;
        for (int c = 0; c < C; c++) out[(long)n * C + c] = x[c] * r * w[c];
    }
}

// forward did out = x * r * w with r = (mean x^2 + eps)^-1/2, so with g = dout * w:
//   dx[c] += r * g[c] - x[c] * r^3 * (sum_c' g[c'] x[c']) / C
//   dw[c] += sum_n dout[n,c] * x[n,c] * r[n]   (parallel over c: each thread owns its channels)
inline void rmsnorm_backward(float* dinp, float* dw, const float* dout, const float* inp, const float* w,
                             const float* rstd, int N, int C) {
    #pragma omp parallel for
    for (int n = 0; n < N; n++) {
        const float* x = inp + (long)n * C;
        const float* go = dout + (long)n * C;
        float r = rstd[n], dot = 0.0f;
        for (int c = 0; c < C; c++) dot += go[c] * w[c] * x[c];
        float* dx = dinp + (long)n * C;
        for (int c = 0; c < C; c++) dx[c] += r * go[c] * w[c] - x[c] * r * r * r * dot / C;
    }
    if (dw) {
        #pragma omp parallel for
        for (int c = 0; c < C; c++) {
            float acc = 0.0f;
            for (int n = 0; n < N; n++) acc += dout[(long)n * C + c] * inp[(long)n * C + c] * rstd[n];
            dw[c] += acc;
        }
    }
}

// ----------------------------------------------------------------------------------------------
// RoPE, half-split (HF Llama): inside every head of size HS, pair i with i + HS/2 and rotate by
// the angle a = pos * theta^(-2i/HS):
//   out[i] = x[i] cos a - x[i+h] sin a ;  out[i+h] = x[i] sin a + x[i+h] cos a     (h = HS/2)
// out, inp (N, NH*HS); pos (N) the absolute position of each row. out may equal inp.
// (the angle and its cos/sin are taken in double, then rounded, as the PyTorch reference does)
inline void rope_angle(float* c, float* s, int pos, int i, int HS, float theta) {
    double a = pos * pow((double)theta, -2.0 * i / HS);
    *c = (float)cos(a); *s = (float)sin(a);
}

inline void rope_forward(float* out, const float* inp, const int* pos, int N, int NH, int HS, float theta) {
    int h = HS / 2;
    #pragma omp parallel for
    for (int n = 0; n < N; n++) {
        for (int i = 0; i < h; i++) {
            float c, s;
            rope_angle(&c, &s, pos[n], i, HS, theta);
            for (int hh = 0; hh < NH; hh++) {
                long o = (long)n * NH * HS + hh * HS;
                float x0 = inp[o + i], x1 = inp[o + i + h];
                out[o + i] = x0 * c - x1 * s;
                out[o + i + h] = x0 * s + x1 * c;
            }
        }
    }
}

// forward was a rotation R(a); its transpose is the rotation by -a, so
//   dx[i] += dout[i] cos a + dout[i+h] sin a ;  dx[i+h] += -dout[i] sin a + dout[i+h] cos a
inline void rope_backward(float* dinp, const float* dout, const int* pos, int N, int NH, int HS, float theta) {
    int h = HS / 2;
    #pragma omp parallel for
    for (int n = 0; n < N; n++) {
        for (int i = 0; i < h; i++) {
            float c, s;
            rope_angle(&c, &s, pos[n], i, HS, theta);
            for (int hh = 0; hh < NH; hh++) {
                long o = (long)n * NH * HS + hh * HS;
                float g0 = dout[o + i], g1 = dout[o + i + h];
                dinp[o + i] += g0 * c + g1 * s;
                dinp[o + i + h] += -g0 * s + g1 * c;
            }
        }
    }
}

// ----------------------------------------------------------------------------------------------
// Multi-head attention over a set of keys (the KV cache, or the processor's own tokens).
// Time-major rows: query i of example b is row i*B + b; key j of example b is row j*B + b.
// Query i sits at absolute position q0 + i. If causal, it sees keys j <= q0 + i, else all Tk keys.
//   att[i,b,h,j] = softmax_j( q[i,b,h,:] . k[j,b,h,:] / sqrt(HS) )
//   out[i,b,h,:] = sum_j att[i,b,h,j] * v[j,b,h,:]
// out (Tq,B,NH*HS), att (Tq,B,NH,ld) with ld >= Tk (entries past the visible keys are 0),
// q (Tq,B,NH*HS), k, v (Tk,B,NH*HS)
inline void attention_forward(float* out, float* att, const float* q, const float* k, const float* v,
                              int Tq, int Tk, int ld, int q0, int causal, int B, int NH, int HS) {
    int C = NH * HS;
    float scale = 1.0f / sqrtf((float)HS);
    #pragma omp parallel for collapse(3)
    for (int i = 0; i < Tq; i++)
        for (int b = 0; b < B; b++)
            for (int h = 0; h < NH; h++) {
                int nk = causal ? q0 + i + 1 : Tk;
                const float* qi = q + ((long)i * B + b) * C + h * HS;
                float* a = att + (((long)i * B + b) * NH + h) * ld;
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
                for (int j = nk; j < ld; j++) a[j] = 0.0f;
                // weighted sum of values
                float* oi = out + ((long)i * B + b) * C + h * HS;
                for (int d = 0; d < HS; d++) oi[d] = 0.0f;
                for (int j = 0; j < nk; j++) {
                    const float* vj = v + ((long)j * B + b) * C + h * HS;
                    for (int d = 0; d < HS; d++) oi[d] += a[j] * vj[d];
                }
            }
}

// forward did out = sum_j a_j v_j with a = softmax(s), s_j = q.k_j * scale, so per (i,b,h):
//   da_j = dout . v_j ;  ds_j = a_j (da_j - sum_j' a_j' da_j')
//   dq += scale * sum_j ds_j k_j ;  dk_j += scale * ds_j q ;  dv_j += a_j dout
// dk and dv of one (b,h) collect from every query, so threads split over (b,h) only and walk the
// queries in order inside: no two threads ever add to the same number.
inline void attention_backward(float* dq, float* dk, float* dv, const float* dout, const float* att,
                               const float* q, const float* k, const float* v,
                               int Tq, int Tk, int ld, int q0, int causal, int B, int NH, int HS) {
    int C = NH * HS;
    float scale = 1.0f / sqrtf((float)HS);
    #pragma omp parallel
    {
        thread_local std::vector<float> da;   // (Tk) da_j of the current query
        if ((int)da.size() < Tk) da.resize(Tk);
        #pragma omp for collapse(2)
        for (int b = 0; b < B; b++)
            for (int h = 0; h < NH; h++)
                for (int i = 0; i < Tq; i++) {
                    int nk = causal ? q0 + i + 1 : Tk;
                    long ro = ((long)i * B + b) * C + h * HS;
                    const float* a = att + (((long)i * B + b) * NH + h) * ld;
                    const float* go = dout + ro;
                    // da_j = dout . v_j  and  sum_j a_j da_j
                    float adot = 0.0f;
                    for (int j = 0; j < nk; j++) {
                        da[j] = dot8(go, v + ((long)j * B + b) * C + h * HS, HS);
                        adot += a[j] * da[j];
                    }
                    for (int j = 0; j < nk; j++) {
                        long rj = ((long)j * B + b) * C + h * HS;
                        float ds = a[j] * (da[j] - adot) * scale;
                        for (int d = 0; d < HS; d++) {
                            dq[ro + d] += ds * k[rj + d];
                            dk[rj + d] += ds * q[ro + d];
                            dv[rj + d] += a[j] * go[d];
                        }
                    }
                }
    }
}

// ----------------------------------------------------------------------------------------------
// SwiGLU gate: out = silu(h1) * h3, silu(x) = x * sigmoid(x).   out, h1, h3 (N)
inline void swiglu_forward(float* out, const float* h1, const float* h3, long N) {
    #pragma omp parallel for
    for (long i = 0; i < N; i++) {
        float sg = 1.0f / (1.0f + expf(-h1[i]));
        out[i] = h1[i] * sg * h3[i];
    }
}

// forward did out = h1 sigma(h1) h3, so
//   dh3 += dout * h1 sigma(h1) ;  dh1 += dout * h3 * sigma(h1) (1 + h1 (1 - sigma(h1)))
inline void swiglu_backward(float* dh1, float* dh3, const float* dout, const float* h1, const float* h3, long N) {
    #pragma omp parallel for
    for (long i = 0; i < N; i++) {
        float sg = 1.0f / (1.0f + expf(-h1[i]));
        dh3[i] += dout[i] * h1[i] * sg;
        dh1[i] += dout[i] * h3[i] * sg * (1.0f + h1[i] * (1.0f - sg));
    }
}

// ----------------------------------------------------------------------------------------------
// Residual add: out = a + b   (N)
inline void residual_forward(float* out, const float* a, const float* b, long N) {
    #pragma omp parallel for
    for (long i = 0; i < N; i++) out[i] = a[i] + b[i];
}
// forward did out = a + b, so da += dout and db += dout
inline void residual_backward(float* da, float* db, const float* dout, long N) {
    #pragma omp parallel for
    for (long i = 0; i < N; i++) { da[i] += dout[i]; db[i] += dout[i]; }
}

// ----------------------------------------------------------------------------------------------
// Softmax cross-entropy with a per-row weight (0 masks a row out, 1/count makes a mean):
//   probs[n,:] = softmax(logits[n,:]);  loss[n] = -log probs[n, target[n]]   (0 where weight is 0)
// probs, logits (N,V); loss, weight (N); target (N)
inline void crossentropy_forward(float* loss, float* probs, const float* logits, const int* target,
                                 const float* weight, int N, int V) {
    #pragma omp parallel for
    for (int n = 0; n < N; n++) {
        const float* z = logits + (long)n * V;
        float* p = probs + (long)n * V;
        float mx = -INFINITY;
        for (int i = 0; i < V; i++) mx = z[i] > mx ? z[i] : mx;
        float sum = 0.0f;
        for (int i = 0; i < V; i++) { p[i] = expf(z[i] - mx); sum += p[i]; }
        for (int i = 0; i < V; i++) p[i] /= sum;
        // -log p[target] computed from the logits, which stays finite where p underflows
        loss[n] = weight[n] != 0.0f ? (mx + logf(sum) - z[target[n]]) : 0.0f;
    }
}

// forward gave weight * -log softmax(z)[y], so dz[i] += weight * (p[i] - [i == y]) * dloss
inline void crossentropy_backward(float* dlogits, const float* probs, const int* target, const float* weight,
                                  float dloss, int N, int V) {
    #pragma omp parallel for
    for (int n = 0; n < N; n++) {
        if (weight[n] == 0.0f) continue;
        float w = weight[n] * dloss;
        for (int i = 0; i < V; i++)
            dlogits[(long)n * V + i] += w * (probs[(long)n * V + i] - (i == target[n] ? 1.0f : 0.0f));
    }
}

// ----------------------------------------------------------------------------------------------
// AdamW, as torch.optim.AdamW (decoupled weight decay, bias-corrected moments), step t >= 1:
//   p -= lr * wd * p ;  m = b1 m + (1-b1) g ;  v = b2 v + (1-b2) g^2
//   p -= lr * (m / (1-b1^t)) / (sqrt(v / (1-b2^t)) + eps)
inline void adamw_update(float* p, float* m, float* v, const float* g, long N, float lr, float b1, float b2,
                         float eps, float wd, int t) {
    float bc1 = 1.0f - powf(b1, (float)t), bc2 = 1.0f - powf(b2, (float)t);
    #pragma omp parallel for
    for (long i = 0; i < N; i++) {
        p[i] -= lr * wd * p[i];
        m[i] = b1 * m[i] + (1.0f - b1) * g[i];
        v[i] = b2 * v[i] + (1.0f - b2) * g[i] * g[i];
        float mh = m[i] / bc1, vh = v[i] / bc2;
        p[i] -= lr * mh / (sqrtf(vh) + eps);
    }
}
