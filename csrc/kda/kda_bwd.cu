// Hopper backward of Kimi Delta Attention (K = V = 128, chunks of 16 tokens), in four launches.
//
// 1. prep: the forward's prep kernel (kda_fwd.cu, prep_for_backward) recomputes the chunk
//    records the two chains read (Q̃, −W, K̃, Tβ, Aqk, e^{Γ_C}) and, for grad, T, L and the
//    l2norm scales in fp32 (PrepAux).
// 2. chains (grid: value blocks x heads x 2N): z < N re-runs the forward recurrence and stores
//    every chunk's incoming state S_c (bf16) and Vn = U − W S_c; z ≥ N runs the state gradient
//    backwards over chunks,
//        dVn = Aqkᵀ dO + K̃ dS',    dS = Diag(e^{Γ_C}) dS' + Q̃ᵀ dO − Wᵀ dVn,
//    storing each chunk's outgoing-state gradient dS' (bf16) and dVn, and dS_0 as the
//    initial-state gradient. Neither chain needs the other, so one launch runs both, which
//    halves the sequential part when few heads leave the GPU idle.
// 3. grad (grid: chunk slots x heads, token-parallel): from S_c, dS'_c, Vn, dVn and dO,
//        dQ̃ = dO S_cᵀ, dK̃ = Vn dS'ᵀ, dW = −dVn S_cᵀ, dAqk = dO Vnᵀ, dM = dW (K⊙e^Γ)ᵀ + dVn Vᵀ
//    (M = Tβ), then through T = (I+L)^-1, L and Aqk to q, k, β and Γ, the reverse in-chunk
//    cumulative sum to g, and the l2norm / sigmoid / gate backwards; per-chunk partial sums of
//    dA_log and ddt_bias.
// 4. reduce (grid: batch rows x heads): sums those partials in a fixed order, so the result is
//    bitwise reproducible (no atomics anywhere).
//
// Gate exactness: the chains only see e^{Γ_r}, e^{Γ_C−Γ_r} and e^{Γ_C} (all ≤ 1); the pair
// terms of L and Aqk and their gradients use e^{Γ_r−Γ_s} per element, factored into
// e^{Γ_r}·e^{−Γ_s} only when the safe gate bounds the span (≥ −80 over 16 tokens).
#include "kda/kda_bwd.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

#include "kda/chunks.cuh"
#include "kda/quarantine.cuh"
#include "kda/ptx.cuh"

namespace kda {
namespace {

constexpr int kC = kChunk;  // short name for the many 16-wide loops
constexpr int KD = 128;     // key channels
constexpr int VD = 128;     // value channels
constexpr int KP = KD + 8;  // bf16 row pitch (+16 bytes: conflict-free ldmatrix)
constexpr int FP = KD + 4;  // fp32 row pitch
constexpr float kLog2e = 1.4426950408889634f;

using R = Rec<KD>;  // the chunk record (chunks.cuh), written by prep_for_backward

size_t align256(size_t x) { return (x + 255) & ~size_t{255}; }

// Byte offsets of the workspace regions; per (head, slot) each.
struct WsLayout {
  size_t rec, aux, states, dstates, vn, dvn, pdt, pda, dead_rows, dead_cols, dead_v, total;
  explicit WsLayout(const FwdParams& p) {
    const size_t hs = static_cast<size_t>(chunk_slots(p)) * p.H;
    size_t off = 0;
    auto take = [&](size_t bytes) {
      const size_t at = off;
      off += align256(bytes);
      return at;
    };
    rec = take(hs * R::kBytes);
    aux = take(hs * sizeof(PrepAux));
    states = take(hs * VD * KD * 2);   // Sᵀ_c [V][K] bf16
    dstates = take(hs * VD * KD * 2);  // dS'ᵀ_c [V][K] bf16
    vn = take(hs * kC * VD * 2);       // Vn [16][V] bf16
    dvn = take(hs * kC * VD * 2);      // dVn [16][V] bf16
    pdt = take(hs * KD * 4);           // ddt_bias partials [K] f32
    pda = take(hs * 4);                // dA_log partials f32
    // docs/robustness.md §3, per (sequence, head): the first row with a non-finite q, k, β or
    // log-decay; then per value column the first with a non-finite v; then the first of those
    // over the head's columns (so that a clean head reads one int, not V). Adjacent: one memset.
    const size_t nh = static_cast<size_t>(p.N) * p.H;
    dead_rows = take(nh * 4 + nh * VD * 4 + nh * 4);
    dead_cols = dead_rows + nh * 4;
    dead_v = dead_cols + nh * VD * 4;
    total = off;
  }
};

__device__ __forceinline__ void store_f(void* base, DType t, size_t i, float x) {
  switch (t) {
    case DType::kBF16: static_cast<__nv_bfloat16*>(base)[i] = __float2bfloat16_rn(x); break;
    case DType::kF16: static_cast<__half*>(base)[i] = __float2half_rn(x); break;
    default: static_cast<float*>(base)[i] = x;
  }
}

template <typename Tin>
__device__ __forceinline__ Tin from_float(float x) {
  if constexpr (std::is_same_v<Tin, __half>) return __float2half_rn(x);
  else return __float2bfloat16_rn(x);
}

// ---------------------------------------------------------------------------------------------
constexpr int kH = kC / 2;  // token rows per thread in grad (two threads per channel)

// Sums, per token half, acc[i] (i < 16) over that half's 128 threads into out[16·hh + i].
__device__ __forceinline__ void half_sum16(float (&acc)[16], float (*red)[32], float* out) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int w = 8 >> i;
    const bool upper = lane & w;
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      if (j >= w) break;
      const float send = upper ? acc[j] : acc[j + w];
      const float keep = upper ? acc[j + w] : acc[j];
      acc[j] = keep + __shfl_xor_sync(0xffffffffu, send, w);
    }
  }
  acc[0] += __shfl_xor_sync(0xffffffffu, acc[0], 16);
  if (lane < 16) red[warp][lane] = acc[0];
  __syncthreads();
  if (threadIdx.x < 32) {
    const int half = threadIdx.x >> 4, i = threadIdx.x & 15;
    out[threadIdx.x] = (red[4 * half][i] + red[4 * half + 1][i]) +
                       (red[4 * half + 2][i] + red[4 * half + 3][i]);
  }
  __syncthreads();
}

// The m16n8k8 tf32 A fragment of rows [0, 16), columns [k0, k0+8) of a row-major fp32 matrix,
// scaled by sc and split for 3xTF32 (g = lane/4, t = lane%4).
template <int P>
__device__ __forceinline__ void frag_a_tf32(const float (*m)[P], int k0, float sc, int g, int t,
                                            uint32_t (&hi)[4], uint32_t (&lo)[4]) {
  const float v[4] = {m[g][k0 + t], m[g + 8][k0 + t], m[g][k0 + t + 4], m[g + 8][k0 + t + 4]};
#pragma unroll
  for (int e = 0; e < 4; ++e) ptx::split_tf32(sc * v[e], hi[e], lo[e]);
}

// The raw rows of q, k and the gate input, copied into shared memory as stored (16 bytes at a
// time: the per-thread 2-byte loads they replace cost ~12 address instructions each).
struct ChunkRows {
  uint8_t q[kC][KD * 2], k[kC][KD * 2], g[kC][KD * 4];
};

// Rows past the sequence copy the first row; their values are masked where they are read.
template <typename Tin>
__device__ __forceinline__ void copy_chunk_rows(const FwdParams& p, const Chunk& ch, int h,
                                                ChunkRows& rows) {
  const int tid = threadIdx.x, row = tid >> 4, c = tid & 15;
  const size_t at = (static_cast<size_t>(ch.row0 + (row < ch.len ? row : 0)) * p.H + h) * KD;
  ptx::cp_async16(&rows.q[row][c * 16], static_cast<const uint8_t*>(p.q) + at * sizeof(Tin) + c * 16);
  ptx::cp_async16(&rows.k[row][c * 16], static_cast<const uint8_t*>(p.k) + at * sizeof(Tin) + c * 16);
  const int gbytes = p.g_dtype == DType::kF32 ? 4 : 2;
  const uint8_t* g = static_cast<const uint8_t*>(p.g) + at * gbytes;
  ptx::cp_async16(&rows.g[row][c * 16], g + c * 16);
  if (gbytes == 4) ptx::cp_async16(&rows.g[row][(c + 16) * 16], g + (c + 16) * 16);
}

