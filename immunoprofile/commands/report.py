"""``immunoprofile report``: one self-contained HTML page for a results folder."""

from __future__ import annotations

from pathlib import Path

import click


@click.command("report", context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.argument("results", metavar="RESULTS")
@click.option("--stats", "stats_dir", metavar="DIR",
              help="Output folder of `immunoprofile compare`. Without it the paired statistics are computed now "
                   "over every timepoint (ordered by day, each against the first).")
@click.option("-p", "--population", "populations", multiple=True,
              help="Populations of the longitudinal plots (repeatable). Default: all.")
@click.option("--fcs-dir", metavar="DIR", help="Folder holding the FCS files, if they moved since gating.")
@click.option("--no-thumbnails", is_flag=True, help="Leave out the gating thumbnails (they read every FCS file).")
@click.option("-o", "--out", required=True, metavar="FILE.html", help="The report file.")
def report(results: str, stats_dir: str | None, populations: tuple[str, ...], fcs_dir: str | None,
           no_thumbnails: bool, out: str) -> int:
    """Write a self-contained HTML report: run summary and provenance, failures and QC
    findings, gating thumbnails per sample, the populations table, the paired statistics
    and the longitudinal plots. Everything is embedded; the page fetches nothing.

    \b
    Examples:
      immunoprofile report results/ --stats stats/ --out report.html
      immunoprofile report results/ --out report.html        # statistics computed now
    """
    from ..errors import UsageError
    from ..report_html import build_report
    from .plot import write_atomic

    if Path(out).suffix.lower() not in (".html", ".htm"):
        raise UsageError(f"--out {out}: give a file name ending in .html")
    page = build_report(results, stats=stats_dir, fcs_dir=fcs_dir, populations=list(populations) or None,
                        thumbnails=not no_thumbnails)
    write_atomic(Path(out), page.encode("utf-8"))
    click.echo(f"wrote {out} ({len(page) / 1e6:.1f} MB)", err=True)
    return 0
