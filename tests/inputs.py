"""Random KDA inputs for the tests: never zeros, every gate mode."""

import contextlib

import jax
import numpy as np

GATE_MODES = ("log_decay", "softplus", "safe")


def make_inputs(rng, B=2, T=37, H=3, K=16, V=24, *, gate_mode="safe", n_seqs=None,
                dtype=np.float32, with_state=True, state_v_first=False, seqlens=None,
                pool_size=None):
    """Returns (args, kwargs) for `kda`, with arrays as numpy in `dtype`.

    `seqlens` gives varlen sequence lengths (B is then 1 and T their sum). `pool_size` makes
    the initial state a state pool of that many slots (the caller adds `state_indices`).
    """
    if seqlens is not None:
        B, T = 1, int(sum(seqlens))
    q = rng.standard_normal((B, T, H, K)).astype(dtype)
    k = rng.standard_normal((B, T, H, K)).astype(dtype)
    v = rng.standard_normal((B, T, H, V)).astype(dtype)
    beta = rng.standard_normal((B, T, H)).astype(dtype)
    kwargs = dict(use_qk_l2norm_in_kernel=True, use_beta_sigmoid_in_kernel=True,
                  state_v_first=state_v_first)
    if gate_mode == "log_decay":
        g = -np.exp(rng.standard_normal((B, T, H, K)) - 2.0).astype(dtype)
    else:
        g = rng.standard_normal((B, T, H, K)).astype(dtype)
        kwargs.update(use_gate_in_kernel=True,
                      A_log=rng.uniform(-1.0, 1.0, (H,)).astype(np.float32),
                      dt_bias=(0.5 * rng.standard_normal((H, K))).astype(np.float32))
        if gate_mode == "safe":
            kwargs["lower_bound"] = -5.0
    n = B
    if seqlens is not None:
        kwargs["cu_seqlens"] = np.concatenate([[0], np.cumsum(seqlens)]).astype(np.int32)
        n = len(seqlens)
    if pool_size is not None:
        n = pool_size
    if with_state:
        shape = (n, H, V, K) if state_v_first else (n, H, K, V)
        kwargs["initial_state"] = (0.1 * rng.standard_normal(shape)).astype(np.float32)
        kwargs["output_final_state"] = True
    return (q, k, v, g, beta), kwargs


def rel_err(x, ref):
    x = np.asarray(x, np.float64)
    ref = np.asarray(ref, np.float64)
    return float(np.linalg.norm(x - ref) / max(np.linalg.norm(ref), 1e-30))


def random_kernel_inputs(rng, *, B, T, N, H, K, V, gate_mode, l2norm=True, beta_sigmoid=True,
                         v_first=False, extreme=False):
    """float64 numpy q, k, v, g, beta, h0 (and A_log, dt_bias for gate_mode 1 and 2, the
    kernels' integer gate modes) for the CUDA kernel tests. `extreme` sets whole-token resets
    and single channels decayed to -1000 (log-decay gate) or wide gate inputs (the others)."""
    q = rng.standard_normal((B, T, H, K))
    k = rng.standard_normal((B, T, H, K))
    if not l2norm:  # keep the delta rule contractive: |k|² β ≤ 2
        q, k = q / np.sqrt(K), k / np.sqrt(K)
    v = rng.standard_normal((B, T, H, V))
    if gate_mode == 0:
        g = -np.exp(rng.standard_normal((B, T, H, K)) - 2.0)
        if extreme:
            g[:, ::7] = -1000.0
            g[rng.random(g.shape) < 0.05] = -1000.0
            g[rng.random(g.shape) < 0.05] = -30.0
    else:
        g = rng.standard_normal((B, T, H, K)) * (4.0 if extreme else 1.0)
    beta = rng.standard_normal((B, T, H)) if beta_sigmoid else rng.uniform(0.05, 1.0, (B, T, H))
    x = dict(q=q, k=k, v=v, g=g, beta=beta)
    if gate_mode:
        x["A_log"] = rng.uniform(-1.0, 1.0 + (1.5 if extreme else 0.0), (H,))
        x["dt_bias"] = 0.5 * rng.standard_normal((H, K))
    x["h0"] = 0.3 * rng.standard_normal((N, H, V, K) if v_first else (N, H, K, V))
    return x


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
