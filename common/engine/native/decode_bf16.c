/* bf16 decode kernels for AVX-512 BF16 CPUs (built on first use by common/engine/native.py).
 *
 * linear:    y[M, N] = x[M, K] . W[N, K]^T (+ bias), weights widened to fp32 in registers and
 *            FMA-accumulated in fp32 (faster than vdpbf16ps here), for decode row counts
 *            (M <= 64). W is pre-packed (pack_linear layout, see native.py) so that one panel
 *            of 64 output columns streams contiguously; rows are register-blocked (up to 6
 *            rows x 4 column blocks of 16 accumulators) and K is cut into chunks that stay in
 *            L1 while every row tile reuses them (the next chunk is prefetched).
 * attention: one query token per sequence against its cached keys/values, GQA heads of one KV
 *            head together, ragged lengths, float32 scores/softmax/accumulation.
 * rms_norm:  transformers' order: normalise in float32, round to bf16, then times the weight.
 * layer:     a whole llama decoder layer from the kernels above, one call (native_layer.py).
 *
 * Work is split over a small persistent thread pool (nthreads > 1): workers spin briefly
 * between calls (a decode step issues them back to back), then sleep on a futex.
 */
#include <immintrin.h>
#include <linux/futex.h>
#include <math.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

#define NB 4              /* 16-column blocks per panel */
#define PANEL (16 * NB)   /* output columns per panel */
#define KC 64             /* k pairs per L1 chunk: 64 pairs x 64 columns x 4 bytes = 16 KiB */
#define MR 6              /* rows per register tile */
#define MAX_ROWS 64
#define MAX_THREADS 8
#ifndef PFHINT
#define PFHINT _MM_HINT_T0
#endif

typedef uint16_t bf16;

/* ---- thread pool --------------------------------------------------------------------- */
typedef void (*task_fn)(void *arg, int part, int parts);

static struct {
    pthread_t threads[MAX_THREADS];
    int started;
    uint32_t job;             /* caller-side job counter */
    _Atomic uint64_t work;    /* (job << 32) | next unclaimed chunk */
    _Atomic int done;         /* chunks of the current job finished */
    _Atomic int wake;         /* futex word, bumped once per job */
    _Atomic int sleeping;     /* workers blocked in futex wait */
    task_fn fn;               /* written before the job is published in ``work`` */
    void *arg;
    int chunks;
} pool;

static long futex(_Atomic int *addr, int op, int val) {
    return syscall(SYS_futex, (int *)addr, op, val, NULL, NULL, 0);
}

/* Claim and run chunks of ``job`` until none is left. A claim is a CAS on ``work``, so a
 * thread that read a finished job's fields fails its CAS and never runs them; the caller
 * waits only for claimed chunks, so a descheduled worker never holds up a step. */
static void run_chunks(uint32_t job) {
    for (;;) {
        uint64_t w = atomic_load_explicit(&pool.work, memory_order_acquire);
        if ((uint32_t)(w >> 32) != job) return;
        task_fn fn = pool.fn;
        void *arg = pool.arg;
        int chunks = pool.chunks;
        uint32_t c = (uint32_t)w;
        if ((int)c >= chunks) return;
        if (!atomic_compare_exchange_weak_explicit(&pool.work, &w, w + 1, memory_order_acq_rel,
                                                   memory_order_acquire))
            continue;
        fn(arg, (int)c, chunks);
        atomic_fetch_add_explicit(&pool.done, 1, memory_order_release);
    }
}

static void *worker_main(void *unused) {
    (void)unused;
    int seen = atomic_load(&pool.wake);
    for (;;) {
        int now, spins = 0;
        while ((now = atomic_load_explicit(&pool.wake, memory_order_acquire)) == seen) {
            if (++spins < 4000) {
                _mm_pause();
            } else {
                atomic_fetch_add(&pool.sleeping, 1);
                futex(&pool.wake, FUTEX_WAIT_PRIVATE, seen);
                atomic_fetch_sub(&pool.sleeping, 1);
                spins = 0;
            }
        }
        seen = now;
        run_chunks((uint32_t)(atomic_load_explicit(&pool.work, memory_order_acquire) >> 32));
    }
    return NULL;
}

static void ensure_pool(int workers) {
    static pid_t owner;
    if (owner != getpid()) { /* a forked child inherits the counters but not the threads */
        owner = getpid();
        pool.started = 0;
        pool.job = 0;
        atomic_store(&pool.work, 0);
        atomic_store(&pool.done, 0);
        atomic_store(&pool.sleeping, 0);
    }
    while (pool.started < workers && pool.started < MAX_THREADS - 1) {
        if (pthread_create(&pool.threads[pool.started], NULL, worker_main, NULL) != 0) break;
        pthread_detach(pool.threads[pool.started]);
        pool.started++;
    }
}

/* Run fn(arg, chunk, chunks) for chunk = 0..chunks-1 on the calling thread and up to
 * threads - 1 pool workers, whichever claims a chunk first. */
