"""Validation extras for train_textual_inversion.py: the rule that picks the step to keep and the history it reads
(report.json), CLIP scores for the validation images, and report.png.

transformers is imported only for CLIP scoring, and the picture only at the end of a run.

CLIP scores follow the paper's protocol (Gal et al., 2022, section 4.3):
- CLIP-I (reconstruction): mean cosine between CLIP image features of the images drawn for "a photo of a <S*>" and
  of the training images.
- CLIP-T (editability): for each edit prompt ("a photo of a <S*> on a pink background"), mean cosine between its
  images and the prompt's text with the placeholder removed ("a photo of a on a pink background"); averaged over
  the edit prompts.

The report picture is drawn from report.json alone (PIL and numpy, no plotting library), so it can be redrawn at any
time: `python validation_report.py OUTPUT_DIR`.
"""

from __future__ import annotations

import json
import math
import os
import sys
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont


# ---- Which step to keep: the rule, the history of validations, report.json ------------------------------------------
SELECTION_RULE = "highest CLIP-I + CLIP-T"  # see step_score
SELECTION_RULE_WITHOUT_CLIP = "lowest validation loss"


def step_score(record: dict) -> float | None:
    """The number the best step maximises (SELECTION_RULE): CLIP-I + CLIP-T when there are CLIP scores, else minus
    the validation loss."""
    if record.get("clip_i") is not None and record.get("clip_t") is not None:
        return record["clip_i"] + record["clip_t"]
    if record.get("clip_i") is not None:
        return record["clip_i"]
    return -record["validation_loss"]


def score_text(record: dict) -> str:
    """What step_score saw, in words: "CLIP-I 0.812 + CLIP-T 0.271" or "validation loss 0.1655"."""
    if record.get("clip_i") is None:
        return f"validation loss {record['validation_loss']:.4f}"
    text = f"CLIP-I {record['clip_i']:.3f}"
    return text + (f" + CLIP-T {record['clip_t']:.3f}" if record.get("clip_t") is not None else "")


def best_validation(validations: Sequence[dict]) -> tuple[int, str]:
    """The rule (SELECTION_RULE): the index of the validation to keep, and why in words."""
    scores = [step_score(record) for record in validations]
    best = max(range(len(scores)), key=lambda i: (scores[i], -i))  # the earliest of equals
    return best, f"{score_text(validations[best])}, the best of {len(validations)} validation(s)"


@dataclass
class ScoreHistory:
    """Every validation, the vectors at each, the training loss per step and the step chosen so far: report.json,
    and in each checkpoint, so that a resumed run chooses among all of them."""

    rule: str = SELECTION_RULE_WITHOUT_CLIP
    validations: list[dict] = field(default_factory=list)
    train_loss: list[list[float]] = field(default_factory=list)  # [step, loss]
    best: dict | None = None  # {"step", "why"}
    stopped_early: dict | None = None  # {"step", "why"}
    # The vectors of every validated step (a few KB each), so the rule may choose any of them.
    embeds: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)

    def add(self, record: dict, embeds: dict[str, torch.Tensor]) -> bool:
        """Record a validation (with its step_score); return whether the best step changed."""
        record["score"] = step_score(record)
        self.validations.append(record)
        self.embeds[record["step"]] = {key: v.detach().float().cpu().clone() for key, v in embeds.items()}
        index, why = best_validation(self.validations)
        changed = self.best is None or self.best["step"] != self.validations[index]["step"]
        self.best = {"step": self.validations[index]["step"], "why": f"{self.rule}: {why}"}
        return changed

    @property
    def best_embeds(self) -> dict[str, torch.Tensor] | None:
        return self.embeds[self.best["step"]] if self.best else None

    def validations_since_best(self) -> int:
        return sum(1 for record in self.validations if record["step"] > self.best["step"]) if self.best else 0

    def patience_spent(self, patience: int | None) -> bool:
        """Whether --early_stopping_patience has run out: that many validations since the best, none better."""
        return patience is not None and self.best is not None and self.validations_since_best() >= patience

    def to_json(self) -> dict:
        return {"rule": self.rule, "best": self.best, "stopped_early": self.stopped_early,
                "train_loss": self.train_loss, "validations": self.validations}

    @classmethod
    def from_json(cls, data: dict, embeds: dict[int, dict[str, torch.Tensor]]) -> ScoreHistory:
        return cls(data["rule"], data["validations"], data["train_loss"], data["best"], data["stopped_early"],
                   embeds)


def write_report(output_dir: Path, scores: ScoreHistory, placeholder_token: str, picture: bool = False) -> None:
    """report.json (atomically: a reader never sees half of it) and, if asked, report.png."""
    report = {"placeholder_token": placeholder_token, **scores.to_json()}
    path = output_dir / "report.json"
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(report, indent=1))
    os.replace(tmp, path)
    if picture:
        draw_report(report, output_dir)


def describe_validation(record: dict, best: bool) -> str:
    """The validation's part of the step's log line."""
    scores = [f"val loss {record['validation_loss']:.4f}"]
    scores += [f"{name} {record[key]:.3f}" for key, name in (("clip_i", "CLIP-I"), ("clip_t", "CLIP-T"))
               if record.get(key) is not None]
    where = record.get("images", "validation")
    return f"{where} ({', '.join(scores)}{'; best so far' if best else ''})"


