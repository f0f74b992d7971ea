/* test_weight_cache.c — the CPU backend's kept weight forms
 * (src/backend/cpu/weight_cache.h) never stand in for weights that changed.
 *
 * Every case runs twice: in fp32 (the Winograd transforms) and, where the
 * CPU has AVX512-BF16, in bf16 (the packed bf16 forms as well). Results
 * with the cache are compared bit for bit with a backend whose cache is
 * off, which computes every form afresh on every call. */
#include "backend/cpu/bf16_gemm.h"
#include "backend/cpu/cpu_ops.h"
#include "model/model.h"
#include "test_util.h"
#include "train/discriminator.h"
#include "train/trainer.h"

static kv_backend *make_backend(bool bf16, bool cache)
{
    kv_backend_settings settings = {2, 0, bf16 ? KV_PRECISION_BF16 : KV_PRECISION_FP32};
    kv_backend *be = NULL;
    ck_assert_ok(kv_cpu_backend_create(&settings, &be));
    ck_assert(kv_cpu_of(be)->bf16 == bf16);
    kv_cpu_of(be)->weights.disabled = !cache;
    return be;
}

static kv_weight_cache *cache_of(kv_backend *be)
{
    return &kv_cpu_of(be)->weights;
}

static bool run_bf16(int pass)
{
    return pass == 1;
}

/* The passes a case makes: fp32, then bf16 where the CPU has it. */
static int passes(void)
{
    return kv_bf16_available(NULL, 0) ? 2 : 1;
}

/* ---- ops ---- */

#define CO 40
#define CI 36
#define N 2
#define H 9
#define W 11

/* One backend's tensors: weights w (CO, CI, 3, 3) in backend memory, and
 * what the probes read and write. */
typedef struct side {
    kv_backend *be;
    kv_tensor w, other, grad, m, v;
    kv_tensor x, dy, y, dx, ys; /* ys: the strided convolution's output */
} side;

static void side_init(side *s, kv_backend *be, const float *w, const float *x, const float *dy)
{
    memset(s, 0, sizeof *s);
    s->be = be;
    kv_tensor *weights[] = {&s->w, &s->other, &s->grad, &s->m, &s->v};
    for (size_t i = 0; i < KV_ARRAY_LEN(weights); i++)
        ck_assert_ok(kv_tensor_alloc(be, CO, CI, 3, 3, weights[i]));
    const size_t nw = (size_t)CO * CI * 9;
    ck_assert_ok(be->ops->upload(be, &s->w, w));
    test_rng rng = test_rng_new(31);
    float *host = test_alloc(nw);
    test_fill(host, nw, &rng, -0.2f, 0.2f);
    ck_assert_ok(be->ops->upload(be, &s->other, host));
    ck_assert_ok(be->ops->upload(be, &s->grad, host));
    ck_assert_ok(be->ops->fill(be, &s->m, 0.0f));
    ck_assert_ok(be->ops->fill(be, &s->v, 0.0f));
    free(host);
    ck_assert_ok(kv_tensor_alloc(be, N, CI, H, W, &s->x));
    ck_assert_ok(be->ops->upload(be, &s->x, x));
    ck_assert_ok(kv_tensor_alloc(be, N, CO, H, W, &s->dy));
    ck_assert_ok(be->ops->upload(be, &s->dy, dy));
    ck_assert_ok(kv_tensor_alloc(be, N, CO, H, W, &s->y));
    ck_assert_ok(kv_tensor_alloc(be, N, CI, H, W, &s->dx));
    ck_assert_ok(kv_tensor_alloc(be, N, CO, (H + 1 - 3) / 2 + 1, (W + 1 - 3) / 2 + 1, &s->ys));
}

static void side_free(side *s)
{
    kv_tensor *all[] = {&s->w, &s->other, &s->grad, &s->m, &s->v, &s->x,
                        &s->dy, &s->y, &s->dx, &s->ys};
    for (size_t i = 0; i < KV_ARRAY_LEN(all); i++)
        kv_tensor_release(s->be, all[i]);
    kv_backend_destroy(s->be);
}

/* Every form of w the backend keeps: the forward 3x3 "same" convolution
 * (Winograd), its data gradient (the flipped kernel) and a stride-2
 * convolution (im2col: the packed bf16 matrix in bf16). */
static void probe(side *s)
{
    kv_backend *be = s->be;
    const kv_conv_geometry same = {1, 1, 1, 1, 1}, down = {2, 0, 0, 1, 1};
    ck_assert_ok(be->ops->conv2d(be, &s->x, NULL, &s->w, NULL, NULL, same, &s->y));
    ck_assert_ok(be->ops->conv2d_backward_data(be, &s->dy, &s->w, same, &s->dx));
    ck_assert_ok(be->ops->conv2d(be, &s->x, NULL, &s->w, NULL, NULL, down, &s->ys));
}