// Key channel d = tid % 128, rows r0 + j, r0 = 8·(tid / 128): q, k (not yet normalised), the gate
// input + dt_bias, and Γ summed over this half's rows only, with that total in half_sum[hh][d]
// (after a barrier the caller adds the first half's total to the second half). Tokens past the
// sequence act as q = k = g = 0, which changes nothing for the real ones.
template <typename Tin>
__device__ __forceinline__ void read_half(const FwdParams& p, const Chunk& ch, int h,
                                          const ChunkRows& rows, float (*half_sum)[KD],
                                          float (&qn)[kH], float (&kn)[kH], float (&G)[kH],
                                          float (&xg)[kH]) {
  const int tid = threadIdx.x, d = tid & (KD - 1), hh = tid >> 7, r0 = hh * kH;
  const float a_exp = p.gate_mode ? __expf(p.A_log[h]) : 0.f;
  const float dtb = p.gate_mode ? p.dt_bias[h * KD + d] : 0.f;
  const bool g32 = p.g_dtype == DType::kF32;
  float cum = 0.f;
#pragma unroll
  for (int j = 0; j < kH; ++j) {
    const int r = r0 + j;
    const bool ok = r < ch.len;
    qn[j] = ok ? to_float(reinterpret_cast<const Tin*>(rows.q[r])[d]) : 0.f;
    kn[j] = ok ? to_float(reinterpret_cast<const Tin*>(rows.k[r])[d]) : 0.f;
    const uint32_t bits = g32 ? reinterpret_cast<const uint32_t*>(rows.g[r])[d]
                              : reinterpret_cast<const uint16_t*>(rows.g[r])[d];
    const float graw = bits_to_float(bits, p.g_dtype);
    const float gv = log_decay(p, graw, a_exp, dtb);
    cum += ok ? gv : 0.f;
    G[j] = cum;
    xg[j] = graw + dtb;
  }
  half_sum[hh][d] = cum;
}

// ---------------------------------------------------------------------------------------------
// Kernel 2: the two chains. CTA = (value block of 16·NW columns, head, sequence and direction);
// warp w owns value columns [16w, 16w+16) of the block and keeps its slice of S (or dS)
// transposed in fp32 mma accumulators: s[nt][0..1] = (value g, key 8nt+2t+{0,1}),
// s[nt][2..3] the same at value g+8 (g = lane/4, t = lane%4).
template <int NW, int kStages_>
struct ChainSmem {
  static constexpr int BV = 16 * NW;
  static constexpr int VP = BV + 8;
  static constexpr int kStage = R::kBytes + kC * VP * 2;  // record + 16 rows of V or dO
  static constexpr int kStages = kStages_;
  static constexpr int kRowPitch = 24;
  static constexpr int kRowStage = kStages * kStage;  // per warp [16][24] bf16
  static constexpr int kStateTile = kRowStage + NW * kC * kRowPitch * 2;  // per warp [16][K] bf16
  static constexpr int kBar = kStateTile + NW * kC * KD * 2;
  static constexpr int kBytes = kBar + 2 * kStages * 8;  // "full" and "empty" barriers
};

// The stored states are Sᵀ [value][key] bf16 with the 16-byte key chunks of each row permuted:
// chunk c of value row v sits at chunk c ^ (v % 8). That is the chains' conflict-free
// shared-memory tile, copied out as is; the grad kernel undoes it as it loads.
__device__ __forceinline__ int state_chunk(int v, int c) { return c ^ (v & 7); }

