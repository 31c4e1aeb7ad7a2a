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
#include "kda/fwd_split.cuh"
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

// kTransition: p.V state columns, the first v_cols of them real (fwd_recurrence.cuh).
template <int K, int NW, typename Tin, bool kTransition>
cudaError_t launch_recurrence(const FwdParams& p, const uint8_t* ws, int slots, int v_cols,
                              cudaStream_t stream) {
  using L = RecurrenceSmem<K, NW, Tin>;
  auto kernel = kda_recurrence_kernel<K, NW, Tin, kTransition>;
  KDA_TRY(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, L::kBytes));
  kernel<<<dim3(p.V / L::BV, p.H, p.N), NW * 32, L::kBytes, stream>>>(p, ws, slots, v_cols);
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

template <int K, typename Tin, bool kTransition = false>
cudaError_t launch_recurrence_nw(const FwdParams& p, const uint8_t* ws, int slots, int sms,
                                 cudaStream_t stream, int v_cols = 0) {
  switch (pick_warps(p, sms)) {
    case 8: return launch_recurrence<K, 8, Tin, kTransition>(p, ws, slots, v_cols, stream);
    case 4: return launch_recurrence<K, 4, Tin, kTransition>(p, ws, slots, v_cols, stream);
    case 2: return launch_recurrence<K, 2, Tin, kTransition>(p, ws, slots, v_cols, stream);
    default: return launch_recurrence<K, 1, Tin, kTransition>(p, ws, slots, v_cols, stream);
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
  return f16 ? launch_recurrence_nw<K, __half>(p, ws, slots, sms, stream, p.V)
             : launch_recurrence_nw<K, __nv_bfloat16>(p, ws, slots, sms, stream, p.V);
}

// The sequence split (docs/sequence_split.md): the call's tokens as one packed batch of
// segments, and the workspace regions of fwd_split.
FwdParams segment_view(const FwdParams& p, int segments, const int32_t* seg_cu) {
  FwdParams s = p;
  s.T = p.B * p.T;
  s.B = 1;
  s.N = segments;
  s.cu_seqlens = seg_cu;
  s.attrs.is_varlen = true;
  s.attrs.state_v_first = false;
  return s;
}

struct SplitLayout {
  size_t rec, seg_cu, first, last, total;
  SplitLayout(const FwdParams& p, int seg_tokens) {
    const int segments = split_segments(p, seg_tokens);
    const FwdParams s = segment_view(p, segments, nullptr);
    WorkspaceCursor ws;
    rec = ws.take(static_cast<size_t>(chunk_slots(s)) * p.H * rec_bytes(p.K));
    seg_cu = ws.take((segments + 1) * sizeof(int32_t));
    first = ws.take(p.N * sizeof(int32_t));
    last = ws.take(p.N * sizeof(int32_t));
    total = ws.end;
  }
};

// 1. the segments; 2. prep over them, once; 3. the transitions [Z | P] (recurrence with V + K
// columns, no outputs); 4. each segment's incoming state; 5. the recurrence from those, writing
// o; 6. each sequence's final state from its last segment's. Without sequences (N = 0) there
// is nothing to combine: every segment is an unused one.
template <int K, typename Tin>
cudaError_t fwd_split_k(const FwdParams& p, int seg_tokens, const SplitStates& states,
                        uint8_t* ws, cudaStream_t stream) {
  const SplitLayout lay(p, seg_tokens);
  const int segments = split_segments(p, seg_tokens);
  auto* seg_cu = reinterpret_cast<int32_t*>(ws + lay.seg_cu);
  auto* first = reinterpret_cast<int32_t*>(ws + lay.first);
  auto* last = reinterpret_cast<int32_t*>(ws + lay.last);
  int sms = 0;
  KDA_TRY(sm_count(sms));

  kda_split_segments_kernel<<<1, kSegmentThreads, 0, stream>>>(p, seg_tokens, segments, seg_cu,
                                                               first, last);
  KDA_TRY(cudaGetLastError());
  FwdParams s = segment_view(p, segments, seg_cu);
  const int slots = chunk_slots(s);
  if (slots > 0) KDA_TRY((launch_fwd_prep<K, Tin>(s, ws + lay.rec, slots, sms, stream)));

  FwdParams t = s;
  t.V = p.V + K;
  t.initial_state = nullptr;
  t.o = nullptr;
  t.final_state = states.transitions;
  KDA_TRY((launch_recurrence_nw<K, Tin, true>(t, ws + lay.rec, slots, sms, stream, p.V)));

  // The combine writes the segments of the N sequences; the unused ones at the end start
  // from zero (they hold no tokens: their states are results all the same).
  const size_t state_bytes = static_cast<size_t>(segments) * p.H * K * p.V * sizeof(float);
  KDA_TRY(cudaMemsetAsync(states.s_in, 0, state_bytes, stream));
  using C = CombineSmem<K>;
  if (p.N > 0) {
    KDA_TRY(cudaFuncSetAttribute(kda_split_combine_kernel<K>,
                                 cudaFuncAttributeMaxDynamicSharedMemorySize, C::kBytes));
    const int W = p.V + K;  // [Z | P]
    kda_split_combine_kernel<K><<<dim3(p.V / 16, p.H, p.N), K, C::kBytes, stream>>>(
        p, SegmentMaps{states.transitions + p.V, W, states.transitions, W}, segments, first, last,
        states.s_in);
    KDA_TRY(cudaGetLastError());
  }

  s.initial_state = states.s_in;
  s.final_state = states.seg_final;
  KDA_TRY((launch_recurrence_nw<K, Tin>(s, ws + lay.rec, slots, sms, stream)));

  if (p.N == 0) return cudaSuccess;
  kda_split_finals_kernel<K><<<dim3(p.H, p.N), 256, 0, stream>>>(p, states.seg_final, last,
                                                                 p.final_state);
  return cudaGetLastError();
}

}  // namespace

