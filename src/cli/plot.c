/* plot — the line-plot rasterizer behind `klvae train`'s loss-curve picture.
 * See plot.h for the contract. Drawing happens on a planar RGB canvas with
 * values in [0, 1] (1 = white); the last step maps it to [-1, 1]. */
#include "cli/plot.h"

#include <ctype.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ------------------------------------------------------------------------ */
/* Layout and style                                                          */
/* ------------------------------------------------------------------------ */

enum {
    PAD = 8,              /* outer padding of a panel */
    GLYPH_W = 5,
    GLYPH_H = 7,
    ADVANCE = 6,          /* glyph width plus one column of spacing */
    TITLE_SCALE = 2,
    TITLE_GAP = 10,       /* between title and plot frame */
    TICK_LEN = 4,
    TICK_GAP = 3,         /* between a tick's end and its label */
    XLABEL_GAP = 6,       /* between x tick labels and the x label */
    RIGHT_MARGIN = 16,    /* room for the last x tick label */
    X_TICK_SPACING = 90,  /* desired pixels between x ticks */
    Y_TICK_SPACING = 32,
    MIN_LABEL_GAP_X = 8,  /* labels closer than this are dropped, not overlapped */
    MIN_LABEL_GAP_Y = 3,
    MINOR_MIN_DECADE = 40, /* decades shorter than this get no minor grid lines */
    LEGEND_INSET = 6,
    LEGEND_PAD = 5,
    LEGEND_ROW = 11,
    LEGEND_SAMPLE = 16,
    MIN_DECADE_LABEL_GAP = 18, /* log axes label every decade at least this far apart */
    MAX_DECADE_LABELS = 40,
    MAX_TICKS = 512,      /* MAX_DECADE_LABELS decades with minor ticks fit */
};

#define LINE_RADIUS 0.9   /* half the stroke width: lines are 1.8 px wide */
#define DOT_RADIUS 2.2    /* isolated points are drawn as dots this big */
#define HUGE_VALUE 1e300  /* larger magnitudes count as non-finite (no overflow) */

typedef struct rgbf {
    float c[3];
} rgbf;

static const rgbf GRID_MAJOR = {{0.86f, 0.86f, 0.86f}};
static const rgbf GRID_MINOR = {{0.95f, 0.95f, 0.95f}};
static const rgbf FRAME = {{0.35f, 0.35f, 0.35f}};
static const rgbf TEXT = {{0.15f, 0.15f, 0.15f}};
static const rgbf TEXT_FAINT = {{0.6f, 0.6f, 0.6f}};
static const rgbf WHITE = {{1.0f, 1.0f, 1.0f}};
static const rgbf LEGEND_BORDER = {{0.78f, 0.78f, 0.78f}};

/* ------------------------------------------------------------------------ */
/* Canvas                                                                    */
/* ------------------------------------------------------------------------ */

typedef struct canvas {
    float *px; /* planar RGB, values in [0, 1] while drawing */
    int w, h;
} canvas;

/* Inclusive pixel rectangle. */
typedef struct rect {
    int x0, y0, x1, y1;
} rect;

/* Mixes col into pixel (x, y) with opacity a; outside the canvas is a no-op
 * so callers need not clip text and ticks themselves. */
static void blend_pixel(canvas *cv, int x, int y, rgbf col, float a)
{
    if (x < 0 || y < 0 || x >= cv->w || y >= cv->h || !(a > 0.0f))
        return;
    if (a > 1.0f)
        a = 1.0f;
    size_t plane = (size_t)cv->w * cv->h, i = (size_t)y * cv->w + x;
    for (int c = 0; c < 3; c++) {
        float *p = cv->px + c * plane + i;
        *p += (col.c[c] - *p) * a;
    }
}

static void fill_rect(canvas *cv, rect r, rgbf col, float a)
{
    for (int y = r.y0; y <= r.y1; y++)
        for (int x = r.x0; x <= r.x1; x++)
            blend_pixel(cv, x, y, col, a);
}

static void hline(canvas *cv, int x0, int x1, int y, rgbf col)
{
    fill_rect(cv, (rect){x0, y, x1, y}, col, 1.0f);
}

static void vline(canvas *cv, int x, int y0, int y1, rgbf col)
{
    fill_rect(cv, (rect){x, y0, x, y1}, col, 1.0f);
}

static void outline_rect(canvas *cv, rect r, rgbf col)
{
    hline(cv, r.x0, r.x1, r.y0, col);
    hline(cv, r.x0, r.x1, r.y1, col);
    vline(cv, r.x0, r.y0, r.y1, col);
    vline(cv, r.x1, r.y0, r.y1, col);
}

static rgbf rgb_from_bytes(const unsigned char rgb[3])
{
    return (rgbf){{rgb[0] / 255.0f, rgb[1] / 255.0f, rgb[2] / 255.0f}};
}

/* ------------------------------------------------------------------------ */
/* Font: 5x7 glyphs, '#' is ink. Narrow punctuation is trimmed when drawn.   */
/* ------------------------------------------------------------------------ */

typedef struct glyph {
    char ch;
    char rows[GLYPH_H][GLYPH_W + 1];
} glyph;

