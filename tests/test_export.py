"""`jax.export` round trips of a small Flax model built on `kda`.

A jitted KimiDeltaAttention layer (and the gradient of a loss through it) is exported,
serialized, deserialized and called; the result must equal the direct jitted call. The pure-JAX
path exports with no custom calls. The compiled paths (the C++ CPU target, the CUDA kernels)
lower to the custom calls `jax_flashkda_fwd` / `jax_flashkda_bwd`, which are not on JAX's list
of custom calls with compatibility guarantees, so `jax.export.export` refuses them unless the
caller names them in `disabled_checks` (what these tests do, and what a user has to do). The
process that calls a deserialized module must have the targets registered: `_ffi.py` does that
at `import jax_flashkda`, so importing the package is enough.
"""

import os
import re
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jax_flashkda
from jax_flashkda import kda
from jax_flashkda.nn import KimiDeltaAttention
from jax_flashkda.ops import _cpu_target_ready

pytest.importorskip("flatbuffers", reason="Exported.serialize needs the flatbuffers package")

FWD, BWD = "jax_flashkda_fwd", "jax_flashkda_bwd"
# What a user passes to export a function that runs the compiled targets.
DISABLED = [jax.export.DisabledSafetyCheck.custom_call(FWD),
            jax.export.DisabledSafetyCheck.custom_call(BWD)]
# The fresh process imports the same jax_flashkda as this one (the installed package in CI, the
# source tree with its in-place modules on a developer's machine).
PACKAGE_PARENT = os.path.dirname(os.path.dirname(os.path.abspath(jax_flashkda.__file__)))

needs_cpu_target = pytest.mark.skipif(
    jax.default_backend() != "cpu" or not _cpu_target_ready(),
    reason="the C++ CPU target (jax_flashkda._kda_cpu) is not built, or the backend is not CPU")


def custom_call_targets(exported) -> set[str]:
    return set(re.findall(r"custom_call @([\w.]+)", exported.mlir_module()))


def make_model(impl, hidden, heads, head_dim, dtype=jnp.float32, seed=0):
    """A KimiDeltaAttention layer as (forward(params, x), params): params is a flat list of
    arrays (nnx's Variable types have no export serialization), the graph is closed over."""
    layer = KimiDeltaAttention(hidden, heads, head_dim, dtype=dtype, impl=impl,
                               rngs=nnx.Rngs(seed))
    graphdef, state = nnx.split(layer)
    params, treedef = jax.tree.flatten(state)
    # Perturb every parameter so that a wrong wiring cannot hide behind a symmetric init.
    keys = jax.random.split(jax.random.key(seed + 100), len(params))
    params = [p + (0.1 * jax.random.normal(k, p.shape, jnp.float32)).astype(p.dtype)
              for p, k in zip(params, keys)]

    def forward(params, x):
        y, _ = nnx.merge(graphdef, jax.tree.unflatten(treedef, params))(x)
        return y

    return forward, params


def loss_grad(forward):
    def loss(params, x):
        return jnp.sum(forward(params, x).astype(jnp.float32) ** 2)

    return jax.jit(jax.grad(loss, argnums=(0, 1)))


def round_trip(fn, *args, **export_kwargs):
    """export -> serialize -> deserialize; returns (exported, restored)."""
    exported = jax.export.export(fn, **export_kwargs)(*args)
    restored = jax.export.deserialize(exported.serialize())
    return exported, restored


def assert_same(actual, expected, tol=0.0):
    actual, expected = jax.tree.leaves(actual), jax.tree.leaves(expected)
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        a = np.asarray(a.astype(jnp.float32) if a.dtype == jnp.bfloat16 else a)
        e = np.asarray(e.astype(jnp.float32) if e.dtype == jnp.bfloat16 else e)
        assert a.shape == e.shape and np.all(np.isfinite(e))
        err = np.abs(a - e).max() / max(np.abs(e).max(), 1e-6)
        assert err <= tol, f"max error {err:.3e} (relative to max |expected|)"


CPU_SIZES = dict(hidden=64, heads=2, head_dim=32)


def inputs(hidden, b=2, t=20, dtype=jnp.float32):
    return jax.random.normal(jax.random.key(1), (b, t, hidden), jnp.float32).astype(dtype)


# ---------------------------------------------------------------------------------------
# Forward.

