"""The C++ CPU target (`kda(..., impl="ffi")` on a CPU backend) on out-of-spec input, against
the rules of docs/robustness.md: traced offsets made legal, the log-decay floor, and the causal
quarantine of non-finite input (of the whole head for q, k, g and beta; of one value column for
v).

Every expectation comes from clean input: the same call with the legal offsets, the clean run,
the clean run cut before the first non-finite token, the clean run with a quarantined value
column's v and cotangents zeroed from its first non-finite v on, the same call with a finite
stand-in for a legal infinity, or the suite's float64 oracle (tests/oracle.py).
"""

from __future__ import annotations

import collections
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from inputs import make_inputs, rel_err
from jax_flashkda import kda
from jax_flashkda import ops
from oracle import oracle

pytestmark = pytest.mark.skipif(
    not (jax.default_backend() == "cpu" and ops._cpu_target_ready()),
    reason="needs the C++ CPU target on a CPU backend")

FIELDS = ("q", "k", "v", "g", "beta")
HEAD_FIELDS = ("q", "k", "g", "beta")  # a non-finite value quarantines the whole head
GRADS = FIELDS + ("A_log", "dt_bias", "initial_state")
GATE_MODE_IDS = {"log_decay": 0, "softplus": 1, "safe": 2}
INT32_MIN, INT32_MAX = -2**31, 2**31 - 1
CHUNK = 64  # the target's chunk (kChunk in csrc/cpu/kda_cpu.cc)


# ---------------------------------------------------------------------------------------------
# Calling the target.

def _split(inputs, kwargs):
    """(differentiable arrays, static kwargs as a hashable tuple)."""
    x = dict(zip(FIELDS, inputs))
    for name in ("A_log", "dt_bias", "initial_state"):
        if name in kwargs:
            x[name] = kwargs[name]
    static = tuple(sorted((key, value) for key, value in kwargs.items()
                          if key not in x and key not in ("cu_seqlens", "output_final_state")))
    return x, static


@functools.lru_cache(maxsize=None)
def _vjp_call(static):
    @jax.jit
    def call(x, cu, do, dfinal):
        def forward(x):
            return kda(*(x[n] for n in FIELDS), initial_state=x["initial_state"],
                       A_log=x.get("A_log"), dt_bias=x.get("dt_bias"), cu_seqlens=cu,
                       output_final_state=True, impl="ffi", **dict(static))

        (o, final), vjp = jax.vjp(forward, x)
        return o, final, vjp((do, dfinal))[0]

    return call


def run(x, static, do, dfinal, cu=None):
    """o, final state and the gradients (a dict) as float64 NumPy. `cu`, when given, reaches
    the target traced (an argument of the jitted call), so no trace-time check sees it."""
    cu = None if cu is None else jnp.asarray(np.asarray(cu, np.int64).astype(np.int32))
    o, final, grads = _vjp_call(static)(x, cu, do, dfinal)
    as_np = lambda a: np.asarray(a, np.float64)
    return as_np(o), as_np(final), {n: as_np(g) for n, g in grads.items()}


def cotangents(rng, x, cu=None):
    B, T, H, _ = x["q"].shape
    do = rng.standard_normal((B, T, H, x["v"].shape[-1])).astype(np.float32)
    dfinal = rng.standard_normal(x["initial_state"].shape).astype(np.float32)
    return do, dfinal


def truth(x, static, do, dfinal, cu=None):
    """The suite's float64 oracle (tests/oracle.py) in the target's layout: o, final state and
    the gradients, dA_log and ddt_bias summed over batch rows as kda returns them (zeros where
    the call has no gate parameters)."""
    kw = dict(static, **{n: x[n] for n in ("A_log", "dt_bias", "initial_state") if n in x})
    kw["cu_seqlens"] = None if cu is None else np.asarray(cu)
    o, final, grads = oracle([x[n] for n in FIELDS], kw, (do, dfinal))
    H, K = x["q"].shape[2:]
    grads.setdefault("A_log", np.zeros(H))
    grads.setdefault("dt_bias", np.zeros((H, K)))
    return o, final, grads


def legal(cu, T):
    """docs/robustness.md §1: running maximum of the offsets clipped into [0, T]."""
    return np.maximum.accumulate(np.clip(np.asarray(cu, np.int64), 0, T))


