/* The layer graph of one node: its slice of every layer, run block by block with the partial sums added across
 * nodes through `comm` after each attention and feed-forward block.
 *
 * Per layer (shapes per token; hd = head_dim, nh / nkv = this node's query / KV heads):
 *   xb = rmsnorm(x)                                  [dim]
 *   q, k, v = Wq xb (+bq), Wk xb (+bk), Wv xb (+bv)  [nh*hd], [nkv*hd], [nkv*hd]
 *   q, k = rmsnorm per head (Qwen3), then rope (adjacent pairs, or NEOX halves)
 *   att = softmax(q k^T / sqrt(hd)) v over the KV cache  [nh*hd]
 *   out = Wo att (a partial sum: Wo holds this node's input columns); x += sum over nodes of out
 *   xb = rmsnorm(x); out = Wdown (silu(Wgate xb) * Wup xb)  (dense), or the router's top-k experts' outputs,
 *   weighted (MoE); x += sum over nodes of out
 * A single node (comm NULL) adds its own `out`: N = 1 is the same graph. */
#define _POSIX_C_SOURCE 200809L
#define _DEFAULT_SOURCE /* mkstemp, ftruncate */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#include "graph.h"

#define SLOT_NAME(id, name) name,
const char *const LAYER_SLOT_NAMES[N_LAYER_SLOTS] = {LAYER_SLOT_LIST(SLOT_NAME)};
const char *const GLOBAL_SLOT_NAMES[N_GLOBAL_SLOTS] = {GLOBAL_SLOT_LIST(SLOT_NAME)};
#undef SLOT_NAME

struct engine {
    engine_config c;
    tensor *lt;        /* [n_layers][N_LAYER_SLOTS] */
    tensor *xt;        /* [n_layers][3][n_experts]: gate, up, down of every expert */
    tensor gt[N_GLOBAL_SLOTS];
    arena *weights;    /* the repacked copies this engine owns */
    const float *cos_t, *sin_t; /* [max_seq][hd/2] */
    uint8_t *kc, *vc;  /* [n_layers][nkv][max_seq] rows of hd values in kv_type */
    float *xb;         /* [B][dim] normed input */
    float *q, *k, *v;  /* [B][nh*hd], [B][nkv*hd], [B][nkv*hd] */
    float *att;        /* [B][nh*hd] */
    float *hb;         /* [B][hidden] */
    float *ub;         /* [B][hidden] `up` when gate and up differ in layout (no fused kernel for the pair) */
    block_q8_0 *xq;    /* [B][maxc/32] quantized activations */
    float *xs, *xd;    /* [B][maxc/32] per-block d*sum(q), d */
    float *scratch;    /* attention_scratch_floats() floats */
    float *x, *out, *logits; /* caller's: [B][dim], [B][dim], [vocab] */
    float *router;     /* [B][n_experts] router logits, then probabilities */
    int *route_tok;    /* [n_experts][B] tokens routed to each expert */
    float *route_w;    /* [n_experts][B] their weights */
    int *route_n;      /* [n_experts] */
    float *xg, *yg;    /* [B][dim] rows gathered for one expert, and its output */
    uint8_t *sbuf;     /* [B * sync row] our partial sum in the sync format */
    uint8_t *rbuf;     /* [n_nodes][B * sync row] everybody's */
    int rbuf_nodes;
    float *acc;        /* [B][dim] sum of the partials in node order */
    uint64_t *residual; /* [2 * n_layers] hash of x after each sync step (check_residual) */
    void *kv_map;      /* the KV cache's file mapping (kv_dir), else NULL */
    size_t kv_map_bytes;
    pool *pool;
};

/* ---- 8-row repacking of Q4_0 / Q4_1 / Q8_0 at load (see repack.c) ---- */
int g_repack = -1;