template <int NW, int kStages_, int kMinBlocks, typename Tin>
__global__ void __launch_bounds__(NW * 32, kMinBlocks) kda_bwd_chains_kernel(
    BwdParams p, const uint8_t* __restrict__ recs, __nv_bfloat16* __restrict__ states,
    __nv_bfloat16* __restrict__ dstates, __nv_bfloat16* __restrict__ vn_out,
    __nv_bfloat16* __restrict__ dvn_out, const int* __restrict__ dead_rows,
    const int* __restrict__ dead_cols, int slots) {
  using L = ChainSmem<NW, kStages_>;
  constexpr int BV = L::BV, VP = L::VP, kStages = L::kStages, RP = L::kRowPitch;
  extern __shared__ __align__(128) uint8_t smem[];
  using Ring = StepRing<kStages, NW, L::kStage, L::kBar>;
  const Ring ring{smem};

  const bool reverse = blockIdx.z >= static_cast<unsigned>(p.N);
  const int vb = blockIdx.x, h = blockIdx.y, n = reverse ? blockIdx.z - p.N : blockIdx.z;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int g = lane >> 2, t = lane & 3;
  const Seq sq = seq_of(p, n);
  const int nch = (sq.len + kC - 1) / kC;
  const uint8_t* rec0 = recs + (static_cast<size_t>(h) * slots + sq.slot0) * R::kBytes;
  const Tin* rows_src = static_cast<const Tin*>(reverse ? p.dout : p.v);
  auto chunk_at = [&](int i) { return reverse ? nch - 1 - i : i; };

  // Warp 0 fetches step i's record with one bulk copy; each warp fetches its own 16 columns of
  // the step's 16 rows of V (or dO) with one cp.async per lane (row copies through the bulk
  // engine serialised warp 0). Rows past the sequence repeat its first row: finite values that
  // meet zero columns of Tβ (zero rows of Q̃ and Aqk).
  // The forward chain reads neither Q̃ nor Aqk: it skips Q̃, the record's first 30%.
  static_assert(R::kQ == 0 && R::kW == R::kMat && R::kAqk > R::kW, "record layout");
  const uint32_t rec_first = reverse ? 0 : R::kW;
  auto fetch_record = [&](int i) {
    ring.fetch_record(i, rec0 + static_cast<size_t>(chunk_at(i)) * R::kBytes, rec_first,
                      R::kBytes, lane);
  };
  auto fetch_rows = [&](int i) {
    const int c = chunk_at(i);
    ptx::warp_tile16_cp_async(
        reinterpret_cast<Tin*>(ring.stage(i) + R::kBytes) + warp * 16, VP,
        rows_src + (static_cast<size_t>(sq.row0 + c * kC) * p.H + h) * VD + vb * BV + warp * 16,
        static_cast<size_t>(p.H) * VD, sq.len - c * kC, lane);
  };
  ring.start(nch, warp, fetch_record, fetch_rows);

  float s[KD / 8][4];
  const size_t st_base = (static_cast<size_t>(n) * p.H + h) * KD * VD;
  const int v_lo = vb * BV + warp * 16 + g;
  auto st_index = [&](int nt, int j) {
    return state_index<KD>(p, st_base, v_lo + (j >> 1) * 8, nt * 8 + t * 2 + (j & 1));
  };
  const float* s0 = reverse ? p.dfinal_state : p.initial_state;
#pragma unroll
  for (int nt = 0; nt < KD / 8; ++nt)
#pragma unroll
    for (int j = 0; j < 4; ++j) s[nt][j] = s0[st_index(nt, j)];

  // docs/robustness.md §3 (quarantine.cuh): the first dead row of the head, and of each of the
  // warp's 16 value columns; warp_dead, the first of them all, is all a clean chain keeps in
  // registers (the columns' rows are read again only in a chunk that reaches it).
  const int* dead_col = dead_cols + (static_cast<size_t>(n) * p.H + h) * VD + vb * BV + warp * 16;
  const int dead_head = dead_rows[n * p.H + h];
  const int warp_dead = __reduce_min_sync(0xffffffffu, min(dead_head, dead_col[lane & 15]));
  if (reverse) {
    // A dead column's final state is a constant NaN: its cotangent reaches nothing.
    const int dead_g[2] = {min(dead_head, dead_col[g]), min(dead_head, dead_col[g + 8])};
#pragma unroll
    for (int nt = 0; nt < KD / 8; ++nt)
#pragma unroll
      for (int j = 0; j < 4; ++j)
        if (dead_g[j >> 1] != kNoDeadRow) s[nt][j] = 0.f;
  }

  __nv_bfloat16* rstage = reinterpret_cast<__nv_bfloat16*>(smem + L::kRowStage) + warp * kC * RP;
  __nv_bfloat16* tile = reinterpret_cast<__nv_bfloat16*>(smem + L::kStateTile) + warp * kC * KD;
  __nv_bfloat16* st_out = reverse ? dstates : states;
  __nv_bfloat16* row_out = reverse ? dvn_out : vn_out;
  const int brow = (lane & 7) + ((lane >> 4) & 1) * 8, bcol = ((lane >> 3) & 1) * 8;
  const int krow = (lane & 7) + ((lane >> 3) & 1) * 8;

  for (int i = 0; i < nch; ++i) {
    ring.refill(i, nch, warp, fetch_record, fetch_rows);
    const int c = chunk_at(i);
    const size_t hs = static_cast<size_t>(h) * slots + sq.slot0 + c;

    // The state (gradient) this chunk starts from, as bf16 Sᵀ rows [value][key]. The warp's 16
    // value rows are 4 KB of contiguous global memory: the fragments go to its shared tile
    // (stmatrix) and leave as 16-byte row pieces, 8 full-line stores per lane. ncu: the 32
    // 4-byte stores per lane and step these replace were the chains' largest stall (LSU queue
    // full), and a bulk copy of the tile spent half the kernel waiting for it to be read.
    {
      __syncwarp();  // every lane has read the previous step's tile
#pragma unroll
      for (int nt = 0; nt < KD / 8; nt += 2) {
        const int row = (lane & 7) + ((lane >> 3) & 1) * 8, c = nt + (lane >> 4);
        const uint32_t f[4] = {ptx::pack_bf16(s[nt][0], s[nt][1]), ptx::pack_bf16(s[nt][2], s[nt][3]),
                               ptx::pack_bf16(s[nt + 1][0], s[nt + 1][1]),
                               ptx::pack_bf16(s[nt + 1][2], s[nt + 1][3])};
        ptx::stsm_x4(tile + row * KD + state_chunk(row, c) * 8, f);
      }
      __syncwarp();
      uint4* dst = reinterpret_cast<uint4*>(st_out + (hs * VD + v_lo - g) * KD);
#pragma unroll
      for (int j = 0; j < kC * KD / 8 / 32; ++j)
        dst[j * 32 + lane] = reinterpret_cast<const uint4*>(tile)[j * 32 + lane];
    }

    ring.wait(i);
    const uint8_t* st = ring.stage(i);
    const RecView<KD, Tin, Tin> record(st);
    const Tin* rs = reinterpret_cast<const Tin*>(st + R::kBytes);
    const long long row0 = sq.row0 + static_cast<long long>(c) * kC;
    // V (or dO) at dead places acts as 0; a chunk wholly past the head's first dead row keeps
    // the state (gradient) as it is, whatever its records hold.
    if (warp_dead < row0 + kC)
      zero_dead16(const_cast<Tin*>(rs) + warp * 16, VP, row0, dead_head, dead_col, lane);
    const bool live_chunk = row0 < dead_head;

    // Rows of this step (transposed, [value][token]): Vnᵀ = Vᵀ(Tβ)ᵀ + Sᵀ(−W)ᵀ forwards,
    // dVnᵀ = dOᵀ Aqk + dS'ᵀ K̃ᵀ backwards. Two accumulator sets halve the dependent chain.
    uint32_t ar[4];
    ptx::ldsm_x4_trans(ar, rs + brow * VP + warp * 16 + bcol);
    float x0[2][4] = {}, x1[2][4] = {};
    {
      uint32_t b[4];
      if (reverse) ptx::ldsm_x4_trans(b, record.aqk + krow * kC + (lane >> 4) * 8);
      else ptx::ldsm_x4(b, record.tb + brow * kC + bcol);
      ptx::mma16816<Tin>(x1[0], ar, b[0], b[1]);
      ptx::mma16816<Tin>(x1[1], ar, b[2], b[3]);
    }
    const __nv_bfloat16* red_rows = reverse ? record.kt : record.w;
#pragma unroll
    for (int ks = 0; ks < KD / 16; ++ks) {
      float (&acc)[2][4] = (ks & 1) ? x1 : x0;
      const uint32_t a[4] = {ptx::pack_bf16(s[2 * ks][0], s[2 * ks][1]),
                             ptx::pack_bf16(s[2 * ks][2], s[2 * ks][3]),
                             ptx::pack_bf16(s[2 * ks + 1][0], s[2 * ks + 1][1]),
                             ptx::pack_bf16(s[2 * ks + 1][2], s[2 * ks + 1][3])};
      uint32_t b[4];
      ptx::ldsm_x4(b, red_rows + brow * KP + ks * 16 + bcol);
      ptx::mma16816<__nv_bfloat16>(acc[0], a, b[0], b[1]);
      ptx::mma16816<__nv_bfloat16>(acc[1], a, b[2], b[3]);
    }
#pragma unroll
    for (int a = 0; a < 2; ++a)
#pragma unroll
      for (int j = 0; j < 4; ++j) x0[a][j] += x1[a][j];
    const uint32_t ax[4] = {ptx::pack_bf16(x0[0][0], x0[0][1]), ptx::pack_bf16(x0[0][2], x0[0][3]),
                            ptx::pack_bf16(x0[1][0], x0[1][1]), ptx::pack_bf16(x0[1][2], x0[1][3])};

    // State step: Sᵀ ← Sᵀ·Diag(e^{Γ_C}) + VnᵀK̃ forwards;
    // dSᵀ ← dS'ᵀ·Diag(e^{Γ_C}) + dOᵀQ̃ + dVnᵀ(−W) backwards.
    if (live_chunk) {
#pragma unroll
      for (int nt = 0; nt < KD / 8; nt += 2) {
        const float2 e0 = *reinterpret_cast<const float2*>(record.eg + nt * 8 + t * 2);
        const float2 e1 = *reinterpret_cast<const float2*>(record.eg + nt * 8 + 8 + t * 2);
        s[nt][0] *= e0.x; s[nt][1] *= e0.y; s[nt][2] *= e0.x; s[nt][3] *= e0.y;
        s[nt + 1][0] *= e1.x; s[nt + 1][1] *= e1.y; s[nt + 1][2] *= e1.x; s[nt + 1][3] *= e1.y;
        uint32_t b[4];
        ptx::ldsm_x4_trans(b, (reverse ? record.w : record.kt) + krow * KP + (nt + (lane >> 4)) * 8);
        ptx::mma16816<__nv_bfloat16>(s[nt], ax, b[0], b[1]);
        ptx::mma16816<__nv_bfloat16>(s[nt + 1], ax, b[2], b[3]);
        if (reverse) {
          uint32_t bq[4];
          ptx::ldsm_x4_trans(bq, record.q + krow * KP + (nt + (lane >> 4)) * 8);
          ptx::mma16816<Tin>(s[nt], ar, bq[0], bq[1]);
          ptx::mma16816<Tin>(s[nt + 1], ar, bq[2], bq[3]);
        }
      }
    }

    // The rows, [token][value] in shared memory, then one 16-byte store per lane.
#pragma unroll
    for (int nt = 0; nt < 2; ++nt)
#pragma unroll
      for (int j = 0; j < 4; ++j)
        rstage[(nt * 8 + t * 2 + (j & 1)) * RP + g + (j >> 1) * 8] = __float2bfloat16_rn(x0[nt][j]);
    __syncwarp();
    ring.release(i, lane);
    {
      const int tok = lane >> 1, half = lane & 1;
      *reinterpret_cast<uint4*>(row_out + (hs * kC + tok) * VD + vb * BV + warp * 16 + half * 8) =
          *reinterpret_cast<const uint4*>(rstage + tok * RP + half * 8);
    }
    __syncwarp();
  }

  if (reverse) {
#pragma unroll
    for (int nt = 0; nt < KD / 8; ++nt)
#pragma unroll
      for (int j = 0; j < 4; ++j) p.dinitial_state[st_index(nt, j)] = s[nt][j];
  }
}


