"""Token-parallel preprocessing shared by the pure-JAX paths (docs/math.md §1, docs/robustness.md).

Everything here is plain elementwise JAX so that autodiff produces the gradients of docs/math.md §3
(l2norm, beta sigmoid, gate activations) without hand-written rules. Arguments arrive already
validated by ops.py; only cheap internal invariants are asserted.

It is also where the rules of docs/robustness.md are applied, once for both pure paths:
traced offsets are made legal (§1), the log-decay is floored (§2), and tokens from the first
non-finite q/k/beta/log-decay of each (sequence, head) on, and values v[t, j] from the first
non-finite v[·, j] of each (sequence, head, value column) on, are replaced by zeros before the
recurrence sees them (§3), so the recurrences downstream only ever see finite values and need
no rule of their own.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

L2NORM_EPS = 1e-6
# docs/robustness.md §2; csrc/common/rules.h (kLogDecayFloor) holds the same value.
LOG_DECAY_FLOOR = -128.0


def compute_dtype(*arrays) -> jnp.dtype:
    """fp32, or fp64 when any input is fp64 (the f64 oracle tests); never narrower than fp32."""
    return jnp.result_type(jnp.float32, *(a.dtype for a in arrays if a is not None))


# ---------------------------------------------------------------------------------------
# shard_map: a lax.scan carry must have the varying mesh axes of what the body adds to it, so
# state built from constants (zeros) is cast to vary like the inputs. No-ops outside shard_map.

def varying_axes(*xs) -> frozenset:
    axes = frozenset()
    for x in xs:
        if x is None or not hasattr(x, "shape"):
            continue
        aval = jax.typeof(x)
        manual = getattr(aval, "manual_axis_type", None)  # jax >= 0.10
        axes |= frozenset(manual.varying if manual is not None else getattr(aval, "vma", ()))
    return axes


def make_varying(x, axes):
    missing = tuple(sorted(axes - varying_axes(x)))
    if not missing:
        return x
    pcast = getattr(jax.lax, "pcast", None)
    if pcast is not None:
        return pcast(x, missing, to="varying")
    return jax.lax.pvary(x, missing)


# ---------------------------------------------------------------------------------------
# Offsets (robustness §1).

def clip_offsets(cu_seqlens, T: int) -> jax.Array:
    """Offsets clipped into [0, T] as int32; works on traced offsets.

    Clipping happens in the input's own dtype, before the cast, so an int64 or uint32 offset
    beyond int32 range is clipped rather than wrapped; a NumPy array is clipped by NumPy,
    since jnp.asarray would already narrow int64 to int32 without x64.
    """
    if not isinstance(cu_seqlens, jax.Array):
        cu_seqlens = np.clip(np.asarray(cu_seqlens), 0, T)
    c = jnp.asarray(cu_seqlens)
    if jnp.issubdtype(c.dtype, jnp.unsignedinteger):
        c = jnp.minimum(c, T)
    else:
        c = jnp.clip(c, 0, T)
    return c.astype(jnp.int32)


def legal_offsets(cu_seqlens, T: int) -> jax.Array:
    """c'[i] = max(clip(c[0], 0, T), ..., clip(c[i], 0, T)) as int32; works on traced offsets."""
    return jax.lax.cummax(clip_offsets(cu_seqlens, T), axis=0)


def token_sequences(cu: jax.Array, T: int):
    """For legal offsets cu [N+1]: per token, its sequence (N outside every sequence) and the
    first token of that sequence (T outside, so that no bad token can reach it)."""
    N = cu.shape[0] - 1
    t = jnp.arange(T, dtype=jnp.int32)
    # Counting the ends at or before t skips empty sequences, whose start equals their end.
    seq = jnp.searchsorted(cu[1:], t, side="right").astype(jnp.int32)
    seq = jnp.where(t < cu[0], N, seq)
    inside = seq < N
    start = jnp.where(inside, cu[jnp.minimum(seq, N - 1)], T)
    return seq, start


# ---------------------------------------------------------------------------------------
# Activations.

def l2norm(x: jax.Array) -> jax.Array:
    """x / sqrt(sum(x²) + 1e-6) over the last axis, in at least fp32."""
    x = x.astype(compute_dtype(x))
    return x * jax.lax.rsqrt(jnp.sum(x * x, axis=-1, keepdims=True) + L2NORM_EPS)


def floor_log_decay(g: jax.Array) -> jax.Array:
    """A select, not a max: NaN stays NaN (quarantined), and a floored entry gets no gradient."""
    return jnp.where(g < LOG_DECAY_FLOOR, LOG_DECAY_FLOOR, g)


