"""Tests for immunoprofile.transform: transforms and compensation against FlowKit/flowutils.

Truth comes from elsewhere: ``flowutils`` (the C logicle of Moore & Parks that FlowKit
calls), FlowKit's transform and ``Matrix`` objects, ``np.linalg.solve``, pandas reading
the same matrix files, and closed forms (``np.arcsinh``).
"""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

flowutils = pytest.importorskip("flowutils")

from immunoprofile.errors import CompensationError, InputFileError, TemplateError  # noqa: E402
from immunoprofile.transform import (  # noqa: E402
    Asinh,
    Identity,
    Linear,
    Log,
    Logicle,
    Transform,
    compensate,
    compensation_matrix_from_csv,
    transform_from_spec,
)

DATA = Path(__file__).parents[1].parent / "shared" / "data"
FLOWKIT_DATA = DATA / "whitews-FlowKit"

# (T, W, M, A): the default, wide linear region, W = 0 (= arcsinh), extra negative
# decades, A = -W (zero at 0), another T, T = 1, W = M/2 (the largest allowed).
LOGICLE_PARAMS = [
    (262144.0, 0.5, 4.5, 0.0),
    (262144.0, 1.0, 4.5, 0.0),
    (262144.0, 0.0, 4.5, 0.0),
    (262144.0, 0.5, 4.5, 1.0),
    (262144.0, 0.5, 4.5, -0.5),
    (10000.0, 0.3, 4.0, 0.2),
    (1.0, 0.5, 4.5, 0.0),
    (262144.0, 2.25, 4.5, 0.0),
]
LOGICLE_TOLERANCE = 1e-10  # the contract is 1e-6; the table achieves ~1.5e-11


def _fu_logicle(x: np.ndarray, t: float, w: float, m: float, a: float) -> np.ndarray:
    return flowutils.transforms.logicle(np.asarray(x, dtype=np.float64), None, t=t, m=m, w=w, a=a)


def _logicle_grid(t: float, w: float, seed: int = 0) -> np.ndarray:
    """Dense and random points over [-1e5, 1e7] (scaled to T), plus exact and table points."""
    scale = t / 262144.0
    rng = np.random.default_rng(seed)
    logs = np.geomspace(1e-3, 1e7, 100_001) * scale
    kernel = Logicle(t=t, w=w)._kernel
    j = np.arange(kernel.n_pieces + 1)
    nodes = np.ldexp(1.0 + (j & 127) / 128.0, int(math.log2(kernel.sigma)) + (j >> 7)) - kernel.sigma
    nodes = nodes[(nodes >= 1e-3 * scale) & (nodes <= 1e7 * scale)]
    near_nodes = np.concatenate([nodes, np.nextafter(nodes, -np.inf), np.nextafter(nodes, np.inf)])
    points = [
        np.linspace(-1e5, 1e7, 300_001) * scale,
        logs,
        -logs[logs <= 1e5 * scale],
        rng.normal(0, 2000, 50_000) * scale + rng.lognormal(6, 2.5, 50_000) * scale,
        near_nodes,
        -near_nodes[near_nodes <= 1e5 * scale],
        np.array([0.0, -0.0, t, -t, t * 10 ** -4.5, -t * 10 ** -4.5, 1e-3 * scale]),
    ]
    return np.concatenate(points)


# ----------------------------------------------------------------- logicle


@pytest.mark.parametrize("params", LOGICLE_PARAMS, ids=lambda p: "T{:g}-W{:g}-M{:g}-A{:g}".format(*p))
def test_logicle_matches_flowutils_over_the_range(params):
    t, w, m, a = params
    x = _logicle_grid(t, w)
    ours = Logicle(t, w, m, a).apply(x)
    truth = _fu_logicle(x, t, w, m, a)
    error = np.abs(ours - truth)
    worst = int(np.argmax(error))
    assert error[worst] <= LOGICLE_TOLERANCE, f"max |error| {error[worst]:.3g} at x={x[worst]!r}"


@pytest.mark.parametrize("params", LOGICLE_PARAMS[:4], ids=lambda p: "T{:g}-W{:g}-M{:g}-A{:g}".format(*p))
def test_logicle_exact_solver_matches_flowutils_to_rounding(params):
    t, w, m, a = params
    x = np.concatenate([np.linspace(-1e5, 1e7, 20_001), np.geomspace(1e-3, 1e7, 2001)]) * t / 262144
    exact = Logicle(t, w, m, a).apply_exact(x)
    assert np.max(np.abs(exact - _fu_logicle(x, t, w, m, a))) <= 4e-15


