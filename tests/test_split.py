"""The sequence split (jax_flashkda/split.py, docs/sequence_split.md): a long sequence cut into
segments run in parallel, then combined exactly. Forced through JAX_FLASHKDA_SEGMENT_TOKENS on
the C++ CPU target (and, marked gpu, on the CUDA target), against the unsplit call and the
float64 token recurrence: outputs, final states and every gradient, every gate mode, both state
layouts, packed sequences with empty and one-token ones, segments shorter than a chunk, and
non-finite input (the quarantine of docs/robustness.md §3 must not change)."""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from inputs import GATE_MODES, KERNEL_OPERANDS, float64_on_cpu, kernel_inputs, make_inputs, rel_err
from jax_flashkda import _ffi, kda, ops, split

ENV = split.SEGMENT_TOKENS_ENV
GRAD_NAMES = ("q", "k", "v", "g", "beta", "initial_state", "A_log", "dt_bias")
cpu_target = pytest.mark.skipif(
    not (jax.default_backend() == "cpu" and ops._cpu_target_ready()),
    reason="needs the C++ CPU target on a CPU backend")


def _call(args, kwargs, impl, dtype):
    """(o, final, grads) of one call: grads of sum(o·wo) + sum(final·wf) with fixed random
    weights, for every differentiable input."""
    names = [n for n in GRAD_NAMES
             if n in ("q", "k", "v", "g", "beta") or kwargs.get(n) is not None]
    static = {n: x for n, x in kwargs.items() if n not in names}
    primal = dict(zip(("q", "k", "v", "g", "beta"), args))
    primal.update({n: kwargs[n] for n in names if n in kwargs})
    other = jnp.float64 if dtype == jnp.float64 else jnp.float32
    primal = {n: jnp.asarray(x, dtype if n in ("q", "k", "v") else other)
              for n, x in primal.items()}
    wrng = np.random.default_rng(7)

    def forward(p):
        kw = dict(static, **{n: p[n] for n in names if n not in ("q", "k", "v", "g", "beta")})
        return kda(p["q"], p["k"], p["v"], p["g"], p["beta"], impl=impl, **kw)

    o, final = jax.jit(forward)(primal)
    wo = jnp.asarray(wrng.standard_normal(o.shape), jnp.float32)
    wf = jnp.asarray(wrng.standard_normal(final.shape), jnp.float32)

    def loss(p):
        o, final = forward(p)
        wide = jnp.promote_types(final.dtype, jnp.float32)
        return jnp.sum(o.astype(wide) * wo) + jnp.sum(final.astype(wide) * wf)

    grads = jax.jit(jax.grad(loss))(primal)
    as64 = lambda x: np.asarray(jnp.asarray(x, jnp.float32), np.float64)
    return as64(o), as64(final), {n: as64(g) for n, g in grads.items()}


def run(monkeypatch, args, kwargs, segment_tokens, impl="ffi", dtype=jnp.float32):
    monkeypatch.setenv(ENV, str(segment_tokens))
    return _call(args, kwargs, impl, dtype)


def oracle(args, kwargs):
    with float64_on_cpu():
        args64 = [np.asarray(a, np.float64) for a in args]
        kw64 = {n: (np.asarray(x, np.float64) if isinstance(x, np.ndarray)
                    and x.dtype.kind == "f" else x) for n, x in kwargs.items()}
        return _call(args64, kw64, "recurrent", jnp.float64)


def assert_close(got, want, tol, what):
    o, f, g = got
    o_ref, f_ref, g_ref = want
    assert rel_err(o, o_ref) < tol, (what, "o", rel_err(o, o_ref))
    assert rel_err(f, f_ref) < tol, (what, "final", rel_err(f, f_ref))
    for n in g_ref:
        assert rel_err(g[n], g_ref[n]) < tol, (what, n, rel_err(g[n], g_ref[n]))


def poison_check(got):
    o, f, g = got
    for name, x in [("o", o), ("final", f)] + list(g.items()):
        assert np.all(np.isfinite(x)), name


# ---------------------------------------------------------------------------------------------
# The plan and the segments (any platform).

SMS = 132


