"""The CPU FFI target, called directly through `jax.ffi.ffi_call`, against float64 oracles.

The oracle is a NumPy token-by-token recurrence, forward and backward, in float64. Its
hand-written backward is itself checked against `jax.vjp` of a float64 jax.numpy recurrence
(autodiff, an independent derivation) on small shapes; the target is then compared with the
fast NumPy oracle everywhere.
"""

from __future__ import annotations

import functools
import importlib
import os

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from inputs import float64_on_cpu, rel_err

FWD, BWD = "jax_flashkda_fwd", "jax_flashkda_bwd"

# Fresh inputs every session; KDA_TEST_SEED reproduces a failing run.
SESSION_SEED = int(os.environ.get("KDA_TEST_SEED", np.random.SeedSequence().entropy % 2**32))


@functools.lru_cache(maxsize=None)
def _register():
    module = importlib.import_module("jax_flashkda._kda_cpu")
    # Registering the same capsule again (as _ffi.py may already have done) is harmless; the
    # cache keeps this module from doing it more than once.
    for name, capsule in module.registrations().items():
        jax.ffi.register_ffi_target(name, capsule, platform="cpu")


def _attrs(cfg):
    return dict(
        scale=np.float32(cfg["scale"]),
        use_qk_l2norm=cfg["l2norm"],
        use_beta_sigmoid=cfg["sigmoid"],
        gate_mode=np.int32(cfg["gate_mode"]),
        lower_bound=np.float32(cfg["lower_bound"]),
        state_v_first=cfg["v_first"],
        is_varlen=cfg["cu"] is not None,
    )


def _cu_operand(cfg):
    return np.asarray(cfg["cu"] if cfg["cu"] is not None else [0], np.int32)


def ffi_fwd(x, cfg):
    _register()
    B, T, H, _ = x["q"].shape
    V = x["v"].shape[-1]
    out = (
        jax.ShapeDtypeStruct((B, T, H, V), x["v"].dtype),
        jax.ShapeDtypeStruct(x["h0"].shape, jnp.float32),
    )
    call = jax.ffi.ffi_call(FWD, out, vmap_method="sequential")
    args = [x[n] for n in ("q", "k", "v", "g", "beta", "A_log", "dt_bias", "h0")]
    return call(*args, _cu_operand(cfg), **_attrs(cfg))


def ffi_bwd(x, do, dfinal, cfg):
    _register()
    B, T, H, K = x["q"].shape
    out = tuple(
        jax.ShapeDtypeStruct(x[n].shape, x[n].dtype) for n in ("q", "k", "v", "g", "beta")
    ) + (
        jax.ShapeDtypeStruct((B, H), jnp.float32),
        jax.ShapeDtypeStruct((B, H, K), jnp.float32),
        jax.ShapeDtypeStruct(x["h0"].shape, jnp.float32),
    )
    call = jax.ffi.ffi_call(BWD, out, vmap_method="sequential")
    args = [x[n] for n in ("q", "k", "v", "g", "beta", "A_log", "dt_bias", "h0")]
    return call(*args, _cu_operand(cfg), do, dfinal, **_attrs(cfg))


# ---------------------------------------------------------------------------------------------
# Oracles. Both work on the state in [K, V] order; callers transpose for state_v_first.


def _spans(cfg, B, T):
    if cfg["cu"] is None:
        return [(b, 0, T) for b in range(B)]
    cu = cfg["cu"]
    return [(0, cu[n], cu[n + 1]) for n in range(len(cu) - 1)]


def _sigmoid(x):
    return 1 / (1 + np.exp(-x))


