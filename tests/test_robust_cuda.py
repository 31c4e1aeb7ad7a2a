"""docs/robustness.md on the CUDA path: traced offsets of any value, operands at any address,
gates of any magnitude, non-finite input, and the limits known at trace time. Outputs are
poisoned (conftest), so an element a kernel leaves unwritten shows up as NaN."""

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from inputs import float64_on_cpu, rel_err
from jax_flashkda import kda
from test_cuda_bwd import check, cuda_grads, make_case

pytestmark = pytest.mark.gpu

INT32_MIN, INT32_MAX = -2**31, 2**31 - 1


def legal(offsets, T):
    """docs/robustness.md §1 in NumPy: clip into [0, T], then a running maximum."""
    return np.maximum.accumulate(np.clip(np.asarray(offsets, np.int64), 0, T)).astype(np.int32)


def _call(x, dtypes, static, cu, impl="cuda"):
    """o, final state and every gradient of sum(o·do) + sum(S_T·dht), with cu_seqlens traced."""
    kw = {n: v for n, v in static.items() if n != "cu_seqlens"}
    args = {n: jnp.asarray(a, dtypes[n]) for n, a in x.items()}

    def loss(args, cu, do, dht):
        o, ht = kda(args["q"], args["k"], args["v"], args["g"], args["beta"],
                    initial_state=args["h0"], output_final_state=True, cu_seqlens=cu, impl=impl,
                    A_log=args.get("A_log"), dt_bias=args.get("dt_bias"), **kw)
        return (jnp.sum(o.astype(jnp.float32) * do) + jnp.sum(ht * dht)), (o, ht)

    f = jax.jit(jax.grad(loss, has_aux=True))
    return f, args


BAD_OFFSETS = [
    [0, -20, 64], [0, 2**30, 64], [0, 20, 80], [0, 60, 10, 64], [0, 20, -5], [10, 30, 64],
    [INT32_MIN, INT32_MAX, 5], [0, 33, 33, 50],
]


@pytest.mark.parametrize("offsets", BAD_OFFSETS, ids=str)
def test_traced_offsets_follow_the_rule(rng, offsets):
    T = 64
    x, dtypes, static, do, _ = make_case(rng, T=T, H=2, gate_mode=2, seqlens=[T])
    n = len(offsets) - 1
    x["h0"] = 0.3 * rng.standard_normal((n, 2, 128, 128))
    dht = rng.standard_normal(x["h0"].shape)
    f, args = _call(x, dtypes, static, None)
    do_j, dht_j = jnp.asarray(do, jnp.float32), jnp.asarray(dht, jnp.float32)
    got, (o, ht) = f(args, jnp.asarray(offsets, jnp.int32), do_j, dht_j)
    fixed = legal(offsets, T)
    want, (o_l, ht_l) = f(args, jnp.asarray(fixed), do_j, dht_j)
    # The kernels see the same legal offsets either way: bitwise equal.
    np.testing.assert_array_equal(np.asarray(o, np.float32), np.asarray(o_l, np.float32))
    np.testing.assert_array_equal(np.asarray(ht), np.asarray(ht_l))
    for name in got:
        np.testing.assert_array_equal(np.asarray(got[name], np.float32),
                                      np.asarray(want[name], np.float32), err_msg=name)
    outside = np.ones(T, bool)
    outside[fixed[0]:fixed[-1]] = False
    o = np.asarray(o, np.float32)
    assert np.all(o[:, outside] == 0), "tokens outside every sequence must get o = 0"
    assert np.isfinite(o).all()
    for name in ("q", "k", "v", "g", "beta"):
        grad = np.asarray(got[name], np.float32)
        assert np.all(grad[:, outside] == 0), f"d{name} of tokens outside must be 0"
        assert np.isfinite(grad).all(), f"d{name}"
    # Against the float64 oracle, run on the legal offsets.
    with float64_on_cpu():
        kw = {k: v for k, v in static.items() if k != "cu_seqlens"}
        # Traced, as the legal offsets need not start at 0 or end at T.
        ref_o, ref_ht = jax.jit(lambda cu: kda(
            *(jnp.asarray(x[n_]) for n_ in ("q", "k", "v", "g", "beta")),
            initial_state=jnp.asarray(x["h0"]), output_final_state=True, cu_seqlens=cu,
            impl="recurrent", A_log=jnp.asarray(x["A_log"]), dt_bias=jnp.asarray(x["dt_bias"]),
            **kw))(jnp.asarray(fixed))
    assert rel_err(o, ref_o) < 8e-3
    assert rel_err(ht, ref_ht) < 8e-3


