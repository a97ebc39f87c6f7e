"""How clients trained together could run their convolutions: one training step (forward and
backward) of K stacked ResNet-8s (``fl_core.fl.stacked``) with

- ``grouped``: one grouped convolution over all clients, what the engine does (cuDNN's/oneDNN's
  default algorithm choice),
- ``grouped+benchmark``: the same with ``torch.backends.cudnn.benchmark`` (CUDA only; cuDNN times
  its algorithms and keeps the fastest, a choice that can differ between runs),
- ``per_client``: one dense convolution per client on its channel block, outputs concatenated,
- ``per_client+streams``: the same, each client's on its own CUDA stream (CUDA only),
- ``triton``: fl_core's Triton grouped convolution (``fl_core.fl.grouped_conv``, CUDA only), which
  reads each client's channel block in place (``fl.grouped_conv=triton``),
- ``grouped+compile``: grouped, with the forward pass and loss under ``torch.compile`` (inductor
  fuses BatchNorm, ReLU and the residual additions, forward and backward; compile time printed apart),
- ``triton+compile``: the Triton convolutions with the rest under ``torch.compile`` likewise,

in fp32 and bf16 autocast, contiguous and channels-last. ``--traffic`` adds what the fp32 grouped
step does per second: FLOPs against the machine's matmul peak, and the bytes its operations read and
write against the bandwidth of a plain copy (``OperationTraffic``). On CUDA each step is captured as
a CUDA graph and replayed (as ``fl.cuda_graphs`` does), so launch overhead does not hide kernel time.
Prints milliseconds per step, the ratio against ``grouped`` in the same layout and precision, and
how far the step's weight gradients are from grouped's (largest difference over the largest gradient
magnitude, per tensor) and, when more than one strategy is timed, how far float32 grouped is from
the same step in float64: the scale to read them on. It is not 1e-7: an activation within rounding
of zero can fall on the other side of a ReLU, which moves that client's gradients by far more
(ResNet-8 at width 0.125 with 8 clients: 3e-2, with 1 or 2: 4e-6; at width 1: 5e-2). Two float32
strategies can differ so too. The last stdout line is a JSON object. Measured (benchmarks/README.md): on
an H100 grouped is the fastest in every layout and precision; on 2 CPU cores per-client is
0.67-0.71x grouped at width 0.125 and 1.00-1.04x at width 1. So the engine keeps grouped
convolutions.

    python benchmarks/stacked_conv.py --device cuda [--clients 8] [--batch 32] [--width 1] [--threads N] [--traffic]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path
from unittest import mock

import torch
import torch.nn.functional as F
from torch.func import functional_call
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from fl_core.allocator import keep_freed_memory
from fl_core.fl.stacked import _StackedConv2d, stacked_skeleton
from fl_core.metrics import training_flops_per_image
from fl_core.models import ResNet8


def _per_client(streams=None):
    """A ``_StackedConv2d.forward`` that runs one dense convolution per client; with ``streams``,
    client k's on ``streams[k]`` (unbind/chunk rather than indexing: their backward is one
    stack/cat, not one scatter per client)."""
    def forward(self, x):
        clients = self.weight.shape[0]
        main = torch.cuda.current_stream(x.device) if streams else None
        outputs = []
        for k, (x_k, w_k) in enumerate(zip(x.chunk(clients, dim=1), self.weight.unbind(0))):
            if streams:
                streams[k].wait_stream(main)
            with torch.cuda.stream(streams[k]) if streams else contextlib.nullcontext():
                out = F.conv2d(x_k, w_k, None, self.stride, self.padding, self.dilation, self.groups)
            if streams:
                out.record_stream(main)
            outputs.append(out)
        for stream in streams or ():
            main.wait_stream(stream)
        return torch.cat(outputs, dim=1)
    return forward


def gradient_distance(grads: list[torch.Tensor], reference: list[torch.Tensor]) -> float:
    """Largest difference over the largest reference magnitude, per tensor, the worst tensor."""
    return max(float((g.double() - r.double()).abs().max() / r.double().abs().max().clamp_min(1e-30))
               for g, r in zip(grads, reference))


def make_step(device, clients: int, batch: int, width: float, strategy: str, precision: str, channels_last: bool):
    """One forward+backward step of ``clients`` stacked ResNet-8s on a fixed random batch: a function
    returning the weight gradients (the weights are not updated), and one client's plain model."""
    torch.manual_seed(0)
    dtype = torch.float64 if precision == "fp64" else torch.float32  # fp64: the same values, to measure rounding
    model = ResNet8(10, 1, width).to(device, dtype)
    skeleton = stacked_skeleton(model, "triton" if strategy.startswith("triton") else "native")
    params = {n: p.detach().unsqueeze(0).repeat(clients, *[1] * p.dim()).requires_grad_(True)
              for n, p in model.named_parameters()}
    buffers = {n: b.unsqueeze(0).repeat(clients, *[1] * b.dim()) for n, b in model.named_buffers()}
    x = torch.randn(batch, clients, 28, 28, device=device).to(dtype)
    y = torch.randint(0, 10, (batch * clients,), device=device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    weights = list(params.values())

    def loss_of():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            _, logits = functional_call(skeleton, (params, buffers), (x,))
        return F.cross_entropy(logits.to(dtype).view(batch, clients, -1).transpose(0, 1).reshape(-1, 10), y)

    loss = torch.compile(loss_of, dynamic=False) if strategy.endswith("compile") else loss_of
    return (lambda: torch.autograd.grad(loss(), weights)), model


def time_step(device, clients: int, batch: int, width: float, strategy: str, precision: str, channels_last: bool,
              repeats: int) -> tuple[float, list[torch.Tensor]]:
    """Seconds per forward+backward step of the stacked model (mean over ``repeats``), and the
    step's weight gradients (the same every step: the weights are not updated)."""
    step, _ = make_step(device, clients, batch, width, strategy, precision, channels_last)
    cuda = device.type == "cuda"
    patch = contextlib.nullcontext()
    if strategy.startswith("per_client"):
        streams = [torch.cuda.Stream(device) for _ in range(clients)] if strategy.endswith("streams") else None
        patch = mock.patch.object(_StackedConv2d, "forward", _per_client(streams))
    benchmark = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = strategy == "grouped+benchmark"
    try:
        with patch:
            tic = time.perf_counter()
            grads = step()  # warm-up; compiles with torch.compile, timed apart
            if strategy.endswith("compile"):
                print(f"  (torch.compile of {precision}{' channels-last' if channels_last else ''}: "
                      f"{time.perf_counter() - tic:.1f} s)", flush=True)
            if not cuda:
                tic = time.perf_counter()
                for _ in range(repeats):
                    step()
                return (time.perf_counter() - tic) / repeats, grads
            side = torch.cuda.Stream(device)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):
                for _ in range(3):  # warm-up (and cuDNN's benchmarking) before capture
                    step()
            torch.cuda.current_stream(device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                step()
            graph.replay()
            torch.cuda.synchronize(device)
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(repeats):
                graph.replay()
            stop.record()
            torch.cuda.synchronize(device)
            return start.elapsed_time(stop) / 1e3 / repeats, grads
    finally:
        torch.backends.cudnn.benchmark = benchmark


class OperationTraffic(TorchDispatchMode):
    """Bytes each dispatched operation reads and writes: its distinct input tensors and its distinct
    output tensors, each once (an in-place operation's tensor is read and written). Views and
    allocations move nothing and are left out. So this is what an unfused implementation moves at
    least if no tensor stayed in cache from one operation to the next."""

    def __init__(self):
        super().__init__()
        self.bytes: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs, outputs = _distinct_tensors((args, kwargs or {})), _distinct_tensors(out)
        # an out-of-place operation whose outputs live in its inputs' storage is a view (_unsafe_view)
        aliasing = not func._schema.is_mutable and {k[0] for k in outputs} <= {k[0] for k in inputs}
        metadata_only = func.is_view or torch.Tag.inplace_view in func.tags or func.overloadpacket in _ALLOCATIONS
        if outputs and not aliasing and not metadata_only:
            name = str(func.overloadpacket)
            self.bytes[name] = self.bytes.get(name, 0) + sum(inputs.values()) + sum(outputs.values())
        return out


_ALLOCATIONS = (torch.ops.aten.empty, torch.ops.aten.empty_like, torch.ops.aten.empty_strided)  # touch no memory


def _distinct_tensors(tree) -> dict[tuple, int]:
    """{(storage, offset, shape): bytes} of the tensors in ``tree``."""
    return {(t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape)): t.numel() * t.element_size()
            for t in tree_leaves(tree) if isinstance(t, torch.Tensor)}


