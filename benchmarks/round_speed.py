"""How fast one round's client work runs: our loops against the peers' way, in one run.

On the chosen profile's data and model (default ``offline``: MNIST-LT, ResNet-8 at width 0.125),
the clients sampled in round 1 train from the same global model, timed as

(a) reference: the peers' loop (CReFF/CLIP2FL code): a ``DataLoader`` over a dataset applying
    per-image torchvision transforms to PIL images, a deep-copied model and optimizer per client;
(b) our sequential engine (``fl.client_training=sequential``): data on the device, batched
    augmentation, one scratch model;
(c) our vectorized engine (``fl.client_training=vectorized``): all clients as one stacked model;
(d) one CLIP2FL round's client training and server classifier re-training, the peers' way (teacher
    forward on every batch, ``nn.Linear`` + autograd + ``DataLoader`` for the 300 re-training epochs)
    against ours (teacher logits computed once per image and reused, the clients trained as the
    profile trains them, the re-training written out).
    Ours is timed in steady state: the teacher logits of a client exist after its first round.

It prints images/s, the speed-ups against (a) and (d), and the FLOP/s of local training as a
fraction of the machine's fp32 matmul FLOP/s measured in the same run (the better of BLAS and
oneDNN/cuDNN); ``fraction_of_matmul_peak`` is that of the loop the profile's FedAvg runs use. The
last stdout line is one JSON object. Usage: ``python benchmarks/round_speed.py [--profile offline] [--local-epochs N] [--set k=v ...]``;
``--variants`` times (c) alone under every execution switch (``fl.cuda_graphs``, ``fl.channels_last``,
``fl.precision``, on CUDA ``fl.grouped_conv`` and ``fl.compile``), ``--kernels`` profiles one round of (c).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import itertools
import json
import os
import tempfile
import time
from datetime import datetime, timezone

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, TensorDataset
from torchvision import transforms

from fl_core.allocator import keep_freed_memory
from fl_core.config import make_config, parse_set_args
from fl_core.data.federated import build_federated_data
from fl_core.fl import Engine, client_generator, client_schedule, resolve_device
from fl_core.fl.engine import resolve_stacked_execution
from fl_core.methods import make_method
from fl_core.methods.base import Method
from fl_core.methods.clip2fl import PROMPT as CLIP2FL_PROMPT, kd_loss
from fl_core.methods.creff import retrain_classifier
from fl_core.results import device_description


def matmul_flops_per_second(device: torch.device, n: int = 2048, repeats: int = 10) -> dict[str, float]:
    """Best-of-``repeats`` fp32 ``n x n`` matmul throughput, two ways: ``torch.matmul`` (BLAS: MKL on
    CPU) and the same product as a 1x1 convolution (oneDNN on CPU, cuDNN on CUDA). The larger is
    the machine's practical peak: on AMD CPUs MKL runs its AVX2 code, about half of what oneDNN
    gets out of AVX-512, so a BLAS-only peak would flatter every fraction measured against it.
    On CUDA the convolution uses cuDNN's default TF32, as training's convolutions do."""
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    image, kernel = a.view(1, n, 1, n), b.view(n, n, 1, 1)
    if device.type == "cpu":
        image = image.contiguous(memory_format=torch.channels_last)
    rates = {}
    for name, product in (("blas", lambda: a @ b), ("conv1x1", lambda: F.conv2d(image, kernel))):
        best = float("inf")
        for _ in range(repeats + 2):
            tic = _sync_time(device)
            product()
            best = min(best, _sync_time(device) - tic)
        rates[name] = 2 * n**3 / best
    return rates


def copy_bandwidth(device: torch.device, nbytes: int, repeats: int = 20) -> float:
    """Bytes per second a plain copy of ``nbytes`` reads and writes (best of ``repeats``)."""
    src = torch.empty(nbytes // 4, device=device).uniform_()
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(repeats + 2):
        tic = _sync_time(device)
        dst.copy_(src)
        best = min(best, _sync_time(device) - tic)
    return 2 * src.numel() * 4 / best


def _sync_time(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter()


# -- the peers' way ---------------------------------------------------------------------------------
class PeerImageDataset(Dataset):
    """As the peers' code feeds clients: one image at a time through PIL and torchvision transforms
    (and, for CLIP2FL, the un-augmented image for the teacher)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, transform):
        self.images, self.labels, self.transform = images.cpu(), labels.cpu(), transform
        self.to_pil = transforms.ToPILImage()

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i):
        return self.transform(self.to_pil(self.images[i])), self.images[i], self.labels[i]


def peer_transform(pipeline, side: int):
    steps = [transforms.RandomCrop(side, padding=pipeline.crop_padding)] if pipeline.crop_padding else []
    steps += [transforms.RandomHorizontalFlip()] if pipeline.flip else []
    return transforms.Compose([*steps, transforms.ToTensor(), transforms.Normalize(pipeline.mean, pipeline.std)])