@pytest.mark.parametrize("offset", [1, 2, 4, 8])
def test_unaligned_operands(rng, offset):
    """Every operand a slice of one flat buffer at `offset` elements from an aligned start:
    XLA hands such a slice to the custom call as an offset pointer."""
    x, dtypes, static, do, dht = make_case(rng, T=37, H=2, gate_mode=2)
    f, args = _call(x, dtypes, static, None)
    do_j, dht_j = jnp.asarray(do, jnp.float32), jnp.asarray(dht, jnp.float32)
    want, (o_want, ht_want) = f(args, None, do_j, dht_j)

    names = ("q", "k", "v")
    flat = jnp.concatenate([jnp.zeros((offset,), jnp.bfloat16)]
                           + [args[n].reshape(-1) for n in names])

    def sliced(flat, rest, do, dht):
        parts, at = {}, offset
        for n in names:
            size = args[n].size
            parts[n] = jax.lax.dynamic_slice(flat, (at,), (size,)).reshape(args[n].shape)
            at += size
        return jax.grad(lambda a: loss_of(a, do, dht), has_aux=True)({**rest, **parts})

    kw = {n: v for n, v in static.items() if n != "cu_seqlens"}

    def loss_of(a, do, dht):
        o, ht = kda(a["q"], a["k"], a["v"], a["g"], a["beta"], initial_state=a["h0"],
                    output_final_state=True, impl="cuda", A_log=a["A_log"],
                    dt_bias=a["dt_bias"], **kw)
        return jnp.sum(o.astype(jnp.float32) * do) + jnp.sum(ht * dht), (o, ht)

    rest = {n: a for n, a in args.items() if n not in names}
    got, (o, ht) = jax.jit(sliced)(flat, rest, do_j, dht_j)
    np.testing.assert_array_equal(np.asarray(o, np.float32), np.asarray(o_want, np.float32))
    np.testing.assert_array_equal(np.asarray(ht), np.asarray(ht_want))
    for n in want:
        np.testing.assert_array_equal(np.asarray(got[n], np.float32),
                                      np.asarray(want[n], np.float32), err_msg=n)


@pytest.mark.parametrize("value", [-np.inf, -1e7, -1000.0, 0.0, 0.05])
def test_extreme_log_decays(rng, value):
    """Plain log-decay gate with `value` at a fifth of the (token, channel) entries and at whole
    tokens: forward and every gradient against the float64 oracle."""
    case = make_case(rng, B=2, T=45, H=2, gate_mode=0)
    g = case[0]["g"]
    g[rng.random(g.shape) < 0.2] = value
    g[:, 7] = value
    check(case, f"log-decay {value}")


def test_softplus_gate_beyond_the_floor(rng):
    """Softplus gate inputs so large that -exp(A_log)·softplus(x) is far below the floor."""
    case = make_case(rng, B=1, T=45, H=2, gate_mode=1)
    g = case[0]["g"]
    g[rng.random(g.shape) < 0.1] = 1e6
    check(case, "softplus gate 1e6")


def _forward(x, dtypes, static, **over):
    args = {n: jnp.asarray(a, dtypes[n]) for n, a in x.items()}
    kw = dict(static, **over)
    o, ht = kda(args["q"], args["k"], args["v"], args["g"], args["beta"],
                initial_state=args["h0"], output_final_state=True, impl="cuda",
                A_log=args.get("A_log"), dt_bias=args.get("dt_bias"), **kw)
    return np.asarray(o, np.float32), np.asarray(ht)