int split_segments(const FwdParams& p, int seg_tokens) {
  return static_cast<int>(p.N + static_cast<long long>(p.B) * p.T / seg_tokens);
}

const char* fwd_split_unsupported(const FwdParams& p, int seg_tokens) {
  if (const char* why = fwd_unsupported(p)) return why;
  if (seg_tokens < 1) return "segment_tokens must be positive";
  if (p.V + p.K > 512) return "the sequence split needs V + K <= 512";
  if (p.N > 65535) return "the sequence split supports at most 65535 sequences";
  if (split_segments(p, seg_tokens) > 65535)
    return "the sequence split supports at most 65535 segments (a longer segment_tokens)";
  return nullptr;
}

size_t fwd_split_workspace_bytes(const FwdParams& p, int seg_tokens) {
  return SplitLayout(p, seg_tokens).total;
}

cudaError_t fwd_split(const FwdParams& p, int seg_tokens, const SplitStates& states,
                      void* workspace, cudaStream_t stream) {
  if (fwd_split_unsupported(p, seg_tokens)) return cudaErrorInvalidValue;
  if (p.H == 0) return cudaSuccess;  // every result is empty
  // No segment (no sequences and fewer tokens than one segment): no state to write.
  if (split_segments(p, seg_tokens) == 0) return fwd(p, workspace, stream);
  uint8_t* ws = static_cast<uint8_t*>(workspace);
  const bool f16 = p.qkv_dtype == DType::kF16;
  if (p.K == 64)
    return f16 ? fwd_split_k<64, __half>(p, seg_tokens, states, ws, stream)
               : fwd_split_k<64, __nv_bfloat16>(p, seg_tokens, states, ws, stream);
  return f16 ? fwd_split_k<128, __half>(p, seg_tokens, states, ws, stream)
             : fwd_split_k<128, __nv_bfloat16>(p, seg_tokens, states, ws, stream);
}

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
