"""The CPU FFI target, called directly through `jax.ffi.ffi_call`, against the suite's float64
oracle (tests/oracle.py: the package's token recurrence in float64, gradients by autodiff;
itself checked against an independent NumPy loop in test_pure_jax.py).
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

from inputs import kernel_inputs, rel_err
from oracle import oracle

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
# The oracle: the suite's float64 recurrence (tests/oracle.py), per batch row, so that dA_log
# and ddt_bias come per row as the target returns them.


def kernel_oracle(x, cfg, do, dfinal):
    """o, final state and the gradients in the bwd results' order (dA_log [B, H] and ddt_bias
    [B, H, K] per batch row), float64, in the target's layouts."""
    gate = cfg["gate_mode"] > 0
    kw = dict(scale=cfg["scale"], use_qk_l2norm_in_kernel=cfg["l2norm"],
              use_beta_sigmoid_in_kernel=cfg["sigmoid"], state_v_first=cfg["v_first"],
              use_gate_in_kernel=gate,
              lower_bound=cfg["lower_bound"] if cfg["gate_mode"] == 2 else None,
              A_log=x["A_log"] if gate else None, dt_bias=x["dt_bias"] if gate else None)
    args = [x[n] for n in ("q", "k", "v", "g", "beta")]
    B, _, H, K = x["q"].shape
    if cfg["cu"] is not None:
        rows = [(slice(0, 1), slice(None))]
        kw["cu_seqlens"] = np.asarray(cfg["cu"], np.int32)
    else:
        rows = [(slice(b, b + 1), slice(b, b + 1)) for b in range(B)]
    o = np.zeros(x["v"].shape)
    final = np.zeros(x["h0"].shape)
    grads = [np.zeros(x[n].shape) for n in ("q", "k", "v", "g", "beta")]
    grads += [np.zeros((B, H)), np.zeros((B, H, K)), np.zeros(x["h0"].shape)]
    for b, (row, seqs) in enumerate(rows):
        o_b, final_b, g_b = oracle(
            [a[row] for a in args], dict(kw, initial_state=x["h0"][seqs]),
            (np.asarray(do)[row], np.asarray(dfinal)[seqs]))
        o[row], final[seqs] = o_b, final_b
        for i, n in enumerate(("q", "k", "v", "g", "beta")):
            grads[i][row] = g_b[n]
        if gate:
            grads[5][b], grads[6][b] = g_b["A_log"], g_b["dt_bias"]
        grads[7][seqs] = g_b["initial_state"]
    return o, final, grads


# ---------------------------------------------------------------------------------------------
# Inputs, from tests/inputs.py. The target's draws: decays from 1 down to e^-8, gate inputs
# of spread 2, unit-scale dt_bias and state; cfg["extreme_gate"] adds 15% of single channels
# decayed to -1000 and 15% to one value in [-100, -10].
TARGET_DRAWS = dict(log_decay="cubed_uniform", gate_scale=2.0, dt_bias_scale=1.0,
                    state_scale=1.0)
TARGET_EXTREME_DECAYS = ((-1000.0, 0.15), ((-100.0, -10.0), 0.15))


def target_inputs(rng, cfg, B, T, H, K, V, dtype=np.float32, gate_dtype=None):
    """The operands of one call with cfg's flags and offsets (q, k, v in `dtype`, g and beta
    in `gate_dtype`, default `dtype`)."""
    cu = cfg["cu"]
    varlen = {} if cu is None else dict(seqlens=np.diff(cu), tail=T - cu[-1])
    return kernel_inputs(rng, B=B, T=T, H=H, K=K, V=V, gate_mode=cfg["gate_mode"],
                         dtype=dtype, g_dtype=gate_dtype, beta_dtype=gate_dtype,
                         l2norm=cfg["l2norm"], beta_sigmoid=cfg["sigmoid"],
                         v_first=cfg["v_first"], always_gate_params=True,
                         decay_spikes=TARGET_EXTREME_DECAYS if cfg.get("extreme_gate") else (),
                         **TARGET_DRAWS, **varlen)


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
    x = target_inputs(rng, cfg, B, T, H, K, V, dtype, gate_dtype)
    tol = _tolerance(dtype)
    msg = f"(KDA_TEST_SEED={SESSION_SEED})"

    o, final = ffi_fwd(x, cfg)
    assert o.dtype == x["v"].dtype and final.dtype == np.float32
    do = rng.standard_normal(o.shape).astype(x["v"].dtype)
    dfinal = rng.standard_normal(final.shape).astype(np.float32)
    o_ref, final_ref, ref = kernel_oracle(x, cfg, do, dfinal)
    assert np.all(np.isfinite(np.asarray(o, np.float64))), msg
    assert rel_err(o, o_ref) < tol, (rel_err(o, o_ref), msg)
    assert rel_err(final, final_ref) < 1e-4, msg

    grads = ffi_bwd(x, do, dfinal, cfg)
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


def test_empty_sequence_passes_state_through():
    cfg = config(2, True, True, cu=[0, 0, 4, 4])
    rng = np.random.default_rng(SESSION_SEED + 1)
    x = target_inputs(rng, cfg, 1, 4, 2, 16, 8)
    _, final = ffi_fwd(x, cfg)
    np.testing.assert_array_equal(np.asarray(final)[[0, 2]], x["h0"][[0, 2]])
    do = rng.standard_normal((1, 4, 2, 8)).astype(np.float32)
    dfinal = rng.standard_normal(final.shape).astype(np.float32)
    dh0 = np.asarray(ffi_bwd(x, do, dfinal, cfg)[7])
    np.testing.assert_array_equal(dh0[[0, 2]], dfinal[[0, 2]])


def _expect_error(fn, message):
    """The call fails with `message` after the call and target's name."""
    with pytest.raises(Exception) as info:
        jax.block_until_ready(fn())
    assert f": {message}" in str(info.value), str(info.value)


def test_invalid_operands_are_reported_by_name():
    cfg = config(1, True, True)
    rng = np.random.default_rng(SESSION_SEED + 2)
    x = target_inputs(rng, cfg, 1, 6, 2, 16, 8)
    _expect_error(lambda: ffi_fwd({**x, "A_log": x["A_log"].astype(np.float16)}, cfg), "jax_flashkda_fwd (cpu): A_log must have dtype float32")
    _expect_error(lambda: ffi_fwd({**x, "beta": x["beta"][..., :1]}, cfg),
                  "jax_flashkda_fwd (cpu): beta must have shape [1,6,2], got [1,6,1]")
    _expect_error(lambda: ffi_fwd({**x, "k": x["k"].astype(np.float16)}, cfg),
                  "jax_flashkda_fwd (cpu): k must have the dtype of q")
    _expect_error(lambda: ffi_fwd({**x, "h0": x["h0"][:, :, :8]}, cfg),
                  "jax_flashkda_fwd (cpu): initial_state must have shape [1,2,16,8], got [1,2,8,8]")
    _expect_error(lambda: ffi_fwd(x, dict(cfg, gate_mode=3)),
                  "jax_flashkda_fwd (cpu): gate_mode must be 0, 1 or 2, got 3")
    do = np.ones((1, 6, 2, 8), np.float16)
    _expect_error(lambda: ffi_bwd(x, do, np.zeros(x["h0"].shape, np.float32), cfg),
                  "jax_flashkda_bwd (cpu): do must have the dtype of v")
