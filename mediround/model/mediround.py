"""MediRound: LLaVA + SAM + [SEG] projection + reference encoders + JCM, as one ``nn.Module``.

The module holds the weights and the pieces every path runs through (the image and crop encoders, the
token embedding with image/crop/box rows scattered in, the language model, the [SEG] projection, SAM's
mask decoder) and ``forward(batch)``: teacher-forced, whole dialogues in one sequence (padded batch), one
[SEG] per round, reference crop/box tokens built from ground-truth masks; it returns losses, [SEG] features
and mask logits. Inputs come from ``model.processor`` (``mediround.model.processor``); one dialogue round
by round over a KV cache is a ``mediround.model.session.DialogueSession``; losses are
``mediround.model.losses``.

``encoder_calls`` counts images through SAM's image encoder (``"sam"``), CLIP image encodings
(``"clip"``) and reference crops through CLIP (``"crop"``), so callers and tests can check that each image
is encoded once per dialogue.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch
from torch import nn
from transformers import DynamicCache, PreTrainedTokenizerBase

from mediround.model.config import MediRoundConfig
from mediround.model.jcm import JCM
from mediround.model.losses import cross_entropy, mask_losses, weighted_loss
from mediround.model.mllm import CropEncoder
from mediround.model.processor import BOX, CROP, IGNORE, IMAGE, DialogueBatch, DialogueProcessor
from mediround.model.references import BoxEncoder
from mediround.model.segmenter import decode_masks


@dataclass
class MediRoundOutput:
    """``loss`` (weighted sum), ``losses`` (ce, bce, dice, entity), per-dialogue ``seg_features`` (n_rounds, 256)
    and ``mask_logits`` (n_rounds, h, w) at the supervision size (``heads.mask_loss_frame``): the image
    resized so its longest side is the SAM input size (SAM's low-res logits upsampled, padding cropped), or
    the original image size."""

    loss: torch.Tensor
    losses: dict[str, torch.Tensor]
    seg_features: list[torch.Tensor]
    mask_logits: list[torch.Tensor]


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
        self.jcm = JCM(config.heads.seg_dim, config.heads.jcm_hidden, residual=config.heads.jcm_refine == "residual")
        self.crop_encoder = CropEncoder(llava, config.mllm.vision_feature_layer, config.mllm.crop_tokens)
        # Kept with the model so that every loaded model carries the inputs it was built for.
        self.processor = DialogueProcessor(config, tokenizer, llava.config.vision_config)
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

    def sam_embed(self, pixels: torch.Tensor) -> torch.Tensor:
        """SAM image embeddings (n, 256, g, g) of (n, 3, size, size) SAM pixels."""
        self.encoder_calls["sam"] += pixels.shape[0]
        encoder = self.sam.image_encoder
        with self._frozen(encoder):
            return encoder(pixels.to(self.device, next(encoder.parameters()).dtype))

    def clip_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """Projected CLIP patch features (n, patches, hidden) of (n, 3, s, s) CLIP pixels: the image tokens."""
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

    def embed(self, ids: torch.Tensor, kinds: torch.Tensor, image_features: torch.Tensor | None,
              crop_pixels: torch.Tensor | None, boxes: torch.Tensor | None) -> torch.Tensor:
        """Token embeddings with image, crop and box rows replaced (``masked_scatter``, row-major order);
        an input may be None when ``kinds`` holds none of its kind."""
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

    def hidden_states(self, embeds: torch.Tensor, attention_mask: torch.Tensor | None,
                      cache: DynamicCache | None, position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """The language model's last hidden states; with a ``cache``, the embeddings extend it.
        ``position_ids`` default to the cache length onwards (give them when rows hold padding)."""
        out = self.llava.model.language_model(
            inputs_embeds=embeds, attention_mask=attention_mask, cache=cache, use_cache=cache is not None,
            position_ids=position_ids,
        )
        return out.last_hidden_state

    @property
    def seg_state_offset(self) -> int:
        """Where h_c sits relative to the [SEG] token: 0 (its own state) or -1 (the state that emits it)."""
        return -1 if self.config.heads.seg_state == "before_seg" else 0

    def seg_states(self, hidden: torch.Tensor, seg_positions: list[int]) -> torch.Tensor:
        """The states h_c (n, hidden) of the [SEG] tokens at ``seg_positions`` of one sequence's hidden
        states (length, hidden): the one place that reads the [SEG] state (its own or the one before it,
        ``seg_state_offset``), for training and inference alike. Generation passes its last two states."""
        return hidden[[position + self.seg_state_offset for position in seg_positions]]

    def project(self, hidden: torch.Tensor) -> torch.Tensor:
        """[SEG] hidden states -> [SEG] features (the SAM prompt), (..., seg_dim)."""
        return self.seg_projection(hidden.to(self.seg_projection[0].weight.dtype))

    def answer_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The language model's next-token logits of hidden states (..., hidden), the image placeholder's
        column at -inf. ``<image>`` only marks where the image features go: it is never a target and never
        generated, so it takes no share of the softmax (the authors' LLaVA has no such row: its image id
        -200 lies outside the vocabulary, and ``convert-llava`` adds one to ours; docs/parity.md 3b)."""
        logits = self.llava.lm_head(hidden)
        placeholder = torch.tensor([self.processor.layout.image_id], device=logits.device)
        return logits.index_fill(-1, placeholder, float("-inf"))

    def decode_low_res(self, embedding: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """One image's SAM embedding and (n, seg_dim) features -> SAM's low-res logits (n, 1, 4g, 4g)."""
        return decode_masks(self.sam, embedding, features.to(next(self.sam.mask_decoder.parameters()).dtype))

    def forward(self, batch: DialogueBatch) -> MediRoundOutput:
        """Teacher-forced pass over whole dialogues: CE on answers, BCE + Dice on every round's mask, and
        (``loss.entity``) the entity head's CE on every round's [SEG] state."""
        batch = batch.to(self.device)
        embeddings = self.sam_embed(batch.sam_pixels)
        image_features = self.clip_features(batch.clip_pixels)
        embeds = self.embed(batch.input_ids, batch.kinds, image_features, batch.crop_pixels, batch.boxes)
        hidden = self.hidden_states(embeds, batch.attention_mask, None)
        weights = self.config.loss
        zero = hidden.new_zeros((), dtype=torch.float32)

        next_labels = batch.labels[:, 1:]
        selected = next_labels != IGNORE
        ce = zero
        if weights.ce and bool(selected.any()):
            ce = cross_entropy(self.answer_logits(hidden[:, :-1][selected]), next_labels[selected])

        seg_features, mask_logits, all_logits, all_targets = [], [], [], []
        seg_states, entity_labels = [], []
        for row, positions in enumerate(batch.seg_positions):
            seg_states.append(self.seg_states(hidden[row], positions))
            entity_labels.append(batch.entity_labels[row])
            features = self.project(seg_states[-1])
            low_res = self.decode_low_res(embeddings[row : row + 1], features)
            logits = batch.frames[row].supervised_logits(low_res, self.config.heads.mask_loss_frame)
            seg_features.append(features)
            mask_logits.append(logits)
            valid = batch.target_valid[row]
            all_logits.extend(logits[valid])
            all_targets.extend(batch.target_masks[row][valid])
        smoothing = self.config.heads.dice_smoothing
        bce, dice = mask_losses(all_logits, all_targets, smoothing) if all_logits else (zero, zero)
        entity = zero
        labels = torch.cat(entity_labels) if entity_labels else None
        if weights.entity and self.entity_head is not None and labels is not None and bool((labels != IGNORE).any()):
            entity = cross_entropy(self.entity_head(torch.cat(seg_states).to(self.entity_head.weight.dtype)), labels)
        losses = {"ce": ce, "bce": bce, "dice": dice, "entity": entity}
        return MediRoundOutput(weighted_loss(weights, losses), losses, seg_features, mask_logits)