static void run_parallel(task_fn fn, void *arg, int chunks, int threads) {
    if (threads > MAX_THREADS) threads = MAX_THREADS;
    if (threads > 1 && chunks > 1) ensure_pool(threads - 1);
    if (threads <= 1 || chunks <= 1 || pool.started == 0) {
        for (int c = 0; c < chunks; c++) fn(arg, c, chunks);
        return;
    }
    pool.fn = fn;
    pool.arg = arg;
    pool.chunks = chunks;
    atomic_store_explicit(&pool.done, 0, memory_order_relaxed);
    uint32_t job = ++pool.job;
    atomic_store_explicit(&pool.work, (uint64_t)job << 32, memory_order_release);
    atomic_fetch_add_explicit(&pool.wake, 1, memory_order_release);
    if (atomic_load(&pool.sleeping) > 0) futex(&pool.wake, FUTEX_WAKE_PRIVATE, MAX_THREADS);
    run_chunks(job);
    int spins = 0;
    while (atomic_load_explicit(&pool.done, memory_order_acquire) < chunks) {
        if (++spins < 20000) _mm_pause();
        else sched_yield();
    }
}

static int chunk_count(int items, int threads) {
    int chunks = threads <= 1 ? 1 : 4 * threads;
    return chunks < items ? chunks : items;
}

/* ---- linear -------------------------------------------------------------------------- */
typedef struct {
    const bf16 *x;
    int64_t ldx;
    int m, k, n;
    const bf16 *w;
    const bf16 *bias;
    const bf16 *residual; /* optional [M, N] with row stride ldy: y = bf16(bf16(xW + b) + res) */
    void *y;
    int64_t ldy;
    int y_fp32;
} linear_args;

static inline __m512 bias_block(const linear_args *a, int col, __mmask16 mask) {
    if (!a->bias) return _mm512_setzero_ps();
    __m256i b = _mm256_maskz_loadu_epi16(mask, a->bias + col);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(b), 16));
}

static inline __attribute__((always_inline)) void
tile(const linear_args *a, int mr, int row0, int panel, int kp0, int kp1, float *acc_buf) {
    const int kpairs = (a->k + 1) / 2;
    const int first = kp0 == 0, last = kp1 == kpairs;
    /* This tile's x rows for this K chunk in float32 (zero past K), broadcast from memory. */
    float xf[MR][2 * KC] __attribute__((aligned(64)));
    const int k0 = 2 * kp0, width = 2 * (kp1 - kp0);
    for (int r = 0; r < mr; r++) {
        const bf16 *xr = a->x + (int64_t)(row0 + r) * a->ldx;
        for (int c = 0; c < width; c += 16) {
            int left = a->k - (k0 + c);
            left = left < 0 ? 0 : left;
            __mmask16 mask = left >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << left) - 1);
            __m256i h = _mm256_maskz_loadu_epi16(mask, xr + k0 + c);
            _mm512_store_ps(xf[r] + c,
                            _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16)));
        }
    }
    __m512 acc[MR][NB];
#pragma GCC unroll 6
    for (int r = 0; r < MR; r++)
#pragma GCC unroll 4
        for (int b = 0; b < NB; b++)
            if (r < mr)
                acc[r][b] = first ? _mm512_setzero_ps()
                                  : _mm512_loadu_ps(acc_buf + (row0 + r) * PANEL + b * 16);
    const bf16 *wp = a->w + ((int64_t)panel * kpairs + kp0) * PANEL * 2;
    const __m512i high = _mm512_set1_epi32((int)0xFFFF0000u);
    /* Each 32-bit word of the packed panel holds (W[n, 2kp], W[n, 2kp + 1]) as bf16: the
     * even element in float32 is the word shifted left by 16, the odd one its high half. */
    const int pf = row0 == 0; /* the first row tile pulls the next K chunk towards L1 */
    for (int i = 0; i < kp1 - kp0; i++, wp += PANEL * 2) {
        if (pf) {
#pragma GCC unroll 4
            for (int b = 0; b < NB; b++) _mm_prefetch((const char *)(wp + KC * PANEL * 2 + 32 * b), PFHINT);
        }
        __m512 we[NB], wo[NB];
#pragma GCC unroll 4
        for (int b = 0; b < NB; b++) {
            __m512i wv = _mm512_loadu_si512(wp + 32 * b);
            we[b] = _mm512_castsi512_ps(_mm512_slli_epi32(wv, 16));
            wo[b] = _mm512_castsi512_ps(_mm512_and_si512(wv, high));
        }
#pragma GCC unroll 6
        for (int r = 0; r < MR; r++) {
            if (r < mr) {
                __m512 x0 = _mm512_set1_ps(xf[r][2 * i]), x1 = _mm512_set1_ps(xf[r][2 * i + 1]);
#pragma GCC unroll 4
                for (int b = 0; b < NB; b++)
                    acc[r][b] = _mm512_fmadd_ps(x1, wo[b], _mm512_fmadd_ps(x0, we[b], acc[r][b]));
            }
        }
    }
    if (!last) {
#pragma GCC unroll 6
        for (int r = 0; r < MR; r++)
#pragma GCC unroll 4
            for (int b = 0; b < NB; b++)
                if (r < mr) _mm512_storeu_ps(acc_buf + (row0 + r) * PANEL + b * 16, acc[r][b]);
        return;
    }