def test_pure_jax_forward_round_trip():
    forward, params = make_model("chunked", **CPU_SIZES)
    x = inputs(CPU_SIZES["hidden"])
    f = jax.jit(forward)
    exported, restored = round_trip(f, params, x)
    assert custom_call_targets(exported) == set()
    assert_same(restored.call(params, x), f(params, x))


@needs_cpu_target
@pytest.mark.parametrize("impl", ["ffi", "auto"])
def test_cpu_target_forward_round_trip(impl):
    forward, params = make_model(impl, **CPU_SIZES)
    x = inputs(CPU_SIZES["hidden"])
    f = jax.jit(forward)
    exported, restored = round_trip(f, params, x, disabled_checks=DISABLED)
    # The stable target name is what the module records (no custom_partitioning callback on
    # one device), so a later process with the extension loaded finds its handler.
    assert custom_call_targets(exported) == {FWD}
    assert exported.platforms == ("cpu",)
    assert_same(restored.call(params, x), f(params, x))


@needs_cpu_target
def test_cpu_target_export_needs_disabled_check():
    """Without `disabled_checks` jax.export refuses the targets (not on JAX's allow-list)."""
    forward, params = make_model("ffi", **CPU_SIZES)
    with pytest.raises(ValueError, match="custom calls whose targets have no compatibility"):
        jax.export.export(jax.jit(forward))(params, inputs(CPU_SIZES["hidden"]))


# ---------------------------------------------------------------------------------------
# Gradients: the exported function is the jitted gradient itself (custom_vjp included), or the
# forward exported with its VJP (`serialize(vjp_order=1)`) and differentiated after loading.

def test_pure_jax_grad_round_trip():
    # The token-by-token pure path: the chunked path's gradient takes ~8 s per compile on 2
    # cores, and this compiles it twice; neither pure path has a custom_vjp.
    forward, params = make_model("recurrent", **CPU_SIZES)
    x = inputs(CPU_SIZES["hidden"])
    grad = loss_grad(forward)
    exported, restored = round_trip(grad, params, x)
    assert custom_call_targets(exported) == set()
    assert_same(restored.call(params, x), grad(params, x))


@needs_cpu_target
def test_cpu_target_grad_round_trip():
    forward, params = make_model("ffi", **CPU_SIZES)
    x = inputs(CPU_SIZES["hidden"])
    grad = loss_grad(forward)
    exported, restored = round_trip(grad, params, x, disabled_checks=DISABLED)
    assert custom_call_targets(exported) == {FWD, BWD}
    assert_same(restored.call(params, x), grad(params, x))


@needs_cpu_target
def test_exported_vjp():
    """The custom_vjp's backward (the bwd target) travels with the forward when asked for."""
    forward, params = make_model("ffi", **CPU_SIZES)
    x = inputs(CPU_SIZES["hidden"])
    exported = jax.export.export(jax.jit(forward), disabled_checks=DISABLED)(params, x)
    restored = jax.export.deserialize(exported.serialize(vjp_order=1))

    def loss(call):
        return lambda p, x: jnp.sum(call(p, x) ** 2)

    assert custom_call_targets(restored) == {FWD}
    assert restored.has_vjp() and BWD in custom_call_targets(restored.vjp())
    # The loaded VJP is a separately compiled module: equal to rounding, not bitwise.
    assert_same(jax.grad(loss(restored.call), argnums=(0, 1))(params, x),
                loss_grad(forward)(params, x), tol=1e-5)


# ---------------------------------------------------------------------------------------
# A fresh process: what a user who loads a serialized module has to do.

_LOADER = textwrap.dedent("""
    import sys
    import jax, jax.numpy as jnp, numpy as np
    import jax_flashkda
    exported = jax.export.deserialize(bytearray(open(sys.argv[1], "rb").read()))
    args = [jnp.asarray(a) for a in np.load(sys.argv[2]).values()]
    try:
        exported.call(*args)
        print("PLAIN_IMPORT_OK")
    except Exception as e:
        print("PLAIN_IMPORT_FAILED", type(e).__name__, str(e).splitlines()[0])
    # Any kda call that considers the compiled targets registers them (tracing is enough).
    jax.eval_shape(lambda *a: jax_flashkda.kda(*a, impl="ffi"), *args)
    np.save(sys.argv[3], np.asarray(exported.call(*args)[0]))
""")


