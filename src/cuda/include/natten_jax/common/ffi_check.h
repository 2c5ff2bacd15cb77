// Error plumbing for XLA FFI handlers: every failure becomes an xla::ffi::Error that the handler
// returns (XLA raises it in Python); nothing here aborts or exits.
//
//   NJ_FFI_CHECK(cond, msg)  -> InvalidArgument "natten_jax: <msg> (check failed: <cond>)"
//   NJ_CUDA_CHECK(expr)      -> Internal "natten_jax: CUDA error <name> (<text>) in `<expr>` at
//                               file:line"; `expr` must yield a cudaError_t
//   NJ_CUDA_CHECK_LAUNCH()   -> NJ_CUDA_CHECK(cudaGetLastError()), for use right after <<<...>>>
//   NJ_RETURN_IF_ERROR(expr) -> propagates a failed xla::ffi::Error returned by a helper
//
// `msg` may be a C string or a std::string. Include from .cc or .cu files.
#pragma once

#include <string>

#include <cuda_runtime_api.h>

#include "xla/ffi/api/ffi.h"

namespace natten_jax {
namespace detail {

inline xla::ffi::Error cuda_error(cudaError_t err, const char* expr, const char* file,
                                  int line) {
  std::string msg = "natten_jax: CUDA error ";
  msg += cudaGetErrorName(err);
  msg += " (";
  msg += cudaGetErrorString(err);
  msg += ") in `";
  msg += expr;
  msg += "` at ";
  msg += file;
  msg += ":";
  msg += std::to_string(line);
  return xla::ffi::Error::Internal(std::move(msg));
}

inline xla::ffi::Error invalid_argument(const std::string& what, const char* cond) {
  return xla::ffi::Error::InvalidArgument("natten_jax: " + what + " (check failed: " + cond +
                                          ")");
}

}  // namespace detail
}  // namespace natten_jax

#define NJ_FFI_CHECK(cond, msg)                                              \
  do {                                                                       \
    if (!(cond)) {                                                           \
      return ::natten_jax::detail::invalid_argument(std::string(msg), #cond); \
    }                                                                        \
  } while (0)

#define NJ_CUDA_CHECK(expr)                                                          \
  do {                                                                               \
    cudaError_t nj_cuda_err_ = (expr);                                               \
    if (nj_cuda_err_ != cudaSuccess) {                                               \
      return ::natten_jax::detail::cuda_error(nj_cuda_err_, #expr, __FILE__, __LINE__); \
    }                                                                                \
  } while (0)

#define NJ_CUDA_CHECK_LAUNCH() NJ_CUDA_CHECK(cudaGetLastError())

#define NJ_RETURN_IF_ERROR(expr)                    \
  do {                                              \
    ::xla::ffi::Error nj_ffi_err_ = (expr);         \
    if (nj_ffi_err_.failure()) return nj_ffi_err_;  \
  } while (0)

// Traits of every kernel handler: command-buffer (CUDA graph) compatible. The handlers make no
// host synchronisation and allocate nothing: they read attributes and device properties, set
// kernel attributes, and enqueue memsets and kernel launches on the FFI stream, all of which CUDA
// stream capture records or allows (tests/test_command_buffer.py checks the captured results).
#define NJ_FFI_HANDLER_TRAITS {::xla::ffi::Traits::kCmdBufferCompatible}
