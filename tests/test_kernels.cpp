// tests/test_kernels.cpp -- every kernel in kernels.cu, forward and backward, against its CPU op
// (tensor.hpp, and bt.cpp for the processor's select, gather and write back and the device path's
// plumbing) on random inputs; then bt.cpp's whole device path (--device cuda) against its CPU path:
// one training step of each kind (logits, loss, every gradient, the AdamW update), bt train's
// loop and checkpoint, greedy decoding and scoring.
// Pass: each kernel's tensors within 1e-5 of their max |value|, the model's within 1e-4
// (selections, copies and generated text: equal).
//
// One source, two builds:
//   g++ -x c++ (make test):           kernels.cu through tests/cuda_on_cpu.hpp, on the CPU
//   nvcc -x cu (make USE_CUDA=1 test): the real kernels on a GPU; with no GPU it says so, exits 0
// The test code is the same for both: inputs go to the "device" in a Dev buffer and come back
// with to_host(); only where a Dev lives differs.
#define DOCTEST_CONFIG_IMPLEMENT
#include <doctest/doctest.h>
#include <unistd.h>

#define BT_TESTING
#define BT_DEVICE   // bt.cpp compiles its device path (OP, g_device) and includes kernels.cu
#pragma GCC diagnostic ignored "-Wunused-function"   // bt's CLI commands, which only main() calls
#include "../bt.cpp"

// ---------------------------------------------------------------------------------------------
// A device copy of a host vector: Dev<float> d(x) copies x over, d.p is the device pointer,
// d.to_host() copies it back.
template <class T> struct Dev {
    T* p = nullptr;
    long n = 0;
    explicit Dev(const std::vector<T>& h) : n((long)h.size()) {
        cudaCheck(cudaMalloc(&p, sizeof(T) * (n > 0 ? n : 1)));
        cudaCheck(cudaMemcpy(p, h.data(), sizeof(T) * n, cudaMemcpyHostToDevice));
    }
    ~Dev() { cudaFree(p); }
    Dev(const Dev&) = delete;
    Dev& operator=(const Dev&) = delete;
    std::vector<T> to_host() const {
        std::vector<T> h(n);
        cudaCheck(cudaDeviceSynchronize());
        cudaCheck(cudaMemcpy(h.data(), p, sizeof(T) * n, cudaMemcpyDeviceToHost));
        return h;
    }
};

static Rng rng(1234);  // bt.cpp's splitmix64, fixed seed
static std::vector<float> randn(long n, float scale = 1.0f) {
    std::vector<float> x(n);
    for (float& v : x) v = scale * rng.normal();
    return x;
}
static std::vector<int> randint(long n, int lo, int hi) {  // [lo, hi]
    std::vector<int> x(n);
    for (int& v : x) v = rng.randint(lo, hi);
    return x;
}

// the worst relative difference seen per label, and its tolerance, printed as a table at the end
struct Worst { std::string label; double rel, tol; };
static std::vector<Worst> g_worst;
static void record(const std::string& label, double rel, double tol) {
    for (auto& w : g_worst)
        if (w.label == label) { w.rel = std::max(w.rel, rel); return; }
    g_worst.push_back({label, rel, tol});
}

// max |got - want| / max |want| (0 if both are all zeros; a NaN anywhere: infinity). Matching
// infinities (select's chosen scores) count as equal. *scale gets max |want|.
static double rel_diff(const float* got, const float* want, long n, double* scale) {
    double diff = 0;
    *scale = 0;
    for (long i = 0; i < n; i++) {
        if (std::isinf(want[i]) && got[i] == want[i]) continue;
        double d = fabs((double)got[i] - want[i]);
        diff = std::isnan(d) ? INFINITY : std::max(diff, d);
        *scale = std::max(*scale, fabs((double)want[i]));
    }
    return *scale > 0 ? diff / *scale : diff;
}

// the relative difference must be <= tol (1e-5 for a kernel). want must not be all zeros (a test
// that compares nothing).
static const double TOL = 1e-5;
static void check_close(const std::string& label, const std::vector<float>& got, const std::vector<float>& want,
                        double tol = TOL) {
    REQUIRE(got.size() == want.size());
    double scale;
    double rel = rel_diff(got.data(), want.data(), (long)want.size(), &scale);
    record(label, rel, tol);
    MESSAGE(label << ": n=" << want.size() << " max|want| " << scale << " max|diff|/max|want| " << rel);
    CHECK_MESSAGE(scale > 0, label << ": the reference is all zeros");
    CHECK_MESSAGE(rel <= tol, label << ": relative difference " << rel << " > " << tol);
}
// equal entries: ints compared as numbers, floats bit for bit (copies, zeros)
static void check_equal(const std::string& label, const std::vector<int>& got, const std::vector<int>& want) {
    long bad = 0;
    for (size_t i = 0; i < want.size() && i < got.size(); i++) bad += got[i] != want[i];
    record(label, (double)bad, 0);
    MESSAGE(label << ": n=" << want.size() << " differing entries " << bad);
    CHECK(got.size() == want.size());
    CHECK(bad == 0);
}
static void check_equal(const std::string& label, const std::vector<float>& got, const std::vector<float>& want) {
    long bad = 0;
    for (size_t i = 0; i < want.size() && i < got.size(); i++) bad += memcmp(&got[i], &want[i], sizeof(float)) != 0;
    record(label, (double)bad, 0);
    MESSAGE(label << ": n=" << want.size() << " differing entries (bitwise) " << bad);
    CHECK(got.size() == want.size());
    CHECK(bad == 0);
}

