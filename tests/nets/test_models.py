"""Model shapes at stride 8 (odd sizes), AffinityNet from a classifier, optimiser groups, metrics."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from psa_dist.nets.backbones import build_backbone
from psa_dist.config import ModelConfig
from psa_dist.core.metrics import (ConfusionMatrix, confusion_matrix, iou_from_confusion, miou_from_confusion)
from psa_dist.util.dist import all_reduce_sum
from psa_dist.nets.models import (AffinityNet, Classifier, build_classifier, build_segmenter, set_bn_eval)
from psa_dist.nets.optim import build_optimizer, build_poly_scheduler, parameter_groups


def ceil8(n):
    return -(-n // 8)


@pytest.mark.parametrize("name", ["small", pytest.param("resnet50", marks=pytest.mark.slow),
                                  pytest.param("resnet38", marks=pytest.mark.slow)])
def test_backbone_stride8_taps(name):
    net = build_backbone(name).eval()
    x = torch.randn(1, 3, 41, 35)
    with torch.no_grad():
        feats = net(x)
    # every tap AffinityNet or IRN's boundary branch reads, the last one AffinityNet's last
    assert list(feats) == list(dict.fromkeys([*net.edge_taps, *net.taps]))
    assert list(feats)[-1] == list(net.taps)[-1]
    for tap, ch in {**net.edge_taps, **net.taps}.items():
        # the last tap is at stride 8; earlier ones at 8 or 4 (small's layer1, the stem and
        # layer1 of ResNet-50, stage 3 of ResNet-38)
        shapes = [(1, ch, ceil8(41), ceil8(35)), (1, ch, -(-41 // 4), -(-35 // 4))]
        assert feats[tap].shape in shapes[:1 if tap == list(net.taps)[-1] else 2], tap
    assert list(net.taps.values())[-1] == net.out_channels


def test_classifier_cams_and_loss_gradients():
    model = build_classifier(ModelConfig(backbone="small"), 6)
    x = torch.randn(2, 3, 49, 57)
    logits = model(x)
    assert logits.shape == (2, 6)
    cams = model.cams(x)
    assert cams.shape == (2, 6, 7, 8) and cams.min() >= 0
    assert model.fc.bias is None
    # GAP then 1x1 conv == 1x1 conv then GAP (what makes CAMs the classifier's evidence)
    model.eval()
    torch.testing.assert_close(model(x), model.fc(model.features(x)).mean((2, 3)), rtol=1e-4, atol=1e-5)
    y = torch.tensor([[1, 0, 0, 1, 0, 0], [0, 1, 0, 0, 0, 0]], dtype=torch.float32)
    loss = Classifier.loss(model(x), y)
    loss.backward()
    assert model.backbone.stem[0].weight.grad.abs().sum() > 0


def test_affinitynet_from_classifier():
    cls = build_classifier(ModelConfig(backbone="small"), 4)
    aff = AffinityNet.from_classifier(cls, dims=(8, 16, 32, 40))
    for (k, v), (k2, v2) in zip(cls.backbone.state_dict().items(), aff.backbone.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)
    assert aff.backbone is not cls.backbone
    f = aff(torch.randn(2, 3, 33, 47))
    assert f.shape == (2, 96, 5, 6) and aff.out_dim == 96
    assert AffinityNet.from_classifier(cls).out_dim == sum(cls.backbone.aff_dims)
    with pytest.raises(ValueError, match="taps"):
        AffinityNet(cls.backbone, dims=(1, 2))


def test_affinitynet_stride4_and_stride8_grids():
    torch.manual_seed(0)
    cls = build_classifier(ModelConfig(backbone="small"), 4).eval()
    a8 = AffinityNet.from_classifier(cls, dims=(8, 16, 32, 40)).eval()
    a4 = AffinityNet.from_classifier(cls, dims=(8, 16, 32, 40), stride=4).eval()
    a4.load_state_dict(a8.state_dict())
    x = torch.randn(1, 3, 33, 47)
    with torch.no_grad():
        f8, f4 = a8(x), a4(x)
        assert f8.shape == (1, 96, 5, 6) and f4.shape == (1, 96, 9, 12)
        # independent check of the stride-8 head: the stride-4 tap averaged over each 2x2 cell
        # (partial cells at the border over what they hold), the others used as they are
        taps = a8.backbone(x)
        l1 = taps["layer1"]
        pooled = torch.zeros(1, l1.shape[1], 5, 6)
        for i in range(5):
            for j in range(6):
                pooled[0, :, i, j] = l1[0, :, 2 * i:2 * i + 2, 2 * j:2 * j + 2].mean(dim=(1, 2))
        parts = [F.elu(a8.reduce[0](pooled))] + [
            F.elu(conv(taps[n])) for n, conv in zip(a8.tap_names[1:], a8.reduce[1:])]
        torch.testing.assert_close(f8, F.elu(a8.head(torch.cat(parts, 1))), atol=1e-5, rtol=1e-5)
        # the stride-4 head: the coarser taps upsampled bilinearly to the stride-4 grid first,
        # then reduced (the net reduces first; the two commute)
        parts = [F.elu(a4.reduce[0](l1))] + [
            F.elu(conv(F.interpolate(taps[n], size=(9, 12), mode="bilinear", align_corners=False)))
            for n, conv in zip(a4.tap_names[1:], a4.reduce[1:])]
        torch.testing.assert_close(f4, F.elu(a4.head(torch.cat(parts, 1))), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="aff_stride"):
        AffinityNet(cls.backbone, stride=2)


def test_resnet38_affinity_head_is_448():
    from psa_dist.nets.backbones import ResNet38
    net = ResNet38()
    aff = AffinityNet(net)
    assert aff.out_dim == 448 and [m.in_channels for m in aff.reduce] == [512, 1024, 4096]


@pytest.mark.parametrize("seg", ["light", pytest.param("deeplabv3_resnet50", marks=pytest.mark.slow)])
def test_segmenter_output_at_input_size(seg):
    model = build_segmenter(ModelConfig(backbone="small", segmenter=seg), 7).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 45, 53))
    assert out.shape == (1, 7, 45, 53)


def test_pretrained_missing_file_is_clear():
    with pytest.raises(FileNotFoundError, match="model.pretrained"):
        build_backbone("small", "/no/such/weights.pth")


def test_pretrained_roundtrip(tmp_path):
    a = build_backbone("small")
    torch.save(a.state_dict(), tmp_path / "w.pth")
    b = build_backbone("small", str(tmp_path / "w.pth"))
    for (k, v), (_, w) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(v, w), k


def test_parameter_groups_and_poly():
    model = build_classifier(ModelConfig(backbone="small"), 5)
    groups = parameter_groups(model, 0.01, 5e-4, model.new_modules())
    by = {g["name"]: g for g in groups}
    assert by["new_w"]["lr"] == pytest.approx(0.1) and by["new_w"]["params"] == [model.fc.weight]
    assert by["w"]["lr"] == 0.01 and by["b"]["lr"] == 0.02 and by["b"]["weight_decay"] == 0.0
    n_all = sum(p.numel() for p in model.parameters())
    assert sum(p.numel() for g in groups for p in g["params"]) == n_all
    set_bn_eval(model)
    groups = parameter_groups(model, 0.01, 5e-4, model.new_modules())
    assert all(not isinstance(p, torch.nn.Parameter) or p.requires_grad for g in groups for p in g["params"])
    assert sum(p.numel() for g in groups for p in g["params"]) < n_all
    opt = build_optimizer(model, 0.01, 5e-4, 0.9, model.new_modules())
    sched = build_poly_scheduler(opt, max_steps=10)
    lrs = []
    for _ in range(10):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([0.01 * (1 - s / 10) ** 0.9 for s in range(10)])
    assert opt.param_groups[0]["momentum"] == 0.9


def test_confusion_and_miou_against_loops():
    rng = np.random.default_rng(0)
    gt = rng.integers(0, 4, (30, 20))
    gt[rng.random((30, 20)) < 0.1] = 255
    pred = rng.integers(0, 4, (30, 20))
    mat = confusion_matrix(torch.from_numpy(pred), torch.from_numpy(gt), 4)
    exp = np.zeros((4, 4), int)
    for g, p in zip(gt.ravel(), pred.ravel()):
        if g != 255:
            exp[g, p] += 1
    np.testing.assert_array_equal(mat.numpy(), exp)
    ious = []
    for c in range(4):
        inter = ((gt == c) & (pred == c)).sum()
        union = (((gt == c) | (pred == c)) & (gt != 255)).sum()
        ious.append(inter / union)
    np.testing.assert_allclose(iou_from_confusion(mat).numpy(), ious)
    assert miou_from_confusion(mat) == pytest.approx(100 * np.mean(ious))
    cm = ConfusionMatrix(4)
    cm.update(torch.from_numpy(pred[:15]), torch.from_numpy(gt[:15]))
    cm.update(torch.from_numpy(pred[15:]), torch.from_numpy(gt[15:]))
    assert torch.equal(all_reduce_sum(cm.mat), mat)     # no process group: itself
    with pytest.raises(ValueError, match="outside"):
        confusion_matrix(torch.tensor([5]), torch.tensor([0]), 4)


def _reduce_worker(rank, port, pred, gt, out):
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    cm = ConfusionMatrix(4)
    half = slice(0, 10) if rank == 0 else slice(10, 20)
    cm.update(pred[half], gt[half])
    all_reduce_sum(cm.mat)
    out[rank] = cm.mat
    dist.destroy_process_group()


def test_confusion_reduces_across_processes(free_port):
    import torch.multiprocessing as mp
    port = free_port()
    g = torch.Generator().manual_seed(1)
    pred, gt = torch.randint(0, 4, (20, 9), generator=g), torch.randint(0, 4, (20, 9), generator=g)
    out = mp.Manager().dict()
    mp.spawn(_reduce_worker, args=(port, pred, gt, out), nprocs=2, join=True)
    full = confusion_matrix(pred, gt, 4)
    assert torch.equal(out[0], full) and torch.equal(out[1], full)


def test_pretrained_file_of_another_network_is_an_error(tmp_path):
    # ResNet-38 names into the small net (and vice versa) match nothing but BN counters: refuse.
    from psa_dist.nets.backbones import load_pretrained
    small = build_backbone("small")
    wrong = {f"other.{k}": v for k, v in small.state_dict().items()}
    wrong.update({k: v for k, v in small.state_dict().items() if k.endswith("num_batches_tracked")})
    torch.save(wrong, tmp_path / "wrong.pth")
    with pytest.raises(ValueError, match=r"matches 0 of the \d+ weight tensors"):
        load_pretrained(build_backbone("small"), str(tmp_path / "wrong.pth"))
    torch.save(small.state_dict(), tmp_path / "right.pth")
    net = build_backbone("small")
    load_pretrained(net, str(tmp_path / "right.pth"))
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), small.state_dict().values()))
    # the ResNet-50 segmenter never reads a ResNet-38 file (absent here: no error), but its own
    cfg = ModelConfig(backbone="resnet38", pretrained=str(tmp_path / "r38.pth"),
                      segmenter="deeplabv3_resnet50")
    build_segmenter(cfg, 3)
    cfg.seg_pretrained = str(tmp_path / "r50.pth")
    with pytest.raises(FileNotFoundError, match="r50.pth"):
        build_segmenter(cfg, 3)


def psa_resnet38_names():
    """The authors' ResNet-38 parameter and buffer names (psa's network/resnet38d.py), written out
    here from its layout: conv1a; blocks b2, b2_1, b2_2, b3.., b4, b4_1..b4_5, b5, b5_1, b5_2 with
    bn_branch2a / conv_branch2a / bn_branch2b1 / conv_branch2b1 (+ conv_branch1 on the first block
    of a stage); bottlenecks b6, b7 with a third BN + conv and conv_branch1; bn7; then mapped by
    hand onto psa_dist's names."""
    bn = ["weight", "bias", "running_mean", "running_var", "num_batches_tracked"]
    ours = {"bn_branch2a": "bn_a", "conv_branch2a": "conv_a", "bn_branch2b1": "bn_b",
            "conv_branch2b1": "conv_b", "bn_branch2b2": "bn_c", "conv_branch2b2": "conv_c",
            "conv_branch1": "proj"}
    pairs = [("conv1a.weight", "conv1a.weight")]
    for stage, blocks in [(2, 3), (3, 3), (4, 6), (5, 3)]:
        for i in range(blocks):
            theirs = f"b{stage}" + (f"_{i}" if i else "")
            layers = ["bn_branch2a", "conv_branch2a", "bn_branch2b1", "conv_branch2b1"]
            layers += ["conv_branch1"] if i == 0 else []
            for layer in layers:
                for p in (bn if layer.startswith("bn") else ["weight"]):
                    pairs.append((f"{theirs}.{layer}.{p}", f"b{stage}.{i}.{ours[layer]}.{p}"))
    for stage in (6, 7):
        for layer in ["bn_branch2a", "conv_branch2a", "bn_branch2b1", "conv_branch2b1",
                      "bn_branch2b2", "conv_branch2b2", "conv_branch1"]:
            for p in (bn if layer.startswith("bn") else ["weight"]):
                pairs.append((f"b{stage}.{layer}.{p}", f"b{stage}.{ours[layer]}.{p}"))
    pairs += [(f"bn7.{p}", f"bn7.{p}") for p in bn]
    return pairs


