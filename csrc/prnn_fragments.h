// prnn_fragments.h - the warp-level matrix fragment layouts the v2 kernel uses, for host and device.
//
// One definition of "which lane holds which element in which register" for the two tensor-core
// shapes of mma.sync that kernel v2 issues (PTX ISA, "Matrix Fragments for mma.m16n8k16 with
// floating point type" and "... for mma.m16n8k8" (.tf32)):
//
//   groupID = lane >> 2, tig (threadID_in_group) = lane % 4
//
//   m16n8k16, .f16/.bf16 (A 16x16 row-major, B 16x8 column-major, C/D 16x8 fp32)
//     A: 4 .b32 registers, 2 elements each (element e = 2*reg + half, low half first)
//        row = groupID       for registers 0, 2;  groupID + 8 for registers 1, 3
//        col = 2*tig + half  for registers 0, 1;  2*tig + half + 8 for registers 2, 3
//     B: 2 .b32 registers, 2 elements each
//        k = 2*tig + half (+8 for register 1),  n = groupID
//   m16n8k8, .tf32 (A 16x8, B 8x8, C/D 16x8 fp32)
//     A: 4 registers, one element each
//        row = groupID for a0, a2; groupID + 8 for a1, a3;  col = tig for a0, a1; tig + 4 for a2, a3
//     B: 2 registers: k = tig (b0), tig + 4 (b1); n = groupID
//   C/D of both: 4 fp32 registers: row = groupID (c0, c1), groupID + 8 (c2, c3); col = 2*tig + (i & 1)
//
// The kernel's weight loader, its exchange words and its epilogue are written with these functions;
// the CPU emulation (csrc/tests/prnn_v2_emulation_test.cpp) rebuilds whole matrices from the lanes'
// registers with the same functions and multiplies them, and its tests check the functions against
// the table above element by element and that each is a bijection onto its matrix.
//
// Also here: host versions of the roundings the GPU applies (tf32 cvt.rna, bf16/fp16 round to
// nearest even) so that the emulation and the float64 oracle round exactly as the kernel does.
#pragma once

#include <stdint.h>
#include <string.h>

#ifdef __CUDACC__
#define PRNN_FRAG_HD __host__ __device__ __forceinline__
#else
#define PRNN_FRAG_HD inline
#endif

