/* Native kernels of the embedded engine (qatctl/engines/kernels.py compiles this file for the
   running CPU on first use: cc -O3 -march=native -ffp-contract=off -fopenmp).

   Every kernel computes each output as one fixed chain of fp32 operations by one thread: a row's
   result does not depend on how many rows are computed with it, on the other rows or on the
   thread count, so the engine stays batch-invariant. Blocking (rows and columns per inner loop)
   changes only which independent chains run side by side, never the order inside a chain.

   Every worksharing loop is schedule(dynamic): threads take the next block when they are free,
   so a thread the OS descheduled (another process on the core) delays a region by one block,
   not by its whole static share. Which thread computes a block never changes its bits: each
   output is still one chain computed by one thread, and per-thread scratch is refilled per block. */

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#define omp_thread() omp_get_thread_num()
#else
#define omp_thread() 0
#endif
#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

static inline float bf16_to_f32(uint16_t v) {
    uint32_t u = (uint32_t)v << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* fp32 -> BF16, round to nearest even (torch's .to(torch.bfloat16)); NaN stays a quiet NaN. */
static inline uint16_t f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

/* ------------------------------------------------------------------ BF16-read linear (lm_head) */

/* y[m*N + n] = sum_k x[m*K + k] * w[n, k] with w packed as [ceil(N/16)][K][16] BF16 (16 output
   columns side by side). Every output is one fp32 fma chain over k = 0..K-1, in that order. */
static void bf16_rows(const float *x, const uint16_t *wp, float *y, int64_t M, int64_t N, int64_t K) {
    const int64_t NB = (N + 15) / 16;
    #pragma omp for schedule(dynamic)
    for (int64_t nb = 0; nb < NB; nb++) {
        const uint16_t *wb = wp + nb * K * 16;
        const int64_t cols = N - nb * 16 < 16 ? N - nb * 16 : 16;
        int64_t m = 0;
        for (; m + 4 <= M; m += 4) {
            float a0[16] = {0}, a1[16] = {0}, a2[16] = {0}, a3[16] = {0};
            const float *x0 = x + m * K, *x1 = x0 + K, *x2 = x1 + K, *x3 = x2 + K;
            for (int64_t k = 0; k < K; k++) {
                float wv[16];
                for (int j = 0; j < 16; j++) wv[j] = bf16_to_f32(wb[k * 16 + j]);
                for (int j = 0; j < 16; j++) {
                    a0[j] = fmaf(x0[k], wv[j], a0[j]);
                    a1[j] = fmaf(x1[k], wv[j], a1[j]);
                    a2[j] = fmaf(x2[k], wv[j], a2[j]);
                    a3[j] = fmaf(x3[k], wv[j], a3[j]);
                }
            }
            for (int64_t j = 0; j < cols; j++) {
                y[m * N + nb * 16 + j] = a0[j];
                y[(m + 1) * N + nb * 16 + j] = a1[j];
                y[(m + 2) * N + nb * 16 + j] = a2[j];
                y[(m + 3) * N + nb * 16 + j] = a3[j];
            }
        }
        for (; m < M; m++) {
            float a0[16] = {0};
            const float *x0 = x + m * K;
            for (int64_t k = 0; k < K; k++) {
                float wv[16];
                for (int j = 0; j < 16; j++) wv[j] = bf16_to_f32(wb[k * 16 + j]);
                for (int j = 0; j < 16; j++) a0[j] = fmaf(x0[k], wv[j], a0[j]);
            }
            for (int64_t j = 0; j < cols; j++) y[m * N + nb * 16 + j] = a0[j];
        }
    }
}

void qatctl_bf16_linear(const float *x, const uint16_t *wp, float *y, int64_t M, int64_t N, int64_t K,
                        int nthreads) {
    #pragma omp parallel num_threads(nthreads)
    bf16_rows(x, wp, y, M, N, K);
}

/* ------------------------------------------------------------------ W4A16 linear

   y = bf16(x) @ w.T with w = bf16(q * scale), the training view's dequantized weight
   (qatctl.quant.dequant) to the bit, rounded to BF16 at the end (what a W4A16 kernel with BF16
   activations returns). Weight packed per block of 16 output columns ([NB][K/2][16] bytes); in
   layout 0 byte j of pair p holds q[n, 2p] + 8 in its low nibble and q[n, 2p + 1] + 8 in its high
   nibble, n = 16 nb + j (layout 1: see the AVX512-BF16 path); NB is a multiple of 4 (zero columns
   pad N). Scales [NB][K/G][16] BF16.

   Each output is one chain over the pairs p = 0 .. K/2 - 1, in order:
       acc = fma(x[2p+1], w[2p+1], acc); acc = fma(x[2p], w[2p], acc)
   and y = bf16(acc). Every product of two BF16 numbers is exact in fp32. The chain is the order of
   AVX512-BF16's vdpbf16ps (odd element, then even, each a fused multiply-add), so the AVX512-BF16,
   AVX2 and plain C paths agree bit for bit (up to vdpbf16ps's flushing of BF16 denormals, ~1e-38). */

typedef struct {
    const uint16_t *x; const uint8_t *w; const uint16_t *s; float *y; int64_t M, N, K, G;
    char *scratch;  /* per thread I4_SCRATCH(K) bytes (the expanded-block path), or NULL */
    const uint16_t *wd;  /* a dense BF16 weight instead of w and s (the W16A16 linear), or NULL */
} I4Args;

/* The dense BF16 linear (W16A16) is the same linear with BF16 weights read as they are: packed
   [NB][K/2][16][2] (pair p of column 16 nb + j at [nb][p][j], even k first), NB a multiple of 4,
   each output the same chain over the pairs as above, y = bf16(acc). So the dense BF16 path of the
   engine computes what the W4A16 one does, from other weight bits, on every build. */
#define D16_PAIRS(a, nb, p) ((a)->wd + (((nb) * ((a)->K / 2) + (p)) * 32))

#if defined(__AVX512BF16__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define QATCTL_INT4_ISA "avx512bf16 (vdpbf16ps)"
static inline __m512 bf16x16(const uint16_t *p) {  /* 16 BF16 numbers -> fp32 */
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16));
}
#define I4_BIG_R 8
#define I4_BIG_CB 2
#define I4_SMALL_CB 4
#define I4_LAYOUT 1
/* Both AVX512-BF16 blocks: pair p's vdpbf16ps for R rows x CB blocks, and the stores */
#define AVX512_PAIR_DOTS(R, CB)                                                                                  \
    for (int r = 0; r < R; r++) {                                                                                \
        const __m512bh xv = (__m512bh)_mm512_set1_epi32(xp[(m0 + r) * KP + p]);                                  \
        for (int c = 0; c < CB; c++) acc[r][c] = _mm512_dpbf16_ps(acc[r][c], xv, w[c]);                          \
    }
