/* One node's engine: its slice of every layer, its KV cache, scratch buffers and thread pool, and the layer graph
 * that runs them (graph.c). No Python, no sockets: partial sums are added across nodes through `comm` (comm.h). */
#ifndef DLLAMA_GRAPH_H
#define DLLAMA_GRAPH_H

#include "arena.h"
#include "comm.h"
#include "common.h"

/* Engine slots: the roles a tensor can fill. The names are exported to Python (`_kernels.LAYER_SLOTS`), where
 * architecture descriptions name the slot of each tensor; keep both lists in this one place. */
#define LAYER_SLOT_LIST(X) \
    X(ATTN_NORM, "attn_norm") X(Q, "attn_q") X(K, "attn_k") X(V, "attn_v") X(Q_BIAS, "attn_q_bias") \
    X(K_BIAS, "attn_k_bias") X(V_BIAS, "attn_v_bias") X(Q_NORM, "attn_q_norm") X(K_NORM, "attn_k_norm") \
    X(O, "attn_output") X(FFN_NORM, "ffn_norm") X(GATE, "ffn_gate") X(UP, "ffn_up") X(DOWN, "ffn_down") \
    X(ROUTER, "ffn_gate_inp") X(GATE_EXPS, "ffn_gate_exps") X(UP_EXPS, "ffn_up_exps") X(DOWN_EXPS, "ffn_down_exps")
#define GLOBAL_SLOT_LIST(X) X(OUT_NORM, "output_norm") X(OUTPUT, "output")

#define SLOT_ENUM(id, name) S_##id,
enum { LAYER_SLOT_LIST(SLOT_ENUM) N_LAYER_SLOTS };
enum { GLOBAL_SLOT_LIST(SLOT_ENUM) N_GLOBAL_SLOTS };
#undef SLOT_ENUM
extern const char *const LAYER_SLOT_NAMES[N_LAYER_SLOTS];
extern const char *const GLOBAL_SLOT_NAMES[N_GLOBAL_SLOTS];

/* sync formats of the partial sums */
enum { SYNC_Q80 = 0, SYNC_F32 = 1, SYNC_F16 = 2 };

/* 4, 8, 16, ... nodes add their partial sums in a butterfly of pairwise swaps (graph.c), 2 and 3 nodes (and 5-7)
 * all-to-all: at 2 nodes the two are the same, and a butterfly needs a power of two */
#define BUTTERFLY_MIN_NODES 4
static inline int sync_in_pairs(int n_nodes) { return n_nodes >= BUTTERFLY_MIN_NODES && !(n_nodes & (n_nodes - 1)); }

typedef struct {
    int dim, n_layers, head_dim, n_heads, n_kv_heads; /* heads: this node's */
    int hidden;                                       /* this node's feed-forward rows (dense, or per expert) */
    int vocab;                                        /* this node's output-head rows */
    int max_seq, max_batch, nthreads;
    float eps;
    int rope_neox, qk_norm, attn_bias;
    int n_experts, n_active, norm_topk;
    int sync; /* SYNC_Q80 / SYNC_F32 / SYNC_F16 */
    int check_residual; /* keep a hash of the residual stream after every block (debug: nodes must agree) */
    const char *kv_dir;  /* non-NULL: the KV cache lives in a memory-mapped file in this directory (unlinked at once) */
    int kv_type;         /* T_F32, T_F16 or T_Q8_0: the type of a cached K or V row */
} engine_config;

typedef struct engine engine;

/* cos/sin: [max_seq][head_dim/2]; x, out: [max_batch][dim]; logits: [vocab]; all owned by the caller */
engine *engine_create(const engine_config *cfg, const float *cos_t, const float *sin_t, float *x, float *out,
                      float *logits);
void engine_destroy(engine *e);
/* layer -1: a global slot; expert -1 unless a per-expert slot. The shape is checked against this node's share.
 * 0 on success (*uses_source = 0 when the engine keeps its own repacked copy, so the caller may drop the source);
 * -1 bad layer/slot/expert, -2 wrong shape or type, -3 out of memory. */
int engine_set_tensor(engine *e, int layer, int slot, int expert, tensor t, int *uses_source);
int engine_check(const engine *e, char *why, size_t n); /* 0 when every tensor the graph reads is set */
/* all layers for tokens at pos..pos+T-1 (x[0:T] holds their embeddings); partial sums added through c */
int engine_forward(engine *e, int pos, int T, comm *c);
void engine_logits(engine *e, int row); /* logits = output rows . final_norm(x[row]) */
/* with check_residual: hash of x[0:T] after sync step s of the last forward, for s < 2 * n_layers */
const uint64_t *engine_residual_hashes(const engine *e);
/* Q4_0/Q4_1/Q8_0 -> the 8-row layout, in `a` (NULL: malloc'ed, the caller frees it); NULL if not repacked */
uint8_t *tensor_repack(tensor *t, arena *a);
extern int g_repack;
void rope_rows_neox(float *x, int n_heads, int head_dim, const float *cos_t, const float *sin_t);

#endif
