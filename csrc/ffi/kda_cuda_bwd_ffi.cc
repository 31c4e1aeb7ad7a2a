// Decodes the jax_flashkda_bwd custom call, checks it against docs/ffi_contract.md and
// enqueues the backward kernels of csrc/kda on XLA's stream, with XLA's scratch memory as
// workspace.
#include "ffi/kda_cuda_bwd_ffi.h"

#include <cstdint>
#include <initializer_list>
#include <optional>
#include <string>

#include <cuda_runtime.h>

#include "kda/kda_bwd.h"

namespace ffi = xla::ffi;

namespace {

constexpr const char* kWho = "jax_flashkda_bwd (CUDA): ";

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
  return ffi::Error::InvalidArgument(std::string(kWho) + name + ": " + what);
}

ffi::Error expect_shape(const char* name, const ffi::AnyBuffer& buf,
                        std::initializer_list<int64_t> want) {
  auto dims = buf.dimensions();
  bool ok = dims.size() == want.size();
  size_t i = 0;
  for (int64_t w : want) ok = ok && i < dims.size() && dims[i++] == w;
  if (ok) return ffi::Error::Success();
  std::string ws = "[";
  i = 0;
  for (int64_t w : want) ws += (i++ ? "," : "") + std::to_string(w);
  return bad(name, "expected shape " + ws + "], got " + dims_str(dims));
}

ffi::Error expect_type(const char* name, const ffi::AnyBuffer& buf, ffi::DataType want,
                       const char* what) {
  if (buf.element_type() == want) return ffi::Error::Success();
  return bad(name, std::string("dtype must be ") + what);
}

#define KDA_CHECK(expr)                  \
  do {                                   \
    ffi::Error err_ = (expr);            \
    if (err_.failure()) return err_;     \
  } while (0)

