/*
 * diffseg._core: CPython bindings of the C core.
 *
 * Each function validates its arrays (float32, C-contiguous, shape, finite,
 * non-negative) while holding the GIL, then releases it around the C call.
 * The friendlier conversions (float64, strides, mappings) live in
 * diffseg/core.py; this layer refuses anything it would have to copy.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#define NPY_NO_DEPRECATED_API NPY_1_7_API_VERSION
#include <numpy/arrayobject.h>

#include <limits.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "../core/diffseg_core.h"

/* Raise for a failed core call: EINVAL -> ValueError, ENOMEM -> MemoryError. */
static PyObject *core_error(int rc) {
    PyErr_SetString(rc == DSEG_ENOMEM ? PyExc_MemoryError : PyExc_ValueError, dseg_last_error());
    return NULL;
}

/* Index of the first NaN, infinite or negative value, or -1. Scans in
 * chunks without early exit inside a chunk, so the test vectorises; threads
 * share the chunks of a large array (A at R = 64 is 64 MiB). */
static npy_intp first_bad_value(const float *v, npy_intp n, int threads) {
    enum { CHUNK = 4096 };
    const npy_intp chunks = (n + CHUNK - 1) / CHUNK;
    npy_intp first = chunks; /* the first chunk holding a bad value */
#pragma omp parallel for schedule(static) reduction(min : first) num_threads(threads) \
    if (n >= ((npy_intp)1 << 20))
    for (npy_intp c = 0; c < chunks; c++) {
        const npy_intp c1 = (c + 1) * CHUNK < n ? (c + 1) * CHUNK : n;
        int bad = 0;
        for (npy_intp i = c * CHUNK; i < c1; i++) /* false for NaN, -x and +inf */
            bad |= !(v[i] >= 0.0f && v[i] <= 3.402823466e38f);
        if (bad && c < first) first = c;
    }
    (void)threads; /* without OpenMP */
    if (first == chunks) return -1;
    for (npy_intp i = first * CHUNK;; i++)
        if (!(v[i] >= 0.0f && v[i] <= 3.402823466e38f)) return i;
}

/* A non-empty float32 C-contiguous array of the given rank, or NULL with
 * TypeError/ValueError naming `name`. Borrowed reference. Its values are
 * not looked at. */
static PyArrayObject *checked_layout(PyObject *obj, int ndim, const char *name) {
    if (!PyArray_Check(obj)) {
        PyErr_Format(PyExc_TypeError, "%s must be a numpy array, got %s", name,
                     Py_TYPE(obj)->tp_name);
        return NULL;
    }
    PyArrayObject *arr = (PyArrayObject *)obj;
    if (PyArray_TYPE(arr) != NPY_FLOAT32) {
        PyErr_Format(PyExc_TypeError, "%s must be float32", name);
        return NULL;
    }
    if (PyArray_NDIM(arr) != ndim) {
        PyErr_Format(PyExc_ValueError, "%s must have %d dimensions, got %d", name, ndim,
                     PyArray_NDIM(arr));
        return NULL;
    }
    if (!PyArray_IS_C_CONTIGUOUS(arr) || !PyArray_ISALIGNED(arr)) {
        PyErr_Format(PyExc_ValueError, "%s must be C-contiguous and aligned", name);
        return NULL;
    }
    if (PyArray_SIZE(arr) == 0) {
        PyErr_Format(PyExc_ValueError, "%s is empty", name);
        return NULL;
    }
    return arr;
}

/* checked_layout, and values finite and >= 0. threads: of the scan (< 1: the
 * process default). */
static PyArrayObject *checked_array(PyObject *obj, int ndim, const char *name, int threads) {
    PyArrayObject *arr = checked_layout(obj, ndim, name);
    if (!arr) return NULL;
    if (threads < 1 || threads > DSEG_MAX_THREADS) threads = dseg_get_num_threads();
    const npy_intp bad =
        first_bad_value((const float *)PyArray_DATA(arr), PyArray_SIZE(arr), threads);
    if (bad >= 0) {
        PyErr_Format(PyExc_ValueError,
                     "%s must be finite and non-negative (bad value at flat index %zd)", name,
                     (Py_ssize_t)bad);
        return NULL;
    }
    return arr;
}

/* The capsule's context holds the buffer's size, so that the core may keep
 * the buffer for a later call. */
static void free_capsule(PyObject *capsule) {
    dseg_free_sized(PyCapsule_GetPointer(capsule, "diffseg.buffer"),
                    *(size_t *)PyCapsule_GetContext(capsule));
    free(PyCapsule_GetContext(capsule));
}

/* A new C-contiguous array whose memory comes from dseg_alloc (huge pages for
 * large outputs: far fewer page faults on first touch). */
