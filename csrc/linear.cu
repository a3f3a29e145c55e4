// Linear with a fused epilogue: y = act(x @ weight^T + bias) + residual, and the activation's backward.
//
// The GEMM is cuBLASLt's (csrc/cublaslt.cu): on Hopper it runs wgmma/TMA kernels that a hand-written GEMM
// would have to match first. Its epilogues decide what can be fused into it:
//   * no activation:      BIAS epilogue, residual as the beta * C operand -> one kernel, one rounding.
//   * "gelu_tanh":        GELU_BIAS epilogue (cuBLASLt's GELU is the tanh approximation, as in
//                         nn.GELU(approximate="tanh")) -> one kernel, for fp16/bf16 without a residual.
//   * "gelu" (erf), "quick_gelu", fp32, or any activation with a residual: no cuBLASLt epilogue (its
//     beta * C is added before the activation, not after), so the GEMM writes h = x W^T + b with the BIAS
//     epilogue and bias_act_residual_kernel applies act(h) + residual in place: one extra read and write
//     of the (M, N) output, and h rounded to the output dtype once before the activation.
//
// Backward of the activation: fastvit's linear op recomputes h instead of storing it (see
// fastvit/ops/linear.py), so g = dy * act'(h) runs as a second pass over the recomputed h, fused with the
// fp32 column sums that give dbias. cuBLASLt's DGELU / DGELU_BGRAD epilogues do not fit that contract:
// they multiply a GEMM's *product* (dY2 @ W2 of the next layer) by gelu'(aux) with the stored
// pre-activation as aux, and only for the tanh form.
#include <cmath>

#include "common.h"
#include "cublaslt.h"
#include "dtype_dispatch.h"
#include "linear.h"

