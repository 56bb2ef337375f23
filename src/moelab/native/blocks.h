/* Per-block kernels shared by the matmul (qmatmul.c) and fused decode (decode.c) entry points.
 *
 * A "block" is 16 consecutive output rows of a weight in the interleaved layout (see
 * qmatmul.c). Every function here computes the 16 fp32 sums of one block, for one row of x
 * (fused paths), a few rows (one conversion of the weights feeds every row), or many rows
 * (dequantize the block once into a K x 16 fp32 scratch, then multiply).
 */
#ifndef MOELAB_BLOCKS_H
#define MOELAB_BLOCKS_H

#include <stdint.h>
#include <stdlib.h>
#include <math.h>
#include <string.h>
#include <omp.h>

#if defined(__AVX512F__) && defined(__AVX512BW__)
#include <immintrin.h>
#define MOELAB_AVX512 1
#else
#define MOELAB_AVX512 0
#endif

#define BLOCK 16
#define UNUSED __attribute__((unused))

static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0; /* NaN */
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

static inline float load_el(const void* p, int64_t i, int bf16) {
    return bf16 ? bf16_to_f32(((const uint16_t*)p)[i]) : ((const float*)p)[i];
}

static inline void store_el(void* p, int64_t i, float v, int bf16) {
    if (bf16)
        ((uint16_t*)p)[i] = f32_to_bf16(v);
    else
        ((float*)p)[i] = v;
}

/* out[g] = sum of x over inputs g*group .. (g+1)*group - 1, for the k/group groups of x [k]. */
static UNUSED void group_sums(const float* x, int k, int group, float* out) {
    for (int g = 0; g < k / group; g++) {
        float s = 0.f;
        for (int i = g * group; i < (g + 1) * group; i++) s += x[i];
        out[g] = s;
    }
}

/* ------------------------------------------------------------------ dequantize one block */

/* w[k*16 + r] = q of row 16b+r at input k (int8; the row scale is applied to the sums). */
static void q8_dequant_block(const int8_t* blk, int K, float* w) {
    for (int64_t i = 0; i < (int64_t)K * BLOCK; i++) w[i] = (float)blk[i];
}

/* int4 blocks are lane-major: [K/8][16 rows][4 bytes], byte t of row r in chunk j holding inputs
 * 8j + 2t (low nibble) and 8j + 2t + 1 (high nibble); one 32-bit lane = 8 inputs of one row. */
static inline uint8_t q4_byte(const uint8_t* blk, int k, int r) { return blk[((k / 8) * BLOCK + r) * 4 + (k / 2) % 4]; }

/* int4 scales and zeros are block-major, [Np/16][K/group][16 rows][2] (scale, zero) in the
 * activation dtype: the kernels read one block's pairs as one contiguous run beside its weights
 * (group-major [K/group][Np][2], PyTorch's layout, had a mat-vec read K/group strided streams at
 * once: 15-25% slower from memory). A block's own run: */
static inline const void* q4_block_scales(const void* sz, int64_t b, int groups, int bf16) {
    return (const char*)sz + b * groups * BLOCK * 2 * (bf16 ? 2 : 4);
}

/* w[k*16 + r] = (q - 8) * scale + zero of row r of the block at input k; sz: the block's scales. */
static void q4_dequant_block(const uint8_t* blk, int K, int group, const void* sz, int bf16, float* w) {
    for (int k = 0; k < K; k += 2) {
        int64_t base = (int64_t)(k / group) * BLOCK * 2;
        for (int r = 0; r < BLOCK; r++) {
            float s = load_el(sz, base + 2 * r, bf16), z = load_el(sz, base + 2 * r + 1, bf16);
            uint8_t byte = q4_byte(blk, k, r);
            w[(int64_t)k * BLOCK + r] = (float)((int)(byte & 15) - 8) * s + z;
            w[(int64_t)(k + 1) * BLOCK + r] = (float)((int)(byte >> 4) - 8) * s + z;
        }
    }
}

/* out[m*16 + r] = sum_k w[k*16 + r] * x[m, k] for the M rows of x (K % 4 == 0): four rows of x
 * share each load of w; a lone row (or the last few) uses four accumulators over k instead. */
