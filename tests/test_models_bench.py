"""The benchmark entry point runs end to end on a tiny model (no timing asserted)."""

import pytest

from models import bench

TINY = ["--set", "img_size=32", "--set", "depth=1", "--set", "decoder_depth=1", "--set", "embed_dim=32",
        "--set", "decoder_embed_dim=32", "--set", "num_heads=2", "--set", "decoder_num_heads=2"]


@pytest.mark.parametrize("name, extra", [("dpcap_nano", ["--set", "vocab_size=500"]), ("vip_base", [])])
def test_bench_smoke(name, extra):
    result = bench.main(["--model", name, "--batch", "2", "--dtype", "fp32", "--device", "cpu",
                         "--steps", "1", "--warmup", "0", *TINY, *extra])
    assert result["gflop_per_example"] > 0 and result["device"].startswith("cpu")
    for mode in ("plain", "private"):
        assert result[mode]["step_s"] > 0 and 0 < result[mode]["mfu"] < 1
    assert result["private_over_plain"] > 0


def test_bench_rejects_bad_override():
    with pytest.raises(ValueError, match="KEY=VALUE"):
        bench.main(["--model", "vip_base", "--device", "cpu", "--set", "depth"])