def peer_client_training(global_model: nn.Module, data, pipeline, device, f, teacher=None, kd=None) -> int:
    """One client's local epochs the peers' way; returns the images processed."""
    model = copy.deepcopy(global_model).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=f.lr, momentum=f.momentum, weight_decay=f.weight_decay)
    loader = DataLoader(PeerImageDataset(data.images, data.labels, peer_transform(pipeline, data.images.shape[-1])),
                        batch_size=f.batch_size, shuffle=True)
    seen = 0
    for _ in range(f.local_epochs):
        for x, raw, y in loader:
            x, y = x.to(device), y.to(device)
            _, logits = model(x)
            loss = F.cross_entropy(logits, y)
            if teacher is not None:
                with torch.no_grad():
                    teacher_logits = teacher(raw.to(device))  # on every batch of every epoch
                loss = loss + kd(logits, teacher_logits)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            seen += len(y)
    return seen


def peer_retrain_classifier(features: torch.Tensor, labels: torch.Tensor, num_classes: int, m) -> None:
    """CReFF's server re-training as its code runs it: nn.Linear, CrossEntropyLoss, SGD, DataLoader."""
    linear = nn.Linear(features.shape[1], num_classes).to(features.device)
    optimizer = torch.optim.SGD(linear.parameters(), lr=m.creff_retrain_lr)
    loader = DataLoader(TensorDataset(features, labels), batch_size=m.creff_retrain_batch, shuffle=True)
    for _ in range(m.creff_retrain_epochs):
        for x, y in loader:
            loss = F.cross_entropy(linear(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()


# -- the benchmark ------------------------------------------------------------------------------------
def timed(device, fn, repeats: int = 1) -> float:
    """Best of ``repeats`` wall-clock timings of ``fn()`` (the least disturbed by other load)."""
    best = float("inf")
    for _ in range(repeats):
        tic = _sync_time(device)
        fn()
        best = min(best, _sync_time(device) - tic)
    return best


def time_clip2fl_round(profile, overrides, data, clients, generators, scratch, device, repeats):
    """(d): one CLIP2FL round (client training with the teacher, then the server's classifier
    re-training) the peers' way and ours; returns both timings and that of the teacher logits' first
    visit (once per run)."""
    cfg_c = make_config(profile, {**overrides, "method.name": "clip2fl"})
    clip2fl = make_method(cfg_c)
    engine_c = Engine(cfg_c, clip2fl, data, scratch, device, progress=False)
    clip2fl.setup(engine_c)
    encoder = clip2fl.encoder(engine_c)
    text = encoder.class_embeddings(data.dataset.class_names, CLIP2FL_PROMPT)
    text = text.to(device)
    m, f = cfg_c.method, cfg_c.fl
    first_visit = timed(device, lambda: [clip2fl.teacher_logits(engine_c, k) for k in clients])

    def teacher(raw):
        return encoder.logit_scale * F.normalize(encoder.project_image(encoder._image_features(raw)), dim=-1).to(device) @ text.T

    def kd(logits, teacher_logits):
        return m.clip2fl_kd_weight * kd_loss(logits, teacher_logits, m.clip2fl_temperature)

    features = clip2fl.features.detach()
    labels = clip2fl.feature_labels(engine_c)
    fresh = nn.Linear(features.shape[1], data.num_classes).to(device)

    def peers_round():
        for k in clients:
            peer_client_training(engine_c.model, data.clients[k], data.pipeline, device, f, teacher, kd)
        peer_retrain_classifier(features, labels, data.num_classes, m)

    def our_round():  # the clients' training without CReFF's class gradients (the peers' round has none either)
        if engine_c.vectorized:
            Method.train_together(clip2fl, engine_c, clients, generators())
        else:
            for k, gen in zip(clients, generators()):
                Method.client_update(clip2fl, engine_c, k, gen)
        retrain_classifier(features, labels, fresh.weight.detach(), fresh.bias.detach(), torch.Generator().manual_seed(0),
                           epochs=m.creff_retrain_epochs, lr=m.creff_retrain_lr, batch_size=m.creff_retrain_batch)

    return timed(device, peers_round, repeats), timed(device, our_round, repeats), first_visit


def time_variants(engine: Engine, clients: list[int], generators, device: torch.device, n: int, images: int,
                  only: list[str] = ()) -> dict:
    """(c) under every combination of the execution switches that has the settings ``only``
    (e.g. ``fl.cuda_graphs=on``), each as its own warmed-up timing;
    the last stdout line is a JSON object whose ``fastest`` holds the fastest combination's ``--set``
    overrides. bf16 changes the arithmetic (and the fingerprint); the others do not."""
    engine.vectorized, base = True, engine.cfg
    seconds, cuda = {}, device.type == "cuda"
    # on a CPU, torch.compile of the stacked step was 0.83x eager (inductor, width 0.125) after 46 s of compiling
    cuda_only = ("off", "on") if cuda else ("off",)  # CUDA graphs, and compiling (see above)
    combinations = itertools.product(cuda_only, ("off", "on"), ("fp32", "bf16"),
                                     ("native", "triton") if cuda else ("native",), cuda_only)
    for graphs, layout, precision, kernel, compiled in combinations:
        switches = {"cuda_graphs": graphs, "channels_last": layout, "precision": precision, "grouped_conv": kernel,
                    "compile": compiled}
        key = " ".join(f"fl.{k}={v}" for k, v in switches.items())
        if (kernel == "triton" and layout == "off") or not set(only) <= set(key.split()):
            continue  # the Triton kernels read channels-last activations
        engine.cfg = dataclasses.replace(base, fl=dataclasses.replace(base.fl, **switches))
        engine.stacked_execution = resolve_stacked_execution(engine.cfg.fl, device)
        try:
            # warm-up; Triton compiles a kernel per new specialization (bucket sizes among them), and
            # torch.compile the step of every client with a full batch: the whole round
            warm = len(clients) if kernel == "triton" or compiled == "on" else 2
            engine.method.train_clients(engine, clients[:warm], generators()[:warm])
            seconds[key] = timed(device, lambda: engine.method.train_clients(engine, clients, generators()), n)
        except RuntimeError as error:  # reported, and the other combinations still timed
            print(f"(c) {key:<80} failed: {error}", flush=True)
            continue
        print(f"(c) {key:<80}{seconds[key]:>8.2f} s{images / seconds[key]:>10.0f} images/s", flush=True)
    engine.cfg = base
    fastest = min(seconds, key=seconds.get)
    result = {"device": device_description(device), "images": images, "vectorized_seconds": seconds,
              "fastest": fastest.split(), "speedup_of_fastest": seconds[next(iter(seconds))] / seconds[fastest]}
    print(json.dumps(result))
    return result


def profile_kernels(engine: Engine, clients: list[int], generators, device: torch.device, rows: int = 20) -> dict:
    """One round of (c) under ``torch.profiler``, eager (a CUDA graph replays the same kernels):
    the operations by self device time (on a CPU: self CPU time), and the totals as a JSON line."""
    from torch.profiler import ProfilerActivity, profile

    engine.vectorized = True
    engine.stacked_execution = {**engine.stacked_execution, "cuda_graphs": False}
    engine.method.train_clients(engine, clients, generators())  # warm-up
    cuda = device.type == "cuda"
    tic = _sync_time(device)
    with profile(activities=[ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if cuda else [])]) as prof:
        engine.method.train_clients(engine, clients, generators())
        wall = _sync_time(device) - tic
    events = prof.key_averages()
    device_time = "self_device_time_total" if cuda else "self_cpu_time_total"
    print(events.table(sort_by=device_time, row_limit=rows))
    result = {"device": device_description(device), "wall_seconds": wall,
              "busy_seconds": sum(getattr(e, device_time) for e in events) / 1e6,
              "operations": sum(e.count for e in events if e.key.startswith("aten::")),
              "stacked_execution": engine.stacked_execution, "precision": engine.cfg.fl.precision}
    print(json.dumps(result))
    return result


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", default="offline")
    parser.add_argument("--local-epochs", type=int, default=None, help="default: the profile's")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--repeats", type=int, default=3, help="time each loop this often, keep the best")
    parser.add_argument("--no-clip2fl", dest="clip2fl", action="store_false",
                        help="skip (d), which needs the CLIP-role encoder's weights")
    parser.add_argument("--variants", action="store_true",
                        help="time only (c), under every execution switch (fl.cuda_graphs, fl.grouped_conv and fl.compile on CUDA, "
                             "fl.channels_last, fl.precision), and name the fastest")
    parser.add_argument("--variants-with", nargs="*", default=[], metavar="KEY=VALUE",
                        help="with --variants: only the combinations with these settings, e.g. fl.cuda_graphs=on")
    parser.add_argument("--kernels", action="store_true",
                        help="profile one round of (c), eager, and print the operations taking the most device time")
    parser.add_argument("--set", action="extend", nargs="+", default=[], metavar="KEY=VALUE",
                        help="config overrides, as the CLI takes them")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as scratch:  # the engine's run folder, removed afterwards
        return benchmark(args, scratch)


def benchmark(args, scratch: str) -> dict:
    """Time the loops `args` asks for, print the table and the JSON line, return the JSON's dict."""
    overrides = {"device": args.device, **parse_set_args(args.set)}
    if args.local_epochs:
        overrides["fl.local_epochs"] = args.local_epochs
    cfg = make_config(args.profile, overrides)
    device = resolve_device(cfg.device)
    malloc = keep_freed_memory()  # as the engine does, before anything is timed: every loop runs under it
    torch.manual_seed(0)
    matmul = matmul_flops_per_second(device)
    peak = max(matmul.values())
    print(f"machine: {device_description(device)}, {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}, "
          f"malloc {malloc}; "
          f"fp32 matmul {peak / 1e9:.1f} GFLOP/s (BLAS {matmul['blas'] / 1e9:.1f}, as 1x1 convolution "
          f"{matmul['conv1x1'] / 1e9:.1f})")

    data = build_federated_data(cfg, device)
    f = cfg.fl
    clients = [int(k) for k in client_schedule(cfg.seed, cfg.data.num_clients, f.clients_per_round, 1)[0]]
    generators = lambda: [client_generator(cfg.seed, 1, k) for k in clients]  # noqa: E731
    images = sum(len(data.clients[k]) for k in clients) * f.local_epochs
    engine = Engine(cfg, make_method(cfg), data, scratch, device, progress=False)
    profile_mode = "vectorized" if engine.vectorized else "sequential"  # what the profile's FedAvg runs use
    print(f"{args.profile}: {len(clients)} clients x {f.local_epochs} local epoch(s), {images} images, "
          f"batch {f.batch_size}, {engine.arch} at width {cfg.model.width}")

    seconds = {}
    n = args.repeats
    if args.variants:
        return time_variants(engine, clients, generators, device, n, images, args.variants_with)
    if args.kernels:
        return profile_kernels(engine, clients, generators, device)
    seconds["reference"] = timed(device, lambda: [peer_client_training(engine.model, data.clients[k], data.pipeline, device, f)
                                                  for k in clients], n)
    for mode in ("sequential", "vectorized"):
        engine.vectorized = mode == "vectorized"
        engine.method.train_clients(engine, clients[:2], generators()[:2])  # warm-up (allocator, oneDNN kernels)
        seconds[mode] = timed(device, lambda: engine.method.train_clients(engine, clients, generators()), n)

    first_visit = None
    if args.clip2fl:
        seconds["clip2fl_reference"], seconds["clip2fl_ours"], first_visit = time_clip2fl_round(
            args.profile, overrides, data, clients, generators, scratch, device, n)

    flops = engine.train_flops_per_image * images
    rate = {k: images / seconds[k] for k in ("reference", "sequential", "vectorized")}
    result = {
        "date": datetime.now(timezone.utc).date().isoformat(),
        "machine": f"{device_description(device)}, {os.cpu_count()} CPUs",
        "profile": args.profile,
        "overrides": overrides,
        "clients": len(clients),
        "local_epochs": f.local_epochs,
        "images": images,
        "repeats": n,
        "malloc": malloc,
        "matmul_gflops": peak / 1e9,
        "matmul_gflops_by_way": {k: v / 1e9 for k, v in matmul.items()},
        "seconds": seconds,
        "images_per_second": rate,
        "ratio_sequential_vs_reference": seconds["reference"] / seconds["sequential"],
        "ratio_vectorized_vs_reference": seconds["reference"] / seconds["vectorized"],
        "ratio_vectorized_vs_sequential": seconds["sequential"] / seconds["vectorized"],
        "ratio_clip2fl_vs_reference": seconds["clip2fl_reference"] / seconds["clip2fl_ours"] if args.clip2fl else None,
        "clip2fl_teacher_first_visit_seconds": first_visit,
        "fraction_of_matmul_peak": flops / seconds[profile_mode] / peak,  # as the profile trains its clients
        "fraction_of_matmul_peak_sequential": flops / seconds["sequential"] / peak,
        "fraction_of_matmul_peak_vectorized": flops / seconds["vectorized"] / peak,
        "profile_client_training": profile_mode,
    }
    print(f"\n{'loop':<34}{'seconds':>9}{'images/s':>10}{'vs (a)':>8}{'of peak':>9}")
    for label, key in (("(a) reference (peers' loop)", "reference"), ("(b) ours, sequential", "sequential"),
                       ("(c) ours, vectorized", "vectorized")):
        print(f"{label:<34}{seconds[key]:>9.2f}{rate[key]:>10.0f}{seconds['reference'] / seconds[key]:>7.2f}x"
              f"{flops / seconds[key] / peak:>9.1%}")
    if args.clip2fl:
        print(f"{'(d) CLIP2FL round, peers way':<34}{seconds['clip2fl_reference']:>9.2f}")
        print(f"{'(d) CLIP2FL round, ours':<34}{seconds['clip2fl_ours']:>9.2f}{'':>10}"
              f"{result['ratio_clip2fl_vs_reference']:>7.2f}x")
        print(f"(teacher logits of these clients' images, first visit: {first_visit:.2f} s, once per run)")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
