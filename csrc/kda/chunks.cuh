// What the forward and backward kernels share: chunk and sequence bookkeeping, element
// conversions, the gate, the chunk record, and launch error handling.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstddef>
#include <cstdint>

#include "common/rules.h"
#include "kda/kda_fwd.h"

// Returns the cudaError_t of a call that failed. Variadic, so that template arguments' commas
// need no extra parentheses.
#define KDA_TRY(...)                           \
  do {                                         \
    const cudaError_t err_ = (__VA_ARGS__);    \
    if (err_ != cudaSuccess) return err_;      \
  } while (0)

namespace kda {

constexpr int kChunk = 16;  // tokens per chunk

// log2 of a power of two. Thread indices are ints, so the kernels divide them by powers of two
// with shifts: `/` would also have to round negative values towards zero.
constexpr int log2_pow2(int n) { return n == 1 ? 0 : 1 + log2_pow2(n / 2); }

// Chunk slots per head in the workspace. Varlen: sequence n starts at slot cu[n]/16 + n, which
// never overlaps the previous one.
inline int chunk_slots(const FwdParams& p) {
  return p.attrs.is_varlen ? p.T / kChunk + p.N + 1 : p.B * ((p.T + kChunk - 1) / kChunk);
}

// Carves a workspace into regions, each starting 256-byte aligned: take(bytes) is the offset
// of the next region; `end` the bytes taken so far.
struct WorkspaceCursor {
  size_t end = 0;
  size_t take(size_t bytes) {
    const size_t at = end;
    end += (bytes + 255) & ~size_t{255};
    return at;
  }
};

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

__device__ __forceinline__ void store_f(void* base, DType t, size_t i, float x) {
  switch (t) {
    case DType::kBF16: static_cast<__nv_bfloat16*>(base)[i] = __float2bfloat16_rn(x); break;
    case DType::kF16: static_cast<__half*>(base)[i] = __float2half_rn(x); break;
    default: static_cast<float*>(base)[i] = x;
  }
}

template <typename Tin>
__device__ __forceinline__ Tin from_float(float x) {
  if constexpr (std::is_same_v<Tin, __half>) return __float2half_rn(x);
  else return __float2bfloat16_rn(x);
}

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
  return p.attrs.gate_mode == GateMode::kSafe && p.attrs.lower_bound >= -5.f &&
         p.attrs.lower_bound < 0.f;
}

// Record of one (head, chunk), written by the prep kernel (prep.cuh) and read by the
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




// Index into a state [N,H,K,V] (or [N,H,V,K] with state_v_first) of sequence-and-head `base`
// = (n·H + h)·K·V, at value v and key `key`; K (= p.K) as the caller's compile-time constant.
template <int K>
__device__ __forceinline__ size_t state_index(const FwdParams& p, size_t base, int v, int key) {
  return base + (p.attrs.state_v_first ? static_cast<size_t>(v) * K + key
                                       : static_cast<size_t>(key) * p.V + v);
}

}  // namespace kda
