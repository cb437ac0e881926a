/* Exact inner products of a batch of queries with a block of rows, for the index's exact segments.
 *
 * out[b, r] = sum over j = 0..d-1, in that order, of (q[b, j] * x[r, j]) with every product and
 * every partial sum rounded to float32 (no FMA, no reassociation: built with -ffp-contract=off).
 * So a score depends only on its query and its row: never on the other queries of the batch,
 * the row's place in the block or the CPU's vector width, and equals the NumPy reference
 * (tests/test_scoring.py). Fast because rows are scored 16 at a time against 4 queries at a time
 * in registers (a row panel transposed into a small buffer), the way a BLAS kernel is, without
 * BLAS's summation order that changes with the batch.
 */
#include "_scoring.h"

#include <stdlib.h>
#include <string.h>

#define GROUP 4  /* queries scored together: 4 accumulators */

/* Scores of queries q (whole groups of GROUP, padded) against one panel: rows transposed as
 * panel[j * PANEL + i] = row i's j-th value, nr <= PANEL rows valid (the rest zeros). */
CLONES static void score_panel(const float *q, Py_ssize_t nq, const float *panel, Py_ssize_t nr, Py_ssize_t d,
                               float *out, Py_ssize_t out_stride) {
    for (Py_ssize_t b0 = 0; b0 < nq; b0 += GROUP) {
        /* q is padded to a multiple of GROUP queries: the tail group runs the same code */
        const float *q0 = q + b0 * d, *q1 = q0 + d, *q2 = q1 + d, *q3 = q2 + d;
        v16 a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0};
        for (Py_ssize_t j = 0; j < d; j++) {
            v16 xv;
            memcpy(&xv, panel + j * PANEL, sizeof xv);
            a0 += xv * q0[j];
            a1 += xv * q1[j];
            a2 += xv * q2[j];
            a3 += xv * q3[j];
        }
        v16 acc[GROUP] = {a0, a1, a2, a3};
        for (Py_ssize_t t = 0; t < GROUP && b0 + t < nq; t++)
            memcpy(out + (b0 + t) * out_stride, &acc[t], nr * sizeof(float));
    }
}

/* Rows x (n, d) row-major: each panel is transposed into `panel` first. */
static void score_rows(const float *q, Py_ssize_t nq, const float *x, Py_ssize_t x_stride, Py_ssize_t n,
                       Py_ssize_t d, float *out, Py_ssize_t out_stride, float *panel) {
    for (Py_ssize_t r0 = 0; r0 < n; r0 += PANEL) {
        Py_ssize_t nr = n - r0 < PANEL ? n - r0 : PANEL;
        for (Py_ssize_t i = 0; i < PANEL; i++) {
            if (i < nr) {
                const float *row = x + (r0 + i) * x_stride;
                for (Py_ssize_t j = 0; j < d; j++) panel[j * PANEL + i] = row[j];
            } else {
                for (Py_ssize_t j = 0; j < d; j++) panel[j * PANEL + i] = 0.0f;
            }
        }
        score_panel(q, nq, panel, nr, d, out + r0, out_stride);
    }
}

int get_matrix(PyObject *obj, Py_buffer *view, int writable, const char *name) {
    int flags = PyBUF_STRIDES | PyBUF_FORMAT | (writable ? PyBUF_WRITABLE : 0);
    if (PyObject_GetBuffer(obj, view, flags) < 0) return -1;
    if (view->ndim != 2 || view->itemsize != 4 || strcmp(view->format, "f") != 0 ||
        view->strides[1] != 4 || view->strides[0] % 4 != 0 || view->strides[0] < view->shape[1] * 4) {
        PyErr_Format(PyExc_ValueError, "%s must be a 2-D float32 array with contiguous rows", name);
        PyBuffer_Release(view);
        return -1;
    }
    return 0;
}

/* queries with contiguous rows, padded with zero queries to whole groups, in a new buffer of
 * `padded * d + extra` floats (NULL and an exception when out of memory) */
static float *padded_queries(const Py_buffer *q, Py_ssize_t extra) {
    Py_ssize_t nq = q->shape[0], d = q->shape[1], padded = (nq + GROUP - 1) / GROUP * GROUP;
    float *buf = calloc((size_t)(padded * d + extra), sizeof(float));
    if (buf == NULL) {
        PyErr_NoMemory();
        return NULL;
    }
    for (Py_ssize_t b = 0; b < nq; b++) memcpy(buf + b * d, (const char *)q->buf + b * q->strides[0], d * sizeof(float));
    return buf;
}

