// lab/claims.cpp -- the claims bt experiment tests, and the paired statistics it tests them with.
// Included by lab/lab.cpp after bt.cpp (before lab/experiment.cpp, which calls it).
//
// The claims are fixed here, before any run (README, "Results"). Each compares an arm with a
// baseline of the same regime, seed by seed, on the same evaluation problems:
//   delta_i = metric(arm, seed i) - metric(baseline, seed i)
// and reports, for each metric (final ID answer, final OOD answer, area under the ID and OOD
// learning curves):
//   - the mean delta, with a seeded bootstrap 95% interval over seeds (10,000 resamples of the
//     seeds with replacement; the 2.5th and 97.5th percentiles of the resampled means);
//   - an exact two-sided sign test: n+ seeds above, n- below (ties dropped), n = n+ + n-,
//     p = min(1, 2 * P[Bin(n, 1/2) <= min(n+, n-)]);
//   - a verdict after Holm's correction over the claims of one task and one metric (a family of
//     up to 9 tests): supported (adjusted p < 0.05, more seeds above than below), contradicted
//     (adjusted p < 0.05, more below), else not resolved. The direction is the sign test's own
//     (n+ against n-), not the mean's, which one large delta could turn.
// With the sign test, 10 seeds that all agree give p = 0.002; Holm over 9 claims asks the
// smallest p to be below 0.05 / 9 = 0.0056, so a claim needs every one of 10 seeds (or 11 of 11,
// 12 of 12, 12 of 13) on its side to be resolved. That is the price of a test that assumes nothing
// about the distribution of the deltas.

#include <functional>

struct Claim {
    const char* regime;
    const char* arm;
    const char* baseline;   // "best-pause": the pause arm with the best mean final ID answer
    const char* says;       // the paper's claim in words
};
static const Claim CLAIMS[] = {
    {"v4", "bt", "vanilla+extra", "a processor on a frozen backbone beats training the backbone on"},
    {"v4", "bt", "best-pause", "a processor on a frozen backbone beats pause tokens"},
    {"v1", "bt-joint", "vanilla", "end to end, the newline processor beats vanilla"},
    {"v1", "bt-joint", "vanilla-flops", "... beats vanilla trained for the same FLOPs"},
    {"v1", "bt-joint", "vanilla-4x", "... beats a vanilla model with 3.5-4x the parameters"},
    {"v1", "bt-joint-periodic16", "vanilla", "end to end, the periodic processor beats vanilla"},
    {"v1", "bt-joint-periodic16", "vanilla-flops", "... beats vanilla trained for the same FLOPs"},
    {"v1", "bt-joint-periodic16", "vanilla-4x", "... beats a vanilla model with 3.5-4x the parameters"},
    {"v1", "evict16", "vanilla", "H2O-style eviction (16 older entries kept) beats vanilla"},
};
static const int N_CLAIMS = sizeof CLAIMS / sizeof *CLAIMS;

// ---- the statistics

// P[Bin(n, 1/2) <= k], summed exactly in double (n <= 1000)
static double binomial_half_cdf(int n, int k) {
    double p = 0, term = pow(0.5, n);   // C(n, 0) / 2^n
    for (int i = 0; i <= k && i <= n; i++) {
        p += term;
        term = term * (n - i) / (i + 1);   // C(n, i+1) = C(n, i) (n - i) / (i + 1)
    }
    return std::min(1.0, p);
}

// exact two-sided sign test on the deltas (zeros dropped); 1 when nothing is left
static double sign_test_p(const std::vector<double>& d) {
    int up = 0, down = 0;
    for (double x : d) { up += x > 0; down += x < 0; }
    int n = up + down;
    return n == 0 ? 1.0 : std::min(1.0, 2.0 * binomial_half_cdf(n, std::min(up, down)));
}

