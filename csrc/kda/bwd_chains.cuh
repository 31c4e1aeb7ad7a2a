// The backward's two chains (docs/backward.md step 2), in one launch: z < N re-runs the forward
// recurrence and stores every chunk's incoming state S_c (bf16) and Vn = U − W S_c; z ≥ N runs
// the state gradient backwards over chunks,
//     dVn = Aqkᵀ dO + K̃ dS',    dS = Diag(e^{Γ_C}) dS' + Q̃ᵀ dO − Wᵀ dVn,
// storing each chunk's outgoing-state gradient dS' (bf16) and dVn, and dS_0 as the
// initial-state gradient. Neither chain needs the other, so one launch runs both, which halves
// the sequential part when few heads leave the GPU idle. kStateGradOnly: z < N runs the state
// gradient alone and stores nothing but dS_0 (the sequence split's first backward pass,
// docs/sequence_split.md).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "kda/bwd_traits.cuh"
#include "kda/chunk_step.cuh"
#include "kda/chunks.cuh"
#include "kda/kda_bwd.h"
#include "kda/mma.cuh"
#include "kda/quarantine.cuh"
#include "kda/transport_sm90.cuh"

namespace kda {

// The chains kernel. CTA = (value block of 16·NW columns, head, sequence and direction);
// warp w owns value columns [16w, 16w+16) of the block and keeps its slice of S (or dS)
// transposed in fp32 mma accumulators: s[nt][0..1] = (value g, key 8nt+2t+{0,1}),
// s[nt][2..3] the same at value g+8 (g = lane/4, t = lane%4).
template <typename Tr, int NW, int kStages_>
struct ChainSmem {
  static constexpr int BV = 16 * NW;
  static constexpr int VP = BV + 8;
  static constexpr int kStage = Tr::R::kBytes + kC * VP * 2;  // record + 16 rows of V or dO
  static constexpr int kStages = kStages_;
  static constexpr int kRowPitch = 24;
  static constexpr int kRowStage = kStages * kStage;  // per warp [16][24] bf16
  static constexpr int kStateTile = kRowStage + NW * kC * kRowPitch * 2;  // per warp [16][K] bf16
  static constexpr int kBar = kStateTile + NW * kC * Tr::K * 2;
  static constexpr int kBytes = kBar + 2 * kStages * 8;  // "full" and "empty" barriers

