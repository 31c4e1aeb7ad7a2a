// The sequence split's own kernels (docs/sequence_split.md), around the forward's prep and
// recurrence, which run on the segments as packed sequences:
//   kda_split_segments_kernel  the segments' offsets and each sequence's first and last segment;
//   kda_split_combine_kernel   each segment's incoming state from the transitions [Z | P];
//   kda_split_finals_kernel    each sequence's final state, from its last segment's.
#pragma once

#include <cub/block/block_scan.cuh>

#include <cstdint>

#include "kda/chunks.cuh"
#include "kda/kda_fwd.h"

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

// Shared memory of the combine: P_j with rows padded by one float (conflict-free reads of a
// column by a warp), and the 16-column state block.
template <int K>
struct CombineSmem {
  static constexpr int kPitch = K + 1;
  static constexpr int kBytes = (K * kPitch + K * 16) * 4;
};

// CTA = (16 value columns, head, sequence), thread = key row. Walks the sequence's segments in
// order: S_in[j] = S; S = P_j S + Z_j, from S = the caller's initial state (its layout), in
// fp32. ends [S,H,K,V+K] = [Z | P] per segment; s_in [S,H,K,V].
template <int K>
__global__ void __launch_bounds__(K) kda_split_combine_kernel(FwdParams p,
                                                             const float* __restrict__ ends,
                                                             const int32_t* __restrict__ first,
                                                             const int32_t* __restrict__ last,
                                                             float* __restrict__ s_in) {
  using L = CombineSmem<K>;
  extern __shared__ __align__(16) float combine_smem[];
  float* Ps = combine_smem;
  float* Ss = combine_smem + K * L::kPitch;
  const int c0 = blockIdx.x * 16, h = blockIdx.y, i = blockIdx.z, k = threadIdx.x;
  const int V = p.V, W = p.V + K;
  float s[16];
  const size_t h0 = (static_cast<size_t>(i) * p.H + h) * K * V;
#pragma unroll
  for (int c = 0; c < 16; ++c) s[c] = p.initial_state[state_index<K>(p, h0, c0 + c, k)];
  const int j_end = last[i];
  for (int j = first[i];; ++j) {
    float* out = s_in + ((static_cast<size_t>(j) * p.H + h) * K + k) * V + c0;
#pragma unroll
    for (int c = 0; c < 16; ++c) out[c] = s[c];
    if (j == j_end) break;
    const float* seg = ends + (static_cast<size_t>(j) * p.H + h) * K * W;
    // P_j into shared memory, 16-byte loads unrolled so that many are in flight (one at a time,
    // the walk took ~35 us per segment on an H100).
#pragma unroll 8
    for (int i = 0; i < K / 4; ++i) {
      const int e = i * K + k, row = e / (K / 4), col = (e % (K / 4)) * 4;
      const float4 x = __ldg(reinterpret_cast<const float4*>(seg + row * W + V + col));
      float* dst = Ps + row * L::kPitch + col;
      dst[0] = x.x;
      dst[1] = x.y;
      dst[2] = x.z;
      dst[3] = x.w;
    }
#pragma unroll
    for (int c = 0; c < 16; ++c) Ss[k * 16 + c] = s[c];
    __syncthreads();
    const float4* z = reinterpret_cast<const float4*>(seg + static_cast<size_t>(k) * W + c0);
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      const float4 x = __ldg(z + q);
      s[4 * q] = x.x;
      s[4 * q + 1] = x.y;
      s[4 * q + 2] = x.z;
      s[4 * q + 3] = x.w;
    }
    for (int m = 0; m < K; ++m) {
      const float pkm = Ps[k * L::kPitch + m];
      const float4* row = reinterpret_cast<const float4*>(Ss + m * 16);
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        const float4 x = row[q];
        s[4 * q] = fmaf(pkm, x.x, s[4 * q]);
        s[4 * q + 1] = fmaf(pkm, x.y, s[4 * q + 1]);
        s[4 * q + 2] = fmaf(pkm, x.z, s[4 * q + 2]);
        s[4 * q + 3] = fmaf(pkm, x.w, s[4 * q + 3]);
      }
    }
    __syncthreads();
  }
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
