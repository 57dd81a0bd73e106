#!/usr/bin/env python3
"""Draw the Grafana dashboard's panels with matplotlib, from a live Prometheus.

    python -m deploy.render_dashboard --prometheus http://127.0.0.1:9090 \\
        [--dashboard deploy/grafana/dashboards/distill.json] [--start=-15m] [--end now] \\
        [--step auto] [--output docs/dashboard.png]

A stand-in for a screenshot (Grafana cannot be installed where the demo and CI run), not a
Grafana renderer: no thresholds, overrides or transformations. Tests check it only through
what it writes: the picture, its report line and its exit status.

Every panel of the dashboard JSON is drawn where its ``gridPos`` puts it on Grafana's
24-column grid, with its title, its unit and its targets' legends: each target's ``expr`` is
run through Prometheus's ``/api/v1/query_range`` over [start, end]. ``timeseries`` panels are
line plots; ``stat`` panels show each series' last value (``lastNotNull``); ``row`` panels
are section headings. A panel without data says "No data", as Grafana does. No Grafana is
needed: the picture in docs/dashboard.png is made this way from the CPU demo
(``make demo``, docs/demo.md).

``--start``/``--end`` take Unix seconds, an ISO time, ``now`` or ``now-15m``/``-15m``
(s, m, h, d; write ``--start=-15m``, with ``=``, for a leading minus). Exit status 0 when the
picture was written (even with empty panels; the report line names them), 2 when Prometheus
cannot be reached or a query fails.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import re
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "distill.json"
GRID_COLUMNS = 24

# Grafana's dark theme, roughly.
BACKGROUND = "#111217"
PANEL = "#181b1f"
BORDER = "#2c3235"
TEXT = "#ccccdc"
MUTED = "#8e8e8e"
PALETTE = ["#73bf69", "#f2cc0c", "#8ab8ff", "#ff780a", "#f2495c", "#5794f2", "#b877d9",
           "#705da0", "#37872d", "#fade2a"]


class PrometheusError(RuntimeError):
    """Prometheus unreachable, or a query it refused."""


# --------------------------------------------------------------------------- times


def parse_time(value: str, now: float | None = None) -> float:
    """Unix seconds from ``1700000000``, ``2024-01-01T12:00:00Z``, ``now``, ``now-15m`` or
    ``-15m``."""
    now = time.time() if now is None else now
    text = value.strip()
    if text == "now":
        return now
    m = re.fullmatch(r"(?:now)?-(\d+(?:\.\d+)?)([smhd])", text)
    if m:
        return now - float(m.group(1)) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]
    try:
        return float(text)
    except ValueError:
        pass
    try:
        parsed = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a time: {value!r}") from None
    if parsed.tzinfo is None:
        parsed = parsed.astimezone()
    return parsed.timestamp()


def auto_step(start: float, end: float, points: int = 300) -> float:
    """Grafana-like resolution: about ``points`` points, at least 1 s."""
    return max(1.0, math.ceil((end - start) / points))


# --------------------------------------------------------------------------- Prometheus


def _get(url: str, timeout: float = 30.0) -> dict[str, Any]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            body = json.loads(resp.read().decode())
    except urllib.error.HTTPError as err:  # 400/422: a bad query; the body says why
        try:
            body = json.loads(err.read().decode())
        except (ValueError, OSError):
            raise PrometheusError(f"{url}: HTTP {err.code}") from None
    except (urllib.error.URLError, OSError, ValueError) as err:
        raise PrometheusError(f"cannot reach Prometheus ({url.split('/api/')[0]}): {err}") from None
    if body.get("status") != "success":
        raise PrometheusError(f"{body.get('errorType', 'error')}: {body.get('error', body)}")
    return body["data"]


def _value(v: str) -> float:
    return float(v)  # Prometheus writes NaN, +Inf, -Inf as strings float() reads


def query_range(prometheus: str, expr: str, start: float, end: float,
                step: float) -> list[tuple[dict[str, str], list[tuple[float, float]]]]:
    """``[(labels, [(t, value), ...]), ...]`` of a range query."""
    params = urllib.parse.urlencode({"query": expr, "start": f"{start:.3f}",
                                     "end": f"{end:.3f}", "step": f"{step:g}"})
    data = _get(f"{prometheus.rstrip('/')}/api/v1/query_range?{params}")
    return [(r["metric"], [(float(t), _value(v)) for t, v in r["values"]])
            for r in data["result"]]


def query(prometheus: str, expr: str,
          at: float | None = None) -> list[tuple[dict[str, str], float]]:
    """``[(labels, value), ...]`` of an instant query (at ``at``, default now)."""
    params = {"query": expr}
    if at is not None:
        params["time"] = f"{at:.3f}"
    data = _get(f"{prometheus.rstrip('/')}/api/v1/query?{urllib.parse.urlencode(params)}")
    if data["resultType"] == "scalar":
        return [({}, _value(data["result"][1]))]
    return [(r["metric"], _value(r["value"][1])) for r in data["result"]]


# --------------------------------------------------------------------------- dashboard


def load_dashboard(path: str | Path = DASHBOARD) -> dict[str, Any]:
    return json.loads(Path(path).read_text())


def panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    """Every panel in grid order, with the panels of collapsed rows after their row."""
    out = []
    for panel in dashboard.get("panels", []):
        out.append(panel)
        out.extend(panel.get("panels", []))  # a collapsed row keeps its panels inside
    return sorted(out, key=lambda p: (p.get("gridPos", {}).get("y", 0),
                                      p.get("gridPos", {}).get("x", 0)))


def legend(fmt: str | None, labels: dict[str, str], expr: str) -> str:
    """Grafana's legendFormat: ``{{label}}`` replaced by the series' label values."""
    if not fmt or fmt == "__auto":
        inner = ", ".join(f'{k}="{v}"' for k, v in sorted(labels.items()) if k != "__name__")
        if not inner:
            return labels.get("__name__") or expr
        return f"{labels.get('__name__', '')}{{{inner}}}"
    return re.sub(r"\{\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}\}",
                  lambda m: labels.get(m.group(1), ""), fmt)


def format_value(value: float, unit: str | None) -> str:
    """A value as Grafana shows it for the common units of our dashboard."""
    if value is None or math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "∞" if value > 0 else "-∞"
    unit = unit or "none"
    if unit == "percentunit":
        return f"{value * 100:.3g}%"
    if unit == "percent":
        return f"{value:.3g}%"
    if unit == "s":
        a = abs(value)
        if a == 0:
            return "0 s"
        if a < 1e-3:
            return f"{value * 1e6:.3g} µs"
        if a < 1:
            return f"{value * 1e3:.3g} ms"
        if a < 120:
            return f"{value:.3g} s"
        return f"{value / 60:.3g} min"
    if unit in ("decmbytes", "mbytes"):
        for scale, name in ((1e6, "TB"), (1e3, "GB"), (1, "MB")):
            if abs(value) >= scale:
                return f"{value / scale:.3g} {name}"
        return f"{value:.3g} MB"
    if unit == "short":
        for scale, name in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
            if abs(value) >= scale:
                return f"{value / scale:.3g} {name}"
        return f"{value:.3g}"
    return f"{value:.4g}"


def fetch(dashboard: dict[str, Any], prometheus: str, start: float, end: float,
          step: float) -> dict[int, list[tuple[str, list[tuple[float, float]]]]]:
    """Panel id → ``[(legend, points), ...]`` for every target of every panel."""
    results: dict[int, list] = {}
    for panel in panels(dashboard):
        if panel.get("type") == "row":
            continue
        series = []
        for target in panel.get("targets", []):
            expr = target.get("expr")
            if not expr or target.get("hide"):
                continue
            for labels, points in query_range(prometheus, expr, start, end, step):
                series.append((legend(target.get("legendFormat"), labels, expr), points))
        results[panel["id"]] = series
    return results


# --------------------------------------------------------------------------- drawing


def _style_axes(ax) -> None:
    ax.set_facecolor(PANEL)
    for spine in ax.spines.values():
        spine.set_color(BORDER)
    ax.tick_params(colors=MUTED, labelsize=7, length=2)
    ax.grid(True, color=BORDER, linewidth=0.5)


def _with_gaps(points: list[tuple[float, float]], step: float) -> list[tuple[float, float]]:
    """A NaN wherever a series has no sample for more than a step: lines are not joined
    across the gap (Grafana's spanNulls: false), e.g. between two runs of the trainer."""
    out: list[tuple[float, float]] = []
    for t, v in points:
        if out and t - out[-1][0] > 1.5 * step:
            out.append(((t + out[-1][0]) / 2, float("nan")))
        out.append((t, v if math.isfinite(v) else float("nan")))
    return out


def _draw_timeseries(ax, series, defaults: dict[str, Any], start: float, end: float,
                     step: float) -> None:
    """Lines as the panel's fieldConfig says: unit, min/max, line width, fill opacity,
    spanNulls and a log scale (custom.scaleDistribution)."""
    import matplotlib.dates as mdates
    from matplotlib.ticker import FuncFormatter

    unit = defaults.get("unit")
    custom = defaults.get("custom", {})
    width = float(custom.get("lineWidth", 1)) * 1.2
    fill = float(custom.get("fillOpacity", 10)) / 100
    scale = custom.get("scaleDistribution", {})
    for i, (name, points) in enumerate(series):
        color = PALETTE[i % len(PALETTE)]
        if custom.get("spanNulls") is True:
            points = [(t, v) for t, v in points if math.isfinite(v)]
        else:
            points = _with_gaps(points, step)
        xs = [dt.datetime.fromtimestamp(t) for t, _ in points]
        ys = [v for _, v in points]
        ax.plot(xs, ys, color=color, linewidth=width, label=name)
        if fill > 0 and scale.get("type") != "log":
            ax.fill_between(xs, ys, alpha=fill * 0.8, color=color)
    if scale.get("type") == "log":
        ax.set_yscale("log", base=scale.get("log", 10))
    lo, hi = defaults.get("min"), defaults.get("max")
    if lo is not None or hi is not None:
        ax.set_ylim(bottom=lo, top=hi)
    ax.set_xlim(dt.datetime.fromtimestamp(start), dt.datetime.fromtimestamp(end))
    ax.xaxis.set_major_formatter(mdates.DateFormatter("%H:%M:%S"))
    locator = mdates.AutoDateLocator(minticks=3, maxticks=7)
    locator.intervald[mdates.SECONDLY] = [1, 2, 5, 10, 15, 30]
    ax.xaxis.set_major_locator(locator)
    if scale.get("type") != "log":
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: format_value(v, unit)))
    if series:
        ax.legend(loc="upper left", fontsize=6.5, frameon=False, labelcolor=TEXT,
                  ncol=2 if len(series) > 3 else 1, handlelength=1.2)


