"""Pretrain a tiny Stable-Diffusion-architecture pipeline from scratch on the toy world, on a CPU.

The pipeline is made of the usual diffusers/transformers classes, so train_textual_inversion.py and
StableDiffusionPipeline load it like any SD-1.x checkpoint:

    tokenizer     the real 49,408-token CLIP tokenizer (built offline, see examples/make_tiny_pipeline.py)
    text_encoder  CLIPTextModel, 32-dim, 3 layers, trained from scratch together with the UNet
    vae           AutoencoderKL, 2 levels (32 px images -> 16x16x4 latents), trained first on its own
    unet          UNet2DConditionModel, 3 levels (32, 64, 128 channels), cross-attention at 8x8 and 4x4
    scheduler     SD's DDPM betas (scaled_linear 0.00085-0.012, 1000 steps) rescaled to zero terminal SNR, with
                  v-prediction (like SD 2.x) and trailing timesteps

Stages: (1) world images (the held-out concept excluded), (2) VAE, (3) latents of every image, (4) text encoder and
UNet on the latent-diffusion loss with random captions (attributes dropped at random, 10% empty captions for
classifier-free guidance) and an EMA of the weights, which is what gets saved. The loss curve goes
to --log_csv. The text encoder is saved in fp32 (transformers would otherwise load it as fp16); UNet and VAE in fp16
(diffusers loads them as fp32), which keeps the folder under 25 MB.

    python examples/toy_world/pretrain.py --output_dir examples/toy_world/pipeline --threads 2
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import math
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]
import world  # noqa: E402
from make_tiny_pipeline import build_clip_tokenizer  # noqa: E402

TEXT_HIDDEN = 32
# SD's betas, rescaled to reach zero SNR at the last step, with v-prediction and "trailing" sampling steps (as in
# Lin et al. 2024, "Common diffusion noise schedules and sample steps are flawed"). With SD-1.x's own schedule the
# last step keeps sqrt(0.0047) of the image, which on 16x16 latents leaves the mean colour readable from the "pure"
# noise: the model then takes the background from the starting noise instead of from the prompt.
SCHEDULER_CONFIG = {
    "num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "prediction_type": "v_prediction", "rescale_betas_zero_snr": True, "timestep_spacing": "trailing",
    "set_alpha_to_one": False, "steps_offset": 1, "clip_sample": False,
}
# Probability that a caption names each attribute; a left-out shape reads "shape", a left-out background drops
# the "on a ... background" clause. Prompts such as "a photo of a triangle" or "a photo of a <S*>" are then in
# distribution.
KEEP = {"shape": 0.9, "colour": 0.85, "pattern": 0.85, "size": 0.7, "background": 0.7}
EMPTY_CAPTION = 0.1


def make_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(32, 64), norm_num_groups=16, layers_per_block=1, latent_channels=4,
        sample_size=world.RESOLUTION,
    )


def make_unet():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=world.RESOLUTION // 2, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(32, 64, 128), layers_per_block=1, norm_num_groups=32, attention_head_dim=8,
        cross_attention_dim=TEXT_HIDDEN,
    )


def make_text_encoder(tokenizer):
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=TEXT_HIDDEN, intermediate_size=4 * TEXT_HIDDEN, num_hidden_layers=3,
        num_attention_heads=4, max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=TEXT_HIDDEN,
        # Real ids so CLIP pools at the first EOS (see make_tiny_pipeline.py).
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    ))


def random_captions(attrs: list[dict[str, str]], rng: np.random.Generator) -> list[str]:
    out = []
    for a in attrs:
        if rng.random() < EMPTY_CAPTION:
            out.append("")
            continue
        keep = {k: bool(rng.random() < p) for k, p in KEEP.items()}
        out.append(world.caption(a, world.PREFIXES[rng.integers(len(world.PREFIXES))], keep))
    return out


class Log:
    def __init__(self, path: Path, start: float):
        self.start = start
        self.file = open(path, "w", newline="")
        self.writer = csv.writer(self.file)
        self.writer.writerow(["stage", "step", "loss", "elapsed_s"])

    def row(self, stage: str, step: int, loss: float) -> None:
        elapsed = time.time() - self.start
        self.writer.writerow([stage, step, f"{loss:.5f}", f"{elapsed:.1f}"])
        self.file.flush()
        print(f"[{elapsed:7.1f}s] {stage} step {step} loss {loss:.5f}", flush=True)


def train_vae(images: torch.Tensor, steps: int, batch_size: int, g: torch.Generator, log: Log):
    vae = make_vae()
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-3, total_steps=steps, pct_start=0.05)
    vae.train()
    running = []
    for step in range(steps):
        x = images[torch.randint(0, len(images), (batch_size,), generator=g)].float() / 127.5 - 1
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample(g)).sample
        mse = F.mse_loss(recon, x)
        loss = mse + (recon - x).abs().mean() + 1e-6 * posterior.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        running.append(mse.item())
        if (step + 1) % 50 == 0 or step == 0:
            log.row("vae", step + 1, float(np.mean(running)))
            running = []
    return vae.eval()


@torch.no_grad()
def encode_all(vae, images: torch.Tensor, batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    means, stds = [], []
    for start in range(0, len(images), batch_size):
        d = vae.encode(images[start : start + batch_size].float() / 127.5 - 1).latent_dist
        means.append(d.mean)
        stds.append(d.std)
    return torch.cat(means), torch.cat(stds)


def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    with torch.no_grad():
        for e, p in zip(ema.parameters(), model.parameters()):
            e.lerp_(p, 1 - decay)


def train_diffusion(tokenizer, means, stds, attrs, scaling: float, args, g: torch.Generator, log: Log):
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler.from_config(SCHEDULER_CONFIG)
    text_encoder, unet = make_text_encoder(tokenizer), make_unet()
    ema_te, ema_unet = copy.deepcopy(text_encoder).eval(), copy.deepcopy(unet).eval()
    params = list(text_encoder.parameters()) + list(unet.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=1e-2)
    warmup = 200

    def lr_at(step):  # linear warmup, cosine to 10%
        if step < warmup:
            return (step + 1) / warmup
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, args.steps - warmup)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    rng = np.random.default_rng(args.seed)
    text_encoder.train()
    unet.train()
    running = []
    for step in range(args.steps):
        idx = torch.randint(0, len(means), (args.batch_size,), generator=g)
        latents = (means[idx] + stds[idx] * torch.randn(means[idx].shape, generator=g)) * scaling
        noise = torch.randn(latents.shape, generator=g)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (args.batch_size,), generator=g)
        noisy = scheduler.add_noise(latents, noise, t)
        ids = tokenizer(random_captions([attrs[i] for i in idx.tolist()], rng), padding="max_length",
                        max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt").input_ids
        pred = unet(noisy, t, text_encoder(ids)[0]).sample
        loss = F.mse_loss(pred, scheduler.get_velocity(latents, noise, t))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        decay = min(args.ema, (1 + step) / (10 + step))
        ema_update(ema_te, text_encoder, decay)
        ema_update(ema_unet, unet, decay)
        running.append(loss.item())  # the same loss as the textual-inversion trainer's
        if (step + 1) % 100 == 0 or step == 0:
            log.row("diffusion", step + 1, float(np.mean(running)))
            running = []
    return ema_te, ema_unet, scheduler


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output_dir", default=str(HERE / "pipeline"))
    parser.add_argument("--log_csv", default=str(HERE / "pretrain_log.csv"))
    parser.add_argument("--num_images", type=int, default=50000)
    parser.add_argument("--vae_steps", type=int, default=800)
    parser.add_argument("--vae_from", default=None, help="reuse a saved VAE folder instead of training one")
    parser.add_argument("--steps", type=int, default=6500, help="text-encoder + UNet optimizer steps")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--ema", type=float, default=0.998)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    g = torch.Generator().manual_seed(args.seed)
    start = time.time()
    out = Path(args.output_dir)
    log = Log(Path(args.log_csv), start)
    timings = {}

    tokenizer = build_clip_tokenizer(out / "tokenizer")
    images, attrs = world.sample(args.num_images, seed=args.seed)
    assert not any(world.is_held_out(a) for a in attrs)
    images = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
    timings["data_s"] = round(time.time() - start, 1)

    if args.vae_from:
        from diffusers import AutoencoderKL

        vae = AutoencoderKL.from_pretrained(args.vae_from).float().eval()
    else:
        vae = train_vae(images, args.vae_steps, args.batch_size, g, log)
    timings["vae_s"] = round(time.time() - start - sum(timings.values()), 1)

    means, stds = encode_all(vae, images)
    scaling = float(1.0 / means.std())  # SD's scaling_factor: unit-variance latents
    vae.register_to_config(scaling_factor=scaling)
    timings["encode_s"] = round(time.time() - start - sum(timings.values()), 1)

    text_encoder, unet, scheduler = train_diffusion(tokenizer, means, stds, attrs, scaling, args, g, log)
    timings["diffusion_s"] = round(time.time() - start - sum(timings.values()), 1)

    from diffusers import StableDiffusionPipeline

    pipeline = StableDiffusionPipeline(
        vae=vae.half(), text_encoder=text_encoder, tokenizer=tokenizer, unet=unet.half(), scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipeline.save_pretrained(out)
    timings["total_s"] = round(time.time() - start, 1)
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    usage = resource.getrusage(resource.RUSAGE_SELF)
    timings["cpu_s"] = round(usage.ru_utime + usage.ru_stime, 1)
    summary = {"threads": args.threads, "args": vars(args), "timings": timings, "vae_scaling_factor": scaling,
               "pipeline_bytes": size, "torch": torch.__version__}
    (Path(args.log_csv).with_suffix(".json")).write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
