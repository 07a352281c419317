// tests/test_bt.cpp -- bt checked against the PyTorch reference, finite differences and
// independent computations. Build and run: make test.
// The reference files come from tests/reference.py (make reference); BT_REF_DIR overrides where
// they are read from (CI regenerates them into a temporary folder).
#define DOCTEST_CONFIG_IMPLEMENT_WITH_MAIN
#include <doctest/doctest.h>

#define BT_TESTING
#pragma GCC diagnostic ignored "-Wunused-function"   // the CLI commands, which only main() calls
#include "../lab/lab.cpp"   // bt.cpp and the lab
#include "fuzz.cpp"
#include "pictures.cpp"

#include <atomic>
#include <csignal>
#include <filesystem>
#include <functional>
#include <new>
#include <unistd.h>

// Every operator new in this test binary is counted, so a test can check that a training or a
// decoding step allocates nothing once its buffers are built.
static std::atomic<long> g_allocations{0};
void* operator new(size_t n) {
    g_allocations++;
    if (void* p = malloc(n ? n : 1)) return p;
    throw std::bad_alloc();
}
void* operator new(size_t n, const std::nothrow_t&) noexcept {   // std::stable_sort's buffer comes from here
    g_allocations++;
    return malloc(n ? n : 1);
}
#pragma GCC diagnostic ignored "-Wmismatched-new-delete"   // these deletes pair with the news above
void operator delete(void* p) noexcept { free(p); }
void operator delete(void* p, size_t) noexcept { free(p); }
void operator delete(void* p, const std::nothrow_t&) noexcept { free(p); }

// ---------------------------------------------------------------------------------------------
// check_tensor: prints the first pairs, max abs / rel diff, the worst index and how much of the
// tolerance was used; returns whether every |got - want| <= atol + rtol * |want|.
static bool check_tensor(const std::string& label, const float* got, const float* want, long n, float atol,
                         float rtol = 0.0f) {
    double max_abs = 0, max_rel = 0, used = 0;
    long worst = 0;
    for (long i = 0; i < n; i++) {
        double d = fabs((double)got[i] - want[i]);
        double tol = atol + rtol * fabs((double)want[i]);
        if (d / tol > used || std::isnan(d)) { used = std::isnan(d) ? INFINITY : d / tol; worst = i; }
        max_abs = std::max(max_abs, d);
        if (fabs(want[i]) > 1e-12) max_rel = std::max(max_rel, d / fabs(want[i]));
    }
    bool ok = used <= 1.0;
    printf("  %-44s n=%-7ld max|diff| %.2e  max rel %.2e  worst [%ld] %+.6f vs %+.6f  %5.1f%% of tol %s\n",
           label.c_str(), n, max_abs, max_rel, worst, n ? got[worst] : 0.0f, n ? want[worst] : 0.0f, 100 * used,
           ok ? "ok" : "FAIL");
    return ok;
}

static float max_abs(const float* x, long n) {
    float m = 0;
    for (long i = 0; i < n; i++) m = std::max(m, fabsf(x[i]));
    return m;
}

// A scratch file or folder of this test process: two test runs on one machine do not collide.
static std::string tmp_path(const char* name) { return "/tmp/bt_test_" + std::to_string(getpid()) + "_" + name; }

static std::string ref_path(const char* file) {
    const char* dir = getenv("BT_REF_DIR");
    return std::string(dir ? dir : "weights") + "/" + file;
}

// a model whose weights (and config) come from a reference file
static SafeFile load_reference(Model& M, const std::string& path) {
    SafeFile f = read_safetensors(path);
    model_build(M, config_from_meta(f.meta, path));
    copy_tensors(M, f, path, false);
    return f;
}

// tokens [B,T] from the reference into a run state (time-major); returns T
static int load_ref_tokens(RunState& S, const Model& M, const SafeFile& f, bool train) {
    const Tensor& tk = f.tensors.at("tokens");
    int B = tk.shape[0], T = tk.shape[1];
    run_state_build(S, M.cfg, T, B, train);
    for (int b = 0; b < B; b++)
        for (int t = 0; t < T; t++) S.tokens[(long)t * B + b] = (int)tk.data[(long)b * T + t];
    return T;
}

// (T,B,X) time-major rows [0,T) -> [B,T,X]
static std::vector<float> batch_major(const float* x, int T, int B, int X) {
    std::vector<float> out((long)T * B * X);
    for (int t = 0; t < T; t++)
        for (int b = 0; b < B; b++)
            for (int i = 0; i < X; i++) out[((long)b * T + t) * X + i] = x[((long)t * B + b) * X + i];
    return out;
}

// every gradient named prefix + "grad." + name in f, within 1e-4 of that tensor's max |value|;
// tensors of M absent from f must have a zero gradient (a frozen part)
static bool check_grads(const Model& M, const SafeFile& f, const std::string& prefix) {
    bool ok = true;
    for (auto& p : M.table) {
        const float* g = M.grads.data() + p.offset;
        auto it = f.tensors.find(prefix + "grad." + p.name);
        if (it == f.tensors.end()) {
            ok &= check_tensor("(frozen) " + p.name, g, std::vector<float>(p.numel, 0.0f).data(), p.numel, 0.0f);
            continue;
        }
        float scale = max_abs(it->second.data.data(), p.numel);
        ok &= check_tensor(prefix + "grad." + p.name, g, it->second.data.data(), p.numel, 1e-4f * scale);
    }
    return ok;
}

// =============================================================================================
// The backbone against PyTorch
// =============================================================================================
TEST_CASE("backbone matches the PyTorch reference: logits, loss, every gradient, 10 AdamW steps") {
    Model M;
    SafeFile f = load_reference(M, ref_path("ref_backbone.safetensors"));
    RunState S;
    int T = load_ref_tokens(S, M, f, true);
    int B = S.B;
    TrainMode mode;
    float loss = forward_sequence(M, S, T, mode);
    std::vector<float> logits = batch_major(S.logits, T, B, M.cfg.V);
    CHECK(check_tensor("logits", logits.data(), f.tensors.at("logits").data.data(), logits.size(), 1e-4f));
    CHECK(check_tensor("loss", &loss, f.tensors.at("loss").data.data(), 1, 1e-5f));
    backward_sequence(M, S, T, mode);
    CHECK(check_grads(M, f, ""));

    // 10 AdamW steps on the same batch, with the reference's schedule
    OptConfig o;
    o.lr = std::stof(f.meta.at("lr")); o.wd = std::stof(f.meta.at("weight_decay"));
    o.warmup = std::stoi(f.meta.at("warmup")); o.steps = std::stoi(f.meta.at("steps"));
    o.clip = std::stof(f.meta.at("clip"));
    std::vector<float> losses;
    for (int t = 0; t < o.steps; t++) {
        std::fill(M.grads.begin(), M.grads.end(), 0.0f);
        losses.push_back(forward_sequence(M, S, T, mode));
        backward_sequence(M, S, T, mode);
        optimizer_step(M, o, t, mode);
    }
    CHECK(check_tensor("adamw_losses", losses.data(), f.tensors.at("adamw_losses").data.data(), losses.size(), 1e-4f));
}

// =============================================================================================
// The Cache Processor against PyTorch
// =============================================================================================
struct BoundaryCheck { const SafeFile* f; std::string prefix; const Model* M; bool ok = true; int fired = 0; };

static void check_boundary(const RunState& S, int j, void* ctx) {
    BoundaryCheck& bc = *(BoundaryCheck*)ctx;
    const Config& c = bc.M->cfg;
    int B = S.B;
    bc.fired++;
    for (int l = 0; l < c.L; l++) {
        const UndoRecord& rec = S.undo[(long)j * c.L + l];
        // the top-k part of the rewritten set (positions before the segment)
        auto it = bc.f->tensors.find(strf("%ssel.%d.%d", bc.prefix.c_str(), j, l));
        if (it != bc.f->tensors.end()) {
            int kk = it->second.shape[1];
            std::vector<float> got((long)B * kk);
            for (int b = 0; b < B; b++)
                for (int r = 0; r < kk; r++) got[(long)b * kk + r] = (float)undo_sel_of(S, rec)[(long)r * B + b];
            bc.ok &= check_tensor(strf("%ssel.%d.%d", bc.prefix.c_str(), j, l), got.data(), it->second.data.data(),
                                  got.size(), 0.0f);
        }
        for (int kv = 0; kv < 2; kv++) {
            std::string name = strf("%scache_%s.%d.%d", bc.prefix.c_str(), kv ? "v" : "k", j, l);
            const Tensor& want = bc.f->tensors.at(name);
            int e = want.shape[1];
            std::vector<float> got = batch_major(kv ? S.acts[l].v : S.acts[l].k, e, B, c.C);
            bc.ok &= check_tensor(name, got.data(), want.data.data(), got.size(), 1e-4f);
        }
    }
}

static void processor_case(const std::string& prefix, int periodic, const std::vector<std::pair<std::string, TrainMode>>& grads) {
    Model M;
    SafeFile f = load_reference(M, ref_path("ref_processor.safetensors"));
    M.cfg.periodic = periodic;
    RunState S;
    int T = load_ref_tokens(S, M, f, true);
    TrainMode mode;
    mode.use_proc = true;
    BoundaryCheck bc{&f, prefix + ".", &M};
    float loss = forward_sequence(M, S, T, mode, check_boundary, &bc);
    CHECK(bc.ok);
    CHECK(bc.fired == (periodic ? 3 : 4));
    std::vector<float> logits = batch_major(S.logits, T, S.B, M.cfg.V);
    CHECK(check_tensor(prefix + ".logits", logits.data(), f.tensors.at(prefix + ".logits").data.data(), logits.size(), 1e-4f));
    CHECK(check_tensor(prefix + ".loss", &loss, f.tensors.at(prefix + ".loss").data.data(), 1, 1e-5f));
    for (auto& g : grads) {
        std::fill(M.grads.begin(), M.grads.end(), 0.0f);
        forward_sequence(M, S, T, g.second);
        backward_sequence(M, S, T, g.second);
        CHECK(check_grads(M, f, g.first + "."));
    }
}

TEST_CASE("processor (newline schedule) matches PyTorch: selections, caches, logits, gradients frozen/joint x full/step") {
    TrainMode full, step, joint, joint_step;
    full.use_proc = step.use_proc = joint.use_proc = joint_step.use_proc = true;
    full.train_backbone = step.train_backbone = false;
    step.bptt_step = joint_step.bptt_step = true;
    processor_case("newline", 0, {{"newline_full", full}, {"newline_step", step}, {"newline_joint", joint},
                                  {"newline_joint_step", joint_step}});
}

TEST_CASE("processor (periodic:8, whole cache) matches PyTorch") {
    TrainMode full;
    full.use_proc = true;
    full.train_backbone = false;
    processor_case("periodic", 8, {{"periodic_full", full}});
}

TEST_CASE("plain backbone on the processor reference's weights matches PyTorch") {
    Model M;
    SafeFile f = load_reference(M, ref_path("ref_processor.safetensors"));
    RunState S;
    int T = load_ref_tokens(S, M, f, true);
    TrainMode mode;
    forward_sequence(M, S, T, mode);
    std::vector<float> logits = batch_major(S.logits, T, S.B, M.cfg.V);
    CHECK(check_tensor("plain.logits", logits.data(), f.tensors.at("plain.logits").data.data(), logits.size(), 1e-4f));
}

// =============================================================================================
// Finite-difference checks of every op in tensor.hpp
//   loss = sum_i r_i out_i for a fixed random r; the op's backward with dout = r must match
//   (loss(x + eps) - loss(x - eps)) / 2 eps for every input entry. float32 forward passes make
//   the numerical side noisy at ~1e-4 of the gradient scale; the tolerance is 1e-2 of it.
// =============================================================================================
static std::vector<float> randv(Rng& r, long n, float scale = 1.0f) {
    std::vector<float> v(n);
    for (auto& x : v) x = scale * r.normal();
    return v;
}
static double dotd(const std::vector<float>& a, const float* b) {
    double s = 0;
    for (size_t i = 0; i < a.size(); i++) s += (double)a[i] * b[i];
    return s;
}

struct FdInput { std::string name; float* x; long n; const float* grad; };

static bool fd_check(const std::string& op, const std::function<double()>& loss, const std::vector<FdInput>& ins,
                     float eps = 1e-3f, float tol = 1e-2f) {
    bool ok = true;
    for (auto& in : ins) {
        // a loss that returns NaN marks a point where the function is not smooth (the processor's
        // top-k selection flipped): that entry is skipped, and counted
        std::vector<float> num, ana;
        long skipped = 0;
        for (long i = 0; i < in.n; i++) {
            float save = in.x[i];
            in.x[i] = save + eps; double lp = loss();
            in.x[i] = save - eps; double lm = loss();
            in.x[i] = save;
            if (std::isnan(lp) || std::isnan(lm)) { skipped++; continue; }
            num.push_back((float)((lp - lm) / (2.0 * eps)));
            ana.push_back(in.grad[i]);
        }
        float scale = std::max(max_abs(num.data(), num.size()), 1e-6f);
        std::string label = "fd " + op + " d" + in.name + (skipped ? strf(" (%ld skipped)", skipped) : "");
        ok &= check_tensor(label, ana.data(), num.data(), num.size(), tol * scale);
        ok &= skipped * 4 <= in.n;   // most entries must be checkable
    }
    return ok;
}

// every output of every path is the same fma chain over k from zero, so "equal" means every bit:
// at this build's vector width (tensor.hpp's VW) and tile height (MM_TR: 12 rows on AVX-512, 6
// otherwise, so the row counts leave every remainder of both), for ragged edges, one row
// (decoding), with a caller-made W^T, through packed strips (a Bm of PACK_MIN_FLOATS and up, 64
// rows and up: the last five shapes, ragged in every direction, in the forward and both backward
// products; K = 520 and, in dW, K = 1100 run in k blocks whose partial sums wait in a scratch),
// and at any thread count (PAR_MIN splits the large shapes across threads)
TEST_CASE("the fast matmul (tiles, ragged edges, one row, a given W^T, packed) equals the naive loop bit for bit") {
    Rng r(12);
    const int shapes[][3] = {{1, 128, 384}, {1, 128, 48}, {3, 24, 40}, {5, 7, 3}, {37, 24, 40}, {64, 128, 48},
                             {7, 33, 17}, {2, 40, 200}, {4, 16, 112}, {9, 128, 300}, {11, 24, 40}, {18, 40, 30},
                             {256, 192, 384}, {100, 230, 300}, {70, 520, 130}, {1100, 70, 96}, {135, 600, 120}};
    int packed = 0;   // products that take the packed path
    for (auto& sh : shapes) {
        int N = sh[0], IC = sh[1], OC = sh[2];
        auto x = randv(r, (long)N * IC), W = randv(r, (long)OC * IC), d = randv(r, (long)N * OC);
        std::vector<float> WT((long)IC * OC);
        for (int o = 0; o < OC; o++)
            for (int k = 0; k < IC; k++) WT[(long)k * OC + o] = W[(long)o * IC + k];
        std::vector<float> fast((long)N * OC), given((long)N * OC), naive((long)N * OC);
        matmul_forward(fast.data(), x.data(), W.data(), nullptr, N, IC, OC);
        matmul_forward(given.data(), x.data(), W.data(), WT.data(), N, IC, OC);
        matmul_forward_naive(naive.data(), x.data(), W.data(), N, IC, OC);
        CHECK(check_tensor(strf("matmul forward %dx%d->%d", N, IC, OC), fast.data(), naive.data(), fast.size(), 0.0f));
        CHECK(check_tensor("  forward with a given W^T", given.data(), naive.data(), given.size(), 0.0f));
        // the backward adds to what is there: start from the same nonzero gradients
        auto dx1 = randv(r, (long)N * IC), dx2 = dx1, dW1 = randv(r, (long)OC * IC), dW2 = dW1;
        matmul_backward(dx1.data(), dW1.data(), d.data(), x.data(), W.data(), N, IC, OC);
        matmul_backward_naive(dx2.data(), dW2.data(), d.data(), x.data(), W.data(), N, IC, OC);
        CHECK(check_tensor("  backward dinp", dx1.data(), dx2.data(), dx1.size(), 0.0f));
        CHECK(check_tensor("  backward dW", dW1.data(), dW2.data(), dW1.size(), 0.0f));
        packed += gemm_packs(N, IC, OC) + gemm_packs(N, OC, IC) + gemm_packs(OC, N, IC);
    }
    CHECK(packed >= 10);
}

