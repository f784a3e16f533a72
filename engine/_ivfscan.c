/* The engine's C kernels: the scans of the projected inverted file (engine/search.py), the
 * projection of patches to its coordinates, and the anomaly map's banded product
 * (engine/anomaly_map.py).
 *
 * exact: given queries, each with a reach (an upper bound of its k-th nearest true distance), the
 * k nearest rows among those whose coordinate distance, a lower bound of the true one, is within
 * the reach (or within the k-th best true distance found so far, which only tightens it).
 * approximate: each query's nprobe lists of nearest centroid, the `candidates` rows of those
 * nearest in coordinates, then the k nearest of these by true distance (true distances to real
 * rows: never below the exact ones). faiss's IndexIVFFlat search gives the same distances; here
 * the queries of a list go through its panels together, where faiss takes one query at a time
 * with a heap per query (the 2 704 patches of a 416 px ROI, 8 477 rows: 6.4 -> 3.8 ms on two
 * threads; 784 patches at 224 px, 59 741 rows: 4.1 -> 2.9 ms).
 *
 * Layout ("panels"): rows go by LANES into panels of (d, LANES) floats, dimension-major, so one
 * pass over the d dimensions reads LANES * d contiguous floats and gives LANES squared distances
 * with no horizontal sum. Each list starts a new panel; padding columns hold zeros with an
 * infinite squared norm (never within reach) and map to position -1. The lists' ball centres are
 * laid out the same way, padded with a huge value.
 *
 * Lists in the outer loop: a list's panels stay in L1 while every query that needs it (its ball
 * comes within the query's reach) is compared with them. Outlying patches (a defect's) need a
 * large share of the memory; scanning the memory once per query would stream it from L3 each
 * time, where this reads each list once per call. One call covers a range of lists; callers share
 * the ranges out over threads (the GIL is released) and keep the k smallest of the results.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(_MSC_VER)
#include <intrin.h>
#endif
#if defined(_WIN32)
#include <windows.h>
#else
#include <sched.h>
#endif
#if defined(__unix__) || defined(__APPLE__)
#define HELPERS 1           /* helper threads of the C extension's own (pthreads) */
#include <pthread.h>
#include <signal.h>
#include <time.h>
#else
#define HELPERS 0
#endif

#define LANES 16
#define MAX_K 64
#define GROUP 4             /* queries compared with one panel at a time */
#define AXIS_BLOCK 32       /* the projection's axes are padded to a multiple of this (4 vectors) */
#define MAX_AXES 64
#define EXT_AXES 32         /* the exact scan's second lower bound: principal axes past the coordinates' */
#define SPLIT 16            /* the probe choice's first look at a panel of centroids: these coordinates */

/* one build for every x86 CPU, each function picked at load time: the x86-64-v3 and v4 levels
   add FMA to AVX2 and AVX-512 (GCC's "avx2" and "avx512f" targets alone do not, and every
   multiply-add then takes two instructions): the scans 2-5 % faster (2-core EPYC) */
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__)) && !defined(__clang__)
#define CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "avx2", "default")))
#else
#define CLONES
#endif

#if defined(__GNUC__) || defined(__clang__)
#define VECTORS 1
#define PREFETCH(address) __builtin_prefetch(address)
/* 8 floats: one ymm register where AVX is there (two xmm below it, half a zmm above it); a panel
   row is two of them. Wider vector types make GCC split them badly under AVX2 (6x slower). */
#define VLANES 8
typedef float vec_t __attribute__((vector_size(VLANES * sizeof(float))));
typedef int32_t vec_ints_t __attribute__((vector_size(VLANES * sizeof(int32_t))));
#define INLINE static inline __attribute__((always_inline))
#else
#define VECTORS 0
#define PREFETCH(address) ((void)(address))
#define INLINE static __forceinline
#endif

/* counters shared by calls on several threads (the GIL released): a fetch-add that publishes what
   the caller wrote before it, a read that sees what was written before the add it reads */
INLINE int64_t fetch_add(int64_t *counter, int64_t value) {
#if defined(__GNUC__) || defined(__clang__)
    return __atomic_fetch_add(counter, value, __ATOMIC_ACQ_REL);
#elif defined(_MSC_VER)
    return _InterlockedExchangeAdd64((volatile long long *)counter, value);
#else
#error "no atomic fetch-add for this compiler"
#endif
}

INLINE int64_t read_shared(int64_t *counter) {
#if defined(__GNUC__) || defined(__clang__)
    return __atomic_load_n(counter, __ATOMIC_ACQUIRE);
#else
    return _InterlockedOr64((volatile long long *)counter, 0);
#endif
}

/* *counter = desired if it holds *expected (true), else *expected = what it holds (false) */
INLINE int swap_if(int64_t *counter, int64_t *expected, int64_t desired) {
#if defined(__GNUC__) || defined(__clang__)
    return __atomic_compare_exchange_n(counter, expected, desired, 0, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE);
#else
    int64_t seen = _InterlockedCompareExchange64((volatile long long *)counter, desired, *expected);
    if (seen == *expected) return 1;
    *expected = seen;
    return 0;
#endif
}

/* returns once *counter reaches value: what another thread is finishing, a chunk of work short
   enough to wait for on the core (a sleep and a wake-up cost more than it on a VM); it yields the
   core now and then in case that thread is not running */
INLINE void wait_for(int64_t *counter, int64_t value) {
    for (unsigned spins = 1; read_shared(counter) < value; spins++) {
        if (spins % 1024 == 0) {
#if defined(_WIN32)
            SwitchToThread();
#else
            sched_yield();
#endif
        }
#if (defined(__GNUC__) || defined(__clang__)) && (defined(__x86_64__) || defined(__i386__))
        __builtin_ia32_pause();
#endif
    }
}

#if VECTORS
#if defined(__clang__)
#define SHUFFLE(v, ...) __builtin_shufflevector(v, v, __VA_ARGS__)
#else
#define SHUFFLE(v, ...) __builtin_shuffle(v, (vec_ints_t){__VA_ARGS__})
#endif

INLINE vec_t load(const float *from) {
    vec_t v;
    memcpy(&v, from, sizeof(v));
    return v;
}

/* the sum of the lanes, by halving */
INLINE float vec_sum(vec_t v) {
    v += SHUFFLE(v, 4, 5, 6, 7, 0, 1, 2, 3);
    v += SHUFFLE(v, 2, 3, 0, 1, 6, 7, 4, 5);
    v += SHUFFLE(v, 1, 0, 3, 2, 5, 4, 7, 6);
    return v[0];
}

/* keep_smallest of VLANES values with ids, held in vector registers: each value above the new one
   moves up one place, chosen by masks instead of a loop whose exit mispredicts on nearly every
   insertion (the approximate scan inserts ~25-40 candidates per patch) */
INLINE void keep_smallest_lanes(vec_t *values, vec_ints_t *ids, float value, int32_t id) {
    const vec_ints_t not_first = {0, -1, -1, -1, -1, -1, -1, -1};
    vec_t old = *values, fresh = {0};
    fresh += value;
    vec_ints_t above = old > fresh;                                   /* these move up one place */
    vec_ints_t moved = SHUFFLE(above, 0, 0, 1, 2, 3, 4, 5, 6) & not_first;   /* lane j takes lane j - 1 */
    vec_ints_t placed = above & ~moved;                               /* the new value's lane */
    vec_ints_t shifted = (vec_ints_t)SHUFFLE(old, 0, 0, 1, 2, 3, 4, 5, 6);
    *values = (vec_t)(((vec_ints_t)old & ~above) | ((vec_ints_t)fresh & placed) | (shifted & moved));
    vec_ints_t fresh_ids = {0};
    fresh_ids += id;
    *ids = (*ids & ~above) | (fresh_ids & placed) | (SHUFFLE(*ids, 0, 0, 1, 2, 3, 4, 5, 6) & moved);
}

#endif

#if VECTORS
/* the LANES comparisons of two halves (all bits set where true) as bit j of one mask */
INLINE unsigned lane_bits(vec_ints_t low, vec_ints_t high) {
    const vec_ints_t bit = {1, 2, 4, 8, 16, 32, 64, 128};
    vec_ints_t both = (low & bit) | ((high & bit) << 8);
    both |= SHUFFLE(both, 4, 5, 6, 7, 0, 1, 2, 3);
    both |= SHUFFLE(both, 2, 3, 0, 1, 6, 7, 4, 5);
    both |= SHUFFLE(both, 1, 0, 3, 2, 5, 4, 7, 6);
    return (unsigned)both[0];
}
#endif

/* bit j set where values[j] < limit (strict) or <= limit, for the LANES values */
INLINE unsigned lanes_below(const float *values, float limit, int or_equal) {
#if VECTORS
    vec_t bound = {0};
    bound += limit;
    vec_t first = load(values), second = load(values + VLANES);
    if (or_equal) return lane_bits(first <= bound, second <= bound);
    return lane_bits(first < bound, second < bound);
#else
    unsigned mask = 0;
    for (int j = 0; j < LANES; j++) mask |= (unsigned)(or_equal ? values[j] <= limit : values[j] < limit) << j;
    return mask;
#endif
}

/* bit j set where values[j] <= limits[j], for the LANES values */
INLINE unsigned lanes_at_most(const float *values, const float *limits) {
#if VECTORS
    return lane_bits(load(values) <= load(limits), load(values + VLANES) <= load(limits + VLANES));
#else
    unsigned mask = 0;
    for (int j = 0; j < LANES; j++) mask |= (unsigned)(values[j] <= limits[j]) << j;
    return mask;
#endif
}

/* the lowest set bit's index, cleared from mask (mask != 0) */
INLINE int take_lane(unsigned *mask) {
#if defined(__GNUC__) || defined(__clang__)
    int j = __builtin_ctz(*mask);
#else
    int j = 0;
    while (!(*mask >> j & 1u)) j++;
#endif
    *mask &= *mask - 1;
    return j;
}

#define CHAINS 4            /* coordinates a panel's distances take at once: independent sums in flight */

/* squared distances of one query (d coordinates) to the LANES columns of a panel. One query has only
   LANES / VLANES sums: CHAINS coordinates at a time, each into sums of its own, keep enough
   multiply-adds in flight to hide their latency (one after another, each waits for the last) */
INLINE void panel_distances(const float *query, const float *panel, int d, float *out) {
#if VECTORS
    vec_t acc[CHAINS][LANES / VLANES];
    memset(acc, 0, sizeof(acc));
    int a = 0;
    for (; a + CHAINS <= d; a += CHAINS)
        for (int c = 0; c < CHAINS; c++)
            for (int h = 0; h < LANES / VLANES; h++) {
                vec_t t = query[a + c] - load(panel + (int64_t)(a + c) * LANES + h * VLANES);
                acc[c][h] += t * t;
            }
    for (; a < d; a++)
        for (int h = 0; h < LANES / VLANES; h++) {
            vec_t t = query[a] - load(panel + (int64_t)a * LANES + h * VLANES);
            acc[0][h] += t * t;
        }
    for (int c = 1; c < CHAINS; c++)
        for (int h = 0; h < LANES / VLANES; h++) acc[0][h] += acc[c][h];
    memcpy(out, acc[0], sizeof(acc[0]));
#else
    for (int j = 0; j < LANES; j++) out[j] = 0.0f;
    for (int a = 0; a < d; a++) {
        const float *column = panel + (int64_t)a * LANES;
        for (int j = 0; j < LANES; j++) {
            float t = query[a] - column[j];
            out[j] += t * t;
        }
    }
#endif
}

