"""The transformers detectors with random weights, saved by transformers' own `save_pretrained` (model and processor)
as the official repositories hold them: what tests and benchmarks load through the backend's own loader. `small`
shrinks every part (tests); otherwise the official configurations' sizes are kept (benchmarks)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
import transformers
from safetensors.torch import load_file, save_file
from transformers.convert_slow_tokenizer import bytes_to_unicode

from backend.models.registry import MODEL_BUILD_LOCK
from backend.models.transformers_detectors import ARCHITECTURES
from tests.grounding_dino_weights import write_text_encoder

SMALL_SWIN = {"embed_dim": 32, "depths": [1, 1, 1, 1], "num_heads": [1, 2, 2, 4], "out_indices": [2, 3, 4]}
SMALL_BERT = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64}
SMALL_CLIP = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64}


def write_grounding_dino(folder: Path, kind: str = "grounding-dino", small: bool = True, seed: int = 0) -> Path:
    """GroundingDINO (`kind` "grounding-dino") or MM-GroundingDINO ("mm-grounding-dino") with a BERT tokenizer."""
    _, model_class, _, _ = ARCHITECTURES[kind]
    config_class = getattr(transformers, model_class.replace("ForObjectDetection", "Config"))
    text_folder = write_text_encoder(folder / "text", **({} if small else {"hidden": 768, "vocab_size": 30522}))
    vocab_size = len((text_folder / "vocab.txt").read_text().split())
    if small:
        config = config_class(
            backbone_config={"model_type": "swin", **SMALL_SWIN},
            text_config={"model_type": "bert", "vocab_size": vocab_size, **SMALL_BERT},
            d_model=32,
            encoder_layers=1,
            # transformers 5 ties every decoder layer's box head to the first one's and refuses to build a
            # decoder of one layer (nothing to tie): two is the least it takes.
            decoder_layers=2,
            encoder_ffn_dim=64,
            decoder_ffn_dim=64,
            encoder_attention_heads=2,
            decoder_attention_heads=2,
            num_queries=50,
        )
    else:
        config = config_class(text_config={"model_type": "bert", "vocab_size": vocab_size})
    torch.manual_seed(seed)
    with MODEL_BUILD_LOCK:
        model = getattr(transformers, model_class)(config)
    model.save_pretrained(folder)
    processor = transformers.GroundingDinoProcessor(
        transformers.GroundingDinoImageProcessor(), transformers.BertTokenizerFast.from_pretrained(text_folder)
    )
    save_as_the_official_repositories_do(processor, folder)
    shutil.copy(text_folder / "vocab.txt", folder / "vocab.txt")
    return folder


def save_as_the_official_repositories_do(processor: transformers.ProcessorMixin, folder: Path) -> None:
    """The processor's files as the official repositories (saved by transformers 4) hold them: the image processor's
    preprocessor_config.json and the tokenizer's special_tokens_map.json besides its own files. transformers 5
    reads these; its `processor.save_pretrained` would write one processor_config.json instead, and no special
    tokens map."""
    processor.image_processor.save_pretrained(folder)  # type: ignore[attr-defined]
    tokenizer = processor.tokenizer  # type: ignore[attr-defined]
    tokenizer.save_pretrained(folder)
    (folder / "special_tokens_map.json").write_text(json.dumps(tokenizer.special_tokens_map))


def write_clip_tokenizer(folder: Path, context: int, pad_token: str = "!") -> transformers.CLIPTokenizer:
    """A CLIP byte-level BPE tokenizer of single characters (no merges): vocab.json and merges.txt in `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    characters = list(bytes_to_unicode().values())
    vocab = characters + [f"{character}</w>" for character in characters] + ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({token: index for index, token in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return transformers.CLIPTokenizer(
        str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=context, pad_token=pad_token
    )


def write_owlv2(folder: Path, small: bool = True, seed: int = 0) -> Path:
    """OWLv2 with a CLIP tokenizer of single characters."""
    tokenizer = write_clip_tokenizer(folder, 16)
    image_size = 128 if small else 960
    vision = {"image_size": image_size, "patch_size": 16, **(SMALL_CLIP if small else {})}
    text = {"vocab_size": len(tokenizer), "max_position_embeddings": 16, **(SMALL_CLIP if small else {})}
    config = transformers.Owlv2Config(text_config=text, vision_config=vision, projection_dim=32 if small else 512)
    torch.manual_seed(seed)
    with MODEL_BUILD_LOCK:
        model = transformers.Owlv2ForObjectDetection(config)
    # transformers 5 draws the heads' weights with the config's initializer_factor (1.0) as their deviation, which
    # saturates every random box onto the image's edges (and most scores to 1); a trained model's boxes lie inside.
    # The box and class heads get PyTorch's own initialisation instead, as they had under transformers 4.
    for layer in [*model.box_head.modules(), *model.class_head.modules()]:
        if isinstance(layer, torch.nn.Linear):
            layer.reset_parameters()
    model.save_pretrained(folder)
    image_processor = transformers.Owlv2ImageProcessor(size={"height": image_size, "width": image_size})
    save_as_the_official_repositories_do(transformers.Owlv2Processor(image_processor, tokenizer), folder)
    return folder


def write_sam3(folder: Path, small: bool = True, seed: int = 0) -> Path:
    """SAM 3 as facebook/sam3 holds it: the whole `Sam3VideoModel` (detector and tracker on one image encoder) saved
    by `save_pretrained`, with `Sam3Processor`'s files and a CLIP tokenizer of single characters. `small` keeps the
    official image size and patches (so every feature map has its official size) with narrow layers and 20 queries."""
    tokenizer = write_clip_tokenizer(folder, 32)
    vit = {"model_type": transformers.Sam3ViTConfig.model_type}
    if small:
        vit |= {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2}
        vit |= {"global_attn_indexes": [1]}
    text = {"vocab_size": len(tokenizer), "max_position_embeddings": 32, "bos_token_id": len(tokenizer) - 2}
    text |= {"eos_token_id": len(tokenizer) - 1}
    # The detector keeps the official width (256): its neck, like the tracker's, feeds the tracker's mask decoder.
    narrow = {"num_attention_heads": 2}
    layers = {**narrow, "intermediate_size": 64, "num_layers": 1}
    detector = (
        transformers.Sam3Config(
            vision_config={"backbone_config": vit},
            text_config={**SMALL_CLIP, **text, "projection_dim": 32},
            geometry_encoder_config=layers,
            detr_encoder_config=layers,
            detr_decoder_config={**layers, "num_layers": 2, "num_queries": 20},
            mask_decoder_config=narrow,
        )
        if small
        else transformers.Sam3Config(text_config=text)
    )
    tracker = {"vision_config": {"backbone_config": vit, "backbone_feature_sizes": [[288, 288], [144, 144], [72, 72]]}}
    if small:  # one narrow memory-attention layer: each tracked frame attends over 72×72 tokens of every memory
        tracker |= {"memory_attention_num_layers": 1, "memory_attention_feed_forward_hidden_size": 64}
    config = transformers.Sam3VideoConfig(detector_config=detector.to_dict(), tracker_config=tracker)
    torch.manual_seed(seed)
    with MODEL_BUILD_LOCK:
        model = transformers.Sam3VideoModel(config)
    model.save_pretrained(folder)
    # transformers 5.25 saves the tracker's tensors under tracker_model.tracker_model. (its sam3_tracker key mapping,
    # reverted on save, adds the prefix a second time); facebook/sam3 holds them under tracker_model. once, where
    # that mapping reads them.
    tensors = load_file(folder / "model.safetensors")
    doubled = "tracker_model.tracker_model."
    official = {key.replace(doubled, "tracker_model.", 1): tensor for key, tensor in tensors.items()}
    save_file(official, folder / "model.safetensors", metadata={"format": "pt"})
    transformers.Sam3Processor(image_processor=transformers.Sam3ImageProcessor(), tokenizer=tokenizer).save_pretrained(
        folder
    )
    return folder


def write_detector(folder: Path, kind: str, small: bool = True) -> Path:
    """The folder DETECTOR_MODEL names for the transformers detector `kind`."""
    if kind == "owlv2":
        return write_owlv2(folder, small)
    if kind == "sam3":
        return write_sam3(folder, small)
    return write_grounding_dino(folder, kind, small)
