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
#include <type_traits>

#include "common/rules.h"
#include "kda/bwd_traits.cuh"
#include "kda/chunks.cuh"
#include "kda/kda_bwd.h"
#include "kda/mma.cuh"
#include "kda/prep.cuh"
#include "kda/quarantine.cuh"
#include "kda/transport_sm90.cuh"

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

// The m16n8k8 tf32 A fragment of rows [0, 16), columns [k0, k0+8) of a row-major fp32 matrix,
// scaled by sc and split for 3xTF32 (g = lane/4, t = lane%4).
template <int P>
__device__ __forceinline__ void frag_a_tf32(const float (*m)[P], int k0, float sc, int g, int t,
                                            uint32_t (&hi)[4], uint32_t (&lo)[4]) {
  const float v[4] = {m[g][k0 + t], m[g + 8][k0 + t], m[g][k0 + t + 4], m[g + 8][k0 + t + 4]};
#pragma unroll
  for (int e = 0; e < 4; ++e) ptx::split_tf32(sc * v[e], hi[e], lo[e]);
}

// The raw rows of q, k and the gate input, copied into shared memory as stored (16 bytes at a
// time: the per-thread 2-byte loads they replace cost ~12 address instructions each).
template <typename Tr>
struct ChunkRows {
  uint8_t q[kC][Tr::K * 2], k[kC][Tr::K * 2], g[kC][Tr::K * 4];
};

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

// The grad kernel. CTA = (chunk slot, head) of 2K threads: thread (hh, d) = (tid / K, tid % K)
// owns key channel d (and value channel d for dv) for the 8 token rows [8hh, 8hh+8), which
// halves the per-thread serial work and the registers, so that two CTAs (16 warps at K = 128)
// share an SM. Warp w computes keys [16w, 16w+16) of the 16xK products.
constexpr int kGradCtasPerSm = 2;

