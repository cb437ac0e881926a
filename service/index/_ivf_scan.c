/* The IVF base's search: each query scans the rows of its probed lists in every shard and keeps its
 * best k, skipping its banned ids, in one call for the batch and all shards.
 *
 * A shard holds its rows list by list in the kernel's panels (service/index/ivf_lists.py): list l's rows
 * fill panels starts[l] .. starts[l+1], 16 rows a panel, the last one padded. Rows are the index's
 * [v; b] as stored, not the lifted rows the lists were trained on, so a score is the exact h·v + b,
 * summed as service/index/_scoring.c sums it (index order, float32, no FMA): an item scores the same
 * in an IVF shard as in any exact segment, bit for bit, whatever the batch.
 *
 * Queries probe different lists, so the queries of a batch share no panels: each query is scored
 * on its own, 4 panels at a time (4 independent accumulators keep the vector units busy).
 * The best k are kept as rows arrive (`Best`, _scoring.h); a block of 16 that holds nothing at or
 * above the k-th score so far costs one vector compare. Ids are tested against the query's banned
 * ids only when a row would be kept.
 */
#include "_scoring.h"

#include <string.h>

#define BLOCK 4 /* panels scored together */

/* Scores of one query q (d) against `count` <= BLOCK consecutive panels, into out (16 per panel);
 * returns a bit mask of the panels with a score at or above `low` (padding lanes included: a false
 * alarm costs only a look at that panel's rows). */
CLONES static unsigned score_block(const float *q, const float *panels, Py_ssize_t count, Py_ssize_t d, float low,
                                   float *out) {
    const Py_ssize_t step = d * PANEL;
    v16 acc[BLOCK];
    if (count == BLOCK) {
        const float *p0 = panels, *p1 = p0 + step, *p2 = p1 + step, *p3 = p2 + step;
        v16 a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0};
        for (Py_ssize_t j = 0; j < d; j++) {
            v16 x0, x1, x2, x3;
            memcpy(&x0, p0 + j * PANEL, sizeof x0);
            memcpy(&x1, p1 + j * PANEL, sizeof x1);
            memcpy(&x2, p2 + j * PANEL, sizeof x2);
            memcpy(&x3, p3 + j * PANEL, sizeof x3);
            a0 += x0 * q[j];
            a1 += x1 * q[j];
            a2 += x2 * q[j];
            a3 += x3 * q[j];
        }
        acc[0] = a0, acc[1] = a1, acc[2] = a2, acc[3] = a3;
    } else {
        for (Py_ssize_t p = 0; p < count; p++) {
            const float *panel = panels + p * step;
            v16 a = {0};
            for (Py_ssize_t j = 0; j < d; j++) {
                v16 x;
                memcpy(&x, panel + j * PANEL, sizeof x);
                a += x * q[j];
            }
            acc[p] = a;
        }
    }
    unsigned mask = 0;
    for (Py_ssize_t p = 0; p < count; p++) {
        memcpy(out + p * PANEL, &acc[p], sizeof acc[p]);
        v16i hit = acc[p] >= low; /* NaN never reaches */
        int any = 0;
        for (int i = 0; i < PANEL; i++) any |= hit[i];
        mask |= (unsigned)(any != 0) << p;
    }
    return mask;
}

/* one query's banned keys (query << 40 | id), ascending */
typedef struct {
    const int64_t *keys;
    Py_ssize_t n;
    int64_t base;
} Ban;

static int is_banned(const Ban *ban, int64_t iid) {
    int64_t key = ban->base | iid;
    Py_ssize_t lo = 0, hi = ban->n;
    while (lo < hi) {
        Py_ssize_t mid = (lo + hi) / 2;
        if (ban->keys[mid] < key) lo = mid + 1;
        else hi = mid;
    }
    return lo < ban->n && ban->keys[lo] == key;
}

/* Offer rows scores[0:n) with ids iids[0:n) (n <= 16); 0, or -1 when out of memory. */
static int offer(Best *b, const Ban *ban, const float *scores, const int64_t *iids, Py_ssize_t n) {
    for (Py_ssize_t i = 0; i < n; i++)
        if (best_wants(b, scores[i]) && !(ban->n && is_banned(ban, iids[i])) && best_push(b, scores[i], iids[i]) < 0)
            return -1;
    return 0;
}

typedef struct {
    Py_buffer panels, starts, rows, iids;
    Py_ssize_t nlist;
} ShardView;

static void release_shards(ShardView *views, Py_ssize_t n) {
    for (Py_ssize_t s = 0; s < n; s++) {
        Py_buffer *b[] = {&views[s].panels, &views[s].starts, &views[s].rows, &views[s].iids};
        for (int i = 0; i < 4; i++)
            if (b[i]->obj != NULL) PyBuffer_Release(b[i]);
    }
}

