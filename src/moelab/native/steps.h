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

/* An input vector in every form the block kernels read. */
typedef struct {
    const float* f32;      /* [k] */
    const uint32_t* pairs; /* [k/2] bf16 pairs (bf16 activations only) */
    const float* gsum;     /* [k/group] sums of groups (int4 only) */
    const limbs_t* limbs;  /* integer limbs (int8/int4 with VNNI), or NULL */
} vec_t;

static inline float round_act(float v, int bf16) { return bf16 ? bf16_to_f32(f32_to_bf16(v)) : v; }

/* The 16 outputs of block b of m times x, scaled (int8) and rounded to the activation dtype. */
static void mat_block(const moelab_mat_t* m, int b, const vec_t* x, int bf16, float* scratch, float* out) {
    float acc[BLOCK] __attribute__((aligned(64)));
    if (m->kind == KIND_F32) {
        block_gemm((const float*)m->w + (int64_t)b * m->k * BLOCK, m->k, x->f32, 1, acc);
    } else
#if MOELAB_AVX512
    if (m->kind == KIND_BF16) {
        _mm512_store_ps(acc, bf16_block_vec((const uint32_t*)m->w + (int64_t)b * (m->k / 2) * BLOCK, m->k, x->pairs, x->f32));
    } else if (m->kind == KIND_INT8) {
        const int8_t* blk = (const int8_t*)m->w + (int64_t)b * m->k * BLOCK;
#if MOELAB_VNNI
        if (x->limbs)
            _mm512_store_ps(acc, q8_block_vnni(blk, m->k, x->limbs));
        else
#endif
            _mm512_store_ps(acc, q8_block_vec(blk, m->k, x->f32));
    } else {
        const uint8_t* blk = (const uint8_t*)m->w + (int64_t)b * (m->k / 2) * BLOCK;
#if MOELAB_VNNI
        if (x->limbs)
            _mm512_store_ps(acc, q4_block_vnni(blk, m->k, m->group, q4_block_scales(m->scales, b, m->k / m->group, bf16), bf16, x->limbs, x->gsum));
        else
#endif
#if MOELAB_BF16DOT
        if (bf16)
            q4_block_bf16dot(blk, NULL, m->k, m->group, q4_block_scales(m->scales, b, m->k / m->group, bf16), x->pairs, x->gsum, 1, acc);
        else
#endif
            _mm512_store_ps(acc, q4_block_vec(blk, m->k, m->group, q4_block_scales(m->scales, b, m->k / m->group, bf16), bf16, x->f32, x->gsum));
    }
#else
    {
    if (m->kind == KIND_BF16)
        bf16_dequant_block((const uint32_t*)m->w + (int64_t)b * (m->k / 2) * BLOCK, m->k, scratch);
    else if (m->kind == KIND_INT8)
        q8_dequant_block((const int8_t*)m->w + (int64_t)b * m->k * BLOCK, m->k, scratch);
    else
        q4_dequant_block((const uint8_t*)m->w + (int64_t)b * (m->k / 2) * BLOCK, m->k, m->group,
                         q4_block_scales(m->scales, b, m->k / m->group, bf16), bf16, scratch);
    block_gemm(scratch, m->k, x->f32, 1, acc);
    }
#endif
    (void)scratch;
    for (int r = 0; r < BLOCK; r++) {
        int n = b * BLOCK + r;
        float v = acc[r];
        if (m->kind == KIND_INT8 && n < m->n) v *= load_el(m->scales, n, bf16);
        out[r] = round_act(v, bf16);
    }
}

static inline int blocks_of(const moelab_mat_t* m) { return (m->n + BLOCK - 1) / BLOCK; }

/* An input vector's buffers: fp32 values, bf16 pairs, int4 group sums, integer limbs. */
typedef struct {
    float* f32;
    uint16_t* raw;
    float* gsum;
    limbs_t limbs;
    int use_limbs;
    vec_t v;
} vecbuf_t;

