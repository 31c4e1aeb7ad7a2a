// The backward's last launch (docs/backward.md step 4): the per-chunk partial sums of dA_log and
// ddt_bias added in a fixed order, so the result is bitwise reproducible (no atomics anywhere).
#pragma once

#include "kda/bwd_traits.cuh"
#include "kda/chunks.cuh"
#include "kda/kda_bwd.h"

namespace kda {

// The reduce kernel: per batch row and head, the partial sums in slot order; and, varlen, zero
// gradients for the tokens before the first and after the last sequence (they reach no output).
// One thread per key channel.
template <typename Tr, typename Tin>
__global__ void __launch_bounds__(Tr::K) kda_bwd_reduce_kernel(BwdParams p,
                                                               const float* __restrict__ pdt,
                                                               const float* __restrict__ pda,
                                                               int slots) {
  constexpr int K = Tr::K, V = Tr::V;
  static_assert(K == V, "thread d zeroes key channel d and value channel d");
  __shared__ float red[K / 32];
  const int b = blockIdx.x, h = blockIdx.y, d = threadIdx.x;
  const int per = p.attrs.is_varlen ? slots : slots / p.B;
  const size_t first = static_cast<size_t>(h) * slots + (p.attrs.is_varlen ? 0 : b * per);
  float acc = 0.f;
#pragma unroll 16
  for (int i = 0; i < per; ++i) acc += pdt[(first + i) * K + d];
  p.ddt_bias[(static_cast<size_t>(b) * p.H + h) * K + d] = acc;
  float a = 0.f;
  for (int i = d; i < per; i += K) a += pda[first + i];
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) a += __shfl_xor_sync(0xffffffffu, a, o);
  if ((d & 31) == 0) red[d >> 5] = a;
  __syncthreads();
  if (d == 0) p.dA_log[b * p.H + h] = tree_sum<K / 32>(red);

  if (p.attrs.is_varlen) {
    auto zero_tokens = [&](long long from, long long to) {
      for (long long tok = from; tok < to; ++tok) {
        const size_t row = static_cast<size_t>(tok) * p.H + h;
        static_cast<Tin*>(p.dq)[row * K + d] = from_float<Tin>(0.f);
        static_cast<Tin*>(p.dk)[row * K + d] = from_float<Tin>(0.f);
        static_cast<Tin*>(p.dv)[row * V + d] = from_float<Tin>(0.f);
        store_f(p.dg, p.g_dtype, row * K + d, 0.f);
        if (d == 0) store_f(p.dbeta, p.beta_dtype, row, 0.f);
      }
    };
    zero_tokens(0, p.cu_seqlens[0]);
    zero_tokens(p.cu_seqlens[p.N], p.T);
  }
}

}  // namespace kda
