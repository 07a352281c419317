// lab/experiment.cpp -- bt experiment. Included by lab/lab.cpp after bt.cpp and lab/svg.hpp.
// =============================================================================================
// bt experiment: every arm (README, "Results") on one task, trained on the same data stream with the same
// budget per seed, evaluated in distribution and at every OOD size. Each finished run is kept as
// results/<task>/runs/<run>.json (+ its checkpoint), so an interrupted experiment resumes where it
// stopped (a half-trained run resumes from its last checkpoint); then results.md and the plots. The
// records are committed, the checkpoints are not (ensure_checkpoint makes one again when needed).
//   v4 (frozen backbone): stage 1 trains a vanilla backbone for --stage1 steps; every arm then
//       gets --stage2 more steps from it: vanilla+extra, bt (k 4, bptt step and full), bt k 0,
//       pause P (the backbone fine-tuned with P PAUSE after newlines), pause-frozen (only PAUSE's row),
//       latent P (fine-tuned with P latent positions after newlines, fed the model's own state).
//   v1 (end to end from scratch, --steps each): vanilla, bt joint, bt joint periodic:16,
//       vanilla-large (about the parameters of backbone + processor), vanilla-flops (vanilla for as
//       many training FLOPs as bt joint periodic:16), vanilla-4x (3.5-4x the backbone's parameters,
//       the paper's v1 comparison), and evict B (H2O at decoding on the v1 vanilla model).
// Every training run is evaluated at CURVE_POINTS evenly spaced steps (its learning curve, on the
// evaluation sets every arm and seed shares); the last point is its final result. lab/claims.cpp
// tests the claims on the final point and on the area under the curve.
// =============================================================================================
// An arm: what it sets in the run every arm of its regime shares (TrainSpec). vanilla-large and
// vanilla-4x get their widths from the backbone's (LARGE_WIDTH, WIDE_WIDTH: cmd_experiment
// computes them); vanilla-flops its steps (flops_matched_steps).
enum { LARGE_WIDTH = -1, WIDE_WIDTH = -2 };
struct ArmSpec {
    const char* regime;          // "v4" or "v1"
    const char* name;
    void (*set)(TrainSpec&);     // the arm's model and settings
    int evict;                   // > 0: no training, evaluate the v1 vanilla model with this budget
};
static const ArmSpec ARMS[] = {
    {"v4", "vanilla+extra", [](TrainSpec& t) { t.model = "vanilla"; }, 0},
    {"v4", "bt", [](TrainSpec& t) { t.model = "bt"; t.bptt = "step"; }, 0},
    {"v4", "bt-full", [](TrainSpec& t) { t.model = "bt"; t.bptt = "full"; }, 0},
    {"v4", "bt-k0", [](TrainSpec& t) { t.model = "bt"; t.k = 0; t.bptt = "step"; }, 0},
    {"v4", "pause1", [](TrainSpec& t) { t.model = "pause"; t.pause = 1; }, 0},
    {"v4", "pause4", [](TrainSpec& t) { t.model = "pause"; t.pause = 4; }, 0},
    {"v4", "pause16", [](TrainSpec& t) { t.model = "pause"; t.pause = 16; }, 0},
    {"v4", "pause4-frozen", [](TrainSpec& t) { t.model = "pause-frozen"; t.pause = 4; }, 0},
    {"v4", "latent1", [](TrainSpec& t) { t.model = "latent"; t.latent = 1; }, 0},
    {"v4", "latent4", [](TrainSpec& t) { t.model = "latent"; t.latent = 4; }, 0},
    {"v1", "vanilla", [](TrainSpec& t) { t.model = "vanilla"; }, 0},
    {"v1", "bt-joint", [](TrainSpec& t) { t.model = "bt"; t.joint = true; }, 0},
    {"v1", "bt-joint-periodic16", [](TrainSpec& t) { t.model = "bt"; t.joint = true; t.schedule = "periodic:16"; }, 0},
    {"v1", "vanilla-large", [](TrainSpec& t) { t.model = "vanilla"; t.d_model = LARGE_WIDTH; }, 0},
    {"v1", "vanilla-flops", [](TrainSpec& t) { t.model = "vanilla"; }, 0},   // steps: bt-joint-periodic16's FLOPs
    {"v1", "vanilla-4x", [](TrainSpec& t) { t.model = "vanilla"; t.d_model = WIDE_WIDTH; }, 0},
    {"v1", "evict4", nullptr, 4},
    {"v1", "evict8", nullptr, 8},
    {"v1", "evict16", nullptr, 16},
};

static const int CURVE_POINTS = 6;

