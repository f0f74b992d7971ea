/* plot_run.c — loss.png of a training run, drawn from its CSV logs. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "base/io.h"
#include "cli/cli.h"
#include "cli/plot.h"
#include "cli/plot_run.h"

#define MAX_COLUMNS 32

/* A CSV file with a header row, as columns of doubles. */
typedef struct table {
    int ncols;
    size_t nrows;
    char *names[MAX_COLUMNS];
    double *cols[MAX_COLUMNS];
} table;

static void table_free(table *t)
{
    for (int i = 0; i < t->ncols; i++) {
        free(t->names[i]);
        free(t->cols[i]);
    }
    memset(t, 0, sizeof *t);
}

static int split_fields(char *line, char **fields)
{
    int n = 0;
    for (char *p = line; n < MAX_COLUMNS;) {
        fields[n++] = p;
        char *comma = strchr(p, ',');
        if (!comma)
            break;
        *comma = '\0';
        p = comma + 1;
    }
    return n;
}

static bool table_read(const char *path, table *t)
{
    memset(t, 0, sizeof *t);
    char *text = NULL;
    size_t len = 0;
    if (kv_read_text_file(path, (size_t)1 << 30, &text, &len) != KLVAE_OK)
        return false;
    size_t lines = 0;
    for (size_t i = 0; i < len; i++)
        lines += text[i] == '\n';
    char *line = text, *fields[MAX_COLUMNS];
    char *end = strchr(line, '\n');
    if (!end) {
        free(text);
        return false;
    }
    *end = '\0';
    t->ncols = split_fields(line, fields);
    for (int i = 0; i < t->ncols; i++) {
        t->names[i] = strdup(fields[i]);
        t->cols[i] = xmalloc((lines + 1) * sizeof(double));
    }
    for (line = end + 1; *line; line = end + 1) {
        end = strchr(line, '\n');
        if (end)
            *end = '\0';
        if (split_fields(line, fields) == t->ncols) { /* a torn last line is skipped */
            for (int i = 0; i < t->ncols; i++)
                t->cols[i][t->nrows] = strtod(fields[i], NULL);
            t->nrows++;
        }
        if (!end)
            break;
    }
    free(text);
    return true;
}

static const double *column(const table *t, const char *name)
{
    for (int i = 0; i < t->ncols; i++)
        if (strcmp(t->names[i], name) == 0)
            return t->cols[i];
    return NULL;
}

/* An exponential moving average whose window is about 2% of the run, so
 * the trend shows through the per-batch noise at any length. */
static double *smooth(const double *y, size_t n)
{
    double *s = xmalloc((n ? n : 1) * sizeof(double));
    double alpha = 1.0 / (1.0 + (double)n / 50.0), acc = NAN;
    for (size_t i = 0; i < n; i++) {
        if (isfinite(y[i]) && y[i] > 0)
            acc = isfinite(acc) ? acc + alpha * (y[i] - acc) : y[i];
        s[i] = acc;
    }
    return s;
}

static bool any_positive(const double *v, size_t n)
{
    for (size_t i = 0; v && i < n; i++)
        if (v[i] > 0)
            return true;
    return false;
}

void write_loss_plot(const char *run_dir)
{
    size_t plen = strlen(run_dir) + 16;
    char *log_path = xmalloc(plen), *eval_path = xmalloc(plen), *png = xmalloc(plen);
    snprintf(log_path, plen, "%s/log.csv", run_dir);
    snprintf(eval_path, plen, "%s/eval.csv", run_dir);
    snprintf(png, plen, "%s/loss.png", run_dir);
    table log, ev;
    bool have_log = table_read(log_path, &log), have_eval = table_read(eval_path, &ev);
    const double *step = have_log ? column(&log, "step") : NULL;
    const double *rec = have_log ? column(&log, "rec") : NULL;
    const double *kl = have_log ? column(&log, "kl") : NULL;
    if (!step || !rec || !kl) {
        fprintf(stderr, "%s: warning: cannot read %s; no loss.png\n", program, log_path);
    } else {
        const size_t n = log.nrows;
        double *rec_smooth = smooth(rec, n);
        plot_series rec_series[2] = {
            {"PER STEP", step, rec, (int)n, {170, 190, 230}},
            {"SMOOTHED", step, rec_smooth, (int)n, {20, 60, 170}},
        };
        plot_series kl_series[1] = {{"KL PER IMAGE", step, kl, (int)n, {200, 90, 20}}};
        const double *psnr = have_eval ? column(&ev, "psnr") : NULL;
        const double *eval_step = have_eval ? column(&ev, "step") : NULL;
        plot_series psnr_series[1] = {
            {"HELD-OUT PSNR", eval_step, psnr, psnr ? (int)ev.nrows : 0, {20, 140, 60}}};
        const double *g = column(&log, "g"), *d = column(&log, "d_loss");
        plot_series gan_series[2] = {{"GENERATOR", step, g, (int)n, {170, 30, 120}},
                                     {"DISCRIMINATOR", step, d, (int)n, {90, 90, 90}}};
        plot_panel panels[4] = {
            {"RECONSTRUCTION LOSS", "STEP", 1, rec_series, 2},
            {"HELD-OUT PSNR (DB)", "STEP", 0, psnr_series, 1},
            {"KL DIVERGENCE", "STEP", 1, kl_series, 1},
            {"GAN LOSSES", "STEP", 0, gan_series, 2},
        };
        int npanels = g && d && any_positive(column(&log, "disc_factor"), n) ? 4 : 3;
        char err[256];
        int h = 0;
        float *img = plot_render(panels, npanels, 900, 260, &h, err, sizeof err);
        if (!img)
            fprintf(stderr, "%s: warning: cannot draw loss.png: %s\n", program, err);
        else if (klvae_image_write_png(png, img, h, 900) != KLVAE_OK)
            fprintf(stderr, "%s: warning: %s\n", program, klvae_last_error());
        free(img);
        free(rec_smooth);
    }
    if (have_log)
        table_free(&log);
    if (have_eval)
        table_free(&ev);
    free(log_path);
    free(eval_path);
    free(png);
}
