"""The one module that reads and writes datasets as WebDataset tar shards.

A dataset directory holds ``{split}-{000000..}.tar`` shards and ``dataset.json`` (class names,
palette, split sizes, shard list with sample counts, provenance). A sample is a group of tar members
sharing a ``__key__``:

=============  ==================================================================================
``jpg``/``png`` the RGB image
``cls.json``   list of class ids present (1-based; background 0 is implicit)
``mask.png``   ground-truth class map, 8-bit mode "L": 0 background, 1..C classes, 255 ignore
``meta.json``  ``{"source": ..., "size": [H, W]}``
``cam.npy``    (later stages) float16 CAMs, ``(len(cls), H, W)`` in the order of ``cls.json``
``aff.png``    (later stages) affinity labels, mode "L" (0 bg, c fg, 255 neutral), on AffinityNet's
               cell grid: ``ceil(H/s) x ceil(W/s)`` for ``s = model.aff_stride``
``pseudo.png`` (later stages) pseudo label, mode "L"
=============  ==================================================================================

Later stages write output shards that keep the input keys and add their own fields. Every shard is
written to a temporary name and renamed when complete, so a crash never leaves a half shard and a
rerun can trust any shard that exists.
"""
from __future__ import annotations

import io
import json
import shlex
import tarfile
from pathlib import Path, PurePosixPath
from typing import Iterable, Iterator
from urllib.parse import urlsplit

import numpy as np
import webdataset as wds
from PIL import Image

from ..util.atomic import atomic_open

IMAGE_EXTS = ("jpg", "jpeg", "png")


class ShardError(RuntimeError):
    """A shard that cannot be read (missing, truncated, not a tar); the message names it."""


class SampleError(ValueError):
    """A sample field that cannot be decoded; the message names the key and field."""


# ----------------------------------------------------------------------------- field codecs
def encode_image(image: np.ndarray, fmt: str = "jpg", quality: int = 90) -> bytes:
    buf = io.BytesIO()
    im = Image.fromarray(np.asarray(image, dtype=np.uint8), "RGB")
    if fmt in ("jpg", "jpeg"):
        im.save(buf, format="JPEG", quality=quality)
    else:
        im.save(buf, format="PNG")
    return buf.getvalue()


def decode_image(data: bytes) -> np.ndarray:
    """Bytes -> HxWx3 uint8 RGB. Truncated or corrupt data raises (PIL's error is kept as cause)."""
    with Image.open(io.BytesIO(data)) as im:
        im.load()
        # np.array, not asarray: Pillow's array interface gives a read-only view, which torch
        # warns about (and cannot write) when the image becomes a tensor
        return np.array(im.convert("RGB"))


def encode_mask(mask: np.ndarray) -> bytes:
    """Class map -> PNG in mode "L" (never palette: decoding a palette PNG as "L" maps by luminance)."""
    mask = np.asarray(mask)
    if mask.ndim != 2 or mask.min(initial=0) < 0 or mask.max(initial=0) > 255:
        raise ValueError(f"mask must be 2-D with values in 0..255, got shape {mask.shape}")
    buf = io.BytesIO()
    Image.fromarray(mask.astype(np.uint8), "L").save(buf, format="PNG")
    return buf.getvalue()


def decode_mask(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as im:
        if im.mode != "L":
            raise ValueError(f"mask PNG must be mode 'L', got {im.mode!r}")
        im.load()
        return np.array(im)


def encode_npy(array: np.ndarray, dtype=np.float16) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.asarray(array, dtype=dtype), allow_pickle=False)
    return buf.getvalue()


