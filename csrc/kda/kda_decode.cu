// Hopper decode of Kimi Delta Attention: the token recurrence of docs/math.md §1, one token at a
// time, for generation steps (T of 1 to a few tokens per sequence). Such a step must read and
// write every sequence's fp32 state (K·V·4 bytes per head) and little else, so the kernel is
// built around moving the state once at full bandwidth:
//
// - one warp per (sequence, head, 16 value columns). Lane (rg, cg) = (lane / 4, lane % 4)
//   holds columns 4·cg .. 4·cg + 3 of the warp's 16 over the key rows 32m + 4·rg + e
//   (StateTile): K/2 floats, in registers. State accesses are 16 bytes per lane and a warp's
//   instruction covers whole 64- or 128-byte runs in either layout. The delta rule's
//   correction Sᵀk and the output Sᵀq are per value column, so the 8 row groups combine their
//   partial sums with three shuffles per column, and nothing else crosses lanes: no barriers
//   in the token loop. (Measured on an H100, B256 H32, one step's wall time: 562-566 µs for
//   the previous tiling, a column's 64 key rows per lane with 4-byte [K,V] accesses and the
//   token's loads one channel after another; 518-522 µs for this one before the evict-first
//   hint below, 473-477 with it; 604-605 µs for 16 row groups of 32 floats a lane, which fit
//   5 CTAs per SM instead of 4: benchmarks/results/decode_h100.md runs 3-5.)
// - per token, the warp first prepares the key-channel vectors (gate activation and floor, the
//   l2norm, e^g, scale·q) into its own shared-memory slice, then every lane runs
//       S_j ← e^g ⊙ S_j;   u_j = β (v_j − k·S_j);   S_j ← S_j + u_j k;   o_j = q̃·S_j
//   over its K/2 registers.
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

// One lane's tile of one (row, head) state: the key rows 32m + 4·rg + e (m < K/32, e < 4) of
// the value columns c0 + j (j < 4), as s[m][e][j]. The rows are interleaved so that a warp's
// access is whole lines in either layout: in [K,V] one 16-byte access per lane covers columns
// c0..c0+3 of a row, and the 4 lanes of a row group read 64 contiguous bytes of 8 rows per
// instruction; in [V,K] it covers 4 consecutive rows of a column, and the 8 row groups read a
// column's 128 contiguous bytes. kVec: 16-byte accesses ([K,V] needs V % 4 == 0 for them; the
// state's base is 16-byte aligned, and then so is every access); otherwise one float at a
// time. Columns at or past V read as 0 and are not written. The state is touched once per
// step, so its 16-byte accesses carry the evict-first hint (ld/st.global.cs), which leaves L2
// to the lines still to be read: on an H100 at B256 H32, 510 -> 458-468 µs of device time
// (benchmarks/results/decode_h100.md run 4). The float-at-a-time path goes without: there the
// hint made ptxas spill.
template <int K, bool kVFirst, bool kVec>
struct StateTile {
  static constexpr int M = K / 32;
  float* base;  // the (row, head) state
  int V, rg, c0;

  // Offset within the head's K·V floats (fewer than 2^31: decode_unsupported checks): 32-bit,
  // so that the offsets, live from the load to the store, cost one register each.
  __device__ int at(int m, int e, int j) const {
    const int r = 32 * m + 4 * rg + e, c = c0 + j;
    return kVFirst ? c * K + r : r * V + c;
  }
  __device__ bool has(int j) const { return c0 + j < V; }

