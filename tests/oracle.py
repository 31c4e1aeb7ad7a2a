"""The float64 oracle of the test suite.

`oracle` is the package's token recurrence (`jax_flashkda.reference.kda_recurrent`, what
`kda(..., impl="recurrent")` runs) in float64 on the CPU; its gradients are autodiff of that
recurrence. `pool_oracle` follows docs/decode.md literally around it (read each sequence's
slot, run the recurrence, write the states back in order). Every test compares with these.

The recurrence itself is checked against an independent float64 NumPy loop with hand-derived
gradients in exactly one place: `test_pure_jax.numpy_truth` (test_reference_matches_numpy).
"""

from __future__ import annotations

import contextlib
import functools

import jax
import jax.numpy as jnp
import numpy as np

from jax_flashkda.reference import kda_recurrent, kda_recurrent_states

INPUTS = ("q", "k", "v", "g", "beta")
PARAMS = ("A_log", "dt_bias", "initial_state")
GRAD_NAMES = INPUTS + PARAMS
# kda keyword arguments that are not arrays of the recurrence.
_DROPPED = ("output_final_state", "impl", "state_indices", "num_accepted_tokens")


@contextlib.contextmanager
def _float64_on_cpu():
    """float64 and the CPU for the oracle, as a scoped override (nests inside the tests' own
    enable_x64 without changing the global setting on the way out)."""
    with jax.enable_x64(True), jax.default_device(jax.devices("cpu")[0]):
        yield


def _static(kwargs):
    return tuple(sorted((n, x) for n, x in kwargs.items()
                        if n not in PARAMS + ("cu_seqlens",) + _DROPPED and x is not None))


@functools.lru_cache(maxsize=None)
def _compiled(static, params, with_cu, with_grads, with_states):
    kw = dict(static)
    run = kda_recurrent_states if with_states else kda_recurrent

    def forward(x, cu):
        out = run(*(x[n] for n in INPUTS), **{n: x[n] for n in params},
                  cu_seqlens=cu if with_cu else None, **kw)
        return tuple(out)

    if not with_grads:
        return jax.jit(forward)

    @jax.jit
    def forward_backward(x, cu, do, dfinal):
        out, vjp = jax.vjp(lambda x: forward(x, cu)[:2], x)
        return out, vjp((do, dfinal))[0]

    return forward_backward


def _f64(a):
    return jnp.asarray(np.asarray(a, np.float64))


def oracle(args, kwargs, cotangents=None, states=False):
    """kda(*args, **kwargs) by the float64 recurrence, as float64 NumPy.

    args: q, k, v, g, beta; kwargs: kda's keywords (arrays as NumPy or JAX arrays of any
    float dtype, read exactly). Returns (o, final_state) in the caller's layout (the state
    after every token too, [B, T, H, K, V] or [.., V, K], with `states`); with cotangents
    (do, dfinal) also a dict of the gradients of every input given (q, k, v, g, beta, and
    A_log, dt_bias, initial_state where not None).
    """
    params = tuple(n for n in PARAMS if kwargs.get(n) is not None)
    cu = kwargs.get("cu_seqlens")
    with _float64_on_cpu():
        x = dict(zip(INPUTS, map(_f64, args)), **{n: _f64(kwargs[n]) for n in params})
        cu_arg = jnp.zeros((1,), jnp.int32) if cu is None else jnp.asarray(np.asarray(cu),
                                                                           jnp.int32)
        f = _compiled(_static(kwargs), params, cu is not None, cotangents is not None, states)
        if cotangents is None:
            return tuple(np.asarray(a, np.float64) for a in f(x, cu_arg))
        (o, final), grads = f(x, cu_arg, *map(_f64, cotangents))
        return (np.asarray(o, np.float64), np.asarray(final, np.float64),
                {n: np.asarray(g, np.float64) for n, g in grads.items()})


def pool_oracle(args, kw, state_indices, num_accepted_tokens=None):
    """o and the updated pool (caller's layout) of kda(*args, **kw, state_indices=...,
    num_accepted_tokens=...) by docs/decode.md: each sequence n reads its slot (idx[n], or
    idx[n, a_n - 1] with a_n clipped into [1, S]; a slot outside [0, P) makes it padding: o = 0,
    no write), runs the float64 recurrence from it, and writes the state after its last token
    (1-D) or after each token t < S (2-D) to the slots named, in order; other slots keep their
    values."""
    q = np.asarray(args[0])
    B, T = q.shape[:2]
    pool = np.asarray(kw["initial_state"], np.float64)
    P = pool.shape[0]
    if kw.get("cu_seqlens") is None:
        spans = [(n, 0, T) for n in range(B)]
    else:
        cu = [int(c) for c in kw["cu_seqlens"]]
        spans = [(0, s, e) for s, e in zip(cu[:-1], cu[1:])]
    idx = np.asarray(state_indices).astype(np.int64)
    o = np.zeros(np.shape(args[2]))
    new = pool.copy()
    writes = []
    one = {n: x for n, x in kw.items() if n not in ("initial_state", "cu_seqlens")}
    for n, (row, start, end) in enumerate(spans):
        if idx.ndim == 1:
            read = idx[n]
        else:
            a_n = 1 if num_accepted_tokens is None else int(num_accepted_tokens[n])
            read = idx[n, min(max(a_n, 1), idx.shape[1]) - 1]
        if not 0 <= read < P:
            continue                       # padding: o = 0, writes nothing
        if end == start:
            if idx.ndim == 1:
                writes.append((read, pool[read]))
            continue
        seq = tuple(np.asarray(a)[row:row + 1, start:end] for a in args)
        o_n, final, states = oracle(seq, dict(one, initial_state=pool[read:read + 1]),
                                    states=True)
        o[row, start:end] = o_n[0]
        if idx.ndim == 1:
            writes.append((read, final[0]))
        else:
            for t in range(min(end - start, idx.shape[1])):
                if 0 <= idx[n, t] < P:
                    writes.append((idx[n, t], states[0, t]))
    for slot, state in writes:
        new[slot] = state
    return o, new