# ---- CLIP scoring ----------------------------------------------------------------------------------------------------
class ClipScorer:
    """A frozen CLIPModel and its processor, turning images and texts into L2-normalised float32 CPU features."""

    def __init__(self, name_or_path: str, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                 batch_size: int = 32):
        from transformers import CLIPModel, CLIPProcessor  # lazy: the trainer runs without CLIP scoring too

        self.device = torch.device(device)
        self.dtype = dtype
        self.batch_size = batch_size
        self.model = CLIPModel.from_pretrained(name_or_path).to(device=self.device, dtype=dtype).eval()
        self.model.requires_grad_(False)
        processor = CLIPProcessor.from_pretrained(name_or_path)
        self.image_processor = processor.image_processor
        self.tokenizer = processor.tokenizer
        # A saved tokenizer without model_max_length reports 1e30; the position table is the real limit.
        self.max_length = min(self.tokenizer.model_max_length, self.model.config.text_config.max_position_embeddings)

    @torch.no_grad()
    def image_features(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """[n, projection_dim], in batches so that 50 validation images at 1024 px do not meet in one forward pass."""
        chunks = [torch.empty(0, self.model.config.projection_dim)]
        for start in range(0, len(images), self.batch_size):
            batch = [image.convert("RGB") for image in images[start:start + self.batch_size]]
            pixels = self.image_processor(images=batch, return_tensors="pt")["pixel_values"]
            output = self.model.get_image_features(pixel_values=pixels.to(self.device, self.dtype))
            chunks.append(_pooled(output).float().cpu())
        return F.normalize(torch.cat(chunks), dim=-1)

    @torch.no_grad()
    def text_features(self, texts: Sequence[str]) -> torch.Tensor:
        """[n, projection_dim]; a text longer than the model's 77 tokens is cut, as CLIP was trained."""
        chunks = [torch.empty(0, self.model.config.projection_dim)]
        for start in range(0, len(texts), self.batch_size):
            tokens = self.tokenizer(list(texts[start:start + self.batch_size]), padding=True, truncation=True,
                                    max_length=self.max_length, return_tensors="pt")
            output = self.model.get_text_features(input_ids=tokens["input_ids"].to(self.device),
                                                  attention_mask=tokens["attention_mask"].to(self.device))
            chunks.append(_pooled(output).float().cpu())
        return F.normalize(torch.cat(chunks), dim=-1)


def _pooled(output) -> torch.Tensor:
    """transformers 5 returns a model output whose pooler_output is the projected feature; 4.x returned the tensor."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def mean_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean cosine over every (row of a, row of b) pair; the rows are already L2-normalised."""
    if len(a) == 0 or len(b) == 0:
        raise ValueError(f"mean_cosine needs rows on both sides (got {len(a)} and {len(b)})")
    return float((a.float() @ b.float().T).mean())


def without_placeholder(prompt: str, token_names: Sequence[str]) -> str:
    """The prompt's text without the placeholder, as CLIP-T compares it: "a photo of a <S*> on a pink background" ->
    "a photo of a on a pink background". Longest names first, so that "<S*>_1" does not leave "_1" behind."""
    for name in sorted(token_names, key=len, reverse=True):
        prompt = prompt.replace(name, " ")
    return " ".join(prompt.split())


def clip_scores(scorer: ClipScorer, reference_images: Sequence[Image.Image] | torch.Tensor,
                prompts_and_images: list[tuple[str, list[Image.Image]]], token_names: Sequence[str]) -> dict:
    """{"clip_i", "clip_t", "clip_t_per_prompt"} for one validation.

    prompts_and_images[0] is the reconstruction prompt and its images, the rest are edit prompts. reference_images
    are the training images, or their `scorer.image_features` (they do not change: compute them once per run).
    clip_i is None when the reconstruction prompt has no images; clip_t is None (and the per-prompt dict empty)
    without an edit prompt.
    """
    reference = (reference_images if isinstance(reference_images, torch.Tensor)
                 else scorer.image_features(reference_images))
    # One pass over all the images, then split per prompt: full batches instead of one short batch per prompt.
    counts = [len(images) for _, images in prompts_and_images]
    features = scorer.image_features([image for _, images in prompts_and_images for image in images]).split(counts)
    clip_i = mean_cosine(features[0], reference) if counts and counts[0] else None

    edits = [(prompt, images) for (prompt, _), images in zip(prompts_and_images[1:], features[1:]) if len(images)]
    texts = scorer.text_features([without_placeholder(prompt, token_names) for prompt, _ in edits])
    values = [mean_cosine(images, text[None]) for (_, images), text in zip(edits, texts)]
    return {"clip_i": clip_i,
            "clip_t": sum(values) / len(values) if values else None,
            "clip_t_per_prompt": {prompt: value for (prompt, _), value in zip(edits, values)}}


# ---- Which validation rows the report shows --------------------------------------------------------------------------
def rows_to_show(steps: Sequence[int], best: int | None, limit: int) -> list[int]:
    """At most `limit` of `steps`, evenly spaced, always with the first, the best and the last; in step order.

    A run validated 200 times cannot show 200 image rows in one picture; the ends and the best are the rows a
    reader looks for, the rest show the trend.
    """
    steps = sorted(steps)
    if len(steps) <= limit:
        return steps
    pinned = [s for s in (best, steps[-1], steps[0]) if s in steps][:max(limit, 0)]  # by priority when limit < 3
    picks = {steps[round(i)] for i in np.linspace(0, len(steps) - 1, max(limit, 1))} if limit > 0 else set()
    for step in pinned:
        if step not in picks:  # swap out the nearest pick that is not itself pinned
            swappable = [p for p in picks if p not in pinned]
            picks.discard(min(swappable, key=lambda p: abs(p - step)))
            picks.add(step)
    return sorted(picks)


# ---- Drawing primitives ----------------------------------------------------------------------------------------------
RGB = tuple[int, int, int]
BEST_COLOR: RGB = (0, 158, 115)  # Okabe-Ito green: the best step, as frame, tag and vertical line
STOP_COLOR: RGB = (213, 94, 0)  # Okabe-Ito vermillion: the early-stop step
INK: RGB = (30, 30, 30)
MUTED: RGB = (110, 110, 110)
RULE_GRAY: RGB = (215, 215, 215)
LINE_COLOR: RGB = (0, 114, 178)
RAW_COLOR: RGB = (196, 214, 236)  # raw training loss: light, so its moving average reads first
THIN_COLOR: RGB = (150, 180, 215)  # CLIP-T of each edit prompt, behind their mean
SERIES_COLORS: list[RGB] = [(0, 114, 178), (230, 159, 0), (204, 121, 167), (86, 180, 233), (120, 120, 120)]
MISSING_GRAY: RGB = (200, 200, 200)

MAX_SIDE = 2480  # the picture stays below ~2500 px on each side
MARGIN = 16
ROW_LIMIT = 20
SUPERSAMPLE = 2  # charts are drawn at 2x and scaled down: PIL's lines are not antialiased


@lru_cache(maxsize=None)
def font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """PIL's built-in font; Pillow >= 10.1 scales it, older ones have a single ~11 px bitmap size."""
    try:
        return ImageFont.load_default(size=size)
    except TypeError:
        return ImageFont.load_default()


def text_width(text: str, face) -> int:
    return math.ceil(face.getlength(text))


def line_height(face) -> int:
    return face.getbbox("Ag|")[3] + 3


def fit(text: str, face, width: float) -> str:
    """The text, cut with "..." to fit in width."""
    if text_width(text, face) <= width:
        return text
    while text and text_width(text + "...", face) > width:
        text = text[:-1]
    return text.rstrip() + "..." if text else ""


def put(draw: ImageDraw.ImageDraw, xy: tuple[float, float], text: str, face, fill, anchor: str = "lt") -> None:
    """draw.text with the anchor (l/m/r, t/m/b) applied here: PIL ignores anchors for bitmap fonts (the default
    font of Pillow < 10.1), which would push right-aligned labels off the chart."""
    _, top, _, bottom = face.getbbox("Ag|")
    x = xy[0] - {"l": 0, "m": text_width(text, face) / 2, "r": text_width(text, face)}[anchor[0]]
    y = xy[1] - {"t": top, "m": (top + bottom) / 2, "b": bottom}[anchor[1]]
    draw.text((x, y), text, font=face, fill=fill)


def wrap(text: str, face, width: float, max_lines: int) -> list[str]:
    """Greedy word wrap to width; the last allowed line ends in "..." when the text does not fit."""
    lines: list[str] = []
    for word in text.split():
        if lines and text_width(lines[-1] + " " + word, face) <= width:
            lines[-1] += " " + word
        else:
            lines.append(word)
    if len(lines) > max_lines:
        lines = lines[:max_lines - 1] + [fit(" ".join(lines[max_lines - 1:]) + " ...", face, width)]
    return [fit(line, face, width) for line in lines]


def fmt(value: float) -> str:
    """A loss to 3 significant digits, trailing zeros kept (0.200, 0.0123) so a column of them lines up."""
    return f"{value:#.3g}".rstrip(".") if abs(value) < 1000 else f"{value:.0f}"


def fixed(value: float | None) -> str:
    """A CLIP score or the score: cosines, so three decimals always (0.085, not 0.0850)."""
    return f"{value:.3f}" if finite(value) else "-"


def tick(value: float, span: float) -> str:
    """An axis label with as many decimals as the axis' span needs: 0.171 and 0.2 on a 0.03 span, 6000 on steps."""
    decimals = min(6, max(0, 1 - math.floor(math.log10(span)))) if span > 0 else 3
    text = f"{value:.{decimals}f}"
    return text.rstrip("0").rstrip(".") if "." in text else text


def finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


# ---- Charts ----------------------------------------------------------------------------------------------------------
@dataclass
class Line:
    points: list[tuple[float, float]]  # (step, value), in step order
    color: RGB = LINE_COLOR
    width: int = 2
    dots: bool = False  # a dot on every point: validations are few and each one matters
    label: str | None = None  # shown in the legend


@dataclass
class Chart:
    title: str
    lines: list[Line] = field(default_factory=list)
    band: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None  # (x, low, high): raw training loss per bin
    y_range: tuple[float, float] | None = None  # when the lines' own range would let outliers flatten them
    reference: float | None = None  # a dashed horizontal line (norm ratio 1.0)
    note: str | None = None  # written in the middle, for a chart with nothing to draw


def loss_chart(train_loss: list) -> Chart:
    """Raw training loss as a light band (per-bin min..max, a thin line where a bin holds one step), its moving
    average dark. 20,000 steps become at most 400 bins, so drawing cost does not grow with the run."""
    data = np.array([(s, v) for s, v in train_loss if finite(v)], dtype=np.float64).reshape(-1, 2)
    if len(data) == 0:
        return Chart("training loss", note="no training steps yet")
    data = data[np.argsort(data[:, 0], kind="stable")]
    steps, values = data[:, 0], data[:, 1]
    bins = min(400, len(steps))
    span = max(steps[-1] - steps[0], 1e-9)
    index = np.minimum(((steps - steps[0]) / span * bins).astype(np.int64), bins - 1)
    starts = np.flatnonzero(np.r_[True, index[1:] != index[:-1]])  # index is sorted: each bin is one run
    counts = np.diff(np.r_[starts, len(steps)])
    x = np.add.reduceat(steps, starts) / counts
    sums = np.add.reduceat(values, starts)
    low, high = np.minimum.reduceat(values, starts), np.maximum.reduceat(values, starts)
    # Centered moving average over ~5% of the run, weighted by each bin's count: no lag, unlike an EMA.
    window = np.ones(max(1, len(x) // 20) | 1)
    smooth = np.convolve(sums, window, "same") / np.convolve(counts, window, "same")
    # Single-step spikes (high-noise timesteps) would flatten the curve: the range covers the 1st-99th percentile.
    y_range = (min(np.percentile(values, 1), smooth.min()), max(np.percentile(values, 99), smooth.max()))
    return Chart("training loss", band=(x, low, high), y_range=y_range,
                 lines=[Line(list(zip(x.tolist(), smooth.tolist())), label="moving average")])


def series(validations: list[dict], key: str) -> list[tuple[float, float]]:
    return [(v["step"], v[key]) for v in validations if finite(v.get(key))]


def vector_lines(validations: list[dict], key: str) -> list[Line]:
    """One line per text encoder x vector of a {encoder: [value per vector]} field, or the mean per encoder when
    that would be more than 4 lines (an 8-vector SDXL token would be 16 tangled lines)."""
    encoders: dict[str, int] = {}
    for v in validations:
        for name, values in (v.get(key) or {}).items():
            encoders[name] = max(encoders.get(name, 0), len(values))
    per_vector = sum(encoders.values()) <= 4
    curves: list[tuple[str, list[tuple[float, float]]]] = []
    for name, count in encoders.items():
        encoder = name if len(encoders) > 1 else ""  # one encoder: its name is the token, already in the header
        for i in range(count if per_vector else 1):
            points = []
            for v in validations:
                values = (v.get(key) or {}).get(name, [])
                picked = [x for x in (values[i:i + 1] if per_vector else values) if finite(x)]
                if picked:
                    points.append((v["step"], sum(picked) / len(picked)))
            vector = (f"v{i}" if count > 1 else "") if per_vector else "mean"
            curves.append((f"{encoder} {vector}".strip(), points))
    return [Line(points, SERIES_COLORS[i % len(SERIES_COLORS)], dots=True, label=label if len(curves) > 1 else None)
            for i, (label, points) in enumerate(curves) if points]


def build_charts(report: dict) -> list[Chart]:
    """The charts worth drawing: one whose values are all null is left out; missing CLIP scores get one panel that
    says how to have them."""
    validations = report.get("validations") or []
    charts = [loss_chart(report.get("train_loss") or [])]
    if val := series(validations, "validation_loss"):
        charts.append(Chart("validation loss", [Line(val, dots=True)]))
    if norms := vector_lines(validations, "norm_ratio"):
        charts.append(Chart("embedding norm ratio", norms, reference=1.0))
    clip_i, clip_t = series(validations, "clip_i"), series(validations, "clip_t")
    if clip_i:
        charts.append(Chart("CLIP-I (looks like the concept)", [Line(clip_i, dots=True)]))
    if clip_t:
        # Each edit prompt thin and light behind their mean: one prompt that never works shows up.
        prompts = sorted({p for v in validations for p in (v.get("clip_t_per_prompt") or {})})
        thin = [Line([(v["step"], v["clip_t_per_prompt"][p]) for v in validations
                      if finite((v.get("clip_t_per_prompt") or {}).get(p))], THIN_COLOR, width=1) for p in prompts]
        mean_label = f"mean of {len(prompts)} prompts" if len(prompts) > 1 else None
        charts.append(Chart("CLIP-T (follows the prompt)", [*thin, Line(clip_t, dots=True, label=mean_label)]))
    if validations and not clip_i and not clip_t:
        charts.append(Chart("CLIP-I / CLIP-T", note="no CLIP model (--clip_model_name_or_path)"))
    return charts


def legend_width(chart: Chart, face) -> int:
    """Width of the legend: a short stroke and the label per labelled line."""
    return sum(22 + text_width(line.label, face) for line in chart.lines if line.label)


def legend_fits(chart: Chart, width: int) -> bool:
    """Whether the legend fits on the title's line; if not, every chart of the page gives it a line of its own,
    so the plots of a row still line up."""
    return text_width(chart.title, font(13)) + 12 + legend_width(chart, font(11)) <= width


def draw_chart(chart: Chart, size: tuple[int, int], x_range: tuple[float, float], marks: list[tuple[float, RGB]],
               highlight: float | None, legend_line: bool) -> Image.Image:
    """One small line chart: title, legend, min/max tick labels, a vertical line per mark (best, early stop), and a
    ring on each line's point at `highlight` (the best step). Drawn at 2x and scaled down, for smooth lines."""
    k = SUPERSAMPLE if isinstance(font(13), ImageFont.FreeTypeFont) else 1  # a bitmap font would not scale up with it
    width, height = size[0] * k, size[1] * k
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    title_face, tick_face = font(13 * k), font(11 * k)
    draw.text((0, 0), chart.title, font=title_face, fill=INK)
    legend_y = line_height(title_face) // 2 + (line_height(title_face) if legend_line else 0)
    x = width - 6 * k
    for line in reversed([line for line in chart.lines if line.label]):  # right-aligned, a stroke before each label
        x -= text_width(line.label, tick_face)
        put(draw, (x, legend_y), line.label, tick_face, MUTED, "lm")
        draw.line((x - 16 * k, legend_y, x - 4 * k, legend_y), fill=line.color, width=2 * k)
        x -= 22 * k

    top = line_height(title_face) * (2 if legend_line else 1) + 4 * k
    bottom, right = height - line_height(tick_face) - 2 * k, width - 6 * k
    if not chart.lines and chart.band is None:  # a note only: no axes to label
        draw.rectangle((0, top, right, bottom), outline=RULE_GRAY, width=k)
        put(draw, (right / 2, (top + bottom) / 2), fit(chart.note or "", tick_face, right - 8 * k), tick_face, MUTED,
            "mm")
        return image.resize(size, Image.LANCZOS)

    ys = [y for line in chart.lines for _, y in line.points]
    y0, y1 = chart.y_range or (min(ys), max(ys))
    if chart.reference is not None:
        y0, y1 = min(y0, chart.reference), max(y1, chart.reference)
    ticks = [(y1, tick(y1, y1 - y0)), (y0, tick(y0, y1 - y0))]  # the data's max and min, at their heights
    pad = (y1 - y0) * 0.08 or max(abs(y1) * 0.05, 1e-3)
    y0, y1 = y0 - pad, y1 + pad
    left = max(text_width(t, tick_face) for _, t in ticks) + 6 * k
    draw.rectangle((left, top, right, bottom), outline=RULE_GRAY, width=k)

    def px(x: float) -> float:
        return left + (x - x_range[0]) / ((x_range[1] - x_range[0]) or 1) * (right - left)

    def py(y: float) -> float:
        return bottom - (min(max(y, y0), y1) - y0) / (y1 - y0) * (bottom - top)

    for y, text in ticks:
        draw.line((left, py(y), right, py(y)), fill=(238, 238, 238), width=k)
        put(draw, (left - 4 * k, py(y)), text, tick_face, MUTED, "rm")
    for text, x, anchor in ((str(int(x_range[0])), left, "lt"), (str(int(x_range[1])), right, "rt")):
        put(draw, (x, bottom + 2 * k), text, tick_face, MUTED, anchor)
    if chart.reference is not None:  # dashed, unlabelled when it is the axis' min or max already
        y, dash = py(chart.reference), 6 * k
        for x in range(int(left), int(right), 2 * dash):
            draw.line((x, y, min(x + dash, right), y), fill=MUTED, width=k)
        if chart.reference not in (ticks[0][0], ticks[1][0]):
            put(draw, (left - 4 * k, y), tick(chart.reference, 1), tick_face, MUTED, "rm")
    for x, color in marks:  # before the data, so a line crossing the best step stays visible
        draw.line((px(x), top, px(x), bottom), fill=color, width=k)
        label, half = str(int(x)), text_width(str(int(x)), tick_face) / 2
        if left + 40 * k < px(x) - half and px(x) + half < right - 40 * k:  # clear of the axis' end labels
            put(draw, (px(x), bottom + 2 * k), label, tick_face, color, "mt")
    if chart.band is not None:
        xs, low, high = chart.band
        for x, lo, hi in zip(xs, low, high):
            draw.line((px(x), py(lo), px(x), py(hi)), fill=RAW_COLOR, width=k)
        draw.line([(px(x), py((lo + hi) / 2)) for x, lo, hi in zip(xs, low, high)], fill=RAW_COLOR, width=k)
    for line in chart.lines:
        points = [(px(x), py(y)) for x, y in line.points]
        if len(points) > 1:
            draw.line(points, fill=line.color, width=line.width * k, joint="curve")
        if not (line.dots or len(points) == 1):
            continue
        for (x, _), (u, v) in zip(line.points, points):
            r = 2.5 * k
            draw.ellipse((u - r, v - r, u + r, v + r), fill=line.color)
            if x == highlight:
                r = 5 * k
                draw.ellipse((u - r, v - r, u + r, v + r), outline=BEST_COLOR, width=2 * k)
    return image.resize(size, Image.LANCZOS)


# ---- Image strip -----------------------------------------------------------------------------------------------------
def grid_shape(validation: dict, image: Image.Image) -> tuple[int, int]:
    """(rows, cols) of a grid PNG: from report.json, else one row per prompt and square cells."""
    grid = validation.get("grid") or {}
    rows = int(grid.get("rows") or len(validation.get("prompts") or []) or 1)
    cols = int(grid.get("cols") or max(1, round(image.width / (image.height / rows))))
    return rows, cols


def open_grid(output_dir: Path, validation: dict) -> Image.Image | None:
    """The grid PNG, opened lazily (size known, pixels not decoded yet); None when missing or unreadable."""
    name = validation.get("images")
    if not name:
        return None
    try:
        return Image.open(output_dir / name)
    except (OSError, ValueError):
        return None


def thumb_size(cell: tuple[int, int], limit: int) -> tuple[int, int]:
    """Tiny images (32 px) go up by a whole factor to at least 64 px, so NEAREST keeps their pixels square and
    visible; large ones (512, 1024 px) down to 112 px; never above `limit` on the long side (the page budget)."""
    long_side = max(cell)
    if long_side < 64:
        scale = float(math.ceil(64 / long_side))
    elif long_side > 128:
        scale = 112 / long_side
    else:
        scale = 1.0
    scale = min(scale, limit / long_side)
    return max(1, round(cell[0] * scale)), max(1, round(cell[1] * scale))


def thumbnail(cell: Image.Image, size: tuple[int, int]) -> Image.Image:
    cell = cell.convert("RGB")
    if size[0] >= cell.width:
        return cell.resize(size, Image.NEAREST)
    return cell.resize(size, Image.LANCZOS, reducing_gap=2.0)  # reducing_gap: fast on 1024 px cells


TextLine = tuple[str, object, RGB]  # text, font, colour


def row_label(validation: dict) -> list[TextLine]:
    """The text left of a row: step, scores, loss, and the vocabulary words nearest the (first) vector."""
    v, body = validation, font(13)
    lines: list[TextLine] = [(f"step {v['step']}", font(15), INK)]
    if finite(v.get("clip_i")) or finite(v.get("clip_t")):
        lines.append((f"CLIP-I {fixed(v.get('clip_i'))}   CLIP-T {fixed(v.get('clip_t'))}", body, INK))
    scores = [f"val {fmt(v['validation_loss'])}" if finite(v.get("validation_loss")) else "",
              f"score {fixed(v['score'])}" if finite(v.get("score")) else ""]
    if any(scores):
        lines.append(("   ".join(s for s in scores if s), body, INK))
    nearest = next(iter((v.get("nearest_words") or {}).values()), None)
    if nearest and nearest[0]:
        lines.append(("near: " + ", ".join(nearest[0]), font(11), MUTED))
    return lines


def tag(draw: ImageDraw.ImageDraw, xy: tuple[int, int], text: str, color: RGB) -> int:
    """A filled label ("BEST") at xy; returns its width."""
    face = font(11)
    w, h = text_width(text, face) + 10, line_height(face) + 2
    draw.rounded_rectangle((xy[0], xy[1], xy[0] + w, xy[1] + h), radius=4, fill=color)
    put(draw, (xy[0] + 5, xy[1] + h / 2), text, face, "white", "lm")
    return w


# ---- The picture -----------------------------------------------------------------------------------------------------
CELL_GAP, GROUP_GAP = 2, 12  # between a prompt's images; between prompts
ROW_PAD, ROW_GAP = 6, 4  # inside a row, around its content (the frame is drawn there); between rows
CHART_H, MIN_CHART_W, CHART_GAP = 170, 300, 16
MIN_WIDTH = 1000  # room for three charts side by side, however narrow the image strip


@dataclass
class Layout:
    """Where everything goes, for one thumbnail size."""
    header: list[TextLine]
    charts: list[Chart]
    label_w: int  # the text column left of the images
    label_h: int  # the tallest row label
    thumb: tuple[int, int]
    groups: int  # prompts per validation
    cols: int  # images per prompt
    rows: int  # validation rows shown

    @property
    def width(self) -> int:
        return max(self.strip_w + 2 * MARGIN, MIN_WIDTH)

    @property
    def group_w(self) -> int:
        return self.cols * self.thumb[0] + (self.cols - 1) * CELL_GAP

    @property
    def strip_w(self) -> int:
        return self.label_w + self.groups * self.group_w + (self.groups - 1) * GROUP_GAP

    @property
    def header_h(self) -> int:
        return sum(line_height(face) + 2 for _, face, _ in self.header) + 8

    @property
    def charts_per_row(self) -> int:
        """As few rows as possible with charts at least MIN_CHART_W wide, balanced: 3+2, not 4+1."""
        inner = self.width - 2 * MARGIN
        fits = max(1, min(len(self.charts), (inner + CHART_GAP) // (MIN_CHART_W + CHART_GAP)))
        return math.ceil(len(self.charts) / math.ceil(len(self.charts) / fits))

    @property
    def chart_size(self) -> tuple[int, int]:
        per_row = self.charts_per_row
        return (self.width - 2 * MARGIN - (per_row - 1) * CHART_GAP) // per_row, CHART_H

    @property
    def charts_h(self) -> int:
        return math.ceil(len(self.charts) / self.charts_per_row) * (CHART_H + CHART_GAP) + 8

    @property
    def column_head_h(self) -> int:
        return line_height(font(11)) + 2 * line_height(font(13)) + 6

    @property
    def row_h(self) -> int:
        return max(self.thumb[1], self.label_h) + 2 * ROW_PAD

    @property
    def height(self) -> int:
        strip = self.column_head_h + self.rows * (self.row_h + ROW_GAP) if self.rows else line_height(font(13))
        return 2 * MARGIN + self.header_h + self.charts_h + strip


def header_lines(report: dict, width: int) -> list[TextLine]:
    """The token, the best step and why, the early stop and why, the rule; wrapped to the page."""
    body, small = font(13), font(11)
    lines: list[TextLine] = [(f"Textual inversion report: {report.get('placeholder_token', '?')}", font(20), INK)]
    best, stop = report.get("best") or {}, report.get("stopped_early") or {}
    if best.get("step") is not None:
        text = f"Best step {best['step']}: {best.get('why') or ''}".rstrip(": ")
        lines += [(t, body, BEST_COLOR) for t in wrap(text, body, width, 2)]
    elif report.get("validations"):
        lines.append(("No best step yet.", body, INK))
    if stop.get("step") is not None:
        text = f"Stopped early at step {stop['step']}: {stop.get('why') or ''}".rstrip(": ")
        lines += [(t, body, STOP_COLOR) for t in wrap(text, body, width, 2)]
    if report.get("rule"):
        lines += [(t, small, MUTED) for t in wrap(f"Rule: {report['rule']}", small, width, 2)]
    return lines


def paste_row(picture: Image.Image, draw: ImageDraw.ImageDraw, grid: Image.Image | None,
              shape: tuple[int, int] | None, validation: dict, origin: tuple[int, int], layout: Layout) -> None:
    """One validation's grid cut into cells and laid out as prompt groups side by side; gray when missing."""
    x0, y0 = origin
    thumb = layout.thumb
    try:
        grid = grid.convert("RGB") if grid is not None and shape is not None else None
    except (OSError, ValueError):  # a truncated PNG fails here, on decoding, not on open
        grid = None
    if grid is None:
        x1 = x0 + layout.strip_w - layout.label_w
        draw.rectangle((x0, y0, x1, y0 + thumb[1]), fill=MISSING_GRAY)
        text = f"missing: {validation.get('images') or 'no image file recorded'}"
        put(draw, ((x0 + x1) / 2, y0 + thumb[1] / 2), fit(text, font(11), x1 - x0 - 8), font(11), INK, "mm")
        return
    rows, cols = shape
    cw, ch = grid.width // cols, grid.height // rows
    for r in range(min(rows, layout.groups)):
        for c in range(min(cols, layout.cols)):
            cell = grid.crop((c * cw, r * ch, (c + 1) * cw, (r + 1) * ch))
            picture.paste(thumbnail(cell, thumb), (x0 + r * (layout.group_w + GROUP_GAP) + c * (thumb[0] + CELL_GAP),
                                                   y0))


def draw_report(report: dict, output_dir: Path, path: Path | None = None) -> Path:
    """Draw report.json's content as output_dir/report.png (or `path`), written atomically; returns the path.

    Top: a header (token, best step and why, early stop, rule), then small charts against the step (training loss,
    validation loss, norm ratio, CLIP-I, CLIP-T) with vertical lines at the best and early-stop steps. Below: one
    row of validation images per validation step (at most 20, evenly spaced, always the first, best and last), its
    scores on the left, the best row framed in green and the early-stop row in vermillion.
    """
    output_dir = Path(output_dir)
    path = Path(path) if path is not None else output_dir / "report.png"
    validations = sorted(report.get("validations") or [], key=lambda v: v["step"])
    best = (report.get("best") or {}).get("step")
    shown_steps = set(rows_to_show([v["step"] for v in validations], best, ROW_LIMIT))
    # No strip when no validation drew images (no prompts and no CLIP model): rows of gray "missing" cells would
    # suggest files were lost.
    drew = any(v.get("images") for v in validations)
    shown = [v for v in validations if v["step"] in shown_steps and drew]

    # The strip's shape: prompts x images per prompt, and the cell size of the first readable grid.
    grids = [open_grid(output_dir, v) for v in shown]
    shapes = [grid_shape(v, g) if g else None for v, g in zip(shown, grids)]
    groups = max([s[0] for s in shapes if s] + [len(v.get("prompts") or []) for v in shown] + [1])
    cols = max([s[1] for s in shapes if s] + [(v.get("grid") or {}).get("cols") or 1 for v in shown] + [1])
    first = next(((g, s) for g, s in zip(grids, shapes) if g), None)
    cell = (first[0].width // first[1][1], first[0].height // first[1][0]) if first else (64, 64)
    labels = [row_label(v) for v in shown]
    label_w = min(320, max([180] + [text_width(t, f) + 24 for lines in labels for t, f, _ in lines[:3]]))
    label_h = max([sum(line_height(f) + 1 for _, f, _ in lines) for lines in labels] + [0])

    # Thumbnails as large as the width budget allows, then smaller until the page fits the height budget too.
    charts = build_charts(report)
    limit = max(16, (MAX_SIDE - 2 * MARGIN - label_w - (groups - 1) * GROUP_GAP) // (groups * cols) - CELL_GAP)
    while True:
        layout = Layout([], charts, label_w, label_h, thumb_size(cell, limit), groups, cols, len(shown))
        layout.header = header_lines(report, layout.width - 2 * MARGIN)  # wrapped to the width the strip sets
        if layout.height <= MAX_SIDE or limit <= 16:
            break
        limit = max(16, limit * 9 // 10)

    try:
        picture = paint(report, layout, validations, shown, grids, shapes, labels)
    finally:
        for grid in grids:  # Image.open keeps each file open until its pixels are read
            if grid is not None:
                grid.close()
    return save_atomically(picture, path)


def paint(report: dict, layout: Layout, validations: list[dict], shown: list[dict], grids: list[Image.Image | None],
          shapes: list[tuple[int, int] | None], labels: list[list[TextLine]]) -> Image.Image:
    """The picture, top to bottom: header, charts, column heads, one row per shown validation."""
    best = (report.get("best") or {}).get("step")
    stop = (report.get("stopped_early") or {}).get("step")
    label_w, groups = layout.label_w, layout.groups
    picture = Image.new("RGB", (layout.width, min(layout.height, MAX_SIDE)), "white")
    draw = ImageDraw.Draw(picture)
    y = MARGIN
    for text, face, color in layout.header:
        draw.text((MARGIN, y), text, font=face, fill=color)
        y += line_height(face) + 2
    y += 8

    steps = [s for s, v in report.get("train_loss") or [] if finite(v)] + [v["step"] for v in validations]
    x_range = (min(steps), max(steps)) if steps else (0, 1)
    marks = [(s, c) for s, c in ((best, BEST_COLOR), (stop, STOP_COLOR)) if s is not None]
    chart_w, chart_h = layout.chart_size
    legend_line = not all(legend_fits(c, chart_w) for c in layout.charts)
    for i, chart in enumerate(layout.charts):
        row, col = divmod(i, layout.charts_per_row)
        image = draw_chart(chart, layout.chart_size, x_range, marks, best, legend_line)
        picture.paste(image, (MARGIN + col * (chart_w + CHART_GAP), y + row * (chart_h + CHART_GAP)))
    y += layout.charts_h

    if not shown:
        text = ("No validation images: give --validation_prompt (or --clip_model_name_or_path) to draw them."
                if validations else "No validation images yet.")
        draw.text((MARGIN, y), text, font=font(13), fill=MUTED)
        return picture

    # Column heads: what each prompt group measures, and its prompt wrapped to the group's width.
    images_x = MARGIN + label_w
    prompts = next((v["prompts"] for v in shown if v.get("prompts")), [])
    title = "validation images" + (f", {len(shown)} of {len(validations)} steps" if len(shown) < len(validations)
                                   else "")
    for j, text in enumerate(wrap(title, font(13), label_w - 12, 2)):
        draw.text((MARGIN, y + line_height(font(11)) + j * line_height(font(13))), text, font=font(13), fill=INK)
    for g in range(groups):
        x = images_x + g * (layout.group_w + GROUP_GAP)
        kind = "reconstruction (CLIP-I)" if g == 0 else "edit (CLIP-T)"
        draw.text((x, y), fit(kind, font(11), layout.group_w), font=font(11), fill=MUTED)
        for j, text in enumerate(wrap(prompts[g], font(13), layout.group_w, 2) if g < len(prompts) else []):
            draw.text((x, y + line_height(font(11)) + j * line_height(font(13))), text, font=font(13), fill=INK)
    y += layout.column_head_h

    right = MARGIN + layout.strip_w + ROW_PAD
    for i, (v, grid, shape, lines) in enumerate(zip(shown, grids, shapes, labels)):
        top = y + i * (layout.row_h + ROW_GAP)
        if i % 2:  # zebra, so the eye follows a row from its label to its images
            draw.rectangle((MARGIN - ROW_PAD, top, right, top + layout.row_h), fill=(247, 247, 247))
        ty = top + ROW_PAD
        for j, (text, face, color) in enumerate(lines):
            draw.text((MARGIN, ty), fit(text, face, label_w - 12), font=face, fill=color)
            if j == 0:  # the step line: its tags after it
                tx = MARGIN + text_width(text, face) + 8
                if v["step"] == best:
                    tx += tag(draw, (tx, ty), "BEST", BEST_COLOR) + 4
                if v["step"] == stop:
                    tag(draw, (tx, ty), "STOPPED", STOP_COLOR)
            ty += line_height(face) + 1
        paste_row(picture, draw, grid, shape, v, (images_x, top + ROW_PAD), layout)
        for step, color, inset in ((best, BEST_COLOR, 0), (stop, STOP_COLOR, 3 if stop == best else 0)):
            if v["step"] == step:  # the frame; an early stop at the best step gets a second one inside it
                draw.rectangle((MARGIN - ROW_PAD + inset, top + inset, right - inset, top + layout.row_h - inset),
                               outline=color, width=3)
    return picture


def save_atomically(picture: Image.Image, path: Path) -> Path:
    """A temporary file in the same folder, then os.replace: a viewer or a sync never sees half a PNG."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # A plain open, not mkstemp: mkstemp's 0600 would make report.png unreadable to anyone else (a shared server).
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        picture.save(tmp, format="PNG")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


if __name__ == "__main__":  # redraw: python validation_report.py OUTPUT_DIR
    folder = Path(sys.argv[1] if len(sys.argv) > 1 else ".")
    print(draw_report(json.loads((folder / "report.json").read_text()), folder))
