"""The LightningModule (augment and normalise on the device, Adam, cross-entropy) and fit()."""
from __future__ import annotations

import csv
import random
import sys
import time
import math
import logging
import warnings
from pathlib import Path

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from .config import RunConfig
from .data import augment, lesion_windows, normalize
from .inference import logits_of
from . import hardware
from .errors import BusiError
from .models import IMAGENET_MEAN, IMAGENET_STD, has_segmenter, last_conv_block


DISTILL_T = 2.0  # softened probabilities carry what the parent knows of every class, not only its top answer


class Classifier(L.LightningModule):
    """Batches arrive as uint8 images (and masks); augmentation and normalisation run wherever the model runs."""

    def __init__(self, model: nn.Module, cfg: RunConfig, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                 class_weights: torch.Tensor | None = None, normal_index: int | None = None,
                 present: list[int] | None = None, teacher: nn.Module | None = None):
        super().__init__()
        self.model, self.cfg, self.mean, self.std, self.normal_index = model, cfg, mean, std, normal_index
        # Fine-tuning on some of the model's classes (a benign/malignant-only folder): the loss is taken over the
        # classes present, so the others are not pushed towards zero, and the parent (teacher, frozen, kept out of
        # the optimiser) holds every probability near its own (Learning without Forgetting, Li & Hoiem 2016).
        self.present = present
        self._teacher = [teacher.eval().requires_grad_(False)] if teacher is not None else []
        self.register_buffer("class_weights", class_weights, persistent=False)
        self.lesion_head = None
        self.segmenter_only = has_segmenter(model) and cfg.freeze_classifier
        if self.segmenter_only:  # the parent's classifier as it is: no gradients, its BatchNorm statistics kept
            model.classifier.requires_grad_(False)
        if cfg.mask_weight > 0 and not has_segmenter(model):
            # A 1x1 convolution reads "lesion here?" off the last feature map; it exists only during
            # training (the saved model is the plain classifier) and steers features towards the lesion.
            layer, channels = last_conv_block(model)
            self.lesion_head = nn.Conv2d(channels, 1, 1)
            layer.register_forward_hook(lambda module, inputs, output: setattr(self, "_features", output))
        self.mix = mixer(cfg, num_classes=[m for m in model.modules() if isinstance(m, nn.Linear)][-1].out_features)

    def forward(self, x):
        return self.model(x)

    def on_after_batch_transfer(self, batch, dataloader_idx):
        x, y = batch[:2]
        masks = None
        if len(batch) == 4:  # (images, labels, uint8 masks, has-mask flags): unknown masks become -1
            masks = torch.where(batch[3].view(-1, 1, 1, 1), batch[2].float(), torch.full_like(batch[2], -1, dtype=torch.float))
        if self.trainer is not None and self.trainer.training:
            c = self.cfg
            if c.lesion_windows > 0 and masks is not None and self.normal_index is not None:
                x, y, masks = lesion_windows(x, y, masks, c.lesion_windows, self.normal_index)
            out = augment(x, masks, c.flip_p, c.max_rotation, c.autocontrast_p,
                          c.min_scale, c.brightness, c.contrast, c.ultrasound_p)
            x, masks = out if masks is not None else (out, None)
            if self.mix is not None:  # labels become class probabilities, which cross_entropy accepts as they are
                x, y = self.mix(x, y)
        x = normalize(x, self.mean, self.std)
        if self.cfg.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return (x, y) if masks is None else (x, y, masks)

    def on_fit_start(self):
        for teacher in self._teacher:
            teacher.to(self.device)

    def on_train_epoch_start(self):
        if self.segmenter_only:
            self.model.classifier.eval()

    def training_step(self, batch, batch_idx):
        x, y = batch[:2]
        if has_segmenter(self.model):  # the classifier's loss (unless frozen) and the segmenter's
            masks = batch[2] if len(batch) == 3 else None
            if self.segmenter_only:
                loss = self.cfg.mask_weight * self.segmentation_loss(self.model.lesion_logits(x), masks)
            else:
                logits, lesion = self.model.forward_with_lesion(x)
                loss = self.classification_loss(logits, y) + self.cfg.mask_weight * self.segmentation_loss(lesion, masks)
            self.log("train_loss", loss, on_step=False, on_epoch=True, prog_bar=True, batch_size=len(y), sync_dist=True)
            return loss
        logits = self(x)
        loss = self.classification_loss(logits, y)
        if self._teacher and self.cfg.distill_weight > 0:
            with torch.no_grad():
                target = F.softmax(self._teacher[0](x).float() / DISTILL_T, 1)
            distill = F.kl_div(F.log_softmax(logits.float() / DISTILL_T, 1), target, reduction="batchmean") * DISTILL_T ** 2
            self.log("distill_loss", distill, on_step=False, on_epoch=True, batch_size=len(y), sync_dist=True)
            loss = loss + self.cfg.distill_weight * distill
        if self.lesion_head is not None and len(batch) == 3:
            masks = batch[2]  # N1HW in [0, 1]; negative marks images without a mask file
            known = masks.amin(dim=(1, 2, 3)) >= 0
            if known.any():
                lesion = self.lesion_head(self._features[known])
                target = F.adaptive_avg_pool2d(masks[known].clamp_min(0), lesion.shape[-2:])
                mask_loss = F.binary_cross_entropy_with_logits(lesion, target)
                self.log("mask_loss", mask_loss, on_step=False, on_epoch=True, batch_size=int(known.sum()), sync_dist=True)
                loss = loss + self.cfg.mask_weight * mask_loss
        self.log("train_loss", loss, on_step=False, on_epoch=True, prog_bar=True, batch_size=len(y), sync_dist=True)
        return loss

    def segmentation_loss(self, lesion: torch.Tensor, masks: torch.Tensor | None) -> torch.Tensor:
        """Binary cross-entropy plus soft Dice over the images whose mask is known (an empty mask included: a normal
        scan teaches 'no lesion here'); Dice is taken over the batch, so lesion-free images add to its denominator
        only through false positives."""
        if masks is None:
            return lesion.sum() * 0
        known = masks.amin(dim=(1, 2, 3)) >= 0
        if not known.any():
            return lesion.sum() * 0
        lesion = lesion[known].float()
        target = F.interpolate(masks[known].clamp_min(0).float(), size=lesion.shape[-2:], mode="area")
        bce = F.binary_cross_entropy_with_logits(lesion, target)
        p = torch.sigmoid(lesion)
        dice = 1 - (2 * (p * target).sum() + 1) / (p.sum() + target.sum() + 1)
        self.log("mask_loss", bce + dice, on_step=False, on_epoch=True, batch_size=int(known.sum()), sync_dist=True)
        return bce + dice

    def classification_loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Cross-entropy, over the classes present in the training data when that is a subset of the model's."""
        weight = self.class_weights
        if self.present is not None:
            keep = torch.tensor(self.present, device=logits.device)
            logits = logits[:, keep]
            weight = None if weight is None else weight[keep]
            if y.dim() == 2:  # MixUp/CutMix: class probabilities
                y = y[:, keep]
            else:
                lookup = torch.full((int(keep.max()) + 1,), -1, dtype=torch.long, device=y.device)
                lookup[keep] = torch.arange(len(keep), device=y.device)
                y = lookup[y]
        return F.cross_entropy(logits, y, weight=weight, label_smoothing=self.cfg.label_smoothing)

    def validation_step(self, batch, batch_idx):
        x, y = batch[:2]
        logits = self(x)
        self.log("val_loss", F.cross_entropy(logits, y), on_epoch=True, prog_bar=True, batch_size=len(y), sync_dist=True)
        self.log("val_acc", (logits.argmax(1) == y).float().mean(), on_epoch=True, batch_size=len(y), sync_dist=True)

    def configure_optimizers(self):
        kind = torch.optim.AdamW if self.cfg.optimizer == "adamw" else torch.optim.Adam
        optimizer = kind([p for p in self.parameters() if p.requires_grad], lr=self.cfg.lr,
                         weight_decay=self.cfg.weight_decay)
        if self.cfg.scheduler == "none":
            return optimizer
        total = max(1, self.trainer.estimated_stepping_batches)
        warmup = min(total - 1, round(total * self.cfg.warmup_epochs / max(1, self.cfg.epochs)))

        def factor(step):  # linear warm-up, then cosine decay to zero
            if step < warmup:
                return (step + 1) / (warmup + 1)
            return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def mixer(cfg: RunConfig, num_classes: int):
    """torchvision's MixUp and/or CutMix (one of them, drawn per batch), or None when both are off."""
    from torchvision.transforms import v2

    kinds = [v2.MixUp(alpha=cfg.mixup_alpha, num_classes=num_classes)] if cfg.mixup_alpha > 0 else []
    kinds += [v2.CutMix(alpha=cfg.cutmix_alpha, num_classes=num_classes)] if cfg.cutmix_alpha > 0 else []
    if not kinds:
        return None
    return kinds[0] if len(kinds) == 1 else v2.RandomChoice(kinds)