/* The buffers of shard (panels, starts, rows, slot ids), checked against dimension d; -1 on error. */
static int shard_view(PyObject *shard, Py_ssize_t d, ShardView *v) {
    if (!PyTuple_Check(shard) || PyTuple_GET_SIZE(shard) != 4) {
        PyErr_SetString(PyExc_TypeError, "each shard is a tuple (panels, starts, rows, slot_iids)");
        return -1;
    }
    if (PyObject_GetBuffer(PyTuple_GET_ITEM(shard, 0), &v->panels, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT) < 0) return -1;
    Py_buffer *p = &v->panels;
    if (p->ndim != 3 || p->itemsize != 4 || strcmp(p->format, "f") != 0 || p->shape[1] != d || p->shape[2] != PANEL) {
        PyErr_Format(PyExc_ValueError, "a shard's panels must be a C-contiguous (P, %zd, 16) float32 array", d);
        return -1;
    }
    PyObject *starts = PyTuple_GET_ITEM(shard, 1);
    Py_ssize_t nlist = PyObject_Length(starts) - 1;
    if (nlist < 0) {
        if (!PyErr_Occurred()) PyErr_SetString(PyExc_ValueError, "a shard's starts must hold nlist + 1 offsets");
        return -1;
    }
    v->nlist = nlist;
    if (vector_of(starts, &v->starts, 0, "i8", nlist + 1, "starts") < 0) return -1;
    if (vector_of(PyTuple_GET_ITEM(shard, 2), &v->rows, 0, "i8", nlist, "rows") < 0) return -1;
    if (vector_of(PyTuple_GET_ITEM(shard, 3), &v->iids, 0, "i8", p->shape[0] * PANEL, "slot_iids") < 0) return -1;
    return 0;
}

/* whether list l of shard v lies inside its panels (checked for the probed lists only: a whole
 * shard's check is nlist steps per call) */
static int list_fits(const ShardView *v, int64_t l) {
    const int64_t *st = v->starts.buf, *rows = v->rows.buf;
    return st[l] >= 0 && st[l + 1] >= st[l] && st[l + 1] <= v->panels.shape[0] && rows[l] >= 0 &&
           rows[l] <= (st[l + 1] - st[l]) * PANEL;
}

/* One query's probed lists in every shard into b (best first, ties by id), rows below `floor` left
 * out; returns the candidates in b, or -1 (out of memory). *scanned: rows scored. */
static Py_ssize_t search_one(const float *q, Py_ssize_t d, const int64_t *lists, Py_ssize_t nprobe,
                             const ShardView *shards, Py_ssize_t n_shards, const Ban *ban, float floor, Best *b,
                             Py_ssize_t *scanned) {
    float scores[BLOCK * PANEL];
    best_reset(b);
    if (floor > -INFINITY) { /* nothing below the floor is wanted, however few rows reach it */
        b->low = floor;
        b->full = 1;
    }
    *scanned = 0;
    for (Py_ssize_t p = 0; p < nprobe; p++) {
        int64_t l = lists[p];
        for (Py_ssize_t s = 0; s < n_shards; s++) {
            const ShardView *v = &shards[s];
            if (l < 0 || l >= v->nlist) continue; /* -1 pads a query with fewer lists */
            const int64_t first = ((const int64_t *)v->starts.buf)[l], end = ((const int64_t *)v->starts.buf)[l + 1];
            Py_ssize_t left = ((const int64_t *)v->rows.buf)[l];
            const float *panels = (const float *)v->panels.buf;
            const int64_t *ids = (const int64_t *)v->iids.buf;
            *scanned += left;
            for (int64_t at = first; at < end && left > 0; at += BLOCK) {
                Py_ssize_t count = end - at < BLOCK ? end - at : BLOCK;
                unsigned reach = score_block(q, panels + at * d * PANEL, count, d, b->full ? b->low : -INFINITY,
                                             scores);
                for (Py_ssize_t i = 0; i < count && left > 0; i++) {
                    Py_ssize_t n = left < PANEL ? left : PANEL;
                    if ((reach >> i & 1) && offer(b, ban, scores + i * PANEL, ids + (at + i) * PANEL, n) < 0)
                        return -1;
                    left -= n;
                }
            }
        }
    }
    return best_finish(b);
}

const char ivf_search_doc[] =
"ivf_search(queries, lists, shards, banned_keys, k, floors, out_scores, out_iids, out_count, out_bound)\n\n"
"For each query (B, d) float32: the k best rows of its lists (B, nprobe) int64 (-1: none) in every\n"
"shard, a tuple (panels (P, d, 16) float32, starts (nlist+1,) int64 panel offsets, rows (nlist,) int64\n"
"rows per list, slot_iids (16P,) int64), leaving out the ids among its banned_keys (sorted int64,\n"
"query << 40 | id) and the rows scoring below its floor (floors (B,) float32; -inf: none), with\n"
"every row tied with the k-th score, best first (ties by id), into out_scores (B, C) float32 and\n"
"out_iids (B, C) int64 padded with -inf / -1; out_count (B,) int64 how many there are (more than C:\n"
"call again with more room); out_bound (B,) float32, when rows were left out, the k-th score (the\n"
"floor if fewer reached it), else -inf. Scores equal inner_products'. Runs without the GIL.";

