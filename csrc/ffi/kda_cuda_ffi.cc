// The custom calls on the Hopper target. Each handler decodes (the binding: buffers and the
// attributes as one struct), checks (docs/ffi_contract.md, then what the kernels support) and
// launches: enqueues the kernels of csrc/kda on XLA's stream, with XLA's scratch memory as
// workspace (the forward and backward; the decode needs none).
#include "ffi/kda_cuda_ffi.h"

#include <cstdint>
#include <cstdlib>
#include <optional>
#include <string>
#include <vector>

#include <cuda_runtime.h>

#include "ffi/contract.h"
#include "kda/kda_bwd.h"
#include "kda/kda_decode.h"
#include "kda/kda_fwd.h"
#include "kda/offsets.h"

namespace ffi = xla::ffi;
namespace contract = jax_flashkda::contract;
using jax_flashkda::Attributes;
using jax_flashkda::DecodeAttributes;
using jax_flashkda::DType;
using jax_flashkda::SplitAttributes;

namespace {

const std::string kFwd = "jax_flashkda_fwd (CUDA)";
const std::string kBwd = "jax_flashkda_bwd (CUDA)";
const std::string kDecode = "jax_flashkda_decode (CUDA)";
const std::string kFwdSplit = "jax_flashkda_fwd_split (CUDA)";
const std::string kBwdSplit = "jax_flashkda_bwd_split (CUDA)";

// What the CUDA target reads beyond the contract (after contract::check_inputs): q, k, v in
// bf16 or f16, sizes its 32-bit indices hold; then the launch parameters all three calls share.
// Operand addresses are set by the staging (stage_inputs; the decode's by launch_decode);
// cu_seqlens is replaced by its legal form before the forward's and backward's kernels run
// (launch).
ffi::Error cuda_params(const std::string& who, const contract::Inputs& in,
                       const contract::Sizes& s, const Attributes& attrs, kda::FwdParams& p) {
  const auto qkv_t = contract::float_dtype(in.q.element_type());
  if (!qkv_t || *qkv_t == DType::kF32)
    return contract::invalid(who, "q must be bfloat16 or float16 on the CUDA target");
  const auto g_t = contract::float_dtype(in.g.element_type());
  if (!g_t) return contract::invalid(who, "g must be bfloat16, float16 or float32");
  const auto beta_t = contract::float_dtype(in.beta.element_type());
  if (!beta_t) return contract::invalid(who, "beta must be bfloat16, float16 or float32");
  if (const char* why = kda::index_range_unsupported(s.B, s.T, s.H, s.N))
    return contract::invalid(who, why);

  p.cu_seqlens = static_cast<const int32_t*>(in.cu_seqlens.untyped_data());
  p.qkv_dtype = *qkv_t;
  p.g_dtype = *g_t;
  p.beta_dtype = *beta_t;
  p.B = static_cast<int>(s.B);
  p.T = static_cast<int>(s.T);
  p.H = static_cast<int>(s.H);
  p.K = static_cast<int>(s.K);
  p.V = static_cast<int>(s.V);
  p.N = static_cast<int>(s.N);
  p.attrs = attrs;
  return ffi::Error::Success();
}

ffi::Error cuda_error(const std::string& who, cudaError_t err) {
  return ffi::Error::Internal(who + ": " + cudaGetErrorName(err) + ": " + cudaGetErrorString(err));
}

ffi::Error scratch_error(const std::string& who, size_t bytes, const char* what) {
  return ffi::Error(ffi::ErrorCode::kResourceExhausted,
                    who + ": could not allocate " + std::to_string(bytes) + " bytes of " + what);
}

// JAX_FLASHKDA_POISON_OUTPUTS=1 (the GPU tests set it): every result a kernel writes is filled
// with NaN bytes first, so that an element the kernels leave unwritten fails a test instead of
// passing on whatever the allocator left there. Off by default: it costs a memset per result.
bool poison_outputs_asked() {
  const char* env = std::getenv("JAX_FLASHKDA_POISON_OUTPUTS");
  return env && env[0] == '1';
}

// The kernels move operands with 16-byte copies (cp.async, bulk copies, vector stores), which
// fault on an address that is not a multiple of 16. XLA hands a dynamic_slice of a larger buffer
// to a custom call as an offset pointer, so any address can arrive: an operand at one is copied
// into aligned scratch before the kernels run, a result is written there and copied out after.
constexpr uintptr_t kKernelAlignment = 16;

class Staging {
 public:
  Staging(const std::string& who, ffi::ScratchAllocator& scratch, cudaStream_t stream)
      : who_(who), scratch_(scratch), stream_(stream) {}

