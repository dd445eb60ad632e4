"""The training loop shared by all stages.

Determinism (what makes a killed run resume identically): every random draw of a step (which
samples, their augmentation, noise, timesteps, CFG drops, reference masking, dropout) is derived
from `(seed, micro_step, rank)`, not from state carried between steps. A checkpoint therefore only
needs the weights, optimiser/EMA state and the step; data order and RNG follow from the step.
"""
from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from xnemo_core.checkpoints import save_bundle
from xnemo_core.config import SamplingConfig
from xnemo_core.models.reference import mask_reference_kv
from xnemo_core.models.stack import XNeMoModels

from . import losses as L
from .checkpoint import (
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
    unflatten_optimizer,
)
from .config import TrainConfig
from .data import BoxCache, FaceSampleDataset, StepBatchSampler, load_videos
from .gan import GanHead, resize_to
from .motion_labels import MotionProbe, attach_motion_labels
from .stages import (
    build_initial_models,
    enable_gradient_checkpointing,
    select_trainable,
)

VAE_STAGES = ("vae", "vae_decoder")
SAVE_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from integers (stable across runs and platforms)."""
    return int(np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts]).generate_state(2, np.uint64)[0] >> 1)


def _randn(shape, generator: torch.Generator, like: torch.Tensor) -> torch.Tensor:
    return torch.randn(shape, generator=generator).to(device=like.device, dtype=like.dtype)


def _frames(x: torch.Tensor) -> torch.Tensor:
    """[B,C,F,H,W] -> [B*F,C,H,W]."""
    b, c, f, h, w = x.shape
    return x.permute(0, 2, 1, 3, 4).reshape(b * f, c, h, w)


class TrainModule(nn.Module):
    """The networks of one stage and its loss: forward(batch, seed) -> {'loss': ..., parts...}."""

    def __init__(self, models: XNeMoModels, cfg: TrainConfig, gan: GanHead | None, perceptual: dict[str, nn.Module],
                 probe: MotionProbe | None = None):
        super().__init__()
        self.cfg = cfg
        self.stage = cfg.stage
        self.scaling_factor = models.config.vae.scaling_factor
        self.prediction_type = models.config.unet.prediction_type
        for name, module in models.modules().items():
            self.add_module(name, module)
        self.appearance = gan.appearance if gan is not None else None
        self.generator = gan.generator if gan is not None else None
        self.gan_resolution = gan.spec.resolution if gan is not None else 0
        self.perceptual = nn.ModuleDict(perceptual)
        self.probe = probe
        # which conditioning paths get gradients follows from what the stage trains (select_trainable ran first)
        self.trains_motion_encoder = any(p.requires_grad for p in models.motion_encoder.parameters())
        self.trains_reference_unet = any(p.requires_grad for p in models.reference_unet.parameters())
        self.register_buffer("alphas_cumprod", L.release_alphas_cumprod().float(), persistent=False)

    def forward(self, batch: dict[str, torch.Tensor], seed: int, discriminator: nn.Module | None = None):
        generator = torch.Generator().manual_seed(int(seed))
        if self.stage in VAE_STAGES:
            return self.vae_losses(batch, generator)
        if self.stage == "motion_init":
            return self.motion_label_losses(batch)
        return self.diffusion_losses(batch, generator, discriminator)

    # ------------------------------------------------------------------ VAE stage
    def vae_losses(self, batch, generator):
        lc = self.cfg.loss
        target = batch["target"]
        frames = target.shape[2]
        x = _frames(target)
        posterior = self.vae.encode(x).latent_dist
        z = posterior.mean + posterior.std * _randn(posterior.mean.shape, generator, posterior.mean)
        recon = self.vae.decode(z, num_frames=frames).sample
        parts = {"l1": F.l1_loss(recon.float(), x.float()), "kl": posterior.kl().mean()}
        loss = lc.vae_l1 * parts["l1"] + lc.vae_kl * parts["kl"]
        if lc.vae_perceptual > 0:
            parts["vgg"] = L.perceptual_loss(self.perceptual["vgg"], recon.float(), x.float())
            loss = loss + lc.vae_perceptual * parts["vgg"]
        return {"loss": loss, **{k: v.detach() for k, v in parts.items()}}

    # ------------------------------------------------------------------ motion encoder start
    def motion_label_losses(self, batch):
        """Regress each driving frame's blendshapes + head pose from the encoder's descriptor."""
        if "motion_labels" not in batch:
            raise ValueError("stage motion_init needs per-frame motion labels (the dataset attaches them)")
        images = _frames(batch["driving"])
        descriptors, features = self.motion_encoder.describe(images, batch["f_rts"].reshape(-1, 3))
        labels = batch["motion_labels"].reshape(len(images), -1)
        parts = {"labels": self.probe.loss(descriptors, labels)}
        if len(images) > 1:
            parts["motion_spread"] = motion_spread(features)
        return {"loss": parts["labels"], **{k: v.detach() for k, v in parts.items()}}

    # ------------------------------------------------------------------ stages 1-3
    def encode_target(self, target: torch.Tensor, generator) -> torch.Tensor:
        """[B,3,F,H,W] in [-1,1] -> latents [B,4,F,h,w] (posterior sample x scaling factor)."""
        b, _, f = target.shape[:3]
        posterior = self.vae.encode(_frames(target)).latent_dist
        z = posterior.mean + posterior.std * _randn(posterior.mean.shape, generator, posterior.mean)
        z = z * self.scaling_factor
        return z.reshape(b, f, *z.shape[1:]).permute(0, 2, 1, 3, 4)

    def diffusion_losses(self, batch, generator, discriminator=None):
        lc = self.cfg.loss
        stage = self.stage
        reference, target = batch["reference"], batch["target"]
        b, _, f = target.shape[:3]
        grad = torch.is_grad_enabled()
        with torch.no_grad():
            x0 = self.encode_target(target, generator)
            ref_latents = self.vae.encode(reference).latent_dist.mean * self.scaling_factor
            clip = self.image_encoder(pixel_values=batch["reference_clip"]).image_embeds[:, None]
        uncond = torch.rand(b, generator=generator) < lc.uncond_prob
        clip = clip * (~uncond).to(clip)[:, None, None]

        # motion: driving frames (+ the reference's own motion for CFG-dropped rows) in one encoder pass
        me = self.motion_encoder
        images = _frames(batch["driving"])
        f_rts = batch["f_rts"].reshape(b * f, 3)
        n_uncond = int(uncond.sum())
        if n_uncond:
            images = torch.cat([images, batch["motion_reference"][uncond.to(images.device)]])
            const = torch.tensor([[0.0, 0.0, 1.0]], device=f_rts.device, dtype=f_rts.dtype)
            f_rts = torch.cat([f_rts, const.expand(n_uncond, 3)])
        with torch.set_grad_enabled(grad and self.trains_motion_encoder):
            descriptors, features = me.describe(images, f_rts)
            tokens = me.tokens(descriptors)
            motion = tokens[: b * f].reshape(b, f, *tokens.shape[1:])
            if n_uncond:
                motion = motion.clone()
                motion[uncond.to(motion.device)] = tokens[b * f:][:, None].expand(-1, f, -1, -1)

        with torch.set_grad_enabled(grad and self.trains_reference_unet):
            bank = self.reference_unet(ref_latents, clip, timestep=0)
            kv = self.denoising_unet.project_reference(bank)
        kv = mask_reference_kv(kv, lc.reference_mask_ratio, generator)
        rows = torch.arange(b)
        rows[uncond] = -1

        timesteps = torch.randint(0, len(self.alphas_cumprod), (b,), generator=generator).to(x0.device)
        noise = _randn(x0.shape, generator, x0)
        if lc.reference_start_prob > 0:  # no draws when off: existing configs keep their random stream
            timesteps, noise = self._reference_start(x0, ref_latents, timesteps, noise, generator)
        alpha = self.alphas_cumprod[timesteps].view(b, 1, 1, 1, 1).to(x0)
        noisy = alpha.sqrt() * x0 + (1 - alpha).sqrt() * noise
        prediction = self.denoising_unet(noisy, timesteps, clip, motion, kv, rows)
        if self.prediction_type == "v_prediction":
            target_out = alpha.sqrt() * noise - (1 - alpha).sqrt() * x0
        else:
            target_out = noise
        per_sample = (prediction.float() - target_out.float()).pow(2).flatten(1).mean(1)
        parts = {"diffusion": per_sample.mean()}
        if self.trains_motion_encoder and b * f > 1:
            parts["motion_spread"] = motion_spread(features[: b * f])
        if lc.x0_weighting and self.prediction_type == "epsilon":
            weight = ((1 - alpha) / alpha).flatten().float().clamp(1.0, lc.max_x0_weight)
            loss = lc.diffusion * (weight * per_sample).mean()
        else:
            loss = lc.diffusion * parts["diffusion"]

        out = {}
        if stage == "motion" and self.generator is not None:
            gan_loss, gan_parts, fake, real = self.gan_losses(reference, target[:, :, 0], descriptors[:b], discriminator)
            loss = loss + lc.gan_weight * gan_loss
            parts.update(gan_parts)
            out = {"fake": fake.detach(), "real": real}
        return {"loss": loss, **{k: v.detach() for k, v in parts.items()}, **out}

    def _reference_start(self, x0, ref_latents, timesteps, noise, generator):
        """Re-noise a `loss.reference_start_prob` fraction of the batch as a sample started from the
        reference at `loss.reference_start_t` sees it (losses.reference_start_noise)."""
        lc = self.cfg.loss
        b = x0.shape[0]
        chosen = (torch.rand(b, generator=generator) < lc.reference_start_prob).to(x0.device)
        early = torch.randint(0, lc.reference_start_t + 1, (b,), generator=generator).to(x0.device)
        start_alpha = self.alphas_cumprod[lc.reference_start_t].to(x0)
        shifted = L.reference_start_noise(noise, x0, ref_latents[:, :, None], start_alpha)
        noise = torch.where(chosen.view(b, 1, 1, 1, 1), shifted, noise)
        return torch.where(chosen, early, timesteps), noise

    def gan_losses(self, reference, target, f_mot, discriminator):
        """Generator side of the GAN head: L1, VGG-19, VGGFace, adversarial, feature matching."""
        lc = self.cfg.loss
        res = self.gan_resolution
        fake = self.generator(self.appearance(resize_to(reference, res)), f_mot)
        real = resize_to(target, res)
        parts = {"gan_l1": F.l1_loss(fake.float(), real.float())}
        total = lc.l1 * parts["gan_l1"]
        if lc.vgg > 0:
            parts["gan_vgg"] = L.perceptual_loss(self.perceptual["vgg"], fake.float(), real.float())
            total = total + lc.vgg * parts["gan_vgg"]
        if lc.vggface > 0:
            parts["gan_vggface"] = L.perceptual_loss(self.perceptual["vggface"], fake.float(), real.float())
            total = total + lc.vggface * parts["gan_vggface"]
        if discriminator is not None and (lc.adversarial > 0 or lc.feature_matching > 0):
            fake_logits, fake_feats = discriminator(fake)
            with torch.no_grad():
                _, real_feats = discriminator(real)
            parts["gan_adv"] = L.generator_adversarial(fake_logits.float())
            parts["gan_fm"] = L.feature_matching(fake_feats, real_feats)
            total = total + lc.adversarial * parts["gan_adv"] + lc.feature_matching * parts["gan_fm"]
        return total, parts, fake, real


def motion_spread(features: torch.Tensor) -> torch.Tensor:
    """Mean over channels of the batch std of the motion encoder's FAN features (0 = collapsed)."""
    return features.detach().float().std(0).mean()


