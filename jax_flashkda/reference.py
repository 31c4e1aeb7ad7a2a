"""The oracle: KDA as the token-by-token recurrence of docs/math.md §1, one lax.scan over tokens.

Slow by construction (T dependent rank-1 updates) and meant to be obviously right: every other
path is tested against it, and it is tested against an independent NumPy loop in float64.
"""

from __future__ import annotations

import functools

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


def _scan_one(q, k, v, g, beta, h0, seq, start, scale, with_states=False):
    """One (row, head): q,k,g [T,K], v [T,V], beta [T], h0 [N,K,V]; seq/start [T].

    Carries the state and a buffer of final states; each token writes its state into its
    sequence's slot, so the last writer is the sequence's last token and empty sequences keep h0.
    seq/start are shared by all heads and rows, which keeps the slot write a dynamic-update-slice
    (a batched index would make it a scatter, very slow under autodiff on CPU).
    With `with_states`, also returns the state after every token [T,K,V] (the carried state,
    unchanged, at tokens outside every sequence).
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
        return (s, finals), ((o_t, s) if with_states else o_t)

    (_, finals), ys = jax.lax.scan(step, (h0[0], h0), (q, k, v, g, beta, seq, start))
    if with_states:
        return ys[0], finals, ys[1]
    return ys, finals


def kda_recurrent(q, k, v, g, beta, *, scale=None, initial_state=None,
                  use_qk_l2norm_in_kernel=False, use_gate_in_kernel=False,
                  use_beta_sigmoid_in_kernel=False, A_log=None, dt_bias=None, lower_bound=None,
                  state_v_first=False, cu_seqlens=None):
    """KDA by the token recurrence. q,k,g [B,T,H,K], v [B,T,H,V], beta [B,T,H].

    Returns o [B,T,H,V] in v's dtype and the final state [N,H,K,V] ([N,H,V,K] when
    state_v_first) in fp32, or fp64 when the inputs are fp64. N = B, or len(cu_seqlens) - 1.
    """
    o, final_state, _ = _recurrent(
        q, k, v, g, beta, scale, initial_state, use_qk_l2norm_in_kernel, use_gate_in_kernel,
        use_beta_sigmoid_in_kernel, A_log, dt_bias, lower_bound, state_v_first, cu_seqlens,
        with_states=False)
    return o, final_state


def kda_recurrent_states(q, k, v, g, beta, *, scale=None, initial_state=None,
                         use_qk_l2norm_in_kernel=False, use_gate_in_kernel=False,
                         use_beta_sigmoid_in_kernel=False, A_log=None, dt_bias=None,
                         lower_bound=None, state_v_first=False, cu_seqlens=None):
    """`kda_recurrent`, plus the state after every token: (o, final_state, states).

    states is [B, T, H, K, V] ([B, T, H, V, K] when state_v_first), in the final state's
    dtype: states[b, t] is the state of token t's sequence right after token t (for varlen,
    t indexes the packed tokens of the B == 1 row). Quarantined value columns (robustness §3)
    are NaN from their cj on, as in o; at a token outside every sequence the entry is
    meaningless (no sequence owns it). Memory is T times a final state: meant for the short
    calls of speculative decoding (docs/decode.md), correct for any T.
    """
    return _recurrent(
        q, k, v, g, beta, scale, initial_state, use_qk_l2norm_in_kernel, use_gate_in_kernel,
        use_beta_sigmoid_in_kernel, A_log, dt_bias, lower_bound, state_v_first, cu_seqlens,
        with_states=True)


def _recurrent(q, k, v, g, beta, scale, initial_state, use_qk_l2norm, use_gate,
               use_beta_sigmoid, A_log, dt_bias, lower_bound, state_v_first, cu_seqlens,
               with_states):
    B, T, H, K = q.shape
    V = v.shape[-1]
    N = B if cu_seqlens is None else cu_seqlens.shape[0] - 1
    assert cu_seqlens is None or B == 1, "cu_seqlens needs B == 1"
    if B == 0 or T == 0:
        dtype = compute_dtype(q, k, v, g, beta)
        o, final_state = empty_result(v, initial_state, state_v_first, N, K, dtype)
        states = jnp.zeros((B, T, H) + ((V, K) if state_v_first else (K, V)), dtype)
        return o, final_state, (states if with_states else None)

    p = prepare(
        q, k, v, g, beta, scale=scale, initial_state=initial_state, state_v_first=state_v_first,
        cu_seqlens=cu_seqlens, use_qk_l2norm=use_qk_l2norm, use_gate=use_gate,
        use_beta_sigmoid=use_beta_sigmoid, A_log=A_log, dt_bias=dt_bias,
        lower_bound=lower_bound)
    if p.cu is None:
        seq = jnp.zeros((T,), jnp.int32)
        start = jnp.zeros((T,), bool)
    else:
        seq, start = sequence_layout(p.cu, T)
    # Per row, the states it owns: its own [1,H,K,V] slot, or all N sequences when varlen.
    h0_rows = p.h0.reshape(B, N // B, H, K, V)

    one = functools.partial(_scan_one, with_states=with_states)
    axes = (1, 1, 1) if with_states else (1, 1)
    per_head = jax.vmap(one, in_axes=(1, 1, 1, 1, 1, 1, None, None, None), out_axes=axes)
    per_row = jax.vmap(per_head, in_axes=(0, 0, 0, 0, 0, 0, None, None, None),
                       out_axes=(0,) * len(axes))
    outs = per_row(p.q, p.k, p.v, p.g, p.beta, h0_rows, seq, start, p.scale)
    o, finals = outs[:2]
    # NaN from each value column's quarantine on (robustness §3), before the layout swap.
    o, final_state = quarantine(o, finals.reshape(N, H, K, V), p)
    states = None
    if with_states:
        # [B, T, H, K, V]; column j of the state is NaN wherever o[..., j] is.
        states = jnp.where(p.dead[:, :, :, None, :], jnp.nan, outs[2])
    if state_v_first:
        final_state = jnp.swapaxes(final_state, -1, -2)
        states = None if states is None else jnp.swapaxes(states, -1, -2)
    return o.astype(v.dtype), final_state, states
