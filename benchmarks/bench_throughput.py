"""Throughput of many images on the CPU: sequential ``diffseg.segment`` vs
``diffseg.segment_many`` (UNet pass overlapped with post-processing), the same
with B images per UNet call (``batch_size``, mode ``batched-B``), vs Ray
Data on this machine (``diffseg.distributed.segment_dataset``, one actor).

Random-weight Stable Diffusion (masks meaningless, costs real), 512 x 512 images:

* default: the tiny SD of tests/sd_tiny.py exported at 512 px (tiny UNet,
  real post-processing: 4096 x 4096 attention), a quick run;
* ``--full``: the SD v1.5 topology (UNet 860 M parameters, built as in
  benchmarks/bench_sd.py); slow on 2 cores, so measure a few images.

Each mode runs in a fresh process; reported: images/s (model opening and a
warm-up pass excluded; a Ray job includes its actor's start and model opening,
so the Ray overhead compares it with segment_many plus those), the UNet
pass time ``U`` (``model.attention`` alone), the post-processing time ``P``,
and the peak resident memory of the process (for Ray: the driver's; the
actor's is in its own process and not counted). Targets: segment_many >=
0.95 / U images/s, Ray <= 10 % slower than segment_many.

    python benchmarks/bench_throughput.py [--full] [--images N] [--pool-size W] [--batch-sizes 2,4] [--work DIR --keep]
"""
import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
SIZE = 512


def peak_rss_mb():
    """This process's peak resident memory: VmHWM (ru_maxrss survives exec, so a
    worker would report its parent's peak from building the model)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def omp_threads():
    """What the actor's environment sets (Ray sets OMP_NUM_THREADS from num_cpus)."""
    return os.environ.get("OMP_NUM_THREADS")