/* the squared distance of two rows of n floats */
INLINE float row_distance(const float *a, const float *b, int n) {
#if VECTORS
    if (n >= VLANES) {
        vec_t acc = {0}, other = {0}, t;
        int i = 0;
        for (; i + 2 * VLANES <= n; i += 2 * VLANES) {      /* two accumulators: two additions in flight */
            t = load(a + i) - load(b + i);
            acc += t * t;
            t = load(a + i + VLANES) - load(b + i + VLANES);
            other += t * t;
        }
        for (; i + VLANES <= n; i += VLANES) {
            t = load(a + i) - load(b + i);
            acc += t * t;
        }
        if (i < n) {        /* the last VLANES floats, less those already counted */
            vec_ints_t index = {0, 1, 2, 3, 4, 5, 6, 7}, seen = {0};
            seen += VLANES - (n - i);
            t = load(a + n - VLANES) - load(b + n - VLANES);
            acc += (vec_t)((vec_ints_t)(t * t) & (index >= seen));
        }
        return vec_sum(acc + other);
    }
#endif
    float s = 0.0f;
    for (int i = 0; i < n; i++) {
        float t = a[i] - b[i];
        s += t * t;
    }
    return s;
}

/* insert value (and its id, where ids is not NULL) into the ascending values[size], ids[size]:
   keeps the size smallest */
INLINE void keep_smallest(float *values, int32_t *ids, int size, float value, int32_t id) {
    int i = size - 1;
    if (!(value < values[i])) return;
    while (i > 0 && values[i - 1] > value) {
        values[i] = values[i - 1];
        if (ids) ids[i] = ids[i - 1];
        i--;
    }
    values[i] = value;
    if (ids) ids[i] = id;
}

typedef struct {
    int d, dim;                   /* coordinates per row, true dimensions per row */
    int64_t lists;
    const float *panels;          /* every list's panels, one list after another */
    const float *norms;           /* (columns) squared norm of each column's coordinates, +inf for padding */
    const int64_t *list_start;    /* (lists + 1) first column of each list (a multiple of LANES) */
    const int64_t *slots;         /* (columns) position of the row in each column, -1 for padding */
    const float *centres;         /* the lists' ball centres in panels */
    const float *radius;          /* (lists) the lists' ball radii */
    const float *bank;            /* (positions, dim) true rows */
    const uint8_t *shown;         /* (positions) rows the search may return; NULL: all */
    const float *ext;             /* (columns * EXT_AXES) the next principal coordinates in panels; NULL: none */
    const float *ext_rest;        /* (columns) the residual length past them */
} Memory;

typedef struct {
    int64_t n;
    const float *coords, *rows, *reach_sq;
    int k;
    float *out;                   /* (n, k) */
    const float *ext, *ext_rest;  /* (n, EXT_AXES), (n): as the memory's, where it has them */
} Queries;

/* q_sq[i] = the squared norm of query i's coordinates; q_tail[i] (where not NULL) the length of
   those past SPLIT */
INLINE void query_norms(const Memory *m, const Queries *q, float *q_sq, float *q_tail) {
    for (int64_t i = 0; i < q->n; i++) {
        float sum = 0.0f, tail = 0.0f;
        for (int a = 0; a < m->d; a++) {
            float c = q->coords[i * m->d + a];
            sum += c * c;
            if (a >= SPLIT) tail += c * c;
        }
        q_sq[i] = sum;
        if (q_tail) q_tail[i] = sqrtf(tail);
    }
}

/* rounding slack of a squared distance computed as |a|^2 + |b|^2 - 2 a.b in float32, relative to
   the norms: the lower bounds below take it off, so rounding never drops a row or list in reach */
#define NORM_SLACK 2e-5f

/* a lower bound of |a - b|^2 from the squared norms and an upper bound `dot` of a.b */
INLINE float lower_sq(float a_sq, float b_sq, float dot) {
    return (a_sq + b_sq) * (1.0f - NORM_SLACK) - 2.0f * dot;
}

/* the lanes of panel c0 within limit by the second bound: the last coordinate's term (w, the
   residual past the first axes) taken out of `lower`, with a slack for its rounding as for the
   norms, and the EXT_AXES coordinates' and the residual past them put in (w^2 = |ext|^2 + rest^2) */
INLINE unsigned tighter_lanes(const Memory *m, const Queries *q, int64_t i, int64_t c0, const float *last,
                              const float *lower, float limit) {
    float finer[LANES];
    panel_distances(q->ext + i * EXT_AXES, m->ext + c0 * EXT_AXES, EXT_AXES, finer);
    float wq = q->coords[i * m->d + m->d - 1], rq = q->ext_rest[i];
    const float *rest = m->ext_rest + c0;
    for (int j = 0; j < LANES; j++) {
        float w = wq - last[j], r = rq - rest[j];
        finer[j] += lower[j] - w * w - NORM_SLACK * (wq * wq + last[j] * last[j]) + r * r;
    }
    return lanes_below(finer, limit, 1);
}

/* inner products of GROUP queries with the LANES columns of a panel over coordinates from..to - 1,
   added to out where `add`: each column read once for all of them (register blocking, as a
   matrix product does) */
INLINE void group_dots_over(const float *const *query, const float *panel, int from, int to, int add,
                            float out[GROUP][LANES]) {
#if VECTORS
    vec_t acc[GROUP][LANES / VLANES];
    if (add) memcpy(acc, out, sizeof(acc));
    else memset(acc, 0, sizeof(acc));
    for (int a = from; a < to; a++)
        for (int h = 0; h < LANES / VLANES; h++) {
            vec_t column = load(panel + (int64_t)a * LANES + h * VLANES);
            for (int g = 0; g < GROUP; g++) acc[g][h] += query[g][a] * column;
        }
    memcpy(out, acc, sizeof(acc));
#else
    if (!add) memset(out, 0, sizeof(float) * GROUP * LANES);
    for (int a = from; a < to; a++)
        for (int g = 0; g < GROUP; g++)
            for (int j = 0; j < LANES; j++) out[g][j] += query[g][a] * panel[(int64_t)a * LANES + j];
#endif
}

INLINE void group_dots(const float *const *query, const float *panel, int d, float out[GROUP][LANES]) {
    group_dots_over(query, panel, 0, d, 0, out);
}

/* need[(panel - first / LANES) * n + i]: bit j set where list panel * LANES + j (below end) has
   its ball within query i's reach: |q - b| >= |q - c| - r for every row b of the list (c its
   centre, r its radius). The centre distances come as |q|^2 + |c|^2 - 2 q.c, GROUP queries to a
   panel of centres (each centre read once for all of them), with a slack for their rounding
   relative to the norms; the reach and the radius take one for rounding of both distances, as the
   rows' bound does. A query is held to a panel's LANES lists at once (a list at a time, one byte
   each: 0.3 ms more of 5.5 for a defective ROI's 335 patches at 59 741 rows, one thread). */
INLINE void lists_needed(const Memory *m, const Queries *q, const float *q_sq, int64_t first, int64_t end,
                         uint16_t *need) {
    for (int64_t panel = first / LANES; panel * LANES < end; panel++) {
        const float *centres = m->centres + panel * LANES * m->d;
        int64_t lists = end - panel * LANES < LANES ? end - panel * LANES : LANES;
        unsigned present = lists == LANES ? 0xFFFFu : (1u << lists) - 1u;
        float c_sq[LANES], radius[LANES], dots[GROUP][LANES];
        for (int j = 0; j < LANES; j++) {
            c_sq[j] = 0.0f;
            radius[j] = j < lists ? m->radius[panel * LANES + j] : 0.0f;
        }
        for (int a = 0; a < m->d; a++)
            for (int j = 0; j < LANES; j++) c_sq[j] += centres[a * LANES + j] * centres[a * LANES + j];
        uint16_t *needs = need + (panel - first / LANES) * q->n;
        for (int64_t i0 = 0; i0 < q->n; i0 += GROUP) {
            int count = q->n - i0 < GROUP ? (int)(q->n - i0) : GROUP;
            const float *query[GROUP];
            for (int g = 0; g < GROUP; g++) query[g] = q->coords + (i0 + (g < count ? g : 0)) * m->d;
            group_dots(query, centres, m->d, dots);
            for (int g = 0; g < count; g++) {
                int64_t i = i0 + g;
                float reach = sqrtf(q->reach_sq[i]) * (1.0f + 1e-4f);
                float centre_sq[LANES], most_sq[LANES];
                for (int j = 0; j < LANES; j++) {
                    float most = (radius[j] + reach) * (1.0f / (1.0f - 1.0001e-5f));
                    centre_sq[j] = lower_sq(q_sq[i], c_sq[j], dots[g][j]);
                    most_sq[j] = most * most;
                }
                needs[i] = (uint16_t)(lanes_at_most(centre_sq, most_sq) & present);
            }
        }
    }
}

/* the rows of list l for the queries who[0:count] (count <= GROUP): coordinate distances as
   |q|^2 + |b|^2 - 2 q.b, with a slack for its float rounding relative to the norms; the rows
   within a query's bound get their true distance, which may tighten the bound.
   Where the memory has the next EXT_AXES principal coordinates, a row within the bound is first
   held to a tighter one: its last coordinate (the residual length w past the first axes) gives way
   to those coordinates and the residual length past them (|r|, with w^2 = |ext|^2 + |r|^2), a lower
   bound of the true distance by the same argument. Of the rows that pass the first bound, 1 in 5
   to 1 in 7 passes the second (bottle Lite0, defective patches, 8 477 and 59 741 rows); it is taken
   for the whole panel, from panels of the finer coordinates laid out as the first ones. */
INLINE void scan_group(const Memory *m, const Queries *q, const float *q_sq, int64_t l, const int64_t *who,
                       int count) {
    const float *query[GROUP];
    float bound[GROUP], dots[GROUP][LANES];
    for (int g = 0; g < GROUP; g++) {
        int64_t i = who[g < count ? g : 0];
        const float *best = q->out + i * q->k;
        query[g] = q->coords + i * m->d;
        bound[g] = best[q->k - 1] < q->reach_sq[i] ? best[q->k - 1] : q->reach_sq[i];
    }
    for (int64_t c0 = m->list_start[l]; c0 < m->list_start[l + 1]; c0 += LANES) {
        group_dots(query, m->panels + c0 * m->d, m->d, dots);
        const float *norms = m->norms + c0;
        const float *last = m->panels + c0 * m->d + (int64_t)(m->d - 1) * LANES;   /* the rows' w */
        for (int g = 0; g < count; g++) {
            int64_t i = who[g];
            float *best = q->out + i * q->k;
            float lower[LANES];
            for (int j = 0; j < LANES; j++) lower[j] = lower_sq(q_sq[i], norms[j], dots[g][j]);
            float limit = bound[g] * (1.0f + 1e-4f);
            unsigned within = lanes_below(lower, limit, 1);
            if (within && m->ext) within &= tighter_lanes(m, q, i, c0, last, lower, limit);
            while (within) {
                int j = take_lane(&within);
                if (!(lower[j] <= limit)) continue;
                int64_t pos = m->slots[c0 + j];
                if (pos < 0 || (m->shown && !m->shown[pos])) continue;
                float true_sq = row_distance(q->rows + i * m->dim, m->bank + pos * m->dim, m->dim);
                if (true_sq < best[q->k - 1]) {
                    keep_smallest(best, NULL, q->k, true_sq, 0);
                    if (best[q->k - 1] < bound[g]) bound[g] = best[q->k - 1], limit = bound[g] * (1.0f + 1e-4f);
                }
            }
        }
    }
}