static const glyph FONT[] = {
    {' ', {".....", ".....", ".....", ".....", ".....", ".....", "....."}},
    {'0', {".###.", "#...#", "#..##", "#.#.#", "##..#", "#...#", ".###."}},
    {'1', {"..#..", ".##..", "..#..", "..#..", "..#..", "..#..", ".###."}},
    {'2', {".###.", "#...#", "....#", "...#.", "..#..", ".#...", "#####"}},
    {'3', {"#####", "...#.", "..#..", "...#.", "....#", "#...#", ".###."}},
    {'4', {"...#.", "..##.", ".#.#.", "#..#.", "#####", "...#.", "...#."}},
    {'5', {"#####", "#....", "####.", "....#", "....#", "#...#", ".###."}},
    {'6', {"..##.", ".#...", "#....", "####.", "#...#", "#...#", ".###."}},
    {'7', {"#####", "....#", "...#.", "..#..", ".#...", ".#...", ".#..."}},
    {'8', {".###.", "#...#", "#...#", ".###.", "#...#", "#...#", ".###."}},
    {'9', {".###.", "#...#", "#...#", ".####", "....#", "...#.", ".##.."}},
    {'A', {".###.", "#...#", "#...#", "#####", "#...#", "#...#", "#...#"}},
    {'B', {"####.", "#...#", "#...#", "####.", "#...#", "#...#", "####."}},
    {'C', {".###.", "#...#", "#....", "#....", "#....", "#...#", ".###."}},
    {'D', {"####.", "#...#", "#...#", "#...#", "#...#", "#...#", "####."}},
    {'E', {"#####", "#....", "#....", "####.", "#....", "#....", "#####"}},
    {'F', {"#####", "#....", "#....", "####.", "#....", "#....", "#...."}},
    {'G', {".###.", "#...#", "#....", "#.###", "#...#", "#...#", ".####"}},
    {'H', {"#...#", "#...#", "#...#", "#####", "#...#", "#...#", "#...#"}},
    {'I', {".###.", "..#..", "..#..", "..#..", "..#..", "..#..", ".###."}},
    {'J', {"..###", "...#.", "...#.", "...#.", "...#.", "#..#.", ".##.."}},
    {'K', {"#...#", "#..#.", "#.#..", "##...", "#.#..", "#..#.", "#...#"}},
    {'L', {"#....", "#....", "#....", "#....", "#....", "#....", "#####"}},
    {'M', {"#...#", "##.##", "#.#.#", "#.#.#", "#...#", "#...#", "#...#"}},
    {'N', {"#...#", "#...#", "##..#", "#.#.#", "#..##", "#...#", "#...#"}},
    {'O', {".###.", "#...#", "#...#", "#...#", "#...#", "#...#", ".###."}},
    {'P', {"####.", "#...#", "#...#", "####.", "#....", "#....", "#...."}},
    {'Q', {".###.", "#...#", "#...#", "#...#", "#.#.#", "#..#.", ".##.#"}},
    {'R', {"####.", "#...#", "#...#", "####.", "#.#..", "#..#.", "#...#"}},
    {'S', {".####", "#....", "#....", ".###.", "....#", "....#", "####."}},
    {'T', {"#####", "..#..", "..#..", "..#..", "..#..", "..#..", "..#.."}},
    {'U', {"#...#", "#...#", "#...#", "#...#", "#...#", "#...#", ".###."}},
    {'V', {"#...#", "#...#", "#...#", "#...#", "#...#", ".#.#.", "..#.."}},
    {'W', {"#...#", "#...#", "#...#", "#.#.#", "#.#.#", "#.#.#", ".#.#."}},
    {'X', {"#...#", "#...#", ".#.#.", "..#..", ".#.#.", "#...#", "#...#"}},
    {'Y', {"#...#", "#...#", ".#.#.", "..#..", "..#..", "..#..", "..#.."}},
    {'Z', {"#####", "....#", "...#.", "..#..", ".#...", "#....", "#####"}},
    {'.', {".....", ".....", ".....", ".....", ".....", ".##..", ".##.."}},
    {',', {".....", ".....", ".....", ".....", ".##..", ".##..", ".#..."}},
    {'-', {".....", ".....", ".....", ".###.", ".....", ".....", "....."}},
    {'+', {".....", "..#..", "..#..", "#####", "..#..", "..#..", "....."}},
    {':', {".....", ".##..", ".##..", ".....", ".##..", ".##..", "....."}},
    {';', {".....", ".##..", ".##..", ".....", ".##..", ".##..", ".#..."}},
    {'/', {"....#", "....#", "...#.", "..#..", ".#...", "#....", "#...."}},
    {'(', {"...#.", "..#..", ".#...", ".#...", ".#...", "..#..", "...#."}},
    {')', {".#...", "..#..", "...#.", "...#.", "...#.", "..#..", ".#..."}},
    {'[', {".###.", ".#...", ".#...", ".#...", ".#...", ".#...", ".###."}},
    {']', {".###.", "...#.", "...#.", "...#.", "...#.", "...#.", ".###."}},
    {'%', {"##...", "##..#", "...#.", "..#..", ".#...", "#..##", "...##"}},
    {'=', {".....", ".....", "#####", ".....", "#####", ".....", "....."}},
    {'_', {".....", ".....", ".....", ".....", ".....", ".....", "#####"}},
    {'<', {"...#.", "..#..", ".#...", "#....", ".#...", "..#..", "...#."}},
    {'>', {".#...", "..#..", "...#.", "....#", "...#.", "..#..", ".#..."}},
    {'*', {".....", "#.#.#", ".###.", "#####", ".###.", "#.#.#", "....."}},
    {'!', {"..#..", "..#..", "..#..", "..#..", "..#..", ".....", "..#.."}},
    {'\'', {"..#..", "..#..", ".#...", ".....", ".....", ".....", "....."}},
    {'?', {".###.", "#...#", "....#", "...#.", "..#..", ".....", "..#.."}},
};

/* The glyph for c; lowercase maps to uppercase, unknown characters to '?'. */
static const glyph *find_glyph(char c)
{
    char u = (char)toupper((unsigned char)c);
    const glyph *fallback = NULL;
    for (size_t i = 0; i < sizeof FONT / sizeof FONT[0]; i++) {
        if (FONT[i].ch == u)
            return &FONT[i];
        if (FONT[i].ch == '?')
            fallback = &FONT[i];
    }
    return fallback;
}

