// diffseg torch shim: the C API of diffseg_torch.h over libtorch, with two
// backends behind it: TorchScript archives (.pt) and AOTInductor packages
// (.pt2). The shim only runs modules: what the inputs mean, which precision
// or backend to use, and whether to keep memory are the caller's decisions.
//
// Every extern "C" entry catches std::exception (TorchScript interpreter
// errors arrive as std::runtime_error, libtorch's as c10::Error) and anything
// else (catch (...)), and turns it into an error code plus a thread-local
// message; when even the message cannot be built (out of memory), a static
// one is reported instead. Nothing exits.
#include "diffseg_torch.h"

#include <ATen/Parallel.h>
#include <ATen/cpu/Utils.h>
#include <c10/core/CPUAllocator.h>
#include <caffe2/serialize/inline_container.h>
#include <torch/csrc/inductor/aoti_package/model_package_loader.h>
#include <torch/csrc/jit/runtime/graph_executor.h>
#include <torch/cuda.h>
#include <torch/script.h>
#include <torch/version.h>

#include <sys/mman.h>

#include <atomic>
#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <new>
#include <sstream>
#include <stdexcept>
#include <string>
#include <thread>
#include <unordered_map>
#include <vector>

static_assert(__cplusplus >= 201703L, "the diffseg torch shim needs C++17 (g++ >= 11 or -std=c++17)");

