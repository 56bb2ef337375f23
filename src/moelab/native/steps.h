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
            q4_block_bf16dot(blk, m->k, m->group, q4_block_scales(m->scales, b, m->k / m->group, bf16), x->pairs, x->gsum, 1, acc);
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
