"""Gating templates: the bundled ones, precise errors, hashing, and the ``templates`` command."""

from __future__ import annotations

import re
import shutil
import warnings
from pathlib import Path

import pandas as pd
import pytest
from click.testing import CliRunner

from immunoprofile.cli import cli, main
from immunoprofile.errors import TemplateError
from immunoprofile.templates import list_bundled, load_template, parse_template

REPO = Path(__file__).resolve().parents[1]
SAMPLE_DATA = REPO / "sample_data"
FLOWKIT_DATA = REPO.parent / "shared" / "data" / "whitews-FlowKit"

HEAD = "name: t\nversion: 1.0.0\npopulations:\n"
OK_POP = "  - name: a\n    gate: {type: range, dimensions: {FSC-A: [0, 1]}}\n"


# ---------------------------------------------------------------- bundled templates
def test_bundled_templates_load_with_versions_panels_and_gates():
    assert list_bundled() == ["nk_inhibitory", "t_cell_exhaustion"]
    t = load_template("t_cell_exhaustion")
    assert (t.name, t.version, t.panel) == ("t_cell_exhaustion", "1.0.0", "t_cell")
    assert len(t.populations) == 18 and re.fullmatch(r"[0-9a-f]{64}", t.sha256)
    assert t.population("CD8 PD1+LAG3+TIM3+").gate.kind == "boolean"
    assert t.population("CD8 PD1+").reference == "CD8 T" and t.population("T cells").reference == "live"
    assert set(t.fmo_markers()) == {"PD1", "LAG3", "TIM3"}
    nk = load_template("nk_inhibitory")
    assert (nk.name, nk.version, nk.panel, len(nk.populations)) == ("nk_inhibitory", "1.0.0", "nk", 10)
    assert set(nk.fmo_markers()) == {"CD57", "LIR1", "NKG2A"}
    assert nk.population("NK cells").gate.quadrant == "-+"


