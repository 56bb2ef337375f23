/* Fused batch-1 decode steps: a whole feed-forward block, or a whole MoE block with its
 * router, in one call and one OpenMP region.
 *
 * Why: at batch 1 an MoE block is a chain of small operations (router linear, softmax, top-k,
 * combine weights, per expert an up projection, SwiGLU and a down projection, the weighted
 * sum). Each costs microseconds of Python and dispatch, and together they made the MoE decode
 * 10-20% slower than its dense twin, which reads the same bytes with fewer calls. Here the
 * MoE block costs one call, like a dense block.
 *
 * Weights: bf16, fp32, int8 or int4 in the layouts of qmatmul.c.
 * Arithmetic follows the eager modules step by step, including where they round to the
 * activation dtype (bf16): router logits, softmax and combine weights in fp32; each
 * projection's output rounded; SwiGLU as silu(gate) rounded, times up, rounded; each expert's
 * output times its weight (rounded to the activation dtype first), rounded; experts summed in
 * ascending id order, rounding after each add. Sums run in another order than PyTorch's, so
 * results agree to rounding, not bit for bit.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <omp.h>

#include "blocks.h"

#include "steps.h"

static inline float silu(float g) { return g / (1.0f + expf(-g)); }

/* y[d] = sum_i weight_i * down_i(act(up_i(x))) over n_sel experts (weights NULL: a plain FFN). */
static int experts_vec(const moelab_mat_t* const* up, const moelab_mat_t* const* down, int n_sel, const float* weights,
                       const void* x, void* y, int bf16, int threads) {
    if (n_sel < 1 || n_sel > 64) return -2;
    const int d = up[0]->k, f = down[0]->k, ug = group_of(up[0]), dg = group_of(down[0]); /* all experts share one kind */
    rows_t xb, ab[64]; /* the token, and each expert's activation (the down projection's input) */
    int prep_ok = rows_alloc(&xb, 1, d, ug, is_quant(up[0]));
    for (int i = 0; i < n_sel; i++) prep_ok = rows_alloc(&ab[i], 1, f, dg, is_quant(down[0])) && prep_ok;
    float* h = (float*)malloc(sizeof(float) * (size_t)n_sel * 2 * f + 64);
    float* outs = (float*)malloc(sizeof(float) * (size_t)n_sel * d + 64);
    prep_ok = prep_ok && h && outs;
    if (prep_ok) {
        rows_set(&xb, x, bf16);
    }
    const int up_blocks = blocks_of(up[0]), down_blocks = blocks_of(down[0]);
    int failed = 0;
#pragma omp parallel num_threads(threads) reduction(|| : failed)
    {
        /* one row: only builds without AVX-512 dequantize a block (see mat_block_rows) */
        float* scratch = MOELAB_AVX512 ? NULL : (float*)aligned_alloc(64, (size_t)(d > f ? d : f) * BLOCK * 4);
        int ok = prep_ok && (MOELAB_AVX512 || scratch);
        float out[BLOCK] __attribute__((aligned(64)));
        /* up projections of every chosen expert, 16 rows at a time */
#pragma omp for schedule(static)
        for (int t = 0; t < n_sel * up_blocks; t++) {
            if (!ok) continue;
            int i = t / up_blocks, b = t % up_blocks;
            mat_block_rows(up[i], b, &xb, bf16, scratch, out);
            for (int r = 0; r < BLOCK && b * BLOCK + r < 2 * f; r++) h[(int64_t)i * 2 * f + b * BLOCK + r] = out[r];
        }
        /* SwiGLU: silu(gate) rounded, times up, rounded */
#pragma omp for schedule(static)
        for (int t = 0; t < n_sel * f; t++) {
            if (!ok) continue;
            int i = t / f, j = t % f;
            const float* hi = h + (int64_t)i * 2 * f;
            ab[i].f32[j] = round_act(round_act(silu(hi[j]), bf16) * hi[f + j], bf16);
        }
#pragma omp for schedule(static)
        for (int i = 0; i < n_sel; i++)
            if (ok) rows_fill(&ab[i], bf16);
        /* down projections: each thread streams one expert's matrix (a static split of the
         * (expert, block) pairs), then the weighted sum over experts in order */
#pragma omp for schedule(static)
        for (int t = 0; t < n_sel * down_blocks; t++) {
            if (!ok) continue;
            int i = t / down_blocks, b = t % down_blocks;
            mat_block_rows(down[i], b, &ab[i], bf16, scratch, out);
            for (int r = 0; r < BLOCK && b * BLOCK + r < d; r++) outs[(int64_t)i * d + b * BLOCK + r] = out[r];
        }
#pragma omp for schedule(static)
        for (int n = 0; n < d; n++) {
            if (!ok) continue;
            float acc = 0.f;
            for (int i = 0; i < n_sel; i++) {
                float v = outs[(int64_t)i * d + n];
                float term = weights ? round_act(v * weights[i], bf16) : v;
                acc = i == 0 ? term : round_act(acc + term, bf16);
            }
            store_el(y, n, acc, bf16);
        }
        failed = !ok;
        free(scratch);
    }
    rows_free(&xb);
    for (int i = 0; i < n_sel; i++) rows_free(&ab[i]);
    free(h);
    free(outs);
    return failed ? -1 : 0;
}