  // Sets `ptr` to the address the kernels read `operand` from.
  template <typename T>
  ffi::Error input(const ffi::AnyBuffer& operand, const T*& ptr) {
    const void* at = operand.untyped_data();
    if (!aligned(at)) {
      void* copy = nullptr;
      KDA_RETURN_IF_ERROR(allocate(operand.size_bytes(), copy));
      if (const cudaError_t err = cudaMemcpyAsync(copy, at, operand.size_bytes(),
                                                  cudaMemcpyDeviceToDevice, stream_);
          err != cudaSuccess)
        return cuda_error(who_, err);
      at = copy;
    }
    ptr = static_cast<const T*>(at);
    return ffi::Error::Success();
  }

  // Sets `ptr` to the address the kernels write `result` to; copy_out() moves staged results
  // into place after the kernels.
  template <typename T>
  ffi::Error output(const ffi::AnyBuffer& result, T*& ptr) {
    void* at = result.untyped_data();
    if (!aligned(at)) {
      KDA_RETURN_IF_ERROR(allocate(result.size_bytes(), at));
      pending_.push_back({result.untyped_data(), at, result.size_bytes()});
    }
    ptr = static_cast<T*>(at);
    written_.push_back({at, result.size_bytes()});
    return ffi::Error::Success();
  }

  // Every result the kernels write filled with NaN bytes, where poison_outputs_asked().
  cudaError_t poison_if_asked() const {
    if (!poison_outputs_asked()) return cudaSuccess;
    for (const auto& [at, bytes] : written_)
      if (bytes > 0)
        if (const cudaError_t err = cudaMemsetAsync(at, 0xFF, bytes, stream_); err != cudaSuccess)
          return err;
    return cudaSuccess;
  }

  cudaError_t copy_out() const {
    for (const Pending& r : pending_)
      if (const cudaError_t err = cudaMemcpyAsync(r.dst, r.src, r.bytes,
                                                  cudaMemcpyDeviceToDevice, stream_);
          err != cudaSuccess)
        return err;
    return cudaSuccess;
  }

 private:
  struct Pending {
    void* dst;
    const void* src;
    size_t bytes;
  };
  static bool aligned(const void* p) { return reinterpret_cast<uintptr_t>(p) % kKernelAlignment == 0; }
  ffi::Error allocate(size_t bytes, void*& ptr) {
    std::optional<void*> got = scratch_.Allocate(bytes > 0 ? bytes : 1, kKernelAlignment);
    if (!got) return scratch_error(who_, bytes, "staging for an unaligned buffer");
    ptr = *got;
    return ffi::Error::Success();
  }

