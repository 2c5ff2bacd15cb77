// The extension module natten_jax._C: exports every XLA FFI handler as a PyCapsule.
//
// To add a target: define its handler with XLA_FFI_DEFINE_HANDLER_SYMBOL(Symbol, ...) in any
// src/cuda/ffi/*.cc (CMake picks the file up) and add one line X("target_name", Symbol) to
// NATTEN_JAX_FFI_TARGETS below. natten_jax/_ffi.py registers everything registrations() returns
// for platform "CUDA".
//
// Handlers are declared weak: a target whose handler is not linked into this build (its source
// was removed or renamed) is left out of registrations() and listed by missing_targets(), rather
// than making the whole module fail to import.
#include <nanobind/nanobind.h>
#include <nanobind/stl/string.h>

#include "natten_jax/fna/kernel_table.h"
#include "xla/ffi/api/ffi.h"

namespace nb = nanobind;

// clang-format off
#define NATTEN_JAX_FFI_TARGETS(X)                          \
  X("natten_jax_window_bounds", NattenJaxWindowBounds)     \
  X("natten_jax_fna_forward", NattenJaxFnaForward)       \
  X("natten_jax_fna_backward", NattenJaxFnaBackward)     \
  X("natten_jax_unfused_pn", NattenJaxUnfusedPn)         \
  X("natten_jax_unfused_nn", NattenJaxUnfusedNn)         \
  X("natten_jax_unfused_in", NattenJaxUnfusedIn)         \
  X("natten_jax_unfused_rpb_grad", NattenJaxUnfusedRpbGrad)
// clang-format on

#define NJ_DECLARE_WEAK_HANDLER(name, symbol)                        \
  extern "C" __attribute__((weak)) XLA_FFI_Error* symbol(XLA_FFI_CallFrame* call_frame);
NATTEN_JAX_FFI_TARGETS(NJ_DECLARE_WEAK_HANDLER)
#undef NJ_DECLARE_WEAK_HANDLER

#ifndef NATTEN_JAX_CUDA_ARCHS_STR
#define NATTEN_JAX_CUDA_ARCHS_STR ""
#endif
#ifndef NATTEN_JAX_CUDA_VERSION_STR
#define NATTEN_JAX_CUDA_VERSION_STR ""
#endif

namespace {

nb::dict registrations() {
  nb::dict d;
#define NJ_ADD_TARGET(name, symbol)                                                    \
  if (&symbol != nullptr) d[name] = nb::capsule(reinterpret_cast<void*>(&symbol));
  NATTEN_JAX_FFI_TARGETS(NJ_ADD_TARGET)
#undef NJ_ADD_TARGET
  return d;
}

nb::list missing_targets() {
  nb::list l;
#define NJ_ADD_MISSING(name, symbol) \
  if (&symbol == nullptr) l.append(name);
  NATTEN_JAX_FFI_TARGETS(NJ_ADD_MISSING)
#undef NJ_ADD_MISSING
  return l;
}

// The fused kernels of this build (natten_jax/fna/kernel_table.h).
nb::dict fused_kernels() {
  nb::list sm80, sm90, occupancies;
#define NJ_ADD80(D) sm80.append(D);
#define NJ_ADD90(D) sm90.append(D);
#define NJ_ADD_OCC(N) occupancies.append(N);
  NJ_FNA_SM80_HEAD_DIMS(NJ_ADD80)
  NJ_FNA_SM90_HEAD_DIMS(NJ_ADD90)
  occupancies.append(natten_jax::fna::kDefaultSm80Occupancy);
  NJ_FNA_SM80_OCCUPANCY_VARIANTS(NJ_ADD_OCC)
#undef NJ_ADD80
#undef NJ_ADD90
#undef NJ_ADD_OCC
  nb::dict d;
  d["sm80_head_dims"] = sm80;
  d["sm90_head_dims"] = sm90;
  d["sm80_occupancies"] = occupancies;
  d["kv_tile_tokens"] = natten_jax::fna::kKvTileTokens;
  d["sm90_forward_wide_kv_tile_tokens"] = natten_jax::fna::kSm90FwdWideKvTileTokens;
  d["float32_max_head_dim_before_90"] = natten_jax::fna::kFloat32MaxHeadDimBefore90;
  d["float32_q_tile_tokens"] = natten_jax::fna::kFloat32QTileTokens;
  return d;
}

}  // namespace

NB_MODULE(_C, m) {
  m.doc() = "natten_jax CUDA kernels as XLA FFI handlers (register with jax.ffi, platform CUDA)";
  m.def("registrations", &registrations,
        "dict: FFI target name -> PyCapsule of its handler (XLA FFI API, platform CUDA).");
  m.def("missing_targets", &missing_targets,
        "list: target names declared in module.cc whose handler is not linked into this build.");
  m.def("cuda_compiled_archs", []() { return std::string(NATTEN_JAX_CUDA_ARCHS_STR); },
        "The CUDA architectures this module was compiled for, comma-separated, e.g. '80,90a'.");
  m.attr("cuda_version") = NATTEN_JAX_CUDA_VERSION_STR;
  m.def("fused_kernels", &fused_kernels,
        "dict: the fused kernels of this build (head dims per implementation, sm80 forward "
        "occupancies, KV tile tokens, the float32 rules), from kernel_table.h.");
}
