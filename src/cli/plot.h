/* plot — a small, self-contained line-plot rasterizer (libc and libm only).
 *
 * The klvae tool uses it to draw loss curves while training: one panel per
 * quantity, stacked vertically, each with a title, nice-valued grid lines,
 * numeric tick labels, an x-axis label and a legend. Lines are anti-aliased
 * (about 1.8 px wide) and text uses a built-in 5x7 bitmap font (digits,
 * A-Z, space and . , - + : / ( ) % = _ ; ? ! ' * < > [ ]; lowercase is drawn
 * as uppercase, anything else as '?').
 *
 * The output is the float image layout the library's image functions take,
 * so it can be written with klvae_image_write_png directly. Nothing here
 * keeps global state: concurrent calls on different data are safe. */
#ifndef KLVAE_CLI_PLOT_H
#define KLVAE_CLI_PLOT_H

#include <stddef.h>

/* Smallest sizes plot_render accepts: below them the frame, labels and
 * legend no longer fit. */
#define PLOT_MIN_WIDTH 200
#define PLOT_MIN_PANEL_HEIGHT 120
/* Largest image side (matches klvae_image_write_png's limit). */
#define PLOT_MAX_SIDE 65536

/* One curve. The arrays are only read, and only during plot_render; the
 * caller keeps ownership of them and of the label.
 *   label: shown in the legend; NULL or "" leaves the series out of it.
 *   x, y:  n points, drawn in order as a polyline. A point whose x or y is
 *          not finite (or, on a log axis, whose y is not positive) is
 *          skipped and breaks the line there (a gap); an isolated point
 *          between gaps is drawn as a dot. x may be NULL: the points are
 *          then at x = 0, 1, ..., n-1. Magnitudes above 1e300 count as
 *          non-finite (so spans cannot overflow).
 *   n:     number of points, 0 or more (0 draws nothing).
 *   rgb:   line colour, 0..255 per channel. */
typedef struct plot_series {
    const char *label;
    const double *x, *y;
    int n;
    unsigned char rgb[3];
} plot_series;

/* One panel: a framed plot area with its own axes, auto-ranged from the
 * finite points of its series (x from min to max; y with a 5% margin). The
 * strings and the series array are only read during plot_render.
 *   title:   drawn centred above the plot at double size (NULL: none).
 *   xlabel:  drawn centred under the x tick labels (NULL: none).
 *   log_y:   1 for a logarithmic y axis (decade grid lines).
 *   series:  nseries curves, drawn in order (later ones on top); may be
 *            NULL when nseries is 0. A panel without any drawable point
 *            still gets its frame and says "NO DATA". */
typedef struct plot_panel {
    const char *title;
    const char *xlabel;
    int log_y;
    const plot_series *series;
    int nseries;
} plot_panel;

/* Renders npanels panels, each width x panel_height pixels, stacked
 * vertically (panels[0] on top) on a white background.
 *
 * Takes: panels (npanels >= 1 of them), width >= PLOT_MIN_WIDTH,
 * panel_height >= PLOT_MIN_PANEL_HEIGHT, with width and
 * npanels * panel_height at most PLOT_MAX_SIDE; out_h must not be NULL;
 * err may be NULL (errsize is then ignored).
 *
 * Returns: a malloc'ed (3, h, w) float array, h = npanels * panel_height,
 * stored planar (all of R, then G, then B; rows top to bottom) with values
 * in [-1, 1] such that pixel = round(255 * clamp(v * 0.5 + 0.5, 0, 1)) —
 * the layout klvae_image_write_png takes. *out_h is set to h. The caller
 * owns the array and releases it with free().
 *
 * On error (bad argument: npanels < 1, a size out of range, out_h NULL, a
 * panel with nseries < 0 or with series NULL while nseries > 0, a series
 * with n < 0 or with y NULL while n > 0; or out of memory) it returns NULL,
 * sets *out_h to 0 when out_h is not NULL, and writes a one-line message
 * (NUL-terminated, truncated to errsize) into err when err is not NULL. */
float *plot_render(const plot_panel *panels, int npanels, int width, int panel_height,
                   int *out_h, char *err, size_t errsize);

#endif /* KLVAE_CLI_PLOT_H */