static void assert_same_bits(const kv_tensor *a, const kv_tensor *b, const char *what,
                             const char *after)
{
    const size_t n = kv_tensor_numel(a);
    ck_assert_uint_eq(n, kv_tensor_numel(b));
    if (memcmp(a->data, b->data, n * sizeof(float)) == 0)
        return; /* one Check assertion per tensor, not per value: each one is logged */
    const float *x = a->data, *y = b->data;
    size_t i = 0;
    while (memcmp(&x[i], &y[i], sizeof x[i]) == 0)
        i++;
    ck_abort_msg("%s after %s: [%zu] is %.9g, uncached %.9g", what, after, i, (double)x[i],
                 (double)y[i]);
}

/* The cached side c and the uncached side u probe alike, after the same
 * writes. */
static void assert_probes_agree(side *c, side *u, const char *after)
{
    probe(c);
    probe(u);
    assert_same_bits(&c->y, &u->y, "the convolution", after);
    assert_same_bits(&c->dx, &u->dx, "the data gradient", after);
    assert_same_bits(&c->ys, &u->ys, "the strided convolution", after);
}

/* Probes until every form of w is stored (the second use since w last
 * changed stores them), then once more, finding each. */
static void settle(side *c, side *u, int forms)
{
    kv_weight_cache *cache = cache_of(c->be);
    const uint64_t stores = cache->stores;
    for (int i = 0; i < 2 && cache->stores < stores + (uint64_t)forms; i++)
        assert_probes_agree(c, u, "a use");
    ck_assert_uint_eq(cache->stores, stores + (uint64_t)forms);
    const uint64_t hits = cache->hits;
    assert_probes_agree(c, u, "a hit");
    ck_assert_uint_eq(cache->hits, hits + (uint64_t)forms);
}

typedef enum writer {
    W_FILL, W_ADD, W_AXPY, W_LERP, W_SCALE, W_ADAM, W_AFFINE, W_ACTIVATION, W_UPLOAD, W_COUNT
} writer;

static const char *const writer_names[] = {"fill", "add", "axpy", "lerp", "scale", "adam",
                                           "channel_affine", "activation", "upload"};

static void write_weights(side *s, writer how, const float *host)
{
    kv_backend *be = s->be;
    static const float a[CO] = {1.5f, -0.5f, 2.0f}, b[CO] = {0.25f, 0.0f, -0.125f};
    kv_tensor w4 = kv_tensor_view4(&s->w, CO, CI, 3, 3);
    switch (how) {
    case W_FILL: ck_assert_ok(be->ops->fill(be, &s->w, 0.03f)); break;
    case W_ADD: ck_assert_ok(be->ops->add(be, &s->w, &s->other, &s->w)); break;
    case W_AXPY: ck_assert_ok(be->ops->axpy(be, -0.75f, &s->other, &s->w)); break;
    case W_LERP: ck_assert_ok(be->ops->lerp(be, &s->w, &s->other, 0.3f)); break;
    case W_SCALE: ck_assert_ok(be->ops->scale(be, &s->w, -1.25f)); break;
    case W_ADAM:
        ck_assert_ok(be->ops->adam(be, &s->w, &s->grad, &s->m, &s->v, 1e-2f, 0.9f, 0.999f, 1e-8f, 1));
        break;
    case W_AFFINE:
        /* channel_affine's channels are w's input channels here: a and b
         * beyond the three set are 0 (0 * x + 0: those weights become 0) */
        ck_assert_ok(be->ops->channel_affine(be, &w4, a, b, &w4));
        break;
    case W_ACTIVATION: ck_assert_ok(be->ops->activation(be, &s->w, KV_ACT_RELU, &s->w)); break;
    case W_UPLOAD: ck_assert_ok(be->ops->upload(be, &s->w, host)); break;
    case W_COUNT: break;
    }
}

