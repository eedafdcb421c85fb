/* The communication interface the engine needs: after each attention and feed-forward block, every node's partial
 * sum (T rows, already in the sync format) must reach every other node.
 *
 * `exchange` sends `len` bytes to every node in `peers` (bit j: node j) and fills recv + node * len with what each
 * of them sent (other slots left untouched). The engine decides who talks to whom (graph.c: everyone with everyone,
 * or a butterfly of pairwise swaps for 4, 8, 16, ... nodes) and adds the partial sums in an order that keeps the residual
 * stream identical on every node. The engine knows nothing else about the transport: TCP
 * (dllama/net/csrc/mesh_tcp.c) is one implementation; a pipeline stage or a GPU collective would be another. A
 * failure returns non-zero and leaves the details in `fail`, which the Python binding turns into one exception. */
#ifndef DLLAMA_COMM_H
#define DLLAMA_COMM_H

#include <stddef.h>
#include <stdint.h>

enum { COMM_OK = 0, COMM_TIMEOUT = 1, COMM_CLOSED = 2, COMM_BADFRAME = 3, COMM_SOCKERR = 4, COMM_PEER_ERROR = 5,
       COMM_NONFINITE = 6 /* set by the engine: a peer's partial sum holds NaN or inf */,
       COMM_INTEGRITY = 7 /* a peer's frame failed its authentication tag (altered on the way, or replayed) */ };

#define COMM_MSG_MAX 4096
#define COMM_ALL_PEERS(c) (~0ULL >> (64 - (c)->n_nodes) & ~(1ULL << (c)->self))

typedef struct {
    int node;     /* index of the node whose link failed, -1 if unknown */
    int kind;     /* COMM_* */
    int err;      /* errno for COMM_SOCKERR; the wait in ms for COMM_TIMEOUT */
    int msg_type; /* COMM_PEER_ERROR: the frame type the peer sent instead (its explanation) */
    size_t msg_len;
    uint8_t msg[COMM_MSG_MAX];
} comm_failure;

typedef struct comm comm;
struct comm {
    int n_nodes, self;
    /* round: 0, or a butterfly's round r, which may wait for a chain of earlier rounds (a partner waiting for its
     * own partner, ...): it waits (1 + r) x the timeout, so the node next to a stopped one gives up first and its
     * ABORT, sent to every peer, names the stopped node to the nodes waiting behind it */
    int (*exchange)(comm *c, uint64_t peers, int round, const uint8_t *send, size_t len, uint32_t step,
                    uint8_t *recv);
    comm_failure fail;
    double wait_s;               /* seconds blocked in exchange */
    uint64_t sent, received;     /* bytes as returned by the socket calls */
};

#define COMM_CAPSULE "dllama.comm"

#endif
