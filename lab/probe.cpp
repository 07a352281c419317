// lab/probe.cpp -- bt probe. Included by lab/lab.cpp after bt.cpp.
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
    BoundaryCtx& bc = *(BoundaryCtx*)ctx;
    ProbeData& P = *bc.P;
    int L = P.L, C = P.C;
    for (int l = 0; l < L; l++) {
        const UndoRecord& rec = S.undo[(size_t)j * L + l];
        const int* sel = undo_sel_of(S, rec);
        const float* u = undo_u_of(S, rec);
        const float *K = S.acts[l].k, *V = S.acts[l].v;
        update_stats_add(P.U, l, rec.s, rec.e, sel, rec.nS, u, K, V, C, bc.q_end);
        for (int i = 0; i < rec.nS; i++) {
            int p = sel[i];
            if (p < rec.s) continue;   // consolidated entries only: each is probed once, at its line's end
            long at = ((bc.row0 + p) * L + l) * C;
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
    s += strf("<text x=\"10\" y=\"16\" font-size=\"13\">%s</text>\n", xml_escape(title).c_str());
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
    s += strf("<text x=\"10\" y=\"16\" font-size=\"13\">%s</text>\n", xml_escape(title).c_str());
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
    TraceCtx& tr = *(TraceCtx*)ctx;
    if (j != tr.j) return;
    for (int l = 0; l < tr.L; l++) {
        const UndoRecord& rec = S.undo[(size_t)j * tr.L + l];
        tr.s = rec.s; tr.e = rec.e;
        tr.sel[l].assign(undo_sel_of(S, rec), undo_sel_of(S, rec) + rec.nS);
        tr.u[l].assign(undo_u_of(S, rec), undo_u_of(S, rec) + (long)rec.nS * 2 * tr.C);
        tr.K[l].assign(S.acts[l].k, S.acts[l].k + (long)S.T * tr.C);
        tr.V[l].assign(S.acts[l].v, S.acts[l].v + (long)S.T * tr.C);
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
    TraceCtx tr;
    tr.j = std::max(1, (nseg - 2) / 2); tr.L = c.L; tr.C = c.C;
    tr.sel.resize(c.L); tr.u.resize(c.L); tr.K.resize(c.L); tr.V.resize(c.L);
    TrainMode mode;
    mode.use_proc = true;
    forward_sequence(M, S, T, mode, trace_after_boundary, &tr);
    int res = -1, opd = -1;
    future_labels(task, lines, tr.j + 1, &res, &opd);
    std::string q = text;
    for (auto& ch : q) if (ch == '\n') ch = '|';
    std::string o = strf("Example `%s` (| is a newline). The bottleneck step after line %d `%s` (positions %d..%d; "
                         "position 0 is BOS). The next line is `%s`: next result %d, next operand %d.\n\n",
                         q.c_str(), tr.j, lines[tr.j].c_str(), tr.s, tr.e - 1, lines[tr.j + 1].c_str(), res, opd);
    o += "| layer | pos | token | kind | \\|ΔK\\|/\\|K\\| | \\|ΔV\\|/\\|V\\| | p(token) from K: before → after | "
         "p(next result) from V: before → after |\n|---|---|---|---|---|---|---|---|\n";
    for (int l = 0; l < c.L; l++)
        for (size_t i = 0; i < tr.sel[l].size(); i++) {
            int p = tr.sel[l][i];
            const float *uk = &tr.u[l][i * 2 * c.C], *uv = uk + c.C, *pk = &tr.K[l][(long)p * c.C], *pv = &tr.V[l][(long)p * c.C];
            bool cons = p >= tr.s;
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
    if (c.proc_width == 0) BAD_INPUT("%s has no processor: bt probe compares a Bottlenecked model with its backbone", a.str("ckpt").c_str());
    if (c.periodic) BAD_INPUT("%s rewrites every %d tokens: bt probe follows lines (newline schedule) only", a.str("ckpt").c_str(), c.periodic);
    std::string bname = "--ckpt with its processor off";
    if (a.has("backbone")) {
        load_model(Mb, a.str("backbone"));
        if (Mb.cfg.C != c.C || Mb.cfg.L != c.L || Mb.cfg.pause || Mb.cfg.latent)
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
