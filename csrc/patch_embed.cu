// Patch embedding as one GEMM: a convolution with kernel = stride = p over a (B, C, H, W) image is
//
//   cols[b * N + n, c * p * p + ki * p + kj] = x[b, c, hp * p + ki, wp * p + kj]   (0 past the image edge)
//   out[b, P + n, :] = cols[b * N + n, :] @ weight^T + bias + pos[n]                 n = hp * Wp + wp
//   out[b, i, :]     = prefix[i] (+ pos[i] when pos_embed has P + N rows)            i < P
//
// gather_patches_kernel writes `cols` (the GEMM's operand layout, K = C * p * p contiguous per patch)
// from NCHW or channels_last through the image's strides; zero padding right/bottom (timm's
// dynamic_img_pad) is read as zeros, never materialised. The GEMM is cuBLASLt's, batched over images so
// that its output rows land between the prefix rows of `out`: bias is the BIAS epilogue and the position
// embedding is cuBLASLt's beta * C operand with batch stride 0 (every image adds the same rows), so both
// are added to the fp32 accumulator and rounded once. Should cuBLASLt offer no algorithm for that
// broadcast C, the GEMM runs without it and prefix_pos_kernel adds the rows afterwards. prefix_pos_kernel
// always writes the P prefix rows.
//
// Why cuBLASLt rather than an own GEMM: D x K x B*N at ViT sizes (768 x 768 x 25088 for B/16 at batch 128)
// is squarely in cuBLAS's tuned range, and on sm_90 it brings wgmma/TMA kernels; the gather is the part
// torch's conv path does not fuse, and it is memory-bound (one read of the image, one write of cols).
//
// Backward (dout's patch rows as a (B * N, D) matrix): dweight = dout^T @ cols (cols gathered again),
// dcols = dout @ weight, then scatter_patches_kernel writes dx: the patches do not overlap, so each
// image element reads exactly one dcols element (no atomics, deterministic). dbias, dpos_embed and
// dprefix are sums of dout over the batch, done by the caller.
#include "common.h"
#include "cublaslt.h"
#include "dtype_dispatch.h"
#include "patch_embed.h"