#pragma GCC unroll 4
    for (int b = 0; b < NB; b++) {
        int col = panel * PANEL + b * 16;
        if (col >= a->n) break;
        int left = a->n - col;
        __mmask16 mask = left >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << left) - 1);
        __m512 bias = bias_block(a, col, mask);
#pragma GCC unroll 6
        for (int r = 0; r < MR; r++) {
            if (r < mr) {
                __m512 v = _mm512_add_ps(acc[r][b], bias);
                int64_t off = (int64_t)(row0 + r) * a->ldy + col;
                if (a->residual) { /* the layer's output rounded, then the residual add */
                    __m256i res = _mm256_maskz_loadu_epi16(mask, a->residual + off);
                    v = _mm512_add_ps(_mm512_castsi512_ps(_mm512_slli_epi32(
                        _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(v)), 16)),
                        _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(res), 16)));
                }
                if (a->y_fp32) {
                    _mm512_mask_storeu_ps((float *)a->y + off, mask, v);
                } else {
                    __m256i h = (__m256i)_mm512_cvtneps_pbh(v);
                    _mm256_mask_storeu_epi16((bf16 *)a->y + off, mask, h);
                }
            }
        }
    }
}

static void linear_panels(const linear_args *a, int p0, int p1) {
    float acc_buf[MAX_ROWS * PANEL] __attribute__((aligned(64)));
    const int kpairs = (a->k + 1) / 2;
    for (int p = p0; p < p1; p++) {
        for (int kp = 0; kp < kpairs; kp += KC) {
            int kp1 = kp + KC < kpairs ? kp + KC : kpairs;
            int row = 0;
            for (; row + MR <= a->m; row += MR) tile(a, MR, row, p, kp, kp1, acc_buf);
            switch (a->m - row) {
                case 1: tile(a, 1, row, p, kp, kp1, acc_buf); break;
                case 2: tile(a, 2, row, p, kp, kp1, acc_buf); break;
                case 3: tile(a, 3, row, p, kp, kp1, acc_buf); break;
                case 4: tile(a, 4, row, p, kp, kp1, acc_buf); break;
                case 5: tile(a, 5, row, p, kp, kp1, acc_buf); break;
                default: break;
            }
        }
    }
}

static void linear_task(void *arg, int part, int parts) {
    const linear_args *a = (const linear_args *)arg;
    int panels = (a->n + PANEL - 1) / PANEL;
    linear_panels(a, (int)((int64_t)panels * part / parts),
                  (int)((int64_t)panels * (part + 1) / parts));
}

/* Returns 0, or -1 for shapes this kernel does not take (caller falls back). */
int exegpt_linear_bf16(const bf16 *x, int64_t ldx, int m, int k, const bf16 *w, int n,
                       const bf16 *bias, const bf16 *residual, void *y, int64_t ldy, int y_fp32,
                       int nthreads) {
    if (m < 1 || m > MAX_ROWS || k < 1 || n < 1 || (residual && y_fp32)) return -1;
    linear_args a = {x, ldx, m, k, n, w, bias, residual, y, ldy, y_fp32};
    int panels = (n + PANEL - 1) / PANEL;
    run_parallel(linear_task, &a, chunk_count(panels, nthreads), nthreads);
    return 0;
}

int exegpt_panel_width(void) { return PANEL; }

/* ---- vector exp (Cephes-style range reduction, degree-6 polynomial, ~1 ulp) ----------- */
static inline __m512 exp512(__m512 x) {
    x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
    x = _mm512_min_ps(x, _mm512_set1_ps(88.0f));
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
    p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    return _mm512_scalef_ps(p, n);
}

