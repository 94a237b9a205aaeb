"""Open-set rejection on generated data with held-out categories (``regions/open_set.py``).

The demo's generator (12 colour x shape categories) renders a training and a balanced test
split. `--held-out` categories leave the vocabulary at test time; with `--setting vocabulary`
that is all (the head was trained on them: regions of a class the user did not name), with
`--setting training` they are also removed from the training labels (their objects stay in the
images, unlabelled, as in a real dataset: regions of a kind the head never learnt). A head is
trained from the cache, then every test box is scored against the known vocabulary and each
rule's known score is asked to separate known from held-out boxes:

  AUROC          known vs held-out boxes (0.5 = chance)
  known acc.     class accuracy among the known boxes kept at the threshold keeping 95% of them
  held-out rej.  share of held-out boxes rejected at that same threshold

    python benchmarks/open_set.py --setting vocabulary   # tiny random-weight SAM + CLIP, ~5 min on 2 cores
    python benchmarks/open_set.py --setting training
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import torch

from regionspot_cache.cache import CacheReader
from regionspot_cache.config import ExtractConfig, TrainConfig
from regionspot_cache.data.datasets import load_coco_format
from regionspot_cache.demo.synthetic import SyntheticSpec, generate_split
from regionspot_cache.demo.tiny_models import write_tiny_checkpoints
from regionspot_cache.encoders import load_frozen_encoders
from regionspot_cache.extract.runner import CacheTarget, run_extraction
from regionspot_cache.head.model import load_head, region_logits
from regionspot_cache.regions.open_set import OpenSetRule, accuracy_at_known_recall, auroc, known_scores
from regionspot_cache.train.loop import train_head

RULES = [rule for rule in OpenSetRule if rule.rejects]


def without_categories(annotation_file: Path, held_out: set[int]) -> Path:
    """The split's annotations with the held-out categories' labels and names removed."""
    data = json.loads(annotation_file.read_text())
    data["annotations"] = [a for a in data["annotations"] if a["category_id"] not in held_out]
    data["categories"] = [c for c in data["categories"] if c["id"] not in held_out]
    for image in data["images"]:
        image["neg_category_ids"] = [c for c in image["neg_category_ids"] if c not in held_out]
    out = annotation_file.with_name(annotation_file.stem + ".known.json")
    out.write_text(json.dumps(data))
    return out


@torch.no_grad()
def test_logits(cache: Path, head_path: Path, vocabulary: str, held_out: set[int], prompts: list[str], encoders) -> tuple:
    """Per test box: logits over the known vocabulary and over the background prompts, true
    category, and the known vocabulary's category ids."""
    reader, head = CacheReader(cache), load_head(head_path)[0].eval()
    vocab = CacheReader(cache.parent / "train").vocabulary(vocabulary)
    known = ~np.isin(vocab.category_ids, list(held_out))
    text = torch.cat([torch.from_numpy(vocab.embeddings[known]), encoders.clip.text_embeddings(prompts).float()])
    logits, truth = [], []
    for image_id in reader.image_ids():
        item = reader.image(image_id)
        regions = head(
            torch.from_numpy(item.tokens.astype(np.float32))[None], torch.from_numpy(item.feature_map.astype(np.float32))[None]
        )[0]
        logits.append(region_logits(regions, text, reader.provenance.clip.logit_scale))
        truth.append(item.category_ids)
    logits, count = torch.cat(logits), int(known.sum())
    return logits[:, :count], logits[:, count:], np.concatenate(truth), vocab.category_ids[known]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train-images", type=int, default=320)
    parser.add_argument("--test-images", type=int, default=96)
    parser.add_argument("--iterations", type=int, default=1500)
    parser.add_argument("--held-out", type=int, nargs="+", default=[3, 6, 9, 12], help="category ids (1-12) held out")
    parser.add_argument(
        "--setting",
        choices=["vocabulary", "training"],
        default="vocabulary",
        help="held out of the test vocabulary only, or of the training labels too",
    )
    parser.add_argument("--prompts", nargs="+", default=["background"], help="background prompts")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--output", type=Path, help="also write the table's figures as JSON")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = args.workdir or Path(tmp)
        held_out = set(args.held_out)
        models = write_tiny_checkpoints(root / "models", args.seed)
        encoders = load_frozen_encoders(models, torch.device("cpu"))
        train_json = generate_split(root, "train", SyntheticSpec(args.train_images, args.seed))
        if args.setting == "training":
            train_json = without_categories(train_json, held_out)
        test_json = generate_split(root, "test", SyntheticSpec(args.test_images, args.seed + 1, balanced=True))
        extract = ExtractConfig(shard_size=64, num_workers=0, device="cpu")
        for name, annotations in (("train", train_json), ("test", test_json)):
            dataset = load_coco_format(annotations, root / "images", name=f"openset_{name}")
            run_extraction(dataset, CacheTarget(root / "cache" / name), encoders, extract)
        config = TrainConfig(
            iterations=args.iterations,
            batch_size=8,
            lr=1e-3,
            warmup_iters=100,
            lr_steps=[int(0.8 * args.iterations)],
            max_boxes_per_image=16,
            tensorboard=False,
            seed=args.seed,
            device="cpu",
            checkpoint_every=10**9,
        )
        train_head(root / "cache" / "train", root / "head.safetensors", config)
        logits, background, truth, known_ids = test_logits(
            root / "cache" / "test", root / "head.safetensors", "openset_train", held_out, args.prompts, encoders
        )
    is_known = np.isin(truth, known_ids)
    correct = known_ids[logits.argmax(dim=1).numpy()] == truth
    where = "the test vocabulary" if args.setting == "vocabulary" else "the training labels and the test vocabulary"
    print(
        f"{int(is_known.sum())} known and {int((~is_known).sum())} held-out test boxes; "
        f"held out of {where}: {sorted(held_out)}; "
        f"closed-set accuracy on known boxes {correct[is_known].mean():.3f}"
    )
    print("| rule | AUROC known vs held-out | known acc. at 95% known recall | held-out rejected |")
    print("|---|---:|---:|---:|")
    rows = {}
    for rule in RULES:
        known = known_scores(logits, rule, background).numpy()
        threshold, accuracy = accuracy_at_known_recall(known[is_known], correct[is_known])
        rows[rule] = {
            "auroc": auroc(known[is_known], known[~is_known]),
            "known_accuracy_at_95_recall": accuracy,
            "held_out_rejected": float((known[~is_known] < threshold).mean()),
        }
        print(f"| {rule} | {rows[rule]['auroc']:.3f} | {accuracy:.3f} | {rows[rule]['held_out_rejected']:.3f} |")
    if args.output:
        args.output.write_text(
            json.dumps(
                {
                    "setting": args.setting,
                    "known_boxes": int(is_known.sum()),
                    "held_out_boxes": int((~is_known).sum()),
                    "closed_set_accuracy": float(correct[is_known].mean()),
                    "rules": rows,
                },
                indent=2,
            )
        )


if __name__ == "__main__":
    main()
