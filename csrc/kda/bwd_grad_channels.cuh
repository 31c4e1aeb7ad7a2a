// The grad kernel's per-channel phases (bwd_grad.cuh): each thread's key channel d over its 8
// token rows. Reading q, k and the gate, dq/dk/dΓ from the 16xK tiles, the pair terms of Aqk and
// L (factored on tensor cores, or exact per pair), the reverse cumulative sum to g, the l2norm
// backward, and the gate backward with the stores.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "common/rules.h"
#include "kda/bwd_grad_tiles.cuh"
#include "kda/bwd_traits.cuh"
#include "kda/chunks.cuh"
#include "kda/kda_bwd.h"
#include "kda/mma.cuh"

namespace kda {

// Sums, per token half, acc[i] (i < 16) over that half's K threads into out[16·hh + i].
template <typename Tr>
__device__ __forceinline__ void half_sum16(float (&acc)[16], float (*red)[32], float* out) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int w = 8 >> i;
    const bool upper = lane & w;
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      if (j >= w) break;
      const float send = upper ? acc[j] : acc[j + w];
      const float keep = upper ? acc[j + w] : acc[j];
      acc[j] = keep + __shfl_xor_sync(0xffffffffu, send, w);
    }
  }
  acc[0] += __shfl_xor_sync(0xffffffffu, acc[0], 16);
  if (lane < 16) red[warp][lane] = acc[0];
  __syncthreads();
  if (threadIdx.x < 32) {
    const int half = threadIdx.x >> 4, i = threadIdx.x & 15;
    out[threadIdx.x] = tree_sum<Tr::kHalfWarps, 32>(&red[Tr::kHalfWarps * half][i]);
  }
  __syncthreads();
}

// Key channel d = tid % K, rows r0 + j, r0 = 8·(tid / K): q, k (not yet normalised), the gate
// input + dt_bias, and Γ summed over this half's rows only, with that total in half_sum[hh][d]
// (after a barrier the caller adds the first half's total to the second half). Tokens past the
// sequence act as q = k = g = 0, which changes nothing for the real ones.
template <typename Tr, typename Tin, int kH = Tr::kH>
__device__ __forceinline__ void read_half(const FwdParams& p, const Chunk& ch, int h,
                                          const ChunkRows<Tr>& rows, float (*half_sum)[Tr::K],
                                          float (&qn)[kH], float (&kn)[kH], float (&G)[kH],
                                          float (&xg)[kH]) {
  constexpr int K = Tr::K;
  const int tid = threadIdx.x, d = tid & (K - 1), hh = tid >> Tr::kKeyShift, r0 = hh * kH;
  const float a_exp = p.attrs.gate_mode != GateMode::kLogDecay ? __expf(p.A_log[h]) : 0.f;
  const float dtb = p.attrs.gate_mode != GateMode::kLogDecay ? p.dt_bias[h * K + d] : 0.f;
  const bool g32 = p.g_dtype == DType::kF32;
  float cum = 0.f;
#pragma unroll
  for (int j = 0; j < kH; ++j) {
    const int r = r0 + j;
    const bool ok = r < ch.len;
    qn[j] = ok ? to_float(reinterpret_cast<const Tin*>(rows.q[r])[d]) : 0.f;
    kn[j] = ok ? to_float(reinterpret_cast<const Tin*>(rows.k[r])[d]) : 0.f;
    const uint32_t bits = g32 ? reinterpret_cast<const uint32_t*>(rows.g[r])[d]
                              : reinterpret_cast<const uint16_t*>(rows.g[r])[d];
    const float graw = bits_to_float(bits, p.g_dtype);
    const float gv = log_decay(p, graw, a_exp, dtb);
    cum += ok ? gv : 0.f;
    G[j] = cum;
    xg[j] = graw + dtb;
  }
  half_sum[hh][d] = cum;
}

