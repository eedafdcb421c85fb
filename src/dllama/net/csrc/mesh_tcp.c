/* dllama.net._mesh: the TCP all-to-all, one implementation of the engine's comm interface (engine/csrc/comm.h).
 *
 * Per exchange every node sends one frame to every other node and receives one from each, in one poll() loop over
 * non-blocking sockets (no deadlock on full socket buffers, no spinning, the GIL released by the engine's caller).
 * Frame: the 4 bytes `prefix` (magic, type, flags of a partial-sum frame, handed over by dllama.net.protocol, which
 * owns the frame layout), u32 length (4 + payload), u32 sync step, payload. Payloads land straight in the engine's
 * receive buffer. A frame of one of the `explain` types (the peer's ERROR / ABORT) is read whole and returned as the
 * failure, so the caller can say why the peer gave up. */
#define PY_SSIZE_T_CLEAN
#define _POSIX_C_SOURCE 200809L
#include <Python.h>
#include <errno.h>
#include <poll.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>

#include "../../engine/csrc/comm.h"

#define HEAD 12
#define MAX_NODES 64

typedef struct {
    comm base; /* first: the capsule points here */
    int fds[MAX_NODES]; /* socket of each node, -1 for ourselves */
    int timeout_ms;
    uint8_t prefix[4];
    uint8_t explain[8];
    int n_explain;
    uint8_t *sbuf; /* [HEAD + len] our frame */
    size_t scap;
    uint8_t head[MAX_NODES][HEAD];
} tcp_mesh;

static double mono_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static int fail(tcp_mesh *m, int node, int kind, int err) {
    m->base.fail.node = node;
    m->base.fail.kind = kind;
    m->base.fail.err = err;
    return kind;
}

static int is_explain(const tcp_mesh *m, uint8_t type) {
    for (int i = 0; i < m->n_explain; i++)
        if (m->explain[i] == type) return 1;
    return 0;
}

/* the peer sent an ERROR/ABORT frame: read its text (already `have` bytes of it in hand) within a short time */
static int read_explanation(tcp_mesh *m, int node, const uint8_t *have, size_t n_have, uint32_t len) {
    comm_failure *f = &m->base.fail;
    f->msg_type = m->head[node][2];
    f->msg_len = 0;
    if (len > COMM_MSG_MAX) return fail(m, node, COMM_BADFRAME, 0);
    if (n_have > len) n_have = len;
    memcpy(f->msg, have, n_have);
    size_t got = n_have;
    const double deadline = mono_s() + 2.0;
    while (got < len) {
        struct pollfd p = {m->fds[node], POLLIN, 0};
        const int ms = (int)((deadline - mono_s()) * 1000);
        if (ms <= 0 || poll(&p, 1, ms) <= 0) break;
        const ssize_t k = recv(m->fds[node], f->msg + got, len - got, 0);
        if (k <= 0) {
            if (k < 0 && (errno == EAGAIN || errno == EINTR)) continue;
            break;
        }
        m->base.received += (uint64_t)k;
        got += (size_t)k;
    }
    f->msg_len = got;
    return fail(m, node, COMM_PEER_ERROR, 0);
}