static PyObject *new_array(int ndim, npy_intp *dims, int typenum, size_t itemsize) {
    size_t bytes = itemsize;
    for (int i = 0; i < ndim; i++) bytes *= (size_t)dims[i];
    void *data = dseg_alloc(bytes);
    size_t *size = malloc(sizeof(size_t));
    if (!data || !size) {
        dseg_free(data), free(size);
        return PyErr_NoMemory();
    }
    *size = bytes;
    PyObject *owner = PyCapsule_New(data, "diffseg.buffer", NULL);
    if (!owner || PyCapsule_SetContext(owner, size) < 0 ||
        PyCapsule_SetDestructor(owner, free_capsule) < 0) {
        Py_XDECREF(owner);
        dseg_free(data), free(size);
        return NULL;
    }
    PyObject *arr = PyArray_SimpleNewFromData(ndim, dims, typenum, data);
    if (!arr) {
        Py_DECREF(owner);
        return NULL;
    }
    /* SetBaseObject steals owner even when it fails */
    if (PyArray_SetBaseObject((PyArrayObject *)arr, owner) < 0) {
        Py_DECREF(arr);
        return NULL;
    }
    return arr;
}

static int positive_int(PyObject *obj, const char *name, int *out) {
    long v = PyLong_AsLong(obj);
    if (v == -1 && PyErr_Occurred()) return 0;
    if (v < 1 || v > 1000000) {
        PyErr_Format(PyExc_ValueError, "%s must be in [1, 1000000], got %ld", name, v);
        return 0;
    }
    *out = (int)v;
    return 1;
}

/* The process default GEMM backend, or the one named by `gemm`: None
 * (process default), "builtin", or an sgemm capsule. *hold gets a new
 * reference that keeps the function's module alive during the call. */
static PyObject *sgemm_capsule = NULL; /* owner of the process default */

static int gemm_setting(PyObject *gemm, dseg_sgemm_fn *fn, PyObject **hold) {
    *hold = NULL;
    if (gemm == Py_None) {
        *fn = dseg_get_sgemm();
        *hold = sgemm_capsule;
        Py_XINCREF(*hold);
        return 1;
    }
    if (PyUnicode_Check(gemm) && PyUnicode_CompareWithASCIIString(gemm, "builtin") == 0) {
        *fn = NULL;
        return 1;
    }
    if (!PyCapsule_CheckExact(gemm)) {
        PyErr_SetString(PyExc_TypeError, "gemm must be None, 'builtin' or an sgemm capsule");
        return 0;
    }
    void *p = PyCapsule_GetPointer(gemm, PyCapsule_GetName(gemm));
    if (!p) return 0;
    *fn = (dseg_sgemm_fn)p;
    Py_INCREF(gemm);
    *hold = gemm;
    return 1;
}

/* Thread count of one call: 0 means the process default (read now). */
static int threads_setting(int threads, int *out) {
    if (threads < 0 || threads > DSEG_MAX_THREADS) {
        PyErr_Format(PyExc_ValueError, "workers must be in [1, %d], got %d", DSEG_MAX_THREADS,
                     threads);
        return 0;
    }
    *out = threads ? threads : dseg_get_num_threads();
    return 1;
}

/* A pair of positive ints (h, w) from a 2-sequence; an int n means (n, n)
 * when square_ok. */
static int positive_pair(PyObject *obj, const char *name, int square_ok, int *h, int *w) {
    if (square_ok && PyLong_Check(obj)) {
        if (!positive_int(obj, name, h)) return 0;
        *w = *h;
        return 1;
    }
    PyObject *t = PySequence_Check(obj) ? PySequence_Tuple(obj) : NULL;
    if (!t || PyTuple_GET_SIZE(t) != 2) {
        Py_XDECREF(t);
        PyErr_Clear();
        PyErr_Format(PyExc_TypeError, "%s must be %sa (height, width) pair", name,
                     square_ok ? "an int or " : "");
        return 0;
    }
    char part[64];
    snprintf(part, sizeof part, "%s[0]", name);
    int ok = positive_int(PyTuple_GET_ITEM(t, 0), part, h);
    snprintf(part, sizeof part, "%s[1]", name);
    ok = ok && positive_int(PyTuple_GET_ITEM(t, 1), part, w);
    Py_DECREF(t);
    return ok;
}

static PyObject *aggregate_maps(PyObject *maps, PyObject *weights, const int *hs, const int *ws,
                                int H, int W, const dseg_exec *ex);

/* aggregate(maps: list[ndarray], weights: list[float], out_res: int or (H, W),
 *           threads: int = 0, shapes: list[(h, w)] or None = None)
 * shapes None: every map is square, its side inferred from its size. */
