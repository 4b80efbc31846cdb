#!/usr/bin/env python
"""Run the authors' released MediRound code and ours on the same tiny weights and dialogues; compare.

    python benchmarks/authors_parity.py                    # build/reuse ../parity-env, run, compare
    python benchmarks/authors_parity.py --write-fixture    # also refresh tests/parity/fixture from their run
    python benchmarks/authors_parity.py --ours-only        # our side again, against their outputs in --work

The authors' code (``../shared/reference/mediround-authors``) is imported from that path, never copied,
in an environment of its own (``ENV_PINS``) by this same file run as ``--authors-side WORKDIR``; the
patches it needs at run time are in ``authors_side`` and listed in docs/parity.md. Both sides read one
set of random weights written here in the authors' layout (``write_weights``: every tensor drawn from
one seed, in sorted key order, so a run without their code can rebuild them and check ``checksum``):
a tiny CLIP (48 px, patch 2: the 24 x 24 = 576 image tokens their code hard-codes), a full ViT-B SAM, a
two-layer Mistral and a SentencePiece tokenizer. Ours reads them through ``mediround convert-llava`` and
our SAM loader with the 7B preset's switches (``parity_config``). Beside the training forward and backward
(``compare``), both sides run the evaluation protocol (their ``validate_multi_turn_med_seg``, our
``DialogueChain``; ``compare_evaluation``) and one AdamW step (``compare_step``), and stage 2 (JCM) on the
same batch: their stage-2 forward (``authors_jcm``, run first on their side, before any step) against our
stage-2 data path and objective with the 7B JCM recipe's settings (``compare_jcm``, run first on ours too).
Each quantity prints one line and the run ends with ``parity: N of M quantities within tolerance``
(docs/parity.md).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
import types
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
SHARED = REPO.parent / "shared"
REFERENCE = SHARED / "reference" / "mediround-authors"
DATA_ROOT = SHARED / "data" / "sam-med2d-demo"
DEFAULT_ENV = REPO.parent / "parity-env"
DEFAULT_WORK = REPO.parent / "parity-work"
FIXTURE = REPO / "tests" / "parity" / "fixture"
ENV_PINS = (
    "torch==2.13.0",
    "transformers==4.40.2",  # their 4.31.0 pin cannot import the Mistral classes (added in 4.34)
    "tokenizers==0.19.1",
    "peft==0.4.0",
    "sentencepiece",
    "einops",
    "opencv-python-headless",  # their opencv_python pin needs a display library this machine lacks
    "safetensors",
    "protobuf",  # transformers' conversion of the SentencePiece model to tokenizer.json
    "pillow",  # the torchvision stand-in and their data path; nothing else in the pins brings it
)
SEED = 27
VOCAB = 400
TEXT = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2}
CLIP = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
        "image_size": 48, "patch_size": 2, "projection_dim": 32}
CLIP_TEXT = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
             "vocab_size": 64, "max_position_embeddings": 16, "projection_dim": 32}
"""A full CLIP checkpoint (text half included) as openai/clip-vit-large-patch14-336 ships: transformers
4.40 reads a vision-only ``vision_model.*`` file without its prefix and leaves the tower random."""
LORA_R = 8
# Their added tokens in the order train_ds.py adds them, and ours for the same role.
ADDED = {"[SEG]": "[SEG]", "[BBOXINPUT]": "[REF_BOX]", "[CROPPEDIMAGE]": "[REF_CROP]"}
IMAGE = "s0114_111"
DIALOGUES = [
    [("[IMAGE256:data_demo/images/{i}.png] Segment the right middle lobe of the lung.",
      "It is [MASK-DECODE:data_demo/masks/{i}_lung_middle_lobe_right_000.png]."),
     (("[MASK-ENCODE:data_demo/masks/{i}_lung_middle_lobe_right_000.png][BOX-ENCODE:data_demo/masks/"
       "{i}_lung_middle_lobe_right_000.png] Segment the heart chamber next to this region."), 0,
      ("It is [REF-DECODE:data_demo/masks/{i}_lung_middle_lobe_right_000.png]"
       "[MASK-DECODE:data_demo/masks/{i}_heart_ventricle_right_000.png].")),
     (("[MASK-ENCODE:data_demo/masks/{i}_heart_ventricle_right_000.png][BOX-ENCODE:data_demo/masks/"
       "{i}_heart_ventricle_right_000.png] Segment the rib on the other side of it."), 1,
      "[MASK-DECODE:data_demo/masks/{i}_rib_left_9_000.png].")],
    [("[IMAGE256:data_demo/images/{i}.png] Where is the left lower lobe? Segment it.",
      "Sure, it is [MASK-DECODE:data_demo/masks/{i}_lung_lower_lobe_left_000.png]."),
     (("[MASK-ENCODE:data_demo/masks/{i}_lung_lower_lobe_left_000.png][BOX-ENCODE:data_demo/masks/"
       "{i}_lung_lower_lobe_left_000.png] Segment the rib beside the previous output."), 0,
      "[MASK-DECODE:data_demo/masks/{i}_rib_left_9_000.png].")],
]


def data_items() -> list[dict]:
    """The dialogues in the authors' ``data_sample.json`` layout (a list of items)."""
    items = []
    for rounds in DIALOGUES:
        turns = []
        for turn in rounds:
            human, answer = turn[0], turn[-1]
            record = {"from": "human", "value": human.format(i=IMAGE)}
            if len(turn) == 3:
                record["ind"] = turn[1]
            turns += [record, {"from": "gpt", "value": answer.format(i=IMAGE)}]
        items.append({"task": "segmentation", "base": "[null]", "conversations": turns})
    return items


# ----------------------------------------------------------------------------------------------- weights
def _llava_config(clip_dir: Path) -> dict:
    return {"architectures": ["LlavaMistralForCausalLM"], "model_type": "llava_mistral", "vocab_size": VOCAB,
            **TEXT, "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "rope_theta": 1000000.0,
            "sliding_window": None, "hidden_act": "silu", "tie_word_embeddings": False, "bos_token_id": 1,
            "eos_token_id": 2, "torch_dtype": "float32", "mm_vision_tower": str(clip_dir), "mm_hidden_size":
            CLIP["hidden_size"], "mm_projector_type": "mlp2x_gelu", "mm_vision_select_layer": -2,
            "mm_vision_select_feature": "patch", "mm_use_im_start_end": False, "mm_use_im_patch_token": False}


