"""Synthetic clinical immune-monitoring cohorts with known truth.

A cohort is ``patients`` x ``timepoints`` x ``panels`` FCS 3.1 files (the T-cell
exhaustion panel ``t_cell`` and the NK inhibitory-receptor panel ``nk``), plus, per
batch (= timepoint) and panel, one FMO control per dim marker (PD1, LAG3, TIM3;
LIR1, CD57, NKG2A), a ``samplesheet.csv`` and a ``truth.csv`` of the true count and
fraction of parent of every population, counted from the label the simulator gave
each event. See ``docs/simulator.md`` for the file formats.

Effect model (``--effect-size`` multiplies every planted shift; 0 is a true null)
--------------------------------------------------------------------------------
Each patient has a baseline on the logit (or log-ratio/log) scale of every
frequency: population mean + a patient random effect (SD 0.3-0.7, large) shared by
all of the patient's timepoints (so timepoints are correlated within a patient),
plus an independent patient x timepoint deviation (SD 0.25 logit). Groups are
assigned round-robin: P01 responder, P02 stable, P03 progressive, P04 responder ...

At effect size 1, ``post_clofarabine`` vs ``pre`` (logit shifts unless noted):

===================  =====================================================
all patients         lymphocyte share of cells -0.9, debris +0.5, dead +0.8,
                     log(B/T) -1.0, log(NK/T) +0.5, CD56bright share +0.6,
                     log(lymphocytes per ul) -1.5 (x0.22: clofarabine depletes)
responder            CD4 PD1+ -1.0; CD4 TIM3|PD1+ -0.6; CD4 LAG3|PD1+ -0.6;
                     CD8 PD1+ -0.6; CD8 TIM3|PD1+ -0.5; CD8 LAG3|PD1+ -0.5;
                     NK CD57+ (CD56dim) -0.8; LIR1|CD57+ -0.8; NKG2A|CD57- +0.3
stable               0.6 x the responder shifts
progressive          none
===================  =====================================================

``post_lenalidomide``: 0.4 x the "all" shifts (partial recovery), 0.5 x the group's
clofarabine shifts, plus a patient-specific N(0, 0.6) logit shift of every T/NK
marker frequency (N(0, 0.2) for progressors): the markers move variably.
For a median responder, CD4 PD1+ goes from 25% to about 11% of CD4 T cells.

Determinism: every random draw comes from a SeedSequence stream keyed by
``(seed, domain, patient, timepoint, panel)``; the same arguments give the same
bytes, and :func:`cohort_truth` reproduces the counts of ``truth.csv`` without
making events.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import date, timedelta
from pathlib import Path

import numpy as np

from .errors import AbortedError, UsageError
from .fcs import fcs_bytes, write_fcs
from .report import fsync_dir
from .simulate_events import EXTRA_CHANNELS, make_events
from .simulate_model import (
    DEFAULT_TIMEPOINTS, FMO_MARKERS, GROUPS, PANELS, POPULATIONS, CohortDesign, SampleSpec, cohort_truth,
    design_cohort, fmo_specs, group_of, pool_frequencies, sample_frequencies, spec_counts, stained_specs,
)

__all__ = ["SimulatedSample", "CohortFiles", "simulate_sample", "simulate_cohort", "cohort_truth",
           "truth_rows", "PANELS", "GROUPS", "FMO_MARKERS", "DEFAULT_TIMEPOINTS", "EXTRA_CHANNELS",
           "SHEET_COLUMNS", "TRUTH_CSV_COLUMNS"]

log = logging.getLogger(__name__)

SHEET_COLUMNS = ("sample_id", "file", "patient_id", "timepoint", "day", "group", "panel", "batch", "control",
                 "lymphocytes_per_ul")
TRUTH_CSV_COLUMNS = ("sample_id", "population", "parent", "count", "parent_count", "fraction")
#: first acquisition day (day 0 of the trial); batch dates are this plus the timepoint's day
START_DATE = date(2025, 1, 6)
CYTOMETER = "LSRFortessa (immunoprofile simulator)"
_MONTHS = ("JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC")
_OWN_FILES = ("truth.csv", "simulation.json", "samplesheet.csv")  # the sheet is published last


@dataclass(frozen=True)
class SimulatedSample:
    """One simulated FCS file and its truth.

    Attributes
    ----------
    sample_id
        ``'P01_pre_t_cell'``, or ``'B1_t_cell_FMO_PD1'`` for an FMO control.
    events
        float32 event matrix, ``(n_events, n_channels)``, uncompensated, as written to the file.
    channels, markers
        ``$PnN`` and ``$PnS`` of each column (``''`` where the file has no ``$PnS``).
    spillover
        ``(fluorescence channel names, matrix)``: exactly the file's ``$SPILLOVER``.
    membership
        Population name -> boolean array over events (the truth).
    labels
        Per-event labels: ``cell_type`` (codes into ``CELL_TYPES``: debris, monocyte, T, B, NK),
        ``t_subset`` (CD4, CD8, DP, DN; -1), ``t_pattern`` (bits PD1=1, LAG3=2, TIM3=4),
        ``bright`` (CD56bright), ``nk_pattern`` (bits CD57=1, LIR1=2, NKG2A=4), ``dead``, ``doublet``.
    keywords
        Extra FCS keywords written to the file (``$CYT``, ``$DATE``, ``$FIL`` ...).
    """

    sample_id: str
    panel: str
    patient_id: str
    group: str
    timepoint: str
    day: int
    batch: str
    control: str | None
    lymphocytes_per_ul: int | None
    events: np.ndarray
    channels: tuple[str, ...]
    markers: tuple[str, ...]
    spillover: tuple[tuple[str, ...], np.ndarray]
    membership: Mapping[str, np.ndarray]
    labels: Mapping[str, np.ndarray]
    keywords: Mapping[str, str]

    @property
    def file_name(self) -> str:
        return f"{self.sample_id}.fcs"

    def fcs_bytes(self) -> bytes:
        """The FCS 3.1 file's bytes."""
        return fcs_bytes(self.events, self.channels, self.markers, spillover=self.spillover,
                         keywords=self.keywords)

    def truth(self) -> list[tuple[str, str, int, int]]:
        """``(population, parent, count, parent_count)`` counted from :attr:`membership`, sorted."""
        return truth_rows(self.membership, self.panel, self.events.shape[0])


