// lab/trace.cpp -- what the bottleneck step did, drawn. Included by lab/lab.cpp after bt.cpp and
// lab/svg.hpp. Both pictures read a Decoder's Rewrite records (bt.cpp, "Decoding": a Decoder
// with keep_rewrites set keeps one per boundary).
//   recall_svg        one example: a column per cache position (its character below), a row per
//                     rewrite, coloured by the selection score, the recalled entries outlined
//                     (results/<task>/reconsolidation.svg, and the top of the trace page)
//   write_trace_html  bt generate --trace-html FILE: one page, a section per rewrite, per layer
//                     the gate, the recalled entries with their scores, ||dK||/||K|| and
//                     ||dV||/||V|| of every entry as bars. No script; XHTML-compatible markup,
//                     so tests/pictures.cpp parses it with the same XML checker as the SVGs.

// a cache entry's character as a label: BOS as ▸, a newline as ⏎, PAUSE as its '_'
static std::string token_glyph(int t) {
    if (t == BOS) return "\u25b8";
    if (t == NEWLINE) return "\u23ce";
    if (t == PAD) return "\u00b7";
    return xml_escape(std::string(1, token_to_char(t)));
}

// the characters of positions [s,e) as plain text (XML-escaped), BOS and newlines left out
// (an empty line: its newline, ⏎)
static std::string line_text(const Decoder& D, int s, int e) {
    std::string out;
    for (int t = s; t < e; t++)
        if (D.S.tokens[t] != BOS && D.S.tokens[t] != NEWLINE && D.S.tokens[t] != PAD) out += token_to_char(D.S.tokens[t]);
    return out.empty() ? "\u23ce" : xml_escape(out);
}

// The colour of a score x in [0, 1]: white through light blue to dark blue, linear between five
// stops (ColorBrewer's "Blues"); RAMP_STOPS also draws the legend's gradient
static const int RAMP_STOPS[5][3] = {{247, 251, 255}, {198, 219, 239}, {107, 174, 214}, {33, 113, 181}, {8, 48, 107}};
static std::string ramp_colour(double x) {
    x = std::min(1.0, std::max(0.0, x)) * 4;
    int i = std::min(3, (int)x);
    double f = x - i;
    int rgb[3];
    for (int c = 0; c < 3; c++) rgb[c] = (int)lround(RAMP_STOPS[i][c] + f * (RAMP_STOPS[i + 1][c] - RAMP_STOPS[i][c]));
    return strf("#%02x%02x%02x", rgb[0], rgb[1], rgb[2]);
}
// <defs> with the gradient "ramp" (bottom: 0, top: 1) for a vertical legend bar
static std::string ramp_defs() {
    std::string s = "<defs><linearGradient id=\"ramp\" x1=\"0\" y1=\"1\" x2=\"0\" y2=\"0\">";
    for (int i = 0; i < 5; i++) s += strf("<stop offset=\"%.2f\" stop-color=\"%s\"/>", i / 4.0, ramp_colour(i / 4.0).c_str());
    return s + "</linearGradient></defs>\n";
}

static const char* RECALLED_COLOUR = "#d62728";   // the outline of a recalled entry
static const char* LINE_COLOUR = "#bdbdbd";       // the line just written (consolidated)

