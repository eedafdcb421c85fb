/* Row kernels the product calls from Python: Q8_0 quantization (converting weights at load) and dequantization
 * (embedding lookups). */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include "graph.h"

static PyObject *py_quantize_q80(PyObject *self, PyObject *args) {
    Py_buffer src, dst;
    if (!PyArg_ParseTuple(args, "y*w*", &src, &dst)) return NULL;
    const Py_ssize_t n = src.len / 4;
    PyObject *res = NULL;
    if (n % QK || dst.len < (n / QK) * (Py_ssize_t)sizeof(block_q8_0)) {
        PyErr_SetString(PyExc_ValueError, "quantize_q80: size must be a multiple of 32 and dst large enough");
    } else {
        Py_BEGIN_ALLOW_THREADS quantize_row_q80((const float *)src.buf, (block_q8_0 *)dst.buf, NULL, (int)n);
        Py_END_ALLOW_THREADS res = Py_None;
        Py_INCREF(res);
    }
    PyBuffer_Release(&src);
    PyBuffer_Release(&dst);
    return res;
}

static PyObject *py_dequantize(PyObject *self, PyObject *args) {
    Py_buffer src, dst;
    int type;
    if (!PyArg_ParseTuple(args, "y*iw*", &src, &type, &dst)) return NULL;
    const Py_ssize_t n = dst.len / 4;
    PyObject *res = NULL;
    const size_t need = row_bytes(type, (int)n);
    if ((type_is_quant(type) && n % QK) || need == 0 || (size_t)src.len < need) {
        PyErr_SetString(PyExc_ValueError, "dequantize: bad type or sizes");
    } else {
        dequantize_row(type, src.buf, (float *)dst.buf, (int)n);
        res = Py_None;
        Py_INCREF(res);
    }
    PyBuffer_Release(&src);
    PyBuffer_Release(&dst);
    return res;
}

/* matmul(w, type, rows, cols, stride, x[T*cols] f32, y[T*rows] f32, T, nthreads): test/bench entry point */

PyMethodDef kernel_methods[] = {
    {"quantize_q80", py_quantize_q80, METH_VARARGS, "quantize_q80(src_f32, dst_bytes)"},
    {"dequantize", py_dequantize, METH_VARARGS, "dequantize(src, type, dst_f32)"},
    {NULL, NULL, 0, NULL},
};