struct RunResult {   // one arm, one seed
    std::string regime, arm;
    int seed = 0, steps = 0;
    long params = 0;
    double seconds = 0, flops = 0;        // training time; forward FLOPs per token
    double step_flops = 0;                // training FLOPs per step (3 x forward, over a batch)
    std::vector<int> curve_step;          // the learning curve: steps where it was evaluated, and
    std::vector<double> curve_id, curve_ood;   //   the ID and OOD answer accuracy there
    std::vector<float> loss;              // per step
    std::vector<int> sizes;
    std::vector<double> answer, lines, first_wrong;   // per size
    double id_answer = 0, ood_answer = 0, ood_lines = 0, ood_first_wrong = 0;
};

struct Experiment {
    Task task;
    std::string dir;                      // results/<task>
    Config base;                          // the backbone's size (runs that start from --init take it from there)
    int stage1, stage2, steps, n_eval, large_width, wide_width, flops_steps, batch;
    std::vector<std::string> arms;        // which arms (names), empty: all
};

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
    std::vector<int> toks = tokenize(insert_pauses(text, inserted_after_newline(c)), "flops");
    double T = (double)toks.size(), total = T * flops_per_token(c, T);
    if (c.proc_width > 0) {
        int start = 0;
        for (int t = 1; t < (int)toks.size(); t++)
            if (is_boundary(c, t, toks[t])) {
                double nS = c.periodic ? t : (t - start) + std::min(c.k, start);
                double per_row = 2.0 * (2 * c.C * c.proc_width + c.proc_layers * (4.0 * c.proc_width * c.proc_width + 3.0 * c.proc_width * c.proc_ffn) + c.proc_width * 2 * c.C);
                total += c.L * (nS * per_row + c.proc_layers * 4.0 * nS * nS * c.proc_width);   // non-causal: QK^T, AV
                start = t;
            }
    }
    return total / T;
}

// training FLOPs of one step of M on a batch of B examples: 3 x the forward FLOPs of 64 training
// examples (sizes and texts from a fixed Rng, the same for every arm), scaled to B
static double step_flops(const Model& M, Task task, int B) {
    Rng g(7);
    const TaskInfo& ti = TASKS[task];
    double sum = 0;
    for (int i = 0; i < 64; i++) {
        std::string ex = gen_example(task, g, g.randint(ti.train_lo, ti.train_hi), false);
        sum += model_flops(M, ex) * (double)(insert_pauses(ex, inserted_after_newline(M.cfg)).size() + 1);
    }
    return 3.0 * sum / 64 * B;
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
           arr(r.loss, "%.5f") + strf(",\"step_flops\":%.0f", r.step_flops) + ",\"curve_step\":" +
           arr(r.curve_step, "%.0f") + ",\"curve_id\":" + arr(r.curve_id, "%.4f") + ",\"curve_ood\":" +
           arr(r.curve_ood, "%.4f") + "}\n";
}

