"""A small KDA language model, its synthetic data, its training step and its sampler.

Kept apart from ``train_lm.py`` so that tests (and other examples) can build and train it.
"""

from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jax_flashkda.nn import KDACache, KimiDeltaAttention


class SwiGLU(nnx.Module):
    """With a ``model_axis``, tensor parallel: gate and up split by column, down by row."""

    def __init__(self, hidden: int, ffn: int, *, dtype, model_axis=None, rngs: nnx.Rngs):
        linear = functools.partial(nnx.Linear, use_bias=False, dtype=dtype, rngs=rngs)
        init = nnx.initializers.lecun_normal()
        if model_axis is None:
            columns = rows = init
        else:
            columns = nnx.with_partitioning(init, (None, model_axis))
            rows = nnx.with_partitioning(init, (model_axis, None))
        self.gate = linear(hidden, ffn, kernel_init=columns)
        self.up = linear(hidden, ffn, kernel_init=columns)
        self.down = linear(ffn, hidden, kernel_init=rows)

    def __call__(self, x):
        return self.down(jax.nn.silu(self.gate(x)) * self.up(x))


class Block(nnx.Module):
    """Pre-norm residual block: KDA token mixer, then a SwiGLU MLP."""

    def __init__(self, hidden: int, heads: int, *, dtype, impl: str, shard_axes, rngs: nnx.Rngs):
        self.attn_norm = nnx.RMSNorm(hidden, dtype=dtype, rngs=rngs)
        self.attn = KimiDeltaAttention(hidden, heads, hidden // heads, dtype=dtype, impl=impl,
                                       shard_axes=shard_axes, rngs=rngs)
        self.mlp_norm = nnx.RMSNorm(hidden, dtype=dtype, rngs=rngs)
        self.mlp = SwiGLU(hidden, 4 * hidden, dtype=dtype,
                          model_axis=None if shard_axes is None else shard_axes[1], rngs=rngs)

    def __call__(self, x, cache=None, return_cache=None):
        h, cache = self.attn(self.attn_norm(x), cache=cache, return_cache=return_cache)
        x = x + h
        return x + self.mlp(self.mlp_norm(x)), cache


class LM(nnx.Module):
    """Token embedding, ``layers`` KDA blocks, final RMSNorm and an (optionally tied) head."""

    def __init__(
        self,
        vocab: int,
        hidden: int,
        layers: int,
        heads: int,
        *,
        tie_embeddings: bool = True,
        dtype=jnp.float32,
        impl: str = "auto",
        shard_axes: tuple[str | None, str | None] | None = None,
        rngs: nnx.Rngs,
    ):
        if hidden % heads:
            raise ValueError(f"hidden ({hidden}) must be a multiple of heads ({heads})")
        self.embed = nnx.Embed(vocab, hidden, dtype=dtype, rngs=rngs)
        self.blocks = nnx.List(
            [Block(hidden, heads, dtype=dtype, impl=impl, shard_axes=shard_axes, rngs=rngs)
             for _ in range(layers)]
        )
        self.norm = nnx.RMSNorm(hidden, dtype=dtype, rngs=rngs)
        self.head = (None if tie_embeddings else
                     nnx.Linear(hidden, vocab, use_bias=False, dtype=dtype, rngs=rngs))

    def __call__(
        self, tokens, caches: list[KDACache] | None = None, return_cache: bool | None = None
    ):
        """``tokens`` ``[B, T]`` -> float32 logits ``[B, T, vocab]`` and the per-layer caches."""
        x = self.embed(tokens)
        new_caches = []
        for i, block in enumerate(self.blocks):
            x, cache = block(x, None if caches is None else caches[i], return_cache)
            new_caches.append(cache)
        x = self.norm(x)
        logits = self.embed.attend(x) if self.head is None else self.head(x)
        return logits.astype(jnp.float32), new_caches


def markov_chain(key, vocab: int, sharpness: float = 2.0):
    """Log transition table ``[vocab, vocab, vocab]`` of a random order-2 Markov chain.

    The next-token logits are the sum of a random score from the previous token and one from
    the token before it. A chain with independent random rows per two-token context would look
    uniform to any model that sees only one token back, and gives no gradient to start from;
    this one rewards each token of context on its own and both together most (conditional
    entropy about 1.8 nats at ``vocab=64``, against 3.0 from one token and 4.16 from none).
    """
    k_prev, k_prev2 = jax.random.split(key)
    prev = sharpness * jax.random.normal(k_prev, (vocab, vocab))
    prev2 = sharpness * jax.random.normal(k_prev2, (vocab, vocab))
    return jax.nn.log_softmax(prev2[:, None, :] + prev[None, :, :], axis=-1)


