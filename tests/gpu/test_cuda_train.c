/* test_cuda_train.c — the CUDA backend's training against the CPU backend.
 *
 * run_training_ops: every training op of backend.h on fresh random inputs
 * with odd sizes and batches > 1, the CPU backend's result as reference:
 * relative L2 error at most 1e-5 in fp32 and 1e-2 in tf32 and bf16 (in bf16
 * the inputs are made bf16 values first, so both backends see the same
 * numbers); "+=" outputs start from the same random values on both; "="
 * outputs are poisoned with NaN on the GPU.
 *
 * run_training_steps, on the tiny fixture model (tests/fixtures/train, with
 * its LPIPS and discriminator weights, GAN and LPIPS on, adam_eps 1e-5):
 *   - three fp32 steps on the GPU and on the CPU: every loss within 1e-4
 *     relative, every tensor of the checkpoints (weights, both Adam states,
 *     EMA, the discriminator and its BatchNorm statistics) within 1e-4;
 *   - the same GPU steps twice: the same bits;
 *   - a GPU checkpoint resumed on the CPU and a CPU checkpoint on the GPU:
 *     one more step each, equal to continuing where they were;
 *   - klvae_trainer_step_device equal to klvae_trainer_step;
 *   - bf16 training: finite losses that fall, a checkpoint the CPU loads. */
#include <unistd.h>

#include "formats/safetensors.h"
#include "test_cuda.h"
#include "train/trainer.h"

/* ---- operands on both backends ---- */

/* In bf16 mode the values both backends get are bf16 values. */
static void representable(kv_precision p, float *x, size_t n)
{
    if (p != KV_PRECISION_BF16)
        return;
    for (size_t i = 0; i < n; i++)
        x[i] = kv_bf16_to_float(kv_bf16_from_float(x[i]));
}

/* One tensor on both backends: the CPU's wraps host, the GPU's is a copy
 * (or NaN, for an output the op overwrites). */
typedef struct operand {
    float *host; /* the CPU tensor's memory */
    kv_tensor cpu, gpu;
    size_t n;
} operand;

typedef enum { IN, OUT_SET, OUT_ADD } operand_role;

static klvae_status_t operand_make(suite *s, kv_backend *gpu, kv_precision p, operand *o, int n,
                                   int c, int h, int w, float lo, float hi, operand_role role,
                                   kv_storage storage)
{
    memset(o, 0, sizeof *o);
    o->n = (size_t)n * c * h * w;
    o->host = alloc_floats(o->n);
    fill(o->host, o->n, &s->r, lo, hi);
    representable(p, o->host, o->n);
    o->cpu = kv_tensor_wrap(o->host, n, c, h, w);
    return put_as(gpu, n, c, h, w, role == OUT_SET ? NULL : o->host, storage, &o->gpu);
}

static void operand_free(kv_backend *gpu, operand *o)
{
    kv_tensor_release(gpu, &o->gpu);
    free(o->host);
    memset(o, 0, sizeof *o);
}

/* The GPU's values against the CPU's: the largest relative L2 error over
 * the operands, or INFINITY when a download fails. */
static double compare(kv_backend *gpu, const operand *const *outs, int count)
{
    double worst = 0.0;
    for (int i = 0; i < count; i++) {
        float *got = alloc_floats(outs[i]->n);
        double e = get(gpu, &outs[i]->gpu, got) == KLVAE_OK
                       ? rel_l2(got, outs[i]->host, outs[i]->n)
                       : INFINITY;
        free(got);
        worst = fmax(worst, e);
    }
    return worst;
}

static double rel_diff(double got, double want)
{
    if (!isfinite(got))
        return INFINITY;
    return fabs(got - want) / fmax(fabs(want), 1e-30);
}

/* The line of one op check: an error of the calls, or the comparison. */
static void judge(suite *s, const char *what, kv_precision p, klvae_status_t cpu_st,
                  klvae_status_t gpu_st, double err)
{
    if (cpu_st != KLVAE_OK)
        failed_call(s, "(the CPU reference)", p, cpu_st);
    else if (gpu_st != KLVAE_OK)
        failed_call(s, what, p, gpu_st);
    else
        verdict(s, what, p, err, tolerance(p));
}

/* ---- convolution ---- */

typedef struct grad_conv_case {
    const char *name;
    int n, c, h, w, co, k;
    kv_conv_geometry g;
    int norm; /* a group-norm prologue (SiLU) for the weight gradient */
} grad_conv_case;

static const grad_conv_case grad_conv_cases[] = {
    {"3x3 same 16->24", 2, 16, 11, 9, 24, 3, {1, 1, 1, 1, 1}, 1},
    {"1x1 24->16", 3, 24, 7, 5, 16, 1, {1, 0, 0, 0, 0}, 0},
    {"3x3 stride 2 pad b/r 16->16", 2, 16, 13, 10, 16, 3, {2, 0, 0, 1, 1}, 0},
    {"4x4 stride 2 (the discriminator) 3->8", 2, 3, 18, 22, 8, 4, {2, 1, 1, 1, 1}, 0},
    {"3x3 prologue, 64 channels", 1, 64, 17, 12, 32, 3, {1, 1, 1, 1, 1}, 1},
};

static void test_conv_grads(suite *s, kv_backend *gpu, kv_precision p, const grad_conv_case *k)
{
    const int ho = (k->h + k->g.pad_top + k->g.pad_bottom - k->k) / k->g.stride + 1;
    const int wo = (k->w + k->g.pad_left + k->g.pad_right - k->k) / k->g.stride + 1;
    operand x, w, dy, dx, dw, db, sc, sh;
    klvae_status_t st = operand_make(s, gpu, p, &x, k->n, k->c, k->h, k->w, -2, 2, IN,
                                     KV_STORAGE_COMPUTE);
    if (st == KLVAE_OK)
        st = operand_make(s, gpu, p, &w, k->co, k->c, k->k, k->k, -0.3f, 0.3f, IN,
                          KV_STORAGE_COMPUTE);
    if (st == KLVAE_OK)
        st = operand_make(s, gpu, p, &dy, k->n, k->co, ho, wo, -1, 1, IN, KV_STORAGE_COMPUTE);
    if (st == KLVAE_OK)
        st = operand_make(s, gpu, p, &dx, k->n, k->c, k->h, k->w, 0, 0, OUT_SET,
                          KV_STORAGE_COMPUTE);
    /* the trainer's gradients are float32 tensors, accumulated */
    if (st == KLVAE_OK)
        st = operand_make(s, gpu, p, &dw, k->co, k->c, k->k, k->k, -1, 1, OUT_ADD,
                          KV_STORAGE_FLOAT32);
    if (st == KLVAE_OK)
        st = operand_make(s, gpu, p, &db, 1, k->co, 1, 1, -1, 1, OUT_ADD, KV_STORAGE_FLOAT32);
    if (st == KLVAE_OK)
        st = operand_make(s, gpu, p, &sc, k->n, k->c, 1, 1, 0.5f, 1.5f, IN, KV_STORAGE_FLOAT32);
    if (st == KLVAE_OK)
        st = operand_make(s, gpu, p, &sh, k->n, k->c, 1, 1, -0.5f, 0.5f, IN, KV_STORAGE_FLOAT32);
    char what[160];
    if (st != KLVAE_OK) {
        snprintf(what, sizeof what, "conv2d gradients %s (operands)", k->name);
        failed_call(s, what, p, st);
    } else {
        kv_tensor cb = db.cpu, gb = db.gpu;
        cb = kv_tensor_view4(&cb, k->co, 1, 1, 1);
        gb = kv_tensor_view4(&gb, k->co, 1, 1, 1);
        kv_conv_prologue cpro = {&sc.cpu, &sh.cpu, KV_ACT_SILU, false};
        kv_conv_prologue gpro = {&sc.gpu, &sh.gpu, KV_ACT_SILU, false};
        klvae_status_t c1 = s->cpu->ops->conv2d_backward_data(s->cpu, &dy.cpu, &w.cpu, k->g,
                                                              &dx.cpu);
        klvae_status_t g1 = done(s, gpu, gpu->ops->conv2d_backward_data(gpu, &dy.gpu, &w.gpu,
                                                                        k->g, &dx.gpu));
        const operand *o1[] = {&dx};
        snprintf(what, sizeof what, "conv2d_backward_data %s", k->name);
        judge(s, what, p, c1, g1, g1 == KLVAE_OK ? compare(gpu, o1, 1) : 0.0);
        klvae_status_t c2 = s->cpu->ops->conv2d_backward_weight(
            s->cpu, &x.cpu, k->norm ? &cpro : NULL, &dy.cpu, k->g, &dw.cpu, &cb);
        klvae_status_t g2 = done(s, gpu, gpu->ops->conv2d_backward_weight(
                                             gpu, &x.gpu, k->norm ? &gpro : NULL, &dy.gpu, k->g,
                                             &dw.gpu, &gb));
        const operand *o2[] = {&dw, &db};
        snprintf(what, sizeof what, "conv2d_backward_weight %s%s (+=)", k->name,
                 k->norm ? " with GN prologue" : "");
        judge(s, what, p, c2, g2, g2 == KLVAE_OK ? compare(gpu, o2, 2) : 0.0);
    }
    operand *all[] = {&x, &w, &dy, &dx, &dw, &db, &sc, &sh};
    for (size_t i = 0; i < sizeof all / sizeof all[0]; i++)
        operand_free(gpu, all[i]);
}

