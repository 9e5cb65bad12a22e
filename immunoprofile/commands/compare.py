"""``immunoprofile compare``: paired and longitudinal statistics within patients."""

from __future__ import annotations

from pathlib import Path

import click

# kept in step with immunoprofile.compare_pairs.MEASURES (checked in tests/test_compare.py);
# not imported here so `immunoprofile --help` does not load pandas
MEASURE_CHOICES = ("pct_parent", "pct_of", "count", "cells_per_ul")
OUTPUT_FILES = ("paired_stats.csv", "longitudinal_stats.csv", "exclusions.csv", "summary.txt", "manifest.json",
                "run.log")


def _split(values: tuple[str, ...]) -> list[str]:
    out: list[str] = []
    for v in values:
        out += [x.strip() for x in v.split(",") if x.strip()]
    return out


@click.command("compare", context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("results", metavar="RESULTS")
@click.option("--pre", help="Baseline timepoint of a paired comparison.")
@click.option("--post", help="Later timepoint of a paired comparison (change = post - pre).")
@click.option("--timepoints", help="Comma-separated timepoints for a longitudinal analysis (3 or more; "
                                   "ordered by day when the results have one, else as given; the first is baseline).")
@click.option("--measure", "measures", multiple=True, type=click.Choice(MEASURE_CHOICES),
              help="Measure to compare (repeatable). Default: pct_parent, plus cells_per_ul when the results "
                   "have absolute numbers.")
@click.option("--by", help="Column with response groups (e.g. group): tests within each group and a "
                           "comparison of the changes between groups.")
@click.option("--populations", "populations", multiple=True,
              help="Populations to test (comma-separated or repeated); they form the multiplicity family. "
                   "Default: all.")
@click.option("-o", "--out", "out_dir", required=True, metavar="DIR",
              help="Output folder (new, or a previous compare output; replaced when the run completes).")
@click.pass_context
def compare(ctx: click.Context, results: str, pre: str | None, post: str | None, timepoints: str | None,
            measures: tuple[str, ...], by: str | None, populations: tuple[str, ...], out_dir: str) -> int:
    """Compare subset frequencies within patients between timepoints.

    RESULTS is the output folder of `immunoprofile gate` (or its populations.csv).
    Writes paired_stats.csv, longitudinal_stats.csv (3+ timepoints), exclusions.csv,
    summary.txt and manifest.json into DIR and prints the summary.

    \b
    Examples:
      immunoprofile compare results/ --pre pre --post post_clofarabine --by group --out stats/
      immunoprofile compare results/ --timepoints pre,post_clofarabine,post_lenalidomide --out long/
    """
    import logging
    import shutil

    from .. import report
    from ..compare import compare_timepoints
    from ..compare_summary import format_summary
    from ..errors import UsageError
    from ..results import load_populations

    log = logging.getLogger("immunoprofile")
    if timepoints is not None and (pre is not None or post is not None):
        raise UsageError("give either --pre and --post, or --timepoints, not both")
    if timepoints is not None:
        tps = _split((timepoints,))
        if len(tps) < 2:
            raise UsageError(f"--timepoints needs at least two comma-separated timepoints, got {timepoints!r}")
    elif pre is None or post is None:
        raise UsageError("say what to compare: --pre TIMEPOINT --post TIMEPOINT, or --timepoints T0,T1,T2")
    else:
        tps = [pre, post]
    out = Path(out_dir)
    source = Path(results)
    _check_out(out, source)
    frame = load_populations(source)
    result = compare_timepoints(frame, tps, measures=list(measures) or None, by=by,
                                populations=_split(populations) or None)
    summary = format_summary(result)

    stage = report.staging_dir(out)
    handler = logging.FileHandler(stage / "run.log", encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    handler.setLevel(logging.DEBUG)
    log.addHandler(handler)
    try:
        log.info("compare %s: timepoints %s, measures %s, by %s", source, ", ".join(result.timepoints),
                 ", ".join(result.measures), by)
        report.write_csv(result.paired, stage / "paired_stats.csv")
        if len(result.timepoints) >= 3:
            report.write_csv(result.longitudinal, stage / "longitudinal_stats.csv")
        report.write_csv(result.exclusions, stage / "exclusions.csv")
        (stage / "summary.txt").write_text(summary, encoding="utf-8")
        input_file = _input_file(source)
        manifest = {
            "command": "compare",
            "created": report.utc_now(),
            "input": {"path": str(input_file), "sha256": report.sha256_file(input_file)},
            "arguments": {"timepoints": list(result.timepoints), "measures": list(result.measures), "by": by,
                          "populations": _split(populations) or None},
            "notes": list(result.notes),
            "context": report.run_context(),
        }
        log.removeHandler(handler)
        handler.close()
        manifest["outputs"] = report.manifest_outputs(stage)
        report.write_json(manifest, stage / "manifest.json")
        report.publish(stage, out)
    except BaseException:
        log.removeHandler(handler)
        handler.close()
        shutil.rmtree(stage, ignore_errors=True)
        raise
    click.echo(summary, nl=False)
    return 0


def _input_file(source: Path) -> Path:
    if source.is_dir():
        for name in ("populations.csv", "populations.parquet"):
            if (source / name).is_file():
                return source / name
    return source


def _check_out(out: Path, source: Path) -> None:
    """Refuse an output folder that would replace the inputs or unrelated files."""
    from ..errors import UsageError

    src = source.resolve()
    dst = out.resolve()
    if dst == src or dst in src.parents:
        raise UsageError(f"--out {out} would replace the results being compared; choose another folder")
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file; give a folder")
    if out.is_dir():
        other = sorted(p.name for p in out.iterdir() if p.name not in OUTPUT_FILES)
        if other:
            shown = ", ".join(other[:5]) + (" ..." if len(other) > 5 else "")
            raise UsageError(f"--out {out} already holds other files ({shown}); compare replaces its output "
                             f"folder as a whole, so give a new folder or a previous compare output")
