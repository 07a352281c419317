// cli.hpp -- bt's command line: flags (FlagSpec), the parsed arguments (Args), the table of commands
// (Command, add_commands) and parse_args. bt.cpp lists its flags and commands; lab/lab.cpp adds its own.
// At the end, TrainSpec: a training run's settings, typed, and spec_args, the Args they stand for.
#pragma once
#include <cmath>
#include <map>
#include <optional>
#include <set>
#include <sstream>
#include <string>
#include <vector>
#include "io.hpp"

struct FlagSpec { const char* name; const char* def; const char* help; bool boolean = false; };
struct Args {
    std::string cmd;
    std::map<std::string, std::string> v;
    std::set<std::string> given;
    bool has(const std::string& k) const { return given.count(k) > 0; }
    std::string str(const std::string& k) const { return v.at(k); }
    double num(const std::string& k, double lo, double hi) const {
        char* end;
        const std::string& s = v.at(k);
        double x = strtod(s.c_str(), &end);
        if (s.empty() || *end != 0 || std::isnan(x)) BAD_INPUT("--%s '%s' is not a number (try bt %s --help)", k.c_str(), s.c_str(), cmd.c_str());
        if (x < lo || x > hi) BAD_INPUT("--%s %s is out of range [%g, %g] (try bt %s --help)", k.c_str(), s.c_str(), lo, hi, cmd.c_str());
        return x;
    }
    int integer(const std::string& k, int lo, int hi) const {
        double x = num(k, lo, hi);
        if (x != (int)x) BAD_INPUT("--%s must be a whole number, got %s", k.c_str(), v.at(k).c_str());
        return (int)x;
    }
};

// A command: its name, the flags it accepts (space-separated), one line of help, what runs it.
// bt.cpp's commands are listed at its end (CORE_COMMANDS); lab/lab.cpp adds experiment, probe and
// bench with add_commands, so the bt that make builds has all seven.
struct Command { const char* name; const char* flags; const char* help; void (*run)(const Args&); };
static std::vector<Command> g_commands;
static std::vector<FlagSpec> g_flags;

static bool add_commands(const Command* c, int nc, const FlagSpec* f, int nf) {
    g_commands.insert(g_commands.end(), c, c + nc);
    g_flags.insert(g_flags.end(), f, f + nf);
    return true;
}

static void print_usage(FILE* f) {
    fprintf(f, "usage: bt <command> [--flag value ...]     (bt <command> --help lists its flags)\n\ncommands:\n");
    for (auto& c : g_commands) fprintf(f, "  %-11s %s\n", c.name, c.help);
}

static void print_command_help(const Command& c) {
    printf("usage: bt %s [--flag value ...]\n%s\n\nflags (default in brackets):\n", c.name, c.help);
    std::stringstream ss(c.flags);
    std::string f;
    while (ss >> f)
        for (auto& fs : g_flags)
            if (f == fs.name) printf("  --%-12s %s%s%s%s\n", fs.name, fs.help, fs.def[0] ? " [" : "", fs.def, fs.def[0] ? "]" : "");
}

// Fills a from argv and returns the command to run, or nullptr when help was printed.
static const Command* parse_args(Args& a, int argc, char** argv) {
    if (argc < 2) { print_usage(stderr); throw BtError(2, "no command given"); }
    a.cmd = argv[1];
    if (a.cmd == "--help" || a.cmd == "-h" || a.cmd == "help") { print_usage(stdout); return nullptr; }
    const Command* cmd = nullptr;
    std::string names;
    for (auto& c : g_commands) {
        if (a.cmd == c.name) cmd = &c;
        names += (names.empty() ? "" : ", ") + std::string(c.name);
    }
    if (!cmd) BAD_INPUT("unknown command '%s' (commands: %s; try bt --help)", a.cmd.c_str(), names.c_str());
    std::set<std::string> allowed;
    std::stringstream ss(cmd->flags);
    std::string f;
    while (ss >> f) allowed.insert(f);
    for (auto& fs : g_flags) a.v[fs.name] = fs.def;
    for (int i = 2; i < argc; i++) {
        std::string s = argv[i];
        if (s == "--help" || s == "-h") { print_command_help(*cmd); return nullptr; }
        if (s.rfind("--", 0) != 0) BAD_INPUT("unexpected argument '%s' (flags look like --name value)", s.c_str());
        std::string name = s.substr(2);
        if (!allowed.count(name))
            BAD_INPUT("bt %s has no option --%s (try bt %s --help)", a.cmd.c_str(), name.c_str(), a.cmd.c_str());
        bool boolean = false;
        for (auto& fs : g_flags) boolean |= name == fs.name && fs.boolean;
        if (boolean) { a.v[name] = "1"; a.given.insert(name); continue; }
        if (i + 1 >= argc) BAD_INPUT("--%s needs a value (try bt %s --help)", name.c_str(), a.cmd.c_str());
        a.v[name] = argv[++i];
        a.given.insert(name);
    }
    return cmd;
}

// A training run's settings, typed: the experiment, the bench and the tests start runs with one
// of these instead of a command line. Each field is the bt train flag of its name (d_model is
// --d-model); an unset field takes the flag's default. What is set is what "given" means on the
// command line: --resume keeps exactly those, and with --init the processor's settings come from
// the checkpoint unless set.
struct TrainSpec {
    std::optional<std::string> model, task, data, init, out, resume, schedule, bptt;
    std::optional<int> steps, batch, warmup, seed, d_model, layers, heads, ffn, max_seq_len;
    std::optional<int> proc_width, proc_layers, proc_heads, proc_ffn, k, pause, latent, log_every, save_every;
    std::optional<double> lr, wd, clip;
    bool joint = false;
};

// the Args bt train's command line would give for t: every flag's default, then the fields set
static Args spec_args(const TrainSpec& t) {
    using S = TrainSpec;
    static const std::pair<const char*, std::optional<std::string> S::*> TEXT[] = {
        {"model", &S::model}, {"task", &S::task}, {"data", &S::data}, {"init", &S::init}, {"out", &S::out},
        {"resume", &S::resume}, {"schedule", &S::schedule}, {"bptt", &S::bptt}};
    static const std::pair<const char*, std::optional<int> S::*> INT[] = {
        {"steps", &S::steps}, {"batch", &S::batch}, {"warmup", &S::warmup}, {"seed", &S::seed},
        {"d-model", &S::d_model}, {"layers", &S::layers}, {"heads", &S::heads}, {"ffn", &S::ffn},
        {"max-seq-len", &S::max_seq_len}, {"proc-width", &S::proc_width}, {"proc-layers", &S::proc_layers},
        {"proc-heads", &S::proc_heads}, {"proc-ffn", &S::proc_ffn}, {"k", &S::k}, {"pause", &S::pause},
        {"latent", &S::latent}, {"log-every", &S::log_every}, {"save-every", &S::save_every}};
    static const std::pair<const char*, std::optional<double> S::*> REAL[] = {
        {"lr", &S::lr}, {"wd", &S::wd}, {"clip", &S::clip}};
    Args a;
    a.cmd = "train";
    for (auto& fs : g_flags) a.v[fs.name] = fs.def;
    auto set = [&](const char* name, const std::string& v) { a.v[name] = v; a.given.insert(name); };
    for (auto& f : TEXT) if (t.*f.second) set(f.first, *(t.*f.second));
    for (auto& f : INT) if (t.*f.second) set(f.first, std::to_string(*(t.*f.second)));
    for (auto& f : REAL) if (t.*f.second) set(f.first, strf("%.17g", *(t.*f.second)));
    if (t.joint) set("joint", "1");
    return a;
}