/* ---- normalisations ---- */

static void test_group_norm_grad(suite *s, kv_backend *gpu, kv_precision p, int n, int c, int h,
                                 int w, int groups, kv_activation act)
{
    operand x, gamma, beta, scale, shift, mean, rstd, da, dx, dg, dbt;
    klvae_status_t st = operand_make(s, gpu, p, &x, n, c, h, w, -2, 3, IN, KV_STORAGE_COMPUTE);
    if (st == KLVAE_OK)
        st = operand_make(s, gpu, p, &gamma, 1, c, 1, 1, 0.5f, 1.5f, IN, KV_STORAGE_COMPUTE);
    if (st == KLVAE_OK)
        st = operand_make(s, gpu, p, &beta, 1, c, 1, 1, -0.5f, 0.5f, IN, KV_STORAGE_COMPUTE);
    /* the statistics as the model keeps them: float32, from the CPU's op */
    if (st == KLVAE_OK)
        st = operand_make(s, gpu, p, &scale, n, c, 1, 1, 0, 0, OUT_SET, KV_STORAGE_FLOAT32);
    if (st == KLVAE_OK)
        st = operand_make(s, gpu, p, &shift, n, c, 1, 1, 0, 0, OUT_SET, KV_STORAGE_FLOAT32);
    if (st == KLVAE_OK)
        st = operand_make(s, gpu, p, &mean, n, groups, 1, 1, 0, 0, OUT_SET, KV_STORAGE_FLOAT32);
    if (st == KLVAE_OK)
        st = operand_make(s, gpu, p, &rstd, n, groups, 1, 1, 0, 0, OUT_SET, KV_STORAGE_FLOAT32);
    if (st == KLVAE_OK)
        st = operand_make(s, gpu, p, &da, n, c, h, w, -1, 1, IN, KV_STORAGE_COMPUTE);
    if (st == KLVAE_OK)
        st = operand_make(s, gpu, p, &dx, n, c, h, w, 0, 0, OUT_SET, KV_STORAGE_COMPUTE);
    if (st == KLVAE_OK)
        st = operand_make(s, gpu, p, &dg, 1, c, 1, 1, -1, 1, OUT_ADD, KV_STORAGE_FLOAT32);
    if (st == KLVAE_OK)
        st = operand_make(s, gpu, p, &dbt, 1, c, 1, 1, -1, 1, OUT_ADD, KV_STORAGE_FLOAT32);
    char what[160];
    snprintf(what, sizeof what, "group_norm_backward %dx%dx%dx%d G=%d act %d (+=)", n, c, h, w,
             groups, (int)act);
    klvae_status_t cs = KLVAE_OK, gs = KLVAE_OK;
    if (st == KLVAE_OK)
        cs = s->cpu->ops->group_norm_stats(s->cpu, &x.cpu, &gamma.cpu, &beta.cpu, groups, 1e-6f,
                                           &scale.cpu, &shift.cpu, &mean.cpu, &rstd.cpu);
    /* the same statistics on the GPU (its own op is checked elsewhere) */
    const operand *stats[] = {&scale, &shift, &mean, &rstd};
    for (int i = 0; st == KLVAE_OK && cs == KLVAE_OK && i < 4; i++)
        st = gpu->ops->upload(gpu, (kv_tensor *)&stats[i]->gpu, stats[i]->host);
    if (st == KLVAE_OK && cs == KLVAE_OK) {
        cs = s->cpu->ops->group_norm_backward(s->cpu, &x.cpu, &gamma.cpu, &scale.cpu, &shift.cpu,
                                              &mean.cpu, &rstd.cpu, groups, act, &da.cpu,
                                              &dx.cpu, &dg.cpu, &dbt.cpu);
        gs = done(s, gpu, gpu->ops->group_norm_backward(gpu, &x.gpu, &gamma.gpu, &scale.gpu,
                                                        &shift.gpu, &mean.gpu, &rstd.gpu, groups,
                                                        act, &da.gpu, &dx.gpu, &dg.gpu,
                                                        &dbt.gpu));
        const operand *outs[] = {&dx, &dg, &dbt};
        judge(s, what, p, cs, gs, gs == KLVAE_OK ? compare(gpu, outs, 3) : 0.0);
    } else {
        failed_call(s, what, p, st != KLVAE_OK ? st : cs);
    }
    operand *all[] = {&x, &gamma, &beta, &scale, &shift, &mean, &rstd, &da, &dx, &dg, &dbt};
    for (size_t i = 0; i < sizeof all / sizeof all[0]; i++)
        operand_free(gpu, all[i]);
}

