"""Benchmark the Stable Diffusion stage at full size with random weights (CPU).

Builds an SD v1.5-shaped pipeline (UNet 860 M parameters, VAE, a 1-layer
768-wide CLIP text encoder with a toy tokenizer: only the empty-prompt
embedding is used) with random weights, exports it to a diffseg bundle, and
measures in fresh processes, one image of 512x512:

  (a) bare diffusers: VAE encode (posterior mean) + one UNet forward, default
      attention processors (SDPA), torch in Python;
  (b) the bundle through the libtorch shim: ``Model.attention(image)``;
  (c) ``diffseg.segment(image, model)``: (b) + aggregate, merge, NMS;
  (d) the bare diffusers UNet alone (SDPA) on a latent;
  (e) the bundle's UNet with the attention capture alone, through the shim
      (``call("denoise", ...)``) on the same latent.

Reported: wall time of each run in the same process (the first call
separately: no warm-up tax, issue 14), and peak resident memory of the
process (``ru_maxrss``). Targets: (c) <= 1.3 x (a) in time, peak (c) <= peak
(a) + 1.5 GB (issue 3); first call of (b) <= 1.05 x its steady state, (e) <=
1.15 x (d) (issue 14). Masks are meaningless
with random weights; the shapes and the cost are real.

    python benchmarks/bench_sd.py [--work DIR] [--threads N] [--runs 3] [--keep]

Slow: building + exporting takes minutes on 2 cores, and needs ~8 GB of disk
in --work (default: a temporary folder, deleted unless --keep).
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


def peak_rss_gb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def test_image():
    import numpy as np

    rng = np.random.RandomState(0)
    img = rng.randint(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    img[: SIZE // 2] //= 3
    return img


def build(folder):
    """SD v1.5 shapes, random weights, saved as a diffusers folder."""
    import torch
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    sys.path.insert(0, os.path.join(REPO, "tests"))
    from sd_tiny import write_tokenizer_files

    torch.manual_seed(0)
    vocab_file, merges_file, vocab = write_tokenizer_files(os.path.join(folder, "_tok_src"))
    tokenizer = CLIPTokenizer(vocab_file, merges_file, model_max_length=77, pad_token="<|endoftext|>")
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=768, intermediate_size=3072, num_hidden_layers=1,
        num_attention_heads=12, max_position_embeddings=77, projection_dim=768,
        bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"],
        pad_token_id=vocab["<|endoftext|>"]))
    unet = UNet2DConditionModel(  # the SD v1.5 config (diffusers' defaults)
        sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(320, 640, 1280, 1280),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=768, attention_head_dim=8)
    vae = AutoencoderKL(  # the SD v1.5 VAE config
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
        block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        sample_size=512)
    scheduler = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              skip_prk_steps=True, steps_offset=1)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(folder)
    n = sum(p.numel() for p in unet.parameters())
    print(f"built {folder}: UNet {n / 1e6:.0f} M parameters", flush=True)


# ------------------------------------------------------------------ workers
# Each runs in its own process so that peak memory is its own.

def worker_diffusers(folder, runs):
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from diffseg.io.images import preprocess_image

    unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet").eval()
    vae = AutoencoderKL.from_pretrained(folder, subfolder="vae").eval()
    emb = torch.zeros(1, 77, 768)  # the bundle stores the real empty-prompt embedding; same cost
    x = torch.from_numpy(preprocess_image(test_image(), SIZE))[None]
    times, cpu = [], []
    with torch.no_grad():
        for _ in range(runs):
            t0, c0 = time.perf_counter(), time.process_time()
            latent = vae.encode(x).latent_dist.mean * vae.config.scaling_factor
            unet(latent, 300, encoder_hidden_states=emb, return_dict=False)
            times.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
    return {"times": times, "cpu": cpu, "peak_gb": peak_rss_gb(), "threads": torch.get_num_threads()}


def worker_shim(bundle, runs):
    import diffseg

    t0 = time.perf_counter()
    model = diffseg.load_model(bundle)
    load = time.perf_counter() - t0
    img = test_image()
    times, cpu = [], []
    for _ in range(runs):
        t0, c0 = time.perf_counter(), time.process_time()
        model.attention(img)
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return {"times": times, "cpu": cpu, "load_s": load, "peak_gb": peak_rss_gb(),
            "torch_imported": "torch" in sys.modules}


def _latent(channels=4):
    import numpy as np

    return np.random.RandomState(1).standard_normal((1, channels, SIZE // 8, SIZE // 8)).astype(np.float32)


def worker_unet(folder, runs):
    """The bare diffusers UNet (default processors: SDPA) on one latent."""
    import torch
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet").eval()
    emb = torch.zeros(1, 77, unet.config.cross_attention_dim)
    latent = torch.from_numpy(_latent())
    times = []
    with torch.no_grad():
        for _ in range(runs):
            t0 = time.perf_counter()
            unet(latent, 300, encoder_hidden_states=emb, return_dict=False)
            times.append(time.perf_counter() - t0)
    return {"times": times, "peak_gb": peak_rss_gb()}


def worker_capture(bundle, runs):
    """The bundle's UNet with the attention capture, through the shim's
    generic call (``denoise``) on the latent of worker_unet."""
    import numpy as np

    import diffseg

    model = diffseg.load_model(bundle)
    latent, t = _latent(), np.full((1,), 300, np.int64)
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        model._model.call("denoise", [latent, t])
        times.append(time.perf_counter() - t0)
    return {"times": times, "peak_gb": peak_rss_gb()}


def worker_segment(bundle, runs):
    import numpy as np

    import diffseg

    model = diffseg.load_model(bundle)
    img = test_image()
    times, cpu, post = [], [], []
    labels = None
    for _ in range(runs):
        t0, c0 = time.perf_counter(), time.process_time()
        labels = diffseg.segment(img, model)
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    attn = model.attention(img)
    for _ in range(runs):  # the post-processing alone (C core)
        t0 = time.perf_counter()
        diffseg.segment_attention(attn, size=img.shape[:2])
        post.append(time.perf_counter() - t0)
    return {"times": times, "cpu": cpu, "post_times": post, "peak_gb": peak_rss_gb(), "segments": int(np.unique(labels).size),
            "torch_imported": "torch" in sys.modules}


def run_worker(name, target, runs, threads):
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", name, "--target", target, "--runs", str(runs)]
    if threads:
        cmd += ["--threads", str(threads)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"worker {name} failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default=None, help="folder for the random checkpoint and its bundle")
    ap.add_argument("--threads", type=int, default=0, help="threads (0: library defaults)")
    ap.add_argument("--runs", type=int, default=3, help="runs per process (the first is reported apart)")
    ap.add_argument("--keep", action="store_true", help="keep --work (reused by later runs)")
    ap.add_argument("--prepare", action="store_true", help="only build and export (into --work)")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--target", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.worker:
        if args.threads:
            import diffseg

            diffseg.set_num_threads(args.threads)
            if args.worker == "diffusers":
                import torch

                torch.set_num_threads(args.threads)
        fn = {"diffusers": worker_diffusers, "shim": worker_shim, "segment": worker_segment,
              "unet": worker_unet, "capture": worker_capture}[args.worker]
        print(json.dumps(fn(args.target, args.runs)))
        return 0

    work = args.work or tempfile.mkdtemp(prefix="diffseg-bench-")
    os.makedirs(work, exist_ok=True)
    folder = os.path.join(work, "sd15-random")
    bundle_dir = os.path.join(work, "bundle")
    try:
        if not os.path.exists(os.path.join(folder, "model_index.json")):
            t0 = time.perf_counter()
            build(folder)
            print(f"build: {time.perf_counter() - t0:.1f} s", flush=True)
        bundle = os.path.join(bundle_dir, "diffseg_bundle.pt")
        if not os.path.exists(bundle):
            from diffseg.sd.export import export_bundle

            t0 = time.perf_counter()
            export_bundle(folder, bundle_dir, size=SIZE)
            print(f"export: {time.perf_counter() - t0:.1f} s, bundle {os.path.getsize(bundle) / 2**30:.2f} GiB",
                  flush=True)
        if args.prepare:
            return 0

        results = {}
        workers = (("diffusers", folder), ("shim", bundle), ("segment", bundle), ("unet", folder), ("capture", bundle))
        for name, target in workers:
            results[name] = r = run_worker(name, target, args.runs, args.threads)
            times = ", ".join(f"{t:.2f}" for t in r["times"])
            cpu = ", ".join(f"{t:.2f}" for t in r["cpu"]) if "cpu" in r else "-"
            print(f"({'abcde'[len(results) - 1]}) {name:9s} wall [s] per run: {times}; CPU [s]: {cpu}; "
                  f"peak RSS {r['peak_gb']:.2f} GB"
                  + (f"; torch imported: {r['torch_imported']}" if "torch_imported" in r else ""), flush=True)
            if "post_times" in r:
                print("    post-processing alone (aggregate + merge + nms) [s]: "
                      + ", ".join(f"{t:.2f}" for t in r["post_times"]), flush=True)

        a, c = results["diffusers"], results["segment"]
        ta, tc = min(a["times"]), min(c["times"])
        print(f"\nsegment / diffusers time: {tc / ta:.2f} (target <= 1.3; best of {args.runs} runs; "
              f"CPU time: {min(c['cpu']) / min(a['cpu']):.2f})")
        print(f"segment - diffusers peak memory: {c['peak_gb'] - a['peak_gb']:+.2f} GB (target <= +1.5 GB)")
        shim = results["shim"]["times"]
        if len(shim) > 1:
            steady = min(shim[1:])
            cpu = results["shim"]["cpu"]
            results["first_over_steady"] = shim[0] / steady
            results["first_over_steady_cpu"] = cpu[0] / min(cpu[1:])
            print(f"shim first call / steady state: {shim[0]:.2f} s / {steady:.2f} s = {shim[0] / steady:.2f} "
                  f"(target <= 1.05; steady = best of runs 2..{len(shim)}; CPU time: "
                  f"{cpu[0] / min(cpu[1:]):.2f}, the figure to trust on a busy machine; opening the bundle: "
                  f"{results['shim']['load_s']:.2f} s, not counted)")
        bare, capture = min(results["unet"]["times"]), min(results["capture"]["times"])
        results["capture_over_bare_unet"] = capture / bare
        print(f"capture (shim denoise) / bare diffusers UNet: {capture:.2f} s / {bare:.2f} s = {capture / bare:.2f} "
              "(target <= 1.15; best of runs)")
        results["ratio_time"] = tc / ta
        results["delta_peak_gb"] = c["peak_gb"] - a["peak_gb"]
        with open(os.path.join(work, "bench_sd.json"), "w") as f:
            json.dump(results, f, indent=1)
    finally:
        if not args.keep and not args.work and not args.prepare:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