static UNUSED void block_gemm(const float* w, int K, const float* xf, int M, float* out) {
    int m = 0;
#if MOELAB_AVX512
    for (; m + 4 <= M; m += 4) {
        const float *x0 = xf + (int64_t)m * K, *x1 = x0 + K, *x2 = x1 + K, *x3 = x2 + K;
        __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
        for (int k = 0; k < K; k++) {
            __m512 wk = _mm512_loadu_ps(w + (int64_t)k * BLOCK);
            a0 = _mm512_fmadd_ps(wk, _mm512_set1_ps(x0[k]), a0);
            a1 = _mm512_fmadd_ps(wk, _mm512_set1_ps(x1[k]), a1);
            a2 = _mm512_fmadd_ps(wk, _mm512_set1_ps(x2[k]), a2);
            a3 = _mm512_fmadd_ps(wk, _mm512_set1_ps(x3[k]), a3);
        }
        _mm512_storeu_ps(out + (m + 0) * BLOCK, a0);
        _mm512_storeu_ps(out + (m + 1) * BLOCK, a1);
        _mm512_storeu_ps(out + (m + 2) * BLOCK, a2);
        _mm512_storeu_ps(out + (m + 3) * BLOCK, a3);
    }
    for (; m < M; m++) {
        const float* xm = xf + (int64_t)m * K;
        __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
        for (int k = 0; k < K; k += 4) {
            const float* wk = w + (int64_t)k * BLOCK;
            a0 = _mm512_fmadd_ps(_mm512_loadu_ps(wk), _mm512_set1_ps(xm[k]), a0);
            a1 = _mm512_fmadd_ps(_mm512_loadu_ps(wk + 16), _mm512_set1_ps(xm[k + 1]), a1);
            a2 = _mm512_fmadd_ps(_mm512_loadu_ps(wk + 32), _mm512_set1_ps(xm[k + 2]), a2);
            a3 = _mm512_fmadd_ps(_mm512_loadu_ps(wk + 48), _mm512_set1_ps(xm[k + 3]), a3);
        }
        _mm512_storeu_ps(out + m * BLOCK, _mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
    }
#else
    for (; m < M; m++) {
        const float* xm = xf + (int64_t)m * K;
        float acc[4][BLOCK] = {{0}};
        for (int k = 0; k < K; k += 4)
            for (int p = 0; p < 4; p++)
                for (int r = 0; r < BLOCK; r++) acc[p][r] += w[(int64_t)(k + p) * BLOCK + r] * xm[k + p];
        for (int r = 0; r < BLOCK; r++) out[m * BLOCK + r] = (acc[0][r] + acc[1][r]) + (acc[2][r] + acc[3][r]);
    }
#endif
}

/* ------------------------------------------------------------------ fused single-row paths */

#if MOELAB_AVX512
static inline __m512 lane_i8(__m512i v, int lane) {
    __m128i b = lane == 0 ? _mm512_castsi512_si128(v)
              : lane == 1 ? _mm512_extracti32x4_epi32(v, 1)
              : lane == 2 ? _mm512_extracti32x4_epi32(v, 2)
                          : _mm512_extracti32x4_epi32(v, 3);
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(b));
}

/* One int8 block times one x row: 64-byte loads, four independent accumulators. */
static __m512 q8_block_vec(const int8_t* blk, int K, const float* xf) {
    __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    for (int k = 0; k < K; k += 4) {
        __m512i v = _mm512_loadu_si512((const void*)(blk + (int64_t)k * BLOCK));
        a0 = _mm512_fmadd_ps(lane_i8(v, 0), _mm512_set1_ps(xf[k]), a0);
        a1 = _mm512_fmadd_ps(lane_i8(v, 1), _mm512_set1_ps(xf[k + 1]), a1);
        a2 = _mm512_fmadd_ps(lane_i8(v, 2), _mm512_set1_ps(xf[k + 2]), a2);
        a3 = _mm512_fmadd_ps(lane_i8(v, 3), _mm512_set1_ps(xf[k + 3]), a3);
    }
    return _mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3));
}

/* The 16 (scale, zero) pairs of one block and group, deinterleaved to fp32. */
static inline void load_scales_zeros(const void* sz, int64_t base, int bf16, __m512* s, __m512* z) {
    if (bf16) {
        __m512i v = _mm512_loadu_si512((const void*)((const uint16_t*)sz + base));
        *s = _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
        *z = _mm512_castsi512_ps(_mm512_and_si512(v, _mm512_set1_epi32((int)0xffff0000u)));
    } else {
        const float* f = (const float*)sz + base;
        __m512 lo = _mm512_loadu_ps(f), hi = _mm512_loadu_ps(f + 16);
        const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
        const __m512i odd = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
        *s = _mm512_permutex2var_ps(lo, even, hi);
        *z = _mm512_permutex2var_ps(lo, odd, hi);
    }
}

/* One int4 block times one x row, group by group: sum (q - 8) x, then scale it and add zero * sum x. */
static __m512 q4_block_vec(const uint8_t* blk, int K, int group, const void* sz, int bf16,
                           const float* xf, const float* xsum) {
    const __m512i low = _mm512_set1_epi32(15), eight = _mm512_set1_epi32(8);
    __m512 y = _mm512_setzero_ps();
    for (int g0 = 0; g0 < K; g0 += group) {
        __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
        for (int k = g0; k < g0 + group; k += 8) {
            __m512i v = _mm512_loadu_si512((const void*)(blk + (int64_t)(k / 2) * BLOCK));
            for (int lane = 0; lane < 4; lane++) { /* byte `lane` of every row: inputs k + 2 lane, k + 2 lane + 1 */
                __m512i u = _mm512_srli_epi32(v, 8 * lane);
                __m512 lo = _mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_and_si512(u, low), eight));
                __m512 hi = _mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_and_si512(_mm512_srli_epi32(u, 4), low), eight));
                int kk = k + 2 * lane;
                if (lane & 1) {
                    a2 = _mm512_fmadd_ps(lo, _mm512_set1_ps(xf[kk]), a2);
                    a3 = _mm512_fmadd_ps(hi, _mm512_set1_ps(xf[kk + 1]), a3);
                } else {
                    a0 = _mm512_fmadd_ps(lo, _mm512_set1_ps(xf[kk]), a0);
                    a1 = _mm512_fmadd_ps(hi, _mm512_set1_ps(xf[kk + 1]), a1);
                }
            }
        }
        __m512 s, z;
        load_scales_zeros(sz, (int64_t)(g0 / group) * BLOCK * 2, bf16, &s, &z);
        __m512 dot = _mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3));
        y = _mm512_fmadd_ps(s, dot, y);
        y = _mm512_fmadd_ps(z, _mm512_set1_ps(xsum[g0 / group]), y);
    }
    return y;
}

