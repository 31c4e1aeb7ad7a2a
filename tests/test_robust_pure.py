"""docs/robustness.md on the two pure-JAX paths: traced offsets made legal, the log-decay
floor, causal quarantine of non-finite input; plus shard_map without an initial state and
empty shapes.

The truth is test_pure_jax's float64 NumPy loop, run per (sequence, head) so that one head of
one sequence can be cut where its first non-finite token is: the rule says every earlier token
behaves exactly as in that cut sequence. Each configuration is compiled once with every input
a traced argument, so one compilation serves many injections.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from inputs import make_inputs, rel_err
from jax_flashkda.chunked import kda_chunked
from jax_flashkda.preprocess import legal_offsets
from jax_flashkda.reference import kda_recurrent
from test_pure_jax import Case, _spans, case_inputs, numpy_truth

IMPLS = [kda_recurrent, kda_chunked]
IMPL_IDS = ["recurrent", "chunked"]
INPUTS = ("q", "k", "v", "g", "beta")
GRADS = INPUTS + ("A_log", "dt_bias", "initial_state")

# Chunks of 16 tokens, so T = 40 has a chunk boundary at 16 and 32.
BASE = dict(B=2, T=40, H=2, K=16, V=16, chunk=16)
CONFIGS = {
    "plain": Case(**BASE, gate="plain"),
    "softplus": Case(**BASE, gate="softplus", l2norm=True, beta_sigmoid=True, v_first=True),
    "safe": Case(**BASE, gate="safe", l2norm=True, beta_sigmoid=True),
}
# Four sequences over 64 tokens (one empty): room for the offsets cases and the varlen hits.
VARLEN = Case(B=1, T=64, H=2, K=16, V=16, chunk=16, gate="safe", l2norm=True,
              beta_sigmoid=True, cu=(0, 10, 10, 37, 64))
# A stand-in the truth can differentiate for a legal infinite gate input: the activation's
# limit is reached, and 0 * 1e30 is 0 where 0 * inf would be NaN.
HUGE = 1e30


@pytest.fixture(autouse=True)
def _x64():
    with jax.enable_x64(True):
        yield


# ----------------------------------------------------------------------------------------
# Running a path: o, final state and the vjp of (do, dS_T), compiled once per configuration.

def _shape_key(c: Case):
    return dataclasses.replace(c, seed=0, cu=None if c.cu is None else (0,) * len(c.cu))


@functools.lru_cache(maxsize=None)
def _compiled(impl, key: Case, dtype, concrete_cu=None):
    kwargs = dict(scale=key.K ** -0.5, use_qk_l2norm_in_kernel=key.l2norm,
                  use_gate_in_kernel=key.gate != "plain",
                  use_beta_sigmoid_in_kernel=key.beta_sigmoid, lower_bound=key.lower_bound,
                  state_v_first=key.v_first)
    if impl is kda_chunked:
        kwargs["chunk_size"] = key.chunk

    def f(args, cu):
        if concrete_cu is not None:
            cu = np.asarray(concrete_cu, np.int32)
        return impl(*(args[n] for n in INPUTS), A_log=args["A_log"], dt_bias=args["dt_bias"],
                    initial_state=args["initial_state"] if key.init else None, cu_seqlens=cu,
                    **kwargs)

    @jax.jit
    def fwd_bwd(args, do, ds, cu):
        (o, s), vjp = jax.vjp(lambda a: f(a, cu), args)
        (grads,) = vjp((do.astype(o.dtype), ds.astype(s.dtype)))
        return o, s, grads

    return fwd_bwd


def run(impl, c: Case, x, cot, dtype=jnp.float64, cu=None, concrete_cu=None):
    """`cu` (traced) defaults to the case's offsets."""
    param_dtype = jnp.float64 if dtype == jnp.float64 else jnp.float32
    args = {n: jnp.asarray(x[n], dtype) for n in INPUTS}
    args.update({n: jnp.asarray(x[n], param_dtype) for n in ("A_log", "dt_bias", "initial_state")})
    if cu is None and c.cu is not None and concrete_cu is None:
        cu = np.asarray(c.cu, np.int32)
    o, s, grads = _compiled(impl, _shape_key(c), dtype, concrete_cu)(
        args, jnp.asarray(cot["o"], dtype), jnp.asarray(cot["s"], param_dtype),
        None if cu is None else jnp.asarray(cu))
    return (np.asarray(o, np.float64), np.asarray(s, np.float64),
            {n: np.asarray(grads[n], np.float64) for n in GRADS})


