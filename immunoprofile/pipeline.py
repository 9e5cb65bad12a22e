"""One sample through the pipeline: read -> compensate/transform -> gate -> tidy rows.

Pure with respect to outputs: functions return rows; :mod:`immunoprofile.batch`
decides what runs and :mod:`immunoprofile.report` writes files.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from . import panel
from .errors import Finding, MarkerError
from .fcs import FcsSample, read_fcs
from .gating import FmoKey, FmoValue, fmo_threshold, gate_events, population_index, prepare
from .stats import gate_rows, intensity_rows, population_rows
from .templates import Template, gate_thresholds


@dataclass
class SampleOutput:
    """Everything one sample contributes to the results."""

    sample_id: str
    populations: list[dict[str, Any]] = field(default_factory=list)
    intensities: list[dict[str, Any]] = field(default_factory=list)
    gates: list[dict[str, Any]] = field(default_factory=list)
    findings: list[dict[str, Any]] = field(default_factory=list)
    n_events: int = 0
    file_sha256: str = ""


@dataclass(frozen=True)
class Options:
    """Per-run options that change results (part of the cache key)."""

    compensation: tuple[tuple[str, ...], tuple[tuple[float, ...], ...]] | None = None
    dataset: int = 0
    require_fmo: bool = False
    intensity_markers: str = "template"  # 'template' | 'all'

    def compensation_matrix(self) -> tuple[tuple[str, ...], np.ndarray] | None:
        if self.compensation is None:
            return None
        return self.compensation[0], np.asarray(self.compensation[1], dtype=np.float64)


def _finding_rows(sample_id: str, findings: list[Finding]) -> list[dict[str, Any]]:
    seen = set()
    out = []
    for f in findings:
        key = (f.code, f.message)
        if key in seen:
            continue
        seen.add(key)
        out.append({"sample_id": sample_id, "code": f.code, "severity": f.severity, "message": f.message})
    return out


def fmo_marker(control: str) -> str:
    """The marker of an FMO control label ``'FMO:PD-1'`` -> ``'PD-1'``."""
    return control.split(":", 1)[1].strip()


def template_marker_for(template: Template, control: str) -> str | None:
    """The template's spelling of the marker an FMO control omits, or None if the template does not use it."""
    want = panel.canonical(fmo_marker(control))
    for m in template.fmo_markers():
        if panel.canonical(m) == want:
            return m
    return None


def fmo_parents(template: Template, marker: str) -> list[str]:
    """Parent populations of the gates that take ``marker``'s threshold from an FMO."""
    out: list[str] = []
    for p in template.populations:
        g = p.gate
        ths = gate_thresholds(g)
        for t in ths:
            if t.method == "fmo" and t.marker == marker and p.parent not in out:
                out.append(p.parent)
    return out


def channel_hints(sample: FcsSample, template: Template) -> dict[str, str]:
    """Marker -> ``$PnN`` for the template's FMO markers, as labelled in a stained sample."""
    hints = {}
    for m in template.fmo_markers():
        try:
            hints[m] = sample.channels[panel.resolve_marker(m, sample.channels, sample.markers)]
        except MarkerError:
            continue
    return hints


def process_control(
    sample_id: str,
    path: str,
    control: str,
    template: Template,
    options: Options,
    hints: Mapping[str, str] | None,
) -> tuple[dict[FmoKey, FmoValue], SampleOutput]:
    """Gate an FMO control up to the parents of its marker's gates and derive the thresholds.

    Raises
    ------
    ImmunoprofileError
        If the control cannot be read or gated.
    """
    marker = template_marker_for(template, control)
    out = SampleOutput(sample_id)
    if marker is None:
        return {}, out
    sample = read_fcs(path, dataset=options.dataset)
    out.n_events, out.file_sha256 = sample.n_events, sample.sha256
    data = prepare(sample, template, compensation=options.compensation_matrix(), channel_hints=hints)
    parents = fmo_parents(template, marker)
    result = gate_events(data, only=set(parents))
    values: dict[FmoKey, FmoValue] = {}
    pct = _fmo_percentile(template, marker)
    for parent in parents:
        v = data.values_at(marker, population_index(result, parent))
        values[(marker, parent)] = FmoValue(fmo_threshold(v, pct), sample_id, int(v.size))
        if v.size < 100:
            result.findings.append(Finding("FMO_FEW_EVENTS", f"FMO control has only {v.size} events in {parent!r}; "
                                           f"its {pct}th percentile is imprecise"))
    out.gates = gate_rows(result, template, sample_id)
    for (mk, parent), fv in values.items():
        out.gates.append({
            "sample_id": sample_id, "population": f"FMO {mk} threshold", "parent": parent, "gate_type": "range",
            "method": f"fmo_percentile_{pct:g}", "x_marker": mk, "x_channel": data.channel(mk),
            "x_transform": data.transforms[mk].kind,
            "coordinates": f'{{"{mk}": [{fv.value!r}, null]}}', "fmo_sample_id": sample_id,
            "n_fit_events": fv.n_events, "y_marker": "", "y_channel": "", "y_transform": "",
            "template": template.name, "template_version": template.version, "template_sha256": template.sha256,
        })
    out.findings = _finding_rows(sample_id, result.findings + list(sample.findings))
    return values, out