// ---- the recall picture
// One panel per layer, stacked. Cells of 12 to 20 px. Panel l: row j is rewrite j (labelled by the line it closed),
// column p is cache position p. Cell (j, p): p < s: the score select_forward gave p, coloured
// on the layer's own scale (legend bar at the right: its min and max); s <= p < e: grey, the
// line itself; red outline: p was recalled (top-k). Below the rows, the characters.
static std::string recall_svg(const Decoder& D, const std::string& title, const std::string& subtitle) {
    const Config& c = D.M->cfg;
    const std::vector<Rewrite>& R = D.rewrites;
    int n = D.S.n_tok, nb = (int)R.size();
    const double cell = std::min(20.0, std::max(12.0, 900.0 / std::max(n, 1)));   // 12 to 20 px
    size_t label_chars = 4;
    for (auto& r : R) label_chars = std::max(label_chars, (size_t)(r.e - r.s));
    double x0 = 16 + 7.0 * label_chars, rows_h = std::max(cell * nb, 44.0);
    double panel_h = 18 + rows_h + 34, top = 78;
    double W = std::max(x0 + cell * n + 110, 760.0), H = top + c.L * panel_h + 10;
    std::string s = svg_begin(W, H) + ramp_defs();
    s += strf("<text x=\"10\" y=\"18\" font-size=\"13\">%s</text>\n", xml_escape(title).c_str());
    s += strf("<text x=\"10\" y=\"36\">%s</text>\n", xml_escape(subtitle).c_str());
    // the key: a scored cell, a recalled cell, a line cell
    s += strf("<rect x=\"10\" y=\"46\" width=\"12\" height=\"12\" fill=\"%s\"/>", ramp_colour(0.6).c_str());
    s += "<text x=\"26\" y=\"56\">score of an older entry: the mean attention the line's queries gave it (over heads)</text>\n";
    s += strf("<rect x=\"471\" y=\"47\" width=\"10\" height=\"10\" fill=\"%s\" stroke=\"%s\" stroke-width=\"2\"/>",
              ramp_colour(0.9).c_str(), RECALLED_COLOUR);
    s += "<text x=\"487\" y=\"56\">recalled (top-k)</text>\n";
    s += strf("<rect x=\"590\" y=\"46\" width=\"12\" height=\"12\" fill=\"%s\"/>", LINE_COLOUR);
    s += "<text x=\"606\" y=\"56\">the line just written</text>\n";
    s += "<text x=\"10\" y=\"72\" fill=\"#555\">\u25b8 = BOS, \u23ce = newline; rows: one per rewrite, labelled by the line it closed</text>\n";
    if (nb == 0) s += "<text x=\"10\" y=\"100\">no rewrites: this model has no processor, or the text has no boundary</text>\n";
    for (int l = 0; l < c.L && nb > 0; l++) {
        double y0 = top + l * panel_h + 18, lo = INFINITY, hi = -INFINITY;
        for (auto& r : R)
            for (float x : r.layers[l].score) { lo = std::min(lo, (double)x); hi = std::max(hi, (double)x); }
        if (!(hi > lo)) { lo = 0; hi = std::max(hi, 1e-6); }
        s += strf("<text x=\"10\" y=\"%.0f\" font-weight=\"bold\">layer %d</text>\n", y0 - 5, l);
        for (int p = 0; p < n; p += 10)   // every tenth position, numbered above the rows
            s += strf("<text x=\"%.1f\" y=\"%.0f\" text-anchor=\"middle\" fill=\"#777\" font-size=\"9\">%d</text>\n",
                      x0 + cell * p + cell / 2, y0 - 4, p);
        for (int j = 0; j < nb; j++) {
            const Rewrite& r = R[j];
            const RewriteLayer& w = r.layers[l];
            double y = y0 + cell * j;
            s += strf("<text x=\"%.0f\" y=\"%.1f\" text-anchor=\"end\" font-family=\"monospace\">%s</text>\n", x0 - 6,
                      y + cell / 2 + 4, line_text(D, r.s, r.e).c_str());
            for (int p = 0; p < r.e; p++) {
                std::string fill = p >= r.s ? LINE_COLOUR : w.score.empty() ? "#eeeeee" : ramp_colour((w.score[p] - lo) / (hi - lo));
                s += strf("<rect x=\"%.1f\" y=\"%.1f\" width=\"%.0f\" height=\"%.0f\" fill=\"%s\"/>", x0 + cell * p, y, cell,
                          cell, fill.c_str());
            }
            for (int i = 0; i < w.n_recalled; i++)   // outlines drawn last, inset so neighbours stay apart
                s += strf("<rect x=\"%.1f\" y=\"%.1f\" width=\"%.0f\" height=\"%.0f\" fill=\"none\" stroke=\"%s\" "
                          "stroke-width=\"2\"/>", x0 + cell * w.sel[i] + 1, y + 1, cell - 2, cell - 2, RECALLED_COLOUR);
            s += "\n";
        }
        s += strf("<rect x=\"%.0f\" y=\"%.0f\" width=\"%.0f\" height=\"%.0f\" fill=\"none\" stroke=\"#999\"/>\n", x0, y0,
                  cell * n, cell * nb);
        for (int p = 0; p < n; p++)   // the characters, one per column
            s += strf("<text x=\"%.1f\" y=\"%.0f\" text-anchor=\"middle\" font-family=\"monospace\">%s</text>", x0 + cell * p + cell / 2,
                      y0 + cell * nb + 13, token_glyph(D.S.tokens[p]).c_str());
        // the legend bar: the layer's min score at the bottom, its max at the top
        double bx = x0 + cell * n + 14, bh = rows_h;
        s += strf("\n<rect x=\"%.0f\" y=\"%.0f\" width=\"12\" height=\"%.0f\" fill=\"url(#ramp)\" stroke=\"#999\"/>\n", bx, y0, bh);
        s += strf("<text x=\"%.0f\" y=\"%.0f\">%.3f max</text>\n", bx + 16, y0 + 9, hi);
        s += strf("<text x=\"%.0f\" y=\"%.0f\">%.3f min</text>\n", bx + 16, y0 + bh, lo);
        s += strf("<text x=\"%.0f\" y=\"%.0f\" fill=\"#555\">score</text>\n", bx + 16, y0 + bh / 2 + 4);
    }
    return s + "</svg>\n";
}

