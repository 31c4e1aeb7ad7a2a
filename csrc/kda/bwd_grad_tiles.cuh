// The grad kernel's shared memory and its tile phases (bwd_grad.cuh): the chunk's inputs loaded,
// the 16xK products of the states with dO, Vn and dVn on tensor cores, dv, and the 16x16
// gradients dM, dL and dβ. bwd_grad_channels.cuh has the per-channel phases that follow.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "kda/bwd_traits.cuh"
#include "kda/chunks.cuh"
#include "kda/kda_bwd.h"
#include "kda/mma.cuh"
#include "kda/prep.cuh"
#include "kda/quarantine.cuh"
#include "kda/transport_sm90.cuh"

namespace kda {

// The raw rows of q, k and the gate input, copied into shared memory as stored (16 bytes at a
// time: the per-thread 2-byte loads they replace cost ~12 address instructions each).
template <typename Tr>
struct ChunkRows {
  uint8_t q[kC][Tr::K * 2], k[kC][Tr::K * 2], g[kC][Tr::K * 4];
};

// The grad kernel. CTA = (chunk slot, head) of 2K threads: thread (hh, d) = (tid / K, tid % K)
// owns key channel d (and value channel d for dv) for the 8 token rows [8hh, 8hh+8), which
// halves the per-thread serial work and the registers, so that two CTAs (16 warps at K = 128)
// share an SM. Warp w computes keys [16w, 16w+16) of the 16xK products.
constexpr int kGradCtasPerSm = 2;

template <typename Tr>
struct GradSmem {
  // Once dv is written, S_c and dS' are dead and their space holds fp32 tiles (GradTiles): dQ̃,
  // dK̃, dW ([16][FP] each), dM and Xm ([16][17]) in S's; four [16][FP] channel rows in dS''s.
  // At K = V = 128 the V rows hold them; at 64 they do not (the tiles would run on into the
  // next arrays), so S and dS' get as many rows as the tiles need.
  static constexpr int kSTileBytes = (3 * kC * Tr::FP + 2 * kC * (kC + 1)) * 4;
  static constexpr int kDsTileBytes = 4 * kC * Tr::FP * 4;
  static constexpr int kRowBytes = Tr::KP * 2;
  static constexpr int kSRows = std::max(Tr::V, (kSTileBytes + kRowBytes - 1) / kRowBytes);
  static constexpr int kDsRows = std::max(Tr::V, (kDsTileBytes + kRowBytes - 1) / kRowBytes);
  __nv_bfloat16 S[kSRows][Tr::KP];   // Sᵀ_c (rows [0, V)); then dQ̃, dK̃, dW, dM, Xm in fp32
  __nv_bfloat16 dS[kDsRows][Tr::KP];  // dS'ᵀ_c (rows [0, V)); then per-token channel rows in fp32
  __nv_bfloat16 dO[kC][Tr::KP], Vn[kC][Tr::KP], dVn[kC][Tr::KP], V[kC][Tr::KP];
  ChunkRows<Tr> rows;
  PrepAux aux;
  // Rows and columns (transposed copies) for whole-row broadcast reads; zeros off the support.
  float dAqk[kC][kC], dAqkT[kC][kC];  // r ≥ s
  float dLb[kC][kC], dLbT[kC][kC];    // β_r·dL[r][s], r > s
  float dMv[kC][kC + 1];
  float beta[kC], dbl[kC], dots[2 * kC];
  float dD[Tr::K];  // rowsum(S_c ⊙ dS'), the gradient of e^{Γ_C}
  float xch[2][Tr::K];  // per-channel values handed between the two token halves
  float red[Tr::kGradWarps][32];
};

// The grad kernel's dynamic shared memory. Each phase takes it (and its GradThread) from here
// itself, so that the phases' parameters are only what flows from one phase to the next.
template <typename Tr>
__device__ __forceinline__ GradSmem<Tr>& grad_smem() {
  extern __shared__ __align__(128) uint8_t grad_smem_raw[];
  return *reinterpret_cast<GradSmem<Tr>*>(grad_smem_raw);
}

// A grad thread's place: key channel d of token half hh (rows r0 + j, j < kH), its warp and
// lane, and its mma fragment coordinates g = lane / 4, t = lane % 4. Worked out from threadIdx
// by each phase (the reads merge once the phases are inlined).
struct GradThread {
  int tid, d, hh, r0, lane, warp, g, t;
};

// One value per token row of a grad thread (kH of them), as the phases hand them on.
template <typename Tr>
using PerRow = float[Tr::kH];

template <typename Tr>
__device__ __forceinline__ GradThread grad_thread() {
  const int tid = threadIdx.x, lane = tid & 31, hh = tid >> Tr::kKeyShift;
  return {tid, tid & (Tr::K - 1), hh, hh * Tr::kH, lane, tid >> 5, lane >> 2, lane & 3};
}

// The chunk of a grad CTA: its rows, the live ones (before the head's first dead row), its head
// and (head, slot) index.
struct GradItem {
  Chunk ch, live;
  int h;
  size_t hs;
};

// The fp32 tiles that take the place of S_c and dS' once both are dead (after dv), and the
// per-warp partial products of dM that take that of dO and Vn.
template <typename Tr>
struct GradTiles {
  static constexpr int FP = Tr::FP;
  float (*dQt)[FP], (*dKt)[FP], (*dWm)[FP];  // dQ̃, dK̃, −dW: [16][K]
  float (*dM)[kC + 1], (*Xm)[kC + 1];
  // Per-token channel rows for the other half and for dM: K⊙e^Γ always; the factored pair
  // terms also read k⊙e^{−Γ} and q⊙e^Γ, the exact ones scale·q, k and Γ.
  float (*KG)[FP], (*R1)[FP], (*R2)[FP], (*R3)[FP];
  float (*dMp)[kC][kC];