def test_logicle_matches_flowkit_transform_on_real_compensated_events(shared_data):
    flowkit = pytest.importorskip("flowkit")
    from immunoprofile.fcs import read_fcs

    path = FLOWKIT_DATA / "100715.fcs"
    if not path.is_file():
        pytest.skip(f"{path} is absent")
    sample = read_fcs(path)
    names, spill = sample.spillover
    comp = compensate(sample.events, [sample.channels.index(n) for n in names], spill)
    ours = Logicle(262144, 0.5, 4.5, 0)
    fk_obj = flowkit.transforms.LogicleTransform(param_t=262144, param_w=0.5, param_m=4.5, param_a=0)
    assert ours.to_flowkit("logicle_default") == fk_obj
    assert np.max(np.abs(ours.apply(comp) - fk_obj.apply(comp))) <= LOGICLE_TOLERANCE
    assert comp.min() < -1000  # compensation produced negatives, so both branches were compared


def test_logicle_exact_points_and_special_values():
    tr = Logicle()
    zero = (0.5 + 0.0) / (4.5 + 0.0)
    y = tr.apply(np.array([0.0, -0.0, 262144.0, -262144.0, np.nan, np.inf, -np.inf]))
    assert y[0] == zero and y[1] == zero and tr.zero == zero
    assert abs(y[2] - 1.0) <= 1e-14
    assert y[3] == pytest.approx(2 * zero - 1.0, abs=1e-14)
    assert np.isnan(y[4]) and y[5] == np.inf and y[6] == -np.inf
    # beyond the table (> T * 2**46): closed form, equal to flowutils where flowutils converges
    big = np.array([2e19, 1e22, -1e22, 1e25])
    assert np.max(np.abs(tr.apply(big) - _fu_logicle(big, 262144, 0.5, 4.5, 0))) <= 1e-13
    # flowutils returns -1 (no convergence) at 1e300; the closed-form inverse is the truth
    huge = np.array([1e300, -1e300, 1.7e308])
    np.testing.assert_allclose(tr.inverse(tr.apply(huge)), huge, rtol=1e-13)
    assert np.all(_fu_logicle(huge[:1], 262144, 0.5, 4.5, 0) == -1.0)


def test_logicle_with_w_zero_equals_asinh_even_where_flowutils_fails():
    x = np.concatenate([np.geomspace(1e-12, 1e7, 5001), -np.geomspace(1e-12, 1e5, 2001), [0.0]])
    ours = Logicle(262144, 0.0, 4.5, 0.0).apply(x)
    closed = Asinh(262144, 4.5, 0.0).apply(x)  # Gating-ML 2.0: fasinh == logicle with W = 0
    assert np.max(np.abs(ours - closed)) <= LOGICLE_TOLERANCE
    assert _fu_logicle(np.array([1e-9]), 262144, 0.0, 4.5, 0.0)[0] == -1.0  # flowutils' failure


def test_logicle_depends_on_x_over_t_only_even_for_extreme_t():
    x = np.concatenate([np.linspace(-0.5, 40, 4001), np.geomspace(1e-9, 1e3, 2001)])
    unit = Logicle(1.0, 0.5, 4.5, 0.0).apply(x)
    for t in (1e-250, 3.0, 262144.0, 1e250):
        np.testing.assert_allclose(Logicle(t, 0.5, 4.5, 0.0).apply(x * t), unit, rtol=0, atol=LOGICLE_TOLERANCE)


def test_logicle_is_monotone_and_odd_about_zero():
    tr = Logicle(262144, 0.5, 4.5, 0.7)
    x = np.sort(_logicle_grid(262144, 0.5, seed=3))
    y = tr.apply(x)
    assert np.all(np.diff(y) >= 0)
    assert np.all(np.diff(y)[np.diff(x) > 1e-9 * np.abs(x[1:])] > 0)
    pos = x[x > 0]
    np.testing.assert_allclose(tr.apply(-pos) - tr.zero, tr.zero - tr.apply(pos), rtol=0, atol=4e-16)