@pytest.mark.parametrize("case, expected", [
    ((1, 32768, 16, 1, 32768), "forward"),
    ((2, 32768, 16, 2, 32768), None),              # 256 busy warps: the GPU is full
    ((1, 32768, 12, 1, 32768), "forward"),
    ((1, 65536, 8, 1, 65536), "forward"),
    ((1, 131072, 4, 1, 131072), "both"),
    ((1, 73728, 8, 9, 65536), "forward"),          # one of 65536 with eight of 1024
    ((1, 8192, 96, 1, 8192), None),                # the many-heads cases fill the GPU already
    ((1, 8192, 64, 1, 8192), None),
    ((4, 8192, 32, 4, 8192), None),
    ((1, 8192, 96, 6, 8192), None),
    ((1, 4096, 2, 1, 4096), None),                 # too short for two segments
    ((1, 8192, 2, 1, 8192), "both"),
    ((64, 1, 32, 64, 1), None),                    # decode
])
def test_planner(monkeypatch, case, expected):
    monkeypatch.setenv(ENV, "auto")
    b, t, h, n, longest = case
    sizes = dict(batch=b, tokens=t, heads=h, value_dim=128, num_sequences=n, longest=longest,
                 sms=SMS)
    plan = split.plan_split(automatic=True, **sizes)
    got = None if plan is None else ("both" if plan.backward else "forward")
    assert got == expected
    if plan is not None:
        assert plan.segment_tokens % 16 == 0 and plan.segment_tokens >= split.MIN_SEGMENT_TOKENS
        assert longest >= 2 * plan.segment_tokens
        assert plan.num_segments >= n + (b * t) // plan.segment_tokens
    assert split.plan_split(automatic=False, **sizes) is None


