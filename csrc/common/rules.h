// Numbers that every target applies the same way (docs/robustness.md, docs/math.md): plain
// constants, no CUDA, XLA or Python, so the CUDA kernels, the C++ target and the handlers include
// them alike. jax_flashkda/preprocess.py holds the same values for the pure-JAX paths.
#pragma once

namespace kda_rules {

// A log-decay below this (after the gate activation) is raised to it: exp(-128) is 0 in fp32,
// so -1000, -1e7 and -inf decay exactly, and in-chunk running sums of the log-decay stay
// accurate. Applied as a select, so NaN stays NaN (and counts as non-finite input).
constexpr float kLogDecayFloor = -128.f;

// l2norm: x / sqrt(|x|^2 + kL2NormEps).
constexpr float kL2NormEps = 1e-6f;

// log2(e), rounded to float: e^x is computed as exp2(x·kLog2e) where the kernels take exp2.
constexpr float kLog2e = 1.4426950408889634f;

}  // namespace kda_rules
