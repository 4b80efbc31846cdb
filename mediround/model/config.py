"""One dataclass tree that describes a MediRound model, its trainability, losses and precision.

Every component is built from this config and nothing else, so a checkpoint's ``config.json`` is enough
to rebuild the model. ``MediRoundConfig.to_dict``/``from_dict`` round-trip through JSON;
``mediround.typed`` checks every key, type and value (one ``RecipeError`` line naming the dotted key).

What the rest of the tool needs to know of a key is declared on the key, so that a new key or module is
added in one place: a ``Setting`` says whether the key changes a parameter count (``memory.known_sizes``)
and whether a fine-tune may change it (``FINE_TUNE_KEYS``); a ``Part`` on a ``Trainability`` switch names
the module it trains and whether a checkpoint saves it with the heads (``PARTS``).
"""

from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, model_validator

from mediround.atomic import write_json
from mediround.errors import RecipeError
from mediround.typed import check, load_typed, refuse, typed_config


@dataclass(frozen=True)
class Setting:
    """What a config key is to the tool besides the component that reads it."""

    counts: bool
    """It may change a parameter count (``known_sizes`` gives no sizes for a value other than the preset's)."""
    fine_tunable: bool
    """An ``init_from`` checkpoint's config may hold another value (its weights still fit)."""


SHAPE = Setting(counts=True, fine_tunable=False)
"""The undeclared default: the key shapes the weights (a size, a layer layout, what is trained)."""
BEHAVIOUR = Setting(counts=False, fine_tunable=False)
"""Changes what the model computes from its weights, not their number (seeds, prompts, conventions)."""
RUNTIME = Setting(counts=False, fine_tunable=True)
"""Where the base weights lie, the loss weights, dropout and how compute runs."""


@dataclass(frozen=True)
class Part:
    """The module of MediRound that a ``Trainability`` switch trains, declared on the switch."""

    module: str
    """Its path from the MediRound (``llava.`` reaches the LLaVA model inside peft's wrapper); a part may lie
    inside an earlier one (the IoU head in the mask decoder), whose switch it then overrides."""
    heads_file: bool = False
    """Its weights are saved in a checkpoint's ``heads.safetensors`` (with every other trained weight the
    LoRA adapter does not hold)."""


SamVariant = Literal["tiny", "vit_b", "vit_l", "vit_h"]
Precision = Literal["fp32", "bf16", "fp16"]
SamNormalisation = Literal["sam", "medsam"]
LanguageModelMode = Literal["lora", "full", "frozen"]
EmbeddingMode = Literal["full", "rows", "frozen"]
SegState = Literal["at_seg", "before_seg"]
JcmRefine = Literal["residual", "direct"]
JcmRounds = Literal["all", "referred"]
ReferenceTokens = Literal["crop+box", "crop", "box"]
JudgeIou = Literal["resized", "original"]
ChatTemplate = Literal["spaced", "llava-mistral"]
ClipView = Literal["squash", "clip-processor"]
SamResize = Literal["torch", "pil"]
BoxMax = Literal["exclusive", "inclusive"]
MaskLossFrame = Literal["resized", "original"]
PredictedReference = Literal["mask", "masked-image"]


def _cls_plus_grid(tokens: int) -> bool:
    grid = round((tokens - 1) ** 0.5)
    return tokens >= 1 and grid * grid == tokens - 1


@typed_config
@dataclass
class TinyVisionConfig:
    """A CLIP-style vision tower small enough for CPU training."""

    image_size: int = 112
    patch_size: int = 14
    hidden_size: int = 64
    intermediate_size: int = 256
    num_layers: int = 3
    num_heads: Annotated[int, BEHAVIOUR] = 4
    """CLIP's q/k/v projections are hidden x hidden whatever the number of heads: no count changes."""


@typed_config
@dataclass
class TinyTextConfig:
    """A Mistral-style decoder small enough for CPU training."""

    hidden_size: int = 128
    intermediate_size: int = 384
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    max_positions: Annotated[int, BEHAVIOUR] = 4096
    """Rotary positions: no weights."""
    vocab_size: int = 2000


