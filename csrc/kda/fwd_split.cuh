// The sequence split's own kernels (docs/sequence_split.md), around the forward's prep and
// recurrence, which run on the segments as packed sequences:
//   kda_split_segments_kernel  the segments' offsets and each sequence's first and last segment;
//   kda_split_combine_kernel   (split_combine.cuh) each segment's incoming state from the
//                              transitions [Z | P];
//   kda_split_finals_kernel    each sequence's final state, from its last segment's.
#pragma once

#include <cub/block/block_scan.cuh>

#include <cstdint>

#include "kda/chunks.cuh"
#include "kda/kda_fwd.h"
#include "kda/split_combine.cuh"

namespace kda {

constexpr int kSegmentThreads = 1024;

// Where the segments are, as jax_flashkda/split.py _segments computes them: sequence i of
// length n becomes max(1, ceil(n / L)) segments of at most L tokens; the unused ones of the
// `segments` are empty, at the end. One CTA: the counts' prefix sums tile by tile.
// seg_cu [segments + 1]; first / last [N].
__global__ void __launch_bounds__(kSegmentThreads) kda_split_segments_kernel(
    FwdParams p, int seg_tokens, int segments, int32_t* __restrict__ seg_cu,
    int32_t* __restrict__ first, int32_t* __restrict__ last) {
  using Scan = cub::BlockScan<int, kSegmentThreads>;
  __shared__ typename Scan::TempStorage scan;
  __shared__ int carry;
  auto offset = [&](int i) -> long long {
    return p.attrs.is_varlen ? p.cu_seqlens[i] : static_cast<long long>(i) * p.T;
  };
  if (threadIdx.x == 0) carry = 0;
  __syncthreads();
  for (int base = 0; base < p.N; base += kSegmentThreads) {
    const int i = base + threadIdx.x;
    long long b = 0, e = 0;
    int count = 0;
    if (i < p.N) {
      b = offset(i);
      e = offset(i + 1);
      count = static_cast<int>(max(1LL, (e - b + seg_tokens - 1) / seg_tokens));
    }
    int start = 0, total = 0;
    Scan(scan).ExclusiveSum(count, start, total);
    start += carry;
    if (i < p.N) {
      first[i] = start;
      last[i] = start + count - 1;
      for (int m = 0; m < count; ++m)
        seg_cu[start + m] = static_cast<int32_t>(min(b + static_cast<long long>(m) * seg_tokens, e));
    }
    __syncthreads();
    if (threadIdx.x == 0) carry += total;
    __syncthreads();
  }
  const int32_t end = static_cast<int32_t>(offset(p.N));
  for (int j = carry + threadIdx.x; j <= segments; j += kSegmentThreads) seg_cu[j] = end;
}

// CTA = (head, sequence): the sequence's final state, its last segment's (seg_final
// [S,H,K,V]), in the caller's layout.
template <int K>
__global__ void __launch_bounds__(256) kda_split_finals_kernel(FwdParams p,
                                                              const float* __restrict__ seg_final,
                                                              const int32_t* __restrict__ last,
                                                              float* __restrict__ final_state) {
  const int h = blockIdx.x, i = blockIdx.y, V = p.V;
  const float* src = seg_final + (static_cast<size_t>(last[i]) * p.H + h) * K * V;
  const size_t dst = (static_cast<size_t>(i) * p.H + h) * K * V;
  for (int e = threadIdx.x; e < K * V; e += blockDim.x)
    final_state[state_index<K>(p, dst, e % V, e / V)] = src[e];
}

}  // namespace kda
