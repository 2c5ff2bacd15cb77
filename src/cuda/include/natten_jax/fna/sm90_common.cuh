// Building blocks of the sm_90a (Hopper) fused kernels: warpgroup MMA (wgmma) with shared-memory
// matrix descriptors, mbarriers, cp.async completion tracked by an mbarrier, register
// reallocation between warpgroups (setmaxnreg) and named barriers.
//
// Everything that emits a Hopper-only instruction is compiled only where NJ_SM90A is set (the
// sm_90a device pass); in every other pass (host, sm_80) the bodies are empty and never reached:
// the kernels that use them trap there and the host launcher refuses devices other than sm_90.
//
// Shared-memory tiles use the 128-byte swizzle of the wgmma canonical layouts: a tile is stored as
// column blocks of 64 16-bit elements (128 bytes per row); within a block, row r's 16-byte chunk
// c is stored at chunk position c ^ (r % 8). Blocks are 1024-byte aligned (8 rows x 128 bytes,
// one swizzle atom), so the swizzle equals the hardware's XOR of address bits [4, 7) with
// [7, 10).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "natten_jax/common/fast_exp2.cuh"

#if defined(__CUDA_ARCH__) && (__CUDA_ARCH__ == 900) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define NJ_SM90A 1
#else
#define NJ_SM90A 0
#endif

