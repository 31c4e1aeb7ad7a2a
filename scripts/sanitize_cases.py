"""Small forward and backward calls for compute-sanitizer: each kernel family once.

    compute-sanitizer --tool memcheck --kernel-name regex=kda_ python scripts/sanitize_cases.py
    ... python scripts/sanitize_cases.py split     # the sequence split's cases alone
    ... python scripts/sanitize_cases.py head64    # the K = V = 64 backward's cases alone
    ... python scripts/sanitize_cases.py split_forward  # the CUDA split forward alone (no XLA
                                                        # dots, which split.py's backward has)
    ... python scripts/sanitize_cases.py decode    # the decode kernel alone
"""

import contextlib
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

from jax_flashkda import kda

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
import test_cuda_bwd  # noqa: E402
import test_cuda_fwd  # noqa: E402

rng = np.random.default_rng(0)


@contextlib.contextmanager
def environment(**overrides):
    """The kernels' environment overrides set for the block, removed after it."""
    os.environ.update(overrides)
    try:
        yield
    finally:
        for name in overrides:
            os.environ.pop(name)


def split_cases():
    with environment(JAX_FLASHKDA_SEGMENT_TOKENS="24"):
        for split_backward, v_first in (("0", True), ("1", False)):
            with environment(JAX_FLASHKDA_SPLIT_BACKWARD=split_backward):
                x, dtypes, static, do, dht = test_cuda_bwd.make_case(
                    rng, H=2, gate_mode=2, seqlens=[0, 50, 7], v_first=v_first)
                test_cuda_bwd.cuda_grads(x, dtypes, static, do, dht)


def split_forward_cases():
    """The CUDA split forward (jax_flashkda_fwd_split: segments, transitions, combine, outputs,
    finals) through kda, forward only."""
    with environment(JAX_FLASHKDA_SEGMENT_TOKENS="24", JAX_FLASHKDA_SPLIT_BACKWARD="0"):
        for v_first, seqlens in ((True, [0, 50, 7]), (False, None)):
            x, dtypes, static, _, _ = test_cuda_bwd.make_case(rng, B=2, T=90, H=2, gate_mode=2,
                                                              seqlens=seqlens, v_first=v_first)
            a = {n: jnp.asarray(v, dtypes[n]) for n, v in x.items()}
            jax.block_until_ready(kda(a["q"], a["k"], a["v"], a["g"], a["beta"],
                                      initial_state=a["h0"], output_final_state=True,
                                      impl="cuda", A_log=a["A_log"], dt_bias=a["dt_bias"],
                                      **static))


# The K = V = 64 backward: every chain launch configuration once, varlen with empty sequences.
HEAD64_CASES = [("4x12x1", dict(gate_mode=2, T=37)),
                ("4x3x3", dict(gate_mode=0, extreme=True, T=40)),
                ("2x12x1", dict(gate_mode=1, seqlens=[0, 19, 33, 0], v_first=True)),
                ("2x4x3", dict(gate_mode=2, T=1, dtype=jnp.float16))]


def head64_cases():
    for chains, kw in HEAD64_CASES:
        with environment(JAX_FLASHKDA_BWD_CHAINS=chains):
            x, dtypes, static, do, dht = test_cuda_bwd.make_case(rng, H=2, head_dim=64, **kw)
            test_cuda_bwd.cuda_grads(x, dtypes, static, do, dht)


def decode_cases():
    """The decode kernel (docs/decode.md): plain, both layouts, a pool with padding and
    out-of-range slots, a slot per token with accepted counts, packed sequences, V not a
    multiple of 4 (the float-at-a-time state accesses of [K,V])."""
    import test_cuda_decode

    for v_first in (False, True):
        arrays, attrs = test_cuda_fwd.make_case(rng, B=3, T=3, H=2, v_first=v_first)
        test_cuda_decode._decode(arrays, attrs, arrays[7])
        pool = rng.standard_normal((5,) + arrays[7].shape[1:])
        test_cuda_decode._decode(arrays, attrs, pool, np.array([4, -3, 99]))
    arrays, attrs = test_cuda_fwd.make_case(rng, H=2, K=64, V=64, seqlens=[2, 0, 3], tail=2)
    pool = rng.standard_normal((6,) + arrays[7].shape[1:])
    test_cuda_decode._decode(arrays, attrs, pool, np.array([[0, 1, 7], [2, 3, -1], [4, 5, 1]]),
                             np.array([2, 5, -4]))
    for v_first in (False, True):
        arrays, attrs = test_cuda_fwd.make_case(rng, B=2, T=2, H=2, V=42, v_first=v_first)
        test_cuda_decode._decode(arrays, attrs, arrays[7])


MODES = {"split": split_cases, "head64": head64_cases, "split_forward": split_forward_cases,
         "decode": decode_cases}
if len(sys.argv) == 2 and sys.argv[1] in MODES:
    MODES[sys.argv[1]]()
    sys.exit(0)
for warps, kw in [("1", dict(gate_mode=2)), ("4", dict(gate_mode=0, extreme=True)),
                  ("2", dict(gate_mode=1, seqlens=[0, 19, 33], tail=5)),
                  ("8", dict(gate_mode=2, K=64, V=128)), ("1", dict(gate_mode=2, T=1))]:
    with environment(JAX_FLASHKDA_FWD_WARPS=warps):
        arrays, attrs = test_cuda_fwd.make_case(rng, H=2, **kw)
        jax.block_until_ready(test_cuda_fwd.cuda_fwd(*arrays, **attrs))

for kw in [dict(gate_mode=2, T=37), dict(gate_mode=0, extreme=True, T=40),
           dict(gate_mode=1, seqlens=[0, 19, 33, 0], v_first=True),
           dict(gate_mode=2, T=1, dtype=jnp.float16)]:
    x, dtypes, static, do, dht = test_cuda_bwd.make_case(rng, H=2, **kw)
    test_cuda_bwd.cuda_grads(x, dtypes, static, do, dht)
head64_cases()
# docs/robustness.md: traced offsets of every kind, operands at odd addresses, non-finite input
# and extreme gates, forward and backward (run with XLA_PYTHON_CLIENT_ALLOCATOR=platform, so
# that an access outside a buffer is not hidden inside JAX's pool).
import test_robust_cuda  # noqa: E402

for offsets in test_robust_cuda.BAD_OFFSETS:
    x, dtypes, static, do, _ = test_cuda_bwd.make_case(rng, T=64, H=2, gate_mode=2, seqlens=[64])
    n = len(offsets) - 1
    x["h0"] = 0.3 * rng.standard_normal((n, 2, 128, 128))
    f, args = test_robust_cuda._call(x, dtypes, static, None)
    jax.block_until_ready(f(args, jnp.asarray(offsets, jnp.int32), jnp.asarray(do, jnp.float32),
                            jnp.asarray(rng.standard_normal(x["h0"].shape), jnp.float32)))
for value in (np.nan, np.inf, -np.inf, -1e7):
    x, dtypes, static, do, dht = test_cuda_bwd.make_case(rng, T=45, H=2, gate_mode=0)
    for name in ("g", "v", "k"):
        x[name][0, 21, 1, 5] = value
    test_cuda_bwd.cuda_grads(x, dtypes, static, do, dht)
for offset in (1, 2):
    test_robust_cuda.test_unaligned_operands(rng, offset)
decode_cases()
print("sanitize cases done")

# The sequence split (docs/sequence_split.md), empty segments included: the CUDA split forward
# (its transition recurrence, combine and gather), then the split around the plain calls.
split_cases()
