"""Train a small CLIP model for the toy world from scratch, on a CPU, to score images offline as a real CLIP would.

The model is a standard `transformers.CLIPModel` with the real 49,408-token CLIP tokenizer and a
`CLIPImageProcessor` for 32x32 images, saved like a hub model, so

    CLIPModel.from_pretrained("examples/toy_world/clip")
    CLIPProcessor.from_pretrained("examples/toy_world/clip")

load it as they would load openai/clip-vit-large-patch14. It is meant for the usual textual-inversion metrics:
CLIP-I (image-image cosine of generated images and a concept's training images) and CLIP-T (image-text cosine of
generated images and the prompt with the placeholder removed, e.g. "a photo of a on a pink background").

Training: world images (held-out concept excluded), random horizontal flips, and captions that name a random subset
of the attributes (never none). The shape word is sometimes replaced by "shape" and sometimes removed entirely
("a photo of a large red striped on a gray background", "a photo of a on a pink background"), since CLIP-T prompts
lose their noun. The loss is CLIP's own symmetric contrastive loss (`return_loss=True`); AdamW with warmup and a
cosine decay. The loss curve goes to --log_csv; arguments, timings, sizes and the measured quality (see evaluate())
go to the same path with .json.

    python examples/toy_world/train_clip.py --output_dir examples/toy_world/clip --threads 1
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import math
import os
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE)]
import world  # noqa: E402

TOKENIZER_DIR = HERE / "pipeline" / "tokenizer"
TEXT_HIDDEN = 24  # the 49,408 x TEXT_HIDDEN token embedding is most of the saved size (4.7 MB at 24)
TEXT_HEADS = 3
VISION_HIDDEN = 64
# 8x8 patches (a 4x4 grid): 3x faster than 4x4 patches on this CPU (0.15 s against 0.46 s a step at batch 256), and
# equally good in short runs of equal time.
PATCH_SIZE = 8
PROJECTION_DIM = 64
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP's normalisation, as CLIPImageProcessor uses it
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# Probability that a caption names each attribute. A shape that is not named is written "shape" (NOUN_WORD of the
# time) or left out altogether ("a photo of a red striped on a pink background"). A caption that would name nothing
# is drawn again: there are no empty captions.
KEEP = {"shape": 0.65, "colour": 0.7, "pattern": 0.7, "size": 0.6, "background": 0.6}
NOUN_WORD = 0.4
# Share of captions that name exactly one attribute ("a photo of a small", "a photo of a on a pink background",
# "a photo of a red shape", "a photo of a circle"): with KEEP alone such short captions would be rare.
SINGLE = 0.15
# Curriculum (--curriculum S1,S2): captions name only the shape for the first S1 steps, only shape and/or pattern until
# S2, then any attributes. Without it the contrastive loss learns colour, background and size at once and then
# barely learns the shape at all (feature suppression: after 2,400 steps a nearest-centroid probe of the image
# embeddings read the shape 50% of the time, zero-shot 31%); with the pattern in the first stage, the pattern
# suppressed the shape in the same way.
CURRICULUM = (500, 1200)
# Hard negatives: GROUP_SHARE of each batch comes in groups of GROUP images that agree in all but one attribute (drawn
# with VARY's weights), which takes GROUP different values: e.g. a large red plain circle, square, triangle and cross,
# all on gray. Within a group captions can only be told apart by that attribute. Colour and background are learned
# at once from the mean colour; without such groups the shape is barely learned at all (a linear probe of the image
# embedding read the shape 50% of the time after 2,400 steps of random batches).
GROUP_SHARE = 0.5
GROUP = 4
VARY = {"shape": 0.5, "pattern": 0.35, "colour": 0.15}


def make_image_processor():
    from transformers import CLIPImageProcessor

    return CLIPImageProcessor(
        size={"shortest_edge": world.RESOLUTION}, crop_size={"height": world.RESOLUTION, "width": world.RESOLUTION},
        do_center_crop=True, do_resize=True, resample=3, do_rescale=True, rescale_factor=1 / 255, do_normalize=True,
        image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD), do_convert_rgb=True,
    )


def pixel_values(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 [n, 32, 32, 3] world images -> float32 [n, 3, 32, 32], exactly what the saved CLIPImageProcessor gives
    (resize and centre crop are the identity at 32x32; then x / 255, minus mean, over std, in float32)."""
    x = torch.as_tensor(np.asarray(images)).permute(0, 3, 1, 2).float()
    mean = torch.tensor(CLIP_MEAN, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, dtype=torch.float32).view(1, 3, 1, 1)
    return (x / 255 - mean) / std


