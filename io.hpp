// io.hpp -- errors, text formatting and files for bt.cpp: BtError, strf, reading and writing
// whole files (atomically), a small JSON reader and the safetensors format (read and write).
// Nothing here knows the model; bt.cpp's "Checkpoints" section says which tensors a file holds.
#pragma once
#include <algorithm>
#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <stdexcept>
#include <string>
#include <vector>

// Every user-facing failure is a BtError: main() prints its one-line message and exits with its
// code (2: bad input or usage, 1: internal failure). Tests catch it.
struct BtError : std::runtime_error {
    int code;
    BtError(int c, const std::string& m) : std::runtime_error(m), code(c) {}
};

// printf into a std::string of any length
static std::string strf(const char* fmt, ...) {
    va_list ap, ap2;
    va_start(ap, fmt);
    va_copy(ap2, ap);
    int n = vsnprintf(nullptr, 0, fmt, ap);
    va_end(ap);
    std::string s(n > 0 ? n : 0, '\0');
    if (n > 0) vsnprintf(&s[0], n + 1, fmt, ap2);
    va_end(ap2);
    return s;
}
#define BAD_INPUT(...) throw BtError(2, strf(__VA_ARGS__))
#define INTERNAL(...) throw BtError(1, strf(__VA_ARGS__))

