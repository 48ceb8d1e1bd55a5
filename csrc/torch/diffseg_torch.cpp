// diffseg torch shim: the C API of diffseg_torch.h over libtorch (TorchScript).
//
// Every extern "C" entry catches std::exception (TorchScript interpreter
// errors arrive as std::runtime_error, libtorch's as c10::Error) and turns it
// into an error code plus a thread-local message. Nothing exits.
#include "diffseg_torch.h"

#include <ATen/Parallel.h>
#include <torch/cuda.h>
#include <torch/script.h>
#include <torch/version.h>
#include <torch/csrc/jit/runtime/graph_executor.h>

#include <cmath>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <memory>
#include <mutex>
#include <new>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

static_assert(__cplusplus >= 201703L, "the diffseg torch shim needs C++17 (g++ >= 11 or -std=c++17)");

namespace {

thread_local std::string g_error;

const char *kMetadataName = "diffseg.json";  // TorchScript extra file written by `diffseg export`

int fail(int code, const std::string &msg) {
    try {
        g_error = msg;
    } catch (...) {
        g_error = "out of memory (while formatting an error message)";
    }
    return code;
}

std::string first_line(std::string what) {
    auto nl = what.find('\n');
    if (nl != std::string::npos) what.resize(nl);
    return what;
}

// The message of a libtorch exception without its C++ backtrace, first
// non-empty line only (TorchScript compiler errors start with a newline).
std::string short_what(const std::exception &e) {
    const auto *c10e = dynamic_cast<const c10::Error *>(&e);
    std::string full = c10e ? c10e->what_without_backtrace() : e.what();
    size_t start = full.find_first_not_of(" \n");
    return start == std::string::npos ? std::string("unknown error") : first_line(full.substr(start));
}

struct ShimError : std::runtime_error {
    int code;
    ShimError(int c, const std::string &m) : std::runtime_error(m), code(c) {}
};

c10::Device parse_device(const char *device) {
    std::string name = device ? device : "cpu";
    if (name.empty()) name = "cpu";
    try {
        return c10::Device(name);
    } catch (const std::exception &) {
        throw ShimError(DSEG_TORCH_EINVAL, "device: expected 'cpu', 'cuda' or 'cuda:N', got '" + name + "'");
    }
}

int all_cores() {
    unsigned n = std::thread::hardware_concurrency();
    return n > 0 ? static_cast<int>(n) : 1;
}

// ------------------------------------------------ the bundle's layout
// `diffseg export` stores the sizes as attributes of the scripted module
// (diffseg/sd/export.py, _script_bundle): the shim reads them from the module
// it runs, so they cannot disagree with its graph's origin, and it parses no
// JSON. The values are checked all the same: a damaged archive can hold
// anything.

c10::IValue attribute(const torch::jit::Module &m, const char *name) {
    if (!m.hasattr(name))
        throw ShimError(DSEG_TORCH_EFORMAT, std::string("bundle: the module has no '") + name +
                                                "' attribute: not a diffseg bundle of format version " +
                                                std::to_string(DSEG_TORCH_FORMAT_VERSION) +
                                                " (export it again with this diffseg, `diffseg export`)");
    return m.attr(name);
}

int int_attribute(const torch::jit::Module &m, const char *name, int low, int high) {
    c10::IValue v = attribute(m, name);
    if (!v.isInt() || v.toInt() < low || v.toInt() > high)
        throw ShimError(DSEG_TORCH_EFORMAT, std::string("bundle attribute '") + name + "' must be an integer in [" +
                                                std::to_string(low) + ", " + std::to_string(high) + "]");
    return static_cast<int>(v.toInt());
}

void read_layout(const torch::jit::Module &m, const c10::Device &device, dseg_torch_info *info) {
    int version = int_attribute(m, "format_version", 0, 1 << 30);
    if (version != DSEG_TORCH_FORMAT_VERSION)
        throw ShimError(DSEG_TORCH_EFORMAT, "bundle format version " + std::to_string(version) +
                                                " is not supported (this diffseg reads version " +
                                                std::to_string(DSEG_TORCH_FORMAT_VERSION) +
                                                "): export the bundle again with this diffseg (`diffseg export`)");
    std::memset(info, 0, sizeof *info);
    info->format_version = version;
    info->image_size = int_attribute(m, "image_size", 8, 1 << 15);
    info->image_channels = int_attribute(m, "image_channels", 1, 16);
    info->latent_size = int_attribute(m, "latent_size", 1, 1 << 12);
    info->latent_channels = int_attribute(m, "latent_channels", 1, 1024);
    info->default_timestep = int_attribute(m, "default_timestep", 0, 100000);
    c10::IValue res = attribute(m, "map_resolutions");
    const std::string res_rule =
        "bundle attribute 'map_resolutions' must be a list of 1.." + std::to_string(DSEG_TORCH_MAX_MAPS) +
        " integers in [1, 256]";
    if (!res.isIntList()) throw ShimError(DSEG_TORCH_EFORMAT, res_rule);
    c10::List<int64_t> list = res.toIntList();
    if (list.empty() || list.size() > DSEG_TORCH_MAX_MAPS) throw ShimError(DSEG_TORCH_EFORMAT, res_rule);
    info->n_maps = static_cast<int>(list.size());
    for (int i = 0; i < info->n_maps; i++) {
        int64_t r = list.get(static_cast<size_t>(i));
        if (r < 1 || r > 256) throw ShimError(DSEG_TORCH_EFORMAT, res_rule);
        info->map_res[i] = static_cast<int>(r);
    }
    c10::IValue kind = attribute(m, "device_type");
    if (!kind.isString()) throw ShimError(DSEG_TORCH_EFORMAT, "bundle attribute 'device_type' must be a string");
    const std::string &exported = kind.toStringRef();
    if (exported != c10::DeviceTypeName(device.type(), /*lower_case=*/true))
        throw ShimError(DSEG_TORCH_EDEVICE, "bundle was exported for device '" + exported + "', not '" +
                                                device.str() + "': export it again with `diffseg export --device " +
                                                device.str() + "`");
}

int translate(const std::exception &e, const char *context) {
    if (auto *s = dynamic_cast<const ShimError *>(&e)) return fail(s->code, s->what());
    if (dynamic_cast<const std::bad_alloc *>(&e)) return fail(DSEG_TORCH_ENOMEM, "out of memory");
    if (auto *oom = dynamic_cast<const c10::OutOfMemoryError *>(&e)) {
        std::string what = oom->what_without_backtrace();
        return fail(DSEG_TORCH_ENOMEM, "out of memory: " + first_line(what));
    }
    if (auto *c10e = dynamic_cast<const c10::Error *>(&e))
        return fail(DSEG_TORCH_ERUNTIME, std::string(context) + ": " + c10e->what_without_backtrace());
    return fail(DSEG_TORCH_ERUNTIME, std::string(context) + ": " + e.what());
}


// ------------------------------------------------ generic calls

constexpr int kMaxInputs = 64;

// A host tensor of the caller, checked and copied (the model must never
// write to, or keep, the caller's buffer).
at::Tensor host_input(const dseg_torch_tensor &in, int k) {
    const std::string name = "input " + std::to_string(k);
    if (in.dtype != DSEG_TORCH_FLOAT32 && in.dtype != DSEG_TORCH_INT64)
        throw ShimError(DSEG_TORCH_EINVAL, name + ": dtype must be DSEG_TORCH_FLOAT32 or DSEG_TORCH_INT64, got " +
                                               std::to_string(in.dtype));
    if (in.ndim < 0 || in.ndim > DSEG_TORCH_MAX_DIMS)
        throw ShimError(DSEG_TORCH_EINVAL, name + ": ndim must be in [0, " + std::to_string(DSEG_TORCH_MAX_DIMS) +
                                               "], got " + std::to_string(in.ndim));
    std::vector<int64_t> shape(in.shape, in.shape + in.ndim);
    int64_t numel = 1;
    for (int64_t d : shape) {
        if (d < 0 || (d > 0 && numel > (int64_t(1) << 40) / d))
            throw ShimError(DSEG_TORCH_EINVAL, name + ": shape " + c10::str(at::IntArrayRef(shape)) +
                                                   " is negative or too large");
        numel *= d;
    }
    if (in.data == nullptr && numel > 0) throw ShimError(DSEG_TORCH_EINVAL, name + ": data must not be NULL");
    const bool is_float = in.dtype == DSEG_TORCH_FLOAT32;
    if (is_float) {
        const float *p = static_cast<const float *>(in.data);
        for (int64_t i = 0; i < numel; i++)
            if (!std::isfinite(p[i]))
                throw ShimError(DSEG_TORCH_EINVAL, name + " must be finite (NaN or Inf at flat index " +
                                                       std::to_string(i) + ")");
    }
    auto options = torch::TensorOptions().dtype(is_float ? torch::kFloat32 : torch::kInt64);
    if (numel == 0) return torch::empty(shape, options);
    return torch::from_blob(const_cast<void *>(in.data), shape, options).clone();
}

// The message of an exception from the TorchScript interpreter in one line:
// its last "...Error: message" line (the interpreter prepends a TorchScript
// traceback), else its first non-empty line.
std::string interpreter_what(const std::exception &e) {
    const auto *c10e = dynamic_cast<const c10::Error *>(&e);
    std::string full = c10e ? c10e->what_without_backtrace() : e.what();
    std::string best;
    size_t pos = 0;
    while (pos <= full.size()) {
        size_t nl = full.find('\n', pos);
        std::string line = full.substr(pos, nl == std::string::npos ? std::string::npos : nl - pos);
        size_t colon = line.find("Error: ");
        if (colon != std::string::npos && line.find(' ') > colon) best = line.substr(colon + 7);
        if (nl == std::string::npos) break;
        pos = nl + 1;
    }
    return best.empty() ? short_what(e) : best;
}

// A method's return value as a flat list of tensors.
void flatten(const c10::IValue &v, const char *method, std::vector<at::Tensor> *out) {
    if (v.isTensor()) {
        out->push_back(v.toTensor());
    } else if (v.isTuple()) {
        for (const auto &e : v.toTupleRef().elements()) flatten(e, method, out);
    } else if (v.isList()) {
        for (const auto &e : v.toListRef()) flatten(e, method, out);
    } else {
        throw ShimError(DSEG_TORCH_EFORMAT, std::string("method '") + method + "' returned a " +
                                                v.tagKind() + ", not tensors (a tensor, tuple or list of tensors)");
    }
}

// A host copy of output k (float32 or int64, C-contiguous), checked finite.
at::Tensor host_output(const at::Tensor &t, size_t k) {
    if (t.is_complex())
        throw ShimError(DSEG_TORCH_EFORMAT, "bundle output " + std::to_string(k) + " is complex");
    const bool is_float = t.is_floating_point();
    at::Tensor host = t.to(torch::kCPU, is_float ? torch::kFloat32 : torch::kInt64, /*non_blocking=*/false,
                           /*copy=*/true)
                          .contiguous();
    if (is_float) {
        const float *src = host.data_ptr<float>();
        const int64_t n = host.numel();
        // NaN/Inf in the outputs: corrupt weights (a bundle whose tensor data
        // was damaged still loads: TorchScript does not check the zip CRCs)
        // or an overflow in a half-precision bundle.
        for (int64_t i = 0; i < n; i++)
            if (!std::isfinite(src[i]))
                throw ShimError(DSEG_TORCH_ERUNTIME, "bundle output " + std::to_string(k) +
                                                         " holds NaN or Inf (flat index " + std::to_string(i) +
                                                         "): the bundle's weights may be corrupt (export it "
                                                         "again) or a half-precision bundle overflowed");
    }
    return host;
}

}  // namespace

