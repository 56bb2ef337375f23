/* A fused batch-1 attention block: x += o(attention(rope(q), rope(k), v)) over the cached keys,
 * with q, k, v projected from rms_norm(x), in one call and one OpenMP region.
 *
 * Why: at batch 1 the attention half of a block is a norm, four small projections, RoPE on q
 * and k, a cache write, the attention itself and a residual add: a dozen operations whose
 * Python and dispatch overhead cost more than their arithmetic (about half of a quantized
 * model's decode step here). Covered: grouped-query attention with rotate-half RoPE, RMSNorm
 * before it, no biases or q/k norms, causal over every cached position (no padding).
 *
 * Arithmetic follows the eager modules, rounding to the activation dtype where they do:
 * each projection's output, RoPE's output (computed in fp32), the attention output (scores,
 * softmax and the weighted sum in fp32, scale 1/sqrt(head_dim)), the residual sum.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <omp.h>

#include "blocks.h"
#include "steps.h"

/* 16 cache entries (bf16 or fp32) from element `at` as fp32. */
#if MOELAB_AVX512
static inline __m512 load16(const void* p, int64_t at, int bf16) {
    if (bf16)
        return _mm512_castsi512_ps(
            _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)((const uint16_t*)p + at))), 16));
    return _mm512_loadu_ps((const float*)p + at);
}
#endif

/* q · cache[at .. at + n) in fp32. */
static inline float dot_row(const float* q, const void* cache, int64_t at, int n, int bf16) {
    int i = 0;
    float acc = 0.f;
#if MOELAB_AVX512
    __m512 a = _mm512_setzero_ps();
    for (; i + 16 <= n; i += 16) a = _mm512_fmadd_ps(_mm512_loadu_ps(q + i), load16(cache, at + i, bf16), a);
    acc = _mm512_reduce_add_ps(a);
#endif
    for (; i < n; i++) acc += q[i] * load_el(cache, at + i, bf16);
    return acc;
}

/* acc += p · cache[at .. at + n). */
static inline void axpy_row(float p, const void* cache, int64_t at, int n, int bf16, float* acc) {
    int i = 0;
#if MOELAB_AVX512
    const __m512 pv = _mm512_set1_ps(p);
    for (; i + 16 <= n; i += 16)
        _mm512_storeu_ps(acc + i, _mm512_fmadd_ps(pv, load16(cache, at + i, bf16), _mm512_loadu_ps(acc + i)));
#endif
    for (; i < n; i++) acc[i] += p * load_el(cache, at + i, bf16);
}

#if MOELAB_AVX512
/* e^x on 16 lanes for x <= 0 (scores minus their maximum): Cody-Waite reduction x = n ln2 + r and
 * Cephes' degree-6 polynomial for e^r, scaled by 2^n (vscalefps, which underflows to 0 as expf does).
 * Within 2 ulp of expf; 1.4-1.6% faster decode than a scalar expf per score (paired runs, int4 and bf16). */
static inline __m512 exp16(__m512 x) {
    x = _mm512_max_ps(x, _mm512_set1_ps(-104.0f)); /* e^-104 < 2^-149: 0 either way */
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
    p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    return _mm512_scalef_ps(p, n);
}
#endif

/* s[j] = e^(s[j] - mx) for j < n; returns their sum. */
static float exp_shifted(float* s, int n, float mx) {
    int j = 0;
    float total = 0.f;
#if MOELAB_AVX512
    __m512 sum = _mm512_setzero_ps();
    const __m512 m = _mm512_set1_ps(mx);
    for (; j < n; j += 16) {
        const __mmask16 live = n - j >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (n - j)) - 1);
        const __m512 e = exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(live, s + j), m));
        _mm512_mask_storeu_ps(s + j, live, e);
        sum = _mm512_mask_add_ps(sum, live, sum, e);
    }
    total = _mm512_reduce_add_ps(sum);
#endif
    for (; j < n; j++) total += (s[j] = expf(s[j] - mx));
    return total;
}

typedef struct {
    moelab_mat_t q, k, v, o;
    const void* norm_w; /* [d] RMSNorm weight, activation dtype */
    float eps;
    int n_heads, n_kv_heads, head_dim;
} moelab_attn_t;

/* x [d] in place; cos/sin [head_dim] fp32 for this position; caches [n_kv_heads, max_len,
 * head_dim] in the activation dtype, written at `pos`; attends to positions 0..pos. */