// the whole file as bytes; what names a missing file in the error
static std::string read_file(const std::string& path, const char* what) {
    std::ifstream f(path, std::ios::binary);
    if (!f) BAD_INPUT("%s: cannot open the %s (does the file exist?)", path.c_str(), what);
    return std::string((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
}

// ---- a small JSON reader, enough for safetensors headers (objects, arrays, strings, numbers)
struct Json {
    enum Kind { NUL, NUM, STR, ARR, OBJ } kind = NUL;
    double num = 0;
    std::string str;
    std::vector<Json> arr;
    std::vector<std::pair<std::string, Json>> obj;
    const Json* get(const std::string& k) const {
        for (auto& kv : obj)
            if (kv.first == k) return &kv.second;
        return nullptr;
    }
};

struct JsonParser {
    const std::string& s;
    size_t i = 0;
    std::string where;
    [[noreturn]] void fail(const char* what) {
        BAD_INPUT("%s: bad JSON header at byte %zu: %s", where.c_str(), i, what);
    }
    void ws() { while (i < s.size() && (s[i] == ' ' || s[i] == '\n' || s[i] == '\t' || s[i] == '\r')) i++; }
    std::string string() {
        if (s[i] != '"') fail("expected a string");
        std::string out;
        for (i++; i < s.size() && s[i] != '"'; i++) {
            if (s[i] == '\\') {
                if (++i >= s.size()) break;
                char e = s[i];
                if (e == 'n') out += '\n'; else if (e == 't') out += '\t'; else if (e == 'u') {
                    if (i + 4 >= s.size()) fail("truncated \\u escape");
                    out += (char)strtol(s.substr(i + 1, 4).c_str(), nullptr, 16);
                    i += 4;
                } else out += e;
            } else out += s[i];
        }
        if (i >= s.size()) fail("unterminated string");
        i++;
        return out;
    }
    Json value(int depth) {
        if (depth > 16) fail("nested too deeply");
        ws();
        if (i >= s.size()) fail("unexpected end");
        Json j;
        char ch = s[i];
        if (ch == '{') {
            j.kind = Json::OBJ; i++; ws();
            if (i < s.size() && s[i] == '}') { i++; return j; }
            for (;;) {
                ws();
                if (i >= s.size()) fail("unexpected end in object");
                std::string k = string();
                ws();
                if (i >= s.size() || s[i] != ':') fail("expected ':'");
                i++;
                j.obj.push_back({k, value(depth + 1)});
                ws();
                if (i < s.size() && s[i] == ',') { i++; continue; }
                if (i < s.size() && s[i] == '}') { i++; return j; }
                fail("expected ',' or '}'");
            }
        } else if (ch == '[') {
            j.kind = Json::ARR; i++; ws();
            if (i < s.size() && s[i] == ']') { i++; return j; }
            for (;;) {
                j.arr.push_back(value(depth + 1));
                ws();
                if (i < s.size() && s[i] == ',') { i++; continue; }
                if (i < s.size() && s[i] == ']') { i++; return j; }
                fail("expected ',' or ']'");
            }
        } else if (ch == '"') {
            j.kind = Json::STR; j.str = string();
        } else if (ch == '-' || (ch >= '0' && ch <= '9')) {
            char* end;
            j.kind = Json::NUM; j.num = strtod(s.c_str() + i, &end);
            i = end - s.c_str();
        } else if (s.compare(i, 4, "null") == 0) {
            i += 4;
        } else if (s.compare(i, 4, "true") == 0 || s.compare(i, 5, "false") == 0) {   // read as 1 and 0
            j.kind = Json::NUM; j.num = s[i] == 't';
            i += s[i] == 't' ? 4 : 5;
        } else fail("unexpected character");
        return j;
    }
};

struct Tensor { std::vector<int> shape; std::vector<float> data; };
struct SafeFile {
    std::map<std::string, std::string> meta;
    std::map<std::string, Tensor> tensors;
};

// Every field is checked before it is trusted: header length against the file size, JSON,
// dtype, shapes, offsets inside the data and not overlapping. path only names the source in errors.
static SafeFile parse_safetensors(const std::string& bytes, const std::string& path) {
    if (bytes.size() < 8) BAD_INPUT("%s: %zu bytes is too short for a safetensors file", path.c_str(), bytes.size());
    uint64_t n = 0;
    for (int b = 7; b >= 0; b--) n = (n << 8) | (unsigned char)bytes[b];
    if (n > bytes.size() - 8)
        BAD_INPUT("%s: header length %llu runs past the end of the file (%zu bytes): not a safetensors file, or truncated", path.c_str(),
                  (unsigned long long)n, bytes.size());
    std::string header = bytes.substr(8, n);
    JsonParser jp{header, 0, path};
    Json root = jp.value(0);
    if (root.kind != Json::OBJ) BAD_INPUT("%s: the header is not a JSON object", path.c_str());
    size_t data0 = 8 + n, data_len = bytes.size() - data0;
    SafeFile out;
    std::vector<std::pair<uint64_t, uint64_t>> ranges;
    for (auto& kv : root.obj) {
        const std::string& name = kv.first;
        const Json& t = kv.second;
        if (name == "__metadata__") {
            if (t.kind != Json::OBJ) BAD_INPUT("%s: __metadata__ is not an object", path.c_str());
            for (auto& m : t.obj) {
                if (m.second.kind != Json::STR) BAD_INPUT("%s: metadata '%s' is not a string", path.c_str(), m.first.c_str());
                out.meta[m.first] = m.second.str;
            }
            continue;
        }
        const Json *dt = t.get("dtype"), *sh = t.get("shape"), *of = t.get("data_offsets");
        if (t.kind != Json::OBJ || !dt || !sh || !of || dt->kind != Json::STR || sh->kind != Json::ARR ||
            of->kind != Json::ARR || of->arr.size() != 2)
            BAD_INPUT("%s: tensor '%s' needs dtype, shape and data_offsets [begin, end]", path.c_str(), name.c_str());
        if (dt->str != "F32")
            BAD_INPUT("%s: tensor '%s' has dtype %s; bt reads F32 only", path.c_str(), name.c_str(), dt->str.c_str());
        Tensor T;
        uint64_t numel = 1;
        for (auto& d : sh->arr) {
            if (d.kind != Json::NUM || d.num < 0 || d.num > 1e9 || d.num != (double)(long)d.num)
                BAD_INPUT("%s: tensor '%s' has a bad dimension in its shape", path.c_str(), name.c_str());
            T.shape.push_back((int)d.num);
            numel *= (uint64_t)d.num;
            if (numel > data_len / 4)   // also stops the product from wrapping around 2^64
                BAD_INPUT("%s: tensor '%s' has a shape with more elements than the file's %zu data bytes hold", path.c_str(),
                          name.c_str(), data_len);
        }
        double b0 = of->arr[0].num, b1 = of->arr[1].num;
        if (of->arr[0].kind != Json::NUM || of->arr[1].kind != Json::NUM || !(b0 >= 0) || !(b1 >= b0) ||
            !(b1 <= (double)data_len) || b0 != (double)(uint64_t)b0 || b1 != (double)(uint64_t)b1)
            BAD_INPUT("%s: tensor '%s' has data_offsets [%.0f, %.0f] outside the %zu data bytes", path.c_str(),
                      name.c_str(), b0, b1, data_len);
        if ((uint64_t)(b1 - b0) != numel * 4)
            BAD_INPUT("%s: tensor '%s' holds %.0f bytes but its shape needs %llu", path.c_str(), name.c_str(), b1 - b0,
                      (unsigned long long)(numel * 4));
        ranges.push_back({(uint64_t)b0, (uint64_t)b1});
        T.data.resize(numel);
        if (numel) memcpy(T.data.data(), bytes.data() + data0 + (size_t)b0, numel * 4);
        out.tensors[name] = std::move(T);
    }
    std::sort(ranges.begin(), ranges.end());
    for (size_t i = 1; i < ranges.size(); i++)
        if (ranges[i].first < ranges[i - 1].second)
            BAD_INPUT("%s: two tensors overlap in the data section (bytes %llu..%llu)", path.c_str(),
                      (unsigned long long)ranges[i].first, (unsigned long long)ranges[i - 1].second);
    return out;
}

static SafeFile read_safetensors(const std::string& path) { return parse_safetensors(read_file(path, "checkpoint"), path); }

static std::string json_escape(const std::string& s) {
    std::string o;
    for (char ch : s) {
        if (ch == '"' || ch == '\\') o += '\\';
        o += ch;
    }
    return o;
}

// An output path must be a new file or a regular one: the rename below would replace anything
// there, a device node (/dev/full) or a folder's entry included.
static void check_output_path(const std::string& path) {
    std::error_code ec;
    auto st = std::filesystem::status(path, ec);
    if (std::filesystem::exists(st) && !std::filesystem::is_regular_file(st))
        BAD_INPUT("%s exists and is not a regular file: give a file path to write", path.c_str());
}

// Written to path + ".tmp" and renamed, so a crash never leaves half a file; a failed write
// removes the temporary file. With commit false the temporary file stays for commit_file (two
// files that must change together are both written before either is renamed).
static void commit_file(const std::string& path) {
    std::string tmp = path + ".tmp";
    if (rename(tmp.c_str(), path.c_str()) == 0) return;
    remove(tmp.c_str());
    INTERNAL("%s: write failed (cannot rename %s)", path.c_str(), tmp.c_str());
}
static void write_file(const std::string& path, const std::string& text, bool commit = true) {
    check_output_path(path);
    std::string tmp = path + ".tmp";
    FILE* f = fopen(tmp.c_str(), "wb");
    if (!f) BAD_INPUT("%s: cannot write (does the folder exist?)", tmp.c_str());
    bool ok = fwrite(text.data(), 1, text.size(), f) == text.size();
    ok = (fclose(f) == 0) && ok;
    if (!ok) {
        remove(tmp.c_str());
        INTERNAL("%s: write failed (disk full?)", path.c_str());
    }
    if (commit) commit_file(path);
}

struct OutTensor { std::string name; std::vector<int> shape; const float* data; };

// A safetensors file, written atomically by write_file.
static void write_safetensors(const std::string& path, std::vector<OutTensor> ts,
                              const std::map<std::string, std::string>& meta, bool commit = true) {
    std::sort(ts.begin(), ts.end(), [](const OutTensor& a, const OutTensor& b) { return a.name < b.name; });
    std::string h = "{\"__metadata__\":{";
    bool first = true;
    for (auto& kv : meta) {
        h += strf("%s\"%s\":\"%s\"", first ? "" : ",", json_escape(kv.first).c_str(), json_escape(kv.second).c_str());
        first = false;
    }
    h += "}";
    uint64_t off = 0;
    for (auto& t : ts) {
        long n = 1;
        std::string shape;
        for (size_t i = 0; i < t.shape.size(); i++) { n *= t.shape[i]; shape += (i ? "," : "") + std::to_string(t.shape[i]); }
        h += strf(",\"%s\":{\"dtype\":\"F32\",\"shape\":[%s],\"data_offsets\":[%llu,%llu]}", json_escape(t.name).c_str(),
                  shape.c_str(), (unsigned long long)off, (unsigned long long)(off + 4 * n));
        off += 4 * n;
    }
    h += "}";
    while ((8 + h.size()) % 8) h += ' ';
    std::string bytes(8, '\0');
    for (int b = 0; b < 8; b++) bytes[b] = (char)(unsigned char)((uint64_t)h.size() >> (8 * b));
    bytes += h;
    for (auto& t : ts) {
        long n = 1;
        for (int d : t.shape) n *= d;
        bytes.append((const char*)t.data, sizeof(float) * n);
    }
    write_file(path, bytes, commit);
}
