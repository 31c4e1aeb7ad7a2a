// The Hopper (sm_90) transport: how data moves between global memory, shared memory and the
// mma fragments. ldmatrix/stmatrix, per-thread async copies (cp.async), the bulk-copy engine
// with its mbarriers and proxy fences, and on top of them StepRing, the staged record pipeline
// of the recurrences. A kernel for another architecture replaces this header (same names) and
// keeps the rest.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

namespace kda::ptx {

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// ldmatrix reads (stmatrix writes) 8 rows of 16 bytes per matrix: they fall on 8 distinct
// groups of four banks, without conflicts, when the row pitch is an odd number of 16-byte units.
// The same pitch keeps the mma fragment reads of fp32 rows, m[g][k + t] for g < 8, t < 4,
// conflict-free.
constexpr bool conflict_free_pitch(int row_bytes) { return row_bytes % 32 == 16; }

__device__ __forceinline__ void ldsm_x4(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
}

__device__ __forceinline__ void ldsm_x4_trans(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
}

__device__ __forceinline__ void mbar_init(uint64_t* bar, uint32_t count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(smem_addr(bar)), "r"(count));
}

// Makes the barrier initialisation visible to the bulk-copy engine.
__device__ __forceinline__ void fence_mbar_init() {
  asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
}

__device__ __forceinline__ void mbar_arrive(uint64_t* bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(smem_addr(bar)) : "memory");
}

__device__ __forceinline__ void mbar_arrive_expect_tx(uint64_t* bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(smem_addr(bar)),
               "r"(bytes)
               : "memory");
}

__device__ __forceinline__ void mbar_wait(uint64_t* bar, uint32_t parity) {
  asm volatile(
      "{\n"
      ".reg .pred done;\n"
      "WAIT_%=:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
      "@!done bra WAIT_%=;\n"
      "}\n" ::"r"(smem_addr(bar)),
      "r"(parity)
      : "memory");
}

// One-dimensional bulk copy global -> shared, completing `bytes` on `bar` (16-byte multiples).
__device__ __forceinline__ void bulk_g2s(void* dst, const void* src, uint32_t bytes, uint64_t* bar) {
  asm volatile(
      "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];\n" ::"r"(
          smem_addr(dst)),
      "l"(src), "r"(bytes), "r"(smem_addr(bar))
      : "memory");
}

// 16-byte global -> shared copy that bypasses registers (cp.async, L2 only).
__device__ __forceinline__ void cp_async16(void* dst, const void* src) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(smem_addr(dst)), "l"(src)
               : "memory");
}

__device__ __forceinline__ void cp_async_commit() {
  asm volatile("cp.async.commit_group;\n" ::: "memory");
}

// Waits until at most `n` of this thread's committed cp.async groups are still in flight.
template <int n>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(n) : "memory");
}

// Stores four 8x8 b16 matrices from mma-fragment registers; lane l gives the address of row
// l % 8 of matrix l / 8.
__device__ __forceinline__ void stsm_x4(void* p, const uint32_t (&r)[4]) {
  asm volatile("stmatrix.sync.aligned.m8n8.x4.shared.b16 [%0], {%1,%2,%3,%4};\n" ::"r"(smem_addr(p)),
               "r"(r[0]), "r"(r[1]), "r"(r[2]), "r"(r[3])
               : "memory");
}

// One warp copies a 16x16 tile of 2-byte elements (16 rows of 32 bytes) into shared memory, one
// 16-byte cp.async per lane. Rows at or past `rows` repeat row 0: finite values for the caller to
// multiply by zero. Row r of the source starts at src + r * src_pitch.
template <typename T>
__device__ __forceinline__ void warp_tile16_cp_async(T* dst, int dst_pitch, const T* src,
                                                     size_t src_pitch, int rows, int lane) {
  static_assert(sizeof(T) == 2, "16 elements of 2 bytes make a 32-byte row");
  const int r = lane >> 1, half = lane & 1;
  cp_async16(dst + r * dst_pitch + half * 8, src + (r < rows ? r : 0) * src_pitch + half * 8);
}

// Orders this thread's earlier ordinary shared-memory writes before later async-proxy reads of
// them (a bulk store issued after a CTA barrier).
__device__ __forceinline__ void fence_proxy_async_smem() {
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}

// One-dimensional bulk copy shared -> global (16-byte multiples), tracked by bulk groups.
__device__ __forceinline__ void bulk_s2g(void* dst, const void* src, uint32_t bytes) {
  asm volatile("cp.async.bulk.global.shared::cta.bulk_group [%0], [%1], %2;\n" ::"l"(dst),
               "r"(smem_addr(src)), "r"(bytes)
               : "memory");
  asm volatile("cp.async.bulk.commit_group;\n" ::: "memory");
}

// Waits until every bulk store this thread issued has finished reading shared memory.
__device__ __forceinline__ void bulk_wait_read_all() {
  asm volatile("cp.async.bulk.wait_group.read 0;\n" ::: "memory");
}

