// tests/fuzz.cpp -- libFuzzer targets for the two parsers that read files from users:
//   fuzz_checkpoint: parse_safetensors, then the config in its metadata, then copy into a model
//   fuzz_data:       parse_examples (the task text format), then tokenize every example
// Each input must end in success or a BtError (bad input) -- never a crash, a hang or a sanitizer
// report. make fuzz builds one binary per target (clang -fsanitize=fuzzer) and runs it; the
// inputs it ever crashed on are kept in tests/fuzz/<target>/ and replayed by make test.
#ifndef BT_TESTING   // built alone as a fuzz target (make fuzz); test_bt.cpp includes bt.cpp itself
#define BT_TESTING
#pragma GCC diagnostic ignored "-Wunused-function"
#include "../bt.cpp"
#endif

static void fuzz_checkpoint(const std::string& bytes) {
    try {
        SafeFile f = parse_safetensors(bytes, "input");
        Config c = config_from_meta(f.meta, "input");
        Weights w;
        if (layout_params(c, &w, nullptr, nullptr) > (1 << 20)) return;   // a valid but huge model: don't allocate it
        Model M;
        model_build(M, c);
        copy_tensors(M, f, "input", false);
    } catch (BtError&) {
    }
}

static void fuzz_data(const std::string& text) {
    try {
        for (const Example& e : parse_examples(text, "input")) tokenize(e.text, "input");
    } catch (BtError&) {
    }
}

#if defined(FUZZ_CHECKPOINT) || defined(FUZZ_DATA)
extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
    std::string s((const char*)data, size);
#ifdef FUZZ_CHECKPOINT
    fuzz_checkpoint(s);
#else
    fuzz_data(s);
#endif
    return 0;
}
#endif