// attention's scores: dots8 (8 rows at once, their partial sums added by hadd) against dot8's
// definition in plain scalars: 8 interleaved fma chains, added pairwise, then the tail's fmas. For
// head sizes with and without a tail and row counts around multiples of 8 (a short last group).
TEST_CASE("dots8 equals dot8's order of sums, bit for bit") {
    Rng r(9);
    long bad = 0, n_dots = 0;
    for (int n : {32, 8, 12, 5, 64, 3})
        for (int count : {1, 7, 8, 9, 16, 23, 46}) {
            long ld = 2L * n + 3;
            auto x = randv(r, n), y = randv(r, count * ld);
            std::vector<float> got(count, NAN);
            dots8(got.data(), x.data(), y.data(), ld, n, count);
            for (int j = 0; j < count; j++, n_dots++) {
                const float* yj = y.data() + j * ld;
                float p[8] = {};
                int i = 0;
                for (; i + 8 <= n; i += 8)
                    for (int u = 0; u < 8; u++) p[u] = fmaf(x[i + u], yj[i + u], p[u]);
                float want = ((p[0] + p[1]) + (p[2] + p[3])) + ((p[4] + p[5]) + (p[6] + p[7]));
                for (; i < n; i++) want = fmaf(x[i], yj[i], want);
                float one = dot8(x.data(), yj, n);
                bad += memcmp(&want, &got[j], 4) != 0 || memcmp(&want, &one, 4) != 0;
            }
        }
    CHECK_MESSAGE(bad == 0, bad, " of ", n_dots, " dots differ from dot8's order");
}

// expf_fixed (tensor.hpp) is bt's own exp, the same on every machine: within 1 ulp of libm's expf
// over the range softmax and SwiGLU use, and 0 below -87
TEST_CASE("expf_fixed is within 1 ulp of expf on [-87, 88], 0 below") {
    double worst = 0;
    long n = 0;
    for (float x = -87.0f; x <= 88.0f; x += 0.0037f, n++) {
        double want = expf(x), got = expf_fixed(x);
        worst = std::max(worst, fabs(got - want) / (want * FLT_EPSILON));
    }
    printf("  expf_fixed: %ld points, worst %.3f ulp\n", n, worst);
    CHECK(worst <= 1.0);
    CHECK(expf_fixed(-87.5f) == 0.0f);
    CHECK(expf_fixed(-1000.0f) == 0.0f);
    CHECK(expf_fixed(0.0f) == 1.0f);
    CHECK(std::isnan(expf_fixed(NAN)));
    CHECK(expf_fixed(-INFINITY) == 0.0f);
}

// vexp, the softmax exps and SwiGLU run VW lanes at a time (tensor.hpp); each lane must be the
// scalar expf_fixed / the naive loop bit for bit, specials included (NaN, +-inf, +-0, the clamps)
TEST_CASE("vector exp, softmax exps and SwiGLU equal their scalar loops bit for bit") {
    std::vector<float> x;
    for (float v = -100.0f; v <= 100.0f; v += 0.0137f) x.push_back(v);
    for (float v : {NAN, -NAN, INFINITY, -INFINITY, 0.0f, -0.0f, -87.0f, -87.00001f, 88.0f, 88.00001f, 1e-30f,
                    -1e-30f, 3.4e38f, -3.4e38f, 0.34657359f, -0.34657359f})
        x.push_back(v);
    while (x.size() % VW != 3) x.push_back(0.5f);   // and a ragged tail
    long N = (long)x.size();
    auto same = [](float a, float b) { return memcmp(&a, &b, 4) == 0 || (std::isnan(a) && std::isnan(b)); };
    std::vector<float> e(N);
    exp_shifted(e.data(), x.data(), (int)N, 0.0f);
    long bad = 0;
    for (long i = 0; i < N; i++) bad += !same(e[i], expf_fixed(x[i]));
    exp_shifted(e.data(), x.data(), (int)N, 1.5f);
    for (long i = 0; i < N; i++) bad += !same(e[i], expf_fixed(x[i] - 1.5f));
    CHECK_MESSAGE(bad == 0, bad, " of ", 2 * N, " exps differ from expf_fixed");
    Rng r(5);
    auto h3 = randv(r, N), g = randv(r, N), dh1 = randv(r, N), dh3 = randv(r, N);
    auto dh1n = dh1, dh3n = dh3;
    std::vector<float> out(N), outn(N);
    swiglu_forward(out.data(), x.data(), h3.data(), N);
    swiglu_forward_naive(outn.data(), x.data(), h3.data(), 0, N);
    swiglu_backward(dh1.data(), dh3.data(), g.data(), x.data(), h3.data(), N);
    swiglu_backward_naive(dh1n.data(), dh3n.data(), g.data(), x.data(), h3.data(), 0, N);
    long bad_fwd = 0, bad_bwd = 0;
    for (long i = 0; i < N; i++) {
        bad_fwd += !same(out[i], outn[i]);
        bad_bwd += !same(dh1[i], dh1n[i]) + !same(dh3[i], dh3n[i]);
    }
    CHECK_MESSAGE(bad_fwd == 0, bad_fwd, " SwiGLU outputs differ");
    CHECK_MESSAGE(bad_bwd == 0, bad_bwd, " SwiGLU gradients differ");
}

// adamw_update runs VW parameters at a time (and over threads): every weight and moment must have
// the bits of adamw_update_naive's one-at-a-time loop, over steps, with and without weight decay,
// and for an N with a tail shorter than a vector
TEST_CASE("AdamW: the vector update has the plain loop's bits") {
    Rng r(6);
    for (float wd : {0.0f, 0.1f}) {
        long N = 3 * 65536 + 7;   // enough to split over two threads
        auto p = randv(r, N), m = randv(r, N), v = randv(r, N), g = randv(r, N);
        for (float& x : v) x = fabsf(x);   // a second moment
        auto pn = p, mn = m, vn = v;
        long bad = 0;
        for (int t = 1; t <= 3; t++) {
            float lr = 3e-3f, b1 = 0.9f, b2 = 0.95f, eps = 1e-8f;
            adamw_update(p.data(), m.data(), v.data(), g.data(), N, lr, b1, b2, eps, wd, t);
            float bc1 = 1.0f - powf(b1, (float)t), bc2 = 1.0f - powf(b2, (float)t);
            adamw_update_naive(pn.data(), mn.data(), vn.data(), g.data(), 0, N, lr, b1, b2, eps, wd, bc1, bc2);
        }
        for (long i = 0; i < N; i++)
            bad += memcmp(&p[i], &pn[i], 4) != 0 || memcmp(&m[i], &mn[i], 4) != 0 || memcmp(&v[i], &vn[i], 4) != 0;
        CHECK_MESSAGE(bad == 0, bad, " AdamW values differ from the plain loop's (wd ", wd, ")");
    }
}

// the gradient norm's sum of squares: 8 running sums in a vector of doubles (bt.cpp, sum_squares)
// against its definition in plain scalars, bit for bit, for lengths around multiples of 8 and a
// nonzero start; and against a long double sum, within the rounding bound of n adds
TEST_CASE("sum_squares equals 8 plain running sums in double, bit for bit") {
    Rng r(12);
    long bad = 0;
    for (long n : {0L, 1L, 7L, 8L, 9L, 63L, 1000L, 65537L}) {
        auto x = randv(r, n);
        double got = sum_squares(0.25, x.data(), n);
        double s[8] = {}, want = 0.25;
        long i = 0;
        for (; i + 8 <= n; i += 8)
            for (int u = 0; u < 8; u++) s[u] += (double)x[i + u] * (double)x[i + u];
        want += ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7]));
        for (; i < n; i++) want += (double)x[i] * (double)x[i];
        bad += memcmp(&got, &want, sizeof got) != 0;
        long double exact = 0.25L;
        for (long j = 0; j < n; j++) exact += (long double)x[j] * x[j];
        // positive terms: each of the n adds rounds by at most half an ulp of a partial sum <= exact
        CHECK(std::fabs((double)(exact - got)) <= (double)(n + 1) * DBL_EPSILON * (double)exact);
    }
    CHECK_MESSAGE(bad == 0, bad, " sums of squares differ from 8 plain running sums");
}

// attention's weighted sums run up to WS_MAX chains side by side (tensor.hpp, weighted_sums); each
// must be its own fma chain in order, as if alone: against a plain fmaf loop, for ragged lengths
// (a common run, then each chain's own steps), head sizes of 8 (a half vector on AVX-512), 16, 32, 13,
// and every group size (each is its own unrolled copy)
TEST_CASE("weighted sums side by side equal one plain fma chain each, bit for bit") {
    Rng r(8);
    long bad = 0;
    for (int HS : {8, 16, 32, 13})
        for (int R = 1; R <= WS_MAX; R++)
            for (int add : {0, 1}) {
                long ld = 3L * HS + 1;
                int T = 21;
                auto rows = randv(r, T * ld), w = randv(r, (long)R * T), got = randv(r, (long)R * HS);
                auto want = got;
                WeightedSum c[WS_MAX];
                for (int k = 0; k < R; k++)   // chain k: its own weights, rows from row k, T - 2k - 1 steps
                    c[k] = {got.data() + k * HS, w.data() + k * T, rows.data() + k * ld, T - 2 * k - 1};
                weighted_sums(c, R, ld, HS, add);
                for (int k = 0; k < R; k++)
                    for (int d = 0; d < HS; d++) {
                        float acc = add ? want[k * HS + d] : 0.0f;
                        for (int t = 0; t < c[k].n; t++) acc = fmaf(w[k * T + t], rows[(k + t) * ld + d], acc);
                        bad += memcmp(&acc, &got[k * HS + d], 4) != 0;
                    }
            }
    CHECK_MESSAGE(bad == 0, bad, " weighted-sum outputs differ from their plain fma chains");
}


// attention_forward groups its (sequence, head, query) chains WS_MAX at a time, across heads and
// sequences below WS_MAX queries, within one head against contiguous copies from WS_MAX up: each
// must get the bits it gets alone, one sequence, one head and one query per call. Causal over a
// cache and not, several queries or one (a decoding step: B*NH > WS_MAX chains), ragged groups,
// head sizes with a scalar tail; the attention rows start as a sentinel, so the masked entries
// (0) and the columns past Tk (left alone) are checked too.
TEST_CASE("attention forward gives every query its bits alone, however the queries are grouped") {
    Rng r(9);
    long bad = 0;
    const float SENTINEL = 7.0f;
    for (int causal = 0; causal < 2; causal++)
        for (int Tq : {1, 5, WS_MAX, WS_MAX + 3})
            for (int HS : {8, 12, 16, 32}) {
                int B = 3, NH = 4, C = NH * HS, Tk = causal ? Tq + 4 : Tq + 2, q0 = causal ? 4 : 0, ld = Tk + 2;
                auto q = randv(r, (long)Tq * B * C), k = randv(r, (long)Tk * B * C), v = randv(r, (long)Tk * B * C);
                std::vector<float> out((long)Tq * B * C), att((long)Tq * B * NH * ld, SENTINEL);
                attention_forward(out.data(), att.data(), q.data(), k.data(), v.data(), Tq, Tk, ld, q0, causal, B, NH,
                                  HS);
                for (int b = 0; b < B; b++)
                    for (int h = 0; h < NH; h++)
                        for (int i = 0; i < Tq; i++) {   // sequence b's head h, query i alone, over b's keys
                            std::vector<float> k1((long)Tk * HS), v1((long)Tk * HS), o1(HS), a1(ld, SENTINEL);
                            for (int j = 0; j < Tk; j++) {
                                copy_floats(k1.data() + (long)j * HS, k.data() + ((long)j * B + b) * C + h * HS, HS);
                                copy_floats(v1.data() + (long)j * HS, v.data() + ((long)j * B + b) * C + h * HS, HS);
                            }
                            attention_forward(o1.data(), a1.data(), q.data() + ((long)i * B + b) * C + h * HS,
                                              k1.data(), v1.data(), 1, Tk, ld, q0 + i, causal, 1, 1, HS);
                            bad += memcmp(o1.data(), out.data() + ((long)i * B + b) * C + h * HS, sizeof(float) * HS) != 0;
                            bad += memcmp(a1.data(), att.data() + (((long)i * B + b) * NH + h) * ld, sizeof(float) * ld) != 0;
                        }
            }
    CHECK_MESSAGE(bad == 0, bad, " query outputs or attention rows differ from the query computed alone");
}
TEST_CASE("finite differences: embedding, matmul (naive and fast), rmsnorm, rope, residual") {
    Rng r(11);
    int N = 6, C = 32, V = 5, OC = 20;
    {   // embedding
        std::vector<int> tok = {0, 3, 3, 1, 4, 0};
        auto emb = randv(r, V * C), out = std::vector<float>(N * C), rr = randv(r, N * C);
        std::vector<float> demb(V * C, 0.0f);
        embedding_backward(demb.data(), rr.data(), tok.data(), N, C);
        auto loss = [&]() { embedding_forward(out.data(), tok.data(), emb.data(), N, C); return dotd(rr, out.data()); };
        CHECK(fd_check("embedding", loss, {{"emb", emb.data(), (long)emb.size(), demb.data()}}));
    }
    for (int fast = 0; fast < 2; fast++) {   // matmul
        auto x = randv(r, N * C), W = randv(r, OC * C), rr = randv(r, N * OC), out = std::vector<float>(N * OC);
        std::vector<float> dx(N * C, 0.0f), dW(OC * C, 0.0f);
        if (fast) matmul_backward(dx.data(), dW.data(), rr.data(), x.data(), W.data(), N, C, OC);
        else matmul_backward_naive(dx.data(), dW.data(), rr.data(), x.data(), W.data(), N, C, OC);
        auto loss = [&]() {
            if (fast) matmul_forward(out.data(), x.data(), W.data(), nullptr, N, C, OC);
            else matmul_forward_naive(out.data(), x.data(), W.data(), N, C, OC);
            return dotd(rr, out.data());
        };
        CHECK(fd_check(fast ? "matmul(fast)" : "matmul(naive)", loss,
                       {{"inp", x.data(), (long)x.size(), dx.data()}, {"W", W.data(), (long)W.size(), dW.data()}}));
    }
    {   // rmsnorm
        auto x = randv(r, N * C), w = randv(r, C), rr = randv(r, N * C), out = std::vector<float>(N * C);
        std::vector<float> rstd(N), dx(N * C, 0.0f), dw(C, 0.0f);
        rmsnorm_forward(out.data(), rstd.data(), x.data(), w.data(), N, C, 1e-5f);
        rmsnorm_backward(dx.data(), dw.data(), rr.data(), x.data(), w.data(), rstd.data(), N, C);
        auto loss = [&]() { rmsnorm_forward(out.data(), rstd.data(), x.data(), w.data(), N, C, 1e-5f); return dotd(rr, out.data()); };
        CHECK(fd_check("rmsnorm", loss, {{"inp", x.data(), (long)x.size(), dx.data()}, {"w", w.data(), C, dw.data()}}));
    }
    {   // rope, at scattered positions
        int NH = 2, HS = 16;
        std::vector<int> pos = {0, 1, 7, 30, 2, 100};
        auto x = randv(r, N * C), rr = randv(r, N * C), out = std::vector<float>(N * C);
        std::vector<float> dx(N * C, 0.0f);
        rope_backward(dx.data(), rr.data(), pos.data(), N, NH, HS, 10000.0f);
        auto loss = [&]() { rope_forward(out.data(), x.data(), pos.data(), N, NH, HS, 10000.0f); return dotd(rr, out.data()); };
        CHECK(fd_check("rope", loss, {{"inp", x.data(), (long)x.size(), dx.data()}}));
    }
    {   // residual
        auto a = randv(r, N * C), b = randv(r, N * C), rr = randv(r, N * C), out = std::vector<float>(N * C);
        std::vector<float> da(N * C, 0.0f), db(N * C, 0.0f);
        residual_backward(da.data(), db.data(), rr.data(), N * C);
        auto loss = [&]() { residual_forward(out.data(), a.data(), b.data(), N * C); return dotd(rr, out.data()); };
        CHECK(fd_check("residual", loss, {{"a", a.data(), (long)a.size(), da.data()}, {"b", b.data(), (long)b.size(), db.data()}}));
    }
}