  const std::string& who_;
  ffi::ScratchAllocator& scratch_;
  cudaStream_t stream_;
  std::vector<Pending> pending_;
  std::vector<std::pair<void*, size_t>> written_;
};


// Operands 0-7 through the staging (cu_seqlens is read with 4-byte loads only, by the offsets
// kernel).
ffi::Error stage_inputs(Staging& staging, const contract::Inputs& in, kda::FwdParams& p) {
  KDA_RETURN_IF_ERROR(staging.input(in.q, p.q));
  KDA_RETURN_IF_ERROR(staging.input(in.k, p.k));
  KDA_RETURN_IF_ERROR(staging.input(in.v, p.v));
  KDA_RETURN_IF_ERROR(staging.input(in.g, p.g));
  KDA_RETURN_IF_ERROR(staging.input(in.beta, p.beta));
  KDA_RETURN_IF_ERROR(staging.input(in.A_log, p.A_log));
  KDA_RETURN_IF_ERROR(staging.input(in.dt_bias, p.dt_bias));
  return staging.input(in.initial_state, p.initial_state);
}

// Shared tail of both calls, after the operands are staged: cu_seqlens made legal
// (docs/robustness.md §1) in scratch, so that no offset value can send a kernel outside its
// buffers; poisoning the results when asked; the workspace; the launch; staged results out.
template <typename Params, typename WorkspaceBytes, typename Launch>
ffi::Error launch(const std::string& who, Params& p, const Staging& staging,
                  ffi::ScratchAllocator& scratch, cudaStream_t stream,
                  WorkspaceBytes workspace_bytes, Launch run) {
  if (p.attrs.is_varlen) {
    const size_t bytes = static_cast<size_t>(p.N + 1) * sizeof(int32_t);
    std::optional<void*> legal = scratch.Allocate(bytes, kKernelAlignment);
    if (!legal) return scratch_error(who, bytes, "legal cu_seqlens");
    if (const cudaError_t err = kda::legal_offsets(p.cu_seqlens, static_cast<int32_t*>(*legal),
                                                   p.N + 1, p.T, stream);
        err != cudaSuccess)
      return cuda_error(who, err);
    p.cu_seqlens = static_cast<const int32_t*>(*legal);
  }
  if (const cudaError_t err = staging.poison_if_asked(); err != cudaSuccess)
    return cuda_error(who, err);
  void* workspace = nullptr;
  if (const size_t bytes = workspace_bytes(p); bytes > 0) {
    std::optional<void*> got = scratch.Allocate(bytes, kKernelAlignment);
    if (!got) return scratch_error(who, bytes, "workspace");
    workspace = *got;
  }
  if (const cudaError_t err = run(p, workspace, stream); err != cudaSuccess)
    return cuda_error(who, err);
  if (const cudaError_t err = staging.copy_out(); err != cudaSuccess) return cuda_error(who, err);
  return ffi::Error::Success();
}

ffi::Error unimplemented(const std::string& who, const char* why) {
  return ffi::Error(ffi::ErrorCode::kUnimplemented, who + ": " + why);
}

// The forward and the split forward: decode, check (unsupported: the kernels' own refusal, as
// kda::fwd_unsupported), stage (more_results: the results beyond o and final_state, checked
// and staged once the sizes are known to be supported), launch.
template <typename Unsupported, typename MoreResults, typename WorkspaceBytes, typename Launch>
ffi::Error forward(const std::string& who, cudaStream_t stream, ffi::ScratchAllocator& scratch,
                   const contract::Inputs& in, ffi::AnyBuffer& o, ffi::AnyBuffer& final_state,
                   const Attributes& attrs, Unsupported unsupported, MoreResults more_results,
                   WorkspaceBytes workspace_bytes, Launch run) {
  contract::Sizes s;
  kda::FwdParams p;
  KDA_RETURN_IF_ERROR(contract::check_inputs(who, in, attrs, s));
  KDA_RETURN_IF_ERROR(cuda_params(who, in, s, attrs, p));
  KDA_RETURN_IF_ERROR(contract::check_forward(who, s, in, o, final_state));
  if (const char* why = unsupported(p)) return unimplemented(who, why);

  Staging staging(who, scratch, stream);
  KDA_RETURN_IF_ERROR(stage_inputs(staging, in, p));
  KDA_RETURN_IF_ERROR(staging.output(o, p.o));
  KDA_RETURN_IF_ERROR(staging.output(final_state, p.final_state));
  KDA_RETURN_IF_ERROR(more_results(staging, p));
  return launch(who, p, staging, scratch, stream, workspace_bytes, run);
}

ffi::Error fwd_impl(cudaStream_t stream, ffi::ScratchAllocator scratch, ffi::AnyBuffer q,
                    ffi::AnyBuffer k, ffi::AnyBuffer v, ffi::AnyBuffer g, ffi::AnyBuffer beta,
                    ffi::AnyBuffer A_log, ffi::AnyBuffer dt_bias, ffi::AnyBuffer initial_state,
                    ffi::AnyBuffer cu_seqlens, ffi::Result<ffi::AnyBuffer> o,
                    ffi::Result<ffi::AnyBuffer> final_state, Attributes attrs) {
  return forward(
      kFwd, stream, scratch, {q, k, v, g, beta, A_log, dt_bias, initial_state, cu_seqlens}, *o,
      *final_state, attrs, kda::fwd_unsupported,
      [](Staging&, const kda::FwdParams&) { return ffi::Error::Success(); },
      kda::fwd_workspace_bytes, kda::fwd);
}

// The forward with the sequence split (docs/sequence_split.md): the forward's operands, results
// and checks, then segment_tokens; its three more results are the segments' states (fp32
// [S,H,K,V], [S,H,K,V+K], [S,H,K,V]: kda::SplitStates), for the split backward.
ffi::Error fwd_split_impl(cudaStream_t stream, ffi::ScratchAllocator scratch, ffi::AnyBuffer q,
                          ffi::AnyBuffer k, ffi::AnyBuffer v, ffi::AnyBuffer g,
                          ffi::AnyBuffer beta, ffi::AnyBuffer A_log, ffi::AnyBuffer dt_bias,
                          ffi::AnyBuffer initial_state, ffi::AnyBuffer cu_seqlens,
                          ffi::Result<ffi::AnyBuffer> o, ffi::Result<ffi::AnyBuffer> final_state,
                          ffi::Result<ffi::AnyBuffer> s_in,
                          ffi::Result<ffi::AnyBuffer> transitions,
                          ffi::Result<ffi::AnyBuffer> seg_final, SplitAttributes attrs) {
  const int seg = attrs.segment_tokens;
  kda::SplitStates states;
  auto segment_states = [&](Staging& staging, const kda::FwdParams& p) {
    const int64_t S = kda::split_segments(p, seg), H = p.H, K = p.K, V = p.V;
    KDA_RETURN_IF_ERROR(
        contract::check_f32(kFwdSplit, *s_in, "segment_initial_states", {S, H, K, V}));
    KDA_RETURN_IF_ERROR(
        contract::check_f32(kFwdSplit, *transitions, "segment_transitions", {S, H, K, V + K}));
    KDA_RETURN_IF_ERROR(
        contract::check_f32(kFwdSplit, *seg_final, "segment_final_states", {S, H, K, V}));
    KDA_RETURN_IF_ERROR(staging.output(*s_in, states.s_in));
    KDA_RETURN_IF_ERROR(staging.output(*transitions, states.transitions));
    return staging.output(*seg_final, states.seg_final);
  };
  return forward(
      kFwdSplit, stream, scratch, {q, k, v, g, beta, A_log, dt_bias, initial_state, cu_seqlens},
      *o, *final_state, attrs.common,
      [seg](const kda::FwdParams& p) { return kda::fwd_split_unsupported(p, seg); },
      segment_states,
      [seg](const kda::FwdParams& p) { return kda::fwd_split_workspace_bytes(p, seg); },
      [seg, &states](const kda::FwdParams& p, void* ws, cudaStream_t st) {
        return kda::fwd_split(p, seg, states, ws, st);
      });
}

// The backward's eight results, where the kernels write them.
ffi::Error stage_gradients(Staging& staging, const contract::BwdBuffers& b, kda::BwdParams& p) {
  KDA_RETURN_IF_ERROR(staging.output(b.dq, p.dq));
  KDA_RETURN_IF_ERROR(staging.output(b.dk, p.dk));
  KDA_RETURN_IF_ERROR(staging.output(b.dv, p.dv));
  KDA_RETURN_IF_ERROR(staging.output(b.dg, p.dg));
  KDA_RETURN_IF_ERROR(staging.output(b.dbeta, p.dbeta));
  KDA_RETURN_IF_ERROR(staging.output(b.dA_log, p.dA_log));
  KDA_RETURN_IF_ERROR(staging.output(b.ddt_bias, p.ddt_bias));
  return staging.output(b.dinitial_state, p.dinitial_state);
}

ffi::Error bwd_impl(cudaStream_t stream, ffi::ScratchAllocator scratch, ffi::AnyBuffer q,
                    ffi::AnyBuffer k, ffi::AnyBuffer v, ffi::AnyBuffer g, ffi::AnyBuffer beta,
                    ffi::AnyBuffer A_log, ffi::AnyBuffer dt_bias, ffi::AnyBuffer initial_state,
                    ffi::AnyBuffer cu_seqlens, ffi::AnyBuffer dout, ffi::AnyBuffer dfinal_state,
                    ffi::Result<ffi::AnyBuffer> dq, ffi::Result<ffi::AnyBuffer> dk,
                    ffi::Result<ffi::AnyBuffer> dv, ffi::Result<ffi::AnyBuffer> dg,
                    ffi::Result<ffi::AnyBuffer> dbeta, ffi::Result<ffi::AnyBuffer> dA_log,
                    ffi::Result<ffi::AnyBuffer> ddt_bias,
                    ffi::Result<ffi::AnyBuffer> dinitial_state, Attributes attrs) {
  const contract::Inputs in{q, k, v, g, beta, A_log, dt_bias, initial_state, cu_seqlens};
  const contract::BwdBuffers b{dout, dfinal_state, *dq, *dk, *dv, *dg, *dbeta, *dA_log,
                               *ddt_bias, *dinitial_state};

  contract::Sizes s;
  kda::BwdParams p;
  KDA_RETURN_IF_ERROR(contract::check_inputs(kBwd, in, attrs, s));
  KDA_RETURN_IF_ERROR(cuda_params(kBwd, in, s, attrs, p));
  KDA_RETURN_IF_ERROR(contract::check_backward(kBwd, s, in, b));
  if (const char* why = kda::bwd_unsupported(p)) return unimplemented(kBwd, why);

  Staging staging(kBwd, scratch, stream);
  KDA_RETURN_IF_ERROR(stage_inputs(staging, in, p));
  KDA_RETURN_IF_ERROR(staging.input(b.dout, p.dout));
  KDA_RETURN_IF_ERROR(staging.input(b.dfinal_state, p.dfinal_state));
  KDA_RETURN_IF_ERROR(stage_gradients(staging, b, p));
  return launch(kBwd, p, staging, scratch, stream, kda::bwd_workspace_bytes, kda::bwd);
}

// The sequence split's backward (docs/sequence_split.md): the backward's operands over the
// segments as packed sequences (is_varlen, keys first), dfinal_state per sequence
// ([N,H,K,V]), then the segments' transposed transitions [S,H,K,K] and each sequence's first and
// last segment (int32 [N]); the backward's results, dinitial_state per segment.
ffi::Error bwd_split_impl(cudaStream_t stream, ffi::ScratchAllocator scratch, ffi::AnyBuffer q,
                          ffi::AnyBuffer k, ffi::AnyBuffer v, ffi::AnyBuffer g,
                          ffi::AnyBuffer beta, ffi::AnyBuffer A_log, ffi::AnyBuffer dt_bias,
                          ffi::AnyBuffer initial_state, ffi::AnyBuffer cu_seqlens,
                          ffi::AnyBuffer dout, ffi::AnyBuffer dfinal_state,
                          ffi::AnyBuffer transitions_t, ffi::AnyBuffer first,
                          ffi::AnyBuffer last, ffi::Result<ffi::AnyBuffer> dq,
                          ffi::Result<ffi::AnyBuffer> dk, ffi::Result<ffi::AnyBuffer> dv,
                          ffi::Result<ffi::AnyBuffer> dg, ffi::Result<ffi::AnyBuffer> dbeta,
                          ffi::Result<ffi::AnyBuffer> dA_log,
                          ffi::Result<ffi::AnyBuffer> ddt_bias,
                          ffi::Result<ffi::AnyBuffer> dinitial_state, Attributes attrs) {
  const contract::Inputs in{q, k, v, g, beta, A_log, dt_bias, initial_state, cu_seqlens};
  const contract::BwdBuffers b{dout, dfinal_state, *dq, *dk, *dv, *dg, *dbeta, *dA_log,
                               *ddt_bias, *dinitial_state};
  if (!attrs.is_varlen || attrs.state_v_first)
    return contract::invalid(kBwdSplit, "the segments are packed sequences with keys first "
                                        "(is_varlen true, state_v_first false)");
  contract::Sizes s;
  kda::BwdParams p;
  KDA_RETURN_IF_ERROR(contract::check_inputs(kBwdSplit, in, attrs, s));
  KDA_RETURN_IF_ERROR(cuda_params(kBwdSplit, in, s, attrs, p));
  KDA_RETURN_IF_ERROR(contract::check_like(kBwdSplit, dout, "do", {s.B, s.T, s.H, s.V}, v, "v"));
  KDA_RETURN_IF_ERROR(contract::check_gradients(kBwdSplit, s, in, b));
  const auto fd = first.dimensions();
  if (fd.size() != 1)
    return contract::invalid(kBwdSplit, "first_segment must have shape [N], got " +
                                            contract::shape_string(fd));
  const int64_t n = fd[0];
  for (const auto& [buffer, name] : {std::pair{&first, "first_segment"}, {&last, "last_segment"}}) {
    KDA_RETURN_IF_ERROR(contract::check_shape(kBwdSplit, *buffer, name, {n}));
    KDA_RETURN_IF_ERROR(
        contract::check_dtype(kBwdSplit, *buffer, name, ffi::DataType::S32, "int32"));
  }
  KDA_RETURN_IF_ERROR(
      contract::check_f32(kBwdSplit, dfinal_state, "dfinal_state", {n, s.H, s.K, s.V}));
  KDA_RETURN_IF_ERROR(
      contract::check_f32(kBwdSplit, transitions_t, "transitions_t", {s.N, s.H, s.K, s.K}));
  if (const char* why = kda::bwd_unsupported(p)) return unimplemented(kBwdSplit, why);
  if (n > 65535)
    return unimplemented(kBwdSplit, "the split backward takes at most 65535 sequences");

  kda::SplitBwdOperands split;
  split.sequences = static_cast<int>(n);
  Staging staging(kBwdSplit, scratch, stream);
  KDA_RETURN_IF_ERROR(stage_inputs(staging, in, p));
  KDA_RETURN_IF_ERROR(staging.input(dout, p.dout));
  KDA_RETURN_IF_ERROR(staging.input(dfinal_state, split.dfinal));
  KDA_RETURN_IF_ERROR(staging.input(transitions_t, split.transitions_t));
  KDA_RETURN_IF_ERROR(staging.input(first, split.first));
  KDA_RETURN_IF_ERROR(staging.input(last, split.last));
  KDA_RETURN_IF_ERROR(stage_gradients(staging, b, p));
  return launch(kBwdSplit, p, staging, scratch, stream, kda::bwd_split_workspace_bytes,
                [&split](const kda::BwdParams& bp, void* ws, cudaStream_t st) {
                  return kda::bwd_split(bp, split, ws, st);
                });
}

// The decode's own operands, checked into the slot fields of DecodeParams.
ffi::Error decode_slots(const contract::Sizes& s, const ffi::AnyBuffer& state_indices,
                        const ffi::AnyBuffer& num_accepted, const DecodeAttributes& attrs,
                        kda::DecodeParams& p) {
  p.pool_slots = static_cast<int>(s.state[0]);
  if (s.state[0] > (int64_t{1} << 30))
    return contract::invalid(kDecode, "the state pool may have at most 2^30 slots");
  if (attrs.use_state_indices) {
    KDA_RETURN_IF_ERROR(contract::check_dtype(kDecode, state_indices, "state_indices",
                                              ffi::DataType::S32, "int32"));
    const auto d = state_indices.dimensions();
    if ((d.size() != 1 && d.size() != 2) || d[0] != s.N || (d.size() == 2 && d[1] < 1))
      return contract::invalid(kDecode, "state_indices must have shape [N] or [N,S] with N=" +
                                            std::to_string(s.N) + ", got " +
                                            contract::shape_string(d));
    p.state_indices = static_cast<const int32_t*>(state_indices.untyped_data());
    p.per_token_slots = d.size() == 2;
    p.index_cols = d.size() == 2 ? static_cast<int>(d[1]) : 1;
  }
  if (attrs.use_num_accepted) {
    if (!p.per_token_slots)
      return contract::invalid(kDecode, "num_accepted_tokens needs state_indices [N,S]");
    KDA_RETURN_IF_ERROR(contract::check_dtype(kDecode, num_accepted, "num_accepted_tokens",
                                              ffi::DataType::S32, "int32"));
    KDA_RETURN_IF_ERROR(
        contract::check_shape(kDecode, num_accepted, "num_accepted_tokens", {s.N}));
    p.num_accepted = static_cast<const int32_t*>(num_accepted.untyped_data());
  }
  return ffi::Error::Success();
}

// The operand addresses as they are, the state copied into the result should XLA not alias
// them, o zeroed (no sequences) or poisoned (when asked), then the kernel.
ffi::Error launch_decode(const contract::Inputs& in, ffi::AnyBuffer& o, ffi::AnyBuffer& state_out,
                         kda::DecodeParams& p, cudaStream_t stream) {
  p.q = in.q.untyped_data();
  p.k = in.k.untyped_data();
  p.v = in.v.untyped_data();
  p.g = in.g.untyped_data();
  p.beta = in.beta.untyped_data();
  p.A_log = static_cast<const float*>(in.A_log.untyped_data());
  p.dt_bias = static_cast<const float*>(in.dt_bias.untyped_data());
  p.o = o.untyped_data();
  p.state = static_cast<float*>(state_out.untyped_data());
  // XLA gives the aliased result the operand's buffer; should it ever not, the state is first
  // copied over so that slots the call does not write keep their values.
  const ffi::AnyBuffer& state = in.initial_state;
  if (state_out.untyped_data() != state.untyped_data())
    if (const cudaError_t err = cudaMemcpyAsync(state_out.untyped_data(), state.untyped_data(),
                                                state.size_bytes(), cudaMemcpyDeviceToDevice,
                                                stream);
        err != cudaSuccess)
      return cuda_error(kDecode, err);
  // Without sequences no warp writes o (its tokens, if any, are outside every sequence).
  const bool zero_o = p.N == 0;
  if ((zero_o || poison_outputs_asked()) && o.size_bytes() > 0)
    if (const cudaError_t err =
            cudaMemsetAsync(o.untyped_data(), zero_o ? 0 : 0xFF, o.size_bytes(), stream);
        err != cudaSuccess)
      return cuda_error(kDecode, err);
  if (const cudaError_t err = kda::decode(p, stream); err != cudaSuccess)
    return cuda_error(kDecode, err);
  return ffi::Error::Success();
}

// The decode (docs/decode.md): the forward's operands with the state read and written in place
// (result 1 aliases operand 7), plus state_indices ([N] or [N,S] int32; a dummy [1] without
// use_state_indices) and num_accepted_tokens ([N] int32; a dummy [1] without
// use_num_accepted). It allocates nothing and stages nothing (the kernel reads its operands
// element by element, at any address), so XLA may capture it into a command buffer; the
// caller makes traced cu_seqlens legal first (the kernel only clamps them).
ffi::Error decode_impl(cudaStream_t stream, ffi::AnyBuffer q, ffi::AnyBuffer k, ffi::AnyBuffer v,
                       ffi::AnyBuffer g, ffi::AnyBuffer beta, ffi::AnyBuffer A_log,
                       ffi::AnyBuffer dt_bias, ffi::AnyBuffer state, ffi::AnyBuffer cu_seqlens,
                       ffi::AnyBuffer state_indices, ffi::AnyBuffer num_accepted,
                       ffi::Result<ffi::AnyBuffer> o, ffi::Result<ffi::AnyBuffer> state_out,
                       DecodeAttributes attrs) {
  const contract::Inputs in{q, k, v, g, beta, A_log, dt_bias, state, cu_seqlens};

  contract::Sizes s;
  kda::DecodeParams p;
  KDA_RETURN_IF_ERROR(contract::check_inputs(kDecode, in, attrs.common, s,
                                             /*state_is_pool=*/attrs.use_state_indices));
  KDA_RETURN_IF_ERROR(cuda_params(kDecode, in, s, attrs.common, p));
  KDA_RETURN_IF_ERROR(contract::check_forward(kDecode, s, in, *o, *state_out));
  KDA_RETURN_IF_ERROR(decode_slots(s, state_indices, num_accepted, attrs, p));
  if (const char* why = kda::decode_unsupported(p)) return unimplemented(kDecode, why);

  return launch_decode(in, *o, *state_out, p, stream);
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(jax_flashkda_fwd_cuda, fwd_impl,
                              KDA_FWD_SIGNATURE(ffi::Ffi::Bind()
                                                    .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                                    .Ctx<ffi::ScratchAllocator>()));
XLA_FFI_DEFINE_HANDLER_SYMBOL(jax_flashkda_fwd_split_cuda, fwd_split_impl,
                              KDA_FWD_SPLIT_SIGNATURE(ffi::Ffi::Bind()
                                                          .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                                          .Ctx<ffi::ScratchAllocator>()));
XLA_FFI_DEFINE_HANDLER_SYMBOL(jax_flashkda_bwd_cuda, bwd_impl,
                              KDA_BWD_SIGNATURE(ffi::Ffi::Bind()
                                                    .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                                    .Ctx<ffi::ScratchAllocator>()));
XLA_FFI_DEFINE_HANDLER_SYMBOL(jax_flashkda_bwd_split_cuda, bwd_split_impl,
                              KDA_BWD_SPLIT_SIGNATURE(ffi::Ffi::Bind()
                                                          .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                                          .Ctx<ffi::ScratchAllocator>()));
XLA_FFI_DEFINE_HANDLER_SYMBOL(jax_flashkda_decode_cuda, decode_impl,
                              KDA_DECODE_SIGNATURE(ffi::Ffi::Bind()
                                                       .Ctx<ffi::PlatformStream<cudaStream_t>>()),
                              {ffi::Traits::kCmdBufferCompatible});
