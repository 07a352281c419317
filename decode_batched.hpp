// decode_batched.hpp -- the batched decoder, included by bt.cpp after its Decoder (it uses the run
// state, backbone_forward and bottleneck_step like the Decoder does). bt.cpp's Decoder is the
// reference it is tested against, bit for bit; evaluate (bt eval, the experiment) uses this one.
// At the end: how evaluate spreads many examples over the threads (generate_batched, and
// generate_each for eviction and the device).
// =============================================================================================
// The batched decoder: B sequences decode in one pass, lock-step by position.
// Row t*B+b of its run state holds sequence b's token at position t (the layout training uses),
// so one backbone_forward over positions [s,e) runs every sequence and each matmul sees (e-s)*B
// rows. Every op is per row or per (sequence, head), and every matmul output is one fma chain over
// k in a fixed order whatever the number of rows (tensor.hpp), so each sequence gets the same bits
// as alone in a Decoder (a test checks tokens and logits with tolerance 0).
// - At each step all sequences are at the same position t. Sequence b's token at t is forced (its
//   prompt, the PAUSE tokens a pause model gets after each newline) or its own greedy choice from
//   its logits at t-1; prompts of different lengths are fine.
// - A finished sequence ('$', or the context full) leaves the batch: the others move down to
//   fill its slot and the row stride B shrinks (batch_compact). The run state is carved for
//   B_cap sequences, and buffers sized in whole rows of B_cap hold any B <= B_cap.
// - The processor: the sequences whose token at t is a boundary are rewritten before reading it,
//   each on its own segment [seg_start_b, t). Those that share a segment start fire together
//   through the same bottleneck_step: in place when they are the whole batch (with examples of
//   one layout, as in bt eval, nearly always), else gathered into a sub-batch G.
// - Not batched: eviction (each sequence compacts its cache at its own newlines, so slots part
//   from positions and lock-step cannot hold) and --device cuda; both keep one Decoder per
//   sequence (evaluate, bench_decode), as does --trace (bt generate).
// =============================================================================================
struct BatchDecoder {
    const Model* M = nullptr;
    RunState S;                   // B_cap sequences, T = max_seq_len, no gradients. S.B: the
                                  // sequences decoding now (the row stride); S.n_tok: positions fed
    int B_cap = 0;
    bool use_proc = false;
    std::vector<int> seg_start;   // (B_cap) first position of each sequence's current segment
    std::vector<char> fires;      // (B_cap) scratch: does sequence b fire before this position
    std::vector<int> group;       // (B_cap) scratch: the sequences of one firing group, or of a compaction
    // a firing group of n < B sequences is gathered into G at stride n; G is carved for G_cap
    // sequences, which grows in powers of 2
    RunState G;
    int G_cap = 0;
    std::vector<float> wt_mem;    // (n_params) the model's matrices transposed, as a Decoder keeps them
    Weights wt;
};

static void batch_init(BatchDecoder& BD, const Model& M, int B) {
    if (g_device) INTERNAL("the batched decoder runs on the CPU; --device cuda decodes with one Decoder per sequence");
    BD.M = &M;
    run_state_build(BD.S, M.cfg, M.cfg.T, B, false);
    BD.B_cap = B;
    BD.use_proc = M.cfg.proc_width > 0;
    BD.seg_start.assign(B, 0);
    BD.fires.assign(B, 0);
    BD.group.assign(B, 0);
    transpose_weights(M, BD.wt_mem, BD.wt);
    BD.S.wt = &BD.wt;
}

// the row stride of S becomes B: row r is position r / B (RoPE)
static void batch_set_stride(RunState& S, int B) {
    S.B = B;
    for (long r = 0; r < (long)S.T * B; r++) S.h_pos[r] = (int)(r / B);   // on the CPU h_pos is pos
}
// start n <= B_cap empty sequences
static void batch_reset(BatchDecoder& BD, int n) {
    if (n > BD.B_cap) INTERNAL("%d sequences for a batched decoder of %d", n, BD.B_cap);
    batch_set_stride(BD.S, n);
    BD.S.n_tok = 0;
    std::fill(BD.seg_start.begin(), BD.seg_start.end(), 0);
}

