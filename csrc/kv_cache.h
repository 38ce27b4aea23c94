// gptcore KV-cache extension: shared declarations.
//
// Op schemas live in kv_cache.cpp (TORCH_LIBRARY); each op has one implementation per device,
// registered with TORCH_LIBRARY_IMPL(gptcore, CPU/CUDA, ...). The check_* functions validate
// everything that can be validated without reading device memory (devices, dtypes, shapes,
// contiguity); bounds that depend on tensor *values* (positions, block ids) are checked by each
// implementation: on the host for CPU tensors, and for CUDA tensors by a host-side precheck (one
// sync) unless the stream is capturing a CUDA graph. CUDA kernels additionally skip any write
// whose target would be out of bounds, so a bad value can never corrupt memory.
//
// Layouts (all contiguous unless noted):
//   static cache  [B, H, T_max, D]
//   paged cache   [num_blocks, H, block_size, D]; block_table [B, max_blocks] int32/int64
//   new k / v     [B, H, T_new, D], any strides with stride(-1) == 1
//   pos           [B] int64: position of the first new token of each sequence
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

// kv_append: cache [B, H, T_max, D], new_kv [B, H, T_new, D], pos [B] int64.
void check_kv_append(const at::Tensor& cache, const at::Tensor& new_kv, const at::Tensor& pos);

// paged_append: k_cache/v_cache [NB, H, bs, D], k/v [B, H, T_new, D], block_table [B, MB], pos [B].
void check_paged_append(const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& k,
                        const at::Tensor& v, const at::Tensor& block_table, const at::Tensor& pos);

// paged_gather: cache [NB, H, bs, D], block_table [B, MB], lengths [B] int64, max_len >= 0.
void check_paged_gather(const at::Tensor& cache, const at::Tensor& block_table,
                        const at::Tensor& lengths, int64_t max_len);

// kv_reorder: cache [N, B, H, T, D] (contiguous), index [B'] int64 with B' <= B, 0 <= length <= T.
void check_kv_reorder(const at::Tensor& cache, const at::Tensor& index, int64_t length);

// Value checks on host (CPU) tensors, shared by the CPU implementations and the CUDA prechecks
// (which copy pos / block_table / lengths / index to the host first). Each raises a message that
// names the sequence, position or block at fault.
void check_positions_host(const char* op, const at::Tensor& pos, int64_t t_new, int64_t t_max);
void check_blocks_host(const char* op, const at::Tensor& block_table, const at::Tensor& pos,
                       int64_t t_new, int64_t block_size, int64_t num_blocks);
void check_gather_host(const at::Tensor& block_table, const at::Tensor& lengths, int64_t max_len,
                       int64_t block_size, int64_t num_blocks);
void check_index_host(const at::Tensor& index, int64_t batch);

// new k/v with a contiguous last dim (a copy only when the last dim is strided).
at::Tensor rows_contiguous(const at::Tensor& t);

}  // namespace gptcore
