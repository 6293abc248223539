from __future__ import annotations

import pytest

from alges_dist.config import STRATEGY_NAMES, Config, ConfigError, load_config

REPO_CONFIGS = sorted((__import__("pathlib").Path(__file__).parents[1] / "configs").glob("*.yaml"))


def test_defaults_are_the_demo():
    cfg = load_config()
    assert cfg == load_config(REPO_CONFIGS[0].parent / "demo.yaml")  # configs/demo.yaml says so
    assert cfg.data.pool == "demo"
    assert cfg.model.encoder_weights is None
    assert set(cfg.loop.strategies) <= set(STRATEGY_NAMES)


@pytest.mark.parametrize("path", REPO_CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_load(path):
    cfg = load_config(path)
    assert isinstance(cfg, Config)


def test_set_overrides_parse_yaml_values(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  epochs: 2\n")
    cfg = load_config(f, ["train.epochs=5", "train.lr=0.01", "loop.strategies=[random, entropy]",
                          "model.encoder_weights=null"])
    assert cfg.train.epochs == 5
    assert cfg.train.lr == pytest.approx(0.01)
    assert cfg.loop.strategies == ["random", "entropy"]
    assert cfg.model.encoder_weights is None


def test_config_is_frozen():
    cfg = load_config()
    with pytest.raises(Exception, match="frozen"):
        cfg.train.epochs = 3


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (["train.epochz=3"], r"train\.epochz"),
        (["trian.epochs=3"], r"trian"),
        (["train.epochs=three"], r"train\.epochs"),
        (["train.lr=-0.1"], r"train\.lr"),
        (["data.dice_classes=[0, 7]", "data.n_classes=5"], r"dice_classes \[7\]"),
        (["loop.strategies=[badge]"], r"unknown strategies \['badge'\]"),
        (["scoring.max_error_rate=2"], r"scoring\.max_error_rate"),
        (["scoring.math_path=fast"], r"scoring\.math_path"),
        (["train.epochs"], r"key\.sub=value"),
    ],
)
def test_bad_values_fail_naming_the_key(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, overrides)


def test_unknown_key_in_file_names_it(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("selection:\n  devise: cpu\n")
    with pytest.raises(ConfigError, match=r"selection\.devise"):
        load_config(f)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        load_config(tmp_path / "nope.yaml")


def test_budget_larger_than_pool_fails_before_work():
    cfg = load_config(None, ["loop.budget=50", "loop.n_rounds=3", "loop.initial_labeled=10"])
    with pytest.raises(ConfigError, match=r"loop\.budget=50"):
        cfg.check_pool(n_pool=100, n_classes=cfg.data.n_classes, source="pool.parquet")
    with pytest.raises(ConfigError, match=r"data\.n_classes=5 but pool.parquet encodes 13"):
        cfg.check_pool(n_pool=1000, n_classes=13, source="pool.parquet")
    cfg.check_pool(n_pool=160, n_classes=cfg.data.n_classes, source="pool.parquet")
    # frames the pool has labeled already are the initial set: 40 of them + 3 x 50 do not fit in 160
    with pytest.raises(ConfigError, match=r"the 40 frames pool.parquet has labeled already = 190 frames"):
        cfg.check_pool(n_pool=160, n_classes=cfg.data.n_classes, source="pool.parquet", n_labeled=40)


def test_paper_config_is_the_papers_protocol():
    from alges_dist.data.cholecseg8k import PAPER_SPLIT

    cfg = load_config(REPO_CONFIGS[0].parent / "paper_cholecseg8k.yaml")
    assert cfg.data.split_videos == PAPER_SPLIT
    assert cfg.data.dice_classes == [0, 1, 2, 3, 4, 5, 9, 10] and cfg.data.n_classes == 13
    assert (cfg.model.arch, cfg.model.encoder, cfg.model.encoder_weights) == ("unet", "resnet18", None)
    assert cfg.data.image_size == (224, 224) and cfg.data.normalize == "none"
    assert (cfg.train.lr, cfg.train.epochs, cfg.train.batch_size, cfg.train.init) == (5e-5, 50, 32, "retrain")
    assert (cfg.loop.initial_labeled, cfg.loop.budget, cfg.loop.n_rounds, cfg.loop.seeds) == (10, 10, 30, [0, 1, 2])
    assert set(cfg.loop.strategies) == {"random", "coreset", "alges-img", "alges-sem", "entropy", "margin",
                                        "least-confidence"}


@pytest.mark.parametrize("resources, match", [
    ({"CPU": 16, "GPU": 2}, r"selection.shards=4: 4 selection shards need 4 GPUs \(one actor each\); the Ray cluster "
                            r"has 2\. Set selection.shards to at most 2"),
    ({"CPU": 2}, r"selection.shards=4: 4 selection shards need 4 CPUs .* has 2\. Set selection.shards to at most 2"),
])
def test_more_selection_shards_than_the_cluster_can_place_fail_before_work(resources, match):
    # issue 23.4: the actors that could not be placed were waited for forever
    cfg = load_config(None, ["selection.shards=4", "loop.strategies=[random, alges-img-kcenter]"])
    with pytest.raises(ConfigError, match=match):
        cfg.check_resources(resources, use_gpu=False)
    cfg.check_resources({"CPU": 16, "GPU": 4}, use_gpu=False)  # one GPU per shard: fine
    # ranking rules and random never shard: the setting does not bind them
    load_config(None, ["selection.shards=4", "loop.strategies=[random, entropy]"]).check_resources(resources,
                                                                                                    use_gpu=False)