def _fmo_percentile(template: Template, marker: str) -> float:
    for p in template.populations:
        g = p.gate
        ths = gate_thresholds(g)
        for t in ths:
            if t.method == "fmo" and t.marker == marker:
                return t.percentile
    return 99.5


def process_sample(
    sample_id: str,
    path: str,
    meta: Mapping[str, Any],
    template: Template,
    options: Options,
    fmo: Mapping[FmoKey, FmoValue] | None = None,
    fmo_available: bool = False,
    extra_columns: tuple[str, ...] = (),
) -> SampleOutput:
    """Read, compensate, transform and gate one stained sample; return its rows.

    Raises
    ------
    ImmunoprofileError
        If the sample cannot be read or gated (the batch records it as a failure).
    """
    sample = read_fcs(path, dataset=options.dataset)
    return gate_sample(sample, sample_id, meta, template, options, fmo, fmo_available, extra_columns)


def gate_sample(
    sample: FcsSample,
    sample_id: str,
    meta: Mapping[str, Any],
    template: Template,
    options: Options,
    fmo: Mapping[FmoKey, FmoValue] | None = None,
    fmo_available: bool = False,
    extra_columns: tuple[str, ...] = (),
) -> SampleOutput:
    """:func:`process_sample` on an already-read sample."""
    from .errors import ControlMissingError

    if getattr(template, "external", False):
        return _gate_external(sample, sample_id, meta, template, extra_columns)
    extra_markers: tuple[str, ...] = ()
    if options.intensity_markers == "all":
        extra_markers = tuple(m for m in sample.markers if m)
    data = prepare(sample, template, compensation=options.compensation_matrix(), extra_markers=extra_markers)
    if options.require_fmo:
        have = {k[0] for k in (fmo or {})}
        missing = [m for m in template.fmo_markers() if m not in have]
        if missing:
            raise ControlMissingError(f"no FMO control for {', '.join(missing)} in batch {meta.get('batch', '')!r}, "
                                      f"panel {meta.get('panel', '')!r}", path=sample.path,
                                      hint="add FMO:<marker> rows for this batch to the sheet, or drop --require-fmo")
    result = gate_events(data, fmo=fmo, fmo_available=fmo_available)
    out = SampleOutput(sample_id, n_events=sample.n_events, file_sha256=sample.sha256)
    out.populations = population_rows(result, template, {**meta, "sample_id": sample_id}, sample.sha256,
                                      extra_columns)
    result.release_masks()  # the intensities need only the event numbers: less memory at the peak
    markers = [m for m in template.markers if m not in ()]
    markers = [m for m in (*markers, *extra_markers) if not _is_scatter(data, m)]
    markers = list(dict.fromkeys(markers))
    out.intensities = intensity_rows(result, data, markers, sample_id)
    out.gates = gate_rows(result, template, sample_id)
    out.findings = _finding_rows(sample_id, result.findings + list(sample.findings))
    return out


def _is_scatter(data, marker: str) -> bool:
    from .gating import is_scatter

    return is_scatter(marker, data.channel(marker))


def _gate_external(sample: FcsSample, sample_id: str, meta: Mapping[str, Any], template: Any,
                   extra_columns: tuple[str, ...]) -> SampleOutput:
    """Gate with a GatingML/FlowJo template through FlowKit (see :mod:`immunoprofile.interop`)."""
    from .gating import GatingResult

    masks, gates, findings = template.gate(sample)
    result = GatingResult(masks, gates, list(findings))
    out = SampleOutput(sample_id, n_events=sample.n_events, file_sha256=sample.sha256)
    out.populations = population_rows(result, template, {**meta, "sample_id": sample_id}, sample.sha256,
                                      extra_columns)
    out.gates = gate_rows(result, template, sample_id)
    out.findings = _finding_rows(sample_id, result.findings + list(sample.findings))
    return out
