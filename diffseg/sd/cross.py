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
        n = head_mean.shape[1]
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

        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2)
        batch = hidden_states.shape[0]
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        context = encoder_hidden_states
        if attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        key = attn.to_k(context)
        value = attn.to_v(context)

        heads = attn.heads
        head_dim = key.shape[-1] // heads
        q = query.view(batch, -1, heads, head_dim).transpose(1, 2)
        k = key.view(batch, -1, heads, head_dim).transpose(1, 2)
        v = value.view(batch, -1, heads, head_dim).transpose(1, 2)
        if getattr(attn, "norm_q", None) is not None:
            q = attn.norm_q(q)
        if getattr(attn, "norm_k", None) is not None:
            k = attn.norm_k(k)
        # (batch, heads, n, T); the cross score matrices are small (T = 77 keys): no chunking.
        scores = torch.matmul(q.float() * attn.scale, k.float().transpose(-1, -2))
        if attention_mask is not None:
            mask = attn.prepare_attention_mask(attention_mask, k.shape[2], batch)
            scores = scores + mask.view(batch, heads, -1, mask.shape[-1]).float()
        probs = torch.softmax(scores, dim=-1)
        self.sink.add(probs.mean(dim=1))
        out = torch.matmul(probs.to(v.dtype), v)

        hidden_states = out.transpose(1, 2).reshape(batch, -1, heads * head_dim).to(query.dtype)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


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
