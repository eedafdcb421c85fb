/* dllama.engine._kernels: Python binding of the C kernels and of the per-node Engine.
 *
 * The Engine holds one node's slice of the model (pointers into buffers Python keeps alive: the model's
 * memory map or received weights), its KV cache and scratch buffers, and runs one attention block or one
 * feed-forward block per call with the GIL released. The residual stream x, the partial output `out` and
 * the logits are NumPy arrays owned by Python, so synchronisation code can read and write them in place. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <errno.h>
#include <math.h>
#include <poll.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <time.h>

#include "common.h"

/* repack Q4_0/Q4_1 into 8-row groups at load: on by default where the x8 SIMD kernels exist (AVX2 builds); NEON
 * builds keep the GGUF layout, whose NEON dot products beat the scalar x8 fallback. DLLAMA_NO_REPACK=1 or
 * set_repack(0) turn it off (tests run both layouts on every SIMD path). */
static int g_repack = -1;

/* a Q4_0/Q4_1 tensor with rows % 8 == 0 -> its 8-row repacked copy (malloc'ed), or NULL to keep the source */
static uint8_t *maybe_repack(tensor *t) {
    if (!g_repack || (t->type != T_Q4_0 && t->type != T_Q4_1) || t->rows % 8 || t->rows == 0) return NULL;
    const int xt = t->type == T_Q4_0 ? T_Q4_0_X8 : T_Q4_1_X8;
    const size_t group = (size_t)(t->cols / QK) * x8_block_bytes(xt);
    uint8_t *dst = (uint8_t *)malloc(group * (size_t)(t->rows / 8));
    if (!dst) return NULL;
    repack_x8(t->type, t->data, t->stride, t->rows, t->cols, dst);
    t->type = xt;
    t->data = dst;
    t->stride = group;
    return dst;
}

enum { S_ATTN_NORM, S_Q, S_K, S_V, S_O, S_FFN_NORM, S_GATE, S_UP, S_DOWN, N_LAYER_SLOTS };
enum { S_OUT_NORM = 0, S_OUTPUT = 1, N_GLOBAL_SLOTS };

typedef struct {
    PyObject_HEAD
    int dim, n_layers, hd, nh, nkv, hidden, vocab, max_seq, max_batch, nthreads;
    float eps;
    tensor *lt;            /* [n_layers][N_LAYER_SLOTS] */
    tensor gt[N_GLOBAL_SLOTS];
    Py_buffer *held;       /* buffers kept exported for the engine's lifetime */
    int n_held, cap_held;
    const float *cos_t, *sin_t; /* [max_seq][hd/2] */
    float *kc, *vc;        /* [n_layers][nkv][max_seq][hd] */
    float *xb;             /* [B][dim] normed input */
    float *q, *k, *v;      /* [B][nh*hd], [B][nkv*hd], [B][nkv*hd] */
    float *att;            /* [B][nh*hd] */
    float *hb;             /* [B][hidden] */
    block_q8_0 *xq;        /* [B][maxc/32] */
    float *xs;             /* [B][maxc/32] */
    float *xd;             /* [B][maxc/32] activation block scales as float */
    float *scratch;        /* [nthreads][max_seq] attention scores */
    float *x, *out, *logits; /* Python-owned: [B][dim], [B][dim], [vocab] */
    pool *pool;
    /* cluster links for the all-reduce (see exchange()) */
    int n_links, self_index, fmt, timeout_ms;
    int *fds, *link_index; /* [n_links] socket fds (non-blocking) and the node index behind each */
    uint8_t *sbuf;         /* [8 + 4 + B*row] our frame */
    uint8_t *rbuf;         /* [n_links][8 + 4 + B*row] peers' frames */
    float *acc;            /* [B][dim] sum in node order */
    size_t frame_cap;
    double net_s;          /* seconds spent in exchanges (waiting on peers) */
    void **owned;          /* repacked weight buffers this engine allocated */
    int n_owned;
    /* failure details of the last forward_cluster */
    int fail_link, fail_errno;
    size_t fail_got;
} Engine;

static int hold_buffer(Engine *e, PyObject *obj, int writable, Py_buffer **out) {
    if (e->n_held == e->cap_held) {
        int cap = e->cap_held ? e->cap_held * 2 : 64;
        Py_buffer *nb = (Py_buffer *)PyMem_Realloc(e->held, sizeof(Py_buffer) * (size_t)cap);
        if (!nb) { PyErr_NoMemory(); return -1; }
        e->held = nb;
        e->cap_held = cap;
    }
    Py_buffer *b = &e->held[e->n_held];
    if (PyObject_GetBuffer(obj, b, writable ? (PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS) : PyBUF_C_CONTIGUOUS) < 0) return -1;
    e->n_held++;
    *out = b;
    return 0;
}