class History(Callback):
    """Per epoch: training loss, and loss/accuracy on the test part (for curves only: it selects nothing)."""

    def __init__(self, path: Path, test: tuple[torch.Tensor, torch.Tensor] | None):
        self.path, self.test, self.rows = path, test, []

    def on_train_epoch_end(self, trainer, module):
        row = {"epoch": trainer.current_epoch + 1, "train_loss": float(trainer.callback_metrics.get("train_loss", float("nan")))}
        if "val_loss" in trainer.callback_metrics:
            row["val_loss"] = float(trainer.callback_metrics["val_loss"])
        if self.test is not None and trainer.is_global_zero:
            logits = logits_of(module.model, self.test[0], module.mean, module.std, tta=module.cfg.tta)
            row["test_loss"] = float(F.cross_entropy(logits, self.test[1]))
            row["test_accuracy"] = float((logits.argmax(1) == self.test[1]).float().mean())
        self.rows.append(row)
        if trainer.is_global_zero:  # one writer, also under DDP
            with open(self.path, "w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=list(row))
                w.writeheader()
                w.writerows(self.rows)

    def state_dict(self):
        return {"rows": self.rows}

    def load_state_dict(self, state):
        self.rows = state["rows"]


class RandomState(Callback):
    """Saves every random generator's state in each Lightning checkpoint and restores it on --resume, so a resumed
    run draws the same shuffles, augmentations and dropout masks as a run never interrupted.

    The state is taken when the checkpoint is written (end of an epoch, after its validation) and put back when
    Lightning restores the checkpoint, before it opens the next epoch's data loader, whose shuffle is the next draw
    in both runs.
    """

    def state_dict(self):
        state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state):
        torch.set_rng_state(state["torch"])
        np.random.set_state(state["numpy"])
        random.setstate(state["python"])
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])