/* A dense SwiGLU feed-forward block on one token: y = down(silu(gate) * up), x and y [d]. */
int moelab_ffn_vec(const moelab_mat_t* up, const moelab_mat_t* down, const void* x, void* y, int bf16, int threads) {
    return experts_vec(&up, &down, 1, NULL, x, y, bf16, threads);
}

/* The router of a softmax top-k MoE block on one token: fp32 logits W·x, softmax, the top_k
 * largest (lower id first on ties), combine weights by `mode`, rounded to the activation dtype.
 * ids come out in ascending order with their weights. */
static void route(const float* router_w, const float* xf, int num_experts, int d, int top_k, int mode, int bf16, int* ids,
                  float* weights) {
    float logits[256], probs[256];
    float mx = -INFINITY;
    for (int e = 0; e < num_experts; e++) {
        const float* w = router_w + (int64_t)e * d;
        float s = 0.f;
        for (int i = 0; i < d; i++) s += w[i] * xf[i];
        logits[e] = s;
        if (s > mx) mx = s;
    }
    float total = 0.f;
    for (int e = 0; e < num_experts; e++) total += (probs[e] = expf(logits[e] - mx));
    for (int e = 0; e < num_experts; e++) probs[e] /= total;
    int taken[256] = {0}, chosen[64];
    for (int j = 0; j < top_k; j++) {
        int best = -1;
        for (int e = 0; e < num_experts; e++)
            if (!taken[e] && (best < 0 || logits[e] > logits[best])) best = e;
        taken[best] = 1;
        chosen[j] = best;
    }
    float w[64], sum = 0.f;
    if (mode == ROUTE_SOFTMAX_AFTER_TOPK) {
        float top = logits[chosen[0]];
        for (int j = 0; j < top_k; j++) sum += (w[j] = expf(logits[chosen[j]] - top));
        for (int j = 0; j < top_k; j++) w[j] /= sum;
    } else {
        for (int j = 0; j < top_k; j++) sum += (w[j] = probs[chosen[j]]);
        if (mode == ROUTE_RENORMALIZE)
            for (int j = 0; j < top_k; j++) w[j] /= sum;
    }
    int n = 0; /* ascending ids */
    for (int e = 0; e < num_experts; e++)
        if (taken[e])
            for (int j = 0; j < top_k; j++)
                if (chosen[j] == e) {
                    ids[n] = e;
                    weights[n++] = round_act(w[j], bf16);
                }
}

/* An MoE block on one token: route, then the chosen experts, in one call. `up`/`down` hold
 * every expert; `ids`/`weights` [top_k] receive the decision. Returns 0, -1 (memory), -2 (shape). */
