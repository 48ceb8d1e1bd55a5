/*
 * diffseg._torch: CPython bindings of the libtorch shim (csrc/torch/diffseg_torch.h).
 *
 * Only the shim's C header is used here; no C++ and no torch headers. Input
 * arrays are validated while holding the GIL (dtype, rank, layout; the shim
 * checks that float inputs are finite), then the GIL is released around the
 * call. Which shapes a method accepts is checked in Python. The friendlier API
 * (images, preprocessing, dictionaries) is diffseg/sd/model.py.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#define NPY_NO_DEPRECATED_API NPY_1_7_API_VERSION
#include <numpy/arrayobject.h>

#include <math.h>
#include <string.h>
#include <time.h>

#include "../torch/diffseg_torch.h"

static PyObject *BundleError; /* diffseg._torch.BundleError(ValueError) */

/*
 * Calls into the shim that run with the GIL released, over all models. At
 * interpreter exit an atexit hook refuses new calls and waits for these:
 * exiting while a daemon thread is inside libtorch tears libtorch down under
 * that thread (segfault). All three variables are read and written under the GIL.
 */
static int g_in_shim = 0;
static int g_exiting = 0;

/* Release the GIL until *counter is 0 (polls every millisecond). */
static void wait_for_zero(const int *counter) {
    while (*counter > 0) {
        Py_BEGIN_ALLOW_THREADS
        struct timespec ts = {0, 1000000};
        nanosleep(&ts, NULL);
        Py_END_ALLOW_THREADS
    }
}

static int check_not_exiting(void) {
    if (g_exiting) {
        PyErr_SetString(PyExc_RuntimeError, "diffseg._torch: the interpreter is shutting down");
        return 0;
    }
    return 1;
}

/* Raise for a failed shim call. */
static PyObject *shim_error(int rc) {
    const char *msg = dseg_torch_last_error();
    PyObject *type;
    switch (rc) {
        case DSEG_TORCH_ENOMEM: type = PyExc_MemoryError; break;
        /* A device the bundle was not exported for, or no CUDA: a wrong argument. */
        case DSEG_TORCH_EINVAL:
        case DSEG_TORCH_EDEVICE: type = PyExc_ValueError; break;
        case DSEG_TORCH_EIO:
        case DSEG_TORCH_EFORMAT: type = BundleError; break;
        default: type = PyExc_RuntimeError; break;
    }
    /* libtorch may quote bytes of a corrupt bundle: decode leniently, so that
     * they never turn into a UnicodeDecodeError. */
    PyObject *text = PyUnicode_DecodeUTF8(msg, (Py_ssize_t)strlen(msg), "replace");
    if (text) {
        PyErr_SetObject(type, text);
        Py_DECREF(text);
    }
    return NULL;
}

typedef struct {
    PyObject_HEAD
    dseg_torch_model *model;
    dseg_torch_info info;
    int busy;    /* runs in progress or waiting for the model (GIL released) */
    int closing; /* close() is waiting for runs in progress: refuse new ones */
    int opening; /* __init__ is opening a bundle (GIL released) */
} ModelObject;

static int model_init(ModelObject *self, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"path", "device", "threads", NULL};
    PyObject *path_obj;
    const char *device = "cpu";
    int threads = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O&|si", kwlist, PyUnicode_FSConverter, &path_obj, &device,
                                     &threads))
        return -1;
    if (self->model || self->opening) {
        Py_DECREF(path_obj);
        PyErr_SetString(PyExc_RuntimeError, "Model is already open");
        return -1;
    }
    if (!check_not_exiting()) {
        Py_DECREF(path_obj);
        return -1;
    }
    if (threads < 0) {
        Py_DECREF(path_obj);
        PyErr_SetString(PyExc_ValueError, "threads must be >= 0");
        return -1;
    }
    const char *path = PyBytes_AS_STRING(path_obj);
    dseg_torch_model *model = NULL;
    int rc;
    self->opening = 1;
    g_in_shim++;
    Py_BEGIN_ALLOW_THREADS
    rc = dseg_torch_open(path, device, threads, &model);
    Py_END_ALLOW_THREADS
    g_in_shim--;
    self->opening = 0;
    Py_DECREF(path_obj);
    if (rc != DSEG_TORCH_OK) {
        shim_error(rc);
        return -1;
    }
    rc = dseg_torch_info_get(model, &self->info);
    if (rc != DSEG_TORCH_OK) {
        dseg_torch_close(model);
        shim_error(rc);
        return -1;
    }
    self->model = model;
    self->closing = 0;
    return 0;
}