def assert_same(got, want, what):
    np.testing.assert_array_equal(got, want, err_msg=what)


# ---------------------------------------------------------------------------------------------
# §1 Offsets.

T_OFFSETS = 64
OFFSETS = [
    [0, -20, 64],
    [0, 2**30, 64],
    [0, 20, 80],
    [0, 60, 10, 64],
    [0, 30, -5],
    [10, 30, 64],
    [INT32_MIN, 20, INT32_MAX],
    [0, INT32_MAX, INT32_MIN, 64],
    [INT32_MAX, 3, 64],
]


@pytest.mark.parametrize("case", list(enumerate(OFFSETS)), ids=[str(c) for c in OFFSETS])
def test_traced_offsets_are_made_legal(rng, case):
    index, cu = case
    N = len(cu) - 1
    seqlens = np.diff(np.linspace(0, T_OFFSETS, N + 1).astype(int))  # only shapes N and T
    inputs, kwargs = make_inputs(rng, H=2, K=16, V=24, gate_mode="safe", seqlens=seqlens,
                                 state_v_first=index % 2 == 1)  # both layouts over the cases
    x, static = _split(inputs, kwargs)
    do, dfinal = cotangents(rng, x)
    fixed = legal(cu, T_OFFSETS)

    o, final, grads = run(x, static, do, dfinal, cu)
    o_fixed, final_fixed, grads_fixed = run(x, static, do, dfinal, fixed)
    assert_same(o, o_fixed, "o")
    assert_same(final, final_fixed, "final state")
    for name in GRADS:
        assert_same(grads[name], grads_fixed[name], name)

    # Tokens outside every sequence: o = 0 and zero gradients.
    outside = np.r_[0:fixed[0], fixed[-1]:T_OFFSETS]
    assert np.all(o[:, outside] == 0)
    for name in FIELDS:
        assert np.all(grads[name][:, outside] == 0), name
    # Empty sequences pass their state through, forward and backward.
    for n in np.flatnonzero(np.diff(fixed) == 0):
        assert_same(final[n], x["initial_state"][n], "empty sequence final state")
        assert_same(grads["initial_state"][n], dfinal[n], "empty sequence dh0")

    # And the legal offsets give the float64 truth (tokens outside are zero there too).
    o_ref, final_ref, grads_ref = truth(x, static, do, dfinal, fixed)
    assert rel_err(o, o_ref) < 1e-4
    assert rel_err(final, final_ref) < 1e-4
    for name in GRADS:
        assert rel_err(grads[name], grads_ref[name]) < 1e-4, name


# ---------------------------------------------------------------------------------------------
# §2 The log-decay floor.

def test_extreme_log_decays_match_float64_truth(rng):
    inputs, kwargs = make_inputs(rng, B=2, T=80, H=2, K=16, V=24, gate_mode="log_decay")
    x, static = _split(inputs, kwargs)
    g = x["g"].copy()
    extremes = np.array([-np.inf, -1e7, -1000.0, -128.5, -127.5, 0.0, 0.05], np.float32)
    picks = rng.random(g.shape) < 0.3
    g[picks] = rng.choice(extremes, size=int(picks.sum()))
    g[:, 5] = -np.inf                    # whole-token hard resets, mid-chunk and at a chunk start
    g[:, CHUNK] = -1e7
    g[1, 40, 0] = 0.0
    x["g"] = g
    do, dfinal = cotangents(rng, x)
    o, final, grads = run(x, static, do, dfinal)
    o_ref, final_ref, grads_ref = truth(x, static, do, dfinal)
    assert np.all(np.isfinite(o)) and np.all(np.isfinite(final))
    assert rel_err(o, o_ref) < 1e-4
    assert rel_err(final, final_ref) < 1e-4
    for name in FIELDS + ("initial_state",):
        assert np.all(np.isfinite(grads[name])), name
        assert rel_err(grads[name], grads_ref[name]) < 1e-4, name
    # Below the floor the gradient is exactly zero, as the truth's (its exp(g) is 0).
    assert np.all(grads["g"][g < -128] == 0)


