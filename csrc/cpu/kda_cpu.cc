#include "cpu/kda_cpu.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>
#include <system_error>
#include <thread>
#include <type_traits>
#include <vector>

#include "common/rules.h"

namespace jax_flashkda::cpu {
namespace {

// Tokens per chunk. The forward preprocesses a chunk, then runs it column block by column block;
// the backward also checkpoints the state once per chunk and recomputes one chunk at a time, so
// its memory is O(T / kChunk * K * V) per head instead of O(T * K * V).
constexpr int64_t kChunk = 64;

// Every column of the state evolves on its own (u, o, w and dv are per column; only the
// per-row reductions of the backward mix columns, and they are sums). So the state is kept as
// column blocks of kBlock values, each a contiguous K x kBlock tile that stays in L1 while a whole
// chunk of tokens runs over it. V is padded to a multiple of kBlock; padded columns start at zero
// and every update keeps them zero.
constexpr int64_t kLanes = 4;
constexpr int64_t kBlock = 16;
constexpr int64_t kVecs = kBlock / kLanes;

// GCC/Clang vector types: plain loops with float reductions stay scalar without -ffast-math,
// and vector types keep the build free of -march flags (the compiler lowers 8 lanes to whatever
// the target has). Loads and stores go through memcpy (unaligned, no aliasing questions).
using Vec = float __attribute__((vector_size(kLanes * sizeof(float))));

inline void vload(Vec& v, const float* p) { std::memcpy(&v, p, sizeof v); }
inline void vstore(float* p, const Vec& v) { std::memcpy(p, &v, sizeof v); }
inline float hsum(const Vec& v) {
  float s = 0.f;
  for (int64_t l = 0; l < kLanes; ++l) s += v[l];
  return s;
}

// ---------------------------------------------------------------------------------------------
// Element conversion.

float bf16_to_float(uint16_t h) {
  uint32_t bits = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

uint16_t float_to_bf16(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, 4);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((bits >> 16) | 0x40u);
  bits += 0x7fffu + ((bits >> 16) & 1u);  // round to nearest, ties to even
  return static_cast<uint16_t>(bits >> 16);
}

float f16_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1fu;
  const uint32_t mant = h & 0x3ffu;
  if (exp == 0) {
    const float mag = static_cast<float>(mant) * 5.9604644775390625e-8f;  // mant * 2^-24
    return sign ? -mag : mag;
  }
  uint32_t bits;
  if (exp == 31) {
    bits = sign | 0x7f800000u | (mant << 13);
  } else {
    bits = sign | ((exp + 112u) << 23) | (mant << 13);
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

uint16_t float_to_f16(float f) {
  uint32_t x;
  std::memcpy(&x, &f, 4);
  const uint16_t sign = static_cast<uint16_t>((x >> 16) & 0x8000u);
  x &= 0x7fffffffu;
  if (x > 0x7f800000u) return sign | 0x7e00u;
  if (x >= 0x47800000u) return sign | 0x7c00u;  // >= 65536 (and inf) saturate to inf
  if (x >= 0x38800000u) {
    // Normal half: rebias the exponent by (127 - 15) and round the dropped 13 bits to even;
    // a carry out of the mantissa correctly bumps the exponent (up to inf at 65520).
    x = x - 0x38000000u + 0xfffu + ((x >> 13) & 1u);
    return sign | static_cast<uint16_t>(x >> 13);
  }
  // Subnormal half: adding 0.5 (whose ulp is 2^-24, the subnormal step) rounds to even in
  // hardware; the bit difference is the count of 2^-24 steps.
  float mag;
  std::memcpy(&mag, &x, 4);
  const float shifted = mag + 0.5f;
  uint32_t sbits;
  std::memcpy(&sbits, &shifted, 4);
  return sign | static_cast<uint16_t>(sbits - 0x3f000000u);
}

void load_row(const Tensor& t, int64_t offset, int64_t n, float* dst) {
  switch (t.dtype) {
    case DType::kF32:
      std::memcpy(dst, static_cast<const float*>(t.data) + offset, n * sizeof(float));
      return;
    case DType::kBF16: {
      const uint16_t* src = static_cast<const uint16_t*>(t.data) + offset;
      for (int64_t i = 0; i < n; ++i) dst[i] = bf16_to_float(src[i]);
      return;
    }
    case DType::kF16: {
      const uint16_t* src = static_cast<const uint16_t*>(t.data) + offset;
      for (int64_t i = 0; i < n; ++i) dst[i] = f16_to_float(src[i]);
      return;
    }
  }
}

void store_row(const Tensor& t, int64_t offset, int64_t n, const float* src) {
  switch (t.dtype) {
    case DType::kF32:
      std::memcpy(static_cast<float*>(t.data) + offset, src, n * sizeof(float));
      return;
    case DType::kBF16: {
      uint16_t* dst = static_cast<uint16_t*>(t.data) + offset;
      for (int64_t i = 0; i < n; ++i) dst[i] = float_to_bf16(src[i]);
      return;
    }
    case DType::kF16: {
      uint16_t* dst = static_cast<uint16_t*>(t.data) + offset;
      for (int64_t i = 0; i < n; ++i) dst[i] = float_to_f16(src[i]);
      return;
    }
  }
}

size_t element_size(DType d) { return d == DType::kF32 ? 4 : 2; }


// ---------------------------------------------------------------------------------------------
// Small numerics.

float sigmoid(float x) {
  if (x >= 0.f) return 1.f / (1.f + std::exp(-x));
  const float e = std::exp(x);
  return e / (1.f + e);
}

float softplus(float x) { return std::max(x, 0.f) + std::log1p(std::exp(-std::fabs(x))); }

double dot_double(const float* a, const float* b, int64_t n) {
  double s = 0.0;
  for (int64_t i = 0; i < n; ++i) s += static_cast<double>(a[i]) * b[i];
  return s;
}

float dot(const float* a, const float* b, int64_t n) {
  return static_cast<float>(dot_double(a, b, n));
}

// Normalises x in place and sets r = 1/sqrt(|x|^2 + eps). Returns whether every element of x
// is finite: their sum of squares is finite in double exactly when they are.
bool l2normalize(float* x, int64_t n, float& r) {
  const double sum_sq = dot_double(x, x, n);
  r = 1.f / std::sqrt(static_cast<float>(sum_sq) + kda_rules::kL2NormEps);
  for (int64_t i = 0; i < n; ++i) x[i] *= r;
  return std::isfinite(sum_sq);
}

// True when no element is inf or NaN. Tests the exponent bits (all ones) with integer ops so
// the loop vectorises (a float reduction would stay scalar without -ffast-math).
bool all_finite(const float* x, int64_t n) {
  uint32_t bad = 0;
  for (int64_t i = 0; i < n; ++i) {
    uint32_t bits;
    std::memcpy(&bits, x + i, 4);
    bad |= (bits & 0x7f800000u) == 0x7f800000u;
  }
  return bad == 0;
}

// ---------------------------------------------------------------------------------------------
// Sequences, state layout, tokens.

struct Span {
  int64_t row, begin, end;
};

constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();

// docs/robustness.md §3 for v, per value column of one (sequence, head). Column j of the state
// reads v[:, j] and no other value of v, so a non-finite v[t, j] quarantines column j alone,
// from token t on (a non-finite q, k, g or beta quarantines the whole head: the sequence is cut
// there instead). The column then runs as if v[t', j] were 0 for every t' >= t: a select, so the
// NaN never enters arithmetic, and the column's state stays that of clean input (finite wherever
// that is), which the backward relies on (see the do rows in kda_backward). Its outputs and its
// final state are overwritten with NaN. at[j] is the first quarantined token of column j, kNever
// while there is none.
struct ColumnCuts {
  static constexpr int64_t kNever = std::numeric_limits<int64_t>::max();
  std::vector<int64_t> at;
  bool any = false;  // whether some column is quarantined: the normal path tests only this

  explicit ColumnCuts(int64_t V) : at(V, kNever) {}
  void reset() {
    std::fill(at.begin(), at.end(), kNever);
    any = false;
  }
  bool cut(int64_t j, int64_t t) const { return at[j] <= t; }

  // Records where row t of v (the V values of token t) starts a quarantine, then zeroes every
  // value of a quarantined column. Tokens come in order on the first pass over a sequence, so
  // at[j] ends up the first non-finite one; a later pass finds every at[j] already set.
  void admit(int64_t t, float* v) {
    for (int64_t j = 0; j < static_cast<int64_t>(at.size()); ++j) {
      if (!std::isfinite(v[j]) && t < at[j]) {
        at[j] = t;
        any = true;
      }
      v[j] = cut(j, t) ? 0.f : v[j];
    }
  }
  // Sets value j of `row`, a [V] row of token t, to `value` for every column quarantined by t.
  void fill(int64_t t, float* row, float value) const {
    for (int64_t j = 0; j < static_cast<int64_t>(at.size()); ++j)
      if (cut(j, t)) row[j] = value;
  }
};

int64_t padded_v(int64_t V) { return (V + kBlock - 1) / kBlock * kBlock; }

// docs/robustness.md §1: a traced cu_seqlens cannot be checked before the call, so its values
// are made legal instead of rejected: c'[i] = max(clip(c[0], 0, T), ..., clip(c[i], 0, T)).
// Computed in int64 from a copy, so INT32_MIN / INT32_MAX entries clip without overflow and no
// later index depends on the raw values.
std::vector<int64_t> legal_offsets(const KdaShape& shape, const Attributes& params,
                                   const int32_t* cu) {
  if (!params.is_varlen) return {};
  std::vector<int64_t> offsets(shape.N + 1);
  int64_t running = 0;
  for (int64_t n = 0; n <= shape.N; ++n) {
    running = std::max(running, std::clamp<int64_t>(cu[n], 0, shape.T));
    offsets[n] = running;
  }
  return offsets;
}

struct Problem {
  const KdaShape& shape;
  const Attributes& params;
  const KdaInputs& in;
  int64_t vp;                    // V padded to kBlock
  std::vector<int64_t> offsets;  // the legal cu_seqlens (varlen only)

  Problem(const KdaShape& s, const Attributes& pr, const KdaInputs& i)
      : shape(s), params(pr), in(i), vp(padded_v(s.V)),
        offsets(legal_offsets(s, pr, i.cu_seqlens)) {}

  Span span(int64_t n) const {
    if (!params.is_varlen) return {n, 0, shape.T};
    return {0, offsets[n], offsets[n + 1]};
  }
  int64_t max_len() const {
    int64_t m = 0;
    for (int64_t n = 0; n < shape.N; ++n) m = std::max(m, span(n).end - span(n).begin);
    return m;
  }
  int64_t token(int64_t row, int64_t t, int64_t h) const { return (row * shape.T + t) * shape.H + h; }
  int64_t state_size() const { return shape.K * vp; }

  // Writes `value` into tokens [from, to) of batch row `row`, head h, of a [B, T, H, width]
  // tensor.
  void fill_tokens(const Tensor& t, int64_t width, int64_t row, int64_t from, int64_t to,
                   int64_t h, float value) const {
    const std::vector<float> values(width, value);
    for (int64_t tok = from; tok < to; ++tok)
      store_row(t, token(row, tok, h) * width, width, values.data());
  }

  // Internal state: column blocks [vp / kBlock][K][kBlock]. External: [K, V] or [V, K].
  int64_t internal(int64_t i, int64_t j) const {
    return (j / kBlock) * shape.K * kBlock + i * kBlock + j % kBlock;
  }
  void load_state(const float* src, int64_t n, int64_t h, float* S) const {
    const int64_t K = shape.K, V = shape.V;
    const float* base = src + (n * shape.H + h) * K * V;
    std::fill(S, S + state_size(), 0.f);
    for (int64_t i = 0; i < K; ++i)
      for (int64_t j = 0; j < V; ++j)
        S[internal(i, j)] = params.state_v_first ? base[j * K + i] : base[i * V + j];
  }
  void store_state(const float* S, int64_t n, int64_t h, float* dst) const {
    const int64_t K = shape.K, V = shape.V;
    float* base = dst + (n * shape.H + h) * K * V;
    for (int64_t i = 0; i < K; ++i)
      for (int64_t j = 0; j < V; ++j)
        (params.state_v_first ? base[j * K + i] : base[i * V + j]) = S[internal(i, j)];
  }
  void fill_state(float value, int64_t n, int64_t h, float* dst) const {
    float* base = dst + (n * shape.H + h) * shape.K * shape.V;
    std::fill(base, base + shape.K * shape.V, value);
  }
  // Sets every column of internal state S that is quarantined by token t to `value`.
  void fill_cut_columns(float* S, const ColumnCuts& cuts, int64_t t, float value) const {
    for (int64_t j = 0; j < shape.V; ++j)
      if (cuts.cut(j, t))
        for (int64_t i = 0; i < shape.K; ++i) S[internal(i, j)] = value;
  }
};

// The preprocessed tokens of one chunk, slot s = token - chunk start. `x` (the gate
// pre-activation g + dt_bias) and the l2norm factors are kept for the backward.
struct Chunk {
  std::vector<float> q, k, g, decay, x, v, rq, rk, beta;
  Chunk(int64_t K, int64_t vp)
      : q(kChunk * K), k(kChunk * K), g(kChunk * K), decay(kChunk * K), x(kChunk * K),
        v(kChunk * vp, 0.f), rq(kChunk), rk(kChunk), beta(kChunk) {}
};

// Whether log-decay g (as prepared) sits on the floor and so has a zero gradient (§2). A
// log-decay exactly at the floor before the select counts too: its exp(g) is 0 in fp32, so its
// gradient is 0 either way.
inline bool floored(float g) { return g == kda_rules::kLogDecayFloor; }

// Loads and preprocesses token t into slot s. Returns false when the token quarantines the
// whole head (docs/robustness.md §3): a non-finite q, k or beta (after the sigmoid), or a NaN or
// +inf log-decay (after the activation and the floor; -inf is a legal hard reset). Where a loop
// over the values runs anyway (the l2norm, the decays) the check rides along it. A non-finite v
// quarantines its value column only: `cuts` records it and the row of v is sanitised.
bool prepare_token(const Problem& p, int64_t row, int64_t t, int64_t h, ColumnCuts& cuts,
                   Chunk& c, int64_t s) {
  const int64_t K = p.shape.K, V = p.shape.V;
  const int64_t idx = p.token(row, t, h);
  float* q = &c.q[s * K];
  float* k = &c.k[s * K];
  float* g = &c.g[s * K];
  float* v = &c.v[s * p.vp];
  load_row(p.in.q, idx * K, K, q);
  load_row(p.in.k, idx * K, K, k);
  load_row(p.in.v, idx * V, V, v);
  load_row(p.in.g, idx * K, K, g);
  load_row(p.in.beta, idx, 1, &c.beta[s]);
  if (p.params.use_beta_sigmoid) c.beta[s] = sigmoid(c.beta[s]);
  if (!all_finite(v, V) || cuts.any) cuts.admit(t, v);
  bool finite = std::isfinite(c.beta[s]);
  if (p.params.use_qk_l2norm) {
    finite &= l2normalize(q, K, c.rq[s]);
    finite &= l2normalize(k, K, c.rk[s]);
  } else {
    c.rq[s] = c.rk[s] = 1.f;
    finite &= all_finite(q, K) & all_finite(k, K);
  }
  if (p.params.gate_mode != GateMode::kLogDecay) {
    const float a = std::exp(p.in.A_log[h]);
    const float* bias = p.in.dt_bias + h * K;
    for (int64_t i = 0; i < K; ++i) {
      const float x = g[i] + bias[i];
      c.x[s * K + i] = x;
      g[i] = p.params.gate_mode == GateMode::kSoftplus ? -a * softplus(x)
                                                      : p.params.lower_bound * sigmoid(a * x);
    }
  }
  for (int64_t i = 0; i < K; ++i) {
    // §2: the floor is a select, so a NaN log-decay stays NaN and quarantines the token.
    g[i] = g[i] < kda_rules::kLogDecayFloor ? kda_rules::kLogDecayFloor : g[i];
    finite &= g[i] < std::numeric_limits<float>::infinity();  // false for NaN and +inf
    c.decay[s * K + i] = std::exp(g[i]);
  }
  return finite;
}

// Prepares tokens [first, first + len) and returns how many of them come before the first one
// that quarantines the head: only those may run, so that token never touches an earlier row.
int64_t prepare_chunk(const Problem& p, int64_t row, int64_t first, int64_t len, int64_t h,
                      ColumnCuts& cuts, Chunk& c) {
  for (int64_t s = 0; s < len; ++s)
    if (!prepare_token(p, row, first + s, h, cuts, c, s)) return s;
  return len;
}

// ---------------------------------------------------------------------------------------------
// The token recurrence on one column block.

// Runs tokens [0, len) of a chunk over the block Sb (K x kBlock) starting at column j0:
// S' = Diag(exp g) S, u = v - S'^T k, S = S' + beta k u^T, o = scale S^T q.
// kKeep stores S'_t ([len][K][kBlock]) and u_t ([len][kBlock]) for the backward; kOutput
// writes o into o_rows ([len][vp]). The update of token s and the decay of token s + 1 share
// one pass over the rows, so the block is loaded and stored once per token.
template <bool kKeep, bool kOutput>
void forward_block(float* __restrict Sb, const Chunk& c, int64_t len, int64_t K, int64_t vp,
                   int64_t j0, float scale, float* __restrict kept_Sp,
                   float* __restrict kept_u, float* __restrict o_rows) {
  // Plain restrict pointers: the memcpy stores below could otherwise alias the vectors' data
  // pointers and force reloads in the inner loops.
  const float* __restrict cq = c.q.data();
  const float* __restrict ck = c.k.data();
  const float* __restrict cdecay = c.decay.data();
  const float* __restrict cv = c.v.data();
  const float* __restrict cbeta = c.beta.data();
  // Residual accumulators for even and odd rows: two independent dependency chains per vector.
  Vec acc[2][kVecs];
  auto start_residual = [&](int64_t s) {
    for (int64_t m = 0; m < kVecs; ++m) {
      vload(acc[0][m], cv + s * vp + j0 + m * kLanes);
      acc[1][m] = Vec{};
    }
  };
  // S'_s row i from S_{s-1} row i (in sv); accumulates u_s.
  auto decay_row = [&](int64_t s, int64_t i, int64_t m, Vec& sv) {
    sv *= cdecay[s * K + i];
    if (kKeep) vstore(kept_Sp + (s * K + i) * kBlock + m * kLanes, sv);
    acc[i & 1][m] -= ck[s * K + i] * sv;
  };

  if (len == 0) return;
  start_residual(0);
  for (int64_t i = 0; i < K; ++i)
    for (int64_t m = 0; m < kVecs; ++m) {
      Vec sv;
      vload(sv, Sb + i * kBlock + m * kLanes);
      decay_row(0, i, m, sv);
      vstore(Sb + i * kBlock + m * kLanes, sv);
    }

  for (int64_t s = 0; s < len; ++s) {
    Vec u[kVecs];
    for (int64_t m = 0; m < kVecs; ++m) {
      u[m] = acc[0][m] + acc[1][m];
      if (kKeep) vstore(kept_u + s * kBlock + m * kLanes, u[m]);
    }
    const float b = cbeta[s];
    const float* __restrict k = ck + s * K;
    const float* __restrict q = cq + s * K;
    Vec o[2][kVecs] = {};
    auto row_pass = [&](auto has_next) {
      if (has_next) start_residual(s + 1);
      for (int64_t i = 0; i < K; ++i) {
        float* __restrict Si = Sb + i * kBlock;
        const float bk = b * k[i], qi = scale * q[i];
        for (int64_t m = 0; m < kVecs; ++m) {
          Vec sv;
          vload(sv, Si + m * kLanes);
          sv += bk * u[m];
          if (kOutput) o[i & 1][m] += qi * sv;
          if (has_next) decay_row(s + 1, i, m, sv);
          vstore(Si + m * kLanes, sv);
        }
      }
    };
    if (s + 1 < len) {
      row_pass(std::true_type{});
    } else {
      row_pass(std::false_type{});
    }
    if (kOutput)
      for (int64_t m = 0; m < kVecs; ++m)
        vstore(o_rows + s * vp + j0 + m * kLanes, o[0][m] + o[1][m]);
  }
}

// Per-token sums over the columns, accumulated block by block: sd = S'_t do, du = dS_t u,
// sw = S'_t w, gg = rowsum(S'_t . dS'_t) per row ([kChunk][K][kLanes] lane partials, summed
// across lanes once per token rather than once per block); udo = u . do, wu = w . u ([kChunk]).
struct ColumnSums {
  std::vector<float> sd, du, sw, gg, udo, wu;
  explicit ColumnSums(int64_t K)
      : sd(kChunk * K * kLanes), du(kChunk * K * kLanes), sw(kChunk * K * kLanes),
        gg(kChunk * K * kLanes), udo(kChunk), wu(kChunk) {}
  void clear() {
    for (auto* v : {&sd, &du, &sw, &gg, &udo, &wu}) std::fill(v->begin(), v->end(), 0.f);
  }
  static float row(const std::vector<float>& lanes, int64_t s, int64_t K, int64_t i) {
    Vec v;
    vload(v, &lanes[(s * K + i) * kLanes]);
    return hsum(v);
  }
};

inline void accumulate(float* p, const Vec& v) {
  Vec x;
  vload(x, p);
  vstore(p, x + v);
}

// The token backward over tokens len-1 .. 0 of a chunk on one column block, from dSb (the
// gradient of the block's state after the chunk) to the gradient before it; w = dS_t^T k.
void backward_block(float* __restrict dSb, const Chunk& c, int64_t len, int64_t K, int64_t vp,
                    int64_t j0, float scale, const float* __restrict kept_Sp,
                    const float* __restrict kept_u, const float* __restrict do_rows,
                    float* __restrict dv_rows, ColumnSums& sums) {
  for (int64_t s = len - 1; s >= 0; --s) {
    const float* __restrict q = &c.q[s * K];
    const float* __restrict k = &c.k[s * K];
    const float* __restrict decay = &c.decay[s * K];
    const float* __restrict Sp = kept_Sp + s * K * kBlock;
    const float b = c.beta[s];
    Vec dov[kVecs], uv[kVecs], w2[2][kVecs] = {}, udo = {};
    for (int64_t m = 0; m < kVecs; ++m) {
      vload(dov[m], do_rows + s * vp + j0 + m * kLanes);
      vload(uv[m], kept_u + s * kBlock + m * kLanes);
      udo += uv[m] * dov[m];
    }
    sums.udo[s] += hsum(udo);

    // dS_t += scale q do^T (o_t reads S_t), then w, S'_t do and dS_t u.
    float* __restrict sd = &sums.sd[s * K * kLanes];
    float* __restrict du = &sums.du[s * K * kLanes];
    for (int64_t i = 0; i < K; ++i) {
      float* __restrict dSi = dSb + i * kBlock;
      const float qs = scale * q[i];
      Vec acc_sd = {}, acc_du = {};
      for (int64_t m = 0; m < kVecs; ++m) {
        Vec d, spv;
        vload(d, dSi + m * kLanes);
        vload(spv, Sp + i * kBlock + m * kLanes);
        d += qs * dov[m];
        vstore(dSi + m * kLanes, d);
        acc_sd += spv * dov[m];
        acc_du += d * uv[m];
        w2[i & 1][m] += k[i] * d;
      }
      accumulate(sd + i * kLanes, acc_sd);
      accumulate(du + i * kLanes, acc_du);
    }
    Vec w[kVecs], wu = {};
    for (int64_t m = 0; m < kVecs; ++m) {
      w[m] = w2[0][m] + w2[1][m];
      wu += w[m] * uv[m];
      vstore(dv_rows + s * vp + j0 + m * kLanes, b * w[m]);
    }
    sums.wu[s] += hsum(wu);

    // dS'_t = dS_t - beta k w^T; dS_{t-1} = Diag(exp g) dS'_t.
    float* __restrict sw = &sums.sw[s * K * kLanes];
    float* __restrict gg = &sums.gg[s * K * kLanes];
    for (int64_t i = 0; i < K; ++i) {
      float* __restrict dSi = dSb + i * kBlock;
      const float bk = b * k[i], e = decay[i];
      Vec acc_sw = {}, acc_g = {};
      for (int64_t m = 0; m < kVecs; ++m) {
        Vec d, spv;
        vload(d, dSi + m * kLanes);
        vload(spv, Sp + i * kBlock + m * kLanes);
        d -= bk * w[m];
        acc_sw += spv * w[m];
        acc_g += spv * d;
        vstore(dSi + m * kLanes, d * e);
      }
      accumulate(sw + i * kLanes, acc_sw);
      accumulate(gg + i * kLanes, acc_g);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Work distribution over (sequence, head) pairs.

template <typename Body>
void run_parallel(int64_t items, int64_t workers, const Body& body) {
  std::atomic<int64_t> next{0};
  auto work = [&](int64_t w) {
    for (int64_t item; (item = next.fetch_add(1)) < items;) body(w, item);
  };
  std::vector<std::thread> threads;
  for (int64_t w = 1; w < workers; ++w) {
    // A thread that cannot start only costs parallelism: the others claim its items.
    try {
      threads.emplace_back(work, w);
    } catch (const std::system_error&) {
      break;
    }
  }
  work(0);
  for (auto& th : threads) th.join();
}

int64_t worker_count(int64_t items) {
  const int64_t hw = std::max<unsigned>(1u, std::thread::hardware_concurrency());
  return std::max<int64_t>(1, std::min(hw, items));
}

// Zeroes the tokens outside every sequence, [0, c'[0]) and [c'[N], T) (docs/robustness.md §1).
void zero_uncovered(const Problem& p, const Tensor& t, int64_t width) {
  if (!p.params.is_varlen) return;
  const int64_t row_elems = p.shape.H * width;
  const size_t es = element_size(t.dtype);
  char* base = static_cast<char*>(t.data);
  const int64_t first = p.offsets.front(), last = p.offsets.back();
  std::memset(base, 0, first * row_elems * es);
  std::memset(base + last * row_elems * es, 0, (p.shape.T - last) * row_elems * es);
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Forward.

void kda_forward(const KdaShape& shape, const Attributes& params, const KdaInputs& in,
                 const KdaFwdOutputs& out) {
  const int64_t K = shape.K, V = shape.V;
  const Problem p(shape, params, in);
  const int64_t vp = p.vp;
  zero_uncovered(p, out.o, V);

  struct Scratch {
    Chunk chunk;
    ColumnCuts cuts;
    std::vector<float> S, o;
    Scratch(int64_t K, int64_t V, int64_t vp)
        : chunk(K, vp), cuts(V), S(K * vp), o(kChunk * vp) {}
  };
  const int64_t items = shape.N * shape.H;
  const int64_t workers = worker_count(items);
  std::vector<Scratch> scratch;
  scratch.reserve(workers);
  for (int64_t w = 0; w < workers; ++w) scratch.emplace_back(K, V, vp);

  run_parallel(items, workers, [&](int64_t w, int64_t item) {
    Scratch& sc = scratch[w];
    const int64_t n = item / shape.H, h = item % shape.H;
    const Span sp = p.span(n);
    sc.cuts.reset();
    p.load_state(in.initial_state, n, h, sc.S.data());
    for (int64_t start = sp.begin; start < sp.end; start += kChunk) {
      const int64_t len = std::min(kChunk, sp.end - start);
      const int64_t clean = prepare_chunk(p, sp.row, start, len, h, sc.cuts, sc.chunk);
      for (int64_t j0 = 0; j0 < vp; j0 += kBlock)
        forward_block<false, true>(&sc.S[j0 * K], sc.chunk, clean, K, vp, j0, params.scale,
                                   nullptr, nullptr, sc.o.data());
      for (int64_t s = 0; s < clean; ++s) {
        float* o = &sc.o[s * vp];
        // §3: a quarantined column of the state is the constant NaN, and so are its outputs.
        if (sc.cuts.any) sc.cuts.fill(start + s, o, kNaN);
        store_row(out.o, p.token(sp.row, start + s, h) * V, V, o);
      }
      if (clean < len) {
        // §3: from the first token that quarantines the head on, the state is the constant NaN.
        p.fill_tokens(out.o, V, sp.row, start + clean, sp.end, h, kNaN);
        p.fill_state(kNaN, n, h, out.final_state);
        return;
      }
    }
    if (sc.cuts.any) p.fill_cut_columns(sc.S.data(), sc.cuts, sp.end, kNaN);  // §3, as o
    p.store_state(sc.S.data(), n, h, out.final_state);
  });
}

// ---------------------------------------------------------------------------------------------
// Backward.

void kda_backward(const KdaShape& shape, const Attributes& params, const KdaInputs& in,
                  Tensor do_, const float* dfinal_state, const KdaBwdOutputs& out) {
  const int64_t K = shape.K, V = shape.V, H = shape.H;
  const Problem p(shape, params, in);
  const int64_t vp = p.vp, kv = p.state_size();
  for (const Tensor* t : {&out.dq, &out.dk, &out.dg}) zero_uncovered(p, *t, K);
  zero_uncovered(p, out.dv, V);
  zero_uncovered(p, out.dbeta, 1);

  const int64_t max_chunks = (p.max_len() + kChunk - 1) / kChunk;
  struct Scratch {
    Chunk chunk;
    ColumnCuts cuts;
    ColumnSums sums;
    std::vector<float> S, dS, checkpoints, Sp, u, do_rows, dv_rows, dq, dk, dg;
    Scratch(int64_t K, int64_t V, int64_t vp, int64_t max_chunks)
        : chunk(K, vp), cuts(V), sums(K), S(K * vp), dS(K * vp),
          checkpoints(max_chunks * K * vp),
          Sp(kChunk * K * kBlock), u(kChunk * kBlock), do_rows(kChunk * vp, 0.f),
          dv_rows(kChunk * vp), dq(K), dk(K), dg(K) {}
  };
  const int64_t items = shape.N * H;
  const int64_t workers = worker_count(items);
  std::vector<Scratch> scratch;
  scratch.reserve(workers);
  for (int64_t w = 0; w < workers; ++w) scratch.emplace_back(K, V, vp, max_chunks);
  // Gradients of the per-head parameters per (sequence, head), reduced into batch rows below
  // so that varlen sequences sharing row 0 never write the same memory concurrently.
  std::vector<double> dA_part(items, 0.0), dbias_part(items * K, 0.0);

  run_parallel(items, workers, [&](int64_t w_id, int64_t item) {
    Scratch& sc = scratch[w_id];
    const int64_t n = item / H, h = item % H;
    const Span sp = p.span(n);
    const float scale = params.scale;

    // Forward sweep: the state entering each chunk, up to `stop`, the first token that
    // quarantines the head (or the end of the sequence); it also finds the quarantined columns.
    int64_t stop = sp.end;
    sc.cuts.reset();
    p.load_state(in.initial_state, n, h, sc.S.data());
    for (int64_t start = sp.begin, c = 0; start < stop; start += kChunk, ++c) {
      std::copy(sc.S.begin(), sc.S.end(), sc.checkpoints.begin() + c * kv);
      const int64_t len = std::min(kChunk, sp.end - start);
      const int64_t clean = prepare_chunk(p, sp.row, start, len, h, sc.cuts, sc.chunk);
      if (clean < len) stop = start + clean;
      for (int64_t j0 = 0; j0 < vp; j0 += kBlock)
        forward_block<false, false>(&sc.S[j0 * K], sc.chunk, clean, K, vp, j0, 0.f, nullptr,
                                    nullptr, nullptr);
    }

    // §3: the sequence is differentiated as if it ended at stop - 1. The state at `stop` is a
    // constant (NaN), so neither the final-state cotangent nor any do from `stop` on reaches
    // an input, and every input from `stop` on gets a zero gradient.
    if (stop < sp.end) {
      for (const Tensor* t : {&out.dq, &out.dk, &out.dg})
        p.fill_tokens(*t, K, sp.row, stop, sp.end, h, 0.f);
      p.fill_tokens(out.dv, V, sp.row, stop, sp.end, h, 0.f);
      p.fill_tokens(out.dbeta, 1, sp.row, stop, sp.end, h, 0.f);
      std::fill(sc.dS.begin(), sc.dS.end(), 0.f);
    } else {
      p.load_state(dfinal_state, n, h, sc.dS.data());
      // Likewise per column: a quarantined column of the final state is a constant.
      if (sc.cuts.any) p.fill_cut_columns(sc.dS.data(), sc.cuts, sp.end, 0.f);
    }
    const int64_t chunks = (stop - sp.begin + kChunk - 1) / kChunk;
    double dA = 0.0;
    double* dbias = &dbias_part[item * K];
    const float a = params.gate_mode != GateMode::kLogDecay ? std::exp(in.A_log[h]) : 0.f;

    for (int64_t c = chunks - 1; c >= 0; --c) {
      const int64_t start = sp.begin + c * kChunk, len = std::min(kChunk, stop - start);
      const Chunk& ch = sc.chunk;
      prepare_chunk(p, sp.row, start, len, h, sc.cuts, sc.chunk);  // all run: they precede stop
      for (int64_t s = 0; s < len; ++s) {
        float* d_o = &sc.do_rows[s * vp];
        load_row(do_, p.token(sp.row, start + s, h) * V, V, d_o);
        // A quarantined column's outputs are constants too. With its cotangents dropped (and
        // its final-state one), the column's dS is exactly 0 from its first quarantined token
        // on, so its dv there is 0 and it adds exact zeros (its finite state times zero) to the
        // per-row sums: dq, dk, dg and dbeta there are those of the other columns alone.
        if (sc.cuts.any) sc.cuts.fill(start + s, d_o, 0.f);
      }
      sc.sums.clear();
      for (int64_t j0 = 0; j0 < vp; j0 += kBlock) {
        // Recompute the chunk on this block from its checkpoint, keeping S'_t and u_t.
        std::copy_n(&sc.checkpoints[c * kv + j0 * K], K * kBlock, sc.S.begin());
        forward_block<true, false>(sc.S.data(), ch, len, K, vp, j0, 0.f, sc.Sp.data(),
                                   sc.u.data(), nullptr);
        backward_block(&sc.dS[j0 * K], ch, len, K, vp, j0, scale, sc.Sp.data(), sc.u.data(),
                       sc.do_rows.data(), sc.dv_rows.data(), sc.sums);
      }

      // Finish each token's gradients and go back through the preprocessing.
      const ColumnSums& cs = sc.sums;
      for (int64_t s = 0; s < len; ++s) {
        const float* q = &ch.q[s * K];
        const float* k = &ch.k[s * K];
        const float* g = &ch.g[s * K];
        const float b = ch.beta[s];
        for (int64_t i = 0; i < K; ++i) {
          // S_t do = S'_t do + beta k (u . do)
          sc.dq[i] = scale * (ColumnSums::row(cs.sd, s, K, i) + b * k[i] * cs.udo[s]);
          sc.dk[i] = b * (ColumnSums::row(cs.du, s, K, i) - ColumnSums::row(cs.sw, s, K, i));
          // §2: a floored log-decay is a constant, with a zero gradient.
          sc.dg[i] = floored(g[i]) ? 0.f : ColumnSums::row(cs.gg, s, K, i);
        }
        if (params.use_qk_l2norm) {
          const float pq = dot(q, sc.dq.data(), K), pk = dot(k, sc.dk.data(), K);
          for (int64_t i = 0; i < K; ++i) {
            sc.dq[i] = ch.rq[s] * (sc.dq[i] - pq * q[i]);
            sc.dk[i] = ch.rk[s] * (sc.dk[i] - pk * k[i]);
          }
        }
        float dbeta = cs.wu[s];
        if (params.use_beta_sigmoid) dbeta *= b * (1.f - b);
        if (params.gate_mode != GateMode::kLogDecay) {
          const float* x = &ch.x[s * K];
          for (int64_t i = 0; i < K; ++i) {
            // A floored log-decay depends on nothing; its pre-activation may be infinite.
            if (floored(g[i])) continue;
            float dx;
            if (params.gate_mode == GateMode::kSoftplus) {
              dx = -sc.dg[i] * a * sigmoid(x[i]);
              dA += static_cast<double>(sc.dg[i]) * g[i];
            } else {
              const float sg = sigmoid(a * x[i]);
              dx = sc.dg[i] * params.lower_bound * sg * (1.f - sg) * a;
              // sigmoid'(a x) x -> 0 as x -> +-inf: a saturated gate (dx == 0) adds nothing,
              // where dx * x would be 0 * inf = NaN.
              if (dx != 0.f) dA += static_cast<double>(dx) * x[i];
            }
            dbias[i] += dx;
            sc.dg[i] = dx;
          }
        }
        const int64_t idx = p.token(sp.row, start + s, h);
        store_row(out.dq, idx * K, K, sc.dq.data());
        store_row(out.dk, idx * K, K, sc.dk.data());
        store_row(out.dv, idx * V, V, &sc.dv_rows[s * vp]);
        store_row(out.dg, idx * K, K, sc.dg.data());
        store_row(out.dbeta, idx, 1, &dbeta);
      }
    }
    p.store_state(sc.dS.data(), n, h, out.dinitial_state);
    dA_part[item] = dA;
  });

  std::fill(out.dA_log, out.dA_log + shape.B * H, 0.f);
  std::fill(out.ddt_bias, out.ddt_bias + shape.B * H * K, 0.f);
  for (int64_t item = 0; item < items; ++item) {
    const int64_t n = item / H, h = item % H;
    const int64_t row = params.is_varlen ? 0 : n;
    out.dA_log[row * H + h] += static_cast<float>(dA_part[item]);
    for (int64_t i = 0; i < K; ++i)
      out.ddt_bias[(row * H + h) * K + i] += static_cast<float>(dbias_part[item * K + i]);
  }
}

}  // namespace jax_flashkda::cpu