// ---- the trace page

// the ratios ||post - pre|| / ||pre|| of entry n
static double ratio_k(const RewriteLayer& w, size_t n) { return w.dk[n] / std::max(w.k[n], 1e-30f); }
static double ratio_v(const RewriteLayer& w, size_t n) { return w.dv[n] / std::max(w.v[n], 1e-30f); }

// One layer's rewrite as bars: per rewritten entry (in sel order: recalled, then the line), the
// K bar (blue) and the V bar (orange), height ratio / top; below, the character and position.
// Recalled entries on a pink ground. Hovering a bar shows its value (an SVG <title>).
static std::string entry_bars_svg(const Decoder& D, const RewriteLayer& w, double top) {
    const double slot = 28, ph = 56, x0 = 52, y1 = 10 + ph;
    size_t nS = w.sel.size();
    std::string s = strf("<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"%.0f\" height=\"%.0f\" font-family=\"sans-serif\" "
                         "font-size=\"10\">\n", x0 + slot * nS + 8, y1 + 30);
    s += strf("<line x1=\"%.0f\" y1=\"%.0f\" x2=\"%.0f\" y2=\"%.0f\" stroke=\"#444\"/>", x0 - 2, y1, x0 + slot * nS, y1);
    s += strf("<line x1=\"%.0f\" y1=\"10\" x2=\"%.0f\" y2=\"%.0f\" stroke=\"#444\"/>", x0 - 2, x0 - 2, y1);
    s += strf("<text x=\"%.0f\" y=\"14\" text-anchor=\"end\" fill=\"#555\">%.3g</text>", x0 - 5, top);
    s += strf("<text x=\"%.0f\" y=\"%.0f\" text-anchor=\"end\" fill=\"#555\">0</text>\n", x0 - 5, y1);
    for (size_t n = 0; n < nS; n++) {
        double x = x0 + slot * n, hk = ph * ratio_k(w, n) / top, hv = ph * ratio_v(w, n) / top;
        bool recalled = (int)n < w.n_recalled;
        if (recalled) s += strf("<rect x=\"%.0f\" y=\"6\" width=\"%.0f\" height=\"%.0f\" fill=\"#fde0dd\"/>", x, slot - 2, y1 + 22);
        s += strf("<rect x=\"%.1f\" y=\"%.1f\" width=\"10\" height=\"%.1f\" fill=\"%s\"><title>||dK||/||K|| %.4f</title></rect>",
                  x + 3, y1 - hk, hk, PALETTE[0], ratio_k(w, n));
        s += strf("<rect x=\"%.1f\" y=\"%.1f\" width=\"10\" height=\"%.1f\" fill=\"%s\"><title>||dV||/||V|| %.4f</title></rect>",
                  x + 13, y1 - hv, hv, PALETTE[3], ratio_v(w, n));
        s += strf("<text x=\"%.0f\" y=\"%.0f\" text-anchor=\"middle\" font-family=\"monospace\" font-size=\"12\"%s>%s</text>",
                  x + slot / 2 - 1, y1 + 13, recalled ? " fill=\"#b2182b\"" : "", token_glyph(D.S.tokens[w.sel[n]]).c_str());
        s += strf("<text x=\"%.0f\" y=\"%.0f\" text-anchor=\"middle\" fill=\"#777\" font-size=\"9\">%d</text>\n", x + slot / 2 - 1,
                  y1 + 24, w.sel[n]);
    }
    return s + "</svg>";
}

