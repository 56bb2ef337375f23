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
#include <string.h>
#include <omp.h>

#include "blocks.h"
#include "steps.h"

int moelab_native_version(void) { return 8; }
int moelab_native_simd_bits(void) { return MOELAB_AVX512 ? 512 : 0; }
int moelab_native_bf16_dot(void) { return MOELAB_BF16DOT; }
int moelab_native_vnni(void) { return MOELAB_VNNI; }
int moelab_native_max_threads(void) { return omp_get_max_threads(); }

/* ------------------------------------------------------------------ entry points */

/* Rows 16b.. of y [M, N] from a block's results, already in the activation dtype's values (exact). */
static void store_block(const float* out, int M, int N, int b, int bf16, void* y) {
    const int live = N - b * BLOCK < BLOCK ? N - b * BLOCK : BLOCK;
    for (int m = 0; m < M; m++) {
        const float* o = out + m * BLOCK;
        const int64_t at = (int64_t)m * N + b * BLOCK;
        if (!bf16) {
            memcpy((float*)y + at, o, sizeof(float) * (size_t)live);
            continue;
        }
#if MOELAB_AVX512
        if (live == BLOCK) {
            const __m512i u = _mm512_srli_epi32(_mm512_castps_si512(_mm512_loadu_ps(o)), 16);
            _mm256_storeu_si256((__m256i*)((uint16_t*)y + at), _mm512_cvtepi32_epi16(u));
            continue;
        }
#endif
        for (int r = 0; r < live; r++) {
            uint32_t bits;
            memcpy(&bits, o + r, 4);
            ((uint16_t*)y)[at + r] = (uint16_t)(bits >> 16);
        }
    }
}

/* y[M, N] = x[M, K] · ŵᵀ for the weight `mt`, through mat_block_rows (one kernel choice per row count for
 * the whole library); x and y in the activation dtype. Returns 0, or -1 when out of memory. */
static int matmul_rows(const moelab_mat_t* mt, const void* x, void* y, int M, int bf16, int threads) {
    const int K = mt->k, N = mt->n, nblocks = blocks_of(mt);
    rows_t xr;
    if (!rows_alloc(&xr, M, K, group_of(mt), is_quant(mt))) {
        rows_free(&xr);
        return -1;
    }
    rows_set(&xr, x, bf16);
    int failed = 0;
#pragma omp parallel num_threads(threads) reduction(|| : failed)
    {
        float* scratch = (float*)aligned_alloc(64, (size_t)K * BLOCK * 4 + 64);
        float* out = (float*)aligned_alloc(64, (size_t)M * BLOCK * 4 + 64);
        failed = !scratch || !out;
#pragma omp for schedule(static)
        for (int b = 0; b < nblocks; b++) {
            if (failed) continue;
            mat_block_rows(mt, b, &xr, bf16, scratch, out);
            store_block(out, M, N, b, bf16, y);
        }
        free(scratch);
        free(out);
    }
    rows_free(&xr);
    return failed ? -1 : 0;
}

/* y[M, N] = x[M, K] · (q * scales)ᵀ (int8, qb [N/16, K, 16]). */
int moelab_q8_matmul(const void* x, const int8_t* qb, const void* scales, void* y, int M, int N, int K, int bf16,
                     int threads) {
    const moelab_mat_t mt = {KIND_INT8, N, (N + BLOCK - 1) / BLOCK * BLOCK, K, 0, qb, scales};
    return matmul_rows(&mt, x, y, M, bf16, threads);
}

/* y[M, N] = x[M, K] · ((q - 8) * scale + zero)ᵀ over groups of `group` inputs; Np = padded N. */
int moelab_q4_matmul(const void* x, const uint8_t* qb, int group, const void* scales_zeros, void* y, int M, int N,
                     int Np, int K, int bf16, int threads) {
    const moelab_mat_t mt = {KIND_INT4, N, Np, K, group, qb, scales_zeros};
    return matmul_rows(&mt, x, y, M, bf16, threads);
}

/* y[M, N] = x[M, K] · wᵀ for bf16 x and bf16 weights in the pair layout (K % 8 == 0); y bf16. */
int moelab_bf16_matmul(const uint16_t* x, const uint32_t* wb, uint16_t* y, int M, int N, int K, int threads) {
    const moelab_mat_t mt = {KIND_BF16, N, (N + BLOCK - 1) / BLOCK * BLOCK, K, 0, wb, NULL};
    return matmul_rows(&mt, x, y, M, 1, threads);
}

/* y[M, N] = x[M, K] · wᵀ for fp32 x and fp32 weights in the 16-row layout ([N/16, K, 16]; K % 4 == 0). */
int moelab_f32_matmul(const float* x, const float* wb, float* y, int M, int N, int K, int threads) {
    const moelab_mat_t mt = {KIND_F32, N, (N + BLOCK - 1) / BLOCK * BLOCK, K, 0, wb, NULL};
    return matmul_rows(&mt, x, y, M, 0, threads);
}