def np_oracle(x, cfg, do=None, dfinal=None):
    """o, final state and, when do is given, the gradients (same order as the bwd results;
    dA_log and ddt_bias per batch row). The state is in [K, V] order."""
    f = {n: np.asarray(x[n], np.float64) for n in x}
    B, T, H, K = f["q"].shape
    V = f["v"].shape[-1]
    o = np.zeros((B, T, H, V))
    final = np.zeros(f["h0"].shape)
    grads = [np.zeros(f[n].shape) for n in ("q", "k", "v", "g", "beta")]
    grads += [np.zeros((B, H)), np.zeros((B, H, K)), np.zeros(f["h0"].shape)]
    dq, dk, dv, dg, dbeta, dA, dbias, dh0 = grads
    a = np.exp(f["A_log"])
    for n, (row, begin, end) in enumerate(_spans(cfg, B, T)):
        for h in range(H):
            S = f["h0"][n, h].copy()
            tape = []
            for t in range(begin, end):
                q, k, v, g, beta = (f[m][row, t, h] for m in ("q", "k", "v", "g", "beta"))
                rq = 1 / np.sqrt(q @ q + 1e-6) if cfg["l2norm"] else 1.0
                rk = 1 / np.sqrt(k @ k + 1e-6) if cfg["l2norm"] else 1.0
                q, k = q * rq, k * rk
                if cfg["sigmoid"]:
                    beta = _sigmoid(beta)
                xg = g + f["dt_bias"][h]
                if cfg["gate_mode"] == 1:
                    g = -a[h] * np.logaddexp(0.0, xg)
                elif cfg["gate_mode"] == 2:
                    g = cfg["lower_bound"] * _sigmoid(a[h] * xg)
                Sp = np.exp(g)[:, None] * S
                u = v - Sp.T @ k
                S = Sp + beta * np.outer(k, u)
                o[row, t, h] = cfg["scale"] * S.T @ q
                tape.append((t, q, k, g, xg, beta, rq, rk, Sp, u, S))
            final[n, h] = S
            if do is None:
                continue
            dS = np.asarray(dfinal, np.float64)[n, h].copy()
            for t, q, k, g, xg, beta, rq, rk, Sp, u, S in reversed(tape):
                d_o = np.asarray(do[row, t, h], np.float64)
                dS = dS + cfg["scale"] * np.outer(q, d_o)
                dq_t = cfg["scale"] * S @ d_o
                w = dS.T @ k
                dk_t = beta * (dS @ u - Sp @ w)
                db_t = w @ u
                dv[row, t, h] = beta * w
                dSp = dS - beta * np.outer(k, w)
                dg_t = np.sum(Sp * dSp, axis=1)
                dS = np.exp(g)[:, None] * dSp
                if cfg["l2norm"]:
                    dq_t = rq * (dq_t - (q @ dq_t) * q)
                    dk_t = rk * (dk_t - (k @ dk_t) * k)
                if cfg["sigmoid"]:
                    db_t = db_t * beta * (1 - beta)
                if cfg["gate_mode"] == 1:
                    dA[row, h] += dg_t @ g
                    dg_t = -dg_t * a[h] * _sigmoid(xg)
                    dbias[row, h] += dg_t
                elif cfg["gate_mode"] == 2:
                    s = _sigmoid(a[h] * xg)
                    dg_t = dg_t * cfg["lower_bound"] * s * (1 - s) * a[h]
                    dA[row, h] += dg_t @ xg
                    dbias[row, h] += dg_t
                dq[row, t, h], dk[row, t, h], dg[row, t, h], dbeta[row, t, h] = dq_t, dk_t, dg_t, db_t
            dh0[n, h] = dS
    return o, final, grads