@typed_config
@dataclass
class MLLMConfig:
    """The LLaVA model: ``source`` is ``"tiny"`` (built from config) or an HF-format LLaVA folder."""

    source: Annotated[str, RUNTIME] = "tiny"
    tiny_vision: TinyVisionConfig = field(default_factory=TinyVisionConfig)
    tiny_text: TinyTextConfig = field(default_factory=TinyTextConfig)
    vision_feature_layer: Annotated[int, BEHAVIOUR] = -2
    crop_tokens: Annotated[int, BEHAVIOUR, check(_cls_plus_grid, "must be 1 (CLS) or 1 + g*g (CLS plus a "
                                                 "g x g grid of pooled patches), got {value}")] = 1
    crop_size: Annotated[int | None, BEHAVIOUR] = None
    system_prompt: Annotated[str, BEHAVIOUR] = (
        "You are a medical imaging assistant that segments what the user asks for.")
    chat_template: Annotated[ChatTemplate, BEHAVIOUR] = "spaced"
    """How a dialogue is laid out in tokens (``processor.ChatLayout``): ``spaced`` (each text piece tokenized
    on its own with a leading space, ``\\n`` after the image), or ``llava-mistral``, the authors' LLaVA
    Mistral-instruct text ``[INST] <image>\\n {q} [/INST] {a} </s>`` tokenized as their code tokenizes it
    (the 7B preset; docs/parity.md)."""
    clip_view: Annotated[ClipView, BEHAVIOUR] = "squash"
    """How the image and the reference crops become CLIP's square input: ``squash`` (resized to the square,
    torch bicubic on the float image), or ``clip-processor``, as the authors' ``CLIPImageProcessor`` (the
    shortest side resized with PIL's bicubic filter, the centre cropped; the 7B preset)."""
    seed: Annotated[int, BEHAVIOUR] = 0


@typed_config
@dataclass
class SegmenterConfig:
    """The SAM/MedSAM backbone: ``variant`` picks the layout, ``checkpoint`` an optional .pth state dict."""

    variant: SamVariant = "tiny"
    checkpoint: Annotated[str | None, RUNTIME] = None
    image_size: int = 1024
    normalisation: Annotated[SamNormalisation, BEHAVIOUR] = "sam"
    resize: Annotated[SamResize, BEHAVIOUR] = "torch"
    """How the image is resized to SAM's frame (``frame.ImageFrame.pixels``): ``torch`` (bilinear,
    antialiased, on the float image) or ``pil`` (PIL's bilinear filter on the uint8 image, as the authors'
    segment-anything ``ResizeLongestSide``; the 7B preset)."""
    tiny_patch_size: int = 8
    tiny_width: int = 64
    tiny_depth: int = 2
    tiny_heads: int = 2
    tiny_window: int = 4
    decoder_mlp_dim: int = 2048
    seed: Annotated[int, BEHAVIOUR] = 1


