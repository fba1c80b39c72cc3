/* How fast can this CPU compute Gemma 3 270M's tied readout at batch 1 and 8?
 *
 * Two hand-written AVX-512 kernels for logits[b][n] = sum_k x[b][k] * table[n][k]
 * (table 262,144 x 640 float32, the model's layout), timed alone, best of 9 runs:
 *   rows:   each table row read once and multiplied with every x row (a horizontal
 *           sum per row and batch row); any batch;
 *   packed: batch 8 only; the table re-laid out once as [N/32][640][32] (what a
 *           decode loop could do ahead of time), 8 x 32 logits held in 16 registers,
 *           x broadcast per k: a GEMM micro-kernel without per-call packing, with and
 *           without software prefetch 16 k-steps (2 KB) ahead.
 * Not part of the package: the numbers bound what a custom kernel could gain over
 * XLA:CPU's dot (README, "Decoding speed").
 *
 *   gcc -O3 -march=native -fopenmp experiments/gemma3_convert/readout_kernels.c -o /tmp/readout_kernels
 *   OMP_NUM_THREADS=2 /tmp/readout_kernels
 */
#include <immintrin.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#define K 640
#define N 262144L
#define NB 32

static double now(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec + t.tv_nsec * 1e-9;
}

static void rows(const float *w, const float *x, float *y, int batch) {
#pragma omp parallel for schedule(static)
  for (long n = 0; n < N; n++) {
    __m512 acc[8];
    for (int b = 0; b < batch; b++) acc[b] = _mm512_setzero_ps();
    for (int k = 0; k < K; k += 16) {
      __m512 wv = _mm512_loadu_ps(w + n * K + k);
      for (int b = 0; b < batch; b++) acc[b] = _mm512_fmadd_ps(wv, _mm512_loadu_ps(x + b * K + k), acc[b]);
    }
    for (int b = 0; b < batch; b++) y[b * N + n] = _mm512_reduce_add_ps(acc[b]);
  }
}

static void packed8(const float *p, const float *x, float *y, int prefetch) {
#pragma omp parallel for schedule(static)
  for (long t = 0; t < N / NB; t++) {
    const float *tile = p + t * K * NB;
    __m512 acc[8][2];
    for (int b = 0; b < 8; b++) acc[b][0] = acc[b][1] = _mm512_setzero_ps();
    for (int k = 0; k < K; k++) {
      if (prefetch) {  /* past a tile it touches the next one (or past the array: a prefetch never faults) */
        _mm_prefetch((const char *)(tile + (k + 16) * NB), _MM_HINT_T0);
        _mm_prefetch((const char *)(tile + (k + 16) * NB + 16), _MM_HINT_T0);
      }
      __m512 w0 = _mm512_load_ps(tile + k * NB), w1 = _mm512_load_ps(tile + k * NB + 16);
      for (int b = 0; b < 8; b++) {
        __m512 xb = _mm512_set1_ps(x[b * K + k]);
        acc[b][0] = _mm512_fmadd_ps(w0, xb, acc[b][0]);
        acc[b][1] = _mm512_fmadd_ps(w1, xb, acc[b][1]);
      }
    }
    for (int b = 0; b < 8; b++) {
      _mm512_storeu_ps(y + b * N + t * NB, acc[b][0]);
      _mm512_storeu_ps(y + b * N + t * NB + 16, acc[b][1]);
    }
  }
}

static double best_ms(void (*run)(const float *, const float *, float *, int), const float *w, const float *x,
                      float *y, int batch) {
  double best = 1e9;
  for (int r = 0; r < 9; r++) {
    double t0 = now();
    run(w, x, y, batch);
    double d = now() - t0;
    if (d < best) best = d;
  }
  return best * 1e3;
}

static void packed8_plain(const float *p, const float *x, float *y, int batch) { (void)batch; packed8(p, x, y, 0); }
static void packed8_prefetch(const float *p, const float *x, float *y, int batch) { (void)batch; packed8(p, x, y, 1); }

static int check(const float *w, const float *x, const float *y, int batch) {
  for (int b = 0; b < batch; b++)
    for (long n = 0; n < N; n += 9973) {
      double ref = 0;
      for (int k = 0; k < K; k++) ref += (double)w[n * K + k] * x[b * K + k];
      if (ref - y[b * N + n] > 1e-3 || y[b * N + n] - ref > 1e-3) return 0;
    }
  return 1;
}

int main(void) {
  float *w = aligned_alloc(64, N * K * 4), *p = aligned_alloc(64, N * K * 4);
  float *x = aligned_alloc(64, 8 * K * 4), *y = aligned_alloc(64, 8 * N * 4);
  for (long i = 0; i < N * K; i++) w[i] = (float)((i * 2654435761u) % 1000) / 1000.f - 0.5f;
  for (long n = 0; n < N; n++)
    for (int k = 0; k < K; k++) p[(n / NB) * K * NB + k * NB + n % NB] = w[n * K + k];
  for (int i = 0; i < 8 * K; i++) x[i] = (float)(i % 17) / 17.f - 0.5f;
  printf("threads %d, GFLOP/s counts 2 * batch * N * K\n", omp_get_max_threads());
  int batches[] = {1, 8};
  for (int i = 0; i < 2; i++) {
    double ms = best_ms(rows, w, x, y, batches[i]);
    printf("rows   batch %d: %6.1f ms  %5.1f GFLOP/s  %5.1f GB/s of table  %s\n", batches[i], ms,
           2.0 * batches[i] * N * K / ms / 1e6, 4.0 * N * K / ms / 1e6, check(w, x, y, batches[i]) ? "ok" : "WRONG");
  }
  for (int pf = 0; pf < 2; pf++) {
    double ms = best_ms(pf ? packed8_prefetch : packed8_plain, p, x, y, 8);
    printf("packed batch 8%s: %6.1f ms  %5.1f GFLOP/s  %5.1f GB/s of table  %s\n", pf ? ", prefetch" : "", ms,
           2.0 * 8 * N * K / ms / 1e6, 4.0 * N * K / ms / 1e6, check(w, x, y, 8) ? "ok" : "WRONG");
  }
  return 0;
}