uint8_t *tensor_repack(tensor *t, arena *a) {
    const type_traits *tt = type_traits_of(t->type);
    const int xt = tt ? tt->x8_type : -1;
    if (!g_repack || xt < 0 || t->rows % 8 || t->rows == 0) return NULL;
    const size_t group = (size_t)(t->cols / QK) * (size_t)g_types[xt].block_bytes;
    const size_t n = group * (size_t)(t->rows / 8);
    uint8_t *dst = (uint8_t *)(a ? arena_alloc(a, n) : malloc(n));
    if (!dst) return NULL;
    repack_x8(t->type, t->data, t->stride, t->rows, t->cols, dst);
    t->type = xt;
    t->data = dst;
    t->stride = group;
    return dst;
}

static inline tensor *LT(engine *e, int l, int s) { return &e->lt[(size_t)l * N_LAYER_SLOTS + s]; }
static inline tensor *XT(engine *e, int l, int which, int ex) {
    return &e->xt[((size_t)l * 3 + which) * e->c.n_experts + ex];
}

void engine_destroy(engine *e) {
    if (!e) return;
    pool_destroy(e->pool);
    arena_free(e->weights);
    free(e->lt); free(e->xt);
    if (e->kv_map) munmap(e->kv_map, e->kv_map_bytes);
    else { free(e->kc); free(e->vc); } free(e->xb); free(e->q); free(e->k); free(e->v); free(e->att); free(e->hb); free(e->ub);
    free(e->xq); free(e->xs); free(e->xd); free(e->scratch);
    free(e->router); free(e->route_tok); free(e->route_w); free(e->route_n); free(e->xg); free(e->yg);
    free(e->sbuf); free(e->rbuf); free(e->acc); free(e->residual);
    free(e);
}

