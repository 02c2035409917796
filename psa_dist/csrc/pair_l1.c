/* Mean L1 distances between every pixel and its neighbours at fixed flat offsets, and their
 * gradient: the costly parts of the random walk's transition matrix (psa_dist/random_walk.py,
 * transition_weights) and of AffinityNet's loss (psa_dist/affinity.py, pair_distances).
 *
 * x: (D, L) float32, one padded flat buffer per channel (the layout of random_walk._flat_padded).
 * out: (K, n) float32, out[k][p] = sum_d |x[d][start + p] - x[d][start + p + q[k]]| / D,
 * for p in [p0, p1). Callers split [0, n) between threads (ctypes releases the GIL).
 *
 * Why C: torch computes each offset as three passes over a D×n temporary (subtract, abs, mean),
 * 34 times; here each channel's row segment is read once per block while it sits in L1, and the
 * K partial sums of a block stay in L2. The inner loop is contiguous and vectorises (-O3).
 */
#include <math.h>
#include <string.h>

#define BLOCK 128

void pair_mean_l1(const float *x, long L, long D, long start, long n, const long *q, long K,
                  float *out, long p0, long p1)
{
    float inv = 1.0f / (float)D;
    for (long b0 = p0; b0 < p1; b0 += BLOCK) {
        long m = (p1 - b0 < BLOCK) ? p1 - b0 : BLOCK;
        for (long k = 0; k < K; k++)
            memset(out + k * n + b0, 0, (size_t)m * sizeof(float));
        for (long d = 0; d < D; d++) {
            const float *base = x + d * L + start + b0;
            for (long k = 0; k < K; k++) {
                const float *other = base + q[k];
                float *acc = out + k * n + b0;
                for (long j = 0; j < m; j++)
                    acc[j] += fabsf(base[j] - other[j]);
            }
        }
        for (long k = 0; k < K; k++) {
            float *acc = out + k * n + b0;
            for (long j = 0; j < m; j++)
                acc[j] *= inv;
        }
    }
}

/* The backward of pair_mean_l1 for channels [0, D) of one image (callers split channels between
 * threads: no two calls write the same element).
 *
 * g: (K, n), the incoming gradient already divided by the channel count of the whole feature map
 * and zero where the partner lies outside the image. d out[k][p] / d x[d][p] = sign(x[d][p] -
 * x[d][p + q[k]]) = -d out[k][p] / d x[d][p + q[k]], with sign(0) = 0 (as autograd's abs).
 * NaNs behave as in torch (sign(NaN) = 0; a NaN gradient passes on).
 * The two kinds of terms go to two arrays, ga (D, n) at p and gb (D, L) at p + q[k], so that the
 * inner loop has no overlapping writes and vectorises; the caller adds them.
 */
void pair_mean_l1_backward(const float *x, long L, long D, long start, long n, const long *q,
                           long K, const float *g, float *ga, float *gb)
{
    for (long d = 0; d < D; d++) {
        const float *base = x + d * L + start;
        float *restrict a = ga + d * n;
        for (long k = 0; k < K; k++) {
            const float *restrict other = base + q[k];
            const float *restrict gk = g + k * n;
            float *restrict bk = gb + d * L + start + q[k];
            for (long j = 0; j < n; j++) {
                float v = base[j] - other[j];
                /* sign(v) * g, as torch computes it: sign(NaN) = 0, and a NaN g passes on */
                float s = (v > 0.0f ? 1.0f : (v < 0.0f ? -1.0f : 0.0f)) * gk[j];
                a[j] += s;
                bk[j] -= s;
            }
        }
    }
}

/* One step of the random walk's Chebyshev recurrence (psa_dist/random_walk.py, _chebyshev_walk):
 * dst = 2 T src - dst on the grid, for B images of C maps each, pixels [p0, p1).
 *
 * src, dst: (B, C, L) padded flat buffers (the layout of random_walk._flat_padded) with the grid
 * at [start, start + n); w2: (B, K, n), twice the transition weights of each link. The neighbour
 * of grid pixel p at link k is src[start + p + q[k]]. torch does this as K multiply-adds over the
 * whole buffer (K passes over dst); here a block of dst stays in L1 while the K terms are added,
 * in the same order (k = 0, 1, ...), so the result does not depend on how pixels are split.
 */
void walk_step(const float *src, float *dst, const float *w2, long B, long C, long L, long start,
               long n, const long *q, long K, long p0, long p1)
{
    float acc[BLOCK];
    for (long b = 0; b < B; b++) {
        const float *wb = w2 + b * K * n;
        for (long b0 = p0; b0 < p1; b0 += BLOCK) {
            long m = (p1 - b0 < BLOCK) ? p1 - b0 : BLOCK;
            for (long c = 0; c < C; c++) {
                const float *s = src + (b * C + c) * L + start + b0;
                float *o = dst + (b * C + c) * L + start + b0;
                for (long j = 0; j < m; j++)
                    acc[j] = -o[j];
                for (long k = 0; k < K; k++) {
                    const float *restrict wk = wb + k * n + b0;
                    const float *restrict sk = s + q[k];
                    for (long j = 0; j < m; j++)
                        acc[j] += wk[j] * sk[j];
                }
                for (long j = 0; j < m; j++)
                    o[j] = acc[j];
            }
        }
    }
}