static bool read_run_json(const std::string& path, RunResult* r) {
    if (!std::ifstream(path)) return false;
    std::string s = read_file(path, "run record");
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
    if (j.get("step_flops")) {   // runs from before the learning curves have none (their areas are not tested)
        r->step_flops = num("step_flops");
        arr("curve_step", r->curve_step); arr("curve_id", r->curve_id); arr("curve_ood", r->curve_ood);
    }
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
// the evaluation e (evaluate_run) as r's result
static void take_evaluation(RunResult& r, const RunResult& e) {
    r.sizes = e.sizes; r.answer = e.answer; r.lines = e.lines; r.first_wrong = e.first_wrong;
    r.id_answer = e.id_answer; r.ood_answer = e.ood_answer; r.ood_lines = e.ood_lines;
    r.ood_first_wrong = e.ood_first_wrong;
}

// remake: the run has a record (runs/<run>.json, kept in git) but not its checkpoint (not kept):
// train it again, and check that it is the run its record describes, digit for digit.
static RunResult experiment_run(const Experiment& ex, const std::string& regime, const std::string& arm,
                                const TrainSpec& arm_spec, int steps, int seed, const std::string& init,
                                int evict, const std::string& evict_ckpt, bool remake = false) {
    std::string base = ex.dir + "/runs/" + run_name(regime, arm, seed);
    RunResult r;
    if (read_run_json(base + ".json", &r)) {
        if (r.steps != steps)
            BAD_INPUT("%s.json was trained for %d steps, this experiment asks %d: delete %s/runs to start over",
                      base.c_str(), r.steps, steps, ex.dir.c_str());
        if (!remake) {
            printf("  %-22s seed %d: done before (%s.json)\n", arm.c_str(), seed, base.c_str());
            return r;
        }
        printf("  %-22s seed %d: recorded, but its checkpoint is not here: training it again\n", arm.c_str(), seed);
    } else if (remake) {
        INTERNAL("%s: remade without a record", base.c_str());
    }
    std::string record = remake ? read_file(base + ".json", "run record") : "";
    double recorded_seconds = r.seconds;
    r = RunResult();
    r.regime = regime; r.arm = arm; r.seed = seed; r.steps = steps;
    // v1's vanilla with --steps equal to --stage1 is the very run v4's backbone was (same flags, seed and
    // data; training is deterministic): take its checkpoint and results instead of training it twice.
    std::string backbone = ex.dir + "/runs/" + run_name("v4", "backbone", seed);
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
        TrainSpec t = arm_spec;   // the arm's settings, then what every run of the experiment shares
        t.seed = seed; t.steps = steps; t.out = base + ".safetensors"; t.log_every = 1000000; t.save_every = 0;
        t.task = TASKS[ex.task].name; t.batch = ex.batch;
        if (!init.empty()) { t.init = init; t.lr = 0.001; }   // v4: from the stage-1 backbone, its size
        else {
            if (!t.d_model) t.d_model = ex.base.C;   // vanilla-large and vanilla-4x set their own width
            t.layers = ex.base.L; t.heads = ex.base.NH;
        }
        bool resume = std::ifstream(state_path(base + ".safetensors")).good();
        if (resume) { t = TrainSpec(); t.resume = base + ".safetensors"; t.log_every = 1000000; }
        TrainRun R;
        R.quiet = true;
        train_setup(R, t);
        if (resume && R.o.steps != steps)
            BAD_INPUT("%s.safetensors was started for %d steps, this experiment asks %d: delete it and its .state to "
                      "start that run over", base.c_str(), R.o.steps, steps);
        if (resume) printf("  %-22s seed %d: resuming at step %d\n", arm.c_str(), seed, R.step);
        // the learning curve: train to each point, save (a resume starts from the last point),
        // evaluate; the run so far (its curve) is kept beside the checkpoint in <run>.curve.json
        std::string curve_path = base + ".curve.json";
        RunResult c;
        double t0 = now_seconds(), trained = 0;   // seconds spent training, summed over the sessions of a resumed run
        if (resume && read_run_json(curve_path, &c)) {
            r.curve_step = c.curve_step; r.curve_id = c.curve_id; r.curve_ood = c.curve_ood;
            trained = c.seconds;
        }
        for (int k = 1; k <= CURVE_POINTS; k++) {
            int at = (int)((long)steps * k / CURVE_POINTS);
            if (at < R.step || (at == R.step && !r.curve_step.empty() && r.curve_step.back() == at)) continue;
            double t1 = now_seconds();
            train_steps(R, at);
            trained += now_seconds() - t1;
            printf("\r  %-22s seed %d: step %5d/%d  loss %.4f  %s", arm.c_str(), seed, R.step, steps,
                   R.losses.empty() ? 0.0f : R.losses.back(), fmt_time(now_seconds() - t0).c_str());
            fflush(stdout);
            save_run(R);
            RunResult e;
            evaluate_run(e, R.M, ex.task, ex.n_eval, 0);
            r.curve_step.push_back(at); r.curve_id.push_back(e.id_answer); r.curve_ood.push_back(e.ood_answer);
            r.seconds = trained;
            write_file(curve_path, run_json(r));
            if (at == steps) take_evaluation(r, e);   // the final point is the run's result
        }
        if (r.sizes.empty()) {   // resumed after the last point was written but before the run's record
            RunResult e;
            evaluate_run(e, R.M, ex.task, ex.n_eval, 0);
            take_evaluation(r, e);
        }
        r.seconds = trained;   // training only, not the curve's evaluations
        r.loss = R.losses;
        M = R.M;
    }
    r.params = M.n_params;
    r.flops = model_flops(M, [&] { Rng g(3); return gen_example(ex.task, g, TASKS[ex.task].train_hi, true); }());
    r.step_flops = step_flops(M, ex.task, ex.batch);
    if (evict > 0) {   // no training: the final evaluation is the whole curve
        evaluate_run(r, M, ex.task, ex.n_eval, evict);
        r.curve_step = {steps}; r.curve_id = {r.id_answer}; r.curve_ood = {r.ood_answer};
    }
    printf("\r  %-22s seed %d: %s, ID %.3f, OOD %.3f (all lines %.3f)                 \n", arm.c_str(), seed,
           evict ? "no training" : fmt_time(r.seconds).c_str(), r.id_answer, r.ood_answer, r.ood_lines);
    if (remake) {   // the record's training time stands: this was the same work done again
        r.seconds = recorded_seconds;
        if (run_json(r) != record)
            BAD_INPUT("%s: trained again, it differs from its record %s.json (made by another build of bt?): delete "
                      "the record to rerun that arm", base.c_str(), base.c_str());
    } else {
        write_file(base + ".json", run_json(r));
    }
    remove(state_path(base + ".safetensors").c_str());   // finished: the JSON and the checkpoint are what stays
    remove((base + ".curve.json").c_str());
    // the run's result is its record as read back (rounded as written), so that a report made now
    // equals one made later from the kept runs, digit for digit
    RunResult kept;
    if (!read_run_json(base + ".json", &kept)) INTERNAL("%s.json: cannot read back the record just written", base.c_str());
    return kept;
}

