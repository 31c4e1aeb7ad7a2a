// The two custom calls on the Hopper target. Each handler decodes (the binding: buffers and the
// attributes as one struct), checks (docs/ffi_contract.md, then what the kernels support) and
// launches: enqueues the kernels of csrc/kda on XLA's stream, with XLA's scratch memory as
// workspace.
#include "ffi/kda_cuda_ffi.h"

#include <cstdint>
#include <cstdlib>
#include <optional>
#include <string>
#include <vector>

#include <cuda_runtime.h>

#include "ffi/contract.h"
#include "kda/kda_bwd.h"
#include "kda/kda_fwd.h"
#include "kda/offsets.h"

namespace ffi = xla::ffi;
namespace contract = jax_flashkda::contract;
using jax_flashkda::Attributes;
using jax_flashkda::DType;

namespace {

const std::string kFwd = "jax_flashkda_fwd (CUDA)";
const std::string kBwd = "jax_flashkda_bwd (CUDA)";

// What the CUDA target reads beyond the contract (after contract::check_inputs): q, k, v in
// bf16 or f16, sizes its 32-bit indices hold; then the launch parameters both calls share.
// Operand addresses are set by the staging (stage_inputs); cu_seqlens is replaced by its legal
// form before the kernels run (launch).
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

  // JAX_FLASHKDA_POISON_OUTPUTS=1 (the GPU tests set it) fills every result the kernels write
  // with NaN bytes first, so that an element they leave unwritten fails a test instead of
  // passing on whatever the allocator left there. Off by default: it costs a memset per result.
  cudaError_t poison_if_asked() const {
    const char* env = std::getenv("JAX_FLASHKDA_POISON_OUTPUTS");
    if (!env || env[0] != '1') return cudaSuccess;
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

ffi::Error fwd_impl(cudaStream_t stream, ffi::ScratchAllocator scratch, ffi::AnyBuffer q,
                    ffi::AnyBuffer k, ffi::AnyBuffer v, ffi::AnyBuffer g, ffi::AnyBuffer beta,
                    ffi::AnyBuffer A_log, ffi::AnyBuffer dt_bias, ffi::AnyBuffer initial_state,
                    ffi::AnyBuffer cu_seqlens, ffi::Result<ffi::AnyBuffer> o,
                    ffi::Result<ffi::AnyBuffer> final_state, Attributes attrs) {
  const contract::Inputs in{q, k, v, g, beta, A_log, dt_bias, initial_state, cu_seqlens};

  contract::Sizes s;
  kda::FwdParams p;
  KDA_RETURN_IF_ERROR(contract::check_inputs(kFwd, in, attrs, s));
  KDA_RETURN_IF_ERROR(cuda_params(kFwd, in, s, attrs, p));
  KDA_RETURN_IF_ERROR(contract::check_forward(kFwd, s, in, *o, *final_state));
  if (const char* why = kda::fwd_unsupported(p)) return unimplemented(kFwd, why);

  Staging staging(kFwd, scratch, stream);
  KDA_RETURN_IF_ERROR(stage_inputs(staging, in, p));
  KDA_RETURN_IF_ERROR(staging.output(*o, p.o));
  KDA_RETURN_IF_ERROR(staging.output(*final_state, p.final_state));
  return launch(kFwd, p, staging, scratch, stream, kda::fwd_workspace_bytes, kda::fwd);
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
  KDA_RETURN_IF_ERROR(staging.output(b.dq, p.dq));
  KDA_RETURN_IF_ERROR(staging.output(b.dk, p.dk));
  KDA_RETURN_IF_ERROR(staging.output(b.dv, p.dv));
  KDA_RETURN_IF_ERROR(staging.output(b.dg, p.dg));
  KDA_RETURN_IF_ERROR(staging.output(b.dbeta, p.dbeta));
  KDA_RETURN_IF_ERROR(staging.output(b.dA_log, p.dA_log));
  KDA_RETURN_IF_ERROR(staging.output(b.ddt_bias, p.ddt_bias));
  KDA_RETURN_IF_ERROR(staging.output(b.dinitial_state, p.dinitial_state));
  return launch(kBwd, p, staging, scratch, stream, kda::bwd_workspace_bytes, kda::bwd);
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
