// gptcore KV-cache extension: op schemas, input checks and CPU implementations.
//
// Built by setup.py as gptcore._C; importing it registers the ops under torch.ops.gptcore:
//   kv_append(cache!, new_kv, pos)                      static cache, one tensor
//   kv_append_kv(k_cache!, v_cache!, k, v, pos, host_check=True)   static cache, keys and values in one call
//   paged_append(k_cache!, v_cache!, k, v, block_table, pos, host_check=True)   paged cache, through the block table
//   (host_check=False: on CUDA, skip the host copy of pos/block_table for the bounds check, i.e. the
//   sync; for callers that already guarantee the bounds, as gptcore.kv_cache does with its host
//   shadows. The kernels still drop any out-of-bounds write.)
//   paged_gather(cache, block_table, lengths, max_len, host_check=True) -> [B, H, max_len, D]  (zeros past length)
//   kv_reorder(cache!, index, length)                   cache[:, i] = old cache[:, index[i]]
// CUDA implementations live in kv_cache_cuda.cu and are compiled only where CUDA exists; the
// CPU ones below are plain loops over rows (at::parallel_for + memcpy).
// Tests: tests/test_kv_ops.py compares every op with a Python loop.
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

// ---- shape / dtype / device checks ---------------------------------------------------------

static void check_same_device(const char* op, const at::Tensor& a, const at::Tensor& b,
                              const char* a_name, const char* b_name) {
  GPTCORE_CHECK(a.device() == b.device(), op, ": ", a_name, " and ", b_name,
              " must be on one device; got ", a.device(), " and ", b.device(),
              " (move them with .to(", a_name, ".device))");
}

static void check_pos(const char* op, const at::Tensor& pos, int64_t batch, const char* name) {
  GPTCORE_CHECK(pos.dim() == 1 && pos.size(0) == batch, op, ": ", name, " must be [B] with B = ",
              batch, ", got ", pos.sizes());
  GPTCORE_CHECK(pos.scalar_type() == at::kLong, op, ": ", name, " must be int64, got ",
              pos.scalar_type(), " (use .long())");
  GPTCORE_CHECK(pos.is_contiguous(), op, ": ", name, " must be contiguous (call .contiguous())");
}

static void check_block_table(const char* op, const at::Tensor& bt, int64_t batch) {
  GPTCORE_CHECK(bt.dim() == 2 && bt.size(0) == batch, op, ": block_table must be [B, max_blocks] with B = ",
              batch, ", got ", bt.sizes());
  GPTCORE_CHECK(bt.scalar_type() == at::kInt || bt.scalar_type() == at::kLong, op,
              ": block_table must be int32 or int64, got ", bt.scalar_type());
  GPTCORE_CHECK(bt.is_contiguous(), op, ": block_table must be contiguous (call .contiguous())");
}

void check_kv_append(const at::Tensor& cache, const at::Tensor& new_kv, const at::Tensor& pos) {
  GPTCORE_CHECK(cache.dim() == 4, "kv_append: cache must be [B, H, T_max, D], got ", cache.sizes());
  GPTCORE_CHECK(new_kv.dim() == 4, "kv_append: new_kv must be [B, H, T_new, D], got ", new_kv.sizes());
  check_pos("kv_append", pos, cache.size(0), "pos");
  GPTCORE_CHECK(cache.scalar_type() == new_kv.scalar_type(), "kv_append: dtype mismatch, cache is ",
              cache.scalar_type(), " but new_kv is ", new_kv.scalar_type());
  check_same_device("kv_append", cache, new_kv, "cache", "new_kv");
  check_same_device("kv_append", cache, pos, "cache", "pos");
  GPTCORE_CHECK(cache.is_contiguous(), "kv_append: cache must be contiguous");
  GPTCORE_CHECK(new_kv.size(0) == cache.size(0) && new_kv.size(1) == cache.size(1) &&
                  new_kv.size(3) == cache.size(3),
              "kv_append: new_kv ", new_kv.sizes(), " does not fit cache ", cache.sizes());
}