namespace fastvit {
namespace {

constexpr int kThreads = 256;

struct Geometry {
  std::int64_t batch, channels, height, width, patch, grid_w, num_patches, features;
};

Geometry make_geometry(std::int64_t b, std::int64_t c, std::int64_t h, std::int64_t w, std::int64_t p) {
  const std::int64_t hp = (h + p - 1) / p, wp = (w + p - 1) / p;
  return {b, c, h, w, p, wp, hp * wp, c * p * p};
}

struct Strides4 {
  std::int64_t b, c, h, w;
};

// One block per patch (grid-stride), its threads over the K = C * p * p features: the per-patch
// coordinates are computed once, the per-feature ones in 32 bits (K < 2^31, checked).
template <typename T>
__global__ void gather_patches_kernel(const T* __restrict__ x, T* __restrict__ cols, Geometry g, Strides4 s) {
  const int patch = static_cast<int>(g.patch), pp = patch * patch, features = static_cast<int>(g.features);
  const std::int64_t rows = g.batch * g.num_patches;
  for (std::int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const std::int64_t b = row / g.num_patches, n = row - b * g.num_patches;
    const std::int64_t h0 = (n / g.grid_w) * g.patch, w0 = (n % g.grid_w) * g.patch;
    const T* xb = x + b * s.b;
    T* out = cols + row * features;
    for (int f = threadIdx.x; f < features; f += blockDim.x) {
      const int c = f / pp, r = f - c * pp, ki = r / patch, kj = r - ki * patch;
      const std::int64_t h = h0 + ki, w = w0 + kj;
      out[f] = h < g.height && w < g.width ? xb[c * s.c + h * s.h + w * s.w] : from_float<T>(0.f);
    }
  }
}

// One block per image row (b, c, h) (grid-stride), its threads over w: each pixel reads the one dcols
// element that holds it.
template <typename T>
__global__ void scatter_patches_kernel(const T* __restrict__ dcols, T* __restrict__ dx, Geometry g, Strides4 s) {
  const int patch = static_cast<int>(g.patch), width = static_cast<int>(g.width);
  const std::int64_t image_rows = g.batch * g.channels * g.height;
  for (std::int64_t r = blockIdx.x; r < image_rows; r += gridDim.x) {
    const std::int64_t h = r % g.height, bc = r / g.height;
    const std::int64_t c = bc % g.channels, b = bc / g.channels;
    const T* src = dcols + (b * g.num_patches + (h / g.patch) * g.grid_w) * g.features +
                   c * g.patch * g.patch + (h % g.patch) * g.patch;
    T* dst = dx + b * s.b + c * s.c + h * s.h;
    for (int w = threadIdx.x; w < width; w += blockDim.x) {
      const int wp = w / patch;
      dst[w * s.w] = src[static_cast<std::int64_t>(wp) * g.features + (w - wp * patch)];
    }
  }
}

// Writes the prefix rows of every image (prefix + their position rows when pos has P + N rows) and, when
// add_patch_pos, adds the position rows to the patch rows the GEMM wrote.
template <typename T>
__global__ void prefix_pos_kernel(T* __restrict__ out, const T* __restrict__ prefix, const T* __restrict__ pos,
                                  std::int64_t batch, std::int64_t num_prefix, std::int64_t num_patches,
                                  std::int64_t dim, std::int64_t pos_rows, bool add_patch_pos) {
  const std::int64_t tokens = num_prefix + num_patches;
  const std::int64_t touched = add_patch_pos ? tokens : num_prefix;
  const std::int64_t total = batch * touched * dim;
  const bool pos_has_prefix = pos && pos_rows == tokens;
  for (std::int64_t i = blockIdx.x * static_cast<std::int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<std::int64_t>(gridDim.x) * blockDim.x) {
    const std::int64_t d = i % dim, t = (i / dim) % touched, b = i / (dim * touched);
    T* o = out + (b * tokens + t) * dim + d;
    if (t < num_prefix) {
      float v = to_float(prefix[t * dim + d]);
      if (pos_has_prefix) v += to_float(pos[t * dim + d]);
      *o = from_float<T>(v);
    } else {
      const std::int64_t pos_row = pos_has_prefix ? t : t - num_prefix;
      *o = from_float<T>(to_float(*o) + to_float(pos[pos_row * dim + d]));
    }
  }
}

int grid_rows(std::int64_t rows) { return static_cast<int>(rows < (1 << 20) ? (rows > 0 ? rows : 1) : (1 << 20)); }

// Threads for one image row: a multiple of 32 up to kThreads.
int row_block(std::int64_t width) { return static_cast<int>(width >= kThreads ? kThreads : (width + 31) / 32 * 32); }

int grid_for(std::int64_t n) {
  const std::int64_t blocks = (n + kThreads - 1) / kThreads;
  return static_cast<int>(blocks < 65535 * 16 ? (blocks > 0 ? blocks : 1) : 65535 * 16);
}

void check_geometry(const char* op, std::int64_t b, std::int64_t c, std::int64_t h, std::int64_t w, std::int64_t p,
                    std::int64_t d, int dtype, std::int64_t workspace_bytes) {
  require(b >= 0 && c > 0 && h > 0 && w > 0, op,
          "the image must have B >= 0 and C, H, W > 0, got (" + std::to_string(b) + ", " + std::to_string(c) + ", " +
              std::to_string(h) + ", " + std::to_string(w) + ")");
  require(p > 0 && d > 0, op, "patch and embed_dim must be > 0");
  const Geometry g = make_geometry(b, c, h, w, p);
  require(g.features < (std::int64_t{1} << 31) && d < (std::int64_t{1} << 31) &&
              b * g.num_patches < (std::int64_t{1} << 31),
          op, "cuBLASLt takes 32-bit sizes: B * N, C * p * p and D must each be < 2^31");
  check_float_dtype(op, "dtype", dtype);
  require(workspace_bytes >= 0, op, "workspace_bytes must be >= 0");
}

}  // namespace

void patch_embed_fwd(const PatchEmbedFwdArgs& a) {
  const char* op = "patch_embed_fwd";
  check_geometry(op, a.batch, a.channels, a.height, a.width, a.patch, a.embed_dim, a.dtype, a.workspace_bytes);
  require(a.x && a.weight && a.cols && a.out, op, "x, weight, cols and out must be non-null device pointers");
  const Geometry g = make_geometry(a.batch, a.channels, a.height, a.width, a.patch);
  require(a.num_prefix >= 0 && (a.num_prefix == 0) == (a.prefix == 0), op,
          "num_prefix must be > 0 exactly when a prefix pointer is given, got num_prefix=" +
              std::to_string(a.num_prefix));
  require(a.pos_embed ? (a.pos_rows == g.num_patches || a.pos_rows == g.num_patches + a.num_prefix) : a.pos_rows == 0,
          op,
          "pos_rows must be N = " + std::to_string(g.num_patches) + " or P + N = " +
              std::to_string(g.num_patches + a.num_prefix) + " with a pos_embed (0 without), got " +
              std::to_string(a.pos_rows));
  require_cuda_device(op);
  if (a.batch == 0) return;
  auto stream = reinterpret_cast<cudaStream_t>(a.stream);
  const Strides4 xs{a.x_stride_b, a.x_stride_c, a.x_stride_h, a.x_stride_w};
  const std::int64_t esize = a.dtype == kFloat32 ? 4 : 2;
  const std::int64_t tokens = a.num_prefix + g.num_patches, D = a.embed_dim, K = g.features;
  dispatch_dtype(a.dtype, [&](auto t) {
    using T = typename decltype(t)::type;
    gather_patches_kernel<T><<<grid_rows(g.batch * g.num_patches), kThreads, 0, stream>>>(
        reinterpret_cast<const T*>(a.x), reinterpret_cast<T*>(a.cols), g, xs);
  });
  check_launch(op);

  MatmulArgs mm;
  mm.rhs = {a.weight, D, K, K, 0};
  mm.rhs_t = true;
  mm.dtype = a.dtype;
  mm.allow_tf32 = a.allow_tf32;
  mm.epilogue = a.bias ? Epilogue::kBias : Epilogue::kNone;
  mm.bias = a.bias;
  mm.workspace = a.workspace;
  mm.workspace_bytes = a.workspace_bytes;
  mm.stream = a.stream;
  bool add_patch_pos = false;
  if (a.num_prefix == 0 && !a.pos_embed) {
    // Output rows are contiguous across images: one plain GEMM.
    mm.lhs = {a.cols, a.batch * g.num_patches, K, K, 0};
    mm.out = {a.out, a.batch * g.num_patches, D, D, 0};
    matmul(op, mm);
  } else {
    mm.batch = static_cast<int>(a.batch);
    mm.lhs = {a.cols, g.num_patches, K, K, g.num_patches * K};
    mm.out = {a.out + static_cast<std::uintptr_t>(a.num_prefix * D * esize), g.num_patches, D, D, tokens * D};
    if (a.pos_embed) {
      const std::int64_t first = a.pos_rows == tokens ? a.num_prefix : 0;
      MatmulArgs with_pos = mm;
      with_pos.addend = {a.pos_embed + static_cast<std::uintptr_t>(first * D * esize), g.num_patches, D, D, 0};
      add_patch_pos = !try_matmul(op, with_pos);
    }
    if (!a.pos_embed || add_patch_pos) matmul(op, mm);
  }
  if (a.num_prefix > 0 || add_patch_pos) {
    const std::int64_t touched = add_patch_pos ? tokens : a.num_prefix;
    dispatch_dtype(a.dtype, [&](auto t) {
      using T = typename decltype(t)::type;
      prefix_pos_kernel<T><<<grid_for(a.batch * touched * D), kThreads, 0, stream>>>(
          reinterpret_cast<T*>(a.out), reinterpret_cast<const T*>(a.prefix), reinterpret_cast<const T*>(a.pos_embed),
          a.batch, a.num_prefix, g.num_patches, D, a.pos_rows, add_patch_pos);
    });
    check_launch(op);
  }
}

void patch_embed_bwd(const PatchEmbedBwdArgs& a) {
  const char* op = "patch_embed_bwd";
  check_geometry(op, a.batch, a.channels, a.height, a.width, a.patch, a.embed_dim, a.dtype, a.workspace_bytes);
  require(a.dout && a.x && a.weight && a.cols, op, "dout, x, weight and cols must be non-null device pointers");
  require(a.dout_stride >= a.embed_dim, op, "dout_stride must be >= embed_dim");
  require_cuda_device(op);
  auto stream = reinterpret_cast<cudaStream_t>(a.stream);
  const Geometry g = make_geometry(a.batch, a.channels, a.height, a.width, a.patch);
  const std::int64_t rows = a.batch * g.num_patches, D = a.embed_dim, K = g.features;
  if (rows == 0) {
    if (a.dweight) {
      cudaMemsetAsync(reinterpret_cast<void*>(a.dweight), 0, static_cast<size_t>(D * K * (a.dtype == kFloat32 ? 4 : 2)),
                      stream);
      check_launch(op);
    }
    return;
  }
  MatmulArgs mm;
  mm.lhs = {a.dout, rows, D, a.dout_stride, 0};
  mm.dtype = a.dtype;
  mm.allow_tf32 = a.allow_tf32;
  mm.workspace = a.workspace;
  mm.workspace_bytes = a.workspace_bytes;
  mm.stream = a.stream;
  if (a.dweight) {
    const Strides4 xs{a.x_stride_b, a.x_stride_c, a.x_stride_h, a.x_stride_w};
    dispatch_dtype(a.dtype, [&](auto t) {
      using T = typename decltype(t)::type;
      gather_patches_kernel<T><<<grid_rows(rows), kThreads, 0, stream>>>(reinterpret_cast<const T*>(a.x),
                                                                        reinterpret_cast<T*>(a.cols), g, xs);
    });
    check_launch(op);
    MatmulArgs dw = mm;
    dw.lhs_t = true;  // dout^T (D, B * N)
    dw.rhs = {a.cols, rows, K, K, 0};
    dw.out = {a.dweight, D, K, K, 0};
    matmul(op, dw);
  }
  if (a.dx) {
    MatmulArgs dcols = mm;  // reuses the cols buffer: stream order puts this after the dweight GEMM's read
    dcols.rhs = {a.weight, D, K, K, 0};
    dcols.out = {a.cols, rows, K, K, 0};
    matmul(op, dcols);
    const Strides4 ds{a.dx_stride_b, a.dx_stride_c, a.dx_stride_h, a.dx_stride_w};
    dispatch_dtype(a.dtype, [&](auto t) {
      using T = typename decltype(t)::type;
      scatter_patches_kernel<T><<<grid_rows(a.batch * a.channels * a.height), row_block(a.width), 0, stream>>>(
          reinterpret_cast<const T*>(a.cols), reinterpret_cast<T*>(a.dx), g, ds);
    });
    check_launch(op);
  }
}

}  // namespace fastvit
