/* Weight-only int8 / int4 matmuls for CPU decoding, over a 16-row interleaved weight layout.
 *
 * Why: at batch 1 a decode step is a chain of mat-vecs, bound by how fast the weights stream
 * from memory. PyTorch's int8 kernel (aten::_weight_int8pack_mm) reads a row-major [N, K]
 * weight one row at a time and runs at about half the memory bandwidth here, no faster than
 * oneDNN's bf16 mat-vec although it moves half the bytes. These kernels read a layout where
 * 16 consecutive output rows are interleaved (block b, input k: the 16 bytes of rows
 * 16b..16b+15 side by side), so one thread walks one contiguous stream and one 64-byte load
 * feeds 16 outputs with 4 inputs (int8) or 8 inputs (int4).
 *
 * Layouts (built by moelab/native/layout.py; N is padded to a multiple of 16 with zero rows):
 *   int8: qb [N/16, K, 16] int8,           w[n, k] = qb[n/16, k, n%16] * scales[n]
 *   int4: qb [N/16, K/2, 16] uint8 nibble pairs (input 2j low nibble, 2j+1 high nibble),
 *         w[n, k] = (q[n, k] - 8) * scale[k/group, n] + zero[k/group, n],
 *         scales_zeros [K/group, Npad, 2] (scale, zero): the layout PyTorch's int4 kernels use.
 * Activations x [M, K], scales and outputs y [M, N] share one dtype: bf16 or fp32 (flag).
 * Accumulation is fp32; outputs are rounded once (to nearest even, as torch does).
 *
 * Threads: OpenMP over 16-row blocks with the caller's thread count (torch's); torch's CPU
 * wheels ship libgomp, which this library then shares.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <omp.h>

#if defined(__AVX512F__) && defined(__AVX512BW__)
#include <immintrin.h>
#define MOELAB_AVX512 1
#else
#define MOELAB_AVX512 0
#endif

#define BLOCK 16

int moelab_native_version(void) { return 1; }
int moelab_native_simd_bits(void) { return MOELAB_AVX512 ? 512 : 0; }
int moelab_native_max_threads(void) { return omp_get_max_threads(); }

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

static float* to_f32(const void* x, int64_t n, int bf16) {
    float* out = (float*)aligned_alloc(64, (size_t)((n * 4 + 63) / 64 * 64));
    if (!out) return NULL;
    for (int64_t i = 0; i < n; i++) out[i] = load_el(x, i, bf16);
    return out;
}

/* ------------------------------------------------------------------ dequantize one block */

/* w[k*16 + r] = q of row 16b+r at input k (int8; the row scale is applied to the sums). */
static void q8_dequant_block(const int8_t* blk, int K, float* w) {
    for (int64_t i = 0; i < (int64_t)K * BLOCK; i++) w[i] = (float)blk[i];
}

/* w[k*16 + r] = (q - 8) * scale + zero of row 16b+r at input k, group k/group. */
static void q4_dequant_block(const uint8_t* blk, int K, int group, const void* sz, int Np, int b, int bf16, float* w) {
    for (int k = 0; k < K; k += 2) {
        const uint8_t* pair = blk + (int64_t)(k / 2) * BLOCK;
        int64_t base = ((int64_t)(k / group) * Np + (int64_t)b * BLOCK) * 2;
        for (int r = 0; r < BLOCK; r++) {
            float s = load_el(sz, base + 2 * r, bf16), z = load_el(sz, base + 2 * r + 1, bf16);
            w[(int64_t)k * BLOCK + r] = (float)((int)(pair[r] & 15) - 8) * s + z;
            w[(int64_t)(k + 1) * BLOCK + r] = (float)((int)(pair[r] >> 4) - 8) * s + z;
        }
    }
}

/* out[m*16 + r] = sum_k w[k*16 + r] * x[m, k] for the M rows of x (K % 4 == 0): four rows of x
 * share each load of w; a lone row (or the last few) uses four accumulators over k instead. */