// Phase 2: this thread's q and k (l2-normalised when asked), Γ over its half's rows, and the gate
// input + dt_bias; see read_half.
template <typename Tr, typename Tin>
__device__ __forceinline__ void grad_read_channel(const BwdParams& p, const GradItem& it,
                                                  PerRow<Tr>& qn, PerRow<Tr>& kn, PerRow<Tr>& G,
                                                  PerRow<Tr>& xg) {
  GradSmem<Tr>& sg = grad_smem<Tr>();
  const GradThread th = grad_thread<Tr>();
  read_half<Tr, Tin>(p, it.live, it.h, sg.rows, sg.xch, qn, kn, G, xg);
  if (p.attrs.use_qk_l2norm) {
#pragma unroll
    for (int j = 0; j < Tr::kH; ++j) {
      qn[j] *= sg.aux.rn[th.r0 + j];
      kn[j] *= sg.aux.rn[kC + th.r0 + j];
    }
  }
}

// Phase 7: channel d, rows r0 + j: dq, dk and dΓ (before the in-chunk cumulative sum) from the
// dQ̃, dK̃ and dW tiles; this half's part of the gradient of Γ_C into sg.xch[hh][d].
template <typename Tr, bool kFactored>
__device__ __forceinline__ void grad_channel(const BwdParams& p, const PerRow<Tr>& qn,
                                             const PerRow<Tr>& kn, const PerRow<Tr>& G,
                                             const PerRow<Tr>& eg, float gc, float dD,
                                             PerRow<Tr>& dq, PerRow<Tr>& dk, PerRow<Tr>& dG) {
  constexpr int kH = Tr::kH;
  GradSmem<Tr>& sg = grad_smem<Tr>();
  const GradTiles<Tr> tl(sg);
  const GradThread th = grad_thread<Tr>();
  const int d = th.d, hh = th.hh, r0 = th.r0;
  const PrepAux& aux = sg.aux;
  float dGC = dD * __expf(gc);  // this half's part of the gradient of Γ_C
  {
    // dkw, the gradient of k_r⊙e^{Γ_r} through W = Tβ·(K⊙e^Γ), is (Diag(β)·Tᵀ·dW)[r][d]; the
    // factored path adds it on tensor cores to the pair terms' dLb·KGi, which it joins there.
    float dWc[kC];
    if constexpr (!kFactored) {
#pragma unroll
      for (int i = 0; i < kC; ++i) dWc[i] = tl.dWm[i][d];
    }
#pragma unroll
    for (int j = 0; j < kH; ++j) {
      const int r = r0 + j;
      const float dqt = tl.dQt[r][d], dkt = tl.dKt[r][d];
      float dkw = 0.f;
      if constexpr (!kFactored) {
#pragma unroll
        for (int i = 0; i < kC; ++i) dkw += aux.T[i][r] * dWc[i];
        dkw *= sg.beta[r];
      }
      const float ekt = __expf(gc - G[j]);
      const float tk = dkt * kn[j] * ekt;
      dq[j] = p.attrs.scale * eg[j] * dqt;
      dk[j] = eg[j] * dkw + ekt * dkt;
      dG[j] = dqt * p.attrs.scale * qn[j] * eg[j] + dkw * kn[j] * eg[j] - tk;
      dGC += tk;
    }
  }
  sg.xch[hh][d] = dGC;
}

