"""The pure-JAX paths: the reference recurrence against an independent NumPy truth, the chunked
path against the suite's float64 oracle (tests/oracle.py, which is that reference in float64).

`numpy_truth` is the suite's one independent check of the reference: a float64 token loop
written here, forward and backward (the token-form gradients of docs/math.md §3, including the
preprocessing), so that autodiff of the recurrence every other test trusts is checked against
hand-derived gradients, not against itself. Errors are norm-wise: ‖x − ref‖ / ‖ref‖.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from inputs import random_inputs, rel_err
from oracle import oracle
from jax_flashkda.chunked import kda_chunked
from jax_flashkda.reference import kda_recurrent

GRAD_NAMES = ("q", "k", "v", "g", "beta", "A_log", "dt_bias", "initial_state")


# ----------------------------------------------------------------------------------------
# NumPy truth (float64).

def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def _softplus(x):
    return np.logaddexp(0.0, x)


@dataclasses.dataclass(frozen=True)
class Case:
    B: int
    T: int
    H: int
    K: int
    V: int
    gate: str = "plain"            # "plain" | "softplus" | "safe"
    l2norm: bool = False
    beta_sigmoid: bool = False
    v_first: bool = False
    init: bool = True
    chunk: int = 64
    cu: tuple | None = None
    huge_decay: bool = False       # some log-decays of -1000
    seed: int = 0

    @property
    def N(self):
        return self.B if self.cu is None else len(self.cu) - 1

    @property
    def lower_bound(self):
        return -5.0 if self.gate == "safe" else None


# The draws (tests/inputs.py) for a Case: moderate decays (e^g in [0.37, 0.99]; huge_decay
# sets 10% of single channels to -1000), A_log up to 0.5, a unit-scale state.
CASE_DRAWS = dict(log_decay="uniform", A_log_range=(-1.0, 0.5), state_scale=1.0)
GATE_MODE = {"plain": "log_decay", "softplus": "softplus", "safe": "safe"}


def case_inputs(c: Case):
    """The case's inputs (float64; A_log and dt_bias also for the plain gate, which ignores
    them) and the cotangents of o and the final state, from the generator seeded with c.seed."""
    rng = np.random.default_rng(c.seed)
    varlen = {} if c.cu is None else dict(seqlens=np.diff(c.cu), tail=c.T - c.cu[-1])
    x = random_inputs(rng, B=c.B, T=c.T, H=c.H, K=c.K, V=c.V, gate_mode=GATE_MODE[c.gate],
                      l2norm=c.l2norm, beta_sigmoid=c.beta_sigmoid, state_v_first=c.v_first,
                      always_gate_params=True,
                      decay_spikes=((-1000.0, 0.1),) if c.huge_decay else (),
                      **CASE_DRAWS, **varlen)
    x.pop("cu_seqlens", None)  # the case's own c.cu is what the paths get
    cot = dict(o=rng.standard_normal(x["v"].shape),
               s=rng.standard_normal(x["initial_state"].shape))
    return x, cot


def _spans(c: Case):
    """(row, start, end, sequence index) of every sequence."""
    if c.cu is None:
        return [(b, 0, c.T, b) for b in range(c.B)]
    return [(0, c.cu[n], c.cu[n + 1], n) for n in range(c.N)]


def numpy_truth(c: Case, x, cot, scale):
    """Forward and backward in float64. Returns o, final state (requested layout), grads.

    The one independent NumPy check of jax_flashkda.reference (the suite's oracle): used only
    by the tests of kda_recurrent here; every other test compares with tests/oracle.py."""
    q0, k0, v, graw, braw = x["q"], x["k"], x["v"], x["g"], x["beta"]
    a = np.exp(x["A_log"])[None, None, :, None]
    if c.l2norm:
        rq = 1 / np.sqrt(np.sum(q0 ** 2, -1, keepdims=True) + 1e-6)
        rk = 1 / np.sqrt(np.sum(k0 ** 2, -1, keepdims=True) + 1e-6)
        q, k = q0 * rq, k0 * rk
    else:
        q, k = q0, k0
    xg = graw + x["dt_bias"][None, None]
    if c.gate == "safe":
        sg = _sigmoid(a * xg)
        g = c.lower_bound * sg
    elif c.gate == "softplus":
        g = -a * _softplus(xg)
    else:
        g = graw
    beta = _sigmoid(braw) if c.beta_sigmoid else braw
    h0 = x["initial_state"]
    h0 = np.swapaxes(h0, -1, -2) if c.v_first else h0

    o = np.zeros_like(v)
    final = h0.copy()
    d = {n: np.zeros_like(x[n]) for n in ("q", "k", "v", "g", "beta")}
    dq, dk, dg, dbeta = (np.zeros_like(t) for t in (q, k, g, beta))
    dh0 = np.zeros_like(h0)
    do = cot["o"]
    ds_final = np.swapaxes(cot["s"], -1, -2) if c.v_first else cot["s"]
    for row, t0, t1, n in _spans(c):
        for h in range(c.H):
            s = h0[n, h].copy()
            hist = []
            for t in range(t0, t1):
                sp = np.exp(g[row, t, h])[:, None] * s
                u = v[row, t, h] - sp.T @ k[row, t, h]
                s = sp + beta[row, t, h] * np.outer(k[row, t, h], u)
                o[row, t, h] = scale * s.T @ q[row, t, h]
                hist.append((sp, u, s))
            final[n, h] = s
            ds = ds_final[n, h].copy()
            for t in reversed(range(t0, t1)):
                sp, u, s = hist[t - t0]
                kt, bt, dot = k[row, t, h], beta[row, t, h], do[row, t, h]
                ds += scale * np.outer(q[row, t, h], dot)
                dq[row, t, h] = scale * s @ dot
                d["v"][row, t, h] = bt * ds.T @ kt
                dbeta[row, t, h] = kt @ ds @ u
                dk[row, t, h] = bt * (ds @ u - sp @ (ds.T @ kt))
                dsp = ds - bt * np.outer(kt, kt @ ds)
                dg[row, t, h] = np.sum(sp * dsp, axis=1)
                ds = np.exp(g[row, t, h])[:, None] * dsp
            dh0[n, h] = ds

    if c.l2norm:
        d["q"] = rq * (dq - np.sum(q * dq, -1, keepdims=True) * q)
        d["k"] = rk * (dk - np.sum(k * dk, -1, keepdims=True) * k)
    else:
        d["q"], d["k"] = dq, dk
    d["beta"] = dbeta * beta * (1 - beta) if c.beta_sigmoid else dbeta
    if c.gate == "safe":
        dx = dg * c.lower_bound * sg * (1 - sg) * a
        d["A_log"] = np.sum(dx * xg, axis=(0, 1, 3))
    elif c.gate == "softplus":
        dx = -dg * a * _sigmoid(xg)
        d["A_log"] = np.sum(dg * g, axis=(0, 1, 3))
    else:
        dx = dg
        d["A_log"] = np.zeros_like(x["A_log"])
    d["g"] = dx
    d["dt_bias"] = np.sum(dx, axis=(0, 1)) if c.gate != "plain" else np.zeros_like(x["dt_bias"])
    d["initial_state"] = np.swapaxes(dh0, -1, -2) if c.v_first else dh0
    if c.v_first:
        final = np.swapaxes(final, -1, -2)
    return o, final, d


# ----------------------------------------------------------------------------------------
# Running the JAX paths.

def run_jax(impl, c: Case, x, cot, scale, dtype, jit_cu=False):
    """o, final state and the gradients of Σ o⊙do + Σ S_T⊙dS_T for every differentiable input."""
    cast = {n: jnp.asarray(x[n], dtype) for n in ("q", "k", "v", "g", "beta")}
    params = {n: jnp.asarray(x[n], jnp.float64 if dtype == jnp.float64 else jnp.float32)
              for n in ("A_log", "dt_bias", "initial_state")}
    kwargs = dict(scale=scale, use_qk_l2norm_in_kernel=c.l2norm,
                  use_gate_in_kernel=c.gate != "plain",
                  use_beta_sigmoid_in_kernel=c.beta_sigmoid, lower_bound=c.lower_bound,
                  state_v_first=c.v_first)
    if impl is kda_chunked:
        kwargs["chunk_size"] = c.chunk

    def f(args, cu):
        h0 = args["initial_state"] if c.init else None
        return impl(args["q"], args["k"], args["v"], args["g"], args["beta"],
                    initial_state=h0, A_log=args["A_log"], dt_bias=args["dt_bias"],
                    cu_seqlens=cu, **kwargs)

    @jax.jit
    def fwd_bwd(args, cu):
        (o, s), vjp = jax.vjp(lambda a: f(a, cu), args)
        (grads,) = vjp((jnp.asarray(cot["o"], o.dtype), jnp.asarray(cot["s"], s.dtype)))
        return o, s, grads

    cu = None if c.cu is None else jnp.asarray(c.cu, jnp.int32)
    if cu is not None and not jit_cu:
        # cu_seqlens as a compile-time constant rather than a traced argument.
        o, s, grads = jax.jit(lambda a: fwd_bwd.__wrapped__(a, np.asarray(c.cu)))(
            {**cast, **params})
    else:
        o, s, grads = fwd_bwd({**cast, **params}, cu)
    return np.asarray(o, np.float64), np.asarray(s, np.float64), grads


def case_oracle(c: Case, x, cot, scale):
    """The suite's float64 oracle for a Case: o, final state, gradients (zeros for the gate
    parameters when the gate is off), as numpy_truth returns them."""
    gate = c.gate != "plain"
    kw = dict(scale=scale, use_qk_l2norm_in_kernel=c.l2norm, use_gate_in_kernel=gate,
              use_beta_sigmoid_in_kernel=c.beta_sigmoid, lower_bound=c.lower_bound,
              state_v_first=c.v_first, initial_state=x["initial_state"],
              A_log=x["A_log"] if gate else None, dt_bias=x["dt_bias"] if gate else None,
              cu_seqlens=None if c.cu is None else np.asarray(c.cu, np.int32))
    o, s, d = oracle([x[n] for n in ("q", "k", "v", "g", "beta")], kw, (cot["o"], cot["s"]))
    d.setdefault("A_log", np.zeros_like(x["A_log"]))
    d.setdefault("dt_bias", np.zeros_like(x["dt_bias"]))
    return o, s, d


def check(c: Case, impl, dtype, tol_o, tol_grad, jit_cu=False):
    """impl against the truth: the independent NumPy loop for the reference recurrence, the
    suite's oracle for the chunked path."""
    x, cot = case_inputs(c)
    if not c.init:
        x["initial_state"] = np.zeros_like(x["initial_state"])
    scale = c.K ** -0.5
    truth = numpy_truth if impl is kda_recurrent else case_oracle
    o_ref, s_ref, d_ref = truth(c, x, cot, scale)
    o, s, grads = run_jax(impl, c, x, cot, scale, dtype, jit_cu)
    assert o.shape == o_ref.shape and s.shape == s_ref.shape
    errors = {"o": rel_err(o, o_ref), "final_state": rel_err(s, s_ref)}
    names = GRAD_NAMES if c.init else GRAD_NAMES[:-1]
    for n in names:
        g = np.asarray(grads[n], np.float64)
        assert np.all(np.isfinite(g)), f"non-finite d{n}"
        # The per-head parameters get exact zeros when the gate is off.
        errors["d" + n] = (np.abs(g).max() if not np.any(d_ref[n]) else rel_err(g, d_ref[n]))
    assert np.all(np.isfinite(o)) and np.all(np.isfinite(s))
    bad = {k: v for k, v in errors.items()
           if v > (tol_o if k in ("o", "final_state") else tol_grad)}
    assert not bad, f"{impl.__name__} {jnp.dtype(dtype).name} {c}: {bad}"


