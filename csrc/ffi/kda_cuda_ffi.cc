// Decodes the two custom calls for the Hopper target, checks them against docs/ffi_contract.md
// and enqueues the kernels of csrc/kda on XLA's stream, with XLA's scratch memory as workspace.
#include "ffi/kda_cuda_ffi.h"

#include <cstdint>
#include <cstdlib>
#include <initializer_list>
#include <optional>
#include <string>

#include <cuda_runtime.h>

#include "ffi/contract.h"
#include "kda/kda_bwd.h"
#include "kda/kda_fwd.h"

namespace ffi = xla::ffi;
namespace contract = jax_flashkda::contract;

namespace {

const std::string kFwd = "jax_flashkda_fwd (CUDA)";
const std::string kBwd = "jax_flashkda_bwd (CUDA)";

std::optional<kda::DType> to_dtype(ffi::DataType t) {
  switch (t) {
    case ffi::DataType::BF16: return kda::DType::kBF16;
    case ffi::DataType::F16: return kda::DType::kF16;
    case ffi::DataType::F32: return kda::DType::kF32;
    default: return std::nullopt;
  }
}

// Operands 0-8 and the attributes into the launch parameters both calls share.
ffi::Error decode_inputs(const std::string& who, ffi::AnyBuffer q, ffi::AnyBuffer k,
                         ffi::AnyBuffer v, ffi::AnyBuffer g, ffi::AnyBuffer beta,
                         ffi::AnyBuffer A_log, ffi::AnyBuffer dt_bias,
                         ffi::AnyBuffer initial_state, ffi::AnyBuffer cu_seqlens, float scale,
                         bool use_qk_l2norm, bool use_beta_sigmoid, int32_t gate_mode,
                         float lower_bound, bool state_v_first, bool is_varlen,
                         contract::Sizes& s, kda::FwdParams& p) {
  KDA_RETURN_IF_ERROR(contract::check_inputs(who, q, k, v, g, beta, A_log, dt_bias,
                                             initial_state, cu_seqlens, gate_mode, lower_bound,
                                             state_v_first, is_varlen, s));
  const auto qkv_t = to_dtype(q.element_type());
  if (!qkv_t || *qkv_t == kda::DType::kF32)
    return contract::invalid(who, "q must be bfloat16 or float16 on the CUDA target");
  const auto g_t = to_dtype(g.element_type());
  if (!g_t) return contract::invalid(who, "g must be bfloat16, float16 or float32");
  const auto beta_t = to_dtype(beta.element_type());
  if (!beta_t) return contract::invalid(who, "beta must be bfloat16, float16 or float32");
  // The kernels index tokens·heads·4 and sequences in 32-bit integers.
  if (s.B * s.T * s.H > (int64_t{1} << 31) / 4 || s.N > (int64_t{1} << 30))
    return contract::invalid(who, "q is too large for the CUDA target");

  p.q = q.untyped_data();
  p.k = k.untyped_data();
  p.v = v.untyped_data();
  p.g = g.untyped_data();
  p.beta = beta.untyped_data();
  p.A_log = static_cast<const float*>(A_log.untyped_data());
  p.dt_bias = static_cast<const float*>(dt_bias.untyped_data());
  p.initial_state = static_cast<const float*>(initial_state.untyped_data());
  p.cu_seqlens = static_cast<const int32_t*>(cu_seqlens.untyped_data());
  p.qkv_dtype = *qkv_t;
  p.g_dtype = *g_t;
  p.beta_dtype = *beta_t;
  p.B = static_cast<int>(s.B);
  p.T = static_cast<int>(s.T);
  p.H = static_cast<int>(s.H);
  p.K = static_cast<int>(s.K);
  p.V = static_cast<int>(s.V);
  p.N = static_cast<int>(s.N);
  p.scale = scale;
  p.lower_bound = lower_bound;
  p.gate_mode = gate_mode;
  p.use_qk_l2norm = use_qk_l2norm;
  p.use_beta_sigmoid = use_beta_sigmoid;
  p.state_v_first = state_v_first;
  p.is_varlen = is_varlen;
  return ffi::Error::Success();
}

// JAX_FLASHKDA_POISON_OUTPUTS=1 (the GPU tests set it) fills every result with NaN bytes before
// the kernels run, so that an element they leave unwritten fails a test instead of passing on
// whatever the allocator left there. Off by default: it costs a memset per result.
cudaError_t poison_if_asked(cudaStream_t stream, std::initializer_list<ffi::AnyBuffer*> results) {
  const char* env = std::getenv("JAX_FLASHKDA_POISON_OUTPUTS");
  if (!env || env[0] != '1') return cudaSuccess;
  for (ffi::AnyBuffer* r : results)
    if (r->size_bytes() > 0)
      if (const cudaError_t err = cudaMemsetAsync(r->untyped_data(), 0xFF, r->size_bytes(), stream);
          err != cudaSuccess)
        return err;
  return cudaSuccess;
}

ffi::Error cuda_error(const std::string& who, cudaError_t err) {
  return ffi::Error::Internal(who + ": " + cudaGetErrorName(err) + ": " + cudaGetErrorString(err));
}

// Shared tail of both calls: the kernels' own refusals, the workspace, poisoning the results
// when asked, the launch.
template <typename Params, typename Unsupported, typename WorkspaceBytes, typename Launch>
ffi::Error launch(const std::string& who, const Params& p, ffi::ScratchAllocator& scratch,
                  cudaStream_t stream, std::initializer_list<ffi::AnyBuffer*> results,
                  Unsupported unsupported, WorkspaceBytes workspace_bytes, Launch run) {
  if (const char* why = unsupported(p))
    return ffi::Error(ffi::ErrorCode::kUnimplemented, who + ": " + why);
  if (const cudaError_t err = poison_if_asked(stream, results); err != cudaSuccess)
    return cuda_error(who, err);
  void* workspace = nullptr;
  if (const size_t bytes = workspace_bytes(p); bytes > 0) {
    // XLA accepts alignments up to 16 bytes, which is what the kernels' 16-byte copies need.
    std::optional<void*> got = scratch.Allocate(bytes, 16);
    if (!got)
      return ffi::Error(ffi::ErrorCode::kResourceExhausted,
                        who + ": could not allocate " + std::to_string(bytes) +
                            " bytes of workspace");
    workspace = *got;
  }
  if (const cudaError_t err = run(p, workspace, stream); err != cudaSuccess)
    return cuda_error(who, err);
  return ffi::Error::Success();
}

ffi::Error fwd_impl(cudaStream_t stream, ffi::ScratchAllocator scratch, ffi::AnyBuffer q,
                    ffi::AnyBuffer k, ffi::AnyBuffer v, ffi::AnyBuffer g, ffi::AnyBuffer beta,
                    ffi::AnyBuffer A_log, ffi::AnyBuffer dt_bias, ffi::AnyBuffer initial_state,
                    ffi::AnyBuffer cu_seqlens, ffi::Result<ffi::AnyBuffer> o,
                    ffi::Result<ffi::AnyBuffer> final_state, float scale, bool use_qk_l2norm,
                    bool use_beta_sigmoid, int32_t gate_mode, float lower_bound,
                    bool state_v_first, bool is_varlen) {
  contract::Sizes s;
  kda::FwdParams p;
  KDA_RETURN_IF_ERROR(decode_inputs(kFwd, q, k, v, g, beta, A_log, dt_bias, initial_state,
                                    cu_seqlens, scale, use_qk_l2norm, use_beta_sigmoid,
                                    gate_mode, lower_bound, state_v_first, is_varlen, s, p));
  KDA_RETURN_IF_ERROR(contract::check_like(kFwd, *o, "o", {s.B, s.T, s.H, s.V}, v, "v"));
  KDA_RETURN_IF_ERROR(contract::check_f32(kFwd, *final_state, "final_state", s.state));
  p.o = o->untyped_data();
  p.final_state = static_cast<float*>(final_state->untyped_data());
  return launch(kFwd, p, scratch, stream, {&*o, &*final_state}, kda::fwd_unsupported,
                kda::fwd_workspace_bytes, kda::fwd);
}

ffi::Error bwd_impl(cudaStream_t stream, ffi::ScratchAllocator scratch, ffi::AnyBuffer q,
                    ffi::AnyBuffer k, ffi::AnyBuffer v, ffi::AnyBuffer g, ffi::AnyBuffer beta,
                    ffi::AnyBuffer A_log, ffi::AnyBuffer dt_bias, ffi::AnyBuffer initial_state,
                    ffi::AnyBuffer cu_seqlens, ffi::AnyBuffer dout, ffi::AnyBuffer dfinal_state,
                    ffi::Result<ffi::AnyBuffer> dq, ffi::Result<ffi::AnyBuffer> dk,
                    ffi::Result<ffi::AnyBuffer> dv, ffi::Result<ffi::AnyBuffer> dg,
                    ffi::Result<ffi::AnyBuffer> dbeta, ffi::Result<ffi::AnyBuffer> dA_log,
                    ffi::Result<ffi::AnyBuffer> ddt_bias,
                    ffi::Result<ffi::AnyBuffer> dinitial_state, float scale, bool use_qk_l2norm,
                    bool use_beta_sigmoid, int32_t gate_mode, float lower_bound,
                    bool state_v_first, bool is_varlen) {
  contract::Sizes s;
  kda::BwdParams p;
  KDA_RETURN_IF_ERROR(decode_inputs(kBwd, q, k, v, g, beta, A_log, dt_bias, initial_state,
                                    cu_seqlens, scale, use_qk_l2norm, use_beta_sigmoid,
                                    gate_mode, lower_bound, state_v_first, is_varlen, s, p));
  KDA_RETURN_IF_ERROR(contract::check_backward(kBwd, s, q, k, v, g, beta, dout, dfinal_state,
                                               *dq, *dk, *dv, *dg, *dbeta, *dA_log, *ddt_bias,
                                               *dinitial_state));
  p.dout = dout.untyped_data();
  p.dfinal_state = static_cast<const float*>(dfinal_state.untyped_data());
  p.dq = dq->untyped_data();
  p.dk = dk->untyped_data();
  p.dv = dv->untyped_data();
  p.dg = dg->untyped_data();
  p.dbeta = dbeta->untyped_data();
  p.dA_log = static_cast<float*>(dA_log->untyped_data());
  p.ddt_bias = static_cast<float*>(ddt_bias->untyped_data());
  p.dinitial_state = static_cast<float*>(dinitial_state->untyped_data());
  return launch(kBwd, p, scratch, stream,
                {&*dq, &*dk, &*dv, &*dg, &*dbeta, &*dA_log, &*ddt_bias, &*dinitial_state},
                kda::bwd_unsupported, kda::bwd_workspace_bytes, kda::bwd);
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(jax_flashkda_fwd_cuda, fwd_impl,
                              KDA_FWD_SIGNATURE(ffi::Ffi::Bind()
                                                    .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                                    .Ctx<ffi::ScratchAllocator>()));
XLA_FFI_DEFINE_HANDLER_SYMBOL(jax_flashkda_bwd_cuda, bwd_impl,
                              KDA_BWD_SIGNATURE(ffi::Ffi::Bind()
                                                    .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                                    .Ctx<ffi::ScratchAllocator>()));
