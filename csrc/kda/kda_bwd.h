// Launch API of the Hopper KDA backward. Plain C++ over raw device pointers: no XLA, no Python.
#pragma once

#include <cstddef>

#include <cuda_runtime.h>

#include "kda/kda_fwd.h"

namespace kda {

// The forward's operands and attributes (its `o` and `final_state` are unused), plus the
// cotangents and the gradients of docs/ffi_contract.md.
struct BwdParams : FwdParams {
  const void* dout = nullptr;  // [B,T,H,V], qkv_dtype
  const float* dfinal_state = nullptr;  // like initial_state
  void* dq = nullptr;  // [B,T,H,K], qkv_dtype
  void* dk = nullptr;  // [B,T,H,K], qkv_dtype
  void* dv = nullptr;  // [B,T,H,V], qkv_dtype
  void* dg = nullptr;  // [B,T,H,K], g_dtype
  void* dbeta = nullptr;  // [B,T,H], beta_dtype
  float* dA_log = nullptr;  // [B,H]
  float* ddt_bias = nullptr;  // [B,H,K]
  float* dinitial_state = nullptr;  // like initial_state
};

// nullptr when the shapes/dtypes are supported, else a static message saying why not.
const char* bwd_unsupported(const BwdParams& p);

// Device bytes the backward needs as scratch (16-byte aligned start suffices).
size_t bwd_workspace_bytes(const BwdParams& p);

// Enqueues the backward on `stream`; no allocation, no synchronisation.
cudaError_t bwd(const BwdParams& p, void* workspace, cudaStream_t stream);

// The sequence split's backward (docs/sequence_split.md), on the segments as packed sequences:
// p is the segment view (is_varlen, keys first; S = p.N segments; initial_state the segments'
// incoming states; dinitial_state [S,H,K,V] their gradients; dfinal_state unused). One
// preparation serves two passes: the state-gradient chains from zero end cotangents give each
// segment's dZ; a walk of each sequence's segments from its last, X = P_jᵀ X + dZ_j, gives every
// segment's true end cotangent; the backward proper runs from those.
struct SplitBwdOperands {
  const float* transitions_t = nullptr;  // [S,H,K,K]: P_jᵀ, its non-finite entries zeroed
  const float* dfinal = nullptr;         // [sequences,H,K,V]: each sequence's end cotangent
  const int32_t* first = nullptr;        // [sequences]: a sequence's first segment
  const int32_t* last = nullptr;         // [sequences]: and its last
  int sequences = 0;
};
size_t bwd_split_workspace_bytes(const BwdParams& p);
cudaError_t bwd_split(const BwdParams& p, const SplitBwdOperands& split, void* workspace,
                      cudaStream_t stream);

}  // namespace kda
