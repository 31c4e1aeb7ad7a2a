// Hopper decode of Kimi Delta Attention: the token recurrence of docs/math.md §1, one token at a
// time, for generation steps (T of 1 to a few tokens per sequence). Such a step must read and
// write every sequence's fp32 state (K·V·4 bytes per head) and little else, so the kernel is
// built around moving the state once at full bandwidth:
//
// - one warp per (sequence, head, 32/kSplit value columns); each value column of the state is
//   held in registers by kSplit lanes (kSplit = K/64: 64 key rows per lane, so that K = 128
//   fits in registers without spilling). The delta rule's correction Sᵀk and the output Sᵀq
//   are per value column, so the lanes of a column combine two partial sums per token with
//   one shuffle each, and nothing else crosses lanes: no barriers in the token loop. In the
//   [K,V] layout a warp's load of one key row per column group is 64 or 128 contiguous bytes;
//   in the [V,K] layout each lane reads its own contiguous run with 16-byte loads. (Measured on
//   an H100, B256 H32: 32 rows per lane over four lanes, or over four warps with whole 128-byte
//   lines, move the same bytes in the same time, at 56% of DRAM peak: benchmarks/NOTES.md.)
// - per token, the warp first prepares the key-channel vectors (gate activation and floor, the
//   l2norm, e^g, scale·q) into its own shared-memory slice, then every lane runs
//       S_j ← e^g ⊙ S_j;   u_j = β (v_j − k·S_j);   S_j ← S_j + u_j k;   o_j = q̃·S_j
//   over its K registers.
// - quarantine (docs/robustness.md §3): a non-finite q, k, β or log-decay marks the whole head,
//   a non-finite v_j its column; the marked state columns become NaN at that token, so that
//   o and the final state are NaN from there on, and nothing earlier changes.
//
// No workspace and no allocation: the handler can be captured into a CUDA graph.
#include "kda/kda_decode.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "common/rules.h"
#include "kda/chunks.cuh"

namespace kda {
namespace {

constexpr int kDecodeWarps = 4;  // warps per CTA (independent tasks; a CTA is only a grouping)

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) x += __shfl_xor_sync(0xffffffffu, x, offset);
  return x;
}

// Sequence n's first token row and length, with its offsets clamped into [0, T] so that no
// offset value can send the kernel outside its buffers.
struct Extent {
  long long row0;
  int len;
};

__device__ __forceinline__ int clamp_offset(int x, int lo, int hi) { return min(max(x, lo), hi); }

__device__ __forceinline__ Extent extent(const DecodeParams& p, int n) {
  if (!p.attrs.is_varlen) return {static_cast<long long>(n) * p.T, p.T};
  const int begin = clamp_offset(p.cu_seqlens[n], 0, p.T);
  const int end = clamp_offset(p.cu_seqlens[n + 1], begin, p.T);
  return {begin, end - begin};
}

// One lane's part of a value column of one (row, head) state: key rows [k0, k0 + KL) of
// column c, in the [K,V] or [V,K] (kVFirst) layout. kVec: the [V,K] rows are read and written
// with 16-byte accesses (the state's base is 16-byte aligned; every run then is, since KL is a
// multiple of 4).
template <int K, int KL, bool kVFirst, bool kVec>
struct StateColumn {
  static_assert(!kVec || kVFirst, "16-byte accesses only along a contiguous [V,K] row");
  static_assert(KL % 4 == 0, "16-byte runs");
  float* base;  // the (row, head) state
  int V, c, k0;

  __device__ size_t at(int k) const {
    return kVFirst ? static_cast<size_t>(c) * K + k0 + k : static_cast<size_t>(k0 + k) * V + c;
  }

  __device__ void load(float (&s)[KL]) const {
    if constexpr (kVec) {
      const float4* run = reinterpret_cast<const float4*>(base + at(0));
#pragma unroll
      for (int i = 0; i < KL / 4; ++i) {
        const float4 x = run[i];
        s[4 * i] = x.x, s[4 * i + 1] = x.y, s[4 * i + 2] = x.z, s[4 * i + 3] = x.w;
      }
    } else {
#pragma unroll
      for (int k = 0; k < KL; ++k) s[k] = base[at(k)];
    }
  }