/* the number of the next panel of lists to scan, counted from the range's first: the next in turn,
   or, where `taken` is shared by calls on several threads, the next that none of them has taken */
INLINE int64_t next_panel(int64_t *taken, int64_t *own) {
    return taken ? fetch_add(taken, 1) : (*own)++;
}

/* needs: (n) scratch for one panel of lists; who: (LANES * n) */
CLONES static void exact(const Memory *m, const Queries *q, int64_t first, int64_t end, int64_t *taken,
                         uint16_t *needs, float *q_sq, int64_t *who) {
    for (int64_t i = 0; i < q->n * q->k; i++) q->out[i] = INFINITY;
    query_norms(m, q, q_sq, NULL);
    int64_t own = 0;
    for (int64_t panel; (panel = first / LANES + next_panel(taken, &own)) * LANES < end;) {
        int64_t stop = (panel + 1) * LANES < end ? (panel + 1) * LANES : end;
        lists_needed(m, q, q_sq, panel * LANES, stop, needs);
        int64_t count[LANES] = {0};                 /* who[j * n:]: the queries that need list j of the panel */
        for (int64_t i = 0; i < q->n; i++)
            for (unsigned lists = needs[i]; lists;) {
                int j = take_lane(&lists);
                who[j * q->n + count[j]++] = i;
            }
        for (int j = 0; j < LANES; j++)
            for (int64_t g = 0; g < count[j]; g += GROUP)
                scan_group(m, q, q_sq, panel * LANES + j, who + j * q->n + g,
                           count[j] - g < GROUP ? (int)(count[j] - g) : GROUP);
    }
}

/* the rows of panel c0 in the lanes `below` (coord_sq: their coordinate distances) taken into one
   query's candidates (values, ids: its `candidates` smallest, ascending), padding and rows not
   shown left out. With VLANES candidates they stay in vector registers over the panel's lanes: one
   load and one store per panel, not one per row taken in (bottle Lite0 @ 448 px, 65 542 rows,
   3 136 patches of a good ROI, ~40 rows taken in per patch: the approximate scan 8.3 -> 7.8 ms,
   one thread) */
INLINE void keep_candidates(const Memory *m, int64_t c0, const float *coord_sq, unsigned below, int candidates,
                            float *values, int32_t *ids) {
#if VECTORS
    if (candidates == VLANES) {
        vec_t held = load(values);
        vec_ints_t held_ids;
        memcpy(&held_ids, ids, sizeof(held_ids));
        while (below) {
            int j = take_lane(&below);
            int64_t pos = m->slots[c0 + j];
            if (!(coord_sq[j] < held[VLANES - 1]) || pos < 0 || (m->shown && !m->shown[pos])) continue;
            keep_smallest_lanes(&held, &held_ids, coord_sq[j], (int32_t)pos);
        }
        memcpy(values, &held, sizeof(held));
        memcpy(ids, &held_ids, sizeof(held_ids));
        return;
    }
#endif
    while (below) {
        int j = take_lane(&below);
        int64_t pos = m->slots[c0 + j];
        if (!(coord_sq[j] < values[candidates - 1]) || pos < 0 || (m->shown && !m->shown[pos])) continue;
        keep_smallest(values, ids, candidates, coord_sq[j], (int32_t)pos);
    }
}

/* list l's rows as candidates of the queries who[0:count] (count <= GROUP) */
INLINE void gather_candidates(const Memory *m, const Queries *q, const float *q_sq, int64_t l, const int64_t *who,
                              int count, int candidates, float *cand_sq, int32_t *cand_pos) {
    const float *query[GROUP];
    float dots[GROUP][LANES];
    for (int g = 0; g < GROUP; g++) query[g] = q->coords + who[g < count ? g : 0] * m->d;
    for (int64_t c0 = m->list_start[l]; c0 < m->list_start[l + 1]; c0 += LANES) {
        group_dots(query, m->panels + c0 * m->d, m->d, dots);
        const float *norms = m->norms + c0;
        for (int g = 0; g < count; g++) {
            int64_t i = who[g];
            float *values = cand_sq + i * candidates;
            int32_t *ids = cand_pos + i * candidates;
            float coord_sq[LANES];
            for (int j = 0; j < LANES; j++) coord_sq[j] = q_sq[i] + norms[j] - 2.0f * dots[g][j];
            unsigned below = lanes_below(coord_sq, values[candidates - 1], 0);
            if (below) keep_candidates(m, c0, coord_sq, below, candidates, values, ids);
        }
    }
}

/* the centroids of panel c0 (dots: their inner products with the GROUP queries first..first+count-1)
   that come below a query's current nprobe-th, taken into its probes */
INLINE void take_probes(const float *q_sq, const float *centroid_norms, int64_t first, int count, int64_t c0,
                        float dots[GROUP][LANES], int nprobe, float *probe_sq, int32_t *probes) {
    for (int g = 0; g < count; g++) {
        int64_t i = first + g;
        float *values = probe_sq + i * nprobe;
        float sq[LANES];
        for (int j = 0; j < LANES; j++) sq[j] = q_sq[i] + centroid_norms[c0 + j] - 2.0f * dots[g][j];
        for (unsigned below = lanes_below(sq, values[nprobe - 1], 0); below;) {
            int j = take_lane(&below);
            if (sq[j] < values[nprobe - 1])
                keep_smallest(values, probes + i * nprobe, nprobe, sq[j], (int32_t)(c0 + j));
        }
    }
}

/* panels (at most SEEDS, first columns) holding the probes of the queries first - GROUP..first - 1 */
#define SEEDS 8
INLINE int seed_panels(const int32_t *probes, int64_t first, int nprobe, int64_t *seeds) {
    int count = 0;
    for (int64_t p = (first > GROUP ? first - GROUP : 0) * nprobe; p < first * nprobe; p++) {
        if (probes[p] < 0) continue;
        int64_t c0 = (int64_t)probes[p] / LANES * LANES;
        int known = 0;
        for (int s = 0; s < count; s++) known |= seeds[s] == c0;
        if (!known && count < SEEDS) seeds[count++] = c0;
    }
    return count;
}

/* probes (n, nprobe): each query's nprobe lists of nearest centroid (-1 past the last list),
   the centroids in panels (centroid_norms: their squared norms, +inf for padding).
   Where centroid_tails (the length of each centroid's coordinates past SPLIT) is given, a panel
   is first looked at on its first SPLIT coordinates: q.c <= q'.c' + |q''| |c''| (Cauchy-Schwarz on
   the rest), so |q|^2 + |c|^2 - 2 (q'.c' + |q''| |c''|), less a slack for rounding relative to the
   norms, is below the distance the probe choice computes; a panel none of whose centroids comes
   below a query's current nprobe-th is left there. The panels holding the previous group's probes
   go first, in full: neighbouring patches share their nearest lists, so each query's nprobe-th is
   near its last value before the first looks, and they leave more panels (the approximate scan of
   one ROI, one thread: 6-14 % shorter at 217-1 024 lists). The same probes, but where centroids
   lie at exactly the same distance (the first met is kept). */
INLINE void nearest_lists(const Memory *m, const Queries *q, const float *q_sq, const float *q_tail,
                          const float *centroids, const float *centroid_norms, const float *centroid_tails,
                          int nprobe, float *probe_sq, int32_t *probes) {
    int64_t width = (m->lists + LANES - 1) / LANES * LANES;
    for (int64_t i = 0; i < q->n * nprobe; i++) probe_sq[i] = INFINITY, probes[i] = -1;
    for (int64_t first = 0; first < q->n; first += GROUP) {
        int count = q->n - first < GROUP ? (int)(q->n - first) : GROUP;
        const float *query[GROUP];
        float dots[GROUP][LANES];
        for (int g = 0; g < GROUP; g++) query[g] = q->coords + (first + (g < count ? g : 0)) * m->d;
        int64_t seeds[SEEDS];
        int seeded = seed_panels(probes, first, nprobe, seeds);
        for (int s = 0; s < seeded; s++) {
            group_dots(query, centroids + seeds[s] * m->d, m->d, dots);
            take_probes(q_sq, centroid_norms, first, count, seeds[s], dots, nprobe, probe_sq, probes);
        }
        for (int64_t c0 = 0; c0 < width; c0 += LANES) {
            int done = 0;
            for (int s = 0; s < seeded; s++) done |= seeds[s] == c0;
            if (done) continue;
            const float *panel = centroids + c0 * m->d;
            if (centroid_tails) {
                group_dots_over(query, panel, 0, SPLIT, 0, dots);
                unsigned any = 0;
                for (int g = 0; g < count; g++) {
                    int64_t i = first + g;
                    float early[LANES];
                    for (int j = 0; j < LANES; j++)
                        early[j] = lower_sq(q_sq[i], centroid_norms[c0 + j],
                                            dots[g][j] + q_tail[i] * centroid_tails[c0 + j]);
                    any |= lanes_below(early, probe_sq[i * nprobe + nprobe - 1], 0);
                }
                if (!any) continue;
                group_dots_over(query, panel, SPLIT, m->d, 1, dots);
            } else {
                group_dots(query, panel, m->d, dots);
            }
            take_probes(q_sq, centroid_norms, first, count, c0, dots, nprobe, probe_sq, probes);
        }
    }
}

/* scratch: q_sq (2 n), probe_sq and probes (n * nprobe), cand_sq and cand_pos (n * candidates),
   order (n * nprobe), count (lists + 1); lists and bank positions below 2^31 (checked by the caller) */
CLONES static void approximate(const Memory *m, const Queries *q, const float *centroids, const float *centroid_norms,
                               const float *centroid_tails, int nprobe, int candidates, float *q_sq, float *probe_sq,
                               int32_t *probes, float *cand_sq, int32_t *cand_pos, int64_t *order, int64_t *count) {
    float *q_tail = centroid_tails ? q_sq + q->n : NULL;     /* q_sq holds 2 n floats */
    query_norms(m, q, q_sq, q_tail);
    nearest_lists(m, q, q_sq, q_tail, centroids, centroid_norms, centroid_tails, nprobe, probe_sq, probes);
    for (int64_t i = 0; i < q->n * candidates; i++) cand_sq[i] = INFINITY, cand_pos[i] = -1;
    /* the queries of each list, list after list (a counting sort of the (query, list) pairs) */
    memset(count, 0, sizeof(int64_t) * (size_t)(m->lists + 1));
    for (int64_t p = 0; p < q->n * nprobe; p++)
        if (probes[p] >= 0) count[probes[p] + 1]++;
    for (int64_t l = 0; l < m->lists; l++) count[l + 1] += count[l];
    for (int64_t p = 0; p < q->n * nprobe; p++)
        if (probes[p] >= 0) order[count[probes[p]]++] = p / nprobe;
    for (int64_t l = m->lists; l > 0; l--) count[l] = count[l - 1];
    count[0] = 0;
    for (int64_t l = 0; l < m->lists; l++)
        for (int64_t g = count[l]; g < count[l + 1]; g += GROUP)
            gather_candidates(m, q, q_sq, l, order + g, count[l + 1] - g < GROUP ? (int)(count[l + 1] - g) : GROUP,
                              candidates, cand_sq, cand_pos);
    for (int64_t i = 0; i < q->n; i++) {
        float *best = q->out + i * q->k;
        for (int j = 0; j < q->k; j++) best[j] = INFINITY;
        if (i + 1 < q->n)       /* the next query's candidate rows, while this one's are compared */
            for (int c = 0; c < candidates && cand_pos[(i + 1) * candidates + c] >= 0; c++)
                for (int a = 0; a < m->dim; a += 16)
                    PREFETCH(m->bank + (int64_t)cand_pos[(i + 1) * candidates + c] * m->dim + a);
        for (int c = 0; c < candidates; c++) {
            int64_t pos = cand_pos[i * candidates + c];
            if (pos < 0) break;
            keep_smallest(best, NULL, q->k, row_distance(q->rows + i * m->dim, m->bank + pos * m->dim, m->dim), 0);
        }
    }
}

