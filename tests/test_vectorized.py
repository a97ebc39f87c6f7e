"""Clients trained together (one stacked model) equal clients trained one after another."""

import copy

import pytest
import torch

from fl_core.data import ImagePipeline, ImageSplit
from torch.func import functional_call

from fl_core.config import make_config
from fl_core.experiment import run_experiment
from fl_core.fl import SGDSettings, local_sgd, train_clients_vectorized
from fl_core.fl.engine import resolve_stacked_execution
from fl_core.fl.stacked import per_client, stacked_skeleton
from fl_core.methods.clip2fl import kd_loss
from fl_core.models import ResNet8, build_model

from conftest import NEEDS_CUDA, TEST_DEVICE, final_weights


def clients_of_sizes(sizes):
    g = torch.Generator().manual_seed(0)
    return [ImageSplit(torch.randint(0, 256, (n, 1, 12, 12), generator=g, dtype=torch.uint8), torch.arange(n) % 3)
            for n in sizes]


# how the stacked loop executes: none of it may change the arithmetic
EXECUTIONS = [pytest.param({"channels_last": False}, id="contiguous"),
              pytest.param({"channels_last": True}, id="channels_last"),
              pytest.param({"cuda_graphs": True}, id="graphs", marks=NEEDS_CUDA),
              pytest.param({"cuda_graphs": True, "channels_last": True}, id="graphs_channels_last", marks=NEEDS_CUDA),
              # fl_core's Triton convolutions (on a CPU, Triton's interpreter is too slow for whole runs:
              # test_grouped_conv.py checks one stacked step there)
              pytest.param({"grouped_conv": "triton", "channels_last": True}, id="triton", marks=NEEDS_CUDA),
              pytest.param({"grouped_conv": "triton", "cuda_graphs": True, "channels_last": True}, id="graphs_triton",
                           marks=NEEDS_CUDA),
              # the recurring step under torch.compile: traced and run by aot_eager on a CPU (inductor
              # would take a minute to compile there), inductor on a GPU
              pytest.param({"compile_backend": "aot_eager"}, id="compiled"),
              pytest.param({"compile_backend": "inductor", "cuda_graphs": True, "channels_last": True},
                           id="graphs_compiled_inductor", marks=NEEDS_CUDA)]


@pytest.mark.parametrize("execution", EXECUTIONS)
@pytest.mark.parametrize("momentum, weight_decay, prox_mu, distill", [(0.0, 0.0, 0.0, False), (0.9, 5e-4, 0.1, False),
                                                                      (0.0, 0.0, 0.0, True)])
def test_vectorized_clients_equal_sequential_ones(momentum, weight_decay, prox_mu, distill, execution, monkeypatch):
    if execution.get("grouped_conv") == "triton":
        pytest.importorskip("triton")
    # In float64, so that equality is tight: in float32 the two summation orders (grouped vs separate
    # convolutions) differ by ~1e-7, which many SGD steps on noise can amplify chaotically.
    device = TEST_DEVICE
    normalize = ImagePipeline.normalize
    monkeypatch.setattr(ImagePipeline, "normalize", lambda self, images: normalize(self, images).double())
    # sizes give different step counts and short last batches (37 = 16+16+5, 16, 50 = 3*16+2, 5); the
    # compiled step is every client's with a full batch, so there the smallest client has 21 = 16+5
    sizes = [37, 16, 50, 21 if "compile_backend" in execution else 5]
    clients = [data.to(device) for data in clients_of_sizes(sizes)]
    pipe = ImagePipeline((0.5,), (0.5,), crop_padding=1)
    torch.manual_seed(0)
    model = ResNet8(3, 1, 0.125).double().to(device)
    global_state = copy.deepcopy(model.state_dict())
    sgd = SGDSettings(epochs=3, batch_size=16, lr=0.05, momentum=momentum, weight_decay=weight_decay, prox_mu=prox_mu)

    def generators():
        return [torch.Generator().manual_seed(100 + k) for k in range(len(clients))]

    # distill: CLIP2FL's term against fixed per-image teacher logits, which clients trained together
    # read through indices into their datasets concatenated
    teachers = [torch.randn(len(data), 3, generator=torch.Generator().manual_seed(k), dtype=torch.float64).to(device)
                for k, data in enumerate(clients)]
    every = torch.cat(teachers)
    together = train_clients_vectorized(model, clients, pipe, generators(), sgd,
                                        (lambda logits, idx: kd_loss(logits, every[idx], 3.0)) if distill else None,
                                        **execution)
    assert all(torch.equal(model.state_dict()[k], global_state[k]) for k in global_state)  # global model untouched
    for data, gen, teacher, (state, stats) in zip(clients, generators(), teachers, together):
        alone = copy.deepcopy(model)
        reference = local_sgd(alone, data, pipe, gen, sgd,
                              (lambda logits, idx: kd_loss(logits, teacher[idx], 3.0)) if distill else None)
        assert (stats.steps, stats.num_samples) == (reference.steps, reference.num_samples)
        assert stats.mean_loss == pytest.approx(reference.mean_loss, rel=1e-12)
        expected = alone.state_dict()
        assert list(state) == list(expected)
        for key in expected:
            assert state[key].dtype == expected[key].dtype
            assert torch.allclose(state[key].double(), expected[key].double(), atol=1e-12, rtol=0), key