def step_traffic(device, clients: int, batch: int, width: float, channels_last: bool, seconds: float) -> dict:
    """What one fp32 grouped step of ``seconds`` does per second: FLOPs (counted on one client's
    model: ``FlopCounterMode`` counts a grouped convolution's weight gradient ``groups`` times over in
    torch 2.14) and the bytes its operations move (``OperationTraffic``)."""
    step, model = make_step(device, clients, batch, width, "grouped", "fp32", channels_last)
    step()
    counter = OperationTraffic()
    with counter:
        step()
    flops = training_flops_per_image(model, (1, 28, 28)) * clients * batch
    moved = sum(counter.bytes.values())
    return {"gflop_per_step": flops / 1e9, "mb_per_step": moved / 1e6, "gflops_per_second": flops / seconds / 1e9,
            "gb_per_second": moved / seconds / 1e9,
            "mb_by_operation": {k: v / 1e6 for k, v in sorted(counter.bytes.items(), key=lambda kv: -kv[1])}}


def machine_traffic(device, args, results: dict) -> dict:
    """``step_traffic`` of every timed fp32 grouped layout, printed against the machine's fp32 matmul
    peak and copy bandwidth (``round_speed``'s measures; the copy at the size of the step's largest
    activation, and at 256 MB, beyond any cache)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from round_speed import copy_bandwidth, matmul_flops_per_second

    peak = max(matmul_flops_per_second(device).values())
    largest = args.batch * args.clients * max(1, round(64 * args.width)) * 28 * 28 * 4
    bandwidth = {"activation": copy_bandwidth(device, largest), "256 MB": copy_bandwidth(device, 256 * 2**20, 5)}
    print(f"machine: fp32 matmul {peak / 1e9:.1f} GFLOP/s; copy {bandwidth['activation'] / 1e9:.1f} GB/s at "
          f"{largest / 1e6:.1f} MB, {bandwidth['256 MB'] / 1e9:.1f} GB/s at 256 MB (read + written)")
    layouts = {}
    for layout in args.layouts:
        key = f"fp32 {layout} grouped"
        if key not in results:
            continue
        t = layouts[layout] = step_traffic(device, args.clients, args.batch, args.width, layout == "channels-last",
                                           results[key])
        top = ", ".join(f"{name.removeprefix('aten.')} {mb:.0f}" for name, mb in list(t["mb_by_operation"].items())[:4])
        print(f"{key:<44}{t['gflop_per_step']:.2f} GFLOP, {t['gflops_per_second']:.1f} GFLOP/s "
              f"({t['gflops_per_second'] * 1e9 / peak:.0%} of peak); its operations move {t['mb_per_step']:.0f} MB, "
              f"{t['gb_per_second']:.1f} GB/s ({t['gb_per_second'] * 1e9 / bandwidth['256 MB']:.0%} of the 256 MB copy's); "
              f"MB by operation: {top}")
    return {"matmul_gflops": peak / 1e9, "copy_gb_per_second": {k: v / 1e9 for k, v in bandwidth.items()}, "steps": layouts}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--width", type=float, default=1.0)
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--strategies", nargs="*", default=None, metavar="NAME",
                        help="default: grouped, per_client, and on CUDA grouped+benchmark, per_client+streams and triton; "
                             "grouped+compile and triton+compile only when named")
    parser.add_argument("--precisions", nargs="*", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    parser.add_argument("--layouts", nargs="*", default=["contiguous", "channels-last"],
                        choices=["contiguous", "channels-last"])
    parser.add_argument("--threads", type=int, default=0, help="torch's CPU threads (0: its default, one per core)")
    parser.add_argument("--traffic", action="store_true",
                        help="also: FLOP/s and bytes/s of the fp32 grouped step against the machine's matmul peak and copy bandwidth")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    malloc = keep_freed_memory()  # as the engine does
    cuda = device.type == "cuda"
    strategies = args.strategies or ["grouped", "per_client"] + (["grouped+benchmark", "per_client+streams", "triton"]
                                                                  if cuda else [])
    print(f"{args.clients} stacked ResNet-8s at width {args.width}, batch {args.batch} each, 28x28x1, "
          f"one forward+backward step on {torch.cuda.get_device_name(device) if cuda else 'CPU'}"
          f"{' (CUDA graph replays)' if cuda else f', torch threads {torch.get_num_threads()}'}, malloc {malloc}")
    results, differences, reference, gradients = {}, {}, {}, {}
    for precision in args.precisions:
        for channels_last in [layout == "channels-last" for layout in args.layouts]:
            layout = f"{precision} {'channels-last' if channels_last else 'contiguous'}"
            for strategy in strategies:
                key = f"{layout} {strategy}"
                try:
                    results[key], grads = time_step(device, args.clients, args.batch, args.width, strategy, precision,
                                                    channels_last, args.repeats)
                except RuntimeError as error:
                    print(f"{key:<44} failed: {str(error).splitlines()[0]}", flush=True)
                    continue
                gradients[key] = grads
                reference.setdefault(layout, grads)  # the first strategy's (grouped, unless told otherwise)
                differences[key] = gradient_distance(grads, reference[layout])
                ratio = results[f"{layout} grouped"] / results[key] if f"{layout} grouped" in results else float("nan")
                print(f"{key:<44}{results[key] * 1e3:>9.3f} ms {ratio:>6.2f}x grouped   gradients "
                      f"{differences[key]:.1e} from the first", flush=True)
    rounding = None
    if len(strategies) > 1:  # the scale their gradient differences are read on (see the module docstring)
        _, exact = time_step(device, args.clients, args.batch, args.width, "grouped", "fp64", False, 1)
        single = gradients.get("fp32 contiguous grouped") or time_step(
            device, args.clients, args.batch, args.width, "grouped", "fp32", False, 1)[1]
        rounding = gradient_distance(single, exact)
        print(f"float32 rounding at this size: contiguous grouped fp32 gradients {rounding:.1e} from float64's")
    fastest = min(results, key=results.get)
    summary = {"device": torch.cuda.get_device_name(device) if cuda else "cpu", "clients": args.clients,
               "batch": args.batch, "width": args.width, "threads": torch.get_num_threads(), "malloc": malloc, "seconds_per_step": results, "fastest": fastest,
               "gradient_difference": differences, "float32_rounding": rounding}
    if args.traffic:
        summary["traffic"] = machine_traffic(device, args, results)
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