// ---------------------------------------------------------------------------------------------
// Kernel 3: the per-chunk gradients. CTA = (chunk slot, head) of 256 threads: thread
// (hh, d) = (tid / 128, tid % 128) owns key channel d (and value channel d for dv) for the 8
// token rows [8hh, 8hh+8), which halves the per-thread serial work and the registers, so that
// 16 warps share an SM. Warp w computes keys [16w, 16w+16) of the 16xK products.
struct GradSmem {
  __nv_bfloat16 S[VD][KP];   // Sᵀ_c; then dQ̃, dK̃, dW, dM, Xm in fp32
  __nv_bfloat16 dS[VD][KP];  // dS'ᵀ_c; then per-token channel rows in fp32
  __nv_bfloat16 dO[kC][KP], Vn[kC][KP], dVn[kC][KP], V[kC][KP];
  ChunkRows rows;
  PrepAux aux;
  // Rows and columns (transposed copies) for whole-row broadcast reads; zeros off the support.
  float dAqk[kC][kC], dAqkT[kC][kC];  // r ≥ s
  float dLb[kC][kC], dLbT[kC][kC];    // β_r·dL[r][s], r > s
  float dMv[kC][kC + 1];
  float beta[kC], dbl[kC], dots[2 * kC];
  float dD[KD];  // rowsum(S_c ⊙ dS'), the gradient of e^{Γ_C}
  float xch[2][KD];  // per-channel values handed between the two token halves
  float red[8][32];
};
// The grad kernel's eight per-warp partial products of dM overwrite dO and Vn once both are dead.
static_assert(offsetof(GradSmem, Vn) == offsetof(GradSmem, dO) + sizeof(GradSmem::dO) &&
                  sizeof(GradSmem::dO) + sizeof(GradSmem::Vn) >= 8 * kC * kC * sizeof(float),
              "dM's partial products need dO and Vn side by side");

