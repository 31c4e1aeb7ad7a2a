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

// The initial-state gradient alone (dinitial_state; dq .. ddt_bias are not touched): the sequence
// split's first backward pass (docs/sequence_split.md). Supported where bwd is.
size_t bwd_state_workspace_bytes(const BwdParams& p);
cudaError_t bwd_state(const BwdParams& p, void* workspace, cudaStream_t stream);

}  // namespace kda
