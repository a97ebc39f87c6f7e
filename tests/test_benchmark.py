import importlib.util
from pathlib import Path

import pytest
import torch

from fl_core.metrics import training_flops_per_image

from conftest import TINY


def load_benchmark(name: str):
    """A script under benchmarks/ as a module."""
    spec = importlib.util.spec_from_file_location(name, Path(__file__).parents[1] / "benchmarks" / f"{name}.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


@pytest.mark.slow
def test_round_speed_benchmark_runs_every_loop_and_reports_ratios(capsys):
    bench = load_benchmark("round_speed")
    tiny = {**TINY, "method.creff_retrain_epochs": 2}
    sets = [f"{k}={v}" for k, v in tiny.items()]
    result = bench.main(["--profile", "smoke", "--repeats", "1", "--set", *sets[:2], "--set", *sets[2:]])
    assert {k: result["overrides"][k] for k in tiny} == {k: str(v) for k, v in tiny.items()}  # every --set counts
    for key in ("ratio_sequential_vs_reference", "ratio_vectorized_vs_reference", "ratio_clip2fl_vs_reference",
                "fraction_of_matmul_peak"):
        assert result[key] > 0
    assert result["images"] > 0 and set(result["seconds"]) == {"reference", "sequential", "vectorized", "clip2fl_reference", "clip2fl_ours"}
    assert result["profile_client_training"] == "sequential"  # smoke: auto, and no CUDA in the test environment
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("{")


def test_stacked_conv_benchmark_times_each_strategy_and_checks_its_gradients(capsys):
    result = load_benchmark("stacked_conv").main(["--device", "cpu", "--clients", "3", "--batch", "4", "--width", "0.125", "--repeats", "1",
                         "--precisions", "fp32", "--strategies", "grouped", "per_client"])
    keys = {f"fp32 {layout} {strategy}" for layout in ("contiguous", "channels-last") for strategy in ("grouped", "per_client")}
    assert set(result["seconds_per_step"]) == keys and all(t > 0 for t in result["seconds_per_step"].values())
    # one dense convolution per client computes what the grouped one does (float32 rounding apart)
    assert all(result["gradient_difference"][k] < 1e-4 for k in keys)
    assert result["gradient_difference"]["fp32 contiguous grouped"] == 0
    assert 0 < result["float32_rounding"] < 0.1  # grouped fp32 against the same step in float64
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("{")


def test_allocator_benchmark_times_both_settings_in_child_processes(capsys):
    result = load_benchmark("allocator").main(["--widths", "0.125", "--clients", "2", "--repeats", "1"])
    timing = result["seconds_per_step"]["width 0.125, 2 clients"]
    assert timing["default"] > 0 and timing["keep"] > 0
    assert result["ratio_keep_vs_default"]["width 0.125, 2 clients"] == timing["default"] / timing["keep"]
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("{")


def test_operation_traffic_counts_what_operations_read_and_write_and_no_views():
    traffic = load_benchmark("stacked_conv").OperationTraffic()
    a, b = torch.ones(1000), torch.ones(1000)
    with traffic:
        c = a + b  # reads 2 x 4 000 bytes, writes 4 000
        c.relu_()  # reads and writes c
        c.view(10, 100).t()  # views move nothing
        torch.ops.aten._unsafe_view(c, [100, 10])  # nor does a view that torch does not mark as one
    assert traffic.bytes == {"aten.add": 12_000, "aten.relu_": 8_000}


def test_stacked_conv_traffic_reports_flops_and_bytes_of_the_timed_step(capsys):
    bench = load_benchmark("stacked_conv")
    result = bench.main(["--device", "cpu", "--clients", "2", "--batch", "2", "--width", "0.125", "--repeats", "1",
                         "--precisions", "fp32", "--strategies", "grouped", "--layouts", "channels-last", "--traffic"])
    traffic = result["traffic"]
    step = traffic["steps"]["channels-last"]
    per_image = training_flops_per_image(bench.ResNet8(10, 1, 0.125), (1, 28, 28))
    assert step["gflop_per_step"] * 1e9 == per_image * 2 * 2  # one client's count: grouped ones are over-counted
    seconds = result["seconds_per_step"]["fp32 channels-last grouped"]
    assert step["gflops_per_second"] == pytest.approx(step["gflop_per_step"] / seconds)
    assert step["mb_per_step"] == pytest.approx(sum(step["mb_by_operation"].values()), rel=1e-3)
    assert {"aten.convolution", "aten.convolution_backward", "aten.native_batch_norm"} <= set(step["mb_by_operation"])
    assert traffic["matmul_gflops"] > 0 and all(v > 0 for v in traffic["copy_gb_per_second"].values())
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("{")
