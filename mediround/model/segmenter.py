"""The segmentation backbone: stock ``segment_anything.modeling`` SAM (tiny, ViT-B/L/H); its input frame is
``mediround.model.frame``.

The [SEG] features are the sparse prompts of SAM's mask decoder (no point or box prompt, the prompt
encoder's no-mask dense embedding), one image embedding per decoder call, single-mask output.
"""

from __future__ import annotations

import importlib
import pickle
import sys
import types
from functools import partial
from pathlib import Path

import torch
from torch import nn

from mediround.errors import CheckpointError
from mediround.model.config import SegmenterConfig
from mediround.model.frame import SAM_MEAN, SAM_STD
from mediround.model.load_report import LoadReport, load_into
from mediround.model.mask_decoding import two_way_transformer, upscaled_mask
from mediround.model.weight_sources import missing_path_detail

PROMPT_DIM = 256
VIT_LAYOUTS = {
    "vit_b": {"embed_dim": 768, "depth": 12, "num_heads": 12, "global_attn_indexes": (2, 5, 8, 11)},
    "vit_l": {"embed_dim": 1024, "depth": 24, "num_heads": 16, "global_attn_indexes": (5, 11, 17, 23)},
    "vit_h": {"embed_dim": 1280, "depth": 32, "num_heads": 16, "global_attn_indexes": (7, 15, 23, 31)},
}


def sam_modeling() -> types.ModuleType:
    """``segment_anything.modeling`` without running the package ``__init__`` when torchvision is broken.

    The package ``__init__`` imports the predictor, which imports torchvision; a CUDA torchvision beside a
    CPU torch fails at import. The model classes need no torchvision, so a bare package module pointing at
    the installed folder lets the submodule import alone.
    """
    try:
        return importlib.import_module("segment_anything.modeling")
    except (ImportError, RuntimeError, AttributeError):
        spec = importlib.util.find_spec("segment_anything")
        if spec is None or not spec.submodule_search_locations:
            raise
        for name in [n for n in sys.modules if n == "segment_anything" or n.startswith("segment_anything.")]:
            del sys.modules[name]
        package = types.ModuleType("segment_anything")
        package.__path__ = list(spec.submodule_search_locations)
        sys.modules["segment_anything"] = package
        return importlib.import_module("segment_anything.modeling")


def build_sam(config: SegmenterConfig, device: str | torch.device = "cpu") -> nn.Module:
    """A SAM of the configured layout, randomly initialised (seeded), on ``device``."""
    modeling = sam_modeling()
    size = config.image_size
    if config.variant == "tiny":
        patch = config.tiny_patch_size
        layout = {
            "embed_dim": config.tiny_width,
            "depth": config.tiny_depth,
            "num_heads": config.tiny_heads,
            "global_attn_indexes": (config.tiny_depth - 1,),
        }
        window = config.tiny_window
    else:
        patch, layout, window = 16, VIT_LAYOUTS[config.variant], 14
    grid = size // patch
    with torch.device(device):
        torch.manual_seed(config.seed)
        return modeling.Sam(
            image_encoder=modeling.ImageEncoderViT(
                img_size=size,
                patch_size=patch,
                mlp_ratio=4,
                norm_layer=partial(nn.LayerNorm, eps=1e-6),
                qkv_bias=True,
                use_rel_pos=True,
                window_size=window,
                out_chans=PROMPT_DIM,
                **layout,
            ),
            prompt_encoder=modeling.PromptEncoder(
                embed_dim=PROMPT_DIM,
                image_embedding_size=(grid, grid),
                input_image_size=(size, size),
                mask_in_chans=16,
            ),
            mask_decoder=modeling.MaskDecoder(
                num_multimask_outputs=3,
                transformer=modeling.TwoWayTransformer(
                    depth=2, embedding_dim=PROMPT_DIM, mlp_dim=config.decoder_mlp_dim, num_heads=8
                ),
                transformer_dim=PROMPT_DIM,
                iou_head_depth=3,
                iou_head_hidden_dim=256,
            ),
            pixel_mean=list(SAM_MEAN),
            pixel_std=list(SAM_STD),
        )


