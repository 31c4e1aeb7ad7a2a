// The checks and FFI signatures that docs/ffi_contract.md imposes on every handler, whatever
// the target: operand shapes, the fixed-dtype operands, the attributes. What a target accepts
// beyond that (which float dtypes, which sizes) stays in its own handler.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "xla/ffi/api/ffi.h"

#define KDA_RETURN_IF_ERROR(expr)            \
  do {                                       \
    ::xla::ffi::Error kda_err_ = (expr);     \
    if (kda_err_.failure()) return kda_err_; \
  } while (0)

// Arguments, results and attributes of the two calls, appended to a binding that may already
// hold the target's contexts (the CUDA stream and scratch allocator).
#define KDA_CONTRACT_INPUTS(binding)                                                   \
  binding.Arg<::xla::ffi::AnyBuffer>() /* q */                                         \
      .Arg<::xla::ffi::AnyBuffer>()    /* k */                                         \
      .Arg<::xla::ffi::AnyBuffer>()    /* v */                                         \
      .Arg<::xla::ffi::AnyBuffer>()    /* g */                                         \
      .Arg<::xla::ffi::AnyBuffer>()    /* beta */                                      \
      .Arg<::xla::ffi::AnyBuffer>()    /* A_log */                                     \
      .Arg<::xla::ffi::AnyBuffer>()    /* dt_bias */                                   \
      .Arg<::xla::ffi::AnyBuffer>()    /* initial_state */                             \
      .Arg<::xla::ffi::AnyBuffer>()    /* cu_seqlens */

#define KDA_CONTRACT_ATTRIBUTES(binding) \
  binding.Attr<float>("scale")           \
      .Attr<bool>("use_qk_l2norm")       \
      .Attr<bool>("use_beta_sigmoid")    \
      .Attr<int32_t>("gate_mode")        \
      .Attr<float>("lower_bound")        \
      .Attr<bool>("state_v_first")       \
      .Attr<bool>("is_varlen")

#define KDA_FWD_SIGNATURE(binding)                                           \
  KDA_CONTRACT_ATTRIBUTES(KDA_CONTRACT_INPUTS(binding)                       \
                              .Ret<::xla::ffi::AnyBuffer>() /* o */          \
                              .Ret<::xla::ffi::AnyBuffer>() /* final_state */)

#define KDA_BWD_SIGNATURE(binding)                                              \
  KDA_CONTRACT_ATTRIBUTES(KDA_CONTRACT_INPUTS(binding)                          \
                              .Arg<::xla::ffi::AnyBuffer>() /* do */            \
                              .Arg<::xla::ffi::AnyBuffer>() /* dfinal_state */  \
                              .Ret<::xla::ffi::AnyBuffer>() /* dq */            \
                              .Ret<::xla::ffi::AnyBuffer>() /* dk */            \
                              .Ret<::xla::ffi::AnyBuffer>() /* dv */            \
                              .Ret<::xla::ffi::AnyBuffer>() /* dg */            \
                              .Ret<::xla::ffi::AnyBuffer>() /* dbeta */         \
                              .Ret<::xla::ffi::AnyBuffer>() /* dA_log */        \
                              .Ret<::xla::ffi::AnyBuffer>() /* ddt_bias */      \
                              .Ret<::xla::ffi::AnyBuffer>() /* dinitial_state */)

