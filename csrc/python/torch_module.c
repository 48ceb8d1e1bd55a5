/*
 * diffseg._torch: CPython bindings of the libtorch shim (csrc/torch/diffseg_torch.h).
 *
 * Only the shim's C header is used here; no C++ and no torch headers. Arrays
 * are validated while holding the GIL (float32, C-contiguous, shape, finite),
 * then the GIL is released around the model run. The friendlier API
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

/* run(image: float32 (C, S, S), timestep: int = -1, eps: bool = False)
 *   -> (list of (n, n) float32 arrays, eps array or None) */
static PyObject *model_run(ModelObject *self, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"image", "timestep", "eps", NULL};
    PyObject *image_obj;
    int timestep = -1, want_eps = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O|ip", kwlist, &image_obj, &timestep, &want_eps)) return NULL;
    if (!check_open(self) || !check_not_exiting()) return NULL;
    const dseg_torch_info info = self->info; /* buffers below are sized from this copy */
    const dseg_torch_info *in = &info;
    if (!PyArray_Check(image_obj)) {
        PyErr_Format(PyExc_TypeError, "image must be a numpy array, got %s", Py_TYPE(image_obj)->tp_name);
        return NULL;
    }
    PyArrayObject *image = (PyArrayObject *)image_obj;
    if (PyArray_TYPE(image) != NPY_FLOAT32) {
        PyErr_SetString(PyExc_TypeError, "image must be float32");
        return NULL;
    }
    if (PyArray_NDIM(image) != 3 || PyArray_DIM(image, 0) != in->image_channels ||
        PyArray_DIM(image, 1) != in->image_size || PyArray_DIM(image, 2) != in->image_size) {
        PyErr_Format(PyExc_ValueError, "image must have shape (%d, %d, %d) for this bundle", in->image_channels,
                     in->image_size, in->image_size);
        return NULL;
    }
    if (!PyArray_IS_C_CONTIGUOUS(image) || !PyArray_ISALIGNED(image)) {
        PyErr_SetString(PyExc_ValueError, "image must be C-contiguous and aligned");
        return NULL;
    }
    const float *px = (const float *)PyArray_DATA(image);
    const npy_intp n_px = PyArray_SIZE(image);
    for (npy_intp i = 0; i < n_px; i++) {
        if (!isfinite(px[i])) {
            PyErr_Format(PyExc_ValueError, "image must be finite (bad value at flat index %zd)", (Py_ssize_t)i);
            return NULL;
        }
    }
    if (timestep > 100000) {
        PyErr_SetString(PyExc_ValueError, "timestep must be in [0, 100000] (or < 0 for the bundle's default)");
        return NULL;
    }

    PyObject *maps = PyList_New(in->n_maps);
    if (!maps) return NULL;
    float *ptrs[DSEG_TORCH_MAX_MAPS];
    for (int i = 0; i < in->n_maps; i++) {
        npy_intp n = (npy_intp)in->map_res[i] * in->map_res[i];
        npy_intp dims[2] = {n, n};
        PyObject *arr = PyArray_SimpleNew(2, dims, NPY_FLOAT32);
        if (!arr) {
            Py_DECREF(maps);
            return NULL;
        }
        PyList_SET_ITEM(maps, i, arr);
        ptrs[i] = (float *)PyArray_DATA((PyArrayObject *)arr);
    }
    PyObject *eps = Py_None;
    Py_INCREF(eps);
    float *eps_ptr = NULL;
    if (want_eps) {
        npy_intp dims[3] = {in->latent_channels, in->latent_size, in->latent_size};
        Py_DECREF(eps);
        eps = PyArray_SimpleNew(3, dims, NPY_FLOAT32);
        if (!eps) {
            Py_DECREF(maps);
            return NULL;
        }
        eps_ptr = (float *)PyArray_DATA((PyArrayObject *)eps);
    }

    /* Allocating the outputs may have run Python code (a GC pass, finalisers)
     * that closed this model: check again, then count the run so that close()
     * waits for it. Nothing below runs Python code until busy-- . */
    if (!check_open(self) || !check_not_exiting() || memcmp(&info, &self->info, sizeof info) != 0) {
        if (!PyErr_Occurred()) PyErr_SetString(PyExc_RuntimeError, "Model was reopened during run()");
        Py_DECREF(maps);
        Py_DECREF(eps);
        return NULL;
    }
    dseg_torch_model *model = self->model;
    Py_INCREF(image); /* keep the input alive while the GIL is released */
    self->busy++;
    g_in_shim++;
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = dseg_torch_run(model, px, in->image_channels, in->image_size, in->image_size, timestep, ptrs, eps_ptr);
    Py_END_ALLOW_THREADS
    g_in_shim--;
    self->busy--;
    Py_DECREF(image);
    if (rc != DSEG_TORCH_OK) {
        Py_DECREF(maps);
        Py_DECREF(eps);
        return shim_error(rc);
    }
    return Py_BuildValue("(NN)", maps, eps);
}

static PyObject *model_closed(ModelObject *self, void *Py_UNUSED(closure)) {
    return PyBool_FromLong(self->model == NULL || self->closing);
}

static PyMethodDef model_methods[] = {
    {"run", (PyCFunction)(void (*)(void))model_run, METH_VARARGS | METH_KEYWORDS,
     "run(image, timestep=-1, eps=False) -> (maps, eps)\n\n"
     "image: float32 (C, S, S) in [-1, 1]. maps: list of (n, n) float32 arrays in the\n"
     "order of info()['map_resolutions']; eps: (latent_channels, L, L) or None."},
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
    return m;
}
