"""``immunoprofile plot``: trajectories, pre/post slopes, gates and fold-change heatmaps."""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

import click

IMAGE_SUFFIXES = (".png", ".svg", ".pdf")
#: resolution of PNG files written by ``plot`` (thumbnails in the report are smaller)
PNG_DPI = 150
MEASURE_CHOICES = ("pct_parent", "pct_of", "count", "cells_per_ul")
_CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder, fsync, then rename.

    Raises
    ------
    OSError
        If the folder cannot be created or written.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def image_format(out: str) -> str:
    """``png``, ``svg`` or ``pdf`` from a file name.

    Raises
    ------
    UsageError
        If the name has another suffix.
    """
    from ..errors import UsageError

    suffix = Path(out).suffix.lower()
    if suffix not in IMAGE_SUFFIXES:
        raise UsageError(f"--out {out}: the file name must end in .png, .svg or .pdf (it sets the format)")
    return suffix[1:]


def save(fig: object, out: str) -> None:
    """Render ``fig`` in the format named by ``out``'s suffix and write it atomically."""
    import logging

    from ..plots import figure_bytes

    fmt = image_format(out)
    write_atomic(Path(out), figure_bytes(fig, fmt, dpi=PNG_DPI if fmt == "png" else None))  # type: ignore[arg-type]
    logging.getLogger("immunoprofile").info("wrote %s", out)
    click.echo(f"wrote {out}", err=True)


def _split(values: tuple[str, ...]) -> list[str]:
    out: list[str] = []
    for v in values:
        out += [x.strip() for x in v.split(",") if x.strip()]
    return out


def _frame(results: str):  # -> pandas.DataFrame
    from ..results import load_populations

    return load_populations(results)


@click.group("plot", context_settings=_CONTEXT)
def plot() -> None:
    """Draw figures from `gate` results (and `compare` statistics).

    The output format follows the --out file name: .png, .svg or .pdf. The same
    inputs always give the same bytes.

    \b
    Examples:
      immunoprofile plot longitudinal results/ --population "CD4 PD1+" --out cd4_pd1.png
      immunoprofile plot paired results/ --pre pre --post post_clofarabine --stats stats/ --out paired.pdf
      immunoprofile plot gates results/ --sample P01_pre_t_cell --out P01_pre.png
      immunoprofile plot gates results/ --out qc/
      immunoprofile plot heatmap results/ --pre pre --post post_clofarabine --out heatmap.svg
    """


@plot.command("longitudinal", context_settings=_CONTEXT)
@click.argument("results", metavar="RESULTS")
@click.option("-p", "--population", "populations", multiple=True,
              help="Population to plot (repeatable; several make a grid). Default: all. A population in several "
                   "panels may be given as 'NAME (PANEL)'.")
@click.option("--measure", type=click.Choice(MEASURE_CHOICES), default="pct_parent", show_default=True,
              help="Value on the y axis.")
@click.option("--patient", "patients", multiple=True, help="Only these patients (repeatable or comma-separated).")
@click.option("--timepoints", help="Comma-separated timepoints, in order (default: all, ordered by median day).")
@click.option("--facet", type=click.Choice(["population", "patient"]), default="population", show_default=True,
              help="One panel per population (a line per patient), or one panel per patient (a line per population).")
@click.option("-o", "--out", required=True, metavar="FILE", help="Figure file: .png, .svg or .pdf.")
def longitudinal(results: str, populations: tuple[str, ...], measure: str, patients: tuple[str, ...],
                 timepoints: str | None, facet: str, out: str) -> int:
    """One line per patient over timepoints, coloured by response group, with each group's median.

    The x axis is the study day when every sample has one, else the timepoints in order.

    \b
    Examples:
      immunoprofile plot longitudinal results/ --population "CD4 PD1+" --out cd4_pd1.png
      immunoprofile plot longitudinal results/ -p "CD4 PD1+" -p "CD8 PD1+" --patient P03 --facet patient --out p03.pdf
    """
    from ..plots import longitudinal_figure

    image_format(out)
    fig = longitudinal_figure(_frame(results), list(populations) or None, measure=measure,
                              patients=_split(patients) or None,
                              timepoints=_split((timepoints,)) if timepoints else None, facet=facet)
    save(fig, out)
    return 0


@plot.command("paired", context_settings=_CONTEXT)
@click.argument("results", metavar="RESULTS")
@click.option("--pre", required=True, help="Baseline timepoint.")
@click.option("--post", required=True, help="Later timepoint.")
@click.option("-p", "--population", "populations", multiple=True,
              help="Population to plot (repeatable). Default: every population with statistics.")
@click.option("--measure", type=click.Choice(MEASURE_CHOICES), default="pct_parent", show_default=True)
@click.option("--stats", "stats_dir", metavar="DIR",
              help="Output folder of `immunoprofile compare` (its paired_stats.csv gives n, median change and q). "
                   "Without it the statistics are computed now, as `compare --pre --post` would.")
