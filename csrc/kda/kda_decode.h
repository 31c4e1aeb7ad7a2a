// Launch API of the Hopper KDA decode: the token recurrence for generation steps (a few tokens
// per sequence), with the state read and written in place, optionally through a state pool.
// Plain C++ over raw device pointers: no XLA, no Python.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

#include "kda/kda_fwd.h"

namespace kda {

// The forward's operands and attributes, except that the state is one buffer read and written
// in place (FwdParams' initial_state and final_state are unused):
//   - without state_indices, `state` is [N,H,K,V] (or [N,H,V,K]) and sequence n owns row n;
//   - with state_indices [N] (index_cols == 1), `state` is a pool of `pool_slots` rows and
//     sequence n reads and then writes row state_indices[n];
//   - with state_indices [N, index_cols] (per_token_slots), sequence n reads row
//     state_indices[n, a - 1], a = num_accepted[n] clipped into [1, index_cols] (1 without
//     num_accepted), and writes the state after its token t to row state_indices[n, t].
// A read row outside [0, pool_slots) makes the sequence padding (o = 0, nothing written); a
// write row outside it is skipped. The kernels clamp cu_seqlens into [0, T] per sequence, so
// no value reads outside a buffer; the caller makes them legal (docs/robustness.md §1) for the
// documented result.
struct DecodeParams : FwdParams {
  float* state = nullptr;
  const int32_t* state_indices = nullptr;  // nullptr: sequence n owns state row n
  int index_cols = 1;                      // S: columns of state_indices
  bool per_token_slots = false;            // state_indices is [N, S]: a slot per token
  const int32_t* num_accepted = nullptr;   // [N] or nullptr; only with per_token_slots
  int pool_slots = 0;                      // rows of `state`
};

// nullptr when the shapes/dtypes are supported, else a static message saying why not.
const char* decode_unsupported(const DecodeParams& p);

// Enqueues the decode on `stream`: one kernel, no workspace, no allocation, no
// synchronisation (so it can be captured into a CUDA graph).
cudaError_t decode(const DecodeParams& p, cudaStream_t stream);

}  // namespace kda
