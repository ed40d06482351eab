/* Deformable slice sampling on the CPU: one pass per direction, nothing sorted.
 *
 * Layout (see medclust/models/native/slice_sampling.py): value table (B*S*H, C) with row
 * (b*S + slice)*H + head; sampling positions and attention weights (B, S, H, P), query
 * (b, s, h) being table row m = (b*S + s)*H + h; the slice index of each volume as built by
 * medclust.models.slice_geometry.build_slice_index (real slices' z ascending, then +inf).
 *
 * Forward, per query m and point p: clamp the position to the real slices, find the two
 * neighbouring real slices (count_at_or_before), the weight w of the upper one, and
 * add attn * ((1 - w) * T[lo] + w * T[hi]) to out[m]. The same numbers as the PyTorch path
 * (interpolation_weights + weighted_rows), including its gradient rules: torch.maximum /
 * torch.minimum pass half the gradient at a tie, and a NaN position gives a NaN weight.
 *
 * Backward: the table's gradient is a scatter-add; with several threads each thread adds into
 * its own zeroed copy (the caller sums them): no atomics, and the same result for a given
 * number of threads.
 */
#include <stdint.h>
#ifdef _OPENMP
#include <omp.h>
#endif

/* number of sorted[0:n] values <= q (0 for NaN q), q within [sorted[0], sorted[n - 1]].
 * Starts at the slice an even spacing would put there (z0 + k * step) and walks: ordinary CT
 * needs no step or one, where a binary search mispredicts a branch per halving (profiled at
 * S = 2048, the forward took 6.6 ms with it, 2.2-2.4 ms with the walk);
 * a volume whose slices are far from even falls back to the binary search after a few steps. */
static int64_t count_at_or_before(const float *sorted, int64_t n, float q, float z0, float step) {
  if (n > 0 && q == q && step > 0.0f) {
    const float guess = (q - z0) / step;
    int64_t k = guess < 0.0f ? 0 : (guess > (float)(n - 1) ? n - 1 : (int64_t)guess);
    for (int walk = 0; walk < 4; ++walk) {
      if (sorted[k] > q) {
        if (k == 0) break; /* below every slice: not after the clamp, but never read sorted[-1] */
        --k;
      } else if (k + 1 < n && sorted[k + 1] <= q) {
        ++k;
      } else {
        return k + 1;
      }
    }
  }
  int64_t lo = 0, hi = n;
  while (lo < hi) {
    const int64_t mid = lo + (hi - lo) / 2;
    if (sorted[mid] <= q) lo = mid + 1; else hi = mid;
  }
  return lo;
}

