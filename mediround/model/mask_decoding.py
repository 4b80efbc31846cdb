"""SAM's mask decoder at inference: the same function of the same weights, computed with fewer operations.

Two parts of ``MaskDecoder.predict_masks`` take most of its time on CPU (docs/inference.md), and both are
recomputed here (``segmenter.decode_masks_per_image`` calls them; training keeps the stock modules, which
need gradients):

**The two-way transformer, through the few tokens** (``two_way_transformer``). The decoder attends between
a handful of tokens (the IoU token, 4 mask tokens, one [SEG] prompt: T = 6) and every position of the image
embedding (P = 256 on the tiny preset, 4,096 with ViT-B at 1024 px), and projects the image side to the
attention width in every cross-attention: 10 (P x 256) @ (256 x 128) products per mask. Attention is linear
in its projections, so each of those products can be taken through the T tokens instead (H heads of width d):

- tokens -> image: head h's scores ``q_h (K W_k,h^T + b_k,h)^T`` are ``(q_h W_k,h) K^T`` plus a term
  constant along the keys, which softmax ignores; its output ``A_h (V W_v,h^T + b_v,h)`` is
  ``(A_h V) W_v,h^T + b_v,h`` because each row of ``A_h`` sums to 1. The image is multiplied by
  (H*T x 256) matrices instead of being projected.
- image -> tokens: the scores ``(K W_q,h^T + b_q,h) k_h^T`` are ``K (W_q,h^T k_h^T) + b_q,h k_h^T``, and the
  output projection ``sum_h A_h v_h W_o,h^T + b_o`` is ``A (stacked v_h W_o,h^T)`` with ``b_o / H`` folded
  into its rows (the H heads' weights of a row sum to H), added onto the image in place in one ``baddbmm_``.

**The upscaling, as matrix products on the pixels** (``upscaled_mask``). SAM upscales the image tokens
4x with two transposed convolutions whose kernel equals their stride (2): each input pixel becomes its
own 2x2 block, a (channels_in x 4 channels_out) matrix product per pixel. Kept in the layout those
products give (pixel, sub-pixel, channel), LayerNorm2d is one fused ``layer_norm`` over the last axis, the
hypernetwork's dot product over the 32 output channels comes before any reordering, and only the final
(4g x 4g) mask is put in raster order.

The result differs from SAM's modules only by the order of float additions (about 1e-6 on outputs of
magnitude 5; tests/model/test_mask_decoding.py compares both).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def _through_tokens(token_projection: nn.Linear, image_weight: torch.Tensor, tokens: torch.Tensor,
                    heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, T, C) tokens projected per head, (n, T, H, d), and carried through the image side's projection
    weight (H*d, C): the (n, H*T, C) matrix the image is multiplied with instead of being projected."""
    count, length, _ = tokens.shape
    projected = token_projection(tokens).view(count, length, heads, -1)
    weight = image_weight.view(heads, projected.shape[-1], -1)
    return projected, torch.einsum("nthd,hdc->nhtc", projected, weight).reshape(count, heads * length, -1)


