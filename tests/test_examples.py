"""The example language model's generation mode (examples/kda_lm.py, examples/train_lm.py
--generate), at tiny sizes on CPU."""

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, os.path.join(os.path.dirname(__file__), os.pardir, "examples"))
import kda_lm as lm  # noqa: E402
import train_lm  # noqa: E402


def test_greedy_generation_matches_the_full_forward():
    """Prefill then donated one-token steps pick, at every position, the token the forward
    over the whole sequence ranks first."""
    model = lm.LM(16, hidden=32, layers=2, heads=2, rngs=nnx.Rngs(0))
    prompt = jax.random.randint(jax.random.key(1), (2, 5), 0, 16)
    tokens, _ = lm.generate(model, prompt, 4, jax.random.key(2), temperature=0)
    assert tokens.shape == (2, 4)
    logits, _ = model(jnp.concatenate([prompt, tokens[:, :-1]], axis=1))
    picked = jnp.take_along_axis(logits[:, 4:], tokens[..., None], axis=-1)[..., 0]
    np.testing.assert_allclose(np.asarray(picked), np.asarray(logits[:, 4:].max(-1)),
                               rtol=1e-5, atol=1e-5)


def test_train_lm_generate(capsys):
    rc = train_lm.main(["--steps", "0", "--batch", "2", "--hidden", "32", "--layers", "1",
                        "--heads", "2", "--vocab", "16", "--generate", "4", "--prompt-len", "3"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "generated 2 x 4 tokens" in out and "tokens/s" in out, out
