# Two commands do everything on a fresh machine:
#   make demo   set up .venv, build the tiny embedded pipeline, train on examples/concept, render a grid
#   make test   set up .venv and run the test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# A CPU build of torch keeps set-up fast where no GPU is present; override on a GPU box, e.g. TORCH_SPEC=torch.
TORCH_SPEC ?= torch==2.13.0
PIPELINE ?= examples/tiny-sd
DEMO_OUT ?= out/demo
ACCELERATE := $(VENV)/bin/accelerate launch --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no

.PHONY: demo test clean

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -r requirements.txt pytest
	# Only for its CLIP BPE file (the real 49,408-token tokenizer, built offline); its deps (torchvision) are not needed.
	$(PY) -m pip install -q --no-deps open_clip_torch==3.3.0
	touch $@

$(PIPELINE)/model_index.json: | $(VENV)/.installed
	$(PY) examples/make_tiny_pipeline.py --output_dir $(PIPELINE)

demo: $(VENV)/.installed $(PIPELINE)/model_index.json
	rm -rf $(DEMO_OUT)
	$(ACCELERATE) train_textual_inversion.py \
	  --pretrained_model_name_or_path=$(PIPELINE) --train_data_dir=examples/concept \
	  --placeholder_token="<cat-toy>" --initializer_token=toy --resolution=64 \
	  --train_batch_size=4 --max_train_steps=150 --learning_rate=5e-4 --scale_lr --lr_warmup_steps=0 \
	  --checkpointing_steps=50 --checkpoints_total_limit=2 --save_steps=50 --seed=0 \
	  --validation_prompt="a photo of <cat-toy> on the beach" --validation_steps=150 \
	  --output_dir=$(DEMO_OUT)
	$(PY) examples/generate.py --pretrained_model_name_or_path=$(PIPELINE) --learned_embeds=$(DEMO_OUT) \
	  --prompt="a photo of <cat-toy> on the beach" --num_images=4 --resolution=64 --output=$(DEMO_OUT)/grid.png
	@echo "learned embeddings: $(DEMO_OUT)/learned_embeds.safetensors   grid: $(DEMO_OUT)/grid.png"

test: $(VENV)/.installed
	$(PY) -m pytest tests -q -p no:cacheprovider

clean:
	rm -rf $(VENV) $(PIPELINE) out
