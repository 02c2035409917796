"""Precision: which autocast dtype a device gets for a ``*.amp`` setting, and the autocast context.
The trainers and the CAM stage take theirs from here (:func:`choose_for_model`); the benchmarks
that compare precisions name theirs (:func:`amp_dtype`), and ``bench precision`` shows the choice.

On CUDA ``bf16`` and ``fp16`` are what they say. On a CPU, ``bf16`` is a request that a measurement
decides (:func:`choose_precision`): where the CPU says it multiplies bf16 in hardware (AMX tiles or
AVX512-BF16), the model's own step is timed in float32 and under bf16 autocast, and bf16 is kept
only where it is faster. The flags say what a CPU can decode, not what runs fast: bf16 trained the
demo's classifier 2.7x faster on an AMX Xeon and an AMD EPYC, and 1.3-1.6x *slower* on a Xeon with
the AVX512-BF16 flag and no AMX (issue 32). The timing is cached per CPU model, torch version,
thread count and model shape in ``$PSA_DIST_CACHE/precision.json`` (beside the C kernels), so a
machine measures once. ``bf16!`` forces bf16 autocast on any CPU, unmeasured; ``none`` is float32.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

from ..core.native import cache_dir, cpu_tag
from .atomic import atomic_write_json

AMP_DTYPES = {"bf16": torch.bfloat16, "bf16!": torch.bfloat16, "fp16": torch.float16,
              "none": None}
# A call slower than this (a real-size network's step on a CPU: ResNet-38 at batch 4, crop 448
# takes about 40 s in float32 here) is timed once in each precision after its warm-up, so that
# rank 0's timing keeps well inside the other ranks' wait for its decision
SLOW_CALL_S = 5.0
# bf16 is kept on a CPU only when its step takes at most this share of float32's: a tie keeps
# float32's precision (and the measurement's noise, a few percent, does not flip the choice)
BF16_KEEP_BELOW = 0.95


def cpu_has_native_bf16() -> bool:
    """Whether this CPU says it multiplies bf16 matrices in hardware (AMX tiles or AVX512-BF16).
    Where it does not, bf16 is emulated and always slower; where it does, it may still be slower
    (:func:`choose_precision` measures)."""
    cpu = getattr(torch, "cpu", None)
    checks = [getattr(cpu, n, None) for n in ("_is_amx_tile_supported", "_is_avx512_bf16_supported")]
    return any(bool(f()) for f in checks if f is not None)


def amp_dtype(amp: str, device: torch.device, field: str = "train.amp"):
    """The autocast dtype ``amp`` asks for on ``device``, before any measurement: bf16/fp16 on
    CUDA; on the CPU bf16 for ``bf16!`` and, for ``bf16``, where the CPU has native bf16
    (:func:`cpu_has_native_bf16`; :func:`choose_precision` then times it), else None (float32).
    fp16 autocast is for CUDA only (None on the CPU). ``none`` is float32 everywhere."""
    if amp not in AMP_DTYPES:
        raise ValueError(f"{field}: expected one of {sorted(AMP_DTYPES)}, got {amp!r}")
    dtype = AMP_DTYPES[amp]
    if torch.device(device).type == "cuda" or amp == "bf16!":
        return dtype
    return dtype if dtype is torch.bfloat16 and cpu_has_native_bf16() else None


@dataclass
class Precision:
    """A precision decision: the dtype (None: float32), why, and the timing behind it."""
    dtype: Optional[torch.dtype]
    reason: str
    float32_s: Optional[float] = None      # the timed call's median seconds in float32
    bf16_s: Optional[float] = None         # ... and under bf16 autocast
    cached: bool = False                   # the timing came from the cache
    resumed: bool = False                  # kept from a checkpoint (reason: the original one's)

    @property
    def name(self) -> str:
        return "float32" if self.dtype is None else str(self.dtype).split(".")[-1]

    def describe(self) -> str:
        """One line for the log: the choice and, where one was made, the timing."""
        head = "float32" if self.dtype is None else f"autocast {self.name}"
        return f"{head} ({'as the checkpoint was trained: ' if self.resumed else ''}{self.reason})"

    def record(self) -> dict:
        """What a run's summary keeps of it."""
        d = asdict(self)
        d["dtype"] = self.name
        return d


