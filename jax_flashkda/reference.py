"""The oracle: KDA as the token-by-token recurrence of design §1, one lax.scan over tokens.

Slow by construction (T dependent rank-1 updates) and meant to be obviously right: every other
path is tested against it, and it is tested against an independent NumPy loop in float64.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jax_flashkda.preprocess import prepare


def sequence_layout(cu_seqlens: jax.Array, num_tokens: int):
    """Per token of a varlen row: its sequence id (N for tokens past cu_seqlens[-1]) and whether
    it starts its sequence. Works on a traced cu_seqlens: only N is static."""
    cu_seqlens = jnp.asarray(cu_seqlens, jnp.int32)
    t = jnp.arange(num_tokens, dtype=jnp.int32)
    # Counting the ends at or before t skips empty sequences, whose start equals their end.
    seq = jnp.searchsorted(cu_seqlens[1:], t, side="right")
    n = cu_seqlens.shape[0] - 1
    start = t == cu_seqlens[jnp.minimum(seq, n - 1)]
    return seq, start & (seq < n)


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
        # Tokens past the last sequence (a traced cu_seqlens ending early) write nothing.
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
    if cu_seqlens is None:
        N = B
        seq = jnp.zeros((T,), jnp.int32)
        start = jnp.zeros((T,), bool)
    else:
        assert B == 1, "cu_seqlens needs B == 1"
        N = cu_seqlens.shape[0] - 1
        seq, start = sequence_layout(cu_seqlens, T)

    q, k, vc, g, beta, scale, h0 = prepare(
        q, k, v, g, beta, scale=scale, initial_state=initial_state, state_v_first=state_v_first,
        num_sequences=N, use_qk_l2norm=use_qk_l2norm_in_kernel, use_gate=use_gate_in_kernel,
        use_beta_sigmoid=use_beta_sigmoid_in_kernel, A_log=A_log, dt_bias=dt_bias,
        lower_bound=lower_bound)
    # Per row, the states it owns: its own [1,H,K,V] slot, or all N sequences when varlen.
    h0_rows = h0.reshape(B, N // B, H, K, V)

    per_head = jax.vmap(_scan_one, in_axes=(1, 1, 1, 1, 1, 1, None, None, None),
                        out_axes=(1, 1))
    per_row = jax.vmap(per_head, in_axes=(0, 0, 0, 0, 0, 0, None, None, None), out_axes=(0, 0))
    o, finals = per_row(q, k, vc, g, beta, h0_rows, seq, start, scale)
    final_state = finals.reshape(N, H, K, V)
    if state_v_first:
        final_state = jnp.swapaxes(final_state, -1, -2)
    return o.astype(v.dtype), final_state