def _draw_stat(ax, series, unit: str | None) -> None:
    ax.set_xticks([])
    ax.set_yticks([])
    ax.grid(False)
    n = len(series)
    cols = min(n, 3) or 1
    rows = math.ceil(n / cols) or 1
    for i, (name, points) in enumerate(series):
        finite = [v for _, v in points if math.isfinite(v)]
        value = finite[-1] if finite else float("nan")  # lastNotNull
        cx = (i % cols + 0.5) / cols
        cy = 1 - (i // cols + 0.5) / rows
        ax.text(cx, cy + 0.08 / rows, format_value(value, unit), ha="center", va="center",
                fontsize=22 if rows == 1 else 16, color=PALETTE[i % len(PALETTE)],
                fontweight="bold", transform=ax.transAxes)
        ax.text(cx, cy - 0.22 / rows, name, ha="center", va="center", fontsize=8, color=TEXT,
                transform=ax.transAxes)


def draw(dashboard: dict[str, Any], results: dict[int, list], start: float, end: float,
         output: str | Path, step: float | None = None, width: float = 20.0,
         dpi: int = 110) -> Path:
    """Lay the panels out on Grafana's grid and save the picture."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    step = step or auto_step(start, end)
    items = panels(dashboard)
    rows_total = max(p["gridPos"]["y"] + p["gridPos"]["h"] for p in items)
    unit_h = 0.3  # inches per grid row (Grafana: 30 px)
    header = 0.7
    height = rows_total * unit_h + header
    fig = plt.figure(figsize=(width, height), dpi=dpi, facecolor=BACKGROUND)
    span = (f"{dt.datetime.fromtimestamp(start):%Y-%m-%d %H:%M:%S} – "
            f"{dt.datetime.fromtimestamp(end):%H:%M:%S}")
    fig.text(0.01, 1 - 0.35 / height, dashboard.get("title", "dashboard"), fontsize=15,
             color=TEXT, fontweight="bold", va="center")
    fig.text(0.99, 1 - 0.35 / height, span, fontsize=9, color=MUTED, ha="right", va="center")
    usable = (height - header) / height
    pad_x, pad_top, pad_bottom = 0.006, 0.5 / height, 0.35 / height

    def box(gp: dict[str, int]) -> tuple[float, float, float, float]:
        left = gp["x"] / GRID_COLUMNS
        w = gp["w"] / GRID_COLUMNS
        top = 1 - header / height - gp["y"] / rows_total * usable
        h = gp["h"] / rows_total * usable
        return left, top - h, w, h

    for panel in items:
        left, bottom, w, h = box(panel["gridPos"])
        title = panel.get("title", "")
        if panel.get("type") == "row":
            fig.text(left + pad_x, bottom + h / 2, title, fontsize=11, color=TEXT,
                     fontweight="bold", va="center")
            continue
        ax = fig.add_axes((left + pad_x + 0.022, bottom + pad_bottom,
                           w - 2 * pad_x - 0.026, h - pad_top - pad_bottom))
        _style_axes(ax)
        ax.set_title(title, loc="left", fontsize=9, color=TEXT, pad=4)
        defaults = panel.get("fieldConfig", {}).get("defaults", {})
        unit = defaults.get("unit")
        series = results.get(panel.get("id"), [])
        if not series:
            ax.set_xticks([])
            ax.set_yticks([])
            ax.grid(False)
            ax.text(0.5, 0.5, "No data", ha="center", va="center", fontsize=11,
                    color=MUTED, transform=ax.transAxes)
        elif panel.get("type") == "stat":
            _draw_stat(ax, series, unit)
        else:
            _draw_timeseries(ax, series, defaults, start, end, step)
    out = Path(output)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, facecolor=BACKGROUND)
    plt.close(fig)
    return out


def render(prometheus: str, output: str | Path, start: float, end: float,
           step: float | None = None, dashboard_path: str | Path = DASHBOARD) -> dict[str, int]:
    """Query and draw; returns panel title → number of series drawn (0 = "No data")."""
    dashboard = load_dashboard(dashboard_path)
    step = step or auto_step(start, end)
    results = fetch(dashboard, prometheus, start, end, step)
    draw(dashboard, results, start, end, output, step)
    return {p["title"]: len(results.get(p["id"], [])) for p in panels(dashboard)
            if p.get("type") != "row"}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 2)[2])
    ap.add_argument("--prometheus", default="http://127.0.0.1:9090", help="Prometheus base URL")
    ap.add_argument("--dashboard", default=str(DASHBOARD), help="Grafana dashboard JSON")
    ap.add_argument("--start", default="now-15m")
    ap.add_argument("--end", default="now")
    ap.add_argument("--step", default="auto", help="seconds between points, or auto")
    ap.add_argument("--output", default=str(ROOT / "docs" / "dashboard.png"))
    args = ap.parse_args(argv)
    now = time.time()
    try:
        start, end = parse_time(args.start, now), parse_time(args.end, now)
    except argparse.ArgumentTypeError as err:
        ap.error(str(err))
    if end <= start:
        ap.error("--end must be after --start")
    step = None if args.step == "auto" else float(args.step)
    try:
        drawn = render(args.prometheus, args.output, start, end, step, args.dashboard)
    except PrometheusError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    empty = [title for title, n in drawn.items() if n == 0]
    print(f"{args.output}: {len(drawn)} panels"
          + (f"; no data for: {', '.join(empty)}" if empty else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