TEST_CASE("finite differences: attention (causal over a cache, and non-causal), swiglu, cross-entropy") {
    Rng r(12);
    for (int causal = 0; causal < 2; causal++) {
        // causal: 3 queries at positions 2..4 over a cache of 5 keys; non-causal: 4 over 4
        int B = 2, NH = 2, HS = 8, C = NH * HS, Tq = causal ? 3 : 4, Tk = causal ? 5 : 4, q0 = causal ? 2 : 0, ld = 6;
        auto q = randv(r, Tq * B * C), k = randv(r, Tk * B * C), v = randv(r, Tk * B * C), rr = randv(r, Tq * B * C);
        std::vector<float> out(Tq * B * C), att(Tq * B * NH * ld), dq(q.size(), 0.0f), dk(k.size(), 0.0f), dv(v.size(), 0.0f);
        attention_forward(out.data(), att.data(), q.data(), k.data(), v.data(), Tq, Tk, ld, q0, causal, B, NH, HS);
        attention_backward(dq.data(), dk.data(), dv.data(), rr.data(), att.data(), q.data(), k.data(), v.data(), Tq, Tk,
                           ld, q0, causal, B, NH, HS);
        auto loss = [&]() {
            attention_forward(out.data(), att.data(), q.data(), k.data(), v.data(), Tq, Tk, ld, q0, causal, B, NH, HS);
            return dotd(rr, out.data());
        };
        CHECK(fd_check(causal ? "attention(causal)" : "attention(full)", loss,
                       {{"q", q.data(), (long)q.size(), dq.data()}, {"k", k.data(), (long)k.size(), dk.data()},
                        {"v", v.data(), (long)v.size(), dv.data()}}));
    }
    {
        long N = 40;
        auto h1 = randv(r, N, 2.0f), h3 = randv(r, N), rr = randv(r, N), out = std::vector<float>(N);
        std::vector<float> d1(N, 0.0f), d3(N, 0.0f);
        swiglu_backward(d1.data(), d3.data(), rr.data(), h1.data(), h3.data(), N);
        auto loss = [&]() { swiglu_forward(out.data(), h1.data(), h3.data(), N); return dotd(rr, out.data()); };
        CHECK(fd_check("swiglu", loss, {{"h1", h1.data(), N, d1.data()}, {"h3", h3.data(), N, d3.data()}}));
    }
    {
        int N = 5, V = 7;
        auto z = randv(r, N * V, 2.0f);
        std::vector<int> tgt = {0, 6, 3, 3, 1};
        std::vector<float> w = {0.5f, 0.0f, 1.0f, 0.25f, 2.0f}, probs(N * V), losses(N), dz(N * V, 0.0f);
        crossentropy_forward(losses.data(), probs.data(), z.data(), tgt.data(), w.data(), N, V);
        crossentropy_backward(dz.data(), probs.data(), tgt.data(), w.data(), 1.0f, N, V);
        auto loss = [&]() {
            crossentropy_forward(losses.data(), probs.data(), z.data(), tgt.data(), w.data(), N, V);
            double s = 0;
            for (int n = 0; n < N; n++) s += (double)losses[n] * w[n];
            return s;
        };
        CHECK(fd_check("crossentropy", loss, {{"logits", z.data(), (long)z.size(), dz.data()}}));
    }
}

TEST_CASE("adamw_update against a double-precision computation of the same formula") {
    Rng r(13);
    long N = 50;
    auto p = randv(r, N), m = std::vector<float>(N, 0.0f), v = std::vector<float>(N, 0.0f);
    std::vector<double> pd(p.begin(), p.end()), md(N, 0.0), vd(N, 0.0);
    float lr = 0.01f, b1 = 0.9f, b2 = 0.95f, eps = 1e-8f, wd = 0.1f;
    for (int t = 1; t <= 5; t++) {
        auto g = randv(r, N);
        adamw_update(p.data(), m.data(), v.data(), g.data(), N, lr, b1, b2, eps, wd, t);
        for (long i = 0; i < N; i++) {
            pd[i] -= (double)lr * wd * pd[i];
            md[i] = b1 * md[i] + (1 - (double)b1) * g[i];
            vd[i] = b2 * vd[i] + (1 - (double)b2) * g[i] * g[i];
            pd[i] -= lr * (md[i] / (1 - pow(b1, t))) / (sqrt(vd[i] / (1 - pow(b2, t))) + eps);
        }
    }
    std::vector<float> want(pd.begin(), pd.end());
    CHECK(check_tensor("adamw params after 5 steps", p.data(), want.data(), N, 1e-6f));
}

// =============================================================================================
// The model as a whole: segment loop, decoding, the processor's invariants, through-time FD
// =============================================================================================
// The named tiny test configuration: 2 layers, width 16, 2 heads; processor width 8, k 2.
static Config tiny_config(bool proc) {
    Config c;
    c.C = 16; c.L = 2; c.NH = 2; c.F = 32; c.T = 96;
    if (proc) { c.proc_width = 8; c.proc_layers = 1; c.proc_heads = 2; c.proc_ffn = 16; c.k = 2; }
    return c;
}
// every weight random (w_out too, so the processor really rewrites); gains near 1, gates -1
static void randomize(Model& M, uint64_t seed, float scale) {
    Rng r(seed);
    for (auto& p : M.table)
        for (long i = 0; i < p.numel; i++) {
            float& x = M.params[p.offset + i];
            x = p.kind == 1 ? 1.0f + 0.1f * r.normal() : p.kind == 3 ? -1.0f : scale * r.normal();
        }
}
static void tiny_model(Model& M, bool proc, uint64_t seed) {
    model_build(M, tiny_config(proc));
    randomize(M, seed, 0.3f);
}
// two chain examples of the same layout (3 operations: 5 segments, 4 boundaries)
static int tiny_batch(RunState& S, const Config& c, bool train, uint64_t seed = 5) {
    Rng r(seed);
    std::vector<std::string> texts = {gen_chain(r, 3), gen_chain(r, 3)};
    run_state_build(S, c, (int)texts[0].size() + 1, 2, train);
    return load_batch(S, texts);
}

TEST_CASE("the segment loop with the processor off equals one full causal pass (logits and gradients)") {
    Model M;
    tiny_model(M, false, 21);
    RunState S;
    int T = tiny_batch(S, M.cfg, true);
    TrainMode full, seg;
    seg.segmented = true;
    forward_sequence(M, S, T, full);
    std::vector<float> logits_full(S.logits, S.logits + (long)T * S.B * M.cfg.V);
    backward_sequence(M, S, T, full);
    std::vector<float> g_full = M.grads;
    std::fill(M.grads.begin(), M.grads.end(), 0.0f);
    forward_sequence(M, S, T, seg);
    backward_sequence(M, S, T, seg);
    CHECK(check_tensor("segmented logits vs full pass", S.logits, logits_full.data(), logits_full.size(), 1e-5f));
    for (auto& p : M.table)
        CHECK(check_tensor("segmented grad " + p.name, M.grads.data() + p.offset, g_full.data() + p.offset, p.numel,
                           1e-5f * std::max(max_abs(g_full.data() + p.offset, p.numel), 1e-12f)));
}

// logits of a decoder fed one token at a time, for the tokens of sequence b of S
static std::vector<float> decode_logits(const Model& M, const RunState& S, int T, int b) {
    Decoder D;
    decoder_init(D, M);
    decoder_reset(D);
    std::vector<float> out;
    for (int t = 0; t < T; t++) {
        int tok = S.tokens[(long)t * S.B + b];
        decoder_feed(D, &tok, 1);
        out.insert(out.end(), D.S.logits + (long)t * M.cfg.V, D.S.logits + (long)(t + 1) * M.cfg.V);
    }
    return out;
}
static std::vector<float> seq_logits(const RunState& S, int T, int b, int V) {
    std::vector<float> out;
    for (int t = 0; t < T; t++) out.insert(out.end(), S.logits + ((long)t * S.B + b) * V, S.logits + ((long)t * S.B + b + 1) * V);
    return out;
}

TEST_CASE("incremental decoding with the KV cache gives the full pass's logits (backbone; processor newline, periodic:5)") {
    for (int proc = 0; proc < 3; proc++) {
        Model M;
        tiny_model(M, proc > 0, 22);
        if (proc == 2) M.cfg.periodic = 5;
        RunState S;
        int T = tiny_batch(S, M.cfg, false);
        TrainMode mode;
        mode.use_proc = proc;
        forward_sequence(M, S, T, mode);   // the path bt score uses
        for (int b = 0; b < S.B; b++) {
            auto want = seq_logits(S, T, b, M.cfg.V), got = decode_logits(M, S, T, b);
            CHECK(check_tensor(strf("decode vs %s, sequence %d", proc == 2 ? "score (periodic:5)" : proc ? "score (processor on)" : "full pass", b),
                               got.data(), want.data(), want.size(), 1e-4f));
        }
    }
}

// =============================================================================================
// Baselines: pause tokens and H2O-style eviction
// =============================================================================================
TEST_CASE("pause models: PAUSE after every newline when training, decoding and scoring; pause-frozen moves one row") {
    CHECK(insert_pauses("1+2\n3=3\n#3$", 2) == "1+2\n__3=3\n__#3$");
    CHECK(insert_pauses("1+2\n#3$", 0) == "1+2\n#3$");
    // greedy decoding feeds the pauses it never emits: the generated text has none, and the
    // decoder's positions hold exactly the pause-inserted sequence
    Model M;
    Config c = tiny_config(false);
    c.pause = 3;
    model_build(M, c);
    randomize(M, 71, 0.3f);
    Decoder D;
    decoder_init(D, M);
    std::string out = generate(D, "1+2\n");
    CHECK(out.find('_') == std::string::npos);
    std::string fed;
    for (int t = 0; t < D.S.n_tok; t++)
        if (D.S.tokens[t] != BOS) fed += token_to_char(D.S.tokens[t]);
    std::string body = out.back() == '$' ? out.substr(0, out.size() - 1) : out;   // '$' is never fed
    std::string want = insert_pauses("1+2\n" + body, 3);
    CHECK(want.compare(0, fed.size(), fed) == 0);   // when the context fills, the last pauses may not fit
    CHECK(fed.size() + 3 >= want.size());
    CHECK(std::count(fed.begin(), fed.end(), '_') == 3 * std::count(fed.begin(), fed.end(), '\n'));
    printf("  pause 3, generated %zu chars without a PAUSE; fed %d tokens\n", out.size(), D.S.n_tok);
    // pause-frozen: one AdamW step changes the PAUSE row of tok_emb and nothing else
    RunState S;
    Rng r(72);
    std::vector<std::string> texts = {insert_pauses(gen_chain(r, 3), 3), insert_pauses(gen_chain(r, 3), 3)};
    run_state_build(S, M.cfg, (int)texts[0].size() + 1, 2, true);
    int T = load_batch(S, texts);
    TrainMode mode;
    mode.pause_row_only = true;
    std::vector<float> before = M.params;
    std::fill(M.grads.begin(), M.grads.end(), 0.0f);
    forward_sequence(M, S, T, mode);
    backward_sequence(M, S, T, mode);
    optimizer_step(M, OptConfig(), 0, mode);
    long row0 = (long)PAUSE * M.cfg.C, changed_in_row = 0, changed_elsewhere = 0;
    for (long i = 0; i < M.n_params; i++) {
        bool in_row = i >= row0 && i < row0 + M.cfg.C;
        if (M.params[i] != before[i]) (in_row ? changed_in_row : changed_elsewhere)++;
    }
    printf("  pause-frozen step: %ld of %d PAUSE-row weights changed, %ld others\n", changed_in_row, M.cfg.C, changed_elsewhere);
    CHECK(changed_in_row == M.cfg.C);
    CHECK(changed_elsewhere == 0);
}

TEST_CASE("evict: a budget above the length changes nothing; a small one keeps the top-B slots' K, V and positions") {
    Model M;
    tiny_model(M, false, 73);
    Rng r(74);
    std::string ex = gen_chain(r, 6);
    std::vector<int> toks = tokenize(ex, "test");
    Decoder A, E;
    decoder_init(A, M);
    decoder_init(E, M, 1000);
    decoder_feed(A, toks.data(), (int)toks.size());
    decoder_feed(E, toks.data(), (int)toks.size());
    const float* za = A.S.logits + (long)(A.S.n_tok - 1) * M.cfg.V;
    const float* ze = E.S.logits + (long)(E.S.n_tok - 1) * M.cfg.V;
    CHECK(memcmp(za, ze, sizeof(float) * M.cfg.V) == 0);
    // budget 3: feed up to the second newline, then the newline itself, and look at the cache
    Decoder K;
    decoder_init(K, M, 3);
    int nl2 = -1, seen = 0;
    for (int t = 1; t < (int)toks.size(); t++)
        if (toks[t] == NEWLINE && ++seen == 2) { nl2 = t; break; }
    REQUIRE(nl2 > 0);
    decoder_feed(K, toks.data(), nl2);   // one eviction happened at the first newline (nothing older)
    const int L = M.cfg.L, C = M.cfg.C;
    std::vector<float> score = K.score, kcopy, vcopy;
    for (int l = 0; l < L; l++) {
        kcopy.insert(kcopy.end(), K.S.acts[l].k, K.S.acts[l].k + (long)nl2 * C);
        vcopy.insert(vcopy.end(), K.S.acts[l].v, K.S.acts[l].v + (long)nl2 * C);
    }
    std::vector<int> pos(K.S.pos, K.S.pos + nl2);
    int old = K.seg_start;   // the line now ending starts here; slots before it compete
    decoder_feed(K, &toks[nl2], 1);
    // the expected survivors: the 3 best scores among [0, old) by a sort (ties to the earlier), then the line
    std::vector<int> order(old);
    for (int i = 0; i < old; i++) order[i] = i;
    std::stable_sort(order.begin(), order.end(), [&](int x, int y) { return score[x] > score[y]; });
    std::vector<int> kept(order.begin(), order.begin() + 3);
    std::sort(kept.begin(), kept.end());
    for (int p = old; p < nl2; p++) kept.push_back(p);
    REQUIRE(K.S.n_tok == (int)kept.size() + 1);
    bool same = true;
    for (size_t i = 0; i < kept.size(); i++) {
        same &= K.S.pos[i] == pos[kept[i]] && K.S.tokens[i] == toks[kept[i]];
        for (int l = 0; l < L; l++)
            same &= memcmp(K.S.acts[l].k + i * C, &kcopy[((long)l * nl2 + kept[i]) * C], sizeof(float) * C) == 0 &&
                    memcmp(K.S.acts[l].v + i * C, &vcopy[((long)l * nl2 + kept[i]) * C], sizeof(float) * C) == 0;
    }
    CHECK(same);
    CHECK(K.S.pos[kept.size()] == nl2);   // the newline keeps its true position
    printf("  evict 3 at position %d: kept slots", nl2);
    for (int p : kept) printf(" %d", p);
    printf(" (of %d), the newline goes to slot %zu at position %d\n", nl2, kept.size(), K.S.pos[kept.size()]);
}