def truth_rows(membership: Mapping[str, np.ndarray], panel: str, n_events: int) -> list[tuple[str, str, int, int]]:
    """Count each population of ``panel`` and its parent from per-event membership."""
    counts = {name: int(np.count_nonzero(m)) for name, m in membership.items()}
    counts["root"] = int(n_events)
    return sorted((p.name, p.parent, counts[p.name], counts[p.parent]) for p in POPULATIONS[panel])


def _fcs_date(tp_day: int) -> str:
    d = START_DATE + timedelta(days=tp_day)
    return f"{d.day:02d}-{_MONTHS[d.month - 1]}-{d.year}"


def _clock(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600:02d}:{s // 60 % 60:02d}:{s % 60:02d}"


def _keywords(design: CohortDesign, spec: SampleSpec, seconds: float) -> dict[str, str]:
    tp = spec.timepoint
    start = 9 * 3600 + 30 * 60
    tube = f"FMO {spec.control}" if spec.control else {"t_cell": "T cell panel", "nk": "NK panel"}[spec.panel]
    return {
        "$CYT": CYTOMETER, "$CYTSN": "SIM-0001", "$DATE": _fcs_date(tp.day),
        "$BTIM": _clock(start), "$ETIM": _clock(start + seconds),
        "$FIL": f"{spec.sample_id}.fcs", "$SRC": spec.sample_id, "SAMPLE ID": spec.sample_id,
        "TUBE NAME": tube, "EXPERIMENT NAME": f"{tp.batch} {tp.name}", "$TIMESTEP": repr(0.01),
        "$COM": f"simulated by immunoprofile (seed {design.seed}, effect size {design.effect_size!r})",
    }


def _simulate_spec(design: CohortDesign, spec: SampleSpec) -> SimulatedSample:
    if spec.control is None:
        freq = sample_frequencies(design, spec.patient, spec.timepoint)
    else:
        freq = pool_frequencies(design, spec.timepoint)
    counts = spec_counts(design, spec, freq)
    ev = make_events(design, spec, freq, counts)
    fmo = spec.control is not None
    return SimulatedSample(
        sample_id=spec.sample_id, panel=spec.panel,
        patient_id="" if fmo else design.patient_id(spec.patient),
        group="" if fmo else group_of(spec.patient),
        timepoint=spec.timepoint.name, day=spec.timepoint.day, batch=spec.timepoint.batch,
        control=spec.control,
        lymphocytes_per_ul=None if fmo else int(round(freq.lymphocytes_per_ul)),
        events=ev.events, channels=ev.channels, markers=ev.markers, spillover=ev.spillover,
        membership=ev.membership, labels=ev.labels, keywords=_keywords(design, spec, ev.acquisition_seconds),
    )


def simulate_sample(
    panel: str = "t_cell",
    events: int = 10_000,
    *,
    patient: int = 0,
    timepoint: str = "pre",
    timepoints: Sequence[str] = DEFAULT_TIMEPOINTS,
    effect_size: float = 1.0,
    seed: int = 0,
    control: str | None = None,
    extra_channels: int = 0,
    n_patients: int | None = None,
) -> SimulatedSample:
    """Simulate one sample: a patient's stained tube, or a batch's FMO control.

    Gives exactly the events of the same file of :func:`simulate_cohort` called with
    the same ``seed``, ``events``, ``timepoints``, ``effect_size`` and ``extra_channels``
    (``n_patients`` only sets the width of the patient id, ``P01`` or ``P001``).

    Parameters
    ----------
    panel
        ``'t_cell'`` or ``'nk'``.
    patient
        0-based patient index (``P01`` is 0); ignored for an FMO control.
    timepoint
        One of ``timepoints``; for an FMO control, selects the batch.
    control
        A dim marker of the panel (``'PD1'``, ``'LAG3'``, ``'TIM3'``; ``'LIR1'``, ``'CD57'``,
        ``'NKG2A'``) to simulate that FMO control of the timepoint's batch.

    Raises
    ------
    UsageError
        If an argument is out of range or unknown.
    """
    if not isinstance(patient, (int, np.integer)) or isinstance(patient, bool) or patient < 0:
        raise UsageError(f"patient must be a 0-based index >= 0, got {patient!r}")
    design = design_cohort(n_patients or patient + 1, timepoints, events, (panel,), effect_size, seed,
                           extra_channels)
    if patient >= design.patients:
        raise UsageError(f"patient index {patient} is outside a cohort of {design.patients} patients")
    tp = design.timepoint(timepoint)
    if control is None:
        spec = SampleSpec(f"{design.patient_id(patient)}_{tp.name}_{panel}", panel, tp, patient=patient)
    else:
        if control not in FMO_MARKERS[panel]:
            raise UsageError(f"no FMO control for {control!r} in panel {panel!r}; "
                             f"choose from {', '.join(FMO_MARKERS[panel])}")
        spec = next(s for s in fmo_specs(design) if s.timepoint == tp and s.control == control)
    return _simulate_spec(design, spec)


# --------------------------------------------------------------------------- cohort
@dataclass(frozen=True)
class CohortFiles:
    """What :func:`simulate_cohort` wrote."""

    out_dir: Path
    design: CohortDesign
    files: tuple[str, ...]   # every file written, relative to out_dir
    n_samples: int
    n_controls: int


def _csv_text(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    w.writerows(rows)
    return buf.getvalue()


def _fraction(count: int, parent: int) -> str:
    return repr(count / parent) if parent > 0 else "NaN"


def _command(design: CohortDesign) -> str:
    """The command that regenerates the cohort (``DIR`` stands for the output folder)."""
    return (f"immunoprofile simulate --out DIR --patients {design.patients} "
            f"--timepoints {','.join(t.name for t in design.timepoints)} --events {design.events} "
            f"--panels {','.join(design.panels)} --effect-size {design.effect_size!r} --seed {design.seed}"
            + (f" --extra-channels {design.extra_channels}" if design.extra_channels else ""))


def _write_text(path: Path, text: str) -> None:
    with open(path, "w", encoding="utf-8", newline="") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())


def _previous_files(out: Path) -> set[str]:
    """FCS files listed by a previous cohort's sheet in ``out`` (replaced by ``--force``)."""
    sheet = out / "samplesheet.csv"
    if not sheet.is_file():
        return set()
    try:
        with open(sheet, newline="", encoding="utf-8") as fh:
            rows = list(csv.DictReader(fh))
    except (OSError, UnicodeDecodeError, csv.Error):
        return set()
    names = {r.get("file") or "" for r in rows}
    return {n for n in names if n.endswith(".fcs") and "/" not in n and "\\" not in n and not n.startswith(".")}


def simulate_cohort(
    out_dir: str | os.PathLike,
    patients: int = 8,
    timepoints: Sequence[str] = DEFAULT_TIMEPOINTS,
    events: int = 50_000,
    panels: Sequence[str] = PANELS,
    effect_size: float = 1.0,
    seed: int = 0,
    *,
    extra_channels: int = 0,
    force: bool = False,
) -> CohortFiles:
    """Simulate a cohort and write it to ``out_dir``.

    Writes ``<sample_id>.fcs`` for every stained sample and FMO control,
    ``samplesheet.csv``, ``truth.csv`` and ``simulation.json`` (the arguments). All
    files are made in a temporary sibling folder and published at the end: a new
    ``out_dir`` appears whole (one rename); into an existing folder the files are
    moved one by one (each atomically), the sample sheet last. An interrupted run
    leaves ``out_dir`` as it was.

    Parameters
    ----------
    force
        Allow an ``out_dir`` that is not empty: the cohort's files replace same-named
        files, FCS files listed by the folder's previous ``samplesheet.csv`` that the
        new cohort does not write are removed, and any other file is left alone.

    Raises
    ------
    UsageError
        If an option is out of range, ``out_dir`` is a file, or it is not empty and
        ``force`` is false.
    """
    design = design_cohort(patients, timepoints, events, panels, effect_size, seed, extra_channels)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise UsageError("exists and is not a folder", path=str(out), hint="choose a folder for --out")
    existing = out.is_dir()
    if existing and any(out.iterdir()) and not force:
        raise UsageError("the output folder is not empty", path=str(out),
                         hint="choose a new or empty folder, or pass --force to replace a simulated cohort in it")
    tmp = _make_temporary_folder(out, existing)
    specs = stained_specs(design) + fmo_specs(design)
    log.info("simulating %d samples and %d FMO controls, %d events each, into %s",
             len(stained_specs(design)), len(specs) - len(stained_specs(design)), design.events, out)
    try:
        sheet_rows: list[list[object]] = []
        truth: list[tuple[str, str, str, int, int, str]] = []
        for spec in specs:
            s = _simulate_spec(design, spec)
            write_fcs(tmp / s.file_name, s.events, s.channels, s.markers, spillover=s.spillover,
                      keywords=s.keywords)
            sheet_rows.append([s.sample_id, s.file_name, s.patient_id, s.timepoint, s.day, s.group, s.panel,
                               s.batch, f"FMO:{s.control}" if s.control else "",
                               "" if s.lymphocytes_per_ul is None else s.lymphocytes_per_ul])
            truth += [(s.sample_id, pop, parent, c, pc, _fraction(c, pc)) for pop, parent, c, pc in s.truth()]
            log.debug("simulated %s", s.sample_id)
        truth.sort()
        _write_text(tmp / "truth.csv", _csv_text(TRUTH_CSV_COLUMNS, truth))
        params = {
            "generator": "immunoprofile simulate",
            "command": _command(design),
            "patients": design.patients,
            "timepoints": [{"name": t.name, "day": t.day, "batch": t.batch, "phase": t.phase}
                           for t in design.timepoints],
            "events": design.events, "panels": list(design.panels), "effect_size": design.effect_size,
            "seed": design.seed, "extra_channels": design.extra_channels,
            "groups": {design.patient_id(i): group_of(i) for i in range(design.patients)},
        }
        _write_text(tmp / "simulation.json", json.dumps(params, indent=2, sort_keys=True) + "\n")
        _write_text(tmp / "samplesheet.csv", _csv_text(SHEET_COLUMNS, sheet_rows))
        written = tuple(r[1] for r in sheet_rows) + _OWN_FILES
        _publish(tmp, out, written, existing)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise AbortedError(f"cannot write the simulated cohort ({e.strerror or e})", path=str(out),
                           hint="check free disk space and permissions; nothing was published") from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("wrote %d files to %s", len(written), out)
    return CohortFiles(out, design, written, len(stained_specs(design)), len(specs) - len(stained_specs(design)))


def _make_temporary_folder(out: Path, existing: bool) -> Path:
    """A fresh hidden folder next to ``out`` (inside it if its parent is read-only)."""
    target = out.resolve()
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.parent / f".{target.name}.simulate.tmp{os.getpid()}"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        return tmp
    except PermissionError:
        if not existing:
            raise UsageError("cannot create the output folder (permission denied)", path=str(out),
                             hint="choose a folder you can write to") from None
    except OSError as e:
        raise UsageError(f"cannot create a folder next to the output folder ({e.strerror})", path=str(out),
                         hint="choose a folder you can write to") from e
    tmp = target / f".simulate.tmp{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    return tmp


def _publish(tmp: Path, out: Path, written: tuple[str, ...], existing: bool) -> None:
    """Move the finished cohort from ``tmp`` into ``out`` (see :func:`simulate_cohort`)."""
    if not existing:
        os.replace(tmp, out)
        fsync_dir(out.parent)
        return
    stale = _previous_files(out) - set(written)
    for name in written:   # FCS files first, samplesheet.csv last
        os.replace(tmp / name, out / name)
    for name in sorted(stale):
        (out / name).unlink(missing_ok=True)
    fsync_dir(out)
    shutil.rmtree(tmp, ignore_errors=True)