ffi::Error bwd_impl(cudaStream_t stream, ffi::ScratchAllocator scratch, ffi::AnyBuffer q,
                    ffi::AnyBuffer k, ffi::AnyBuffer v, ffi::AnyBuffer g, ffi::AnyBuffer beta,
                    ffi::AnyBuffer A_log, ffi::AnyBuffer dt_bias, ffi::AnyBuffer initial_state,
                    ffi::AnyBuffer cu_seqlens, ffi::AnyBuffer dout, ffi::AnyBuffer dfinal_state,
                    ffi::Result<ffi::AnyBuffer> dq, ffi::Result<ffi::AnyBuffer> dk,
                    ffi::Result<ffi::AnyBuffer> dv, ffi::Result<ffi::AnyBuffer> dg,
                    ffi::Result<ffi::AnyBuffer> dbeta, ffi::Result<ffi::AnyBuffer> dA_log,
                    ffi::Result<ffi::AnyBuffer> ddt_bias,
                    ffi::Result<ffi::AnyBuffer> dinitial_state, float scale, bool use_qk_l2norm,
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
  KDA_CHECK(expect_shape("do", dout, {B, T, H, V}));

  const auto qkv_t = to_dtype(q.element_type());
  if (!qkv_t || *qkv_t == kda::DType::kF32)
    return bad("q", "dtype must be bfloat16 or float16 on the CUDA target");
  if (k.element_type() != q.element_type()) return bad("k", "dtype must match q");
  if (v.element_type() != q.element_type()) return bad("v", "dtype must match q");
  if (dout.element_type() != v.element_type()) return bad("do", "dtype must match v");
  const auto g_t = to_dtype(g.element_type());
  if (!g_t) return bad("g", "dtype must be bfloat16, float16 or float32");
  const auto beta_t = to_dtype(beta.element_type());
  if (!beta_t) return bad("beta", "dtype must be bfloat16, float16 or float32");
  KDA_CHECK(expect_type("A_log", A_log, ffi::DataType::F32, "float32"));
  KDA_CHECK(expect_type("dt_bias", dt_bias, ffi::DataType::F32, "float32"));
  KDA_CHECK(expect_type("initial_state", initial_state, ffi::DataType::F32, "float32"));
  KDA_CHECK(expect_type("dfinal_state", dfinal_state, ffi::DataType::F32, "float32"));
  KDA_CHECK(expect_type("cu_seqlens", cu_seqlens, ffi::DataType::S32, "int32"));
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
  const int64_t s2 = state_v_first ? V : K, s3 = state_v_first ? K : V;
  KDA_CHECK(expect_shape("initial_state", initial_state, {N, H, s2, s3}));
  KDA_CHECK(expect_shape("dfinal_state", dfinal_state, {N, H, s2, s3}));

  if (dq->element_type() != q.element_type()) return bad("dq", "dtype must match q");
  KDA_CHECK(expect_shape("dq", *dq, {B, T, H, K}));
  if (dk->element_type() != k.element_type()) return bad("dk", "dtype must match k");
  KDA_CHECK(expect_shape("dk", *dk, {B, T, H, K}));
  if (dv->element_type() != v.element_type()) return bad("dv", "dtype must match v");
  KDA_CHECK(expect_shape("dv", *dv, {B, T, H, V}));
  if (dg->element_type() != g.element_type()) return bad("dg", "dtype must match g");
  KDA_CHECK(expect_shape("dg", *dg, {B, T, H, K}));
  if (dbeta->element_type() != beta.element_type()) return bad("dbeta", "dtype must match beta");
  KDA_CHECK(expect_shape("dbeta", *dbeta, {B, T, H}));
  KDA_CHECK(expect_type("dA_log", *dA_log, ffi::DataType::F32, "float32"));
  KDA_CHECK(expect_shape("dA_log", *dA_log, {B, H}));
  KDA_CHECK(expect_type("ddt_bias", *ddt_bias, ffi::DataType::F32, "float32"));
  KDA_CHECK(expect_shape("ddt_bias", *ddt_bias, {B, H, K}));
  KDA_CHECK(expect_type("dinitial_state", *dinitial_state, ffi::DataType::F32, "float32"));
  KDA_CHECK(expect_shape("dinitial_state", *dinitial_state, {N, H, s2, s3}));
  if (B * T * H > (int64_t{1} << 31) / 4 || N > (int64_t{1} << 30))
    return bad("q", "too large for the CUDA target");

  kda::BwdParams p;
  p.q = q.untyped_data();
  p.k = k.untyped_data();
  p.v = v.untyped_data();
  p.g = g.untyped_data();
  p.beta = beta.untyped_data();
  p.A_log = static_cast<const float*>(A_log.untyped_data());
  p.dt_bias = static_cast<const float*>(dt_bias.untyped_data());
  p.initial_state = static_cast<const float*>(initial_state.untyped_data());
  p.cu_seqlens = static_cast<const int32_t*>(cu_seqlens.untyped_data());
  p.dout = dout.untyped_data();
  p.dfinal_state = static_cast<const float*>(dfinal_state.untyped_data());
  p.dq = dq->untyped_data();
  p.dk = dk->untyped_data();
  p.dv = dv->untyped_data();
  p.dg = dg->untyped_data();
  p.dbeta = dbeta->untyped_data();
  p.dA_log = static_cast<float*>(dA_log->untyped_data());
  p.ddt_bias = static_cast<float*>(ddt_bias->untyped_data());
  p.dinitial_state = static_cast<float*>(dinitial_state->untyped_data());
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

  if (const char* why = kda::bwd_unsupported(p))
    return ffi::Error(ffi::ErrorCode::kUnimplemented, std::string(kWho) + why);

  void* ws = nullptr;
  if (const size_t bytes = kda::bwd_workspace_bytes(p); bytes > 0) {
    // XLA accepts alignments up to 16 bytes, which is what the kernels' 16-byte copies need.
    std::optional<void*> got = scratch.Allocate(bytes, 16);
    if (!got)
      return ffi::Error(ffi::ErrorCode::kResourceExhausted,
                        std::string(kWho) + "could not allocate " + std::to_string(bytes) +
                            " bytes of workspace");
    ws = *got;
  }
  if (const cudaError_t err = kda::bwd(p, ws, stream); err != cudaSuccess)
    return ffi::Error::Internal(std::string(kWho) + cudaGetErrorName(err) + ": " +
                                cudaGetErrorString(err));
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(jax_flashkda_bwd_cuda, bwd_impl,
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
                                  .Arg<ffi::AnyBuffer>()  // do
                                  .Arg<ffi::AnyBuffer>()  // dfinal_state
                                  .Ret<ffi::AnyBuffer>()  // dq
                                  .Ret<ffi::AnyBuffer>()  // dk
                                  .Ret<ffi::AnyBuffer>()  // dv
                                  .Ret<ffi::AnyBuffer>()  // dg
                                  .Ret<ffi::AnyBuffer>()  // dbeta
                                  .Ret<ffi::AnyBuffer>()  // dA_log
                                  .Ret<ffi::AnyBuffer>()  // ddt_bias
                                  .Ret<ffi::AnyBuffer>()  // dinitial_state
                                  .Attr<float>("scale")
                                  .Attr<bool>("use_qk_l2norm")
                                  .Attr<bool>("use_beta_sigmoid")
                                  .Attr<int32_t>("gate_mode")
                                  .Attr<float>("lower_bound")
                                  .Attr<bool>("state_v_first")
                                  .Attr<bool>("is_varlen"));
