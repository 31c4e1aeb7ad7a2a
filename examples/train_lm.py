"""Train a small Kimi-Delta-Attention language model on a synthetic order-2 Markov chain.

    python examples/train_lm.py [--steps 300] [--batch 16] [--seq-len 128] [--hidden 128]
                                [--layers 2] [--heads 2] [--impl auto] [--seed 0]
                                [--mesh data=2,model=1] [--report rows.json]
                                [--generate N] [--prompt-len 16] [--temperature 1.0]

Runs on whatever JAX backend is present. The loss starts near log(vocab) and falls towards the
chain's entropy (the loss of a perfect model, printed as "oracle").

With --generate N the trained model then samples N tokens after --batch prompts drawn from
the chain: the prompts in one call (prefill), then one token per jitted step with each
layer's cache donated (updated in place); it prints the decoding tokens/s and how likely the
samples are under the chain. --steps 0 samples from the untrained model.
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
from kda_lm import (LM, chain_nll, generate, make_optimizer, markov_chain, oracle_loss,  # noqa: E402
                    sample_batch, train_step)


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
    p.add_argument("--generate", type=int, default=0, metavar="N",
                   help="after training, sample N tokens per prompt with the cache and report tokens/s")
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--temperature", type=float, default=1.0, help="0: greedy")
    args = p.parse_args(argv)
    if args.generate and args.prompt_len < 2:
        p.error("--prompt-len must be at least 2 (the chain starts after two tokens)")
    return args


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
            timed_tokens += tokens_per_step(args)
            timed_seconds += elapsed
        losses.append(loss)
        oracle.append(float(oracle_loss(tokens, log_table)))
        bar.set_postfix(loss=f"{loss:.3f}")

    ok = True
    if args.steps > 0:
        ok = report_training(args, losses, oracle, timed_tokens, timed_seconds, devices)
    else:
        print("--steps 0: no training")
    if args.generate:
        prompts = sample_batch(jax.random.fold_in(data_key, args.steps), log_table, args.batch,
                               args.prompt_len)
        if mesh is not None:
            prompts = jax.device_put(prompts, NamedSharding(mesh, P("data")))
        tokens, seconds = generate(model, prompts, args.generate, jax.random.fold_in(key, 1),
                                   args.temperature)
        full = jnp.concatenate([prompts, tokens], axis=1)
        print(f"generated {args.batch} x {args.generate} tokens after {args.prompt_len}-token "
              f"prompts (temperature {args.temperature}); first: {tokens[0].tolist()}")
        if args.generate > 1:
            rate = args.batch * (args.generate - 1) / seconds
            print(f"decoding {rate:,.0f} tokens/s ({1e3 * seconds / (args.generate - 1):.2f} "
                  f"ms per step of {args.batch} tokens, excluding compile)")
        print(f"samples' loss under the chain {float(chain_nll(full, log_table, args.prompt_len)):.4f} "
              f"nats/token (uniform {math.log(args.vocab):.3f})")
    return 0 if ok else 1


def report_training(args, losses, oracle, timed_tokens, timed_seconds, devices) -> bool:
    """Prints the loss and throughput; False when the loss did not fall enough."""
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
                             tokens_per_step=tokens_per_step(args), gpu=jax.devices()[0].device_kind,
                             date=datetime.date.today().isoformat()))
            with open(args.report, "w") as f:
                json.dump(rows, f, indent=1)
    if not last < first - 0.5:
        print("the loss fell by less than 0.5 nats: too few steps, or a broken op", file=sys.stderr)
        return False
    return True


def tokens_per_step(args) -> int:
    return args.batch * (args.seq_len - 1)


if __name__ == "__main__":
    sys.exit(main())
