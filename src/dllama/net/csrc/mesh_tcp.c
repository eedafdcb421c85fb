/* dllama.net._mesh: the TCP links between all nodes, one implementation of the engine's comm interface
 * (engine/csrc/comm.h).
 *
 * Per exchange a node sends one frame to each of the peers the engine names (all of them, or one partner per round
 * of a butterfly; one sendmsg each: frame and tag) and receives one from each over non-blocking sockets (no
 * deadlock on full socket buffers, no spinning, the GIL released by the engine's caller): what has already arrived
 * is read before any poll(), a peer's whole frame (header, payload, tag) in one readv, so a peer that was ready costs
 * one readv and no poll() at all (was: a poll() and a recv() for each of header, payload and tag).
 * Frame: the 4 bytes `prefix` (magic, type, flags of a partial-sum frame, handed over by dllama.net.protocol, which
 * owns the frame layout), u32 length (4 + payload), u32 sync step, payload. Payloads land straight in the engine's
 * receive buffer. A frame of one of the `explain` types (the peer's ERROR / ABORT) is read whole and returned as the
 * failure, so the caller can say why the peer gave up.
 *
 * Integrity and encryption: the tag that follows every frame of a keyed link is the one defined in
 * dllama/net/protocol.py (the wire format is written there), here with the 12-byte head (prefix, length, step) as
 * the frame's header: AES-256-GCM under the link's key for that direction with nonce = the u64 sequence number,
 * over an empty plaintext with head | payload as associated data (AES-GMAC, the default), or with `--encrypt`
 * (the link's keys come with encrypt=True) over the payload as plaintext with the head as associated data, GCM's
 * 16-byte tag in either case. A frame altered, dropped, replayed or reordered on the way fails its tag
 * (COMM_INTEGRITY) before the engine adds it. Encrypted, each link gets its own copy of our frame (its own key),
 * and a received payload is decrypted in place in the receive buffer once its tag has arrived. OpenSSL's EVP
 * AES-GCM (libcrypto: AES-NI and carry-less multiply where the CPU has them). */
#define PY_SSIZE_T_CLEAN
#define _POSIX_C_SOURCE 200809L
#include <Python.h>
#include <errno.h>
#include <limits.h>
#include <poll.h>
#include <sched.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <time.h>

#include <openssl/crypto.h>
#include <openssl/evp.h>

#include "../../engine/csrc/comm.h"

#define HEAD 12
#define MAX_NODES 64
#define TAG 16

/* A nonce is never reused under a key: the keys are fresh for every connection and direction (HKDF over both
 * handshake nonces, dllama.net.protocol.frame_keys), one frame per sequence number, and the u64 counter never wraps.
 * The encrypted and the tag-only links never share a key (the encrypt flag is in the key derivation). */
typedef struct {
    EVP_CIPHER_CTX *tx, *rx; /* keyed AES-256-GCM per direction; NULL: no tag on this link */
    int encrypt; /* 1: payload encrypted (--encrypt); 0: AES-GMAC tag only */
    uint64_t seq_tx, seq_rx;
    uint8_t *ebuf; /* encrypted links: [HEAD + len] our frame under this link's key */
    size_t ecap;
} link_mac;

typedef struct {
    comm base; /* first: the capsule points here */
    int fds[MAX_NODES]; /* socket of each node, -1 for ourselves */
    int timeout_ms;
    double spin_s;   /* wait this long for peers' frames before sleeping in poll() (0: never spin) */
    double wait_avg; /* moving average of how long the frames took after our sends, seconds */
    uint8_t prefix[4];
    uint8_t explain[8];
    int n_explain;
    uint8_t *sbuf; /* [HEAD + len] our frame */
    size_t scap;
    uint8_t head[MAX_NODES][HEAD];
    link_mac lm[MAX_NODES];
    uint8_t stag[MAX_NODES][TAG], rtag[MAX_NODES][TAG];
    uint8_t over[MAX_NODES][TAG]; /* bytes read past a peer's ERROR / ABORT frame: its tag, for its Conn */
    size_t n_over[MAX_NODES];
} tcp_mesh;

static void gcm_nonce(uint64_t seq, uint8_t iv[12]) {
    for (int i = 0; i < 8; i++) iv[i] = (uint8_t)(seq >> (8 * i));
    memset(iv + 8, 0, 4);
}