def test_authors_resnet38_names_are_renamed_onto_ours():
    from psa_dist.nets.backbones import ResNet38, from_psa_resnet38, is_psa_resnet38
    with torch.device("meta"):                  # names and shapes only: no 400 MB of weights
        net = ResNet38()
    want = net.state_dict()
    pairs = psa_resnet38_names()
    assert sorted(o for _, o in pairs) == sorted(want)
    # the authors' classifier checkpoint: DataParallel's prefix, the fc8 head, ImageNet's linear1000
    theirs = {f"module.{t}": want[o] for t, o in pairs}
    theirs.update({"module.fc8.weight": torch.zeros(20, 4096, 1, 1),
                   "linear1000.weight": torch.zeros(1000, 4096)})
    assert is_psa_resnet38(theirs) and not is_psa_resnet38(want)
    got = from_psa_resnet38(theirs)
    assert sorted(got) == sorted(want)
    for t, o in pairs:
        assert got[o] is theirs[f"module.{t}"], (t, o)


@pytest.mark.slow
def test_authors_resnet38_file_loads(tmp_path):
    from psa_dist.nets.backbones import ResNet38, load_pretrained
    torch.manual_seed(0)
    src = ResNet38()
    theirs = {t: src.state_dict()[o] for t, o in psa_resnet38_names()}
    torch.save({**theirs, "fc8.weight": torch.zeros(20, 4096, 1, 1)}, tmp_path / "res38_cls.pth")
    torch.manual_seed(1)
    net = ResNet38()
    load_pretrained(net, str(tmp_path / "res38_cls.pth"))
    for k, v in src.state_dict().items():
        assert torch.equal(net.state_dict()[k], v), k