PyObject *ivf_search(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    if (nargs != 10) {
        PyErr_SetString(PyExc_TypeError, "ivf_search takes 10 arguments");
        return NULL;
    }
    Py_ssize_t k = PyLong_AsSsize_t(args[4]);
    if (k == -1 && PyErr_Occurred()) return NULL;
    PyObject *shard_seq = PySequence_Fast(args[2], "shards must be a sequence");
    if (shard_seq == NULL) return NULL;
    Py_ssize_t n_shards = PySequence_Fast_GET_SIZE(shard_seq);
    ShardView *shards = calloc((size_t)(n_shards ? n_shards : 1), sizeof(ShardView));
    Py_buffer q = {0}, lists = {0}, ban = {0}, fl = {0};
    BestOut out = {0};
    PyObject *result = NULL;
    Cand *sel = NULL;
    if (shards == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    if (get_matrix(args[0], &q, 0, "queries") < 0) goto done;
    Py_ssize_t nq = q.shape[0], d = q.shape[1];
    if (PyObject_GetBuffer(args[1], &lists, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT) < 0) goto done;
    if (lists.ndim != 2 || lists.shape[0] != nq || lists.itemsize != 8 || strchr("lq", lists.format[0]) == NULL) {
        PyErr_Format(PyExc_ValueError, "lists must be a C-contiguous (%zd, nprobe) int64 array", nq);
        goto done;
    }
    Py_ssize_t nprobe = lists.shape[1];
    for (Py_ssize_t s = 0; s < n_shards; s++)
        if (shard_view(PySequence_Fast_GET_ITEM(shard_seq, s), d, &shards[s]) < 0) goto done;
    const int64_t *probes = lists.buf;
    for (Py_ssize_t i = 0; i < nq * nprobe; i++)
        for (Py_ssize_t s = 0; s < n_shards; s++)
            if (probes[i] >= 0 && probes[i] < shards[s].nlist && !list_fits(&shards[s], probes[i])) {
                PyErr_Format(PyExc_ValueError, "shard %zd's list %lld does not fit its panels", s, (long long)probes[i]);
                goto done;
            }
    Py_ssize_t n_keys = PyObject_Length(args[3]);
    if (n_keys < 0 || vector_of(args[3], &ban, 0, "i8", n_keys, "banned_keys") < 0) goto done;
    if (vector_of(args[5], &fl, 0, "f4", nq, "floors") < 0) goto done;
    if (best_out_get(args + 6, nq, k, &out, "ivf_search") < 0) goto done;
    Best best;
    if (best_init(&best, k) < 0) {
        PyErr_NoMemory();
        goto done;
    }
    sel = best.buf;
    const int64_t *keys = ban.buf;
    int failed = 0;
    Py_BEGIN_ALLOW_THREADS
    Py_ssize_t first_ban = 0;
    for (Py_ssize_t b = 0; b < nq; b++) {
        const int64_t base = (int64_t)b << 40;
        while (first_ban < n_keys && keys[first_ban] < base) first_ban++;
        Py_ssize_t end_ban = first_ban;
        while (end_ban < n_keys && keys[end_ban] < base + ((int64_t)1 << 40)) end_ban++;
        Ban query_ban = {keys + first_ban, end_ban - first_ban, base};
        const float *query = (const float *)((const char *)q.buf + b * q.strides[0]);
        Py_ssize_t scanned;
        float floor = ((const float *)fl.buf)[b];
        Py_ssize_t got = search_one(query, d, (const int64_t *)lists.buf + b * nprobe, nprobe, shards, n_shards,
                                    &query_ban, floor, &best, &scanned);
        sel = best.buf; /* ties may have grown it */
        if (got < 0) {
            failed = 1;
            break;
        }
        /* the k-th score, or the floor when fewer reached it, if rows were left out */
        float bound = scanned == got ? -INFINITY : got >= k ? sel[k - 1].score : floor;
        best_out_row(&out, b, sel, got, NULL, got, bound);
        first_ban = end_ban;
    }
    Py_END_ALLOW_THREADS
    if (failed) {
        PyErr_NoMemory();
        goto done;
    }
    result = Py_NewRef(Py_None);
done:
    free(sel);
    if (shards != NULL) release_shards(shards, n_shards);
    free(shards);
    Py_DECREF(shard_seq);
    best_out_release(&out);
    Py_buffer *views[] = {&q, &lists, &ban, &fl};
    for (size_t i = 0; i < sizeof views / sizeof views[0]; i++)
        if (views[i]->obj != NULL) PyBuffer_Release(views[i]);
    return result;
}