static PyObject *py_aggregate(PyObject *Py_UNUSED(self), PyObject *args) {
    PyObject *maps_obj, *weights_obj, *out_res_obj, *shapes_obj = Py_None;
    int threads = 0;
    if (!PyArg_ParseTuple(args, "OOO|iO", &maps_obj, &weights_obj, &out_res_obj, &threads,
                          &shapes_obj))
        return NULL;
    int H, W;
    dseg_exec ex = {1, NULL};
    if (!positive_pair(out_res_obj, "out_res", 1, &H, &W)) return NULL;
    if (!threads_setting(threads, &ex.threads)) return NULL;
    int hs[64], ws[64], n_shapes = -1;
    if (shapes_obj != Py_None) {
        PyObject *t = PySequence_Check(shapes_obj) ? PySequence_Tuple(shapes_obj) : NULL;
        if (!t) {
            PyErr_Clear();
            PyErr_SetString(PyExc_TypeError, "shapes must be None or a sequence of (h, w) pairs");
            return NULL;
        }
        n_shapes = (int)(PyTuple_GET_SIZE(t) < 65 ? PyTuple_GET_SIZE(t) : 65);
        for (int i = 0; i < n_shapes && i < 64; i++) {
            char name[48];
            snprintf(name, sizeof name, "shapes[%d]", i);
            if (!positive_pair(PyTuple_GET_ITEM(t, i), name, 0, hs + i, ws + i)) {
                Py_DECREF(t);
                return NULL;
            }
        }
        Py_DECREF(t);
    }
    if (!PyList_Check(maps_obj) || !PyList_Check(weights_obj)) {
        PyErr_SetString(PyExc_TypeError, "attn and weights must be lists");
        return NULL;
    }
    /* Tuples hold their own references: neither another thread emptying a
     * list while the GIL is released, nor a weight's __float__ mutating
     * one, can free an object C is reading. */
    PyObject *maps_tuple = PyList_AsTuple(maps_obj);
    if (!maps_tuple) return NULL;
    PyObject *weights_tuple = PyList_AsTuple(weights_obj);
    if (!weights_tuple) {
        Py_DECREF(maps_tuple);
        return NULL;
    }
    PyObject *out = NULL;
    if (n_shapes >= 0 && n_shapes != PyTuple_GET_SIZE(maps_tuple))
        PyErr_SetString(PyExc_ValueError, "shapes must have one (h, w) pair per attention map");
    else
        out = aggregate_maps(maps_tuple, weights_tuple, n_shapes >= 0 ? hs : NULL,
                             n_shapes >= 0 ? ws : NULL, H, W, &ex);
    Py_DECREF(maps_tuple);
    Py_DECREF(weights_tuple);
    return out;
}

static PyObject *aggregate_maps(PyObject *maps, PyObject *weights_tuple, const int *hs,
                                const int *ws, int H, int W, const dseg_exec *ex) {
    const Py_ssize_t n = PyTuple_GET_SIZE(maps);
    if (n < 1 || n > 64) {
        PyErr_SetString(PyExc_ValueError, "attn must hold 1 to 64 maps");
        return NULL;
    }
    if (PyTuple_GET_SIZE(weights_tuple) != n) {
        PyErr_SetString(PyExc_ValueError, "weights must have one entry per attention map");
        return NULL;
    }
    int res_h[64], res_w[64];
    float weights[64];
    const float *ptrs[64];
    char name[48];
    /* Weights first: their __float__ runs Python code, which must not run
     * between checking an array's values and handing it to C. */
    for (Py_ssize_t i = 0; i < n; i++) {
        const double w = PyFloat_AsDouble(PyTuple_GET_ITEM(weights_tuple, i));
        if (w == -1.0 && PyErr_Occurred()) return NULL;
        if (!(w >= 0.0 && w < 1e30)) {
            PyErr_Format(PyExc_ValueError, "weights[%zd] must be finite and >= 0, got %g", i, w);
            return NULL;
        }
        weights[i] = (float)w;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        snprintf(name, sizeof name, "attn[%zd]", i);
        PyArrayObject *a = checked_array(PyTuple_GET_ITEM(maps, i), 2, name, ex->threads);
        if (!a) return NULL;
        const npy_intp q = PyArray_DIM(a, 0);
        if (hs) {
            if (PyArray_DIM(a, 1) != q || q != (npy_intp)hs[i] * ws[i]) {
                PyErr_Format(PyExc_ValueError, "%s must be (%d, %d) for a %dx%d grid, got (%zd, %zd)",
                             name, hs[i] * ws[i], hs[i] * ws[i], hs[i], ws[i], (Py_ssize_t)q,
                             (Py_ssize_t)PyArray_DIM(a, 1));
                return NULL;
            }
            res_h[i] = hs[i], res_w[i] = ws[i];
        } else {
            const long s = lround(sqrt((double)q));
            if (PyArray_DIM(a, 1) != q || (npy_intp)s * s != q) {
                PyErr_Format(PyExc_ValueError,
                             "%s must be (s*s, s*s) for an integer s, got (%zd, %zd)", name,
                             (Py_ssize_t)q, (Py_ssize_t)PyArray_DIM(a, 1));
                return NULL;
            }
            res_h[i] = res_w[i] = (int)s;
        }
        ptrs[i] = (const float *)PyArray_DATA(a);
    }
    const npy_intp N = (npy_intp)H * W;
    if (N > DSEG_MAX_POSITIONS) { /* keeps every index in range */
        if (H == W)
            PyErr_Format(PyExc_ValueError, "out_res %d is too large (at most 215)", H);
        else
            PyErr_Format(PyExc_ValueError, "out_res %dx%d is too large (H * W at most %d)", H, W,
                         DSEG_MAX_POSITIONS);
        return NULL;
    }
    npy_intp dims[2] = {N, N};
    PyObject *out = new_array(2, dims, NPY_FLOAT32, sizeof(float));
    if (!out) return NULL;
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = dseg_aggregate_hw((int)n, res_h, res_w, ptrs, weights, H, W,
                           (float *)PyArray_DATA((PyArrayObject *)out), ex);
    Py_END_ALLOW_THREADS
    if (rc != DSEG_OK) {
        Py_DECREF(out);
        return core_error(rc);
    }
    return out;
}

