"""Figures: per-patient trajectories, pre/post slopes, fold-change heatmaps and gating plots.

Every function returns a :class:`matplotlib.figure.Figure` (made without pyplot, so no
global figure state) and never decides where files go; :func:`figure_bytes` turns a
figure into PNG, SVG or PDF bytes that are identical for identical inputs (fixed
style, no dates or software strings in the metadata, fixed SVG hash salt).

Colours: Okabe-Ito for response groups (with a marker shape per group, so colour is
never the only cue), ``viridis`` for event densities, ``RdBu_r`` centred at 0 for
fold changes.

Gating plots replay the gates **as recorded** in ``gates.csv``: the sample's FCS file
is read again (and checked against the sha256 recorded at gating time), compensated
and transformed as the template says, and every population's events are selected
with the recorded coordinates (thresholds, quadrant dividers, polygon vertices,
ellipses), so the plots show exactly the gates that produced ``populations.csv``;
the percentages drawn are checked against it.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from .errors import InputFileError, ResultsError, UsageError

log = logging.getLogger(__name__)

__all__ = [
    "OKABE_ITO", "GROUP_COLOURS", "FORMATS", "plot_style", "figure_bytes", "group_style", "timepoint_order",
    "longitudinal_figure", "paired_figure", "fold_changes", "heatmap_figure", "paired_statistics",
    "load_paired_stats", "GatingRecords", "SampleGating", "RecordedGate", "replay_gates", "gates_figure",
    "MEASURE_LABELS", "paired_annotation", "ellipse_geometry", "BASELINE_NAMES",
]

#: Okabe & Ito (2008) colour-blind-safe palette
OKABE_ITO: tuple[str, ...] = ("#E69F00", "#56B4E9", "#009E73", "#F0E442", "#0072B2", "#D55E00", "#CC79A7",
                              "#000000")
GROUP_COLOURS: dict[str, str] = {"responder": "#0072B2", "stable": "#E69F00", "progressive": "#D55E00"}
GROUP_MARKERS: dict[str, str] = {"responder": "o", "stable": "s", "progressive": "^"}
_SPARE_COLOURS = ("#009E73", "#CC79A7", "#56B4E9", "#000000", "#F0E442")
_SPARE_MARKERS = ("D", "v", "P", "X", "*")
NO_GROUP = "(no group)"
DENSITY_CMAP = "viridis"
FOLD_CMAP = "RdBu_r"
GATE_COLOUR = "#000000"
FMO_COLOUR = "#D55E00"
FORMATS = ("png", "svg", "pdf")
MEASURES = ("pct_parent", "pct_of", "count", "cells_per_ul")
MEASURE_LABELS = {"pct_parent": "% of parent", "pct_of": "% of reference", "count": "events",
                  "cells_per_ul": "cells per µl"}

_STYLE: dict[str, Any] = {
    "font.family": "DejaVu Sans",
    "font.size": 9,
    "axes.titlesize": 9,
    "axes.labelsize": 9,
    "xtick.labelsize": 8,
    "ytick.labelsize": 8,
    "legend.fontsize": 8,
    "figure.titlesize": 10,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.prop_cycle": matplotlib.cycler(color=list(OKABE_ITO)),
    "figure.facecolor": "white",
    "savefig.facecolor": "white",
    "figure.dpi": 100,
    "savefig.dpi": 100,
    "image.interpolation": "nearest",
    "svg.hashsalt": "immunoprofile",
    "svg.fonttype": "path",
    "pdf.fonttype": 42,
    "path.simplify": True,
    "axes.unicode_minus": True,
}
_METADATA: dict[str, dict[str, Any]] = {
    "png": {"Software": None},
    "svg": {"Date": None},
    "pdf": {"CreationDate": None, "ModDate": None},
}


# ===================================================================== style and output
@contextlib.contextmanager
def plot_style() -> Iterator[None]:
    """The fixed matplotlib settings of every immunoprofile figure (restored on exit).

    Raises
    ------
    None
    """
    with matplotlib.rc_context(_STYLE):
        yield


def figure_bytes(fig: Figure, fmt: str, *, dpi: float | None = None) -> bytes:
    """Render ``fig`` as PNG, SVG or PDF bytes, reproducibly.

    Parameters
    ----------
    fig
        A figure from this module.
    fmt
        ``'png'``, ``'svg'`` or ``'pdf'``.
    dpi
        Resolution of PNG output (default: the figure's).

    Returns
    -------
    bytes
        Same figure, same bytes: no dates or software versions in the metadata.

    Raises
    ------
    UsageError
        If ``fmt`` is not one of :data:`FORMATS`.
    """
    fmt = fmt.lower().lstrip(".")
    if fmt not in FORMATS:
        raise UsageError(f"cannot write {fmt!r} figures; choose a file ending in .png, .svg or .pdf")
    buf = io.BytesIO()
    with plot_style():
        fig.savefig(buf, format=fmt, metadata=_METADATA[fmt], dpi=dpi or fig.dpi)
    return buf.getvalue()


def _new_figure(width: float, height: float, dpi: float = 100) -> Figure:
    return Figure(figsize=(width, height), dpi=dpi, layout="constrained")


def group_style(groups: Sequence[str]) -> dict[str, tuple[str, str]]:
    """Colour and marker of each response group (Okabe-Ito; known groups keep their colour).

    Parameters
    ----------
    groups
        Group labels; ``""`` is shown as ``(no group)`` in grey.

    Returns
    -------
    dict
        ``{group: (colour, marker)}``.

    Raises
    ------
    None
    """
    out: dict[str, tuple[str, str]] = {}
    spare = 0
    for g in sorted(set(groups), key=_group_rank):
        if g in GROUP_COLOURS:
            out[g] = (GROUP_COLOURS[g], GROUP_MARKERS[g])
        elif g == "":
            out[g] = ("#7F7F7F", "o")
        else:
            out[g] = (_SPARE_COLOURS[spare % len(_SPARE_COLOURS)], _SPARE_MARKERS[spare % len(_SPARE_MARKERS)])
            spare += 1
    return out


def _group_rank(g: str) -> tuple[int, str]:
    known = list(GROUP_COLOURS)
    if g in known:
        return (known.index(g), g)
    return (len(known) + (1 if g == "" else 0), g)


# ===================================================================== populations tables
def _text(series: pd.Series) -> pd.Series:
    return series.fillna("").astype(str).str.strip()


def _stained(frame: pd.DataFrame) -> pd.DataFrame:
    """Rows of stained samples (FMO controls dropped), text columns normalised."""
    out = frame.copy()
    for c in ("sample_id", "patient_id", "timepoint", "panel", "population", "group", "control"):
        out[c] = _text(out[c]) if c in out.columns else ""
    out = out[out["control"] == ""]
    if "day" not in out.columns:
        out["day"] = np.nan
    out["day"] = pd.to_numeric(out["day"], errors="coerce").astype("float64")
    if out.empty:
        raise UsageError("the results hold no stained (non-control) samples, so there is nothing to plot",
                         hint="check the sample sheet's control column")
    return out.reset_index(drop=True)


def _check_measure(data: pd.DataFrame, measure: str) -> pd.DataFrame:
    if measure not in MEASURES:
        raise UsageError(f"unknown measure {measure!r}; choose from {', '.join(MEASURES)}")
    if measure not in data.columns or not np.isfinite(pd.to_numeric(data[measure], errors="coerce")).any():
        hint = ("cells_per_ul needs a lymphocytes_per_ul column in the sample sheet or counting beads in the template"
                if measure == "cells_per_ul" else None)
        raise UsageError(f"the results have no values of {measure}", hint=hint)
    out = data.copy()
    out[measure] = pd.to_numeric(out[measure], errors="coerce").astype("float64")
    return out


@dataclass(frozen=True)
class Series:
    """One population of one panel, and how it is labelled."""

    panel: str
    population: str
    label: str


def _all_series(data: pd.DataFrame) -> list[Series]:
    pairs = list(dict.fromkeys(zip(data["panel"], data["population"])))
    names = [p for _, p in pairs]
    return [Series(panel, pop, f"{pop} ({panel})" if names.count(pop) > 1 and panel else pop)
            for panel, pop in pairs]


def _select_series(data: pd.DataFrame, populations: Sequence[str] | None) -> list[Series]:
    every = _all_series(data)
    if not populations:
        return every
    out: list[Series] = []
    for want in populations:
        hits = [s for s in every if want in (s.population, s.label)]
        if not hits:
            have = ", ".join(dict.fromkeys(s.population for s in every))
            raise UsageError(f"unknown population {want!r}; the results have: {have}")
        out += [s for s in hits if s not in out]
    return out


def _rows(data: pd.DataFrame, s: Series) -> pd.DataFrame:
    return data[(data["panel"] == s.panel) & (data["population"] == s.population)]


#: timepoint names put first when the results have no days (else the order of first appearance)
BASELINE_NAMES = ("baseline", "screening", "pre", "pretreatment", "day0", "d0", "t0")


def timepoint_order(frame: pd.DataFrame, timepoints: Sequence[str] | None = None) -> list[str]:
    """Timepoints in plotting order: as given, else by median ``day``.

    Timepoints without a day come after those with one, a baseline name
    (:data:`BASELINE_NAMES`) first, then in order of first appearance.

    Parameters
    ----------
    frame
        A populations table.
    timepoints
        Explicit order (and selection), or None.

    Returns
    -------
    list of str

    Raises
    ------
    UsageError
        If a given timepoint is not in the table.
    """
    tps = list(dict.fromkeys(_text(frame["timepoint"])))
    tps = [t for t in tps if t]
    if timepoints:
        unknown = [t for t in timepoints if t not in tps]
        if unknown:
            raise UsageError(f"unknown timepoint(s) {', '.join(unknown)}; the results have: {', '.join(tps)}")
        return list(dict.fromkeys(timepoints))
    day = pd.to_numeric(frame["day"], errors="coerce") if "day" in frame.columns else pd.Series(np.nan,
                                                                                                  index=frame.index)
    tp_col = _text(frame["timepoint"])

    def key(t: str) -> tuple[int, float, int]:
        d = day[tp_col == t].to_numpy(np.float64)
        d = d[np.isfinite(d)]
        if d.size:
            return (0, float(np.median(d)), tps.index(t))
        return (1, 0.0 if t.lower() in BASELINE_NAMES else 1.0, tps.index(t))

    return sorted(tps, key=key)


def _check_patients(data: pd.DataFrame, patients: Sequence[str] | None) -> pd.DataFrame:
    if not patients:
        return data
    have = sorted(set(data["patient_id"]))
    unknown = [p for p in patients if p not in have]
    if unknown:
        raise UsageError(f"unknown patient(s) {', '.join(unknown)}; the results have: {', '.join(have)}")
    return data[data["patient_id"].isin(list(patients))]


def _patient_groups(data: pd.DataFrame) -> dict[str, str]:
    out: dict[str, str] = {}
    for pid, g in zip(data["patient_id"], data["group"]):
        if g and pid not in out:
            out[pid] = g
        out.setdefault(pid, g)
    return out


def _grid(n: int, max_cols: int) -> tuple[int, int]:
    cols = max(1, min(max_cols, n))
    return math.ceil(n / cols), cols


def _axes(fig: Figure, n: int, max_cols: int, **kwargs: Any) -> list[Any]:
    rows, cols = _grid(n, max_cols)
    axs = fig.subplots(rows, cols, squeeze=False, **kwargs).ravel().tolist()
    for ax in axs[n:]:
        ax.set_visible(False)
        ax.set_gid("unused")
    return axs[:n]


def _group_legend(fig: Figure, styles: Mapping[str, tuple[str, str]], *, median: bool) -> None:
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color=c, marker=m, lw=1.5, label=g or NO_GROUP) for g, (c, m) in styles.items()]
    if median:
        handles.append(Line2D([], [], color="#444444", lw=3, ls="--", label="group median"))
    fig.legend(handles=handles, loc="outside right upper", frameon=False, title="response group")


# ===================================================================== longitudinal
def longitudinal_figure(
    frame: pd.DataFrame,
    populations: Sequence[str] | None = None,
    *,
    measure: str = "pct_parent",
    patients: Sequence[str] | None = None,
    timepoints: Sequence[str] | None = None,
    facet: str = "population",
) -> Figure:
    """Per-patient trajectories over timepoints.

    With ``facet='population'`` (default) each population gets a panel with one line
    per patient, coloured by response group, and each group's median trend (groups
    with at least two patients). With ``facet='patient'`` each patient gets a panel
    with one line per population. The x axis is the study ``day`` when every plotted
    sample has one, else the timepoints in order.

    Lines carry ``gid`` ``'patient:<id>'``, ``'median:<group>'`` or
    ``'population:<label>'`` so tests and tools can find them.

    Parameters
    ----------
    frame
        A populations table (``immunoprofile.results.load_populations``).
    populations
        Population names (or ``'name (panel)'`` labels); default all.
    measure
        ``pct_parent``, ``pct_of``, ``count`` or ``cells_per_ul``.
    patients
        Restrict to these patients.
    timepoints
        Order (and selection) of timepoints; default by median day.
    facet
        ``'population'`` or ``'patient'``.

    Returns
    -------
    matplotlib.figure.Figure

    Raises
    ------
    UsageError
        Unknown population, patient, timepoint, measure or facet, or no values to plot.
    """
    if facet not in ("population", "patient"):
        raise UsageError(f"unknown facet {facet!r}; choose 'population' or 'patient'")
    data = _check_measure(_stained(frame), measure)
    series = _select_series(data, populations)
    data = _check_patients(data, patients)
    order = timepoint_order(data, timepoints)
    data = data[data["timepoint"].isin(order) & np.isfinite(data[measure])]
    data = data[pd.concat([(data["panel"] == s.panel) & (data["population"] == s.population) for s in series],
                          axis=1).any(axis=1)] if len(data) else data
    if data.empty:
        raise UsageError(f"no values of {measure} for {', '.join(s.label for s in series)}"
                         + (f" (patients {', '.join(patients)})" if patients else ""),
                         hint="check the population names and that gate processed these samples")
    use_day = bool(np.isfinite(data["day"]).all())
    data = data.assign(x=data["day"] if use_day else data["timepoint"].map({t: i for i, t in enumerate(order)}))
    groups = _patient_groups(data)
    styles = group_style(list(groups.values()))
    pids = sorted(groups)
    note = "1 patient: no group medians" if len(pids) == 1 else ""
    if note:
        log.warning("only one patient (%s) has values: the plot shows that patient's trajectory, without group "
                    "medians", pids[0])
    with plot_style():
        if facet == "population":
            fig = _new_figure(*_panel_size(len(series), 3, 3.6, 2.9, legend=True))
            axs = _axes(fig, len(series), 3, sharex=True)
            for ax, s in zip(axs, series):
                _trajectories(ax, data[(data["panel"] == s.panel) & (data["population"] == s.population)], measure,
                              groups, styles)
                ax.set_title(s.label)
            _group_legend(fig, styles, median=len(pids) > 1)
        else:
            fig = _new_figure(*_panel_size(len(pids), 4, 3.2, 2.6, legend=True))
            axs = _axes(fig, len(pids), 4, sharex=True, sharey=True)
            colours = {s.label: OKABE_ITO[(i + 4) % len(OKABE_ITO)] for i, s in enumerate(series)}
            for ax, pid in zip(axs, pids):
                sub = data[data["patient_id"] == pid]
                for i, s in enumerate(series):
                    rows = sub[(sub["panel"] == s.panel) & (sub["population"] == s.population)].sort_values("x")
                    if len(rows):
                        ax.plot(rows["x"], rows[measure], color=colours[s.label], marker="os^DvPX"[i % 7], lw=1.5,
                                ms=4, gid=f"population:{s.label}")
                ax.set_title(f"{pid} ({groups[pid] or NO_GROUP})")
            from matplotlib.lines import Line2D

            fig.legend(handles=[Line2D([], [], color=colours[s.label], marker="os^DvPX"[i % 7], label=s.label)
                                for i, s in enumerate(series)], loc="outside right upper", frameon=False,
                       title="population")
        for ax in axs:
            _time_axis(ax, order, use_day)
            ax.set_ylabel(MEASURE_LABELS[measure])
            if facet == "patient":
                ax.label_outer()
        title = f"{MEASURE_LABELS[measure]} over time, per patient"
        fig.suptitle(title + (f" ({note})" if note else ""))
    return fig


def _panel_size(n: int, max_cols: int, w: float, h: float, legend: bool = False) -> tuple[float, float]:
    rows, cols = _grid(n, max_cols)
    return cols * w + (1.6 if legend else 0.0), rows * h + 0.5


def _trajectories(ax: Any, rows: pd.DataFrame, measure: str, groups: Mapping[str, str],
                  styles: Mapping[str, tuple[str, str]]) -> None:
    if rows.empty:
        ax.text(0.5, 0.5, "no values", transform=ax.transAxes, ha="center", va="center", color="#7F7F7F")
        return
    for pid in sorted(set(rows["patient_id"])):
        r = rows[rows["patient_id"] == pid].sort_values(["x", "sample_id"])
        colour, marker = styles[groups[pid]]
        ax.plot(r["x"], r[measure], color=colour, marker=marker, ms=3.5, lw=1.0, alpha=0.75, gid=f"patient:{pid}")
    for g in styles:
        members = [p for p in set(rows["patient_id"]) if groups[p] == g]
        if len(members) < 2:
            continue
        sub = rows[rows["patient_id"].isin(members)]
        med = sub.groupby("timepoint", sort=False).agg(x=("x", "median"), y=(measure, "median")).sort_values("x")
        ax.plot(med["x"], med["y"], color=styles[g][0], lw=3, ls="--", alpha=0.95, zorder=3, gid=f"median:{g}")


def _time_axis(ax: Any, order: Sequence[str], use_day: bool) -> None:
    if use_day:
        ax.set_xlabel("study day")
    else:
        ax.set_xticks(range(len(order)), list(order), rotation=20, ha="right")
        ax.set_xlabel("timepoint")
        ax.set_xlim(-0.3, len(order) - 0.7)


# ===================================================================== paired statistics
def load_paired_stats(folder: str | Path) -> pd.DataFrame:
    """``paired_stats.csv`` of a ``compare`` output folder (or the file itself).

    Parameters
    ----------
    folder
        The ``--out`` folder of ``immunoprofile compare``, or its ``paired_stats.csv``.

    Returns
    -------
    pandas.DataFrame
        Text columns as ``str`` (empty when missing), numbers as float.

    Raises
    ------
    ResultsError
        If the folder or file is missing or is not a paired_stats table.
    """
    p = Path(folder)
    path = p / "paired_stats.csv" if p.is_dir() else p
    if not path.is_file():
        raise ResultsError("no paired_stats.csv here" if p.is_dir() else "no such file", path=str(p),
                           hint="give the output folder of `immunoprofile compare` (or leave out --stats to "
                                "compute the statistics now)")
    try:
        table = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (OSError, ValueError, pd.errors.ParserError) as e:
        raise ResultsError(f"cannot read the paired statistics ({e})", path=str(path)) from e
    need = ("measure", "analysis", "group", "panel", "population", "pre", "post", "n_pairs", "median_difference",
            "q_value")
    missing = [c for c in need if c not in table.columns]
    if missing:
        raise ResultsError(f"missing column(s) {', '.join(missing)}", path=str(path),
                           hint="this does not look like paired_stats.csv written by `immunoprofile compare`")
    text = {"measure", "comparison", "analysis", "group", "panel", "population", "pre", "post", "excluded", "test",
            "method", "bh_family", "ttest_scale", "note"}
    for c in table.columns:
        if c not in text:
            table[c] = pd.to_numeric(table[c], errors="coerce").astype("float64")
    return table


def paired_statistics(frame: pd.DataFrame, pre: str, post: str, measure: str = "pct_parent") -> pd.DataFrame:
    """Paired statistics computed now with :mod:`immunoprofile.compare` (all populations form the family).

    This is what ``immunoprofile compare RESULTS --pre PRE --post POST --measure MEASURE``
    writes to ``paired_stats.csv`` (over all patients; no ``--by``).

    Parameters
    ----------
    frame
        A populations table.
    pre, post
        Timepoints.
    measure
        The measure.

    Returns
    -------
    pandas.DataFrame
        ``paired_stats.csv`` rows.

    Raises
    ------
    UsageError, ResultsError
        As :func:`immunoprofile.compare.compare_timepoints`.
    """
    from .compare import compare_timepoints

    return compare_timepoints(frame, [pre, post], measures=[measure]).paired


def _stats_row(stats: pd.DataFrame, s: Series, pre: str, post: str, measure: str) -> pd.Series | None:
    sel = stats[(stats["measure"] == measure) & (stats["analysis"] == "within") & (stats["group"] == "all")
                & (stats["pre"] == pre) & (stats["post"] == post) & (stats["panel"] == s.panel)
                & (stats["population"] == s.population)]
    return sel.iloc[0] if len(sel) else None


def _fmt_p(p: float) -> str:
    if not np.isfinite(p):
        return "n/a"
    if p < 0.001:
        return "<0.001"
    return f"{p:.3g}"


def paired_annotation(row: pd.Series | None) -> str:
    """The text of a slope panel: n, median change, q (Benjamini-Hochberg adjusted p).

    Raises
    ------
    None
    """
    if row is None:
        return "no statistics for this population"
    n = int(row["n_pairs"]) if np.isfinite(row["n_pairs"]) else 0
    md = float(row["median_difference"])
    text = f"n = {n}\nmedian change = {md:+.3g}" if np.isfinite(md) else f"n = {n}\nmedian change = n/a"
    q = float(row["q_value"])
    text += f"\nq = {_fmt_p(q)}"
    if not np.isfinite(q):
        text += " (not tested: fewer than 3 pairs)" if n < 3 else " (not tested)"
    return text


def paired_figure(
    frame: pd.DataFrame,
    pre: str,
    post: str,
    stats: pd.DataFrame,
    *,
    measure: str = "pct_parent",
    populations: Sequence[str] | None = None,
) -> Figure:
    """Pre/post slope plots, one panel per population, annotated from ``paired_stats``.

    Each patient with a value at both timepoints is a line (``gid='patient:<id>'``),
    coloured by response group; the text (``gid='annotation'``) gives n, the median
    change (post - pre) and the Benjamini-Hochberg q-value of the ``within``/``all``
    row of ``stats``.

    Parameters
    ----------
    frame
        A populations table.
    pre, post
        Timepoints.
    stats
        ``paired_stats.csv`` rows (:func:`load_paired_stats` or :func:`paired_statistics`).
    measure
        The measure.
    populations
        Populations to draw; default every population with statistics.

    Returns
    -------
    matplotlib.figure.Figure

    Raises
    ------
    UsageError
        Unknown population or timepoint, statistics without this comparison, or no
        patient with both timepoints.
    """
    data = _check_measure(_stained(frame), measure)
    order = timepoint_order(data, [pre, post])
    comp = stats[(stats["measure"] == measure) & (stats["pre"] == pre) & (stats["post"] == post)]
    if comp.empty:
        have = sorted({f"{a} -> {b} ({m})" for a, b, m in zip(stats["pre"], stats["post"], stats["measure"])})
        raise UsageError(f"the statistics have no {measure} comparison of {pre} -> {post}; they have: "
                         f"{'; '.join(have) or 'nothing'}",
                         hint="run `immunoprofile compare` with these --pre/--post/--measure, or leave out --stats")
    series = _select_series(data, populations)
    if not populations:
        with_stats = set(zip(comp["panel"], comp["population"]))
        series = [s for s in series if (s.panel, s.population) in with_stats]
    data = data[data["timepoint"].isin(order) & np.isfinite(data[measure])]
    groups = _patient_groups(data)
    styles = group_style(list(groups.values()))
    pairs = {s: _pairs(_rows(data, s), pre, post, measure) for s in series}
    if not any(len(p) for p in pairs.values()):
        raise UsageError(f"no patient has {measure} values at both {pre} and {post}",
                         hint="check the timepoints (and that the samples were gated)")
    with plot_style():
        fig = _new_figure(*_panel_size(len(series), 5, 2.5, 2.9, legend=True))
        axs = _axes(fig, len(series), 5)
        for ax, s in zip(axs, series):
            p = pairs[s]
            for pid, (a, b) in p.items():
                colour, marker = styles[groups[pid]]
                ax.plot([0, 1], [a, b], color=colour, marker=marker, ms=4, lw=1.2, alpha=0.8, gid=f"patient:{pid}")
            ax.set_xticks([0, 1], [pre, post])
            ax.set_xlim(-0.25, 1.25)
            if p:  # head room for the annotation
                values = np.array(list(p.values()), dtype=np.float64)
                lo, hi = float(values.min()), float(values.max())
                span = hi - lo if hi > lo else max(abs(hi), 1.0)
                ax.set_ylim(lo - 0.08 * span, hi + 0.55 * span)
            ax.set_title(s.label)
            ax.set_ylabel(MEASURE_LABELS[measure])
            ax.text(0.02, 0.98, paired_annotation(_stats_row(stats, s, pre, post, measure)), transform=ax.transAxes,
                    ha="left", va="top", fontsize=7, gid="annotation",
                    bbox={"boxstyle": "round,pad=0.25", "facecolor": "white", "alpha": 0.8, "edgecolor": "none"})
            if not p:
                ax.text(0.5, 0.4, "no patient with both timepoints", transform=ax.transAxes, ha="center",
                        color="#7F7F7F", fontsize=7)
        _group_legend(fig, styles, median=False)
        fig.suptitle(f"{MEASURE_LABELS[measure]}: {pre} -> {post}, per patient (q: Benjamini-Hochberg)")
    return fig


def _pairs(rows: pd.DataFrame, pre: str, post: str, measure: str) -> dict[str, tuple[float, float]]:
    """Patient -> (pre, post) for patients with exactly one value at each timepoint."""
    out = {}
    for pid in sorted(set(rows["patient_id"])):
        r = rows[rows["patient_id"] == pid]
        a = r.loc[r["timepoint"] == pre, measure].to_numpy(np.float64)
        b = r.loc[r["timepoint"] == post, measure].to_numpy(np.float64)
        if a.size == 1 and b.size == 1:
            out[pid] = (float(a[0]), float(b[0]))
    return out


# ===================================================================== heatmap
def fold_changes(
    frame: pd.DataFrame,
    pre: str,
    post: str,
    *,
    measure: str = "pct_parent",
    populations: Sequence[str] | None = None,
) -> pd.DataFrame:
    """log2(post / pre) per patient (rows) and population (columns).

    A zero is replaced by half the smallest positive value of that population (over
    both timepoints and all patients), so a fall to zero is a large but finite fall;
    a population with no positive value, or a patient without both timepoints, is NaN.

    Parameters
    ----------
    frame
        A populations table.
    pre, post
        Timepoints.
    measure
        The measure.
    populations
        Populations (default all).

    Returns
    -------
    pandas.DataFrame
        Index ``patient_id`` (sorted by response group, then id), one column per
        population label; attribute ``attrs['groups']`` maps patient -> group.

    Raises
    ------
    UsageError
        Unknown population or timepoint, or no patient with both timepoints.
    """
    data = _check_measure(_stained(frame), measure)
    timepoint_order(data, [pre, post])
    series = _select_series(data, populations)
    data = data[data["timepoint"].isin([pre, post]) & np.isfinite(data[measure])]
    groups = _patient_groups(data)
    pids = sorted(groups, key=lambda p: (_group_rank(groups[p]), p))
    table = pd.DataFrame(index=pd.Index(pids, name="patient_id"), columns=[s.label for s in series], dtype="float64")
    for s in series:
        pairs = _pairs(_rows(data, s), pre, post, measure)
        values = np.array([v for ab in pairs.values() for v in ab], dtype=np.float64)
        positive = values[values > 0]
        if not pairs or positive.size == 0:
            continue
        floor = positive.min() / 2
        for pid, (a, b) in pairs.items():
            table.loc[pid, s.label] = math.log2((b if b > 0 else floor) / (a if a > 0 else floor))
    table = table.loc[table.notna().any(axis=1)]
    if table.empty:
        raise UsageError(f"no patient has {measure} values at both {pre} and {post}",
                         hint="check --pre/--post against the timepoints of the results")
    table.attrs["groups"] = {p: groups[p] for p in table.index}
    return table


def heatmap_figure(
    frame: pd.DataFrame,
    pre: str,
    post: str,
    *,
    measure: str = "pct_parent",
    populations: Sequence[str] | None = None,
) -> Figure:
    """Patients x populations heatmap of log2 fold change post vs pre (:func:`fold_changes`).

    Diverging ``RdBu_r`` map centred at 0 (blue: fall, red: rise), missing cells grey;
    the image's array is the fold-change table.

    Raises
    ------
    UsageError
        As :func:`fold_changes`.
    """
    from matplotlib.colors import Normalize

    table = fold_changes(frame, pre, post, measure=measure, populations=populations)
    groups = table.attrs["groups"]
    values = table.to_numpy(np.float64)
    finite = values[np.isfinite(values)]
    vmax = float(np.max(np.abs(finite))) if finite.size else 1.0
    vmax = vmax if vmax > 0 else 1.0
    n_rows, n_cols = values.shape
    with plot_style():
        fig = _new_figure(max(4.5, 1.8 + 0.32 * n_cols), max(2.6, 1.9 + 0.3 * n_rows))
        ax = fig.add_subplot()
        cmap = matplotlib.colormaps[FOLD_CMAP].with_extremes(bad="#D9D9D9")
        im = ax.imshow(np.ma.masked_invalid(values), cmap=cmap, norm=Normalize(-vmax, vmax), aspect="auto",
                       interpolation="nearest")
        im.set_gid("fold_change")
        ax.set_xticks(range(n_cols), list(table.columns), rotation=60, ha="right", rotation_mode="anchor")
        styles = group_style(list(groups.values()))
        ax.set_yticks(range(n_rows), [f"{p} ({groups[p] or NO_GROUP})" for p in table.index])
        for lab, pid in zip(ax.get_yticklabels(), table.index):
            lab.set_color(styles[groups[pid]][0] if groups[pid] else "#000000")
        ax.spines[:].set_visible(False)
        if n_rows * n_cols <= 400:
            for i in range(n_rows):
                for j in range(n_cols):
                    v = values[i, j]
                    if np.isfinite(v):
                        ax.text(j, i, f"{v:.1f}".replace("-0.0", "0.0"), ha="center", va="center", fontsize=6,
                                color="white" if abs(v) > 0.6 * vmax else "black")
        bar = fig.colorbar(im, ax=ax, shrink=0.8)
        bar.set_label(f"log2 fold change ({post} / {pre})")
        note = " (1 patient)" if n_rows == 1 else ""
        fig.suptitle(f"{MEASURE_LABELS[measure]}: log2 fold change {post} vs {pre}{note}")
    return fig


# ===================================================================== gates as recorded
@dataclass(frozen=True)
class RecordedGate:
    """One row of ``gates.csv`` for one sample, replayed on its events."""

    population: str
    parent: str
    gate_type: str
    method: str
    x: str
    y: str
    coordinates: Mapping[str, Any]
    fmo_sample_id: str
    count: int
    parent_count: int
    expected_pct: float = math.nan  # pct_parent in populations.csv (NaN when not there)

    @property
    def pct(self) -> float:
        """100 x count / parent_count of the replayed masks (NaN for an empty parent)."""
        return 100.0 * self.count / self.parent_count if self.parent_count else math.nan


@dataclass
class SampleGating:
    """A sample's events, the populations selected by its recorded gates, and how to draw them."""

    sample_id: str
    title: str
    values: dict[str, np.ndarray]
    labels: dict[str, str]
    transforms: dict[str, Any]
    masks: dict[str, np.ndarray]
    gates: list[RecordedGate]
    side_scatter: str | None = None
    mismatches: list[str] = field(default_factory=list)