#define AVX512_STORE(R, CB)                                                                                      \
    for (int r = 0; r < R; r++) for (int c = 0; c < CB; c++) {                                                   \
        float t[16];                                                                                             \
        _mm512_storeu_ps(t, acc[r][c]);                                                                          \
        i4_store(a, m0 + r, (nb0 + c) * 16, t);                                                                  \
    }
/* Layout 1 (this path's packing): byte i of pair p holds in its low nibble q + 8 of column i/2 and
   in its high nibble that of column 8 + i/2, at k = 2p + i%2. Looked up as floats and times the
   columns' scales (each scale in two adjacent lanes), the low and the high nibbles are the two
   halves that vdpbf16ps pairs with the broadcast (x[2p], x[2p+1]) once converted to BF16 (round
   to nearest even) by one vcvtne2ps2bf16. */
#define I4_BLOCK(R, CB)                                                                                          \
static void i4_block_##R##_##CB(const I4Args *a, int64_t m0, int64_t nb0) {                                      \
    const int64_t K = a->K, G = a->G, NG = K / G, KP = K / 2;                                                     \
    const __m512 lut = _mm512_setr_ps(-8, -7, -6, -5, -4, -3, -2, -1, 0, 1, 2, 3, 4, 5, 6, 7);                    \
    const __m512i lo8 = _mm512_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7);                         \
    const __m512i hi8 = _mm512_setr_epi32(8, 8, 9, 9, 10, 10, 11, 11, 12, 12, 13, 13, 14, 14, 15, 15);            \
    const int32_t *xp = (const int32_t *)a->x;                                                                   \
    __m512 acc[R][CB];                                                                                           \
    for (int r = 0; r < R; r++) for (int c = 0; c < CB; c++) acc[r][c] = _mm512_setzero_ps();                    \
    for (int64_t g = 0; g < NG; g++) {                                                                           \
        __m512 slo[CB], shi[CB];                                                                                 \
        for (int c = 0; c < CB; c++) {                                                                           \
            const __m512 s = bf16x16(a->s + ((nb0 + c) * NG + g) * 16);                                         \
            slo[c] = _mm512_permutexvar_ps(lo8, s);                                                              \
            shi[c] = _mm512_permutexvar_ps(hi8, s);                                                              \
        }                                                                                                        \
        for (int64_t p = g * G / 2; p < (g + 1) * G / 2; p++) {                                                  \
            __m512bh w[CB];                                                                                      \
            for (int c = 0; c < CB; c++) {                                                                       \
                const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(a->w + ((nb0 + c) * KP + p) * 16))); \
                w[c] = _mm512_cvtne2ps_pbh(_mm512_mul_ps(_mm512_permutexvar_ps(_mm512_srli_epi32(v, 4), lut), shi[c]), \
                                           _mm512_mul_ps(_mm512_permutexvar_ps(v, lut), slo[c]));                \
            }                                                                                                    \
            AVX512_PAIR_DOTS(R, CB)                                                                              \
        }                                                                                                        \
    }                                                                                                            \
    AVX512_STORE(R, CB)                                                                                          \
}
#define D16_BLOCK(R, CB)                                                                                         \
static void d16_block_##R##_##CB(const I4Args *a, int64_t m0, int64_t nb0) {                                     \
    const int64_t KP = a->K / 2;                                                                                 \
    const int32_t *xp = (const int32_t *)a->x;                                                                   \
    __m512 acc[R][CB];                                                                                           \
    for (int r = 0; r < R; r++) for (int c = 0; c < CB; c++) acc[r][c] = _mm512_setzero_ps();                    \
    for (int64_t p = 0; p < KP; p++) {                                                                           \
        __m512bh w[CB];                                                                                          \
        for (int c = 0; c < CB; c++) w[c] = (__m512bh)_mm512_loadu_si512((const void *)D16_PAIRS(a, nb0 + c, p)); \
        AVX512_PAIR_DOTS(R, CB)                                                                                  \
    }                                                                                                            \
    AVX512_STORE(R, CB)                                                                                          \
}
#elif defined(__AVX2__) && defined(__FMA__)
#define QATCTL_INT4_ISA "avx2+fma"
static inline __m256 bf16x8(const uint16_t *p) {  /* 8 BF16 numbers -> fp32 */
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p)), 16));
}
#define I4_LAYOUT 0
/* Both AVX2 blocks: pair p's chain step for R rows x CB blocks (odd, then even), and the stores */
#define AVX2_PAIR_FMAS(R, CB)                                                                                    \
    for (int r = 0; r < R; r++) {                                                                                \
        const __m256 xe = _mm256_set1_ps(bf16_to_f32(a->x[(m0 + r) * K + 2 * p]));                              \
        const __m256 xo = _mm256_set1_ps(bf16_to_f32(a->x[(m0 + r) * K + 2 * p + 1]));                           \
        for (int c = 0; c < CB; c++) for (int h = 0; h < 2; h++)                                                 \
            acc[r][c][h] = _mm256_fmadd_ps(xe, we[c][h], _mm256_fmadd_ps(xo, wo[c][h], acc[r][c][h]));           \
    }
