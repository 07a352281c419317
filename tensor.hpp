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
//     OMP_NUM_THREADS; and only around enough work to pay for the threads (PAR_MIN).
//   * each sum in an order the code fixes, multiply-adds as explicit fmaf: the same bits for any
//     vector width (AVX-512, AVX2, plain loops) and compile target (see "The same numbers").
//   * matrices are stored [out_features, in_features] as in PyTorch's nn.Linear: y = x W^T.
//
// Activations in bt are "time-major": row r = t*B + b for position t and batch element b, so the
// rows of one segment of positions [s,e) are one contiguous block (rows s*B .. e*B).
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>
#include <sys/mman.h>

#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

// ----------------------------------------------------------------------------------------------
// The same numbers on every machine. The Makefile builds with -ffp-contract=off, so the compiler
// never fuses a*b + c on its own (where it would, and how, depends on the target). Every
// multiply-add that should be one rounding is written as fmaf / vfma, and every sum runs in an
// order fixed by the code, never by the vector width: a 16-lane AVX-512 machine, an 8-lane AVX2
// one and the plain loops give the same bits.
//
// Threads only where they pay: a parallel region costs microseconds to open and close, more
// than a decoding step's whole row of work, and even `omp parallel if (0)` costs about one (a
// decoding step has fifty). So every op runs its loop through parallel_for, which splits it
// across threads only from PAR_MIN multiply-adds of work up, and otherwise makes no OpenMP call
// at all. An elementwise pass (a norm, a residual, the optimizer) counts ELEM_WORK per element:
// it reads and writes memory where a matmul's tile works in registers, so a training step's
// (1,500 rows x 128 channels) pays for two threads where a decoding step's one row does not.
static const long PAR_MIN = 1 << 18;
static const long ELEM_WORK = 8;

// ---- a training run's activations and their gradients, offered to the kernel as transparent
// huge pages before anything touches them. Attention reads one position's row B*C floats apart
// (16 KB at batch 32), so with 4 KB pages every row is a TLB miss; one 2 MB page holds 128 of
// them. The pages are paid for once (faulted and zeroed 2 MB at a time), so decoders, built often
// and small per step, keep ordinary ones. Where the kernel declines, the advice changes nothing:
// it changes speed only, never a value.
inline void advise_huge_pages(void* p, size_t bytes) {
#ifdef MADV_HUGEPAGE
    uintptr_t a = ((uintptr_t)p + 4095) & ~(uintptr_t)4095, e = ((uintptr_t)p + bytes) & ~(uintptr_t)4095;
    if (e > a) madvise((void*)a, e - a, MADV_HUGEPAGE);   // the whole 4 KB pages inside
#endif
}
// v = n zeros; when huge, a new allocation advised as above
inline void assign_zeros(std::vector<float>& v, size_t n, bool huge) {
    if (huge && v.capacity() < n) {
        std::vector<float>().swap(v);
        v.reserve(n);
        advise_huge_pages(v.data(), n * sizeof(float));
    }
    v.assign(n, 0.0f);
}

// body(i0, i1) over [0, n): one contiguous range per thread when `work` pays for the threads
// (and we are not already inside a parallel region), else body(0, n) on the calling thread
template <class Body> inline void parallel_for(long n, long work, Body body) {
#ifdef _OPENMP
    if (work >= PAR_MIN && n > 1 && !omp_in_parallel()) {
        #pragma omp parallel
        {
            long nt = omp_get_num_threads(), t = omp_get_thread_num();
            body(n * t / nt, n * (t + 1) / nt);
        }
        return;
    }
#endif
    (void)work;
    body(0, n);
}

// ----------------------------------------------------------------------------------------------
// Embedding: out[r, :] = emb[tok[r], :]
// out (N,C), tok (N), emb (V,C)
inline void embedding_forward(float* out, const int* tok, const float* emb, int N, int C) {
    parallel_for(N, (long)N * C * ELEM_WORK, [&](long r0, long r1) {
        for (long r = r0; r < r1; r++) {
            const float* e = emb + (long)tok[r] * C;
            for (int c = 0; c < C; c++) out[r * C + c] = e[c];
        }
    });
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

// dot(x, y) over n floats, in 8 interleaved partial sums p[u] (u = i mod 8) added pairwise at the
// end: a fixed order, the same on every machine. With AVX2 (and so AVX-512) the 8 sums are one
// 8-lane register; without, the same loop in scalars.
inline float dot8(const float* x, const float* y, int n) {
    float p[8] = {};
    int i = 0;
#if defined(__AVX2__) && defined(__FMA__)
    __m256 acc = _mm256_setzero_ps();
    for (; i + 8 <= n; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i), acc);
    _mm256_storeu_ps(p, acc);
#else
    for (; i + 8 <= n; i += 8)
        for (int u = 0; u < 8; u++) p[u] = fmaf(x[i + u], y[i + u], p[u]);
#endif
    float s = ((p[0] + p[1]) + (p[2] + p[3])) + ((p[4] + p[5]) + (p[6] + p[7]));
    for (; i < n; i++) s = fmaf(x[i], y[i], s);
    return s;
}

// out[r] = dot8(x, y + r*ld, n) for r < count: one x against count rows of y (a query against
// its keys). With AVX2, 8 rows at a time, each row's 8 partial sums one register; hadd then adds
// neighbours, p0+p1, p2+p3, ..., twice, and the two 128-bit halves are added, which is dot8's
// ((p0+p1)+(p2+p3)) + ((p4+p5)+(p6+p7)) for all 8 rows at once: the same bits, without a store
// and seven scalar adds per dot. A last group of fewer than 8 rows repeats its last row in the
// unused registers and keeps only its own results.
inline void dots8(float* out, const float* x, const float* y, long ld, int n, int count) {
#if defined(__AVX2__) && defined(__FMA__)
    for (int r = 0; r < count; r += 8) {
        int nr = count - r < 8 ? count - r : 8;
        const float* yu[8];
        for (int u = 0; u < 8; u++) yu[u] = y + (r + (u < nr ? u : nr - 1)) * ld;
        __m256 a[8];
        for (int u = 0; u < 8; u++) a[u] = _mm256_setzero_ps();
        int i = 0;
        for (; i + 8 <= n; i += 8) {
            __m256 xv = _mm256_loadu_ps(x + i);
            for (int u = 0; u < 8; u++) a[u] = _mm256_fmadd_ps(xv, _mm256_loadu_ps(yu[u] + i), a[u]);
        }
        __m256 t0 = _mm256_hadd_ps(a[0], a[1]), t1 = _mm256_hadd_ps(a[2], a[3]);   // (p0+p1, p2+p3) of rows 0,1 | ...
        __m256 t2 = _mm256_hadd_ps(a[4], a[5]), t3 = _mm256_hadd_ps(a[6], a[7]);
        __m256 u0 = _mm256_hadd_ps(t0, t1), u1 = _mm256_hadd_ps(t2, t3);   // rows 0-3: (p0+p1)+(p2+p3) | (p4+p5)+(p6+p7)
        __m256 lo = _mm256_permute2f128_ps(u0, u1, 0x20), hi = _mm256_permute2f128_ps(u0, u1, 0x31);
        float d[8];
        _mm256_storeu_ps(d, _mm256_add_ps(lo, hi));
        for (; i < n; i++)
            for (int u = 0; u < nr; u++) d[u] = fmaf(x[i], yu[u][i], d[u]);
        for (int u = 0; u < nr; u++) out[r + u] = d[u];
    }
#else
    for (int r = 0; r < count; r++) out[r] = dot8(x, y + r * ld, n);
#endif
}

// e^x, written out so that it is one function on every machine (libm's expf is chosen at run time
// by the CPU it runs on) and so that loops over it vectorise. e^x = 2^n e^r with n = round(x log2 e)
// and r = x - n ln2 (ln2 in two parts, as Cephes does), e^r by a degree-7 polynomial (Cephes'
// minimax coefficients for expf), 2^n put into the exponent bits. Within 1 ulp of expf on
// [-87, 88] (a test checks it); 0 below -87 (expf's last 1e-38 or so), e^88 above 88, NaN for NaN.
inline float expf_fixed(float x) {
    float xc = x < -87.0f ? -87.0f : x > 88.0f ? 88.0f : x == x ? x : 0.0f;   // NaN: work on 0, return NaN
    float n = rintf(xc * 1.44269504f);
    float r = fmaf(n, -0.693359375f, xc);
    r = fmaf(n, 2.12194440e-4f, r);
    float p = 1.9875691500e-4f;
    p = fmaf(p, r, 1.3981999507e-3f);
    p = fmaf(p, r, 8.3334519073e-3f);
    p = fmaf(p, r, 4.1665795894e-2f);
    p = fmaf(p, r, 1.6666665459e-1f);
    p = fmaf(p, r, 5.0000001201e-1f);
    p = fmaf(p, r * r, r) + 1.0f;   // e^r = 1 + r + r^2 p(r)
    int32_t bits;
    memcpy(&bits, &p, 4);
    bits += (int32_t)n * (1 << 23);  // times 2^n (a multiply: a left shift of a negative n is undefined)
    memcpy(&p, &bits, 4);
    return x < -87.0f ? 0.0f : x == x ? p : x;
}
inline float sigmoid_fixed(float x) { return 1.0f / (1.0f + expf_fixed(-x)); }

