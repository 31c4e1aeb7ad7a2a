"""Token-parallel preprocessing shared by the pure-JAX paths (design §1).

Everything here is plain elementwise JAX so that autodiff produces the gradients of design §1
(l2norm, beta sigmoid, gate activations) without hand-written rules. Arguments arrive already
validated by ops.py; only cheap internal invariants are asserted.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

L2NORM_EPS = 1e-6


def compute_dtype(*arrays) -> jnp.dtype:
    """fp32, or fp64 when any input is fp64 (the f64 oracle tests); never narrower than fp32."""
    return jnp.result_type(jnp.float32, *(a.dtype for a in arrays if a is not None))


def l2norm(x: jax.Array) -> jax.Array:
    """x / sqrt(sum(x²) + 1e-6) over the last axis, in at least fp32."""
    x = x.astype(compute_dtype(x))
    return x * jax.lax.rsqrt(jnp.sum(x * x, axis=-1, keepdims=True) + L2NORM_EPS)


def beta_activation(beta: jax.Array, use_sigmoid: bool) -> jax.Array:
    beta = beta.astype(compute_dtype(beta))
    return jax.nn.sigmoid(beta) if use_sigmoid else beta


def gate_activation(g: jax.Array, A_log: jax.Array | None, dt_bias: jax.Array | None,
                    lower_bound: float | None, use_gate: bool) -> jax.Array:
    """Log-decay from the raw gate. g [B,T,H,K], A_log [H], dt_bias [H,K] (None = no bias)."""
    dtype = compute_dtype(g)
    g = g.astype(dtype)
    if not use_gate:
        return g
    assert A_log is not None and A_log.shape == (g.shape[2],), "A_log must be [H]"
    assert dt_bias is None or dt_bias.shape == g.shape[2:], "dt_bias must be [H, K]"
    x = g if dt_bias is None else g + dt_bias.astype(dtype)
    a = jnp.exp(A_log.astype(dtype))[:, None]
    if lower_bound is not None:
        return lower_bound * jax.nn.sigmoid(a * x)
    # softplus from jax.nn is the overflow-safe form; -a*softplus is unbounded below on purpose.
    return -a * jax.nn.softplus(x)


def preprocess(q, k, g, beta, *, use_qk_l2norm: bool, use_gate: bool, use_beta_sigmoid: bool,
               A_log=None, dt_bias=None, lower_bound=None, dtype=None):
    """Returns (q, k, g, beta) in the compute dtype: normalised q/k, log-decay g, beta in [0,1]
    when sigmoid-activated. `dtype` overrides the compute dtype (fp32 unless an input is fp64)."""
    dtype = dtype or compute_dtype(q, k, g, beta)
    q, k, g, beta = (jnp.asarray(x, dtype) for x in (q, k, g, beta))
    if use_qk_l2norm:
        q, k = l2norm(q), l2norm(k)
    g = gate_activation(g, A_log, dt_bias, lower_bound, use_gate)
    beta = beta_activation(beta, use_beta_sigmoid)
    return q, k, g, beta


def prepare(q, k, v, g, beta, *, scale, initial_state, state_v_first, num_sequences,
            use_qk_l2norm, use_gate, use_beta_sigmoid, A_log, dt_bias, lower_bound):
    """Everything the pure paths do before their recurrence.

    Returns (q, k, v, g, beta, scale, h0): inputs preprocessed into the compute dtype,
    the default scale K ** -0.5 applied, and the incoming states as [N, H, K, V] (zeros when
    None), whatever the caller's layout.
    """
    _, _, h, kd = q.shape
    vd = v.shape[-1]
    dtype = compute_dtype(q, k, v, g, beta)
    q, k, g, beta = preprocess(
        q, k, g, beta, use_qk_l2norm=use_qk_l2norm, use_gate=use_gate,
        use_beta_sigmoid=use_beta_sigmoid, A_log=A_log, dt_bias=dt_bias,
        lower_bound=lower_bound, dtype=dtype)
    if initial_state is None:
        h0 = jnp.zeros((num_sequences, h, kd, vd), dtype)
    else:
        h0 = jnp.asarray(initial_state, dtype)
        if state_v_first:
            h0 = jnp.swapaxes(h0, -1, -2)
    assert h0.shape == (num_sequences, h, kd, vd), (h0.shape, (num_sequences, h, kd, vd))
    return q, k, jnp.asarray(v, dtype), g, beta, kd ** -0.5 if scale is None else scale, h0