// =============================================================================================
// tensor.hpp's ops
// =============================================================================================
TEST_CASE("embedding forward and backward (repeated tokens)") {
    int N = 37, C = 24, V = 11;
    std::vector<int> tok = randint(N, 0, V - 1);
    std::vector<float> emb = randn((long)V * C), out = randn((long)N * C);
    Dev<int> d_tok(tok);
    Dev<float> d_emb(emb), d_out(out);
    embedding_forward(out.data(), tok.data(), emb.data(), N, C);
    cuda::embedding_forward(d_out.p, d_tok.p, d_emb.p, N, C);
    check_close("embedding_forward out", d_out.to_host(), out);

    std::vector<float> demb = randn((long)V * C), dout = randn((long)N * C);
    Dev<float> d_demb(demb), d_dout(dout);
    embedding_backward(demb.data(), dout.data(), tok.data(), N, C);
    cuda::embedding_backward(d_demb.p, d_dout.p, d_tok.p, N, C);
    check_close("embedding_backward demb", d_demb.to_host(), demb);
}

// both CPU paths: the tiled gemm (ragged edges: 37 rows, 40 and 24 columns) and the naive loops
static void test_matmul(int N, int IC, int OC) {
    std::string shape = " (" + std::to_string(N) + "x" + std::to_string(IC) + "->" + std::to_string(OC) + ")";
    std::vector<float> inp = randn((long)N * IC), W = randn((long)OC * IC, 0.3f), out = randn((long)N * OC);
    Dev<float> d_inp(inp), d_W(W), d_out(out);
    matmul_forward(out.data(), inp.data(), W.data(), nullptr, N, IC, OC);
    cuda::matmul_forward(d_out.p, d_inp.p, d_W.p, nullptr, N, IC, OC);
    check_close("matmul_forward out" + shape, d_out.to_host(), out);

    std::vector<float> dout = randn((long)N * OC), dinp = randn((long)N * IC), dW = randn((long)OC * IC);
    Dev<float> d_dout(dout), d_dinp(dinp), d_dW(dW);
    matmul_backward(dinp.data(), dW.data(), dout.data(), inp.data(), W.data(), N, IC, OC);
    cuda::matmul_backward(d_dinp.p, d_dW.p, d_dout.p, d_inp.p, d_W.p, N, IC, OC);
    check_close("matmul_backward dinp" + shape, d_dinp.to_host(), dinp);
    check_close("matmul_backward dW" + shape, d_dW.to_host(), dW);

    // a frozen weight (dW = nullptr), then no input gradient (dinp = nullptr)
    matmul_backward(dinp.data(), nullptr, dout.data(), inp.data(), W.data(), N, IC, OC);
    cuda::matmul_backward(d_dinp.p, nullptr, d_dout.p, d_inp.p, d_W.p, N, IC, OC);
    matmul_backward(nullptr, dW.data(), dout.data(), inp.data(), W.data(), N, IC, OC);
    cuda::matmul_backward(nullptr, d_dW.p, d_dout.p, d_inp.p, d_W.p, N, IC, OC);
    check_close("matmul_backward dinp, dW = nullptr" + shape, d_dinp.to_host(), dinp);
    check_close("matmul_backward dW, dinp = nullptr" + shape, d_dW.to_host(), dW);
}
TEST_CASE("matmul forward and backward, tiled and naive CPU paths, nullptr gradients") {
    test_matmul(37, 24, 40);
    test_matmul(3, 5, 7);
}

TEST_CASE("rmsnorm forward and backward (with and without dw)") {
    int N = 37, C = 24;
    float eps = 1e-5f;
    std::vector<float> inp = randn((long)N * C), w = randn(C), out = randn((long)N * C), rstd = randn(N);
    Dev<float> d_inp(inp), d_w(w), d_out(out), d_rstd(rstd);
    rmsnorm_forward(out.data(), rstd.data(), inp.data(), w.data(), N, C, eps);
    cuda::rmsnorm_forward(d_out.p, d_rstd.p, d_inp.p, d_w.p, N, C, eps);
    check_close("rmsnorm_forward out", d_out.to_host(), out);
    check_close("rmsnorm_forward rstd", d_rstd.to_host(), rstd);

    std::vector<float> dout = randn((long)N * C), dinp = randn((long)N * C), dw = randn(C);
    Dev<float> d_dout(dout), d_dinp(dinp), d_dw(dw);
    rmsnorm_backward(dinp.data(), dw.data(), dout.data(), inp.data(), w.data(), rstd.data(), N, C);
    cuda::rmsnorm_backward(d_dinp.p, d_dw.p, d_dout.p, d_inp.p, d_w.p, d_rstd.p, N, C);
    check_close("rmsnorm_backward dinp", d_dinp.to_host(), dinp);
    check_close("rmsnorm_backward dw", d_dw.to_host(), dw);
    rmsnorm_backward(dinp.data(), nullptr, dout.data(), inp.data(), w.data(), rstd.data(), N, C);
    cuda::rmsnorm_backward(d_dinp.p, nullptr, d_dout.p, d_inp.p, d_w.p, d_rstd.p, N, C);
    check_close("rmsnorm_backward dinp, dw = nullptr", d_dinp.to_host(), dinp);
    check_close("rmsnorm_backward dw untouched", d_dw.to_host(), dw);
}