def tokens_to_image(attention: nn.Module, queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """``attention(q=queries, k=keys, v=values)`` for (n, T, C) queries and (n, P, C) keys/values."""
    heads = attention.num_heads
    width = attention.internal_dim // heads
    count, tokens, _ = queries.shape
    _, through_keys = _through_tokens(attention.q_proj, attention.k_proj.weight, queries, heads)
    weights = torch.softmax(through_keys @ keys.transpose(1, 2) / math.sqrt(width), dim=-1)
    value_weight = attention.v_proj.weight.view(heads, width, -1)
    mixed = torch.einsum("nhtc,hdc->nthd", (weights @ values).view(count, heads, tokens, -1), value_weight)
    mixed = mixed + attention.v_proj.bias.view(heads, width)
    return attention.out_proj(mixed.reshape(count, tokens, heads * width))


def add_image_to_tokens_(attention: nn.Module, image: torch.Tensor, queries: torch.Tensor,
                         keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """``image += attention(q=queries, k=keys, v=values)`` in place, for (n, P, C) queries and (n, T, C)
    keys/values; returns ``image``.

    The scores are laid out (n, H, T, P) and normalised over T there: softmax over a last dimension of 6
    is about 20x slower on CPU than over a middle one (docs/inference.md)."""
    heads = attention.num_heads
    width = attention.internal_dim // heads
    count, tokens, _ = keys.shape
    projected_keys, through_keys = _through_tokens(attention.k_proj, attention.q_proj.weight, keys, heads)
    bias = torch.einsum("nthd,hd->nht", projected_keys, attention.q_proj.bias.view(heads, width))
    scores = (through_keys @ queries.transpose(1, 2)).view(count, heads, tokens, -1) + bias[..., None]
    weights = torch.softmax(scores / math.sqrt(width), dim=2).view(count, heads * tokens, -1)
    projected_values = attention.v_proj(values).view(count, tokens, heads, width)
    output_weight = attention.out_proj.weight.view(-1, heads, width)
    through_output = torch.einsum("nthd,chd->nhtc", projected_values, output_weight).reshape(count, heads * tokens, -1)
    through_output = through_output + attention.out_proj.bias / heads
    return image.baddbmm_(weights.transpose(1, 2), through_output)


@torch.no_grad()
def two_way_transformer(transformer: nn.Module, image: torch.Tensor, image_pe: torch.Tensor,
                        tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``TwoWayTransformer.forward(image, image_pe, tokens)``: (n, C, h, w) image and positional encoding
    (the encoding may have batch 1), (n, T, C) tokens -> (n, T, C) tokens, (n, h*w, C) image."""
    # A copy of our own: the image-to-token attention adds onto it in place.
    keys = image.flatten(2).transpose(1, 2).contiguous()
    positions = image_pe.flatten(2).transpose(1, 2)
    queries = tokens
    for layer in transformer.layers:
        if layer.skip_first_layer_pe:
            queries = layer.self_attn(q=queries, k=queries, v=queries)
        else:
            with_pe = queries + tokens
            queries = queries + layer.self_attn(q=with_pe, k=with_pe, v=queries)
        queries = layer.norm1(queries)
        # Both cross-attentions of a block see the image before the block changes it.
        keys_with_pe = keys + positions
        queries = layer.norm2(queries + tokens_to_image(layer.cross_attn_token_to_image, queries + tokens,
                                                        keys_with_pe, keys))
        queries = layer.norm3(queries + layer.mlp(queries))
        keys = layer.norm4(add_image_to_tokens_(layer.cross_attn_image_to_token, keys, keys_with_pe,
                                                queries + tokens, queries))
    final = tokens_to_image(transformer.final_attn_token_to_image, queries + tokens, keys + positions, keys)
    return transformer.norm_final_attn(queries + final), keys


@torch.no_grad()
def upscaled_mask(decoder: nn.Module, image: torch.Tensor, grid: tuple[int, int], hyper_in: torch.Tensor) -> torch.Tensor:
    """``(hyper_in @ decoder.output_upscaling(image)).view(n, 1, 4h, 4w)``: (n, h*w, C) image tokens in raster
    order (the transformer's output), (n, 32) hypernetwork outputs -> (n, 1, 4h, 4w) mask logits."""
    first, norm, first_activation, second, second_activation = decoder.output_upscaling
    count = image.shape[0]
    height, width = grid
    # ConvTranspose2d weights are (in, out, 2, 2); as matrices (in, 2 * 2 * out), sub-pixel before channel.
    first_weight = first.weight.permute(0, 2, 3, 1).reshape(first.in_channels, -1)
    blocks = torch.addmm(first.bias.repeat(4), image.reshape(-1, first.in_channels), first_weight)
    blocks = blocks.view(-1, first.out_channels)
    blocks = first_activation(F.layer_norm(blocks, (first.out_channels,), norm.weight, norm.bias, norm.eps))
    second_weight = second.weight.permute(0, 2, 3, 1).reshape(second.in_channels, -1)
    pixels = second_activation(torch.addmm(second.bias.repeat(4), blocks, second_weight))
    # (n, h, w, k, l, k2, l2, 32) channels dotted with each mask's hypernetwork vector.
    logits = pixels.view(count, -1, second.out_channels) @ hyper_in[:, :, None]
    logits = logits.view(count, height, width, 2, 2, 2, 2).permute(0, 1, 3, 5, 2, 4, 6)
    return logits.reshape(count, 1, 4 * height, 4 * width)