# ----------------------------------------------------------------------------------------
# The truth of the rules, from the float64 NumPy loop of test_pure_jax.

def cut_truth(c: Case, x, cot, cuts=None, col_cuts=None):
    """The NumPy truth with (sequence n, head h) cut at token cuts[(n, h)] and value column j of
    (sequence n, head h) quarantined from token col_cuts[(n, h, j)] on (absolute indices).

    A quarantined column is the clean computation with v[t >= tj, j] := 0 and its cotangents
    (do[t >= tj, j], the final state's column j) zeroed: the columns of the state evolve
    apart. Returns o (NaN from each cut on, and in each column from min(t0, tj) on), final state
    (NaN where cut; requested layout), gradients, the [B,T,H] mask of tokens whose gradients
    must be exactly zero (outside every sequence, or at or after a cut) and the [B,T,H,V] mask
    of v's exactly-zero gradients (those tokens, and each quarantined column from min(t0, tj)).
    """
    cuts = cuts or {}
    col_cuts = col_cuts or {}
    spans = {n: (row, start, end) for row, start, end, n in _spans(c)}
    x = dict(x, v=np.array(x["v"], copy=True))
    cot = dict(o=np.array(cot["o"], copy=True), s=np.array(cot["s"], copy=True))
    for (n, h, j), tj in col_cuts.items():
        row, _, end = spans[n]
        x["v"][row, tj:end, h, j] = 0
        cot["o"][row, tj:end, h, j] = 0
        cot["s"][(n, h, j) if c.v_first else (n, h, slice(None), j)] = 0
    scale = c.K ** -0.5
    o = np.zeros_like(x["v"])
    final = np.array(x["initial_state"], copy=True)
    d = {n: np.zeros_like(x[n]) for n in GRADS}
    zero = np.ones(x["beta"].shape, bool)
    for row, start, end, n in _spans(c):
        for h in range(c.H):
            stop = cuts.get((n, h), end)
            sub = dataclasses.replace(c, B=1, T=stop - start, H=1, cu=None)
            tok = (slice(row, row + 1), slice(start, stop), slice(h, h + 1))
            xs = {m: x[m][tok] for m in INPUTS}
            xs.update(A_log=x["A_log"][h:h + 1], dt_bias=x["dt_bias"][h:h + 1],
                      initial_state=x["initial_state"][n:n + 1, h:h + 1])
            # A cut sequence's final state is the NaN constant: its cotangent reaches nothing.
            cs = dict(o=cot["o"][tok], s=cot["s"][n:n + 1, h:h + 1] * (stop == end))
            with np.errstate(over="ignore"):
                o_s, s_s, d_s = numpy_truth(sub, xs, cs, scale)
            o[tok] = o_s
            final[n, h] = np.nan if stop < end else s_s[0, 0]
            o[row, stop:end, h] = np.nan
            zero[row, start:stop, h] = False
            for m in INPUTS:
                d[m][tok] = d_s[m]
            d["A_log"][h] += d_s["A_log"][0]
            d["dt_bias"][h] += d_s["dt_bias"][0]
            d["initial_state"][n, h] = d_s["initial_state"][0, 0]
    zero_v = np.repeat(zero[..., None], c.V, axis=-1)
    for (n, h, j), tj in col_cuts.items():
        row, _, end = spans[n]
        cj = min(tj, cuts.get((n, h), end))
        o[row, cj:end, h, j] = np.nan
        final[(n, h, j) if c.v_first else (n, h, slice(None), j)] = np.nan
        zero_v[row, cj:end, h, j] = True
    return o, final, d, zero, zero_v


