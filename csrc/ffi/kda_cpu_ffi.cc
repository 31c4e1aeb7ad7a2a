// Decodes the two custom calls for the CPU target, checks them against docs/ffi_contract.md
// and runs the C++ recurrence of csrc/cpu.
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

namespace {

const std::string kFwd = "jax_flashkda_fwd (cpu)";
const std::string kBwd = "jax_flashkda_bwd (cpu)";

// The CPU target reads and writes any of the three float dtypes.
ffi::Error float_tensor(const std::string& who, const ffi::AnyBuffer& b, const char* name,
                        kc::Tensor& out) {
  std::optional<kc::DType> dtype;
  switch (b.element_type()) {
    case ffi::DataType::F32: dtype = kc::DType::kF32; break;
    case ffi::DataType::BF16: dtype = kc::DType::kBF16; break;
    case ffi::DataType::F16: dtype = kc::DType::kF16; break;
    default: return contract::invalid(who, std::string(name) + " must be bf16, f16 or f32");
  }
  out = {b.untyped_data(), *dtype};
  return ffi::Error::Success();
}

struct Decoded {
  contract::Sizes sizes;
  kc::KdaShape shape;
  kc::KdaParams params;
  kc::KdaInputs in;
};

ffi::Error decode_inputs(const std::string& who, ffi::AnyBuffer q, ffi::AnyBuffer k,
                         ffi::AnyBuffer v, ffi::AnyBuffer g, ffi::AnyBuffer beta,
                         ffi::AnyBuffer A_log, ffi::AnyBuffer dt_bias,
                         ffi::AnyBuffer initial_state, ffi::AnyBuffer cu_seqlens, float scale,
                         bool use_qk_l2norm, bool use_beta_sigmoid, int32_t gate_mode,
                         float lower_bound, bool state_v_first, bool is_varlen, Decoded& d) {
  KDA_RETURN_IF_ERROR(contract::check_inputs(who, q, k, v, g, beta, A_log, dt_bias,
                                             initial_state, cu_seqlens, gate_mode, lower_bound,
                                             state_v_first, is_varlen, d.sizes));
  KDA_RETURN_IF_ERROR(float_tensor(who, q, "q", d.in.q));
  KDA_RETURN_IF_ERROR(float_tensor(who, k, "k", d.in.k));
  KDA_RETURN_IF_ERROR(float_tensor(who, v, "v", d.in.v));
  KDA_RETURN_IF_ERROR(float_tensor(who, g, "g", d.in.g));
  KDA_RETURN_IF_ERROR(float_tensor(who, beta, "beta", d.in.beta));
  const auto& s = d.sizes;
  d.shape = {s.B, s.T, s.H, s.K, s.V, s.N};
  d.params = {scale, use_qk_l2norm, use_beta_sigmoid, gate_mode, lower_bound, state_v_first,
              is_varlen};
  d.in.A_log = static_cast<const float*>(A_log.untyped_data());
  d.in.dt_bias = static_cast<const float*>(dt_bias.untyped_data());
  d.in.initial_state = static_cast<const float*>(initial_state.untyped_data());
  // Any offset values are legal: the kernels apply docs/robustness.md §1 to a copy.
  d.in.cu_seqlens = static_cast<const int32_t*>(cu_seqlens.untyped_data());
  return ffi::Error::Success();
}

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

float* f32_data(ffi::AnyBuffer& b) { return static_cast<float*>(b.untyped_data()); }

ffi::Error KdaFwd(ffi::AnyBuffer q, ffi::AnyBuffer k, ffi::AnyBuffer v, ffi::AnyBuffer g,
                  ffi::AnyBuffer beta, ffi::AnyBuffer A_log, ffi::AnyBuffer dt_bias,
                  ffi::AnyBuffer initial_state, ffi::AnyBuffer cu_seqlens,
                  ffi::Result<ffi::AnyBuffer> o, ffi::Result<ffi::AnyBuffer> final_state,
                  float scale, bool use_qk_l2norm, bool use_beta_sigmoid, int32_t gate_mode,
                  float lower_bound, bool state_v_first, bool is_varlen) {
  Decoded d;
  KDA_RETURN_IF_ERROR(decode_inputs(kFwd, q, k, v, g, beta, A_log, dt_bias, initial_state,
                                    cu_seqlens, scale, use_qk_l2norm, use_beta_sigmoid,
                                    gate_mode, lower_bound, state_v_first, is_varlen, d));
  const auto& s = d.sizes;
  KDA_RETURN_IF_ERROR(contract::check_like(kFwd, *o, "o", {s.B, s.T, s.H, s.V}, v, "v"));
  KDA_RETURN_IF_ERROR(contract::check_f32(kFwd, *final_state, "final_state", s.state));
  kc::KdaFwdOutputs out;
  KDA_RETURN_IF_ERROR(float_tensor(kFwd, *o, "o", out.o));
  out.final_state = f32_data(*final_state);
  return guarded(kFwd, [&] { kc::kda_forward(d.shape, d.params, d.in, out); });
}

ffi::Error KdaBwd(ffi::AnyBuffer q, ffi::AnyBuffer k, ffi::AnyBuffer v, ffi::AnyBuffer g,
                  ffi::AnyBuffer beta, ffi::AnyBuffer A_log, ffi::AnyBuffer dt_bias,
                  ffi::AnyBuffer initial_state, ffi::AnyBuffer cu_seqlens, ffi::AnyBuffer do_,
                  ffi::AnyBuffer dfinal_state, ffi::Result<ffi::AnyBuffer> dq,
                  ffi::Result<ffi::AnyBuffer> dk, ffi::Result<ffi::AnyBuffer> dv,
                  ffi::Result<ffi::AnyBuffer> dg, ffi::Result<ffi::AnyBuffer> dbeta,
                  ffi::Result<ffi::AnyBuffer> dA_log, ffi::Result<ffi::AnyBuffer> ddt_bias,
                  ffi::Result<ffi::AnyBuffer> dinitial_state, float scale, bool use_qk_l2norm,
                  bool use_beta_sigmoid, int32_t gate_mode, float lower_bound, bool state_v_first,
                  bool is_varlen) {
  Decoded d;
  KDA_RETURN_IF_ERROR(decode_inputs(kBwd, q, k, v, g, beta, A_log, dt_bias, initial_state,
                                    cu_seqlens, scale, use_qk_l2norm, use_beta_sigmoid,
                                    gate_mode, lower_bound, state_v_first, is_varlen, d));
  KDA_RETURN_IF_ERROR(contract::check_backward(kBwd, d.sizes, q, k, v, g, beta, do_,
                                               dfinal_state, *dq, *dk, *dv, *dg, *dbeta,
                                               *dA_log, *ddt_bias, *dinitial_state));
  kc::Tensor do_t;
  kc::KdaBwdOutputs out;
  KDA_RETURN_IF_ERROR(float_tensor(kBwd, do_, "do", do_t));
  KDA_RETURN_IF_ERROR(float_tensor(kBwd, *dq, "dq", out.dq));
  KDA_RETURN_IF_ERROR(float_tensor(kBwd, *dk, "dk", out.dk));
  KDA_RETURN_IF_ERROR(float_tensor(kBwd, *dv, "dv", out.dv));
  KDA_RETURN_IF_ERROR(float_tensor(kBwd, *dg, "dg", out.dg));
  KDA_RETURN_IF_ERROR(float_tensor(kBwd, *dbeta, "dbeta", out.dbeta));
  out.dA_log = f32_data(*dA_log);
  out.ddt_bias = f32_data(*ddt_bias);
  out.dinitial_state = f32_data(*dinitial_state);
  const float* dfinal = static_cast<const float*>(dfinal_state.untyped_data());
  return guarded(kBwd, [&] { kc::kda_backward(d.shape, d.params, d.in, do_t, dfinal, out); });
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(jax_flashkda_fwd_cpu, KdaFwd, KDA_FWD_SIGNATURE(ffi::Ffi::Bind()));
XLA_FFI_DEFINE_HANDLER_SYMBOL(jax_flashkda_bwd_cpu, KdaBwd, KDA_BWD_SIGNATURE(ffi::Ffi::Bind()));
