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

}  // namespace

struct dseg_torch_model {
    torch::jit::Module module;
    c10::Device device{c10::kCPU};
    std::string metadata;  // the diffseg.json extra file, unparsed ("" if absent)
    dseg_torch_info info{};
    std::mutex mutex;
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

int dseg_torch_run(dseg_torch_model *model, const float *image, int channels, int height, int width,
                   int timestep, float *const *maps, float *eps) {
    if (model == nullptr) return fail(DSEG_TORCH_EINVAL, "model must not be NULL");
    if (image == nullptr) return fail(DSEG_TORCH_EINVAL, "image must not be NULL");
    const dseg_torch_info &info = model->info;
    if (channels != info.image_channels || height != info.image_size || width != info.image_size) {
        char msg[256];
        std::snprintf(msg, sizeof msg,
                      "image must be (%d, %d, %d) (channels, height, width) for this bundle, got (%d, %d, %d)",
                      info.image_channels, info.image_size, info.image_size, channels, height, width);
        return fail(DSEG_TORCH_EINVAL, msg);
    }
    const size_t n_pixels = static_cast<size_t>(channels) * static_cast<size_t>(height) * static_cast<size_t>(width);
    for (size_t i = 0; i < n_pixels; i++) {
        if (!std::isfinite(image[i])) return fail(DSEG_TORCH_EINVAL, "image must be finite (NaN or Inf at flat index " + std::to_string(i) + ")");
    }
    if (timestep < 0) timestep = info.default_timestep;
    if (timestep > 100000) return fail(DSEG_TORCH_EINVAL, "timestep must be in [0, 100000]");
    try {
        std::lock_guard<std::mutex> lock(model->mutex);
        torch::NoGradGuard no_grad;
        // No profiling/optimising executor: it re-specialises the graph during
        // the first runs (seconds each for SD) and gains nothing here, where
        // the time goes into convolutions and matrix products.
        torch::jit::GraphOptimizerEnabledGuard no_jit_opt(false);
        at::Tensor x = torch::from_blob(const_cast<float *>(image), {1, channels, height, width}, torch::kFloat32)
                           .to(model->device, /*non_blocking=*/false, /*copy=*/true);
        at::Tensor t = torch::full({1}, static_cast<int64_t>(timestep),
                                   torch::TensorOptions().dtype(torch::kInt64).device(model->device));
        c10::IValue result = model->module.forward({x, t});
        std::vector<c10::IValue> outputs;
        if (result.isTuple()) {
            outputs = result.toTupleRef().elements().vec();
        } else if (result.isList()) {
            for (const auto &v : result.toListRef()) outputs.push_back(v);
        } else {
            throw ShimError(DSEG_TORCH_EFORMAT, "bundle forward must return a tuple (eps, maps...)");
        }
        if (outputs.size() != static_cast<size_t>(info.n_maps) + 1)
            throw ShimError(DSEG_TORCH_EFORMAT, "bundle forward returned " + std::to_string(outputs.size()) +
                                                    " outputs, its map_resolutions attribute promises " + std::to_string(info.n_maps + 1));
        auto copy_out = [](const c10::IValue &v, std::vector<int64_t> shape, float *dst, const std::string &name) {
            if (!v.isTensor()) throw ShimError(DSEG_TORCH_EFORMAT, "bundle output " + name + " is not a tensor");
            at::Tensor tensor = v.toTensor();
            if (tensor.sizes() != at::IntArrayRef(shape)) {
                std::string got = c10::str(tensor.sizes());
                throw ShimError(DSEG_TORCH_EFORMAT, "bundle output " + name + " has shape " + got +
                                                        ", expected " + c10::str(at::IntArrayRef(shape)));
            }
            if (dst == nullptr) return;
            at::Tensor host = tensor.to(torch::kCPU, torch::kFloat32).contiguous();
            const float *src = host.data_ptr<float>();
            const size_t n = static_cast<size_t>(host.numel());
            // NaN/Inf in the outputs: corrupt weights (a bundle whose tensor
            // data was damaged still loads: TorchScript does not check the
            // zip CRCs) or an overflow in a half-precision bundle.
            for (size_t k = 0; k < n; k++)
                if (!std::isfinite(src[k]))
                    throw ShimError(DSEG_TORCH_ERUNTIME, "bundle output " + name +
                                                             " holds NaN or Inf (flat index " + std::to_string(k) +
                                                             "): the bundle's weights may be corrupt (export it "
                                                             "again) or a half-precision bundle overflowed");
            std::memcpy(dst, src, sizeof(float) * n);
        };
        copy_out(outputs[0], {1, info.latent_channels, info.latent_size, info.latent_size}, eps, "eps");
        for (int i = 0; i < info.n_maps; i++) {
            int64_t n = static_cast<int64_t>(info.map_res[i]) * info.map_res[i];
            copy_out(outputs[static_cast<size_t>(i) + 1], {1, n, n}, maps ? maps[i] : nullptr,
                     "map " + std::to_string(i));
        }
        g_error.clear();
        return DSEG_TORCH_OK;
    } catch (const std::exception &e) {
        return translate(e, "model run failed");
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
