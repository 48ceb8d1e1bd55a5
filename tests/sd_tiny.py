"""A tiny random-weight Stable Diffusion with the real v1 topology, built offline.

UNet: 3 cross-attention down blocks + a plain down block, a cross-attention mid
block, a plain up block + 3 cross-attention up blocks, ``layers_per_block=2``:
16 self-attention (``attn1``) layers at 4 resolutions (5 + 5 + 5 + 1), exactly
as SD v1.x, but with tiny widths. VAE with 4 blocks (downsampling x8), a
2-layer CLIP text encoder and a CLIP tokenizer whose vocabulary files are
written here. Saved with ``StableDiffusionPipeline.save_pretrained``.

Random attention is near uniform; ``sharpen`` scales the self-attention query
and key weights so that the maps are far from uniform (a stronger test).
"""
import json
import os

SD_TINY_LAYERS = 16


def write_tokenizer_files(folder):
    """A minimal byte-level BPE vocabulary for CLIPTokenizer: printable ASCII
    characters (with and without the end-of-word mark) and the special tokens."""
    os.makedirs(folder, exist_ok=True)
    chars = [chr(c) for c in range(33, 127)]
    tokens = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    vocab = {t: i for i, t in enumerate(tokens)}
    vocab_file = os.path.join(folder, "vocab.json")
    merges_file = os.path.join(folder, "merges.txt")
    with open(vocab_file, "w", encoding="utf-8") as f:
        json.dump(vocab, f)
    with open(merges_file, "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n")
    return vocab_file, merges_file, vocab


def build_tiny_sd(folder, *, sample_size=128, seed=0, sharpen=4.0, sd2=False,
                  unet_channels=(16, 32, 32, 32), heads=2, cross_dim=24):
    """Build and save a tiny random SD pipeline in ``folder``; return ``folder``.

    ``sample_size`` is the image side the VAE/UNet configs advertise (any
    multiple of 64 works at run time). ``sd2=True`` uses the SD 2.x UNet
    options (linear projections, per-block head counts, v-prediction).
    """
    import torch
    from diffusers import (AutoencoderKL, DDIMScheduler, PNDMScheduler,
                           StableDiffusionPipeline, UNet2DConditionModel)
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(seed)
    tok_dir = os.path.join(folder, "_tok_src")
    vocab_file, merges_file, vocab = write_tokenizer_files(tok_dir)
    tokenizer = CLIPTokenizer(vocab_file, merges_file, model_max_length=77,
                              pad_token="<|endoftext|>")

    text_config = CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=cross_dim, intermediate_size=2 * cross_dim,
        num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=77,
        bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"],
        pad_token_id=vocab["<|endoftext|>"], projection_dim=cross_dim,
    )
    text_encoder = CLIPTextModel(text_config).eval()

    latent = sample_size // 8
    unet = UNet2DConditionModel(
        sample_size=latent,
        in_channels=4, out_channels=4,
        block_out_channels=tuple(unet_channels),
        layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=cross_dim,
        attention_head_dim=(heads,) * 4 if sd2 else heads,
        use_linear_projection=sd2,
        upcast_attention=sd2,
        norm_num_groups=8,
    ).eval()
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4,
        block_out_channels=(8, 16, 16, 16),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=1, norm_num_groups=8, sample_size=sample_size,
    ).eval()

    with torch.no_grad():
        for name, module in unet.named_modules():
            if name.endswith("attn1"):
                module.to_q.weight.mul_(sharpen)
                module.to_k.weight.mul_(sharpen)

    if sd2:
        scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                  prediction_type="v_prediction", clip_sample=False,
                                  set_alpha_to_one=False, steps_offset=1)
    else:
        scheduler = PNDMScheduler(beta_start=0.00085, beta_end=0.012,
                                  beta_schedule="scaled_linear", skip_prk_steps=True,
                                  steps_offset=1)
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
        scheduler=scheduler, safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(folder)
    return folder


def load_tiny_sd(folder):
    """The saved pipeline, eager (for reference computations in tests)."""
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(folder, local_files_only=True,
                                                   safety_checker=None,
                                                   requires_safety_checker=False)


class ReferenceCapture:
    """Diffusers' own explicit attention (``AttnProcessor``, which calls
    ``Attention.get_attention_scores``) on every ``attn1``, recording the
    probabilities averaged over heads, in execution order."""

    def __init__(self, unet):
        from diffusers.models.attention_processor import AttnProcessor

        self.maps = []  # (name, (batch, n, n) tensor)
        processors = {}
        for name in unet.attn_processors:
            if ".attn1." in name:
                processors[name] = self._make(name)
            else:
                processors[name] = AttnProcessor()
        unet.set_attn_processor(processors)

    def _make(self, name):
        from diffusers.models.attention_processor import AttnProcessor

        capture = self

        class _Proc(AttnProcessor):
            def __call__(self, attn, hidden_states, encoder_hidden_states=None,
                         attention_mask=None, temb=None, *args, **kwargs):
                original = attn.get_attention_scores

                def scores(query, key, mask=None):
                    probs = original(query, key, mask)
                    b = probs.shape[0] // attn.heads
                    capture.maps.append(
                        (name, probs.reshape(b, attn.heads, *probs.shape[1:]).float().mean(1)))
                    return probs

                attn.get_attention_scores = scores
                try:
                    return super().__call__(attn, hidden_states, encoder_hidden_states,
                                            attention_mask, temb)
                finally:
                    del attn.get_attention_scores

        return _Proc()


def reference_attention(pipe, image, timestep=300):
    """Eager diffusers: ``image`` (3, H, W) float32 in [-1, 1] ->
    ``({key: (n, n) float64 mean over layers}, [(name, map)], eps)``; keys as
    ``diffseg.Model.attention``: ``s`` for an s x s grid, else ``(h, w)``."""
    import numpy as np
    import torch

    capture = ReferenceCapture(pipe.unet)
    with torch.no_grad():
        x = torch.from_numpy(np.ascontiguousarray(image))[None].float()
        latent = pipe.vae.encode(x).latent_dist.mean * pipe.vae.config.scaling_factor
        emb, _ = pipe.encode_prompt("", "cpu", 1, False)
        eps = pipe.unet(latent, timestep, encoder_hidden_states=emb, return_dict=False)[0]
    h, w = latent.shape[-2:]
    grids = {(h // f) * (w // f): (h // f, w // f) for f in (1, 2, 4, 8, 16)}
    groups = {}
    for _, m in capture.maps:
        gh, gw = grids[m.shape[-1]]
        groups.setdefault(gh if gh == gw else (gh, gw), []).append(m[0].double().numpy())
    per_res = {s: np.mean(v, axis=0) for s, v in groups.items()}
    layers = [(n, m[0].double().numpy()) for n, m in capture.maps]
    return per_res, layers, eps[0].numpy()
