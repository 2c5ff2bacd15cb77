// The fused kernels this module is built with: ONE table, read by the dispatchers
// (src/cuda/fna/*.cu: which template instantiations exist and how a call picks one), by the FFI
// handlers' argument checks (ffi/fna.cc: a combination without a kernel is an InvalidArgument
// that names it, before anything is launched) and by Python (natten_jax._C.fused_kernels(),
// which tests compare with natten_jax.tiles).
//
// Every kernel takes 64-key KV boxes / tiles, and the sm90 forward with 128-query tiles 128-key
// boxes too; the forward takes Q tiles of 64 or 128 queries, the backward 64. dtypes: float16
// and bfloat16 everywhere; float32 (TF32 products, two precisions) on the sm80 kernels with
// 64-query tiles, head dim 128 on compute capability 9.x.
#pragma once

#include <string>

// Head dims of each implementation (X(head_dim) per entry).
#define NJ_FNA_SM80_HEAD_DIMS(X) X(32) X(64) X(128)
#define NJ_FNA_SM90_HEAD_DIMS(X) X(64) X(128)
// CTAs per SM the sm80 forward at head dim 32 with 64-query tiles can aim at, besides its
// default of 4 (X(occupancy) per variant; FusedConfig.sm80_occupancy picks one).
#define NJ_FNA_SM80_OCCUPANCY_VARIANTS(X) X(5) X(6)

namespace natten_jax {
namespace fna {

enum class Impl : int { kSm80 = 0, kSm90 = 1 };  // the FFI attribute `impl`

constexpr int kKvTileTokens = 64;
// The sm90 forward's wide KV boxes (with 128-query tiles only).
constexpr int kSm90FwdWideKvTileTokens = 128;
// float32 (TF32 products): sm80 kernels, 64-query tiles; above this head dim only on 9.x.
constexpr int kFloat32MaxHeadDimBefore90 = 64;
constexpr int kFloat32QTileTokens = 64;
constexpr int kDefaultSm80Occupancy = 4;

inline bool head_dim_built(Impl impl, int head_dim) {
#define NJ_IS(D) head_dim == D ||
  return impl == Impl::kSm80 ? (NJ_FNA_SM80_HEAD_DIMS(NJ_IS) false)
                             : (NJ_FNA_SM90_HEAD_DIMS(NJ_IS) false);
#undef NJ_IS
}

inline std::string head_dims_built(Impl impl) {
  std::string s;
#define NJ_LIST(D) s += (s.empty() ? "" : ", ") + std::to_string(D);
  if (impl == Impl::kSm80) {
    NJ_FNA_SM80_HEAD_DIMS(NJ_LIST)
  } else {
    NJ_FNA_SM90_HEAD_DIMS(NJ_LIST)
  }
#undef NJ_LIST
  return s;
}

// Why no kernel of this module runs the call ("" if one does): direction, implementation, head
// dim, tokens per Q tile and per KV tile, and the requested sm80 forward occupancy (0: default;
// it only selects a variant at head dim 32 with 64-query tiles and is ignored elsewhere).
inline std::string fna_kernel_unsupported(bool backward, Impl impl, int head_dim, int q_tokens,
                                          int kv_tokens, int occupancy, bool float32 = false) {
  const char* name = impl == Impl::kSm80 ? "sm80" : "sm90";
  const std::string dir = backward ? "backward" : "forward";
  if (float32 && impl != Impl::kSm80)
    return "float32 runs the sm80 kernels (TF32), not the " + std::string(name) + " ones";
  if (float32 && q_tokens != kFloat32QTileTokens)
    return "float32 needs q_tile of " + std::to_string(kFloat32QTileTokens) + " tokens, got " +
           std::to_string(q_tokens);
  if (!head_dim_built(impl, head_dim))
    return "no " + std::string(name) + " " + dir + " kernel for head_dim " +
           std::to_string(head_dim) + " (built: " + head_dims_built(impl) + ")";
  if (backward ? q_tokens != 64 : (q_tokens != 64 && q_tokens != 128))
    return "q_tile must hold " + std::string(backward ? "64" : "64 or 128") + " tokens, got " +
           std::to_string(q_tokens);
  const bool wide_ok = !backward && impl == Impl::kSm90 && q_tokens == 128;
  if (kv_tokens != kKvTileTokens && !(wide_ok && kv_tokens == kSm90FwdWideKvTileTokens))
    return std::string("kv_tile must hold 64 tokens") +
           (wide_ok ? " or " + std::to_string(kSm90FwdWideKvTileTokens) : "") + ", got " +
           std::to_string(kv_tokens);
  bool occ_ok = occupancy == 0 || occupancy == kDefaultSm80Occupancy;
  std::string occupancies = std::to_string(kDefaultSm80Occupancy);
#define NJ_OCC(N)                   \
  occ_ok = occ_ok || occupancy == N; \
  occupancies += ", " + std::to_string(N);
  NJ_FNA_SM80_OCCUPANCY_VARIANTS(NJ_OCC)
#undef NJ_OCC
  if (!occ_ok)
    return "sm80_occupancy must be 0 (the default) or one of " + occupancies + ", got " +
           std::to_string(occupancy);
  return "";
}

// Why the float32 kernels of head_dim cannot run on a device of compute capability major.x
// ("" if they can): head dim 128 stages ~205 KB of shared memory per block, which needs 9.x.
inline std::string fna_float32_unsupported_on(int head_dim, int major) {
  if (head_dim > kFloat32MaxHeadDimBefore90 && major < 9)
    return "float32 at head_dim " + std::to_string(head_dim) +
           " needs a compute capability 9.x GPU (shared memory); this one is " +
           std::to_string(major) + ".x";
  return "";
}

}  // namespace fna
}  // namespace natten_jax