# ---------------------------------------------------------------- malformed templates
BAD = {
    "wrong_type": (HEAD + "  - name: a\n    gate: {type: rectangel, dimensions: {FSC-A: [0, 1]}}\n",
                   ["line 5 (populations[0].gate.type)", "expected one of 'range', 'rectangle'", "got 'rectangel'"]),
    "unknown_field": (HEAD + "  - name: a\n    parnt: root\n    gate: {type: range, dimensions: {FSC-A: [0, 1]}}\n",
                      ["line 5 (populations[0].parnt)", "(did you mean 'parent'?)", "got 'parnt'"]),
    "unknown_top_field": ("name: t\nversion: 1.0.0\npopulatons: []\n",
                          ["line 3 (populatons)", "(did you mean 'populations'?)"]),
    "missing_parent": (HEAD + "  - name: a\n    parent: b\n    gate: {type: range, dimensions: {FSC-A: [0, 1]}}\n",
                       ["line 5 (populations[0].parent)", "the name of a population defined above (or 'root')",
                        "got 'b'"]),
    "duplicate_name": (HEAD + OK_POP + OK_POP,
                       ["line 6 (populations[1].name)", "a population name used only once", "got 'a'"]),
    "bad_covariance": (HEAD + "  - name: a\n    gate: {type: ellipse, x: FSC-A, y: SSC-A, center: [1, 2], "
                              "covariance: [[1, 2], [2, 1]], distance: 1}\n",
                       ["line 5 (populations[0].gate.covariance)", "a positive-definite covariance matrix",
                        "got [[1, 2], [2, 1]]"]),
    "bad_percentile": (HEAD + "  - name: a\n    gate: {type: threshold, marker: CD3, method: fmo, percentile: 101}\n",
                       ["line 5 (populations[0].gate.percentile)", "a percentile between 50 and 100", "got 101.0"]),
    "not_yaml": ("name: t\nversion: [1.0\npopulations:\n",
                 ["line 3, column 12: not valid YAML", "check indentation and quoting"]),
    "empty": ("", ["the template is empty"]),
    "boolean_unknown_population": (HEAD + OK_POP + "  - name: b\n    gate: {type: boolean, and: [a, c]}\n",
                                   ["line 7 (populations[1].gate.and[1])", "the name of a population defined above",
                                    "got 'c'"]),
    "range_min_above_max": (HEAD + "  - name: a\n    gate: {type: range, dimensions: {FSC-A: [5, 1]}}\n",
                            ["line 5 (populations[0].gate.dimensions.FSC-A)", "expected min < max", "got [5, 1]"]),
    "bad_version": ("name: t\nversion: one\npopulations:\n" + OK_POP,
                    ["line 2 (version)", "a version like 1.0.0", "got 'one'"]),
    "two_vertices": (HEAD + "  - name: a\n    gate: {type: polygon, x: A, y: B, vertices: [[0, 0], [1, 1]]}\n",
                     ["line 5 (populations[0].gate.vertices)", "a list of at least 3 [x, y] vertices"]),
    "text_for_number": (HEAD + "  - name: a\n    gate: {type: range, dimensions: {FSC-A: [low, 1]}}\n",
                        ["line 5 (populations[0].gate.dimensions.FSC-A[0])", "a number or null", "got 'low'"]),
    "bad_quadrant": (HEAD + "  - name: a\n    gate: {type: quadrant, x: {marker: CD3, value: 0.5}, "
                            "y: {marker: CD4, value: 0.5}, quadrant: '+'}\n",
                     ["line 5 (populations[0].gate.quadrant)", "one of '++', '+-', '-+', '--'", "got '+'"]),
    "fixed_without_value": (HEAD + "  - name: a\n    gate: {type: threshold, marker: CD3, method: fixed}\n",
                            ["line 5 (populations[0].gate)", "a 'value' for a fixed threshold"]),
    "bad_transform": ("name: t\nversion: 1.0.0\ntransforms: {fluorescence: {type: logicle, T: -1}}\n"
                      "populations:\n" + OK_POP,
                      ["line 3 (transforms.fluorescence)", "logicle transform: T=-1 must be > 0"]),
    "unknown_reference": (HEAD + "  - name: a\n    reference: zzz\n    gate: {type: range, dimensions: "
                                 "{FSC-A: [0, 1]}}\n",
                          ["line 5 (populations[0].reference)", "got 'zzz'"]),
    "beads_population": (HEAD + OK_POP + "beads: {population: q, beads_per_test: 1000, volume_ul: 50}\n",
                         ["line 6 (beads.population)", "a population of this template", "got 'q'"]),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_malformed_template_errors_give_file_line_and_field(case, tmp_path):
    text, parts = BAD[case]
    path = tmp_path / f"{case}.yaml"
    path.write_text(text)
    with pytest.raises(TemplateError) as e:
        load_template(str(path))
    msg = str(e.value)
    assert msg.startswith(f"{path}: "), msg
    for part in parts:
        assert part in msg, f"{part!r} not in {msg!r}"
    assert e.value.exit_code == 2


def test_unknown_bundled_name_lists_the_bundled_templates():
    with pytest.raises(TemplateError) as e:
        load_template("t_cell_exhaustoin")
    assert e.value.code == "TEMPLATE_NOT_FOUND"
    assert str(e.value) == ("unknown template 't_cell_exhaustoin'; bundled templates: nk_inhibitory, "
                            "t_cell_exhaustion; give a bundled name or the path to a template file")


# ---------------------------------------------------------------- hashing
def test_hash_ignores_comments_and_formatting_but_not_content():
    block = """# a comment
name: h
version: 1.0.0
populations:
  - name: cells   # trailing comment
    gate:
      type: range
      dimensions:
        FSC-A: [1000, 200000]
"""
    flow = 'version: "1.0.0"\nname: h\npopulations: [{gate: {dimensions: {FSC-A: [1000, 200000]}, type: range}, ' \
           "name: cells}]\n"
    a, b = parse_template(block, "a.yaml"), parse_template(flow, "b.yaml")
    assert a.sha256 == b.sha256
    changed = parse_template(block.replace("200000", "200001"), "c.yaml")
    assert changed.sha256 != a.sha256
    renamed = parse_template(block.replace("name: cells", "name: Cells"), "d.yaml")
    assert renamed.sha256 != a.sha256
    assert parse_template(block.replace("1.0.0", "1.0.1"), "e.yaml").sha256 != a.sha256


# ---------------------------------------------------------------- the templates command
def run(*args: str):
    return CliRunner().invoke(cli, ["templates", *args])


def run_main(capsys, *args: str) -> tuple[int, str, str]:
    """Through ``main``: the real exit code mapping (errors -> 2)."""
    with pytest.raises(SystemExit) as e:
        main(["templates", *args])
    out = capsys.readouterr()
    return e.value.code, out.out, out.err


def test_list_shows_both_bundled_templates_with_versions():
    res = run("list")
    assert res.exit_code == 0
    lines = res.stdout.splitlines()
    assert lines[0].split() == ["NAME", "VERSION", "PANEL", "POPULATIONS", "DESCRIPTION"]
    rows = {ln.split()[0]: ln.split()[1:4] for ln in lines[1:]}
    assert rows == {"nk_inhibitory": ["1.0.0", "nk", "10"], "t_cell_exhaustion": ["1.0.0", "t_cell", "18"]}


def test_show_prints_populations_with_parents_and_gates():
    res = run("show", "t_cell_exhaustion")
    assert res.exit_code == 0
    out = res.stdout
    assert out.startswith("t_cell_exhaustion 1.0.0\n")
    assert f"sha256:       {load_template('t_cell_exhaustion').sha256}" in out
    assert "fluorescence=logicle(T=262144,W=0.5,M=4.5,A=0)" in out
    assert re.search(r"^  POPULATION\s+PARENT\s+REFERENCE\s+GATE$", out, re.M)
    assert re.search(r"^  CD4 PD1\+\s+CD4 T\s+CD4 T\s+threshold PD1 >= FMO 99.5th percentile, else density$",
                     out, re.M)
    assert re.search(r"^  CD8 T\s+T cells\s+live\s+quadrant -\+ of CD4 \(density\) x CD8 \(density\)$", out, re.M)
    assert re.search(r"^  CD4 PD1\+LAG3\+\s+CD4 T\s+CD4 T\s+boolean and: CD4 PD1\+, CD4 LAG3\+$", out, re.M)
    assert re.search(r"^  lymphocytes\s+root\s+root\s+scatter FSC-A/SSC-A: Gaussian mixture", out, re.M)
    assert "populations (18):" in out


def test_show_an_external_template():
    wsp = FLOWKIT_DATA / "simple_diamond_example" / "test_data_diamond_asinh_rect.wsp"
    if not wsp.exists():
        pytest.skip(f"{wsp} is absent")
    res = run("show", str(wsp))
    assert res.exit_code == 0
    assert "test_data_diamond_asinh_rect flowjo-wsp" in res.stdout
    assert re.search(r"upper_right\s+root\s+root\s+range channel_A/channel_B \[upper_right\]", res.stdout)


def test_validate_exit_codes_and_precise_errors(tmp_path, capsys):
    good = tmp_path / "good.yaml"
    good.write_text(HEAD + OK_POP)
    bad = tmp_path / "bad.yaml"
    bad.write_text(BAD["unknown_field"][0])
    res = run("validate", str(good), "t_cell_exhaustion")
    assert res.exit_code == 0
    assert f"ok: {good}: t 1.0.0, 1 populations, sha256 {load_template(str(good)).sha256[:12]}" in res.stdout
    res = run("validate", str(good), str(bad))
    assert res.exit_code == 2
    assert (f"invalid: {bad}: line 5 (populations[0].parnt): expected one of the fields name, parent, gate, "
            "reference, description (did you mean 'parent'?), got 'parnt'") in res.stderr
    assert "1 of 2 template(s) invalid" in res.stderr
    code, _, err = run_main(capsys, "validate", str(bad))
    assert code == 2 and "did you mean 'parent'?" in err


FIXED = """name: fixed_panel
version: 1.2.0
populations:
  - name: cells
    gate: {type: range, dimensions: {FSC-A: [20000, 200000], SSC-A: [null, 150000]}}
  - name: T cells
    parent: cells
    gate: {type: threshold, marker: CD3, side: above, value: 0.45}
  - name: CD4 T
    parent: T cells
    gate: {type: quadrant, x: {marker: CD4, value: 0.4}, y: {marker: CD8, value: 0.4}, quadrant: "+-"}
"""


def _sample(name: str) -> Path:
    p = SAMPLE_DATA / name
    if not p.exists():
        pytest.skip(f"{p} is absent")
    return p


def _flowkit_counts(xml: Path, fcs: Path) -> dict[str, int]:
    import flowkit as fk

    gs = fk.parse_gating_xml(str(xml))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = gs.gate_sample(fk.Sample(str(fcs)))
    return {gid: int(res.get_gate_count(gid)) for gid, _ in gs.get_gate_ids()}


def test_export_fixed_template_writes_gatingml_flowkit_parses(tmp_path):
    fcs = _sample("P01_pre_t_cell.fcs")
    tpl = tmp_path / "fixed_panel.yaml"
    tpl.write_text(FIXED)
    out = tmp_path / "fixed_panel.xml"
    res = run("export", str(tpl), "--sample", str(fcs), "--out", str(out))
    assert res.exit_code == 0, res.output
    assert f"wrote {out}: 3 gates of fixed_panel 1.2.0" in res.stderr
    counts = _flowkit_counts(out, fcs)
    assert set(counts) == {"cells", "T_cells", "CD4_T"}
    gated = tmp_path / "results"
    res = CliRunner().invoke(cli, ["gate", "-t", str(tpl), str(fcs), "--out", str(gated)])
    assert res.exit_code == 0, res.output
    pops = pd.read_csv(gated / "populations.csv").set_index("population")["count"]
    assert {"cells": counts["cells"], "T cells": counts["T_cells"], "CD4 T": counts["CD4_T"]} == pops.to_dict()
    assert counts["CD4_T"] > 0


def test_export_refuses_data_driven_template_without_resolved(tmp_path, capsys):
    fcs = _sample("P01_pre_t_cell.fcs")
    code, _, err = run_main(capsys, "export", "t_cell_exhaustion", "--sample", str(fcs), "--out",
                            str(tmp_path / "x.xml"))
    assert code == 2
    assert "t_cell_exhaustion.yaml: 12 gate(s) are computed from the data and have no fixed coordinates" in err
    assert "lymphocytes (scatter gate on FSC-A/SSC-A)" in err and "CD8 TIM3+ (threshold on TIM3 (fmo))" in err
    assert "--resolved RESULTS_DIR --sample-id ID" in err
    assert not (tmp_path / "x.xml").exists()
    code, _, err = run_main(capsys, "export", "t_cell_exhaustion", "--sample", str(fcs), "--out",
                            str(tmp_path / "x.xml"), "--resolved", str(tmp_path))
    assert code == 2 and "--resolved and --sample-id go together" in err


def test_export_resolved_gates_of_one_sample_reproduce_its_counts(tmp_path, capsys):
    fcs = _sample("P01_pre_t_cell.fcs")
    local = tmp_path / "P01_pre_t_cell.fcs"
    shutil.copyfile(fcs, local)
    results = tmp_path / "results"
    res = CliRunner().invoke(cli, ["gate", "-t", "t_cell_exhaustion", str(local), "--out", str(results)])
    assert res.exit_code == 0, res.output
    out = tmp_path / "P01_pre_t_cell.xml"
    res = run("export", "t_cell_exhaustion", "--sample", str(local), "--resolved", str(results),
              "--sample-id", "P01_pre_t_cell", "--out", str(out))
    assert res.exit_code == 0, res.output
    assert "data-driven gates from sample 'P01_pre_t_cell'" in res.stderr
    pops = pd.read_csv(results / "populations.csv")
    counts = _flowkit_counts(out, local)
    from immunoprofile.interop import gatingml_id

    assert len(pops) == 18
    for _, row in pops.iterrows():
        assert counts[gatingml_id(row["population"])] == row["count"], row["population"]
    code, _, err = run_main(capsys, "export", "t_cell_exhaustion", "--sample", str(local), "--resolved",
                            str(results), "--sample-id", "nobody", "--out", str(tmp_path / "y.xml"))
    assert code == 2
    assert "no gates of sample 'nobody' with template 't_cell_exhaustion'; samples gated with it: P01_pre_t_cell" \
        in err
