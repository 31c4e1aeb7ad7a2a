// The checks and FFI signatures that docs/ffi_contract.md imposes on every handler, whatever
// the target: operand shapes, the fixed-dtype operands, the attributes (decoded once, as
// jax_flashkda::Attributes). What a target accepts beyond that (which float dtypes, which
// sizes) stays in its own handler.
#pragma once

#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "common/attributes.h"
#include "xla/ffi/api/ffi.h"

#define KDA_RETURN_IF_ERROR(expr)            \
  do {                                       \
    ::xla::ffi::Error kda_err_ = (expr);     \
    if (kda_err_.failure()) return kda_err_; \
  } while (0)

// The attribute dictionary of the forward and the backward decodes into one Attributes. The
// dictionary must hold exactly these seven names (jax_flashkda/_ffi.py CallConfig.attributes);
// gate_mode arrives as an int32 and becomes a GateMode as is (check_inputs refuses values
// outside the enum).
#define KDA_ATTRIBUTE_MEMBERS                                      \
  StructMember<float>("scale"), StructMember<float>("lower_bound"), \
      StructMember<::jax_flashkda::GateMode>("gate_mode"),          \
      StructMember<bool>("use_qk_l2norm"),                          \
      StructMember<bool>("use_beta_sigmoid"),                       \
      StructMember<bool>("state_v_first"), StructMember<bool>("is_varlen")
XLA_FFI_REGISTER_ENUM_ATTR_DECODING(jax_flashkda::GateMode);
XLA_FFI_REGISTER_STRUCT_ATTR_DECODING(jax_flashkda::Attributes, KDA_ATTRIBUTE_MEMBERS);
// The decode's dictionary holds exactly nine: the seven and its own two (_ffi.py DecodeConfig).
// The FFI decodes a struct from the whole dictionary (a count mismatch fails the call), so the
// two cannot be bound beside an Attributes; DecodeAttributes lists all nine.
XLA_FFI_REGISTER_STRUCT_ATTR_DECODING(jax_flashkda::DecodeAttributes, KDA_ATTRIBUTE_MEMBERS,
                                      StructMember<bool>("use_state_indices"),
                                      StructMember<bool>("use_num_accepted"));
// The split forward's dictionary: the seven and segment_tokens (_ffi.py SplitConfig).
XLA_FFI_REGISTER_STRUCT_ATTR_DECODING(jax_flashkda::SplitAttributes, KDA_ATTRIBUTE_MEMBERS,
                                      StructMember<int32_t>("segment_tokens"));
// The decoder fills the struct by aggregate initialisation in the order listed above.
static_assert(offsetof(jax_flashkda::Attributes, scale) <
                      offsetof(jax_flashkda::Attributes, lower_bound) &&
                  offsetof(jax_flashkda::Attributes, lower_bound) <
                      offsetof(jax_flashkda::Attributes, gate_mode) &&
                  offsetof(jax_flashkda::Attributes, gate_mode) <
                      offsetof(jax_flashkda::Attributes, use_qk_l2norm) &&
                  offsetof(jax_flashkda::Attributes, use_qk_l2norm) <
                      offsetof(jax_flashkda::Attributes, use_beta_sigmoid) &&
                  offsetof(jax_flashkda::Attributes, use_beta_sigmoid) <
                      offsetof(jax_flashkda::Attributes, state_v_first) &&
                  offsetof(jax_flashkda::Attributes, state_v_first) <
                      offsetof(jax_flashkda::Attributes, is_varlen),
              "Attributes' fields in the order of its StructMember list");
static_assert(offsetof(jax_flashkda::DecodeAttributes, common) <
                      offsetof(jax_flashkda::DecodeAttributes, use_state_indices) &&
                  offsetof(jax_flashkda::DecodeAttributes, use_state_indices) <
                      offsetof(jax_flashkda::DecodeAttributes, use_num_accepted),
              "DecodeAttributes' fields in the order of its StructMember list");

// Arguments, results and attributes of the calls, appended to a binding that may already hold
// the target's contexts (the CUDA stream and scratch allocator).
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

#define KDA_FWD_SIGNATURE(binding)                                 \
  KDA_CONTRACT_INPUTS(binding)                                     \
      .Ret<::xla::ffi::AnyBuffer>() /* o */                        \
      .Ret<::xla::ffi::AnyBuffer>() /* final_state */              \
      .Attrs<::jax_flashkda::Attributes>()

// The split forward (CUDA only, docs/sequence_split.md): the forward's operands and results,
// then the segments' states.
#define KDA_FWD_SPLIT_SIGNATURE(binding)                           \
  KDA_CONTRACT_INPUTS(binding)                                     \
      .Ret<::xla::ffi::AnyBuffer>() /* o */                        \
      .Ret<::xla::ffi::AnyBuffer>() /* final_state */              \
      .Ret<::xla::ffi::AnyBuffer>() /* segment_initial_states */   \
      .Ret<::xla::ffi::AnyBuffer>() /* segment_transitions */      \
      .Ret<::xla::ffi::AnyBuffer>() /* segment_final_states */     \
      .Attrs<::jax_flashkda::SplitAttributes>()