int moelab_moe_vec(const moelab_mat_t* up, const moelab_mat_t* down, const float* router_w, int num_experts, int top_k,
                   int mode, const void* x, void* y, int* ids, float* weights, int bf16, int threads) {
    const int d = up[0].k;
    if (num_experts > 256 || top_k > 64 || top_k > num_experts) return -2;
    float* xf = (float*)malloc(sizeof(float) * (size_t)d);
    if (!xf) return -1;
    for (int i = 0; i < d; i++) xf[i] = load_el(x, i, bf16);
    route(router_w, xf, num_experts, d, top_k, mode, bf16, ids, weights);
    free(xf);
    const moelab_mat_t* ups[64];
    const moelab_mat_t* downs[64];
    for (int j = 0; j < top_k; j++) {
        ups[j] = up + ids[j];
        downs[j] = down + ids[j];
    }
    return experts_vec(ups, downs, top_k, weights, x, y, bf16, threads);
}

/* ------------------------------------------------------------------ residual forms
 * The block's whole feed-forward half, x += ffn(rms_norm(x)), with x updated in place. */

static void add_residual(void* x, const float* y, int d, int bf16) {
    for (int i = 0; i < d; i++) store_el(x, i, round_act(load_el(x, i, bf16) + y[i], bf16), bf16);
}

/* h = rms_norm(x) in the activation dtype (buffer of d elements). */
static void* normed(const void* x, const void* norm_w, float eps, int d, int bf16) {
    float* hf = (float*)malloc(sizeof(float) * (size_t)d);
    void* h = malloc((size_t)d * (bf16 ? 2 : 4) + 64);
    if (hf && h) {
        rms_norm(x, norm_w, eps, d, bf16, hf);
        for (int i = 0; i < d; i++) store_el(h, i, hf[i], bf16);
    }
    free(hf);
    if (!hf) {
        free(h);
        return NULL;
    }
    return h;
}

int moelab_ffn_res(const moelab_mat_t* up, const moelab_mat_t* down, const void* norm_w, float eps, void* x, int bf16,
                   int threads) {
    const int d = up->k;
    void* h = normed(x, norm_w, eps, d, bf16);
    void* y = malloc((size_t)d * (bf16 ? 2 : 4) + 64);
    float* yf = (float*)malloc(sizeof(float) * (size_t)d);
    int rc = (h && y && yf) ? experts_vec(&up, &down, 1, NULL, h, y, bf16, threads) : -1;
    if (rc == 0) {
        for (int i = 0; i < d; i++) yf[i] = load_el(y, i, bf16);
        add_residual(x, yf, d, bf16);
    }
    free(h);
    free(y);
    free(yf);
    return rc;
}

/* x += moe(rms_norm(x)) (+ a shared expert's output when shared_up is not NULL). */
int moelab_moe_res(const moelab_mat_t* up, const moelab_mat_t* down, const float* router_w, int num_experts, int top_k,
                   int mode, const moelab_mat_t* shared_up, const moelab_mat_t* shared_down, const void* norm_w,
                   float eps, void* x, int* ids, float* weights, int bf16, int threads) {
    const int d = up[0].k;
    const size_t bytes = (size_t)d * (bf16 ? 2 : 4) + 64;
    void* h = normed(x, norm_w, eps, d, bf16);
    void* y = malloc(bytes);
    void* s = malloc(bytes);
    float* yf = (float*)malloc(sizeof(float) * (size_t)d);
    int rc = (h && y && s && yf) ? moelab_moe_vec(up, down, router_w, num_experts, top_k, mode, h, y, ids, weights, bf16,
                                                 threads)
                                 : -1;
    if (rc == 0 && shared_up) rc = experts_vec(&shared_up, &shared_down, 1, NULL, h, s, bf16, threads);
    if (rc == 0) {
        for (int i = 0; i < d; i++) {
            float v = load_el(y, i, bf16);
            yf[i] = shared_up ? round_act(v + load_el(s, i, bf16), bf16) : v;
        }
        add_residual(x, yf, d, bf16);
    }
    free(h);
    free(y);
    free(s);
    free(yf);
    return rc;
}