@typed_config
@dataclass
class HeadsConfig:
    """Sizes of the heads added on top of LLaVA and SAM."""

    seg_dim: int = 256
    jcm_hidden: int = 512
    seed: Annotated[int, BEHAVIOUR] = 2
    box_fourier_features: int = 0
    """0: the paper's ``Linear(4, hidden)`` box token; n > 0: also n random Fourier features of the box."""
    entity_names: list[str] = field(default_factory=list)
    """Classes of the entity head (``loss.entity``); filled from the training data when left empty."""
    seg_state: Annotated[SegState, BEHAVIOUR] = "at_seg"
    """Which last-layer hidden state is h_c: ``at_seg`` (the state of the [SEG] token itself) or
    ``before_seg`` (the state that emits [SEG], the authors' and LISA's convention)."""
    jcm_refine: Annotated[JcmRefine, BEHAVIOUR] = "residual"
    """``residual``: refine(h) = h + MLP(h), last layer zero-initialised (starts as the identity);
    ``direct``: refine(h) = MLP(h), the authors' form."""
    jcm_rounds: Annotated[JcmRounds, BEHAVIOUR] = "all"
    """Rounds JCM judges and refines at inference: ``all``, or ``referred`` (only rounds whose mask a
    later round refers to; the others decode raw, as the authors' evaluation does)."""
    reference_tokens: Annotated[ReferenceTokens, BEHAVIOUR] = "crop+box"
    """Tokens a referring round carries: ``crop+box`` (the paper's), or only ``crop`` or only ``box``, an
    ablation that shows what each carries (docs/learning.md); not a deviation in any shipped 7B recipe."""
    reference_min_fragment: Annotated[float, BEHAVIOUR, Field(ge=0, lt=1)] = 0.0
    """0: a reference's crop and box cover every pixel of the referenced mask (the paper's). f in (0, 1):
    the mask's 8-connected parts holding less than f of its foreground are left out first, so that stray
    pixels of a predicted mask do not stretch the box (docs/model.md). Not a deviation in any 7B recipe."""
    judge_iou: Annotated[JudgeIou, RUNTIME] = "resized"
    """The IoU stage 2 teaches the judge (``training.jcm_data``): ``resized``, of the raw mask in SAM's
    resized frame (1 when both masks are empty, as ``mediround.metrics``), or ``original``, at the original
    image size as intersection / (union + 1e-6), 0 when both are empty (the authors' ``compute_iou``; the
    7B preset). A training target, like a loss weight: no weight depends on it."""
    box_max: Annotated[BoxMax, BEHAVIOUR] = "exclusive"
    """The reference box's right and bottom edges: ``exclusive`` (one past the mask's last column and row,
    the whole image is ``[0, 0, 1, 1]``), or ``inclusive`` (the last column and row themselves, as the
    authors' ``get_bounding_box_from_mask`` computes it; the 7B preset)."""
    mask_loss_frame: Annotated[MaskLossFrame, RUNTIME] = "resized"
    """Where the mask losses (BCE, Dice; stage 1 and stage 2's refined masks) compare the logits with the
    ground truth (``frame.ImageFrame.supervised_logits``): ``resized``, in SAM's resized frame with the
    ground truth resized (nearest-exact), or ``original``, at the original image size with the logits
    brought back as at inference (bilinear), as the authors' ``postprocess_masks`` (the 7B preset). A
    training target, like a loss weight: no weight depends on it."""
    dice_smoothing: Annotated[float, RUNTIME, Field(gt=0)] = 1.0
    """The soft Dice loss's smoothing term s, in pixels: 1 - (2 I + s) / (P + G + s) (``losses.dice_loss``;
    stage 1 and stage 2's refined masks). 1, or 0.001 as the authors' ``dice_loss`` (sums scaled by 1/1000,
    eps 1e-6; the 7B preset): at the original size of a small slice, s = 1 moves the loss by about
    (1 - Dice) / (P + G), 2e-5 on the parity image (docs/parity.md 3d)."""
    predicted_reference: Annotated[PredictedReference, BEHAVIOUR] = "mask"
    """How a chained round's crop and box are cut from the model's own mask of the referred round
    (``references.reference_from_prediction``): ``mask``, as from a ground-truth mask (<= 9 mask pixels:
    the whole image), or ``masked-image``, as the authors' validation: the masked image's non-black pixels
    decide (<= 9 in channel 0: the whole image) and bound the crop, and the ground-truth reference stays
    when the image has none (the 7B preset). References from ground-truth masks are cut by the mask either
    way, as the authors' training and teacher forcing cut them."""


@typed_config
@dataclass
class LoraSettings:
    """LoRA on the language model only (the regex keeps CLIP's q_proj/v_proj out)."""

    r: int = 8
    alpha: Annotated[int, BEHAVIOUR] = 16
    dropout: Annotated[float, RUNTIME] = 0.05
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
    """Which parts receive gradients. Defaults follow the authors' split (reference-facts.md). Each switch
    declares the module it trains (``Part``); ``PARTS`` lists them for ``build.apply_trainability`` and
    the checkpoint's heads file. JCM is trained by stage 2 (``train-jcm``), which switches it on."""

    sam_image_encoder: Annotated[bool, Part("sam.image_encoder")] = False
    sam_prompt_encoder: Annotated[bool, Part("sam.prompt_encoder")] = False
    sam_mask_decoder: Annotated[bool, Part("sam.mask_decoder", heads_file=True)] = True
    sam_iou_head: Annotated[bool, Part("sam.mask_decoder.iou_prediction_head")] = False
    clip_tower: Annotated[bool, Part("llava.model.vision_tower")] = False
    projector: Annotated[bool, Part("llava.model.multi_modal_projector")] = False
    language_model: LanguageModelMode = "lora"
    token_embeddings: EmbeddingMode = "full"
    box_encoder: Annotated[bool, Part("box_encoder", heads_file=True)] = True
    seg_projection: Annotated[bool, Part("seg_projection", heads_file=True)] = True
    entity_head: Annotated[bool, Part("entity_head", heads_file=True)] = True
    jcm: Annotated[bool, Part("jcm", heads_file=True)] = False

    @model_validator(mode="after")
    def _rows_need_lora(self) -> Trainability:
        if self.token_embeddings == "rows" and self.language_model != "lora":
            refuse("token_embeddings", "'rows' needs language_model 'lora'")
        return self