TEST_CASE("rope forward (out of place and in place) and backward") {
    int N = 37, NH = 3, HS = 8;
    float theta = 10000.0f;
    long n = (long)N * NH * HS;
    std::vector<int> pos = randint(N, 0, 300);
    std::vector<float> inp = randn(n), out = randn(n);
    Dev<int> d_pos(pos);
    Dev<float> d_inp(inp), d_out(out);
    rope_forward(out.data(), inp.data(), pos.data(), N, NH, HS, theta);
    cuda::rope_forward(d_out.p, d_inp.p, d_pos.p, N, NH, HS, theta);
    check_close("rope_forward out", d_out.to_host(), out);
    rope_forward(inp.data(), inp.data(), pos.data(), N, NH, HS, theta);
    cuda::rope_forward(d_inp.p, d_inp.p, d_pos.p, N, NH, HS, theta);
    check_close("rope_forward in place", d_inp.to_host(), inp);

    std::vector<float> dout = randn(n), dinp = randn(n);
    Dev<float> d_dout(dout), d_dinp(dinp);
    rope_backward(dinp.data(), dout.data(), pos.data(), N, NH, HS, theta);
    cuda::rope_backward(d_dinp.p, d_dout.p, d_pos.p, N, NH, HS, theta);
    check_close("rope_backward dinp", d_dinp.to_host(), dinp);
}

// queries [q0, q0+Tq) over Tk keys, att rows of ld >= Tk
static void test_attention(const char* name, int Tq, int Tk, int ld, int q0, int causal, int B, int NH, int HS) {
    std::string label = std::string("attention ") + name;
    int C = NH * HS;
    std::vector<float> q = randn((long)Tq * B * C), k = randn((long)Tk * B * C), v = randn((long)Tk * B * C);
    std::vector<float> out = randn((long)Tq * B * C), att = randn((long)Tq * B * NH * ld);
    Dev<float> d_q(q), d_k(k), d_v(v), d_out(out), d_att(att);
    attention_forward(out.data(), att.data(), q.data(), k.data(), v.data(), Tq, Tk, ld, q0, causal, B, NH, HS);
    cuda::attention_forward(d_out.p, d_att.p, d_q.p, d_k.p, d_v.p, Tq, Tk, ld, q0, causal, B, NH, HS);
    check_close(label + " forward out", d_out.to_host(), out);
    check_close(label + " forward att", d_att.to_host(), att);

    std::vector<float> dout = randn((long)Tq * B * C), dq = randn((long)Tq * B * C), dk = randn((long)Tk * B * C),
                       dv = randn((long)Tk * B * C);
    Dev<float> d_dout(dout), d_dq(dq), d_dk(dk), d_dv(dv);
    Dev<float> d_att_cpu(att);  // the backward reads the CPU's att on both sides
    attention_backward(dq.data(), dk.data(), dv.data(), dout.data(), att.data(), q.data(), k.data(), v.data(), Tq, Tk,
                       ld, q0, causal, B, NH, HS);
    cuda::attention_backward(d_dq.p, d_dk.p, d_dv.p, d_dout.p, d_att_cpu.p, d_q.p, d_k.p, d_v.p, Tq, Tk, ld, q0,
                             causal, B, NH, HS);
    check_close(label + " backward dq", d_dq.to_host(), dq);
    check_close(label + " backward dk", d_dk.to_host(), dk);
    check_close(label + " backward dv", d_dv.to_host(), dv);
}
TEST_CASE("attention forward and backward: causal, causal over a cache (q0 > 0), non-causal") {
    test_attention("causal q0=0", 7, 7, 7, 0, 1, 2, 3, 8);
    test_attention("causal q0=4 ld>Tk", 5, 9, 11, 4, 1, 2, 3, 8);
    test_attention("non-causal ld>Tk", 6, 9, 10, 0, 0, 2, 3, 8);
    test_attention("non-causal HS=12", 5, 5, 5, 0, 0, 3, 2, 12);   // dot8's tail (12 = 8 + 4)
    test_attention("causal q0=3 HS=12", 4, 7, 7, 3, 1, 3, 2, 12);
}

TEST_CASE("swiglu and residual, forward and backward") {
    long N = 37 * 24;
    std::vector<float> h1 = randn(N, 2.0f), h3 = randn(N), out = randn(N);
    Dev<float> d_h1(h1), d_h3(h3), d_out(out);
    swiglu_forward(out.data(), h1.data(), h3.data(), N);
    cuda::swiglu_forward(d_out.p, d_h1.p, d_h3.p, N);
    check_close("swiglu_forward out", d_out.to_host(), out);
    std::vector<float> dout = randn(N), dh1 = randn(N), dh3 = randn(N);
    Dev<float> d_dout(dout), d_dh1(dh1), d_dh3(dh3);
    swiglu_backward(dh1.data(), dh3.data(), dout.data(), h1.data(), h3.data(), N);
    cuda::swiglu_backward(d_dh1.p, d_dh3.p, d_dout.p, d_h1.p, d_h3.p, N);
    check_close("swiglu_backward dh1", d_dh1.to_host(), dh1);
    check_close("swiglu_backward dh3", d_dh3.to_host(), dh3);

    residual_forward(out.data(), h1.data(), h3.data(), N);
    cuda::residual_forward(d_out.p, d_h1.p, d_h3.p, N);
    check_close("residual_forward out", d_out.to_host(), out);
    residual_backward(dh1.data(), dh3.data(), dout.data(), N);
    cuda::residual_backward(d_dh1.p, d_dh3.p, d_dout.p, N);
    check_close("residual_backward da", d_dh1.to_host(), dh1);
    check_close("residual_backward db", d_dh3.to_host(), dh3);
}

