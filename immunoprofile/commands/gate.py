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
@click.option("--fail-fast", is_flag=True, help="Stop at the first failed sample.")
@click.pass_context
def gate(ctx: click.Context, files: tuple[str, ...], templates: tuple[str, ...], sheet: str | None, out_dir: str,
         name_pattern: str | None, comp_file: str | None, dataset: int, require_fmo: bool,
         intensity_markers: str, fail_fast: bool) -> int:
    """Gate FCS files (from a sample sheet, or FILES/globs) and write per-sample
    population counts, frequencies, intensities and the gates applied.

    \b
    Examples:
      immunoprofile gate --template t_cell_exhaustion --template nk_inhibitory \\
          --samples sample_data/samplesheet.csv --out results/
      immunoprofile gate -t t_cell_exhaustion 'run42/*.fcs' --out results/ \\
          --name-pattern '(?P<patient_id>P\\d+)_(?P<timepoint>[a-z_]+)_'
    """
    import logging

    from ..batch import run_gate
    from ..errors import UsageError
    from ..pipeline import Options
    from ..samplesheet import from_files, read_sheet
    from ..templates import load_template

    log = logging.getLogger("immunoprofile")
    if sheet and files:
        raise UsageError("give either --samples or FILES, not both")
    if not sheet and not files:
        raise UsageError("no input: give --samples SHEET.csv or FCS files/globs")
    tpls = [load_template(t) for t in templates]
    samples = read_sheet(sheet) if sheet else from_files(files, name_pattern)
    comp = None
    if comp_file:
        from ..transform import compensation_matrix_from_csv

        names, m = compensation_matrix_from_csv(comp_file)
        comp = (tuple(names), tuple(tuple(float(x) for x in r) for r in m))
    options = Options(compensation=comp, dataset=dataset, require_fmo=require_fmo,
                      intensity_markers=intensity_markers)
    summary = run_gate(samples, tpls, out_dir, options, fail_fast=fail_fast,
                       command_options={"templates": list(templates), "samples": sheet, "files": list(files),
                                        "name_pattern": name_pattern, "compensation": comp_file})
    for f in summary.failures:
        log.error("%s [%s]", f["message"], f["code"])
    click.echo(summary.line(), err=True)
    if summary.failed:
        click.echo(f"{summary.failed} sample(s) failed: see {out_dir}/failures.csv", err=True)
    return summary.exit_code