namespace natten_jax {
namespace fna {
namespace sm90 {

__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// ---- Shared-memory matrix descriptors (128-byte swizzle).
//
// K-major operand (rows of 64 contiguous elements along K, e.g. Q and K tiles): the 8-row groups
// are `sbo` bytes apart (1024 for consecutive rows); the leading offset is unused. A k16 slice at
// element offset 16i of a 64-element block starts 32i bytes into the block.
//
// MN-major B operand (rows along K of N-contiguous elements, e.g. V as [keys, head_dim]): 64
// N-elements per 128-byte row; consecutive 64-element N blocks are `lbo` bytes apart, groups of 8
// K rows `sbo` bytes apart.
__device__ __forceinline__ uint64_t gmma_desc(uint32_t saddr, uint32_t lbo, uint32_t sbo) {
  uint64_t d = static_cast<uint64_t>((saddr & 0x3FFFF) >> 4);
  d |= static_cast<uint64_t>((lbo >> 4) & 0x3FFF) << 16;
  d |= static_cast<uint64_t>((sbo >> 4) & 0x3FFF) << 32;
  d |= static_cast<uint64_t>(1) << 62;  // layout type 1: 128-byte swizzle; base offset 0
  return d;
}

// ---- wgmma fences and groups.
__device__ __forceinline__ void wgmma_fence() {
#if NJ_SM90A
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void wgmma_commit() {
#if NJ_SM90A
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
#endif
}
template <int N>
__device__ __forceinline__ void wgmma_wait() {
#if NJ_SM90A
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
#endif
}

// Compiler fences on registers that an in-flight wgmma reads or writes: keeps the compiler from
// moving other accesses of them across the issue / wait points (and from reusing the registers
// of an operand that is still being read).
__device__ __forceinline__ void reg_fence(float& x) { asm volatile("" : "+f"(x)::"memory"); }
__device__ __forceinline__ void reg_fence(uint32_t& x) { asm volatile("" : "+r"(x)::"memory"); }
__device__ __forceinline__ void reg_fence(uint64_t& x) { asm volatile("" : "+l"(x)::"memory"); }
template <int N>
__device__ __forceinline__ void reg_fence(float (&x)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) reg_fence(x[i]);
}
template <int N, int M>
__device__ __forceinline__ void reg_fence(uint32_t (&x)[N][M]) {
#pragma unroll
  for (int i = 0; i < N; ++i)
#pragma unroll
    for (int j = 0; j < M; ++j) reg_fence(x[i][j]);
}

// ---- wgmma instructions (fp32 accumulators). Accumulator layout of m64nN: warp w of the
// warpgroup holds rows 16w + lane/4 (+8); d[4i + 2h + e] is row 16w + lane/4 + 8h, column
// 8i + 2(lane%4) + e. The register A operand (m64k16) has the m16n8k16 A-fragment layout per warp.
template <typename T>
struct Gmma;

#if NJ_SM90A
#define NJ_GMMA_BODY(x) x
#else
#define NJ_GMMA_BODY(x)
#endif

// Accumulator operands of the wgmma instructions: PTX register lists "%0, ..., %31" /
// "%32, ..., %63" and the matching "+f" constraints on d[0..31] / d[32..63].
#define NJ_ACC_REGS_0_31                                                                    \
  "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, " \
  "%20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31"
#define NJ_ACC_REGS_32_63                                                                   \
  "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, " \
  "%50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63"
#define NJ_ACC8(d, i)                                                                          \
  "+f"(d[i]), "+f"(d[i + 1]), "+f"(d[i + 2]), "+f"(d[i + 3]), "+f"(d[i + 4]), "+f"(d[i + 5]), \
      "+f"(d[i + 6]), "+f"(d[i + 7])
#define NJ_ACC32(d, i) NJ_ACC8(d, i), NJ_ACC8(d, i + 8), NJ_ACC8(d, i + 16), NJ_ACC8(d, i + 24)

// One specialization per input type (the PTX type name differs, nothing else).
#define NJ_GMMA_STRUCT(T, PTX)                                                                     \
template <>                                                                                        \
struct Gmma<T> {                                                                                   \
  /* S (64 x 64, fp32) = A (64 x 16, shared memory, K-major) x B (16 x 64, shared memory, */       \
  /* K-major); scale_d = 0 overwrites d, 1 accumulates. */                                         \
  static __device__ __forceinline__ void ss_n64(float (&d)[32], uint64_t desc_a, uint64_t desc_b,  \
                                                int scale_d) {                                     \
    NJ_GMMA_BODY(asm volatile(                                                                     \
        "{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"                                               \
        "wgmma.mma_async.sync.aligned.m64n64k16.f32." PTX "." PTX " "                              \
        "{" NJ_ACC_REGS_0_31 "}, %32, %33, p, 1, 1, 0, 0;\n}\n"                                    \
        : NJ_ACC32(d, 0)                                                                           \
        : "l"(desc_a), "l"(desc_b), "r"(scale_d)));                                                \
  }                                                                                                \
  /* S (64 x 128, fp32) = A (64 x 16, shared memory, K-major) x B (16 x 128, shared memory, */     \
  /* K-major): the scores of a 128-key box. */                                                     \
  static __device__ __forceinline__ void ss_n128(float (&d)[64], uint64_t desc_a, uint64_t desc_b, \
                                                 int scale_d) {                                    \
    NJ_GMMA_BODY(asm volatile(                                                                     \
        "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"                                               \
        "wgmma.mma_async.sync.aligned.m64n128k16.f32." PTX "." PTX " "                             \
        "{" NJ_ACC_REGS_0_31 ", " NJ_ACC_REGS_32_63 "}, %64, %65, p, 1, 1, 0, 0;\n}\n"             \
        : NJ_ACC32(d, 0), NJ_ACC32(d, 32)                                                          \
        : "l"(desc_a), "l"(desc_b), "r"(scale_d)));                                                \
  }                                                                                                \
  /* d (64 x 64, fp32) += A (64 x 16, registers) x B (16 x 64, shared memory, MN-major). */        \
  static __device__ __forceinline__ void rs_n64(float (&d)[32], const uint32_t (&a)[4],            \
                                                 uint64_t desc_b) {                                \
    NJ_GMMA_BODY(asm volatile(                                                                     \
        "{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"                                               \
        "wgmma.mma_async.sync.aligned.m64n64k16.f32." PTX "." PTX " "                              \
        "{" NJ_ACC_REGS_0_31 "}, {%32, %33, %34, %35}, %36, p, 1, 1, 1;\n}\n"                      \
        : NJ_ACC32(d, 0)                                                                           \
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(1)));                       \
  }                                                                                                \
  /* d (64 x 128, fp32) += A (64 x 16, registers) x B (16 x 128, shared memory, MN-major). */      \
  static __device__ __forceinline__ void rs_n128(float (&d)[64], const uint32_t (&a)[4],           \
                                                 uint64_t desc_b) {                                \
    NJ_GMMA_BODY(asm volatile(                                                                     \
        "{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"                                               \
        "wgmma.mma_async.sync.aligned.m64n128k16.f32." PTX "." PTX " "                             \
        "{" NJ_ACC_REGS_0_31 ", " NJ_ACC_REGS_32_63 "}, {%64, %65, %66, %67}, %68, p, 1, 1, 1;\n}\n" \
        : NJ_ACC32(d, 0), NJ_ACC32(d, 32)                                                          \
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(1)));                       \
  }                                                                                                \
};
NJ_GMMA_STRUCT(__nv_bfloat16, "bf16")
NJ_GMMA_STRUCT(__half, "f16")
#undef NJ_GMMA_STRUCT
#undef NJ_ACC_REGS_0_31
#undef NJ_ACC_REGS_32_63
#undef NJ_ACC8
#undef NJ_ACC32

#undef NJ_GMMA_BODY

// ---- mbarriers (CTA scope).
__device__ __forceinline__ void mbar_init(uint32_t bar, uint32_t count) {
#if NJ_SM90A
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
#endif
}
__device__ __forceinline__ void mbar_init_fence() {
#if NJ_SM90A
  asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void mbar_arrive(uint32_t bar) {
#if NJ_SM90A
  asm volatile("{\n.reg .b64 st;\nmbarrier.arrive.shared::cta.b64 st, [%0];\n}\n" ::"r"(bar)
               : "memory");
#endif
}
// One arrival by the threads with `pred` (predicated, no branch: usable between wgmma issue and
// wait without making the compiler serialise the wgmma pipeline).
__device__ __forceinline__ void mbar_arrive_if(uint32_t bar, bool pred) {
#if NJ_SM90A
  asm volatile(
      "{\n.reg .pred p;\n.reg .b64 st;\nsetp.ne.u32 p, %1, 0;\n"
      "@p mbarrier.arrive.shared::cta.b64 st, [%0];\n}\n" ::"r"(bar),
      "r"(static_cast<uint32_t>(pred))
      : "memory");
#endif
}
// Whether the phase of parity `parity` has completed (a fresh barrier counts the phase before
// its first, parity 1, as completed).
__device__ __forceinline__ bool mbar_try_wait(uint32_t bar, uint32_t parity) {
  uint32_t ok = 1;
#if NJ_SM90A
  asm volatile(
      "{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n"
      "selp.u32 %0, 1, 0, p;\n}\n"
      : "=r"(ok)
      : "r"(bar), "r"(parity)
      : "memory");
#endif
  return ok != 0;
}
__device__ __forceinline__ void mbar_wait(uint32_t bar, uint32_t parity) {
  while (!mbar_try_wait(bar, parity)) {
  }
}

// ---- cp.async (16 bytes, zero-filled when !valid) and completion through an mbarrier: the
// barrier receives one arrival (counted in its expected count) once every cp.async this thread
// issued before has landed.
__device__ __forceinline__ void cp_async16(uint32_t dst, const void* src, bool valid) {
#if NJ_SM90A
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src),
               "r"(valid ? 16 : 0)
               : "memory");
#endif
}
// 4-byte variant (per-row scalars such as the logsumexp); zero-filled when !valid.
__device__ __forceinline__ void cp_async4(uint32_t dst, const void* src, bool valid) {
#if NJ_SM90A
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(dst), "l"(src),
               "r"(valid ? 4 : 0)
               : "memory");
#endif
}
__device__ __forceinline__ void cp_async_arrive_noinc(uint32_t bar) {
#if NJ_SM90A
  asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];\n" ::"r"(bar) : "memory");
#endif
}
__device__ __forceinline__ void cp_async_wait_all() {
#if NJ_SM90A
  asm volatile("cp.async.wait_all;\n" ::: "memory");
#endif
}

