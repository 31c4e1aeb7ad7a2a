// Hopper backward of Kimi Delta Attention (chunks of 16 tokens; built for K = V = 64 and 128,
// Bwd64 and Bwd128 in bwd_traits.cuh): the launches, four on the caller's stream (docs/backward.md).
//
// 1. prep (prep.cuh, with kAux): the chunk records the two chains read (Q̃, −W, K̃, Tβ, Aqk,
//    e^{Γ_C}) and, for grad, T, L and the l2norm scales in fp32 (PrepAux); and the scan of v for
//    non-finite values (quarantine.cuh).
// 2. chains (bwd_chains.cuh; grid: value blocks x heads x 2N): the forward state recurrence and
//    the state-gradient recurrence, storing per chunk S_c, Vn, dS'_c and dVn.
// 3. grad (bwd_grad.cuh; grid: chunk slots x heads, token-parallel): every per-token gradient of
//    a chunk, and per-chunk partial sums of dA_log and ddt_bias.
// 4. reduce (bwd_reduce.cuh; grid: batch rows x heads): those partial sums in a fixed order.
//
// bwd_split, the sequence split's backward (jax_flashkda_bwd_split): step 1 once; the
// state-gradient chains alone from zero end cotangents (storing nothing per chunk); a backward
// walk of each sequence's segments (split_combine.cuh) for their true end cotangents; steps 2
// to 4 from those.
#include "kda/kda_bwd.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <cstdlib>
#include <string>

#include "kda/bwd_chains.cuh"
#include "kda/bwd_grad.cuh"
#include "kda/bwd_reduce.cuh"
#include "kda/bwd_traits.cuh"
#include "kda/chunks.cuh"
#include "kda/prep.cuh"
#include "kda/quarantine.cuh"
#include "kda/split_combine.cuh"