static void test_batch_norm(suite *s, kv_backend *gpu, kv_precision p, int n, int c, int h, int w)
{
    operand x, gamma, beta, y, mean, invstd, dy, dx, dg, dbt;
    klvae_status_t st = operand_make(s, gpu, p, &x, n, c, h, w, -2, 3, IN, KV_STORAGE_COMPUTE);
    if (st == KLVAE_OK)
        st = operand_make(s, gpu, p, &gamma, 1, c, 1, 1, 0.5f, 1.5f, IN, KV_STORAGE_COMPUTE);
    if (st == KLVAE_OK)
        st = operand_make(s, gpu, p, &beta, 1, c, 1, 1, -0.5f, 0.5f, IN, KV_STORAGE_COMPUTE);
    if (st == KLVAE_OK)
        st = operand_make(s, gpu, p, &y, n, c, h, w, 0, 0, OUT_SET, KV_STORAGE_COMPUTE);
    if (st == KLVAE_OK)
        st = operand_make(s, gpu, p, &mean, 1, c, 1, 1, 0, 0, OUT_SET, KV_STORAGE_FLOAT32);
    if (st == KLVAE_OK)
        st = operand_make(s, gpu, p, &invstd, 1, c, 1, 1, 0, 0, OUT_SET, KV_STORAGE_FLOAT32);
    if (st == KLVAE_OK)
        st = operand_make(s, gpu, p, &dy, n, c, h, w, -1, 1, IN, KV_STORAGE_COMPUTE);
    if (st == KLVAE_OK)
        st = operand_make(s, gpu, p, &dx, n, c, h, w, 0, 0, OUT_SET, KV_STORAGE_COMPUTE);
    if (st == KLVAE_OK)
        st = operand_make(s, gpu, p, &dg, 1, c, 1, 1, -1, 1, OUT_ADD, KV_STORAGE_FLOAT32);
    if (st == KLVAE_OK)
        st = operand_make(s, gpu, p, &dbt, 1, c, 1, 1, -1, 1, OUT_ADD, KV_STORAGE_FLOAT32);
    float *rm_c = alloc_floats((size_t)c), *rv_c = alloc_floats((size_t)c);
    float *rm_g = alloc_floats((size_t)c), *rv_g = alloc_floats((size_t)c);
    fill(rm_c, (size_t)c, &s->r, -1, 1);
    fill(rv_c, (size_t)c, &s->r, 0.5f, 2);
    memcpy(rm_g, rm_c, (size_t)c * sizeof(float));
    memcpy(rv_g, rv_c, (size_t)c * sizeof(float));
    double *sums_c = calloc(2 * (size_t)c, sizeof(double)), *sums_g = calloc(2 * (size_t)c, sizeof(double));
    if (!sums_c || !sums_g) {
        fprintf(stderr, "out of memory\n");
        exit(2);
    }
    const double count = (double)n * h * w;
    char what[160];
    snprintf(what, sizeof what, "batch_norm_stats + batch_norm %dx%dx%dx%d (output, statistics)",
             n, c, h, w);
    if (st != KLVAE_OK) {
        failed_call(s, what, p, st);
    } else {
        klvae_status_t cs = s->cpu->ops->batch_norm_stats(s->cpu, &x.cpu, sums_c);
        if (cs == KLVAE_OK)
            cs = s->cpu->ops->batch_norm(s->cpu, &x.cpu, &gamma.cpu, &beta.cpu, sums_c, count,
                                         1e-5f, 0.1f, rm_c, rv_c, &y.cpu, &mean.cpu, &invstd.cpu);
        klvae_status_t gs = done(s, gpu, gpu->ops->batch_norm_stats(gpu, &x.gpu, sums_g));
        if (gs == KLVAE_OK)
            gs = done(s, gpu, gpu->ops->batch_norm(gpu, &x.gpu, &gamma.gpu, &beta.gpu, sums_g,
                                                  count, 1e-5f, 0.1f, rm_g, rv_g, &y.gpu,
                                                  &mean.gpu, &invstd.gpu));
        const operand *outs[] = {&y, &mean, &invstd};
        double e = gs == KLVAE_OK ? compare(gpu, outs, 3) : 0.0;
        e = fmax(e, fmax(rel_l2(rm_g, rm_c, (size_t)c), rel_l2(rv_g, rv_c, (size_t)c)));
        for (int i = 0; i < 2 * c; i++)
            e = fmax(e, rel_diff(sums_g[i], sums_c[i]));
        judge(s, what, p, cs, gs, e);
        /* given sums (data-parallel: every process's, added): twice this batch
         * over twice the count is the same normalisation */
        snprintf(what, sizeof what, "batch_norm from given sums %dx%dx%dx%d", n, c, h, w);
        for (int i = 0; i < 2 * c; i++)
            sums_g[i] = 2.0 * sums_c[i];
        gs = done(s, gpu, gpu->ops->batch_norm(gpu, &x.gpu, &gamma.gpu, &beta.gpu, sums_g,
                                              2.0 * count, 1e-5f, 0.1f, NULL, NULL, &y.gpu,
                                              &mean.gpu, &invstd.gpu));
        judge(s, what, p, cs, gs, gs == KLVAE_OK ? compare(gpu, outs, 3) : 0.0);
        snprintf(what, sizeof what,
                 "batch_norm_backward_stats + batch_norm_backward %dx%dx%dx%d (+=)", n, c, h, w);
        cs = s->cpu->ops->batch_norm_backward_stats(s->cpu, &x.cpu, &mean.cpu, &invstd.cpu,
                                                    &dy.cpu, sums_c, &dg.cpu, &dbt.cpu);
        if (cs == KLVAE_OK)
            cs = s->cpu->ops->batch_norm_backward(s->cpu, &x.cpu, &gamma.cpu, &mean.cpu,
                                                  &invstd.cpu, &dy.cpu, sums_c, count, &dx.cpu);
        /* the GPU's from the CPU's statistics, so that only the backward differs */
        gs = gpu->ops->upload(gpu, &mean.gpu, mean.host);
        if (gs == KLVAE_OK)
            gs = gpu->ops->upload(gpu, &invstd.gpu, invstd.host);
        if (gs == KLVAE_OK)
            gs = done(s, gpu, gpu->ops->batch_norm_backward_stats(gpu, &x.gpu, &mean.gpu,
                                                                  &invstd.gpu, &dy.gpu, sums_g,
                                                                  &dg.gpu, &dbt.gpu));
        if (gs == KLVAE_OK)
            gs = done(s, gpu, gpu->ops->batch_norm_backward(gpu, &x.gpu, &gamma.gpu, &mean.gpu,
                                                            &invstd.gpu, &dy.gpu, sums_g, count,
                                                            &dx.gpu));
        const operand *douts[] = {&dx, &dg, &dbt};
        e = gs == KLVAE_OK ? compare(gpu, douts, 3) : 0.0;
        for (int i = 0; i < 2 * c; i++)
            e = fmax(e, rel_diff(sums_g[i], sums_c[i]));
        judge(s, what, p, cs, gs, e);
        /* a frozen discriminator: no parameter gradients, the same sums */
        snprintf(what, sizeof what, "batch_norm_backward_stats without dgamma, dbeta");
        for (int i = 0; i < 2 * c; i++)
            sums_g[i] = NAN;
        gs = done(s, gpu, gpu->ops->batch_norm_backward_stats(gpu, &x.gpu, &mean.gpu,
                                                              &invstd.gpu, &dy.gpu, sums_g, NULL,
                                                              NULL));
        e = 0.0;
        for (int i = 0; i < 2 * c; i++)
            e = fmax(e, rel_diff(sums_g[i], sums_c[i]));
        judge(s, what, p, cs, gs, e);
    }
    free(sums_c), free(sums_g);
    free(rm_c), free(rv_c), free(rm_g), free(rv_g);
    operand *all[] = {&x, &gamma, &beta, &y, &mean, &invstd, &dy, &dx, &dg, &dbt};
    for (size_t i = 0; i < sizeof all / sizeof all[0]; i++)
        operand_free(gpu, all[i]);
}

/* ---- attention, upsample, pool, activation, affine ---- */

