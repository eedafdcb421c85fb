/* Test and benchmark entry points: each kernel alone on NumPy buffers (compared with testing/reference.py in the
 * tests), and switches for the SIMD level and the repacked layout. Not used by the product. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include "graph.h"

static PyObject *py_accumulate_q80(PyObject *self, PyObject *args) {
    Py_buffer dst, src;
    if (!PyArg_ParseTuple(args, "w*y*", &dst, &src)) return NULL;
    const Py_ssize_t n = dst.len / 4;
    PyObject *res = NULL;
    if (n % QK || src.len != (n / QK) * (Py_ssize_t)sizeof(block_q8_0)) {
        PyErr_SetString(PyExc_ValueError, "accumulate_q80: src must hold exactly len(dst)/32 blocks");
    } else {
        Py_BEGIN_ALLOW_THREADS accumulate_q80((float *)dst.buf, (const block_q8_0 *)src.buf, (int)n);
        Py_END_ALLOW_THREADS res = Py_None;
        Py_INCREF(res);
    }
    PyBuffer_Release(&dst);
    PyBuffer_Release(&src);
    return res;
}

/* matmul(w, type, rows, cols, stride, x, y, T, nthreads[, w_up]): with w_up (same type and shape), the fused
 * feed-forward y = silu(W x) * (W_up x) of matmul_swiglu */
static PyObject *py_matmul(PyObject *self, PyObject *args) {
    Py_buffer w, x, y, wu = {0};
    int type, rows, cols, T, nthreads;
    Py_ssize_t stride;
    if (!PyArg_ParseTuple(args, "y*iiiny*w*ii|y*", &w, &type, &rows, &cols, &stride, &x, &y, &T, &nthreads, &wu)) return NULL;
    PyObject *res = NULL;
    const size_t rb = row_bytes(type, cols);
    if (rb == 0 || (type_is_quant(type) && cols % QK) || rows < 1 || T < 1 || (size_t)stride < rb ||
        (size_t)w.len < (size_t)(rows - 1) * stride + rb || x.len < (Py_ssize_t)T * cols * 4 ||
        y.len < (Py_ssize_t)T * rows * 4 || (wu.buf && wu.len != w.len)) {
        PyErr_SetString(PyExc_ValueError, "matmul: bad sizes");
    } else {
        const int nb = cols / QK;
        block_q8_0 *xq = (block_q8_0 *)malloc(sizeof(block_q8_0) * (size_t)T * (nb ? nb : 1));
        float *xs = (float *)malloc(sizeof(float) * (size_t)T * (nb ? nb : 1));
        float *xd = (float *)malloc(sizeof(float) * (size_t)T * (nb ? nb : 1));
        pool *p = pool_create(nthreads);
        tensor t = {(const uint8_t *)w.buf, (size_t)stride, type, rows, cols};
        tensor tu = {(const uint8_t *)wu.buf, (size_t)stride, type, rows, cols};
        uint8_t *own = tensor_repack(&t, NULL), *own_u = wu.buf ? tensor_repack(&tu, NULL) : NULL;
        Py_BEGIN_ALLOW_THREADS act a;
        act_prepare(&a, (const float *)x.buf, T, cols, xq, xs, xd, type_is_quant(type));
        if (wu.buf) {
            matmul_swiglu(p, &a, &t, &tu, (float *)y.buf, rows);
        } else {
            float *const yy[1] = {(float *)y.buf};
            const int ld[1] = {rows};
            matmul(p, &a, 1, &t, yy, ld);
        }
        Py_END_ALLOW_THREADS pool_destroy(p);
        free(own);
        free(own_u);
        free(xq);
        free(xs);
        free(xd);
        res = Py_None;
        Py_INCREF(res);
    }
    PyBuffer_Release(&w);
    PyBuffer_Release(&x);
    PyBuffer_Release(&y);
    if (wu.buf) PyBuffer_Release(&wu);
    return res;
}

