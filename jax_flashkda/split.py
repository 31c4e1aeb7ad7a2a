"""An exact split of long sequences into segments that run in parallel (docs/sequence_split.md).

Each (sequence, head) chain of the compiled targets is sequential over its chunks, so a few
long sequences leave most of a GPU idle. Here a long sequence is cut into segments of at most
`segment_tokens` tokens, each a sequence of its own for the compiled calls:

1. transitions: one forward over the segments, each from the state [0 | I] with the values
   [v | 0]: its final state is [Z | P], Z the segment's state from a zero start and P its
   linear action on an incoming state (the delta rule is affine in the state, column by
   column: S_out = P S_in + Z);
2. combine: a segmented associative scan of those affine maps gives every segment's true
   incoming state S_in;
3. outputs: the forward over the segments from S_in: o and the final states, exact.

Lowered for CUDA the three are one call (jax_flashkda_fwd_split: the preparation done once,
the combine on device), which also returns the segments' states that the backward starts from;
elsewhere they are composed here from the plain calls.

The backward runs the same way in reverse: one backward over the segments with a zero
final-state cotangent gives each segment's initial-state gradient from its own outputs (dZ);
with dS_in = Pᵀ dS_end + dZ a reverse scan gives every segment's true end cotangent, and a
second backward with those gives every gradient. Lowered for CUDA that is one call too
(jax_flashkda_bwd_split: one preparation for both passes, the reverse walk on device).

Non-finite input (docs/robustness.md §3) keeps its meaning: a column quarantined in one
segment reaches the next one as a NaN column of S_in, which the forward carries as it would
(the outputs of one value column depend on that state column alone). The backward, whose
gradients mix columns, is told where a column died before a segment began by a NaN written
into v (one column) or beta (every column) at the segment's first token, which the targets
quarantine exactly as the unsplit call would.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import os

import jax
import jax.numpy as jnp
import numpy as np

from jax_flashkda import _ffi

_log = logging.getLogger("jax_flashkda")

# JAX_FLASHKDA_SEGMENT_TOKENS: unset or "auto" lets the planner decide (the CUDA target on one
# GPU); a positive integer forces that segment length (for tests and tuning, on any compiled
# target); "0", no split.
# JAX_FLASHKDA_SPLIT_BACKWARD: with a forced length, "0" keeps the backward whole (default 1).
SEGMENT_TOKENS_ENV = "JAX_FLASHKDA_SEGMENT_TOKENS"
SPLIT_BACKWARD_ENV = "JAX_FLASHKDA_SPLIT_BACKWARD"
# The planner aims at this many warps per SM of the forward recurrence (one warp per 16 value
# columns of each chain) and never cuts segments shorter than MIN_SEGMENT_TOKENS.
WARPS_PER_SM = 6
MIN_SEGMENT_TOKENS = 4096
# Split the forward (the backward) only while the unsplit call keeps at most this many warps
# per SM busy over its longest sequence. Measured on an H100 (2026-12-07, fused mode, bf16,
# D = 128; benchmarks/results/split_h100.md), the CUDA split forward took 0.55x the unsplit
# time at B1 T65536 H8 (64 busy warps on 132 SMs), 0.39x at T131072 H4 (32) and 0.79x at
# T32768 H16 (128, 4096-token segments), all with a combine kernel slower than today's; a split
# backward paid only at H4 (run 5, its first pass the state-gradient chains alone: 8.32 against
# 15.77 ms forward and backward) and lost at H8 and above (7.82 against 7.61 at H8), where the
# parallel gradient kernel dominates. A plan that splits the backward rounds its segment length
# up to a power of two: at T131072 H4, 8192-token segments gave 7.80 ms, 4096 8.09 and the
# unrounded 5296 8.32 (fewer segments, none of them a ragged remainder).
FORWARD_MAX_BUSY_WARPS_PER_SM = 1.0
BACKWARD_MAX_BUSY_WARPS_PER_SM = 0.25
_HIGHEST = jax.lax.Precision.HIGHEST


@dataclasses.dataclass(frozen=True)
class SplitPlan:
    """segment_tokens: the longest segment; num_segments: the static segment count, an upper
    bound on what the sequences need (the rest are empty segments at the end); backward:
    whether the backward is split too (else the unsplit backward runs on the whole call)."""

    segment_tokens: int
    num_segments: int
    backward: bool = True


def _env_int(name: str, expected: str = "a non-negative integer") -> int | None:
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return None
    try:
        value = int(raw)
    except ValueError:
        value = -1
    if value < 0:
        raise ValueError(f"{name} must be {expected}, got {raw!r}")
    return value


def forced_segment_tokens() -> int | None:
    """The environment's choice: None (unset or "auto": let the planner decide), 0 ("0": never
    split) or a length."""
    raw = os.environ.get(SEGMENT_TOKENS_ENV, "").strip()
    if raw in ("", "auto"):
        return None
    return _env_int(SEGMENT_TOKENS_ENV, "'auto' or a non-negative integer") or 0


def plan_split(*, batch: int, tokens: int, heads: int, value_dim: int, num_sequences: int,
               longest: int | None, sms: int, automatic: bool) -> SplitPlan | None:
    """Whether to split a call of `batch` rows of `tokens` tokens (packed into
    `num_sequences` sequences, the longest `longest` tokens long; None: not known at trace
    time, traced cu_seqlens), and how.

    The environment decides whether to split at all (SEGMENT_TOKENS_ENV): a forced length wins;
    with "auto" (and only where `automatic`: one GPU that runs the call whole) the call is split
    when the unsplit one would keep few warps busy over its longest sequence
    (FORWARD_MAX_BUSY_WARPS_PER_SM; the backward by its own bound) and that sequence makes at
    least two segments; the segment length spreads the whole call's tokens over about
    WARPS_PER_SM warps per SM. The many-heads cases fill the GPU already and are left alone.
    Without the lengths the planner does not split: a packed batch of short sequences would pay
    for the split and gain nothing.
    """
    total = batch * tokens
    forced = forced_segment_tokens()
    if longest is None:
        if forced is None:
            return None
        longest = tokens
    if forced == 0 or total == 0 or longest == 0:
        return None
    if forced is not None:
        split_backward = _env_int(SPLIT_BACKWARD_ENV, "0 or 1")
        if split_backward not in (None, 0, 1):
            raise ValueError(f"{SPLIT_BACKWARD_ENV} must be 0 or 1, got {split_backward}")
        length, backward = forced, split_backward != 0
    else:
        if not automatic:
            return None
        warps_per_token = heads * max(value_dim // 16, 1)
        busy = warps_per_token * total / longest / max(sms, 1)
        length = math.ceil(total * warps_per_token / (WARPS_PER_SM * max(sms, 1)))
        length = max(MIN_SEGMENT_TOKENS, -(-length // 16) * 16)
        if busy > FORWARD_MAX_BUSY_WARPS_PER_SM or longest < 2 * length:
            return None
        backward = busy <= BACKWARD_MAX_BUSY_WARPS_PER_SM
        if backward:  # at most doubled: such a plan's longest sequence is 24 or more lengths
            length = 1 << (length - 1).bit_length()
    if longest <= length:
        return None
    return SplitPlan(segment_tokens=length,
                     num_segments=_ffi.split_segments(num_sequences, total, length),
                     backward=backward)


@dataclasses.dataclass(frozen=True)
class _Segments:
    """Where the segments are: offsets (int32 [S + 1]), and per segment its sequence, whether
    it is its sequence's first or last; per sequence its first and last segment."""

    cu: jax.Array
    sequence: jax.Array
    is_first: jax.Array
    is_last: jax.Array
    first: jax.Array
    last: jax.Array