static void test_attention_grad(suite *s, kv_backend *gpu, kv_precision p, int b, int c, int h,
                                int w, const char *tag)
{
    operand q, k, v, dout, dq, dk, dv;
    klvae_status_t st = operand_make(s, gpu, p, &q, b, c, h, w, -1, 1, IN, KV_STORAGE_COMPUTE);
    if (st == KLVAE_OK)
        st = operand_make(s, gpu, p, &k, b, c, h, w, -1, 1, IN, KV_STORAGE_COMPUTE);
    if (st == KLVAE_OK)
        st = operand_make(s, gpu, p, &v, b, c, h, w, -1, 1, IN, KV_STORAGE_COMPUTE);
    if (st == KLVAE_OK)
        st = operand_make(s, gpu, p, &dout, b, c, h, w, -1, 1, IN, KV_STORAGE_COMPUTE);
    if (st == KLVAE_OK)
        st = operand_make(s, gpu, p, &dq, b, c, h, w, 0, 0, OUT_SET, KV_STORAGE_COMPUTE);
    if (st == KLVAE_OK)
        st = operand_make(s, gpu, p, &dk, b, c, h, w, 0, 0, OUT_SET, KV_STORAGE_COMPUTE);
    if (st == KLVAE_OK)
        st = operand_make(s, gpu, p, &dv, b, c, h, w, 0, 0, OUT_SET, KV_STORAGE_COMPUTE);
    char what[160];
    snprintf(what, sizeof what, "attention_backward B=%d C=%d N=%d%s", b, c, h * w, tag);
    if (st != KLVAE_OK) {
        failed_call(s, what, p, st);
    } else {
        const float scale = 1.0f / sqrtf((float)c);
        klvae_status_t cs = s->cpu->ops->attention_backward(s->cpu, &q.cpu, &k.cpu, &v.cpu, scale,
                                                            &dout.cpu, &dq.cpu, &dk.cpu, &dv.cpu);
        klvae_status_t gs =
            done(s, gpu, gpu->ops->attention_backward(gpu, &q.gpu, &k.gpu, &v.gpu, scale,
                                                      &dout.gpu, &dq.gpu, &dk.gpu, &dv.gpu));
        const operand *outs[] = {&dq, &dk, &dv};
        judge(s, what, p, cs, gs, gs == KLVAE_OK ? compare(gpu, outs, 3) : 0.0);
    }
    operand *all[] = {&q, &k, &v, &dout, &dq, &dk, &dv};
    for (size_t i = 0; i < sizeof all / sizeof all[0]; i++)
        operand_free(gpu, all[i]);
}

static void test_spatial_grads(suite *s, kv_backend *gpu, kv_precision p)
{
    const int n = 2, c = 5, h = 9, w = 11; /* odd: the pool's last row and column are left out */
    operand x, up_dy, up_dx, pool_y, pool_dy, pool_dx, act_y, act_dy, act_dx, aff_y;
    klvae_status_t st = operand_make(s, gpu, p, &x, n, c, h, w, -2, 2, IN, KV_STORAGE_COMPUTE);
    /* ties in the pool: a quarter of the values on a coarse grid */
    for (size_t i = 0; i < x.n; i += 4)
        x.host[i] = floorf(x.host[i] * 2.0f) / 2.0f;
    if (st == KLVAE_OK)
        st = gpu->ops->upload(gpu, &x.gpu, x.host);
    if (st == KLVAE_OK)
        st = operand_make(s, gpu, p, &up_dy, n, c, 2 * h, 2 * w, -1, 1, IN, KV_STORAGE_COMPUTE);
    if (st == KLVAE_OK)
        st = operand_make(s, gpu, p, &up_dx, n, c, h, w, 0, 0, OUT_SET, KV_STORAGE_COMPUTE);
    if (st == KLVAE_OK)
        st = operand_make(s, gpu, p, &pool_y, n, c, h / 2, w / 2, 0, 0, OUT_SET,
                          KV_STORAGE_COMPUTE);
    if (st == KLVAE_OK)
        st = operand_make(s, gpu, p, &pool_dy, n, c, h / 2, w / 2, -1, 1, IN, KV_STORAGE_COMPUTE);
    if (st == KLVAE_OK)
        st = operand_make(s, gpu, p, &pool_dx, n, c, h, w, 0, 0, OUT_SET, KV_STORAGE_COMPUTE);
    if (st == KLVAE_OK)
        st = operand_make(s, gpu, p, &act_y, n, c, h, w, 0, 0, OUT_SET, KV_STORAGE_COMPUTE);
    if (st == KLVAE_OK)
        st = operand_make(s, gpu, p, &act_dy, n, c, h, w, -1, 1, IN, KV_STORAGE_COMPUTE);
    if (st == KLVAE_OK)
        st = operand_make(s, gpu, p, &act_dx, n, c, h, w, 0, 0, OUT_SET, KV_STORAGE_COMPUTE);
    if (st == KLVAE_OK)
        st = operand_make(s, gpu, p, &aff_y, n, c, h, w, 0, 0, OUT_SET, KV_STORAGE_COMPUTE);
    if (st != KLVAE_OK) {
        failed_call(s, "upsample, pool, activation, affine (operands)", p, st);
    } else {
        klvae_status_t cs = s->cpu->ops->upsample_nearest2x_backward(s->cpu, &up_dy.cpu,
                                                                     &up_dx.cpu);
        klvae_status_t gs =
            done(s, gpu, gpu->ops->upsample_nearest2x_backward(gpu, &up_dy.gpu, &up_dx.gpu));
        const operand *o1[] = {&up_dx};
        judge(s, "upsample_nearest2x_backward", p, cs, gs, gs ? 0.0 : compare(gpu, o1, 1));
        cs = s->cpu->ops->max_pool2x2(s->cpu, &x.cpu, &pool_y.cpu);
        gs = done(s, gpu, gpu->ops->max_pool2x2(gpu, &x.gpu, &pool_y.gpu));
        const operand *o2[] = {&pool_y};
        judge(s, "max_pool2x2 (odd sizes, ties)", p, cs, gs, gs ? 0.0 : compare(gpu, o2, 1));
        cs = s->cpu->ops->max_pool2x2_backward(s->cpu, &x.cpu, &pool_dy.cpu, &pool_dx.cpu);
        gs = done(s, gpu, gpu->ops->max_pool2x2_backward(gpu, &x.gpu, &pool_dy.gpu, &pool_dx.gpu));
        const operand *o3[] = {&pool_dx};
        judge(s, "max_pool2x2_backward (first maximum)", p, cs, gs,
              gs ? 0.0 : compare(gpu, o3, 1));
        for (int a = 0; a < 2; a++) {
            kv_activation act = a ? KV_ACT_LEAKY_RELU : KV_ACT_RELU;
            cs = s->cpu->ops->activation(s->cpu, &x.cpu, act, &act_y.cpu);
            gs = done(s, gpu, gpu->ops->activation(gpu, &x.gpu, act, &act_y.gpu));
            if (cs == KLVAE_OK && gs == KLVAE_OK)
                cs = s->cpu->ops->activation_backward(s->cpu, &act_y.cpu, &act_dy.cpu, act,
                                                      &act_dx.cpu);
            if (cs == KLVAE_OK && gs == KLVAE_OK)
                gs = done(s, gpu, gpu->ops->activation_backward(gpu, &act_y.gpu, &act_dy.gpu,
                                                                act, &act_dx.gpu));
            const operand *o4[] = {&act_y, &act_dx};
            judge(s, a ? "activation and backward, leaky relu" : "activation and backward, relu",
                  p, cs, gs, gs ? 0.0 : compare(gpu, o4, 2));
        }
        float av[5], bv[5];
        fill(av, 5, &s->r, 0.5f, 2.0f);
        fill(bv, 5, &s->r, -1.0f, 1.0f);
        cs = s->cpu->ops->channel_affine(s->cpu, &x.cpu, av, bv, &aff_y.cpu);
        gs = done(s, gpu, gpu->ops->channel_affine(gpu, &x.gpu, av, bv, &aff_y.gpu));
        const operand *o5[] = {&aff_y};
        judge(s, "channel_affine", p, cs, gs, gs ? 0.0 : compare(gpu, o5, 1));
    }
    operand *all[] = {&x, &up_dy, &up_dx, &pool_y, &pool_dy, &pool_dx, &act_y, &act_dy, &act_dx,
                      &aff_y};
    for (size_t i = 0; i < sizeof all / sizeof all[0]; i++)
        operand_free(gpu, all[i]);
}

/* ---- LPIPS ---- */

