"""Flax (nnx) Kimi Delta Attention layer, built around :func:`jax_flashkda.kda`."""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from .decode import clip_slots
from .ops import kda

__all__ = ["KDACache", "KimiDeltaAttention", "place_params"]


class KDACache(NamedTuple):
    """Decoding state of one :class:`KimiDeltaAttention` layer, one row per sequence.

    ``state`` is the recurrent state ``[N, H, K, V]`` (float32); ``conv_q``, ``conv_k`` and
    ``conv_v`` hold the last ``conv_size - 1`` inputs ``[N, conv_size - 1, H * D]`` of each short
    convolution. ``N`` is the batch size, or the number of sequences with ``cu_seqlens``.
    An all-zero cache is the same as no cache (an empty history).

    With ``state_indices`` (:meth:`KimiDeltaAttention.__call__`) the cache is a pool of ``P``
    slots instead, one row per slot. A layer call returns a cache of the same shapes and
    dtypes as the one it was given and its four arrays are distinct buffers, so a jitted step
    can donate it (``donate_argnums``) and XLA updates it in place.
    """

    state: jax.Array
    conv_q: jax.Array
    conv_k: jax.Array
    conv_v: jax.Array


def _short_conv(x, weight, past, cu_seqlens):
    """Causal depthwise conv1d followed by SiLU, continuing from ``past`` inputs.

    ``x`` is ``[B, T, C]``, ``weight`` ``[W, C]`` (``weight[-1]`` taps the current token),
    ``past`` ``[N, W - 1, C]`` or None (zeros). With ``cu_seqlens`` (``B == 1``) every sequence
    sees only its own tokens and its own row of ``past``. Returns the activations and the last
    ``W - 1`` inputs of every sequence, so that the next call continues seamlessly.
    """
    w = weight.shape[0]
    c = x.shape[-1]
    weight = weight.astype(x.dtype)
    if cu_seqlens is None:
        b, t, _ = x.shape
        if past is None:
            past = jnp.zeros((b, w - 1, c), x.dtype)
        ext = jnp.concatenate([past.astype(x.dtype), x], axis=1)
        y = sum(ext[:, i : i + t] * weight[i] for i in range(w))
        return jax.nn.silu(y), ext[:, t:]

    n = cu_seqlens.shape[0] - 1
    t = x.shape[1]
    cu_seqlens = cu_seqlens.astype(jnp.int32)
    if past is None:
        past = jnp.zeros((n, w - 1, c), x.dtype)
    # One flat buffer holding every sequence's history followed by the packed tokens; relative
    # position p of sequence s lives at its token (p >= 0) or at its history row (p < 0).
    buf = jnp.concatenate([past.astype(x.dtype).reshape(n * (w - 1), c), x[0]], axis=0)

    def index(s, p):
        return jnp.where(p >= 0, n * (w - 1) + cu_seqlens[s] + p, s * (w - 1) + (w - 1) + p)

    tok = jnp.arange(t)
    seq = jnp.searchsorted(cu_seqlens, tok, side="right") - 1
    pos = tok - cu_seqlens[seq]
    y = sum(buf[index(seq, pos - (w - 1) + i)] * weight[i] for i in range(w))
    seqs = jnp.arange(n)[:, None]
    lens = (cu_seqlens[1:] - cu_seqlens[:-1])[:, None]
    new_past = buf[index(seqs, lens - (w - 1) + jnp.arange(w - 1)[None, :])]
    return jax.nn.silu(y)[None], new_past


def _read_rows(pool, slots):
    """Rows ``slots`` (int32, from ``clip_slots``) of ``pool``; zeros for a slot outside it."""
    live = (slots >= 0) & (slots < pool.shape[0])
    rows = jnp.take(pool, jnp.clip(slots, 0, pool.shape[0] - 1), axis=0)
    return jnp.where(live.reshape(-1, *(1,) * (pool.ndim - 1)), rows, 0)


def _write_rows(pool, slots, rows):
    """``pool`` with ``rows[n]`` written to row ``slots[n]``; a slot outside the pool writes
    nothing (an index past the end is dropped by the scatter)."""
    live = (slots >= 0) & (slots < pool.shape[0])
    return pool.at[jnp.where(live, slots, pool.shape[0])].set(rows.astype(pool.dtype),
                                                               mode="drop")


