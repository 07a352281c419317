// lab/bench.cpp -- bt bench. Included by lab/lab.cpp after bt.cpp.
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
static void bench_run(TrainRun& R, const TrainSpec& spec, bool frozen) {
    R.quiet = true;
    train_setup(R, spec);
    if (frozen) R.mode.train_backbone = false;
}

// training tokens/s over `steps` steps after 2 warm-up steps; sizes lo..hi of chain (0: the task's)
static double bench_train(const TrainSpec& spec, bool frozen, int steps, int lo = 0, int hi = 0,
                          double* mean_T = nullptr) {
    TrainRun R;
    bench_run(R, spec, frozen);
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
    int B;
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
// the batched decoders bench_decode_batched runs, one per thread, built before the clock starts
// (as tests/bench_torch.py builds its caches before timing)
struct BenchDecoders { int B = 0, threads = 0, n_batches = 0; std::vector<BatchDecoder> BD; };
static void bench_decoders_build(BenchDecoders& X, const Model& M, int n) {
    X.n_batches = eval_batches(n, &X.B, &X.threads);
    X.BD = std::vector<BatchDecoder>(X.threads);
    for (BatchDecoder& d : X.BD) batch_init(d, M, X.B);
}
static void bench_decode_batched(BenchDecoders& X, const std::vector<std::vector<int>>& seqs,
                                 const std::vector<int>& qlen) {
    BenchDecodeCtx x{&X.BD, &seqs, &qlen, X.B};
    for_each_item(X.n_batches, X.threads, bench_decode_batch, &x);
}

// Decoding with the KV cache, one token at a time after the prompt (BOS, question, newline): the
// greedy choice is computed at every step as generate() does, but the example's own next token
// is fed back, so every run decodes the same tokens and the processor fires at the same newlines.
// The work is tests/bench_torch.py's: B chain examples of each training size 2..8, one size after
// another; one untimed pass over them first (torch warms up on every layout), then `rounds`
// timed passes. B = 1: one Decoder. B > 1: each size's B sequences in batched decoders, one per
// thread, as bt eval decodes (lock-step, one position of every sequence of a batch per step); on
// the device, where there is no batched decoder, one Decoder takes the sequences one by one.
// Returns generated tokens (one per greedy choice) per second, prefill included; the decoders
// are built before the clock starts, as tests/bench_torch.py builds its caches.
static double bench_decode(const Model& M, int B, int rounds) {
    Rng r(99);
    std::vector<std::vector<std::vector<int>>> seqs;   // [size][b]: an example's tokens
    std::vector<std::vector<int>> qlen;                // [size][b]: BOS, the question, its newline
    long tokens = 0;                                   // generated in one pass
    for (int n = TASKS[TASK_CHAIN].train_lo; n <= TASKS[TASK_CHAIN].train_hi; n++) {
        seqs.emplace_back();
        qlen.emplace_back();
        for (int i = 0; i < B; i++) {
            std::string ex = gen_example(TASK_CHAIN, r, n, true);
            seqs.back().push_back(tokenize(ex, "bench"));
            qlen.back().push_back((int)question_of(ex).size() + 2);
            tokens += (long)seqs.back().back().size() - qlen.back().back();
        }
    }
    BenchDecoders X;
    Decoder D;
    bool batched = B > 1 && !g_device;
    if (batched) bench_decoders_build(X, M, B);
    else decoder_init(D, M);
    auto pass = [&]() {
        for (size_t z = 0; z < seqs.size(); z++) {
            if (batched) { bench_decode_batched(X, seqs[z], qlen[z]); continue; }
            for (int j = 0; j < B; j++) {
                const std::vector<int>& tk = seqs[z][j];
                decoder_reset(D);
                decoder_feed(D, tk.data(), qlen[z][j]);
                volatile int sink = decoder_argmax(D);
                for (size_t t = qlen[z][j]; t + 1 < tk.size(); t++) {   // '$', the last, is chosen, never fed
                    decoder_feed(D, &tk[t], 1);
                    sink = decoder_argmax(D);
                }
                (void)sink;
            }
        }
    };
    pass();   // warm-up, untimed
    double t0 = now_seconds();
    for (int i = 0; i < rounds; i++) pass();
    return tokens * rounds / (now_seconds() - t0);
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
    TrainSpec base;   // the default model on chain
    base.task = "chain"; base.batch = 32; base.seed = 1;
    TrainSpec bt = base;
    bt.model = "bt"; bt.joint = true;
    TrainSpec step = bt;
    step.bptt = "step";
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
    add("decode_vanilla_b1", "decode vanilla, batch 1", "tok/s", bench_decode(V, 1, rounds * 2));
    if (!dev) add("decode_vanilla_b32", "decode vanilla, batch 32", "tok/s", bench_decode(V, 32, rounds));
    add("decode_bt_b1", "decode bt, batch 1", "tok/s", bench_decode(P, 1, rounds * 2));
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
        TrainSpec f = base;
        f.d_model = C;
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
        add("decode_vanilla_b1_1t", "decode vanilla, batch 1, 1 thread", "tok/s", bench_decode(V, 1, rounds * 2));
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
