// The forward's chunk recurrence (docs/math.md): each warp owns 16 value columns of the state S
// (all K keys), kept transposed in fp32 mma accumulators for the whole sequence, so the
// accumulator layout doubles as the bf16 A/B operand layout and S never leaves registers.
// Per chunk:  Vnᵀ = Vᵀ(Tβ)ᵀ + Sᵀ(−W)ᵀ,  Oᵀ = SᵀQ̃ᵀ + VnᵀAqkᵀ,  Sᵀ = Sᵀ·Diag(e^{Γ_C}) + VnᵀK̃,
// from the chunk records the prep wrote (prep.cuh), prefetched several chunks ahead (StepRing).
//
// kTransition (the sequence split's first pass, fwd_split.cuh): p.V counts the state's columns,
// v_cols real value columns followed by K transition columns. The real ones start from zero and
// read v; the transition columns start from the identity and see zero values, so that the final
// state is [Z | P] (docs/sequence_split.md). No outputs are written.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "kda/chunk_step.cuh"
#include "kda/chunks.cuh"
#include "kda/kda_fwd.h"
#include "kda/mma.cuh"
#include "kda/quarantine.cuh"
#include "kda/transport_sm90.cuh"

namespace kda {

// The recurrence kernel. CTA = (value block of 16·NW columns, head, sequence); warp w
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

template <int K, int NW, typename Tin, bool kTransition = false>
__global__ void __launch_bounds__(NW * 32, 1) kda_recurrence_kernel(FwdParams p,
                                                                 const uint8_t* __restrict__ ws,
                                                                 int slots, int v_cols) {
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
  // This warp's first state column; a transition column has no v (warp-uniform).
  const int col0 = vb * BV + warp * 16;
  const bool reads_v = !kTransition || col0 < v_cols;
  const int v_pitch = kTransition ? v_cols : p.V;

  // Warp 0 fetches chunk c's record with one bulk copy. Each warp fetches its own 16 value
  // columns of the chunk's 16 rows of V with one cp.async per lane: issuing the 16 row copies
  // through the bulk engine serialised warp 0 (ncu: ~45% of its time) and starved every warp.
  // The transition pass writes no outputs: it skips Q̃, the record's first 30% (as the
  // backward's forward chain does).
  static_assert(R::kQ == 0 && R::kW == R::kMat && R::kKt > R::kW && R::kTb > R::kW &&
                    R::kEg > R::kW,
                "record layout: Q̃ first, everything the transition pass reads after it");
  constexpr uint32_t rec_first = kTransition ? R::kW : 0;
  auto fetch_record = [&](int c) {
    ring.fetch_record(c, rec0 + static_cast<size_t>(c) * R::kBytes, rec_first, R::kBytes, lane);
  };
  auto fetch_v = [&](int c) {
    if (!reads_v) return;
    ptx::warp_tile16_cp_async(
        reinterpret_cast<Tin*>(ring.stage(c) + L::kV) + warp * 16, VP,
        vsrc + (static_cast<size_t>(sq.row0 + c * kChunk) * p.H + h) * v_pitch + col0,
        static_cast<size_t>(p.H) * v_pitch, sq.len - c * kChunk, lane);
  };
  ring.start(nch, warp, fetch_record, fetch_v);

  // Initial state, transposed into the accumulator layout.
  float s[K / 8][4];
  const size_t st_base = (static_cast<size_t>(n) * p.H + h) * K * p.V;
  const int v_lo = col0 + g;
  auto st_index = [&](int nt, int j) {
    return state_index<K>(p, st_base, v_lo + (j >> 1) * 8, nt * 8 + t * 2 + (j & 1));
  };
#pragma unroll
  for (int nt = 0; nt < K / 8; ++nt)
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      if constexpr (kTransition)
        s[nt][j] = v_lo + (j >> 1) * 8 - v_cols == nt * 8 + t * 2 + (j & 1) ? 1.f : 0.f;
      else
        s[nt][j] = p.initial_state[st_index(nt, j)];
    }

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
    bool v_bad = false;  // a non-finite v in this lane's fragment (quarantine.cuh)
    if (reads_v) {
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
      uint32_t a[4];
      state_operand<K>(s, ks, a);
      uint32_t bw[4];
      ptx::ldsm_x4(bw, record.w + brow * KP + ks * 16 + bcol);
      ptx::mma16816<__nv_bfloat16>(va[0], a, bw[0], bw[1]);
      ptx::mma16816<__nv_bfloat16>(va[1], a, bw[2], bw[3]);
      if constexpr (!kTransition) {
        uint32_t bq[4];
        ptx::ldsm_x4(bq, record.q + brow * KP + ks * 16 + bcol);
        ptx::mma16816<__nv_bfloat16>(oa[0], a, bq[0], bq[1]);
        ptx::mma16816<__nv_bfloat16>(oa[1], a, bq[2], bq[3]);
      }
    }
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        vn[i][j] += vn1[i][j];
        ot[i][j] += ot1[i][j];
      }
    uint32_t avn[4];
    rows_operand(vn, avn);
    if constexpr (!kTransition) {
      uint32_t ba[4];
      ptx::ldsm_x4(ba, record.aqk + brow * kChunk + bcol);
      ptx::mma16816<__nv_bfloat16>(ot[0], avn, ba[0], ba[1]);
      ptx::mma16816<__nv_bfloat16>(ot[1], avn, ba[2], ba[3]);
    }
    decay_and_update<K, KP, /*kBFirst=*/true>(s, record.eg, avn, record.kt, lane, [](int) {});

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

    if constexpr (kTransition) {
      __syncwarp();
      ring.release(c, lane);
    } else {
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
          const uint4 val =
              *reinterpret_cast<const uint4*>(ostage + tok * L::kOutPitch + half * 8);
          *reinterpret_cast<uint4*>(out + (static_cast<size_t>(sq.row0 + gt) * p.H + h) * p.V +
                                    vb * BV + warp * 16 + half * 8) = val;
        }
      }
      __syncwarp();
    }
  }

#pragma unroll
  for (int nt = 0; nt < K / 8; ++nt)
#pragma unroll
    for (int j = 0; j < 4; ++j) p.final_state[st_index(nt, j)] = s[nt][j];

  if constexpr (kTransition) return;
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
  if (p.attrs.is_varlen && n == 0) zero_tokens(0, p.cu_seqlens[0]);
  if (p.attrs.is_varlen && n == p.N - 1) zero_tokens(p.cu_seqlens[p.N], p.T);
}

}  // namespace kda
