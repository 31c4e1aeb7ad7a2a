"""`kda`: argument checking, choice of implementation, and the custom_vjp around the FFI calls."""

from __future__ import annotations

import dataclasses
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np

from jax_flashkda import _ffi, decode, split
from jax_flashkda.chunked import kda_chunked
from jax_flashkda.preprocess import (clip_offsets, empty_result, legal_offsets, make_varying,
                                     varying_axes)
from jax_flashkda.reference import kda_recurrent

IMPLS = ("auto", "cuda", "ffi", "chunked", "recurrent")
_FLOAT_DTYPES = (jnp.bfloat16, jnp.float16, jnp.float32, jnp.float64)
# What the Hopper kernels take; anything else runs elsewhere (auto) or is refused (cuda).
CUDA_INPUT_DTYPES = (jnp.bfloat16, jnp.float16)
# Up to this many tokens per sequence the CUDA target runs the decode kernel (one token at a
# time, the state in registers) instead of the chunk kernels; for packed sequences, up to this
# many on average. Measured crossover: benchmarks/results/ (decode rows).
CUDA_DECODE_MAX_TOKENS = 16


def kda(q, k, v, g, beta, *, scale=None, initial_state=None, output_final_state=False,
        use_qk_l2norm_in_kernel=False, use_gate_in_kernel=False,
        use_beta_sigmoid_in_kernel=False, A_log=None, dt_bias=None, lower_bound=None,
        state_v_first=False, cu_seqlens=None, state_indices=None, num_accepted_tokens=None,
        impl="auto"):
    """Kimi Delta Attention.

    Args:
      q, k: [B, T, H, K] queries and keys. v: [B, T, H, V] values (q, k, v share a dtype).
      g: [B, T, H, K] per-key-channel log-decay (≤ 0), or the raw gate input when
        `use_gate_in_kernel`. beta: [B, T, H] write strengths, or logits when
        `use_beta_sigmoid_in_kernel`.
      scale: output scale, default K ** -0.5.
      initial_state: [N, H, K, V] ([N, H, V, K] when `state_v_first`) starting states; N is B,
        or the number of sequences with `cu_seqlens`. Zeros when None.
      output_final_state: also return the state after the last token of each sequence (fp32).
      use_qk_l2norm_in_kernel: l2-normalise q and k per head.
      use_gate_in_kernel: g is the raw gate; with x = g + dt_bias[h], the log-decay is
        `lower_bound * sigmoid(exp(A_log[h]) * x)` when `lower_bound` is given (in [-5, 0)),
        else `-exp(A_log[h]) * softplus(x)`. A_log: [H] (may be None with `lower_bound`,
        meaning exp(A_log) = 1, as in fla); dt_bias: [H, K] or [H * K], zeros when None.
      use_beta_sigmoid_in_kernel: beta <- sigmoid(beta).
      state_v_first: state layout [N, H, V, K].
      cu_seqlens: int [N + 1] offsets cutting the tokens of a B == 1 batch into N
        independent sequences (empty ones allowed).
      state_indices: int [N] or [N, S]: serving with a state pool (docs/decode.md).
        `initial_state` is then a pool [P, H, K, V] ([P, H, V, K]) of any P >= 1 and the second
        result is the updated pool (`output_final_state` must be True). Sequence n reads slot
        idx[n] (2-D: idx[n, a_n - 1]); a slot outside [0, P) makes it padding (o = 0, no
        write). 1-D: the state after its last token goes back to idx[n]; 2-D: the state after
        each token t < S goes to idx[n, t] (entries outside [0, P) skipped). Slots nobody
        writes keep their values. Without cu_seqlens, 2-D indices need S >= T.
      num_accepted_tokens: int [N], with 2-D state_indices only: a_n, clipped into [1, S]
        (1 when None), picks the read slot idx[n, a_n - 1] (speculative decoding).
      impl: "auto" (the CUDA kernels on a Hopper GPU where they support the call, else the
        fastest other path for the platform), "cuda", "ffi" (the compiled target of the
        platform: CUDA kernels or the C++ CPU target), "chunked" (pure JAX, any platform),
        "recurrent" (the token-by-token oracle).

    Returns:
      (o, final_state): o [B, T, H, V] in v's dtype; final_state fp32 (fp64 for fp64
      inputs) or None; with state_indices, the updated pool in its place.
    """
    pool = state_indices is not None
    args = _check(q, k, v, g, beta, scale, initial_state, use_gate_in_kernel, A_log, dt_bias,
                  lower_bound, state_v_first, cu_seqlens, impl, pool=pool)
    q, k, v, g, beta, scale, initial_state, A_log, dt_bias, cu_seqlens = args
    state_indices, num_accepted_tokens = _check_pool(
        state_indices, num_accepted_tokens, initial_state, output_final_state, q, cu_seqlens)
    if pool:
        return _kda_pool(q, k, v, g, beta, scale, initial_state, state_indices,
                         num_accepted_tokens, use_qk_l2norm_in_kernel, use_gate_in_kernel,
                         use_beta_sigmoid_in_kernel, A_log, dt_bias, lower_bound,
                         state_v_first, cu_seqlens, impl)
    if q.shape[0] == 0 or q.shape[1] == 0:
        return _kda_empty(q, v, initial_state, state_v_first, cu_seqlens, output_final_state)
    chosen = _choose_impl(impl, q, v, cu_seqlens)
    if chosen in ("chunked", "recurrent"):
        pure = kda_chunked if chosen == "chunked" else kda_recurrent
        o, final_state = pure(
            q, k, v, g, beta, scale=scale, initial_state=initial_state,
            use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel,
            use_gate_in_kernel=use_gate_in_kernel,
            use_beta_sigmoid_in_kernel=use_beta_sigmoid_in_kernel,
            A_log=A_log, dt_bias=dt_bias, lower_bound=lower_bound,
            state_v_first=state_v_first, cu_seqlens=cu_seqlens)
        final_state = final_state.astype(jnp.float32) if q.dtype != jnp.float64 else final_state
    else:
        o, final_state = _kda_compiled(
            q, k, v, g, beta, scale, initial_state, use_qk_l2norm_in_kernel,
            use_gate_in_kernel, use_beta_sigmoid_in_kernel, A_log, dt_bias, lower_bound,
            state_v_first, cu_seqlens, cuda_backward_fallback=impl == "auto")
    return o, (final_state if output_final_state else None)


