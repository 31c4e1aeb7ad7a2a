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
#include "kda/transport_sm90.cuh"

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

// Shared memory of the combine: two buffers of P_j (the next one arrives by cp.async while the
// current one is applied), rows padded to K + 4 floats: 16-byte aligned for cp.async, and the
// float4 reads of a row per thread land the eight threads of a phase on distinct banks; and
// the 16-column state block.
template <int K>
struct CombineSmem {
  static constexpr int kPitch = K + 4;
  static constexpr int kP = K * kPitch;  // floats per P buffer
  static constexpr int kBytes = (2 * kP + K * 16) * 4;
  static_assert(kPitch % 4 == 0 && (kPitch / 4) % 8 == 1,
                "16-byte rows whose float4 index steps by 1 mod 8 from row to row");
};

// CTA = (16 value columns, head, sequence), thread = key row. Walks the sequence's segments in
// order: S_in[j] = S; S = P_j S + Z_j, from S = the caller's initial state (its layout), in
// fp32 (each column a chain of fmaf over m in order). ends [S,H,K,V+K] = [Z | P] per segment;
// s_in [S,H,K,V]. P_{j+1} is fetched while P_j is applied: one at a time the loads left each
// step waiting for them (ncu, 2026-12-07: 0.19 ms for the 13 steps at T65536 H8).
template <int K>
__global__ void __launch_bounds__(K) kda_split_combine_kernel(FwdParams p,
                                                             const float* __restrict__ ends,
                                                             const int32_t* __restrict__ first,
                                                             const int32_t* __restrict__ last,
                                                             float* __restrict__ s_in) {
  using L = CombineSmem<K>;
  extern __shared__ __align__(16) float combine_smem[];
  float* Ss = combine_smem + 2 * L::kP;
  const int c0 = blockIdx.x * 16, h = blockIdx.y, i = blockIdx.z, k = threadIdx.x;
  const int V = p.V, W = p.V + K;
  auto segment = [&](int j) { return ends + (static_cast<size_t>(j) * p.H + h) * K * W; };
  // This thread's share of P_j (K/4 16-byte pieces) into buffer b, as one cp.async group.
  auto fetch_p = [&](int j, int b) {
    const float* seg = segment(j);
    float* dst = combine_smem + b * L::kP;
#pragma unroll 8
    for (int e4 = 0; e4 < K / 4; ++e4) {
      const int e = e4 * K + k, row = e / (K / 4), col = (e % (K / 4)) * 4;
      ptx::cp_async16(dst + row * L::kPitch + col, seg + row * W + V + col);
    }
  };
  float s[16];
  const size_t h0 = (static_cast<size_t>(i) * p.H + h) * K * V;
#pragma unroll
  for (int c = 0; c < 16; ++c) s[c] = p.initial_state[state_index<K>(p, h0, c0 + c, k)];
  const int j_end = last[i];
  int b = 0;
  if (first[i] != j_end) fetch_p(first[i], b);
  ptx::cp_async_commit();
  for (int j = first[i];; ++j, b ^= 1) {
    float* out = s_in + ((static_cast<size_t>(j) * p.H + h) * K + k) * V + c0;
#pragma unroll
    for (int c = 0; c < 16; ++c) out[c] = s[c];
    if (j == j_end) break;
    // One group per step, empty after the last P: waiting for all but the newest is P_j.
    if (j + 1 != j_end) fetch_p(j + 1, b ^ 1);
    ptx::cp_async_commit();
#pragma unroll
    for (int c = 0; c < 16; ++c) Ss[k * 16 + c] = s[c];
    const float4* z = reinterpret_cast<const float4*>(segment(j) + static_cast<size_t>(k) * W + c0);
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      const float4 x = __ldg(z + q);
      s[4 * q] = x.x;
      s[4 * q + 1] = x.y;
      s[4 * q + 2] = x.z;
      s[4 * q + 3] = x.w;
    }
    ptx::cp_async_wait<1>();
    __syncthreads();  // P_j and the state block, everyone's
    const float* P = combine_smem + b * L::kP + k * L::kPitch;
    for (int m = 0; m < K; m += 4) {
      const float4 pk = *reinterpret_cast<const float4*>(P + m);
      const float pkm[4] = {pk.x, pk.y, pk.z, pk.w};
#pragma unroll
      for (int mm = 0; mm < 4; ++mm) {
        const float4* row = reinterpret_cast<const float4*>(Ss + (m + mm) * 16);
#pragma unroll
        for (int q = 0; q < 4; ++q) {
          const float4 x = row[q];
          s[4 * q] = fmaf(pkm[mm], x.x, s[4 * q]);
          s[4 * q + 1] = fmaf(pkm[mm], x.y, s[4 * q + 1]);
          s[4 * q + 2] = fmaf(pkm[mm], x.z, s[4 * q + 2]);
          s[4 * q + 3] = fmaf(pkm[mm], x.w, s[4 * q + 3]);
        }
      }
    }
    __syncthreads();  // before the next step refills the other buffer and the state block
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
