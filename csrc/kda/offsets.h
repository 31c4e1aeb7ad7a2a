// Varlen offsets the kernels can trust. Plain C++ over raw device pointers: no XLA, no Python.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

namespace kda {

// Writes legal[i] = max(clip(raw[0], 0, T), ..., clip(raw[i], 0, T)) for i < count: any int32
// values become offsets inside [0, T] that never decrease (docs/robustness.md §1). The kernels
// index only with `legal`, so no traced cu_seqlens can move them outside their buffers.
// One CTA; count may be up to 2^31 - 1. Enqueued on `stream`, no allocation.
cudaError_t legal_offsets(const int32_t* raw, int32_t* legal, int count, int T,
                          cudaStream_t stream);

}  // namespace kda
