"""State pools and speculative decoding (docs/decode.md): `kda` with `state_indices` and
`num_accepted_tokens`, against the suite's float64 pool oracle (tests/oracle.py), which follows
the document literally (read each sequence's slot, run the token recurrence, write the states
back in order).

Every case is jitted with the indices as traced arguments, so the on-device rules are what
is tested; the trace-time checks of concrete indices have their own tests. CPU only.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from inputs import float64_on_cpu, make_inputs, rel_err
from oracle import pool_oracle
from jax_flashkda import kda
from jax_flashkda.ops import _cpu_target_ready

H, K, V = 2, 16, 16
TOL = 2e-5


@pytest.fixture(autouse=True)
def on_the_cpu():
    """This file checks the pure paths and the C++ target in float32 at K = V = 16, which the
    CUDA kernels do not take: on a GPU machine too its calls run on the CPU (the CUDA decode
    has tests/test_cuda_decode.py)."""
    with jax.default_device(jax.devices("cpu")[0]):
        yield


ARRAYS = ("initial_state", "A_log", "dt_bias", "cu_seqlens")


# ----------------------------------------------------------------------------------------
# Running kda jitted, every array (the indices included) a traced argument.

def run(args, kw, state_indices, num_accepted_tokens=None, impl="auto"):
    arrays = {n: kw[n] for n in ARRAYS if kw.get(n) is not None}
    static = {n: x for n, x in kw.items() if n not in arrays}

    @jax.jit
    def f(args, arrays, idx, acc):
        return kda(*args, **arrays, **static, state_indices=idx, num_accepted_tokens=acc,
                   impl=impl)

    return f(args, arrays, state_indices, num_accepted_tokens)


def check(args, kw, idx, acc=None, impl="auto", written=None):
    """kda against the oracle; slots outside `written` keep their values bit for bit."""
    o, pool = run(args, kw, idx, acc, impl)
    o_ref, pool_ref = pool_oracle(args, kw, idx, acc)
    assert o.shape == args[2].shape and o.dtype == args[2].dtype
    assert pool.shape == kw["initial_state"].shape and pool.dtype == jnp.float32
    assert rel_err(o, o_ref) < TOL, rel_err(o, o_ref)
    assert rel_err(pool, pool_ref) < TOL, rel_err(pool, pool_ref)
    if written is not None:
        for slot in sorted(set(range(pool.shape[0])) - set(written)):
            np.testing.assert_array_equal(np.asarray(pool[slot]), kw["initial_state"][slot])
    return o, pool


def inputs(rng, T, gate_mode, v_first=False, B=4, P=7, seqlens=None, **options):
    """tests/inputs.py's make_inputs at this file's head dims, with a pool of P slots."""
    return make_inputs(rng, B=B, T=T, H=H, K=K, V=V, gate_mode=gate_mode,
                       state_v_first=v_first, seqlens=seqlens, pool_size=P, **options)


# ----------------------------------------------------------------------------------------
# Values.

# T = 1, 2, 5, 16 (decode and draft sizes) and 23 (past the decode size: the chunked path for
# 1-D indices under "auto"); every gate mode, both layouts, the impls that run here.
ONE_D = [(1, "log_decay", False, "auto"), (2, "softplus", True, "recurrent"),
         (5, "safe", False, "recurrent"), (16, "safe", True, "auto"),
         (23, "softplus", False, "auto"), (23, "log_decay", True, "recurrent")]


@pytest.mark.parametrize("T,gate,v_first,impl", ONE_D)
def test_one_slot_per_sequence(rng, T, gate, v_first, impl):
    args, kw = inputs(rng, T, gate, v_first)
    idx = np.array([5, -1, 0, 2], np.int32)        # sequence 1 is padding
    o, _ = check(args, kw, idx, impl=impl, written=(5, 0, 2))
    np.testing.assert_array_equal(np.asarray(o[1]), 0)


TWO_D = [(1, "safe", False, None), (2, "log_decay", True, [2, 1, 0, 9]),
         (5, "softplus", False, [3, 1, 5, 2]), (16, "safe", True, [16, 7, 1, 4]),
         (23, "softplus", True, [4, 1, 23, 2])]


@pytest.mark.parametrize("T,gate,v_first,accepted", TWO_D)
def test_state_after_every_token(rng, T, gate, v_first, accepted):
    """2-D indices [N, S]: token t of sequence n writes its state to idx[n, t]; the read slot is
    idx[n, a_n - 1] (a_n clipped into [1, S]); entries outside [0, P) skip the write."""
    S = T + 2
    P = 4 * S + 3
    args, kw = inputs(rng, T, gate, v_first, P=P)
    slots = rng.permutation(P)[: 4 * S].reshape(4, S).astype(np.int32)
    slots[1, 0] = -1                               # a token that writes nothing
    slots[2, T // 2] = -3
    if accepted is None:
        slots[3, 0] = -1                           # reads nothing: a padding sequence
    acc = None if accepted is None else np.array(accepted, np.int32)
    _, pool = check(args, kw, slots, acc, written=slots[:, :T][slots[:, :T] >= 0])
    # a_n = 0 reads idx[n, 0]: slot idx[n, 0] is the first token's state from idx[n, 0]'s old
    # value, which check() has compared with the oracle.
    assert pool.shape[0] == P


@pytest.mark.parametrize("per_token", [False, True])
def test_varlen_with_empty_sequences(rng, per_token):
    seqlens = [3, 0, 5, 1, 4]
    args, kw = inputs(rng, None, "safe", v_first=per_token, seqlens=seqlens, P=20)
    if per_token:
        # S = 3 < the longest sequence: tokens t >= 3 write nothing.
        idx = np.array([[4, 5, 6], [7, 8, 9], [10, 11, 12], [-1, 13, 14], [15, 16, 17]],
                       np.int32)
        acc = np.array([2, 1, 3, 1, 1], np.int32)    # sequence 3 reads idx[3, 0] < 0: padding
        check(args, kw, idx, acc, written=(4, 5, 6, 10, 11, 12, 16, 15, 17))
    else:
        idx = np.array([3, 9, -1, 0, 12], np.int32)  # the empty sequence 1 writes its slot back
        o, _ = check(args, kw, idx, written=(3, 9, 0, 12))
        np.testing.assert_array_equal(np.asarray(o[0, 3:8]), 0)  # sequence 2 is padding


def test_flags_off_and_a_hard_reset(rng):
    """No l2norm, beta given as is, a log-decay of -inf (a hard reset, docs/robustness.md §2)."""
    args, kw = inputs(rng, 5, "log_decay", B=3, P=4, l2norm=False, beta_sigmoid=False)
    g = args[3]
    g[1, 2, 0] = -np.inf
    idx = np.array([[3, 2, 1, 0, -1], [1, -1, 0, 3, 2], [-1, 0, 2, 3, 1]], np.int32)
    check(args, kw, idx, np.array([1, 5, 2], np.int32), impl="recurrent")


def test_traced_indices_out_of_range_are_padding(rng):
    """Traced indices cannot be checked: a read slot >= P (or negative) makes its sequence
    padding, a write slot >= P is skipped; nothing is read or written out of range."""
    args, kw = inputs(rng, 3, "safe", B=4, P=5)
    big = np.iinfo(np.int32).max
    o, pool = check(args, kw, np.array([7, 1, big, -big - 1], np.int32), written=(1,))
    for n in (0, 2, 3):
        np.testing.assert_array_equal(np.asarray(o[n]), 0)
    idx = np.array([[1, 5, 2], [6, 0, 3], [4, big, 9], [3, 3, 3]], np.int32)
    acc = np.array([1, 2, 1, 1], np.int32)
    check(args, kw, idx, acc, written=(1, 2, 0, 3, 4))
    # An unsigned index past int32 is clipped, not wrapped into range.
    wide = np.array([np.iinfo(np.uint32).max, 1, 0, 2], np.uint32)
    o, _ = run(args, kw, wide)
    np.testing.assert_array_equal(np.asarray(o[0]), 0)


def test_traced_illegal_offsets_are_made_legal(rng):
    """docs/robustness.md §1 holds with a pool: offsets [0, 5, 3, 8] read as [0, 5, 5, 8]."""
    args, kw = inputs(rng, None, "softplus", seqlens=[5, 0, 3], P=6)
    idx = np.array([4, 2, 0], np.int32)
    legal = dict(kw)
    kw["cu_seqlens"] = np.array([0, 5, 3, 8], np.int32)
    o, pool = run(args, kw, idx)
    o_ref, pool_ref = pool_oracle(args, legal, idx)
    assert rel_err(o, o_ref) < TOL and rel_err(pool, pool_ref) < TOL


def test_non_finite_value_quarantines_its_column_and_slot(rng):
    """docs/robustness.md §3 with per-token states: a NaN in v[t, j] of one sequence makes
    column j NaN in its outputs and written states from t on; other sequences, other columns
    and earlier tokens are exact."""
    args, kw = inputs(rng, 4, "safe", B=2, P=9)
    clean = tuple(a.copy() for a in args)
    args[2][0, 2, 1, 3] = np.nan                   # sequence 0, token 2, head 1, column 3
    idx = np.array([[0, 1, 2, 3], [4, 5, 6, 7]], np.int32)
    o, pool = run(args, kw, idx)
    o_ref, pool_ref = pool_oracle(clean, kw, idx)
    o, pool = np.array(o), np.array(pool)
    assert np.isnan(o[0, 2:, 1, 3]).all() and np.isnan(pool[2:4, 1, :, 3]).all()
    o[0, 2:, 1, 3] = o_ref[0, 2:, 1, 3]
    pool[2:4, 1, :, 3] = pool_ref[2:4, 1, :, 3]
    assert rel_err(o, o_ref) < TOL and rel_err(pool, pool_ref) < TOL


def test_empty_call_returns_the_pool(rng):
    args, kw = inputs(rng, 1, "safe", B=2, P=3)
    args = tuple(a[:, :0] for a in args)
    o, pool = kda(*args, **kw, state_indices=np.array([0, 2], np.int32))
    assert o.shape == (2, 0, H, V)
    np.testing.assert_array_equal(np.asarray(pool), kw["initial_state"])


# ----------------------------------------------------------------------------------------
# The impls agree.

IMPLS = ["recurrent", "chunked", "auto"] + (["ffi"] if _cpu_target_ready() else [])


@pytest.mark.parametrize("per_token", [False, True])
def test_impls_agree(rng, per_token):
    args, kw = inputs(rng, 6, "softplus", v_first=True, P=6)
    idx = (np.array([[5, 0, 1, 2, 3, 4], [-1, 0, 0, 0, 0, 0], [4, 3, 2, 1, 0, 5],
                     [2, 2, 2, 2, 2, 2]], np.int32) if per_token
           else np.array([1, 4, -2, 3], np.int32))
    acc = np.array([1, 1, 3, 6], np.int32) if per_token else None
    outs = {impl: run(args, kw, idx, acc, impl) for impl in IMPLS}
    for impl in IMPLS[1:]:
        for a, b in zip(outs[impl], outs["recurrent"]):
            assert rel_err(a, b) < 1e-5, impl


@pytest.mark.skipif(not _cpu_target_ready(), reason="the C++ target is not built")
def test_pool_is_gather_kda_scatter_on_the_cpu_target(rng):
    """The pool path equals an explicit gather, kda on the C++ target, and scatter."""
    args, kw = inputs(rng, 9, "safe", P=6)
    idx = np.array([4, 0, 5, 2], np.int32)
    o, pool = run(args, kw, idx, impl="ffi")
    gathered = dict(kw, initial_state=kw["initial_state"][idx])
    o_ffi, final = kda(*args, **gathered, impl="ffi")
    assert rel_err(o, o_ffi) < 1e-5
    expected = np.array(kw["initial_state"])
    expected[idx] = np.asarray(final)
    assert rel_err(pool, expected) < 1e-5


# ----------------------------------------------------------------------------------------
# Gradients: every differentiable input, the pool included, against central differences in
# float64 along a random direction.

GRAD_CASES = [
    dict(T=3, gate="safe", per_token=False, seqlens=[2, 0, 3], impl="recurrent"),
    dict(T=4, gate="softplus", per_token=True, seqlens=None, impl="auto"),
    dict(T=19, gate="log_decay", per_token=False, seqlens=None, impl="chunked"),
]


@pytest.mark.parametrize("case", GRAD_CASES, ids=lambda c: f"{c['gate']}-{c['impl']}")
def test_gradients(rng, case):
    P = 8
    args, kw = make_inputs(rng, B=3, T=case["T"], H=H, K=8, V=8, gate_mode=case["gate"],
                           dtype=np.float64, seqlens=case["seqlens"], pool_size=P,
                           state_v_first=case["per_token"])
    if case["per_token"]:
        idx = np.array([[6, 1, 2, 3], [-1, 0, 0, 0], [5, 4, 7, 0]], np.int32)
        acc = np.array([1, 1, 3], np.int32)
        untouched = ()
    else:
        idx = np.array([6, -1, 2], np.int32)
        acc = None
        untouched = (0, 1, 3, 4, 5, 7)
    names = ["q", "k", "v", "g", "beta"] + [n for n in ("A_log", "dt_bias", "initial_state")
                                          if kw.get(n) is not None]
    static = {n: x for n, x in kw.items() if n not in names and n != "cu_seqlens"}
    with float64_on_cpu():
        primals = dict(zip(names, [jnp.asarray(a, jnp.float64) for a in args]
                           + [jnp.asarray(kw[n], jnp.float64) for n in names[5:]]))
        cu = kw.get("cu_seqlens")
        o_shape = args[2].shape
        co = jnp.asarray(rng.standard_normal(o_shape))
        cp = jnp.asarray(rng.standard_normal(kw["initial_state"].shape))

        @jax.jit
        def loss(p):
            o, pool = kda(p["q"], p["k"], p["v"], p["g"], p["beta"],
                          **{n: p[n] for n in names[5:]}, **static, cu_seqlens=cu,
                          state_indices=idx, num_accepted_tokens=acc, impl=case["impl"])
            return jnp.sum(o * co) + jnp.sum(pool * cp)

        grads = jax.jit(jax.grad(loss))(primals)
        eps = 1e-5
        for n in names:
            d = jnp.asarray(rng.standard_normal(primals[n].shape))
            plus = loss({**primals, n: primals[n] + eps * d})
            minus = loss({**primals, n: primals[n] - eps * d})
            fd = float(plus - minus) / (2 * eps)
            ad = float(jnp.sum(grads[n] * d))
            assert abs(fd - ad) <= 1e-6 * max(1.0, abs(fd)), (n, fd, ad)
        # A slot nobody reads or writes passes its cotangent through unchanged; the padding
        # sequence's inputs get no gradient.
        for slot in untouched:
            np.testing.assert_array_equal(np.asarray(grads["initial_state"][slot]),
                                          np.asarray(cp[slot]))
        if cu is None:
            for n in ("q", "k", "v", "g", "beta"):
                np.testing.assert_array_equal(np.asarray(grads[n][1]), 0)


# ----------------------------------------------------------------------------------------
# Trace-time errors name the argument.

def _base(rng, **overrides):
    args, kw = inputs(rng, 2, "safe", B=2, P=4)
    kw.update(overrides)
    return args, kw


@pytest.mark.parametrize("overrides,error,match", [
    (dict(output_final_state=False), ValueError,
     "with state_indices kda returns the updated pool; pass output_final_state=True"),
    (dict(initial_state=None), ValueError, "state_indices needs initial_state"),
    (dict(state_indices=np.array([0, 4], np.int32)), ValueError,
     r"state_indices must be < P = 4 \(the pool's rows\) or negative \(a padding slot\), got 4"),
    (dict(state_indices=np.array([0.0, 1.0], np.float32)), TypeError,
     "state_indices must be an integer array, got float32"),
    (dict(state_indices=np.zeros((2, 2, 1), np.int32)), ValueError,
     r"state_indices must have rank 1 \(\[N\]\) or 2 \(\[N, S\]\), got shape \(2, 2, 1\)"),
    (dict(state_indices=np.array([0, 1, 2], np.int32)), ValueError,
     r"state_indices must have N = 2 rows \(N = B\), got shape \(3,\)"),
    (dict(state_indices=np.zeros((2, 1), np.int32)), ValueError,
     r"2-D state_indices \[N, S\] without cu_seqlens need S >= T = 2 \(a slot per token\), "
     r"got shape \(2, 1\)"),
    (dict(num_accepted_tokens=np.array([1, 1], np.int32)), ValueError,
     r"num_accepted_tokens is only used with 2-D state_indices \[N, S\]; state_indices has "
     r"shape \(2,\)"),
    (dict(state_indices=np.zeros((2, 3), np.int32), num_accepted_tokens=np.array([1], np.int32)),
     ValueError, r"num_accepted_tokens must have shape \(2,\) \(\[N\], N = B\), got \(1,\)"),
    (dict(state_indices=np.zeros((2, 3), np.int32),
          num_accepted_tokens=np.array([1.0, 2.0], np.float32)),
     TypeError, "num_accepted_tokens must be an integer array, got float32"),
    (dict(initial_state=np.zeros((4, 3, K, V), np.float32)), ValueError,
     r"initial_state must have shape \(4, 2, 16, 16\) \(\[P, H, K, V\], a state pool"),
])
def test_errors_name_the_argument(rng, overrides, error, match):
    args, kw = _base(rng, state_indices=np.array([0, -1], np.int32))
    kw.update(overrides)
    with pytest.raises(error, match=match):
        kda(*args, **kw)


def test_num_accepted_tokens_without_state_indices(rng):
    args, kw = _base(rng)
    kw["initial_state"] = kw["initial_state"][:2]
    with pytest.raises(ValueError, match=r"num_accepted_tokens is only used with 2-D state_indices \[N, S\] "
                       r"\(speculative decoding\); state_indices is None"):
        kda(*args, **kw, num_accepted_tokens=np.array([1, 1], np.int32))


def test_concrete_negative_indices_are_padding_not_errors(rng):
    args, kw = _base(rng)
    idx = np.array([-1, -5], np.int32)             # concrete inside the jitted function
    o, pool = jax.jit(lambda *a: kda(*a, **kw, state_indices=idx))(*args)
    np.testing.assert_array_equal(np.asarray(o), 0)
    np.testing.assert_array_equal(np.asarray(pool), kw["initial_state"])