// Phase 8, safe gate: the pair terms of Aqk (r ≥ s) and L (r > s), weighted by
// e^{Γ_r−Γ_s} = e^{Γ_r}·e^{−Γ_s} (bounded span). With KGi = k⊙e^{−Γ}, QG = q⊙e^Γ,
//   rows:    dq += scale·e^Γ·(dAqk·KGi),  dk += e^Γ·(dLb·KGi + dkw)
//   columns: dk += e^{−Γ}·(dLbᵀ·KG + scale·dAqkᵀ·QG)
// as 16x16 by 16xK products on tensor cores in 3xTF32, warp w taking channels [16w, 16w+16).
template <typename Tr>
__device__ __forceinline__ void pair_terms_factored(const BwdParams& p, const PerRow<Tr>& qn,
                                                    const PerRow<Tr>& kn, const PerRow<Tr>& G,
                                                    const PerRow<Tr>& eg, PerRow<Tr>& dq,
                                                    PerRow<Tr>& dk, PerRow<Tr>& dG) {
  constexpr int kH = Tr::kH, FP = Tr::FP;
  GradSmem<Tr>& sg = grad_smem<Tr>();
  const GradTiles<Tr> tl(sg);
  const GradThread th = grad_thread<Tr>();
  const int d = th.d, r0 = th.r0, warp = th.warp, g = th.g, t = th.t;
  float pa1[2][4] = {}, pa2[2][4] = {}, pb[2][4] = {};
#pragma unroll
  for (int k0 = 0; k0 < kC; k0 += 8) {
    uint32_t aqh[4], aql[4], alh[4], all[4], atqh[4], atql[4], atlh[4], atll[4], abh[4], abl[4];
    frag_a_tf32(sg.dAqk, k0, 1.f, g, t, aqh, aql);
    frag_a_tf32(sg.dLb, k0, 1.f, g, t, alh, all);
    frag_a_tf32(sg.dAqkT, k0, p.attrs.scale, g, t, atqh, atql);
    frag_a_tf32(sg.dLbT, k0, 1.f, g, t, atlh, atll);
    frag_beta_t<Tr>(k0, g, t, abh, abl);
#pragma unroll
    for (int nt = 0; nt < 2; ++nt) {
      const int col = warp * 16 + nt * 8 + g;
      auto frag_b = [&](const float (*m)[FP], uint32_t (&hi)[2], uint32_t (&lo)[2]) {
        ptx::split_tf32(m[k0 + t][col], hi[0], lo[0]);
        ptx::split_tf32(m[k0 + t + 4][col], hi[1], lo[1]);
      };
      uint32_t kih[2], kil[2], qgh[2], qgl[2], kgh[2], kgl[2], dwh[2], dwl[2];
      frag_b(tl.R1, kih, kil);
      frag_b(tl.R2, qgh, qgl);
      frag_b(tl.KG, kgh, kgl);
      frag_b(tl.dWm, dwh, dwl);
      ptx::mma1688_3xtf32(pa1[nt], aqh, aql, kih, kil);
      ptx::mma1688_3xtf32(pa2[nt], alh, all, kih, kil);
      ptx::mma1688_3xtf32(pa2[nt], abh, abl, dwh, dwl);
      ptx::mma1688_3xtf32(pb[nt], atqh, atql, qgh, qgl);
      ptx::mma1688_3xtf32(pb[nt], atlh, atll, kgh, kgl);
    }
  }
  __syncthreads();  // every warp has read R1, R2 and KG; the products take their place
  float (*A1)[FP] = tl.R1;
  float (*A2)[FP] = tl.R2;
  float (*Bc)[FP] = tl.R3;
#pragma unroll
  for (int nt = 0; nt < 2; ++nt)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int row = g + (e >> 1) * 8, col = warp * 16 + nt * 8 + 2 * t + (e & 1);
      A1[row][col] = pa1[nt][e];
      A2[row][col] = pa2[nt][e];
      Bc[row][col] = pb[nt][e];
    }
  __syncthreads();
#pragma unroll
  for (int j = 0; j < kH; ++j) {
    const int r = r0 + j;
    const float a1 = A1[r][d], a2 = A2[r][d], b = Bc[r][d];
    const float egi = __expf(-G[j]);
    dq[j] += p.attrs.scale * eg[j] * a1;
    dk[j] += eg[j] * a2 + egi * b;
    dG[j] += eg[j] * (kn[j] * a2 + p.attrs.scale * qn[j] * a1) - kn[j] * egi * b;
  }
}