// ---- vectors of VW floats: load, store, broadcast, add, and a fused multiply-add (a*b + c,
// rounded once). AVX-512 (16 lanes) or AVX2 with FMA (8 lanes) when the target has them; the
// plain fallback is 8 floats with fmaf per lane, the same numbers, slowly.
// Each is one instruction or a few: always inlined, since GCC's size limits otherwise leave calls
// to them in the largest loops (attention's backward), a call per vector.
#define VEC_INLINE __attribute__((always_inline)) inline
#if defined(__AVX512F__)
static const int VW = 16;
static const char* const SIMD_NAME = "AVX-512 (16 lanes), FMA";
typedef __m512 vfloat;
VEC_INLINE vfloat vload(const float* p) { return _mm512_loadu_ps(p); }
VEC_INLINE void vstore(float* p, vfloat x) { _mm512_storeu_ps(p, x); }
VEC_INLINE vfloat vbroadcast(float x) { return _mm512_set1_ps(x); }
VEC_INLINE vfloat vzero() { return _mm512_setzero_ps(); }
VEC_INLINE vfloat vadd(vfloat a, vfloat b) { return _mm512_add_ps(a, b); }
VEC_INLINE vfloat vfma(vfloat a, vfloat b, vfloat c) { return _mm512_fmadd_ps(a, b, c); }
VEC_INLINE vfloat vsub(vfloat a, vfloat b) { return _mm512_sub_ps(a, b); }
VEC_INLINE vfloat vmul(vfloat a, vfloat b) { return _mm512_mul_ps(a, b); }
VEC_INLINE vfloat vdiv(vfloat a, vfloat b) { return _mm512_div_ps(a, b); }
VEC_INLINE vfloat vsqrt(vfloat a) {   // IEEE: sqrtf's bits (masked form: g++ 12 warns on _mm512_sqrt_ps)
    return _mm512_mask_sqrt_ps(a, (__mmask16)0xFFFF, a);
}
VEC_INLINE vfloat vneg(vfloat a) {   // flips the sign bit, as -x does (0 - x would turn -0 into +0)
    return _mm512_castsi512_ps(_mm512_xor_si512(_mm512_castps_si512(a), _mm512_set1_epi32(INT32_MIN)));
}
// expf_fixed's steps that differ by machine (vexp below puts them together): its clamps of the
// input, rintf (roundscale to nearest even, as rintf in the default rounding mode), times 2^n (an
// integer add to the exponent bits), and its output for NaN and below -87. (The masked forms of
// roundscale, cvtps and slli: GCC 12 warns on the unmasked ones.)
VEC_INLINE vfloat vexp_clamp(vfloat x) {   // x < -87 ? -87 : x > 88 ? 88 : x == x ? x : 0
    vfloat xc = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(x, x, _CMP_EQ_OQ), vzero(), x);
    xc = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(x, vbroadcast(88.0f), _CMP_GT_OQ), xc, vbroadcast(88.0f));
    return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(x, vbroadcast(-87.0f), _CMP_LT_OQ), xc, vbroadcast(-87.0f));
}
VEC_INLINE vfloat vrint(vfloat x) {
    return _mm512_maskz_roundscale_ps(0xffff, x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
}
VEC_INLINE vfloat vtimes_pow2(vfloat p, vfloat n) {
    __m512i shift = _mm512_maskz_slli_epi32(0xffff, _mm512_maskz_cvtps_epi32(0xffff, n), 23);   // n * 2^23
    return _mm512_castsi512_ps(_mm512_add_epi32(_mm512_castps_si512(p), shift));
}
VEC_INLINE vfloat vexp_special(vfloat x, vfloat p) {   // x < -87 ? 0 : x == x ? p : x
    p = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(x, x, _CMP_EQ_OQ), x, p);
    return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(x, vbroadcast(-87.0f), _CMP_LT_OQ), p, vzero());
}
#elif defined(__AVX2__) && defined(__FMA__)
static const int VW = 8;
static const char* const SIMD_NAME = "AVX2 (8 lanes), FMA";
typedef __m256 vfloat;
VEC_INLINE vfloat vload(const float* p) { return _mm256_loadu_ps(p); }
VEC_INLINE void vstore(float* p, vfloat x) { _mm256_storeu_ps(p, x); }
VEC_INLINE vfloat vbroadcast(float x) { return _mm256_set1_ps(x); }
VEC_INLINE vfloat vzero() { return _mm256_setzero_ps(); }
VEC_INLINE vfloat vadd(vfloat a, vfloat b) { return _mm256_add_ps(a, b); }
VEC_INLINE vfloat vfma(vfloat a, vfloat b, vfloat c) { return _mm256_fmadd_ps(a, b, c); }
VEC_INLINE vfloat vsub(vfloat a, vfloat b) { return _mm256_sub_ps(a, b); }
VEC_INLINE vfloat vmul(vfloat a, vfloat b) { return _mm256_mul_ps(a, b); }
VEC_INLINE vfloat vdiv(vfloat a, vfloat b) { return _mm256_div_ps(a, b); }
VEC_INLINE vfloat vsqrt(vfloat a) { return _mm256_sqrt_ps(a); }
VEC_INLINE vfloat vneg(vfloat a) { return _mm256_xor_ps(a, _mm256_set1_ps(-0.0f)); }
// as for AVX-512 above; blendv(a, b, mask) takes b where the mask is set
VEC_INLINE vfloat vexp_clamp(vfloat x) {
    vfloat xc = _mm256_blendv_ps(vzero(), x, _mm256_cmp_ps(x, x, _CMP_EQ_OQ));
    xc = _mm256_blendv_ps(xc, vbroadcast(88.0f), _mm256_cmp_ps(x, vbroadcast(88.0f), _CMP_GT_OQ));
    return _mm256_blendv_ps(xc, vbroadcast(-87.0f), _mm256_cmp_ps(x, vbroadcast(-87.0f), _CMP_LT_OQ));
}
VEC_INLINE vfloat vrint(vfloat x) { return _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
VEC_INLINE vfloat vtimes_pow2(vfloat p, vfloat n) {
    __m256i shift = _mm256_slli_epi32(_mm256_cvtps_epi32(n), 23);   // n * 2^23
    return _mm256_castsi256_ps(_mm256_add_epi32(_mm256_castps_si256(p), shift));
}
VEC_INLINE vfloat vexp_special(vfloat x, vfloat p) {
    p = _mm256_blendv_ps(x, p, _mm256_cmp_ps(x, x, _CMP_EQ_OQ));
    return _mm256_blendv_ps(p, vzero(), _mm256_cmp_ps(x, vbroadcast(-87.0f), _CMP_LT_OQ));
}
#else
static const int VW = 8;
static const char* const SIMD_NAME = "no AVX2+FMA: plain loops (the same numbers, slower)";
struct vfloat { float x[8]; };
inline vfloat vload(const float* p) { vfloat v; memcpy(v.x, p, sizeof v.x); return v; }
inline void vstore(float* p, vfloat v) { memcpy(p, v.x, sizeof v.x); }
inline vfloat vbroadcast(float x) { vfloat v; for (int u = 0; u < 8; u++) v.x[u] = x; return v; }
inline vfloat vzero() { return vbroadcast(0.0f); }
inline vfloat vadd(vfloat a, vfloat b) { for (int u = 0; u < 8; u++) a.x[u] += b.x[u]; return a; }
inline vfloat vfma(vfloat a, vfloat b, vfloat c) { for (int u = 0; u < 8; u++) c.x[u] = fmaf(a.x[u], b.x[u], c.x[u]); return c; }
inline vfloat vsub(vfloat a, vfloat b) { for (int u = 0; u < 8; u++) a.x[u] -= b.x[u]; return a; }
inline vfloat vmul(vfloat a, vfloat b) { for (int u = 0; u < 8; u++) a.x[u] *= b.x[u]; return a; }
inline vfloat vdiv(vfloat a, vfloat b) { for (int u = 0; u < 8; u++) a.x[u] /= b.x[u]; return a; }
inline vfloat vsqrt(vfloat a) { for (float& x : a.x) x = sqrtf(x); return a; }
inline vfloat vneg(vfloat a) { for (int u = 0; u < 8; u++) a.x[u] = -a.x[u]; return a; }
inline vfloat vexp_clamp(vfloat x) {
    for (float& v : x.x) v = v < -87.0f ? -87.0f : v > 88.0f ? 88.0f : v == v ? v : 0.0f;
    return x;
}
inline vfloat vrint(vfloat x) { for (float& v : x.x) v = rintf(v); return x; }
inline vfloat vtimes_pow2(vfloat p, vfloat n) {
    for (int u = 0; u < 8; u++) {
        int32_t bits;
        memcpy(&bits, &p.x[u], 4);
        bits += (int32_t)n.x[u] * (1 << 23);
        memcpy(&p.x[u], &bits, 4);
    }
    return p;
}
inline vfloat vexp_special(vfloat x, vfloat p) {
    for (int u = 0; u < 8; u++) p.x[u] = x.x[u] < -87.0f ? 0.0f : x.x[u] == x.x[u] ? p.x[u] : x.x[u];
    return p;
}
#endif

// expf_fixed, lane by lane: the same operations in the same order
inline vfloat vexp(vfloat x) {
    vfloat xc = vexp_clamp(x);
    vfloat n = vrint(vmul(xc, vbroadcast(1.44269504f)));
    vfloat r = vfma(n, vbroadcast(-0.693359375f), xc);
    r = vfma(n, vbroadcast(2.12194440e-4f), r);
    vfloat p = vbroadcast(1.9875691500e-4f);
    p = vfma(p, r, vbroadcast(1.3981999507e-3f));
    p = vfma(p, r, vbroadcast(8.3334519073e-3f));
    p = vfma(p, r, vbroadcast(4.1665795894e-2f));
    p = vfma(p, r, vbroadcast(1.6666665459e-1f));
    p = vfma(p, r, vbroadcast(5.0000001201e-1f));
    p = vadd(vfma(p, vmul(r, r), r), vbroadcast(1.0f));
    return vexp_special(x, vtimes_pow2(p, n));
}
// sigmoid_fixed lane by lane
inline vfloat vsigmoid(vfloat x) { return vdiv(vbroadcast(1.0f), vadd(vbroadcast(1.0f), vexp(vneg(x)))); }

// out[i] = expf_fixed(a[i] - shift) for i < n, VW at a time (out may be a)
inline void exp_shifted(float* out, const float* a, int n, float shift) {
    int i = 0;
    for (; i + VW <= n; i += VW) vstore(out + i, vexp(vsub(vload(a + i), vbroadcast(shift))));
    for (; i < n; i++) out[i] = expf_fixed(a[i] - shift);
}

// ----------------------------------------------------------------------------------------------
// Matmul (a linear layer without bias): out[n, o] = sum_k inp[n, k] * W[o, k]
// out (N,OC), inp (N,IC), W (OC,IC)
// Every output, in every path below, is one sum from zero over k = 0, 1, ... in order, each term
// added by an fma; a backward then adds that sum to the gradient. So the fast paths equal these
// naive loops bit for bit, at any vector width and thread count.
//
// matmul_forward_naive is the reference: one dot product per output.
inline void matmul_forward_naive(float* out, const float* inp, const float* W, int N, int IC, int OC) {
    parallel_for(N, (long)N * OC * IC, [&](long n0, long n1) {
        for (long n = n0; n < n1; n++)
            for (int o = 0; o < OC; o++) {
                float acc = 0.0f;
                for (int k = 0; k < IC; k++) acc = fmaf(inp[n * IC + k], W[(long)o * IC + k], acc);
                out[n * OC + o] = acc;
            }
    });
}

// matmul_backward_naive is its reference backward. forward did out[n,o] = sum_k inp[n,k] W[o,k], so
//   dinp[n, k] += sum_o dout[n,o] * W[o,k]      (rows of dinp are independent: parallel over n)
//   dW[o, k]   += sum_n dout[n,o] * inp[n,k]    (rows of dW are independent: parallel over o)
inline void matmul_backward_naive(float* dinp, float* dW, const float* dout, const float* inp, const float* W,
                                  int N, int IC, int OC) {
    long work = (long)N * OC * IC;
    if (dinp)
        parallel_for(N, work, [&](long n0, long n1) {
            for (long n = n0; n < n1; n++)
                for (int k = 0; k < IC; k++) {
                    float acc = 0.0f;
                    for (int o = 0; o < OC; o++) acc = fmaf(dout[n * OC + o], W[(long)o * IC + k], acc);
                    dinp[n * IC + k] += acc;
                }
        });
    if (dW)
        parallel_for(OC, work, [&](long o0, long o1) {
            for (long o = o0; o < o1; o++)
                for (int k = 0; k < IC; k++) {
                    float acc = 0.0f;
                    for (int n = 0; n < N; n++) acc = fmaf(dout[(long)n * OC + o], inp[(long)n * IC + k], acc);
                    dW[o * IC + k] += acc;
                }
        });
}

// ---- the fast path: all three products are one kernel, C (M,Nc) (+)= A (M,K) Bm (K,Nc), where
// Bm is row-major and A is read through two strides, A(i,k) = A[i*ars + k*aks], so that dout^T
// is a view, not a copy. A register tile holds mr rows x nv vectors of C; for each k: nv vectors
// of Bm's row k, each times every A(i,k). Each accumulator is a chain of fmas that waits on
// itself, so a tile needs several of them: the more, the fewer loads per fma. AVX-512 has 32
// registers: up to 24 accumulators, 12 rows x 2 vectors for the bulk; AVX2 (and the plain loops)
// 16: up to 12, 6 rows x 2 vectors. Fewer rows get wider tiles (one row, decoding: 8 vectors).
// The shape of a tile changes no sum: each output is one chain over k, whatever its neighbours.
#if defined(__AVX512F__)
static const int MM_TR = 12;
inline int tile_vectors(int mr) { return mr <= 3 ? 8 : mr == 4 ? 6 : mr <= 6 ? 4 : mr <= 8 ? 3 : 2; }
#else
static const int MM_TR = 6;
inline int tile_vectors(int mr) { return mr == 1 ? 8 : mr == 2 ? 6 : mr == 3 ? 4 : mr == 4 ? 3 : 2; }
#endif

// one tile: rows i < mr, vectors h < nv. always_inline and called with literal mr and nv, so each
// call unrolls into straight-line register code. The sums start from 0, or, when init is not
// nullptr, from the partial sums a previous call over earlier k stored there (rows ldi apart):
// a chain of fmas stopped and picked up again gives the same bits as one run through.
__attribute__((always_inline)) inline void gemm_tile(float* C, int ldc, const float* A, long ars, long aks,
                                                     const float* Bm, int ldb, int K, int add, int mr, int nv,
                                                     const float* init, int ldi) {
    vfloat acc[MM_TR][8];
    for (int i = 0; i < mr; i++)
        for (int h = 0; h < nv; h++) acc[i][h] = init ? vload(init + (long)i * ldi + h * VW) : vzero();
    for (int k = 0; k < K; k++) {
        vfloat b[8];
        for (int h = 0; h < nv; h++) b[h] = vload(Bm + (long)k * ldb + h * VW);
        for (int i = 0; i < mr; i++) {
            vfloat a = vbroadcast(A[i * ars + k * aks]);
            for (int h = 0; h < nv; h++) acc[i][h] = vfma(a, b[h], acc[i][h]);
        }
    }
    for (int i = 0; i < mr; i++)
        for (int h = 0; h < nv; h++) {
            float* c = C + (long)i * ldc + h * VW;
            vstore(c, add ? vadd(vload(c), acc[i][h]) : acc[i][h]);
        }
}

// the tile shapes in use: for mr rows, tile_vectors(mr) vectors, or 4, 2, 1 for what is left
inline void gemm_tile_any(float* C, int ldc, const float* A, long ars, long aks, const float* Bm, int ldb, int K,
                          int add, int mr, int nv, const float* init = nullptr, int ldi = 0) {
#define BT_TILE(R, V) case R * 16 + V: gemm_tile(C, ldc, A, ars, aks, Bm, ldb, K, add, R, V, init, ldi); break;
    switch (mr * 16 + nv) {
#if defined(__AVX512F__)
        BT_TILE(1, 8) BT_TILE(1, 4) BT_TILE(1, 2) BT_TILE(1, 1)
        BT_TILE(2, 8) BT_TILE(2, 4) BT_TILE(2, 2) BT_TILE(2, 1)
        BT_TILE(3, 8) BT_TILE(3, 4) BT_TILE(3, 2) BT_TILE(3, 1)
        BT_TILE(4, 6) BT_TILE(4, 4) BT_TILE(4, 2) BT_TILE(4, 1)
        BT_TILE(5, 4) BT_TILE(5, 2) BT_TILE(5, 1)
        BT_TILE(6, 4) BT_TILE(6, 2) BT_TILE(6, 1)
        BT_TILE(7, 3) BT_TILE(7, 2) BT_TILE(7, 1)
        BT_TILE(8, 3) BT_TILE(8, 2) BT_TILE(8, 1)
        BT_TILE(9, 2) BT_TILE(9, 1)
        BT_TILE(10, 2) BT_TILE(10, 1)
        BT_TILE(11, 2) BT_TILE(11, 1)
        BT_TILE(12, 2) BT_TILE(12, 1)
#else
        BT_TILE(1, 8) BT_TILE(1, 4) BT_TILE(1, 2) BT_TILE(1, 1)
        BT_TILE(2, 6) BT_TILE(2, 4) BT_TILE(2, 2) BT_TILE(2, 1)
        BT_TILE(3, 4) BT_TILE(3, 2) BT_TILE(3, 1)
        BT_TILE(4, 3) BT_TILE(4, 2) BT_TILE(4, 1)
        BT_TILE(5, 2) BT_TILE(5, 1)
        BT_TILE(6, 2) BT_TILE(6, 1)
#endif
    }
#undef BT_TILE
}

// the last Nc mod VW columns, [j0,j1): one scalar fma chain per output, the tiles' order
inline void gemm_columns(float* C, int ldc, const float* A, long ars, long aks, const float* Bm, int ldb, int K,
                         int add, int m0, int m1, int j0, int j1) {
    for (int m = m0; m < m1; m++)
        for (int j = j0; j < j1; j++) {
            float acc = 0.0f;
            for (int k = 0; k < K; k++) acc = fmaf(A[m * ars + k * aks], Bm[(long)k * ldb + j], acc);
            C[(long)m * ldc + j] = (add ? C[(long)m * ldc + j] : 0.0f) + acc;
        }
}

// C (M,Nc) (+)= A Bm, Bm read in place. Work units: MM_TR rows x a block of up to 8 vectors of
// columns (2 for one row); units are independent outputs, so they split across threads, and a
// thread cuts its consecutive units of one row tile into tiles as one range of columns.
// One row (a batch-1 decoding step) reads each float of Bm for one multiply-add: the step streams
// the weights from memory, not from cache. Split by columns across threads, each core reads its
// half, into its own cache, so a one-row product counts ROW_WORK per float of Bm against PAR_MIN
// (the FFN's 128 x 384 goes to two threads, a 128 x 128 stays on one: measured, 8 beats 1 and 16)
// and its column blocks are 2 vectors wide, so there are blocks enough to split.
// A training step's A was written several ops before and has left the cache, and a row tile reads
// its MM_TR rows as MM_TR streams of broadcasts, too many for the hardware to fetch ahead: so
// each row tile asks for the next one's rows of A (into L2). At 1,280 x 128 -> 128 with A and C
// cold, 137 -> 155 GFLOP/s on two threads; with them in cache, no change. Asking for C's lines
// ahead too measured slower. A prefetch changes no value.
static const long ROW_WORK = 8;
inline void gemm_unpacked(float* C, const float* A, long ars, long aks, const float* Bm, int M, int K, int Nc,
                          int add) {
    int CB = M == 1 ? 2 * VW : 8 * VW;
    int ntr = (M + MM_TR - 1) / MM_TR, ncb = (Nc + CB - 1) / CB;
    long work = M == 1 ? (long)K * Nc * ROW_WORK : (long)M * K * Nc;
    parallel_for((long)ntr * ncb, work, [&](long u0, long u1) {
        for (long u = u0; u < u1;) {   // a thread's units of one row tile: one range of columns
            int ti = (int)(u / ncb), cb = (int)(u % ncb);
            long u_end = (long)(ti + 1) * ncb < u1 ? (long)(ti + 1) * ncb : u1;
            int m0 = ti * MM_TR, mr = M - m0 < MM_TR ? M - m0 : MM_TR;
            int j = cb * CB, j1 = (int)(u_end - (long)ti * ncb) * CB;
            if (j1 > Nc) j1 = Nc;
            u = u_end;
            const float* a = A + m0 * ars;
            for (int i = 0; aks == 1 && i < MM_TR && m0 + MM_TR + i < M; i++)   // the next row tile's A, into L2
                for (int k = 0; k < K; k += 16) __builtin_prefetch(A + (long)(m0 + MM_TR + i) * ars + k, 0, 2);
            int most = tile_vectors(mr);
            for (int left = (j1 - j) / VW; left > 0;) {   // whole vectors of columns
                int nv = left >= most ? most : left >= 4 ? 4 : left >= 2 ? 2 : 1;
                gemm_tile_any(C + (long)m0 * Nc + j, Nc, a, ars, aks, Bm + j, Nc, K, add, mr, nv);
                j += nv * VW;
                left -= nv;
            }
            if (j < j1) gemm_columns(C, Nc, A, ars, aks, Bm, Nc, K, add, m0, m0 + mr, j, j1);
        }
    });
}

// ---- packing Bm. A tile reads, for each k, its vectors of Bm's row k: rows Nc floats apart, so
// a large Bm (the weight gradient's, K = every row of the batch) costs a cache line and soon a
// page per k. Copied into strips, a k block's rows of 2 vectors one after another, it is read in
// order. K is cut into blocks of at most PACK_KC rows, so that a strip stays in L1 and a panel in
// L2 while every row tile of the block runs against it; between blocks each tile's partial sums
// wait in a scratch (acc) and carry on from there. Each thread copies the column block it works
// on into its own panel, so no thread waits on another; a copy changes no value, and a paused
// chain of fmas no sum, so the result has the bits of one pass over k.
// A column block of 2 strips, not 4: a weight gradient of 128 rows (11 row tiles of 12) then has
// 2 blocks of 11 units for two threads, not 1 block split 6 and 5, and each thread packs half
// the panel (dW at 128 x 1,280 x 128: 182 -> 194 GFLOP/s on two threads; other shapes the same).
static const int PACK_STRIPS = 2;          // strips of 2*VW columns per column block
static const int PACK_KC = 256;            // most rows of Bm in one panel: a strip of 16 KB at 16 lanes
static const int PACK_MIN_ROWS = 64;       // rows of A enough to pay for copying Bm
static const long PACK_MIN_FLOATS = 65536; // a Bm from 256 KB up: smaller ones stay in cache as they are

// panel (nstrips, kn, 2*VW): strip s holds columns j0 + s*2*VW .. +2*VW of Bm's rows k0 .. k0+kn
inline void gemm_pack(float* panel, const float* Bm, int Nc, int k0, int kn, int j0, int nstrips) {
    int SW = 2 * VW;
    for (int s = 0; s < nstrips; s++)
        for (int k = 0; k < kn; k++)
            memcpy(panel + ((long)s * kn + k) * SW, Bm + (long)(k0 + k) * Nc + j0 + s * SW, SW * sizeof(float));
}

// rows [m0, m1) of C's column block [j0, j1) against packed strips, k block by k block; the
// columns past the last whole strip come from Bm in place, over all of K (a 1-vector tile, then
// scalar ones). acc (m1-m0, ns*SW) holds the strips' partial sums between k blocks.
inline void gemm_packed_block(float* C, const float* A, long ars, long aks, const float* Bm, int K, int Nc,
                              int add, int m0, int m1, int j0, int j1, float* panel, float* acc) {
    int SW = 2 * VW, ns = (j1 - j0) / SW, lda = ns * SW;
    int nkb = (K + PACK_KC - 1) / PACK_KC, kc = (K + nkb - 1) / nkb;   // k blocks of even size
    for (int k0 = 0; k0 < K; k0 += kc) {
        int kn = K - k0 < kc ? K - k0 : kc, first = k0 == 0, last = k0 + kn == K;
        gemm_pack(panel, Bm, Nc, k0, kn, j0, ns);
        for (int m = m0; m < m1; m += MM_TR) {
            int mr = m1 - m < MM_TR ? m1 - m : MM_TR;
            const float* a = A + m * ars + k0 * aks;
            float* acc_m = acc + (long)(m - m0) * lda;
            for (int s = 0; s < ns; s++) {
                const float* init = first ? nullptr : acc_m + s * SW;
                float* out = last ? C + (long)m * Nc + j0 + s * SW : acc_m + s * SW;
                gemm_tile_any(out, last ? Nc : lda, a, ars, aks, panel + (long)s * kn * SW, SW, kn,
                              last ? add : 0, mr, 2, init, lda);
            }
        }
    }
    for (int m = m0; m < m1; m += MM_TR) {
        int mr = m1 - m < MM_TR ? m1 - m : MM_TR, j = j0 + ns * SW;
        for (; j + VW <= j1; j += VW)
            gemm_tile_any(C + (long)m * Nc + j, Nc, A + m * ars, ars, aks, Bm + j, Nc, K, add, mr, 1);
        if (j < j1) gemm_columns(C, Nc, A, ars, aks, Bm, Nc, K, add, m, m + mr, j, j1);
    }
}

// C (M,Nc) (+)= A Bm through packed strips. Work units: a column block x MM_TR rows, column block
// major; a thread takes its units' rows of each column block it meets as one gemm_packed_block,
// so it packs each panel once for all of them.
inline void gemm_packed(float* C, const float* A, long ars, long aks, const float* Bm, int M, int K, int Nc,
                        int add) {
    int SW = 2 * VW, CB = PACK_STRIPS * SW;
    int ntr = (M + MM_TR - 1) / MM_TR, ncb = (Nc + CB - 1) / CB;
    parallel_for((long)ncb * ntr, (long)M * K * Nc, [&](long u0, long u1) {
        thread_local std::vector<float> panel, acc;   // panel (PACK_STRIPS, kc, SW), acc (M, CB)
        if (panel.size() < (size_t)PACK_KC * CB) panel.resize((size_t)PACK_KC * CB);
        if (acc.size() < (size_t)M * CB) acc.resize((size_t)M * CB);
        for (long u = u0; u < u1;) {
            int cb = (int)(u / ntr), ti = (int)(u % ntr);
            long u_end = (long)(cb + 1) * ntr < u1 ? (long)(cb + 1) * ntr : u1;   // this block's units
            int m0 = ti * MM_TR, m1 = (int)(u_end - (long)cb * ntr) * MM_TR;
            int j0 = cb * CB, j1 = j0 + CB < Nc ? j0 + CB : Nc;
            gemm_packed_block(C, A, ars, aks, Bm, K, Nc, add, m0, m1 < M ? m1 : M, j0, j1, panel.data(),
                              acc.data());
            u = u_end;
        }
    });
}

// C (M,Nc) (+)= A Bm: packed when Bm is large and A has rows enough, else in place (a decoding
// step's one row reads Bm once either way)
inline bool gemm_packs(int M, int K, int Nc) { return M >= PACK_MIN_ROWS && (long)K * Nc >= PACK_MIN_FLOATS; }
inline void gemm(float* C, const float* A, long ars, long aks, const float* Bm, int M, int K, int Nc, int add) {
    if (gemm_packs(M, K, Nc)) gemm_packed(C, A, ars, aks, Bm, M, K, Nc, add);
    else gemm_unpacked(C, A, ars, aks, Bm, M, K, Nc, add);
}

// out[j, i] = in[i, j]: out (cols, rows), in (rows, cols)
inline void transpose(float* out, const float* in, int rows, int cols) {
    parallel_for(cols, (long)rows * cols / 16, [&](long j0, long j1) {
        for (long j = j0; j < j1; j++)
            for (int i = 0; i < rows; i++) out[j * rows + i] = in[(long)i * cols + j];
    });
}
// the same, into a per-thread scratch
inline float* transposed(const float* in, int rows, int cols) {
    thread_local std::vector<float> scratch;
    if (scratch.size() < (size_t)rows * cols) scratch.resize((size_t)rows * cols);
    transpose(scratch.data(), in, rows, cols);
    return scratch.data();
}

// out = inp W^T: Bm = W^T (IC,OC). WT, when not nullptr, is that transpose made once by the caller
// (a decoder keeps one per weight: its weights do not change while it decodes); else it is made
// here, a cost of IC*OC copies against N*IC*OC multiply-adds.
inline void matmul_forward(float* out, const float* inp, const float* W, const float* WT, int N, int IC, int OC) {
    gemm(out, inp, IC, 1, WT ? WT : transposed(W, OC, IC), N, IC, OC, 0);
}

// dinp += dout W (A = dout (N,OC), Bm = W as stored, (OC,IC));
// dW += dout^T inp (A = dout^T, read in place with strides (1, OC); Bm = inp (N,IC))
inline void matmul_backward(float* dinp, float* dW, const float* dout, const float* inp, const float* W,
                            int N, int IC, int OC) {
    if (dinp) gemm(dinp, dout, OC, 1, W, N, OC, IC, 1);
    if (dW) gemm(dW, dout, 1, OC, inp, OC, N, IC, 1);
}

// ----------------------------------------------------------------------------------------------
// RMSNorm: rstd[n] = 1 / sqrt(mean_c inp[n,c]^2 + eps);  out[n,c] = inp[n,c] * rstd[n] * w[c]
// out (N,C), rstd (N), inp (N,C), w (C). Each row's sum is one fma chain over c in order;
// NORM_ROWS rows' chains run side by side (one chain alone waits on its last result every step).
static const int NORM_ROWS = 8;
inline void rmsnorm_forward(float* out, float* rstd, const float* inp, const float* w, int N, int C, float eps) {
    parallel_for(N, (long)N * C * ELEM_WORK, [&](long n0, long n1) {
        for (long g = n0; g < n1; g += NORM_ROWS) {
            int R = n1 - g < NORM_ROWS ? (int)(n1 - g) : NORM_ROWS;
            float ss[NORM_ROWS] = {};
            for (int c = 0; c < C; c++)
                for (int r = 0; r < R; r++) ss[r] = fmaf(inp[(g + r) * C + c], inp[(g + r) * C + c], ss[r]);
            for (int r = 0; r < R; r++) {
                long n = g + r;
                const float* x = inp + n * C;
                float rs = 1.0f / sqrtf(ss[r] / C + eps);
                rstd[n] = rs;
                for (int c = 0; c < C; c++) out[n * C + c] = x[c] * rs * w[c];
            }
        }
    });
}

// forward did out = x * r * w with r = (mean x^2 + eps)^-1/2, so with g = dout * w:
//   dx[c] += r * g[c] - x[c] * r^3 * (sum_c' g[c'] x[c']) / C
//   dw[c] += sum_n dout[n,c] * x[n,c] * r[n]   (each channel's sum in n order; threads own channels)
inline void rmsnorm_backward(float* dinp, float* dw, const float* dout, const float* inp, const float* w,
                             const float* rstd, int N, int C) {
    parallel_for(N, (long)N * C * ELEM_WORK, [&](long n0, long n1) {
        for (long g = n0; g < n1; g += NORM_ROWS) {   // NORM_ROWS rows' dots side by side, as in the forward
            int R = n1 - g < NORM_ROWS ? (int)(n1 - g) : NORM_ROWS;
            float dot[NORM_ROWS] = {};
            for (int c = 0; c < C; c++)
                for (int r = 0; r < R; r++)
                    dot[r] = fmaf(dout[(g + r) * C + c] * w[c], inp[(g + r) * C + c], dot[r]);
            for (int r = 0; r < R; r++) {
                long n = g + r;
                const float* x = inp + n * C;
                const float* go = dout + n * C;
                float rs = rstd[n];
                float* dx = dinp + n * C;
                for (int c = 0; c < C; c++) dx[c] += rs * go[c] * w[c] - x[c] * rs * rs * rs * dot[r] / C;
            }
        }
    });
    if (!dw) return;
    // rows n outer, a block of 64 channels inner: rows are read in order and the 64 sums (each
    // still over n in order) vectorise
    const int CB = 64;
    parallel_for((C + CB - 1) / CB, (long)N * C * ELEM_WORK, [&](long b0, long b1) {
        for (long b = b0; b < b1; b++) {
            int c0 = (int)b * CB, c1 = c0 + CB < C ? c0 + CB : C;
            float acc[CB] = {};
            for (int n = 0; n < N; n++)
                for (int c = c0; c < c1; c++)
                    acc[c - c0] = fmaf(dout[(long)n * C + c] * inp[(long)n * C + c], rstd[n], acc[c - c0]);
            for (int c = c0; c < c1; c++) dw[c] += acc[c - c0];
        }
    });
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

// cos and sin of every (position, i), made by rope_angle once per thread and kept: a decoding
// step would otherwise spend more time in cos and sin than in its matmuls. cs (npos, HS/2, 2).
struct RopeTable { int HS = 0; float theta = 0; int npos = 0; std::vector<float> cs; };
inline const float* rope_table(int HS, float theta, int max_pos) {
    thread_local std::vector<RopeTable> tables;   // one per (HS, theta) in use: backbone, processor
    RopeTable* t = nullptr;
    for (RopeTable& x : tables)
        if (x.HS == HS && x.theta == theta) t = &x;
    if (!t) { tables.push_back(RopeTable{HS, theta, 0, {}}); t = &tables.back(); }
    int h = HS / 2;
    if (max_pos >= t->npos) {
        int np = max_pos + 1 > 2 * t->npos ? max_pos + 1 : 2 * t->npos;
        t->cs.resize((size_t)np * h * 2);
        for (int p = t->npos; p < np; p++)
            for (int i = 0; i < h; i++) rope_angle(&t->cs[((size_t)p * h + i) * 2], &t->cs[((size_t)p * h + i) * 2 + 1], p, i, HS, theta);
        t->npos = np;
    }
    return t->cs.data();
}
inline int max_of(const int* x, int n) {
    int m = 0;
    for (int i = 0; i < n; i++) m = x[i] > m ? x[i] : m;
    return m;
}

inline void rope_forward(float* out, const float* inp, const int* pos, int N, int NH, int HS, float theta) {
    int h = HS / 2, maxp = max_of(pos, N);
    parallel_for(N, (long)N * NH * HS * ELEM_WORK, [&](long n0, long n1) {
        const float* table = rope_table(HS, theta, maxp);
        for (long n = n0; n < n1; n++) {
            const float* cs = table + (long)pos[n] * h * 2;
            for (int i = 0; i < h; i++) {
                float c = cs[2 * i], s = cs[2 * i + 1];
                for (int hh = 0; hh < NH; hh++) {
                    long o = n * NH * HS + hh * HS;
                    float x0 = inp[o + i], x1 = inp[o + i + h];
                    out[o + i] = x0 * c - x1 * s;
                    out[o + i + h] = x0 * s + x1 * c;
                }
            }
        }
    });
}

// forward was a rotation R(a); its transpose is the rotation by -a, so
//   dx[i] += dout[i] cos a + dout[i+h] sin a ;  dx[i+h] += -dout[i] sin a + dout[i+h] cos a
inline void rope_backward(float* dinp, const float* dout, const int* pos, int N, int NH, int HS, float theta) {
    int h = HS / 2, maxp = max_of(pos, N);
    parallel_for(N, (long)N * NH * HS * ELEM_WORK, [&](long n0, long n1) {
        const float* table = rope_table(HS, theta, maxp);
        for (long n = n0; n < n1; n++) {
            const float* cs = table + (long)pos[n] * h * 2;
            for (int i = 0; i < h; i++) {
                float c = cs[2 * i], s = cs[2 * i + 1];
                for (int hh = 0; hh < NH; hh++) {
                    long o = n * NH * HS + hh * HS;
                    float g0 = dout[o + i], g1 = dout[o + i + h];
                    dinp[o + i] += g0 * c + g1 * s;
                    dinp[o + i + h] += -g0 * s + g1 * c;
                }
            }
        }
    });
}

// ----------------------------------------------------------------------------------------------
// Weighted sums of rows, up to WS_MAX of them side by side. Sum r is
//   out_r[d] (+)= sum_{t < n_r} w_r[t] * rows_r[t*ld + d]      for d < HS,
// each out_r[d] one fma chain over t in order, from 0 (or from out_r[d] when add). The chains are
// independent, so running several at once hides the fma's latency (one chain alone waits on its
// last result every step); the sums stay in registers, not in out. Every chain takes its steps in
// order, however many run beside it, so the result does not depend on the grouping.
struct WeightedSum { float* out; const float* w; const float* rows; int n; };
static const int WS_MAX = 8;

// R is a template argument, so the R sums unroll into registers (with R a variable they would
// live in memory, a store and a load per step)
template <int R, class V, class Load, class Fma, class Bcast, class Store>
inline void weighted_sums_lanes(const WeightedSum* c, long ld, int d, int add, Load load, Fma fma, Bcast bcast,
                                Store store) {
    V acc[R];
    int m = c[0].n;
    for (int r = 0; r < R; r++) {
        acc[r] = add ? load(c[r].out + d) : bcast(0.0f);
        m = c[r].n < m ? c[r].n : m;
    }
    for (int t = 0; t < m; t++)            // the steps every chain has, all chains together
        for (int r = 0; r < R; r++) acc[r] = fma(bcast(c[r].w[t]), load(c[r].rows + t * ld + d), acc[r]);
    for (int r = 0; r < R; r++) {          // then each chain's own last steps
        for (int t = m; t < c[r].n; t++) acc[r] = fma(bcast(c[r].w[t]), load(c[r].rows + t * ld + d), acc[r]);
        store(c[r].out + d, acc[r]);
    }
}
template <class V, class Load, class Fma, class Bcast, class Store>
inline void weighted_sums_any(const WeightedSum* c, int R, long ld, int d, int add, Load load, Fma fma, Bcast bcast,
                              Store store) {
#define BT_WS(N) case N: weighted_sums_lanes<N, V>(c, ld, d, add, load, fma, bcast, store); break;
    switch (R) { BT_WS(1) BT_WS(2) BT_WS(3) BT_WS(4) BT_WS(5) BT_WS(6) BT_WS(7) BT_WS(8) }
#undef BT_WS
}
static_assert(WS_MAX == 8, "weighted_sums_any has a case for every R up to WS_MAX");

inline void weighted_sums(const WeightedSum* c, int R, long ld, int HS, int add) {
    int d = 0;
    for (; d + VW <= HS; d += VW)
        weighted_sums_any<vfloat>(c, R, ld, d, add, [](const float* p) { return vload(p); },   // lambdas, not
                                  [](vfloat a, vfloat b, vfloat x) { return vfma(a, b, x); },  // function
                                  [](float x) { return vbroadcast(x); },                       // pointers:
                                  [](float* p, vfloat x) { vstore(p, x); });                   // inlined
#if defined(__AVX512F__)
    for (; d + 8 <= HS; d += 8)            // a head of 8 on a 16-lane machine: AVX2's 8 lanes
        weighted_sums_any<__m256>(c, R, ld, d, add, [](const float* p) { return _mm256_loadu_ps(p); },
                                  [](__m256 a, __m256 b, __m256 x) { return _mm256_fmadd_ps(a, b, x); },
                                  [](float x) { return _mm256_set1_ps(x); },
                                  [](float* p, __m256 x) { _mm256_storeu_ps(p, x); });
#endif
    for (; d < HS; d++)
        weighted_sums_any<float>(c, R, ld, d, add, [](const float* p) { return *p; },
                                 [](float a, float b, float x) { return fmaf(a, b, x); },
                                 [](float x) { return x; }, [](float* p, float x) { *p = x; });
}

// ----------------------------------------------------------------------------------------------
// Rows of one (b, h) lie B*C floats apart: 16 KB at batch 32, C = 128, so every key row of a
// head falls in the same few sets of the L1 cache, which holds 8 of them (a power-of-two stride
// aliases), and a query's scores and sums miss it on every key. A query group of one (b, h) works
// on copies of its keys and values made contiguous first (gather_rows): Tk*HS copies against
// Tq*Tk*HS multiply-adds, so from WS_MAX queries up. A copy changes no value.
// out (n,d) = rows of in, ld apart: out[t,:] = in[t*ld, 0..d)
inline void gather_rows(float* out, const float* in, long ld, int n, int d) {
    for (int t = 0; t < n; t++) {   // a few vectors a row: inline, not a call to memcpy per row
        const float* src = in + t * ld;
        float* dst = out + (long)t * d;
        int c = 0;
        for (; c + VW <= d; c += VW) vstore(dst + c, vload(src + c));
        for (; c < d; c++) dst[c] = src[c];
    }
}

// R chains of attention, side by side: chain r's query qr[r] (HS) against its nk[r] keys from
// kr[r] (rows ld apart): scores a = q.k / sqrt(HS) into ar[r] (8 keys at a time), their softmax
// (the exps VW at a time; the max and the sum in key order), zeros for the masked keys up to Tk,
// then the weighted sums of its values into sums[r].out. Each chain's bits are its own alone.
inline void attention_chains(int R, const float* const* qr, const float* const* kr, float* const* ar,
                             const int* nk, const WeightedSum* sums, long ld, int Tk, int HS) {
    float scale = 1.0f / sqrtf((float)HS);
    for (int r = 0; r < R; r++) {
        dots8(ar[r], qr[r], kr[r], ld, HS, nk[r]);
        for (int j = 0; j < nk[r]; j++) ar[r][j] *= scale;
    }
    for (int r = 0; r < R; r++) {
        float* a = ar[r];
        float mx = -INFINITY;
        for (int j = 0; j < nk[r]; j++)
            if (a[j] > mx) mx = a[j];
        exp_shifted(a, a, nk[r], mx);
        float sum = 0.0f;
        for (int j = 0; j < nk[r]; j++) sum += a[j];
        for (int j = 0; j < nk[r]; j++) a[j] /= sum;
        for (int j = nk[r]; j < Tk; j++) a[j] = 0.0f;   // masked keys; columns past Tk are not written
    }
    weighted_sums(sums, R, ld, HS, 0);   // out_i = sum_j a_ij v_j
}

// ----------------------------------------------------------------------------------------------
// Multi-head attention over a set of keys (the KV cache, or the processor's own tokens).
// Time-major rows: query i of example b is row i*B + b; key j of example b is row j*B + b.
// Query i sits at absolute position q0 + i. If causal, it sees keys j <= q0 + i, else all Tk keys.
//   att[i,b,h,j] = softmax_j( q[i,b,h,:] . k[j,b,h,:] / sqrt(HS) )
//   out[i,b,h,:] = sum_j att[i,b,h,j] * v[j,b,h,:]
// out (Tq,B,NH*HS), att (Tq,B,NH,ld) with ld >= Tk (the masked entries j < Tk are 0),
// q (Tq,B,NH*HS), k, v (Tk,B,NH*HS)
inline void attention_forward(float* out, float* att, const float* q, const float* k, const float* v,
                              int Tq, int Tk, int ld, int q0, int causal, int B, int NH, int HS) {
    int C = NH * HS;
    long ldr = (long)B * C;   // from one position's row to the next, within one (b, h)
    // One chain per (b, h, query i), numbered n = (b*NH + h)*Tq + i, in groups of WS_MAX.
    // From WS_MAX queries up, a thread takes whole (b, h)s, each against contiguous copies of its
    // keys and values. Fewer queries (a decoding step, Tq = 1) read each key once: groups of WS_MAX
    // consecutive chains then span heads and sequences, in place. The grouping changes no bit.
    long n_chains = (long)B * NH * Tq;
    int by_head = Tq >= WS_MAX;
    long units = by_head ? (long)B * NH : (n_chains + WS_MAX - 1) / WS_MAX;
    parallel_for(units, (long)Tq * B * NH * Tk * HS, [&](long u0, long u1) {
        thread_local std::vector<float> kv;   // (2,Tk,HS): one (b, h)'s keys, then its values
        if (by_head && kv.size() < 2 * (size_t)Tk * HS) kv.resize(2 * (size_t)Tk * HS);
        const float* qr[WS_MAX];   // chain r: its query (HS), its first key row, its attention row
        const float* kr[WS_MAX];   //   (ld) and how many keys it sees; its weighted sum
        float* ar[WS_MAX];
        int nk[WS_MAX];
        WeightedSum sums[WS_MAX];
        auto chain = [&](int r, long n, const float* keys, const float* vals) {
            long bh = n / Tq;
            int i = (int)(n % Tq), b = (int)(bh / NH), h = (int)(bh % NH);
            nk[r] = causal ? q0 + i + 1 : Tk;
            qr[r] = q + ((long)i * B + b) * C + h * HS;
            kr[r] = keys ? keys : k + (long)b * C + h * HS;
            ar[r] = att + (((long)i * B + b) * NH + h) * ld;
            sums[r] = {out + ((long)i * B + b) * C + h * HS, ar[r], vals ? vals : v + (long)b * C + h * HS, nk[r]};
        };
        for (long u = u0; u < u1; u++) {
            if (by_head) {   // u = b*NH + h: its queries WS_MAX at a time, against the copies
                long b = u / NH, h = u % NH;
                float *kc = kv.data(), *vc = kc + (long)Tk * HS;
                gather_rows(kc, k + b * C + h * HS, ldr, Tk, HS);
                gather_rows(vc, v + b * C + h * HS, ldr, Tk, HS);
                for (int i0 = 0; i0 < Tq; i0 += WS_MAX) {
                    int R = Tq - i0 < WS_MAX ? Tq - i0 : WS_MAX;
                    for (int r = 0; r < R; r++) chain(r, u * Tq + i0 + r, kc, vc);
                    attention_chains(R, qr, kr, ar, nk, sums, HS, Tk, HS);
                }
            } else {         // u = a group of WS_MAX consecutive chains, in place
                long n0 = u * WS_MAX;
                int R = n_chains - n0 < WS_MAX ? (int)(n_chains - n0) : WS_MAX;
                for (int r = 0; r < R; r++) chain(r, n0 + r, nullptr, nullptr);
                attention_chains(R, qr, kr, ar, nk, sums, ldr, Tk, HS);
            }
        }
    });
}

// forward did out = sum_j a_j v_j with a = softmax(s), s_j = q.k_j * scale, so per (i,b,h):
//   da_j = dout . v_j ;  ds_j = a_j (da_j - sum_j' a_j' da_j')
//   dq += scale * sum_j ds_j k_j ;  dk_j += scale * ds_j q ;  dv_j += a_j dout
// dk and dv of one (b,h) collect from every query, so threads split over (b,h) only. Each (b,h)
// reads its q, k, v, dout rows and attention rows many times over, so it copies them first
// into contiguous scratch (gather_rows; see attention_forward). Each dq_i is summed over keys j
// in order; then each dk_j and dv_j over the queries i that saw key j, in order, in registers
// (the same sum as adding query by query, without a store per term).
inline void attention_backward(float* dq, float* dk, float* dv, const float* dout, const float* att,
                               const float* q, const float* k, const float* v,
                               int Tq, int Tk, int ld, int q0, int causal, int B, int NH, int HS) {
    int C = NH * HS;
    long ldr = (long)B * C;   // from one position's row to the next, within one (b, h)
    float scale = 1.0f / sqrtf((float)HS);
    parallel_for((long)B * NH, (long)Tq * B * NH * Tk * HS, [&](long u0, long u1) {
        // this (b,h)'s copies: qc, dc (Tq,HS), kc, vc (Tk,HS), ac (Tq,Tk) its attention rows;
        // ds (Tq,Tk); w (WS_MAX,2,Tq) the weights of WS_MAX keys' dk and dv sums
        thread_local std::vector<float> mem;
        long nq = (long)Tq * HS, nk_ = (long)Tk * HS, na = (long)Tq * Tk;
        long need = 2 * nq + 2 * nk_ + 2 * na + 2L * WS_MAX * Tq;
        if ((long)mem.size() < need) mem.resize(need);
        float *qc = mem.data(), *dc = qc + nq, *kc = dc + nq, *vc = kc + nk_, *ac = vc + nk_, *ds = ac + na,
              *w = ds + na;
        WeightedSum sums[WS_MAX], sums_v[WS_MAX];
        for (long u = u0; u < u1; u++) {      // u = b*NH + h
            int b = (int)(u / NH), h = (int)(u % NH);
            long off = (long)b * C + h * HS;  // this (b,h)'s first row in q, k, v, dout
            gather_rows(qc, q + off, ldr, Tq, HS);
            gather_rows(dc, dout + off, ldr, Tq, HS);
            gather_rows(kc, k + off, ldr, Tk, HS);
            gather_rows(vc, v + off, ldr, Tk, HS);
            gather_rows(ac, att + ((long)b * NH + h) * ld, (long)B * NH * ld, Tq, Tk);
            auto nk = [&](int i) { return causal ? q0 + i + 1 : Tk; };
            // da_ij = dout_i . v_j, into ds's rows
            for (int i = 0; i < Tq; i++) dots8(ds + (long)i * Tk, dc + (long)i * HS, vc, HS, HS, nk(i));
            // adot_i = sum_j a_ij da_ij (in j order), WS_MAX queries' chains side by side; then
            // ds_ij = a_ij (da_ij - adot_i) * scale in place
            for (int i0 = 0; i0 < Tq; i0 += WS_MAX) {
                int R = Tq - i0 < WS_MAX ? Tq - i0 : WS_MAX, m = nk(i0);
                const float* a[WS_MAX];   // query i0 + r: its attention row and its row of ds
                float* dsr[WS_MAX];
                float adot[WS_MAX] = {};
                for (int r = 0; r < R; r++) a[r] = ac + (long)(i0 + r) * Tk, dsr[r] = ds + (long)(i0 + r) * Tk;
                for (int j = 0; j < m; j++)   // the keys the group's first query sees: all of them do
                    for (int r = 0; r < R; r++) adot[r] = fmaf(a[r][j], dsr[r][j], adot[r]);
                for (int r = 0; r < R; r++) {
                    for (int j = m; j < nk(i0 + r); j++) adot[r] = fmaf(a[r][j], dsr[r][j], adot[r]);
                    for (int j = 0; j < nk(i0 + r); j++) dsr[r][j] = a[r][j] * (dsr[r][j] - adot[r]) * scale;
                }
            }
            // dq_i += sum_j ds_ij k_j, WS_MAX queries side by side
            for (int i0 = 0; i0 < Tq; i0 += WS_MAX) {
                int R = Tq - i0 < WS_MAX ? Tq - i0 : WS_MAX;
                for (int r = 0; r < R; r++)
                    sums[r] = {dq + off + (i0 + r) * ldr, ds + (long)(i0 + r) * Tk, kc, nk(i0 + r)};
                weighted_sums(sums, R, HS, HS, 1);
            }
            // dk_j += sum_i ds_ij q_i and dv_j += sum_i a_ij dout_i over the queries i that saw key j
            // (i >= j - q0 when causal), WS_MAX keys side by side
            for (int j0 = 0; j0 < Tk; j0 += WS_MAX) {
                int R = 0;
                for (int j = j0; j < Tk && j < j0 + WS_MAX; j++) {
                    int i0 = causal ? (j - q0 > 0 ? j - q0 : 0) : 0, n = Tq - i0;
                    if (n <= 0) continue;
                    float* wk = w + (long)R * 2 * Tq;
                    float* wv = wk + Tq;
                    for (int i = 0; i < n; i++) {
                        wk[i] = ds[(long)(i0 + i) * Tk + j];
                        wv[i] = ac[(long)(i0 + i) * Tk + j];
                    }
                    sums[R] = {dk + off + j * ldr, wk, qc + (long)i0 * HS, n};
                    sums_v[R] = {dv + off + j * ldr, wv, dc + (long)i0 * HS, n};
                    R++;
                }
                if (R == 0) continue;
                weighted_sums(sums, R, HS, HS, 1);
                weighted_sums(sums_v, R, HS, HS, 1);
            }
        }
    });
}

// ----------------------------------------------------------------------------------------------
// SwiGLU gate: out = silu(h1) * h3, silu(x) = x * sigmoid(x).   out, h1, h3 (N)
// swiglu_forward_naive is the reference, one element at a time; swiglu_forward does VW at a time
// with the same operations in the same order (a test compares their bits).
inline void swiglu_forward_naive(float* out, const float* h1, const float* h3, long i0, long i1) {
    for (long i = i0; i < i1; i++) {
        float sg = sigmoid_fixed(h1[i]);
        out[i] = h1[i] * sg * h3[i];
    }
}
inline void swiglu_forward(float* out, const float* h1, const float* h3, long N) {
    parallel_for(N, N * ELEM_WORK, [&](long i0, long i1) {
        long i = i0;
        for (; i + VW <= i1; i += VW) {
            vfloat x = vload(h1 + i);
            vstore(out + i, vmul(vmul(x, vsigmoid(x)), vload(h3 + i)));
        }
        swiglu_forward_naive(out, h1, h3, i, i1);
    });
}

// forward did out = h1 sigma(h1) h3, so
//   dh3 += dout * h1 sigma(h1) ;  dh1 += dout * h3 * sigma(h1) (1 + h1 (1 - sigma(h1)))
inline void swiglu_backward_naive(float* dh1, float* dh3, const float* dout, const float* h1, const float* h3,
                                  long i0, long i1) {
    for (long i = i0; i < i1; i++) {
        float sg = sigmoid_fixed(h1[i]);
        dh3[i] += dout[i] * h1[i] * sg;
        dh1[i] += dout[i] * h3[i] * sg * (1.0f + h1[i] * (1.0f - sg));
    }
}
inline void swiglu_backward(float* dh1, float* dh3, const float* dout, const float* h1, const float* h3, long N) {
    parallel_for(N, N * ELEM_WORK, [&](long i0, long i1) {
        long i = i0;
        vfloat one = vbroadcast(1.0f);
        for (; i + VW <= i1; i += VW) {
            vfloat x = vload(h1 + i), sg = vsigmoid(x), g = vload(dout + i);
            vstore(dh3 + i, vadd(vload(dh3 + i), vmul(vmul(g, x), sg)));
            vfloat t = vmul(vmul(g, vload(h3 + i)), sg);
            vstore(dh1 + i, vadd(vload(dh1 + i), vmul(t, vadd(one, vmul(x, vsub(one, sg))))));
        }
        swiglu_backward_naive(dh1, dh3, dout, h1, h3, i, i1);
    });
}

// ----------------------------------------------------------------------------------------------
// Residual add: out = a + b   (N)
inline void residual_forward(float* out, const float* a, const float* b, long N) {
    parallel_for(N, N * ELEM_WORK, [&](long i0, long i1) {
        for (long i = i0; i < i1; i++) out[i] = a[i] + b[i];
    });
}
// forward did out = a + b, so da += dout and db += dout
inline void residual_backward(float* da, float* db, const float* dout, long N) {
    parallel_for(N, N * ELEM_WORK, [&](long i0, long i1) {
        for (long i = i0; i < i1; i++) { da[i] += dout[i]; db[i] += dout[i]; }
    });
}

// ----------------------------------------------------------------------------------------------
// Softmax cross-entropy with a per-row weight (0 masks a row out, 1/count makes a mean):
//   probs[n,:] = softmax(logits[n,:]);  loss[n] = -log probs[n, target[n]]   (0 where weight is 0)
// probs, logits (N,V); loss, weight (N); target (N)
inline void crossentropy_forward(float* loss, float* probs, const float* logits, const int* target,
                                 const float* weight, int N, int V) {
    parallel_for(N, (long)N * V * ELEM_WORK, [&](long n0, long n1) {
        for (long n = n0; n < n1; n++) {
            const float* z = logits + n * V;
            float* p = probs + n * V;
            float mx = -INFINITY;
            for (int i = 0; i < V; i++) mx = z[i] > mx ? z[i] : mx;
            exp_shifted(p, z, V, mx);
            float sum = 0.0f;
            for (int i = 0; i < V; i++) sum += p[i];
            for (int i = 0; i < V; i++) p[i] /= sum;
            // -log p[target] computed from the logits, which stays finite where p underflows
            loss[n] = weight[n] != 0.0f ? (mx + logf(sum) - z[target[n]]) : 0.0f;
        }
    });
}

// forward gave weight * -log softmax(z)[y], so dz[i] += weight * (p[i] - [i == y]) * dloss
inline void crossentropy_backward(float* dlogits, const float* probs, const int* target, const float* weight,
                                  float dloss, int N, int V) {
    parallel_for(N, (long)N * V * ELEM_WORK, [&](long n0, long n1) {
        for (long n = n0; n < n1; n++) {
            if (weight[n] == 0.0f) continue;
            float w = weight[n] * dloss;
            for (int i = 0; i < V; i++) dlogits[n * V + i] += w * (probs[n * V + i] - (i == target[n] ? 1.0f : 0.0f));
        }
    });
}

// ----------------------------------------------------------------------------------------------
// AdamW, as torch.optim.AdamW (decoupled weight decay, bias-corrected moments), step t >= 1:
//   p -= lr * wd * p ;  m = b1 m + (1-b1) g ;  v = b2 v + (1-b2) g^2
//   p -= lr * (m / (1-b1^t)) / (sqrt(v / (1-b2^t)) + eps)
// adamw_update_naive is the reference, one element at a time over [i0, i1); adamw_update does VW
// at a time with the same operations in the same order (IEEE division and square root: the
// same bits; a test compares them)
inline void adamw_update_naive(float* p, float* m, float* v, const float* g, long i0, long i1, float lr, float b1,
                               float b2, float eps, float wd, float bc1, float bc2) {
    for (long i = i0; i < i1; i++) {
        p[i] -= lr * wd * p[i];
        m[i] = b1 * m[i] + (1.0f - b1) * g[i];
        v[i] = b2 * v[i] + (1.0f - b2) * g[i] * g[i];
        float mh = m[i] / bc1, vh = v[i] / bc2;
        p[i] -= lr * mh / (sqrtf(vh) + eps);
    }
}
inline void adamw_update(float* p, float* m, float* v, const float* g, long N, float lr, float b1, float b2,
                         float eps, float wd, int t) {
    float bc1 = 1.0f - powf(b1, (float)t), bc2 = 1.0f - powf(b2, (float)t);
    parallel_for(N, N * ELEM_WORK, [&](long i0, long i1) {
        vfloat lrwd = vbroadcast(lr * wd), vb1 = vbroadcast(b1), vb2 = vbroadcast(b2), c1 = vbroadcast(1.0f - b1),
               c2 = vbroadcast(1.0f - b2), vbc1 = vbroadcast(bc1), vbc2 = vbroadcast(bc2), vlr = vbroadcast(lr),
               veps = vbroadcast(eps);
        long i = i0;
        for (; i + VW <= i1; i += VW) {
            vfloat pi = vload(p + i), gi = vload(g + i);
            pi = vsub(pi, vmul(lrwd, pi));
            vfloat mi = vadd(vmul(vb1, vload(m + i)), vmul(c1, gi));
            vfloat vi = vadd(vmul(vb2, vload(v + i)), vmul(vmul(c2, gi), gi));
            vfloat mh = vdiv(mi, vbc1), vh = vdiv(vi, vbc2);
            vstore(p + i, vsub(pi, vdiv(vmul(vlr, mh), vadd(vsqrt(vh), veps))));
            vstore(m + i, mi);
            vstore(v + i, vi);
        }
        adamw_update_naive(p, m, v, g, i, i1, lr, b1, b2, eps, wd, bc1, bc2);
    });
}