template <bool kFactored, typename Tin>
__global__ void __launch_bounds__(2 * KD, 2) kda_bwd_grad_kernel(
    BwdParams p, const PrepAux* __restrict__ auxs, const __nv_bfloat16* __restrict__ states,
    const __nv_bfloat16* __restrict__ dstates, const __nv_bfloat16* __restrict__ vn,
    const __nv_bfloat16* __restrict__ dvn, float* __restrict__ pdt, float* __restrict__ pda,
    const int* __restrict__ dead_rows, const int* __restrict__ dead_cols,
    const int* __restrict__ dead_v, int slots) {
  extern __shared__ __align__(128) uint8_t smem_raw[];
  GradSmem& sg = *reinterpret_cast<GradSmem*>(smem_raw);
  const int tid = threadIdx.x, d = tid & (KD - 1), hh = tid >> 7, r0 = hh * kH;
  const int lane = tid & 31, warp = tid >> 5, g = lane >> 2, t = lane & 3;
  const int slot = blockIdx.x, h = blockIdx.y;
  const size_t hs = static_cast<size_t>(h) * slots + slot;
  const Chunk ch = locate(p, slot);
  if (ch.len == 0) {  // unused slots still write their (zero) partial sums
    if (tid < KD) pdt[hs * KD + d] = 0.f;
    if (tid == 0) pda[hs] = 0.f;
    return;
  }
  // docs/robustness.md §3: rows from the head's first dead one on read as q = k = g = β = 0
  // (live.len is where they start), and V and dO at dead (row, column) places as 0, so that
  // every gradient there is 0 and none of them reaches a live row; dead rows write zeros.
  const int dead_head = dead_rows[ch.n * p.H + h];
  Chunk live = ch;
  live.len = static_cast<int>(
      dead_head <= ch.row0 ? 0 : (dead_head - ch.row0 < ch.len ? dead_head - ch.row0 : ch.len));

  {
    const uint8_t* src = reinterpret_cast<const uint8_t*>(auxs + hs);
    for (int i = tid; i < static_cast<int>(sizeof(PrepAux) / 16); i += 2 * KD)
      ptx::cp_async16(reinterpret_cast<uint8_t*>(&sg.aux) + i * 16, src + i * 16);
    copy_chunk_rows<Tin>(p, ch, h, sg.rows);
    ptx::cp_async_commit();
    const __nv_bfloat16* sgl = states + hs * VD * KD;
    const __nv_bfloat16* dsgl = dstates + hs * VD * KD;
#pragma unroll
    for (int i = tid; i < VD * KD / 8; i += 2 * KD) {
      const int row = i >> 4, col = (i & 15) * 8;
      const int at = row * KD + state_chunk(row, col / 8) * 8;
      ptx::cp_async16(&sg.S[row][col], sgl + at);
      ptx::cp_async16(&sg.dS[row][col], dsgl + at);
    }
    const int row = tid >> 4, col = (tid & 15) * 8;
    ptx::cp_async16(&sg.Vn[row][col], vn + (hs * kC + row) * VD + col);
    ptx::cp_async16(&sg.dVn[row][col], dvn + (hs * kC + row) * VD + col);
    ptx::cp_async_commit();
  }
  // dO and V rows wait in registers while the chunk inputs load.
  uint4 dor, vr;
  {
    const int row = tid >> 4, col = (tid & 15) * 8;
    const bool ok = row < live.len;
    const size_t at = (static_cast<size_t>(ch.row0 + (ok ? row : 0)) * p.H + h) * VD + col;
    const uint4 zero = make_uint4(0, 0, 0, 0);
    dor = ok ? *reinterpret_cast<const uint4*>(static_cast<const Tin*>(p.dout) + at) : zero;
    vr = ok ? *reinterpret_cast<const uint4*>(static_cast<const Tin*>(p.v) + at) : zero;
    uint32_t dead = 0;
    if (ch.row0 + row >= dead_v[ch.n * p.H + h]) {
      const int* dead_col = dead_cols + (static_cast<size_t>(ch.n) * p.H + h) * VD + col;
#pragma unroll
      for (int e = 0; e < 8; ++e)
        if (ch.row0 + row >= dead_col[e]) dead |= 1u << e;
    }
    if (dead) {
      dor = zero_elements8(dor, dead);
      vr = zero_elements8(vr, dead);
    }
  }

  if (tid < kC) {
    float b = 0.f;
    if (tid < live.len) {
      b = load_f(p.beta, p.beta_dtype, static_cast<size_t>(ch.row0 + tid) * p.H + h);
      if (p.use_beta_sigmoid) b = sigmoid_f(b);
    }
    sg.beta[tid] = b;
  }
  {
    const int row = tid >> 4, col = (tid & 15) * 8;
    auto put_bf16 = [&](__nv_bfloat16* dst, uint4 x) {
      if constexpr (std::is_same_v<Tin, __half>) {
        const __half* hx = reinterpret_cast<const __half*>(&x);
        uint32_t w[4];
#pragma unroll
        for (int e = 0; e < 4; ++e)
          w[e] = ptx::pack_bf16(__half2float(hx[2 * e]), __half2float(hx[2 * e + 1]));
        x = make_uint4(w[0], w[1], w[2], w[3]);
      }
      *reinterpret_cast<uint4*>(dst) = x;  // products below take bf16 operands
    };
    put_bf16(&sg.dO[row][col], dor);
    put_bf16(&sg.V[row][col], vr);
  }
  ptx::cp_async_wait<0>();
  __syncthreads();
  const PrepAux& aux = sg.aux;
  float qn[kH], kn[kH], G[kH], xg[kH];
  read_half<Tin>(p, live, h, sg.rows, sg.xch, qn, kn, G, xg);
  if (p.use_qk_l2norm) {
#pragma unroll
    for (int j = 0; j < kH; ++j) {
      qn[j] *= aux.rn[r0 + j];
      kn[j] *= aux.rn[kC + r0 + j];
    }
  }

  // dQ̃ = dO·S_cᵀ, dK̃ = Vn·dS'ᵀ, −dW = dVn·S_cᵀ (16 x 16 per warp, reduced over values);
  // warp 0 also dAqk = dO·Vnᵀ, warp 1 dMv = dVn·Vᵀ. dD = diag(S_cᵀ·dS') from the warp's
  // diagonal 16x16 block, whose operands are the S_c and dS' fragments already loaded.
  float aq[2][4] = {}, ak[2][4] = {}, aw[2][4] = {}, a16[2][4] = {}, dd[2][4] = {};
  {
    const int arow = (lane & 7) + ((lane >> 3) & 1) * 8, acol = (lane >> 4) * 8;
    const int krow = (lane & 7) + ((lane >> 3) & 1) * 8;
    const int brow = (lane & 7) + ((lane >> 4) & 1) * 8, bcol = ((lane >> 3) & 1) * 8;
    const __nv_bfloat16* bsrc = warp == 0 ? &sg.Vn[0][0] : &sg.V[0][0];
    const int col = warp * 16 + (lane >> 4) * 8;
#pragma unroll
    for (int ks = 0; ks < VD / 16; ++ks) {
      uint32_t fo[4], fv[4], fd[4], bs[4], bd[4];
      ptx::ldsm_x4(fo, &sg.dO[arow][ks * 16 + acol]);
      ptx::ldsm_x4(fv, &sg.Vn[arow][ks * 16 + acol]);
      ptx::ldsm_x4(fd, &sg.dVn[arow][ks * 16 + acol]);
      ptx::ldsm_x4_trans(bs, &sg.S[ks * 16 + krow][col]);
      ptx::ldsm_x4_trans(bd, &sg.dS[ks * 16 + krow][col]);
      ptx::mma16816<__nv_bfloat16>(aq[0], fo, bs[0], bs[1]);
      ptx::mma16816<__nv_bfloat16>(aq[1], fo, bs[2], bs[3]);
      ptx::mma16816<__nv_bfloat16>(aw[0], fd, bs[0], bs[1]);
      ptx::mma16816<__nv_bfloat16>(aw[1], fd, bs[2], bs[3]);
      ptx::mma16816<__nv_bfloat16>(ak[0], fv, bd[0], bd[1]);
      ptx::mma16816<__nv_bfloat16>(ak[1], fv, bd[2], bd[3]);
      const uint32_t st[4] = {bs[0], bs[2], bs[1], bs[3]};  // the S_cᵀ block as an A operand
      ptx::mma16816<__nv_bfloat16>(dd[0], st, bd[0], bd[1]);
      ptx::mma16816<__nv_bfloat16>(dd[1], st, bd[2], bd[3]);
      if (warp < 2) {
        uint32_t af[4], bb[4];
#pragma unroll
        for (int e = 0; e < 4; ++e) af[e] = warp == 0 ? fo[e] : fd[e];
        ptx::ldsm_x4(bb, bsrc + brow * KP + ks * 16 + bcol);
        ptx::mma16816<__nv_bfloat16>(a16[0], af, bb[0], bb[1]);
        ptx::mma16816<__nv_bfloat16>(a16[1], af, bb[2], bb[3]);
      }
    }
  }
  // The diagonal: key g of the block sits in lanes with g = 2t + (g & 1), at column 2t + (g & 1)
  // of n-tile 0 (row g) and of n-tile 1 (row g + 8).
  if ((g >> 1) == t) {
    sg.dD[warp * 16 + g] = dd[0][g & 1];
    sg.dD[warp * 16 + 8 + g] = dd[1][2 + (g & 1)];
  }
  // A = Diag(β)·Tᵀ as m16n8k8 tf32 fragments (columns k0..k0+7), split for 3xTF32: the left
  // factor of dv = Diag(β)·Tᵀ·dVn and, on the factored path, of dK through W = Tβ·(K⊙e^Γ).
  auto frag_bt = [&](int k0, uint32_t (&hi)[4], uint32_t (&lo)[4]) {
    const float v[4] = {sg.beta[g] * aux.T[k0 + t][g], sg.beta[g + 8] * aux.T[k0 + t][g + 8],
                        sg.beta[g] * aux.T[k0 + t + 4][g],
                        sg.beta[g + 8] * aux.T[k0 + t + 4][g + 8]};
#pragma unroll
    for (int e = 0; e < 4; ++e) ptx::split_tf32(v[e], hi[e], lo[e]);
  };
  // dv = Diag(β)·Tᵀ·dVn, warp w taking values [16w, 16w+16); dVn (bf16) is exact in tf32, so
  // two products (T's two parts) keep fp32 accuracy.
  {
    float acc[2][4] = {};
#pragma unroll
    for (int k0 = 0; k0 < kC; k0 += 8) {
      uint32_t th[4], tl[4];
      frag_bt(k0, th, tl);
#pragma unroll
      for (int nt = 0; nt < 2; ++nt) {
        const int col = warp * 16 + nt * 8 + g;
        const uint32_t b0 = static_cast<uint32_t>(__bfloat16_as_ushort(sg.dVn[k0 + t][col])) << 16;
        const uint32_t b1 = static_cast<uint32_t>(__bfloat16_as_ushort(sg.dVn[k0 + t + 4][col]))
                            << 16;
        ptx::mma1688_tf32(acc[nt], tl, b0, b1);
        ptx::mma1688_tf32(acc[nt], th, b0, b1);
      }
    }
    Tin* dvp = static_cast<Tin*>(p.dv);
#pragma unroll
    for (int nt = 0; nt < 2; ++nt)
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const int s = g + half * 8, col = warp * 16 + nt * 8 + 2 * t;
        if (s < ch.len) {
          const bool ok = s < live.len;
          __align__(4) Tin pair[2] = {from_float<Tin>(ok ? acc[nt][2 * half] : 0.f),
                                      from_float<Tin>(ok ? acc[nt][2 * half + 1] : 0.f)};
          *reinterpret_cast<uint32_t*>(dvp + (static_cast<size_t>(ch.row0 + s) * p.H + h) * VD +
                                       col) = *reinterpret_cast<const uint32_t*>(pair);
        }
      }
  }
  __syncthreads();  // S and dS' are dead from here on
  // Γ and Γ_C over the whole chunk from the two halves' sums.
  const float gc = sg.xch[0][d] + sg.xch[1][d];
  const float dD = hh == 0 ? sg.dD[d] : 0.f;  // the first half carries dD
  if (hh == 1) {
#pragma unroll
    for (int j = 0; j < kH; ++j) G[j] += sg.xch[0][d];
  }

  float (*dQt)[FP] = reinterpret_cast<float(*)[FP]>(&sg.S[0][0]);
  float (*dKt)[FP] = dQt + kC;
  float (*dWm)[FP] = dQt + 2 * kC;
  float (*dM)[kC + 1] = reinterpret_cast<float(*)[kC + 1]>(&dQt[3 * kC][0]);
  float (*Xm)[kC + 1] = dM + kC;
  // Per-token channel rows for the other half and for dM: K⊙e^Γ always; the factored pair
  // terms also read k⊙e^{−Γ} and q⊙e^Γ, the exact ones scale·q, k and Γ.
  float (*KG)[FP] = reinterpret_cast<float(*)[FP]>(&sg.dS[0][0]);
  float (*R1)[FP] = KG + kC;
  float (*R2)[FP] = KG + 2 * kC;
  float (*R3)[FP] = KG + 3 * kC;
