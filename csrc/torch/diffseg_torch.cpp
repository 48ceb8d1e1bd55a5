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
#include <caffe2/serialize/inline_container.h>

#include <algorithm>
#include <cctype>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <map>
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

const char *kMetadataName = "diffseg.json";  // TorchScript extra file written by diffseg.export

// Length of the valid UTF-8 sequence at s[i] (1..4), or 0 if it is not one.
size_t utf8_sequence(const std::string &s, size_t i) {
    const unsigned char c = static_cast<unsigned char>(s[i]);
    size_t n;
    unsigned min;
    unsigned cp;
    if (c < 0x80) return 1;
    if ((c & 0xE0) == 0xC0) n = 2, min = 0x80, cp = c & 0x1F;
    else if ((c & 0xF0) == 0xE0) n = 3, min = 0x800, cp = c & 0x0F;
    else if ((c & 0xF8) == 0xF0) n = 4, min = 0x10000, cp = c & 0x07;
    else return 0;
    if (i + n > s.size()) return 0;
    for (size_t k = 1; k < n; k++) {
        const unsigned char d = static_cast<unsigned char>(s[i + k]);
        if ((d & 0xC0) != 0x80) return 0;
        cp = (cp << 6) | (d & 0x3F);
    }
    if (cp < min || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) return 0;
    return n;
}

// Offset of the first byte that is not valid UTF-8, or npos.
size_t invalid_utf8_at(const std::string &s) {
    for (size_t i = 0; i < s.size();) {
        size_t n = utf8_sequence(s, i);
        if (n == 0) return i;
        i += n;
    }
    return std::string::npos;
}

// Error messages quote libtorch, which quotes bytes of the (possibly corrupt)
// bundle: replace invalid UTF-8 by '?' so callers can always decode them.
std::string clean_message(const std::string &msg) {
    std::string out;
    out.reserve(msg.size());
    for (size_t i = 0; i < msg.size();) {
        size_t n = utf8_sequence(msg, i);
        if (n == 0) {
            out += '?';
            i++;
        } else {
            out.append(msg, i, n);
            i += n;
        }
    }
    return out;
}

