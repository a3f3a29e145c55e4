// pybind11 module fastvit._C. Every entry point takes device pointers as integers, sizes and strides
// in elements, dtype codes (DTYPE_CODES, from codes.h) and the CUDA stream handle; none touches torch. Argument
// errors raise ValueError, CUDA errors (including "no GPU") raise RuntimeError.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <array>

#include "cublaslt.h"
#include "linear.h"
#include "layer_norm.h"
#include "patch_embed.h"
#include "codes.h"
#include "runtime.h"
#include "soft_split.h"

namespace py = pybind11;
using fastvit::LayerNormBwdArgs;
using fastvit::LayerNormFwdArgs;
using I64x4 = std::array<std::int64_t, 4>;
using I64x6 = std::array<std::int64_t, 6>;

namespace {

fastvit::SoftSplitGeometry soft_split_geometry(const I64x4& shape, const I64x4& strides, const I64x6& kernel) {
  return {.batch = shape[0], .channels = shape[1], .height = shape[2], .width = shape[3],
          .stride_b = strides[0], .stride_c = strides[1], .stride_h = strides[2], .stride_w = strides[3],
          .kh = kernel[0], .kw = kernel[1], .sh = kernel[2], .sw = kernel[3], .ph = kernel[4], .pw = kernel[5]};
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "fastvit CUDA kernels (torch-independent; called through fastvit.ops)";
  m.attr("CUDART_VERSION") = fastvit::cudart_version();
  // The code tables fastvit/_ext.py and fastvit/ops/_cuda_backends.py read (no copies on the Python side).
  py::dict dtype_codes;
  for (int code : {fastvit::kFloat32, fastvit::kFloat16, fastvit::kBFloat16}) dtype_codes[fastvit::dtype_name(code)] = code;
  m.attr("DTYPE_CODES") = dtype_codes;
  py::dict activation_codes;
  for (int code : {fastvit::kActNone, fastvit::kActGelu, fastvit::kActGeluTanh, fastvit::kActQuickGelu})
    activation_codes[fastvit::activation_name(code)] = code;
  m.attr("ACTIVATION_CODES") = activation_codes;
  m.def("device_status", &fastvit::device_status, "What the CUDA runtime sees (never raises).");
  m.def("device_problem", &fastvit::device_problem,
        "Why the kernels cannot use a GPU on this machine, with the fix; '' when they can (never raises).");

  m.def(
      "layer_norm_fwd",
      [](std::uintptr_t x, std::uintptr_t residual, std::uintptr_t weight, std::uintptr_t bias, std::uintptr_t y,
         std::uintptr_t residual_out, std::uintptr_t mean, std::uintptr_t rstd, std::int64_t rows, std::int64_t cols,
         std::int64_t x_stride, std::int64_t residual_stride, std::int64_t y_stride, std::int64_t residual_out_stride,
         double eps, int x_dtype, int w_dtype, std::uintptr_t stream) {
        LayerNormFwdArgs a{.x = x, .residual = residual, .weight = weight, .bias = bias, .y = y,
                           .residual_out = residual_out, .mean = mean, .rstd = rstd, .rows = rows, .cols = cols,
                           .x_stride = x_stride, .residual_stride = residual_stride, .y_stride = y_stride,
                           .residual_out_stride = residual_out_stride, .eps = eps, .x_dtype = x_dtype,
                           .w_dtype = w_dtype, .stream = stream};
        py::gil_scoped_release release;
        fastvit::layer_norm_fwd(a);
      },
      py::arg("x"), py::arg("residual"), py::arg("weight"), py::arg("bias"), py::arg("y"), py::arg("residual_out"),
      py::arg("mean"), py::arg("rstd"), py::arg("rows"), py::arg("cols"), py::arg("x_stride"),
      py::arg("residual_stride"), py::arg("y_stride"), py::arg("residual_out_stride"), py::arg("eps"),
      py::arg("x_dtype"), py::arg("w_dtype"), py::arg("stream"),
      "LayerNorm forward with optional fused residual add (pointers as ints; 0 means absent).");

  m.def(
      "layer_norm_bwd",
      [](std::uintptr_t dy, std::uintptr_t dresidual_out, std::uintptr_t z, std::uintptr_t weight, std::uintptr_t mean,
         std::uintptr_t rstd, std::uintptr_t dz, std::uintptr_t dweight_partial, std::uintptr_t dbias_partial,
         std::int64_t rows, std::int64_t cols, std::int64_t dy_stride, std::int64_t dresidual_out_stride,
         std::int64_t z_stride, std::int64_t dz_stride, int num_partials, int x_dtype, int w_dtype,
         std::uintptr_t stream) {
        LayerNormBwdArgs a{.dy = dy, .dresidual_out = dresidual_out, .z = z, .weight = weight, .mean = mean,
                           .rstd = rstd, .dz = dz, .dweight_partial = dweight_partial, .dbias_partial = dbias_partial,
                           .rows = rows, .cols = cols, .dy_stride = dy_stride,
                           .dresidual_out_stride = dresidual_out_stride, .z_stride = z_stride, .dz_stride = dz_stride,
                           .num_partials = num_partials, .x_dtype = x_dtype, .w_dtype = w_dtype, .stream = stream};
        py::gil_scoped_release release;
        fastvit::layer_norm_bwd(a);
      },
      py::arg("dy"), py::arg("dresidual_out"), py::arg("z"), py::arg("weight"), py::arg("mean"), py::arg("rstd"),
      py::arg("dz"), py::arg("dweight_partial"), py::arg("dbias_partial"), py::arg("rows"), py::arg("cols"),
      py::arg("dy_stride"), py::arg("dresidual_out_stride"), py::arg("z_stride"), py::arg("dz_stride"),
      py::arg("num_partials"), py::arg("x_dtype"), py::arg("w_dtype"), py::arg("stream"),
      "LayerNorm backward: dz (= dx = dresidual) and fp32 per-block partials of dweight and dbias.");
  // ----------------------------------------------------------------------------------------- cuBLASLt
  m.def("cublaslt_status", &fastvit::cublaslt_status,
        "Where libcublasLt was loaded from, 'not loaded yet', or why loading failed (never raises).");
  m.def("load_cublaslt", &fastvit::load_cublaslt,
        "Loads libcublasLt now (no GPU needed) and returns where from; RuntimeError naming what was searched.");
  m.def("set_cublaslt_search_dirs", &fastvit::set_cublaslt_search_dirs, py::arg("dirs"),
        "Directories tried for libcublasLt.so.<major> after an already-loaded copy and before the loader path.");

  // --------------------------------------------------------------------------------------- soft_split
  m.def(
      "soft_split_fwd",
      [](std::uintptr_t x, std::uintptr_t norm_weight, std::uintptr_t norm_bias, std::uintptr_t y, std::uintptr_t mean,
         std::uintptr_t rstd, const I64x4& shape, const I64x4& strides, const I64x6& kernel, double eps, int x_dtype,
         int w_dtype, std::uintptr_t stream) {
        fastvit::SoftSplitFwdArgs a{.x = x, .norm_weight = norm_weight, .norm_bias = norm_bias, .y = y,
                                    .mean = mean, .rstd = rstd,
                                    .geometry = soft_split_geometry(shape, strides, kernel), .eps = eps,
                                    .x_dtype = x_dtype, .w_dtype = w_dtype, .stream = stream};
        py::gil_scoped_release release;
        fastvit::soft_split_fwd(a);
      },
      py::arg("x"), py::arg("norm_weight"), py::arg("norm_bias"), py::arg("y"), py::arg("mean"), py::arg("rstd"),
      py::arg("shape"), py::arg("strides"), py::arg("kernel"), py::arg("eps"), py::arg("x_dtype"), py::arg("w_dtype"),
      py::arg("stream"),
      "Soft split (unfold) of x read as an image: shape (B, C, H, W), its strides, kernel (kh, kw, sh, sw, ph, pw); "
      "optional fused LayerNorm (norm_weight 0: none) writing fp32 mean/rstd.");

  m.def(
      "soft_split_bwd",
      [](std::uintptr_t dy, std::uintptr_t x, std::uintptr_t norm_weight, std::uintptr_t mean, std::uintptr_t rstd,
         std::uintptr_t row_coefs, std::uintptr_t dx, std::uintptr_t dweight_partial, std::uintptr_t dbias_partial,
         const I64x4& shape, const I64x4& strides, const I64x6& kernel, const I64x4& dx_strides, int num_partials,
         int x_dtype, int w_dtype, std::uintptr_t stream) {
        fastvit::SoftSplitBwdArgs a{.dy = dy, .x = x, .norm_weight = norm_weight, .mean = mean, .rstd = rstd,
                                    .row_coefs = row_coefs, .dx = dx, .dweight_partial = dweight_partial,
                                    .dbias_partial = dbias_partial,
                                    .geometry = soft_split_geometry(shape, strides, kernel),
                                    .dx_stride_b = dx_strides[0], .dx_stride_c = dx_strides[1],
                                    .dx_stride_h = dx_strides[2], .dx_stride_w = dx_strides[3],
                                    .num_partials = num_partials, .x_dtype = x_dtype, .w_dtype = w_dtype,
                                    .stream = stream};
        py::gil_scoped_release release;
        fastvit::soft_split_bwd(a);
      },
      py::arg("dy"), py::arg("x"), py::arg("norm_weight"), py::arg("mean"), py::arg("rstd"), py::arg("row_coefs"),
      py::arg("dx"), py::arg("dweight_partial"), py::arg("dbias_partial"), py::arg("shape"), py::arg("strides"),
      py::arg("kernel"), py::arg("dx_strides"), py::arg("num_partials"), py::arg("x_dtype"), py::arg("w_dtype"),
      py::arg("stream"),
      "Soft split backward: the fold as a deterministic gather (dx 0: skipped), with the LayerNorm backward folded "
      "in and fp32 per-block partials of its dweight/dbias.");

  // -------------------------------------------------------------------------------------- patch_embed
  m.def(
      "patch_embed_fwd",
      [](std::uintptr_t x, std::uintptr_t weight, std::uintptr_t bias, std::uintptr_t pos_embed, std::uintptr_t prefix,
         std::uintptr_t cols, std::uintptr_t out, const I64x4& shape, const I64x4& strides, std::int64_t patch,
         std::int64_t embed_dim, std::int64_t num_prefix, std::int64_t pos_rows, int dtype, bool allow_tf32,
         std::uintptr_t workspace, std::int64_t workspace_bytes, std::uintptr_t stream) {
        fastvit::PatchEmbedFwdArgs a{.x = x, .weight = weight, .bias = bias, .pos_embed = pos_embed,
                                     .prefix = prefix, .cols = cols, .out = out, .batch = shape[0],
                                     .channels = shape[1], .height = shape[2], .width = shape[3],
                                     .x_stride_b = strides[0], .x_stride_c = strides[1], .x_stride_h = strides[2],
                                     .x_stride_w = strides[3], .patch = patch, .embed_dim = embed_dim,
                                     .num_prefix = num_prefix, .pos_rows = pos_rows, .dtype = dtype,
                                     .allow_tf32 = allow_tf32, .workspace = workspace,
                                     .workspace_bytes = workspace_bytes, .stream = stream};
        py::gil_scoped_release release;
        fastvit::patch_embed_fwd(a);
      },
      py::arg("x"), py::arg("weight"), py::arg("bias"), py::arg("pos_embed"), py::arg("prefix"), py::arg("cols"),
      py::arg("out"), py::arg("shape"), py::arg("strides"), py::arg("patch"), py::arg("embed_dim"),
      py::arg("num_prefix"), py::arg("pos_rows"), py::arg("dtype"), py::arg("allow_tf32"), py::arg("workspace"),
      py::arg("workspace_bytes"), py::arg("stream"),
      "Patch embedding: gather into cols, cuBLASLt GEMM with bias + position-embedding epilogue, prefix rows.");

  m.def(
      "patch_embed_bwd",
      [](std::uintptr_t dout, std::uintptr_t x, std::uintptr_t weight, std::uintptr_t cols, std::uintptr_t dx,
         std::uintptr_t dweight, const I64x4& shape, const I64x4& strides, const I64x4& dx_strides, std::int64_t patch,
         std::int64_t embed_dim, std::int64_t dout_stride, int dtype, bool allow_tf32, std::uintptr_t workspace,
         std::int64_t workspace_bytes, std::uintptr_t stream) {
        fastvit::PatchEmbedBwdArgs a{.dout = dout, .x = x, .weight = weight, .cols = cols, .dx = dx,
                                     .dweight = dweight, .batch = shape[0], .channels = shape[1],
                                     .height = shape[2], .width = shape[3], .x_stride_b = strides[0],
                                     .x_stride_c = strides[1], .x_stride_h = strides[2], .x_stride_w = strides[3],
                                     .dx_stride_b = dx_strides[0], .dx_stride_c = dx_strides[1],
                                     .dx_stride_h = dx_strides[2], .dx_stride_w = dx_strides[3], .patch = patch,
                                     .embed_dim = embed_dim, .dout_stride = dout_stride, .dtype = dtype,
                                     .allow_tf32 = allow_tf32, .workspace = workspace,
                                     .workspace_bytes = workspace_bytes, .stream = stream};
        py::gil_scoped_release release;
        fastvit::patch_embed_bwd(a);
      },
      py::arg("dout"), py::arg("x"), py::arg("weight"), py::arg("cols"), py::arg("dx"), py::arg("dweight"),
      py::arg("shape"), py::arg("strides"), py::arg("dx_strides"), py::arg("patch"), py::arg("embed_dim"),
      py::arg("dout_stride"), py::arg("dtype"), py::arg("allow_tf32"), py::arg("workspace"),
      py::arg("workspace_bytes"), py::arg("stream"),
      "Patch embedding backward: dweight = dout^T @ cols and dx = scatter(dout @ weight) (either pointer 0: skipped).");

  // -------------------------------------------------------------------------------------- linear
  m.def(
      "linear_fwd",
      [](std::uintptr_t x, std::uintptr_t weight, std::uintptr_t bias, std::uintptr_t residual, std::uintptr_t y,
         std::int64_t m_rows, std::int64_t n, std::int64_t k, std::int64_t x_stride, std::int64_t weight_stride,
         std::int64_t residual_stride, std::int64_t y_stride, int activation, int dtype, bool allow_tf32,
         std::uintptr_t workspace, std::int64_t workspace_bytes, std::uintptr_t stream) {
        fastvit::LinearFwdArgs a{.x = x, .weight = weight, .bias = bias, .residual = residual, .y = y,
                                     .m = m_rows, .n = n, .k = k, .x_stride = x_stride,
                                     .weight_stride = weight_stride, .residual_stride = residual_stride,
                                     .y_stride = y_stride, .activation = activation, .dtype = dtype,
                                     .allow_tf32 = allow_tf32, .workspace = workspace,
                                     .workspace_bytes = workspace_bytes, .stream = stream};
        py::gil_scoped_release release;
        fastvit::linear_fwd(a);
      },
      py::arg("x"), py::arg("weight"), py::arg("bias"), py::arg("residual"), py::arg("y"), py::arg("m"), py::arg("n"),
      py::arg("k"), py::arg("x_stride"), py::arg("weight_stride"), py::arg("residual_stride"), py::arg("y_stride"),
      py::arg("activation"), py::arg("dtype"), py::arg("allow_tf32"), py::arg("workspace"),
      py::arg("workspace_bytes"), py::arg("stream"),
      "y = act(x @ weight^T + bias) + residual through cuBLASLt (activation: 0 none, 1 gelu, 2 gelu_tanh, 3 quick_gelu).");

  m.def(
      "linear_act_grad",
      [](std::uintptr_t dy, std::uintptr_t x, std::uintptr_t weight, std::uintptr_t bias, std::uintptr_t g,
         std::uintptr_t dbias_partial, std::int64_t m_rows, std::int64_t n, std::int64_t k, std::int64_t dy_stride,
         std::int64_t x_stride, std::int64_t weight_stride, std::int64_t g_stride, int num_partials, int activation,
         int dtype, bool allow_tf32, std::uintptr_t workspace, std::int64_t workspace_bytes, std::uintptr_t stream) {
        fastvit::LinearActGradArgs a{.dy = dy, .x = x, .weight = weight, .bias = bias, .g = g,
                                         .dbias_partial = dbias_partial, .m = m_rows, .n = n, .k = k,
                                         .dy_stride = dy_stride, .x_stride = x_stride,
                                         .weight_stride = weight_stride, .g_stride = g_stride,
                                         .num_partials = num_partials, .activation = activation, .dtype = dtype,
                                         .allow_tf32 = allow_tf32, .workspace = workspace,
                                         .workspace_bytes = workspace_bytes, .stream = stream};
        py::gil_scoped_release release;
        fastvit::linear_act_grad(a);
      },
      py::arg("dy"), py::arg("x"), py::arg("weight"), py::arg("bias"), py::arg("g"), py::arg("dbias_partial"),
      py::arg("m"), py::arg("n"), py::arg("k"), py::arg("dy_stride"), py::arg("x_stride"), py::arg("weight_stride"),
      py::arg("g_stride"), py::arg("num_partials"), py::arg("activation"), py::arg("dtype"), py::arg("allow_tf32"),
      py::arg("workspace"), py::arg("workspace_bytes"), py::arg("stream"),
      "g = dy * act'(x @ weight^T + bias) (h recomputed by cuBLASLt) and fp32 per-block partial column sums of g.");

  m.def(
      "linear_wgrad",
      [](std::uintptr_t dy, std::uintptr_t x, std::uintptr_t dweight, std::uintptr_t dbias, std::int64_t m_rows,
         std::int64_t n, std::int64_t k, std::int64_t dy_stride, std::int64_t x_stride, std::int64_t dweight_stride,
         int dtype, bool allow_tf32, std::uintptr_t workspace, std::int64_t workspace_bytes, std::uintptr_t stream) {
        fastvit::LinearWgradArgs a{.dy = dy, .x = x, .dweight = dweight, .dbias = dbias, .m = m_rows, .n = n,
                                       .k = k, .dy_stride = dy_stride, .x_stride = x_stride,
                                       .dweight_stride = dweight_stride, .dtype = dtype,
                                       .allow_tf32 = allow_tf32, .workspace = workspace,
                                       .workspace_bytes = workspace_bytes, .stream = stream};
        py::gil_scoped_release release;
        return fastvit::linear_wgrad(a);
      },
      py::arg("dy"), py::arg("x"), py::arg("dweight"), py::arg("dbias"), py::arg("m"), py::arg("n"), py::arg("k"),
      py::arg("dy_stride"), py::arg("x_stride"), py::arg("dweight_stride"), py::arg("dtype"), py::arg("allow_tf32"),
      py::arg("workspace"), py::arg("workspace_bytes"), py::arg("stream"),
      "dweight = dy^T @ x and dbias = sum_rows(dy) in one cuBLASLt GEMM (BGRADB epilogue); False (nothing "
      "written) where cuBLASLt has no algorithm for it.");
}
