/* The search kernel's per-strip reductions in one pass pair (raymem/search/native.py compiles and loads this;
 * raymem/search/kernel.py holds the same steps as torch operations and the proof they rest on).
 *
 * A strip is r x w screen values (int32 counts of an int8 screen, or float32) of r A rows against w B rows.
 * Pass 1, per row: the maxima of its chunks of `chunk` columns (kept in chunk_max) and the running maximum of
 * every column (col_max, carried across the strips of a tile). The row's threshold is the larger of its floor
 * and reach(low(k-th largest chunk maximum)); each column's is the larger of its floor and
 * reach(low(col_max)), computed once per strip. Pass 2 emits every entry that reaches its row's or its
 * column's threshold. Every threshold is a lower bound of the kernel's (kernel.ScreenBound), so the caller
 * keeps all it needs. The functions return the number of entries that qualify; only the first `capacity` are
 * written, and calling again with more room gives the same result (maxima are idempotent).
 */
#include <limits.h>
#include <math.h>
#include <stdint.h>

#define MAX_K 64

typedef struct {
    double scale, inner, output, slack;
} bound_t;

/* kernel.ScreenBound.reach(kernel.ScreenBound.low(value)), before rounding to the strip's type. */
static double reach_of_low(double value, const bound_t *bound) {
    double x = value * bound->scale;
    double low = (x >= 0 ? x / (1 + bound->output) : x / (1 - bound->output)) - bound->inner;
    double z = low - bound->slack - bound->inner;
    return z >= 0 ? z * (1 - bound->output) : z * (1 + bound->output);
}

static int32_t to_int32(double threshold, const bound_t *bound) {
    double counts = floor(threshold / bound->scale);
    if (counts <= (double)INT32_MIN) return INT32_MIN;
    if (counts >= (double)INT32_MAX) return INT32_MAX;
    return (int32_t)counts;
}

static float to_float(double threshold, const bound_t *bound) {
    (void)bound;
    return (float)threshold;
}

#define DEFINE_REDUCE(NAME, T, LOWEST, CONVERT)                                                                  \
    long NAME(const T *strip, long rows, long width, long chunk, long k, const T *row_floor, T *row_threshold,    \
              T *chunk_max, T *col_max, const T *col_floor, T *col_threshold, double scale, double inner,         \
              double output, double slack, long capacity, int64_t *out_rows, int64_t *out_cols, T *out_values) {  \
        const bound_t bound = {scale, inner, output, slack};                                                      \
        const long n_chunks = width / chunk;                                                                      \
        T top[MAX_K];                                                                                             \
        for (long i = 0; i < rows; i++) {                                                                         \
            const T *row = strip + i * width;                                                                     \
            for (long c = 0; c < n_chunks; c++) {                                                                 \
                const T *values = row + c * chunk;                                                                \
                T *maxima = col_max + c * chunk;                                                                  \
                T best = LOWEST;                                                                                  \
                for (long t = 0; t < chunk; t++) {                                                                \
                    const T v = values[t];                                                                        \
                    best = v > best ? v : best;                                                                   \
                    maxima[t] = v > maxima[t] ? v : maxima[t];                                                    \
                }                                                                                                 \
                chunk_max[i * n_chunks + c] = best;                                                               \
            }                                                                                                     \
            for (long j = n_chunks * chunk; j < width; j++) col_max[j] = row[j] > col_max[j] ? row[j] : col_max[j]; \
            T threshold = row_floor[i];                                                                           \
            if (n_chunks >= k) {                                                                                  \
                for (long t = 0; t < k; t++) top[t] = LOWEST;                                                     \
                for (long c = 0; c < n_chunks; c++) {                                                             \
                    const T v = chunk_max[i * n_chunks + c];                                                      \
                    if (v > top[k - 1]) {                                                                         \
                        long t = k - 1;                                                                           \
                        for (; t > 0 && top[t - 1] < v; t--) top[t] = top[t - 1];                                 \
                        top[t] = v;                                                                               \
                    }                                                                                             \
                }                                                                                                 \
                const T kth = CONVERT(reach_of_low((double)top[k - 1], &bound), &bound);                          \
                threshold = kth > threshold ? kth : threshold;                                                    \
            }                                                                                                     \
            row_threshold[i] = threshold;                                                                         \
        }                                                                                                         \
        for (long j = 0; j < width; j++) {                                                                        \
            const T reach = CONVERT(reach_of_low((double)col_max[j], &bound), &bound);                            \
            col_threshold[j] = reach > col_floor[j] ? reach : col_floor[j];                                       \
        }                                                                                                         \
        long n = 0;                                                                                               \
        for (long i = 0; i < rows; i++) {                                                                         \
            const T *row = strip + i * width;                                                                     \
            const T threshold = row_threshold[i];                                                                 \
            for (long start = 0; start < width; start += 16) {                                                    \
                const long end = start + 16 < width ? start + 16 : width;                                         \
                int any = 0;                                                                                      \
                for (long j = start; j < end; j++) any |= (row[j] >= threshold) | (row[j] >= col_threshold[j]);  \
                if (!any) continue;                                                                               \
                for (long j = start; j < end; j++) {                                                              \
                    if (row[j] >= threshold || row[j] >= col_threshold[j]) {                                      \
                        if (n < capacity) {                                                                       \
                            out_rows[n] = i;                                                                      \
                            out_cols[n] = j;                                                                      \
                            out_values[n] = row[j];                                                               \
                        }                                                                                         \
                        n++;                                                                                      \
                    }                                                                                             \
                }                                                                                                 \
            }                                                                                                     \
        }                                                                                                         \
        return n;                                                                                                 \
    }

DEFINE_REDUCE(reduce_strip_int32, int32_t, INT32_MIN, to_int32)
DEFINE_REDUCE(reduce_strip_float32, float, -INFINITY, to_float)
