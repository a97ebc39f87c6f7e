import pytest

from fl_core.config import (PROFILES, apply_overrides, config_from_dict, data_content, key_notes, make_config,
                            parse_set_args)


@pytest.mark.parametrize("profile", sorted(PROFILES))
def test_every_profile_builds(profile):
    cfg = make_config(profile)
    assert cfg.profile == profile
    assert config_from_dict(cfg.to_dict()) == cfg


def test_paper_profiles_follow_the_peers_protocol():
    cfg = make_config("paper-cifar10")
    assert (cfg.data.num_clients, cfg.fl.clients_per_round, cfg.fl.rounds) == (20, 8, 200)
    assert (cfg.fl.local_epochs, cfg.fl.batch_size, cfg.fl.lr, cfg.data.alpha, cfg.seed) == (10, 32, 0.1, 0.5, 7)
    assert make_config("paper-cifar100").data.dataset == "cifar100"
    assert make_config("paper-imagenet").model.arch == "resnet50"


def test_string_overrides_are_typed():
    cfg = make_config("smoke", parse_set_args(["fl.rounds=5", "data.alpha=0.1", "data.augment=false", "seed=3"]))
    assert cfg.fl.rounds == 5 and isinstance(cfg.fl.rounds, int)
    assert cfg.data.alpha == 0.1 and cfg.data.augment is False and cfg.seed == 3


def test_int_accepted_for_float_field_but_not_the_reverse():
    assert make_config("smoke", {"data.imbalance_factor": 50}).data.imbalance_factor == 50.0
    with pytest.raises(ValueError, match=r"fl\.rounds=2\.5 is not a valid int"):
        make_config("smoke", {"fl.rounds": 2.5})


@pytest.mark.parametrize(
    "overrides, pattern",
    [
        ({"fl.round": 3}, r"unknown config key 'fl\.round' \(did you mean fl\.rounds\?\); valid keys: .*fl\.rounds"),
        ({"model.widht": 2}, r"unknown config key 'model\.widht' \(did you mean model\.width\?\)"),
        ({"nope": 1}, r"unknown config key 'nope'; valid keys"),
        ({"data.imbalance_factor": 0.5}, r"data\.imbalance_factor=0\.5 is invalid: it must be >= 1"),
        ({"data.dataset": "imagenet_lt"}, r"data\.imbalance_factor=100 does not apply to imagenet_lt: .* leave data\.imbalance_factor at 1"),
        ({"data.alpha": 0}, r"data\.alpha=0(\.0)? is invalid: .* must be > 0"),
        ({"data.alpha": -1.0}, r"data\.alpha=-1\.0 is invalid"),
        ({"data.num_clients": 0}, r"data\.num_clients=0 is invalid: it must be >= 1"),
        ({"data.num_clients": 100000, "fl.clients_per_round": 1}, r"data\.num_clients=100000 is invalid: .* at most \d+ clients"),
        ({"data.dataset": "svhn"}, r"data\.dataset='svhn' is not valid; choose one of: cifar10, cifar100, imagefolder, imagenet_lt, mnist"),
        ({"method.name": "scaffold"}, r"method\.name='scaffold' is not valid; choose one of: .*fedavg"),
        ({"data.partition": "shards"}, r"data\.partition='shards' is not valid; choose one of: creff, dirichlet, iid"),
        ({"data.augment_per": "client"}, r"data\.augment_per='client' is not valid; choose one of: batch, image"),
        ({"data.partition": "dirichlet", "data.min_client_size": 100000},
         r"data\.min_client_size=100000 is invalid: data\.num_clients=10 clients .* need 1000000, .* use at most \d+"),
        ({"fl.clients_per_round": 11}, r"fl\.clients_per_round=11 is invalid: only data\.num_clients=10"),
        ({"fl.lr": 0}, r"fl\.lr=0(\.0)? is invalid"),
        ({"fl.rounds": "many"}, r"fl\.rounds='many' is not a valid int"),
        ({"cpu_threads": -1}, r"cpu_threads=-1 is invalid: it must be >= 0 \(0 means torch's default"),
        ({"seed": -3}, r"seed=-3 is invalid: it must be in 0\.\.4294967295"),
        ({"seed": 2**32}, r"seed=4294967296 is invalid"),
        ({"method.name": "mllm_fl", "model.arch": "resnet8_clip2fl"}, r"model\.arch=resnet8_clip2fl does not go with mllm_fl's stage 1"),
        ({"teacher.mllm": "hf", "teacher.mllm_accuracy": 0.7}, r"teacher\.mllm_accuracy=0\.7 applies to the simulated MLLM only"),
        ({"teacher.mllm_model": "/models/llava"}, r"teacher\.mllm_model='/models/llava' is read by teacher\.mllm=hf only, "
                                                  r"but teacher\.mllm=simulated, .* add --set teacher\.mllm=hf"),
        ({"teacher.caption_prompt": "Say what it is."}, r"teacher\.caption_prompt=.* is read by teacher\.mllm=hf only"),
        ({"teacher.clip_pretrained": "/models/clip.bin"}, r"teacher\.clip_pretrained='/models/clip\.bin' is read by "
                                                         r"teacher\.clip=open_clip only, but teacher\.clip=offline"),
    ],
)
def test_bad_settings_name_the_field_the_value_and_what_is_valid(overrides, pattern):
    with pytest.raises(ValueError, match=pattern):
        make_config("smoke", overrides)