TEST_CASE("evict: decoding stops when the positions fill the context, though eviction keeps freeing slots") {
    Model M;
    tiny_model(M, false, 75);
    for (int c = 0; c < M.cfg.C; c++) M.w.final_norm[c] = 0.0f;   // logits all 0: argmax is the newline, for ever
    Decoder D;
    decoder_init(D, M, 2);
    std::string out = generate(D, "1+2\n");          // used to loop: every newline evicted down to a few slots
    int prompt = 1 + 4;                               // BOS, "1+2", the newline
    CHECK((int)out.size() == M.cfg.T - prompt);
    CHECK(out.find_first_not_of('\n') == std::string::npos);
    CHECK(D.next_pos == M.cfg.T);
    CHECK(D.S.n_tok < 8);                             // the slots in use stayed few
}

// =============================================================================================
// The batched decoder: B sequences in lock-step equal one Decoder each, bit for bit
// =============================================================================================
// Prompts of different lengths whose newlines fall at different positions, some at the same one:
// "1+2\n" and "3*4\n" reach their first newline at the same step from the same segment start
// (they fire together), "1*4-0+3\n" reaches its first at position 8, the step where "5-1\n2=2\n"
// reaches its second (two groups fire at one step), and the random models then write newlines of
// their own wherever they do.
static const std::vector<std::string> BATCH_PROMPTS = {"1+2\n", "1*4-0+3\n", "3*4\n", "5-1\n2=2\n", "12+3+4\n1=",
                                                       "7\n"};

// Decode prompts with one Decoder each (the reference) and in one batched decoder of B >= the
// prompt count; the texts, the number of positions fed and the logits of every position (so the
// log-probability of every generated token) must be equal, tolerance 0.
static bool check_batched(const Model& M, BatchDecoder& BD, const std::vector<std::string>& prompts,
                          const std::string& what) {
    std::vector<std::vector<float>> z;
    std::vector<std::string> got = batch_generate(BD, prompts, &z);
    bool ok = got.size() == prompts.size();
    for (size_t b = 0; b < prompts.size() && ok; b++) {
        Decoder D;
        decoder_init(D, M);
        std::string want = generate(D, prompts[b]);
        long n = (long)D.S.n_tok * M.cfg.V;
        bool same_text = got[b] == want, same_len = (long)z[b].size() == n;
        ok = same_text && same_len && memcmp(z[b].data(), D.S.logits, sizeof(float) * n) == 0 &&
             check_tensor(strf("%s, sequence %zu (%d positions)", what.c_str(), b, D.S.n_tok), z[b].data(), D.S.logits, n,
                          0.0f);
        if (!same_text) printf("  %s, sequence %zu: batched wrote \"%s\", alone \"%s\"\n", what.c_str(), b, got[b].c_str(),
                               want.c_str());
        if (!same_len) printf("  %s, sequence %zu: batched fed %zu positions, alone %d\n", what.c_str(), b,
                              z[b].size() / M.cfg.V, D.S.n_tok);
    }
    return ok;
}

TEST_CASE("the batched decoder equals one Decoder per sequence bit for bit (vanilla, newline, periodic, pause)") {
    const char* names[] = {"vanilla", "processor newline", "processor periodic:5", "pause 2"};
    for (int kind = 0; kind < 4; kind++) {
        Model M;
        Config c = tiny_config(kind == 1 || kind == 2);
        if (kind == 2) c.periodic = 5;
        if (kind == 3) c.pause = 2;
        model_build(M, c);
        randomize(M, 81 + kind, 0.3f);   // w_out random too: the processor really rewrites
        BatchDecoder BD;
        batch_init(BD, M, 7);            // room for 7; 6 prompts
        CHECK(check_batched(M, BD, BATCH_PROMPTS, names[kind]));
        // the same decoder again, the prompts in another order and fewer of them
        std::vector<std::string> again = {BATCH_PROMPTS[3], BATCH_PROMPTS[0], BATCH_PROMPTS[5], BATCH_PROMPTS[1]};
        CHECK(check_batched(M, BD, again, std::string(names[kind]) + ", reused"));
        // newline: some firings were a group smaller than the batch (gathered); periodic: never
        if (kind == 1) CHECK(BD.G_cap > 0);
        if (kind == 2) CHECK(BD.G_cap == 0);
    }
}

// A batched decoder beside one lone Decoder per sequence, fed the same tokens in lock step;
// who[j] is the sequence in batch slot j (a compaction drops slots: the caller updates who)
struct LockStep {
    const std::vector<std::vector<int>>& seqs;
    std::vector<int> who;
    BatchDecoder BD;
    std::vector<Decoder> D;
    LockStep(const Model& M, const std::vector<std::vector<int>>& s) : seqs(s), D(s.size()) {
        int n = (int)s.size();
        for (int i = 0; i < n; i++) who.push_back(i);
        batch_init(BD, M, n);
        batch_reset(BD, n);
        for (Decoder& d : D) { decoder_init(d, M); decoder_reset(d); }
    }
    void feed(int t) {   // token t of every sequence still in the batch, to both
        int B = BD.S.B;
        std::vector<int> toks(B);
        for (int j = 0; j < B; j++) toks[j] = seqs[who[j]][t];
        batch_feed(BD, toks.data(), 1);
        for (int j = 0; j < B; j++) decoder_feed(D[who[j]], &seqs[who[j]][t], 1);
    }
    Decoder& lone(int j) { return D[who[j]]; }
};

TEST_CASE("batched firing and compaction: every sequence's cache stays what it would be alone") {
    // 4 sequences fed one token list each, teacher-forced; newlines at 4, 8 (a), 8 (b), 4, 10 (c)
    // and 2, 8 (d). At 2, d fires alone (a group of 1 of 4, gathered); at 4, a and c together (2 of
    // 4). After position 6, b leaves the batch mid-line (a, c and d move down, stride 3); at 8, a
    // and d fire in two groups (segment starts 4 and 2), at 10 c alone. After each feed every
    // sequence's K and V (every layer, every position), the attention rows of its current segment
    // (what the next firing selects by) and its logits must equal a lone Decoder's, bit for bit.
    Model M;
    tiny_model(M, true, 86);
    const Config& c = M.cfg;
    std::vector<std::vector<int>> seqs = {tokenize("1+2\n3=3\n#3$", "a"), tokenize("1*4-0+3\n1*4=4", "b"),
                                          tokenize("5-1\n5-1=4\n#4", "c"), tokenize("7\n7*1=7\n#7$", "d")};
    int n = 12;
    LockStep ls(M, seqs);
    BatchDecoder& BD = ls.BD;
    bool same = true;
    long W_att = (long)c.NH * c.T;
    for (int t = 0; t < n; t++) {
        ls.feed(t);
        int B = BD.S.B;
        for (int j = 0; j < B; j++) {
            Decoder& d = ls.lone(j);
            same &= BD.seg_start[j] == d.seg_start;
            for (int l = 0; l < c.L; l++)
                for (int p = 0; p <= t; p++) {
                    long r = (long)p * B + j;
                    same &= memcmp(BD.S.acts[l].k + r * c.C, d.S.acts[l].k + (long)p * c.C, sizeof(float) * c.C) == 0;
                    same &= memcmp(BD.S.acts[l].v + r * c.C, d.S.acts[l].v + (long)p * c.C, sizeof(float) * c.C) == 0;
                    if (p >= d.seg_start)
                        same &= memcmp(BD.S.acts[l].att + r * W_att, d.S.acts[l].att + p * W_att, sizeof(float) * W_att) == 0;
                }
            same &= memcmp(batch_logits(BD, j), d.S.logits + (long)t * c.V, sizeof(float) * c.V) == 0;
        }
        if (t == 6) {   // b leaves
            std::vector<char> drop = {0, 1, 0, 0};
            batch_compact(BD, drop.data());
            ls.who = {0, 2, 3};
            CHECK(BD.S.B == 3);
        }
    }
    CHECK(same);
    CHECK(BD.G_cap == 2);   // the largest gathered group: a and c at position 4
    CHECK(std::vector<int>(BD.seg_start.begin(), BD.seg_start.begin() + 3) == std::vector<int>{8, 10, 8});
    printf("  4 sequences, one leaving midway: K, V, the current segment's attention and the logits equal to lone "
           "decoders: %s\n", same ? "yes" : "NO");
}

TEST_CASE("evaluate: batched (several batches) gives each example what one Decoder gives it; eviction is unbatched") {
    Model M;
    tiny_model(M, true, 87);
    std::vector<std::string> texts;
    for (int size = 2; size <= 4; size++)
        for (auto& t : eval_set(TASK_CHAIN, size, 14, 3)) texts.push_back(t);   // 42: 7 batches of 6
    std::vector<std::string> batched(texts.size()), alone(texts.size());
    generate_batched(batched, M, texts);
    generate_each(alone, M, texts, 0);
    CHECK(batched == alone);
    // decoders kept across calls (bt eval) take the model's new weights: a changed model decodes
    // as a fresh decoder would decode it
    EvalDecoders keep;
    std::vector<std::string> kept(texts.size()), fresh(texts.size());
    generate_batched(kept, M, texts, &keep);
    CHECK(kept == alone);
    randomize(M, 89, 0.3f);
    generate_batched(kept, M, texts, &keep);
    generate_each(fresh, M, texts, 0);
    CHECK(kept == fresh);
    CHECK(kept != alone);
    // a vanilla model: a budget above the length evicts nothing, so the unbatched evict path gives
    // the batched decoder's results
    Model V;
    tiny_model(V, false, 88);
    EvalResult a = evaluate(V, texts), e = evaluate(V, texts, 1000);
    CHECK(a.n == e.n);
    CHECK(a.answer_ok == e.answer_ok);
    CHECK(a.lines_ok == e.lines_ok);
    CHECK(a.first_wrong_sum == e.first_wrong_sum);
    CHECK(a.mistakes == e.mistakes);
}

TEST_CASE("a freshly initialised processor (W_out = 0) leaves the logits bit-identical to the backbone alone") {
    Model M;
    model_build(M, tiny_config(true));
    model_init_random(M, 23);   // the real init: w_out 0, gate -2
    RunState S;
    int T = tiny_batch(S, M.cfg, false);
    TrainMode off, on;
    off.segmented = true;
    on.use_proc = true;
    forward_sequence(M, S, T, off);
    std::vector<float> a(S.logits, S.logits + (long)T * S.B * M.cfg.V);
    forward_sequence(M, S, T, on);
    CHECK(S.undo.size() == 4u * M.cfg.L);   // it did fire
    CHECK(memcmp(a.data(), S.logits, sizeof(float) * a.size()) == 0);
}

TEST_CASE("the undo log restores the cache bitwise at every boundary of the backward walk") {
    Model M;
    tiny_model(M, true, 24);
    RunState S;
    int T = tiny_batch(S, M.cfg, true);
    const Config& c = M.cfg;
    long n = (long)T * S.B * c.C;
    set_targets(S, T);
    // forward by hand, keeping a copy of every layer's cache just before each rewrite
    std::vector<int> b = segment_bounds(c, S, T);
    std::vector<std::vector<float>> before;   // [boundary * L + l] -> K then V
    for (size_t j = 0; j + 1 < b.size(); j++) {
        backbone_forward(M, S, b[j], b[j + 1]);
        if (j + 2 == b.size()) break;
        for (int l = 0; l < c.L; l++) {
            std::vector<float> kv(S.acts[l].k, S.acts[l].k + n);
            kv.insert(kv.end(), S.acts[l].v, S.acts[l].v + n);
            before.push_back(kv);
        }
        bottleneck_step(M, S, b[j], b[j + 1]);
    }
    // the walk back, by hand: after undoing boundary j, every layer's cache is as it was before
    for (int l = 0; l < c.L; l++) { zero(S.dK[l], n); zero(S.dV[l], n); }
    int r = (int)S.undo.size(), nb = (int)b.size() - 2;
    bool ok = true;
    for (int j = nb - 1; j >= 0; j--) {
        backbone_backward(M, S, b[j + 1], b[j + 2], true);
        for (int l = c.L - 1; l >= 0; l--) bottleneck_step_backward_layer(M, S, S.undo[--r]);
        long m = (long)b[j + 1] * S.B * c.C;   // the rows that existed at boundary j
        for (int l = 0; l < c.L; l++) {
            const std::vector<float>& kv = before[(long)j * c.L + l];
            ok &= memcmp(kv.data(), S.acts[l].k, sizeof(float) * m) == 0;
            ok &= memcmp(kv.data() + n, S.acts[l].v, sizeof(float) * m) == 0;
        }
    }
    CHECK(ok);
    CHECK(r == 0);
}

// the summed loss as a double, for finite differences through the whole model
static double model_loss(const Model& M, RunState& S, int T, const TrainMode& mode) {
    forward_sequence(M, S, T, mode);
    double s = 0;
    for (long i = 0; i < (long)T * S.B; i++) s += (double)S.losses[i] * S.weight[i];
    return s;
}

TEST_CASE("finite differences through time: every parameter, processor on, joint, full BPTT") {
    Model M;
    tiny_model(M, true, 25);
    RunState S;
    int T = tiny_batch(S, M.cfg, true);
    TrainMode mode;
    mode.use_proc = true;   // joint (backbone trained), bptt full
    model_loss(M, S, T, mode);
    std::vector<int> base_sel(S.undo_sel, S.undo_sel + S.undo_sel_n);
    backward_sequence(M, S, T, mode);
    std::vector<float> g = M.grads;
    bool ok = true;
    for (auto& p : M.table) {
        // the loss depends on the selection, which is piecewise constant: eps stays small enough
        // not to flip it on this example (the check would fail loudly if it did)
        ok &= fd_check(p.name, [&]() {
                           double l = model_loss(M, S, T, mode);
                           return std::vector<int>(S.undo_sel, S.undo_sel + S.undo_sel_n) == base_sel ? l : NAN;   // same selections, else not smooth here
                       },
                       {{p.name, M.params.data() + p.offset, p.numel, g.data() + p.offset}}, 1e-2f, 2e-2f);
    }
    CHECK(ok);
}

