// pybind11 module fastvit._C. Every entry point takes device pointers as integers, sizes and strides
// in elements, dtype codes (see common.h) and the CUDA stream handle; none touches torch. Argument
// errors raise ValueError, CUDA errors (including "no GPU") raise RuntimeError.
#include <pybind11/pybind11.h>

#include "layer_norm.h"
#include "runtime.h"

namespace py = pybind11;
using fastvit::LayerNormBwdArgs;
using fastvit::LayerNormFwdArgs;

PYBIND11_MODULE(_C, m) {
  m.doc() = "fastvit CUDA kernels (torch-independent; called through fastvit.ops)";
  m.attr("CUDART_VERSION") = fastvit::cudart_version();
  m.def("device_status", &fastvit::device_status, "What the CUDA runtime sees (never raises).");

  m.def(
      "layer_norm_fwd",
      [](std::uintptr_t x, std::uintptr_t residual, std::uintptr_t weight, std::uintptr_t bias, std::uintptr_t y,
         std::uintptr_t residual_out, std::uintptr_t mean, std::uintptr_t rstd, std::int64_t rows, std::int64_t cols,
         std::int64_t x_stride, std::int64_t residual_stride, std::int64_t y_stride, std::int64_t residual_out_stride,
         double eps, int x_dtype, int w_dtype, std::uintptr_t stream) {
        LayerNormFwdArgs a{x,     residual, weight,          bias,     y,        residual_out,        mean,
                           rstd,  rows,     cols,            x_stride, residual_stride, y_stride, residual_out_stride,
                           eps,   x_dtype,  w_dtype,         stream};
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
        LayerNormBwdArgs a{dy,   dresidual_out, z,         weight,    mean,    rstd,
                           dz,   dweight_partial, dbias_partial, rows, cols, dy_stride,
                           dresidual_out_stride, z_stride, dz_stride, num_partials, x_dtype, w_dtype, stream};
        py::gil_scoped_release release;
        fastvit::layer_norm_bwd(a);
      },
      py::arg("dy"), py::arg("dresidual_out"), py::arg("z"), py::arg("weight"), py::arg("mean"), py::arg("rstd"),
      py::arg("dz"), py::arg("dweight_partial"), py::arg("dbias_partial"), py::arg("rows"), py::arg("cols"),
      py::arg("dy_stride"), py::arg("dresidual_out_stride"), py::arg("z_stride"), py::arg("dz_stride"),
      py::arg("num_partials"), py::arg("x_dtype"), py::arg("w_dtype"), py::arg("stream"),
      "LayerNorm backward: dz (= dx = dresidual) and fp32 per-block partials of dweight and dbias.");
}
