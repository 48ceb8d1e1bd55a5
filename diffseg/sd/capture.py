"""The capturing attention processor: self-attention that computes its
softmax probabilities explicitly (SDPA hides them) and accumulates their head
mean per resolution (or per layer). Installed on a diffusers UNet before
tracing or ``torch.export``, it makes the attention maps outputs of the
exported graph: libtorch cannot add hooks to a loaded module.

Export-friendly by construction: each processor knows its layer's name and
resolution level (from its place in the UNet, not from a tensor size) and
its head chunk (from the export's example size), so nothing is keyed by a
size that is symbolic under ``torch.export`` with dynamic height, width and
batch; the accumulation is out of place (no ``out=`` buffers, which a
compiler would copy)."""

# Head chunks whose score matrix, at the export's example size and batch 1,
# stays under this many bytes (a whole 64x64 layer of SD at 8 heads is 512 MiB).
SCORE_CHUNK_BYTES = 64 << 20


class _Sink:
    """Collects the head-averaged self-attention of one forward pass: the
    running sum per resolution level (mean over heads, then over the layers
    of that level), or each layer's head mean (``mode="all"``)."""

    def __init__(self, mode):
        self.mode = mode
        self.names = []       # (layer name, resolution) in execution order, while record_names
        self.record_names = False
        self.reset()

    def reset(self):
        self.sums = {}     # level -> running sum of per-layer head means
        self.counts = {}   # level -> number of layers summed
        self.layers = []   # per-layer head means (mode "all")

    def running(self, level):
        """What a layer of ``level`` adds its head mean to: the level's sum so
        far (None for its first layer, and always in mode "all")."""
        return None if self.mode == "all" else self.sums.get(level)

    def store(self, name, level, resolution, total):
        """Record a layer's result: ``total`` = :meth:`running` + its head mean."""
        if self.record_names:
            self.names.append((name, resolution))
        if self.mode == "all":
            self.layers.append(total)
        else:
            self.sums[level] = total
            self.counts[level] = self.counts.get(level, 0) + 1

    def maps(self):
        """The pass's outputs: per-level means, highest resolution (level 0)
        first, or the per-layer maps in execution order (mode "all")."""
        if self.mode == "all":
            return list(self.layers)
        return [self.sums[level] / float(self.counts[level]) for level in sorted(self.sums)]


class CaptureAttnProcessor:
    """Self-attention that computes its softmax probabilities explicitly
    (SDPA would hide them) and adds their head mean to a sink.

    Same arithmetic as diffusers' ``AttnProcessor`` (softmax over keys of
    q kᵀ · scale, then probabilities @ v), with the probabilities in float32
    whatever the model's dtype; heads are processed ``chunk`` at a time.
    """

    def __init__(self, sink, name, level, resolution, chunk):
        self.sink = sink
        self.name = name
        self.level = level
        self.resolution = resolution  # side of the layer's grid at the export's example size
        self.chunk = chunk

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 *args, **kwargs):
        import torch

        q, k, v, state = attention_inputs(attn, hidden_states, encoder_hidden_states, temb)
        batch, heads, n_q, head_dim = q.shape
        n_k = k.shape[2]
        mask = None
        if attention_mask is not None:
            mask = attn.prepare_attention_mask(attention_mask, n_k, batch)
            mask = mask.view(batch, heads, -1, mask.shape[-1]).float()

        # Scaling the (n, d) queries is cheaper than scaling the (n, n) scores.
        q = q.float() * attn.scale
        k_t = k.float().transpose(-1, -2)
        total = self.sink.running(self.level)
        inv_heads = 1.0 / heads
        outputs = []
        for h0 in range(0, heads, self.chunk):
            h1 = min(heads, h0 + self.chunk)
            c = h1 - h0
            scores = torch.bmm(q[:, h0:h1].reshape(batch * c, n_q, head_dim),
                               k_t[:, h0:h1].reshape(batch * c, head_dim, n_k))
            if mask is not None:
                scores = scores + mask[:, h0:h1].reshape(batch * c, -1, n_k)
            probs = torch.softmax(scores, dim=-1)
            out = torch.bmm(probs.to(v.dtype), v[:, h0:h1].reshape(batch * c, n_k, head_dim))
            outputs.append(out.view(batch, c, n_q, head_dim))
            head_sum = probs.view(batch, n_q, n_k) if c == 1 else probs.view(batch, c, n_q, n_k).sum(dim=1)
            total = head_sum * inv_heads if total is None else torch.add(total, head_sum, alpha=inv_heads)
        self.sink.store(self.name, self.level, self.resolution, total)
        out = outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=1)
        return attention_output(attn, out, state)