static void Engine_dealloc(Engine *e) {
    pool_destroy(e->pool);
    for (int i = 0; i < e->n_held; i++) PyBuffer_Release(&e->held[i]);
    PyMem_Free(e->held);
    free(e->lt);
    free(e->kc); free(e->vc); free(e->xb); free(e->q); free(e->k); free(e->v); free(e->att); free(e->hb);
    free(e->xq); free(e->xs); free(e->xd); free(e->scratch);
    free(e->fds); free(e->link_index); free(e->sbuf); free(e->rbuf); free(e->acc);
    for (int i = 0; i < e->n_owned; i++) free(e->owned[i]);
    free(e->owned);
    Py_TYPE(e)->tp_free((PyObject *)e);
}

static int Engine_init(Engine *e, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"dim", "n_layers", "head_dim", "n_heads", "n_kv_heads", "hidden", "vocab", "max_seq",
                             "max_batch", "norm_eps", "rope_cos", "rope_sin", "nthreads", "x", "out", "logits", NULL};
    PyObject *cos_o, *sin_o, *x_o, *out_o, *logits_o;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "iiiiiiiiifOOiOOO", kwlist, &e->dim, &e->n_layers, &e->hd, &e->nh,
                                     &e->nkv, &e->hidden, &e->vocab, &e->max_seq, &e->max_batch, &e->eps, &cos_o,
                                     &sin_o, &e->nthreads, &x_o, &out_o, &logits_o))
        return -1;
    if (e->dim % QK || e->hd % 2 || e->hidden % QK || (e->nkv && e->nh % e->nkv) || e->max_seq < 1 || e->max_batch < 1 ||
        e->n_layers < 1 || e->nh < 0 || e->nkv < 0 || e->vocab < 0) {
        PyErr_SetString(PyExc_ValueError, "Engine: inconsistent dimensions");
        return -1;
    }
    Py_buffer *b;
    const size_t B = (size_t)e->max_batch, half = (size_t)e->hd / 2;
    if (hold_buffer(e, cos_o, 0, &b) < 0) return -1;
    if ((size_t)b->len < (size_t)e->max_seq * half * 4) goto small;
    e->cos_t = (const float *)b->buf;
    if (hold_buffer(e, sin_o, 0, &b) < 0) return -1;
    if ((size_t)b->len < (size_t)e->max_seq * half * 4) goto small;
    e->sin_t = (const float *)b->buf;
    if (hold_buffer(e, x_o, 1, &b) < 0) return -1;
    if ((size_t)b->len < B * e->dim * 4) goto small;
    e->x = (float *)b->buf;
    if (hold_buffer(e, out_o, 1, &b) < 0) return -1;
    if ((size_t)b->len < B * e->dim * 4) goto small;
    e->out = (float *)b->buf;
    if (hold_buffer(e, logits_o, 1, &b) < 0) return -1;
    if ((size_t)b->len < (size_t)e->vocab * 4) goto small;
    e->logits = (float *)b->buf;

    const size_t qd = (size_t)e->nh * e->hd, kd = (size_t)e->nkv * e->hd;
    size_t maxc = (size_t)e->dim;
    if (qd > maxc) maxc = qd;
    if ((size_t)e->hidden > maxc) maxc = e->hidden;
    e->lt = (tensor *)calloc((size_t)e->n_layers * N_LAYER_SLOTS, sizeof(tensor));
    /* calloc'd KV cache: pages are only backed by memory once a position is written */
    const size_t kv = (size_t)e->n_layers * kd * e->max_seq;
    e->kc = (float *)calloc(kv ? kv : 1, 4);
    e->vc = (float *)calloc(kv ? kv : 1, 4);
    e->xb = (float *)calloc(B * e->dim, 4);
    e->q = (float *)calloc(B * qd + 1, 4);
    e->k = (float *)calloc(B * kd + 1, 4);
    e->v = (float *)calloc(B * kd + 1, 4);
    e->att = (float *)calloc(B * qd + 1, 4);
    e->hb = (float *)calloc(B * e->hidden + 1, 4);
    e->xq = (block_q8_0 *)calloc(B * (maxc / QK), sizeof(block_q8_0));
    e->xs = (float *)calloc(B * (maxc / QK), 4);
    e->xd = (float *)calloc(B * (maxc / QK), 4);
    if (e->nthreads < 1) e->nthreads = 1;
    e->scratch = (float *)calloc((size_t)e->nthreads * e->max_seq, 4);
    if (!e->lt || !e->kc || !e->vc || !e->xb || !e->q || !e->k || !e->v || !e->att || !e->hb || !e->xq || !e->xs || !e->xd ||
        !e->scratch) {
        PyErr_NoMemory();
        return -1;
    }
    e->pool = pool_create(e->nthreads);
    return 0;
