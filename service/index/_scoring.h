/* What service/index/_scoring.c and service/index/_ivf_scan.c share: one extension module, two sources. */
#ifndef M2REC_SCORING_H
#define M2REC_SCORING_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#define PANEL 16 /* rows scored together: one 16-lane vector */

typedef float v16 __attribute__((vector_size(PANEL * sizeof(float))));
typedef int v16i __attribute__((vector_size(PANEL * sizeof(int)))); /* a v16 comparison: -1 or 0 per lane */

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define CLONES
#endif

/* A 2-D float32 buffer with contiguous rows (writable on request), or -1 and a ValueError naming it. */
int get_matrix(PyObject *obj, Py_buffer *view, int writable, const char *name);

/* A 1-D C-contiguous buffer of n int64 ("i8") or float32 ("f4") values, or -1 and a ValueError. */
int vector_of(PyObject *obj, Py_buffer *view, int writable, const char *fmt, Py_ssize_t n, const char *name);

/* ---- the best k of a stream of scored candidates ---------------------------------------------
 * Candidates at or above `low` are appended to a buffer; when it fills, a quickselect finds the k-th
 * best score, which becomes `low`, and everything below it is dropped. Each candidate costs a
 * compare and a store (a heap paid a sift and a mispredicted branch or two per entry). Every
 * candidate tied with the k-th score is kept: callers rank ties by id, so which of them make the
 * cut must not depend on the order of arrival. */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

typedef struct {
    float score;
    int64_t id;
} Cand;

typedef struct {
    Cand *buf;
    Py_ssize_t n, room, k;
    float low; /* the k-th best score once known, else -inf (and -inf itself is never kept) */
    int full;  /* low is a k-th best score */
} Best;

/* reorders a[0:n) so that a[want] holds the (want+1)-th largest score; returns it */
static inline float nth_largest(Cand *a, Py_ssize_t n, Py_ssize_t want) {
    Py_ssize_t lo = 0, hi = n - 1;
    while (lo < hi) {
        float pivot = a[lo + (hi - lo) / 2].score;
        Py_ssize_t i = lo, j = hi;
        while (i <= j) {
            while (a[i].score > pivot) i++;
            while (a[j].score < pivot) j--;
            if (i <= j) {
                Cand t = a[i];
                a[i++] = a[j];
                a[j--] = t;
            }
        }
        if (want <= j) hi = j;
        else if (want >= i) lo = i;
        else break;
    }
    return a[want].score;
}

/* Keep only the candidates at or above the k-th best score; grows the buffer when ties fill half
 * of it. 0, or -1 when out of memory. */
static inline int best_compact(Best *b) {
    if (b->n < b->k) return 0;
    float low = nth_largest(b->buf, b->n, b->k - 1);
    Py_ssize_t kept = 0;
    for (Py_ssize_t i = 0; i < b->n; i++)
        if (b->buf[i].score >= low) b->buf[kept++] = b->buf[i];
    b->n = kept, b->low = low, b->full = 1;
    if (kept > b->room / 2) {
        Cand *grown = realloc(b->buf, (size_t)(2 * b->room) * sizeof(Cand));
        if (grown == NULL) return -1;
        b->buf = grown, b->room *= 2;
    }
    return 0;
}

static inline int best_init(Best *b, Py_ssize_t k) {
    b->room = 2 * k + 32;
    b->buf = malloc((size_t)b->room * sizeof(Cand));
    b->n = 0, b->k = k, b->low = -INFINITY, b->full = 0;
    return b->buf == NULL ? -1 : 0;
}

static inline void best_reset(Best *b) { b->n = 0, b->low = -INFINITY, b->full = 0; }

/* whether a score may enter (NaN never does) */
static inline int best_wants(const Best *b, float s) { return b->full ? s >= b->low : s > -INFINITY; }

/* 0, or -1 when out of memory */
static inline int best_push(Best *b, float s, int64_t id) {
    b->buf[b->n++] = (Cand){s, id};
    return b->n == b->room ? best_compact(b) : 0;
}

static inline int by_rank(const void *x, const void *y) {
    const Cand *a = x, *b = y;
    if (a->score != b->score) return a->score > b->score ? -1 : 1;
    return (a->id > b->id) - (a->id < b->id);
}

/* The best k and their ties, best first (ties by id) in buf[0:n); returns n, or -1 (out of memory). */
static inline Py_ssize_t best_finish(Best *b) {
    if (b->n > b->k && best_compact(b) < 0) return -1;
    Cand *a = b->buf;
    if (b->n > 64) {
        qsort(a, b->n, sizeof(Cand), by_rank);
        return b->n;
    }
    for (Py_ssize_t i = 1; i < b->n; i++) { /* insertion sort: a few dozen candidates */
        Cand c = a[i];
        Py_ssize_t j = i;
        while (j > 0 && by_rank(&c, &a[j - 1]) < 0) {
            a[j] = a[j - 1];
            j--;
        }
        a[j] = c;
    }
    return b->n;
}

/* The outputs of a best-k call: out_scores (B, C) float32, out_iids (B, C) int64, out_count (B,)
 * int64 and out_bound (B,) float32, taken from args[0..3]. */
typedef struct {
    Py_buffer scores, iids, count, bound;
    Py_ssize_t cap; /* C */
} BestOut;

/* 0, or -1 with an exception (a ValueError naming `fn` when the shapes do not fit k) */
int best_out_get(PyObject *const *args, Py_ssize_t nq, Py_ssize_t k, BestOut *out, const char *fn);
void best_out_release(BestOut *out);
/* Row b: sel[0:got) (ids mapped through `ids` unless NULL) padded with -inf / -1; count and bound. */
void best_out_row(const BestOut *out, Py_ssize_t b, const Cand *sel, Py_ssize_t got, const int64_t *ids,
                  int64_t count, float bound);

extern const char ivf_search_doc[];
PyObject *ivf_search(PyObject *self, PyObject *const *args, Py_ssize_t nargs);

#endif