// The backward's results, appended to a binding that holds its operands.
#define KDA_BWD_RESULTS(binding)                                   \
  binding.Ret<::xla::ffi::AnyBuffer>() /* dq */                    \
      .Ret<::xla::ffi::AnyBuffer>() /* dk */                       \
      .Ret<::xla::ffi::AnyBuffer>() /* dv */                       \
      .Ret<::xla::ffi::AnyBuffer>() /* dg */                       \
      .Ret<::xla::ffi::AnyBuffer>() /* dbeta */                    \
      .Ret<::xla::ffi::AnyBuffer>() /* dA_log */                   \
      .Ret<::xla::ffi::AnyBuffer>() /* ddt_bias */                 \
      .Ret<::xla::ffi::AnyBuffer>() /* dinitial_state */

#define KDA_BWD_SIGNATURE(binding)                                 \
  KDA_BWD_RESULTS(KDA_CONTRACT_INPUTS(binding)                     \
                      .Arg<::xla::ffi::AnyBuffer>() /* do */       \
                      .Arg<::xla::ffi::AnyBuffer>() /* dfinal_state */) \
      .Attrs<::jax_flashkda::Attributes>()

// The sequence split's backward (CUDA only, docs/sequence_split.md): the backward's operands over
// the segments as packed sequences (initial_state: the segments' incoming states; dfinal_state:
// each sequence's end cotangent), then the segments' transposed transitions and each sequence's
// first and last segment; the backward's results (dinitial_state per segment).
#define KDA_BWD_SPLIT_SIGNATURE(binding)                                      \
  KDA_BWD_RESULTS(KDA_CONTRACT_INPUTS(binding)                                \
                      .Arg<::xla::ffi::AnyBuffer>() /* do */                  \
                      .Arg<::xla::ffi::AnyBuffer>() /* dfinal_state */        \
                      .Arg<::xla::ffi::AnyBuffer>() /* transitions_t */       \
                      .Arg<::xla::ffi::AnyBuffer>() /* first_segment */       \
                      .Arg<::xla::ffi::AnyBuffer>() /* last_segment */)       \
      .Attrs<::jax_flashkda::Attributes>()

// The decode (CUDA only, docs/decode.md): the forward's operands with the state read and written
// in place (final_state aliases initial_state), then state_indices and num_accepted_tokens.
#define KDA_DECODE_SIGNATURE(binding)                                         \
  KDA_CONTRACT_INPUTS(binding)                                                \
      .Arg<::xla::ffi::AnyBuffer>() /* state_indices */                       \
      .Arg<::xla::ffi::AnyBuffer>() /* num_accepted_tokens */                 \
      .Ret<::xla::ffi::AnyBuffer>() /* o */                                   \
      .Ret<::xla::ffi::AnyBuffer>() /* final_state (aliases initial_state) */ \
      .Attrs<::jax_flashkda::DecodeAttributes>()

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

// Operands 0-8, shared by both calls.
struct Inputs {
  ffi::AnyBuffer q, k, v, g, beta, A_log, dt_bias, initial_state, cu_seqlens;
};

// The backward's cotangents (operands 9, 10) and its results.
struct BwdBuffers {
  ffi::AnyBuffer dout, dfinal_state;
  ffi::AnyBuffer dq, dk, dv, dg, dbeta, dA_log, ddt_bias, dinitial_state;
};

// The element type of a float operand or result; nullopt for any other.
inline std::optional<DType> float_dtype(ffi::DataType t) {
  switch (t) {
    case ffi::DataType::BF16: return DType::kBF16;
    case ffi::DataType::F16: return DType::kF16;
    case ffi::DataType::F32: return DType::kF32;
    default: return std::nullopt;
  }
}

struct Sizes {
  int64_t B = 0, T = 0, H = 0, K = 0, V = 0;
  int64_t N = 0;               // sequences: B, or len(cu_seqlens) - 1 when varlen
  std::vector<int64_t> state;  // [N,H,K,V], or [N,H,V,K] when state_v_first
};