namespace prnn {
namespace frag {

struct Coord {
  int row;  // M (A, C) or K (B)
  int col;  // K (A) or N (B, C)
};

PRNN_FRAG_HD int group_id(int lane) { return lane >> 2; }
PRNN_FRAG_HD int thread_in_group(int lane) { return lane & 3; }

// m16n8k16 A (16 x 16): register reg in 0..3, half in {0, 1} (low, high 16 bits).
PRNN_FRAG_HD Coord a16816(int lane, int reg, int half) {
  return {group_id(lane) + ((reg & 1) ? 8 : 0), 2 * thread_in_group(lane) + half + ((reg & 2) ? 8 : 0)};
}
// m16n8k16 B (16 x 8): register reg in 0..1: row = k, col = n.
PRNN_FRAG_HD Coord b16816(int lane, int reg, int half) {
  return {2 * thread_in_group(lane) + half + (reg ? 8 : 0), group_id(lane)};
}
// m16n8k8 .tf32 A (16 x 8): register reg in 0..3.
PRNN_FRAG_HD Coord a1688(int lane, int reg) {
  return {group_id(lane) + ((reg & 1) ? 8 : 0), thread_in_group(lane) + ((reg & 2) ? 4 : 0)};
}
// m16n8k8 .tf32 B (8 x 8): register reg in 0..1: row = k, col = n.
PRNN_FRAG_HD Coord b1688(int lane, int reg) { return {thread_in_group(lane) + (reg ? 4 : 0), group_id(lane)}; }
// C / D of both shapes (16 x 8 fp32): register i in 0..3.
PRNN_FRAG_HD Coord c16x8(int lane, int i) { return {group_id(lane) + ((i & 2) ? 8 : 0), 2 * thread_in_group(lane) + (i & 1)}; }

// ---- host roundings (the device uses cvt / __float2bfloat16_rn / __float2half_rn) ---------------

inline uint32_t float_bits(float f) {
  uint32_t u;
  memcpy(&u, &f, 4);
  return u;
}
inline float bits_float(uint32_t u) {
  float f;
  memcpy(&f, &u, 4);
  return f;
}

// cvt.rna.tf32.f32: keep 10 explicit mantissa bits, round to nearest with ties away from zero;
// the result is an fp32 bit pattern whose low 13 bits are zero. NaN and infinity pass through.
inline float tf32_round_host(float f) {
  uint32_t u = float_bits(f);
  if ((u & 0x7F800000u) == 0x7F800000u) return f;  // inf / NaN
  u += 0x1000u;                                     // half of the dropped 13 bits: ties away from zero
  u &= 0xFFFFE000u;
  return bits_float(u);
}

// float -> bf16 bits, round to nearest even (NaN kept quiet).
inline uint16_t bf16_bits_host(float f) {
  uint32_t u = float_bits(f);
  if ((u & 0x7F800000u) == 0x7F800000u && (u & 0x7FFFFFu)) return static_cast<uint16_t>((u >> 16) | 0x40u);
  const uint32_t lsb = (u >> 16) & 1u;
  u += 0x7FFFu + lsb;
  return static_cast<uint16_t>(u >> 16);
}
inline float bf16_float_host(uint16_t b) { return bits_float(static_cast<uint32_t>(b) << 16); }

// float -> IEEE fp16 bits, round to nearest even, with subnormals and overflow to infinity.
inline uint16_t fp16_bits_host(float f) {
  const uint32_t u = float_bits(f);
  const uint32_t sign = (u >> 16) & 0x8000u;
  const uint32_t abs = u & 0x7FFFFFFFu;
  if (abs >= 0x7F800000u) return static_cast<uint16_t>(sign | 0x7C00u | (abs > 0x7F800000u ? 0x200u : 0u));
  if (abs >= 0x477FF000u) return static_cast<uint16_t>(sign | 0x7C00u);  // rounds to >= 65520: inf
  if (abs < 0x38800000u) {  // below the smallest normal fp16 (2^-14): subnormal or zero
    if (abs < 0x33000000u) return static_cast<uint16_t>(sign);  // < 2^-25: rounds to 0 (2^-25 ties to even 0)
    const uint32_t mant = (abs & 0x7FFFFFu) | 0x800000u;
    const int shift = 126 - static_cast<int>(abs >> 23);        // 14..24 bits below the fp16 subnormal lsb
    const uint32_t q = mant >> shift, rem = mant & ((1u << shift) - 1u), half = 1u << (shift - 1);
    const uint32_t r = q + ((rem > half || (rem == half && (q & 1u))) ? 1u : 0u);
    return static_cast<uint16_t>(sign | r);
  }
  uint32_t v = abs - 0x38000000u;  // rebias exponent 127 -> 15
  const uint32_t rem = v & 0x1FFFu;
  v >>= 13;
  if (rem > 0x1000u || (rem == 0x1000u && (v & 1u))) ++v;
  return static_cast<uint16_t>(sign | v);
}
inline float fp16_float_host(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t e = (h >> 10) & 0x1Fu, m = h & 0x3FFu;
  if (e == 0x1Fu) return bits_float(sign | 0x7F800000u | (m << 13));
  if (e == 0) {
    if (m == 0) return bits_float(sign);
    const float v = static_cast<float>(m) * (1.0f / 16777216.0f);  // m * 2^-24
    return sign ? -v : v;
  }
  return bits_float(sign | ((e + 112u) << 23) | (m << 13));
}

}  // namespace frag
}  // namespace prnn
