"""The only Python that knows the compiled extension exists.

Loads `_kda_cpu` / `_kda_cuda`, registers their FFI targets, and builds the calls that
`ops.py` wires into `jax.custom_vjp`:

    custom_vmap            folds a vmapped axis into the head axis (one call, any depth)
      custom_partitioning  runs the call per shard of batch and heads (no all-gather)
        ffi_call           jax_flashkda_fwd / jax_flashkda_bwd (docs/ffi_contract.md)

vmap sits above partitioning because `custom_partitioning` has no batching rule.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import NamedSharding, PartitionSpec as P

FWD_TARGET = "jax_flashkda_fwd"
BWD_TARGET = "jax_flashkda_bwd"
DECODE_TARGET = "jax_flashkda_decode"  # CUDA only
FWD_SPLIT_TARGET = "jax_flashkda_fwd_split"  # CUDA only
BWD_SPLIT_TARGET = "jax_flashkda_bwd_split"  # CUDA only

# gate_mode attribute values of the contract.
GATE_LOG_DECAY, GATE_SOFTPLUS, GATE_SAFE = 0, 1, 2


@dataclasses.dataclass(frozen=True)
class CallConfig:
    """The static part of a call: the FFI attributes. Hashable, so calls are cached per config."""

    scale: float
    use_qk_l2norm: bool
    use_beta_sigmoid: bool
    gate_mode: int
    lower_bound: float
    state_v_first: bool
    is_varlen: bool

    def attributes(self):
        return dict(
            scale=np.float32(self.scale),
            use_qk_l2norm=self.use_qk_l2norm,
            use_beta_sigmoid=self.use_beta_sigmoid,
            gate_mode=np.int32(self.gate_mode),
            lower_bound=np.float32(self.lower_bound),
            state_v_first=self.state_v_first,
            is_varlen=self.is_varlen,
        )


@dataclasses.dataclass(frozen=True)
class DecodeConfig:
    """The static part of a decode call (docs/decode.md): the forward's attributes, and how the
    state rows are found: `index_rank` 0 (sequence n owns row n of the state), 1 (state_indices
    [N] into a pool) or 2 (state_indices [N, S], a slot per token); `num_accepted` (with rank 2:
    num_accepted_tokens [N] picks the slot read)."""

    call: CallConfig
    index_rank: int = 0
    num_accepted: bool = False

    def attributes(self):
        return dict(self.call.attributes(), use_state_indices=self.index_rank > 0,
                    use_num_accepted=self.num_accepted)


@dataclasses.dataclass(frozen=True)
class SplitConfig:
    """The static part of a split forward call (docs/sequence_split.md): the forward's
    attributes and the longest segment in tokens."""

    call: CallConfig
    segment_tokens: int

    def attributes(self):
        return dict(self.call.attributes(), segment_tokens=np.int32(self.segment_tokens))


# ---------------------------------------------------------------------------------------
# Loading and registration.

_MODULE_PLATFORMS = (("_kda_cpu", "cpu"), ("_kda_cuda", "CUDA"))


@functools.lru_cache(maxsize=None)
def _registered() -> dict[str, frozenset[str]]:
    """Registers every target the installed extension modules offer; platform -> targets."""
    found: dict[str, frozenset[str]] = {}
    for module_name, platform in _MODULE_PLATFORMS:
        try:
            module = importlib.import_module(f"jax_flashkda.{module_name}")
        except ImportError:
            continue
        targets = module.registrations()
        for name, capsule in targets.items():
            jax.ffi.register_ffi_target(name, capsule, platform=platform)
        found[platform] = frozenset(targets)
    return found


# At import, so that a module exported with these targets (jax.export) runs in a process that
# has only imported jax_flashkda. A missing extension is not an error here (see load_error).
_registered()


def load_error(platform: str) -> str | None:
    """None when the extension module for `platform` ("cpu" or "CUDA") is loaded, else why not."""
    if platform in _registered():
        return None
    module_name = dict((p, m) for m, p in _MODULE_PLATFORMS)[platform]
    try:
        importlib.import_module(f"jax_flashkda.{module_name}")
    except ImportError as e:
        return f"the extension module jax_flashkda.{module_name} did not load ({e})"
    return f"jax_flashkda.{module_name} loaded but registered nothing"


def has_target(platform: str, target: str) -> bool:
    return target in _registered().get(platform, frozenset())


def cuda_refusal(*, backward: bool, B: int, T: int, H: int, K: int, V: int, N: int,
                 is_varlen: bool, f16: bool, memory_bytes: int,
                 segment_tokens: int = 0) -> str | None:
    """What the CUDA target would refuse for a call of these sizes (the extension's own checks,
    and a workspace above `memory_bytes` when that is > 0); None when it fits. With
    segment_tokens > 0, a forward is the split forward, a backward the split backward (given
    its segments' sizes: B = 1, T the call's tokens, N the segments)."""
    module = importlib.import_module("jax_flashkda._kda_cuda")
    return module.cuda_refusal(backward, B, T, H, K, V, N, is_varlen, f16, memory_bytes,
                               segment_tokens)


# ---------------------------------------------------------------------------------------
# Which call runs where.

def per_platform(args, *, cuda, other, finish=lambda outs: outs):
    """finish(cuda(*args)) where the computation is lowered for CUDA, finish(other(*args))
    elsewhere. Chosen by the platform the computation is lowered for
    (jax.lax.platform_dependent: the other branches are dropped at lowering), not by the
    process's default backend: a computation placed on the CPU of a GPU process, or exported
    for both platforms, gets the CPU's code. `finish` gives both branches' results the same
    types (inside shard_map, the mesh axes they vary over), as the branches must have. Traced
    once where the two are the same function."""
    def branch(f):
        return lambda *a: finish(f(*a))

    if cuda is other:
        return branch(other)(*args)
    return jax.lax.platform_dependent(*args, cuda=branch(cuda), default=branch(other))


# ---------------------------------------------------------------------------------------
# The raw calls (one device's shard).

def _state_struct(cfg: CallConfig, n: int, h: int, kd: int, vd: int):
    shape = (n, h, vd, kd) if cfg.state_v_first else (n, h, kd, vd)
    return jax.ShapeDtypeStruct(shape, jnp.float32)


def _num_sequences(cfg: CallConfig, q, cu_seqlens) -> int:
    return cu_seqlens.shape[0] - 1 if cfg.is_varlen else q.shape[0]


def _fwd_raw(cfg: CallConfig, q, k, v, g, beta, A_log, dt_bias, h0, cu_seqlens):
    b, t, h, kd = q.shape
    vd = v.shape[-1]
    results = (jax.ShapeDtypeStruct((b, t, h, vd), v.dtype),
               _state_struct(cfg, _num_sequences(cfg, q, cu_seqlens), h, kd, vd))
    # Never batched here: the custom_vmap above folds mapped axes into the head axis.
    call = jax.ffi.ffi_call(FWD_TARGET, results, vmap_method="sequential")
    return call(q, k, v, g, beta, A_log, dt_bias, h0, cu_seqlens, **cfg.attributes())


def split_segments(num_sequences: int, tokens: int, segment_tokens: int) -> int:
    """How many segments the split forward cuts a call into (kda::split_segments): each
    sequence's ceil(length / L), at least one, then empty ones up to this bound."""
    return num_sequences + tokens // segment_tokens