// Orders this thread's generic-proxy view of shared memory with the async proxy (wgmma operand
// reads).
__device__ __forceinline__ void fence_proxy_async() {
#if NJ_SM90A
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
#endif
}

// ---- Register reallocation between warpgroups (every warp of the warpgroup executes it).
template <int N>
__device__ __forceinline__ void setmaxnreg_dec() {
#if NJ_SM90A
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(N));
#endif
}
template <int N>
__device__ __forceinline__ void setmaxnreg_inc() {
#if NJ_SM90A
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(N));
#endif
}

// Named barrier `id` (1..15; 0 is __syncthreads) over `count` threads.
__device__ __forceinline__ void named_barrier_sync(int id, int count) {
#if NJ_SM90A
  asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(count) : "memory");
#endif
}

// Arrival of `count`-thread named barrier `id` without waiting (the other side syncs on it).
__device__ __forceinline__ void named_barrier_arrive(int id, int count) {
#if NJ_SM90A
  asm volatile("bar.arrive %0, %1;\n" ::"r"(id), "r"(count) : "memory");
#endif
}

__device__ __forceinline__ void st_shared_b32(uint32_t addr, uint32_t v) {
  asm volatile("st.shared.b32 [%0], %1;\n" ::"r"(addr), "r"(v) : "memory");
}
__device__ __forceinline__ uint4 ld_shared_v4(uint32_t addr) {
  uint4 v;
  asm volatile("ld.shared.v4.b32 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "r"(addr)
               : "memory");
  return v;
}