TEST_CASE("crossentropy forward and backward, per-row weights including 0") {
    int N = 37, V = 29;
    std::vector<float> logits = randn((long)N * V, 3.0f), probs = randn((long)N * V), loss = randn(N);
    std::vector<int> target = randint(N, 0, V - 1);
    std::vector<float> weight(N);
    for (int n = 0; n < N; n++) weight[n] = n % 4 == 0 ? 0.0f : 1.0f / 28;   // every 4th row masked
    Dev<float> d_logits(logits), d_probs(probs), d_loss(loss), d_weight(weight);
    Dev<int> d_target(target);
    crossentropy_forward(loss.data(), probs.data(), logits.data(), target.data(), weight.data(), N, V);
    cuda::crossentropy_forward(d_loss.p, d_probs.p, d_logits.p, d_target.p, d_weight.p, N, V);
    check_close("crossentropy_forward loss", d_loss.to_host(), loss);
    check_close("crossentropy_forward probs", d_probs.to_host(), probs);

    std::vector<float> dlogits = randn((long)N * V, 0.01f);
    Dev<float> d_dlogits(dlogits);
    crossentropy_backward(dlogits.data(), probs.data(), target.data(), weight.data(), 0.7f, N, V);
    cuda::crossentropy_backward(d_dlogits.p, d_probs.p, d_target.p, d_weight.p, 0.7f, N, V);
    check_close("crossentropy_backward dlogits", d_dlogits.to_host(), dlogits);
}

TEST_CASE("adamw_update, three steps") {
    long N = 1000;
    std::vector<float> p = randn(N), m = randn(N, 0.1f), v(N);
    for (float& x : v) x = 0.01f * rng.uniform();
    Dev<float> d_p(p), d_m(m), d_v(v);
    for (int t = 1; t <= 3; t++) {
        std::vector<float> g = randn(N);
        Dev<float> d_g(g);
        adamw_update(p.data(), m.data(), v.data(), g.data(), N, 1e-3f, 0.9f, 0.95f, 1e-8f, 0.1f, t);
        cuda::adamw_update(d_p.p, d_m.p, d_v.p, d_g.p, N, 1e-3f, 0.9f, 0.95f, 1e-8f, 0.1f, t);
    }
    check_close("adamw_update p", d_p.to_host(), p);
    check_close("adamw_update m", d_m.to_host(), m);
    check_close("adamw_update v", d_v.to_host(), v);
}

// =============================================================================================
// The Cache Processor's steps (bt.cpp)
// =============================================================================================
// att (T,B,NH,T) as the backbone leaves it; `levels` > 0 rounds it to that many values, so many
// positions tie and the tie rule (smaller position wins) is exercised
static void test_select(const char* name, int T, int B, int NH, int s, int e, int k, int periodic, int levels) {
    std::string label = std::string("select ") + name;
    std::vector<float> att((long)T * B * NH * T);
    for (float& a : att) a = levels > 0 ? (float)rng.randint(0, levels - 1) / levels : rng.uniform();
    std::vector<float> scores = randn((long)B * T);
    std::vector<int> sel(T * B, -1);
    Dev<float> d_att(att), d_scores(scores);
    Dev<int> d_sel(sel);
    int nS = select_forward(sel.data(), scores.data(), att.data(), s, e, B, NH, T, k, periodic);
    int d_nS = cuda::select_forward(d_sel.p, d_scores.p, d_att.p, s, e, B, NH, T, k, periodic);
    CHECK(d_nS == nS);
    check_equal(label + " sel", d_sel.to_host(), sel);
    check_close(label + " scores", d_scores.to_host(), scores);
}
TEST_CASE("select: top-k by attention mass (random, ties, k > s, s = 0, periodic)") {
    test_select("random k=3", 12, 3, 2, 8, 12, 3, 0, 0);
    test_select("ties k=4", 13, 4, 1, 9, 10, 4, 0, 2);     // one head, one query: scores 0 or 0.5
    test_select("all tie k=3", 12, 2, 2, 8, 12, 3, 0, 1);  // every score 0: positions 0, 1, 2
    test_select("k > s", 10, 2, 2, 3, 10, 5, 0, 0);
    test_select("s = 0", 8, 2, 2, 0, 5, 3, 0, 0);
    test_select("periodic", 12, 3, 2, 8, 12, 3, 1, 0);
}

// sel (nS,B): per sequence, nS distinct positions in [0,T), in random order
static std::vector<int> random_sel(int nS, int B, int T) {
    std::vector<int> sel((long)nS * B);
    for (int b = 0; b < B; b++) {
        std::vector<int> perm(T);
        for (int t = 0; t < T; t++) perm[t] = t;
        for (int t = T - 1; t > 0; t--) std::swap(perm[t], perm[rng.randint(0, t)]);
        for (int n = 0; n < nS; n++) sel[(long)n * B + b] = perm[n];
    }
    return sel;
}

