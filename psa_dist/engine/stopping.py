"""When a trainer has learned: the two stopping rules the training loop (``engine/hooks.StopWhenLearned``) asks
after every epoch. :class:`StopRule` watches a held-out loss of weak labels (AffinityNet, the
segmenters, or the classifier on the val split's image labels); :class:`FitRule` watches the
classifier's own training loss against its labels' prior loss. Either one starts the learning
rate's decay (:class:`~psa_dist.nets.optim.LearnedSchedule`) when it fires. Both keep their state
as a plain dict that goes into the checkpoint, so a resumed run decides as an uninterrupted one
would; epochs are indexed from 0 in that state (the trainer writes them out counted from 1).
"""
from __future__ import annotations


class StopRule:
    """When a trainer has learned: the held-out loss, scored after every epoch, has not improved
    on its reference (the last value that beat the one before by more than ``min_delta``,
    relative) for ``patience`` epochs. The trainer then anneals
    (:class:`~psa_dist.nets.optim.LearnedSchedule`) and stops, keeping the weights of the epoch
    with the lowest held-out loss (``best_epoch``). Its state is a plain dict kept in the
    checkpoint, so a resumed run decides as an uninterrupted one would."""

    def __init__(self, patience: int, min_delta: float, state: dict | None = None):
        self.patience, self.min_delta = patience, min_delta
        self.state = state or {"curve": [], "ref": None, "ref_epoch": None, "best": None,
                               "best_epoch": None}

    def update(self, epoch: int, value: float) -> bool:
        """Record epoch ``epoch``'s held-out loss; True when it is the lowest so far."""
        st = self.state
        st["curve"].append([epoch, value])
        if st["ref"] is None or value < st["ref"] * (1 - self.min_delta):
            st["ref"], st["ref_epoch"] = value, epoch
        if st["best"] is None or value < st["best"]:
            st["best"], st["best_epoch"] = value, epoch
            return True
        return False

    @property
    def stop(self) -> bool:
        st = self.state
        return bool(st["curve"]) and st["curve"][-1][0] - st["ref_epoch"] >= self.patience


class FitRule:
    """When the classifier fits its training labels: the mean training loss of the last ``window``
    epochs is at most ``target`` × ``prior`` (the loss of predicting each class at its frequency,
    :meth:`~psa_dist.nets.models.Classifier.prior_loss`). With ``class_prior`` (each class's prior
    loss, :meth:`~psa_dist.nets.models.Classifier.prior_losses`), the same holds for every class
    on its own (a class never or always present is left out), so that a class it has not learned
    cannot hide behind easy ones. A share of the labels' uncertainty, not
    a loss value, so that one target holds for any number and frequency of classes. The trainer
    then anneals (:class:`~psa_dist.nets.optim.LearnedSchedule`) and stops with its last weights:
    the CAMs are taken on these training images, so no epoch is picked on other data. Its state
    is a plain dict kept in the checkpoint, so a resumed run decides as an uninterrupted one
    would."""

    def __init__(self, target: float, window: int, prior: float, state: dict | None = None,
                 class_prior: list | None = None):
        self.target, self.window = target, window
        self.state = state or {"curve": [], "prior": prior, "fit_epoch": None,
                               **({"class_curve": [], "class_prior": list(class_prior)}
                                  if class_prior is not None else {})}

    def class_ratios(self) -> list[float] | None:
        """Each class's training loss over the last ``window`` epochs as a share of its prior
        loss (None for a class left out); None without ``class_prior``."""
        st = self.state
        if "class_prior" not in st or not st["class_curve"]:
            return None
        recent = [c for _, c in st["class_curve"][-self.window:]]
        means = [sum(col) / len(recent) for col in zip(*recent)]
        return [m / p if p > 1e-9 else None for m, p in zip(means, st["class_prior"])]

    def update(self, epoch: int, loss: float, class_loss: list | None = None) -> bool:
        """Record epoch ``epoch``'s training loss (and each class's, with ``class_prior``); True
        at the epoch the labels are first fit."""
        st = self.state
        st["curve"].append([epoch, loss])
        if "class_prior" in st:
            st["class_curve"].append([epoch, list(class_loss)])
        if st["fit_epoch"] is not None or len(st["curve"]) < self.window:
            return False
        if "class_prior" in st:
            fit = all(r <= self.target for r in self.class_ratios() if r is not None)
        else:
            fit = sum(v for _, v in st["curve"][-self.window:]) / self.window \
                <= self.target * st["prior"]
        if fit:
            st["fit_epoch"] = epoch
        return fit