/* Allocate for k inputs; `quant` asks for limbs (int8/int4 weights), `group` > 0 for group sums. */
static int vecbuf_alloc(vecbuf_t* b, int k, int group, int quant) {
    b->f32 = (float*)aligned_alloc(64, (size_t)((k + 15) / 16 * 64));
    b->raw = (uint16_t*)aligned_alloc(64, (size_t)((k + 31) / 32 * 64));
    b->gsum = (float*)malloc(sizeof(float) * (size_t)(group > 0 ? k / group + 1 : 1));
    b->limbs = (limbs_t){0};
    b->use_limbs = MOELAB_VNNI && quant && k % 8 == 0;
    int ok = b->f32 && b->raw && b->gsum;
    if (b->use_limbs) ok = ok && limbs_alloc(&b->limbs, k);
    return ok;
}

static void vecbuf_free(vecbuf_t* b) {
    free(b->f32);
    free(b->raw);
    free(b->gsum);
    limbs_free(&b->limbs);
}

/* After b->f32 holds the (already rounded) values: fill the other forms and b->v. */
static void vecbuf_fill(vecbuf_t* b, int k, int group, int bf16) {
    for (int i = 0; i < k; i++) b->raw[i] = f32_to_bf16(b->f32[i]);
    if (group > 0) group_sums(b->f32, k, group, b->gsum);
    if (b->use_limbs) split_limbs(b->f32, k, bf16 ? 2 : LIMBS, &b->limbs);
    b->v = (vec_t){b->f32, (const uint32_t*)b->raw, b->gsum, b->use_limbs ? &b->limbs : NULL};
}

static inline int is_quant(const moelab_mat_t* m) { return m->kind == KIND_INT8 || m->kind == KIND_INT4; }
static inline int group_of(const moelab_mat_t* m) { return m->kind == KIND_INT4 ? m->group : 0; }

/* ------------------------------------------------------------------ several rows
 * M rows of one matrix's input in every form the multi-row kernels read, and one block of the
 * product for all of them, through the same kernels as the matmul entry points of qmatmul.c for
 * the same M (so each row's result equals what moelab_*_matmul gives for those rows). */

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

/* After x->f32 holds the (already rounded) rows: the other forms. */
static UNUSED void rows_fill(rows_t* x, int bf16) {
    const int M = x->M, k = x->k;
    for (int64_t i = 0; i < (int64_t)M * k; i++) x->raw[i] = f32_to_bf16(x->f32[i]);
    if (x->group > 0)
        for (int m = 0; m < M; m++) group_sums(x->f32 + (int64_t)m * k, k, x->group, x->gsum + (int64_t)m * (k / x->group));
    for (int m = 0; x->use_limbs && m < M; m++) split_limbs(x->f32 + (int64_t)m * k, k, bf16 ? 2 : LIMBS, &x->limbs[m]);
}

/* out[m*16 + r] = row m times output row 16b + r of `m`, int8 scales applied, rounded to the activation
 * dtype. `scratch`: k x 16 floats (generic builds, and paths that dequantize a block). */
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
    for (int m = 0; m < M; m++)
        for (int r = 0; r < BLOCK; r++) {
            const int n = b * BLOCK + r;
            float v = out[m * BLOCK + r];
            if (mt->kind == KIND_INT8 && n < mt->n) v *= load_el(mt->scales, n, bf16);
            out[m * BLOCK + r] = round_act(v, bf16);
        }
}

/* out[i] = x[i] * rsqrt(mean(x^2) + eps) * w[i], rounded to the activation dtype (w NULL: no scale). */
static void rms_norm(const void* x, const void* w, float eps, int d, int bf16, float* out) {
    float ss = 0.f;
    for (int i = 0; i < d; i++) {
        float v = load_el(x, i, bf16);
        ss += v * v;
    }
    const float r = 1.0f / sqrtf(ss / (float)d + eps);
    for (int i = 0; i < d; i++) out[i] = round_act(load_el(x, i, bf16) * r * (w ? load_el(w, i, bf16) : 1.0f), bf16);
}

#endif
