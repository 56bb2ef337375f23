/* Pieces shared by the fused decode steps (decode.c: feed-forward and MoE blocks;
 * attention.c: attention blocks): weight descriptors, one input vector in every form the block
 * kernels read, one block of a projection, RMSNorm.
 */
#ifndef MOELAB_STEPS_H
#define MOELAB_STEPS_H

#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#include "blocks.h"

enum { KIND_BF16 = 0, KIND_INT8 = 1, KIND_INT4 = 2, KIND_F32 = 3 };
enum { ROUTE_RENORMALIZE = 0, ROUTE_PROBS = 1, ROUTE_SOFTMAX_AFTER_TOPK = 2 };

/* One weight matrix in a native layout (see qmatmul.c); n outputs, np padded, k inputs. */
typedef struct {
    int kind, n, np, k, group;
    const void* w;
    const void* scales; /* int8: [n]; int4: [np/16, k/group, 16, 2]; in the activation dtype. bf16: unused */
} moelab_mat_t;

static inline float round_act(float v, int bf16) { return bf16 ? bf16_to_f32(f32_to_bf16(v)) : v; }
static inline int blocks_of(const moelab_mat_t* m) { return (m->n + BLOCK - 1) / BLOCK; }
static inline int is_quant(const moelab_mat_t* m) { return m->kind == KIND_INT8 || m->kind == KIND_INT4; }
static inline int group_of(const moelab_mat_t* m) { return m->kind == KIND_INT4 ? m->group : 0; }

/* ------------------------------------------------------------------ rows of an input
 * M rows (one token, a few, or a prefill's) of one matrix's input in every form the block kernels read,
 * and one 16-row block of the product for all of them: every product in the library (the matmul
 * entry points of qmatmul.c, the fused steps) goes through mat_block_rows, so the same rows give the
 * same result whichever entry point they come through. */

#define FEW_ROWS 8 /* up to this many rows share one read of a block (VNNI limbs, sums) */

typedef struct {
    int M, k, group;
    float* f32;      /* [M, k] */
    uint16_t* raw;   /* [M, k] bf16 values (read as pairs) */
    float* gsum;     /* [M, k/group] (int4) */
    limbs_t limbs[FEW_ROWS];
    int use_limbs;   /* limbs filled (int8/int4 with VNNI, M <= FEW_ROWS) */
} rows_t;

/* Buffers for M rows of k inputs; `quant` asks for limbs (int8/int4 weights), `group` > 0 for sums. */
static UNUSED int rows_alloc(rows_t* x, int M, int k, int group, int quant) {
    *x = (rows_t){0};
    x->M = M, x->k = k, x->group = group;
    x->f32 = (float*)aligned_alloc(64, (size_t)((M * k + 15) / 16 * 64));
    x->raw = (uint16_t*)aligned_alloc(64, (size_t)((M * k + 31) / 32 * 64));
    x->gsum = (float*)malloc(sizeof(float) * (size_t)(group > 0 ? M * (k / group) + 1 : 1));
    x->use_limbs = MOELAB_VNNI && quant && k % 8 == 0 && M <= FEW_ROWS;
    int ok = x->f32 && x->raw && x->gsum;
    for (int m = 0; x->use_limbs && m < M; m++) ok = limbs_alloc(&x->limbs[m], k) && ok;
    return ok;
}

static UNUSED void rows_free(rows_t* x) {
    free(x->f32);
    free(x->raw);
    free(x->gsum);
    for (int m = 0; x->use_limbs && m < x->M; m++) limbs_free(&x->limbs[m]);
}

/* The sums and limbs of the rows, from x->f32. */
static UNUSED void rows_derive(rows_t* x, int bf16) {
    const int M = x->M, k = x->k;
    if (x->group > 0)
        for (int m = 0; m < M; m++) group_sums(x->f32 + (int64_t)m * k, k, x->group, x->gsum + (int64_t)m * (k / x->group));
    for (int m = 0; x->use_limbs && m < M; m++) split_limbs(x->f32 + (int64_t)m * k, k, bf16 ? 2 : LIMBS, &x->limbs[m]);
}