/* One int8 block times 2..8 rows of x: each 64-byte load is converted once and used by every row. */
static void q8_block_rows(const int8_t* blk, int K, const float* xf, int M, float* out) {
    for (int m0 = 0; m0 < M; m0 += 4) {
        const int mc = M - m0 < 4 ? M - m0 : 4;
        const float* x0 = xf + (int64_t)m0 * K;
        __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
        for (int k = 0; k < K; k += 4) {
            __m512i v = _mm512_loadu_si512((const void*)(blk + (int64_t)k * BLOCK));
            for (int lane = 0; lane < 4; lane++) {
                __m512 w = lane_i8(v, lane);
                for (int j = 0; j < mc; j++) acc[j] = _mm512_fmadd_ps(w, _mm512_set1_ps(x0[(int64_t)j * K + k + lane]), acc[j]);
            }
        }
        for (int j = 0; j < mc; j++) _mm512_storeu_ps(out + (m0 + j) * BLOCK, acc[j]);
    }
}

#if defined(__AVX512BF16__)
#define MOELAB_BF16DOT 1
/* The nibble pairs of one 16-byte lane as 16 lanes of two bf16 values (128 + q_even, 128 + q_odd):
 * 0x4300 | q is the bf16 of 128 + q exactly, so dpbf16 multiplies the integers by x with no
 * conversion instruction; the 128 (and the 8 of q - 8) come back out through sum x. */
static inline __m512i q4_lane_bf16(__m512i v, int lane) {
    __m512i u = _mm512_srli_epi32(v, 8 * lane);                              /* byte `lane` of every row */
    __m512i hi = _mm512_slli_epi32(u, 12);                                   /* high nibble → bits 16..19 */
    __m512i both = _mm512_ternarylogic_epi32(_mm512_set1_epi32(0x0000000f), u, hi, 0xca); /* mask ? u : hi */
    return _mm512_ternarylogic_epi32(both, _mm512_set1_epi32(0x000f000f), _mm512_set1_epi32(0x43004300), 0xea); /* (a & b) | c */
}

/* One int4 block times M <= 8 bf16 rows of x (x as uint32 pairs), group by group. Inlined per M
 * (see q4_bf16dot) so the row loops unroll; P accumulators per row hide the dot's latency. */
static inline __attribute__((always_inline)) void q4_block_bf16dot_m(const uint8_t* blk, const uint32_t* pre, int K,
                                                                    int group, const void* sz, const uint32_t* xp,
                                                                    const float* xsum, const int M, float* out) {
    enum { P_MAX = 4 };
    const int P = M <= 2 ? 4 : M <= 4 ? 2 : 1; /* 8 or more independent chains */
    const int groups = K / group;
    __m512 y[8];
    for (int m = 0; m < M; m++) y[m] = _mm512_setzero_ps();
    for (int g = 0; g < groups; g++) {
        __m512 acc[8][P_MAX];
        for (int m = 0; m < M; m++)
            for (int p = 0; p < P; p++) acc[m][p] = _mm512_setzero_ps();
        for (int k = g * group; k < (g + 1) * group; k += 8) {
            const __m512i v = pre ? _mm512_setzero_si512() : _mm512_loadu_si512((const void*)(blk + (int64_t)(k / 2) * BLOCK));
            for (int lane = 0; lane < 4; lane++) {
                const __m512bh w = (__m512bh)(pre ? _mm512_loadu_si512((const void*)(pre + (int64_t)(k / 2 + lane) * BLOCK))
                                                  : q4_lane_bf16(v, lane));
                for (int m = 0; m < M; m++) {
                    __m512bh xx = (__m512bh)_mm512_set1_epi32((int)xp[(int64_t)m * (K / 2) + k / 2 + lane]);
                    acc[m][lane % P] = _mm512_dpbf16_ps(acc[m][lane % P], w, xx);
                }
            }
        }
        __m512 s, z;
        load_scales_zeros(sz, (int64_t)g * BLOCK * 2, 1, &s, &z);
        for (int m = 0; m < M; m++) {
            __m512 sum = acc[m][0];
            for (int p = 1; p < P; p++) sum = _mm512_add_ps(sum, acc[m][p]);
            float sx = xsum[m * groups + g];
            __m512 dot = _mm512_sub_ps(sum, _mm512_set1_ps(136.0f * sx));
            y[m] = _mm512_fmadd_ps(s, dot, y[m]);
            y[m] = _mm512_fmadd_ps(z, _mm512_set1_ps(sx), y[m]);
        }
    }
    for (int m = 0; m < M; m++) _mm512_storeu_ps(out + m * BLOCK, y[m]);
}

/* `pre`: the block's nibbles already as q4_lane_bf16 pairs ([K/2][16], q4_block_to_bf16_pairs), or NULL. */
static void q4_block_bf16dot(const uint8_t* blk, const uint32_t* pre, int K, int group, const void* sz, const uint32_t* xp,
                             const float* xsum, int M, float* out) {
    switch (M) {
#define CASE(m) \
    case m: q4_block_bf16dot_m(blk, pre, K, group, sz, xp, xsum, m, out); break;
        CASE(1) CASE(2) CASE(3) CASE(4) CASE(5) CASE(6) CASE(7) CASE(8)
#undef CASE
    }
}