// Operands 0-8 and the attributes of any call (`state_is_pool`: the decode's state pool, whose
// rows are slots rather than sequences). q, k, v must share a dtype; which float
// dtypes q..beta may have is the target's to say.
inline ffi::Error check_inputs(const std::string& who, const Inputs& in, const Attributes& attrs,
                               Sizes& s, bool state_is_pool = false) {
  const auto qd = in.q.dimensions();
  const auto vd = in.v.dimensions();
  if (qd.size() != 4) return invalid(who, "q must have rank 4 [B,T,H,K], got " + shape_string(qd));
  if (vd.size() != 4) return invalid(who, "v must have rank 4 [B,T,H,V], got " + shape_string(vd));
  s.B = qd[0], s.T = qd[1], s.H = qd[2], s.K = qd[3], s.V = vd[3];
  KDA_RETURN_IF_ERROR(check_like(who, in.k, "k", {s.B, s.T, s.H, s.K}, in.q, "q"));
  KDA_RETURN_IF_ERROR(check_like(who, in.v, "v", {s.B, s.T, s.H, s.V}, in.q, "q"));
  KDA_RETURN_IF_ERROR(check_shape(who, in.g, "g", {s.B, s.T, s.H, s.K}));
  KDA_RETURN_IF_ERROR(check_shape(who, in.beta, "beta", {s.B, s.T, s.H}));
  KDA_RETURN_IF_ERROR(check_f32(who, in.A_log, "A_log", {s.H}));
  KDA_RETURN_IF_ERROR(check_f32(who, in.dt_bias, "dt_bias", {s.H, s.K}));
  KDA_RETURN_IF_ERROR(
      check_dtype(who, in.cu_seqlens, "cu_seqlens", ffi::DataType::S32, "int32"));
  const auto cd = in.cu_seqlens.dimensions();
  if (cd.size() != 1 || cd[0] < 1)
    return invalid(who, "cu_seqlens must have shape [N+1], got " + shape_string(cd));
  if (!valid_gate_mode(attrs.gate_mode))
    return invalid(who, "gate_mode must be 0, 1 or 2, got " +
                            std::to_string(static_cast<int32_t>(attrs.gate_mode)));
  if (attrs.gate_mode == GateMode::kSafe && !(attrs.lower_bound < 0.f))
    return invalid(who, "lower_bound must be negative with gate_mode 2");
  s.N = s.B;
  if (attrs.is_varlen) {
    if (s.B != 1)
      return invalid(who, "cu_seqlens needs batch size 1, got B=" + std::to_string(s.B));
    s.N = cd[0] - 1;
  }
  // A pool (the decode's state_indices) has any number of rows, one per slot.
  int64_t rows = s.N;
  if (state_is_pool) {
    const auto sd = in.initial_state.dimensions();
    if (sd.size() != 4 || sd[0] < 1)
      return invalid(who, "the state pool must have shape [P,H,K,V] with P >= 1, got " +
                              shape_string(sd));
    rows = sd[0];
  }
  s.state = attrs.state_v_first ? std::vector<int64_t>{rows, s.H, s.V, s.K}
                                : std::vector<int64_t>{rows, s.H, s.K, s.V};
  return check_f32(who, in.initial_state, "initial_state", s.state);
}

// The forward's results (and the decode's: o and the state written in place).
inline ffi::Error check_forward(const std::string& who, const Sizes& s, const Inputs& in,
                                const ffi::AnyBuffer& o, const ffi::AnyBuffer& final_state) {
  KDA_RETURN_IF_ERROR(check_like(who, o, "o", {s.B, s.T, s.H, s.V}, in.v, "v"));
  return check_f32(who, final_state, "final_state", s.state);
}

// The backward's cotangents, operands 9 and 10.
inline ffi::Error check_cotangents(const std::string& who, const Sizes& s, const Inputs& in,
                                   const ffi::AnyBuffer& dout, const ffi::AnyBuffer& dfinal) {
  KDA_RETURN_IF_ERROR(check_like(who, dout, "do", {s.B, s.T, s.H, s.V}, in.v, "v"));
  return check_f32(who, dfinal, "dfinal_state", s.state);
}

// The backward's results.
inline ffi::Error check_gradients(const std::string& who, const Sizes& s, const Inputs& in,
                                  const BwdBuffers& b) {
  KDA_RETURN_IF_ERROR(check_like(who, b.dq, "dq", {s.B, s.T, s.H, s.K}, in.q, "q"));
  KDA_RETURN_IF_ERROR(check_like(who, b.dk, "dk", {s.B, s.T, s.H, s.K}, in.k, "k"));
  KDA_RETURN_IF_ERROR(check_like(who, b.dv, "dv", {s.B, s.T, s.H, s.V}, in.v, "v"));
  KDA_RETURN_IF_ERROR(check_like(who, b.dg, "dg", {s.B, s.T, s.H, s.K}, in.g, "g"));
  KDA_RETURN_IF_ERROR(check_like(who, b.dbeta, "dbeta", {s.B, s.T, s.H}, in.beta, "beta"));
  KDA_RETURN_IF_ERROR(check_f32(who, b.dA_log, "dA_log", {s.B, s.H}));
  KDA_RETURN_IF_ERROR(check_f32(who, b.ddt_bias, "ddt_bias", {s.B, s.H, s.K}));
  return check_f32(who, b.dinitial_state, "dinitial_state", s.state);
}

// The backward's extra operands and its results.
inline ffi::Error check_backward(const std::string& who, const Sizes& s, const Inputs& in,
                                 const BwdBuffers& b) {
  KDA_RETURN_IF_ERROR(check_cotangents(who, s, in, b.dout, b.dfinal_state));
  return check_gradients(who, s, in, b);
}

}  // namespace jax_flashkda::contract