def _kda_args(rng):
    shape = (1, 12, 2, 32)
    q, k, v = (jnp.asarray(rng.normal(size=shape), jnp.float32) for _ in range(3))
    g = jnp.asarray(-np.abs(rng.normal(size=shape)) * 0.3, jnp.float32)
    beta = jnp.asarray(rng.uniform(0.1, 0.9, size=shape[:3]), jnp.float32)
    return q, k, v, g, beta


@pytest.fixture(scope="module")
def fresh_process(tmp_path_factory):
    if jax.default_backend() != "cpu" or not _cpu_target_ready():
        pytest.skip("the C++ CPU target is not built, or the backend is not CPU")
    tmp = tmp_path_factory.mktemp("export")
    args = _kda_args(np.random.default_rng(0))

    def f(q, k, v, g, beta):
        return kda(q, k, v, g, beta, output_final_state=True, use_qk_l2norm_in_kernel=True,
                   impl="ffi")

    f = jax.jit(f)
    exported = jax.export.export(f, disabled_checks=DISABLED)(*args)
    (tmp / "kda.bin").write_bytes(exported.serialize())
    np.savez(tmp / "args.npz", *[np.asarray(a) for a in args])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        p for p in (PACKAGE_PARENT, os.environ.get("PYTHONPATH")) if p))
    proc = subprocess.run(
        [sys.executable, "-c", _LOADER, str(tmp / "kda.bin"), str(tmp / "args.npz"),
         str(tmp / "o.npy")], capture_output=True, text=True, env=env, timeout=120,
        cwd=tmp)  # `python -c` puts its working directory first on sys.path
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout, np.load(tmp / "o.npy"), np.asarray(f(*args)[0])


def test_fresh_process_round_trip(fresh_process):
    _, loaded, direct = fresh_process
    assert_same(loaded, direct)


def test_fresh_process_import_is_enough(fresh_process):
    """Importing the package registers its FFI targets, so a deserialized module runs."""
    stdout, _, _ = fresh_process
    assert "PLAIN_IMPORT_OK" in stdout, stdout


# ---------------------------------------------------------------------------------------
# Sharded export: custom_partitioning lowers with a Python callback, which cannot be serialized.

@needs_cpu_target
def test_sharded_export_of_compiled_target_is_refused():
    if jax.device_count() < 2:
        pytest.skip("needs two devices")
    mesh = jax.make_mesh((2,), ("h",), axis_types=(jax.sharding.AxisType.Auto,))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, None, "h"))
    shapes = [jax.ShapeDtypeStruct((1, 8, 2, 32), jnp.float32, sharding=sharding)] * 4
    shapes.append(jax.ShapeDtypeStruct((1, 8, 2), jnp.float32, sharding=sharding))

    def f(q, k, v, g, beta):
        return kda(q, k, v, g, beta, impl="ffi")[0]

    with pytest.raises(NotImplementedError, match="host_callbacks"):
        jax.export.export(jax.jit(f), disabled_checks=DISABLED)(*shapes)


def test_sharded_export_of_pure_jax_path():
    if jax.device_count() < 2:
        pytest.skip("needs two devices")
    mesh = jax.make_mesh((2,), ("h",), axis_types=(jax.sharding.AxisType.Auto,))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, None, "h"))
    args = [jax.device_put(a, sharding) for a in _kda_args(np.random.default_rng(1))]

    def f(q, k, v, g, beta):
        return kda(q, k, v, g, beta, impl="recurrent")[0]

    f = jax.jit(f)
    exported, restored = round_trip(f, *args)
    assert exported.nr_devices == 2
    assert_same(restored.call(*args), f(*args))


# ---------------------------------------------------------------------------------------
# GPU: the same round trips through the CUDA kernels (K = V = 128, bfloat16).

GPU_SIZES = dict(hidden=128, heads=2, head_dim=128)


@pytest.mark.gpu
def test_cuda_forward_and_grad_round_trip():
    forward, params = make_model("cuda", dtype=jnp.bfloat16, **GPU_SIZES)
    x = inputs(GPU_SIZES["hidden"], b=2, t=40, dtype=jnp.bfloat16)
    f = jax.jit(forward)
    exported, restored = round_trip(f, params, x, disabled_checks=DISABLED)
    assert custom_call_targets(exported) == {FWD}
    assert exported.platforms == ("cuda",)
    assert_same(restored.call(params, x), f(params, x))

    grad = loss_grad(forward)
    exported, restored = round_trip(grad, params, x, disabled_checks=DISABLED)
    assert custom_call_targets(exported) == {FWD, BWD}
    assert_same(restored.call(params, x), grad(params, x))