// ---- tables over seeds
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
// by a model with a processor (lab/trace.cpp's recall_svg: a row per rewrite, a column per
// position, coloured by the selection score, the recalled entries outlined)
static void plot_reconsolidation(const Model& M, Task task, const std::string& title, const std::string& path) {
    Rng g(11);
    std::string q = question_of(gen_example(task, g, TASKS[task].ood_lo, true));
    Decoder D;
    decoder_init(D, M);
    D.keep_rewrites = true;
    std::string out = generate(D, q + "\n");
    write_file(path, recall_svg(D, title, strf("question %s (size %d, out of distribution), greedy decoding: %s", q.c_str(),
                                                 TASKS[task].ood_lo, out.substr(out.rfind('\n') + 1).c_str())));
}

// ---- learning curves and the claims
enum Metric { FINAL_ID, FINAL_OOD, AREA_ID, AREA_OOD, N_METRICS };
static const char* METRIC_NAMES[N_METRICS] = {"final ID answer", "final OOD answer", "area under the ID curve",
                                             "area under the OOD curve"};

// the mean of y over [x_first, x_last] by the trapezoid rule (one point: that point), so a run
// that learns early scores higher than one that gets there at the end
static double curve_area(const std::vector<int>& x, const std::vector<double>& y) {
    if (x.size() < 2) return y.empty() ? 0.0 : y[0];
    double a = 0;
    for (size_t i = 1; i < x.size(); i++) a += 0.5 * (y[i] + y[i - 1]) * (x[i] - x[i - 1]);
    return a / (x.back() - x.front());
}
static double metric_of(const RunResult& r, int m) {
    switch (m) {
        case FINAL_ID: return r.id_answer;
        case FINAL_OOD: return r.ood_answer;
        // an area needs a learning curve: none for runs from before the curves, and an evict arm's
        // single point (its final evaluation) is not a mean over training
        case AREA_ID: return r.curve_step.size() < 2 ? NAN : curve_area(r.curve_step, r.curve_id);
        default: return r.curve_step.size() < 2 ? NAN : curve_area(r.curve_step, r.curve_ood);
    }
}

// the first x where the piecewise-linear curve (x, y) reaches `level`, or NAN
static double reach(const std::vector<double>& x, const std::vector<double>& y, double level) {
    for (size_t i = 0; i < x.size(); i++)
        if (y[i] >= level) {
            if (i == 0) return x[0];
            return x[i - 1] + (x[i] - x[i - 1]) * (level - y[i - 1]) / (y[i] - y[i - 1]);
        }
    return NAN;
}

static const RunResult* find_run(const std::vector<RunResult>& all, const std::string& regime, const std::string& arm,
                                 int seed) {
    for (auto& r : all)
        if (r.regime == regime && r.arm == arm && r.seed == seed) return &r;
    return nullptr;
}

// The claims table, per metric: every claim whose arms ran, seed by seed (results.md leads with it)
static std::string claims_report(const std::vector<RunResult>& all, int seeds) {
    // best-pause: the pause arm with the best mean final ID answer over the seeds
    std::string best_pause;
    double best = -1;
    for (const char* arm : {"pause1", "pause4", "pause16"}) {
        std::vector<double> v;
        for (int s = 1; s <= seeds; s++)
            if (const RunResult* r = find_run(all, "v4", arm, s)) v.push_back(r->id_answer);
        if (!v.empty() && mean_of(v) > best) { best = mean_of(v); best_pause = arm; }
    }
    auto baseline_of = [&](const Claim& c) { return std::string(strcmp(c.baseline, "best-pause") ? c.baseline : best_pause); };
    std::string md = "\n## The claims, tested\n\nFixed before the runs (lab/claims.cpp). Per claim: each seed's Δ = arm - "
                     "baseline on the same evaluation problems, the mean Δ with a seeded bootstrap 95% interval (10,000 "
                     "resamples), an exact two-sided sign test, and its Holm adjustment over the claims of that table. "
                     "Verdict: supported or contradicted when the adjusted p < 0.05 (by the sign test's direction: more "
                     "seeds above the baseline than below, or fewer), else not resolved. Areas are the mean accuracy over "
                     "each run's learning curve (trapezoid over its " +
                     std::to_string(CURVE_POINTS) + " points). `best pause` is " +
                     (best_pause.empty() ? std::string("(no pause arm ran)") : "`" + best_pause + "`") +
                     ", the pause arm with the best mean final ID answer.\n";
    for (int m = 0; m < N_METRICS; m++) {
        std::vector<ClaimTest> tests = test_claims([&](const std::string& regime, const std::string& arm, int seed, double* v) {
            const RunResult* r = find_run(all, regime, arm, seed);
            if (r) *v = metric_of(*r, m);
            return r != nullptr && !std::isnan(*v);   // a run without a learning curve has no area
        }, baseline_of, seeds, 1000 + 100 * m);
        if (tests.empty()) continue;
        md += strf("\n### %s\n\n| claim | arm | baseline | seeds | Δ per seed | mean Δ [95%% CI] | sign test p | Holm p | "
                   "verdict |\n|---|---|---|---|---|---|---|---|---|\n", METRIC_NAMES[m]);
        for (auto& t : tests) {
            std::string per;
            for (size_t i = 0; i < t.delta.size(); i++) per += strf("%s%+.2f", i ? " " : "", t.delta[i]);
            md += strf("| %s | %s | %s | %zu | %s | %+.3f [%+.3f, %+.3f] | %.4f | %.4f | **%s** |\n", CLAIMS[t.claim].says,
                       CLAIMS[t.claim].arm, t.baseline.c_str(), t.delta.size(), per.c_str(), t.mean, t.lo, t.hi, t.p,
                       t.p_holm, t.verdict);
        }
    }
    return md;
}