def test_logicle_accepts_float32_strided_and_nd_input_without_touching_it():
    rng = np.random.default_rng(7)
    events = (rng.normal(0, 3000, (40_000, 6)) + rng.lognormal(6, 2, (40_000, 6))).astype(np.float32)
    before = events.copy()
    tr = Logicle()
    whole = tr.apply(events)
    assert whole.dtype == np.float64 and whole.shape == events.shape
    np.testing.assert_array_equal(whole, tr.apply(events.astype(np.float64)))
    np.testing.assert_array_equal(tr.apply(events[:, 2]), whole[:, 2])  # strided float32 column
    np.testing.assert_array_equal(tr.apply(events.T), whole.T)  # non-contiguous 2-d
    np.testing.assert_array_equal(tr.apply(events[:, 2].astype(np.int64)), tr.apply(np.trunc(events[:, 2])))
    np.testing.assert_array_equal(events, before)
    assert tr.apply(np.array([], dtype=np.float32)).shape == (0,)
    assert np.max(np.abs(whole - _fu_logicle(events, 262144, 0.5, 4.5, 0))) <= LOGICLE_TOLERANCE


@pytest.mark.parametrize("params", LOGICLE_PARAMS, ids=lambda p: "T{:g}-W{:g}-M{:g}-A{:g}".format(*p))
def test_logicle_inverse_is_closed_form_and_round_trips(params):
    t, w, m, a = params
    tr = Logicle(t, w, m, a)
    y = np.linspace(-0.4, 1.6, 20_001)
    truth = flowutils.transforms.logicle_inverse(y, None, t=t, m=m, w=w, a=a)
    ours = tr.inverse(y)
    assert np.all(np.abs(ours - truth) <= 1e-13 * np.abs(truth) + 1e-12 * t)
    np.testing.assert_allclose(tr.apply(ours), y, rtol=0, atol=LOGICLE_TOLERANCE)
    x = _logicle_grid(t, w, seed=1)
    back = tr.inverse(tr.apply(x))
    assert np.all(np.abs(back - x) <= 2e-9 * np.abs(x) + 1e-9 * t)
    exact_back = tr.inverse(tr.apply_exact(x))
    assert np.all(np.abs(exact_back - x) <= 1e-13 * np.abs(x) + 1e-12 * t)


@settings(max_examples=40, deadline=None, derandomize=True)
@given(
    t=st.floats(1.0, 1e7),
    m=st.floats(2.0, 7.0),
    w_frac=st.one_of(st.just(0.0), st.floats(0.02, 1.0)),  # flowutils fails near 0 for W ~ 0
    a_frac=st.floats(0.0, 1.0),
    x=st.lists(st.floats(-1e6, 1e8, allow_nan=False), min_size=1, max_size=50),
)
def test_logicle_matches_flowutils_for_any_valid_parameters(t, m, w_frac, a_frac, x):
    w = w_frac * m / 2
    a = -w + a_frac * (m - w)  # -W <= A <= M - 2W
    tr = Logicle(t, w, m, a)
    values = np.asarray(x) * (t / 262144.0)
    values = values[np.abs(values) >= 1e-6 * t] if w == 0 else values  # flowutils fails near 0 at W=0
    assert np.all(np.abs(tr.apply(values) - _fu_logicle(values, t, w, m, a)) <= LOGICLE_TOLERANCE)


# ----------------------------------------------------------------- closed-form transforms


def test_asinh_log_linear_match_flowutils_and_flowkit():
    flowkit = pytest.importorskip("flowkit")
    rng = np.random.default_rng(11)
    x = np.concatenate([np.linspace(-1e5, 1e7, 100_001), rng.normal(0, 5000, 10_000)])
    pos = np.concatenate([np.geomspace(1e-3, 1e7, 10_001), rng.lognormal(6, 2, 10_000)])
    cases = [
        (Asinh(262144, 4.5, 0.0), x, flowutils.transforms.asinh(x, None, t=262144, m=4.5, a=0.0)),
        (Asinh(10000, 4.0, 1.0), x, flowutils.transforms.asinh(x, None, t=10000, m=4.0, a=1.0)),
        (Log(262144, 4.5), pos, flowutils.transforms.log(pos, None, t=262144, m=4.5)),
        (Log(1000, 3.0), pos, flowutils.transforms.log(pos, None, t=1000, m=3.0)),
        (Linear(262144, 0.0), x, (x + 0.0) / 262144),
        (Linear(1000, 100), x, (x + 100) / 1100),
    ]
    for tr, values, truth in cases:
        ours = tr.apply(values)
        np.testing.assert_allclose(ours, truth, rtol=1e-14, atol=1e-15, err_msg=repr(tr))
        np.testing.assert_allclose(tr.to_flowkit("id").apply(values), ours, rtol=1e-14, atol=1e-15)
        back = tr.inverse(ours)
        np.testing.assert_allclose(back, values, rtol=1e-11, atol=1e-9 * tr.t, err_msg=repr(tr))
    assert isinstance(Asinh().to_flowkit("a"), flowkit.transforms.AsinhTransform)
    assert isinstance(Log().to_flowkit("l"), flowkit.transforms.LogTransform)