static void test_lpips_ops(suite *s, kv_backend *gpu, kv_precision p)
{
    const int n = 2, c = 24, h = 7, w = 9;
    operand x, y, norms, dy, dx, a, b, wt, db;
    klvae_status_t st = operand_make(s, gpu, p, &x, n, c, h, w, -2, 2, IN, KV_STORAGE_COMPUTE);
    for (int i = 0; i < c; i++) /* one all-zero feature vector: its gradient is 0 */
        x.host[(size_t)i * h * w] = 0.0f;
    if (st == KLVAE_OK)
        st = gpu->ops->upload(gpu, &x.gpu, x.host);
    if (st == KLVAE_OK)
        st = operand_make(s, gpu, p, &y, n, c, h, w, 0, 0, OUT_SET, KV_STORAGE_COMPUTE);
    if (st == KLVAE_OK)
        st = operand_make(s, gpu, p, &norms, n, 1, h, w, 0, 0, OUT_SET, KV_STORAGE_COMPUTE);
    if (st == KLVAE_OK)
        st = operand_make(s, gpu, p, &dy, n, c, h, w, -1, 1, IN, KV_STORAGE_COMPUTE);
    if (st == KLVAE_OK)
        st = operand_make(s, gpu, p, &dx, n, c, h, w, 0, 0, OUT_SET, KV_STORAGE_COMPUTE);
    if (st == KLVAE_OK)
        st = operand_make(s, gpu, p, &a, n, c, h, w, -0.5f, 0.5f, IN, KV_STORAGE_COMPUTE);
    if (st == KLVAE_OK)
        st = operand_make(s, gpu, p, &b, n, c, h, w, -0.5f, 0.5f, IN, KV_STORAGE_COMPUTE);
    if (st == KLVAE_OK)
        st = operand_make(s, gpu, p, &wt, 1, c, 1, 1, 0, 1, IN, KV_STORAGE_COMPUTE);
    if (st == KLVAE_OK)
        st = operand_make(s, gpu, p, &db, n, c, h, w, 0, 0, OUT_SET, KV_STORAGE_COMPUTE);
    if (st != KLVAE_OK) {
        failed_call(s, "LPIPS ops (operands)", p, st);
    } else {
        klvae_status_t cs = s->cpu->ops->unit_normalize(s->cpu, &x.cpu, &y.cpu, &norms.cpu);
        klvae_status_t gs = done(s, gpu, gpu->ops->unit_normalize(gpu, &x.gpu, &y.gpu, &norms.gpu));
        const operand *o1[] = {&y, &norms};
        judge(s, "unit_normalize", p, cs, gs, gs ? 0.0 : compare(gpu, o1, 2));
        cs = s->cpu->ops->unit_normalize_backward(s->cpu, &x.cpu, &norms.cpu, &dy.cpu, &dx.cpu);
        gs = gpu->ops->upload(gpu, &norms.gpu, norms.host);
        if (gs == KLVAE_OK)
            gs = done(s, gpu, gpu->ops->unit_normalize_backward(gpu, &x.gpu, &norms.gpu, &dy.gpu,
                                                                &dx.gpu));
        const operand *o2[] = {&dx};
        judge(s, "unit_normalize_backward (a zero vector)", p, cs, gs,
              gs ? 0.0 : compare(gpu, o2, 1));
        for (int drop = 0; drop < 2; drop++) {
            double vc[2], vg[2] = {NAN, NAN};
            const float scale[2] = {0.7f, -1.3f};
            const float dropout = drop ? 0.5f : 0.0f;
            /* the mask at an odd first index: one process's share of a batch */
            const uint64_t first = drop ? 4097 : 0;
            cs = s->cpu->ops->lpips_distance(s->cpu, &a.cpu, &b.cpu, &wt.cpu, dropout, 77, first,
                                             vc, scale, &db.cpu);
            gs = done(s, gpu, gpu->ops->lpips_distance(gpu, &a.gpu, &b.gpu, &wt.gpu, dropout, 77,
                                                       first, vg, scale, &db.gpu));
            const operand *o3[] = {&db};
            double e = gs ? 0.0 : compare(gpu, o3, 1);
            e = fmax(e, fmax(rel_diff(vg[0], vc[0]), rel_diff(vg[1], vc[1])));
            judge(s, drop ? "lpips_distance with dropout, and gradient"
                          : "lpips_distance and gradient",
                  p, cs, gs, e);
        }
    }
    operand *all[] = {&x, &y, &norms, &dy, &dx, &a, &b, &wt, &db};
    for (size_t i = 0; i < sizeof all / sizeof all[0]; i++)
        operand_free(gpu, all[i]);
}

/* ---- losses, posterior, optimiser ---- */

static void test_losses(suite *s, kv_backend *gpu, kv_precision p)
{
    operand x, xhat, grad, logits, lgrad;
    klvae_status_t st = operand_make(s, gpu, p, &x, 2, 3, 13, 11, -1, 1, IN, KV_STORAGE_COMPUTE);
    if (st == KLVAE_OK)
        st = operand_make(s, gpu, p, &xhat, 2, 3, 13, 11, -1, 1, IN, KV_STORAGE_COMPUTE);
    if (st == KLVAE_OK)
        st = operand_make(s, gpu, p, &grad, 2, 3, 13, 11, 0, 0, OUT_SET, KV_STORAGE_COMPUTE);
    if (st == KLVAE_OK)
        st = operand_make(s, gpu, p, &logits, 2, 1, 5, 6, -25, 25, IN, KV_STORAGE_COMPUTE);
    if (st == KLVAE_OK)
        st = operand_make(s, gpu, p, &lgrad, 2, 1, 5, 6, 0, 0, OUT_SET, KV_STORAGE_COMPUTE);
    if (st != KLVAE_OK) {
        failed_call(s, "losses (operands)", p, st);
    } else {
        for (int l2 = 0; l2 < 2; l2++) {
            double sc = 0.0, sg = NAN;
            kv_pixel_loss kind = l2 ? KV_LOSS_L2 : KV_LOSS_L1;
            klvae_status_t cs =
                s->cpu->ops->pixel_loss(s->cpu, &x.cpu, &xhat.cpu, kind, 0.25f, &sc, &grad.cpu);
            klvae_status_t gs = done(
                s, gpu, gpu->ops->pixel_loss(gpu, &x.gpu, &xhat.gpu, kind, 0.25f, &sg, &grad.gpu));
            const operand *o[] = {&grad};
            judge(s, l2 ? "pixel_loss l2 and gradient" : "pixel_loss l1 and gradient", p, cs, gs,
                  gs ? 0.0 : fmax(compare(gpu, o, 1), rel_diff(sg, sc)));
        }
        static const char *names[] = {"hinge real", "hinge fake", "vanilla real", "vanilla fake",
                                      "generator"};
        const kv_logit_loss kinds[] = {KV_LOGITS_HINGE_REAL, KV_LOGITS_HINGE_FAKE,
                                       KV_LOGITS_VANILLA_REAL, KV_LOGITS_VANILLA_FAKE,
                                       KV_LOGITS_GENERATOR};
        for (int k = 0; k < 5; k++) {
            double mc = 0.0, mg = NAN;
            klvae_status_t cs =
                s->cpu->ops->logit_loss(s->cpu, &logits.cpu, kinds[k], -0.5f, &mc, &lgrad.cpu);
            klvae_status_t gs =
                done(s, gpu, gpu->ops->logit_loss(gpu, &logits.gpu, kinds[k], -0.5f, &mg,
                                                  &lgrad.gpu));
            const operand *o[] = {&lgrad};
            char what[96];
            snprintf(what, sizeof what, "logit_loss %s and gradient", names[k]);
            judge(s, what, p, cs, gs, gs ? 0.0 : fmax(compare(gpu, o, 1), rel_diff(mg, mc)));
        }
    }
    operand *all[] = {&x, &xhat, &grad, &logits, &lgrad};
    for (size_t i = 0; i < sizeof all / sizeof all[0]; i++)
        operand_free(gpu, all[i]);
}