// The learning curves of one regime: ID answer accuracy against steps and against training FLOPs
// (the mean over seeds and a bootstrap 95% band), the areas, and the steps and FLOPs each arm
// needs to reach 50% and 90% in distribution (on the mean curve)
static std::string curves_report(const Experiment& ex, const std::string& regime, const std::vector<RunResult>& all,
                                 const std::vector<std::string>& arms) {
    std::string md = "\n| arm | seeds | area ID | area OOD | steps to 50% ID | steps to 90% ID | TFLOP to 50% ID | "
                     "TFLOP to 90% ID |\n|---|---|---|---|---|---|---|---|\n";
    struct Line { std::vector<double> x, f, m, lo, hi; };
    std::vector<Line> lines(arms.size());
    double max_step = 1, max_flops = 1e-9;
    for (size_t ai = 0; ai < arms.size(); ai++) {
        std::vector<const RunResult*> runs;
        for (auto& r : all)   // (v4's backbone is stage 1, on another step axis; eviction trains nothing: one point)
            if (r.regime == regime && r.arm == arms[ai] && r.arm != "backbone" && r.curve_step.size() >= 2) runs.push_back(&r);
        if (runs.empty()) continue;
        std::vector<double> aid, aood;
        for (auto* r : runs) { aid.push_back(metric_of(*r, AREA_ID)); aood.push_back(metric_of(*r, AREA_OOD)); }
        Line& L = lines[ai];
        const RunResult* r0 = runs[0];
        for (size_t k = 0; k < r0->curve_step.size(); k++) {
            std::vector<double> v;
            for (auto* r : runs)
                if (k < r->curve_id.size()) v.push_back(r->curve_id[k]);
            double lo, hi;
            bootstrap_ci(v, 2000, 7 + k, &lo, &hi);
            L.x.push_back(r0->curve_step[k]);
            L.f.push_back(r0->curve_step[k] * r0->step_flops / 1e12);   // TFLOP
            L.m.push_back(mean_of(v)); L.lo.push_back(lo); L.hi.push_back(hi);
        }
        max_step = std::max(max_step, L.x.back());
        max_flops = std::max(max_flops, L.f.back());
        auto fmt = [](double x, const char* f) { return std::isnan(x) ? std::string("not reached") : strf(f, x); };
        md += strf("| %s | %zu | %s | %s | %s | %s | %s | %s |\n", arms[ai].c_str(), runs.size(), pm(aid).c_str(),
                   pm(aood).c_str(), fmt(reach(L.x, L.m, 0.5), "%.0f").c_str(), fmt(reach(L.x, L.m, 0.9), "%.0f").c_str(),
                   fmt(reach(L.f, L.m, 0.5), "%.2f").c_str(), fmt(reach(L.f, L.m, 0.9), "%.2f").c_str());
    }
    Plot by_step = plot_begin(strf("%s, %s: ID answer accuracy during training (mean, 95%% band)", TASKS[ex.task].name,
                              regime.c_str()), "step", "ID answer accuracy", 0, max_step, 0, 1, true);
    Plot by_flops = plot_begin(strf("%s, %s: ID answer accuracy against training FLOPs", TASKS[ex.task].name, regime.c_str()),
                          "training TFLOP", "ID answer accuracy", 0, max_flops, 0, 1);
    for (size_t ai = 0; ai < arms.size(); ai++) {
        const Line& L = lines[ai];
        if (L.x.empty()) continue;
        plot_band(by_step, L.x, L.lo, L.hi, (int)ai);
        plot_series(by_step, L.x, L.m, (int)ai, arms[ai], true);
        plot_band(by_flops, L.f, L.lo, L.hi, (int)ai);
        plot_series(by_flops, L.f, L.m, (int)ai, arms[ai], true);
    }
    plot_end(by_step, ex.dir + "/curve_" + regime + ".svg");
    plot_end(by_flops, ex.dir + "/curve_flops_" + regime + ".svg");
    return "\nLearning curves (" + std::to_string(CURVE_POINTS) + " points per run; areas: mean ± sd over seeds; steps "
           "and FLOPs to a level: on the mean curve" + (regime == "v4" ? std::string(", from the shared backbone on") : "") +
           "):\n" + md + strf("\n![ID accuracy during training](curve_%s.svg) ![ID accuracy against FLOPs](curve_flops_%s.svg)\n",
                              regime.c_str(), regime.c_str());
}