def parameter_groups(trainable: dict[str, nn.Parameter], oc) -> list[dict]:
    """Optimiser groups of the stage's own parameters: the motion encoder may get its own rate."""
    if oc.motion_encoder_lr is None:
        return [{"params": list(trainable.values()), "lr": oc.lr}]
    encoder = [p for k, p in trainable.items() if k.startswith("motion_encoder.")]
    rest = [p for k, p in trainable.items() if not k.startswith("motion_encoder.")]
    return [g for g in ({"params": rest, "lr": oc.lr}, {"params": encoder, "lr": oc.motion_encoder_lr}) if g["params"]]


def lr_factor(oc) -> Callable[[int], float]:
    """Learning-rate multiplier per optimiser step: linear warmup, then constant or cosine decay."""
    warmup, total = max(0, oc.warmup_steps), max(1, oc.max_steps)
    if oc.lr_decay not in ("constant", "cosine"):
        raise ValueError(f"optim.lr_decay must be constant or cosine, got {oc.lr_decay!r}")

    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if oc.lr_decay == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return oc.min_lr_ratio + (1 - oc.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


class EMA:
    """Exponential moving average of the trainable parameters (fp32 shadow)."""

    def __init__(self, params: dict[str, nn.Parameter], decay: float):
        self.decay = decay
        self.shadow = {k: p.detach().float().clone() for k, p in params.items()}

    @torch.no_grad()
    def update(self, params: dict[str, nn.Parameter], step: int) -> None:
        decay = min(self.decay, (1 + step) / (10 + step))
        for k, p in params.items():
            self.shadow[k].lerp_(p.detach().float(), 1 - decay)


class Trainer:
    """Builds a stage from its config and runs it: `Trainer(cfg).fit(resume=True)`."""

    def __init__(self, cfg: TrainConfig, output: str | Path | None = None, videos=None, detector=None,
                 log: Callable[[str], None] | None = None):
        from accelerate import Accelerator
        from accelerate.utils import DistributedDataParallelKwargs

        self.cfg = cfg
        self.output = Path(output or cfg.output)
        def accelerator():
            return Accelerator(mixed_precision=cfg.optim.mixed_precision,
                               gradient_accumulation_steps=cfg.optim.grad_accum,
                               kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)])

        try:
            self.accelerator = accelerator()
        except ValueError:  # an earlier stage in this process used another precision (state is a singleton)
            from accelerate.state import AcceleratorState

            AcceleratorState._reset_state()
            self.accelerator = accelerator()
        self.log_fn = log or (lambda msg: self.accelerator.print(msg))
        self._videos, self._detector, self._dataset = videos, detector, None
        oc = cfg.optim

        self.models, self.license = build_initial_models(cfg.model, oc.seed)
        self.models.to(dtype=torch.float32)
        self.trainable = select_trainable(cfg.stage, self.models)
        if oc.gradient_checkpointing:
            enable_gradient_checkpointing(self.models)

        self.gan = None
        head_params: dict[str, nn.Parameter] = {}
        if cfg.stage == "motion" and cfg.loss.gan:
            torch.manual_seed(derive_seed(oc.seed, 1))
            self.gan = GanHead(cfg.gan, self.models.config.motion_encoder.descriptor_dim)
            if cfg.gan.appearance_weights:
                from xnemo_core.checkpoints import read_state_dict

                self.gan.appearance.load_backbone(read_state_dict(cfg.gan.appearance_weights))
            if cfg.model.gan_head:
                from safetensors.torch import load_file

                self.gan.load_state_dict(load_file(cfg.model.gan_head))
            self.gan.train()
            head_params = {f"gan.{k}": p for k, p in self.gan.named_parameters() if not k.startswith("discriminator.")}
        self.perceptual = self._perceptual_nets()
        self.probe = None
        if cfg.stage == "motion_init":
            torch.manual_seed(derive_seed(oc.seed, 3))
            self.probe = MotionProbe(self.models.config.motion_encoder.descriptor_dim).train()
            head_params = {f"probe.{k}": p for k, p in self.probe.named_parameters()}
        self.module = TrainModule(self.models, cfg, self.gan, self.perceptual, self.probe)

        groups = parameter_groups(self.trainable, oc)
        if head_params:  # the stage's training-only head: GAN head (stage 2) or label read-out (motion_init)
            groups.append({"params": list(head_params.values()), "lr": oc.gan_lr if self.gan is not None else oc.lr})
        self.optimizer = torch.optim.AdamW(groups, betas=tuple(oc.betas), weight_decay=oc.weight_decay)
        self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_factor(oc))
        self.disc = self.disc_optimizer = None
        if self.gan is not None:
            self.disc = self.gan.discriminator
            self.disc_optimizer = torch.optim.Adam(self.disc.parameters(), lr=oc.disc_lr, betas=(0.0, 0.99))
        prepared = self.accelerator.prepare(self.module, self.optimizer, self.lr_scheduler,
                                            *([self.disc, self.disc_optimizer] if self.disc is not None else []))
        self.module, self.optimizer, self.lr_scheduler = prepared[:3]
        if self.disc is not None:
            self.disc, self.disc_optimizer = prepared[3:]
        self.params = {**self.trainable, **head_params}
        self.ema = EMA(self.params, oc.ema_decay) if oc.ema_decay > 0 else None
        self.step = 0
        self.motion_collapse_warned = False
        self.timings: list[float] = []
        n_train = sum(p.numel() for p in self.params.values())
        self.log_fn(f"stage {cfg.stage}: {len(self.params)} trainable tensors, {n_train / 1e6:.2f}M parameters; "
                    f"device {self.accelerator.device}, {self.accelerator.num_processes} process(es)")

    # ------------------------------------------------------------------ setup helpers
    def _perceptual_nets(self) -> dict[str, nn.Module]:
        lc = self.cfg.loss
        need = {"vgg": (self.gan is not None and lc.vgg > 0) or (self.cfg.stage in VAE_STAGES and lc.vae_perceptual > 0),
                "vggface": self.gan is not None and lc.vggface > 0}
        nets = {}
        for kind, needed in need.items():
            if not needed:
                continue
            weights = lc.vgg19_weights if kind == "vgg" else lc.vggface_weights
            torch.manual_seed(derive_seed(self.cfg.optim.seed, 2, len(nets)))
            nets[kind] = L.build_perceptual(kind, weights, lc.random_perceptual_ok, lc.perceptual_width_divisor)
            if not weights:
                self.log_fn(f"warning: {kind} perceptual loss uses RANDOM weights (no weight file configured)")
        return nets

    @property
    def dataset(self) -> FaceSampleDataset:
        if self._dataset is None:
            videos = self._videos if self._videos is not None else load_videos(self.cfg.data, self._detector,
                                                                                log=self.log_fn)
            if self.probe is not None:  # motion_init: per-frame labels, standardised on the training frames
                if any(v.motion_labels is None for v in videos):
                    attach_motion_labels(videos, BoxCache(self.cfg.data.cache_dir), self.cfg.data.fps,
                                         self.cfg.data.max_frames_per_video, log=self.log_fn)
                self.probe.fit_label_scale(np.concatenate([v.motion_labels[:v.train_end] for v in videos]))
            self._videos = videos
            self._dataset = FaceSampleDataset(videos, self.cfg.data, self.cfg.augment,
                                              self.models.config.motion_encoder.image_size, self.cfg.optim.seed,
                                              self.cfg.loss.f_rts_mode)
        return self._dataset

    def batch(self, sample_ids) -> dict[str, torch.Tensor]:
        items = [self.dataset[i] for i in sample_ids]
        return {k: torch.stack([item[k] for item in items]) for k in items[0]}

    def _to_device(self, batch):
        return {k: v.to(self.accelerator.device) for k, v in batch.items()}

    # ------------------------------------------------------------------ one step
    def train_step(self, batch: dict[str, torch.Tensor], micro_step: int) -> dict[str, float]:
        """Forward/backward/update on one micro-batch; all randomness derived from `micro_step`."""
        acc, oc = self.accelerator, self.cfg.optim
        seed = derive_seed(oc.seed, micro_step, acc.process_index)
        torch.manual_seed(seed)  # dropout and anything else drawing from the global generator
        batch = self._to_device(batch)
        models = [self.module] + ([self.disc] if self.disc is not None else [])
        with acc.accumulate(*models):
            if self.disc is not None:
                self.disc.requires_grad_(False)
            # the generator step reads the frozen discriminator directly (no DDP gradient sync for it)
            out = self.module(batch, seed, acc.unwrap_model(self.disc) if self.disc is not None else None)
            acc.backward(out["loss"])
            if acc.sync_gradients and oc.grad_clip > 0:
                acc.clip_grad_norm_(list(self.params.values()), oc.grad_clip)
            self.optimizer.step()
            self.lr_scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            logs = {k: float(v.detach()) for k, v in out.items() if k not in ("fake", "real")}
            if self.disc is not None and "fake" in out:
                logs.update(self._discriminator_step(out["real"], out["fake"], micro_step))
        if acc.sync_gradients and self.ema is not None:
            self.ema.update(self.params, micro_step)
        return logs

    def _warn_if_motion_collapsed(self, logs: dict[str, float]) -> None:
        """Say once when the motion encoder's features no longer depend on the driving frame."""
        if logs.get("motion_spread", 1.0) > 1e-6 or self.motion_collapse_warned:
            return
        self.motion_collapse_warned = True
        self.log_fn(f"WARNING step {self.step}: the motion encoder collapsed (its features are the same for "
                    "every driving frame, so the model cannot follow motion). Lower optim.motion_encoder_lr "
                    "or start the encoder from trained weights.")

    def _discriminator_step(self, real, fake, micro_step) -> dict[str, float]:
        lc = self.cfg.loss
        self.disc.requires_grad_(True)
        use_r1 = lc.r1 > 0 and micro_step % max(1, lc.r1_every) == 0
        real = real.detach().requires_grad_(use_r1)
        logits, _ = self.disc(torch.cat([real, fake.detach()]), groups=2)  # one forward (DDP-friendly)
        real_logits, fake_logits = logits.chunk(2)
        loss = L.discriminator_adversarial(real_logits.float(), fake_logits.float())
        logs = {"disc": float(loss.detach())}
        if use_r1:
            penalty = L.r1_penalty(real_logits, real)
            loss = loss + lc.r1 / 2 * penalty * lc.r1_every
            logs["r1"] = float(penalty.detach())
        self.accelerator.backward(loss)
        self.disc_optimizer.step()
        self.disc_optimizer.zero_grad(set_to_none=True)
        return logs

    # ------------------------------------------------------------------ the loop
    def fit(self, resume: bool = False, max_steps: int | None = None, stop_at: int | None = None) -> dict:
        """Train to max_steps (resuming from the newest checkpoint if asked); returns the metrics.

        `stop_at` ends the loop early without writing the final outputs (used to simulate a kill)."""
        cfg, acc = self.cfg, self.accelerator
        max_steps = int(max_steps or cfg.optim.max_steps)
        self.output.mkdir(parents=True, exist_ok=True)
        if acc.is_main_process:
            (self.output / "train_config.json").write_text(json.dumps(cfg.to_dict(), indent=1))
        if resume:
            self.resume()
        accum, batch_size = cfg.optim.grad_accum, cfg.optim.batch_size
        sampler = StepBatchSampler(self.step * accum, max_steps * accum, batch_size, acc.num_processes,
                                   acc.process_index)
        loader = torch.utils.data.DataLoader(self.dataset, batch_sampler=sampler, num_workers=cfg.data.num_workers)
        batches = iter(loader)
        log_path = self.output / "log.jsonl"
        self._truncate_log(log_path, self.step)
        started = time.perf_counter()
        while self.step < max_steps:
            if stop_at is not None and self.step >= stop_at:
                return {}
            t0 = time.perf_counter()
            sums: dict[str, float] = {}
            for k in range(accum):
                logs = self.train_step(next(batches), self.step * accum + k)
                for key, value in logs.items():
                    sums[key] = sums.get(key, 0.0) + value / accum
            self.step += 1
            elapsed = time.perf_counter() - t0
            self.timings.append(elapsed)
            record = {"step": self.step, **{k: round(v, 6) for k, v in sums.items()},
                      "lr": self.lr_scheduler.get_last_lr()[0], "sec": round(elapsed, 4)}
            if not all(math.isfinite(v) for v in sums.values()):
                raise FloatingPointError(f"non-finite loss at step {self.step}: {sums}")
            self._warn_if_motion_collapsed(sums)
            if acc.is_main_process:
                with open(log_path, "a") as handle:
                    handle.write(json.dumps(record) + "\n")
                if self.step % max(1, cfg.log.log_every) == 0 or self.step == 1:
                    parts = " ".join(f"{k} {v:.4f}" for k, v in sums.items())
                    self.log_fn(f"[{cfg.stage}] step {self.step}/{max_steps} {parts} ({elapsed:.2f}s)")
            if cfg.log.checkpoint_every and self.step % cfg.log.checkpoint_every == 0 and self.step < max_steps:
                self.save()
            if self.draws_samples and self.step % cfg.log.sample_every == 0 and acc.is_main_process:
                self.write_samples()
        self.save()
        metrics = self.finish(time.perf_counter() - started)
        return metrics

    @staticmethod
    def _truncate_log(path: Path, step: int) -> None:
        if not path.is_file():
            return
        kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
        path.write_text("".join(line + "\n" for line in kept))

    # ------------------------------------------------------------------ checkpoints
    def _stateful_modules(self) -> dict[str, nn.Module]:
        """Components holding trainable parameters (+ the GAN head): what a checkpoint stores."""
        owners = {name.split(".", 1)[0] for name in self.params}
        modules = {name: m for name, m in self.models.modules().items() if name in owners}
        if self.gan is not None:
            modules["gan"] = self.gan
        if self.probe is not None:
            modules["probe"] = self.probe
        return modules

    def save(self) -> Path | None:
        acc = self.accelerator
        acc.wait_for_everyone()
        if not acc.is_main_process:
            return None
        weights = {f"{name}.{k}": v for name, m in self._stateful_modules().items() for k, v in m.state_dict().items()}
        optimizers = {"main": self.optimizer.optimizer if hasattr(self.optimizer, "optimizer") else self.optimizer}
        if self.disc_optimizer is not None:
            optimizers["disc"] = getattr(self.disc_optimizer, "optimizer", self.disc_optimizer)
        scheduler = getattr(self.lr_scheduler, "scheduler", self.lr_scheduler)
        state = {"stage": self.cfg.stage, "lr_scheduler": {k: v for k, v in scheduler.state_dict().items()
                                                           if k != "lr_lambdas"}}
        return save_checkpoint(self.output / "checkpoints", self.step, weights, optimizers, state,
                               self.ema.shadow if self.ema else None, keep=self.cfg.log.keep_checkpoints)

    def resume(self, path: str | Path | None = None) -> bool:
        path = Path(path) if path else latest_checkpoint(self.output / "checkpoints")
        if path is None:
            self.log_fn("resume: no checkpoint found, starting from step 0")
            return False
        state = load_checkpoint(path)
        if state["stage"] != self.cfg.stage:
            raise ValueError(f"{path} is a {state['stage']!r} checkpoint, this run is stage {self.cfg.stage!r}")
        for name, module in self._stateful_modules().items():
            prefix = name + "."
            module.load_state_dict({k[len(prefix):]: v for k, v in state["weights"].items() if k.startswith(prefix)})
        unflatten_optimizer(getattr(self.optimizer, "optimizer", self.optimizer), "main", state["optim_tensors"],
                            state["optimizers"]["main"])
        if self.disc_optimizer is not None:
            unflatten_optimizer(getattr(self.disc_optimizer, "optimizer", self.disc_optimizer), "disc",
                                state["optim_tensors"], state["optimizers"]["disc"])
        scheduler = getattr(self.lr_scheduler, "scheduler", self.lr_scheduler)
        scheduler.load_state_dict({**scheduler.state_dict(), **state["lr_scheduler"]})
        if self.ema is not None:  # a checkpoint written without EMA starts the average at its weights
            self.ema.shadow = ({k: v.float() for k, v in state["ema"].items()} if state["ema"] is not None
                               else EMA(self.params, self.ema.decay).shadow)
        self.step = int(state["step"])
        self.log_fn(f"resumed from {path} at step {self.step}")
        return True

    # ------------------------------------------------------------------ outputs
    def finish(self, seconds: float) -> dict:
        """Write final.safetensors (EMA weights if on), the GAN head, a sample grid and metrics.json."""
        acc = self.accelerator
        acc.wait_for_everyone()
        timed = self.timings[1:] if len(self.timings) > 1 else self.timings
        per_step = self.cfg.optim.batch_size * self.cfg.optim.grad_accum * acc.num_processes
        metrics = {"stage": self.cfg.stage, "steps": self.step, "seconds": round(seconds, 2),
                   "samples_per_s": round(per_step * len(timed) / max(sum(timed), 1e-9), 4) if timed else None,
                   "batch_size": per_step}
        if not acc.is_main_process:
            return metrics
        log_path = self.output / "log.jsonl"
        if log_path.is_file():
            rows = [json.loads(line) for line in log_path.read_text().splitlines() if line][-20:]
            keys = [k for k in rows[-1] if k not in ("step", "lr", "sec")] if rows else []
            metrics["final_losses"] = {k: round(float(np.mean([r[k] for r in rows if k in r])), 6) for k in keys}
        if self.cfg.stage == "vae":
            metrics["scaling_factor"] = self.calibrate_scaling_factor()
        self.export(self.output / "final.safetensors")
        if self.gan is not None:
            from safetensors.torch import save_file

            save_file({k: v.detach().cpu().contiguous() for k, v in self.gan.state_dict().items()},
                      str(self.output / "gan_head.safetensors"))
        if self.draws_samples:
            self.write_samples()
        (self.output / "metrics.json").write_text(json.dumps(metrics, indent=1))
        self.log_fn(f"stage {self.cfg.stage} done: {json.dumps(metrics)}")
        return metrics

    @torch.no_grad()
    def calibrate_scaling_factor(self, samples: int = 64) -> float:
        """Set the VAE's latent scaling factor to 1 / std of its latents on training data (SD's rule),
        so diffusion stages see unit-variance latents. Written into the bundle's config."""
        vae = self.models.vae
        mode = vae.training
        vae.eval()
        latents = []
        for start in range(0, samples, 8):
            batch = self.batch([derive_seed(self.cfg.optim.seed, 9, i) for i in range(start, start + 8)])
            latents.append(vae.encode(_frames(batch["target"]).to(self.models.device)).latent_dist.mean.float().cpu())
        vae.train(mode)
        factor = round(1.0 / float(torch.cat(latents).std()), 5)
        config = self.models.config
        self.models.config = dataclasses.replace(config, vae=dataclasses.replace(config.vae, scaling_factor=factor))
        vae.register_to_config(scaling_factor=factor)
        self.log_fn(f"vae: latent scaling factor set to {factor}")
        return factor

    def export(self, path: Path, dtype: torch.dtype | None = None) -> None:
        """The whole stack as an xnemo bundle (trained weights replaced by their EMA when on)."""
        backup = {}
        if self.ema is not None:
            with torch.no_grad():
                for k, p in self.trainable.items():
                    backup[k] = p.detach().clone()
                    p.copy_(self.ema.shadow[k].to(p))
        try:
            save_bundle(self.models, path, dtype=dtype or SAVE_DTYPES[self.cfg.log.save_dtype],
                        license_text=self.license,
                        extra_metadata={"training_stage": self.cfg.stage, "training_steps": str(self.step),
                                        "training_config": json.dumps(self.cfg.to_dict())})
        finally:
            with torch.no_grad():
                for k, value in backup.items():
                    self.trainable[k].copy_(value)

    # ------------------------------------------------------------------ sample grids
    def preview_batch(self) -> dict[str, torch.Tensor]:
        """A fixed set of samples (held-out frames when there are any) for sample grids."""
        data = self.dataset
        try:
            data = FaceSampleDataset(data.videos, data.spec, data.augment, data.motion_size, data.seed,
                                     data.f_rts_mode, split="heldout")
        except ValueError:
            pass
        items = [data[derive_seed(self.cfg.optim.seed, 7, i)] for i in range(self.cfg.log.sample_count)]
        return {k: torch.stack([item[k] for item in items]) for k in items[0]}

    @torch.no_grad()
    def render_preview(self, batch: dict[str, torch.Tensor]) -> np.ndarray:
        """Rows: reference | driving view | target frames | model output frames (| GAN output)."""
        from xnemo_core.pipeline import XNeMoPipeline

        modes = {name: m.training for name, m in self.models.modules().items()}
        gan_mode = self.gan.training if self.gan is not None else None
        for m in self.models.modules().values():
            m.eval()
        if self.gan is not None:
            self.gan.eval()
        device = self.models.device
        batch = {k: v.to(device) for k, v in batch.items()}
        rows = []
        try:
            for i in range(batch["target"].shape[0]):
                target = batch["target"][i]  # [3,F,H,W]
                res = target.shape[-1]
                if self.cfg.stage in VAE_STAGES:
                    rec = self.models.vae.decode(self.models.vae.encode(target.permute(1, 0, 2, 3)).latent_dist.mean,
                                                 num_frames=target.shape[1]).sample
                    rows.append([*target.permute(1, 0, 2, 3), *rec])
                    continue
                pipe = XNeMoPipeline(self.models)
                prepared = pipe.prepare_reference(batch["reference"][i:i + 1], batch["reference_clip"][i:i + 1],
                                                  batch["motion_reference"][i:i + 1])
                tokens = self.models.motion_encoder(batch["driving"][i:i + 1], batch["f_rts"][i:i + 1])
                settings = SamplingConfig(steps=self.cfg.log.sample_steps, guidance_scale=self.cfg.log.sample_guidance,
                                          context_frames=min(24, self.models.config.unet.temporal_max_len), seed=0)
                video = pipe.sample(prepared, tokens, settings).video[0].to(device) * 2 - 1  # [3,F,H,W]
                driving = resize_to(batch["driving"][i].permute(1, 0, 2, 3), res)
                row = [batch["reference"][i], *driving, *target.permute(1, 0, 2, 3), *video.permute(1, 0, 2, 3)]
                if self.gan is not None:
                    f_mot = self.models.motion_encoder.descriptor(batch["driving"][i:i + 1, :, 0], batch["f_rts"][i:i + 1, 0])
                    fake = self.gan.generate(batch["reference"][i:i + 1], f_mot)
                    row.append(resize_to(fake, res)[0])
                rows.append(row)
        finally:
            for name, m in self.models.modules().items():
                m.train(modes[name])
            if self.gan is not None:
                self.gan.train(gan_mode)
        width = max(len(r) for r in rows)
        tiles = [torch.cat([*r, *[torch.full_like(r[0], -1)] * (width - len(r))], dim=2) for r in rows]
        grid = torch.cat(tiles, dim=1).float().clamp(-1, 1)
        return ((grid + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()

    @property
    def draws_samples(self) -> bool:
        """Sample grids show generated frames: every stage but motion_init (which generates none)."""
        return bool(self.cfg.log.sample_every) and self.cfg.stage != "motion_init"

    def write_samples(self) -> Path:
        from PIL import Image

        folder = self.output / "samples"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"step-{self.step:08d}.png"
        Image.fromarray(self.render_preview(self.preview_batch())).save(path)
        return path
