"""The optimised gating and statistics equal a straightforward implementation, event for event.

The reference below does what the pipeline did before issue 8, in the plainest numpy: every
channel compensated in one matrix product and transformed in full, each gate evaluated on all
events and combined with its parent's mask, thresholds from ``np.percentile`` and
``np.histogram``, singlets from ``np.median``, ellipses and polygons through ``flowutils``
(as FlowKit), intensities from ``np.percentile`` of masked copies. The optimised path gates
parents' events only, sorts instead of partitioning, evaluates ellipses block by block and
reads quantiles from value buckets; masks, gate coordinates, counts and intensities must be
identical (``==``, not approximately).
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest
from flowutils.gating import points_in_ellipsoid, points_in_polygon

from immunoprofile import gating
from immunoprofile.fcs import fcs_bytes, parse_fcs
from immunoprofile.gating import (
    EllipseGate, FmoValue, density_threshold, gate_events, histogram_of_sorted, median_and_mad,
    percentile_of_sorted, prepare,
)
from immunoprofile.pipeline import Options, gate_sample, process_control
from immunoprofile.simulate import simulate_sample
from immunoprofile.stats import intensity_rows
from immunoprofile.templates import (
    ROOT, BooleanGate, PolygonGate, QuadrantGate, RangeGate, ScatterGate, SingletGate, ThresholdGate, load_template,
    parse_template,
)

QS = (15.865525393145708, 50.0, 84.13447460685429)


# ---------------------------------------------------------------- the reference implementation
def reference_density(values: np.ndarray, offset: float = 3.0, bins: int = 256) -> float:
    """density_threshold as first written: np.percentile and np.histogram on the values."""
    from scipy.ndimage import gaussian_filter1d
    from scipy.signal import find_peaks

    v = values[np.isfinite(values)]
    if v.size == 0:
        return float("nan")
    lo, hi = np.percentile(v, [0.5, 99.5])
    if hi <= lo:
        return float(hi)
    counts, edges = np.histogram(v, bins=bins, range=(lo, hi))
    dens = gaussian_filter1d(counts.astype(np.float64), sigma=bins / 100)
    centers = (edges[:-1] + edges[1:]) / 2
    peaks, _ = find_peaks(np.concatenate([[0.0], dens, [0.0]]), prominence=0.05 * dens.max(),
                          height=0.02 * dens.max())
    peaks = peaks - 1
    if len(peaks) >= 2:
        peaks = np.sort(peaks)
        valleys = [a + int(np.argmin(dens[a:b + 1])) for a, b in zip(peaks[:-1], peaks[1:])]
        depth = np.array([dens[v] for v in valleys])
        deep_enough = depth <= max(2.0 * depth.min(), depth.min() + 0.02 * dens.max())
        return float(centers[valleys[int(np.flatnonzero(deep_enough)[0])]])
    mode = centers[peaks[0]] if len(peaks) else centers[int(np.argmax(dens))]
    below = v[v <= mode]
    sd = float(np.std(v)) if below.size < 5 else float(np.sqrt(np.mean((below - mode) ** 2)))
    return float(mode + offset * sd)


class Reference:
    """Full-length columns of one sample, compensated in one product and transformed in full."""

    def __init__(self, sample: Any, template: Any, extra: tuple[str, ...] = ()) -> None:
        data = prepare(sample, template, extra_markers=extra)  # marker -> channel, transforms, matrix
        self.channel_of, self.transforms = data.channel_of, data.transforms
        ev = sample.events
        self.raw = {d: ev[:, c].astype(np.float64) for d, c in self.channel_of.items()}
        if data.spill_inverse is not None:  # the needed columns of inv(spillover), as the pipeline takes them
            dims = [d for d, c in self.channel_of.items() if c in data.spill_columns]
            ks = [data.spill_columns.index(self.channel_of[d]) for d in dims]
            comp = ev[:, list(data.spill_columns)].astype(np.float64) @ data.spill_inverse[:, ks]
            for j, d in enumerate(dims):
                self.raw[d] = comp[:, j].copy()
        self.values = {d: (self.raw[d] if isinstance(t, gating.Identity) else t.apply(self.raw[d]))
                       for d, t in self.transforms.items()}
        self.n = ev.shape[0]


def reference_gate(ref: Reference, template: Any, fmo: dict | None = None) -> tuple[dict, dict]:
    """Masks and gate coordinates, every gate on every event."""
    from scipy.stats import chi2
    from sklearn.mixture import GaussianMixture

    fmo = fmo or {}
    masks = {ROOT: np.ones(ref.n, dtype=bool)}
    coords: dict[str, Any] = {}
    thresholds: dict = {}

    def threshold(th: Any, parent: str) -> float:
        key = (th, parent)
        if key not in thresholds:
            hit = fmo.get((th.marker, parent)) if th.method == "fmo" else None
            method = th.method if th.method != "fmo" else th.fallback
            if hit is not None:
                t = hit.value
            elif method == "fixed":
                t = th.value
            else:
                v = ref.values[th.marker][masks[parent]]
                t = reference_density(v if v.size >= 20 else ref.values[th.marker], offset=th.offset)
            if th.min_value is not None:
                t = max(t, th.min_value)
            if th.max_value is not None:
                t = min(t, th.max_value)
            thresholds[key] = float(t)
        return thresholds[key]

    for pop in template.populations:
        g, parent = pop.gate, masks[pop.parent]
        if isinstance(g, RangeGate):
            m = np.ones(ref.n, dtype=bool)
            for d, lo, hi in zip(g.dims, g.mins, g.maxs):
                if lo is not None:
                    m &= ref.values[d] >= lo
                if hi is not None:
                    m &= ref.values[d] < hi
        elif isinstance(g, ThresholdGate):
            t = threshold(g.threshold, pop.parent)
            v = ref.values[g.threshold.marker]
            m = v >= t if g.side == "above" else v < t
            coords[pop.name] = t
        elif isinstance(g, QuadrantGate):
            tx, ty = threshold(g.x, pop.parent), threshold(g.y, pop.parent)
            vx, vy = ref.values[g.x.marker], ref.values[g.y.marker]
            m = (vx >= tx if g.quadrant[0] == "+" else vx < tx) & (vy >= ty if g.quadrant[1] == "+" else vy < ty)
            coords[pop.name] = (tx, ty)
        elif isinstance(g, PolygonGate):
            m = points_in_polygon(np.asarray(g.vertices, dtype=np.float64),
                                  np.column_stack([ref.values[g.x], ref.values[g.y]]))
        elif isinstance(g, EllipseGate):
            m = points_in_ellipsoid(np.asarray(g.covariance), np.asarray(g.center), g.distance ** 2,
                                    np.column_stack([ref.values[g.x], ref.values[g.y]]))
        elif isinstance(g, ScatterGate):
            idx = np.flatnonzero(parent)
            sub = idx if idx.size <= g.max_events else np.sort(
                np.random.default_rng(0).choice(idx, size=g.max_events, replace=False))
            pts = np.column_stack([ref.values[g.x][sub], ref.values[g.y][sub]])
            scale = np.maximum(np.percentile(np.abs(pts), 99, axis=0), 1e-9)
            gmm = GaussianMixture(n_components=g.components, covariance_type="full", random_state=0, n_init=1,
                                  reg_covar=1e-4).fit(pts / scale)
            means, w = gmm.means_ * scale, gmm.weights_
            if g.select == "largest":
                k = int(np.argmax(w))
            else:
                ok = np.flatnonzero(w >= 0.05)
                ok = ok[means[ok, 0] > 0]
                if ok.size == 0:
                    ok = np.arange(len(w))
                ratio = means[ok, 1] / np.maximum(means[ok, 0], 1e-9)
                close = ok[ratio <= ratio.min() * 1.15]
                k = int(close[np.argmin(means[close, 0])])
            members = gating._merge_close(gmm, k)
            mw = gmm.weights_[members] / gmm.weights_[members].sum()
            mu = (mw[:, None] * gmm.means_[members]).sum(axis=0)
            diffs = gmm.means_[members] - mu
            sigma = sum(wi * (gmm.covariances_[j] + np.outer(d, d)) for wi, j, d in zip(mw, members, diffs))
            cover = g.quantile if g.quantile is not None else gating._auto_coverage(gmm, pts / scale, members, mu,
                                                                                   sigma)
            dist = float(np.sqrt(chi2.ppf(cover, 2)))
            center, cov = mu * scale, sigma * np.outer(scale, scale)
            m = points_in_ellipsoid(cov, center, dist ** 2, np.column_stack([ref.values[g.x], ref.values[g.y]]))
            coords[pop.name] = ([float(c) for c in center], [[float(a) for a in r] for r in cov], dist)
        elif isinstance(g, SingletGate):
            h, a = ref.values[g.height], ref.values[g.area]
            sel = parent & (h > 0)
            r = a[sel] / h[sel]
            med = float(np.median(r))
            mad = float(1.4826 * np.median(np.abs(r - med)))
            lo, hi = max(med - g.mads * mad, 0.0), med + g.mads * mad
            hmax = float(2 * np.max(h[sel]))
            vertices = [[0.0, 0.0], [hmax, lo * hmax], [hmax, hi * hmax]]
            m = points_in_polygon(np.asarray(vertices), np.column_stack([h, a]))
            coords[pop.name] = vertices
        elif isinstance(g, BooleanGate):
            ops = [(~masks[n] if neg else masks[n]) for n, neg in g.operands]
            m = (np.logical_and.reduce(ops) if g.op == "and" else np.logical_or.reduce(ops) if g.op == "or"
                 else ~masks[g.operands[0][0]])
        else:  # pragma: no cover
            raise AssertionError(type(g))
        masks[pop.name] = m & parent
    return masks, coords


def coordinates_of(gates: list[dict]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for row in gates:
        c = json.loads(row["coordinates"])
        if row["gate_type"] == "quadrant":
            out[row["population"]] = (c["x_divider"], c["y_divider"])
        elif row["method"] == "gmm":
            out[row["population"]] = (c["center"], c["covariance"], c["distance"])
        elif row["method"] == "ratio":
            out[row["population"]] = c["vertices"]
        elif row["gate_type"] == "range" and row["method"] in ("density", "fixed", "fmo") and len(c) == 1:
            lo, hi = next(iter(c.values()))
            out[row["population"]] = lo if lo is not None else hi
    return out


def simulated(panel: str, seed: int, events: int = 40_000) -> Any:
    s = simulate_sample(panel, events, extra_channels=2, seed=seed)
    return parse_fcs(fcs_bytes(s.events, s.channels, s.markers, spillover=s.spillover), f"{panel}_{seed}.fcs")


# ---------------------------------------------------------------- whole templates
@pytest.mark.parametrize("panel,template", [("t_cell", "t_cell_exhaustion"), ("nk", "nk_inhibitory")])
@pytest.mark.parametrize("seed", [3, 17, 2026])
def test_optimised_gating_equals_reference_event_for_event(panel, template, seed):
    sample = simulated(panel, seed)
    tpl = load_template(template)
    data = prepare(sample, tpl)
    result = gate_events(data)
    with gating._single_thread_blas():  # one BLAS thread, as the pipeline: threads split a product's rows
        ref = Reference(sample, tpl)
        masks, coords = reference_gate(ref, tpl)
    assert list(result.masks) == list(masks)
    for name, m in masks.items():
        assert np.array_equal(result.masks[name], m), name
        if name in result.index:
            assert np.array_equal(result.index[name], np.flatnonzero(m)), name
    got = coordinates_of(result.gates)
    assert coords and {k: got[k] for k in coords} == coords
    # intensities: np.percentile of masked copies of the fully compensated columns
    markers = [m for m in tpl.markers if not gating.is_scatter(m, data.channel(m))]
    for row in intensity_rows(result, data, markers, "s"):
        want = np.percentile(ref.raw[row["marker"]][masks[row["population"]]], QS, method="inverted_cdf")
        assert row["median_raw"] == want[1]
        assert row["rcv_raw"] == 100.0 * 0.5 * (want[2] - want[0]) / abs(want[1])
        assert row["median_transformed"] == ref.transforms[row["marker"]].apply(want[1:2])[0]


def test_released_masks_give_the_same_masks_counts_and_intensities():
    """``release_masks`` frees the mask block; masks rebuilt from event numbers are the same."""
    from immunoprofile.stats import population_rows

    sample = simulated("t_cell", 23)
    tpl = load_template("t_cell_exhaustion")
    data = prepare(sample, tpl)
    result = gate_events(data)
    before = {name: m.copy() for name, m in result.masks.items()}
    markers = [m for m in tpl.markers if not gating.is_scatter(m, data.channel(m))]
    rows = (population_rows(result, tpl, {"sample_id": "s"}, "x"), intensity_rows(result, data, markers, "s"))
    import gc
    import weakref

    block = weakref.ref(result.masks["T cells"].base)  # the masks are rows of one block
    result.release_masks()
    gc.collect()
    assert block() is None  # freed
    assert list(result.masks) == list(before) and len(result.masks) == len(before)
    for name, m in before.items():
        assert np.array_equal(result.masks[name], m), name
    again = (population_rows(result, tpl, {"sample_id": "s"}, "x"), intensity_rows(result, data, markers, "s"))
    assert again == rows
    with pytest.raises(KeyError):
        result.masks["no such population"]


def test_fmo_thresholds_and_fmo_values_equal_reference(tmp_path):
    tpl = load_template("t_cell_exhaustion")
    stained = simulated("t_cell", 5)
    fmo = {("PD1", "CD4 T"): FmoValue(0.41, "f", 900), ("LAG3", "CD8 T"): FmoValue(0.38, "f", 700)}
    result = gate_events(prepare(stained, tpl), fmo=fmo, fmo_available=True)
    with gating._single_thread_blas():
        masks, coords = reference_gate(Reference(stained, tpl), tpl, fmo)
    for name, m in masks.items():
        assert np.array_equal(result.masks[name], m), name
    assert coordinates_of(result.gates)["CD4 PD1+"] == 0.41
    # an FMO control gated up to the marker's parents: its threshold is the percentile of all values there
    s = simulate_sample("t_cell", 30_000, seed=8, control="PD1")
    path = tmp_path / "fmo.fcs"
    path.write_bytes(fcs_bytes(s.events, s.channels, s.markers, spillover=s.spillover))
    hints = {"PD1": stained.channels[prepare(stained, tpl).channel_of["PD1"]]}
    values, _ = process_control("fmo", str(path), "FMO:PD1", tpl, Options(), hints)
    from immunoprofile.fcs import read_fcs

    data = prepare(read_fcs(path), tpl, channel_hints=hints)
    ref_masks = gate_events(data, only={"CD4 T", "CD8 T"}).masks
    for (marker, parent), fv in values.items():
        want = np.percentile(data.values(marker)[ref_masks[parent]], 99.5)
        assert fv.value == want and fv.n_events == int(ref_masks[parent].sum())


def test_results_do_not_depend_on_threads(monkeypatch):
    sample = simulated("t_cell", 11)
    tpl = load_template("t_cell_exhaustion")
    outs = []
    for threads in ("1", "2"):
        monkeypatch.setenv("IMMUNOPROFILE_THREADS", threads)
        assert gating.worker_threads() == int(threads)
        o = gate_sample(sample, "s", {}, tpl, Options())
        outs.append((o.populations, o.intensities, o.gates))
    assert outs[0] == outs[1]


# ---------------------------------------------------------------- boundary events
def test_threshold_and_range_boundaries_equal_reference():
    # thresholds placed exactly on events' transformed values: >= keeps them, < drops them
    sample = simulated("t_cell", 23, events=20_000)
    tpl0 = load_template("t_cell_exhaustion")
    probe = prepare(sample, tpl0)
    cd3 = probe.values("CD3")
    k = int(np.argsort(cd3)[len(cd3) // 2])
    t, lo, hi = float(cd3[k]), float(np.sort(cd3)[5000]), float(np.sort(cd3)[15000])
    text = f"""name: edges