def _segments(cu: jax.Array, plan: SplitPlan) -> _Segments:
    """Cuts each sequence of the legal offsets `cu` into ceil(length / L) segments (one, empty,
    for an empty sequence); the unused segments are empty ones at the end. Works traced."""
    L, S = plan.segment_tokens, plan.num_segments
    n = cu.shape[0] - 1
    lengths = cu[1:] - cu[:-1]
    counts = jnp.maximum(1, (lengths + (L - 1)) // L)
    first = jnp.cumsum(counts) - counts
    used = first[-1] + counts[-1]
    j = jnp.arange(S, dtype=jnp.int32)
    sequence = jnp.clip(jnp.searchsorted(first, j, side="right").astype(jnp.int32) - 1, 0, n - 1)
    m = j - first[sequence]
    inside = j < used
    start = jnp.minimum(cu[sequence] + m * L, cu[sequence + 1])
    start = jnp.where(inside, start, cu[n])
    return _Segments(
        cu=jnp.concatenate([start, cu[n:]]).astype(jnp.int32),
        sequence=sequence,
        is_first=inside & (m == 0),
        is_last=inside & (m == counts[sequence] - 1),
        first=first.astype(jnp.int32),
        last=(first + counts - 1).astype(jnp.int32))


def _segmented_scan(A, b, reset, reverse=False):
    """x_j = A_j x_{j-1} + b_j, restarting at x_j = b_j where reset_j (x_{-1} = 0), for every
    j, as an associative scan: A [S, H, K, K], b [S, H, K, V], reset [S]. A restart selects
    rather than multiplies by zero, so a NaN before it cannot leak past it."""
    def compose(earlier, later):
        A1, b1, r1 = earlier
        A2, b2, r2 = later
        r = r2[:, None, None, None]
        return (jnp.where(r, A2, jnp.matmul(A2, A1, precision=_HIGHEST)),
                jnp.where(r, b2, jnp.matmul(A2, b1, precision=_HIGHEST) + b2),
                r1 | r2)

    _, x, _ = jax.lax.associative_scan(compose, (A, b, reset), reverse=reverse)
    return x


def _dead_columns(states):
    """[S, H, K, V] -> [S, H, V]: columns holding a non-finite value (quarantined ones)."""
    return ~jnp.all(jnp.isfinite(states), axis=-2)


def _flat(x):
    """[B, T, ...] -> [1, B * T, ...]."""
    return x.reshape((1, x.shape[0] * x.shape[1]) + x.shape[2:])


@functools.lru_cache(maxsize=None)
def split_vjp(cfg: _ffi.CallConfig, plan: SplitPlan, whole_backward):
    """The split call, with the compiled calls' signature:
    (q, k, v, g, beta, A_log, dt_bias, h0, cu) -> (o, final_state), differentiable.
    whole_backward(cfg, primals, cotangents): the unsplit backward, for plans that keep it."""
    inner = dataclasses.replace(cfg, state_v_first=False, is_varlen=True)
    fwd = _ffi.fwd_call(inner)
    bwd = _ffi.bwd_call(inner)

    fused = (_ffi.fwd_split_call(_ffi.SplitConfig(cfg, plan.segment_tokens))
             if _ffi.has_target("CUDA", _ffi.FWD_SPLIT_TARGET) else None)
    fused_bwd = (_ffi.bwd_split_call(inner) if _ffi.has_target("CUDA", _ffi.BWD_SPLIT_TARGET)
                 else None)

    def layout_in(h0):
        return jnp.swapaxes(h0, -1, -2) if cfg.state_v_first else h0

    def segments_of(q, cu):
        b, t = q.shape[:2]
        if not cfg.is_varlen:
            cu = jnp.arange(b + 1, dtype=jnp.int32) * t
        return _segments(cu, plan)

    def composed_forward(q, k, v, g, beta, A_log, dt_bias, h0, cu):
        """The split from the plain calls: o, the final states and the segments' states
        (incoming, transitions P, final)."""
        shape = v.shape
        seg = segments_of(q, cu)
        q, k, v, g, beta = map(_flat, (q, k, v, g, beta))
        h0 = layout_in(h0)
        _, _, h, kd = q.shape
        vd = v.shape[-1]
        S = plan.num_segments
        # 1. transitions: [Z | P] from [0 | I] with the values [v | 0].
        v_ext = jnp.concatenate([v, jnp.zeros(v.shape[:3] + (kd,), v.dtype)], axis=-1)
        start_ext = jnp.concatenate(
            [jnp.zeros((S, h, kd, vd), jnp.float32),
             jnp.broadcast_to(jnp.eye(kd, dtype=jnp.float32), (S, h, kd, kd))], axis=-1)
        _, ends = fwd(q, k, v_ext, g, beta, A_log, dt_bias, start_ext, seg.cu)
        Z, P = ends[..., :vd], ends[..., vd:]
        # 2. combine: the true state after each segment, then before it.
        h0_seg = h0[seg.sequence]
        b = jnp.where(seg.is_first[:, None, None, None],
                      jnp.matmul(P, h0_seg, precision=_HIGHEST) + Z, Z)
        after = _segmented_scan(P, b, seg.is_first)
        before = jnp.concatenate([h0_seg[:1], after[:-1]], axis=0)
        s_in = jnp.where(seg.is_first[:, None, None, None], h0_seg, before)
        # 3. outputs from the true incoming states.
        o, seg_final = fwd(q, k, v, g, beta, A_log, dt_bias, s_in, seg.cu)
        final = seg_final[seg.last]
        if cfg.state_v_first:
            final = jnp.swapaxes(final, -1, -2)
        return o.reshape(shape), final, s_in, P, seg_final

    def cuda_forward(q, k, v, g, beta, A_log, dt_bias, h0, cu):
        """The same from the CUDA split forward, one call (its unused segments' incoming
        states are 0 where the composed scan's carry the last state: both hold no tokens)."""
        o, final, s_in, transitions, seg_final = fused(q, k, v, g, beta, A_log, dt_bias, h0, cu)
        return o, final, s_in, transitions[..., v.shape[-1]:], seg_final

    def forward(*primals):
        return _ffi.per_platform(primals, cuda=cuda_forward if fused else composed_forward,
                                 other=composed_forward)

    def run_fwd(q, k, v, g, beta, A_log, dt_bias, h0, cu):
        o, final, s_in, P, seg_final = forward(q, k, v, g, beta, A_log, dt_bias, h0, cu)
        if not plan.backward:
            return (o, final), (q, k, v, g, beta, A_log, dt_bias, h0, cu)
        return (o, final), (q, k, v, g, beta, A_log, dt_bias, cu, s_in, P, seg_final)

    def run_bwd(residuals, cotangents):
        if not plan.backward:
            return tuple(whole_backward(cfg, residuals, cotangents)) + (None,)
        q, k, v, g, beta, A_log, dt_bias, cu, s_in, P, seg_final = residuals
        do, dht = cotangents
        shapes = [x.shape for x in (q, k, v, g, beta)]
        seg = segments_of(q, cu)
        q, k, v, g, beta, do = map(_flat, (q, k, v, g, beta, do))
        dht = layout_in(dht).astype(jnp.float32)
        # Columns that died before a segment began (not those of the caller's initial
        # state, which the unsplit call would take as they are): zeroed in S_in and marked
        # by a NaN at the segment's first token, in beta where every column died.
        dead = _dead_columns(s_in) & ~seg.is_first[:, None, None]
        all_dead = jnp.all(dead, axis=-1)
        s_in = jnp.where(dead[:, :, None, :], 0.0, s_in)
        # An empty segment shares its start with the next one (or lies past the tokens): its
        # write is dropped, so that no two writes meet at one token.
        t = q.shape[1]
        at = jnp.where(seg.cu[1:] > seg.cu[:-1], seg.cu[:-1], t)
        first_v, first_beta = v[0, jnp.minimum(at, t - 1)], beta[0, jnp.minimum(at, t - 1)]
        v = v.at[0, at].set(jnp.where(dead & ~all_dead[..., None], jnp.nan, first_v)
                            .astype(v.dtype), mode="drop")
        beta = beta.at[0, at].set(jnp.where(all_dead, jnp.nan, first_beta).astype(beta.dtype),
                                  mode="drop")
        # The end cotangents: the caller's at each sequence's last segment (less the columns
        # quarantined by then), the next segment's initial-state gradient elsewhere.
        dht_seg = jnp.where(_dead_columns(seg_final)[:, :, None, :], 0.0, dht[seg.sequence])
        dht_seg = jnp.where(seg.is_last[:, None, None, None], dht_seg, 0.0)
        args = (q, k, v, g, beta, A_log, dt_bias, s_in, seg.cu, do)
        Pt = jnp.swapaxes(jnp.where(jnp.isfinite(P), P, 0.0), -1, -2)

        def composed_backward(dht_seg, Pt):
            """The segments' initial-state gradients from their own outputs (no end
            cotangent: a whole backward's last result); a reverse scan for every segment's
            end cotangent; the backward from those."""
            dZ = bwd(*args, jnp.zeros_like(s_in))[-1]
            b = jnp.where(seg.is_last[:, None, None, None],
                          jnp.matmul(Pt, dht_seg, precision=_HIGHEST) + dZ, dZ)
            d_before = _segmented_scan(Pt, b, seg.is_last, reverse=True)
            d_end = jnp.where(seg.is_last[:, None, None, None], dht_seg,
                              jnp.concatenate([d_before[1:], d_before[-1:]], axis=0))
            return bwd(*args, d_end)

        def cuda_backward(dht_seg, Pt):
            """The same in one call (jax_flashkda_bwd_split), its first pass the
            state-gradient chains alone, the preparation shared by both passes."""
            return fused_bwd(*args, dht_seg[seg.last], Pt, seg.first, seg.last)

        dq, dk, dv, dg, dbeta, dA_log, ddt_bias, ds_in = _ffi.per_platform(
            (dht_seg, Pt), cuda=cuda_backward if fused_bwd else composed_backward,
            other=composed_backward)
        dh0 = ds_in[seg.first]
        if cfg.state_v_first:
            dh0 = jnp.swapaxes(dh0, -1, -2)
        grads = tuple(x.reshape(s) for x, s in zip((dq, dk, dv, dg, dbeta), shapes))
        return grads + (dA_log, ddt_bias, dh0, None)

    run = jax.custom_vjp(lambda *primals: forward(*primals)[:2])
    run.defvjp(run_fwd, run_bwd)
    return run


def describe(plan: SplitPlan | None, **sizes) -> None:
    """The planner's choice, in the debug log (logging.getLogger("jax_flashkda"))."""
    where = " ".join(f"{k}={v}" for k, v in sizes.items())
    if plan is None:
        _log.debug("kda: no sequence split (%s)", where)
    else:
        _log.debug("kda: sequence split into segments of %d tokens, %d segments, backward %s "
                   "(%s)", plan.segment_tokens, plan.num_segments,
                   "split" if plan.backward else "whole", where)
