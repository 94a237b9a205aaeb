#!/usr/bin/env bash
# Redraws the README's pictures from a finished `rs-cache demo` (tiny random-weight SAM and CLIP,
# a head trained on generated shapes): run from the repository root, with the project environment
# active, after the demo.
#   docs/pictures.sh [DEMO_DIR]          # default ./rs-cache-demo
set -euo pipefail
demo=${1:-rs-cache-demo}
out=docs/images
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
mkdir -p "$out"
models=(--sam-variant tiny --sam-checkpoint "$demo/models/sam_tiny.pth"
        --clip-model RS-Tiny-ViT --clip-pretrained "$demo/models/clip_tiny.pt")

# 1. the results page's AP chart and drawn predictions (written by the demo itself)
cp "$demo/report/ap_by_frequency.png" "$out/report_ap_by_frequency.png"
cp "$(ls "$demo"/report/examples/*.jpg | head -n 1)" "$out/report_example.jpg"

# 2. a contact sheet of the validation cache's best regions for two text queries
rs-cache search -c "$demo/cache/val" --head "$demo/head/head.safetensors" "red triangle" "yellow square" \
    --top 8 --image-root "$demo/data/images" --out "$tmp/search" --device cpu
cp "$tmp/search/contact_sheet.png" "$out/search_contact_sheet.png"

# 3. where the head looks: one validation image, its ground-truth boxes, the demo's vocabulary
image=$(python - "$demo" 3 "$tmp" <<'PY'
import json, sys
demo, image_id, tmp = sys.argv[1], int(sys.argv[2]), sys.argv[3]
data = json.load(open(f"{demo}/data/val.json"))
boxes = [[x, y, x + w, y + h] for a in data["annotations"] if a["image_id"] == image_id for x, y, w, h in [a["bbox"]]]
json.dump(boxes, open(f"{tmp}/boxes.json", "w"))
open(f"{tmp}/vocab.txt", "w").write("\n".join(c["name"] for c in data["categories"]))
print(next(i["file_name"] for i in data["images"] if i["id"] == image_id))
PY
)
rs-cache predict "$demo/data/images/$image" --head "$demo/head/head.safetensors" "${models[@]}" \
    --boxes-file "$tmp/boxes.json" --vocab-file "$tmp/vocab.txt" --attention --out "$tmp/predict.png" \
    --text-cache "$tmp/text" --device cpu > /dev/null

# Smaller files for the repository: the heat maps as JPEG (a palette bands them), the flat
# drawings as 256-colour PNGs
python - "$tmp/predict.attention.png" "$out" <<'PY'
import sys
from pathlib import Path
from PIL import Image
attention, out = sys.argv[1], Path(sys.argv[2])
Image.open(attention).convert("RGB").save(out / "predict_attention.jpg", quality=85)
for png in out.glob("*.png"):
    Image.open(png).convert("RGB").quantize(256).save(png, optimize=True)
PY
ls -l "$out"