def read_sam_state(path: str | Path) -> dict[str, torch.Tensor]:
    """A SAM/MedSAM ``.pth`` state dict, read with ``weights_only=True`` (no pickle code runs)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(missing_path_detail(str(path), "SAM checkpoint"))
    try:
        state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, ValueError, OSError, EOFError) as error:
        raise CheckpointError(f"{path}: refused to load SAM weights (weights_only=True): {error}") from None
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: not a plain state dict of tensors")
    return state


def load_sam(
    config: SegmenterConfig, device: str | torch.device = "cpu", allow_partial: bool = False
) -> tuple[nn.Module, LoadReport | None]:
    """Build SAM and, when ``config.checkpoint`` is set, load it. Strict loads build on meta and assign the
    file's tensors (low peak memory); ``allow_partial`` builds a random model first, so whatever the file
    lacks stays at its (reported) random initialisation."""
    if config.checkpoint is None or torch.device(device).type == "meta":
        return build_sam(config, device), None
    state = read_sam_state(config.checkpoint)
    if allow_partial:
        sam = build_sam(config, "cpu")
        return sam.to(device), load_into(sam, state, config.checkpoint, allow_partial=True)
    sam = build_sam(config, "meta")
    report = load_into(sam, state, config.checkpoint, assign=True)
    return sam.to(device), report


def decode_masks(sam: nn.Module, embedding: torch.Tensor, prompts: torch.Tensor) -> torch.Tensor:
    """One image embedding (1, 256, g, g) and n prompts (n, 256) -> low-res logits (n, 1, 4g, 4g)."""
    sparse = prompts[:, None, :].to(embedding.dtype)
    dense = sam.prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(
        prompts.shape[0], -1, *embedding.shape[-2:]
    )
    # The positional encoding is computed in fp32; under DeepSpeed's bf16 the decoder's weights are bf16.
    decoder_dtype = next(sam.mask_decoder.parameters()).dtype
    logits, _ = sam.mask_decoder(
        image_embeddings=embedding,
        image_pe=sam.prompt_encoder.get_dense_pe().to(decoder_dtype),
        sparse_prompt_embeddings=sparse,
        dense_prompt_embeddings=dense,
        multimask_output=False,
    )
    return logits


@torch.no_grad()
def decode_masks_per_image(sam: nn.Module, embeddings: torch.Tensor, prompts: torch.Tensor) -> torch.Tensor:
    """n image embeddings (n, 256, g, g) with one prompt each (n, 256) -> low-res logits (n, 1, 4g, 4g) in
    one pass: ``decode_masks`` of each pair, for inference (no gradients). SAM's ``MaskDecoder.predict_masks``
    repeats a single image embedding for all its prompts, so its steps are run here with the i-th embedding
    for the i-th prompt, computing only the first mask (the one ``multimask_output=False`` keeps), and the
    decoder's transformer and upscaling are computed as ``mask_decoding`` does."""
    decoder = sam.mask_decoder
    count = prompts.shape[0]
    output_tokens = torch.cat([decoder.iou_token.weight, decoder.mask_tokens.weight]).unsqueeze(0)
    tokens = torch.cat((output_tokens.expand(count, -1, -1), prompts[:, None, :].to(embeddings.dtype)), dim=1)
    src = embeddings + sam.prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1)
    positions = sam.prompt_encoder.get_dense_pe().to(output_tokens.dtype)  # fp32; bf16 under DeepSpeed's bf16
    hidden, image = two_way_transformer(decoder.transformer, src, positions, tokens)
    return upscaled_mask(decoder, image, src.shape[-2:], decoder.output_hypernetworks_mlps[0](hidden[:, 1]))