/* Columns [*first, *last] of g that carry ink. Narrow glyphs (punctuation
 * at most two columns wide) are drawn trimmed to them, so "0.01" does not
 * get holes around its point; everything else keeps the full cell so
 * digits line up. */
static void glyph_columns(const glyph *g, int *first, int *last)
{
    int lo = GLYPH_W, hi = -1;
    for (int r = 0; r < GLYPH_H; r++)
        for (int c = 0; c < GLYPH_W; c++)
            if (g->rows[r][c] == '#') {
                lo = c < lo ? c : lo;
                hi = c > hi ? c : hi;
            }
    if (hi < 0 || hi - lo > 1) {
        lo = 0;
        hi = GLYPH_W - 1;
    }
    *first = lo;
    *last = hi;
}

static int glyph_advance(const glyph *g)
{
    int first, last;
    glyph_columns(g, &first, &last);
    return last - first + 2;
}

/* Width in pixels of s drawn at the given scale (no trailing spacing). */
static int text_width(const char *s, int scale)
{
    int w = 0;
    for (; *s; s++)
        w += glyph_advance(find_glyph(*s));
    return w > 0 ? (w - 1) * scale : 0;
}

/* Draws s with its top-left corner at (x, y); returns the width drawn. */
static int draw_text(canvas *cv, int x, int y, const char *s, int scale, rgbf col)
{
    int pen = x;
    for (; *s; s++) {
        const glyph *g = find_glyph(*s);
        int first, last;
        glyph_columns(g, &first, &last);
        for (int r = 0; r < GLYPH_H; r++)
            for (int c = first; c <= last; c++)
                if (g->rows[r][c] == '#') {
                    int px = pen + (c - first) * scale, py = y + r * scale;
                    fill_rect(cv, (rect){px, py, px + scale - 1, py + scale - 1}, col, 1.0f);
                }
        pen += (last - first + 2) * scale;
    }
    return pen - x;
}

/* ------------------------------------------------------------------------ */
/* Axes: ranges, nice ticks, labels                                          */
/* ------------------------------------------------------------------------ */

typedef struct tick {
    double v;   /* position in axis space (log10 of the value on a log axis) */
    double res; /* the resolution its label must show (the tick step) */
    int major;  /* major ticks get a label, a tick mark and a darker grid line */
} tick;

typedef struct axis {
    double lo, hi; /* axis-space interval shown */
    int log;
    double p0, p1; /* pixel coordinates of lo and hi */
    tick ticks[MAX_TICKS];
    int nticks;
} axis;

typedef struct range {
    double lo, hi;
    int any;
} range;

static void range_add(range *r, double v)
{
    if (!r->any || v < r->lo)
        r->lo = v;
    if (!r->any || v > r->hi)
        r->hi = v;
    r->any = 1;
}

static double axis_pixel(const axis *ax, double v)
{
    return ax->p0 + (v - ax->lo) / (ax->hi - ax->lo) * (ax->p1 - ax->p0);
}

static double tick_value(const axis *ax, const tick *t)
{
    return ax->log ? pow(10.0, t->v) : t->v;
}

static void add_tick(axis *ax, double v, double res, int major)
{
    if (ax->nticks < MAX_TICKS && v >= ax->lo - 1e-9 * (ax->hi - ax->lo) &&
        v <= ax->hi + 1e-9 * (ax->hi - ax->lo))
        ax->ticks[ax->nticks++] = (tick){v, res, major};
}

/* The 1, 2 or 5 x 10^k nearest to raw (raw > 0), nearest in ratio: taking
 * the next one up instead would turn a wanted 2.01 into 5 and leave half
 * the ticks out. */
static double nice_step(double raw)
{
    double p = pow(10.0, floor(log10(raw)));
    double m = raw / p;
    return (m < 1.5 ? 1.0 : m < 3.2 ? 2.0 : m < 7.1 ? 5.0 : 10.0) * p;
}

/* About target ticks at multiples of a nice step over value interval
 * [vlo, vhi]; to_log: store them as log10 (a log axis showing less than a
 * factor of ten or so, where decades alone would leave it unlabelled). */
static void linear_ticks(axis *ax, double vlo, double vhi, int target, int to_log)
{
    double step = nice_step((vhi - vlo) / target);
    double k0 = ceil(vlo / step - 1e-9), k1 = floor(vhi / step + 1e-9);
    if (!(step > 0) || !isfinite(k0) || !isfinite(k1) || k1 - k0 > MAX_TICKS)
        return;
    for (double k = k0; k <= k1; k++) {
        double v = k * step;
        if (fabs(v) < step * 1e-9)
            v = 0.0; /* avoid labels like "-1.4E-17" */
        if (!to_log)
            add_tick(ax, v, step, 1);
        else if (v > 0)
            add_tick(ax, log10(v), step, 1);
    }
}

/* Major ticks at decades, every stride-th one so labels do not crowd; faint
 * minor ticks at 2..9 x 10^k when each decade is tall enough to show them. */
static void decade_ticks(axis *ax, double px_per_decade)
{
    static const int strides[] = {1, 2, 3, 5, 10, 20, 50, 100};
    int d0 = (int)ceil(ax->lo - 1e-9), d1 = (int)floor(ax->hi + 1e-9);
    int stride = 1;
    for (size_t i = 0; i < sizeof strides / sizeof strides[0]; i++) {
        stride = strides[i];
        if (px_per_decade * stride >= MIN_DECADE_LABEL_GAP &&
            (d1 - d0) / stride + 1 <= MAX_DECADE_LABELS)
            break;
    }
    int minors = stride == 1 && px_per_decade >= MINOR_MIN_DECADE;
    for (int d = d0 - 1; d <= d1; d++) {
        if (d >= d0 && d % stride == 0)
            add_tick(ax, d, pow(10.0, d), 1);
        for (int m = 2; minors && m <= 9; m++)
            add_tick(ax, d + log10(m), pow(10.0, d), 0);
    }
}

