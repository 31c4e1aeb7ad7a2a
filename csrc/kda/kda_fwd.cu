// Hopper forward of Kimi Delta Attention in two launches.
//
// 1. prep (persistent CTAs over the (chunk slot, head) items, token-parallel): gate activation,
//    l2norm, the in-chunk cumulative decay Γ, the 16x16 matrices L and Aqk, T = (I+L)^-1, and
//    the per-chunk operands of the recurrence, written to a workspace record per (head, chunk).
//    The backward runs the same kernel (prep_for_backward), which then also writes the fp32
//    factors its gradient kernel needs (PrepAux).
// 2. recurrence (grid: value blocks x heads x sequences): each warp owns 16 value columns of the
//    state S (all K keys), kept transposed in fp32 mma accumulators for the whole sequence, so the
//    accumulator layout doubles as the bf16 A/B operand layout and S never leaves registers.
//    Per chunk:  Vnᵀ = Vᵀ(Tβ)ᵀ + Sᵀ(−W)ᵀ,  Oᵀ = SᵀQ̃ᵀ + VnᵀAqkᵀ,  Sᵀ = Sᵀ·Diag(e^{Γ_C}) + VnᵀK̃.
//    The next chunks' records are prefetched with cp.async while the current one is computed.
//
// Every factor the recurrence sees (e^{Γ_r}, e^{Γ_C−Γ_r}, e^{Γ_C}) is ≤ 1 for any gate, so it is
// exact for unbounded decays; only L and Aqk need e^{Γ_r−Γ_s}, which prep computes per element
// unless the gate is bounded (safe gate, lower_bound ≥ −5: the span over 16 tokens is ≥ −80 and
// e^{Γ_r}·e^{−Γ_s} stays inside fp32).
#include "kda/kda_fwd.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cstdlib>
#include <type_traits>

#include "kda/chunks.cuh"
#include "kda/ptx.cuh"
#include "kda/quarantine.cuh"

namespace kda {
namespace {

size_t rec_bytes(int K) { return K == 64 ? Rec<64>::kBytes : Rec<128>::kBytes; }

// ---------------------------------------------------------------------------------------------
// Kernel 1: persistent CTAs of K threads (thread d owns key channel d), each walking the items
// (chunk slot, head) i = blockIdx.x + j·gridDim.x. With one CTA per item, an item's loads were
// exposed (ncu: mostly stalled on global loads). Here the q/k/g rows of the next item are in
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
    dtb = p.gate_mode && it.len > 0 ? p.dt_bias[it.h * K + d] : 0.f;
    alog = p.gate_mode && it.len > 0 ? p.A_log[it.h] : 0.f;
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
    const float a_exp = p.gate_mode ? __expf(a_log) : 0.f;