  static_assert(sizeof(GradSmem<Tr>::S) >= GradSmem<Tr>::kSTileBytes &&
                    sizeof(GradSmem<Tr>::dS) >= GradSmem<Tr>::kDsTileBytes,
                "the fp32 tiles fit in the space of S_c and dS'");

  __device__ explicit GradTiles(GradSmem<Tr>& sg)
      : dQt(reinterpret_cast<float(*)[FP]>(&sg.S[0][0])),
        dKt(dQt + kC),
        dWm(dQt + 2 * kC),
        dM(reinterpret_cast<float(*)[kC + 1]>(&dQt[3 * kC][0])),
        Xm(dM + kC),
        KG(reinterpret_cast<float(*)[FP]>(&sg.dS[0][0])),
        R1(KG + kC),
        R2(KG + 2 * kC),
        R3(KG + 3 * kC),
        dMp(reinterpret_cast<float(*)[kC][kC]>(&sg.dO[0][0])) {}
};

// The m16n8k8 tf32 A fragment of rows [0, 16), columns [k0, k0+8) of a row-major fp32 matrix,
// scaled by sc and split for 3xTF32 (g = lane/4, t = lane%4).
template <int P>
__device__ __forceinline__ void frag_a_tf32(const float (*m)[P], int k0, float sc, int g, int t,
                                            uint32_t (&hi)[4], uint32_t (&lo)[4]) {
  const float v[4] = {m[g][k0 + t], m[g + 8][k0 + t], m[g][k0 + t + 4], m[g + 8][k0 + t + 4]};
#pragma unroll
  for (int e = 0; e < 4; ++e) ptx::split_tf32(sc * v[e], hi[e], lo[e]);
}

// A = Diag(β)·Tᵀ as m16n8k8 tf32 fragments (columns k0..k0+7), split for 3xTF32: the left
// factor of dv = Diag(β)·Tᵀ·dVn and, on the factored path, of dK through W = Tβ·(K⊙e^Γ).
template <typename Tr>
__device__ __forceinline__ void frag_beta_t(int k0, int g, int t, uint32_t (&hi)[4],
                                            uint32_t (&lo)[4]) {
  const GradSmem<Tr>& sg = grad_smem<Tr>();
  const PrepAux& aux = sg.aux;
  const float v[4] = {sg.beta[g] * aux.T[k0 + t][g], sg.beta[g + 8] * aux.T[k0 + t][g + 8],
                      sg.beta[g] * aux.T[k0 + t + 4][g],
                      sg.beta[g + 8] * aux.T[k0 + t + 4][g + 8]};
#pragma unroll
  for (int e = 0; e < 4; ++e) ptx::split_tf32(v[e], hi[e], lo[e]);
}

// Rows past the sequence copy the first row; their values are masked where they are read.
template <typename Tr, typename Tin>
__device__ __forceinline__ void copy_chunk_rows(const FwdParams& p, const Chunk& ch, int h,
                                                ChunkRows<Tr>& rows) {
  constexpr int kPieces = Tr::kRowPieces;
  const int tid = threadIdx.x, row = tid >> Tr::kPieceShift, c = tid & (kPieces - 1);
  const size_t at = (static_cast<size_t>(ch.row0 + (row < ch.len ? row : 0)) * p.H + h) * Tr::K;
  ptx::cp_async16(&rows.q[row][c * 16], static_cast<const uint8_t*>(p.q) + at * sizeof(Tin) + c * 16);
  ptx::cp_async16(&rows.k[row][c * 16], static_cast<const uint8_t*>(p.k) + at * sizeof(Tin) + c * 16);
  const int gbytes = p.g_dtype == DType::kF32 ? 4 : 2;
  const uint8_t* g = static_cast<const uint8_t*>(p.g) + at * gbytes;
  ptx::cp_async16(&rows.g[row][c * 16], g + c * 16);
  if (gbytes == 4) ptx::cp_async16(&rows.g[row][(c + kPieces) * 16], g + (c + kPieces) * 16);
}

// Phase 1: the chunk's inputs into shared memory, visible to all threads on return. The aux
// factors, the raw q/k/g rows, S_c, dS', Vn and dVn by cp.async; dO and V through registers
// (converted to bf16, the products' operand type), with V and dO at dead (row, column) places
// zeroed (docs/robustness.md §3); β (after its sigmoid).
template <typename Tr, typename Tin>
__device__ __forceinline__ void grad_load(const BwdParams& p, const GradItem& it,
                                          const PrepAux* auxs, const __nv_bfloat16* states,
                                          const __nv_bfloat16* dstates, const __nv_bfloat16* vn,
                                          const __nv_bfloat16* dvn, const int* dead_cols,
                                          const int* dead_v) {
  constexpr int K = Tr::K, V = Tr::V, kThreads = Tr::kGradThreads, kPieces = Tr::kRowPieces;
  GradSmem<Tr>& sg = grad_smem<Tr>();
  const GradThread th = grad_thread<Tr>();
  const int tid = th.tid, h = it.h;
  const size_t hs = it.hs;
  const Chunk& ch = it.ch;
  const Chunk& live = it.live;
  {
    const uint8_t* src = reinterpret_cast<const uint8_t*>(auxs + hs);
    for (int i = tid; i < static_cast<int>(sizeof(PrepAux) / 16); i += kThreads)
      ptx::cp_async16(reinterpret_cast<uint8_t*>(&sg.aux) + i * 16, src + i * 16);
    copy_chunk_rows<Tr, Tin>(p, ch, h, sg.rows);
    ptx::cp_async_commit();
    const __nv_bfloat16* sgl = states + hs * V * K;
    const __nv_bfloat16* dsgl = dstates + hs * V * K;
#pragma unroll
    for (int i = tid; i < V * K / 8; i += kThreads) {
      const int row = i >> Tr::kPieceShift, col = (i & (kPieces - 1)) * 8;
      const int at = row * K + state_chunk(row, col / 8) * 8;
      ptx::cp_async16(&sg.S[row][col], sgl + at);
      ptx::cp_async16(&sg.dS[row][col], dsgl + at);
    }
    const int row = tid >> Tr::kPieceShift, col = (tid & (kPieces - 1)) * 8;
    ptx::cp_async16(&sg.Vn[row][col], vn + (hs * kC + row) * V + col);
    ptx::cp_async16(&sg.dVn[row][col], dvn + (hs * kC + row) * V + col);
    ptx::cp_async_commit();
  }
  // dO and V rows wait in registers while the chunk inputs load.
  uint4 dor, vr;
  {
    const int row = tid >> Tr::kPieceShift, col = (tid & (kPieces - 1)) * 8;
    const bool ok = row < live.len;
    const size_t at = (static_cast<size_t>(ch.row0 + (ok ? row : 0)) * p.H + h) * V + col;
    const uint4 zero = make_uint4(0, 0, 0, 0);
    dor = ok ? *reinterpret_cast<const uint4*>(static_cast<const Tin*>(p.dout) + at) : zero;
    vr = ok ? *reinterpret_cast<const uint4*>(static_cast<const Tin*>(p.v) + at) : zero;
    uint32_t dead = 0;
    if (ch.row0 + row >= dead_v[ch.n * p.H + h]) {
      const int* dead_col = dead_cols + (static_cast<size_t>(ch.n) * p.H + h) * V + col;
#pragma unroll
      for (int e = 0; e < 8; ++e)
        if (ch.row0 + row >= dead_col[e]) dead |= 1u << e;
    }
    if (dead) {
      dor = zero_elements8(dor, dead);
      vr = zero_elements8(vr, dead);
    }
  }

  if (tid < kC) {
    float b = 0.f;
    if (tid < live.len) {
      b = load_f(p.beta, p.beta_dtype, static_cast<size_t>(ch.row0 + tid) * p.H + h);
      if (p.attrs.use_beta_sigmoid) b = sigmoid_f(b);
    }
    sg.beta[tid] = b;
  }
  {
    const int row = tid >> Tr::kPieceShift, col = (tid & (kPieces - 1)) * 8;
    auto put_bf16 = [&](__nv_bfloat16* dst, uint4 x) {
      if constexpr (std::is_same_v<Tin, __half>) {
        const __half* hx = reinterpret_cast<const __half*>(&x);
        uint32_t w[4];
#pragma unroll
        for (int e = 0; e < 4; ++e)
          w[e] = ptx::pack_bf16(__half2float(hx[2 * e]), __half2float(hx[2 * e + 1]));
        x = make_uint4(w[0], w[1], w[2], w[3]);
      }
      *reinterpret_cast<uint4*>(dst) = x;  // products below take bf16 operands
    };
    put_bf16(&sg.dO[row][col], dor);
    put_bf16(&sg.V[row][col], vr);
  }
  ptx::cp_async_wait<0>();
  __syncthreads();
}

// Phase 3: dQ̃ = dO·S_cᵀ, dK̃ = Vn·dS'ᵀ, −dW = dVn·S_cᵀ (16 x 16 per warp, reduced over values);
// warp 0 also dAqk = dO·Vnᵀ, warp 1 dMv = dVn·Vᵀ (into a16). dD = diag(S_cᵀ·dS') from the
// warp's diagonal 16x16 block (accumulated in dd), whose operands are the S_c and dS' fragments
// already loaded, into sg.dD.
//
// The caller owns dd: declared there, it keeps an array of its own. Declared here, NVVM's
// inliner gave its stack slot (dd is indexed by lane, so it lives in local memory) to the next
// inlined float[2][4] too, grad_dv's accumulators, which then went through local memory.
template <typename Tr>
__device__ __forceinline__ void grad_state_products(float (&aq)[2][4], float (&ak)[2][4],
                                                    float (&aw)[2][4], float (&a16)[2][4],
                                                    float (&dd)[2][4]) {
  constexpr int V = Tr::V, KP = Tr::KP;
  GradSmem<Tr>& sg = grad_smem<Tr>();
  const GradThread th = grad_thread<Tr>();
  const int lane = th.lane, warp = th.warp, g = th.g, t = th.t;
  {
    const int arow = (lane & 7) + ((lane >> 3) & 1) * 8, acol = (lane >> 4) * 8;
    const int krow = (lane & 7) + ((lane >> 3) & 1) * 8;
    const int brow = (lane & 7) + ((lane >> 4) & 1) * 8, bcol = ((lane >> 3) & 1) * 8;
    const __nv_bfloat16* bsrc = warp == 0 ? &sg.Vn[0][0] : &sg.V[0][0];
    const int col = warp * 16 + (lane >> 4) * 8;
#pragma unroll
    for (int ks = 0; ks < V / 16; ++ks) {
      uint32_t fo[4], fv[4], fd[4], bs[4], bd[4];
      ptx::ldsm_x4(fo, &sg.dO[arow][ks * 16 + acol]);
      ptx::ldsm_x4(fv, &sg.Vn[arow][ks * 16 + acol]);
      ptx::ldsm_x4(fd, &sg.dVn[arow][ks * 16 + acol]);
      ptx::ldsm_x4_trans(bs, &sg.S[ks * 16 + krow][col]);
      ptx::ldsm_x4_trans(bd, &sg.dS[ks * 16 + krow][col]);
      ptx::mma16816<__nv_bfloat16>(aq[0], fo, bs[0], bs[1]);
      ptx::mma16816<__nv_bfloat16>(aq[1], fo, bs[2], bs[3]);
      ptx::mma16816<__nv_bfloat16>(aw[0], fd, bs[0], bs[1]);
      ptx::mma16816<__nv_bfloat16>(aw[1], fd, bs[2], bs[3]);
      ptx::mma16816<__nv_bfloat16>(ak[0], fv, bd[0], bd[1]);
      ptx::mma16816<__nv_bfloat16>(ak[1], fv, bd[2], bd[3]);
      const uint32_t st[4] = {bs[0], bs[2], bs[1], bs[3]};  // the S_cᵀ block as an A operand
      ptx::mma16816<__nv_bfloat16>(dd[0], st, bd[0], bd[1]);
      ptx::mma16816<__nv_bfloat16>(dd[1], st, bd[2], bd[3]);
      if (warp < 2) {
        uint32_t af[4], bb[4];
#pragma unroll
        for (int e = 0; e < 4; ++e) af[e] = warp == 0 ? fo[e] : fd[e];
        ptx::ldsm_x4(bb, bsrc + brow * KP + ks * 16 + bcol);
        ptx::mma16816<__nv_bfloat16>(a16[0], af, bb[0], bb[1]);
        ptx::mma16816<__nv_bfloat16>(a16[1], af, bb[2], bb[3]);
      }
    }
  }
  // The diagonal: key g of the block sits in lanes with g = 2t + (g & 1), at column 2t + (g & 1)
  // of n-tile 0 (row g) and of n-tile 1 (row g + 8).
  if ((g >> 1) == t) {
    sg.dD[warp * 16 + g] = dd[0][g & 1];
    sg.dD[warp * 16 + 8 + g] = dd[1][2 + (g & 1)];
  }
}

// Phase 4: dv = Diag(β)·Tᵀ·dVn, warp w taking values [16w, 16w+16), written out (zeros on dead
// rows); dVn (bf16) is exact in tf32, so two products (T's two parts) keep fp32 accuracy.
template <typename Tr, typename Tin>
__device__ __forceinline__ void grad_dv(const BwdParams& p, const GradItem& it) {
  constexpr int V = Tr::V;
  const GradSmem<Tr>& sg = grad_smem<Tr>();
  const GradThread th = grad_thread<Tr>();
  const int warp = th.warp, g = th.g, t = th.t, h = it.h;
  const Chunk& ch = it.ch;
  const Chunk& live = it.live;
  float acc[2][4] = {};
#pragma unroll
  for (int k0 = 0; k0 < kC; k0 += 8) {
    uint32_t t_hi[4], t_lo[4];
    frag_beta_t<Tr>(k0, g, t, t_hi, t_lo);
#pragma unroll
    for (int nt = 0; nt < 2; ++nt) {
      const int col = warp * 16 + nt * 8 + g;
      const uint32_t b0 = static_cast<uint32_t>(__bfloat16_as_ushort(sg.dVn[k0 + t][col])) << 16;
      const uint32_t b1 = static_cast<uint32_t>(__bfloat16_as_ushort(sg.dVn[k0 + t + 4][col]))
                          << 16;
      ptx::mma1688_tf32(acc[nt], t_lo, b0, b1);
      ptx::mma1688_tf32(acc[nt], t_hi, b0, b1);
    }
  }
  Tin* dvp = static_cast<Tin*>(p.dv);
#pragma unroll
  for (int nt = 0; nt < 2; ++nt)
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int s = g + half * 8, col = warp * 16 + nt * 8 + 2 * t;
      if (s < ch.len) {
        const bool ok = s < live.len;
        __align__(4) Tin pair[2] = {from_float<Tin>(ok ? acc[nt][2 * half] : 0.f),
                                    from_float<Tin>(ok ? acc[nt][2 * half + 1] : 0.f)};
        *reinterpret_cast<uint32_t*>(dvp + (static_cast<size_t>(ch.row0 + s) * p.H + h) * V +
                                     col) = *reinterpret_cast<const uint32_t*>(pair);
      }
    }
}