/* Labels at 1, 2, 5 x 10^k (faint lines at the other mantissas): for log
 * axes spanning about two decades or less. Returns the number of labels. */
static int mantissa_ticks(axis *ax, double px_per_decade)
{
    int majors = 0;
    for (int d = (int)floor(ax->lo); d <= (int)ceil(ax->hi); d++)
        for (int m = 1; m <= 9; m++) {
            int major = m == 1 || m == 2 || m == 5;
            if (!major && px_per_decade < MINOR_MIN_DECADE)
                continue;
            int before = ax->nticks;
            add_tick(ax, d + log10(m), m * pow(10.0, d), major);
            majors += major && ax->nticks > before;
        }
    return majors;
}

static void log_ticks(axis *ax, int target)
{
    double px_per_decade = fabs(ax->p1 - ax->p0) / (ax->hi - ax->lo);
    int decades = (int)floor(ax->hi + 1e-9) - (int)ceil(ax->lo - 1e-9) + 1;
    /* 1-2-5 labels need about 14 px between 1 and 2 (log10 2 of a decade). */
    if (decades >= 3 || (decades == 2 && px_per_decade * log10(2.0) < 14.0)) {
        decade_ticks(ax, px_per_decade);
        return;
    }
    if (mantissa_ticks(ax, px_per_decade) >= 3)
        return;
    ax->nticks = 0; /* less than a factor of ~5: plain nice values */
    linear_ticks(ax, pow(10.0, ax->lo), pow(10.0, ax->hi), target, 1);
}

/* Fills ax for axis-space interval [lo, hi] drawn from pixel p0 to p1, with
 * roughly one major tick per spacing pixels. */
static void build_axis(axis *ax, double lo, double hi, int log, double p0, double p1, int spacing)
{
    ax->lo = lo;
    ax->hi = hi;
    ax->log = log;
    ax->p0 = p0;
    ax->p1 = p1;
    ax->nticks = 0;
    int target = (int)(fabs(p1 - p0) / spacing);
    target = target < 2 ? 2 : target > 12 ? 12 : target;
    if (log)
        log_ticks(ax, target);
    else
        linear_ticks(ax, lo, hi, target, 0);
}

/* Smallest number of decimals (0..9) that shows multiples of res exactly. */
static int decimals_for(double res)
{
    for (int d = 0; d < 9; d++) {
        double s = res * pow(10.0, d);
        if (fabs(s - round(s)) < 1e-6 * s)
            return d;
    }
    return 9;
}

/* "%.*f" without trailing zeros (and without a trailing point). */
static void format_fixed(char *buf, size_t n, double v, int decimals)
{
    snprintf(buf, n, "%.*f", decimals, v);
    if (strchr(buf, '.')) {
        char *end = buf + strlen(buf) - 1;
        while (*end == '0')
            *end-- = '\0';
        if (*end == '.')
            *end = '\0';
    }
    if (strcmp(buf, "-0") == 0)
        strcpy(buf, "0");
}

/* Scientific form for tiny and enormous values: 1E-3, 2.5E-5, 1E18. */
static void format_scientific(char *buf, size_t n, double v, double res)
{
    int e = (int)floor(log10(fabs(v)));
    for (int pass = 0; pass < 2; pass++) {
        double scale = pow(10.0, e);
        int dec = decimals_for(res / scale);
        dec = dec > 3 ? 3 : dec;
        char mant[32];
        format_fixed(mant, sizeof mant, v / scale, dec);
        if (fabs(atof(mant)) < 10.0 || pass == 1) {
            snprintf(buf, n, "%sE%d", mant, e);
            return;
        }
        e++; /* rounding made the mantissa 10: renormalise */
    }
}

/* Compact tick label: 0, 0.05, 500, 1K, 1.5K, 10K, 2M, 1E-3. */
static void format_tick(char *buf, size_t n, double v, double res)
{
    double a = fabs(v);
    if (a == 0.0 || a < res * 1e-6) {
        snprintf(buf, n, "0");
        return;
    }
    if (a < 0.01 * (1.0 - 1e-9) || a >= 1e15) {
        format_scientific(buf, n, v, res);
        return;
    }
    static const struct {
        double scale;
        const char *suffix;
    } units[] = {{1e12, "T"}, {1e9, "G"}, {1e6, "M"}, {1e3, "K"}, {1.0, ""}};
    size_t u = 0;
    while (units[u].scale > 1.0 && a * (1.0 + 1e-9) < units[u].scale)
        u++;
    char num[48];
    format_fixed(num, sizeof num, v / units[u].scale, decimals_for(res / units[u].scale));
    snprintf(buf, n, "%s%s", num, units[u].suffix);
}

static void tick_label(const axis *ax, const tick *t, char *buf, size_t n)
{
    format_tick(buf, n, tick_value(ax, t), t->res);
}

/* Widest major-tick label of ax, in pixels. */
static int axis_label_width(const axis *ax)
{
    int w = 0;
    char buf[64];
    for (int i = 0; i < ax->nticks; i++)
        if (ax->ticks[i].major) {
            tick_label(ax, &ax->ticks[i], buf, sizeof buf);
            int tw = text_width(buf, 1);
            w = tw > w ? tw : w;
        }
    return w;
}

/* ------------------------------------------------------------------------ */
/* Data extents                                                              */
/* ------------------------------------------------------------------------ */

static int usable(double v)
{
    return isfinite(v) && fabs(v) <= HUGE_VALUE;
}

/* Point i of s in axis space; 0 when it is a gap (not drawable). */
static int series_point(const plot_series *s, int i, int log_y, double *x, double *y)
{
    *x = s->x ? s->x[i] : (double)i;
    *y = s->y[i];
    if (!usable(*x) || !usable(*y) || (log_y && !(*y > 0.0)))
        return 0;
    if (log_y)
        *y = log10(*y);
    return 1;
}

