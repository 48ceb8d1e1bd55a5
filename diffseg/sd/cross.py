"""Cross-attention capture and the prompt-conditioned parts of a bundle
(``export_bundle(..., cross_attention=True)``).

:class:`CrossCaptureProcessor` replaces the processor of every ``attn2``
(cross-attention: image queries, prompt-token keys) of a diffusers UNet. While
its sink is enabled it computes the softmax probabilities explicitly (SDPA
hides them) and adds their head mean to the sink; while disabled it calls the
layer's original processor, so a graph traced with the sink disabled is the
plain UNet (the bundle's ``denoise`` keeps its speed).

Layer averaging: the mean over the cross-attention layers of each resolution.
The official KerasCV model (google/diffseg ``third_party/keras_cv/
diffusion_model.py``, read, not copied) divides the 64x64 layers
inconsistently -- down-block layers by 5, up-block layers by 3, a sum with
weights 1.4 in all -- while 32 and 16 use /5 throughout (a mean) and 8 is
one layer. This package takes the mean at every resolution: the official
weighting is most likely a slip, and the per-pixel token normalisation of
:func:`diffseg.semantic.aggregate_cross_attention` removes only a common
scale, not the relative weight of up- and down-block layers.

Shape polymorphism: the sink is keyed by the query length ``n`` (a Python
int used only as a dictionary key while tracing) and accumulates with
out-of-place tensor additions (no tensor constructor takes a size read from a
shape), so one traced graph serves any latent grid and batch size.
"""
from .capture import attention_inputs, attention_output


class CrossSink:
    """Collects the head-averaged cross-attention of one forward pass:
    ``(batch, n, T)`` per query length ``n``, mean over the layers of that
    length."""

    def __init__(self):
        self.enabled = False
        self.reset()

    def reset(self):
        self.sums = {}    # n -> sum over layers of per-layer head means
        self.counts = {}  # n -> number of layers summed

    def add(self, head_mean):
        # int(): under tracing a size is a tensor, hashed by identity (a dictionary key only).
        n = int(head_mean.shape[1])
        if n in self.sums:
            self.sums[n] = self.sums[n] + head_mean
            self.counts[n] += 1
        else:
            self.sums[n] = head_mean
            self.counts[n] = 1

    def means(self):
        """Per-resolution layer means, highest resolution (largest ``n``) first."""
        return [self.sums[n] / float(self.counts[n]) for n in sorted(self.sums, reverse=True)]


class CrossCaptureProcessor:
    """Cross-attention with explicit softmax probabilities (float32), their
    head mean added to a :class:`CrossSink`; the same arithmetic as
    diffusers' ``AttnProcessor`` (softmax over keys of q kᵀ · scale, then
    probabilities @ v). With the sink disabled, the original processor runs."""

    def __init__(self, sink, original):
        self.sink = sink
        self.original = original

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 *args, **kwargs):
        if not self.sink.enabled or encoder_hidden_states is None:
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
        import torch

        q, k, v, state = attention_inputs(attn, hidden_states, encoder_hidden_states, temb)
        batch, heads = q.shape[:2]
        # (batch, heads, n, T); the cross score matrices are small (T = 77 keys): no chunking.
        scores = torch.matmul(q.float() * attn.scale, k.float().transpose(-1, -2))
        if attention_mask is not None:
            mask = attn.prepare_attention_mask(attention_mask, k.shape[2], batch)
            scores = scores + mask.view(batch, heads, -1, mask.shape[-1]).float()
        probs = torch.softmax(scores, dim=-1)
        self.sink.add(probs.mean(dim=1))
        return attention_output(attn, torch.matmul(probs.to(v.dtype), v), state)


def install_cross_capture(unet):
    """Put a :class:`CrossCaptureProcessor` on every ``attn2`` of ``unet``,
    wrapping its current processor (call after the self-attention capture is
    installed). Returns the sink (disabled)."""
    sink = CrossSink()
    processors = {}
    for name, proc in unet.attn_processors.items():
        processors[name] = CrossCaptureProcessor(sink, proc) if ".attn2." in name else proc
    if not any(isinstance(p, CrossCaptureProcessor) for p in processors.values()):
        raise ValueError("the UNet has no cross-attention (attn2) layers")
    unet.set_attn_processor(processors)
    return sink