def decode_npy(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


def encode_json(obj) -> bytes:
    return json.dumps(obj, sort_keys=True).encode()


def decode_json(data: bytes):
    return json.loads(data.decode())


def image_field(sample: dict) -> str:
    for ext in IMAGE_EXTS:
        if ext in sample:
            return ext
    raise SampleError(f"sample {sample.get('__key__')!r} in {sample.get('__url__')}: no image field "
                      f"(have {sorted(k for k in sample if not k.startswith('__'))})")


# label maps a sample may lack (the loaders say so where they need one)
OPTIONAL_MAPS = ("mask", "aff", "pseudo")


def decode_sample(sample: dict, fields: Iterable[str] = ("image", "cls", "mask", "meta")) -> dict:
    """Decode the named fields of a raw sample: ``image`` (any image extension), ``cls`` (class
    ids), else ``<name>.png`` as a label map, ``<name>.npy`` as an array, ``<name>.json``; a
    missing field (other than an optional label map) or a failure raises SampleError naming key
    and field."""
    out = {"key": sample["__key__"]}
    where = f"sample {sample['__key__']!r} in {sample.get('__url__', '?')}"
    for name in fields:
        try:
            if name == "image":
                out["image"] = decode_image(sample[image_field(sample)])
            elif name == "cls":
                out["cls"] = [int(c) for c in decode_json(sample["cls.json"])]
            elif name == "meta":
                out["meta"] = decode_json(sample["meta.json"])
            elif f"{name}.png" in sample:      # a label map: mask, aff, pseudo, a new stage's
                out[name] = decode_mask(sample[f"{name}.png"])
            elif f"{name}.npy" in sample:      # an array: cam
                out[name] = decode_npy(sample[f"{name}.npy"])
            elif f"{name}.json" in sample:
                out[name] = decode_json(sample[f"{name}.json"])
            elif name not in OPTIONAL_MAPS:
                raise KeyError(name)
        except SampleError:
            raise
        except Exception as e:  # noqa: BLE001 - re-raised with the key and field named
            raise SampleError(f"{where}: cannot decode field '{name}': {type(e).__name__}: {e}") from e
    return out


# ----------------------------------------------------------------------------- writing
def write_shard(path: str | Path, samples: Iterable[dict]) -> int:
    """Write encoded samples (``__key__`` + bytes fields) to ``path`` atomically; returns the count."""
    n = 0
    with atomic_open(path, "wb") as f:
        with wds.TarWriter(f, encoder=False, mtime=0.0) as sink:
            for sample in samples:
                sink.write({k: v for k, v in sample.items() if k != "__url__"})
                n += 1
    return n


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:06d}.tar"


class ShardedWriter:
    """Cuts a stream of encoded samples into ``{split}-NNNNNN.tar`` shards of ``shard_size``."""

    def __init__(self, root: str | Path, split: str, shard_size: int):
        if shard_size < 1:
            raise ValueError(f"shard_size must be >= 1, got {shard_size}")
        self.root, self.split, self.shard_size = Path(root), split, shard_size
        self.shards: list[dict] = []
        self._buf: list[dict] = []

    def write(self, sample: dict) -> None:
        self._buf.append(sample)
        if len(self._buf) >= self.shard_size:
            self._flush()

    def _flush(self) -> None:
        if not self._buf:
            return
        name = shard_name(self.split, len(self.shards))
        n = write_shard(self.root / name, self._buf)
        self.shards.append({"name": name, "count": n})
        self._buf = []

    def close(self) -> list[dict]:
        self._flush()
        return self.shards

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if exc[0] is None:
            self.close()


# ----------------------------------------------------------------------------- reading
def iter_shard(path: str | Path) -> Iterator[dict]:
    """Raw samples (``__key__``, ``__url__``, bytes per field) of one shard, in file order.

    A missing, truncated or corrupt shard raises ShardError naming the shard. ``path`` may also be a
    WebDataset URL (``pipe:cat /x/train-000000.tar``, ``https://...``).
    """
    url = str(path)
    if "://" not in url and not url.startswith("pipe:"):
        if not Path(url).is_file():
            raise ShardError(f"shard not found: {url}")
        try:  # tarfile validates headers; webdataset's streaming reader can stop silently on a cut
            with tarfile.open(url) as tf:
                for _ in tf:
                    pass
        except (tarfile.TarError, EOFError) as e:
            raise ShardError(f"shard {url} is truncated or not a tar file: {e}") from e
        except OSError as e:    # an I/O error (EIO, a stale NFS handle): may pass, is retried
            raise ShardError(f"shard {url} could not be read: {type(e).__name__}: {e}") from e
    # One named shard, read whole wherever this runs: no node or worker splitting of its own (the
    # callers split shard lists; inside a loader worker the default splitter would hand this
    # single shard to worker 0 only and leave the others reading nothing).
    ds = wds.WebDataset(url, shardshuffle=False, empty_check=False, nodesplitter=None,
                        workersplitter=None)
    try:
        for sample in ds:
            sample["__url__"] = url
            yield sample
    except Exception as e:  # noqa: BLE001 - named and re-raised
        raise ShardError(f"shard {url}: {type(e).__name__}: {e}") from e


