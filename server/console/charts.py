"""Charts as inline SVG, drawn on the server: no script, no library from the net. Each
chart names itself for screen readers, and every page also shows its numbers as a table."""

from __future__ import annotations

from html import escape

BAR_H = 18
GAP = 6
LABEL_W = 210
WIDTH = 720


def bars(items: list[tuple[str, float]], title: str, unit: str = "", digits: int = 4) -> str:
    """Horizontal bars, one per (label, value), longest first as given."""
    if not items:
        return ""
    top = max(v for _, v in items) or 1.0
    height = len(items) * (BAR_H + GAP) + GAP
    span = WIDTH - LABEL_W - 110
    rows = []
    for i, (label, value) in enumerate(items):
        y = GAP + i * (BAR_H + GAP)
        w = max(1.0, span * value / top) if value > 0 else 0.0
        shown = f"{value:.{digits}f}{unit}" if isinstance(value, float) and not float(value).is_integer() else f"{value:g}{unit}"
        rows.append(
            f'<g><title>{escape(label)}: {escape(shown)}</title>'
            f'<text x="{LABEL_W - 6}" y="{y + 13}" text-anchor="end">{escape(label[:32])}</text>'
            f'<rect x="{LABEL_W}" y="{y}" width="{w:.1f}" height="{BAR_H}" fill="#0b5cad" rx="2"></rect>'
            f'<text x="{LABEL_W + w + 6:.1f}" y="{y + 13}">{escape(shown)}</text></g>'
        )
    return f'<svg class="chart" role="img" aria-label="{escape(title)}" width="{WIDTH}" height="{height}" viewBox="0 0 {WIDTH} {height}"><title>{escape(title)}</title>{"".join(rows)}</svg>'


PALETTE = ["#0b5cad", "#b42318", "#9a6700", "#1a7f37", "#8250df", "#bf3989", "#57606a", "#0a7d8c"]


def stacked_columns(buckets: list[str], series: dict[str, list[int]], title: str) -> str:
    """One column per time bucket, stacked by series (e.g. stage:rail), with a legend."""
    if not buckets or not series:
        return ""
    totals = [sum(values[i] for values in series.values()) for i in range(len(buckets))]
    top = max(totals) or 1
    plot_h, col_w = 160, max(8, min(40, (WIDTH - 60) // len(buckets) - 4))
    names = list(series)
    legend_h = 16 * len(names) + 8
    height = plot_h + 40 + legend_h
    parts = [f'<text x="4" y="14">{top}</text><text x="4" y="{plot_h + 10}">0</text>']
    for i, bucket in enumerate(buckets):
        x = 40 + i * (col_w + 4)
        y = plot_h + 10
        for k, name in enumerate(names):
            n = series[name][i]
            if not n:
                continue
            h = plot_h * n / top
            y -= h
            parts.append(f'<rect x="{x}" y="{y:.1f}" width="{col_w}" height="{h:.1f}" fill="{PALETTE[k % len(PALETTE)]}"><title>{escape(bucket)} {escape(name)}: {n}</title></rect>')
        if i == 0 or i == len(buckets) - 1:
            parts.append(f'<text x="{x}" y="{plot_h + 26}">{escape(bucket)}</text>')
    for k, name in enumerate(names):
        y = plot_h + 40 + k * 16
        parts.append(f'<rect x="40" y="{y}" width="10" height="10" fill="{PALETTE[k % len(PALETTE)]}"></rect><text x="56" y="{y + 9}">{escape(name)}</text>')
    return f'<svg class="chart" role="img" aria-label="{escape(title)}" width="{WIDTH}" height="{height}" viewBox="0 0 {WIDTH} {height}"><title>{escape(title)}</title>{"".join(parts)}</svg>'
