"""SAM's mask decoder as ``mask_decoding`` computes it (inference) against the stock modules."""

from __future__ import annotations

import torch

from mediround.model.mask_decoding import two_way_transformer, upscaled_mask
from mediround.model.segmenter import decode_masks, decode_masks_per_image
from tests.model.model_fixtures import tiny_model


def _trained_looking(sam) -> None:
    """Random init leaves the decoder's attention biases small; give every weight and bias real values."""
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for parameter in sam.mask_decoder.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.05)


def test_two_way_transformer_matches_the_stock_forward():
    sam = tiny_model().sam
    _trained_looking(sam)
    transformer = sam.mask_decoder.transformer
    generator = torch.Generator().manual_seed(0)
    image = torch.randn(5, 256, 16, 16, generator=generator)
    tokens = torch.randn(5, 6, 256, generator=generator)
    positions = sam.prompt_encoder.get_dense_pe()
    with torch.no_grad():
        stock_tokens, stock_image = transformer(image, positions.expand(5, -1, -1, -1), tokens)
    folded_tokens, folded_image = two_way_transformer(transformer, image, positions, tokens)
    # Only the order of float additions differs (measured: about 1.5e-6 on values of magnitude 5).
    assert stock_image.abs().max() > 1
    assert torch.allclose(folded_tokens, stock_tokens, atol=1e-5, rtol=0)
    assert torch.allclose(folded_image, stock_image, atol=1e-5, rtol=0)


def test_per_image_decoding_matches_sams_mask_decoder_pair_by_pair():
    sam = tiny_model().sam
    _trained_looking(sam)
    generator = torch.Generator().manual_seed(1)
    embeddings = torch.randn(3, 256, 16, 16, generator=generator)
    prompts = torch.randn(3, 256, generator=generator)
    batched = decode_masks_per_image(sam, embeddings, prompts)
    with torch.no_grad():
        alone = torch.cat([decode_masks(sam, embeddings[i : i + 1], prompts[i : i + 1]) for i in range(3)])
    assert batched.shape == alone.shape == (3, 1, 64, 64)
    assert (alone > 0).any() and (alone < 0).any()
    assert torch.allclose(batched, alone, atol=1e-4, rtol=0)
    assert torch.equal(batched > 0, alone > 0)


def test_upscaled_mask_matches_the_stock_upscaling_and_hypernetwork_product():
    sam = tiny_model().sam
    _trained_looking(sam)
    decoder = sam.mask_decoder
    generator = torch.Generator().manual_seed(2)
    image = torch.randn(4, 256, 8, 12, generator=generator)  # not square: rows and columns cannot swap unseen
    hyper_in = torch.randn(4, 32, generator=generator)
    with torch.no_grad():
        upscaled = decoder.output_upscaling(image)
        stock = (hyper_in[:, None] @ upscaled.flatten(2)).view(4, 1, 32, 48)
    ours = upscaled_mask(decoder, image.flatten(2).transpose(1, 2), (8, 12), hyper_in)
    assert ours.shape == stock.shape
    assert stock.abs().max() > 1
    assert torch.allclose(ours, stock, atol=1e-5, rtol=0)
