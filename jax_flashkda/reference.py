"""The oracle: KDA as the token-by-token recurrence of docs/math.md §1, one lax.scan over tokens.

Slow by construction (T dependent rank-1 updates) and meant to be obviously right: every other
path is tested against it, and it is tested against an independent NumPy loop in float64.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jax_flashkda.preprocess import (compute_dtype, empty_result, prepare, quarantine,
                                     token_sequences)


def sequence_layout(cu: jax.Array, num_tokens: int):
    """Per token of a varlen row, for legal offsets cu: its sequence id (N for tokens outside
    every sequence) and whether it starts its sequence. Works on a traced cu: only N is
    static."""
    seq, start = token_sequences(cu, num_tokens)
    return seq, start == jnp.arange(num_tokens, dtype=jnp.int32)


def _scan_one(q, k, v, g, beta, h0, seq, start, scale):
    """One (row, head): q,k,g [T,K], v [T,V], beta [T], h0 [N,K,V]; seq/start [T].

    Carries the state and a buffer of final states; each token writes its state into its
    sequence's slot, so the last writer is the sequence's last token and empty sequences keep h0.
    seq/start are shared by all heads and rows, which keeps the slot write a dynamic-update-slice
    (a batched index would make it a scatter, very slow under autodiff on CPU).
    """
    num_seqs = h0.shape[0]

    def step(carry, x):
        s, finals = carry
        q_t, k_t, v_t, g_t, b_t, n, first = x
        valid = n < num_seqs
        slot = jnp.minimum(n, num_seqs - 1)
        s = jnp.where(first, h0[slot], s)
        s = jnp.exp(g_t)[:, None] * s
        s = s + b_t * jnp.outer(k_t, v_t - k_t @ s)
        # Tokens outside every sequence (zeros, from prepare) write nothing and output 0.
        keep = jax.lax.dynamic_index_in_dim(finals, slot, keepdims=False)
        finals = jax.lax.dynamic_update_index_in_dim(finals, jnp.where(valid, s, keep), slot, 0)
        o_t = jnp.where(valid, scale * (q_t @ s), 0)
        return (s, finals), o_t

    (_, finals), o = jax.lax.scan(step, (h0[0], h0), (q, k, v, g, beta, seq, start))
    return o, finals


def kda_recurrent(q, k, v, g, beta, *, scale=None, initial_state=None,
                  use_qk_l2norm_in_kernel=False, use_gate_in_kernel=False,
                  use_beta_sigmoid_in_kernel=False, A_log=None, dt_bias=None, lower_bound=None,
                  state_v_first=False, cu_seqlens=None):
    """KDA by the token recurrence. q,k,g [B,T,H,K], v [B,T,H,V], beta [B,T,H].

    Returns o [B,T,H,V] in v's dtype and the final state [N,H,K,V] ([N,H,V,K] when
    state_v_first) in fp32, or fp64 when the inputs are fp64. N = B, or len(cu_seqlens) - 1.
    """
    B, T, H, K = q.shape
    V = v.shape[-1]
    N = B if cu_seqlens is None else cu_seqlens.shape[0] - 1
    assert cu_seqlens is None or B == 1, "cu_seqlens needs B == 1"
    if B == 0 or T == 0:
        return empty_result(v, initial_state, state_v_first, N, K,
                            compute_dtype(q, k, v, g, beta))

    p = prepare(
        q, k, v, g, beta, scale=scale, initial_state=initial_state, state_v_first=state_v_first,
        cu_seqlens=cu_seqlens, use_qk_l2norm=use_qk_l2norm_in_kernel,
        use_gate=use_gate_in_kernel, use_beta_sigmoid=use_beta_sigmoid_in_kernel, A_log=A_log,
        dt_bias=dt_bias, lower_bound=lower_bound)
    if p.cu is None:
        seq = jnp.zeros((T,), jnp.int32)
        start = jnp.zeros((T,), bool)
    else:
        seq, start = sequence_layout(p.cu, T)
    # Per row, the states it owns: its own [1,H,K,V] slot, or all N sequences when varlen.
    h0_rows = p.h0.reshape(B, N // B, H, K, V)

    per_head = jax.vmap(_scan_one, in_axes=(1, 1, 1, 1, 1, 1, None, None, None),
                        out_axes=(1, 1))
    per_row = jax.vmap(per_head, in_axes=(0, 0, 0, 0, 0, 0, None, None, None), out_axes=(0, 0))
    o, finals = per_row(p.q, p.k, p.v, p.g, p.beta, h0_rows, seq, start, p.scale)
    # NaN from each value column's quarantine on (robustness §3), before the layout swap.
    o, final_state = quarantine(o, finals.reshape(N, H, K, V), p)
    if state_v_first:
        final_state = jnp.swapaxes(final_state, -1, -2)
    return o.astype(v.dtype), final_state
