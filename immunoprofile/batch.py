"""Many samples: choose templates, derive FMO thresholds, isolate failures, publish results.

One bad file never sinks the batch: its error is recorded in ``failures.csv``
with a stable code and every other sample completes. The exit status is 0 when
everything succeeded and 1 when some samples failed.
"""

from __future__ import annotations

import logging
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from . import panel
from .errors import (
    EXIT_OK, EXIT_SAMPLES_FAILED, ImmunoprofileError, UsageError,
)
from .gating import FmoKey, FmoValue
from .pipeline import Options, SampleOutput, channel_hints, process_control, process_sample, template_marker_for
from .report import (
    manifest_outputs, publish, run_context, staging_dir, tables_equal_frame, utc_now, write_csv, write_json,
    write_parquet,
)
from .samplesheet import extra_columns
from .stats import GATE_COLUMNS, INTENSITY_COLUMNS, POPULATION_COLUMNS
from .templates import Template

log = logging.getLogger(__name__)

FAILURE_COLUMNS = ["sample_id", "file", "stage", "code", "message"]
FINDING_COLUMNS = ["sample_id", "code", "severity", "message"]


@dataclass
class RunSummary:
    """What a run did, for the one-line summary and the exit status."""

    ok: int = 0
    failed: int = 0
    controls: int = 0
    events: int = 0
    seconds: float = 0.0
    failures: list[dict[str, Any]] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        return EXIT_SAMPLES_FAILED if self.failed else EXIT_OK

    def line(self) -> str:
        rate = self.events / self.seconds if self.seconds > 0 else 0.0
        return (f"{self.ok} samples ok, {self.failed} failed, {self.controls} FMO controls; "
                f"{self.events:,} events in {self.seconds:.1f} s ({rate / 1e6:.2f} M events/s)")


def assign_templates(samples: pd.DataFrame, templates: Sequence[Template]) -> list[Template | None]:
    """The template for each sample: the only one, or the one whose ``panel`` matches the sheet's.

    Raises
    ------
    UsageError
        Several templates but no ``panel`` column, or two templates for one panel.
    """
    if len(templates) == 1:
        return [templates[0]] * len(samples)
    by_panel: dict[str, Template] = {}
    for t in templates:
        if not t.panel:
            raise UsageError(f"template {t.name!r} has no 'panel', so it cannot be chosen per sample",
                             hint="give one --template, or add 'panel:' to each template")
        if t.panel in by_panel:
            raise UsageError(f"templates {by_panel[t.panel].name!r} and {t.name!r} are both for panel {t.panel!r}")
        by_panel[t.panel] = t
    if (samples["panel"] == "").all():
        raise UsageError("several templates were given but the samples have no 'panel'",
                         hint="add a 'panel' column to the sample sheet (values: "
                              + ", ".join(sorted(by_panel)) + ")")
    return [by_panel.get(p) for p in samples["panel"]]


def _failure(row: pd.Series, stage: str, err: BaseException) -> dict[str, Any]:
    if isinstance(err, ImmunoprofileError):
        code, msg = err.code, str(err)
    else:
        code = "INTERNAL_ERROR"
        msg = f"{row['file']}: unexpected {type(err).__name__}: {err} (a bug; rerun with --debug and report it)"
        log.debug("traceback for %s:\n%s", row["sample_id"], traceback.format_exc())
    return {"sample_id": row["sample_id"], "file": row["file"], "stage": stage, "code": code, "message": msg}


def run_gate(
    samples: pd.DataFrame,
    templates: Sequence[Template],
    out_dir: str | Path,
    options: Options | None = None,
    *,
    fail_fast: bool = False,
    command_options: dict[str, Any] | None = None,
) -> RunSummary:
    """Gate every sample and publish the results folder.

    Raises
    ------
    UsageError
        Template selection is impossible (see :func:`assign_templates`).
    """
    options = options or Options()
    out = Path(out_dir)
    started = utc_now()
    t0 = time.perf_counter()
    summary = RunSummary()
    chosen = assign_templates(samples, templates)
    extras = tuple(extra_columns(samples))
    outputs: list[SampleOutput] = []
    failures: list[dict[str, Any]] = []
    is_control = samples["control"] != ""

    # 1. FMO controls, per (template, batch, panel)
    fmo: dict[tuple[str, str, str], dict[FmoKey, FmoValue]] = {}
    fmo_panels: set[tuple[str, str]] = set()
    for i in [i for i in range(len(samples)) if is_control.iloc[i]]:
        row, tpl = samples.iloc[i], chosen[i]
        if tpl is None:
            failures.append(_failure(row, "template", _panel_error(row, templates)))
            continue
        fmo_panels.add((tpl.name, row["panel"]))
        if template_marker_for(tpl, row["control"]) is None:
            log.info("%s: %s is not used by template %s; skipped", row["sample_id"], row["control"], tpl.name)
            continue
        try:
            hints = _hints_for(samples, chosen, row, tpl, options)
            values, so = process_control(row["sample_id"], row["path"], row["control"], tpl, options, hints)
        except Exception as e:  # noqa: BLE001 - isolate any failure to this control
            failures.append(_failure(row, "fmo", e))
            if fail_fast:
                break
            continue
        fmo.setdefault((tpl.name, row["batch"], row["panel"]), {}).update(values)
        outputs.append(so)
        summary.controls += 1
        summary.events += so.n_events

    # 2. stained samples
    for i in [i for i in range(len(samples)) if not is_control.iloc[i]]:
        if fail_fast and failures:
            break
        row, tpl = samples.iloc[i], chosen[i]
        if tpl is None:
            failures.append(_failure(row, "template", _panel_error(row, templates)))
            continue
        meta = {k: row[k] for k in samples.columns if k != "path"}
        try:
            so = process_sample(row["sample_id"], row["path"], meta, tpl, options,
                                fmo=fmo.get((tpl.name, row["batch"], row["panel"]), {}),
                                fmo_available=(tpl.name, row["panel"]) in fmo_panels, extra_columns=extras)
        except Exception as e:  # noqa: BLE001 - one bad sample never sinks the batch
            failures.append(_failure(row, "gate", e))
            log.warning("%s", failures[-1]["message"])
            continue
        outputs.append(so)
        summary.ok += 1
        summary.events += so.n_events
        log.info("%s: %d events gated", row["sample_id"], so.n_events)

    summary.failed = len(failures)
    summary.failures = failures
    summary.seconds = time.perf_counter() - t0
    _publish(out, samples, templates, outputs, failures, options, started, summary, command_options or {}, extras)
    return summary