def jax_reference(q, k, v, g, beta, A_rows, bias_rows, h0, *, cfg):
    """float64 recurrence; A_rows [B,H] and bias_rows [B,H,K] give each batch row its own copy
    so that autodiff yields the per-row gradients the target returns."""
    B, T, H, K = q.shape
    o = jnp.zeros(v.shape, v.dtype)
    finals = []
    for n, (row, begin, end) in enumerate(_spans(cfg, B, T)):
        qs, ks, vs, gs, bs = (z[row, begin:end] for z in (q, k, v, g, beta))
        if cfg["l2norm"]:
            qs = qs / jnp.sqrt(jnp.sum(qs * qs, -1, keepdims=True) + 1e-6)
            ks = ks / jnp.sqrt(jnp.sum(ks * ks, -1, keepdims=True) + 1e-6)
        if cfg["sigmoid"]:
            bs = jax.nn.sigmoid(bs)
        a = jnp.exp(A_rows[row])[:, None]
        if cfg["gate_mode"] == 1:
            gs = -a * jax.nn.softplus(gs + bias_rows[row])
        elif cfg["gate_mode"] == 2:
            gs = cfg["lower_bound"] * jax.nn.sigmoid(a * (gs + bias_rows[row]))

        def step(S, tok):
            qt, kt, vt, gt, bt = tok
            S = jnp.exp(gt)[..., None] * S
            u = vt - jnp.einsum("hkv,hk->hv", S, kt)
            S = S + bt[:, None, None] * kt[..., None] * u[:, None, :]
            return S, cfg["scale"] * jnp.einsum("hkv,hk->hv", S, qt)

        S, os_ = jax.lax.scan(step, h0[n], (qs, ks, vs, gs, bs))
        o = o.at[row, begin:end].set(os_)
        finals.append(S)
    return o, jnp.stack(finals)


# ---------------------------------------------------------------------------------------------
# Inputs.


def make_inputs(rng, cfg, B, T, H, K, V, dtype=np.float32, gate_dtype=None):
    N = B if cfg["cu"] is None else len(cfg["cu"]) - 1
    q = rng.standard_normal((B, T, H, K))
    k = rng.standard_normal((B, T, H, K))
    if not cfg["l2norm"]:
        # Unit-ish keys keep the delta rule contractive, as normalised keys would.
        q, k = q / np.sqrt(K), k / np.sqrt(K)
    v = rng.standard_normal((B, T, H, V))
    if cfg["gate_mode"] == 0:
        g = -rng.uniform(0.0, 2.0, (B, T, H, K)) ** 3
        if cfg.get("extreme_gate"):
            g[rng.random(g.shape) < 0.15] = -1000.0
            g[rng.random(g.shape) < 0.15] = -rng.uniform(10.0, 100.0)
    else:
        g = 2.0 * rng.standard_normal((B, T, H, K))
    beta = rng.standard_normal((B, T, H)) if cfg["sigmoid"] else rng.uniform(0.05, 1.0, (B, T, H))
    state_shape = (N, H, V, K) if cfg["v_first"] else (N, H, K, V)
    gate_dtype = gate_dtype or dtype
    return dict(
        q=q.astype(dtype),
        k=k.astype(dtype),
        v=v.astype(dtype),
        g=g.astype(gate_dtype),
        beta=beta.astype(gate_dtype),
        A_log=rng.uniform(-1.0, 1.0, H).astype(np.float32),
        dt_bias=rng.standard_normal((H, K)).astype(np.float32),
        h0=rng.standard_normal(state_shape).astype(np.float32),
    )


def _kv_state(s, cfg):
    return np.swapaxes(s, -1, -2) if cfg["v_first"] else s


def config(gate_mode=0, l2norm=False, sigmoid=False, v_first=False, cu=None, lower_bound=-5.0,
           scale=0.25, **extra):
    return dict(gate_mode=gate_mode, l2norm=l2norm, sigmoid=sigmoid, v_first=v_first, cu=cu,
                scale=scale, lower_bound=lower_bound, **extra)


