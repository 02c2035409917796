"""A trainer's TensorBoard log (``train_*.tensorboard: true``; needs ``psa-dist[tensorboard]``):
the scalars of the JSON log lines (loss, lr, images/s) and, every epoch, a few image panels of the
last batch: the image and the model's output (the CAMs' maximum, for the classifier), the
affinity labels it trains on (AffinityNet), or the label and the prediction (segmenters). Written by
rank 0 to ``<model dir>/tensorboard``, beside ``log.jsonl``; ``tensorboard --logdir out_dir``
shows every trainer of a run."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..core.image import MEAN, STD
from ..data.inspect import colorize

PANELS = 4          # images per epoch


class TensorBoardLog:
    def __init__(self, log_dir: Path, kind: str, palette):
        from torch.utils.tensorboard import SummaryWriter
        self.writer = SummaryWriter(str(log_dir))
        self.kind, self.palette = kind, palette

    def scalars(self, record: dict) -> None:
        step = record["step"]
        for name in ("loss", "lr", "images_per_s", "heldout_loss"):
            if name in record:
                tag = "epoch_loss" if name == "loss" and "epoch_seconds" in record else name
                self.writer.add_scalar(f"{self.kind}/{tag}", record[name], step)
        for c, value in enumerate(record.get("class_loss", []), start=1):   # class ids from 1
            self.writer.add_scalar(f"{self.kind}/class_loss/{c}", value, step)

    def _image(self, x: torch.Tensor) -> np.ndarray:
        mean = torch.tensor(MEAN).view(3, 1, 1)
        std = torch.tensor(STD).view(3, 1, 1)
        return ((x.float().cpu() * std + mean).clamp(0, 1) * 255).byte().permute(1, 2, 0).numpy()

    def _labels(self, y: torch.Tensor, size) -> np.ndarray:
        y = y[None, None].float()
        y = F.interpolate(y, size=size, mode="nearest")[0, 0].long().cpu().numpy()
        return colorize(y.astype(np.uint8), self.palette)

    @torch.no_grad()
    def panels(self, epoch: int, model, x: torch.Tensor, y: torch.Tensor) -> None:
        """One row per image of the batch's first few: image | target | output."""
        was = model.training
        model.eval()
        x = x[:PANELS]
        size = x.shape[-2:]
        rows = []
        if self.kind == "cls":
            cams = F.relu(model.cams(x)).float().amax(1, keepdim=True)
            cams = F.interpolate(cams, size=size, mode="bilinear", align_corners=False)[:, 0]
            cams = cams / cams.flatten(1).amax(1).clamp(min=1e-5)[:, None, None]
            for xi, ci in zip(x, cams):
                heat = (ci.cpu().numpy()[..., None] * np.array([255, 64, 0])).astype(np.uint8)
                rows.append(np.concatenate([self._image(xi), heat], 1))
        elif self.kind == "aff":
            for xi, yi in zip(x, y):
                lab = self._labels(yi, size)
                rows.append(np.concatenate([self._image(xi), lab], 1))
        else:
            pred = model(x).argmax(1)
            for xi, yi, pi in zip(x, y, pred):
                rows.append(np.concatenate([self._image(xi), self._labels(yi, size),
                                            self._labels(pi, size)], 1))
        model.train(was)
        batch = torch.from_numpy(np.stack(rows)).permute(0, 3, 1, 2)
        self.writer.add_images(f"{self.kind}/panels", batch, epoch, dataformats="NCHW")
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
