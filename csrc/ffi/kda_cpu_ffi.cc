#include "ffi/kda_cpu_ffi.h"

#include <algorithm>
#include <cstdint>
#include <exception>
#include <initializer_list>
#include <new>
#include <optional>
#include <string>
#include <vector>

#include "cpu/kda_cpu.h"

namespace ffi = xla::ffi;
namespace kc = jax_flashkda::cpu;

namespace {

std::string shape_string(ffi::AnyBuffer::Dimensions dims) {
  std::string s = "[";
  for (size_t i = 0; i < dims.size(); ++i) s += (i ? "," : "") + std::to_string(dims[i]);
  return s + "]";
}

std::string shape_string(const std::vector<int64_t>& dims) {
  return shape_string(ffi::AnyBuffer::Dimensions(dims.data(), dims.size()));
}

ffi::Error invalid(std::string message) {
  return ffi::Error(ffi::ErrorCode::kInvalidArgument, "jax_flashkda (cpu): " + message);
}

std::optional<kc::DType> float_dtype(ffi::DataType t) {
  switch (t) {
    case ffi::DataType::F32: return kc::DType::kF32;
    case ffi::DataType::BF16: return kc::DType::kBF16;
    case ffi::DataType::F16: return kc::DType::kF16;
    default: return std::nullopt;
  }
}

ffi::Error check_rank(const ffi::AnyBuffer& b, const char* name, size_t rank) {
  if (b.dimensions().size() != rank)
    return invalid(std::string(name) + " must have rank " + std::to_string(rank) + ", got shape " +
                   shape_string(b.dimensions()));
  return ffi::Error::Success();
}

ffi::Error check_shape(const ffi::AnyBuffer& b, const char* name,
                       const std::vector<int64_t>& expected) {
  auto dims = b.dimensions();
  if (dims.size() != expected.size() || !std::equal(dims.begin(), dims.end(), expected.begin()))
    return invalid(std::string(name) + " must have shape " + shape_string(expected) + ", got " +
                   shape_string(dims));
  return ffi::Error::Success();
}

ffi::Error check_dtype(const ffi::AnyBuffer& b, const char* name, ffi::DataType expected,
                       const char* expected_name) {
  if (b.element_type() != expected)
    return invalid(std::string(name) + " must have dtype " + expected_name);
  return ffi::Error::Success();
}

ffi::Error float_tensor(const ffi::AnyBuffer& b, const char* name, kc::Tensor& out) {
  auto dt = float_dtype(b.element_type());
  if (!dt) return invalid(std::string(name) + " must be bf16, f16 or f32");
  out = {b.untyped_data(), *dt};
  return ffi::Error::Success();
}

#define KDA_RETURN_IF_ERROR(expr)            \
  do {                                       \
    ffi::Error kda_err_ = (expr);            \
    if (kda_err_.failure()) return kda_err_; \
  } while (0)

// Operands 0-8, shared by forward and backward.
struct Decoded {
  kc::KdaShape shape;
  kc::KdaParams params;
  kc::KdaInputs in;
  std::vector<int64_t> state_shape;
};

ffi::Error decode_inputs(ffi::AnyBuffer q, ffi::AnyBuffer k, ffi::AnyBuffer v, ffi::AnyBuffer g,
                         ffi::AnyBuffer beta, ffi::AnyBuffer A_log, ffi::AnyBuffer dt_bias,
                         ffi::AnyBuffer initial_state, ffi::AnyBuffer cu_seqlens, float scale,
                         bool use_qk_l2norm, bool use_beta_sigmoid, int32_t gate_mode,
                         float lower_bound, bool state_v_first, bool is_varlen, Decoded& d) {
  KDA_RETURN_IF_ERROR(check_rank(q, "q", 4));
  KDA_RETURN_IF_ERROR(check_rank(v, "v", 4));
  const auto qd = q.dimensions();
  const int64_t B = qd[0], T = qd[1], H = qd[2], K = qd[3], V = v.dimensions()[3];
  KDA_RETURN_IF_ERROR(check_shape(k, "k", {B, T, H, K}));
  KDA_RETURN_IF_ERROR(check_shape(v, "v", {B, T, H, V}));
  KDA_RETURN_IF_ERROR(check_shape(g, "g", {B, T, H, K}));
  KDA_RETURN_IF_ERROR(check_shape(beta, "beta", {B, T, H}));
  KDA_RETURN_IF_ERROR(check_shape(A_log, "A_log", {H}));
  KDA_RETURN_IF_ERROR(check_shape(dt_bias, "dt_bias", {H, K}));

  KDA_RETURN_IF_ERROR(float_tensor(q, "q", d.in.q));
  KDA_RETURN_IF_ERROR(float_tensor(k, "k", d.in.k));
  KDA_RETURN_IF_ERROR(float_tensor(v, "v", d.in.v));
  KDA_RETURN_IF_ERROR(float_tensor(g, "g", d.in.g));
  KDA_RETURN_IF_ERROR(float_tensor(beta, "beta", d.in.beta));
  if (k.element_type() != q.element_type()) return invalid("k must have the dtype of q");
  if (v.element_type() != q.element_type()) return invalid("v must have the dtype of q");
  KDA_RETURN_IF_ERROR(check_dtype(A_log, "A_log", ffi::DataType::F32, "f32"));
  KDA_RETURN_IF_ERROR(check_dtype(dt_bias, "dt_bias", ffi::DataType::F32, "f32"));
  KDA_RETURN_IF_ERROR(check_dtype(initial_state, "initial_state", ffi::DataType::F32, "f32"));
  KDA_RETURN_IF_ERROR(check_dtype(cu_seqlens, "cu_seqlens", ffi::DataType::S32, "s32"));
  KDA_RETURN_IF_ERROR(check_rank(cu_seqlens, "cu_seqlens", 1));

  if (gate_mode < 0 || gate_mode > 2)
    return invalid("gate_mode must be 0, 1 or 2, got " + std::to_string(gate_mode));
  int64_t N = B;
  if (is_varlen) {
    if (B != 1) return invalid("cu_seqlens needs batch size 1, got B=" + std::to_string(B));
    if (cu_seqlens.dimensions()[0] < 1) return invalid("cu_seqlens must have at least one entry");
    N = cu_seqlens.dimensions()[0] - 1;
  }
  d.state_shape = state_v_first ? std::vector<int64_t>{N, H, V, K} : std::vector<int64_t>{N, H, K, V};
  KDA_RETURN_IF_ERROR(check_shape(initial_state, "initial_state", d.state_shape));

  d.shape = {B, T, H, K, V, N};
  d.params = {scale, use_qk_l2norm, use_beta_sigmoid, gate_mode, lower_bound, state_v_first,
              is_varlen};
  d.in.A_log = static_cast<const float*>(A_log.untyped_data());
  d.in.dt_bias = static_cast<const float*>(dt_bias.untyped_data());
  d.in.initial_state = static_cast<const float*>(initial_state.untyped_data());
  d.in.cu_seqlens = static_cast<const int32_t*>(cu_seqlens.untyped_data());
  if (is_varlen) {
    std::string msg = kc::check_cu_seqlens(d.shape, d.in.cu_seqlens);
    if (!msg.empty()) return invalid(msg);
  }
  return ffi::Error::Success();
}

// A result must have the shape and dtype the caller declared for it in the contract.
ffi::Error result_tensor(const ffi::AnyBuffer& r, const char* name,
                         const std::vector<int64_t>& shape, ffi::DataType dtype,
                         kc::Tensor& out) {
  KDA_RETURN_IF_ERROR(check_shape(r, name, shape));
  if (r.element_type() != dtype)
    return invalid(std::string(name) + " must have the dtype of its input");
  return float_tensor(r, name, out);
}

ffi::Error f32_result(const ffi::AnyBuffer& r, const char* name, const std::vector<int64_t>& shape,
                      float*& out) {
  KDA_RETURN_IF_ERROR(check_shape(r, name, shape));
  KDA_RETURN_IF_ERROR(check_dtype(r, name, ffi::DataType::F32, "f32"));
  out = static_cast<float*>(r.untyped_data());
  return ffi::Error::Success();
}

// The kernels allocate scratch and start threads; neither failure may abort the process.
template <typename Fn>
ffi::Error guarded(Fn&& fn) {
  try {
    fn();
  } catch (const std::bad_alloc&) {
    return ffi::Error(ffi::ErrorCode::kResourceExhausted, "jax_flashkda (cpu): out of memory");
  } catch (const std::exception& e) {
    return ffi::Error(ffi::ErrorCode::kInternal, std::string("jax_flashkda (cpu): ") + e.what());
  }
  return ffi::Error::Success();
}

ffi::Error KdaFwd(ffi::AnyBuffer q, ffi::AnyBuffer k, ffi::AnyBuffer v, ffi::AnyBuffer g,
                  ffi::AnyBuffer beta, ffi::AnyBuffer A_log, ffi::AnyBuffer dt_bias,
                  ffi::AnyBuffer initial_state, ffi::AnyBuffer cu_seqlens,
                  ffi::Result<ffi::AnyBuffer> o, ffi::Result<ffi::AnyBuffer> final_state,
                  float scale, bool use_qk_l2norm, bool use_beta_sigmoid, int32_t gate_mode,
                  float lower_bound, bool state_v_first, bool is_varlen) {
  Decoded d;
  KDA_RETURN_IF_ERROR(decode_inputs(q, k, v, g, beta, A_log, dt_bias, initial_state, cu_seqlens,
                                    scale, use_qk_l2norm, use_beta_sigmoid, gate_mode,
                                    lower_bound, state_v_first, is_varlen, d));
  const auto& s = d.shape;
  kc::KdaFwdOutputs out;
  KDA_RETURN_IF_ERROR(result_tensor(*o, "o", {s.B, s.T, s.H, s.V}, v.element_type(), out.o));
  KDA_RETURN_IF_ERROR(f32_result(*final_state, "final_state", d.state_shape, out.final_state));
  return guarded([&] { kc::kda_forward(d.shape, d.params, d.in, out); });
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
  KDA_RETURN_IF_ERROR(decode_inputs(q, k, v, g, beta, A_log, dt_bias, initial_state, cu_seqlens,
                                    scale, use_qk_l2norm, use_beta_sigmoid, gate_mode,
                                    lower_bound, state_v_first, is_varlen, d));
  const auto& s = d.shape;
  KDA_RETURN_IF_ERROR(check_shape(do_, "do", {s.B, s.T, s.H, s.V}));
  if (do_.element_type() != v.element_type()) return invalid("do must have the dtype of v");
  kc::Tensor do_t;
  KDA_RETURN_IF_ERROR(float_tensor(do_, "do", do_t));
  KDA_RETURN_IF_ERROR(check_shape(dfinal_state, "dfinal_state", d.state_shape));
  KDA_RETURN_IF_ERROR(check_dtype(dfinal_state, "dfinal_state", ffi::DataType::F32, "f32"));

  kc::KdaBwdOutputs out;
  KDA_RETURN_IF_ERROR(result_tensor(*dq, "dq", {s.B, s.T, s.H, s.K}, q.element_type(), out.dq));
  KDA_RETURN_IF_ERROR(result_tensor(*dk, "dk", {s.B, s.T, s.H, s.K}, k.element_type(), out.dk));
  KDA_RETURN_IF_ERROR(result_tensor(*dv, "dv", {s.B, s.T, s.H, s.V}, v.element_type(), out.dv));
  KDA_RETURN_IF_ERROR(result_tensor(*dg, "dg", {s.B, s.T, s.H, s.K}, g.element_type(), out.dg));
  KDA_RETURN_IF_ERROR(
      result_tensor(*dbeta, "dbeta", {s.B, s.T, s.H}, beta.element_type(), out.dbeta));
  KDA_RETURN_IF_ERROR(f32_result(*dA_log, "dA_log", {s.B, s.H}, out.dA_log));
  KDA_RETURN_IF_ERROR(f32_result(*ddt_bias, "ddt_bias", {s.B, s.H, s.K}, out.ddt_bias));
  KDA_RETURN_IF_ERROR(
      f32_result(*dinitial_state, "dinitial_state", d.state_shape, out.dinitial_state));
  const float* dfinal = static_cast<const float*>(dfinal_state.untyped_data());
  return guarded([&] { kc::kda_backward(d.shape, d.params, d.in, do_t, dfinal, out); });
}

#define KDA_ATTRS(binding)                  \
  binding.Attr<float>("scale")              \
      .Attr<bool>("use_qk_l2norm")          \
      .Attr<bool>("use_beta_sigmoid")       \
      .Attr<int32_t>("gate_mode")           \
      .Attr<float>("lower_bound")           \
      .Attr<bool>("state_v_first")          \
      .Attr<bool>("is_varlen")

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(jax_flashkda_fwd_cpu, KdaFwd,
                              KDA_ATTRS(ffi::Ffi::Bind()
                                            .Arg<ffi::AnyBuffer>()  // q
                                            .Arg<ffi::AnyBuffer>()  // k
                                            .Arg<ffi::AnyBuffer>()  // v
                                            .Arg<ffi::AnyBuffer>()  // g
                                            .Arg<ffi::AnyBuffer>()  // beta
                                            .Arg<ffi::AnyBuffer>()  // A_log
                                            .Arg<ffi::AnyBuffer>()  // dt_bias
                                            .Arg<ffi::AnyBuffer>()  // initial_state
                                            .Arg<ffi::AnyBuffer>()  // cu_seqlens
                                            .Ret<ffi::AnyBuffer>()  // o
                                            .Ret<ffi::AnyBuffer>()  // final_state
                                        ));

XLA_FFI_DEFINE_HANDLER_SYMBOL(jax_flashkda_bwd_cpu, KdaBwd,
                              KDA_ATTRS(ffi::Ffi::Bind()
                                            .Arg<ffi::AnyBuffer>()  // q
                                            .Arg<ffi::AnyBuffer>()  // k
                                            .Arg<ffi::AnyBuffer>()  // v
                                            .Arg<ffi::AnyBuffer>()  // g
                                            .Arg<ffi::AnyBuffer>()  // beta
                                            .Arg<ffi::AnyBuffer>()  // A_log
                                            .Arg<ffi::AnyBuffer>()  // dt_bias
                                            .Arg<ffi::AnyBuffer>()  // initial_state
                                            .Arg<ffi::AnyBuffer>()  // cu_seqlens
                                            .Arg<ffi::AnyBuffer>()  // do
                                            .Arg<ffi::AnyBuffer>()  // dfinal_state
                                            .Ret<ffi::AnyBuffer>()  // dq
                                            .Ret<ffi::AnyBuffer>()  // dk
                                            .Ret<ffi::AnyBuffer>()  // dv
                                            .Ret<ffi::AnyBuffer>()  // dg
                                            .Ret<ffi::AnyBuffer>()  // dbeta
                                            .Ret<ffi::AnyBuffer>()  // dA_log
                                            .Ret<ffi::AnyBuffer>()  // ddt_bias
                                            .Ret<ffi::AnyBuffer>()  // dinitial_state
                                        ));
