"""Random KDA inputs for the whole suite: never zeros, every gate mode.

`random_inputs` is the one place that draws q, k, v, g, beta, A_log, dt_bias and the initial
state (and makes the varlen offsets); `make_inputs` packs them as `kda`'s arguments,
`kernel_inputs` as the FFI targets' operands. The keyword options keep the draws each test
family was written for (how strong the decays are, how wide the gates, how big the state)."""

import contextlib

import jax
import numpy as np

GATE_MODES = ("log_decay", "softplus", "safe")  # index: the targets' integer gate_mode

# Draws of g under the log-decay gate, by name (g <= 0 always).
LOG_DECAYS = {
    # -exp(N(0, 1) - 2): e^g mostly between 0.37 and 1 (median 0.87).
    "exp_normal": lambda rng, shape: -np.exp(rng.standard_normal(shape) - 2.0),
    # -U(0, 2)³: from 0 down to -8 (e^g from 1 down to 3e-4), half of them above -1.
    "cubed_uniform": lambda rng, shape: -rng.uniform(0.0, 2.0, shape) ** 3,
    # -U(0.01, 1): e^g in [0.37, 0.99].
    "uniform": lambda rng, shape: -rng.uniform(0.01, 1.0, shape),
}

# The CUDA kernel tests' extreme gates: whole-token resets every 7th token and single channels
# decayed to -1000 or -30 (log-decay gate); gate inputs 4x wider and A_log up to 2.5 (the others).
KERNEL_EXTREME = dict(reset_every=7, decay_spikes=((-1000.0, 0.05), (-30.0, 0.05)),
                      gate_scale=4.0, A_log_range=(-1.0, 2.5))

KERNEL_OPERANDS = ("q", "k", "v", "g", "beta", "A_log", "dt_bias", "h0")


def random_inputs(rng, *, B, T, H, K, V, gate_mode="safe", l2norm=True, beta_sigmoid=True,
                  state_v_first=False, seqlens=None, tail=0, pool_size=None, with_state=True,
                  always_gate_params=False, log_decay="exp_normal", reset_every=None,
                  decay_spikes=(), gate_scale=1.0, A_log_range=(-1.0, 1.0), dt_bias_scale=0.5,
                  state_scale=0.1):
    """float64 numpy q, k, v [B, T, H, K|V], g [B, T, H, K] and beta [B, T, H]; A_log [H] and
    dt_bias [H, K] for the gated modes, and for the log-decay gate too with
    `always_gate_params` (callers that pass them whatever the mode: random, so that ignoring
    them is tested); initial_state [N, H, K, V] ([N, H, V, K] with state_v_first) unless not
    `with_state`; cu_seqlens (int32) with `seqlens`.

    `seqlens` gives varlen sequence lengths: B is then 1 and T their sum plus `tail` tokens
    outside every sequence. N is B, the number of sequences, or `pool_size` (a state pool).
    Without `l2norm`, q and k are scaled by K^-1/2 and without `beta_sigmoid` beta is drawn in
    [0.05, 1), which keeps the delta rule contractive as the in-kernel forms would.

    The draws: g by `log_decay` (a name in LOG_DECAYS) under the log-decay gate, its tokens
    0, n, 2n, ... set to -1000 for `reset_every` = n and each (value, fraction) of
    `decay_spikes` setting that fraction of single channels to the value (a (lo, hi) value is
    one number drawn in that range per call); otherwise g ~ N(0, gate_scale²).
    A_log ~ U(A_log_range), dt_bias ~ N(0, dt_bias_scale²), the state ~ N(0, state_scale²).
    """
    if seqlens is not None:
        B, T = 1, int(sum(seqlens)) + tail
    x = dict(q=rng.standard_normal((B, T, H, K)), k=rng.standard_normal((B, T, H, K)),
             v=rng.standard_normal((B, T, H, V)))
    if not l2norm:
        x["q"], x["k"] = x["q"] / np.sqrt(K), x["k"] / np.sqrt(K)
    x["beta"] = (rng.standard_normal((B, T, H)) if beta_sigmoid
                 else rng.uniform(0.05, 1.0, (B, T, H)))
    if gate_mode not in GATE_MODES:
        raise ValueError(f"gate_mode must be one of {GATE_MODES}, got {gate_mode!r}")
    if gate_mode == "log_decay":
        g = LOG_DECAYS[log_decay](rng, (B, T, H, K))
        if reset_every is not None:
            g[:, ::reset_every] = -1000.0
        for value, fraction in decay_spikes:
            hit = rng.random(g.shape) < fraction
            g[hit] = rng.uniform(*value) if isinstance(value, tuple) else value
        x["g"] = g
    else:
        x["g"] = gate_scale * rng.standard_normal((B, T, H, K))
    if gate_mode != "log_decay" or always_gate_params:
        x["A_log"] = rng.uniform(*A_log_range, (H,))
        x["dt_bias"] = dt_bias_scale * rng.standard_normal((H, K))
    n = B
    if seqlens is not None:
        x["cu_seqlens"] = np.concatenate([[0], np.cumsum(seqlens)]).astype(np.int32)
        n = len(seqlens)
    if pool_size is not None:
        n = pool_size
    if with_state:
        shape = (n, H, V, K) if state_v_first else (n, H, K, V)
        x["initial_state"] = state_scale * rng.standard_normal(shape)
    return x