template <typename Tr>
struct GradSmem {
  __nv_bfloat16 S[Tr::V][Tr::KP];   // Sᵀ_c; then dQ̃, dK̃, dW, dM, Xm in fp32
  __nv_bfloat16 dS[Tr::V][Tr::KP];  // dS'ᵀ_c; then per-token channel rows in fp32
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

template <typename Tr, bool kFactored, typename Tin>
__global__ void __launch_bounds__(Tr::kGradThreads, kGradCtasPerSm) kda_bwd_grad_kernel(
    BwdParams p, const PrepAux* __restrict__ auxs, const __nv_bfloat16* __restrict__ states,
    const __nv_bfloat16* __restrict__ dstates, const __nv_bfloat16* __restrict__ vn,
    const __nv_bfloat16* __restrict__ dvn, float* __restrict__ pdt, float* __restrict__ pda,
    const int* __restrict__ dead_rows, const int* __restrict__ dead_cols, int slots) {
  using Smem = GradSmem<Tr>;
  constexpr int K = Tr::K, V = Tr::V, KP = Tr::KP, FP = Tr::FP, kH = Tr::kH;
  constexpr int kThreads = Tr::kGradThreads, kWarps = Tr::kGradWarps, kPieces = Tr::kRowPieces;
  static_assert(smem_fits(sizeof(Smem), kGradCtasPerSm), "kGradCtasPerSm CTAs fit an SM");
  // The per-warp partial products of dM overwrite dO and Vn once both are dead.
  static_assert(offsetof(Smem, Vn) == offsetof(Smem, dO) + sizeof(Smem::dO) &&
                    sizeof(Smem::dO) + sizeof(Smem::Vn) >= kWarps * kC * kC * sizeof(float),
                "dM's partial products need dO and Vn side by side");
  extern __shared__ __align__(128) uint8_t smem_raw[];
  Smem& sg = *reinterpret_cast<Smem*>(smem_raw);
  const int tid = threadIdx.x, d = tid & (K - 1), hh = tid >> Tr::kKeyShift, r0 = hh * kH;
  const int lane = tid & 31, warp = tid >> 5, g = lane >> 2, t = lane & 3;
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
    const int* dead_col = dead_cols + (static_cast<size_t>(ch.n) * p.H + h) * V + col;
    uint32_t dead = 0;
#pragma unroll
    for (int e = 0; e < 8; ++e)
      if (ch.row0 + row >= dead_col[e]) dead |= 1u << e;
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
  const PrepAux& aux = sg.aux;
  float qn[kH], kn[kH], G[kH], xg[kH];
  read_half<Tr, Tin>(p, live, h, sg.rows, sg.xch, qn, kn, G, xg);
  if (p.attrs.use_qk_l2norm) {
#pragma unroll
    for (int j = 0; j < kH; ++j) {
      qn[j] *= aux.rn[r0 + j];
      kn[j] *= aux.rn[kC + r0 + j];
    }
  }

  // dQ̃ = dO·S_cᵀ, dK̃ = Vn·dS'ᵀ, −dW = dVn·S_cᵀ (16 x 16 per warp, reduced over values);
  // warp 0 also dAqk = dO·Vnᵀ, warp 1 dMv = dVn·Vᵀ. dD = diag(S_cᵀ·dS') from the warp's
  // diagonal 16x16 block, whose operands are the S_c and dS' fragments already loaded.
  float aq[2][4] = {}, ak[2][4] = {}, aw[2][4] = {}, a16[2][4] = {}, dd[2][4] = {};
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
  // A = Diag(β)·Tᵀ as m16n8k8 tf32 fragments (columns k0..k0+7), split for 3xTF32: the left
  // factor of dv = Diag(β)·Tᵀ·dVn and, on the factored path, of dK through W = Tβ·(K⊙e^Γ).
  auto frag_bt = [&](int k0, uint32_t (&hi)[4], uint32_t (&lo)[4]) {
    const float v[4] = {sg.beta[g] * aux.T[k0 + t][g], sg.beta[g + 8] * aux.T[k0 + t][g + 8],
                        sg.beta[g] * aux.T[k0 + t + 4][g],
                        sg.beta[g + 8] * aux.T[k0 + t + 4][g + 8]};
#pragma unroll
    for (int e = 0; e < 4; ++e) ptx::split_tf32(v[e], hi[e], lo[e]);
  };
  // dv = Diag(β)·Tᵀ·dVn, warp w taking values [16w, 16w+16); dVn (bf16) is exact in tf32, so
  // two products (T's two parts) keep fp32 accuracy.
  {
    float acc[2][4] = {};
#pragma unroll
    for (int k0 = 0; k0 < kC; k0 += 8) {
      uint32_t th[4], tl[4];
      frag_bt(k0, th, tl);
#pragma unroll
      for (int nt = 0; nt < 2; ++nt) {
        const int col = warp * 16 + nt * 8 + g;
        const uint32_t b0 = static_cast<uint32_t>(__bfloat16_as_ushort(sg.dVn[k0 + t][col])) << 16;
        const uint32_t b1 = static_cast<uint32_t>(__bfloat16_as_ushort(sg.dVn[k0 + t + 4][col]))
                            << 16;
        ptx::mma1688_tf32(acc[nt], tl, b0, b1);
        ptx::mma1688_tf32(acc[nt], th, b0, b1);
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
  __syncthreads();  // S and dS' are dead from here on
  // Γ and Γ_C over the whole chunk from the two halves' sums.
  const float gc = sg.xch[0][d] + sg.xch[1][d];
  const float dD = hh == 0 ? sg.dD[d] : 0.f;  // the first half carries dD
  if (hh == 1) {
#pragma unroll
    for (int j = 0; j < kH; ++j) G[j] += sg.xch[0][d];
  }

  float (*dQt)[FP] = reinterpret_cast<float(*)[FP]>(&sg.S[0][0]);
  float (*dKt)[FP] = dQt + kC;
  float (*dWm)[FP] = dQt + 2 * kC;
  float (*dM)[kC + 1] = reinterpret_cast<float(*)[kC + 1]>(&dQt[3 * kC][0]);
  float (*Xm)[kC + 1] = dM + kC;
  // Per-token channel rows for the other half and for dM: K⊙e^Γ always; the factored pair
  // terms also read k⊙e^{−Γ} and q⊙e^Γ, the exact ones scale·q, k and Γ.
  float (*KG)[FP] = reinterpret_cast<float(*)[FP]>(&sg.dS[0][0]);
  float (*R1)[FP] = KG + kC;
  float (*R2)[FP] = KG + 2 * kC;
  float (*R3)[FP] = KG + 3 * kC;
#pragma unroll
  for (int j = 0; j < 2; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int row = g + (e >> 1) * 8, key = warp * 16 + j * 8 + 2 * t + (e & 1);
      dQt[row][key] = aq[j][e];
      dKt[row][key] = ak[j][e];
      dWm[row][key] = -aw[j][e];
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
  float eg[kH];
#pragma unroll
  for (int j = 0; j < kH; ++j) {
    const int r = r0 + j;
    eg[j] = __expf(G[j]);
    KG[r][d] = kn[j] * eg[j];
    if constexpr (kFactored) {
      R1[r][d] = kn[j] * __expf(-G[j]);
      R2[r][d] = qn[j] * eg[j];
    } else {
      R1[r][d] = p.attrs.scale * qn[j];
      R2[r][d] = kn[j];
      R3[r][d] = G[j];
    }
  }
  __syncthreads();

  // dM = dMv + dW·(K⊙e^Γ)ᵀ on M's support r ≥ s: warp w multiplies the keys [16w, 16w+16) in
  // 3xTF32, and the eight partial 16x16 products are summed in a fixed order (deterministic).
  float (*dMp)[kC][kC] = reinterpret_cast<float(*)[kC][kC]>(&sg.dO[0][0]);  // dO, Vn are dead
  {
    float pm[2][4] = {};
#pragma unroll
    for (int kk = 0; kk < 2; ++kk) {
      const int k0 = warp * 16 + kk * 8;
      uint32_t ah[4], al[4];
      frag_a_tf32(dWm, k0, 1.f, g, t, ah, al);
#pragma unroll
      for (int nt = 0; nt < 2; ++nt) {
        uint32_t bh[2], bl[2];
        ptx::split_tf32(KG[nt * 8 + g][k0 + t], bh[0], bl[0]);
        ptx::split_tf32(KG[nt * 8 + g][k0 + t + 4], bh[1], bl[1]);
        ptx::mma1688_3xtf32(pm[nt], ah, al, bh, bl);
      }
    }
#pragma unroll
    for (int nt = 0; nt < 2; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) dMp[warp][g + (e >> 1) * 8][nt * 8 + 2 * t + (e & 1)] = pm[nt][e];
  }
  __syncthreads();
  // The 16x16 gradients, entry (r, s) = (e / 16, e % 16) for e = tid + pass·kThreads: kEntries
  // per thread, 16 consecutive lanes per row r.
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
    // With dT[i][j] = dM[i][j]·β_j:  Xm = Tᵀ dT,  dL = −Xm Tᵀ (strictly lower part).
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

  // Channel d, rows r0 + j: dq, dk and dΓ (before the in-chunk cumulative sum).
  float dq[kH], dk[kH], dG[kH];
  float dGC = dD * __expf(gc);  // this half's part of the gradient of Γ_C
  {
    // dkw, the gradient of k_r⊙e^{Γ_r} through W = Tβ·(K⊙e^Γ), is (Diag(β)·Tᵀ·dW)[r][d]; the
    // factored path adds it on tensor cores to the pair terms' dLb·KGi, which it joins there.
    float dWc[kC];
    if constexpr (!kFactored) {
#pragma unroll
      for (int i = 0; i < kC; ++i) dWc[i] = dWm[i][d];
    }
#pragma unroll
    for (int j = 0; j < kH; ++j) {
      const int r = r0 + j;
      const float dqt = dQt[r][d], dkt = dKt[r][d];
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
  // Pair terms of Aqk (r ≥ s) and L (r > s), weighted by e^{Γ_r−Γ_s}: this thread takes the
  // row role of its rows and the column role of its columns.
  if constexpr (kFactored) {
    // e^{Γ_r−Γ_s} = e^{Γ_r}·e^{−Γ_s} (bounded span): with KGi = k⊙e^{−Γ}, QG = q⊙e^Γ,
    //   rows:    dq += scale·e^Γ·(dAqk·KGi),  dk += e^Γ·(dLb·KGi + dkw)
    //   columns: dk += e^{−Γ}·(dLbᵀ·KG + scale·dAqkᵀ·QG)
    // 16x16 by 16x128 products on tensor cores in 3xTF32, warp w taking channels [16w, 16w+16).
    float pa1[2][4] = {}, pa2[2][4] = {}, pb[2][4] = {};
#pragma unroll
    for (int k0 = 0; k0 < kC; k0 += 8) {
      uint32_t aqh[4], aql[4], alh[4], all[4], atqh[4], atql[4], atlh[4], atll[4], abh[4], abl[4];
      frag_a_tf32(sg.dAqk, k0, 1.f, g, t, aqh, aql);
      frag_a_tf32(sg.dLb, k0, 1.f, g, t, alh, all);
      frag_a_tf32(sg.dAqkT, k0, p.attrs.scale, g, t, atqh, atql);
      frag_a_tf32(sg.dLbT, k0, 1.f, g, t, atlh, atll);
      frag_bt(k0, abh, abl);
#pragma unroll
      for (int nt = 0; nt < 2; ++nt) {
        const int col = warp * 16 + nt * 8 + g;
        auto frag_b = [&](const float (*m)[FP], uint32_t (&hi)[2], uint32_t (&lo)[2]) {
          ptx::split_tf32(m[k0 + t][col], hi[0], lo[0]);
          ptx::split_tf32(m[k0 + t + 4][col], hi[1], lo[1]);
        };
        uint32_t kih[2], kil[2], qgh[2], qgl[2], kgh[2], kgl[2], dwh[2], dwl[2];
        frag_b(R1, kih, kil);
        frag_b(R2, qgh, qgl);
        frag_b(KG, kgh, kgl);
        frag_b(dWm, dwh, dwl);
        ptx::mma1688_3xtf32(pa1[nt], aqh, aql, kih, kil);
        ptx::mma1688_3xtf32(pa2[nt], alh, all, kih, kil);
        ptx::mma1688_3xtf32(pa2[nt], abh, abl, dwh, dwl);
        ptx::mma1688_3xtf32(pb[nt], atqh, atql, qgh, qgl);
        ptx::mma1688_3xtf32(pb[nt], atlh, atll, kgh, kgl);
      }
    }
    __syncthreads();  // every warp has read R1, R2 and KG; the products take their place
    float (*A1)[FP] = R1;
    float (*A2)[FP] = R2;
    float (*Bc)[FP] = R3;
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
  } else {
    // Exact: e^{Γ_r−Γ_s} per pair (any gate).
    float qa[kC], ka_[kC], ga[kC];
#pragma unroll
    for (int r = 0; r < kC; ++r) {
      qa[r] = R1[r][d];
      ka_[r] = R2[r][d];
      ga[r] = R3[r][d];
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
  __syncthreads();
  // Reverse cumulative sum over the 16 rows: every row also gets the whole gradient of Γ_C;
  // the first half needs the second half's total.
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

  if (p.attrs.use_qk_l2norm) {
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