  __device__ void load(float (&s)[M][4][4]) const {
#pragma unroll
    for (int m = 0; m < M; ++m) {
      if constexpr (kVec && kVFirst) {
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          const float4 x = has(j) ? __ldcs(reinterpret_cast<const float4*>(base + at(m, 0, j)))
                                  : make_float4(0.f, 0.f, 0.f, 0.f);
          s[m][0][j] = x.x, s[m][1][j] = x.y, s[m][2][j] = x.z, s[m][3][j] = x.w;
        }
      } else if constexpr (kVec) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const float4 x = has(0) ? __ldcs(reinterpret_cast<const float4*>(base + at(m, e, 0)))
                                  : make_float4(0.f, 0.f, 0.f, 0.f);
          s[m][e][0] = x.x, s[m][e][1] = x.y, s[m][e][2] = x.z, s[m][e][3] = x.w;
        }
      } else {
#pragma unroll
        for (int e = 0; e < 4; ++e)
#pragma unroll
          for (int j = 0; j < 4; ++j) s[m][e][j] = has(j) ? base[at(m, e, j)] : 0.f;
      }
    }
  }

  __device__ void store(const float (&s)[M][4][4]) const {
#pragma unroll
    for (int m = 0; m < M; ++m) {
      if constexpr (kVec && kVFirst) {
#pragma unroll
        for (int j = 0; j < 4; ++j)
          if (has(j))
            __stcs(reinterpret_cast<float4*>(base + at(m, 0, j)),
                   make_float4(s[m][0][j], s[m][1][j], s[m][2][j], s[m][3][j]));
      } else if constexpr (kVec) {
#pragma unroll
        for (int e = 0; e < 4; ++e)
          if (has(0))
            __stcs(reinterpret_cast<float4*>(base + at(m, e, 0)),
                   make_float4(s[m][e][0], s[m][e][1], s[m][e][2], s[m][e][3]));
      } else {
#pragma unroll
        for (int e = 0; e < 4; ++e)
#pragma unroll
          for (int j = 0; j < 4; ++j)
            if (has(j)) base[at(m, e, j)] = s[m][e][j];
      }
    }
  }
};

// Value columns per warp: 4 lanes of 4 columns; the 8 row groups (lane / 4) split the keys.
constexpr int kDecodeCols = 16;

// The sum over the 8 row groups of a warp (lanes that differ in bits 2..4).
__device__ __forceinline__ float row_group_sum(float x) {
#pragma unroll
  for (int offset = 4; offset < 32; offset *= 2) x += __shfl_xor_sync(0xffffffffu, x, offset);
  return x;
}