def make_model(tokenizer, seed: int = 0, patch_size: int = PATCH_SIZE):
    from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPVisionConfig

    text = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=TEXT_HIDDEN, intermediate_size=4 * TEXT_HIDDEN, num_hidden_layers=4,
        num_attention_heads=TEXT_HEADS, max_position_embeddings=77, hidden_act="quick_gelu",
        projection_dim=PROJECTION_DIM,
        # Real ids, so that the text model pools at the first EOS (pretrain.py's make_text_encoder does the same).
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    vision = CLIPVisionConfig(
        image_size=world.RESOLUTION, patch_size=patch_size, num_channels=3, hidden_size=VISION_HIDDEN,
        intermediate_size=4 * VISION_HIDDEN, num_hidden_layers=4, num_attention_heads=4, hidden_act="quick_gelu",
        projection_dim=PROJECTION_DIM,
    )
    config = CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=PROJECTION_DIM)
    torch.manual_seed(seed)
    return CLIPModel(config)


def caption_text(a: dict[str, str], prefix: str, named: dict[str, bool], noun: str) -> str:
    """`noun`: "word" (the shape's name), "shape" (the word "shape") or "" (no noun at all)."""
    words = [a[k] for k in ("size", "colour", "pattern") if named[k]]
    if named["shape"]:
        words.append(a["shape"])
    elif noun == "shape":
        words.append("shape")
    text = " ".join([prefix, *words])
    if named["background"]:
        text += f" on a {a['background']} background"
    return text


def random_caption(a: dict[str, str], rng: np.random.Generator, stage: str = "all") -> str:
    """A caption naming a random, non-empty subset of `a`'s attributes. Curriculum stages: "shape" names only the
    shape ("a photo of a circle"), "shape_pattern" the shape and/or the pattern, "all" any attributes (KEEP, SINGLE)."""
    prefix = world.PREFIXES[rng.integers(len(world.PREFIXES))]
    noun = "shape" if rng.random() < NOUN_WORD else ""
    if stage == "shape":
        named = {k: k == "shape" for k in world.NAMES}
    elif stage == "shape_pattern":
        r = rng.random()
        named = {k: False for k in world.NAMES}
        named["shape"], named["pattern"] = bool(r < 2 / 3), bool(r > 1 / 3)
    elif rng.random() < SINGLE:
        only = world.NAMES[rng.integers(len(world.NAMES))]
        named = {k: k == only for k in world.NAMES}
    else:
        while True:
            named = {k: bool(rng.random() < p) for k, p in KEEP.items()}
            if any(named.values()):
                break
    return caption_text(a, prefix, named, noun)