/* One projection of every active expert j (mats[active[j]]) on its rows in[j], into outs[j] [n_j, blocks * 16]:
 * the (expert, block) pairs split over the threads. Called inside a parallel region (an orphaned omp for). */
static void project_experts(const moelab_mat_t* mats, const int* active, int n_active, const rows_t* in, float** outs,
                            int bf16, int mine, float* scratch, float* out) {
    const int blocks = blocks_of(&mats[0]); /* every expert has the same shape */
#pragma omp for schedule(static)
    for (int t = 0; t < n_active * blocks; t++) {
        if (!mine) continue;
        const int j = t / blocks, b = t % blocks;
        mat_block_rows(&mats[active[j]], b, &in[j], bf16, scratch, out);
        for (int m = 0; m < in[j].M; m++)
            for (int r = 0; r < BLOCK; r++) outs[j][(int64_t)m * blocks * BLOCK + b * BLOCK + r] = out[m * BLOCK + r];
    }
}

/* ------------------------------------------------------------------ several tokens
 * The routed experts of an MoE block for T tokens whose routing the caller decided (the module's
 * router: any routing rule, capacity drops already removed), in one call and one OpenMP region:
 * each chosen expert's weights are read once for all of its rows (the multi-row kernels of
 * mat_block_rows), SwiGLU as in experts_vec, and each token's terms summed in ascending expert order
 * as the module's combine adds them: term = expert output times its weight (rounded to the
 * activation dtype), rounded after each add.
 *
 * x [T, d] and y [T, d] in the activation dtype (y = 0 for a token without assignment); the A
 * assignments are token[a], expert[a], weight[a] (fp32 holding the activation dtype's value).
 * Returns 0, -1 (memory), -2 (bad arguments). */
