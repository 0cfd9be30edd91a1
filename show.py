r"""What the stages found for one image (or a few): its region boxes with their cluster labels and scores (01, 03),
its OCR lines with their text and token ids (02), and its top-l image labels (03), drawn on the image as a PNG and
written out as the same text.

    python show.py --work runs/demo --rows 0,1,2                  # -> runs/demo/show/row_00000000.png and .txt
    python show.py --work runs/demo --name 00017.png --out /tmp    # a row by its file or member name

Reads whatever of <work>/regions, <work>/ocr and <work>/clusters (or --clusters DIR) is finished; a stage that has
not run is left out of the picture and says so in the text. Region boxes are green with "c<label> <score>",
OCR boxes orange with the text and its token ids, the image labels in the top-left corner.
"""
from __future__ import annotations

import argparse
import os
import sys


sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import workdir  # noqa: E402
import image_io  # noqa: E402
import stage_folders  # noqa: E402

REGION_COLOUR, OCR_COLOUR, WIDTH = (0, 200, 0), (255, 140, 0), 2


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=workdir.HelpFormatter)
    p.add_argument("--work", default="runs/demo")
    p.add_argument("--rows", default="0", help="image-table rows, comma-separated")
    p.add_argument("--name", help="a row by its file or member name (instead of --rows)")
    p.add_argument("--clusters", help="the codebook folder (default <work>/clusters)")
    p.add_argument("--out", help="folder for the PNG and text files (default <work>/show)")
    args = p.parse_args(argv)
    workdir.check_folder_flag(args.work)
    return args


def read_folders(work, clusters):
    """The stage folders that are finished, each through its checked reader (stage_folders), or None."""
    def finished(folder):
        return (workdir.read_manifest(folder) or {}).get("complete")
    reg = stage_folders.read_regions(work) if finished(os.path.join(work, "regions")) else None
    return {"regions": reg,
            "ocr": stage_folders.read_ocr(work, check_tokens=False) if finished(os.path.join(work, "ocr")) else None,
            "clusters": stage_folders.read_clusters(clusters, reg) if reg and finished(clusters) else None}


def describe(folders, i):
    """Everything known about table row i: {"regions": [(box, score, label)], "ocr": [(box, text, tokens)],
    "image_labels": [...], "missing": [stage, ...]}."""
    out = {"regions": [], "ocr": [], "image_labels": [], "missing": []}
    reg, ocr, cl = folders["regions"], folders["ocr"], folders["clusters"]
    if reg:
        a, b = int(reg.offsets[i]), int(reg.offsets[i + 1])
        labels = cl["region_labels"][a:b] if cl and reg.R else [None] * (b - a)
        out["regions"] = [(tuple(map(float, bx)), float(s), None if lb is None else int(lb))
                          for bx, s, lb in zip(reg.boxes()[a:b], reg.scores()[a:b], labels)]
    else:
        out["missing"].append("regions (01_mine_regions.py)")
    if ocr:
        to, tb, ko = ocr["text_offsets"], ocr["text_bytes"], ocr["token_offsets"]
        for k in range(int(ocr["line_offsets"][i]), int(ocr["line_offsets"][i + 1])):
            text = bytes(tb[to[k]:to[k + 1]]).decode("utf-8", "replace")
            out["ocr"].append((tuple(map(float, ocr["boxes"][k])), text,
                               [int(t) for t in ocr["tokens"][ko[k]:ko[k + 1]]]))
    else:
        out["missing"].append("ocr (02_extract_ocr.py)")
    if cl:
        out["image_labels"] = [int(x) for x in cl["image_labels"][i] if x >= 0]
    else:
        out["missing"].append("clusters (03_cluster.py)")
    return out


def draw(image, found):
    """The image with the boxes and labels of `found` drawn on it (a new RGB PIL image)."""
    from PIL import ImageDraw
    image = image.convert("RGB")
    d = ImageDraw.Draw(image)
    for box, score, label in found["regions"]:
        d.rectangle(box, outline=REGION_COLOUR, width=WIDTH)
        d.text((box[0] + 3, box[1] + 2), (f"c{label} " if label is not None else "") + f"{score:.2f}",
               fill=REGION_COLOUR)
    for box, text, tokens in found["ocr"]:
        d.rectangle(box, outline=OCR_COLOUR, width=WIDTH)
        d.text((box[0] + 3, max(0, box[1] - 11)), f"{text} {tokens}", fill=OCR_COLOUR)
    if found["image_labels"]:
        d.text((3, 3), "image: " + " ".join(f"c{x}" for x in found["image_labels"]), fill=(255, 255, 255),
               stroke_width=1, stroke_fill=(0, 0, 0))
    return image


def as_text(name, found):
    lines = [f"{name}", f"image labels (top-l centres): {found['image_labels'] or '-'}",
             f"regions: {len(found['regions'])}"]
    lines += [f"  box {[round(v, 1) for v in b]}  score {s:.3f}  cluster {lb}" for b, s, lb in found["regions"]]
    lines.append(f"ocr lines: {len(found['ocr'])}")
    lines += [f"  box {[round(v, 1) for v in b]}  {t!r}  tokens {tk}" for b, t, tk in found["ocr"]]
    if found["missing"]:
        lines.append("not run yet: " + ", ".join(found["missing"]))
    return "\n".join(lines) + "\n"


@workdir.stage_main
def main(argv=None):
    args = parse_args(argv)
    table = image_io.read_image_table(args.work)
    clusters = args.clusters or os.path.join(args.work, "clusters")
    if args.name:
        rows = [i for i in range(len(table)) if table.name(i) == args.name or
                os.path.basename(table.name(i)) == args.name]
        if not rows:
            raise SystemExit(f"error: --name {args.name}: no image of that name in {args.work}/images")
    else:
        try:
            rows = [int(r) for r in args.rows.split(",") if r.strip()]
        except ValueError:
            raise SystemExit(f"error: --rows {args.rows}: comma-separated row numbers") from None
        bad = [r for r in rows if not 0 <= r < len(table)]
        if bad or not rows:
            raise SystemExit(f"error: --rows {args.rows}: rows are 0..{len(table) - 1}")
    out = args.out or os.path.join(args.work, "show")
    os.makedirs(out, exist_ok=True)
    written, folders = [], read_folders(args.work, clusters)
    for i in rows:
        image, _ = table.open(i)
        if image is None:
            raise SystemExit(f"error: row {i} ({table.name(i)}) cannot be decoded")
        found = describe(folders, i)
        base = os.path.join(out, f"row_{i:08d}")
        draw(image, found).save(base + ".png")
        text = as_text(f"row {i}: {table.path(i)}", found)
        workdir.write_bytes(base + ".txt", text.encode())
        print(text + f"-> {base}.png", flush=True)
        written.append(base + ".png")
    return written


if __name__ == "__main__":
    main()
