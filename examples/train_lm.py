"""Train a small Kimi-Delta-Attention language model on a synthetic order-2 Markov chain.

    python examples/train_lm.py [--steps 300] [--batch 16] [--seq-len 128] [--hidden 128]
                                [--layers 2] [--heads 2] [--impl auto] [--seed 0]
                                [--mesh data=2,model=1] [--report rows.json]

Runs on whatever JAX backend is present. The loss starts near log(vocab) and falls towards the
chain's entropy (the loss of a perfect model, printed as "oracle").
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import sys
import time

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P
from tqdm import tqdm

import jax_flashkda
from jax_flashkda.nn import place_params

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from kda_lm import LM, make_optimizer, markov_chain, oracle_loss, sample_batch, train_step  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--hidden", type=int, default=None,
                   help="model width; default 256 (head_dim 128, what the CUDA kernels take) where "
                        "the kernels can run, else 128")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=2)
    p.add_argument("--vocab", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--impl", default="auto", choices=["auto", "cuda", "ffi", "chunked", "recurrent"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="compute dtype; auto: bfloat16 where the CUDA kernels can run, else float32")
    p.add_argument("--mesh", default=None,
                   help="device mesh as axis=size pairs over the axes 'data' (batch) and 'model' "
                        "(heads), e.g. data=2 or data=1,model=2; default: one device")
    p.add_argument("--report", default=None,
                   help="append a row {gpus, mesh, tokens_per_s (per device), tokens_per_step, gpu, date} to this json")
    return p.parse_args(argv)


def make_mesh(spec: str | None):
    """'data=2,model=1' -> a Mesh over the first data*model devices, or None."""
    if not spec:
        return None
    sizes = {}
    for part in spec.split(","):
        name, _, size = part.partition("=")
        if name not in ("data", "model") or not size.isdigit():
            raise SystemExit(f"--mesh: expected axis=size with axes data/model, got {part!r}")
        sizes[name] = int(size)
    shape = (sizes.get("data", 1), sizes.get("model", 1))
    if shape[0] * shape[1] > len(jax.devices()):
        raise SystemExit(f"--mesh {spec} needs {shape[0] * shape[1]} devices, have {len(jax.devices())}")
    # Auto axes: XLA propagates the shardings from the inputs and the layers' constraints.
    return jax.make_mesh(shape, ("data", "model"), axis_types=(jax.sharding.AxisType.Auto,) * 2)


def main(argv=None):
    args = parse_args(argv)
    kernels_ready = jax_flashkda.cuda_unavailable_reason() is None
    if args.hidden is None:
        args.hidden = 128 * args.heads if kernels_ready else 128
    dtype = {"auto": jnp.bfloat16 if kernels_ready else jnp.float32,
             "float32": jnp.float32, "bfloat16": jnp.bfloat16}[args.dtype]
    key = jax.random.key(args.seed)
    chain_key, data_key = jax.random.split(key)
    log_table = markov_chain(chain_key, args.vocab)
    mesh = make_mesh(args.mesh)
    if mesh is not None:
        jax.set_mesh(mesh)
        if args.batch % mesh.shape["data"] or args.heads % mesh.shape["model"]:
            raise SystemExit("--batch must divide by the data axis and --heads by the model axis")
    model = LM(
        args.vocab, args.hidden, args.layers, args.heads, dtype=dtype, impl=args.impl,
        shard_axes=None if mesh is None else ("data", "model"), rngs=nnx.Rngs(args.seed)
    )
    if mesh is not None:
        # Weights split over the model axis as the layers annotated them (replicated over data);
        # activations are split by batch and heads inside the layers.
        place_params(model, mesh)
    optimizer = make_optimizer(model, args.lr, args.steps)
    devices = 1 if mesh is None else mesh.size
    n_params = sum(p.size for p in jax.tree.leaves(nnx.state(model, nnx.Param)))
    head_dim = args.hidden // args.heads
    reason = jax_flashkda.cuda_unavailable_reason(dtype, head_dim, head_dim)
    path = "CUDA kernels" if reason is None else f"not the CUDA kernels ({reason})"
    print(
        f"backend={jax.default_backend()} devices={jax.devices()} params={n_params:,} "
        f"vocab={args.vocab} (log vocab {math.log(args.vocab):.3f}) dtype={jnp.dtype(dtype).name}\n"
        f"kda: {path}"
    )

    tokens_per_step = args.batch * (args.seq_len - 1)
    losses = []
    oracle = []
    timed_tokens, timed_seconds = 0, 0.0
    bar = tqdm(range(args.steps), desc="train", dynamic_ncols=True)
    for step in bar:
        tokens = sample_batch(jax.random.fold_in(data_key, step), log_table, args.batch, args.seq_len)
        if mesh is not None:
            tokens = jax.device_put(tokens, NamedSharding(mesh, P("data")))
        # The synthetic batch (a sequential scan over the sequence, on one device) is ready
        # before the timer starts: tokens/s measures the training step alone.
        tokens = jax.block_until_ready(tokens)
        start = time.perf_counter()
        loss = float(train_step(model, optimizer, tokens))
        elapsed = time.perf_counter() - start
        # The first steps compile (the second again once the optimizer state has its shardings).
        if step > 1:
            timed_tokens += tokens_per_step
            timed_seconds += elapsed
        losses.append(loss)
        oracle.append(float(oracle_loss(tokens, log_table)))
        bar.set_postfix(loss=f"{loss:.3f}")

    tail = max(1, min(20, args.steps // 10))
    first, last = losses[0], sum(losses[-tail:]) / tail
    floor = sum(oracle[-tail:]) / tail
    print(f"initial loss {first:.4f}  final loss {last:.4f} (mean of last {tail} steps)  oracle {floor:.4f}")
    if timed_seconds > 0:
        per_device = timed_tokens / timed_seconds / devices
        print(f"throughput {timed_tokens / timed_seconds:,.0f} tokens/s, {per_device:,.0f} per device "
              f"(training, excluding compile)")
        if args.report:
            rows = json.load(open(args.report)) if os.path.exists(args.report) else []
            rows.append(dict(gpus=devices, mesh=args.mesh or "single", tokens_per_s=round(per_device),
                             tokens_per_step=tokens_per_step, gpu=jax.devices()[0].device_kind,
                             date=datetime.date.today().isoformat()))
            with open(args.report, "w") as f:
                json.dump(rows, f, indent=1)
    if not last < first - 0.5:
        print("the loss fell by less than 0.5 nats: too few steps, or a broken op", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