/* merge(A: (N, N) ndarray, grid: int, thresholds: sequence of float,
 *       threads: int = 0, gemm = None, shape: (H, W) or None = None)
 *   -> (proposals (K, H, W), seeds, pairs, full_distances, refined, exact_rechecks)
 * shape None: A is square, R = sqrt(N). */
static PyObject *merge_checked(PyObject *A_obj, PyObject *grid_obj, PyObject *thr_obj, int H,
                               int W, const dseg_exec *ex);

static PyObject *py_merge(PyObject *Py_UNUSED(self), PyObject *args) {
    PyObject *A_obj, *grid_obj, *thr_obj, *gemm = Py_None, *shape = Py_None, *hold;
    int threads = 0, H = 0, W = 0;
    if (!PyArg_ParseTuple(args, "OOO|iOO", &A_obj, &grid_obj, &thr_obj, &threads, &gemm, &shape))
        return NULL;
    if (shape != Py_None && !positive_pair(shape, "shape", 0, &H, &W)) return NULL;
    /* Settings are read once, here: the whole merge runs with them. */
    dseg_exec ex = {1, NULL};
    if (!threads_setting(threads, &ex.threads) || !gemm_setting(gemm, &ex.sgemm, &hold))
        return NULL;
    PyObject *out = merge_checked(A_obj, grid_obj, thr_obj, H, W, &ex);
    Py_XDECREF(hold);
    return out;
}

