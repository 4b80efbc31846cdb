"""MediRound: LLaVA + SAM + [SEG] projection + reference encoders + JCM, as one ``nn.Module``.

Two ways through the same code:

- ``forward(batch)``: teacher-forced, whole dialogues in one sequence (padded batch), one [SEG] per round,
  reference crop/box tokens built from ground-truth masks; returns losses, [SEG] features and mask logits.
- ``begin(context)`` then ``step(state, ...)`` per round: the round's user turn and answer are appended to
  a KV cache, earlier rounds are never recomputed; ``decode`` turns features into masks.

``encoder_calls`` counts images through SAM's image encoder (``"sam"``), CLIP image encodings
(``"clip"``) and reference crops through CLIP (``"crop"``), so callers and tests can check that each image
is encoded once per dialogue.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import DynamicCache, PreTrainedTokenizerBase

from mediround.model.config import MediRoundConfig
from mediround.model.inputs import BOX, CROP, IGNORE, IMAGE, ChatLayout, DialogueSample, check_references
from mediround.model.jcm import JCM
from mediround.model.mllm import CropEncoder, clip_normalise
from mediround.model.references import BoxEncoder, reference_from_mask
from mediround.model.segmenter import decode_masks, sam_input, upsample_logits

MASK_THRESHOLD = 0.0
"""A pixel is foreground when its mask logit is above this (logit > 0, probability > 0.5)."""

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class ImageContext:
    """One image, encoded once: SAM embedding (1, 256, g, g), projected CLIP patch features (N, hidden)."""

    image: np.ndarray
    sam_embedding: torch.Tensor
    image_features: torch.Tensor
    original_size: tuple[int, int]
    resized_size: tuple[int, int]


@dataclass
class DialogueState:
    """A dialogue in progress: its image, KV cache and how many tokens and rounds it holds."""

    context: ImageContext
    cache: DynamicCache
    length: int
    rounds: int = 0


@dataclass
class RoundOutput:
    """One round: the projected [SEG] feature (256,), the answer text and token ids, and whether [SEG]
    had to be fed because greedy decoding ended without it."""

    seg_feature: torch.Tensor
    answer: str
    answer_ids: list[int]
    seg_fed: bool = False


@dataclass
class DialogueBatch:
    """Padded token layout of B dialogues plus their encoder inputs and targets."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    kinds: torch.Tensor
    seg_positions: list[list[int]]
    sam_pixels: torch.Tensor
    clip_pixels: torch.Tensor
    crop_pixels: torch.Tensor
    boxes: torch.Tensor
    resized_sizes: list[tuple[int, int]]
    original_sizes: list[tuple[int, int]]
    target_masks: list[torch.Tensor]
    target_valid: list[torch.Tensor]
    entity_labels: list[torch.Tensor]

    def to(self, device: torch.device) -> DialogueBatch:
        moved = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in self.__dict__.items()}
        moved["target_masks"] = [m.to(device) for m in self.target_masks]
        moved["target_valid"] = [m.to(device) for m in self.target_valid]
        moved["entity_labels"] = [m.to(device) for m in self.entity_labels]
        return DialogueBatch(**moved)


@dataclass
class MediRoundOutput:
    """``loss`` (weighted sum), ``losses`` (ce, bce, dice, entity), per-dialogue ``seg_features`` (n_rounds, 256)
    and ``mask_logits`` (n_rounds, h, w) at the supervision size: the image resized so its longest side is
    the SAM input size (SAM's low-res logits upsampled, padding cropped)."""

    loss: torch.Tensor
    losses: dict[str, torch.Tensor]
    seg_features: list[torch.Tensor]
    mask_logits: list[torch.Tensor]


def dice_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """1 - soft Dice on sigmoid probabilities, per mask, averaged over masks. (n, h, w) each."""
    probs = torch.sigmoid(logits).flatten(1)
    targets = targets.flatten(1)
    intersection = (probs * targets).sum(-1)
    return (1 - (2 * intersection + 1.0) / (probs.sum(-1) + targets.sum(-1) + 1.0)).mean()