def cache_path() -> Path:
    return cache_dir() / "precision.json"


def _read_cache(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}          # none yet, or unreadable: measure again and rewrite it


def measure(timed: Callable[[Optional[torch.dtype]], None], reps: int = 3) -> tuple[float, float]:
    """Median seconds of ``timed(None)`` (float32) and ``timed(torch.bfloat16)``: one warm-up call
    each (oneDNN builds its primitives on the first), then ``reps`` calls each, alternating, so that
    a machine whose speed drifts slows both alike."""
    t0 = time.perf_counter()
    timed(None)
    if time.perf_counter() - t0 > SLOW_CALL_S:
        reps = 1        # a real-size network on a CPU: one call each is what a few minutes allow
    timed(torch.bfloat16)
    f32, b16 = [], []
    for _ in range(reps):
        for dtype, times in ((None, f32), (torch.bfloat16, b16)):
            t0 = time.perf_counter()
            timed(dtype)
            times.append(time.perf_counter() - t0)
    return statistics.median(f32), statistics.median(b16)


def decide(amp: str, field: str, float32_s: float, bf16_s: float, cached: bool) -> Precision:
    """bf16 from a timing: kept where its step takes at most :data:`BF16_KEEP_BELOW` of
    float32's, else float32, with the reason and the figures."""
    keep = bf16_s <= BF16_KEEP_BELOW * float32_s
    speed = float32_s / bf16_s if bf16_s > 0 else float("inf")
    reason = (f"{field}={amp}: bf16 {speed:.2f}x as fast as float32 on this CPU "
              f"({bf16_s * 1000:.0f} vs {float32_s * 1000:.0f} ms, "
              f"{'cached timing' if cached else 'timed now'}); "
              + ("kept" if keep else f"float32 kept; {field}=bf16! forces bf16"))
    return Precision(torch.bfloat16 if keep else None, reason, round(float32_s, 5),
                     round(bf16_s, 5), cached)