int fail(int code, const std::string &msg) {
    try {
        g_error = clean_message(msg);
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

struct ShimError : std::runtime_error {
    int code;
    ShimError(int c, const std::string &m) : std::runtime_error(m), code(c) {}
};

// ---------------------------------------------------------------- tiny JSON
// Enough JSON to read the bundle metadata: objects, arrays, strings, numbers,
// true/false/null. Strings keep \uXXXX escapes undecoded (not needed here).
struct Json {
    enum Kind { Null, Bool, Number, String, Array, Object } kind = Null;
    bool b = false;
    double num = 0;
    std::string str;
    std::vector<Json> items;
    std::map<std::string, Json> fields;
};

class JsonParser {
  public:
    explicit JsonParser(const std::string &text) : s_(text) {}
    Json parse() {
        Json v = value(0);
        ws();
        if (i_ != s_.size()) error("trailing characters");
        return v;
    }

  private:
    const std::string &s_;
    size_t i_ = 0;

    [[noreturn]] void error(const char *what) {
        throw ShimError(DSEG_TORCH_EFORMAT, std::string("bundle metadata is not valid JSON (") + what +
                                                " at offset " + std::to_string(i_) + ")");
    }
    void ws() {
        while (i_ < s_.size() && std::isspace(static_cast<unsigned char>(s_[i_]))) i_++;
    }
    bool eat(char c) {
        ws();
        if (i_ < s_.size() && s_[i_] == c) {
            i_++;
            return true;
        }
        return false;
    }
    void expect(char c) {
        if (!eat(c)) error("unexpected character");
    }
    bool literal(const char *word) {
        size_t n = std::strlen(word);
        if (s_.compare(i_, n, word) == 0) {
            i_ += n;
            return true;
        }
        return false;
    }
    std::string string_body() {
        expect('"');
        std::string out;
        while (i_ < s_.size() && s_[i_] != '"') {
            char c = s_[i_++];
            if (static_cast<unsigned char>(c) < 0x20) {
                i_--;
                error("control character in a string");
            }
            if (c == '\\') {
                if (i_ >= s_.size()) error("bad escape");
                char e = s_[i_++];
                switch (e) {
                    case 'n': out += '\n'; break;
                    case 't': out += '\t'; break;
                    case 'r': out += '\r'; break;
                    case 'b': out += '\b'; break;
                    case 'f': out += '\f'; break;
                    case 'u': out += "\\u"; break;
                    default: out += e; break;
                }
            } else {
                out += c;
            }
        }
        if (i_ >= s_.size()) error("unterminated string");
        i_++;
        return out;
    }
    Json value(int depth) {
        if (depth > 64) error("nesting too deep");
        ws();
        if (i_ >= s_.size()) error("unexpected end");
        Json v;
        char c = s_[i_];
        if (c == '{') {
            i_++;
            v.kind = Json::Object;
            if (eat('}')) return v;
            do {
                ws();
                std::string key = string_body();
                expect(':');
                v.fields[key] = value(depth + 1);
            } while (eat(','));
            expect('}');
        } else if (c == '[') {
            i_++;
            v.kind = Json::Array;
            if (eat(']')) return v;
            do {
                v.items.push_back(value(depth + 1));
            } while (eat(','));
            expect(']');
        } else if (c == '"') {
            v.kind = Json::String;
            v.str = string_body();
        } else if (literal("true")) {
            v.kind = Json::Bool;
            v.b = true;
        } else if (literal("false")) {
            v.kind = Json::Bool;
        } else if (literal("null")) {
            v.kind = Json::Null;
        } else if (c == '-' || (c >= '0' && c <= '9')) {
            const char *start = s_.c_str() + i_;
            char *end = nullptr;
            v.num = std::strtod(start, &end);
            if (end == start) error("unexpected character");
            for (const char *p = start; p < end; p++)
                if (*p == 'x' || *p == 'X' || *p == 'n' || *p == 'N' || *p == 'i' || *p == 'I')
                    error("not a JSON number");
            i_ += static_cast<size_t>(end - start);
            v.kind = Json::Number;
        } else {
            error("unexpected character");
        }
        return v;
    }
};

const Json &field(const Json &obj, const char *key) {
    auto it = obj.fields.find(key);
    if (it == obj.fields.end())
        throw ShimError(DSEG_TORCH_EFORMAT, std::string("bundle metadata has no '") + key + "' field");
    return it->second;
}

int int_field(const Json &obj, const char *key, int low, int high) {
    const Json &v = field(obj, key);
    if (v.kind != Json::Number || v.num != std::floor(v.num) || v.num < low || v.num > high)
        throw ShimError(DSEG_TORCH_EFORMAT, std::string("bundle metadata field '") + key +
                                                "' must be an integer in [" + std::to_string(low) + ", " +
                                                std::to_string(high) + "]");
    return static_cast<int>(v.num);
}

std::string string_field(const Json &obj, const char *key) {
    const Json &v = field(obj, key);
    if (v.kind != Json::String)
        throw ShimError(DSEG_TORCH_EFORMAT, std::string("bundle metadata field '") + key + "' must be a string");
    return v.str;
}

// ---------------------------------------------------------------- helpers

std::string read_metadata(const std::string &path) {
    {
        std::ifstream probe(path, std::ios::binary);
        if (!probe) throw ShimError(DSEG_TORCH_EIO, "bundle: cannot open '" + path + "' (no such file or unreadable)");
    }
    std::string record = std::string("extra/") + kMetadataName;
    try {
        caffe2::serialize::PyTorchStreamReader reader(path);
        if (!reader.hasRecord(record))
            throw ShimError(DSEG_TORCH_EIO, "bundle: '" + path + "' is a TorchScript archive without " + kMetadataName +
                                                " metadata: not a diffseg bundle (write one with `diffseg export`)");
        auto data = reader.getRecord(record);
        const char *bytes = static_cast<const char *>(std::get<0>(data).get());
        return std::string(bytes, std::get<1>(data));
    } catch (const ShimError &) {
        throw;
    } catch (const std::bad_alloc &) {
        throw ShimError(DSEG_TORCH_ENOMEM, "bundle: out of memory while reading the metadata of '" + path +
                                               "' (a corrupt archive can claim absurd sizes)");
    } catch (const std::exception &e) {
        const auto *c10e = dynamic_cast<const c10::Error *>(&e);
        std::string what = first_line(c10e ? c10e->what_without_backtrace() : e.what());
        throw ShimError(DSEG_TORCH_EIO, "bundle: '" + path + "' is not a readable TorchScript archive (libtorch " +
                                            TORCH_VERSION + "): " + what);
    }
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

}  // namespace

struct dseg_torch_model {
    torch::jit::Module module;
    c10::Device device{c10::kCPU};
    std::string metadata;
    std::string torch_version;  // of the torch that exported the bundle ("" if unknown)
    dseg_torch_info info{};
    std::mutex mutex;
};

namespace {

// Validate the metadata and fill `info`.
void parse_info(const std::string &text, const c10::Device &device, dseg_torch_info *info,
                std::string *torch_version) {
    size_t bad = invalid_utf8_at(text);
    if (bad != std::string::npos)
        throw ShimError(DSEG_TORCH_EFORMAT, "bundle metadata is not valid UTF-8 (byte " + std::to_string(bad) + ")");
    Json meta = JsonParser(text).parse();
    if (meta.kind != Json::Object) throw ShimError(DSEG_TORCH_EFORMAT, "bundle metadata must be a JSON object");
    if (string_field(meta, "format") != "diffseg-bundle")
        throw ShimError(DSEG_TORCH_EFORMAT, "bundle metadata: 'format' is not 'diffseg-bundle'");
    int version = int_field(meta, "format_version", 0, 1 << 30);
    if (version != DSEG_TORCH_FORMAT_VERSION)
        throw ShimError(DSEG_TORCH_EFORMAT, "bundle format version " + std::to_string(version) +
                                                " is not supported (this diffseg reads version " +
                                                std::to_string(DSEG_TORCH_FORMAT_VERSION) +
                                                "): export the bundle again with this diffseg (`diffseg export`)");
    std::memset(info, 0, sizeof *info);
    info->format_version = version;
    info->image_size = int_field(meta, "image_size", 8, 1 << 15);
    info->image_channels = int_field(meta, "image_channels", 1, 16);
    info->latent_size = int_field(meta, "latent_size", 1, 1 << 12);
    info->latent_channels = int_field(meta, "latent_channels", 1, 1024);
    info->default_timestep = int_field(meta, "timestep", 0, 100000);
    const Json &res = field(meta, "output_resolutions");
    if (res.kind != Json::Array || res.items.empty() || res.items.size() > DSEG_TORCH_MAX_MAPS)
        throw ShimError(DSEG_TORCH_EFORMAT, "bundle metadata: 'output_resolutions' must be a list of 1.." +
                                                std::to_string(DSEG_TORCH_MAX_MAPS) + " integers");
    info->n_maps = static_cast<int>(res.items.size());
    for (int i = 0; i < info->n_maps; i++) {
        const Json &r = res.items[static_cast<size_t>(i)];
        if (r.kind != Json::Number || r.num != std::floor(r.num) || r.num < 1 || r.num > 256)
            throw ShimError(DSEG_TORCH_EFORMAT, "bundle metadata: 'output_resolutions' must hold integers in [1, 256]");
        info->map_res[i] = static_cast<int>(r.num);
    }
    // Optional (all bundles written by diffseg have it); a string when present.
    torch_version->clear();
    if (meta.fields.count("torch_version")) *torch_version = string_field(meta, "torch_version");
    c10::Device bundle_device{c10::kCPU};
    try {
        bundle_device = parse_device(string_field(meta, "device").c_str());
    } catch (const ShimError &e) {
        if (e.code != DSEG_TORCH_EINVAL) throw;
        throw ShimError(DSEG_TORCH_EFORMAT, "bundle metadata field 'device' must be 'cpu', 'cuda' or 'cuda:N', got '" +
                                                string_field(meta, "device") + "'");
    }
    if (bundle_device.type() != device.type())
        throw ShimError(DSEG_TORCH_EDEVICE, "bundle was exported for device '" + string_field(meta, "device") +
                                                "', not '" + device.str() +
                                                "': export it again with `diffseg export --device " + device.str() + "`");
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
            return fail(DSEG_TORCH_EDEVICE, "device '" + dev.str() + "': CUDA is not available in this libtorch/process");
        if (!dev.is_cpu() && !dev.is_cuda())
            return fail(DSEG_TORCH_EDEVICE, "device '" + dev.str() + "' is not supported (use cpu or cuda)");
        auto model = std::make_unique<dseg_torch_model>();
        model->device = dev;
        model->metadata = read_metadata(path);
        parse_info(model->metadata, dev, &model->info, &model->torch_version);
        if (num_threads > 0) at::set_num_threads(num_threads);
        try {
            model->module = torch::jit::load(path, dev);
        } catch (const std::exception &e) {
            // A corrupt or foreign bundle fails here in many ways: c10::Error
            // from the zip reader and the unpickler, torch::jit::ErrorReport
            // (std::exception) from the TorchScript compiler reading code/,
            // std::bad_alloc for absurd sizes. All mean "this file cannot be
            // loaded", except a genuine shortage of memory.
            std::string hint;
            if (!model->torch_version.empty() && model->torch_version != TORCH_VERSION &&
                model->torch_version.rfind(std::string(TORCH_VERSION) + "+", 0) != 0)
                hint = " (the bundle was exported with torch " + model->torch_version + ", this is libtorch " +
                       TORCH_VERSION + ": export it again with this torch, `diffseg export`)";
            if (dynamic_cast<const std::bad_alloc *>(&e))
                throw ShimError(DSEG_TORCH_ENOMEM, "bundle: out of memory while loading '" + std::string(path) +
                                                       "' (a corrupt bundle can claim absurd sizes)" + hint);
            const auto *c10e = dynamic_cast<const c10::Error *>(&e);
            std::string what = first_line(c10e ? c10e->what_without_backtrace() : e.what());
            // TorchScript compiler errors start with a newline; use their first non-empty line.
            if (what.empty()) {
                std::string full = c10e ? c10e->what_without_backtrace() : e.what();
                size_t start = full.find_first_not_of(" \n");
                what = start == std::string::npos ? std::string("unknown error") : first_line(full.substr(start));
            }
            throw ShimError(DSEG_TORCH_EIO, "bundle: cannot load TorchScript from '" + std::string(path) +
                                                "' (corrupt or not written by `diffseg export`): " + what + hint);
        }
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
                                                    " outputs, metadata promises " + std::to_string(info.n_maps + 1));
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
