// XLA FFI handler of the Hopper CUDA backward (see docs/ffi_contract.md).
#pragma once

#include "xla/ffi/api/ffi.h"

// jax_flashkda_bwd on platform "CUDA".
XLA_FFI_DECLARE_HANDLER_SYMBOL(jax_flashkda_bwd_cuda);