def test_initial_weights_name_the_key_that_sets_them():
    # the trainer's first log line: where a model's weights start, or which key would give them
    from pathlib import Path
    from psa_dist.config import load_config
    from psa_dist.stages import table

    def initial_weights(cfg, model):
        return table.kind(model).initial_weights(cfg)

    def random_init_key(cfg, model):
        return table.kind(model).random_init_key(cfg)
    configs = Path(__file__).resolve().parents[2] / "configs"
    voc = load_config(configs / "voc_resnet38.yaml", ["model.pretrained=w38.pth",
                                                       "model.seg_pretrained=null"])
    assert initial_weights(voc, "cls") == "model.pretrained=w38.pth"
    assert "classifier" in initial_weights(voc, "aff")
    # a ResNet-38 file does not fit DeepLabV3's ResNet-50: the segmenter starts from random
    assert initial_weights(voc, "seg") is None
    assert random_init_key(voc, "seg") == "model.seg_pretrained"
    r50 = load_config(configs / "voc_resnet50.yaml", ["model.pretrained=w50.pth",
                                                       "model.seg_pretrained=null"])
    assert initial_weights(r50, "seg_full") == "model.pretrained=w50.pth"
    demo = load_config(configs / "demo.yaml")
    assert initial_weights(demo, "cls") is None and random_init_key(demo, "cls") == "model.pretrained"