def _kda_empty(q, v, initial_state, state_v_first, cu_seqlens, output_final_state):
    """B = 0 or T = 0: no token, so o is empty and every sequence keeps its initial state."""
    n = q.shape[0] if cu_seqlens is None else cu_seqlens.shape[0] - 1
    state_dtype = jnp.float64 if q.dtype == jnp.float64 else jnp.float32
    o, final_state = empty_result(v, initial_state, state_v_first, n, q.shape[-1], state_dtype)
    return o, (final_state if output_final_state else None)


def check_cu_seqlens(cu_seqlens, num_tokens: int):
    """Fails under `jax.experimental.checkify.checkify` when `cu_seqlens` does not start at 0,
    decrease somewhere or does not end at `num_tokens`; for traced offsets, which `kda` cannot
    check at trace time and makes legal instead (docs/robustness.md §1)."""
    from jax.experimental import checkify

    cu = jnp.asarray(cu_seqlens)
    checkify.check(cu[0] == 0, "cu_seqlens[0] must be 0, got {}", cu[0])
    checkify.check(cu[-1] == num_tokens, f"cu_seqlens[-1] must be T={num_tokens}, got {{}}",
                   cu[-1])
    steps = cu[1:] < cu[:-1]
    checkify.check(~jnp.any(steps), "cu_seqlens must be non-decreasing; it decreases after "
                   "entry {}", jnp.argmax(steps))


# ---------------------------------------------------------------------------------------
# Checking.

def _array(name, x):
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        raise TypeError(f"kda: {name} must be an array, got {type(x).__name__}")


def _shape_of(name, x, rank):
    _array(name, x)
    if x.ndim != rank:
        raise ValueError(f"kda: {name} must have rank {rank}, got shape {tuple(x.shape)}")
    return tuple(x.shape)


def _float_dtype(name, x):
    if not any(x.dtype == d for d in _FLOAT_DTYPES):
        raise TypeError(
            f"kda: {name} must be bfloat16, float16, float32 or float64, got {x.dtype}")


def _expect_shape(name, x, expected, meaning):
    if tuple(x.shape) != tuple(expected):
        raise ValueError(
            f"kda: {name} must have shape {tuple(expected)} ({meaning}), got {tuple(x.shape)}")


def _is_concrete(x) -> bool:
    return not isinstance(x, jax.core.Tracer)


