"""The config's sections: one dataclass each, its keys with their defaults and what they mean.
``psa_dist.config`` reads YAML and overrides onto these."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional


@dataclass
class SynthConfig:
    """The embedded synthetic dataset (see psa_dist/data/synth.py for what each knob does)."""
    seed: int = 0
    image_size: int = 160           # the long side, in pixels, when size_range is None
    # Images of varying size, as real datasets have: the long side drawn per image in
    # [min, max] pixels (VOC: up to 500; COCO: up to 640). None: every long side image_size.
    size_range: Optional[tuple] = None
    aspect_range: tuple = (1.0, 1.0)    # width / height, drawn log-uniformly per image (VOC ~[0.5, 2])
    num_train: int = 800
    num_val: int = 200
    num_classes: int = 6            # up to 8 patterns, then pattern x colour (80: COCO-shaped)
    min_objects: int = 1
    max_objects: int = 3
    # Distinct classes among an image's objects, drawn in [min, max] (at most its objects); the
    # objects' classes are drawn among those. None: each object's class drawn on its own.
    classes_per_image: Optional[tuple] = None
    mark: str = "colour"            # colour: class pattern in a class colour | texture: luminance only
    body_pattern: float = 0.11      # strength of the class mark over the whole body (0 = none)
    part_fraction: float = 0.22     # share of the object's length that carries the strong pattern
    part_prob: float = 0.7          # probability that an object shows its part (else body mark only)
    object_width: tuple = (0.15, 0.24)  # object width range, as a share of the image's short side
    # Each object's length and width scaled by a factor drawn log-uniformly in this range: objects
    # of very different sizes in one image, small ones included ((0.1, 1.0): from a tenth of the
    # default size up). (1.0, 1.0): the default sizes, nothing drawn.
    object_scale: tuple = (1.0, 1.0)
    clutter_density: float = 1.0    # multiplier on the number of background clutter strokes
    clutter_noise: float = 12.0     # std of per-pixel colour noise over the whole image (0..255)


@dataclass
class DataConfig:
    root: str = "data/synth"        # dataset directory: {split}-NNNNNN.tar shards + dataset.json
    # Read the shards from elsewhere: a WebDataset URL template with {name} (and {root}), e.g.
    # "pipe:aws s3 cp s3://bucket/voc/{name} -"; dataset.json is still read from root. None: root/name
    shard_url: Optional[str] = None
    source: str = "synth"           # synth | voc | coco | shards (synth: generated into root when
                                    # missing; the others: converted shards, used as they are)
    train_split: str = "train"
    val_split: str = "val"
    shard_size: int = 100           # samples per shard when the dataset is written
    workers: int = 2                # processes for generation / conversion / decoding


@dataclass
class ModelConfig:
    backbone: str = "small"         # small | resnet50 | resnet38
    pretrained: Optional[str] = None  # path to a local weights file (None: random init, logged)
    seg_pretrained: Optional[str] = None  # weights of the segmenter's backbone when it is not
                                          # model.backbone (deeplabv3_resnet50: a ResNet-50 file);
                                          # None: model.pretrained where the backbones match
    segmenter: str = "light"        # light | deeplabv3_resnet50
    freeze_bn: bool = False
    # Backbone layers whose weights the classifier and AffinityNet do not train (its child
    # modules' names: ResNet-38 conv1a, b2, ..., b7; ResNet-50 stem, layer1, ...). The authors
    # freeze ResNet-38's conv1a and stage 2 (their b2, b2_1, b2_2: our b2): [conv1a, b2].
    frozen_layers: tuple = ()
    cls_dropout: float = 0.0          # Dropout2d on the classifier's features before pooling
                                      # (the authors' dropout7: 0.5); CAMs never see it
    aff_dims: Optional[tuple] = None  # AffinityNet reduction per backbone tap (None: the backbone's
                                      # default; ResNet-38: 64/128/256 = 448 channels as the paper)
    aff_stride: int = 8               # AffinityNet's output grid, where the walk runs: 8 (paper) or 4
    # The light segmenters (pseudo-label and fully supervised alike) start from the trained
    # classifier's backbone, as AffinityNet does: without ImageNet weights, the image-label
    # classifier is the pretraining there is (no pixel label is used).
    seg_from_classifier: bool = False
    # IRN (method: irn): its boundary branch reads the trained classifier's backbone (frozen), or
    # with irn_backbone=pretrained the model.pretrained weights as the authors (frozen ImageNet)
    irn_backbone: str = "classifier"
    irn_radius: int = 10            # the pairs its boundary branch learns from, stride-4 cells


@dataclass
class JobConfig:
    """Where a stage runs and the SLURM job it gets there (trainers and Ray label stages alike)."""
    # Trainers: inline (this process), torchrun (ranks from its environment), local (submitit's
    # local executor, tasks_per_node processes) or slurm (submitit, sbatch). Ray stages: inline
    # (ray.init here, or ray.address), local or slurm (a submitit job that starts Ray on its nodes
    # and runs the stage there).
    launcher: str = "inline"
    nodes: int = 1
    gpus_per_node: int = 1          # 0 on CPU-only clusters (and the local test cluster)
    tasks_per_node: Optional[int] = None    # DDP ranks per node; None: one per GPU (1 without)
    cpus_per_task: int = 2
    partition: Optional[str] = None
    account: Optional[str] = None
    qos: Optional[str] = None
    constraint: Optional[str] = None
    time_min: int = 60
    mem_gb: Optional[int] = None
    sbatch_extra: list = field(default_factory=list)


@dataclass
class TrainConfig(JobConfig):
    """Settings shared by the trainers (classifier, AffinityNet, IRN's boundary branch,
    segmenter)."""
    epochs: int = 10
    batch_size: int = 16
    lr: float = 0.01
    weight_decay: float = 5e-4
    momentum: float = 0.9           # the authors' code passes 5e-4 here by accident; we use 0.9
    optimizer: str = "sgd"          # sgd (the authors') | adamw (momentum unused)
    warmup_epochs: float = 0.0      # the learning rate rises linearly over these first epochs
    channels_last: bool = False     # the network and its batches in channels-last memory format
    crop_size: int = 448
    resize_long: Optional[tuple] = (256, 512)   # null: no rescaling
    color_jitter: tuple = (0.3, 0.3, 0.3, 0.1)
    num_workers: int = 2
    threads: Optional[int] = None   # intra-op threads per CPU rank; None: its CPUs less num_workers
    log_every: int = 20             # steps between JSON log lines
    checkpoint_every: int = 500     # steps between checkpoints (and one at every epoch end)
    tensorboard: bool = False       # also log to <model dir>/tensorboard (psa-dist[tensorboard])
    # Stop when the model has learned, judged on held-out weak labels only: the classifier on the
    # val split's image labels, AffinityNet and the segmenters on the last holdout_shards train
    # shards' affinity / pseudo labels (left out of their training). epochs is then a cap: the
    # learning rate stays constant until the held-out loss has not improved by stop_min_delta
    # (relative) for stop_patience epochs, then decays (poly) over stop_decay of the epochs so
    # far, and training stops; the weights of the best held-out epoch are kept. None: the
    # paper's poly schedule over epochs epochs.
    stop_patience: Optional[int] = None
    stop_min_delta: float = 0.01
    stop_decay: float = 0.25
    # Stop when the classifier fits its own training labels (train_cls only; docs/guide.md): the
    # CAMs are taken on the training images, so what they need is the fit there, which goes on
    # improving long after a held-out loss has flattened (docs/benchmark.md, rounds 9 and 11).
    # epochs is then a cap: the learning rate stays constant until the mean training loss of the
    # last fit_window epochs is at most fit_target x the labels' prior loss (each class predicted
    # at its frequency in the train split: what a classifier that has learned nothing from the
    # images scores), then decays (poly) over stop_decay of the epochs so far. None: poly over
    # epochs epochs.
    fit_target: Optional[float] = None
    fit_window: int = 3
    # With fit_target: the rule holds for every class on its own (each class's training loss at
    # most fit_target x that class's prior loss), not only for their mean, so that one class the
    # classifier has not learned cannot hide behind easy ones (docs/benchmark.md, round 12).
    fit_each_class: bool = False
    holdout_shards: int = 1
    amp: str = "bf16"               # bf16 | bf16! | fp16 | none: autocast on CUDA; on a CPU bf16
                                    # where timing the model says it is faster (util/precision.py),
                                    # bf16! forced
    # Segmenter on pseudo labels only: where a class of the image label covers less than this
    # fraction of an image's pseudo label, that image's background is left out of the loss
    # (cam.distrust_background). None: the paper's plain training on every pseudo-label pixel.
    missing_class_frac: Optional[float] = None
    # AffinityNet's loss only: which pairs of a crop it takes. all: every pair with both ends in
    # the crop; authors: the authors' window (jiwoon-ahn/psa), which drops the pairs starting in
    # the last radius - 1 rows or the first / last radius - 1 columns (docs/voc.md).
    pair_border: str = "all"


@dataclass
class CamConfig:
    scales: tuple = (1.0, 0.5, 1.5, 2.0)
    flip: bool = True
    eval_bg_score: float = 0.2      # constant background score when CAMs are scored as labels
    batch_size: int = 8
    amp: str = "bf16"               # the classifier's forward under autocast, as train_*.amp


@dataclass
class CrfKernels:
    """The dense CRF's settings on score maps (``core.crf.crf_refine``; the authors' AffinityNet
    CRF by default), of every section that refines scores with it."""
    crf_iters: int = 10
    crf_gauss_sxy: float = 3.0
    crf_gauss_compat: float = 3.0
    crf_bi_sxy: float = 80.0
    crf_bi_srgb: float = 13.0
    crf_bi_compat: float = 10.0


@dataclass
class AffLabelConfig(CrfKernels):
    alpha_lo: float = 4.0
    alpha_hi: float = 32.0
    crf: bool = True                # dense CRF on both score maps (the authors' code does this)


@dataclass
class RandomWalkConfig:
    beta: float = 8.0
    t: int = 256
    radius: int = 5
    bg_alpha: float = 16.0
    batch_size: int = 8             # images walked together (exact: see random_walk_many)
    # T^t from a truncated Chebyshev expansion, within tol * max|cam| of it on every element
    # (88 applications of T instead of 256 on a VOC grid); 0: T applied t times, literally.
    tol: float = 1e-5
    # The dense CRF (aff_labels.crf_* settings) on the walked maps before the argmax (the authors'
    # code refines only the CAMs with it).
    crf: bool = False


@dataclass
class IrLabelConfig:
    """IRN's relation labels from the CAMs (``method: irn``; the authors' cam_to_ir_label)."""
    fg_thres: float = 0.30          # a class where the CAMs beat this (conf_fg_thres)
    bg_thres: float = 0.05          # background where even this beats them (conf_bg_thres)
    crf: bool = True                # the dense CRF on each hard label map, as the authors
    crf_iters: int = 10
    crf_gt_prob: float = 0.7        # the unary's trust in the label
    crf_gauss_sxy: float = 3.0
    crf_gauss_compat: float = 3.0
    crf_bi_sxy: float = 50.0
    crf_bi_srgb: float = 5.0
    crf_bi_compat: float = 10.0


@dataclass
class IrnWalkConfig(CrfKernels):
    """IRN's walk on its class-boundary map (``method: irn``; the authors' make_sem_seg_labels)."""
    beta: float = 10.0
    t: int = 256                    # steps: the authors square their T exp_times=8 times (2^8)
    radius: int = 5                 # pairs within this many cells of the stride-4 grid
    bg_score: float = 0.25          # constant background score after the walk (sem_seg_bg_thres)
    flip: bool = True               # the boundary map averaged with the mirror image's (logits)
    tol: float = 1e-5               # within tol of the exact walk, in fewer steps (random_walk)
    # The dense CRF (its kernels: CrfKernels, irn_walk.crf_*) on the walked scores (background
    # and classes, normalised to sum to one) before the argmax: this project's addition, as
    # random_walk.crf for AffinityNet's walk (the authors take the argmax); off by default.
    crf: bool = False


@dataclass
class RayConfig(JobConfig):
    enabled: bool = True            # label generation on Ray actors (false: in the calling process)
    address: Optional[str] = None   # None: start a local Ray instance
    num_cpus: int = 0               # CPUs of the local instance (0: all of this machine's)
    num_actors: int = 0             # 0: one per GPU, else one per CPU
    max_failures: float = 0.001     # share of samples allowed to fail before the stage exits non-zero
    dashboard: bool = False         # start Ray's dashboard on the head (local instance or job's head)
    dashboard_host: str = "127.0.0.1"   # where it listens: local only (all interfaces: anyone)
    # A shard whose task raised a transient error (OSError, CUDA OOM, RuntimeError) is tried again
    # up to shard_retries times, after retry_backoff_s, doubling; a corrupt shard is not retried
    shard_retries: int = 2
    retry_backoff_s: float = 2.0
    # With no shard waiting, an idle actor runs a copy of a shard running speculate_after times
    # longer than the median shard (per sample) and at least speculate_min_s; 0: never
    speculate_after: float = 3.0
    speculate_min_s: float = 30.0
    # The job of a Ray label stage (launcher local | slurm; see JobConfig): one Ray node per task
    gpus_per_node: int = 0
    tasks_per_node: Optional[int] = 1   # keep 1
    cpus_per_task: int = 8
    time_min: int = 240


@dataclass
class Config:
    name: str = "run"
    # the pseudo labels' method after the CAMs: psa (AffinityNet: affinity labels, AffinityNet,
    # its random walk) or irn (IRN: relation labels, the class-boundary branch, its walk)
    method: str = "psa"
    out_dir: str = "runs/demo"
    seed: int = 0
    device: str = "auto"            # auto | cpu | cuda
    data: DataConfig = field(default_factory=DataConfig)
    synth: SynthConfig = field(default_factory=SynthConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train_cls: TrainConfig = field(default_factory=TrainConfig)
    cams: CamConfig = field(default_factory=CamConfig)
    aff_labels: AffLabelConfig = field(default_factory=AffLabelConfig)
    train_aff: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=8, batch_size=8))
    random_walk: RandomWalkConfig = field(default_factory=RandomWalkConfig)
    train_seg: TrainConfig = field(default_factory=TrainConfig)
    ir_labels: IrLabelConfig = field(default_factory=IrLabelConfig)
    train_irn: TrainConfig = field(default_factory=lambda: TrainConfig(
        epochs=3, batch_size=32, crop_size=512, lr=0.1, weight_decay=1e-4))
    irn_walk: IrnWalkConfig = field(default_factory=IrnWalkConfig)
    seg_full: bool = False          # also train the fully supervised baseline (upper bound)
    ray: RayConfig = field(default_factory=RayConfig)
    # psa-dist submit: a step whose job fails is requeued (same job id, so the later steps' afterok
    # dependency still holds) this many times before the chain stops; 0: never
    submit_retries: int = 1