static void test_posterior_grads(suite *s, kv_backend *gpu, kv_precision p)
{
    const int n = 2, z = 4, h = 5, w = 7;
    operand moments, dz, dm;
    klvae_status_t st = operand_make(s, gpu, p, &moments, n, 2 * z, h, w, -35, 25, IN,
                                     KV_STORAGE_COMPUTE);
    if (st == KLVAE_OK)
        st = operand_make(s, gpu, p, &dz, n, z, h, w, -1, 1, IN, KV_STORAGE_COMPUTE);
    if (st == KLVAE_OK)
        st = operand_make(s, gpu, p, &dm, n, 2 * z, h, w, 0, 0, OUT_SET, KV_STORAGE_COMPUTE);
    if (st != KLVAE_OK) {
        failed_call(s, "posterior gradients (operands)", p, st);
    } else {
        for (int sampled = 0; sampled < 2; sampled++) {
            /* sampled: eps of a share of a batch, from an odd first index */
            const uint64_t first = sampled ? 1001 : 0;
            klvae_status_t cs = s->cpu->ops->posterior_backward(
                s->cpu, &moments.cpu, &dz.cpu, 0.01f, sampled, 4242, first, &dm.cpu);
            klvae_status_t gs =
                done(s, gpu, gpu->ops->posterior_backward(gpu, &moments.gpu, &dz.gpu, 0.01f,
                                                          sampled, 4242, first, &dm.gpu));
            const operand *o[] = {&dm};
            judge(s, sampled ? "posterior_backward (sampled: eps regenerated at first 1001)"
                             : "posterior_backward (mode)",
                  p, cs, gs, gs ? 0.0 : compare(gpu, o, 1));
        }
        double kc = 0.0, kg = NAN;
        klvae_status_t cs = s->cpu->ops->kl_sum(s->cpu, &moments.cpu, &kc);
        klvae_status_t gs = done(s, gpu, gpu->ops->kl_sum(gpu, &moments.gpu, &kg));
        judge(s, "kl_sum", p, cs, gs, rel_diff(kg, kc));
    }
    operand *all[] = {&moments, &dz, &dm};
    for (size_t i = 0; i < sizeof all / sizeof all[0]; i++)
        operand_free(gpu, all[i]);
}

/* Adam on a float32 master parameter and on a compute one, three steps. */
static void test_optimizer(suite *s, kv_backend *gpu, kv_precision p)
{
    for (int f32 = 1; f32 >= 0; f32--) {
        const kv_storage ps = f32 ? KV_STORAGE_FLOAT32 : KV_STORAGE_COMPUTE;
        operand param, grad, m, v;
        klvae_status_t st = operand_make(s, gpu, p, &param, 3, 7, 5, 9, -1, 1, OUT_ADD, ps);
        if (st == KLVAE_OK)
            st = operand_make(s, gpu, p, &grad, 3, 7, 5, 9, -1e-3f, 1e-3f, IN,
                              KV_STORAGE_FLOAT32);
        if (st == KLVAE_OK)
            st = operand_make(s, gpu, p, &m, 3, 7, 5, 9, -1e-3f, 1e-3f, OUT_ADD,
                              KV_STORAGE_FLOAT32);
        if (st == KLVAE_OK)
            st = operand_make(s, gpu, p, &v, 3, 7, 5, 9, 0, 1e-6f, OUT_ADD, KV_STORAGE_FLOAT32);
        klvae_status_t cs = KLVAE_OK, gs = st;
        for (int step = 1; step <= 3 && cs == KLVAE_OK && gs == KLVAE_OK; step++) {
            cs = s->cpu->ops->adam(s->cpu, &param.cpu, &grad.cpu, &m.cpu, &v.cpu, 1e-3f, 0.5f,
                                   0.9f, 1e-5f, step);
            gs = done(s, gpu, gpu->ops->adam(gpu, &param.gpu, &grad.gpu, &m.gpu, &v.gpu, 1e-3f,
                                             0.5f, 0.9f, 1e-5f, step));
        }
        /* the parameter's own storage rounds it in bf16: the CPU's, rounded */
        if (!f32)
            representable(p, param.host, param.n);
        const operand *o[] = {&param, &m, &v};
        judge(s, f32 ? "adam, 3 steps (float32 master parameter)"
                     : "adam, 3 steps (parameter in the compute format)",
              p, cs, gs, gs ? 0.0 : compare(gpu, o, 3));
        if (f32 && gs == KLVAE_OK) {
            double sc = 0.0, sg = NAN;
            cs = s->cpu->ops->sum_squares(s->cpu, &grad.cpu, &sc);
            gs = done(s, gpu, gpu->ops->sum_squares(gpu, &grad.gpu, &sg));
            judge(s, "sum_squares", p, cs, gs, rel_diff(sg, sc));
        }
        operand *all[] = {&param, &grad, &m, &v};
        for (size_t i = 0; i < sizeof all / sizeof all[0]; i++)
            operand_free(gpu, all[i]);
    }
}

void run_training_ops(suite *s, kv_precision p)
{
    kv_backend *gpu = NULL, *small = NULL;
    klvae_status_t st = backend_with(s, p, NULL, NULL, &gpu);
    if (st != KLVAE_OK) {
        failed_call(s, "create the backend (training ops)", p, st);
        return;
    }
    const char *missing = kv_backend_missing_op(gpu, KV_OP_TRAINING);
    printf("%s  %-58s [%s] %s\n", missing ? "FAIL" : "PASS", "op table: every training op",
           harness_precision_name(p), missing ? missing : "all present");
    missing ? s->failed++ : s->passed++;
    for (size_t i = 0; i < sizeof grad_conv_cases / sizeof grad_conv_cases[0]; i++)
        test_conv_grads(s, gpu, p, &grad_conv_cases[i]);
    test_group_norm_grad(s, gpu, p, 2, 32, 9, 11, 8, KV_ACT_SILU);
    test_group_norm_grad(s, gpu, p, 1, 24, 13, 5, 6, KV_ACT_NONE);
    test_batch_norm(s, gpu, p, 3, 16, 7, 5);
    test_attention_grad(s, gpu, p, 2, 32, 9, 11, "");
    if (backend_with(s, p, "KLVAE_CUDA_ATTENTION_BUDGET", "200000", &small) == KLVAE_OK) {
        test_attention_grad(s, small, p, 2, 32, 16, 20, " (many blocks)");
        kv_backend_destroy(small);
    }
    test_spatial_grads(s, gpu, p);
    test_lpips_ops(s, gpu, p);
    test_losses(s, gpu, p);
    test_posterior_grads(s, gpu, p);
    test_optimizer(s, gpu, p);
    kv_backend_destroy(gpu);
}

/* ---- whole steps ---- */

#define TRAIN_FIXTURE "tests/fixtures/train/"

/* The fixture model and a trainer on it (the CPU tests' reference options,
 * with adam_eps 1e-5: Adam's first steps move a weight by lr for any
 * gradient far above eps, so a flip of a near-zero gradient would decide). */