void check_paged_append(const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& k,
                        const at::Tensor& v, const at::Tensor& block_table, const at::Tensor& pos) {
  const char* op = "paged_append";
  GPTCORE_CHECK(k_cache.dim() == 4, op, ": k_cache must be [num_blocks, H, block_size, D], got ",
              k_cache.sizes());
  GPTCORE_CHECK(v_cache.sizes() == k_cache.sizes(), op, ": v_cache ", v_cache.sizes(),
              " must have k_cache's shape ", k_cache.sizes());
  GPTCORE_CHECK(k.dim() == 4, op, ": k must be [B, H, T_new, D], got ", k.sizes());
  GPTCORE_CHECK(v.sizes() == k.sizes(), op, ": v ", v.sizes(), " must have k's shape ", k.sizes());
  GPTCORE_CHECK(k.size(1) == k_cache.size(1) && k.size(3) == k_cache.size(3), op, ": k ", k.sizes(),
              " does not fit cache blocks ", k_cache.sizes(), " (H and D must match)");
  for (const at::Tensor* t : {&v_cache, &k, &v}) {
    GPTCORE_CHECK(t->scalar_type() == k_cache.scalar_type(), op, ": dtype mismatch, k_cache is ",
                k_cache.scalar_type(), " but got ", t->scalar_type());
  }
  check_same_device(op, k_cache, v_cache, "k_cache", "v_cache");
  check_same_device(op, k_cache, k, "k_cache", "k");
  check_same_device(op, k_cache, v, "k_cache", "v");
  check_same_device(op, k_cache, block_table, "k_cache", "block_table");
  check_same_device(op, k_cache, pos, "k_cache", "pos");
  GPTCORE_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), op,
              ": k_cache and v_cache must be contiguous");
  check_block_table(op, block_table, k.size(0));
  check_pos(op, pos, k.size(0), "pos");
}

void check_paged_gather(const at::Tensor& cache, const at::Tensor& block_table,
                        const at::Tensor& lengths, int64_t max_len) {
  const char* op = "paged_gather";
  GPTCORE_CHECK(cache.dim() == 4, op, ": cache must be [num_blocks, H, block_size, D], got ",
              cache.sizes());
  GPTCORE_CHECK(cache.is_contiguous(), op, ": cache must be contiguous");
  check_same_device(op, cache, block_table, "cache", "block_table");
  check_same_device(op, cache, lengths, "cache", "lengths");
  check_block_table(op, block_table, block_table.size(0));
  check_pos(op, lengths, block_table.size(0), "lengths");
  GPTCORE_CHECK(max_len >= 0, op, ": max_len must be >= 0, got ", max_len);
}

void check_kv_reorder(const at::Tensor& cache, const at::Tensor& index, int64_t length) {
  const char* op = "kv_reorder";
  GPTCORE_CHECK(cache.dim() == 5, op, ": cache must be [N, B, H, T, D] (e.g. layers*2 flattened), got ",
              cache.sizes());
  GPTCORE_CHECK(cache.is_contiguous(), op, ": cache must be contiguous");
  check_same_device(op, cache, index, "cache", "index");
  GPTCORE_CHECK(index.dim() == 1 && index.size(0) <= cache.size(1), op,
              ": index must be [B'] with B' <= B = ", cache.size(1), ", got ", index.sizes());
  GPTCORE_CHECK(index.scalar_type() == at::kLong, op, ": index must be int64, got ",
              index.scalar_type(), " (use .long())");
  GPTCORE_CHECK(index.is_contiguous(), op, ": index must be contiguous (call .contiguous())");
  GPTCORE_CHECK(length >= 0 && length <= cache.size(3), op, ": length ", length,
              " must be in [0, T = ", cache.size(3), "]");
}

at::Tensor rows_contiguous(const at::Tensor& t) {
  return t.size(-1) <= 1 || t.stride(-1) == 1 ? t : t.contiguous();
}

// ---- value (bounds) checks on host tensors ------------------------------------------------

