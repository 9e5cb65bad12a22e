"""``immunoprofile gate``: read, compensate, transform and gate FCS files with a template."""

from __future__ import annotations

import click


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("files", nargs=-1)
@click.option("-t", "--template", "templates", multiple=True, required=True,
              help="Bundled template name or template file (GatingML 2.0 .xml and FlowJo .wsp accepted). "
                   "Repeat to gate a mixed batch: the sheet's 'panel' column picks the template.")
@click.option("-s", "--samples", "sheet", type=click.Path(dir_okay=False),
              help="Sample sheet (CSV: sample_id,file[,patient_id,timepoint,day,group,panel,batch,control]).")
@click.option("-o", "--out", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Results folder (replaced atomically when the run completes).")
@click.option("--name-pattern", help=r"Regex with named groups filling metadata from file names, "
                                     r"e.g. '(?P<patient_id>pt\d+)_(?P<timepoint>\w+)'.")
@click.option("--compensation", "comp_file", type=click.Path(dir_okay=False),
              help="Spillover matrix file (CSV) overriding the template and the files' $SPILLOVER.")
@click.option("--dataset", type=int, default=0, show_default=True, help="Data set to read in multi-data-set files.")
@click.option("--require-fmo", is_flag=True, help="Fail a sample whose batch lacks an FMO control a gate needs "
                                                  "(default: fall back to the template's density threshold).")
@click.option("--intensities", "intensity_markers", type=click.Choice(["template", "all"]), default="template",
              show_default=True, help="Markers in intensities.csv: those the template gates on, or every labelled channel.")
@click.option("-j", "--jobs", type=int, default=None,
              help="Samples gated in parallel, each in its own process [default: all cores].")
@click.option("--executor", type=click.Choice(["process", "dask"]), default="process", show_default=True,
              help="Where samples are gated: local processes, or an existing Dask cluster (--scheduler).")
@click.option("--scheduler", metavar="ADDRESS", help="Dask scheduler address, e.g. tcp://head-node:8786.")
@click.option("--force", is_flag=True, help="Gate every sample again, ignoring results of earlier runs.")
@click.option("--db", "db", type=click.Path(dir_okay=False),
              help="Results database (SQLite) to record the run in [default: OUT/immunoprofile.sqlite]; "
                   "give the same file to several runs to collect them in one place.")
@click.option("--fail-fast", is_flag=True, help="Stop at the first failed sample; nothing is published (exit 3).")
@click.option("--max-failed", type=float, metavar="FRACTION",
              help="Abort (exit 3, nothing published) when more than this fraction of the samples fails, "
                   "e.g. 0.2; a wrong template fails them all.")
@click.option("--min-age", type=float, default=0.0, show_default=True, metavar="SECONDS",
              help="Defer files modified less than this long ago (still being written).")
@click.pass_context
def gate(ctx: click.Context, files: tuple[str, ...], templates: tuple[str, ...], sheet: str | None, out_dir: str,
         name_pattern: str | None, comp_file: str | None, dataset: int, require_fmo: bool,
         intensity_markers: str, jobs: int | None, executor: str, scheduler: str | None, force: bool,
         db: str | None, fail_fast: bool, max_failed: float | None, min_age: float) -> int:
    """Gate FCS files (from a sample sheet, or FILES/globs) and write per-sample
    population counts, frequencies, intensities and the gates applied.

    Samples run in parallel; a rerun gates only what changed (new files, another
    template or options); the results folder is replaced in one atomic step.
    Exit status: 0 all ok; 1 some samples failed (see failures.csv); 2 usage,
    template or sheet error; 3 aborted (lock held, disk full, too many failures);
    130 interrupted.

    \b
    Examples:
      immunoprofile gate --template t_cell_exhaustion --template nk_inhibitory \\
          --samples sample_data/samplesheet.csv --out results/
      immunoprofile gate -t t_cell_exhaustion 'run42/*.fcs' --out results/ \\
          --name-pattern '(?P<patient_id>P\\d+)_(?P<timepoint>[a-z_]+)_'
      immunoprofile -q gate -t t_cell_exhaustion -s sheet.csv -o results/ --max-failed 0.2
    """
    from ..errors import UsageError
    from ..executor import default_jobs, prestart, stop_prestarted

    if sheet and files:
        raise UsageError("give either --samples or FILES, not both")
    if not sheet and not files:
        raise UsageError("no input: give --samples SHEET.csv or FCS files/globs")
    if jobs is not None and jobs < 1:
        raise UsageError(f"--jobs must be at least 1, got {jobs}")
    # first of all: the worker processes' fork server imports the gating stack (about a second)
    # while this process loads its own modules, the templates and the sheet
    prestart(executor, jobs or default_jobs())
    try:
        return _gate(ctx, files, templates, sheet, out_dir, name_pattern, comp_file, dataset, require_fmo,
                    intensity_markers, jobs, executor, scheduler, force, db, fail_fast, max_failed, min_age)
    finally:
        stop_prestarted()


def _gate(ctx: click.Context, files: tuple[str, ...], templates: tuple[str, ...], sheet: str | None, out_dir: str,
         name_pattern: str | None, comp_file: str | None, dataset: int, require_fmo: bool,
         intensity_markers: str, jobs: int | None, executor: str, scheduler: str | None, force: bool,
         db: str | None, fail_fast: bool, max_failed: float | None, min_age: float) -> int:
    """The gate command once the fork server is starting."""
    import logging
    import signal
    import sys
    import threading

    from ..batch import RunSettings, run_gate
    from ..executor import default_jobs
    from ..pipeline import Options
    from ..progress import ProgressBar
    from ..samplesheet import from_files, read_sheet
    from ..templates import load_template

    log = logging.getLogger("immunoprofile")
    obj = ctx.obj or {}
    verbosity, log_format = obj.get("verbosity", 0), obj.get("log_format", "text")
    tpls = [load_template(t) for t in templates]
    samples = read_sheet(sheet) if sheet else from_files(files, name_pattern)
    comp = None
    if comp_file:
        from ..transform import compensation_matrix_from_csv

        names, m = compensation_matrix_from_csv(comp_file)
        comp = (tuple(names), tuple(tuple(float(x) for x in r) for r in m))
    options = Options(compensation=comp, dataset=dataset, require_fmo=require_fmo,
                      intensity_markers=intensity_markers)
    settings = RunSettings(jobs=jobs or default_jobs(), executor=executor, scheduler=scheduler, force=force, db=db,
                           fail_fast=fail_fast, max_failed=max_failed, min_age=min_age, log_format=log_format)

    bar = ProgressBar(sys.stderr)
    if verbosity < 0:
        bar.enabled = False
    clear = bar.log_filter()
    stderr_handlers = [h for h in log.handlers if isinstance(h, logging.StreamHandler)
                       and not isinstance(h, logging.FileHandler)]
    for h in stderr_handlers:
        h.addFilter(clear)
    previous_term = None
    if threading.current_thread() is threading.main_thread():
        previous_term = signal.signal(signal.SIGTERM, _interrupt)
    try:
        summary = run_gate(samples, tpls, out_dir, options, settings=settings, on_progress=bar,
                           command_options={"templates": list(templates), "samples": sheet, "files": list(files),
                                            "name_pattern": name_pattern, "compensation": comp_file})
    finally:
        bar.close()
        for h in stderr_handlers:
            h.removeFilter(clear)
        if previous_term is not None:
            signal.signal(signal.SIGTERM, previous_term)
    if summary.deferred:
        log.warning("%d file(s) deferred (still being written?); a later run will gate them", summary.deferred)
    if summary.failed:
        log.error("%d sample(s) failed: see %s", summary.failed, f"{out_dir.rstrip('/')}/failures.csv")
    if verbosity >= 0:
        if log_format == "json":
            from ..logjson import JsonFormatter

            record = logging.makeLogRecord({"name": "immunoprofile.gate", "levelno": logging.INFO,
                                            "levelname": "INFO", "msg": summary.line(),
                                            "summary": summary.as_dict(), "out_dir": out_dir})
            click.echo(JsonFormatter().format(record), err=True)
        else:
            click.echo(f"{summary.line()}; results in {out_dir}", err=True)
    return summary.exit_code


def _interrupt(signum: int, frame: object) -> None:
    """SIGTERM (a scheduler stopping the job) ends the run like Ctrl-C: cleaned up, exit 130."""
    raise KeyboardInterrupt(f"signal {signum}")