#define AVX2_STORE(R, CB)                                                                                        \
    for (int r = 0; r < R; r++) for (int c = 0; c < CB; c++) {                                                   \
        float t[16];                                                                                             \
        _mm256_storeu_ps(t, acc[r][c][0]);                                                                       \
        _mm256_storeu_ps(t + 8, acc[r][c][1]);                                                                   \
        i4_store(a, m0 + r, (nb0 + c) * 16, t);                                                                  \
    }
#define I4_BIG_R 2
#define I4_BIG_CB 2
#define I4_SMALL_CB 4
static inline __m256 round_bf16_256(__m256 f) {  /* fp32 -> the nearest BF16 (even on ties), as fp32 */
    __m256i u = _mm256_castps_si256(f);
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    u = _mm256_add_epi32(u, _mm256_add_epi32(_mm256_set1_epi32(0x7fff), lsb));
    return _mm256_castsi256_ps(_mm256_and_si256(u, _mm256_set1_epi32((int)0xffff0000u)));
}
#define I4_BLOCK(R, CB)                                                                                          \
static void i4_block_##R##_##CB(const I4Args *a, int64_t m0, int64_t nb0) {                                      \
    const int64_t K = a->K, G = a->G, NG = K / G, KP = K / 2;                                                     \
    const __m256i m15 = _mm256_set1_epi32(15);                                                                   \
    const __m256 eight = _mm256_set1_ps(8.0f);                                                                   \
    __m256 acc[R][CB][2];                                                                                        \
    for (int r = 0; r < R; r++) for (int c = 0; c < CB; c++) acc[r][c][0] = acc[r][c][1] = _mm256_setzero_ps();  \
    for (int64_t g = 0; g < NG; g++) {                                                                           \
        __m256 s[CB][2];                                                                                         \
        for (int c = 0; c < CB; c++) for (int h = 0; h < 2; h++)                                                 \
            s[c][h] = bf16x8(a->s + ((nb0 + c) * NG + g) * 16 + 8 * h);                                         \
        for (int64_t p = g * G / 2; p < (g + 1) * G / 2; p++) {                                                  \
            __m256 we[CB][2], wo[CB][2];                                                                         \
            for (int c = 0; c < CB; c++) {                                                                       \
                const __m128i b = _mm_loadu_si128((const __m128i *)(a->w + ((nb0 + c) * KP + p) * 16));           \
                const __m256i v[2] = {_mm256_cvtepu8_epi32(b), _mm256_cvtepu8_epi32(_mm_srli_si128(b, 8))};       \
                for (int h = 0; h < 2; h++) {                                                                    \
                    const __m256 qe = _mm256_sub_ps(_mm256_cvtepi32_ps(_mm256_and_si256(v[h], m15)), eight);      \
                    const __m256 qo = _mm256_sub_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(v[h], 4)), eight);       \
                    we[c][h] = round_bf16_256(_mm256_mul_ps(qe, s[c][h]));                                       \
                    wo[c][h] = round_bf16_256(_mm256_mul_ps(qo, s[c][h]));                                       \
                }                                                                                                \
            }                                                                                                    \
            AVX2_PAIR_FMAS(R, CB)                                                                                \
        }                                                                                                        \
    }                                                                                                            \
    AVX2_STORE(R, CB)                                                                                            \
}
#define D16_BLOCK(R, CB)                                                                                         \
static void d16_block_##R##_##CB(const I4Args *a, int64_t m0, int64_t nb0) {                                     \
    const int64_t K = a->K, KP = K / 2;                                                                          \
    const __m256i hi16 = _mm256_set1_epi32((int)0xffff0000u);                                                    \
    __m256 acc[R][CB][2];                                                                                        \
    for (int r = 0; r < R; r++) for (int c = 0; c < CB; c++) acc[r][c][0] = acc[r][c][1] = _mm256_setzero_ps();  \
    for (int64_t p = 0; p < KP; p++) {                                                                           \
        __m256 we[CB][2], wo[CB][2];                                                                             \
        for (int c = 0; c < CB; c++) for (int h = 0; h < 2; h++) {                                               \
            /* 8 columns' (even, odd) pairs as 32-bit lanes: even k in the low half, odd in the high */         \
            const __m256i v = _mm256_loadu_si256((const __m256i *)(D16_PAIRS(a, nb0 + c, p) + 16 * h));          \
            we[c][h] = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));                                            \
            wo[c][h] = _mm256_castsi256_ps(_mm256_and_si256(v, hi16));                                           \
        }                                                                                                        \
        AVX2_PAIR_FMAS(R, CB)                                                                                    \
    }                                                                                                            \
    AVX2_STORE(R, CB)                                                                                            \
}
#else
#define QATCTL_INT4_ISA "portable C"
#define I4_LAYOUT 0
#define I4_BIG_R 1
#define I4_BIG_CB 1
#define I4_SMALL_CB 1
#define I4_BLOCK(R, CB)                                                                                          \
static void i4_block_##R##_##CB(const I4Args *a, int64_t m0, int64_t nb0) {                                      \
    const int64_t K = a->K, G = a->G, NG = K / G, KP = K / 2;                                                     \
    for (int r = 0; r < R; r++) for (int c = 0; c < CB; c++) {                                                   \
        float acc[16] = {0};                                                                                     \
        const uint8_t *wb = a->w + (nb0 + c) * KP * 16;                                                          \
        const uint16_t *xr = a->x + (m0 + r) * K;                                                                \
        for (int64_t g = 0; g < NG; g++) {                                                                       \
            const uint16_t *s = a->s + ((nb0 + c) * NG + g) * 16;                                                \
            for (int64_t p = g * G / 2; p < (g + 1) * G / 2; p++) {                                              \
                const float xe = bf16_to_f32(xr[2 * p]), xo = bf16_to_f32(xr[2 * p + 1]);                        \
                for (int j = 0; j < 16; j++) {                                                                   \
                    const uint8_t b = wb[p * 16 + j];                                                            \
                    const float we = bf16_to_f32(f32_to_bf16(((float)(b & 15) - 8.0f) * bf16_to_f32(s[j])));     \
                    const float wo = bf16_to_f32(f32_to_bf16(((float)(b >> 4) - 8.0f) * bf16_to_f32(s[j])));     \
                    acc[j] = fmaf(xe, we, fmaf(xo, wo, acc[j]));                                                 \
                }                                                                                                \
            }                                                                                                    \
        }                                                                                                        \
        i4_store(a, m0 + r, (nb0 + c) * 16, acc);                                                                \
    }                                                                                                            \
}
#define D16_BLOCK(R, CB)                                                                                         \
static void d16_block_##R##_##CB(const I4Args *a, int64_t m0, int64_t nb0) {                                     \
    const int64_t K = a->K, KP = K / 2;                                                                          \
    for (int r = 0; r < R; r++) for (int c = 0; c < CB; c++) {                                                   \
        float acc[16] = {0};                                                                                     \
        const uint16_t *xr = a->x + (m0 + r) * K;                                                                \
        for (int64_t p = 0; p < KP; p++) {                                                                       \
            const uint16_t *wp = D16_PAIRS(a, nb0 + c, p);                                                       \
            const float xe = bf16_to_f32(xr[2 * p]), xo = bf16_to_f32(xr[2 * p + 1]);                            \
            for (int j = 0; j < 16; j++)                                                                         \
                acc[j] = fmaf(xe, bf16_to_f32(wp[2 * j]), fmaf(xo, bf16_to_f32(wp[2 * j + 1]), acc[j]));         \
        }                                                                                                        \
        i4_store(a, m0 + r, (nb0 + c) * 16, acc);                                                                \
    }                                                                                                            \
}
#endif