static PyObject *merge_checked(PyObject *A_obj, PyObject *grid_obj, PyObject *thr_obj, int H,
                               int W, const dseg_exec *ex) {
    /* A tuple owns its items: a threshold's __float__ mutating the caller's
     * list cannot free the item being converted. */
    PyObject *seq = PySequence_Tuple(thr_obj);
    if (!seq) return NULL;
    const Py_ssize_t n_iter = PyTuple_GET_SIZE(seq);
    if (n_iter < 1 || n_iter > 1000) {
        Py_DECREF(seq);
        PyErr_SetString(PyExc_ValueError, "kl_threshold must hold 1 to 1000 values");
        return NULL;
    }
    double *thr = malloc(sizeof(double) * n_iter);
    if (!thr) {
        Py_DECREF(seq);
        return PyErr_NoMemory();
    }
    for (Py_ssize_t i = 0; i < n_iter; i++) {
        thr[i] = PyFloat_AsDouble(PyTuple_GET_ITEM(seq, i));
        if ((thr[i] == -1.0 && PyErr_Occurred()) || !(thr[i] > 0.0 && thr[i] < 1e300)) {
            if (!PyErr_Occurred())
                PyErr_Format(PyExc_ValueError, "kl_threshold[%zd] must be finite and > 0, got %g",
                             i, thr[i]);
            Py_DECREF(seq);
            free(thr);
            return NULL;
        }
    }
    Py_DECREF(seq);
    int grid;
    if (!positive_int(grid_obj, "grid", &grid)) {
        free(thr);
        return NULL;
    }
    /* A's values are checked by the merge as it reads them (a NaN, infinite
     * or negative one: ValueError naming its flat index), saving a pass over
     * A's 64 MiB at R = 64 */
    PyArrayObject *A = checked_layout(A_obj, 2, "A");
    const npy_intp N = A ? PyArray_DIM(A, 0) : 0;
    int gh = 0, gw = 0;
    if (A && !H) { /* square */
        const long R = lround(sqrt((double)N));
        if (PyArray_DIM(A, 1) != N || (npy_intp)R * R != N)
            PyErr_Format(PyExc_ValueError,
                         "A must be (R*R, R*R) for an integer R, got (%zd, %zd); give shape=(H, W) "
                         "for a non-square grid",
                         (Py_ssize_t)N, (Py_ssize_t)PyArray_DIM(A, 1));
        else if (R > 215)
            PyErr_Format(PyExc_ValueError, "A: resolution %ld is too large (at most 215)", R);
        else if (grid > R)
            PyErr_Format(PyExc_ValueError,
                         "grid must be in [1, %ld] for A of resolution %ld, got %d", R, R, grid);
        H = W = (int)R;
    } else if (A) {
        if (PyArray_DIM(A, 1) != N || N != (npy_intp)H * W)
            PyErr_Format(PyExc_ValueError, "A must be (%d, %d) for shape %dx%d, got (%zd, %zd)",
                         H * W, H * W, H, W, (Py_ssize_t)N, (Py_ssize_t)PyArray_DIM(A, 1));
        else if (N > DSEG_MAX_POSITIONS)
            PyErr_Format(PyExc_ValueError, "A: shape %dx%d is too large (H * W at most %d)", H, W,
                         DSEG_MAX_POSITIONS);
    }
    if (A && !PyErr_Occurred() && dseg_anchor_counts(H, W, grid, &gh, &gw) != DSEG_OK)
        core_error(DSEG_EINVAL);
    if (PyErr_Occurred()) {
        free(thr);
        return NULL;
    }

    const npy_intp G = (npy_intp)gh * gw;
    const size_t buf_bytes = sizeof(float) * (size_t)G * N;
    float *buf = dseg_alloc(buf_bytes);
    int *seeds = malloc(sizeof(int) * (size_t)G);
    if (!buf || !seeds) {
        free(thr), dseg_free(buf), free(seeds);
        return PyErr_NoMemory();
    }
    int K = 0, rc;
    dseg_merge_stats stats = {0, 0, 0, 0};
    Py_BEGIN_ALLOW_THREADS
    rc = dseg_merge_hw((const float *)PyArray_DATA(A), H, W, grid, thr, (int)n_iter, buf, &K,
                       seeds, &stats, ex);
    Py_END_ALLOW_THREADS
    free(thr);
    if (rc != DSEG_OK) {
        dseg_free_sized(buf, buf_bytes), free(seeds);
        return core_error(rc);
    }
    npy_intp dims[3] = {K, H, W}, sdims[1] = {K};
    PyObject *out = new_array(3, dims, NPY_FLOAT32, sizeof(float));
    PyObject *seed_rows = out ? PyArray_SimpleNew(1, sdims, NPY_INT64) : NULL;
    if (!seed_rows) {
        Py_XDECREF(out);
        dseg_free_sized(buf, buf_bytes), free(seeds);
        return NULL;
    }
    memcpy(PyArray_DATA((PyArrayObject *)out), buf, sizeof(float) * (size_t)K * N);
    for (int k = 0; k < K; k++) ((npy_int64 *)PyArray_DATA((PyArrayObject *)seed_rows))[k] = seeds[k];
    dseg_free_sized(buf, buf_bytes), free(seeds);
    return Py_BuildValue("NNLLLL", out, seed_rows, (long long)stats.pairs,
                         (long long)stats.full_distances, (long long)stats.refined,
                         (long long)stats.exact_rechecks);
}

/* nms(proposals: (K, h, w) ndarray, H: int, W: int)
 *   -> (labels (H, W) int32, winners (n_labels,) int32: proposal of each label) */