def write_images(folder, n):
    import numpy as np
    from PIL import Image

    os.makedirs(folder, exist_ok=True)
    paths = []
    for k in range(n):
        rng = np.random.default_rng(k)
        img = rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
        img[: SIZE // (k % 3 + 2)] //= 3  # some structure, different per image
        paths.append(os.path.join(folder, f"im{k:03d}.png"))
        Image.fromarray(img).save(paths[-1])
    return paths


def prepare(work, full):
    """Build the random checkpoint and export its bundle (reused from ``work``)."""
    folder = os.path.join(work, "sd-full" if full else "sd-tiny")
    bundle = os.path.join(work, "bundle-full" if full else "bundle-tiny")
    if not os.path.exists(os.path.join(folder, "model_index.json")):
        if full:
            sys.path.insert(0, HERE)
            from bench_sd import build
            build(folder)
        else:
            sys.path.insert(0, os.path.join(REPO, "tests"))
            from sd_tiny import build_tiny_sd
            build_tiny_sd(folder, sample_size=SIZE)
    if not os.path.exists(os.path.join(bundle, "diffseg_bundle.pt")):
        from diffseg.sd.export import export_bundle
        export_bundle(folder, bundle, size=SIZE)
    return bundle


# ------------------------------------------------------------------ workers (one process each)
def worker(mode, bundle, paths, pool_size):
    import diffseg

    if mode == "ray":
        import ray

        from diffseg.distributed import segment_dataset

        t0 = time.perf_counter()
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
        t_init = time.perf_counter() - t0
        segment_dataset(paths[:1], bundle, as_list=True)  # warm-up: Ray Data's first job starts its machinery
        actor_omp = ray.get(ray.remote(num_cpus=0.5)(omp_threads).remote())
        # a job starts its actor, which opens the model: compared with open_s + seconds of segment_many
        t0 = time.perf_counter()
        records = segment_dataset(paths, bundle, ray_batch_size=len(paths), pool_size=pool_size, as_list=True)
        seconds = time.perf_counter() - t0
        ray.shutdown()
        return {"seconds": seconds, "ray_init_s": t_init, "images": len(records), "peak_mb": peak_rss_mb(),
                "worker_OMP_NUM_THREADS": actor_omp}
    t0 = time.perf_counter()
    model = diffseg.load_model(bundle)
    diffseg.segment(paths[0], model)  # warm-up (first pass is slower)
    open_s = time.perf_counter() - t0
    if mode == "unet":
        from diffseg.io.images import load_image

        rgbs = [load_image(p) for p in paths]
        t0 = time.perf_counter()
        attn = None
        for rgb in rgbs:
            attn = model.attention(rgb)
        unet = (time.perf_counter() - t0) / len(paths)
        t0 = time.perf_counter()
        for _ in paths:
            diffseg.segment_attention(attn, size=(SIZE, SIZE))
        post = (time.perf_counter() - t0) / len(paths)
        return {"unet_s": unet, "post_s": post, "open_s": open_s, "peak_mb": peak_rss_mb()}
    t0 = time.perf_counter()
    if mode == "sequential":
        n = sum(1 for p in paths if diffseg.segment(p, model) is not None)
    elif mode.startswith("batched"):  # "batched-B": B images per UNet call
        n = sum(1 for _ in diffseg.segment_many(paths, model, pool_size=pool_size, batch_size=int(mode.split("-")[1])))
    else:
        n = sum(1 for _ in diffseg.segment_many(paths, model, pool_size=pool_size))
    return {"seconds": time.perf_counter() - t0, "open_s": open_s, "images": n, "peak_mb": peak_rss_mb()}


def run_worker(mode, bundle, paths, pool_size):
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", mode, "--bundle", bundle,
           "--pool-size", str(pool_size), *paths]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"worker {mode} failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--full", action="store_true", help="the full-size SD v1.5 topology (slow)")
    ap.add_argument("--images", type=int, default=None, help="images per mode (default 12; --full: 3)")
    ap.add_argument("--pool-size", type=int, default=1, help="segment_many post-processing threads")
    ap.add_argument("--no-ray", action="store_true", help="skip the Ray mode")
    ap.add_argument("--batch-sizes", default="4", help="segment_many batch sizes to time (comma-separated; '' none)")
    ap.add_argument("--work", default=None, help="folder for the checkpoint, bundle and images")
    ap.add_argument("--keep", action="store_true", help="keep --work (reused by later runs)")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--bundle", default=None, help=argparse.SUPPRESS)
    ap.add_argument("paths", nargs="*", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.bundle, args.paths, args.pool_size)))
        return 0

    n = args.images or (3 if args.full else 12)
    work = args.work or tempfile.mkdtemp(prefix="diffseg-throughput-")
    try:
        bundle = prepare(work, args.full)
        paths = write_images(os.path.join(work, "images"), n)
        batches = [f"batched-{int(b)}" for b in args.batch_sizes.split(",") if b.strip()]
        modes = ["unet", "sequential", "segment_many"] + batches + ([] if args.no_ray else ["ray"])
        res = {}
        for mode in modes:
            res[mode] = run_worker(mode, bundle, paths, args.pool_size)
            print(mode, json.dumps(res[mode]), flush=True)
        unet, post = res["unet"]["unet_s"], res["unet"]["post_s"]
        print(f"\n{'full' if args.full else 'tiny'} SD at {SIZE} px, {n} images, {os.cpu_count()} CPUs, "
              f"pool_size={args.pool_size}: UNet pass U = {unet:.3f} s, post-processing P = {post:.3f} s")
        print(f"{'mode':<14} {'images/s':>9} {'x 1/U':>7} {'peak MB':>8}")
        for mode in modes[1:]:
            rate = n / res[mode]["seconds"]
            print(f"{mode:<14} {rate:9.3f} {rate * unet:7.2f} {res[mode]['peak_mb']:8.0f}")
        if "ray" in res:
            many = res["segment_many"]
            overhead = res["ray"]["seconds"] / (many["seconds"] + many["open_s"]) - 1
            print(f"Ray job (actor start, model open, {n} images) vs segment_many (model open + first pass, "
                  f"{n} images): {100 * overhead:+.1f} % time; ray.init {res['ray']['ray_init_s']:.1f} s not counted")
    finally:
        if not args.keep and not args.work:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