def _fwd_split_raw(scfg: SplitConfig, q, k, v, g, beta, A_log, dt_bias, h0, cu_seqlens):
    """The forward's results, then the segments' states: each segment's incoming state
    [S,H,K,V], its transitions [Z | P] [S,H,K,V+K] and its final state [S,H,K,V] (fp32, keys
    first whatever the call's layout)."""
    b, t, h, kd = q.shape
    vd = v.shape[-1]
    n = _num_sequences(scfg.call, q, cu_seqlens)
    s = split_segments(n, b * t, scfg.segment_tokens)
    states = jax.ShapeDtypeStruct((s, h, kd, vd), jnp.float32)
    results = (jax.ShapeDtypeStruct((b, t, h, vd), v.dtype),
               _state_struct(scfg.call, n, h, kd, vd), states,
               jax.ShapeDtypeStruct((s, h, kd, vd + kd), jnp.float32), states)
    call = jax.ffi.ffi_call(FWD_SPLIT_TARGET, results, vmap_method="sequential")
    return call(q, k, v, g, beta, A_log, dt_bias, h0, cu_seqlens, **scfg.attributes())


def _gradient_structs(q, k, v, g, beta, state):
    """The backward's results: dq, dk, dv, dg, dbeta like their primals, dA_log [B,H] and
    ddt_bias [B,H,K] per batch row, and the initial-state gradient `state`."""
    b, _, h, kd = q.shape
    return tuple(jax.ShapeDtypeStruct(x.shape, x.dtype) for x in (q, k, v, g, beta)) + (
        jax.ShapeDtypeStruct((b, h), jnp.float32),
        jax.ShapeDtypeStruct((b, h, kd), jnp.float32),
        state)