#if VECTORS
typedef double vecd_t __attribute__((vector_size(4 * sizeof(double))));
#endif

/* |row - mean|^2 in float64, four running sums */
INLINE double centred_sq(const float *row, const float *mean, int dim) {
    double sums[4] = {0.0, 0.0, 0.0, 0.0}, total = 0.0;
    int j = 0;
    for (; j + 4 <= dim; j += 4)
        for (int h = 0; h < 4; h++) {
            double c = (double)row[j + h] - (double)mean[j + h];
            sums[h] += c * c;
        }
    for (; j < dim; j++) {
        double c = (double)row[j] - (double)mean[j];
        total += c * c;
    }
    return total + (sums[0] + sums[1]) + (sums[2] + sums[3]);
}

/* the coordinates' last column: the residual length sqrt(max(total - sum of dots^2, 0)) */
INLINE void finish_coords(const double *dots, int axes, double total, float *coords) {
    double principal = 0.0;
    for (int a = 0; a < axes; a++) {
        coords[a] = (float)dots[a];
        principal += dots[a] * dots[a];
    }
    coords[axes] = total > principal ? (float)sqrt(total - principal) : 0.0f;
}

/* coordinates of n rows (dim floats each) in float32: (row - mean) . axis for each of the
   `axes` axes, then the residual length sqrt(max(|row - mean|^2 - the principal part's, 0));
   axes_t (dim, width) holds the axes as columns, width = axes rounded up to AXIS_BLOCK (zeros
   after), at most MAX_AXES. Two rows at a time, each block of axes in its own accumulator:
   independent multiply-adds in flight instead of one chain. */
CLONES static void project(const float *rows, int64_t n, int dim, const float *mean, const float *axes_t, int axes,
                           int width, float *out) {
    for (int64_t i = 0; i < n; i += 2) {
        int pair = i + 1 < n ? 2 : 1;
        double dots[2][MAX_AXES];
#if VECTORS
        for (int a0 = 0; a0 < width; a0 += AXIS_BLOCK) {
            vec_t acc[2][AXIS_BLOCK / VLANES];
            memset(acc, 0, sizeof(acc));
            for (int j = 0; j < dim; j++) {
                const float *column = axes_t + (int64_t)j * width + a0;
                float c0 = rows[i * dim + j] - mean[j], c1 = pair > 1 ? rows[(i + 1) * dim + j] - mean[j] : 0.0f;
                for (int blk = 0; blk < AXIS_BLOCK / VLANES; blk++) {
                    vec_t axis = load(column + blk * VLANES);
                    acc[0][blk] += c0 * axis;
                    acc[1][blk] += c1 * axis;
                }
            }
            for (int r = 0; r < 2; r++)
                for (int blk = 0; blk < AXIS_BLOCK / VLANES; blk++)
                    for (int a = 0; a < VLANES; a++) dots[r][a0 + blk * VLANES + a] = acc[r][blk][a];
        }
#else
        memset(dots, 0, sizeof(dots));
        for (int j = 0; j < dim; j++)
            for (int r = 0; r < pair; r++) {
                float c = rows[(i + r) * dim + j] - mean[j];
                for (int a = 0; a < axes; a++) dots[r][a] += c * axes_t[(int64_t)j * width + a];
            }
#endif
        for (int r = 0; r < pair; r++)
            finish_coords(dots[r], axes, row_distance(rows + (i + r) * dim, mean, dim), out + (i + r) * (axes + 1));
    }
}

/* project in float64 (axes_t in float64): for the exact scan's lower bounds, where the residual,
   a difference of squares, must not lose the digits float32 would. With split < axes, out takes
   the first `split` axes and the residual past them, ext (n, EXT_AXES) the other axes' coordinates
   (zeros after them) and rest (n) the residual past all axes: the exact scan's second bound. */
CLONES static void project_precise(const float *rows, int64_t n, int dim, const float *mean, const double *axes_t,
                                   int axes, int width, int split, float *out, float *ext, float *rest) {
    for (int64_t i = 0; i < n; i += 2) {
        int pair = i + 1 < n ? 2 : 1;
        const float *row[2] = {rows + i * dim, rows + (i + pair - 1) * dim};
        double dots[2][MAX_AXES];
#if VECTORS
        for (int a0 = 0; a0 < width; a0 += AXIS_BLOCK) {      /* two rows at a time: each axis read once for both */
            vecd_t acc[2][AXIS_BLOCK / 4];
            memset(acc, 0, sizeof(acc));
            for (int j = 0; j < dim; j++) {
                double c0 = (double)row[0][j] - (double)mean[j], c1 = (double)row[1][j] - (double)mean[j];
                for (int blk = 0; blk < AXIS_BLOCK / 4; blk++) {
                    vecd_t axis;
                    memcpy(&axis, axes_t + (int64_t)j * width + a0 + blk * 4, sizeof(axis));
                    acc[0][blk] += c0 * axis;
                    acc[1][blk] += c1 * axis;
                }
            }
            for (int r = 0; r < 2; r++)
                for (int blk = 0; blk < AXIS_BLOCK / 4; blk++)
                    for (int a = 0; a < 4; a++) dots[r][a0 + blk * 4 + a] = acc[r][blk][a];
        }
#else
        memset(dots, 0, sizeof(dots));
        for (int j = 0; j < dim; j++)
            for (int r = 0; r < 2; r++) {
                double c = (double)row[r][j] - (double)mean[j];
                for (int a = 0; a < axes; a++) dots[r][a] += c * axes_t[(int64_t)j * width + a];
            }
#endif
        for (int r = 0; r < pair; r++) {
            double total = centred_sq(row[r], mean, dim);
            finish_coords(dots[r], split, total, out + (i + r) * (split + 1));
            if (split < axes) {
                float *coords = ext + (i + r) * EXT_AXES;
                double principal = 0.0;
                for (int a = 0; a < axes; a++) principal += dots[r][a] * dots[r][a];
                for (int a = 0; a < EXT_AXES; a++) coords[a] = split + a < axes ? (float)dots[r][split + a] : 0.0f;
                rest[i + r] = total > principal ? (float)sqrt(total - principal) : 0.0f;
            }
        }
    }
}

/* the fewest queries a call of a shared approximate scan takes at a time (but the last ones) */
#define MIN_CHUNK 32

/* the first query of the next chunk none has taken (n when all are), its size in *size: with one
   call, all that is left; else a calls-th of it, at least MIN_CHUNK. Chunks shrink as the queries
   run out, so the calls end together even where one starts late or its queries cost more (a
   defect in its half), while most queries go in large chunks (smaller ones share fewer lists and
   start more probe choices afresh: 784 patches at 60k rows, one thread, in one call 1.89 ms, in
   chunks of 64 2.03 ms). The chunks are the same whichever call takes them: so are the results. */
INLINE int64_t next_chunk(int64_t *taken, int64_t n, int calls, int64_t *size) {
    int64_t first = read_shared(taken);
    for (;;) {
        if (first >= n) return n;
        int64_t left = n - first, want = left / calls;
        want = want < MIN_CHUNK ? MIN_CHUNK : want;
        *size = want < left ? want : left;
        if (swap_if(taken, &first, first + *size)) return first;
    }
}

/* approximate() over the chunks of queries this call takes (taken: shared by the calls on several
   threads, zero at first), each projected first where mean is given (project(), into q->coords) */
CLONES static void approximate_chunks(const Memory *m, const Queries *q, const float *centroids,
                                      const float *centroid_norms, const float *centroid_tails, int nprobe,
                                      int candidates, const float *mean, const float *axes_t, int axes, int64_t *taken,
                                      int calls, float *q_sq, float *probe_sq, int32_t *probes, float *cand_sq,
                                      int32_t *cand_pos, int64_t *order, int64_t *count) {
    int width = (axes + AXIS_BLOCK - 1) / AXIS_BLOCK * AXIS_BLOCK;
    for (int64_t first, size = 0; (first = next_chunk(taken, q->n, calls, &size)) < q->n;) {
        float *coords = (float *)q->coords + first * m->d;
        if (mean) project(q->rows + first * m->dim, size, m->dim, mean, axes_t, axes, width, coords);
        Queries part = {size, coords, q->rows + first * m->dim, NULL, q->k, q->out + first * q->k, NULL, NULL};
        approximate(m, &part, centroids, centroid_norms, centroid_tails, nprobe, candidates, q_sq, probe_sq, probes,
                    cand_sq, cand_pos, order, count);
    }
}

/* rows a call takes at a time where calls on several threads share a projection */
#define SHARED_ROWS 16

/* project (or project_precise) of the n rows, shared by the calls given the same progress (two
   int64, zeros at first: chunks of SHARED_ROWS rows taken, rows projected): each takes the next
   chunk none has taken, and returns once every row is projected, by whichever call. A scan that
   reads every query's coordinates follows in the same thread, with no hand-off between threads
   (a defective ROI's 335 patches: the two steps' hand-offs cost ~0.2 ms in Python) */
CLONES static void project_shared(const float *rows, int64_t n, int dim, const float *mean, const void *axes_t,
                                  int axes, int width, int precise, int split, float *out, float *ext, float *rest,
                                  int64_t *progress) {
    for (int64_t first; (first = fetch_add(&progress[0], 1) * SHARED_ROWS) < n;) {
        int64_t count = n - first < SHARED_ROWS ? n - first : SHARED_ROWS;
        if (precise)
            project_precise(rows + first * dim, count, dim, mean, axes_t, axes, width, split, out + first * (split + 1),
                            split < axes ? ext + first * EXT_AXES : NULL, split < axes ? rest + first : NULL);
        else
            project(rows + first * dim, count, dim, mean, axes_t, axes, width, out + first * (axes + 1));
        fetch_add(&progress[1], count);
    }
    wait_for(&progress[1], n);
}

/* rows first:end of out (H, W) = left (rows, w) times bt (w, width), or plus it with `add`, for
   the column blocks b_first:b_last only. bt holds the columns of a banded matrix (width = W
   rounded up to LANES, zeros after W): the LANES pixels of block b take only the cells
   band[2b]:band[2b + 1], the ones whose weight is not zero there. The anomaly map's second
   product: a pixel is fed by ~4 of the 28-52 patch columns, which a dense product multiplies all.
   Row y of out takes row y - first of left. */
