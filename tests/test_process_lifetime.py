"""What the command and the workers' fork server do at their start and end (docs/performance.md).

- A command run as the process (``immunoprofile ...``, ``python -m immunoprofile``) freezes the
  garbage collector's objects as it ends, so the interpreter's shutdown skips a final collection
  over every imported library; called in process with arguments (tests, scripts), it does not.
- The fork server's last preload module finds the thread-pool libraries once (inherited by every
  worker) and freezes the server's objects.
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from immunoprofile import gating
from immunoprofile.cli import main
from immunoprofile.executor import PRELOAD

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}


def python(code: str) -> str:
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_the_command_freezes_objects_as_the_process_ends() -> None:
    out = python("import gc, sys\n"
                 "from immunoprofile.cli import main\n"
                 "sys.argv = ['immunoprofile', 'templates', 'list']\n"
                 "before = gc.get_freeze_count()\n"
                 "try:\n"
                 "    main()\n"
                 "except SystemExit as e:\n"
                 "    code = e.code\n"
                 "print()\n"
                 "print(before, gc.get_freeze_count(), code)\n")
    before, after, code = out.split("\n")[-2].split()
    assert code in ("0", "None")
    assert int(before) == 0 and int(after) > 1000
    assert "t_cell_exhaustion" in out  # and the command did its work first


def test_the_command_called_in_process_with_arguments_leaves_the_collector_alone(capsys) -> None:
    before = gc.get_freeze_count()
    with pytest.raises(SystemExit) as exc:
        main(["templates", "list"])
    assert exc.value.code in (0, None)
    assert "t_cell_exhaustion" in capsys.readouterr().out
    assert gc.get_freeze_count() == before


def test_an_error_exit_freezes_too_and_keeps_its_code_and_message(tmp_path) -> None:
    proc = subprocess.run([sys.executable, "-m", "immunoprofile", "gate", "-t", "no_such_template",
                           str(tmp_path / "missing.fcs"), "-o", str(tmp_path / "out")],
                          capture_output=True, text=True, env=ENV, timeout=120)
    assert proc.returncode == 2
    assert "no_such_template" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()


def test_the_fork_servers_preload_comes_last_finds_both_thread_pools_and_freezes() -> None:
    assert PRELOAD[-1] == "immunoprofile.preload"
    out = python("import gc, json, importlib\n"
                 "from immunoprofile.executor import PRELOAD\n"
                 "for name in PRELOAD:\n"
                 "    importlib.import_module(name)\n"
                 "from immunoprofile import gating\n"
                 "print(json.dumps([gc.get_freeze_count(), len(gc.get_objects()), sorted(gating._THREADPOOLS)]))\n")
    frozen, tracked, pools = json.loads(out)
    assert frozen > 10_000 and tracked < frozen // 10  # what the imports made is frozen
    assert pools == ["blas:True", "openmp:True"]  # found with scikit-learn loaded, as the workers need them


def test_one_scan_of_the_libraries_serves_blas_and_openmp(monkeypatch) -> None:
    import threadpoolctl

    made = []
    real = threadpoolctl.ThreadpoolController

    class Counting(real):  # type: ignore[misc, valid-type]
        def __init__(self) -> None:
            made.append(1)
            super().__init__()

    monkeypatch.setattr(threadpoolctl, "ThreadpoolController", Counting)
    monkeypatch.setattr(gating, "_THREADPOOLS", {})
    blas, openmp = gating._controller("blas"), gating._controller("openmp")
    assert len(made) == 1
    assert {lib.user_api for lib in blas.lib_controllers} <= {"blas"}
    assert {lib.user_api for lib in openmp.lib_controllers} <= {"openmp"}
    with gating._single_thread_blas():  # and the limits still apply
        assert all(info["num_threads"] == 1 for info in real().select(user_api="blas").info())


def _on_cpus(cpus: set[int], code: str) -> str:
    env = {k: v for k, v in ENV.items() if k != "IMMUNOPROFILE_THREADS"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120,
                          preexec_fn=lambda: os.sched_setaffinity(0, cpus))
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="needs Linux CPU affinity")
def test_cores_are_those_the_cpu_set_allows() -> None:
    # a core facility holds the command to fewer cores with taskset or a scheduler's CPU set:
    # jobs, the side-work pool and a sample's threads all follow it, not the machine's count
    allowed = sorted(os.sched_getaffinity(0))
    code = ("from immunoprofile import background, executor, gating\n"
            "print(executor.default_jobs(), background._cores(), gating.worker_threads())\n")
    assert _on_cpus({allowed[0]}, code).split() == ["1", "1", "1"]
    if len(allowed) >= 2:
        assert _on_cpus(set(allowed[:2]), code).split() == ["2", "2", "2"]