void check_positions_host(const char* op, const at::Tensor& pos, int64_t t_new, int64_t t_max) {
  const at::Tensor p_cpu = pos.cpu().contiguous();
  const int64_t* p = p_cpu.data_ptr<int64_t>();
  for (int64_t b = 0; b < p_cpu.size(0); ++b) {
    GPTCORE_CHECK(p[b] >= 0 && p[b] + t_new <= t_max, op, ": sequence ", b, " writes positions [",
                p[b], ", ", p[b] + t_new, ") but the cache holds ", t_max, " positions");
  }
}

void check_blocks_host(const char* op, const at::Tensor& block_table, const at::Tensor& pos,
                       int64_t t_new, int64_t block_size, int64_t num_blocks) {
  const at::Tensor bt = block_table.cpu().to(at::kLong).contiguous();
  const at::Tensor p_cpu = pos.cpu().contiguous();
  const int64_t* p = p_cpu.data_ptr<int64_t>();
  const int64_t* tab = bt.data_ptr<int64_t>();
  const int64_t max_blocks = bt.size(1);
  for (int64_t b = 0; b < bt.size(0); ++b) {
    if (t_new == 0) continue;
    GPTCORE_CHECK(p[b] >= 0 && p[b] + t_new <= max_blocks * block_size, op, ": sequence ", b,
                " writes positions [", p[b], ", ", p[b] + t_new, ") but its block table holds ",
                max_blocks, " blocks of ", block_size, " = ", max_blocks * block_size, " positions");
    for (int64_t j = p[b] / block_size; j <= (p[b] + t_new - 1) / block_size; ++j) {
      const int64_t id = tab[b * max_blocks + j];
      GPTCORE_CHECK(id >= 0 && id < num_blocks, op, ": block_table[", b, ", ", j, "] = ", id,
                  " is not a block of the cache (num_blocks = ", num_blocks,
                  "); allocate the block before writing position ", j * block_size);
    }
  }
}

void check_gather_host(const at::Tensor& block_table, const at::Tensor& lengths, int64_t max_len,
                       int64_t block_size, int64_t num_blocks) {
  const at::Tensor bt = block_table.cpu().to(at::kLong).contiguous();
  const at::Tensor l_cpu = lengths.cpu().contiguous();
  const int64_t* len = l_cpu.data_ptr<int64_t>();
  const int64_t* tab = bt.data_ptr<int64_t>();
  const int64_t max_blocks = bt.size(1);
  for (int64_t b = 0; b < bt.size(0); ++b) {
    GPTCORE_CHECK(len[b] >= 0 && len[b] <= max_len, "paged_gather: lengths[", b, "] = ", len[b],
                " must be in [0, max_len = ", max_len, "]");
    GPTCORE_CHECK(len[b] <= max_blocks * block_size, "paged_gather: lengths[", b, "] = ", len[b],
                " exceeds the ", max_blocks * block_size, " positions its block table can hold");
    for (int64_t j = 0; j * block_size < len[b]; ++j) {
      const int64_t id = tab[b * max_blocks + j];
      GPTCORE_CHECK(id >= 0 && id < num_blocks, "paged_gather: block_table[", b, ", ", j, "] = ", id,
                  " is not a block of the cache (num_blocks = ", num_blocks, ")");
    }
  }
}

void check_index_host(const at::Tensor& index, int64_t batch) {
  const at::Tensor i_cpu = index.cpu().contiguous();
  const int64_t* idx = i_cpu.data_ptr<int64_t>();
  for (int64_t i = 0; i < i_cpu.size(0); ++i) {
    GPTCORE_CHECK(idx[i] >= 0 && idx[i] < batch, "kv_reorder: index[", i, "] = ", idx[i],
                " is not a sequence of the cache (B = ", batch, ")");
  }
}

// ---- CPU implementations ------------------------------------------------------------------