PyDoc_STRVAR(inner_products_doc,
"inner_products(queries, rows, out)\n\n"
"out[b, r] = queries[b] . rows[r] for queries (B, d) and rows (n, d), into out (B, >= n) float32\n"
"(rows may be a column slice of a larger matrix). Each score is summed in index order without\n"
"FMA, so it depends only on its query and row. Runs without the GIL.");

static PyObject *inner_products(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "inner_products(queries, rows, out) takes 3 arguments");
        return NULL;
    }
    Py_buffer q, x, out;
    if (get_matrix(args[0], &q, 0, "queries") < 0) return NULL;
    if (get_matrix(args[1], &x, 0, "rows") < 0) { PyBuffer_Release(&q); return NULL; }
    if (get_matrix(args[2], &out, 1, "out") < 0) { PyBuffer_Release(&q); PyBuffer_Release(&x); return NULL; }
    Py_ssize_t nq = q.shape[0], d = q.shape[1], n = x.shape[0];
    PyObject *result = NULL;
    if (x.shape[1] != d || out.shape[0] != nq || out.shape[1] < n) {
        PyErr_Format(PyExc_ValueError, "shapes do not match: queries (%zd, %zd), rows (%zd, %zd), out (%zd, %zd)",
                     nq, d, n, x.shape[1], out.shape[0], out.shape[1]);
        goto done;
    }
    if (nq == 0 || n == 0 || d == 0) {
        if (d == 0)
            for (Py_ssize_t b = 0; b < nq; b++)
                memset((char *)out.buf + b * out.strides[0], 0, n * sizeof(float));
        result = Py_NewRef(Py_None);
        goto done;
    }
    Py_ssize_t padded = (nq + GROUP - 1) / GROUP * GROUP;
    float *scratch = padded_queries(&q, PANEL * d);  /* the queries, then room for one panel */
    if (scratch == NULL) goto done;
    Py_BEGIN_ALLOW_THREADS
    score_rows(scratch, nq, x.buf, x.strides[0] / 4, n, d, out.buf, out.strides[0] / 4, scratch + padded * d);
    Py_END_ALLOW_THREADS
    free(scratch);
    result = Py_NewRef(Py_None);
done:
    PyBuffer_Release(&q);
    PyBuffer_Release(&x);
    PyBuffer_Release(&out);
    return result;
}


PyDoc_STRVAR(inner_products_panels_doc,
"inner_products_panels(queries, panels, n, out)\n\n"
"inner_products with the rows already in panels (P, d, 16): panels[p, j, i] is row 16p+i's j-th\n"
"value (zeros past the last row), n <= 16P rows. Same scores, without transposing the rows.");

static PyObject *inner_products_panels(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    if (nargs != 4) {
        PyErr_SetString(PyExc_TypeError, "inner_products_panels(queries, panels, n, out) takes 4 arguments");
        return NULL;
    }
    Py_ssize_t n = PyLong_AsSsize_t(args[2]);
    if (n == -1 && PyErr_Occurred()) return NULL;
    Py_buffer q, p, out;
    if (get_matrix(args[0], &q, 0, "queries") < 0) return NULL;
    if (PyObject_GetBuffer(args[1], &p, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT) < 0) { PyBuffer_Release(&q); return NULL; }
    if (get_matrix(args[3], &out, 1, "out") < 0) { PyBuffer_Release(&q); PyBuffer_Release(&p); return NULL; }
    PyObject *result = NULL;
    Py_ssize_t nq = q.shape[0], d = q.shape[1];
    if (p.ndim != 3 || p.itemsize != 4 || strcmp(p.format, "f") != 0 || p.shape[2] != PANEL) {
        PyErr_SetString(PyExc_ValueError, "panels must be a C-contiguous (P, d, 16) float32 array");
        goto done;
    }
    if (p.shape[1] != d || n < 0 || n > p.shape[0] * PANEL || out.shape[0] != nq || out.shape[1] < n) {
        PyErr_Format(PyExc_ValueError, "shapes do not match: queries (%zd, %zd), panels (%zd, %zd, 16) for %zd rows, "
                     "out (%zd, %zd)", nq, d, p.shape[0], p.shape[1], n, out.shape[0], out.shape[1]);
        goto done;
    }
    if (nq > 0 && n > 0) {
        float *scratch = padded_queries(&q, 0);
        if (scratch == NULL) goto done;
        const float *panels = p.buf;
        float *o = out.buf;
        Py_ssize_t stride = out.strides[0] / 4;
        Py_BEGIN_ALLOW_THREADS
        for (Py_ssize_t r0 = 0; r0 < n; r0 += PANEL)
            score_panel(scratch, nq, panels + (r0 / PANEL) * d * PANEL, n - r0 < PANEL ? n - r0 : PANEL, d,
                        o + r0, stride);
        Py_END_ALLOW_THREADS
        free(scratch);
    }
    result = Py_NewRef(Py_None);
done:
    PyBuffer_Release(&q);
    PyBuffer_Release(&p);
    PyBuffer_Release(&out);
    return result;
}



