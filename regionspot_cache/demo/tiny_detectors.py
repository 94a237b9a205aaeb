"""Tiny random-weight open-vocabulary detectors written as ``transformers`` model directories
(config, weights, processor, tokenizer files), for tests and the CPU benchmark: no download.

The tokenizers are built from files written here: a BERT WordPiece vocabulary for Grounding
DINO, a CLIP byte-level BPE vocabulary (every byte, no merges) for OWLv2 and SAM 3.
"""

from __future__ import annotations

import json
import string
from pathlib import Path

WORDS = ["cat", "dog", "car", "person", "trash", "can", "bird", "cup", "tree", "boat", "horse", "object"]


def _seeded(seed: int) -> None:
    import torch

    torch.manual_seed(seed)


def write_tiny_grounding_dino(directory: Path | str, seed: int = 0, image_size: int = 96) -> Path:
    """A Grounding DINO (Swin backbone, BERT text encoder) a few hundred kB large."""
    from transformers import (
        BertConfig,
        BertTokenizer,
        GroundingDinoConfig,
        GroundingDinoForObjectDetection,
        GroundingDinoImageProcessor,
        GroundingDinoProcessor,
        SwinConfig,
    )

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", "?", *WORDS, *string.ascii_lowercase]
    vocab_file = directory / "vocab.txt"
    vocab_file.write_text("\n".join(vocab) + "\n")
    tokenizer = BertTokenizer(vocab_file=str(vocab_file), do_lower_case=True)
    swin = SwinConfig(
        embed_dim=8,
        depths=[1, 1, 1, 1],
        num_heads=[1, 1, 1, 1],
        window_size=4,
        image_size=image_size,
        out_features=["stage2", "stage3", "stage4"],
    )
    bert = BertConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=64,
    )
    config = GroundingDinoConfig(
        backbone_config=swin,
        text_config=bert,
        d_model=32,
        encoder_layers=1,
        decoder_layers=2,
        encoder_ffn_dim=32,
        decoder_ffn_dim=32,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        num_queries=20,
        num_feature_levels=4,
        max_text_len=32,
        encoder_n_points=2,
        decoder_n_points=2,
    )
    _seeded(seed)
    GroundingDinoForObjectDetection(config).eval().save_pretrained(directory)
    images = GroundingDinoImageProcessor(size={"shortest_edge": image_size, "longest_edge": 2 * image_size})
    GroundingDinoProcessor(image_processor=images, tokenizer=tokenizer).save_pretrained(directory)
    return directory


def write_tiny_owlv2(directory: Path | str, seed: int = 0, image_size: int = 32) -> Path:
    """An OWLv2 with a 2-layer ViT of 8x8 patches and a 1-layer text tower."""
    from transformers import (
        CLIPTokenizer,
        Owlv2Config,
        Owlv2ForObjectDetection,
        Owlv2ImageProcessor,
        Owlv2Processor,
    )

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = CLIPTokenizer(*_clip_bpe_files(directory))
    text = {
        "vocab_size": len(tokenizer),
        "hidden_size": 32,
        "intermediate_size": 32,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "max_position_embeddings": 16,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": 0,
    }
    vision = {
        "hidden_size": 32,
        "intermediate_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "image_size": image_size,
        "patch_size": 8,
    }
    config = Owlv2Config(text_config=text, vision_config=vision, projection_dim=32)
    _seeded(seed)
    Owlv2ForObjectDetection(config).eval().save_pretrained(directory)
    images = Owlv2ImageProcessor(size={"height": image_size, "width": image_size})
    Owlv2Processor(image_processor=images, tokenizer=tokenizer).save_pretrained(directory)
    return directory


def write_tiny_sam3(directory: Path | str, seed: int = 0, image_size: int = 56) -> Path:
    """A SAM 3 detector (``Sam3Model``): a 2-layer ViT of 14x14 patches, a 1-layer CLIP text tower, one DETR
    encoder and decoder layer, 10 queries, all 32 wide; ``image_size`` a multiple of 14."""
    from transformers import CLIPTokenizer, Sam3Config, Sam3ImageProcessor, Sam3Model, Sam3Processor

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = CLIPTokenizer(*_clip_bpe_files(directory))
    width, patches = 32, image_size // 14
    layers = {"hidden_size": width, "num_attention_heads": 2, "intermediate_size": width, "dropout": 0.0}
    backbone = {
        "model_type": "sam3_vit_model",
        "hidden_size": width,
        "intermediate_size": width,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "image_size": image_size,
        "pretrain_image_size": image_size,
        "window_size": patches,
        "global_attn_indexes": [1],
    }
    # The FPN's levels are the ViT's grid scaled by 4, 2, 1 and 0.5 (the last one unused by the detector).
    vision = {
        "backbone_config": backbone,
        "fpn_hidden_size": width,
        "backbone_feature_sizes": [[patches * 4] * 2, [patches * 2] * 2, [patches] * 2],
    }
    text = {
        "vocab_size": len(tokenizer),
        "hidden_size": width,
        "intermediate_size": width,
        "projection_dim": width,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "max_position_embeddings": 32,  # Sam3Processor pads prompts to 32 tokens
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": 0,
    }
    config = Sam3Config(
        vision_config=vision,
        text_config=text,
        geometry_encoder_config={**layers, "num_layers": 1},
        detr_encoder_config={**layers, "num_layers": 1},
        detr_decoder_config={**layers, "num_layers": 1, "num_queries": 10},
        mask_decoder_config={"hidden_size": width, "num_attention_heads": 2, "num_upsampling_stages": 2},
    )
    _seeded(seed)
    Sam3Model(config).eval().save_pretrained(directory)
    images = Sam3ImageProcessor(
        size={"height": image_size, "width": image_size}, mask_size={"height": patches * 4, "width": patches * 4}
    )
    Sam3Processor(image_processor=images, tokenizer=tokenizer).save_pretrained(directory)
    return directory


def _clip_bpe_files(directory: Path) -> tuple[str, str]:
    """CLIP's byte-level BPE with every byte as a token (and its end-of-word form), no merges."""
    symbols = _byte_symbols()
    tokens = symbols + [s + "</w>" for s in symbols] + ["<|startoftext|>", "<|endoftext|>"]
    vocab_file, merges_file = directory / "bpe-vocab.json", directory / "bpe-merges.txt"
    vocab_file.write_text(json.dumps({token: index for index, token in enumerate(tokens)}))
    merges_file.write_text("#version: 0.2\n")
    return str(vocab_file), str(merges_file)


def _byte_symbols() -> list[str]:
    """GPT-2 / CLIP's printable stand-in for each of the 256 bytes."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    extra = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(extra)) for b in range(256)]


def write_not_a_detector(directory: Path | str) -> Path:
    """A BERT model directory: a transformers model without a detection head."""
    from transformers import BertConfig, BertModel

    directory = Path(directory)
    BertModel(
        BertConfig(vocab_size=16, hidden_size=8, num_hidden_layers=1, num_attention_heads=1, intermediate_size=8)
    ).save_pretrained(directory)
    return directory
