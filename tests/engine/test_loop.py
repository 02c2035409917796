"""The training loop below the stages: it trains any model from a loss callable, with no stage or
model kind, acts through its hooks in their order, and resumes from its checkpoint to the weights
of an uninterrupted run."""
import json

import pytest
import torch
import torch.nn as nn

from psa_dist.config import TrainConfig
from psa_dist.engine.loop import Hook
from psa_dist.engine.trainer import train
from psa_dist.nets.checkpoint import load_checkpoint
from psa_dist.util.dist import DistInfo
from psa_dist.util.precision import Precision

TRUE_W = torch.tensor([1.0, -2.0, 0.5])


def rows(g):
    x = torch.randn(8, 3, generator=g)
    return x, x @ TRUE_W


def images(g):
    """Small images, for a convolution."""
    x = torch.randn(4, 3, 8, 8, generator=g)
    return x, x.mean((1, 2, 3))


class Batches:
    """A loader as the trainers' (len, set_epoch with a skip): batch i of epoch e drawn by
    ``draw`` from a generator seeded by (e, i), so that a resumed epoch sees what an
    uninterrupted one does."""

    def __init__(self, n: int, draw=rows):
        self.n, self.draw, self.epoch, self.skip = n, draw, 0, 0

    def __len__(self):
        return self.n

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        self.epoch, self.skip = epoch, skip

    def __iter__(self):
        for i in range(self.skip, self.n):
            yield self.draw(torch.Generator().manual_seed(1000 * self.epoch + i))


def squared_error(class_terms):
    return lambda model, x, y: ((model(x).squeeze(-1) - y) ** 2).mean()


class Events(Hook):
    def __init__(self, stop_at: int | None = None):
        self.seen, self.stop_at = [], stop_at

    def before_train(self, loop):
        self.seen.append("before_train")

    def after_step(self, loop):
        self.seen.append(f"step {loop.step}")
        if loop.step == self.stop_at:
            raise KeyboardInterrupt("preempted")

    def after_epoch(self, loop):
        self.seen.append(f"epoch {loop.epoch + 1}")

    def after_train(self, loop):
        self.seen.append("after_train")


def _train(out, hooks=(), checkpoint=None, **settings):
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    tcfg = TrainConfig(epochs=3, lr=0.05, weight_decay=0.0, log_every=2, checkpoint_every=3,
                       amp="none", **settings)
    summary = train(model, squared_error, Batches(5), tcfg, out, DistInfo(), name="toy",
                    section="toy", precision=Precision(None, "float32 for the test"),
                    new_modules=[], checkpoint=checkpoint, hooks=hooks)
    return model, summary


def test_the_loop_trains_from_a_loss_callable_with_its_hooks(tmp_path):
    events = Events()
    model, summary = _train(tmp_path / "a", hooks=[events])
    assert events.seen[0] == "before_train" and events.seen[-1] == "after_train"
    assert events.seen[1:7] == [f"step {i}" for i in range(1, 6)] + ["epoch 1"]
    assert summary["steps"] == 15 and summary["images"] == 15 * 8
    log = [json.loads(line) for line in (tmp_path / "a" / "log.jsonl").open()]
    epochs = [r for r in log if "epoch_seconds" in r]
    assert [r["epoch"] for r in epochs] == [1, 2, 3] and all(r["kind"] == "toy" for r in log)
    assert epochs[-1]["loss"] < 0.5 * epochs[0]["loss"]          # it learned
    ck = load_checkpoint(tmp_path / "a" / "checkpoint.pth")
    assert ck["epoch"] == 3 and ck["step"] == 15 and ck["step_in_epoch"] == 0
    assert torch.equal(ck["model"]["weight"], model.state_dict()["weight"])


SCHEDULES = {"sgd": {},                                          # the authors' SGD, poly
             # AdamW, warming up over 2 epochs: the cut falls inside the warm-up
             "adamw, warm-up": {"optimizer": "adamw", "warmup_epochs": 2}}


@pytest.mark.parametrize("settings", SCHEDULES.values(), ids=SCHEDULES)
def test_a_run_stopped_mid_epoch_resumes_to_the_uninterrupted_weights(tmp_path, settings):
    whole, _ = _train(tmp_path / "whole", **settings)
    with pytest.raises(KeyboardInterrupt):
        _train(tmp_path / "cut", hooks=[Events(stop_at=8)], **settings)  # epoch 2, after step 8
    ck = load_checkpoint(tmp_path / "cut" / "checkpoint.pth")
    assert (ck["epoch"], ck["step"], ck["step_in_epoch"]) == (1, 6, 1)   # the last checkpoint
    moments = {k for state in ck["optimizer"]["state"].values() for k in state}
    assert moments == ({"exp_avg", "exp_avg_sq", "step"} if settings else {"momentum_buffer"})
    resumed, summary = _train(tmp_path / "cut", checkpoint=ck, **settings)
    assert summary["steps"] == 15
    for name, value in whole.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[name]), name


class LearningRates(Hook):
    def __init__(self):
        self.seen = []

    def after_step(self, loop):
        self.seen.append(loop.opt.param_groups[0]["lr"])


def test_the_warm_up_ramps_the_learning_rate_linearly_then_hands_over_to_the_schedule(tmp_path):
    from psa_dist.nets.optim import poly_lr_factor
    rates = LearningRates()
    _train(tmp_path / "w", hooks=[rates], warmup_epochs=1.0, optimizer="adamw")   # 5 steps
    # after step s the scheduler has set step s + 1's rate: 0.05 x (s + 1) / 5 x poly(s)
    expected = [0.05 * min(1.0, (s + 1) / 5) * poly_lr_factor(s, 15) for s in range(1, 16)]
    assert rates.seen == pytest.approx(expected)
    assert rates.seen[3] == pytest.approx(0.05 * poly_lr_factor(4, 15))    # full rate at step 5


def test_channels_last_trains_the_same_network_on_channels_last_batches(tmp_path):
    layouts = []

    def loss(class_terms):
        def f(model, x, y):
            layouts.append(x.is_contiguous(memory_format=torch.channels_last))
            return ((model(x).mean((1, 2, 3)) - y) ** 2).mean()
        return f

    def run(out, channels_last):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                              nn.Conv2d(8, 1, 1))
        tcfg = TrainConfig(epochs=2, lr=0.05, amp="none", channels_last=channels_last)
        layouts.clear()
        train(model, loss, Batches(3, images), tcfg, out, DistInfo(), name="toy", section="toy",
              precision=Precision(None, "float32 for the test"), new_modules=[])
        return model, list(layouts)

    plain, seen_plain = run(tmp_path / "a", False)
    last, seen_last = run(tmp_path / "b", True)
    assert seen_last == [True] * 6 and not any(seen_plain)
    assert last[0].weight.is_contiguous(memory_format=torch.channels_last)
    for name, value in plain.state_dict().items():     # the same training, another float order
        assert torch.allclose(value, last.state_dict()[name], atol=1e-5), name
