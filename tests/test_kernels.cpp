// tests/test_kernels.cpp -- every kernel in kernels.cu, forward and backward, against its CPU op
// (tensor.hpp, and bt.cpp for the processor's select, gather and write back) on random inputs.
// Pass: each tensor within 1e-5 of its max |value| (selections: equal).
//
// One source, two builds:
//   g++ -x c++ (make test):           kernels.cu through tests/cuda_on_cpu.hpp, on the CPU
//   nvcc -x cu (make USE_CUDA=1 test): the real kernels on a GPU; with no GPU it says so, exits 0
// The test code is the same for both: inputs go to the "device" in a Dev buffer and come back
// with to_host(); only where a Dev lives differs.
#define DOCTEST_CONFIG_IMPLEMENT
#include <doctest/doctest.h>

#define BT_TESTING
#pragma GCC diagnostic ignored "-Wunused-function"   // bt's CLI commands, which only main() calls
#include "../bt.cpp"
#include "../kernels.cu"

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

// the worst relative difference seen per label, printed as a table at the end
static std::vector<std::pair<std::string, double>> g_worst;
static void record(const std::string& label, double rel) {
    for (auto& w : g_worst)
        if (w.first == label) { w.second = std::max(w.second, rel); return; }
    g_worst.push_back({label, rel});
}

// max |got - want| / max |want| must be <= 1e-5. Matching infinities (select's chosen scores)
// count as equal; a NaN anywhere fails. want must not be all zeros (a test that compares nothing).
static const double TOL = 1e-5;
static void check_close(const std::string& label, const std::vector<float>& got, const std::vector<float>& want) {
    REQUIRE(got.size() == want.size());
    double scale = 0, diff = 0;
    for (size_t i = 0; i < want.size(); i++) {
        if (std::isinf(want[i]) && got[i] == want[i]) continue;
        double d = fabs((double)got[i] - want[i]);
        diff = std::isnan(d) ? INFINITY : std::max(diff, d);
        scale = std::max(scale, fabs((double)want[i]));
    }
    double rel = scale > 0 ? diff / scale : diff;
    record(label, rel);
    MESSAGE(label << ": n=" << want.size() << " max|want| " << scale << " max|diff|/max|want| " << rel);
    CHECK_MESSAGE(scale > 0, label << ": the reference is all zeros");
    CHECK_MESSAGE(rel <= TOL, label << ": relative difference " << rel << " > " << TOL);
}
static void check_equal(const std::string& label, const std::vector<int>& got, const std::vector<int>& want) {
    long bad = 0;
    for (size_t i = 0; i < want.size(); i++) bad += got[i] != want[i];
    record(label, (double)bad);
    MESSAGE(label << ": n=" << want.size() << " differing entries " << bad);
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
    matmul_forward(out.data(), inp.data(), W.data(), N, IC, OC);
    cuda::matmul_forward(d_out.p, d_inp.p, d_W.p, N, IC, OC);
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
    printf("\nworst max|diff| / max|want| per tensor (tolerance %.0e; for sel: differing entries)\n", TOL);
    for (auto& w : g_worst) printf("  %-52s %.2e\n", w.first.c_str(), w.second);
    return rc;
}