/* An int4 block's nibbles converted once into the bf16 pairs the dot products read, for many rows. */
static UNUSED void q4_block_to_bf16_pairs(const uint8_t* blk, int K, uint32_t* pairs) {
    for (int k = 0; k < K; k += 8) {
        const __m512i v = _mm512_loadu_si512((const void*)(blk + (int64_t)(k / 2) * BLOCK));
        for (int lane = 0; lane < 4; lane++) _mm512_storeu_si512((void*)(pairs + (int64_t)(k / 2 + lane) * BLOCK), q4_lane_bf16(v, lane));
    }
}
#else
#define MOELAB_BF16DOT 0
#endif
#endif


#ifndef MOELAB_BF16DOT
#define MOELAB_BF16DOT 0
#endif

/* ------------------------------------------------------------------ bf16 weights
 * Layout: blk [K/2][16] uint32, lane r of pair j = w[r, 2j] | w[r, 2j+1] << 16 (K % 8 == 0). */

static UNUSED void bf16_dequant_block(const uint32_t* blk, int K, float* w) {
    for (int j = 0; j < K / 2; j++)
        for (int r = 0; r < BLOCK; r++) {
            uint32_t v = blk[(int64_t)j * BLOCK + r];
            w[(int64_t)(2 * j) * BLOCK + r] = bf16_to_f32((uint16_t)(v & 0xffffu));
            w[(int64_t)(2 * j + 1) * BLOCK + r] = bf16_to_f32((uint16_t)(v >> 16));
        }
}

#if MOELAB_AVX512
/* One bf16 block times one row of x, given as bf16 pairs xp (dot-product units) or fp32 xf. */
static UNUSED __m512 bf16_block_vec(const uint32_t* blk, int K, const uint32_t* xp, const float* xf) {
    __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
#if MOELAB_BF16DOT
    (void)xf;
    for (int j = 0; j < K / 2; j += 4) {
        const uint32_t* p = blk + (int64_t)j * BLOCK;
        a0 = _mm512_dpbf16_ps(a0, (__m512bh)_mm512_loadu_si512(p), (__m512bh)_mm512_set1_epi32((int)xp[j]));
        a1 = _mm512_dpbf16_ps(a1, (__m512bh)_mm512_loadu_si512(p + 16), (__m512bh)_mm512_set1_epi32((int)xp[j + 1]));
        a2 = _mm512_dpbf16_ps(a2, (__m512bh)_mm512_loadu_si512(p + 32), (__m512bh)_mm512_set1_epi32((int)xp[j + 2]));
        a3 = _mm512_dpbf16_ps(a3, (__m512bh)_mm512_loadu_si512(p + 48), (__m512bh)_mm512_set1_epi32((int)xp[j + 3]));
    }
#else
    (void)xp;
    const __m512i high = _mm512_set1_epi32((int)0xffff0000u);
    for (int j = 0; j < K / 2; j += 2) {
        __m512i v = _mm512_loadu_si512((const void*)(blk + (int64_t)j * BLOCK));
        __m512i u = _mm512_loadu_si512((const void*)(blk + (int64_t)(j + 1) * BLOCK));
        a0 = _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_slli_epi32(v, 16)), _mm512_set1_ps(xf[2 * j]), a0);
        a1 = _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_and_si512(v, high)), _mm512_set1_ps(xf[2 * j + 1]), a1);
        a2 = _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_slli_epi32(u, 16)), _mm512_set1_ps(xf[2 * j + 2]), a2);
        a3 = _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_and_si512(u, high)), _mm512_set1_ps(xf[2 * j + 3]), a3);
    }
#endif
    return _mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3));
}

#if MOELAB_BF16DOT
/* One bf16 block times M <= 8 bf16 rows of x (pairs): one load of the weights feeds every row.
 * P consecutive pairs per iteration, each with its own accumulator per row, so M * P (8 to 16)
 * independent dot-product chains hide the instruction's latency. M and P are constants once
 * inlined (the switch below): the loops unroll and every accumulator stays in a register
 * (indexing them with a run-time j % P spilled them to the stack: M = 2 ran 3x slower than M = 1). */
static inline __attribute__((always_inline)) void bf16_block_rows_m(const uint32_t* blk, int K, const uint32_t* xp,
                                                                   const int M, float* out) {
    enum { P_MAX = 4 };
    const int P = M <= 4 ? 4 : 2; /* K / 2 is a multiple of 4 */
    const int64_t half = K / 2;
    __m512 acc[8][P_MAX];
    for (int m = 0; m < M; m++)
        for (int p = 0; p < P; p++) acc[m][p] = _mm512_setzero_ps();
    for (int64_t j = 0; j < half; j += P)
        for (int p = 0; p < P; p++) {
            const __m512bh w = (__m512bh)_mm512_loadu_si512((const void*)(blk + (j + p) * BLOCK));
            for (int m = 0; m < M; m++)
                acc[m][p] = _mm512_dpbf16_ps(acc[m][p], w, (__m512bh)_mm512_set1_epi32((int)xp[m * half + j + p]));
        }
    for (int m = 0; m < M; m++) /* with P = 4, the chains and their sum are bf16_block_vec's: rows equal it bitwise */
        _mm512_storeu_ps(out + m * BLOCK, P == 4 ? _mm512_add_ps(_mm512_add_ps(acc[m][0], acc[m][1]),
                                                                 _mm512_add_ps(acc[m][2], acc[m][3]))
                                                 : _mm512_add_ps(acc[m][0], acc[m][1]));
}

