// gptcore KV-cache extension: CUDA implementations (compiled only where CUDA exists).
//
// Every kernel is a flat copy: one thread moves one vector of VEC bytes (16 where the row size,
// the base pointers and the strides allow, else 8/4/2/1) of one (tensor, b, h, t) row, so a
// warp reads and writes whole 128-byte lines even when D * element_size is only 128 bytes.
// Index arithmetic is 32-bit with precomputed magic-number division (ATen's IntDivider).
//
// Bounds: outside CUDA-graph capture (and unless host_check=False) each op first copies its small index tensors (pos,
// block_table, lengths, index) to the host and runs the same checks as the CPU ops (one sync),
// so a bad position or block id is a clear error and nothing is written. Under capture a host
// read is impossible; then the caller must guarantee the bounds (gptcore.kv_cache keeps host-side
// shadow counters for exactly that), and the kernels skip any write whose target would be out of
// bounds, so even a wrong value never writes outside the cache.
#include "kv_cache.h"

#include <ATen/cuda/detail/IntegerDivider.cuh>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <type_traits>

namespace gptcore {
namespace {

using Div = at::cuda::detail::IntDivider<unsigned int>;

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = 4096;  // grid-stride loops beyond this (a few waves on any GPU)

bool capturing() {
  return c10::cuda::currentStreamCaptureStatusMayInitCtx() != c10::cuda::CaptureStatus::None;
}

// Widest copy unit (bytes) dividing every size, stride and address involved.
int pick_vec(std::initializer_list<int64_t> byte_quantities) {
  for (int vec : {16, 8, 4, 2}) {
    bool ok = true;
    for (int64_t q : byte_quantities) ok = ok && (q % vec == 0);
    if (ok) return vec;
  }
  return 1;
}

unsigned int blocks_for(int64_t total) {
  return static_cast<unsigned int>(std::max<int64_t>(1, std::min<int64_t>((total + kThreads - 1) / kThreads, kMaxBlocks)));
}

void check_32bit(const char* op, int64_t total) {
  GPTCORE_CHECK(total < std::numeric_limits<int32_t>::max(), op, ": ", total,
              " copy units exceed this kernel's 32-bit indexing; split the call along the batch");
}

template <int N> struct VecOf;
template <> struct VecOf<16> { using type = uint4; };
template <> struct VecOf<8> { using type = uint2; };
template <> struct VecOf<4> { using type = uint32_t; };
template <> struct VecOf<2> { using type = uint16_t; };
template <> struct VecOf<1> { using type = uint8_t; };

template <typename F>
void dispatch_vec(int vec, F&& f) {
  switch (vec) {
    case 16: f(VecOf<16>::type{}); break;
    case 8: f(VecOf<8>::type{}); break;
    case 4: f(VecOf<4>::type{}); break;
    case 2: f(VecOf<2>::type{}); break;
    default: f(VecOf<1>::type{}); break;
  }
}

// Source rows: new keys/values [B, H, Tn, D], strides in bytes, last dim contiguous.
struct Src {
  const char* ptr;
  int64_t sb, sh, st;
};

Src src_of(const at::Tensor& t) {
  const int64_t e = t.element_size();
  return {static_cast<const char*>(t.data_ptr()), t.stride(0) * e, t.stride(1) * e, t.stride(2) * e};
}

// ---- appends ------------------------------------------------------------------------------
// Thread i -> (which, b, h, t, v): which selects k (0) or v (1); rows are `row_vecs` vectors.
// Static destination row:  (b * H + h) * Tmax + pos[b] + t               in cache [B, H, Tmax, D]
// Paged destination row:   (blk * H + h) * bs + (pos[b] + t) % bs, blk = block_table[b, (pos[b] + t) / bs]
//                                                                        in cache [NB, H, bs, D]
// Each thread moves kAppendUnroll vectors per loop trip (i, i + blockDim, ...): all their loads
// are issued before the first store, so a thread keeps several loads in flight instead of one.
constexpr int kAppendUnroll = 4;

// HEAD_INNER orders threads (b, t, which, h, v) instead: for sources whose heads sit closer in
// memory than their tokens (the model's k, v views of one (B, T, 3, H, D) qkv buffer) a warp then
// reads consecutive source bytes.
template <typename vec_t, bool PAGED, bool HEAD_INNER, typename idx_t>
__global__ void append_kernel(char* __restrict__ dst0, char* __restrict__ dst1, Src s0, Src s1,
                              const int64_t* __restrict__ pos, const idx_t* __restrict__ block_table,
                              Div div_vecs, Div div_t, Div div_h, Div div_b, Div div_w, unsigned int total,
                              int64_t H, int64_t t_cap, int64_t bs, int64_t max_blocks, int64_t num_blocks) {
  const int64_t row_vecs = div_vecs.divisor;
  const unsigned int step = gridDim.x * blockDim.x * kAppendUnroll;
  for (unsigned int i0 = blockIdx.x * blockDim.x * kAppendUnroll + threadIdx.x; i0 < total; i0 += step) {
    vec_t val[kAppendUnroll];
    vec_t* dst[kAppendUnroll];
#pragma unroll
    for (int u = 0; u < kAppendUnroll; ++u) {
      dst[u] = nullptr;
      const unsigned int i = i0 + u * blockDim.x;
      if (i >= total) continue;
      auto r = div_vecs.divmod(i);      // r.div = row, r.mod = vector in row
      int64_t b, h, t;
      unsigned int which;
      if constexpr (HEAD_INNER) {
        auto rh = div_h.divmod(r.div);    // h
        auto rw = div_w.divmod(rh.div);   // which
        auto rt = div_t.divmod(rw.div);   // t, b
        b = rt.div, h = rh.mod, t = rt.mod, which = rw.mod;
      } else {
        auto rt = div_t.divmod(r.div);    // t
        auto rh = div_h.divmod(rt.div);   // h
        auto rb = div_b.divmod(rh.div);   // b, which
        b = rb.mod, h = rh.mod, t = rt.mod, which = rb.div;
      }
      const int64_t p = pos[b] + t;
      int64_t row;
      if constexpr (PAGED) {
        const int64_t lb = p / bs;
        if (p < 0 || lb >= max_blocks) continue;
        const int64_t blk = static_cast<int64_t>(block_table[b * max_blocks + lb]);
        if (blk < 0 || blk >= num_blocks) continue;
        row = (blk * H + h) * bs + p % bs;
      } else {
        if (p < 0 || p >= t_cap) continue;
        row = (b * H + h) * t_cap + p;
      }
      const Src& s = which ? s1 : s0;
      val[u] = reinterpret_cast<const vec_t*>(s.ptr + b * s.sb + h * s.sh + t * s.st)[r.mod];
      dst[u] = reinterpret_cast<vec_t*>(which ? dst1 : dst0) + row * row_vecs + r.mod;
    }
#pragma unroll
    for (int u = 0; u < kAppendUnroll; ++u) {
      if (dst[u] != nullptr) *dst[u] = val[u];
    }
  }
}

// Launches append_kernel for one or two (cache, new) pairs sharing positions.
void launch_append(at::Tensor& c0, at::Tensor* c1, const at::Tensor& n0, const at::Tensor* n1,
                   const at::Tensor& pos, const at::Tensor* block_table, const char* op) {
  const int64_t B = n0.size(0), H = n0.size(1), Tn = n0.size(2), D = n0.size(3);
  const int64_t tensors = c1 ? 2 : 1;
  if (B * H * Tn * D == 0) return;
  const int64_t esz = n0.element_size();
  const Src s0 = src_of(n0), s1 = n1 ? src_of(*n1) : s0;
  const int vec = pick_vec({D * esz, s0.sb, s0.sh, s0.st, s1.sb, s1.sh, s1.st,
                            reinterpret_cast<int64_t>(s0.ptr), reinterpret_cast<int64_t>(s1.ptr),
                            reinterpret_cast<int64_t>(c0.data_ptr()),
                            reinterpret_cast<int64_t>(c1 ? c1->data_ptr() : c0.data_ptr())});
  const int64_t row_vecs = D * esz / vec;
  const int64_t total = tensors * B * H * Tn * row_vecs;
  check_32bit(op, total);
  char* d0 = static_cast<char*>(c0.data_ptr());
  char* d1 = static_cast<char*>(c1 ? c1->data_ptr() : c0.data_ptr());
  auto stream = c10::cuda::getCurrentCUDAStream();
  const Div dv(row_vecs), dt(Tn), dh(H), db(B), dw(tensors);
  const unsigned int grid = blocks_for((total + kAppendUnroll - 1) / kAppendUnroll);
  const bool head_inner = H > 1 && Tn > 1 && s0.sh < s0.st && s1.sh < s1.st;
  dispatch_vec(vec, [&](auto v) {
    using vec_t = decltype(v);
    auto launch = [&](auto head_inner_tag) {
      constexpr bool HI = decltype(head_inner_tag)::value;
      if (block_table == nullptr) {
        append_kernel<vec_t, false, HI, int64_t><<<grid, kThreads, 0, stream>>>(
            d0, d1, s0, s1, pos.data_ptr<int64_t>(), nullptr, dv, dt, dh, db, dw,
            static_cast<unsigned int>(total), H, c0.size(2), 1, 0, 0);
      } else if (block_table->scalar_type() == at::kInt) {
        append_kernel<vec_t, true, HI, int32_t><<<grid, kThreads, 0, stream>>>(
            d0, d1, s0, s1, pos.data_ptr<int64_t>(), block_table->data_ptr<int32_t>(), dv, dt, dh, db, dw,
            static_cast<unsigned int>(total), H, 0, c0.size(2), block_table->size(1), c0.size(0));
      } else {
        append_kernel<vec_t, true, HI, int64_t><<<grid, kThreads, 0, stream>>>(
            d0, d1, s0, s1, pos.data_ptr<int64_t>(), block_table->data_ptr<int64_t>(), dv, dt, dh, db, dw,
            static_cast<unsigned int>(total), H, 0, c0.size(2), block_table->size(1), c0.size(0));
      }
    };
    if (head_inner) {
      launch(std::true_type{});
    } else {
      launch(std::false_type{});
    }
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void kv_append_cuda(at::Tensor& cache, const at::Tensor& new_kv_in, const at::Tensor& pos) {
  check_kv_append(cache, new_kv_in, pos);
  const c10::cuda::CUDAGuard guard(cache.device());
  const at::Tensor new_kv = rows_contiguous(new_kv_in);
  if (!capturing()) check_positions_host("kv_append", pos, new_kv.size(2), cache.size(2));
  launch_append(cache, nullptr, new_kv, nullptr, pos, nullptr, "kv_append");
}

void kv_append_kv_cuda(at::Tensor& k_cache, at::Tensor& v_cache, const at::Tensor& k_in,
                       const at::Tensor& v_in, const at::Tensor& pos, bool host_check) {
  check_kv_append(k_cache, k_in, pos);
  check_kv_append(v_cache, v_in, pos);
  GPTCORE_CHECK(k_cache.sizes() == v_cache.sizes() && k_in.sizes() == v_in.sizes(),
              "kv_append_kv: k_cache/v_cache and k/v must have matching shapes, got ",
              k_cache.sizes(), " / ", v_cache.sizes(), " and ", k_in.sizes(), " / ", v_in.sizes());
  const c10::cuda::CUDAGuard guard(k_cache.device());
  const at::Tensor k = rows_contiguous(k_in), v = rows_contiguous(v_in);
  if (host_check && !capturing()) check_positions_host("kv_append_kv", pos, k.size(2), k_cache.size(2));
  launch_append(k_cache, &v_cache, k, &v, pos, nullptr, "kv_append_kv");
}

void paged_append_cuda(at::Tensor& k_cache, at::Tensor& v_cache, const at::Tensor& k_in,
                       const at::Tensor& v_in, const at::Tensor& block_table, const at::Tensor& pos,
                       bool host_check) {
  check_paged_append(k_cache, v_cache, k_in, v_in, block_table, pos);
  const c10::cuda::CUDAGuard guard(k_cache.device());
  const at::Tensor k = rows_contiguous(k_in), v = rows_contiguous(v_in);
  if (host_check && !capturing()) {
    check_blocks_host("paged_append", block_table, pos, k.size(2), k_cache.size(2), k_cache.size(0));
  }
  launch_append(k_cache, &v_cache, k, &v, pos, &block_table, "paged_append");
}

// ---- paged gather -------------------------------------------------------------------------
// Thread i -> (b, h, t, v) of out [B, H, max_len, D]; zeros past lengths[b] or for a bad block.
template <typename vec_t, typename idx_t>
__global__ void paged_gather_kernel(vec_t* __restrict__ out, const vec_t* __restrict__ cache,
                                    const idx_t* __restrict__ block_table,
                                    const int64_t* __restrict__ lengths, Div div_vecs, Div div_t,
                                    Div div_h, unsigned int total, int64_t H, int64_t bs,
                                    int64_t max_blocks, int64_t num_blocks) {
  for (unsigned int i = blockIdx.x * blockDim.x + threadIdx.x; i < total; i += gridDim.x * blockDim.x) {
    auto r = div_vecs.divmod(i);
    auto rt = div_t.divmod(r.div);
    auto rh = div_h.divmod(rt.div);
    const int64_t b = rh.div, h = rh.mod, t = rt.mod;
    const int64_t row_vecs = div_vecs.divisor;
    vec_t val{};
    if (t < lengths[b] && t / bs < max_blocks) {
      const int64_t blk = static_cast<int64_t>(block_table[b * max_blocks + t / bs]);
      if (blk >= 0 && blk < num_blocks) val = cache[((blk * H + h) * bs + t % bs) * row_vecs + r.mod];
    }
    out[i] = val;
  }
}

at::Tensor paged_gather_cuda(const at::Tensor& cache, const at::Tensor& block_table,
                             const at::Tensor& lengths, int64_t max_len, bool host_check) {
  check_paged_gather(cache, block_table, lengths, max_len);
  const c10::cuda::CUDAGuard guard(cache.device());
  const int64_t NB = cache.size(0), H = cache.size(1), bs = cache.size(2), D = cache.size(3);
  const int64_t B = block_table.size(0), MB = block_table.size(1);
  if (host_check && !capturing()) check_gather_host(block_table, lengths, max_len, bs, NB);
  at::Tensor out = at::empty({B, H, max_len, D}, cache.options());
  if (out.numel() == 0) return out;
  const int64_t esz = cache.element_size();
  const int vec = pick_vec({D * esz, reinterpret_cast<int64_t>(cache.data_ptr()),
                            reinterpret_cast<int64_t>(out.data_ptr())});
  const int64_t row_vecs = D * esz / vec;
  const int64_t total = B * H * max_len * row_vecs;
  check_32bit("paged_gather", total);
  auto stream = c10::cuda::getCurrentCUDAStream();
  const Div dv(row_vecs), dt(max_len), dh(H);
  dispatch_vec(vec, [&](auto v) {
    using vec_t = decltype(v);
    auto* o = static_cast<vec_t*>(out.data_ptr());
    const auto* c = static_cast<const vec_t*>(cache.data_ptr());
    if (block_table.scalar_type() == at::kInt) {
      paged_gather_kernel<vec_t, int32_t><<<blocks_for(total), kThreads, 0, stream>>>(
          o, c, block_table.data_ptr<int32_t>(), lengths.data_ptr<int64_t>(), dv, dt, dh,
          static_cast<unsigned int>(total), H, bs, MB, NB);
    } else {
      paged_gather_kernel<vec_t, int64_t><<<blocks_for(total), kThreads, 0, stream>>>(
          o, c, block_table.data_ptr<int64_t>(), lengths.data_ptr<int64_t>(), dv, dt, dh,
          static_cast<unsigned int>(total), H, bs, MB, NB);
    }
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

// ---- reorder ------------------------------------------------------------------------------
// Thread i -> (n, j, h, v) over the scratch [N, Bn, H, row_vecs] (row = the first `length`
// positions of one (n, b, h), contiguous in the cache). GATHER: scratch <- cache[n, index[j], h];
// otherwise cache[n, j, h] <- scratch.
template <typename vec_t, bool GATHER>
__global__ void reorder_kernel(vec_t* __restrict__ cache, vec_t* __restrict__ scratch,
                               const int64_t* __restrict__ index, Div div_vecs, Div div_h, Div div_j,
                               unsigned int total, int64_t B, int64_t H, int64_t stride_vecs) {
  for (unsigned int i = blockIdx.x * blockDim.x + threadIdx.x; i < total; i += gridDim.x * blockDim.x) {
    auto r = div_vecs.divmod(i);
    auto rh = div_h.divmod(r.div);
    auto rj = div_j.divmod(rh.div);
    const int64_t n = rj.div, j = rj.mod, h = rh.mod;
    if constexpr (GATHER) {
      const int64_t b = index[j];
      if (b < 0 || b >= B) continue;
      scratch[i] = cache[((n * B + b) * H + h) * stride_vecs + r.mod];
    } else {
      cache[((n * B + j) * H + h) * stride_vecs + r.mod] = scratch[i];
    }
  }
}

void kv_reorder_cuda(at::Tensor& cache, const at::Tensor& index, int64_t length) {
  check_kv_reorder(cache, index, length);
  const c10::cuda::CUDAGuard guard(cache.device());
  const int64_t N = cache.size(0), B = cache.size(1), H = cache.size(2), T = cache.size(3);
  const int64_t D = cache.size(4), Bn = index.size(0), esz = cache.element_size();
  if (!capturing()) check_index_host(index, B);
  if (N * Bn * H * length * D == 0) return;
  // The scratch is allocated in 16-byte units so that every vector width is aligned.
  const int64_t row_bytes = length * D * esz;
  at::Tensor scratch = at::empty({(N * Bn * H * row_bytes + 15) / 16, 16}, cache.options().dtype(at::kByte));
  const int vec = pick_vec({row_bytes, T * D * esz, reinterpret_cast<int64_t>(cache.data_ptr())});
  const int64_t row_vecs = row_bytes / vec, stride_vecs = T * D * esz / vec;
  const int64_t total = N * Bn * H * row_vecs;
  check_32bit("kv_reorder", total);
  auto stream = c10::cuda::getCurrentCUDAStream();
  const Div dv(row_vecs), dh(H), dj(Bn);
  dispatch_vec(vec, [&](auto v) {
    using vec_t = decltype(v);
    auto* c = static_cast<vec_t*>(cache.data_ptr());
    auto* s = static_cast<vec_t*>(scratch.data_ptr());
    reorder_kernel<vec_t, true><<<blocks_for(total), kThreads, 0, stream>>>(
        c, s, index.data_ptr<int64_t>(), dv, dh, dj, static_cast<unsigned int>(total), B, H, stride_vecs);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    reorder_kernel<vec_t, false><<<blocks_for(total), kThreads, 0, stream>>>(
        c, s, index.data_ptr<int64_t>(), dv, dh, dj, static_cast<unsigned int>(total), B, H, stride_vecs);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(gptcore, CUDA, m) {
  m.impl("kv_append", &kv_append_cuda);
  m.impl("kv_append_kv", &kv_append_kv_cuda);
  m.impl("paged_append", &paged_append_cuda);
  m.impl("paged_gather", &paged_gather_cuda);
  m.impl("kv_reorder", &kv_reorder_cuda);
}

}  // namespace gptcore
