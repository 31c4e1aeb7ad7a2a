// The extension modules: hand the FFI handler capsules to jax_flashkda/_ffi.py. Built twice,
// as _kda_cpu and (with KDA_TARGET_CUDA) as _kda_cuda, so that a CPU-only build never links
// the CUDA runtime.
#include <nanobind/nanobind.h>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <optional>
#include <string>

#if defined(KDA_TARGET_CUDA)
#include <nanobind/stl/optional.h>
#include <nanobind/stl/string.h>

#include "ffi/kda_cuda_ffi.h"
#include "kda/kda_bwd.h"
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
#if defined(KDA_TARGET_CUDA)
    targets["jax_flashkda_decode"] = nb::capsule(reinterpret_cast<void*>(jax_flashkda_decode_cuda));
    targets["jax_flashkda_fwd_split"] =
        nb::capsule(reinterpret_cast<void*>(jax_flashkda_fwd_split_cuda));
    targets["jax_flashkda_bwd_split"] =
        nb::capsule(reinterpret_cast<void*>(jax_flashkda_bwd_split_cuda));
#endif
    return targets;
  });
#if defined(KDA_TARGET_CUDA)
  // What the CUDA target would refuse for a call of these sizes, asked at trace time so that
  // kda(impl="auto") takes another path and impl="cuda" raises instead of failing at run time:
  // the handler's and kernels' own checks, and a workspace larger than `memory_bytes`. None
  // when the call fits. segment_tokens > 0: the split forward (jax_flashkda_fwd_split), or the
  // split backward (jax_flashkda_bwd_split, the sizes those of its segments).
  m.def("cuda_refusal", [](bool backward, int64_t B, int64_t T, int64_t H, int64_t K, int64_t V,
                           int64_t N, bool is_varlen, bool f16, int64_t memory_bytes,
                           int64_t segment_tokens) -> std::optional<std::string> {
    if (const char* why = kda::index_range_unsupported(B, T, H, N)) return std::string(why);
    kda::BwdParams p;
    p.B = static_cast<int>(B), p.T = static_cast<int>(T), p.H = static_cast<int>(H);
    p.K = static_cast<int>(K), p.V = static_cast<int>(V), p.N = static_cast<int>(N);
    p.attrs.is_varlen = is_varlen;
    p.qkv_dtype = f16 ? kda::DType::kF16 : kda::DType::kBF16;
    const int seg = static_cast<int>(std::min<int64_t>(segment_tokens, INT32_MAX));
    const bool split = segment_tokens > 0;
    const char* why = backward ? kda::bwd_unsupported(p)
                      : split  ? kda::fwd_split_unsupported(p, seg)
                               : kda::fwd_unsupported(p);
    if (why) return std::string(why);
    // The split forward's segment states are results, but as large as a workspace.
    const size_t bytes =
        backward ? (split ? kda::bwd_split_workspace_bytes(p) : kda::bwd_workspace_bytes(p))
        : split  ? kda::fwd_split_workspace_bytes(p, seg) +
                      static_cast<size_t>(kda::split_segments(p, seg)) * p.H * p.K *
                          (3 * p.V + p.K) * 4
                 : kda::fwd_workspace_bytes(p);
    if (memory_bytes > 0 && bytes > static_cast<size_t>(memory_bytes))
      return std::string(split ? "the split " : "the ") + (backward ? "backward" : "forward") +
             " needs " + std::to_string(bytes) + " bytes of workspace" +
             (split && !backward ? " and segment states" : "") + ", more than the device's " +
             std::to_string(memory_bytes);
    return std::nullopt;
  });
#endif
}
