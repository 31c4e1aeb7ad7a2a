"""Exact sequence (context) parallelism: KDA over a token axis split across devices.

Call inside `shard_map`, with the token axis of q, k, v, g, beta split over `axis_name`
(device d holds tokens [d·T/D, (d+1)·T/D)). The math (docs/context_parallel.md): over one
segment the state map is affine, S_out = P·S_in + S⁰, with P the K×K product of the
segment's (I − β k kᵀ)·Diag(exp g) factors and S⁰ the segment's final state from zero. Each
device finds its (P, S⁰) with two local `kda` calls — P is the final state of the recurrence
run with v = 0 from the identity — the devices exchange these small matrices, each composes
the boundary state entering its segment, and a third local call produces the exact outputs.
Every step is a `kda` call or a collective, so gradients flow through `jax.grad` as usual.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jax_flashkda.ops import kda


def kda_sequence_sharded(q, k, v, g, beta, *, axis_name, initial_state=None,
                         output_final_state=False, state_v_first=False, **kda_kwargs):
    """`kda` on this device's block of a token axis split over `axis_name` (inside shard_map).

    Takes `kda`'s keyword arguments except `cu_seqlens`. `initial_state` (replicated over
    `axis_name`) enters the first segment; the final state returned (replicated) is the state
    after the last segment. Costs three local passes plus an all-gather of B·H·K·(K+V) floats
    per device.
    """
    if kda_kwargs.get("cu_seqlens") is not None:
        raise ValueError("kda_sequence_sharded: cu_seqlens is not supported; pack sequences "
                         "per device or shard the batch instead")
    b, _, h, kd = q.shape
    vd = v.shape[-1]
    if initial_state is not None and state_v_first:
        initial_state = jnp.swapaxes(initial_state, -1, -2)

    def local(values, state):
        return kda(q, k, values, g, beta, initial_state=state, output_final_state=True,
                   **kda_kwargs)

    identity = jnp.broadcast_to(jnp.eye(kd, dtype=jnp.float32), (b, h, kd, kd))
    _, transition = local(jnp.zeros(q.shape[:3] + (kd,), v.dtype), identity)
    _, from_zero = local(v, None)

    transitions = jax.lax.all_gather(transition, axis_name)  # [D, B, H, K, K]
    from_zeros = jax.lax.all_gather(from_zero, axis_name)    # [D, B, H, K, V]
    state = (jnp.zeros((b, h, kd, vd), jnp.float32) if initial_state is None
             else initial_state.astype(jnp.float32))
    entering = []
    for d in range(transitions.shape[0]):
        entering.append(state)
        state = jnp.einsum("bhij,bhjv->bhiv", transitions[d], state) + from_zeros[d]
    incoming = jnp.stack(entering)[jax.lax.axis_index(axis_name)]

    o, _ = local(v, incoming)
    if not output_final_state:
        return o, None
    return o, (jnp.swapaxes(state, -1, -2) if state_v_first else state)
