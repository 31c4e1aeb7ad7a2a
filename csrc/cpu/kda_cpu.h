// Kimi Delta Attention on the CPU: the token recurrence of docs/math.md §1, forward and backward.
// Plain C++ (no XLA types) so the FFI handlers are the only code that knows about XLA.
// Out-of-spec input follows docs/robustness.md: offsets are made legal, log-decays are floored
// at kda_rules::kLogDecayFloor, and non-finite input is quarantined causally: per sequence and
// head for q, k, g and beta, per sequence, head and value column for v (the state's columns
// evolve independently). No values, however wild, make the kernels read or write outside their
// buffers.
#pragma once

#include <cstdint>

#include "common/attributes.h"

namespace jax_flashkda::cpu {

// A tensor the kernels read or write in its own dtype; all math happens in fp32.
struct Tensor {
  void* data;
  DType dtype;
};

struct KdaShape {
  int64_t B, T, H, K, V;
  int64_t N;  // sequences: B, or len(cu_seqlens) - 1 when varlen
};

// The operands shared by forward and backward (contract operands 0-8).
struct KdaInputs {
  Tensor q, k, v, g, beta;
  const float* A_log;          // [H]
  const float* dt_bias;        // [H, K]
  const float* initial_state;  // [N, H, K, V] or [N, H, V, K]
  const int32_t* cu_seqlens;   // [N + 1], read only when is_varlen; any values (§1)
};

struct KdaFwdOutputs {
  Tensor o;            // [B, T, H, V]
  float* final_state;  // same layout as initial_state
};

struct KdaBwdOutputs {
  Tensor dq, dk, dv, dg, dbeta;
  float* dA_log;           // [B, H], per batch row
  float* ddt_bias;         // [B, H, K], per batch row
  float* dinitial_state;   // same layout as initial_state
};

void kda_forward(const KdaShape& shape, const Attributes& params, const KdaInputs& in,
                 const KdaFwdOutputs& out);

// do_ is [B, T, H, V]; dfinal_state has the state layout.
void kda_backward(const KdaShape& shape, const Attributes& params, const KdaInputs& in,
                  Tensor do_, const float* dfinal_state, const KdaBwdOutputs& out);

}  // namespace jax_flashkda::cpu