// Drop the sequences with drop[b] set: the others keep their order in slots 0..B'-1 and the row
// stride becomes B'. Moved, for positions [0,n_tok): what later steps read, K and V of every
// layer (the cache) and the attention rows from the earliest current segment on (the processor's
// select reads a segment's rows); for a latent model, the last position's final normed state (a
// latent position next reads it); and the tokens, for whoever looks. The other activations of
// earlier positions (their logits too) are never read again and stay behind. Row p*B'+j never
// lies after row p*B+b (j <= b, B' <= B), so moving in row order overwrites no row still to move.
static void batch_compact(BatchDecoder& BD, const char* drop) {
    RunState& S = BD.S;
    const Config& c = BD.M->cfg;
    int B = S.B, nb = 0, s0 = S.n_tok;
    int* from = BD.group.data();   // (B') the slot each new slot comes from
    for (int b = 0; b < B; b++)
        if (!drop[b]) { from[nb++] = b; s0 = std::min(s0, BD.seg_start[b]); }
    if (nb == B) return;
    long W_att = (long)c.NH * S.T;   // one row of att: (NH,T)
    for (int p = 0; p < S.n_tok; p++)
        for (int j = 0; j < nb; j++) {
            long dst = (long)p * nb + j, src = (long)p * B + from[j];
            for (int l = 0; l < c.L; l++) {
                memmove(S.acts[l].k + dst * c.C, S.acts[l].k + src * c.C, sizeof(float) * c.C);
                memmove(S.acts[l].v + dst * c.C, S.acts[l].v + src * c.C, sizeof(float) * c.C);
                if (p >= s0) memmove(S.acts[l].att + dst * W_att, S.acts[l].att + src * W_att, sizeof(float) * W_att);
            }
            S.h_tokens[dst] = S.h_tokens[src];
            if (c.latent > 0 && p == S.n_tok - 1)   // the state a latent position at n_tok reads
                memmove(S.lnf + dst * c.C, S.lnf + src * c.C, sizeof(float) * c.C);
        }
    for (int j = 0; j < nb; j++) BD.seg_start[j] = BD.seg_start[from[j]];
    batch_set_stride(S, nb);
}

// rows [p0,p1) of one sequence from a (T,Bs,W) buffer into a (T,Bd,W) one:
// dst[p, bd, :] = src[p, bs, :]
static void copy_sequence_rows(float* dst, int Bd, int bd, const float* src, int Bs, int bs, int p0, int p1, long W) {
    for (int p = p0; p < p1; p++)
        memcpy(dst + ((long)p * Bd + bd) * W, src + ((long)p * Bs + bs) * W, sizeof(float) * W);
}

// K and V rows of the positions in sel (nS,n), between the batch's cache a (T,B,C) and a group's
// g (T,n,C): g[sel[r,j], j] = a[sel[r,j], group[j]] (to_group), or the other way
static void copy_selected_rows(BlockActs& g, BlockActs& a, const int* sel, int nS, int n, const int* group, int B,
                               int C, bool to_group) {
    size_t bytes = sizeof(float) * C;
    for (long r = 0; r < (long)nS * n; r++) {
        long gi = ((long)sel[r] * n + r % n) * C, ai = ((long)sel[r] * B + group[r % n]) * C;
        if (to_group) {
            memcpy(g.k + gi, a.k + ai, bytes);
            memcpy(g.v + gi, a.v + ai, bytes);
        } else {
            memcpy(a.k + ai, g.k + gi, bytes);
            memcpy(a.v + ai, g.v + gi, bytes);
        }
    }
}