@pytest.mark.parametrize(
    "profile, overrides, pattern",
    [
        ("paper-imagenet", {"method.name": "mllm_fl"},
         r"data\.web_pool=heldout would be empty: .* every imagenet_lt training image .* mllm_fl needs .* data\.web_pool=PATH"),
        ("paper-cifar10", {"method.name": "mllm_fl", "data.imbalance_factor": 1},
         r"every cifar10 training image \(data\.imbalance_factor=1\)"),
        ("paper-imagenet", {"method.name": "clip2fl", "teacher.clip": "offline"},
         r"clip2fl with teacher\.clip=offline .* needs a pool"),
        ("smoke", {"method.name": "mllm_fl", "data.web_pool": "/data/web/*.tar"},
         r"teacher\.mllm=simulated answers from the hidden labels .* use a real MLLM \(teacher\.mllm=hf\)"),
    ],
)
def test_a_method_that_needs_the_web_pool_gets_one_its_mllm_can_annotate(profile, overrides, pattern):
    with pytest.raises(ValueError, match=pattern):
        make_config(profile, overrides)
    # what these methods run with: a pool of your own (and a real MLLM), or one that exists
    make_config(profile, {**overrides, "data.web_pool": "/data/web/*.tar", "teacher.mllm": "hf"})
    make_config("paper-imagenet", {"method.name": "clip2fl"})  # open_clip needs no pool
    make_config("offline", {"method.name": "mllm_fl"})  # MNIST holds out its validation split


def test_unknown_profile():
    with pytest.raises(ValueError, match=r"profile='fast' is not a known profile; valid: .*'offline'"):
        make_config("fast")


def test_set_syntax_error():
    with pytest.raises(ValueError, match="key=value"):
        parse_set_args(["fl.rounds"])


def test_fingerprint_tracks_settings_not_profile_name():
    a = make_config("smoke")
    assert a.fingerprint() == make_config("smoke").fingerprint()
    assert a.fingerprint() != make_config("smoke", {"seed": 8}).fingerprint()
    assert apply_overrides(a, {"profile": "offline"}).fingerprint() == a.fingerprint()
    # the thread count changes how sums round: a result setting
    assert a.fingerprint() != make_config("smoke", {"cpu_threads": 2}).fingerprint()
    # settings added later (cpu_threads, fl.precision) leave earlier fingerprints as they were at their defaults
    assert make_config("paper-cifar10", {"method.name": "mllm_fl"}).fingerprint() == "51c3f2369e38"
    assert make_config("offline", {"method.name": "mllm_fl"}).fingerprint() == "802d930d1a93"


def test_code_changes_to_results_change_the_fingerprints_they_concern():
    # CLIP2FL's teacher prompt (METHOD_REVISIONS): its runs from before were fd2fbeb6a033 / f624ff6ab65f
    assert make_config("offline", {"method.name": "clip2fl"}).fingerprint() == "b3cc5c75df8f"
    assert make_config("paper-cifar10", {"method.name": "clip2fl"}).fingerprint() == "df4ee8af2ece"
    # CIFAR-100's class names as text (CLASS_TEXT_REVISED): cabc025e7074 before; CIFAR-10's names did not change
    assert make_config("paper-cifar100", {"method.name": "mllm_fl"}).fingerprint() == "55dc3525511b"
    assert data_content(make_config("paper-cifar10").data) == {}
    # a setting added later (data.augment_per) leaves the fingerprints at its default, not at another value
    assert make_config("offline", {"method.name": "mllm_fl", "data.augment_per": "batch"}).fingerprint() != "802d930d1a93"


def test_a_backend_only_setting_is_taken_with_its_backend():
    cfg = make_config("smoke", {"teacher.mllm": "hf", "teacher.mllm_model": "/models/llava", "teacher.clip": "open_clip",
                                "teacher.clip_pretrained": "/models/clip.bin"})
    assert (cfg.teacher.mllm_model, cfg.teacher.clip_pretrained) == ("/models/llava", "/models/clip.bin")


def test_every_key_says_what_it_means():
    notes = key_notes()
    assert [key for key in make_config().flat() if not notes.get(key)] == []  # a new field needs its comment
    assert notes["data.alpha"] == "Dirichlet concentration of the non-IID split"  # the comment beside the field
    assert notes["fl.cuda_graphs"].startswith("clients trained together: replay")  # the comment above it
