"""The benchmark suite runs end to end on tiny models and reports what it
promises (no timing asserted): every method, counts, the engine's plan and its
FLOP bound, the files; and python -m benchmarks.suite is a command from the repository root."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import suite
from privacy import PrivacyEngine

pytestmark = pytest.mark.filterwarnings("ignore:There is a performance drop", "ignore:Full backward hook",
                                        "ignore:Using a non-full backward hook")
REPO = Path(__file__).resolve().parent.parent
TINY_VIT = ["--model", "vit_tiny", "--img-size", "32", "--set", "depth=1", "--batch", "3"]


def test_suite_on_a_tiny_timm_vit(tmp_path):
    (result,) = suite.main([*TINY_VIT, "--device", "cpu", "--steps", "2", "--out", str(tmp_path)])  # round-robin
    methods = result["methods"]
    assert list(methods) == list(suite.METHODS)  # Opacus is in the bench extra
    base, engine = methods["non_private"], methods["engine"]
    for name, figures in methods.items():
        assert len(figures["all_seconds"]) == 2 and figures["examples_per_s"] > 0 and figures["flops"] > 0 and figures["aten_ops"] > 0, name
        assert figures["non_matmul_bytes"] > 0 and figures["peak_live_bytes"] > 0, name
    # the engine: no sync in forward and backward, one read of its statistics per step
    assert engine["added_syncs_per_micro_batch"] == 0
    assert engine["syncs_by_phase"]["step"] == base["syncs_by_phase"]["step"] + 1
    assert abs(engine["flops_over_bound"] - 1) < 0.03
    assert {p["kind"] for p in engine["plan"].values()} <= {"ghost", "per_example"}
    assert methods["two_pass"]["flops"] > engine["flops"]  # a second backward
    saved = json.loads((tmp_path / "bench.json").read_text())
    assert saved["results"][0]["methods"]["engine"]["flops"] == engine["flops"]
    table = (tmp_path / "bench.md").read_text()
    assert all(f"| {name} |" in table for name in suite.METHODS)
    assert (tmp_path / "bench.png").read_bytes()[:4] == b"\x89PNG"


def test_project_model_steps_never_sync():
    """DP-Cap validates its token ids on the device: no host sync in its forward
    or backward, private or not (one timed step: the methods run one at a time)."""
    (result,) = suite.main(["--model", "dpcap_nano", "--batch", "2", "--methods", "non_private,engine",
                            "--steps", "1", "--warmup", "0", "--device", "cpu", "--set", "img_size=32",
                            "--set", "depth=1", "--set", "decoder_depth=1", "--set", "vocab_size=300",
                            "--set", "text_max_length=8"])
    base, engine = result["methods"]["non_private"], result["methods"]["engine"]
    assert base["syncs_by_phase"].get("forward", 0) == 0 and engine["added_syncs_per_micro_batch"] == 0
    assert engine["syncs_by_phase"].get("backward", 0) == 0
    assert abs(engine["flops_over_bound"] - 1) < 0.03


def test_the_suite_is_a_command_from_the_repository_root():
    """``python -m benchmarks.suite --suite``, the documented command (benchmarks/ is not installed)."""
    done = subprocess.run([sys.executable, "-m", "benchmarks.suite", "--suite", "--help"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "--suite" in done.stdout and "opacus_ghost" in done.stdout


def test_timm_models_by_name_are_taken_as_timm_builds_them():
    """Every parameter trainable and clipped (cls_token, pos_embed too); BatchNorm
    converted to GroupNorm for every method alike."""
    model, _ = suite.build_model(suite.Case("vit_tiny", 2, img_size=32, overrides={"depth": 1}))
    engine = PrivacyEngine(model, 1.0, 1.0, 4)
    assert sorted(engine.covered_parameters) == sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert {"classifier.cls_token", "classifier.pos_embed"} <= set(engine.covered_parameters)
    model, inputs = suite.build_model(suite.Case("resnet18", 2, img_size=64, overrides={"layers": (1, 1, 1, 1)}))
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())
    engine = PrivacyEngine(model, 1.0, 1.0, 4)
    engine.backward(model(*inputs(2, torch.Generator().manual_seed(0))))
    assert engine.per_example_norms.shape == (2,)


def test_a_timm_swin_by_name_and_a_library_that_refuses_it():
    """Opacus refuses Swin's window attention (a trainable layer with buffers):
    the suite reports that and goes on; this engine clips it as timm builds it."""
    (result,) = suite.main(["--model", "swin_tiny_patch4_window7_224", "--img-size", "32", "--set", "patch_size=2",
                            "--set", "window_size=4", "--set", "embed_dim=8", "--set", "depths=(2,)",
                            "--set", "num_heads=(1,)", "--batch", "2", "--methods", "non_private,engine,opacus_ghost",
                            "--steps", "1", "--warmup", "0", "--device", "cpu"])
    methods = result["methods"]
    refused = methods["opacus_ghost"]["error"]
    assert refused.startswith("refused: ") and "WindowAttention" in refused
    assert methods["engine"]["flops"] > methods["non_private"]["flops"] > 0
    assert abs(methods["engine"]["flops_over_bound"] - 1) < 0.03


@pytest.mark.parametrize("model, options", [
    ("torchvision:mobilenet_v3_small", ["--set", "width_mult=0.25", "--img-size", "64"]),
    ("hf:CLIPVisionConfig", ["--set", "hidden_size=8", "--set", "num_hidden_layers=1", "--set",
                             "num_attention_heads=2", "--set", "intermediate_size=16", "--set", "patch_size=8",
                             "--img-size", "16"]),
])
def test_torchvision_and_transformers_models_by_name(model, options):
    (result,) = suite.main(["--model", model, *options, "--batch", "2", "--methods", "non_private,engine",
                            "--steps", "1", "--warmup", "0", "--device", "cpu"])
    methods = result["methods"]
    assert methods["engine"]["flops"] > methods["non_private"]["flops"] > 0
    assert methods["engine"]["added_syncs_per_micro_batch"] == 0


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="KEY=VALUE"):
        suite.main(["--model", "vip_base", "--device", "cpu", "--set", "depth"])
    with pytest.raises(ValueError, match="unknown --methods"):
        suite.main([*TINY_VIT, "--methods", "engine,fast"])
    with pytest.raises(ValueError, match="unknown model"):
        suite.main(["--model", "no_such_net", "--device", "cpu"])
    with pytest.raises(ValueError, match="unknown model library 'keras'"):
        suite.main(["--model", "keras:resnet", "--device", "cpu"])
    with pytest.raises(ValueError, match="not a transformers config class"):
        suite.main(["--model", "hf:CLIPVisionModel", "--device", "cpu"])
    with pytest.raises(ValueError, match="not in torchvision.models.list_models"):
        suite.main(["--model", "torchvision:no_such_net", "--device", "cpu"])