def _coords(text: str, where: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except (TypeError, ValueError) as e:
        raise ResultsError(f"{where}: coordinates are not JSON ({text!r})", hint="regenerate it with "
                           "`immunoprofile gate`") from e
    if not isinstance(value, dict):
        raise ResultsError(f"{where}: coordinates are not a JSON object ({text!r})")
    return value


def _finite(v: Any) -> float | None:
    return None if v is None else float(v)


def replay_gates(data: Any, rows: pd.DataFrame) -> tuple[dict[str, np.ndarray], list[RecordedGate]]:
    """Select each population's events with the coordinates recorded in ``gates.csv``.

    Boundary rules as :mod:`immunoprofile.gating`: a range keeps ``min <= x < max``,
    a quadrant's divider belongs to its positive side, polygons use the winding rule
    and ellipses keep ``d^2 <= D^2`` (both with :mod:`flowutils.gating`).

    Parameters
    ----------
    data
        The sample's :class:`immunoprofile.gating.EventData`.
    rows
        The sample's rows of ``gates.csv``, in file (gating) order.

    Returns
    -------
    masks
        Boolean membership per population, plus ``'root'``.
    gates
        The replayed gates with their counts.

    Raises
    ------
    ResultsError
        If a row names an unknown parent or dimension, or its coordinates cannot be used.
    """
    from flowutils.gating import points_in_ellipsoid, points_in_polygon

    n = data.n_events
    masks: dict[str, np.ndarray] = {"root": np.ones(n, dtype=bool)}
    gates: list[RecordedGate] = []
    repeated = set(rows["population"][rows["population"].duplicated()])
    for _, r in rows.iterrows():
        pop, parent, kind = r["population"], r["parent"], r["gate_type"]
        if pop in repeated:  # an FMO control's threshold, once per parent: 'FMO PD1 threshold (CD4 T)'
            pop = f"{pop} ({parent})"
        where = f"gates.csv, sample {r['sample_id']}, population {pop!r}"
        if parent not in masks:
            raise ResultsError(f"{where}: parent {parent!r} has no gate before it", hint="regenerate gates.csv")
        c = _coords(r["coordinates"], where)
        x, y = r["x_marker"], r["y_marker"]
        for dim in (x, y):
            if dim and dim not in data.channel_of:
                raise ResultsError(f"{where}: marker {dim!r} is not in the template used to read the file")
        if kind == "range":
            m = np.ones(n, dtype=bool)
            for dim, bounds in c.items():
                if dim not in data.channel_of:
                    raise ResultsError(f"{where}: range on unknown marker {dim!r}")
                v = data.values(dim)
                lo, hi = _finite(bounds[0]), _finite(bounds[1])
                if lo is not None:
                    m &= v >= lo
                if hi is not None:
                    m &= v < hi
        elif kind == "quadrant":
            vx, vy = data.values(x), data.values(y)
            q = c["quadrant"]
            mx = vx >= c["x_divider"] if q[0] == "+" else vx < c["x_divider"]
            my = vy >= c["y_divider"] if q[1] == "+" else vy < c["y_divider"]
            m = mx & my
        elif kind == "polygon":
            pts = np.column_stack([data.values(x), data.values(y)])
            m = points_in_polygon(np.asarray(c["vertices"], dtype=np.float64), pts)
        elif kind == "ellipse":
            pts = np.column_stack([data.values(x), data.values(y)])
            m = points_in_ellipsoid(np.asarray(c["covariance"], dtype=np.float64),
                                    np.asarray(c["center"], dtype=np.float64), float(c["distance"]) ** 2, pts)
        elif kind == "boolean":
            (op, operands), = c.items()
            ops = []
            for name in operands:
                neg = name.startswith("not ")
                ref = name[4:] if neg else name
                if ref not in masks:
                    raise ResultsError(f"{where}: boolean gate refers to {ref!r}, which has no gate before it")
                ops.append(~masks[ref] if neg else masks[ref])
            if op == "and":
                m = np.logical_and.reduce(ops)
            elif op == "or":
                m = np.logical_or.reduce(ops)
            elif op == "not":
                m = ~ops[0]
            else:
                raise ResultsError(f"{where}: unknown boolean operation {op!r}")
        else:
            raise ResultsError(f"{where}: unknown gate type {kind!r}")
        m = np.asarray(m, dtype=bool) & masks[parent]
        masks[pop] = m
        gates.append(RecordedGate(pop, parent, kind, r["method"], x, y, c, r.get("fmo_sample_id", ""),
                                  int(m.sum()), int(masks[parent].sum())))
    return masks, gates


class GatingRecords:
    """A ``gate`` results folder, opened to draw the gates of its samples.

    Reads ``gates.csv``, ``populations.csv`` and ``manifest.json`` once; :meth:`sample`
    then reads one FCS file and replays its gates.

    Parameters
    ----------
    results
        The output folder of ``immunoprofile gate``.
    fcs_dir
        Folder holding the FCS files, when they are not where the manifest says.

    Raises
    ------
    ResultsError
        If ``gates.csv`` is missing or unreadable.
    """

    def __init__(self, results: str | Path, fcs_dir: str | Path | None = None) -> None:
        self.folder = Path(results)
        self.fcs_dir = Path(fcs_dir) if fcs_dir else None
        path = self.folder / "gates.csv"
        if not path.is_file():
            raise ResultsError("no gates.csv here", path=str(self.folder),
                               hint="give the output folder of `immunoprofile gate`")
        try:
            self.gates = pd.read_csv(path, dtype=str, keep_default_na=False)
        except (OSError, ValueError, pd.errors.ParserError) as e:
            raise ResultsError(f"cannot read gates.csv ({e})", path=str(path)) from e
        self.manifest = _read_manifest(self.folder)
        try:
            from .results import load_populations

            self.populations = load_populations(self.folder, require_metadata=False)
        except ResultsError:
            self.populations = pd.DataFrame(columns=["sample_id", "population", "pct_parent", "count"])
        self._templates: dict[tuple[str, str], Any] = {}

    @property
    def sample_ids(self) -> list[str]:
        """Samples with recorded gates: stained samples in sheet order, then FMO controls."""
        have = list(dict.fromkeys(self.gates["sample_id"]))
        order = [i["sample_id"] for i in self.manifest.get("inputs", []) if i.get("sample_id") in set(have)]
        order += [s for s in have if s not in order]
        controls = set(self.gates.loc[self.gates["population"].str.startswith("FMO "), "sample_id"])
        return [s for s in order if s not in controls] + [s for s in order if s in controls]

    def sample(self, sample_id: str) -> SampleGating:
        """Read ``sample_id``'s FCS file and replay its recorded gates.

        Raises
        ------
        UsageError
            If the sample has no recorded gates.
        InputFileError
            If its FCS file cannot be found.
        ResultsError
            If the file or template changed since gating, or the records are unusable.
        """
        from .fcs import read_fcs
        from .gating import prepare

        rows = self.gates[self.gates["sample_id"] == sample_id]
        if rows.empty:
            have = list(dict.fromkeys(self.gates["sample_id"]))
            raise UsageError(f"sample {sample_id!r} has no gates in {self.folder / 'gates.csv'}; samples: "
                             f"{', '.join(have[:12])}{' ...' if len(have) > 12 else ''}")
        template = self._template(rows.iloc[0]["template"], rows.iloc[0]["template_sha256"])
        path = self.locate(sample_id)
        sample = read_fcs(path, dataset=int(self.manifest.get("options", {}).get("dataset", 0) or 0))
        expected = self._expected_sha(sample_id)
        if expected and sample.sha256 != expected:
            raise ResultsError(f"{path} is not the file that was gated (sha256 {sample.sha256[:12]}..., the results "
                               f"recorded {expected[:12]}...)", code="RESULTS_STALE",
                               hint="regate, or point --fcs-dir at the original files")
        hints = {}
        for axis in ("x", "y"):
            for m, ch in zip(rows[f"{axis}_marker"], rows[f"{axis}_channel"]):
                if m and ch:
                    hints.setdefault(m, ch)
        side = _side_scatter(sample)
        extra = (side,) if side else ()
        data = prepare(sample, template, compensation=self._compensation(), channel_hints=hints, extra_markers=extra)
        for m, ch in hints.items():
            if m in data.channel_of and data.channel(m) != ch:
                raise ResultsError(f"sample {sample_id}: {m} is read from {data.channel(m)} but was gated on {ch}",
                                   code="RESULTS_STALE", hint="the template or the file changed since gating; regate")
        masks, gates = replay_gates(data, rows)
        mismatches = []
        pops = self.populations[self.populations["sample_id"] == sample_id]
        expected_pct = dict(zip(pops["population"], pd.to_numeric(pops["pct_parent"], errors="coerce")))
        expected_n = dict(zip(pops["population"], pd.to_numeric(pops["count"], errors="coerce")))
        out = []
        for g in gates:
            e = float(expected_pct.get(g.population, math.nan))
            out.append(RecordedGate(**{**g.__dict__, "expected_pct": e}))
            n = expected_n.get(g.population)
            if n is not None and np.isfinite(n) and int(n) != g.count:
                mismatches.append(f"{g.population}: {g.count} events here, {int(n)} in populations.csv")
        for msg in mismatches:
            log.warning("%s: %s", sample_id, msg)
        dims = list(dict.fromkeys([d for g in out for d in (g.x, g.y) if d] + list(extra)))
        meta = self._meta(sample_id)
        title = " · ".join(x for x in (sample_id, meta, f"{template.name} {template.version}") if x)
        return SampleGating(
            sample_id=sample_id, title=title, values={d: data.values(d) for d in dims},
            labels={d: f"{d} ({data.channel(d)})" if data.channel(d) != d else d for d in dims},
            transforms={d: data.transforms[d] for d in dims}, masks=masks, gates=out, side_scatter=side,
            mismatches=mismatches)

    # -- where things are
    def locate(self, sample_id: str) -> Path:
        """The FCS file of ``sample_id``: under ``fcs_dir``, beside the sample sheet, or as recorded.

        Raises
        ------
        InputFileError
            None of the candidate paths exists.
        """
        recorded, absolute = "", ""
        for i in self.manifest.get("inputs", []):
            if i.get("sample_id") == sample_id:
                recorded = str(i.get("file") or "")
                absolute = str(i.get("path") or "")  # manifest version 2: the resolved path as read
        if not recorded and "file" in self.populations.columns:
            hit = self.populations.loc[self.populations["sample_id"] == sample_id, "file"]
            recorded = str(hit.iloc[0]) if len(hit) else ""
        if not recorded:
            raise InputFileError(f"the results do not record the FCS file of sample {sample_id!r}",
                                 path=str(self.folder), hint="give its folder with --fcs-dir")
        rec = Path(recorded)
        candidates: list[Path] = []
        if self.fcs_dir is not None:
            candidates += [self.fcs_dir / rec, self.fcs_dir / rec.name]
        if absolute:
            candidates.append(Path(absolute))
        sheet = self.manifest.get("options", {}).get("samples")
        if sheet and not rec.is_absolute():
            s = Path(sheet)
            bases = [s.parent] if s.is_absolute() else [s.parent, self.folder.parent / s.parent,
                                                         self.folder.parent.parent / s.parent]
            candidates += [b / rec for b in bases]
        candidates += [rec] if rec.is_absolute() else [rec, self.folder.parent / rec]
        for c in dict.fromkeys(candidates):
            if c.is_file():
                return c
        raise InputFileError(f"cannot find the FCS file of sample {sample_id!r} ({recorded}); looked in: "
                             + ", ".join(str(c) for c in dict.fromkeys(candidates)), path=str(self.folder),
                             code="FILE_MISSING", hint="give the folder that holds the FCS files with --fcs-dir")

    def _expected_sha(self, sample_id: str) -> str:
        for i in self.manifest.get("inputs", []):
            if i.get("sample_id") == sample_id and i.get("sha256"):
                return str(i["sha256"])
        if "file_sha256" in self.populations.columns:
            hit = self.populations.loc[self.populations["sample_id"] == sample_id, "file_sha256"]
            if len(hit) and str(hit.iloc[0]):
                return str(hit.iloc[0])
        return ""

    def _meta(self, sample_id: str) -> str:
        pops = self.populations[self.populations["sample_id"] == sample_id]
        if pops.empty:
            return "FMO control" if (self.gates.loc[self.gates["sample_id"] == sample_id, "population"]
                                     .str.startswith("FMO ").any()) else ""
        r = pops.iloc[0]
        parts = [str(r.get("patient_id", "")), str(r.get("timepoint", ""))]
        day = r.get("day", math.nan)
        if isinstance(day, float) and np.isfinite(day):
            parts.append(f"day {day:g}")
        return " ".join(p for p in parts if p)

    def _template(self, name: str, sha256: str) -> Any:
        from .templates import load_template

        key = (name, sha256)
        if key in self._templates:
            return self._templates[key]
        sources = [t.get("source") for t in self.manifest.get("templates", [])
                   if t.get("name") == name and t.get("sha256") == sha256 and t.get("source")]
        tried = []
        for src in [*sources, name]:
            if str(src).lower().endswith((".xml", ".wsp")):
                raise ResultsError(f"template {name!r} is a Gating-ML/FlowJo document; gate plots are drawn for "
                                   "immunoprofile YAML templates only", code="RESULTS_UNSUPPORTED",
                                   hint="view these gates in FlowJo or FlowKit")
            try:
                t = load_template(src)
            except Exception as e:  # noqa: BLE001 - try the next source, report all at the end
                tried.append(f"{src} ({type(e).__name__})")
                continue
            if t.sha256 == sha256:
                self._templates[key] = t
                return t
            tried.append(f"{src} (content changed: sha256 {t.sha256[:12]}...)")
        raise ResultsError(f"cannot find template {name!r} with sha256 {sha256[:12]}... used for gating; tried: "
                           + "; ".join(tried), path=str(self.folder), code="TEMPLATE_CHANGED",
                           hint="restore the template version the results were gated with, or regate")

    def _compensation(self) -> tuple[tuple[str, ...], np.ndarray] | None:
        opts = self.manifest.get("options", {})
        if not opts.get("compensation_override"):
            return None
        path = opts.get("compensation")
        for i in self.manifest.get("inputs", []):
            if i.get("role") == "compensation" and i.get("path"):
                path = i["path"]
        from .transform import compensation_matrix_from_csv

        if not path or not Path(path).is_file():
            raise InputFileError(f"the samples were gated with --compensation {path}, which cannot be found",
                                 path=str(self.folder), hint="run from the folder gate ran in")
        names, m = compensation_matrix_from_csv(path)
        return tuple(names), np.asarray(m, dtype=np.float64)


def _read_manifest(folder: Path) -> dict[str, Any]:
    path = folder / "manifest.json"
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ResultsError(f"cannot read manifest.json ({e})", path=str(path)) from e


def _side_scatter(sample: Any) -> str | None:
    for name in ("SSC-A", "SSC-H", "SS INT", "SSC"):
        if name in sample.channels:
            return name
    return None


# ===================================================================== drawing gates
@dataclass(frozen=True)
class _Panel:
    parent: str
    x: str
    y: str | None
    gates: tuple[RecordedGate, ...]


def _panels(view: SampleGating) -> list[_Panel]:
    out: dict[tuple[str, str, str | None], list[RecordedGate]] = {}
    for g in view.gates:
        if g.gate_type == "boolean":
            continue
        if g.y:
            key = (g.parent, g.x, g.y)
        else:
            dims = list(g.coordinates) if g.gate_type == "range" else [g.x]
            key = (g.parent, dims[0], view.side_scatter if len(dims) == 1 else dims[1])
        out.setdefault(key, []).append(g)
    return [_Panel(p, x, y, tuple(gs)) for (p, x, y), gs in out.items()]


def _limits(view: SampleGating) -> dict[str, tuple[float, float]]:
    lims = {}
    for dim, v in view.values.items():
        fin = v[np.isfinite(v)]
        lo, hi = (float(np.percentile(fin, 0.5)), float(np.percentile(fin, 99.5))) if fin.size else (0.0, 1.0)
        marks = []
        for g in view.gates:
            c = g.coordinates
            if g.gate_type == "range" and dim in c:
                marks += [b for b in c[dim] if b is not None]
            elif g.gate_type == "quadrant":
                marks += [c["x_divider"]] if g.x == dim else []
                marks += [c["y_divider"]] if g.y == dim else []
        lo, hi = min([lo, *marks]), max([hi, *marks])
        if _is_linear(view.transforms.get(dim)):
            lo = min(lo, 0.0)
        pad = 0.05 * (hi - lo if hi > lo else 1.0)
        lims[dim] = (lo - pad, hi + pad)
    return lims


def _is_linear(t: Any) -> bool:
    return t is None or type(t).__name__ in ("Identity", "Linear")


_SUPERSCRIPT = str.maketrans("0123456789-", "⁰¹²³⁴⁵⁶⁷⁸⁹⁻")


def _ticks(t: Any, lim: tuple[float, float]) -> tuple[list[float], list[str]] | None:
    """Decade ticks of a non-linear transform, labelled in instrument units."""
    if _is_linear(t):
        return None
    raw = np.array([-1e4, -1e3, -1e2, 0.0, 1e2, 1e3, 1e4, 1e5, 1e6])
    with np.errstate(all="ignore"):
        pos = np.asarray(t.apply(raw), dtype=np.float64)
    keep = np.isfinite(pos) & (pos >= lim[0]) & (pos <= lim[1])
    if keep.sum() < 2:
        return None
    labels = ["0" if r == 0 else ("−" if r < 0 else "") + "10" + str(int(round(math.log10(abs(r))))).translate(
        _SUPERSCRIPT) for r in raw[keep]]
    return pos[keep].tolist(), labels


def _kilo(v: float, _pos: Any = None) -> str:
    return "0" if v == 0 else f"{v / 1000:g}K"


def gates_figure(view: SampleGating, *, thumbnail: bool = False, max_events: int = 30_000,
                 bins: int | None = None) -> Figure:
    """The gating hierarchy of one sample as a sequence of density plots with the gates drawn.

    One panel per parent population and pair of axes (sibling quadrant gates share
    a panel); one-dimensional gates are drawn against side scatter (a histogram when
    the file has none). Thresholds from an FMO control are dashed, vermillion and
    labelled ``FMO``; data-driven and fixed gates are solid. Each gate's percentage of
    its parent is written in its region (``gid='pct:<population>'``); gate artists carry
    ``gid='gate:<population>'`` (threshold lines ``gate:<population>:<marker>:min|max``,
    quadrant dividers ``gate:<population>:x|y``). Axes are in transformed units,
    labelled with marker names (and channels), with decade ticks in instrument units.

    Parameters
    ----------
    view
        From :meth:`GatingRecords.sample`.
    thumbnail
        One row of small panels without tick labels (for the report).
    max_events
        Events drawn per panel (a fixed-seed subsample; percentages use all events).
    bins
        Density bins per axis (default 96, thumbnails 48).

    Returns
    -------
    matplotlib.figure.Figure

    Raises
    ------
    None
    """
    panels = _panels(view)
    booleans = [g for g in view.gates if g.gate_type == "boolean"]
    limits = _limits(view)
    bins = bins or (48 if thumbnail else 96)
    n = len(panels) + (1 if booleans and not thumbnail else 0)
    n = max(n, 1)
    with plot_style():
        if thumbnail:
            fig = Figure(figsize=(1.35 * n, 1.55), dpi=72, layout="constrained")
            axs = fig.subplots(1, n, squeeze=False).ravel().tolist()
        else:
            rows, cols = _grid(n, 4)
            fig = _new_figure(cols * 3.1, rows * 2.9 + 0.4)
            axs = _axes(fig, n, 4)
        for ax, panel in zip(axs, panels):
            _draw_panel(ax, view, panel, limits, bins=bins, max_events=max_events, thumbnail=thumbnail)
        if not panels:
            axs[0].text(0.5, 0.5, "no gates to draw", ha="center", va="center", transform=axs[0].transAxes)
            axs[0].set_axis_off()
        if booleans and not thumbnail:
            _boolean_panel(axs[len(panels)], booleans)
        if thumbnail:
            fig.get_layout_engine().set(w_pad=0.01, h_pad=0.01, wspace=0.02, hspace=0.0)
        else:
            title = view.title
            if view.mismatches:
                title += "\nWARNING: differs from populations.csv: " + "; ".join(view.mismatches[:3])
            fig.suptitle(title, color="#D55E00" if view.mismatches else "black")
    return fig


def _subsample(idx: np.ndarray, k: int) -> np.ndarray:
    if idx.size <= k:
        return idx
    return np.sort(np.random.default_rng(0).choice(idx, size=k, replace=False))


def _draw_panel(ax: Any, view: SampleGating, panel: _Panel, limits: Mapping[str, tuple[float, float]], *,
                bins: int, max_events: int, thumbnail: bool) -> None:
    from matplotlib.colors import LogNorm

    idx = _subsample(np.flatnonzero(view.masks[panel.parent]), max_events)
    xl = limits[panel.x]
    x = np.clip(view.values[panel.x][idx], *xl)
    fs = 5.5 if thumbnail else 8
    if panel.y is not None:
        yl = limits[panel.y]
        y = np.clip(view.values[panel.y][idx], *yl)
        h, _, _ = np.histogram2d(x, y, bins=bins, range=[xl, yl])
        im = ax.imshow(np.ma.masked_equal(h.T, 0), origin="lower", extent=(*xl, *yl), aspect="auto",
                       cmap=DENSITY_CMAP, norm=LogNorm(vmin=1, vmax=max(float(h.max()), 2.0)),
                       interpolation="nearest")
        im.set_gid(f"density:{panel.parent}")
        ax.set_ylim(*yl)
    else:
        counts, edges = np.histogram(x, bins=bins, range=xl)
        ax.stairs(counts, edges, fill=True, color="#3B528B", alpha=0.8, gid=f"density:{panel.parent}")
        ax.set_ylim(0, max(1, counts.max()) * 1.15)
    ax.set_xlim(*xl)
    _label_axis(ax, "x", panel.x, view, xl, thumbnail)
    if panel.y is not None:
        _label_axis(ax, "y", panel.y, view, limits[panel.y], thumbnail)
    else:
        ax.set_ylabel("events", fontsize=fs)
    n_parent = int(view.masks[panel.parent].sum())
    parent = "all events" if panel.parent == "root" else panel.parent
    ax.set_title(parent if thumbnail else f"{parent} ({n_parent:,} events)", fontsize=fs + 0.5,
                 pad=2 if thumbnail else 4)
    drawn: set[tuple[str, float]] = set()
    for k, g in enumerate(panel.gates):
        _draw_gate(ax, g, panel, drawn, k, thumbnail)
    if thumbnail:
        ax.tick_params(labelbottom=False, labelleft=False, length=1.5)


def _label_axis(ax: Any, axis: str, dim: str, view: SampleGating, lim: tuple[float, float], thumbnail: bool) -> None:
    label = dim if thumbnail else view.labels.get(dim, dim)
    fs = 5.5 if thumbnail else 8
    getattr(ax, f"set_{axis}label")(label, fontsize=fs, labelpad=1 if thumbnail else 3)
    ticks = _ticks(view.transforms.get(dim), lim)
    target = ax.xaxis if axis == "x" else ax.yaxis
    if ticks is not None:
        getattr(ax, f"set_{axis}ticks")(ticks[0], ticks[1])
    elif _is_linear(view.transforms.get(dim)) and lim[1] > 5000:
        from matplotlib.ticker import FuncFormatter, MaxNLocator

        target.set_major_locator(MaxNLocator(4))
        target.set_major_formatter(FuncFormatter(_kilo))


def _outline() -> list[Any]:
    from matplotlib import patheffects

    return [patheffects.withStroke(linewidth=2.6, foreground="white")]


def _line_style(g: RecordedGate) -> dict[str, Any]:
    fmo = g.method.startswith("fmo")
    return {"color": FMO_COLOUR if fmo else GATE_COLOUR, "ls": "--" if fmo else "-", "lw": 1.3,
            "path_effects": _outline()}


def _pct_text(g: RecordedGate, thumbnail: bool) -> str:
    pct = "n/a" if not np.isfinite(g.pct) else f"{g.pct:.1f}%"
    return pct if thumbnail else f"{g.population}\n{pct}"


def _text_style(thumbnail: bool) -> dict[str, Any]:
    # labels stay inside their panel and never move the layout
    return {"fontsize": 5.5 if thumbnail else 7.5, "color": "black", "path_effects": _outline(), "zorder": 5,
            "in_layout": False, "clip_on": True}


def _draw_gate(ax: Any, g: RecordedGate, panel: _Panel, drawn: set[tuple[str, float]], k: int,
               thumbnail: bool) -> None:
    from matplotlib.patches import Ellipse, Polygon, Rectangle

    c = g.coordinates
    ts = _text_style(thumbnail)
    style = _line_style(g)
    if g.gate_type == "range":
        bounds = {d: (_finite(b[0]), _finite(b[1])) for d, b in c.items()}
        if panel.y is not None and len(bounds) == 2:
            (lx, hx), (ly, hy) = bounds[panel.x], bounds[panel.y]
            x0, x1 = lx if lx is not None else ax.get_xlim()[0], hx if hx is not None else ax.get_xlim()[1]
            y0, y1 = ly if ly is not None else ax.get_ylim()[0], hy if hy is not None else ax.get_ylim()[1]
            ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, gid=f"gate:{g.population}",
                                   **{k2: v for k2, v in style.items() if k2 != "ls"}, linestyle=style["ls"]))
            ax.text((x0 + x1) / 2, y1, _pct_text(g, thumbnail), ha="center", va="top", gid=f"pct:{g.population}",
                    **ts)
            return
        lo, hi = bounds[panel.x]
        for bound, v in (("min", lo), ("max", hi)):
            if v is not None:
                ax.axvline(v, gid=f"gate:{g.population}:{panel.x}:{bound}", **style)
        if g.method.startswith("fmo"):
            v = lo if lo is not None else hi
            ax.text(v, 0.02, " FMO" if thumbnail else f" FMO {g.fmo_sample_id}".rstrip(), transform=ax.get_xaxis_transform(),
                    ha="left", va="bottom", fontsize=ts["fontsize"] - 1, color=FMO_COLOUR, rotation=90,
                    gid=f"fmo:{g.population}", in_layout=False, clip_on=True)
        xl = ax.get_xlim()
        span = xl[1] - xl[0]
        if lo is not None and hi is not None:
            xt, ha = (lo + hi) / 2, "center"
        elif lo is not None:
            xt, ha = (lo + 0.02 * span, "left") if lo < xl[0] + 0.65 * span else (xl[1] - 0.02 * span, "right")
        else:
            xt, ha = (hi - 0.02 * span, "right") if hi > xl[0] + 0.35 * span else (xl[0] + 0.02 * span, "left")
        ax.text(xt, 0.97 - 0.16 * k if not thumbnail else 0.97, _pct_text(g, thumbnail),
                transform=ax.get_xaxis_transform(), ha=ha, va="top", gid=f"pct:{g.population}", **ts)
    elif g.gate_type == "quadrant":
        for axis, key in (("x", "x_divider"), ("y", "y_divider")):
            v = float(c[key])
            if (axis, v) in drawn:
                continue
            drawn.add((axis, v))
            line = ax.axvline if axis == "x" else ax.axhline
            line(v, gid=f"gate:{g.population}:{axis}", **style)
        q = c["quadrant"]
        xs, ha = (0.97, "right") if q[0] == "+" else (0.03, "left")
        ys, va = (0.97, "top") if q[1] == "+" else (0.03, "bottom")
        ax.text(xs, ys, _pct_text(g, thumbnail), transform=ax.transAxes, ha=ha, va=va, gid=f"pct:{g.population}",
                **ts)
    elif g.gate_type in ("polygon", "ellipse"):
        if g.gate_type == "polygon":
            patch = Polygon(np.asarray(c["vertices"], dtype=np.float64), closed=True)
        else:
            centre, width, height, angle = ellipse_geometry(c["center"], c["covariance"], c["distance"])
            patch = Ellipse(centre, width, height, angle=angle)
        patch.set(fill=False, edgecolor=style["color"], linestyle=style["ls"], linewidth=style["lw"],
                  path_effects=style["path_effects"], gid=f"gate:{g.population}")
        ax.add_patch(patch)
        ax.text(0.03, 0.97 - 0.16 * k, _pct_text(g, thumbnail), transform=ax.transAxes, ha="left", va="top",
                gid=f"pct:{g.population}", **ts)