def test_asinh_equals_logicle_with_w_zero_as_gating_ml_says():
    x = np.linspace(-1e5, 1e7, 50_001)
    for t, m, a in [(262144, 4.5, 0.0), (262144, 4.5, 1.5), (5000, 3.0, 0.5)]:
        assert np.max(np.abs(Asinh(t, m, a).apply(x) - Logicle(t, 0.0, m, a).apply(x))) <= 1e-11


def test_asinh_cofactor_is_exactly_asinh_of_x_over_c():
    x = np.linspace(-2000, 50_000, 10_001)
    for c in (5.0, 150.0, 6000.0):
        tr = transform_from_spec({"type": "asinh", "cofactor": c})
        np.testing.assert_allclose(tr.apply(x), np.arcsinh(x / c), rtol=1e-14, atol=1e-15)
        assert tr.cofactor == pytest.approx(c, rel=1e-14)
        assert transform_from_spec(tr.to_spec()) == tr


def test_log_of_zero_and_negatives_is_minus_inf_and_nan_without_warning():
    y = Log().apply(np.array([0.0, -5.0, 262144.0, 26.2144]))  # filterwarnings=error catches any warning
    assert y[0] == -np.inf and np.isnan(y[1]) and y[2] == 1.0
    assert y[3] == pytest.approx(1 - 4 / 4.5, abs=1e-15)


def test_identity_returns_a_float64_copy_and_flowkit_identity():
    x = np.array([[1.5, -2.0], [3.0, 4.0]], dtype=np.float32)
    y = Identity().apply(x)
    assert y.dtype == np.float64 and np.array_equal(y, x)
    y[0, 0] = 99
    assert x[0, 0] == 1.5
    np.testing.assert_array_equal(Identity().to_flowkit("raw").apply(y), y)


def test_inputs_are_never_modified_and_outputs_are_float64():
    x32 = np.linspace(-100, 1e5, 1001, dtype=np.float32)
    keep = x32.copy()
    for tr in (Identity(), Linear(), Log(), Asinh(), Logicle()):
        y = tr.apply(x32)
        assert y.dtype == np.float64 and y.shape == x32.shape
        assert isinstance(tr, Transform)
        assert tr.inverse(y).dtype == np.float64
    np.testing.assert_array_equal(x32, keep)
    with pytest.raises(TypeError):
        Logicle().apply(np.array(["1"]))


# ----------------------------------------------------------------- specs


def test_params_and_spec_round_trip_with_stable_key_order():
    cases = {
        Identity(): [],
        Linear(1000, 10): ["T", "A"],
        Log(262144, 5): ["T", "M"],
        Asinh(262144, 4.5, 1): ["T", "M", "A"],
        Logicle(262144, 0.7, 4.5, 0.2): ["T", "W", "M", "A"],
    }
    for tr, keys in cases.items():
        assert list(tr.params()) == keys
        assert all(isinstance(v, float) for v in tr.params().values())
        spec = tr.to_spec()
        assert spec["type"] == tr.kind
        assert transform_from_spec(spec) == tr
        assert transform_from_spec(tr.kind) == type(tr)()