def weight_shapes() -> dict[str, dict[str, tuple[int, ...]]]:
    """Key -> shape of every file's tensors, from models built on the meta device (same keys in
    transformers 4.40 and 5.x): ``clip``, ``llava`` (authors' layout), ``sam`` (ViT-B) and ``heads``
    (the parts their training initialises itself, in their peft-wrapped names)."""
    import torch
    from transformers import CLIPConfig, CLIPModel, MistralConfig, MistralForCausalLM

    from mediround.model.config import SegmenterConfig
    from mediround.model.segmenter import build_sam

    with torch.device("meta"):
        clip = CLIPModel(CLIPConfig(text_config=CLIP_TEXT, vision_config=CLIP, projection_dim=CLIP["projection_dim"]))
        text = MistralForCausalLM(MistralConfig(vocab_size=VOCAB, **TEXT, tie_word_embeddings=False))
        sam = build_sam(SegmenterConfig(variant="vit_b"), "meta")
    hidden, kv = TEXT["hidden_size"], TEXT["hidden_size"] * TEXT["num_key_value_heads"] // TEXT["num_attention_heads"]
    llava = {k: tuple(v.shape) for k, v in text.state_dict().items()}
    llava.update({"model.mm_projector.0.weight": (hidden, CLIP["hidden_size"]), "model.mm_projector.0.bias": (hidden,),
                  "model.mm_projector.2.weight": (hidden, hidden), "model.mm_projector.2.bias": (hidden,)})
    heads = {"new_rows.embed_tokens": (len(ADDED), hidden), "new_rows.lm_head": (len(ADDED), hidden)}
    prefix = "base_model.model.model."
    for layer in range(TEXT["num_hidden_layers"]):
        for proj, out in (("q_proj", hidden), ("v_proj", kv)):
            base = f"{prefix}layers.{layer}.self_attn.{proj}"
            heads[f"{base}.lora_A.default.weight"] = (LORA_R, hidden)
            heads[f"{base}.lora_B.default.weight"] = (out, LORA_R)
    for name, shape in (("text_hidden_fcs.0.0.weight", (hidden, hidden)), ("text_hidden_fcs.0.0.bias", (hidden,)),
                        ("text_hidden_fcs.0.2.weight", (256, hidden)), ("text_hidden_fcs.0.2.bias", (256,)),
                        ("bbox_encoder.weight", (hidden, 4)), ("bbox_encoder.bias", (hidden,))):
        heads[prefix + name] = shape
    for mlp, out in (("mask_quality_MLP", 1), ("refine_MLP", 256)):
        for fc, shape in (("fc1", (512, 256)), ("fc2", (512, 512)), ("fc3", (out, 512))):
            heads[f"{prefix}{mlp}.{fc}.weight"] = shape
            heads[f"{prefix}{mlp}.{fc}.bias"] = shape[:1]
    return {"clip": {k: tuple(v.shape) for k, v in clip.state_dict().items()}, "llava": llava,
            "sam": {k: tuple(v.shape) for k, v in sam.state_dict().items()}, "heads": heads}


def generate_weights(seed: int = SEED) -> tuple[dict[str, dict], str]:
    """Every tensor of ``weight_shapes`` drawn from one generator in sorted (file, key) order: normal with
    std 0.02, and 1 + that for 1-D ``.weight`` tensors (norm layers). Returns them and their sha256."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    digest = hashlib.sha256()
    weights: dict[str, dict] = {}
    for group, shapes in sorted(weight_shapes().items()):
        weights[group] = {}
        for key in sorted(shapes):
            tensor = torch.randn(shapes[key], generator=generator) * 0.02
            if len(shapes[key]) == 1 and key.endswith(".weight"):
                tensor += 1.0
            weights[group][key] = tensor
            digest.update(key.encode() + tensor.numpy().tobytes())
    return weights, digest.hexdigest()


def write_weights(work: Path, seed: int = SEED) -> str:
    """Write the weights in the authors' layout under ``work``; return their checksum."""
    import torch
    from safetensors.torch import save_file

    weights, checksum = generate_weights(seed)
    clip_dir, llava_dir = work / "clip", work / "llava"
    clip_dir.mkdir(parents=True, exist_ok=True)
    llava_dir.mkdir(parents=True, exist_ok=True)
    save_file(weights["clip"], str(clip_dir / "model.safetensors"), metadata={"format": "pt"})
    (clip_dir / "config.json").write_text(json.dumps({
        "model_type": "clip", "architectures": ["CLIPModel"], "projection_dim": CLIP["projection_dim"],
        "text_config": CLIP_TEXT, "vision_config": CLIP}))
    (clip_dir / "preprocessor_config.json").write_text(json.dumps({
        "crop_size": CLIP["image_size"], "do_center_crop": True, "do_normalize": True, "do_resize": True,
        "image_processor_type": "CLIPImageProcessor", "resample": 3, "size": CLIP["image_size"],
        "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711]}))
    save_file(weights["llava"], str(llava_dir / "model.safetensors"), metadata={"format": "pt"})
    (llava_dir / "config.json").write_text(json.dumps(_llava_config(clip_dir.resolve())))
    torch.save(weights["sam"], work / "sam_vit_b.pth")
    save_file(weights["heads"], str(work / "heads.safetensors"))
    (work / "data.json").write_text(json.dumps(data_items(), indent=1))
    (work / "checksum.txt").write_text(checksum)
    return checksum


def write_tokenizer(llava_dir: Path) -> None:
    """A SentencePiece BPE model with Mistral's normaliser that both sides load (their slow
    ``LlamaTokenizer``; ours through the fast conversion saved as tokenizer.json, which is what
    transformers 5 reads)."""
    import sentencepiece as spm
    from transformers import LlamaTokenizerFast

    corpus = [turn["value"] for item in data_items() for turn in item["conversations"]]
    corpus += ["[INST] Segment the liver, the kidney, the lung, the heart and the rib. [/INST] It is here."] * 4
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus), model_prefix=str(llava_dir / "tokenizer"), model_type="bpe",
        vocab_size=VOCAB, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, num_threads=1,
        character_coverage=1.0, hard_vocab_limit=False, minloglevel=2,
        # Mistral's (LLaVA-Med's) normaliser: spaces kept as written, "\n" as a byte piece. SentencePiece's
        # default (NFKC, extra spaces removed) would drop spaces and newlines the fast conversion keeps.
        byte_fallback=True, normalization_rule_name="identity", remove_extra_whitespaces=False)
    (llava_dir / "tokenizer.vocab").unlink(missing_ok=True)
    (llava_dir / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "add_bos_token": True, "add_eos_token": False, "model_max_length": 1024}))
    fast = LlamaTokenizerFast.from_pretrained(str(llava_dir), from_slow=True)
    fast.backend_tokenizer.save(str(llava_dir / "tokenizer.json"))


# --------------------------------------------------------------------------------------- authors' side
def install_stand_ins(work: Path) -> None:
    """Modules their code imports that this machine cannot: torchvision (PIL resize only), deepspeed
    (only while train_ds.py is imported), tensorboard's SummaryWriter."""
    import numpy as np
    from PIL import Image

    def resize(image, size, *args, **kwargs):
        height, width = size
        return image.resize((width, height), Image.BILINEAR)

    def unused(*args, **kwargs):
        raise RuntimeError("torchvision stand-in: not used by the compared path")

    modules = {name: types.ModuleType(name) for name in (
        "torchvision", "torchvision.transforms", "torchvision.transforms.functional", "torchvision.ops",
        "torchvision.ops.boxes", "torch.utils.tensorboard")}
    modules["torchvision.transforms.functional"].resize = resize
    modules["torchvision.transforms.functional"].to_pil_image = lambda array: Image.fromarray(np.asarray(array))
    modules["torchvision.ops.boxes"].box_area = unused
    modules["torchvision.ops.boxes"].batched_nms = unused
    modules["torch.utils.tensorboard"].SummaryWriter = unused
    sys.modules.update(modules)
    sys.modules["deepspeed"] = types.ModuleType("deepspeed")