static void panel_extent(const plot_panel *p, range *xr, range *yr)
{
    *xr = (range){0, 0, 0};
    *yr = (range){0, 0, 0};
    for (int s = 0; s < p->nseries; s++)
        for (int i = 0; i < p->series[s].n; i++) {
            double x, y;
            if (series_point(&p->series[s], i, p->log_y, &x, &y)) {
                range_add(xr, x);
                range_add(yr, y);
            }
        }
}

/* Widens a zero-width range (one point, or all values equal) around its
 * value, and a non-empty one by frac of its span on each side. */
static void pad_range(range *r, double frac, double flat_pad)
{
    double pad = r->hi > r->lo ? (r->hi - r->lo) * frac : flat_pad;
    r->lo -= pad;
    r->hi += pad;
    if (!(r->hi > r->lo)) { /* pad underflowed (subnormal data) */
        r->lo -= 1.0;
        r->hi += 1.0;
    }
}

/* The intervals panel p shows on its axes: x from its min to its max, y
 * with a 5% margin. */
static void panel_ranges(const plot_panel *p, range *xr, range *yr)
{
    panel_extent(p, xr, yr);
    if (!xr->any) {
        *xr = (range){0.0, 1.0, 0};
        *yr = (range){0.0, 1.0, 0};
        return;
    }
    pad_range(xr, 0.0, xr->lo != 0.0 ? fabs(xr->lo) * 0.05 : 1.0);
    if (p->log_y)
        pad_range(yr, 0.05, 0.5); /* half a decade around a flat log series */
    else
        pad_range(yr, 0.05, yr->lo != 0.0 ? fabs(yr->lo) * 0.1 : 1.0);
}

/* ------------------------------------------------------------------------ */
/* Panel layout                                                              */
/* ------------------------------------------------------------------------ */

static int has_text(const char *s)
{
    return s && *s;
}

/* The plot frame of panel p (top at y_off) before the left margin is known. */
static rect frame_rows(const plot_panel *p, int y_off, int panel_height)
{
    rect f = {0, 0, 0, 0};
    f.y0 = y_off + PAD + (has_text(p->title) ? GLYPH_H * TITLE_SCALE + TITLE_GAP : 4);
    f.y1 = y_off + panel_height - 1 - PAD - (TICK_LEN + TICK_GAP + GLYPH_H) -
           (has_text(p->xlabel) ? XLABEL_GAP + GLYPH_H : 0);
    return f;
}

static void build_y_axis(axis *ay, const plot_panel *p, rect f)
{
    range xr, yr;
    panel_ranges(p, &xr, &yr);
    build_axis(ay, yr.lo, yr.hi, p->log_y, f.y1, f.y0, Y_TICK_SPACING);
    if (!xr.any)
        ay->nticks = 0; /* an empty panel gets no made-up labels */
}

/* Left edge of the plot frame, shared by all panels so their frames line up:
 * room for the widest y tick label of any panel. */
static int common_left_edge(const plot_panel *panels, int npanels, int panel_height)
{
    int widest = 0;
    axis ay;
    for (int i = 0; i < npanels; i++) {
        build_y_axis(&ay, &panels[i], frame_rows(&panels[i], i * panel_height, panel_height));
        int w = axis_label_width(&ay);
        widest = w > widest ? w : widest;
    }
    return PAD + widest + TICK_GAP + TICK_LEN;
}

/* ------------------------------------------------------------------------ */
/* Anti-aliased strokes into a coverage buffer                               */
/* ------------------------------------------------------------------------ */

/* Per-pixel coverage (0..1) of one series over the plot frame. Keeping the
 * maximum over segments, and compositing once per series, keeps joints of
 * a polyline from being painted twice (no dark beads at the vertices). */
typedef struct coverage {
    float *a;
    rect area;
    int stride;
} coverage;

static double segment_distance(double px, double py, double ax, double ay, double bx, double by)
{
    double dx = bx - ax, dy = by - ay, len2 = dx * dx + dy * dy;
    double t = len2 > 0.0 ? ((px - ax) * dx + (py - ay) * dy) / len2 : 0.0;
    t = t < 0.0 ? 0.0 : t > 1.0 ? 1.0 : t;
    double ex = px - (ax + t * dx), ey = py - (ay + t * dy);
    return sqrt(ex * ex + ey * ey);
}

static void cover_pixel(coverage *cv, int x, int y, float a)
{
    if (x < cv->area.x0 || x > cv->area.x1 || y < cv->area.y0 || y > cv->area.y1 || a <= 0.0f)
        return;
    float *p = cv->a + (size_t)(y - cv->area.y0) * cv->stride + (x - cv->area.x0);
    if (a > *p)
        *p = a > 1.0f ? 1.0f : a;
}

/* A capsule of radius r around segment a-b: coverage is the signed distance
 * to its edge, clamped to one pixel of ramp (pixel centres at integers).
 * Only a band around the segment is visited — along its longer axis, one
 * short run across it per step — so long diagonal segments stay cheap.
 * transpose: the caller swapped x and y to make x the longer axis. */