// a word for a shell: as it is when it is plain, else in single quotes
static std::string shell_word(const std::string& w) {
    if (!w.empty() && w.find_first_not_of("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_./=:,+") == std::string::npos)
        return w;
    std::string q = "'";
    for (char ch : w) q += ch == '\'' ? std::string("'\\''") : std::string(1, ch);
    return q + "'";
}

// the bt command line of a parsed command (the flags given, in the flag table's order)
static std::string command_line(const Args& a) {
    std::string s = "bt " + a.cmd;
    for (auto& f : g_flags)
        if (a.has(f.name)) s += " --" + std::string(f.name) + (f.boolean ? "" : " " + shell_word(a.str(f.name)));
    return s;
}

// How the checkpoint was trained, as far as the files tell: the flags kept in its .state file,
// then the same for the checkpoint its --init named (a backbone), oldest first
static std::vector<std::string> training_history(std::string ckpt) {
    std::vector<std::string> cmds;
    for (int depth = 0; depth < 8 && !ckpt.empty() && std::ifstream(state_path(ckpt)).good(); depth++) {
        SafeFile st = read_safetensors(state_path(ckpt));
        std::string cmd = "bt train", next;
        for (auto& kv : st.meta)
            if (kv.first.rfind("flag.", 0) == 0) {
                std::string name = kv.first.substr(5);
                bool boolean = false;
                for (auto& f : g_flags) boolean |= name == f.name && f.boolean;
                cmd += " --" + name + (boolean ? "" : " " + shell_word(kv.second));
                if (name == "init") next = kv.second;
            }
        cmds.insert(cmds.begin(), cmd);
        ckpt = next;
    }
    return cmds;
}

static const char* TRACE_CSS =
    "body { font-family: sans-serif; margin: 24px; color: #222; max-width: 1600px; }\n"
    "code, pre { font-family: monospace; background: #f4f4f4; padding: 1px 4px; }\n"
    "pre { padding: 8px; }\n"
    "table { border-collapse: collapse; margin: 6px 0 12px 0; }\n"
    "td, th { border: 1px solid #ccc; padding: 3px 8px; text-align: left; vertical-align: middle; }\n"
    "th { background: #f0f0f0; font-weight: normal; }\n"
    "details { margin: 10px 0; border-top: 1px solid #ddd; padding-top: 6px; }\n"
    "summary { font-weight: bold; cursor: pointer; }\n"
    ".rec { color: #b2182b; white-space: nowrap; }\n"
    ".note { color: #555; }\n"
    ".key { display: inline-block; width: 10px; height: 10px; margin: 0 3px 0 10px; }\n";

// one rewrite: the span it consolidated, then a row per layer
static std::string rewrite_section(const Decoder& D, const Rewrite& r, int j, double top) {
    std::string span;
    for (int t = r.s; t < r.e; t++) span += token_glyph(D.S.tokens[t]);
    std::string h = strf("<details open=\"open\" id=\"r%d\"><summary>Rewrite %d of %zu: the line <code>%s</code> "
                         "(positions %d..%d)</summary>\n", j + 1, j + 1, D.rewrites.size(), line_text(D, r.s, r.e).c_str(),
                         r.s, r.e - 1);
    h += strf("<p>Consolidated: positions %d..%d, <code>%s</code>.", r.s, r.e - 1, span.c_str());
    if (D.M->cfg.periodic) h += " Periodic schedule: the whole cache, positions 0.." + std::to_string(r.e - 1) + ", is rewritten.";
    h += "</p>\n<table>\n<tr><th>layer</th><th>gate \u03c3(g)</th><th>recalled: position, character, score</th>"
         "<th>||\u0394K||/||K|| (blue) and ||\u0394V||/||V|| (orange) of each entry rewritten</th></tr>\n";
    for (size_t l = 0; l < r.layers.size(); l++) {
        const RewriteLayer& w = r.layers[l];
        std::string rec;
        for (int i = 0; i < w.n_recalled; i++)
            rec += strf("%s<span class=\"rec\">%d <code>%s</code> %.3f</span>", i ? ", " : "", w.sel[i],
                        token_glyph(D.S.tokens[w.sel[i]]).c_str(), w.score[w.sel[i]]);
        if (w.n_recalled == 0) rec = D.M->cfg.periodic ? "(periodic: no selection)" : "none (no older entries, or k = 0)";
        h += strf("<tr><td>%zu</td><td>%.3f</td><td>%s</td><td>%s</td></tr>\n", l, w.gate, rec.c_str(),
                  entry_bars_svg(D, w, top).c_str());
    }
    return h + "</table>\n</details>\n";
}