def test_spec_forms_are_case_insensitive_with_gating_ml_aliases():
    assert transform_from_spec("logicle") == Logicle()
    assert transform_from_spec(" Logicle ") == Logicle()
    assert transform_from_spec({"type": "logicle", "T": 262144, "W": 0.5, "M": 4.5, "A": 0}) == Logicle()
    assert transform_from_spec({"Type": "LOGICLE", "t": 10000, "w": 1}) == Logicle(t=10000, w=1)
    assert transform_from_spec({"type": "flin", "T": "2.6e5"}) == Linear(t=260000)  # YAML 1.1 string
    assert transform_from_spec({"type": "fasinh", "M": 4}) == Asinh(m=4)
    assert transform_from_spec({"type": "flog"}) == Log()
    assert transform_from_spec(Logicle(w=1)) == Logicle(w=1)
    assert Logicle(t=262144) == Logicle(t=262144.0) and hash(Logicle(t=262144)) == hash(Logicle())


WHERE = "template t_cell_exhaustion.yaml, transforms.PD1"


@pytest.mark.parametrize(
    "spec, expected",
    [
        ("logicel", r"unknown transform type 'logicel'.*logicle"),
        ({"type": "biex"}, r"biex.*not supported"),
        ({"T": 262144}, r"no 'type'"),
        ({"type": "logicle", "Q": 1}, r"unknown key 'Q' for a logicle transform; expected T, W, M, A"),
        ({"type": "log", "W": 1}, r"unknown key 'W' for a log transform; expected T, M"),
        ({"type": "identity", "T": 1}, r"unknown key 'T'.*no parameters"),
        ({"type": "logicle", "T": "abc"}, r"T is 'abc'; expected a finite number"),
        ({"type": "logicle", "W": True}, r"W is True"),
        ({"type": "logicle", "M": None}, r"M is None"),
        ({"type": "logicle", "T": 0}, r"T=0 must be > 0"),
        ({"type": "logicle", "W": -0.1}, r"W=-0.1 must be >= 0"),
        ({"type": "logicle", "W": 3, "M": 4.5}, r"W=3 is too large: 2\*W must be <= M=4.5"),
        ({"type": "logicle", "A": 5}, r"A=5 must be between -W=-0.5 and M-2W=3.5"),
        ({"type": "logicle", "A": -1}, r"A=-1 must be between"),
        ({"type": "logicle", "T": 1, "t": 2}, r"key 't' is given twice"),
        ({"type": "linear", "A": -1}, r"A=-1 must be between 0 and T"),
        ({"type": "log", "M": 0}, r"M=0 must be > 0"),
        ({"type": "asinh", "A": 5}, r"A=5 must be between 0 and M=4.5"),
        ({"type": "asinh", "cofactor": 5, "T": 1}, r"either 'cofactor' or T/M/A"),
        ({"type": "asinh", "cofactor": -5}, r"cofactor=-5.0 must be a positive number"),
        ({"type": 3}, r"type 3 is not a name"),
        (["logicle"], r"expected a transform name"),
    ],
)
def test_spec_errors_name_where_and_the_field(spec, expected):
    with pytest.raises(TemplateError, match=expected) as info:
        transform_from_spec(spec, where=WHERE)
    assert str(info.value).startswith(WHERE + ":")
    assert info.value.code == "TEMPLATE_INVALID"


def test_constructors_validate_like_specs():
    with pytest.raises(TemplateError, match="2\\*W must be <= M"):
        Logicle(w=3)
    with pytest.raises(TemplateError, match="not a finite number"):
        Linear(t=float("nan"))


# ----------------------------------------------------------------- compensation


def _real_sample(relative: str):
    from immunoprofile.fcs import read_fcs

    path = DATA / relative
    if not path.is_file():
        pytest.skip(f"{path} is absent")
    return path, read_fcs(path)


def _flowkit_sample(path: Path, **options):
    """A FlowKit Sample from an in-memory copy (FlowIO may leave the file open)."""
    flowkit = pytest.importorskip("flowkit")
    return flowkit.Sample(io.BytesIO(path.read_bytes()), **options)


