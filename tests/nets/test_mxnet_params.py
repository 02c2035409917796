"""The authors' MXNet ResNet-38 weights read without mxnet (psa_dist/nets/mxnet_params.py).

The files are written here by a writer that follows MXNet's own serialiser
(``src/ndarray/ndarray.cc``: ``NDArray::Save`` of a list, the legacy, V1 and V2 array headers),
and named by a naive inverse of the authors' naming, so that loading them checks the reader and
the renaming against the format and the architecture, tensor by tensor.
"""
import struct

import numpy as np
import pytest
import torch

from psa_dist.nets.backbones import ResNet38, load_pretrained
from psa_dist.nets.mxnet_params import convert_params, read_params

FLAGS = {np.dtype(np.float32): 0, np.dtype(np.float64): 1, np.dtype(np.float16): 2,
         np.dtype(np.uint8): 3, np.dtype(np.int32): 4}


def _array(a: np.ndarray, version: str) -> bytes:
    if version == "legacy":
        head = struct.pack("<I", a.ndim) + struct.pack(f"<{a.ndim}I", *a.shape)
    elif version == "v1":
        head = struct.pack("<II", 0xF993FAC8, a.ndim) + struct.pack(f"<{a.ndim}q", *a.shape)
    else:
        head = (struct.pack("<Ii", 0xF993FAC9, 0) + struct.pack("<I", a.ndim)
                + struct.pack(f"<{a.ndim}q", *a.shape))
    if a.ndim == 0:
        return head
    ctx = struct.pack("<ii", 2, 0)         # saved from gpu(0): read into the CPU all the same
    return head + ctx + struct.pack("<i", FLAGS[a.dtype]) + a.astype(a.dtype.newbyteorder("<")).tobytes()


def write_params(path, named: dict, version: str = "v2") -> None:
    out = struct.pack("<QQQ", 0x112, 0, len(named))
    out += b"".join(_array(a, version) for a in named.values())
    out += struct.pack("<Q", len(named))
    for k in named:
        out += struct.pack("<Q", len(k.encode())) + k.encode()
    path.write_bytes(out)


@pytest.mark.parametrize("version", ["legacy", "v1", "v2"])
def test_every_array_generation_reads_back(tmp_path, version):
    rng = np.random.default_rng(0)
    named = {"arg:a_weight": rng.standard_normal((3, 4, 2, 2)).astype(np.float32),
             "aux:b_moving_var": rng.random(7).astype(np.float32),
             "arg:c": rng.standard_normal((2, 5)).astype(np.float16),
             "arg:d": rng.standard_normal(3),
             "arg:e": np.arange(6, dtype=np.int32).reshape(2, 3)}
    write_params(tmp_path / "x.params", named, version)
    got = read_params(tmp_path / "x.params")
    assert list(got) == list(named)
    for k, a in named.items():
        assert got[k].dtype == a.dtype and got[k].shape == a.shape and np.array_equal(got[k], a)


def test_bad_files_are_refused_naming_the_file(tmp_path):
    p = tmp_path / "bad.params"
    p.write_bytes(struct.pack("<QQQ", 0x113, 0, 0))
    with pytest.raises(ValueError, match="bad.params: not an MXNet .params file"):
        read_params(p)
    write_params(p, {"arg:a": np.ones((4, 4), np.float32)})
    p.write_bytes(p.read_bytes()[:60])
    with pytest.raises(ValueError, match="bad.params: truncated"):
        read_params(p)
    p.write_bytes(struct.pack("<QQQ", 0x112, 0, 1) + struct.pack("<Ii", 0xF993FAC9, 1))
    with pytest.raises(ValueError, match="array 0 is sparse"):
        read_params(p)


def _mxnet_names(state: dict) -> dict:
    """psa_dist's ResNet-38 names -> the MXNet model's, by hand: stage s, unit k -> res{s}a /
    res{s}b{k}; conv_a/b/c and bn_a/b/c -> branch2a / 2b1 / 2b2; proj -> branch1; BN weight,
    bias, running mean / var -> arg:gamma, arg:beta, aux:moving_mean / moving_var."""
    layer = {"conv_a": "branch2a", "bn_a": "branch2a", "conv_b": "branch2b1", "bn_b": "branch2b1",
             "conv_c": "branch2b2", "bn_c": "branch2b2", "proj": "branch1"}
    bn = {"weight": "arg:{}_gamma", "bias": "arg:{}_beta", "running_mean": "aux:{}_moving_mean",
          "running_var": "aux:{}_moving_var"}
    out = {}
    for key, t in state.items():
        if key.endswith("num_batches_tracked"):
            continue
        parts = key.split(".")
        if parts[0] == "conv1a":
            out["arg:conv1a_weight"] = t
            continue
        if parts[0] == "bn7":
            out[bn[parts[1]].format("bn7")] = t
            continue
        stage = parts[0][1]
        if parts[1].isdigit():
            k, lay, param = int(parts[1]), parts[2], parts[3]
        else:
            k, lay, param = 0, parts[1], parts[2]
        unit = stage + ("a" if k == 0 else f"b{k}")
        if lay.startswith("bn"):
            out[bn[param].format(f"bn{unit}_{layer[lay]}")] = t
        else:
            out[f"arg:res{unit}_{layer[lay]}_weight"] = t
    return out


@pytest.mark.slow
def test_the_authors_resnet38_params_load_tensor_by_tensor(tmp_path):
    torch.manual_seed(0)
    src = ResNet38()
    with torch.no_grad():          # BN statistics other than their defaults, to be seen
        for m in src.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1), m.running_var.uniform_(0.5, 2)
                m.weight.uniform_(0.5, 2), m.bias.uniform_(-1, 1)
    want = src.state_dict()
    named = {k: v.numpy() for k, v in _mxnet_names(want).items()}
    named["arg:linear1000_weight"] = np.zeros((1000, 4096), np.float32)   # ImageNet's: dropped
    path = tmp_path / "ilsvrc-cls_rna-a1_cls1000_ep-0001.params"
    write_params(path, named, "legacy")
    net = ResNet38()
    load_pretrained(net, str(path))
    got = net.state_dict()
    checked = [k for k in want if not k.endswith("num_batches_tracked")]
    assert len(named) - 1 == len(checked)
    for k in checked:
        assert torch.equal(got[k], want[k]), k
    # the conversion writes the same tensors in the authors' torch names
    n = convert_params(path, tmp_path / "resnet38_ilsvrc.pth")
    assert n == len(checked)
    net2 = ResNet38()
    load_pretrained(net2, str(tmp_path / "resnet38_ilsvrc.pth"))
    assert all(torch.equal(net2.state_dict()[k], want[k]) for k in checked)
    authors = torch.load(tmp_path / "resnet38_ilsvrc.pth", weights_only=True)
    assert "b2_1.conv_branch2a.weight" in authors and "bn7.running_var" in authors
