// What the forward and backward kernels share: chunk and sequence bookkeeping, element
// conversions, launch error handling, and the staged record pipeline of the recurrences.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstddef>
#include <cstdint>

#include "common/rules.h"
#include "kda/kda_fwd.h"
#include "kda/ptx.cuh"

#define KDA_TRY(expr)                          \
  do {                                         \
    const cudaError_t err_ = (expr);           \
    if (err_ != cudaSuccess) return err_;      \
  } while (0)

namespace kda {

constexpr int kChunk = 16;  // tokens per chunk

// Chunk slots per head in the workspace. Varlen: sequence n starts at slot cu[n]/16 + n, which
// never overlaps the previous one.
inline int chunk_slots(const FwdParams& p) {
  return p.attrs.is_varlen ? p.T / kChunk + p.N + 1 : p.B * ((p.T + kChunk - 1) / kChunk);
}

// Multiprocessors of the current device, the one XLA launches on (asked on every call: a process
// may hold GPUs of different sizes).
inline cudaError_t sm_count(int& n) {
  int dev = 0;
  KDA_TRY(cudaGetDevice(&dev));
  return cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev);
}

__device__ __forceinline__ float load_f(const void* base, DType t, size_t i) {
  switch (t) {
    case DType::kBF16: return __bfloat162float(static_cast<const __nv_bfloat16*>(base)[i]);
    case DType::kF16: return __half2float(static_cast<const __half*>(base)[i]);
    default: return static_cast<const float*>(base)[i];
  }
}

// Raw 16- or 32-bit pattern of a bf16/f16/f32 element to float.
__device__ __forceinline__ float bits_to_float(uint32_t b, DType t) {
  if (t == DType::kF32) return __uint_as_float(b);
  if (t == DType::kF16) return __half2float(__ushort_as_half(static_cast<unsigned short>(b)));
  return __uint_as_float(b << 16);
}

__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }

__device__ __forceinline__ float sigmoid_f(float x) { return 1.f / (1.f + __expf(-x)); }
__device__ __forceinline__ float softplus_f(float x) { return x > 20.f ? x : log1pf(__expf(x)); }

// A token's log-decay in one key channel from its raw gate x, before the floor: x itself
// (kLogDecay), −e^{A_log}·softplus(x + dt_bias) (kSoftplus), or lower_bound·sigmoid(e^{A_log}·
// (x + dt_bias)) (kSafe); a_exp = e^{A_log}.
__device__ __forceinline__ float gate_activation(const FwdParams& p, float x, float a_exp,
                                                 float dtb) {
  const float y = x + dtb;
  if (p.attrs.gate_mode == GateMode::kSoftplus) return -a_exp * softplus_f(y);
  if (p.attrs.gate_mode == GateMode::kSafe) return p.attrs.lower_bound * sigmoid_f(a_exp * y);
  return x;
}

// NaN or ±inf, from the bits (immune to fast-math assumptions about non-finite values).
__device__ __forceinline__ bool non_finite(float x) {
  return (__float_as_uint(x) & 0x7f800000u) == 0x7f800000u;
}

// The floor of docs/robustness.md §2, as a select so that NaN stays NaN (fmaxf would drop it).
__device__ __forceinline__ bool below_log_decay_floor(float g) {
  return g < kda_rules::kLogDecayFloor;
}

// The log-decay the kernels use: the activation, raised to the floor.
__device__ __forceinline__ float log_decay(const FwdParams& p, float x, float a_exp, float dtb) {
  const float g = gate_activation(p, x, a_exp, dtb);
  return below_log_decay_floor(g) ? kda_rules::kLogDecayFloor : g;
}

// First global token row, slot of the first chunk, and length of sequence n.
struct Seq {
  long long row0;
  int slot0;
  int len;
};

__device__ __forceinline__ Seq seq_of(const FwdParams& p, int n) {
  if (p.attrs.is_varlen) {
    const int b = p.cu_seqlens[n], e = p.cu_seqlens[n + 1];
    return {b, b / kChunk + n, e - b};
  }
  return {static_cast<long long>(n) * p.T, n * ((p.T + kChunk - 1) / kChunk), p.T};
}

// The chunk a slot holds: its first token row, length and sequence; len == 0 for unused slots.
struct Chunk {
  long long row0;
  int len;
  int n;
};

__device__ __forceinline__ Chunk locate(const FwdParams& p, int slot) {
  int n = 0, c = slot;
  if (p.N == 0) return {0, 0, 0};
  if (p.attrs.is_varlen) {
    int lo = 0, hi = p.N - 1;
    while (lo < hi) {
      const int mid = (lo + hi + 1) >> 1;
      if (p.cu_seqlens[mid] / kChunk + mid <= slot) lo = mid; else hi = mid - 1;
    }
    n = lo;
    c = slot - (p.cu_seqlens[n] / kChunk + n);
  } else {
    const int per = (p.T + kChunk - 1) / kChunk;
    n = slot / per;
    c = slot % per;
  }
  const Seq sq = seq_of(p, n);
  if (c < 0 || c * kChunk >= sq.len) return {0, 0, n};
  return {sq.row0 + static_cast<long long>(c) * kChunk, min(kChunk, sq.len - c * kChunk), n};
}

