// cuBLASLt, loaded at first use. The header (cublasLt.h) provides the types and enum values only; every
// function is resolved with dlsym from libcublasLt.so.<FASTVIT_CUBLAS_MAJOR>, the major version of the
// header the build found (CMakeLists.txt). Nothing here is linked against cuBLAS, so fastvit._C imports
// (and its other kernels run) where the library is absent; a GEMM then fails with a RuntimeError that
// names every place searched.
//
// Row-major to column-major: cuBLASLt is column-major, torch row-major. A row-major (r, c) matrix with
// leading dimension ld is, read column-major, its transpose: a (c, r) matrix with the same ld. So the
// row-major out = op(lhs) @ op(rhs) is the column-major out^T = op(rhs)^T @ op(lhs)^T, i.e. cuBLASLt's
// A is rhs and B is lhs, each with its own transpose flag, m = out.cols, n = out.rows. The bias epilogue
// adds a vector along cuBLASLt's m, which is torch's output column: what a Linear's bias needs.
#include <dlfcn.h>

#include <cstdlib>
#include <map>
#include <mutex>
#include <optional>
#include <sstream>

#include "common.h"
#include "cublaslt.h"

#if FASTVIT_HAVE_CUBLASLT_H
#include <cublasLt.h>
#endif

namespace fastvit {

namespace {
std::mutex g_mutex;
std::vector<std::string> g_search_dirs;
std::string g_status = "not loaded yet";
}  // namespace

void set_cublaslt_search_dirs(const std::vector<std::string>& dirs) {
  std::lock_guard<std::mutex> lock(g_mutex);
  g_search_dirs = dirs;
}

std::string cublaslt_status() {
  std::lock_guard<std::mutex> lock(g_mutex);
  return g_status;
}

#if !FASTVIT_HAVE_CUBLASLT_H

namespace {
[[noreturn]] void built_without_header(const char* op) {
  throw std::runtime_error(std::string("fastvit._C.") + op +
                           ": this build of fastvit._C has no cuBLASLt support: cublasLt.h was not found when it was "
                           "compiled (see `cublaslt_header` in fastvit/_C_build_info.json). Install the CUDA toolkit's "
                           "cuBLAS headers or set FASTVIT_CUBLASLT_INCLUDE_DIR, then reinstall; or use "
                           "backend='triton' / 'torch'.");
}
}  // namespace

std::string load_cublaslt() { built_without_header("load_cublaslt"); }

bool try_matmul(const char* op, const MatmulArgs&) { built_without_header(op); }

#else

namespace {

#define FASTVIT_STR2(x) #x
#define FASTVIT_STR(x) FASTVIT_STR2(x)
constexpr const char* kSoname = "libcublasLt.so." FASTVIT_STR(FASTVIT_CUBLAS_MAJOR);

// The functions fastvit calls, typed from the header.
struct LtApi {
  decltype(&cublasLtCreate) create = nullptr;
  decltype(&cublasLtGetVersion) get_version = nullptr;
  decltype(&cublasLtMatmulDescCreate) desc_create = nullptr;
  decltype(&cublasLtMatmulDescDestroy) desc_destroy = nullptr;
  decltype(&cublasLtMatmulDescSetAttribute) desc_set = nullptr;
  decltype(&cublasLtMatrixLayoutCreate) layout_create = nullptr;
  decltype(&cublasLtMatrixLayoutDestroy) layout_destroy = nullptr;
  decltype(&cublasLtMatrixLayoutSetAttribute) layout_set = nullptr;
  decltype(&cublasLtMatmulPreferenceCreate) pref_create = nullptr;
  decltype(&cublasLtMatmulPreferenceDestroy) pref_destroy = nullptr;
  decltype(&cublasLtMatmulPreferenceSetAttribute) pref_set = nullptr;
  decltype(&cublasLtMatmulAlgoGetHeuristic) heuristic = nullptr;
  decltype(&cublasLtMatmul) matmul = nullptr;
  decltype(&cublasLtGetStatusString) status_string = nullptr;  // optional: older libraries lack it
};

LtApi g_api;
bool g_loaded = false;
std::map<int, cublasLtHandle_t> g_handles;  // one per device, kept for the life of the process
// Per problem key: the heuristic's algorithm, or nullopt where it has none (remembered too, so a GEMM the
// caller then runs another way does not re-query the heuristic on every call).
std::map<std::string, std::optional<cublasLtMatmulAlgo_t>> g_algos;

// `label` says where this attempt looks; dlerror() names the file.
void* try_open(const std::string& what, int flags, const char* label, std::vector<std::string>& tried) {
  void* h = dlopen(what.c_str(), flags);
  if (!h) {
    const char* err = dlerror();
    tried.push_back(std::string(label) + ": " + (err ? err : what + " not found"));
  }
  return h;
}

// Called with g_mutex held. Throws std::runtime_error naming every attempt.
const LtApi& load(const char* op) {
  if (g_loaded) return g_api;
  std::vector<std::string> tried;
  void* lib = nullptr;
  auto attempt = [&](const std::string& what, int flags, const char* label) {
    if (!lib) lib = try_open(what, flags, label, tried);
  };
  attempt(kSoname, RTLD_NOW | RTLD_LOCAL | RTLD_NOLOAD, "a copy already loaded in the process");
  for (const std::string& dir : g_search_dirs) {
    attempt(dir + "/" + kSoname, RTLD_NOW | RTLD_LOCAL, "set_cublaslt_search_dirs");
  }
  attempt(kSoname, RTLD_NOW | RTLD_LOCAL, "the loader path (LD_LIBRARY_PATH, rpath, ld.so.cache)");
  for (const char* env : {"CUDA_HOME", "CUDA_PATH"}) {
    if (const char* v = std::getenv(env)) attempt(std::string(v) + "/lib64/" + kSoname, RTLD_NOW | RTLD_LOCAL, env);
  }
  attempt(std::string("/usr/local/cuda/lib64/") + kSoname, RTLD_NOW | RTLD_LOCAL, "the default toolkit");
  std::string where;
  if (lib) {
    char path[4096] = {0};
    if (dlinfo(lib, RTLD_DI_ORIGIN, path) == 0) where = std::string(path) + "/" + kSoname;
  }
  std::vector<std::string> missing;
  auto sym = [&](auto& fn, const char* name, bool required) {
    fn = lib ? reinterpret_cast<std::remove_reference_t<decltype(fn)>>(dlsym(lib, name)) : nullptr;
    if (!fn && required && lib) missing.push_back(name);
  };
  LtApi api;
  sym(api.create, "cublasLtCreate", true);
  sym(api.get_version, "cublasLtGetVersion", true);
  sym(api.desc_create, "cublasLtMatmulDescCreate", true);
  sym(api.desc_destroy, "cublasLtMatmulDescDestroy", true);
  sym(api.desc_set, "cublasLtMatmulDescSetAttribute", true);
  sym(api.layout_create, "cublasLtMatrixLayoutCreate", true);
  sym(api.layout_destroy, "cublasLtMatrixLayoutDestroy", true);
  sym(api.layout_set, "cublasLtMatrixLayoutSetAttribute", true);
  sym(api.pref_create, "cublasLtMatmulPreferenceCreate", true);
  sym(api.pref_destroy, "cublasLtMatmulPreferenceDestroy", true);
  sym(api.pref_set, "cublasLtMatmulPreferenceSetAttribute", true);
  sym(api.heuristic, "cublasLtMatmulAlgoGetHeuristic", true);
  sym(api.matmul, "cublasLtMatmul", true);
  sym(api.status_string, "cublasLtGetStatusString", false);
  std::ostringstream msg;
  if (!lib || !missing.empty()) {
    if (!lib) {
      msg << "could not load " << kSoname << " (the cuBLASLt the extension was built against). Tried, in order: ";
      for (size_t i = 0; i < tried.size(); ++i) msg << (i ? "; " : "") << tried[i];
      msg << ". Install the nvidia-cublas wheel torch uses, add the library's directory to LD_LIBRARY_PATH, or call "
             "fastvit.ops._cuda_backends.set_cublaslt_search_dirs([...])";
    } else {
      msg << where << " lacks";
      for (const auto& m : missing) msg << " " << m;
      dlclose(lib);
    }
    g_status = "load failed: " + msg.str();
    throw std::runtime_error(std::string("fastvit._C.") + op + ": " + msg.str() +
                             "; or use backend='triton' / 'torch'.");
  }
  g_api = api;
  g_loaded = true;
  g_status = "loaded " + (where.empty() ? std::string(kSoname) : where) + " (cuBLASLt " +
             std::to_string(api.get_version()) + ")";
  return g_api;
}

std::string status_text(const LtApi& api, cublasStatus_t s) {
  std::string text = "cublasStatus " + std::to_string(static_cast<int>(s));
  if (api.status_string) text += std::string(" (") + api.status_string(s) + ")";
  return text;
}

void check(const LtApi& api, cublasStatus_t s, const char* op, const char* what) {
  if (s != CUBLAS_STATUS_SUCCESS) {
    throw std::runtime_error(std::string("fastvit._C.") + op + ": " + what + " failed: " + status_text(api, s) +
                             ". Report the shapes and dtypes.");
  }
}

cudaDataType_t data_type(int dtype) {
  switch (dtype) {
    case kFloat16: return CUDA_R_16F;
    case kBFloat16: return CUDA_R_16BF;
    default: return CUDA_R_32F;
  }
}

int element_bytes(int dtype) { return dtype == kFloat32 ? 4 : 2; }

// The largest power of two (<= 256) dividing the address of every batch's matrix: cuBLASLt only picks
// kernels whose vector loads this alignment allows.
std::uint32_t alignment(std::uintptr_t ptr, std::int64_t batch_stride, int batch, int dtype) {
  std::uint64_t bits = ptr | 256u;
  if (batch > 1) bits |= static_cast<std::uint64_t>(batch_stride) * element_bytes(dtype);
  return static_cast<std::uint32_t>(bits & (~bits + 1));
}

// RAII for the per-call descriptors.
struct Descriptors {
  const LtApi& api;
  cublasLtMatmulDesc_t desc = nullptr;
  cublasLtMatrixLayout_t layouts[4] = {nullptr, nullptr, nullptr, nullptr};
  cublasLtMatmulPreference_t pref = nullptr;
  explicit Descriptors(const LtApi& a) : api(a) {}
  ~Descriptors() {
    if (pref) api.pref_destroy(pref);
    for (auto l : layouts)
      if (l) api.layout_destroy(l);
    if (desc) api.desc_destroy(desc);
  }
};

// The column-major layout of a row-major operand (see the file comment).
cublasLtMatrixLayout_t make_layout(const LtApi& api, const char* op, const RowMajor& m, int dtype, int batch) {
  cublasLtMatrixLayout_t layout = nullptr;
  check(api, api.layout_create(&layout, data_type(dtype), static_cast<std::uint64_t>(m.cols),
                               static_cast<std::uint64_t>(m.rows), m.ld),
        op, "cublasLtMatrixLayoutCreate");
  if (batch > 1) {
    const std::int32_t count = batch;
    const std::int64_t stride = m.batch_stride;
    check(api, api.layout_set(layout, CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT, &count, sizeof(count)), op,
          "setting the batch count");
    check(api, api.layout_set(layout, CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET, &stride, sizeof(stride)), op,
          "setting the batch stride");
  }
  return layout;
}

}  // namespace

std::string load_cublaslt() {
  std::lock_guard<std::mutex> lock(g_mutex);
  load("load_cublaslt");
  return g_status;
}

bool try_matmul(const char* op, const MatmulArgs& a) {
  std::lock_guard<std::mutex> lock(g_mutex);  // the handle and algorithm caches; launches are asynchronous
  const LtApi& api = load(op);
  int device = 0;
  // The handle and algorithm caches are per device: guessing device 0 would run on another GPU's handle.
  const cudaError_t device_err = cudaGetDevice(&device);
  if (device_err != cudaSuccess) {
    cudaGetLastError();  // clear the sticky error so later calls start clean
    throw std::runtime_error(std::string("fastvit._C.") + op + ": cudaGetDevice failed: " +
                             cudaGetErrorString(device_err) + ". Check the GPU with nvidia-smi, or use "
                             "backend='triton' / 'torch'.");
  }
  cublasLtHandle_t& handle = g_handles[device];
  if (!handle) check(api, api.create(&handle), op, "cublasLtCreate");

  const std::int64_t m = a.out.cols, n = a.out.rows, k = a.lhs_t ? a.lhs.rows : a.lhs.cols;
  const bool has_addend = a.addend.ptr != 0;
  Descriptors d(api);
  const cublasComputeType_t compute =
      a.dtype == kFloat32 && a.allow_tf32 ? CUBLAS_COMPUTE_32F_FAST_TF32 : CUBLAS_COMPUTE_32F;
  check(api, api.desc_create(&d.desc, compute, CUDA_R_32F), op, "cublasLtMatmulDescCreate");
  const cublasOperation_t transa = a.rhs_t ? CUBLAS_OP_T : CUBLAS_OP_N;
  const cublasOperation_t transb = a.lhs_t ? CUBLAS_OP_T : CUBLAS_OP_N;
  check(api, api.desc_set(d.desc, CUBLASLT_MATMUL_DESC_TRANSA, &transa, sizeof(transa)), op, "setting TRANSA");
  check(api, api.desc_set(d.desc, CUBLASLT_MATMUL_DESC_TRANSB, &transb, sizeof(transb)), op, "setting TRANSB");
  cublasLtEpilogue_t epilogue = CUBLASLT_EPILOGUE_DEFAULT;
  if (a.epilogue == Epilogue::kBias) epilogue = CUBLASLT_EPILOGUE_BIAS;
  if (a.epilogue == Epilogue::kGeluTanh) epilogue = CUBLASLT_EPILOGUE_GELU;
  if (a.epilogue == Epilogue::kGeluTanhBias) epilogue = CUBLASLT_EPILOGUE_GELU_BIAS;
  if (a.epilogue == Epilogue::kBgradB) epilogue = CUBLASLT_EPILOGUE_BGRADB;  // bias: written, not read
  const bool has_bias =
      a.epilogue == Epilogue::kBias || a.epilogue == Epilogue::kGeluTanhBias || a.epilogue == Epilogue::kBgradB;
  check(api, api.desc_set(d.desc, CUBLASLT_MATMUL_DESC_EPILOGUE, &epilogue, sizeof(epilogue)), op,
        "setting the epilogue");
  if (has_bias) {
    const void* bias = reinterpret_cast<const void*>(a.bias);
    check(api, api.desc_set(d.desc, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &bias, sizeof(bias)), op,
          "setting the bias pointer");
  }

  const RowMajor& c = has_addend ? a.addend : a.out;
  d.layouts[0] = make_layout(api, op, a.rhs, a.dtype, a.batch);  // cuBLASLt's A
  d.layouts[1] = make_layout(api, op, a.lhs, a.dtype, a.batch);  // cuBLASLt's B
  d.layouts[2] = make_layout(api, op, c, a.dtype, a.batch);
  d.layouts[3] = make_layout(api, op, a.out, a.dtype, a.batch);

  const std::uint32_t align[4] = {alignment(a.rhs.ptr, a.rhs.batch_stride, a.batch, a.dtype),
                                  alignment(a.lhs.ptr, a.lhs.batch_stride, a.batch, a.dtype),
                                  alignment(c.ptr, c.batch_stride, a.batch, a.dtype),
                                  alignment(a.out.ptr, a.out.batch_stride, a.batch, a.dtype)};
  std::ostringstream key;
  key << device << ' ' << m << ' ' << n << ' ' << k << ' ' << a.batch << ' ' << a.dtype << ' ' << a.allow_tf32 << ' '
      << a.lhs_t << a.rhs_t << ' ' << static_cast<int>(a.epilogue) << ' ' << has_addend << ' ' << a.workspace_bytes;
  for (const RowMajor* mat : {&a.rhs, &a.lhs, &c, &a.out}) key << ' ' << mat->ld << ' ' << mat->batch_stride;
  for (std::uint32_t al : align) key << ' ' << al;
  if (has_bias) key << ' ' << alignment(a.bias, 0, 1, a.dtype);

  auto cached = g_algos.find(key.str());
  if (cached == g_algos.end()) {
    check(api, api.pref_create(&d.pref), op, "cublasLtMatmulPreferenceCreate");
    const std::uint64_t workspace = static_cast<std::uint64_t>(a.workspace_bytes);
    check(api, api.pref_set(d.pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &workspace, sizeof(workspace)), op,
          "setting the workspace size");
    const cublasLtMatmulPreferenceAttributes_t align_attrs[4] = {
        CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES,
        CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES};
    for (int i = 0; i < 4; ++i) {
      check(api, api.pref_set(d.pref, align_attrs[i], &align[i], sizeof(align[i])), op, "setting an alignment");
    }
    cublasLtMatmulHeuristicResult_t result{};
    int found = 0;
    const cublasStatus_t status = api.heuristic(handle, d.desc, d.layouts[0], d.layouts[1], d.layouts[2],
                                                d.layouts[3], d.pref, 1, &result, &found);
    // "No algorithm" comes back as NOT_SUPPORTED, as zero results, or as a result whose state is a failure:
    // all three let the caller fall back (try_matmul's contract); any other status is a real error.
    const bool none = status == CUBLAS_STATUS_NOT_SUPPORTED ||
                      (status == CUBLAS_STATUS_SUCCESS && (found == 0 || result.state != CUBLAS_STATUS_SUCCESS));
    if (!none) check(api, status, op, "cublasLtMatmulAlgoGetHeuristic");
    cached = g_algos.emplace(key.str(), none ? std::nullopt : std::optional<cublasLtMatmulAlgo_t>(result.algo)).first;
  }
  if (!cached->second) return false;
  const float alpha = 1.f, beta = has_addend ? 1.f : 0.f;
  check(api,
        api.matmul(handle, d.desc, &alpha, reinterpret_cast<const void*>(a.rhs.ptr), d.layouts[0],
                   reinterpret_cast<const void*>(a.lhs.ptr), d.layouts[1], &beta,
                   reinterpret_cast<const void*>(c.ptr), d.layouts[2], reinterpret_cast<void*>(a.out.ptr),
                   d.layouts[3], &*cached->second, reinterpret_cast<void*>(a.workspace),
                   static_cast<std::size_t>(a.workspace_bytes), reinterpret_cast<cudaStream_t>(a.stream)),
        op, "cublasLtMatmul");
  return true;
}

#endif  // FASTVIT_HAVE_CUBLASLT_H

void matmul(const char* op, const MatmulArgs& a) {
  if (!try_matmul(op, a)) {
    const std::int64_t k = a.lhs_t ? a.lhs.rows : a.lhs.cols;
    throw std::runtime_error(std::string("fastvit._C.") + op + ": cuBLASLt has no algorithm for this GEMM (out " +
                             std::to_string(a.out.rows) + "x" + std::to_string(a.out.cols) + ", k=" + std::to_string(k) +
                             ", batch " + std::to_string(a.batch) + ", " + dtype_name(a.dtype) + ", epilogue " +
                             std::to_string(static_cast<int>(a.epilogue)) +
                             "). Use backend='triton' / 'torch' and report the shapes.");
  }
}

}  // namespace fastvit
