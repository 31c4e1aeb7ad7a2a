// XLA FFI handlers of the Hopper CUDA target: jax_flashkda_fwd, jax_flashkda_bwd,
// jax_flashkda_decode, jax_flashkda_fwd_split and jax_flashkda_bwd_split on platform "CUDA"
// (buffers and attributes in docs/ffi_contract.md).
#pragma once

#include "xla/ffi/api/ffi.h"

XLA_FFI_DECLARE_HANDLER_SYMBOL(jax_flashkda_fwd_cuda);
XLA_FFI_DECLARE_HANDLER_SYMBOL(jax_flashkda_bwd_cuda);
XLA_FFI_DECLARE_HANDLER_SYMBOL(jax_flashkda_decode_cuda);
XLA_FFI_DECLARE_HANDLER_SYMBOL(jax_flashkda_fwd_split_cuda);
XLA_FFI_DECLARE_HANDLER_SYMBOL(jax_flashkda_bwd_split_cuda);