@typed_config
@dataclass
class MediRoundConfig:
    """The whole model description."""

    mllm: MLLMConfig = field(default_factory=MLLMConfig)
    segmenter: SegmenterConfig = field(default_factory=SegmenterConfig)
    heads: HeadsConfig = field(default_factory=HeadsConfig)
    lora: LoraSettings = field(default_factory=LoraSettings)
    loss: Annotated[LossWeights, RUNTIME] = field(default_factory=LossWeights)
    trainable: Trainability = field(default_factory=Trainability)
    precision: Annotated[Precision, RUNTIME] = "fp32"
    gradient_checkpointing: Annotated[bool, RUNTIME] = False

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict, source: str = "model config") -> MediRoundConfig:
        """The config of plain data (a ``config.json``); ``source`` names where it came from in errors."""
        return load_typed(cls, data, source)

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
        """Check a config built or changed in code as a loaded one is checked (one ``RecipeError`` line)."""
        MediRoundConfig.from_dict(self.to_dict())


def key_settings(section: type = MediRoundConfig, prefix: str = "",
                 inherited: Setting = SHAPE) -> dict[str, Setting]:
    """Every leaf key of ``section`` (dotted) with its ``Setting``: its own, else its section's, else SHAPE."""
    settings = {}
    hints = typing.get_type_hints(section, include_extras=True)
    for item in dataclasses.fields(section):
        hint = hints[item.name]
        marks = [mark for mark in getattr(hint, "__metadata__", ()) if isinstance(mark, Setting)]
        setting = marks[0] if marks else inherited
        kind = typing.get_args(hint)[0] if typing.get_origin(hint) is Annotated else hint
        if dataclasses.is_dataclass(kind):
            settings.update(key_settings(kind, f"{prefix}{item.name}.", setting))
        else:
            settings[f"{prefix}{item.name}"] = setting
    return settings


def _declared_parts() -> dict[str, Part]:
    hints = typing.get_type_hints(Trainability, include_extras=True)
    return {name: mark for name, hint in hints.items() for mark in getattr(hint, "__metadata__", ())
            if isinstance(mark, Part)}


PARTS = _declared_parts()
"""Each ``Trainability`` switch that trains a module, with its ``Part``, in declaration order."""
FINE_TUNE_KEYS = tuple(key for key, setting in key_settings().items() if setting.fine_tunable)
"""Model-config keys in which an ``init_from`` checkpoint may differ from the recipe's model."""


def tiny_config() -> MediRoundConfig:
    """The CPU-trainable preset: every weight built from config, nothing fetched."""
    return MediRoundConfig(segmenter=SegmenterConfig(variant="tiny", image_size=128, decoder_mlp_dim=512))


def llava_med_7b_config(mllm_path: str, sam_checkpoint: str | None, sam_variant: str = "vit_b") -> MediRoundConfig:
    """The paper's model: a converted LLaVA-Med v1.5 Mistral-7B folder and a MedSAM/SAM ViT-B .pth, with
    the conventions of the authors' released code: h_c from the state before [SEG], a direct refine MLP,
    JCM on referred rounds only, their Mistral-instruct template (which has no system prompt), their CLIP
    view of the image (shortest side, centre crop), SAM's input resized by PIL as theirs, reference boxes
    whose right and bottom edges are the mask's last column and row, and their judge target (IoU at the
    original size, union + 1e-6), mask losses at the original size with their Dice smoothing, and
    references of chained rounds cut
    from the masked image (docs/parity.md)."""
    return MediRoundConfig(
        mllm=MLLMConfig(source=str(mllm_path), system_prompt="", chat_template="llava-mistral",
                       clip_view="clip-processor"),
        segmenter=SegmenterConfig(variant=sam_variant, checkpoint=sam_checkpoint, image_size=1024, resize="pil"),
        heads=HeadsConfig(seg_state="before_seg", jcm_refine="direct", jcm_rounds="referred", box_max="inclusive",
                          judge_iou="original", mask_loss_frame="original", dice_smoothing=1e-3,
                          predicted_reference="masked-image"),
        precision="bf16",
        gradient_checkpointing=True,
    )


PRESETS = {"tiny": tiny_config, "llava-med-7b": llava_med_7b_config}


def preset(name: str, **paths: Any) -> MediRoundConfig:
    """A preset by name; ``llava-med-7b`` needs ``mllm_path`` and ``sam_checkpoint``."""
    if name not in PRESETS:
        raise RecipeError(f"model config: unknown preset {name!r}; known: {sorted(PRESETS)}")
    return PRESETS[name](**paths)