/* After x->f32 holds the (already rounded) rows: the other forms (bf16 pairs only for bf16 activations,
 * the only ones that read them). */
static UNUSED void rows_fill(rows_t* x, int bf16) {
    if (bf16)
        for (int64_t i = 0; i < (int64_t)x->M * x->k; i++) x->raw[i] = f32_to_bf16(x->f32[i]);
    rows_derive(x, bf16);
}

/* Every form of the rows of src [M, k] (bf16 or fp32). */
static UNUSED void rows_set(rows_t* x, const void* src, int bf16) {
    const int64_t n = (int64_t)x->M * x->k;
    for (int64_t i = 0; i < n; i++) x->f32[i] = load_el(src, i, bf16);
    if (bf16) memcpy(x->raw, src, (size_t)n * 2);
    rows_derive(x, bf16);
}

#if MOELAB_AVX512
/* f32_to_bf16 then back, on 16 lanes, bit for bit (round to nearest even; NaN to the quiet 0x7fc0). */
static inline __m512 round16_bf16(__m512 v) {
    const __m512i u = _mm512_castps_si512(v);
    const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7fff)), odd);
    r = _mm512_and_si512(r, _mm512_set1_epi32((int)0xffff0000u));
    const __mmask16 nan = _mm512_cmpgt_epu32_mask(_mm512_and_si512(u, _mm512_set1_epi32(0x7fffffff)), _mm512_set1_epi32(0x7f800000));
    return _mm512_castsi512_ps(_mm512_mask_mov_epi32(r, nan, _mm512_set1_epi32(0x7fc00000)));
}
#endif

/* The sums of block b for M rows → int8 scales applied (rows below n), rounded to the activation dtype. */
static void block_epilogue(const moelab_mat_t* mt, int b, int M, int bf16, float* out) {
#if MOELAB_AVX512
    const int live = mt->n - b * BLOCK;
    const __mmask16 mask = live >= BLOCK ? (__mmask16)0xffff : (__mmask16)((1u << (live > 0 ? live : 0)) - 1);
    __m512 scale = _mm512_set1_ps(1.0f);
    if (mt->kind == KIND_INT8)
        scale = bf16 ? _mm512_castsi512_ps(_mm512_slli_epi32(
                           _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mask, (const uint16_t*)mt->scales + b * BLOCK)), 16))
                     : _mm512_maskz_loadu_ps(mask, (const float*)mt->scales + b * BLOCK);
    for (int m = 0; m < M; m++) {
        __m512 v = _mm512_loadu_ps(out + m * BLOCK);
        if (mt->kind == KIND_INT8) v = _mm512_mask_mul_ps(v, mask, v, scale);
        _mm512_storeu_ps(out + m * BLOCK, bf16 ? round16_bf16(v) : v);
    }
#else
    for (int m = 0; m < M; m++)
        for (int r = 0; r < BLOCK; r++) {
            const int n = b * BLOCK + r;
            float v = out[m * BLOCK + r];
            if (mt->kind == KIND_INT8 && n < mt->n) v *= load_el(mt->scales, n, bf16);
            out[m * BLOCK + r] = round_act(v, bf16);
        }
#endif
}

/* out[m*16 + r] = row m times output row 16b + r of `m`, int8 scales applied, rounded to the activation
 * dtype. `scratch`: k x 16 floats for the paths that convert or dequantize a block (more than one row, or
 * any build without AVX-512); one row on an AVX-512 build never reads it (NULL is fine there). */
