// gptcore KV-cache extension: shared declarations.
// Op schemas live in kv_cache.cpp (TORCH_LIBRARY); each op has one implementation per
// device, registered with TORCH_LIBRARY_IMPL(gptcore, CPU/CUDA, ...).
#pragma once
#include <torch/library.h>
#include <ATen/ATen.h>

namespace gptcore {

// Checks shared by the CPU and CUDA implementations of kv_append.
//   cache: [B, H, T_max, D]   new_kv: [B, H, T_new, D]   pos: [B] int64 (on cache's device)
void check_kv_append(const at::Tensor& cache, const at::Tensor& new_kv, const at::Tensor& pos);

#ifdef GPTCORE_WITH_CUDA
void kv_append_cuda(at::Tensor& cache, const at::Tensor& new_kv, const at::Tensor& pos);
#endif

}  // namespace gptcore