// Phase 5 (after S_c and dS' are dead): the products of phase 3 into their fp32 tiles (dAqk
// masked to r ≥ s, with its transpose), e^Γ of this thread's rows into eg, and the channel rows
// of this thread's rows that the other half and the dM product read.
template <typename Tr, bool kFactored>
__device__ __forceinline__ void grad_stage_tiles(const BwdParams& p, const float (&aq)[2][4],
                                                 const float (&ak)[2][4],
                                                 const float (&aw)[2][4],
                                                 const float (&a16)[2][4], const PerRow<Tr>& qn,
                                                 const PerRow<Tr>& kn, const PerRow<Tr>& G,
                                                 PerRow<Tr>& eg) {
  constexpr int kH = Tr::kH;
  GradSmem<Tr>& sg = grad_smem<Tr>();
  const GradTiles<Tr> tl(sg);
  const GradThread th = grad_thread<Tr>();
  const int d = th.d, r0 = th.r0, warp = th.warp, g = th.g, t = th.t;
#pragma unroll
  for (int j = 0; j < 2; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int row = g + (e >> 1) * 8, key = warp * 16 + j * 8 + 2 * t + (e & 1);
      tl.dQt[row][key] = aq[j][e];
      tl.dKt[row][key] = ak[j][e];
      tl.dWm[row][key] = -aw[j][e];
    }
  if (warp < 2) {
#pragma unroll
    for (int nt = 0; nt < 2; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int r = g + (e >> 1) * 8, s = nt * 8 + 2 * t + (e & 1);
        if (warp == 0) {
          const float a = r >= s ? a16[nt][e] : 0.f;
          sg.dAqk[r][s] = a;
          sg.dAqkT[s][r] = a;
        } else {
          sg.dMv[r][s] = a16[nt][e];
        }
      }
  }
#pragma unroll
  for (int j = 0; j < kH; ++j) {
    const int r = r0 + j;
    eg[j] = __expf(G[j]);
    tl.KG[r][d] = kn[j] * eg[j];
    if constexpr (kFactored) {
      tl.R1[r][d] = kn[j] * __expf(-G[j]);
      tl.R2[r][d] = qn[j] * eg[j];
    } else {
      tl.R1[r][d] = p.attrs.scale * qn[j];
      tl.R2[r][d] = kn[j];
      tl.R3[r][d] = G[j];
    }
  }
}