@pytest.mark.parametrize("gate_mode", ["softplus", "safe"])
def test_saturated_gates(rng, gate_mode):
    """Raw gates of +-inf are legal in the gate modes (the activation sends them to a hard
    reset or to a saturated decay): the same result as a huge finite stand-in, which matches
    the float64 truth. A softplus gate of 1e4 goes below the floor: zero dg."""
    inputs, kwargs = make_inputs(rng, T=70, H=2, K=16, V=24, gate_mode=gate_mode)
    x, static = _split(inputs, kwargs)
    where = rng.random(x["g"].shape) < 0.2
    signs = np.where(rng.random(x["g"].shape) < 0.5, 1.0, -1.0).astype(np.float32)
    x_huge = dict(x, g=np.where(where, signs * np.float32(1e30), x["g"]))
    x_inf = dict(x, g=np.where(where, signs * np.float32(np.inf), x["g"]))
    x_inf["g"][0, 3] = 1e4
    x_huge["g"][0, 3] = 1e4
    do, dfinal = cotangents(rng, x)
    o, final, grads = run(x_inf, static, do, dfinal)
    o_huge, final_huge, grads_huge = run(x_huge, static, do, dfinal)
    assert_same(o, o_huge, "o")
    assert_same(final, final_huge, "final state")
    for name in GRADS:
        assert np.all(np.isfinite(grads[name])), name
        assert_same(grads[name], grads_huge[name], name)
    o_ref, final_ref, grads_ref = truth(x_huge, static, do, dfinal)
    assert rel_err(o, o_ref) < 1e-4
    assert rel_err(final, final_ref) < 1e-4
    for name in GRADS:
        assert rel_err(grads[name], grads_ref[name]) < 1e-4, name
    if gate_mode == "softplus":
        assert np.all(grads["g"][0, 3] == 0)


# ---------------------------------------------------------------------------------------------
# §3 Causal quarantine of non-finite input: q, k, g and beta, per head.

def quarantines(field, value, static):
    """Whether `value` injected into `field` is non-finite input in the sense of §3."""
    if np.isnan(value):
        return True
    kw = dict(static)
    if field == "g":  # +inf: a log-decay of +inf, or a raw gate the activation saturates
        return not kw.get("use_gate_in_kernel")
    if field == "beta":  # sigmoid(+inf) = 1 is a legal beta
        return not kw["use_beta_sigmoid_in_kernel"]
    return True


def inject(x, field, t, value):
    """x with `value` in one element of `field` at token t of head 0 (batch row 0)."""
    x = dict(x)
    x[field] = x[field].copy()
    x[field][(0, t, 0) + ((3,) if x[field].ndim == 4 else ())] = value
    return x


def poisoned(do, dfinal, t):
    """NaN cotangents for head 0 at and after token t, and for its final state: they must reach
    nothing once t is quarantined."""
    do, dfinal = do.copy(), dfinal.copy()
    do[:, t:, 0] = np.nan
    dfinal[:, 0] = np.nan
    return do, dfinal


def head(name, a, h):
    """Head h of an output or gradient: tokens [B,T,H,...], states [N,H,...], params [H,...]."""
    axis = 2 if name in FIELDS + ("o",) else 1 if name in ("initial_state", "final") else 0
    return np.take(a, h, axis=axis)


def check_quarantined_head(got, clean, cut, t, h, where):
    """Head h of a B == 1 call whose first non-finite token is t: `clean` is the clean run, `cut`
    the clean run of tokens [0, t) with a zero final-state cotangent (None when t == 0)."""
    o, final, grads = got
    assert_same(o[:, :t, h], clean[0][:, :t, h], f"{where}: o before t0")
    assert np.all(np.isnan(o[:, t:, h])), f"{where}: o from t0 on"
    assert np.all(np.isnan(final[:, h])), f"{where}: final state"
    for name in FIELDS:
        assert np.all(grads[name][:, t:, h] == 0), f"{where}: d{name} from t0 on"
        if t:
            np.testing.assert_allclose(grads[name][:, :t, h], cut[2][name][:, :, h], rtol=1e-5,
                                       atol=1e-6, err_msg=f"{where}: d{name} before t0")
    for name in ("A_log", "dt_bias", "initial_state"):
        if name in grads:
            got_h = head(name, grads[name], h)
            assert np.all(np.isfinite(got_h)), f"{where}: d{name}"
            want = head(name, cut[2][name], h) if t else np.zeros_like(got_h)
            np.testing.assert_allclose(got_h, want, rtol=1e-5, atol=1e-6,
                                       err_msg=f"{where}: d{name}")