namespace {

// ------------------------------------------------ errors

thread_local std::string g_error;
// A static message, used when building g_error failed (out of memory): it
// takes precedence until the next call that succeeds or fails normally.
thread_local const char *g_static_error = nullptr;
// Test hooks (dseg_torch_test_inject): make the next message fail to build,
// or the next entry throw something that is not a std::exception.
thread_local int g_inject = 0;

const char *kMessageFailed = "out of memory (while formatting an error message)";

int fail_static(int code, const char *msg) noexcept {
    g_static_error = msg;
    return code;
}

int fail(int code, const std::string &msg) noexcept {
    try {
        if (g_inject == DSEG_TORCH_TEST_MESSAGE_FAILS) {
            g_inject = 0;
            throw std::bad_alloc();
        }
        g_error = msg;
        g_static_error = nullptr;
        return code;
    } catch (...) {
        return fail_static(code, kMessageFailed);
    }
}

void clear_error() noexcept {
    g_error.clear();  // keeps the capacity: never throws
    g_static_error = nullptr;
}

// Where a test may make an entry throw a non-standard exception.
void injection_point() {
    if (g_inject == DSEG_TORCH_TEST_THROW_UNKNOWN) {
        g_inject = 0;
        throw 42;  // not a std::exception: caught by catch (...)
    }
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

int translate(const std::exception &e, const char *context) noexcept {
    try {
        if (auto *s = dynamic_cast<const ShimError *>(&e)) return fail(s->code, s->what());
        if (dynamic_cast<const std::bad_alloc *>(&e)) return fail_static(DSEG_TORCH_ENOMEM, "out of memory");
        if (auto *oom = dynamic_cast<const c10::OutOfMemoryError *>(&e)) {
            std::string what = oom->what_without_backtrace();
            return fail(DSEG_TORCH_ENOMEM, "out of memory: " + first_line(what));
        }
        if (auto *c10e = dynamic_cast<const c10::Error *>(&e))
            return fail(DSEG_TORCH_ERUNTIME, std::string(context) + ": " + c10e->what_without_backtrace());
        return fail(DSEG_TORCH_ERUNTIME, std::string(context) + ": " + e.what());
    } catch (...) {
        return fail_static(DSEG_TORCH_ERUNTIME, kMessageFailed);
    }
}

int unknown_exception() noexcept {
    return fail_static(DSEG_TORCH_ERUNTIME, "unknown C++ exception (not a std::exception) inside libtorch");
}

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
// `diffseg export` stores the sizes with the graphs: attributes of the
// scripted module (TorchScript), "diffseg.<name>" strings of the compiled
// models' metadata (AOTInductor). The shim reads them from what it runs, so
// they cannot disagree with the graph's origin, and it parses no JSON. The
// values are checked all the same: a damaged archive can hold anything.

// A layout value by name; throws ShimError(EFORMAT) when it is missing.
using Lookup = std::function<c10::IValue(const char *)>;

ShimError missing_attribute(const char *name) {
    return ShimError(DSEG_TORCH_EFORMAT, std::string("bundle: no '") + name +
                                             "' attribute: not a diffseg bundle of format version " +
                                             std::to_string(DSEG_TORCH_FORMAT_VERSION) +
                                             " (export it again with this diffseg, `diffseg export`)");
}

int int_attribute(const Lookup &get, const char *name, int low, int high) {
    c10::IValue v = get(name);
    if (!v.isInt() || v.toInt() < low || v.toInt() > high)
        throw ShimError(DSEG_TORCH_EFORMAT, std::string("bundle attribute '") + name + "' must be an integer in [" +
                                                std::to_string(low) + ", " + std::to_string(high) + "]");
    return static_cast<int>(v.toInt());
}

void read_layout(const Lookup &get, const c10::Device &device, dseg_torch_info *info) {
    int version = int_attribute(get, "format_version", 0, 1 << 30);
    if (version != DSEG_TORCH_FORMAT_VERSION)
        throw ShimError(DSEG_TORCH_EFORMAT, "bundle format version " + std::to_string(version) +
                                                " is not supported (this diffseg reads version " +
                                                std::to_string(DSEG_TORCH_FORMAT_VERSION) +
                                                "): export the bundle again with this diffseg (`diffseg export`)");
    std::memset(info, 0, sizeof *info);
    info->format_version = version;
    info->image_size = int_attribute(get, "image_size", 8, 1 << 15);
    info->image_channels = int_attribute(get, "image_channels", 1, 16);
    info->latent_size = int_attribute(get, "latent_size", 1, 1 << 12);
    info->latent_channels = int_attribute(get, "latent_channels", 1, 1024);
    info->default_timestep = int_attribute(get, "default_timestep", 0, 100000);
    c10::IValue res = get("map_resolutions");
    const std::string res_rule = "bundle attribute 'map_resolutions' must be a list of 1.." +
                                 std::to_string(DSEG_TORCH_MAX_MAPS) + " integers in [1, 256]";
    if (!res.isIntList()) throw ShimError(DSEG_TORCH_EFORMAT, res_rule);
    c10::List<int64_t> list = res.toIntList();
    if (list.empty() || list.size() > DSEG_TORCH_MAX_MAPS) throw ShimError(DSEG_TORCH_EFORMAT, res_rule);
    info->n_maps = static_cast<int>(list.size());
    for (int i = 0; i < info->n_maps; i++) {
        int64_t r = list.get(static_cast<size_t>(i));
        if (r < 1 || r > 256) throw ShimError(DSEG_TORCH_EFORMAT, res_rule);
        info->map_res[i] = static_cast<int>(r);
    }
    c10::IValue kind = get("device_type");
    if (!kind.isString()) throw ShimError(DSEG_TORCH_EFORMAT, "bundle attribute 'device_type' must be a string");
    const std::string &exported = kind.toStringRef();
    if (exported != c10::DeviceTypeName(device.type(), /*lower_case=*/true))
        throw ShimError(DSEG_TORCH_EDEVICE, "bundle was exported for device '" + exported + "', not '" +
                                                device.str() + "': export it again with `diffseg export --device " +
                                                device.str() + "`");
}

// ------------------------------------------------ inputs and outputs

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

// The message of an exception from a model in one line: its last
// "...Error: message" line (the TorchScript interpreter prepends a
// traceback), else its first non-empty line.
std::string model_what(const std::exception &e) {
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
void flatten(const c10::IValue &v, const std::string &method, std::vector<at::Tensor> *out) {
    if (v.isTensor()) {
        out->push_back(v.toTensor());
    } else if (v.isTuple()) {
        for (const auto &e : v.toTupleRef().elements()) flatten(e, method, out);
    } else if (v.isList()) {
        for (const auto &e : v.toListRef()) flatten(e, method, out);
    } else {
        throw ShimError(DSEG_TORCH_EFORMAT, "method '" + method + "' returned a " + v.tagKind() +
                                                ", not tensors (a tensor, tuple or list of tensors)");
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

// ------------------------------------------------ backends

class Backend {
  public:
    virtual ~Backend() = default;
    // Comma-separated method names (for messages).
    virtual std::string method_names() const = 0;
    virtual bool has_method(const std::string &method) const = 0;
    // Inputs a method takes: [required, most].
    virtual std::pair<size_t, size_t> arity(const std::string &method) const = 0;
    // Checks of the inputs beyond the generic ones (throws ShimError(EINVAL)).
    virtual void check_inputs(const std::string &, const std::vector<at::Tensor> &) const {}
    // Runs a method on inputs already on the model's device.
    virtual std::vector<at::Tensor> run(const std::string &method, std::vector<at::Tensor> inputs) = 0;
};

class TorchScriptBackend final : public Backend {
  public:
    TorchScriptBackend(const char *path, const c10::Device &device, std::string *metadata) {
        try {
            torch::jit::ExtraFilesMap extra{{"diffseg.json", ""}};
            module_ = torch::jit::load(path, device, extra);
            *metadata = extra["diffseg.json"];
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
        module_.eval();
        if (!module_.find_method("forward"))
            throw ShimError(DSEG_TORCH_EIO, "bundle: the TorchScript module has no forward method");
    }

    Lookup layout() const {
        return [this](const char *name) {
            if (!module_.hasattr(name)) throw missing_attribute(name);
            return module_.attr(name);
        };
    }

    std::string method_names() const override {
        std::string names;
        for (const auto &m : module_.get_methods()) names += (names.empty() ? "" : ", ") + m.name();
        return names;
    }

    bool has_method(const std::string &method) const override { return module_.find_method(method).has_value(); }

    std::pair<size_t, size_t> arity(const std::string &method) const override {
        const c10::FunctionSchema &schema = module_.get_method(method).function().getSchema();
        // Arguments after self; those with defaults may be left out.
        const size_t n_args = schema.arguments().size() - 1;
        size_t n_required = 0;
        for (size_t k = 1; k < schema.arguments().size(); k++)
            if (!schema.arguments()[k].default_value()) n_required = k;
        return {n_required, n_args};
    }

    std::vector<at::Tensor> run(const std::string &method, std::vector<at::Tensor> inputs) override {
        // No profiling/optimising executor: it would re-specialise the graph
        // during the first runs (seconds each for SD: the first-call tax) and
        // gains nothing here, where the time goes into convolutions and
        // matrix products.
        torch::jit::GraphOptimizerEnabledGuard no_jit_opt(false);
        std::vector<c10::IValue> args(inputs.begin(), inputs.end());
        inputs.clear();
        c10::IValue value = module_.get_method(method)(std::move(args));
        std::vector<at::Tensor> outputs;
        flatten(value, method, &outputs);
        return outputs;
    }

  private:
    torch::jit::Module module_;
};

// What one input of an AOTInductor model accepts (its "diffseg.inputs"
// entry, written by the exporter): a dtype and per dimension a range and
// step. A compiled model reads out of bounds on other shapes, so the shim
// checks them before running it.
struct InputRule {
    c10::ScalarType dtype = c10::kFloat;
    std::vector<int64_t> low, high, step;
};

std::vector<InputRule> parse_input_rules(const std::string &text) {
    const ShimError bad(DSEG_TORCH_EFORMAT, "bundle metadata 'diffseg.inputs' is malformed: '" + text + "'");
    std::vector<InputRule> rules;
    std::stringstream all(text);
    std::string one;
    while (std::getline(all, one, ';')) {
        std::istringstream words(one);
        std::string dtype, dim;
        InputRule rule;
        if (!(words >> dtype)) throw bad;
        if (dtype == "float32") rule.dtype = c10::kFloat;
        else if (dtype == "int64") rule.dtype = c10::kLong;
        else throw bad;
        while (words >> dim) {
            long long lo = 0, hi = 0, st = 1;
            int n = std::sscanf(dim.c_str(), "%lld:%lld:%lld", &lo, &hi, &st);
            if (n == 1) hi = lo;
            if (n < 1 || lo < 0 || hi < lo || st < 1 || rule.low.size() >= DSEG_TORCH_MAX_DIMS) throw bad;
            rule.low.push_back(lo);
            rule.high.push_back(hi);
            rule.step.push_back(st);
        }
        rules.push_back(rule);
    }
    if (rules.empty()) throw bad;
    return rules;
}

void check_rule(const InputRule &rule, const at::Tensor &t, const std::string &what) {
    if (t.scalar_type() != rule.dtype)
        throw ShimError(DSEG_TORCH_EINVAL, what + ": dtype must be " + std::string(c10::toString(rule.dtype)) +
                                               ", got " + c10::toString(t.scalar_type()));
    if (t.dim() != static_cast<int64_t>(rule.low.size()))
        throw ShimError(DSEG_TORCH_EINVAL, what + ": must have " + std::to_string(rule.low.size()) +
                                               " dimensions, got shape " + c10::str(t.sizes()));
    for (size_t d = 0; d < rule.low.size(); d++) {
        int64_t n = t.size(static_cast<int64_t>(d));
        if (n < rule.low[d] || n > rule.high[d] || n % rule.step[d])
            throw ShimError(DSEG_TORCH_EINVAL,
                            what + ": dimension " + std::to_string(d) + " is " + std::to_string(n) +
                                ", this bundle takes " +
                                (rule.low[d] == rule.high[d]
                                     ? std::to_string(rule.low[d])
                                     : "multiples of " + std::to_string(rule.step[d]) + " in [" +
                                           std::to_string(rule.low[d]) + ", " + std::to_string(rule.high[d]) + "]") +
                                " (shape " + c10::str(t.sizes()) + ")");
    }
}

// An AOTInductor package of `diffseg export --backend aoti`: compiled models
// "encode" and "denoise"; "forward" is denoise(encode(image), t), as in a
// TorchScript bundle.
class AotiBackend final : public Backend {
  public:
    AotiBackend(const char *path, const c10::Device &device, std::string *metadata) {
        const c10::DeviceIndex index = device.is_cuda() ? (device.has_index() ? device.index() : 0) : -1;
        try {
            for (const char *name : {"encode", "denoise"}) {
                auto loader = std::make_unique<torch::inductor::AOTIModelPackageLoader>(path, name, false, 1, index);
                rules_[name] = parse_input_rules(meta(*loader, "diffseg.inputs"));
                models_[name] = std::move(loader);
            }
            metadata_ = models_["denoise"]->get_metadata();  // the layout: the same in both models
            *metadata = extra_file(path, "extra/diffseg.json");
        } catch (const ShimError &) {
            throw;
        } catch (const std::bad_alloc &) {
            throw ShimError(DSEG_TORCH_ENOMEM, "bundle: out of memory while loading '" + std::string(path) + "'");
        } catch (const std::exception &e) {
            throw ShimError(DSEG_TORCH_EIO, "bundle: '" + std::string(path) +
                                                "' is not a readable AOTInductor package for libtorch " +
                                                TORCH_VERSION + " (corrupt, not written by `diffseg export "
                                                "--backend aoti`, or exported with another torch): " +
                                                short_what(e));
        }
    }

    Lookup layout() const {
        return [this](const char *name) -> c10::IValue {
            auto it = metadata_.find(std::string("diffseg.") + name);
            if (it == metadata_.end()) throw missing_attribute(name);
            if (std::strcmp(name, "device_type") == 0) return c10::IValue(it->second);
            if (std::strcmp(name, "map_resolutions") == 0) return c10::IValue(int_list(it->second));
            std::vector<int64_t> one = int_list(it->second);
            return one.size() == 1 ? c10::IValue(one[0]) : c10::IValue(it->second);
        };
    }

    std::string method_names() const override { return "encode, denoise, forward"; }

    bool has_method(const std::string &method) const override {
        return method == "forward" || models_.count(method) > 0;
    }

    std::pair<size_t, size_t> arity(const std::string &method) const override {
        size_t n = method == "forward" ? rules_.at("denoise").size() : rules_.at(method).size();
        return {n, n};
    }

    void check_inputs(const std::string &method, const std::vector<at::Tensor> &inputs) const override {
        if (method == "forward") {  // (image, t): encode's image, then denoise's inputs after the latent
            check_rule(rules_.at("encode")[0], inputs[0], "input 0");
            for (size_t k = 1; k < inputs.size(); k++)
                check_rule(rules_.at("denoise")[k], inputs[k], "input " + std::to_string(k));
            return;
        }
        const auto &rules = rules_.at(method);
        for (size_t k = 0; k < inputs.size(); k++) check_rule(rules[k], inputs[k], "input " + std::to_string(k));
    }

    std::vector<at::Tensor> run(const std::string &method, std::vector<at::Tensor> inputs) override {
        if (method != "forward") return models_.at(method)->run(inputs);
        std::vector<at::Tensor> latent = models_.at("encode")->run({inputs[0]});
        if (latent.size() != 1) throw ShimError(DSEG_TORCH_EFORMAT, "bundle: encode returned no single latent");
        // Compiled code assumes the strides it was exported with (contiguous),
        // and encode may hand out another layout (channels last).
        inputs[0] = latent[0].contiguous();
        return models_.at("denoise")->run(inputs);
    }

  private:
    static std::string meta(torch::inductor::AOTIModelPackageLoader &loader, const char *key) {
        auto all = loader.get_metadata();
        auto it = all.find(key);
        if (it == all.end()) throw missing_attribute(key);
        return it->second;
    }

    // "64,32,16" -> {64, 32, 16}; anything else is a format error.
    static std::vector<int64_t> int_list(const std::string &text) {
        std::vector<int64_t> values;
        std::stringstream in(text);
        std::string item;
        while (std::getline(in, item, ',')) {
            char *end = nullptr;
            errno = 0;
            long long v = std::strtoll(item.c_str(), &end, 10);
            if (item.empty() || *end != '\0' || errno)
                throw ShimError(DSEG_TORCH_EFORMAT, "bundle metadata value '" + text + "' is not an integer list");
            values.push_back(v);
        }
        return values;
    }

    // A file stored beside the models ("" when absent).
    static std::string extra_file(const char *path, const char *name) {
        caffe2::serialize::PyTorchStreamReader reader(path);
        if (!reader.hasRecord(name)) return "";
        auto [data, size] = reader.getRecord(name);
        return std::string(static_cast<const char *>(data.get()), size);
    }

    std::map<std::string, std::unique_ptr<torch::inductor::AOTIModelPackageLoader>> models_;
    std::map<std::string, std::vector<InputRule>> rules_;
    std::unordered_map<std::string, std::string> metadata_;
};

bool is_aoti_package(const char *path) {
    size_t n = std::strlen(path);
    return n >= 4 && std::strcmp(path + n - 4, ".pt2") == 0;
}

// ------------------------------------------------ memory reuse
// A pass of SD at 512 px allocates and frees about 8 GB of large buffers
// (activations, attention scores, weights that oneDNN reorders on every
// call), while at most about 0.5 GB of them are in use at once. glibc maps
// each buffer above its mmap threshold afresh and unmaps it on free, so
// every pass page-faults (and the kernel zeroes) all of them again: about
// 2 million faults, seconds of a pass. This allocator, installed as c10's
// CPU allocator (oneDNN's buffers come through it too, as ideep tensors),
// keeps freed blocks of at least kMinBlock bytes and hands them out again,
// from any thread: best fit, a larger block split (the rest stays kept),
// adjacent kept blocks merged, so that what a pass obtains from the system
// stays close to what it has in use at once (the first pass faults that
// much, no more). The memory kept never exceeds twice the most that was in
// use at once (the largest kept blocks are unmapped beyond that), and all of
// it is returned when the last model closes or reuse is turned off. Smaller
// requests go to the default allocator.

class ReuseAllocator final : public c10::Allocator {
  public:
    static constexpr size_t kMinBlock = size_t(1) << 20;
    static constexpr size_t kGranule = size_t(64) << 10;  // block sizes and split points: whole pages
    static constexpr size_t kKeepFactor = 2;

    explicit ReuseAllocator(c10::Allocator *fallback) : fallback_(fallback) {}

    c10::DataPtr allocate(size_t n) override {
        if (!enabled_.load() || n < kMinBlock) return fallback_->allocate(n);
        const size_t size = (n + kGranule - 1) / kGranule * kGranule;
        char *p = take(size);
        if (p == nullptr) p = map_fresh(size);
        return {p, p, &ReuseAllocator::release, c10::Device(c10::DeviceType::CPU)};
    }

    // oneDNN's buffers (ideep tensors: reordered weights and activations)
    // come through raw_allocate / raw_deallocate, which need this.
    c10::DeleterFnPtr raw_deleter() const override { return &ReuseAllocator::release; }

    void copy_data(void *dest, const void *src, std::size_t count) const override { default_copy_data(dest, src, count); }

    void set_enabled(bool on) { enabled_.store(on); }

    // Unmap every kept block (memory back to the system).
    void drop_cached() {
        std::lock_guard<std::mutex> lock(mutex_);
        for (auto &kv : by_addr_) munmap(kv.first, kv.second);
        by_addr_.clear();
        by_size_.clear();
        cached_ = 0;
        peak_ = in_use_;
    }

    void stats(int64_t *out) {
        std::lock_guard<std::mutex> lock(mutex_);
        out[0] = static_cast<int64_t>(in_use_);
        out[1] = static_cast<int64_t>(cached_);
        out[2] = static_cast<int64_t>(peak_);
        out[3] = static_cast<int64_t>(mapped_total_);
    }

    static ReuseAllocator *instance() { return instance_; }

    // Installs the allocator once, process-wide (never removed: tensors it
    // handed out may outlive any model).
    static ReuseAllocator *install() {
        static std::once_flag once;
        std::call_once(once, [] {
            instance_ = new ReuseAllocator(c10::GetDefaultCPUAllocator());  // never deleted (see above)
            c10::SetCPUAllocator(instance_, /*priority=*/1);
        });
        return instance_;
    }

  private:
    // The smallest kept block of at least `size` bytes, split if larger.
    char *take(size_t size) {
        std::lock_guard<std::mutex> lock(mutex_);
        auto it = by_size_.lower_bound(size);
        if (it == by_size_.end()) return nullptr;
        char *p = it->second;
        const size_t block = it->first;
        unkeep(p, block);
        if (block > size) keep(p + size, block - size);
        note_in_use(p, size);
        return p;
    }

    char *map_fresh(size_t size) {
        void *p = mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (p == MAP_FAILED) throw std::bad_alloc();
        std::lock_guard<std::mutex> lock(mutex_);
        mapped_total_ += size;
        note_in_use(static_cast<char *>(p), size);
        return static_cast<char *>(p);
    }

    void note_in_use(char *p, size_t size) {
        sizes_[p] = size;
        in_use_ += size;
        if (in_use_ > peak_) peak_ = in_use_;
    }

    void keep(char *p, size_t size) {
        by_addr_[p] = size;
        by_size_.emplace(size, p);
        cached_ += size;
    }

    void unkeep(char *p, size_t size) {
        auto range = by_size_.equal_range(size);
        for (auto it = range.first; it != range.second; ++it)
            if (it->second == p) {
                by_size_.erase(it);
                break;
            }
        by_addr_.erase(p);
        cached_ -= size;
    }

    // Keep a freed block, merged with kept neighbours (any adjacent pages may
    // be merged: munmap takes any range of pages).
    void keep_merged(char *p, size_t size) {
        auto next = by_addr_.lower_bound(p);
        if (next != by_addr_.end() && next->first == p + size) {
            size_t n = next->second;
            unkeep(next->first, n);
            size += n;
        }
        auto after = by_addr_.lower_bound(p);
        if (after != by_addr_.begin()) {
            auto prev = std::prev(after);
            if (prev->first + prev->second == p) {
                char *q = prev->first;
                size_t n = prev->second;
                unkeep(q, n);
                p = q;
                size += n;
            }
        }
        keep(p, size);
        while (cached_ > kKeepFactor * peak_ && !by_size_.empty()) {
            auto largest = std::prev(by_size_.end());
            char *q = largest->second;
            size_t n = largest->first;
            unkeep(q, n);
            munmap(q, n);
        }
    }

    static void release(void *ptr) {
        ReuseAllocator *self = instance_;
        char *p = static_cast<char *>(ptr);
        std::unique_lock<std::mutex> lock(self->mutex_);
        auto it = self->sizes_.find(p);
        if (it == self->sizes_.end()) {  // a small block of the fallback (raw_deallocate)
            lock.unlock();
            self->fallback_->raw_deleter()(ptr);
            return;
        }
        size_t size = it->second;
        self->sizes_.erase(it);
        self->in_use_ -= size;
        if (self->enabled_.load())
            self->keep_merged(p, size);
        else
            munmap(p, size);
    }

    static ReuseAllocator *instance_;
    c10::Allocator *fallback_;
    std::atomic<bool> enabled_{true};
    std::mutex mutex_;
    std::map<char *, size_t> by_addr_;          // kept blocks by address
    std::multimap<size_t, char *> by_size_;     // the same, by size
    std::unordered_map<char *, size_t> sizes_;  // blocks in use
    size_t in_use_ = 0, cached_ = 0, peak_ = 0, mapped_total_ = 0;
};

ReuseAllocator *ReuseAllocator::instance_ = nullptr;

std::atomic<int> g_open_models{0};

}  // namespace

struct dseg_torch_model {
    std::unique_ptr<Backend> backend;
    c10::Device device{c10::kCPU};
    std::string metadata;  // the diffseg.json extra file, unparsed ("" if absent)
    dseg_torch_info info{};
    std::mutex mutex;
};

struct dseg_torch_result {
    std::vector<at::Tensor> tensors;  // host, C-contiguous, float32 or int64
};

namespace {

std::unique_ptr<dseg_torch_model> open_model(const char *path, const c10::Device &dev) {
    {
        std::ifstream probe(path, std::ios::binary);
        if (!probe)
            throw ShimError(DSEG_TORCH_EIO, "bundle: cannot open '" + std::string(path) +
                                                "' (no such file or unreadable)");
    }
    auto model = std::make_unique<dseg_torch_model>();
    model->device = dev;
    if (is_aoti_package(path)) {
        auto aoti = std::make_unique<AotiBackend>(path, dev, &model->metadata);
        read_layout(aoti->layout(), dev, &model->info);
        model->backend = std::move(aoti);
    } else {
        auto script = std::make_unique<TorchScriptBackend>(path, dev, &model->metadata);
        read_layout(script->layout(), dev, &model->info);
        model->backend = std::move(script);
    }
    return model;
}

void check_arity(const Backend &backend, const std::string &method, int n_inputs) {
    if (!backend.has_method(method))
        throw ShimError(DSEG_TORCH_EINVAL, "method '" + method + "': the bundle has no such method (it has: " +
                                               backend.method_names() + ")");
    auto [n_required, n_args] = backend.arity(method);
    if (static_cast<size_t>(n_inputs) < n_required || static_cast<size_t>(n_inputs) > n_args)
        throw ShimError(DSEG_TORCH_EINVAL, "method '" + method + "' takes " +
                                               (n_required == n_args ? std::to_string(n_args)
                                                                     : std::to_string(n_required) + " to " +
                                                                           std::to_string(n_args)) +
                                               " inputs, got " + std::to_string(n_inputs));
}

std::unique_ptr<dseg_torch_result> call_model(dseg_torch_model *model, const std::string &method, int n_inputs,
                                              const dseg_torch_tensor *inputs) {
    check_arity(*model->backend, method, n_inputs);
    std::vector<at::Tensor> hosts;
    hosts.reserve(static_cast<size_t>(n_inputs));
    for (int k = 0; k < n_inputs; k++) hosts.push_back(host_input(inputs[k], k));
    model->backend->check_inputs(method, hosts);

    auto result = std::make_unique<dseg_torch_result>();
    std::lock_guard<std::mutex> lock(model->mutex);
    torch::NoGradGuard no_grad;
    std::vector<at::Tensor> args;
    args.reserve(hosts.size());
    for (auto &h : hosts) args.push_back(h.to(model->device));  // no copy when already there
    hosts.clear();
    std::vector<at::Tensor> outputs;
    try {
        outputs = model->backend->run(method, std::move(args));
    } catch (const ShimError &) {
        throw;
    } catch (const std::bad_alloc &) {
        throw;
    } catch (const c10::OutOfMemoryError &) {
        throw;
    } catch (const std::exception &e) {
        throw ShimError(DSEG_TORCH_ERUNTIME, "method '" + method + "' failed: " + model_what(e));
    }
    for (size_t k = 0; k < outputs.size(); k++) result->tensors.push_back(host_output(outputs[k], k));
    return result;
}

}  // namespace

extern "C" {

const char *dseg_torch_last_error(void) { return g_static_error ? g_static_error : g_error.c_str(); }

const char *dseg_torch_version(void) { return TORCH_VERSION; }

void dseg_torch_set_num_threads(int n) {
    try {
        at::set_num_threads(n < 1 ? all_cores() : n);
    } catch (const std::exception &e) {
        translate(e, "set_num_threads");
    } catch (...) {
        unknown_exception();
    }
}

int dseg_torch_get_num_threads(void) {
    try {
        return at::get_num_threads();
    } catch (const std::exception &e) {
        translate(e, "get_num_threads");
    } catch (...) {
        unknown_exception();
    }
    return 1;
}

int dseg_torch_cuda_available(void) {
    try {
        return torch::cuda::is_available() ? 1 : 0;
    } catch (...) {
        return 0;
    }
}

int dseg_torch_cpu_feature(const char *name) {
    if (name == nullptr) return -1;
    try {
        static const auto features = at::cpu::get_cpu_capabilities();
        auto it = features.find(name);
        if (it == features.end() || !it->second.isBool()) return -1;
        return it->second.toBool() ? 1 : 0;
    } catch (...) {
        return -1;
    }
}

int dseg_torch_set_memory_reuse(int mode) {
    if (mode < 0 || mode > 2) return fail_static(DSEG_TORCH_EINVAL, "mode must be 0 (off), 1 (on) or 2 (paused)");
    try {
        injection_point();
        ReuseAllocator *reuse = ReuseAllocator::install();
        reuse->set_enabled(mode == 1);
        if (mode == 0) reuse->drop_cached();
        clear_error();
        return DSEG_TORCH_OK;
    } catch (const std::exception &e) {
        return translate(e, "set_memory_reuse");
    } catch (...) {
        return unknown_exception();
    }
}

void dseg_torch_memory_stats(int64_t stats[4]) {
    if (stats == nullptr) return;
    std::memset(stats, 0, 4 * sizeof *stats);
    ReuseAllocator *reuse = ReuseAllocator::instance();
    if (reuse) reuse->stats(stats);
}

void dseg_torch_test_inject(int what) { g_inject = what; }

int dseg_torch_open(const char *path, const char *device, int num_threads, dseg_torch_model **out) {
    if (out == nullptr) return fail_static(DSEG_TORCH_EINVAL, "out must not be NULL");
    *out = nullptr;
    if (path == nullptr || path[0] == '\0') return fail_static(DSEG_TORCH_EINVAL, "path must be a non-empty string");
    if (num_threads < 0) return fail_static(DSEG_TORCH_EINVAL, "num_threads must be >= 0");
    try {
        injection_point();
        c10::Device dev = parse_device(device);
        if (dev.is_cuda() && !torch::cuda::is_available())
            throw ShimError(DSEG_TORCH_EDEVICE, "device '" + dev.str() + "': CUDA is not available to libtorch " +
                                                    TORCH_VERSION + " in this process (a CPU-only build, or no "
                                                    "GPU or driver): use device 'cpu'");
        if (!dev.is_cpu() && !dev.is_cuda())
            throw ShimError(DSEG_TORCH_EDEVICE, "device '" + dev.str() + "' is not supported (use cpu or cuda)");
        if (num_threads > 0) at::set_num_threads(num_threads);
        *out = open_model(path, dev).release();
        g_open_models++;
        clear_error();
        return DSEG_TORCH_OK;
    } catch (const std::exception &e) {
        return translate(e, "cannot open bundle");
    } catch (...) {
        return unknown_exception();
    }
}

int dseg_torch_info_get(const dseg_torch_model *model, dseg_torch_info *info) {
    if (model == nullptr) return fail_static(DSEG_TORCH_EINVAL, "model must not be NULL");
    if (info == nullptr) return fail_static(DSEG_TORCH_EINVAL, "info must not be NULL");
    *info = model->info;
    return DSEG_TORCH_OK;
}

const char *dseg_torch_metadata(const dseg_torch_model *model) { return model ? model->metadata.c_str() : ""; }

int dseg_torch_call(dseg_torch_model *model, const char *method, int n_inputs, const dseg_torch_tensor *inputs,
                    dseg_torch_result **out) {
    if (out == nullptr) return fail_static(DSEG_TORCH_EINVAL, "out must not be NULL");
    *out = nullptr;
    if (model == nullptr) return fail_static(DSEG_TORCH_EINVAL, "model must not be NULL");
    if (method == nullptr || method[0] == '\0')
        return fail_static(DSEG_TORCH_EINVAL, "method must be a non-empty string");
    if (n_inputs < 0 || n_inputs > kMaxInputs) return fail_static(DSEG_TORCH_EINVAL, "n_inputs must be in [0, 64]");
    if (n_inputs > 0 && inputs == nullptr) return fail_static(DSEG_TORCH_EINVAL, "inputs must not be NULL");
    try {
        injection_point();
        *out = call_model(model, method, n_inputs, inputs).release();
        clear_error();
        return DSEG_TORCH_OK;
    } catch (const std::exception &e) {
        return translate(e, "model call failed");
    } catch (...) {
        return unknown_exception();
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
    if (model == nullptr) return;
    try {
        delete model;
        // The last model gone: give the kept memory back to the system.
        if (--g_open_models == 0) {
            if (ReuseAllocator *reuse = ReuseAllocator::instance()) reuse->drop_cached();
        }
    } catch (...) {
        // destructors of libtorch objects do not throw; nothing to report
    }
}

}  // extern "C"
