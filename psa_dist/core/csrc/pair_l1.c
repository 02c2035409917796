/* Mean L1 distances between every pixel and its neighbours at fixed flat offsets, and their
 * gradient: the costly parts of the random walk's transition matrix (psa_dist/core/random_walk.py,
 * transition_weights) and of AffinityNet's loss (psa_dist/core/affinity.py, pair_distances).
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
/* The walk's block, in floats over all maps of an image: 16 KB that stay in L1 while the K terms
 * are added into them, each weight row read once per block for all maps. */
#define WALK_FLOATS 4096

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

/* Small loops of the walk, each its own function so that the compiler vectorises that loop and
 * nothing around it (inlined into one loop nest, GCC 12 vectorised across k with gathers and ran
 * 8x slower). o[j] += w[j] x[j]; o[j] = -o[j]; o[j] = a x[j] (o may be x); o[j] += a x[j]. */
static __attribute__((noinline)) void axpy(float *restrict o, const float *restrict w,
                                           const float *restrict x, long m)
{
    for (long j = 0; j < m; j++)
        o[j] += w[j] * x[j];
}

static __attribute__((noinline)) void negate(float *restrict o, long m)
{
    for (long j = 0; j < m; j++)
        o[j] = -o[j];
}

static __attribute__((noinline)) void scale_into(float *o, const float *x, float a, long m)
{
    for (long j = 0; j < m; j++)
        o[j] = a * x[j];
}

static __attribute__((noinline)) void axpy_scalar(float *restrict o, const float *restrict x,
                                                  float a, long m)
{
    for (long j = 0; j < m; j++)
        o[j] += a * x[j];
}

/* One step of the Chebyshev recurrence for the C maps of one image: dst = 2 T src - dst on the
 * grid [start, start + n) of (C, L) padded flat buffers (the layout of random_walk._flat_padded);
 * w2: (K, n), twice the weights of each link, whose neighbour is at + q[k]. A block of the maps
 * stays in L1 while the K terms are added into it, in the same order (k = 0, 1, ...) for every
 * pixel, so no result depends on the block or the batch it was computed in. */
static void chebyshev_step(const float *src, float *dst, const float *w2, long C, long L,
                           long start, long n, const long *q, long K)
{
    long block = WALK_FLOATS / (C > 0 ? C : 1);
    block = block < 64 ? 64 : block;
    for (long b0 = 0; b0 < n; b0 += block) {
        long m = (n - b0 < block) ? n - b0 : block;
        for (long c = 0; c < C; c++)
            negate(dst + c * L + start + b0, m);
        for (long k = 0; k < K; k++) {
            const float *wk = w2 + k * n + b0;
            for (long c = 0; c < C; c++)
                axpy(dst + c * L + start + b0, wk, src + c * L + start + b0 + q[k], m);
        }
    }
}

/* The truncated Chebyshev walk of random_walk._chebyshev_walk for images [b0, b1) of a batch:
 * acc = sum_j coef[j] T_j(T) y0 for j <= deg[b], by y_j+1 = 2 T y_j - y_j-1. Callers split the
 * images between threads: each image's whole walk runs in one thread, without synchronisation.
 *
 * ya: (B, C, L) holding y0 (overwritten); yb: (B, C, L) zeros; acc: (B, C, n), the result;
 * w2: (B, K, n); coef: the coefficients (zero ones are skipped); deg: (B,) each image's degree.
 */
void chebyshev_walk(float *ya, float *yb, float *acc, const float *w2, const float *coef,
                    const long *deg, long C, long L, long start, long n, const long *q,
                    long K, long b0, long b1)
{
    for (long b = b0; b < b1; b++) {
        float *prev = ya + b * C * L, *cur = yb + b * C * L, *out = acc + b * C * n;
        const float *w = w2 + b * K * n;
        for (long c = 0; c < C; c++)
            scale_into(out + c * n, prev + c * L + start, coef[0], n);
        if (deg[b] < 1)
            continue;
        chebyshev_step(prev, cur, w, C, L, start, n, q, K);     /* y1 = (2 T y0 - 0) / 2 */
        for (long c = 0; c < C; c++)
            scale_into(cur + c * L + start, cur + c * L + start, 0.5f, n);
        for (long j = 1; j <= deg[b]; j++) {
            if (j > 1) {                                        /* y_j = 2 T y_j-1 - y_j-2 */
                chebyshev_step(cur, prev, w, C, L, start, n, q, K);
                float *t = prev; prev = cur; cur = t;
            }
            if (coef[j] != 0.0f)
                for (long c = 0; c < C; c++)
                    axpy_scalar(out + c * n, cur + c * L + start, coef[j], n);
        }
    }
}