static inline void i4_store(const I4Args *a, int64_t m, int64_t n0, const float *t) {
    const int64_t cols = a->N - n0 < 16 ? a->N - n0 : 16;
    for (int64_t j = 0; j < cols; j++) a->y[m * a->N + n0 + j] = bf16_to_f32(f32_to_bf16(t[j]));
}

#define I4_DEFINE(R, CB) I4_BLOCK(R, CB) D16_BLOCK(R, CB)
I4_DEFINE(I4_BIG_R, I4_BIG_CB)
#if I4_BIG_R != 1 || I4_BIG_CB != I4_SMALL_CB
I4_DEFINE(1, I4_SMALL_CB)
#endif
#if I4_BIG_CB != I4_SMALL_CB
I4_DEFINE(1, I4_BIG_CB)
#endif
#define I4_CAT(a, b, c) i4_block_##a##_##b##c
#define I4_FN(R, CB) I4_CAT(R, CB, )
#define D16_CAT(a, b, c) d16_block_##a##_##b##c
#define D16_FN(R, CB) D16_CAT(R, CB, )
#define LIN_FN(a, R, CB) ((a)->wd ? D16_FN(R, CB) : I4_FN(R, CB))

const char *qatctl_int4_isa(void) { return QATCTL_INT4_ISA; }