// results.md and the plots of one regime
static std::string regime_report(const Experiment& ex, const std::string& regime, const std::vector<RunResult>& all,
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
    const TaskInfo& ti = TASKS[ex.task];
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
    Plot acc = plot_begin(strf("%s, %s: answer accuracy by problem size (training sizes shaded)", TASKS[ex.task].name,
                               regime.c_str()), "problem size", "answer accuracy", first->sizes.front(),
                          first->sizes.back(), 0, 1, true);
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
    Plot loss = plot_begin(strf("%s, %s: training loss (mean over seeds, smoothed)", TASKS[ex.task].name, regime.c_str()),
                           "step", "loss", 0, max_steps, 0, max_loss, true);
    for (size_t ai = 0; ai < arms.size(); ai++)
        if (!loss_x[ai].empty()) plot_series(loss, loss_x[ai], loss_y[ai], (int)ai, arms[ai], false);
    plot_end(acc, ex.dir + "/accuracy_" + regime + ".svg");
    plot_end(loss, ex.dir + "/loss_" + regime + ".svg");
    md += strf("\n![accuracy by size](accuracy_%s.svg) ![loss](loss_%s.svg)\n", regime.c_str(), regime.c_str());
    return md + curves_report(ex, regime, all, arms);
}

// the config of the bt arms: the backbone plus bt train's default processor
static Config bt_config(const Config& base, int periodic) {
    Config bt = base;
    bt.proc_width = base.C / 2; bt.proc_layers = 1; bt.proc_heads = 4; bt.proc_ffn = 3 * bt.proc_width;
    bt.periodic = periodic;
    return bt;
}

// the smallest d_model (a multiple of 2 x heads) whose vanilla model has at least `want` parameters
static int width_for_params(const Config& base, double want) {
    Weights w;
    for (int C = base.C;; C += 2 * base.NH) {
        Config v = base;
        v.C = C; v.F = 3 * C;
        if (layout_params(v, &w, nullptr, nullptr) >= want) return C;
    }
}

// vanilla-large: as many parameters as backbone + processor; vanilla-4x: 3.5x the backbone's
static int large_width(const Config& base) {
    Weights w;
    return width_for_params(base, (double)layout_params(bt_config(base, 0), &w, nullptr, nullptr));
}
static int wide_width(const Config& base) {
    Weights w;
    return width_for_params(base, 3.5 * layout_params(base, &w, nullptr, nullptr));
}

// One run of the plan, and what it costs (vanilla steps, for the ETA).
struct Job { std::string regime, arm, init, evict_ckpt; TrainSpec spec; int steps, seed, evict; double cost; };

// The run records (runs/<run>.json) are kept in git, the checkpoints are not: a run that starts from
// another run's checkpoint (a v4 arm from its seed's backbone, an evict arm from v1's vanilla, the
// heatmap from v1's bt-joint) finds it here, or that run is trained again first. Training is
// deterministic on every machine, so it is the same run; experiment_run checks it against its record.
static void ensure_checkpoint(const Experiment& ex, const std::vector<Job>& jobs, const std::string& regime,
                              const std::string& arm, int seed) {
    std::string base = ex.dir + "/runs/" + run_name(regime, arm, seed);
    if (std::ifstream(base + ".safetensors").good() || !std::ifstream(base + ".json").good()) return;
    for (const Job& j : jobs)
        if (j.regime == regime && j.arm == arm && j.seed == seed) {
            if (regime == "v1" && arm == "vanilla" && ex.stage1 == ex.steps)
                ensure_checkpoint(ex, jobs, "v4", "backbone", seed);   // v1's vanilla is a copy of it
            experiment_run(ex, j.regime, j.arm, j.spec, j.steps, j.seed, j.init, j.evict, j.evict_ckpt, true);
            return;
        }
}

// vanilla-flops: the steps at which vanilla has used the training FLOPs of `steps` steps of bt
// joint periodic:16
static int flops_matched_steps(const Config& base, Task task, int B, int steps) {
    Model v, p;
    model_build(v, base);
    model_build(p, bt_config(base, 16));
    return (int)std::lround(steps * step_flops(p, task, B) / step_flops(v, task, B));
}

