/* dllama.engine._kernels: the Python type of one node's engine (graph.c), and the module (row kernels from
 * py_kernels.c, test entry points from py_testing.c).
 *
 * The engine reads weights in place from buffers Python keeps alive (the model's memory map or received slices;
 * the engine holds a buffer export of each) and writes x, out and logits, NumPy arrays owned by Python. forward()
 * runs every layer with the GIL released; partial sums go through the comm set with set_comm() (any object whose
 * `capsule` attribute is a "dllama.comm" capsule, e.g. dllama.net._mesh.TcpMesh). A comm failure raises CommError
 * once, carrying (node, kind, errno, frame type, bytes the peer sent to explain itself). */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include "graph.h"

extern PyMethodDef kernel_methods[];
extern PyMethodDef testing_methods[];

static PyObject *CommError;

typedef struct {
    PyObject_HEAD
    engine *e;
    int max_batch, max_seq, n_layers;
    Py_buffer *held; /* buffers kept exported for the engine's lifetime */
    int n_held, cap_held;
    PyObject *comm_owner;
    comm *cm;
} Engine;

static int hold_buffer(Engine *self, PyObject *obj, int writable, Py_buffer **out) {
    if (self->n_held == self->cap_held) {
        int cap = self->cap_held ? self->cap_held * 2 : 64;
        Py_buffer *nb = (Py_buffer *)PyMem_Realloc(self->held, sizeof(Py_buffer) * (size_t)cap);
        if (!nb) { PyErr_NoMemory(); return -1; }
        self->held = nb;
        self->cap_held = cap;
    }
    Py_buffer *b = &self->held[self->n_held];
    if (PyObject_GetBuffer(obj, b, writable ? (PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS) : PyBUF_C_CONTIGUOUS) < 0) return -1;
    self->n_held++;
    *out = b;
    return 0;
}

static void Engine_dealloc(Engine *self) {
    engine_destroy(self->e);
    for (int i = 0; i < self->n_held; i++) PyBuffer_Release(&self->held[i]);
    PyMem_Free(self->held);
    Py_XDECREF(self->comm_owner);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int Engine_init(Engine *self, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"dim", "n_layers", "head_dim", "n_heads", "n_kv_heads", "hidden", "vocab", "max_seq",
                             "max_batch", "norm_eps", "rope_cos", "rope_sin", "nthreads", "x", "out", "logits",
                             "rope_neox", "qk_norm", "attn_bias", "n_experts", "n_active", "norm_topk", "sync",
                             "check_residual", "kv_dir", "kv_type", NULL};
    engine_config c = {0};
    c.norm_topk = 1;
    PyObject *cos_o, *sin_o, *x_o, *out_o, *logits_o;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "iiiiiiiiifOOiOOO|pppiipipzi", kwlist, &c.dim, &c.n_layers, &c.head_dim,
                                     &c.n_heads, &c.n_kv_heads, &c.hidden, &c.vocab, &c.max_seq, &c.max_batch, &c.eps,
                                     &cos_o, &sin_o, &c.nthreads, &x_o, &out_o, &logits_o, &c.rope_neox, &c.qk_norm,
                                     &c.attn_bias, &c.n_experts, &c.n_active, &c.norm_topk, &c.sync,
                                     &c.check_residual, &c.kv_dir, &c.kv_type))
        return -1;
    if (self->e) {
        PyErr_SetString(PyExc_RuntimeError, "Engine already initialised");
        return -1;
    }
    if (c.dim % QK || c.dim < QK || c.head_dim % 2 || c.head_dim < 2 || c.hidden % QK || c.hidden < 0 ||
        c.n_heads < 1 || c.n_kv_heads < 1 || c.n_heads % c.n_kv_heads || c.max_seq < 1 || c.max_batch < 1 ||
        c.n_layers < 1 || c.vocab < 0 || c.n_experts < 0 || c.n_experts > 4096 || c.n_active < 0 ||
        c.n_active > c.n_experts || c.n_active > 64 || (c.n_experts && c.n_active < 1) ||
        (c.sync != SYNC_Q80 && c.sync != SYNC_F32 && c.sync != SYNC_F16) ||
        !type_traits_of(c.kv_type) || !type_traits_of(c.kv_type)->kv || c.head_dim % type_traits_of(c.kv_type)->block_elems) {
        PyErr_SetString(PyExc_ValueError, "Engine: inconsistent dimensions");
        return -1;
    }
    Py_buffer *b;
    const size_t B = (size_t)c.max_batch, half = (size_t)c.head_dim / 2;
    const float *cos_t, *sin_t;
    float *x, *out, *logits;
    if (hold_buffer(self, cos_o, 0, &b) < 0) return -1;
    if ((size_t)b->len < (size_t)c.max_seq * half * 4) goto small;
    cos_t = (const float *)b->buf;
    if (hold_buffer(self, sin_o, 0, &b) < 0) return -1;
    if ((size_t)b->len < (size_t)c.max_seq * half * 4) goto small;
    sin_t = (const float *)b->buf;
    if (hold_buffer(self, x_o, 1, &b) < 0) return -1;
    if ((size_t)b->len < B * c.dim * 4) goto small;
    x = (float *)b->buf;
    if (hold_buffer(self, out_o, 1, &b) < 0) return -1;
    if ((size_t)b->len < B * c.dim * 4) goto small;
    out = (float *)b->buf;
    if (hold_buffer(self, logits_o, 1, &b) < 0) return -1;
    if ((size_t)b->len < (size_t)c.vocab * 4) goto small;
    logits = (float *)b->buf;
    self->e = engine_create(&c, cos_t, sin_t, x, out, logits);
    if (!self->e) {
        if (c.kv_dir) PyErr_Format(PyExc_OSError, "cannot create the KV cache file in %s", c.kv_dir);
        else PyErr_NoMemory();
        return -1;
    }
    self->max_batch = c.max_batch;
    self->n_layers = c.n_layers;
    self->max_seq = c.max_seq;
    return 0;