def _panel_error(row: pd.Series, templates: Sequence[Template]) -> ImmunoprofileError:
    from .errors import SampleError

    have = ", ".join(sorted(t.panel or "?" for t in templates))
    return SampleError(f"panel {row['panel']!r} matches none of the templates (panels: {have})", path=row["file"],
                       code="PANEL_UNKNOWN", hint="fix the sheet's 'panel' value or add a template for it")


def _hints_for(samples: pd.DataFrame, chosen: Sequence[Template | None], row: pd.Series, tpl: Template,
               options: Options) -> dict[str, str]:
    """Channel names of the FMO markers, from a stained sample of the same batch and panel."""
    from .fcs import read_fcs

    want = panel.canonical(row["control"].split(":", 1)[1])
    for j in range(len(samples)):
        other = samples.iloc[j]
        if other["control"] or chosen[j] is not tpl or other["batch"] != row["batch"] or other["panel"] != row["panel"]:
            continue
        try:
            s = read_fcs(other["path"], dataset=options.dataset)
        except ImmunoprofileError:
            continue
        hints = channel_hints(s, tpl)
        if any(panel.canonical(m) == want for m in hints):
            return hints
    return {}


def _frame(rows: list[dict[str, Any]], columns: Sequence[str], sort: Sequence[str]) -> pd.DataFrame:
    df = tables_equal_frame(rows, columns)
    if len(df):
        df = df.sort_values(list(sort), kind="stable").reset_index(drop=True)
    return df


def _publish(out: Path, samples: pd.DataFrame, templates: Sequence[Template], outputs: list[SampleOutput],
             failures: list[dict[str, Any]], options: Options, started: str, summary: RunSummary,
             command_options: dict[str, Any], extras: tuple[str, ...]) -> None:
    stage = staging_dir(out)
    pops = _frame([r for o in outputs for r in o.populations], POPULATION_COLUMNS + list(extras), ["sample_id"])
    ints = _frame([r for o in outputs for r in o.intensities], INTENSITY_COLUMNS, ["sample_id"])
    gates = _frame([r for o in outputs for r in o.gates], GATE_COLUMNS, ["sample_id"])
    finds = _frame([r for o in outputs for r in o.findings], FINDING_COLUMNS, ["sample_id"])
    fails = _frame(failures, FAILURE_COLUMNS, ["sample_id"])
    write_csv(pops, stage / "populations.csv")
    write_parquet(pops, stage / "populations.parquet")
    write_csv(ints, stage / "intensities.csv")
    write_csv(gates, stage / "gates.csv")
    write_csv(finds, stage / "findings.csv")
    write_csv(fails, stage / "failures.csv")
    by_id = {o.sample_id: o for o in outputs}
    inputs = []
    for _, row in samples.iterrows():
        o = by_id.get(row["sample_id"])
        inputs.append({"sample_id": row["sample_id"], "file": row["file"],
                       "sha256": o.file_sha256 if o else None, "events": o.n_events if o else None})
    manifest = {
        "program": "immunoprofile gate",
        **run_context(),
        "started_utc": started,
        "finished_utc": utc_now(),
        "options": {**command_options, "dataset": options.dataset, "require_fmo": options.require_fmo,
                    "intensity_markers": options.intensity_markers,
                    "compensation_override": options.compensation is not None},
        "templates": [{"name": t.name, "version": t.version, "sha256": t.sha256, "source": t.source,
                       "panel": t.panel} for t in templates],
        "summary": {"ok": summary.ok, "failed": summary.failed, "controls": summary.controls,
                    "events": summary.events},
        "inputs": inputs,
        "outputs": manifest_outputs(stage),
    }
    write_json(manifest, stage / "manifest.json")
    publish(stage, out)
