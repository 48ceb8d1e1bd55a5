/*
 * diffseg torch shim: run a DiffSeg model bundle (VAE encoder + UNet that
 * returns its self-attention maps) through libtorch, from plain C.
 *
 * A bundle is the file written by `diffseg export` (diffseg_bundle.pt): a
 * TorchScript module whose forward(image, t) returns (eps, map_0, map_1, ...)
 * and whose attributes give its layout (format_version, image_size,
 * image_channels, latent_size, latent_channels, default_timestep,
 * map_resolutions, device_type), plus descriptive JSON metadata as an extra
 * file ("diffseg.json") that the shim hands out unparsed.
 * The C API is backend-neutral: nothing here names TorchScript types, so
 * another backend (AOTInductor .pt2) can implement the same functions.
 *
 * Conventions
 *   - Buffers are dense, row-major (C-contiguous) float32.
 *   - Every function that can fail returns DSEG_TORCH_OK (0) or an error code;
 *     the message is available from dseg_torch_last_error() (thread-local).
 *     Nothing exits or aborts; C++ exceptions never cross this boundary.
 *   - A handle may be used from several threads; runs on one handle are
 *     serialised. Closing a handle while another thread uses it is an error
 *     of the caller (the Python binding waits for runs in progress).
 *   - Error messages may quote bytes of a corrupt bundle as libtorch reports
 *     them: they are not guaranteed to be valid UTF-8.
 */
#ifndef DIFFSEG_TORCH_H
#define DIFFSEG_TORCH_H

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
    int image_size;      /* input: (image_channels, image_size, image_size) */
    int image_channels;  /* 3 */
    int latent_size;     /* eps: (latent_channels, latent_size, latent_size) */
    int latent_channels;
    int default_timestep;
    int n_maps;                          /* attention maps per run */
    int map_res[DSEG_TORCH_MAX_MAPS];    /* map i is (res^2, res^2) */
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

/*
 * Open a bundle. device: "cpu", "cuda" or "cuda:N" (NULL means "cpu"); it
 * must be the device the bundle was exported for. num_threads > 0 sets
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

/*
 * One DiffSeg pass: VAE-encode `image` (channels x height x width float32,
 * values in [-1, 1], already centre-cropped and resized to image_size),
 * run the UNet once at `timestep` (< 0: the bundle's default) with the
 * unconditional embedding, and copy the outputs:
 *   maps[i]: (map_res[i]^2 x map_res[i]^2) floats, row = query, rows sum to 1.
 *            A NULL entry skips that map; maps may be NULL to skip all.
 *   eps:     (latent_channels x latent_size x latent_size) floats, or NULL.
 * An output that holds NaN or Inf fails with DSEG_TORCH_ERUNTIME (corrupt
 * weights, or a half-precision overflow); the buffers are then unspecified.
 */
int dseg_torch_run(dseg_torch_model *model, const float *image, int channels,
                   int height, int width, int timestep, float *const *maps,
                   float *eps);

/* Release a handle (NULL is ignored). */
void dseg_torch_close(dseg_torch_model *model);

#ifdef __cplusplus
}
#endif
#endif