  __device__ void store(const float (&s)[KL]) const {
    if constexpr (kVec) {
      float4* run = reinterpret_cast<float4*>(base + at(0));
#pragma unroll
      for (int i = 0; i < KL / 4; ++i)
        run[i] = make_float4(s[4 * i], s[4 * i + 1], s[4 * i + 2], s[4 * i + 3]);
    } else {
#pragma unroll
      for (int k = 0; k < KL; ++k) base[at(k)] = s[k];
    }
  }
};

// kDecodeRows key rows per lane; kSplit = K / kDecodeRows lanes per value column.
constexpr int kDecodeRows = 64;

template <int K, bool kVFirst, bool kVec, typename Tin>
__global__ void __launch_bounds__(kDecodeWarps * 32, 3) kda_decode_kernel(const DecodeParams p) {
  constexpr int KL = kDecodeRows;
  constexpr int kSplit = K / KL;
  static_assert(K % KL == 0 && 32 % kSplit == 0, "whole columns per warp");
  constexpr int E = K / 32;                // key channels per lane in the token prep
  constexpr int kCols = 32 / kSplit;       // value columns per warp
  constexpr int kPitch = KL + 4;           // per part, so that the parts' float4 reads differ in bank
  // Per warp, per token: e^g, k and scale·q over the key channels, part by part (float4: one
  // shared load serves four FMAs of the column loops).
  __shared__ __align__(16) float vecs[kDecodeWarps][3][kSplit * kPitch];

  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int slabs = (p.V + kCols - 1) / kCols;
  const long long task = static_cast<long long>(blockIdx.x) * kDecodeWarps + warp;
  if (task >= static_cast<long long>(p.N) * p.H * slabs) return;  // whole warps only
  const int slab = static_cast<int>(task % slabs);
  const long long nh = task / slabs;
  const int h = static_cast<int>(nh % p.H), n = static_cast<int>(nh / p.H);
  const int part = lane / kCols;  // which KL key rows of the column this lane holds
  const int c = slab * kCols + lane % kCols;
  const bool col = c < p.V;
  const bool writer = col && part == 0;  // one lane per column writes o

  const Tin* q = static_cast<const Tin*>(p.q);
  const Tin* k = static_cast<const Tin*>(p.k);
  const Tin* v = static_cast<const Tin*>(p.v);
  Tin* o = static_cast<Tin*>(p.o);
  const auto o_at = [&](long long row) { return (static_cast<size_t>(row) * p.H + h) * p.V + c; };

  // Tokens outside every sequence (docs/robustness.md §1) get o = 0: before the first
  // sequence (written by sequence 0's warps) and after the last (sequence N-1's).
  if (p.attrs.is_varlen && writer) {
    if (n == 0)
      for (int r = 0, e = clamp_offset(p.cu_seqlens[0], 0, p.T); r < e; ++r)
        o[o_at(r)] = from_float<Tin>(0.f);
    if (n == p.N - 1)
      for (int r = clamp_offset(p.cu_seqlens[p.N], 0, p.T); r < p.T; ++r)
        o[o_at(r)] = from_float<Tin>(0.f);
  }
  const Extent ex = extent(p, n);

  int row_in = n;
  if (p.state_indices) {
    int accepted = 1;
    if (p.num_accepted) accepted = clamp_offset(p.num_accepted[n], 1, p.index_cols);
    const size_t at = static_cast<size_t>(n) * p.index_cols + (p.per_token_slots ? accepted - 1 : 0);
    row_in = p.state_indices[at];
  }
  if (row_in < 0 || row_in >= p.pool_slots) {  // padding: no state read, none written
    if (writer)
      for (int t = 0; t < ex.len; ++t) o[o_at(ex.row0 + t)] = from_float<Tin>(0.f);
    return;
  }
  const size_t head_stride = static_cast<size_t>(K) * p.V;
  const auto state_of = [&](int row) {
    return StateColumn<K, KL, kVFirst, kVec>{
        p.state + (static_cast<size_t>(row) * p.H + h) * head_stride, p.V, c, part * KL};
  };

  float s[KL];
  if (col) {
    state_of(row_in).load(s);
  } else {
#pragma unroll
    for (int i = 0; i < KL; ++i) s[i] = 0.f;
  }

  const float a_exp = p.attrs.gate_mode == GateMode::kLogDecay ? 1.f : __expf(p.A_log[h]);
  const auto slot = [](int j) { return (j / KL) * kPitch + j % KL; };  // key channel j's place
  const float4* decay4 = reinterpret_cast<const float4*>(vecs[warp][0] + part * kPitch);
  const float4* key4 = reinterpret_cast<const float4*>(vecs[warp][1] + part * kPitch);
  const float4* query4 = reinterpret_cast<const float4*>(vecs[warp][2] + part * kPitch);

  for (int t = 0; t < ex.len; ++t) {
    const long long row = ex.row0 + t;
    const size_t kbase = (static_cast<size_t>(row) * p.H + h) * K;
    float qv[E], kv[E], gv[E];
    float qq = 0.f, kk = 0.f;
    bool bad = false;
#pragma unroll
    for (int i = 0; i < E; ++i) {
      const int j = i * 32 + lane;
      qv[i] = to_float(q[kbase + j]);
      kv[i] = to_float(k[kbase + j]);
      const float dtb = p.attrs.gate_mode == GateMode::kLogDecay ? 0.f : p.dt_bias[h * K + j];
      gv[i] = log_decay(p, load_f(p.g, p.g_dtype, kbase + j), a_exp, dtb);
      // After the floor a non-finite log-decay is NaN or +inf (-inf became the floor).
      bad |= non_finite(qv[i]) | non_finite(kv[i]) | non_finite(gv[i]);
      qq += qv[i] * qv[i];
      kk += kv[i] * kv[i];
    }
    float beta = load_f(p.beta, p.beta_dtype, static_cast<size_t>(row) * p.H + h);
    if (p.attrs.use_beta_sigmoid) beta = sigmoid_f(beta);
    bad |= non_finite(beta);
    float q_scale = p.attrs.scale, k_scale = 1.f;
    if (p.attrs.use_qk_l2norm) {
      q_scale *= rsqrtf(warp_sum(qq) + kda_rules::kL2NormEps);
      k_scale = rsqrtf(warp_sum(kk) + kda_rules::kL2NormEps);
    }
    bad = __any_sync(0xffffffffu, bad);
#pragma unroll
    for (int i = 0; i < E; ++i) {
      const int j = slot(i * 32 + lane);
      vecs[warp][0][j] = __expf(gv[i]);
      vecs[warp][1][j] = kv[i] * k_scale;
      vecs[warp][2][j] = qv[i] * q_scale;
    }
    __syncwarp();

    const float vj = col ? to_float(v[o_at(row)]) : 0.f;
    if (bad || non_finite(vj)) {
#pragma unroll
      for (int i = 0; i < KL; ++i) s[i] = __int_as_float(0x7fc00000);  // quiet NaN
    }
    // Four partial sums per loop: the KL-long dependent FMA chain would otherwise bound the
    // step by latency.
    float a0 = 0.f, a1 = 0.f, a2 = 0.f, a3 = 0.f;
#pragma unroll
    for (int i = 0; i < KL / 4; ++i) {
      const float4 d = decay4[i], kx = key4[i];
      s[4 * i] *= d.x, s[4 * i + 1] *= d.y, s[4 * i + 2] *= d.z, s[4 * i + 3] *= d.w;
      a0 += kx.x * s[4 * i], a1 += kx.y * s[4 * i + 1];
      a2 += kx.z * s[4 * i + 2], a3 += kx.w * s[4 * i + 3];
    }
    float ks = (a0 + a1) + (a2 + a3);
#pragma unroll
    for (int offset = kCols; offset < 32; offset *= 2) ks += __shfl_xor_sync(0xffffffffu, ks, offset);
    const float u = beta * (vj - ks);
    a0 = a1 = a2 = a3 = 0.f;
#pragma unroll
    for (int i = 0; i < KL / 4; ++i) {
      const float4 kx = key4[i], qx = query4[i];
      s[4 * i] += kx.x * u, s[4 * i + 1] += kx.y * u;
      s[4 * i + 2] += kx.z * u, s[4 * i + 3] += kx.w * u;
      a0 += qx.x * s[4 * i], a1 += qx.y * s[4 * i + 1];
      a2 += qx.z * s[4 * i + 2], a3 += qx.w * s[4 * i + 3];
    }
    float out = (a0 + a1) + (a2 + a3);
#pragma unroll
    for (int offset = kCols; offset < 32; offset *= 2)
      out += __shfl_xor_sync(0xffffffffu, out, offset);
    if (writer) o[o_at(row)] = from_float<Tin>(out);
    if (p.per_token_slots && t < p.index_cols && col) {
      const int row_out = p.state_indices[static_cast<size_t>(n) * p.index_cols + t];
      if (row_out >= 0 && row_out < p.pool_slots) state_of(row_out).store(s);
    }
    __syncwarp();  // the next token's prep overwrites this one's vectors
  }
  if (!p.per_token_slots && col) state_of(row_in).store(s);
}

