"""The run report: one self-contained HTML page from a ``gate`` results folder.

:func:`build_report` returns the page as text: styles inline, every figure an
embedded PNG (``data:`` URI), and a Content-Security-Policy that forbids the
browser to fetch anything, so the file can be mailed or archived and opens the
same anywhere. It holds the run summary and provenance (``manifest.json``),
failures and QC findings, a strip of gating thumbnails per sample, the populations
table, the paired statistics (from a ``compare`` folder, or computed now) and the
longitudinal plots. Same inputs, same bytes: the page records no time of its own.
"""

from __future__ import annotations

import base64
import html
import json
import logging
import math
import shlex
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from . import __version__
from .errors import ImmunoprofileError

log = logging.getLogger(__name__)

__all__ = ["build_report", "POPULATION_TABLE_COLUMNS", "PAIRED_TABLE_COLUMNS", "CSP"]

#: the page may show its own inline styles and data: images, and load nothing else
CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'; base-uri 'none'; form-action 'none'"
POPULATION_TABLE_COLUMNS = ("sample_id", "patient_id", "timepoint", "day", "group", "panel", "population", "parent",
                            "count", "parent_count", "pct_parent", "pct_of", "cells_per_ul")
PAIRED_TABLE_COLUMNS = ("measure", "comparison", "analysis", "group", "panel", "population", "n_pairs",
                        "median_pre", "median_post", "median_difference", "estimate", "ci_low", "ci_high",
                        "ci_level", "p_value", "q_value", "note")
THUMBNAIL_DPI = 90
PLOT_DPI = 100

_CSS = """
:root { --ink: #1f2328; --muted: #59636e; --line: #d0d7de; --band: #f6f8fa; --warn: #9a3412; --ok: #166534; }
* { box-sizing: border-box; }
body { font-family: -apple-system, "Segoe UI", "DejaVu Sans", Helvetica, Arial, sans-serif; color: var(--ink);
       margin: 0 auto; max-width: 1400px; padding: 1rem 1.5rem 3rem; line-height: 1.4; font-size: 14px; }
h1 { font-size: 1.6rem; margin: 0.2rem 0; } h2 { font-size: 1.25rem; margin-top: 2.2rem;
     border-bottom: 1px solid var(--line); padding-bottom: 0.2rem; } h3 { font-size: 1.05rem; margin: 1.2rem 0 0.4rem; }
nav ol { columns: 3; margin: 0.4rem 0; } nav a, a { color: #0550ae; }
.muted { color: var(--muted); } .warn { color: var(--warn); font-weight: 600; } .ok { color: var(--ok); }
.box { border: 1px solid var(--line); border-radius: 6px; padding: 0.6rem 0.9rem; background: var(--band); }
.scroll { overflow: auto; max-height: 32rem; border: 1px solid var(--line); border-radius: 6px; }
table { border-collapse: collapse; font-size: 12.5px; width: max-content; min-width: 100%; }
th, td { border-bottom: 1px solid var(--line); padding: 0.2rem 0.55rem; text-align: left; vertical-align: top; }
th { background: var(--band); position: sticky; top: 0; z-index: 1; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
table.kv { width: 100%; min-width: 0; table-layout: fixed; } table.kv th { position: static; width: 14rem; }
table.kv td { overflow-wrap: anywhere; }
figure { margin: 0.6rem 0 1.2rem; } figcaption { font-size: 12.5px; color: var(--muted); }
figure.strip img { max-width: none; } figure.strip { overflow-x: auto; }
img { max-width: 100%; height: auto; display: block; }
.sig { font-weight: 600; }
"""


# ===================================================================== small HTML helpers
def _esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _fmt(value: Any, column: str = "") -> str:
    if value is None:
        return ""
    if isinstance(value, (float, np.floating)):
        v = float(value)
        if not math.isfinite(v):
            return ""
        if column in ("p_value", "q_value", "p_min_attainable", "ttest_p"):
            return "<0.001" if v < 0.001 else f"{v:.3g}"
        if column in ("count", "parent_count", "n_pairs", "n_nonzero", "n_excluded", "day", "bh_m") and v.is_integer():
            return f"{int(v)}"
        return f"{v:.4g}"
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    return str(value)