def test_vectorized_engine_run_equals_sequential_run(tiny_config, tmp_path, monkeypatch):
    # On CUDA (where fl.cuda_graphs=auto captures the steps), with cuDNN's TF32 off: it rounds
    # convolutions to 10-bit mantissas, which two runs' SGD amplify beyond float32's tolerances here.
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    records, weights = {}, {}
    for mode in ("sequential", "vectorized"):
        cfg = tiny_config(method__name="fedprox", fl__client_training=mode)
        records[mode] = run_experiment(cfg, tmp_path / mode, progress=False)
        weights[mode] = final_weights(tmp_path / mode)
    seq, vec = records["sequential"], records["vectorized"]
    assert seq["fingerprint"] == vec["fingerprint"]  # an execution choice, not a different experiment
    assert (seq["client_training"], vec["client_training"]) == ("sequential", "vectorized")
    for a, b in zip(seq["rounds"], vec["rounds"]):
        assert a["clients"] == b["clients"]
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-3)
        assert a["client_flops"] == b["client_flops"] and a["upload_bytes"] == b["upload_bytes"]
    # float32 rounding differs between the two (see above): close, not bitwise equal
    assert vec["final"]["top1"] == pytest.approx(seq["final"]["top1"], abs=0.02)
    for key in weights["sequential"]:  # within 5% of the tensor's scale (running variances grow past 1)
        a, b = weights["sequential"][key].float(), weights["vectorized"][key].float()
        gap, scale = (a - b).abs().max().item(), max(1.0, a.abs().max().item())
        assert gap <= 0.05 * scale, f"{key}: max |difference| {gap}, largest |value| {scale}"


def test_creff_clients_trained_together_equal_one_after_another(tiny_config, tmp_path):
    """CReFF's clients also upload per-class gradients of the re-trained classifier, drawn from their
    generators before their local training: the same draws, so the same gradients, either way."""
    records = {}
    for mode in ("sequential", "vectorized"):
        cfg = tiny_config(method__name="creff", fl__client_training=mode, method__creff_num_features=10,
                          method__creff_match_steps=5, method__creff_retrain_epochs=3, method__creff_grad_reps=2)
        records[mode] = run_experiment(cfg, tmp_path / mode, progress=False)
    seq, vec = records["sequential"], records["vectorized"]
    assert (seq["client_training"], vec["client_training"]) == ("sequential", "vectorized")
    for a, b in zip(seq["rounds"], vec["rounds"]):
        assert a["clients"] == b["clients"] and a["upload_bytes"] == b["upload_bytes"]
        assert a["client_flops"] == b["client_flops"]
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-3)
        assert a["feature_match_loss"] == pytest.approx(b["feature_match_loss"], rel=1e-3)
    assert vec["final"]["top1"] == pytest.approx(seq["final"]["top1"], abs=0.02)


def test_unknown_client_training_mode_is_rejected(tiny_config):
    with pytest.raises(ValueError, match="fl.client_training"):
        tiny_config(fl__client_training="parallel")