def authors_side(work: Path) -> None:
    """Build their model from ``work``'s weights as train_ds.py's ``main`` does (CPU, fp32, LoRA dropout
    0), run their dataset, collate and stage-1 forward/backward, and save what is compared."""
    import torch
    import transformers
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file, save_file

    # After transformers and peft: they probe for torchvision and deepspeed with find_spec.
    install_stand_ins(work)
    sys.path.insert(0, str(REFERENCE))
    torch.Tensor.cuda = lambda self, *args, **kwargs: self  # their code calls .cuda() on CPU tensors
    histc = torch.histc
    torch.histc = lambda input, *args, **kwargs: histc(input.float(), *args, **kwargs)  # int histc: CUDA only

    import train_ds  # noqa: F401  (imports their model, dataset and metric code)
    from model.llava import conversation as conversation_lib
    from model.mediround import MediRoundForCausalLM
    from utils.dataset import collate_fn
    from utils.multi_turn_med_seg import MultiTurnMedSegDataset

    del sys.modules["deepspeed"]  # accelerate's find_spec("deepspeed") fails on a bare stand-in
    torch.manual_seed(0)
    llava_dir = work / "llava"
    if not (llava_dir / "tokenizer.model").is_file():
        write_tokenizer(llava_dir)
    tokenizer = transformers.AutoTokenizer.from_pretrained(
        str(llava_dir), model_max_length=1024, padding_side="right", use_fast=False)
    tokenizer.pad_token = tokenizer.unk_token
    for token in ADDED:
        tokenizer.add_tokens(token)
    ids = {token: tokenizer(token, add_special_tokens=False).input_ids[0] for token in ADDED}
    model = MediRoundForCausalLM.from_pretrained(
        str(llava_dir), torch_dtype=torch.float32, low_cpu_mem_usage=True, train_mask_decoder=True, out_dim=256,
        ce_loss_weight=1.0, dice_loss_weight=0.5, bce_loss_weight=2.0, bbox_loss_weight=2.0,
        seg_token_idx=ids["[SEG]"], box_token_idx=ids["[BBOXINPUT]"], croppedimage_token_idx=ids["[CROPPEDIMAGE]"],
        vision_pretrained=str(work / "sam_vit_b.pth"), vision_tower=str(work / "clip"), use_mm_start_end=False)
    model.config.stage = 1
    model.config.eos_token_id, model.config.bos_token_id = tokenizer.eos_token_id, tokenizer.bos_token_id
    model.config.pad_token_id = tokenizer.pad_token_id
    model.enable_input_require_grads()
    model.get_model().initialize_vision_modules(model.get_model().config)
    vision_tower = model.get_model().get_vision_tower()
    vision_tower.to(dtype=torch.float32)
    model.get_model().config.stage = 1
    model.get_model().initialize_mediround_modules(model.get_model().config, False)
    for p in vision_tower.parameters():
        p.requires_grad = False
    for p in model.get_model().mm_projector.parameters():
        p.requires_grad = False
    conversation_lib.default_conversation = conversation_lib.conv_templates["mistral_instruct"]
    targets = sorted({n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and
                      not any(x in n for x in ("visual_model", "vision_tower", "mm_projector", "text_hidden_fcs",
                                                "bbox_encoder")) and any(x in n for x in ("q_proj", "v_proj"))})
    model = get_peft_model(model, LoraConfig(r=LORA_R, lora_alpha=16, target_modules=targets, lora_dropout=0.0,
                                             bias="none", task_type="CAUSAL_LM"))
    model.resize_token_embeddings(len(tokenizer))
    for n, p in model.named_parameters():
        if any(x in n for x in ["lm_head", "embed_tokens", "mask_decoder", "text_hidden_fcs", "bbox_encoder"]):
            p.requires_grad = True
    heads = load_file(str(work / "heads.safetensors"))
    rows = [ids[token] for token in ADDED]
    with torch.no_grad():
        model.get_input_embeddings().weight[rows] = heads.pop("new_rows.embed_tokens")
        model.get_output_embeddings().weight[rows] = heads.pop("new_rows.lm_head")
    stage1 = {k: v for k, v in heads.items() if "MLP" not in k}
    _, unexpected = model.load_state_dict(stage1, strict=False)
    assert not unexpected, unexpected

    dataset = MultiTurnMedSegDataset(str(DATA_ROOT), tokenizer, str(work / "clip"), str(work / "data.json"),
                                     precision="fp32", random_sample=False)
    batch = collate_fn([(*dataset[i], False) for i in range(len(dataset))], tokenizer=tokenizer,
                       conv_type="mistral_instruct", use_mm_start_end=False)
    batch["encode_bboxes_list"] = [b.float() for b in batch["encode_bboxes_list"]]  # float64 out of their dataset
    authors_jcm(work, model, batch)  # before stage 1's hooks and step: the same stage-1 weights, its own captures
    captured: dict[str, list] = {"projected": [], "low_res": []}
    inner = model.base_model.model
    inner.model.text_hidden_fcs[0].register_forward_hook(
        lambda module, args, out: captured["projected"].append(out))
    inner.model.visual_model.mask_decoder.register_forward_hook(
        lambda module, args, out: captured["low_res"].append(out[0]))
    model.train()
    started = time.perf_counter()
    forward_inputs = {k: v for k, v in batch.items() if k not in ("image_paths", "conversation_list", "questions_list",
                                                                   "sampled_classes_list")}
    out = model(**forward_inputs)
    out["loss"].backward()
    forward_seconds = time.perf_counter() - started
    input_ids = batch["input_ids"]
    seg_mask = torch.cat([torch.zeros(input_ids.shape[0], 575, dtype=torch.bool), input_ids[:, 1:] == ids["[SEG]"],
                          torch.zeros(input_ids.shape[0], 1, dtype=torch.bool)], dim=1)
    tensors = {
        "input_ids": input_ids, "labels": batch["labels"], "attention_masks": batch["attention_masks"].long(),
        "images_clip": batch["images_clip"], "images_sam": batch["images"],
        "crops": torch.cat(batch["cropped_images_encode"]), "boxes": torch.cat(batch["encode_bboxes_list"]),
"seg_features": captured["projected"][0][seg_mask].detach(),
        "low_res": torch.cat(captured["low_res"]).detach(),
    }
    for name in ("loss", "ce_loss", "mask_bce_loss", "mask_dice_loss"):
        tensors[name] = out[name].detach().reshape(1)
    grads = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
    tensors.update({f"grad.{name}": grad for name, grad in grads.items()})
    save_file({k: v.contiguous().float() if v.is_floating_point() else v.contiguous() for k, v in tensors.items()},
              str(work / "authors.safetensors"))
    (work / "authors.json").write_text(json.dumps({
        "prompts": batch["conversation_list"], "added_token_ids": ids,
        "pieces": [["<image>" if i == -200 else tokenizer.convert_ids_to_tokens(i) for i, keep in zip(row, mask) if keep]
                   for row, mask in zip(input_ids.tolist(), batch["attention_masks"].tolist())],
        "forward_backward_seconds": round(forward_seconds, 1),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__}}, indent=1))
    authors_evaluation_and_step(work, model, tokenizer)


# ------------------------------------------------- authors' side: evaluation protocol, optimizer step
EVAL_FILE = "authors_eval"
"""``authors_eval.safetensors`` / ``.json``: their chained evaluation and their weights after one AdamW step
(issue #27 items 3-4), apart from ``authors.*`` so that each part is refreshed on its own."""
MASK_DECODER_STRIDE = 16
"""The fixture keeps every 16th element of each mask-decoder tensor after the step (4 M elements in all)."""


def their_step_groups(name: str) -> str | None:
    """The group of a trainable tensor of theirs (peft names) in the optimizer-step comparison."""
    for key, group in (("lora_", "lora"), ("text_hidden_fcs", "seg_projection"), ("bbox_encoder", "box_encoder"),
                       ("embed_tokens", "embed_tokens"), ("lm_head", "lm_head"), ("mask_decoder", "mask_decoder")):
        if key in name:
            return group
    return None


