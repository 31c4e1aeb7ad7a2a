// Warp-level tensor-core products (mma.sync, m16n8k16 in bf16/f16 and m16n8k8 in tf32, fp32
// accumulate) and the packing of fp32 fragments into their 16-bit operands: PTX of sm_80 and
// later, so kernels for other architectures keep this header.
#pragma once

#include <cstdint>
#include <type_traits>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace kda::ptx {

// D = A*B + D, m16n8k16, fp32 accumulate; T selects bf16 or fp16 operands.
template <typename T>
__device__ __forceinline__ void mma16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                         uint32_t b1) {
  if constexpr (std::is_same_v<T, __half>) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
}

// x = hi + lo exactly, hi being x with its 13 low mantissa bits cleared (a tf32 value), for
// 3xTF32 products (hi·hi + hi·lo + lo·hi) that keep fp32-level accuracy on tensor cores. lo goes
// in as is: the mma reads its tf32 bits only, an error of 2^-10 in a part below 2^-10·|x|. Two
// instructions, where cvt.rna.tf32 costs several.
__device__ __forceinline__ void split_tf32(float x, uint32_t& hi, uint32_t& lo) {
  hi = __float_as_uint(x) & 0xffffe000u;
  lo = __float_as_uint(x - __uint_as_float(hi));
}

// D = A*B + D, m16n8k8, tf32 operands, fp32 accumulate. Fragments (g = lane/4, t = lane%4):
// a = A[g][t], A[g+8][t], A[g][t+4], A[g+8][t+4]; b = B[t][g], B[t+4][g]; d as in m16n8k16.
__device__ __forceinline__ void mma1688_tf32(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                             uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// D += A*B in 3xTF32: A and B each given as hi and lo parts (split_tf32).
__device__ __forceinline__ void mma1688_3xtf32(float (&d)[4], const uint32_t (&ah)[4],
                                               const uint32_t (&al)[4], const uint32_t (&bh)[2],
                                               const uint32_t (&bl)[2]) {
  mma1688_tf32(d, al, bh[0], bh[1]);
  mma1688_tf32(d, ah, bl[0], bl[1]);
  mma1688_tf32(d, ah, bh[0], bh[1]);
}

// Lower half holds `lo` (the smaller column index), as the mma fragments expect.
__device__ __forceinline__ uint32_t pack_bf16(float lo, float hi) {
  __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&v);
}

}  // namespace kda::ptx