// Fire the processor for the n sequences BD.group[0..n), all with segment [s,t). The whole batch
// is rewritten in place. Fewer are gathered into G: per layer, the segment's attention rows, then
// select_forward there (as bottleneck_step will do, with the same result) names the cache entries
// the firing reads and rewrites, and only those K, V rows are copied; bottleneck_step runs on G's
// n sequences, and the rows its undo log lists (the same entries) go back.
static void batch_fire_group(BatchDecoder& BD, int s, int t, int n) {
    RunState& S = BD.S;
    const Config& c = BD.M->cfg;
    if (n == S.B) {
        undo_clear(S);   // decoding never walks back: keep the log to one firing
        bottleneck_step(*BD.M, S, s, t);
        return;
    }
    if (n > BD.G_cap) {
        int cap = 1;
        while (cap < n) cap *= 2;
        BD.G_cap = std::min(cap, BD.B_cap);
        run_state_build(BD.G, c, c.T, BD.G_cap, false);
        BD.G.wt = &BD.wt;   // the processor's matmuls read the transposed weights too
    }
    RunState& G = BD.G;
    G.B = n;   // the stride of this group; bottleneck_step reads no positions from G.pos
    long W_att = (long)c.NH * S.T;   // one row of att: (NH,T)
    for (int l = 0; l < c.L; l++) {
        for (int j = 0; j < n; j++) copy_sequence_rows(G.acts[l].att, n, j, S.acts[l].att, S.B, BD.group[j], s, t, W_att);
        int nS = select_forward(G.pa.sel, G.pa.scores, G.acts[l].att, s, t, n, c.NH, S.T, c.k, c.periodic);
        copy_selected_rows(G.acts[l], S.acts[l], G.pa.sel, nS, n, BD.group.data(), S.B, c.C, true);
    }
    undo_clear(G);
    bottleneck_step(*BD.M, G, s, t);
    for (const UndoRecord& rec : G.undo)
        copy_selected_rows(G.acts[rec.layer], S.acts[rec.layer], undo_sel_of(G, rec), rec.nS, n, BD.group.data(), S.B,
                           c.C, false);
}

// The sequences with BD.fires[b] set, grouped by segment start: each group fires on [s,t) and
// its segments then start at t. Groups go in order of their first sequence.
static void batch_fire(BatchDecoder& BD, int t) {
    int B = BD.S.B;
    for (int b0 = 0; b0 < B; b0++) {
        if (!BD.fires[b0]) continue;
        int s = BD.seg_start[b0], n = 0;
        for (int b = b0; b < B; b++)
            if (BD.fires[b] && BD.seg_start[b] == s) { BD.group[n++] = b; BD.fires[b] = 0; }
        batch_fire_group(BD, s, t, n);
        for (int j = 0; j < n; j++) BD.seg_start[BD.group[j]] = t;
    }
}

// Append n positions to every sequence: toks (n,B), sequence b's token at position n_tok+i is
// toks[i*B+b]. As decoder_feed: the backbone runs chunk by chunk, and before a position whose
// token is a boundary for some sequences, those are rewritten on the segment they just ended.
static void batch_feed(BatchDecoder& BD, const int* toks, int n) {
    RunState& S = BD.S;
    const Config& c = BD.M->cfg;
    int B = S.B;
    if (S.n_tok + n > S.T) BAD_INPUT("the sequence would exceed the model's context of %d tokens", S.T);
    int chunk = S.n_tok;
    for (int i = 0; i < n; i++) {
        int t = S.n_tok;
        const int* tk = toks + (long)i * B;   // (B) the tokens at position t
        bool any = false, latent = false;
        for (int b = 0; b < B; b++) {
            BD.fires[b] = BD.use_proc && is_boundary(c, t, tk[b]) && t > BD.seg_start[b];
            any = any || BD.fires[b];
            latent = latent || (c.latent > 0 && tk[b] == PAUSE);
        }
        if (latent && t > chunk) {   // a latent position opens its own chunk (in every sequence)
            backbone_forward(*BD.M, S, chunk, t);
            chunk = t;
        }
        if (any) {
            if (t > chunk) backbone_forward(*BD.M, S, chunk, t);
            batch_fire(BD, t);
            chunk = t;
        }
        copy_ints(S.h_tokens + (long)t * B, tk, B);
        S.n_tok++;
    }
    if (S.n_tok > chunk) backbone_forward(*BD.M, S, chunk, S.n_tok);
}

// sequence b's logits at the last position fed: (V)
static const float* batch_logits(const BatchDecoder& BD, int b) {
    return BD.S.logits + ((long)(BD.S.n_tok - 1) * BD.S.B + b) * BD.M->cfg.V;
}

