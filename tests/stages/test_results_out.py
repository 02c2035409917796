"""Taking the results out of a run: `psa-dist export` (VOC and mmsegmentation layouts, CAMs),
`psa-dist predict` (folders with a corrupt file, resume, shard datasets scored against their
masks) and `psa-dist label` (another dataset labelled by the run's models), each checked against
what the run's shards hold or what the segmenter gives when run here image by image."""
import copy
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from psa_dist.cli import main
from psa_dist.config import load_config
from psa_dist.core.image import normalize, pad_to_multiple
from psa_dist.data.shards import decode_sample, iter_shard, read_dataset_json
from psa_dist.stages.export import ExportError, export
from psa_dist.stages.run_dir import Run
from psa_dist.stages.model_factory import load_trained

pytestmark = pytest.mark.slow

# the tiny config (``tiny_config``)
TINY = dict(name="outtest", shard_size=6, num_train=18, num_val=6,
            trainers=("train_cls", "train_aff", "train_seg"),
            cams={"scales": [1.0, 0.5], "batch_size": 2}, aff_labels={"crf": False},
            random_walk={"t": 16}, model={"aff_dims": [8, 8, 8, 16]}, ray={"enabled": False})


@pytest.fixture(scope="module")
def trained(tmp_path_factory, trained_run):
    base = tmp_path_factory.mktemp("out")
    p, cfg = trained_run(base, ["train_cls", "cams", "aff_labels", "train_aff", "random_walk",
                                "train_seg"], out="run", **TINY)
    return base, p, cfg


def read_png(path):
    with Image.open(path) as im:
        return im.mode, np.asarray(im), im.getpalette()


def shard_labels(run_dir, stage, field):
    out = {}
    for p in sorted((Path(run_dir) / stage).glob("*.tar")):
        for raw in iter_shard(p):
            out[raw["__key__"]] = decode_sample(raw, [field])[field]
    return out


@torch.inference_mode()
def segment_here(cfg, image):
    """The segmenter on one image, written out here: normalise, pad, forward, crop, argmax."""
    model = load_trained(Run(cfg, prepare=False), "seg", "cpu")
    x = normalize(torch.from_numpy(image)[None])
    h, w = image.shape[:2]
    return model(pad_to_multiple(x, 8))[0, :, :h, :w].argmax(0).numpy()


def test_export_pseudo_labels_in_the_voc_layout_round_trip(trained, tmp_path):
    base, p, cfg = trained
    out = tmp_path / "voc"
    assert main(["export", str(p), f"out_dir={cfg.out_dir}", "--what", "pseudo",
                 "--out", str(out)]) == 0
    want = shard_labels(cfg.out_dir, "random_walk", "pseudo")
    listed = (out / "ImageSets" / "Segmentation" / "train.txt").read_text().split()
    assert sorted(listed) == sorted(want) and len(listed) == 18
    palette = read_dataset_json(base / "data")["palette"]
    for key, label in want.items():
        mode, got, pal = read_png(out / "SegmentationClassAug" / f"{key}.png")
        assert mode == "P" and np.array_equal(got, label)            # class ids unchanged
        assert pal[:3 * len(palette)] == [c for rgb in palette for c in rgb]
        assert (out / "JPEGImages" / f"{key}.jpg").is_file()
    summary = json.loads((out / "export.json").read_text())
    assert summary["images"] == 18 and summary["failed"] == []
    assert (out / "run_info.json").is_file()
    # a rerun resumes (nothing rewritten); another export into the same directory is refused
    stamp = (out / "SegmentationClassAug" / f"{listed[0]}.png").stat().st_mtime_ns
    export(cfg, "pseudo", out)
    assert (out / "SegmentationClassAug" / f"{listed[0]}.png").stat().st_mtime_ns == stamp
    with pytest.raises(ExportError, match="already holds other files"):
        export(cfg, "aff_labels", out)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    assert main(["export", str(p), f"out_dir={cfg.out_dir}", "--what", "pseudo",
                 "--out", str(tmp_path / "busy")]) == 2
    assert (tmp_path / "busy" / "notes.txt").read_text() == "mine"


