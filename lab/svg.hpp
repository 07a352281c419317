// lab/svg.hpp -- small SVG plots written by hand (no plotting dependency), for lab/experiment.cpp.
// Included by lab/lab.cpp after bt.cpp.
#pragma once

static const char* PALETTE[] = {"#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b",
                                "#e377c2", "#7f7f7f", "#bcbd22", "#17becf", "#000000", "#aec7e8"};

struct Plot {   // a frame with axes in data coordinates x0..x1, y0..y1
    std::string svg;
    double W = 640, H = 400, L = 60, R = 170, T = 30, B = 45, x0, x1, y0, y1;
    double px(double x) const { return L + (x - x0) / (x1 - x0) * (W - L - R); }
    double py(double y) const { return H - B - (y - y0) / (y1 - y0) * (H - T - B); }
};

static Plot plot_begin(const std::string& title, const std::string& xl, const std::string& yl, double x0, double x1,
                       double y0, double y1) {
    Plot p;
    p.x0 = x0; p.x1 = x1; p.y0 = y0; p.y1 = y1;
    p.svg = strf("<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"%.0f\" height=\"%.0f\" font-family=\"sans-serif\" "
                 "font-size=\"11\">\n<rect width=\"100%%\" height=\"100%%\" fill=\"white\"/>\n", p.W, p.H);
    p.svg += strf("<text x=\"%.0f\" y=\"18\" font-size=\"13\">%s</text>\n", p.L, title.c_str());
    p.svg += strf("<rect x=\"%.0f\" y=\"%.0f\" width=\"%.0f\" height=\"%.0f\" fill=\"none\" stroke=\"#444\"/>\n", p.L, p.T,
                  p.W - p.L - p.R, p.H - p.T - p.B);
    for (int i = 0; i <= 4; i++) {
        double x = x0 + (x1 - x0) * i / 4, y = y0 + (y1 - y0) * i / 4;
        p.svg += strf("<text x=\"%.1f\" y=\"%.0f\" text-anchor=\"middle\">%g</text>\n", p.px(x), p.H - p.B + 14,
                      std::round(x * 100) / 100);
        p.svg += strf("<text x=\"%.0f\" y=\"%.1f\" text-anchor=\"end\">%g</text>\n", p.L - 4, p.py(y) + 4,
                      std::round(y * 100) / 100);
    }
    p.svg += strf("<text x=\"%.0f\" y=\"%.0f\" text-anchor=\"middle\">%s</text>\n", (p.L + p.W - p.R) / 2, p.H - 8, xl.c_str());
    p.svg += strf("<text x=\"14\" y=\"%.0f\" transform=\"rotate(-90 14 %.0f)\" text-anchor=\"middle\">%s</text>\n",
                  (p.T + p.H - p.B) / 2, (p.T + p.H - p.B) / 2, yl.c_str());
    return p;
}

static void plot_series(Plot& p, const std::vector<double>& xs, const std::vector<double>& ys, int i,
                        const std::string& label, bool markers) {
    const char* col = PALETTE[i % 12];
    std::string pts;
    for (size_t j = 0; j < xs.size(); j++) pts += strf("%.1f,%.1f ", p.px(xs[j]), p.py(std::min(p.y1, std::max(p.y0, ys[j]))));
    p.svg += strf("<polyline points=\"%s\" fill=\"none\" stroke=\"%s\" stroke-width=\"1.5\"/>\n", pts.c_str(), col);
    if (markers)
        for (size_t j = 0; j < xs.size(); j++)
            p.svg += strf("<circle cx=\"%.1f\" cy=\"%.1f\" r=\"2.5\" fill=\"%s\"/>\n", p.px(xs[j]), p.py(ys[j]), col);
    double ly = p.T + 8 + 15 * i;
    p.svg += strf("<line x1=\"%.0f\" y1=\"%.0f\" x2=\"%.0f\" y2=\"%.0f\" stroke=\"%s\" stroke-width=\"2\"/>", p.W - p.R + 10,
                  ly, p.W - p.R + 28, ly, col);
    p.svg += strf("<text x=\"%.0f\" y=\"%.0f\">%s</text>\n", p.W - p.R + 32, ly + 4, label.c_str());
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