// Greedy continuations of up to B_cap prompts at once; out[i] is what generate() writes for
// prompt i. seq[i] is its tokens: the prompt (PAUSE tokens inserted), then its choices and the
// pauses after each chosen newline; the first S.n_tok of them are in the cache. Slot b holds
// prompt id[b]. Each step, a sequence whose tokens are all fed chooses the next one (as generate
// does), the finished leave the batch, and every position that all the others know goes in at
// once (the prompts' common length first, then one). logits (tests): every position's logits of
// prompt i, (positions fed, V), are appended to (*logits)[i].
static std::vector<std::string> batch_generate(BatchDecoder& BD, const std::vector<std::string>& prompts,
                                               std::vector<std::vector<float>>* logits = nullptr) {
    RunState& S = BD.S;
    int T = S.T, V = BD.M->cfg.V, P = inserted_after_newline(BD.M->cfg), n = (int)prompts.size();
    std::vector<std::vector<int>> seq(n);
    std::vector<std::string> out(n);
    for (int i = 0; i < n; i++) {
        seq[i] = tokenize(insert_pauses(prompts[i], P), "prompt");
        if ((int)seq[i].size() > T) BAD_INPUT("the sequence would exceed the model's context of %d tokens", T);
    }
    if (logits) logits->assign(n, {});
    batch_reset(BD, n);
    std::vector<int> id(n), toks((long)T * n);   // (B) the prompt in each slot; (m,B) one feed's tokens
    std::vector<char> done(n);                   // (B) finished this step
    for (int i = 0; i < n; i++) id[i] = i;
    const int END = char_to_token('$');
    for (;;) {
        int B = S.B, t = S.n_tok, m = T - t, left = 0;
        for (int b = 0; b < B; b++) {
            std::vector<int>& sq = seq[id[b]];
            done[b] = 0;
            if ((int)sq.size() == t) {   // all fed: choose, unless the context is full
                if (t == T) { done[b] = 1; continue; }
                int tok = greedy_token(batch_logits(BD, b), V);
                out[id[b]] += token_to_char(tok);
                if (tok == END) { done[b] = 1; continue; }   // '$' is never fed
                sq.push_back(tok);
                if (tok == NEWLINE && P > 0 && t + 1 + P <= T) sq.insert(sq.end(), P, PAUSE);
            }
            m = std::min(m, (int)sq.size() - t);
            id[left++] = id[b];   // the slots that stay, in order (as batch_compact moves them)
        }
        batch_compact(BD, done.data());
        if (S.B == 0) break;
        for (int i = 0; i < m; i++)
            for (int b = 0; b < S.B; b++) toks[(long)i * S.B + b] = seq[id[b]][t + i];
        batch_feed(BD, toks.data(), m);
        for (int b = 0; logits && b < S.B; b++)
            for (int p = t; p < t + m; p++) {
                const float* z = S.logits + ((long)p * S.B + b) * V;
                (*logits)[id[b]].insert((*logits)[id[b]].end(), z, z + V);
            }
    }
    return out;
}

// =============================================================================================
// Many examples over the threads (evaluate): each thread decodes its share with decoders of its
// own, whose ops run on that thread alone.
// =============================================================================================
// Run work(i, thread, ctx) for i in [0,n) over `threads` OpenMP threads (dynamically: items take
// different times). An exception may not leave an OpenMP region: the first is kept and rethrown.
static void for_each_item(int n, int threads, void (*work)(int, int, void*), void* ctx) {
    std::string error;
    int error_code = 0;
    (void)threads;   // without OpenMP: one thread
    #pragma omp parallel num_threads(threads) if (threads > 1)
    {
        int thread = 0;
#ifdef _OPENMP
        thread = omp_get_thread_num();
#endif
        #pragma omp for schedule(dynamic)
        for (int i = 0; i < n; i++) {
            if (error_code) continue;
            try {
                work(i, thread, ctx);
            } catch (BtError& e) {
                #pragma omp critical
                if (!error_code) { error_code = e.code; error = e.what(); }
            } catch (std::exception& e) {
                #pragma omp critical
                if (!error_code) { error_code = 1; error = e.what(); }
            }
        }
    }
    if (error_code) throw BtError(error_code, error);
}
static int max_threads() {
#ifdef _OPENMP
    return omp_get_max_threads();
#else
    return 1;
#endif
}