/* Which nibble packing this build reads: 0 as the comment above, 1 as the AVX512-BF16 path's. */
int qatctl_int4_layout(void) { return I4_LAYOUT; }

#if I4_LAYOUT == 1
/* From I4_EXPAND_MIN rows on (prefill, large decode batches), a block of 16 columns is expanded to
   its BF16 weight pairs once, into a per-thread buffer, and every row tile reads them from there:
   the expansion no longer repeats per row tile. The vectors are the ones i4_block computes, used
   in the same order: the same bits. */
#define I4_EXPAND_MIN 32
static void i4_expand(const I4Args *a, int64_t nb, __m512bh *wt) {
    const int64_t K = a->K, G = a->G, NG = K / G, KP = K / 2;
    const __m512 lut = _mm512_setr_ps(-8, -7, -6, -5, -4, -3, -2, -1, 0, 1, 2, 3, 4, 5, 6, 7);
    const __m512i lo8 = _mm512_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7);
    const __m512i hi8 = _mm512_setr_epi32(8, 8, 9, 9, 10, 10, 11, 11, 12, 12, 13, 13, 14, 14, 15, 15);
    for (int64_t g = 0; g < NG; g++) {
        const __m512 s = bf16x16(a->s + (nb * NG + g) * 16);
        const __m512 slo = _mm512_permutexvar_ps(lo8, s), shi = _mm512_permutexvar_ps(hi8, s);
        for (int64_t p = g * G / 2; p < (g + 1) * G / 2; p++) {
            const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(a->w + (nb * KP + p) * 16)));
            wt[p] = _mm512_cvtne2ps_pbh(_mm512_mul_ps(_mm512_permutexvar_ps(_mm512_srli_epi32(v, 4), lut), shi),
                                        _mm512_mul_ps(_mm512_permutexvar_ps(v, lut), slo));
        }
    }
}
#define I4_TILE(R)                                                                                               \
static void i4_tile_##R(const I4Args *a, const uint16_t *wt, int64_t m0, int64_t nb) {                           \
    const int64_t KP = a->K / 2;                                                                                 \
    const int32_t *xp = (const int32_t *)a->x + m0 * KP;                                                         \
    __m512 acc[R];                                                                                               \
    for (int r = 0; r < R; r++) acc[r] = _mm512_setzero_ps();                                                    \
    for (int64_t p = 0; p < KP; p++) {                                                                           \
        const __m512bh w = (__m512bh)_mm512_loadu_si512((const void *)(wt + 32 * p));                            \
        for (int r = 0; r < R; r++) acc[r] = _mm512_dpbf16_ps(acc[r], (__m512bh)_mm512_set1_epi32(xp[r * KP + p]), w); \
    }                                                                                                            \
    for (int r = 0; r < R; r++) {                                                                                \
        float t[16];                                                                                             \
        _mm512_storeu_ps(t, acc[r]);                                                                             \
        i4_store(a, m0 + r, nb * 16, t);                                                                         \
    }                                                                                                            \
}
I4_TILE(16)
I4_TILE(4)
I4_TILE(1)
#define I4_SCRATCH(K) ((size_t)((K) / 2) * sizeof(__m512bh))
#else
#define I4_SCRATCH(K) ((size_t)0)
#endif