small:
    PyErr_SetString(PyExc_ValueError, "Engine: a buffer is smaller than its shape needs");
    return -1;
}

#define NEED_ENGINE(self) \
    if (!(self)->e) { PyErr_SetString(PyExc_RuntimeError, "Engine not initialised"); return NULL; }

static PyObject *Engine_set_tensor(Engine *self, PyObject *args) {
    int layer, slot, expert, type, rows, cols;
    PyObject *obj;
    Py_ssize_t offset, stride;
    if (!PyArg_ParseTuple(args, "iiiOniiin", &layer, &slot, &expert, &obj, &offset, &type, &rows, &cols, &stride))
        return NULL;
    NEED_ENGINE(self);
    const size_t rb = row_bytes(type, cols);
    if ((rb == 0 && cols != 0) || (type_is_quant(type) && cols % QK) || rows < 0 || cols < 0 || offset < 0 ||
        (rows > 1 && (size_t)stride < rb)) {
        PyErr_SetString(PyExc_ValueError, "set_tensor: unsupported type or bad shape");
        return NULL;
    }
    Py_buffer *b;
    if (hold_buffer(self, obj, 0, &b) < 0) return NULL;
    if (rows > 0 && (size_t)offset + (size_t)(rows - 1) * (size_t)stride + rb > (size_t)b->len) {
        PyBuffer_Release(&self->held[--self->n_held]);
        PyErr_SetString(PyExc_ValueError, "set_tensor: tensor extends past its buffer");
        return NULL;
    }
    tensor t = {(const uint8_t *)b->buf + offset, (size_t)stride, type, rows, cols};
    int uses_source = 1;
    const int rc = engine_set_tensor(self->e, layer, slot, expert, t, &uses_source);
    if (rc != 0 || !uses_source) PyBuffer_Release(&self->held[--self->n_held]); /* copy kept, or refused */
    if (rc == -1) {
        PyErr_Format(PyExc_IndexError, "set_tensor: bad layer %d, slot %d or expert %d", layer, slot, expert);
        return NULL;
    }
    if (rc == -2) {
        PyErr_Format(PyExc_ValueError, "set_tensor: layer %d slot %d: %dx%d of type %d is not the shape this node holds",
                     layer, slot, rows, cols, type);
        return NULL;
    }
    if (rc == -3) return PyErr_NoMemory();
    return PyBool_FromLong(uses_source);
}

static PyObject *Engine_check(Engine *self, PyObject *noargs) {
    NEED_ENGINE(self);
    char why[160];
    if (engine_check(self->e, why, sizeof why) != 0) {
        PyErr_Format(PyExc_ValueError, "engine incomplete: %s", why);
        return NULL;
    }
    Py_RETURN_NONE;
}

static PyObject *Engine_set_comm(Engine *self, PyObject *obj) {
    NEED_ENGINE(self);
    comm *c = NULL;
    if (obj != Py_None) {
        PyObject *cap = PyObject_GetAttrString(obj, "capsule");
        if (!cap) return NULL;
        c = (comm *)PyCapsule_GetPointer(cap, COMM_CAPSULE);
        Py_DECREF(cap);
        if (!c) return NULL;
    }
    Py_XINCREF(obj == Py_None ? NULL : obj);
    Py_XDECREF(self->comm_owner);
    self->comm_owner = obj == Py_None ? NULL : obj;
    self->cm = c;
    Py_RETURN_NONE;
}

static PyObject *Engine_forward(Engine *self, PyObject *args) {
    int pos, T;
    if (!PyArg_ParseTuple(args, "ii", &pos, &T)) return NULL;
    NEED_ENGINE(self);
    if (pos < 0 || T < 1 || T > self->max_batch || pos + T > self->max_seq) {
        PyErr_Format(PyExc_ValueError, "engine: bad pos/batch (pos %d, T %d, max_seq %d)", pos, T, self->max_seq);
        return NULL;
    }
    comm *c = self->cm;
    int rc;
    Py_BEGIN_ALLOW_THREADS rc = engine_forward(self->e, pos, T, c);
    Py_END_ALLOW_THREADS if (rc == COMM_OK) Py_RETURN_NONE;
    const comm_failure *f = &c->fail;
    PyObject *exc = Py_BuildValue("(iiiiy#)", f->node, f->kind, f->err, f->msg_type, (const char *)f->msg,
                                  (Py_ssize_t)f->msg_len);
    if (exc) PyErr_SetObject(CommError, exc);
    Py_XDECREF(exc);
    return NULL;
}

