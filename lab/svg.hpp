// lab/svg.hpp -- small SVG plots written by hand (no plotting dependency), for lab/experiment.cpp,
// lab/probe.cpp and lab/trace.cpp. Included by lab/lab.cpp after bt.cpp.
// Every picture bt writes must be well-formed XML: text goes through xml_escape, and
// tests/pictures.cpp parses each kind of file (CI also renders them in headless Chromium).
#pragma once

static const char* PALETTE[] = {"#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b",
                                "#e377c2", "#7f7f7f", "#bcbd22", "#17becf", "#000000", "#aec7e8"};

// text for an XML attribute or element: & < > " ' as entities
static std::string xml_escape(const std::string& s) {
    std::string out;
    for (char ch : s) {
        if (ch == '&') out += "&amp;";
        else if (ch == '<') out += "&lt;";
        else if (ch == '>') out += "&gt;";
        else if (ch == '"') out += "&quot;";
        else if (ch == '\'') out += "&#39;";
        else out += ch;
    }
    return out;
}

// the opening of an SVG of W x H px on a white background (close it with "</svg>\n")
static std::string svg_begin(double W, double H) {
    return strf("<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"%.0f\" height=\"%.0f\" font-family=\"sans-serif\" "
                "font-size=\"11\">\n<rect width=\"100%%\" height=\"100%%\" fill=\"white\"/>\n", W, H);
}

// Tick marks for an axis over [lo, hi]: the multiples of a "nice" step (1, 2 or 5 x 10^n) that
// fall inside, 4 to 9 of them. integer: the step is at least 1 (an axis of whole numbers
// such as problem sizes or steps gets no 3.75). Returns the ticks; *decimals: digits to print.
static std::vector<double> nice_ticks(double lo, double hi, bool integer, int* decimals) {
    double span = hi > lo ? hi - lo : 1, raw = span / 8, mag = pow(10, floor(log10(raw))), step = 10 * mag;
    for (double m : {1.0, 2.0, 5.0})
        if (m * mag >= raw) { step = m * mag; break; }
    if (integer) step = std::max(step, 1.0);
    *decimals = step >= 1 ? 0 : (int)ceil(-log10(step) - 1e-9);
    std::vector<double> t;
    for (double k = ceil(lo / step - 1e-9); k * step <= hi + 1e-9 * span; k++) t.push_back(k == 0 ? 0.0 : k * step);   // no -0
    return t;
}

struct Plot {   // a frame with axes in data coordinates x0..x1, y0..y1
    std::string svg;
    double W = 640, H = 400, L = 60, R = 170, T = 30, B = 45, x0, x1, y0, y1;
    double px(double x) const { return L + (x - x0) / (x1 - x0) * (W - L - R); }
    double py(double y) const { return H - B - (y - y0) / (y1 - y0) * (H - T - B); }
};

// the frame, its title, axis labels and ticks. x_integer: the x axis holds whole numbers (ticks
// only at integers: problem sizes, training steps)
static Plot plot_begin(const std::string& title, const std::string& xl, const std::string& yl, double x0, double x1,
                       double y0, double y1, bool x_integer = false) {
    Plot p;
    p.x0 = x0; p.x1 = x1 > x0 ? x1 : x0 + 1; p.y0 = y0; p.y1 = y1 > y0 ? y1 : y0 + 1;
    p.svg = svg_begin(p.W, p.H);
    p.svg += strf("<text x=\"%.0f\" y=\"18\" font-size=\"13\">%s</text>\n", p.L, xml_escape(title).c_str());
    p.svg += strf("<rect x=\"%.0f\" y=\"%.0f\" width=\"%.0f\" height=\"%.0f\" fill=\"none\" stroke=\"#444\"/>\n", p.L, p.T,
                  p.W - p.L - p.R, p.H - p.T - p.B);
    int dx, dy;
    for (double x : nice_ticks(p.x0, p.x1, x_integer, &dx)) {
        p.svg += strf("<line x1=\"%.1f\" y1=\"%.0f\" x2=\"%.1f\" y2=\"%.0f\" stroke=\"#444\"/>\n", p.px(x), p.H - p.B,
                      p.px(x), p.H - p.B + 4);
        p.svg += strf("<text x=\"%.1f\" y=\"%.0f\" text-anchor=\"middle\">%.*f</text>\n", p.px(x), p.H - p.B + 16, dx, x);
    }
    for (double y : nice_ticks(p.y0, p.y1, false, &dy)) {
        p.svg += strf("<line x1=\"%.0f\" y1=\"%.1f\" x2=\"%.0f\" y2=\"%.1f\" stroke=\"#444\"/>\n", p.L - 4, p.py(y), p.L,
                      p.py(y));
        p.svg += strf("<text x=\"%.0f\" y=\"%.1f\" text-anchor=\"end\">%.*f</text>\n", p.L - 6, p.py(y) + 4, dy, y);
    }
    p.svg += strf("<text x=\"%.0f\" y=\"%.0f\" text-anchor=\"middle\">%s</text>\n", (p.L + p.W - p.R) / 2, p.H - 8,
                  xml_escape(xl).c_str());
    p.svg += strf("<text x=\"14\" y=\"%.0f\" transform=\"rotate(-90 14 %.0f)\" text-anchor=\"middle\">%s</text>\n",
                  (p.T + p.H - p.B) / 2, (p.T + p.H - p.B) / 2, xml_escape(yl).c_str());
    return p;
}