namespace fastvit {
namespace {

constexpr float kInvSqrt2 = 0.70710678118654752f;
constexpr float kInvSqrt2Pi = 0.39894228040143268f;
constexpr float kSqrt2OverPi = 0.79788456080286536f;
constexpr float kTanhCoef = 0.044715f;
constexpr float kQuickCoef = 1.702f;

__device__ __forceinline__ float activate(float h, int act) {
  switch (act) {
    case kActGelu: return 0.5f * h * (1.f + erff(h * kInvSqrt2));
    case kActGeluTanh: return 0.5f * h * (1.f + tanhf(kSqrt2OverPi * (h + kTanhCoef * h * h * h)));
    case kActQuickGelu: return h / (1.f + expf(-kQuickCoef * h));
    default: return h;
  }
}

__device__ __forceinline__ float activation_grad(float h, int act) {
  switch (act) {
    case kActGelu: return 0.5f * (1.f + erff(h * kInvSqrt2)) + h * kInvSqrt2Pi * expf(-0.5f * h * h);
    case kActGeluTanh: {
      const float t = tanhf(kSqrt2OverPi * (h + kTanhCoef * h * h * h));
      return 0.5f * (1.f + t) + 0.5f * h * (1.f - t * t) * kSqrt2OverPi * (1.f + 3.f * kTanhCoef * h * h);
    }
    case kActQuickGelu: {
      const float s = 1.f / (1.f + expf(-kQuickCoef * h));
      return s + kQuickCoef * h * s * (1.f - s);
    }
    default: return 1.f;
  }
}

// y[r, c] = act(y[r, c]) + residual[r, c], in place on the GEMM's output. One block per row (grid-stride),
// its threads over the columns: no 64-bit index division per element.
template <typename T>
__global__ void bias_act_residual_kernel(T* y, const T* residual, std::int64_t rows, std::int64_t cols,
                                         std::int64_t y_stride, std::int64_t residual_stride, int act) {
  for (std::int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    T* y_row = y + r * y_stride;
    const T* res_row = residual ? residual + r * residual_stride : nullptr;
    for (std::int64_t c = threadIdx.x; c < cols; c += blockDim.x) {
      float v = activate(to_float(y_row[c]), act);
      if (res_row) v += to_float(res_row[c]);
      y_row[c] = from_float<T>(v);
    }
  }
}

constexpr int kGradThreads = 256;

// g = dy * act'(h), in place over h in g. Block (x, y) walks rows x, x + gridDim.x, ... of the column tile
// y; each thread owns one column and writes its fp32 partial sum of g (dbias) to row x of the partials.
template <typename T>
__global__ void act_grad_kernel(const T* dy, T* g, float* dbias_partial, std::int64_t rows, std::int64_t cols,
                                std::int64_t dy_stride, std::int64_t g_stride, int act) {
  const std::int64_t col = static_cast<std::int64_t>(blockIdx.y) * kGradThreads + threadIdx.x;
  if (col >= cols) return;
  float sum = 0.f;
  for (std::int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const float v = to_float(dy[r * dy_stride + col]) * activation_grad(to_float(g[r * g_stride + col]), act);
    g[r * g_stride + col] = from_float<T>(v);
    sum += v;
  }
  if (dbias_partial) dbias_partial[static_cast<std::int64_t>(blockIdx.x) * cols + col] = sum;
}

int grid_rows(std::int64_t rows) { return static_cast<int>(rows < (1 << 20) ? (rows > 0 ? rows : 1) : (1 << 20)); }

void check_gemm(const char* op, std::int64_t m, std::int64_t n, std::int64_t k, std::int64_t x_stride,
                std::int64_t weight_stride, int activation, int dtype, std::int64_t workspace_bytes) {
  require(m >= 0 && n > 0 && k > 0, op,
          "sizes must be M >= 0, N > 0, K > 0, got M=" + std::to_string(m) + ", N=" + std::to_string(n) +
              ", K=" + std::to_string(k));
  require(m < (std::int64_t{1} << 31) && n < (std::int64_t{1} << 31) && k < (std::int64_t{1} << 31), op,
          "cuBLASLt takes 32-bit matrix sizes; got M=" + std::to_string(m) + ", N=" + std::to_string(n) +
              ", K=" + std::to_string(k));
  require(x_stride >= k && weight_stride >= k, op, "the row strides of x and weight must be >= K");
  require(activation >= kActNone && activation <= kActQuickGelu, op,
          "unknown activation code " + std::to_string(activation) +
              " (0 none, 1 gelu, 2 gelu_tanh, 3 quick_gelu)");
  check_float_dtype(op, "dtype", dtype);
  require(workspace_bytes >= 0, op, "workspace_bytes must be >= 0");
}

// out (M, N) = x @ weight^T (+ bias through the epilogue the caller picks) for either entry point's Args.
template <class Args>
MatmulArgs x_weight_t(const Args& a, std::uintptr_t out, std::int64_t out_stride) {
  MatmulArgs mm;
  mm.lhs = {a.x, a.m, a.k, a.x_stride, 0};
  mm.rhs = {a.weight, a.n, a.k, a.weight_stride, 0};
  mm.rhs_t = true;
  mm.out = {out, a.m, a.n, out_stride, 0};
  mm.dtype = a.dtype;
  mm.allow_tf32 = a.allow_tf32;
  mm.bias = a.bias;
  mm.workspace = a.workspace;
  mm.workspace_bytes = a.workspace_bytes;
  mm.stream = a.stream;
  return mm;
}

}  // namespace

void linear_fwd(const LinearFwdArgs& a) {
  const char* op = "linear_fwd";
  check_gemm(op, a.m, a.n, a.k, a.x_stride, a.weight_stride, a.activation, a.dtype, a.workspace_bytes);
  require(a.x && a.weight && a.y, op, "x, weight and y must be non-null device pointers");
  require(a.y_stride >= a.n && (!a.residual || a.residual_stride >= a.n), op,
          "the row strides of y and residual must be >= N");
  require_cuda_device(op);
  if (a.m == 0) return;

  MatmulArgs mm = x_weight_t(a, a.y, a.y_stride);
  // fp32 keeps the exact elementwise pass: the accuracy of cuBLASLt's GELU is not documented, and fp32
  // results are held to torch's fp32 error; for fp16/bf16 the output rounding dominates either way.
  const bool fused_tanh = a.activation == kActGeluTanh && !a.residual && a.dtype != kFloat32;
  bool needs_pass = false;
  if (a.activation == kActNone) {
    mm.epilogue = a.bias ? Epilogue::kBias : Epilogue::kNone;
    if (a.residual) mm.addend = {a.residual, a.m, a.n, a.residual_stride, 0};
  } else if (fused_tanh) {
    mm.epilogue = a.bias ? Epilogue::kGeluTanhBias : Epilogue::kGeluTanh;
  } else {
    mm.epilogue = a.bias ? Epilogue::kBias : Epilogue::kNone;
    needs_pass = true;
  }
  matmul(op, mm);
  if (needs_pass) {
    dispatch_dtype(a.dtype, [&](auto t) {
      using T = typename decltype(t)::type;
      bias_act_residual_kernel<T><<<grid_rows(a.m), 256, 0, reinterpret_cast<cudaStream_t>(a.stream)>>>(
          reinterpret_cast<T*>(a.y), reinterpret_cast<const T*>(a.residual), a.m, a.n, a.y_stride, a.residual_stride,
          a.activation);
    });
    check_launch(op);
  }
}

void linear_act_grad(const LinearActGradArgs& a) {
  const char* op = "linear_act_grad";
  check_gemm(op, a.m, a.n, a.k, a.x_stride, a.weight_stride, a.activation, a.dtype, a.workspace_bytes);
  require(a.activation != kActNone, op, "the activation gradient needs an activation (code 1, 2 or 3)");
  require(a.dy && a.x && a.weight && a.g, op, "dy, x, weight and g must be non-null device pointers");
  require(a.dy_stride >= a.n && a.g_stride >= a.n, op, "the row strides of dy and g must be >= N");
  require(!a.dbias_partial || a.num_partials > 0, op, "num_partials must be > 0 with dbias_partial");
  require(a.num_partials < 65536, op, "num_partials must be < 65536");
  require((a.n + kGradThreads - 1) / kGradThreads < 65536, op, "N is too large for one launch: " + std::to_string(a.n));
  require_cuda_device(op);
  auto stream = reinterpret_cast<cudaStream_t>(a.stream);
  if (a.m == 0) {
    if (a.dbias_partial) {
      cudaMemsetAsync(reinterpret_cast<void*>(a.dbias_partial), 0, sizeof(float) * a.num_partials * a.n, stream);
      check_launch(op);
    }
    return;
  }
  MatmulArgs mm = x_weight_t(a, a.g, a.g_stride);
  mm.epilogue = a.bias ? Epilogue::kBias : Epilogue::kNone;
  matmul(op, mm);
  const int partials = a.dbias_partial ? a.num_partials : static_cast<int>(a.m < 1024 ? a.m : 1024);
  const dim3 grid(static_cast<unsigned>(partials), static_cast<unsigned>((a.n + kGradThreads - 1) / kGradThreads));
  dispatch_dtype(a.dtype, [&](auto t) {
    using T = typename decltype(t)::type;
    act_grad_kernel<T><<<grid, kGradThreads, 0, stream>>>(reinterpret_cast<const T*>(a.dy), reinterpret_cast<T*>(a.g),
                                                          reinterpret_cast<float*>(a.dbias_partial), a.m, a.n,
                                                          a.dy_stride, a.g_stride, a.activation);
  });
  check_launch(op);
}

// dW (N, K) = dy^T @ x, dbias (N) = sum over the M rows of dy, as one cuBLASLt call with BGRADB.
//
// Which operand is dy in cuBLASLt's column-major view (csrc/cublaslt.cu's mapping: A = rhs, B = lhs,
// m = out.cols, n = out.rows): the row-major product is out = op(lhs) @ op(rhs) with lhs = dy (M, N)
// transposed and rhs = x (M, K) as is, out = dW (N, K). Column-major, dW is read as dW^T (K, N) =
// x^T @ dy: A = x, stored column-major as (K, M) with ld = x_stride, op N, so op(A) is (m, k) = (K, M);
// B = dy, stored column-major as (N, M) with ld = dy_stride, op T, so op(B) is (k, n) = (M, N). The GEMM's
// k is M. CUBLASLT_EPILOGUE_BGRADB reduces op(B) over k into a vector of D's column count n = N: entry j
// is sum_i op(B)[i, j] = sum_i dy[i, j], the column sums of the row-major dy, which is dbias. (BGRADA
// would reduce A = x over k: the wrong operand.) cublasLt.h (CUBLASLT_EPILOGUE_BGRADB, BIAS_POINTER) states
// the same: bias size = D's column count, reduction over the GEMM's k, and bias-gradient elements of the
// output type (so dbias comes back in dy's dtype; the torch pair rounds its fp32 sum to it as well).
//
// cuBLASLt documents BGRAD epilogues for a subset of layouts / dtypes / compute types and the set moves
// between versions; rather than copy a table, the heuristic is asked: no algorithm -> false, and the
// caller (fastvit/ops/_cuda_backends.py) runs torch.matmul + dy.sum(0).
bool linear_wgrad(const LinearWgradArgs& a) {
  const char* op = "linear_wgrad";
  require(a.m > 0 && a.n > 0 && a.k > 0, op,
          "sizes must be M > 0, N > 0, K > 0 (the caller handles M = 0), got M=" + std::to_string(a.m) +
              ", N=" + std::to_string(a.n) + ", K=" + std::to_string(a.k));
  require(a.m < (std::int64_t{1} << 31) && a.n < (std::int64_t{1} << 31) && a.k < (std::int64_t{1} << 31), op,
          "cuBLASLt takes 32-bit matrix sizes; got M=" + std::to_string(a.m) + ", N=" + std::to_string(a.n) +
              ", K=" + std::to_string(a.k));
  require(a.dy_stride >= a.n && a.x_stride >= a.k && a.dweight_stride >= a.k, op,
          "row strides must be dy >= N, x >= K, dweight >= K (unit column strides)");
  require(a.dy && a.x && a.dweight && a.dbias, op, "dy, x, dweight and dbias must be non-null device pointers");
  check_float_dtype(op, "dtype", a.dtype);
  require(a.workspace_bytes >= 0, op, "workspace_bytes must be >= 0");
  require_cuda_device(op);
  MatmulArgs mm;
  mm.lhs = {a.dy, a.m, a.n, a.dy_stride, 0};
  mm.lhs_t = true;
  mm.rhs = {a.x, a.m, a.k, a.x_stride, 0};
  mm.out = {a.dweight, a.n, a.k, a.dweight_stride, 0};
  mm.dtype = a.dtype;
  mm.allow_tf32 = a.allow_tf32;
  mm.epilogue = Epilogue::kBgradB;
  mm.bias = a.dbias;
  mm.workspace = a.workspace;
  mm.workspace_bytes = a.workspace_bytes;
  mm.stream = a.stream;
  return try_matmul(op, mm);
}

}  // namespace fastvit