@pytest.mark.parametrize(
    "relative",
    [
        "whitews-FlowKit/100715.fcs",  # float32 data
        "DillonHammill-CytoExploreRData/Activation/Activation_1.fcs",
        "pypi-fcsparser-0.2.8/FlowCytometers/FACS_Diva/facs_diva_test.fcs",
    ],
)
def test_compensation_matches_flowutils_and_flowkit_on_real_spillover(shared_data, relative):
    flowkit = pytest.importorskip("flowkit")
    path, sample = _real_sample(relative)
    names, spill = sample.spillover
    assert np.abs(spill - np.eye(len(names))).max() > 0.01  # a real, non-identity matrix
    cols = [sample.channels.index(n) for n in names]
    ours = compensate(sample.events, cols, spill)
    assert ours.dtype == np.float64 and ours.shape == (sample.n_events, len(cols))
    events64 = sample.events.astype(np.float64)
    by_flowutils = flowutils.compensate.compensate(events64, spill, cols)[:, cols]
    np.testing.assert_allclose(ours, by_flowutils, rtol=1e-12, atol=1e-9)
    fk_sample = _flowkit_sample(path)
    by_flowkit = flowkit.Matrix(spill, list(names)).apply(fk_sample)[:, [fk_sample.pnn_labels.index(n) for n in names]]
    np.testing.assert_allclose(ours, by_flowkit, rtol=1e-12, atol=1e-9)


def test_compensation_with_flowjo_csv_matches_flowkit(shared_data):
    path, sample = _real_sample("whitews-FlowKit/test_comp_example.fcs")
    csv_path = FLOWKIT_DATA / "comp_complete_example.csv"
    names, spill = compensation_matrix_from_csv(csv_path)
    assert np.abs(spill - np.eye(len(names))).max() > 0.2
    cols = [sample.channels.index(n) for n in names]
    with pytest.warns(UserWarning, match="incorrect data offset"):
        fk_sample = _flowkit_sample(path, ignore_offset_error=True)
    fk_sample.apply_compensation(str(csv_path))
    by_flowkit = fk_sample.get_events(source="comp")[:, [fk_sample.pnn_labels.index(n) for n in names]]
    np.testing.assert_allclose(compensate(sample.events, cols, spill), by_flowkit, rtol=1e-12, atol=1e-9)


def test_compensation_equals_linear_solve_by_hand():
    rng = np.random.default_rng(5)
    k = 7
    spill = np.eye(k) + rng.uniform(0, 0.3, (k, k)) * (rng.random((k, k)) < 0.5)
    np.fill_diagonal(spill, 1.0)
    events = rng.normal(1000, 800, (50_003, 10)).astype(np.float32)  # not a multiple of the block size
    cols = [9, 1, 4, 2, 8, 0, 6]
    before = events.copy()
    ours = compensate(events, cols, spill)
    truth = np.linalg.solve(spill.T, events[:, cols].astype(np.float64).T).T  # x S = o  <=>  S^T x^T = o^T
    np.testing.assert_allclose(ours, truth, rtol=1e-12, atol=1e-9)
    np.testing.assert_allclose(ours @ spill, events[:, cols], rtol=1e-9, atol=1e-6)  # re-spilling gives raw
    np.testing.assert_array_equal(events, before)
    assert ours.flags.f_contiguous and ours[:, 3].flags.c_contiguous
    np.testing.assert_allclose(compensate(events.astype(np.float64), cols, spill), ours, rtol=1e-15, atol=0)
    assert compensate(events, [], np.zeros((0, 0))).shape == (50_003, 0)


@pytest.mark.parametrize(
    "columns, spill, expected",
    [
        ([0, 1], np.eye(3), r"3x3 but 2 channels"),
        ([0, 1], np.ones((2, 3)), r"must be square"),
        ([0, 1], np.array([[1.0, 0.5], [2.0, 1.0]]), r"singular"),
        ([0, 1], np.array([[1.0, 0.5], [1.0, 0.5 + 1e-14]]), r"singular"),
        ([0, 1], np.array([[1.0, np.nan], [0.0, 1.0]]), r"NaN or infinite"),
        ([0, 5], np.eye(2), r"out of range"),
        ([1, 1], np.eye(2), r"repeat"),
    ],
)
def test_compensation_errors(columns, spill, expected):
    events = np.ones((10, 3), dtype=np.float32)
    with pytest.raises(CompensationError, match=expected) as info:
        compensate(events, columns, spill)
    assert info.value.code == "COMPENSATION_INVALID"


# ----------------------------------------------------------------- matrix files


