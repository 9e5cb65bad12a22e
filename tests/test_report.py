"""The HTML report: content checked against the results it reports, and the page checked in a browser.

The browser test drives headless Chromium (Debian's ``chromium``) over the DevTools
protocol on a pipe (``--remote-debugging-pipe``, stdlib only): it loads the report
from disk and asks the page itself whether every image decoded, collects console
errors, exceptions and network requests, and checks the tables and layout. It skips,
saying why, only where Chromium is absent and cannot be installed.
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
import queue
import re
import shutil
import struct
import subprocess
import threading
import time
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from immunoprofile.batch import run_gate
from immunoprofile.compare import compare_timepoints
from immunoprofile.report_html import CSP, build_report
from immunoprofile.results import load_populations
from immunoprofile.samplesheet import read_sheet
from immunoprofile.simulate import simulate_cohort
from immunoprofile.templates import load_template


# --------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    """3 patients x 2 timepoints, T-cell panel, gated, with a compare output folder."""
    base = tmp_path_factory.mktemp("report")
    simulate_cohort(base / "cohort", patients=3, timepoints=("pre", "post_clofarabine"), events=2500,
                    panels=("t_cell",), seed=5)
    sheet = base / "cohort" / "samplesheet.csv"
    summary = run_gate(read_sheet(sheet), [load_template("t_cell_exhaustion")], base / "results",
                       command_options={"samples": str(sheet)})
    assert summary.failed == 0
    return base


@pytest.fixture(scope="module")
def stats_dir(cohort) -> Path:
    from immunoprofile.cli import main

    out = cohort / "stats"
    with pytest.raises(SystemExit) as e:
        main(["-q", "compare", str(cohort / "results"), "--pre", "pre", "--post", "post_clofarabine", "--out",
              str(out)])
    assert e.value.code == 0
    return out


@pytest.fixture(scope="module")
def page(cohort, stats_dir) -> str:
    return build_report(cohort / "results", stats=stats_dir)


@pytest.fixture(scope="module")
def report_file(cohort, page) -> Path:
    path = cohort / "report.html"
    path.write_text(page, encoding="utf-8")
    return path


class Page(HTMLParser):
    """Tables (id -> rows of cell texts), images and every src/href of an HTML page."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.tables: dict[str, list[list[str]]] = {}
        self.images: list[dict[str, str]] = []
        self.links: list[str] = []
        self.metas: list[dict[str, str]] = []
        self.sections: list[str] = []
        self._table: str | None = None
        self._in_body = False
        self._cell: list[str] | None = None
        self.feed(text)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        for key in ("src", "href"):
            if key in a:
                self.links.append(a[key])
        if tag == "table":
            self._table = a.get("id", "")
            self.tables[self._table] = []
        elif tag == "tbody":
            self._in_body = True
        elif tag == "tr" and self._table is not None and self._in_body:
            self.tables[self._table].append([])
        elif tag in ("td", "th") and self._table is not None and self._in_body:
            self._cell = []
        elif tag == "img":
            self.images.append(a)
        elif tag == "meta":
            self.metas.append(a)
        elif tag == "section":
            self.sections.append(a.get("id", ""))

    def handle_endtag(self, tag: str) -> None:
        if tag == "table":
            self._table = None
        elif tag == "tbody":
            self._in_body = False
        elif tag in ("td", "th") and self._cell is not None and self._table is not None:
            self.tables[self._table][-1].append("".join(self._cell))
            self._cell = None

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)


# --------------------------------------------------------------------------- content
def test_report_holds_every_section_and_table(cohort, stats_dir, page):
    doc = Page(page)
    assert doc.sections == ["summary", "qc", "gating", "populations", "paired-statistics", "longitudinal"]
    pops = pd.read_csv(cohort / "results" / "populations.csv", dtype=str, keep_default_na=False)
    rows = doc.tables["populations-table"]
    assert len(rows) == len(pops)
    assert [r[0] for r in rows] == list(pops["sample_id"])
    assert [r[6] for r in rows] == list(pops["population"])
    paired = pd.read_csv(stats_dir / "paired_stats.csv", dtype=str, keep_default_na=False)
    rows = doc.tables["paired-stats-table"]
    assert len(rows) == len(paired)
    assert [r[5] for r in rows] == list(paired["population"])
    for r, n in zip(rows, paired["n_pairs"]):
        assert r[6] == str(int(float(n)))
    summary = dict(doc.tables["run-summary"])
    manifest = json.loads((cohort / "results" / "manifest.json").read_text())
    assert summary["files gated (samples and FMO controls)"] == str(manifest["summary"].get("succeeded", manifest["summary"].get("ok")))
    pops = pd.read_csv(cohort / "results" / "populations.csv", keep_default_na=False)
    assert summary["stained samples in the results"] == str(pops.sample_id.nunique())
    assert summary["timepoints"] == "pre, post_clofarabine"
    assert summary["patients"] == "3"
    assert [r[0] for r in doc.tables["templates-table"]] == ["t_cell_exhaustion"]
    assert len(doc.tables["inputs-table"]) == len(manifest["inputs"])


