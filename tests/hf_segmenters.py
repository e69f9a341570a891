"""SAM 2.1, EdgeTAM, SAM-HQ and SAM 3's tracker with random weights, saved by transformers' own `save_pretrained` as the
backend loads them: at reduced sizes for the tests, at the official sizes for bench/models.py.

`python -m tests.hf_segmenters FOLDER reduced|official [NAME ...]` writes one model folder per name. It runs as
its own process because EdgeTAM's config, when saved, is compared with a default one whose RepViT backbone
config transformers asks the Hugging Face hub for; that config (timm's `repvit_m1.dist_in1k`, whose only field
that matters here is the architecture) is supplied from a local hub cache, which huggingface_hub reads from
HF_HUB_CACHE only when it is imported.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.assets import REPO

REPVIT_REPO = "timm/repvit_m1.dist_in1k"
REPVIT_CONFIG = {"architecture": "repvit_m1", "num_classes": 1000, "num_features": 384, "label_names": ["class"]}
FEATURES_ONLY = {"in_chans": 3, "features_only": True, "out_indices": [0, 1, 2, 3]}


def hiera(width: int, heads: int, blocks: list[int], global_blocks: list[int], **extra: object) -> dict:
    """A Hiera trunk as SAM 2 builds one: each of its four stages twice the previous one's width and heads."""
    return {
        "hidden_size": width,
        "num_attention_heads": heads,
        "embed_dim_per_stage": [width * 2**stage for stage in range(4)],
        "num_attention_heads_per_stage": [heads * 2**stage for stage in range(4)],
        "blocks_per_stage": blocks,
        "global_attention_blocks": global_blocks,
        **extra,
    }