static PyObject *py_rmsnorm(PyObject *self, PyObject *args) {
    Py_buffer x, w, out;
    float eps;
    if (!PyArg_ParseTuple(args, "y*y*fw*", &x, &w, &eps, &out)) return NULL;
    PyObject *res = NULL;
    if (x.len != w.len || out.len != x.len) PyErr_SetString(PyExc_ValueError, "rmsnorm: sizes differ");
    else {
        rmsnorm((float *)out.buf, (const float *)x.buf, (const float *)w.buf, (int)(x.len / 4), eps);
        res = Py_None;
        Py_INCREF(res);
    }
    PyBuffer_Release(&x);
    PyBuffer_Release(&w);
    PyBuffer_Release(&out);
    return res;
}

static PyObject *py_rope(PyObject *self, PyObject *args) {
    Py_buffer x, c, s;
    int n_heads, head_dim, neox = 0;
    if (!PyArg_ParseTuple(args, "w*iiy*y*|p", &x, &n_heads, &head_dim, &c, &s, &neox)) return NULL;
    PyObject *res = NULL;
    if (x.len != (Py_ssize_t)n_heads * head_dim * 4 || c.len < head_dim / 2 * 4 || s.len < head_dim / 2 * 4)
        PyErr_SetString(PyExc_ValueError, "rope: bad sizes");
    else {
        (neox ? rope_rows_neox : rope_rows)((float *)x.buf, n_heads, head_dim, (const float *)c.buf, (const float *)s.buf);
        res = Py_None;
        Py_INCREF(res);
    }
    PyBuffer_Release(&x);
    PyBuffer_Release(&c);
    PyBuffer_Release(&s);
    return res;
}

/* attention(q[T,nh,hd], kc, vc, out[T,nh,hd], T, pos, nh, nkv, hd, max_seq, nthreads, kv_type=F32)
 * kc, vc: [nkv][max_seq] rows of kv_type, or float32 [nkv][max_seq][hd] caches that are first written row by
 * row with kv_store (the engine's write path) when kv_type is not F32. */
static PyObject *py_attention(PyObject *self, PyObject *args) {
    Py_buffer q, kc, vc, out;
    int T, pos, nh, nkv, hd, max_seq, nthreads, kv_type = T_F32;
    if (!PyArg_ParseTuple(args, "y*y*y*w*iiiiiii|i", &q, &kc, &vc, &out, &T, &pos, &nh, &nkv, &hd, &max_seq, &nthreads,
                          &kv_type))
        return NULL;
    PyObject *res = NULL;
    const size_t rb = row_bytes(kv_type, hd), rows = (size_t)(nkv > 0 ? nkv : 0) * (size_t)(max_seq > 0 ? max_seq : 0);
    const Py_ssize_t qn = (Py_ssize_t)T * nh * hd * 4, kn = (Py_ssize_t)(rows * rb), fn = (Py_ssize_t)(rows * hd * 4);
    const int from_f32 = kv_type != T_F32 && kc.len == fn && vc.len == fn;
    const type_traits *kt = type_traits_of(kv_type);
    if (!kt || !kt->kv) {
        PyErr_Format(PyExc_ValueError, "attention: KV cache type %d is not F32, F16 or Q8_0", kv_type);
    } else if (hd % kt->block_elems) {
        PyErr_Format(PyExc_ValueError, "attention: a Q8_0 KV cache needs head_dim %% 32 == 0 (got %d)", hd);
    } else if (T < 1 || pos < 0 || hd < 1 || nkv < 1 || nh % nkv || q.len != qn || out.len != qn ||
               (!from_f32 && (kc.len != kn || vc.len != kn)) || pos + T > max_seq) {
        PyErr_SetString(PyExc_ValueError, "attention: bad sizes");
    } else {
        pool *p = pool_create(nthreads);
        float *scratch = (float *)malloc(sizeof(float) * attention_scratch_floats(pool_size(p), max_seq, hd, nh, T));
        uint8_t *kq = NULL, *vq = NULL;
        const uint8_t *kp = (const uint8_t *)kc.buf, *vp = (const uint8_t *)vc.buf;
        if (from_f32) {
            kq = (uint8_t *)malloc(rows * rb);
            vq = (uint8_t *)malloc(rows * rb);
        }
        if (!scratch || (from_f32 && (!kq || !vq))) {
            PyErr_NoMemory();
        } else {
            Py_BEGIN_ALLOW_THREADS if (from_f32) {
                for (size_t r = 0; r < rows; r++) {
                    kv_store(kv_type, kq + r * rb, (const float *)kc.buf + r * hd, hd);
                    kv_store(kv_type, vq + r * rb, (const float *)vc.buf + r * hd, hd);
                }
                kp = kq;
                vp = vq;
            }
            attention(p, (const float *)q.buf, kp, vp, kv_type, (float *)out.buf, scratch, T, pos, nh, nkv, hd, max_seq);
            Py_END_ALLOW_THREADS res = Py_None;
            Py_INCREF(res);
        }
        free(scratch);
        free(kq);
        free(vq);
        pool_destroy(p);
    }
    PyBuffer_Release(&q);
    PyBuffer_Release(&kc);
    PyBuffer_Release(&vc);
    PyBuffer_Release(&out);
    return res;
}

