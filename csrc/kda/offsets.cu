// docs/robustness.md §1 on the device: clip every offset into [0, T], then a running maximum.
#include "kda/offsets.h"

namespace kda {
namespace {

constexpr int kThreads = 1024;

__device__ __forceinline__ int clip_offset(int x, int T) { return min(max(x, 0), T); }

// Thread i takes a contiguous run of the offsets: the maximum of its run, an exclusive max-scan
// of those over the CTA, then the run again with that prefix. The clipped values are >= 0, so 0
// is the identity of the scan.
__global__ void __launch_bounds__(kThreads) kda_legal_offsets_kernel(const int32_t* __restrict__ raw,
                                                                 int32_t* __restrict__ legal,
                                                                 int count, int T) {
  __shared__ int scan[kThreads];
  const int tid = threadIdx.x;
  const int per = (count + kThreads - 1) / kThreads;
  const long long begin = static_cast<long long>(tid) * per;
  const long long end = min(begin + per, static_cast<long long>(count));
  int run = 0;
  for (long long i = begin; i < end; ++i) run = max(run, clip_offset(raw[i], T));
  scan[tid] = run;
  __syncthreads();
  for (int off = 1; off < kThreads; off <<= 1) {
    const int left = tid >= off ? scan[tid - off] : 0;
    __syncthreads();
    scan[tid] = max(scan[tid], left);
    __syncthreads();
  }
  int prefix = tid > 0 ? scan[tid - 1] : 0;
  for (long long i = begin; i < end; ++i) {
    prefix = max(prefix, clip_offset(raw[i], T));
    legal[i] = prefix;
  }
}

}  // namespace

cudaError_t legal_offsets(const int32_t* raw, int32_t* legal, int count, int T,
                          cudaStream_t stream) {
  if (count <= 0) return cudaSuccess;
  kda_legal_offsets_kernel<<<1, kThreads, 0, stream>>>(raw, legal, count, T);
  return cudaGetLastError();
}

}  // namespace kda