# Extra files of a bundle that hold the tokenizer (``<archive>/extra/<name>``).
TOKENIZER_PREFIX = "tokenizer."
TEXT_TOKENS = 77


def prompt_modules(pipe, sink, cross_sink):
    """The eager modules behind a bundle's prompt methods (traced by the export):

    * text encoder: ``(B, 77) int64 token ids -> (B, 77, D) float32``, the
      checkpoint's text encoder as diffusers' ``encode_prompt`` runs it for SD
      (last hidden state, no attention mask);
    * prompt UNet: ``(latent, t, context) -> (eps, self maps..., cross maps...)``
      from one conditional pass: the self-attention maps as the bundle's
      ``denoise`` (per resolution, or per layer with ``mode="all"``), then the
      cross-attention ``(B, n, 77)`` per resolution, highest first.
    """
    import torch

    class TextEncoder(torch.nn.Module):
        def __init__(self, text_encoder):
            super().__init__()
            self.text_encoder = text_encoder

        def forward(self, ids):
            return self.text_encoder(ids, return_dict=False)[0].float()

    class PromptUNet(torch.nn.Module):
        def __init__(self, unet):
            super().__init__()
            self.unet = unet

        def forward(self, latent, t, context):
            sink.reset()
            cross_sink.reset()
            cross_sink.enabled = True
            try:
                eps = self.unet(latent.to(self.unet.dtype), t, encoder_hidden_states=context.to(self.unet.dtype),
                                return_dict=False)[0]
            finally:
                cross_sink.enabled = False
            maps = sink.maps()
            cross = cross_sink.means()
            sink.reset()
            cross_sink.reset()
            return tuple([eps.float()] + [m.float() for m in maps] + [c.float() for c in cross])

    return TextEncoder(pipe.text_encoder), PromptUNet(pipe.unet)


def tokenizer_files(tokenizer):
    """``{extra file name: text}``: the tokenizer's files (``save_pretrained``),
    to store in the bundle zip so that the bundle stays one file."""
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        return {TOKENIZER_PREFIX + p.name: p.read_text(encoding="utf-8")
                for p in sorted(Path(tmp).iterdir()) if p.is_file()}


def load_tokenizer(bundle_path):
    """The CLIP tokenizer stored in a bundle (read from its zip, no torch);
    needs transformers. ValueError when the bundle holds no tokenizer."""
    import tempfile
    import zipfile
    from pathlib import Path

    try:
        from transformers import CLIPTokenizer
    except ImportError as e:
        raise ImportError(f"prompts need transformers to tokenize: pip install transformers ({e})") from None
    marker = "/extra/" + TOKENIZER_PREFIX
    with zipfile.ZipFile(bundle_path) as z, tempfile.TemporaryDirectory() as tmp:
        infos = [i for i in z.infolist() if marker in i.filename]
        if not infos:
            raise ValueError(f"{bundle_path} holds no tokenizer: export it again with --cross-attention")
        for info in infos:
            name = info.filename.split(marker, 1)[1]
            if not name or "/" in name or name.startswith("."):
                raise ValueError(f"{bundle_path}: bad tokenizer file name {info.filename!r}")
            Path(tmp, name).write_bytes(z.read(info))
        return CLIPTokenizer.from_pretrained(tmp, local_files_only=True)


def tokenize(tokenizer, prompt):
    """``(ids (1, 77) int64, tokens: 77 strings)`` of ``prompt``, padded to
    77 tokens and truncated as diffusers' ``encode_prompt`` does."""
    import numpy as np

    if not isinstance(prompt, str):
        raise TypeError(f"prompt must be a string, got {type(prompt).__name__}")
    ids = tokenizer(prompt, padding="max_length", max_length=TEXT_TOKENS, truncation=True).input_ids
    return np.asarray([ids], dtype=np.int64), tokenizer.convert_ids_to_tokens(ids)