def check_clean_head(got, clean, h, where):
    """Head h, which saw only clean input, is bitwise that of the clean run."""
    assert_same(head("o", got[0], h), head("o", clean[0], h), f"{where}: o")
    assert_same(head("final", got[1], h), head("final", clean[1], h), f"{where}: final")
    for name in got[2]:
        assert_same(head(name, got[2][name], h), head(name, clean[2][name], h),
                    f"{where}: d{name}")


T_QUARANTINE = 80
POSITIONS = [0, 37, CHUNK, T_QUARANTINE - 1]  # token 0, mid-chunk, a chunk start, the last


@pytest.mark.parametrize("v_first", [False, True], ids=["kv", "vk"])
@pytest.mark.parametrize("gate_mode", list(GATE_MODE_IDS))
def test_non_finite_input_is_quarantined(rng, gate_mode, v_first):
    inputs, kwargs = make_inputs(rng, B=1, T=T_QUARANTINE, H=2, K=16, V=24,
                                 gate_mode=gate_mode, state_v_first=v_first)
    x, static = _split(inputs, kwargs)
    do, dfinal = cotangents(rng, x)
    clean = run(x, static, do, dfinal)
    cut_runs = {}
    for t in POSITIONS:
        if t:
            x_cut = {n: (a[:, :t] if n in FIELDS else a) for n, a in x.items()}
            cut_runs[t] = run(x_cut, static, do[:, :t], np.zeros_like(dfinal))
    for t in POSITIONS:
        for field in HEAD_FIELDS:
            for value in (np.nan, np.inf):
                where = f"{field}={value} at t={t}"
                dirty = inject(x, field, t, value)
                if not quarantines(field, value, static):
                    # A legal infinity: the same as a huge finite stand-in.
                    got = run(dirty, static, do, dfinal)
                    want = run(inject(x, field, t, np.float32(1e30)), static, do, dfinal)
                    for a, b in zip(got[:2], want[:2]):
                        assert_same(a, b, where)
                    for name in GRADS:
                        if name in got[2]:
                            assert np.all(np.isfinite(got[2][name])), (where, name)
                            assert_same(got[2][name], want[2][name], f"{where}: d{name}")
                    continue
                got = run(dirty, static, *poisoned(do, dfinal, t))
                check_quarantined_head(got, clean, cut_runs.get(t), t, 0, where)
                check_clean_head(got, clean, 1, where)


def _quarantine_once(rng, inputs, kwargs, field, value, t):
    x, static = _split(inputs, kwargs)
    do, dfinal = cotangents(rng, x)
    do = do.astype(x["v"].dtype)
    clean = run(x, static, do, dfinal)
    cut = run({n: (a[:, :t] if n in FIELDS else a) for n, a in x.items()}, static, do[:, :t],
              np.zeros_like(dfinal))
    got = run(inject(x, field, t, value), static, *poisoned(do, dfinal, t))
    check_quarantined_head(got, clean, cut, t, 0, f"{field}={value}")
    check_clean_head(got, clean, 1, f"{field}={value}")


def test_beta_infinity_without_sigmoid_is_quarantined(rng):
    inputs, kwargs = make_inputs(rng, B=1, T=50, H=2, K=16, V=24, gate_mode="safe")
    kwargs["use_beta_sigmoid_in_kernel"] = False
    inputs = inputs[:4] + (rng.uniform(0.1, 1.0, inputs[4].shape).astype(np.float32),)
    _quarantine_once(rng, inputs, kwargs, "beta", np.inf, 21)


def test_bf16_input_is_quarantined(rng):
    inputs, kwargs = make_inputs(rng, B=1, T=50, H=2, K=16, V=24, gate_mode="softplus",
                                 dtype=jnp.bfloat16)
    _quarantine_once(rng, inputs, kwargs, "g", np.nan, 29)


SEQLENS = [30, 50, 20]