def gate_activation(g: jax.Array, A_log: jax.Array | None, dt_bias: jax.Array | None,
                    lower_bound: float | None, use_gate: bool) -> jax.Array:
    """Floored log-decay from the raw gate. g [B,T,H,K], A_log [H], dt_bias [H,K] (None = no
    bias).

    An infinite gate input is legal (softplus: +inf is a hard reset; safe gate: the bounds);
    its value is the activation's limit, computed per head, and its gradient is zero. Feeding
    the infinity through the formula instead would give the right value but a NaN gradient
    (0·inf in d/dA_log).
    """
    dtype = compute_dtype(g)
    g = g.astype(dtype)
    if not use_gate:
        return floor_log_decay(g)
    assert A_log is not None and A_log.shape == (g.shape[2],), "A_log must be [H]"
    assert dt_bias is None or dt_bias.shape == g.shape[2:], "dt_bias must be [H, K]"
    x = g if dt_bias is None else g + dt_bias.astype(dtype)
    a = jnp.exp(A_log.astype(dtype))[:, None]
    if lower_bound is not None:
        activate = lambda x: lower_bound * jax.nn.sigmoid(a * x)
    else:
        # softplus from jax.nn is the overflow-safe form; -a*softplus is unbounded below on
        # purpose (the floor then bounds it).
        activate = lambda x: -a * jax.nn.softplus(x)
    finite = jnp.isfinite(x)
    inf = jnp.full_like(a, jnp.inf)
    at_inf, at_minus_inf = jax.lax.stop_gradient((activate(inf), activate(-inf)))
    limit = jnp.where(x > 0, at_inf, jnp.where(x < 0, at_minus_inf, jnp.nan))
    return floor_log_decay(jnp.where(finite, activate(jnp.where(finite, x, 0)), limit))


# ---------------------------------------------------------------------------------------
# Everything the pure paths do before their recurrence.

def _non_finite_rows(q, k, g):
    """[B,T,H]: whether the row of q, k or g has a NaN or ±inf (g: NaN or +inf, its -inf
    being floored already). v is not here: it quarantines its own value column only.

    A product with a zero vector is 0 for a finite row and NaN otherwise (0·inf, 0·NaN), so one
    matrix-vector product per input finds them: on CPU it runs ~2x faster than the isfinite /
    all reductions it replaces.
    """
    zk = jnp.zeros((q.shape[-1],), q.dtype)
    return jnp.isnan(q @ zk + k @ zk + g @ zk)


def _drop_grad(x, drop):
    """x, but in the backward a select gives the entries under `drop` exactly zero gradient,
    whatever arrives there (NaN included)."""
    return jnp.where(drop, jax.lax.stop_gradient(x), x)


class Prepared(NamedTuple):
    q: jax.Array          # [B,T,H,K], compute dtype; zeros where quarantined or outside
    k: jax.Array
    v: jax.Array          # [B,T,H,V]; zeros where its column is quarantined or outside
    g: jax.Array          # floored log-decay
    beta: jax.Array       # [B,T,H]
    scale: float
    h0: jax.Array         # [N,H,K,V], varying like the inputs
    cu: jax.Array | None  # legal offsets (int32 [N+1]) or None
    dead: jax.Array       # [B,T,H,V] bool: value column j at or after its cj = min(t0, tj)
    final_dead: jax.Array  # [N,H,V] bool: the sequence's state column j is quarantined


def initial_states(initial_state, state_v_first, N, H, K, V, dtype):
    """The incoming states as [N, H, K, V] in the compute dtype (zeros when None)."""
    if initial_state is None:
        return jnp.zeros((N, H, K, V), dtype)
    h0 = jnp.asarray(initial_state, dtype)
    if state_v_first:
        h0 = jnp.swapaxes(h0, -1, -2)
    assert h0.shape == (N, H, K, V), (h0.shape, (N, H, K, V))
    return h0


def empty_result(v, initial_state, state_v_first, N, K, dtype):
    """B == 0 or T == 0: nothing to compute, every sequence is empty, so final = initial."""
    B, T, H, V = v.shape
    o = jnp.zeros((B, T, H, V), v.dtype)
    if initial_state is not None:
        return o, jnp.asarray(initial_state, dtype)
    return o, jnp.zeros((N, H, V, K) if state_v_first else (N, H, K, V), dtype)