def _check(q, k, v, g, beta, scale, initial_state, use_gate, A_log, dt_bias, lower_bound,
           state_v_first, cu_seqlens, impl, pool=False):
    """pool: initial_state is a state pool (state_indices given), of any P >= 1 rows."""
    if impl not in IMPLS:
        raise ValueError(f"kda: impl must be one of {IMPLS}, got {impl!r}")
    b, t, h, kd = _shape_of("q", q, 4)
    _shape_of("k", k, 4)
    _shape_of("v", v, 4)
    _shape_of("g", g, 4)
    _shape_of("beta", beta, 3)
    vd = v.shape[3]
    for name, x in (("q", q), ("k", k), ("v", v), ("g", g), ("beta", beta)):
        _float_dtype(name, x)
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(
            f"kda: q, k and v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    _expect_shape("k", k, (b, t, h, kd), "[B, T, H, K] like q")
    _expect_shape("g", g, (b, t, h, kd), "[B, T, H, K] like q")
    if v.shape[:3] != (b, t, h):
        raise ValueError(
            f"kda: v must have shape [B, T, H, V] = [{b}, {t}, {h}, V] matching q, "
            f"got {tuple(v.shape)}")
    _expect_shape("beta", beta, (b, t, h), "[B, T, H]")
    if kd == 0 or vd == 0 or h == 0:
        raise ValueError(f"kda: H, K and V must be positive, got H={h}, K={kd}, V={vd}")

    if scale is None:
        scale = kd ** -0.5
    elif isinstance(scale, jax.core.Tracer) or not np.isscalar(scale):
        raise TypeError(f"kda: scale must be a Python float, got {type(scale).__name__}")
    scale = float(scale)

    n = b
    if cu_seqlens is not None:
        _shape_of("cu_seqlens", cu_seqlens, 1)
        if not jnp.issubdtype(cu_seqlens.dtype, jnp.integer):
            raise TypeError(f"kda: cu_seqlens must be int32 or int64, got {cu_seqlens.dtype}")
        if b != 1:
            raise ValueError(f"kda: cu_seqlens requires B == 1 (packed sequences), got B={b}")
        if cu_seqlens.shape[0] < 2:
            raise ValueError(
                f"kda: cu_seqlens must have N + 1 >= 2 entries, got shape {cu_seqlens.shape}")
        n = cu_seqlens.shape[0] - 1
        if _is_concrete(cu_seqlens):
            # In Python integers: np.diff of an unsigned array wraps around instead of going
            # negative.
            offsets = [int(x) for x in np.asarray(cu_seqlens)]
            if (offsets[0] != 0 or offsets[-1] != t
                    or any(b < a for a, b in zip(offsets, offsets[1:]))):
                raise ValueError(
                    f"kda: cu_seqlens must start at 0, be non-decreasing and end at T={t}, "
                    f"got {offsets}")
        elif jnp.dtype(cu_seqlens.dtype) != jnp.int32:
            # Traced offsets are made legal on device (docs/robustness.md §1); a wide or
            # unsigned value is clipped into [0, T] first, so narrowing cannot wrap it around.
            cu_seqlens = clip_offsets(cu_seqlens, t)
        # Concrete offsets stay host values (NumPy): under jit, jnp.asarray would make them a
        # tracer, and the split planner needs their values.
        cu_seqlens = (np.asarray(offsets, np.int32) if _is_concrete(cu_seqlens)
                      else jnp.asarray(cu_seqlens, jnp.int32))

    if initial_state is not None:
        _shape_of("initial_state", initial_state, 4)
        _float_dtype("initial_state", initial_state)
        rows = "P" if pool else "N"
        layout = f"[{rows}, H, V, K]" if state_v_first else f"[{rows}, H, K, V]"
        if pool:
            # A state pool: any number of slots, state_indices picks them.
            p = max(initial_state.shape[0], 1)
            expected = (p, h, vd, kd) if state_v_first else (p, h, kd, vd)
            meaning = f"{layout}, a state pool of any P >= 1 slots, with state_indices"
        else:
            expected = (n, h, vd, kd) if state_v_first else (n, h, kd, vd)
            meaning = (f"{layout} with N = "
                       f"{'len(cu_seqlens) - 1' if cu_seqlens is not None else 'B'}")
        _expect_shape("initial_state", initial_state, expected, meaning)
        if initial_state.dtype != jnp.float64:
            initial_state = initial_state.astype(jnp.float32)

    if use_gate:
        if lower_bound is None and A_log is None:
            raise ValueError(
                "kda: use_gate_in_kernel=True without lower_bound needs A_log ([H]): the "
                "softplus gate is -exp(A_log) * softplus(g + dt_bias)")
        if lower_bound is not None:
            if not np.isscalar(lower_bound) or isinstance(lower_bound, jax.core.Tracer):
                raise TypeError(
                    f"kda: lower_bound must be a Python float, got {type(lower_bound).__name__}")
            if not -5.0 <= float(lower_bound) < 0.0:
                raise ValueError(f"kda: lower_bound must be in [-5, 0), got {lower_bound}")
            lower_bound = float(lower_bound)
        gate_dtype = jnp.float64 if q.dtype == jnp.float64 else jnp.float32
        if A_log is None:
            A_log = jnp.zeros((h,), gate_dtype)
        else:
            _array("A_log", A_log)
            _float_dtype("A_log", A_log)
            if tuple(A_log.shape) != (h,):
                raise ValueError(f"kda: A_log must have shape [H] = ({h},), got {A_log.shape}")
            A_log = A_log.astype(gate_dtype)
        if dt_bias is None:
            dt_bias = jnp.zeros((h, kd), gate_dtype)
        else:
            _array("dt_bias", dt_bias)
            _float_dtype("dt_bias", dt_bias)
            if tuple(dt_bias.shape) == (h * kd,):
                dt_bias = dt_bias.reshape(h, kd)
            elif tuple(dt_bias.shape) != (h, kd):
                raise ValueError(
                    f"kda: dt_bias must have shape [H, K] = ({h}, {kd}) or [H * K] = "
                    f"({h * kd},), got {tuple(dt_bias.shape)}")
            dt_bias = dt_bias.astype(gate_dtype)
    else:
        for name, x in (("A_log", A_log), ("dt_bias", dt_bias), ("lower_bound", lower_bound)):
            if x is not None:
                raise ValueError(
                    f"kda: {name} is only used with use_gate_in_kernel=True; pass "
                    f"use_gate_in_kernel=True or leave {name} as None")
    return q, k, v, g, beta, scale, initial_state, A_log, dt_bias, cu_seqlens


def _integer_array(name, x):
    _array(name, x)
    if not jnp.issubdtype(x.dtype, jnp.integer):
        raise TypeError(f"kda: {name} must be an integer array, got {x.dtype}")


def _check_pool(state_indices, num_accepted_tokens, initial_state, output_final_state, q,
                cu_seqlens):
    """state_indices / num_accepted_tokens (docs/decode.md), after _check. Indices stay in
    their own dtype: decode.clip_slots narrows them without wrapping around."""
    if state_indices is None:
        if num_accepted_tokens is not None:
            raise ValueError("kda: num_accepted_tokens is only used with 2-D state_indices "
                             "[N, S] (speculative decoding); state_indices is None")
        return None, None
    b, t = q.shape[:2]
    n = b if cu_seqlens is None else cu_seqlens.shape[0] - 1
    n_meaning = "len(cu_seqlens) - 1" if cu_seqlens is not None else "B"
    _integer_array("state_indices", state_indices)
    if state_indices.ndim not in (1, 2):
        raise ValueError(f"kda: state_indices must have rank 1 ([N]) or 2 ([N, S]), got shape "
                         f"{tuple(state_indices.shape)}")
    if state_indices.shape[0] != n:
        raise ValueError(f"kda: state_indices must have N = {n} rows (N = {n_meaning}), got "
                         f"shape {tuple(state_indices.shape)}")
    per_token = state_indices.ndim == 2
    if per_token and state_indices.shape[1] < 1:
        raise ValueError(f"kda: 2-D state_indices [N, S] need S >= 1, got shape "
                         f"{tuple(state_indices.shape)}")
    if per_token and cu_seqlens is None and state_indices.shape[1] < t:
        raise ValueError(f"kda: 2-D state_indices [N, S] without cu_seqlens need S >= T = {t} "
                         f"(a slot per token), got shape {tuple(state_indices.shape)}")
    if initial_state is None:
        raise ValueError("kda: state_indices needs initial_state, the state pool [P, H, K, V] "
                         "([P, H, V, K] when state_v_first) the indices point into")
    if not output_final_state:
        raise ValueError("with state_indices kda returns the updated pool; pass "
                         "output_final_state=True")
    num_slots = initial_state.shape[0]
    if _is_concrete(state_indices) and state_indices.size:
        # Python integers: no wrap-around of wide or unsigned values.
        largest = max(int(x) for x in np.asarray(state_indices).reshape(-1))
        if largest >= num_slots:
            raise ValueError(
                f"kda: state_indices must be < P = {num_slots} (the pool's rows) or negative "
                f"(a padding slot), got {largest}")
    if num_accepted_tokens is not None:
        if not per_token:
            raise ValueError("kda: num_accepted_tokens is only used with 2-D state_indices "
                             f"[N, S]; state_indices has shape {tuple(state_indices.shape)}")
        _integer_array("num_accepted_tokens", num_accepted_tokens)
        _expect_shape("num_accepted_tokens", num_accepted_tokens, (n,), f"[N], N = {n_meaning}")
    return state_indices, num_accepted_tokens


# ---------------------------------------------------------------------------------------
# Choosing.

def _hopper_device():
    """The first GPU if it is a Hopper (compute capability 9.x), else None and why not."""
    try:
        devices = jax.devices()
    except RuntimeError as e:
        return None, f"no JAX devices ({e})"
    device = devices[0]
    if device.platform != "gpu":
        return None, f"the default JAX backend is {device.platform}, not a CUDA GPU"
    capability = getattr(device, "compute_capability", "")
    if not str(capability).startswith("9"):
        return None, (f"{device.device_kind} has compute capability {capability}; the kernels "
                      "are built for sm_90a (H100/H200)")
    return device, None


def cuda_unavailable_reason(q_dtype=jnp.bfloat16, k_dim=128, v_dim=128) -> str | None:
    """None when the CUDA forward can run a call with these properties, else why not."""
    _, reason = _hopper_device()
    if reason:
        return reason
    reason = _ffi.load_error("CUDA")
    if reason:
        return reason
    if not _ffi.has_target("CUDA", _ffi.FWD_TARGET):
        return "the CUDA extension has no forward target"
    # The head dims: the extension's own checks (kda::fwd_unsupported). The backward's
    # (K = V = 64 or 128) are asked per call: where it refuses, impl='auto' takes the chunked
    # backward after the CUDA forward.
    return (_cuda_dtype_refusal(q_dtype)
            or _head_dims_refusal(False, k_dim, v_dim, q_dtype == jnp.float16))


def cuda_head_dims(backward: bool = False) -> tuple[int, ...]:
    """The head dims K = V that the CUDA target's forward (or backward) takes, by the
    extension's own checks; () where the CUDA extension is not loaded."""
    if _ffi.load_error("CUDA"):
        return ()
    return tuple(d for d in (32, 64, 128, 256) if _head_dims_refusal(backward, d, d) is None)


def _head_dims_refusal(backward: bool, k_dim: int, v_dim: int, f16: bool = False) -> str | None:
    """What the CUDA target says of these head dims, asked for a one-token call."""
    return _ffi.cuda_refusal(backward=backward, B=1, T=1, H=1, K=k_dim, V=v_dim, N=1,
                             is_varlen=False, f16=f16, memory_bytes=0)


def _device_memory_bytes() -> int:
    """What the first GPU can give one allocation at most (0: unknown). Only meaningful where
    the call runs whole on that device, see _cuda_call_refusal."""
    if jax.device_count() != 1:
        return 0
    try:
        stats = jax.devices()[0].memory_stats() or {}
    except Exception:  # noqa: BLE001 - a backend without memory statistics
        return 0
    return int(stats.get("bytes_limit", 0))


def _cuda_call_refusal(q, v, cu_seqlens, backward: bool) -> str | None:
    """What the CUDA target would refuse at run time for this call's sizes (index ranges,
    sequence and head counts, a workspace larger than the device), asked of the extension at
    trace time. On a mesh the workspace is per shard and is not judged here."""
    b, t, h, kd = q.shape
    n = b if cu_seqlens is None else cu_seqlens.shape[0] - 1
    return _ffi.cuda_refusal(backward=backward, B=b, T=t, H=h, K=kd, V=v.shape[-1], N=n,
                             is_varlen=cu_seqlens is not None,
                             f16=q.dtype == jnp.float16, memory_bytes=_device_memory_bytes())


def _cpu_target_ready() -> bool:
    return (_ffi.has_target("cpu", _ffi.FWD_TARGET) and _ffi.has_target("cpu", _ffi.BWD_TARGET))


def _cuda_dtype_refusal(q_dtype) -> str | None:
    if not any(q_dtype == d for d in CUDA_INPUT_DTYPES):
        return f"the CUDA kernels take bfloat16 or float16 q/k/v, got {jnp.dtype(q_dtype)}"
    return None


def _cuda_target_refusal(q, v, cu_seqlens, backward: bool) -> str | None:
    """What the CUDA target would refuse of this call wherever it runs (dtypes, head dims,
    sizes), whatever the process's devices are."""
    return _cuda_dtype_refusal(q.dtype) or _cuda_call_refusal(q, v, cu_seqlens, backward)


def _cuda_reason(q, v, cu_seqlens) -> str | None:
    """None when the CUDA forward can run this call, else why not."""
    return (cuda_unavailable_reason(q.dtype, q.shape[-1], v.shape[-1])
            or _cuda_call_refusal(q, v, cu_seqlens, backward=False))


# Overrides the CUDA target reads from the environment (for tests and tuning). The kernels
# would ignore a value they cannot use and run their own choice; they are checked here, before
# any call that runs on the CUDA target, so that a bad one raises instead.
FWD_WARPS_ENV = "JAX_FLASHKDA_FWD_WARPS"      # the forward's warps per CTA: 1, 2, 4 or 8
# The backward chains' launch: warps per CTA x pipeline stages x CTAs per SM.
BWD_CHAINS_ENV = "JAX_FLASHKDA_BWD_CHAINS"
BWD_CHAINS = ("4x12x1", "4x3x3", "2x12x1", "2x4x3")


def check_cuda_overrides(v_dim: int) -> None:
    """Raises ValueError, naming the variable, when JAX_FLASHKDA_FWD_WARPS is set to anything
    but 1, 2, 4 or 8 dividing V / 16 (the forward's warps per CTA split V / 16 warps), or
    JAX_FLASHKDA_BWD_CHAINS to anything but one of BWD_CHAINS. Unset or empty: the kernels choose."""
    raw = os.environ.get(FWD_WARPS_ENV, "").strip()
    if raw:
        if raw not in ("1", "2", "4", "8"):
            raise ValueError(f"{FWD_WARPS_ENV} must be 1, 2, 4 or 8, got {raw!r}")
        if v_dim % 16 or (v_dim // 16) % int(raw):
            raise ValueError(
                f"{FWD_WARPS_ENV}={raw} must divide V / 16 (one warp per 16 value columns), "
                f"got V={v_dim}")
    raw = os.environ.get(BWD_CHAINS_ENV, "").strip()
    if raw and raw not in BWD_CHAINS:
        raise ValueError(f"{BWD_CHAINS_ENV} must be one of {', '.join(BWD_CHAINS)}, got {raw!r}")


def _on_cuda(v):
    check_cuda_overrides(v.shape[-1])
    return "cuda"


def _default_platform() -> str:
    """The platform a call with uncommitted inputs runs on: the default device's where
    `jax.default_device` names one (a CPU computation in a GPU process), else the backend's."""
    device = jax.config.jax_default_device
    if device is None:
        return jax.default_backend()
    return device if isinstance(device, str) else device.platform


def _choose_impl(impl, q, v, cu_seqlens):
    if impl == "cuda":
        reason = _cuda_reason(q, v, cu_seqlens)
        if reason:
            raise ValueError(f"kda: impl='cuda' cannot run this call: {reason}")
        return _on_cuda(v)
    if impl == "ffi":
        if _default_platform() == "cpu":
            if not _cpu_target_ready():
                raise ValueError(
                    f"kda: impl='ffi' on CPU needs the C++ target: {_ffi.load_error('cpu')}")
            return "cpu"
        reason = _cuda_reason(q, v, cu_seqlens)
        if reason:
            raise ValueError(f"kda: impl='ffi' cannot run this call: {reason}")
        return _on_cuda(v)
    if impl == "auto":
        if _cuda_reason(q, v, cu_seqlens) is None:
            return _on_cuda(v)
        # On CPU the C++ target: 238 ms against 646-675 ms for the chunked path at
        # forward+backward B1 T4096 H4 D128 on a 2-core machine (benchmarks/results/cpu.md).
        if _default_platform() == "cpu" and q.dtype != jnp.float64 and _cpu_target_ready():
            return "cpu"
        return "chunked"
    return impl


# ---------------------------------------------------------------------------------------
# Serving: a state pool (docs/decode.md).

def _kda_pool(q, k, v, g, beta, scale, pool, state_indices, num_accepted_tokens, use_qk_l2norm,
              use_gate, use_beta_sigmoid, A_log, dt_bias, lower_bound, state_v_first,
              cu_seqlens, impl):
    """Every kda call with state_indices comes here, arguments checked. Returns (o, new pool).

    The impl is chosen as for any call (so impl='cuda' or 'ffi' still raises where its target
    cannot run); every choice then computes decode.kda_pool's definition. state_indices and
    num_accepted_tokens arrive in the caller's integer dtype, traced or not;
    decode.clip_slots narrows them to int32 without wrapping around.
    """
    kwargs = dict(pool=pool, state_indices=state_indices,
                  num_accepted_tokens=num_accepted_tokens, scale=scale,
                  use_qk_l2norm_in_kernel=use_qk_l2norm, use_gate_in_kernel=use_gate,
                  use_beta_sigmoid_in_kernel=use_beta_sigmoid, A_log=A_log, dt_bias=dt_bias,
                  lower_bound=lower_bound, state_v_first=state_v_first, cu_seqlens=cu_seqlens)
    if q.shape[0] == 0 or q.shape[1] == 0:
        return decode.kda_pool(q, k, v, g, beta, **kwargs)
    chosen = _choose_impl(impl, q, v, cu_seqlens)
    if chosen == "cuda":
        return _kda_pool_cuda(q, k, v, g, beta, scale, pool, state_indices,
                              num_accepted_tokens, use_qk_l2norm, use_gate, use_beta_sigmoid,
                              A_log, dt_bias, lower_bound, state_v_first, cu_seqlens)
    if chosen == "cpu":
        # The C++ target has no pool call: the pure definition (exact, gradients included).
        return decode.kda_pool(q, k, v, g, beta, path="auto", **kwargs)
    # "recurrent", "chunked" as asked; "auto" that chose the chunked path picks by T.
    path = chosen if impl in ("recurrent", "chunked") else "auto"
    return decode.kda_pool(q, k, v, g, beta, path=path, **kwargs)


def _kda_pool_cuda(q, k, v, g, beta, scale, pool, state_indices, num_accepted_tokens,
                   use_qk_l2norm, use_gate, use_beta_sigmoid, A_log, dt_bias, lower_bound,
                   state_v_first, cu_seqlens):
    """A pool call on the CUDA decode kernel: the pool read and written in place (aliased;
    without a copy where the caller donates it). Gradients, where asked for, are those of the
    pure definition (decode.kda_pool), recomputed."""
    t = q.shape[1]
    num_slots = pool.shape[0]
    cfg, A_log, dt_bias = _compiled_operands(q, scale, use_qk_l2norm, use_gate, use_beta_sigmoid,
                                             A_log, dt_bias, lower_bound, state_v_first,
                                             cu_seqlens)
    dcfg = _ffi.DecodeConfig(cfg, index_rank=state_indices.ndim,
                             num_accepted=num_accepted_tokens is not None)
    # Out-of-range slots and counts mean the same to the kernel as to the pure definition
    # (no slot; clipped into [1, S]); clipped here so that no value wraps around when narrowed.
    indices = decode.clip_slots(state_indices, num_slots)
    accepted = (jnp.zeros((1,), jnp.int32) if num_accepted_tokens is None
                else decode.clip_slots(num_accepted_tokens, state_indices.shape[-1]))
    cu = (jnp.zeros((1,), jnp.int32) if cu_seqlens is None
          else legal_offsets(cu_seqlens, t))  # the kernel only clamps them
    pure_kwargs = dict(scale=scale, use_qk_l2norm_in_kernel=use_qk_l2norm,
                       use_gate_in_kernel=use_gate,
                       use_beta_sigmoid_in_kernel=use_beta_sigmoid, lower_bound=lower_bound,
                       state_v_first=state_v_first)
    return _pool_vjp(dcfg, tuple(sorted(pure_kwargs.items())))(
        q, k, v, g, beta, A_log, dt_bias, pool.astype(jnp.float32), cu, indices, accepted)


@functools.lru_cache(maxsize=None)
def _pool_vjp(dcfg: _ffi.DecodeConfig, pure_kwargs):
    """(q, k, v, g, beta, A_log, dt_bias, pool, cu, indices, accepted) -> (o, pool') on the
    decode kernel, differentiable through the pure definition."""
    op = _ffi.decode_call(dcfg)
    pure_kwargs = dict(pure_kwargs)

    def pure(primals, cu, indices, accepted):
        q, k, v, g, beta, A_log, dt_bias, pool = primals
        gate = pure_kwargs["use_gate_in_kernel"]
        return decode.kda_pool(
            q, k, v, g, beta, pool=pool, state_indices=indices,
            num_accepted_tokens=accepted if dcfg.num_accepted else None,
            A_log=A_log if gate else None, dt_bias=dt_bias if gate else None,
            cu_seqlens=cu if dcfg.call.is_varlen else None, path="auto", **pure_kwargs)

    def pure_forward(q, k, v, g, beta, A_log, dt_bias, pool, cu, indices, accepted):
        o, pool = pure((q, k, v, g, beta, A_log, dt_bias, pool), cu, indices, accepted)
        return o.astype(v.dtype), pool.astype(jnp.float32)

    @jax.custom_vjp
    def run(*args):
        axes = varying_axes(*args)
        # Lowered for the CPU (of a GPU process, or exported for both), the pure definition.
        return _ffi.per_platform(args, cuda=op, other=pure_forward,
                                 finish=lambda outs: tuple(make_varying(o, axes) for o in outs))

    def run_fwd(*args):
        return run(*args), args

    def run_bwd(args, cotangents):
        primals, rest = args[:8], args[8:]
        _, vjp = jax.vjp(lambda *x: pure(x, *rest), *primals)
        grads = vjp(cotangents)
        grads = tuple(_typed_like(grad, primal) for grad, primal in zip(grads, primals))
        return grads + (None, None, None)

    run.defvjp(run_fwd, run_bwd)
    return run


# ---------------------------------------------------------------------------------------
# The compiled path.

def _gate_mode(use_gate, lower_bound):
    if not use_gate:
        return _ffi.GATE_LOG_DECAY
    return _ffi.GATE_SOFTPLUS if lower_bound is None else _ffi.GATE_SAFE


def _compiled_operands(q, scale, use_qk_l2norm, use_gate, use_beta_sigmoid, A_log, dt_bias,
                       lower_bound, state_v_first, cu_seqlens):
    """What every compiled call takes besides the tensors: its attributes, and A_log / dt_bias
    as fp32 arrays (zeros where not given)."""
    _, _, h, kd = q.shape
    cfg = _ffi.CallConfig(
        scale=scale, use_qk_l2norm=bool(use_qk_l2norm), use_beta_sigmoid=bool(use_beta_sigmoid),
        gate_mode=_gate_mode(use_gate, lower_bound),
        lower_bound=float(lower_bound) if lower_bound is not None else 0.0,
        state_v_first=bool(state_v_first), is_varlen=cu_seqlens is not None)
    A_log = jnp.zeros((h,), jnp.float32) if A_log is None else A_log.astype(jnp.float32)
    dt_bias = (jnp.zeros((h, kd), jnp.float32) if dt_bias is None
               else dt_bias.astype(jnp.float32))
    return cfg, A_log, dt_bias


def _kda_compiled(q, k, v, g, beta, scale, initial_state, use_qk_l2norm, use_gate,
                  use_beta_sigmoid, A_log, dt_bias, lower_bound, state_v_first, cu_seqlens,
                  cuda_backward_fallback):
    """The FFI path. The C++ target computes in fp32 and the CUDA target takes 16-bit q/k/v:
    float64 inputs are computed in fp32 and o is returned in v's dtype, as documented."""
    b, _, h, kd = q.shape
    out_dtype = v.dtype
    # What the CUDA target would refuse, asked wherever its extension is loaded: the computation
    # may be lowered for CUDA (jax.export) even in a CPU process, and a CPU one in a GPU process.
    forward_refusal = backward_refusal = None
    if _ffi.load_error("CUDA") is None:
        forward_refusal = _cuda_target_refusal(q, v, cu_seqlens, backward=False)
        backward_refusal = forward_refusal or _cuda_target_refusal(q, v, cu_seqlens,
                                                                   backward=True)
    vd = v.shape[-1]
    cfg, A_log, dt_bias = _compiled_operands(q, scale, use_qk_l2norm, use_gate, use_beta_sigmoid,
                                             A_log, dt_bias, lower_bound, state_v_first,
                                             cu_seqlens)
    n = cu_seqlens.shape[0] - 1 if cu_seqlens is not None else b
    state_shape = (n, h, vd, kd) if state_v_first else (n, h, kd, vd)
    # The C++ target computes in fp32; the CUDA target takes 16-bit q/k/v (checked above).
    to_f32 = lambda x: x.astype(jnp.float32) if x.dtype == jnp.float64 else x
    q, k, v, g, beta = map(to_f32, (q, k, v, g, beta))
    h0 = (jnp.zeros(state_shape, jnp.float32) if initial_state is None
          else initial_state.astype(jnp.float32))
    cu = cu_seqlens if cu_seqlens is not None else jnp.zeros((1,), jnp.int32)
    cuda_forward = ("pure" if forward_refusal
                    else "decode" if _takes_cuda_decode(q, n) else "compiled")
    if backward_refusal and not cuda_backward_fallback and jax.default_backend() != "cpu":
        backward = _RefusedBackward(backward_refusal)
    else:
        backward = "pure" if backward_refusal else "compiled"
    plan = None
    # In a GPU process the split serves calls the CUDA target takes whole; in a CPU process
    # only a forced one runs (composed from the plain calls, see _fused_split).
    if jax.default_backend() == "cpu" or (cuda_forward == "compiled" and backward == "compiled"):
        plan = _split_plan(q, v, cu_seqlens, n)
    composed_split = plan is not None and not _fused_split(plan)
    if cu_seqlens is not None and (cuda_forward == "decode" or composed_split):
        # The decode kernel only clamps offsets; split.py cuts them into segments.
        cu = legal_offsets(cu, q.shape[1])
    if composed_split:
        run = split.split_vjp(cfg, plan, _compiled_grads)
    elif plan is not None:
        run = _compiled_vjp(cfg, backward, "split", plan.segment_tokens)
    else:
        run = _compiled_vjp(cfg, backward, cuda_forward)
    o, final_state = run(q, k, v, g, beta, A_log, dt_bias, h0, cu)
    return o.astype(out_dtype), final_state


def _fused_split(plan) -> bool:
    """Whether the split is the CUDA target's split forward alone (one call: prep once, the
    transitions, the combine and the outputs on device) beside the whole backward: for plans
    whose backward stays whole, in a GPU process (the planner's). A plan that splits the
    backward runs split.split_vjp, whose forward is that same call where lowered for CUDA (it
    returns the segments' states that the split backward starts from). A split forced on a CPU
    process runs split.split_vjp too, composed from the plain calls on whatever platform the
    computation is lowered for (how the CPU tests exercise it)."""
    return (not plan.backward and jax.default_backend() != "cpu"
            and _ffi.has_target("CUDA", _ffi.FWD_SPLIT_TARGET))


def _sm_count() -> int:
    return int(getattr(jax.devices()[0], "core_count", 0) or 132)


def _split_plan(q, v, cu_seqlens, n):
    """The sequence split's plan for a compiled call (docs/sequence_split.md), or None. The
    planner runs by itself only for the CUDA target on a one-GPU process (on a mesh the split
    would gather what is sharded), unless JAX_FLASHKDA_SEGMENT_TOKENS=0; a length there forces
    it on any compiled target."""
    b, t, h, kd = q.shape
    vd = v.shape[-1]
    on_gpu = jax.default_backend() != "cpu"
    longest = t
    if cu_seqlens is not None:
        longest = (int(np.max(np.diff(np.asarray(cu_seqlens, np.int64))))
                   if _is_concrete(cu_seqlens) else None)
    plan = split.plan_split(batch=b, tokens=t, heads=h, value_dim=vd, num_sequences=n,
                            longest=longest, sms=_sm_count() if on_gpu else 0,
                            automatic=on_gpu and jax.device_count() == 1)
    if plan is not None and on_gpu:
        memory = _device_memory_bytes()
        f16 = q.dtype == jnp.float16
        # Lowered for CUDA the split's forward is the split forward call; a split backward
        # runs the backward over the segments as packed sequences.
        refusal = _ffi.cuda_refusal(
            backward=False, B=b, T=t, H=h, K=kd, V=vd, N=n, is_varlen=cu_seqlens is not None,
            f16=f16, memory_bytes=memory, segment_tokens=plan.segment_tokens)
        if plan.backward and not refusal:
            refusal = _ffi.cuda_refusal(backward=True, B=1, T=b * t, H=h, K=kd, V=vd,
                                        N=plan.num_segments, is_varlen=True, f16=f16,
                                        memory_bytes=memory, segment_tokens=plan.segment_tokens)
        if refusal:
            plan = None
    split.describe(plan, B=b, T=t, H=h, N=n, longest=longest)
    return plan


def _takes_cuda_decode(q, num_sequences: int) -> bool:
    """Generation-sized calls: at most CUDA_DECODE_MAX_TOKENS tokens per sequence (on average,
    for packed sequences), where the decode kernel beats the chunk kernels."""
    return (_ffi.has_target("CUDA", _ffi.DECODE_TARGET)
            and q.shape[0] * q.shape[1] <= CUDA_DECODE_MAX_TOKENS * max(num_sequences, 1))


def _chunked_forward(cfg: _ffi.CallConfig, q, k, v, g, beta, A_log, dt_bias, h0, cu):
    """The compiled call's (o, final state), computed by the chunked path."""
    o, final_state = kda_chunked(
        q, k, v, g, beta, scale=cfg.scale, initial_state=h0,
        use_qk_l2norm_in_kernel=cfg.use_qk_l2norm,
        use_gate_in_kernel=cfg.gate_mode != _ffi.GATE_LOG_DECAY,
        use_beta_sigmoid_in_kernel=cfg.use_beta_sigmoid, A_log=A_log, dt_bias=dt_bias,
        lower_bound=cfg.lower_bound if cfg.gate_mode == _ffi.GATE_SAFE else None,
        state_v_first=cfg.state_v_first, cu_seqlens=cu if cfg.is_varlen else None)
    return o.astype(v.dtype), final_state.astype(jnp.float32)


def _pure_vjp(cfg: _ffi.CallConfig, primals, cotangents):
    """Gradients by autodiff of the chunked path: the backward where no compiled one exists."""
    cu = primals[-1]
    _, vjp = jax.vjp(lambda *x: _chunked_forward(cfg, *x, cu), *primals[:-1])
    return vjp(cotangents)


def _compiled_grads(cfg: _ffi.CallConfig, primals, cotangents):
    """The target's own backward for primals (q, k, v, g, beta, A_log, dt_bias, h0, cu): the
    gradients of the first eight."""
    do, dht = cotangents
    axes = varying_axes(*primals, do, dht)
    return tuple(make_varying(x, axes) for x in _ffi.bwd_call(cfg)(*primals, do, dht))


# Inside shard_map every value's type records the mesh axes it varies over. The custom call's
# results carry none, so the custom_vjp restores them: outputs vary wherever an input does, and
# each gradient gets its primal's type, summed over the axes its primal is replicated on (the
# transpose of using a replicated value in per-shard work). Outside shard_map these are no-ops.

def _typed_like(grad, primal):
    extra = tuple(sorted(varying_axes(grad) - varying_axes(primal)))
    if extra:
        grad = jax.lax.psum(grad, extra)
    return make_varying(grad, varying_axes(primal))


@dataclasses.dataclass(frozen=True)
class _RefusedBackward:
    """impl='cuda' or 'ffi' for a call whose forward fits the CUDA target and whose backward
    does not: taking its gradient raises, at trace time, saying why."""

    reason: str


@functools.lru_cache(maxsize=None)
def _compiled_vjp(cfg: _ffi.CallConfig, backward, cuda_forward: str = "compiled",
                  segment_tokens: int = 0):
    """What runs where the computation is lowered for CUDA: the forward, cuda_forward:
    "compiled" (the target's forward), "decode" (the decode kernel: the state updated in place
    of h0's buffer where XLA can give it, e.g. a donated or dead h0), "split" (the split forward
    at segment_tokens, docs/sequence_split.md) or "pure" (the chunked path, where the CUDA
    target refuses the call: it may be lowered for CUDA from a CPU process); the backward,
    backward: "compiled", "pure" (autodiff of the chunked path, where the CUDA backward
    refuses the call and impl='auto') or a _RefusedBackward. Lowered for the CPU, the C++
    target's forward and backward."""
    plain = _ffi.fwd_call(cfg)
    if cuda_forward == "split":
        split_fwd = _ffi.fwd_split_call(_ffi.SplitConfig(cfg, segment_tokens))

        def cuda_fwd(*primals):
            return split_fwd(*primals)[:2]  # the segments' states serve a split backward
    elif cuda_forward == "pure":
        cuda_fwd = functools.partial(_chunked_forward, cfg)
    elif cuda_forward == "decode":
        decode_op = _ffi.decode_call(_ffi.DecodeConfig(cfg))

        def cuda_fwd(*primals):
            no_pool = jnp.zeros((1,), jnp.int32)
            return decode_op(*primals, no_pool, no_pool)
    else:
        cuda_fwd = plain

    def forward(*primals):
        axes = varying_axes(*primals)
        return _ffi.per_platform(primals, cuda=cuda_fwd, other=plain,
                                 finish=lambda outs: tuple(make_varying(o, axes) for o in outs))

    run = jax.custom_vjp(forward)

    def run_fwd(*primals):
        return forward(*primals), primals

    def run_bwd(primals, cotangents):
        if isinstance(backward, _RefusedBackward):
            raise ValueError(
                f"kda: the CUDA backward cannot run this call: {backward.reason}; "
                "impl='auto' would take the chunked backward")
        # Each platform's own backward where it has one (the CUDA one only for the sizes it
        # takes), else autodiff of the chunked path. Without the CUDA extension nothing runs
        # on CUDA: one backward, the CPU's.
        cpu_compiled = _ffi.has_target("cpu", _ffi.BWD_TARGET)
        cuda_compiled = cpu_compiled
        if _ffi.load_error("CUDA") is None:
            cuda_compiled = backward == "compiled" and _ffi.has_target("CUDA", _ffi.BWD_TARGET)
        grads_on = lambda compiled: functools.partial(
            _compiled_grads if compiled else _pure_vjp, cfg)
        cpu_grads = grads_on(cpu_compiled)
        cuda_grads = cpu_grads if cuda_compiled == cpu_compiled else grads_on(cuda_compiled)
        typed = lambda grads: tuple(_typed_like(g, p) for g, p in zip(grads, primals))
        grads = _ffi.per_platform((primals, cotangents), cuda=cuda_grads, other=cpu_grads,
                                  finish=typed)
        return grads + (None,)

    run.defvjp(run_fwd, run_bwd)
    return run