def _table(frame: pd.DataFrame, columns: Sequence[str], table_id: str, caption: str = "") -> str:
    cols = [c for c in columns if c in frame.columns]
    head = "".join(f"<th scope=\"col\">{_esc(c)}</th>" for c in cols)
    body = []
    numeric = {c for c in cols if pd.api.types.is_numeric_dtype(frame[c])}
    for row in frame[cols].itertuples(index=False, name=None):
        cells = []
        for c, v in zip(cols, row):
            text = _esc(_fmt(v, c))
            cls = ' class="num"' if c in numeric else ""
            if c == "q_value" and isinstance(v, float) and math.isfinite(v) and v < 0.05:
                cls = ' class="num sig"'
            cells.append(f"<td{cls}>{text}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    cap = f"<caption class=\"muted\">{_esc(caption)}</caption>" if caption else ""
    return (f'<div class="scroll"><table id="{table_id}">{cap}<thead><tr>{head}</tr></thead>'
            f"<tbody>{''.join(body)}</tbody></table></div>")


def _kv(rows: Sequence[tuple[str, Any]], table_id: str) -> str:
    body = "".join(f"<tr><th scope=\"row\">{_esc(k)}</th><td>{_esc(v)}</td></tr>" for k, v in rows)
    return f'<table class="kv" id="{table_id}"><tbody>{body}</tbody></table>'


def _img(png: bytes, alt: str, img_id: str = "") -> str:
    from struct import unpack

    width, height = unpack(">II", png[16:24])  # IHDR
    data = base64.b64encode(png).decode("ascii")
    ident = f' id="{img_id}"' if img_id else ""
    return (f'<img{ident} src="data:image/png;base64,{data}" width="{width}" height="{height}" '
            f'alt="{_esc(alt)}">')


def _message(text: str, cls: str = "muted") -> str:
    return f'<p class="{cls}">{_esc(text)}</p>'


def _read_table(path: Path) -> pd.DataFrame | None:
    if not path.is_file():
        return None
    try:
        return pd.read_csv(path, dtype=str, keep_default_na=False)
    except (OSError, ValueError, pd.errors.ParserError, pd.errors.EmptyDataError) as e:
        log.warning("%s: cannot be read (%s)", path, e)
        return None


# ===================================================================== the report
def build_report(
    results: str | Path,
    *,
    stats: str | Path | None = None,
    fcs_dir: str | Path | None = None,
    populations: Sequence[str] | None = None,
    thumbnails: bool = True,
) -> str:
    """Build the self-contained HTML report of a ``gate`` results folder.

    Parameters
    ----------
    results
        The output folder of ``immunoprofile gate``.
    stats
        The output folder of ``immunoprofile compare``; without it the paired
        statistics are computed now with :func:`immunoprofile.compare.compare_timepoints`
        over every timepoint (ordered by day; each compared with the first).
    fcs_dir
        Where the FCS files are, when they moved since gating (for the thumbnails).
    populations
        Populations of the longitudinal plots (default all).
    thumbnails
        Draw the gating thumbnails (reads every FCS file again).

    Returns
    -------
    str
        The HTML page.

    Raises
    ------
    ResultsError
        If ``results`` is not a results folder with a populations table.
    """
    from .results import load_populations

    folder = Path(results)
    frame = load_populations(folder, require_metadata=False)
    manifest = _manifest(folder / "manifest.json")
    sections: list[tuple[str, str, str]] = [
        ("summary", "Run summary and provenance", _summary(folder, manifest, frame, stats)),
        ("qc", "Failures and QC findings", _qc(folder)),
        ("gating", "Gating per sample", _gating(folder, fcs_dir) if thumbnails
         else _message("Gating thumbnails were not drawn (--no-thumbnails).")),
        ("populations", "Populations", _populations(frame)),
        ("paired-statistics", "Paired statistics", _paired(frame, stats)),
        ("longitudinal", "Longitudinal plots", _longitudinal(frame, populations)),
    ]
    toc = "".join(f'<li><a href="#{sid}">{_esc(title)}</a></li>' for sid, title, _ in sections)
    body = "\n".join(f'<section id="{sid}">\n<h2>{_esc(title)}</h2>\n{content}\n</section>'
                     for sid, title, content in sections)
    title = f"immunoprofile report: {folder.name or folder}"
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            f"<meta http-equiv=\"Content-Security-Policy\" content=\"{CSP}\">\n"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
            f"<meta name=\"generator\" content=\"immunoprofile {_esc(__version__)}\">\n"
            f"<title>{_esc(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n"
            f"<header><h1>{_esc(title)}</h1>"
            f"<p class=\"muted\">Results folder <code>{_esc(folder)}</code>; report by immunoprofile "
            f"{_esc(__version__)}. Self-contained: nothing in this page is fetched from the network.</p>"
            f"<nav><ol>{toc}</ol></nav></header>\n<main>\n{body}\n</main>\n</body>\n</html>\n")