small:
    PyErr_SetString(PyExc_ValueError, "Engine: a buffer is smaller than its shape needs");
    return -1;
}

static PyObject *Engine_set_tensor(Engine *e, PyObject *args) {
    int layer, slot, type, rows, cols;
    PyObject *obj;
    Py_ssize_t offset, stride;
    if (!PyArg_ParseTuple(args, "iiOniiin", &layer, &slot, &obj, &offset, &type, &rows, &cols, &stride)) return NULL;
    tensor *t;
    if (layer < 0) {
        if (slot < 0 || slot >= N_GLOBAL_SLOTS) goto bad;
        t = &e->gt[slot];
    } else {
        if (layer >= e->n_layers || slot < 0 || slot >= N_LAYER_SLOTS) goto bad;
        t = &e->lt[(size_t)layer * N_LAYER_SLOTS + slot];
    }
    const size_t rb = row_bytes(type, cols);
    if ((rb == 0 && cols != 0) || (type_is_quant(type) && cols % QK) || rows < 0 || cols < 0 || offset < 0 ||
        (rows > 1 && (size_t)stride < rb)) {
        PyErr_SetString(PyExc_ValueError, "set_tensor: unsupported type or bad shape");
        return NULL;
    }
    Py_buffer *b;
    if (hold_buffer(e, obj, 0, &b) < 0) return NULL;
    if (rows > 0 && (size_t)offset + (size_t)(rows - 1) * (size_t)stride + rb > (size_t)b->len) {
        PyErr_SetString(PyExc_ValueError, "set_tensor: tensor extends past its buffer");
        return NULL;
    }
    t->data = (const uint8_t *)b->buf + offset;
    t->stride = (size_t)stride;
    t->type = type;
    t->rows = rows;
    t->cols = cols;
    uint8_t *own = maybe_repack(t);
    if (own) { /* the repacked copy replaces the source: let Python free it */
        void **no = (void **)realloc(e->owned, sizeof(void *) * (size_t)(e->n_owned + 1));
        if (!no) { free(own); return PyErr_NoMemory(); }
        e->owned = no;
        e->owned[e->n_owned++] = own;
        PyBuffer_Release(&e->held[--e->n_held]);
    }
    Py_RETURN_NONE;
bad:
    PyErr_SetString(PyExc_IndexError, "set_tensor: bad layer or slot");
    return NULL;
}

static inline tensor *LT(Engine *e, int l, int s) { return &e->lt[(size_t)l * N_LAYER_SLOTS + s]; }

static int check_pos(Engine *e, int layer, int pos, int T) {
    if (layer < 0 || layer >= e->n_layers || pos < 0 || T < 1 || T > e->max_batch || pos + T > e->max_seq) {
        PyErr_Format(PyExc_ValueError, "engine: bad layer/pos/batch (layer %d, pos %d, T %d, max_seq %d)", layer, pos, T,
                     e->max_seq);
        return -1;
    }
    return 0;
}