static int tcp_exchange(comm *c, const uint8_t *send_buf, size_t len, uint32_t step, uint8_t *recv_buf) {
    tcp_mesh *m = (tcp_mesh *)c;
    const int N = c->n_nodes;
    const size_t total = HEAD + len;
    memset(&c->fail, 0, sizeof c->fail);
    c->fail.node = -1;
    if (m->scap < total) {
        uint8_t *nb = (uint8_t *)realloc(m->sbuf, total);
        if (!nb) return fail(m, -1, COMM_SOCKERR, ENOMEM);
        m->sbuf = nb;
        m->scap = total;
    }
    const uint32_t flen = (uint32_t)(len + 4);
    memcpy(m->sbuf, m->prefix, 4);
    memcpy(m->sbuf + 4, &flen, 4);
    memcpy(m->sbuf + 8, &step, 4);
    memcpy(m->sbuf + HEAD, send_buf, len);
    const double t0 = mono_s();
    size_t sent[MAX_NODES], got[MAX_NODES];
    int pending = 0;
    for (int j = 0; j < N; j++) {
        sent[j] = got[j] = 0;
        if (j == c->self) continue;
        pending++;
        const ssize_t k = send(m->fds[j], m->sbuf, total, MSG_NOSIGNAL);
        if (k > 0) {
            sent[j] = (size_t)k;
            c->sent += (uint64_t)k;
        } else if (k < 0 && errno != EAGAIN && errno != EWOULDBLOCK) {
            return fail(m, j, COMM_SOCKERR, errno);
        }
    }
    struct pollfd pfd[MAX_NODES];
    int map[MAX_NODES];
    while (pending) {
        int np = 0;
        for (int j = 0; j < N; j++) {
            if (j == c->self || (sent[j] >= total && got[j] >= total)) continue;
            pfd[np].fd = m->fds[j];
            pfd[np].events = (short)((got[j] < total ? POLLIN : 0) | (sent[j] < total ? POLLOUT : 0));
            pfd[np].revents = 0;
            map[np++] = j;
        }
        const int r = poll(pfd, (nfds_t)np, m->timeout_ms);
        if (r < 0) {
            if (errno == EINTR) continue;
            return fail(m, map[0], COMM_SOCKERR, errno);
        }
        if (r == 0) { /* blame a peer we are still waiting for */
            int who = map[0];
            for (int i = 0; i < np; i++)
                if (got[map[i]] < total) { who = map[i]; break; }
            return fail(m, who, COMM_TIMEOUT, 0);
        }
        for (int i = 0; i < np; i++) {
            const int j = map[i];
            if ((pfd[i].revents & POLLOUT) && sent[j] < total) {
                const ssize_t k = send(m->fds[j], m->sbuf + sent[j], total - sent[j], MSG_NOSIGNAL);
                if (k > 0) {
                    sent[j] += (size_t)k;
                    c->sent += (uint64_t)k;
                } else if (k < 0 && errno != EAGAIN && errno != EWOULDBLOCK) {
                    return fail(m, j, COMM_SOCKERR, errno);
                }
            }
            if ((pfd[i].revents & (POLLIN | POLLHUP | POLLERR)) && got[j] < total) {
                /* the header into head[j], the payload straight into the receive buffer */
                uint8_t *dst = got[j] < HEAD ? m->head[j] + got[j] : recv_buf + (size_t)j * len + (got[j] - HEAD);
                const size_t want = got[j] < HEAD ? HEAD - got[j] : total - got[j];
                const ssize_t k = recv(m->fds[j], dst, want, 0);
                if (k == 0) return fail(m, j, got[j] >= 8 ? COMM_BADFRAME : COMM_CLOSED, 0);
                if (k < 0) {
                    if (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR) continue;
                    return fail(m, j, COMM_SOCKERR, errno);
                }
                c->received += (uint64_t)k;
                const size_t before = got[j];
                got[j] += (size_t)k;
                if (before < 8 && got[j] >= 8) { /* the header's fixed part and length are in: check them */
                    const uint8_t *h = m->head[j];
                    uint32_t l;
                    memcpy(&l, h + 4, 4);
                    if (h[0] == m->prefix[0] && h[1] == m->prefix[1] && h[3] == 0 && is_explain(m, h[2]))
                        return read_explanation(m, j, h + 8, got[j] - 8, l);
                    if (memcmp(h, m->prefix, 4) != 0 || l != flen) return fail(m, j, COMM_BADFRAME, 0);
                }
            }
            if (sent[j] >= total && got[j] >= total) pending--;
        }
    }
    c->wait_s += mono_s() - t0;
    for (int j = 0; j < N; j++) {
        uint32_t st;
        if (j == c->self) continue;
        memcpy(&st, m->head[j] + 8, 4);
        if (st != step) return fail(m, j, COMM_BADFRAME, 0);
    }
    return COMM_OK;
}

/* ================================ Python type ================================ */
typedef struct {
    PyObject_HEAD
    tcp_mesh *m;
    PyObject *capsule;
} TcpMesh;