# ----------------------------------------------------------------------------------------
# Cases.

CASES = {
    "T1": Case(B=2, T=1, H=1, K=16, V=16, seed=1),
    "ragged_multi_chunk": Case(B=2, T=37, H=2, K=32, V=48, l2norm=True, beta_sigmoid=True,
                               chunk=16, seed=2),
    "softplus_vfirst_noinit": Case(B=1, T=70, H=2, K=32, V=48, gate="softplus", l2norm=True,
                                   beta_sigmoid=True, v_first=True, init=False, seed=3),
    "safe_gate_k64": Case(B=2, T=50, H=3, K=64, V=64, gate="safe", l2norm=True,
                          beta_sigmoid=True, chunk=32, seed=4),
    "varlen": Case(B=1, T=45, H=2, K=32, V=48, gate="safe", beta_sigmoid=True, chunk=16,
                   cu=(0, 10, 10, 11, 45), seed=5),
    "huge_decay": Case(B=1, T=40, H=2, K=32, V=48, chunk=32, huge_decay=True, seed=6),
}


@pytest.fixture(autouse=True)
def _x64():
    with jax.enable_x64(True):
        yield


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("impl", [kda_recurrent, kda_chunked], ids=["recurrent", "chunked"])
def test_f64_matches_numpy(name, impl):
    check(CASES[name], impl, jnp.float64, 1e-10, 1e-10)


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("impl", [kda_recurrent, kda_chunked], ids=["recurrent", "chunked"])
def test_f32_matches_numpy(name, impl):
    check(CASES[name], impl, jnp.float32, 1e-4, 1e-4)


