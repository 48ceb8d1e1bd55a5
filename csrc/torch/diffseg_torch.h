/*
 * diffseg torch shim: run a DiffSeg model bundle (VAE encoder + UNet that
 * returns its self-attention maps) through libtorch, from plain C.
 *
 * A bundle is the file written by `diffseg export`, in one of two backends
 * behind the same functions:
 *   - diffseg_bundle.pt: a TorchScript module whose forward(image, t) returns
 *     (eps, map_0, map_1, ...) for images of any batch size and of any height
 *     and width that are multiples of image_size / min(map_res), and whose
 *     attributes give its layout (format_version, image_size, image_channels,
 *     latent_size, latent_channels, default_timestep, map_resolutions,
 *     device_type);
 *   - diffseg_bundle.pt2 (`--backend aoti`; a path ending in ".pt2"): an
 *     AOTInductor package of two compiled models, encode and denoise, whose
 *     metadata gives the same layout ("diffseg.<name>" strings) and the
 *     inputs each accepts ("diffseg.inputs": dtype and per-dimension ranges;
 *     the shim refuses other shapes, on which compiled code is unsafe);
 *     forward runs denoise(encode(image), t).
 * Both hold descriptive JSON metadata as an extra file ("diffseg.json") that
 * the shim hands out unparsed.
 *
 * Conventions
 *   - Buffers are dense, row-major (C-contiguous) float32 or int64.
 *   - Every function that can fail returns DSEG_TORCH_OK (0) or an error code;
 *     the message is available from dseg_torch_last_error() (thread-local).
 *     Nothing exits or aborts; C++ exceptions never cross this boundary.
 *   - A handle may be used from several threads; runs on one handle are
 *     serialised (one mutex per handle). Closing a handle while another thread uses it is an error
 *     of the caller (the Python binding waits for runs in progress).
 *   - Error messages may quote bytes of a corrupt bundle as libtorch reports
 *     them: they are not guaranteed to be valid UTF-8.
 */
#ifndef DIFFSEG_TORCH_H
#define DIFFSEG_TORCH_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

enum {
    DSEG_TORCH_OK = 0,
    DSEG_TORCH_EINVAL = 1,   /* invalid argument (message names it) */
    DSEG_TORCH_ENOMEM = 2,   /* allocation failed */
    DSEG_TORCH_EIO = 3,      /* bundle missing, unreadable or not a bundle */
    DSEG_TORCH_EFORMAT = 4,  /* layout attributes missing or invalid, or another format version */
    DSEG_TORCH_ERUNTIME = 5, /* the model failed while running */
    DSEG_TORCH_EDEVICE = 6,  /* device unavailable or not the bundle's device */
};

/* The bundle format version this shim reads. */
#define DSEG_TORCH_FORMAT_VERSION 2
/* Most attention maps a bundle may return (16 for layers="all"). */
#define DSEG_TORCH_MAX_MAPS 64

typedef struct dseg_torch_model dseg_torch_model; /* opaque */

typedef struct {
    int format_version;
    int image_size;      /* side the bundle was traced at; map_res refer to it */
    int image_channels;  /* 3 */
    int latent_size;     /* latent side at image_size (image_size / 8 for SD) */
    int latent_channels;
    int default_timestep;
    int n_maps;                          /* attention maps per run */
    int map_res[DSEG_TORCH_MAX_MAPS];    /* map i: a res x res grid at image_size */
} dseg_torch_info;

/* Message of the last failed call on this thread ("" if none). */
const char *dseg_torch_last_error(void);

/* Version of the libtorch this shim was built with, e.g. "2.13.0". A bundle
 * records the torch that exported it (metadata "torch_version"); export and
 * load should use the same torch. */
const char *dseg_torch_version(void);

/* Intra-op threads of libtorch (process-wide); n < 1 means all cores. */
void dseg_torch_set_num_threads(int n);
int dseg_torch_get_num_threads(void);

/* 1 when libtorch can use CUDA in this process. */
int dseg_torch_cuda_available(void);

/* A feature of the running CPU as libtorch's cpuinfo reports it, by name
 * ("avx512_bf16", "amx_bf16", "avx2", "avx512_f", "fma3", ...): 1 present,
 * 0 absent, -1 unknown name. */
int dseg_torch_cpu_feature(const char *name);

/*
 * Memory reuse across runs (process-wide; mode 1 on, 0 off, 2 paused). On: large
 * buffers that libtorch frees (activations, attention scores, weights
 * reordered for oneDNN) are kept and handed out again instead of being
 * returned to the system and page-faulted afresh on the next run; the memory
 * kept never exceeds twice the most that was in use at once, and it is returned
 * when the last model closes. Off: large buffers go back to the system as
 * soon as they are freed (kept ones too). Paused: as off, but what is kept
 * stays for when reuse is on again (to measure without it in the same
 * process). The first call installs a CPU allocator in libtorch (c10) that
 * stays.
 */
int dseg_torch_set_memory_reuse(int mode);

/* Bytes of libtorch's large buffers: [0] in use, [1] kept for reuse, [2] the
 * most in use at once, [3] ever obtained from the system (all 0 before
 * dseg_torch_set_memory_reuse was first called). */
void dseg_torch_memory_stats(int64_t stats[4]);