static UNUSED void bf16_block_rows(const uint32_t* blk, int K, const uint32_t* xp, int M, float* out) {
    switch (M) {
#define CASE(m) \
    case m: bf16_block_rows_m(blk, K, xp, m, out); break;
        CASE(1) CASE(2) CASE(3) CASE(4) CASE(5) CASE(6) CASE(7) CASE(8)
#undef CASE
    }
}

/* An int8 block's integers in the bf16 pair layout above ([K/2][16] uint32, K % 2 == 0): an integer of
 * at most 7 bits is exact in bf16 (the top half of its fp32), so many bf16 rows multiply it through
 * bf16_block_rows with no rounding; the row scales are applied to the sums, as on every int8 path. */
static UNUSED void q8_block_to_bf16_pairs(const int8_t* blk, int K, uint32_t* pairs) {
    const __m512i high = _mm512_set1_epi32((int)0xffff0000u);
    for (int j = 0; j < K / 2; j++) {
        const __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(blk + (int64_t)(2 * j) * BLOCK))));
        const __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(blk + (int64_t)(2 * j + 1) * BLOCK))));
        const __m512i pair = _mm512_or_si512(_mm512_srli_epi32(_mm512_castps_si512(lo), 16), _mm512_and_si512(_mm512_castps_si512(hi), high));
        _mm512_storeu_si512((void*)(pairs + (int64_t)j * BLOCK), pair);
    }
}

/* One int8 block times M > 8 bf16 rows (pairs xp [M, K/2]), K % 8 == 0: the block converted once into
 * `pairs` (K/2 x 16 uint32 of scratch), then eight rows at a time through the bf16 dot products. */
static UNUSED void q8_block_bf16_rows(const int8_t* blk, int K, const uint32_t* xp, int M, uint32_t* pairs, float* out) {
    q8_block_to_bf16_pairs(blk, K, pairs);
    for (int m0 = 0; m0 < M; m0 += 8)
        bf16_block_rows(pairs, K, xp + (int64_t)m0 * (K / 2), M - m0 < 8 ? M - m0 : 8, out + m0 * BLOCK);
}
#endif
#endif

/* ------------------------------------------------------------------ integer dot products (VNNI)
 *
 * For one row of x, int8 and int4 weights are multiplied with AVX512-VNNI integer dot products
 * (64 multiply-adds per instruction) instead of being converted to floats. x is split into
 * int8 "limbs" on power-of-two scales, x ≈ s1·a1 + s2·a2 (+ s3·a3) with s2 = s1/128,
 * s3 = s2/128 and |a1| ≤ 127. Three limbs for fp32 x: the error is below 2^-22 of the largest
 * element (fp32 sums themselves carry 2^-24 per addition). Two for bf16 x: below 2^-15 of the
 * largest element, 64 times less than bf16's own rounding of that element; every element
 * within 2^6 of the largest is exact. Products and sums of integers are exact in int32; the three sums are
 * scaled and added in fp32. This is not activation quantization: the result equals the
 * weight-only product to fp32 rounding (tested against the formula).
 */
#if MOELAB_AVX512 && defined(__AVX512VNNI__) && defined(__AVX512VBMI__)
#define MOELAB_VNNI 1
#else
#define MOELAB_VNNI 0
#endif

#define LIMBS 3

typedef struct {
    float* r;         /* [K] scratch */
    int8_t* a;        /* [LIMBS][K] limbs in input order */
    int32_t* even;    /* [LIMBS][K/8]: limb bytes of inputs 8c, 8c+2, 8c+4, 8c+6 (int4 low nibbles) */
    int32_t* odd;     /* [LIMBS][K/8]: inputs 8c+1, 8c+3, 8c+5, 8c+7 (int4 high nibbles) */
    int n;            /* limbs in use: 2 for bf16 x (error below 2^-15 of the largest element, 64x
                         under bf16's own rounding of it), 3 for fp32 x (below 2^-22) */
    float scale[LIMBS];
    int32_t sum[LIMBS]; /* sum of each limb over all K (int8 offset correction) */
} limbs_t;

/* Fill `l` (see limbs_alloc) from fp32 x [K], K % 8 == 0; `r` is K floats of scratch. Scales are
 * powers of two, so x * (1/s) and every remainder are exact. */