static UNUSED void mat_block_rows(const moelab_mat_t* mt, int b, const rows_t* x, int bf16, float* scratch, float* out) {
    const int M = x->M, K = mt->k;
    const int small = M <= FEW_ROWS;
    if (mt->kind == KIND_F32) {
        block_gemm((const float*)mt->w + (int64_t)b * K * BLOCK, K, x->f32, M, out);
    } else if (mt->kind == KIND_BF16) {
        const uint32_t* blk = (const uint32_t*)mt->w + (int64_t)b * (K / 2) * BLOCK;
        const uint32_t* xp = (const uint32_t*)x->raw;
#if MOELAB_AVX512
        if (M == 1)
            _mm512_storeu_ps(out, bf16_block_vec(blk, K, xp, x->f32));
        else
#endif
#if MOELAB_BF16DOT
            for (int m0 = 0; m0 < M; m0 += 8)
                bf16_block_rows(blk, K, xp + (int64_t)m0 * (K / 2), M - m0 < 8 ? M - m0 : 8, out + m0 * BLOCK);
#else
        {
            bf16_dequant_block(blk, K, scratch);
            block_gemm(scratch, K, x->f32, M, out);
        }
#endif
        (void)xp;
    } else if (mt->kind == KIND_INT8) {
        const int8_t* blk = (const int8_t*)mt->w + (int64_t)b * K * BLOCK;
#if MOELAB_VNNI
        if (x->use_limbs && M == 1)
            _mm512_storeu_ps(out, q8_block_vnni(blk, K, &x->limbs[0]));
        else if (x->use_limbs)
            q8_block_vnni_rows(blk, K, x->limbs, M, out);
        else
#endif
#if MOELAB_BF16DOT
        if (bf16 && !small && K % 8 == 0)
            q8_block_bf16_rows(blk, K, (const uint32_t*)x->raw, M, (uint32_t*)scratch, out);
        else
#endif
#if MOELAB_AVX512
        if (M == 1)
            _mm512_storeu_ps(out, q8_block_vec(blk, K, x->f32));
        else if (small)
            q8_block_rows(blk, K, x->f32, M, out);
        else
#endif
        {
            q8_dequant_block(blk, K, scratch);
            block_gemm(scratch, K, x->f32, M, out);
        }
    } else {
        const uint8_t* blk = (const uint8_t*)mt->w + (int64_t)b * (K / 2) * BLOCK;
        const int groups = K / mt->group;
        const void* sz = q4_block_scales(mt->scales, b, groups, bf16);
        const int dot_rows = MOELAB_BF16DOT && bf16;
        const int use_vnni = x->use_limbs && (M <= 2 || !dot_rows);
        (void)dot_rows, (void)use_vnni, (void)small;
#if MOELAB_VNNI
        if (use_vnni && M == 1)
            _mm512_storeu_ps(out, q4_block_vnni(blk, K, mt->group, sz, bf16, &x->limbs[0], x->gsum));
        else if (use_vnni)
            q4_block_vnni_rows(blk, K, mt->group, sz, bf16, x->limbs, x->gsum, M, out);
        else
#endif
#if MOELAB_BF16DOT
        if (dot_rows) {
            const uint32_t* pre = NULL;
            if (M > 16) { /* the nibbles converted once for every eight rows (6-8% from 128 rows on) */
                q4_block_to_bf16_pairs(blk, K, (uint32_t*)scratch);
                pre = (const uint32_t*)scratch;
            }
            for (int m0 = 0; m0 < M; m0 += 8)
                q4_block_bf16dot(blk, pre, K, mt->group, sz, (const uint32_t*)x->raw + (int64_t)m0 * (K / 2),
                                 x->gsum + (int64_t)m0 * groups, M - m0 < 8 ? M - m0 : 8, out + m0 * BLOCK);
        } else
#endif
#if MOELAB_AVX512
        if (M == 1)
            _mm512_storeu_ps(out, q4_block_vec(blk, K, mt->group, sz, bf16, x->f32, x->gsum));
        else
#endif
        {
            q4_dequant_block(blk, K, mt->group, sz, bf16, scratch);
            block_gemm(scratch, K, x->f32, M, out);
        }
    }
    block_epilogue(mt, b, M, bf16, out);
}

/* out[i] = x[i] * rsqrt(mean(x^2) + eps) * w[i], rounded to the activation dtype (w NULL: no scale). */
static UNUSED void rms_norm(const void* x, const void* w, float eps, int d, int bf16, float* out) {
    float ss = 0.f;
    for (int i = 0; i < d; i++) {
        float v = load_el(x, i, bf16);
        ss += v * v;
    }
    const float r = 1.0f / sqrtf(ss / (float)d + eps);
    for (int i = 0; i < d; i++) out[i] = round_act(load_el(x, i, bf16) * r * (w ? load_el(w, i, bf16) : 1.0f), bf16);
}

#endif
