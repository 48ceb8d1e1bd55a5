"""Benchmark the network pass (VAE encode + one UNet pass) on the full SD v1.5
topology with random weights, 512x512, CPU: bare diffusers eager float32
(SDPA attention) against each bundle backend x dtype through the libtorch shim.

Builds an SD v1.5-shaped pipeline (UNet 860 M parameters, VAE, a 1-layer
768-wide CLIP text encoder with a toy tokenizer: only the empty-prompt
embedding is used) with random weights, exports the bundles asked for, then:

  pass      ONE process, the variants interleaved round by round (the order
            rotates), so that a busy spell of the machine hits all of them:
            VAE (encode) and UNet (denoise) wall time per round, minor page
            faults per pass. Eager diffusers runs twice: with libtorch's
            allocator as shipped, and with the shim's memory reuse (the same
            allocator the bundles get), to show where a gain comes from.
  fresh     one fresh process per variant: load time, first call, steady
            calls, minor faults, peak resident memory (``ru_maxrss``).
  export    the TorchScript float32 export, then load and the first calls in
            the same process (a first call right after export).
  accuracy  the attention of each variant against its float32 TorchScript
            counterpart: max relative difference per resolution (max |a - b| /
            max |b|) on several images, crop and whole frame (512x768), and
            label agreement (Hungarian-matched pixel share of the labels).

Ratios are against eager float32 in the same process (pass) or against the
same process's steady calls (first call). Report the CPU (``lscpu``), its
flags and the load average with the numbers; they are printed.

    python benchmarks/bench_sd.py --work DIR [--variants ts-float32,aoti-float32,...]
        [--rounds 5] [--fresh-calls 4] [--phases pass,fresh,export]

Slow: the build and TorchScript exports take minutes, an AOTInductor export
about 6 minutes and ~14 GB of memory on 2 cores; ~20 GB of disk in --work.
"""
import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, REPO)
SIZE = 512
VARIANTS = ("ts-float32", "aoti-float32", "ts-bfloat16", "aoti-bfloat16")
BACKEND = {"ts": "torchscript", "aoti": "aoti"}


def peak_rss_gb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # KiB on Linux


