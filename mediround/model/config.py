"""One dataclass tree that describes a MediRound model, its trainability, losses and precision.

Every component is built from this config and nothing else, so a checkpoint's ``config.json`` is enough
to rebuild the model. ``MediRoundConfig.to_dict``/``from_dict`` round-trip through JSON;
``mediround.typed`` checks every key and type (one ``RecipeError`` line naming the dotted key).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mediround.atomic import write_json
from mediround.errors import RecipeError
from mediround.typed import load_typed, typed_config

SAM_VARIANTS = ("tiny", "vit_b", "vit_l", "vit_h")
PRECISIONS = ("fp32", "bf16", "fp16")
SAM_NORMALISATIONS = ("sam", "medsam")
LM_MODES = ("lora", "full", "frozen")
SEG_STATES = ("at_seg", "before_seg")
JCM_REFINES = ("residual", "direct")
JCM_ROUNDS = ("all", "referred")
REFERENCE_TOKENS = ("crop+box", "crop", "box")
EMBEDDING_MODES = ("full", "rows", "frozen")


@typed_config
@dataclass
class TinyVisionConfig:
    """A CLIP-style vision tower small enough for CPU training."""

    image_size: int = 112
    patch_size: int = 14
    hidden_size: int = 64
    intermediate_size: int = 256
    num_layers: int = 3
    num_heads: int = 4


@typed_config
@dataclass
class TinyTextConfig:
    """A Mistral-style decoder small enough for CPU training."""

    hidden_size: int = 128
    intermediate_size: int = 384
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    max_positions: int = 4096
    vocab_size: int = 2000


@typed_config
@dataclass
class MLLMConfig:
    """The LLaVA model: ``source`` is ``"tiny"`` (built from config) or an HF-format LLaVA folder."""

    source: str = "tiny"
    tiny_vision: TinyVisionConfig = field(default_factory=TinyVisionConfig)
    tiny_text: TinyTextConfig = field(default_factory=TinyTextConfig)
    vision_feature_layer: int = -2
    crop_tokens: int = 1
    crop_size: int | None = None
    system_prompt: str = "You are a medical imaging assistant that segments what the user asks for."
    seed: int = 0


@typed_config
@dataclass
class SegmenterConfig:
    """The SAM/MedSAM backbone: ``variant`` picks the layout, ``checkpoint`` an optional .pth state dict."""

    variant: str = "tiny"
    checkpoint: str | None = None
    image_size: int = 1024
    normalisation: str = "sam"
    tiny_patch_size: int = 8
    tiny_width: int = 64
    tiny_depth: int = 2
    tiny_heads: int = 2
    tiny_window: int = 4
    decoder_mlp_dim: int = 2048
    seed: int = 1


@typed_config
@dataclass
class HeadsConfig:
    """Sizes of the heads added on top of LLaVA and SAM."""

    seg_dim: int = 256
    jcm_hidden: int = 512
    seed: int = 2
    box_fourier_features: int = 0
    """0: the paper's ``Linear(4, hidden)`` box token; n > 0: also n random Fourier features of the box."""
    entity_names: list[str] = field(default_factory=list)
    """Classes of the entity head (``loss.entity``); filled from the training data when left empty."""
    seg_state: str = "at_seg"
    """Which last-layer hidden state is h_c: ``at_seg`` (the state of the [SEG] token itself) or
    ``before_seg`` (the state that emits [SEG], the authors' and LISA's convention)."""
    jcm_refine: str = "residual"
    """``residual``: refine(h) = h + MLP(h), last layer zero-initialised (starts as the identity);
    ``direct``: refine(h) = MLP(h), the authors' form."""
    jcm_rounds: str = "all"
    """Rounds JCM judges and refines at inference: ``all``, or ``referred`` (only rounds whose mask a
    later round refers to; the others decode raw, as the authors' evaluation does)."""
    reference_tokens: str = "crop+box"
    """Tokens a referring round carries: ``crop+box`` (the paper's), or only ``crop`` or only ``box``, an
    ablation that shows what each carries (docs/learning.md); not a deviation in any shipped 7B recipe."""
    reference_min_fragment: float = 0.0
    """0: a reference's crop and box cover every pixel of the referenced mask (the paper's). f in (0, 1):
    the mask's 8-connected parts holding less than f of its foreground are left out first, so that stray
    pixels of a predicted mask do not stretch the box (docs/model.md). Not a deviation in any 7B recipe."""


@typed_config
@dataclass
class LoraSettings:
    """LoRA on the language model only (the regex keeps CLIP's q_proj/v_proj out)."""

    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    target_modules: str = r".*language_model.*\.(q_proj|v_proj)"


@typed_config
@dataclass
class LossWeights:
    """Weights of the answer CE and the mask BCE/Dice (the paper's 1 / 2 / 0.5), and of the entity loss.

    ``entity`` is not in the paper (0 there): a cross-entropy that asks a linear head on the [SEG] hidden
    state to name the round's target entity (``Round.entity``). It gives the [SEG] state a direct signal
    to identify the target, including through the reference tokens; docs/training.md measures it.
    """

    ce: float = 1.0
    bce: float = 2.0
    dice: float = 0.5
    entity: float = 0.0