static klvae_status_t fixture_trainer(const char *backend, const char *precision,
                                      klvae_model_t **m, klvae_trainer_t **t)
{
    static const char *const kv[][2] = {
        {"learning_rate", "1e-4"},  {"disc_learning_rate", "1e-4"}, {"pixel_loss", "l1"},
        {"perceptual_weight", "1"}, {"lpips_weights", TRAIN_FIXTURE "lpips.safetensors"},
        {"lpips_dropout", "0"},     {"kl_weight", "0.01"},           {"posterior", "sample"},
        {"disc_start", "0"},        {"disc_factor", "1"},            {"disc_weight", "0.5"},
        {"disc_loss", "hinge"},     {"disc_update", "fresh"},        {"disc_layers", "3"},
        {"disc_channels", "8"},     {"disc_weights", TRAIN_FIXTURE "disc.safetensors"},
        {"ema_decay", "0.9"},       {"learn_logvar", "true"},        {"adam_eps", "1e-5"},
        {"seed", "5"},
    };
    klvae_options_t *o = NULL;
    *m = NULL;
    *t = NULL;
    klvae_status_t st = klvae_options_create(&o);
    for (size_t i = 0; st == KLVAE_OK && i < sizeof kv / sizeof kv[0]; i++)
        st = klvae_options_set(o, kv[i][0], kv[i][1]);
    if (st == KLVAE_OK)
        st = klvae_options_set(o, "backend", backend);
    if (st == KLVAE_OK && precision)
        st = klvae_options_set(o, "precision", precision);
    if (st == KLVAE_OK)
        st = klvae_model_load(TRAIN_FIXTURE "vae", o, m);
    if (st == KLVAE_OK)
        st = klvae_trainer_create(*m, o, t);
    klvae_options_free(o);
    return st;
}

static float *batch_images(int step, int n, int h, int w)
{
    size_t count = (size_t)n * 3 * h * w;
    float *x = alloc_floats(count);
    rng r = {9000u + (uint64_t)step * 7919u};
    fill(x, count, &r, -1, 1);
    return x;
}

/* Steps from..to of trainer t on the fixed batches; the stats of each in
 * out (to - from of them), or NULL. */
static klvae_status_t run_steps(klvae_trainer_t *t, int from, int to, klvae_step_stats_t *out)
{
    klvae_status_t st = KLVAE_OK;
    for (int k = from; k < to && st == KLVAE_OK; k++) {
        float *x = batch_images(k, 2, 32, 40);
        klvae_step_stats_t stats = KLVAE_STEP_STATS_INIT;
        st = klvae_trainer_step(t, x, 2, 32, 40, &stats);
        if (out)
            out[k - from] = stats;
        free(x);
    }
    return st;
}

/* Tensors whose values are rounding noise on any backend: the attention's
 * key bias has an exactly zero true gradient (the softmax cancels it), so
 * its Adam moments hold each backend's own round-off (about 1e-7 against
 * 0.3 to 3.5 for the other biases); tests/test_train.c leaves them out too. */
static bool rounding_noise(const char *name)
{
    return strncmp(name, "adam.", 5) == 0 && strstr(name, "to_k.bias") != NULL;
}

/* The largest relative L2 difference between the tensors of two
 * checkpoints of one trainer shape; *what names the worst. With
 * across_backends, the moments of rounding_noise are left out. */
static double compare_checkpoints(const char *a, const char *b, bool across_backends, char *what,
                                  size_t size)
{
    kv_safetensors fa, fb;
    memset(&fa, 0, sizeof fa);
    memset(&fb, 0, sizeof fb);
    double worst = INFINITY;
    snprintf(what, size, "(cannot read the checkpoints)");
    if (kv_st_open(a, &fa) != KLVAE_OK || kv_st_open(b, &fb) != KLVAE_OK)
        goto out;
    worst = 0.0;
    for (size_t i = 0; i < fa.count; i++) {
        const kv_st_tensor *ta = &fa.tensors[i], *tb = kv_st_find(&fb, ta->name);
        size_t n = kv_st_numel(ta);
        if (across_backends && rounding_noise(ta->name))
            continue;
        if (!tb || kv_st_numel(tb) != n) {
            snprintf(what, size, "%s (missing or another shape)", ta->name);
            worst = INFINITY;
            break;
        }
        float *va = alloc_floats(n), *vb = alloc_floats(n);
        double e = kv_st_read_f32(&fa, ta, va) == KLVAE_OK && kv_st_read_f32(&fb, tb, vb) == KLVAE_OK
                       ? rel_l2(vb, va, n)
                       : INFINITY;
        if (e > worst) {
            worst = e;
            snprintf(what, size, "%s", ta->name);
        }
        free(va);
        free(vb);
    }
out:
    kv_st_close(&fa);
    kv_st_close(&fb);
    return worst;
}

static double worst_loss_difference(const klvae_step_stats_t *a, const klvae_step_stats_t *b,
                                    int steps)
{
    double worst = 0.0;
    for (int k = 0; k < steps; k++) {
        const double ga[] = {a[k].total_loss, a[k].rec_loss, a[k].perceptual_loss,
                             a[k].nll_loss,   a[k].kl_loss,  a[k].g_loss,
                             a[k].d_weight,   a[k].d_loss};
        const double gb[] = {b[k].total_loss, b[k].rec_loss, b[k].perceptual_loss,
                             b[k].nll_loss,   b[k].kl_loss,  b[k].g_loss,
                             b[k].d_weight,   b[k].d_loss};
        for (size_t i = 0; i < sizeof ga / sizeof ga[0]; i++)
            worst = fmax(worst, fabs(gb[i] - ga[i]) / fmax(fabs(ga[i]), 1e-6));
    }
    return worst;
}

/* klvae_trainer_step_device against klvae_trainer_step (fp32: the same
 * bits), a NaN in a device batch refused with nothing changed, and bf16
 * mixed precision: six steps on one batch whose losses are finite and
 * fall, and a checkpoint the CPU trainer loads. */
static void run_device_and_bf16_steps(suite *s, const char *dir)
{
    char a_ck[160], b_ck[160];
    snprintf(a_ck, sizeof a_ck, "%s/host.ckpt", dir);
    snprintf(b_ck, sizeof b_ck, "%s/device.ckpt", dir);
    klvae_model_t *ma = NULL, *mb = NULL, *mc = NULL;
    klvae_trainer_t *ta = NULL, *tb = NULL, *tc = NULL;
    kv_tensor dx = {0};
    float *x = batch_images(0, 2, 32, 40);
    char what[200];
    klvae_status_t st = fixture_trainer("cuda", "fp32", &ma, &ta);
    if (st == KLVAE_OK)
        st = fixture_trainer("cuda", "fp32", &mb, &tb);
    if (st == KLVAE_OK) /* a caller's device array: an fp32 NCHW backend's tensor */
        st = put(s->mem, 2, 3, 32, 40, x, &dx);
    klvae_step_stats_t sa = KLVAE_STEP_STATS_INIT, sb = KLVAE_STEP_STATS_INIT;
    if (st == KLVAE_OK)
        st = klvae_trainer_step(ta, x, 2, 32, 40, &sa);
    if (st == KLVAE_OK)
        st = klvae_trainer_step_device(tb, dx.data, 2, 32, 40, NULL, &sb);
    if (st == KLVAE_OK)
        st = klvae_trainer_save(ta, a_ck);
    if (st == KLVAE_OK)
        st = klvae_trainer_save(tb, b_ck);
    if (st == KLVAE_OK)
        verdict(s, "klvae_trainer_step_device: the bits of klvae_trainer_step", KV_PRECISION_FP32,
                fmax(compare_checkpoints(a_ck, b_ck, false, what, sizeof what),
                     worst_loss_difference(&sa, &sb, 1)),
                0.0);
    else
        failed_call(s, "klvae_trainer_step_device", KV_PRECISION_FP32, st);
    const float saved = x[1234];
    if (st == KLVAE_OK) { /* a NaN in the device batch */
        x[1234] = NAN;
        st = s->mem->ops->upload(s->mem, &dx, x);
        int64_t before = klvae_trainer_step_count(tb);
        klvae_status_t nan = st == KLVAE_OK
                                 ? klvae_trainer_step_device(tb, dx.data, 2, 32, 40, NULL, NULL)
                                 : st;
        int ok = nan == KLVAE_ERR_NONFINITE && klvae_trainer_step_count(tb) == before &&
                 strstr(klvae_last_error(), "images 0 to 1") != NULL;
        printf("%s  %-58s [fp32] %s: %s\n", ok ? "PASS" : "FAIL",
               "a NaN in a device batch: refused, nothing changed", klvae_status_string(nan),
               klvae_last_error());
        ok ? s->passed++ : s->failed++;
    }
    kv_tensor_release(s->mem, &dx);
    klvae_trainer_free(ta), klvae_trainer_free(tb);
    klvae_model_free(ma), klvae_model_free(mb);
    ta = tb = NULL;
    ma = mb = NULL;
    /* bf16: float32 master weights under bf16 ones */
    x[1234] = saved;
    klvae_step_stats_t stats[6];
    st = fixture_trainer("cuda", "bf16", &ma, &ta);
    for (int k = 0; k < 6 && st == KLVAE_OK; k++) {
        stats[k] = (klvae_step_stats_t)KLVAE_STEP_STATS_INIT;
        st = klvae_trainer_step(ta, x, 2, 32, 40, &stats[k]);
    }
    if (st == KLVAE_OK)
        st = klvae_trainer_save(ta, a_ck);
    if (st == KLVAE_OK)
        st = fixture_trainer("cpu", NULL, &mc, &tc);
    if (st == KLVAE_OK)
        st = klvae_trainer_load(tc, a_ck);
    if (st != KLVAE_OK) {
        failed_call(s, "bf16 training: 6 steps, checkpoint loaded on the CPU", KV_PRECISION_BF16,
                    st);
    } else {
        int finite = 1;
        for (int k = 0; k < 6; k++)
            finite &= isfinite(stats[k].total_loss) && isfinite(stats[k].d_loss);
        int ok = finite && stats[5].rec_loss < stats[0].rec_loss;
        printf("%s  %-58s [bf16] rec loss %.5f -> %.5f\n", ok ? "PASS" : "FAIL",
               "bf16 training: finite losses that fall (one batch, 6 steps)", stats[0].rec_loss,
               stats[5].rec_loss);
        ok ? s->passed++ : s->failed++;
        printf("PASS  %-58s [bf16]\n", "bf16 checkpoint loaded by the CPU trainer");
        s->passed++;
    }
    klvae_trainer_free(ta), klvae_trainer_free(tc);
    klvae_model_free(ma), klvae_model_free(mc);
    free(x);
    unlink(a_ck);
    unlink(b_ck);
}

