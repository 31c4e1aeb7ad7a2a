// The CPU extension module: hands the FFI handler capsules to jax_flashkda/_ffi.py.
#include <nanobind/nanobind.h>

#include "ffi/kda_cpu_ffi.h"

namespace nb = nanobind;

namespace {
template <typename Fn>
nb::capsule handler_capsule(Fn* fn) {
  return nb::capsule(reinterpret_cast<void*>(fn));
}
}  // namespace

NB_MODULE(_kda_cpu, m) {
  m.def("registrations", []() {
    nb::dict targets;
    targets["jax_flashkda_fwd"] = handler_capsule(jax_flashkda_fwd_cpu);
    targets["jax_flashkda_bwd"] = handler_capsule(jax_flashkda_bwd_cpu);
    return targets;
  });
}