def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def test_image():
    import numpy as np

    rng = np.random.RandomState(0)
    img = rng.randint(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    img[: SIZE // 2] //= 3
    return img


def machine():
    """CPU model, the flags that matter here, cores, load average."""
    info = {"platform": platform.platform(), "cores": os.cpu_count(), "loadavg": os.getloadavg()}
    try:
        text = open("/proc/cpuinfo").read()
        info["cpu"] = next(line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name"))
        flags = next(line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags"))
        info["flags"] = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_tile")
                         if f in flags]
        fam = [line.split(":", 1)[1].strip() for line in text.splitlines()
               if line.startswith(("cpu family", "model\t"))]
        info["family_model"] = fam[:2]
    except (OSError, StopIteration):
        pass
    return info


# ------------------------------------------------------------------ build / export

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
    print(f"built {folder}: UNet {sum(p.numel() for p in unet.parameters()) / 1e6:.0f} M parameters", flush=True)


def bundle_dir(work, variant):
    return os.path.join(work, "bundle-" + variant)


def export(folder, work, variant):
    """Export ``variant`` (backend-dtype) unless present; returns its folder."""
    import warnings

    from diffseg.sd.bundle import bundle_file
    from diffseg.sd.export import export_bundle

    out = bundle_dir(work, variant)
    if bundle_file(out) is None:
        backend, dtype = variant.split("-")
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # PrecisionWarning on CPUs without native bfloat16
            path = export_bundle(folder, out, size=SIZE, dtype=dtype, backend=BACKEND[backend])
        print(f"export {variant}: {time.perf_counter() - t0:.0f} s, {os.path.getsize(path) / 2 ** 30:.2f} GiB "
              f"(peak RSS of the exporting process so far {peak_rss_gb():.1f} GB)", flush=True)
    return out


# ------------------------------------------------------------------ workers

class Eager:
    """Bare diffusers: VAE posterior mean + UNet with its default (SDPA) attention."""

    def __init__(self, folder):
        import torch
        from diffusers import AutoencoderKL, UNet2DConditionModel

        from diffseg.io.images import preprocess_image

        self.torch = torch
        self.unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet").eval()
        self.vae = AutoencoderKL.from_pretrained(folder, subfolder="vae").eval()
        self.emb = torch.zeros(1, 77, 768)  # the bundle stores the real empty-prompt embedding; same cost
        self.x = torch.from_numpy(preprocess_image(test_image(), SIZE))[None]

    def split(self):
        with self.torch.no_grad():
            t0 = time.perf_counter()
            latent = self.vae.encode(self.x).latent_dist.mean * self.vae.config.scaling_factor
            t1 = time.perf_counter()
            self.unet(latent, 300, encoder_hidden_states=self.emb, return_dict=False)
            return t1 - t0, time.perf_counter() - t1

    def first(self):
        return sum(self.split())


class Bundle:
    """A bundle through the shim: the split via its encode and denoise methods."""

    def __init__(self, path):
        import warnings

        import numpy as np

        import diffseg

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # PrecisionWarning on CPUs without native bfloat16
            self.model = diffseg.load_model(path)
        self.x = self.model.preprocess(test_image())[None]
        self.t = np.full((1,), 300, np.int64)
        self.image = test_image()

    def split(self):
        call = self.model._model.call
        t0 = time.perf_counter()
        latent = call("encode", [self.x])[0]
        t1 = time.perf_counter()
        call("denoise", [latent, self.t])
        return t1 - t0, time.perf_counter() - t1

    def first(self):
        t0 = time.perf_counter()
        self.model.attention(self.image)
        return time.perf_counter() - t0


def worker_pass(work, variants, rounds):
    """Interleaved rounds in one process: VAE and UNet time, faults per pass."""
    import diffseg
    from diffseg import _torch

    folder = os.path.join(work, "sd15-random")
    runners = {"eager": Eager(folder)}
    for v in variants:
        runners[v] = Bundle(bundle_dir(work, v))
    names = ["eager", "eager+reuse"] + list(variants)
    for name in names:  # one pass each first: first calls are the fresh phase's business
        (runners["eager"] if name.startswith("eager") else runners[name]).split()
    results = {n: {"vae": [], "unet": [], "faults": []} for n in names}
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            # bare eager: libtorch's allocator as shipped (the shim's kept blocks wait)
            _torch.set_memory_reuse("paused" if name == "eager" else True)
            runner = runners["eager"] if name.startswith("eager") else runners[name]
            f0 = faults()
            vae, unet = runner.split()
            res = results[name]
            res["vae"].append(vae)
            res["unet"].append(unet)
            res["faults"].append(faults() - f0)
            print(f"  round {r} {name:14s} VAE {vae:6.2f} s  UNet {unet:6.2f} s  faults {res['faults'][-1]}",
                  flush=True)
    _torch.set_memory_reuse(True)
    diffseg.set_num_threads(0)
    return results


def worker_fresh(work, variant, calls):
    """Load, first call, steady calls and peak memory in a fresh process."""
    folder = os.path.join(work, "sd15-random")
    f0, t0 = faults(), time.perf_counter()
    runner = Eager(folder) if variant == "eager" else Bundle(bundle_dir(work, variant))
    load, load_faults = time.perf_counter() - t0, faults() - f0
    times, cpu, flts = [], [], []
    for _ in range(calls):
        f0, c0 = faults(), time.process_time()
        times.append(runner.first())
        cpu.append(time.process_time() - c0)
        flts.append(faults() - f0)
    return {"load_s": load, "load_faults": load_faults, "times": times, "cpu": cpu, "faults": flts,
            "peak_gb": peak_rss_gb()}


def worker_export(work, calls):
    """A first call right after exporting in the same process (TorchScript float32)."""
    import shutil

    import diffseg
    from diffseg.sd.export import export_bundle

    out = os.path.join(work, "bundle-after-export")
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    export_bundle(os.path.join(work, "sd15-random"), out, size=SIZE)
    export_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    model = diffseg.load_model(out)
    load = time.perf_counter() - t0
    times, cpu, flts = [], [], []
    for _ in range(calls):
        f0, c0, t0 = faults(), time.process_time(), time.perf_counter()
        model.attention(test_image())
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
        flts.append(faults() - f0)
    shutil.rmtree(out, ignore_errors=True)
    return {"export_s": export_s, "load_s": load, "times": times, "cpu": cpu, "faults": flts,
            "peak_gb": peak_rss_gb()}


def accuracy_images():
    """Structured test images (blocks of colour with noise), 512x512 and 512x768."""
    import numpy as np

    images = []
    for seed, (h, w) in enumerate([(512, 512), (512, 512), (512, 512), (512, 768)]):
        rng = np.random.RandomState(seed)
        blocks = rng.randint(0, 256, (4, 6, 3))
        img = np.kron(blocks, np.ones((h // 4 + 1, w // 6 + 1, 1)))[:h, :w]
        images.append(np.clip(img + rng.randint(-24, 24, img.shape), 0, 255).astype(np.uint8))
    return images


def worker_accuracy(work, variants):
    """Each variant's attention and labels against TorchScript float32."""
    import numpy as np

    import diffseg
    from diffseg.evaluation.metrics import match_labels

    ref = Bundle(bundle_dir(work, "ts-float32")).model
    out = {}
    for v in variants:
        if v == "ts-float32":
            continue
        model = Bundle(bundle_dir(work, v)).model
        rows = []
        for k, img in enumerate(accuracy_images()):
            frame = "whole" if img.shape[1] != img.shape[0] else "crop"
            a, b = model.attention(img, frame=frame), ref.attention(img, frame=frame)
            rel = {str(key): float(np.abs(a[key].astype(np.float64) - b[key]).max() / np.abs(b[key]).max())
                   for key in b}
            la = diffseg.segment_attention(a, size=img.shape[:2])
            lb = diffseg.segment_attention(b, size=img.shape[:2])
            rows.append({"image": k, "frame": frame, "max_rel": rel,
                         "agreement": float((match_labels(la, lb) == lb).mean()),
                         "segments": [int(la.max()) + 1, int(lb.max()) + 1]})
            print(f"  {v} image {k} ({frame}): {rows[-1]}", flush=True)
        model.close()
        out[v] = rows
    return out


def run_worker(args, *extra):
    cmd = [sys.executable, os.path.abspath(__file__), "--work", args.work, "--worker"] + [str(e) for e in extra]
    out = subprocess.run(cmd, capture_output=True, text=True)
    sys.stderr.write("".join(line + "\n" for line in out.stdout.splitlines() if line.startswith("  ")))
    if out.returncode:
        raise RuntimeError(f"worker {extra} failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------ report

def best(xs):
    return min(xs)


def median(xs):
    xs = sorted(xs)
    n = len(xs)
    return xs[n // 2] if n % 2 else (xs[n // 2 - 1] + xs[n // 2]) / 2


def report_pass(results):
    base = [v + u for v, u in zip(results["eager"]["vae"], results["eager"]["unet"])]
    print("\n| variant | VAE [s] | UNet [s] | pass [s] | / eager (best) | / eager (median of rounds) "
          "| minor faults per pass |")
    print("|---|---|---|---|---|---|---|")
    for name, res in results.items():
        total = [v + u for v, u in zip(res["vae"], res["unet"])]
        per_round = [t / b for t, b in zip(total, base)]
        print(f"| {name} | {best(res['vae']):.2f} | {best(res['unet']):.2f} | {best(total):.2f} "
              f"| {best(total) / best(base):.2f} | {median(per_round):.2f} | {int(median(res['faults'])):,} |")


def first_ratio(r, key="times"):
    """The first call against the median of the steady calls (a best-of-n
    steady time would bias the ratio of one first-call sample upwards)."""
    return r[key][0] / median(r[key][1:])


def report_fresh(fresh, after):
    """Per variant: the process with the median wall-time ratio, and every
    process's ratios in wall time and in CPU time (all threads; on a shared
    machine less sensitive to other work than wall time)."""
    print("\n| variant (fresh process) | load [s] | first call [s] | steady [s] | first / steady, wall (each process) "
          "| first / steady, CPU time | faults first / steady | peak RSS [GB] |")
    print("|---|---|---|---|---|---|---|---|")
    rows = dict(fresh)
    if after:
        rows[f"ts-float32 right after export ({median([r['export_s'] for r in after]):.0f} s)"] = after
    for name, runs in rows.items():
        r = sorted(runs, key=first_ratio)[len(runs) // 2]
        wall = ", ".join(f"{first_ratio(x):.3f}" for x in runs)
        cpu = ", ".join(f"{first_ratio(x, 'cpu'):.3f}" for x in runs if "cpu" in x) or "-"
        print(f"| {name} | {r['load_s']:.2f} | {r['times'][0]:.2f} | {median(r['times'][1:]):.2f} | {wall} | {cpu} "
              f"| {r['faults'][0]:,} / {min(r['faults'][1:]):,} | {r['peak_gb']:.2f} |")


def report_accuracy(accuracy):
    print("\n| variant vs ts-float32 | image (frame) | max rel. diff per resolution | label agreement | segments |")
    print("|---|---|---|---|---|")
    for v, rows in accuracy.items():
        for r in rows:
            rel = ", ".join(f"{k}: {x:.1e}" for k, x in r["max_rel"].items())
            print(f"| {v} | {r['image']} ({r['frame']}) | {rel} | {r['agreement']:.4f} "
                  f"| {r['segments'][0]} / {r['segments'][1]} |")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", required=True, help="folder for the random checkpoint and its bundles (kept)")
    ap.add_argument("--variants", default="ts-float32,aoti-float32",
                    help=f"comma-separated, of {', '.join(VARIANTS)}")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds of the pass phase")
    ap.add_argument("--fresh-calls", type=int, default=4, help="calls per fresh process (the first apart)")
    ap.add_argument("--fresh-repeats", type=int, default=1,
                    help="fresh processes per variant (and exports): the first-call ratio is their median")
    ap.add_argument("--phases", default="pass,fresh,export,accuracy", help="of pass, fresh, export, accuracy")
    ap.add_argument("--prepare", action="store_true", help="only build and export")
    ap.add_argument("--worker", nargs="*", help=argparse.SUPPRESS)
    args = ap.parse_args()
    variants = [v for v in args.variants.split(",") if v]
    bad = [v for v in variants if v not in VARIANTS]
    if bad:
        ap.error(f"unknown variants {bad}; choose from {VARIANTS}")

    if args.worker:
        kind, *rest = args.worker
        if kind == "pass":
            result = worker_pass(args.work, rest[1:], int(rest[0]))
        elif kind == "fresh":
            result = worker_fresh(args.work, rest[0], int(rest[1]))
        elif kind == "accuracy":
            result = worker_accuracy(args.work, rest)
        else:
            result = worker_export(args.work, int(rest[0]))
        print(json.dumps(result))
        return 0

    os.makedirs(args.work, exist_ok=True)
    folder = os.path.join(args.work, "sd15-random")
    if not os.path.exists(os.path.join(folder, "model_index.json")):
        build(folder)
    for v in variants:
        export(folder, args.work, v)
    if args.prepare:
        return 0
    phases = args.phases.split(",")
    before = machine()
    print(json.dumps(before))
    out = {"machine_before": before}
    if "pass" in phases:
        out["pass"] = run_worker(args, "pass", args.rounds, *variants)
    if "fresh" in phases:
        out["fresh"] = {v: [run_worker(args, "fresh", v, args.fresh_calls) for _ in range(args.fresh_repeats)]
                        for v in ["eager"] + variants}
    if "export" in phases:
        out["after_export"] = [run_worker(args, "export", args.fresh_calls) for _ in range(args.fresh_repeats)]
    if "accuracy" in phases:
        out["accuracy"] = run_worker(args, "accuracy", *variants)
    out["machine_after"] = machine()
    print(json.dumps(out["machine_after"]))
    if "pass" in out:
        report_pass(out["pass"])
    if "fresh" in out:
        report_fresh(out["fresh"], out.get("after_export"))
    if "accuracy" in out:
        report_accuracy(out["accuracy"])
    with open(os.path.join(args.work, "bench_sd.json"), "w") as f:
        json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