/* AES-256-GMAC: the GCM tag of an empty plaintext with head | payload as associated data (the context keeps its
 * key across frames); used to make our tags and, compared with CRYPTO_memcmp, to check the peers' */
static int frame_tag(EVP_CIPHER_CTX *c, uint64_t seq, const uint8_t *head, const uint8_t *payload, size_t len,
                     uint8_t *tag) {
    uint8_t iv[12], none[16];
    int n;
    gcm_nonce(seq, iv);
    if (len > INT_MAX || !EVP_EncryptInit_ex(c, NULL, NULL, NULL, iv) || !EVP_EncryptUpdate(c, NULL, &n, head, HEAD) ||
        !EVP_EncryptUpdate(c, NULL, &n, payload, (int)len) || !EVP_EncryptFinal_ex(c, none, &n) ||
        !EVP_CIPHER_CTX_ctrl(c, EVP_CTRL_AEAD_GET_TAG, TAG, tag))
        return -1;
    return 0;
}

/* AES-256-GCM: `in` (len bytes) encrypted into `out`, head authenticated, the tag into `tag` */
static int frame_seal(EVP_CIPHER_CTX *c, uint64_t seq, const uint8_t *head, const uint8_t *in, uint8_t *out,
                      size_t len, uint8_t *tag) {
    uint8_t iv[12];
    int n;
    gcm_nonce(seq, iv);
    if (len > INT_MAX || !EVP_EncryptInit_ex(c, NULL, NULL, NULL, iv) || !EVP_EncryptUpdate(c, NULL, &n, head, HEAD) ||
        !EVP_EncryptUpdate(c, out, &n, in, (int)len) || !EVP_EncryptFinal_ex(c, out + n, &n) ||
        !EVP_CIPHER_CTX_ctrl(c, EVP_CTRL_AEAD_GET_TAG, TAG, tag))
        return -1;
    return 0;
}

/* decrypts `buf` in place; -1 unless the tag verifies */
static int frame_open(EVP_CIPHER_CTX *c, uint64_t seq, const uint8_t *head, uint8_t *buf, size_t len,
                      uint8_t *tag) {
    uint8_t iv[12];
    int n;
    gcm_nonce(seq, iv);
    if (len > INT_MAX || !EVP_DecryptInit_ex(c, NULL, NULL, NULL, iv) || !EVP_DecryptUpdate(c, NULL, &n, head, HEAD) ||
        !EVP_DecryptUpdate(c, buf, &n, buf, (int)len) || !EVP_CIPHER_CTX_ctrl(c, EVP_CTRL_AEAD_SET_TAG, TAG, tag) ||
        EVP_DecryptFinal_ex(c, buf + n, &n) <= 0)
        return -1;
    return 0;
}

static int tagged(const link_mac *l) { return l->tx != NULL; }

/* our frame (`body` bytes: sbuf, or the link's encrypted copy) then node j's tag, from byte `off` on */
static ssize_t send_part(tcp_mesh *m, int j, size_t off, size_t body) {
    struct iovec iov[2];
    int n = 0;
    const uint8_t *src = m->lm[j].encrypt ? m->lm[j].ebuf : m->sbuf;
    if (off < body) iov[n++] = (struct iovec){(void *)(src + off), body - off};
    if (tagged(&m->lm[j])) {
        const size_t t = off > body ? off - body : 0;
        iov[n++] = (struct iovec){m->stag[j] + t, TAG - t};
    }
    struct msghdr msg = {.msg_iov = iov, .msg_iovlen = (size_t)n};
    return sendmsg(m->fds[j], &msg, MSG_NOSIGNAL);
}

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

/* node j's frame is complete: its tag (and, encrypted, its payload, in place) and its step checked */
static int finish(tcp_mesh *m, int j, uint8_t *recv_buf, size_t len, uint32_t step) {
    link_mac *l = &m->lm[j];
    uint8_t *payload = recv_buf + (size_t)j * len;
    if (l->encrypt) {
        if (frame_open(l->rx, l->seq_rx++, m->head[j], payload, len, m->rtag[j])) return fail(m, j, COMM_INTEGRITY, 0);
    } else if (l->rx) {
        uint8_t want[TAG];
        if (frame_tag(l->rx, l->seq_rx++, m->head[j], payload, len, want) || CRYPTO_memcmp(want, m->rtag[j], TAG) != 0)
            return fail(m, j, COMM_INTEGRITY, 0);
    }
    uint32_t st;
    memcpy(&st, m->head[j] + 8, 4);
    return st == step ? COMM_OK : fail(m, j, COMM_BADFRAME, 0);
}