def authors_evaluation_and_step(work: Path, model, tokenizer) -> None:
    """Their stage-1 validation (``validate_multi_turn_med_seg``, predicted references, no teacher forcing)
    on the same dialogues and weights, recording each round's original-size mask logits, the chained
    crops and boxes and the metrics it logs; then one AdamW step with their DeepSpeed settings on the
    gradients of the training forward. Saved as ``authors_eval.*``."""
    import functools

    import torch
    import torch.distributed as dist
    import train_ds
    from safetensors.torch import save_file
    from utils.dataset import collate_fn
    from utils.multi_turn_med_seg import ValDataset_Multi_Turn_Med_Seg

    args = train_ds.parse_args([
        "--model_name_or_path", str(work / "llava"), "--vision_tower", str(work / "clip"),
        "--dataset_dir", str(DATA_ROOT), "--vision_pretrained", str(work / "sam_vit_b.pth"), "--stage", "1",
        "--precision", "fp32", "--train_json", str(work / "data.json"), "--eval_json", str(work / "data.json")])
    if not dist.is_initialized():  # their AverageMeter.all_reduce needs a process group: gloo, one process
        dist.init_process_group("gloo", init_method=f"file://{work / 'process-group'}", rank=0, world_size=1)
    dataset = ValDataset_Multi_Turn_Med_Seg(args.eval_json, args.dataset_dir, tokenizer, args.vision_tower,
                                            args.image_size)
    loader = torch.utils.data.DataLoader(dataset, batch_size=1, shuffle=False, collate_fn=functools.partial(
        collate_fn, tokenizer=tokenizer, conv_type="mistral_instruct", use_mm_start_end=False, local_rank=0))

    class Recording:
        """``model_engine`` for their validation: the model, its boxes cast to float32 (their dataset gives
        float64 and casts only for bf16), and a record of each call's masks and reference inputs."""

        def __init__(self):
            self.calls = []

        def eval(self):
            model.eval()

        def __call__(self, **batch):
            batch = {**batch, "encode_bboxes_list": [b.float() for b in batch["encode_bboxes_list"]]}
            out = model(**batch)
            self.calls.append({"logits": out["pred_masks"][0].detach().clone(),
                               "crops": batch["cropped_images_encode"][0].detach().clone(),
                               "boxes": batch["encode_bboxes_list"][0].detach().clone()})
            return out

    class Scalars:
        def __init__(self):
            self.values = {}

        def add_scalar(self, name, value, step):
            self.values[name] = float(value)

    engine, writer = Recording(), Scalars()
    started = time.perf_counter()
    train_ds.validate_multi_turn_med_seg(loader, engine, 0, writer, args)
    eval_seconds = time.perf_counter() - started
    tensors, start = {}, 0
    for dialogue, rounds in enumerate(DIALOGUES):
        calls = engine.calls[start:start + len(rounds)]
        start += len(rounds)
        tensors[f"eval.logits.{dialogue}"] = torch.stack([call["logits"][r] for r, call in enumerate(calls)])
        tensors[f"eval.crops.{dialogue}"] = calls[-1]["crops"]  # every reference chained by the last round
        tensors[f"eval.boxes.{dialogue}"] = calls[-1]["boxes"]

    # One optimizer step: DeepSpeed's AdamW (eps 1e-8) with their ds_config (weight decay 0, betas from their
    # arguments, gradient clipping 1.0) at a fixed learning rate, their peak args.lr: their WarmupDecayLR
    # starts from warmup_min_lr 0, so their own first step changes nothing.
    trainable = [p for p in model.parameters() if p.requires_grad and p.grad is not None]
    torch.nn.utils.clip_grad_norm_(trainable, 1.0)
    optimizer = torch.optim.AdamW(trainable, lr=args.lr, betas=(args.beta1, args.beta2), eps=1e-8, weight_decay=0.0)
    optimizer.step()
    for name, param in model.named_parameters():
        if param.requires_grad and their_step_groups(name):
            tensors[f"after.{name}"] = param.detach()
    save_file({k: v.contiguous().float() for k, v in tensors.items()}, str(work / f"{EVAL_FILE}.safetensors"))
    (work / f"{EVAL_FILE}.json").write_text(json.dumps({
        "metrics": writer.values, "evaluation_seconds": round(eval_seconds, 1),
        "step": {"lr": args.lr, "betas": [args.beta1, args.beta2], "eps": 1e-8, "weight_decay": 0.0,
                 "clip_grad_norm": 1.0}}, indent=1))


JCM_CAPTURED = ("scores", "iou_targets", "refined_features", "refined_logits")
"""What ``authors_jcm`` reads out of their stage-2 forward, in ``authors_jcm.safetensors``."""


