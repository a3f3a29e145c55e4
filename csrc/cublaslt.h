// cuBLASLt for fastvit's GEMMs (csrc/cublaslt.cu), loaded with dlopen at first use so that fastvit._C
// imports on machines where libcublasLt is not on the loader path (the module also holds kernels that
// need no cuBLAS at all). Operands are described in row-major terms, as torch stores them.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace fastvit {

// A row-major (rows, cols) matrix with leading dimension `ld` (elements between rows; unit column
// stride), repeated every `batch_stride` elements for batched calls (0: the same matrix for every batch).
struct RowMajor {
  std::uintptr_t ptr = 0;
  std::int64_t rows = 0, cols = 0, ld = 0, batch_stride = 0;
};

// kGeluTanh*: cuBLASLt's GELU epilogue, the tanh approximation (nn.GELU(approximate="tanh")).
// kBgradB: CUBLASLT_EPILOGUE_BGRADB, no change to out; `bias` is an *output* of out.cols elements of
// `dtype`: the sums of op(lhs) (cuBLASLt's B) over the GEMM's k dimension (csrc/linear.cu: linear_wgrad).
enum class Epilogue { kNone, kBias, kGeluTanh, kGeluTanhBias, kBgradB };

// out = epilogue(op(lhs) @ op(rhs) + addend), for `batch` independent products. op(M) is M or, with
// the *_t flag, M^T. `addend` (ptr 0: none) has out's shape and may have its own ld and batch stride
// (0 broadcasts it). Every operand has `dtype` (a DTypeCode); accumulation is fp32; fp32 operands use
// TF32 tensor cores when `allow_tf32`. `bias` has out.cols elements of `dtype`.
struct MatmulArgs {
  RowMajor lhs, rhs, out, addend;
  bool lhs_t = false, rhs_t = false;
  int batch = 1;
  int dtype = 0;
  bool allow_tf32 = false;
  Epilogue epilogue = Epilogue::kNone;
  std::uintptr_t bias = 0;
  std::uintptr_t workspace = 0;
  std::int64_t workspace_bytes = 0;
  std::uintptr_t stream = 0;
};

// Runs one cublasLtMatmul. Throws std::runtime_error when cuBLASLt cannot be loaded (naming every
// place searched) or refuses the problem; arguments must have been validated by the caller.
void matmul(const char* op, const MatmulArgs& a);
// As matmul, but returns false instead of throwing when cuBLASLt has no algorithm for the problem.
bool try_matmul(const char* op, const MatmulArgs& a);

// Directories tried for libcublasLt.so.<major> before the loader's own search (set from Python: the
// nvidia wheel torch depends on, torch/lib). The search order, first hit wins:
//   1. a copy already loaded in the process (torch's, after `import torch` on a CUDA build)
//   2. these directories, in order
//   3. the loader path (LD_LIBRARY_PATH, rpath, ld.so.cache)
//   4. $CUDA_HOME/lib64, /usr/local/cuda/lib64
void set_cublaslt_search_dirs(const std::vector<std::string>& dirs);

// Loads cuBLASLt now (needs no GPU) and returns cublaslt_status(); throws std::runtime_error naming every
// place searched when it cannot.
std::string load_cublaslt();

// Where cuBLASLt was loaded from and its version, "not loaded yet", or why loading failed. Never throws.
std::string cublaslt_status();

}  // namespace fastvit