namespace jax_flashkda::contract {

namespace ffi = ::xla::ffi;

inline std::string shape_string(ffi::AnyBuffer::Dimensions dims) {
  std::string s = "[";
  for (size_t i = 0; i < dims.size(); ++i) s += (i ? "," : "") + std::to_string(dims[i]);
  return s + "]";
}

inline std::string shape_string(const std::vector<int64_t>& dims) {
  return shape_string(ffi::AnyBuffer::Dimensions(dims.data(), dims.size()));
}

// Errors name the call and target first ("jax_flashkda_fwd (CUDA)"), then the operand.
inline ffi::Error invalid(const std::string& who, const std::string& what) {
  return ffi::Error(ffi::ErrorCode::kInvalidArgument, who + ": " + what);
}

inline ffi::Error check_shape(const std::string& who, const ffi::AnyBuffer& buffer,
                              const char* name, const std::vector<int64_t>& expected) {
  const auto dims = buffer.dimensions();
  bool same = dims.size() == expected.size();
  for (size_t i = 0; same && i < dims.size(); ++i) same = dims[i] == expected[i];
  if (same) return ffi::Error::Success();
  return invalid(who, std::string(name) + " must have shape " + shape_string(expected) +
                          ", got " + shape_string(dims));
}

inline ffi::Error check_dtype(const std::string& who, const ffi::AnyBuffer& buffer,
                              const char* name, ffi::DataType expected, const char* expected_name) {
  if (buffer.element_type() == expected) return ffi::Error::Success();
  return invalid(who, std::string(name) + " must have dtype " + expected_name);
}

// A result (or cotangent) whose dtype must be that of the operand it belongs to.
inline ffi::Error check_like(const std::string& who, const ffi::AnyBuffer& buffer,
                             const char* name, const std::vector<int64_t>& shape,
                             const ffi::AnyBuffer& like, const char* like_name) {
  KDA_RETURN_IF_ERROR(check_shape(who, buffer, name, shape));
  if (buffer.element_type() == like.element_type()) return ffi::Error::Success();
  return invalid(who, std::string(name) + " must have the dtype of " + like_name);
}

inline ffi::Error check_f32(const std::string& who, const ffi::AnyBuffer& buffer,
                            const char* name, const std::vector<int64_t>& shape) {
  KDA_RETURN_IF_ERROR(check_shape(who, buffer, name, shape));
  return check_dtype(who, buffer, name, ffi::DataType::F32, "float32");
}

struct Sizes {
  int64_t B = 0, T = 0, H = 0, K = 0, V = 0;
  int64_t N = 0;               // sequences: B, or len(cu_seqlens) - 1 when varlen
  std::vector<int64_t> state;  // [N,H,K,V], or [N,H,V,K] when state_v_first
};

// Operands 0-8 and the attributes of any call (`state_is_pool`: the decode's state pool, whose
// rows are slots rather than sequences). q, k, v must share a dtype; which float
// dtypes q..beta may have is the target's to say.
inline ffi::Error check_inputs(const std::string& who, const ffi::AnyBuffer& q,
                               const ffi::AnyBuffer& k, const ffi::AnyBuffer& v,
                               const ffi::AnyBuffer& g, const ffi::AnyBuffer& beta,
                               const ffi::AnyBuffer& A_log, const ffi::AnyBuffer& dt_bias,
                               const ffi::AnyBuffer& initial_state,
                               const ffi::AnyBuffer& cu_seqlens, int32_t gate_mode,
                               float lower_bound, bool state_v_first, bool is_varlen,
                               Sizes& s, bool state_is_pool = false) {
  const auto qd = q.dimensions();
  const auto vd = v.dimensions();
  if (qd.size() != 4) return invalid(who, "q must have rank 4 [B,T,H,K], got " + shape_string(qd));
  if (vd.size() != 4) return invalid(who, "v must have rank 4 [B,T,H,V], got " + shape_string(vd));
  s.B = qd[0], s.T = qd[1], s.H = qd[2], s.K = qd[3], s.V = vd[3];
  KDA_RETURN_IF_ERROR(check_like(who, k, "k", {s.B, s.T, s.H, s.K}, q, "q"));
  KDA_RETURN_IF_ERROR(check_like(who, v, "v", {s.B, s.T, s.H, s.V}, q, "q"));
  KDA_RETURN_IF_ERROR(check_shape(who, g, "g", {s.B, s.T, s.H, s.K}));
  KDA_RETURN_IF_ERROR(check_shape(who, beta, "beta", {s.B, s.T, s.H}));
  KDA_RETURN_IF_ERROR(check_f32(who, A_log, "A_log", {s.H}));
  KDA_RETURN_IF_ERROR(check_f32(who, dt_bias, "dt_bias", {s.H, s.K}));
  KDA_RETURN_IF_ERROR(check_dtype(who, cu_seqlens, "cu_seqlens", ffi::DataType::S32, "int32"));
  if (cu_seqlens.dimensions().size() != 1 || cu_seqlens.dimensions()[0] < 1)
    return invalid(who, "cu_seqlens must have shape [N+1], got " +
                            shape_string(cu_seqlens.dimensions()));
  if (gate_mode < 0 || gate_mode > 2)
    return invalid(who, "gate_mode must be 0, 1 or 2, got " + std::to_string(gate_mode));
  if (gate_mode == 2 && !(lower_bound < 0.f))
    return invalid(who, "lower_bound must be negative with gate_mode 2");
  s.N = s.B;
  if (is_varlen) {
    if (s.B != 1)
      return invalid(who, "cu_seqlens needs batch size 1, got B=" + std::to_string(s.B));
    s.N = cu_seqlens.dimensions()[0] - 1;
  }
  // A pool (the decode's state_indices) has any number of rows, one per slot.
  int64_t rows = s.N;
  if (state_is_pool) {
    const auto sd = initial_state.dimensions();
    if (sd.size() != 4 || sd[0] < 1)
      return invalid(who, "the state pool must have shape [P,H,K,V] with P >= 1, got " +
                              shape_string(sd));
    rows = sd[0];
  }
  s.state = state_v_first ? std::vector<int64_t>{rows, s.H, s.V, s.K}
                          : std::vector<int64_t>{rows, s.H, s.K, s.V};
  return check_f32(who, initial_state, "initial_state", s.state);
}

// The backward's extra operands and its results.
inline ffi::Error check_backward(const std::string& who, const Sizes& s, const ffi::AnyBuffer& q,
                                 const ffi::AnyBuffer& k, const ffi::AnyBuffer& v,
                                 const ffi::AnyBuffer& g, const ffi::AnyBuffer& beta,
                                 const ffi::AnyBuffer& dout, const ffi::AnyBuffer& dfinal_state,
                                 const ffi::AnyBuffer& dq, const ffi::AnyBuffer& dk,
                                 const ffi::AnyBuffer& dv, const ffi::AnyBuffer& dg,
                                 const ffi::AnyBuffer& dbeta, const ffi::AnyBuffer& dA_log,
                                 const ffi::AnyBuffer& ddt_bias,
                                 const ffi::AnyBuffer& dinitial_state) {
  KDA_RETURN_IF_ERROR(check_like(who, dout, "do", {s.B, s.T, s.H, s.V}, v, "v"));
  KDA_RETURN_IF_ERROR(check_f32(who, dfinal_state, "dfinal_state", s.state));
  KDA_RETURN_IF_ERROR(check_like(who, dq, "dq", {s.B, s.T, s.H, s.K}, q, "q"));
  KDA_RETURN_IF_ERROR(check_like(who, dk, "dk", {s.B, s.T, s.H, s.K}, k, "k"));
  KDA_RETURN_IF_ERROR(check_like(who, dv, "dv", {s.B, s.T, s.H, s.V}, v, "v"));
  KDA_RETURN_IF_ERROR(check_like(who, dg, "dg", {s.B, s.T, s.H, s.K}, g, "g"));
  KDA_RETURN_IF_ERROR(check_like(who, dbeta, "dbeta", {s.B, s.T, s.H}, beta, "beta"));
  KDA_RETURN_IF_ERROR(check_f32(who, dA_log, "dA_log", {s.B, s.H}));
  KDA_RETURN_IF_ERROR(check_f32(who, ddt_bias, "ddt_bias", {s.B, s.H, s.K}));
  return check_f32(who, dinitial_state, "dinitial_state", s.state);
}

}  // namespace jax_flashkda::contract