TEST_CASE("gather forward and backward") {
    int T = 13, B = 3, C = 24, nS = 7;
    std::vector<int> sel = random_sel(nS, B, T);
    std::vector<float> K = randn((long)T * B * C), V = randn((long)T * B * C), u = randn((long)nS * B * 2 * C);
    Dev<int> d_sel(sel);
    Dev<float> d_K(K), d_V(V), d_u(u);
    gather_forward(u.data(), K.data(), V.data(), sel.data(), nS, B, C);
    cuda::gather_forward(d_u.p, d_K.p, d_V.p, d_sel.p, nS, B, C);
    check_close("gather_forward u", d_u.to_host(), u);

    std::vector<float> du = randn((long)nS * B * 2 * C), dK = randn((long)T * B * C), dV = randn((long)T * B * C);
    Dev<float> d_du(du), d_dK(dK), d_dV(dV);
    gather_backward(dK.data(), dV.data(), du.data(), sel.data(), nS, B, C);
    cuda::gather_backward(d_dK.p, d_dV.p, d_du.p, d_sel.p, nS, B, C);
    check_close("gather_backward dK", d_dK.to_host(), dK);
    check_close("gather_backward dV", d_dV.to_host(), dV);
}

TEST_CASE("write back forward and backward (with and without dgate)") {
    int T = 13, B = 3, C = 24, nS = 7;
    std::vector<int> sel = random_sel(nS, B, T);
    std::vector<float> K = randn((long)T * B * C), V = randn((long)T * B * C), delta = randn((long)nS * B * 2 * C);
    std::vector<float> gate = {0.3f};
    Dev<int> d_sel(sel);
    Dev<float> d_K(K), d_V(V), d_delta(delta), d_gate(gate);
    write_back_forward(K.data(), V.data(), delta.data(), gate.data(), sel.data(), nS, B, C);
    cuda::write_back_forward(d_K.p, d_V.p, d_delta.p, d_gate.p, d_sel.p, nS, B, C);
    check_close("write_back_forward K", d_K.to_host(), K);
    check_close("write_back_forward V", d_V.to_host(), V);

    std::vector<float> dK = randn((long)T * B * C), dV = randn((long)T * B * C);
    std::vector<float> ddelta = randn((long)nS * B * 2 * C), dgate = {0.25f};
    Dev<float> d_dK(dK), d_dV(dV), d_ddelta(ddelta), d_dgate(dgate);
    write_back_backward(ddelta.data(), dgate.data(), dK.data(), dV.data(), delta.data(), gate.data(), sel.data(), nS,
                        B, C);
    cuda::write_back_backward(d_ddelta.p, d_dgate.p, d_dK.p, d_dV.p, d_delta.p, d_gate.p, d_sel.p, nS, B, C);
    check_close("write_back_backward ddelta", d_ddelta.to_host(), ddelta);
    check_close("write_back_backward dgate", d_dgate.to_host(), dgate);
    std::vector<float> ddelta2 = randn((long)nS * B * 2 * C);
    Dev<float> d_ddelta2(ddelta2);
    write_back_backward(ddelta2.data(), nullptr, dK.data(), dV.data(), delta.data(), gate.data(), sel.data(), nS, B, C);
    cuda::write_back_backward(d_ddelta2.p, nullptr, d_dK.p, d_dV.p, d_delta.p, d_gate.p, d_sel.p, nS, B, C);
    check_close("write_back_backward ddelta, dgate = nullptr", d_ddelta2.to_host(), ddelta2);
}

// =============================================================================================
// The device path's plumbing (bt.cpp): the undo log's restore, clipping, zeroing and copies
// =============================================================================================
TEST_CASE("scatter_rows (the undo log's restore), zero and copies: bitwise equal") {
    int T = 13, B = 3, C = 24, nS = 7;
    std::vector<int> sel = random_sel(nS, B, T);
    std::vector<float> K = randn((long)T * B * C), V = randn((long)T * B * C), u = randn((long)nS * B * 2 * C);
    Dev<int> d_sel(sel);
    Dev<float> d_K(K), d_V(V), d_u(u);
    scatter_rows(K.data(), V.data(), u.data(), sel.data(), nS, B, C);
    cuda::scatter_rows(d_K.p, d_V.p, d_u.p, d_sel.p, nS, B, C);
    check_equal("scatter_rows K", d_K.to_host(), K);
    check_equal("scatter_rows V", d_V.to_host(), V);

    // a part of a buffer, at an offset, as bt.cpp zeroes and copies row ranges
    long n = 1000, off = 17, m = 900;
    std::vector<float> x = randn(n), y = randn(n);
    std::vector<int> i1 = randint(n, -50, 50), i2 = randint(n, -50, 50);
    Dev<float> d_x(x), d_y(y);
    Dev<int> d_i1(i1), d_i2(i2);
    zero(x.data() + off, m);
    cuda::zero(d_x.p + off, m);
    check_equal("zero (part of a buffer)", d_x.to_host(), x);
    copy_floats(y.data() + off, x.data() + 2, m);
    cuda::copy_floats(d_y.p + off, d_x.p + 2, m);
    check_equal("copy_floats", d_y.to_host(), y);
    copy_ints(i2.data() + off, i1.data() + 3, m);
    cuda::copy_ints(d_i2.p + off, d_i1.p + 3, m);
    check_equal("copy_ints", d_i2.to_host(), i2);
}

TEST_CASE("sum_squares and scale_inplace (gradient clipping)") {
    // fewer numbers than the kernel's parts, and a length that does not divide into them
    for (long n : {10L, 100003L}) {
        std::vector<float> x = randn(n, 3.0f);
        Dev<float> d_x(x);
        double want = sum_squares(0.5, x.data(), n), got = cuda::sum_squares(0.5, d_x.p, n);
        double rel = fabs(got - want) / want;
        std::string label = "sum_squares (n = " + std::to_string(n) + ", in double)";
        record(label, rel, 1e-12);
        MESSAGE(label << ": " << want << " vs " << got << ", relative difference " << rel);
        CHECK(rel <= 1e-12);   // the same numbers summed in another order, in double
    }
    long n = 1001;
    std::vector<float> x = randn(n);
    Dev<float> d_x(x);
    scale_inplace(x.data(), 0.37f, n);
    cuda::scale_inplace(d_x.p, 0.37f, n);
    check_close("scale_inplace", d_x.to_host(), x);
}

