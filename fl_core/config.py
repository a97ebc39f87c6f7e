"""Typed experiment configuration: dataclasses, named profiles, flat overrides, validation.

A config is built as ``defaults <- profile overlay <- user overrides``. Overlays and overrides
are flat dicts keyed like ``"data.alpha"`` (what papermill and ``--set`` pass). Every value is
checked up front; a bad one raises ``ValueError`` naming the field, the value and what is valid.
"""

from __future__ import annotations

import ast
import copy
import dataclasses
import difflib
import hashlib
import inspect
import io
import json
import textwrap
import tokenize
import types
import typing
from dataclasses import dataclass, field


@dataclass(frozen=True)
class DatasetFacts:
    """What the config needs to know about a dataset without loading it."""

    num_classes: int
    train_size: int
    already_long_tailed: bool = False
    heldout_split: bool = False  # has a split of its own no client sees (then the web pool ignores the long tail)


DATASETS: dict[str, DatasetFacts] = {
    "mnist": DatasetFacts(num_classes=10, train_size=50_000, heldout_split=True),
    "cifar10": DatasetFacts(num_classes=10, train_size=50_000),
    "cifar100": DatasetFacts(num_classes=100, train_size=50_000),
    "imagenet_lt": DatasetFacts(num_classes=1000, train_size=115_846, already_long_tailed=True),
}
# your own images: data.root holds train/<class>/* and test/<class>/* (torchvision's ImageFolder layout)
IMAGE_FOLDER = "imagefolder"


def dataset_facts(d: "DataConfig") -> DatasetFacts:
    """``DATASETS[d.dataset]``, or for ``imagefolder`` what the folders under ``d.root`` hold; its
    images count as long-tailed already at ``imbalance_factor`` 1 (kept as they are: your data's own
    tail), while a larger factor samples the exponential long tail from them as for CIFAR."""
    if d.dataset != IMAGE_FOLDER:
        return DATASETS[d.dataset]
    from fl_core.data.folders import image_folder_classes

    classes = image_folder_classes(d.root, "train")
    return DatasetFacts(num_classes=len(classes), train_size=sum(len(files) for files in classes.values()),
                        already_long_tailed=d.imbalance_factor == 1)


def fixed_long_tail(dataset: str) -> bool:
    """Whether the dataset's own lists fix its long tail (``imagenet_lt``), so that
    ``data.imbalance_factor`` does not apply to it (and must stay 1)."""
    return dataset in DATASETS and DATASETS[dataset].already_long_tailed


# datasets whose class names reach the teachers as other text since 2026-12-05 (``Dataset.prompt_names``:
# underscores as spaces; ImageNet-LT's names from open_clip's list instead of class_0...): results and
# stage 1s on them from before carry other hashes, so they are computed again rather than reused
CLASS_TEXT_REVISED = ("cifar100", "imagenet_lt", IMAGE_FOLDER)
# the same for a method whose results a code change altered: its revision joins its runs' fingerprint
# (clip2fl 2: the teacher logits' prompt is "a photo of a {}", as in CLIP2FL's code; it had a full stop)
METHOD_REVISIONS = {"clip2fl": 2}


def data_content(d: "DataConfig") -> dict:
    """What a result's hash needs of the data besides its settings: for ``imagefolder``, whose folder
    may hold other images later, a signature of the files; for datasets in ``CLASS_TEXT_REVISED``,
    how their class names become text; nothing else for the fixed datasets."""
    content = {"data.class_text": 2} if d.dataset in CLASS_TEXT_REVISED else {}
    if d.dataset == IMAGE_FOLDER:
        from fl_core.data.folders import image_folder_signature

        content["data.images"] = image_folder_signature(d.root)
    return content


PARTITIONS = ("creff", "dirichlet", "iid")
AUGMENT_PER = ("image", "batch")
METHODS = ("fedavg", "fedprox", "creff", "clip2fl", "mllm_fl")
LAMBDA_SCHEDULES = ("cosine", "linear", "constant")
ALIGN_ROUNDS = ("every", "last")
ALIGN_SELECT = ("random", "confident")
ALIGN_PARAMS = ("all", "classifier")
ARCHS = ("auto", "resnet8", "resnet8_clip2fl", "resnet50")
DEVICES = ("auto", "cpu", "cuda")
CLIENT_TRAINING = ("auto", "sequential", "vectorized")
SWITCHES = ("auto", "on", "off")
GROUPED_CONV = ("auto", "native", "triton")
PRECISIONS = ("fp32", "bf16")
# settings that change how a run executes, not its results (left out of the fingerprint)
EXECUTION_ONLY = ("profile", "fl.client_training", "fl.cuda_graphs", "fl.channels_last", "fl.grouped_conv", "fl.compile")
# settings added after runs were recorded: left out of the fingerprint at these values, so that
# those runs keep their fingerprints
FINGERPRINT_SINCE = {"fl.precision": "fp32", "cpu_threads": 0, "data.augment_per": "image"}