/* out[0:T] = this node's partial sum of the attention block of `layer` */
static void run_attn(Engine *e, int l, int pos, int T) {
    const int dim = e->dim, hd = e->hd, half = hd / 2;
    const int qd = e->nh * hd, kd = e->nkv * hd;
    const tensor *wq = LT(e, l, S_Q), *wk = LT(e, l, S_K), *wv = LT(e, l, S_V), *wo = LT(e, l, S_O);
    const float *norm = (const float *)LT(e, l, S_ATTN_NORM)->data;
    for (int t = 0; t < T; t++) rmsnorm(e->xb + (size_t)t * dim, e->x + (size_t)t * dim, norm, dim, e->eps);
    if (e->nh == 0) {
        memset(e->out, 0, sizeof(float) * (size_t)T * dim);
        return;
    }
    act a;
    act_prepare(&a, e->xb, T, dim, e->xq, e->xs, e->xd, type_is_quant(wq->type) || type_is_quant(wk->type) || type_is_quant(wv->type));
    const tensor w3[3] = {*wq, *wk, *wv};
    float *const y3[3] = {e->q, e->k, e->v};
    const int ld3[3] = {qd, kd, kd};
    matmul(e->pool, &a, 3, w3, y3, ld3);
    const size_t layer_off = (size_t)l * e->nkv * e->max_seq * hd;
    for (int t = 0; t < T; t++) {
        const size_t p = (size_t)(pos + t);
        rope_rows(e->q + (size_t)t * qd, e->nh, hd, e->cos_t + p * half, e->sin_t + p * half);
        rope_rows(e->k + (size_t)t * kd, e->nkv, hd, e->cos_t + p * half, e->sin_t + p * half);
        for (int h = 0; h < e->nkv; h++) {
            const size_t dst = layer_off + ((size_t)h * e->max_seq + p) * hd;
            memcpy(e->kc + dst, e->k + (size_t)t * kd + (size_t)h * hd, sizeof(float) * hd);
            memcpy(e->vc + dst, e->v + (size_t)t * kd + (size_t)h * hd, sizeof(float) * hd);
        }
    }
    attention(e->pool, e->q, e->kc + layer_off, e->vc + layer_off, e->att, e->scratch, T, pos, e->nh, e->nkv, hd, e->max_seq);
    act_prepare(&a, e->att, T, qd, e->xq, e->xs, e->xd, type_is_quant(wo->type));
    float *const yo[1] = {e->out};
    const int ldo[1] = {dim};
    matmul(e->pool, &a, 1, wo, yo, ldo);
}

/* out[0:T] = this node's partial sum of the feed-forward block of `layer` */
static void run_ffn(Engine *e, int l, int T) {
    const int dim = e->dim;
    const tensor *wg = LT(e, l, S_GATE), *wu = LT(e, l, S_UP), *wd = LT(e, l, S_DOWN);
    const float *norm = (const float *)LT(e, l, S_FFN_NORM)->data;
    for (int t = 0; t < T; t++) rmsnorm(e->xb + (size_t)t * dim, e->x + (size_t)t * dim, norm, dim, e->eps);
    if (e->hidden == 0) {
        memset(e->out, 0, sizeof(float) * (size_t)T * dim);
        return;
    }
    act a;
    act_prepare(&a, e->xb, T, dim, e->xq, e->xs, e->xd, type_is_quant(wg->type) || type_is_quant(wu->type));
    matmul_swiglu(e->pool, &a, wg, wu, e->hb, e->hidden);
    act_prepare(&a, e->hb, T, e->hidden, e->xq, e->xs, e->xd, type_is_quant(wd->type));
    float *const yd[1] = {e->out};
    const int ldd[1] = {dim};
    matmul(e->pool, &a, 1, wd, yd, ldd);
}

static void add_out(Engine *e, int T) {
    const size_t n = (size_t)T * e->dim;
    for (size_t i = 0; i < n; i++) e->x[i] += e->out[i];
}

/* single-node fast path: every layer in one call, residual adds included */
static PyObject *Engine_forward(Engine *e, PyObject *args) {
    int pos, T;
    if (!PyArg_ParseTuple(args, "ii", &pos, &T) || check_pos(e, 0, pos, T) < 0) return NULL;
    Py_BEGIN_ALLOW_THREADS for (int l = 0; l < e->n_layers; l++) {
        run_attn(e, l, pos, T);
        add_out(e, T);
        run_ffn(e, l, T);
        add_out(e, T);
    }
    Py_END_ALLOW_THREADS Py_RETURN_NONE;
}