static PyObject *Engine_logits(Engine *self, PyObject *args) {
    int row;
    if (!PyArg_ParseTuple(args, "i", &row)) return NULL;
    NEED_ENGINE(self);
    char why[160];
    if (row < 0 || row >= self->max_batch || engine_check(self->e, why, sizeof why) != 0) {
        PyErr_SetString(PyExc_ValueError, "logits: bad row or engine incomplete");
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS engine_logits(self->e, row);
    Py_END_ALLOW_THREADS Py_RETURN_NONE;
}

static PyObject *Engine_residual_hashes(Engine *self, PyObject *noargs) {
    NEED_ENGINE(self);
    const uint64_t *h = engine_residual_hashes(self->e);
    if (!h) Py_RETURN_NONE;
    return PyBytes_FromStringAndSize((const char *)h, (Py_ssize_t)(sizeof(uint64_t) * 2 * self->n_layers));
}

static PyMethodDef Engine_methods[] = {
    {"residual_hashes", (PyCFunction)Engine_residual_hashes, METH_NOARGS,
     "bytes: u64 hash of the residual stream after each sync step of the last forward (check_residual), or None"},
    {"set_tensor", (PyCFunction)Engine_set_tensor, METH_VARARGS,
     "set_tensor(layer, slot, expert, buffer, offset, type, rows, cols, row_stride) -> reads the buffer in place; "
     "layer -1: global slots"},
    {"check", (PyCFunction)Engine_check, METH_NOARGS, "raise ValueError unless every tensor the graph reads is set"},
    {"set_comm", (PyCFunction)Engine_set_comm, METH_O, "set_comm(obj with a dllama.comm capsule, or None)"},
    {"forward", (PyCFunction)Engine_forward, METH_VARARGS, "forward(pos, T): every layer; CommError on a peer failure"},
    {"logits", (PyCFunction)Engine_logits, METH_VARARGS, "logits(row): output head on x[row]"},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject EngineType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "dllama.engine._kernels.Engine",
    .tp_basicsize = sizeof(Engine),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Engine_init,
    .tp_dealloc = (destructor)Engine_dealloc,
    .tp_methods = Engine_methods,
    .tp_doc = "One node's slice of the model: weights, KV cache, scratch buffers and thread pool.",
};

static struct PyModuleDef moduledef = {PyModuleDef_HEAD_INIT, "_kernels", "dllama C engine and kernels", -1, NULL};

static PyObject *names(const char *const *list, int n) {
    PyObject *t = PyTuple_New(n);
    for (int i = 0; t && i < n; i++) PyTuple_SET_ITEM(t, i, PyUnicode_FromString(list[i]));
    return t;
}

PyMODINIT_FUNC PyInit__kernels(void) {
    g_simd = simd_best();
    const char *nr = getenv("DLLAMA_NO_REPACK");
    g_repack = simd_best() >= SIMD_AVX2 && !(nr && *nr && *nr != '0');
    if (PyType_Ready(&EngineType) < 0) return NULL;
    PyObject *m = PyModule_Create(&moduledef);
    if (!m) return NULL;
    if (PyModule_AddFunctions(m, kernel_methods) < 0 || PyModule_AddFunctions(m, testing_methods) < 0) return NULL;
    Py_INCREF(&EngineType);
    PyModule_AddObject(m, "Engine", (PyObject *)&EngineType);
    CommError = PyErr_NewException("dllama.engine._kernels.CommError", NULL, NULL);
    Py_INCREF(CommError);
    PyModule_AddObject(m, "CommError", CommError);
    PyModule_AddObject(m, "LAYER_SLOTS", names(LAYER_SLOT_NAMES, N_LAYER_SLOTS));
    PyModule_AddObject(m, "GLOBAL_SLOTS", names(GLOBAL_SLOT_NAMES, N_GLOBAL_SLOTS));
    PyModule_AddIntConstant(m, "SYNC_Q80", SYNC_Q80);
    PyModule_AddIntConstant(m, "SYNC_F32", SYNC_F32);
    PyModule_AddIntConstant(m, "SYNC_F16", SYNC_F16);
    PyModule_AddIntConstant(m, "BUTTERFLY_MIN_NODES", BUTTERFLY_MIN_NODES);
    PyModule_AddIntConstant(m, "SIMD_SCALAR", SIMD_SCALAR);
    PyModule_AddIntConstant(m, "SIMD_NEON", SIMD_NEON);
    PyModule_AddIntConstant(m, "SIMD_AVX2", SIMD_AVX2);
    PyModule_AddIntConstant(m, "SIMD_AVX512VNNI", SIMD_AVX512VNNI);
    return m;
}