#pragma unroll
  for (int j = 0; j < 2; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int row = g + (e >> 1) * 8, key = warp * 16 + j * 8 + 2 * t + (e & 1);
      dQt[row][key] = aq[j][e];
      dKt[row][key] = ak[j][e];
      dWm[row][key] = -aw[j][e];
    }
  if (warp < 2) {
#pragma unroll
    for (int nt = 0; nt < 2; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int r = g + (e >> 1) * 8, s = nt * 8 + 2 * t + (e & 1);
        if (warp == 0) {
          const float a = r >= s ? a16[nt][e] : 0.f;
          sg.dAqk[r][s] = a;
          sg.dAqkT[s][r] = a;
        } else {
          sg.dMv[r][s] = a16[nt][e];
        }
      }
  }
  float eg[kH];
#pragma unroll
  for (int j = 0; j < kH; ++j) {
    const int r = r0 + j;
    eg[j] = __expf(G[j]);
    KG[r][d] = kn[j] * eg[j];
    if constexpr (kFactored) {
      R1[r][d] = kn[j] * __expf(-G[j]);
      R2[r][d] = qn[j] * eg[j];
    } else {
      R1[r][d] = p.scale * qn[j];
      R2[r][d] = kn[j];
      R3[r][d] = G[j];
    }
  }
  __syncthreads();

  // dM = dMv + dW·(K⊙e^Γ)ᵀ on M's support r ≥ s: warp w multiplies the keys [16w, 16w+16) in
  // 3xTF32, and the eight partial 16x16 products are summed in a fixed order (deterministic).
  float (*dMp)[kC][kC] = reinterpret_cast<float(*)[kC][kC]>(&sg.dO[0][0]);  // dO, Vn are dead
  {
    float pm[2][4] = {};
#pragma unroll
    for (int kk = 0; kk < 2; ++kk) {
      const int k0 = warp * 16 + kk * 8;
      uint32_t ah[4], al[4];
      frag_a_tf32(dWm, k0, 1.f, g, t, ah, al);
#pragma unroll
      for (int nt = 0; nt < 2; ++nt) {
        uint32_t bh[2], bl[2];
        ptx::split_tf32(KG[nt * 8 + g][k0 + t], bh[0], bl[0]);
        ptx::split_tf32(KG[nt * 8 + g][k0 + t + 4], bh[1], bl[1]);
        ptx::mma1688_3xtf32(pm[nt], ah, al, bh, bl);
      }
    }
#pragma unroll
    for (int nt = 0; nt < 2; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) dMp[warp][g + (e >> 1) * 8][nt * 8 + 2 * t + (e & 1)] = pm[nt][e];
  }
  __syncthreads();
  // The 16x16 gradients, one entry (r, s) per thread.
  const int er = tid >> 4, es = tid & 15;
  {
    float m = 0.f;
    if (er >= es) {
      m = sg.dMv[er][es];
#pragma unroll
      for (int w = 0; w < 8; ++w) m += dMp[w][er][es];
    }
    dM[er][es] = m;
  }
  __syncthreads();
  {
    // With dT[i][j] = dM[i][j]·β_j:  Xm = Tᵀ dT,  dL = −Xm Tᵀ (strictly lower part).
    float acc = 0.f;
#pragma unroll
    for (int i = 0; i < kC; ++i) acc += aux.T[i][er] * dM[i][es];
    Xm[er][es] = acc * sg.beta[es];
  }
  __syncthreads();
  {
    float dl = 0.f;
    if (er > es) {
#pragma unroll
      for (int j = 0; j < kC; ++j) dl -= Xm[er][j] * aux.T[es][j];
    }
    sg.dLb[er][es] = dl * sg.beta[er];
    sg.dLbT[es][er] = dl * sg.beta[er];
    // dβ_r through L = Diag(β)·LL (row r), summed over the 16 lanes holding row r.
    float part = dl * aux.LL[er][es];
#pragma unroll
    for (int o = 8; o > 0; o >>= 1) part += __shfl_xor_sync(0xffffffffu, part, o);
    if (es == 0) sg.dbl[er] = part;
  }
  __syncthreads();
  if (tid < kC && tid < ch.len) {
    // dβ_r through M = Tβ (column r), plus the L part.
    const int r = tid;
    float db = sg.dbl[r];
    for (int i = r; i < kC; ++i) db += dM[i][r] * aux.T[i][r];
    if (p.use_beta_sigmoid) db *= sg.beta[r] * (1.f - sg.beta[r]);
    store_f(p.dbeta, p.beta_dtype, static_cast<size_t>(ch.row0 + r) * p.H + h,
            r < live.len ? db : 0.f);
  }

  // Channel d, rows r0 + j: dq, dk and dΓ (before the in-chunk cumulative sum).
  float dq[kH], dk[kH], dG[kH];
  float dGC = dD * __expf(gc);  // this half's part of the gradient of Γ_C
  {
    // dkw, the gradient of k_r⊙e^{Γ_r} through W = Tβ·(K⊙e^Γ), is (Diag(β)·Tᵀ·dW)[r][d]; the
    // factored path adds it on tensor cores to the pair terms' dLb·KGi, which it joins there.
    float dWc[kC];
    if constexpr (!kFactored) {
#pragma unroll
      for (int i = 0; i < kC; ++i) dWc[i] = dWm[i][d];
    }
#pragma unroll
    for (int j = 0; j < kH; ++j) {
      const int r = r0 + j;
      const float dqt = dQt[r][d], dkt = dKt[r][d];
      float dkw = 0.f;
      if constexpr (!kFactored) {
#pragma unroll
        for (int i = 0; i < kC; ++i) dkw += aux.T[i][r] * dWc[i];
        dkw *= sg.beta[r];
      }
      const float ekt = __expf(gc - G[j]);
      const float tk = dkt * kn[j] * ekt;
      dq[j] = p.scale * eg[j] * dqt;
      dk[j] = eg[j] * dkw + ekt * dkt;
      dG[j] = dqt * p.scale * qn[j] * eg[j] + dkw * kn[j] * eg[j] - tk;
      dGC += tk;
    }
  }
  sg.xch[hh][d] = dGC;
  // Pair terms of Aqk (r ≥ s) and L (r > s), weighted by e^{Γ_r−Γ_s}: this thread takes the
  // row role of its rows and the column role of its columns.
  if constexpr (kFactored) {
    // e^{Γ_r−Γ_s} = e^{Γ_r}·e^{−Γ_s} (bounded span): with KGi = k⊙e^{−Γ}, QG = q⊙e^Γ,
    //   rows:    dq += scale·e^Γ·(dAqk·KGi),  dk += e^Γ·(dLb·KGi + dkw)
    //   columns: dk += e^{−Γ}·(dLbᵀ·KG + scale·dAqkᵀ·QG)
    // 16x16 by 16x128 products on tensor cores in 3xTF32, warp w taking channels [16w, 16w+16).
    float pa1[2][4] = {}, pa2[2][4] = {}, pb[2][4] = {};
#pragma unroll
    for (int k0 = 0; k0 < kC; k0 += 8) {
      uint32_t aqh[4], aql[4], alh[4], all[4], atqh[4], atql[4], atlh[4], atll[4], abh[4], abl[4];
      frag_a_tf32(sg.dAqk, k0, 1.f, g, t, aqh, aql);
      frag_a_tf32(sg.dLb, k0, 1.f, g, t, alh, all);
      frag_a_tf32(sg.dAqkT, k0, p.scale, g, t, atqh, atql);
      frag_a_tf32(sg.dLbT, k0, 1.f, g, t, atlh, atll);
      frag_bt(k0, abh, abl);
#pragma unroll
      for (int nt = 0; nt < 2; ++nt) {
        const int col = warp * 16 + nt * 8 + g;
        auto frag_b = [&](const float (*m)[FP], uint32_t (&hi)[2], uint32_t (&lo)[2]) {
          ptx::split_tf32(m[k0 + t][col], hi[0], lo[0]);
          ptx::split_tf32(m[k0 + t + 4][col], hi[1], lo[1]);
        };
        uint32_t kih[2], kil[2], qgh[2], qgl[2], kgh[2], kgl[2], dwh[2], dwl[2];
        frag_b(R1, kih, kil);
        frag_b(R2, qgh, qgl);
        frag_b(KG, kgh, kgl);
        frag_b(dWm, dwh, dwl);
        ptx::mma1688_3xtf32(pa1[nt], aqh, aql, kih, kil);
        ptx::mma1688_3xtf32(pa2[nt], alh, all, kih, kil);
        ptx::mma1688_3xtf32(pa2[nt], abh, abl, dwh, dwl);
        ptx::mma1688_3xtf32(pb[nt], atqh, atql, qgh, qgl);
        ptx::mma1688_3xtf32(pb[nt], atlh, atll, kgh, kgl);
      }
    }
    __syncthreads();  // every warp has read R1, R2 and KG; the products take their place
    float (*A1)[FP] = R1;
    float (*A2)[FP] = R2;
    float (*Bc)[FP] = R3;
#pragma unroll
    for (int nt = 0; nt < 2; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int row = g + (e >> 1) * 8, col = warp * 16 + nt * 8 + 2 * t + (e & 1);
        A1[row][col] = pa1[nt][e];
        A2[row][col] = pa2[nt][e];
        Bc[row][col] = pb[nt][e];
      }
    __syncthreads();
#pragma unroll
    for (int j = 0; j < kH; ++j) {
      const int r = r0 + j;
      const float a1 = A1[r][d], a2 = A2[r][d], b = Bc[r][d];
      const float egi = __expf(-G[j]);
      dq[j] += p.scale * eg[j] * a1;
      dk[j] += eg[j] * a2 + egi * b;
      dG[j] += eg[j] * (kn[j] * a2 + p.scale * qn[j] * a1) - kn[j] * egi * b;
    }
  } else {
    // Exact: e^{Γ_r−Γ_s} per pair (any gate).
    float qa[kC], ka_[kC], ga[kC];
#pragma unroll
    for (int r = 0; r < kC; ++r) {
      qa[r] = R1[r][d];
      ka_[r] = R2[r][d];
      ga[r] = R3[r][d];
    }
#pragma unroll
    for (int j = 0; j < kH; ++j) {
      const int r = r0 + j;
      const float sq_r = p.scale * qn[j];
#pragma unroll
      for (int o = 0; o < kC; ++o) {
        // Row role: pair (r, o), o ≤ r.
        if (o <= r) {
          const float E = o < r ? exp2f((G[j] - ga[o]) * kLog2e) : 1.f;
          const float ka = sg.dAqk[r][o] * E;
          dq[j] += p.scale * ka * ka_[o];
          if (o < r) {
            const float le = sg.dLb[r][o] * E;
            dk[j] += le * ka_[o];
            dG[j] += (le * kn[j] + ka * sq_r) * ka_[o];
          }
        }
        // Column role: pair (o, r), o ≥ r.
        if (o >= r) {
          const float E = o > r ? exp2f((ga[o] - G[j]) * kLog2e) : 1.f;
          const float ka = sg.dAqk[o][r] * E;
          dk[j] += ka * qa[o];
          if (o > r) {
            const float le = sg.dLb[o][r] * E;
            dk[j] += le * ka_[o];
            dG[j] -= (le * ka_[o] + ka * qa[o]) * kn[j];
          }
        }
      }
    }
  }
  __syncthreads();
  // Reverse cumulative sum over the 16 rows: every row also gets the whole gradient of Γ_C;
  // the first half needs the second half's total.
  if (hh == 1) dG[kH - 1] += sg.xch[0][d] + sg.xch[1][d];