// the 95% percentile interval of the mean over `resamples` bootstrap resamples, drawn from Rng(seed)
static void bootstrap_ci(const std::vector<double>& d, int resamples, uint64_t seed, double* lo, double* hi) {
    int n = (int)d.size();
    if (n == 0) { *lo = *hi = NAN; return; }
    Rng rng(seed);
    std::vector<double> means(resamples);
    for (int r = 0; r < resamples; r++) {
        double s = 0;
        for (int i = 0; i < n; i++) s += d[rng.next() % (uint64_t)n];
        means[r] = s / n;
    }
    std::sort(means.begin(), means.end());
    // percentile q of the sorted means: the value at index floor(q (R - 1)) (no interpolation)
    *lo = means[(size_t)(0.025 * (resamples - 1))];
    *hi = means[(size_t)(0.975 * (resamples - 1))];
}

// Holm's step-down adjustment: sort p ascending, adj_(i) = max over j <= i of min(1, (m - j) p_(j))
// (0-based j), given back in the input's order
static std::vector<double> holm_adjust(const std::vector<double>& p) {
    int m = (int)p.size();
    std::vector<int> order(m);
    for (int i = 0; i < m; i++) order[i] = i;
    std::stable_sort(order.begin(), order.end(), [&](int a, int b) { return p[a] < p[b]; });
    std::vector<double> adj(m);
    double running = 0;
    for (int j = 0; j < m; j++) {
        running = std::max(running, std::min(1.0, (m - j) * p[order[j]]));
        adj[order[j]] = running;
    }
    return adj;
}

// n_up - n_down: the sign test's direction
static const char* verdict_of(double adjusted_p, int up_minus_down) {
    if (adjusted_p < 0.05 && up_minus_down > 0) return "supported";
    if (adjusted_p < 0.05 && up_minus_down < 0) return "contradicted";
    return "not resolved";
}
static int up_minus_down(const std::vector<double>& d) {
    int n = 0;
    for (double x : d) n += (x > 0) - (x < 0);
    return n;
}

// one claim on one metric: the per-seed deltas and what they say
struct ClaimTest {
    int claim = 0;
    std::string baseline;          // the arm compared against (best-pause resolved)
    std::vector<int> seeds;
    std::vector<double> delta;     // per seed
    double mean = NAN, lo = NAN, hi = NAN, p = 1, p_holm = 1;
    const char* verdict = "not resolved";
};

static double mean_of(const std::vector<double>& v) {
    double s = 0;
    for (double x : v) s += x;
    return v.empty() ? 0 : s / v.size();
}

// deltas, interval and sign test for every claim whose arms ran (per_seed(regime, arm, seed, &value)
// reads one run's metric), then Holm over the family
using PerSeed = std::function<bool(const std::string& regime, const std::string& arm, int seed, double* value)>;
static std::vector<ClaimTest> test_claims(const PerSeed& per_seed,
                                          const std::function<std::string(const Claim&)>& baseline_of, int max_seed,
                                          uint64_t seed) {
    std::vector<ClaimTest> out;
    for (int c = 0; c < N_CLAIMS; c++) {
        ClaimTest t;
        t.claim = c;
        t.baseline = baseline_of(CLAIMS[c]);
        for (int s = 1; s <= max_seed; s++) {
            double a, b;
            if (per_seed(CLAIMS[c].regime, CLAIMS[c].arm, s, &a) && per_seed(CLAIMS[c].regime, t.baseline, s, &b)) {
                t.seeds.push_back(s);
                t.delta.push_back(a - b);
            }
        }
        if (t.delta.empty()) continue;
        t.mean = mean_of(t.delta);
        bootstrap_ci(t.delta, 10000, seed + c, &t.lo, &t.hi);
        t.p = sign_test_p(t.delta);
        out.push_back(t);
    }
    std::vector<double> p;
    for (auto& t : out) p.push_back(t.p);
    std::vector<double> adj = holm_adjust(p);
    for (size_t i = 0; i < out.size(); i++) {
        out[i].p_holm = adj[i];
        out[i].verdict = verdict_of(adj[i], up_minus_down(out[i].delta));
    }
    return out;
}