struct dseg_torch_model {
    torch::jit::Module module;
    c10::Device device{c10::kCPU};
    std::string metadata;  // the diffseg.json extra file, unparsed ("" if absent)
    dseg_torch_info info{};
    std::mutex mutex;
};

struct dseg_torch_result {
    std::vector<at::Tensor> tensors;  // host, C-contiguous, float32 or int64
};

extern "C" {

const char *dseg_torch_last_error(void) { return g_error.c_str(); }

const char *dseg_torch_version(void) { return TORCH_VERSION; }

void dseg_torch_set_num_threads(int n) {
    try {
        at::set_num_threads(n < 1 ? all_cores() : n);
    } catch (const std::exception &e) {
        g_error = e.what();
    }
}

int dseg_torch_get_num_threads(void) {
    try {
        return at::get_num_threads();
    } catch (const std::exception &e) {
        g_error = e.what();
        return 1;
    }
}

int dseg_torch_cuda_available(void) {
    try {
        return torch::cuda::is_available() ? 1 : 0;
    } catch (const std::exception &) {
        return 0;
    }
}

int dseg_torch_open(const char *path, const char *device, int num_threads, dseg_torch_model **out) {
    if (out == nullptr) return fail(DSEG_TORCH_EINVAL, "out must not be NULL");
    *out = nullptr;
    if (path == nullptr || path[0] == '\0') return fail(DSEG_TORCH_EINVAL, "path must be a non-empty string");
    if (num_threads < 0) return fail(DSEG_TORCH_EINVAL, "num_threads must be >= 0");
    try {
        c10::Device dev = parse_device(device);
        if (dev.is_cuda() && !torch::cuda::is_available())
            return fail(DSEG_TORCH_EDEVICE, "device '" + dev.str() + "': CUDA is not available to libtorch " +
                                                   TORCH_VERSION + " in this process (a CPU-only build, or no "
                                                   "GPU or driver): use device 'cpu'");
        if (!dev.is_cpu() && !dev.is_cuda())
            return fail(DSEG_TORCH_EDEVICE, "device '" + dev.str() + "' is not supported (use cpu or cuda)");
        {
            std::ifstream probe(path, std::ios::binary);
            if (!probe)
                return fail(DSEG_TORCH_EIO, "bundle: cannot open '" + std::string(path) +
                                                "' (no such file or unreadable)");
        }
        auto model = std::make_unique<dseg_torch_model>();
        model->device = dev;
        if (num_threads > 0) at::set_num_threads(num_threads);
        try {
            torch::jit::ExtraFilesMap extra{{kMetadataName, ""}};
            model->module = torch::jit::load(path, dev, extra);
            model->metadata = extra[kMetadataName];
        } catch (const std::exception &e) {
            // A corrupt or foreign file fails here in many ways: c10::Error
            // from the zip reader and the unpickler, torch::jit::ErrorReport
            // (std::exception) from the TorchScript compiler reading code/,
            // std::bad_alloc for absurd sizes. All mean "this file cannot be
            // loaded", except a genuine shortage of memory.
            if (dynamic_cast<const std::bad_alloc *>(&e))
                throw ShimError(DSEG_TORCH_ENOMEM, "bundle: out of memory while loading '" + std::string(path) +
                                                       "' (a corrupt bundle can claim absurd sizes)");
            throw ShimError(DSEG_TORCH_EIO, "bundle: '" + std::string(path) +
                                                "' is not a readable TorchScript archive for libtorch " +
                                                TORCH_VERSION + " (corrupt, not written by `diffseg export`, "
                                                "or exported with another torch): " + short_what(e));
        }
        read_layout(model->module, dev, &model->info);
        model->module.eval();
        if (!model->module.find_method("forward"))
            throw ShimError(DSEG_TORCH_EIO, "bundle: the TorchScript module has no forward method");
        *out = model.release();
        g_error.clear();
        return DSEG_TORCH_OK;
    } catch (const std::exception &e) {
        return translate(e, "cannot open bundle");
    }
}

int dseg_torch_info_get(const dseg_torch_model *model, dseg_torch_info *info) {
    if (model == nullptr) return fail(DSEG_TORCH_EINVAL, "model must not be NULL");
    if (info == nullptr) return fail(DSEG_TORCH_EINVAL, "info must not be NULL");
    *info = model->info;
    return DSEG_TORCH_OK;
}

const char *dseg_torch_metadata(const dseg_torch_model *model) {
    return model ? model->metadata.c_str() : "";
}

int dseg_torch_call(dseg_torch_model *model, const char *method, int n_inputs, const dseg_torch_tensor *inputs,
                    dseg_torch_result **out) {
    if (out == nullptr) return fail(DSEG_TORCH_EINVAL, "out must not be NULL");
    *out = nullptr;
    if (model == nullptr) return fail(DSEG_TORCH_EINVAL, "model must not be NULL");
    if (method == nullptr || method[0] == '\0') return fail(DSEG_TORCH_EINVAL, "method must be a non-empty string");
    if (n_inputs < 0 || n_inputs > kMaxInputs)
        return fail(DSEG_TORCH_EINVAL, "n_inputs must be in [0, " + std::to_string(kMaxInputs) + "]");
    if (n_inputs > 0 && inputs == nullptr) return fail(DSEG_TORCH_EINVAL, "inputs must not be NULL");
    try {
        auto found = model->module.find_method(method);
        if (!found) {
            std::string names;
            for (const auto &m : model->module.get_methods()) names += (names.empty() ? "" : ", ") + m.name();
            throw ShimError(DSEG_TORCH_EINVAL, std::string("method '") + method +
                                                   "': the bundle has no such method (it has: " + names + ")");
        }
        const c10::FunctionSchema &schema = found->function().getSchema();
        // Arguments after self; those with defaults may be left out.
        const size_t n_args = schema.arguments().size() - 1;
        size_t n_required = 0;
        for (size_t k = 1; k < schema.arguments().size(); k++)
            if (!schema.arguments()[k].default_value()) n_required = k;
        if (static_cast<size_t>(n_inputs) < n_required || static_cast<size_t>(n_inputs) > n_args)
            throw ShimError(DSEG_TORCH_EINVAL, std::string("method '") + method + "' takes " +
                                                   (n_required == n_args ? std::to_string(n_args)
                                                                         : std::to_string(n_required) + " to " +
                                                                               std::to_string(n_args)) +
                                                   " inputs, got " + std::to_string(n_inputs));
        std::vector<at::Tensor> hosts;
        hosts.reserve(static_cast<size_t>(n_inputs));
        for (int k = 0; k < n_inputs; k++) hosts.push_back(host_input(inputs[k], k));

        auto result = std::make_unique<dseg_torch_result>();
        {
            std::lock_guard<std::mutex> lock(model->mutex);
            torch::NoGradGuard no_grad;
            // No profiling/optimising executor: it re-specialises the graph
            // during the first runs (seconds each for SD) and gains nothing
            // here, where the time goes into convolutions and matrix products.
            torch::jit::GraphOptimizerEnabledGuard no_jit_opt(false);
            std::vector<c10::IValue> args;
            args.reserve(hosts.size());
            for (auto &h : hosts) args.emplace_back(h.to(model->device));  // no copy when already there
            hosts.clear();
            c10::IValue value;
            try {
                value = (*found)(std::move(args));
            } catch (const ShimError &) {
                throw;
            } catch (const std::bad_alloc &) {
                throw;
            } catch (const c10::OutOfMemoryError &) {
                throw;
            } catch (const std::exception &e) {
                throw ShimError(DSEG_TORCH_ERUNTIME, std::string("method '") + method + "' failed: " + interpreter_what(e));
            }
            std::vector<at::Tensor> outputs;
            flatten(value, method, &outputs);
            value = c10::IValue();
            for (size_t k = 0; k < outputs.size(); k++) result->tensors.push_back(host_output(outputs[k], k));
        }
        *out = result.release();
        g_error.clear();
        return DSEG_TORCH_OK;
    } catch (const std::exception &e) {
        return translate(e, "model call failed");
    }
}

int dseg_torch_result_count(const dseg_torch_result *result) {
    return result ? static_cast<int>(result->tensors.size()) : 0;
}

int dseg_torch_result_shape(const dseg_torch_result *result, int i, int64_t *shape) {
    if (result == nullptr || i < 0 || static_cast<size_t>(i) >= result->tensors.size()) return -1;
    const at::Tensor &t = result->tensors[static_cast<size_t>(i)];
    if (shape)
        for (int64_t d = 0; d < t.dim(); d++) shape[d] = t.size(d);
    return static_cast<int>(t.dim());
}

int dseg_torch_result_dtype(const dseg_torch_result *result, int i) {
    if (result == nullptr || i < 0 || static_cast<size_t>(i) >= result->tensors.size()) return -1;
    return result->tensors[static_cast<size_t>(i)].scalar_type() == torch::kFloat32 ? DSEG_TORCH_FLOAT32
                                                                                      : DSEG_TORCH_INT64;
}

void *dseg_torch_result_data(dseg_torch_result *result, int i) {
    if (result == nullptr || i < 0 || static_cast<size_t>(i) >= result->tensors.size()) return nullptr;
    return result->tensors[static_cast<size_t>(i)].data_ptr();
}

void dseg_torch_result_free(dseg_torch_result *result) {
    try {
        delete result;
    } catch (...) {
        // destructors of libtorch objects do not throw; nothing to report
    }
}

void dseg_torch_close(dseg_torch_model *model) {
    try {
        delete model;
    } catch (...) {
        // destructors of libtorch objects do not throw; nothing to report
    }
}

}  // extern "C"