static void block_gemm(const float* w, int K, const float* xf, int M, float* out) {
    int m = 0;
#if MOELAB_AVX512
    for (; m + 4 <= M; m += 4) {
        const float *x0 = xf + (int64_t)m * K, *x1 = x0 + K, *x2 = x1 + K, *x3 = x2 + K;
        __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
        for (int k = 0; k < K; k++) {
            __m512 wk = _mm512_load_ps(w + (int64_t)k * BLOCK);
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
            a0 = _mm512_fmadd_ps(_mm512_load_ps(wk), _mm512_set1_ps(xm[k]), a0);
            a1 = _mm512_fmadd_ps(_mm512_load_ps(wk + 16), _mm512_set1_ps(xm[k + 1]), a1);
            a2 = _mm512_fmadd_ps(_mm512_load_ps(wk + 32), _mm512_set1_ps(xm[k + 2]), a2);
            a3 = _mm512_fmadd_ps(_mm512_load_ps(wk + 48), _mm512_set1_ps(xm[k + 3]), a3);
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
static __m512 q4_block_vec(const uint8_t* blk, int K, int group, const void* sz, int Np, int b, int bf16,
                           const float* xf, const float* xsum) {
    const __m512i low = _mm512_set1_epi32(15), eight = _mm512_set1_epi32(8);
    __m512 y = _mm512_setzero_ps();
    for (int g0 = 0; g0 < K; g0 += group) {
        __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
        for (int k = g0; k < g0 + group; k += 8) {
            __m512i v = _mm512_loadu_si512((const void*)(blk + (int64_t)(k / 2) * BLOCK));
            for (int lane = 0; lane < 4; lane++) {
                __m128i bytes = lane == 0 ? _mm512_castsi512_si128(v)
                              : lane == 1 ? _mm512_extracti32x4_epi32(v, 1)
                              : lane == 2 ? _mm512_extracti32x4_epi32(v, 2)
                                          : _mm512_extracti32x4_epi32(v, 3);
                __m512i u = _mm512_cvtepu8_epi32(bytes);
                __m512 lo = _mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_and_si512(u, low), eight));
                __m512 hi = _mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_srli_epi32(u, 4), eight));
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
        load_scales_zeros(sz, ((int64_t)(g0 / group) * Np + (int64_t)b * BLOCK) * 2, bf16, &s, &z);
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
    __m128i bytes = lane == 0 ? _mm512_castsi512_si128(v)
                  : lane == 1 ? _mm512_extracti32x4_epi32(v, 1)
                  : lane == 2 ? _mm512_extracti32x4_epi32(v, 2)
                              : _mm512_extracti32x4_epi32(v, 3);
    __m512i u = _mm512_cvtepu8_epi32(bytes);
    __m512i hi = _mm512_slli_epi32(u, 12);                                   /* high nibble → bits 16..19 */
    __m512i both = _mm512_ternarylogic_epi32(_mm512_set1_epi32(0x0000000f), u, hi, 0xca); /* mask ? u : hi */
    return _mm512_ternarylogic_epi32(both, _mm512_set1_epi32(0x000f000f), _mm512_set1_epi32(0x43004300), 0xea); /* (a & b) | c */
}

/* One int4 block times M <= 8 bf16 rows of x (x as uint32 pairs), group by group. Inlined per M
 * (see q4_bf16dot) so the row loops unroll; P accumulators per row hide the dot's latency. */
static inline __attribute__((always_inline)) void q4_block_bf16dot_m(const uint8_t* blk, int K, int group, const void* sz,
                                                                    int Np, int b, const uint32_t* xp, const float* xsum,
                                                                    const int M, float* out) {
    enum { P_MAX = 4 };
    const int P = M == 1 ? 4 : M == 2 ? 2 : 1;
    const int groups = K / group;
    __m512 y[8];
    for (int m = 0; m < M; m++) y[m] = _mm512_setzero_ps();
    for (int g = 0; g < groups; g++) {
        __m512 acc[8][P_MAX];
        for (int m = 0; m < M; m++)
            for (int p = 0; p < P; p++) acc[m][p] = _mm512_setzero_ps();
        for (int k = g * group; k < (g + 1) * group; k += 8) {
            __m512i v = _mm512_loadu_si512((const void*)(blk + (int64_t)(k / 2) * BLOCK));
            for (int lane = 0; lane < 4; lane++) {
                __m512bh w = (__m512bh)q4_lane_bf16(v, lane);
                for (int m = 0; m < M; m++) {
                    __m512bh xx = (__m512bh)_mm512_set1_epi32((int)xp[(int64_t)m * (K / 2) + k / 2 + lane]);
                    acc[m][lane % P] = _mm512_dpbf16_ps(acc[m][lane % P], w, xx);
                }
            }
        }
        __m512 s, z;
        load_scales_zeros(sz, ((int64_t)g * Np + (int64_t)b * BLOCK) * 2, 1, &s, &z);
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

static void q4_block_bf16dot(const uint8_t* blk, int K, int group, const void* sz, int Np, int b, const uint32_t* xp,
                             const float* xsum, int M, float* out) {
    switch (M) {
#define CASE(m) \
    case m: q4_block_bf16dot_m(blk, K, group, sz, Np, b, xp, xsum, m, out); break;
        CASE(1) CASE(2) CASE(3) CASE(4) CASE(5) CASE(6) CASE(7) CASE(8)
#undef CASE
    }
}
#else
#define MOELAB_BF16DOT 0
#endif
#endif

/* ------------------------------------------------------------------ entry points */

/* Per thread: a K x 16 fp32 block of dequantized weights and M x 16 sums (the large-M path). */
typedef struct {
    float* w;
    float* out;
} scratch_t;

static int scratch_alloc(scratch_t* t, int K, int M) {
    t->w = (float*)aligned_alloc(64, (size_t)K * BLOCK * 4);
    t->out = (float*)aligned_alloc(64, (size_t)(M > 1 ? M : 1) * BLOCK * 4 + 64);
    return t->w && t->out;
}

static void scratch_free(scratch_t* t) {
    free(t->w);
    free(t->out);
}

/* y[M, N] = x[M, K] · (q * scales)ᵀ; returns 0, or -1 when out of memory. */
int moelab_q8_matmul(const void* x, const int8_t* qb, const void* scales, void* y, int M, int N, int K, int bf16,
                     int threads) {
    const int nblocks = (N + BLOCK - 1) / BLOCK;
    float* xf = to_f32(x, (int64_t)M * K, bf16);
    if (!xf) return -1;
    int failed = 0;
#pragma omp parallel num_threads(threads) reduction(|| : failed)
    {
        scratch_t t;
        failed = !scratch_alloc(&t, K, M);
#pragma omp for schedule(static)
        for (int b = 0; b < nblocks; b++) {
            if (failed) continue;
            const int8_t* blk = qb + (int64_t)b * K * BLOCK;
#if MOELAB_AVX512
            if (M == 1)
                _mm512_store_ps(t.out, q8_block_vec(blk, K, xf));
            else if (M <= 8)
                q8_block_rows(blk, K, xf, M, t.out);
            else
#endif
            {
                q8_dequant_block(blk, K, t.w);
                block_gemm(t.w, K, xf, M, t.out);
            }
            for (int m = 0; m < M; m++)
                for (int r = 0; r < BLOCK && b * BLOCK + r < N; r++) {
                    int n = b * BLOCK + r;
                    store_el(y, (int64_t)m * N + n, t.out[m * BLOCK + r] * load_el(scales, n, bf16), bf16);
                }
        }
        scratch_free(&t);
    }
    free(xf);
    return failed ? -1 : 0;
}

/* y[M, N] = x[M, K] · ((q - 8) * scale + zero)ᵀ over groups of `group` inputs; Np = padded N. */
int moelab_q4_matmul(const void* x, const uint8_t* qb, int group, const void* scales_zeros, void* y, int M, int N,
                     int Np, int K, int bf16, int threads) {
    const int nblocks = Np / BLOCK, groups = K / group;
    float* xf = to_f32(x, (int64_t)M * K, bf16);
    if (!xf) return -1;
    const int small = M <= 8;
    float* xsum = (float*)malloc((size_t)(small ? M : 1) * groups * sizeof(float));
    if (!xsum) {
        free(xf);
        return -1;
    }
    if (small)
        for (int m = 0; m < M; m++)
            for (int g = 0; g < groups; g++) {
                float acc = 0.f;
                for (int k = g * group; k < (g + 1) * group; k++) acc += xf[(int64_t)m * K + k];
                xsum[m * groups + g] = acc;
            }
    int failed = 0;
#pragma omp parallel num_threads(threads) reduction(|| : failed)
    {
        scratch_t t;
        failed = !scratch_alloc(&t, K, M);
#pragma omp for schedule(static)
        for (int b = 0; b < nblocks; b++) {
            if (failed) continue;
            const uint8_t* blk = qb + (int64_t)b * (K / 2) * BLOCK;
#if MOELAB_BF16DOT
            if (bf16 && small)
                q4_block_bf16dot(blk, K, group, scales_zeros, Np, b, (const uint32_t*)x, xsum, M, t.out);
            else
#endif
#if MOELAB_AVX512
            if (M == 1)
                _mm512_store_ps(t.out, q4_block_vec(blk, K, group, scales_zeros, Np, b, bf16, xf, xsum));
            else
#endif
            {
                q4_dequant_block(blk, K, group, scales_zeros, Np, b, bf16, t.w);
                block_gemm(t.w, K, xf, M, t.out);
            }
            for (int m = 0; m < M; m++)
                for (int r = 0; r < BLOCK && b * BLOCK + r < N; r++)
                    store_el(y, (int64_t)m * N + b * BLOCK + r, t.out[m * BLOCK + r], bf16);
        }
        scratch_free(&t);
    }
    free(xsum);
    free(xf);
    return failed ? -1 : 0;
}
