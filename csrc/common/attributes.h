// The attributes of the custom calls (docs/ffi_contract.md; the decode's, docs/decode.md) and
// the element types their float operands may have: plain C++, no CUDA, XLA or Python, so the FFI
// handlers decode them once (ffi/contract.h) and the CUDA kernels and the C++ target read the
// same struct.
// jax_flashkda/_ffi.py passes the attributes by these names; its GATE_* constants are the
// GateMode values.
#pragma once

#include <cstdint>

namespace jax_flashkda {

// What the raw gate input g is (docs/math.md): the log-decay itself, or the input of one of the
// two gate activations, −e^{A_log}·softplus(g + dt_bias) and lower_bound·sigmoid(e^{A_log}·(g +
// dt_bias)). Values as in the contract's int32 attribute `gate_mode`.
enum class GateMode : int32_t { kLogDecay = 0, kSoftplus = 1, kSafe = 2 };

inline bool valid_gate_mode(GateMode m) {
  return m == GateMode::kLogDecay || m == GateMode::kSoftplus || m == GateMode::kSafe;
}

// Element type of a float operand or result.
enum class DType : int { kBF16 = 0, kF16 = 1, kF32 = 2 };

// The seven attributes. Field order is the FFI's decoding order (ffi/contract.h) and, as the
// tail of kda::FwdParams, the layout the CUDA kernels read their parameters in.
struct Attributes {
  float scale = 1.f;
  float lower_bound = -5.f;  // the safe gate's bound (gate_mode kSafe)
  GateMode gate_mode = GateMode::kLogDecay;
  bool use_qk_l2norm = false;
  bool use_beta_sigmoid = false;
  bool state_v_first = false;  // states are [N,H,V,K] instead of [N,H,K,V]
  bool is_varlen = false;      // cu_seqlens holds the sequences of a packed batch of one row
};

// The decode's attributes (jax_flashkda_decode, CUDA only): the seven, then whether its
// state_indices and num_accepted_tokens operands are real (else [1] dummies). Field order is the
// FFI's decoding order (ffi/contract.h): the seven fill `common` by brace elision.
struct DecodeAttributes {
  Attributes common;
  bool use_state_indices = false;  // the state is a pool of slots, rows picked by state_indices
  bool use_num_accepted = false;   // num_accepted_tokens picks the read slot (state_indices [N,S])
};

// The split forward's attributes (jax_flashkda_fwd_split, CUDA only): the seven, then the
// longest segment in tokens (docs/sequence_split.md).
struct SplitAttributes {
  Attributes common;
  int32_t segment_tokens = 0;
};

}  // namespace jax_flashkda
