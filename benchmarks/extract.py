"""Extraction throughput: our extractor vs the released RegionSpot code's per-image flow.

Both encode the same generated images with the same models, side by side in one run:
- released flow (re-implemented faithfully): one image at a time in fp32; ``SamPredictor``
  ``set_image`` then ``predict_torch`` on the image's boxes (the full mask decoder, masks
  included), the mask token captured from the decoder; the CLIP feature map of the image; one
  ``torch.save`` file per image;
- ours: ``run_extraction`` (batched images, token-only decoder calls, bf16 autocast on CUDA,
  data-loading workers, sharded zarr + parquet).
Reports images/s of each, the speed-up, bytes read and written per image and the relative error
of our cached values against the released flow's fp32 values; and the floor: counted FLOPs per
image, a measured matmul rate, MFU, and SAM's image encoder alone at each batch size and
precision (the target is extraction within 2x of its best).

    python benchmarks/extract.py                 # tiny models, CPU (default)
    python benchmarks/extract.py --real-size     # SAM ViT-B + CLIP ViT-L/14 @224, random weights (GPU)
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from segment_anything import SamPredictor

from regionspot_cache.cache import CacheReader
from regionspot_cache.config import ClipSpec, ExtractConfig, ModelsConfig, SamSpec
from regionspot_cache.data.datasets import DetectionDataset, load_coco_format
from regionspot_cache.data.images import load_rgb
from regionspot_cache.demo.synthetic import SyntheticSpec, generate_split
from regionspot_cache.demo.tiny_models import write_tiny_checkpoints
from regionspot_cache.encoders import FrozenEncoders, SamBoxEncoder, build_sam, load_clip, load_frozen_encoders
from regionspot_cache.extract.runner import CacheTarget, prepare_cache, run_extraction
from regionspot_cache.runtime.devices import resolve_device


def released_flow(dataset: DetectionDataset, encoders: FrozenEncoders, out_dir: Path) -> dict[int, tuple]:
    """One image at a time, fp32, one file per image, as the released code's flow does."""
    sam, clip = encoders.sam.sam, encoders.clip
    predictor = SamPredictor(sam)
    captured: list[torch.Tensor] = []
    hook = sam.mask_decoder.transformer.register_forward_hook(lambda m, i, out: captured.append(out[0][:, 1, :]))
    outputs = {}
    try:
        for entry in dataset.images:
            image = load_rgb(dataset.image_path(entry))
            pixels = np.asarray(image)
            predictor.set_image(pixels)
            boxes = torch.as_tensor(dataset.boxes_of(entry.id).xyxy, device=predictor.device)
            captured.clear()
            with torch.no_grad():
                if len(boxes):
                    predictor.predict_torch(
                        None, None, boxes=predictor.transform.apply_boxes_torch(boxes, pixels.shape[:2]), multimask_output=False
                    )
                feature_map = clip.feature_maps(clip.preprocess(image)[None].to(clip.device))[0]
            tokens = torch.cat(captured) if captured else torch.zeros(0, 256, device=predictor.device)
            torch.save({"mask_tokens": tokens.cpu(), "clip_feature_map": feature_map.cpu()}, out_dir / f"{entry.id}.pth")
            outputs[entry.id] = (tokens.cpu().numpy(), feature_map.cpu().numpy())
    finally:
        hook.remove()
    return outputs


def real_size_encoders(device: torch.device) -> FrozenEncoders:
    spec = ModelsConfig(SamSpec("vit_b", None), ClipSpec("ViT-L-14", None))
    return FrozenEncoders(SamBoxEncoder(build_sam("vit_b", None), device), load_clip("ViT-L-14", None, device), spec)


def relative_error(ours: np.ndarray, reference: np.ndarray) -> float:
    return float(np.linalg.norm(ours.astype(np.float64) - reference) / max(np.linalg.norm(reference), 1e-12))


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def flops_per_image(encoders: FrozenEncoders, boxes_per_image: float) -> dict[str, float]:
    """Counted FLOPs (torch's FlopCounterMode: matmuls and convolutions) of one image through
    SAM's image encoder, CLIP's vision transformer, and SAM's token-only decoder per box."""
    from torch.utils.flop_counter import FlopCounterMode

    sam, clip, device = encoders.sam, encoders.clip, encoders.sam.device
    counts = {}
    with torch.no_grad():
        with FlopCounterMode(display=False) as counter:
            sam.sam.image_encoder(torch.zeros(1, 3, sam.input_size, sam.input_size, device=device))
        counts["sam_encoder"] = counter.get_total_flops()
        with FlopCounterMode(display=False) as counter:
            clip.feature_maps(torch.zeros(1, 3, *clip.image_size, device=device))
        counts["clip"] = counter.get_total_flops()
        embedding = sam.embed_images([torch.zeros(3, sam.input_size, sam.input_size, dtype=torch.uint8)])[0]
        with FlopCounterMode(display=False) as counter:
            sam.box_tokens(embedding, np.array([[0, 0, 10, 10]], np.float32), (sam.input_size, sam.input_size))
        counts["sam_decoder_per_box"] = counter.get_total_flops()
    counts["total"] = counts["sam_encoder"] + counts["clip"] + boxes_per_image * counts["sam_decoder_per_box"]
    return counts


def matmul_rate(device: torch.device, dtype: torch.dtype) -> float:
    """Measured FLOP/s of a large square matmul: the ceiling that MFU is relative to."""
    n = 8192 if device.type == "cuda" else 1024
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    a @ b
    _synchronize(device)
    start, repeats = time.perf_counter(), 10
    for _ in range(repeats):
        a @ b
    _synchronize(device)
    return 2 * n**3 * repeats / (time.perf_counter() - start)