def test_frozen_layers_and_dropout_as_the_authors():
    # model.frozen_layers: those backbone layers get no gradient and no optimiser slot, the rest
    # train; cls_dropout acts on the pooled training path only, never on the CAMs
    import pytest
    from psa_dist.config import load_config
    from psa_dist.nets.models import build_classifier, freeze_layers
    from psa_dist.nets.optim import build_optimizer
    cfg = load_config(None, ["model.backbone=small", "model.cls_dropout=0.5",
                             "model.frozen_layers=[stem,layer1]"])
    net = build_classifier(cfg.model, 3)
    freeze_layers(net.backbone, cfg.model.frozen_layers)
    frozen = {id(p) for m in (net.backbone.stem, net.backbone.layer1) for p in m.parameters()}
    assert frozen
    opt = build_optimizer(net, 0.01, 5e-4, 0.9, net.new_modules())
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    assert not frozen & in_opt
    assert {id(p) for p in net.backbone.layer2.parameters()} <= in_opt
    x = torch.randn(2, 3, 64, 64)
    net.train()
    net(x).sum().backward()
    assert all(p.grad is None for m in (net.backbone.stem, net.backbone.layer1)
               for p in m.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in net.backbone.layer2.parameters())
    torch.manual_seed(0)
    a = net(x)
    torch.manual_seed(1)
    assert not torch.allclose(a, net(x))              # dropout active in training
    assert torch.equal(net.cams(x), net.cams(x))      # and never on the CAM path
    net.eval()
    assert torch.equal(net(x), net(x))
    with pytest.raises(ValueError, match=r"model.frozen_layers: 'b9'.*have stem"):
        freeze_layers(net.backbone, ["b9"])