def _bwd_raw(cfg: CallConfig, q, k, v, g, beta, A_log, dt_bias, h0, cu_seqlens, do, dht):
    _, _, h, kd = q.shape
    state = _state_struct(cfg, _num_sequences(cfg, q, cu_seqlens), h, kd, v.shape[-1])
    results = _gradient_structs(q, k, v, g, beta, state)
    call = jax.ffi.ffi_call(BWD_TARGET, results, vmap_method="sequential")
    return call(q, k, v, g, beta, A_log, dt_bias, h0, cu_seqlens, do, dht, **cfg.attributes())


def _bwd_split_raw(cfg: CallConfig, q, k, v, g, beta, A_log, dt_bias, s_in, seg_cu, do,
                   dht, transitions_t, first, last):
    """The sequence split's backward over the segments as packed sequences (CUDA only,
    docs/sequence_split.md): the backward's results, dh0 per segment. dht [N,H,K,V] is each
    sequence's end cotangent, transitions_t [S,H,K,K] the segments' P_jᵀ (finite), first /
    last [N] each sequence's first and last segment."""
    results = _gradient_structs(q, k, v, g, beta, jax.ShapeDtypeStruct(s_in.shape, jnp.float32))
    call = jax.ffi.ffi_call(BWD_SPLIT_TARGET, results, vmap_method="sequential")
    return call(q, k, v, g, beta, A_log, dt_bias, s_in, seg_cu, do, dht, transitions_t, first,
                last, **cfg.attributes())


def _decode_raw(dcfg: DecodeConfig, q, k, v, g, beta, A_log, dt_bias, state, cu_seqlens,
                state_indices, num_accepted):
    """(o, state'): the state (or pool) is read and written in place (result 1 aliases operand
    7); state_indices / num_accepted are int32 dummies of shape [1] where dcfg has none."""
    b, t, h, _ = q.shape
    results = (jax.ShapeDtypeStruct((b, t, h, v.shape[-1]), v.dtype),
               jax.ShapeDtypeStruct(state.shape, jnp.float32))
    call = jax.ffi.ffi_call(DECODE_TARGET, results, vmap_method="sequential",
                            input_output_aliases={7: 1})
    return call(q, k, v, g, beta, A_log, dt_bias, state, cu_seqlens, state_indices, num_accepted,
                **dcfg.attributes())


# ---------------------------------------------------------------------------------------
# Partitioning: batch and heads are independent, everything else stays whole on a device.

# Einsum-like factor names per operand; "n" is the sequence axis of the state, which is the
# batch axis unless the call is varlen (then B == 1 and sequences cannot be split).
def _operand_factors(cfg: CallConfig):
    n = "n" if cfg.is_varlen else "b"
    state = f"{n} h v k" if cfg.state_v_first else f"{n} h k v"
    inputs = ["b t h k", "b t h k", "b t h v", "b t h k", "b t h", "h", "h k", state, "c"]
    return inputs, state


def _fwd_rule(cfg: CallConfig) -> str:
    inputs, state = _operand_factors(cfg)
    return f"{', '.join(inputs)} -> b t h v, {state}"


def _fwd_split_rule(cfg: CallConfig) -> str:
    """The segments ("s") of a split forward are cut from every sequence: they stay whole."""
    return _fwd_rule(cfg) + ", s h k v, s h k w, s h k v"


def _bwd_rule(cfg: CallConfig) -> str:
    inputs, state = _operand_factors(cfg)
    inputs = inputs + ["b t h v", state]
    outputs = ["b t h k", "b t h k", "b t h v", "b t h k", "b t h", "b h", "b h k", state]
    return f"{', '.join(inputs)} -> {', '.join(outputs)}"


def _bwd_split_rule(cfg: CallConfig) -> str:
    """Segments ("n") and the sequences they are cut from ("m") stay whole: heads split."""
    inputs, state = _operand_factors(cfg)
    inputs = inputs + ["b t h v", "m h k v", "n h k l", "m", "m"]
    outputs = ["b t h k", "b t h k", "b t h v", "b t h k", "b t h", "b h", "b h k", state]
    return f"{', '.join(inputs)} -> {', '.join(outputs)}"


def _decode_rule(dcfg: DecodeConfig) -> str:
    """A pool is shared by every sequence, so with state_indices the batch stays whole (its
    sequences write into one pool) and only heads are split."""
    cfg = dcfg.call
    inputs, state = _operand_factors(cfg)
    if dcfg.index_rank:
        state = "p h v k" if cfg.state_v_first else "p h k v"
        indices = "i" if dcfg.index_rank == 1 else "i s"
    else:
        indices = "z"
    inputs = inputs[:7] + [state, "c", indices, "a" if dcfg.num_accepted else "y"]
    return f"{', '.join(inputs)} -> b t h v, {state}"