class EpochLines(Callback):
    """Progress for logs (SLURM, nohup, CI), where a live progress bar prints nothing: a line per epoch, and within
    an epoch a line whenever `every` seconds have passed since the last, so a log never goes quiet for long."""

    def __init__(self, name: str, every: float = 30.0):
        self.name, self.every = name, every
        self.start = self.last = time.perf_counter()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        now = time.perf_counter()
        if trainer.is_global_zero and now - self.last >= self.every:
            self.last = now
            print(f"{self.name} epoch {trainer.current_epoch + 1}/{trainer.max_epochs}: batch {batch_idx + 1}/"
                  f"{trainer.num_training_batches} ({now - self.start:.0f} s)", flush=True)

    def on_train_epoch_end(self, trainer, module):
        if not trainer.is_global_zero:
            return
        metrics = trainer.callback_metrics
        losses = " ".join(f"{k} {float(metrics[k]):.3f}" for k in ("train_loss", "val_loss") if k in metrics)
        self.last = time.perf_counter()
        print(f"{self.name} epoch {trainer.current_epoch + 1}/{trainer.max_epochs}: {losses} "
              f"({self.last - self.start:.0f} s)", flush=True)


def device_tensors(tensors: tuple[torch.Tensor, ...], trainer: L.Trainer) -> tuple[torch.Tensor, ...]:
    """On a GPU the whole (small) dataset moves to the device once, so batches never wait on the CPU."""
    device = trainer.strategy.root_device
    return tuple(t.to(device) for t in tensors) if device.type != "cpu" else tensors


def train_loader(tensors, batch_size, shuffle):
    labels = tensors[1]
    return DataLoader(TensorDataset(*tensors), batch_size=batch_size, shuffle=shuffle,
                      drop_last=shuffle and len(labels) > batch_size)  # no 1-image batch, which BatchNorm cannot train on