MLLM_BACKENDS = ("simulated", "hf")
CLIP_BACKENDS = ("offline", "open_clip")


def omitted_from_fingerprint(key: str, value) -> bool:
    """Whether a setting added after runs were recorded is at the value those runs had
    (``FINGERPRINT_SINCE``), and so left out of the hashes that name results."""
    return key in FINGERPRINT_SINCE and value == FINGERPRINT_SINCE[key]


@dataclass
class DataConfig:
    dataset: str = "mnist"  # mnist (embedded), cifar10, cifar100, imagenet_lt, or imagefolder (your own images)
    root: str = "data"  # where cifar10/cifar100/imagenet_lt/imagefolder live (torchvision layout / LT lists / folders)
    download: bool = False  # opt-in download of CIFAR through torchvision
    imbalance_factor: float = 100.0  # n_max / n_min of the exponential long tail; 1 = balanced
    num_clients: int = 20  # clients the training set is split across
    alpha: float = 0.5  # Dirichlet concentration of the non-IID split
    partition: str = "creff"  # creff (the public CReFF/CLIP2FL code's split), dirichlet (NIID-Bench style) or iid
    # 'dirichlet' partitioner: redraw until every client has this many (the default: at most the average client size)
    min_client_size: int = 10
    train_limit: int = 0  # 0 = whole training split, else only its first N images (small profiles)
    test_limit: int = 0  # 0 = whole test split, else a class-stratified subset of N images
    augment: bool = True  # random crop (+ flip where the dataset allows) on the training device
    # 'image': crop offset and flip drawn per image; 'batch': one draw for a whole batch, as CReFF's and
    # CLIP2FL's code do (torchvision's transforms applied to a batch tensor)
    augment_per: str = "image"
    image_size: int = 0  # 0 = native size (ImageNet-LT: 112, imagefolder: 32); the side images are resized to
    many_threshold: int = 100  # classes with more training images are 'many'
    few_threshold: int = 20  # classes with fewer training images are 'few'
    # Server-side open data no client sees: 'heldout' (MNIST validation split; for CIFAR the training
    # images the long tail dropped), or a path: a folder of images (optional captions.jsonl) or a
    # glob of WebDataset/img2dataset .tar shards.
    web_pool: str = "heldout"
    web_pool_limit: int = 0  # 0 = the whole pool, else its first N images


@dataclass
class ModelConfig:
    arch: str = "auto"  # auto = resnet8 for small images, resnet50 for ImageNet-LT
    width: float = 1.0  # channel multiplier of ResNet-8 (1.0 = CReFF's 64/128/256)


@dataclass
class FLConfig:
    rounds: int = 200  # communication rounds
    clients_per_round: int = 8  # sampled each round with the peers' RandomState(seed).choice stream
    local_epochs: int = 10  # epochs of local SGD per client and round
    batch_size: int = 32  # the clients' batch size
    lr: float = 0.1  # the clients' SGD learning rate
    momentum: float = 0.0  # the clients' SGD momentum
    weight_decay: float = 0.0  # the clients' SGD weight decay
    eval_every: int = 1  # evaluate the global model every N rounds (and always after the last)
    eval_batch_size: int = 500  # images per forward pass when evaluating (does not change results)
    # how a round's clients are trained: one after another, all at once (one stacked model), or auto
    # (at once on CUDA); equal results within float tolerance, so not part of the fingerprint
    client_training: str = "auto"
    # clients trained together: replay each recurring step from a CUDA graph (auto: on CUDA)
    cuda_graphs: str = "auto"
    # clients trained together: their batches laid out channels-last (auto: on CPU, where oneDNN's
    # grouped convolutions gain)
    channels_last: str = "auto"
    # their grouped convolutions: torch's (cuDNN, oneDNN), or fl_core's Triton kernels (CUDA only);
    # auto: torch's
    grouped_conv: str = "auto"
    # their recurring step's forward pass and loss under torch.compile (inductor fuses BatchNorm,
    # ReLU and the residual additions); auto: off
    compile: str = "auto"
    # local training's arithmetic: fp32, or bf16 autocast of the forward pass (changes results)
    precision: str = "fp32"