def test_report_is_self_contained(page):
    doc = Page(page)
    assert {"http-equiv": "Content-Security-Policy", "content": CSP} in doc.metas
    assert "default-src 'none'" in CSP and "img-src data:" in CSP
    assert doc.links and all(link.startswith(("data:image/png;base64,", "#")) for link in doc.links)
    assert not re.search(r"(?i)(https?:)?//[a-z0-9.-]+\.[a-z]{2,}/", "".join(doc.links))
    assert "<script" not in page.lower() and "@import" not in page and "url(" not in page
    for img in doc.images:
        png = base64.b64decode(img["src"].split(",", 1)[1])
        assert png.startswith(b"\x89PNG\r\n\x1a\n")
        assert struct.unpack(">II", png[16:24]) == (int(img["width"]), int(img["height"]))
        assert img["alt"]


def test_report_draws_a_gating_strip_per_sample_and_the_plots(cohort, page):
    doc = Page(page)
    gates = pd.read_csv(cohort / "results" / "gates.csv", dtype=str, keep_default_na=False)
    samples = list(dict.fromkeys(gates["sample_id"]))
    strips = [i["alt"] for i in doc.images if i["alt"].startswith("gates of ")]
    assert sorted(strips) == sorted(f"gates of {s}" for s in samples)
    assert "trajectories, panel t_cell" in [i["alt"] for i in doc.images]
    assert "fold change post_clofarabine vs pre" in [i["alt"] for i in doc.images]
    assert "not drawn" not in page and "differs from populations.csv" not in page


def test_same_inputs_give_the_same_report(cohort, stats_dir, page):
    assert build_report(cohort / "results", stats=stats_dir) == page


def test_report_computes_statistics_when_no_compare_folder_is_given(cohort):
    text = build_report(cohort / "results", thumbnails=False)
    doc = Page(text)
    expected = compare_timepoints(load_populations(cohort / "results"), ["pre", "post_clofarabine"]).paired
    assert len(doc.tables["paired-stats-table"]) == len(expected)
    assert "Computed for this report: immunoprofile compare RESULTS --timepoints pre,post_clofarabine" in text
    assert "Gating thumbnails were not drawn" in text
    assert not [i for i in doc.images if i["alt"].startswith("gates of ")]


def test_report_lists_failures_and_findings_and_survives_missing_files(cohort, tmp_path):
    results = tmp_path / "results"
    shutil.copytree(cohort / "results", results)
    (results / "failures.csv").write_text(
        "sample_id,file,stage,code,message\nP09_pre_t_cell,P09_pre_t_cell.fcs,gate,FCS_TRUNCATED,"
        "\"P09_pre_t_cell.fcs: $TOT says 1000 events but the DATA segment holds 10; re-export it\"\n")
    (results / "findings.csv").write_text("sample_id,code,severity,message\nP01_pre_t_cell,FMO_MISSING,warning,"
                                          "\"population 'CD4 PD1+': no FMO control for PD1\"\n")
    manifest = json.loads((results / "manifest.json").read_text())
    manifest["options"]["samples"] = str(tmp_path / "moved" / "samplesheet.csv")
    for entry in manifest.get("inputs", []):
        if entry.get("path"):
            entry["path"] = str(tmp_path / "moved" / Path(entry["path"]).name)
    (results / "manifest.json").write_text(json.dumps(manifest))
    text = build_report(results)
    doc = Page(text)
    assert doc.tables["failures-table"] == [["P09_pre_t_cell", "P09_pre_t_cell.fcs", "gate", "FCS_TRUNCATED",
                                             "P09_pre_t_cell.fcs: $TOT says 1000 events but the DATA segment holds "
                                             "10; re-export it"]]
    assert doc.tables["findings-summary-table"] == [["FMO_MISSING", "warning", "1"]]
    assert "1 sample(s) could not be processed" in text
    # FCS files no longer where the sheet was: every strip says why instead of crashing the report
    n = len(set(pd.read_csv(results / "gates.csv")["sample_id"]))
    assert text.count("not drawn: ") == n and "--fcs-dir" in text


def test_cli_report(cohort, stats_dir, tmp_path, capsys):
    from immunoprofile.cli import main

    out = tmp_path / "r.html"
    with pytest.raises(SystemExit) as e:
        main(["report", str(cohort / "results"), "--stats", str(stats_dir), "--no-thumbnails", "--out", str(out)])
    assert e.value.code == 0
    assert out.read_text(encoding="utf-8").startswith("<!DOCTYPE html>")
    with pytest.raises(SystemExit) as e:
        main(["report", str(cohort / "results"), "--out", str(tmp_path / "r.pdf")])
    assert e.value.code == 2
    assert "ending in .html" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["report", str(tmp_path / "nothing"), "--out", str(out)])
    assert e.value.code == 2
    assert "no such file or folder" in capsys.readouterr().err