static void model_dealloc(ModelObject *self) {
    if (self->model) dseg_torch_close(self->model);
    self->model = NULL;
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int check_open(ModelObject *self) {
    if (!self->model || self->closing) {
        PyErr_SetString(PyExc_ValueError, "Model is closed");
        return 0;
    }
    return 1;
}

/* close(): new runs are refused at once ("Model is closed"); runs already in
 * progress in other threads finish first (close waits for them, GIL released),
 * then the model is released. Idempotent; safe from several threads. */
static PyObject *model_close(ModelObject *self, PyObject *Py_UNUSED(ignored)) {
    if (!self->model) Py_RETURN_NONE;
    self->closing = 1;
    wait_for_zero(&self->busy);
    dseg_torch_model *model = self->model; /* another close() may have got here first */
    self->model = NULL;
    if (model) dseg_torch_close(model);
    Py_RETURN_NONE;
}

static PyObject *model_info(ModelObject *self, PyObject *Py_UNUSED(ignored)) {
    if (!check_open(self)) return NULL;
    const dseg_torch_info *in = &self->info;
    PyObject *res = PyList_New(in->n_maps);
    if (!res) return NULL;
    for (int i = 0; i < in->n_maps; i++) {
        PyObject *v = PyLong_FromLong(in->map_res[i]);
        if (!v) {
            Py_DECREF(res);
            return NULL;
        }
        PyList_SET_ITEM(res, i, v);
    }
    return Py_BuildValue("{s:i,s:i,s:i,s:i,s:i,s:i,s:N}", "format_version", in->format_version, "image_size",
                         in->image_size, "image_channels", in->image_channels, "latent_size", in->latent_size,
                         "latent_channels", in->latent_channels, "timestep", in->default_timestep,
                         "map_resolutions", res);
}

static PyObject *model_metadata(ModelObject *self, PyObject *Py_UNUSED(ignored)) {
    if (!check_open(self)) return NULL;
    const char *text = dseg_torch_metadata(self->model);
    return PyUnicode_DecodeUTF8(text, (Py_ssize_t)strlen(text), "replace");
}

#define RESULT_CAPSULE "diffseg._torch.result"

static void free_result_capsule(PyObject *capsule) {
    dseg_torch_result_free((dseg_torch_result *)PyCapsule_GetPointer(capsule, RESULT_CAPSULE));
}

/* call(method: str, inputs: sequence of float32/int64 arrays) -> list of arrays
 *
 * The outputs are NumPy views of the shim's host copies (no second copy);
 * the arrays of one call share a capsule that frees the result with the
 * last of them. */
static PyObject *model_call(ModelObject *self, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"method", "inputs", NULL};
    const char *method;
    PyObject *inputs_obj;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "sO", kwlist, &method, &inputs_obj)) return NULL;
    if (!check_open(self) || !check_not_exiting()) return NULL;
    if (!PyList_Check(inputs_obj) && !PyTuple_Check(inputs_obj)) {
        PyErr_Format(PyExc_TypeError, "inputs must be a list or tuple of numpy arrays, got %s",
                     Py_TYPE(inputs_obj)->tp_name);
        return NULL;
    }
    /* A tuple copy: the caller's list cannot change under the released GIL,
     * and it keeps the arrays alive during the call. */
    PyObject *seq = PySequence_Tuple(inputs_obj);
    if (!seq) return NULL;
    const Py_ssize_t n = PyTuple_GET_SIZE(seq);
    if (n > 64) {
        Py_DECREF(seq);
        PyErr_Format(PyExc_ValueError, "inputs: at most 64 arrays, got %zd", n);
        return NULL;
    }
    dseg_torch_tensor tensors[64];
    for (Py_ssize_t k = 0; k < n; k++) {
        PyObject *item = PyTuple_GET_ITEM(seq, k);
        if (!PyArray_Check(item)) {
            PyErr_Format(PyExc_TypeError, "inputs[%zd] must be a numpy array, got %s", k, Py_TYPE(item)->tp_name);
            Py_DECREF(seq);
            return NULL;
        }
        PyArrayObject *arr = (PyArrayObject *)item;
        int type = PyArray_TYPE(arr);
        if (type != NPY_FLOAT32 && type != NPY_INT64) {
            PyErr_Format(PyExc_TypeError, "inputs[%zd] must be float32 or int64, got %s", k,
                         PyArray_DESCR(arr)->typeobj->tp_name);
            Py_DECREF(seq);
            return NULL;
        }
        if (PyArray_NDIM(arr) > DSEG_TORCH_MAX_DIMS) {
            PyErr_Format(PyExc_ValueError, "inputs[%zd] must have at most %d dimensions, got %d", k,
                         DSEG_TORCH_MAX_DIMS, PyArray_NDIM(arr));
            Py_DECREF(seq);
            return NULL;
        }
        if (!PyArray_IS_C_CONTIGUOUS(arr) || !PyArray_ISALIGNED(arr) || !PyArray_ISNOTSWAPPED(arr)) {
            PyErr_Format(PyExc_ValueError, "inputs[%zd] must be C-contiguous, aligned and in native byte order", k);
            Py_DECREF(seq);
            return NULL;
        }
        tensors[k].dtype = type == NPY_FLOAT32 ? DSEG_TORCH_FLOAT32 : DSEG_TORCH_INT64;
        tensors[k].ndim = PyArray_NDIM(arr);
        for (int d = 0; d < tensors[k].ndim; d++) tensors[k].shape[d] = (int64_t)PyArray_DIM(arr, d);
        tensors[k].data = PyArray_DATA(arr);
    }
    /* The checks above may have run Python code (__len__ of a list
     * subclass, finalisers) that closed this model: check again, then count
     * the call so that close() waits for it. */
    if (!check_open(self) || !check_not_exiting()) {
        Py_DECREF(seq);
        return NULL;
    }
    dseg_torch_model *model = self->model;
    dseg_torch_result *result = NULL;
    self->busy++;
    g_in_shim++;
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = dseg_torch_call(model, method, (int)n, tensors, &result);
    Py_END_ALLOW_THREADS
    g_in_shim--;
    self->busy--;
    Py_DECREF(seq);
    if (rc != DSEG_TORCH_OK) return shim_error(rc);

    PyObject *capsule = PyCapsule_New(result, RESULT_CAPSULE, free_result_capsule);
    if (!capsule) {
        dseg_torch_result_free(result);
        return NULL;
    }
    const int count = dseg_torch_result_count(result);
    PyObject *outputs = PyList_New(count);
    if (!outputs) {
        Py_DECREF(capsule);
        return NULL;
    }
    for (int i = 0; i < count; i++) {
        int64_t shape[DSEG_TORCH_MAX_DIMS];
        npy_intp dims[DSEG_TORCH_MAX_DIMS];
        const int ndim = dseg_torch_result_shape(result, i, shape);
        for (int d = 0; d < ndim; d++) dims[d] = (npy_intp)shape[d];
        const int type = dseg_torch_result_dtype(result, i) == DSEG_TORCH_FLOAT32 ? NPY_FLOAT32 : NPY_INT64;
        PyObject *arr = PyArray_SimpleNewFromData(ndim, dims, type, dseg_torch_result_data(result, i));
        if (!arr) {
            Py_DECREF(outputs);
            Py_DECREF(capsule);
            return NULL;
        }
        Py_INCREF(capsule);
        if (PyArray_SetBaseObject((PyArrayObject *)arr, capsule) < 0) { /* steals the reference */
            Py_DECREF(arr);
            Py_DECREF(outputs);
            Py_DECREF(capsule);
            return NULL;
        }
        PyList_SET_ITEM(outputs, i, arr);
    }
    Py_DECREF(capsule);
    return outputs;
}

