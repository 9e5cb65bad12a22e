"""Marker resolution: aliases, spellings from real instruments, clear errors."""

from __future__ import annotations

import pytest

from immunoprofile.errors import MarkerError
from immunoprofile.panel import canonical, label_markers, resolve_marker

CHANNELS = ["FSC-A", "FSC-H", "SSC-A", "BV421-A", "PE-A", "PE-Cy7-A", "APC-A", "BV510-A", "Time"]


@pytest.mark.parametrize("label", ["PD-1", "CD279", "PD1", "CD279 (PD-1)", "BV421-A :: PD-1", "pd-1", "PD 1",
                                   "CD279_PD1", "PD-1 BV421"])
def test_pd1_spellings_resolve(label):
    markers = ["", "", "", label, "TIM-3", "LAG-3", "CD85j", "Live/Dead Aqua", ""]
    assert resolve_marker("PD1", CHANNELS, markers) == 3


@pytest.mark.parametrize("name,label", [("TIM3", "CD366"), ("TIM3", "HAVCR2"), ("LAG3", "CD223"),
                                        ("LIR1", "ILT2"), ("LIR1", "LILRB1"), ("LIR1", "CD85j"), ("LIR1", "LIR-1"),
                                        ("NKG2A", "CD159a"), ("NKG2A", "KLRC1"), ("CD57", "B3GAT1"),
                                        ("CD56", "NCAM1"), ("CD16", "FCGR3A"), ("Viability", "Zombie Aqua"),
                                        ("Viability", "Live/Dead"), ("Viability", "7-AAD")])
def test_aliases(name, label):
    markers = ["", "", "", "CD3", label, "", "", "", ""]
    assert resolve_marker(name, CHANNELS, markers) == 4


def test_channel_name_wins_and_marker_in_pnn():
    assert resolve_marker("FSC-A", CHANNELS, [""] * 9) == 0
    # some instruments put the marker only in $PnN
    chans = ["FSC-A", "SSC-A", "CD3 FITC-A", "PD-1 BV421-A"]
    assert resolve_marker("PD1", chans, ["", "", "", ""]) == 3


def test_area_preferred_over_height():
    chans = ["BV421-A", "BV421-H"]
    assert resolve_marker("PD1", chans, ["PD-1", "PD-1"]) == 0


def test_missing_marker_lists_what_file_has_and_closest():
    markers = ["", "", "", "PD-1", "TIM-3", "LAG-3", "CD85j", "Viability", ""]
    with pytest.raises(MarkerError) as e:
        resolve_marker("CD57", CHANNELS, markers, path="pt01.fcs")
    msg = str(e.value)
    assert msg.startswith("pt01.fcs: marker 'CD57' not found")
    assert "BV421-A (PD-1)" in msg and "B3GAT1" in msg
    assert e.value.code == "MARKER_NOT_FOUND"


def test_ambiguous_marker_is_an_error():
    with pytest.raises(MarkerError) as e:
        resolve_marker("PD1", ["BV421-A", "PE-A"], ["PD-1", "CD279"], path="x.fcs")
    assert e.value.code == "MARKER_AMBIGUOUS"
    assert "BV421-A (PD-1)" in str(e.value) and "PE-A (CD279)" in str(e.value)


def test_canonical_and_label_markers():
    assert canonical("cd-279") == "PD1"
    assert canonical("unknownmarker") == "unknownmarker"
    assert label_markers("BV421-A :: CD279 (PD-1)") == {"PD1"}
