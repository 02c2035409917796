"""A new label stage is one module and one row of the stage table: a toy stage written here, outside
the package, runs through the CLI's own subcommand on Ray actors, leaves its marker, and exports
with ``psa-dist export``, with no other file touched."""
import io
import json

import numpy as np
import pytest
from PIL import Image

from psa_dist.cli import main
from psa_dist.data.shards import decode_sample, iter_joined, iter_split
from psa_dist.stages import table

TOY_MODULE = '''
"""A toy label stage: the pixels brighter than mid-grey, one ``bright.png`` per image."""
import time

import numpy as np

from psa_dist.data.shards import encode_mask
from psa_dist.stages.label_stages.base import LabelStage, decoded, summary, write


class Bright(LabelStage):
    name, field = "toy_bright", "bright"
    export_needs_image = False

    def process(self, ctx, in_shard, inputs, out_shard, batch_size=None):
        t0, failed, out, io = time.monotonic(), [], [], {}
        for s in decoded(in_shard, failed=failed, io=io):
            mask = (s["image"].mean(-1) > 127).astype(np.uint8)
            out.append({"__key__": s["key"], "bright.png": encode_mask(mask)})
        write(out_shard, out, io)
        return summary(in_shard, out_shard, t0, len(out), failed, io)


STAGE = Bright()
'''

@pytest.fixture
def toy_row(tmp_path, monkeypatch):
    (tmp_path / "toy_bright_stage.py").write_text(TOY_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))     # the Ray workers import it too
    row = table.Stage("toy_bright", "labels", "the pixels brighter than mid-grey",
                      output="toy_bright", module="toy_bright_stage:STAGE", export="bright")
    table.add_stage(row, after="cams")
    try:
        yield row
    finally:
        table.remove_stage("toy_bright")
    assert "toy_bright" not in table.ORDER


@pytest.mark.ray
@pytest.mark.slow
def test_a_toy_stage_is_one_module_and_one_row(toy_row, tmp_path, tiny_config):
    assert table.ORDER[table.ORDER.index("cams") + 1] == "toy_bright"
    cfg = tiny_config(tmp_path / "toy.yaml", tmp_path / "data", name="toy", shard_size=5,
                      num_train=12, num_val=4, ray={"num_cpus": 2, "num_actors": 2})
    out = tmp_path / "run"
    # its subcommand, built from the row; it needs no earlier stage
    assert main(["toy-bright", str(cfg), f"out_dir={out}"]) == 0
    marker = json.loads((out / "stages" / "toy_bright.json").read_text())
    assert "seed" in marker["settings"]         # the marker of a stage done, with its settings
    log = [json.loads(line) for line in (out / "stages" / "toy_bright.shards.jsonl").open()]
    assert len({r["pid"] for r in log if "pid" in r}) >= 1 and all("node" in r for r in log
                                                                   if "pid" in r)   # on Ray
    shards = sorted((out / "toy_bright").glob("*.tar"))
    data_shards = sorted(p for p in (tmp_path / "data").glob("train-*.tar"))
    assert [p.name for p in shards] == [p.name for p in data_shards]
    n = 0
    for data, toy in zip(data_shards, shards):
        for raw, (lab,) in iter_joined(data, toy):
            image = decode_sample(raw, ["image"])["image"]
            got = np.asarray(Image.open(io.BytesIO(lab["bright.png"])))
            expect = (image.astype(np.float64).mean(-1) > 127)     # computed here, independently
            assert got.dtype == np.uint8 and (got == expect).all()
            n += 1
    assert n == 12
    # export reads the row's name for it
    exported = tmp_path / "exported"
    assert main(["export", str(cfg), f"out_dir={out}", "--what", "bright", "--out",
                 str(exported), "--workers", "1"]) == 0
    pngs = sorted((exported / "SegmentationClassAug").glob("*.png"))
    assert len(pngs) == 12
    first = next(iter_split(tmp_path / "data", "train"))
    png = np.asarray(Image.open(exported / "SegmentationClassAug" / f"{first['__key__']}.png"))
    image = decode_sample(first, ["image"])["image"]
    assert (png == (image.astype(np.float64).mean(-1) > 127)).all()


def test_every_row_names_a_module_of_its_own_layer():
    # the rows' modules are imported by name (table.label_stage / table.kind), which the layering
    # test cannot see: each must be a module of stages/, with the attribute the row names
    for name in table.LABEL_STAGES:
        ref = table.stage(name).module
        assert ref.startswith("psa_dist.stages.label_stages."), ref
        assert table.label_stage(name).name == name
    for model, row in table.MODELS.items():
        assert row.kind.startswith("psa_dist.stages.kinds."), row.kind
        assert table.kind(model).name == model
    assert set(table.exports()) == {"cams", "aff_labels", "ir_labels", "pseudo", "pred"}
