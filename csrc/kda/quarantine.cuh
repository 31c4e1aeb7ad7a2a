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

// docs/robustness.md §3 for v in the forward recurrence. The columns of S evolve independently
// (the delta rule's correction Sᵀk is per value column), so a non-finite v quarantines its own
// column only: from the column's first bad row on, its outputs and its state become NaN. In the
// chunk's products a non-finite V element would also reach the column's earlier rows, through
// the zeros of Tβ above the diagonal (0·NaN); read as 0 instead, it contributes exactly what
// every later row of the column does there, nothing, so the earlier rows come out exact.
//
// sanitize_v_fragment zeroes the non-finite 16-bit elements of a V operand fragment in
// registers (three integer operations per pair, no branch: it sits on the recurrence's
// critical path) and says whether there were any; first_bad_rows_v, run only when some lane of
// the warp found one, finds each value column's first bad row in the warp's [16 rows][16
// columns] V tile at `tile` (pitch `pitch`, `rows` of them real).
template <typename Tin>
__device__ __forceinline__ bool sanitize_v_fragment(uint32_t (&frag)[4]) {
  constexpr uint32_t kExp2 = std::is_same_v<Tin, __half> ? 0x7c007c00u : 0x7f807f80u;
  uint32_t any = 0;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const uint32_t bad = __vcmpeq2(frag[i] & kExp2, kExp2);  // 0xffff per non-finite half
    frag[i] &= ~bad;
    any |= bad;
  }
  return any != 0;
}

struct V16Quarantine {
  int first[2];  // first bad row of value columns g and g + 8 of this lane (g = lane / 4)
};

template <typename Tin>
__device__ __forceinline__ V16Quarantine first_bad_rows_v(const Tin* tile, int pitch, int rows,
                                                          int lane) {
  const int r = lane >> 1, half = lane & 1;
  const uint4 raw = *reinterpret_cast<const uint4*>(tile + r * pitch + half * 8);
  // bit i: column half·8 + i of row r
  const uint32_t bad = r < rows ? non_finite_mask8<Tin>(raw) : 0u;
  V16Quarantine q{{kChunk, kChunk}};
  const int g = lane >> 2;
#pragma unroll
  for (int col = 0; col < 16; ++col) {
    const uint32_t lanes = __ballot_sync(0xffffffffu, half == (col >> 3) && ((bad >> (col & 7)) & 1));
    const int first = lanes ? (__ffs(lanes) - 1) >> 1 : kChunk;
    if (col == g) q.first[0] = first;
    if (col == g + 8) q.first[1] = first;
  }
  return q;
}


// The backward's scan of v: per (sequence, head, value column) the first row with a non-finite
// v, lowered into dead_cols[(n·H + h)·V + j] by atomicMin (filled with kNoDeadRow first), and
// the first over the head's columns into dead_v[n·H + h]. One thread per 16 bytes of v; rows
// outside every sequence are skipped.
template <typename Tin, int V>
__global__ void __launch_bounds__(256) kda_scan_v_kernel(FwdParams p, int* __restrict__ dead_cols,
                                                         int* __restrict__ dead_v) {
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
  atomicMin(dead_v + static_cast<size_t>(n) * p.H + h, row);
  int* dst = dead_cols + (static_cast<size_t>(n) * p.H + h) * V + col0;
#pragma unroll
  for (int e = 0; e < 8; ++e)
    if ((bad >> e) & 1) atomicMin(dst + e, row);
}

// Zeroes, in a warp's [16 rows][16 columns] tile of V or dO at `tile` (pitch `pitch`, rows
// starting at token row `row0`), the elements at or after their column's first dead row: the
// head's `dead_head`, or column c's own dead_col[c] if earlier.
template <typename Tin>
__device__ __forceinline__ void zero_dead16(Tin* tile, int pitch, long long row0, int dead_head,
                                            const int* dead_col, int lane) {
  const int r = lane >> 1, half = lane & 1;
  uint32_t dead = 0;
#pragma unroll
  for (int i = 0; i < 8; ++i)
    if (row0 + r >= min(dead_head, dead_col[half * 8 + i])) dead |= 1u << i;
  uint4* mine = reinterpret_cast<uint4*>(tile + r * pitch + half * 8);
  if (dead) *mine = zero_elements8(*mine, dead);
  __syncwarp();
}

}  // namespace kda