def mmseg_like_loader(root, split):
    """What mmsegmentation's BaseSegDataset reads: img_dir/<split>/*.jpg paired by name with
    ann_dir/<split>/*.png, in the order of the split file."""
    names = (Path(root) / "splits" / f"{split}.txt").read_text().split()
    for name in names:
        img = np.asarray(Image.open(Path(root) / "img_dir" / split / f"{name}.jpg").convert("RGB"))
        ann = np.asarray(Image.open(Path(root) / "ann_dir" / split / f"{name}.png"))
        assert img.shape[:2] == ann.shape
        yield name, img, ann


def test_export_aff_labels_and_predictions_in_the_mmseg_layout(trained, tmp_path):
    base, p, cfg = trained
    export(cfg, "aff_labels", tmp_path / "aff", layout="mmseg")
    cells = shard_labels(cfg.out_dir, "aff_labels", "aff")   # on AffinityNet's cell grid
    got = {k: a for k, _, a in mmseg_like_loader(tmp_path / "aff", "train")}
    s = cfg.model.aff_stride
    assert got.keys() == cells.keys()
    for k, a in got.items():    # each cell's label on its s x s pixels, cut at the image's edge
        assert np.array_equal(a, np.kron(cells[k], np.ones((s, s), np.uint8))[:a.shape[0], :a.shape[1]])
        assert cells[k].shape == (-(-a.shape[0] // s), -(-a.shape[1] // s))
    assert any((a == 255).any() for a in got.values())                # neutral kept as 255
    export(cfg, "pred", tmp_path / "pred", layout="mmseg")
    preds = list(mmseg_like_loader(tmp_path / "pred", "val"))
    assert len(preds) == 6
    for _, img, ann in preds:
        assert np.array_equal(ann, segment_here(cfg, img))


def test_export_cams_as_float16_npy_with_their_class_ids(trained, tmp_path):
    base, p, cfg = trained
    export(cfg, "cams", tmp_path / "cams")
    listing = [line.split() for line in (tmp_path / "cams" / "cams" / "train.txt").read_text().splitlines()]
    cams = shard_labels(cfg.out_dir, "cams", "cam")
    classes = {}
    for raw in iter_shard(base / "data" / "train-000000.tar"):
        classes[raw["__key__"]] = decode_sample(raw, ["cls"])["cls"]
    assert len(listing) == 18
    for key, *ids in listing:
        arr = np.load(tmp_path / "cams" / "cams" / f"{key}.npy")
        assert arr.dtype == np.float16 and np.array_equal(arr, cams[key])
        assert arr.shape[0] == len(ids)
        if key in classes:
            assert [int(i) for i in ids] == classes[key]


def test_export_names_the_stage_a_run_lacks(tmp_path, trained):
    base, p, _ = trained
    cfg = load_config(p, [f"out_dir={tmp_path / 'empty'}"])
    with pytest.raises(ExportError, match="needs the random_walk stage.*psa-dist random-walk"):
        export(cfg, "pseudo", tmp_path / "x")
    with pytest.raises(SystemExit):
        main(["export", str(p), "--what", "nonsense", "--out", str(tmp_path / "y")])


def test_predict_a_folder_with_a_corrupt_file_and_resume(trained, tmp_path, capsys):
    base, p, cfg = trained
    rng = np.random.default_rng(0)
    imgs = tmp_path / "imgs"
    (imgs / "sub").mkdir(parents=True)
    sizes = {"a": (40, 56), "b": (64, 48), "sub/c": (33, 50)}
    for name, (h, w) in sizes.items():
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(imgs / f"{name}.png")
    (imgs / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (imgs / "notes.txt").write_text("not an image")
    out = tmp_path / "pred"
    rc = main(["predict", str(p), f"out_dir={cfg.out_dir}", "--input", str(imgs), "--out", str(out),
               "ray.max_failures=0.5"])
    assert rc == 1                                   # a file failed: said in the exit status
    summary = json.loads((out / "predict.json").read_text())
    assert [Path(f["path"]).name for f in summary["failed"]] == ["broken.jpg"]
    assert "[predict] failed: " + str(imgs / "broken.jpg") in capsys.readouterr().out
    # over ray.max_failures (its default, 0.1%): the same images, and an error naming the file
    assert main(["predict", str(p), f"out_dir={cfg.out_dir}", "--input", str(imgs),
                 "--out", str(tmp_path / "strict")]) == 1
    assert "broken.jpg" in capsys.readouterr().err and (tmp_path / "strict" / "a.png").is_file()
    for name, (h, w) in sizes.items():
        image = np.asarray(Image.open(imgs / f"{name}.png").convert("RGB"))
        mode, label, _ = read_png(out / f"{name}.png")
        assert mode == "P" and label.shape == (h, w)
        assert np.array_equal(label, segment_here(cfg, image))
        assert read_png(out / "overlay" / f"{name}.png")[1].shape == (h, w, 3)
    # interrupted: one output and the task's marker lost; the rerun redoes only that image
    stamp = (out / "a.png").stat().st_mtime_ns
    (out / "b.png").unlink()
    for m in (out / ".predict").glob("chunk-*[0-9].json"):
        m.unlink()
    from psa_dist.stages.predict import predict
    tolerant = copy.deepcopy(cfg)
    tolerant.ray.max_failures = 0.5
    again = predict(tolerant, str(imgs), out, use_ray=False)
    assert (out / "a.png").stat().st_mtime_ns == stamp and (out / "b.png").is_file()
    written = [json.loads(x)["written"] for x in (out / ".predict" / "tasks.jsonl").read_text().splitlines()]
    assert written == [3, 1] and again["shards_done"] == 1
    # a glob picks the same names
    from psa_dist.stages.predict import find_images
    assert [n for _, n in find_images(str(imgs / "**" / "*.png"))] == ["a", "b", "sub/c"]


def test_predict_a_shard_dataset_with_masks_is_scored(trained, tmp_path):
    base, p, cfg = trained
    out = tmp_path / "predval"
    summary = main(["predict", str(p), f"out_dir={cfg.out_dir}", "--input", str(base / "data"),
                    "--out", str(out), "--scales", "1.0", "0.75", "--flip"])
    assert summary == 0
    ev = json.loads((out / "eval.json").read_text())
    assert ev["images"] == 6 and 0 <= ev["miou"] <= 100 and len(ev["iou"]) == len(ev["classes"])
    # the score, recomputed here from the PNGs and the masks
    from psa_dist.core.metrics import confusion_matrix
    mats = []
    for shard in sorted((base / "data").glob("val-*.tar")):
        for raw in iter_shard(shard):
            gt = decode_sample(raw, ["mask"])["mask"]
            pred = read_png(out / f"{raw['__key__']}.png")[1]
            mats.append(confusion_matrix(torch.from_numpy(pred.astype(np.int64)),
                                         torch.from_numpy(gt.astype(np.int64)), len(ev["classes"])))
    mat = sum(mats).double()
    iou = mat.diag() / (mat.sum(0) + mat.sum(1) - mat.diag())
    assert abs(float(torch.nanmean(iou)) * 100 - ev["miou"]) < 1e-6
    assert "| background |" in (out / "eval.md").read_text()


def test_label_another_dataset_equals_the_runs_own_labels(trained, tmp_path):
    """A second dataset holding two of the run's train shards: its pseudo labels, made by the
    run's models without training, equal the ones the run's own stages wrote for those images."""
    base, p, cfg = trained
    other = tmp_path / "other"
    other.mkdir()
    info = read_dataset_json(base / "data")
    keep = info["splits"]["train"]["shards"][1:3]
    for s in keep:
        shutil.copy(base / "data" / s["name"], other / s["name"])
    info["splits"] = {"train": {"count": sum(s["count"] for s in keep), "shards": keep}}
    (other / "dataset.json").write_text(json.dumps(info))
    out = tmp_path / "labelled"
    assert main(["label", str(p), f"out_dir={cfg.out_dir}", "--input", str(other),
                 "--out", str(out)]) == 0
    for s in keep:
        for stage in ("cams", "random_walk"):
            assert (out / stage / s["name"]).read_bytes() == \
                (Path(cfg.out_dir) / stage / s["name"]).read_bytes(), (stage, s["name"])
    assert not (out / "stages" / "train_seg.json").exists()       # nothing else ran
    marker = json.loads((out / "stages" / "train_cls.json").read_text())
    assert marker["models_from"] == str(cfg.out_dir)
    assert main(["label", str(p), f"out_dir={tmp_path / 'none'}", "--input", str(other),
                 "--out", str(tmp_path / "o2")]) == 2                # no trained models: said
