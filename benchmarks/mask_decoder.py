"""SAM's mask decoder at inference: the stock modules against ``mediround.model.mask_decoding``, side by side.

Run: ``python benchmarks/mask_decoder.py [--threads 1] [--masks 1 16] [--repeats 20]``.

Prints milliseconds per mask of the two-way transformer and of the upscaling with the hypernetwork's dot
product, stock and restructured, on the tiny preset's decoder (its decoder is SAM's full-size one: 256
channels, 8 heads, a 16x16 image embedding), the ratio, and the largest difference of their outputs.
The machine has 2 shared cores: compare ratios only.
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from mediround.model import build_model, preset
from mediround.model.mask_decoding import two_way_transformer, upscaled_mask


def per_mask_ms(function, masks: int, repeats: int) -> float:
    function()
    start = time.perf_counter()
    for _ in range(repeats):
        function()
    return (time.perf_counter() - start) / repeats / masks * 1000


def compare(decoder, positions: torch.Tensor, masks: int, repeats: int, generator: torch.Generator) -> None:
    """Print both parts' stock and restructured ms per mask for ``masks`` masks at once."""
    image = torch.randn(masks, 256, 16, 16, generator=generator)
    output_tokens = torch.cat([decoder.iou_token.weight, decoder.mask_tokens.weight]).unsqueeze(0)
    tokens = torch.cat([output_tokens.expand(masks, -1, -1), torch.randn(masks, 1, 256, generator=generator)], 1)
    hyper_in = torch.randn(masks, 32, generator=generator)
    raster = image.flatten(2).transpose(1, 2).contiguous()

    def stock_transformer():
        return decoder.transformer(image, positions.expand(masks, -1, -1, -1), tokens)

    def our_transformer():
        return two_way_transformer(decoder.transformer, image, positions, tokens)

    def stock_upscaling():
        return (hyper_in[:, None] @ decoder.output_upscaling(image).flatten(2)).view(masks, 1, 64, 64)

    def our_upscaling():
        return upscaled_mask(decoder, raster, (16, 16), hyper_in)

    with torch.no_grad():
        for part, stock_part, our_part in (("two-way transformer", stock_transformer, our_transformer),
                                           ("upscaling + hypernetwork", stock_upscaling, our_upscaling)):
            stock_out, our_out = stock_part(), our_part()
            pairs = zip(stock_out, our_out) if isinstance(stock_out, tuple) else [(stock_out, our_out)]
            difference = max(float((a - b).abs().max()) for a, b in pairs)
            stock = per_mask_ms(stock_part, masks, repeats)
            ours = per_mask_ms(our_part, masks, repeats)
            print(f"{masks:>3} mask(s), {part}: stock {stock:.2f} ms/mask, mask_decoding {ours:.2f} ms/mask, "
                  f"{stock / ours:.2f}x; largest difference {difference:.1e}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--masks", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"load average before: {os.getloadavg()[0]:.2f}; torch threads {args.threads}")
    sam = build_model(preset("tiny")).eval().sam
    generator = torch.Generator().manual_seed(0)
    for masks in args.masks:
        compare(sam.mask_decoder, sam.prompt_encoder.get_dense_pe(), masks, args.repeats, generator)
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