def sam_encoder_alone(encoders: FrozenEncoders, device: torch.device, batch_sizes: list[int], steps: int = 5) -> dict[str, float]:
    """Images/s of SAM's image encoder alone on resident inputs, per (batch size, precision);
    the extraction target is within 2x of the best of these."""
    precisions = {"fp32": None, "bf16": torch.bfloat16} if device.type == "cuda" else {"fp32": None}
    encoder, size, rates = encoders.sam.sam.image_encoder, encoders.sam.input_size, {}
    for batch in batch_sizes:
        pixels = torch.randn(batch, 3, size, size, device=device)
        for name, dtype in precisions.items():
            with torch.no_grad(), torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                encoder(pixels)
                _synchronize(device)
                start = time.perf_counter()
                for _ in range(steps):
                    encoder(pixels)
                _synchronize(device)
            rates[f"batch {batch} {name}"] = batch * steps / (time.perf_counter() - start)
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--real-size", action="store_true", help="SAM ViT-B + CLIP ViT-L/14 (random weights)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--workers", type=int, default=2, help="data-loading workers of our extractor")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--output", type=Path, help="write the figures as JSON here")
    parser.add_argument("--sam-batches", default="1,2,4,8,16", help="batch sizes for the SAM-encoder-alone sweep")
    args = parser.parse_args()
    device = resolve_device(args.device)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        size = (480, 640) if args.real_size else (160, 256)
        annotations = generate_split(root, "bench", SyntheticSpec(args.images, seed=0, min_size=size[0], max_size=size[1]))
        dataset = load_coco_format(annotations, root / "images", name="bench")
        if args.real_size:
            encoders = real_size_encoders(device)
        else:
            models = write_tiny_checkpoints(root / "models")
            encoders = load_frozen_encoders(models, device)
        config = ExtractConfig(shard_size=64, batch_size=args.batch_size, num_workers=args.workers, device=str(device))
        boxes = sum(len(dataset.boxes_of(e.id)) for e in dataset.images)

        warmup = load_coco_format(annotations, root / "images", name="bench")
        warmup.images = warmup.images[:2]
        released_flow(warmup, encoders, root)  # first-call costs out of both timings
        run_extraction(warmup, CacheTarget(root / "warmup_cache"), encoders, config)

        (root / "released").mkdir()
        _synchronize(device)
        start = time.perf_counter()
        reference = released_flow(dataset, encoders, root / "released")
        _synchronize(device)
        released_seconds = time.perf_counter() - start

        # The vocabulary's text embeddings are written first: the released flow has no such step.
        prepare_cache(dataset, CacheTarget(root / "cache"), encoders.with_preprocess(config.preprocess), config)
        start = time.perf_counter()
        run_extraction(dataset, CacheTarget(root / "cache"), encoders, config)
        _synchronize(device)
        ours_seconds = time.perf_counter() - start

        counted = flops_per_image(encoders, boxes / args.images)
        peak_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        peak = matmul_rate(device, peak_dtype)
        sam_rates = sam_encoder_alone(encoders, device, [int(b) for b in args.sam_batches.split(",")])
        best_sam = max(sam_rates, key=sam_rates.get)
        image_bytes = sum(
            (root / "images" / "bench" / e.file_name.split("/")[-1]).stat().st_size
            for e in dataset.images
            if (root / "images" / "bench" / e.file_name.split("/")[-1]).is_file()
        )
        reader = CacheReader(root / "cache")
        token_error = max(relative_error(reader.image(i).tokens, reference[i][0]) for i in reference if len(reference[i][0]))
        map_error = max(relative_error(reader.image(i).feature_map, reference[i][1]) for i in reference)
        released_bytes = sum(p.stat().st_size for p in (root / "released").iterdir())
        ours_bytes = sum(p.stat().st_size for p in (root / "cache").rglob("*") if p.is_file())
    figures = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)",
        "models": "SAM ViT-B + CLIP ViT-L/14@224 (random weights)" if args.real_size else "tiny SAM + tiny CLIP",
        "images": args.images,
        "boxes": boxes,
        "batch_size": args.batch_size,
        "workers": args.workers,
        "released_images_per_s": args.images / released_seconds,
        "ours_images_per_s": args.images / ours_seconds,
        "speedup": released_seconds / ours_seconds,
        "released_bytes_per_image": released_bytes / args.images,
        "ours_bytes_per_image": ours_bytes / args.images,
        "max_relative_error_tokens": token_error,
        "max_relative_error_feature_map": map_error,
        "gflops_per_image": counted["total"] / 1e9,
        "gflops_sam_encoder": counted["sam_encoder"] / 1e9,
        "gflops_clip": counted["clip"] / 1e9,
        "mflops_sam_decoder_per_box": counted["sam_decoder_per_box"] / 1e6,
        f"matmul_tflops_{'bf16' if device.type == 'cuda' else 'fp32'}": peak / 1e12,
        "ours_mfu": counted["total"] * args.images / ours_seconds / peak,
        "floor_images_per_s": peak / counted["total"],
        "image_bytes_read_per_image": image_bytes / args.images,
        "sam_encoder_alone_best": best_sam,
        "sam_encoder_alone_images_per_s": sam_rates[best_sam],
        "ours_time_vs_sam_encoder_alone": sam_rates[best_sam] / (args.images / ours_seconds),
        **{f"sam_encoder_alone[{k}]": v for k, v in sam_rates.items()},
    }
    for key, value in figures.items():
        print(f"{key:32s} {value:.4g}" if isinstance(value, float) else f"{key:32s} {value}")
    if args.output:
        args.output.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