@click.option("-o", "--out", required=True, metavar="FILE", help="Figure file: .png, .svg or .pdf.")
def paired(results: str, pre: str, post: str, populations: tuple[str, ...], measure: str, stats_dir: str | None,
           out: str) -> int:
    """Pre/post slope plots per population, annotated with n, median change and adjusted p (q).

    \b
    Examples:
      immunoprofile plot paired results/ --pre pre --post post_clofarabine --stats stats/ --out paired.png
      immunoprofile plot paired results/ --pre pre --post post_clofarabine -p "CD4 PD1+" -p "CD8 PD1+" --out p.pdf
    """
    from ..plots import load_paired_stats, paired_figure, paired_statistics

    image_format(out)
    frame = _frame(results)
    stats = load_paired_stats(stats_dir) if stats_dir else paired_statistics(frame, pre, post, measure)
    fig = paired_figure(frame, pre, post, stats, measure=measure, populations=list(populations) or None)
    save(fig, out)
    return 0


@plot.command("heatmap", context_settings=_CONTEXT)
@click.argument("results", metavar="RESULTS")
@click.option("--pre", help="Baseline timepoint (default: the earliest by day).")
@click.option("--post", help="Later timepoint (default: the next one).")
@click.option("-p", "--population", "populations", multiple=True, help="Population (repeatable). Default: all.")
@click.option("--measure", type=click.Choice(MEASURE_CHOICES), default="pct_parent", show_default=True)
@click.option("-o", "--out", required=True, metavar="FILE", help="Figure file: .png, .svg or .pdf.")
def heatmap(results: str, pre: str | None, post: str | None, populations: tuple[str, ...], measure: str,
            out: str) -> int:
    """Patients x populations heatmap of log2 fold change post vs pre.

    \b
    Example:
      immunoprofile plot heatmap results/ --pre pre --post post_clofarabine --out heatmap.png
    """
    from ..errors import UsageError
    from ..plots import heatmap_figure, timepoint_order

    image_format(out)
    frame = _frame(results)
    if pre is None or post is None:
        order = timepoint_order(frame)
        rest = [t for t in order if t not in (pre, post)]
        if len(order) < 2:
            raise UsageError(f"the results have one timepoint ({', '.join(order)}); a fold change needs two")
        pre = pre or rest.pop(0)
        post = post or rest[0]
    fig = heatmap_figure(frame, pre, post, measure=measure, populations=list(populations) or None)
    save(fig, out)
    return 0


def safe_name(sample_id: str) -> str:
    """A file name for a sample id (path separators and odd characters become ``_``)."""
    return re.sub(r"[^A-Za-z0-9._+-]", "_", sample_id).lstrip(".") or "sample"


@plot.command("gates", context_settings=_CONTEXT)
@click.argument("results", metavar="RESULTS")
@click.option("-s", "--sample", "samples", multiple=True,
              help="Sample id (repeatable). Default: every sample with recorded gates, FMO controls included.")
@click.option("--fcs-dir", metavar="DIR",
              help="Folder holding the FCS files, if they are no longer where gate read them.")
@click.option("--format", "fmt", type=click.Choice(["png", "svg", "pdf"]), default="png", show_default=True,
              help="File format when --out is a folder.")
@click.option("-o", "--out", required=True, metavar="FILE|DIR",
              help="A .png/.svg/.pdf file (one sample), or a folder: one <sample_id>.<format> per sample.")
def gates(results: str, samples: tuple[str, ...], fcs_dir: str | None, fmt: str, out: str) -> int:
    """The gating hierarchy of a sample as density plots with every gate drawn as recorded.

    The FCS file is read again (where gate read it, else beside the sample sheet, or under
    --fcs-dir; checked against the sha256 recorded at gating time) and each population's events
    are selected with the coordinates in gates.csv; the percentages drawn are those of
    populations.csv. FMO thresholds are dashed and labelled.

    \b
    Examples:
      immunoprofile plot gates results/ --sample P01_pre_t_cell --out P01_pre_t_cell.png
      immunoprofile plot gates results/ --out results_qc/          # every sample
    """
    import logging

    from ..errors import EXIT_SAMPLES_FAILED, ImmunoprofileError, UsageError
    from ..plots import GatingRecords, figure_bytes, gates_figure

    log = logging.getLogger("immunoprofile")
    records = GatingRecords(results, fcs_dir=fcs_dir)
    ids = _split(samples) or records.sample_ids
    single = Path(out).suffix.lower() in IMAGE_SUFFIXES
    if single and len(ids) != 1:
        raise UsageError(f"--out {out} is one file but {len(ids)} samples are selected; give one --sample, or a "
                         "folder as --out")
    if not single and Path(out).exists() and not Path(out).is_dir():
        raise UsageError(f"--out {out} is a file without a .png/.svg/.pdf suffix; give a figure file or a folder")
    failed: list[str] = []
    for sid in ids:
        try:
            view = records.sample(sid)
        except UsageError:
            raise
        except ImmunoprofileError as e:
            if single:
                raise
            log.error("%s: %s", sid, e)
            failed.append(sid)
            continue
        fig = gates_figure(view)
        if single:
            save(fig, out)
        else:
            target = Path(out) / f"{safe_name(sid)}.{fmt}"
            write_atomic(target, figure_bytes(fig, fmt, dpi=PNG_DPI if fmt == "png" else None))
    if not single:
        click.echo(f"wrote {len(ids) - len(failed)} gating plot(s) to {out}"
                   + (f"; {len(failed)} sample(s) failed: {', '.join(failed)}" if failed else ""), err=True)
    return EXIT_SAMPLES_FAILED if failed else 0