static UNUSED void split_limbs(const float* xf, int K, int n, limbs_t* l) {
    float* r = l->r;
    l->n = n;
    float mx = 0.f;
    for (int k = 0; k < K; k++) mx = fabsf(xf[k]) > mx ? fabsf(xf[k]) : mx;
    int e = 0;
    if (mx > 0.f) frexpf(mx / 127.0f, &e);
    for (int i = 0; i < LIMBS; i++) l->scale[i] = mx > 0.f ? ldexpf(1.0f, e - 7 * i) : 0.f;
    for (int k = 0; k < K; k++) r[k] = xf[k];
    for (int i = 0; i < n; i++) {
        const float s = l->scale[i], inv = mx > 0.f ? ldexpf(1.0f, 7 * i - e) : 0.f;
        int8_t* a = l->a + (int64_t)i * K;
        int32_t sum = 0;
        for (int k = 0; k < K; k++) {
            float v = rintf(r[k] * inv);
            v = v > 127.f ? 127.f : v < -127.f ? -127.f : v;
            a[k] = (int8_t)v;
            sum += (int32_t)v;
            r[k] -= v * s;
        }
        l->sum[i] = sum;
    }
    for (int i = 0; i < n; i++)
        for (int c = 0; c < K / 8; c++) {
            const uint8_t* src = (const uint8_t*)l->a + (int64_t)i * K + 8 * c;
            l->even[(int64_t)i * (K / 8) + c] = (int32_t)(src[0] | src[2] << 8 | src[4] << 16 | (uint32_t)src[6] << 24);
            l->odd[(int64_t)i * (K / 8) + c] = (int32_t)(src[1] | src[3] << 8 | src[5] << 16 | (uint32_t)src[7] << 24);
        }
}

/* Buffers for the limbs of a K-vector (free with limbs_free); NULL on failure. */
static UNUSED int limbs_alloc(limbs_t* l, int K) {
    l->r = (float*)malloc(sizeof(float) * (size_t)K + 64);
    l->a = (int8_t*)malloc((size_t)LIMBS * K + 64);
    l->even = (int32_t*)malloc(sizeof(int32_t) * ((size_t)LIMBS * (K / 8) + 1));
    l->odd = (int32_t*)malloc(sizeof(int32_t) * ((size_t)LIMBS * (K / 8) + 1));
    return l->r && l->a && l->even && l->odd;
}

static UNUSED void limbs_free(limbs_t* l) {
    free(l->r);
    free(l->a);
    free(l->even);
    free(l->odd);
}

/* Allocate and fill the limbs of x [K] (two for bf16 activations, three for fp32); 0 when out of
 * memory (the buffers are freed again). */
static UNUSED int limbs_of(const float* xf, int K, int bf16, limbs_t* l) {
    if (!limbs_alloc(l, K)) {
        limbs_free(l);
        *l = (limbs_t){0};
        return 0;
    }
    split_limbs(xf, K, bf16 ? 2 : LIMBS, l);
    return 1;
}

/* The limbs of each of the M <= 8 rows of xf [M, K] into l[0..M): 1, or 0 when out of memory (nothing
 * left allocated). */
static UNUSED int rows_limbs_of(const float* xf, int M, int K, int bf16, limbs_t* l) {
    int have = 0;
    while (have < M && limbs_of(xf + (int64_t)have * K, K, bf16, &l[have])) have++;
    if (have == M) return 1;
    for (int m = 0; m < have; m++) limbs_free(&l[m]);
    return 0;
}

static UNUSED void rows_limbs_free(limbs_t* l, int M) {
    for (int m = 0; m < M; m++) limbs_free(&l[m]);
}

#if MOELAB_VNNI
/* [4 inputs][16 rows] bytes → [16 rows][4 inputs]: one 32-bit lane per row, as dpbusd reads it. */
static inline __m512i rows_to_lanes(const void* p) {
    const __m512i idx = _mm512_set_epi8(63, 47, 31, 15, 62, 46, 30, 14, 61, 45, 29, 13, 60, 44, 28, 12, 59, 43, 27, 11, 58,
                                        42, 26, 10, 57, 41, 25, 9, 56, 40, 24, 8, 55, 39, 23, 7, 54, 38, 22, 6, 53, 37, 21,
                                        5, 52, 36, 20, 4, 51, 35, 19, 3, 50, 34, 18, 2, 49, 33, 17, 1, 48, 32, 16, 0);
    return _mm512_permutexvar_epi8(idx, _mm512_loadu_si512(p));
}

static inline __m512 limb_total(const __m512i* c, int n, const limbs_t* l) {
    __m512 y = _mm512_mul_ps(_mm512_cvtepi32_ps(c[0]), _mm512_set1_ps(l->scale[0]));
    for (int i = 1; i < n; i++) y = _mm512_fmadd_ps(_mm512_cvtepi32_ps(c[i]), _mm512_set1_ps(l->scale[i]), y);
    return y;
}

/* One int8 block times one row of x (as NL limbs): sum_k q x (the row scale is applied by the caller). */
static inline __attribute__((always_inline)) __m512 q8_block_vnni_n(const int8_t* blk, int K, const limbs_t* l,
                                                                   const int NL) {
    const __m512i flip = _mm512_set1_epi8((char)0x80); /* q + 128: dpbusd multiplies unsigned by signed bytes */
    __m512i c[LIMBS];
    for (int i = 0; i < NL; i++) c[i] = _mm512_setzero_si512();
    for (int k = 0; k < K; k += 4) {
        __m512i u = _mm512_xor_si512(rows_to_lanes(blk + (int64_t)k * BLOCK), flip);
        for (int i = 0; i < NL; i++)
            c[i] = _mm512_dpbusd_epi32(c[i], u, _mm512_set1_epi32(((const int32_t*)(l->a + (int64_t)i * K))[k / 4]));
    }
    for (int i = 0; i < NL; i++) c[i] = _mm512_sub_epi32(c[i], _mm512_set1_epi32(128 * l->sum[i]));
    return limb_total(c, NL, l);
}