/* logits[0:vocab] = output head (this node's rows) . final_norm(x[row]) */
static PyObject *Engine_logits(Engine *e, PyObject *args) {
    int row;
    if (!PyArg_ParseTuple(args, "i", &row)) return NULL;
    if (row < 0 || row >= e->max_batch || e->vocab == 0 || !e->gt[S_OUTPUT].data || !e->gt[S_OUT_NORM].data) {
        PyErr_SetString(PyExc_ValueError, "logits: no output head on this node or bad row");
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
    rmsnorm(e->xb, e->x + (size_t)row * e->dim, (const float *)e->gt[S_OUT_NORM].data, e->dim, e->eps);
    act a;
    act_prepare(&a, e->xb, 1, e->dim, e->xq, e->xs, e->xd, type_is_quant(e->gt[S_OUTPUT].type));
    float *const y[1] = {e->logits};
    const int ld[1] = {e->vocab};
    matmul(e->pool, &a, 1, &e->gt[S_OUTPUT], y, ld);
    Py_END_ALLOW_THREADS Py_RETURN_NONE;
}

/* ================================ cluster all-reduce ================================
 * The same frames as dllama.net.protocol: header <2sBBI (b"DL", type PARTIAL=10, flags 0, length) + u32 sync
 * step + T rows of this node's partial sum (Q8_0 blocks or f32). Sent to every peer and received from every
 * peer in one poll() loop (no deadlock on full socket buffers, no spinning); then every node adds all partials,
 * its own quantized one included, in node order, so the residual stream is bit-identical on every node. */
enum { XC_OK = 0, XC_TIMEOUT = 1, XC_CLOSED = 2, XC_BADFRAME = 3, XC_SOCKERR = 4 };
#define FRAME_HEAD 12
#define MSG_PARTIAL 10

static size_t sync_row_bytes(const Engine *e) {
    return e->fmt == 0 ? (size_t)e->dim / QK * sizeof(block_q8_0) : (size_t)e->dim * 4;
}

static double mono_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static int check_head(const uint8_t *h, size_t total) {
    uint32_t len;
    memcpy(&len, h + 4, 4);
    return h[0] == 'D' && h[1] == 'L' && h[2] == MSG_PARTIAL && h[3] == 0 && len == total - 8;
}

static int exchange(Engine *e, int T, uint32_t step) {
    const size_t row = sync_row_bytes(e), total = FRAME_HEAD + (size_t)T * row;
    const uint32_t len = (uint32_t)(total - 8);
    uint8_t *s = e->sbuf;
    s[0] = 'D'; s[1] = 'L'; s[2] = MSG_PARTIAL; s[3] = 0;
    memcpy(s + 4, &len, 4);
    memcpy(s + 8, &step, 4);
    if (e->fmt == 0) quantize_row_q80(e->out, (block_q8_0 *)(s + FRAME_HEAD), NULL, T * e->dim);
    else memcpy(s + FRAME_HEAD, e->out, (size_t)T * e->dim * 4);
    const double t0 = mono_s();
    size_t sent[64], got[64];
    struct pollfd pfd[64];
    int pending = e->n_links;
    for (int j = 0; j < e->n_links; j++) {
        sent[j] = got[j] = 0;
        ssize_t k = send(e->fds[j], s, total, MSG_NOSIGNAL);
        if (k > 0) sent[j] = (size_t)k;
        else if (k < 0 && errno != EAGAIN && errno != EWOULDBLOCK) {
            e->fail_link = j; e->fail_errno = errno;
            return XC_SOCKERR;
        }
    }
    while (pending) {
        int np = 0, map[64];
        for (int j = 0; j < e->n_links; j++) {
            if (sent[j] >= total && got[j] >= total) continue;
            pfd[np].fd = e->fds[j];
            pfd[np].events = (short)((got[j] < total ? POLLIN : 0) | (sent[j] < total ? POLLOUT : 0));
            pfd[np].revents = 0;
            map[np++] = j;
        }
        const int r = poll(pfd, (nfds_t)np, e->timeout_ms);
        if (r < 0) {
            if (errno == EINTR) continue;
            e->fail_link = map[0]; e->fail_errno = errno;
            return XC_SOCKERR;
        }
        if (r == 0) {
            e->fail_link = map[0];
            for (int i = 0; i < np; i++) if (got[map[i]] < total) { e->fail_link = map[i]; break; }
            return XC_TIMEOUT;
        }
        for (int i = 0; i < np; i++) {
            const int j = map[i];
            uint8_t *rb = e->rbuf + (size_t)j * e->frame_cap;
            if ((pfd[i].revents & POLLOUT) && sent[j] < total) {
                ssize_t k = send(e->fds[j], s + sent[j], total - sent[j], MSG_NOSIGNAL);
                if (k > 0) sent[j] += (size_t)k;
                else if (k < 0 && errno != EAGAIN && errno != EWOULDBLOCK) {
                    e->fail_link = j; e->fail_errno = errno;
                    return XC_SOCKERR;
                }
            }
            if ((pfd[i].revents & (POLLIN | POLLHUP | POLLERR)) && got[j] < total) {
                ssize_t k = recv(e->fds[j], rb + got[j], total - got[j], 0);
                if (k == 0) {
                    e->fail_link = j; e->fail_got = got[j];
                    return got[j] >= 8 && !check_head(rb, total) ? XC_BADFRAME : XC_CLOSED;
                }
                if (k < 0) {
                    if (errno == EAGAIN || errno == EWOULDBLOCK) continue;
                    e->fail_link = j; e->fail_errno = errno; e->fail_got = got[j];
                    return XC_SOCKERR;
                }
                const size_t before = got[j];
                got[j] += (size_t)k;
                if (before < 8 && got[j] >= 8 && !check_head(rb, total)) {
                    e->fail_link = j; e->fail_got = got[j];
                    return XC_BADFRAME;
                }
            }
            if (sent[j] >= total && got[j] >= total) pending--;
        }
    }
    e->net_s += mono_s() - t0;
    for (int j = 0; j < e->n_links; j++) {
        uint32_t st;
        memcpy(&st, e->rbuf + (size_t)j * e->frame_cap + 8, 4);
        if (st != step) {
            e->fail_link = j; e->fail_got = total;
            return XC_BADFRAME;
        }
    }
    const size_t n = (size_t)T * e->dim;
    memset(e->acc, 0, n * 4);
    for (int node = 0; node <= e->n_links; node++) {
        const uint8_t *payload = NULL;
        if (node == e->self_index) payload = s + FRAME_HEAD;
        else {
            for (int j = 0; j < e->n_links; j++)
                if (e->link_index[j] == node) payload = e->rbuf + (size_t)j * e->frame_cap + FRAME_HEAD;
        }
        if (e->fmt == 0) accumulate_q80(e->acc, (const block_q8_0 *)payload, (int)n);
        else {
            const float *p = (const float *)payload;
            for (size_t i = 0; i < n; i++) e->acc[i] += p[i];
        }
    }
    for (size_t i = 0; i < n; i++) e->x[i] += e->acc[i];
    return XC_OK;
}

static PyObject *Engine_set_links(Engine *e, PyObject *args) {
    PyObject *fds_o, *idx_o;
    int self_index, fmt, timeout_ms;
    if (!PyArg_ParseTuple(args, "OOiii", &fds_o, &idx_o, &self_index, &fmt, &timeout_ms)) return NULL;
    const Py_ssize_t n = PySequence_Size(fds_o);
    if (n < 1 || n > 63 || PySequence_Size(idx_o) != n || (fmt != 0 && fmt != 1) || self_index < 0 || self_index > n) {
        PyErr_SetString(PyExc_ValueError, "set_links: bad arguments");
        return NULL;
    }
    free(e->fds); free(e->link_index); free(e->sbuf); free(e->rbuf); free(e->acc);
    e->n_links = (int)n;
    e->self_index = self_index;
    e->fmt = fmt;
    e->timeout_ms = timeout_ms;
    e->fds = (int *)calloc((size_t)n, sizeof(int));
    e->link_index = (int *)calloc((size_t)n, sizeof(int));
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *a = PySequence_GetItem(fds_o, i), *b = PySequence_GetItem(idx_o, i);
        e->fds[i] = (int)PyLong_AsLong(a);
        e->link_index[i] = (int)PyLong_AsLong(b);
        Py_XDECREF(a);
        Py_XDECREF(b);
    }
    if (PyErr_Occurred()) return NULL;
    e->frame_cap = FRAME_HEAD + (size_t)e->max_batch * sync_row_bytes(e);
    e->sbuf = (uint8_t *)malloc(e->frame_cap);
    e->rbuf = (uint8_t *)malloc(e->frame_cap * (size_t)n);
    e->acc = (float *)malloc((size_t)e->max_batch * e->dim * 4);
    if (!e->sbuf || !e->rbuf || !e->acc) return PyErr_NoMemory();
    Py_RETURN_NONE;
}

