// Launch API of the Hopper KDA forward. Plain C++ over raw device pointers: no XLA, no Python.
#pragma once

#include <cstddef>
#include <cstdint>

#include <cuda_runtime.h>

#include "common/attributes.h"

namespace kda {

using jax_flashkda::Attributes;
using jax_flashkda::DType;
using jax_flashkda::GateMode;
using jax_flashkda::valid_gate_mode;

struct FwdParams {
  // Operands, laid out as in docs/ffi_contract.md.
  const void* q = nullptr;  // [B,T,H,K], qkv_dtype
  const void* k = nullptr;  // [B,T,H,K], qkv_dtype
  const void* v = nullptr;  // [B,T,H,V], qkv_dtype
  const void* g = nullptr;  // [B,T,H,K], g_dtype
  const void* beta = nullptr;  // [B,T,H], beta_dtype
  const float* A_log = nullptr;  // [H]
  const float* dt_bias = nullptr;  // [H,K]
  const float* initial_state = nullptr;  // [N,H,K,V] or [N,H,V,K]
  const int32_t* cu_seqlens = nullptr;  // [N+1] when varlen
  void* o = nullptr;  // [B,T,H,V], qkv_dtype
  float* final_state = nullptr;  // like initial_state

  DType qkv_dtype = DType::kBF16;  // bf16 or f16
  DType g_dtype = DType::kF32;
  DType beta_dtype = DType::kF32;

  int B = 0, T = 0, H = 0, K = 0, V = 0;
  int N = 0;  // sequences: B, or len(cu_seqlens) - 1 when varlen

  Attributes attrs;
};

// The kernels index token·head rows (times 4) and sequences in 32-bit integers: nullptr when
// sizes given in 64 bits fit, else why not. Checked before the sizes are narrowed into the int
// fields of FwdParams.
inline const char* index_range_unsupported(int64_t B, int64_t T, int64_t H, int64_t N) {
  if (B < 0 || T < 0 || H < 0 || N < 0) return "sizes must be non-negative";
  if (B * T * H > (int64_t{1} << 29))
    return "the CUDA target supports at most 2^29 token-heads (B*T*H)";
  if (N > (int64_t{1} << 30)) return "the CUDA target supports at most 2^30 sequences";
  return nullptr;
}

// nullptr when the shapes/dtypes are supported, else a static message saying why not.
const char* fwd_unsupported(const FwdParams& p);

// Device bytes the forward needs as scratch (256-byte aligned start suffices).
size_t fwd_workspace_bytes(const FwdParams& p);

// Enqueues the forward on `stream`; no allocation, no synchronisation.
cudaError_t fwd(const FwdParams& p, void* workspace, cudaStream_t stream);

// The same forward with every sequence cut into segments of at most `seg_tokens` tokens that run
// in parallel, combined exactly (docs/sequence_split.md): the forward's operands and results,
// and the segments' states, which the split backward (jax_flashkda/split.py) starts from.
// S = split_segments(p, seg_tokens) segments: sequence n's max(1, ceil(len / seg_tokens)) in
// order, then empty unused ones. Each array is fp32 [S,H,K,...] whatever the caller's layout:
//   s_in        [S,H,K,V]    the state entering the segment (0 for the unused ones);
//   transitions [S,H,K,V+K]  [Z | P]: the segment's final state from zero, and its action
//                            S -> P·S + Z on an incoming state;
//   seg_final   [S,H,K,V]    the state after the segment.
struct SplitStates {
  float* s_in = nullptr;
  float* transitions = nullptr;
  float* seg_final = nullptr;
};
int split_segments(const FwdParams& p, int seg_tokens);
const char* fwd_split_unsupported(const FwdParams& p, int seg_tokens);
size_t fwd_split_workspace_bytes(const FwdParams& p, int seg_tokens);
cudaError_t fwd_split(const FwdParams& p, int seg_tokens, const SplitStates& states,
                      void* workspace, cudaStream_t stream);

}  // namespace kda
