"""``immunoprofile inspect FILE...``: what an FCS file holds, and whether it can be read.

Only click and the standard library are imported at module level; the FCS reader
(numpy) is imported when the command runs.
"""

from __future__ import annotations

import glob
import json
import os

import click

_WILDCARDS = set("*?[")


def _expand(patterns: tuple[str, ...]) -> tuple[list[str], list[str]]:
    """Paths for the arguments (globs expanded, sorted), and the patterns that matched nothing."""
    files: list[str] = []
    empty: list[str] = []
    for pattern in patterns:
        if os.path.exists(pattern) or not _WILDCARDS & set(pattern):
            files.append(pattern)
            continue
        matches = sorted(glob.glob(pattern, recursive=True))
        if matches:
            files.extend(matches)
        else:
            empty.append(pattern)
    return files, empty


def _describe(sample) -> dict:  # noqa: ANN001 - FcsSample, imported lazily
    spill = sample.spillover
    return {
        "path": sample.path,
        "ok": True,
        "version": sample.version,
        "sha256": sample.sha256,
        "dataset": sample.dataset,
        "datasets": sample.n_datasets,
        "events": sample.n_events,
        "parameters": len(sample.channels),
        "channels": [
            {"index": i + 1, "channel": c, "marker": m, "bits": b,
             "range": None if r != r else r, "datatype": t}
            for i, (c, m, b, r, t) in enumerate(zip(sample.channels, sample.markers, sample.bits, sample.ranges,
                                                    sample.datatypes))
        ],
        "spillover": None if spill is None else list(spill[0]),
        "findings": [{"code": f.code, "severity": f.severity, "message": f.message} for f in sample.findings],
    }


def _fmt_range(r: float | None) -> str:
    if r is None:
        return "-"
    return str(int(r)) if float(r).is_integer() else f"{r:g}"


def _text_report(d: dict) -> str:
    lines = [d["path"]]
    sets = "" if d["datasets"] == 1 else f" (of {d['datasets']}, numbered from 0)"
    lines.append(f"  version: {d['version']}   data set: {d['dataset']}{sets}   "
                 f"events: {d['events']}   parameters: {d['parameters']}")
    lines.append(f"  sha256: {d['sha256']}")
    rows = [("#", "channel", "marker", "bits", "range")] + [
        (str(c["index"]), c["channel"], c["marker"] or "-", f"{c['bits']}{'' if c['datatype'] == 'I' else c['datatype']}",
         _fmt_range(c["range"])) for c in d["channels"]]
    widths = [max(len(r[k]) for r in rows) for k in range(5)]
    for r in rows:
        lines.append("  " + "  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip())
    if d["spillover"] is None:
        lines.append("  spillover: none")
    else:
        lines.append(f"  spillover: {len(d['spillover'])} channels ({', '.join(d['spillover'])})")
    if d["findings"]:
        lines.append("  findings:")
        for f in d["findings"]:
            lines.append(f"    {f['code']} ({f['severity']}): {f['message']}")
    else:
        lines.append("  findings: none")
    return "\n".join(lines)


@click.command("inspect")
@click.argument("files", nargs=-1, metavar="FILE...")
@click.option("--dataset", type=click.IntRange(min=0), default=0, show_default=True,
              help="Data set to read in files that hold several (numbered from 0).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document (a list, one object per file).")
@click.pass_context
def inspect_cmd(ctx: click.Context, files: tuple[str, ...], dataset: int, as_json: bool) -> None:
    """Check FCS files and show what they hold: version, events, channels, markers,
    bit widths, ranges, spillover, data sets and findings.

    A file that cannot be read is reported with its error and the command goes on
    with the next one. Exit code 0 if every file was read, 1 if any failed, 2 if no
    file was given or a pattern matched nothing.

    \b
    Example:
      immunoprofile inspect 'cohort/*.fcs'
      immunoprofile inspect pt07_pre.fcs --json
    """
    from ..errors import EXIT_SAMPLES_FAILED, EXIT_USAGE, ImmunoprofileError
    from ..fcs import read_fcs

    paths, empty = _expand(files)
    if not files or empty:
        what = "no FILE given" if not files else f"no file matches {', '.join(repr(e) for e in empty)}"
        click.echo(f"error: {what}; give one or more FCS files or a quoted pattern such as 'data/*.fcs'", err=True)
        ctx.exit(EXIT_USAGE)
    reports: list[dict] = []
    failed = 0
    for path in paths:
        try:
            d = _describe(read_fcs(path, dataset=dataset))
        except ImmunoprofileError as e:
            failed += 1
            d = {"path": path, "ok": False, "error": {"code": e.code, "message": str(e)}}
            if not as_json:
                click.echo(f"{path}\n  error [{e.code}]: {e}")
        else:
            if not as_json:
                click.echo(_text_report(d))
        reports.append(d)
        if not as_json and path != paths[-1]:
            click.echo("")
    if as_json:
        click.echo(json.dumps(reports, indent=2, sort_keys=False))
    if failed:
        if not as_json:
            click.echo(f"{failed} of {len(paths)} file(s) could not be read", err=True)
        ctx.exit(EXIT_SAMPLES_FAILED)