#pragma unroll
  for (int j = kH - 2; j >= 0; --j) dG[j] += dG[j + 1];
  __syncthreads();
  if (hh == 1) sg.xch[0][d] = dG[0];
  __syncthreads();
  if (hh == 0) {
    const float later = sg.xch[0][d];
#pragma unroll
    for (int j = 0; j < kH; ++j) dG[j] += later;
  }

  if (p.use_qk_l2norm) {
    float acc[16];
#pragma unroll
    for (int j = 0; j < kH; ++j) {
      acc[j] = qn[j] * dq[j];
      acc[kH + j] = kn[j] * dk[j];
    }
    half_sum16(acc, sg.red, sg.dots);
#pragma unroll
    for (int j = 0; j < kH; ++j) {
      const int r = r0 + j;
      dq[j] = aux.rn[r] * (dq[j] - sg.dots[16 * hh + j] * qn[j]);
      dk[j] = aux.rn[kC + r] * (dk[j] - sg.dots[16 * hh + kH + j] * kn[j]);
    }
  }

  const float a_exp = p.gate_mode ? __expf(p.A_log[h]) : 0.f;
  float dA = 0.f, ddt = 0.f;
  Tin* dqp = static_cast<Tin*>(p.dq);
  Tin* dkp = static_cast<Tin*>(p.dk);
#pragma unroll
  for (int j = 0; j < kH; ++j) {
    const int r = r0 + j;
    if (r < live.len) {
      float out = dG[j];
      // A floored log-decay is a constant: no gradient reaches the gate input or A_log (xg
      // already holds x + dt_bias).
      if (below_log_decay_floor(gate_activation(p, xg[j], a_exp, 0.f))) {
        out = 0.f;
      } else if (p.gate_mode == 1) {
        const float x = xg[j];
        out = -dG[j] * a_exp * sigmoid_f(x);
        dA += dG[j] * (-a_exp * softplus_f(x));
        ddt += out;
      } else if (p.gate_mode == 2) {
        const float x = xg[j];
        const float sx = sigmoid_f(a_exp * x);
        out = dG[j] * p.lower_bound * sx * (1.f - sx) * a_exp;
        if (out != 0.f) dA += out * x;  // a saturated sigmoid (x = ±inf, legal) gives 0, not 0·inf
        ddt += out;
      }
      const size_t idx = (static_cast<size_t>(ch.row0 + r) * p.H + h) * KD + d;
      dqp[idx] = from_float<Tin>(dq[j]);
      dkp[idx] = from_float<Tin>(dk[j]);
      store_f(p.dg, p.g_dtype, idx, out);
    } else if (r < ch.len) {  // a dead row: the state there is a constant
      const size_t idx = (static_cast<size_t>(ch.row0 + r) * p.H + h) * KD + d;
      dqp[idx] = from_float<Tin>(0.f);
      dkp[idx] = from_float<Tin>(0.f);
      store_f(p.dg, p.g_dtype, idx, 0.f);
    }
  }
  if (hh == 1) sg.xch[1][d] = ddt;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) dA += __shfl_xor_sync(0xffffffffu, dA, o);
  if (lane == 0) sg.red[warp][0] = dA;
  __syncthreads();
  if (hh == 0) pdt[hs * KD + d] = ddt + sg.xch[1][d];
  if (tid == 0) {
    float a = 0.f;
#pragma unroll
    for (int w = 0; w < 8; ++w) a += sg.red[w][0];
    pda[hs] = a;
  }
}
// ---------------------------------------------------------------------------------------------
// Kernel 4: per batch row and head, the partial sums in slot order; and, varlen, zero
// gradients for the tokens before the first and after the last sequence (they reach no output).
template <typename Tin>
__global__ void __launch_bounds__(KD) kda_bwd_reduce_kernel(BwdParams p, const float* __restrict__ pdt,
                                                            const float* __restrict__ pda, int slots) {
  __shared__ float red[KD / 32];
  const int b = blockIdx.x, h = blockIdx.y, d = threadIdx.x;
  const int per = p.is_varlen ? slots : slots / p.B;
  const size_t first = static_cast<size_t>(h) * slots + (p.is_varlen ? 0 : b * per);
  float acc = 0.f;
#pragma unroll 16
  for (int i = 0; i < per; ++i) acc += pdt[(first + i) * KD + d];
  p.ddt_bias[(static_cast<size_t>(b) * p.H + h) * KD + d] = acc;
  float a = 0.f;
  for (int i = d; i < per; i += KD) a += pda[first + i];
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) a += __shfl_xor_sync(0xffffffffu, a, o);
  if ((d & 31) == 0) red[d >> 5] = a;
  __syncthreads();
  if (d == 0) p.dA_log[b * p.H + h] = (red[0] + red[1]) + (red[2] + red[3]);

  if (p.is_varlen) {
    auto zero_tokens = [&](long long from, long long to) {
      for (long long tok = from; tok < to; ++tok) {
        const size_t row = static_cast<size_t>(tok) * p.H + h;
        static_cast<Tin*>(p.dq)[row * KD + d] = from_float<Tin>(0.f);
        static_cast<Tin*>(p.dk)[row * KD + d] = from_float<Tin>(0.f);
        static_cast<Tin*>(p.dv)[row * VD + d] = from_float<Tin>(0.f);
        store_f(p.dg, p.g_dtype, row * KD + d, 0.f);
        if (d == 0) store_f(p.dbeta, p.beta_dtype, row, 0.f);
      }
    };
    zero_tokens(0, p.cu_seqlens[0]);
    zero_tokens(p.cu_seqlens[p.N], p.T);
  }
}