// At most 128 registers (4 CTAs per SM): the 64 state floats and what the token needs fit
// without spilling (the [V,K] 16-byte variant at K = 128 spills 12 bytes).
template <int K, bool kVFirst, bool kVec, typename Tin>
__global__ void __launch_bounds__(kDecodeWarps * 32, 4) kda_decode_kernel(const DecodeParams p) {
  using Tile = StateTile<K, kVFirst, kVec>;
  constexpr int M = Tile::M;
  // Per warp, per token: e^g, k and scale·q over the key channels (read back as float4: a row
  // group's 4 consecutive rows 32m + 4·rg + e; the 8 row groups' reads are 128 contiguous
  // bytes, free of bank conflicts).
  __shared__ __align__(16) float vecs[kDecodeWarps][3][K];

  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int slabs = (p.V + kDecodeCols - 1) / kDecodeCols;
  const long long task = static_cast<long long>(blockIdx.x) * kDecodeWarps + warp;
  if (task >= static_cast<long long>(p.N) * p.H * slabs) return;  // whole warps only
  const int slab = static_cast<int>(task % slabs);
  const long long nh = task / slabs;
  const int h = static_cast<int>(nh % p.H), n = static_cast<int>(nh / p.H);
  const int rg = lane >> 2;                           // row group
  const int c0 = slab * kDecodeCols + 4 * (lane & 3);  // first of this lane's 4 columns
  const bool writer = rg == 0;                         // the lanes that write o

  const Tin* q = static_cast<const Tin*>(p.q);
  const Tin* k = static_cast<const Tin*>(p.k);
  const Tin* v = static_cast<const Tin*>(p.v);
  Tin* o = static_cast<Tin*>(p.o);
  // Token row's o/v offset of column c0 + j, and whether v has that column (StateTile::has
  // asks the same of the state).
  const auto o_at = [&](long long row, int j) {
    return (static_cast<size_t>(row) * p.H + h) * p.V + c0 + j;
  };
  const auto in_v = [&](int j) { return c0 + j < p.V; };
  const auto write_o = [&](long long row, const float (&x)[4]) {
#pragma unroll
    for (int j = 0; j < 4; ++j)
      if (in_v(j)) o[o_at(row, j)] = from_float<Tin>(x[j]);
  };
  const float zeros[4] = {0.f, 0.f, 0.f, 0.f};

  // Tokens outside every sequence (docs/robustness.md §1) get o = 0: before the first
  // sequence (written by sequence 0's warps) and after the last (sequence N-1's).
  if (p.attrs.is_varlen && writer) {
    if (n == 0)
      for (int r = 0, e = clamp_offset(p.cu_seqlens[0], 0, p.T); r < e; ++r) write_o(r, zeros);
    if (n == p.N - 1)
      for (int r = clamp_offset(p.cu_seqlens[p.N], 0, p.T); r < p.T; ++r) write_o(r, zeros);
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
      for (int t = 0; t < ex.len; ++t) write_o(ex.row0 + t, zeros);
    return;
  }
  const size_t head_stride = static_cast<size_t>(K) * p.V;
  const auto state_of = [&](int row) {
    return Tile{p.state + (static_cast<size_t>(row) * p.H + h) * head_stride, p.V, rg, c0};
  };

  float s[M][4][4];
  state_of(row_in).load(s);

  const float a_exp = p.attrs.gate_mode == GateMode::kLogDecay ? 1.f : __expf(p.A_log[h]);
  constexpr int E = K / 32;  // key channels per lane in the token prep: i·32 + lane
  float dt_bias[E];
#pragma unroll
  for (int i = 0; i < E; ++i)
    dt_bias[i] = p.attrs.gate_mode == GateMode::kLogDecay ? 0.f : p.dt_bias[h * K + i * 32 + lane];
  const float4* decay4 = reinterpret_cast<const float4*>(vecs[warp][0]);
  const float4* key4 = reinterpret_cast<const float4*>(vecs[warp][1]);
  const float4* query4 = reinterpret_cast<const float4*>(vecs[warp][2]);

  for (int t = 0; t < ex.len; ++t) {
    const long long row = ex.row0 + t;
    const size_t kbase = (static_cast<size_t>(row) * p.H + h) * K;
    // Every load of the token before any arithmetic on them: a use in between would make the
    // next channel's loads wait for it, a memory latency per channel on top of the state's.
    float qv[E], kv[E], gv[E], vj[4];
#pragma unroll
    for (int i = 0; i < E; ++i) {
      const int j = i * 32 + lane;
      qv[i] = to_float(q[kbase + j]);
      kv[i] = to_float(k[kbase + j]);
      gv[i] = load_f(p.g, p.g_dtype, kbase + j);
    }
    float beta = load_f(p.beta, p.beta_dtype, static_cast<size_t>(row) * p.H + h);
#pragma unroll
    for (int j = 0; j < 4; ++j) vj[j] = in_v(j) ? to_float(v[o_at(row, j)]) : 0.f;

    float qq = 0.f, kk = 0.f;
    bool bad = false;
#pragma unroll
    for (int i = 0; i < E; ++i) {
      gv[i] = log_decay(p, gv[i], a_exp, dt_bias[i]);
      // After the floor a non-finite log-decay is NaN or +inf (-inf became the floor).
      bad |= non_finite(qv[i]) | non_finite(kv[i]) | non_finite(gv[i]);
      qq += qv[i] * qv[i];
      kk += kv[i] * kv[i];
    }
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
      const int j = i * 32 + lane;
      vecs[warp][0][j] = __expf(gv[i]);
      vecs[warp][1][j] = kv[i] * k_scale;
      vecs[warp][2][j] = qv[i] * q_scale;
    }
    __syncwarp();

#pragma unroll
    for (int j = 0; j < 4; ++j) {
      if (bad || non_finite(vj[j])) {
#pragma unroll
        for (int m = 0; m < M; ++m)
#pragma unroll
          for (int e = 0; e < 4; ++e) s[m][e][j] = __int_as_float(0x7fc00000);  // quiet NaN
      }
    }
    // Decay, then k·S per column: four independent chains of K/8 FMAs per lane.
    float ks[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
    for (int m = 0; m < M; ++m) {
      const float4 d4 = decay4[8 * m + rg], k4 = key4[8 * m + rg];
      const float d[4] = {d4.x, d4.y, d4.z, d4.w}, kx[4] = {k4.x, k4.y, k4.z, k4.w};
#pragma unroll
      for (int e = 0; e < 4; ++e)
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          s[m][e][j] *= d[e];
          ks[j] += kx[e] * s[m][e][j];
        }
    }
    float u[4], out[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
    for (int j = 0; j < 4; ++j) u[j] = beta * (vj[j] - row_group_sum(ks[j]));
#pragma unroll
    for (int m = 0; m < M; ++m) {
      const float4 k4 = key4[8 * m + rg], q4 = query4[8 * m + rg];
      const float kx[4] = {k4.x, k4.y, k4.z, k4.w}, qx[4] = {q4.x, q4.y, q4.z, q4.w};
#pragma unroll
      for (int e = 0; e < 4; ++e)
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          s[m][e][j] += kx[e] * u[j];
          out[j] += qx[e] * s[m][e][j];
        }
    }
#pragma unroll
    for (int j = 0; j < 4; ++j) out[j] = row_group_sum(out[j]);
    if (writer) write_o(row, out);
    if (p.per_token_slots && t < p.index_cols) {
      const int row_out = p.state_indices[static_cast<size_t>(n) * p.index_cols + t];
      if (row_out >= 0 && row_out < p.pool_slots) state_of(row_out).store(s);
    }
    __syncwarp();  // the next token's prep overwrites this one's vectors
  }
  if (!p.per_token_slots) state_of(row_in).store(s);
}