static PyObject *py_nms(PyObject *Py_UNUSED(self), PyObject *args) {
    PyObject *P_obj, *H_obj, *W_obj;
    int threads = 0, H, W;
    dseg_exec ex = {1, NULL};
    if (!PyArg_ParseTuple(args, "OOO|i", &P_obj, &H_obj, &W_obj, &threads)) return NULL;
    if (!threads_setting(threads, &ex.threads)) return NULL;
    if (!positive_int(H_obj, "size[0]", &H) || !positive_int(W_obj, "size[1]", &W)) return NULL;
    PyArrayObject *P = checked_array(P_obj, 3, "proposals", threads);
    if (!P) return NULL;
    const npy_intp K = PyArray_DIM(P, 0), h = PyArray_DIM(P, 1), w = PyArray_DIM(P, 2);
    if (K > 1000000 || h > 1000000 || w > 1000000) {
        PyErr_SetString(PyExc_ValueError, "proposals is too large");
        return NULL;
    }
    npy_intp dims[2] = {H, W}, kdims[1] = {K};
    PyObject *out = PyArray_SimpleNew(2, dims, NPY_INT32);
    PyObject *winners = out ? PyArray_SimpleNew(1, kdims, NPY_INT32) : NULL;
    if (!winners) {
        Py_XDECREF(out);
        return NULL;
    }
    int rc, n_labels = 0;
    Py_BEGIN_ALLOW_THREADS
    rc = dseg_nms_ex((const float *)PyArray_DATA(P), (int)K, (int)h, (int)w, H, W,
                     (int32_t *)PyArray_DATA((PyArrayObject *)out), &n_labels,
                     (int32_t *)PyArray_DATA((PyArrayObject *)winners), &ex);
    Py_END_ALLOW_THREADS
    if (rc != DSEG_OK) {
        Py_DECREF(out);
        Py_DECREF(winners);
        return core_error(rc);
    }
    PyObject *used = PySequence_GetSlice(winners, 0, n_labels);
    Py_DECREF(winners);
    if (!used) {
        Py_DECREF(out);
        return NULL;
    }
    return Py_BuildValue("NN", out, used);
}

/* sym_kl(P: (m, n), Q: (k, n)) -> (m, k) float64 */
static PyObject *py_sym_kl(PyObject *Py_UNUSED(self), PyObject *args) {
    PyObject *P_obj, *Q_obj;
    if (!PyArg_ParseTuple(args, "OO", &P_obj, &Q_obj)) return NULL;
    /* The core indexes rows and columns with int: refuse larger arrays
     * before scanning their values. */
    PyObject *objs[2] = {P_obj, Q_obj};
    for (int i = 0; i < 2; i++) {
        if (!PyArray_Check(objs[i]) || PyArray_NDIM((PyArrayObject *)objs[i]) != 2) continue;
        for (int d = 0; d < 2; d++)
            if (PyArray_DIM((PyArrayObject *)objs[i], d) > INT_MAX) {
                PyErr_Format(PyExc_ValueError, "%s has too many %s (%zd; at most %d)",
                             i ? "q" : "p", d ? "columns" : "rows",
                             (Py_ssize_t)PyArray_DIM((PyArrayObject *)objs[i], d), INT_MAX);
                return NULL;
            }
    }
    PyArrayObject *P = checked_array(P_obj, 2, "p", 0),
                  *Q = P ? checked_array(Q_obj, 2, "q", 0) : NULL;
    if (!Q) return NULL;
    if (PyArray_DIM(P, 1) != PyArray_DIM(Q, 1)) {
        PyErr_SetString(PyExc_ValueError, "p and q must have the same number of columns");
        return NULL;
    }
    npy_intp dims[2] = {PyArray_DIM(P, 0), PyArray_DIM(Q, 0)};
    PyObject *out = PyArray_SimpleNew(2, dims, NPY_FLOAT64);
    if (!out) return NULL;
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = dseg_sym_kl((const float *)PyArray_DATA(P), (int)dims[0], (const float *)PyArray_DATA(Q),
                     (int)dims[1], (int)PyArray_DIM(P, 1),
                     (double *)PyArray_DATA((PyArrayObject *)out));
    Py_END_ALLOW_THREADS
    if (rc != DSEG_OK) {
        Py_DECREF(out);
        return core_error(rc);
    }
    return out;
}

static PyObject *py_anchor_coords(PyObject *Py_UNUSED(self), PyObject *args) {
    int R, grid;
    if (!PyArg_ParseTuple(args, "ii", &R, &grid)) return NULL;
    if (R < 1 || R > 100000) {
        PyErr_Format(PyExc_ValueError, "resolution must be in [1, 100000], got %d", R);
        return NULL;
    }
    if (grid < 1 || grid > R) {
        PyErr_Format(PyExc_ValueError, "grid must be in [1, %d], got %d", R, grid);
        return NULL;
    }
    npy_intp dims[1] = {grid};
    PyObject *out = PyArray_SimpleNew(1, dims, NPY_INT32);
    if (!out) return NULL;
    int rc = dseg_anchor_coords(R, grid, (int *)PyArray_DATA((PyArrayObject *)out));
    if (rc != DSEG_OK) {
        Py_DECREF(out);
        return core_error(rc);
    }
    return out;
}