static inline __m512 load_bf16x16(const bf16 *p) {
    __m256i h = _mm256_loadu_si256((const __m256i *)p);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

/* ---- decode attention ----------------------------------------------------------------- */
#define MAX_GROUP 16
#define MAX_DIM 256

typedef struct {
    const bf16 *q;        /* [B, Hq, D] with strides q_sb, q_sh (elements) */
    int64_t q_sb, q_sh;
    const bf16 *k, *v;    /* cache buffers [slots, Hkv, cap, D] with the strides below */
    int64_t c_ss, c_sh, c_sl;
    const int64_t *slots; /* per sequence */
    const int64_t *lens;  /* per sequence: positions to attend (cached + new) */
    const bf16 *k_new, *v_new; /* optional [B, Hkv, D] rows stored at position lens - 1 */
    int64_t kn_sb, vn_sb;      /* their sequence strides (head stride D) */
    bf16 *out;            /* [B, Hq, D] contiguous */
    int b, hq, hkv, d;
    float scale;
    int max_len;
} attn_args;

/* Lane sums of 16 vectors, in order: out[i] = sum of v[i]'s 16 lanes (45 shuffles/adds
 * instead of 16 horizontal reductions). */
static inline __m512 hsum16(const __m512 v[16]) {
    __m512 t[8], u[4], w[2];
    for (int i = 0; i < 8; i++) /* per 128-bit lane: [A0+A2, B0+B2, A1+A3, B1+B3] */
        t[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]),
                             _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
    for (int i = 0; i < 4; i++) { /* per 128-bit lane: four positions' segment sums */
        __m512d c = _mm512_castps_pd(t[2 * i]), d = _mm512_castps_pd(t[2 * i + 1]);
        u[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(c, d)),
                             _mm512_castpd_ps(_mm512_unpackhi_pd(c, d)));
    }
    for (int i = 0; i < 2; i++)
        w[i] = _mm512_add_ps(_mm512_shuffle_f32x4(u[2 * i], u[2 * i + 1], 0x88),
                             _mm512_shuffle_f32x4(u[2 * i], u[2 * i + 1], 0xDD));
    return _mm512_add_ps(_mm512_shuffle_f32x4(w[0], w[1], 0x88),
                         _mm512_shuffle_f32x4(w[0], w[1], 0xDD));
}

/* One (sequence, KV head): its G query heads against the sequence's cached rows. Rows are
 * widened bf16 -> fp32 two dwords at a time: a 32-bit word holds (x[2i], x[2i+1]), the even
 * element in fp32 is the word shifted left by 16 and the odd one its high half, so a 32-wide
 * slice of D becomes an "even" and an "odd" vector with two ALU ops (q is split the same way;
 * a last slice of 16 when D is an odd multiple of 16 fills half the lanes, the rest zero;
 * dot products do not care about the order, and the value accumulators are re-interleaved at
 * the end). Keys are widened once per block of 16 positions into an L1 buffer that all G
 * heads read. G and D/32 are compile-time constants (dispatched below) so q and the
 * accumulators live in registers. ``next_k``/``next_len``: the next item's keys, prefetched
 * while this item accumulates its values (this item's values are prefetched during QK). */