# (name, cfg, B, T, H, K, V, dtype, gate/beta dtype)
CASES = [
    ("plain_log_decay", config(), 2, 37, 2, 64, 64, np.float32, None),
    ("softplus_gate_l2_sigmoid", config(1, True, True), 2, 29, 2, 32, 48, np.float32, None),
    ("safe_gate_fused_vfirst", config(2, True, True, True), 1, 45, 3, 32, 48, np.float32, None),
    ("safe_gate_lb_-1", config(2, False, True, lower_bound=-1.0), 2, 20, 2, 32, 16,
     np.float32, None),
    ("extreme_decays", config(0, True, False, extreme_gate=True), 2, 40, 2, 32, 48,
     np.float32, None),
    ("extreme_decays_vfirst", config(0, False, True, True, extreme_gate=True), 1, 33, 2, 32,
     24, np.float32, None),
    ("multi_segment", config(2, True, True), 1, 150, 2, 32, 40, np.float32, None),
    ("multi_segment_softplus_vfirst", config(1, True, False, True), 2, 70, 1, 16, 24,
     np.float32, None),
    ("t1", config(1, True, True), 3, 1, 2, 32, 48, np.float32, None),
    ("varlen", config(2, True, True, cu=[0, 5, 5, 6, 70, 90]), 1, 90, 2, 32, 48,
     np.float32, None),
    ("varlen_vfirst_log_decay", config(0, False, False, True, cu=[0, 0, 1, 66, 80]), 1, 80,
     2, 32, 16, np.float32, None),
    ("varlen_trailing_tokens", config(1, True, False, cu=[0, 7, 7, 19]), 1, 25, 2, 16, 24,
     np.float32, None),
    ("bf16_fused", config(2, True, True), 2, 40, 2, 64, 64, ml_dtypes.bfloat16, None),
    ("bf16_log_decay_vfirst", config(0, True, False, True, extreme_gate=True), 1, 70, 2, 32,
     48, ml_dtypes.bfloat16, None),
    ("f16_softplus", config(1, True, True), 1, 30, 2, 32, 48, np.float16, None),
    ("bf16_qkv_f32_gate", config(2, True, True), 1, 30, 2, 32, 48, ml_dtypes.bfloat16,
     np.float32),
]


def _tolerance(dtype):
    return 1e-4 if dtype == np.float32 else 2e-2


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_forward_backward_against_float64(case):
    name, cfg, B, T, H, K, V, dtype, gate_dtype = case
    cfg = dict(cfg, scale=K**-0.5)
    seed = (SESSION_SEED + sum(map(ord, name))) % 2**32
    rng = np.random.default_rng(seed)
    x = make_inputs(rng, cfg, B, T, H, K, V, dtype, gate_dtype)
    tol = _tolerance(dtype)
    msg = f"(KDA_TEST_SEED={SESSION_SEED})"

    o, final = ffi_fwd(x, cfg)
    assert o.dtype == x["v"].dtype and final.dtype == np.float32
    do = rng.standard_normal(o.shape).astype(x["v"].dtype)
    dfinal = rng.standard_normal(final.shape).astype(np.float32)
    o_ref, final_ref, ref = np_oracle(
        {**x, "h0": _kv_state(x["h0"], cfg)}, cfg, do, _kv_state(dfinal, cfg))
    assert np.all(np.isfinite(np.asarray(o, np.float64))), msg
    assert rel_err(o, o_ref) < tol, (rel_err(o, o_ref), msg)
    assert rel_err(_kv_state(final, cfg), final_ref) < 1e-4, msg

    grads = ffi_bwd(x, do, dfinal, cfg)
    ref[7] = _kv_state(ref[7], cfg)
    names = ["dq", "dk", "dv", "dg", "dbeta", "dA_log", "ddt_bias", "dinitial_state"]
    for gname, got, want in zip(names, grads, ref):
        assert got.dtype == (x[gname[1:]].dtype if gname[1:] in x else np.float32), gname
        got = np.asarray(got, np.float64)
        assert got.shape == want.shape, gname
        assert np.all(np.isfinite(got)), (gname, msg)
        if cfg["gate_mode"] == 0 and gname in ("dA_log", "ddt_bias"):
            assert np.all(got == 0), gname
            continue
        # Per-head parameter and state gradients are f32 whatever the input dtype.
        t = 1e-4 if gname in ("dA_log", "ddt_bias", "dinitial_state") and dtype == np.float32 \
            else tol
        assert rel_err(got, want) < t, (gname, rel_err(got, want), msg)

    if cfg["cu"] is not None and cfg["cu"][-1] < T:
        last = cfg["cu"][-1]
        assert np.all(np.asarray(o)[:, last:] == 0)
        for got in grads[:5]:
            assert np.all(np.asarray(got)[:, last:] == 0)