@pytest.mark.parametrize("dtype", [jnp.float64, jnp.float32], ids=["f64", "f32"])
def test_varlen_traced_cu_seqlens(dtype):
    tol = 1e-10 if dtype == jnp.float64 else 1e-4
    check(dataclasses.replace(CASES["varlen"], seed=7, v_first=True), kda_chunked, dtype,
          tol, tol, jit_cu=True)


def test_chunk_sizes_agree():
    """Each chunk size against the truth, with the exact diagonal path forced by big decays."""
    for chunk in (16, 32, 64):
        check(Case(B=1, T=100, H=1, K=32, V=48, chunk=chunk, huge_decay=True, seed=10 + chunk),
              kda_chunked, jnp.float64, 1e-10, 1e-10)


def test_bf16_inputs():
    """bf16 q/k/v/g/beta, fp32 state: loose bound against the f64 truth of the same inputs."""
    c = Case(B=1, T=64, H=2, K=64, V=64, gate="safe", l2norm=True, beta_sigmoid=True, seed=8)
    x, cot = case_inputs(c)
    # The truth sees exactly the bf16-rounded inputs.
    for n in ("q", "k", "v", "g", "beta"):
        x[n] = np.asarray(jnp.asarray(x[n], jnp.bfloat16), np.float64)
    o_ref, s_ref, _ = case_oracle(c, x, cot, c.K ** -0.5)
    for impl in (kda_recurrent, kda_chunked):
        o, s, grads = run_jax(impl, c, x, cot, c.K ** -0.5, jnp.bfloat16)
        assert grads["q"].dtype == jnp.bfloat16
        errors = rel_err(o, o_ref), rel_err(s, s_ref)
        assert errors[0] < 1e-2 and errors[1] < 1e-3, errors
        assert all(np.all(np.isfinite(np.asarray(v, np.float32))) for v in grads.values())


def test_output_dtypes():
    c = Case(B=1, T=20, H=1, K=16, V=16, seed=9)
    x, _ = case_inputs(c)
    for dtype, state_dtype in ((jnp.bfloat16, jnp.float32), (jnp.float32, jnp.float32),
                               (jnp.float64, jnp.float64)):
        args = [jnp.asarray(x[n], dtype) for n in ("q", "k", "v", "g", "beta")]
        for impl in (kda_recurrent, kda_chunked):
            o, s = impl(*args)
            assert o.dtype == dtype and s.dtype == state_dtype
