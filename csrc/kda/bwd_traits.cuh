// The backward's shape (docs/backward.md): head dims, the grad kernel's warp layout and the
// pitches of its shared-memory rows, as one traits struct its kernels and launch code take.
// Every assumption the kernels make about these numbers is a static_assert here or beside the
// layout it concerns (GradSmem, ChainSmem), so that an instantiation that breaks one does not
// compile. kda_bwd.cu instantiates K = V = 64 and 128.
#pragma once

#include "kda/chunks.cuh"
#include "kda/transport_sm90.cuh"

namespace kda {

constexpr int kC = kChunk;  // short name for the many 16-wide loops

template <int K_, int V_>
struct BwdTraits {
  static constexpr int K = K_;  // key channels
  static constexpr int V = V_;  // value channels
  using R = Rec<K>;             // the chunk record (chunks.cuh), written by the prep (prep.cuh)

  // The grad kernel: two threads per key channel, one per half of the chunk's token rows, and
  // warp w computing keys [16w, 16w+16) of the 16xK products (and values [16w, 16w+16) of dv).
  static constexpr int kH = kC / 2;                    // token rows per thread
  static constexpr int kGradThreads = 2 * K;
  static constexpr int kGradWarps = kGradThreads / 32;
  static constexpr int kHalfWarps = kGradWarps / 2;    // warps per token half
  static constexpr int kRowPieces = K / 8;             // 16-byte pieces per 16-bit row of K
  static constexpr int kKeyShift = log2_pow2(K);       // tid >> kKeyShift = tid / K
  static constexpr int kPieceShift = log2_pow2(kRowPieces);
  static constexpr int kEntries = kC * kC / kGradThreads;  // 16x16 entries per thread
  static constexpr int KP = K + 8;  // bf16 row pitch of the grad kernel's tiles
  static constexpr int FP = K + 4;  // fp32 row pitch

  static_assert(K == V, "the grad kernel's warp w owns keys and values [16w, 16w+16), and "
                        "its [16][V] rows share the [16][K] rows' thread map and pitch");
  static_assert(K % 64 == 0 && (K & (K - 1)) == 0,
                "a power of two with at least 8 16-byte chunks per bf16 row (the states' XOR "
                "permutation, state_chunk, spans 8 chunks)");
  static_assert(kGradWarps * 16 == K, "one warp per 16 keys of the 16xK products");
  static_assert(kC * kRowPieces == kGradThreads,
                "one 16-byte piece of the chunk's 16 rows of q, k, dO, V, Vn, dVn per thread");
  static_assert(kEntries >= 1 && kEntries * kGradThreads == kC * kC,
                "the 16x16 gradients spread evenly over the threads");
  static_assert(kHalfWarps * 32 == K, "a token half is K threads, whole warps");
  static_assert(kGradThreads <= 1024, "threads per CTA");
  static_assert(ptx::conflict_free_pitch(KP * 2), "conflict-free ldmatrix on rows of pitch KP");
  static_assert(ptx::conflict_free_pitch(FP * 4), "conflict-free A-fragment reads of FP rows");
  static_assert(ptx::conflict_free_pitch(R::kPitch * 2), "conflict-free ldmatrix on a record");
};

// The instantiated backwards.
using Bwd128 = BwdTraits<128, 128>;
using Bwd64 = BwdTraits<64, 64>;

// The stored states are Sᵀ [value][key] bf16 with the 16-byte key chunks of each row permuted:
// chunk c of value row v sits at chunk c ^ (v % 8). That is the chains' conflict-free
// shared-memory tile, copied out as is; the grad kernel undoes it as it loads.
__device__ __forceinline__ int state_chunk(int v, int c) { return c ^ (v & 7); }

// Sum of x[0], x[stride], ..., x[(n-1)·stride] as a balanced tree, ((x0 + x1) + (x2 + x3)) for
// n = 4: a fixed order, so the cross-warp sums are reproducible.
template <int n, int stride = 1>
__device__ __forceinline__ float tree_sum(const float* x) {
  static_assert(n >= 1 && (n & (n - 1)) == 0, "a power of two");
  if constexpr (n == 1) return x[0];
  else return tree_sum<n / 2, stride>(x) + tree_sum<n / 2, stride>(x + n / 2 * stride);
}

}  // namespace kda