@pytest.mark.parametrize("cfg", [
    config(0, False, False, extreme_gate=True),
    config(1, True, True, cu=[0, 3, 3, 9]),
    config(2, True, True, lower_bound=-3.0),
], ids=["log_decay", "softplus_varlen", "safe_gate"])
def test_numpy_oracle_backward_matches_autodiff(cfg):
    rng = np.random.default_rng(SESSION_SEED + cfg["gate_mode"])
    B = 1 if cfg["cu"] is not None else 2
    B, T, H, K, V = B, 9, 2, 8, 6
    x = make_inputs(rng, cfg, B, T, H, K, V, np.float64)
    do = rng.standard_normal((B, T, H, V))
    dfinal = rng.standard_normal(x["h0"].shape)
    o_np, final_np, grads_np = np_oracle(x, cfg, do, dfinal)
    with float64_on_cpu():
        A_rows = np.broadcast_to(x["A_log"].astype(np.float64), (B, H))
        bias_rows = np.broadcast_to(x["dt_bias"].astype(np.float64), (B, H, K))
        primals = [jnp.asarray(np.asarray(a, np.float64)) for a in (
            x["q"], x["k"], x["v"], x["g"], x["beta"], A_rows, bias_rows, x["h0"])]

        @jax.jit
        def reference_and_grads(primals, cot):
            out, vjp = jax.vjp(functools.partial(jax_reference, cfg=cfg), *primals)
            return out, vjp(cot)

        (o, final), grads = reference_and_grads(primals, (jnp.asarray(do), jnp.asarray(dfinal)))
    assert rel_err(o_np, o) < 1e-12 and rel_err(final_np, final) < 1e-12
    for got, want in zip(grads_np, grads):
        if np.any(np.asarray(want) != 0):
            assert rel_err(got, want) < 1e-10
        else:
            assert np.all(got == 0)


def test_empty_sequence_passes_state_through():
    cfg = config(2, True, True, cu=[0, 0, 4, 4])
    rng = np.random.default_rng(SESSION_SEED + 1)
    x = make_inputs(rng, cfg, 1, 4, 2, 16, 8)
    _, final = ffi_fwd(x, cfg)
    np.testing.assert_array_equal(np.asarray(final)[[0, 2]], x["h0"][[0, 2]])
    do = rng.standard_normal((1, 4, 2, 8)).astype(np.float32)
    dfinal = rng.standard_normal(final.shape).astype(np.float32)
    dh0 = np.asarray(ffi_bwd(x, do, dfinal, cfg)[7])
    np.testing.assert_array_equal(dh0[[0, 2]], dfinal[[0, 2]])


def _expect_error(fn, *words):
    with pytest.raises(Exception) as info:
        jax.block_until_ready(fn())
    for w in words:
        assert w in str(info.value), str(info.value)


def test_invalid_operands_are_reported_by_name():
    cfg = config(1, True, True)
    rng = np.random.default_rng(SESSION_SEED + 2)
    x = make_inputs(rng, cfg, 1, 6, 2, 16, 8)
    _expect_error(lambda: ffi_fwd({**x, "A_log": x["A_log"].astype(np.float16)}, cfg), "A_log")
    _expect_error(lambda: ffi_fwd({**x, "beta": x["beta"][..., :1]}, cfg), "beta must")
    _expect_error(lambda: ffi_fwd({**x, "k": x["k"].astype(np.float16)}, cfg), "k must")
    _expect_error(lambda: ffi_fwd({**x, "h0": x["h0"][:, :, :8]}, cfg), "initial_state")
    _expect_error(lambda: ffi_fwd(x, dict(cfg, gate_mode=3)), "gate_mode")
    do = np.ones((1, 6, 2, 8), np.float16)
    _expect_error(lambda: ffi_bwd(x, do, np.zeros(x["h0"].shape, np.float32), cfg), "do must")
