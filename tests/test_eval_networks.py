"""The evaluation networks (SyncNet, I3D, FID Inception-v3): the public files' key names and shapes, strict
loading of both file formats, and the errors that name what does not fit.

The architectures were also checked once, outside this suite, against the public code itself (syncnet_python's
SyncNetModel.S, pytorch-i3d's InceptionI3d, pytorch-fid's InceptionV3 on torchvision's Inception3): same state
dict keys and shapes, and the same outputs for the same random weights (max difference 0 / 5e-6 / 0).
"""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from models.fid_inception import FIDInceptionV3, load_fid_inception
from models.i3d import I3DConfig, InceptionI3d, load_i3d
from models.syncnet import SyncNet, load_syncnet
from models.weights import WeightsError

torch.set_num_threads(2)


def test_syncnet_has_the_public_keys_and_shapes():
    sd = SyncNet().state_dict()
    assert len(sd) == 102  # syncnet_python's S(): 20 conv/linear/bn layers' tensors incl. running stats
    for key, shape in {
        "netcnnaud.0.weight": (64, 1, 3, 3),
        "netcnnaud.18.weight": (512, 256, 5, 4),  # after two pools the 13x20 MFCC map is 5x4
        "netfcaud.1.running_var": (512,),
        "netfcaud.3.weight": (1024, 512),
        "netcnnlip.0.weight": (96, 3, 5, 7, 7),  # 5 colour frames
        "netcnnlip.18.weight": (512, 256, 1, 6, 6),
        "netcnnlip.19.num_batches_tracked": (),
        "netfclip.3.bias": (1024,),
    }.items():
        assert tuple(sd[key].shape) == shape, key


def test_i3d_has_the_public_keys_and_shapes():
    model = InceptionI3d()
    sd = model.state_dict()
    assert len(sd) == 344
    for key, shape in {
        "Conv3d_1a_7x7.conv3d.weight": (64, 3, 7, 7, 7),
        "Conv3d_2c_3x3.bn.running_mean": (192,),
        "Mixed_3b.b1b.conv3d.weight": (128, 96, 3, 3, 3),
        "Mixed_4f.b3b.conv3d.weight": (128, 528, 1, 1, 1),
        "Mixed_5c.b0.bn.weight": (384,),
        "logits.conv3d.weight": (400, 1024, 1, 1, 1),
        "logits.conv3d.bias": (400,),
    }.items():
        assert tuple(sd[key].shape) == shape, key
    assert "Conv3d_1a_7x7.conv3d.bias" not in sd and "logits.bn.weight" not in sd
    assert sum(p.numel() for p in model.parameters()) == 12_697_264


def test_fid_inception_has_the_public_keys_and_shapes():
    model = FIDInceptionV3()
    sd = model.state_dict()
    assert len(sd) == 566
    for key, shape in {
        "Conv2d_1a_3x3.conv.weight": (32, 3, 3, 3),
        "Mixed_5b.branch_pool.conv.weight": (32, 192, 1, 1),
        "Mixed_6e.branch7x7dbl_5.conv.weight": (192, 192, 1, 7),
        "Mixed_7c.branch3x3dbl_3b.bn.running_var": (384,),
        "fc.weight": (1008, 2048),
    }.items():
        assert tuple(sd[key].shape) == shape, key
    assert not any(k.startswith("AuxLogits") for k in sd)
    assert sum(p.numel() for p in model.parameters()) == 23_850_960  # torchvision Inception3(1008, aux_logits=False)


def _randomised(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Random weights and running statistics, so a loader that skipped or mixed up a tensor would show."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if t.dtype.is_floating_point:
                t.copy_(torch.rand(t.shape, generator=g) + (0.5 if name.endswith("running_var") else -0.5))
    return model.eval()


def _assert_same_weights(loaded: torch.nn.Module, src: torch.nn.Module) -> None:
    assert not loaded.training
    got, want = loaded.state_dict(), src.state_dict()
    assert list(got) == list(want)
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_syncnet_loads_safetensors_and_an_old_torch_file_strictly(tmp_path):
    src = _randomised(SyncNet(), 1)
    save_file(src.state_dict(), tmp_path / "syncnet.safetensors")
    _assert_same_weights(load_syncnet(tmp_path / "syncnet.safetensors"), src)
    # syncnet_python's syncnet_v2.model predates BatchNorm's batch counter: a plain torch file without it loads
    old = {k: v for k, v in src.state_dict().items() if not k.endswith("num_batches_tracked")}
    assert len(old) == 102 - 14  # 14 BatchNorm layers
    torch.save(old, tmp_path / "syncnet_v2.model")
    _assert_same_weights(load_syncnet(tmp_path / "syncnet_v2.model"), src)


def test_syncnet_misfits_are_named(tmp_path):
    state = SyncNet().state_dict()
    state.pop("netfcaud.3.weight")
    state["netcnnlip.0.weight"] = torch.zeros(96, 1, 5, 7, 7)  # a grayscale-input variant
    state["netextra.weight"] = torch.zeros(3)
    save_file(state, tmp_path / "bad.safetensors")
    with pytest.raises(WeightsError) as err:
        load_syncnet(tmp_path / "bad.safetensors")
    msg = str(err.value)
    assert "missing keys (1): netfcaud.3.weight" in msg
    assert "unexpected keys (1): netextra.weight" in msg
    assert "netcnnlip.0.weight: file (96, 1, 5, 7, 7) vs model (96, 3, 5, 7, 7)" in msg


def test_weights_files_never_run_code_and_absent_files_are_named(tmp_path):
    class Payload:
        def __reduce__(self):
            return (print, ("pickled code ran",))

    torch.save({"netcnnaud.0.weight": Payload()}, tmp_path / "evil.model")
    with pytest.raises(WeightsError, match="tensors-only"):
        load_syncnet(tmp_path / "evil.model")
    with pytest.raises(WeightsError, match="SyncNet weights not found: .*nothing.model"):
        load_syncnet(tmp_path / "nothing.model")


def test_i3d_round_trip_and_wrong_class_count(tmp_path):
    src = _randomised(InceptionI3d(), 2)
    torch.save(src.state_dict(), tmp_path / "rgb_imagenet.pt")
    _assert_same_weights(load_i3d(tmp_path / "rgb_imagenet.pt"), src)
    # pytorch-i3d's Charades file (157 classes) is not the Kinetics-400 network FVD is defined with
    save_file({k: v[:157] if k.startswith("logits") else v for k, v in src.state_dict().items()},
              tmp_path / "charades.safetensors")
    with pytest.raises(WeightsError, match=r"logits.conv3d.weight: file \(157, 1024, 1, 1, 1\) vs model \(400"):
        load_i3d(tmp_path / "charades.safetensors")
    assert tuple(load_i3d(tmp_path / "charades.safetensors", I3DConfig(num_classes=157)).logits.conv3d.bias.shape) == (157,)


def test_fid_inception_round_trip(tmp_path):
    src = _randomised(FIDInceptionV3(), 3)
    save_file(src.state_dict(), tmp_path / "pt_inception.safetensors")
    _assert_same_weights(load_fid_inception(tmp_path / "pt_inception.safetensors"), src)
