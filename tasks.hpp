// tasks.hpp -- bt's synthetic tasks as text, included by bt.cpp (it uses bt.cpp's Rng and
// vocabulary) in its "Tasks and data" section: the four generators (chain, add, var, mul; README,
// "Tasks"), the held-out split, the fixed evaluation sets, and examples read from a text file. An
// example's text is "question\nline\n...\n#answer$" (no BOS); its size is its number of steps.
// Nothing here knows the model: bt.cpp turns the text into batches.
#pragma once

enum Task { TASK_CHAIN, TASK_ADD, TASK_VAR, TASK_MUL, TASK_FILE };
struct TaskInfo { const char* name; int train_lo, train_hi, ood_lo, ood_hi; };
static const TaskInfo TASKS[] = {
    {"chain", 2, 8, 9, 16},   // n operations mod 10
    {"add", 1, 6, 7, 12},     // n-digit + n-digit, one column per line
    {"var", 2, 6, 8, 12},     // chain depth, with distractors
    {"mul", 1, 3, 4, 5},      // n-digit x n-digit, one line per digit of the multiplier
};
static const int N_TASKS = 4;

static Task parse_task(const std::string& s) {
    for (int i = 0; i < N_TASKS; i++)
        if (s == TASKS[i].name) return (Task)i;
    BAD_INPUT("unknown task '%s' (expected chain, add, var or mul)", s.c_str());
}

static int apply_op(int a, char op, int d) {
    int r = op == '+' ? a + d : op == '-' ? a - d : a * d;
    return ((r % 10) + 10) % 10;
}

// chain: "1*4-0+3\n1*4=4\n4-0=4\n4+3=7\n#7$"
static std::string gen_chain(Rng& r, int n) {
    int a = r.randint(0, 9);
    std::string q = std::to_string(a), lines;
    for (int i = 0; i < n; i++) {
        char op = "+-*"[r.randint(0, 2)];
        int d = r.randint(0, 9), res = apply_op(a, op, d);
        q += op + std::to_string(d);
        lines += "\n" + std::to_string(a) + op + std::to_string(d) + "=" + std::to_string(res);
        a = res;
    }
    return q + lines + "\n#" + std::to_string(a) + "$";
}

// add, digits least-significant first: "891+721\n8+7+0=5,1\n9+2+1=2,1\n1+1+1=3,0\n#523$"
// (a final carry of 1 becomes one more answer digit)
static std::string gen_add(Rng& r, int n) {
    std::vector<int> a(n), b(n);
    for (int i = 0; i < n; i++) a[i] = r.randint(0, 9);
    for (int i = 0; i < n; i++) b[i] = r.randint(0, 9);
    std::string q, lines, ans;
    for (int i = 0; i < n; i++) q += (char)('0' + a[i]);
    q += '+';
    for (int i = 0; i < n; i++) q += (char)('0' + b[i]);
    int carry = 0;
    for (int i = 0; i < n; i++) {
        int s = a[i] + b[i] + carry;
        lines += strf("\n%d+%d+%d=%d,%d", a[i], b[i], carry, s % 10, s / 10);
        ans += (char)('0' + s % 10);
        carry = s / 10;
    }
    if (carry) ans += '1';
    return q + lines + "\n#" + ans + "$";
}

// var: "t=b+0;a=o-2;q=x+7;o=q*4;x=0\nx=0\nq=x+7=7\no=q*4=8\na=o-2=6\n#6$"
// A chain of `depth` assignments from a constant, shuffled among distractors whose right-hand
// variable is never defined. 2 distractors up to depth 7, 4 beyond (the OOD sizes).
static std::string gen_var(Rng& r, int depth) {
    int nd = depth <= 7 ? 2 : 4;
    if (depth + 2 * nd > 26) BAD_INPUT("var depth %d needs more than the 26 letters (at most 18)", depth);
    std::string letters = "abcdefghijklmnopqrstuvwxyz";
    for (int i = 25; i > 0; i--) std::swap(letters[i], letters[r.randint(0, i)]);
    std::vector<std::string> assigns;
    std::string lines;
    int val = r.randint(0, 9);
    assigns.push_back(strf("%c=%d", letters[0], val));
    lines += strf("\n%c=%d", letters[0], val);
    for (int i = 1; i < depth; i++) {
        char op = "+-*"[r.randint(0, 2)];
        int d = r.randint(0, 9);
        val = apply_op(val, op, d);
        assigns.push_back(strf("%c=%c%c%d", letters[i], letters[i - 1], op, d));
        lines += strf("\n%c=%c%c%d=%d", letters[i], letters[i - 1], op, d, val);
    }
    for (int i = 0; i < nd; i++)
        assigns.push_back(strf("%c=%c%c%d", letters[depth + 2 * i], letters[depth + 2 * i + 1], "+-*"[r.randint(0, 2)],
                               r.randint(0, 9)));
    for (int i = (int)assigns.size() - 1; i > 0; i--) std::swap(assigns[i], assigns[r.randint(0, i)]);
    std::string q;
    for (size_t i = 0; i < assigns.size(); i++) q += (i ? ";" : "") + assigns[i];
    return q + lines + "\n#" + std::to_string(val) + "$";
}