/* The tiles of one W4A16 linear as worksharing loops: call inside an omp parallel region. */
static void i4_run(const I4Args *a, int64_t NB) {
    const int64_t M = a->M;
#if I4_LAYOUT == 1
    if (M >= I4_EXPAND_MIN && (a->scratch || a->wd)) {
        __m512bh *buf = a->scratch ? (__m512bh *)(a->scratch + (size_t)omp_thread() * I4_SCRATCH(a->K)) : NULL;
        #pragma omp for schedule(dynamic)
        for (int64_t nb = 0; nb < NB; nb++) {
            const uint16_t *wt = (const uint16_t *)buf;
            if (a->wd) wt = D16_PAIRS(a, nb, 0);  /* dense: the pairs are already BF16, read in place */
            else i4_expand(a, nb, buf);
            int64_t m = 0;
            for (; m + 16 <= M; m += 16) i4_tile_16(a, wt, m, nb);
            for (; m + 4 <= M; m += 4) i4_tile_4(a, wt, m, nb);
            for (; m < M; m++) i4_tile_1(a, wt, m, nb);
        }
        return;
    }
#endif
    const int64_t big = M >= I4_BIG_R ? M - M % I4_BIG_R : 0;
    if (big) {
        #pragma omp for schedule(dynamic) collapse(2)
        for (int64_t sb = 0; sb < NB / I4_BIG_CB; sb++)
            for (int64_t m = 0; m < big; m += I4_BIG_R) LIN_FN(a, I4_BIG_R, I4_BIG_CB)(a, m, sb * I4_BIG_CB);
    }
    if (big < M) {
        /* the rows left over: few, so the widest column blocks (more chains side by side) */
        const int64_t cb = big ? I4_BIG_CB : I4_SMALL_CB;
        #pragma omp for schedule(dynamic)
        for (int64_t sb = 0; sb < NB / cb; sb++)
            for (int64_t m = big; m < M; m++) {
                if (cb == I4_SMALL_CB) LIN_FN(a, 1, I4_SMALL_CB)(a, m, sb * cb);
                else LIN_FN(a, 1, I4_BIG_CB)(a, m, sb * cb);
            }
    }
}

/* x fp32 [M, K] (rounded to BF16 here), w and s packed as above with NB blocks, y fp32 [M, N].
   Returns 0, or 1 when the BF16 copy of x cannot be allocated. */
int qatctl_int4_linear(const float *x, const uint8_t *w, const uint16_t *s, float *y, int64_t M, int64_t N,
                       int64_t NB, int64_t K, int64_t G, int nthreads) {
    uint16_t *xb = malloc((size_t)(M * K) * sizeof(uint16_t));
    const size_t per_thread = I4_SCRATCH(K);
    char *scratch = per_thread ? aligned_alloc(64, (size_t)nthreads * per_thread) : NULL;
    if (!xb || (per_thread && !scratch)) {
        free(xb);
        free(scratch);
        return 1;
    }
    for (int64_t i = 0; i < M * K; i++) xb[i] = f32_to_bf16(x[i]);
    const I4Args a = {xb, w, s, y, M, N, K, G, scratch, NULL};
    #pragma omp parallel num_threads(nthreads)
    i4_run(&a, NB);
    free(xb);
    free(scratch);
    return 0;
}

/* The dense BF16 linear (W16A16): x fp32 [M, K] (rounded to BF16 here), wd packed as D16_PAIRS
   says with NB blocks, y fp32 [M, N] holding BF16 values. Returns 0, or 1 without memory. */
int qatctl_w16a16_linear(const float *x, const uint16_t *wd, float *y, int64_t M, int64_t N, int64_t NB,
                         int64_t K, int nthreads) {
    uint16_t *xb = malloc((size_t)(M * K) * sizeof(uint16_t));
    if (!xb) return 1;
    for (int64_t i = 0; i < M * K; i++) xb[i] = f32_to_bf16(x[i]);
    const I4Args a = {xb, NULL, NULL, y, M, N, K, 2, NULL, wd};
    #pragma omp parallel num_threads(nthreads)
    i4_run(&a, NB);
    free(xb);
    return 0;
}

/* ------------------------------------------------------------------ fused decode step

   One decode step of every layer of a Llama / Qwen3 decoder for M sequences (one new token each),
   in one call: no per-op dispatch. Per layer, as the engine's torch path computes it:
       h = bf16(rms_norm(x) * in_norm); qkv = W4A16(h); [q, k heads: rms_norm * q_norm / k_norm];
       RoPE (x * cos + roll(x, hd/2) * sin_signed); k, v written to the row's cache at its position;
       attention of each query head over its row's positions 0..pos (GQA), softmax in fp32;
       x += W4A16(bf16(attn)); h = bf16(rms_norm(x) * post_norm); g, u = W4A16(h);
       x += W4A16(bf16(silu(g) * u))
   Each linear is W4A16, or W16A16 where the layer gives a dense BF16 weight (wd): the engine's dense
   BF16 path, the same chains on BF16 weights read as they are.
   Every value of row m is computed from row m alone, in a fixed order, by one thread (norms and
   dot products as 16 fixed lanes summed in a fixed tree): batch- and thread-invariant. With a packed
   lm_head in the dims, the step goes on to the final norm and the logits (qatctl_bf16_linear's
   chains), so a token costs one parallel region. */

typedef struct {
    const uint8_t *w[4];  /* qkv, o, gate_up, down: packed as for qatctl_int4_linear */
    const uint16_t *s[4];
    const uint16_t *wd[4];  /* or dense BF16, packed as for qatctl_w16a16_linear (then w, s are NULL) */
    int64_t nb[4];
    const float *in_norm, *post_norm, *q_norm, *k_norm;  /* q_norm, k_norm NULL when absent */
} DecLayer;

typedef struct {
    int64_t L, H, nh, nkv, hd, I, G, len_alloc;
    float eps;
    const float *cos, *sin;  /* [positions, hd]: cos and sin_signed */
    const float *final_norm;  /* with head: the step ends with the final norm and the lm_head */
    const uint16_t *head;     /* the lm_head packed for qatctl_bf16_linear, or NULL */
    int64_t vocab;
} DecDims;