def prepare(q, k, v, g, beta, *, scale, initial_state, state_v_first, cu_seqlens,
            use_qk_l2norm, use_gate, use_beta_sigmoid, A_log, dt_bias, lower_bound) -> Prepared:
    """Preprocessed inputs, the default scale K ** -0.5, the incoming states as [N, H, K, V]
    whatever the caller's layout, legal offsets, and the quarantine masks (robustness §3).

    Per (row, head) a token is bad when q, k or beta (after its sigmoid) has a non-finite
    entry, or the floored log-decay has a NaN or +inf; it and every later token of its sequence
    are dead (t >= t0): the whole head is cut there. Per (row, head, value column j), v[t, j]
    is dead from the sequence's first non-finite v[·, j] on (t >= tj), or where the head is
    dead: column j of the state evolves apart from the others, so only it is quarantined, from
    cj = min(t0, tj) on.

    Dead tokens, and tokens outside every sequence, are replaced by zeros, and so are dead
    values of v (selects, so a NaN cannot leak through a 0·NaN): the state is left untouched by
    a dead token, and a dead column runs on zeros, finite, apart from the others. The gradient
    of a dead token is cut by a select at the raw input, below the per-token preprocessing, so
    it is exactly zero whatever that preprocessing made of a NaN; v's by the zeroing select
    itself. The paths then overwrite the dead outputs and final-state columns with NaN
    (`quarantine`), whose selects drop the cotangents there.
    """
    B, T, H, K = q.shape
    V = v.shape[-1]
    dtype = compute_dtype(q, k, v, g, beta)
    N = B if cu_seqlens is None else cu_seqlens.shape[0] - 1
    axes = varying_axes(q, k, v, g, beta, initial_state, A_log, dt_bias, cu_seqlens)
    h0 = make_varying(initial_states(initial_state, state_v_first, N, H, K, V, dtype), axes)

    q, k, v, g, beta = (jnp.asarray(x, dtype) for x in (q, k, v, g, beta))
    g = gate_activation(g, A_log, dt_bias, lower_bound, use_gate)
    bad = (_non_finite_rows(q, k, g)
           # sigmoid(±inf) is finite: only a NaN logit is bad.
           | (jnp.isnan(beta) if use_beta_sigmoid else ~jnp.isfinite(beta)))
    bad_v = ~jnp.isfinite(v)

    t = jnp.arange(T, dtype=jnp.int32)
    tv = t[None, :, None, None]
    # The last bad token at or before t; t is dead when that token is in t's own sequence.
    last_bad = jax.lax.cummax(jnp.where(bad, t[None, :, None], -1), axis=1)
    if cu_seqlens is None:
        cu = None
        dead = last_bad >= 0
        zero = dead
        # One sequence per row: a column's first bad token by a reduction over T, cheaper
        # than a cumulative scan over [B,T,H,V].
        first_bad_v = jnp.min(jnp.where(bad_v, tv, T), axis=1, keepdims=True)
        dead_v = (tv >= first_bad_v) | dead[..., None]
        zero_v = dead_v
        final_dead = dead_v[:, -1]
    else:
        cu = legal_offsets(cu_seqlens, T)
        seq, start = token_sequences(cu, T)
        dead = last_bad >= start[None, :, None]
        outside = (seq >= N)[None, :, None]
        zero = dead | outside
        head_dead = jnp.broadcast_to(dead[..., None], bad_v.shape)

        def column_dead(bad_v, head_dead, start):
            last_bad_v = jax.lax.cummax(jnp.where(bad_v, tv, -1), axis=1)
            return (last_bad_v >= start[None, :, None, None]) | head_dead

        # The cumulative scan over [B,T,H,V] costs ~10% of the forward on CPU: it runs only
        # where a v is non-finite (both branches run where a vmap makes the cond a select).
        dead_v = jax.lax.cond(jnp.any(bad_v), column_dead, lambda b, d, s: d,
                              bad_v, head_dead, start)
        zero_v = dead_v | outside[..., None]
        last = jnp.clip(cu[1:] - 1, 0, T - 1)
        final_dead = dead_v[0, last] & (cu[1:] > cu[:-1])[:, None, None]

    z = zero[..., None]
    if use_qk_l2norm:
        # Normalising the raw rows and zeroing after saves a pass over q and k; the NaN that
        # the l2norm's backward makes of a bad row is dropped by _drop_grad's select.
        q, k = l2norm(_drop_grad(q, z)), l2norm(_drop_grad(k, z))
    if use_beta_sigmoid:
        beta = jax.nn.sigmoid(_drop_grad(beta, zero))
    q, k, g = (jnp.where(z, 0, x) for x in (q, k, g))
    v = jnp.where(zero_v, 0, v)
    beta = jnp.where(zero, 0, beta)
    scale = K ** -0.5 if scale is None else scale
    return Prepared(q, k, v, g, beta, scale, h0, cu, dead_v, final_dead)


def quarantine(o, final, p: Prepared):
    """NaN in each value column from its cj on, and in the quarantined columns of the final
    state: selects, so the cotangents there reach nothing. o [B,T,H,V]; final [N,H,K,V]."""
    o = jnp.where(p.dead, jnp.nan, o)
    final = jnp.where(p.final_dead[:, :, None, :], jnp.nan, final)
    return o, final