version: 1.0.0
transforms:
  scatter: identity
  fluorescence: {{type: logicle, T: 262144, W: 0.5, M: 4.5, A: 0}}
populations:
  - name: big
    gate: {{type: range, dimensions: {{FSC-A: [{float(np.sort(probe.values("FSC-A"))[3000])!r}, null]}}}}
  - name: above
    parent: big
    gate: {{type: threshold, marker: CD3, side: above, value: {t!r}}}
  - name: below
    parent: big
    gate: {{type: threshold, marker: CD3, side: below, value: {t!r}}}
  - name: band
    parent: big
    gate: {{type: range, dimensions: {{CD3: [{lo!r}, {hi!r}]}}}}
  - name: quadrant
    parent: big
    gate:
      type: quadrant
      x: {{marker: CD3, value: {t!r}}}
      y: {{marker: CD4, value: {float(probe.values("CD4")[k])!r}}}
      quadrant: "+-"
"""
    tpl = parse_template(text, "edges.yaml")
    result = gate_events(prepare(sample, tpl))
    with gating._single_thread_blas():
        masks, _ = reference_gate(Reference(sample, tpl), tpl)
    for name, m in masks.items():
        assert np.array_equal(result.masks[name], m), name
    big = masks["big"]
    assert result.masks["above"][k] == big[k] and not result.masks["below"][k]
    on_lo = big & (cd3 == lo)
    on_hi = big & (cd3 == hi)
    assert on_lo.any() and result.masks["band"][on_lo].all()  # min inclusive
    assert on_hi.any() and not result.masks["band"][on_hi].any()  # max exclusive
    assert not result.masks["quadrant"][big & (probe.values("CD4") == probe.values("CD4")[k])].any()


@pytest.mark.parametrize("n", [100_001, 2 * 32768 + 1, 32768])
def test_ellipse_boundary_event_lands_as_in_flowutils(n):
    # BLAS on one thread, as the pipeline runs it (threads split the rows, and a lone row is
    # rounded its own way)
    rng = np.random.default_rng(4)
    x, y = rng.normal(5e4, 1e4, n), rng.normal(2e4, 8e3, n)
    cov = np.array([[1.1e8, 2.3e7], [2.3e7, 4.9e7]])
    center = np.array([51234.5, 19876.25])
    with gating._single_thread_blas():
        pts = np.column_stack([x, y]) - center
        d2 = ((pts @ np.linalg.inv(cov)) * pts).sum(axis=1)
        for k in (0, 7, n // 2, n - 1):  # the gate's D^2 is exactly these events' d^2
            want = points_in_ellipsoid(cov, center, d2[k], np.column_stack([x, y]))
            got = gating._points_in_ellipse(x, y, center, cov, d2[k])
            assert np.array_equal(got, want) and got[k]
            x32, y32 = x.astype(np.float32), y.astype(np.float32)
            got32 = gating._points_in_ellipse(x32, y32, center, cov, d2[k])
            assert np.array_equal(got32, points_in_ellipsoid(cov, center, d2[k],
                                                             np.column_stack([x32, y32]).astype(np.float64)))


# ---------------------------------------------------------------- the numeric pieces
def test_density_threshold_is_bit_identical_to_reference():
    rng = np.random.default_rng(9)
    cases = []
    for n in (20, 21, 257, 5000, 120_000):
        cases.append(np.concatenate([rng.normal(0.2, 0.03, n // 2), rng.normal(0.6, 0.05, n - n // 2)]))
        cases.append(rng.normal(0.25, 0.02, n))
        cases.append(np.round(rng.normal(0.3, 0.1, n), 3))  # ties, values on bin edges
    v = rng.normal(0.3, 0.05, 10_000)
    v[::100] = np.nan
    v[1::100] = np.inf
    cases += [v, np.full(50, 0.5), v.astype(np.float32)]
    cases += [c.astype(np.float32) for c in cases[:15]]  # an untransformed, uncompensated channel stays float32
    for c in cases:
        for offset in (3.0, 2.0):
            a, b = density_threshold(c, offset=offset), reference_density(c, offset=offset)
            assert a == b or (np.isnan(a) and np.isnan(b)), (c.size, a, b)


def test_sorted_percentile_and_histogram_equal_numpy():
    rng = np.random.default_rng(12)
    for n, dtype in [(n, dt) for n in list(range(1, 30)) + [1000, 4097, 65537] for dt in (np.float64, np.float32)]:
        v = (rng.normal(0, 1, n) if n % 2 else np.round(rng.normal(0, 2, n), 1)).astype(dtype)
        s = np.sort(v)
        for q in ([0.5, 99.5], [0.0, 100.0], [50.0], [25.0, 75.0]):
            got, want = percentile_of_sorted(s, q), np.percentile(v, q)
            assert got.dtype == want.dtype and np.array_equal(got, want)
        lo, hi = np.percentile(v, [0.5, 99.5])
        if hi > lo:
            edges = np.histogram_bin_edges(v, 16, (lo, hi))
            w = np.concatenate([v, edges.astype(dtype), edges[::3].astype(dtype)])  # values on (or next to) every edge
            counts, got_edges = histogram_of_sorted(np.sort(w), 16, lo, hi)
            want, want_edges = np.histogram(w, 16, (lo, hi))
            assert np.array_equal(counts, want) and np.array_equal(got_edges, want_edges)
    # bins a few ulp wide: no shortcut (np.histogram itself refuses bins narrower than one ulp)
    assert histogram_of_sorted(np.array([1.0, 1.0 + 2.0 ** -40]), 256, 1.0, 1.0 + 2.0 ** -40) is None
    assert histogram_of_sorted(np.array([1.0, 1.0 + 1e-15]), 256, 1.0, 1.0 + 1e-15) is None


def test_median_and_mad_equal_numpy():
    rng = np.random.default_rng(13)
    for n in list(range(1, 40)) + [1000, 1001, 100_000]:
        for v in (rng.normal(1.1, 0.1, n), np.round(rng.normal(1, 0.2, n), 2), rng.lognormal(0, 2, n)):
            med = float(np.median(v))
            assert median_and_mad(v) == (med, float(np.median(np.abs(v - med))))
            assert gating.median(v) == np.median(v)


@pytest.mark.parametrize("n", [50_000, 50_001, 2 * 16384 + 1])
def test_compensation_is_the_same_for_any_even_block_size(n):
    # BLAS computes a lone row (an odd block's last) with another kernel, which may round
    # differently: with even blocks only the very last event of an odd count is alone, as in
    # one product over all events on one thread
    rng = np.random.default_rng(14)
    ev = rng.normal(1000, 500, (n, 9)).astype(np.float32)
    inv = np.linalg.inv(np.eye(6) + rng.uniform(0, 0.1, (6, 6)))
    cols = (1, 2, 3, 5, 7, 8)
    with gating._single_thread_blas():
        want = ev[:, list(cols)].astype(np.float64) @ inv
    for block in (2, 4, 1000, gating._COMP_BLOCK, 65536, 10 ** 6):
        assert np.array_equal(gating.compensate_columns(ev, cols, inv, block=block), want), block
    contiguous = (2, 3, 4, 5, 6, 7)
    with gating._single_thread_blas():
        want = ev[:, list(contiguous)].astype(np.float64) @ inv
    assert np.array_equal(gating.compensate_columns(ev, contiguous, inv, block=778), want)


def test_root_subsample_is_that_of_every_event():
    for n, k in ((5, 10), (10_000, 10_000), (10_001, 10_000), (1_000_000, 10_000)):
        assert np.array_equal(gating._subsample_events(None, n, k), gating._subsample(np.arange(n), k))


def test_values_at_equals_full_column_entries():
    sample = simulated("t_cell", 31, events=5_000)
    tpl = load_template("t_cell_exhaustion")
    idx = np.flatnonzero(np.random.default_rng(0).random(5_000) < 0.3)
    fresh = prepare(sample, tpl)
    full = prepare(sample, tpl)
    for dim in ("FSC-A", "CD3", "PD1"):
        assert np.array_equal(fresh.values_at(dim, idx), full.values(dim)[idx])
    assert "FSC-A" not in fresh._raw  # an uncompensated channel is read without a full-length copy


def test_time_scaled_files_gate_as_if_the_whole_matrix_were_float64():
    """With $TIMESTEP the file's float32 values stay float32 (Time is scaled when read); same results."""
    import dataclasses

    s = simulate_sample("t_cell", 30_000, extra_channels=2, seed=29)
    names = list(s.channels)
    assert "Time" in names
    sample = parse_fcs(fcs_bytes(s.events, s.channels, s.markers, spillover=s.spillover,
                                 keywords={"$TIMESTEP": "0.01"}), "timed.fcs")
    assert sample.matrix.dtype == np.float32 and sample.time_scale == (names.index("Time"), 0.01)
    whole = dataclasses.replace(sample, matrix=sample.events, time_scale=None)
    assert whole.matrix.dtype == np.float64
    tpl = load_template("t_cell_exhaustion")
    a, b = gate_sample(sample, "s", {}, tpl, Options()), gate_sample(whole, "s", {}, tpl, Options())
    assert (a.populations, a.intensities, a.gates) == (b.populations, b.intensities, b.gates)
