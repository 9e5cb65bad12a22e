"""A short, readable text summary of a comparison (what ``immunoprofile compare`` prints).

Pure formatting of a :class:`~immunoprofile.compare.CompareResult`: per measure,
comparison and group a table of populations with n, median change, p and q,
and the plain-language notes as numbered footnotes (a note shared by many rows,
such as "n=4: smallest attainable p is 0.125", is printed once).
"""

from __future__ import annotations

import math
from typing import Any

import pandas as pd

from .compare import (ALL_PATIENTS, ANALYSIS_BETWEEN, ANALYSIS_WITHIN, NOTE_SEPARATOR, SCOPE_ALL, CompareResult)
from .compare_pairs import EVERY

MAX_EXCLUSION_LINES = 12


def _num(x: Any) -> str:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return str(x)
    if not math.isfinite(v):
        return "-"
    return f"{v:.3g}"


def _p(x: Any) -> str:
    v = float(x)
    if not math.isfinite(v):
        return "-"
    return "<0.001" if v < 0.001 else f"{v:.3f}"


class _Footnotes:
    def __init__(self) -> None:
        self.items: dict[str, int] = {}

    def refs(self, note: str) -> str:
        if not isinstance(note, str) or not note:
            return ""
        out = []
        for part in note.split(NOTE_SEPARATOR):
            if part not in self.items:
                self.items[part] = len(self.items) + 1
            out.append(f"[{self.items[part]}]")
        return "".join(out)

    def lines(self) -> list[str]:
        return [f"  [{i}] {text}" for text, i in self.items.items()]


def _table(header: list[str], rows: list[list[str]], right: set[int]) -> list[str]:
    widths = [max(len(header[c]), *(len(r[c]) for r in rows)) if rows else len(header[c]) for c in range(len(header))]

    def fmt(cells: list[str]) -> str:
        return "  " + "  ".join(c.rjust(w) if i in right else c.ljust(w)
                                for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    return [fmt(header)] + [fmt(r) for r in rows]


def format_summary(result: CompareResult) -> str:
    """The text summary of a comparison.

    Parameters
    ----------
    result
        What :func:`immunoprofile.compare.compare_timepoints` returned.

    Returns
    -------
    str
        Several lines, ending with a newline.

    Raises
    ------
    None
    """
    notes = _Footnotes()
    paired = result.paired
    lines: list[str] = []
    tps = result.timepoints
    if len(tps) == 2:
        lines.append(f"paired comparison within patients: {tps[1]} vs {tps[0]} (change = {tps[1]} - {tps[0]})")
    else:
        lines.append(f"longitudinal comparison within patients over {', '.join(tps)} (baseline {tps[0]})")
    lines.append("test: Wilcoxon signed-rank (exact when n and ties allow); estimate: Hodges-Lehmann; "
                 "q: Benjamini-Hochberg over the populations of each measure and group")
    for note in result.notes:
        lines.append(f"note: {note}")
    for (measure, comparison, analysis, group), block in paired.groupby(
            ["measure", "comparison", "analysis", "group"], sort=False):
        lines.append("")
        if analysis == ANALYSIS_WITHIN:
            who = "all patients" if group == ALL_PATIENTS else f"group {group}"
            lines.append(f"{measure}, {comparison}, {who}")
            header = ["panel", "population", "n", "median pre", "median post", "change", "p", "q", "notes"]
            rows = [[r.panel, r.population, str(r.n_pairs), _num(r.median_pre), _num(r.median_post),
                     _num(r.estimate if math.isfinite(r.estimate) else r.median_difference), _p(r.p_value),
                     _p(r.q_value), notes.refs(r.note)] for r in block.itertuples(index=False)]
            lines += _table(header, rows, right={2, 3, 4, 5, 6, 7})
        elif analysis == ANALYSIS_BETWEEN:
            a, b = str(group).split(" vs ", 1)
            lines.append(f"{measure}, {comparison}, change in {a} vs change in {b} (Mann-Whitney)")
            header = ["panel", "population", f"n {a}", f"n {b}", "difference", "p", "q", "notes"]
            rows = [[r.panel, r.population, _num(r.n_a), _num(r.n_b),
                     _num(r.estimate if math.isfinite(r.estimate) else r.median_difference), _p(r.p_value),
                     _p(r.q_value), notes.refs(r.note)] for r in block.itertuples(index=False)]
            lines += _table(header, rows, right={2, 3, 4, 5, 6})
    lines += _longitudinal_lines(result.longitudinal, notes)
    if notes.items:
        lines.append("")
        lines.append("notes:")
        lines += notes.lines()
    lines += _exclusion_lines(result.exclusions)
    lines.append("")
    lines.append("'change' is the Hodges-Lehmann estimate of post - pre (median difference when no test was run); "
                 "see paired_stats.csv for intervals and the logit t-test")
    return "\n".join(lines) + "\n"


def _longitudinal_lines(long: pd.DataFrame, notes: _Footnotes) -> list[str]:
    if long.empty:
        return []
    out: list[str] = []
    first = long[long["timepoint_index"] == 0]
    for (measure, group), block in first.groupby(["measure", "group"], sort=False):
        out.append("")
        who = "all patients" if group == ALL_PATIENTS else f"group {group}"
        out.append(f"{measure}, over all timepoints, {who} (Friedman on the patients seen at every timepoint; "
                   f"within-patient model)")
        header = ["panel", "population", "n complete", "Friedman p", "q", "model p", "q", "notes"]
        rows = [[r.panel, r.population, str(r.n_complete), _p(r.friedman_p), _p(r.friedman_q), _p(r.model_p),
                 _p(r.model_q), notes.refs(r.note)] for r in block.itertuples(index=False)]
        out += _table(header, rows, right={2, 3, 4, 5, 6})
    return out


def _exclusion_lines(excl: pd.DataFrame) -> list[str]:
    if excl.empty:
        return ["", "excluded: none"]
    out = ["", f"excluded ({len(excl)} entr{'y' if len(excl) == 1 else 'ies'}; all in exclusions.csv):"]
    shown = excl.head(MAX_EXCLUSION_LINES)
    for r in shown.itertuples(index=False):
        what = "" if r.population == EVERY else f" {r.population}"
        scope = "" if r.scope == SCOPE_ALL else f" [{r.scope}]"
        measure = "" if r.measure == EVERY else f" {r.measure}"
        out.append(f"  {r.patient_id} ({r.panel}{what}{measure}, {r.comparison}){scope}: {r.reason}")
    if len(excl) > len(shown):
        out.append(f"  ... and {len(excl) - len(shown)} more")
    return out
