// The chunk step the forward recurrence (fwd_recurrence.cuh) and the backward's chains
// (bwd_chains.cuh) share. A warp keeps its 16 value columns of the state transposed in fp32 mma
// accumulators, s[nt][0..1] = Sᵀ(value g, key 8nt+2t+{0,1}) and s[nt][2..3] the same at value
// g+8 (g = lane/4, t = lane%4), so the accumulators double as bf16 A operands:
//   state_operand   the state's key slice ks as the A operand of a product over keys;
//   rows_operand    a 16x16 product (two n-tiles) as the A operand of the next one;
//   decay_and_update  Sᵀ ← Sᵀ·Diag(e^{Γ_C}) + A·B, B a 16xK bf16 matrix of the chunk record.
// The products over keys before the update stay in each kernel: the forward reduces Sᵀ(−W)ᵀ
// and SᵀQ̃ᵀ in one loop that shares each state operand between the two (four mma per key
// slice), the chains need one product per direction, and their first product differs by
// direction (Aqk read transposed backwards). One loop for both would cost the forward a second
// pass over the state's operands or the chains a product they do not use.
#pragma once

#include <cuda_bf16.h>

#include <cstdint>

#include "kda/mma.cuh"
#include "kda/transport_sm90.cuh"

namespace kda {

template <int K>
__device__ __forceinline__ void state_operand(const float (&s)[K / 8][4], int ks,
                                              uint32_t (&a)[4]) {
  a[0] = ptx::pack_bf16(s[2 * ks][0], s[2 * ks][1]);
  a[1] = ptx::pack_bf16(s[2 * ks][2], s[2 * ks][3]);
  a[2] = ptx::pack_bf16(s[2 * ks + 1][0], s[2 * ks + 1][1]);
  a[3] = ptx::pack_bf16(s[2 * ks + 1][2], s[2 * ks + 1][3]);
}

__device__ __forceinline__ void rows_operand(const float (&x)[2][4], uint32_t (&a)[4]) {
  a[0] = ptx::pack_bf16(x[0][0], x[0][1]);
  a[1] = ptx::pack_bf16(x[0][2], x[0][3]);
  a[2] = ptx::pack_bf16(x[1][0], x[1][1]);
  a[3] = ptx::pack_bf16(x[1][2], x[1][3]);
}

// s ← s·Diag(eg) + a·B, B the 16 x K bf16 matrix at `b_rows` (row pitch KP, read transposed:
// B's rows are the product's k dimension, its columns the state's keys). also(nt) runs
// after each pair of key tiles nt, nt + 1, for a caller that adds a second product there (the
// chains' backward direction, dOᵀQ̃). kBFirst: B's ldmatrix before the decay's loads and
// multiplies (the forward) or after them (the chains), the order of each kernel's hand-written
// loop before; ptxas schedules some variants differently in the other order (the forward's
// 2-warp one, the chains' single-CTA ones with the one-register dead-row check).
template <int K, int KP, bool kBFirst, typename Also>
__device__ __forceinline__ void decay_and_update(float (&s)[K / 8][4], const float* eg,
                                                 const uint32_t (&a)[4],
                                                 const __nv_bfloat16* b_rows, int lane,
                                                 Also also) {
  const int t = lane & 3, krow = (lane & 7) + ((lane >> 3) & 1) * 8;
#pragma unroll
  for (int nt = 0; nt < K / 8; nt += 2) {
    uint32_t b[4];
    if constexpr (kBFirst) ptx::ldsm_x4_trans(b, b_rows + krow * KP + (nt + (lane >> 4)) * 8);
    const float2 e0 = *reinterpret_cast<const float2*>(eg + nt * 8 + t * 2);
    const float2 e1 = *reinterpret_cast<const float2*>(eg + nt * 8 + 8 + t * 2);
    s[nt][0] *= e0.x; s[nt][1] *= e0.y; s[nt][2] *= e0.x; s[nt][3] *= e0.y;
    s[nt + 1][0] *= e1.x; s[nt + 1][1] *= e1.y; s[nt + 1][2] *= e1.x; s[nt + 1][3] *= e1.y;
    if constexpr (!kBFirst) ptx::ldsm_x4_trans(b, b_rows + krow * KP + (nt + (lane >> 4)) * 8);
    ptx::mma16816<__nv_bfloat16>(s[nt], a, b[0], b[1]);
    ptx::mma16816<__nv_bfloat16>(s[nt + 1], a, b[2], b[3]);
    also(nt);
  }
}

}  // namespace kda