@pytest.mark.parametrize("local_t", [0, 17], ids=["sequence_start", "mid_sequence"])
def test_varlen_quarantine_leaves_other_sequences_unchanged(rng, local_t):
    inputs, kwargs = make_inputs(rng, H=2, K=16, V=24, gate_mode="softplus",
                                 seqlens=SEQLENS, state_v_first=True)
    x, static = _split(inputs, kwargs)
    cu = kwargs["cu_seqlens"]
    begin, end = cu[1], cu[2]
    t = begin + local_t
    do, dfinal = cotangents(rng, x)
    clean = run(x, static, do, dfinal, cu)
    # The expectation: the clean tokens with [t, end) removed, so sequence 1 ends at t - 1,
    # and no cotangent on its final state.
    keep = np.r_[0:t, end:cu[-1]]
    x_cut = {n: (a[:, keep] if n in FIELDS else a) for n, a in x.items()}
    dfinal_cut = dfinal.copy()
    dfinal_cut[1] = 0
    cu_cut = np.array([0, begin, t, t + SEQLENS[2]])
    cut = run(x_cut, static, do[:, keep], dfinal_cut, cu_cut)
    moved = np.r_[end:cu[-1]]  # sequence 2 in the dirty call; it starts at t in the cut one

    for field in HEAD_FIELDS:
        where = f"{field}=nan at token {t}"
        do_dirty = do.copy()
        do_dirty[:, t:end, 0] = np.nan
        dfinal_dirty = dfinal.copy()
        dfinal_dirty[1, 0] = np.nan
        o, final, grads = run(inject(x, field, t, np.nan), static, do_dirty, dfinal_dirty, cu)
        # Sequences 0 and 2, and head 1 everywhere, are bitwise those of the clean run.
        others = np.r_[0:begin, end:cu[-1]]
        assert_same(o[:, others], clean[0][:, others], where)
        assert_same(o[:, :, 1], clean[0][:, :, 1], where)
        assert_same(final[[0, 2]], clean[1][[0, 2]], where)
        assert_same(final[1, 1], clean[1][1, 1], where)
        for name in FIELDS:
            assert_same(grads[name][:, others], clean[2][name][:, others], f"{where}: d{name}")
            assert_same(grads[name][:, :, 1], clean[2][name][:, :, 1], f"{where}: d{name}")
        # Sequence 1, head 0: outputs before t0 unchanged, NaN from t0 on, gradients those of
        # the sequence cut at t0 - 1, zero from t0 on.
        assert_same(o[:, begin:t, 0], clean[0][:, begin:t, 0], where)
        assert np.all(np.isnan(o[:, t:end, 0])) and np.all(np.isnan(final[1, 0])), where
        for name in FIELDS:
            assert np.all(grads[name][:, t:end, 0] == 0), f"{where}: d{name}"
            np.testing.assert_allclose(grads[name][:, :t, 0], cut[2][name][:, :t, 0],
                                       rtol=1e-5, atol=1e-6, err_msg=f"{where}: d{name}")
            assert_same(grads[name][:, moved], cut[2][name][:, t:], f"{where}: d{name}")
        # Per-head parameters and initial states: head 0 as the cut run, head 1 as the clean.
        for name in ("A_log", "dt_bias", "initial_state"):
            assert np.all(np.isfinite(grads[name])), f"{where}: d{name}"
            np.testing.assert_allclose(head(name, grads[name], 0), head(name, cut[2][name], 0),
                                       rtol=1e-5, atol=1e-6, err_msg=f"{where}: d{name}")
            assert_same(head(name, grads[name], 1), head(name, clean[2][name], 1),
                        f"{where}: d{name}")


# ---------------------------------------------------------------------------------------------
# §3 Causal quarantine of non-finite v, per value column: column j of the state reads v[:, j]
# only, so a non-finite v[t, j] quarantines column j of its (sequence, head) alone.

Cut = collections.namedtuple("Cut", "row seq col begin end")
Cut.__doc__ = """Value column `col` of head 0 quarantined over tokens [begin, end) of batch row
`row`: sequence `seq` from its first non-finite v[:, col] to its end."""


def state_column(cut, v_first):
    """Index of the cut column in a state [N, H, K, V] (or [N, H, V, K] when v_first)."""
    return (cut.seq, 0, cut.col) if v_first else (cut.seq, 0, slice(None), cut.col)