// The safe gate bounds the in-chunk span of Γ (≥ −80 over 16 tokens), so e^{Γ_r−Γ_s} may be
// factored into e^{Γ_r}·e^{−Γ_s}; forward and backward take their factored paths on this test.
inline bool factored_gate(const FwdParams& p) {
  return p.attrs.gate_mode == GateMode::kSafe && p.attrs.lower_bound >= -5.f && p.attrs.lower_bound < 0.f;
}

// Record of one (head, chunk), written by the prep kernel (kda_fwd.cu) and read by the
// forward recurrence and the backward's chains, K key channels:
//   Q̃ = scale·Q⊙e^Γ [16,K] | −W [16,K] bf16 | K̃ = K⊙e^{Γ_C−Γ} [16,K] bf16 |
//   Tβ = T·Diag(β) [16,16] (dtype of v) | Aqk [16,16] | e^{Γ_C} [K] f32
// Q̃ and Aqk are bf16 for the forward and of the dtype of q for the backward, where they
// multiply dO inside mma. Matrix rows are padded to K+8 elements, the shared-memory layout that
// keeps ldmatrix free of bank conflicts, so that a recurrence fetches a record with one bulk copy.
template <int K>
struct Rec {
  static constexpr int kPitch = K + 8;
  static constexpr int kMat = kChunk * kPitch * 2;
  static constexpr int kQ = 0, kW = kMat, kKt = 2 * kMat, kTb = 3 * kMat, kAqk = kTb + 512,
                       kEg = kTb + 1024;
  static constexpr int kBytes = kEg + 4 * K;
};

// Typed pointers into a record at `st`: Tq is the dtype of its Q̃ and Aqk, Tv that of Tβ.
template <int K, typename Tq, typename Tv>
struct RecView {
  const Tq* q;
  const __nv_bfloat16* w;  // −W
  const __nv_bfloat16* kt;
  const Tv* tb;
  const Tq* aqk;
  const float* eg;
  __device__ explicit RecView(const uint8_t* st)
      : q(reinterpret_cast<const Tq*>(st + Rec<K>::kQ)),
        w(reinterpret_cast<const __nv_bfloat16*>(st + Rec<K>::kW)),
        kt(reinterpret_cast<const __nv_bfloat16*>(st + Rec<K>::kKt)),
        tb(reinterpret_cast<const Tv*>(st + Rec<K>::kTb)),
        aqk(reinterpret_cast<const Tq*>(st + Rec<K>::kAqk)),
        eg(reinterpret_cast<const float*>(st + Rec<K>::kEg)) {}
};

// What the backward's gradient kernel takes from the prep besides the record (one per head and
// chunk): the 16x16 factors in fp32 and the l2norm scales.
struct PrepAux {
  float T[kChunk][kChunk];   // (I+L)^-1, zeros above the diagonal
  float LL[kChunk][kChunk];  // L without β: Σ_d k_rd k_sd e^{Γ_rd−Γ_sd} for r > s, zeros elsewhere
  float rn[2 * kChunk];      // 1/|q_r| then 1/|k_r| (with use_qk_l2norm)
};

// The backward's prep (K = 128): records as above with Q̃ and Aqk in the dtype of q, and a
// PrepAux per (head, chunk slot), both indexed h·slots + slot; and, per (sequence, head), the
// first row with a non-finite q, k, β or log-decay lowered into dead_rows[n·H + h] (atomicMin;
// the caller fills it with quarantine.cuh's kNoDeadRow first). Defined in kda_fwd.cu.
cudaError_t prep_for_backward(const FwdParams& p, uint8_t* recs, PrepAux* aux, int* dead_rows,
                              int slots, cudaStream_t stream);

// Sums acc[i], i < 32, over the CTA's kWarps warps into out[i] = finish(sum), visible to all
// threads after (the two CTA barriers inside also publish earlier shared-memory writes).
struct Unchanged {
  __device__ float operator()(float x) const { return x; }
};

template <int kWarps, typename Finish = Unchanged>
__device__ __forceinline__ void block_sum32(float (&acc)[32], float (*red)[32], float* out,
                                            Finish finish = {}) {
  static_assert(kWarps == 2 || kWarps == 4, "one warp per 32 key channels, K = 64 or 128");
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  // Transposing butterfly: each round halves the values a lane carries, so after five rounds
  // lane i holds the warp's sum of value i (31 shuffles instead of 32 x 5).
#pragma unroll
  for (int i = 0; i < 5; ++i) {
    const int w = 16 >> i;
    const bool upper = lane & w;
#pragma unroll
    for (int j = 0; j < 16; ++j) {
      if (j >= w) break;
      const float send = upper ? acc[j] : acc[j + w];
      const float keep = upper ? acc[j + w] : acc[j];
      acc[j] = keep + __shfl_xor_sync(0xffffffffu, send, w);
    }
  }
  red[warp][lane] = acc[0];
  __syncthreads();
  if (threadIdx.x < 32) {
    float sum = red[0][lane] + red[1][lane];
    if constexpr (kWarps == 4) sum += red[2][lane] + red[3][lane];
    out[lane] = finish(sum);
  }
  __syncthreads();
}

// Index into a state [N,H,K,V] (or [N,H,V,K] with state_v_first) of sequence-and-head `base`
// = (n·H + h)·K·V, at value v and key `key`; K (= p.K) as the caller's compile-time constant.
template <int K>
__device__ __forceinline__ size_t state_index(const FwdParams& p, size_t base, int v, int key) {
  return base + (p.attrs.state_v_first ? static_cast<size_t>(v) * K + key
                                 : static_cast<size_t>(key) * p.V + v);
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
