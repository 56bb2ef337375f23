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
 * Layouts (built by moelab/native/qmatmul.py; N is padded to a multiple of 16 with zero rows):
 *   int8: qb [N/16, K, 16] int8,           w[n, k] = qb[n/16, k, n%16] * scales[n]
 *   int4: qb [N/16, K/8, 16, 4] uint8, lane-major: row r's 32-bit lane in chunk j holds its
 *         inputs 8j..8j+7 as nibble pairs (byte t: input 8j+2t low nibble, 8j+2t+1 high),
 *         w[n, k] = (q[n, k] - 8) * scale + zero of row n and group k/group,
 *         scales_zeros [N/16, K/group, 16, 2] (scale, zero): block-major, each block's pairs
 *         in one run (see q4_block_scales in blocks.h).
 * Activations x [M, K], scales and outputs y [M, N] share one dtype: bf16 or fp32 (flag).
 * Accumulation is fp32; outputs are rounded once (to nearest even, as torch does).
 *
 * Threads: OpenMP over 16-row blocks with the caller's thread count (torch's); torch's CPU
 * wheels ship libgomp, which this library then shares.
 */
#include <stdint.h>
#include <stdlib.h>
#include <omp.h>

#include "blocks.h"

int moelab_native_version(void) { return 8; }
int moelab_native_simd_bits(void) { return MOELAB_AVX512 ? 512 : 0; }
int moelab_native_bf16_dot(void) { return MOELAB_BF16DOT; }
int moelab_native_vnni(void) { return MOELAB_VNNI; }
int moelab_native_max_threads(void) { return omp_get_max_threads(); }

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
    /* Up to 8 rows: each row split into limbs once, every block read once for all rows (VNNI). */
    limbs_t limbs[8] = {{0}};
    const int use_vnni = MOELAB_VNNI && M <= 8 && K % 8 == 0;
    if (use_vnni && !rows_limbs_of(xf, M, K, bf16, limbs)) {
        free(xf);
        return -1;
    }
    int failed = 0;
#pragma omp parallel num_threads(threads) reduction(|| : failed)
    {
        scratch_t t;
        failed = !scratch_alloc(&t, K, M);
#pragma omp for schedule(static)
        for (int b = 0; b < nblocks; b++) {
            if (failed) continue;
            const int8_t* blk = qb + (int64_t)b * K * BLOCK;
#if MOELAB_VNNI
            if (use_vnni && M == 1)
                _mm512_store_ps(t.out, q8_block_vnni(blk, K, &limbs[0]));
            else if (use_vnni)
                q8_block_vnni_rows(blk, K, limbs, M, t.out);
            else
#endif
#if MOELAB_BF16DOT
            if (bf16 && M > 8 && K % 8 == 0)
                q8_block_bf16_rows(blk, K, (const uint32_t*)x, M, (uint32_t*)t.w, t.out);
            else
#endif
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
    if (use_vnni) rows_limbs_free(limbs, M);
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
    const int dot_rows = MOELAB_BF16DOT && bf16; /* bf16 rows, eight at a time, through bf16 dot products */
    const int sums = small || dot_rows;
    float* xsum = (float*)malloc((size_t)(sums ? M : 1) * groups * sizeof(float));
    if (!xsum) {
        free(xf);
        return -1;
    }
    if (sums)
        for (int m = 0; m < M; m++) group_sums(xf + (int64_t)m * K, K, group, xsum + m * groups);
    /* Integer dot products for one or two rows (for more, bf16 rows go through the bf16 dot
     * products below: the nibbles' conversion is shared by more rows than the limbs' extra products). */
    limbs_t limbs[8] = {{0}};
    const int use_vnni = MOELAB_VNNI && small && K % 8 == 0 && (M <= 2 || !(MOELAB_BF16DOT && bf16));
    if (use_vnni && !rows_limbs_of(xf, M, K, bf16, limbs)) {
        free(xsum);
        free(xf);
        return -1;
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
            const void* sz = q4_block_scales(scales_zeros, b, groups, bf16);
#if MOELAB_VNNI
            if (use_vnni && M == 1)
                _mm512_store_ps(t.out, q4_block_vnni(blk, K, group, sz, bf16, &limbs[0], xsum));
            else if (use_vnni)
                q4_block_vnni_rows(blk, K, group, sz, bf16, limbs, xsum, M, t.out);
            else
#endif
#if MOELAB_BF16DOT
            if (dot_rows) { /* more than 8 rows: the nibbles converted once, reused from L1 by every group of eight */
                const uint32_t* pre = NULL;
                if (M > 16) { /* converting once pays from three groups of eight: 6-8% at 128-512 rows */
                    q4_block_to_bf16_pairs(blk, K, (uint32_t*)t.w);
                    pre = (const uint32_t*)t.w;
                }
                for (int m0 = 0; m0 < M; m0 += 8)
                    q4_block_bf16dot(blk, pre, K, group, sz, (const uint32_t*)x + (int64_t)m0 * (K / 2),
                                     xsum + (int64_t)m0 * groups, M - m0 < 8 ? M - m0 : 8, t.out + m0 * BLOCK);
            } else
#endif
#if MOELAB_AVX512
            if (M == 1)
                _mm512_store_ps(t.out, q4_block_vec(blk, K, group, sz, bf16, xf, xsum));
            else
#endif
            {
                q4_dequant_block(blk, K, group, sz, bf16, t.w);
                block_gemm(t.w, K, xf, M, t.out);
            }
            for (int m = 0; m < M; m++)
                for (int r = 0; r < BLOCK && b * BLOCK + r < N; r++)
                    store_el(y, (int64_t)m * N + b * BLOCK + r, t.out[m * BLOCK + r], bf16);
        }
        scratch_free(&t);
    }
    if (use_vnni) rows_limbs_free(limbs, M);
    free(xsum);
    free(xf);
    return failed ? -1 : 0;
}