// Phase 8, any gate: the same pair terms with e^{Γ_r−Γ_s} per pair. This thread takes the row
// role of its rows and the column role of its columns.
template <typename Tr>
__device__ __forceinline__ void pair_terms_exact(const BwdParams& p, const PerRow<Tr>& qn,
                                                 const PerRow<Tr>& kn, const PerRow<Tr>& G,
                                                 PerRow<Tr>& dq, PerRow<Tr>& dk, PerRow<Tr>& dG) {
  constexpr int kH = Tr::kH;
  GradSmem<Tr>& sg = grad_smem<Tr>();
  const GradTiles<Tr> tl(sg);
  const GradThread th = grad_thread<Tr>();
  const int d = th.d, r0 = th.r0;
  float qa[kC], ka_[kC], ga[kC];
#pragma unroll
  for (int r = 0; r < kC; ++r) {
    qa[r] = tl.R1[r][d];
    ka_[r] = tl.R2[r][d];
    ga[r] = tl.R3[r][d];
  }
#pragma unroll
  for (int j = 0; j < kH; ++j) {
    const int r = r0 + j;
    const float sq_r = p.attrs.scale * qn[j];
#pragma unroll
    for (int o = 0; o < kC; ++o) {
      // Row role: pair (r, o), o ≤ r.
      if (o <= r) {
        const float E = o < r ? exp2f((G[j] - ga[o]) * kda_rules::kLog2e) : 1.f;
        const float ka = sg.dAqk[r][o] * E;
        dq[j] += p.attrs.scale * ka * ka_[o];
        if (o < r) {
          const float le = sg.dLb[r][o] * E;
          dk[j] += le * ka_[o];
          dG[j] += (le * kn[j] + ka * sq_r) * ka_[o];
        }
      }
      // Column role: pair (o, r), o ≥ r.
      if (o >= r) {
        const float E = o > r ? exp2f((ga[o] - G[j]) * kda_rules::kLog2e) : 1.f;
        const float ka = sg.dAqk[o][r] * E;
        dk[j] += ka * qa[o];
        if (o > r) {
          const float le = sg.dLb[o][r] * E;
          dk[j] += le * ka_[o];
          dG[j] -= (le * ka_[o] + ka * qa[o]) * kn[j];
        }
      }
    }
  }
}

// Phase 9: the reverse cumulative sum of dΓ over the 16 rows, to the gradient of the log-decay:
// every row also gets the whole gradient of Γ_C (both halves' parts in sg.xch); the first half
// needs the second half's total.
template <typename Tr>
__device__ __forceinline__ void reverse_cumsum(PerRow<Tr>& dG) {
  constexpr int kH = Tr::kH;
  GradSmem<Tr>& sg = grad_smem<Tr>();
  const GradThread th = grad_thread<Tr>();
  const int d = th.d, hh = th.hh;
  if (hh == 1) dG[kH - 1] += sg.xch[0][d] + sg.xch[1][d];
#pragma unroll
  for (int j = kH - 2; j >= 0; --j) dG[j] += dG[j + 1];
  __syncthreads();
  if (hh == 1) sg.xch[0][d] = dG[0];
  __syncthreads();
  if (hh == 0) {
    const float later = sg.xch[0][d];
#pragma unroll
    for (int j = 0; j < kH; ++j) dG[j] += later;
  }
}

// Phase 10: dq and dk through the l2norm (x̂ = x·rn): rn·(dx̂ − (x̂·dx̂)·x̂), the dot products
// summed over each row's K channels.
template <typename Tr>
__device__ __forceinline__ void l2norm_backward(const PerRow<Tr>& qn, const PerRow<Tr>& kn,
                                                PerRow<Tr>& dq, PerRow<Tr>& dk) {
  constexpr int kH = Tr::kH;
  GradSmem<Tr>& sg = grad_smem<Tr>();
  const GradThread th = grad_thread<Tr>();
  const int hh = th.hh, r0 = th.r0;
  const PrepAux& aux = sg.aux;
  float acc[16];
#pragma unroll
  for (int j = 0; j < kH; ++j) {
    acc[j] = qn[j] * dq[j];
    acc[kH + j] = kn[j] * dk[j];
  }
  half_sum16<Tr>(acc, sg.red, sg.dots);
#pragma unroll
  for (int j = 0; j < kH; ++j) {
    const int r = r0 + j;
    dq[j] = aux.rn[r] * (dq[j] - sg.dots[16 * hh + j] * qn[j]);
    dk[j] = aux.rn[kC + r] * (dk[j] - sg.dots[16 * hh + kH + j] * kn[j]);
  }
}