// =============================================================================================
// bt.cpp's device path (--device cuda) against its CPU path: the same model code (OP() sends each
// op to kernels.cu), the model and the run state in "device" memory. Pass: every tensor within
// 1e-4 of its max |value|; the processor's selections and the generated text equal.
// =============================================================================================
static const double TOL_MODEL = 1e-4;

// --device cuda while in scope: bt's switch, which models and run states built inside follow
struct OnDevice {
    OnDevice() { g_device = true; }
    ~OnDevice() { g_device = false; }
};

// n numbers of an ops' buffer (device memory when the device is on), on the host
static std::vector<float> fetch(const float* p, long n) {
    if (!g_device) return std::vector<float>(p, p + n);
    std::vector<float> h(n);
    to_host(h.data(), p, sizeof(float) * n);
    return h;
}
static std::vector<int> fetch_ints(const int* p, long n) {
    if (!g_device) return std::vector<int>(p, p + n);
    std::vector<int> h(n);
    to_host(h.data(), p, sizeof(int) * n);
    return h;
}

// A small model: 2 layers, width 32, 4 heads of 8 (wide enough for the CPU's tiled matmul);
// processor width 16, 2 heads, k 3. Every weight random, W_out too, so that the processor really
// rewrites; norm gains near 1, gates -1.
static void small_model(Model& M, bool proc, int periodic, uint64_t seed) {
    Config c;
    c.C = 32; c.L = 2; c.NH = 4; c.F = 64; c.T = 64;
    if (proc) { c.proc_width = 16; c.proc_layers = 1; c.proc_heads = 2; c.proc_ffn = 32; c.k = 3; c.periodic = periodic; }
    model_build(M, c);
    Rng r(seed);
    for (auto& p : M.table)
        for (long i = 0; i < p.numel; i++)
            M.params[p.offset + i] = p.kind == 1 ? 1.0f + 0.1f * r.normal() : p.kind == 3 ? -1.0f : 0.3f * r.normal();
}
// three chain examples with 4 operations: one layout, 6 segments, 5 boundaries
static std::vector<std::string> small_batch() {
    Rng r(5);
    return {gen_chain(r, 4), gen_chain(r, 4), gen_chain(r, 4)};
}

// one training step's numbers, on the host
struct StepOut {
    float loss = 0, norm = 0;
    std::vector<float> logits, grads;   // grads as the backward left them (before clipping)
    std::vector<float> params, m, v;    // after the AdamW update
    std::vector<int> sel;               // every firing's selections, in firing order (the undo log)
};

// one step of `mode` on the path that is on: zero the gradients, forward, backward, AdamW.
// AdamW at bt train's peak lr 3e-3 and no warmup: a first step moves every weight by about lr
// (m / sqrt(v) = +-1), 30x the tolerance on a weight of size 1, so a wrong update shows. (The
// update of one weight is not compared on its own: where |g| is near AdamW's eps, 1e-8, float noise
// in g moves it by percents, and such tiny entries do occur. The weights are compared, against
// their tensor's max |value|, like everything else.)
static StepOut train_step(const Model& M0, const TrainMode& mode) {
    StepOut out;
    Model M = M0;
    if (g_device) model_upload(M);
    std::vector<std::string> texts = small_batch();
    RunState S;
    run_state_build(S, M.cfg, (int)texts[0].size() + 1, (int)texts.size(), true);
    int T = load_batch(S, texts);
    zero_grads(M);
    out.loss = forward_sequence(M, S, T, mode);
    backward_sequence(M, S, T, mode);
    out.logits = fetch(S.logits, (long)T * S.B * M.cfg.V);
    out.grads = fetch(live(M.grads, M.dev_grads), M.n_params);
    out.sel = g_device ? fetch_ints(S.undo_sel, S.undo_sel_n) : std::vector<int>(S.undo_sel, S.undo_sel + S.undo_sel_n);
    OptConfig o;
    o.warmup = 1;
    out.norm = optimizer_step(M, o, 0, mode);
    model_download(M);
    out.params = M.params; out.m = M.m; out.v = M.v;
    return out;
}

// every parameter tensor of got against want (flat, the model's layout): within tol of the tensor's
// max |value|, or, where want is all zeros (a frozen tensor's gradient), all zeros as well. One
// message per call: the worst tensor.
static void check_tensors(const std::string& label, const Model& M, const std::vector<float>& got,
                          const std::vector<float>& want, double tol) {
    REQUIRE(got.size() == want.size());
    double worst = 0;
    std::string worst_name = "-";
    int n_zero = 0;
    for (auto& p : M.table) {
        double scale;
        double rel = rel_diff(got.data() + p.offset, want.data() + p.offset, p.numel, &scale);
        n_zero += scale == 0;
        CHECK_MESSAGE(rel <= tol, label << " " << p.name << ": relative difference " << rel << " > " << tol);
        if (rel > worst || worst_name == "-") { worst = rel; worst_name = p.name; }
    }
    record(label + " (every tensor)", worst, tol);
    MESSAGE(label << ": " << M.table.size() << " tensors (" << n_zero << " all zero on both paths), worst "
                  << worst_name << " max|diff|/max|want| " << worst);
}