  static_assert(Tr::V % BV == 0, "value blocks of 16·NW columns tile V");
  static_assert(ptx::conflict_free_pitch(VP * 2), "conflict-free ldmatrix on the V or dO rows");
  static_assert(Tr::R::kBytes % 16 == 0 && kStage % 16 == 0 && kRowStage % 16 == 0 &&
                    kStateTile % 16 == 0 && kBar % 8 == 0,
                "16-byte aligned bulk copies, cp.async, ldmatrix and stmatrix; 8-byte aligned "
                "mbarriers");
};

template <typename Tr, int NW, int kStages_, int kMinBlocks, typename Tin, bool kStateGradOnly>
__global__ void __launch_bounds__(NW * 32, kMinBlocks) kda_bwd_chains_kernel(
    BwdParams p, const uint8_t* __restrict__ recs, __nv_bfloat16* __restrict__ states,
    __nv_bfloat16* __restrict__ dstates, __nv_bfloat16* __restrict__ vn_out,
    __nv_bfloat16* __restrict__ dvn_out, const int* __restrict__ dead_rows,
    const int* __restrict__ dead_cols, int slots) {
  using L = ChainSmem<Tr, NW, kStages_>;
  using R = typename Tr::R;
  constexpr int K = Tr::K, V = Tr::V, KP = R::kPitch;
  constexpr int BV = L::BV, VP = L::VP, kStages = L::kStages, RP = L::kRowPitch;
  static_assert(smem_fits(L::kBytes, kMinBlocks), "kMinBlocks CTAs of this layout fit an SM");
  extern __shared__ __align__(128) uint8_t smem[];
  using Ring = StepRing<kStages, NW, L::kStage, L::kBar>;
  const Ring ring{smem};

  const bool reverse = kStateGradOnly || blockIdx.z >= static_cast<unsigned>(p.N);
  const int vb = blockIdx.x, h = blockIdx.y;
  const int n = reverse && !kStateGradOnly ? blockIdx.z - p.N : blockIdx.z;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int g = lane >> 2, t = lane & 3;
  const Seq sq = seq_of(p, n);
  const int nch = (sq.len + kC - 1) / kC;
  const uint8_t* rec0 = recs + (static_cast<size_t>(h) * slots + sq.slot0) * R::kBytes;
  const Tin* rows_src = static_cast<const Tin*>(reverse ? p.dout : p.v);
  auto chunk_at = [&](int i) { return reverse ? nch - 1 - i : i; };

  // Warp 0 fetches step i's record with one bulk copy; each warp fetches its own 16 columns of
  // the step's 16 rows of V (or dO) with one cp.async per lane (row copies through the bulk
  // engine serialised warp 0). Rows past the sequence repeat its first row: finite values that
  // meet zero columns of Tβ (zero rows of Q̃ and Aqk).
  // The forward chain reads neither Q̃ nor Aqk: it skips Q̃, the record's first 30%.
  static_assert(R::kQ == 0 && R::kW == R::kMat && R::kAqk > R::kW, "record layout");
  const uint32_t rec_first = reverse ? 0 : R::kW;
  auto fetch_record = [&](int i) {
    ring.fetch_record(i, rec0 + static_cast<size_t>(chunk_at(i)) * R::kBytes, rec_first,
                      R::kBytes, lane);
  };
  auto fetch_rows = [&](int i) {
    const int c = chunk_at(i);
    ptx::warp_tile16_cp_async(
        reinterpret_cast<Tin*>(ring.stage(i) + R::kBytes) + warp * 16, VP,
        rows_src + (static_cast<size_t>(sq.row0 + c * kC) * p.H + h) * V + vb * BV + warp * 16,
        static_cast<size_t>(p.H) * V, sq.len - c * kC, lane);
  };
  ring.start(nch, warp, fetch_record, fetch_rows);

  float s[K / 8][4];
  const size_t st_base = (static_cast<size_t>(n) * p.H + h) * K * V;
  const int v_lo = vb * BV + warp * 16 + g;
  auto st_index = [&](int nt, int j) {
    return state_index<K>(p, st_base, v_lo + (j >> 1) * 8, nt * 8 + t * 2 + (j & 1));
  };
  const float* s0 = reverse ? p.dfinal_state : p.initial_state;
#pragma unroll
  for (int nt = 0; nt < K / 8; ++nt)
#pragma unroll
    for (int j = 0; j < 4; ++j) s[nt][j] = s0[st_index(nt, j)];

  // docs/robustness.md §3 (quarantine.cuh): the first dead row of the head, and of each of the
  // warp's 16 value columns; warp_dead, the first of them all, is all a clean chain keeps in
  // registers (the columns' rows are read again only in a chunk that reaches it).
  const int* dead_col = dead_cols + (static_cast<size_t>(n) * p.H + h) * V + vb * BV + warp * 16;
  const int dead_head = dead_rows[n * p.H + h];
  const int warp_dead = __reduce_min_sync(0xffffffffu, min(dead_head, dead_col[lane & 15]));
  if (reverse) {
    // A dead column's final state is a constant NaN: its cotangent reaches nothing.
    const int dead_g[2] = {min(dead_head, dead_col[g]), min(dead_head, dead_col[g + 8])};
#pragma unroll
    for (int nt = 0; nt < K / 8; ++nt)
#pragma unroll
      for (int j = 0; j < 4; ++j)
        if (dead_g[j >> 1] != kNoDeadRow) s[nt][j] = 0.f;
  }

  __nv_bfloat16* rstage = reinterpret_cast<__nv_bfloat16*>(smem + L::kRowStage) + warp * kC * RP;
  __nv_bfloat16* tile = reinterpret_cast<__nv_bfloat16*>(smem + L::kStateTile) + warp * kC * K;
  __nv_bfloat16* st_out = reverse ? dstates : states;
  __nv_bfloat16* row_out = reverse ? dvn_out : vn_out;
  const int brow = (lane & 7) + ((lane >> 4) & 1) * 8, bcol = ((lane >> 3) & 1) * 8;
  const int krow = (lane & 7) + ((lane >> 3) & 1) * 8;

  for (int i = 0; i < nch; ++i) {
    ring.refill(i, nch, warp, fetch_record, fetch_rows);
    const int c = chunk_at(i);
    const size_t hs = static_cast<size_t>(h) * slots + sq.slot0 + c;

    // The state (gradient) this chunk starts from, as bf16 Sᵀ rows [value][key]. The warp's 16
    // value rows are 4 KB of contiguous global memory: the fragments go to its shared tile
    // (stmatrix) and leave as 16-byte row pieces, 8 full-line stores per lane. ncu: the 32
    // 4-byte stores per lane and step these replace were the chains' largest stall (LSU queue
    // full), and a bulk copy of the tile spent half the kernel waiting for it to be read.
    if constexpr (!kStateGradOnly) {
      __syncwarp();  // every lane has read the previous step's tile
#pragma unroll
      for (int nt = 0; nt < K / 8; nt += 2) {
        const int row = (lane & 7) + ((lane >> 3) & 1) * 8, c = nt + (lane >> 4);
        const uint32_t f[4] = {ptx::pack_bf16(s[nt][0], s[nt][1]), ptx::pack_bf16(s[nt][2], s[nt][3]),
                               ptx::pack_bf16(s[nt + 1][0], s[nt + 1][1]),
                               ptx::pack_bf16(s[nt + 1][2], s[nt + 1][3])};
        ptx::stsm_x4(tile + row * K + state_chunk(row, c) * 8, f);
      }
      __syncwarp();
      uint4* dst = reinterpret_cast<uint4*>(st_out + (hs * V + v_lo - g) * K);
      static_assert(kC * K / 8 % 32 == 0, "the tile's 16-byte pieces spread evenly over lanes");
#pragma unroll
      for (int j = 0; j < kC * K / 8 / 32; ++j)
        dst[j * 32 + lane] = reinterpret_cast<const uint4*>(tile)[j * 32 + lane];
    }

    ring.wait(i);
    const uint8_t* st = ring.stage(i);
    const RecView<K, Tin, Tin> record(st);
    const Tin* rs = reinterpret_cast<const Tin*>(st + R::kBytes);
    const long long row0 = sq.row0 + static_cast<long long>(c) * kC;
    // V (or dO) at dead places acts as 0; a chunk wholly past the head's first dead row keeps
    // the state (gradient) as it is, whatever its records hold.
    if (warp_dead < row0 + kC)
      zero_dead16(const_cast<Tin*>(rs) + warp * 16, VP, row0, dead_head, dead_col, lane);
    const bool live_chunk = row0 < dead_head;

    // Rows of this step (transposed, [value][token]): Vnᵀ = Vᵀ(Tβ)ᵀ + Sᵀ(−W)ᵀ forwards,
    // dVnᵀ = dOᵀ Aqk + dS'ᵀ K̃ᵀ backwards. Two accumulator sets halve the dependent chain.
    uint32_t ar[4];
    ptx::ldsm_x4_trans(ar, rs + brow * VP + warp * 16 + bcol);
    float x0[2][4] = {}, x1[2][4] = {};
    {
      uint32_t b[4];
      if (reverse) ptx::ldsm_x4_trans(b, record.aqk + krow * kC + (lane >> 4) * 8);
      else ptx::ldsm_x4(b, record.tb + brow * kC + bcol);
      ptx::mma16816<Tin>(x1[0], ar, b[0], b[1]);
      ptx::mma16816<Tin>(x1[1], ar, b[2], b[3]);
    }
    const __nv_bfloat16* red_rows = reverse ? record.kt : record.w;
#pragma unroll
    for (int ks = 0; ks < K / 16; ++ks) {
      float (&acc)[2][4] = (ks & 1) ? x1 : x0;
      uint32_t a[4];
      state_operand<K>(s, ks, a);
      uint32_t b[4];
      ptx::ldsm_x4(b, red_rows + brow * KP + ks * 16 + bcol);
      ptx::mma16816<__nv_bfloat16>(acc[0], a, b[0], b[1]);
      ptx::mma16816<__nv_bfloat16>(acc[1], a, b[2], b[3]);
    }
#pragma unroll
    for (int a = 0; a < 2; ++a)
#pragma unroll
      for (int j = 0; j < 4; ++j) x0[a][j] += x1[a][j];
    uint32_t ax[4];
    rows_operand(x0, ax);

    // State step: Sᵀ ← Sᵀ·Diag(e^{Γ_C}) + VnᵀK̃ forwards;
    // dSᵀ ← dS'ᵀ·Diag(e^{Γ_C}) + dOᵀQ̃ + dVnᵀ(−W) backwards.
    auto add_dout_q = [&](int nt) {
      if (!reverse) return;
      uint32_t bq[4];
      ptx::ldsm_x4_trans(bq, record.q + krow * KP + (nt + (lane >> 4)) * 8);
      ptx::mma16816<Tin>(s[nt], ar, bq[0], bq[1]);
      ptx::mma16816<Tin>(s[nt + 1], ar, bq[2], bq[3]);
    };
    if (live_chunk)
      decay_and_update<K, KP, /*kBFirst=*/false>(s, record.eg, ax, reverse ? record.w : record.kt,
                                                 lane, add_dout_q);

    if constexpr (kStateGradOnly) {
      __syncwarp();
      ring.release(i, lane);
    } else {
      // The rows, [token][value] in shared memory, then one 16-byte store per lane.
#pragma unroll
      for (int nt = 0; nt < 2; ++nt)
#pragma unroll
        for (int j = 0; j < 4; ++j)
          rstage[(nt * 8 + t * 2 + (j & 1)) * RP + g + (j >> 1) * 8] =
              __float2bfloat16_rn(x0[nt][j]);
      __syncwarp();
      ring.release(i, lane);
      const int tok = lane >> 1, half = lane & 1;
      *reinterpret_cast<uint4*>(row_out + (hs * kC + tok) * V + vb * BV + warp * 16 + half * 8) =
          *reinterpret_cast<const uint4*>(rstage + tok * RP + half * 8);
      __syncwarp();
    }
  }

  if (reverse) {
#pragma unroll
    for (int nt = 0; nt < K / 8; ++nt)
#pragma unroll
      for (int j = 0; j < 4; ++j) p.dinitial_state[st_index(nt, j)] = s[nt][j];
  }
}

}  // namespace kda