/* bytes [from, to) of node j's frame as read so far (header, payload, tag live in three places) */
static void frame_bytes(const tcp_mesh *m, int j, const uint8_t *recv_buf, size_t len, size_t from, size_t to,
                        uint8_t *out) {
    const size_t total = HEAD + len;
    for (size_t p = from; p < to; p++)
        *out++ = p < HEAD ? m->head[j][p] : p < total ? recv_buf[(size_t)j * len + p - HEAD] : m->rtag[j][p - total];
}

/* Takes what node j has sent us so far, without waiting, in one readv: header into head[j], payload straight into the
 * receive buffer, tag into rtag[j]. The header is checked as soon as it is in, a complete frame at once (its tag,
 * while other peers may still be sending). Never reads past the frame it expects; when the peer sent an ERROR /
 * ABORT instead, what was read past that frame (its tag) is kept for the link's Conn (TcpMesh.overread).
 * COMM_OK: complete, or nothing more for now. */
static int pull(tcp_mesh *m, int j, uint8_t *recv_buf, size_t len, uint32_t step, size_t *got, size_t tot) {
    const size_t total = HEAD + len;
    const uint32_t flen = (uint32_t)(len + 4);
    while (*got < tot) {
        struct iovec iov[3];
        int n = 0;
        if (*got < HEAD) iov[n++] = (struct iovec){m->head[j] + *got, HEAD - *got};
        if (*got < total) {
            const size_t p = *got > HEAD ? *got - HEAD : 0;
            iov[n++] = (struct iovec){recv_buf + (size_t)j * len + p, len - p};
        }
        if (tot > total) {
            const size_t t = *got > total ? *got - total : 0;
            iov[n++] = (struct iovec){m->rtag[j] + t, TAG - t};
        }
        const size_t want = tot - *got;
        const ssize_t k = readv(m->fds[j], iov, n);
        if (k == 0) return fail(m, j, *got >= 8 ? COMM_BADFRAME : COMM_CLOSED, 0);
        if (k < 0) {
            if (errno == EINTR) continue;
            if (errno == EAGAIN || errno == EWOULDBLOCK) return COMM_OK;
            return fail(m, j, COMM_SOCKERR, errno);
        }
        m->base.received += (uint64_t)k;
        const size_t before = *got;
        *got += (size_t)k;
        if (before < 8 && *got >= 8) { /* the header's fixed part and length are in: check them */
            const uint8_t *h = m->head[j];
            uint32_t l;
            memcpy(&l, h + 4, 4);
            if (h[0] == m->prefix[0] && h[1] == m->prefix[1] && h[3] == 0 && is_explain(m, h[2])) {
                if (l > COMM_MSG_MAX) return fail(m, j, COMM_BADFRAME, 0);
                uint8_t raw[COMM_MSG_MAX + TAG];
                const size_t end = *got < 8 + (size_t)l + TAG ? *got : 8 + (size_t)l + TAG;
                frame_bytes(m, j, recv_buf, len, 8, end, raw);
                const size_t n_raw = end - 8, text = n_raw < l ? n_raw : l;
                m->n_over[j] = n_raw - text;
                memcpy(m->over[j], raw + text, n_raw - text);
                return read_explanation(m, j, raw, text, l);
            }
            if (memcmp(h, m->prefix, 4) != 0 || l != flen) return fail(m, j, COMM_BADFRAME, 0);
        }
        if (*got == tot) return finish(m, j, recv_buf, len, step);
        if ((size_t)k < want) return COMM_OK; /* drained for now: poll before trying again */
    }
    return COMM_OK;
}

/* One exchange: our frame to every node in `peers` (one sendmsg each, frame and tag), then whatever has already
 * arrived is taken before any poll(); poll() only when a peer's frame is still missing (or a send did not complete). */
