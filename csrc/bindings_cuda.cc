// The CUDA extension module: hands the FFI handler capsules to jax_flashkda/_ffi.py.
#include <nanobind/nanobind.h>

#include "ffi/kda_cuda_bwd_ffi.h"
#include "ffi/kda_cuda_ffi.h"

namespace nb = nanobind;

namespace {
template <typename Fn>
nb::capsule handler_capsule(Fn* fn) {
  return nb::capsule(reinterpret_cast<void*>(fn));
}
}  // namespace

NB_MODULE(_kda_cuda, m) {
  m.def("registrations", []() {
    nb::dict targets;
    targets["jax_flashkda_fwd"] = handler_capsule(jax_flashkda_fwd_cuda);
    targets["jax_flashkda_bwd"] = handler_capsule(jax_flashkda_bwd_cuda);
    return targets;
  });
  // Which devices the kernels can run on is decided in Python from the device kind;
  // this names the architecture the kernels were compiled for.
  m.attr("compiled_arch") = "sm_90a";
}
