# Two commands do everything on a fresh machine:
#   make demo   set up .venv, teach the pretrained toy-world pipeline the held-out concept, judge it, draw a picture
#   make test   set up .venv and run the test suite (without the tests marked slow: `make test-all` runs those too)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# A CPU build of torch keeps set-up fast where no GPU is present; override on a GPU box, e.g. TORCH_SPEC=torch.
TORCH_SPEC ?= torch==2.13.0
# The embedded default: a tiny SD-architecture pipeline pretrained on the toy world (examples/toy_world/pretrain.py).
PIPELINE ?= examples/toy_world/pipeline
TINY_PIPELINE := examples/tiny-sd
DEMO_OUT ?= out/demo
ACCELERATE := $(VENV)/bin/accelerate launch --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no

.PHONY: demo test test-all clean

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -r requirements.txt pytest
	# Only for its CLIP BPE file (the real 49,408-token tokenizer, built offline); its deps (torchvision) are not needed.
	$(PY) -m pip install -q --no-deps open_clip_torch==3.3.0
	# Optional for users (--base_weight_dtype nf4); installed here so its tests run.
	$(PY) -m pip install -q --no-deps bitsandbytes==0.50.2
	touch $@

# Random weights, for trying the script on another concept folder: make $(TINY_PIPELINE)/model_index.json
$(TINY_PIPELINE)/model_index.json: | $(VENV)/.installed
	$(PY) examples/make_tiny_pipeline.py --output_dir $(TINY_PIPELINE)

# The held-out concept (a purple striped triangle, which no single word names) in 5 images, taught to the pretrained
# toy-world pipeline, then judged (examples/toy_world/evaluate.py) against the initializer word and a random vector.
# Each image's caption names what is incidental ("large {} on a white background"); the recipe that did best in
# examples/toy_world/recipes.py's comparison (README: "Telling the trainer what the concept is"). Every 50 steps the
# toy CLIP scores the validation images; the step kept is learned_embeds-best (README: "Which step to keep").
demo: $(VENV)/.installed
	rm -rf $(DEMO_OUT)
	$(ACCELERATE) train_textual_inversion.py \
	  --pretrained_model_name_or_path=$(PIPELINE) --train_data_dir=examples/toy_concept \
	  --placeholder_token="<toy-concept>" --initializer_token=triangle --num_vectors=2 \
	  --templates=examples/toy_world/caption_templates.txt --caption_extension=.txt --resolution=32 \
	  --train_batch_size=4 --max_train_steps=200 --learning_rate=1e-2 --lr_warmup_steps=0 \
	  --checkpointing_steps=100 --checkpoints_total_limit=1 --seed=0 \
	  --validation_prompt="a photo of a <toy-concept> on a pink background" \
	  --validation_prompt="a photo of a small <toy-concept>" --validation_guidance_scale=5 --validation_steps=50 \
	  --clip_model_name_or_path=examples/toy_world/clip --output_dir=$(DEMO_OUT)
	$(PY) examples/toy_world/evaluate.py --pretrained_model_name_or_path=$(PIPELINE) \
	  --learned_embeds=$(DEMO_OUT)/learned_embeds-best.safetensors --output_json=$(DEMO_OUT)/eval.json \
	  --images=$(DEMO_OUT)/eval.png
	@echo "kept: $(DEMO_OUT)/learned_embeds-best.safetensors (why: $(DEMO_OUT)/report.png)  judged: $(DEMO_OUT)/eval.json  picture: $(DEMO_OUT)/eval.png"

# The slow tier (pytest.ini) is ~4 more minutes on 2 cores: the GPU check's dry run, the SDXL, Flux and single-file
# two-rank launches, SIGKILL rounds, Ctrl-C and a failing rank under two ranks. Run it before changing those paths.
test: $(VENV)/.installed
	$(PY) -m pytest tests -q -p no:cacheprovider -m "not slow"

test-all: $(VENV)/.installed
	$(PY) -m pytest tests -q -p no:cacheprovider

clean:
	rm -rf $(VENV) $(TINY_PIPELINE) out
