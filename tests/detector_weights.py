"""The transformers detectors with random weights, saved by transformers' own `save_pretrained` (model and processor)
as the official repositories hold them: what tests and benchmarks load through the backend's own loader. `small`
shrinks every part (tests); otherwise the official configurations' sizes are kept (benchmarks)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
import transformers
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


def write_owlv2(folder: Path, small: bool = True, seed: int = 0) -> Path:
    """OWLv2 with a CLIP byte-level BPE tokenizer of single characters (no merges)."""
    folder.mkdir(parents=True, exist_ok=True)
    characters = list(bytes_to_unicode().values())
    vocab = characters + [f"{character}</w>" for character in characters] + ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({token: index for index, token in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = transformers.CLIPTokenizer(
        str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=16, pad_token="!"
    )
    image_size = 128 if small else 960
    vision = {"image_size": image_size, "patch_size": 16, **(SMALL_CLIP if small else {})}
    text = {"vocab_size": len(vocab), "max_position_embeddings": 16, **(SMALL_CLIP if small else {})}
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


def write_detector(folder: Path, kind: str, small: bool = True) -> Path:
    """The folder DETECTOR_MODEL names for the transformers detector `kind`."""
    if kind == "owlv2":
        return write_owlv2(folder, small)
    return write_grounding_dino(folder, kind, small)