// Waits until every bulk store this thread issued is complete (visible in global memory).
__device__ __forceinline__ void bulk_wait_all() {
  asm volatile("cp.async.bulk.wait_group 0;\n" ::: "memory");
}

}  // namespace kda::ptx

namespace kda {

// Shared memory of an sm_90 SM: the most one CTA may take, and what each resident CTA costs the
// SM beyond its own. The kernels' layouts are checked against them at compile time.
constexpr int kMaxSmemPerCta = 227 * 1024;
constexpr int kSmemPerSm = 228 * 1024;
constexpr int kSmemReservedPerCta = 1024;

// Whether ctas_per_sm CTAs of bytes_per_cta each fit on one SM at once.
constexpr bool smem_fits(int bytes_per_cta, int ctas_per_sm) {
  return bytes_per_cta <= kMaxSmemPerCta &&
         ctas_per_sm * (bytes_per_cta + kSmemReservedPerCta) <= kSmemPerSm;
}

// The record pipeline of the recurrence kernels: kStages shared-memory stages of kStageBytes
// from the start of shared memory, each holding one step's record (one bulk copy, issued by
// lane 0 of warp 0, completing on the stage's "full" mbarrier) and, beside it, every warp's own
// 16x16 row tile (cp.async, one group per step). Step i + kAhead refills the stage of step
// i - 2 once all NW warps have released that, so a warp may trail the one that refills by a
// step without stalling it; warps never wait on each other otherwise. The 2·kStages mbarriers
// ("full", then "empty") start at byte kBarOffset. Everything but the base is compile-time, as
// in the hand-written loops this replaced.
template <int kStages, int NW, int kStageBytes, int kBarOffset>
struct StepRing {
  static constexpr int kAhead = kStages - 2;
  uint8_t* smem;

  __device__ uint64_t* full(int i) const {
    return reinterpret_cast<uint64_t*>(smem + kBarOffset) + i % kStages;
  }
  __device__ uint64_t* empty(int i) const { return full(i) + kStages; }

  // Every thread of the CTA calls it (it ends in a CTA barrier).
  __device__ void init() const {
    if (threadIdx.x == 0) {
      for (int i = 0; i < kStages; ++i) {
        ptx::mbar_init(full(i), 1);
        ptx::mbar_init(empty(i), NW);
      }
      ptx::fence_mbar_init();
    }
    __syncthreads();
  }

  __device__ uint8_t* stage(int i) const { return smem + (i % kStages) * kStageBytes; }

  // Warp 0: bytes [first, end) of step i's record at `rec` into the same place of its stage.
  __device__ void fetch_record(int i, const uint8_t* rec, uint32_t first, uint32_t end,
                               int lane) const {
    if (lane == 0) {
      ptx::mbar_arrive_expect_tx(full(i), end - first);
      ptx::bulk_g2s(stage(i) + first, rec + first, end - first, full(i));
    }
  }

  // Warp 0, at step i: may the record of step i + kAhead be fetched now (after waiting for
  // the stage it reuses)?
  __device__ bool refill_ready(int i, int steps) const {
    if (i + kAhead >= steps) return false;
    if (i >= 2) ptx::mbar_wait(empty(i - 2), ((i - 2) / kStages) & 1);
    return true;
  }

  // The kernel says where a step's data comes from: record(i) calls fetch_record for step i
  // (warp 0 only), rows(i) issues this warp's cp.async row tile of step i into stage(i). The
  // ring calls them for steps < `steps` only and closes one cp.async group per step, empty or
  // not, so that wait() counts steps.
  //
  // Every thread of the CTA, once: the barriers, then the first kAhead steps' fetches.
  template <typename Record, typename Rows>
  __device__ void start(int steps, int warp, Record record, Rows rows) const {
    init();
    for (int i = 0; i < kAhead; ++i) {
      if (warp == 0 && i < steps) record(i);
      rows_group(i, steps, rows);
    }
  }

  // Every warp, at step i before wait(i): the fetches of step i + kAhead (warp 0's record once
  // its stage is released; this warp's own columns of the stage it finished at step i - 2).
  template <typename Record, typename Rows>
  __device__ void refill(int i, int steps, int warp, Record record, Rows rows) const {
    if (warp == 0 && refill_ready(i, steps)) record(i + kAhead);
    rows_group(i + kAhead, steps, rows);
  }

  template <typename Rows>
  __device__ static void rows_group(int i, int steps, Rows rows) {
    if (i < steps) rows(i);
    ptx::cp_async_commit();
  }

  // Every warp: step i's record and this warp's row tile have landed.
  __device__ void wait(int i) const {
    ptx::mbar_wait(full(i), (i / kStages) & 1);
    ptx::cp_async_wait<kAhead>();
    __syncwarp();
  }

  // Every warp, once it no longer reads step i's record.
  __device__ void release(int i, int lane) const {
    if (lane == 0) ptx::mbar_arrive(empty(i));
  }
};

}  // namespace kda