def shard_basename(url: str | Path) -> str:
    """A shard's file name, whether given as a path or a WebDataset URL: ``train-000003.tar`` for
    ``/d/train-000003.tar``, ``pipe:cat /d/train-000003.tar``,
    ``pipe:aws s3 cp s3://bucket/d/train-000003.tar -`` or ``https://host/d/train-000003.tar?sig``.
    Stage outputs take this name, so they stay local files whatever the input's URL."""
    text = str(url)
    if text.startswith("pipe:"):
        try:
            words = shlex.split(text[len("pipe:"):])
        except ValueError as e:
            raise ShardError(f"shard URL {text!r}: cannot split the command: {e}") from e
        tars = [w for w in words if ".tar" in w]
        if not tars:
            raise ShardError(f"shard URL {text!r}: the pipe command names no .tar file")
        text = tars[-1]
    if "://" in text:
        text = urlsplit(text).path
    name = PurePosixPath(text).name
    if not name:
        raise ShardError(f"shard URL {str(url)!r}: no file name in it")
    return name


class ShardURL(str):
    """A shard given as a WebDataset URL (``pipe:...``, ``https://...``): a string, with the
    ``.name`` a :class:`~pathlib.Path` has (the shard's file name) so callers treat both alike."""

    @property
    def name(self) -> str:
        return shard_basename(self)


def output_path(stage_dir, in_shard) -> Path:
    """A stage's output shard for an input shard (a path or a URL such as ``pipe:cat ...``): the
    same file name, as a local file in the stage's directory."""
    return Path(stage_dir) / shard_basename(in_shard)


def shard_locations(root: str | Path, names: list[str], template: str | None = None) -> list:
    """Where to read shards ``names``: ``root/name`` paths, or ``template.format(name=, root=)`` as
    URLs (``data.shard_url``, e.g. ``"pipe:aws s3 cp s3://bucket/voc/{name} -"``)."""
    if not template:
        return [Path(root) / n for n in names]
    if "{name}" not in template:
        raise ShardError(f"data.shard_url={template!r} has no {{name}} placeholder")
    try:
        return [ShardURL(template.format(name=n, root=root)) for n in names]
    except (KeyError, IndexError, ValueError) as e:
        raise ShardError(f"data.shard_url={template!r}: only {{name}} and {{root}} can be "
                         f"filled in ({type(e).__name__}: {e})") from e


def read_dataset_json(root: str | Path) -> dict:
    path = Path(root) / "dataset.json"
    if not path.is_file():
        raise ShardError(f"{path} not found: is {root} a psa-dist dataset directory?")
    with open(path) as f:
        return json.load(f)


def split_shards(root: str | Path, split: str, info: dict | None = None,
                 url: str | None = None) -> list:
    """The shards of ``split`` as paths under ``root``, or as URLs from the template ``url``
    (:func:`shard_locations`); ``dataset.json`` itself is always read from ``root``."""
    info = info or read_dataset_json(root)
    if split not in info["splits"]:
        raise ShardError(f"{root}/dataset.json has no split {split!r} (has {sorted(info['splits'])})")
    return shard_locations(root, [s["name"] for s in info["splits"][split]["shards"]], url)


def iter_split(root: str | Path, split: str) -> Iterator[dict]:
    for shard in split_shards(root, split):
        yield from iter_shard(shard)


def iter_joined(data_url: str | Path, *label_urls) -> Iterator[tuple[dict, list[dict]]]:
    """Walk a dataset shard together with the stage outputs written for it (same keys, same order).

    A stage output holds every key of its input except the samples that failed there (recorded in
    that stage's summary), so each label shard is a subsequence of the data shard: a data sample
    missing from a label shard is passed over. A label key that never matches is an error naming it.
    """
    labels = [iter_shard(u) for u in label_urls]
    peek = [next(it, None) for it in labels]
    for raw in iter_shard(data_url):
        if any(p is None or p["__key__"] != raw["__key__"] for p in peek):
            continue
        yield raw, peek
        peek = [next(it, None) for it in labels]
    for u, p in zip(label_urls, peek):
        if p is not None:
            raise ShardError(f"{u}: key {p['__key__']!r} is not in {data_url} (or out of order)")