def assert_follows(got, want, tol):
    """NaN exactly where the truth has NaN, exact zero gradients on the masked tokens (v: the
    masked values), finite gradients everywhere, the rest within tol (norm-wise)."""
    o, s, grads = got
    o_ref, s_ref, d_ref, zero, zero_v = want
    for name, a, ref in (("o", o, o_ref), ("final_state", s, s_ref)):
        assert np.array_equal(np.isnan(a), np.isnan(ref)), f"{name}: NaN pattern differs"
        keep = ~np.isnan(ref)
        assert rel_err(a[keep], ref[keep]) <= tol, (name, rel_err(a[keep], ref[keep]))
    assert np.all(o[zero & ~np.isnan(o_ref).any(-1)] == 0), "o outside every sequence"
    for n in GRADS:
        g = grads[n]
        assert np.all(np.isfinite(g)), f"non-finite d{n}"
        if n in INPUTS:
            assert np.all(g[zero_v if n == "v" else zero] == 0), \
                f"d{n} not exactly zero on cut/outside tokens"
        err = np.abs(g).max() if not np.any(d_ref[n]) else rel_err(g, d_ref[n])
        assert err <= tol, (f"d{n}", err)


def inputs(c: Case, seed):
    """test_pure_jax's inputs and cotangents of the case, drawn with `seed`."""
    return case_inputs(dataclasses.replace(c, seed=seed))


# ----------------------------------------------------------------------------------------
# §1 Offsets.

def test_legal_offsets_rule():
    T = 64
    cases = {(0, -20, 64): (0, 0, 64), (0, 2 ** 30, 64): (0, 64, 64),
             (0, 20, 80): (0, 20, 64), (0, 60, 10, 64): (0, 60, 60, 64),
             (0, 20, -3): (0, 20, 20), (7, 30, 50): (7, 30, 50), (-5, 70, 3): (0, 64, 64)}
    traced = jax.jit(legal_offsets, static_argnums=1)
    for raw, want in cases.items():
        for dtype in (np.int32, np.int64):
            got = traced(jnp.asarray(np.asarray(raw, dtype)), T)
            assert got.dtype == jnp.int32 and tuple(got.tolist()) == want, (raw, dtype, got)
    # Out of int32 range and unsigned: clipped in their own dtype, not wrapped by the cast.
    assert legal_offsets(np.asarray([0, 2 ** 40, 5], np.int64), T).tolist() == [0, 64, 64]
    assert legal_offsets(np.asarray([0, 2 ** 32 - 1, 5], np.uint32), T).tolist() == [0, 64, 64]
    with jax.enable_x64(False):   # where jnp.asarray itself would narrow int64 to int32
        assert legal_offsets(np.asarray([0, 2 ** 40, 5]), T).tolist() == [0, 64, 64]


# N = 4 offsets over T = 64: each raw row is made legal by the rule (the second column).
TRACED_OFFSETS = [
    ((0, -20, 64, 64, 64), (0, 0, 64, 64, 64)),
    ((0, 2 ** 30, 64, 64, 64), (0, 64, 64, 64, 64)),
    ((0, 20, 80, 64, 64), (0, 20, 64, 64, 64)),
    ((0, 60, 10, 30, 64), (0, 60, 60, 60, 64)),
    ((0, 20, 40, 50, -1), (0, 20, 40, 50, 50)),        # last < 0: tokens 50.. are outside
    ((9, 30, 30, 50, 50), (9, 30, 30, 50, 50)),        # cu[0] > 0 and ends early
]


