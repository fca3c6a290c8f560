/* Memory read-bandwidth probe for bench/membw.py: how fast this box streams a large array that
 * lives in DRAM (not cache), which bounds batch-1 LLM decode (every weight is read once per token).
 *
 *   gcc -O3 -march=native -fopenmp membw.c -o membw && OMP_NUM_THREADS=2 ./membw MIB REPEATS
 *
 * Each repeat sums a MIB-MiB float array with OMP_NUM_THREADS threads, 16 independent vector
 * accumulators per thread (the sum is not limited by the add latency). Prints one line of JSON:
 * {"mib": .., "threads": .., "gb_s": [one per repeat]} with GB = 1e9 bytes.
 */
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + (double)t.tv_nsec * 1e-9;
}

int main(int argc, char **argv) {
    size_t mib = argc > 1 ? (size_t)atol(argv[1]) : 1024;
    int repeats = argc > 2 ? atoi(argv[2]) : 5;
    if (mib < 64 || repeats < 1) {
        fprintf(stderr, "usage: membw MIB(>=64) REPEATS(>=1)\n");
        return 2;
    }
    size_t n = mib * (1u << 20) / sizeof(float);
    n -= n % 256;
    float *a = aligned_alloc(64, n * sizeof(float));
    if (!a) {
        fprintf(stderr, "membw: cannot allocate %zu MiB\n", mib);
        return 1;
    }
#pragma omp parallel for schedule(static)
    for (size_t i = 0; i < n; i++) a[i] = 1.0f;
    volatile float sink = 0.0f;
    printf("{\"mib\": %zu, \"threads\": %d, \"gb_s\": [", mib, omp_get_max_threads());
    for (int r = -1; r < repeats; r++) { /* r = -1: warm-up, not reported */
        double t = now();
        float total = 0.0f;
#pragma omp parallel reduction(+ : total)
        {
            float acc[16] = {0};
#pragma omp for schedule(static)
            for (size_t b = 0; b < n / 16; b++) {
                const float *p = a + b * 16;
#pragma omp simd
                for (int k = 0; k < 16; k++) acc[k] += p[k];
            }
            for (int k = 0; k < 16; k++) total += acc[k];
        }
        t = now() - t;
        sink += total;
        if (r >= 0) printf("%s%.3f", r ? ", " : "", (double)n * sizeof(float) / t / 1e9);
    }
    printf("], \"check\": %.0f}\n", (double)sink / (repeats + 1) / (double)n);
    free(a);
    return 0;
}
