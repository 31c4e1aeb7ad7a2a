// The backward's sizes (docs/backward.md): key and value channels and the pitches of their
// shared-memory rows, shared by its kernels and its launch code.
#pragma once

#include "kda/chunks.cuh"

namespace kda {

constexpr int kC = kChunk;  // short name for the many 16-wide loops
constexpr int KD = 128;     // key channels
constexpr int VD = 128;     // value channels
constexpr int KP = KD + 8;  // bf16 row pitch (+16 bytes: conflict-free ldmatrix)
constexpr int FP = KD + 4;  // fp32 row pitch

using R = Rec<KD>;  // the chunk record (chunks.cuh), written by the prep (prep.cuh)

}  // namespace kda