static void cmd_experiment(const Args& a) {
    Experiment ex;
    ex.task = parse_task(a.str("task"));
    std::string regime = a.str("regime");
    if (regime != "v4" && regime != "v1" && regime != "both") BAD_INPUT("--regime must be v4, v1 or both, got '%s'", regime.c_str());
    int seeds = a.integer("seeds", 1, 100);   // v4's seeds, and v1's unless --v1-seeds says otherwise
    int seeds_v1 = a.has("v1-seeds") ? a.integer("v1-seeds", 1, 100) : seeds;
    int first_seed = a.has("first-seed") ? a.integer("first-seed", 1, 100) : 1;   // seeds below: another process's
    ex.stage1 = a.integer("stage1", 1, 10000000);
    ex.stage2 = a.integer("stage2", 1, 10000000);
    ex.steps = a.integer("steps", 1, 10000000);
    ex.n_eval = a.integer("n", 1, 100000);
    ex.dir = a.str("results") + "/" + TASKS[ex.task].name;
    Config base;
    base.C = a.integer("d-model", 2, 1 << 14); base.L = a.integer("layers", 1, 256); base.NH = a.integer("heads", 1, 1024);
    base.F = 3 * base.C;
    validate_config(base);
    ex.large_width = large_width(base);
    ex.wide_width = wide_width(base);
    ex.batch = a.integer("batch", 1, 100000);
    ex.flops_steps = flops_matched_steps(base, ex.task, ex.batch, ex.steps);
    ex.base = base;
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
    std::filesystem::create_directories(ex.dir + "/runs");
    bool v4 = regime != "v1", v1 = regime != "v4";
    std::string v1_seeds = seeds_v1 != seeds ? strf(" --v1-seeds %d", seeds_v1) : "";
    if (first_seed > 1) v1_seeds += strf(" --first-seed %d", first_seed);
    printf("bt experiment | %s | %s | regime %s | seeds %d%s\n", TASKS[ex.task].name, build_flags().c_str(), regime.c_str(),
           seeds, v1_seeds.c_str());
    printf("  model d_model %d, layers %d, heads %d, batch %s (vanilla-large: d_model %d, vanilla-4x: d_model %d, "
           "vanilla-flops: %d steps); v4: stage 1 %d steps, stage 2 %d; v1: %d steps; eval %d per size at %d points\n",
           base.C, base.L, base.NH, a.str("batch").c_str(), ex.large_width, ex.wide_width, ex.flops_steps, ex.stage1,
           ex.stage2, ex.steps, ex.n_eval, CURVE_POINTS);
    // the plan: every run in order, with a rough cost (vanilla steps) for the ETA
    std::vector<Job> jobs;
    auto cost_of = [&](const TrainSpec& t, int steps) {
        double f = t.model == "bt" ? 2.5 : 1.0;
        f += t.pause.value_or(0) / 8.0;    // P tokens after every ~8-token line
        f += t.latent.value_or(0) / 4.0;   // the same, one position at a time
        if (t.d_model) f = pow((double)*t.d_model / base.C, 2);   // a wider vanilla model
        return f * steps + 30;                                     // + evaluation
    };
    int max_seed = std::max(v4 ? seeds : 0, v1 ? seeds_v1 : 0);
    if (first_seed > max_seed) BAD_INPUT("--first-seed %d is past the last seed (%d)", first_seed, max_seed);
    for (int seed = first_seed; seed <= max_seed; seed++) {   // seed by seed: an interrupted experiment has whole seeds
        bool v4_seed = v4 && seed <= seeds, v1_seed = v1 && seed <= seeds_v1;
        std::string init = ex.dir + "/runs/" + run_name("v4", "backbone", seed) + ".safetensors";
        std::string vanilla = ex.dir + "/runs/" + run_name("v1", "vanilla", seed) + ".safetensors";
        TrainSpec backbone;
        backbone.model = "vanilla";
        if (v4_seed) jobs.push_back({"v4", "backbone", "", "", backbone, ex.stage1, seed, 0, cost_of(backbone, ex.stage1)});
        size_t after_vanilla = jobs.size();
        for (auto& arm : ARMS) {
            std::string r = arm.regime, name = arm.name;
            bool control = name == "vanilla+extra" || name == "vanilla";   // the controls always run
            if ((r == "v4" && !v4_seed) || (r == "v1" && !v1_seed) || !(only.empty() || only.count(name) || control)) continue;
            TrainSpec t;
            if (arm.set) arm.set(t);
            if (t.d_model == LARGE_WIDTH) t.d_model = ex.large_width;
            if (t.d_model == WIDE_WIDTH) t.d_model = ex.wide_width;
            int steps = r == "v4" ? ex.stage2 : name == "vanilla-flops" ? ex.flops_steps : ex.steps;
            Job job{r, name, r == "v4" ? init : "", vanilla, t, steps, seed, arm.evict, arm.evict ? 30.0 : cost_of(t, steps)};
            // an evict arm only decodes with v1's vanilla model: it runs right after it, while that
            // checkpoint is surely here (a seed cut short then has them)
            if (arm.evict) jobs.insert(jobs.begin() + after_vanilla++, job);
            else jobs.push_back(job);
            if (name == "vanilla") after_vanilla = jobs.size();
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
        if (!std::ifstream(ex.dir + "/runs/" + run_name(j.regime, j.arm, j.seed) + ".json").good()) {
            if (!j.init.empty()) ensure_checkpoint(ex, jobs, "v4", "backbone", j.seed);
            if (j.evict) ensure_checkpoint(ex, jobs, "v1", "vanilla", j.seed);
        }
        all.push_back(experiment_run(ex, j.regime, j.arm, j.spec, j.steps, j.seed, j.init, j.evict, j.evict_ckpt));
        if (now_seconds() - before > 1) done += j.cost;   // runs found done before do not teach the ETA
        else total -= j.cost;
    }
    // the report
    double train_seconds = 0;   // v1's vanilla taken from v4's backbone (same steps) is counted once
    bool shared = v4 && v1 && ex.stage1 == ex.steps;
    for (auto& r : all) train_seconds += shared && r.regime == "v1" && r.arm == "vanilla" ? 0 : r.seconds;
    std::string md = strf("# %s: does the bottleneck help?\n\nWritten by `bt experiment --task %s --regime %s --seeds %d%s "
                          "--stage1 %d --stage2 %d --steps %d --d-model %d --layers %d --heads %d --batch %s --n %d%s%s` "
                          "(%s; training time summed over the runs: %s). Every arm of a regime sees the same data stream and budget "
                          "per seed. Mean ± sample standard deviation over seeds; Δ columns: per-seed difference from the "
                          "regime's control, then mean ± sd. ID sizes %d..%d, OOD %d..%d, %d examples per size.\n",
                          TASKS[ex.task].name, TASKS[ex.task].name, regime.c_str(), seeds, v1_seeds.c_str(), ex.stage1, ex.stage2, ex.steps,
                          base.C, base.L, base.NH, a.str("batch").c_str(), ex.n_eval,
                          a.has("arms") ? (" --arms " + a.str("arms")).c_str() : "",
                          a.has("results") ? (" --results " + a.str("results")).c_str() : "", build_flags().c_str(),
                          fmt_time(train_seconds).c_str(), TASKS[ex.task].train_lo, TASKS[ex.task].train_hi,
                          TASKS[ex.task].ood_lo, TASKS[ex.task].ood_hi, ex.n_eval);
    md += claims_report(all, max_seed);   // the answer first
    // the numbers that led to the budgets: written by hand (pilot runs) in calibration.md beside results.md
    std::ifstream cal(ex.dir + "/calibration.md");
    if (cal.good()) {
        std::stringstream ss;
        ss << cal.rdbuf();
        md += "\n## Calibration: how the sizes and budgets were chosen\n\n(from calibration.md)\n\n" + ss.str();
    }
    if (v4) {
        md += "\n## v4: a processor on a frozen backbone\n\nStage 1 trained a vanilla backbone for " +
              std::to_string(ex.stage1) + " steps (row `backbone`: where every arm starts); every arm then trained " +
              std::to_string(ex.stage2) + " more steps at lr 1e-3. Control: `vanilla+extra`.\n";
        md += regime_report(ex, "v4", all, "vanilla+extra");
    }
    if (v1) {
        md += "\n## v1: end to end from scratch\n\nEvery arm trained " + std::to_string(ex.steps) +
              " steps from scratch. `evictB`: the v1 vanilla model decoding with H2O-style eviction (B older entries "
              "kept at each newline). Control: `vanilla`.\n";
        md += regime_report(ex, "v1", all, "vanilla");
    }
    // the heatmap: v1's newline-schedule model if it ran, else v4's bt (both recall k entries per boundary)
    bool joint = v1 && std::ifstream(ex.dir + "/runs/" + run_name("v1", "bt-joint", 1) + ".json").good();
    ensure_checkpoint(ex, jobs, joint ? "v1" : "v4", joint ? "bt-joint" : "bt", 1);
    std::string bt_run = ex.dir + "/runs/" + run_name(joint ? "v1" : "v4", joint ? "bt-joint" : "bt", 1) + ".safetensors";
    if (std::ifstream(bt_run).good()) {
        Model M;
        load_model(M, bt_run);
        plot_reconsolidation(M, ex.task, strf("%s: what the processor recalls (%s, seed 1)", TASKS[ex.task].name,
                                             joint ? "v1 bt-joint" : "v4 bt"), ex.dir + "/reconsolidation.svg");
        md += "\n## Which entries get reconsolidated\n\n![reconsolidation](reconsolidation.svg)\n";
    }
    write_file(ex.dir + "/results.md", md);
    printf("\n%s\nwrote %s/results.md and its plots in %s\n", md.c_str(), ex.dir.c_str(), fmt_time(now_seconds() - t0).c_str());
}