// =============================================================================================
// Tasks: the generators checked by an independent evaluator; the splits are disjoint
// =============================================================================================
static int eval_op(int a, char op, int d) {   // written again here, not shared with bt.cpp
    long r = op == '+' ? a + d : op == '-' ? a - d + 10 : (long)a * d;
    return (int)(r % 10);
}

// chain: recompute every line from the question
static bool check_chain(const std::string& text, int n) {
    auto L = split_lines(text);
    const std::string& q = L[0];
    if ((int)q.size() != 2 * n + 1 || (int)L.size() != n + 2) return false;
    int a = q[0] - '0';
    for (int i = 0; i < n; i++) {
        char op = q[1 + 2 * i];
        int d = q[2 + 2 * i] - '0', r = eval_op(a, op, d);
        std::string want = std::string(1, '0' + a) + op + std::string(1, '0' + d) + "=" + std::string(1, '0' + r);
        if (L[1 + i] != want) return false;
        a = r;
    }
    return L.back() == "#" + std::string(1, '0' + a) + "$";
}

// add: the answer is the integer sum written least-significant digit first
static bool check_add(const std::string& text, int n) {
    auto L = split_lines(text);
    size_t plus = L[0].find('+');
    std::string a = L[0].substr(0, plus), b = L[0].substr(plus + 1);
    if ((int)a.size() != n || (int)b.size() != n || (int)L.size() != n + 2) return false;
    long va = 0, vb = 0;
    for (int i = n - 1; i >= 0; i--) { va = va * 10 + (a[i] - '0'); vb = vb * 10 + (b[i] - '0'); }
    std::string sum;
    for (long s = va + vb; s > 0; s /= 10) sum += (char)('0' + s % 10);
    while ((int)sum.size() < n) sum += '0';
    if (L.back() != "#" + sum + "$") return false;
    int carry = 0;   // and the column lines
    for (int i = 0; i < n; i++) {
        int s = (a[i] - '0') + (b[i] - '0') + carry;
        char buf[32];
        snprintf(buf, sizeof buf, "%c+%c+%d=%d,%d", a[i], b[i], carry, s % 10, s / 10);
        if (L[1 + i] != buf) return false;
        carry = s / 10;
    }
    return true;
}

// var: resolve the question's assignments; the lines must walk the one resolvable chain
static bool check_var(const std::string& text, int depth) {
    auto L = split_lines(text);
    std::map<char, std::string> def;
    std::stringstream ss(L[0]);
    std::string as;
    while (std::getline(ss, as, ';')) def[as[0]] = as.substr(2);
    std::function<int(char, int)> value = [&](char v, int guard) -> int {
        if (!def.count(v) || guard > 40) return -1;
        const std::string& r = def[v];
        if (r.size() == 1) return r[0] - '0';
        int u = value(r[0], guard + 1);
        return u < 0 ? -1 : eval_op(u, r[1], r[2] - '0');
    };
    int resolvable = 0;
    for (auto& kv : def) resolvable += value(kv.first, 0) >= 0;
    if (resolvable != depth || (int)L.size() != depth + 2) return false;
    char prev = 0;
    for (int i = 0; i < depth; i++) {
        const std::string& line = L[1 + i];
        char v = line[0];
        if (!def.count(v) || value(v, 0) < 0) return false;
        std::string want = std::string(1, v) + "=" + def[v] + (i ? "=" + std::to_string(value(v, 0)) : "");
        if (line != want || (i && def[v][0] != prev)) return false;
        prev = v;
    }
    return L.back() == "#" + std::to_string(value(prev, 0)) + "$";
}

// mul: read both numbers (least-significant digit first), multiply with plain long multiplication
// digit by digit, and compare every partial product, running sum and the answer
static bool check_mul(const std::string& text, int n) {
    auto L = split_lines(text);
    if ((int)L.size() != n + 2) return false;
    size_t star = L[0].find('*');
    std::string a = L[0].substr(0, star), b = L[0].substr(star + 1);
    if ((int)a.size() != n || (int)b.size() != n) return false;
    std::vector<int> sum(2 * n + 1, 0);   // digits, least significant first
    for (int i = 0; i < n; i++) {
        std::vector<int> part(2 * n + 1, 0);
        for (int j = 0; j < n; j++) part[i + j] += (a[j] - '0') * (b[i] - '0');
        for (int k = 0; k < 2 * n; k++) { part[k + 1] += part[k] / 10; part[k] %= 10; }
        for (int k = 0; k <= 2 * n; k++) sum[k] += part[k];
        for (int k = 0; k < 2 * n; k++) { sum[k + 1] += sum[k] / 10; sum[k] %= 10; }
        std::string ps, ss;
        for (int k = 0; k < n + 1 + i; k++) { ps += (char)('0' + part[k]); ss += (char)('0' + sum[k]); }
        for (int k = n + 1 + i; k <= 2 * n; k++)   // nothing may be cut off by the width
            if (part[k] || sum[k]) return false;
        if (L[1 + i] != ps + "," + ss) return false;
    }
    std::string ans;
    for (int k = 0; k < 2 * n; k++) ans += (char)('0' + sum[k]);
    return L.back() == "#" + ans + "$";
}

TEST_CASE("generators write correct arithmetic (independent evaluator), at every size, both splits") {
    Rng r(31);
    int bad = 0, total = 0;
    for (int task = 0; task < N_TASKS; task++)
        for (int size = TASKS[task].train_lo; size <= TASKS[task].ood_hi; size++)
            for (int i = 0; i < 40; i++) {
                std::string t = gen_example((Task)task, r, size, i % 2);
                bool ok = task == TASK_CHAIN ? check_chain(t, size) : task == TASK_ADD ? check_add(t, size)
                        : task == TASK_VAR   ? check_var(t, size) : check_mul(t, size);
                if (!ok && bad++ < 3) printf("  wrong %s example:\n%s\n", TASKS[task].name, t.c_str());
                total++;
            }
    printf("  %d generated examples checked, %d wrong\n", total, bad);
    CHECK(bad == 0);
    // the documented examples themselves
    CHECK(check_chain("1*4-0+3\n1*4=4\n4-0=4\n4+3=7\n#7$", 3));
    CHECK(check_add("891+721\n8+7+0=5,1\n9+2+1=2,1\n1+1+1=3,0\n#523$", 3));
    CHECK(check_var("t=b+0;a=o-2;q=x+7;o=q*4;x=0\nx=0\nq=x+7=7\no=q*4=8\na=o-2=6\n#6$", 4));
    CHECK(check_mul("21*43\n840,840\n0630,8040\n#8040$", 2));   // 12 x 34 = 408
    CHECK(!check_mul("21*43\n840,840\n0630,8041\n#8040$", 2));  // and the evaluator can say no
}

TEST_CASE("training and evaluation questions never overlap") {
    for (int task = 0; task < N_TASKS; task++) {
        int size = TASKS[task].train_lo;   // the smallest size is where collisions would show
        std::set<std::string> train, eval;
        Rng r(32);
        for (int i = 0; i < 3000; i++) train.insert(question_of(gen_example((Task)task, r, size, false)));
        for (auto& t : eval_set((Task)task, size, 300, 1)) eval.insert(question_of(t));
        int common = 0;
        for (auto& q : eval) common += train.count(q);
        printf("  %s size %d: %zu distinct training questions, %zu evaluation questions, %d in both\n",
               TASKS[task].name, size, train.size(), eval.size(), common);
        CHECK(common == 0);
        CHECK(eval.size() > 10);
    }
}

// =============================================================================================
// Checkpoints and bad input
// =============================================================================================
TEST_CASE("checkpoints round-trip exactly, processor and metadata included") {
    Model M;
    Config c = tiny_config(true);
    c.periodic = 8;
    model_build(M, c);
    randomize(M, 41, 0.3f);
    std::string path = tmp_path("roundtrip.safetensors");
    save_model(M, path);
    Model R;
    load_model(R, path);
    CHECK(R.n_params == M.n_params);
    CHECK(memcmp(R.params.data(), M.params.data(), sizeof(float) * M.n_params) == 0);
    CHECK(config_meta(R.cfg) == config_meta(M.cfg));
    CHECK(R.cfg.periodic == 8);
    remove(path.c_str());
    // a copy owns its weights: its named pointers point into its own buffers, and outlive the original
    Model* tmp = new Model(M);
    Model C;
    C = *tmp;
    delete tmp;
    CHECK(C.w.tok_emb == C.params.data());
    CHECK(C.g.layers[1].w2 == C.grads.data() + (C.w.layers[1].w2 - C.params.data()));
    CHECK(C.w.proc[0].gate[0] == M.w.proc[0].gate[0]);
}

