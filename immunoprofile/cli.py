"""The ``immunoprofile`` command line: a thin layer over the library.

Sub-commands live in :mod:`immunoprofile.commands` and are imported only when
used, and they import heavy libraries (flowkit, pandas, matplotlib) inside their
functions, so ``immunoprofile --help`` starts fast.

Exit codes: 0 ok; 1 finished but some samples failed; 2 usage, template or sheet
error (nothing processed); 3 aborted (lock held, disk full, too many failures);
130 interrupted.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import sys
from typing import Any

import click

from . import __version__
from .errors import EXIT_INTERRUPTED, EXIT_SAMPLES_FAILED, EXIT_USAGE, ImmunoprofileError

# name -> "module:attribute" (imported on first use)
COMMANDS: dict[str, str] = {
    "simulate": "immunoprofile.commands.simulate:simulate",
    "gate": "immunoprofile.commands.gate:gate",
    "inspect": "immunoprofile.commands.inspect:inspect_cmd",
    "templates": "immunoprofile.commands.templates:templates",
    "compare": "immunoprofile.commands.compare:compare",
    "plot": "immunoprofile.commands.plot:plot",
    "report": "immunoprofile.commands.report:report",
    "verify": "immunoprofile.commands.verify:verify",
}

log = logging.getLogger("immunoprofile")


class LazyGroup(click.Group):
    """A click group whose sub-commands are imported on demand."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(n for n in COMMANDS if _available(n))

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        target = COMMANDS.get(cmd_name)
        if target is None or not _available(cmd_name):
            return None
        module, attr = target.split(":")
        return getattr(importlib.import_module(module), attr)


def _available(name: str) -> bool:
    module = COMMANDS[name].split(":")[0]
    return importlib.util.find_spec(module) is not None


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time (so in-process callers that swap it are safe)."""

    def __init__(self) -> None:
        super().__init__()

    @property  # type: ignore[override]
    def stream(self):  # noqa: D401
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:  # the base class assigns it; ignore
        pass


def setup_logging(verbosity: int, log_format: str = "text") -> None:
    """Terse stderr logging: WARNING by default, INFO with -v, DEBUG with -vv, ERROR with -q."""
    level = {-1: logging.ERROR, 0: logging.WARNING, 1: logging.INFO}.get(verbosity, logging.DEBUG)
    handler = _StderrHandler()
    if log_format == "json":
        from .logjson import JsonFormatter

        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
    root = logging.getLogger("immunoprofile")
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG)
    handler.setLevel(level)
    root.propagate = False


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="immunoprofile")
@click.option("-v", "--verbose", count=True, help="More messages (-vv for debug).")
@click.option("-q", "--quiet", is_flag=True, help="Only errors.")
@click.option("--log-format", type=click.Choice(["text", "json"]), default="text", show_default=True,
              help="Format of messages on stderr (json for log shippers).")
@click.option("--debug", is_flag=True, help="Show Python tracebacks for errors.")
@click.pass_context
def cli(ctx: click.Context, verbose: int, quiet: bool, log_format: str, debug: bool) -> None:
    """Immune profiling by flow cytometry: gate FCS files with versioned templates,
    compare timepoints with paired statistics, and plot per-patient trajectories.

    \b
    Typical run:
      immunoprofile simulate --out cohort/            # synthetic cohort with known truth
      immunoprofile gate --template t_cell_exhaustion --template nk_inhibitory \\
          --samples cohort/samplesheet.csv --out results/
      immunoprofile compare results/ --pre pre --post post_clofarabine --out stats/
    """
    ctx.ensure_object(dict)
    ctx.obj["debug"] = debug
    ctx.obj["verbosity"] = -1 if quiet else verbose
    ctx.obj["log_format"] = log_format
    setup_logging(ctx.obj["verbosity"], log_format)


def main(argv: list[str] | None = None) -> Any:
    """Entry point: run the CLI and map errors to exit codes.

    Called without ``argv`` (the ``immunoprofile`` command, ``python -m immunoprofile``), the
    process ends here, so the final garbage collection is skipped (:func:`_ending`).
    """
    try:
        _main(argv)
    finally:
        if argv is None:
            _ending()


def _ending() -> None:
    """Let the interpreter skip its final garbage collection over every imported library's objects.

    The process is ending: its outputs are already written, closed and renamed into place
    (never left to a finaliser), and the operating system frees the memory. Without this,
    Python's shutdown spends 0.2-0.3 s walking numpy/pandas/SciPy/scikit-learn objects
    (measured; docs/performance.md). ``atexit`` handlers, thread joins and stream flushes
    still run as usual.
    """
    import gc

    gc.freeze()


def _main(argv: list[str] | None) -> Any:
    debug = "--debug" in (argv if argv is not None else sys.argv[1:])
    try:
        rv = cli.main(args=argv, prog_name="immunoprofile", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("interrupted", err=True)
        sys.exit(EXIT_INTERRUPTED)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(EXIT_INTERRUPTED)
    except click.ClickException as e:
        e.show()
        sys.exit(EXIT_USAGE if e.exit_code == 2 else e.exit_code)
    except ImmunoprofileError as e:
        if debug:
            raise
        click.echo(f"error: {e}", err=True)
        sys.exit(e.exit_code)
    except BrokenPipeError:
        sys.exit(0)
    except Exception as e:  # a bug, not a user mistake: say so plainly
        if debug:
            raise
        click.echo(f"internal error: {type(e).__name__}: {e}\n"
                   "This is a bug in immunoprofile; rerun with --debug for the traceback and report it.", err=True)
        sys.exit(EXIT_SAMPLES_FAILED)
    sys.exit(rv if isinstance(rv, int) else 0)