START_TEST(every_writer_drops_the_forms_of_what_it_wrote)
{
    const size_t nw = (size_t)CO * CI * 9, nx = (size_t)N * CI * H * W, ny = (size_t)N * CO * H * W;
    float *w = test_alloc(nw), *x = test_alloc(nx), *dy = test_alloc(ny), *fresh = test_alloc(nw);
    test_rng rng = test_rng_new(17);
    test_fill(w, nw, &rng, -0.3f, 0.3f);
    test_fill(x, nx, &rng, -1.0f, 1.0f);
    test_fill(dy, ny, &rng, -1.0f, 1.0f);
    test_fill(fresh, nw, &rng, -0.3f, 0.3f);
    for (int pass = 0; pass < passes(); pass++) {
        const bool bf16 = run_bf16(pass);
        const int forms = bf16 ? 3 : 2; /* fp32: the strided conv keeps no form */
        side c, u;
        side_init(&c, make_backend(bf16, true), w, x, dy);
        side_init(&u, make_backend(bf16, false), w, x, dy);
        kv_weight_cache *cache = cache_of(c.be);
        for (writer how = 0; how < W_COUNT; how++) {
            settle(&c, &u, forms);
            const uint64_t hits = cache->hits, drops = cache->drops;
            write_weights(&c, how, fresh);
            write_weights(&u, how, fresh);
            /* the writer itself dropped them, before any use */
            ck_assert_msg(cache->drops == drops + (uint64_t)forms, "%s dropped %d forms of %d",
                          writer_names[how], (int)(cache->drops - drops), forms);
            assert_probes_agree(&c, &u, writer_names[how]);
            ck_assert_uint_eq(cache->hits, hits);
        }
        /* a write behind the backend's back: the hash of sampled values
         * catches it at the next use */
        settle(&c, &u, forms);
        const uint64_t stale = cache->stale;
        for (size_t i = 0; i < nw; i++) {
            ((float *)c.w.data)[i] = fresh[nw - 1 - i];
            ((float *)u.w.data)[i] = fresh[nw - 1 - i];
        }
        assert_probes_agree(&c, &u, "a direct write");
        ck_assert_uint_eq(cache->stale, stale + (uint64_t)forms);
        /* released memory keeps no form: it may come back as another tensor */
        settle(&c, &u, forms);
        ck_assert_int_eq(cache->count, forms);
        kv_tensor_release(c.be, &c.w);
        ck_assert_int_eq(cache->count, 0);
        ck_assert_uint_eq(cache->stored_bytes, 0);
        side_free(&c);
        side_free(&u);
    }
    free(w);
    free(x);
    free(dy);
    free(fresh);
}
END_TEST

/* Forms are stored only at the second use of unchanged weights, and never
 * past the budget. */
START_TEST(forms_are_stored_at_the_second_use_within_the_budget)
{
    const size_t nw = (size_t)CO * CI * 9, nx = (size_t)N * CI * H * W, ny = (size_t)N * CO * H * W;
    float *w = test_alloc(nw), *x = test_alloc(nx), *dy = test_alloc(ny);
    test_rng rng = test_rng_new(23);
    test_fill(w, nw, &rng, -0.3f, 0.3f);
    test_fill(x, nx, &rng, -1.0f, 1.0f);
    test_fill(dy, ny, &rng, -1.0f, 1.0f);
    side c, u;
    side_init(&c, make_backend(false, true), w, x, dy);
    side_init(&u, make_backend(false, false), w, x, dy);
    kv_weight_cache *cache = cache_of(c.be);
    assert_probes_agree(&c, &u, "a first use");
    ck_assert_uint_eq(cache->stores, 0);
    ck_assert_uint_eq(cache->stored_bytes, 0);
    /* a budget below one form: sightings, but nothing stored */
    cache->budget = (size_t)16 * CO * CI * sizeof(float) - 1;
    assert_probes_agree(&c, &u, "a second use over budget");
    assert_probes_agree(&c, &u, "a third use over budget");
    ck_assert_uint_eq(cache->stores, 0);
    ck_assert_uint_eq(cache->hits, 0);
    /* room for one of the two forms: the first asked for */
    cache->budget = (size_t)16 * CO * CI * sizeof(float);
    assert_probes_agree(&c, &u, "a use with room for one");
    ck_assert_uint_eq(cache->stores, 1);
    ck_assert_uint_eq(cache->stored_bytes, cache->budget);
    assert_probes_agree(&c, &u, "a hit within budget");
    ck_assert_uint_eq(cache->hits, 1);
    side_free(&c);
    side_free(&u);
    free(w);
    free(x);
    free(dy);
}
END_TEST

/* ---- training ---- */

#define TRAIN "fixtures/train/"

/* Everything that uses weights more than once between two updates, and
 * everything that writes them: the GAN with the fresh second forward,
 * recompute, gradient accumulation, EMA, a frozen LPIPS. */
static const char *const setup[][2] = {
    {"config", "small"},         {"learning_rate", "1e-3"},   {"perceptual_weight", "1"},
    {"lpips_weights", TRAIN "lpips.safetensors"},              {"disc_start", "0"},
    {"disc_update", "fresh"},    {"disc_channels", "32"},     {"disc_layers", "2"},
    {"recompute", "true"},       {"grad_accum", "2"},         {"ema_decay", "0.9"},
    {"posterior", "sample"},     {"seed", "3"},               {"threads", "2"},
    {"backend", "cpu"},
};