CLONES static void banded_product(const float *left, const float *bt, const int32_t *band, int64_t first,
                                  int64_t end, int b_first, int b_last, int add, int w, int W, int width,
                                  float *out) {
    for (int64_t y = first; y < end; y++) {
        const float *row = left + (y - first) * w;
        float *dst = out + y * W;
        for (int b = b_first; b < b_last; b++) {
            float lane[LANES];
            int x0 = b * LANES, count = W - x0 < LANES ? W - x0 : LANES;
#if VECTORS
            vec_t acc[LANES / VLANES];
            memset(acc, 0, sizeof(acc));
            for (int j = band[2 * b]; j < band[2 * b + 1]; j++)
                for (int h = 0; h < LANES / VLANES; h++)
                    acc[h] += row[j] * load(bt + (int64_t)j * width + x0 + h * VLANES);
            if (count == LANES) {
                if (add)
                    for (int h = 0; h < LANES / VLANES; h++) acc[h] += load(dst + x0 + h * VLANES);
                memcpy(dst + x0, acc, sizeof(acc));
                continue;
            }
            memcpy(lane, acc, sizeof(lane));
#else
            for (int x = 0; x < LANES; x++) lane[x] = 0.0f;
            for (int j = band[2 * b]; j < band[2 * b + 1]; j++)
                for (int x = 0; x < LANES; x++) lane[x] += row[j] * bt[(int64_t)j * width + x0 + x];
#endif
            for (int x = 0; x < count; x++) dst[x0 + x] = add ? dst[x0 + x] + lane[x] : lane[x];
        }
    }
}

/* bit j set where values[j] >= limit (false for NaN), for the LANES values */
INLINE unsigned lanes_at_least(const float *values, float limit) {
#if VECTORS
    vec_t bound = {0};
    bound += limit;
    return lane_bits(load(values) >= bound, load(values + VLANES) >= bound);
#else
    unsigned mask = 0;
    for (int j = 0; j < LANES; j++) mask |= (unsigned)(values[j] >= limit) << j;
    return mask;
#endif
}

/* bit j set where flags[j] is not zero, for LANES bytes */
INLINE unsigned lanes_set(const uint8_t *flags) {
    unsigned mask = 0;
    for (int j = 0; j < LANES; j++) mask |= (unsigned)(flags[j] != 0) << j;
    return mask;
}

/* out[0:count] = the values >= cut where chosen (all where chosen is NULL), in order; returns count.
   LANES values at a time: a map's values above a high cut are a few percent, mostly in runs, so
   nearly every block is passed over on one comparison. */
CLONES static int64_t at_or_above(const float *values, const uint8_t *chosen, int64_t n, float cut, float *out) {
    int64_t count = 0, i = 0;
    for (; i + LANES <= n; i += LANES) {
        unsigned above = lanes_at_least(values + i, cut);
        if (above && chosen) above &= lanes_set(chosen + i);
        while (above) out[count++] = values[i + take_lane(&above)];
    }
    for (; i < n; i++)
        if (values[i] >= cut && (!chosen || chosen[i])) out[count++] = values[i];
    return count;
}

/* out[r * w + c] = 1 where a pixel of rows y_first[r]..y_last[r] - 1 and columns x_first[c]..x_last[c] - 1
   of amap (H, W) is >= level (and chosen, where given), else 0: the patches that feed a pixel at or
   above a level (each patch's pixels from the map's weights). Each row of pixels is compared once
   and its hot columns are added to the bands of the patch rows it belongs to (both bounds rise with
   r); band and hot: (h * W) and (W) scratch. */
CLONES static void cells_above(const float *amap, const uint8_t *chosen, int64_t H, int64_t W, float level,
                               const int64_t *y_first, const int64_t *y_last, int64_t h, const int64_t *x_first,
                               const int64_t *x_last, int64_t w, uint8_t *band, uint8_t *hot, uint8_t *out) {
    memset(band, 0, (size_t)(h * W));
    int64_t r_lo = 0, r_hi = 0;    /* the patch rows whose pixel rows hold y: y_last[r] > y, y_first[r] <= y */
    for (int64_t y = 0; y < H; y++) {
        while (r_lo < h && y_last[r_lo] <= y) r_lo++;
        while (r_hi < h && y_first[r_hi] <= y) r_hi++;
        if (r_lo >= r_hi) continue;
        const float *row = amap + y * W;
        const uint8_t *flags = chosen ? chosen + y * W : NULL;
        unsigned any = 0;
        for (int64_t x = 0; x < W; x++) {
            uint8_t above = row[x] >= level && (!flags || flags[x]);
            hot[x] = above;
            any |= above;
        }
        if (!any) continue;
        for (int64_t r = r_lo; r < r_hi; r++)
            for (int64_t x = 0; x < W; x++) band[r * W + x] |= hot[x];
    }
    for (int64_t r = 0; r < h; r++)
        for (int64_t c = 0; c < w; c++) {
            uint8_t found = 0;
            for (int64_t x = x_first[c]; x < x_last[c]; x++) found |= band[r * W + x];
            out[r * w + c] = found;
        }
}

/* ---- helper threads: one scan at a time shared with the calling thread --------------------------

   A job runs on the calling thread (member 0) and on the helpers that join it (members 1..). The
   helpers are the extension's own threads: they never take the GIL, so a caller hands work over
   and waits for its end on the core, where threads of a Python pool cost a wake-up and the GIL's
   hand-overs each way (a defective ROI's two kNN steps at 60k rows: ~0.7 ms of 5.6 between the
   scans). A helper waits on the core for a moment after each job (the steps of one request follow
   each other closely), then sleeps; one that wakes late finds the work taken and joins nothing.
   A caller that finds the team at work on another caller's job runs its own alone. */
#define MAX_HELPERS 15
#define CLOSED ((int64_t)1 << 40)   /* set in `joined` once the caller's share is done: no more joins */
#define HELPER_SPIN_NS 50000        /* a helper's wait on the core for the next job before it sleeps */

typedef struct Job {
    void (*run)(struct Job *job, int member);
} Job;

#if HELPERS
static struct {
    pthread_mutex_t lock;           /* guards the generation's changes against sleeping helpers */
    pthread_cond_t wake;
    pthread_mutex_t busy;           /* held by the caller of the job at work */
    int64_t started, limit, sleeping;
    int64_t generation;             /* one more per job */
    Job *job;
    int64_t capacity;               /* helpers the job at work takes at most */
    int64_t joined;                 /* helpers that joined it, | CLOSED */
    int64_t done;                   /* helpers that finished it */
} team = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER, PTHREAD_MUTEX_INITIALIZER, 0, 0, 0, 0, NULL, 0, 0, 0};

INLINE void store_shared(int64_t *counter, int64_t value) { __atomic_store_n(counter, value, __ATOMIC_RELEASE); }

static int64_t now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (int64_t)t.tv_sec * 1000000000 + t.tv_nsec;
}

/* the generation once it differs from seen: waited for on the core for HELPER_SPIN_NS, then asleep */
static int64_t next_generation(int64_t seen) {
    int64_t now = read_shared(&team.generation), until = now_ns() + HELPER_SPIN_NS;
    for (unsigned spins = 1; now == seen; spins++) {
#if defined(__x86_64__) || defined(__i386__)
        __builtin_ia32_pause();
#endif
        now = read_shared(&team.generation);
        if (now == seen && spins % 64 == 0 && now_ns() > until) break;
    }
    if (now != seen) return now;
    pthread_mutex_lock(&team.lock);
    team.sleeping++;
    while ((now = read_shared(&team.generation)) == seen) pthread_cond_wait(&team.wake, &team.lock);
    team.sleeping--;
    pthread_mutex_unlock(&team.lock);
    return now;
}

static void *helper_main(void *unused) {
    (void)unused;
    for (int64_t seen = read_shared(&team.generation);;) {
        seen = next_generation(seen);
        /* join the job at work unless its caller is done or it is full: the job is read only once
           joined (a job is replaced only after every helper that joined it is done with it) */
        int64_t state = read_shared(&team.joined);
        while (!(state & CLOSED) && state < read_shared(&team.capacity)) {
            if (swap_if(&team.joined, &state, state + 1)) {
                Job *job = team.job;
                job->run(job, (int)state + 1);
                fetch_add(&team.done, 1);
                break;
            }
        }
    }
    return NULL;
}

/* in a child process after fork(): the helpers are not there */
static void team_after_fork(void) {
    pthread_mutex_init(&team.lock, NULL);
    pthread_cond_init(&team.wake, NULL);
    pthread_mutex_init(&team.busy, NULL);
    team.started = team.limit = team.sleeping = team.capacity = team.joined = team.done = 0;
}

/* helpers the jobs take from now on (at most MAX_HELPERS), starting threads as needed; the
   helpers running */
static int64_t team_size(int64_t count) {
    static int fork_handler = 0;
    count = count < 0 ? 0 : (count > MAX_HELPERS ? MAX_HELPERS : count);
    pthread_mutex_lock(&team.lock);
    if (!fork_handler) fork_handler = pthread_atfork(NULL, NULL, team_after_fork) == 0;
    sigset_t all, before;
    sigfillset(&all);
    pthread_sigmask(SIG_BLOCK, &all, &before);   /* signals stay with the interpreter's threads */
    while (team.started < count) {
        pthread_t thread;
        pthread_attr_t attr;
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        int failed = pthread_create(&thread, &attr, helper_main, NULL);
        pthread_attr_destroy(&attr);
        if (failed) break;
        team.started++;
    }
    pthread_sigmask(SIG_SETMASK, &before, NULL);
    store_shared(&team.limit, count < team.started ? count : team.started);
    pthread_mutex_unlock(&team.lock);
    return read_shared(&team.limit);
}

/* members a job may have at most: the caller and the helpers */
static int64_t team_capacity(void) { return 1 + read_shared(&team.limit); }

/* runs job on the calling thread and the helpers that join it, at most capacity - 1 of them;
   returns once every member is done, with the number of members */
static int team_run(Job *job, int64_t capacity) {
    if (capacity < 2 || pthread_mutex_trylock(&team.busy) != 0) {
        job->run(job, 0);
        return 1;
    }
    team.job = job;
    store_shared(&team.capacity, capacity - 1);
    store_shared(&team.done, 0);
    store_shared(&team.joined, 0);
    pthread_mutex_lock(&team.lock);
    fetch_add(&team.generation, 1);
    int64_t sleeping = team.sleeping;
    pthread_mutex_unlock(&team.lock);
    if (sleeping) pthread_cond_broadcast(&team.wake);
    job->run(job, 0);
    int64_t joined = __atomic_fetch_or(&team.joined, CLOSED, __ATOMIC_ACQ_REL) & ~CLOSED;
    wait_for(&team.done, joined);
    pthread_mutex_unlock(&team.busy);
    return 1 + (int)joined;
}
#else
static int64_t team_size(int64_t count) {
    (void)count;
    return 0;
}

static int64_t team_capacity(void) { return 1; }

static int team_run(Job *job, int64_t capacity) {
    (void)capacity;
    job->run(job, 0);
    return 1;
}
#endif

/* the exact scan of every list as a job: the members project the queries' rows together where
   a projection is given (into coords and the second bound's coordinates), then take panels of
   lists from one count, each keeping its own k nearest (outs: one (n, k) block per member) */
typedef struct {
    Job job;
    const Memory *m;
    Queries q;
    const float *mean;              /* NULL: the coordinates are given */
    const double *axes_t;
    int axes, width, split;
    float *coords, *ext, *rest;
    int64_t progress[2], panels;
    float *outs;
    uint16_t *needs;
    float *q_sqs;
    int64_t *whos;
} ExactJob;