# The official Hiera sizes (SAM 2.1's sam2.1_hiera_{t,s,b+,l}.yaml).
HIERA = {
    "sam2.1-hiera-tiny": hiera(96, 1, [1, 2, 7, 2], [5, 7, 9]),
    "sam2.1-hiera-small": hiera(96, 1, [1, 2, 11, 2], [7, 10, 13]),
    "sam2.1-hiera-base-plus": hiera(
        112, 2, [2, 3, 16, 3], [12, 16, 20], window_positional_embedding_background_size=[14, 14]
    ),
    "sam2.1-hiera-large": hiera(144, 2, [2, 6, 36, 4], [23, 33, 43], window_size_per_stage=[8, 4, 16, 8]),
}
# The official SAM-HQ ViT sizes (Meta's SAM ViT-B/L/H encoders).
HQ_VIT = {
    "sam-hq-vit-b": {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12},
    "sam-hq-vit-l": {
        "hidden_size": 1024,
        "num_hidden_layers": 24,
        "num_attention_heads": 16,
        "global_attn_indexes": [5, 11, 17, 23],
    },
    "sam-hq-vit-h": {
        "hidden_size": 1280,
        "num_hidden_layers": 32,
        "num_attention_heads": 16,
        "global_attn_indexes": [7, 15, 23, 31],
    },
}
REDUCED = ("sam2.1-hiera-tiny", "edgetam", "sam-hq-vit-b", "sam3")
# The reduced Hiera trunk: four narrow stages, one block of global attention.
REDUCED_HIERA = {
    "hidden_size": 16,
    "embed_dim_per_stage": [16, 32, 64, 128],
    "num_attention_heads_per_stage": [1, 1, 2, 2],
    "blocks_per_stage": [1, 1, 2, 1],
    "global_attention_blocks": [3],
}
# The video predictors, reduced further for the video tests: frames read at 256 pixels (the official models read
# 1024), so a 16×16 memory per frame, and one memory-attention layer.
VIDEO_MODELS = ("sam2.1-hiera-tiny-video", "edgetam-video")
VIDEO_SIZE = 256
REDUCED_MEMORY = {
    "memory_attention_num_layers": 1,
    "memory_fuser_intermediate_dim": 64,
    "image_size": VIDEO_SIZE,
    "memory_attention_rope_feat_sizes": [VIDEO_SIZE // 16] * 2,
    "prompt_encoder_config": {"image_size": VIDEO_SIZE},
}
VIDEO_FEATURE_SIZES = [[VIDEO_SIZE // 4] * 2, [VIDEO_SIZE // 8] * 2, [VIDEO_SIZE // 16] * 2]
# SAM 3's feature maps at its 1008-pixel input (14-pixel patches: 72x72, upsampled 2x and 4x by its neck).
SAM3_FEATURE_SIZES = [[288, 288], [144, 144], [72, 72]]


def build(name: str, reduced: bool):  # -> (model, processor), transformers objects
    import torch
    import transformers as tf

    torch.manual_seed(0)
    if name in VIDEO_MODELS:
        return build_video(name)
    if name.startswith("sam2.1"):
        hiera = REDUCED_HIERA if reduced else HIERA[name]
        backbone = tf.Sam2HieraDetConfig(**hiera)
        channels = list(reversed(backbone.embed_dim_per_stage))
        vision = tf.Sam2VisionConfig(backbone_config=backbone, backbone_channel_list=channels)
        model = tf.Sam2Model(tf.Sam2Config(vision_config=vision))
        processor = tf.Sam2Processor(image_processor=tf.Sam2ImageProcessor())
    elif name == "sam3":
        # The reduced ViT keeps the official input size, patch size and windows (so the feature maps, the
        # decoder and the cache entry have their official sizes) with 2 narrow layers, one of global attention.
        vit = (
            tf.Sam3ViTConfig(
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=2,
                num_attention_heads=2,
                global_attn_indexes=[1],
            )
            if reduced
            else tf.Sam3ViTConfig()
        )
        vision = tf.Sam3VisionConfig(backbone_config=vit, backbone_feature_sizes=SAM3_FEATURE_SIZES)
        model = tf.Sam3TrackerModel(tf.Sam3TrackerConfig(vision_config=vision))
        processor = tf.Sam3TrackerProcessor(image_processor=tf.Sam3ImageProcessor())
    elif name == "edgetam":
        # RepViT m0.9 has m1's stage widths with fewer blocks.
        backbone = tf.TimmWrapperConfig(
            architecture="repvit_m0_9" if reduced else "repvit_m1", model_args=FEATURES_ONLY
        )
        model = tf.EdgeTamModel(tf.EdgeTamConfig(vision_config=tf.EdgeTamVisionConfig(backbone_config=backbone)))
        processor = tf.Sam2Processor(image_processor=tf.Sam2ImageProcessor())
    else:
        vit = (
            {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2, "global_attn_indexes": [1]}
            if reduced
            else HQ_VIT[name]
        )
        config = tf.SamHQConfig(
            vision_config=tf.SamHQVisionConfig(**vit),
            mask_decoder_config=tf.SamHQMaskDecoderConfig(vit_dim=vit["hidden_size"]),
        )
        model = tf.SamHQModel(config)
        processor = tf.SamHQProcessor(image_processor=tf.SamImageProcessor())
    return model.eval(), processor


def build_video(name: str, reduced: bool = True):  # -> (model, processor)
    """A video predictor and its processor: reduced (VIDEO_MODELS, reading VIDEO_SIZE-pixel frames) for the tests,
    or at its official size (`sam2.1-hiera-*`, `edgetam`, `sam3`) for bench/video.py."""
    import transformers as tf

    if name == "sam3":  # official size only: the tests read the reduced SAM 3 that tests/detector_weights.py writes
        image_processor = tf.Sam3ImageProcessor()
        vision = tf.Sam3VisionConfig(backbone_feature_sizes=SAM3_FEATURE_SIZES)
        model = tf.Sam3TrackerVideoModel(tf.Sam3TrackerVideoConfig(vision_config=vision))
        video_processor = tf.Sam2VideoVideoProcessor(
            size=image_processor.size, image_mean=image_processor.image_mean, image_std=image_processor.image_std
        )
        return model.eval(), tf.Sam3TrackerVideoProcessor(image_processor, video_processor)
    size = {"height": VIDEO_SIZE, "width": VIDEO_SIZE} if reduced else {"height": 1024, "width": 1024}
    processor = tf.Sam2VideoProcessor(
        image_processor=tf.Sam2ImageProcessor(size=size), video_processor=tf.Sam2VideoVideoProcessor(size=size)
    )
    if name.startswith("edgetam"):
        backbone = tf.TimmWrapperConfig(
            architecture="repvit_m0_9" if reduced else "repvit_m1", model_args=FEATURES_ONLY
        )
        if not reduced:
            vision = tf.EdgeTamVisionConfig(backbone_config=backbone)
            return tf.EdgeTamVideoModel(tf.EdgeTamVideoConfig(vision_config=vision)).eval(), processor
        vision = tf.EdgeTamVisionConfig(backbone_config=backbone, backbone_feature_sizes=VIDEO_FEATURE_SIZES)
        memory = {**REDUCED_MEMORY, "memory_attention_mlp_hidden_size": 64, "memory_attention_rope_k_sizes": [8, 8]}
        return tf.EdgeTamVideoModel(tf.EdgeTamVideoConfig(vision_config=vision, **memory)).eval(), processor
    if not reduced:
        backbone = tf.Sam2HieraDetConfig(**HIERA[name])
        channels = list(reversed(backbone.embed_dim_per_stage))
        vision = tf.Sam2VisionConfig(backbone_config=backbone, backbone_channel_list=channels)
        return tf.Sam2VideoModel(tf.Sam2VideoConfig(vision_config=vision)).eval(), processor
    backbone = tf.Sam2HieraDetConfig(**REDUCED_HIERA, image_size=[VIDEO_SIZE, VIDEO_SIZE])
    channels = list(reversed(backbone.embed_dim_per_stage))
    vision = tf.Sam2VisionConfig(
        backbone_config=backbone, backbone_channel_list=channels, backbone_feature_sizes=VIDEO_FEATURE_SIZES
    )
    memory = {**REDUCED_MEMORY, "memory_attention_feed_forward_hidden_size": 64}
    return tf.Sam2VideoModel(tf.Sam2VideoConfig(vision_config=vision, **memory)).eval(), processor


def official_sam3_layout(tracker_folder: Path, folder: Path) -> Path:
    """The reduced SAM 3 tracker laid out as facebook/sam3 is: a `sam3_video` config whose tracker_config describes
    the tracker, and one checkpoint of the whole model, where the tracker's own tensors sit under tracker_model.,
    the image encoder's backbone (shared with the detector) under detector_model.vision_encoder.backbone. and the
    tracker's neck under tracker_neck.; the detector's other tensors (here one) are not the tracker's."""
    import torch
    from safetensors.torch import load_file, save_file

    folder.mkdir()
    tracker = json.loads((tracker_folder / "config.json").read_text())
    tracker["model_type"] = "sam3_tracker_video"
    config = {"model_type": "sam3_video", "architectures": ["Sam3VideoModel"], "tracker_config": tracker}
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "processor_config.json").write_bytes((tracker_folder / "processor_config.json").read_bytes())
    saved = load_file(tracker_folder / "model.safetensors")
    official = {}
    for key, tensor in saved.items():
        for part in ("detector_model.vision_encoder.backbone.", "tracker_neck."):
            key = key.replace("tracker_model." + part, part)
        official[key] = tensor
    assert any(key.startswith("detector_model.vision_encoder.backbone.") for key in official)
    assert any(key.startswith("tracker_neck.") for key in official)
    official["detector_model.text_projection.weight"] = torch.ones(4, 4)
    save_file(official, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


def write_models(folder: Path, reduced: bool, names: tuple[str, ...] = REDUCED) -> dict[str, Path]:
    """Each named model saved under `folder`/name, built in a child process (see the module's docstring)."""
    hub = folder / "hub"
    snapshot = hub / f"models--{REPVIT_REPO.replace('/', '--')}" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True, exist_ok=True)
    (snapshot / "config.json").write_text(json.dumps(REPVIT_CONFIG))
    (snapshot.parents[1] / "refs").mkdir(exist_ok=True)
    (snapshot.parents[1] / "refs" / "main").write_text("0" * 40)
    env = dict(os.environ, HF_HUB_CACHE=str(hub), HF_HUB_OFFLINE="1")
    command = [sys.executable, "-m", "tests.hf_segmenters", str(folder), "reduced" if reduced else "official", *names]
    subprocess.run(command, cwd=REPO, env=env, check=True)
    return {name: folder / name for name in names}


def main(argv: list[str]) -> None:
    folder, size, *names = argv
    for name in names:
        model, processor = build(name, size == "reduced")
        model.save_pretrained(folder + "/" + name)
        if name == "sam3":  # facebook/sam3 was saved by transformers 5: one processor_config.json
            processor.save_pretrained(folder + "/" + name)
            continue
        # As the official repositories hold them (saved by transformers 4): the image processor's own
        # preprocessor_config.json, which transformers 5 reads as well (its processor.save_pretrained would write a
        # processor_config.json instead).
        processor.image_processor.save_pretrained(folder + "/" + name)


if __name__ == "__main__":
    main(sys.argv[1:])