def test_execution_switches_are_validated_and_left_out_of_the_fingerprint(tiny_config):
    base = tiny_config()
    for key, value in (("fl__cuda_graphs", "off"), ("fl__channels_last", "on"), ("fl__precision", "fp32"),
                       ("fl__grouped_conv", "native")):
        assert tiny_config(**{key: value}).fingerprint() == base.fingerprint(), key
    assert tiny_config(fl__precision="bf16").fingerprint() != base.fingerprint()  # changes the arithmetic
    with pytest.raises(ValueError, match="fl.precision='fp16' is not valid; choose one of: bf16, fp32"):
        tiny_config(fl__precision="fp16")
    with pytest.raises(ValueError, match="fl.cuda_graphs=on needs a CUDA device"):
        tiny_config(fl__cuda_graphs="on", device="cpu")
    with pytest.raises(ValueError, match="fl.cuda_graphs"):
        tiny_config(fl__cuda_graphs="yes")
    with pytest.raises(ValueError, match="fl.grouped_conv=triton needs a CUDA device"):
        tiny_config(fl__grouped_conv="triton", device="cpu")
    with pytest.raises(ValueError, match="fl.grouped_conv='cudnn' is not valid; choose one of: auto, native, triton"):
        tiny_config(fl__grouped_conv="cudnn")


def test_the_recurring_step_compiles_once_per_run_and_only_it():
    """``compile_backend``: only the step of every client with a full batch is compiled, once; later
    steps and rounds reuse it (a compile per round or per bucket shape would cost more than it saves)."""
    torch._dynamo.reset()
    graphs = []

    def counting_backend(graph_module, example_inputs):
        graphs.append([tuple(t.shape) for t in example_inputs if isinstance(t, torch.Tensor)])
        return graph_module.forward

    clients = clients_of_sizes([37, 16, 50, 21])  # buckets of 4, 3, 2 and 1 members, full and short batches
    pipe = ImagePipeline((0.5,), (0.5,), crop_padding=1)
    model = ResNet8(3, 1, 0.125)
    for round_seed in range(2):  # settings made anew each round, as the engine does
        sgd = SGDSettings(epochs=2, batch_size=16, lr=0.05)
        train_clients_vectorized(model, clients, pipe, [torch.Generator().manual_seed(round_seed * 10 + k) for k in range(4)],
                                 sgd, compile_backend=counting_backend)
    assert len(graphs) == 1
    assert (16, 4 * 1, 12, 12) in graphs[0]  # the stacked images of 4 members, 16 each


def test_compile_is_validated_resolved_and_left_out_of_the_fingerprint(tiny_config):
    base = tiny_config(fl__client_training="vectorized")
    assert tiny_config(fl__client_training="vectorized", fl__compile="on").fingerprint() == base.fingerprint()
    with pytest.raises(ValueError, match="fl.compile='yes' is not valid; choose one of: auto, off, on"):
        tiny_config(fl__compile="yes")
    with pytest.raises(ValueError, match="fl.compile=on compiles the step of clients trained together"):
        tiny_config(fl__compile="on", fl__client_training="sequential")
    for switch, backend in (("on", "inductor"), ("auto", None), ("off", None)):
        fl = tiny_config(fl__client_training="vectorized", fl__compile=switch).fl
        assert resolve_stacked_execution(fl, torch.device("cpu"))["compile_backend"] == backend


def test_triton_convolutions_need_cuda_and_triton(tiny_config, monkeypatch):
    fl = tiny_config(fl__grouped_conv="auto").fl
    fl.grouped_conv = "triton"  # as a config for a CUDA machine would have it
    with pytest.raises(ValueError, match="fl.grouped_conv=triton needs a CUDA device"):
        resolve_stacked_execution(fl, torch.device("cpu"))
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *args: None)
    with pytest.raises(ValueError, match="needs the triton package"):
        resolve_stacked_execution(fl, torch.device("cuda"))


def test_cuda_graphs_need_cuda():
    clients = clients_of_sizes([20])
    with pytest.raises(ValueError, match="cuda_graphs needs the clients' data on a CUDA device"):
        train_clients_vectorized(ResNet8(3, 1, 0.125), clients, ImagePipeline((0.5,), (0.5,)),
                                 [torch.Generator().manual_seed(0)], SGDSettings(1, 16, 0.1), cuda_graphs=True)