static inline __attribute__((always_inline)) void
attn_one(const attn_args *a, int seq, int h, float *scores, const bf16 *next_k, int next_len,
         const int g, const int c2) {
    const int d = a->d, len = (int)a->lens[seq];
    const __m512i high = _mm512_set1_epi32((int)0xFFFF0000u);
    /* dwords of chunk c: all 16, or 8 for the last one when D is an odd multiple of 16 */
#define CHUNK_MASK(c) ((c) == c2 - 1 && (d & 31) ? (__mmask16)0x00FF : (__mmask16)0xFFFF)
    __m512 qe[MAX_GROUP][MAX_DIM / 32], qo[MAX_GROUP][MAX_DIM / 32];
    for (int j = 0; j < g; j++)
        for (int c = 0; c < c2; c++) {
            __m512i w = _mm512_maskz_loadu_epi32(
                CHUNK_MASK(c), a->q + seq * a->q_sb + (h * g + j) * a->q_sh + c * 32);
            qe[j][c] = _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
            qo[j][c] = _mm512_castsi512_ps(_mm512_and_si512(w, high));
        }
    const bf16 *kb = a->k + a->slots[seq] * a->c_ss + h * a->c_sh;
    const bf16 *vb = a->v + a->slots[seq] * a->c_ss + h * a->c_sh;
    if (a->k_new) { /* this step's key and value: appended to the cache, then attended */
        memcpy((bf16 *)kb + (len - 1) * a->c_sl, a->k_new + seq * a->kn_sb + h * d, 2 * d);
        memcpy((bf16 *)vb + (len - 1) * a->c_sl, a->v_new + seq * a->vn_sb + h * d, 2 * d);
    }
    const __m512 vscale = _mm512_set1_ps(a->scale);
    float kf[16][MAX_DIM] __attribute__((aligned(64)));
    for (int l0 = 0; l0 < len; l0 += 16) { /* 16 positions, one transposed reduction */
        const int n = len - l0 < 16 ? len - l0 : 16;
        for (int i = 0; i < n; i++) {
            const bf16 *kr = kb + (l0 + i) * a->c_sl;
            const bf16 *vr = vb + (l0 + i) * a->c_sl;
            for (int off = 0; off < 2 * d; off += 64) _mm_prefetch((const char *)vr + off, _MM_HINT_T0);
            for (int c = 0; c < c2; c++) {
                __m512i w = _mm512_maskz_loadu_epi32(CHUNK_MASK(c), kr + c * 32);
                _mm512_store_ps(kf[i] + 32 * c, _mm512_castsi512_ps(_mm512_slli_epi32(w, 16)));
                _mm512_store_ps(kf[i] + 32 * c + 16, _mm512_castsi512_ps(_mm512_and_si512(w, high)));
            }
        }
        for (int j = 0; j < g; j++) {
            __m512 part[16];
#pragma GCC unroll 16
            for (int i = 0; i < 16; i++) {
                if (i < n) {
                    __m512 sum = _mm512_mul_ps(qe[j][0], _mm512_load_ps(kf[i]));
                    sum = _mm512_fmadd_ps(qo[j][0], _mm512_load_ps(kf[i] + 16), sum);
                    for (int c = 1; c < c2; c++) {
                        sum = _mm512_fmadd_ps(qe[j][c], _mm512_load_ps(kf[i] + 32 * c), sum);
                        sum = _mm512_fmadd_ps(qo[j][c], _mm512_load_ps(kf[i] + 32 * c + 16), sum);
                    }
                    part[i] = sum;
                } else {
                    part[i] = _mm512_setzero_ps();
                }
            }
            __mmask16 mask = n == 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << n) - 1);
            _mm512_mask_storeu_ps(scores + j * a->max_len + l0, mask,
                                  _mm512_mul_ps(hsum16(part), vscale));
        }
    }
    for (int j = 0; j < g; j++) {
        float *s = scores + j * a->max_len;
        __m512 vmx = _mm512_set1_ps(-INFINITY);
        int l = 0;
        for (; l + 16 <= len; l += 16) vmx = _mm512_max_ps(vmx, _mm512_loadu_ps(s + l));
        float mx = _mm512_reduce_max_ps(vmx);
        for (; l < len; l++) mx = s[l] > mx ? s[l] : mx;
        vmx = _mm512_set1_ps(mx);
        __m512 sum = _mm512_setzero_ps();
        for (l = 0; l + 16 <= len; l += 16) {
            __m512 e = exp512(_mm512_sub_ps(_mm512_loadu_ps(s + l), vmx));
            _mm512_storeu_ps(s + l, e);
            sum = _mm512_add_ps(sum, e);
        }
        if (l < len) {
            __mmask16 mask = (__mmask16)((1u << (len - l)) - 1);
            __m512 e = exp512(_mm512_sub_ps(_mm512_maskz_loadu_ps(mask, s + l), vmx));
            e = _mm512_maskz_mov_ps(mask, e);
            _mm512_mask_storeu_ps(s + l, mask, e);
            sum = _mm512_add_ps(sum, e);
        }
        __m512 inv = _mm512_set1_ps(1.0f / _mm512_reduce_add_ps(sum));
        for (l = 0; l + 16 <= len; l += 16)
            _mm512_storeu_ps(s + l, _mm512_mul_ps(_mm512_loadu_ps(s + l), inv));
        for (; l < len; l++) s[l] *= inv[0];
    }
    __m512 ae[MAX_GROUP][MAX_DIM / 32], ao[MAX_GROUP][MAX_DIM / 32];
    for (int j = 0; j < g; j++)
        for (int c = 0; c < c2; c++) ae[j][c] = ao[j][c] = _mm512_setzero_ps();
    for (int l = 0; l < len; l++) {
        const bf16 *vr = vb + l * a->c_sl;
        if (l < next_len)
            for (int off = 0; off < 2 * d; off += 64)
                _mm_prefetch((const char *)(next_k + l * a->c_sl) + off, _MM_HINT_T0);
        __m512 ve[MAX_DIM / 32], vo[MAX_DIM / 32];
        for (int c = 0; c < c2; c++) {
            __m512i w = _mm512_maskz_loadu_epi32(CHUNK_MASK(c), vr + c * 32);
            ve[c] = _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
            vo[c] = _mm512_castsi512_ps(_mm512_and_si512(w, high));
        }
        for (int j = 0; j < g; j++) {
            __m512 p = _mm512_set1_ps(scores[j * a->max_len + l]);
            for (int c = 0; c < c2; c++) {
                ae[j][c] = _mm512_fmadd_ps(p, ve[c], ae[j][c]);
                ao[j][c] = _mm512_fmadd_ps(p, vo[c], ao[j][c]);
            }
        }
    }
    const __m512i lo_idx = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
    const __m512i hi_idx = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30,
                                             15, 31);
    for (int j = 0; j < g; j++) {
        bf16 *o = a->out + ((int64_t)seq * a->hq + h * g + j) * d;
        for (int c = 0; c < c2; c++) {
            __m512 lo = _mm512_permutex2var_ps(ae[j][c], lo_idx, ao[j][c]);
            __m512 hi = _mm512_permutex2var_ps(ae[j][c], hi_idx, ao[j][c]);
            _mm256_storeu_si256((__m256i *)(o + c * 32), (__m256i)_mm512_cvtneps_pbh(lo));
            if (CHUNK_MASK(c) == 0xFFFF)
                _mm256_storeu_si256((__m256i *)(o + c * 32 + 16),
                                    (__m256i)_mm512_cvtneps_pbh(hi));
        }
    }
