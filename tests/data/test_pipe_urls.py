"""Shards read through WebDataset URLs (``data.shard_url``, e.g. ``pipe:cat ...`` or
``pipe:aws s3 cp s3://... -``): the training loader and a label stage read them, and the outputs
are local shards named after the input shards."""
import json

import pytest

from psa_dist.config import SynthConfig, load_config
from psa_dist.pipeline import Run, run_pipeline
from psa_dist.data.shards import ShardError, iter_shard, shard_basename, split_shards
from psa_dist.data.synth import write_synth

# the tiny config (``tiny_config``)
TINY = dict(name="pipetest", device="cpu", shard_size=6, num_train=24, num_val=4,
            trainers={"train_cls": {"num_workers": 1, "log_every": 2, "checkpoint_every": 50,
                                    "launcher": "inline"}},
            cams={"scales": [1.0], "flip": False}, model={"freeze_bn": True},
            ray={"enabled": True, "num_cpus": 1})


@pytest.mark.parametrize("url,name", [
    ("/d/train-000003.tar", "train-000003.tar"),
    ("pipe:cat /d/train-000003.tar", "train-000003.tar"),
    ("pipe:aws s3 cp s3://bucket/voc/train_aug-000012.tar -", "train_aug-000012.tar"),
    ("pipe:curl -s -L 'https://host/x/val-000001.tar?sig=a/b'", "val-000001.tar"),
    ("https://host/x/val-000001.tar?sig=1", "val-000001.tar"),
])
def test_shard_basename(url, name):
    assert shard_basename(url) == name


def test_shard_url_template_errors(tmp_path):
    info = {"splits": {"train": {"shards": [{"name": "train-000000.tar", "count": 1}]}}}
    with pytest.raises(ShardError, match="data.shard_url.*no \\{name\\}"):
        split_shards(tmp_path, "train", info, "pipe:cat /x/shard.tar")
    with pytest.raises(ShardError, match="data.shard_url.*\\{bucket\\}|only \\{name\\}"):
        split_shards(tmp_path, "train", info, "pipe:cat {bucket}/{name}")
    with pytest.raises(ShardError, match="names no .tar"):
        shard_basename("pipe:cat /x/data")


def test_a_failing_pipe_is_an_error_naming_the_url(tmp_path):
    url = f"pipe:cat {tmp_path}/missing-000000.tar"
    with pytest.raises(ShardError, match="missing-000000.tar"):
        list(iter_shard(url))


def test_inspect_and_preview_read_through_the_url(tmp_path):
    # dataset.json from the local root, shards through pipe:cat from another directory (as from
    # S3): the same report as reading them locally; a URL that reaches nothing is a listed problem.
    import shutil
    from psa_dist.data.dataset_view import inspect_dataset, preview_dataset
    root, remote = tmp_path / "data", tmp_path / "remote"
    write_synth(SynthConfig(image_size=32, num_train=6, num_val=3), root, shard_size=4, workers=1)
    remote.mkdir()
    for tar in root.glob("*.tar"):
        shutil.move(str(tar), remote / tar.name)
    url = f"pipe:cat {remote}/{{name}}"
    got = inspect_dataset(root, shard_url=url)
    assert got["problems"] == []
    assert {k: v["samples"] for k, v in got["splits"].items()} == {"train": 6, "val": 3}
    assert preview_dataset(root, tmp_path / "p.png", count=4, shard_url=url).is_file()
    bad = inspect_dataset(root, shard_url=f"pipe:cat {tmp_path}/nowhere/{{name}}")
    assert len(bad["problems"]) >= 2 and "nowhere" in bad["problems"][0]
    shutil.copy(remote / "train-000000.tar", root)
    local = inspect_dataset(root, verify=True)       # the moved shards are missing locally
    assert any("train-000001.tar" in p for p in local["problems"])


@pytest.mark.slow
@pytest.mark.ray
def test_training_and_cams_read_pipe_urls(tmp_path, tiny_config):
    data = tmp_path / "data"
    write_synth(SynthConfig(image_size=48, num_train=24, num_val=4), data, shard_size=6, workers=1,
                progress=False)
    cfg_file = tiny_config(tmp_path / "cfg.yaml", data, **TINY)
    url = f"pipe:cat {data}/{{name}}"
    piped = load_config(cfg_file, [f"out_dir={tmp_path / 'piped'}", f"data.shard_url={url}"])
    run = Run(piped)
    assert [str(s) for s in run.train_shards] == [f"pipe:cat {data}/train-{i:06d}.tar" for i in range(4)]
    # the classifier's loader streams the pipe: URLs (4 shards x 6 samples = 6 steps of 4)
    run_pipeline(piped, stages=["train_cls"])
    marker = json.loads((tmp_path / "piped" / "stages" / "train_cls.json").read_text())
    assert marker["steps"] == 6
    # CAMs on Ray read the same URLs; outputs are local shards with the input shards' names
    run_pipeline(piped, stages=["cams"])
    out = sorted(p.name for p in (tmp_path / "piped" / "cams").glob("*.tar"))
    assert out == [f"train-{i:06d}.tar" for i in range(4)]
    # the same checkpoint over plain paths writes the same bytes
    plain = tmp_path / "plain"
    (plain / "cls").mkdir(parents=True)
    (plain / "cls" / "checkpoint.pth").write_bytes((tmp_path / "piped" / "cls" / "checkpoint.pth").read_bytes())
    (plain / "stages").mkdir()       # the classifier's stage done, as the check before a run asks
    (plain / "stages" / "train_cls.json").write_text("{}")
    run_pipeline(load_config(cfg_file, [f"out_dir={plain}"]), stages=["cams"])
    for name in out:
        assert (plain / "cams" / name).read_bytes() == (tmp_path / "piped" / "cams" / name).read_bytes()
