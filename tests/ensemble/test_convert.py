"""`cxr convert-weights`: a torchvision-layout DenseNet121 (torchxrayvision's layout: one input channel, 18
outputs) onto the Keras backbone, checked against PyTorch's own outputs on the same X-ray. The PyTorch model
is built here with random weights (nothing is downloaded); the check needs torch and skips without it."""

from __future__ import annotations

import json
from collections import OrderedDict

import numpy as np
import pytest

from ensemble.convert import BLOCKS, ConvertError, convert_weights, keras_targets


def _torch_densenet121(seed: int = 0):
    """torchvision's DenseNet121 layout (names included), one input channel, 18 outputs, random BN statistics."""
    torch = pytest.importorskip("torch", reason="torch is not installed: the PyTorch reference cannot run")
    nn = torch.nn
    torch.manual_seed(seed)

    class Layer(nn.Module):
        def __init__(self, cin):
            super().__init__()
            self.norm1, self.relu1 = nn.BatchNorm2d(cin), nn.ReLU()
            self.conv1 = nn.Conv2d(cin, 128, 1, bias=False)
            self.norm2, self.relu2 = nn.BatchNorm2d(128), nn.ReLU()
            self.conv2 = nn.Conv2d(128, 32, 3, padding=1, bias=False)

        def forward(self, x):
            return torch.cat([x, self.conv2(self.relu2(self.norm2(self.conv1(self.relu1(self.norm1(x))))))], 1)

    parts, ch = [("conv0", nn.Conv2d(1, 64, 7, 2, 3, bias=False)), ("norm0", nn.BatchNorm2d(64)),
                 ("relu0", nn.ReLU()), ("pool0", nn.MaxPool2d(3, 2, 1))], 64
    for b, n in enumerate(BLOCKS, start=1):
        block = nn.Sequential(OrderedDict((f"denselayer{i + 1}", Layer(ch + 32 * i)) for i in range(n)))
        parts.append((f"denseblock{b}", block))
        ch += 32 * n
        if b < len(BLOCKS):
            parts.append((f"transition{b}", nn.Sequential(OrderedDict(
                norm=nn.BatchNorm2d(ch), relu=nn.ReLU(), conv=nn.Conv2d(ch, ch // 2, 1, bias=False),
                pool=nn.AvgPool2d(2, 2)))))
            ch //= 2
    parts.append(("norm5", nn.BatchNorm2d(ch)))
    model = nn.Module()
    model.features = nn.Sequential(OrderedDict(parts))
    model.classifier = nn.Linear(ch, 18)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):  # statistics and affine parts away from 0/1, as a trained model's
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    return torch, model.eval()


def test_every_densenet121_tensor_has_a_keras_home():
    targets = keras_targets()
    assert len(targets) == 1 + 4 + sum(n * 10 for n in BLOCKS) + 3 * 5 + 4  # 606 features.* tensors
    assert len({v for v in targets.values()}) == len(targets)


def test_converted_member_matches_pytorch_on_the_same_xray(tmp_path):
    from ensemble.members import build_member
    from fakes import xray_like

    torch, model = _torch_densenet121()
    src = tmp_path / "xrv.pt"
    torch.save({f"module.{k}": v for k, v in model.state_dict().items()}, src)  # a DataParallel-style prefix
    out = tmp_path / "densenet121-xrv.weights.h5"
    record = convert_weights(src, out)
    assert record["input_scaling"] == "xrv" and record["dropped"] == ["classifier.bias", "classifier.weight"]
    assert json.loads((tmp_path / "densenet121-xrv.weights.h5.json").read_text())["source_sha256"]

    gray = np.stack([xray_like(128, 128, seed=s) for s in (1, 2)]).astype(np.float32)
    with torch.no_grad():  # torchxrayvision's input: one channel in [-1024, 1024]
        ref = torch.relu(model.features(torch.from_numpy(gray[:, None] / 255.0 * 2048.0 - 1024.0))).numpy()
    member = build_member("densenet121", weights=str(out), input_shape=(128, 128, 3))
    ours = np.asarray(member.predict_on_batch(np.repeat(gray[..., None], 3, axis=-1))["densenet121_features"])
    ref = ref.transpose(0, 2, 3, 1)
    assert ours.shape == ref.shape == (2, 4, 4, 1024)
    np.testing.assert_allclose(ours, ref, rtol=1e-3, atol=1e-3 * float(np.abs(ref).max()))


def test_a_per_member_weights_table_gives_each_member_its_source(tmp_path):
    from ensemble.train import ClassifierSettings

    with pytest.raises(ValueError, match="must name each member"):
        ClassifierSettings(members=("densenet121", "vgg19"), weights={"densenet121": "none"})
    s = ClassifierSettings(members=("densenet121", "vgg19"), weights={"densenet121": "x.weights.h5", "vgg19": "none"})
    assert s.to_dict()["weights"] == {"densenet121": "x.weights.h5", "vgg19": "none"}


def test_not_a_densenet121_names_the_file(tmp_path):
    bad = tmp_path / "bad.npz"
    np.savez(bad, **{"features.conv0.weight": np.zeros((64, 1, 7, 7), np.float32)})
    with pytest.raises(ConvertError, match="bad.npz: not a torchvision-layout DenseNet121"):
        convert_weights(bad, tmp_path / "o.weights.h5")


def test_cli_converts_an_npz_state_dict_without_torch(tmp_path, capsys):
    """The .npz route (a state dict saved with numpy where torch is installed): the command line writes the
    backbone and its sidecar, and the weights land where the state dict put them."""
    import keras

    from ensemble.convert import sidecar_path
    from pipeline.cli import main

    rng = np.random.default_rng(0)
    shapes = {}
    ref = keras.applications.DenseNet121(weights=None, include_top=False, input_shape=(64, 64, 3))
    for key, (layer, part) in keras_targets().items():
        weights = ref.get_layer(layer).get_weights()
        if part == "kernel":
            kh, kw, cin, cout = weights[0].shape
            shapes[key] = (cout, 1 if layer == "conv1_conv" else cin, kh, kw)
        else:
            shapes[key] = weights[0].shape
    state = {k: rng.uniform(0.5, 1.5, s).astype(np.float32) for k, s in shapes.items()}
    state["classifier.weight"] = np.zeros((18, 1024), np.float32)
    np.savez(tmp_path / "sd.npz", **state)
    out = tmp_path / "x.weights.h5"
    assert main(["convert-weights", str(tmp_path / "sd.npz"), "--out", str(out)]) == 0
    assert "input scaling: gray = mean(R, G, B)" in capsys.readouterr().out
    assert json.loads(sidecar_path(out).read_text())["dropped"] == ["classifier.weight"]
    from pipeline.export_jobs import encoder_record

    assert encoder_record(out) is None  # a converted backbone's sidecar names no training images to check
    loaded = keras.applications.DenseNet121(weights=str(out), include_top=False, input_shape=(64, 64, 3))
    np.testing.assert_allclose(loaded.get_layer("conv5_block16_2_conv").get_weights()[0],
                               state["features.denseblock4.denselayer16.conv2.weight"].transpose(2, 3, 1, 0))
    np.testing.assert_allclose(loaded.get_layer("conv1_conv").get_weights()[0][:, :, 1],
                               state["features.conv0.weight"][:, 0].transpose(1, 2, 0) / 3.0, rtol=1e-6)
    assert main(["convert-weights", str(tmp_path / "sd.npz"), "--out", str(tmp_path / "x.h5")]) == 2