@pytest.mark.parametrize("impl", IMPLS, ids=IMPL_IDS)
def test_traced_offsets_follow_the_rule(impl):
    """Garbage (NaN) on tokens outside every sequence must not leak: o = 0 there, zero
    gradients, nothing in dA_log / ddt_bias."""
    x0, cot = inputs(VARLEN, 11)
    for raw, legal in TRACED_OFFSETS:
        c = dataclasses.replace(VARLEN, cu=legal)
        x = {n: a.copy() for n, a in x0.items()}
        outside = np.ones(c.T, bool)
        outside[legal[0]:legal[-1]] = False
        x["q"][0, outside] = np.nan
        x["g"][0, outside] = np.nan
        got = run(impl, c, x, cot, cu=np.asarray(raw, np.int32))
        assert_follows(got, cut_truth(c, x, cot), 1e-10)
        # The same offsets, already legal, give bitwise the same result.
        same = run(impl, c, x, cot, cu=np.asarray(legal, np.int32))
        np.testing.assert_array_equal(got[0], same[0])
        np.testing.assert_array_equal(got[2]["g"], same[2]["g"])
    # And as a constant known at trace time.
    raw, legal = TRACED_OFFSETS[-1]
    const = run(impl, dataclasses.replace(VARLEN, cu=legal), x, cot, concrete_cu=raw)
    np.testing.assert_allclose(const[0], got[0], rtol=1e-12, atol=1e-12)
    for n in GRADS:
        np.testing.assert_allclose(const[2][n], got[2][n], rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------------------
# §2 The log-decay floor.

def _extreme_decays(x, rng):
    """Hard resets and huge decays the unfloored float64 loop handles exactly."""
    g = x["g"]
    for value, frac in ((-np.inf, 0.04), (-1e7, 0.04), (-1000.0, 0.04), (0.0, 0.05),
                        (0.05, 0.05)):
        g[rng.random(g.shape) < frac] = value
    g[:, 16] = -np.inf                    # a whole-token reset at a chunk's first token
    g[:, 21, :, :3] = -1e7
    return x


@pytest.mark.parametrize("dtype", [jnp.float64, jnp.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("impl", IMPLS, ids=IMPL_IDS)
def test_log_decay_floor_matches_unfloored_truth(impl, dtype):
    c = CONFIGS["plain"]
    x, cot = inputs(c, 21)
    x = _extreme_decays(x, np.random.default_rng(21))
    tol = 1e-10 if dtype == jnp.float64 else 1e-4
    assert_follows(run(impl, c, x, cot, dtype), cut_truth(c, x, cot), tol)


@pytest.mark.parametrize("gate", ["softplus", "safe"])
@pytest.mark.parametrize("impl", IMPLS, ids=IMPL_IDS)
def test_infinite_gate_input_is_its_limit(impl, gate):
    """Raw ±inf gate input is legal (softplus +inf: a hard reset; safe: the bounds) and has a
    zero gradient; so does a raw gate big enough for the floor."""
    c = CONFIGS[gate]
    x, cot = inputs(c, 31)
    rng = np.random.default_rng(31)
    g = x["g"]
    for value, frac in ((np.inf, 0.05), (-np.inf, 0.05), (1e9, 0.05)):
        g[rng.random(g.shape) < frac] = value
    g[:, 16] = np.inf
    truth_x = dict(x, g=np.clip(g, -HUGE, HUGE))
    assert_follows(run(impl, c, x, cot), cut_truth(c, truth_x, cot), 1e-10)


# ----------------------------------------------------------------------------------------
# §3 Causal quarantine.

# q, k, g and beta cut the whole head at their first non-finite token; v only its value column.
HEAD_INPUTS = ("q", "k", "g", "beta")


def _illegal(c: Case, name, value):
    """Does this injected value start a quarantine of the head under the rules?"""
    if np.isnan(value) or name in ("q", "k"):
        return True
    if name == "beta":
        return not c.beta_sigmoid
    return c.gate == "plain" and value > 0      # g: -inf is a legal reset; see §2


def _inject(c, x, name, row, t, h, channel, value):
    x = {n: a.copy() for n, a in x.items()}
    if name == "beta":
        x[name][row, t, h] = value
    else:
        x[name][row, t, h, channel] = value
    truth_x = dict(x, g=np.clip(x["g"], -HUGE, HUGE))
    return x, truth_x


@pytest.mark.parametrize("gate", ["plain", "softplus", "safe"])
@pytest.mark.parametrize("impl", IMPLS, ids=IMPL_IDS)
def test_quarantine(impl, gate):
    """NaN and +inf in q, k, g and beta, at token 0, at a chunk's first token and mid-chunk, in
    one head of one row; plain gate runs on extreme decays too. Every other (row, head) must
    be bitwise the clean run's."""
    c = CONFIGS[gate]
    x, cot = inputs(c, 41)
    if gate == "plain":
        x = _extreme_decays(x, np.random.default_rng(41))
    clean = run(impl, c, x, cot)
    assert_follows(clean, cut_truth(c, x, cot), 1e-10)
    rng = np.random.default_rng(42)
    row, h = 1, 0
    for name in HEAD_INPUTS:
        for value in (np.nan, np.inf):
            for t in (0, 16, 21):
                xj, truth_x = _inject(c, x, name, row, t, h, rng.integers(c.K), value)
                cuts = {(row, h): t} if _illegal(c, name, value) else {}
                got = run(impl, c, xj, cot)
                where = f"{name}={value} at t={t}"
                try:
                    assert_follows(got, cut_truth(c, truth_x, cot, cuts), 1e-10)
                except AssertionError as e:
                    raise AssertionError(f"{where}: {e}") from None
                if cuts:
                    other = np.ones((c.B, c.H), bool)
                    other[row, h] = False
                    np.testing.assert_array_equal(got[0].transpose(0, 2, 1, 3)[other],
                                                  clean[0].transpose(0, 2, 1, 3)[other], where)
                    np.testing.assert_array_equal(got[1][other], clean[1][other], where)


def _state_column(c: Case, n, h, j):
    """Index of value column j of the state of (sequence n, head h), in the case's layout."""
    return (n, h, j) if c.v_first else (n, h, slice(None), j)


def check_column_quarantine(impl, c: Case, x, cot, *, row, n, h, j, tj, value, cuts=None,
                            garbage=None):
    """v[row, tj, h, j] = value (and -inf at the later token `garbage`, if given) in sequence n
    of that row, on top of whatever x holds (a bad q/k/g/beta making `cuts`). The cotangents
    at the column's quarantined places are dirty: NaN at do[tj, j], at the sequence's last
    do[·, j] and in the final state's column j, random elsewhere.

    Checked against the float64 truth, and bitwise against the same path's run on the input
    with v[t >= tj, j] := 0 and those cotangents zeroed: o and the final state are that run's
    with NaN in column j from cj = min(t0, tj) on, every gradient is that run's (dv[t >= cj, j]
    being exactly 0)."""
    cuts = cuts or {}
    end = next(e for _, _, e, m in _spans(c) if m == n)
    cj = min(tj, cuts.get((n, h), end))
    col = (row, slice(tj, end), h, j)
    dirty = {m: a.copy() for m, a in x.items()}
    dirty["v"][row, tj, h, j] = value
    if garbage is not None:
        dirty["v"][row, garbage, h, j] = -np.inf
    dirty_cot = dict(o=cot["o"].copy(), s=cot["s"].copy())
    dirty_cot["o"][row, [tj, end - 1], h, j] = np.nan
    dirty_cot["s"][_state_column(c, n, h, j)] = np.nan
    clean = {m: a.copy() for m, a in x.items()}
    clean["v"][col] = 0
    clean_cot = dict(o=cot["o"].copy(), s=cot["s"].copy())
    clean_cot["o"][col] = 0
    clean_cot["s"][_state_column(c, n, h, j)] = 0

    got = run(impl, c, dirty, dirty_cot)
    truth_x = dict(dirty, g=np.clip(dirty["g"], -HUGE, HUGE))
    assert_follows(got, cut_truth(c, truth_x, dirty_cot, cuts, {(n, h, j): tj}), 1e-10)

    ref = run(impl, c, clean, clean_cot)
    want_o = ref[0].copy()
    want_o[row, cj:end, h, j] = np.nan
    np.testing.assert_array_equal(got[0], want_o, "o")
    want_s = ref[1].copy()
    want_s[_state_column(c, n, h, j)] = np.nan
    np.testing.assert_array_equal(got[1], want_s, "final state")
    dead = (row, slice(cj, end), h, j)
    assert np.all(got[2]["v"][dead] == 0), "dv of the quarantined column"
    for m in GRADS:
        a, b = got[2][m].copy(), ref[2][m].copy()
        if m == "v":
            a[dead] = b[dead] = 0
        np.testing.assert_array_equal(a, b, f"d{m}")


@pytest.mark.parametrize("v_first", [False, True], ids=["kv", "vk"])
@pytest.mark.parametrize("gate", ["plain", "softplus", "safe"])
@pytest.mark.parametrize("impl", IMPLS, ids=IMPL_IDS)
def test_quarantine_v_column(impl, gate, v_first):
    """NaN and +inf in one value v[t, j], at token 0, at a chunk's first token and mid-chunk,
    with -inf later in the same column: only column j of that (row, head) is quarantined; the
    other columns, heads and rows are bitwise those of the run with v[t >= tj, j] := 0."""
    c = dataclasses.replace(CONFIGS[gate], v_first=v_first)
    x, cot = inputs(c, 43)
    if gate == "plain":
        x = _extreme_decays(x, np.random.default_rng(43))
    rng = np.random.default_rng(44)
    row, h = 1, 0
    for value in (np.nan, np.inf):
        for tj in (0, 16, 21):
            j = int(rng.integers(c.V))
            try:
                check_column_quarantine(impl, c, x, cot, row=row, n=row, h=h, j=j, tj=tj,
                                        value=value, garbage=35)
            except AssertionError as e:
                raise AssertionError(f"v={value} at t={tj}, column {j}: {e}") from None


@pytest.mark.parametrize("impl", IMPLS, ids=IMPL_IDS)
def test_quarantine_v_column_and_head(impl):
    """A bad value column and a bad k in the same head: k later (the column is cut at tj, the
    head at t0), k earlier (both at t0), k at the same token."""
    c = CONFIGS["safe"]
    x, cot = inputs(c, 45)
    row, h, j = 1, 1, 5
    for tj, t0 in ((5, 21), (21, 5), (16, 16)):
        xk = {m: a.copy() for m, a in x.items()}
        xk["k"][row, t0, h, 2] = np.nan
        try:
            check_column_quarantine(impl, c, xk, cot, row=row, n=row, h=h, j=j, tj=tj,
                                    value=np.nan, cuts={(row, h): t0})
        except AssertionError as e:
            raise AssertionError(f"v at t={tj}, k at t={t0}: {e}") from None


@pytest.mark.parametrize("impl", IMPLS, ids=IMPL_IDS)
def test_quarantine_varlen(impl):
    """Only the hit sequence is affected; the other sequences are bitwise the clean run's.
    Hits at a sequence's first token (sequence 2 starts at 10), at its 17th token (a chunk's
    first token in the packed layout), mid-chunk, and on the last token of the row; a value
    column of sequence 2 from its 17th token on."""
    c = VARLEN
    x, cot = inputs(c, 51)
    clean = run(impl, c, x, cot)
    assert_follows(clean, cut_truth(c, x, cot), 1e-10)
    for name, t, h, value in (("k", 10, 0, np.nan), ("q", 20, 1, -np.inf),
                              ("beta", 30, 0, np.nan), ("g", 63, 1, np.nan)):
        n = int(np.searchsorted(c.cu[1:], t, side="right"))
        xj, truth_x = _inject(c, x, name, 0, t, h, 3, value)
        got = run(impl, c, xj, cot)
        assert_follows(got, cut_truth(c, truth_x, cot, {(n, h): t}), 1e-10)
        others = [m for m in range(c.N) if m != n]
        for m in others:
            span = slice(c.cu[m], c.cu[m + 1])
            np.testing.assert_array_equal(got[0][0, span], clean[0][0, span])
            np.testing.assert_array_equal(got[2]["q"][0, span], clean[2]["q"][0, span])
        np.testing.assert_array_equal(got[1][others], clean[1][others])
    # v: sequence 2 spans [10, 37).
    check_column_quarantine(impl, c, x, cot, row=0, n=2, h=1, j=3, tj=26, value=np.inf,
                            garbage=30)


# ----------------------------------------------------------------------------------------
# shard_map (check_vma on) with no initial state.

SHARD_STATIC = dict(use_qk_l2norm_in_kernel=True, use_beta_sigmoid_in_kernel=True,
                    use_gate_in_kernel=True, lower_bound=-5.0)


@functools.lru_cache(maxsize=None)
def _forward_and_grads(impl, sharded):
    """One compilation for o, S_T and the gradients of a loss on both, per (impl, sharded)."""
    def call(q, k, v, g, beta, A_log, dt_bias, cu):
        return impl(q, k, v, g, beta, A_log=A_log, dt_bias=dt_bias, cu_seqlens=cu,
                    **SHARD_STATIC)

    if sharded:
        heads = P(None, None, "h")
        mesh = jax.sharding.Mesh(np.array(jax.devices()[:4]), ("h",))
        call = jax.shard_map(call, mesh=mesh, in_specs=(heads,) * 5 + (P("h"),) * 2 + (P(),),
                             out_specs=(heads, P(None, "h")))

    def loss(args, cu, w):
        o, s = call(*args, cu)
        return jnp.sum(o * w) + jnp.sum(s * s), (o, s)

    return jax.jit(jax.grad(loss, has_aux=True))


@pytest.mark.parametrize("varlen", [False, True], ids=["batch", "varlen"])
@pytest.mark.parametrize("impl", IMPLS, ids=IMPL_IDS)
def test_shard_map_over_heads(impl, varlen, rng):
    """The zero initial state is a scan carry: without the inputs' varying axes, shard_map's
    type check rejects the scan. The unsharded reference is the oracle (one compilation for
    both paths); the chunked path is checked against it unsharded elsewhere."""
    if len(jax.devices()) < 4:
        pytest.skip("needs 4 host devices")
    (q, k, v, g, beta), kw = make_inputs(rng, B=2, T=20, H=4, K=16, V=16, gate_mode="safe",
                                         with_state=False,
                                         seqlens=(9, 0, 16) if varlen else None)
    cu = jnp.asarray(kw["cu_seqlens"]) if varlen else None
    args = tuple(map(jnp.asarray, (q, k, v, g, beta, kw["A_log"], kw["dt_bias"])))
    w = jnp.asarray(rng.standard_normal(v.shape), jnp.float32)
    grads, out = _forward_and_grads(impl, True)(args, cu, w)
    ref_grads, ref_out = _forward_and_grads(kda_recurrent, False)(args, cu, w)
    for a, b in zip(out + grads, ref_out + ref_grads):
        assert a.dtype == b.dtype and rel_err(a, b) < 1e-5


# ----------------------------------------------------------------------------------------
# Empty shapes.

@pytest.mark.parametrize("shape", [(0, 7, None), (2, 0, None), (1, 0, (0, 0))],
                         ids=["B0", "T0", "T0_varlen"])
@pytest.mark.parametrize("impl", IMPLS, ids=IMPL_IDS)
def test_empty(impl, shape):
    B, T, seqlens = shape
    H, K, V = 2, 16, 8
    N = B if seqlens is None else len(seqlens)
    rng = np.random.default_rng(61)
    args, kw = make_inputs(rng, B=B, T=T, H=H, K=K, V=V, gate_mode="softplus",
                           dtype=jnp.bfloat16, gate_dtype=np.float32, state_v_first=True,
                           seqlens=seqlens)
    q, k, v, g, beta, A_log, dt_bias, h0 = map(jnp.asarray, args + (
        kw["A_log"], kw["dt_bias"], kw["initial_state"]))
    w = jnp.asarray(rng.standard_normal(h0.shape), jnp.float32)
    cu = None if seqlens is None else jnp.asarray(kw["cu_seqlens"])

    for init in (h0, None):
        def f(q, k, v, g, beta, A_log, dt_bias, h0):
            return impl(q, k, v, g, beta, initial_state=init if init is None else h0,
                        use_gate_in_kernel=True, A_log=A_log, dt_bias=dt_bias,
                        use_qk_l2norm_in_kernel=True, state_v_first=True, cu_seqlens=cu)

        arrays = (q, k, v, g, beta, A_log, dt_bias, h0)
        o, s = jax.jit(f)(*arrays)
        assert o.shape == (B, T, H, V) and o.dtype == jnp.bfloat16
        assert s.shape == (N, H, V, K) and s.dtype == jnp.float32
        np.testing.assert_array_equal(s, h0 if init is not None else np.zeros(s.shape))
        grads = jax.jit(jax.grad(lambda *a: jnp.sum(f(*a)[1] * w), argnums=tuple(range(8))))(
            *arrays)
        for a, d in zip(arrays, grads):
            assert d.shape == a.shape and d.dtype == a.dtype
        np.testing.assert_array_equal(grads[7], w if init is not None else np.zeros(w.shape))
        assert not np.any(grads[5]) and not np.any(grads[6])
