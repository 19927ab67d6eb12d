"""The PNG of an alert: a transition's window against its reconstruction and its error against the threshold.

matplotlib is imported only when a plot is drawn: it comes with the ``plots`` extra, and the daemon runs without
it (:func:`plots_not_installed` tells the caller, once, that messages go without their plot).
"""

from __future__ import annotations

import io
import logging
import math
from typing import Any

from .messages import arrow, iso_utc, num, pct
from .policy import ANOMALOUS, REMINDER, Transition

log = logging.getLogger(__name__)

def plot_error(t: Transition) -> list[float] | None:
    """Per sample, the quantity ``max_error`` is the maximum of and ``threshold`` applies to: the absolute
    difference between the tapered window and the nearest (tapered) shape, ``|(x - mean) * taper - c|`` in the
    series' units.

    ``values`` are the raw samples ``x`` and ``reconstruction`` the shape un-tapered, ``u = c / taper + mean``
    (`anomalyd.core.detector.Detector.shape`), so the difference is ``taper * |x - u|``: the mean cancels. It is NaN
    where ``u`` is (the ends, where the taper is ~0 and contributes next to nothing) and where a sample is
    missing. None when the transition carries no samples, or several fields (each field's error is scaled by
    the detector, see :func:`plot_figure`).

    Examples
    --------
    >>> t = Transition("anomalous", "s|", "s", (), "m", 0, 4, 1.0, values=(9.0, 2.0, 3.0, 2.0, 9.0),
    ...                reconstruction=(math.nan, 1.0, 1.0, 1.0, math.nan))
    >>> [round(v, 3) for v in plot_error(t)]
    [nan, 0.5, 2.0, 0.5, nan]
    """
    if t.fields or t.values is None or t.reconstruction is None or len(t.values) != len(t.reconstruction):
        return None
    from ..core.model import taper

    tap = taper(len(t.values)).tolist()
    return [w * abs(a - b) for w, a, b in zip(tap, t.values, t.reconstruction, strict=True)]


def _decision(t: Transition) -> str:
    """The detector's decision on the transition's window, in words."""
    return "anomalous" if t.kind in (ANOMALOUS, REMINDER) else "normal"


def _plain(s: str) -> str:
    """Text for a matplotlib title or label: a ``$`` would start math mode."""
    return s.replace("$", r"\$")


def _headline(t: Transition) -> str:
    score = "score n/a" if t.score is None else f"score {t.score:.2f}"
    return _plain(f"{t.signal} [{t.series}]: {score} -> {_decision(t)}\n"
                  f"max error {num(t.max_error)} / threshold {num(t.threshold)} = {num(t.ratio)}")


def plot_figure(t: Transition) -> Any:
    """The figure of :func:`render_plot` (a matplotlib ``Figure``), or None without samples.

    One field: top, the window and its reconstruction (the nearest shape, un-tapered); bottom,
    :func:`plot_error`, the tapered difference whose maximum is ``max_error``, against ``threshold``. The title
    gives the score (the decision's input), the decision, and max_error against its threshold.

    Several fields: one panel per plotted field (``Transition.fields``: the window's largest shares), its samples
    against its reconstruction, titled with the field's name, direction and share; the last panel is each
    field's error against ``threshold``. A field's error is the detector's (scaled so that fields compare, its
    maximum over the fields is ``max_error``), derived from the shares: ``max_error * share / top share``.
    """
    if t.fields:
        return _plot_fields(t)
    err = plot_error(t)
    if err is None or t.values is None or t.reconstruction is None:
        return None
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    n = len(t.values)
    step_s = (t.end_ns - t.start_ns) / 1e9 / max(n - 1, 1)
    x = [i * step_s for i in range(n)]
    fig = Figure(figsize=(6.0, 3.8), dpi=100)
    FigureCanvasAgg(fig)
    top, bottom = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [2, 1]})
    top.plot(x, t.values, color="#1f77b4", lw=1.4, label="window")
    top.plot(x, t.reconstruction, color="#ff7f0e", lw=1.2, ls="--", label="reconstruction")
    top.legend(loc="upper right", fontsize=7)
    top.set_title(_headline(t), fontsize=8)
    bottom.plot(x, err, color="#d62728", lw=1.0, label="|tapered difference|")
    bottom.axhline(t.threshold, color="black", ls=":", lw=1.0, label=f"threshold {num(t.threshold)}")
    bottom.legend(loc="upper right", fontsize=7)
    bottom.set_xlabel(f"seconds from {iso_utc(t.start_ns)}", fontsize=7)
    for ax in (top, bottom):
        ax.tick_params(labelsize=7)
    fig.tight_layout()
    return fig


