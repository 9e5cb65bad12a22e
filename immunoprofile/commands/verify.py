"""``immunoprofile verify``: recheck a results folder against its manifest."""

from __future__ import annotations

import click


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("folder", type=click.Path(file_okay=False))
@click.option("--inputs/--no-inputs", "check_inputs", default=True, show_default=True,
              help="Also recheck the input files (FCS files, sheet, templates) at the paths the manifest recorded.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def verify(folder: str, check_inputs: bool, as_json: bool) -> int:
    """Recheck every file listed in FOLDER/manifest.json (size and sha256) and report
    anything changed or missing.

    Exit status: 0 everything matches; 1 something changed or is missing; 2 FOLDER
    is not a results folder (no readable manifest.json).

    \b
    Example:
      immunoprofile verify results/
      immunoprofile verify --no-inputs archive/2026-05-trial-results/
    """
    from ..errors import EXIT_OK, EXIT_SAMPLES_FAILED
    from ..report import verify_folder

    rep = verify_folder(folder, check_inputs=check_inputs)
    if as_json:
        import json

        click.echo(json.dumps({"folder": rep.folder, "run_id": rep.run_id, "ok": rep.ok,
                               "checked_outputs": rep.checked_outputs, "checked_inputs": rep.checked_inputs,
                               "problems": [{"kind": k, "file": w, "detail": d} for k, w, d in rep.problems],
                               "untracked": rep.untracked}, indent=2))
    else:
        for kind, what, detail in rep.problems:
            click.echo(f"{kind.upper()}: {what}: {detail}")
        for name in rep.untracked:
            click.echo(f"untracked: {name} (not listed in the manifest)")
        checked = f"{rep.checked_outputs} output(s)" + (f" and {rep.checked_inputs} input(s)" if check_inputs else "")
        if rep.ok:
            click.echo(f"OK: {checked} match manifest.json (run {rep.run_id or 'unknown'})")
        else:
            click.echo(f"FAILED: {len(rep.problems)} of {checked} changed or missing since run "
                       f"{rep.run_id or 'unknown'}", err=True)
    return EXIT_OK if rep.ok else EXIT_SAMPLES_FAILED
