"""Small forward calls for compute-sanitizer: every kernel instantiation family once."""

import os
import sys

import numpy as np

import jax

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
from test_cuda_fwd import make_case, cuda_fwd  # noqa: E402

rng = np.random.default_rng(0)
for warps, kw in [("1", dict(gate_mode=2)), ("4", dict(gate_mode=0, extreme=True)),
                  ("2", dict(gate_mode=1, seqlens=[0, 19, 33], tail=5)),
                  ("8", dict(gate_mode=2, K=64, V=128)), ("1", dict(gate_mode=2, T=1))]:
    os.environ["JAX_FLASHKDA_FWD_WARPS"] = warps
    arrays, attrs = make_case(rng, H=2, **kw)
    jax.block_until_ready(cuda_fwd(*arrays, **attrs))
print("sanitize cases done")
