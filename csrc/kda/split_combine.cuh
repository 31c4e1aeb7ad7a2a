// The sequence split's combine (docs/sequence_split.md): a walk of each sequence's segments
// through their affine maps, X = A_j X + B_j. The split forward walks forwards for the segments'
// incoming states (fwd_split.cuh), the split backward backwards for their end cotangents
// (kda_bwd.cu).
#pragma once

#include <cstdint>

#include "kda/chunks.cuh"
#include "kda/kda_fwd.h"
#include "kda/transport_sm90.cuh"

namespace kda {

// Shared memory of the combine: two buffers of A_j (the next one arrives by cp.async while the
// current one is applied), rows padded to K + 4 floats: 16-byte aligned for cp.async, and the
// float4 reads of a row per thread land the eight threads of a phase on distinct banks; and
// the 16-column state block.
template <int K>
struct CombineSmem {
  static constexpr int kPitch = K + 4;
  static constexpr int kP = K * kPitch;  // floats per A buffer
  static constexpr int kBytes = (2 * kP + K * 16) * 4;
  static_assert(kPitch % 4 == 0 && (kPitch / 4) % 8 == 1,
                "16-byte rows whose float4 index steps by 1 mod 8 from row to row");
};

// The affine maps of a sequence's segments, [S,H,K,...] fp32, keys first: segment j's matrix
// A_j (rows of `a_pitch` floats, a multiple of 4: 16-byte cp.async pieces) and its addend B_j
// (rows of `b_pitch` floats, 16-byte aligned).
struct SegmentMaps {
  const float* a;
  int a_pitch;
  const float* b;
  int b_pitch;
};

// CTA = (16 value columns, head, sequence), thread = key row; out [segments,H,K,V]. Walks the
// sequence's segments in order, first to last (kReverse: last to first): out[j] = X;
// X = A_j X + B_j, in fp32 (each column a chain of fmaf over m in order), X starting from
// p.initial_state (its layout). The forward: A_j = P_j, B_j = Z_j (both from [Z | P]), out
// the segments' incoming states. The split backward (kReverse): A_j = P_jᵀ, B_j = dZ_j, X from
// the sequence's end cotangent, out every segment's end cotangent. A_{j+1} is fetched while A_j
// is applied: one at a time the loads left each step waiting for them (ncu, 2026-12-07: 0.19 ms
// for the 13 steps at T65536 H8).
template <int K, bool kReverse = false>
__global__ void __launch_bounds__(K) kda_split_combine_kernel(FwdParams p, SegmentMaps maps,
                                                             int segments,
                                                             const int32_t* __restrict__ first,
                                                             const int32_t* __restrict__ last,
                                                             float* __restrict__ out) {
  using L = CombineSmem<K>;
  extern __shared__ __align__(16) float combine_smem[];
  float* Ss = combine_smem + 2 * L::kP;
  const int c0 = blockIdx.x * 16, h = blockIdx.y, i = blockIdx.z, k = threadIdx.x;
  const int V = p.V;
  auto rows = [&](const float* base, int pitch, int j) {
    return base + (static_cast<size_t>(j) * p.H + h) * K * pitch;
  };
  // This thread's share of A_j (K/4 16-byte pieces) into buffer b, as one cp.async group.
  auto fetch_a = [&](int j, int b) {
    const float* seg = rows(maps.a, maps.a_pitch, j);
    float* dst = combine_smem + b * L::kP;
#pragma unroll 8
    for (int e4 = 0; e4 < K / 4; ++e4) {
      const int e = e4 * K + k, row = e / (K / 4), col = (e % (K / 4)) * 4;
      ptx::cp_async16(dst + row * L::kPitch + col, seg + row * maps.a_pitch + col);
    }
  };
  float s[16];
  const size_t x0 = (static_cast<size_t>(i) * p.H + h) * K * V;
#pragma unroll
  for (int c = 0; c < 16; ++c) s[c] = p.initial_state[state_index<K>(p, x0, c0 + c, k)];
  // The backward's first and last arrive as operands: kept inside [0, segments) and in walking
  // order, so that no value sends the walk outside `out` or past its end.
  const int step = kReverse ? -1 : 1;
  const int j_begin = min(max(kReverse ? last[i] : first[i], 0), segments - 1);
  const int j_far = min(max(kReverse ? first[i] : last[i], 0), segments - 1);
  const int j_end = kReverse ? min(j_far, j_begin) : max(j_far, j_begin);
  int b = 0;
  if (j_begin != j_end) fetch_a(j_begin, b);
  ptx::cp_async_commit();
  for (int j = j_begin;; j += step, b ^= 1) {
    float* o = out + ((static_cast<size_t>(j) * p.H + h) * K + k) * V + c0;
#pragma unroll
    for (int c = 0; c < 16; ++c) o[c] = s[c];
    if (j == j_end) break;
    // One group per step, empty after the last A: waiting for all but the newest is A_j.
    if (j + step != j_end) fetch_a(j + step, b ^ 1);
    ptx::cp_async_commit();
#pragma unroll
    for (int c = 0; c < 16; ++c) Ss[k * 16 + c] = s[c];
    const float4* z =
        reinterpret_cast<const float4*>(rows(maps.b, maps.b_pitch, j) + k * maps.b_pitch + c0);
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      const float4 x = __ldg(z + q);
      s[4 * q] = x.x;
      s[4 * q + 1] = x.y;
      s[4 * q + 2] = x.z;
      s[4 * q + 3] = x.w;
    }
    ptx::cp_async_wait<1>();
    __syncthreads();  // A_j and the state block, everyone's
    const float* A = combine_smem + b * L::kP + k * L::kPitch;
    for (int m = 0; m < K; m += 4) {
      const float4 pk = *reinterpret_cast<const float4*>(A + m);
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

}  // namespace kda
