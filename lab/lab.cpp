// lab/lab.cpp -- bt with its lab: the experiment harness, the probes and the benchmark, built on
// bt.cpp the way the tests are (by including it, never by copying it). make builds bt from this
// file, so `bt experiment`, `bt probe` and `bt bench` sit beside bt.cpp's train, eval, generate
// and score; a build of bt.cpp alone (g++ bt.cpp) has only those four.
//
//   svg.hpp         small SVG plots written by hand (line plots with axes and a legend)
//   trace.cpp       what the bottleneck step did, drawn: the recall picture, bt generate --trace-html
//   claims.cpp      the claims bt experiment tests, and its paired statistics (bootstrap, sign test, Holm)
//   experiment.cpp  bt experiment: every arm on one task over seeds, learning curves, results.md and the plots
//   probe.cpp       bt probe: linear probes on cache entries before and after each rewrite
//   bench.cpp       bt bench: tokens/s, GFLOP/s and memory, beside PyTorch's figures
#include "../bt.cpp"
#include "svg.hpp"
#include "trace.cpp"
#include "claims.cpp"
#include "experiment.cpp"
#include "probe.cpp"
#include "bench.cpp"

static const FlagSpec LAB_FLAGS[] = {
    {"regime", "both", "experiment: v4 (frozen backbone) | v1 (end to end) | both"},
    {"seeds", "3", "experiment: seeds 1..S for every arm (v1's: --v1-seeds, when given)"},
    {"v1-seeds", "", "experiment: seeds 1..S for v1's arms instead (v4's runs are cheaper: more seeds for the same time)"},
    {"first-seed", "", "experiment: start at seed K, to share the seeds among processes or machines (copy their runs/ "
                       "into one folder, then run without it for the whole report)"},
    {"stage1", "300", "experiment v4: steps of the stage-1 backbone"},
    {"stage2", "300", "experiment v4: steps every arm gets on top of it"},
    {"arms", "", "experiment: only these arms, comma-separated (the controls always run)"},
    {"results", "results", "experiment, probe: folder for results/<task>/ (experiment runs are kept there and resumed)"},
    {"quick", "", "a short run (a smoke test, not for the figures)", true},
    {"backbone", "", "probe: the processor-free model to compare with (default: --ckpt with its processor off)"},
    {"torch", "", "PyTorch's rows, JSON lines from tests/bench_torch.py (FILE[,FILE...]; make bench writes them)"},
};

static const Command LAB_COMMANDS[] = {
    {"experiment", "task regime seeds v1-seeds first-seed stage1 stage2 steps n d-model layers heads batch arms results",
     "every arm on a task, several seeds: results/<task>/results.md and plots (resumable)", cmd_experiment},
    {"probe", "ckpt backbone task sizes n seed results",
     "linear probes on cache entries before and after each rewrite, and update statistics (what a rewrite keeps)",
     cmd_probe},
    {"bench", "quick torch device", "tokens/s for training and decoding, matmul GFLOP/s, memory (beside PyTorch: make bench)",
     cmd_bench},
};
static const bool LAB_COMMANDS_ADDED = add_commands(LAB_COMMANDS, sizeof LAB_COMMANDS / sizeof *LAB_COMMANDS,
                                                    LAB_FLAGS, sizeof LAB_FLAGS / sizeof *LAB_FLAGS);
