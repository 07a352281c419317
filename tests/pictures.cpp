// tests/pictures.cpp -- every kind of picture bt writes is well-formed XML. Included by
// tests/test_bt.cpp (after lab/lab.cpp). The test writes the loss, accuracy and recall plots,
// the probe and update plots and the --trace-html page from a tiny model and tiny fake data, and
// parses each with xml_error, a small strict well-formedness checker written here: one root,
// tags balanced and properly nested, attributes quoted and not repeated, entities valid, UTF-8,
// no control characters. With BT_PICTURES_OUT=DIR the files are kept there (tests/render_check.sh
// renders them in headless Chromium); else they go to a scratch folder that is removed.
#include <unistd.h>

struct XmlChecker {
    const std::string& s;
    size_t i = 0;
    std::string err;   // the first error, "byte N: what"

    bool fail(const std::string& what) {
        if (err.empty()) err = strf("byte %zu: %s", i, what.c_str());
        return false;
    }
    bool at(const char* p) const { return s.compare(i, strlen(p), p) == 0; }
    bool more() const { return i < s.size(); }
    static bool space(char c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r'; }
    static bool name_start(unsigned char c) { return isalpha(c) || c == '_' || c == ':' || c >= 0x80; }
    static bool name_char(unsigned char c) { return name_start(c) || isdigit(c) || c == '-' || c == '.'; }
    bool ws() {   // skips whitespace; says whether there was any
        size_t b = i;
        while (more() && space(s[i])) i++;
        return i > b;
    }
    bool expect(char c) {
        if (!more() || s[i] != c) return fail(strf("expected '%c'", c));
        i++;
        return true;
    }

    // UTF-8 sequences well formed (no overlong two-byte forms), and no control character but tab,
    // newline and carriage return: XML 1.0's Char
    bool chars_ok() {
        for (i = 0; i < s.size();) {
            unsigned char c = s[i];
            int n = c < 0x80 ? 0 : (c >> 5) == 6 ? 1 : (c >> 4) == 14 ? 2 : (c >> 3) == 30 ? 3 : -1;
            if (n < 0 || (n == 1 && c < 0xc2)) return fail("not UTF-8");
            if (c < 0x20 && !space(c)) return fail(strf("control character 0x%02x", c));
            for (int k = 1; k <= n; k++)
                if (i + k >= s.size() || ((unsigned char)s[i + k] >> 6) != 2) return fail("truncated UTF-8 sequence");
            i += n + 1;
        }
        i = 0;
        return true;
    }
    bool name(std::string* out) {
        size_t b = i;
        if (!more() || !name_start(s[i])) return fail("expected a name");
        while (more() && name_char(s[i])) i++;
        *out = s.substr(b, i - b);
        return true;
    }
    // at '&': &amp; &lt; &gt; &quot; &apos;, &#N; or &#xH; of a character XML allows
    bool reference() {
        size_t semi = s.find(';', i);
        if (semi == std::string::npos || semi - i > 10) return fail("'&' that starts no entity (write &amp;)");
        std::string r = s.substr(i + 1, semi - i - 1);
        if (r == "amp" || r == "lt" || r == "gt" || r == "quot" || r == "apos") { i = semi + 1; return true; }
        if (r.size() < 2 || r[0] != '#') return fail("unknown entity &" + r + ";");
        bool hex = r[1] == 'x';
        std::string digits = r.substr(hex ? 2 : 1);
        if (digits.empty() || digits.find_first_not_of(hex ? "0123456789abcdefABCDEF" : "0123456789") != std::string::npos)
            return fail("bad character reference &" + r + ";");
        long v = strtol(digits.c_str(), nullptr, hex ? 16 : 10);
        if (!(v == 9 || v == 10 || v == 13 || (v >= 0x20 && v <= 0xd7ff) || (v >= 0xe000 && v <= 0xfffd) ||
              (v >= 0x10000 && v <= 0x10ffff)))
            return fail("character reference &" + r + "; to a character XML does not allow");
        i = semi + 1;
        return true;
    }
    bool skip_past(const char* end, const char* what) {
        size_t j = s.find(end, i);
        if (j == std::string::npos) return fail(strf("unterminated %s", what));
        i = j + strlen(end);
        return true;
    }
    bool comment() {   // at "<!--"; "--" may not appear inside
        size_t j = s.find("--", i + 4);
        if (j == std::string::npos) return fail("unterminated comment");
        if (s.compare(j, 3, "-->") != 0) { i = j; return fail("'--' inside a comment"); }
        i = j + 3;
        return true;
    }
    // at '<' of a start tag: the name, attributes (each quoted, each name once), then '>' or "/>"
    bool start_tag(std::string* nm, bool* empty) {
        i++;
        if (!name(nm)) return false;
        std::set<std::string> seen;
        for (;;) {
            bool gap = ws();
            if (at("/>")) { i += 2; *empty = true; return true; }
            if (at(">")) { i++; *empty = false; return true; }
            if (!more()) return fail("unexpected end inside <" + *nm + ">");
            if (!gap) return fail("expected whitespace, '>' or '/>' in <" + *nm + ">");
            std::string an;
            if (!name(&an)) return false;
            if (!seen.insert(an).second) return fail("attribute " + an + " given twice in <" + *nm + ">");
            ws();
            if (!expect('=')) return false;
            ws();
            if (!more() || (s[i] != '"' && s[i] != '\'')) return fail("attribute " + an + " is not quoted");
            char q = s[i++];
            while (more() && s[i] != q) {
                if (s[i] == '<') return fail("'<' inside the value of " + an + " (an unclosed quote?)");
                if (s[i] == '&') { if (!reference()) return false; }
                else i++;
            }
            if (!expect(q)) return false;
        }
    }
    // the root element and everything inside it; open tags on a stack
    bool element() {
        std::vector<std::string> open;
        std::string nm;
        bool empty;
        if (!start_tag(&nm, &empty)) return false;
        if (!empty) open.push_back(nm);
        while (!open.empty()) {
            if (!more()) return fail("unexpected end: <" + open.back() + "> is not closed");
            bool ok = true;
            if (at("</")) {
                i += 2;
                ok = name(&nm);
                ws();
                ok = ok && expect('>');
                if (ok && nm != open.back()) { i -= nm.size() + 3; return fail("</" + nm + "> closes <" + open.back() + ">"); }
                if (ok) open.pop_back();
            } else if (at("<!--")) ok = comment();
            else if (at("<![CDATA[")) ok = skip_past("]]>", "CDATA section");
            else if (at("<?")) ok = skip_past("?>", "processing instruction");
            else if (at("<!")) ok = fail("'<!' inside an element");
            else if (at("<")) {
                ok = start_tag(&nm, &empty);
                if (ok && !empty) open.push_back(nm);
            } else if (at("&")) ok = reference();
            else if (at("]]>")) ok = fail("']]>' in text");
            else i++;
            if (!ok) return false;
        }
        return true;
    }
    // comments, processing instructions and whitespace outside the root; a DOCTYPE (without an
    // internal subset) before it
    bool misc(bool doctype_allowed) {
        for (;;) {
            ws();
            if (at("<!--")) { if (!comment()) return false; }
            else if (at("<?")) { if (!skip_past("?>", "processing instruction")) return false; }
            else if (doctype_allowed && at("<!DOCTYPE")) {
                size_t j = s.find('>', i);
                if (j == std::string::npos || s.substr(i, j - i).find('[') != std::string::npos)
                    return fail("a DOCTYPE this checker does not read (unterminated, or an internal subset)");
                i = j + 1;
                doctype_allowed = false;
            } else return true;
        }
    }
    bool document() {
        if (!chars_ok()) return false;
        if (at("<?xml") && !skip_past("?>", "XML declaration")) return false;
        if (!misc(true)) return false;
        if (!at("<") || at("<!") || at("</")) return fail("expected the root element");
        if (!element() || !misc(false)) return false;
        if (more()) return fail("content after the root element (text, or a second root)");
        return true;
    }
};

// "" when text is well-formed XML, else the first error with its byte offset
static std::string xml_error(const std::string& text) {
    XmlChecker x{text, 0, ""};
    x.document();
    return x.err;
}

TEST_CASE("xml_error: well-formed documents pass; broken ones fail, the truncated polyline of the old strf among them") {
    for (const char* ok : {"<a/>", "<a x=\"1\" y='2'>t&lt;&amp;&#233;&#x20AC;<b/><![CDATA[<&]]><!-- c --><?pi x?></a>",
                           "<?xml version=\"1.0\"?>\n<!DOCTYPE html>\n<!-- c -->\n<html><p>caf\u00e9 \u23ce</p></html>\n",
                           "<svg xmlns=\"http://www.w3.org/2000/svg\"><text x = \"1\">a > b</text></svg>"})
        CHECK_MESSAGE(xml_error(ok) == "", ok);
    for (const char* bad : {"", "text", "<a>", "<a></b>", "<a><b></a></b>", "<a x=1/>", "<a x=\"1\" x=\"2\"/>",
                            "<a x=\"1\"y=\"2\"/>", "<a>&foo;</a>", "<a>&amp</a>", "<a>AT&T</a>", "<a>&#0;</a>",
                            "<a/><b/>", "<a/>tail", "<a x=\"<\"/>", "<a><!-- a -- b --></a>", "<a>]]></a>",
                            "<a>\x01</a>", "<a>\xff</a>", "<a><!DOCTYPE x></a>", "<a><b>", "<1a/>"})
        CHECK_MESSAGE(xml_error(bad) != "", bad);
}

// a scratch folder, or BT_PICTURES_OUT to keep the files
static std::string pictures_dir(bool* keep) {
    const char* out = getenv("BT_PICTURES_OUT");
    *keep = out && *out;
    std::string dir = *keep ? out : "/tmp/bt_test_" + std::to_string(getpid()) + "_pictures";
    if (!*keep) std::filesystem::remove_all(dir);
    std::filesystem::create_directories(dir);
    return dir;
}

static Args args_of(std::vector<std::string> v) {
    std::vector<char*> argv;
    for (auto& x : v) argv.push_back((char*)x.c_str());
    Args a;
    parse_args(a, (int)argv.size(), argv.data());
    return a;
}

// a tiny chain model: a backbone of a few steps, then a processor on it (both with .state files,
// so the trace page can tell how they were trained)
static void tiny_trained(const std::string& dir) {
    for (int stage = 0; stage < 2; stage++) {
        TrainRun R;
        R.quiet = true;
        TrainSpec t;
        t.task = "chain"; t.batch = 4; t.log_every = 1000; t.save_every = 0;
        if (stage == 0) { t.d_model = 16; t.layers = 2; t.heads = 2; t.max_seq_len = 96; t.steps = 4; t.out = dir + "/b.safetensors"; }
        else { t.model = "bt"; t.k = 2; t.init = dir + "/b.safetensors"; t.steps = 3; t.out = dir + "/bt.safetensors"; }
        train_setup(R, t);
        train_steps(R, R.step + (stage == 0 ? 4 : 3));
        save_run(R);
    }
}

TEST_CASE("pictures: every SVG and HTML bt writes is well-formed XML (loss, accuracy, learning curves, recall, probes, updates, trace page)") {
    bool keep;
    std::string dir = pictures_dir(&keep);
    // loss and accuracy plots from fake runs: two arms, 5000 steps of loss (thinned to 600 points)
    Experiment ex;
    ex.task = TASK_CHAIN;
    ex.dir = dir;
    std::vector<RunResult> runs;
    for (int arm = 0; arm < 2; arm++)
        for (int seed = 1; seed <= 2; seed++) {
            RunResult r;
            r.regime = "v1"; r.arm = arm ? "bt-joint" : "vanilla"; r.seed = seed; r.steps = 5000; r.params = 1000;
            for (int t = 0; t < 5000; t++) r.loss.push_back(2.0f / (1 + t * (0.01f + 0.01f * arm)) + 0.05f * ((t * 7 + seed) % 5));
            for (int s = TASKS[TASK_CHAIN].train_lo; s <= TASKS[TASK_CHAIN].ood_hi; s++) {
                if (s > TASKS[TASK_CHAIN].train_hi && s < TASKS[TASK_CHAIN].ood_lo) continue;
                r.sizes.push_back(s);
                r.answer.push_back(std::max(0.0, 1.0 - 0.07 * s - 0.05 * arm));
                r.lines.push_back(0.5); r.first_wrong.push_back(2);
            }
            for (int k = 1; k <= CURVE_POINTS; k++) {   // a learning curve, for the curve plots
                r.curve_step.push_back(5000 * k / CURVE_POINTS);
                r.curve_id.push_back(std::min(1.0, 0.15 * k + 0.05 * seed - 0.03 * arm));
                r.curve_ood.push_back(0.02 * k);
            }
            r.step_flops = 1e9 * (1 + arm);
            runs.push_back(r);
        }
    regime_report(ex, "v1", runs, "vanilla");
    // a polyline of 10,000 points is thinned to 600, evenly, the first and last kept
    std::vector<size_t> idx = thin_indices(10000);
    CHECK(idx.size() == (size_t)MAX_POINTS);
    CHECK(idx.front() == 0);
    CHECK(idx.back() == 9999);
    for (size_t j = 1; j < idx.size(); j++) CHECK(idx[j] > idx[j - 1]);
    // ticks: whole numbers on an integer axis, nice steps elsewhere
    int dec;
    for (double t : nice_ticks(2, 13, true, &dec)) CHECK(t == std::round(t));
    CHECK(nice_ticks(3, 5, true, &dec) == std::vector<double>{3, 4, 5});
    std::vector<double> t01 = nice_ticks(0, 1, false, &dec);
    REQUIRE(t01.size() == 6);   // 0, 0.2, ..., 1
    CHECK(t01[3] == doctest::Approx(0.6));
    CHECK(dec == 1);
    CHECK(nice_ticks(0, 5000, true, &dec).size() == 6);   // 0, 1000, ..., 5000
    // the recall picture and the probe and update plots, from the tiny model
    tiny_trained(dir);
    Model M;
    load_model(M, dir + "/bt.safetensors");
    plot_reconsolidation(M, TASK_CHAIN, "chain: what the processor recalls (a tiny model)", dir + "/reconsolidation.svg");
    cmd_probe(args_of({"bt", "probe", "--task", "chain", "--ckpt", dir + "/bt.safetensors", "--n", "4", "--results", dir}));
    // the trace page, through bt generate --trace-html
    cmd_generate(args_of({"bt", "generate", "--ckpt", dir + "/bt.safetensors", "--prompt", "1*4-0+3", "--trace-html",
                          dir + "/trace.html"}));
    std::string page = read_file(dir + "/trace.html", "trace page");
    CHECK(page.find("Rewrite 1 of") != std::string::npos);
    CHECK(page.find("bt generate --ckpt") != std::string::npos);
    CHECK(page.find("bt train --batch 4 --d-model 16") != std::string::npos);   // how the backbone was trained
    CHECK(page.find("<script") == std::string::npos);
    int long_lines = 0;   // files with a line the old strf would have cut
    for (const char* f : {"loss_v1.svg", "accuracy_v1.svg", "curve_v1.svg", "curve_flops_v1.svg", "reconsolidation.svg",
                          "chain/probe-bt.svg", "chain/updates-bt.svg", "trace.html"}) {
        std::string text = read_file(dir + "/" + f, "picture");
        std::string err = xml_error(text);
        CHECK_MESSAGE(err == "", f, ": ", err);
        CHECK(text.size() > 1000);
        // the old strf's bug: its longest line cut at 1023 characters, the rest of that line lost
        size_t ls = 0, longest = 0, len = 0;
        for (size_t b = 0, e; b < text.size(); b = e + 1) {
            e = std::min(text.find('\n', b), text.size());
            if (e - b > len) { len = e - b; longest = b; }
        }
        if (len > 1023) {
            ls = longest;
            std::string cut = text.substr(0, ls + 1023) + text.substr(std::min(text.size(), ls + len + 1));
            CHECK_MESSAGE(xml_error(cut) != "", f, " cut at 1023 characters passed the checker");
            long_lines++;
        }
        CHECK(xml_error(text.substr(0, text.size() / 2)) != "");
    }
    CHECK(long_lines >= 2);   // the loss plot's polylines, the trace page's bar charts
    std::string loss = read_file(dir + "/loss_v1.svg", "loss plot");
    size_t p0 = loss.find("points=\""), p1 = loss.find('"', p0 + 8);
    CHECK(std::count(loss.begin() + p0, loss.begin() + p1, ',') <= MAX_POINTS);
    CHECK(loss.find(">3.75<") == std::string::npos);
    if (!keep) std::filesystem::remove_all(dir);
}
