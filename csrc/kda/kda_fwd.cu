// Hopper forward of Kimi Delta Attention: the launches, two on the caller's stream.
//
// 1. prep (prep.cuh; persistent CTAs over the (chunk slot, head) items, token-parallel): the
//    per-chunk operands of the recurrence, written to a workspace record per (head, chunk).
// 2. recurrence (fwd_recurrence.cuh; grid: value blocks x heads x sequences): the state carried
//    through the chunks of each sequence in registers, the outputs written per chunk.
#include "kda/kda_fwd.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cstdlib>

#include "kda/chunks.cuh"
#include "kda/fwd_recurrence.cuh"
#include "kda/prep.cuh"

namespace kda {
namespace {

size_t rec_bytes(int K) { return K == 64 ? Rec<64>::kBytes : Rec<128>::kBytes; }

template <int K, typename Tin>
cudaError_t launch_fwd_prep(const FwdParams& p, uint8_t* ws, int slots, int sms,
                            cudaStream_t stream) {
  using B = __nv_bfloat16;
  return factored_gate(p)
             ? launch_prep<K, true, Tin, B, false>(p, ws, nullptr, nullptr, slots, sms, stream)
             : launch_prep<K, false, Tin, B, false>(p, ws, nullptr, nullptr, slots, sms, stream);
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
int pick_warps(const FwdParams& p, int sms) {
  if (const char* env = std::getenv("JAX_FLASHKDA_FWD_WARPS")) {
    const int w = std::atoi(env);
    if ((w == 1 || w == 2 || w == 4 || w == 8) && (p.V / 16) % w == 0) return w;
  }
  const long long warps = static_cast<long long>(p.V / 16) * p.H * p.N;
  for (int w = 8; w > 1; w >>= 1)
    if ((p.V / 16) % w == 0 && warps / w * 10 >= 7LL * sms) return w;
  return 1;
}

template <int K, typename Tin>
cudaError_t launch_recurrence_nw(const FwdParams& p, const uint8_t* ws, int slots, int sms,
                                 cudaStream_t stream) {
  switch (pick_warps(p, sms)) {
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
  int sms = 0;
  KDA_TRY(sm_count(sms));
  if (slots > 0 && p.H > 0)
    KDA_TRY((f16 ? launch_fwd_prep<K, __half>(p, ws, slots, sms, stream)
                 : launch_fwd_prep<K, __nv_bfloat16>(p, ws, slots, sms, stream)));
  if (p.N == 0 || p.H == 0) return cudaSuccess;
  return f16 ? launch_recurrence_nw<K, __half>(p, ws, slots, sms, stream)
             : launch_recurrence_nw<K, __nv_bfloat16>(p, ws, slots, sms, stream);
}

}  // namespace

const char* fwd_unsupported(const FwdParams& p) {
  if (p.qkv_dtype != DType::kBF16 && p.qkv_dtype != DType::kF16)
    return "q, k and v must be bfloat16 or float16 on the CUDA target";
  if (p.K != 64 && p.K != 128) return "the CUDA target supports K = 64 or 128 only";
  if (p.V % 16 != 0 || p.V < 16 || p.V > 512)
    return "the CUDA target needs V to be a multiple of 16 in [16, 512]";
  if (!valid_gate_mode(p.attrs.gate_mode)) return "gate_mode must be 0, 1 or 2";
  if (p.N > 65535 || p.H > 65535) return "the CUDA target supports at most 65535 sequences and heads";
  return nullptr;
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