// For every (b, h, t) row of src [B, H, T_new, D] (stride(-1) == 1), copies its D elements to row
// dst_row(b, h, t) of dst (rows of D elements).
template <typename RowFn>
static void copy_rows_cpu(at::Tensor& dst, const at::Tensor& src, RowFn dst_row) {
  const int64_t B = src.size(0), H = src.size(1), Tn = src.size(2);
  const int64_t esz = src.element_size();
  const int64_t row_bytes = src.size(3) * esz;
  const int64_t sb = src.stride(0) * esz, sh = src.stride(1) * esz, st = src.stride(2) * esz;
  auto* out = static_cast<char*>(dst.data_ptr());
  const auto* in = static_cast<const char*>(src.data_ptr());
  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / H, h = bh % H;
      for (int64_t t = 0; t < Tn; ++t) {
        std::memcpy(out + dst_row(b, h, t) * row_bytes, in + b * sb + h * sh + t * st, row_bytes);
      }
    }
  });
}

// cache[b, :, pos[b] : pos[b] + T_new, :] = new_kv[b]
static void kv_append_cpu(at::Tensor& cache, const at::Tensor& new_kv_in, const at::Tensor& pos) {
  check_kv_append(cache, new_kv_in, pos);
  const at::Tensor new_kv = rows_contiguous(new_kv_in);
  const int64_t H = cache.size(1), Tmax = cache.size(2), Tn = new_kv.size(2);
  check_positions_host("kv_append", pos, Tn, Tmax);
  const int64_t* p = pos.data_ptr<int64_t>();
  copy_rows_cpu(cache, new_kv, [&](int64_t b, int64_t h, int64_t t) {
    return (b * H + h) * Tmax + p[b] + t;
  });
}

// kv_append for keys and values at once (same positions).
// host_check only matters on CUDA (there it costs a device-to-host sync); the CPU always checks.
static void kv_append_kv_cpu(at::Tensor& k_cache, at::Tensor& v_cache, const at::Tensor& k,
                             const at::Tensor& v, const at::Tensor& pos, bool /*host_check*/) {
  check_kv_append(k_cache, k, pos);
  check_kv_append(v_cache, v, pos);
  GPTCORE_CHECK(k_cache.sizes() == v_cache.sizes() && k.sizes() == v.sizes(),
              "kv_append_kv: k_cache/v_cache and k/v must have matching shapes, got ",
              k_cache.sizes(), " / ", v_cache.sizes(), " and ", k.sizes(), " / ", v.sizes());
  const int64_t H = k_cache.size(1), Tmax = k_cache.size(2), Tn = k.size(2);
  check_positions_host("kv_append_kv", pos, Tn, Tmax);
  const int64_t* p = pos.data_ptr<int64_t>();
  auto row = [&](int64_t b, int64_t h, int64_t t) { return (b * H + h) * Tmax + p[b] + t; };
  copy_rows_cpu(k_cache, rows_contiguous(k), row);
  copy_rows_cpu(v_cache, rows_contiguous(v), row);
}

// Token t of sequence b sits at logical position p = pos[b] + t, i.e. in cache block
// block_table[b, p / block_size] at slot p % block_size.
static void paged_append_cpu(at::Tensor& k_cache, at::Tensor& v_cache, const at::Tensor& k,
                             const at::Tensor& v, const at::Tensor& block_table, const at::Tensor& pos,
                             bool /*host_check*/) {
  check_paged_append(k_cache, v_cache, k, v, block_table, pos);
  const int64_t NB = k_cache.size(0), H = k_cache.size(1), bs = k_cache.size(2);
  check_blocks_host("paged_append", block_table, pos, k.size(2), bs, NB);
  const at::Tensor bt = block_table.to(at::kLong);
  const int64_t* tab = bt.data_ptr<int64_t>();
  const int64_t MB = bt.size(1);
  const int64_t* p = pos.data_ptr<int64_t>();
  auto row = [&](int64_t b, int64_t h, int64_t t) {
    const int64_t q = p[b] + t;
    return (tab[b * MB + q / bs] * H + h) * bs + q % bs;
  };
  copy_rows_cpu(k_cache, rows_contiguous(k), row);
  copy_rows_cpu(v_cache, rows_contiguous(v), row);
}