@functools.partial(jax.jit, static_argnames=("batch", "seq_len"))
def sample_batch(key, log_table, batch: int, seq_len: int):
    """Sequences ``[batch, seq_len]`` from the chain, starting from two uniform tokens."""
    vocab = log_table.shape[0]
    k0, k1 = jax.random.split(key)
    first = jax.random.randint(k0, (2, batch), 0, vocab)

    def step(ctx, k):
        nxt = jax.random.categorical(k, log_table[ctx[0], ctx[1]])
        return (ctx[1], nxt), nxt

    _, rest = jax.lax.scan(step, (first[0], first[1]), jax.random.split(k1, seq_len - 2))
    return jnp.concatenate([first, rest], axis=0).T


def oracle_loss(tokens, log_table):
    """Mean next-token loss of the true chain on ``tokens``: the loss a perfect model reaches."""
    vocab = log_table.shape[0]
    nll = -log_table[tokens[:, :-2], tokens[:, 1:-1], tokens[:, 2:]]
    # The second token follows the first uniformly; the chain only starts after two tokens.
    total = nll.sum() + tokens.shape[0] * jnp.log(vocab)
    return total / (tokens.shape[0] * (tokens.shape[1] - 1))


def loss_fn(model: LM, tokens):
    logits, _ = model(tokens[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()


def make_optimizer(model: LM, lr: float, steps: int, weight_decay: float = 0.1):
    """AdamW with warmup and cosine decay; vectors (norms, biases, A_log, dt_bias) get no decay."""
    warmup = max(1, min(50, steps // 10))
    schedule = optax.warmup_cosine_decay_schedule(0.0, lr, warmup, max(steps, warmup + 1), lr * 0.1)
    tx = optax.chain(
        optax.clip_by_global_norm(1.0),
        optax.adamw(
            schedule,
            b2=0.95,
            weight_decay=weight_decay,
            mask=lambda params: jax.tree.map(lambda p: p.ndim > 1, params),
        ),
    )
    return nnx.Optimizer(model, tx, wrt=nnx.Param)


@nnx.jit
def train_step(model: LM, optimizer: nnx.Optimizer, tokens):
    loss, grads = nnx.value_and_grad(loss_fn)(model, tokens)
    optimizer.update(model, grads)
    return loss


# ---------------------------------------------------------------------------------------
# Generation: prefill the prompt, then one token per step with every layer's cache donated
# to the jitted step, so that XLA updates the caches in place.

def init_caches(model: LM, batch: int) -> list[KDACache]:
    """Empty-history caches of every layer for ``batch`` sequences."""
    return [block.attn.init_cache(batch) for block in model.blocks]


def _sample(logits, key, temperature: float):
    if temperature == 0:
        return jnp.argmax(logits, axis=-1)
    return jax.random.categorical(key, logits / temperature, axis=-1)


@functools.partial(nnx.jit, static_argnames="temperature")
def prefill(model: LM, prompt, key, temperature: float):
    """The prompt ``[B, P]`` in one call: the first sampled token ``[B]`` and the caches."""
    logits, caches = model(prompt, return_cache=True)
    return _sample(logits[:, -1], key, temperature), caches


@functools.partial(nnx.jit, donate_argnums=1, static_argnames="temperature")
def decode_step(model: LM, caches, token, key, temperature: float):
    """One token ``[B]`` in, the next ``[B]`` out; ``caches`` is donated (use the returned
    ones)."""
    logits, caches = model(token[:, None], caches)
    return _sample(logits[:, -1], key, temperature), caches


def generate(model: LM, prompt, num_tokens: int, key, temperature: float = 1.0):
    """Samples ``num_tokens`` tokens after ``prompt`` ``[B, P]``, one decoding step at a time.

    ``temperature=0`` is greedy. Returns the tokens ``[B, num_tokens]`` and the seconds the
    ``num_tokens - 1`` decoding steps took (after one untimed step on a copy of the caches,
    which compiles it).
    """
    keys = jax.random.split(key, num_tokens)
    token, caches = prefill(model, prompt, keys[0], temperature)
    tokens = [token]
    if num_tokens > 1:
        warm = jax.tree.map(jnp.copy, caches)
        jax.block_until_ready(decode_step(model, warm, token, keys[0], temperature))
    start = time.perf_counter()
    for i in range(1, num_tokens):
        token, caches = decode_step(model, caches, token, keys[i], temperature)
        tokens.append(token)
    tokens = jax.block_until_ready(jnp.stack(tokens, axis=1))
    return tokens, time.perf_counter() - start


def chain_nll(tokens, log_table, start: int):
    """Mean negative log-likelihood under the chain of ``tokens[:, start:]`` (``start >= 2``):
    how plausible sampled continuations are (a perfect model's samples: about the chain's
    entropy; uniform tokens: log(vocab))."""
    nll = -log_table[tokens[:, start - 2:-2], tokens[:, start - 1:-1], tokens[:, start:]]
    return nll.mean()
