// Host entry points of csrc/linear.cu: Linear with a fused bias + activation + residual epilogue.
// Pointers are device addresses as integers (0: absent); strides in elements; every 2-D operand is
// row-major with a unit last stride.
#pragma once

#include <cstdint>

#include "codes.h"

namespace fastvit {

struct LinearFwdArgs {
  std::uintptr_t x, weight, bias, residual, y;  // (M, K), (N, K), (N,), (M, N), (M, N)
  std::int64_t m, n, k;
  std::int64_t x_stride, weight_stride, residual_stride, y_stride;
  int activation;  // ActivationCode
  int dtype;       // DTypeCode of every operand
  bool allow_tf32;
  std::uintptr_t workspace;  // cuBLASLt workspace
  std::int64_t workspace_bytes;
  std::uintptr_t stream;
};

struct LinearActGradArgs {
  std::uintptr_t dy, x, weight, bias, g, dbias_partial;  // dy, g (M, N); dbias_partial (num_partials, N) fp32
  std::int64_t m, n, k;
  std::int64_t dy_stride, x_stride, weight_stride, g_stride;
  int num_partials;
  int activation, dtype;
  bool allow_tf32;
  std::uintptr_t workspace;
  std::int64_t workspace_bytes;
  std::uintptr_t stream;
};

// The weight gradient of a linear without activation, with its bias gradient from the same GEMM.
struct LinearWgradArgs {
  std::uintptr_t dy, x, dweight, dbias;  // (M, N), (M, K), (N, K), (N,) dy's dtype
  std::int64_t m, n, k;
  std::int64_t dy_stride, x_stride, dweight_stride;
  int dtype;  // DTypeCode of every operand
  bool allow_tf32;
  std::uintptr_t workspace;
  std::int64_t workspace_bytes;
  std::uintptr_t stream;
};

// y = act(x @ weight^T + bias) + residual.
void linear_fwd(const LinearFwdArgs& a);
// g = dy * act'(h), h = x @ weight^T + bias recomputed; per-block fp32 partial column sums of g (dbias).
void linear_act_grad(const LinearActGradArgs& a);
// dweight = dy^T @ x and dbias = sum_rows(dy) in one cuBLASLt GEMM (the BGRADB epilogue). Returns false,
// having written nothing, where cuBLASLt has no algorithm for it (the caller then runs the GEMM and the
// column sum separately); throws std::runtime_error on bad arguments or a cuBLASLt failure.
bool linear_wgrad(const LinearWgradArgs& a);

}  // namespace fastvit
