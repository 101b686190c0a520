"""Model shapes and structure."""
import pytest
import torch

from conftest import ROOT
from models import HTRNet, HybridBackbone, MobileViTBlock, output_frames, parameter_report
from utils import load_config


def test_default_architecture_gives_128_frames_of_256_channels():
    cfg = load_config(ROOT / "config.yaml")
    backbone = HybridBackbone(cfg.arch.cnn_cfg, dict(cfg.arch.mobilevit), cfg.arch.flattening).eval()
    with torch.inference_mode():
        feats = backbone(torch.rand(1, 1, 128, 1024))
    assert feats.shape == (1, 256, 1, 128)


def test_full_model_outputs_and_tap():
    cfg = load_config(ROOT / "config.yaml", ["arch.rnn_hidden_size=32"])
    model = HTRNet(cfg.arch, n_classes=80).eval()
    with torch.inference_mode():
        out = model(torch.rand(2, 1, 128, 1024))
    assert out.logits.shape == (128, 2, 80)
    assert out.shortcut.shape == (128, 2, 80)
    assert out.features["rnn1"].shape == (2, 128, 64)       # (B, T, 2*hidden): first BiLSTM layer
    assert out.features["rnn_last"].shape == (2, 128, 64)   # the last one
    assert out.features["backbone"].shape == (2, 128, 256)  # (B, T, C): the backbone's frames
    assert model.head.feature_dims(256) == {k: v.shape[2] for k, v in out.features.items()}


def test_each_tap_is_the_tensor_the_ctc_path_reads():
    """A hook on a tapped tensor must see every gradient that reaches those features (TapGradients splits CTC's
    from the LLM's there): each tap lies on the path of the logits, the backbone frames on both branches'."""
    cfg = load_config(ROOT / "config.yaml", ["arch.rnn_hidden_size=16"])
    out = HTRNet(cfg.arch, n_classes=12).eval()(torch.rand(1, 1, 128, 1024))
    for name, loss in (("main", out.logits.square().sum()), ("shortcut", out.shortcut.square().sum())):
        taps = {k: v for k, v in out.features.items() if name == "main" or k == "backbone"}
        grads = torch.autograd.grad(loss, list(taps.values()), retain_graph=True)
        assert all(g.abs().sum() > 0 for g in grads), name


@pytest.mark.parametrize("hw", [(37, 53), (8, 128), (9, 9), (16, 250)])
@pytest.mark.parametrize("patch", [4, 8])
def test_mobilevit_block_handles_non_divisible_sizes(hw, patch):
    block = MobileViTBlock(12, patch, dim=16, heads=2, depth=1, mlp_dim=32)
    x = torch.rand(2, 12, *hw)
    assert block(x).shape == x.shape


def test_mobilevit_attention_is_global_across_patches():
    """Changing one far-away patch changes the output at the other end of the line (not a local-window block)."""
    torch.manual_seed(0)
    block = MobileViTBlock(4, 4, dim=8, heads=2, depth=1, mlp_dim=16).eval()
    x = torch.rand(1, 4, 8, 64)
    y = x.clone()
    y[..., -4:] += 1.0
    with torch.no_grad():
        diff = (block(x) - block(y))[..., :8].abs().max()
    assert diff > 1e-4


@pytest.mark.parametrize("training, dtype", [(True, torch.float32), (False, torch.bfloat16)])
def test_mobilevit_attention_trains_in_fp32_under_cpu_bf16_autocast(training, dtype):
    block = MobileViTBlock(4, 4, dim=8, heads=2, depth=1, mlp_dim=16).train(training)
    seen = []
    block.transformer.register_forward_hook(lambda module, args, out: seen.append(out.dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = block(torch.rand(2, 4, 8, 32))
    assert seen == [dtype] and out.shape == (2, 4, 8, 32)
    if training:
        out.float().sum().backward()
        assert all(p.grad is not None for p in block.transformer.parameters())


@pytest.mark.parametrize("size", [(100, 700), (64, 768), (128, 1000)])
def test_non_divisible_input_sizes(tiny_overrides, size):
    cfg = load_config(ROOT / "config.yaml", tiny_overrides)
    model = HTRNet(cfg.arch, n_classes=10).eval()
    with torch.inference_mode():
        out = model(torch.rand(1, 1, *size))
    assert out.logits.shape[0] == size[1] // 8


@pytest.mark.parametrize("head_type,has_shortcut,has_tap", [("both", True, True), ("rnn", False, True),
                                                            ("cnn", False, False)])
def test_head_types(tiny_overrides, head_type, has_shortcut, has_tap):
    cfg = load_config(ROOT / "config.yaml", tiny_overrides + [f"arch.head_type={head_type}"])
    out = HTRNet(cfg.arch, n_classes=10)(torch.rand(2, 1, 32, 256))
    assert out.logits.shape == (32, 2, 10)
    assert (out.shortcut is not None) == has_shortcut
    assert ("rnn1" in out.features) == has_tap and "backbone" in out.features


def weight_shapes(model) -> dict:
    return {name: tensor.shape for name, tensor in model.state_dict().items()}


@pytest.mark.parametrize("pools", [("M", "M"), ("M", "Mh"), ("Mh", "Mh")])
def test_height_only_pooling_keeps_the_frames_and_the_weights(tiny_overrides, pools):
    cnn_cfg = f"arch.cnn_cfg=[[1,8],{pools[0]},mobilevit1,[1,16],{pools[1]},mobilevit2,[1,32]]"
    cfg = load_config(ROOT / "config.yaml", tiny_overrides + [cnn_cfg])
    model = HTRNet(cfg.arch, n_classes=10)
    out = model(torch.rand(2, 1, 32, 250))
    assert out.logits.shape[0] == output_frames(cfg.arch.cnn_cfg, 250) == 125 // 2 ** pools.count("M")
    reference = HTRNet(load_config(ROOT / "config.yaml", tiny_overrides).arch, n_classes=10)
    assert weight_shapes(model) == weight_shapes(reference)


def test_bad_cnn_token_is_clear(tiny_overrides):
    cfg = load_config(ROOT / "config.yaml", tiny_overrides + ["arch.cnn_cfg=[[1,8],'mobilevit3']"])
    with pytest.raises(ValueError, match="unknown token 'mobilevit3'"):
        HTRNet(cfg.arch, n_classes=10)


def test_parameter_report_adds_up(tiny_overrides):
    model = HTRNet(load_config(ROOT / "config.yaml", tiny_overrides).arch, n_classes=10)
    report = parameter_report(model)
    assert report["backbone"] + report["head"] == report["total"] == sum(p.numel() for p in model.parameters())


def test_fusing_batchnorm_keeps_outputs(tiny_overrides):
    import copy
    from models import fuse_conv_bn
    torch.manual_seed(0)
    model = HTRNet(load_config(ROOT / "config.yaml", tiny_overrides).arch, n_classes=10)
    model.train()
    model(torch.rand(4, 1, 32, 256))                        # non-trivial running statistics
    model.eval()
    fused = fuse_conv_bn(copy.deepcopy(model))
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fused.modules())
    x = torch.rand(2, 1, 32, 256)
    with torch.inference_mode():
        assert torch.allclose(model(x).logits, fused(x).logits, atol=1e-4)
