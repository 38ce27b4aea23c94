// gptcore KV-cache extension: op schemas and CPU implementations.
//
// Built by setup.py as gptcore._C; importing it registers the ops under torch.ops.gptcore.
// CUDA implementations live in kv_cache_cuda.cu and are compiled only where CUDA exists.
#include <Python.h>
#include "kv_cache.h"

#include <ATen/Parallel.h>

#include <cstring>

// Importing gptcore._C runs the static TORCH_LIBRARY registrations below; the module itself
// exposes nothing (ops are reached as torch.ops.gptcore.*).
extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&def);
}
}

namespace gptcore {

void check_kv_append(const at::Tensor& cache, const at::Tensor& new_kv, const at::Tensor& pos) {
  GPTCORE_CHECK(cache.dim() == 4, "kv_append: cache must be [B, H, T_max, D], got ", cache.sizes());
  GPTCORE_CHECK(new_kv.dim() == 4, "kv_append: new_kv must be [B, H, T_new, D], got ", new_kv.sizes());
  GPTCORE_CHECK(pos.dim() == 1 && pos.size(0) == cache.size(0),
              "kv_append: pos must be [B] with B = ", cache.size(0), ", got ", pos.sizes());
  GPTCORE_CHECK(pos.scalar_type() == at::kLong, "kv_append: pos must be int64, got ", pos.scalar_type());
  GPTCORE_CHECK(cache.scalar_type() == new_kv.scalar_type(), "kv_append: dtype mismatch, cache is ",
              cache.scalar_type(), " but new_kv is ", new_kv.scalar_type());
  GPTCORE_CHECK(cache.device() == new_kv.device() && cache.device() == pos.device(),
              "kv_append: cache, new_kv and pos must be on one device; got ", cache.device(), ", ",
              new_kv.device(), ", ", pos.device());
  GPTCORE_CHECK(cache.is_contiguous(), "kv_append: cache must be contiguous");
  GPTCORE_CHECK(new_kv.size(0) == cache.size(0) && new_kv.size(1) == cache.size(1) &&
                  new_kv.size(3) == cache.size(3),
              "kv_append: new_kv ", new_kv.sizes(), " does not fit cache ", cache.sizes());
}

// cache[b, :, pos[b] : pos[b] + T_new, :] = new_kv[b]
static void kv_append_cpu(at::Tensor& cache, const at::Tensor& new_kv_in, const at::Tensor& pos) {
  check_kv_append(cache, new_kv_in, pos);
  const at::Tensor new_kv = new_kv_in.contiguous();
  const int64_t B = cache.size(0), H = cache.size(1), Tmax = cache.size(2), D = cache.size(3);
  const int64_t Tn = new_kv.size(2);
  const int64_t* p = pos.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b) {
    GPTCORE_CHECK(p[b] >= 0 && p[b] + Tn <= Tmax, "kv_append: sequence ", b, " writes positions [",
                p[b], ", ", p[b] + Tn, ") but the cache holds ", Tmax, " positions");
  }
  const int64_t esz = cache.element_size();
  auto* dst = static_cast<char*>(cache.data_ptr());
  const auto* src = static_cast<const char*>(new_kv.data_ptr());
  const int64_t row = Tn * D * esz;  // one (b, h) slice of new_kv, contiguous in both tensors
  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / H;
      std::memcpy(dst + ((bh * Tmax + p[b]) * D) * esz, src + bh * row, row);
    }
  });
}

TORCH_LIBRARY(gptcore, m) {
  m.def("kv_append(Tensor(a!) cache, Tensor new_kv, Tensor pos) -> ()");
}

TORCH_LIBRARY_IMPL(gptcore, CPU, m) { m.impl("kv_append", &kv_append_cpu); }

}  // namespace gptcore