def column_reference(x, do, dfinal, cuts, v_first):
    """The clean call that a call with the cut columns quarantined must match: each column's v,
    do and final-state cotangent zeroed from its first quarantined token on."""
    x, do, dfinal = dict(x, v=x["v"].copy()), do.copy(), dfinal.copy()
    for c in cuts:
        x["v"][c.row, c.begin:c.end, 0, c.col] = 0
        do[c.row, c.begin:c.end, 0, c.col] = 0
        dfinal[state_column(c, v_first)] = 0
    return x, do, dfinal


def column_dirty(x, do, dfinal, cuts, v_first, value):
    """`value` in v at each cut's first token and garbage later in the column (huge finite
    values that overflow the column's state unless they are dropped too, -inf), with NaN
    cotangents wherever the column is quarantined: none of it may reach anything but the
    column's own outputs and final state."""
    x, do, dfinal = dict(x, v=x["v"].copy()), do.copy(), dfinal.copy()
    for c in cuts:
        column = x["v"][c.row, c.begin:c.end, 0, c.col]  # a view
        column[0] = value
        column[2:5] = [3e38, -3e38, 3e38][:len(column[2:5])]
        column[6:7] = -np.inf
        do[c.row, c.begin:c.end, 0, c.col] = np.nan
        dfinal[state_column(c, v_first)] = np.nan
    return x, do, dfinal


def check_columns(got, ref, cuts, v_first, where):
    """`got`, a call whose only non-finite input is v in the cut columns, against `ref`, the call
    of column_reference: the cut columns' outputs and final states NaN, every other output and
    state, and every gradient, bitwise those of `ref`; dv zero where a column is quarantined."""
    o, final, grads = got
    o_want, final_want = ref[0].copy(), ref[1].copy()
    for c in cuts:
        o_want[c.row, c.begin:c.end, 0, c.col] = np.nan
        final_want[state_column(c, v_first)] = np.nan
    assert_same(o, o_want, f"{where}: o")  # NaN where o_want is NaN, and only there
    assert_same(final, final_want, f"{where}: final state")
    for name in grads:
        assert np.all(np.isfinite(grads[name])), f"{where}: d{name}"
        assert_same(grads[name], ref[2][name], f"{where}: d{name}")
    for c in cuts:
        assert np.all(grads["v"][c.row, c.begin:c.end, 0, c.col] == 0), f"{where}: dv"


def check_truth(got, want, where):
    """A clean call against the float64 truth."""
    assert rel_err(got[0], want[0]) < 1e-4, f"{where}: o"
    assert rel_err(got[1], want[1]) < 1e-4, f"{where}: final state"
    for name in got[2]:
        assert rel_err(got[2][name], want[2][name]) < 1e-4, f"{where}: d{name}"


V_POSITIONS = [0, 37, CHUNK]  # token 0, mid-chunk, a chunk start


@pytest.mark.parametrize("v_first", [False, True], ids=["kv", "vk"])
@pytest.mark.parametrize("gate_mode", list(GATE_MODE_IDS))
def test_non_finite_v_quarantines_its_column(rng, gate_mode, v_first):
    inputs, kwargs = make_inputs(rng, B=2, T=T_QUARANTINE, H=2, K=16, V=24,
                                 gate_mode=gate_mode, state_v_first=v_first)
    x, static = _split(inputs, kwargs)
    do, dfinal = cotangents(rng, x)
    for t in V_POSITIONS:
        # Column 3 from t, and column 19 (the next block of 16 columns) from a later token, of
        # head 0 in batch row 0; head 1 and batch row 1 stay clean.
        cuts = [Cut(0, 0, 3, t, T_QUARANTINE), Cut(0, 0, 19, t + 9, T_QUARANTINE)]
        ref_in = column_reference(x, do, dfinal, cuts, v_first)
        ref = run(ref_in[0], static, *ref_in[1:])
        check_truth(ref, truth(ref_in[0], static, *ref_in[1:]), f"reference at t={t}")
        for value in (np.nan, np.inf, -np.inf):
            dirty = column_dirty(x, do, dfinal, cuts, v_first, value)
            got = run(dirty[0], static, *dirty[1:])
            check_columns(got, ref, cuts, v_first, f"v={value} at t={t}")