static void check_step(const char* name, bool proc, int periodic, bool joint, bool bptt_step) {
    Model M0;
    small_model(M0, proc, periodic, 31);
    TrainMode mode;
    mode.use_proc = proc;
    mode.train_backbone = !proc || joint;
    mode.bptt_step = bptt_step;
    StepOut c = train_step(M0, mode), d;
    {
        OnDevice on;
        d = train_step(M0, mode);
    }
    std::string label = std::string("step ") + name + ":";
    if (proc) {
        CHECK(!c.sel.empty());
        check_equal(label + " selections", d.sel, c.sel);
    }
    check_close(label + " logits", d.logits, c.logits, TOL_MODEL);
    check_close(label + " loss", {d.loss}, {c.loss}, TOL_MODEL);
    check_close(label + " gradient norm", {d.norm}, {c.norm}, TOL_MODEL);
    check_tensors(label + " gradients", M0, d.grads, c.grads, TOL_MODEL);
    check_tensors(label + " weights after AdamW", M0, d.params, c.params, TOL_MODEL);
    check_tensors(label + " AdamW m", M0, d.m, c.m, TOL_MODEL);
    check_tensors(label + " AdamW v", M0, d.v, c.v, TOL_MODEL);
    // the step did move the weights, by far more than the tolerance
    double moved = 0;
    for (long i = 0; i < M0.n_params; i++) moved = std::max(moved, fabs((double)c.params[i] - M0.params[i]));
    MESSAGE(label << " the largest weight update " << moved);
    CHECK(moved > 10 * TOL_MODEL);
}

TEST_CASE("device path: one training step, processor joint, bptt full") {
    check_step("bt joint full", true, 0, true, false);
}
TEST_CASE("device path: one training step, processor on a frozen backbone, bptt step") {
    check_step("bt frozen step", true, 0, false, true);
}
TEST_CASE("device path: one training step, processor periodic:5 (whole cache), frozen, bptt full") {
    check_step("bt periodic:5 frozen full", true, 5, false, false);
}
TEST_CASE("device path: one training step, vanilla") { check_step("vanilla", false, 0, true, false); }

TEST_CASE("device path: bt train's loop (losses), its checkpoint is the device's weights, a device model copies") {
    TrainSpec run;
    run.task = "chain"; run.d_model = 32; run.layers = 2; run.heads = 4; run.batch = 4; run.steps = 3;
    run.model = "bt"; run.joint = true; run.save_every = 0;
    std::string scratch = "/tmp/bt_test_kernels_" + std::to_string(getpid());   // this process's own files
    std::string path_c = scratch + "_cpu.safetensors", path_d = scratch + "_cuda.safetensors";
    auto with_out = [&](const std::string& out) {
        TrainSpec t = run;
        t.out = out;
        return t;
    };
    TrainRun Rc;
    Rc.quiet = true;
    train_setup(Rc, with_out(path_c));
    train_steps(Rc, 3);
    {
        OnDevice on;
        TrainRun Rd;
        Rd.quiet = true;
        train_setup(Rd, with_out(path_d));
        REQUIRE(Rd.M.dev_params != nullptr);
        train_steps(Rd, 3);
        check_close("bt train: losses of 3 steps", Rd.losses, Rc.losses, TOL_MODEL);
        std::vector<float> on_device = fetch(Rd.M.dev_params, Rd.M.n_params);
        save_run(Rd);   // brings the weights back to the host, then writes them
        Model L;
        load_model(L, path_d);
        check_equal("bt train: the saved checkpoint = the device's weights", L.params, on_device);
        Model copy = Rd.M;
        REQUIRE(copy.dev_params != nullptr);
        CHECK(copy.dev_params != Rd.M.dev_params);
        check_equal("a device model's copy (params, grads, m, v)", fetch(copy.dev_params, 4 * copy.n_params),
                    fetch(Rd.M.dev_params, 4 * Rd.M.n_params));
    }
    for (auto& p : {path_c, path_d}) {
        remove(p.c_str());
        remove(state_path(p).c_str());
    }
}

// text with its newlines as \n, for a one-line message
static std::string escaped(const std::string& text) {
    std::string out;
    for (char ch : text) out += ch == '\n' ? std::string("\\n") : std::string(1, ch);
    return out;
}

TEST_CASE("device path: a latent model is refused with a clear message (it runs on the CPU only)") {
    OnDevice on;
    std::string msg;
    try {
        TrainRun R;
        R.quiet = true;
        TrainSpec t;
        t.model = "latent"; t.latent = 2; t.d_model = 16; t.layers = 1; t.heads = 2; t.steps = 1;
        train_setup(R, t);
    } catch (BtError& e) { msg = e.what(); CHECK(e.code == 2); }
    printf("  train: %s\n", msg.c_str());
    CHECK(msg.find("CPU only") != std::string::npos);
    Config c;
    c.C = 16; c.L = 1; c.NH = 2; c.F = 32; c.T = 32; c.latent = 2;
    Model M;
    model_build(M, c);
    msg.clear();
    try { model_upload(M); } catch (BtError& e) { msg = e.what(); CHECK(e.code == 2); }
    printf("  eval, generate, score (model_upload): %s\n", msg.c_str());
    CHECK(msg.find("--device cpu") != std::string::npos);
}