#undef CHUNK_MASK
}

#define ATTN_CASE(G, C) \
    if (g == G && c2 == C) { attn_one(a, seq, h, scores, next_k, next_len, G, C); return; }

static void attn_dispatch(const attn_args *a, int seq, int h, float *scores, const bf16 *next_k,
                          int next_len) {
    const int g = a->hq / a->hkv, c2 = (a->d + 31) / 32;
    ATTN_CASE(1, 2) ATTN_CASE(3, 2) ATTN_CASE(4, 2) ATTN_CASE(8, 2)
    ATTN_CASE(1, 4) ATTN_CASE(4, 4) ATTN_CASE(8, 4)
    attn_one(a, seq, h, scores, next_k, next_len, g, c2);
}

static void attn_task(void *arg, int part, int parts) {
    const attn_args *a = (const attn_args *)arg;
    float scores[MAX_GROUP * 4096];
    int items = a->b * a->hkv;
    int lo = (int)((int64_t)items * part / parts), hi = (int)((int64_t)items * (part + 1) / parts);
    for (int i = lo; i < hi; i++) {
        const bf16 *next_k = NULL;
        int next_len = 0;
        if (i + 1 < hi) {
            int s = (i + 1) / a->hkv, h = (i + 1) % a->hkv;
            next_k = a->k + a->slots[s] * a->c_ss + h * a->c_sh;
            next_len = (int)a->lens[s];
        }
        attn_dispatch(a, i / a->hkv, i % a->hkv, scores, next_k, next_len);
    }
}

/* Returns 0, or -1 for shapes this kernel does not take (caller falls back). */
int exegpt_decode_attention_bf16(const bf16 *q, int64_t q_sb, int64_t q_sh, const bf16 *k,
                                 const bf16 *v, int64_t c_ss, int64_t c_sh, int64_t c_sl,
                                 const int64_t *slots, const int64_t *lens, const bf16 *k_new,
                                 int64_t kn_sb, const bf16 *v_new, int64_t vn_sb, bf16 *out,
                                 int b, int hq, int hkv, int d, int capacity, float scale,
                                 int nthreads) {
    if (b < 1 || hkv < 1 || hq % hkv || hq / hkv > MAX_GROUP || d % 16 || d > MAX_DIM) return -1;
    int max_len = 0;
    for (int i = 0; i < b; i++) {
        if (lens[i] < 1 || lens[i] > capacity) return -1;
        max_len = lens[i] > max_len ? (int)lens[i] : max_len;
    }
    if ((int64_t)max_len * (hq / hkv) > MAX_GROUP * 4096) return -1;
    attn_args a = {q, q_sb, q_sh, k, v, c_ss, c_sh, c_sl, slots, lens, k_new, v_new, kn_sb,
                   vn_sb, out, b, hq, hkv, d, scale, max_len};
    run_parallel(attn_task, &a, chunk_count(b * hkv, nthreads), nthreads);
    return 0;
}

/* ---- RMSNorm ---------------------------------------------------------------------------- */
typedef struct {
    const bf16 *x;
    int64_t ldx;
    const bf16 *w;
    bf16 *y;
    int rows, n;
    float eps;
} norm_args;

static inline __m512 round_bf16(__m512 v, __mmask16 mask) {
    __m256i h = (__m256i)_mm512_cvtneps_pbh(v);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(
        _mm256_maskz_mov_epi16(mask, h)), 16));
}

static void norm_rows(const norm_args *a, int r0, int r1) {
    for (int r = r0; r < r1; r++) {
        const bf16 *x = a->x + r * a->ldx;
        bf16 *y = a->y + (int64_t)r * a->n;
        __m512 ss = _mm512_setzero_ps();
        for (int c = 0; c < a->n; c += 16) {
            int left = a->n - c;
            __mmask16 mask = left >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << left) - 1);
            __m512 v = _mm512_castsi512_ps(_mm512_slli_epi32(
                _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mask, x + c)), 16));
            ss = _mm512_fmadd_ps(v, v, ss);
        }
        float inv = 1.0f / sqrtf(_mm512_reduce_add_ps(ss) / (float)a->n + a->eps);
        __m512 vinv = _mm512_set1_ps(inv);
        for (int c = 0; c < a->n; c += 16) {
            int left = a->n - c;
            __mmask16 mask = left >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << left) - 1);
            __m512 v = _mm512_castsi512_ps(_mm512_slli_epi32(
                _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mask, x + c)), 16));
            __m512 w = _mm512_castsi512_ps(_mm512_slli_epi32(
                _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mask, a->w + c)), 16));
            __m512 normed = round_bf16(_mm512_mul_ps(v, vinv), mask);
            __m256i h = (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(normed, w));
            _mm256_mask_storeu_epi16(y + c, mask, h);
        }
    }
}