// ---- one Decoder per thread, one example at a time: the path for eviction and the device (one
// thread there: kernels.cu is launched from one host thread at a time)
struct EachCtx { std::vector<Decoder>* D; const std::vector<std::string>* texts; std::vector<std::string>* outs; };
static void generate_one(int i, int thread, void* ctx) {
    EachCtx& x = *(EachCtx*)ctx;
    (*x.outs)[i] = generate((*x.D)[thread], question_of((*x.texts)[i]) + "\n");
}
static void generate_each(std::vector<std::string>& outs, const Model& M, const std::vector<std::string>& texts,
                          int evict) {
    int threads = g_device ? 1 : std::max(1, std::min(max_threads(), (int)texts.size()));
    std::vector<Decoder> D(threads);
    for (Decoder& d : D) decoder_init(d, M, evict);
    EachCtx x{&D, &texts, &outs};
    for_each_item((int)texts.size(), threads, generate_one, &x);
}

// ---- batched: the examples go, in order, into batches of B <= EVAL_BATCH, the last maybe
// shorter (100 on 2 threads: 16 of 6 and one of 4), for the threads to share; each thread
// decodes its batches with its own batched decoder, whose ops run on that thread alone. Not one
// batch across the threads: a decoding step's ops are small (6 rows x 128 x 128 is far below
// PAR_MIN), and a parallel region per op loses badly to another process on the same cores.
// 6 sequences: bt eval's chain sets (100 per size, sizes 2..16) on 2 threads took 2.25-2.36 s
// and 1.60-1.68 s in batches of 6 (a trained model with a processor, and its vanilla backbone),
// 2.5-2.6 s and 1.8 s in batches of 4, 8 or 12, and 3.1-3.2 s and 2.3 s one sequence at a
// time: more rows per matmul pay less than a batch's cache (B x the positions written so far,
// every layer) costs once it no longer stays close to the core.
static const int EVAL_BATCH = 6;

// The batched decoders of evaluate, one per thread. bt eval keeps them across its sizes: a run
// state is about 16 MB per sequence (max_seq_len 256), and building one costs about as much as
// decoding a small size. Reused, they take the model's weights again (it may have been trained).
struct EvalDecoders {
    int B = 0;                            // sequences per decoder
    Config cfg;                           // the config they were built for
    std::vector<BatchDecoder> per_thread;
};

struct BatchCtx {
    EvalDecoders* E; const std::vector<std::string>* texts; std::vector<std::string>* outs; int B;
};
static void generate_batch(int i, int thread, void* ctx) {
    BatchCtx& x = *(BatchCtx*)ctx;
    int n = (int)x.texts->size(), i0 = i * x.B, i1 = std::min(n, i0 + x.B);
    std::vector<std::string> prompts;
    for (int j = i0; j < i1; j++) prompts.push_back(question_of((*x.texts)[j]) + "\n");
    std::vector<std::string> got = batch_generate(x.E->per_thread[thread], prompts);
    for (int j = i0; j < i1; j++) (*x.outs)[j] = got[j - i0];
}
// n examples into batches: B sequences each (at most EVAL_BATCH, and at least one batch per
// thread), decoded by `threads` decoders; returns the number of batches
static int eval_batches(int n, int* B, int* threads) {
    int th = std::max(1, std::min(max_threads(), n));
    int n_batches = std::max(th, (n + EVAL_BATCH - 1) / EVAL_BATCH);
    *B = (n + n_batches - 1) / n_batches;
    n_batches = (n + *B - 1) / *B;
    *threads = std::min(th, n_batches);
    return n_batches;
}

static void generate_batched(std::vector<std::string>& outs, const Model& M, const std::vector<std::string>& texts,
                             EvalDecoders* keep = nullptr) {
    int n = (int)texts.size();
    if (n == 0) return;
    int B = 0, threads = 0, n_batches = eval_batches(n, &B, &threads);
    EvalDecoders fresh;
    EvalDecoders& E = keep ? *keep : fresh;
    // Config is plain ints and floats: memcmp compares every field
    bool reuse = E.B == B && (int)E.per_thread.size() >= threads && memcmp(&E.cfg, &M.cfg, sizeof(Config)) == 0;
    if (reuse) {
        for (BatchDecoder& BD : E.per_thread) { BD.M = &M; transpose_weights(M, BD.wt_mem, BD.wt); }
    } else {
        E.per_thread = std::vector<BatchDecoder>(threads);
        E.B = B;
        E.cfg = M.cfg;
        for (BatchDecoder& BD : E.per_thread) batch_init(BD, M, B);
    }
    BatchCtx x{&E, &texts, &outs, B};
    for_each_item(n_batches, threads, generate_batch, &x);
}
