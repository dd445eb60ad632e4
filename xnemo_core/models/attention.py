"""Attention kernels and the diffusers attention processors X-NeMo needs.

Why processors: the SD spatial blocks come from diffusers unchanged (so official keys load as-is);
X-NeMo's changes to them are all inside attention: attn1 of the reference UNet records its input
(the "bank"), attn1 of the denoiser also attends to the recorded reference tokens, and attn2 sees a
single CLIP token, whose softmax is identically 1, so it reduces to to_out(to_v(e)).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def multihead_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """Scaled dot-product attention on [N, L, C] projections split into `heads` heads (SDPA kernel)."""
    n, lq, c = q.shape
    d = c // heads
    q = q.reshape(n, lq, heads, d).transpose(1, 2)
    k = k.reshape(n, k.shape[1], heads, d).transpose(1, 2)
    v = v.reshape(n, v.shape[1], heads, d).transpose(1, 2)
    out = F.scaled_dot_product_attention(q, k, v)
    return out.transpose(1, 2).reshape(n, lq, c)


def _finish(attn, out: torch.Tensor) -> torch.Tensor:
    """The output projection and dropout of a diffusers Attention (SD attention has no residual/rescale)."""
    out = attn.to_out[0](out)
    return attn.to_out[1](out)


class SelfAttentionProcessor:
    """Plain self-attention for a diffusers `Attention` (SD attn1 without reference)."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        out = multihead_attention(attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context), attn.heads)
        return _finish(attn, out)


class SingleTokenCrossAttentionProcessor:
    """attn2 over a single conditioning token: softmax over one key is 1, so every query gets to_v(e).

    Skips Q, K and the softmax entirely; falls back to full attention for longer contexts.
    """

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        if encoder_hidden_states is None or encoder_hidden_states.shape[1] != 1:
            return SelfAttentionProcessor()(attn, hidden_states, encoder_hidden_states)
        value = _finish(attn, attn.to_v(encoder_hidden_states))  # [N, 1, C]
        return value.expand(-1, hidden_states.shape[1], -1)


class ReferenceRecorder:
    """Holds what the reference UNet's attn1 layers saw during one write pass, by block name."""

    def __init__(self):
        self.tokens: dict[str, torch.Tensor] = {}
        self.recording = False


class ReferenceWriteProcessor:
    """attn1 of the reference UNet: store the norm1 tokens (the processor's input), then self-attend."""

    def __init__(self, recorder: ReferenceRecorder, name: str):
        self.recorder = recorder
        self.name = name

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        if self.recorder.recording:
            self.recorder.tokens[self.name] = hidden_states
        return SelfAttentionProcessor()(attn, hidden_states)


class ReferenceReadContext:
    """Per-call state shared by the denoiser's attn1 processors.

    `kv[name]` = (K_ref, V_ref) [R, L_ref, C], projected once per bank with the reader's own weights.
    `row_reference` [N] gives for each of the N = B*F rows which reference row it reads (-1 = none).
    """

    def __init__(self):
        self.kv: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None
        self.row_reference: torch.Tensor | None = None


class ReferenceReadProcessor:
    """attn1 of the denoiser: keys/values are [own tokens || reference tokens] on rows that read one.

    Rows without a reference (the CFG-unconditional branch) compute plain self-attention only, so
    no work is spent on reference attention that would be discarded.
    """

    def __init__(self, context: ReferenceReadContext, name: str):
        self.context = context
        self.name = name

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        ctx = self.context
        q = attn.to_q(hidden_states)
        k = attn.to_k(hidden_states)
        v = attn.to_v(hidden_states)
        if ctx.kv is None or self.name not in ctx.kv or ctx.row_reference is None:
            return _finish(attn, multihead_attention(q, k, v, attn.heads))
        k_ref, v_ref = ctx.kv[self.name]
        rows = ctx.row_reference.to(hidden_states.device)
        with_ref = rows >= 0
        if bool(with_ref.all()):
            sel = rows
            return _finish(attn, self._with_reference(attn, q, k, v, k_ref[sel], v_ref[sel]))
        out = torch.empty_like(q)
        plain = ~with_ref
        if bool(plain.any()):
            out[plain] = multihead_attention(q[plain], k[plain], v[plain], attn.heads)
        if bool(with_ref.any()):
            sel = rows[with_ref]
            out[with_ref] = self._with_reference(attn, q[with_ref], k[with_ref], v[with_ref], k_ref[sel], v_ref[sel])
        return _finish(attn, out)

    @staticmethod
    def _with_reference(attn, q, k, v, k_ref, v_ref):
        k = torch.cat([k, k_ref.to(k.dtype)], dim=1)
        v = torch.cat([v, v_ref.to(v.dtype)], dim=1)
        return multihead_attention(q, k, v, attn.heads)