@dataclass
class MethodConfig:
    name: str = "fedavg"  # the method: fedavg, fedprox, creff, clip2fl or mllm_fl
    prox_mu: float = 0.01  # FedProx proximal weight ('fedprox', and 'mllm_fl' with stage2='fedprox')
    # MLLM-FL stage 1: global multimodal pretraining on the MLLM-captioned web pool
    stage1: bool = True
    dwd: bool = True  # dynamic weighted distillation from the frozen image encoder; off = plain contrastive
    stage1_epochs: int = 10  # epochs over the web pool
    stage1_batch_size: int = 256  # image-caption pairs per contrastive batch
    stage1_lr: float = 0.05  # stage 1's learning rate (SGD, momentum 0.9, cosine decay)
    lambda0: float = 1.0  # DWD teacher weight at the first step
    lambda_schedule: str = "cosine"  # how the weight hands over to the student: cosine, linear, constant
    temperature: float = 0.07  # InfoNCE temperature; the classifier is initialised at scale 1/temperature
    gamma: float = 1.0  # weight of the distillation term lambda * (1 - cos(s, v))
    # MLLM-FL stage 2: federated finetuning
    stage2: str = "fedavg"  # client update: fedavg or fedprox
    # MLLM-FL stage 3: global alignment on a class-balanced, MLLM-labelled set
    align: bool = True
    align_rounds: str = "every"  # after every aggregation, or the last only
    align_per_class: int = 100  # m images per class, by the MLLM's label (fewer where a class has fewer)
    align_select: str = "random"  # which m: a seeded random draw, or the MLLM's most confident
    align_epochs: int = 1  # epochs over the alignment set after each aggregation
    align_lr: float = 0.01  # the alignment's SGD learning rate
    align_batch_size: int = 32  # the alignment's batch size
    align_params: str = "all"  # all parameters, or the classifier only
    beta: float = 1.0  # weight of KL(q || p)
    # CReFF (also the base of CLIP2FL), defaults from the public code
    creff_num_features: int = 100  # federated features per class
    creff_match_steps: int = 100  # gradient-matching steps per round
    creff_feature_lr: float = 0.1  # learning rate of the federated features
    creff_retrain_epochs: int = 300  # epochs re-training a fresh classifier on the features
    creff_retrain_lr: float = 0.01  # learning rate of the classifier re-training
    creff_retrain_batch: int = 32  # batch size of the classifier re-training
    creff_grad_reps: int = 10  # repetitions of the clients' per-class gradient computation
    creff_grad_batch: int = 32  # images per class and repetition
    # CLIP2FL
    clip2fl_kd_weight: float = 1.0  # weight of the client-side distillation from CLIP's zero-shot logits
    clip2fl_temperature: float = 3.0  # temperature of that distillation
    clip2fl_contrast_weight: float = 0.001  # weight of the server-side prototype-contrastive loss
    clip2fl_contrast_temperature: float = 0.1  # its temperature


@dataclass
class TeacherConfig:
    mllm: str = "simulated"  # 'simulated' (offline stand-in) or 'hf' (transformers image-text-to-text)
    mllm_model: str = "llava-hf/llava-1.5-7b-hf"  # model id or local path ('hf' backend)
    mllm_revision: str = "main"  # hub revision of mllm_model (a branch, tag or commit)
    mllm_accuracy: float = 0.9  # label accuracy of the simulated MLLM
    # what the MLLM is asked for each pool image's caption
    caption_prompt: str = "Describe this image in one short sentence."
    clip: str = "offline"  # 'offline' (MiniLM text + EfficientNet-Lite0 image + fitted map) or 'open_clip'
    clip_model: str = "ViT-B-32"  # open_clip architecture, or the path of an open_clip model config .json
    clip_pretrained: str = "openai"  # open_clip pretrained tag or a local checkpoint path
    image_size: int = 64  # input side of the offline image encoder (CLIP backends use their own)
    align_steps: int = 300  # steps fitting the offline image->text map on the captioned pool
    allow_download: bool = False  # let backends fetch weights from a hub (off: fail fast offline)
    batch_size: int = 64  # images per teacher forward pass


