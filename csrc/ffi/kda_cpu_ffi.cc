// The two custom calls on the CPU target. Each handler decodes (the binding: buffers and the
// attributes as one struct), checks (docs/ffi_contract.md, then what the C++ target reads) and
// runs the C++ recurrence of csrc/cpu.
#include "ffi/kda_cpu_ffi.h"

#include <cstdint>
#include <exception>
#include <new>
#include <optional>
#include <string>

#include "cpu/kda_cpu.h"
#include "ffi/contract.h"

namespace ffi = xla::ffi;
namespace kc = jax_flashkda::cpu;
namespace contract = jax_flashkda::contract;
using jax_flashkda::Attributes;
using jax_flashkda::DType;

namespace {

const std::string kFwd = "jax_flashkda_fwd (cpu)";
const std::string kBwd = "jax_flashkda_bwd (cpu)";

// The CPU target reads and writes any of the three float dtypes.
ffi::Error float_tensor(const std::string& who, const ffi::AnyBuffer& b, const char* name,
                        kc::Tensor& out) {
  const std::optional<DType> dtype = contract::float_dtype(b.element_type());
  if (!dtype) return contract::invalid(who, std::string(name) + " must be bf16, f16 or f32");
  out = {b.untyped_data(), *dtype};
  return ffi::Error::Success();
}

// Operands 0-8 as the C++ target takes them (after contract::check_inputs).
ffi::Error cpu_inputs(const std::string& who, const contract::Inputs& in, kc::KdaInputs& out) {
  KDA_RETURN_IF_ERROR(float_tensor(who, in.q, "q", out.q));
  KDA_RETURN_IF_ERROR(float_tensor(who, in.k, "k", out.k));
  KDA_RETURN_IF_ERROR(float_tensor(who, in.v, "v", out.v));
  KDA_RETURN_IF_ERROR(float_tensor(who, in.g, "g", out.g));
  KDA_RETURN_IF_ERROR(float_tensor(who, in.beta, "beta", out.beta));
  out.A_log = static_cast<const float*>(in.A_log.untyped_data());
  out.dt_bias = static_cast<const float*>(in.dt_bias.untyped_data());
  out.initial_state = static_cast<const float*>(in.initial_state.untyped_data());
  // Any offset values are legal: the kernels apply docs/robustness.md §1 to a copy.
  out.cu_seqlens = static_cast<const int32_t*>(in.cu_seqlens.untyped_data());
  return ffi::Error::Success();
}

kc::KdaShape shape_of(const contract::Sizes& s) { return {s.B, s.T, s.H, s.K, s.V, s.N}; }

// The kernels allocate scratch and start threads; neither failure may abort the process.
template <typename Fn>
ffi::Error guarded(const std::string& who, Fn&& fn) {
  try {
    fn();
  } catch (const std::bad_alloc&) {
    return ffi::Error(ffi::ErrorCode::kResourceExhausted, who + ": out of memory");
  } catch (const std::exception& e) {
    return ffi::Error(ffi::ErrorCode::kInternal, who + ": " + e.what());
  }
  return ffi::Error::Success();
}

float* f32_data(const ffi::AnyBuffer& b) { return static_cast<float*>(b.untyped_data()); }

ffi::Error KdaFwd(ffi::AnyBuffer q, ffi::AnyBuffer k, ffi::AnyBuffer v, ffi::AnyBuffer g,
                  ffi::AnyBuffer beta, ffi::AnyBuffer A_log, ffi::AnyBuffer dt_bias,
                  ffi::AnyBuffer initial_state, ffi::AnyBuffer cu_seqlens,
                  ffi::Result<ffi::AnyBuffer> o, ffi::Result<ffi::AnyBuffer> final_state,
                  Attributes attrs) {
  const contract::Inputs in{q, k, v, g, beta, A_log, dt_bias, initial_state, cu_seqlens};

  contract::Sizes s;
  KDA_RETURN_IF_ERROR(contract::check_inputs(kFwd, in, attrs, s));
  kc::KdaInputs kin;
  KDA_RETURN_IF_ERROR(cpu_inputs(kFwd, in, kin));
  KDA_RETURN_IF_ERROR(contract::check_forward(kFwd, s, in, *o, *final_state));
  kc::KdaFwdOutputs out;
  KDA_RETURN_IF_ERROR(float_tensor(kFwd, *o, "o", out.o));
  out.final_state = f32_data(*final_state);

  return guarded(kFwd, [&] { kc::kda_forward(shape_of(s), attrs, kin, out); });
}

ffi::Error KdaBwd(ffi::AnyBuffer q, ffi::AnyBuffer k, ffi::AnyBuffer v, ffi::AnyBuffer g,
                  ffi::AnyBuffer beta, ffi::AnyBuffer A_log, ffi::AnyBuffer dt_bias,
                  ffi::AnyBuffer initial_state, ffi::AnyBuffer cu_seqlens, ffi::AnyBuffer do_,
                  ffi::AnyBuffer dfinal_state, ffi::Result<ffi::AnyBuffer> dq,
                  ffi::Result<ffi::AnyBuffer> dk, ffi::Result<ffi::AnyBuffer> dv,
                  ffi::Result<ffi::AnyBuffer> dg, ffi::Result<ffi::AnyBuffer> dbeta,
                  ffi::Result<ffi::AnyBuffer> dA_log, ffi::Result<ffi::AnyBuffer> ddt_bias,
                  ffi::Result<ffi::AnyBuffer> dinitial_state, Attributes attrs) {
  const contract::Inputs in{q, k, v, g, beta, A_log, dt_bias, initial_state, cu_seqlens};
  const contract::BwdBuffers b{do_, dfinal_state, *dq, *dk, *dv, *dg, *dbeta, *dA_log,
                               *ddt_bias, *dinitial_state};

  contract::Sizes s;
  KDA_RETURN_IF_ERROR(contract::check_inputs(kBwd, in, attrs, s));
  kc::KdaInputs kin;
  KDA_RETURN_IF_ERROR(cpu_inputs(kBwd, in, kin));
  KDA_RETURN_IF_ERROR(contract::check_backward(kBwd, s, in, b));
  kc::Tensor do_t;
  kc::KdaBwdOutputs out;
  KDA_RETURN_IF_ERROR(float_tensor(kBwd, b.dout, "do", do_t));
  KDA_RETURN_IF_ERROR(float_tensor(kBwd, b.dq, "dq", out.dq));
  KDA_RETURN_IF_ERROR(float_tensor(kBwd, b.dk, "dk", out.dk));
  KDA_RETURN_IF_ERROR(float_tensor(kBwd, b.dv, "dv", out.dv));
  KDA_RETURN_IF_ERROR(float_tensor(kBwd, b.dg, "dg", out.dg));
  KDA_RETURN_IF_ERROR(float_tensor(kBwd, b.dbeta, "dbeta", out.dbeta));
  out.dA_log = f32_data(b.dA_log);
  out.ddt_bias = f32_data(b.ddt_bias);
  out.dinitial_state = f32_data(b.dinitial_state);
  const float* dfinal = f32_data(b.dfinal_state);

  return guarded(kBwd, [&] { kc::kda_backward(shape_of(s), attrs, kin, do_t, dfinal, out); });
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(jax_flashkda_fwd_cpu, KdaFwd, KDA_FWD_SIGNATURE(ffi::Ffi::Bind()));
XLA_FFI_DEFINE_HANDLER_SYMBOL(jax_flashkda_bwd_cpu, KdaBwd, KDA_BWD_SIGNATURE(ffi::Ffi::Bind()));