/* ---- the best k of each row of a score matrix ------------------------------------------------ */

/* One row's best k and every value tied with the k-th, best first (ties by column), in b->buf;
 * returns how many, or -1 when out of memory. -inf and NaN are never selected.
 *
 * Two passes. The first takes each block of 16's largest value: the k-th largest of those is a
 * lower bound of the row's k-th largest (k distinct values reach it), so the second pass visits only
 * blocks whose largest reaches the bound (and the k-th best so far, as it rises). Without it the
 * bound starts at -inf, and a row whose best values come late (the exact group puts the long
 * overflow rows after the pinned ones) pushed most of its values through the selection.
 * `maxes` and `spare` have room for one value per block. */
CLONES static Py_ssize_t select_row(const float *row, Py_ssize_t n, Best *b, float *maxes, Cand *spare) {
    best_reset(b);
    Py_ssize_t blocks = (n + PANEL - 1) / PANEL, finite = 0;
    for (Py_ssize_t j = 0; j < blocks; j++) {
        const float *block = row + j * PANEL;
        Py_ssize_t m = n - j * PANEL < PANEL ? n - j * PANEL : PANEL;
        float top = -INFINITY;
        for (Py_ssize_t i = 0; i < m; i++) top = block[i] > top ? block[i] : top; /* NaN never wins */
        maxes[j] = top;
        if (top > -INFINITY) spare[finite++].score = top;
    }
    if (finite >= b->k) {
        b->low = nth_largest(spare, finite, b->k - 1);
        b->full = 1;
    }
    for (Py_ssize_t j = 0; j < blocks; j++) {
        if (!best_wants(b, maxes[j])) continue;
        const float *block = row + j * PANEL;
        Py_ssize_t m = n - j * PANEL < PANEL ? n - j * PANEL : PANEL;
        for (Py_ssize_t i = 0; i < m; i++)
            if (best_wants(b, block[i]) && best_push(b, block[i], j * PANEL + i) < 0) return -1;
    }
    return best_finish(b);
}

int best_out_get(PyObject *const *args, Py_ssize_t nq, Py_ssize_t k, BestOut *out, const char *fn) {
    if (get_matrix(args[0], &out->scores, 1, "out_scores") < 0) return -1;
    out->cap = out->scores.shape[1];
    if (PyObject_GetBuffer(args[1], &out->iids, PyBUF_STRIDES | PyBUF_FORMAT | PyBUF_WRITABLE) < 0) return -1;
    if (vector_of(args[2], &out->count, 1, "i8", nq, "out_count") < 0) return -1;
    if (vector_of(args[3], &out->bound, 1, "f4", nq, "out_bound") < 0) return -1;
    const Py_buffer *i = &out->iids;
    if (k < 1 || out->cap < k || out->scores.shape[0] != nq || i->ndim != 2 || i->shape[0] != nq ||
        i->shape[1] != out->cap || i->itemsize != 8 || strchr("lq", i->format[0]) == NULL || i->strides[1] != 8) {
        PyErr_Format(PyExc_ValueError, "%s: need 1 <= k <= C, out_scores float32 (B, C) and out_iids int64 (B, C)", fn);
        return -1;
    }
    return 0;
}

void best_out_release(BestOut *out) {
    Py_buffer *views[] = {&out->scores, &out->iids, &out->count, &out->bound};
    for (size_t v = 0; v < sizeof views / sizeof views[0]; v++)
        if (views[v]->obj != NULL) PyBuffer_Release(views[v]);
}

void best_out_row(const BestOut *out, Py_ssize_t b, const Cand *sel, Py_ssize_t got, const int64_t *ids,
                  int64_t count, float bound) {
    float *row_s = (float *)((char *)out->scores.buf + b * out->scores.strides[0]);
    int64_t *row_i = (int64_t *)((char *)out->iids.buf + b * out->iids.strides[0]);
    for (Py_ssize_t c = 0; c < out->cap; c++) {
        row_s[c] = c < got ? sel[c].score : -INFINITY;
        row_i[c] = c < got ? (ids != NULL ? ids[sel[c].id] : sel[c].id) : -1;
    }
    ((int64_t *)out->count.buf)[b] = count;
    ((float *)out->bound.buf)[b] = bound;
}