class Batches:
    """Index batches of a pool of world images: random images, and groups of images one attribute apart."""

    def __init__(self, attrs: list[dict[str, str]], rng: np.random.Generator, group_share: float = GROUP_SHARE):
        self.rng, self.group_share = rng, group_share
        self.keys = [tuple(a[k] for k in world.NAMES) for a in attrs]
        self.pool: dict[tuple, list[int]] = {}
        for i, key in enumerate(self.keys):
            self.pool.setdefault(key, []).append(i)
        self.vary_names = list(VARY)
        self.vary_p = np.array(list(VARY.values())) / sum(VARY.values())

    def __call__(self, batch_size: int) -> np.ndarray:
        rng = self.rng
        grouped = int(batch_size * self.group_share) // GROUP * GROUP
        out = list(rng.integers(0, len(self.keys), batch_size - grouped))
        for _ in range(grouped // GROUP):
            base = self.keys[rng.integers(len(self.keys))]
            i = world.NAMES.index(self.vary_names[rng.choice(len(self.vary_names), p=self.vary_p)])
            values = rng.permutation(world.ATTRIBUTES[world.NAMES[i]])
            keys = [k for k in (base[:i] + (str(v),) + base[i + 1 :] for v in values) if k in self.pool][:GROUP]
            members = [self.pool[k][rng.integers(len(self.pool[k]))] for k in keys]
            # Not in the pool: the held-out concept (or, in a small pool, a combination never drawn).
            members += list(rng.integers(0, len(self.keys), GROUP - len(members)))
            out.extend(members)
        return np.array(out)


def tokenize(tokenizer, texts: list[str]) -> dict[str, torch.Tensor]:
    # Padding to the longest caption gives the same embeddings as padding to 77: attention is causal and CLIP pools
    # at the first EOS, so nothing after it is seen.
    return tokenizer(texts, padding=True, truncation=True, max_length=77, return_tensors="pt")


def _features(out) -> torch.Tensor:
    return out if isinstance(out, torch.Tensor) else out.pooler_output


@torch.no_grad()
def embed_images(model, pixels: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    feats = [_features(model.get_image_features(pixel_values=pixels[i : i + batch_size]))
             for i in range(0, len(pixels), batch_size)]
    return torch.nn.functional.normalize(torch.cat(feats), dim=-1)


@torch.no_grad()
def embed_texts(model, tokenizer, texts: list[str], batch_size: int = 512) -> torch.Tensor:
    feats = []
    for i in range(0, len(texts), batch_size):
        feats.append(_features(model.get_text_features(**tokenize(tokenizer, texts[i : i + batch_size]))))
    return torch.nn.functional.normalize(torch.cat(feats), dim=-1)


# Zero-shot prompts, one per attribute value. "noun": the attribute with the word "shape" standing for the object
# (the shape itself for shape); "no_noun": the attribute with no noun at all, as CLIP-T prompts read once the
# placeholder is removed ("a photo of a small", "a photo of a on a pink background").
def prompt(name: str, value: str, family: str) -> str:
    if name == "shape":
        return f"a photo of a {value}"
    if name == "background":
        return f"a photo of a {'shape ' if family == 'noun' else ''}on a {value} background"
    return f"a photo of a {value}{' shape' if family == 'noun' else ''}"


def zero_shot(model, tokenizer, img: torch.Tensor, attrs: list[dict], family: str) -> dict[str, float]:
    out = {}
    for name, values in world.ATTRIBUTES.items():
        if family == "no_noun" and name == "shape":
            continue
        txt = embed_texts(model, tokenizer, [prompt(name, v, family) for v in values])
        pred = (img @ txt.T).argmax(1)
        truth = torch.tensor([values.index(a[name]) for a in attrs])
        out[name] = round(float((pred == truth).float().mean()), 4)
    return out


def full_caption_zero_shot(model, tokenizer, img: torch.Tensor, attrs: list[dict]) -> dict[str, float]:
    """Each image's closest of all 960 full captions ("a photo of a large red striped circle on a gray background"),
    read attribute by attribute; "all": every attribute right."""
    combos = [dict(zip(world.NAMES, c)) for c in itertools.product(*world.ATTRIBUTES.values())]
    txt = embed_texts(model, tokenizer, [world.caption(c) for c in combos])
    best = (img @ txt.T).argmax(1).tolist()
    right = np.array([[combos[b][k] == a[k] for k in world.NAMES] for b, a in zip(best, attrs)])
    out = {k: round(float(right[:, i].mean()), 4) for i, k in enumerate(world.NAMES)}
    out["all"] = round(float(right.all(1).mean()), 4)
    return out


def pair_cosines(img: torch.Tensor, attrs: list[dict]) -> dict[str, float]:
    """Mean cosine of image pairs by how they relate; `auc`: the chance a same-concept pair scores above a
    different-concept pair."""
    sim = (img @ img.T).numpy()
    n = len(attrs)
    keys = np.array([world.labels([a])[0] for a in attrs])  # NAMES order: shape, colour, pattern, size, background
    eq = keys[:, None, :] == keys[None, :, :]
    concept_eq = eq[..., :3]
    same = concept_eq.all(-1)
    off = ~np.eye(n, dtype=bool)
    same_pairs = same & off
    diff_pairs = ~same
    both_context_differ = same_pairs & ~eq[..., 3] & ~eq[..., 4]
    out = {
        "same_concept": float(sim[same_pairs].mean()),
        "same_concept_other_size_and_background": float(sim[both_context_differ].mean()),
        "different_concept": float(sim[diff_pairs].mean()),
    }
    for i, name in enumerate(("shape", "colour", "pattern")):
        only = (concept_eq.sum(-1) == 2) & ~concept_eq[..., i]
        out[f"differ_only_in_{name}"] = float(sim[only].mean())
    hard = (concept_eq.sum(-1) == 2) & eq[..., 3] & eq[..., 4]  # one concept attribute off, same size and background
    out["differ_in_one_same_size_and_background"] = float(sim[hard].mean())
    rng = np.random.default_rng(0)
    s = sim[same_pairs]
    d = sim[diff_pairs]
    s, d = rng.choice(s, 20000), rng.choice(d, 20000)
    out["auc_same_vs_different"] = float((s[:, None] > d[None, :2000]).mean())
    out = {k: round(v, 4) for k, v in out.items()}
    return out


def clip_i(model, concept: dict[str, str], fresh: int, rng: np.random.Generator) -> dict[str, float]:
    """CLIP-I as the trainer computes it: mean cosine of images to a concept's training images (world's
    concept_examples: large, on 5 backgrounds), for fresh images of the same concept (any size and background)
    and of concepts that differ from it in exactly one of shape, colour, pattern."""
    train_img = embed_images(model, pixel_values(world.concept_examples(concept)[0]))

    def score(c):
        attrs = [{**c, "size": world.ATTRIBUTES["size"][rng.integers(2)],
                  "background": world.ATTRIBUTES["background"][rng.integers(5)]} for _ in range(fresh)]
        img = embed_images(model, pixel_values(np.stack([world.render(a, rng) for a in attrs])))
        return float((img @ train_img.T).mean())

    out = {"same": score(concept)}
    for name in ("shape", "colour", "pattern"):
        others = [v for v in world.ATTRIBUTES[name] if v != concept[name]]
        out[f"other_{name}"] = float(np.mean([score({**concept, name: v}) for v in others]))
    return out


def evaluate(model, tokenizer, n: int = 2000, seed: int = 1000, held_out_n: int = 200, concepts: int = 24) -> dict:
    """Quality on fresh world images (seed `seed`, never trained on) and on renders of the held-out concept."""
    model.eval()
    images, attrs = world.sample(n, seed)
    img = embed_images(model, pixel_values(images))
    rng = np.random.default_rng(seed + 1)
    h_attrs = [{**world.HELD_OUT, "size": world.ATTRIBUTES["size"][rng.integers(2)],
                "background": world.ATTRIBUTES["background"][rng.integers(5)]} for _ in range(held_out_n)]
    h_img = embed_images(model, pixel_values(np.stack([world.render(a, rng) for a in h_attrs])))
    result = {
        "eval_images": n, "eval_seed": seed, "held_out_images": held_out_n,
        "zero_shot_noun_prompts": zero_shot(model, tokenizer, img, attrs, "noun"),
        "zero_shot_no_noun_prompts": zero_shot(model, tokenizer, img, attrs, "no_noun"),
        "zero_shot_full_captions": full_caption_zero_shot(model, tokenizer, img, attrs),
        "held_out_zero_shot_noun_prompts": zero_shot(model, tokenizer, h_img, h_attrs, "noun"),
        "held_out_zero_shot_no_noun_prompts": zero_shot(model, tokenizer, h_img, h_attrs, "no_noun"),
        "held_out_zero_shot_full_captions": full_caption_zero_shot(model, tokenizer, h_img, h_attrs),
        "image_pairs": pair_cosines(img, attrs),
    }
    # The held-out concept together with world images: pairs involving it (same concept = two held-out renders).
    both = torch.cat([img[:1000], h_img])
    result["image_pairs_with_held_out"] = pair_cosines(both, attrs[:1000] + h_attrs)
    # CLIP-I for the held-out concept and for random training-world concepts.
    crng = np.random.default_rng(seed + 2)
    result["clip_i_held_out"] = {k: round(v, 4) for k, v in clip_i(model, world.HELD_OUT, 40, crng).items()}
    per = []
    for _ in range(concepts):
        while True:
            c = {k: world.ATTRIBUTES[k][crng.integers(len(world.ATTRIBUTES[k]))]
                 for k in ("shape", "colour", "pattern")}
            if not world.is_held_out(c):
                break
        per.append(clip_i(model, c, 20, crng))
    result["clip_i_world_concepts"] = {k: round(float(np.mean([p[k] for p in per])), 4) for k in per[0]}
    result["clip_i_world_concepts"]["same_beats_every_one_off"] = round(float(np.mean(
        [p["same"] > max(p["other_shape"], p["other_colour"], p["other_pattern"]) for p in per])), 4)
    result["clip_i_world_concepts"]["concepts"] = concepts
    return result


class Log:
    def __init__(self, path: Path, start: float):
        self.start = start
        path.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(path, "w", newline="")
        self.writer = csv.writer(self.file)
        self.writer.writerow(["step", "loss", "batch_accuracy", "lr", "logit_scale", "elapsed_s"])

    def row(self, step: int, loss: float, acc: float, lr: float, scale: float) -> None:
        elapsed = time.time() - self.start
        self.writer.writerow([step, f"{loss:.5f}", f"{acc:.4f}", f"{lr:.6f}", f"{scale:.3f}", f"{elapsed:.1f}"])
        self.file.flush()
        print(f"[{elapsed:7.1f}s] step {step} loss {loss:.4f} acc {acc:.3f} lr {lr:.2e} scale {scale:.2f}",
              flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output_dir", default=str(HERE / "clip"))
    parser.add_argument("--log_csv", default=str(HERE / "clip_log.csv"))
    parser.add_argument("--num_images", type=int, default=50000)
    parser.add_argument("--steps", type=int, default=7000)
    parser.add_argument("--batch_size", type=int, default=256)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--weight_decay", type=float, default=0.05)
    parser.add_argument("--curriculum", default=",".join(map(str, CURRICULUM)),
                        help="S1,S2: shape-only captions before step S1, shape and/or pattern before S2")
    parser.add_argument("--group_share", type=float, default=GROUP_SHARE)
    parser.add_argument("--patch_size", type=int, default=PATCH_SIZE)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--eval_images", type=int, default=2000)
    parser.add_argument("--eval_seed", type=int, default=1000)
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    from transformers import CLIPProcessor, CLIPTokenizer

    start = time.time()
    timings = {}
    tokenizer = CLIPTokenizer.from_pretrained(TOKENIZER_DIR)
    images, attrs = world.sample(args.num_images, seed=args.seed)
    assert not any(world.is_held_out(a) for a in attrs)
    images = torch.from_numpy(images)
    timings["data_s"] = round(time.time() - start, 1)

    model = make_model(tokenizer, args.seed, args.patch_size)
    params = sum(p.numel() for p in model.parameters())
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (decay if p.ndim >= 2 and "embedding" not in name else no_decay).append(p)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.98), eps=1e-6)

    def lr_at(step):  # linear warmup, cosine to 0
        if step < args.warmup:
            return (step + 1) / args.warmup
        return 0.5 * (1 + math.cos(math.pi * (step - args.warmup) / max(1, args.steps - args.warmup)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    g = torch.Generator().manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    batches = Batches(attrs, rng, args.group_share)
    s1, s2 = (int(x) for x in args.curriculum.split(","))
    log = Log(Path(args.log_csv), start)
    model.train()
    running, running_acc = [], []
    train_start = time.time()
    for step in range(args.steps):
        idx = torch.from_numpy(batches(args.batch_size))
        batch = images[idx]
        flip = torch.rand(args.batch_size, generator=g) < 0.5  # every attribute is left-right symmetric
        batch = torch.where(flip[:, None, None, None], batch.flip(2), batch)
        stage = "shape" if step < s1 else "shape_pattern" if step < s2 else "all"
        text = tokenize(tokenizer, [random_caption(attrs[i], rng, stage) for i in idx.tolist()])
        out = model(input_ids=text.input_ids, attention_mask=text.attention_mask, pixel_values=pixel_values(batch),
                    return_loss=True)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))  # as in CLIP
        running.append(out.loss.item())
        running_acc.append(float((out.logits_per_image.argmax(1) == torch.arange(args.batch_size)).float().mean()))
        if (step + 1) % 50 == 0 or step == 0:
            log.row(step + 1, float(np.mean(running)), float(np.mean(running_acc)), sched.get_last_lr()[0],
                    model.logit_scale.detach().exp().item())
            running, running_acc = [], []
    timings["train_s"] = round(time.time() - train_start, 1)
    timings["s_per_step"] = round(timings["train_s"] / max(1, args.steps), 3)

    model.eval()
    out_dir = Path(args.output_dir)
    model.save_pretrained(out_dir)  # float32 weights: from_pretrained loads float32
    CLIPProcessor(image_processor=make_image_processor(), tokenizer=tokenizer).save_pretrained(out_dir)
    size = sum(f.stat().st_size for f in out_dir.rglob("*") if f.is_file())

    eval_start = time.time()
    from transformers import CLIPModel

    reloaded = CLIPModel.from_pretrained(out_dir)  # measure what was saved
    assert reloaded.dtype == torch.float32, reloaded.dtype
    quality = evaluate(reloaded, CLIPTokenizer.from_pretrained(out_dir), n=args.eval_images, seed=args.eval_seed)
    timings["eval_s"] = round(time.time() - eval_start, 1)
    timings["total_s"] = round(time.time() - start, 1)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    timings["cpu_s"] = round(usage.ru_utime + usage.ru_stime, 1)
    summary = {
        "args": vars(args), "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "timings": timings,
        "parameters": params, "saved_bytes": size, "saved_dtype": str(reloaded.dtype), "torch": torch.__version__,
        "caption_mix": {"keep": KEEP, "noun_word_when_shape_dropped": NOUN_WORD, "single_attribute": SINGLE,
                        "curriculum": args.curriculum},
        "groups": {"share": args.group_share, "size": GROUP, "vary": VARY},
        "quality": quality,
    }
    Path(args.log_csv).with_suffix(".json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