def test_bf16_v_quarantines_its_column(rng):
    inputs, kwargs = make_inputs(rng, B=1, T=50, H=2, K=16, V=24, gate_mode="softplus",
                                 dtype=jnp.bfloat16)
    x, static = _split(inputs, kwargs)
    do, dfinal = cotangents(rng, x)
    do = do.astype(x["v"].dtype)
    cuts = [Cut(0, 0, 11, 29, 50)]
    ref_in = column_reference(x, do, dfinal, cuts, False)
    ref = run(ref_in[0], static, *ref_in[1:])
    dirty = column_dirty(x, do, dfinal, cuts, False, np.nan)
    check_columns(run(dirty[0], static, *dirty[1:]), ref, cuts, False, "bf16")


def test_varlen_v_quarantine_ends_with_its_sequence(rng):
    inputs, kwargs = make_inputs(rng, H=2, K=16, V=24, gate_mode="softplus", seqlens=SEQLENS)
    x, static = _split(inputs, kwargs)
    cu = kwargs["cu_seqlens"]
    do, dfinal = cotangents(rng, x)
    # Column 20 of sequence 0 from its first token, column 7 of sequence 1 from its token 17;
    # sequence 2 (the same columns included) stays clean.
    cuts = [Cut(0, 0, 20, 0, cu[1]), Cut(0, 1, 7, cu[1] + 17, cu[2])]
    ref_in = column_reference(x, do, dfinal, cuts, False)
    ref = run(ref_in[0], static, *ref_in[1:], cu)
    check_truth(ref, truth(ref_in[0], static, *ref_in[1:], cu), "reference")
    dirty = column_dirty(x, do, dfinal, cuts, False, np.nan)
    check_columns(run(dirty[0], static, *dirty[1:], cu), ref, cuts, False, "varlen")


@pytest.mark.parametrize("tj, t0", [(20, 50), (50, 30), (40, 40)],
                         ids=["v_before_k", "k_before_v", "same_token"])
def test_v_column_and_head_quarantined_together(rng, tj, t0):
    """A non-finite v[tj, j] and a non-finite k at t0: column j is quarantined from
    min(tj, t0), the whole head from t0."""
    inputs, kwargs = make_inputs(rng, B=1, T=T_QUARANTINE, H=2, K=16, V=24, gate_mode="safe",
                                 state_v_first=True)
    x, static = _split(inputs, kwargs)
    do, dfinal = cotangents(rng, x)
    j, cj = 5, min(tj, t0)
    dirty = inject(x, "k", t0, np.nan)
    dirty["v"] = dirty["v"].copy()
    dirty["v"][0, tj, 0, j] = np.nan
    do_dirty, dfinal_dirty = poisoned(do, dfinal, t0)
    do_dirty[0, tj:, 0, j] = np.nan
    o, final, grads = run(dirty, static, do_dirty, dfinal_dirty)

    # The expectation: the clean tokens [0, t0) with column j's v and do zeroed from cj on, and
    # no final-state cotangent.
    x_cut = {n: (a[:, :t0].copy() if n in FIELDS else a) for n, a in x.items()}
    x_cut["v"][0, cj:, 0, j] = 0
    do_cut = do[:, :t0].copy()
    do_cut[0, cj:, 0, j] = 0
    cut = run(x_cut, static, do_cut, np.zeros_like(dfinal))
    clean = run(x, static, do, dfinal)

    o_want = np.full(o[:, :, 0].shape, np.nan)
    o_want[:, :t0] = cut[0][:, :, 0]
    o_want[0, cj:, j] = np.nan
    assert_same(o[:, :, 0], o_want, "o")
    assert np.all(np.isnan(final[:, 0])), "final state"
    for name in FIELDS:
        assert np.all(grads[name][:, t0:, 0] == 0), f"d{name} from t0 on"
        np.testing.assert_allclose(grads[name][:, :t0, 0], cut[2][name][:, :, 0], rtol=1e-5,
                                   atol=1e-6, err_msg=f"d{name} before t0")
    assert np.all(grads["v"][0, cj:, 0, j] == 0), "dv of the quarantined column"
    for name in ("A_log", "dt_bias", "initial_state"):
        got_h = head(name, grads[name], 0)
        assert np.all(np.isfinite(got_h)), f"d{name}"
        np.testing.assert_allclose(got_h, head(name, cut[2][name], 0), rtol=1e-5, atol=1e-6,
                                   err_msg=f"d{name}")
    check_clean_head((o, final, grads), clean, 1, f"tj={tj}, t0={t0}")