namespace kda {
namespace {

// Byte offsets of the workspace regions; per (head, slot) each. split: also the split
// backward's two [N,H,K,V] fp32 buffers of segment states (end cotangents, dZ).
template <typename Tr>
struct WsLayout {
  size_t rec, aux, states, dstates, vn, dvn, pdt, pda, dead_rows, dead_cols, dead_v, split_end,
      split_dz, total;
  WsLayout(const FwdParams& p, bool split) {
    const size_t hs = static_cast<size_t>(chunk_slots(p)) * p.H;
    WorkspaceCursor ws;
    constexpr size_t K = Tr::K, V = Tr::V;
    rec = ws.take(hs * Tr::R::kBytes);
    aux = ws.take(hs * sizeof(PrepAux));
    states = ws.take(hs * V * K * 2);   // Sᵀ_c [V][K] bf16
    dstates = ws.take(hs * V * K * 2);  // dS'ᵀ_c [V][K] bf16
    vn = ws.take(hs * kC * V * 2);      // Vn [16][V] bf16
    dvn = ws.take(hs * kC * V * 2);     // dVn [16][V] bf16
    pdt = ws.take(hs * K * 4);          // ddt_bias partials [K] f32
    pda = ws.take(hs * 4);              // dA_log partials f32
    // docs/robustness.md §3, per (sequence, head): the first row with a non-finite q, k, β or
    // log-decay; then per value column the first with a non-finite v; then the first of those
    // over the head's columns (so that a clean head reads one int, not V). Adjacent: one memset.
    const size_t nh = static_cast<size_t>(p.N) * p.H;
    dead_rows = ws.take(nh * 4 + nh * V * 4 + nh * 4);
    dead_cols = dead_rows + nh * 4;
    dead_v = dead_cols + nh * V * 4;
    split_end = ws.take(split ? nh * K * V * 4 : 0);
    split_dz = ws.take(split ? nh * K * V * 4 : 0);
    total = ws.end;
  }
};

// The prep with the backward's extras (kAux): records whose Q̃ and Aqk have the dtype of q (they
// multiply dO inside the chains' mma), a PrepAux per (head, chunk slot), both indexed
// h·slots + slot; and, per (sequence, head), the first row with a non-finite q, k, β or
// log-decay lowered into dead_rows[n·H + h] (filled with kNoDeadRow first).
template <typename Tr, typename Tin>
cudaError_t launch_bwd_prep(const FwdParams& p, uint8_t* recs, PrepAux* aux, int* dead_rows,
                            int slots, cudaStream_t stream) {
  if (slots == 0 || p.H == 0) return cudaSuccess;
  int sms = 0;
  KDA_TRY(sm_count(sms));
  constexpr int K = Tr::K;
  return factored_gate(p)
             ? launch_prep<K, true, Tin, Tin, true>(p, recs, aux, dead_rows, slots, sms, stream)
             : launch_prep<K, false, Tin, Tin, true>(p, recs, aux, dead_rows, slots, sms, stream);
}

// The chains are latency-bound (a dependent step per chunk): with one CTA per SM or fewer, a
// deep record prefetch hides the fetch latency; with more, a few stages at two or three CTAs
// per SM (the most that fit beside the state tiles) keep every chain of a large batch resident
// at once (two waves would double the time).
template <typename Tr, int NW, int kStages, int kMinBlocks, typename Tin, bool kStateGradOnly>
cudaError_t launch_chains(const BwdParams& p, const uint8_t* recs, __nv_bfloat16* states,
                          __nv_bfloat16* dstates, __nv_bfloat16* vn, __nv_bfloat16* dvn,
                          const int* dead_rows, const int* dead_cols, int slots,
                          cudaStream_t stream) {
  using L = ChainSmem<Tr, NW, kStages>;
  auto chains = kda_bwd_chains_kernel<Tr, NW, kStages, kMinBlocks, Tin, kStateGradOnly>;
  KDA_TRY(cudaFuncSetAttribute(chains, cudaFuncAttributeMaxDynamicSharedMemorySize, L::kBytes));
  const unsigned directions = kStateGradOnly ? 1 : 2;
  chains<<<dim3(Tr::V / L::BV, p.H, directions * p.N), NW * 32, L::kBytes, stream>>>(
      p, recs, states, dstates, vn, dvn, dead_rows, dead_cols, slots);
  return cudaGetLastError();
}

// Four warps per CTA share each record fetch; where that leaves under ~70% of the SMs a CTA
// (few heads and sequences, long ones), two warps per CTA spread the chains over twice the SMs.
// JAX_FLASHKDA_BWD_CHAINS (4x12x1, 4x3x3, 2x12x1 or 2x4x3: warps, stages, CTAs per SM) forces
// one of the four, for the tests; jax_flashkda/ops.py refuses any other value before a call.
template <typename Tr, typename Tin, bool kStateGradOnly>
cudaError_t launch_chains_any(const BwdParams& p, const uint8_t* recs, __nv_bfloat16* states,
                              __nv_bfloat16* dstates, __nv_bfloat16* vn, __nv_bfloat16* dvn,
                              const int* dead_rows, const int* dead_cols, int slots,
                              cudaStream_t stream) {
  const long long chains4 =
      static_cast<long long>(Tr::V / 64) * p.H * (kStateGradOnly ? 1 : 2) * p.N;
  int sms = 0;
  KDA_TRY(sm_count(sms));
  bool wide = chains4 * 10 >= 7LL * sms;  // four warps per CTA
  bool deep = wide ? chains4 <= sms : 2 * chains4 <= sms;  // 12 stages, one CTA per SM
  if (const char* env = std::getenv("JAX_FLASHKDA_BWD_CHAINS")) {
    const std::string forced(env);
    if (forced == "4x12x1" || forced == "4x3x3" || forced == "2x12x1" || forced == "2x4x3") {
      wide = forced[0] == '4';
      deep = forced.find("x12x") != std::string::npos;
    }
  }
  constexpr bool s = kStateGradOnly;
  if (wide)
    return deep
               ? launch_chains<Tr, 4, 12, 1, Tin, s>(p, recs, states, dstates, vn, dvn,
                                                     dead_rows, dead_cols, slots, stream)
               : launch_chains<Tr, 4, 3, 3, Tin, s>(p, recs, states, dstates, vn, dvn, dead_rows,
                                                    dead_cols, slots, stream);
  return deep
             ? launch_chains<Tr, 2, 12, 1, Tin, s>(p, recs, states, dstates, vn, dvn, dead_rows,
                                                   dead_cols, slots, stream)
             : launch_chains<Tr, 2, 4, 3, Tin, s>(p, recs, states, dstates, vn, dvn, dead_rows,
                                                  dead_cols, slots, stream);
}

// Step 1: the records and the quarantine's marks.
template <typename Tr, typename Tin>
cudaError_t prepare(const BwdParams& p, const WsLayout<Tr>& lay, uint8_t* ws,
                    cudaStream_t stream) {
  constexpr int V = Tr::V;
  auto* dead_rows = reinterpret_cast<int*>(ws + lay.dead_rows);
  auto* dead_cols = reinterpret_cast<int*>(ws + lay.dead_cols);
  auto* dead_v = reinterpret_cast<int*>(ws + lay.dead_v);
  const size_t nh = static_cast<size_t>(p.N) * p.H;
  static_assert(kNoDeadRow == 0x7f7f7f7f, "filled bytewise");
  KDA_TRY(cudaMemsetAsync(dead_rows, 0x7f, nh * (2 + V) * sizeof(int), stream));
  KDA_TRY(launch_bwd_prep<Tr, Tin>(p, ws + lay.rec, reinterpret_cast<PrepAux*>(ws + lay.aux),
                                   dead_rows, chunk_slots(p), stream));
  if (const long long pieces = static_cast<long long>(p.B) * p.T * p.H * (V / 8); pieces > 0) {
    kda_scan_v_kernel<Tin, V><<<static_cast<unsigned>((pieces + 255) / 256), 256, 0, stream>>>(
        p, dead_cols, dead_v);
    KDA_TRY(cudaGetLastError());
  }
  return cudaSuccess;
}

// Step 2: the chains (the state gradient's alone with kStateGradOnly), from step 1's records.
template <typename Tr, typename Tin, bool kStateGradOnly>
cudaError_t chains(const BwdParams& p, const WsLayout<Tr>& lay, uint8_t* ws, cudaStream_t stream) {
  if (p.N == 0) return cudaSuccess;
  return launch_chains_any<Tr, Tin, kStateGradOnly>(
      p, ws + lay.rec, reinterpret_cast<__nv_bfloat16*>(ws + lay.states),
      reinterpret_cast<__nv_bfloat16*>(ws + lay.dstates),
      reinterpret_cast<__nv_bfloat16*>(ws + lay.vn),
      reinterpret_cast<__nv_bfloat16*>(ws + lay.dvn),
      reinterpret_cast<const int*>(ws + lay.dead_rows),
      reinterpret_cast<const int*>(ws + lay.dead_cols), chunk_slots(p), stream);
}

// Steps 3 and 4, from step 2's states.
template <typename Tr, typename Tin, bool kFactored>
cudaError_t grad_and_reduce(const BwdParams& p, const WsLayout<Tr>& lay, uint8_t* ws,
                            cudaStream_t stream) {
  constexpr int K = Tr::K;
  const int slots = chunk_slots(p);
  auto* pdt = reinterpret_cast<float*>(ws + lay.pdt);
  auto* pda = reinterpret_cast<float*>(ws + lay.pda);
  if (slots > 0) {
    auto grad = kda_bwd_grad_kernel<Tr, kFactored, Tin>;
    constexpr int bytes = sizeof(GradSmem<Tr>);
    KDA_TRY(cudaFuncSetAttribute(grad, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes));
    grad<<<dim3(slots, p.H), Tr::kGradThreads, bytes, stream>>>(
        p, reinterpret_cast<const PrepAux*>(ws + lay.aux),
        reinterpret_cast<const __nv_bfloat16*>(ws + lay.states),
        reinterpret_cast<const __nv_bfloat16*>(ws + lay.dstates),
        reinterpret_cast<const __nv_bfloat16*>(ws + lay.vn),
        reinterpret_cast<const __nv_bfloat16*>(ws + lay.dvn), pdt, pda,
        reinterpret_cast<const int*>(ws + lay.dead_rows),
        reinterpret_cast<const int*>(ws + lay.dead_cols),
        reinterpret_cast<const int*>(ws + lay.dead_v), slots);
    KDA_TRY(cudaGetLastError());
  }
  kda_bwd_reduce_kernel<Tr, Tin><<<dim3(p.B, p.H), K, 0, stream>>>(p, pdt, pda, slots);
  return cudaGetLastError();
}

template <typename Tr, typename Tin, bool kFactored>
cudaError_t bwd_t(const BwdParams& p, uint8_t* ws, cudaStream_t stream) {
  const WsLayout<Tr> lay(p, /*split=*/false);
  KDA_TRY((prepare<Tr, Tin>(p, lay, ws, stream)));
  KDA_TRY((chains<Tr, Tin, false>(p, lay, ws, stream)));
  return grad_and_reduce<Tr, Tin, kFactored>(p, lay, ws, stream);
}

// bwd_split (kda_bwd.h): the end cotangents of the first pass are zeros in split_end, which the
// walk then overwrites with the true ones (the unused segments, walked by no sequence, keep 0).
template <typename Tr, typename Tin, bool kFactored>
cudaError_t bwd_split_t(const BwdParams& p, const SplitBwdOperands& split, uint8_t* ws,
                        cudaStream_t stream) {
  constexpr int K = Tr::K, V = Tr::V;
  const WsLayout<Tr> lay(p, /*split=*/true);
  auto* d_end = reinterpret_cast<float*>(ws + lay.split_end);
  auto* dz = reinterpret_cast<float*>(ws + lay.split_dz);
  KDA_TRY((prepare<Tr, Tin>(p, lay, ws, stream)));
  KDA_TRY(cudaMemsetAsync(d_end, 0, static_cast<size_t>(p.N) * p.H * K * V * sizeof(float),
                          stream));
  BwdParams first_pass = p;
  first_pass.dfinal_state = d_end;
  first_pass.dinitial_state = dz;
  KDA_TRY((chains<Tr, Tin, true>(first_pass, lay, ws, stream)));
  if (split.sequences > 0 && p.N > 0) {
    FwdParams walk = p;  // X starts from dfinal, keys first
    walk.initial_state = split.dfinal;
    walk.attrs.state_v_first = false;
    using C = CombineSmem<K>;
    KDA_TRY(cudaFuncSetAttribute(kda_split_combine_kernel<K, true>,
                                 cudaFuncAttributeMaxDynamicSharedMemorySize, C::kBytes));
    kda_split_combine_kernel<K, true>
        <<<dim3(V / 16, p.H, split.sequences), K, C::kBytes, stream>>>(
            walk, SegmentMaps{split.transitions_t, K, dz, V}, p.N, split.first, split.last,
            d_end);
    KDA_TRY(cudaGetLastError());
  }
  BwdParams second_pass = p;
  second_pass.dfinal_state = d_end;
  KDA_TRY((chains<Tr, Tin, false>(second_pass, lay, ws, stream)));
  return grad_and_reduce<Tr, Tin, kFactored>(second_pass, lay, ws, stream);
}

template <typename Tr>
cudaError_t bwd_k(const BwdParams& p, uint8_t* ws, cudaStream_t stream) {
  const bool factored = factored_gate(p);
  if (p.qkv_dtype == DType::kF16)
    return factored ? bwd_t<Tr, __half, true>(p, ws, stream)
                    : bwd_t<Tr, __half, false>(p, ws, stream);
  return factored ? bwd_t<Tr, __nv_bfloat16, true>(p, ws, stream)
                  : bwd_t<Tr, __nv_bfloat16, false>(p, ws, stream);
}

template <typename Tr>
cudaError_t bwd_split_k(const BwdParams& p, const SplitBwdOperands& split, uint8_t* ws,
                        cudaStream_t stream) {
  const bool factored = factored_gate(p);
  if (p.qkv_dtype == DType::kF16)
    return factored ? bwd_split_t<Tr, __half, true>(p, split, ws, stream)
                    : bwd_split_t<Tr, __half, false>(p, split, ws, stream);
  return factored ? bwd_split_t<Tr, __nv_bfloat16, true>(p, split, ws, stream)
                  : bwd_split_t<Tr, __nv_bfloat16, false>(p, split, ws, stream);
}

// f(Tr{}) with the instantiated traits of the call's head dims (checked by bwd_unsupported).
template <typename F>
auto with_traits(const BwdParams& p, F&& f) {
  return p.K == Bwd64::K ? f(Bwd64{}) : f(Bwd128{});
}

}  // namespace

const char* bwd_unsupported(const BwdParams& p) {
  if (p.qkv_dtype != DType::kBF16 && p.qkv_dtype != DType::kF16)
    return "q, k, v and do must be bfloat16 or float16 on the CUDA target";
  if (p.K != p.V || (p.K != Bwd64::K && p.K != Bwd128::K))
    return "the CUDA backward supports K = V = 64 or 128 only";
  if (!valid_gate_mode(p.attrs.gate_mode)) return "gate_mode must be 0, 1 or 2";
  if (p.N > 32767 || p.H > 65535 || p.B > 65535)
    return "the CUDA backward supports at most 32767 sequences, 65535 heads and batch rows";
  return nullptr;
}

size_t bwd_workspace_bytes(const BwdParams& p) {
  return with_traits(p, [&](auto tr) { return WsLayout<decltype(tr)>(p, false).total; });
}

size_t bwd_split_workspace_bytes(const BwdParams& p) {
  return with_traits(p, [&](auto tr) { return WsLayout<decltype(tr)>(p, true).total; });
}

cudaError_t bwd_split(const BwdParams& p, const SplitBwdOperands& split, void* workspace,
                      cudaStream_t stream) {
  if (bwd_unsupported(p) || !p.attrs.is_varlen || p.attrs.state_v_first)
    return cudaErrorInvalidValue;
  if (p.B == 0 || p.H == 0) return cudaSuccess;
  auto* ws = static_cast<uint8_t*>(workspace);
  return with_traits(p,
                     [&](auto tr) { return bwd_split_k<decltype(tr)>(p, split, ws, stream); });
}

cudaError_t bwd(const BwdParams& p, void* workspace, cudaStream_t stream) {
  if (bwd_unsupported(p)) return cudaErrorInvalidValue;
  if (p.B == 0 || p.H == 0) return cudaSuccess;
  auto* ws = static_cast<uint8_t*>(workspace);
  return with_traits(p, [&](auto tr) { return bwd_k<decltype(tr)>(p, ws, stream); });
}

}  // namespace kda
