// docs/robustness.md §3 on the device: what the kernels do with non-finite input so that it
// never reaches an earlier token. The forward marks (outputs NaN from the first bad row on);
// the backward cuts (the state there is a constant, so gradients flow around it): the first
// dead row of each (sequence, head) from q, k, β and the log-decay is found by the prep
// (prep.cuh, with kAux), that of each value column from v by kda_scan_v_kernel, and the chains
// and the grad kernel zero the inputs and cotangents at dead (row, column) places.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

#include "kda/chunks.cuh"

namespace kda {

// "No dead row" in the backward's dead_rows / dead_cols (docs/robustness.md §3): the int of
// four 0x7f bytes, so that one cudaMemsetAsync fills them; above any token row (< 2^29).
constexpr int kNoDeadRow = 0x7f7f7f7f;

// Bit i set when 16-bit element i of `raw` (bf16 or f16) is NaN or ±inf.
template <typename Tin>
__device__ __forceinline__ uint32_t non_finite_mask8(const uint4& raw) {
  constexpr uint32_t kExp = std::is_same_v<Tin, __half> ? 0x7c00u : 0x7f80u;
  const uint32_t words[4] = {raw.x, raw.y, raw.z, raw.w};
  uint32_t bad = 0;
#pragma unroll
  for (int i = 0; i < 8; ++i)
    if (((words[i >> 1] >> (16 * (i & 1))) & kExp) == kExp) bad |= 1u << i;
  return bad;
}

// The 16-bit elements of `raw` whose bit is set in `mask`, zeroed.
__device__ __forceinline__ uint4 zero_elements8(const uint4& raw, uint32_t mask) {
  uint32_t w[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
  for (int i = 0; i < 8; ++i)
    if ((mask >> i) & 1) w[i >> 1] &= ~(0xffffu << (16 * (i & 1)));
  return make_uint4(w[0], w[1], w[2], w[3]);
}

// docs/robustness.md §3 for v. The columns of S evolve independently (the delta rule's
// correction Sᵀk is per value column), so a non-finite v quarantines its own column only: from
// the column's first bad row on, its V entries act as 0 in the chunk's products (where 0·NaN
// would reach the earlier rows through Tβ) and its outputs and state become NaN. The warp's
// [16 rows][16 columns] V tile at `tile` (pitch `pitch`, `rows` of them real; the others repeat
// row 0 and are zeroed with it) is checked with one 16-byte read per lane; the rest runs only
// when a value is bad.
struct V16Quarantine {
  bool any;
  int first[2];  // first bad row of value columns g and g + 8 of this lane (g = lane / 4)
};

template <typename Tin>
__device__ __forceinline__ V16Quarantine quarantine_v(Tin* tile, int pitch, int rows, int lane) {
  const int r = lane >> 1, half = lane & 1;
  uint4* mine = reinterpret_cast<uint4*>(tile + r * pitch + half * 8);
  const uint4 raw = *mine;
  // bit i: column half·8 + i of row r
  const uint32_t bad = r < rows ? non_finite_mask8<Tin>(raw) : 0u;
  V16Quarantine q{false, {kChunk, kChunk}};
  if (!__any_sync(0xffffffffu, bad != 0)) return q;
  q.any = true;
  const int g = lane >> 2;
  uint32_t dead = 0;  // bit i: row r of column half·8 + i is at or after the column's first bad row
#pragma unroll
  for (int col = 0; col < 16; ++col) {
    const uint32_t lanes = __ballot_sync(0xffffffffu, half == (col >> 3) && ((bad >> (col & 7)) & 1));
    const int first = lanes ? (__ffs(lanes) - 1) >> 1 : kChunk;
    if (col == g) q.first[0] = first;
    if (col == g + 8) q.first[1] = first;
    if ((col >> 3) == half && r >= first) dead |= 1u << (col & 7);
  }
  *mine = zero_elements8(raw, dead);
  __syncwarp();
  return q;
}


// The backward's scan of v: per (sequence, head, value column) the first row with a non-finite
// v, lowered into dead_cols[(n·H + h)·V + j] by atomicMin (filled with kNoDeadRow first). One
// thread per 16 bytes of v; rows outside every sequence are skipped.
template <typename Tin, int V>
__global__ void __launch_bounds__(256) kda_scan_v_kernel(FwdParams p, int* __restrict__ dead_cols) {
  constexpr int kPieces = V / 8;
  const long long i = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= static_cast<long long>(p.B) * p.T * p.H * kPieces) return;
  const uint32_t bad = non_finite_mask8<Tin>(reinterpret_cast<const uint4*>(p.v)[i]);
  if (!bad) return;
  const long long row_head = i / kPieces;
  const int col0 = static_cast<int>(i % kPieces) * 8;
  const int row = static_cast<int>(row_head / p.H), h = static_cast<int>(row_head % p.H);
  int n = row / p.T;
  if (p.attrs.is_varlen) {  // the last sequence starting at or before the row (empty ones skipped)
    int lo = 0, hi = p.N - 1;
    while (lo < hi) {
      const int mid = (lo + hi + 1) >> 1;
      if (p.cu_seqlens[mid] <= row) lo = mid; else hi = mid - 1;
    }
    n = lo;
    if (row < p.cu_seqlens[n] || row >= p.cu_seqlens[n + 1]) return;
  }
  int* dst = dead_cols + (static_cast<size_t>(n) * p.H + h) * V + col0;
#pragma unroll
  for (int e = 0; e < 8; ++e)
    if ((bad >> e) & 1) atomicMin(dst + e, row);
}

// Zeroes, in a warp's [16 rows][16 columns] tile of V or dO at `tile` (pitch `pitch`, rows
// starting at token row `row0`), the elements at or after their column's first dead row:
// dead_at[i] for column (lane & 1)·8 + i of this lane's row lane / 2.
template <typename Tin>
__device__ __forceinline__ void zero_dead16(Tin* tile, int pitch, long long row0,
                                            const int (&dead_at)[8], int lane) {
  const int r = lane >> 1, half = lane & 1;
  uint32_t dead = 0;
#pragma unroll
  for (int i = 0; i < 8; ++i)
    if (row0 + r >= dead_at[i]) dead |= 1u << i;
  uint4* mine = reinterpret_cast<uint4*>(tile + r * pitch + half * 8);
  if (dead) *mine = zero_elements8(*mine, dead);
  __syncwarp();
}

}  // namespace kda
