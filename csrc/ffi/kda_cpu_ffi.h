// XLA FFI handlers of the CPU target: jax_flashkda_fwd and jax_flashkda_bwd on platform "cpu"
// (buffers and attributes in docs/ffi_contract.md).
#pragma once

#include "xla/ffi/api/ffi.h"

XLA_FFI_DECLARE_HANDLER_SYMBOL(jax_flashkda_fwd_cpu);
XLA_FFI_DECLARE_HANDLER_SYMBOL(jax_flashkda_bwd_cpu);