__device__ __forceinline__ uint32_t ld_shared_u32(uint32_t addr) {
  uint32_t v;
  asm volatile("ld.shared.b32 %0, [%1];\n" : "=r"(v) : "r"(addr) : "memory");
  return v;
}
__device__ __forceinline__ float2 ld_shared_v2f(uint32_t addr) {
  float2 v;
  asm volatile("ld.shared.v2.f32 {%0, %1}, [%2];\n" : "=f"(v.x), "=f"(v.y) : "r"(addr) : "memory");
  return v;
}

template <typename T>
__device__ __forceinline__ uint32_t pack2(float x, float y);
template <>
__device__ __forceinline__ uint32_t pack2<__half>(float x, float y) {
  __half2 h = __floats2half2_rn(x, y);
  return *reinterpret_cast<uint32_t*>(&h);
}
template <>
__device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float x, float y) {
  __nv_bfloat162 h = __floats2bfloat162_rn(x, y);
  return *reinterpret_cast<uint32_t*>(&h);
}

}  // namespace sm90
}  // namespace fna
}  // namespace natten_jax

// The stage after `stage` in a ring of `stages` stages; `phase` (the mbarrier parity to wait for)
// flips at each wrap. (Macros, not functions: the kernels' PTX stays byte-identical to the
// GPU-validated builds; an inline function reorders registers. Statements: use them alone.)
#define NJ_NEXT_STAGE(stage, phase, stages) \
  if (++(stage) == (stages)) {              \
    (stage) = 0;                            \
    (phase) ^= 1;                           \
  }

// The box after `bi` in a row-major walk over nbox[0] x nbox[1] x nbox[2] boxes.
#define NJ_NEXT_BOX(bi, nbox)      \
  if (++(bi)[2] == (nbox)[2]) {    \
    (bi)[2] = 0;                   \
    if (++(bi)[1] == (nbox)[1]) {  \
      (bi)[1] = 0;                 \
      ++(bi)[0];                   \
    }                              \
  }