/* Returns the number of samples whose rows fell outside the table (0 unless the index is corrupt). */
int64_t slice_sample_forward(const float *restrict table, const float *restrict positions,
                             const float *restrict attn, const float *restrict z_sorted,
                             const int64_t *restrict order, const int64_t *restrict n_valid,
                             const float *restrict z_min, const float *restrict z_max,
                             const float *restrict step, int64_t batch,
                             int64_t slices, int64_t heads, int64_t points, int64_t channels,
                             float *restrict out, int32_t *restrict lo_row, int32_t *restrict hi_row,
                             float *restrict weight, float *restrict dweight, int threads) {
  const int64_t queries = batch * slices * heads;
  const int64_t table_rows = queries;
  int64_t bad = 0;
#pragma omp parallel for if (threads > 1) num_threads(threads) schedule(static) reduction(+ : bad)
  for (int64_t m = 0; m < queries; ++m) {
    const int64_t b = m / (slices * heads), h = m % heads;
    const float *zs = z_sorted + b * slices;
    const int64_t *ord = order + b * slices;
    const int64_t nv = n_valid[b], n_last = nv > 0 ? nv - 1 : 0;
    const float lo_z = z_min[b], hi_z = z_max[b];
    float *restrict o = out + m * channels;
    for (int64_t c = 0; c < channels; ++c) o[c] = 0.0f;
    for (int64_t p = 0; p < points; ++p) {
      const int64_t i = m * points + p;
      const float x = positions[i];
      /* torch.maximum then torch.minimum (NaN propagates), with their tie rule for the gradient */
      const float q1 = (x != x) ? x : (x > lo_z ? x : lo_z);
      const float g1 = (x > lo_z || x != x) ? 1.0f : (x == lo_z ? 0.5f : 0.0f);
      const float q = (q1 != q1) ? q1 : (q1 < hi_z ? q1 : hi_z);
      const float g2 = (q1 < hi_z || q1 != q1) ? 1.0f : (q1 == hi_z ? 0.5f : 0.0f);
      const int64_t count = count_at_or_before(zs, nv, q, lo_z, step[b]);
      int64_t lo_s = count - 1 < 0 ? 0 : count - 1;
      if (lo_s > n_last) lo_s = n_last;
      const int64_t hi_s = count < n_last ? count : n_last;
      const float z_lo = nv > 0 ? zs[lo_s] : 0.0f;
      const float denom = (nv > 0 ? zs[hi_s] : 0.0f) - z_lo;
      const int ok = denom > 0.0f;
      const float w = ok ? (q - z_lo) / denom : q - q;
      const int64_t r_lo = ((b * slices + ord[lo_s]) * heads + h), r_hi = ((b * slices + ord[hi_s]) * heads + h);
      if (r_lo < 0 || r_lo >= table_rows || r_hi < 0 || r_hi >= table_rows) { ++bad; continue; }
      lo_row[i] = (int32_t)r_lo;
      hi_row[i] = (int32_t)r_hi;
      weight[i] = w;
      dweight[i] = ok ? g1 * g2 / denom : 0.0f;
      const float a_lo = attn[i] * (1.0f - w), a_hi = attn[i] * w;
      const float *restrict t_lo = table + r_lo * channels, *restrict t_hi = table + r_hi * channels;
#pragma omp simd
      for (int64_t c = 0; c < channels; ++c) o[c] += a_lo * t_lo[c] + a_hi * t_hi[c];
    }
  }
  return bad;
}

/* g_table: threads zeroed (table_rows, C) copies, or NULL; g_positions, g_attn: (M, P) or NULL. */
void slice_sample_backward(const float *restrict table, const int32_t *restrict lo_row,
                           const int32_t *restrict hi_row, const float *restrict weight,
                           const float *restrict dweight, const float *restrict attn,
                           const float *restrict grad, int64_t queries, int64_t points,
                           int64_t channels, float *restrict g_table, float *restrict g_positions,
                           float *restrict g_attn, int threads) {
#pragma omp parallel if (threads > 1) num_threads(threads)
  {
    int64_t t = 0, nt = 1;
#ifdef _OPENMP
    t = omp_get_thread_num();
    nt = omp_get_num_threads();
#endif
    const int64_t first = queries * t / nt, last = queries * (t + 1) / nt;
    float *restrict gt = g_table ? g_table + t * queries * channels : 0;
    for (int64_t m = first; m < last; ++m) {
      const float *restrict g = grad + m * channels;
      for (int64_t p = 0; p < points; ++p) {
        const int64_t i = m * points + p;
        const float w = weight[i], a = attn[i];
        const float *restrict t_lo = table + (int64_t)lo_row[i] * channels;
        const float *restrict t_hi = table + (int64_t)hi_row[i] * channels;
        if (g_positions || g_attn) {
          float dot_lo = 0.0f, dot_hi = 0.0f;
#pragma omp simd reduction(+ : dot_lo, dot_hi)
          for (int64_t c = 0; c < channels; ++c) {
            dot_lo += t_lo[c] * g[c];
            dot_hi += t_hi[c] * g[c];
          }
          if (g_attn) g_attn[i] = (1.0f - w) * dot_lo + w * dot_hi;
          if (g_positions) g_positions[i] = a * (dot_hi - dot_lo) * dweight[i];
        }
        if (gt) {
          const float a_lo = a * (1.0f - w), a_hi = a * w;
          /* not restrict: both neighbours are one row at the ends of a volume */
          float *row_lo = gt + (int64_t)lo_row[i] * channels;
          float *row_hi = gt + (int64_t)hi_row[i] * channels;
#pragma omp simd
          for (int64_t c = 0; c < channels; ++c) row_lo[c] += a_lo * g[c];
#pragma omp simd
          for (int64_t c = 0; c < channels; ++c) row_hi[c] += a_hi * g[c];
        }
      }
    }
  }
}
