"""Small backward calls for compute-sanitizer: both gate paths, varlen, fp16 and T = 1."""

import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
import jax.numpy as jnp  # noqa: E402
from test_cuda_bwd import cuda_grads, make_case  # noqa: E402

rng = np.random.default_rng(0)
for kw in [dict(gate_mode=2, T=37), dict(gate_mode=0, extreme=True, T=40),
           dict(gate_mode=1, seqlens=[0, 19, 33, 0], v_first=True),
           dict(gate_mode=2, T=1, dtype=jnp.float16)]:
    x, dtypes, static, do, dht = make_case(rng, H=2, **kw)
    cuda_grads(x, dtypes, static, do, dht)
print("sanitize cases done")
