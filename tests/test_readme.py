"""The README's runnable examples run as written.

Every ```python block of README.md on the line after a `<!-- runnable -->` marker runs in a
fresh process on the CPU with two host devices (the sharding examples split over two), from a
neutral working directory, importing the same jax_flashkda as these tests (the installed
package in CI). The examples end by checking their own results, so a wrong answer fails too.
"""

import os
import pathlib
import re
import subprocess
import sys

import pytest

import jax_flashkda

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"
PACKAGE_PARENT = os.path.dirname(os.path.dirname(os.path.abspath(jax_flashkda.__file__)))
_BLOCK = re.compile(r"^<!-- runnable -->\n```python\n(.*?)^```$", re.S | re.M)
_HEADING = re.compile(r"^#+ (.+)$", re.M)


def runnable_blocks():
    """(name, code) per marked block; the name is the heading above it and a counter."""
    text = README.read_text()
    blocks = []
    for i, match in enumerate(_BLOCK.finditer(text)):
        headings = _HEADING.findall(text, 0, match.start())
        section = re.sub(r"\W+", "_", headings[-1]).strip("_").lower() if headings else "top"
        blocks.append((f"{i}_{section}", match.group(1)))
    return blocks


BLOCKS = runnable_blocks()


def test_readme_marks_the_sharding_examples_runnable():
    code = "\n".join(code for _, code in BLOCKS)
    assert "jax.shard_map" in code and "kda_sequence_sharded" in code


@pytest.mark.parametrize("code", [c for _, c in BLOCKS], ids=[n for n, _ in BLOCKS])
def test_readme_example_runs(code, tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_force_host_platform_device_count=2",
               PYTHONPATH=os.pathsep.join(
                   p for p in (PACKAGE_PARENT, os.environ.get("PYTHONPATH")) if p))
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
