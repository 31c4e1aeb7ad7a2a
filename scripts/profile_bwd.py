"""One forward+backward at a benchmark shape, for ncu: python scripts/profile_bwd.py big|long"""

import sys

import jax

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from bench_cuda_bwd import SHAPES, fwd_bwd, inputs  # noqa: E402

args, do = inputs(*SHAPES[sys.argv[1]])
jax.block_until_ready(jax.jit(fwd_bwd)(args, do))