static void norm_task(void *arg, int part, int parts) {
    const norm_args *a = (const norm_args *)arg;
    norm_rows(a, (int)((int64_t)a->rows * part / parts),
              (int)((int64_t)a->rows * (part + 1) / parts));
}

int exegpt_rms_norm_bf16(const bf16 *x, int64_t ldx, const bf16 *w, bf16 *y, int rows, int n,
                         float eps, int nthreads) {
    if (rows < 1 || n < 1) return -1;
    norm_args a = {x, ldx, w, y, rows, n, eps};
    run_parallel(norm_task, &a, rows >= 16 ? chunk_count(rows, nthreads) : 1, nthreads);
    return 0;
}

/* ---- RoPE and SwiGLU in transformers' roundings ---------------------------------------- */
static inline __m512 bf16_to_ps(__m256i h) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

static inline __m512 rnd(__m512 v) { /* round to bf16 and back: one bf16 operation's result */
    return bf16_to_ps((__m256i)_mm512_cvtneps_pbh(v));
}

/* x [rows, heads, D] (row stride ldx, head stride D) rotated in place with the row's cos and
 * sign-folded sin tables [rows, D] (bf16): x*cos + rotate_half(x)*sin, each op rounded. */
int exegpt_rope_bf16(bf16 *x, int64_t ldx, int rows, int heads, int d, const bf16 *cos,
                     const bf16 *sin) {
    if (d % 32 || rows < 1) return -1;
    const int half = d / 2;
    for (int r = 0; r < rows; r++) {
        const bf16 *c = cos + (int64_t)r * d, *s = sin + (int64_t)r * d;
        for (int h = 0; h < heads; h++) {
            bf16 *v = x + r * ldx + (int64_t)h * d;
            for (int i = 0; i < half; i += 16) {
                __m512 x1 = load_bf16x16(v + i), x2 = load_bf16x16(v + half + i);
                __m512 lo = _mm512_add_ps(rnd(_mm512_mul_ps(x1, load_bf16x16(c + i))),
                                          rnd(_mm512_mul_ps(x2, load_bf16x16(s + i))));
                __m512 hi = _mm512_add_ps(rnd(_mm512_mul_ps(x2, load_bf16x16(c + half + i))),
                                          rnd(_mm512_mul_ps(x1, load_bf16x16(s + half + i))));
                _mm256_storeu_si256((__m256i *)(v + i), (__m256i)_mm512_cvtneps_pbh(lo));
                _mm256_storeu_si256((__m256i *)(v + half + i), (__m256i)_mm512_cvtneps_pbh(hi));
            }
        }
    }
    return 0;
}

/* y [rows, F] = silu(gate) * up from h [rows, 2F] = [gate | up]: silu rounded to bf16 first. */
int exegpt_swiglu_bf16(const bf16 *hin, int64_t ldh, bf16 *y, int rows, int f) {
    if (rows < 1 || f < 1) return -1;
    for (int r = 0; r < rows; r++) {
        const bf16 *g = hin + r * ldh, *u = g + f;
        bf16 *o = y + (int64_t)r * f;
        for (int i = 0; i < f; i += 16) {
            int left = f - i;
            __mmask16 mask = left >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << left) - 1);
            __m512 gv = bf16_to_ps(_mm256_maskz_loadu_epi16(mask, g + i));
            __m512 uv = bf16_to_ps(_mm256_maskz_loadu_epi16(mask, u + i));
            __m512 e = exp512(_mm512_sub_ps(_mm512_setzero_ps(), gv));
            __m512 act = rnd(_mm512_div_ps(gv, _mm512_add_ps(_mm512_set1_ps(1.0f), e)));
            __m256i out = (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(act, uv));
            _mm256_mask_storeu_epi16(o + i, mask, out);
        }
    }
    return 0;
}

/* ---- greedy argmax over float32 logits --------------------------------------------------- */
/* out[r] = first index of row r's maximum (NaN counts as maximal, as in torch.argmax). */
int exegpt_argmax_f32(const float *x, int64_t ldx, int rows, int n, int64_t *out) {
    if (rows < 1 || n < 1) return -1;
    const __m512i step = _mm512_set1_epi32(16);
    for (int r = 0; r < rows; r++) {
        const float *row = x + r * ldx;
        __m512 best = _mm512_set1_ps(-INFINITY);
        __m512i best_idx = _mm512_setzero_si512();
        __m512i idx = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
        __mmask16 nan = 0;
        for (int c = 0; c < n; c += 16) {
            int left = n - c;
            __mmask16 mask = left >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << left) - 1);
            __m512 v = _mm512_mask_loadu_ps(_mm512_set1_ps(-INFINITY), mask, row + c);
            __mmask16 gt = _mm512_cmp_ps_mask(v, best, _CMP_GT_OQ);
            nan |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
            best = _mm512_mask_mov_ps(best, gt, v);
            best_idx = _mm512_mask_mov_epi32(best_idx, gt, idx);
            idx = _mm512_add_epi32(idx, step);
        }
        if (nan) {
            int c = 0;
            while (row[c] == row[c]) c++;
            out[r] = c;
            continue;
        }
        float mx = _mm512_reduce_max_ps(best);
        __mmask16 at_max = _mm512_cmp_ps_mask(best, _mm512_set1_ps(mx), _CMP_EQ_OQ);
        out[r] = _mm512_mask_reduce_min_epi32(at_max, best_idx);
    }
    return 0;
}