def make_inputs(rng, B=2, T=37, H=3, K=16, V=24, *, gate_mode="safe", dtype=np.float32,
                gate_dtype=None, l2norm=True, beta_sigmoid=True, with_state=True,
                state_v_first=False, seqlens=None, pool_size=None):
    """Returns (args, kwargs) for `kda`: q, k, v as numpy in `dtype`, g and beta in
    `gate_dtype` (default `dtype`), A_log, dt_bias and the state in float32.

    `seqlens` gives varlen sequence lengths (B is then 1 and T their sum). `pool_size` makes
    the initial state a state pool of that many slots (the caller adds `state_indices`).
    """
    x = random_inputs(rng, B=B, T=T, H=H, K=K, V=V, gate_mode=gate_mode, l2norm=l2norm,
                      beta_sigmoid=beta_sigmoid, state_v_first=state_v_first, seqlens=seqlens,
                      pool_size=pool_size, with_state=with_state)
    gate_dtype = gate_dtype or dtype
    args = tuple(x[n].astype(dtype) for n in ("q", "k", "v")) + tuple(
        x[n].astype(gate_dtype) for n in ("g", "beta"))
    kwargs = dict(use_qk_l2norm_in_kernel=l2norm, use_beta_sigmoid_in_kernel=beta_sigmoid,
                  state_v_first=state_v_first)
    if gate_mode != "log_decay":
        kwargs.update(use_gate_in_kernel=True, A_log=x["A_log"].astype(np.float32),
                      dt_bias=x["dt_bias"].astype(np.float32))
        if gate_mode == "safe":
            kwargs["lower_bound"] = -5.0
    if seqlens is not None:
        kwargs["cu_seqlens"] = x["cu_seqlens"]
    if with_state:
        kwargs["initial_state"] = x["initial_state"].astype(np.float32)
        kwargs["output_final_state"] = True
    return args, kwargs


def kernel_inputs(rng, *, B, T, H, K, V, gate_mode, dtype, g_dtype=None, beta_dtype=None,
                  l2norm=True, beta_sigmoid=True, v_first=False, seqlens=None, tail=0,
                  extreme=False, always_gate_params=False, **draws):
    """The operands of an FFI target call, by the targets' names (KERNEL_OPERANDS, and
    cu_seqlens with `seqlens`), as numpy: q, k, v in `dtype`, g in `g_dtype` and beta in
    `beta_dtype` (both default `dtype`), A_log, dt_bias and the state h0 in float32.

    `gate_mode` is the targets' integer (an index of GATE_MODES). The draws are
    random_inputs' with a state of scale 0.3, KERNEL_EXTREME's with `extreme`, and `draws`
    over both; A_log and dt_bias come for gate mode 0 only with `always_gate_params`.
    """
    draws = {"state_scale": 0.3, **(KERNEL_EXTREME if extreme else {}), **draws}
    x = random_inputs(rng, B=B, T=T, H=H, K=K, V=V, gate_mode=GATE_MODES[gate_mode],
                      l2norm=l2norm, beta_sigmoid=beta_sigmoid, state_v_first=v_first,
                      seqlens=seqlens, tail=tail, always_gate_params=always_gate_params,
                      **draws)
    x["h0"] = x.pop("initial_state")
    dtypes = dict(q=dtype, k=dtype, v=dtype, g=g_dtype or dtype, beta=beta_dtype or dtype,
                  A_log=np.float32, dt_bias=np.float32, h0=np.float32, cu_seqlens=np.int32)
    return {n: a.astype(dtypes[n]) for n, a in x.items()}


def rel_err(x, ref):
    x = np.asarray(x, np.float64)
    ref = np.asarray(ref, np.float64)
    return float(np.linalg.norm(x - ref) / max(np.linalg.norm(ref), 1e-30))


@contextlib.contextmanager
def float64_on_cpu():
    """float64 enabled and the CPU as default device, for the reference recurrence."""
    previous = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    try:
        with jax.default_device(jax.devices("cpu")[0]):
            yield
    finally:
        jax.config.update("jax_enable_x64", previous)