def _partitioner(axis):
    """``split(init, spec)``: the initializer annotated with ``spec`` when sharding over the
    ``axis`` is asked for, else the plain initializer."""

    def split(init, spec):
        return init if axis is None else nnx.with_partitioning(init, spec)

    return split


def place_params(model: nnx.Module, mesh: jax.sharding.Mesh) -> None:
    """Moves every variable of ``model`` to ``mesh`` with the partitioning its initializer was
    annotated with (replicated where none), in place. Use it for a model built with a head
    axis in ``shard_axes``; the optimizer state made from the placed parameters follows."""
    state = nnx.state(model)
    specs = nnx.get_partition_spec(state)
    nnx.update(model, jax.tree.map(
        lambda x, spec: jax.device_put(x, jax.sharding.NamedSharding(mesh, spec)), state, specs))


class KimiDeltaAttention(nnx.Module):
    """Kimi Delta Attention block (the token mixer of Kimi Linear).

    ``x -> q, k, v`` projections, each through a short causal depthwise convolution and SiLU;
    a low-rank gate projection turned into per-channel decays inside the op (safe gate with
    ``lower_bound``, ``A_log``, ``dt_bias``); beta logits per head; the KDA recurrence with
    L2-normalised q and k; a per-head RMSNorm gated by a sigmoid of a low-rank output gate;
    and an output projection back to ``hidden_size``. Key and value head size are both
    ``head_dim``.

    Args:
      hidden_size: model width.
      num_heads: number of KDA heads ``H``.
      head_dim: key and value size per head.
      conv_size: kernel width of the short convolutions.
      gate_low_rank_dim: rank of the decay-gate projection (Kimi uses ``head_dim``).
      lower_bound: lower bound of the per-channel log-decay, in ``[-5, 0)``; None selects the
        unbounded ``-exp(A_log) * softplus`` gate.
      norm_eps: epsilon of the gated output RMSNorm.
      dtype: computation dtype of projections, convolutions and the op's inputs.
      param_dtype: dtype of the weights (``A_log`` and ``dt_bias`` stay float32).
      impl: forwarded to :func:`jax_flashkda.kda`.
      shard_axes: ``(batch_axis, head_axis)`` mesh axis names (either may be None). Under a
        ``jax.set_mesh`` mesh, q/k/v/g/beta are constrained to that sharding, so a sharded jit
        runs the op on each device's batch and head shard with no gather. With a head axis the
        weights are annotated for tensor parallelism (Megatron style): the projections into
        heads split by output column, ``o_proj`` by input row, per-head parameters by head;
        place them with :func:`place_params`. The layer then needs no all-gather, forward or
        backward: only all-reduces (after ``o_proj``, and of its input's gradient).
      rngs: random streams for initialisation.

    Generation: prefill a prompt with ``y, cache = layer(prompt, cache=layer.init_cache(B))``
    (or ``return_cache=True``), then run one-token steps under ``jit`` with the cache donated,
    so that XLA writes the new cache into the old one's buffers instead of allocating and
    copying a second one::

        @functools.partial(nnx.jit, donate_argnums=1)
        def step(layer, cache, x_t):                 # x_t [B, 1, hidden_size]
            return layer(x_t, cache=cache)

        y_t, cache = step(layer, cache, x_t)         # the donated cache is gone: keep the new one

    Serving many sequences from one pool of slots (continuous batching): ``cache =
    layer.init_cache(P)`` and ``layer(x, cache=cache, state_indices=slots)``, ``slots`` int
    ``[B]`` (or ``[N]`` with ``cu_seqlens``), negative for padding rows; docs/decode.md.
    """

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        head_dim: int,
        *,
        conv_size: int = 4,
        gate_low_rank_dim: int | None = None,
        lower_bound: float | None = -5.0,
        norm_eps: float = 1e-5,
        dtype: Any = jnp.float32,
        param_dtype: Any = jnp.float32,
        impl: str = "auto",
        shard_axes: tuple[str | None, str | None] | None = None,
        rngs: nnx.Rngs,
    ):
        if conv_size < 1:
            raise ValueError(f"conv_size must be >= 1, got {conv_size}")
        self.hidden_size = hidden_size
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.conv_size = conv_size
        self.lower_bound = lower_bound
        self.norm_eps = norm_eps
        self.dtype = dtype
        self.impl = impl
        self.shard_axes = shard_axes
        rank = head_dim if gate_low_rank_dim is None else gate_low_rank_dim
        width = num_heads * head_dim

        head_axis = None if shard_axes is None else shard_axes[1]
        split = _partitioner(head_axis)
        linear = functools.partial(
            nnx.Linear, use_bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs
        )
        lecun = nnx.initializers.lecun_normal()
        into_heads = functools.partial(linear, kernel_init=split(lecun, (None, head_axis)))
        self.q_proj = into_heads(hidden_size, width)
        self.k_proj = into_heads(hidden_size, width)
        self.v_proj = into_heads(hidden_size, width)
        # A depthwise kernel has fan-in conv_size; PyTorch's Conv1d default bound 1/sqrt(fan_in).
        bound = conv_size**-0.5

        def conv_init(key, shape, dtype):
            return jax.random.uniform(key, shape, dtype, -bound, bound)

        conv_init = split(conv_init, (None, head_axis))
        self.q_conv = nnx.Param(conv_init(rngs.params(), (conv_size, width), param_dtype))
        self.k_conv = nnx.Param(conv_init(rngs.params(), (conv_size, width), param_dtype))
        self.v_conv = nnx.Param(conv_init(rngs.params(), (conv_size, width), param_dtype))

        self.f_down = linear(hidden_size, rank)
        self.f_up = into_heads(rank, width)
        self.b_proj = into_heads(hidden_size, num_heads)

        # Decay rates are consumed by the op in float32 and are sensitive to rounding, so they
        # stay float32 whatever param_dtype is.
        def a_log_init(key, shape, dtype):
            return jnp.log(jax.random.uniform(key, shape, dtype, 1.0, 16.0))

        # Mamba's dt init: softplus(dt_bias) log-uniform in [1e-3, 1e-1], so that at start some
        # channels forget fast and others remember over hundreds of tokens.
        def dt_bias_init(key, shape, dtype):
            dt = jnp.exp(jax.random.uniform(key, shape, dtype, jnp.log(1e-3), jnp.log(1e-1)))
            return dt + jnp.log(-jnp.expm1(-dt))

        a_log_init = split(a_log_init, (head_axis,))
        dt_bias_init = split(dt_bias_init, (head_axis,))
        self.A_log = nnx.Param(a_log_init(rngs.params(), (num_heads,), jnp.float32))
        self.dt_bias = nnx.Param(dt_bias_init(rngs.params(), (width,), jnp.float32))

        self.g_down = linear(hidden_size, head_dim)
        self.g_up = nnx.Linear(
            head_dim, width, use_bias=True, dtype=dtype, param_dtype=param_dtype,
            kernel_init=split(lecun, (None, head_axis)),
            bias_init=split(nnx.initializers.zeros_init(), (head_axis,)), rngs=rngs
        )
        self.o_norm_scale = nnx.Param(jnp.ones((head_dim,), param_dtype))
        self.o_proj = linear(width, hidden_size, kernel_init=split(lecun, (head_axis, None)))

    def init_cache(self, batch_size: int) -> KDACache:
        """An empty-history cache for ``batch_size`` sequences (equivalent to ``cache=None``),
        or a pool of ``batch_size`` empty slots for calls with ``state_indices``. Its arrays
        are distinct buffers, so it can be donated to a jitted step."""
        width = self.num_heads * self.head_dim
        conv = lambda: jnp.zeros((batch_size, self.conv_size - 1, width), self.dtype)
        state = jnp.zeros((batch_size, self.num_heads, self.head_dim, self.head_dim), jnp.float32)
        return KDACache(state, conv(), conv(), conv())

    def __call__(
        self,
        x: jax.Array,
        *,
        cache: KDACache | None = None,
        cu_seqlens: jax.Array | None = None,
        state_indices: jax.Array | None = None,
        return_cache: bool | None = None,
    ) -> tuple[jax.Array, KDACache | None]:
        """Mix tokens of ``x`` ``[B, T, hidden_size]``.

        ``cache`` continues earlier calls (prefill, then ``T = 1`` decoding steps give the same
        result as one call on the whole sequence). ``cu_seqlens`` ``[N + 1]`` packs N
        independent sequences into a ``B == 1`` batch; the cache then has N rows.
        ``state_indices`` (int ``[N]``) makes ``cache`` a pool of P slots (``init_cache(P)``):
        sequence n continues from slot ``state_indices[n]`` and writes its new state and
        convolution history back there; a negative index is a padding sequence (``y = 0``,
        nothing written), and slots nobody names keep their values (docs/decode.md). No two
        sequences of a call may name the same slot.
        ``return_cache`` (default: whether a cache was passed) asks for the updated cache; leave
        it off in training, where computing the final state is wasted work.

        Returns ``(y, new_cache)``: ``y`` ``[B, T, hidden_size]`` and the new cache or None.
        """
        if return_cache is None:
            return_cache = cache is not None
        b, t, _ = x.shape
        h, d = self.num_heads, self.head_dim
        past = (None, None, None) if cache is None else (cache.conv_q, cache.conv_k, cache.conv_v)
        if state_indices is not None:
            if cache is None or not return_cache:
                raise ValueError("KimiDeltaAttention: state_indices needs a cache (the pool, "
                                 "init_cache(P)) and return_cache")
            if jnp.ndim(state_indices) != 1:
                raise ValueError("KimiDeltaAttention: state_indices must be [N] (one slot per "
                                 f"sequence), got shape {jnp.shape(state_indices)}")
            slots = clip_slots(state_indices, cache.state.shape[0])
            past = tuple(_read_rows(c, slots) for c in past)

        q, conv_q = _short_conv(self.q_proj(x), self.q_conv[...], past[0], cu_seqlens)
        k, conv_k = _short_conv(self.k_proj(x), self.k_conv[...], past[1], cu_seqlens)
        v, conv_v = _short_conv(self.v_proj(x), self.v_conv[...], past[2], cu_seqlens)
        g = self.f_up(self.f_down(x))
        beta = self.b_proj(x)

        q, k, v, g = (self._shard(a.reshape(b, t, h, d)) for a in (q, k, v, g))
        o, state = kda(
            q, k, v, g,
            self._shard(beta),
            initial_state=None if cache is None else cache.state,
            output_final_state=return_cache,
            state_indices=state_indices,
            use_qk_l2norm_in_kernel=True,
            use_gate_in_kernel=True,
            use_beta_sigmoid_in_kernel=True,
            A_log=self.A_log[...],
            dt_bias=self.dt_bias[...],
            lower_bound=self.lower_bound,
            cu_seqlens=cu_seqlens,
            impl=self.impl,
        )

        gate = self.g_up(self.g_down(x)).reshape(b, t, h, d).astype(jnp.float32)
        o = o.astype(jnp.float32)
        o = o * jax.lax.rsqrt(jnp.mean(o * o, axis=-1, keepdims=True) + self.norm_eps)
        o = o * self.o_norm_scale[...].astype(jnp.float32) * jax.nn.sigmoid(gate)
        y = self.o_proj(o.astype(self.dtype).reshape(b, t, h * d))

        if state_indices is not None:
            conv_q, conv_k, conv_v = (_write_rows(c, slots, new) for c, new in
                                      zip((cache.conv_q, cache.conv_k, cache.conv_v),
                                          (conv_q, conv_k, conv_v)))
        new_cache = KDACache(state, conv_q, conv_k, conv_v) if return_cache else None
        return y, new_cache

    def _shard(self, x):
        """Pins [B, T, H, ...] activations to (batch axis, -, head axis) of the current mesh, so
        that under a sharded jit the projections split by heads and the op runs per shard."""
        if self.shard_axes is None:
            return x
        batch_axis, head_axis = self.shard_axes
        spec = jax.sharding.PartitionSpec(batch_axis, None, head_axis, *(None,) * (x.ndim - 3))
        return jax.lax.with_sharding_constraint(x, spec)