// bt generate --trace-html FILE: the whole page, written atomically
static void write_trace_html(const std::string& path, const Args& a, const Decoder& D, const std::string& prompt,
                             const std::string& out) {
    const Config& c = D.M->cfg;
    double top = 1e-6;   // one bar scale for the page, so rewrites compare
    for (auto& r : D.rewrites)
        for (auto& w : r.layers)
            for (size_t n = 0; n < w.sel.size(); n++) top = std::max(top, std::max(ratio_k(w, n), ratio_v(w, n)));
    std::string h = "<!DOCTYPE html>\n<html xmlns=\"http://www.w3.org/1999/xhtml\" lang=\"en\">\n<head>\n"
                    "<meta charset=\"utf-8\"/>\n<title>bt: every rewrite of one generation</title>\n<style>\n";
    h += std::string(TRACE_CSS) + "</style>\n</head>\n<body>\n<h1>Every rewrite of one generation</h1>\n";
    h += "<p>Made by <code>" + xml_escape(command_line(a)) + "</code>.";
    std::vector<std::string> hist = training_history(a.str("ckpt"));
    if (!hist.empty()) {
        h += " The checkpoint was trained by";
        for (size_t i = 0; i < hist.size(); i++) h += (i ? ", then " : " ") + ("<code>" + xml_escape(hist[i]) + "</code>");
        h += ".";
    }
    h += "</p>\n";
    h += strf("<p class=\"note\">Model: d_model %d, %d layers, %d heads; processor width %d, %d block(s), %d heads, k %d, "
              "schedule %s. Greedy decoding; %zu rewrites.</p>\n", c.C, c.L, c.NH, c.proc_width, c.proc_layers, c.proc_heads,
              c.k, c.periodic ? strf("periodic:%d", c.periodic).c_str() : "newline", D.rewrites.size());
    h += "<pre>" + xml_escape(prompt) + xml_escape(out) + "</pre>\n";
    h += "<p>At the end of every line (the bottleneck step) each layer's Cache Processor rewrites the cache entries of "
         "the line just written (consolidation) and the k older entries with the highest selection score (recall): "
         "score(p) is the attention the line's queries paid to position p, averaged over heads and queries. Each "
         "rewritten entry moves by \u03c3(g) times the processor's output: its change relative to its norm is drawn as "
         "bars (one scale for the whole page: full height = " + strf("%.3g", top) + "; hover a bar for its value).</p>\n";
    if (D.rewrites.empty()) h += "<p>No rewrites: this model has no processor, or the text reached no boundary.</p>\n";
    else h += recall_svg(D, "What each layer recalled at each rewrite", "prompt " + prompt.substr(0, prompt.size() - 1));
    h += "<p>";
    for (size_t j = 0; j < D.rewrites.size(); j++) h += strf("<a href=\"#r%zu\">rewrite %zu</a> ", j + 1, j + 1);
    h += "</p>\n";
    for (size_t j = 0; j < D.rewrites.size(); j++) h += rewrite_section(D, D.rewrites[j], (int)j, top);
    write_file(path, h + "</body>\n</html>\n");
}

static const bool TRACE_HTML_SET = (g_trace_html = write_trace_html, true);