@pytest.mark.parametrize("name", ["q", "k", "g", "beta", "v"])
@pytest.mark.parametrize("t0", [0, 16, 21])
@pytest.mark.parametrize("bad", [np.nan, np.inf])
@pytest.mark.parametrize("gate_mode", [0, 2])
def test_non_finite_input_is_causal(rng, name, t0, bad, gate_mode):
    """A non-finite value at token t0 of sequence 1, head 1: no earlier output and no other
    sequence or head changes (bitwise); the hit head's outputs from t0 on are NaN (for v, those
    of the hit value column), and so is its final state."""
    seqlens = [20, 40, 9]
    x, dtypes, static, _, _ = make_case(rng, H=2, gate_mode=gate_mode, seqlens=seqlens)
    o, ht = _forward(x, dtypes, static)
    start = seqlens[0]
    tok = start + t0
    dirty = {n: a.copy() for n, a in x.items()}
    if name == "beta":
        dirty["beta"][0, tok, 1] = bad
    elif name == "v":
        dirty["v"][0, tok, 1, 37] = bad
    else:
        dirty[name][0, tok, 1, 5] = bad
    # Legal after the activations: +inf into the safe gate is lower_bound, into the sigmoid 1.
    legal_after_activation = bad == np.inf and (
        (name == "g" and gate_mode != 0) or name == "beta")
    o_d, ht_d = _forward(dirty, dtypes, static)
    np.testing.assert_array_equal(o_d[:, :tok], o[:, :tok])
    np.testing.assert_array_equal(o_d[:, :, 0], o[:, :, 0])
    np.testing.assert_array_equal(ht_d[[0, 2]], ht[[0, 2]])
    np.testing.assert_array_equal(ht_d[1, 0], ht[1, 0])
    end = start + seqlens[1]
    np.testing.assert_array_equal(o_d[:, end:], o[:, end:])
    if legal_after_activation:
        return
    hit = o_d[0, tok:end, 1]
    if name == "v":
        assert np.isnan(hit[:, 37]).all()
        others = np.delete(np.arange(128), 37)
        np.testing.assert_array_equal(hit[:, others], o[0, tok:end, 1][:, others])
    else:
        assert np.isnan(hit).all()
        assert np.isnan(ht_d[1, 1]).all()


def _lowered_text(fn, *shapes):
    return jax.jit(fn).lower(*shapes).as_text()


def _shapes(B, T, H, D=128, dtype=jnp.bfloat16):
    return (jax.ShapeDtypeStruct((B, T, H, D), dtype),) * 3 + (
        jax.ShapeDtypeStruct((B, T, H, D), jnp.float32), jax.ShapeDtypeStruct((B, T, H), jnp.float32))


def test_forward_limits_known_at_trace_time():
    shapes = _shapes(1, 16, 70000)
    with pytest.raises(ValueError, match="kda: impl='cuda' cannot run this call: the CUDA target supports "
                       "at most 65535 sequences and heads"):
        _lowered_text(lambda *a: kda(*a, impl="cuda")[0], *shapes)
    text = _lowered_text(lambda *a: kda(*a, impl="auto")[0], *shapes)
    assert "jax_flashkda_fwd" not in text


def _grad_fn(impl, **kw):
    """Value and gradients: the value keeps the compiled forward in the program even where the
    gradients come from the chunked path."""
    def f(q, k, v, g, beta):
        return jnp.sum(kda(q, k, v, g, beta, impl=impl, **kw)[0].astype(jnp.float32))
    return jax.value_and_grad(f, argnums=(0, 1, 2, 3, 4))