def _manifest(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        log.warning("%s: cannot be read (%s)", path, e)
        return {}


def _summary(folder: Path, manifest: dict[str, Any], frame: pd.DataFrame, stats: str | Path | None) -> str:
    from .plots import timepoint_order
    from .report import sha256_file

    if not manifest:
        head = _message(f"{folder / 'manifest.json'} is missing or unreadable: provenance unknown.", "warn")
    else:
        head = ""
    s = manifest.get("summary", {})
    stained = frame[frame["control"] == ""] if "control" in frame.columns else frame
    pop_file = folder / "populations.csv"
    run = manifest.get("run", {}) if isinstance(manifest.get("run"), dict) else {}
    rows: list[tuple[str, Any]] = [
        ("files gated (samples and FMO controls)",
         s.get("succeeded", s.get("ok", stained["sample_id"].nunique()))),
        ("stained samples in the results", stained["sample_id"].nunique()),
        ("samples failed", s.get("failed", "unknown")),
        ("FMO controls", s.get("controls", "unknown")),
        ("events", f"{s['events']:,}" if isinstance(s.get("events"), int) else "unknown"),
        ("patients", stained["patient_id"].replace("", np.nan).nunique()),
        ("timepoints", ", ".join(timepoint_order(stained)) if stained["timepoint"].ne("").any() else ""),
        ("populations", stained["population"].nunique()),
        ("program", manifest.get("program", "")),
        ("command line", shlex.join(manifest.get("command_line", [])) if manifest.get("command_line") else ""),
        ("run id", manifest.get("run_id", "")),
        ("started (UTC)", manifest.get("started_utc", "")),
        ("finished (UTC)", manifest.get("finished_utc", "")),
        ("wall time", f"{run['wall_seconds']:.1f} s" if isinstance(run.get("wall_seconds"), (int, float)) else ""),
        ("user", manifest.get("user", "")),
        ("host", manifest.get("host", "")),
        ("platform", manifest.get("platform", "")),
        ("populations.csv sha256", sha256_file(pop_file) if pop_file.is_file() else ""),
        ("statistics", f"paired_stats.csv from {stats}" if stats else
         "computed for this report by immunoprofile.compare (Wilcoxon signed-rank, Benjamini-Hochberg)"),
    ]
    out = [head, _kv([(k, v) for k, v in rows if v != ""], "run-summary")]
    templates = manifest.get("templates", [])
    if templates:
        out.append("<h3>Templates</h3>")
        out.append(_table(pd.DataFrame(templates), ("name", "version", "panel", "sha256", "source"),
                          "templates-table"))
    versions = manifest.get("versions", {})
    options = manifest.get("options", {})
    if versions or options:
        out.append("<h3>Software and options</h3>")
        out.append(_kv([("versions", ", ".join(f"{k} {v}" for k, v in sorted(versions.items())))]
                       + [(f"option {k}", json.dumps(v) if not isinstance(v, str) else v) for k, v in options.items()],
                       "software-table"))
    inputs = manifest.get("inputs", [])
    if inputs:
        table = pd.DataFrame(inputs)
        out.append(f"<details><summary>Input files ({len(inputs)}) with their sha256</summary>")
        out.append(_table(table, ("role", "sample_id", "file", "path", "events", "status", "sha256"), "inputs-table"))
        out.append("</details>")
    return "\n".join(x for x in out if x)


def _qc(folder: Path) -> str:
    out = []
    failures = _read_table(folder / "failures.csv")
    out.append("<h3>Failures</h3>")
    if failures is None:
        out.append(_message("failures.csv is missing.", "warn"))
    elif failures.empty:
        out.append(_message("No sample failed.", "ok"))
    else:
        out.append(_message(f"{len(failures)} sample(s) could not be processed:", "warn"))
        out.append(_table(failures, ("sample_id", "file", "stage", "code", "message"), "failures-table"))
    findings = _read_table(folder / "findings.csv")
    out.append("<h3>QC findings</h3>")
    if findings is None:
        out.append(_message("findings.csv is missing.", "warn"))
    elif findings.empty:
        out.append(_message("No findings.", "ok"))
    else:
        counts = findings.groupby(["code", "severity"], sort=True).size().reset_index(name="samples")
        out.append(_table(counts, ("code", "severity", "samples"), "findings-summary-table"))
        out.append(_table(findings, ("sample_id", "code", "severity", "message"), "findings-table"))
    return "\n".join(out)


def _gating(folder: Path, fcs_dir: str | Path | None) -> str:
    from .plots import GatingRecords, figure_bytes, gates_figure

    try:
        records = GatingRecords(folder, fcs_dir=fcs_dir)
    except ImmunoprofileError as e:
        return _message(f"Gating thumbnails not available: {e}", "warn")
    out = [_message("Each strip shows a sample's gates as recorded in gates.csv, drawn on its events (parent "
                    "population, transformed axes); the percentage is of the parent. Dashed vermillion lines are "
                    "thresholds from FMO controls. Full-size plots: immunoprofile plot gates RESULTS --out DIR.")]
    for sid in records.sample_ids:
        try:
            view = records.sample(sid)
        except ImmunoprofileError as e:
            out.append(f'<figure class="strip"><figcaption class="warn">{_esc(sid)}: not drawn: {_esc(e)}'
                       "</figcaption></figure>")
            continue
        png = figure_bytes(gates_figure(view, thumbnail=True), "png", dpi=THUMBNAIL_DPI)
        warn = (f' <span class="warn">differs from populations.csv: {_esc("; ".join(view.mismatches))}</span>'
                if view.mismatches else "")
        out.append(f'<figure class="strip" id="gates-{_esc(sid)}">{_img(png, f"gates of {sid}")}'
                   f"<figcaption>{_esc(view.title)}{warn}</figcaption></figure>")
    return "\n".join(out)


def _populations(frame: pd.DataFrame) -> str:
    table = frame.copy()
    note = (f"{len(table)} rows: one per sample and population (FMO controls are not in this table). "
            "All columns are in populations.csv.")
    return _message(note) + _table(table, POPULATION_TABLE_COLUMNS, "populations-table")


def _stats_tables(frame: pd.DataFrame, stats: str | Path | None) -> tuple[pd.DataFrame, str]:
    from .plots import load_paired_stats, timepoint_order

    if stats is not None:
        return load_paired_stats(stats), f"From {Path(stats) / 'paired_stats.csv'}."
    from .compare import compare_timepoints
    from .results import check_metadata

    check_metadata(frame)
    stained = frame[frame["control"] == ""] if "control" in frame.columns else frame
    order = timepoint_order(stained)
    if len(order) < 2:
        raise ImmunoprofileError(f"the results have one timepoint ({', '.join(order)}); nothing to compare")
    result = compare_timepoints(frame, order)
    text = (f"Computed for this report: immunoprofile compare RESULTS --timepoints {','.join(result.timepoints)} "
            "(each timepoint against the first; Wilcoxon signed-rank, Benjamini-Hochberg q within each measure).")
    return result.paired, text


def _paired(frame: pd.DataFrame, stats: str | Path | None) -> str:
    from .plots import figure_bytes, heatmap_figure

    try:
        table, source = _stats_tables(frame, stats)
    except ImmunoprofileError as e:
        return _message(f"No paired statistics: {e}", "warn")
    out = [_message(source + " Rows with q < 0.05 are in bold. Patients left out and why: the 'excluded' column "
                    "of paired_stats.csv."),
           _table(table, PAIRED_TABLE_COLUMNS, "paired-stats-table")]
    within = table[(table["analysis"] == "within") & (table["group"] == "all")]
    for pre, post in list(dict.fromkeys(zip(within["pre"], within["post"])))[:3]:
        measure = "pct_parent" if (within["measure"] == "pct_parent").any() else str(within["measure"].iloc[0])
        try:
            fig = heatmap_figure(frame, pre, post, measure=measure)
        except ImmunoprofileError as e:
            out.append(_message(f"No heatmap for {post} vs {pre}: {e}", "warn"))
            continue
        out.append(f'<figure>{_img(figure_bytes(fig, "png", dpi=PLOT_DPI), f"fold change {post} vs {pre}")}'
                   f"<figcaption>log2 fold change of {measure}, {post} vs {pre}, per patient (blue: fall, red: rise; "
                   "grey: missing)</figcaption></figure>")
    return "\n".join(out)


def _longitudinal(frame: pd.DataFrame, populations: Sequence[str] | None) -> str:
    from .plots import figure_bytes, longitudinal_figure

    if "control" in frame.columns:
        frame = frame[frame["control"] == ""]
    out = []
    panels = list(dict.fromkeys(frame["panel"])) or [""]
    for panel in panels:
        sub = frame[frame["panel"] == panel]
        pops = list(dict.fromkeys(sub["population"]))
        if populations:
            pops = [p for p in pops if p in set(populations)]
            if not pops:
                continue
        try:
            fig = longitudinal_figure(sub, pops)
        except ImmunoprofileError as e:
            out.append(_message(f"panel {panel or '(none)'}: no plot: {e}", "warn"))
            continue
        name = f"panel {panel}" if panel else "all populations"
        out.append(f"<h3>{_esc(name)}</h3>")
        out.append(f'<figure>{_img(figure_bytes(fig, "png", dpi=PLOT_DPI), f"trajectories, {name}")}'
                   "<figcaption>% of parent per patient over time, coloured by response group; dashed: group "
                   "median.</figcaption></figure>")
    if not out:
        return _message("No population to plot.", "warn")
    return "\n".join(out)