static void run_exact(Job *job, int member) {
    ExactJob *e = (ExactJob *)job;
    int64_t n = e->q.n;
    if (e->mean)
        project_shared(e->q.rows, n, e->m->dim, e->mean, e->axes_t, e->axes, e->width, 1, e->split, e->coords, e->ext,
                       e->rest, e->progress);
    Queries q = e->q;
    q.out = e->outs + (int64_t)member * n * q.k;
    exact(e->m, &q, 0, e->m->lists, &e->panels, e->needs + (int64_t)member * n, e->q_sqs + (int64_t)member * n,
          e->whos + (int64_t)member * LANES * n);
}

/* the approximate scan as a job: the members take chunks of queries from one count, project
   each where a projection is given (into q.coords), and scan it; scratch per member for the
   largest chunk (`most` queries) */
typedef struct {
    Job job;
    const Memory *m;
    Queries q;
    const float *centroids, *centroid_norms, *centroid_tails;
    int nprobe, candidates;
    const float *mean, *axes_t;
    int axes, calls;
    int64_t taken, most;
    float *q_sq, *probe_sq, *cand_sq;
    int32_t *probes, *cand_pos;
    int64_t *order, *count;
} ApproximateJob;

static void run_approximate(Job *job, int member) {
    ApproximateJob *a = (ApproximateJob *)job;
    int64_t most = a->most, pairs = most * a->nprobe, kept = most * a->candidates;
    approximate_chunks(a->m, &a->q, a->centroids, a->centroid_norms, a->centroid_tails, a->nprobe, a->candidates,
                       a->mean, a->axes_t, a->axes, &a->taken, a->calls, a->q_sq + member * 2 * most,
                       a->probe_sq + member * pairs, a->probes + member * pairs, a->cand_sq + member * kept,
                       a->cand_pos + member * kept, a->order + member * pairs,
                       a->count + member * (a->m->lists + 1));
}

/* out (n, k) = the members' k nearest merged */
static void merge_members(const float *outs, int members, int64_t n, int k, float *out) {
    memcpy(out, outs, sizeof(float) * (size_t)(n * k));
    for (int member = 1; member < members; member++)
        for (int64_t i = 0; i < n; i++) {
            const float *theirs = outs + ((int64_t)member * n + i) * k;
            for (int j = 0; j < k && theirs[j] < out[i * k + k - 1]; j++) keep_smallest(out + i * k, NULL, k, theirs[j], 0);
        }
}

/* ---- Python glue: buffers in, sizes checked, GIL released around the scan ---------------------- */

enum { PANELS, NORMS, LIST_START, SLOTS, CENTRES, RADIUS, BANK, SHOWN, COORDS, ROWS, REACH, OUT, EXT, EXT_REST, Q_EXT,
       Q_EXT_REST, TAKEN, BUFFERS };

static int fail(const char *message) {
    PyErr_SetString(PyExc_ValueError, message);
    return -1;
}

static void release(Py_buffer *buffers, int count) {
    for (int i = 0; i < count; i++)
        if (buffers[i].obj) PyBuffer_Release(&buffers[i]);
}

#define FLOATS(b) ((int64_t)((b).len / (Py_ssize_t)sizeof(float)))
#define INTS(b) ((int64_t)((b).len / (Py_ssize_t)sizeof(int64_t)))

/* checks the buffers' sizes and fills `m` and `q`. The contents of list_start and slots (widths
   that are multiples of LANES, positions within the bank) are checked once, when
   engine.ivfscan.TiledLists builds them: a search makes no pass over the memory for it. */
static int describe(Py_buffer *b, int d, int dim, int k, Memory *m, Queries *q) {
    if (d <= 0 || dim <= 0 || k <= 0 || k > MAX_K) return fail("bad dimensions or k");
    int64_t lists = INTS(b[LIST_START]) - 1, columns = INTS(b[SLOTS]);
    const int64_t *list_start = b[LIST_START].buf;
    if (lists < 1 || list_start[0] != 0 || list_start[lists] != columns) return fail("list_start does not span the slots");
    if (FLOATS(b[PANELS]) != columns * d) return fail("panels size mismatch");
    if (FLOATS(b[NORMS]) != columns) return fail("norms size mismatch");
    if (FLOATS(b[CENTRES]) != (lists + LANES - 1) / LANES * LANES * d) return fail("centres size mismatch");
    if (FLOATS(b[RADIUS]) != lists) return fail("radius size mismatch");
    int64_t positions = FLOATS(b[BANK]) / dim;
    if (positions * dim != FLOATS(b[BANK])) return fail("bank size mismatch");
    if (b[SHOWN].obj && b[SHOWN].len != positions) return fail("shown size mismatch");
    int64_t n = FLOATS(b[COORDS]) / d;
    if (FLOATS(b[COORDS]) != n * d || FLOATS(b[ROWS]) != n * dim) return fail("query size mismatch");
    if (FLOATS(b[OUT]) != n * k) return fail("out size mismatch");
    int ext = b[EXT].obj != NULL;
    if (ext != (b[EXT_REST].obj != NULL) || ext != (b[Q_EXT].obj != NULL) || ext != (b[Q_EXT_REST].obj != NULL))
        return fail("the second bound's coordinates: all four or none");
    if (ext && (FLOATS(b[EXT]) != columns * EXT_AXES || FLOATS(b[EXT_REST]) != columns ||
                FLOATS(b[Q_EXT]) != n * EXT_AXES || FLOATS(b[Q_EXT_REST]) != n))
        return fail("the second bound's coordinates: size mismatch");
    *m = (Memory){d, dim, lists, b[PANELS].buf, b[NORMS].buf, list_start, b[SLOTS].buf, b[CENTRES].buf, b[RADIUS].buf,
                  b[BANK].buf, b[SHOWN].obj ? b[SHOWN].buf : NULL, ext ? b[EXT].buf : NULL,
                  ext ? b[EXT_REST].buf : NULL};
    *q = (Queries){n, b[COORDS].buf, b[ROWS].buf, b[REACH].obj ? b[REACH].buf : NULL, k, b[OUT].buf,
                   ext ? b[Q_EXT].buf : NULL, ext ? b[Q_EXT_REST].buf : NULL};
    return 0;
}

/* the approximate scans' own arguments against the memory's (after describe) */
static int check_approximate(const Py_buffer *b, const Py_buffer *centroids, const Py_buffer *centroid_norms,
                             const Py_buffer *centroid_tails, int d, int dim, int k, int nprobe, int candidates,
                             const Memory *m) {
    if (FLOATS(*centroids) != FLOATS(b[CENTRES]) || FLOATS(*centroid_norms) * d != FLOATS(*centroids))
        return fail("centroids size mismatch");
    if (centroid_tails->obj && (d <= SPLIT || FLOATS(*centroid_tails) != FLOATS(*centroid_norms)))
        return fail("centroid tails size mismatch (or too few coordinates)");
    if (candidates < k || candidates > 1024 || nprobe < 1 || nprobe > m->lists)
        return fail("candidates or nprobe out of range");
    if (m->lists >= INT32_MAX || FLOATS(b[BANK]) / dim >= INT32_MAX)
        return fail("too many lists or rows for the approximate scan");
    return 0;
}

/* b[slot] from obj unless it is None (flags: PyBUF_SIMPLE to read, PyBUF_WRITABLE to write) */
static int optional(PyObject *obj, Py_buffer *b, int slot, int flags) {
    return obj != Py_None && PyObject_GetBuffer(obj, &b[slot], flags) < 0 ? -1 : 0;
}

static PyObject *py_exact(PyObject *self, PyObject *args) {
    Py_buffer b[BUFFERS];
    memset(b, 0, sizeof(b));
    PyObject *shown, *ext, *ext_rest, *q_ext, *q_ext_rest, *taken;
    int d, dim, k;
    long long first, end;
    if (!PyArg_ParseTuple(args, "y*y*y*y*y*y*y*Oiiy*y*y*iLLw*OOOOO", &b[PANELS], &b[NORMS], &b[LIST_START], &b[SLOTS],
                          &b[CENTRES], &b[RADIUS], &b[BANK], &shown, &d, &dim, &b[COORDS], &b[ROWS], &b[REACH], &k,
                          &first, &end, &b[OUT], &ext, &ext_rest, &q_ext, &q_ext_rest, &taken))
        return NULL;
    Memory m;
    Queries q;
    uint16_t *need = NULL;
    float *q_sq = NULL;
    int64_t *who = NULL;
    int status = optional(shown, b, SHOWN, PyBUF_SIMPLE) || optional(ext, b, EXT, PyBUF_SIMPLE) ||
                 optional(ext_rest, b, EXT_REST, PyBUF_SIMPLE) || optional(q_ext, b, Q_EXT, PyBUF_SIMPLE) ||
                 optional(q_ext_rest, b, Q_EXT_REST, PyBUF_SIMPLE) || optional(taken, b, TAKEN, PyBUF_WRITABLE) ? -1 : 0;
    if (status == 0) status = describe(b, d, dim, k, &m, &q);
    if (status == 0 && FLOATS(b[REACH]) != q.n) status = fail("query size mismatch (reach)");
    if (status == 0 && b[TAKEN].obj && (b[TAKEN].len != sizeof(int64_t) || (uintptr_t)b[TAKEN].buf % sizeof(int64_t)))
        status = fail("taken: one aligned int64 expected");
    if (status == 0 && (first < 0 || first > end || end > m.lists || first % LANES))
        status = fail("list range out of bounds (or not starting a panel)");
    if (status == 0 && end > first && q.n > 0) {
        need = malloc(sizeof(uint16_t) * (size_t)q.n);
        q_sq = malloc(sizeof(float) * (size_t)q.n);
        who = malloc(sizeof(int64_t) * LANES * (size_t)q.n);
        if (!need || !q_sq || !who) {
            PyErr_NoMemory();
            status = -1;
        }
    }
    if (status == 0) {
        Py_BEGIN_ALLOW_THREADS
        if (need) exact(&m, &q, first, end, b[TAKEN].obj ? b[TAKEN].buf : NULL, need, q_sq, who);
        else for (int64_t i = 0; i < q.n * q.k; i++) q.out[i] = INFINITY;
        Py_END_ALLOW_THREADS
    }
    free(need);
    free(q_sq);
    free(who);
    release(b, BUFFERS);
    if (status) return NULL;
    Py_RETURN_NONE;
}

