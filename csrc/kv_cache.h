// gptcore KV-cache extension: shared declarations.
// Op schemas live in kv_cache.cpp (TORCH_LIBRARY); each op has one implementation per
// device, registered with TORCH_LIBRARY_IMPL(gptcore, CPU/CUDA, ...).
#pragma once
#include <torch/library.h>
#include <ATen/ATen.h>

#include <string>
#include <type_traits>

namespace gptcore {

// GPTCORE_CHECK(cond, parts...) is TORCH_CHECK with the message assembled by std::to_string and
// string appends, then handed over as one const char*. Streaming integers into TORCH_CHECK's
// std::ostringstream segfaulted (inside ostream::operator<<(long)) in an extension built with
// g++ 13 against the torch 2.11+cu130 wheel; this path uses no iostreams in the extension.
namespace detail {
inline void append(std::string& s, const char* v) { s += v; }
inline void append(std::string& s, const std::string& v) { s += v; }
template <typename T, std::enable_if_t<std::is_integral_v<T>, int> = 0>
inline void append(std::string& s, T v) { s += std::to_string(v); }
inline void append(std::string& s, c10::IntArrayRef v) {
  s += "[";
  for (size_t i = 0; i < v.size(); ++i) s += (i ? ", " : "") + std::to_string(v[i]);
  s += "]";
}
inline void append(std::string& s, c10::ScalarType t) { s += c10::toString(t); }
inline void append(std::string& s, const c10::Device& d) { s += d.str(); }
template <typename... Args>
std::string message(const Args&... args) {
  std::string s;
  (append(s, args), ...);
  return s;
}
}  // namespace detail

#define GPTCORE_CHECK(cond, ...) \
  TORCH_CHECK(cond, ::gptcore::detail::message(__VA_ARGS__).c_str())

// Checks shared by the CPU and CUDA implementations of kv_append.
//   cache: [B, H, T_max, D]   new_kv: [B, H, T_new, D]   pos: [B] int64 (on cache's device)
void check_kv_append(const at::Tensor& cache, const at::Tensor& new_kv, const at::Tensor& pos);

#ifdef GPTCORE_WITH_CUDA
void kv_append_cuda(at::Tensor& cache, const at::Tensor& new_kv, const at::Tensor& pos);
#endif

}  // namespace gptcore