/* For diffseg's tests only: make the next error message of this thread fail
 * to build (DSEG_TORCH_TEST_MESSAGE_FAILS), or the next open/call throw a
 * non-standard C++ exception inside the shim (DSEG_TORCH_TEST_THROW_UNKNOWN). */
enum { DSEG_TORCH_TEST_MESSAGE_FAILS = 1, DSEG_TORCH_TEST_THROW_UNKNOWN = 2 };
void dseg_torch_test_inject(int what);

/*
 * Open a bundle: a TorchScript archive, or an AOTInductor package when the
 * path ends in ".pt2". device: "cpu", "cuda" or "cuda:N" (NULL means "cpu");
 * it must be the device the bundle was exported for. num_threads > 0 sets
 * libtorch's intra-op threads (process-wide); 0 leaves them unchanged.
 * On success *out is a handle to close with dseg_torch_close().
 */
int dseg_torch_open(const char *path, const char *device, int num_threads,
                    dseg_torch_model **out);

/* Sizes and output layout of an open bundle. */
int dseg_torch_info_get(const dseg_torch_model *model, dseg_torch_info *info);

/* The bundle's descriptive metadata (model id, layer names, torch version,
 * ...): the bytes of its "diffseg.json" extra file, unparsed and unchecked
 * ("" when absent), owned by the handle and valid until close. */
const char *dseg_torch_metadata(const dseg_torch_model *model);

/* ------------------------------------------------ calling a method
 * The shim is a thin, generic caller: it converts host tensors to the
 * bundle's device, runs one exported method, and hands back host copies of
 * the tensors it returns. What the inputs mean and which shapes are valid is
 * the caller's business (diffseg/sd/model.py checks them); the shim checks
 * only what keeps it safe (pointers, dtypes, ranks, sizes, finite floats).
 *
 * A diffseg bundle exports (latent grid h x w = height/8 x width/8 for SD,
 * any batch size B, height and width multiples of image_size / min(map_res);
 * an AOTInductor bundle bounds them, see "diffseg.inputs" above):
 *   forward(image (B,3,H,W) float32 in [-1,1], t (1,) int64)
 *       -> [eps (B,latent_channels,h,w), map_0 (B,n_0,n_0), map_1, ...]
 *   encode(image) -> latent (B,latent_channels,h,w)
 *   denoise(latent, t) -> same as forward
 * Map i covers a grid of (H*map_res[i]/image_size) x (W*map_res[i]/image_size)
 * positions, n_i their product: row = query (row-major), rows sum to 1.
 */
#define DSEG_TORCH_MAX_DIMS 8

enum {
    DSEG_TORCH_FLOAT32 = 0,
    DSEG_TORCH_INT64 = 1,
};

/* A dense, C-contiguous host tensor. The shim copies it before the call
 * (the model never writes to the caller's buffer). */
typedef struct {
    int dtype;                         /* DSEG_TORCH_FLOAT32 or DSEG_TORCH_INT64 */
    int ndim;                          /* 0..DSEG_TORCH_MAX_DIMS */
    int64_t shape[DSEG_TORCH_MAX_DIMS];
    const void *data;                  /* shape's product elements (not NULL) */
} dseg_torch_tensor;

typedef struct dseg_torch_result dseg_torch_result; /* opaque */

/*
 * Run method `method` ("forward", "encode", "denoise", ...) of the bundle on
 * `inputs` (positional arguments, all tensors). A float32 input that holds
 * NaN or Inf is refused (DSEG_TORCH_EINVAL). The outputs (a tensor, or a
 * tuple/list of tensors, nested lists flattened in order) are copied to the
 * host: floating tensors as float32, integer and bool tensors as int64, all
 * C-contiguous. An output that holds NaN or Inf fails with
 * DSEG_TORCH_ERUNTIME (corrupt weights, or a half-precision overflow).
 * Calls on one handle are serialised. On success *out holds the outputs,
 * to release with dseg_torch_result_free(); on failure *out is NULL.
 */
int dseg_torch_call(dseg_torch_model *model, const char *method, int n_inputs, const dseg_torch_tensor *inputs,
                    dseg_torch_result **out);

/* Number of output tensors (0 for NULL). */
int dseg_torch_result_count(const dseg_torch_result *result);

/* Shape of output i: returns its ndim (<= DSEG_TORCH_MAX_DIMS) and writes
 * the sizes to shape (may be NULL); -1 when i is out of range. */
int dseg_torch_result_shape(const dseg_torch_result *result, int i, int64_t *shape);

/* DSEG_TORCH_FLOAT32 or DSEG_TORCH_INT64; -1 when i is out of range. */
int dseg_torch_result_dtype(const dseg_torch_result *result, int i);

/* Elements of output i (float * or int64_t * by its dtype), C-contiguous,
 * owned by the result and valid (and writable) until it is freed; NULL when
 * i is out of range. */
void *dseg_torch_result_data(dseg_torch_result *result, int i);

/* Release a result (NULL is ignored). */
void dseg_torch_result_free(dseg_torch_result *result);

/* Release a handle (NULL is ignored). */
void dseg_torch_close(dseg_torch_model *model);

#ifdef __cplusplus
}
#endif
#endif