void run_training_steps(suite *s, uint64_t seed, const char *plugin_path)
{
    (void)seed;
    setenv("KLVAE_CUDA_PLUGIN", plugin_path, 1);
    char dir[] = "/tmp/klvae-gpu-train-XXXXXX";
    if (!mkdtemp(dir)) {
        skip(s, "training steps", "(cannot make a temporary folder)");
        return;
    }
    char cpu_ck[128], gpu_ck[128], gpu2_ck[128], x_ck[128];
    snprintf(cpu_ck, sizeof cpu_ck, "%s/cpu.ckpt", dir);
    snprintf(gpu_ck, sizeof gpu_ck, "%s/gpu.ckpt", dir);
    snprintf(gpu2_ck, sizeof gpu2_ck, "%s/gpu2.ckpt", dir);
    snprintf(x_ck, sizeof x_ck, "%s/x.ckpt", dir);
    klvae_model_t *mc = NULL, *mg = NULL, *mg2 = NULL;
    klvae_trainer_t *tc = NULL, *tg = NULL, *tg2 = NULL;
    klvae_step_stats_t sc[3], sg[3], sg2[3];
    char what[200];
    /* three fp32 steps on each backend */
    klvae_status_t st = fixture_trainer("cpu", NULL, &mc, &tc);
    if (st == KLVAE_OK)
        st = run_steps(tc, 0, 3, sc);
    if (st == KLVAE_OK)
        st = klvae_trainer_save(tc, cpu_ck);
    klvae_status_t gst = fixture_trainer("cuda", "fp32", &mg, &tg);
    if (gst == KLVAE_OK)
        gst = run_steps(tg, 0, 3, sg);
    if (gst == KLVAE_OK)
        gst = klvae_trainer_save(tg, gpu_ck);
    if (st != KLVAE_OK || gst != KLVAE_OK) {
        failed_call(s, st != KLVAE_OK ? "three CPU steps (the reference)" : "three GPU steps",
                    KV_PRECISION_FP32, st != KLVAE_OK ? st : gst);
        goto out;
    }
    verdict(s, "3 fp32 steps: every loss against the CPU trainer", KV_PRECISION_FP32,
            worst_loss_difference(sc, sg, 3), 1e-4);
    double e = compare_checkpoints(cpu_ck, gpu_ck, true, what, sizeof what);
    char line[300];
    snprintf(line, sizeof line, "3 fp32 steps: every tensor (worst %.60s)", what);
    verdict(s, line, KV_PRECISION_FP32, e, 1e-4);
    /* the same GPU steps again: the same bits */
    if (fixture_trainer("cuda", "fp32", &mg2, &tg2) == KLVAE_OK &&
        run_steps(tg2, 0, 3, sg2) == KLVAE_OK && klvae_trainer_save(tg2, gpu2_ck) == KLVAE_OK)
        verdict(s, "3 fp32 steps twice: the same bits", KV_PRECISION_FP32,
                compare_checkpoints(gpu_ck, gpu2_ck, false, what, sizeof what), 0.0);
    else
        failed_call(s, "3 fp32 steps twice", KV_PRECISION_FP32, KLVAE_ERR_BACKEND);
    /* across backends: the GPU's checkpoint continued on the CPU, and the
     * CPU's on the GPU, one step each, against the same step on the others */
    st = klvae_trainer_load(tc, gpu_ck);
    if (st == KLVAE_OK)
        st = run_steps(tc, 3, 4, NULL);
    if (st == KLVAE_OK)
        st = klvae_trainer_save(tc, x_ck);
    if (st == KLVAE_OK)
        st = run_steps(tg, 3, 4, NULL);
    if (st == KLVAE_OK)
        st = klvae_trainer_save(tg, gpu_ck);
    if (st == KLVAE_OK) {
        e = compare_checkpoints(x_ck, gpu_ck, true, what, sizeof what);
        verdict(s, "GPU checkpoint resumed on the CPU: step 4 as on the GPU", KV_PRECISION_FP32,
                e, 1e-4);
    } else {
        failed_call(s, "GPU checkpoint resumed on the CPU", KV_PRECISION_FP32, st);
    }
    st = tg2 ? klvae_trainer_load(tg2, cpu_ck) : KLVAE_ERR_BACKEND;
    if (st == KLVAE_OK)
        st = run_steps(tg2, 3, 4, NULL);
    if (st == KLVAE_OK)
        st = klvae_trainer_save(tg2, gpu2_ck);
    if (st == KLVAE_OK)
        st = klvae_trainer_load(tc, cpu_ck);
    if (st == KLVAE_OK)
        st = run_steps(tc, 3, 4, NULL);
    if (st == KLVAE_OK)
        st = klvae_trainer_save(tc, x_ck);
    if (st == KLVAE_OK)
        verdict(s, "CPU checkpoint resumed on the GPU: step 4 as on the CPU", KV_PRECISION_FP32,
                compare_checkpoints(x_ck, gpu2_ck, true, what, sizeof what), 1e-4);
    else
        failed_call(s, "CPU checkpoint resumed on the GPU", KV_PRECISION_FP32, st);
out:
    klvae_trainer_free(tc);
    klvae_trainer_free(tg);
    klvae_trainer_free(tg2);
    klvae_model_free(mc);
    klvae_model_free(mg);
    klvae_model_free(mg2);
    run_device_and_bf16_steps(s, dir);
    unlink(cpu_ck), unlink(gpu_ck), unlink(gpu2_ck), unlink(x_ck);
    rmdir(dir);
}