int moelab_moe_rows(const moelab_mat_t* up, const moelab_mat_t* down, int num_experts, int T, int A, const int* token,
                    const int* expert, const float* weight, const void* x, void* y, int bf16, int threads) {
    if (T < 1 || A < 0 || num_experts < 1) return -2;
    for (int a = 0; a < A; a++)
        if (token[a] < 0 || token[a] >= T || expert[a] < 0 || expert[a] >= num_experts) return -2;
    const int d = up[0].k, f = down[0].k, ug = group_of(&up[0]), dg = group_of(&down[0]);
    /* assignments grouped by expert, in assignment order within an expert: order[start[e] .. start[e+1]) */
    int* start = (int*)calloc((size_t)num_experts + 1, sizeof(int));
    int* order = (int*)malloc(sizeof(int) * (size_t)(A + 1));
    int* row_of = (int*)malloc(sizeof(int) * (size_t)(A + 1)); /* assignment -> its row among its expert's */
    int* active = (int*)malloc(sizeof(int) * (size_t)num_experts);
    float* yf = (float*)malloc(sizeof(float) * (size_t)T * d);
    if (!start || !order || !row_of || !active || !yf) {
        free(start), free(order), free(row_of), free(active), free(yf);
        return -1;
    }
    for (int a = 0; a < A; a++) start[expert[a] + 1]++;
    for (int e = 0; e < num_experts; e++) start[e + 1] += start[e];
    int n_active = 0;
    for (int e = 0; e < num_experts; e++)
        if (start[e + 1] > start[e]) active[n_active++] = e;
    {
        int* fill = (int*)calloc((size_t)num_experts, sizeof(int));
        if (!fill) {
            free(start), free(order), free(row_of), free(active), free(yf);
            return -1;
        }
        for (int a = 0; a < A; a++) {
            const int e = expert[a];
            row_of[a] = fill[e];
            order[start[e] + fill[e]++] = a;
        }
        free(fill);
    }
    rows_t* xin = (rows_t*)calloc((size_t)(n_active > 0 ? n_active : 1), sizeof(rows_t)); /* each expert's rows of x */
    rows_t* act = (rows_t*)calloc((size_t)(n_active > 0 ? n_active : 1), sizeof(rows_t)); /* and of its activation */
    float** h = (float**)calloc((size_t)(n_active > 0 ? n_active : 1), sizeof(float*));   /* [n, 2f] up outputs */
    float** o = (float**)calloc((size_t)(n_active > 0 ? n_active : 1), sizeof(float*));   /* [n, d] down outputs */
    int ok = xin && act && h && o;
    const int up_blocks = blocks_of(&up[0]), down_blocks = blocks_of(&down[0]);
    for (int j = 0; ok && j < n_active; j++) {
        const int e = active[j], n = start[e + 1] - start[e];
        ok = rows_alloc(&xin[j], n, d, ug, is_quant(&up[e])) && rows_alloc(&act[j], n, f, dg, is_quant(&down[e]));
        h[j] = (float*)malloc(sizeof(float) * (size_t)n * (up_blocks * BLOCK));
        o[j] = (float*)malloc(sizeof(float) * (size_t)n * (down_blocks * BLOCK));
        ok = ok && h[j] && o[j];
        if (ok) {
            for (int i = 0; i < n; i++) {
                const int t = token[order[start[e] + i]];
                for (int c = 0; c < d; c++) xin[j].f32[(int64_t)i * d + c] = load_el(x, (int64_t)t * d + c, bf16);
            }
            rows_fill(&xin[j], bf16);
        }
    }
    const int n_run = ok ? n_active : 0; /* nothing runs after a failed allocation */
    int failed = 0;
#pragma omp parallel num_threads(threads) reduction(|| : failed)
    {
        float* scratch = (float*)aligned_alloc(64, (size_t)(d > f ? d : f) * BLOCK * 4);
        float* out = (float*)aligned_alloc(64, (size_t)(T > FEW_ROWS ? T : FEW_ROWS) * BLOCK * 4 + 64);
        const int mine = ok && scratch && out;
        project_experts(up, active, n_run, xin, h, bf16, mine, scratch, out);
        /* SwiGLU per expert row: silu(gate) rounded, times up, rounded; then the down inputs' forms */
#pragma omp for schedule(static)
        for (int j = 0; j < n_run; j++) {
            if (!mine) continue;
            for (int m = 0; m < act[j].M; m++) {
                const float* hm = h[j] + (int64_t)m * up_blocks * BLOCK;
                for (int c = 0; c < f; c++)
                    act[j].f32[(int64_t)m * f + c] = round_act(round_act(silu(hm[c]), bf16) * hm[f + c], bf16);
            }
            rows_fill(&act[j], bf16);
        }
        project_experts(down, active, n_run, act, o, bf16, mine, scratch, out);
        /* each token's terms, ascending expert */
#pragma omp for schedule(static)
        for (int t = 0; t < (ok ? T : 0); t++) {
            if (!mine) continue;
            float* acc = yf + (int64_t)t * d;
            int first = 1;
            for (int j = 0; j < n_active; j++) {
                const int e = active[j];
                for (int i = start[e]; i < start[e + 1]; i++) {
                    const int a = order[i];
                    if (token[a] != t) continue;
                    const float* om = o[j] + (int64_t)row_of[a] * down_blocks * BLOCK;
                    for (int c = 0; c < d; c++) {
                        const float term = round_act(om[c] * weight[a], bf16);
                        acc[c] = first ? term : round_act(acc[c] + term, bf16);
                    }
                    first = 0;
                }
            }
            if (first)
                for (int c = 0; c < d; c++) acc[c] = 0.f;
            for (int c = 0; c < d; c++) store_el(y, (int64_t)t * d + c, acc[c], bf16);
        }
        failed = !mine;
        free(scratch);
        free(out);
    }
    for (int j = 0; j < n_active; j++) {
        if (xin) rows_free(&xin[j]);
        if (act) rows_free(&act[j]);
        if (h) free(h[j]);
        if (o) free(o[j]);
    }
    free(xin), free(act), free(h), free(o);
    free(start), free(order), free(row_of), free(active), free(yf);
    return failed ? -1 : 0;
}