// mul, numbers least-significant digit first: "21*43\n840,840\n0630,8040\n#8040$" is 12 x 34.
// Line i holds the shifted partial product a * b_i * 10^i and the running sum, each written with
// n+1+i digits (zeros fill the high end), so every example of a size has the same layout; the
// answer has 2n digits.
static std::string digits_lsb(uint64_t x, int width) {
    std::string s;
    for (int i = 0; i < width; i++, x /= 10) s += (char)('0' + x % 10);
    return s;
}
static std::string gen_mul(Rng& r, int n) {
    std::string qa, qb;
    uint64_t a = 0, b = 0, p10 = 1;
    for (int i = 0; i < n; i++, p10 *= 10) {
        int da = r.randint(0, 9), db = r.randint(0, 9);
        qa += (char)('0' + da); qb += (char)('0' + db);
        a += da * p10; b += db * p10;
    }
    std::string lines;
    uint64_t sum = 0, shift = 1;
    for (int i = 0; i < n; i++, shift *= 10) {
        uint64_t part = a * (uint64_t)(qb[i] - '0') * shift;
        sum += part;
        lines += "\n" + digits_lsb(part, n + 1 + i) + "," + digits_lsb(sum, n + 1 + i);
    }
    return qa + "*" + qb + lines + "\n#" + digits_lsb(sum, 2 * n) + "$";
}

static std::string question_of(const std::string& text) { return text.substr(0, text.find('\n')); }

// Held-out split: a question whose FNV-1a hash is 0 mod 8 is for evaluation only; the training
// stream never contains it, so the two splits are disjoint by construction.
static bool is_eval_question(const std::string& q) {
    uint64_t h = 1469598103934665603ull;
    for (char ch : q) h = (h ^ (unsigned char)ch) * 1099511628211ull;
    return h % 8 == 0;
}

static std::string gen_example(Task task, Rng& r, int size, bool eval_split) {
    for (;;) {
        std::string t = task == TASK_CHAIN ? gen_chain(r, size) : task == TASK_ADD ? gen_add(r, size)
                       : task == TASK_VAR   ? gen_var(r, size) : gen_mul(r, size);
        if (is_eval_question(question_of(t)) == eval_split) return t;
    }
}

// ---- examples from a text file: one example per block of lines, blocks separated by a blank line
struct Example { std::string text; int size; };


// Examples in the task text format, separated by blank lines. path only names the source in errors.
static std::vector<Example> parse_examples(const std::string& text, const std::string& path) {
    std::istringstream f(text);
    std::vector<Example> out;
    std::vector<std::string> cur;
    int lineno = 0, start = 1;
    std::string line;
    auto finish = [&]() {
        if (cur.empty()) return;
        if (cur.size() < 2)
            BAD_INPUT("%s: line %d: an example needs a question line and an answer line '#...$'", path.c_str(), start);
        const std::string& last = cur.back();
        if (last.size() < 3 || last[0] != '#' || last.back() != '$')
            BAD_INPUT("%s: line %d: the last line of an example must look like '#<answer>$', got '%s'", path.c_str(),
                      start + (int)cur.size() - 1, last.c_str());
        std::string text;
        for (size_t i = 0; i < cur.size(); i++) text += (i ? "\n" : "") + cur[i];
        out.push_back({text, (int)cur.size() - 2});
        cur.clear();
    };
    while (std::getline(f, line)) {
        lineno++;
        if (!line.empty() && line.back() == '\r') line.pop_back();
        if (line.empty()) { finish(); continue; }
        for (size_t i = 0; i < line.size(); i++)
            if (char_to_token(line[i]) < 0 || line[i] == '\n')
                BAD_INPUT("%s: line %d, column %d: character '%c' (byte 0x%02x) is not in the vocabulary", path.c_str(),
                          lineno, (int)i + 1, line[i], (unsigned char)line[i]);
        if (cur.empty()) start = lineno;
        cur.push_back(line);
    }
    finish();
    if (out.empty()) BAD_INPUT("%s: no examples found (examples are separated by blank lines)", path.c_str());
    return out;
}

static std::vector<Example> read_examples(const std::string& path) {
    return parse_examples(read_file(path, "data file"), path);
}

// the evaluation set of one size: count held-out examples, fixed by seed (bt eval's --seed; the
// experiment passes one seed for every arm and run, so they all see the same problems)
static std::vector<std::string> eval_set(Task task, int size, int count, uint64_t seed) {
    Rng r(seed * 1000003ull + size);
    std::vector<std::string> out;
    for (int i = 0; i < count; i++) out.push_back(gen_example(task, r, size, true));
    return out;
}