def authors_jcm(work: Path, model, batch: dict) -> None:
    """Their stage 2 (train_ds.py ``--stage 2``) on the stage-1 model just built: the judge and refine MLPs
    (their ``MaskQualityMLP``, ``RefineMLP``) attached with the shared weights, every other weight frozen,
    ``config.stage = 2``, one training-mode forward and backward of the batch; the model is put back as it
    was (stage 1, no MLPs, its trainable flags, no gradients). Saves the judge scores, the IoU targets
    (their ``compute_iou``, wrapped to read them), the refined features and the refined masks' logits at
    the original size (their ``postprocess_masks``, wrapped: the first half of each dialogue's masks are
    the refined ones), the losses and two gradients to ``authors_jcm.safetensors``."""
    import model.mediround as their_module
    import torch
    from model.bbox_head.init_bbox_decoder import MaskQualityMLP, RefineMLP
    from safetensors.torch import load_file, save_file

    inner = model.base_model.model
    sam = inner.model.visual_model
    inner.model.mask_quality_MLP, inner.model.refine_MLP = MaskQualityMLP(), RefineMLP()
    mlps = {k: v for k, v in load_file(str(work / "heads.safetensors")).items() if "MLP" in k}
    _, unexpected = model.load_state_dict(mlps, strict=False)
    assert not unexpected, unexpected
    trainable = {name: p.requires_grad for name, p in model.named_parameters()}
    for name, p in model.named_parameters():
        p.requires_grad = "MLP" in name  # train_ds.py's stage-2 freezing
    inner.config.stage = 2
    captured: dict[str, list] = {name: [] for name in JCM_CAPTURED}
    hooks = [inner.model.mask_quality_MLP.register_forward_hook(
                 lambda module, args, out: captured["scores"].append(out.detach())),
             inner.model.refine_MLP.register_forward_hook(
                 lambda module, args, out: captured["refined_features"].append(out.detach()))]
    compute_iou, postprocess = their_module.compute_iou, sam.postprocess_masks

    def reading_iou(*args, **kwargs):
        iou = compute_iou(*args, **kwargs)
        captured["iou_targets"].append(iou.detach())
        return iou

    def reading_masks(*args, **kwargs):
        masks = postprocess(*args, **kwargs)
        captured["refined_logits"].append(masks[: masks.shape[0] // 2, 0].detach())
        return masks

    their_module.compute_iou, sam.postprocess_masks = reading_iou, reading_masks
    try:
        model.train()  # as their train(): the LoRA dropout of this run is 0, so train() and eval() agree
        out = model(**{k: v for k, v in batch.items() if k not in (
            "image_paths", "conversation_list", "questions_list", "sampled_classes_list")})
        out["loss"].backward()
    finally:
        their_module.compute_iou = compute_iou
        del sam.postprocess_masks
        for hook in hooks:
            hook.remove()
    params = dict(model.named_parameters())
    tensors = {name: torch.cat(values) for name, values in captured.items()}
    tensors.update({"judge_loss": out["ce_loss"], "refine_bce_loss": out["mask_bce_loss"],
                    "refine_dice_loss": out["mask_dice_loss"], "loss": out["loss"]})
    for mlp in ("mask_quality_MLP", "refine_MLP"):
        tensors[f"grad.{mlp}.fc3.weight"] = params[f"base_model.model.model.{mlp}.fc3.weight"].grad
    save_file({k: v.detach().float().reshape(v.shape or (1,)).contiguous() for k, v in tensors.items()},
              str(work / "authors_jcm.safetensors"))
    del inner.model.mask_quality_MLP, inner.model.refine_MLP
    inner.config.stage = 1
    for name, p in model.named_parameters():
        p.requires_grad = trainable[name]
    model.zero_grad(set_to_none=True)


# ------------------------------------------------------------------------------------------- our side
def parity_config(converted: Path, sam: Path):
    """The 7B preset's switches at tiny size: fp32 (bf16 rounding would hide differences) and LoRA
    dropout 0 (the comparison must be deterministic); everything else as ``llava_med_7b_config``."""
    from mediround.model.config import llava_med_7b_config

    config = llava_med_7b_config(str(converted), str(sam))
    config.precision = "fp32"
    config.gradient_checkpointing = False
    config.lora.dropout = 0.0
    return config


def convert(work: Path) -> Path:
    """``mediround convert-llava`` of the authors'-layout folder (the conversion is part of what is proven)."""
    converted = work / "converted"
    command = [sys.executable, "-c", "from mediround_cli.main import cli; cli()", "convert-llava",
               str(work / "llava"), str(converted), "--overwrite"]
    subprocess.run(command, check=True, capture_output=True, text=True)
    return converted


def our_model(work: Path):
    """Our model from the converted folder and the SAM .pth, with the authors' head weights mapped in."""
    import re

    import torch
    from safetensors.torch import load_file

    from mediround.model.build import build_model

    model = build_model(parity_config(work / "converted", work / "sam_vit_b.pth"))
    heads = load_file(str(work / "heads.safetensors"))
    ours = dict(model.named_parameters())
    rows = model.tokenizer.convert_tokens_to_ids(list(ADDED.values()))
    with torch.no_grad():
        for name, param in ours.items():
            if "embed_tokens" in name or "lm_head" in name:
                param[rows] = heads["new_rows.embed_tokens" if "embed_tokens" in name else "new_rows.lm_head"]
        for key, value in heads.items():
            lora = re.search(r"layers\.(\d+)\.self_attn\.(q_proj|v_proj)\.lora_(A|B)", key)
            target = None
            if lora:
                target = (f"mllm.base_model.model.model.language_model.layers.{lora[1]}.self_attn.{lora[2]}"
                          f".lora_{lora[3]}.default.weight")
            elif "text_hidden_fcs" in key:
                target = "seg_projection." + key.split("text_hidden_fcs.0.")[1]
            elif "bbox_encoder" in key:
                target = "box_encoder.linear." + key.rsplit(".", 1)[1]
            elif "MLP" in key or key.startswith("new_rows."):
                continue  # JCM (stage 2) and the rows set above
            ours[target].copy_(value)
    return model


def canonical(ids: list[int], names: dict[int, str], image_run: int = 1) -> list[str]:
    """Token ids as names both sides share: base-vocabulary ids as numbers, added tokens by role, the
    image placeholder as ``image_run`` ``<image>`` entries (theirs is one id that becomes 576 positions)."""
    out = []
    for i in ids:
        if i in names:
            out += [names[i]] * (image_run if names[i] == "<image>" else 1)
        else:
            out.append(str(i))
    return out


class Report:
    """One line per quantity; the closing count."""

    def __init__(self, quiet: bool = False):
        self.results: dict[str, dict] = {}
        self.quiet = quiet

    def tensor(self, name: str, ours, theirs, atol: float, rtol: float = 0.0) -> None:
        ours, theirs = ours.detach().float().reshape(-1), theirs.detach().float().reshape(-1)
        if ours.shape != theirs.shape:
            self.add(name, False, f"shape {tuple(ours.shape)} vs {tuple(theirs.shape)}", atol)
            return
        diff = float((ours - theirs).abs().max()) if ours.numel() else 0.0
        tol = atol + rtol * float(theirs.abs().max()) if theirs.numel() else atol
        self.add(name, diff <= tol, f"{diff:.3g}", tol)

    def same(self, name: str, ours, theirs, detail: str) -> None:
        self.add(name, ours == theirs, detail, 0)

    def add(self, name: str, ok: bool, detail: str, tol: float) -> None:
        self.results[name] = {"ok": bool(ok), "detail": detail, "tol": tol}
        if not self.quiet:
                print(f"{name:<48} {'equal within ' + format(tol, '.3g') if ok else 'differs by ' + detail}", flush=True)

    def summary(self) -> str:
        good = sum(r["ok"] for r in self.results.values())
        return f"parity: {good} of {len(self.results)} quantities within tolerance"


def first_difference(a: list, b: list) -> str:
    for index, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return f"position {index}: ours {x!r} vs theirs {y!r}"
    return f"length {len(a)} vs {len(b)}" if len(a) != len(b) else "nothing"


def compare(work: Path, model, authors: dict, info: dict, report: Report) -> None:
    """Every quantity of our side against the authors' outputs (``authors``: tensors, ``info``: JSON)."""
    import torch

    from mediround.data.formats import load_dialogues
    from mediround.model.processor import load_sample

    dialogues = load_dialogues(work / "data.json", root=DATA_ROOT).dialogues
    batch = model.processor.collate([load_sample(d) for d in dialogues])
    tokenizer = model.tokenizer
    ours_names = {tokenizer.convert_tokens_to_ids(t): t for t in ADDED.values()}
    ours_names[tokenizer.convert_tokens_to_ids("<image>")] = "<image>"
    theirs_names = {info["added_token_ids"][a]: ours for a, ours in ADDED.items()}
    theirs_names[-200] = "<image>"
    their_ids = [[i for i, keep in zip(row, mask) if keep] for row, mask in
                 zip(authors["input_ids"].tolist(), authors["attention_masks"].tolist())]
    their_labels = authors["labels"].tolist()
    rows = [batch.input_ids[r, : int(batch.attention_mask[r].sum())].tolist() for r in range(len(dialogues))]
    # Prompt text as the tokens spell it: SentencePiece pieces joined ("▁" is a space), image runs as one.
    ours_prompts, theirs_prompts = [], []
    for ids in rows:
        pieces = []
        for i in ids:
            piece = "<image>" if ours_names.get(i) == "<image>" else tokenizer.convert_ids_to_tokens(i)
            if not (piece == "<image>" and pieces and pieces[-1] == "<image>"):
                pieces.append(piece)
        ours_prompts.append("".join(pieces))
    for pieces in info["pieces"]:
        theirs_prompts.append("".join(pieces).replace(
            "[BBOXINPUT]", "[REF_BOX]").replace("[CROPPEDIMAGE]", "[REF_CROP]"))
    report.same("1a prompt text (as tokenized pieces)", ours_prompts, theirs_prompts,
                first_difference(ours_prompts[0], theirs_prompts[0]))
    ours_seq = [canonical(ids, ours_names) for ids in rows]
    theirs_seq = [canonical(ids, theirs_names, 576) for ids in their_ids]
    report.same("1b token ids (added tokens by role)", ours_seq, theirs_seq,
                first_difference(ours_seq[0], theirs_seq[0]))

    def labelled(row_labels, names):
        return canonical([i for i in row_labels if i != -100], names)

    ours_lab = [labelled(batch.labels[r].tolist(), ours_names) for r in range(len(rows))]
    theirs_lab = [labelled(row, theirs_names) for row in their_labels]  # no image among labels
    report.same("1c label mask (labelled tokens)", ours_lab, theirs_lab, first_difference(ours_lab[0], theirs_lab[0]))
    ours_len = [int(m.sum()) for m in batch.attention_mask]
    theirs_len = [len(canonical(ids, theirs_names, 576)) for ids in their_ids]
    report.same("1d attention mask (lengths)", ours_len, theirs_len, f"{ours_len} vs {theirs_len}")

    def positions(seq):
        return {kind: [i for i, t in enumerate(seq) if t == kind] for kind in ("[REF_CROP]", "[REF_BOX]")}

    ours_pos = [positions(s) for s in ours_seq]
    theirs_pos = [positions(s) for s in theirs_seq]
    for r, seq in enumerate(theirs_seq):
        theirs_pos[r]["h_c"] = [i - 1 for i, t in enumerate(seq) if t == "[SEG]"]
        theirs_pos[r]["image"] = [i for i, t in enumerate(seq) if t == "<image>"][:1]
        ours_pos[r]["h_c"] = [p + model.seg_state_offset for p in batch.seg_positions[r]]
        ours_pos[r]["image"] = [i for i, t in enumerate(ours_seq[r]) if t == "<image>"][:1]
    report.same("1e positions of image/crop/box/h_c", ours_pos, theirs_pos, f"{ours_pos[0]} vs {theirs_pos[0]}")
    report.tensor("1f CLIP pixels of the image", batch.clip_pixels, authors["images_clip"][:len(rows)], 1e-5)
    report.tensor("1g CLIP pixels of the reference crops", batch.crop_pixels, authors["crops"], 1e-5)
    report.tensor("1h reference boxes", batch.boxes, authors["boxes"], 1e-6)
    theirs_sam = authors["images_sam"] if "images_sam" in authors else sam_pixels_from_uint8(authors)
    report.tensor("1i SAM pixels", batch.sam_pixels, theirs_sam, 1e-5)

    captured = []
    hook = model.sam.mask_decoder.register_forward_hook(lambda module, args, out: captured.append(out[0]))
    model.train()
    out = model(batch)
    hook.remove()
    out.loss.backward()
    ours_features = torch.cat(out.seg_features)
    report.tensor("2 h_c: projected [SEG] state per round", ours_features, authors["seg_features"], 1e-5, 1e-4)
    report.tensor("3a low-res mask logits per round", torch.cat(captured), authors["low_res"], 1e-5, 1e-4)
    weights = model.config.loss
    report.tensor("3b CE loss", out.losses["ce"] * weights.ce, authors["ce_loss"], 1e-6, 1e-5)
    report.tensor("3c BCE loss (x2)", out.losses["bce"] * weights.bce, authors["mask_bce_loss"], 1e-6, 1e-5)
    report.tensor("3d Dice loss (x0.5)", out.losses["dice"] * weights.dice, authors["mask_dice_loss"], 1e-6, 1e-5)
    report.tensor("3e total loss", out.loss, authors["loss"], 1e-6, 1e-5)
    seg_grad = dict(model.named_parameters())["seg_projection.2.weight"].grad
    report.tensor("3f gradient of the [SEG] projection", seg_grad,
                  authors["grad.base_model.model.model.text_hidden_fcs.0.2.weight"], 1e-7, 1e-3)
    box_grad = dict(model.named_parameters())["box_encoder.linear.weight"].grad
    report.tensor("3g gradient of the box encoder", box_grad,
                  authors["grad.base_model.model.model.bbox_encoder.weight"], 1e-7, 1e-3)


JCM_RECIPE = REPO / "recipes" / "jcm-7b-4gpu.yaml"


def load_jcm_weights(work: Path, model) -> None:
    """The shared judge and refine MLP weights (their ``mask_quality_MLP``/``refine_MLP`` fc1-fc3) into
    our ``model.jcm`` (Linear layers 0, 2 and 4 of ``judge_mlp``/``refine_mlp``)."""
    import torch
    from safetensors.torch import load_file

    ours = dict(model.jcm.named_parameters())
    with torch.no_grad():
        for key, value in load_file(str(work / "heads.safetensors")).items():
            if "MLP" not in key:
                continue
            mlp, fc, kind = key.split(".")[-3:]
            target = f"{'judge_mlp' if mlp == 'mask_quality_MLP' else 'refine_mlp'}.{2 * (int(fc[2:]) - 1)}.{kind}"
            ours[target].copy_(value)


def compare_jcm(work: Path, model, authors: dict, report: Report) -> None:
    """Stage 2 (issue #27 item 5) on the same batch: our stage-2 data path (``jcm_data.collect_features``
    with the 7B JCM recipe's ``feature_mode``) and objective (``stage2.JCMObjective`` with its weights)
    against the authors' stage-2 forward and backward (``authors_jcm``)."""
    import torch
    import yaml

    from mediround.data.formats import load_dialogues
    from mediround.model.processor import load_sample
    from mediround.training.jcm_data import TEACHER_FORCED, collect_features
    from mediround.training.recipe import JCMSection
    from mediround.training.stage2 import JCMObjective
    from mediround.typed import load_typed

    settings = load_typed(JCMSection, yaml.safe_load(JCM_RECIPE.read_text(encoding="utf-8"))["jcm"], str(JCM_RECIPE))
    load_jcm_weights(work, model)
    jcm = model.jcm.requires_grad_(True)
    samples = [load_sample(d) for d in load_dialogues(work / "data.json", root=DATA_ROOT).dialogues]
    entries = collect_features(model, samples, [TEACHER_FORCED], train_mode=settings.feature_mode == "train")
    features = torch.cat([entry.features[TEACHER_FORCED] for entry in entries])
    with torch.no_grad():
        refined_logits = torch.cat([entry.frame.original_logits(model.decode_low_res(
            entry.embedding, jcm.refine(entry.features[TEACHER_FORCED]))) for entry in entries])
        report.tensor("5a judge scores", jcm.judge(features), authors["scores"], 1e-5, 1e-4)
        report.tensor("5b judge targets (IoU of the raw masks)",
                      torch.cat([entry.iou[TEACHER_FORCED] for entry in entries]), authors["iou_targets"], 1e-6)
        report.tensor("5c refined features", jcm.refine(features), authors["refined_features"], 1e-5, 1e-4)
        report.tensor("5d refined mask logits (original size)", refined_logits, authors["refined_logits"], 1e-5, 1e-4)
    sums = JCMObjective(jcm, model)([(e.features[TEACHER_FORCED], e.iou[TEACHER_FORCED], e) for e in entries])
    weights = (settings.judge_weight, settings.refine_bce_weight, settings.refine_dice_weight)
    judge, bce, dice = (value * weight / features.shape[0] for value, weight in zip(sums, weights))
    (judge + bce + dice).backward()
    # Their judge BCE runs in bfloat16 (scores, targets and the loss; 8 significant bits): 1e-2 relative.
    bf16 = 1e-2 * float(authors["judge_loss"].abs().max())
    report.tensor("5e judge loss (x2)", judge, authors["judge_loss"], 1e-6, 1e-2)
    report.tensor("5f refine BCE loss (x2)", bce, authors["refine_bce_loss"], 1e-6, 1e-5)
    report.tensor("5g refine Dice loss (x0.5)", dice, authors["refine_dice_loss"], 1e-6, 1e-5)
    report.tensor("5h stage-2 total loss", judge + bce + dice, authors["loss"], 1e-6 + bf16, 1e-5)
    report.tensor("5i gradient of the refine MLP's last layer", jcm.refine_mlp[4].weight.grad,
                  authors["grad.refine_MLP.fc3.weight"], 1e-7, 1e-3)
    report.tensor("5j gradient of the judge's last layer", jcm.judge_mlp[4].weight.grad,
                  authors["grad.mask_quality_MLP.fc3.weight"], 1e-7, 1e-2)
    jcm.requires_grad_(False)
    jcm.zero_grad(set_to_none=True)
def chained_evaluation(model, work: Path) -> list[dict]:
    """Our evaluation path on the parity dialogues: ``DialogueChain`` (Algorithm 1, JCM off, the dialogue's own
    answers, references from the model's own masks with the referred rounds' ground truth beside them, as
    ``mediround eval`` chains) over a cached ``DialogueSession``; per dialogue the rounds' original-size mask
    logits, the references they were fed (CLIP pixels of the crops, boxes) and the predicted masks. An image
    is encoded once (``encode_image``) for the dialogues over it, as ``chain_dialogue(context=...)`` allows."""
    import numpy as np
    import torch

    from mediround.data.formats import load_dialogues
    from mediround.inference.chain import DialogueChain, Track
    from mediround.model import DialogueSession, encode_image
    from mediround.model.processor import load_sample

    outputs, contexts = [], {}
    model.eval()
    with torch.no_grad():
        for dialogue in load_dialogues(work / "data.json", root=DATA_ROOT).dialogues:
            sample = load_sample(dialogue)
            truth = {r.ref: sample.masks[r.ref - 1] for r in dialogue.rounds if r.ref is not None}
            track = Track()
            if dialogue.image_path not in contexts:
                contexts[dialogue.image_path] = encode_image(model, sample.image)
            chain = DialogueChain(model, dialogue, [track], DialogueSession(model, contexts[dialogue.image_path]),
                                  reference_truth=truth)
            logits, references = [], []
            while not chain.finished:
                steps = chain.next_steps()
                results = [step.session.step(step.query, step.answer, step.reference, step.refers) for step in steps]
                references += [model.processor.reference(sample.image, step.reference) for step in steps if step.refers]
                logits.append(results[0].mask_logits[0])
                chain.record(results)
            crops, boxes = model.processor.reference_inputs(references)
            masks = [prediction.mask for prediction in chain.results[track]]
            outputs.append({"logits": torch.stack(logits), "crops": crops, "boxes": boxes, "masks": masks,
                            "truth": [np.asarray(m, dtype=bool) for m in sample.masks]})
    return outputs


def our_metrics(outputs: list[dict]) -> dict[str, float]:
    """gIoU, cIoU and Dice per round and over all rounds by ``mediround.metrics`` (what ``mediround eval``
    scores with), named as their validation logs them (``val/giou_round_0``, ``val/giou_all``, ...)."""
    from mediround.metrics import aggregate, group_scores, pair_counts

    rows = []
    for output in outputs:
        for number, (mask, truth) in enumerate(zip(output["masks"], output["truth"]), start=1):
            counted = pair_counts(mask, truth)
            rows.append({"round": number, "intersection": counted.intersection, "union": counted.union,
                         "iou": counted.iou, "dice": counted.dice})
    scores = {f"round_{number - 1}": value for number, value in sorted(group_scores(rows, "round").items())}
    scores["all"] = aggregate(rows)
    return {f"val/{metric}_{name}": getattr(value, metric) for name, value in scores.items()
            for metric in ("giou", "ciou", "dice")}


def compare_evaluation(work: Path, model, authors: dict, info: dict, report: Report) -> None:
    """Item 4: each round's mask logits with references chained from predictions, those references, and
    the metrics, ours (``chained_evaluation``, ``our_metrics``) against their validation's."""
    import torch

    outputs = chained_evaluation(model, work)
    report.tensor("4a chained mask logits per round (original size)",
                  torch.cat([o["logits"].flatten() for o in outputs]),
                  torch.cat([authors[f"eval.logits.{d}"].flatten() for d in range(len(outputs))]), 1e-5, 1e-4)
    report.tensor("4b chained reference crops (CLIP pixels)", torch.cat([o["crops"] for o in outputs]),
                  torch.cat([authors[f"eval.crops.{d}"] for d in range(len(outputs))]), 1e-5)
    report.tensor("4c chained reference boxes", torch.cat([o["boxes"] for o in outputs]),
                  torch.cat([authors[f"eval.boxes.{d}"] for d in range(len(outputs))]), 1e-6)
    ours, theirs = our_metrics(outputs), info["metrics"]
    for number, metric, label in (("4d", "giou", "gIoU"), ("4e", "ciou", "cIoU"), ("4f", "dice", "Dice")):
        names = sorted(name for name in theirs if name.startswith(f"val/{metric}_"))
        report.tensor(f"{number} {label} per round and overall",
                      torch.tensor([ours.get(name, float("nan")) for name in names]),
                      torch.tensor([theirs[name] for name in names]), 1e-6)


OUR_STEP_GROUPS = (("lora_", "lora"), ("seg_projection", "seg_projection"), ("box_encoder", "box_encoder"),
                   ("embed_tokens", "embed_tokens"), ("lm_head", "lm_head"), ("sam.mask_decoder", "mask_decoder"))
STEP_LABELS = {"lora": "3h LoRA A/B", "seg_projection": "3i [SEG] projection", "box_encoder": "3j box encoder",
               "embed_tokens": "3k token embeddings", "lm_head": "3l lm_head", "mask_decoder": "3m mask decoder"}


def their_name(ours: str) -> str:
    """The authors' (peft) name of one of our trainable tensors."""
    import re

    prefix = "base_model.model.model."
    lora = re.search(r"layers\.(\d+)\.self_attn\.(q_proj|v_proj)\.lora_(A|B)", ours)
    if lora:
        return f"{prefix}layers.{lora[1]}.self_attn.{lora[2]}.lora_{lora[3]}.default.weight"
    if ours.startswith("seg_projection."):
        return prefix + "text_hidden_fcs.0." + ours.split(".", 1)[1]
    if ours.startswith("box_encoder.linear."):
        return prefix + "bbox_encoder." + ours.rsplit(".", 1)[1]
    if ours.startswith("sam.mask_decoder."):
        return prefix + "visual_model.mask_decoder." + ours.split("sam.mask_decoder.", 1)[1]
    return prefix + "embed_tokens.weight" if "embed_tokens" in ours else "base_model.model.lm_head.weight"


def step_pairs(model, authors: dict, their_ids: dict[str, int], stride: int = 1) -> dict[str, tuple]:
    """Per group, our tensors after the step and theirs, flattened and concatenated in our order: vocabulary
    rows matched by role (base rows by id, the added tokens by what they are; our ``<image>`` row has no
    counterpart; ``their_ids``: their added tokens' ids, from ``authors.json``), mask-decoder tensors every
    ``stride``-th element (the fixture keeps those)."""
    import torch

    tokenizer = model.tokenizer
    ours_rows = list(range(VOCAB)) + tokenizer.convert_tokens_to_ids(list(ADDED.values()))
    theirs_rows = list(range(VOCAB)) + [their_ids[token] for token in ADDED]
    pairs: dict[str, tuple[list, list]] = {}
    for name, param in model.named_parameters():
        group = next((g for key, g in OUR_STEP_GROUPS if key in name), None)
        if group is None or not param.requires_grad:
            continue
        key = "after." + their_name(name)
        if key not in authors:
            key = f"{key}.stride{stride}"
        ours, theirs = param.detach().float(), authors[key].float()
        if group in ("embed_tokens", "lm_head"):
            ours, theirs = ours[ours_rows], theirs[theirs_rows]
        elif group == "mask_decoder":
            ours = ours.flatten()[::stride]
            theirs = theirs.flatten() if key.endswith(f".stride{stride}") else theirs.flatten()[::stride]
        pairs.setdefault(group, ([], []))
        pairs[group][0].append(ours.flatten())
        pairs[group][1].append(theirs.flatten())
    return {group: (torch.cat(a), torch.cat(b)) for group, (a, b) in pairs.items()}


def compare_step(model, authors: dict, info: dict, their_ids: dict[str, int], report: Report,
                 stride: int = 1) -> None:
    """Item 3: every trainable tensor after one AdamW step on the gradients of ``compare``'s backward, ours
    with our training defaults (``TrainSection``: the paper's AdamW, clipping) at their learning rate
    (``info``: ``authors_eval.json``)."""
    import torch

    from mediround.training.recipe import TrainSection

    settings = TrainSection()
    step = info["step"]
    assert (settings.lr, list(settings.betas), settings.eps, settings.weight_decay, settings.clip_grad_norm) == (
        step["lr"], step["betas"], step["eps"], step["weight_decay"], step["clip_grad_norm"]), \
        f"our optimizer defaults differ from the authors' step settings {step}"
    trainable = [p for p in model.parameters() if p.requires_grad and p.grad is not None]
    torch.nn.utils.clip_grad_norm_(trainable, settings.clip_grad_norm)
    torch.optim.AdamW(trainable, lr=settings.lr, betas=settings.betas, eps=settings.eps,
                      weight_decay=settings.weight_decay).step()
    pairs = step_pairs(model, authors, their_ids, stride)
    for group, label in STEP_LABELS.items():
        report.tensor(f"{label} after one AdamW step", *pairs[group], 1e-7, 1e-5)


# ------------------------------------------------------------------------------------------------ main
def ensure_env(env: Path) -> Path:
    """The reference environment's python, created with ``ENV_PINS`` when missing."""
    python = env / "bin" / "python"
    if not python.is_file():
        subprocess.run([sys.executable, "-m", "venv", str(env)], check=True)
    check = subprocess.run([str(python), "-c", ("import transformers, peft, sentencepiece, cv2, torch, PIL; "
                            "assert transformers.__version__ == '4.40.2' and peft.__version__ == '0.4.0'")],
                           capture_output=True, check=False)
    if check.returncode != 0:
        subprocess.run([str(python), "-m", "pip", "install", "-q", *ENV_PINS], check=True)
    return python


def run(work: Path, env: Path, fixture: Path | None, ours_only: bool = False) -> int:
    from safetensors.torch import load_file

    started = time.perf_counter()
    python = ensure_env(env)
    work.mkdir(parents=True, exist_ok=True)
    checksum = write_weights(work)
    authors_started = time.perf_counter()
    if not ours_only:
        subprocess.run([str(python), str(Path(__file__).resolve()), "--authors-side", str(work)], check=True,
                       env={**os.environ, "PYTHONPATH": ""})
    authors_seconds = time.perf_counter() - authors_started
    convert(work)
    model = our_model(work)
    authors = load_file(str(work / "authors.safetensors"))
    info = json.loads((work / "authors.json").read_text())
    report, jcm_report = Report(), Report()
    # Stage 2 first, on the initial weights as their side runs it; its backward also reaches the mask
    # decoder, whose stage-1 gradients ``compare`` and ``compare_step`` then check: cleared in between.
    compare_jcm(work, model, load_file(str(work / "authors_jcm.safetensors")), jcm_report)
    model.zero_grad(set_to_none=True)
    compare(work, model, authors, info, report)
    authors_eval = load_file(str(work / f"{EVAL_FILE}.safetensors"))
    eval_info = json.loads((work / f"{EVAL_FILE}.json").read_text())
    compare_evaluation(work, model, authors_eval, eval_info, report)
    compare_step(model, authors_eval, eval_info, info["added_token_ids"], report)
    whole = Report()
    whole.results = {**jcm_report.results, **report.results}
    print(whole.summary())
    print(f"(authors' side {authors_seconds:.0f} s, whole run {time.perf_counter() - started:.0f} s)")
    if fixture is not None:
        write_fixture(work, fixture, authors, info, checksum, report)
        write_eval_fixture(fixture, authors_eval, eval_info, info["added_token_ids"], model, report)
        write_jcm_fixture(work, fixture, jcm_report)
    return 0


SAM_MEAN = (123.675, 116.28, 103.53)
SAM_STD = (58.395, 57.12, 57.375)


def sam_pixels_as_uint8(pixels) -> dict:
    """Their SAM input is (uint8 PIL resize - mean) / std, zero-padded, and both dialogues share the image:
    the first row's uint8 resized image holds it exactly in 1/12 of the bytes (3 MB instead of 25)."""
    import torch

    mean, std = torch.tensor(SAM_MEAN).view(3, 1, 1), torch.tensor(SAM_STD).view(3, 1, 1)
    values = (pixels[0] * std + mean).round()
    inside = (pixels[0] != 0).any(0)
    height, width = int(inside.any(1).nonzero().max()) + 1, int(inside.any(0).nonzero().max()) + 1
    return {"images_sam_uint8": values[:, :height, :width].to(torch.uint8),
            "images_sam_rows": torch.tensor([pixels.shape[0], pixels.shape[-1]])}


def sam_pixels_from_uint8(authors: dict):
    """The inverse of ``sam_pixels_as_uint8``."""
    import torch
    import torch.nn.functional as F

    rows, size = authors["images_sam_rows"].tolist()
    image = authors["images_sam_uint8"].float()
    image = (image - torch.tensor(SAM_MEAN).view(3, 1, 1)) / torch.tensor(SAM_STD).view(3, 1, 1)
    image = F.pad(image, (0, size - image.shape[-1], 0, size - image.shape[-2]))
    return image[None].expand(rows, -1, -1, -1)


def write_fixture(work: Path, fixture: Path, authors: dict, info: dict, checksum: str, report: Report) -> None:
    """The authors' outputs the CI test compares against (no gradients of large tensors, no weights)."""
    import shutil

    from safetensors.torch import save_file

    fixture.mkdir(parents=True, exist_ok=True)
    kept = {k: v for k, v in authors.items() if not k.startswith("grad.") or "text_hidden_fcs.0.2.weight" in k
            or "bbox_encoder.weight" in k}
    kept.update(sam_pixels_as_uint8(kept.pop("images_sam")))
    save_file(kept, str(fixture / "authors.safetensors"))
    for name in ("tokenizer.model", "tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(work / "llava" / name, fixture / name)
    (fixture / "authors.json").write_text(json.dumps({**info, "weights_sha256": checksum, "seed": SEED,
                                                      "results": {name: result for name, result in report.results.items()
                                                                  if not name.startswith(EVAL_QUANTITIES)}},
                                                     indent=1) + "\n")


EVAL_QUANTITIES = ("4", "3h", "3i", "3j", "3k", "3l", "3m")
"""The quantities of ``compare_evaluation`` and ``compare_step`` (their results live in ``authors_eval.json``)."""


def write_eval_fixture(fixture: Path, authors_eval: dict, eval_info: dict, their_ids: dict[str, int], model,
                       report: Report) -> None:
    """``authors_eval.*`` for the CI test: the chained logits, references and metrics, and the weights after
    the step (mask-decoder tensors every ``MASK_DECODER_STRIDE``-th element, with the results of comparing
    those elements, which the test reproduces)."""
    from safetensors.torch import save_file

    kept = {}
    for key, value in authors_eval.items():
        if key.startswith("after.") and "mask_decoder" in key:
            kept[f"{key}.stride{MASK_DECODER_STRIDE}"] = value.flatten()[::MASK_DECODER_STRIDE].contiguous()
        else:
            kept[key] = value
    save_file(kept, str(fixture / f"{EVAL_FILE}.safetensors"))
    results = {name: result for name, result in report.results.items() if name.startswith(EVAL_QUANTITIES)}
    strided = Report(quiet=True)
    for group, (ours, theirs) in step_pairs(model, kept, their_ids, MASK_DECODER_STRIDE).items():
        if group == "mask_decoder":
            strided.tensor(f"{STEP_LABELS[group]} after one AdamW step", ours, theirs, 1e-7, 1e-5)
    results.update(strided.results)
    (fixture / f"{EVAL_FILE}.json").write_text(json.dumps({**eval_info, "results": results}, indent=1) + "\n")


def write_jcm_fixture(work: Path, fixture: Path, report: Report) -> None:
    """The authors' stage-2 outputs (``authors_jcm``) and the JCM rows of this run, apart from the
    stage-1 fixture."""
    import shutil

    shutil.copyfile(work / "authors_jcm.safetensors", fixture / "authors_jcm.safetensors")
    (fixture / "authors_jcm.json").write_text(json.dumps({"results": report.results}, indent=1) + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--env", type=Path, default=DEFAULT_ENV, help="the reference environment (created if missing)")
    parser.add_argument("--work", type=Path, default=DEFAULT_WORK, help="weights and outputs of both sides")
    parser.add_argument("--write-fixture", action="store_true", help=f"refresh {FIXTURE.relative_to(REPO)}")
    parser.add_argument("--ours-only", action="store_true",
                        help="reuse the authors' outputs already in --work (after a change on our side only)")
    parser.add_argument("--authors-side", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.authors_side is not None:
        authors_side(args.authors_side)
        return 0
    return run(args.work, args.env, FIXTURE if args.write_fixture else None, args.ours_only)


if __name__ == "__main__":
    sys.exit(main())