static PyObject *py_silu_mul(PyObject *self, PyObject *args) {
    Py_buffer g, u;
    if (!PyArg_ParseTuple(args, "w*y*", &g, &u)) return NULL;
    PyObject *res = NULL;
    if (g.len != u.len) PyErr_SetString(PyExc_ValueError, "silu_mul: sizes differ");
    else {
        silu_mul((float *)g.buf, (const float *)u.buf, (int)(g.len / 4));
        res = Py_None;
        Py_INCREF(res);
    }
    PyBuffer_Release(&g);
    PyBuffer_Release(&u);
    return res;
}

static PyObject *py_set_simd(PyObject *self, PyObject *args) {
    int level;
    if (!PyArg_ParseTuple(args, "i", &level)) return NULL;
    if (level < 0 || level > simd_best()) {
        PyErr_Format(PyExc_ValueError, "SIMD level %d not compiled in (best: %s)", level, simd_name(simd_best()));
        return NULL;
    }
    /* only scalar and the compiled-in path of this architecture are valid */
    if (level != SIMD_SCALAR && level < SIMD_AVX2 && simd_best() >= SIMD_AVX2) {
        PyErr_SetString(PyExc_ValueError, "NEON is not available on x86");
        return NULL;
    }
    const int prev = g_simd;
    g_simd = level;
    return PyLong_FromLong(prev);
}

static PyObject *py_set_repack(PyObject *self, PyObject *args) {
    int on;
    if (!PyArg_ParseTuple(args, "p", &on)) return NULL;
    const int prev = g_repack;
    g_repack = on;
    return PyBool_FromLong(prev);
}

static PyObject *py_simd_info(PyObject *self, PyObject *noargs) {
    return Py_BuildValue("{s:i,s:s,s:i,s:s}", "level", g_simd, "name", simd_name(g_simd), "best", simd_best(), "best_name",
                         simd_name(simd_best()));
}

PyMethodDef testing_methods[] = {
    {"accumulate_q80", py_accumulate_q80, METH_VARARGS, "accumulate_q80(dst_f32, src_q80): dst += dequant(src)"},
    {"matmul", py_matmul, METH_VARARGS, "matmul(w, type, rows, cols, stride, x, y, T, nthreads[, w_up])"},
    {"rmsnorm", py_rmsnorm, METH_VARARGS, "rmsnorm(x, w, eps, out)"},
    {"rope", py_rope, METH_VARARGS, "rope(x, n_heads, head_dim, cos, sin, neox=False) in place"},
    {"attention", py_attention, METH_VARARGS, "attention(q, kc, vc, out, T, pos, nh, nkv, hd, max_seq, nthreads, kv_type=0)"},
    {"silu_mul", py_silu_mul, METH_VARARGS, "silu_mul(g, u): g = silu(g) * u"},
    {"set_simd", py_set_simd, METH_VARARGS, "set_simd(level) -> previous level"},
    {"simd_info", py_simd_info, METH_NOARGS, "active and best SIMD level"},
    {"set_repack", py_set_repack, METH_VARARGS, "set_repack(on) -> previous: 8-row repacking of Q4_0/Q4_1 at load"},
    {NULL, NULL, 0, NULL},
};