def test_planner_rounds_a_split_backwards_segments_to_a_power_of_two(monkeypatch):
    # Measured (docs/sequence_split.md, run 5): at T131072 H4 the split forward and backward
    # took 7.80 ms with 8192-token segments against 8.32 with the unrounded 5296. A plan that
    # keeps the backward whole (the one-call CUDA split forward) keeps its length.
    monkeypatch.setenv(ENV, "auto")
    common = dict(value_dim=128, sms=SMS, automatic=True, batch=1, num_sequences=1)
    both = split.plan_split(tokens=131072, heads=4, longest=131072, **common)
    assert both == split.SplitPlan(8192, 1 + 131072 // 8192, backward=True)
    forward = split.plan_split(tokens=65536, heads=8, longest=65536, **common)
    assert forward.segment_tokens == 5296 and not forward.backward


def test_planner_is_forced_by_the_environment(monkeypatch):
    sizes = dict(batch=1, tokens=8192, heads=96, value_dim=128, num_sequences=1, longest=8192,
                 sms=SMS, automatic=True)
    monkeypatch.setenv(ENV, "100")
    assert split.plan_split(**sizes) == split.SplitPlan(100, 1 + 8192 // 100, backward=True)
    monkeypatch.setenv(split.SPLIT_BACKWARD_ENV, "0")
    assert split.plan_split(**sizes) == split.SplitPlan(100, 1 + 8192 // 100, backward=False)
    for bad in ("2", "yes"):
        monkeypatch.setenv(split.SPLIT_BACKWARD_ENV, bad)
        with pytest.raises(ValueError, match=f"{split.SPLIT_BACKWARD_ENV} must be 0 or 1"):
            split.plan_split(**sizes)
    monkeypatch.delenv(split.SPLIT_BACKWARD_ENV)
    few_heads = dict(sizes, heads=4, tokens=131072, longest=131072)
    monkeypatch.setenv(ENV, "auto")
    assert split.plan_split(**few_heads) is not None
    monkeypatch.setenv(ENV, "0")
    assert split.plan_split(**few_heads) is None
    for default in ("", None):                     # unset or empty: the planner decides
        if default is None:
            monkeypatch.delenv(ENV)
        else:
            monkeypatch.setenv(ENV, default)
        assert split.plan_split(**few_heads) is not None
        assert split.plan_split(**sizes) is None
    monkeypatch.setenv(ENV, "-3")
    with pytest.raises(ValueError, match=ENV):
        split.plan_split(**sizes)
    monkeypatch.setenv(ENV, "many")
    with pytest.raises(ValueError, match=ENV):
        split.plan_split(**sizes)


def test_planner_without_the_lengths(monkeypatch):
    # Traced cu_seqlens: the lengths are unknown at trace time. A packed batch of short
    # sequences would pay for a split and gain nothing, so "auto" keeps the call whole; a forced
    # length still splits.
    sizes = dict(batch=1, tokens=65536, heads=8, value_dim=128, num_sequences=64, sms=SMS,
                 automatic=True)
    monkeypatch.setenv(ENV, "auto")
    assert split.plan_split(longest=65536, **sizes) is not None
    assert split.plan_split(longest=None, **sizes) is None
    monkeypatch.setenv(ENV, "4096")
    assert split.plan_split(longest=None, **sizes) == split.SplitPlan(4096, 64 + 16)


@pytest.mark.parametrize("lengths, L", [([10, 0, 25, 1, 0], 4), ([7], 7), ([8], 3), ([0, 0], 5)])
def test_segments_tile_each_sequence(lengths, L):
    cu = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    plan = split.SplitPlan(L, len(lengths) + int(cu[-1]) // L)
    seg = split._segments(jnp.asarray(cu), plan)
    seg = type(seg)(**{f: np.asarray(getattr(seg, f)) for f in seg.__dataclass_fields__})
    assert seg.cu[0] == 0 and seg.cu[-1] == cu[-1] and np.all(np.diff(seg.cu) >= 0)
    assert np.all(np.diff(seg.cu) <= L)
    for i, n in enumerate(lengths):
        first, last = seg.first[i], seg.last[i]
        assert seg.cu[first] == cu[i] and seg.cu[last + 1] == cu[i + 1]
        assert last - first + 1 == max(1, -(-n // L))
        assert seg.is_first[first] and seg.is_last[last]
        assert np.all(seg.sequence[first:last + 1] == i)
    used = sum(max(1, -(-n // L)) for n in lengths)
    assert not seg.is_first[used:].any() and not seg.is_last[used:].any()


def test_choice_is_in_the_debug_log(monkeypatch, caplog):
    if not ops._cpu_target_ready():
        pytest.skip("needs the C++ CPU target")
    args, kwargs = make_inputs(np.random.default_rng(0), B=1, T=40, H=2, K=16, V=16)
    monkeypatch.setenv(ENV, "16")
    with caplog.at_level(logging.DEBUG, logger="jax_flashkda"):
        kda(*map(jnp.asarray, args), impl="ffi", **kwargs)
    assert "sequence split into segments of 16 tokens" in caplog.text
    assert "backward split" in caplog.text


def test_planner_sees_concrete_offsets_under_jit(monkeypatch, caplog):
    # NumPy cu_seqlens are lengths known at trace time, under jit too (converted there with
    # jnp.asarray they became a tracer, and "auto" then kept every such call whole); traced
    # ones are not.
    if not ops._cpu_target_ready():
        pytest.skip("needs the C++ CPU target")
    args, kwargs = make_inputs(np.random.default_rng(0), H=2, K=16, V=16, seqlens=[7, 0, 30, 3])
    monkeypatch.setenv(ENV, "0")
    with caplog.at_level(logging.DEBUG, logger="jax_flashkda"):
        jax.jit(lambda *a: kda(*a, impl="ffi", **kwargs)[0])(*map(jnp.asarray, args))
    assert "longest=30" in caplog.text
    caplog.clear()
    traced = jax.jit(lambda cu, *a: kda(*a, impl="ffi", **dict(kwargs, cu_seqlens=cu))[0])
    with caplog.at_level(logging.DEBUG, logger="jax_flashkda"):
        traced(jnp.asarray(kwargs["cu_seqlens"]), *map(jnp.asarray, args))
    assert "longest=None" in caplog.text


# ---------------------------------------------------------------------------------------------
# The C++ CPU target, split against unsplit and the float64 oracle.

@cpu_target
@pytest.mark.parametrize("gate_mode", GATE_MODES)
@pytest.mark.parametrize("state_v_first", [False, True])
@pytest.mark.parametrize("seqlens", [None, [70, 0, 1, 93, 16]], ids=["batch", "varlen"])
def test_cpu_split_matches_unsplit_and_oracle(monkeypatch, rng, gate_mode, state_v_first,
                                              seqlens):
    args, kwargs = make_inputs(rng, B=2, T=75, H=2, K=16, V=24, gate_mode=gate_mode,
                               state_v_first=state_v_first, seqlens=seqlens)
    whole = run(monkeypatch, args, kwargs, 0)
    truth = oracle(args, kwargs)
    assert_close(whole, truth, 2e-4, "unsplit vs oracle")
    # 5: segments shorter than a chunk; 23: boundaries inside chunks; 64: on chunk edges.
    for L in (5, 23, 64):
        got = run(monkeypatch, args, kwargs, L)
        poison_check(got)
        assert_close(got, whole, 2e-5, f"split {L} vs unsplit")
        assert_close(got, truth, 2e-4, f"split {L} vs oracle")


@cpu_target
def test_cpu_split_forward_whole_backward(monkeypatch, rng):
    """The planner's usual choice for a few heads: the forward split, the backward whole."""
    args, kwargs = make_inputs(rng, B=1, T=0, H=2, K=16, V=16, seqlens=[150, 0, 33])
    whole = run(monkeypatch, args, kwargs, 0)
    monkeypatch.setenv(split.SPLIT_BACKWARD_ENV, "0")
    got = run(monkeypatch, args, kwargs, 40)
    poison_check(got)
    assert_close(got, whole, 2e-5, "forward split vs unsplit")


@cpu_target
def test_cpu_split_without_initial_state(monkeypatch, rng):
    args, kwargs = make_inputs(rng, B=1, T=130, H=2, K=16, V=16, with_state=False)
    kwargs["output_final_state"] = True
    whole = run(monkeypatch, args, kwargs, 0)
    got = run(monkeypatch, args, kwargs, 17)
    assert_close(got, whole, 2e-5, "split vs unsplit")


def _nan_pattern_and_values(got, want, what):
    for name, x, y in [("o", got[0], want[0]), ("final", got[1], want[1])] + [
            (n, got[2][n], want[2][n]) for n in want[2]]:
        assert np.array_equal(np.isnan(x), np.isnan(y)), (what, name, "NaN pattern")
        keep = ~np.isnan(y)
        assert rel_err(x[keep], y[keep]) < 2e-5, (what, name, rel_err(x[keep], y[keep]))


@cpu_target
@pytest.mark.parametrize("field, value", [("v", np.nan), ("q", np.nan), ("beta", np.inf),
                                          ("g", -np.inf), ("k", np.inf)])
@pytest.mark.parametrize("where", ["early", "late"])
def test_cpu_split_keeps_the_quarantine(monkeypatch, rng, field, value, where):
    """A non-finite value in one segment must quarantine exactly what the unsplit call does, in
    that segment and in every later one (outputs, final states, gradients)."""
    # Segments of 20: the last sequence ends in a one-token segment at the last token, where
    # the empty segments after it start too.
    args, kwargs = make_inputs(rng, B=1, T=0, H=2, K=16, V=16, seqlens=[81, 0, 41, 61],
                               gate_mode="log_decay")
    args = [a.copy() for a in args]
    i = ("q", "k", "v", "g", "beta").index(field)
    # In the first sequence's first or fourth segment, and in the last sequence's first.
    for t in (9 if where == "early" else 75, 127):
        if field == "v":
            args[i][0, t, 1, 3] = value
        elif field == "beta":
            args[i][0, t, 0] = value
        else:
            args[i][0, t, 1, 5] = value
    whole = run(monkeypatch, args, kwargs, 0)
    got = run(monkeypatch, args, kwargs, 20)
    _nan_pattern_and_values(got, whole, f"{field} at {t}")


# ---------------------------------------------------------------------------------------------
# The CUDA target.

@pytest.mark.gpu
@pytest.mark.parametrize("gate_mode, state_v_first, seqlens", [
    ("log_decay", False, None), ("softplus", True, None),
    ("safe", False, [250, 0, 1, 133, 64]), ("log_decay", True, [17, 380])])
def test_cuda_split_matches_unsplit_and_oracle(monkeypatch, rng, gate_mode, state_v_first,
                                               seqlens):
    args, kwargs = make_inputs(rng, B=2, T=200, H=2, K=128, V=128, gate_mode=gate_mode,
                               state_v_first=state_v_first, seqlens=seqlens)
    whole = run(monkeypatch, args, kwargs, 0, impl="cuda", dtype=jnp.bfloat16)
    truth = oracle([np.asarray(jnp.asarray(a, jnp.bfloat16).astype(jnp.float32))
                    if i < 3 else a for i, a in enumerate(args)], kwargs)
    base = {n: rel_err(x, y) for n, x, y in
            [("o", whole[0], truth[0]), ("final", whole[1], truth[1])]
            + [(n, whole[2][n], truth[2][n]) for n in truth[2]]}
    # 7: segments shorter than a 16-token chunk; 100: boundaries inside chunks. The backward
    # whole ("0") or split too ("1": jax_flashkda_bwd_split).
    for L, split_backward in ((7, "0"), (100, "1")):
        monkeypatch.setenv(split.SPLIT_BACKWARD_ENV, split_backward)
        got = run(monkeypatch, args, kwargs, L, impl="cuda", dtype=jnp.bfloat16)
        poison_check(got)
        errs = {n: rel_err(x, y) for n, x, y in
                [("o", got[0], truth[0]), ("final", got[1], truth[1])]
                + [(n, got[2][n], truth[2][n]) for n in truth[2]]}
        for n, e in errs.items():
            # No worse than the unsplit kernel, within rounding of the same order.
            assert e <= 1.5 * base[n] + 1e-4, (L, split_backward, n, e, base[n])


@pytest.mark.gpu
@pytest.mark.parametrize("gate_mode, state_v_first, seqlens, poison", [
    ("safe", False, [250, 0, 1, 133, 64], None), ("softplus", True, None, None),
    ("log_decay", False, [300, 90], "v"), ("safe", True, [300, 90], "beta")])
def test_cuda_split_backward_in_one_call_matches_the_composed(monkeypatch, rng, gate_mode,
                                                              state_v_first, seqlens, poison):
    """jax_flashkda_bwd_split (one preparation, the dZ pass, the backward walk over the
    segments and the backward proper in one call) against the same backward composed from the
    plain calls and a scan in JAX: the same gradients up to the scans' rounding, NaN
    quarantine included (a column, or the whole head, dying in the first segment)."""
    monkeypatch.setenv(split.SPLIT_BACKWARD_ENV, "1")
    args, kwargs = make_inputs(rng, B=2, T=200, H=2, K=128, V=128, gate_mode=gate_mode,
                               state_v_first=state_v_first, seqlens=seqlens)
    if poison:
        args = [a.copy() for a in args]
        i = ("q", "k", "v", "g", "beta").index(poison)
        args[i][0, 40, 1] = np.nan  # v: every column of head 1; beta: the head
    assert _ffi.has_target("CUDA", _ffi.BWD_SPLIT_TARGET)
    fused = run(monkeypatch, args, kwargs, 100, impl="cuda", dtype=jnp.bfloat16)
    has_target = _ffi.has_target
    monkeypatch.setattr(_ffi, "has_target", lambda platform, target: (
        target != _ffi.BWD_SPLIT_TARGET and has_target(platform, target)))
    split.split_vjp.cache_clear()
    try:
        composed = run(monkeypatch, args, kwargs, 100, impl="cuda", dtype=jnp.bfloat16)
    finally:
        split.split_vjp.cache_clear()
    if not poison:
        poison_check(fused)
    np.testing.assert_array_equal(fused[0], composed[0])
    np.testing.assert_array_equal(fused[1], composed[1])
    for n in composed[2]:
        x, y = fused[2][n], composed[2][n]
        assert np.array_equal(np.isnan(x), np.isnan(y)), (n, "NaN pattern")
        keep = ~np.isnan(y)
        assert rel_err(x[keep], y[keep]) < 1e-3, (n, rel_err(x[keep], y[keep]))


@pytest.mark.gpu
@pytest.mark.parametrize("gate_mode, v_first, seqlens", [
    (2, True, [250, 0, 1, 133]), (1, False, None), (0, False, [0, 0])])
def test_cuda_split_forward_returns_the_segments_states(rng, gate_mode, v_first, seqlens):
    """jax_flashkda_fwd_split's three more results, what the split backward starts from: each
    sequence's first segment starts from its initial state, the next from the last one's
    final state, which P·S_in + Z gives too, and its final state is the sequence's; the
    unused segments hold zero states and the transitions [0 | I]; o and the final states as
    the unsplit call's. Outputs poisoned (conftest), so an element left unwritten fails."""
    L, B, T = 64, 2, 230  # one unused segment in the first two cases
    x = kernel_inputs(rng, B=B, T=T, H=2, K=128, V=128, gate_mode=gate_mode,
                      dtype=jnp.bfloat16, g_dtype=np.float32, beta_dtype=np.float32,
                      v_first=v_first, seqlens=seqlens, always_gate_params=True)
    if seqlens is not None:
        B, T = x["q"].shape[:2]
    cu = x.get("cu_seqlens", np.zeros((1,), np.int32))
    cfg = _ffi.CallConfig(scale=128 ** -0.5, use_qk_l2norm=True, use_beta_sigmoid=True,
                          gate_mode=gate_mode, lower_bound=-5.0 if gate_mode == 2 else 0.0,
                          state_v_first=v_first, is_varlen=seqlens is not None)
    args = [jnp.asarray(x[n]) for n in KERNEL_OPERANDS] + [jnp.asarray(cu)]
    o, final, s_in, transitions, seg_final = map(
        np.asarray, jax.jit(_ffi.fwd_split_call(_ffi.SplitConfig(cfg, L)))(*args))
    o_whole, final_whole = map(np.asarray, jax.jit(_ffi.fwd_call(cfg))(*args))
    for name, got in (("o", o), ("final", final), ("s_in", s_in),
                      ("transitions", transitions), ("seg_final", seg_final)):
        assert np.all(np.isfinite(np.asarray(got, np.float32))), name
    if T * B:
        assert rel_err(o.astype(np.float32), o_whole.astype(np.float32)) < 1e-2
    if final_whole.size:
        assert rel_err(final, final_whole) < 1e-2

    keys_first = lambda s: np.swapaxes(s, -1, -2) if v_first else s
    h0, final = keys_first(x["h0"]), keys_first(final)
    lengths = np.diff(cu) if seqlens is not None else np.full(B, T)
    S = _ffi.split_segments(len(lengths), B * T, L)
    assert s_in.shape == seg_final.shape == (S, 2, 128, 128)
    assert transitions.shape == (S, 2, 128, 256)
    Z, P = transitions[..., :128], transitions[..., 128:]
    j = 0
    for i, n in enumerate(lengths):
        count = max(1, -(-int(n) // L))
        np.testing.assert_array_equal(s_in[j], h0[i])
        for m in range(j, j + count):
            carried = np.einsum("hkm,hmv->hkv", P[m].astype(np.float64), s_in[m]) + Z[m]
            assert rel_err(carried, seg_final[m]) < 1e-2, (i, m)
            if m + 1 < j + count:
                assert rel_err(s_in[m + 1], seg_final[m]) < 1e-2, (i, m)
        np.testing.assert_array_equal(final[i], seg_final[j + count - 1])
        j += count
    identity = np.broadcast_to(np.eye(128, dtype=np.float32), P[j:].shape)
    assert not s_in[j:].any() and not seg_final[j:].any() and not Z[j:].any()
    np.testing.assert_array_equal(P[j:], identity)


@pytest.mark.gpu
@pytest.mark.parametrize("split_backward", ["0", "1"])
def test_cuda_split_is_deterministic(monkeypatch, rng, split_backward):
    monkeypatch.setenv(split.SPLIT_BACKWARD_ENV, split_backward)
    args, kwargs = make_inputs(rng, B=1, T=3000, H=2, K=128, V=128)
    first = run(monkeypatch, args, kwargs, 512, impl="cuda", dtype=jnp.bfloat16)
    again = run(monkeypatch, args, kwargs, 512, impl="cuda", dtype=jnp.bfloat16)
    for x, y in zip(jax.tree.leaves(first), jax.tree.leaves(again)):
        assert np.array_equal(x, y)


@pytest.mark.gpu
@pytest.mark.parametrize("field", ["v", "q"])
@pytest.mark.parametrize("split_backward", ["0", "1"])
def test_cuda_split_keeps_the_quarantine(monkeypatch, rng, field, split_backward):
    monkeypatch.setenv(split.SPLIT_BACKWARD_ENV, split_backward)
    args, kwargs = make_inputs(rng, B=1, T=0, H=2, K=128, V=128, seqlens=[900, 300])
    args = [a.copy() for a in args]
    i = ("q", "k", "v", "g", "beta").index(field)
    args[i][0, 410, 1, 3] = np.nan
    whole = run(monkeypatch, args, kwargs, 0, impl="cuda", dtype=jnp.bfloat16)
    got = run(monkeypatch, args, kwargs, 200, impl="cuda", dtype=jnp.bfloat16)
    for name, x, y in [("o", got[0], whole[0]), ("final", got[1], whole[1])] + [
            (n, got[2][n], whole[2][n]) for n in whole[2]]:
        assert np.array_equal(np.isnan(x), np.isnan(y)), (name, "NaN pattern")
        keep = ~np.isnan(y)
        assert rel_err(x[keep], y[keep]) < 2e-2, (name, rel_err(x[keep], y[keep]))
