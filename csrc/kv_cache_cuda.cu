// gptcore KV-cache extension: CUDA implementations (compiled only where CUDA exists).
#include "kv_cache.h"

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

namespace gptcore {

// One thread block per (b, h, t) row of new_kv; threads copy D elements as 16-byte words
// where alignment allows.
//   cache: [B, H, Tmax, D]  new_kv: [B, H, Tn, D] (contiguous)  pos: [B]
template <typename vec_t>
__global__ void kv_append_kernel(char* __restrict__ cache, const char* __restrict__ new_kv,
                                 const int64_t* __restrict__ pos, int64_t H, int64_t Tmax,
                                 int64_t Tn, int64_t row_vecs) {
  const int64_t r = blockIdx.x;  // flat (b, h, t)
  const int64_t t = r % Tn;
  const int64_t bh = r / Tn;
  const int64_t b = bh / H;
  const int64_t dst_row = bh * Tmax + pos[b] + t;
  const vec_t* src = reinterpret_cast<const vec_t*>(new_kv) + r * row_vecs;
  vec_t* dst = reinterpret_cast<vec_t*>(cache) + dst_row * row_vecs;
  for (int64_t i = threadIdx.x; i < row_vecs; i += blockDim.x) dst[i] = src[i];
}

void kv_append_cuda(at::Tensor& cache, const at::Tensor& new_kv_in, const at::Tensor& pos) {
  check_kv_append(cache, new_kv_in, pos);
  const at::cuda::CUDAGuard guard(cache.device());
  const at::Tensor new_kv = new_kv_in.contiguous();
  const int64_t B = cache.size(0), H = cache.size(1), Tmax = cache.size(2), D = cache.size(3);
  const int64_t Tn = new_kv.size(2);
  // Bounds are checked on the host: one small copy, and never an out-of-bounds write.
  const at::Tensor pmin = pos.min().cpu(), pmax = pos.max().cpu();
  GPTCORE_CHECK(pmin.item<int64_t>() >= 0 && pmax.item<int64_t>() + Tn <= Tmax,
              "kv_append: positions [", pmin.item<int64_t>(), ", ", pmax.item<int64_t>() + Tn,
              ") exceed the cache's ", Tmax, " positions");
  if (B * H * Tn == 0) return;
  const int64_t row_bytes = D * cache.element_size();
  auto stream = at::cuda::getCurrentCUDAStream();
  const int64_t rows = B * H * Tn;
  if (row_bytes % 16 == 0) {
    kv_append_kernel<int4><<<rows, 32, 0, stream>>>(
        static_cast<char*>(cache.data_ptr()), static_cast<const char*>(new_kv.data_ptr()),
        pos.data_ptr<int64_t>(), H, Tmax, Tn, row_bytes / 16);
  } else {
    kv_append_kernel<char><<<rows, 128, 0, stream>>>(
        static_cast<char*>(cache.data_ptr()), static_cast<const char*>(new_kv.data_ptr()),
        pos.data_ptr<int64_t>(), H, Tmax, Tn, row_bytes);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

TORCH_LIBRARY_IMPL(gptcore, CUDA, m) { m.impl("kv_append", &kv_append_cuda); }

}  // namespace gptcore