static void TcpMesh_dealloc(TcpMesh *self) {
    Py_XDECREF(self->capsule);
    if (self->m) free(self->m->sbuf);
    free(self->m);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int TcpMesh_init(TcpMesh *self, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"fds", "self_index", "prefix", "explain", "timeout_ms", NULL};
    PyObject *fds_o;
    int self_index, timeout_ms;
    Py_buffer prefix, explain;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "Oiy*y*i", kwlist, &fds_o, &self_index, &prefix, &explain, &timeout_ms))
        return -1;
    int rc = -1;
    const Py_ssize_t n = PySequence_Size(fds_o);
    if (self->m || n < 2 || n > MAX_NODES || self_index < 0 || self_index >= n || prefix.len != 4 ||
        explain.len > 8 || timeout_ms < 1) {
        PyErr_SetString(PyExc_ValueError, "TcpMesh: bad arguments");
        goto done;
    }
    self->m = (tcp_mesh *)calloc(1, sizeof(tcp_mesh));
    if (!self->m) {
        PyErr_NoMemory();
        goto done;
    }
    tcp_mesh *m = self->m;
    m->base.n_nodes = (int)n;
    m->base.self = self_index;
    m->base.exchange = tcp_exchange;
    m->timeout_ms = timeout_ms;
    memcpy(m->prefix, prefix.buf, 4);
    memcpy(m->explain, explain.buf, (size_t)explain.len);
    m->n_explain = (int)explain.len;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *o = PySequence_GetItem(fds_o, i);
        const long fd = o ? PyLong_AsLong(o) : -1;
        Py_XDECREF(o);
        if (PyErr_Occurred()) goto done;
        if ((i == self_index) != (fd < 0)) {
            PyErr_SetString(PyExc_ValueError, "TcpMesh: need a socket for every node but ourselves");
            goto done;
        }
        m->fds[i] = (int)fd;
    }
    self->capsule = PyCapsule_New(&m->base, COMM_CAPSULE, NULL);
    rc = self->capsule ? 0 : -1;
done:
    PyBuffer_Release(&prefix);
    PyBuffer_Release(&explain);
    return rc;
}

static PyObject *TcpMesh_counters(TcpMesh *self, PyObject *noargs) {
    if (!self->m) Py_RETURN_NONE;
    return Py_BuildValue("dKK", self->m->base.wait_s, (unsigned long long)self->m->base.sent,
                         (unsigned long long)self->m->base.received);
}

static PyObject *TcpMesh_get_capsule(TcpMesh *self, void *closure) {
    if (!self->capsule) {
        PyErr_SetString(PyExc_RuntimeError, "TcpMesh not initialised");
        return NULL;
    }
    Py_INCREF(self->capsule);
    return self->capsule;
}

static PyObject *TcpMesh_set_timeout(TcpMesh *self, PyObject *arg) {
    const long ms = PyLong_AsLong(arg);
    if (ms == -1 && PyErr_Occurred()) return NULL;
    if (!self->m || ms < 1 || ms > 86400000L) {
        PyErr_SetString(PyExc_ValueError, "set_timeout: 1 ms .. 1 day");
        return NULL;
    }
    self->m->timeout_ms = (int)ms;
    Py_RETURN_NONE;
}

static PyMethodDef TcpMesh_methods[] = {
    {"set_timeout", (PyCFunction)TcpMesh_set_timeout, METH_O, "set_timeout(ms): longest wait for a peer's frame"},
    {"counters", (PyCFunction)TcpMesh_counters, METH_NOARGS,
     "(seconds waited, bytes sent, bytes received) since creation, as counted at the socket calls"},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef TcpMesh_getset[] = {
    {"capsule", (getter)TcpMesh_get_capsule, NULL, "the comm interface for Engine.set_comm", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject TcpMeshType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "dllama.net._mesh.TcpMesh",
    .tp_basicsize = sizeof(TcpMesh),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)TcpMesh_init,
    .tp_dealloc = (destructor)TcpMesh_dealloc,
    .tp_methods = TcpMesh_methods,
    .tp_getset = TcpMesh_getset,
    .tp_doc = "TcpMesh(fds, self_index, prefix, explain, timeout_ms): all-to-all over connected sockets.",
};

static struct PyModuleDef moduledef = {PyModuleDef_HEAD_INIT, "_mesh", "dllama TCP all-to-all", -1, NULL};

PyMODINIT_FUNC PyInit__mesh(void) {
    if (PyType_Ready(&TcpMeshType) < 0) return NULL;
    PyObject *m = PyModule_Create(&moduledef);
    if (!m) return NULL;
    Py_INCREF(&TcpMeshType);
    PyModule_AddObject(m, "TcpMesh", (PyObject *)&TcpMeshType);
    PyModule_AddIntConstant(m, "HEAD", HEAD);
    PyModule_AddIntConstant(m, "TIMEOUT", COMM_TIMEOUT);
    PyModule_AddIntConstant(m, "CLOSED", COMM_CLOSED);
    PyModule_AddIntConstant(m, "BADFRAME", COMM_BADFRAME);
    PyModule_AddIntConstant(m, "SOCKERR", COMM_SOCKERR);
    PyModule_AddIntConstant(m, "PEER_ERROR", COMM_PEER_ERROR);
    PyModule_AddIntConstant(m, "NONFINITE", COMM_NONFINITE);
    return m;
}