/* ---- one whole llama decoder layer ------------------------------------------------------
 * The kernels above in the order (and with the roundings) of the Python path in
 * common/models/layers.py: RMSNorm, QKV linear, RoPE on the query and key heads, attention
 * (appending this step's K/V), output linear + residual, RMSNorm, gate/up linear, SwiGLU,
 * down linear + residual. One call per layer instead of ~10 saves the Python and ctypes
 * overhead of each (~5 us apiece, a tenth of a batch-1 step). */
typedef struct {
    const bf16 *norm1, *norm2;   /* [H] RMSNorm weights */
    const bf16 *qkv, *qkv_bias;  /* packed [(Hq + 2 Hkv) D, H]; bias or NULL */
    const bf16 *o, *o_bias;      /* packed [H, Hq D] */
    const bf16 *up, *up_bias;    /* packed [2F, H]: gate rows, then up rows */
    const bf16 *down, *down_bias; /* packed [H, F] */
} layer_weights;

typedef struct {
    int m, hidden, hq, hkv, d, ffn, capacity, nthreads;
    float eps, scale;
    const bf16 *cos, *sin;       /* [m, D] RoPE tables (sign-folded sin) */
    const int64_t *slots, *lens; /* [m] cache slot, positions attended (cached + 1) */
    int64_t c_ss, c_sh, c_sl;    /* cache strides (elements) of one layer's buffer */
    bf16 *normed, *qkv_out, *attn, *mid, *gate_up, *act; /* scratch, contiguous rows */
} layer_step;

/* Returns 0 with ``out`` [m, H] written, or -1 before anything was written to the cache
 * (shapes the kernels refuse, a length beyond the capacity): the caller falls back. */
int exegpt_llama_layer_bf16(const layer_weights *w, const layer_step *s, const bf16 *x, bf16 *out,
                            bf16 *k_cache, bf16 *v_cache) {
    const int m = s->m, h = s->hidden, d = s->d, f = s->ffn, nt = s->nthreads;
    const int nq = s->hq * d, nkv = s->hkv * d, nqkv = nq + 2 * nkv;
    if (m < 1 || m > MAX_ROWS || h < 1 || f < 1 || d % 32 || s->hkv < 1 || s->hq % s->hkv
        || s->hq / s->hkv > MAX_GROUP || d > MAX_DIM)
        return -1;
    int max_len = 0;
    for (int i = 0; i < m; i++) {
        if (s->lens[i] < 1 || s->lens[i] > s->capacity) return -1;
        max_len = s->lens[i] > max_len ? (int)s->lens[i] : max_len;
    }
    if ((int64_t)max_len * (s->hq / s->hkv) > MAX_GROUP * 4096) return -1;
    exegpt_rms_norm_bf16(x, h, w->norm1, s->normed, m, h, s->eps, nt);
    exegpt_linear_bf16(s->normed, h, m, h, w->qkv, nqkv, w->qkv_bias, NULL, s->qkv_out, nqkv, 0,
                       nt);
    exegpt_rope_bf16(s->qkv_out, nqkv, m, s->hq + s->hkv, d, s->cos, s->sin);
    if (exegpt_decode_attention_bf16(s->qkv_out, nqkv, d, k_cache, v_cache, s->c_ss, s->c_sh,
                                     s->c_sl, s->slots, s->lens, s->qkv_out + nq, nqkv,
                                     s->qkv_out + nq + nkv, nqkv, s->attn, m, s->hq, s->hkv, d,
                                     s->capacity, s->scale, nt))
        return -1; /* unreachable after the checks above; nothing was written */
    exegpt_linear_bf16(s->attn, nq, m, nq, w->o, h, w->o_bias, x, s->mid, h, 0, nt);
    exegpt_rms_norm_bf16(s->mid, h, w->norm2, s->normed, m, h, s->eps, nt);
    exegpt_linear_bf16(s->normed, h, m, h, w->up, 2 * f, w->up_bias, NULL, s->gate_up, 2 * f, 0,
                       nt);
    exegpt_swiglu_bf16(s->gate_up, 2 * f, s->act, m, f);
    exegpt_linear_bf16(s->act, f, m, f, w->down, h, w->down_bias, s->mid, out, h, 0, nt);
    return 0;
}