/* sum of a[i] * b[i], i < n (n a multiple of 16): 16 lanes, then a fixed tree */
static inline float dot16(const float *a, const float *b, int64_t n) {
    float acc[16] = {0};
    for (int64_t i = 0; i < n; i += 16)
        for (int j = 0; j < 16; j++) acc[j] = fmaf(a[i + j], b[i + j], acc[j]);
    for (int w = 8; w >= 1; w /= 2)
        for (int j = 0; j < w; j++) acc[j] = acc[j] + acc[j + w];
    return acc[0];
}

static inline float sumsq(const float *a, int64_t n) {
    float acc[16] = {0};
    int64_t i = 0;
    for (; i + 16 <= n; i += 16)
        for (int j = 0; j < 16; j++) acc[j] = fmaf(a[i + j], a[i + j], acc[j]);
    for (; i < n; i++) acc[0] = fmaf(a[i], a[i], acc[0]);
    for (int w = 8; w >= 1; w /= 2)
        for (int j = 0; j < w; j++) acc[j] = acc[j] + acc[j + w];
    return acc[0];
}

/* exp for the softmax and SiLU: range reduction to 2^n * exp(r), |r| <= ln2/2, Cephes' degree-6
   polynomial (about 1 ulp); branch-free so the loops vectorize, the same bits in every lane. */
static inline float exp_f(float x) {
    x = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
    const float n = floorf(fmaf(x, 1.44269504088896341f, 0.5f));
    float r = fmaf(n, -0.693359375f, x);
    r = fmaf(n, 2.12194440e-4f, r);
    float p = 1.9875691500e-4f;
    p = fmaf(p, r, 1.3981999507e-3f);
    p = fmaf(p, r, 8.3334519073e-3f);
    p = fmaf(p, r, 4.1665795894e-2f);
    p = fmaf(p, r, 1.6666665459e-1f);
    p = fmaf(p, r, 5.0000001201e-1f);
    p = fmaf(p, r * r, r) + 1.0f;
    const int32_t e = ((int32_t)n + 127) << 23;
    float scale;
    memcpy(&scale, &e, 4);
    return p * scale;
}

static inline void rms_to_bf16(const float *x, const float *w, uint16_t *out, int64_t n, float eps) {
    const float r = 1.0f / sqrtf(sumsq(x, n) / (float)n + eps);
    for (int64_t i = 0; i < n; i++) out[i] = f32_to_bf16(x[i] * r * w[i]);
}

