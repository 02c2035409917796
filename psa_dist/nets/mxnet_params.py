"""MXNet ``.params`` files read without mxnet (which no longer installs on current Python): the
authors' ImageNet ResNet-38 (``ilsvrc-cls_rna-a1_cls1000_ep-0001.params``) loads as
``model.pretrained`` directly, or converts once with ``psa-dist data convert-weights``.

The format, as MXNet's ``src/ndarray/ndarray.cc`` writes and reads it (little-endian):

* the list: ``uint64`` magic 0x112, ``uint64`` reserved, ``uint64`` count, the arrays, then
  ``uint64`` count and per name ``uint64`` length + bytes (``arg:`` / ``aux:`` prefixed);
* one array, three generations: V2 (``uint32`` 0xF993FAC9, ``int32`` storage type, 0 = dense),
  V1 (0xF993FAC8) and legacy (no magic: the first ``uint32`` is the number of dimensions). V2 and
  V1 shapes are ``uint32`` ndim + ``int64`` dims, legacy ones ``uint32`` dims; then the context
  (``int32`` device type, ``int32`` id), ``int32`` dtype flag, and the raw data.

The renaming to the authors' torch names follows their ``convert_mxnet_to_torch``
(``network/resnet38d.py``): ``res2a`` -> ``b2``, ``res2b1`` -> ``b2_1``, ``bn*_branch*`` -> the
block's BN, ``bn7`` -> ``bn7``; ``linear1000`` (ImageNet's classifier) is dropped.
"""
from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import torch

from .checkpoint import save_checkpoint

LIST_MAGIC = 0x112
V1_MAGIC, V2_MAGIC = 0xF993FAC8, 0xF993FAC9
DTYPES = {0: np.float32, 1: np.float64, 2: np.float16, 3: np.uint8, 4: np.int32, 5: np.int8,
          6: np.int64}
_BN = {"gamma": "weight", "beta": "bias", "mean": "running_mean", "var": "running_var"}


class _Reader:
    def __init__(self, data: bytes, path: Path):
        self.data, self.pos, self.path = data, 0, path

    def take(self, fmt: str):
        size = struct.calcsize(fmt)
        if self.pos + size > len(self.data):
            raise ValueError(f"{self.path}: truncated MXNet .params file (wanted {size} bytes at "
                             f"offset {self.pos} of {len(self.data)})")
        out = struct.unpack_from(fmt, self.data, self.pos)
        self.pos += size
        return out

    def raw(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise ValueError(f"{self.path}: truncated MXNet .params file (an array of {n} bytes "
                             f"at offset {self.pos} of {len(self.data)})")
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out


def _array(r: _Reader, index: int) -> np.ndarray | None:
    (first,) = r.take("<I")
    if first == V2_MAGIC:
        (stype,) = r.take("<i")
        if stype != 0:
            raise ValueError(f"{r.path}: array {index} is sparse (storage type {stype}); only "
                             f"dense arrays are read")
    if first in (V1_MAGIC, V2_MAGIC):
        (ndim,) = r.take("<I")
        shape = r.take(f"<{ndim}q") if ndim else ()
    else:                              # legacy: the magic is the number of dimensions
        ndim = first
        if ndim > 32:
            raise ValueError(f"{r.path}: array {index}: not an MXNet array header ({first:#x})")
        shape = r.take(f"<{ndim}I") if ndim else ()
    if ndim == 0:
        return None                    # MXNet's empty array
    r.take("<ii")                      # the context it was saved from (device type, id)
    (flag,) = r.take("<i")
    if flag not in DTYPES:
        raise ValueError(f"{r.path}: array {index}: unknown dtype flag {flag}")
    dtype = np.dtype(DTYPES[flag]).newbyteorder("<")
    count = int(np.prod(shape))
    return np.frombuffer(r.raw(count * dtype.itemsize), dtype=dtype).reshape(shape).copy()


def read_params(path: str | Path) -> dict[str, np.ndarray]:
    """The named arrays of an MXNet ``.params`` file (``mx.nd.load``'s dict), names as stored."""
    path = Path(path)
    r = _Reader(path.read_bytes(), path)
    magic, _reserved = r.take("<QQ")
    if magic != LIST_MAGIC:
        raise ValueError(f"{path}: not an MXNet .params file (magic {magic:#x}, expected "
                         f"{LIST_MAGIC:#x})")
    (n,) = r.take("<Q")
    arrays = [_array(r, i) for i in range(n)]
    (n_names,) = r.take("<Q")
    if n_names != n:
        raise ValueError(f"{path}: {n} arrays but {n_names} names (an unnamed list is not a "
                         f"weights file)")
    names = []
    for _ in range(n_names):
        (length,) = r.take("<Q")
        names.append(r.raw(length).decode())
    if r.pos != len(r.data):
        raise ValueError(f"{path}: {len(r.data) - r.pos} bytes after the last name")
    return {k: a for k, a in zip(names, arrays) if a is not None}


def psa_names(params: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """MXNet ResNet-38 names (``arg:res2b1_branch2a_weight``, ``aux:bn7_moving_var``) renamed to
    the authors' torch names (``b2_1.conv_branch2a.weight``, ``bn7.running_var``)."""
    out = {}
    for key, value in params.items():
        name = key.split(":", 1)[-1]
        parts = name.split("_")
        head = parts[0]
        if head == "conv1a":
            out["conv1a.weight"] = value
        elif head.startswith("linear"):
            continue
        elif len(parts) >= 3 and parts[1].startswith("branch"):
            kind, block = ("conv", head[3:]) if head.startswith("res") else ("bn", head[2:])
            # block "2a" -> b2, "2b1" -> b2_1 (the authors' unit names)
            torch_block = "b" + block[0] + ("" if block.endswith("a") else "_" + block[-1])
            param = "weight" if kind == "conv" else _BN[parts[-1]]
            out[f"{torch_block}.{kind}_{parts[1]}.{param}"] = value
        elif head == "bn7":
            out["bn7." + _BN[parts[-1]]] = value
        else:
            raise ValueError(f"{key!r}: not a ResNet-38 parameter name (conv1a, res*/bn* "
                             f"_branch*, bn7, linear1000)")
    return out


def convert_params(src: str | Path, out: str | Path) -> int:
    """Write the torch state dict of an MXNet ResNet-38 ``.params`` file, in the authors' names
    (what their ``convert_mxnet_to_torch`` returns, and what psa-dist's ``model.pretrained`` and
    their own code read), atomically; the number of tensors written."""
    state = {k: torch.from_numpy(v) for k, v in psa_names(read_params(src)).items()}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(out, state)
    return len(state)