// out[b, h, t] = cache[block_table[b, t / bs], h, t % bs] for t < lengths[b], zeros after.
static at::Tensor paged_gather_cpu(const at::Tensor& cache, const at::Tensor& block_table,
                                   const at::Tensor& lengths, int64_t max_len, bool /*host_check*/) {
  check_paged_gather(cache, block_table, lengths, max_len);
  const int64_t NB = cache.size(0), H = cache.size(1), bs = cache.size(2), D = cache.size(3);
  check_gather_host(block_table, lengths, max_len, bs, NB);
  const int64_t B = block_table.size(0), MB = block_table.size(1);
  at::Tensor out = at::empty({B, H, max_len, D}, cache.options());
  const at::Tensor bt = block_table.to(at::kLong);
  const int64_t* tab = bt.data_ptr<int64_t>();
  const int64_t* len = lengths.data_ptr<int64_t>();
  const int64_t row_bytes = D * cache.element_size();
  const auto* src = static_cast<const char*>(cache.data_ptr());
  auto* dst = static_cast<char*>(out.data_ptr());
  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / H, h = bh % H;
      for (int64_t t = 0; t < max_len; ++t) {
        char* o = dst + (bh * max_len + t) * row_bytes;
        if (t < len[b]) {
          std::memcpy(o, src + ((tab[b * MB + t / bs] * H + h) * bs + t % bs) * row_bytes, row_bytes);
        } else {
          std::memset(o, 0, row_bytes);
        }
      }
    }
  });
  return out;
}

// cache[n, i, :, :length] = old cache[n, index[i], :, :length] for i < len(index); index may repeat
// (beam search) and the rest of the cache is untouched. Goes through a scratch copy of the rows.
static void kv_reorder_cpu(at::Tensor& cache, const at::Tensor& index, int64_t length) {
  check_kv_reorder(cache, index, length);
  const int64_t N = cache.size(0), B = cache.size(1), H = cache.size(2), T = cache.size(3);
  check_index_host(index, B);
  const int64_t Bn = index.size(0);
  const int64_t row_bytes = length * cache.size(4) * cache.element_size();  // one (n, b, h) prefix
  const int64_t stride_bytes = T * cache.size(4) * cache.element_size();
  if (row_bytes == 0 || Bn == 0) return;
  at::Tensor scratch = at::empty({N * Bn * H * row_bytes}, cache.options().dtype(at::kByte));
  auto* data = static_cast<char*>(cache.data_ptr());
  auto* tmp = scratch.data_ptr<uint8_t>();
  const int64_t* idx = index.data_ptr<int64_t>();
  at::parallel_for(0, N * Bn * H, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t h = r % H, i = (r / H) % Bn, n = r / (H * Bn);
      std::memcpy(tmp + r * row_bytes, data + ((n * B + idx[i]) * H + h) * stride_bytes, row_bytes);
    }
  });
  at::parallel_for(0, N * Bn * H, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t h = r % H, i = (r / H) % Bn, n = r / (H * Bn);
      std::memcpy(data + ((n * B + i) * H + h) * stride_bytes, tmp + r * row_bytes, row_bytes);
    }
  });
}

TORCH_LIBRARY(gptcore, m) {
  m.def("kv_append(Tensor(a!) cache, Tensor new_kv, Tensor pos) -> ()");
  m.def(
      "kv_append_kv(Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor k, Tensor v, Tensor pos, "
      "bool host_check=True) -> ()");
  m.def(
      "paged_append(Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor k, Tensor v, Tensor block_table, "
      "Tensor pos, bool host_check=True) -> ()");
  m.def("paged_gather(Tensor cache, Tensor block_table, Tensor lengths, int max_len, bool host_check=True) -> Tensor");
  m.def("kv_reorder(Tensor(a!) cache, Tensor index, int length) -> ()");
}

TORCH_LIBRARY_IMPL(gptcore, CPU, m) {
  m.impl("kv_append", &kv_append_cpu);
  m.impl("kv_append_kv", &kv_append_kv_cpu);
  m.impl("paged_append", &paged_append_cpu);
  m.impl("paged_gather", &paged_gather_cpu);
  m.impl("kv_reorder", &kv_reorder_cpu);
}

}  // namespace gptcore
