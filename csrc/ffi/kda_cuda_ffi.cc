// Decodes the jax_flashkda_fwd custom call, checks it against docs/ffi_contract.md and
// enqueues the kernels of csrc/kda on XLA's stream, with XLA's scratch memory as workspace.
#include "ffi/kda_cuda_ffi.h"

#include <cstdint>
#include <optional>
#include <string>

#include <cuda_runtime.h>

#include "kda/kda_fwd.h"

namespace ffi = xla::ffi;

namespace {

std::string dims_str(ffi::AnyBuffer::Dimensions dims) {
  std::string s = "[";
  for (size_t i = 0; i < dims.size(); ++i) s += (i ? "," : "") + std::to_string(dims[i]);
  return s + "]";
}

std::optional<kda::DType> to_dtype(ffi::DataType t) {
  switch (t) {
    case ffi::DataType::BF16: return kda::DType::kBF16;
    case ffi::DataType::F16: return kda::DType::kF16;
    case ffi::DataType::F32: return kda::DType::kF32;
    default: return std::nullopt;
  }
}

ffi::Error bad(const char* name, const std::string& what) {
  return ffi::Error::InvalidArgument(std::string("jax_flashkda_fwd (CUDA): ") + name + ": " + what);
}

// Checks `buf` has exactly `want` as shape.
ffi::Error expect_shape(const char* name, const ffi::AnyBuffer& buf,
                        std::initializer_list<int64_t> want) {
  auto dims = buf.dimensions();
  bool ok = dims.size() == want.size();
  size_t i = 0;
  for (int64_t w : want) ok = ok && dims[i++] == w;
  if (ok) return ffi::Error::Success();
  std::string ws = "[";
  i = 0;
  for (int64_t w : want) ws += (i++ ? "," : "") + std::to_string(w);
  return bad(name, "expected shape " + ws + "], got " + dims_str(dims));
}

#define KDA_CHECK(expr)                  \
  do {                                   \
    ffi::Error err_ = (expr);            \
    if (err_.failure()) return err_;     \
  } while (0)

ffi::Error fwd_impl(cudaStream_t stream, ffi::ScratchAllocator scratch, ffi::AnyBuffer q,
                    ffi::AnyBuffer k, ffi::AnyBuffer v, ffi::AnyBuffer g, ffi::AnyBuffer beta,
                    ffi::AnyBuffer A_log, ffi::AnyBuffer dt_bias, ffi::AnyBuffer initial_state,
                    ffi::AnyBuffer cu_seqlens, ffi::Result<ffi::AnyBuffer> o,
                    ffi::Result<ffi::AnyBuffer> final_state, float scale, bool use_qk_l2norm,
                    bool use_beta_sigmoid, int32_t gate_mode, float lower_bound,
                    bool state_v_first, bool is_varlen) {
  auto qd = q.dimensions();
  if (qd.size() != 4) return bad("q", "expected rank 4 [B,T,H,K], got " + dims_str(qd));
  const int64_t B = qd[0], T = qd[1], H = qd[2], K = qd[3];
  auto vd = v.dimensions();
  if (vd.size() != 4) return bad("v", "expected rank 4 [B,T,H,V], got " + dims_str(vd));
  const int64_t V = vd[3];

  KDA_CHECK(expect_shape("k", k, {B, T, H, K}));
  KDA_CHECK(expect_shape("v", v, {B, T, H, V}));
  KDA_CHECK(expect_shape("g", g, {B, T, H, K}));
  KDA_CHECK(expect_shape("beta", beta, {B, T, H}));
  KDA_CHECK(expect_shape("A_log", A_log, {H}));
  KDA_CHECK(expect_shape("dt_bias", dt_bias, {H, K}));

  const auto qkv_t = to_dtype(q.element_type());
  if (!qkv_t || *qkv_t == kda::DType::kF32)
    return bad("q", "dtype must be bfloat16 or float16 on the CUDA target");
  if (k.element_type() != q.element_type()) return bad("k", "dtype must match q");
  if (v.element_type() != q.element_type()) return bad("v", "dtype must match q");
  const auto g_t = to_dtype(g.element_type());
  if (!g_t) return bad("g", "dtype must be bfloat16, float16 or float32");
  const auto beta_t = to_dtype(beta.element_type());
  if (!beta_t) return bad("beta", "dtype must be bfloat16, float16 or float32");
  if (A_log.element_type() != ffi::DataType::F32) return bad("A_log", "dtype must be float32");
  if (dt_bias.element_type() != ffi::DataType::F32) return bad("dt_bias", "dtype must be float32");
  if (initial_state.element_type() != ffi::DataType::F32)
    return bad("initial_state", "dtype must be float32");
  if (cu_seqlens.element_type() != ffi::DataType::S32)
    return bad("cu_seqlens", "dtype must be int32");
  if (gate_mode < 0 || gate_mode > 2) return bad("gate_mode", "must be 0, 1 or 2");
  if (gate_mode == 2 && !(lower_bound < 0.f))
    return bad("lower_bound", "must be negative with gate_mode 2");

  int64_t N = B;
  if (is_varlen) {
    if (B != 1) return bad("cu_seqlens", "varlen needs B == 1, got B = " + std::to_string(B));
    auto cd = cu_seqlens.dimensions();
    if (cd.size() != 1 || cd[0] < 1)
      return bad("cu_seqlens", "expected shape [N+1], got " + dims_str(cd));
    N = cd[0] - 1;
  }
  if (state_v_first)
    KDA_CHECK(expect_shape("initial_state", initial_state, {N, H, V, K}));
  else
    KDA_CHECK(expect_shape("initial_state", initial_state, {N, H, K, V}));

  if (o->element_type() != v.element_type()) return bad("o", "dtype must match v");
  KDA_CHECK(expect_shape("o", *o, {B, T, H, V}));
  if (final_state->element_type() != ffi::DataType::F32)
    return bad("final_state", "dtype must be float32");
  KDA_CHECK(expect_shape("final_state", *final_state,
                         {N, H, state_v_first ? V : K, state_v_first ? K : V}));
  if (B * T * H > (int64_t{1} << 31) / 4 || N > (int64_t{1} << 30))
    return bad("q", "too large for the CUDA target");

  kda::FwdParams p;
  p.q = q.untyped_data();
  p.k = k.untyped_data();
  p.v = v.untyped_data();
  p.g = g.untyped_data();
  p.beta = beta.untyped_data();
  p.A_log = static_cast<const float*>(A_log.untyped_data());
  p.dt_bias = static_cast<const float*>(dt_bias.untyped_data());
  p.initial_state = static_cast<const float*>(initial_state.untyped_data());
  p.cu_seqlens = static_cast<const int32_t*>(cu_seqlens.untyped_data());
  p.o = o->untyped_data();
  p.final_state = static_cast<float*>(final_state->untyped_data());
  p.qkv_dtype = *qkv_t;
  p.g_dtype = *g_t;
  p.beta_dtype = *beta_t;
  p.B = static_cast<int>(B);
  p.T = static_cast<int>(T);
  p.H = static_cast<int>(H);
  p.K = static_cast<int>(K);
  p.V = static_cast<int>(V);
  p.N = static_cast<int>(N);
  p.scale = scale;
  p.lower_bound = lower_bound;
  p.gate_mode = gate_mode;
  p.use_qk_l2norm = use_qk_l2norm;
  p.use_beta_sigmoid = use_beta_sigmoid;
  p.state_v_first = state_v_first;
  p.is_varlen = is_varlen;

  if (const char* why = kda::fwd_unsupported(p))
    return ffi::Error(ffi::ErrorCode::kUnimplemented, std::string("jax_flashkda_fwd (CUDA): ") + why);

  void* ws = nullptr;
  if (const size_t bytes = kda::fwd_workspace_bytes(p); bytes > 0) {
    // XLA accepts alignments up to 16 bytes, which is what the kernels' 16-byte copies need.
    std::optional<void*> got = scratch.Allocate(bytes, 16);
    if (!got)
      return ffi::Error(ffi::ErrorCode::kResourceExhausted,
                        "jax_flashkda_fwd (CUDA): could not allocate " + std::to_string(bytes) +
                            " bytes of workspace");
    ws = *got;
  }
  if (const cudaError_t err = kda::fwd(p, ws, stream); err != cudaSuccess)
    return ffi::Error::Internal(std::string("jax_flashkda_fwd (CUDA): ") + cudaGetErrorName(err) +
                                ": " + cudaGetErrorString(err));
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(jax_flashkda_fwd_cuda, fwd_impl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Ctx<ffi::ScratchAllocator>()
                                  .Arg<ffi::AnyBuffer>()  // q
                                  .Arg<ffi::AnyBuffer>()  // k
                                  .Arg<ffi::AnyBuffer>()  // v
                                  .Arg<ffi::AnyBuffer>()  // g
                                  .Arg<ffi::AnyBuffer>()  // beta
                                  .Arg<ffi::AnyBuffer>()  // A_log
                                  .Arg<ffi::AnyBuffer>()  // dt_bias
                                  .Arg<ffi::AnyBuffer>()  // initial_state
                                  .Arg<ffi::AnyBuffer>()  // cu_seqlens
                                  .Ret<ffi::AnyBuffer>()  // o
                                  .Ret<ffi::AnyBuffer>()  // final_state
                                  .Attr<float>("scale")
                                  .Attr<bool>("use_qk_l2norm")
                                  .Attr<bool>("use_beta_sigmoid")
                                  .Attr<int32_t>("gate_mode")
                                  .Attr<float>("lower_bound")
                                  .Attr<bool>("state_v_first")
                                  .Attr<bool>("is_varlen"));
