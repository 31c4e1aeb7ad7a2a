// The token-parallel prep of the forward and the backward (docs/backward.md step 1): per (chunk
// slot, head) the gate activation, l2norm, the in-chunk cumulative decay Γ, the 16x16 matrices L
// and Aqk, T = (I+L)^-1, and the chunk record (chunks.cuh) the recurrences read; for the
// backward (kAux) also the fp32 factors its gradient kernel needs (PrepAux) and each head's
// first dead row (quarantine.cuh). kda_fwd.cu and kda_bwd.cu instantiate it.
//
// Every factor the recurrences see (e^{Γ_r}, e^{Γ_C−Γ_r}, e^{Γ_C}) is ≤ 1 for any gate, so they
// are exact for unbounded decays; only L and Aqk need e^{Γ_r−Γ_s}, which the prep computes per
// element unless the gate is bounded (safe gate, lower_bound ≥ −5: the span over 16 tokens is
// ≥ −80 and e^{Γ_r}·e^{−Γ_s} stays inside fp32; factored_gate).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "common/rules.h"
#include "kda/chunks.cuh"
#include "kda/kda_fwd.h"
#include "kda/mma.cuh"
#include "kda/transport_sm90.cuh"

namespace kda {

// What the backward's gradient kernel takes from the prep besides the record (one per head and
// chunk): the 16x16 factors in fp32 and the l2norm scales.
struct PrepAux {
  float T[kChunk][kChunk];   // (I+L)^-1, zeros above the diagonal
  float LL[kChunk][kChunk];  // L without β: Σ_d k_rd k_sd e^{Γ_rd−Γ_sd} for r > s, zeros elsewhere
  float rn[2 * kChunk];      // 1/|q_r| then 1/|k_r| (with use_qk_l2norm)
};

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

// The prep kernel: persistent CTAs of K threads (thread d owns key channel d), each walking the
// items (chunk slot, head) i = blockIdx.x + j·gridDim.x. With one CTA per item, an item's loads
// were exposed (ncu: mostly stalled on global loads). Here the q/k/g rows of the next item are in
// flight (cp.async) while one item is computed, the next item's scalars are prefetched into
// registers, and the finished record leaves shared memory in one bulk store. The loads are then
// hidden and the kernel is bound by its own instruction latencies (barriers, the serial
// cumulative sum and substitution), so resident warps matter more than pipeline depth: measured
// on H100 at B=1 T=8192 H=96, two stages at four CTAs per SM beat three stages at three.
constexpr int kPrepStages = 2;
constexpr int kPrepCtasPerSm = 4;

struct PrepItem {
  long long row0;  // first token row of the chunk
  int h, slot, len;  // len == 0: nothing to do (a varlen gap slot, or past the work)
  int n;  // the chunk's sequence
};

__device__ __forceinline__ PrepItem prep_item(const FwdParams& p, int slots, long long i) {
  if (i >= static_cast<long long>(slots) * p.H) return {0, 0, 0, 0, 0};
  // Heads vary fastest, so the CTAs running at one time read neighbouring rows of q, k and g.
  const int slot = static_cast<int>(i / p.H), h = static_cast<int>(i % p.H);
  const Chunk ch = locate(p, slot);
  return {ch.row0, h, slot, ch.len, ch.n};
}

// Dynamic shared memory of the prep kernel: the record being built (in its global layout), the
// input stages (q, k: [16][K] Tin; g: [16][K] of its own dtype), and the pair-product operands.
template <int K, bool kFactored, bool kAux, typename Tq>
struct PrepSmem {
  static constexpr int kAuxAt = (Rec<K>::kBytes + 127) / 128 * 128;
  static constexpr int kStage0 = kAuxAt + (kAux ? (sizeof(PrepAux) + 127) / 128 * 128 : 0);
  // Factored: bf16 K⊙e^Γ, K⊙e^−Γ and (for records whose Q̃ is not bf16) Q̃ as mma operands.
  static constexpr bool kQCopy = !std::is_same_v<Tq, __nv_bfloat16>;
  static constexpr int kScratch =
      kFactored ? (kQCopy ? 3 : 2) * kChunk * (K + 8) * 2 : 3 * kChunk * (K + 4) * 4;
  __host__ __device__ static int stage_bytes(const FwdParams& p) {
    return kChunk * K * (4 + (p.g_dtype == DType::kF32 ? 4 : 2));
  }
  static int bytes(const FwdParams& p) { return kStage0 + kPrepStages * stage_bytes(p) + kScratch; }
};

// Tq: the dtype of the record's Q̃ and Aqk (bf16 for the forward, that of q for the backward);
// kAux: also write the PrepAux of each item (the backward).
template <int K, bool kFactored, typename Tin, typename Tq, bool kAux>
__global__ void __launch_bounds__(K, kPrepCtasPerSm)
    kda_prep_kernel(FwdParams p, uint8_t* __restrict__ ws, PrepAux* __restrict__ auxs,
                    int* __restrict__ dead_rows, int slots) {
  using SL = PrepSmem<K, kFactored, kAux, Tq>;
  constexpr int KP = K + 4;  // padding keeps the pair loop's row reads off one bank
  constexpr int kWarps = K / 32;
  // Row operands of the pair products: fp32 [16][KP] for the exact path, bf16 [16][KH] (mma
  // operands, ldmatrix-friendly pitch, the record's own pitch) for the factored one.
  constexpr int KH = K + 8;
  extern __shared__ __align__(128) uint8_t smem[];
  uint8_t* rec = smem;
  const int gb = p.g_dtype == DType::kF32 ? 4 : 2;
  const int stage_bytes = SL::stage_bytes(p);
  uint8_t* stages = smem + SL::kStage0;
  uint8_t* scratch = stages + kPrepStages * stage_bytes;
  auto X = reinterpret_cast<float(*)[KP]>(scratch);
  auto Y = reinterpret_cast<float(*)[KP]>(scratch + kChunk * KP * 4);
  auto Z = reinterpret_cast<float(*)[KP]>(scratch + 2 * kChunk * KP * 4);
  auto Yh = reinterpret_cast<__nv_bfloat16(*)[KH]>(scratch);
  auto Zh = reinterpret_cast<__nv_bfloat16(*)[KH]>(scratch + kChunk * KH * 2);
  auto Xh = reinterpret_cast<__nv_bfloat16(*)[KH]>(scratch + 2 * kChunk * KH * 2);
  PrepAux& aux_s = *reinterpret_cast<PrepAux*>(smem + SL::kAuxAt);
  __shared__ float Ls[kChunk][kChunk + 1], As[kChunk][kChunk + 1];
  __shared__ __align__(16) float Tb[kChunk][kChunk];
  // Tβ as the bf16 A operand of W's mma (factored path); +8 keeps ldmatrix conflict-free.
  __shared__ __align__(16) __nv_bfloat16 Tbh[kChunk][kChunk + 8];
  __shared__ float beta_s[kChunk], red[kWarps][32], rnorm[32];
  __shared__ uint32_t bad_s[kWarps];

  const int d = threadIdx.x, lane = d & 31, warp = d >> 5;
  const long long grid = gridDim.x;

  Tq* rq = reinterpret_cast<Tq*>(rec + Rec<K>::kQ);
  __nv_bfloat16* rw = reinterpret_cast<__nv_bfloat16*>(rec + Rec<K>::kW);
  __nv_bfloat16* rkt = reinterpret_cast<__nv_bfloat16*>(rec + Rec<K>::kKt);
  Tq* raq = reinterpret_cast<Tq*>(rec + Rec<K>::kAqk);
  Tin* rtb = reinterpret_cast<Tin*>(rec + Rec<K>::kTb);
  float* reg = reinterpret_cast<float*>(rec + Rec<K>::kEg);

  // Rows past the end of the sequence load the chunk's first row (finite values the compute
  // replaces by q = k = 0, g = 0, β = 0: they then change neither the state nor any output).
  auto load_item = [&](const PrepItem& it, int stage) {
    if (it.len == 0) return;
    uint8_t* st = stages + stage * stage_bytes;
    constexpr int kQkPieces = K * 2 / 16;  // 16-byte pieces per q or k row
    constexpr int kQkShift = K == 64 ? 3 : 4;
    static_assert(kQkPieces == 1 << kQkShift);
    const size_t rs = static_cast<size_t>(p.H) * K;
    const size_t e0 = (static_cast<size_t>(it.row0) * p.H + it.h) * K;
#pragma unroll
    for (int i = d; i < kChunk * kQkPieces; i += K) {
      const int r = i / kQkPieces, pc = i % kQkPieces;
      const size_t e = e0 + (r < it.len ? r : 0) * rs + pc * 8;
      ptx::cp_async16(st + i * 16, static_cast<const Tin*>(p.q) + e);
      ptx::cp_async16(st + kChunk * K * 2 + i * 16, static_cast<const Tin*>(p.k) + e);
    }
    const int g_shift = gb == 4 ? kQkShift + 1 : kQkShift;  // log2 of 16-byte pieces per g row
    for (int i = d; i < kChunk << g_shift; i += K) {
      const int r = i >> g_shift, pc = i & ((1 << g_shift) - 1);
      const size_t e = e0 + (r < it.len ? r : 0) * rs;
      ptx::cp_async16(st + 2 * kChunk * K * 2 + i * 16,
                      static_cast<const uint8_t*>(p.g) + e * gb + pc * 16);
    }
  };
  // β (thread d < 16 holds token d), dt_bias and A_log of an item, one item ahead.
  auto load_scalars = [&](const PrepItem& it, float& b, float& dtb, float& alog) {
    b = 0.f;
    if (it.len > 0 && d < it.len)
      b = load_f(p.beta, p.beta_dtype, static_cast<size_t>(it.row0 + d) * p.H + it.h);
    dtb = p.attrs.gate_mode != GateMode::kLogDecay && it.len > 0 ? p.dt_bias[it.h * K + d] : 0.f;
    alog = p.attrs.gate_mode != GateMode::kLogDecay && it.len > 0 ? p.A_log[it.h] : 0.f;
  };

  // Two stages: item i computes from one while item i + grid loads into the other. Each item's
  // indices are worked out once and carried (ncu: integer index arithmetic, three prep_item
  // calls per item, was most of the instructions before the item's first barrier).
  static_assert(kPrepStages == 2, "the loop carries exactly one item ahead");
  const long long n_items = static_cast<long long>(slots) * p.H;
  PrepItem ahead = prep_item(p, slots, blockIdx.x);
  load_item(ahead, 0);
  ptx::cp_async_commit();
  float nb, ndtb, nalog;
  load_scalars(ahead, nb, ndtb, nalog);

  int stage = 0;
  for (long long i = blockIdx.x; i < n_items; i += grid, stage ^= 1) {
    const PrepItem it = ahead;
    const float beta_raw = nb, dtb = ndtb, a_log = nalog;
    ahead = prep_item(p, slots, i + grid);
    // The stage refilled here was last read at the start of the previous item, before its
    // barriers.
    load_item(ahead, stage ^ 1);
    ptx::cp_async_commit();
    load_scalars(ahead, nb, ndtb, nalog);
    ptx::cp_async_wait<kPrepStages - 1>();
    if (d == 0) ptx::bulk_wait_read_all();  // the previous record has left `rec`
    __syncthreads();
    if (it.len == 0) continue;
    const int len = it.len, h = it.h;

    const uint8_t* st = stages + stage * stage_bytes;
    const Tin* q_s = reinterpret_cast<const Tin*>(st);
    const Tin* k_s = reinterpret_cast<const Tin*>(st + kChunk * K * 2);
    const uint8_t* g_s = st + 2 * kChunk * K * 2;
    const float a_exp = p.attrs.gate_mode != GateMode::kLogDecay ? __expf(a_log) : 0.f;

    // Rows [0, live) from the stage, the others as rows past the sequence (q = k = g = β = 0).
    float qv[kChunk], kv[kChunk], G[kChunk];
    float beta_d;  // β of token d (thread d < 16), after the sigmoid
    auto load_rows = [&](int live) {
      beta_d = d < live ? (p.attrs.use_beta_sigmoid ? sigmoid_f(beta_raw) : beta_raw) : 0.f;
#pragma unroll
      for (int r = 0; r < kChunk; ++r) {
        const bool ok = r < live;
        qv[r] = ok ? to_float(q_s[r * K + d]) : 0.f;
        kv[r] = ok ? to_float(k_s[r * K + d]) : 0.f;
        const uint32_t graw = gb == 4 ? reinterpret_cast<const uint32_t*>(g_s)[r * K + d]
                                      : reinterpret_cast<const uint16_t*>(g_s)[r * K + d];
        G[r] = ok ? log_decay(p, bits_to_float(graw, p.g_dtype), a_exp, dtb) : 0.f;
      }
    };
    load_rows(len);

    // docs/robustness.md §3: the chunk's first row with a non-finite q, k or β, or a NaN or
    // +inf log-decay (after the floor: −inf is a legal reset), and every later row act as rows
    // past the sequence (q = k = g = β = 0): otherwise 0·NaN in the chunk's products would
    // reach the earlier rows. The forward's record then marks them (Q̃ rows and e^{Γ_C} NaN:
    // their outputs, the state and every later output are NaN). Clean chunks pay a sum and a
    // bit test per thread: any non-finite value makes the sum non-finite (so does a finite
    // overflow, which the exact check below then clears), and the vote rides on the barrier
    // the record's rows need anyway; a chunk that fails it is rebuilt with its rows cut.
    bool suspect;
    {
      float sum[4] = {d < len ? beta_d : 0.f, 0.f, 0.f, 0.f};
#pragma unroll
      for (int r = 0; r < kChunk; ++r) sum[r & 3] += (qv[r] + kv[r]) + G[r];
      suspect = non_finite((sum[0] + sum[1]) + (sum[2] + sum[3]));
    }
    int dead_from = kChunk;
    float kd[kChunk];  // K⊙e^Γ, kept for W
    constexpr float kNaN = __builtin_nanf("");

    // β, the l2norm, the in-chunk cumulative decay Γ and the record's token rows (and the
    // product operands) from qv, kv, G and beta_d, with the rows from dead_from on marked.
    auto build = [&] {
      if (d < kChunk) beta_s[d] = beta_d;
      if (p.attrs.use_qk_l2norm) {
        // 32 row sums (16 of q², 16 of k²) over the CTA, as 1/norms.
        float acc[32];
#pragma unroll
        for (int r = 0; r < kChunk; ++r) {
          acc[r] = qv[r] * qv[r];
          acc[kChunk + r] = kv[r] * kv[r];
        }
        block_sum32<kWarps>(acc, red, rnorm,
                            [](float sum) { return rsqrtf(sum + kda_rules::kL2NormEps); });
        if constexpr (kAux)
          if (d < 2 * kChunk) aux_s.rn[d] = rnorm[d];
#pragma unroll
        for (int r = 0; r < kChunk; ++r) {
          qv[r] *= rnorm[r];
          kv[r] *= rnorm[kChunk + r];
        }
      }

#pragma unroll
      for (int r = 1; r < kChunk; ++r) G[r] += G[r - 1];

      const float gc = G[kChunk - 1];
      // The backward's records stay finite: its chains recompute the states from them.
      const bool mark = !kAux && dead_from < kChunk;
      reg[d] = mark ? kNaN : __expf(gc);
#pragma unroll
      for (int r = 0; r < kChunk; ++r) {
        const float e = __expf(G[r]);
        const float qd = p.attrs.scale * qv[r] * e;
        kd[r] = kv[r] * e;
        rq[r * KH + d] = Tq(mark && r >= dead_from ? kNaN : qd);
        rkt[r * KH + d] = __float2bfloat16_rn(kv[r] * __expf(gc - G[r]));
        if constexpr (kFactored) {
          Yh[r][d] = __float2bfloat16_rn(kd[r]);
          Zh[r][d] = __float2bfloat16_rn(kv[r] * __expf(-G[r]));
          if constexpr (SL::kQCopy) Xh[r][d] = __float2bfloat16_rn(qd);
        } else {
          X[r][d] = p.attrs.scale * qv[r];
          Y[r][d] = kv[r];
          Z[r][d] = G[r] * kda_rules::kLog2e;
        }
      }
    };
    // One build for a clean chunk (the common case); a second for a chunk with a bad row, after
    // the exact check found it. One copy of the code: two would spill.
    for (bool check = suspect;;) {
      build();
      if (!__syncthreads_or(check)) break;
      // The exact check, on the raw values (build normalised qv and kv in place).
      load_rows(len);
      uint32_t bad = 0;
#pragma unroll
      for (int r = 0; r < kChunk; ++r)
        if (r < len && (non_finite(qv[r]) || non_finite(kv[r]) || non_finite(G[r])))
          bad |= 1u << r;
      if (d < len && non_finite(beta_d)) bad |= 1u << d;
      const uint32_t warp_bad = __reduce_or_sync(0xffffffffu, bad);
      if (lane == 0) bad_s[warp] = warp_bad;
      __syncthreads();
      uint32_t all = 0;
#pragma unroll
      for (int w = 0; w < kWarps; ++w) all |= bad_s[w];
      if (!all) break;  // a finite overflow: the first build stands (kd and the smem rows)
      dead_from = __ffs(all) - 1;
      load_rows(dead_from);
      // The backward's kernels learn each head's first dead row from here (quarantine.cuh).
      if constexpr (kAux)
        if (d == 0) atomicMin(dead_rows + it.n * p.H + h, static_cast<int>(it.row0 + dead_from));
      check = false;
    }

    if constexpr (kFactored) {
      // L = Diag(β)·(K⊙e^Γ)(K⊙e^−Γ)ᵀ on warp 0, Aqk = Q̃(K⊙e^−Γ)ᵀ on warp 1, as 16x16xK mma.
      if (warp < 2) {
        const __nv_bfloat16* a_rows;
        if constexpr (SL::kQCopy) a_rows = warp == 0 ? &Yh[0][0] : &Xh[0][0];
        else a_rows = warp == 0 ? &Yh[0][0] : rq;
        const int g = lane >> 2, t = lane & 3;
        float acc[2][4] = {};
#pragma unroll
        for (int ks = 0; ks < K / 16; ++ks) {
          uint32_t a[4], b[4];
          ptx::ldsm_x4(a, a_rows + ((lane & 7) + ((lane >> 3) & 1) * 8) * KH + ks * 16 +
                              (lane >> 4) * 8);
          ptx::ldsm_x4(b, &Zh[(lane & 7) + ((lane >> 4) & 1) * 8][ks * 16 + ((lane >> 3) & 1) * 8]);
          ptx::mma16816<__nv_bfloat16>(acc[0], a, b[0], b[1]);
          ptx::mma16816<__nv_bfloat16>(acc[1], a, b[2], b[3]);
        }
#pragma unroll
        for (int nt = 0; nt < 2; ++nt)
#pragma unroll
          for (int j = 0; j < 4; ++j) {
            const int r = g + (j >> 1) * 8, c2 = nt * 8 + t * 2 + (j & 1);
            if (warp == 0) {
              Ls[r][c2] = beta_s[r] * acc[nt][j];
              if constexpr (kAux) aux_s.LL[r][c2] = c2 < r ? acc[nt][j] : 0.f;
            } else {
              As[r][c2] = acc[nt][j];
            }
          }
      }
    } else {
      // Exact: e^{Γ_r−Γ_s} per element. 120 strictly-lower pairs (L and Aqk), then the 16
      // diagonal ones (Aqk only).
      for (int pr = d; pr < 136; pr += K) {
        int r, s;
        if (pr < 120) {
          r = 1;
          while ((r + 1) * r / 2 <= pr) ++r;
          s = pr - r * (r - 1) / 2;
        } else {
          r = s = pr - 120;
        }
        float acc_a = 0.f, acc_l = 0.f;
#pragma unroll 4
        for (int j = 0; j < K; j += 4) {
          const float4 x = *reinterpret_cast<const float4*>(&X[r][j]);
          const float4 y = *reinterpret_cast<const float4*>(&Y[r][j]);
          const float4 ys = *reinterpret_cast<const float4*>(&Y[s][j]);
          const float4 gr = *reinterpret_cast<const float4*>(&Z[r][j]);
          const float4 gs = *reinterpret_cast<const float4*>(&Z[s][j]);
          const float z0 = ys.x * exp2f(gr.x - gs.x), z1 = ys.y * exp2f(gr.y - gs.y);
          const float z2 = ys.z * exp2f(gr.z - gs.z), z3 = ys.w * exp2f(gr.w - gs.w);
          acc_a += x.x * z0 + x.y * z1 + x.z * z2 + x.w * z3;
          acc_l += y.x * z0 + y.y * z1 + y.z * z2 + y.w * z3;
        }
        As[r][s] = acc_a;
        Ls[r][s] = beta_s[r] * acc_l;
        if constexpr (kAux) aux_s.LL[r][s] = s < r ? acc_l : 0.f;
      }
      if constexpr (kAux)
        for (int e = d; e < kChunk * kChunk; e += K)
          if (e % kChunk > e / kChunk) aux_s.LL[e / kChunk][e % kChunk] = 0.f;
    }
    __syncthreads();
    for (int e = d; e < kChunk * kChunk; e += K) {
      const int r = e / kChunk, s = e % kChunk;
      raq[e] = Tq(s <= r ? As[r][s] : 0.f);
    }
    if (d < kChunk) {
      // Forward substitution for column j = d of T = (I+L)^-1 (unit lower triangular).
      float tc[kChunk];
#pragma unroll
      for (int r = 0; r < kChunk; ++r) {
        float v = (r == d) ? 1.f : 0.f;
#pragma unroll
        for (int s = 0; s < r; ++s) v -= Ls[r][s] * tc[s];
        tc[r] = v;
      }
      const float b = beta_s[d];
#pragma unroll
      for (int r = 0; r < kChunk; ++r) {
        if constexpr (kAux) aux_s.T[r][d] = tc[r];
        const float tb = tc[r] * b;
        if constexpr (kFactored) Tbh[r][d] = __float2bfloat16_rn(tb);
        else Tb[r][d] = tb;
        rtb[r * kChunk + d] = Tin(tb);
      }
    }
    __syncthreads();

    if constexpr (kFactored) {
      // W = Tβ·(K⊙e^Γ) as a 16x16xK mma, 32 key columns per warp, from the bf16 operands
      // already in shared memory (Yh holds K⊙e^Γ). The per-thread FMA loop it replaces was
      // 17% of the prep's stall samples (ncu, H=96).
      constexpr int kCols = K / kWarps;
      const int g = lane >> 2, t = lane & 3;
      uint32_t a[4];
      ptx::ldsm_x4(a, &Tbh[(lane & 7) + ((lane >> 3) & 1) * 8][(lane >> 4) * 8]);
      const int krow = (lane & 7) + ((lane >> 3) & 1) * 8;
#pragma unroll
      for (int nt = 0; nt < kCols / 8; nt += 2) {
        const int col0 = warp * kCols + nt * 8;
        uint32_t b[4];
        ptx::ldsm_x4_trans(b, &Yh[krow][col0 + (lane >> 4) * 8]);
        float acc[2][4] = {};
        ptx::mma16816<__nv_bfloat16>(acc[0], a, b[0], b[1]);
        ptx::mma16816<__nv_bfloat16>(acc[1], a, b[2], b[3]);
#pragma unroll
        for (int i = 0; i < 2; ++i)
#pragma unroll
          for (int half = 0; half < 2; ++half) {
            const int row = g + half * 8, col = col0 + i * 8 + 2 * t;
            *reinterpret_cast<uint32_t*>(rw + row * KH + col) =
                ptx::pack_bf16(-acc[i][2 * half], -acc[i][2 * half + 1]);
          }
      }
    } else {
#pragma unroll
      for (int r = 0; r < kChunk; ++r) {
        float w = 0.f;
#pragma unroll
        for (int s4 = 0; s4 <= r; s4 += 4) {  // whole-row broadcast reads; Tb[r][s > r] = 0
          const float4 tb = *reinterpret_cast<const float4*>(&Tb[r][s4]);
          w += tb.x * kd[s4] + tb.y * kd[s4 + 1] + tb.z * kd[s4 + 2] + tb.w * kd[s4 + 3];
        }
        rw[r * KH + d] = __float2bfloat16_rn(-w);
      }
    }
    ptx::fence_proxy_async_smem();
    __syncthreads();
    if (d == 0) {
      const size_t hs = static_cast<size_t>(h) * slots + it.slot;
      ptx::bulk_s2g(ws + hs * Rec<K>::kBytes, rec, Rec<K>::kBytes);
      if constexpr (kAux) ptx::bulk_s2g(auxs + hs, &aux_s, sizeof(PrepAux));
    }
  }
  if (d == 0) ptx::bulk_wait_all();
}

// Launches the prep over every (chunk slot, head) item: as many persistent CTAs as fit on the
// device's `sms` multiprocessors, or one per item if fewer. auxs and dead_rows only with kAux.
template <int K, bool kFactored, typename Tin, typename Tq, bool kAux>
cudaError_t launch_prep(const FwdParams& p, uint8_t* ws, PrepAux* auxs, int* dead_rows,
                        int slots, int sms, cudaStream_t stream) {
  auto kernel = kda_prep_kernel<K, kFactored, Tin, Tq, kAux>;
  const int smem = PrepSmem<K, kFactored, kAux, Tq>::bytes(p);
  KDA_TRY(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
  int per_sm = 0;
  KDA_TRY(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, K, smem));
  const long long items = static_cast<long long>(slots) * p.H;
  const int grid = static_cast<int>(std::min<long long>(items, std::max(per_sm, 1) * sms));
  kernel<<<grid, K, smem, stream>>>(p, ws, auxs, dead_rows, slots);
  return cudaGetLastError();
}

}  // namespace kda