TEST_CASE("device path: greedy decoding (generate) gives the CPU's text and logits; so does scoring") {
    const char* prompts[] = {"1*4-0+3\n", "7+2*5-8\n", "3-8\n"};
    for (int proc = 0; proc <= 1; proc++) {
        Model M0;
        small_model(M0, proc, 0, 41);
        std::string kind = proc ? "bt" : "vanilla";
        for (const char* prompt : prompts) {
            std::string label = "generate " + kind + " '" + question_of(prompt) + "':";
            Decoder Dc;
            decoder_init(Dc, M0);
            std::string text_c = generate(Dc, prompt);
            std::vector<float> logits_c = fetch(Dc.S.logits, (long)Dc.S.n_tok * M0.cfg.V);
            OnDevice on;
            Model M = M0;
            model_upload(M);
            Decoder Dd;
            decoder_init(Dd, M);
            std::string text_d = generate(Dd, prompt);
            CHECK(text_d == text_c);
            CHECK(Dd.S.n_tok == Dc.S.n_tok);
            MESSAGE(label << " " << Dc.S.n_tok << " positions, CPU wrote '" << escaped(text_c) << "', device '"
                          << escaped(text_d) << "'");
            if (Dd.S.n_tok == Dc.S.n_tok)
                check_close(label + " logits", fetch(Dd.S.logits, (long)Dd.S.n_tok * M.cfg.V), logits_c, TOL_MODEL);
        }
        // scoring: forward_sequence over one example, without gradients (bt score's path)
        std::string text = small_batch()[0];
        int T = (int)text.size() + 1;
        TrainMode mode;
        mode.use_proc = proc;
        RunState Sc;
        run_state_build(Sc, M0.cfg, T, 1, false);
        load_batch(Sc, {text});
        forward_sequence(M0, Sc, T, mode);
        OnDevice on;
        Model M = M0;
        model_upload(M);
        RunState Sd;
        run_state_build(Sd, M.cfg, T, 1, false);
        load_batch(Sd, {text});
        forward_sequence(M, Sd, T, mode);
        check_close("score " + kind + ": logits", fetch(Sd.logits, (long)T * M.cfg.V),
                    std::vector<float>(Sc.logits, Sc.logits + (long)T * M0.cfg.V), TOL_MODEL);
    }
}

// =============================================================================================
// The order of a launch's CUDA threads (tests/cuda_on_cpu.hpp's NATURAL, REVERSE, SHUFFLED; a GPU
// has its own order, so the nvcc build skips this). Pass: the same bytes in every order, else two
// CUDA threads of some kernel write one number (a race).
// =============================================================================================
#ifndef __CUDACC__
// launches in `order` while in scope, shuffled from `seed`; then the natural order again
struct InOrder {
    InOrder(CudaOnCpuOrder order, uint64_t seed) { cuda_on_cpu_order = order; cuda_on_cpu_seed = seed; }
    ~InOrder() { cuda_on_cpu_order = NATURAL; }
};

TEST_CASE("device path: a training step gives the same bytes in natural, reverse and shuffled thread order") {
    struct Kind { const char* name; int periodic; bool joint, bptt_step; };
    Kind kinds[] = {{"bt joint full", 0, true, false}, {"bt frozen step", 0, false, true},
                    {"bt periodic:5 frozen full", 5, false, false}};
    struct Order { const char* name; CudaOnCpuOrder order; };
    Order orders[] = {{"reverse", REVERSE}, {"shuffled", SHUFFLED}};
    for (const Kind& k : kinds) {
        Model M0;
        small_model(M0, true, k.periodic, 31);
        TrainMode mode;
        mode.use_proc = true;
        mode.train_backbone = k.joint;
        mode.bptt_step = k.bptt_step;
        OnDevice on;
        StepOut natural = train_step(M0, mode);
        for (const Order& o : orders) {
            StepOut d;
            {
                InOrder in_order(o.order, 19);
                d = train_step(M0, mode);
            }
            std::string label = std::string("order ") + k.name + ", " + o.name + " = natural:";
            check_equal(label + " selections", d.sel, natural.sel);
            check_equal(label + " logits", d.logits, natural.logits);
            check_equal(label + " loss, gradient norm", std::vector<float>{d.loss, d.norm},
                        std::vector<float>{natural.loss, natural.norm});
            check_equal(label + " gradients", d.grads, natural.grads);
            check_equal(label + " weights after AdamW", d.params, natural.params);
            check_equal(label + " AdamW m", d.m, natural.m);
            check_equal(label + " AdamW v", d.v, natural.v);
        }
    }
}
#endif

// ---------------------------------------------------------------------------------------------
int main(int argc, char** argv) {
#ifdef __CUDACC__
    int ndev = 0;
    if (cudaGetDeviceCount(&ndev) != cudaSuccess || ndev == 0) {
        printf("test_kernels: no CUDA GPU found, skipping the GPU kernel tests\n");
        return 0;
    }
    cudaDeviceProp prop;
    cudaCheck(cudaGetDeviceProperties(&prop, 0));
    printf("test_kernels: kernels.cu on %s\n", prop.name);
#else
    printf("test_kernels: kernels.cu on the CPU through tests/cuda_on_cpu.hpp\n");
#endif
    doctest::Context ctx(argc, argv);
    int rc = ctx.run();
    printf("\nworst max|diff| / max|want| per tensor, and its tolerance (tolerance 0: differing entries)\n");
    for (auto& w : g_worst) printf("  %-60s %.2e  (%.0e)\n", w.label.c_str(), w.rel, w.tol);
    return rc;
}