int moelab_attn_res(const moelab_attn_t* a, void* x, const float* cos, const float* sin, void* k_cache, void* v_cache,
                    int max_len, int pos, int bf16, int threads) {
    const int d = a->q.k, H = a->n_heads, G = a->n_kv_heads, Dh = a->head_dim, L = pos + 1;
    const int nq = H * Dh, nk = G * Dh;
    if (pos < 0 || pos >= max_len || H % G || Dh % 2 || Dh > 1024 || a->o.k != nq) return -2;
    rows_t hb, ob;
    int ok = rows_alloc(&hb, 1, d, group_of(&a->q), is_quant(&a->q) || is_quant(&a->k) || is_quant(&a->v));
    ok = rows_alloc(&ob, 1, nq, group_of(&a->o), is_quant(&a->o)) && ok;
    float* qkv = (float*)malloc(sizeof(float) * (size_t)(nq + 2 * nk));
    float* scores = (float*)malloc(sizeof(float) * (size_t)H * L);
    if (!ok || !qkv || !scores) {
        rows_free(&hb);
        rows_free(&ob);
        free(qkv);
        free(scores);
        return -1;
    }
    rms_norm(x, a->norm_w, a->eps, d, bf16, hb.f32);
    rows_fill(&hb, bf16);
    const moelab_mat_t* mats[3] = {&a->q, &a->k, &a->v};
    const int nb[3] = {(nq + BLOCK - 1) / BLOCK, (nk + BLOCK - 1) / BLOCK, (nk + BLOCK - 1) / BLOCK};
    const int offset[3] = {0, nq, nq + nk}, rows[3] = {nq, nk, nk};
    const float scale = 1.0f / sqrtf((float)Dh);
    const int half = Dh / 2;
    int failed = 0;
#pragma omp parallel num_threads(threads) reduction(|| : failed)
    {
        /* one row: only builds without AVX-512 dequantize a block (see mat_block_rows) */
        float* scratch = MOELAB_AVX512 ? NULL : (float*)aligned_alloc(64, (size_t)(d > nq ? d : nq) * BLOCK * 4);
        const int mine = MOELAB_AVX512 || scratch != NULL;
        float out[BLOCK] __attribute__((aligned(64)));
#pragma omp for schedule(static)
        for (int t = 0; t < nb[0] + nb[1] + nb[2]; t++) {
            if (!mine) continue;
            int m = t < nb[0] ? 0 : t < nb[0] + nb[1] ? 1 : 2;
            int b = t - (m == 0 ? 0 : m == 1 ? nb[0] : nb[0] + nb[1]);
            mat_block_rows(mats[m], b, &hb, bf16, scratch, out);
            for (int r = 0; r < BLOCK && b * BLOCK + r < rows[m]; r++) qkv[offset[m] + b * BLOCK + r] = out[r];
        }
#pragma omp single
        {
            /* RoPE on every query and key head (rotate-half), then the new key and value into the cache */
            float tmp[1024];
            for (int hh = 0; hh < H + G; hh++) {
                float* u = qkv + (hh < H ? hh * Dh : nq + (hh - H) * Dh);
                for (int i = 0; i < Dh; i++) {
                    float rot = i < half ? -u[i + half] : u[i - half];
                    tmp[i] = round_act(u[i] * cos[i] + rot * sin[i], bf16);
                }
                for (int i = 0; i < Dh; i++) u[i] = tmp[i];
            }
            for (int g = 0; g < G; g++)
                for (int i = 0; i < Dh; i++) {
                    int64_t at = ((int64_t)g * max_len + pos) * Dh + i;
                    store_el(k_cache, at, qkv[nq + g * Dh + i], bf16);
                    store_el(v_cache, at, qkv[nq + nk + g * Dh + i], bf16);
                }
        }
        /* one query per head against its group's keys 0..pos */
#pragma omp for schedule(static)
        for (int hh = 0; hh < H; hh++) {
            const int g = hh / (H / G);
            const float* q = qkv + hh * Dh;
            float* s = scores + (int64_t)hh * L;
            float mx = -INFINITY;
            for (int j = 0; j < L; j++) {
                s[j] = dot_row(q, k_cache, ((int64_t)g * max_len + j) * Dh, Dh, bf16) * scale;
                mx = s[j] > mx ? s[j] : mx;
            }
            const float total = exp_shifted(s, L, mx);
            float acc[1024] __attribute__((aligned(64)));
            for (int i = 0; i < Dh; i++) acc[i] = 0.f;
            for (int j = 0; j < L; j++) axpy_row(s[j] / total, v_cache, ((int64_t)g * max_len + j) * Dh, Dh, bf16, acc);
            for (int i = 0; i < Dh; i++) ob.f32[hh * Dh + i] = round_act(acc[i], bf16);
        }
#pragma omp single
        rows_fill(&ob, bf16);
        /* output projection and the residual sum */
#pragma omp for schedule(static)
        for (int b = 0; b < (d + BLOCK - 1) / BLOCK; b++) {
            if (!mine) continue;
            mat_block_rows(&a->o, b, &ob, bf16, scratch, out);
            for (int r = 0; r < BLOCK && b * BLOCK + r < d; r++) {
                int n = b * BLOCK + r;
                store_el(x, n, round_act(load_el(x, n, bf16) + out[r], bf16), bf16);
            }
        }
        failed = !mine;
        free(scratch);
    }
    rows_free(&hb);
    rows_free(&ob);
    free(qkv);
    free(scores);
    return failed ? -1 : 0;
}