// At most MAX_POINTS points of a line: indices 0..n-1 picked evenly, the first and the last kept
// (a loss curve of 100,000 steps would otherwise be a 2 MB polyline no eye can tell from this)
static const int MAX_POINTS = 600;
static std::vector<size_t> thin_indices(size_t n) {
    std::vector<size_t> idx;
    if (n <= (size_t)MAX_POINTS) {
        for (size_t j = 0; j < n; j++) idx.push_back(j);
        return idx;
    }
    // idx[j] = round(j (n-1) / (MAX_POINTS-1)): ascending, idx[0] = 0, idx[MAX_POINTS-1] = n-1
    for (size_t j = 0; j < (size_t)MAX_POINTS; j++) idx.push_back((j * (n - 1) * 2 + (MAX_POINTS - 1)) / (2 * (MAX_POINTS - 1)));
    return idx;
}

// series i (its colour PALETTE[i]) as a line, optionally with a dot at each point, and its legend entry
static void plot_series(Plot& p, const std::vector<double>& xs, const std::vector<double>& ys, int i,
                        const std::string& label, bool markers) {
    const char* col = PALETTE[i % 12];
    auto clamp_y = [&](double y) { return std::min(p.y1, std::max(p.y0, y)); };
    std::vector<size_t> idx = thin_indices(std::min(xs.size(), ys.size()));
    std::string pts;
    for (size_t j : idx) pts += strf("%.1f,%.1f ", p.px(xs[j]), p.py(clamp_y(ys[j])));
    p.svg += strf("<polyline points=\"%s\" fill=\"none\" stroke=\"%s\" stroke-width=\"1.5\"/>\n", pts.c_str(), col);
    if (markers)
        for (size_t j : idx)
            p.svg += strf("<circle cx=\"%.1f\" cy=\"%.1f\" r=\"2.5\" fill=\"%s\"/>\n", p.px(xs[j]), p.py(clamp_y(ys[j])), col);
    double ly = p.T + 8 + 15 * i;
    p.svg += strf("<line x1=\"%.0f\" y1=\"%.0f\" x2=\"%.0f\" y2=\"%.0f\" stroke=\"%s\" stroke-width=\"2\"/>", p.W - p.R + 10,
                  ly, p.W - p.R + 28, ly, col);
    p.svg += strf("<text x=\"%.0f\" y=\"%.0f\">%s</text>\n", p.W - p.R + 32, ly + 4, xml_escape(label).c_str());
}

static void plot_end(Plot& p, const std::string& path) { write_file(path, p.svg + "</svg>\n"); }

// a shaded band between lo and hi (a 95% interval around a line drawn with plot_series, colour i)
static void plot_band(Plot& p, const std::vector<double>& xs, const std::vector<double>& lo,
                      const std::vector<double>& hi, int i) {
    std::string pts;
    auto clamp = [&](double y) { return std::min(p.y1, std::max(p.y0, y)); };
    for (size_t j = 0; j < xs.size(); j++) pts += strf("%.1f,%.1f ", p.px(xs[j]), p.py(clamp(hi[j])));
    for (size_t j = xs.size(); j-- > 0;) pts += strf("%.1f,%.1f ", p.px(xs[j]), p.py(clamp(lo[j])));
    p.svg += strf("<polygon points=\"%s\" fill=\"%s\" fill-opacity=\"0.15\" stroke=\"none\"/>\n", pts.c_str(),
                  PALETTE[i % 12]);
}