/* y[M, N] = x[M, K] · wᵀ for bf16 x and bf16 weights in the pair layout (K % 8 == 0); y bf16. */
int moelab_bf16_matmul(const uint16_t* x, const uint32_t* wb, uint16_t* y, int M, int N, int K, int threads) {
    const int nblocks = (N + BLOCK - 1) / BLOCK;
    float* xf = to_f32(x, (int64_t)M * K, 1);
    if (!xf) return -1;
    int failed = 0;
#pragma omp parallel num_threads(threads) reduction(|| : failed)
    {
        scratch_t t;
        failed = !scratch_alloc(&t, K, M);
#pragma omp for schedule(static)
        for (int b = 0; b < nblocks; b++) {
            if (failed) continue;
            const uint32_t* blk = wb + (int64_t)b * (K / 2) * BLOCK;
#if MOELAB_AVX512
            if (M == 1)
                _mm512_store_ps(t.out, bf16_block_vec(blk, K, (const uint32_t*)x, xf));
            else
#endif
#if MOELAB_BF16DOT
            if (M > 1)  /* eight rows at a time: the block (K x 16 bf16) stays in L1 between them */
                for (int m0 = 0; m0 < M; m0 += 8)
                    bf16_block_rows(blk, K, (const uint32_t*)x + (int64_t)m0 * (K / 2), M - m0 < 8 ? M - m0 : 8,
                                    t.out + m0 * BLOCK);
            else
#endif
            {
                bf16_dequant_block(blk, K, t.w);
                block_gemm(t.w, K, xf, M, t.out);
            }
            for (int m = 0; m < M; m++)
                for (int r = 0; r < BLOCK && b * BLOCK + r < N; r++)
                    y[(int64_t)m * N + b * BLOCK + r] = f32_to_bf16(t.out[m * BLOCK + r]);
        }
        scratch_free(&t);
    }
    free(xf);
    return failed ? -1 : 0;
}

/* y[M, N] = x[M, K] · wᵀ for fp32 x and fp32 weights in the 16-row layout ([N/16, K, 16]; K % 4 == 0). */
int moelab_f32_matmul(const float* x, const float* wb, float* y, int M, int N, int K, int threads) {
    const int nblocks = (N + BLOCK - 1) / BLOCK;
    int failed = 0;
#pragma omp parallel num_threads(threads) reduction(|| : failed)
    {
        float* out = (float*)aligned_alloc(64, (size_t)M * BLOCK * 4 + 64);
        failed = !out;
#pragma omp for schedule(static)
        for (int b = 0; b < nblocks; b++) {
            if (failed) continue;
            block_gemm(wb + (int64_t)b * K * BLOCK, K, x, M, out);
            for (int m = 0; m < M; m++)
                for (int r = 0; r < BLOCK && b * BLOCK + r < N; r++) y[(int64_t)m * N + b * BLOCK + r] = out[m * BLOCK + r];
        }
        free(out);
    }
    return failed ? -1 : 0;
}
