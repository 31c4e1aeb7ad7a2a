// The backward's per-chunk gradients (docs/backward.md step 3; grid: chunk slots x heads,
// token-parallel): from S_c, dS'_c, Vn, dVn and dO,
//     dQ̃ = dO S_cᵀ, dK̃ = Vn dS'ᵀ, dW = −dVn S_cᵀ, dAqk = dO Vnᵀ, dM = dW (K⊙e^Γ)ᵀ + dVn Vᵀ
// (M = Tβ), then through T = (I+L)^-1, L and Aqk to q, k, β and Γ, the reverse in-chunk
// cumulative sum to g, and the l2norm / sigmoid / gate backwards; per-chunk partial sums of
// dA_log and ddt_bias.
//
// Gate exactness: the pair terms of L and Aqk and their gradients use e^{Γ_r−Γ_s} per element,
// factored into e^{Γ_r}·e^{−Γ_s} only when the safe gate bounds the span (≥ −80 over 16 tokens).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstddef>
#include <cstdint>

#include "kda/bwd_grad_channels.cuh"
#include "kda/bwd_grad_tiles.cuh"
#include "kda/bwd_traits.cuh"
#include "kda/chunks.cuh"
#include "kda/kda_bwd.h"
#include "kda/transport_sm90.cuh"

namespace kda {

// See GradSmem (bwd_grad_tiles.cuh) for the thread layout. The phases' barriers are here unless a
// phase needs them inside.
template <typename Tr, bool kFactored, typename Tin>
__global__ void __launch_bounds__(Tr::kGradThreads, kGradCtasPerSm) kda_bwd_grad_kernel(
    BwdParams p, const PrepAux* __restrict__ auxs, const __nv_bfloat16* __restrict__ states,
    const __nv_bfloat16* __restrict__ dstates, const __nv_bfloat16* __restrict__ vn,
    const __nv_bfloat16* __restrict__ dvn, float* __restrict__ pdt, float* __restrict__ pda,
    const int* __restrict__ dead_rows, const int* __restrict__ dead_cols,
    const int* __restrict__ dead_v, int slots) {
  using Smem = GradSmem<Tr>;
  constexpr int K = Tr::K, kH = Tr::kH;
  static_assert(smem_fits(sizeof(Smem), kGradCtasPerSm), "kGradCtasPerSm CTAs fit an SM");
  // The per-warp partial products of dM overwrite dO and Vn once both are dead.
  static_assert(offsetof(Smem, Vn) == offsetof(Smem, dO) + sizeof(Smem::dO) &&
                    sizeof(Smem::dO) + sizeof(Smem::Vn) >=
                        Tr::kGradWarps * kC * kC * sizeof(float),
                "dM's partial products need dO and Vn side by side");
  Smem& sg = grad_smem<Tr>();
  const int tid = threadIdx.x, d = tid & (K - 1), hh = tid >> Tr::kKeyShift;
  const int slot = blockIdx.x, h = blockIdx.y;
  const size_t hs = static_cast<size_t>(h) * slots + slot;
  const Chunk ch = locate(p, slot);
  if (ch.len == 0) {  // unused slots still write their (zero) partial sums
    if (tid < K) pdt[hs * K + d] = 0.f;
    if (tid == 0) pda[hs] = 0.f;
    return;
  }
  // docs/robustness.md §3: rows from the head's first dead one on read as q = k = g = β = 0
  // (live.len is where they start), and V and dO at dead (row, column) places as 0, so that
  // every gradient there is 0 and none of them reaches a live row; dead rows write zeros.
  const int dead_head = dead_rows[ch.n * p.H + h];
  Chunk live = ch;
  live.len = static_cast<int>(
      dead_head <= ch.row0 ? 0 : (dead_head - ch.row0 < ch.len ? dead_head - ch.row0 : ch.len));
  const GradItem it{ch, live, h, hs};

  grad_load<Tr, Tin>(p, it, auxs, states, dstates, vn, dvn, dead_cols, dead_v);
  float qn[kH], kn[kH], G[kH], xg[kH];
  grad_read_channel<Tr, Tin>(p, it, qn, kn, G, xg);
  float aq[2][4] = {}, ak[2][4] = {}, aw[2][4] = {}, a16[2][4] = {}, dd[2][4] = {};
  grad_state_products<Tr>(aq, ak, aw, a16, dd);
  grad_dv<Tr, Tin>(p, it);
  __syncthreads();  // S and dS' are dead from here on

  // Γ and Γ_C over the whole chunk from the two halves' sums.
  const float gc = sg.xch[0][d] + sg.xch[1][d];
  const float dD = hh == 0 ? sg.dD[d] : 0.f;  // the first half carries dD
  if (hh == 1) {
#pragma unroll
    for (int j = 0; j < kH; ++j) G[j] += sg.xch[0][d];
  }
  float eg[kH];
  grad_stage_tiles<Tr, kFactored>(p, aq, ak, aw, a16, qn, kn, G, eg);
  __syncthreads();
  grad_dm_dl_dbeta<Tr>(p, it);

  float dq[kH], dk[kH], dG[kH];
  grad_channel<Tr, kFactored>(p, qn, kn, G, eg, gc, dD, dq, dk, dG);
  if constexpr (kFactored) pair_terms_factored<Tr>(p, qn, kn, G, eg, dq, dk, dG);
  else pair_terms_exact<Tr>(p, qn, kn, G, dq, dk, dG);
  __syncthreads();
  reverse_cumsum<Tr>(dG);
  if (p.attrs.use_qk_l2norm) l2norm_backward<Tr>(qn, kn, dq, dk);
  gate_backward_and_store<Tr, Tin>(p, it, xg, dq, dk, dG, pdt, pda);
}

}  // namespace kda