static void cover_band(coverage *cv, double ax, double ay, double bx, double by, double r,
                       int transpose)
{
    double dx = bx - ax, dy = by - ay, len = sqrt(dx * dx + dy * dy);
    double reach = r + 1.0;
    double half = dx != 0.0 ? reach * len / fabs(dx) : reach;
    rect a = cv->area;
    int lo = transpose ? a.y0 : a.x0, hi = transpose ? a.y1 : a.x1;
    int across_lo = transpose ? a.x0 : a.y0, across_hi = transpose ? a.x1 : a.y1;
    int i0 = (int)floor(fmin(ax, bx) - reach), i1 = (int)ceil(fmax(ax, bx) + reach);
    i0 = i0 < lo ? lo : i0;
    i1 = i1 > hi ? hi : i1;
    for (int i = i0; i <= i1; i++) {
        double t = dx != 0.0 ? (i - ax) / dx : 0.0;
        t = t < 0.0 ? 0.0 : t > 1.0 ? 1.0 : t;
        double c = ay + t * dy;
        int j0 = (int)floor(c - half), j1 = (int)ceil(c + half);
        j0 = j0 < across_lo ? across_lo : j0;
        j1 = j1 > across_hi ? across_hi : j1;
        for (int j = j0; j <= j1; j++) {
            float cov = (float)(r + 0.5 - segment_distance(i, j, ax, ay, bx, by));
            if (transpose)
                cover_pixel(cv, j, i, cov);
            else
                cover_pixel(cv, i, j, cov);
        }
    }
}

static void cover_segment(coverage *cv, double ax, double ay, double bx, double by, double r)
{
    if (fabs(bx - ax) >= fabs(by - ay))
        cover_band(cv, ax, ay, bx, by, r, 0);
    else
        cover_band(cv, ay, ax, by, bx, r, 1);
}

/* A polyline under construction: pen_to extends it, pen_lift ends it (a
 * gap). A polyline of one vertex becomes a dot, so isolated points show. */
typedef struct pen {
    coverage *cv;
    double x, y;
    long count;
} pen;

static void pen_to(pen *p, double x, double y)
{
    if (p->count > 0)
        cover_segment(p->cv, p->x, p->y, x, y, LINE_RADIUS);
    p->x = x;
    p->y = y;
    p->count++;
}

static void pen_lift(pen *p)
{
    if (p->count == 1)
        cover_segment(p->cv, p->x, p->y, p->x, p->y, DOT_RADIUS);
    p->count = 0;
}

/* ------------------------------------------------------------------------ */
/* Decimation: consecutive points in one pixel column reduce to first, min, */
/* max and last (in their order), which draws the same picture as all of    */
/* them, so 100k-point series cost about four segments per column.          */
/* ------------------------------------------------------------------------ */

typedef struct vertex {
    double x, y;
    long i; /* order within the series, to emit min and max in sequence */
} vertex;

typedef struct bucket {
    int col, n;
    vertex first, last, min, max;
} bucket;

static void emit_vertex(pen *p, const vertex *v, long *last_emitted)
{
    if (v->i != *last_emitted)
        pen_to(p, v->x, v->y);
    *last_emitted = v->i;
}

static void bucket_flush(bucket *b, pen *p)
{
    if (b->n == 0)
        return;
    const vertex *lo = b->min.i <= b->max.i ? &b->min : &b->max;
    const vertex *hi = lo == &b->min ? &b->max : &b->min;
    long last_emitted = -1;
    emit_vertex(p, &b->first, &last_emitted);
    if (lo->i > b->first.i)
        emit_vertex(p, lo, &last_emitted);
    if (hi->i > lo->i && hi->i > b->first.i)
        emit_vertex(p, hi, &last_emitted);
    if (b->last.i > last_emitted)
        emit_vertex(p, &b->last, &last_emitted);
    b->n = 0;
}

static void bucket_add(bucket *b, pen *p, double x, double y, long i)
{
    int col = (int)floor(x + 0.5);
    if (b->n > 0 && col != b->col)
        bucket_flush(b, p);
    vertex v = {x, y, i};
    if (b->n == 0) {
        b->col = col;
        b->first = b->min = b->max = v;
    }
    if (y < b->min.y)
        b->min = v;
    if (y > b->max.y)
        b->max = v;
    b->last = v;
    b->n++;
}

/* Rasterises series s (points mapped through ax, ay) into cv. */
static void cover_series(coverage *cv, const plot_series *s, int log_y, const axis *ax,
                         const axis *ay)
{
    pen p = {cv, 0.0, 0.0, 0};
    bucket b = {0};
    for (int i = 0; i < s->n; i++) {
        double x, y;
        if (!series_point(s, i, log_y, &x, &y)) {
            bucket_flush(&b, &p);
            pen_lift(&p);
            continue;
        }
        bucket_add(&b, &p, axis_pixel(ax, x), axis_pixel(ay, y), i);
    }
    bucket_flush(&b, &p);
    pen_lift(&p);
}

/* Paints coverage cv onto the canvas in col and records it in ink (the
 * union of all series, used to place the legend), then clears cv. */
static void composite(canvas *c, coverage *cv, coverage *ink, rgbf col)
{
    for (int y = cv->area.y0; y <= cv->area.y1; y++)
        for (int x = cv->area.x0; x <= cv->area.x1; x++) {
            size_t k = (size_t)(y - cv->area.y0) * cv->stride + (x - cv->area.x0);
            float a = cv->a[k];
            if (a <= 0.0f)
                continue;
            blend_pixel(c, x, y, col, a);
            if (a > ink->a[k])
                ink->a[k] = a;
            cv->a[k] = 0.0f;
        }
}

/* ------------------------------------------------------------------------ */
/* Panel parts                                                               */
/* ------------------------------------------------------------------------ */

static void draw_grid(canvas *cv, const axis *ax, const axis *ay, rect f)
{
    for (int pass = 0; pass < 2; pass++) { /* minor lines first, majors on top */
        rgbf col = pass == 0 ? GRID_MINOR : GRID_MAJOR;
        for (int i = 0; i < ax->nticks; i++)
            if (ax->ticks[i].major == pass)
                vline(cv, (int)lround(axis_pixel(ax, ax->ticks[i].v)), f.y0, f.y1, col);
        for (int i = 0; i < ay->nticks; i++)
            if (ay->ticks[i].major == pass)
                hline(cv, f.x0, f.x1, (int)lround(axis_pixel(ay, ay->ticks[i].v)), col);
    }
}