@pytest.mark.parametrize(
    "relative, row_names",
    [
        ("whitews-FlowKit/comp_complete_example.csv", False),
        ("whitews-FlowKit/8_color_data_set/den_comp.csv", False),
        ("DillonHammill-CytoExploreRData/Compensation-Spillover-Matrix.csv", True),
        ("leejasme-staRgate/comp_mat_example_fcs.csv", True),
    ],
)
def test_matrix_files_read_like_pandas(shared_data, relative, row_names):
    pd = pytest.importorskip("pandas")
    path = DATA / relative
    if not path.is_file():
        pytest.skip(f"{path} is absent")
    names, matrix = compensation_matrix_from_csv(path)
    frame = pd.read_csv(path, index_col=0 if row_names else None)
    if not row_names:
        frame.columns = [c.lstrip("#").strip() for c in frame.columns]
    assert names == tuple(frame.columns)
    np.testing.assert_array_equal(matrix, frame.to_numpy(dtype=np.float64))
    np.testing.assert_array_equal(np.diag(matrix), 1.0)


def test_matrix_file_parsed_like_flowutils(shared_data):
    path = FLOWKIT_DATA / "8_color_data_set" / "den_comp.csv"
    if not path.is_file():
        pytest.skip(f"{path} is absent")
    names, matrix = compensation_matrix_from_csv(path)
    parsed = flowutils.compensate.parse_compensation_matrix(str(path), list(names))
    np.testing.assert_array_equal(matrix, parsed[1:])


def _write(tmp_path: Path, text: str, name: str = "comp.csv") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_matrix_file_tsv_row_names_in_other_order_are_reordered(tmp_path):
    path = _write(tmp_path, "\tA-A\tB-A\tC-A\nC-A\t0.3\t0\t1\nA-A\t1\t0.1\t0.2\nB-A\t0\t1\t0.05\n", "m.tsv")
    names, matrix = compensation_matrix_from_csv(path)
    assert names == ("A-A", "B-A", "C-A")
    np.testing.assert_array_equal(matrix, [[1, 0.1, 0.2], [0, 1, 0.05], [0.3, 0, 1]])


def test_matrix_file_with_trailing_separators_and_bom(tmp_path):
    path = tmp_path / "excel.csv"
    path.write_bytes("\ufeffA-A,B-A,\r\n1,0.1,\r\n0.2,1,\r\n\r\n".encode("utf-8"))
    names, matrix = compensation_matrix_from_csv(path)
    assert names == ("A-A", "B-A")
    np.testing.assert_array_equal(matrix, [[1, 0.1], [0.2, 1]])


def test_matrix_file_rows_named_without_corner_cell(tmp_path):
    path = _write(tmp_path, "A-A,B-A\nA-A,1,0.1\nB-A,0.2,1\n")
    names, matrix = compensation_matrix_from_csv(path)
    assert names == ("A-A", "B-A")
    np.testing.assert_array_equal(matrix, [[1, 0.1], [0.2, 1]])


@pytest.mark.parametrize(
    "text, expected",
    [
        ("", r"the file is empty"),
        ("A-A,B-A\n1,0.1\n0.2,x\n", r"line 3, column 'B-A': 'x' is not a finite number"),
        ("A-A,B-A\n1,0.1\n0.2,nan\n", r"line 3, column 'B-A': 'nan'"),
        ("A-A,B-A\n1,0.1,0.4\n0.2,1\n", r"line 2: 3 values, expected 2"),
        ("A-A,B-A\n1,0.1\n", r"names 2 channels but 1 matrix rows follow"),
        ("A-A,B-A\n1,0\n0,1\n0,0\n", r"names 2 channels but 3 matrix rows"),
        ("A-A,A-A\n1,0\n0,1\n", r"repeat in the header: A-A"),
        ("A-A,,C-A\n1,0,0\n0,1,0\n0,0,1\n", r"channel name number 2 in the header is empty"),
        (",A-A,B-A\nA-A,1,0\nC-A,0,1\n", r"no row for: B-A; rows not in the header: C-A"),
        ("A-A,B-A\n100,5\n0,100\n", r"in percent; divide every value by 100"),
    ],
)
def test_matrix_file_errors_name_file_line_and_column(tmp_path, text, expected):
    path = _write(tmp_path, text)
    with pytest.raises(TemplateError, match=expected) as info:
        compensation_matrix_from_csv(path)
    assert str(path) in str(info.value)
    assert info.value.code == "COMPENSATION_FILE_INVALID"


def test_matrix_file_missing_is_an_input_file_error(tmp_path):
    with pytest.raises(InputFileError, match="cannot read the compensation matrix") as info:
        compensation_matrix_from_csv(tmp_path / "absent.csv")
    assert info.value.path == str(tmp_path / "absent.csv")