def ellipse_geometry(center: Sequence[float], covariance: Sequence[Sequence[float]],
                     distance: float) -> tuple[tuple[float, float], float, float, float]:
    """Centre, full width, full height and angle (degrees) of the ellipse ``d^2 = distance^2``.

    Raises
    ------
    None
    """
    vals, vecs = np.linalg.eigh(np.asarray(covariance, dtype=np.float64))
    vals = np.clip(vals, 0, None)
    width = 2 * float(distance) * math.sqrt(vals[1])
    height = 2 * float(distance) * math.sqrt(vals[0])
    angle = math.degrees(math.atan2(vecs[1, 1], vecs[0, 1]))
    return (float(center[0]), float(center[1])), width, height, angle


def _boolean_panel(ax: Any, gates: Sequence[RecordedGate]) -> None:
    ax.set_axis_off()
    ax.set_title("combinations (boolean gates)", fontsize=8.5)
    for i, g in enumerate(gates[:14]):
        (op, operands), = g.coordinates.items()
        pct = "n/a" if not np.isfinite(g.pct) else f"{g.pct:.1f}%"
        ax.text(0.0, 0.95 - i * 0.068, f"{g.population}: {pct} of {g.parent}", transform=ax.transAxes, fontsize=7,
                va="top", gid=f"pct:{g.population}")