int qatctl_decode(const DecLayer *layers, float *const *kv, const DecDims *d, float *x, float *logits,
                  const int64_t *rows, const int64_t *pos, int64_t M, int nthreads) {
    const int64_t H = d->H, nh = d->nh, nkv = d->nkv, hd = d->hd, I = d->I, half = hd / 2;
    const int64_t nqkv = (nh + 2 * nkv) * hd, widest = H > I ? (H > nh * hd ? H : nh * hd) : (I > nh * hd ? I : nh * hd);
    const int64_t group = nh / nkv;
    const float scale = 1.0f / sqrtf((float)hd);
    int64_t maxpos = 0;
    for (int64_t m = 0; m < M; m++) maxpos = pos[m] > maxpos ? pos[m] : maxpos;
    uint16_t *hb = malloc((size_t)(M * widest) * sizeof(uint16_t));
    float *qkv = malloc((size_t)(M * nqkv) * sizeof(float));
    float *gu = malloc((size_t)(M * 2 * I) * sizeof(float));
    float *out = malloc((size_t)(M * H) * sizeof(float));
    float *scores = malloc((size_t)(nthreads * (maxpos + 1 + 16)) * sizeof(float));
    const size_t per_thread = I4_SCRATCH(widest);
    char *scratch = per_thread ? aligned_alloc(64, (size_t)nthreads * per_thread) : NULL;
    int failed = !hb || !qkv || !gu || !out || !scores || (per_thread && !scratch);
    if (!failed) {
        #pragma omp parallel num_threads(nthreads)
        {
            float *sc = scores + (int64_t)omp_thread() * (maxpos + 1 + 16);
            for (int64_t l = 0; l < d->L; l++) {
                const DecLayer *ly = layers + l;
                float *Kc = kv[2 * l], *Vc = kv[2 * l + 1];
                #pragma omp for schedule(dynamic)
                for (int64_t m = 0; m < M; m++) rms_to_bf16(x + m * H, ly->in_norm, hb + m * H, H, d->eps);
                I4Args a = {hb, ly->w[0], ly->s[0], qkv, M, nqkv, H, d->G, scratch, ly->wd[0]};
                i4_run(&a, ly->nb[0]);
                /* q and k heads: norm, RoPE; k and v into the cache */
                #pragma omp for schedule(dynamic)
                for (int64_t t = 0; t < M * (nh + nkv); t++) {
                    const int64_t m = t / (nh + nkv), hh = t % (nh + nkv), p = pos[m];
                    float *v = qkv + m * nqkv + hh * hd;
                    const float *nw = hh < nh ? ly->q_norm : ly->k_norm;
                    if (nw) {
                        const float r = 1.0f / sqrtf(sumsq(v, hd) / (float)hd + d->eps);
                        for (int64_t i = 0; i < hd; i++) v[i] = v[i] * r * nw[i];
                    }
                    const float *c = d->cos + p * hd, *sn = d->sin + p * hd;
                    float rot[512];
                    for (int64_t i = 0; i < hd; i++) {
                        const float a0 = v[i] * c[i], a1 = v[(i + half) % hd] * sn[i];
                        rot[i] = a0 + a1;
                    }
                    if (hh < nh) {
                        memcpy(v, rot, (size_t)hd * sizeof(float));
                    } else {
                        const int64_t kh = hh - nh, at = ((rows[m] * nkv + kh) * d->len_alloc + p) * hd;
                        memcpy(Kc + at, rot, (size_t)hd * sizeof(float));
                        memcpy(Vc + at, qkv + m * nqkv + (nh + nkv + kh) * hd, (size_t)hd * sizeof(float));
                    }
                }
                /* attention: one query head of one row per task */
                #pragma omp for schedule(dynamic)
                for (int64_t t = 0; t < M * nh; t++) {
                    const int64_t m = t / nh, h = t % nh, n = pos[m] + 1;
                    const float *q = qkv + m * nqkv + h * hd;
                    const float *Kr = Kc + (rows[m] * nkv + h / group) * d->len_alloc * hd;
                    const float *Vr = Vc + (rows[m] * nkv + h / group) * d->len_alloc * hd;
                    float mx = -INFINITY;
                    for (int64_t j = 0; j < n; j++) {
                        sc[j] = dot16(q, Kr + j * hd, hd) * scale;
                        mx = sc[j] > mx ? sc[j] : mx;
                    }
                    float sum[16] = {0};
                    int64_t j = 0;
                    for (; j < n; j++) sc[j] = exp_f(sc[j] - mx);
                    for (j = 0; j + 16 <= n; j += 16)
                        for (int k = 0; k < 16; k++) sum[k] += sc[j + k];
                    for (; j < n; j++) sum[0] += sc[j];
                    for (int w = 8; w >= 1; w /= 2)
                        for (int k = 0; k < w; k++) sum[k] = sum[k] + sum[k + w];
                    const float inv = 1.0f / sum[0];
                    float o[512];
                    for (int64_t i = 0; i < hd; i++) o[i] = 0.0f;
                    for (j = 0; j < n; j++) {
                        const float pj = sc[j] * inv;
                        const float *vr = Vr + j * hd;
                        for (int64_t i = 0; i < hd; i++) o[i] = fmaf(pj, vr[i], o[i]);
                    }
                    for (int64_t i = 0; i < hd; i++) hb[m * nh * hd + h * hd + i] = f32_to_bf16(o[i]);
                }
                a = (I4Args){hb, ly->w[1], ly->s[1], out, M, H, nh * hd, d->G, scratch, ly->wd[1]};
                i4_run(&a, ly->nb[1]);
                #pragma omp for schedule(dynamic)
                for (int64_t m = 0; m < M; m++) {
                    for (int64_t i = 0; i < H; i++) x[m * H + i] += out[m * H + i];
                    rms_to_bf16(x + m * H, ly->post_norm, hb + m * H, H, d->eps);
                }
                a = (I4Args){hb, ly->w[2], ly->s[2], gu, M, 2 * I, H, d->G, scratch, ly->wd[2]};
                i4_run(&a, ly->nb[2]);
                #pragma omp for schedule(dynamic)
                for (int64_t m = 0; m < M; m++)
                    for (int64_t i = 0; i < I; i++) {
                        const float g = gu[m * 2 * I + i], u = gu[m * 2 * I + I + i];
                        hb[m * I + i] = f32_to_bf16(g / (1.0f + exp_f(-g)) * u);
                    }
                a = (I4Args){hb, ly->w[3], ly->s[3], out, M, H, I, d->G, scratch, ly->wd[3]};
                i4_run(&a, ly->nb[3]);
                #pragma omp for schedule(dynamic)
                for (int64_t m = 0; m < M; m++)
                    for (int64_t i = 0; i < H; i++) x[m * H + i] += out[m * H + i];
            }
            if (d->head) {  /* final norm (fp32) and the lm_head, in the same parallel region */
                #pragma omp for schedule(dynamic)
                for (int64_t m = 0; m < M; m++) {
                    const float r = 1.0f / sqrtf(sumsq(x + m * H, H) / (float)H + d->eps);
                    for (int64_t i = 0; i < H; i++) out[m * H + i] = x[m * H + i] * r * d->final_norm[i];
                }
                bf16_rows(out, d->head, logits, M, d->vocab, H);
            }
        }
    }
    free(hb); free(qkv); free(gu); free(out); free(scores); free(scratch);
    return failed;
}