# --------------------------------------------------------------------------- the browser
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync")
_CHROMIUM: dict[str, str] = {}


def chromium() -> str:
    """Path of Debian's Chromium; installs it with apt-get (as root) once per session, else skips."""
    if "path" in _CHROMIUM:
        return _CHROMIUM["path"]
    if "skip" in _CHROMIUM:
        pytest.skip(_CHROMIUM["skip"])
    found = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)
    reason = ""
    if found is None:
        if os.geteuid() != 0 or shutil.which("apt-get") is None:
            reason = "Chromium is not installed and cannot be (needs root and apt-get): apt-get install chromium"
        else:
            env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
            try:
                subprocess.run(["apt-get", "update", "-qq"], env=env, capture_output=True, timeout=600)
                done = subprocess.run(["apt-get", "install", "-y", "-qq", "chromium"], env=env, capture_output=True,
                                      timeout=900, text=True)
                reason = f"apt-get install chromium failed: {done.stderr.strip()[-300:]}" if done.returncode else ""
            except (OSError, subprocess.TimeoutExpired) as e:
                reason = f"apt-get install chromium failed: {e}"
            found = shutil.which("chromium")
            if found is None and not reason:
                reason = "apt-get installed chromium but there is no chromium command"
    if found is None:
        _CHROMIUM["skip"] = reason
        pytest.skip(reason)
    _CHROMIUM["path"] = found
    return found