static int error_code(const std::function<void()>& f, std::string* msg = nullptr) {
    try { f(); } catch (BtError& e) { if (msg) *msg = e.what(); printf("  -> %s\n", e.what()); return e.code; }
    return 0;
}
static void write_bytes(const std::string& path, const std::string& bytes) {
    FILE* f = fopen(path.c_str(), "wb");
    fwrite(bytes.data(), 1, bytes.size(), f);
    fclose(f);
}
static std::string read_bytes(const std::string& path) {
    std::ifstream f(path, std::ios::binary);
    return std::string((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
}

TEST_CASE("bad input gets a clear error (exit code 2), never a crash") {
    Model M;
    tiny_model(M, false, 42);
    std::string good = tmp_path("good.safetensors"), bad = tmp_path("bad.safetensors");
    save_model(M, good);
    std::string bytes = read_bytes(good), msg;
    Model X;
    CHECK(error_code([&] { load_model(X, "/tmp/does/not/exist.safetensors"); }) == 2);
    write_bytes(bad, bytes.substr(0, 5));
    CHECK(error_code([&] { load_model(X, bad); }) == 2);
    write_bytes(bad, bytes.substr(0, bytes.size() / 2));   // truncated in the data
    CHECK(error_code([&] { load_model(X, bad); }, &msg) == 2);
    std::string huge = bytes;
    huge[6] = 0x7f;                                       // header length far past the end
    write_bytes(bad, huge);
    CHECK(error_code([&] { load_model(X, bad); }) == 2);
    std::string garbled = bytes;
    garbled[8] = '\x01';                                  // broken JSON: the header's first '{'
    write_bytes(bad, garbled);
    CHECK(error_code([&] { load_model(X, bad); }, &msg) == 2);
    CHECK(msg.find("bad JSON") != std::string::npos);
    garbled = bytes;
    garbled[bytes.find("F32")] = 'I';                     // a dtype bt does not read ("I32")
    write_bytes(bad, garbled);
    CHECK(error_code([&] { load_model(X, bad); }, &msg) == 2);
    CHECK(msg.find("dtype") != std::string::npos);
    std::string meta = bytes;                             // config metadata out of range
    size_t at = meta.find("\"n_layers\":\"2\"");
    REQUIRE(at != std::string::npos);
    meta[at + 12] = '0';
    write_bytes(bad, meta);
    CHECK(error_code([&] { load_model(X, bad); }, &msg) == 2);
    CHECK(msg.find("n_layers") != std::string::npos);
    // a checkpoint of another config: a tensor of the wrong shape
    Model Y;
    Config c2 = tiny_config(false);
    c2.F = 48;
    model_build(Y, c2);
    std::vector<OutTensor> ts;
    for (auto& p : Y.table) ts.push_back({p.name, p.shape, Y.params.data() + p.offset});
    write_safetensors(bad, ts, config_meta(M.cfg));
    CHECK(error_code([&] { load_model(X, bad); }, &msg) == 2);
    CHECK(msg.find("shape") != std::string::npos);
    // the command line
    auto parse = [](std::vector<const char*> argv) {
        Args a;
        parse_args(a, (int)argv.size(), (char**)argv.data());
        return a;
    };
    CHECK(error_code([&] { parse({"bt", "train", "--bogus", "1"}); }) == 2);
    CHECK(error_code([&] { parse({"bt", "train", "--steps"}); }) == 2);
    CHECK(error_code([&] { parse({"bt", "frobnicate"}); }) == 2);
    CHECK(error_code([&] { parse({"bt", "train", "--steps", "-5"}).integer("steps", 0, 1000000); }) == 2);
    CHECK(error_code([&] { Config c = tiny_config(false); c.NH = 3; validate_config(c); }) == 2);
    CHECK(error_code([&] { Config c = tiny_config(false); c.L = 0; validate_config(c); }) == 2);
    // characters outside the vocabulary, named with their position
    CHECK(error_code([&] { tokenize("1*4-0+3\n1*4=4X", "prompt"); }, &msg) == 2);
    CHECK(msg.find("line 2, column 6") != std::string::npos);
    write_bytes(bad, "1+2\n#3$\n\n1+2?\n#3$\n");
    CHECK(error_code([&] { read_examples(bad); }, &msg) == 2);
    CHECK(msg.find("line 4") != std::string::npos);
    write_bytes(bad, "1+2\n3\n");
    CHECK(error_code([&] { read_examples(bad); }) == 2);
    // longer than the context, also from inside the parallel evaluation loop (no abort)
    CHECK(error_code([&] { Decoder D; decoder_init(D, M); generate(D, std::string(200, '1') + "\n"); }) == 2);
    CHECK(error_code([&] { evaluate(M, {"1+2\n#3$", std::string(200, '1') + "\n#1$"}); }) == 2);
    CHECK(error_code([&] { Rng r(1); gen_var(r, 19); }) == 2);   // more variables than letters
    // an empty prompt; an output that exists and is not a regular file (refused before training)
    CHECK(error_code([&] { cmd_generate(parse({"bt", "generate", "--ckpt", good.c_str(), "--prompt", ""})); }, &msg) == 2);
    CHECK(msg.find("empty") != std::string::npos);
    CHECK(error_code([&] { TrainRun R; train_setup(R, parse({"bt", "train", "--out", "/dev/null", "--steps", "1"})); }, &msg) == 2);
    CHECK(msg.find("not a regular file") != std::string::npos);
    CHECK(error_code([&] { write_file(std::filesystem::temp_directory_path().string(), "x"); }) == 2);
    remove(good.c_str());
    remove(bad.c_str());
}

TEST_CASE("a write that fails (the file-size limit, like a full disk) exits 1 and leaves no temporary file") {
    std::string path = std::filesystem::temp_directory_path() / strf("bt_test_fsize_%d.bin", (int)getpid());
    struct rlimit old_lim, lim;
    getrlimit(RLIMIT_FSIZE, &old_lim);
    lim = old_lim;
    lim.rlim_cur = 4096;
    auto old_sig = signal(SIGXFSZ, SIG_IGN);   // over the limit, write() fails with EFBIG instead
    REQUIRE(setrlimit(RLIMIT_FSIZE, &lim) == 0);
    int code = error_code([&] { write_file(path, std::string(1 << 16, 'x')); });
    setrlimit(RLIMIT_FSIZE, &old_lim);
    signal(SIGXFSZ, old_sig);
    CHECK(code == 1);
    CHECK(!std::filesystem::exists(path + ".tmp"));
    CHECK(!std::filesystem::exists(path));
}

// =============================================================================================
// Training keeps its work: --resume continues exactly; a NaN stops the run and keeps the last checkpoint
// =============================================================================================
// a small joint run of the processor on add, written to out (saves at steps 5 and 10)
static TrainSpec small_run(const std::string& out) {
    TrainSpec t;
    t.model = "bt"; t.joint = true; t.task = "add"; t.steps = 12; t.batch = 4; t.d_model = 16; t.layers = 2; t.heads = 2;
    t.max_seq_len = 128; t.save_every = 5; t.log_every = 100; t.seed = 3; t.out = out;
    return t;
}
static TrainSpec resume_of(const std::string& ckpt) {
    TrainSpec t;
    t.resume = ckpt;
    return t;
}

TEST_CASE("a run stopped midway and resumed ends bitwise equal to the run left alone (joint, processor on)") {
    std::string a = tmp_path("whole.safetensors"), b = tmp_path("stopped.safetensors");
    TrainRun A;
    train_setup(A, small_run(a));
    train_steps(A, 12);
    save_run(A);
    {
        TrainRun B;   // saves at step 5 and 10, then is dropped at step 8 without a word
        train_setup(B, small_run(b));
        train_steps(B, 8);
    }
    TrainRun C;
    train_setup(C, resume_of(b));
    CHECK(C.step == 5);
    train_steps(C, 12);
    save_run(C);
    REQUIRE(C.losses.size() == 12);
    CHECK(memcmp(C.losses.data(), A.losses.data(), 12 * sizeof(float)) == 0);
    CHECK(memcmp(C.M.params.data(), A.M.params.data(), A.M.n_params * sizeof(float)) == 0);
    CHECK(memcmp(C.M.m.data(), A.M.m.data(), A.M.n_params * sizeof(float)) == 0);
    CHECK(memcmp(C.M.v.data(), A.M.v.data(), A.M.n_params * sizeof(float)) == 0);
    CHECK(read_bytes(a) == read_bytes(b));
    CHECK(read_bytes(state_path(a)) == read_bytes(state_path(b)));
    printf("  losses of steps 6..12 after resuming: ");
    for (int i = 5; i < 12; i++) printf("%.4f ", C.losses[i]);
    printf("(bitwise equal to the run never stopped)\n");

    // what --resume refuses
    std::string msg;
    TrainRun X;
    CHECK(error_code([&] { TrainSpec t = resume_of(b); t.lr = 0.1; train_setup(X, t); }, &msg) == 2);
    CHECK(msg.find("--lr") != std::string::npos);
    CHECK(error_code([&] { train_setup(X, resume_of("/tmp/bt_no_such_run.safetensors")); }) == 2);
    std::string mixed = read_bytes(a);   // a checkpoint from step 12 beside a state from step 5
    TrainRun D;
    train_setup(D, small_run(b));
    train_steps(D, 5);
    save_run(D);
    write_bytes(b, mixed);
    CHECK(error_code([&] { TrainRun Y; train_setup(Y, resume_of(b)); }, &msg) == 2);
    CHECK(msg.find("step 12") != std::string::npos);
    for (auto& p : {a, b}) { remove(p.c_str()); remove(state_path(p).c_str()); }
}

TEST_CASE("a NaN loss stops the run (exit 1) and leaves the last good checkpoint") {
    std::string path = tmp_path("nan.safetensors");
    TrainRun R;
    train_setup(R, small_run(path));
    train_steps(R, 7);   // saved at step 5
    std::vector<float> saved_at_7 = R.M.params;
    R.M.w.tok_emb[5 * R.M.cfg.C] = NAN;   // one weight of the digit '1' goes bad
    std::string msg;
    CHECK(error_code([&] { train_steps(R, 12); }, &msg) == 1);
    CHECK(msg.find("the loss is") != std::string::npos);
    CHECK(msg.find("nan") != std::string::npos);
    CHECK(R.step == 7);
    SafeFile f = read_safetensors(path);
    CHECK(f.meta.at("step") == "5");
    Model M;
    load_model(M, path);
    bool finite = true;
    for (float x : M.params) finite &= std::isfinite(x);
    CHECK(finite);
    remove(path.c_str());
    remove(state_path(path).c_str());
}

TEST_CASE("inputs the fuzzers found (and their seeds) end in success or a clear error, under the same checks") {
    int n = 0;
    for (const char* target : {"checkpoint", "data"})
        for (auto& e : std::filesystem::directory_iterator(std::string("tests/fuzz/") + target)) {
            std::string bytes = read_bytes(e.path().string());
            if (target[0] == 'c') fuzz_checkpoint(bytes);
            else fuzz_data(bytes);
            n++;
        }
    printf("  replayed %d inputs from tests/fuzz/\n", n);
    CHECK(n >= 4);
    std::string msg;
    CHECK(error_code([&] { parse_safetensors(read_bytes("tests/fuzz/checkpoint/shape-overflows-uint64.safetensors"), "x"); },
                     &msg) == 2);
    CHECK(msg.find("more elements") != std::string::npos);
}

TEST_CASE("a training step and a decoding step allocate nothing once the buffers are built") {
    for (int proc = 0; proc <= 1; proc++) {
        Model M;
        tiny_model(M, proc, 61);
        RunState S;
        int T = tiny_batch(S, M.cfg, true);
        TrainMode mode;
        mode.use_proc = proc;
        OptConfig o;
        long counts[3];
        for (int t = 0; t < 3; t++) {   // the first step may grow the per-thread matmul scratch
            long before = g_allocations;
            std::fill(M.grads.begin(), M.grads.end(), 0.0f);
            forward_sequence(M, S, T, mode);
            backward_sequence(M, S, T, mode);
            optimizer_step(M, o, t, mode);
            counts[t] = g_allocations - before;
        }
        Decoder D;
        decoder_init(D, M);
        std::vector<int> toks = tokenize("1*4-0+3\n1*4=4\n4-0=4\n", "test");
        decoder_feed(D, toks.data(), 3);   // warm up
        long before = g_allocations;
        for (size_t i = 3; i < toks.size(); i++) { decoder_feed(D, &toks[i], 1); decoder_argmax(D); }
        long dec = g_allocations - before;
        printf("  %s: allocations in training steps 1, 2, 3: %ld, %ld, %ld; in %zu decoding steps: %ld\n",
               proc ? "processor on" : "backbone", counts[0], counts[1], counts[2], toks.size() - 3, dec);
        CHECK(counts[1] == 0);
        CHECK(counts[2] == 0);
        CHECK(dec == 0);
    }
}

TEST_CASE("bt experiment: every arm runs, results.md and plots are written, a second run reuses every finished run") {
    std::string dir = tmp_path("experiment");
    std::filesystem::remove_all(dir);
    auto exp_args = [&] {
        return args_of({"bt", "experiment", "--task", "add", "--seeds", "1", "--stage1", "3", "--stage2", "2", "--steps",
                        "3", "--d-model", "16", "--layers", "1", "--heads", "2", "--batch", "4", "--n", "2", "--results", dir});
    };
    double t0 = now_seconds();
    cmd_experiment(exp_args());
    double first = now_seconds() - t0;
    int runs = 0;
    for (auto& e : std::filesystem::directory_iterator(dir + "/add/runs")) runs += e.path().extension() == ".json";
    int arms = 1;   // the v4 stage-1 backbone
    for (auto& a : ARMS) arms += a.name[0] != 0;
    CHECK(runs == arms);
    for (const char* f : {"results.md", "accuracy_v4.svg", "accuracy_v1.svg", "loss_v4.svg", "loss_v1.svg", "reconsolidation.svg"})
        CHECK(std::filesystem::exists(dir + "/add/" + f));
    std::string md = read_bytes(dir + "/add/results.md");
    CHECK(md.find("| bt-joint |") != std::string::npos);
    CHECK(md.find("| pause4-frozen |") != std::string::npos);
    RunResult r;
    CHECK(read_run_json(dir + "/add/runs/v4-bt-s1.json", &r));
    CHECK(r.loss.size() == 2);
    CHECK(r.sizes.size() == (size_t)(TASKS[TASK_ADD].train_hi - TASKS[TASK_ADD].train_lo + 1 + TASKS[TASK_ADD].ood_hi -
                                     TASKS[TASK_ADD].ood_lo + 1));
    // --steps equals --stage1 here, so v1's vanilla is taken from v4's backbone: check that it is exactly what
    // training it on its own gives, and that its results carry v1's name
    std::string runs_dir = dir + "/add/runs/";
    CHECK(read_bytes(runs_dir + "v1-vanilla-s1.safetensors") == read_bytes(runs_dir + "v4-backbone-s1.safetensors"));
    TrainRun alone;
    alone.quiet = true;
    TrainSpec t;
    t.seed = 1; t.steps = 3; t.task = "add"; t.batch = 4; t.model = "vanilla"; t.d_model = 16; t.layers = 1; t.heads = 2;
    t.out = dir + "/alone.safetensors";
    train_setup(alone, t);
    train_steps(alone, 3);
    save_run(alone);
    CHECK(read_bytes(dir + "/alone.safetensors") == read_bytes(runs_dir + "v1-vanilla-s1.safetensors"));
    RunResult v1v, v4b;
    REQUIRE(read_run_json(runs_dir + "v1-vanilla-s1.json", &v1v));
    REQUIRE(read_run_json(runs_dir + "v4-backbone-s1.json", &v4b));
    CHECK(v1v.regime == "v1");
    CHECK(v1v.arm == "vanilla");
    CHECK(v1v.id_answer == v4b.id_answer);
    CHECK(v1v.loss == v4b.loss);
    std::string one = dir + "/add/runs/v1-bt-joint-s1.json";
    auto stamp = std::filesystem::last_write_time(one);
    std::string before = read_bytes(one);
    t0 = now_seconds();
    cmd_experiment(exp_args());   // everything is found done: only the report is written again
    printf("  %d runs in %.1f s; the second call reused them in %.1f s\n", runs, first, now_seconds() - t0);
    CHECK(std::filesystem::last_write_time(one) == stamp);   // not rerun, not rewritten
    CHECK(read_bytes(one) == before);
    CHECK(read_bytes(dir + "/add/results.md") == md);   // the report from the kept runs is the one made after training
    std::filesystem::remove_all(dir);
}

// The run records are kept in git, the checkpoints are not: a fresh clone has only the records.
TEST_CASE("bt experiment: a checkpoint that is not here is trained again and checked against its record") {
    std::string dir = tmp_path("experiment-remake");
    std::filesystem::remove_all(dir);
    auto exp_args = [&] {
        return args_of({"bt", "experiment", "--task", "add", "--seeds", "1", "--stage1", "3", "--stage2", "2", "--steps",
                        "3", "--d-model", "16", "--layers", "1", "--heads", "2", "--batch", "4", "--n", "2", "--arms",
                        "bt,bt-joint,evict4", "--results", dir});
    };
    cmd_experiment(exp_args());
    std::string runs = dir + "/add/runs/";
    std::string backbone = read_bytes(runs + "v4-backbone-s1.safetensors"), record = read_bytes(runs + "v4-backbone-s1.json");
    RunResult bt_first;
    REQUIRE(read_run_json(runs + "v4-bt-s1.json", &bt_first));
    // a clone: no checkpoint at all; v4's bt and the evict arm left to run
    for (auto& e : std::filesystem::directory_iterator(runs))
        if (e.path().extension() == ".safetensors") std::filesystem::remove(e.path());
    std::filesystem::remove(runs + "v4-bt-s1.json");
    std::filesystem::remove(runs + "v1-evict4-s1.json");
    cmd_experiment(exp_args());
    CHECK(read_bytes(runs + "v4-backbone-s1.safetensors") == backbone);   // trained again: the same bytes
    CHECK(read_bytes(runs + "v1-vanilla-s1.safetensors") == backbone);    // and v1's copy of it, for evict4
    CHECK(read_bytes(runs + "v4-backbone-s1.json") == record);            // its record untouched
    CHECK(std::filesystem::exists(runs + "v4-bt-s1.json"));
    CHECK(std::filesystem::exists(runs + "v1-evict4-s1.json"));
    CHECK(std::filesystem::exists(runs + "v1-bt-joint-s1.safetensors"));  // for the heatmap
    RunResult bt_again;   // v4's bt from the remade backbone: the run it was the first time
    REQUIRE(read_run_json(runs + "v4-bt-s1.json", &bt_again));
    CHECK(bt_again.loss == bt_first.loss);
    CHECK(bt_again.curve_id == bt_first.curve_id);
    CHECK(bt_again.answer == bt_first.answer);
    // a record the checkpoint does not match: a clear error, not a silent mix of two runs
    std::filesystem::remove(runs + "v4-backbone-s1.safetensors");
    std::filesystem::remove(runs + "v4-bt-s1.json");
    std::string tampered = record;
    size_t at = tampered.find("\"id_answer\":");
    REQUIRE(at != std::string::npos);
    tampered.replace(at, tampered.find(',', at) - at, "\"id_answer\":0.9999");
    write_bytes(runs + "v4-backbone-s1.json", tampered);
    std::string msg;
    CHECK(error_code([&] { cmd_experiment(exp_args()); }, &msg) == 2);
    CHECK(msg.find("differs from its record") != std::string::npos);
    std::filesystem::remove_all(dir);
}

TEST_CASE("bt experiment --v1-seeds: v4's arms run for --seeds seeds, v1's for --v1-seeds, and each claim pairs what ran") {
    std::string dir = tmp_path("experiment-seeds");
    std::filesystem::remove_all(dir);
    cmd_experiment(args_of({"bt", "experiment", "--task", "add", "--seeds", "2", "--v1-seeds", "1", "--stage1", "3",
                            "--stage2", "2", "--steps", "3", "--d-model", "16", "--layers", "1", "--heads", "2", "--batch",
                            "4", "--n", "2", "--arms", "bt,bt-joint", "--results", dir}));
    std::string runs = dir + "/add/runs/";
    for (const char* f : {"v4-backbone-s2", "v4-bt-s2", "v4-vanillapextra-s2", "v1-vanilla-s1", "v1-bt-joint-s1"})
        CHECK_MESSAGE(std::filesystem::exists(runs + f + ".json"), f);
    for (const char* f : {"v1-vanilla-s2", "v1-bt-joint-s2"}) CHECK_MESSAGE(!std::filesystem::exists(runs + f + ".json"), f);
    std::string md = read_bytes(dir + "/add/results.md");
    CHECK(md.find("--seeds 2 --v1-seeds 1 ") != std::string::npos);
    CHECK(md.find("--arms bt,bt-joint --results " + dir + "`") != std::string::npos);   // the header reruns it
    // the final-ID claims table: v4's bt against vanilla+extra over 2 seeds, v1's bt-joint against vanilla over 1
    size_t table = md.find("### final ID answer");
    REQUIRE(table != std::string::npos);
    CHECK(md.find("| bt | vanilla+extra | 2 |", table) != std::string::npos);
    CHECK(md.find("| bt-joint | vanilla | 1 |", table) != std::string::npos);
    std::filesystem::remove_all(dir);
    // --first-seed: another process's share of the seeds; this one runs seed 2 only
    cmd_experiment(args_of({"bt", "experiment", "--task", "add", "--seeds", "2", "--first-seed", "2", "--stage1", "3",
                            "--stage2", "2", "--steps", "3", "--d-model", "16", "--layers", "1", "--heads", "2", "--batch",
                            "4", "--n", "2", "--arms", "bt", "--results", dir}));
    for (const char* f : {"v4-backbone-s2", "v4-bt-s2", "v1-vanilla-s2"}) CHECK_MESSAGE(std::filesystem::exists(runs + f + ".json"), f);
    for (const char* f : {"v4-backbone-s1", "v4-bt-s1", "v1-vanilla-s1"}) CHECK_MESSAGE(!std::filesystem::exists(runs + f + ".json"), f);
    CHECK(read_bytes(dir + "/add/results.md").find("--seeds 2 --first-seed 2 ") != std::string::npos);
    std::filesystem::remove_all(dir);
}

#ifdef _OPENMP
static const bool NO_OPENMP = false;
#else
static const bool NO_OPENMP = true;   // one thread only: the test below has nothing to compare (skipped)
#endif
TEST_CASE("results are identical for 1 and 2 threads (three training steps with the processor)" *
          doctest::skip(NO_OPENMP)) {
#ifdef _OPENMP
    std::vector<float> out[2];
    for (int th = 1; th <= 2; th++) {
        omp_set_num_threads(th);
        Model M;
        tiny_model(M, true, 43);
        RunState S;
        int T = tiny_batch(S, M.cfg, true);
        TrainMode mode;
        mode.use_proc = true;
        OptConfig o;
        for (int t = 0; t < 3; t++) {
            std::fill(M.grads.begin(), M.grads.end(), 0.0f);
            forward_sequence(M, S, T, mode);
            backward_sequence(M, S, T, mode);
            optimizer_step(M, o, t, mode);
        }
        out[th - 1] = M.params;
    }
    omp_set_num_threads(2);
    CHECK(memcmp(out[0].data(), out[1].data(), sizeof(float) * out[0].size()) == 0);
#endif
}

// =============================================================================================
// The four steps of the bottleneck step, each on its own
// =============================================================================================
TEST_CASE("select: top-k by mean attention mass, ties to the smaller position (against a sort)") {
    Rng r(51);
    int B = 3, NH = 2, T = 12, s = 7, e = 10, k = 3;
    std::vector<float> att((long)T * B * NH * T, 0.0f), scores((long)B * T);
    for (auto& x : att) x = r.uniform();
    for (int b = 0; b < B; b++)   // sequence 2: every score equal, so ties decide
        for (int t = 0; t < T; t++)
            for (int h = 0; h < NH; h++)
                for (int p = 0; p < T; p++) att[(((long)t * B + 2) * NH + h) * T + p] = 0.25f;
    std::vector<int> sel((long)(T + k) * B);
    int nS = select_forward(sel.data(), scores.data(), att.data(), s, e, B, NH, T, k, 0);
    CHECK(nS == k + e - s);
    for (int b = 0; b < B; b++) {
        std::vector<std::pair<double, int>> order;   // (-score, position): a plain sort
        for (int p = 0; p < s; p++) {
            double sc = 0;
            for (int t = s; t < e; t++)
                for (int h = 0; h < NH; h++) sc += att[(((long)t * B + b) * NH + h) * T + p];
            order.push_back({-sc, p});
        }
        std::sort(order.begin(), order.end());
        std::vector<int> want;
        for (int i = 0; i < k; i++) want.push_back(order[i].second);
        std::sort(want.begin(), want.end());
        for (int t = s; t < e; t++) want.push_back(t);
        std::vector<int> got;
        for (int n = 0; n < nS; n++) got.push_back(sel[(long)n * B + b]);
        CHECK(got == want);
    }
    CHECK(sel[0 * B + 2] == 0);   // the tie case took positions 0, 1, 2
    CHECK(sel[2 * B + 2] == 2);
    // fewer older positions than k: take them all; periodic: the whole cache
    CHECK(select_forward(sel.data(), scores.data(), att.data(), 2, 5, B, NH, T, k, 0) == 2 + 3);
    CHECK(select_forward(sel.data(), scores.data(), att.data(), 8, 12, B, NH, T, k, 1) == 12);
}

TEST_CASE("finite differences: gather, transform and write back, each on its own") {
    Rng r(52);
    Model M;
    tiny_model(M, true, 53);
    const Config& c = M.cfg;
    int B = 2, T = 9, nS = 4;
    std::vector<int> sel = {1, 0, 3, 2, 5, 6, 8, 7};   // (nS,B): distinct positions per sequence
    {   // gather: u = [K[sel] | V[sel]]
        auto K = randv(r, (long)T * B * c.C), V = randv(r, (long)T * B * c.C), rr = randv(r, (long)nS * B * 2 * c.C);
        std::vector<float> u(rr.size()), dK(K.size(), 0.0f), dV(V.size(), 0.0f);
        gather_backward(dK.data(), dV.data(), rr.data(), sel.data(), nS, B, c.C);
        auto loss = [&]() { gather_forward(u.data(), K.data(), V.data(), sel.data(), nS, B, c.C); return dotd(rr, u.data()); };
        CHECK(fd_check("gather", loss, {{"K", K.data(), (long)K.size(), dK.data()}, {"V", V.data(), (long)V.size(), dV.data()}}));
    }
    {   // transform: delta = W_out RMSNorm(Blocks(W_in u)), every weight of layer 0's processor
        RunState S;
        run_state_build(S, c, T, B, true);
        ProcActs& p = S.pa;
        memcpy(p.sel, sel.data(), sizeof(int) * sel.size());
        auto u0 = randv(r, (long)nS * B * 2 * c.C), rr = randv(r, (long)nS * B * 2 * c.C);
        auto loss = [&]() {
            memcpy(p.u, u0.data(), sizeof(float) * u0.size());
            transform_forward(p, M.w.proc[0], nullptr, c, nS, B);
            return dotd(rr, p.delta);
        };
        loss();
        std::fill(M.grads.begin(), M.grads.end(), 0.0f);
        std::vector<float> du(u0.size(), 0.0f);
        memcpy(p.ddelta, rr.data(), sizeof(float) * rr.size());
        transform_backward(du.data(), M.g.proc[0], S, M.w.proc[0], c, nS, B);
        std::vector<FdInput> ins = {{"u", u0.data(), (long)u0.size(), du.data()}};
        for (auto& pi : M.table)
            if (pi.name.rfind("proc.0.", 0) == 0 && pi.name != "proc.0.gate")
                ins.push_back({pi.name, M.params.data() + pi.offset, pi.numel, M.grads.data() + pi.offset});
        CHECK(fd_check("transform", loss, ins));
    }
    {   // write back: K[sel] += sigmoid(g) delta[:C], V[sel] += sigmoid(g) delta[C:]
        auto K0 = randv(r, (long)T * B * c.C), V0 = randv(r, (long)T * B * c.C), delta = randv(r, (long)nS * B * 2 * c.C);
        auto rK = randv(r, K0.size()), rV = randv(r, V0.size());
        float gate = 0.3f, dgate = 0.0f;
        std::vector<float> K, V, ddelta(delta.size());
        auto loss = [&]() {
            K = K0; V = V0;
            write_back_forward(K.data(), V.data(), delta.data(), &gate, sel.data(), nS, B, c.C);
            return dotd(rK, K.data()) + dotd(rV, V.data());
        };
        write_back_backward(ddelta.data(), &dgate, rK.data(), rV.data(), delta.data(), &gate, sel.data(), nS, B, c.C);
        CHECK(fd_check("write_back", loss, {{"delta", delta.data(), (long)delta.size(), ddelta.data()}, {"gate", &gate, 1, &dgate}}));
    }
}

// =============================================================================================
// bt probe: the probe trainer, the update statistics, the future labels, the collection
// =============================================================================================
TEST_CASE("probe_fit recovers a planted linear signal and reports chance on noise") {
    Rng r(41);
    int D = 12, K = 5;
    long N = 4000;
    std::vector<float> x(N * D), Wt(K * D);
    for (auto& v : x) v = r.normal() * 3.0f + 1.0f;   // off-centre and scaled: the probe standardises
    for (auto& v : Wt) v = r.normal();
    std::vector<int> y(N), noise(N);
    std::vector<char> test(N);
    for (long n = 0; n < N; n++) {
        int best = 0;   // y = argmax_k Wt[k] . x
        double bv = -1e30;
        for (int k = 0; k < K; k++) {
            double s = 0;
            for (int d = 0; d < D; d++) s += Wt[k * D + d] * x[n * D + d];
            if (s > bv) { bv = s; best = k; }
        }
        y[n] = best;
        noise[n] = r.randint(0, K - 1);
        test[n] = n % 2;
    }
    ProbeFit f = probe_fit(x.data(), y.data(), test.data(), N, D, K, 7);
    CHECK(f.n_train == 2000);
    CHECK(f.n_test == 2000);
    CHECK(f.test_acc > 0.95);
    CHECK(f.chance < 0.5);
    // the same features, labels independent of them: held-out accuracy is chance (1/K) within
    // four standard errors (sqrt(0.2 * 0.8 / 2000) = 0.009), though the probe fits its training half
    ProbeFit g = probe_fit(x.data(), noise.data(), test.data(), N, D, K, 7);
    CHECK(std::fabs(g.test_acc - 1.0 / K) < 0.04);
    CHECK(std::fabs(g.chance - 1.0 / K) < 0.04);
    CHECK(g.train_acc > g.test_acc);
    // chance is the most common training label scored on the test rows
    std::vector<int> skew(N);
    for (long n = 0; n < N; n++) skew[n] = (n / 2) % 10 < 7 ? 2 : 3;   // 70% label 2 in both halves
    CHECK(probe_fit(x.data(), skew.data(), test.data(), N, D, K, 7).chance == doctest::Approx(0.7));
}

TEST_CASE("update statistics on known tiny tensors") {
    float pre[2] = {3, 4}, post[2] = {3.3f, 4.4f};
    CHECK(rel_update(pre, post, 2) == doctest::Approx(0.1));
    float zero2[2] = {0, 0};
    CHECK(rel_update(zero2, post, 2) == 0.0);
    // one firing after segment [3,5) with C = 2: sel = {1 (recalled, in the question: q_end 2), 3, 4}
    // u: the values before; K, V (T = 5, C = 2): the cache after
    int sel[3] = {1, 3, 4};
    float u[3 * 4] = {1, 0, 0, 2,    // position 1: K (1,0), V (0,2)
                      0, 1, 1, 1,    // position 3: K (0,1), V (1,1)
                      2, 0, 0, 1};   // position 4: K (2,0), V (0,1)
    float K[5 * 2] = {9, 9, 1.5f, 0, 9, 9, 0, 1, 2, 1};   // ΔK: pos 1 (0.5,0) 0.5; pos 3 none 0; pos 4 (0,1) 0.5
    float V[5 * 2] = {9, 9, 0, 2, 9, 9, 1, 2, 0, 1};      // ΔV: pos 1 none 0; pos 3 (0,1) 1/sqrt2; pos 4 none 0
    UpdateStats U;
    update_stats_init(U, 2);
    update_stats_add(U, 1, 3, 5, sel, 3, u, K, V, 2, 2);
    CHECK(U.n[0][1] == 2);
    CHECK(U.n[1][1] == 1);
    CHECK(U.dk[1][1] == doctest::Approx(0.5));
    CHECK(U.dv[1][1] == doctest::Approx(0.0));
    CHECK(U.dk[0][1] == doctest::Approx(0.0 + 0.5));
    CHECK(U.dv[0][1] == doctest::Approx(1.0 / sqrt(2.0)));
    CHECK(U.picks[1] == 1);
    CHECK(U.picks_question[1] == 1);
    CHECK(U.uniform_question[1] == doctest::Approx(2.0 / 3.0));   // 2 of the 3 older positions are the question
    CHECK(U.n[0][0] == 0);   // layer 0 untouched
}

TEST_CASE("future labels: the next line's quantities, per task") {
    int res, opd;
    auto lines = split_lines("1*4-0+3\n1*4=4\n4-0=4\n4+3=7\n#7$");
    future_labels(TASK_CHAIN, lines, 3, &res, &opd);
    CHECK(res == 7); CHECK(opd == 3);
    lines = split_lines("t=b+0;a=o-2;q=x+7;o=q*4;x=0\nx=0\nq=x+7=7\no=q*4=8\na=o-2=6\n#6$");
    future_labels(TASK_VAR, lines, 1, &res, &opd);
    CHECK(res == 0); CHECK(opd == -1);   // "x=0" has no operand
    future_labels(TASK_VAR, lines, 3, &res, &opd);
    CHECK(res == 8); CHECK(opd == 4);
    lines = split_lines("891+721\n8+7+0=5,1\n9+2+1=2,1\n1+1+1=3,0\n#523$");
    future_labels(TASK_ADD, lines, 2, &res, &opd);
    CHECK(res == 1); CHECK(opd == 9);
    future_labels(TASK_ADD, lines, 3, &res, &opd);
    CHECK(res == 0); CHECK(opd == 1);
    lines = split_lines("21*43\n840,840\n0630,8040\n#8040$");   // 12 x 34 = 408
    future_labels(TASK_MUL, lines, 1, &res, &opd);
    CHECK(res == 8); CHECK(opd == 4);
    future_labels(TASK_MUL, lines, 2, &res, &opd);
    CHECK(res == 0); CHECK(opd == 3);
}

TEST_CASE("probe collection: entries before the first rewrite equal the backbone's; after = the cache after the rewrite") {
    Model M;
    tiny_model(M, true, 23);
    Rng r(3);
    std::string text = gen_chain(r, 3);   // 5 segments: the question, 3 lines, the answer
    ProbeData P;
    P.L = M.cfg.L; P.C = M.cfg.C;
    update_stats_init(P.U, P.L);
    probe_collect(P, M, M, TASK_CHAIN, text, 0);
    std::vector<int> toks = tokenize(text, "t");
    RunState S;
    run_state_build(S, M.cfg, (int)toks.size(), 1, false);
    memcpy(S.tokens, toks.data(), sizeof(int) * toks.size());
    std::vector<int> b = segment_bounds(M.cfg, S, (int)toks.size());
    REQUIRE(b.size() == 6);
    CHECK((int)P.pos.size() == b[4]);   // every position but the answer line's
    long LC = (long)P.L * P.C;
    // segment 0 is computed before any rewrite, so both models wrote the same keys there (up to the
    // rounding of a segment pass against one full pass); later lines read a rewritten cache
    double seg0_diff = 0, later_diff = 0;
    bool after_moved = true;
    for (int p = 0; p < b[4]; p++)
        for (long i = 0; i < LC; i++) {
            double d = std::fabs(P.feat[STAGE_BACKBONE][0][p * LC + i] - P.feat[STAGE_BEFORE][0][p * LC + i]);
            (p < b[1] ? seg0_diff : later_diff) = std::max(p < b[1] ? seg0_diff : later_diff, d);
        }
    for (int p = 0; p < b[4]; p++) {
        double d = 0;
        for (long i = 0; i < LC; i++) d += std::fabs(P.feat[STAGE_AFTER][1][p * LC + i] - P.feat[STAGE_BEFORE][1][p * LC + i]);
        after_moved &= d > 0;
    }
    CHECK(seg0_diff < 1e-5);
    CHECK(later_diff > 1e-2);
    CHECK(after_moved);
    // labels: the question's entries carry line 1's quantities; the last line's entries none
    int res, opd;
    future_labels(TASK_CHAIN, split_lines(text), 1, &res, &opd);
    CHECK(P.label[PROBE_RESULT][0] == res);
    CHECK(P.label[PROBE_OPERAND][b[1] - 1] == opd);
    CHECK(P.label[PROBE_RESULT][b[4] - 1] == -1);
    CHECK(P.label[PROBE_TOKEN][2] == toks[2]);
    // every consolidated entry of 3 boundaries x 2 layers was counted, and k = 2 recalls after the first
    CHECK(P.U.n[0][0] == b[4]);
    CHECK(P.U.n[1][1] == 2 * 3);
}

// =============================================================================================
// The latent-rollout baseline (tests/MODEL_SPEC.md, "Latent rollout"): P latent positions after
// every newline, each fed the state before it
// =============================================================================================
TEST_CASE("latent rollout matches PyTorch: latent inputs, logits, loss, every gradient") {
    Model M;
    SafeFile f = load_reference(M, ref_path("ref_latent.safetensors"));
    REQUIRE(M.cfg.latent == 2);
    RunState S;
    int T = load_ref_tokens(S, M, f, true);
    int B = S.B, C = M.cfg.C;
    TrainMode mode;   // a latent model walks its segments by itself
    float loss = forward_sequence(M, S, T, mode);
    // the fed-back vectors: x0 at each latent position, in position order
    std::vector<float> got;
    for (int b = 0; b < B; b++)
        for (int t = 0; t < T; t++)
            if (S.h_tokens[(long)t * B + b] == PAUSE) got.insert(got.end(), S.xs[0] + ((long)t * B + b) * C, S.xs[0] + ((long)t * B + b + 1) * C);
    const Tensor& want = f.tensors.at("latent_inputs");
    REQUIRE((long)got.size() == (long)want.data.size());
    CHECK(check_tensor("latent_inputs", got.data(), want.data.data(), got.size(), 1e-4f));
    std::vector<float> logits = batch_major(S.logits, T, B, M.cfg.V);
    CHECK(check_tensor("logits", logits.data(), f.tensors.at("logits").data.data(), logits.size(), 1e-4f));
    CHECK(check_tensor("loss", &loss, f.tensors.at("loss").data.data(), 1, 1e-5f));
    backward_sequence(M, S, T, mode);
    CHECK(check_grads(M, f, ""));
}

static Config tiny_latent_config(int P) {
    Config c = tiny_config(false);
    c.latent = P;
    return c;
}
static int tiny_latent_batch(RunState& S, const Config& c, bool train, uint64_t seed = 5) {
    Rng r(seed);
    std::vector<std::string> texts = {insert_pauses(gen_chain(r, 3), c.latent), insert_pauses(gen_chain(r, 3), c.latent)};
    run_state_build(S, c, (int)texts[0].size() + 1, 2, train);
    return load_batch(S, texts);
}

TEST_CASE("finite differences through the latent chain: every parameter (P = 2)") {
    Model M;
    model_build(M, tiny_latent_config(2));
    randomize(M, 91, 0.3f);
    RunState S;
    int T = tiny_latent_batch(S, M.cfg, true);
    TrainMode mode;
    model_loss(M, S, T, mode);
    backward_sequence(M, S, T, mode);
    std::vector<float> g = M.grads;
    bool ok = true;
    for (auto& p : M.table)
        ok &= fd_check(p.name, [&]() { return model_loss(M, S, T, mode); },
                       {{p.name, M.params.data() + p.offset, p.numel, g.data() + p.offset}}, 1e-2f, 2e-2f);
    CHECK(ok);
    // and the fed-back states matter: a pause model on the same weights (the PAUSE embedding read
    // there instead) has other gradients. (That alone would not show the chain's gradient is
    // right; the finite differences above do.)
    double diff = 0;
    Model Mp;
    Config cp = tiny_config(false);
    cp.pause = 2;
    model_build(Mp, cp);
    Mp.params = M.params;
    RunState Sp;
    int Tp = tiny_latent_batch(Sp, M.cfg, true);
    CHECK(Tp == T);
    model_loss(Mp, Sp, T, mode);
    backward_sequence(Mp, Sp, T, mode);
    for (long i = 0; i < M.n_params; i++) diff = std::max(diff, (double)fabsf(Mp.grads[i] - g[i]));
    printf("  a pause model on the same weights: gradients differ by up to %.3e\n", diff);
    CHECK(diff > 1e-3);
}

TEST_CASE("latent decoding (one Decoder, and batched) gives bt score's logits and the same texts") {
    Model M;
    model_build(M, tiny_latent_config(2));
    randomize(M, 93, 0.3f);
    RunState S;
    int T = tiny_latent_batch(S, M.cfg, false);
    forward_sequence(M, S, T, TrainMode());   // the path bt score uses
    for (int b = 0; b < S.B; b++) {
        auto want = seq_logits(S, T, b, M.cfg.V), got = decode_logits(M, S, T, b);
        CHECK(check_tensor(strf("latent decode vs score, sequence %d", b), got.data(), want.data(), want.size(), 1e-4f));
    }
    // generate feeds the latent positions after every newline it writes, and never emits them
    Decoder D;
    decoder_init(D, M);
    std::string out = generate(D, "1+2\n");
    CHECK(out.find('_') == std::string::npos);
    CHECK(std::count(D.S.h_tokens, D.S.h_tokens + D.S.n_tok, PAUSE) >= 2);
    BatchDecoder BD;
    batch_init(BD, M, 7);
    CHECK(check_batched(M, BD, BATCH_PROMPTS, "latent 2"));
}

TEST_CASE("latent: a run stopped midway and resumed ends bitwise equal; the flags it refuses") {
    TrainSpec run;
    run.model = "latent"; run.latent = 2; run.task = "chain"; run.steps = 8; run.batch = 4; run.d_model = 16;
    run.layers = 2; run.heads = 2; run.max_seq_len = 128; run.save_every = 3; run.log_every = 100; run.seed = 4;
    auto with_out = [&](const std::string& out) { TrainSpec t = run; t.out = out; return t; };
    std::string a = tmp_path("latent_whole.safetensors"), b = tmp_path("latent_stopped.safetensors");
    TrainRun A;
    A.quiet = true;
    train_setup(A, with_out(a));
    train_steps(A, 8);
    save_run(A);
    {
        TrainRun B;
        B.quiet = true;
        train_setup(B, with_out(b));
        train_steps(B, 5);   // saved at step 3, dropped at 5
    }
    TrainRun C;
    C.quiet = true;
    train_setup(C, resume_of(b));
    CHECK(C.step == 3);
    CHECK(C.M.cfg.latent == 2);
    train_steps(C, 8);
    save_run(C);
    CHECK(read_bytes(a) == read_bytes(b));
    CHECK(read_bytes(state_path(a)) == read_bytes(state_path(b)));
    Model L;
    load_model(L, a);
    CHECK(L.cfg.latent == 2);
    for (auto& p : {a, b}) { remove(p.c_str()); remove(state_path(p).c_str()); }
    std::string msg;
    TrainRun X;
    CHECK(error_code([&] { TrainSpec t; t.latent = 2; train_setup(X, t); }, &msg) == 2);
    CHECK(msg.find("--model latent") != std::string::npos);
    CHECK(error_code([&] { TrainSpec t; t.model = "latent"; t.latent = 65; train_setup(X, t); }) == 2);
    CHECK(error_code([&] { Config c = tiny_latent_config(2); c.pause = 1; validate_config(c); }) == 2);
    CHECK(error_code([&] { Config c = tiny_config(true); c.latent = 1; validate_config(c); }) == 2);
}

// =============================================================================================
// The experiment's statistics (lab/claims.cpp) and learning-curve summaries (lab/experiment.cpp)
// =============================================================================================
TEST_CASE("statistics: the sign test, Holm and the bootstrap against independent computations") {
    // P[Bin(n, 1/2) <= k] against a sum of lgamma-based terms
    for (int n : {1, 2, 7, 10, 31})
        for (int k = 0; k <= n; k++) {
            double want = 0;
            for (int i = 0; i <= k; i++) want += exp(lgamma(n + 1.0) - lgamma(i + 1.0) - lgamma(n - i + 1.0) - n * log(2.0));
            CHECK(fabs(binomial_half_cdf(n, k) - std::min(1.0, want)) < 1e-12);
        }
    // ten seeds that agree: p = 2 / 2^10; nine of ten: 2 * 11 / 2^10; ties are dropped
    CHECK(sign_test_p(std::vector<double>(10, 0.1)) == 2.0 / 1024);
    std::vector<double> nine(9, 0.2);
    nine.push_back(-0.1);
    CHECK(fabs(sign_test_p(nine) - 22.0 / 1024) < 1e-15);
    nine.push_back(0.0);
    CHECK(fabs(sign_test_p(nine) - 22.0 / 1024) < 1e-15);
    CHECK(sign_test_p({0.0, 0.0}) == 1.0);
    // Holm: which hypotheses it rejects at level a equals the step-down procedure written out
    // (reject the smallest p while p_(j) <= a / (m - j)), for random p-values and levels
    Rng r(5);
    for (int trial = 0; trial < 200; trial++) {
        int m = 1 + (int)(r.next() % 9);
        std::vector<double> p(m);
        for (double& x : p) x = r.uniform() * r.uniform() * 0.2;
        std::vector<double> adj = holm_adjust(p);
        for (double a : {0.01, 0.05, 0.1}) {
            std::vector<int> order(m);
            for (int i = 0; i < m; i++) order[i] = i;
            std::sort(order.begin(), order.end(), [&](int x, int y) { return p[x] < p[y]; });
            std::vector<char> reject(m, 0);
            for (int j = 0; j < m && p[order[j]] <= a / (m - j); j++) reject[order[j]] = 1;
            for (int i = 0; i < m; i++) CHECK((adj[i] <= a) == (bool)reject[i]);
        }
    }
    // the bootstrap of {0, 1, 2}: 27 equally likely resamples, P[mean = 0] = P[mean = 2] = 1/27 >
    // 2.5%, so the 95% interval is [0, 2]; a constant sample has a zero-width interval; the same
    // seed gives the same interval
    double lo, hi, lo2, hi2;
    bootstrap_ci({0, 1, 2}, 10000, 3, &lo, &hi);
    CHECK(lo == 0.0);
    CHECK(hi == 2.0);
    bootstrap_ci({0.25, 0.25, 0.25}, 10000, 3, &lo, &hi);
    CHECK(lo == 0.25);
    CHECK(hi == 0.25);
    std::vector<double> d = {0.1, -0.3, 0.2, 0.05, 0.4, -0.1, 0.0, 0.3};
    bootstrap_ci(d, 10000, 9, &lo, &hi);
    bootstrap_ci(d, 10000, 9, &lo2, &hi2);
    CHECK(lo == lo2);
    CHECK(hi == hi2);
    double m = 0;
    for (double x : d) m += x / d.size();
    // against the normal approximation of the mean's sampling spread (sd/sqrt(n), population sd as
    // the bootstrap uses): the percentile interval lies within 30% of mean +- 1.96 se
    double v = 0;
    for (double x : d) v += (x - m) * (x - m) / d.size();
    double se = sqrt(v / d.size());
    printf("  bootstrap of 8 deltas: [%.3f, %.3f], normal approximation [%.3f, %.3f]\n", lo, hi, m - 1.96 * se, m + 1.96 * se);
    CHECK(lo < m);
    CHECK(hi > m);
    CHECK(fabs((hi - lo) / (2 * 1.96 * se) - 1) < 0.3);
}

TEST_CASE("learning curves: the area is the trapezoid mean; reach interpolates; a claim reads paired seeds") {
    CHECK(curve_area({100, 200, 300}, {0.0, 0.5, 1.0}) == doctest::Approx(0.5));
    CHECK(curve_area({100, 200, 400}, {0.2, 0.2, 0.8}) == doctest::Approx((0.2 * 100 + 0.5 * 200) / 300.0));
    CHECK(curve_area({7}, {0.3}) == 0.3);
    RunResult evict_run;   // an evict arm's "curve" is its one final evaluation: it has no area
    evict_run.curve_step = {600}; evict_run.curve_id = {0.4}; evict_run.curve_ood = {0.1};
    CHECK(std::isnan(metric_of(evict_run, AREA_ID)));
    CHECK(metric_of(evict_run, FINAL_ID) == evict_run.id_answer);
    CHECK(reach({100, 200, 300}, {0.2, 0.6, 1.0}, 0.5) == doctest::Approx(175));
    CHECK(reach({100, 200}, {0.6, 0.9}, 0.5) == 100);
    CHECK(std::isnan(reach({100, 200}, {0.1, 0.4}, 0.5)));
    // a claim on runs made up here: bt beats vanilla+extra by +0.1 in seeds 1..10 except seed 4
    std::vector<RunResult> all;
    for (int s = 1; s <= 10; s++)
        for (const char* arm : {"bt", "vanilla+extra", "pause1"}) {
            RunResult r;
            r.regime = "v4"; r.arm = arm; r.seed = s;
            r.id_answer = 0.5 + (!strcmp(arm, "bt") ? (s == 4 ? -0.05 : 0.1) : 0.0) + 0.01 * s;
            r.curve_step = {10, 20}; r.curve_id = {0.0, r.id_answer}; r.curve_ood = {0, 0};
            all.push_back(r);
        }
    std::vector<ClaimTest> t = test_claims([&](const std::string& regime, const std::string& arm, int seed, double* v) {
        const RunResult* r = find_run(all, regime, arm, seed);
        if (r) *v = r->id_answer;
        return r != nullptr;
    }, [](const Claim& c) { return std::string(strcmp(c.baseline, "best-pause") ? c.baseline : "pause1"); }, 10, 1);
    REQUIRE(t.size() == 2);   // the v1 claims have no runs
    CHECK(t[0].delta.size() == 10);
    CHECK(t[0].mean == doctest::Approx(0.085));
    CHECK(t[0].p == doctest::Approx(22.0 / 1024));   // 9 of 10
    CHECK(t[0].p_holm == doctest::Approx(2 * 22.0 / 1024));
    CHECK(std::string(t[0].verdict) == "supported");
    printf("  made-up claim: mean %+.3f [%+.3f, %+.3f], p %.4f, Holm %.4f: %s\n", t[0].mean, t[0].lo, t[0].hi, t[0].p,
           t[0].p_holm, t[0].verdict);
}

TEST_CASE("latent, batched: a sequence leaving the batch right before another's latent position changes nothing") {
    // a latent position reads the state of the position before it (lnf), so when the batch is
    // compacted between the two, that row must move with its sequence like K and V do
    Model M;
    model_build(M, tiny_latent_config(2));
    randomize(M, 95, 0.3f);
    const Config& c = M.cfg;
    std::vector<std::vector<int>> seqs = {tokenize(insert_pauses("1+2\n3=3\n#3$", 2), "a"),
                                          tokenize(insert_pauses("1*4-0+3\n1*4=4", 2), "b"),
                                          tokenize(insert_pauses("5-1\n5-1=4\n#4", 2), "c")};
    // newlines at 4 (a, c); latent positions 5 and 6 for a and c; b leaves after position 4
    LockStep ls(M, seqs);
    BatchDecoder& BD = ls.BD;
    bool same = true;
    for (int t = 0; t < 11; t++) {
        ls.feed(t);
        for (int j = 0; j < BD.S.B; j++)
            same &= memcmp(batch_logits(BD, j), ls.lone(j).S.logits + (long)t * c.V, sizeof(float) * c.V) == 0;
        if (t == 4) {   // b leaves; a and c read their position-4 states at position 5
            std::vector<char> drop = {0, 1, 0};
            batch_compact(BD, drop.data());
            ls.who = {0, 2};
        }
    }
    CHECK(seqs[0][5] == PAUSE);
    CHECK(seqs[2][5] == PAUSE);
    CHECK(same);
}