def fit(model: nn.Module, cfg: RunConfig, train: tuple[torch.Tensor, ...], out_dir: Path,
        val: tuple[torch.Tensor, torch.Tensor] | None = None, test: tuple[torch.Tensor, torch.Tensor] | None = None,
        resume: bool = False, progress: bool = True, checkpoints: bool = True,
        normalization: tuple = (IMAGENET_MEAN, IMAGENET_STD), normal_index: int | None = None,
        present: list[int] | None = None, teacher: nn.Module | None = None) -> tuple[nn.Module, list[dict]]:
    """Train with Lightning; returns the last epoch's model and the per-epoch history.

    With a validation part, Lightning also keeps the epoch of lowest validation loss as lightning/best.ckpt;
    the model returned stays the last one, as in cross-validation, so CV estimates describe what users get.

    train is (uint8 images, labels) or, for the lesion head, (images, labels, uint8 masks, has-mask flags).
    """
    cfg, _ = hardware.resolve(cfg)  # a no-op when the caller resolved (and announced) "auto" already
    out_dir.mkdir(parents=True, exist_ok=True)
    ckpt_dir = out_dir / "lightning"
    callbacks = [History(out_dir / "history.csv", test), RandomState()]
    if val is not None:
        best = ModelCheckpoint(ckpt_dir, filename="best", monitor="val_loss", save_last=True)
    else:  # without a validation part there is nothing honest to call "best": keep the last epoch
        best = ModelCheckpoint(ckpt_dir, save_last=True, save_top_k=0)
    if checkpoints:
        callbacks.append(best)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")  # data is in memory
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")
    warnings.filterwarnings("ignore", message=".*no `val_dataloader`.*")  # validation is optional here
    warnings.filterwarnings("ignore", message=".*Checkpoint directory .* exists and is not empty.*")  # --resume
    bar = progress and sys.stdout.isatty()
    if progress and not bar:
        callbacks.append(EpochLines(out_dir.name))
    trainer = make_trainer(cfg, callbacks=callbacks, enable_checkpointing=checkpoints, default_root_dir=out_dir,
                           enable_progress_bar=bar)
    weights = None
    if cfg.class_weights == "balanced":
        counts = torch.bincount(train[1], minlength=int(train[1].max()) + 1).float()
        weights = counts.sum() / (len(counts) * counts.clamp_min(1))
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    module = Classifier(model, cfg, *normalization, class_weights=weights, normal_index=normal_index, present=present,
                        teacher=teacher)
    resume_from = None
    if resume:
        candidates = [ckpt_dir / "last.ckpt"]
        resume_from = next((str(p) for p in candidates if p.exists()), None)
        if resume_from is None:
            raise BusiError(f"{ckpt_dir}: nothing to resume from (no last.ckpt)")
    trainer.fit(module, train_loader(device_tensors(train, trainer), cfg.batch_size, True),
                train_loader(device_tensors(val[:2], trainer), cfg.batch_size, False) if val is not None else None,
                ckpt_path=resume_from, weights_only=False if resume_from else None)
    return module.model.cpu().to(memory_format=torch.contiguous_format).eval(), callbacks[0].rows


def make_trainer(cfg: RunConfig, **kwargs) -> L.Trainer:
    """Lightning's Trainer for cfg's hardware settings; a setting this machine cannot honour is a one-line error."""
    cfg, _ = hardware.resolve(cfg)
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.pytorch.accelerators.cuda", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)  # keep the GPU/TPU banner and tips out of users' way
    try:
        return L.Trainer(max_epochs=cfg.epochs, accelerator=cfg.accelerator, devices=_devices(cfg.devices),
                         precision=cfg.precision, strategy=cfg.strategy, num_nodes=cfg.num_nodes, logger=False,
                         num_sanity_val_steps=0, enable_model_summary=False, log_every_n_steps=1, **kwargs)
    except Exception as e:  # MisconfigurationException, missing backends (torch_xla …), bad values
        raise BusiError(f"cannot train with --accelerator {cfg.accelerator} --devices {cfg.devices} --precision {cfg.precision} "
                        f"--strategy {cfg.strategy}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None


def check_hardware(cfg: RunConfig) -> None:
    """Fail before any data is read or any file written when the hardware settings cannot work here."""
    make_trainer(cfg, enable_progress_bar=False, enable_checkpointing=False)


def _devices(value: str):
    return int(value) if isinstance(value, str) and value.isdigit() else value

