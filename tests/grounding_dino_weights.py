"""GroundingDINO with random weights, saved in the official checkpoint format, plus a local BERT text encoder:
what tests and benchmarks load through the backend's own loader, with nothing downloaded."""

from __future__ import annotations

import string
from pathlib import Path

import torch
from transformers import BertConfig, BertModel, BertTokenizerFast

from backend.models.grounding_dino import build_grounding_dino, packaged_config
from backend.models.registry import MODEL_BUILD_LOCK

# Enough whole words for the prompts the tests type; any other word is spelt with the letter pieces.
WORDS = "car wheel tyre tire person dog cat box bottle red blue sedan window road tree sky shape object".split()


def write_text_encoder(
    folder: Path, hidden: int = 32, layers: int = 1, heads: int = 2, intermediate: int = 64, vocab_size: int = 0
) -> Path:
    """A BERT folder (config, weights, uncased WordPiece vocab) that `AutoTokenizer` and `BertModel` read.

    `vocab_size` pads the vocabulary with filler tokens up to that size, to match bert-base's embedding cost."""
    letters = list(string.ascii_lowercase + string.digits)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", "?", ",", ":", "-", *letters]
    vocab += [f"##{letter}" for letter in letters] + WORDS
    vocab += [f"[unused{index}]" for index in range(max(vocab_size - len(vocab), 0))]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=intermediate,
        max_position_embeddings=512,
    )
    torch.manual_seed(0)
    with MODEL_BUILD_LOCK:  # see MODEL_BUILD_LOCK: a model loading on another thread would leave these empty
        model = BertModel(config)
    model.save_pretrained(folder)
    # transformers 5's tokenizers take the vocabulary itself (a vocab_file argument would be ignored silently).
    vocabulary = {token: index for index, token in enumerate(vocab)}
    BertTokenizerFast(vocab=vocabulary, do_lower_case=True).save_pretrained(folder)
    return folder


def write_config(path: Path, **overrides: object) -> Path:
    """The packaged SwinT OGC config with some settings changed (e.g. fewer layers for fast tests)."""
    lines = [packaged_config().read_text()] + [f"{name} = {value!r}" for name, value in overrides.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def write_checkpoint(path: Path, config: Path, text_encoder: Path, seed: int = 0) -> Path:
    """Random weights for the model `config` describes, saved as the official file is: {"model": state_dict}."""
    from groundingdino.util.slconfig import SLConfig

    args = SLConfig.fromfile(str(config))
    args.text_encoder_type = str(text_encoder)
    args.device = "cpu"
    torch.manual_seed(seed)
    with MODEL_BUILD_LOCK:
        model = build_grounding_dino(args)
    torch.save({"model": model.state_dict()}, path)
    return path