PyDoc_STRVAR(select_best_doc,
"select_best(scores, iids, k, out_scores, out_iids, out_count, out_bound)\n\n"
"For each row of scores (B, n) float32 over rows with ids iids (n,) int64: its k largest scores and\n"
"every score tied with the k-th, best first (ties by column), into out_scores (B, C) float32 and\n"
"out_iids (B, C) int64 padded with -inf / -1; out_count (B,) int64 how many (-1 when more than C\n"
"tie: the caller selects that row another way); out_bound (B,) float32 the k-th score when lower\n"
"scores were left out, else -inf. -inf and NaN scores are never selected. Runs without the GIL.");

int vector_of(PyObject *obj, Py_buffer *view, int writable, const char *fmt, Py_ssize_t n, const char *name) {
    if (PyObject_GetBuffer(obj, view, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT | (writable ? PyBUF_WRITABLE : 0)) < 0)
        return -1;
    int is_int = strcmp(fmt, "i8") == 0;
    if (view->ndim != 1 || view->shape[0] != n || view->itemsize != (is_int ? 8 : 4) ||
        (is_int ? strchr("lq", view->format[0]) == NULL : strcmp(view->format, "f") != 0)) {
        PyErr_Format(PyExc_ValueError, "%s must be a (%zd,) %s array", name, n, is_int ? "int64" : "float32");
        PyBuffer_Release(view);
        return -1;
    }
    return 0;
}

static PyObject *select_best(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    if (nargs != 7) {
        PyErr_SetString(PyExc_TypeError, "select_best takes 7 arguments");
        return NULL;
    }
    Py_ssize_t k = PyLong_AsSsize_t(args[2]);
    if (k == -1 && PyErr_Occurred()) return NULL;
    Py_buffer sc = {0}, ids = {0};
    BestOut out = {0};
    PyObject *result = NULL;
    Cand *sel = NULL;
    if (get_matrix(args[0], &sc, 0, "scores") < 0) goto done;
    Py_ssize_t nq = sc.shape[0], n = sc.shape[1];
    if (vector_of(args[1], &ids, 0, "i8", n, "iids") < 0) goto done;
    if (best_out_get(args + 3, nq, k, &out, "select_best") < 0) goto done;
    Best best;
    Py_ssize_t blocks = (n + PANEL - 1) / PANEL;
    float *maxes = malloc((size_t)(blocks + 1) * sizeof(float));
    Cand *spare = malloc((size_t)(blocks + 1) * sizeof(Cand));
    if (maxes == NULL || spare == NULL || best_init(&best, k) < 0) {
        free(maxes);
        free(spare);
        PyErr_NoMemory();
        goto done;
    }
    sel = best.buf;
    const int64_t *id = ids.buf;
    int failed = 0;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t b = 0; b < nq; b++) {
        const float *row = (const float *)((const char *)sc.buf + b * sc.strides[0]);
        Py_ssize_t got = select_row(row, n, &best, maxes, spare);
        sel = best.buf; /* ties may have grown it */
        if (got < 0) {
            failed = 1;
            break;
        }
        float bound = got >= k && got < n ? sel[k - 1].score : -INFINITY;
        if (got > out.cap) got = -1; /* the caller selects this row another way */
        best_out_row(&out, b, sel, got, id, got, bound);
    }
    Py_END_ALLOW_THREADS
    free(maxes);
    free(spare);
    if (failed) {
        PyErr_NoMemory();
        goto done;
    }
    result = Py_NewRef(Py_None);
done:
    free(sel);
    best_out_release(&out);
    Py_buffer *views[] = {&sc, &ids};
    for (size_t v = 0; v < sizeof views / sizeof views[0]; v++)
        if (views[v]->obj != NULL) PyBuffer_Release(views[v]);
    return result;
}

static PyMethodDef methods[] = {
    {"inner_products", (PyCFunction)(void (*)(void))inner_products, METH_FASTCALL, inner_products_doc},
    {"inner_products_panels", (PyCFunction)(void (*)(void))inner_products_panels, METH_FASTCALL,
     inner_products_panels_doc},
    {"select_best", (PyCFunction)(void (*)(void))select_best, METH_FASTCALL, select_best_doc},
    {"ivf_search", (PyCFunction)(void (*)(void))ivf_search, METH_FASTCALL, ivf_search_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_scoring",
    "Exact, batch-independent inner products for the index's exact segments (see _scoring.c).", -1, methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__scoring(void) { return PyModule_Create(&module); }