static UNUSED __m512 q8_block_vnni(const int8_t* blk, int K, const limbs_t* l) {
    return l->n == 2 ? q8_block_vnni_n(blk, K, l, 2) : q8_block_vnni_n(blk, K, l, 3);
}

/* One int8 block times M <= 4 rows of x, row m as NL limbs l[m]: one load and one transpose of the
 * weights feed every row. Each row's integer sums and their scaling are those of q8_block_vnni,
 * so every row equals its single-row result bitwise. M and NL are constants once inlined. */
static inline __attribute__((always_inline)) void q8_block_vnni_rows_m(const int8_t* blk, int K, const limbs_t* l,
                                                                      const int M, const int NL, float* out) {
    const __m512i flip = _mm512_set1_epi8((char)0x80);
    __m512i c[4][LIMBS];
    for (int m = 0; m < M; m++)
        for (int i = 0; i < NL; i++) c[m][i] = _mm512_setzero_si512();
    for (int k = 0; k < K; k += 4) {
        const __m512i u = _mm512_xor_si512(rows_to_lanes(blk + (int64_t)k * BLOCK), flip);
        for (int m = 0; m < M; m++)
            for (int i = 0; i < NL; i++)
                c[m][i] = _mm512_dpbusd_epi32(c[m][i], u, _mm512_set1_epi32(((const int32_t*)(l[m].a + (int64_t)i * K))[k / 4]));
    }
    for (int m = 0; m < M; m++) {
        for (int i = 0; i < NL; i++) c[m][i] = _mm512_sub_epi32(c[m][i], _mm512_set1_epi32(128 * l[m].sum[i]));
        _mm512_storeu_ps(out + m * BLOCK, limb_total(c[m], NL, &l[m]));
    }
}

/* One int8 block times M rows of x (limbs l[0..M), all with the same number of limbs), four rows at a time. */
static UNUSED void q8_block_vnni_rows(const int8_t* blk, int K, const limbs_t* l, int M, float* out) {
    for (int m0 = 0; m0 < M; m0 += 4) {
        const int mc = M - m0 < 4 ? M - m0 : 4;
        const limbs_t* lm = l + m0;
        float* o = out + m0 * BLOCK;
        switch (mc * 4 + lm->n) {
#define CASE(m, n) \
    case m * 4 + n: q8_block_vnni_rows_m(blk, K, lm, m, n, o); break;
            CASE(1, 2) CASE(2, 2) CASE(3, 2) CASE(4, 2) CASE(1, 3) CASE(2, 3) CASE(3, 3) CASE(4, 3)
#undef CASE
        }
    }
}

/* How far ahead (bytes) the single-row int4 kernel asks for its weight stream. Its compute per byte is
 * twice int8's, so the hardware prefetcher alone leaves gaps: 4 KiB ahead decoded the Mixtral-shaped
 * model 1.07x faster (two paired in-process runs; 1, 2, 6 and 8 KiB gave 0.98-1.03). The same hint
 * slowed the int8 and bf16 kernels (0.97, 0.95), which keep none. */
#define Q4_PREFETCH 4096

/* One int4 block times one row of x (as NL limbs), group by group, with scales and zeros. Low and
 * high nibbles accumulate separately (two chains per limb); with two limbs the group's sums
 * merge exactly in int32 (a1·128 + a2 stays far below 2^31), so the group costs one conversion. */
static inline __attribute__((always_inline)) __m512 q4_block_vnni_n(const uint8_t* blk, int K, int group, const void* sz,
                                                                   int bf16, const limbs_t* l,
                                                                   const float* xsum, const int NL) {
    const __m512i low = _mm512_set1_epi8(0x0f);
    const int C = K / 8;
    __m512 y = _mm512_setzero_ps(), y2 = y;
    for (int g0 = 0; g0 < K; g0 += group) {
        __m512i c[LIMBS][2];
        for (int i = 0; i < NL; i++) c[i][0] = c[i][1] = _mm512_setzero_si512();
        for (int k = g0; k < g0 + group; k += 8) {
            _mm_prefetch((const char*)(blk + (int64_t)(k / 2) * BLOCK) + Q4_PREFETCH, _MM_HINT_T0);
            __m512i w = _mm512_loadu_si512((const void*)(blk + (int64_t)(k / 2) * BLOCK)); /* lane r: inputs k..k+7 */
            __m512i lo = _mm512_and_si512(w, low), hi = _mm512_and_si512(_mm512_srli_epi16(w, 4), low);
            for (int i = 0; i < NL; i++) {
                c[i][0] = _mm512_dpbusd_epi32(c[i][0], lo, _mm512_set1_epi32(l->even[i * C + k / 8]));
                c[i][1] = _mm512_dpbusd_epi32(c[i][1], hi, _mm512_set1_epi32(l->odd[i * C + k / 8]));
            }
        }
        __m512 total;
        if (NL == 2) {
            __m512i merged = _mm512_add_epi32(_mm512_slli_epi32(_mm512_add_epi32(c[0][0], c[0][1]), 7),
                                              _mm512_add_epi32(c[1][0], c[1][1]));
            total = _mm512_mul_ps(_mm512_cvtepi32_ps(merged), _mm512_set1_ps(l->scale[1]));
        } else {
            __m512i sums[LIMBS];
            for (int i = 0; i < NL; i++) sums[i] = _mm512_add_epi32(c[i][0], c[i][1]);
            total = limb_total(sums, NL, l);
        }
        __m512 s, z;
        load_scales_zeros(sz, (int64_t)(g0 / group) * BLOCK * 2, bf16, &s, &z);
        const float sx = xsum[g0 / group];
        y = _mm512_fmadd_ps(s, _mm512_sub_ps(total, _mm512_set1_ps(8.0f * sx)), y); /* scale · sum (q - 8) x */
        y2 = _mm512_fmadd_ps(z, _mm512_set1_ps(sx), y2);
    }
    return _mm512_add_ps(y, y2);
}