@typed_config
@dataclass
class Trainability:
    """Which parts receive gradients. Defaults follow the authors' split (reference-facts.md)."""

    sam_image_encoder: bool = False
    sam_prompt_encoder: bool = False
    sam_mask_decoder: bool = True
    sam_iou_head: bool = False
    clip_tower: bool = False
    projector: bool = False
    language_model: str = "lora"
    token_embeddings: str = "full"
    box_encoder: bool = True
    seg_projection: bool = True
    entity_head: bool = True
    jcm: bool = False


@typed_config
@dataclass
class MediRoundConfig:
    """The whole model description."""

    mllm: MLLMConfig = field(default_factory=MLLMConfig)
    segmenter: SegmenterConfig = field(default_factory=SegmenterConfig)
    heads: HeadsConfig = field(default_factory=HeadsConfig)
    lora: LoraSettings = field(default_factory=LoraSettings)
    loss: LossWeights = field(default_factory=LossWeights)
    trainable: Trainability = field(default_factory=Trainability)
    precision: str = "fp32"
    gradient_checkpointing: bool = False

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict, source: str = "model config") -> MediRoundConfig:
        """The config of plain data (a ``config.json``); ``source`` names where it came from in errors."""
        config = load_typed(cls, data, source)
        config.validate()
        return config

    def to_json(self, path: str | Path) -> None:
        write_json(path, self.to_dict())

    @classmethod
    def from_json(cls, path: str | Path) -> MediRoundConfig:
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise RecipeError(f"{path}: cannot read model config: {error}") from None
        return cls.from_dict(data, str(path))

    def validate(self) -> None:
        """Refuse values no component can be built from, naming the field."""
        checks = [
            ("segmenter.variant", self.segmenter.variant, SAM_VARIANTS),
            ("segmenter.normalisation", self.segmenter.normalisation, SAM_NORMALISATIONS),
            ("precision", self.precision, PRECISIONS),
            ("trainable.language_model", self.trainable.language_model, LM_MODES),
            ("trainable.token_embeddings", self.trainable.token_embeddings, EMBEDDING_MODES),
            ("heads.seg_state", self.heads.seg_state, SEG_STATES),
            ("heads.jcm_refine", self.heads.jcm_refine, JCM_REFINES),
            ("heads.jcm_rounds", self.heads.jcm_rounds, JCM_ROUNDS),
            ("heads.reference_tokens", self.heads.reference_tokens, REFERENCE_TOKENS),
        ]
        for name, value, allowed in checks:
            if value not in allowed:
                raise RecipeError(f"model config: field '{name}': {value!r} is not one of {list(allowed)}")
        if not 0 <= self.heads.reference_min_fragment < 1:
            raise RecipeError(
                "model config: field 'heads.reference_min_fragment': must be at least 0 and below 1, got "
                f"{self.heads.reference_min_fragment}"
            )
        grid = round((self.mllm.crop_tokens - 1) ** 0.5)
        if self.mllm.crop_tokens < 1 or grid * grid != self.mllm.crop_tokens - 1:
            raise RecipeError(
                "model config: field 'mllm.crop_tokens': must be 1 (CLS) or 1 + g*g (CLS plus a g x g "
                f"grid of pooled patches), got {self.mllm.crop_tokens}"
            )


def tiny_config() -> MediRoundConfig:
    """The CPU-trainable preset: every weight built from config, nothing fetched."""
    return MediRoundConfig(segmenter=SegmenterConfig(variant="tiny", image_size=128, decoder_mlp_dim=512))


def llava_med_7b_config(mllm_path: str, sam_checkpoint: str | None, sam_variant: str = "vit_b") -> MediRoundConfig:
    """The paper's model: a converted LLaVA-Med v1.5 Mistral-7B folder and a MedSAM/SAM ViT-B .pth, with
    the conventions of the authors' released code: h_c from the state before [SEG], a direct refine MLP,
    JCM on referred rounds only, and no system prompt (their Mistral-instruct template has none)."""
    return MediRoundConfig(
        mllm=MLLMConfig(source=str(mllm_path), system_prompt=""),
        segmenter=SegmenterConfig(variant=sam_variant, checkpoint=sam_checkpoint, image_size=1024),
        heads=HeadsConfig(seg_state="before_seg", jcm_refine="direct", jcm_rounds="referred"),
        precision="bf16",
        gradient_checkpointing=True,
    )


PRESETS = {"tiny": tiny_config, "llava-med-7b": llava_med_7b_config}


def preset(name: str, **paths: Any) -> MediRoundConfig:
    """A preset by name; ``llava-med-7b`` needs ``mllm_path`` and ``sam_checkpoint``."""
    if name not in PRESETS:
        raise RecipeError(f"model config: unknown preset {name!r}; known: {sorted(PRESETS)}")
    return PRESETS[name](**paths)
