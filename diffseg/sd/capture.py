"""The capturing attention processor: self-attention that computes its
softmax probabilities explicitly (SDPA hides them) and accumulates their head
mean per resolution (or per layer). Installed on a diffusers UNet before
tracing, it makes the attention maps outputs of the exported graph: libtorch
cannot add hooks to a loaded TorchScript module."""
import math

# Head chunks whose score matrix stays under this many bytes (memory bound of
# the explicit attention: a whole 64x64 layer of SD at 8 heads is 512 MiB).
SCORE_CHUNK_BYTES = 64 << 20


class _Sink:
    """Collects the head-averaged self-attention of one forward pass.

    Probabilities are accumulated in place into one buffer per resolution
    (mean over heads, then over layers) or per layer (``mode="all"``); one
    score buffer per shape is reused by every layer and head. Under tracing
    these become in-place ops on a few tensors of the graph, so a pass
    allocates no (n, n) matrix per head (page-faulting fresh 64 MiB buffers
    40 times is a measurable part of the attention cost on CPU).
    """

    def __init__(self, mode):
        self.mode = mode
        self.names = []       # (layer name, resolution) in execution order, while record_names
        self.record_names = False
        self.reset()

    def reset(self):
        self.sums = {}     # resolution -> running sum of per-layer head means
        self.counts = {}   # resolution -> number of layers summed
        self.layers = []   # per-layer head means (mode "all")
        self.buffers = {}  # shape -> reusable score buffer

    def accumulator(self, name, batch, n, like):
        """The (batch, n, n) float32 tensor that this layer's head mean is added to."""
        import torch

        side = math.isqrt(n)
        if self.record_names:
            self.names.append((name, side))
        if self.mode == "all":
            acc = torch.zeros(batch, n, n, dtype=torch.float32, device=like.device)
            self.layers.append(acc)
            return acc
        if side not in self.sums:
            self.sums[side] = torch.zeros(batch, n, n, dtype=torch.float32, device=like.device)
            self.counts[side] = 0
        self.counts[side] += 1
        return self.sums[side]

    def buffer(self, rows, n_q, n_k, like):
        import torch

        key = (rows, n_q, n_k)
        if key not in self.buffers:
            self.buffers[key] = torch.empty(rows, n_q, n_k, dtype=torch.float32, device=like.device)
        return self.buffers[key]

    def means(self, resolutions):
        """Per-resolution means over layers (mode "per-resolution")."""
        return [self.sums[s].div_(float(self.counts[s])) for s in resolutions]


class CaptureAttnProcessor:
    """Self-attention that computes its softmax probabilities explicitly
    (SDPA would hide them) and adds their head mean to a sink.

    Same arithmetic as diffusers' ``AttnProcessor`` (softmax over keys of
    q kᵀ · scale, then probabilities @ v), with the probabilities in float32;
    heads are processed in chunks whose score matrix stays under
    ``SCORE_CHUNK_BYTES``.
    """

    def __init__(self, sink, name):
        self.sink = sink
        self.name = name

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

        chunk = max(1, min(heads, SCORE_CHUNK_BYTES // max(1, 4 * batch * n_q * n_k)))
        # Scaling the (n, d) queries is cheaper than scaling the (n, n) scores.
        q = (q.float() * attn.scale).contiguous()
        k_t = k.float().transpose(-1, -2).contiguous()
        v = v.contiguous()
        acc = self.sink.accumulator(self.name, batch, n_q, q)
        buf = self.sink.buffer(batch * chunk, n_q, n_k, q)
        outputs = []
        for h0 in range(0, heads, chunk):
            h1 = min(heads, h0 + chunk)
            c = h1 - h0
            scores = buf[: batch * c]
            torch.bmm(q[:, h0:h1].reshape(batch * c, n_q, head_dim),
                      k_t[:, h0:h1].reshape(batch * c, head_dim, n_k), out=scores)
            if mask is not None:
                scores.add_(mask[:, h0:h1].reshape(batch * c, -1, n_k))
            torch.ops.aten._softmax.out(scores, -1, False, out=scores)  # in place, row by row
            out = torch.bmm(scores.to(v.dtype), v[:, h0:h1].reshape(batch * c, n_k, head_dim))
            outputs.append(out.view(batch, c, n_q, head_dim))
            head_sum = scores.view(batch, n_q, n_k) if c == 1 else scores.view(batch, c, n_q, n_k).sum(dim=1)
            acc.add_(head_sum, alpha=1.0 / heads)

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


def install_capture(unet, mode="per-resolution"):
    """Put a :class:`CaptureAttnProcessor` on every ``attn1`` of ``unet``
    (other layers keep their processors). Returns the sink."""
    sink = _Sink(mode)
    processors = {}
    for name, proc in unet.attn_processors.items():
        if ".attn1." in name:
            processors[name] = CaptureAttnProcessor(sink, name.rsplit(".processor", 1)[0])
        else:
            processors[name] = proc
    if not any(isinstance(p, CaptureAttnProcessor) for p in processors.values()):
        raise ValueError("the UNet has no self-attention (attn1) layers")
    unet.set_attn_processor(processors)
    return sink