static PyObject *py_exact_team(PyObject *self, PyObject *args) {
    Py_buffer b[BUFFERS], mean, axes_t;
    memset(b, 0, sizeof(b));
    memset(&mean, 0, sizeof(mean));
    memset(&axes_t, 0, sizeof(axes_t));
    PyObject *shown, *coords, *ext, *ext_rest, *q_ext, *q_ext_rest, *mean_obj, *axes_obj;
    int d, dim, k, axes;
    if (!PyArg_ParseTuple(args, "y*y*y*y*y*y*y*OiiOy*y*iw*OOOOOOi", &b[PANELS], &b[NORMS], &b[LIST_START], &b[SLOTS],
                          &b[CENTRES], &b[RADIUS], &b[BANK], &shown, &d, &dim, &coords, &b[ROWS], &b[REACH], &k,
                          &b[OUT], &ext, &ext_rest, &q_ext, &q_ext_rest, &mean_obj, &axes_obj, &axes))
        return NULL;
    int projecting = mean_obj != Py_None, out_flags = projecting ? PyBUF_WRITABLE : PyBUF_SIMPLE;
    Memory m;
    Queries q;
    ExactJob job;
    memset(&job, 0, sizeof(job));
    int64_t capacity = team_capacity(), members = 0;
    int status = optional(shown, b, SHOWN, PyBUF_SIMPLE) || optional(ext, b, EXT, PyBUF_SIMPLE) ||
                 optional(ext_rest, b, EXT_REST, PyBUF_SIMPLE) || optional(coords, b, COORDS, out_flags) ||
                 optional(q_ext, b, Q_EXT, out_flags) || optional(q_ext_rest, b, Q_EXT_REST, out_flags) ||
                 optional(mean_obj, &mean, 0, PyBUF_SIMPLE) || optional(axes_obj, &axes_t, 0, PyBUF_SIMPLE) ? -1 : 0;
    if (status == 0) status = describe(b, d, dim, k, &m, &q);
    if (status == 0 && FLOATS(b[REACH]) != q.n) status = fail("query size mismatch (reach)");
    int width = (axes + AXIS_BLOCK - 1) / AXIS_BLOCK * AXIS_BLOCK;
    if (status == 0 && projecting &&
        (axes < d - 1 || axes > MAX_AXES || FLOATS(mean) != dim ||
         axes_t.len != (Py_ssize_t)((int64_t)dim * width * (int64_t)sizeof(double)) ||
         (axes > d - 1) != (m.ext != NULL) || axes - (d - 1) > EXT_AXES))
        status = fail("exact_team: the projection does not match the coordinates");
    if (status == 0 && q.n > 0) {
        job = (ExactJob){{run_exact}, &m, q, projecting ? mean.buf : NULL, axes_t.buf, axes, width, d - 1,
                         (float *)q.coords, (float *)q.ext, (float *)q.ext_rest, {0, 0}, 0,
                         malloc(sizeof(float) * (size_t)(capacity * q.n * k)),
                         malloc(sizeof(uint16_t) * (size_t)(capacity * q.n)),
                         malloc(sizeof(float) * (size_t)(capacity * q.n)),
                         malloc(sizeof(int64_t) * LANES * (size_t)(capacity * q.n))};
        if (!job.outs || !job.needs || !job.q_sqs || !job.whos) {
            PyErr_NoMemory();
            status = -1;
        }
    }
    if (status == 0 && q.n > 0) {
        Py_BEGIN_ALLOW_THREADS
        members = team_run(&job.job, capacity);
        merge_members(job.outs, (int)members, q.n, k, q.out);
        Py_END_ALLOW_THREADS
    }
    free(job.outs);
    free(job.needs);
    free(job.q_sqs);
    free(job.whos);
    release(&mean, 1);
    release(&axes_t, 1);
    release(b, BUFFERS);
    if (status) return NULL;
    return PyLong_FromLongLong(members);
}

static PyObject *py_approximate_team(PyObject *self, PyObject *args) {
    Py_buffer b[BUFFERS], centroids, centroid_norms, centroid_tails, mean, axes_t;
    memset(b, 0, sizeof(b));
    Py_buffer *extra[] = {&centroids, &centroid_norms, &centroid_tails, &mean, &axes_t};
    for (int i = 0; i < 5; i++) memset(extra[i], 0, sizeof(Py_buffer));
    PyObject *shown, *coords, *tails, *mean_obj, *axes_obj;
    int d, dim, k, nprobe, candidates, axes;
    if (!PyArg_ParseTuple(args, "y*y*y*y*y*y*y*y*y*OiiOy*iiiw*OOOi", &b[PANELS], &b[NORMS], &b[LIST_START], &b[SLOTS],
                          &b[CENTRES], &b[RADIUS], &centroids, &centroid_norms, &b[BANK], &shown, &d, &dim, &coords,
                          &b[ROWS], &nprobe, &candidates, &k, &b[OUT], &tails, &mean_obj, &axes_obj, &axes))
        return NULL;
    int projecting = mean_obj != Py_None;
    Memory m;
    Queries q;
    ApproximateJob job;
    memset(&job, 0, sizeof(job));
    int64_t capacity = team_capacity(), members = 0;
    int status = optional(shown, b, SHOWN, PyBUF_SIMPLE) || optional(tails, &centroid_tails, 0, PyBUF_SIMPLE) ||
                 optional(coords, b, COORDS, projecting ? PyBUF_WRITABLE : PyBUF_SIMPLE) ||
                 optional(mean_obj, &mean, 0, PyBUF_SIMPLE) || optional(axes_obj, &axes_t, 0, PyBUF_SIMPLE) ? -1 : 0;
    if (status == 0) status = describe(b, d, dim, k, &m, &q);
    if (status == 0)
        status = check_approximate(b, &centroids, &centroid_norms, &centroid_tails, d, dim, k, nprobe, candidates, &m);
    if (status == 0 && projecting &&
        (axes != d - 1 || axes > MAX_AXES || FLOATS(mean) != dim ||
         FLOATS(axes_t) != (int64_t)dim * ((axes + AXIS_BLOCK - 1) / AXIS_BLOCK * AXIS_BLOCK)))
        status = fail("approximate_team: the projection does not match the coordinates");
    if (status == 0 && q.n > 0) {
        /* the first chunk is the largest (next_chunk) */
        int64_t most = capacity == 1 ? q.n : (q.n / capacity > MIN_CHUNK ? q.n / capacity : MIN_CHUNK);
        most = most < q.n ? most : q.n;
        size_t pairs = (size_t)(capacity * most * nprobe), kept = (size_t)(capacity * most * candidates);
        job = (ApproximateJob){{run_approximate}, &m, q, centroids.buf, centroid_norms.buf,
                               centroid_tails.obj ? centroid_tails.buf : NULL, nprobe, candidates,
                               projecting ? mean.buf : NULL, axes_t.buf, axes, (int)capacity, 0, most,
                               malloc(sizeof(float) * (size_t)(capacity * 2 * most)), malloc(sizeof(float) * pairs),
                               malloc(sizeof(float) * kept), malloc(sizeof(int32_t) * pairs),
                               malloc(sizeof(int32_t) * kept), malloc(sizeof(int64_t) * pairs),
                               malloc(sizeof(int64_t) * (size_t)(capacity * (m.lists + 1)))};
        if (!job.q_sq || !job.probe_sq || !job.cand_sq || !job.probes || !job.cand_pos || !job.order || !job.count) {
            PyErr_NoMemory();
            status = -1;
        }
    }
    if (status == 0 && q.n > 0) {
        Py_BEGIN_ALLOW_THREADS
        members = team_run(&job.job, capacity);
        Py_END_ALLOW_THREADS
    }
    free(job.q_sq);
    free(job.probe_sq);
    free(job.cand_sq);
    free(job.probes);
    free(job.cand_pos);
    free(job.order);
    free(job.count);
    for (int i = 0; i < 5; i++) release(extra[i], 1);
    release(b, BUFFERS);
    if (status) return NULL;
    return PyLong_FromLongLong(members);
}

static PyObject *py_helpers(PyObject *self, PyObject *unused) {
    (void)unused;
    return PyLong_FromLongLong(team_capacity() - 1);
}

static PyObject *py_set_helpers(PyObject *self, PyObject *args) {
    long long count;
    if (!PyArg_ParseTuple(args, "L", &count)) return NULL;
    int64_t running;
    Py_BEGIN_ALLOW_THREADS
    running = team_size(count);
    Py_END_ALLOW_THREADS
    return PyLong_FromLongLong(running);
}

static PyObject *py_approximate(PyObject *self, PyObject *args) {
    Py_buffer b[BUFFERS], centroids, centroid_norms, centroid_tails;
    memset(b, 0, sizeof(b));
    memset(&centroids, 0, sizeof(centroids));
    memset(&centroid_norms, 0, sizeof(centroid_norms));
    memset(&centroid_tails, 0, sizeof(centroid_tails));
    PyObject *shown, *tails;
    int d, dim, k, nprobe, candidates;
    if (!PyArg_ParseTuple(args, "y*y*y*y*y*y*y*y*y*Oiiy*y*iiiw*O", &b[PANELS], &b[NORMS], &b[LIST_START], &b[SLOTS],
                          &b[CENTRES], &b[RADIUS], &centroids, &centroid_norms, &b[BANK], &shown, &d, &dim,
                          &b[COORDS], &b[ROWS], &nprobe, &candidates, &k, &b[OUT], &tails))
        return NULL;
    Memory m;
    Queries q;
    float *q_sq = NULL, *cand_sq = NULL, *probe_sq = NULL;
    int32_t *cand_pos = NULL, *probes = NULL;
    int64_t *order = NULL, *count = NULL;
    int status = optional(shown, b, SHOWN, PyBUF_SIMPLE) || optional(tails, &centroid_tails, 0, PyBUF_SIMPLE) ? -1 : 0;
    if (status == 0) status = describe(b, d, dim, k, &m, &q);
    if (status == 0)
        status = check_approximate(b, &centroids, &centroid_norms, &centroid_tails, d, dim, k, nprobe, candidates, &m);
    if (status == 0 && q.n > 0) {
        q_sq = malloc(sizeof(float) * (size_t)(2 * q.n));
        probe_sq = malloc(sizeof(float) * (size_t)(q.n * nprobe));
        probes = malloc(sizeof(int32_t) * (size_t)(q.n * nprobe));
        cand_sq = malloc(sizeof(float) * (size_t)(q.n * candidates));
        cand_pos = malloc(sizeof(int32_t) * (size_t)(q.n * candidates));
        order = malloc(sizeof(int64_t) * (size_t)(q.n * nprobe));
        count = malloc(sizeof(int64_t) * (size_t)(m.lists + 1));
        if (!q_sq || !probe_sq || !probes || !cand_sq || !cand_pos || !order || !count) {
            PyErr_NoMemory();
            status = -1;
        }
    }
    if (status == 0 && q.n > 0) {
        Py_BEGIN_ALLOW_THREADS
        approximate(&m, &q, centroids.buf, centroid_norms.buf, centroid_tails.obj ? centroid_tails.buf : NULL, nprobe,
                    candidates, q_sq, probe_sq, probes, cand_sq, cand_pos, order, count);
        Py_END_ALLOW_THREADS
    }
    free(q_sq);
    free(probe_sq);
    free(probes);
    free(cand_sq);
    free(cand_pos);
    free(order);
    free(count);
    release(&centroids, 1);
    release(&centroid_norms, 1);
    release(&centroid_tails, 1);
    release(b, BUFFERS);
    if (status) return NULL;
    Py_RETURN_NONE;
}