// Warps per (sequence, head): value columns over the columns one warp holds.
int decode_slabs(const DecodeParams& p) {
  const int cols = 32 / (p.K / kDecodeRows);
  return (p.V + cols - 1) / cols;
}

template <int K, bool kVFirst, bool kVec, typename Tin>
cudaError_t launch(const DecodeParams& p, cudaStream_t stream) {
  const long long tasks = static_cast<long long>(p.N) * p.H * decode_slabs(p);
  const long long blocks = (tasks + kDecodeWarps - 1) / kDecodeWarps;
  if (blocks == 0) return cudaSuccess;
  kda_decode_kernel<K, kVFirst, kVec, Tin>
      <<<static_cast<unsigned>(blocks), kDecodeWarps * 32, 0, stream>>>(p);
  return cudaGetLastError();
}

template <int K, typename Tin>
cudaError_t launch_layout(const DecodeParams& p, cudaStream_t stream) {
  if (!p.attrs.state_v_first) return launch<K, false, false, Tin>(p, stream);
  if (reinterpret_cast<uintptr_t>(p.state) % 16 == 0) return launch<K, true, true, Tin>(p, stream);
  return launch<K, true, false, Tin>(p, stream);
}

template <typename Tin>
cudaError_t launch_dims(const DecodeParams& p, cudaStream_t stream) {
  return p.K == 64 ? launch_layout<64, Tin>(p, stream) : launch_layout<128, Tin>(p, stream);
}

}  // namespace

const char* decode_unsupported(const DecodeParams& p) {
  if (p.K != 64 && p.K != 128) return "the CUDA decode supports K in {64, 128}";
  if (p.V < 1) return "the CUDA decode needs V >= 1";
  if (p.qkv_dtype != DType::kBF16 && p.qkv_dtype != DType::kF16)
    return "the CUDA decode takes bfloat16 or float16 q/k/v";
  if (p.state_indices && p.index_cols < 1) return "state_indices needs at least one column";
  if (p.num_accepted && !p.per_token_slots) return "num_accepted needs a slot per token";
  const long long blocks =
      (static_cast<long long>(p.N) * p.H * decode_slabs(p) + kDecodeWarps - 1) / kDecodeWarps;
  if (blocks > 0x7fffffffLL) return "the CUDA decode supports at most 2^33 (sequence, head) tasks";
  return nullptr;
}

cudaError_t decode(const DecodeParams& p, cudaStream_t stream) {
  return p.qkv_dtype == DType::kF16 ? launch_dims<__half>(p, stream)
                                    : launch_dims<__nv_bfloat16>(p, stream);
}

}  // namespace kda