// The chains are latency-bound (a dependent step per chunk): with one CTA per SM or fewer, a
// deep record prefetch hides the fetch latency; with more, a few stages at two or three CTAs
// per SM (the most that fit beside the state tiles) keep every chain of a large batch resident
// at once (two waves would double the time).
template <int NW, int kStages, int kMinBlocks, typename Tin>
cudaError_t launch_chains(const BwdParams& p, const uint8_t* recs, __nv_bfloat16* states,
                          __nv_bfloat16* dstates, __nv_bfloat16* vn, __nv_bfloat16* dvn,
                          const int* dead_rows, const int* dead_cols, int slots,
                          cudaStream_t stream) {
  using L = ChainSmem<NW, kStages>;
  auto chains = kda_bwd_chains_kernel<NW, kStages, kMinBlocks, Tin>;
  KDA_TRY(cudaFuncSetAttribute(chains, cudaFuncAttributeMaxDynamicSharedMemorySize, L::kBytes));
  chains<<<dim3(VD / L::BV, p.H, 2 * p.N), NW * 32, L::kBytes, stream>>>(
      p, recs, states, dstates, vn, dvn, dead_rows, dead_cols, slots);
  return cudaGetLastError();
}

// Four warps per CTA share each record fetch; where that leaves under ~70% of the SMs a CTA
// (few heads and sequences, long ones), two warps per CTA spread the chains over twice the SMs.
template <typename Tin>
cudaError_t launch_chains_any(const BwdParams& p, const uint8_t* recs, __nv_bfloat16* states,
                              __nv_bfloat16* dstates, __nv_bfloat16* vn, __nv_bfloat16* dvn,
                              const int* dead_rows, const int* dead_cols, int slots,
                              cudaStream_t stream) {
  const long long chains4 = static_cast<long long>(VD / 64) * p.H * 2 * p.N;
  const int sms = sm_count();
  if (chains4 * 10 >= 7LL * sms)
    return chains4 <= sms
               ? launch_chains<4, 12, 1, Tin>(p, recs, states, dstates, vn, dvn, dead_rows,
                                              dead_cols, slots, stream)
               : launch_chains<4, 3, 3, Tin>(p, recs, states, dstates, vn, dvn, dead_rows,
                                             dead_cols, slots, stream);
  return 2 * chains4 <= sms
             ? launch_chains<2, 12, 1, Tin>(p, recs, states, dstates, vn, dvn, dead_rows,
                                            dead_cols, slots, stream)
             : launch_chains<2, 4, 3, Tin>(p, recs, states, dstates, vn, dvn, dead_rows,
                                           dead_cols, slots, stream);
}

template <typename Tin, bool kFactored>
cudaError_t bwd_t(const BwdParams& p, uint8_t* ws, cudaStream_t stream) {
  const int slots = chunk_slots(p);
  const WsLayout lay(p);
  auto* auxs = reinterpret_cast<PrepAux*>(ws + lay.aux);
  auto* states = reinterpret_cast<__nv_bfloat16*>(ws + lay.states);
  auto* dstates = reinterpret_cast<__nv_bfloat16*>(ws + lay.dstates);
  auto* vn = reinterpret_cast<__nv_bfloat16*>(ws + lay.vn);
  auto* dvn = reinterpret_cast<__nv_bfloat16*>(ws + lay.dvn);
  auto* pdt = reinterpret_cast<float*>(ws + lay.pdt);
  auto* pda = reinterpret_cast<float*>(ws + lay.pda);
  auto* dead_rows = reinterpret_cast<int*>(ws + lay.dead_rows);
  auto* dead_cols = reinterpret_cast<int*>(ws + lay.dead_cols);
  auto* dead_v = reinterpret_cast<int*>(ws + lay.dead_v);
  const size_t nh = static_cast<size_t>(p.N) * p.H;
  static_assert(kNoDeadRow == 0x7f7f7f7f, "filled bytewise");
  KDA_TRY(cudaMemsetAsync(dead_rows, 0x7f, nh * (2 + VD) * sizeof(int), stream));
  KDA_TRY(prep_for_backward(p, ws + lay.rec, auxs, dead_rows, slots, stream));
  if (const long long pieces = static_cast<long long>(p.B) * p.T * p.H * (VD / 8); pieces > 0) {
    kda_scan_v_kernel<Tin, VD><<<static_cast<unsigned>((pieces + 255) / 256), 256, 0, stream>>>(
        p, dead_cols, dead_v);
    KDA_TRY(cudaGetLastError());
  }
  if (p.N > 0)
    KDA_TRY(launch_chains_any<Tin>(p, ws + lay.rec, states, dstates, vn, dvn, dead_rows,
                                   dead_cols, slots, stream));
  if (slots > 0) {
    auto grad = kda_bwd_grad_kernel<kFactored, Tin>;
    constexpr int bytes = sizeof(GradSmem);
    KDA_TRY(cudaFuncSetAttribute(grad, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes));
    grad<<<dim3(slots, p.H), 2 * KD, bytes, stream>>>(p, auxs, states, dstates, vn, dvn, pdt,
                                                      pda, dead_rows, dead_cols, dead_v, slots);
    KDA_TRY(cudaGetLastError());
  }
  kda_bwd_reduce_kernel<Tin><<<dim3(p.B, p.H), KD, 0, stream>>>(p, pdt, pda, slots);
  return cudaGetLastError();
}

}  // namespace

const char* bwd_unsupported(const BwdParams& p) {
  if (p.qkv_dtype != DType::kBF16 && p.qkv_dtype != DType::kF16)
    return "q, k, v and do must be bfloat16 or float16 on the CUDA target";
  if (p.K != KD || p.V != VD) return "the CUDA backward supports K = V = 128 only";
  if (p.gate_mode < 0 || p.gate_mode > 2) return "gate_mode must be 0, 1 or 2";
  if (p.N > 32767 || p.H > 65535 || p.B > 65535)
    return "the CUDA backward supports at most 32767 sequences, 65535 heads and batch rows";
  return nullptr;
}

size_t bwd_workspace_bytes(const BwdParams& p) { return WsLayout(p).total; }

cudaError_t bwd(const BwdParams& p, void* workspace, cudaStream_t stream) {
  if (bwd_unsupported(p)) return cudaErrorInvalidValue;
  if (p.B == 0 || p.H == 0) return cudaSuccess;
  uint8_t* ws = static_cast<uint8_t*>(workspace);
  const bool factored = factored_gate(p);
  const bool f16 = p.qkv_dtype == DType::kF16;
  if (f16) return factored ? bwd_t<__half, true>(p, ws, stream) : bwd_t<__half, false>(p, ws, stream);
  return factored ? bwd_t<__nv_bfloat16, true>(p, ws, stream)
                  : bwd_t<__nv_bfloat16, false>(p, ws, stream);
}

}  // namespace kda