def attention_inputs(attn, hidden_states, encoder_hidden_states, temb):
    """Diffusers' ``AttnProcessor`` up to the per-head projections: spatial
    norm, ``(B, C, H, W) -> (B, HW, C)``, group norm, q from the hidden states
    and k, v from the context (the hidden states themselves for
    self-attention), split into heads, q/k norms. Returns ``(q, k, v, state)``,
    each ``(B, heads, n, head_dim)``; ``state`` is what :func:`attention_output` needs."""
    residual = hidden_states
    if attn.spatial_norm is not None:
        hidden_states = attn.spatial_norm(hidden_states, temb)
    image_shape = None
    if hidden_states.ndim == 4:
        batch, channel, height, width = hidden_states.shape
        image_shape = (batch, channel, height, width)
        hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2)
    batch = hidden_states.shape[0]
    if attn.group_norm is not None:
        hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

    query = attn.to_q(hidden_states)
    context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
    if encoder_hidden_states is not None and attn.norm_cross:
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
    return q, k, v, (residual, image_shape, query.dtype)


def attention_output(attn, out, state):
    """The rest of ``AttnProcessor`` after ``probabilities @ v`` (``out``:
    ``(B, heads, n, head_dim)``): merge heads, output projection and dropout,
    back to ``(B, C, H, W)``, residual, rescale."""
    residual, image_shape, dtype = state
    batch, heads, _, head_dim = out.shape
    hidden_states = out.transpose(1, 2).reshape(batch, -1, heads * head_dim).to(dtype)
    hidden_states = attn.to_out[0](hidden_states)
    hidden_states = attn.to_out[1](hidden_states)
    if image_shape is not None:
        hidden_states = hidden_states.transpose(-1, -2).reshape(*image_shape)
    if attn.residual_connection:
        hidden_states = hidden_states + residual
    return hidden_states / attn.rescale_output_factor


def layer_level(name, n_levels):
    """Resolution level of an attention layer from its place in the UNet:
    ``down_blocks.i`` -> i, ``up_blocks.j`` -> n_levels - 1 - j, the mid block
    -> n_levels - 1 (level 0 is the latent grid itself)."""
    parts = name.split(".")
    if parts[0] == "down_blocks" and len(parts) > 1 and parts[1].isdigit():
        return int(parts[1])
    if parts[0] == "up_blocks" and len(parts) > 1 and parts[1].isdigit():
        return n_levels - 1 - int(parts[1])
    if parts[0] == "mid_block":
        return n_levels - 1
    raise ValueError(f"attention layer {name!r} is in no down, mid or up block of the UNet")


def install_capture(unet, mode="per-resolution", latent_size=None):
    """Put a :class:`CaptureAttnProcessor` on every ``attn1`` of ``unet``
    (other layers keep their processors). ``latent_size``: the latent side of
    the export's example (default: the UNet's ``sample_size``), which sets
    each layer's head chunk. Returns the sink."""
    n_levels = len(unet.config.block_out_channels)
    if latent_size is None:
        latent_size = unet.config.sample_size
        latent_size = latent_size if isinstance(latent_size, int) else max(latent_size)
    modules = dict(unet.named_modules())
    sink = _Sink(mode)
    processors = {}
    for name, proc in unet.attn_processors.items():
        if ".attn1." in name:
            layer = name.rsplit(".processor", 1)[0]
            level = layer_level(layer, n_levels)
            side = max(1, latent_size >> level)
            heads = modules[layer].heads
            chunk = max(1, min(heads, SCORE_CHUNK_BYTES // (4 * side ** 4)))
            processors[name] = CaptureAttnProcessor(sink, layer, level, side, chunk)
        else:
            processors[name] = proc
    if not any(isinstance(p, CaptureAttnProcessor) for p in processors.values()):
        raise ValueError("the UNet has no self-attention (attn1) layers")
    unet.set_attn_processor(processors)
    return sink