static UNUSED __m512 q4_block_vnni(const uint8_t* blk, int K, int group, const void* sz, int bf16,
                                   const limbs_t* l, const float* xsum) {
    return l->n == 2 ? q4_block_vnni_n(blk, K, group, sz, bf16, l, xsum, 2)
                     : q4_block_vnni_n(blk, K, group, sz, bf16, l, xsum, 3);
}

/* One int4 block times M <= 4 rows of x (row m as NL limbs l[m], group sums xsum[m * groups + g]):
 * one load and one nibble split of the weights feed every row. Each row's operations are those of
 * q4_block_vnni_n, so every row equals its single-row result bitwise. */
static inline __attribute__((always_inline)) void q4_block_vnni_rows_m(const uint8_t* blk, int K, int group,
                                                                      const void* sz, int bf16,
                                                                      const limbs_t* l, const float* xsum, const int M,
                                                                      const int NL, float* out) {
    const __m512i low = _mm512_set1_epi8(0x0f);
    const int C = K / 8, groups = K / group;
    __m512 y[4], y2[4];
    for (int m = 0; m < M; m++) y[m] = y2[m] = _mm512_setzero_ps();
    for (int g0 = 0; g0 < K; g0 += group) {
        __m512i c[4][LIMBS][2];
        for (int m = 0; m < M; m++)
            for (int i = 0; i < NL; i++) c[m][i][0] = c[m][i][1] = _mm512_setzero_si512();
        for (int k = g0; k < g0 + group; k += 8) {
            const __m512i w = _mm512_loadu_si512((const void*)(blk + (int64_t)(k / 2) * BLOCK));
            const __m512i lo = _mm512_and_si512(w, low), hi = _mm512_and_si512(_mm512_srli_epi16(w, 4), low);
            for (int m = 0; m < M; m++)
                for (int i = 0; i < NL; i++) {
                    c[m][i][0] = _mm512_dpbusd_epi32(c[m][i][0], lo, _mm512_set1_epi32(l[m].even[i * C + k / 8]));
                    c[m][i][1] = _mm512_dpbusd_epi32(c[m][i][1], hi, _mm512_set1_epi32(l[m].odd[i * C + k / 8]));
                }
        }
        __m512 s, z;
        load_scales_zeros(sz, (int64_t)(g0 / group) * BLOCK * 2, bf16, &s, &z);
        for (int m = 0; m < M; m++) {
            __m512 total;
            if (NL == 2) {
                __m512i merged = _mm512_add_epi32(_mm512_slli_epi32(_mm512_add_epi32(c[m][0][0], c[m][0][1]), 7),
                                                  _mm512_add_epi32(c[m][1][0], c[m][1][1]));
                total = _mm512_mul_ps(_mm512_cvtepi32_ps(merged), _mm512_set1_ps(l[m].scale[1]));
            } else {
                __m512i sums[LIMBS];
                for (int i = 0; i < NL; i++) sums[i] = _mm512_add_epi32(c[m][i][0], c[m][i][1]);
                total = limb_total(sums, NL, &l[m]);
            }
            const float sx = xsum[m * groups + g0 / group];
            y[m] = _mm512_fmadd_ps(s, _mm512_sub_ps(total, _mm512_set1_ps(8.0f * sx)), y[m]);
            y2[m] = _mm512_fmadd_ps(z, _mm512_set1_ps(sx), y2[m]);
        }
    }
    for (int m = 0; m < M; m++) _mm512_storeu_ps(out + m * BLOCK, _mm512_add_ps(y[m], y2[m]));
}

/* One int4 block times M rows of x (limbs l[0..M), all with the same number of limbs), four rows at a time. */
static UNUSED void q4_block_vnni_rows(const uint8_t* blk, int K, int group, const void* sz, int bf16,
                                      const limbs_t* l, const float* xsum, int M, float* out) {
    const int groups = K / group;
    for (int m0 = 0; m0 < M; m0 += 4) {
        const int mc = M - m0 < 4 ? M - m0 : 4;
        const limbs_t* lm = l + m0;
        const float* sm = xsum + (int64_t)m0 * groups;
        float* o = out + m0 * BLOCK;
        switch (mc * 4 + lm->n) {
#define CASE(m, n) \
    case m * 4 + n: q4_block_vnni_rows_m(blk, K, group, sz, bf16, lm, sm, m, n, o); break;
            CASE(1, 2) CASE(2, 2) CASE(3, 2) CASE(4, 2) CASE(1, 3) CASE(2, 3) CASE(3, 3) CASE(4, 3)
#undef CASE
        }
    }
}
#endif

#endif