// Warps per (sequence, head): value columns over the columns one warp holds.
int decode_slabs(const DecodeParams& p) { return (p.V + kDecodeCols - 1) / kDecodeCols; }

template <int K, bool kVFirst, bool kVec, typename Tin>
cudaError_t launch(const DecodeParams& p, cudaStream_t stream) {
  const long long tasks = static_cast<long long>(p.N) * p.H * decode_slabs(p);
  const long long blocks = (tasks + kDecodeWarps - 1) / kDecodeWarps;
  if (blocks == 0) return cudaSuccess;
  kda_decode_kernel<K, kVFirst, kVec, Tin>
      <<<static_cast<unsigned>(blocks), kDecodeWarps * 32, 0, stream>>>(p);
  return cudaGetLastError();
}

// 16-byte state accesses where every one is aligned: a 16-byte aligned state and, in [K,V], a
// row pitch V that keeps them so.
template <int K, typename Tin>
cudaError_t launch_layout(const DecodeParams& p, cudaStream_t stream) {
  const bool aligned = reinterpret_cast<uintptr_t>(p.state) % 16 == 0;
  if (p.attrs.state_v_first)
    return aligned ? launch<K, true, true, Tin>(p, stream) : launch<K, true, false, Tin>(p, stream);
  return aligned && p.V % 4 == 0 ? launch<K, false, true, Tin>(p, stream)
                                 : launch<K, false, false, Tin>(p, stream);
}

template <typename Tin>
cudaError_t launch_dims(const DecodeParams& p, cudaStream_t stream) {
  return p.K == 64 ? launch_layout<64, Tin>(p, stream) : launch_layout<128, Tin>(p, stream);
}

}  // namespace

const char* decode_unsupported(const DecodeParams& p) {
  if (p.K != 64 && p.K != 128) return "the CUDA decode supports K in {64, 128}";
  if (p.V < 1) return "the CUDA decode needs V >= 1";
  if (static_cast<long long>(p.K) * p.V > 0x7fffffffLL)
    return "the CUDA decode needs K * V < 2^31 (32-bit offsets within a head's state)";
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