/* anchor_grid(H, W, grid) -> (row coords, column coords), int32 */
static PyObject *py_anchor_grid(PyObject *Py_UNUSED(self), PyObject *args) {
    int H, W, grid, gh, gw;
    if (!PyArg_ParseTuple(args, "iii", &H, &W, &grid)) return NULL;
    if (H < 1 || H > 100000 || W < 1 || W > 100000) {
        PyErr_Format(PyExc_ValueError, "shape must be in [1, 100000] per side, got %dx%d", H, W);
        return NULL;
    }
    if (dseg_anchor_counts(H, W, grid, &gh, &gw) != DSEG_OK) return core_error(DSEG_EINVAL);
    npy_intp dy[1] = {gh}, dx[1] = {gw};
    PyObject *rows = PyArray_SimpleNew(1, dy, NPY_INT32);
    PyObject *cols = rows ? PyArray_SimpleNew(1, dx, NPY_INT32) : NULL;
    if (!cols) {
        Py_XDECREF(rows);
        return NULL;
    }
    dseg_anchor_coords(H, gh, (int *)PyArray_DATA((PyArrayObject *)rows));
    dseg_anchor_coords(W, gw, (int *)PyArray_DATA((PyArrayObject *)cols));
    return Py_BuildValue("NN", rows, cols);
}

static PyObject *py_set_num_threads(PyObject *Py_UNUSED(self), PyObject *arg) {
    long n = PyLong_AsLong(arg);
    if (n == -1 && PyErr_Occurred()) return NULL;
    if (n > DSEG_MAX_THREADS) {
        PyErr_Format(PyExc_ValueError, "n must be at most %d, got %ld", DSEG_MAX_THREADS, n);
        return NULL;
    }
    dseg_set_num_threads(n < 0 ? 0 : (int)n);
    Py_RETURN_NONE;
}

static PyObject *py_get_num_threads(PyObject *Py_UNUSED(self), PyObject *Py_UNUSED(unused)) {
    return PyLong_FromLong(dseg_get_num_threads());
}

static PyObject *py_release_memory(PyObject *Py_UNUSED(self), PyObject *Py_UNUSED(unused)) {
    size_t bytes;
    Py_BEGIN_ALLOW_THREADS
    bytes = dseg_release_memory();
    Py_END_ALLOW_THREADS
    return PyLong_FromSize_t(bytes);
}

static PyObject *py_has_openmp(PyObject *Py_UNUSED(self), PyObject *Py_UNUSED(unused)) {
    return PyBool_FromLong(dseg_has_openmp());
}

/* set_sgemm(capsule or None): a Fortran-ABI sgemm, e.g. from
 * scipy.linalg.cython_blas.__pyx_capi__["sgemm"]. The caller keeps the
 * module that owns it alive (scipy stays imported). */
static PyObject *py_set_sgemm(PyObject *Py_UNUSED(self), PyObject *arg) {
    if (arg == Py_None) {
        dseg_set_sgemm(NULL);
        Py_CLEAR(sgemm_capsule);
        Py_RETURN_NONE;
    }
    if (!PyCapsule_CheckExact(arg)) {
        PyErr_SetString(PyExc_TypeError, "sgemm must be a PyCapsule or None");
        return NULL;
    }
    void *fn = PyCapsule_GetPointer(arg, PyCapsule_GetName(arg));
    if (!fn) return NULL;
    dseg_set_sgemm((dseg_sgemm_fn)fn);
    Py_INCREF(arg);
    Py_XSETREF(sgemm_capsule, arg);
    Py_RETURN_NONE;
}

static PyObject *py_sgemm_backend(PyObject *Py_UNUSED(self), PyObject *Py_UNUSED(unused)) {
    return PyUnicode_FromString(dseg_get_sgemm() ? "external" : "builtin");
}

/* refine(A: (n, d), init: (K, d), max_iter: int, tol: float, threads: int, gemm)
 *   -> (proposals (K', d), labels (n,) int32, iterations, strict, relocated, rechecks, kept) */
