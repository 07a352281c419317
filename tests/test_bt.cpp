// tests/test_bt.cpp -- bt checked against the PyTorch reference, finite differences and
// independent computations. Build and run: make test.
// The reference files come from tests/reference.py (make reference); BT_REF_DIR overrides where
// they are read from (CI regenerates them into a temporary folder).
#define DOCTEST_CONFIG_IMPLEMENT_WITH_MAIN
#include <doctest/doctest.h>

#define BT_TESTING
#include "../bt.cpp"

#include <functional>
#include <unistd.h>

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
        if (!(d <= tol) && !(std::isnan(d) && false)) { /* counted below */ }
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
                for (int r = 0; r < kk; r++) got[(long)b * kk + r] = (float)S.undo_sel[rec.sel_off + (long)r * B + b];
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

TEST_CASE("processor (newline schedule) matches PyTorch: selections, caches, logits, full/step/joint gradients") {
    TrainMode full, step, joint;
    full.use_proc = step.use_proc = joint.use_proc = true;
    full.train_backbone = step.train_backbone = false;
    step.bptt_step = true;
    processor_case("newline", 0, {{"newline_full", full}, {"newline_step", step}, {"newline_joint", joint}});
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