static PyObject *py_project(PyObject *self, PyObject *args) {
    Py_buffer b[7];                                   /* rows, mean, axes_t, out, ext, rest, progress */
    memset(b, 0, sizeof(b));
    Py_buffer *rows = &b[0], *mean = &b[1], *axes_t = &b[2], *out = &b[3], *ext = &b[4], *rest = &b[5];
    Py_buffer *progress = &b[6];
    PyObject *ext_obj, *rest_obj, *progress_obj = Py_None;
    int dim, axes, precise, split;
    if (!PyArg_ParseTuple(args, "y*y*y*iipw*iOO|O", rows, mean, axes_t, &dim, &axes, &precise, out, &split, &ext_obj,
                          &rest_obj, &progress_obj))
        return NULL;
    int width = (axes + AXIS_BLOCK - 1) / AXIS_BLOCK * AXIS_BLOCK;
    int64_t n = dim > 0 ? FLOATS(*rows) / dim : 0;
    Py_ssize_t axis_size = precise ? (Py_ssize_t)sizeof(double) : (Py_ssize_t)sizeof(float);
    int status = 0;
    if (optional(ext_obj, b, 4, PyBUF_WRITABLE) || optional(rest_obj, b, 5, PyBUF_WRITABLE) ||
        optional(progress_obj, b, 6, PyBUF_WRITABLE))
        status = -1;
    else if (progress->obj && (progress->len != 2 * sizeof(int64_t) || (uintptr_t)progress->buf % sizeof(int64_t)))
        status = fail("project: progress takes two aligned int64");
    else if (dim <= 0 || axes <= 0 || axes > MAX_AXES || n * dim != FLOATS(*rows) || FLOATS(*mean) != dim ||
             axes_t->len != (Py_ssize_t)dim * width * axis_size || split <= 0 || split > axes ||
             FLOATS(*out) != n * (split + 1))
        status = fail("project: sizes do not match (or more than 64 axes)");
    else if (split < axes && (!precise || axes - split > EXT_AXES || !ext->obj || !rest->obj ||
                              FLOATS(*ext) != n * EXT_AXES || FLOATS(*rest) != n))
        status = fail("project: a split needs the precise mode, at most 32 axes past it and their outputs");
    if (status == 0) {
        Py_BEGIN_ALLOW_THREADS
        if (progress->obj)
            project_shared(rows->buf, n, dim, mean->buf, axes_t->buf, axes, width, precise, split, out->buf, ext->buf,
                           rest->buf, progress->buf);
        else if (precise)
            project_precise(rows->buf, n, dim, mean->buf, axes_t->buf, axes, width, split, out->buf, ext->buf,
                            rest->buf);
        else project(rows->buf, n, dim, mean->buf, axes_t->buf, axes, width, out->buf);
        Py_END_ALLOW_THREADS
    }
    release(b, 7);
    if (status) return NULL;
    Py_RETURN_NONE;
}

static PyObject *py_banded_product(PyObject *self, PyObject *args) {
    Py_buffer b[4];                                   /* left, bt, band, out */
    memset(b, 0, sizeof(b));
    Py_buffer *left = &b[0], *bt = &b[1], *band = &b[2], *out = &b[3];
    int w, W, b_first, b_last, add;
    long long first, end;
    if (!PyArg_ParseTuple(args, "y*y*y*iiLLiipw*", left, bt, band, &w, &W, &first, &end, &b_first, &b_last, &add, out))
        return NULL;
    int width = (W + LANES - 1) / LANES * LANES;
    int64_t H = W > 0 ? FLOATS(*out) / W : 0;
    int status = 0;
    if (w <= 0 || W <= 0 || H * W != FLOATS(*out) || first < 0 || first > end || end > H ||
        FLOATS(*left) != (end - first) * w || FLOATS(*bt) != (int64_t)w * width ||
        band->len != (Py_ssize_t)(2 * (width / LANES) * sizeof(int32_t)) || b_first < 0 || b_first > b_last ||
        b_last > width / LANES)
        status = fail("banded_product: sizes do not match");
    const int32_t *bands = band->buf;
    for (int b = 0; status == 0 && b < width / LANES; b++)
        if (bands[2 * b] < 0 || bands[2 * b] > bands[2 * b + 1] || bands[2 * b + 1] > w)
            status = fail("banded_product: a band outside the cells");
    if (status == 0) {
        Py_BEGIN_ALLOW_THREADS
        banded_product(left->buf, bt->buf, bands, first, end, b_first, b_last, add, w, W, width, out->buf);
        Py_END_ALLOW_THREADS
    }
    release(b, 4);
    if (status) return NULL;
    Py_RETURN_NONE;
}

static PyObject *py_at_or_above(PyObject *self, PyObject *args) {
    Py_buffer b[3];                                   /* values, chosen, out */
    memset(b, 0, sizeof(b));
    PyObject *chosen;
    float cut;
    if (!PyArg_ParseTuple(args, "y*Ofw*", &b[0], &chosen, &cut, &b[2])) return NULL;
    int64_t n = FLOATS(b[0]), count = 0;
    int status = optional(chosen, b, 1, PyBUF_SIMPLE);
    if (status == 0 && (FLOATS(b[2]) < n || (b[1].obj && b[1].len != n)))
        status = fail("at_or_above: sizes do not match");
    if (status == 0) {
        Py_BEGIN_ALLOW_THREADS
        count = at_or_above(b[0].buf, b[1].obj ? b[1].buf : NULL, n, cut, b[2].buf);
        Py_END_ALLOW_THREADS
    }
    release(b, 3);
    if (status) return NULL;
    return PyLong_FromLongLong(count);
}

static PyObject *py_cells_above(PyObject *self, PyObject *args) {
    Py_buffer b[7];                                   /* amap, chosen, y_first, y_last, x_first, x_last, out */
    memset(b, 0, sizeof(b));
    PyObject *chosen;
    long long H, W;
    float level;
    if (!PyArg_ParseTuple(args, "y*OLLfy*y*y*y*w*", &b[0], &chosen, &H, &W, &level, &b[2], &b[3], &b[4], &b[5], &b[6]))
        return NULL;
    int64_t h = INTS(b[2]), w = INTS(b[4]);
    int status = optional(chosen, b, 1, PyBUF_SIMPLE);
    if (status == 0 && (H <= 0 || W <= 0 || FLOATS(b[0]) != H * W || (b[1].obj && b[1].len != H * W) ||
                        INTS(b[3]) != h || INTS(b[5]) != w || b[6].len != h * w))
        status = fail("cells_above: sizes do not match");
    const int64_t *bounds[4] = {b[2].buf, b[3].buf, b[4].buf, b[5].buf};
    for (int64_t r = 0; status == 0 && r < h; r++)
        if (bounds[0][r] < 0 || bounds[0][r] > bounds[1][r] || bounds[1][r] > H || (r && (bounds[0][r] < bounds[0][r - 1] ||
                                                                                            bounds[1][r] < bounds[1][r - 1])))
            status = fail("cells_above: row bounds out of range or not rising");
    for (int64_t c = 0; status == 0 && c < w; c++)
        if (bounds[2][c] < 0 || bounds[2][c] > bounds[3][c] || bounds[3][c] > W) status = fail("cells_above: column bounds out of range");
    uint8_t *band = NULL, *hot = NULL;
    if (status == 0) {
        band = malloc((size_t)(h * W) + 1);
        hot = malloc((size_t)W);
        if (!band || !hot) {
            PyErr_NoMemory();
            status = -1;
        }
    }
    if (status == 0) {
        Py_BEGIN_ALLOW_THREADS
        cells_above(b[0].buf, b[1].obj ? b[1].buf : NULL, H, W, level, bounds[0], bounds[1], h, bounds[2], bounds[3], w,
                    band, hot, b[6].buf);
        Py_END_ALLOW_THREADS
    }
    free(band);
    free(hot);
    release(b, 7);
    if (status) return NULL;
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"approximate", py_approximate, METH_VARARGS,
     "approximate(panels, norms, list_start, slots, centres, radius, centroids, centroid_norms, bank, shown, d, dim, "
     "coords, rows, nprobe, candidates, k, out): the k smallest squared true distances among each query's "
     "candidates in its nprobe lists of nearest centroid (ascending, +inf where fewer)"},
    {"exact", py_exact, METH_VARARGS,
     "exact(panels, norms, list_start, slots, centres, radius, bank, shown, d, dim, coords, rows, reach_sq, k, first, end, "
     "out, ext, ext_rest, q_ext, q_ext_rest, taken): the k smallest squared true distances per query (ascending, +inf "
     "where fewer), over the lists first:end; the ext buffers (all four or None) give the second lower bound; taken "
     "(one int64, or None), shared by calls on several threads, gives each the panels of lists none has taken"},
    {"exact_team", py_exact_team, METH_VARARGS,
     "exact_team(panels, norms, list_start, slots, centres, radius, bank, shown, d, dim, coords, rows, reach_sq, k, out, "
     "ext, ext_rest, q_ext, q_ext_rest, mean, axes_t, axes): exact() over every list by the calling thread and the "
     "helpers; with mean and axes_t (float64) the rows are projected into coords (and q_ext, q_ext_rest) first; "
     "returns the threads that took part"},
    {"approximate_team", py_approximate_team, METH_VARARGS,
     "approximate_team(panels, norms, list_start, slots, centres, radius, centroids, centroid_norms, bank, shown, d, "
     "dim, coords, rows, nprobe, candidates, k, out, centroid_tails, mean, axes_t, axes): approximate() by the calling "
     "thread and the helpers, each taking chunks of queries; with mean and axes_t (float32) each chunk is projected "
     "into coords first; returns the threads that took part"},
    {"set_helpers", py_set_helpers, METH_VARARGS,
     "set_helpers(count): helper threads the team scans take from now on (at most 15); returns that number"},
    {"helpers", py_helpers, METH_NOARGS, "helpers(): helper threads the team scans take now"},
    {"project", py_project, METH_VARARGS,
     "project(rows, mean, axes_t, dim, axes, precise, out, split, ext, rest): the rows' coordinates on the first "
     "split axes (float32; computed in float64, axes_t in float64, where precise), the residual length last; with "
     "split < axes (precise), ext takes the other axes' coordinates and rest the residual past all of them; progress "
     "(two int64, zeros at first; optional), shared by calls on several threads, splits the rows between them, each "
     "returning once all are projected"},
    {"banded_product", py_banded_product, METH_VARARGS,
     "banded_product(left, bt, band, w, W, first, end, b_first, b_last, add, out): rows first:end of out = (or += "
     "with add) left @ bt[:, :W] in the column blocks b_first:b_last, each block over its band of bt's rows only"},
    {"at_or_above", py_at_or_above, METH_VARARGS,
     "at_or_above(values, chosen, cut, out): out[:count] = the float32 values >= cut where chosen (uint8; None = all), "
     "in order; returns count"},
    {"cells_above", py_cells_above, METH_VARARGS,
     "cells_above(amap, chosen, H, W, level, y_first, y_last, x_first, x_last, out): out (h, w) uint8 = 1 where the "
     "pixels y_first[r]:y_last[r], x_first[c]:x_last[c] of amap (H, W) hold one >= level (and chosen)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_ivfscan", "Scans of the projected inverted file.",
                                    -1, methods};

/* whether this CPU runs the scans fast: GCC's generic vectors need AVX2 (on x86 without it they
   run ~14x slower than with it, far behind numpy); other targets are not measured */
static int fast_here(void) {
#if (defined(__GNUC__) || defined(__clang__)) && (defined(__x86_64__) || defined(__i386__))
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") != 0;
#else
    return 0;
#endif
}

PyMODINIT_FUNC PyInit__ivfscan(void) {
    PyObject *m = PyModule_Create(&module);
    if (m && (PyModule_AddIntConstant(m, "LANES", LANES) < 0 || PyModule_AddIntConstant(m, "FAST", fast_here()) < 0 ||
              PyModule_AddIntConstant(m, "AXIS_BLOCK", AXIS_BLOCK) < 0 || PyModule_AddIntConstant(m, "MAX_AXES", MAX_AXES) < 0 ||
              PyModule_AddIntConstant(m, "EXT_AXES", EXT_AXES) < 0 || PyModule_AddIntConstant(m, "SPLIT", SPLIT) < 0 ||
              PyModule_AddIntConstant(m, "HELPERS", HELPERS) < 0)) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