def test_bf16_autocast_trains_both_ways_alike():
    """``fl.precision=bf16``: the forward pass in bfloat16 (losses within bf16's rounding of fp32's),
    alike for clients trained together and alone; the weights stay float32."""
    device = TEST_DEVICE
    clients = [data.to(device) for data in clients_of_sizes([37, 16])]
    pipe = ImagePipeline((0.5,), (0.5,), crop_padding=1)
    torch.manual_seed(0)
    model = ResNet8(3, 1, 0.125).to(device)
    losses = {}
    for precision in ("fp32", "bf16"):
        sgd = SGDSettings(epochs=2, batch_size=16, lr=0.05, precision=precision)
        together = train_clients_vectorized(model, clients, pipe, [torch.Generator().manual_seed(k) for k in range(2)], sgd)
        alone = [local_sgd(copy.deepcopy(model), data, pipe, torch.Generator().manual_seed(k), sgd)
                 for k, data in enumerate(clients)]
        for (state, stats), reference in zip(together, alone):
            assert stats.mean_loss == pytest.approx(reference.mean_loss, rel=0.02)
            assert all(t.dtype in (torch.float32, torch.int64) for t in state.values())
        losses[precision] = [stats.mean_loss for _, stats in together]
    assert losses["bf16"] != losses["fp32"]  # it did run in bf16
    assert losses["bf16"] == pytest.approx(losses["fp32"], rel=0.03)


@pytest.mark.parametrize("arch", ["resnet8", "resnet8_clip2fl", "resnet50"])
def test_stacked_model_computes_every_client_as_its_own_model(arch):
    """Clients with different weights, run as one stacked model, give each client's own outputs and
    update each client's own BatchNorm running statistics. In float64: ResNet-50's late layers see
    1x1 maps here, whose batch statistics over 4 images amplify float32 rounding."""
    clients, batch, channels, side = 3, 4, 2, 16
    cfg = make_config("smoke", {"model.arch": arch, "model.width": 0.125})
    models = [build_model(cfg.model, "mnist", 5, channels, seed=k, projection_dim=6).double() for k in range(clients)]
    stack = {n: torch.stack([m.state_dict()[n] for m in models]) for n in models[0].state_dict()}
    x = torch.randn(clients, batch, channels, side, side, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    features, logits = functional_call(stacked_skeleton(models[0]), stack,
                                       (x.transpose(0, 1).reshape(batch, clients * channels, side, side),))
    for k, model in enumerate(models):
        own_features, own_logits = model.train()(x[k])
        assert torch.allclose(per_client(logits, clients)[k], own_logits, atol=1e-10)
        assert torch.allclose(per_client(features, clients)[k], own_features, atol=1e-10)
        for name, value in model.state_dict().items():  # running statistics moved as the client's own
            assert torch.equal(stack[name][k], value) if name.endswith("num_batches_tracked") else \
                torch.allclose(stack[name][k], value, atol=1e-12), name


def test_stacking_a_model_with_an_unknown_layer_says_which():
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.GroupNorm(2, 4))
    with pytest.raises(TypeError, match=r"layer '1' \(GroupNorm\)"):
        stacked_skeleton(model)


def test_host_to_device_copies_do_not_grow_with_the_steps(monkeypatch):
    """On CUDA every host-to-device copy is a synchronization: the training loops move each client's
    drawn steps once, not per step. Counted here as ``Tensor.to`` calls for 1 and 4 local epochs."""
    calls = []
    to = torch.Tensor.to
    monkeypatch.setattr(torch.Tensor, "to", lambda self, *a, **k: calls.append(1) or to(self, *a, **k))
    clients = clients_of_sizes([37, 16, 50, 5])
    pipe = ImagePipeline((0.5,), (0.5,), crop_padding=1, flip=True)
    model = ResNet8(3, 1, 0.125)

    def copies(train, epochs):
        calls.clear()
        train(SGDSettings(epochs=epochs, batch_size=16, lr=0.05))
        return len(calls)

    def together(sgd):
        train_clients_vectorized(model, clients, pipe, [torch.Generator().manual_seed(k) for k in range(4)], sgd)

    def alone(sgd):
        local_sgd(copy.deepcopy(model), clients[0], pipe, torch.Generator().manual_seed(0), sgd)

    for train in (together, alone):
        assert copies(train, 1) == copies(train, 4)


def test_a_layer_stacking_does_not_know_is_named():
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.GroupNorm(2, 4), torch.nn.ReLU())
    with pytest.raises(TypeError, match=r"cannot train clients of Sequential together: its layer '1' \(GroupNorm\)"):
        stacked_skeleton(model)
    circular = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1, padding_mode="circular"))
    with pytest.raises(TypeError, match="zero-padded convolutions only, not padding_mode='circular'"):
        stacked_skeleton(circular)