/* Tick marks and labels below the frame; a label that would touch the
 * previous one is dropped rather than overdrawn. */
static void draw_x_labels(canvas *cv, const axis *ax, rect f)
{
    int prev_right = -1000000;
    char buf[64];
    for (int i = 0; i < ax->nticks; i++) {
        if (!ax->ticks[i].major)
            continue;
        int x = (int)lround(axis_pixel(ax, ax->ticks[i].v));
        vline(cv, x, f.y1 + 1, f.y1 + TICK_LEN, FRAME);
        tick_label(ax, &ax->ticks[i], buf, sizeof buf);
        int w = text_width(buf, 1), left = x - w / 2;
        left = left + w > cv->w - 2 ? cv->w - 2 - w : left;
        if (left < prev_right + MIN_LABEL_GAP_X)
            continue;
        draw_text(cv, left, f.y1 + TICK_LEN + TICK_GAP + 1, buf, 1, TEXT);
        prev_right = left + w;
    }
}

static void draw_y_labels(canvas *cv, const axis *ay, rect f)
{
    int prev_top = 1000000; /* ticks go bottom to top */
    char buf[64];
    for (int i = 0; i < ay->nticks; i++) {
        if (!ay->ticks[i].major)
            continue;
        int y = (int)lround(axis_pixel(ay, ay->ticks[i].v));
        hline(cv, f.x0 - TICK_LEN, f.x0 - 1, y, FRAME);
        int top = y - GLYPH_H / 2;
        if (top + GLYPH_H + MIN_LABEL_GAP_Y > prev_top)
            continue;
        tick_label(ay, &ay->ticks[i], buf, sizeof buf);
        draw_text(cv, f.x0 - TICK_LEN - TICK_GAP - text_width(buf, 1), top, buf, 1, TEXT);
        prev_top = top;
    }
}

/* Sum of series ink inside r: how much of the data a legend there hides. */
static double ink_under(const coverage *ink, rect r)
{
    double sum = 0.0;
    for (int y = r.y0; y <= r.y1; y++)
        for (int x = r.x0; x <= r.x1; x++)
            sum += ink->a[(size_t)(y - ink->area.y0) * ink->stride + (x - ink->area.x0)];
    return sum;
}

/* The frame corner (top right preferred, as loss curves fall away from
 * it) whose legend box of size w x h covers the least data. */
static rect legend_box(const coverage *ink, rect f, int w, int h)
{
    rect best = {0, 0, 0, 0};
    double best_ink = 0.0;
    for (int corner = 0; corner < 4; corner++) {
        int right = corner == 0 || corner == 2, top = corner < 2;
        int x0 = right ? f.x1 - LEGEND_INSET - w + 1 : f.x0 + LEGEND_INSET;
        int y0 = top ? f.y0 + LEGEND_INSET : f.y1 - LEGEND_INSET - h + 1;
        rect r = {x0, y0, x0 + w - 1, y0 + h - 1};
        double s = ink_under(ink, r);
        if (corner == 0 || s < best_ink * 0.8) /* clearly better, not noise */
            best = r, best_ink = s;
    }
    return best;
}

static void draw_legend(canvas *cv, const plot_panel *p, rect f, const coverage *ink)
{
    int rows = 0, text_w = 0;
    for (int s = 0; s < p->nseries; s++)
        if (has_text(p->series[s].label)) {
            int w = text_width(p->series[s].label, 1);
            text_w = w > text_w ? w : text_w;
            rows++;
        }
    int room = (f.y1 - f.y0 + 1 - 2 * LEGEND_INSET - 2 * LEGEND_PAD + 4) / LEGEND_ROW;
    rows = rows < room ? rows : room; /* entries that do not fit are left out */
    int w = 2 * LEGEND_PAD + LEGEND_SAMPLE + LEGEND_PAD + text_w;
    int h = 2 * LEGEND_PAD + rows * LEGEND_ROW - (LEGEND_ROW - GLYPH_H);
    if (rows <= 0 || w > f.x1 - f.x0 + 1 - 2 * LEGEND_INSET)
        return;
    rect box = legend_box(ink, f, w, h);
    fill_rect(cv, box, WHITE, 0.85f);
    outline_rect(cv, box, LEGEND_BORDER);
    int y = box.y0 + LEGEND_PAD, shown = 0;
    for (int s = 0; s < p->nseries && shown < rows; s++) {
        const plot_series *ps = &p->series[s];
        if (!has_text(ps->label))
            continue;
        int x = box.x0 + LEGEND_PAD, mid = y + GLYPH_H / 2;
        fill_rect(cv, (rect){x, mid - 1, x + LEGEND_SAMPLE - 1, mid}, rgb_from_bytes(ps->rgb),
                  1.0f);
        draw_text(cv, x + LEGEND_SAMPLE + LEGEND_PAD, y, ps->label, 1, TEXT);
        y += LEGEND_ROW;
        shown++;
    }
}

/* Title (double size when it fits) centred over the frame. */
static void draw_title(canvas *cv, const char *title, rect f, int y_off)
{
    if (!has_text(title))
        return;
    int scale = text_width(title, TITLE_SCALE) <= cv->w - 2 * PAD ? TITLE_SCALE : 1;
    int w = text_width(title, scale);
    int x = (f.x0 + f.x1) / 2 - w / 2;
    x = x + w > cv->w - PAD ? cv->w - PAD - w : x;
    x = x < PAD ? PAD : x;
    int y = y_off + PAD + (GLYPH_H * TITLE_SCALE - GLYPH_H * scale) / 2;
    draw_text(cv, x, y, title, scale, TEXT);
}

