// The extension modules: hand the FFI handler capsules to jax_flashkda/_ffi.py. Built twice,
// as _kda_cpu and (with KDA_TARGET_CUDA) as _kda_cuda, so that a CPU-only build never links
// the CUDA runtime.
#include <nanobind/nanobind.h>

#if defined(KDA_TARGET_CUDA)
#include "ffi/kda_cuda_ffi.h"
#define KDA_MODULE _kda_cuda
#define KDA_HANDLER(call) call##_cuda
#else
#include "ffi/kda_cpu_ffi.h"
#define KDA_MODULE _kda_cpu
#define KDA_HANDLER(call) call##_cpu
#endif

namespace nb = nanobind;

NB_MODULE(KDA_MODULE, m) {
  m.def("registrations", []() {
    nb::dict targets;
    targets["jax_flashkda_fwd"] = nb::capsule(reinterpret_cast<void*>(KDA_HANDLER(jax_flashkda_fwd)));
    targets["jax_flashkda_bwd"] = nb::capsule(reinterpret_cast<void*>(KDA_HANDLER(jax_flashkda_bwd)));
    return targets;
  });
}
