"""State pools and speculative decoding: the pure definition (docs/decode.md).

`kda(..., initial_state=pool, state_indices=idx, num_accepted_tokens=a)` is, by definition:

    1. read:    each sequence n reads its slot (idx[n], or idx[n, a_n - 1] for 2-D indices);
                a slot outside [0, P) makes n a padding sequence (state zeros, o = 0);
    2. run:     the ordinary recurrence from those states (every gate mode, flag, layout,
                cu_seqlens and docs/robustness.md rule, as without a pool);
    3. write:   the state after each sequence's last token (1-D), or after each of its tokens
                t < S (2-D), into the slots named for it; skipped slots and padding sequences
                write nothing, and every slot nobody writes keeps its value.

Written with gathers, selects and a scatter, so that autodiff gives the gradients of every
input, the pool included. Arguments arrive validated by ops.py (`_check`, `_check_pool`); the
compiled decode target, where one runs a call, computes this same function (ops._kda_pool).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jax_flashkda.chunked import kda_chunked
from jax_flashkda.preprocess import compute_dtype, legal_offsets, token_sequences
from jax_flashkda.reference import kda_recurrent, kda_recurrent_states

# Up to this many tokens per row the pure pool path runs the token recurrence (decode steps,
# draft tokens); above it, the chunked path (a prefill into pool slots).
DECODE_MAX_T = 16


def clip_slots(x, bound: int) -> jax.Array:
    """Integer indices clipped into [-1, bound] as int32, clipping in the input's own dtype
    (a wide or unsigned index cannot wrap around into range when narrowed). -1 and `bound`
    both mean "no slot"."""
    if not isinstance(x, jax.Array):
        x = np.asarray(x)
        x = np.minimum(x, bound) if np.issubdtype(x.dtype, np.unsignedinteger) else np.clip(
            x, -1, bound)
    x = jnp.asarray(x)
    if jnp.issubdtype(x.dtype, jnp.unsignedinteger):
        x = jnp.minimum(x, bound)
    else:
        x = jnp.clip(x, -1, bound)
    return x.astype(jnp.int32)


def read_slots(state_indices: jax.Array, num_accepted_tokens, num_slots: int) -> jax.Array:
    """Each sequence's read slot, int32 [N], in [-1, P]: idx[n] for 1-D indices; for 2-D
    idx[n, a_n - 1] with a_n = num_accepted_tokens[n] clipped into [1, S] (1 when None)."""
    idx = clip_slots(state_indices, num_slots)
    if idx.ndim == 1:
        return idx
    width = idx.shape[1]
    if num_accepted_tokens is None:
        return idx[:, 0]
    accepted = clip_slots(num_accepted_tokens, width)  # [-1, S]: -1 and 0 both clip to 1
    accepted = jnp.maximum(accepted, 1)
    return jnp.take_along_axis(idx, accepted[:, None] - 1, axis=1)[:, 0]


def _write_last(pool, slots, write, values):
    """pool with values[i] at slots[i] where write[i]; slots [M] int32, values [M, ...].

    Where several entries name one slot, the last of them (in the order given: sequence by
    sequence, token by token) wins, deterministically; so the scatter's indices are unique:
    entries that do not write get distinct indices past the end (dropped), and the scatter
    differentiates as a plain gather/select.
    """
    num_slots = pool.shape[0]
    order = jnp.arange(slots.shape[0], dtype=jnp.int32)
    target = jnp.where(write, slots, num_slots)
    last = jnp.full((num_slots,), -1, jnp.int32).at[target].max(order, mode="drop")
    wins = write & (last[jnp.clip(target, 0, num_slots - 1)] == order)
    target = jnp.where(wins, slots, num_slots + order)
    return pool.at[target].set(values.astype(pool.dtype), mode="drop", unique_indices=True)


def kda_pool(q, k, v, g, beta, *, pool, state_indices, num_accepted_tokens=None, scale=None,
             use_qk_l2norm_in_kernel=False, use_gate_in_kernel=False,
             use_beta_sigmoid_in_kernel=False, A_log=None, dt_bias=None, lower_bound=None,
             state_v_first=False, cu_seqlens=None, path="auto"):
    """KDA over a state pool, by the definition of docs/decode.md.

    pool [P, H, K, V] ([P, H, V, K] when state_v_first); state_indices int [N] or [N, S];
    num_accepted_tokens int [N] (2-D indices only). `path` runs step 2 for 1-D indices:
    "recurrent", "chunked", or "auto" (the recurrence up to DECODE_MAX_T tokens per row, else
    chunked); 2-D indices always run the recurrence that keeps every token's state.

    Returns (o [B, T, H, V] in v's dtype, the updated pool in fp32, fp64 for fp64 inputs).
    """
    B, T, H, K = q.shape
    N = B if cu_seqlens is None else cu_seqlens.shape[0] - 1
    P = pool.shape[0]
    dtype = compute_dtype(q, k, v, g, beta)
    pool = jnp.asarray(pool).astype(dtype)
    if B == 0 or T == 0:
        return jnp.zeros(v.shape, v.dtype), pool

    per_token = jnp.ndim(state_indices) == 2
    read = read_slots(state_indices, num_accepted_tokens, P)
    live = (read >= 0) & (read < P)                          # [N]; else a padding sequence
    h0 = jnp.take(pool, jnp.clip(read, 0, P - 1), axis=0)
    h0 = jnp.where(live[:, None, None, None], h0, 0)

    kwargs = dict(scale=scale, initial_state=h0, use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel,
                  use_gate_in_kernel=use_gate_in_kernel,
                  use_beta_sigmoid_in_kernel=use_beta_sigmoid_in_kernel, A_log=A_log,
                  dt_bias=dt_bias, lower_bound=lower_bound, state_v_first=state_v_first,
                  cu_seqlens=cu_seqlens)
    if per_token:
        o, final, states = kda_recurrent_states(q, k, v, g, beta, **kwargs)
    else:
        if path == "auto":
            path = "recurrent" if T <= DECODE_MAX_T else "chunked"
        run = kda_recurrent if path == "recurrent" else kda_chunked
        o, final = run(q, k, v, g, beta, **kwargs)

    # Which sequence owns each token (N: none), by the same legal offsets the paths use.
    if cu_seqlens is None:
        token_live = jnp.broadcast_to(live[:, None], (B, T))
    else:
        cu = legal_offsets(cu_seqlens, T)
        seq, _ = token_sequences(cu, T)
        inside = seq < N
        seq_c = jnp.minimum(seq, N - 1)
        token_live = (inside & live[seq_c])[None]
    o = jnp.where(token_live[..., None, None], o, 0)

    if not per_token:
        # The state after each live sequence's last token (its initial state when empty) goes
        # back to the slot it was read from.
        return o, _write_last(pool, read, live, final)

    idx = clip_slots(state_indices, P)
    width = idx.shape[1]
    if cu_seqlens is None:
        # Token t of row n writes idx[n, t] (ops checks S >= T).
        slots = idx[:, :T]
        write = token_live & (slots >= 0) & (slots < P)
        return o, _write_last(pool, slots.reshape(-1), write.reshape(-1),
                              states.reshape(B * T, *states.shape[2:]))
    t = jnp.arange(T, dtype=jnp.int32) - cu[seq_c]          # position in its sequence
    slots = idx[seq_c, jnp.clip(t, 0, width - 1)]
    write = token_live[0] & (t < width) & (slots >= 0) & (slots < P)
    return o, _write_last(pool, slots, write, states[0])