static PyObject *model_closed(ModelObject *self, void *Py_UNUSED(closure)) {
    return PyBool_FromLong(self->model == NULL || self->closing);
}

static PyMethodDef model_methods[] = {
    {"call", (PyCFunction)(void (*)(void))model_call, METH_VARARGS | METH_KEYWORDS,
     "call(method, inputs) -> list of arrays\n\n"
     "Run the bundle's exported method (\"forward\", \"encode\", \"denoise\", ...) on\n"
     "inputs, a list of C-contiguous float32 or int64 arrays (float32 ones finite).\n"
     "Returns its output tensors as float32 (floating) or int64 (integer) arrays.\n"
     "Shapes are not checked here: diffseg.Model does that."},
    {"info", (PyCFunction)model_info, METH_NOARGS, "Sizes and output layout of the bundle (dict)."},
    {"metadata", (PyCFunction)model_metadata, METH_NOARGS, "The bundle's diffseg.json extra file, unparsed (invalid UTF-8 replaced)."},
    {"close", (PyCFunction)model_close, METH_NOARGS,
     "Release the model (idempotent). Runs in progress in other threads finish first;\n"
     "new runs raise ValueError('Model is closed')."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef model_getset[] = {
    {"closed", (getter)model_closed, NULL, "True after close().", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject ModelType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "diffseg._torch.Model",
    .tp_basicsize = sizeof(ModelObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Model(path, device='cpu', threads=0): an open diffseg bundle (libtorch shim).",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)model_init,
    .tp_dealloc = (destructor)model_dealloc,
    .tp_methods = model_methods,
    .tp_getset = model_getset,
};

static PyObject *py_set_num_threads(PyObject *Py_UNUSED(self), PyObject *arg) {
    long n = PyLong_AsLong(arg);
    if (n == -1 && PyErr_Occurred()) return NULL;
    if (n > 1 << 16) n = 1 << 16;
    dseg_torch_set_num_threads((int)n);
    Py_RETURN_NONE;
}

static PyObject *py_get_num_threads(PyObject *Py_UNUSED(self), PyObject *Py_UNUSED(ignored)) {
    return PyLong_FromLong(dseg_torch_get_num_threads());
}

static PyObject *py_cuda_available(PyObject *Py_UNUSED(self), PyObject *Py_UNUSED(ignored)) {
    int ok;
    if (!check_not_exiting()) return NULL;
    g_in_shim++;
    Py_BEGIN_ALLOW_THREADS
    ok = dseg_torch_cuda_available();
    Py_END_ALLOW_THREADS
    g_in_shim--;
    return PyBool_FromLong(ok);
}

static PyObject *py_cpu_feature(PyObject *Py_UNUSED(self), PyObject *arg) {
    if (!PyUnicode_Check(arg)) {
        PyErr_Format(PyExc_TypeError, "name must be a str, got %s", Py_TYPE(arg)->tp_name);
        return NULL;
    }
    const char *name = PyUnicode_AsUTF8(arg);
    if (!name) return NULL;
    int has = dseg_torch_cpu_feature(name);
    if (has < 0) Py_RETURN_NONE;
    return PyBool_FromLong(has);
}

static PyObject *py_set_memory_reuse(PyObject *Py_UNUSED(self), PyObject *arg) {
    int mode;
    if (PyUnicode_Check(arg) && PyUnicode_CompareWithASCIIString(arg, "paused") == 0) {
        mode = 2;
    } else if (PyBool_Check(arg)) {
        mode = arg == Py_True;
    } else {
        PyErr_Format(PyExc_TypeError, "set_memory_reuse takes True, False or 'paused', got %R", arg);
        return NULL;
    }
    int rc = dseg_torch_set_memory_reuse(mode);
    if (rc != DSEG_TORCH_OK) return shim_error(rc);
    Py_RETURN_NONE;
}

static PyObject *py_memory_stats(PyObject *Py_UNUSED(self), PyObject *Py_UNUSED(ignored)) {
    int64_t st[4];
    dseg_torch_memory_stats(st);
    return Py_BuildValue("{s:L,s:L,s:L,s:L}", "in_use", (long long)st[0], "kept", (long long)st[1], "peak",
                         (long long)st[2], "obtained", (long long)st[3]);
}

static PyObject *py_test_inject(PyObject *Py_UNUSED(self), PyObject *arg) {
    long what = PyLong_AsLong(arg);
    if (what == -1 && PyErr_Occurred()) return NULL;
    dseg_torch_test_inject((int)what);
    Py_RETURN_NONE;
}

static PyObject *py_torch_version(PyObject *Py_UNUSED(self), PyObject *Py_UNUSED(ignored)) {
    return PyUnicode_FromString(dseg_torch_version());
}

/* atexit hook: refuse new shim calls, wait for those in progress. */
static PyObject *py_wait_for_runs(PyObject *Py_UNUSED(self), PyObject *Py_UNUSED(ignored)) {
    g_exiting = 1;
    wait_for_zero(&g_in_shim);
    Py_RETURN_NONE;
}

static PyMethodDef module_methods[] = {
    {"set_num_threads", py_set_num_threads, METH_O, "Intra-op threads of libtorch (n < 1: all cores)."},
    {"get_num_threads", py_get_num_threads, METH_NOARGS, "Intra-op threads of libtorch."},
    {"cuda_available", py_cuda_available, METH_NOARGS, "True when libtorch can use CUDA."},
    {"torch_version", py_torch_version, METH_NOARGS, "Version of the libtorch the shim was built with."},
    {"cpu_feature", py_cpu_feature, METH_O,
     "cpu_feature(name) -> bool or None: a feature of this CPU as libtorch's cpuinfo reports it\n"
     "(\"avx512_bf16\", \"amx_bf16\", \"avx2\", ...); None for an unknown name."},
    {"set_memory_reuse", py_set_memory_reuse, METH_O,
     "set_memory_reuse(True | False | 'paused'): keep large freed buffers for the next runs\n"
     "(process-wide; see dseg_torch_set_memory_reuse in csrc/torch/diffseg_torch.h)."},
    {"memory_stats", py_memory_stats, METH_NOARGS,
     "Bytes of libtorch's large buffers: in_use, kept (for reuse), peak (in use at once), obtained\n"
     "(from the system, ever)."},
    {"_test_inject", py_test_inject, METH_O, "For diffseg's tests: see dseg_torch_test_inject."},
    {"_wait_for_runs", py_wait_for_runs, METH_NOARGS,
     "atexit hook: refuse new runs and wait for those in progress in other threads."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef moduledef = {
    .m_base = PyModuleDef_HEAD_INIT,
    .m_name = "diffseg._torch",
    .m_doc = "libtorch shim of diffseg: runs a model bundle (VAE encoder + UNet with attention outputs).",
    .m_size = -1,
    .m_methods = module_methods,
};

PyMODINIT_FUNC PyInit__torch(void) {
    import_array();
    if (PyType_Ready(&ModelType) < 0) return NULL;
    PyObject *m = PyModule_Create(&moduledef);
    if (!m) return NULL;
    BundleError = PyErr_NewExceptionWithDoc(
        "diffseg._torch.BundleError",
        "The bundle file is missing, unreadable, not a diffseg bundle, or of another format version.",
        PyExc_ValueError, NULL);
    if (!BundleError || PyModule_AddObject(m, "BundleError", BundleError) < 0) {
        Py_XDECREF(BundleError);
        Py_DECREF(m);
        return NULL;
    }
    Py_INCREF(BundleError);
    Py_INCREF(&ModelType);
    if (PyModule_AddObject(m, "Model", (PyObject *)&ModelType) < 0) {
        Py_DECREF(&ModelType);
        Py_DECREF(m);
        return NULL;
    }
    /* Wait at exit for runs in (daemon) threads: see g_in_shim. */
    PyObject *hook = PyObject_GetAttrString(m, "_wait_for_runs");
    PyObject *atexit_mod = hook ? PyImport_ImportModule("atexit") : NULL;
    PyObject *res = atexit_mod ? PyObject_CallMethod(atexit_mod, "register", "O", hook) : NULL;
    Py_XDECREF(res);
    Py_XDECREF(atexit_mod);
    Py_XDECREF(hook);
    if (!res) {
        Py_DECREF(m);
        return NULL;
    }
    PyModule_AddIntConstant(m, "FORMAT_VERSION", DSEG_TORCH_FORMAT_VERSION);
    PyModule_AddIntConstant(m, "MAX_MAPS", DSEG_TORCH_MAX_MAPS);
    PyModule_AddIntConstant(m, "TEST_MESSAGE_FAILS", DSEG_TORCH_TEST_MESSAGE_FAILS);
    PyModule_AddIntConstant(m, "TEST_THROW_UNKNOWN", DSEG_TORCH_TEST_THROW_UNKNOWN);
    return m;
}