/* all layers over the cluster: returns None, or (code, link, errno, bytes_received, frame_head) on failure */
static PyObject *Engine_forward_cluster(Engine *e, PyObject *args) {
    int pos, T;
    if (!PyArg_ParseTuple(args, "ii", &pos, &T) || check_pos(e, 0, pos, T) < 0) return NULL;
    if (!e->n_links) {
        PyErr_SetString(PyExc_RuntimeError, "forward_cluster: no links set");
        return NULL;
    }
    int rc = XC_OK;
    e->fail_link = -1; e->fail_errno = 0; e->fail_got = 0;
    Py_BEGIN_ALLOW_THREADS for (int l = 0; l < e->n_layers && rc == XC_OK; l++) {
        run_attn(e, l, pos, T);
        rc = exchange(e, T, (uint32_t)(2 * l));
        if (rc != XC_OK) break;
        run_ffn(e, l, T);
        rc = exchange(e, T, (uint32_t)(2 * l + 1));
    }
    Py_END_ALLOW_THREADS if (rc == XC_OK) Py_RETURN_NONE;
    const uint8_t *rb = e->fail_link >= 0 ? e->rbuf + (size_t)e->fail_link * e->frame_cap : NULL;
    const Py_ssize_t nh = rb ? (Py_ssize_t)(e->fail_got < 8 ? e->fail_got : 8) : 0;
    return Py_BuildValue("iiiny#", rc, e->fail_link, e->fail_errno, (Py_ssize_t)e->fail_got, rb, nh);
}