@dataclass
class ExperimentConfig:
    profile: str = "offline"  # the overlay this config started from; not part of the fingerprint
    seed: int = 7  # seeds the partition, client sampling, model initialisation and every client's generator
    device: str = "auto"  # auto (CUDA when there is one), cpu or cuda
    # torch's threads on a CPU: the thread count decides how sums round, so fixing it makes results
    # independent of the machine's core count (0 = torch's default, one per core); see fl_core.parallel
    cpu_threads: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    fl: FLConfig = field(default_factory=FLConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def flat(self) -> dict:
        """The config as ``{"data.alpha": 0.5, ...}``, the form overrides take."""
        return dict(_flatten(self))

    def fingerprint(self) -> str:
        """Short hash of everything that changes results (the profile name does not)."""
        settings = {k: v for k, v in self.flat().items()
                    if k not in EXECUTION_ONLY and not omitted_from_fingerprint(k, v)}
        settings.update(data_content(self.data))
        if self.method.name in METHOD_REVISIONS:
            settings["method.revision"] = METHOD_REVISIONS[self.method.name]
        blob = json.dumps(settings, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:12]


# Profiles are overlays on the defaults above, which are the peers' protocol (section 4 of DESIGN.md).
PAPER_PROTOCOL = {
    "seed": 7,
    "data.num_clients": 20,
    "data.alpha": 0.5,
    "data.imbalance_factor": 100.0,
    "data.partition": "creff",
    "fl.rounds": 200,
    "fl.clients_per_round": 8,
    "fl.local_epochs": 10,
    "fl.batch_size": 32,
    "fl.lr": 0.1,
    "model.width": 1.0,
}
PAPER_TEACHERS = {"teacher.mllm": "hf", "teacher.clip": "open_clip", "teacher.batch_size": 32}
PROFILES: dict[str, dict] = {
    # Tests and nbval: seconds per run on 2 CPU cores.
    "smoke": {
        "data.dataset": "mnist",
        "data.train_limit": 5000,
        "data.test_limit": 1000,
        "data.web_pool_limit": 1000,
        "teacher.align_steps": 100,
        "method.creff_num_features": 20,
        "method.creff_match_steps": 20,
        "method.creff_retrain_epochs": 50,
        "method.creff_grad_reps": 3,
        "data.imbalance_factor": 100.0,
        "data.num_clients": 10,
        "fl.clients_per_round": 4,
        "fl.rounds": 3,
        "fl.local_epochs": 1,
        "fl.lr": 0.1,
        "fl.eval_batch_size": 128,
        "model.width": 0.25,
        "cpu_threads": 1,  # the stored notebook outputs nbval compares hold on any number of cores
    },
    # The embedded default of `make book`: real MNIST-LT, everything on a 2-core CPU.
    "offline": {
        "data.dataset": "mnist",
        "data.imbalance_factor": 100.0,
        "data.num_clients": 20,
        "data.alpha": 0.5,
        "fl.clients_per_round": 8,
        "data.test_limit": 5000,  # a balanced 500 images per class: half the evaluation cost per round
        "fl.rounds": 15,
        "fl.local_epochs": 1,
        "fl.lr": 0.1,
        "fl.eval_batch_size": 128,  # small batches evaluate twice as fast on a 2-core CPU
        # ResNet-8 at 8/16/32 channels (20k parameters, plenty for MNIST): runs train ~1.6x faster
        # than at width 0.25, which brought the whole book to 30 minutes on the fastest 2-core CPU we had.
        "model.width": 0.125,
        # At this width the student must learn fast enough to take over from the DWD teacher: with
        # lr 0.05 it ends stage 1 at 50% zero-shot accuracy (seed 7), with 0.1 at 89%.
        "method.stage1_lr": 0.1,
        # Small models leave a CPU idle between ops; training the clients together pays (about 2x, see `make bench`).
        "fl.client_training": "vectorized",
        # The book's numbers on any number of cores; a grid's runs go one per core (fl_core.parallel)
        "cpu_threads": 1,
    },
    # channels-last also on a GPU: ResNet-8 at width 1, clients trained together, is 5-7% faster in
    # fp32 on an H100/H200 (benchmarks/README.md); on a CPU it is on anyway
    "paper-cifar10": {**PAPER_PROTOCOL, "data.dataset": "cifar10", **PAPER_TEACHERS, "fl.channels_last": "on"},
    "paper-cifar100": {**PAPER_PROTOCOL, "data.dataset": "cifar100", **PAPER_TEACHERS, "fl.channels_last": "on"},
    "paper-imagenet": {
        **PAPER_PROTOCOL,
        **PAPER_TEACHERS,
        "data.dataset": "imagenet_lt",
        "data.imbalance_factor": 1.0,  # ImageNet-LT's train list is long-tailed already
        "data.image_size": 112,
        "model.arch": "resnet50",
    },
}
DEFAULT_PROFILE = "offline"
# Seeds the notebooks average over (mean and std) for each profile.
PROFILE_SEEDS = {"smoke": (7,), "offline": (7, 8, 9)}


def profile_seeds(profile: str) -> list[int]:
    """The seeds result tables use on ``profile`` (three, except one on ``smoke``)."""
    return list(PROFILE_SEEDS.get(profile, (7, 8, 9)))


def make_config(profile: str = DEFAULT_PROFILE, overrides: dict | None = None) -> ExperimentConfig:
    """Build and validate the config of ``profile`` with flat ``overrides`` applied on top."""
    if profile not in PROFILES:
        raise ValueError(f"profile={profile!r} is not a known profile; valid: {sorted(PROFILES)}")
    cfg = apply_overrides(ExperimentConfig(profile=profile), PROFILES[profile])
    cfg = apply_overrides(cfg, overrides or {})
    validate(cfg)
    return cfg


def config_from_dict(d: dict) -> ExperimentConfig:
    """Rebuild a config from ``to_dict()`` output (e.g. a run record)."""
    flat = dict(_flatten_dict(d))
    return apply_overrides(ExperimentConfig(profile=flat.pop("profile", DEFAULT_PROFILE)), flat)


def parse_set_args(pairs: list[str]) -> dict:
    """``["fl.rounds=5", "data.alpha=0.1"]`` -> ``{"fl.rounds": "5", ...}`` (typed later)."""
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--set {pair!r} is not of the form key=value, e.g. --set fl.rounds=5")
        out[key.strip()] = value.strip()
    return out


def apply_overrides(cfg: ExperimentConfig, overrides: dict) -> ExperimentConfig:
    """Return a copy of ``cfg`` with flat ``{"section.key": value}`` overrides applied.

    String values (from the command line) are parsed into the field's type.
    """
    cfg = copy.deepcopy(cfg)
    valid = sorted(k for k in dict(_flatten(cfg)))
    for key, value in overrides.items():
        parts = key.split(".")
        owner = cfg
        for part in parts[:-1]:
            sub = getattr(owner, part, None)
            if not dataclasses.is_dataclass(sub):
                raise ValueError(_unknown_key(key, valid))
            owner = sub
        names = {f.name: f for f in dataclasses.fields(owner)}
        if parts[-1] not in names or dataclasses.is_dataclass(getattr(owner, parts[-1])):
            raise ValueError(_unknown_key(key, valid))
        hints = typing.get_type_hints(type(owner))
        setattr(owner, parts[-1], _coerce(key, value, hints[parts[-1]]))
    return cfg


def _unknown_key(key: str, valid: list[str]) -> str:
    """The error for an unknown override key: the closest valid keys first, then all of them."""
    close = difflib.get_close_matches(key, valid, n=3, cutoff=0.8)
    hint = f" (did you mean {' or '.join(close)}?)" if close else ""
    return f"unknown config key {key!r}{hint}; valid keys: {', '.join(valid)}"


def key_choices() -> dict[str, tuple]:
    """The keys that take one of a few values, and those values (read when called, so that a method
    registered later counts)."""
    return {
        "profile": tuple(PROFILES), "device": DEVICES, "data.dataset": (*DATASETS, IMAGE_FOLDER),
        "data.partition": PARTITIONS, "data.augment_per": AUGMENT_PER, "model.arch": ARCHS, "method.name": METHODS,
        "fl.client_training": CLIENT_TRAINING, "fl.cuda_graphs": SWITCHES, "fl.channels_last": SWITCHES,
        "fl.grouped_conv": GROUPED_CONV, "fl.compile": SWITCHES, "fl.precision": PRECISIONS,
        "method.lambda_schedule": LAMBDA_SCHEDULES, "method.stage2": ("fedavg", "fedprox"),
        "method.align_rounds": ALIGN_ROUNDS, "method.align_select": ALIGN_SELECT, "method.align_params": ALIGN_PARAMS,
        "teacher.mllm": MLLM_BACKENDS, "teacher.clip": CLIP_BACKENDS,
    }


def key_notes() -> dict[str, str]:
    """What each key means, from the comment beside its field in this module's dataclasses, else the
    comment lines right above it: ``{"data.alpha": "Dirichlet concentration of the non-IID split", ...}``."""
    sections = {"": ExperimentConfig, **{f"{name}.": hint for name, hint in typing.get_type_hints(ExperimentConfig).items()
                                        if dataclasses.is_dataclass(hint)}}
    notes = {}
    for prefix, cls in sections.items():
        source = textwrap.dedent(inspect.getsource(cls))
        comments = {tok.start[0]: tok.string.lstrip("#").strip()
                    for tok in tokenize.generate_tokens(io.StringIO(source).readline) if tok.type == tokenize.COMMENT}
        code_lines = {n for n, line in enumerate(source.splitlines(), 1) if not line.lstrip().startswith("#")}
        for node in ast.parse(source).body[0].body:
            if not isinstance(node, ast.AnnAssign) or (not prefix and f"{node.target.id}." in sections):
                continue  # not a field, or a section's
            text = [comments[n] for n in range(node.lineno, node.end_lineno + 1) if n in comments]
            first = node.lineno
            while not text and first - 1 in comments and first - 1 not in code_lines:
                first -= 1
            notes[prefix + node.target.id] = " ".join(text or [comments[n] for n in range(first, node.lineno)])
    return notes


def validate(cfg: ExperimentConfig) -> None:
    """Raise ``ValueError`` for the first setting that cannot work, saying what is valid."""
    d, m, f = cfg.data, cfg.model, cfg.fl
    flat = cfg.flat()
    for key, valid in key_choices().items():
        _choice(key, flat[key], valid)
    _at_least("cpu_threads", cfg.cpu_threads, 0, "0 means torch's default, one thread per core")
    if cfg.fl.cuda_graphs == "on" and cfg.device == "cpu":
        raise ValueError("fl.cuda_graphs=on needs a CUDA device, but device=cpu; use fl.cuda_graphs=auto or off")
    if cfg.fl.grouped_conv == "triton" and cfg.device == "cpu":
        raise ValueError("fl.grouped_conv=triton needs a CUDA device, but device=cpu; use fl.grouped_conv=auto or native")
    if cfg.fl.compile == "on" and cfg.fl.client_training == "sequential":
        raise ValueError("fl.compile=on compiles the step of clients trained together, but fl.client_training="
                         "sequential; use fl.client_training=vectorized (or auto on CUDA), or fl.compile=auto or off")
    if not 0 <= cfg.seed < 2**32:
        raise ValueError(f"seed={cfg.seed} is invalid: it must be in 0..{2**32 - 1} (numpy's RandomState takes 32-bit seeds)")
    _at_least("data.imbalance_factor", d.imbalance_factor, 1, "1 means balanced")
    if fixed_long_tail(d.dataset) and d.imbalance_factor != 1:
        raise ValueError(f"data.imbalance_factor={d.imbalance_factor:g} does not apply to {d.dataset}: its training list "
                         "is long-tailed already and is used as it is; leave data.imbalance_factor at 1")
    if not d.alpha > 0:
        raise ValueError(f"data.alpha={d.alpha!r} is invalid: the Dirichlet concentration must be > 0")
    _at_least("data.num_clients", d.num_clients, 1)
    _at_least("data.min_client_size", d.min_client_size, 0)
    _at_least("data.train_limit", d.train_limit, 0, "0 means the whole split")
    _at_least("data.test_limit", d.test_limit, 0, "0 means the whole split")
    _at_least("data.image_size", d.image_size, 0, "0 means native size")
    if not 0 <= d.few_threshold <= d.many_threshold:
        raise ValueError(
            f"data.few_threshold={d.few_threshold} and data.many_threshold={d.many_threshold} are "
            "invalid: need 0 <= few_threshold <= many_threshold"
        )
    if not m.width > 0:
        raise ValueError(f"model.width={m.width!r} is invalid: the channel multiplier must be > 0")
    for name in ("rounds", "clients_per_round", "local_epochs", "batch_size", "eval_every", "eval_batch_size"):
        _at_least(f"fl.{name}", getattr(f, name), 1)
    if f.clients_per_round > d.num_clients:
        raise ValueError(
            f"fl.clients_per_round={f.clients_per_round} is invalid: only data.num_clients="
            f"{d.num_clients} clients exist; choose 1..{d.num_clients}"
        )
    if not f.lr > 0:
        raise ValueError(f"fl.lr={f.lr!r} is invalid: the learning rate must be > 0")
    _at_least("fl.momentum", f.momentum, 0)
    _at_least("fl.weight_decay", f.weight_decay, 0)
    mc = cfg.method
    _at_least("method.prox_mu", mc.prox_mu, 0)
    for name in ("stage1_epochs", "stage1_batch_size", "align_per_class", "align_epochs", "align_batch_size",
                 "creff_num_features", "creff_retrain_batch", "creff_grad_reps", "creff_grad_batch"):
        _at_least(f"method.{name}", getattr(mc, name), 1)
    _at_least("method.creff_match_steps", mc.creff_match_steps, 0)
    _at_least("method.creff_retrain_epochs", mc.creff_retrain_epochs, 0)
    _at_least("method.clip2fl_kd_weight", mc.clip2fl_kd_weight, 0)
    _at_least("method.clip2fl_contrast_weight", mc.clip2fl_contrast_weight, 0)
    for name in ("stage1_lr", "temperature", "align_lr", "creff_feature_lr", "creff_retrain_lr", "clip2fl_temperature",
                 "clip2fl_contrast_temperature"):
        if not getattr(mc, name) > 0:
            raise ValueError(f"method.{name}={getattr(mc, name)!r} is invalid: it must be > 0")
    if mc.name == "mllm_fl" and mc.stage1 and m.arch == "resnet8_clip2fl":
        raise ValueError("model.arch=resnet8_clip2fl does not go with mllm_fl's stage 1, which pretrains the federated "
                         "model with a projection of its own and folds it into the classifier; use model.arch=auto, "
                         "resnet8 or resnet50 (or method.stage1=false)")
    if not 0 <= mc.lambda0 <= 1:
        raise ValueError(f"method.lambda0={mc.lambda0!r} is invalid: the DWD teacher weight must lie in [0, 1]")
    _at_least("method.gamma", mc.gamma, 0)
    _at_least("method.beta", mc.beta, 0)
    t = cfg.teacher
    if not 0 <= t.mllm_accuracy <= 1:
        raise ValueError(f"teacher.mllm_accuracy={t.mllm_accuracy!r} is invalid: it must lie in [0, 1]")
    if t.mllm != "simulated" and t.mllm_accuracy != TeacherConfig.mllm_accuracy:
        raise ValueError(f"teacher.mllm_accuracy={t.mllm_accuracy:g} applies to the simulated MLLM only, but teacher.mllm="
                         f"{t.mllm}: a real MLLM's accuracy is measured on the pool, not set; leave teacher.mllm_accuracy "
                         f"at {TeacherConfig.mllm_accuracy:g}")
    _check_backend_only_settings(t)
    _at_least("teacher.image_size", t.image_size, 16)
    _at_least("teacher.align_steps", t.align_steps, 0)
    _at_least("teacher.batch_size", t.batch_size, 1)
    _at_least("data.web_pool_limit", d.web_pool_limit, 0, "0 means the whole pool")
    images = expected_train_images(cfg)
    if d.num_clients > images:
        raise ValueError(
            f"data.num_clients={d.num_clients} is invalid: the long-tailed training set of "
            f"{d.dataset} has only about {images} images; use at most {images} clients"
        )
    # the partitioner lowers the default floor to the average client size where it must; a floor set by hand
    # that cannot fit is refused here
    if (d.partition == "dirichlet" and d.min_client_size != DataConfig.min_client_size
            and d.min_client_size * d.num_clients > images):
        raise ValueError(
            f"data.min_client_size={d.min_client_size} is invalid: data.num_clients={d.num_clients} clients of at least "
            f"that many images need {d.min_client_size * d.num_clients}, but the long-tailed training set of {d.dataset} "
            f"has only about {images}; use at most {images // d.num_clients} (well below it: the Dirichlet split is "
            "redrawn until its smallest client holds that many)"
        )
    _check_web_pool(cfg, images)


# settings that only one backend reads: set for the other, they would be silently ignored (a model path
# given without switching the backend to it)
BACKEND_ONLY_SETTINGS = {"mllm_model": ("mllm", "hf"), "mllm_revision": ("mllm", "hf"), "caption_prompt": ("mllm", "hf"),
                         "clip_model": ("clip", "open_clip"), "clip_pretrained": ("clip", "open_clip")}


def _check_backend_only_settings(t: TeacherConfig) -> None:
    for key, (role, backend) in BACKEND_ONLY_SETTINGS.items():
        value, in_use = getattr(t, key), getattr(t, role)
        if in_use != backend and value != getattr(TeacherConfig, key):
            raise ValueError(
                f"teacher.{key}={value!r} is read by teacher.{role}={backend} only, but teacher.{role}={in_use}, which "
                f"would ignore it; add --set teacher.{role}={backend} to use it, or leave teacher.{key} at its default "
                f"{getattr(TeacherConfig, key)!r}")


def _check_web_pool(cfg: ExperimentConfig, kept_images: int) -> None:
    """A method that works on the server's web pool (MLLM-FL; CLIP2FL with the offline encoder,
    which is fitted on the captioned pool) must get one its MLLM can annotate: found before any data
    is loaded (ImageNet-LT's images take minutes to decode the first time)."""
    d, t, name = cfg.data, cfg.teacher, cfg.method.name
    if not (name == "mllm_fl" or (name == "clip2fl" and t.clip == "offline")):
        return
    who = "mllm_fl" if name == "mllm_fl" else "clip2fl with teacher.clip=offline (its encoder is fitted on the captioned pool)"
    if d.web_pool != "heldout":
        if t.mllm == "simulated":
            raise ValueError(
                f"teacher.mllm=simulated answers from the hidden labels of a held-out pool, but data.web_pool="
                f"{d.web_pool!r} is images of your own, without labels; use a real MLLM (teacher.mllm=hf), or "
                "data.web_pool=heldout")
        return
    facts = dataset_facts(d)
    if facts.heldout_split or kept_images < min(d.train_limit or facts.train_size, facts.train_size):
        return
    why = ("its training list is the long tail as it is" if fixed_long_tail(d.dataset)
           else f"data.imbalance_factor={d.imbalance_factor:g}")
    example = ", e.g. ImageNet training images that ImageNet_LT_train.txt does not list" if d.dataset == "imagenet_lt" else ""
    raise ValueError(
        f"data.web_pool=heldout would be empty: the long tail keeps every {d.dataset} training image ({why}), and "
        f"{who} needs a pool of server-side images. Pass data.web_pool=PATH: a folder of images (optionally with "
        f"captions.jsonl) or a glob of .tar shards{example}")


def expected_train_images(cfg: ExperimentConfig) -> int:
    """Size of the long-tailed training set implied by the config, before loading any data."""
    facts = dataset_facts(cfg.data)
    size = min(cfg.data.train_limit or facts.train_size, facts.train_size)
    if facts.already_long_tailed:
        return size
    from fl_core.data.longtail import long_tail_counts  # numpy only

    return int(sum(long_tail_counts(size, facts.num_classes, cfg.data.imbalance_factor)))


def _choice(name: str, value, valid) -> None:
    if value not in valid:
        raise ValueError(f"{name}={value!r} is not valid; choose one of: {', '.join(sorted(valid))}")


def _at_least(name: str, value, low, note: str = "") -> None:
    if value < low:
        extra = f" ({note})" if note else ""
        raise ValueError(f"{name}={value!r} is invalid: it must be >= {low}{extra}")


def _coerce(key: str, value, hint):
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        hint = args[0]
    if isinstance(value, str) and hint is not str:
        try:
            value = json.loads(value.lower() if hint is bool else value)
        except json.JSONDecodeError:
            raise ValueError(f"{key}={value!r} is not a valid {hint.__name__}") from None
    if hint is bool and isinstance(value, bool):
        return value
    if hint is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if hint is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if hint is str and isinstance(value, str):
        return value
    raise ValueError(f"{key}={value!r} is not a valid {hint.__name__}")


def _flatten(obj, prefix: str = ""):
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            yield from _flatten(value, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", value


def _flatten_dict(d: dict, prefix: str = ""):
    for key, value in d.items():
        if isinstance(value, dict):
            yield from _flatten_dict(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value