def _factor_axes(sharding, factors: str, wanted: dict[str, object]):
    """Records mesh axes of the batch/head factors found in one operand's sharding."""
    spec = tuple(sharding.spec) + (None,) * (len(factors.split()) - len(sharding.spec))
    for name, axes in zip(factors.split(), spec):
        if name in ("b", "h") and axes is not None and wanted.get(name) is None:
            wanted[name] = axes


def _spec(factors: str, axes: dict[str, object]) -> P:
    return P(*(axes.get(name) for name in factors.split()))


# JAX 0.12 partitions with Shardy alone (its jax_use_shardy_partitioner: "Shardy is now always
# enabled; this flag has no effect"), through `sharding_rule`; before it, that flag set to False
# still selects GSPMD, which asks infer_sharding_from_operands instead.
GSPMD_SELECTABLE = jax.__version_info__ < (0, 12)


def _partitioned(cfg, raw, rule: str, whole_batch: bool = False):
    """Wraps `raw` (called as raw(cfg, ...)) so that XLA runs it per shard of the batch and
    head axes (of the head axis alone with `whole_batch`)."""
    in_factors, out_factors = (side.split(", ") for side in rule.split(" -> "))

    def shardings(mesh, arg_shapes):
        axes: dict[str, object] = {}
        for shape, factors in zip(arg_shapes, in_factors):
            if isinstance(shape.sharding, NamedSharding):
                _factor_axes(shape.sharding, factors, axes)
        if whole_batch:
            axes.pop("b", None)
        arg_shardings = tuple(NamedSharding(mesh, _spec(f, axes)) for f in in_factors)
        out_shardings = tuple(NamedSharding(mesh, _spec(f, axes)) for f in out_factors)
        return arg_shardings, out_shardings

    def partition(mesh, arg_shapes, result_shape):
        arg_shardings, out_shardings = shardings(mesh, arg_shapes)
        return mesh, functools.partial(raw, cfg), out_shardings, arg_shardings

    def infer(mesh, arg_shapes, result_shape):
        return shardings(mesh, arg_shapes)[1]

    op = custom_partitioning(functools.partial(raw, cfg))
    # Tokens, key and value channels, varlen offsets, sequences of a packed batch and pool
    # slots are sequential, summed or shared inside one call: only batch and heads are split,
    # so a sharded sequence axis is gathered before the call.
    # In order of first appearance: Shardy wants the special factors sorted that way.
    factors = dict.fromkeys(rule.replace("->", ",").replace(",", " ").split())
    op.def_partition(
        partition=partition,
        infer_sharding_from_operands=infer if GSPMD_SELECTABLE else None,
        sharding_rule=rule,
        need_replication_factors=tuple(f for f in factors if f not in ("b", "h")),
    )
    return op


# ---------------------------------------------------------------------------------------
# Batching: a vmapped axis becomes more heads.

# Position of the head axis in each operand of the contract (None: has no head axis).
_FWD_HEAD_AXES = (2, 2, 2, 2, 2, 0, 0, 1, None)
_BWD_HEAD_AXES = _FWD_HEAD_AXES + (2, 1)
_DECODE_HEAD_AXES = _FWD_HEAD_AXES + (None, None)
_FWD_OUT_HEAD_AXES = (2, 1)
_FWD_SPLIT_OUT_HEAD_AXES = _FWD_OUT_HEAD_AXES + (1, 1, 1)
_BWD_OUT_HEAD_AXES = (2, 2, 2, 2, 2, 1, 1, 1)
_BWD_SPLIT_HEAD_AXES = _BWD_HEAD_AXES + (1, None, None)


def _fold(x, batched: bool, axis: int, size: int):
    """[m, ...H...] -> [...m*H...] with the mapped axis m as the slower index."""
    if not batched:
        x = jnp.broadcast_to(x, (size,) + x.shape)
    x = jnp.moveaxis(x, 0, axis)
    return x.reshape(x.shape[:axis] + (size * x.shape[axis + 1],) + x.shape[axis + 2:])