engine *engine_create(const engine_config *cfg, const float *cos_t, const float *sin_t, float *x, float *out,
                      float *logits) {
    engine *e = (engine *)calloc(1, sizeof(engine));
    if (!e) return NULL;
    e->c = *cfg;
    engine_config *c = &e->c;
    if (c->nthreads < 1) c->nthreads = 1;
    e->cos_t = cos_t; e->sin_t = sin_t; e->x = x; e->out = out; e->logits = logits;
    const size_t B = (size_t)c->max_batch, hd = (size_t)c->head_dim;
    const size_t qd = (size_t)c->n_heads * hd, kd = (size_t)c->n_kv_heads * hd;
    size_t maxc = (size_t)c->dim;
    if (qd > maxc) maxc = qd;
    if ((size_t)c->hidden > maxc) maxc = (size_t)c->hidden;
    e->lt = (tensor *)calloc((size_t)c->n_layers * N_LAYER_SLOTS, sizeof(tensor));
    e->xt = (tensor *)calloc((size_t)c->n_layers * 3 * (c->n_experts ? c->n_experts : 1), sizeof(tensor));
    /* calloc'd KV cache: pages are only backed by memory once a position is written. On disk: a file created and
     * unlinked at once (nothing is left behind, whatever way the process ends), mapped shared, so the kernel can
     * write pages back and drop them instead of keeping them in RAM. */
    const size_t kv = (size_t)c->n_layers * c->n_kv_heads * c->max_seq * row_bytes(c->kv_type, c->head_dim); /* bytes */
    if (c->kv_dir) {
        char path[4096];
        snprintf(path, sizeof path, "%s/dllama-kv-XXXXXX", c->kv_dir);
        const int fd = mkstemp(path);
        if (fd >= 0) {
            unlink(path);
            e->kv_map_bytes = 2 * (kv ? kv : 1);
            if (ftruncate(fd, (off_t)e->kv_map_bytes) == 0) {
                void *m = mmap(NULL, e->kv_map_bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
                if (m != MAP_FAILED) {
                    e->kv_map = m;
                    e->kc = (uint8_t *)m;
                    e->vc = (uint8_t *)m + (kv ? kv : 1);
                }
            }
            close(fd);
        }
        if (!e->kv_map) {
            engine_destroy(e);
            return NULL;
        }
    } else {
        e->kc = (uint8_t *)calloc(kv ? kv : 1, 1);
        e->vc = (uint8_t *)calloc(kv ? kv : 1, 1);
    }
    e->xb = (float *)calloc(B * c->dim, 4);
    e->q = (float *)calloc(B * (qd ? qd : 1), 4);
    e->k = (float *)calloc(B * (kd ? kd : 1), 4);
    e->v = (float *)calloc(B * (kd ? kd : 1), 4);
    e->att = (float *)calloc(B * (qd ? qd : 1), 4);
    e->hb = (float *)calloc(B * (c->hidden ? c->hidden : 1), 4);
    e->ub = (float *)calloc(B * (c->hidden ? c->hidden : 1), 4);
    e->xq = (block_q8_0 *)calloc(B * (maxc / QK), sizeof(block_q8_0));
    e->xs = (float *)calloc(B * (maxc / QK), 4);
    e->xd = (float *)calloc(B * (maxc / QK), 4);
    e->scratch = (float *)calloc(attention_scratch_floats(c->nthreads, c->max_seq, c->head_dim, c->n_heads, c->max_batch), 4);
    int ok = e->lt && e->xt && e->kc && e->vc && e->xb && e->q && e->k && e->v && e->att && e->hb && e->ub && e->xq && e->xs &&
             e->xd && e->scratch;
    if (c->n_experts) {
        const size_t ne = (size_t)c->n_experts;
        e->router = (float *)calloc(B * ne, 4);
        e->route_tok = (int *)calloc(ne * B, sizeof(int));
        e->route_w = (float *)calloc(ne * B, 4);
        e->route_n = (int *)calloc(ne, sizeof(int));
        e->xg = (float *)calloc(B * c->dim, 4);
        e->yg = (float *)calloc(B * c->dim, 4);
        ok = ok && e->router && e->route_tok && e->route_w && e->route_n && e->xg && e->yg;
    }
    if (c->check_residual) {
        e->residual = (uint64_t *)calloc((size_t)2 * c->n_layers, sizeof(uint64_t));
        ok = ok && e->residual;
    }
    e->pool = ok ? pool_create(c->nthreads) : NULL;
    if (!e->pool) {
        engine_destroy(e);
        return NULL;
    }
    return e;
}

/* the shape a slot must have on this node: rows, cols, and whether it is an F32 vector */
static void slot_shape(const engine *e, int layer, int slot, int *rows, int *cols, int *vector) {
    const engine_config *c = &e->c;
    const int qd = c->n_heads * c->head_dim, kd = c->n_kv_heads * c->head_dim;
    *vector = 0;
    if (layer < 0) {
        if (slot == S_OUT_NORM) { *rows = 1; *cols = c->dim; *vector = 1; }
        else { *rows = c->vocab; *cols = c->dim; }
        return;
    }
    switch (slot) {
    case S_ATTN_NORM: case S_FFN_NORM: *rows = 1; *cols = c->dim; *vector = 1; break;
    case S_Q: *rows = qd; *cols = c->dim; break;
    case S_K: case S_V: *rows = kd; *cols = c->dim; break;
    case S_Q_BIAS: *rows = 1; *cols = qd; *vector = 1; break;
    case S_K_BIAS: case S_V_BIAS: *rows = 1; *cols = kd; *vector = 1; break;
    case S_Q_NORM: case S_K_NORM: *rows = 1; *cols = c->head_dim; *vector = 1; break;
    case S_O: *rows = c->dim; *cols = qd; break;
    case S_GATE: case S_UP: case S_GATE_EXPS: case S_UP_EXPS: *rows = c->hidden; *cols = c->dim; break;
    case S_DOWN: case S_DOWN_EXPS: *rows = c->dim; *cols = c->hidden; break;
    case S_ROUTER: *rows = c->n_experts; *cols = c->dim; break;
    default: *rows = *cols = -1;
    }
}

static int is_expert_slot(int slot) { return slot == S_GATE_EXPS || slot == S_UP_EXPS || slot == S_DOWN_EXPS; }

int engine_set_tensor(engine *e, int layer, int slot, int expert, tensor t, int *uses_source) {
    *uses_source = 1;
    if (layer >= e->c.n_layers || (layer < 0 && (slot < 0 || slot >= N_GLOBAL_SLOTS)) ||
        (layer >= 0 && (slot < 0 || slot >= N_LAYER_SLOTS)))
        return -1;
    const int ex_slot = layer >= 0 && is_expert_slot(slot);
    if (ex_slot ? (expert < 0 || expert >= e->c.n_experts) : expert != -1) return -1;
    int rows, cols, vector;
    slot_shape(e, layer, slot, &rows, &cols, &vector);
    if (t.rows != rows || t.cols != cols || (vector && t.type != T_F32)) return -2;
    tensor *dst = layer < 0 ? &e->gt[slot]
                : ex_slot   ? XT(e, layer, slot - S_GATE_EXPS, expert)
                            : LT(e, layer, slot);
    if (!e->weights && !(e->weights = arena_new())) return -3;
    if (tensor_repack(&t, e->weights)) *uses_source = 0;
    *dst = t;
    return 0;
}

static int need(const tensor *t, int rows) { return rows == 0 || t->data != NULL; }

int engine_check(const engine *e, char *why, size_t n) {
    const engine_config *c = &e->c;
    for (int l = 0; l < c->n_layers; l++) {
        for (int s = 0; s < N_LAYER_SLOTS; s++) {
            int rows, cols, vector, used = 1;
            if (s >= S_Q_BIAS && s <= S_V_BIAS) used = c->attn_bias;
            if (s == S_Q_NORM || s == S_K_NORM) used = c->qk_norm;
            if (s == S_GATE || s == S_UP || s == S_DOWN) used = !c->n_experts && c->hidden > 0;
            if (s == S_ROUTER) used = c->n_experts > 0;
            if (is_expert_slot(s)) {
                for (int x = 0; x < c->n_experts && c->hidden > 0; x++)
                    if (!XT((engine *)e, l, s - S_GATE_EXPS, x)->data) {
                        snprintf(why, n, "layer %d: %s of expert %d not set", l, LAYER_SLOT_NAMES[s], x);
                        return -1;
                    }
                continue;
            }
            slot_shape(e, l, s, &rows, &cols, &vector);
            if (used && !need(&e->lt[(size_t)l * N_LAYER_SLOTS + s], rows)) {
                snprintf(why, n, "layer %d: %s not set", l, LAYER_SLOT_NAMES[s]);
                return -1;
            }
        }
    }
    if (c->vocab > 0 && (!e->gt[S_OUT_NORM].data || !e->gt[S_OUTPUT].data)) {
        snprintf(why, n, "output head not set");
        return -1;
    }
    return 0;
}

/* ---- rope ---- */
void rope_rows_neox(float *x, int n_heads, int head_dim, const float *cos_t, const float *sin_t) {
    const int half = head_dim / 2;
    for (int h = 0; h < n_heads; h++) {
        float *v = x + (size_t)h * head_dim;
        for (int i = 0; i < half; i++) {
            const float a = v[i], b = v[i + half];
            v[i] = a * cos_t[i] - b * sin_t[i];
            v[i + half] = a * sin_t[i] + b * cos_t[i];
        }
    }
}

/* what follows Wq/Wk/Wv on a chunk of heads, run by the thread that computed them (see matmul_epi): bias, per-head
 * norm (Qwen3) and rope of q and k, then k and v into the KV cache. Per head and row, so the same arithmetic as
 * one pass over every head, whichever thread runs which heads. */
typedef struct {
    engine *e;
    int l, pos, T;
} qkv_ctx;

static void qkv_rows(void *varg, int job, int r0, int r1) {
    const qkv_ctx *x = (const qkv_ctx *)varg;
    engine *e = x->e;
    const engine_config *c = &e->c;
    const int hd = c->head_dim, half = hd / 2, n = job == 0 ? c->n_heads * hd : c->n_kv_heads * hd;
    float *const y = job == 0 ? e->q : job == 1 ? e->k : e->v;
    const float *bias = c->attn_bias ? (const float *)LT(e, x->l, S_Q_BIAS + job)->data : NULL;
    const float *norm = c->qk_norm && job < 2 ? (const float *)LT(e, x->l, job == 0 ? S_Q_NORM : S_K_NORM)->data : NULL;
    const size_t rb = row_bytes(c->kv_type, hd);
    uint8_t *const cache = (job == 1 ? e->kc : e->vc) + (size_t)x->l * c->n_kv_heads * c->max_seq * rb;
    for (int t = 0; t < x->T; t++) {
        const size_t p = (size_t)(x->pos + t);
        float *row = y + (size_t)t * n;
        if (bias)
            for (int i = r0; i < r1; i++) row[i] += bias[i];
        for (int h = r0 / hd; h < r1 / hd; h++) {
            float *v = row + (size_t)h * hd;
            if (job < 2) {
                if (norm) rmsnorm(v, v, norm, hd, c->eps);
                if (c->rope_neox) rope_rows_neox(v, 1, hd, e->cos_t + p * half, e->sin_t + p * half);
                else rope_rows(v, 1, hd, e->cos_t + p * half, e->sin_t + p * half);
            }
            if (job > 0) kv_store(c->kv_type, cache + ((size_t)h * c->max_seq + p) * rb, v, hd);
        }
    }
}

static int gcd(int a, int b) { return b ? gcd(b, a % b) : a; }

/* out[0:T] = this node's partial sum of the attention block of layer l */
static void run_attn(engine *e, int l, int pos, int T) {
    const engine_config *c = &e->c;
    const int dim = c->dim, hd = c->head_dim, nh = c->n_heads, nkv = c->n_kv_heads;
    const int qd = nh * hd, kd = nkv * hd;
    const tensor *wq = LT(e, l, S_Q), *wk = LT(e, l, S_K), *wv = LT(e, l, S_V), *wo = LT(e, l, S_O);
    const float *norm = (const float *)LT(e, l, S_ATTN_NORM)->data;
    for (int t = 0; t < T; t++) rmsnorm(e->xb + (size_t)t * dim, e->x + (size_t)t * dim, norm, dim, c->eps);
    act a;
    act_prepare(&a, e->xb, T, dim, e->xq, e->xs, e->xd,
                type_is_quant(wq->type) || type_is_quant(wk->type) || type_is_quant(wv->type));
    const tensor w3[3] = {*wq, *wk, *wv};
    float *const y3[3] = {e->q, e->k, e->v};
    const int ld3[3] = {qd, kd, kd};
    qkv_ctx qc = {e, l, pos, T};
    /* chunks of whole heads, starting on 16-row tiles: the unit is lcm(16, head_dim) */
    matmul_epi(e->pool, &a, 3, w3, y3, ld3, 16 / gcd(16, hd) * hd, qkv_rows, &qc);
    const size_t layer_off = (size_t)l * nkv * c->max_seq * row_bytes(c->kv_type, hd); /* bytes */
    attention(e->pool, e->q, e->kc + layer_off, e->vc + layer_off, c->kv_type, e->att,
              e->scratch, T, pos, nh, nkv, hd, c->max_seq);
    act_prepare(&a, e->att, T, qd, e->xq, e->xs, e->xd, type_is_quant(wo->type));
    float *const yo[1] = {e->out};
    const int ldo[1] = {dim};
    matmul(e->pool, &a, 1, wo, yo, ldo);
}

/* y[0:T] = Wdown (silu(Wgate x) * Wup x) for the T activation rows in `x` (already normed) */
static void swiglu_ffn(engine *e, const float *x, int T, const tensor *wg, const tensor *wu, const tensor *wd, float *y) {
    const engine_config *c = &e->c;
    act a;
    act_prepare(&a, x, T, c->dim, e->xq, e->xs, e->xd, type_is_quant(wg->type) || type_is_quant(wu->type));
    if (type_is_x8(wg->type) == type_is_x8(wu->type) && type_is_quant(wg->type) == type_is_quant(wu->type)) {
        matmul_swiglu(e->pool, &a, wg, wu, e->hb, c->hidden);
    } else { /* e.g. a repacked Q8_0 gate beside an F32 up: two plain matmuls, then silu(g) * u */
        const tensor w2[2] = {*wg, *wu};
        float *const y2[2] = {e->hb, e->ub};
        const int ld2[2] = {c->hidden, c->hidden};
        matmul(e->pool, &a, 2, w2, y2, ld2);
        silu_mul(e->hb, e->ub, T * c->hidden);
    }
    act_prepare(&a, e->hb, T, c->hidden, e->xq, e->xs, e->xd, type_is_quant(wd->type));
    float *const yd[1] = {y};
    const int ldd[1] = {c->dim};
    matmul(e->pool, &a, 1, wd, yd, ldd);
}

/* Route every token to its top-k experts (softmax over all experts, the k largest, renormalized when norm_topk),
 * then run each expert once over the tokens routed to it: a prompt batch reads each expert's weights once. */
static void run_moe(engine *e, int l, int T) {
    const engine_config *c = &e->c;
    const int ne = c->n_experts, k = c->n_active, dim = c->dim;
    act a;
    const tensor *wr = LT(e, l, S_ROUTER);
    act_prepare(&a, e->xb, T, dim, e->xq, e->xs, e->xd, type_is_quant(wr->type));
    float *const yr[1] = {e->router};
    const int ldr[1] = {ne};
    matmul(e->pool, &a, 1, wr, yr, ldr);
    memset(e->route_n, 0, sizeof(int) * (size_t)ne);
    for (int t = 0; t < T; t++) {
        float *p = e->router + (size_t)t * ne;
        float mx = -INFINITY, sum = 0.0f;
        for (int i = 0; i < ne; i++) mx = p[i] > mx ? p[i] : mx;
        for (int i = 0; i < ne; i++) { p[i] = expf(p[i] - mx); sum += p[i]; }
        int chosen[64];
        float w[64], wsum = 0.0f;
        for (int j = 0; j < k; j++) { /* k largest, lowest index first on ties */
            int best = -1;
            for (int i = 0; i < ne; i++) {
                int taken = 0;
                for (int m = 0; m < j; m++) taken |= chosen[m] == i;
                if (!taken && (best < 0 || p[i] > p[best])) best = i;
            }
            chosen[j] = best;
            w[j] = p[best] / sum;
            wsum += w[j];
        }
        for (int j = 0; j < k; j++) {
            const int x = chosen[j], n = e->route_n[x]++;
            e->route_tok[(size_t)x * c->max_batch + n] = t;
            e->route_w[(size_t)x * c->max_batch + n] = c->norm_topk ? w[j] / wsum : w[j];
        }
    }
    memset(e->out, 0, sizeof(float) * (size_t)T * dim);
    if (c->hidden == 0) return;
    for (int x = 0; x < ne; x++) {
        const int n = e->route_n[x];
        if (!n) continue;
        const int *tok = e->route_tok + (size_t)x * c->max_batch;
        const float *w = e->route_w + (size_t)x * c->max_batch;
        for (int i = 0; i < n; i++) memcpy(e->xg + (size_t)i * dim, e->xb + (size_t)tok[i] * dim, sizeof(float) * dim);
        swiglu_ffn(e, e->xg, n, XT(e, l, 0, x), XT(e, l, 1, x), XT(e, l, 2, x), e->yg);
        for (int i = 0; i < n; i++) axpy_f32(e->out + (size_t)tok[i] * dim, w[i], e->yg + (size_t)i * dim, dim);
    }
}

/* out[0:T] = this node's partial sum of the feed-forward block of layer l */
static void run_ffn(engine *e, int l, int T) {
    const engine_config *c = &e->c;
    const float *norm = (const float *)LT(e, l, S_FFN_NORM)->data;
    for (int t = 0; t < T; t++) rmsnorm(e->xb + (size_t)t * c->dim, e->x + (size_t)t * c->dim, norm, c->dim, c->eps);
    if (c->n_experts) {
        run_moe(e, l, T);
        return;
    }
    if (c->hidden == 0) {
        memset(e->out, 0, sizeof(float) * (size_t)T * c->dim);
        return;
    }
    swiglu_ffn(e, e->xb, T, LT(e, l, S_GATE), LT(e, l, S_UP), LT(e, l, S_DOWN), e->out);
}

/* ---- the all-reduce: x += sum over nodes of their partial sums ---- */
static size_t sync_row_bytes(const engine *e) {
    if (e->c.sync == SYNC_Q80) return (size_t)e->c.dim / QK * sizeof(block_q8_0);
    return (size_t)e->c.dim * (e->c.sync == SYNC_F16 ? 2 : 4);
}

/* a peer's partial sum must be finite: a NaN from one node would silently poison every node's stream */
static int finite_payload(const engine *e, const uint8_t *p, size_t n) {
    if (e->c.sync == SYNC_Q80) {
        const block_q8_0 *b = (const block_q8_0 *)p;
        for (size_t i = 0; i < n / QK; i++)
            if ((b[i].d & 0x7C00) == 0x7C00) return 0;
    } else if (e->c.sync == SYNC_F16) {
        const uint16_t *h = (const uint16_t *)p;
        for (size_t i = 0; i < n; i++)
            if ((h[i] & 0x7C00) == 0x7C00) return 0;
    } else {
        const float *f = (const float *)p;
        for (size_t i = 0; i < n; i++)
            if (!isfinite(f[i])) return 0;
    }
    return 1;
}

static uint64_t fnv1a(const void *data, size_t n) {
    const uint8_t *b = (const uint8_t *)data;
    uint64_t h = 1469598103934665603ULL;
    for (size_t i = 0; i < n; i++) h = (h ^ b[i]) * 1099511628211ULL;
    return h;
}

static int allreduce_sum(engine *e, int T, uint32_t step, comm *cm);

static int allreduce(engine *e, int T, uint32_t step, comm *cm) {
    const int rc = allreduce_sum(e, T, step, cm);
    if (rc == COMM_OK && e->residual) e->residual[step] = fnv1a(e->x, sizeof(float) * (size_t)T * e->c.dim);
    return rc;
}

/* src -> the sync format (len bytes in dst) */
static void sync_encode(const engine *e, const float *src, uint8_t *dst, size_t n) {
    if (e->c.sync == SYNC_Q80) quantize_row_q80(src, (block_q8_0 *)dst, NULL, (int)n);
    else if (e->c.sync == SYNC_F16) {
        uint16_t *h = (uint16_t *)dst;
        for (size_t i = 0; i < n; i++) h[i] = f32_to_f16(src[i]);
    } else memcpy(dst, src, n * 4);
}

/* acc += what p holds, in the sync format */
static void sync_add(const engine *e, float *acc, const uint8_t *p, size_t n) {
    if (e->c.sync == SYNC_Q80) accumulate_q80(acc, (const block_q8_0 *)p, (int)n);
    else if (e->c.sync == SYNC_F16) {
        const uint16_t *h = (const uint16_t *)p;
        for (size_t i = 0; i < n; i++) acc[i] += f16_to_f32(h[i]);
    } else {
        const float *f = (const float *)p;
        for (size_t i = 0; i < n; i++) acc[i] += f[i];
    }
}

static int peer_finite(engine *e, comm *cm, int node, size_t len, size_t n) {
    if (finite_payload(e, e->rbuf + (size_t)node * len, n)) return 1;
    cm->fail.node = node;
    cm->fail.kind = COMM_NONFINITE;
    return 0;
}

/* Butterfly (recursive doubling) for 4, 8, 16, ... nodes: in round r every node swaps its running sum with the node
 * whose index differs in bit r, so a node sends log2(N) frames per exchange instead of N - 1 (2 instead of 3 at 4
 * nodes, 3 instead of 7 at 8): each frame costs the sender's and the receiver's network stack ~16 us of CPU (perf,
 * bench_home_cluster.py), the compute nodes' own budget. The two sides of a swap add the lower node's values first (a
 * build that fuses sync_add's multiply-add into an FMA would otherwise round differently on the two sides), so both
 * hold the same sum, and after the last round every node holds the same total. From round 1 on a node sends a
 * sum of partial sums, re-encoded (for q80: quantized once more, one rounding more than the all-to-all). */
static int butterfly_sum(engine *e, size_t n, size_t len, uint32_t step, comm *cm) {
    const float *src = e->out;
    for (int bit = 1, round = 0; bit < cm->n_nodes; bit <<= 1, round++) {
        const int peer = cm->self ^ bit;
        sync_encode(e, src, e->sbuf, n); /* src may be acc: encoded before acc is cleared below */
        const int rc = cm->exchange(cm, 1ULL << peer, round, e->sbuf, len, step, e->rbuf);
        if (rc != COMM_OK) return rc;
        if (!peer_finite(e, cm, peer, len, n)) return COMM_NONFINITE;
        const uint8_t *theirs = e->rbuf + (size_t)peer * len;
        memset(e->acc, 0, n * 4);
        sync_add(e, e->acc, cm->self < peer ? e->sbuf : theirs, n);
        sync_add(e, e->acc, cm->self < peer ? theirs : e->sbuf, n);
        src = e->acc;
    }
    return COMM_OK;
}

static int allreduce_sum(engine *e, int T, uint32_t step, comm *cm) {
    const size_t n = (size_t)T * e->c.dim;
    if (!cm || cm->n_nodes <= 1) {
        for (size_t i = 0; i < n; i++) e->x[i] += e->out[i];
        return COMM_OK;
    }
    const size_t len = (size_t)T * sync_row_bytes(e);
    if (e->rbuf_nodes < cm->n_nodes) {
        const size_t cap = (size_t)e->c.max_batch * sync_row_bytes(e);
        free(e->sbuf); free(e->rbuf); free(e->acc);
        e->sbuf = (uint8_t *)malloc(cap);
        e->rbuf = (uint8_t *)malloc(cap * (size_t)cm->n_nodes);
        e->acc = (float *)malloc((size_t)e->c.max_batch * e->c.dim * 4);
        e->rbuf_nodes = e->sbuf && e->rbuf && e->acc ? cm->n_nodes : 0;
        if (!e->rbuf_nodes) {
            cm->fail.kind = COMM_SOCKERR;
            cm->fail.err = 12; /* ENOMEM */
            cm->fail.node = -1;
            return COMM_SOCKERR;
        }
    }
    if (sync_in_pairs(cm->n_nodes)) {
        const int rc = butterfly_sum(e, n, len, step, cm);
        if (rc != COMM_OK) return rc;
    } else { /* all-to-all: every node adds the same quantized values in node order, its own included */
        sync_encode(e, e->out, e->sbuf, n);
        const int rc = cm->exchange(cm, COMM_ALL_PEERS(cm), 0, e->sbuf, len, step, e->rbuf);
        if (rc != COMM_OK) return rc;
        for (int node = 0; node < cm->n_nodes; node++)
            if (node != cm->self && !peer_finite(e, cm, node, len, n)) return COMM_NONFINITE;
        memset(e->acc, 0, n * 4);
        for (int node = 0; node < cm->n_nodes; node++)
            sync_add(e, e->acc, node == cm->self ? e->sbuf : e->rbuf + (size_t)node * len, n);
    }
    for (size_t i = 0; i < n; i++) e->x[i] += e->acc[i];
    return COMM_OK;
}

int engine_forward(engine *e, int pos, int T, comm *cm) {
    for (int l = 0; l < e->c.n_layers; l++) {
        run_attn(e, l, pos, T);
        int rc = allreduce(e, T, (uint32_t)(2 * l), cm);
        if (rc != COMM_OK) return rc;
        run_ffn(e, l, T);
        rc = allreduce(e, T, (uint32_t)(2 * l + 1), cm);
        if (rc != COMM_OK) return rc;
    }
    return COMM_OK;
}

const uint64_t *engine_residual_hashes(const engine *e) { return e->residual; }

void engine_logits(engine *e, int row) {
    const engine_config *c = &e->c;
    rmsnorm(e->xb, e->x + (size_t)row * c->dim, (const float *)e->gt[S_OUT_NORM].data, c->dim, c->eps);
    act a;
    act_prepare(&a, e->xb, 1, c->dim, e->xq, e->xs, e->xd, type_is_quant(e->gt[S_OUTPUT].type));
    float *const y[1] = {e->logits};
    const int ld[1] = {c->vocab};
    matmul(e->pool, &a, 1, &e->gt[S_OUTPUT], y, ld);
}