def test_backward_workspace_limit_known_at_trace_time():
    """B=1 T=360000 H=96: the forward's workspace fits an H200, the backward's (~5.7 KB per
    token-head, ~200 GB) does not. impl='auto' keeps the CUDA forward and differentiates the
    chunked path; impl='cuda' refuses the gradient by name."""
    shapes = _shapes(1, 360000, 96)
    with pytest.raises(ValueError, match=r"kda: the CUDA backward cannot run this call: the backward needs "
                       r"\d+ bytes of workspace, more than the device's \d+"):
        _lowered_text(_grad_fn("cuda"), *shapes)
    text = _lowered_text(_grad_fn("auto"), *shapes)
    assert "jax_flashkda_fwd" in text and "jax_flashkda_bwd" not in text


def test_backward_sequence_limit_known_at_trace_time():
    """40000 one-token sequences: the forward takes up to 65535, the backward 32767."""
    n = 40000
    cu = jnp.arange(n + 1, dtype=jnp.int32)
    shapes = _shapes(1, n, 1)
    with pytest.raises(ValueError, match="kda: the CUDA backward cannot run this call: the CUDA backward "
                       "supports at most 32767 sequences"):
        _lowered_text(_grad_fn("cuda", cu_seqlens=cu), *shapes)
    text = _lowered_text(_grad_fn("auto", cu_seqlens=cu), *shapes)
    # One token per sequence: the forward is the decode kernel's.
    assert "jax_flashkda_decode" in text and "jax_flashkda_bwd" not in text


@pytest.mark.parametrize("name", ["q", "k", "g", "beta", "v"])
@pytest.mark.parametrize("t0", [0, 21])
@pytest.mark.parametrize("gate_mode", [0, 2])
def test_non_finite_input_is_cut_from_the_backward(rng, name, t0, gate_mode):
    """NaN at token t0 of sequence 1, head 1, with non-zero (even NaN) cotangents from there on:
    the gradients equal those of the clean input whose cotangents from t0 on (and of the final
    state) are zero, in the hit head (for v: the hit value column, whose v from t0 on also
    reads as 0); the hit places get exactly zero gradient; all are finite."""
    seqlens = [20, 40, 9]
    x, dtypes, static, do, dht = make_case(rng, H=2, gate_mode=gate_mode, seqlens=seqlens)
    tok, end = seqlens[0] + t0, seqlens[0] + seqlens[1]
    col = 37 if name == "v" else slice(None)
    dirty = {n: a.copy() for n, a in x.items()}
    if name == "beta":
        dirty["beta"][0, tok, 1] = np.nan
    elif name == "v":
        dirty["v"][0, tok, 1, 37] = np.nan
    else:
        dirty[name][0, tok, 1, 5] = np.nan
    do_dirty = do.copy()
    do_dirty[0, tok:end, 1, col] = np.nan
    got = cuda_grads(dirty, dtypes, static, do_dirty, dht)

    clean = {n: a.copy() for n, a in x.items()}
    if name == "v":
        clean["v"][0, tok:end, 1, 37] = 0.0
    do_cut, dht_cut = do.copy(), dht.copy()
    do_cut[0, tok:end, 1, col] = 0.0
    dht_cut[1, 1, :, col] = 0.0
    want = cuda_grads(clean, dtypes, static, do_cut, dht_cut)

    for n in got:
        assert np.isfinite(got[n]).all(), f"d{n} has non-finite entries"
    if name == "v":
        assert np.all(got["v"][0, tok:end, 1, 37] == 0)
    else:
        for n in ("q", "k", "v", "g", "beta"):
            assert np.all(got[n][0, tok:end, 1] == 0), f"d{n} at dead tokens"
    for n in got:
        assert rel_err(got[n], want[n]) < 2e-3, (n, rel_err(got[n], want[n]))
    # Other heads and sequences run exactly as without the bad value.
    for n in ("q", "k", "v", "g", "beta"):
        np.testing.assert_array_equal(got[n][0, :, 0], want[n][0, :, 0])
        np.testing.assert_array_equal(got[n][0, end:], want[n][0, end:])