    // Rows [0, live) from the stage, the others as rows past the sequence (q = k = g = 0).
    float qv[kChunk], kv[kChunk], G[kChunk];
    auto load_rows = [&](int live) {
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
    float beta_d = d < len && p.use_beta_sigmoid ? sigmoid_f(beta_raw) : beta_raw;

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
      if (p.use_qk_l2norm) {
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
        const float qd = p.scale * qv[r] * e;
        kd[r] = kv[r] * e;
        rq[r * KH + d] = Tq(mark && r >= dead_from ? kNaN : qd);
        rkt[r * KH + d] = __float2bfloat16_rn(kv[r] * __expf(gc - G[r]));
        if constexpr (kFactored) {
          Yh[r][d] = __float2bfloat16_rn(kd[r]);
          Zh[r][d] = __float2bfloat16_rn(kv[r] * __expf(-G[r]));
          if constexpr (SL::kQCopy) Xh[r][d] = __float2bfloat16_rn(qd);
        } else {
          X[r][d] = p.scale * qv[r];
          Y[r][d] = kv[r];
          Z[r][d] = G[r] * 1.4426950408889634f;
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
      beta_d = d < len && p.use_beta_sigmoid ? sigmoid_f(beta_raw) : beta_raw;
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
      if (d >= dead_from) beta_d = 0.f;
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

// ---------------------------------------------------------------------------------------------
// Kernel 2: the chunk recurrence. CTA = (value block of 16·NW columns, head, sequence); warp w
// owns value columns [16w, 16w+16) of the block. Fragment maps (m16n8k16, g = lane/4, t = lane%4):
//   s[nt][0..1] = Sᵀ(value g, key 8nt+2t+{0,1}), s[nt][2..3] = the same at value g+8.
template <int K, int NW, typename Tin>
struct RecurrenceSmem {
  static constexpr int BV = 16 * NW;
  static constexpr int VP = BV + 8;  // +16 bytes per row: conflict-free ldmatrix
  static constexpr int kV = Rec<K>::kBytes;
  static constexpr int kStage = kV + kChunk * VP * 2;
  // A chunk record takes microseconds to arrive while a chunk computes in well under one, so
  // prefetch as deep as ~110 KB allows (two CTAs still fit on an SM).
  static constexpr int kStages = std::min(8, std::max(4, 110 * 1024 / kStage));
  static constexpr int kOutPitch = 16 + 8;
  static constexpr int kOut = kStages * kStage;
  static constexpr int kBar = kOut + NW * kChunk * kOutPitch * 2;
  static constexpr int kBytes = kBar + 2 * kStages * 8;  // "full" and "empty" barriers
};

template <int K, int NW, typename Tin>
__global__ void __launch_bounds__(NW * 32, 1) kda_recurrence_kernel(FwdParams p,
                                                                 const uint8_t* __restrict__ ws,
                                                                 int slots) {
  using L = RecurrenceSmem<K, NW, Tin>;
  using R = Rec<K>;
  constexpr int BV = L::BV, KP = R::kPitch, VP = L::VP, kStages = L::kStages;
  extern __shared__ __align__(128) uint8_t smem[];
  using Ring = StepRing<kStages, NW, L::kStage, L::kBar>;
  const Ring ring{smem};

  const int vb = blockIdx.x, h = blockIdx.y, n = blockIdx.z;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int g = lane >> 2, t = lane & 3;
  const Seq sq = seq_of(p, n);
  const int nch = (sq.len + kChunk - 1) / kChunk;
  const uint8_t* rec0 = ws + (static_cast<size_t>(h) * slots + sq.slot0) * R::kBytes;
  const Tin* vsrc = static_cast<const Tin*>(p.v);

  // Warp 0 fetches chunk c's record with one bulk copy. Each warp fetches its own 16 value
  // columns of the chunk's 16 rows of V with one cp.async per lane: issuing the 16 row copies
  // through the bulk engine serialised warp 0 (ncu: ~45% of its time) and starved every warp.
  auto fetch_record = [&](int c) {
    ring.fetch_record(c, rec0 + static_cast<size_t>(c) * R::kBytes, 0, R::kBytes, lane);
  };
  auto fetch_v = [&](int c) {
    ptx::warp_tile16_cp_async(
        reinterpret_cast<Tin*>(ring.stage(c) + L::kV) + warp * 16, VP,
        vsrc + (static_cast<size_t>(sq.row0 + c * kChunk) * p.H + h) * p.V + vb * BV + warp * 16,
        static_cast<size_t>(p.H) * p.V, sq.len - c * kChunk, lane);
  };
  ring.start(nch, warp, fetch_record, fetch_v);

  // Initial state, transposed into the accumulator layout.
  float s[K / 8][4];
  const size_t st_base = (static_cast<size_t>(n) * p.H + h) * K * p.V;
  const int v_lo = vb * BV + warp * 16 + g;
  auto st_index = [&](int nt, int j) {
    return state_index<K>(p, st_base, v_lo + (j >> 1) * 8, nt * 8 + t * 2 + (j & 1));
  };
#pragma unroll
  for (int nt = 0; nt < K / 8; ++nt)
#pragma unroll
    for (int j = 0; j < 4; ++j) s[nt][j] = p.initial_state[st_index(nt, j)];

  Tin* ostage = reinterpret_cast<Tin*>(smem + L::kOut) + warp * kChunk * L::kOutPitch;
  Tin* out = static_cast<Tin*>(p.o);
  const int brow = (lane & 7) + ((lane >> 4) & 1) * 8, bcol = ((lane >> 3) & 1) * 8;
  for (int c = 0; c < nch; ++c) {
    ring.refill(c, nch, warp, fetch_record, fetch_v);
    ring.wait(c);

    const uint8_t* st = ring.stage(c);
    const RecView<K, __nv_bfloat16, Tin> record(st);
    const Tin* vs = reinterpret_cast<const Tin*>(st + L::kV);

    // Two accumulator sets halve the dependent mma chain of the K reduction.
    float vn[2][4] = {}, ot[2][4] = {}, vn1[2][4] = {}, ot1[2][4] = {};
    bool v_bad;  // a non-finite v in this lane's fragment (quarantine.cuh)
    {
      uint32_t av[4], bt[4];
      ptx::ldsm_x4_trans(av, vs + brow * VP + warp * 16 + bcol);
      v_bad = sanitize_v_fragment<Tin>(av);
      ptx::ldsm_x4(bt, record.tb + brow * kChunk + bcol);
      ptx::mma16816<Tin>(vn1[0], av, bt[0], bt[1]);
      ptx::mma16816<Tin>(vn1[1], av, bt[2], bt[3]);
    }
#pragma unroll
    for (int ks = 0; ks < K / 16; ++ks) {
      float (&va)[2][4] = (ks & 1) ? vn1 : vn;
      float (&oa)[2][4] = (ks & 1) ? ot1 : ot;
      const uint32_t a[4] = {ptx::pack_bf16(s[2 * ks][0], s[2 * ks][1]),
                             ptx::pack_bf16(s[2 * ks][2], s[2 * ks][3]),
                             ptx::pack_bf16(s[2 * ks + 1][0], s[2 * ks + 1][1]),
                             ptx::pack_bf16(s[2 * ks + 1][2], s[2 * ks + 1][3])};
      uint32_t bw[4], bq[4];
      ptx::ldsm_x4(bw, record.w + brow * KP + ks * 16 + bcol);
      ptx::ldsm_x4(bq, record.q + brow * KP + ks * 16 + bcol);
      ptx::mma16816<__nv_bfloat16>(va[0], a, bw[0], bw[1]);
      ptx::mma16816<__nv_bfloat16>(va[1], a, bw[2], bw[3]);
      ptx::mma16816<__nv_bfloat16>(oa[0], a, bq[0], bq[1]);
      ptx::mma16816<__nv_bfloat16>(oa[1], a, bq[2], bq[3]);
    }
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        vn[i][j] += vn1[i][j];
        ot[i][j] += ot1[i][j];
      }
    const uint32_t avn[4] = {ptx::pack_bf16(vn[0][0], vn[0][1]), ptx::pack_bf16(vn[0][2], vn[0][3]),
                             ptx::pack_bf16(vn[1][0], vn[1][1]), ptx::pack_bf16(vn[1][2], vn[1][3])};
    {
      uint32_t ba[4];
      ptx::ldsm_x4(ba, record.aqk + brow * kChunk + bcol);
      ptx::mma16816<__nv_bfloat16>(ot[0], avn, ba[0], ba[1]);
      ptx::mma16816<__nv_bfloat16>(ot[1], avn, ba[2], ba[3]);
    }
    const int krow = (lane & 7) + ((lane >> 3) & 1) * 8;
#pragma unroll
    for (int nt = 0; nt < K / 8; nt += 2) {
      uint32_t bk[4];
      ptx::ldsm_x4_trans(bk, record.kt + krow * KP + (nt + (lane >> 4)) * 8);
      const float2 e0 = *reinterpret_cast<const float2*>(record.eg + nt * 8 + t * 2);
      const float2 e1 = *reinterpret_cast<const float2*>(record.eg + nt * 8 + 8 + t * 2);
      s[nt][0] *= e0.x; s[nt][1] *= e0.y; s[nt][2] *= e0.x; s[nt][3] *= e0.y;
      s[nt + 1][0] *= e1.x; s[nt + 1][1] *= e1.y; s[nt + 1][2] *= e1.x; s[nt + 1][3] *= e1.y;
      ptx::mma16816<__nv_bfloat16>(s[nt], avn, bk[0], bk[1]);
      ptx::mma16816<__nv_bfloat16>(s[nt + 1], avn, bk[2], bk[3]);
    }

    if (__any_sync(0xffffffffu, v_bad)) {
      // A quarantined column's outputs from its first bad row on, and its state, are NaN.
      const V16Quarantine vq = first_bad_rows_v(vs + warp * 16, VP, sq.len - c * kChunk, lane);
#pragma unroll
      for (int nt = 0; nt < 2; ++nt)
#pragma unroll
        for (int j = 0; j < 4; ++j)
          if (nt * 8 + t * 2 + (j & 1) >= vq.first[j >> 1]) ot[nt][j] = __int_as_float(0x7fffffff);
#pragma unroll
      for (int nt = 0; nt < K / 8; ++nt)
#pragma unroll
        for (int j = 0; j < 4; ++j)
          if (vq.first[j >> 1] < kChunk) s[nt][j] = __int_as_float(0x7fffffff);
    }

    // Oᵀ tile → [token][value] in shared memory → one 16-byte store per lane.
#pragma unroll
    for (int nt = 0; nt < 2; ++nt)
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int tok = nt * 8 + t * 2 + (j & 1), v = g + (j >> 1) * 8;
        if constexpr (std::is_same_v<Tin, __half>)
          ostage[tok * L::kOutPitch + v] = __float2half_rn(ot[nt][j]);
        else
          ostage[tok * L::kOutPitch + v] = __float2bfloat16_rn(ot[nt][j]);
      }
    __syncwarp();
    ring.release(c, lane);
    {
      const int tok = lane >> 1, half = lane & 1;
      const int gt = c * kChunk + tok;
      if (gt < sq.len) {
        const uint4 val = *reinterpret_cast<const uint4*>(ostage + tok * L::kOutPitch + half * 8);
        *reinterpret_cast<uint4*>(out + (static_cast<size_t>(sq.row0 + gt) * p.H + h) * p.V +
                                  vb * BV + warp * 16 + half * 8) = val;
      }
    }
    __syncwarp();
  }

#pragma unroll
  for (int nt = 0; nt < K / 8; ++nt)
#pragma unroll
    for (int j = 0; j < 4; ++j) p.final_state[st_index(nt, j)] = s[nt][j];

  // Tokens before the first or after the last varlen sequence belong to none: their output is
  // zero (docs/robustness.md §1). The first and last sequences' CTAs write them.
  auto zero_tokens = [&](long long from, long long to) {
    for (long long i = from * 2 + tid; i < 2 * to; i += NW * 32) {
      const long long tok = i >> 1;
      const int half = static_cast<int>(i & 1);
      Tin* dst = out + (static_cast<size_t>(tok) * p.H + h) * p.V + vb * BV + half * (BV / 2);
      for (int j = 0; j < BV / 2; ++j) dst[j] = Tin(0.f);
    }
  };
  if (p.is_varlen && n == 0) zero_tokens(0, p.cu_seqlens[0]);
  if (p.is_varlen && n == p.N - 1) zero_tokens(p.cu_seqlens[p.N], p.T);
}

template <int K, bool kFactored, typename Tin, typename Tq, bool kAux>
cudaError_t launch_prep_as(const FwdParams& p, uint8_t* ws, PrepAux* auxs, int* dead_rows,
                           int slots, cudaStream_t stream) {
  auto kernel = kda_prep_kernel<K, kFactored, Tin, Tq, kAux>;
  const int smem = PrepSmem<K, kFactored, kAux, Tq>::bytes(p);
  KDA_TRY(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
  int per_sm = 0;
  KDA_TRY(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, K, smem));
  const long long items = static_cast<long long>(slots) * p.H;
  const int grid = static_cast<int>(std::min<long long>(items, std::max(per_sm, 1) * sm_count()));
  kernel<<<grid, K, smem, stream>>>(p, ws, auxs, dead_rows, slots);
  return cudaGetLastError();
}

template <int K, typename Tin>
cudaError_t launch_prep(const FwdParams& p, uint8_t* ws, int slots, cudaStream_t stream) {
  using B = __nv_bfloat16;
  return factored_gate(p)
             ? launch_prep_as<K, true, Tin, B, false>(p, ws, nullptr, nullptr, slots, stream)
             : launch_prep_as<K, false, Tin, B, false>(p, ws, nullptr, nullptr, slots, stream);
}

template <int K, int NW, typename Tin>
cudaError_t launch_recurrence(const FwdParams& p, const uint8_t* ws, int slots,
                              cudaStream_t stream) {
  using L = RecurrenceSmem<K, NW, Tin>;
  auto kernel = kda_recurrence_kernel<K, NW, Tin>;
  KDA_TRY(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, L::kBytes));
  kernel<<<dim3(p.V / L::BV, p.H, p.N), NW * 32, L::kBytes, stream>>>(p, ws, slots);
  return cudaGetLastError();
}

// The total number of warps is fixed (one per 16 value columns of every head and sequence).
// Grouping more of them into a CTA lets them share one fetch of each chunk record; fewer per
// CTA spreads a small problem over more SMs. So: the widest CTA that still leaves at least
// ~70% of the SMs one CTA each. Measured on H100 (2026-11-26): 8 warps at B=1 T=8192 H=96 (96
// CTAs) beat 4 by 10%, and 1 warp at B=1 T=32768 H=16 (128 CTAs) beat 4 by 5%.
// JAX_FLASHKDA_FWD_WARPS (1, 2, 4 or 8) overrides the choice, for tests and tuning.
int pick_warps(const FwdParams& p) {
  if (const char* env = std::getenv("JAX_FLASHKDA_FWD_WARPS")) {
    const int w = std::atoi(env);
    if ((w == 1 || w == 2 || w == 4 || w == 8) && (p.V / 16) % w == 0) return w;
  }
  const long long warps = static_cast<long long>(p.V / 16) * p.H * p.N;
  for (int w = 8; w > 1; w >>= 1)
    if ((p.V / 16) % w == 0 && warps / w * 10 >= 7LL * sm_count()) return w;
  return 1;
}

template <int K, typename Tin>
cudaError_t launch_recurrence_nw(const FwdParams& p, const uint8_t* ws, int slots,
                                 cudaStream_t stream) {
  switch (pick_warps(p)) {
    case 8: return launch_recurrence<K, 8, Tin>(p, ws, slots, stream);
    case 4: return launch_recurrence<K, 4, Tin>(p, ws, slots, stream);
    case 2: return launch_recurrence<K, 2, Tin>(p, ws, slots, stream);
    default: return launch_recurrence<K, 1, Tin>(p, ws, slots, stream);
  }
}

template <int K>
cudaError_t fwd_k(const FwdParams& p, uint8_t* ws, cudaStream_t stream) {
  const int slots = chunk_slots(p);
  const bool f16 = p.qkv_dtype == DType::kF16;
  if (slots > 0 && p.H > 0)
    KDA_TRY((f16 ? launch_prep<K, __half>(p, ws, slots, stream)
                 : launch_prep<K, __nv_bfloat16>(p, ws, slots, stream)));
  if (p.N == 0 || p.H == 0) return cudaSuccess;
  return f16 ? launch_recurrence_nw<K, __half>(p, ws, slots, stream)
             : launch_recurrence_nw<K, __nv_bfloat16>(p, ws, slots, stream);
}

}  // namespace

const char* fwd_unsupported(const FwdParams& p) {
  if (p.qkv_dtype != DType::kBF16 && p.qkv_dtype != DType::kF16)
    return "q, k and v must be bfloat16 or float16 on the CUDA target";
  if (p.K != 64 && p.K != 128) return "the CUDA target supports K = 64 or 128 only";
  if (p.V % 16 != 0 || p.V < 16 || p.V > 512)
    return "the CUDA target needs V to be a multiple of 16 in [16, 512]";
  if (p.gate_mode < 0 || p.gate_mode > 2) return "gate_mode must be 0, 1 or 2";
  if (p.N > 65535 || p.H > 65535) return "the CUDA target supports at most 65535 sequences and heads";
  return nullptr;
}

cudaError_t prep_for_backward(const FwdParams& p, uint8_t* recs, PrepAux* aux, int* dead_rows,
                              int slots, cudaStream_t stream) {
  using B = __nv_bfloat16;
  using F = __half;
  if (slots == 0 || p.H == 0) return cudaSuccess;
  const bool f = factored_gate(p);
  if (p.qkv_dtype == DType::kF16)
    return f ? launch_prep_as<128, true, F, F, true>(p, recs, aux, dead_rows, slots, stream)
             : launch_prep_as<128, false, F, F, true>(p, recs, aux, dead_rows, slots, stream);
  return f ? launch_prep_as<128, true, B, B, true>(p, recs, aux, dead_rows, slots, stream)
           : launch_prep_as<128, false, B, B, true>(p, recs, aux, dead_rows, slots, stream);
}

size_t fwd_workspace_bytes(const FwdParams& p) {
  return static_cast<size_t>(chunk_slots(p)) * p.H * rec_bytes(p.K);
}

cudaError_t fwd(const FwdParams& p, void* workspace, cudaStream_t stream) {
  if (fwd_unsupported(p)) return cudaErrorInvalidValue;
  uint8_t* ws = static_cast<uint8_t*>(workspace);
  return p.K == 64 ? fwd_k<64>(p, ws, stream) : fwd_k<128>(p, ws, stream);
}

}  // namespace kda