static void draw_centered(canvas *cv, const char *s, int scale, int cx, int y, rgbf col)
{
    draw_text(cv, cx - text_width(s, scale) / 2, y, s, scale, col);
}

static void draw_panel(canvas *cv, const plot_panel *p, int y_off, int panel_height, int left,
                       coverage *stroke, coverage *ink)
{
    rect f = frame_rows(p, y_off, panel_height);
    f.x0 = left;
    f.x1 = cv->w - 1 - RIGHT_MARGIN;
    range xr, yr;
    panel_ranges(p, &xr, &yr);
    axis ax, ay;
    build_axis(&ax, xr.lo, xr.hi, 0, f.x0, f.x1, X_TICK_SPACING);
    build_y_axis(&ay, p, f);
    if (!xr.any)
        ax.nticks = 0;

    draw_grid(cv, &ax, &ay, f);
    stroke->area = ink->area = f;
    stroke->stride = ink->stride = f.x1 - f.x0 + 1;
    memset(ink->a, 0, sizeof(float) * (size_t)ink->stride * (f.y1 - f.y0 + 1));
    for (int s = 0; s < p->nseries; s++) {
        cover_series(stroke, &p->series[s], p->log_y, &ax, &ay);
        composite(cv, stroke, ink, rgb_from_bytes(p->series[s].rgb));
    }
    outline_rect(cv, f, FRAME);
    draw_x_labels(cv, &ax, f);
    draw_y_labels(cv, &ay, f);
    if (!xr.any)
        draw_centered(cv, "NO DATA", 2, (f.x0 + f.x1) / 2, (f.y0 + f.y1) / 2 - GLYPH_H, TEXT_FAINT);
    else
        draw_legend(cv, p, f, ink);
    draw_title(cv, p->title, f, y_off);
    if (has_text(p->xlabel))
        draw_centered(cv, p->xlabel, 1, (f.x0 + f.x1) / 2,
                      f.y1 + TICK_LEN + TICK_GAP + 1 + GLYPH_H + XLABEL_GAP, TEXT);
}

/* ------------------------------------------------------------------------ */
/* Entry point                                                               */
/* ------------------------------------------------------------------------ */

static float *fail(int *out_h, char *err, size_t errsize, const char *fmt, ...)
{
    if (out_h)
        *out_h = 0;
    if (err && errsize > 0) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(err, errsize, fmt, ap);
        va_end(ap);
    }
    return NULL;
}

/* Checks the arguments; returns 0 or writes the problem into msg. */
static int check_arguments(const plot_panel *panels, int npanels, int width, int panel_height,
                           char *msg, size_t n)
{
    if (!panels || npanels < 1) {
        snprintf(msg, n, "plot: need at least one panel (got %d%s)", npanels,
                 panels ? "" : ", panels is NULL");
        return -1;
    }
    if (width < PLOT_MIN_WIDTH || width > PLOT_MAX_SIDE) {
        snprintf(msg, n, "plot: width %d is out of range (%d..%d)", width, PLOT_MIN_WIDTH,
                 PLOT_MAX_SIDE);
        return -1;
    }
    if (panel_height < PLOT_MIN_PANEL_HEIGHT ||
        (long long)panel_height * npanels > PLOT_MAX_SIDE) {
        snprintf(msg, n, "plot: panel height %d x %d panels is out of range (%d..%d in all)",
                 panel_height, npanels, PLOT_MIN_PANEL_HEIGHT, PLOT_MAX_SIDE);
        return -1;
    }
    for (int i = 0; i < npanels; i++) {
        const plot_panel *p = &panels[i];
        if (p->nseries < 0 || (p->nseries > 0 && !p->series)) {
            snprintf(msg, n, "plot: panel %d has nseries %d and series %s", i, p->nseries,
                     p->series ? "set" : "NULL");
            return -1;
        }
        for (int s = 0; s < p->nseries; s++)
            if (p->series[s].n < 0 || (p->series[s].n > 0 && !p->series[s].y)) {
                snprintf(msg, n, "plot: panel %d series %d has n %d and y %s", i, s,
                         p->series[s].n, p->series[s].y ? "set" : "NULL");
                return -1;
            }
    }
    return 0;
}

float *plot_render(const plot_panel *panels, int npanels, int width, int panel_height,
                   int *out_h, char *err, size_t errsize)
{
    char msg[256];
    if (!out_h)
        return fail(out_h, err, errsize, "plot: out_h is NULL");
    if (check_arguments(panels, npanels, width, panel_height, msg, sizeof msg) != 0)
        return fail(out_h, err, errsize, "%s", msg);

    int h = npanels * panel_height;
    size_t plane = (size_t)width * h, area = (size_t)width * panel_height;
    canvas cv = {malloc(3 * plane * sizeof(float)), width, h};
    coverage stroke = {calloc(area, sizeof(float)), {0, 0, 0, 0}, 0};
    coverage ink = {malloc(area * sizeof(float)), {0, 0, 0, 0}, 0};
    if (!cv.px || !stroke.a || !ink.a) {
        free(cv.px);
        free(stroke.a);
        free(ink.a);
        return fail(out_h, err, errsize, "plot: out of memory for a %d x %d image", width, h);
    }
    for (size_t i = 0; i < 3 * plane; i++)
        cv.px[i] = 1.0f;

    int left = common_left_edge(panels, npanels, panel_height);
    for (int i = 0; i < npanels; i++)
        draw_panel(&cv, &panels[i], i * panel_height, panel_height, left, &stroke, &ink);
    free(stroke.a);
    free(ink.a);

    for (size_t i = 0; i < 3 * plane; i++) /* [0, 1] -> the library's [-1, 1] */
        cv.px[i] = cv.px[i] * 2.0f - 1.0f;
    *out_h = h;
    if (err && errsize > 0)
        err[0] = '\0';
    return cv.px;
}