/* the bytes after the 8-byte header that a failed exchange already received from link j (ERROR text) */
static PyObject *Engine_received(Engine *e, PyObject *args) {
    int j;
    Py_ssize_t n;
    if (!PyArg_ParseTuple(args, "in", &j, &n)) return NULL;
    if (j < 0 || j >= e->n_links || n < 0 || (size_t)n > e->frame_cap) {
        PyErr_SetString(PyExc_ValueError, "received: bad link or size");
        return NULL;
    }
    return PyBytes_FromStringAndSize((const char *)e->rbuf + (size_t)j * e->frame_cap, n);
}

static PyObject *Engine_take_net_s(Engine *e, PyObject *noargs) {
    const double v = e->net_s;
    e->net_s = 0;
    return PyFloat_FromDouble(v);
}

static PyMethodDef Engine_methods[] = {
    {"set_tensor", (PyCFunction)Engine_set_tensor, METH_VARARGS,
     "set_tensor(layer, slot, buffer, offset, type, rows, cols, row_stride); layer -1 for global tensors"},
    {"forward", (PyCFunction)Engine_forward, METH_VARARGS, "forward(pos, T): all layers, single node"},
    {"logits", (PyCFunction)Engine_logits, METH_VARARGS, "logits(row): output head on x[row]"},
    {"set_links", (PyCFunction)Engine_set_links, METH_VARARGS,
     "set_links(fds, node_indices, self_index, fmt 0=q80 1=f32, timeout_ms)"},
    {"forward_cluster", (PyCFunction)Engine_forward_cluster, METH_VARARGS,
     "forward_cluster(pos, T): all layers with an all-reduce after each block; None or failure tuple"},
    {"received", (PyCFunction)Engine_received, METH_VARARGS, "received(link, n): bytes a failed exchange got"},
    {"take_net_s", (PyCFunction)Engine_take_net_s, METH_NOARGS, "seconds spent in exchanges since last call"},
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

/* ================================ module-level kernels ================================ */

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
static PyObject *py_matmul(PyObject *self, PyObject *args) {
    Py_buffer w, x, y;
    int type, rows, cols, T, nthreads;
    Py_ssize_t stride;
    if (!PyArg_ParseTuple(args, "y*iiiny*w*ii", &w, &type, &rows, &cols, &stride, &x, &y, &T, &nthreads)) return NULL;
    PyObject *res = NULL;
    const size_t rb = row_bytes(type, cols);
    if (rb == 0 || (type_is_quant(type) && cols % QK) || rows < 1 || T < 1 || (size_t)stride < rb ||
        (size_t)w.len < (size_t)(rows - 1) * stride + rb || x.len < (Py_ssize_t)T * cols * 4 ||
        y.len < (Py_ssize_t)T * rows * 4) {
        PyErr_SetString(PyExc_ValueError, "matmul: bad sizes");
    } else {
        const int nb = cols / QK;
        block_q8_0 *xq = (block_q8_0 *)malloc(sizeof(block_q8_0) * (size_t)T * (nb ? nb : 1));
        float *xs = (float *)malloc(sizeof(float) * (size_t)T * (nb ? nb : 1));
        float *xd = (float *)malloc(sizeof(float) * (size_t)T * (nb ? nb : 1));
        pool *p = pool_create(nthreads);
        tensor t = {(const uint8_t *)w.buf, (size_t)stride, type, rows, cols};
        uint8_t *own = maybe_repack(&t);
        Py_BEGIN_ALLOW_THREADS act a;
        act_prepare(&a, (const float *)x.buf, T, cols, xq, xs, xd, type_is_quant(type));
        float *const yy[1] = {(float *)y.buf};
        const int ld[1] = {rows};
        matmul(p, &a, 1, &t, yy, ld);
        Py_END_ALLOW_THREADS pool_destroy(p);
        free(own);
        free(xq);
        free(xs);
        free(xd);
        res = Py_None;
        Py_INCREF(res);
    }
    PyBuffer_Release(&w);
    PyBuffer_Release(&x);
    PyBuffer_Release(&y);
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
    int n_heads, head_dim;
    if (!PyArg_ParseTuple(args, "w*iiy*y*", &x, &n_heads, &head_dim, &c, &s)) return NULL;
    PyObject *res = NULL;
    if (x.len != (Py_ssize_t)n_heads * head_dim * 4 || c.len < head_dim / 2 * 4 || s.len < head_dim / 2 * 4)
        PyErr_SetString(PyExc_ValueError, "rope: bad sizes");
    else {
        rope_rows((float *)x.buf, n_heads, head_dim, (const float *)c.buf, (const float *)s.buf);
        res = Py_None;
        Py_INCREF(res);
    }
    PyBuffer_Release(&x);
    PyBuffer_Release(&c);
    PyBuffer_Release(&s);
    return res;
}

/* attention(q[T,nh,hd], kc[nkv,max_seq,hd], vc, out[T,nh,hd], T, pos, nh, nkv, hd, max_seq, nthreads) */
static PyObject *py_attention(PyObject *self, PyObject *args) {
    Py_buffer q, kc, vc, out;
    int T, pos, nh, nkv, hd, max_seq, nthreads;
    if (!PyArg_ParseTuple(args, "y*y*y*w*iiiiiii", &q, &kc, &vc, &out, &T, &pos, &nh, &nkv, &hd, &max_seq, &nthreads))
        return NULL;
    PyObject *res = NULL;
    const Py_ssize_t qn = (Py_ssize_t)T * nh * hd * 4, kn = (Py_ssize_t)nkv * max_seq * hd * 4;
    if (nkv < 1 || nh % nkv || q.len != qn || out.len != qn || kc.len != kn || vc.len != kn || pos + T > max_seq) {
        PyErr_SetString(PyExc_ValueError, "attention: bad sizes");
    } else {
        pool *p = pool_create(nthreads);
        float *scratch = (float *)malloc(sizeof(float) * (size_t)pool_size(p) * max_seq);
        Py_BEGIN_ALLOW_THREADS attention(p, (const float *)q.buf, (const float *)kc.buf, (const float *)vc.buf,
                                         (float *)out.buf, scratch, T, pos, nh, nkv, hd, max_seq);
        Py_END_ALLOW_THREADS free(scratch);
        pool_destroy(p);
        res = Py_None;
        Py_INCREF(res);
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

static PyMethodDef module_methods[] = {
    {"quantize_q80", py_quantize_q80, METH_VARARGS, "quantize_q80(src_f32, dst_bytes)"},
    {"accumulate_q80", py_accumulate_q80, METH_VARARGS, "accumulate_q80(dst_f32, src_q80): dst += dequant(src)"},
    {"dequantize", py_dequantize, METH_VARARGS, "dequantize(src, type, dst_f32)"},
    {"matmul", py_matmul, METH_VARARGS, "matmul(w, type, rows, cols, stride, x, y, T, nthreads)"},
    {"rmsnorm", py_rmsnorm, METH_VARARGS, "rmsnorm(x, w, eps, out)"},
    {"rope", py_rope, METH_VARARGS, "rope(x, n_heads, head_dim, cos, sin) in place"},
    {"attention", py_attention, METH_VARARGS, "attention(q, kc, vc, out, T, pos, nh, nkv, hd, max_seq, nthreads)"},
    {"silu_mul", py_silu_mul, METH_VARARGS, "silu_mul(g, u): g = silu(g) * u"},
    {"set_simd", py_set_simd, METH_VARARGS, "set_simd(level) -> previous level"},
    {"simd_info", py_simd_info, METH_NOARGS, "active and best SIMD level"},
    {"set_repack", py_set_repack, METH_VARARGS, "set_repack(on) -> previous: 8-row repacking of Q4_0/Q4_1 at load"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef moduledef = {PyModuleDef_HEAD_INIT, "_kernels", "dllama C kernels", -1, module_methods};

PyMODINIT_FUNC PyInit__kernels(void) {
    g_simd = simd_best();
    const char *nr = getenv("DLLAMA_NO_REPACK");
    g_repack = simd_best() >= SIMD_AVX2 && !(nr && *nr && *nr != '0');
    if (PyType_Ready(&EngineType) < 0) return NULL;
    PyObject *m = PyModule_Create(&moduledef);
    if (!m) return NULL;
    Py_INCREF(&EngineType);
    PyModule_AddObject(m, "Engine", (PyObject *)&EngineType);
    PyModule_AddIntConstant(m, "SIMD_SCALAR", SIMD_SCALAR);
    PyModule_AddIntConstant(m, "SIMD_NEON", SIMD_NEON);
    PyModule_AddIntConstant(m, "SIMD_AVX2", SIMD_AVX2);
    PyModule_AddIntConstant(m, "SIMD_AVX512VNNI", SIMD_AVX512VNNI);
    return m;
}