class DevTools:
    """A minimal Chrome DevTools Protocol client over ``--remote-debugging-pipe`` (fds 3 and 4)."""

    def __init__(self, exe: str, profile: Path) -> None:
        to_r, to_w = os.pipe()
        from_r, from_w = os.pipe()
        # Chromium reads commands from fd 3 and writes to fd 4; bash moves the pipe ends there (no
        # preexec_fn, unsafe in a threaded process; dash cannot redirect file descriptors above 9).
        # The child's ends are first copied above 9 so that they cannot be 3 or 4 already.
        child_r, child_w = fcntl.fcntl(to_r, fcntl.F_DUPFD, 10), fcntl.fcntl(from_w, fcntl.F_DUPFD, 10)
        os.close(to_r)
        os.close(from_w)
        to_r, from_w = child_r, child_w
        move = f'exec "$0" "$@" 3<&{to_r} 4>&{from_w} {to_r}<&- {from_w}>&-'
        args = [*CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--remote-debugging-pipe", "--window-size=1280,900",
                "about:blank"]
        self.proc = subprocess.Popen([shutil.which("bash") or "/bin/bash", "-c", move, exe, *args],
                                     stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, pass_fds=(to_r, from_w))
        os.close(to_r)
        os.close(from_w)
        self._out = os.fdopen(to_w, "wb", buffering=0)
        self._in = from_r
        self._messages: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self.events: list[dict[str, Any]] = []
        self._id = 0
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        buf = b""
        while True:
            try:
                chunk = os.read(self._in, 1 << 16)
            except OSError:
                break
            if not chunk:
                break
            buf += chunk
            while b"\0" in buf:
                raw, buf = buf.split(b"\0", 1)
                self._messages.put(json.loads(raw))
        self._messages.put(None)

    def _next(self, deadline: float) -> dict[str, Any]:
        try:
            msg = self._messages.get(timeout=max(0.01, deadline - time.monotonic()))
        except queue.Empty:
            raise TimeoutError("Chromium did not answer in time") from None
        if msg is None:
            raise RuntimeError("Chromium closed the DevTools pipe")
        return msg

    def send(self, method: str, params: dict[str, Any] | None = None, session: str | None = None,
             timeout: float = 20) -> dict[str, Any]:
        self._id += 1
        message: dict[str, Any] = {"id": self._id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        self._out.write(json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            msg = self._next(deadline)
            if msg.get("id") == self._id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg["result"]
            self.events.append(msg)

    def wait_for(self, event: str, timeout: float = 20) -> dict[str, Any]:
        for msg in self.events:
            if msg.get("method") == event:
                return msg
        deadline = time.monotonic() + timeout
        while True:
            msg = self._next(deadline)
            self.events.append(msg)
            if msg.get("method") == event:
                return msg

    def close(self) -> None:
        try:
            self.send("Browser.close", timeout=5)
        except (RuntimeError, TimeoutError, OSError):
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._out.close()
        self._reader.join(timeout=10)   # the pipe reaches end of file once Chromium is gone
        if not self._reader.is_alive():
            os.close(self._in)


CHECK_PAGE = """(async () => {
  const images = await Promise.all(Array.from(document.images).map(async (img) => {
    try { await img.decode(); } catch (e) { return {alt: img.alt, ok: false, error: String(e)}; }
    const box = img.getBoundingClientRect();
    return {alt: img.alt, ok: img.complete && img.naturalWidth > 0, natural: [img.naturalWidth, img.naturalHeight],
            size: [img.width, img.height], shown: box.width > 0 && box.height > 0};
  }));
  const tables = {};
  for (const t of document.querySelectorAll('table[id]')) {
    const box = t.getBoundingClientRect();
    tables[t.id] = {rows: t.tBodies.length ? t.tBodies[0].rows.length : 0, height: box.height,
                    header: Array.from(t.tHead ? t.tHead.rows[0].cells : []).map(c => c.textContent)};
  }
  const sections = Array.from(document.querySelectorAll('section')).map(
      s => ({id: s.id, height: s.getBoundingClientRect().height, heading: s.querySelector('h2').textContent}));
  return {images, tables, sections, title: document.title,
          overflow: document.documentElement.scrollWidth - document.documentElement.clientWidth,
          font: getComputedStyle(document.body).fontFamily};
})()"""


def test_report_renders_in_headless_chromium(report_file, cohort, tmp_path):
    exe = chromium()
    browser = DevTools(exe, tmp_path / "profile")
    try:
        target = browser.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = browser.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Runtime", "Log", "Page", "Network"):
            browser.send(f"{domain}.enable", session=session)
        browser.send("Emulation.setDeviceMetricsOverride", {"width": 1280, "height": 900, "deviceScaleFactor": 1,
                                                            "mobile": False}, session=session)
        browser.send("Page.navigate", {"url": report_file.as_uri()}, session=session)
        browser.wait_for("Page.loadEventFired")
        result = browser.send("Runtime.evaluate", {"expression": CHECK_PAGE, "awaitPromise": True,
                                                   "returnByValue": True}, session=session)
        assert "exceptionDetails" not in result, result
        seen = result["result"]["value"]
        problems = _console_problems(browser.events)
        requests = [e["params"]["request"]["url"] for e in browser.events
                    if e.get("method") == "Network.requestWillBeSent"]

        # positive control: the page's policy blocks a fetch, and such a block is seen as an error
        browser.send("Runtime.evaluate", {"expression": "document.body.appendChild(new Image()).src = "
                                                        "'http://127.0.0.1:9/probe.png'; 0"}, session=session)
        blocked = browser.wait_for("Network.loadingFailed", timeout=10)
        browser.send("Runtime.evaluate", {"expression": "0"}, session=session)
    finally:
        browser.close()

    assert problems == [], problems
    assert requests and all(u == report_file.as_uri() or u.startswith("data:image/png;base64,") for u in requests)
    assert blocked["params"].get("blockedReason") == "csp"
    assert _console_problems(browser.events), "the control's CSP violation should have been reported"

    doc = Page(report_file.read_text(encoding="utf-8"))
    images = seen["images"]
    assert len(images) == len(doc.images) > 0
    assert all(i["ok"] and i["shown"] for i in images), [i for i in images if not (i["ok"] and i["shown"])]
    assert all(i["natural"] == [int(d["width"]), int(d["height"])] for i, d in zip(images, doc.images))
    pops = pd.read_csv(cohort / "results" / "populations.csv")
    tables = seen["tables"]
    assert tables["populations-table"]["rows"] == len(pops)
    assert tables["populations-table"]["header"][:2] == ["sample_id", "patient_id"]
    assert tables["paired-stats-table"]["rows"] == len(doc.tables["paired-stats-table"]) > 0
    assert all(t["height"] > 0 for t in tables.values())
    assert [s["id"] for s in seen["sections"]] == doc.sections
    assert all(s["height"] > 40 for s in seen["sections"])
    assert seen["overflow"] <= 0, "the page scrolls sideways at 1280 px"
    assert seen["title"].startswith("immunoprofile report")


def _console_problems(events: list[dict[str, Any]]) -> list[str]:
    out = []
    for e in events:
        method, p = e.get("method"), e.get("params", {})
        if method == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
            out.append("console: " + " ".join(str(a.get("value", a.get("description", ""))) for a in p["args"]))
        elif method == "Runtime.exceptionThrown":
            out.append("exception: " + json.dumps(p.get("exceptionDetails", {}))[:300])
        elif method == "Log.entryAdded" and p["entry"].get("level") == "error":
            out.append(f"log ({p['entry'].get('source')}): {p['entry'].get('text')}")
        elif method == "Network.loadingFailed":
            out.append(f"network: {p.get('errorText')} {p.get('blockedReason', '')}")
    return out