def _unfold(x, axis: int, size: int):
    x = x.reshape(x.shape[:axis] + (size, x.shape[axis] // size) + x.shape[axis + 1:])
    return jnp.moveaxis(x, axis, 0)


# Operands that say where sequences and their states are, shared by every head: a vmapped one
# cannot become more heads.
# 12 and 13 (the split backward's first and last segments) are derived from cu_seqlens.
_SHARED_OPERANDS = {8: "cu_seqlens", 9: "state_indices", 10: "num_accepted_tokens",
                    12: "cu_seqlens", 13: "cu_seqlens"}


def _head_folding(op, in_head_axes, out_head_axes):
    batched_op = jax.custom_batching.custom_vmap(op)

    @batched_op.def_vmap
    def rule(axis_size, in_batched, *args):
        for i, name in _SHARED_OPERANDS.items():
            if i < len(args) and in_head_axes[i] is None and in_batched[i]:
                raise ValueError(
                    f"kda: {name} cannot be vmapped (one call serves one packed batch and one "
                    "state pool); concatenate the sequences into one call instead")
        folded = [
            a if ax is None else _fold(a, b, ax, axis_size)
            for a, b, ax in zip(args, in_batched, in_head_axes)
        ]
        # Calling the folded op again (not `op`) lets nested vmaps fold one level at a time.
        outs = batched_op(*folded)
        outs = tuple(_unfold(o, ax, axis_size) for o, ax in zip(outs, out_head_axes))
        return outs, (True,) * len(outs)

    return batched_op


@functools.lru_cache(maxsize=None)
def fwd_call(cfg: CallConfig):
    """(q, k, v, g, beta, A_log, dt_bias, h0, cu_seqlens) -> (o, final_state)."""
    op = _partitioned(cfg, _fwd_raw, _fwd_rule(cfg), whole_batch=cfg.is_varlen)
    return _head_folding(op, _FWD_HEAD_AXES, _FWD_OUT_HEAD_AXES)


@functools.lru_cache(maxsize=None)
def fwd_split_call(scfg: SplitConfig):
    """The CUDA split forward (docs/sequence_split.md): fwd_call's operands ->
    (o, final_state, segment initial states, segment transitions, segment final states), as
    _fwd_split_raw says."""
    op = _partitioned(scfg, _fwd_split_raw, _fwd_split_rule(scfg.call),
                      whole_batch=scfg.call.is_varlen)
    return _head_folding(op, _FWD_HEAD_AXES, _FWD_SPLIT_OUT_HEAD_AXES)


@functools.lru_cache(maxsize=None)
def bwd_call(cfg: CallConfig):
    """(q, k, v, g, beta, A_log, dt_bias, h0, cu_seqlens, do, dht) ->
    (dq, dk, dv, dg, dbeta, dA_log[H], ddt_bias[H,K], dh0)."""
    op = _partitioned(cfg, _bwd_raw, _bwd_rule(cfg), whole_batch=cfg.is_varlen)
    folded = _head_folding(op, _BWD_HEAD_AXES, _BWD_OUT_HEAD_AXES)

    def call(*args):
        # The target writes dA_log and ddt_bias per batch row, so that a call split over the
        # batch axis needs no reduction inside; the gradients are their sums.
        dq, dk, dv, dg, dbeta, dA_log, ddt_bias, dh0 = folded(*args)
        return dq, dk, dv, dg, dbeta, dA_log.sum(0), ddt_bias.sum(0), dh0

    return call


@functools.lru_cache(maxsize=None)
def bwd_split_call(cfg: CallConfig):
    """(q, k, v, g, beta, A_log, dt_bias, s_in, seg_cu, do, dht, transitions_t, first, last)
    -> (dq, dk, dv, dg, dbeta, dA_log[H], ddt_bias[H,K], ds_in): the sequence split's backward
    in one call, as _bwd_split_raw says (CUDA only; cfg: varlen, keys first)."""
    op = _partitioned(cfg, _bwd_split_raw, _bwd_split_rule(cfg), whole_batch=True)
    folded = _head_folding(op, _BWD_SPLIT_HEAD_AXES, _BWD_OUT_HEAD_AXES)

    def call(*args):
        dq, dk, dv, dg, dbeta, dA_log, ddt_bias, ds_in = folded(*args)
        return dq, dk, dv, dg, dbeta, dA_log[0], ddt_bias[0], ds_in

    return call


@functools.lru_cache(maxsize=None)
def decode_call(dcfg: DecodeConfig):
    """(q, k, v, g, beta, A_log, dt_bias, state, cu_seqlens, state_indices, num_accepted) ->
    (o, state'), the state updated in place (CUDA only; docs/decode.md)."""
    op = _partitioned(dcfg, _decode_raw, _decode_rule(dcfg),
                      whole_batch=dcfg.call.is_varlen or dcfg.index_rank > 0)
    return _head_folding(op, _DECODE_HEAD_AXES, _FWD_OUT_HEAD_AXES)
