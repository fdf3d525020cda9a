"""The LightningModule (augment and normalise on the device, Adam, cross-entropy) and fit()."""
from __future__ import annotations

import csv
import logging
import warnings
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from .config import RunConfig
from .data import IMAGENET_MEAN, IMAGENET_STD, augment, normalize
from .errors import BusiError


class Classifier(L.LightningModule):
    """Batches arrive as uint8 images; augmentation and normalisation run wherever the model runs."""

    def __init__(self, model: nn.Module, cfg: RunConfig, mean=IMAGENET_MEAN, std=IMAGENET_STD):
        super().__init__()
        self.model, self.cfg, self.mean, self.std = model, cfg, mean, std

    def forward(self, x):
        return self.model(x)

    def on_after_batch_transfer(self, batch, dataloader_idx):
        x, y = batch
        if self.trainer is not None and self.trainer.training:
            x = augment(x, self.cfg.flip_p, self.cfg.max_rotation, self.cfg.autocontrast_p)
        return normalize(x, self.mean, self.std), y

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss, on_step=False, on_epoch=True, prog_bar=True, batch_size=len(y), sync_dist=True)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        self.log("val_loss", F.cross_entropy(logits, y), on_epoch=True, prog_bar=True, batch_size=len(y), sync_dist=True)
        self.log("val_acc", (logits.argmax(1) == y).float().mean(), on_epoch=True, batch_size=len(y), sync_dist=True)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.cfg.lr, weight_decay=self.cfg.weight_decay)


@torch.no_grad()
def logits_of(model: nn.Module, images: torch.Tensor, mean=IMAGENET_MEAN, std=IMAGENET_STD, batch_size: int = 64,
              device: torch.device | str | None = None) -> torch.Tensor:
    """Raw scores for uint8 NCHW images, in batches, on the model's device; returned on the CPU."""
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = [model(normalize(images[i:i + batch_size].to(device), mean, std)).float().cpu()
           for i in range(0, len(images), batch_size)]
    model.train(was_training)
    return torch.cat(out)


class History(Callback):
    """Per epoch: training loss, and loss/accuracy on the test part (for curves only: it selects nothing)."""

    def __init__(self, path: Path, test: tuple[torch.Tensor, torch.Tensor] | None):
        self.path, self.test, self.rows = path, test, []

    def on_train_epoch_end(self, trainer, module):
        row = {"epoch": trainer.current_epoch + 1, "train_loss": float(trainer.callback_metrics.get("train_loss", float("nan")))}
        if "val_loss" in trainer.callback_metrics:
            row["val_loss"] = float(trainer.callback_metrics["val_loss"])
        if self.test is not None and trainer.is_global_zero:
            logits = logits_of(module.model, self.test[0], module.mean, module.std)
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


def _loader(images, labels, batch_size, shuffle):
    return DataLoader(TensorDataset(images, labels), batch_size=batch_size, shuffle=shuffle,
                      drop_last=shuffle and len(labels) > batch_size)  # no 1-image batch, which BatchNorm cannot train on


def fit(model: nn.Module, cfg: RunConfig, train: tuple[torch.Tensor, torch.Tensor], out_dir: Path,
        val: tuple[torch.Tensor, torch.Tensor] | None = None, test: tuple[torch.Tensor, torch.Tensor] | None = None,
        resume: bool = False, progress: bool = True) -> tuple[nn.Module, list[dict]]:
    """Train with Lightning; returns the model to keep (best validation epoch if there is validation, else last)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    ckpt_dir = out_dir / "lightning"
    callbacks = [History(out_dir / "history.csv", test)]
    if val is not None:
        best = ModelCheckpoint(ckpt_dir, filename="best", monitor="val_loss", save_last=True)
    else:  # without a validation part there is nothing honest to call "best": keep the last epoch
        best = ModelCheckpoint(ckpt_dir, save_last=True, save_top_k=0)
    callbacks.append(best)
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.pytorch.accelerators.cuda"):
        logging.getLogger(name).setLevel(logging.WARNING)  # keep the GPU/TPU banner out of users' way
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")  # data is in memory
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")
    warnings.filterwarnings("ignore", message=".*no `val_dataloader`.*")  # validation is optional here
    try:
        trainer = L.Trainer(max_epochs=cfg.epochs, accelerator=cfg.accelerator, devices=_devices(cfg.devices),
                            precision=cfg.precision, strategy=cfg.strategy, num_nodes=cfg.num_nodes,
                            logger=False, callbacks=callbacks, default_root_dir=out_dir, num_sanity_val_steps=0,
                            enable_progress_bar=progress, enable_model_summary=False, log_every_n_steps=1)
    except (MisconfigurationException, ValueError, RuntimeError) as e:
        raise BusiError(f"cannot use --accelerator {cfg.accelerator} --devices {cfg.devices} --precision {cfg.precision}: "
                        f"{str(e).splitlines()[0]}") from None
    module = Classifier(model, cfg)
    resume_from = None
    if resume:
        candidates = [ckpt_dir / "last.ckpt"]
        resume_from = next((str(p) for p in candidates if p.exists()), None)
        if resume_from is None:
            raise BusiError(f"{ckpt_dir}: nothing to resume from (no last.ckpt)")
    trainer.fit(module, _loader(*train, cfg.batch_size, True),
                _loader(*val, cfg.batch_size, False) if val is not None else None,
                ckpt_path=resume_from, weights_only=False if resume_from else None)
    if val is not None and best.best_model_path:
        state = torch.load(best.best_model_path, map_location="cpu", weights_only=False)["state_dict"]
        module.load_state_dict(state)
    return module.model.cpu().eval(), callbacks[0].rows


def _devices(value: str):
    return int(value) if isinstance(value, str) and value.isdigit() else value