static PyObject *py_refine(PyObject *Py_UNUSED(self), PyObject *args) {
    PyObject *A_obj, *P_obj, *gemm = Py_None;
    int max_iter, threads;
    double tol;
    if (!PyArg_ParseTuple(args, "OOidi|O", &A_obj, &P_obj, &max_iter, &tol, &threads, &gemm))
        return NULL;
    PyArrayObject *A = checked_array(A_obj, 2, "A", threads);
    PyArrayObject *P = A ? checked_array(P_obj, 2, "proposals", threads) : NULL;
    if (!P) return NULL;
    const npy_intp n = PyArray_DIM(A, 0), d = PyArray_DIM(A, 1), K = PyArray_DIM(P, 0);
    if (n > 2000000000 || d > 2000000000) {
        PyErr_SetString(PyExc_ValueError, "A is too large");
        return NULL;
    }
    if (PyArray_DIM(P, 1) != d) {
        PyErr_Format(PyExc_ValueError, "proposals must have %zd columns (as A), got %zd",
                     (Py_ssize_t)d, (Py_ssize_t)PyArray_DIM(P, 1));
        return NULL;
    }
    if (K > n) {
        PyErr_Format(PyExc_ValueError, "proposals: %zd proposals for %zd rows of A (at most one per row)",
                     (Py_ssize_t)K, (Py_ssize_t)n);
        return NULL;
    }
    if (max_iter < 1) {
        PyErr_Format(PyExc_ValueError, "max_iter must be >= 1, got %d", max_iter);
        return NULL;
    }
    if (!(tol >= 0.0 && tol <= 1e300)) {
        PyErr_Format(PyExc_ValueError, "tol must be finite and >= 0, got %g", tol);
        return NULL;
    }
    npy_intp dims[2] = {K, d}, ldims[1] = {n};
    PyObject *out = PyArray_SimpleNew(2, dims, NPY_FLOAT32);
    PyObject *labels = out ? PyArray_SimpleNew(1, ldims, NPY_INT32) : NULL;
    if (!labels) {
        Py_XDECREF(out);
        return NULL;
    }
    dseg_exec ex = {1, NULL};
    PyObject *hold;
    if (!threads_setting(threads, &ex.threads) || !gemm_setting(gemm, &ex.sgemm, &hold)) {
        Py_DECREF(out);
        Py_DECREF(labels);
        return NULL;
    }
    int rc, kept = 0;
    dseg_refine_stats stats = {0, 0, 0, 0, 0};
    Py_BEGIN_ALLOW_THREADS
    rc = dseg_refine_ex((const float *)PyArray_DATA(A), (int)n, (int)d,
                        (const float *)PyArray_DATA(P), (int)K, max_iter, tol,
                        (float *)PyArray_DATA((PyArrayObject *)out), &kept,
                        (int32_t *)PyArray_DATA((PyArrayObject *)labels), &stats, &ex);
    Py_END_ALLOW_THREADS
    Py_XDECREF(hold);
    if (rc != DSEG_OK) {
        Py_DECREF(out);
        Py_DECREF(labels);
        return core_error(rc);
    }
    PyObject *used = PySequence_GetSlice(out, 0, kept);
    Py_DECREF(out);
    if (!used) {
        Py_DECREF(labels);
        return NULL;
    }
    return Py_BuildValue("NNiiiLL", used, labels, stats.iterations, stats.strict_convergence,
                         stats.relocated, (long long)stats.rechecks, (long long)stats.kept);
}

static PyMethodDef methods[] = {
    {"aggregate", py_aggregate, METH_VARARGS,
     "aggregate(maps, weights, out_res, threads=0, shapes=None) -> (N, N) float32 (threads 0: "
     "default; out_res an int or (H, W); shapes: (h, w) per map, None: square maps)"},
    {"merge", py_merge, METH_VARARGS,
     "merge(A, grid, thresholds, threads=0, gemm=None, shape=None) -> (proposals, seeds, pairs, "
     "full_distances, refined, exact_rechecks); gemm: None (process default), 'builtin' or an "
     "sgemm capsule; shape: (H, W) of A's grid, None: square"},
    {"nms", py_nms, METH_VARARGS,
     "nms(proposals, H, W, threads=0) -> (labels, proposal of each label)"},
    {"sym_kl", py_sym_kl, METH_VARARGS, "sym_kl(p, q) -> (m, k) float64 symmetric KL"},
    {"anchor_coords", py_anchor_coords, METH_VARARGS, "anchor_coords(R, grid) -> int32 coords"},
    {"anchor_grid", py_anchor_grid, METH_VARARGS,
     "anchor_grid(H, W, grid) -> (row coords, column coords), int32"},
    {"set_num_threads", py_set_num_threads, METH_O, "set_num_threads(n); n < 1 means all cores"},
    {"get_num_threads", py_get_num_threads, METH_NOARGS, "threads the core uses"},
    {"has_openmp", py_has_openmp, METH_NOARGS, "whether the core was built with OpenMP"},
    {"release_memory", py_release_memory, METH_NOARGS,
     "free the scratch the core keeps for later calls; returns its size in bytes"},
    {"set_sgemm", py_set_sgemm, METH_O, "set_sgemm(capsule or None)"},
    {"sgemm_backend", py_sgemm_backend, METH_NOARGS, "'external' or 'builtin'"},
    {"refine", py_refine, METH_VARARGS,
     "refine(A, proposals, max_iter, tol, threads) -> (proposals, labels, iterations, strict, "
     "relocated, rechecks, kept)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "diffseg._core",
                                    "DiffSeg C core (see csrc/core/diffseg_core.h).", -1, methods,
                                    NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__core(void) {
    import_array();
    return PyModule_Create(&module);
}