static klvae_trainer_t *make_trainer(bool bf16, bool cache, klvae_model_t **model)
{
    klvae_options_t *o = NULL;
    ck_assert_ok(klvae_options_create(&o));
    for (size_t i = 0; i < KV_ARRAY_LEN(setup); i++)
        ck_assert_ok(klvae_options_set(o, setup[i][0], setup[i][1]));
    ck_assert_ok(klvae_options_set(o, "precision", bf16 ? "bf16" : "fp32"));
    ck_assert_ok(klvae_model_create(o, model));
    kv_cpu_of((*model)->be)->weights.disabled = !cache;
    klvae_trainer_t *t = NULL;
    ck_assert_ok(klvae_trainer_create(*model, o, &t));
    klvae_options_free(o);
    return t;
}

static void assert_networks_equal(klvae_model_t *a, klvae_trainer_t *ta, klvae_model_t *b,
                                  klvae_trainer_t *tb, const char *after)
{
    for (size_t i = 0; i < a->num_params; i++)
        assert_same_bits(a->params[i].tensor, b->params[i].tensor, a->params[i].name, after);
    const kv_disc *da = kv_trainer_disc(ta), *db = kv_trainer_disc(tb);
    for (int i = 0; i < da->num_params; i++)
        assert_same_bits(da->params[i].tensor, db->params[i].tensor, da->params[i].name, after);
}

static void step(klvae_trainer_t *t, int k)
{
    const int n = 2, h = 32, w = 32;
    const size_t elems = (size_t)n * 3 * h * w;
    float *x = test_alloc(elems);
    test_rng rng = test_rng_new(900 + (uint64_t)k);
    test_fill(x, elems, &rng, -1.0f, 1.0f);
    ck_assert_ok(klvae_trainer_step(t, x, n, h, w, NULL));
    free(x);
}

START_TEST(training_with_the_cache_gives_the_bits_of_training_without)
{
    char *dir = test_tmpdir();
    char *checkpoint = test_join(dir, "step2.safetensors");
    for (int pass = 0; pass < passes(); pass++) {
        const bool bf16 = run_bf16(pass);
        klvae_model_t *ma = NULL, *mb = NULL;
        klvae_trainer_t *ta = make_trainer(bf16, true, &ma), *tb = make_trainer(bf16, false, &mb);
        char after[64];
        for (int k = 0; k < 4; k++) {
            step(ta, k);
            step(tb, k);
            snprintf(after, sizeof after, "%s step %d", bf16 ? "bf16" : "fp32", k + 1);
            assert_networks_equal(ma, ta, mb, tb, after);
            if (k == 1)
                ck_assert_ok(klvae_trainer_save(ta, checkpoint));
        }
        /* resume both from step 2: weights written in place by the load */
        ck_assert_ok(klvae_trainer_load(ta, checkpoint));
        ck_assert_ok(klvae_trainer_load(tb, checkpoint));
        for (int k = 2; k < 4; k++) {
            step(ta, k);
            step(tb, k);
            snprintf(after, sizeof after, "%s resumed step %d", bf16 ? "bf16" : "fp32", k + 1);
            assert_networks_equal(ma, ta, mb, tb, after);
        }
        const kv_weight_cache *cache = cache_of(ma->be);
        /* the cache took part: LPIPS' frozen weights hit, trained ones were
         * stored and dropped again */
        ck_assert_uint_gt(cache->hits, 0);
        ck_assert_uint_gt(cache->stores, 0);
        ck_assert_uint_gt(cache->drops, 0);
        ck_assert_uint_eq(cache->stale, 0);
        ck_assert_uint_eq(cache_of(mb->be)->stores, 0);
        klvae_trainer_free(ta);
        klvae_trainer_free(tb);
        klvae_model_free(ma);
        klvae_model_free(mb);
    }
    test_rmtree(dir);
    free(checkpoint);
    free(dir);
}
END_TEST

Suite *suite_weight_cache(void)
{
    Suite *s = suite_create("weight_cache");
    TCase *tc = tcase_create("ops");
    tcase_set_timeout(tc, 60);
    tcase_add_test(tc, every_writer_drops_the_forms_of_what_it_wrote);
    tcase_add_test(tc, forms_are_stored_at_the_second_use_within_the_budget);
    suite_add_tcase(s, tc);
    tc = tcase_create("training");
    tcase_set_timeout(tc, 300);
    tcase_add_test(tc, training_with_the_cache_gives_the_bits_of_training_without);
    suite_add_tcase(s, tc);
    return s;
}