// Phase 6: the 16x16 gradients, then dβ written out. dM = dMv + dW·(K⊙e^Γ)ᵀ on M's support
// r ≥ s: warp w multiplies the keys [16w, 16w+16) in 3xTF32, and the per-warp partial 16x16
// products are summed in a fixed order (deterministic). Then with dT[i][j] = dM[i][j]·β_j:
// Xm = Tᵀ dT, dL = −Xm Tᵀ (strictly lower part), and dβ through L and M. Entry (r, s) =
// (e / 16, e % 16) for e = tid + pass·kThreads: kEntries per thread, 16 consecutive lanes per
// row r. Ends with the CTA barrier that publishes dLb, dLbT (and the dβ sums).
template <typename Tr>
__device__ __forceinline__ void grad_dm_dl_dbeta(const BwdParams& p, const GradItem& it) {
  constexpr int kThreads = Tr::kGradThreads, kWarps = Tr::kGradWarps;
  GradSmem<Tr>& sg = grad_smem<Tr>();
  const GradTiles<Tr> tl(sg);
  const GradThread th = grad_thread<Tr>();
  const int tid = th.tid, warp = th.warp, g = th.g, t = th.t, h = it.h;
  const Chunk& ch = it.ch;
  const Chunk& live = it.live;
  const PrepAux& aux = sg.aux;
  float (*dM)[kC + 1] = tl.dM;
  float (*Xm)[kC + 1] = tl.Xm;
  float (*dMp)[kC][kC] = tl.dMp;  // dO, Vn are dead
  {
    float pm[2][4] = {};
#pragma unroll
    for (int kk = 0; kk < 2; ++kk) {
      const int k0 = warp * 16 + kk * 8;
      uint32_t ah[4], al[4];
      frag_a_tf32(tl.dWm, k0, 1.f, g, t, ah, al);
#pragma unroll
      for (int nt = 0; nt < 2; ++nt) {
        uint32_t bh[2], bl[2];
        ptx::split_tf32(tl.KG[nt * 8 + g][k0 + t], bh[0], bl[0]);
        ptx::split_tf32(tl.KG[nt * 8 + g][k0 + t + 4], bh[1], bl[1]);
        ptx::mma1688_3xtf32(pm[nt], ah, al, bh, bl);
      }
    }
#pragma unroll
    for (int nt = 0; nt < 2; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) dMp[warp][g + (e >> 1) * 8][nt * 8 + 2 * t + (e & 1)] = pm[nt][e];
  }
  __syncthreads();
#pragma unroll
  for (int pass = 0; pass < Tr::kEntries; ++pass) {
    const int er = (tid + pass * kThreads) >> 4, es = tid & 15;
    float m = 0.f;
    if (er >= es) {
      m = sg.dMv[er][es];
#pragma unroll
      for (int w = 0; w < kWarps; ++w) m += dMp[w][er][es];
    }
    dM[er][es] = m;
  }
  __syncthreads();
#pragma unroll
  for (int pass = 0; pass < Tr::kEntries; ++pass) {
    const int er = (tid + pass * kThreads) >> 4, es = tid & 15;
    float acc = 0.f;
#pragma unroll
    for (int i = 0; i < kC; ++i) acc += aux.T[i][er] * dM[i][es];
    Xm[er][es] = acc * sg.beta[es];
  }
  __syncthreads();
#pragma unroll
  for (int pass = 0; pass < Tr::kEntries; ++pass) {
    const int er = (tid + pass * kThreads) >> 4, es = tid & 15;
    float dl = 0.f;
    if (er > es) {
#pragma unroll
      for (int j = 0; j < kC; ++j) dl -= Xm[er][j] * aux.T[es][j];
    }
    sg.dLb[er][es] = dl * sg.beta[er];
    sg.dLbT[es][er] = dl * sg.beta[er];
    // dβ_r through L = Diag(β)·LL (row r), summed over the 16 lanes holding row r.
    float part = dl * aux.LL[er][es];
#pragma unroll
    for (int o = 8; o > 0; o >>= 1) part += __shfl_xor_sync(0xffffffffu, part, o);
    if (es == 0) sg.dbl[er] = part;
  }
  __syncthreads();
  if (tid < kC && tid < ch.len) {
    // dβ_r through M = Tβ (column r), plus the L part.
    const int r = tid;
    float db = sg.dbl[r];
    for (int i = r; i < kC; ++i) db += dM[i][r] * aux.T[i][r];
    if (p.attrs.use_beta_sigmoid) db *= sg.beta[r] * (1.f - sg.beta[r]);
    store_f(p.dbeta, p.beta_dtype, static_cast<size_t>(ch.row0 + r) * p.H + h,
            r < live.len ? db : 0.f);
  }
}

}  // namespace kda