// Phase 11: the gate backward, dq, dk and dg written out (zeros on dead rows), and the chunk's
// partial sums of ddt_bias (per channel) and dA_log.
template <typename Tr, typename Tin>
__device__ __forceinline__ void gate_backward_and_store(const BwdParams& p, const GradItem& it,
                                                        const PerRow<Tr>& xg,
                                                        const PerRow<Tr>& dq,
                                                        const PerRow<Tr>& dk,
                                                        const PerRow<Tr>& dG, float* pdt,
                                                        float* pda) {
  constexpr int K = Tr::K, kH = Tr::kH, kWarps = Tr::kGradWarps;
  GradSmem<Tr>& sg = grad_smem<Tr>();
  const GradThread th = grad_thread<Tr>();
  const int tid = th.tid, d = th.d, hh = th.hh, r0 = th.r0, lane = th.lane, warp = th.warp;
  const int h = it.h;
  const size_t hs = it.hs;
  const Chunk& ch = it.ch;
  const Chunk& live = it.live;
  const float a_exp = p.attrs.gate_mode != GateMode::kLogDecay ? __expf(p.A_log[h]) : 0.f;
  float dA = 0.f, ddt = 0.f;
  Tin* dqp = static_cast<Tin*>(p.dq);
  Tin* dkp = static_cast<Tin*>(p.dk);
#pragma unroll
  for (int j = 0; j < kH; ++j) {
    const int r = r0 + j;
    if (r < live.len) {
      float out = dG[j];
      // A floored log-decay is a constant: no gradient reaches the gate input or A_log (xg
      // already holds x + dt_bias).
      if (below_log_decay_floor(gate_activation(p, xg[j], a_exp, 0.f))) {
        out = 0.f;
      } else if (p.attrs.gate_mode == GateMode::kSoftplus) {
        const float x = xg[j];
        out = -dG[j] * a_exp * sigmoid_f(x);
        dA += dG[j] * (-a_exp * softplus_f(x));
        ddt += out;
      } else if (p.attrs.gate_mode == GateMode::kSafe) {
        const float x = xg[j];
        const float sx = sigmoid_f(a_exp * x);
        out = dG[j] * p.attrs.lower_bound * sx * (1.f - sx) * a_exp;
        if (out != 0.f) dA += out * x;  // a saturated sigmoid (x = ±inf, legal) gives 0, not 0·inf
        ddt += out;
      }
      const size_t idx = (static_cast<size_t>(ch.row0 + r) * p.H + h) * K + d;
      dqp[idx] = from_float<Tin>(dq[j]);
      dkp[idx] = from_float<Tin>(dk[j]);
      store_f(p.dg, p.g_dtype, idx, out);
    } else if (r < ch.len) {  // a dead row: the state there is a constant
      const size_t idx = (static_cast<size_t>(ch.row0 + r) * p.H + h) * K + d;
      dqp[idx] = from_float<Tin>(0.f);
      dkp[idx] = from_float<Tin>(0.f);
      store_f(p.dg, p.g_dtype, idx, 0.f);
    }
  }
  if (hh == 1) sg.xch[1][d] = ddt;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) dA += __shfl_xor_sync(0xffffffffu, dA, o);
  if (lane == 0) sg.red[warp][0] = dA;
  __syncthreads();
  if (hh == 0) pdt[hs * K + d] = ddt + sg.xch[1][d];
  if (tid == 0) {
    float a = 0.f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) a += sg.red[w][0];
    pda[hs] = a;
  }
}

}  // namespace kda