static int tcp_exchange(comm *c, uint64_t peers, int round, const uint8_t *send_buf, size_t len, uint32_t step,
                        uint8_t *recv_buf) {
    tcp_mesh *m = (tcp_mesh *)c;
    const int N = c->n_nodes;
    /* 64 nodes: rounds 0..5; the wait stays below INT_MAX (a timeout of at most 1 day, x 7) */
    const int wait_ms = m->timeout_ms * (1 + (round > 0 && round <= 6 ? round : 0));
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
    size_t sent[MAX_NODES], got[MAX_NODES], tot[MAX_NODES]; /* tot: frame plus tag on this link */
    for (int j = 0; j < N; j++) {
        sent[j] = got[j] = tot[j] = 0; /* a node outside `peers`: nothing to send or to receive */
        m->n_over[j] = 0;
        if (j == c->self || !(peers >> j & 1)) continue;
        link_mac *l = &m->lm[j];
        tot[j] = total + (tagged(l) ? TAG : 0);
        if (l->encrypt) {
            if (l->ecap < total) {
                uint8_t *nb = (uint8_t *)realloc(l->ebuf, total);
                if (!nb) return fail(m, -1, COMM_SOCKERR, ENOMEM);
                l->ebuf = nb;
                l->ecap = total;
            }
            memcpy(l->ebuf, m->sbuf, HEAD);
            if (frame_seal(l->tx, l->seq_tx++, m->sbuf, m->sbuf + HEAD, l->ebuf + HEAD, len, m->stag[j]))
                return fail(m, j, COMM_INTEGRITY, 0);
        } else if (l->tx && frame_tag(l->tx, l->seq_tx++, m->sbuf, m->sbuf + HEAD, len, m->stag[j])) {
            return fail(m, j, COMM_INTEGRITY, 0);
        }
        const ssize_t k = send_part(m, j, 0, total);
        if (k > 0) {
            sent[j] = (size_t)k;
            c->sent += (uint64_t)k;
        } else if (k < 0 && errno != EAGAIN && errno != EWOULDBLOCK) {
            return fail(m, j, COMM_SOCKERR, errno);
        }
    }
    for (int j = 0; j < N; j++) { /* frames that are already here: no poll() for them */
        if (j == c->self || !tot[j]) continue;
        const int rc = pull(m, j, recv_buf, len, step, &got[j], tot[j]);
        if (rc != COMM_OK) return rc;
    }
    /* Spin briefly before sleeping: a peer's frame is usually microseconds away, while a sleep costs a wake-up
     * (an inter-processor interrupt; on a VM a halted virtual CPU the host may have given away, which measured here
     * as +20-50 % per token on loopback). sched_yield() lets another node sharing this core run meanwhile. Only
     * while the frames have recently come within the spin time: a peer that is milliseconds behind (slower, or
     * throttled) would make every spin a waste of this node's CPU. */
    const double t_sent = mono_s();
    if (m->spin_s > 0 && m->wait_avg <= m->spin_s) {
        for (;;) {
            int pending = 0, blocked = 0;
            for (int j = 0; j < N; j++) {
                if (j == c->self || !tot[j]) continue;
                if (sent[j] < tot[j]) blocked = 1;
                if (got[j] < tot[j]) {
                    const int rc = pull(m, j, recv_buf, len, step, &got[j], tot[j]);
                    if (rc != COMM_OK) return rc;
                    pending |= got[j] < tot[j];
                }
            }
            if (!pending || blocked || mono_s() - t_sent > m->spin_s) break;
            sched_yield();
        }
    }
    struct pollfd pfd[MAX_NODES];
    int map[MAX_NODES];
    for (;;) {
        int np = 0;
        for (int j = 0; j < N; j++) {
            if (j == c->self || (sent[j] >= tot[j] && got[j] >= tot[j])) continue;
            pfd[np].fd = m->fds[j];
            pfd[np].events = (short)((got[j] < tot[j] ? POLLIN : 0) | (sent[j] < tot[j] ? POLLOUT : 0));
            pfd[np].revents = 0;
            map[np++] = j;
        }
        if (!np) break;
        const int r = poll(pfd, (nfds_t)np, wait_ms);
        if (r < 0) {
            if (errno == EINTR) continue;
            return fail(m, map[0], COMM_SOCKERR, errno);
        }
        if (r == 0) { /* blame a peer we are still waiting for */
            int who = map[0];
            for (int i = 0; i < np; i++)
                if (got[map[i]] < tot[map[i]]) { who = map[i]; break; }
            return fail(m, who, COMM_TIMEOUT, wait_ms);
        }
        for (int i = 0; i < np; i++) {
            const int j = map[i];
            if ((pfd[i].revents & POLLOUT) && sent[j] < tot[j]) {
                const ssize_t k = send_part(m, j, sent[j], total);
                if (k > 0) {
                    sent[j] += (size_t)k;
                    c->sent += (uint64_t)k;
                } else if (k < 0 && errno != EAGAIN && errno != EWOULDBLOCK) {
                    return fail(m, j, COMM_SOCKERR, errno);
                }
            }
            if ((pfd[i].revents & (POLLIN | POLLHUP | POLLERR)) && got[j] < tot[j]) {
                const int rc = pull(m, j, recv_buf, len, step, &got[j], tot[j]);
                if (rc != COMM_OK) return rc;
            }
        }
    }
    const double t_end = mono_s();
    m->wait_avg += 0.125 * ((t_end - t_sent) - m->wait_avg);
    c->wait_s += t_end - t0;
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
    if (self->m) {
        free(self->m->sbuf);
        for (int j = 0; j < MAX_NODES; j++) {
            EVP_CIPHER_CTX_free(self->m->lm[j].tx);
            EVP_CIPHER_CTX_free(self->m->lm[j].rx);
            free(self->m->lm[j].ebuf);
        }
    }
    free(self->m);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* keys: per node None (no tag on that link) or (send key, receive key[, encrypt]), bytes each */
static int set_keys(tcp_mesh *m, PyObject *keys_o, Py_ssize_t n) {
    if (PySequence_Size(keys_o) != n) {
        PyErr_SetString(PyExc_ValueError, "TcpMesh: need a key pair (or None) per node");
        return -1;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *kp = PySequence_GetItem(keys_o, i);
        if (!kp) return -1;
        if (kp == Py_None) {
            Py_DECREF(kp);
            continue;
        }
        Py_buffer ks, kr;
        int encrypt = 0;
        if (i == m->base.self || !PyArg_ParseTuple(kp, "y*y*|p", &ks, &kr, &encrypt)) {
            Py_DECREF(kp);
            if (!PyErr_Occurred()) PyErr_SetString(PyExc_ValueError, "TcpMesh: no key for ourselves");
            return -1;
        }
        Py_DECREF(kp);
        /* both modes: AES-256-GCM keyed once per direction; the tag-only mode uses the encrypting direction for
         * checking too (it recomputes the tag) */
        link_mac *l = &m->lm[i];
        l->encrypt = encrypt;
        int ok = ks.len == 32 && kr.len == 32 && (l->tx = EVP_CIPHER_CTX_new()) && (l->rx = EVP_CIPHER_CTX_new()) &&
                 EVP_EncryptInit_ex(l->tx, EVP_aes_256_gcm(), NULL, ks.buf, NULL) &&
                 (encrypt ? EVP_DecryptInit_ex(l->rx, EVP_aes_256_gcm(), NULL, kr.buf, NULL)
                          : EVP_EncryptInit_ex(l->rx, EVP_aes_256_gcm(), NULL, kr.buf, NULL));
        PyBuffer_Release(&ks);
        PyBuffer_Release(&kr);
        if (!ok) {
            PyErr_SetString(PyExc_ValueError, "TcpMesh: cannot set up AES-256-GCM (OpenSSL; 32-byte keys)");
            return -1;
        }
    }
    return 0;
}

static int TcpMesh_init(TcpMesh *self, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"fds", "self_index", "prefix", "explain", "timeout_ms", "keys", "spin_us", NULL};
    PyObject *fds_o, *keys_o = Py_None;
    int self_index, timeout_ms, spin_us = 0;
    Py_buffer prefix, explain;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "Oiy*y*i|Oi", kwlist, &fds_o, &self_index, &prefix, &explain,
                                     &timeout_ms, &keys_o, &spin_us))
        return -1;
    int rc = -1;
    const Py_ssize_t n = PySequence_Size(fds_o);
    if (self->m || n < 2 || n > MAX_NODES || self_index < 0 || self_index >= n || prefix.len != 4 ||
        explain.len > 8 || timeout_ms < 1 || spin_us < 0 || spin_us > 1000000) {
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
    m->spin_s = spin_us * 1e-6;
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
    if (keys_o != Py_None && set_keys(m, keys_o, n) < 0) goto done;
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

/* exchange(data, step, peers=None) -> every node's data (zero for ourselves and nodes outside `peers`, a sequence
 * of node indices; None: all), node by node: one exchange outside the engine, for tests and benchmarks of the wire
 * format. A failure raises RuntimeError(node, kind, errno). */
static PyObject *TcpMesh_exchange(TcpMesh *self, PyObject *args) {
    Py_buffer b;
    unsigned int step;
    PyObject *peers_o = Py_None;
    if (!self->m || !PyArg_ParseTuple(args, "y*I|O", &b, &step, &peers_o)) {
        if (!PyErr_Occurred()) PyErr_SetString(PyExc_RuntimeError, "TcpMesh not initialised");
        return NULL;
    }
    tcp_mesh *m = self->m;
    const size_t len = (size_t)b.len;
    PyObject *out = len ? PyBytes_FromStringAndSize(NULL, (Py_ssize_t)(len * (size_t)m->base.n_nodes)) : NULL;
    if (!out) {
        PyBuffer_Release(&b);
        if (!PyErr_Occurred()) PyErr_SetString(PyExc_ValueError, "exchange: empty data");
        return NULL;
    }
    uint64_t peers = COMM_ALL_PEERS(&m->base);
    if (peers_o != Py_None) {
        PyObject *seq = PySequence_Fast(peers_o, "exchange: peers must be a sequence of node indices");
        peers = 0;
        for (Py_ssize_t i = 0; seq && i < PySequence_Fast_GET_SIZE(seq); i++) {
            const long j = PyLong_AsLong(PySequence_Fast_GET_ITEM(seq, i));
            if (j < 0 || j >= m->base.n_nodes || j == m->base.self) {
                if (!PyErr_Occurred()) PyErr_SetString(PyExc_ValueError, "exchange: no such peer");
                break;
            }
            peers |= 1ULL << j;
        }
        Py_XDECREF(seq);
        if (PyErr_Occurred()) {
            Py_DECREF(out);
            PyBuffer_Release(&b);
            return NULL;
        }
    }
    uint8_t *rb = (uint8_t *)PyBytes_AS_STRING(out);
    memset(rb, 0, len * (size_t)m->base.n_nodes);
    int rc;
    Py_BEGIN_ALLOW_THREADS rc = tcp_exchange(&m->base, peers, 0, (const uint8_t *)b.buf, len, step, rb);
    Py_END_ALLOW_THREADS PyBuffer_Release(&b);
    if (rc != COMM_OK) {
        Py_DECREF(out);
        PyObject *e = Py_BuildValue("(iii)", m->base.fail.node, m->base.fail.kind, m->base.fail.err);
        if (e) PyErr_SetObject(PyExc_RuntimeError, e);
        Py_XDECREF(e);
        return NULL;
    }
    return out;
}

/* overread(node): bytes read past node's ERROR / ABORT frame by the failed exchange (the start of its tag) */
static PyObject *TcpMesh_overread(TcpMesh *self, PyObject *arg) {
    const long j = PyLong_AsLong(arg);
    if (j == -1 && PyErr_Occurred()) return NULL;
    if (!self->m || j < 0 || j >= self->m->base.n_nodes) {
        PyErr_SetString(PyExc_ValueError, "overread: no such node");
        return NULL;
    }
    return PyBytes_FromStringAndSize((const char *)self->m->over[j], (Py_ssize_t)self->m->n_over[j]);
}

static PyMethodDef TcpMesh_methods[] = {
    {"overread", (PyCFunction)TcpMesh_overread, METH_O,
     "overread(node) -> bytes read past that node's ERROR / ABORT frame (its tag's first bytes)"},
    {"exchange", (PyCFunction)TcpMesh_exchange, METH_VARARGS,
     "exchange(data, step, peers=None) -> bytes: one exchange with those peers (default: all) outside the engine "
     "(tests, benchmarks)"},
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
    .tp_doc = "TcpMesh(fds, self_index, prefix, explain, timeout_ms, keys=None, spin_us=0): exchanges of partial "
               "sums over connected sockets, "
               "each link's frames tagged with AES-256-GMAC when it has a (send, receive) pair of 32-byte keys, or AES-256-GCM "
               "encrypted when it has (send, receive, True).",
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
    PyModule_AddIntConstant(m, "INTEGRITY", COMM_INTEGRITY);
    PyModule_AddIntConstant(m, "TAG", TAG);
    return m;
}