def _plot_fields(t: Transition) -> Any:
    """:func:`plot_figure` of a multi-field transition."""
    cols = [(f, v, u) for f, v, u in t.columns() if u is not None]
    if not cols:
        return None
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    n = len(cols[0][1])
    step_s = (t.end_ns - t.start_ns) / 1e9 / max(n - 1, 1)
    x = [i * step_s for i in range(n)]
    fig = Figure(figsize=(6.0, 1.5 * len(cols) + 2.1), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    axes = list(fig.subplots(len(cols) + 1, 1, gridspec_kw={"height_ratios": [2] * len(cols) + [1.5]}))
    shares = {f: (sh, d) for f, sh, d, _ in t.attribution}
    for ax, (name, v, u) in zip(axes, cols, strict=False):
        ax.plot(x, v, color="#1f77b4", lw=1.4, label="window")
        ax.plot(x, u, color="#ff7f0e", lw=1.2, ls="--", label="reconstruction")
        sh, d = shares.get(name, (math.nan, 0))
        what = "" if name not in shares else f": {arrow(d)}, {pct(sh)} of the error"
        ax.set_title(_plain(f"{name}{what}"), fontsize=8, loc="left")
        ax.tick_params(labelsize=7)
    axes[0].legend(loc="upper right", fontsize=7)
    axes[len(cols) - 1].set_xlabel(f"seconds from {iso_utc(t.start_ns)}", fontsize=7)
    fig.suptitle(_headline(t), fontsize=8)
    err_ax = axes[-1]
    a = t.attribution
    top_share = a[0][1] if a else math.nan
    scale = t.max_error / top_share if t.max_error is not None and math.isfinite(top_share) and top_share > 0 \
        else None
    scaled = scale is not None
    names = [_plain(f) for f, *_ in a][::-1]  # the largest share at the top
    heights = [sh if scale is None else sh * scale for _, sh, _, _ in a][::-1]
    colors = ["#d62728" if d >= 0 else "#1f77b4" for _, _, d, _ in a][::-1]
    if a:
        bars = err_ax.barh(names, [h if math.isfinite(h) else 0.0 for h in heights], color=colors, height=0.6)
        err_ax.bar_label(bars, labels=[f"{arrow(d)} {pct(sh)}" for _, sh, d, _ in a][::-1], fontsize=7,
                         padding=2)
    if scaled:
        err_ax.axvline(t.threshold, color="black", ls=":", lw=1.0, label=f"threshold {num(t.threshold)}")
        err_ax.legend(loc="lower right", fontsize=7)
        err_ax.set_title("field error (red: up, blue: down; labels: share of the window's error)", fontsize=8,
                         loc="left")
    else:
        err_ax.set_title("share of the window's error (red: up, blue: down)", fontsize=8, loc="left")
    err_ax.margins(x=0.25)
    err_ax.tick_params(labelsize=7)
    return fig


def render_plot(t: Transition) -> bytes | None:
    """A small PNG of :func:`plot_figure`: the window against its reconstruction, and the per-sample tapered
    difference (what ``max_error`` is the maximum of) against the threshold; for several fields, a panel per
    plotted field and the fields' errors against the threshold.

    Returns None when the transition carries no samples (missing data).
    """
    fig = plot_figure(t)
    if fig is None:
        return None
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


_told_no_plots = False


def plots_not_installed(exc: BaseException) -> bool:
    """Whether ``exc`` says matplotlib (the ``plots`` extra) is not installed. The first time, one log line says
    so: every message is then sent without its plot."""
    global _told_no_plots
    if not (isinstance(exc, ModuleNotFoundError) and (exc.name or "").partition(".")[0] == "matplotlib"):
        return False
    if not _told_no_plots:
        _told_no_plots = True
        log.warning("alerts.slack.attach_plot: matplotlib is not installed, so Slack messages are sent without "
                    "the plot; pip install 'anomalyd[plots]' to attach it")
    return True