def choose_precision(amp: str, device, field: str, timed: Callable[[Optional[torch.dtype]], None],
                     key: str, reps: int = 3, refresh: bool = False) -> Precision:
    """The precision for ``amp`` on ``device`` (``field`` names the setting in errors and the log).
    On a CPU with native bf16 and ``amp: bf16``, ``timed(dtype)`` (the model's own step at its own
    shapes, under ``autocast(device, dtype)``) is timed in both precisions unless the cache holds
    ``key`` for this CPU, torch version and thread count (``refresh``: time again all the same,
    and replace it); :func:`decide` decides."""
    device = torch.device(device)
    dtype = amp_dtype(amp, device, field)
    if device.type == "cuda":
        return Precision(dtype, f"{field}={amp}")
    if amp == "bf16!":
        return Precision(dtype, f"{field}={amp}: forced, not measured")
    if dtype is None:
        why = ("this CPU has no native bf16" if amp == "bf16" else
               "fp16 autocast is for CUDA" if amp == "fp16" else "float32 asked for")
        return Precision(None, f"{field}={amp}: {why}")
    full_key = (f"{cpu_tag_line()} | torch {torch.__version__} | {torch.get_num_threads()} "
                f"threads | {key}")
    path = cache_path()
    # One process of a machine times at a time, the others wait and read its timing: the actors
    # of a node starting together decide alike, and no two timings share the cores
    with _machine_lock(path):
        entry = None if refresh else _read_cache(path).get(full_key)
        if entry is not None:
            return decide(amp, field, entry["float32_s"], entry["bf16_s"], cached=True)
        f32, b16 = measure(timed, reps)
        cache = _read_cache(path)
        cache[full_key] = {"float32_s": f32, "bf16_s": b16,
                           "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
        try:
            atomic_write_json(path, cache)
        except OSError as e:            # a read-only cache costs a timing next time, no more
            print(f"[precision] could not cache the timing in {path}: {e}", flush=True)
    return decide(amp, field, f32, b16, cached=False)


@contextlib.contextmanager
def _machine_lock(path: Path):
    """An exclusive lock beside the cache (``flock``: released when the process dies), or none
    where the cache's directory cannot be written."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        f = open(path.with_suffix(".lock"), "a")
    except OSError:
        yield
        return
    with f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def cpu_tag_line() -> str:
    """This CPU in one line (model name and a digest of its flags), for the cache's key."""
    tag = cpu_tag()
    model = next((ln.split(":", 1)[1].strip() for ln in tag.splitlines()
                  if ln.startswith("model name")), "cpu")
    return f"{model} [{hashlib.sha256(tag.encode()).hexdigest()[:8]}]"


def _total(out) -> torch.Tensor:
    """The sum of a network's outputs, whatever their structure (a tensor, a tuple, a dict)."""
    if isinstance(out, torch.Tensor):
        return out.float().sum()
    values = out.values() if isinstance(out, dict) else out
    return sum(_total(v) for v in values)


@contextlib.contextmanager
def _untouched(model: torch.nn.Module):
    """Run timing steps on ``model`` and leave it as it was: its buffers (BN statistics), its
    gradients and the random generators (dropout draws) are restored."""
    buffers = {k: v.detach().clone() for k, v in model.named_buffers()}
    grads = {p: p.grad for p in model.parameters()}
    with torch.random.fork_rng(devices=[]):
        try:
            yield
        finally:
            for k, v in model.named_buffers():
                v.data.copy_(buffers[k])
            for p, g in grads.items():
                p.grad = g


def channels_last(model: torch.nn.Module) -> bool:
    """Whether ``model``'s first 4-d weight (a convolution's) is in channels-last memory format
    (``train_*.channels_last``): it is then timed on channels-last batches, under its own key."""
    w = next((p for p in model.parameters() if p.dim() == 4), None)
    return (w is not None and w.shape[1] * w.shape[2] * w.shape[3] > 1
            and w.is_contiguous(memory_format=torch.channels_last)
            and not w.is_contiguous())


def _pass(model: torch.nn.Module, shape: tuple, train: bool, device: torch.device):
    """``timed(dtype)``: one pass of ``model`` on a fixed random batch of ``shape``, forward and
    backward (``train``) or forward only, under autocast to ``dtype`` (None: float32)."""
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(device)
    if channels_last(model) and x.dim() == 4:      # the batches as its trainer gives them
        x = x.contiguous(memory_format=torch.channels_last)

    def timed(dtype):
        with torch.set_grad_enabled(train):
            with autocast(device, dtype):
                out = model(x)
            if train:
                _total(out).backward()
                model.zero_grad(set_to_none=True)
    return timed


def time_pass(model: torch.nn.Module, shape: tuple, train: bool,
              dtype: Optional[torch.dtype] = None, reps: int = 3) -> float:
    """Median seconds of one pass of ``model`` on the CPU in ``dtype`` (after a warm-up call), the
    model left as it was: a speed where no choice timed it (``bench precision``)."""
    timed = _pass(model, shape, train, torch.device("cpu"))
    with _untouched(model):
        timed(dtype)
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            timed(dtype)
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def choose_for_model(amp: str, device, field: str, model: torch.nn.Module, shape: tuple,
                     train: bool, key: str, reps: int = 3, refresh: bool = False) -> Precision:
    """:func:`choose_precision` timing ``model`` itself on a batch of ``shape``: a forward and a
    backward pass (``train``) or a forward pass without gradients (inference), the model left as
    it was. The cache's key names the model's class, size, pass and shape, after ``key``."""
    device = torch.device(device)
    timed = _pass(model, shape, train, device)
    n = sum(p.numel() for p in model.parameters())
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    what = (f"{key}: {type(model).__name__} {n} params ({trained} trained), "
            f"{'train step' if train else 'forward'} {tuple(shape)}"
            + (" channels-last" if channels_last(model) else ""))
    with _untouched(model):
        return choose_precision(amp, device, field, timed, what, reps, refresh)


def autocast(device, dtype):
    """``torch.autocast`` to ``dtype`` on ``device``'s type, or a no-op for None (float32)."""
    return torch.autocast(torch.device(device).type, dtype=dtype or torch.float32,
                          enabled=dtype is not None)