def bce_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """BCE-with-logits averaged over pixels of each mask, then over masks."""
    return F.binary_cross_entropy_with_logits(logits, targets, reduction="none").flatten(1).mean(-1).mean()


class MediRound(nn.Module):
    """The model; build it with ``mediround.model.build_model(config)``, not directly."""

    def __init__(
        self,
        config: MediRoundConfig,
        mllm: nn.Module,
        tokenizer: PreTrainedTokenizerBase,
        sam: nn.Module,
        base_vocab: int,
    ):
        super().__init__()
        self.config = config
        self.mllm = mllm
        self.sam = sam
        self.tokenizer = tokenizer
        self.base_vocab = base_vocab
        llava = self.llava
        hidden = llava.config.text_config.hidden_size
        self.seg_projection = nn.Sequential(
            nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, config.heads.seg_dim)
        )
        self.box_encoder = BoxEncoder(hidden, config.heads.box_fourier_features, config.heads.seed)
        names = config.heads.entity_names
        self.entity_head = nn.Linear(hidden, len(names)) if names else None
        self.entity_index = {name: index for index, name in enumerate(names)}
        self.jcm = JCM(config.heads.seg_dim, config.heads.jcm_hidden)
        self.crop_encoder = CropEncoder(llava, config.mllm.vision_feature_layer, config.mllm.crop_tokens)
        vision = llava.config.vision_config
        self.clip_size = vision.image_size
        self.crop_size = config.mllm.crop_size or vision.image_size
        self.layout = ChatLayout(
            tokenizer,
            image_tokens=(vision.image_size // vision.patch_size) ** 2,
            crop_tokens=config.mllm.crop_tokens,
            system_prompt=config.mllm.system_prompt,
        )
        self.encoder_calls: Counter[str] = Counter()
        self.load_reports: list = []

    @property
    def llava(self) -> nn.Module:
        """The LLaVA model (inside the peft wrapper when LoRA is on; LoRA layers are injected in place)."""
        return self.mllm.get_base_model() if hasattr(self.mllm, "get_base_model") else self.mllm

    @property
    def device(self) -> torch.device:
        return self.seg_projection[0].weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.llava.get_input_embeddings().weight.dtype

    def _frozen(self, module: nn.Module):
        return torch.no_grad() if not any(p.requires_grad for p in module.parameters()) else torch.enable_grad()

    def _sam_embed(self, pixels: torch.Tensor) -> torch.Tensor:
        self.encoder_calls["sam"] += pixels.shape[0]
        encoder = self.sam.image_encoder
        with self._frozen(encoder):
            return encoder(pixels.to(self.device, next(encoder.parameters()).dtype))

    def _clip_features(self, pixels: torch.Tensor) -> torch.Tensor:
        self.encoder_calls["clip"] += pixels.shape[0]
        llava = self.llava
        with self._frozen(nn.ModuleList([llava.model.vision_tower, llava.model.multi_modal_projector])):
            features = llava.model.get_image_features(
                pixel_values=pixels.to(self.device, self.dtype),
                vision_feature_layer=llava.config.vision_feature_layer,
                vision_feature_select_strategy=llava.config.vision_feature_select_strategy,
            ).pooler_output
        return torch.stack(list(features))

    def _crop_features(self, crops: torch.Tensor) -> torch.Tensor:
        self.encoder_calls["crop"] += crops.shape[0]
        llava = self.llava
        with self._frozen(nn.ModuleList([llava.model.vision_tower, llava.model.multi_modal_projector])):
            return self.crop_encoder(crops.to(self.device, self.dtype))

    def _crop_pixels(self, crops: list[np.ndarray]) -> torch.Tensor:
        if not crops:
            return torch.zeros(0, 3, self.crop_size, self.crop_size)
        return torch.cat([clip_normalise(_to_tensor(c), self.crop_size) for c in crops])

    def _embed(self, ids: torch.Tensor, kinds: torch.Tensor, image_features: torch.Tensor | None,
               crop_pixels: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        """Token embeddings with image, crop and box rows replaced (``masked_scatter``, row-major order)."""
        embeds = self.llava.get_input_embeddings()(ids)
        for kind, values in ((IMAGE, image_features), (CROP, None), (BOX, None)):
            mask = kinds == kind
            if not bool(mask.any()):
                continue
            if kind == CROP:
                values = self._crop_features(crop_pixels)
            elif kind == BOX:
                values = self.box_encoder(boxes.to(self.device, self.box_encoder.linear.weight.dtype))
            embeds = embeds.masked_scatter(mask[..., None], values.reshape(-1, embeds.shape[-1]).to(embeds.dtype))
        return embeds

    def _language_model(self, embeds: torch.Tensor, attention_mask: torch.Tensor | None,
                        cache: DynamicCache | None) -> torch.Tensor:
        out = self.llava.model.language_model(
            inputs_embeds=embeds, attention_mask=attention_mask, cache=cache, use_cache=cache is not None
        )
        return out.last_hidden_state

    def _project(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.seg_projection(hidden.to(self.seg_projection[0].weight.dtype))

    def _decode_low_res(self, embedding: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        return decode_masks(self.sam, embedding, features.to(next(self.sam.mask_decoder.parameters()).dtype))

    def collate(self, samples: list[DialogueSample]) -> DialogueBatch:
        """Token layout, encoder inputs, reference crops/boxes (from GT masks) and targets of B dialogues."""
        pieces, seg_positions, crops, boxes = [], [], [], []
        sam_pixels, clip_pixels, resized, originals, targets, valid = [], [], [], [], [], []
        entity_labels = []
        size = self.config.segmenter.image_size
        for sample in samples:
            dialogue = sample.dialogue
            check_references(dialogue)
            piece, positions = self.layout.dialogue(dialogue)
            pieces.append(piece)
            seg_positions.append(positions)
            for round_ in dialogue.rounds:
                if round_.ref is not None:
                    reference = reference_from_mask(sample.image, sample.masks[round_.ref - 1])
                    crops.append(reference.crop)
                    boxes.append(reference.box)
            pixels, resized_size = sam_input(sample.image, size, self.config.segmenter.normalisation)
            sam_pixels.append(pixels)
            clip_pixels.append(clip_normalise(_to_tensor(sample.image), self.clip_size))
            resized.append(resized_size)
            originals.append(tuple(sample.image.shape[:2]))
            masks = torch.zeros(len(dialogue.rounds), *resized_size)
            for index, mask in enumerate(sample.masks):
                if mask is not None:
                    full = torch.from_numpy(np.asarray(mask, dtype=np.float32))[None, None]
                    masks[index] = F.interpolate(full, size=resized_size, mode="nearest-exact")[0, 0]
            targets.append(masks)
            valid.append(torch.tensor([m is not None for m in sample.masks]))
            entity_labels.append(torch.tensor([self.entity_index.get(r.entity, IGNORE) for r in dialogue.rounds]))
        length = max(len(p.ids) for p in pieces)
        input_ids = torch.full((len(pieces), length), self.layout.pad_id, dtype=torch.long)
        attention = torch.zeros((len(pieces), length), dtype=torch.long)
        labels = torch.full((len(pieces), length), IGNORE, dtype=torch.long)
        kinds = torch.zeros((len(pieces), length), dtype=torch.long)
        for row, piece in enumerate(pieces):
            n = len(piece.ids)
            ids = torch.tensor(piece.ids)
            input_ids[row, :n] = ids
            attention[row, :n] = 1
            labels[row, :n] = torch.where(torch.tensor(piece.labelled), ids, torch.tensor(IGNORE))
            kinds[row, :n] = torch.tensor(piece.kinds)
        return DialogueBatch(
            input_ids=input_ids,
            attention_mask=attention,
            labels=labels,
            kinds=kinds,
            seg_positions=seg_positions,
            sam_pixels=torch.cat(sam_pixels),
            clip_pixels=torch.cat(clip_pixels),
            crop_pixels=self._crop_pixels(crops),
            boxes=torch.from_numpy(np.stack(boxes)) if boxes else torch.zeros(0, 4),
            resized_sizes=resized,
            original_sizes=originals,
            target_masks=targets,
            target_valid=valid,
            entity_labels=entity_labels,
        )

    def forward(self, batch: DialogueBatch) -> MediRoundOutput:
        """Teacher-forced pass over whole dialogues: CE on answers, BCE + Dice on every round's mask, and
        (``loss.entity``) the entity head's CE on every round's [SEG] state."""
        batch = batch.to(self.device)
        embeddings = self._sam_embed(batch.sam_pixels)
        image_features = self._clip_features(batch.clip_pixels)
        embeds = self._embed(batch.input_ids, batch.kinds, image_features, batch.crop_pixels, batch.boxes)
        hidden = self._language_model(embeds, batch.attention_mask, None)
        weights = self.config.loss
        zero = hidden.new_zeros((), dtype=torch.float32)

        next_labels = batch.labels[:, 1:]
        selected = next_labels != IGNORE
        ce = zero
        if weights.ce and bool(selected.any()):
            logits = self.llava.lm_head(hidden[:, :-1][selected])
            ce = F.cross_entropy(logits.float(), next_labels[selected])

        seg_features, mask_logits, all_logits, all_targets = [], [], [], []
        seg_states, entity_labels = [], []
        size = self.config.segmenter.image_size
        for row, positions in enumerate(batch.seg_positions):
            seg_states.append(hidden[row, positions])
            entity_labels.append(batch.entity_labels[row])
            features = self._project(seg_states[-1])
            low_res = self._decode_low_res(embeddings[row : row + 1], features)
            resized = batch.resized_sizes[row]
            logits = upsample_logits(low_res, size, resized, resized)
            seg_features.append(features)
            mask_logits.append(logits)
            valid = batch.target_valid[row]
            all_logits.extend(logits[valid])
            all_targets.extend(batch.target_masks[row][valid])
        bce = dice = zero
        if all_logits:
            bce = torch.stack([bce_loss(lg[None], tg[None]) for lg, tg in zip(all_logits, all_targets)]).mean()
            dice = torch.stack([dice_loss(lg[None], tg[None]) for lg, tg in zip(all_logits, all_targets)]).mean()
        entity = zero
        labels = torch.cat(entity_labels) if entity_labels else None
        if weights.entity and self.entity_head is not None and labels is not None and bool((labels != IGNORE).any()):
            head_logits = self.entity_head(torch.cat(seg_states).to(self.entity_head.weight.dtype))
            entity = F.cross_entropy(head_logits.float(), labels, ignore_index=IGNORE)
        loss = weights.ce * ce + weights.bce * bce + weights.dice * dice + weights.entity * entity
        return MediRoundOutput(loss, {"ce": ce, "bce": bce, "dice": dice, "entity": entity}, seg_features, mask_logits)

    @torch.no_grad()
    def encode_image(self, image: np.ndarray) -> ImageContext:
        """Run SAM's image encoder and CLIP once for an (H, W, 3) uint8 image."""
        pixels, resized = sam_input(image, self.config.segmenter.image_size, self.config.segmenter.normalisation)
        embedding = self._sam_embed(pixels)
        features = self._clip_features(clip_normalise(_to_tensor(image), self.clip_size))[0]
        return ImageContext(image, embedding, features, tuple(image.shape[:2]), resized)

    @torch.no_grad()
    def begin(self, context: ImageContext) -> DialogueState:
        """Prefill the system prompt and image tokens into a fresh KV cache."""
        cache = DynamicCache(config=self.llava.config.text_config)
        piece = self.layout.prefix()
        self._feed(piece.ids, piece.kinds, cache, context.image_features[None])
        return DialogueState(context, cache, len(piece.ids))

    def _feed(self, ids: list[int], kinds: list[int], cache: DynamicCache, image_features: torch.Tensor | None = None,
              crop_pixels: torch.Tensor | None = None, boxes: torch.Tensor | None = None) -> torch.Tensor:
        ids_t = torch.tensor([ids], device=self.device)
        kinds_t = torch.tensor([kinds], device=self.device)
        embeds = self._embed(ids_t, kinds_t, image_features,
                             crop_pixels if crop_pixels is not None else torch.zeros(0),
                             boxes if boxes is not None else torch.zeros(0, 4))
        return self._language_model(embeds, None, cache)[0]

    @torch.no_grad()
    def step(
        self,
        state: DialogueState,
        query: str,
        answer: str | None,
        reference_mask: np.ndarray | None = None,
        refers: bool | None = None,
        max_new_tokens: int = 64,
    ) -> RoundOutput:
        """Append one round to the cache and return its projected [SEG] feature.

        ``answer`` given: teacher-forced (fed with the user turn in one chunk). ``answer=None``: greedy
        decoding until </s>; the [SEG] hidden state comes from the step that feeds [SEG], and [SEG] is fed
        when decoding ends without one (``seg_fed=True``). ``refers`` defaults to ``reference_mask is not
        None``; a referring round with a missing or tiny mask uses the whole image (references.py).
        """
        refers = reference_mask is not None if refers is None else refers
        crop_pixels = boxes = None
        if refers:
            reference = reference_from_mask(state.context.image, reference_mask)
            crop_pixels = self._crop_pixels([reference.crop])
            boxes = torch.from_numpy(reference.box[None])
        user = self.layout.user(state.rounds, query, refers)
        if answer is not None:
            answer_piece = self.layout.answer(answer)
            ids = user.ids + answer_piece.ids
            hidden = self._feed(ids, user.kinds + answer_piece.kinds, state.cache, None, crop_pixels, boxes)
            seg_at = len(user.ids) + answer_piece.ids.index(self.layout.seg_id)
            feature = self._project(hidden[seg_at])
            answer_ids = answer_piece.ids
            seg_fed = False
        else:
            hidden = self._feed(user.ids, user.kinds, state.cache, None, crop_pixels, boxes)
            feature, answer_ids, seg_fed = self._greedy(hidden[-1], state, max_new_tokens)
            ids = user.ids + answer_ids
        state.length += len(ids)
        state.rounds += 1
        text = self.tokenizer.decode(answer_ids, skip_special_tokens=False)
        return RoundOutput(feature, text, answer_ids, seg_fed)

    def _greedy(self, last_hidden: torch.Tensor, state: DialogueState, max_new_tokens: int):
        layout = self.layout
        answer_ids: list[int] = []
        feature = None
        while len(answer_ids) < max_new_tokens:
            token = int(self.llava.lm_head(last_hidden).argmax())
            if token == layout.seg_id and feature is not None:
                token = layout.eos_id
            answer_ids.append(token)
            if token == layout.eos_id:
                break
            last_hidden = self._feed([token], [0], state.cache)[-1]
            if token == layout.seg_id:
                feature = self._project(last_hidden)
        if answer_ids and answer_ids[-1] == layout.eos_id:
            answer_ids.pop()
        seg_fed = feature is None
        if seg_fed:
            answer_ids.append(layout.seg_id)
            feature = self._project(self._feed([layout.seg_id], [0], state.cache)[-1])
        answer_ids.append(layout.eos_id)
        self._feed([layout.eos_id], [0], state.cache)
        return feature, answer_ids, seg_fed

    @torch.no_grad()
    def decode(self, context: ImageContext, features: torch.Tensor) -> torch.Tensor:
        """(n, 256) features -> (n, H, W) mask logits at the original image size (foreground: > 0)."""
        low_res = self._decode_low_res(context.sam_embedding, features.reshape(-1, self.config.heads.seg_dim))
        return upsample_logits(low_res, self.config.segmenter.image_size, context.resized_size, context.original_size)


def _to_tensor(image: np.ndarray) -> torch.Tensor:
    """(H, W, 3) uint8 -> (1, 3, H, W) float in [0, 255]."""
    return torch.from_numpy(np.array(image, dtype=np.float32)).permute(2, 0, 1)[None]
