"""Typed configuration: one frozen pydantic tree from YAML plus ``--set a.b=value``.

Unknown keys, wrong types and impossible values fail here, before any work starts,
with the dotted key at fault in the message. The defaults are the demo: a few rounds
on the generated pool that finish in minutes on a 2-core laptop.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from alges_dist.arms import arm_name
from alges_dist.errors import InputError
from alges_dist.selection import DISTANCE_RULES, STRATEGIES

# The strategy table (alges_dist.selection.strategies) is the one list of valid names.
STRATEGY_NAMES = tuple(STRATEGIES)


# Keys a resumed run may change: resources and placement (results do not depend on them),
# the pool's path (its content is fingerprinted instead), and the experiment's extent (more
# rounds, seeds or strategies add runs beside the finished ones). Every other key changes
# results, and a run folder refuses a rerun that differs in one (run_folder.check_settings).
RESUMABLE_KEYS = frozenset({
    "data.pool", "data.demo_cache",
    "train.cpus_per_worker", "train.max_failures", "train.checkpoint_every", "train.val_every",
    "scoring.batch_size", "scoring.num_actors", "scoring.cpus_per_actor", "scoring.gpus_per_actor",
    "selection.device", "selection.backend", "selection.shards",
    "loop.strategies", "loop.seeds", "loop.n_rounds", "labelstudio.*",
})


class ConfigError(InputError):
    """A config file or override is wrong; the message names the dotted key."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DataConfig(_Section):
    pool: str = Field("demo", description='Manifest Parquet path, or "demo" for the generated pool.')
    demo_seed: int = 0
    demo_cache: str | None = Field(None, description="Folder for the generated pool (default ~/.cache).")
    image_size: tuple[int, int] = Field((96, 96), description="(height, width) in px fed to the model.")
    n_classes: int = Field(5, gt=1)
    dice_classes: list[int] | None = Field(
        None, description="Classes averaged in the paper's Dice (paper: [0,1,2,3,4,5,9,10]); null = all."
    )
    normalize: Literal["imagenet", "none"] = Field(
        "imagenet", description="imagenet: mean/std of ImageNet; none: pixels / 255 only (the ALGES paper)."
    )
    split_videos: dict[Literal["pool", "val", "test"], list[str]] | None = Field(
        None, description="Video-to-split assignment recorded for sources split by video (CholecSeg8k)."
    )
    max_pixels: int = Field(
        40_000_000, ge=1, description="Frames above this many pixels are refused unread (decompression bombs)."
    )

    @field_validator("image_size")
    @classmethod
    def _positive_size(cls, v: tuple[int, int]) -> tuple[int, int]:
        if min(v) < 16:
            raise InputError(f"image_size must be at least 16 px per side, got {v}")
        return v

    @model_validator(mode="after")
    def _dice_classes_in_range(self) -> DataConfig:
        bad = [c for c in self.dice_classes or [] if not 0 <= c < self.n_classes]
        if bad:
            raise InputError(
                f"dice_classes {bad} outside the class ids 0..{self.n_classes - 1} (n_classes={self.n_classes})"
            )
        return self


class ModelConfig(_Section):
    arch: str = "unet"
    encoder: str = "resnet18"
    encoder_weights: str | None = Field(None, description='e.g. "imagenet" (needs internet); paper: random init.')


class TrainConfig(_Section):
    epochs: int = Field(4, ge=1)
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    batch_size: int = Field(8, ge=1)
    num_workers: int = Field(1, ge=1, description="Ray Train workers (DDP processes).")
    cpus_per_worker: int = Field(1, ge=1, description="CPUs per Ray Train worker (also its torch threads).")
    use_gpu: bool | Literal["auto"] = "auto"
    init: Literal["retrain", "finetune"] = Field(
        "retrain", description="retrain: every round from the same initial weights (paper); finetune: from last round."
    )
    max_failures: int = Field(1, ge=0)
    val_every: int = Field(
        0, ge=0, description="Validation Dice every N epochs; the last epoch always validates (when the pool has "
        "val frames). 0: the last epoch only (on small pools a val pass costs more than the epoch; the round's "
        "test-split evaluation is separate).")
    checkpoint_every: int = Field(
        1, ge=1, description="Epochs between Ray Train checkpoints (the last epoch always has one)."
    )
    seed: int = 0


class ScoringConfig(_Section):
    batch_size: int = Field(16, ge=1)
    num_actors: int = Field(1, ge=1)
    cpus_per_actor: float = Field(1.0, gt=0, description="CPUs reserved per scorer actor (also its torch threads).")
    gpus_per_actor: float = Field(1.0, gt=0, le=1, description="GPU share per scorer actor where GPUs are used "
                                  "(0.5: two actors share one GPU).")
    feature_grid: int = Field(1, ge=1)
    projection_dim: int | None = Field(None, ge=1, description="Random projection of alges_img (JL); null = off.")
    projection_seed: int = 0
    autocast: Literal["none", "bf16", "fp16"] = "none"
    math_path: Literal["auto", "eager", "compiled"] = Field(
        "auto", description="score_batch's math: auto = torch.compile'd on CUDA (Triton), eager elsewhere."
    )
    max_error_rate: float = Field(0.01, ge=0, le=1, description="Fail the job past this share of undecodable frames.")


class SelectionConfig(_Section):
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$",
                        description='Where the selection task keeps the embeddings: "auto", "cpu", "cuda", "cuda:N".')
    backend: Literal["auto", "faiss", "torch"] = "auto"
    storage_dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    shards: int | Literal["auto"] = Field(
        "auto", description='"auto": one device when the column fits its memory with headroom, else enough '
        "actors (one GPU each) to hold a slice each; N: that many actors. k-center and k-means++ only: ranking "
        "rules and random run on one device.")
    min_gap_s: float = Field(
        0.0, ge=0, description="No two picks of one batch from one video closer in time than this (labeled "
        "frames count too); applies to video rows (#t= URIs) under every strategy. 0 = off.")
    kmeanspp_local_trials: int | Literal["auto"] | None = Field(
        None, description='null: plain D^2 sampling (paper, BADGE); "auto": scikit-learn\'s 2 + log(budget) trials.'
    )

    @field_validator("kmeanspp_local_trials", "shards")
    @classmethod
    def _positive_count(cls, v: int | str | None) -> int | str | None:
        if isinstance(v, int) and v < 1:
            raise InputError(f"must be >= 1 or 'auto', got {v}")
        return v


class LoopConfig(_Section):
    strategies: list[str] = Field(default_factory=lambda: ["random", "alges-img-kcenter"])
    seeds: list[int] = Field(default_factory=lambda: [0])
    n_rounds: int = Field(2, ge=1, description="Query rounds after the initial labeled set.")
    initial_labeled: int = Field(8, ge=1)
    initial_seed: int = Field(
        0, description="Draws the initial labeled set, shared by every strategy and seed of the experiment."
    )
    budget: int = Field(8, ge=1, description="Frames queried per round.")
    oracle: Literal["simulated", "human", "labelstudio"] = Field(
        "simulated", description="simulated: the pool's masks; human: stop for `alges label`; "
        "labelstudio: push each batch to a Label Studio project, then stop for `alges label --from labelstudio`."
    )
    initial_strategy: Literal["auto", "random", "spread", "kcenter"] = Field(
        "auto", description="How the first batch is picked when the pool has no labeled frame: random (seeded, "
        "loop.initial_seed), spread (every video its share, frames evenly spaced in time, selection.min_gap_s kept), "
        "kcenter (k-center greedy on the encoder's pooled feature at the initial weights, scored on workers). "
        "auto: spread when people annotate (human, labelstudio), random for the simulated oracle.")
    initial_strategies: list[Literal["random", "spread", "kcenter"]] | None = Field(
        None, description="A cold-start comparison (simulated oracle): one first batch per rule listed, each "
        "followed by every strategy's rounds; the runs (arms) are named RULE+STRATEGY (e.g. "
        "kcenter+alges-img-kcenter) and paired by seed: same initial weights and selection seeds, only the first "
        "batch differs. Unset: one first batch (loop.initial_strategy) and runs named by strategy.")
    test_frames: int = Field(
        20, ge=0, description="With people annotating (human, labelstudio) and a test split without masks: test "
        "frames spread over the test videos, handed off once with the first batch; the learning curves use them.")
    full_data_reference: bool = Field(
        False, description="Also train once per seed on every pool frame with a mask (same recipe, same initial "
        "weights) and evaluate it: the report's full-data line and frames-to-target fractions refer to it."
    )

    @property
    def arms(self) -> list[str]:
        """The experiment's runs: each strategy, or each (cold start, strategy) pair of
        ``initial_strategies`` (cold start outer), named ``RULE+STRATEGY``."""
        return [arm_name(i, s) for i in (self.initial_strategies or [None]) for s in self.strategies]

    @property
    def first_batch_strategy(self) -> str:
        """initial_strategy resolved: "auto" is spread with people, random with the simulated oracle."""
        if self.initial_strategy != "auto":
            return self.initial_strategy
        return "random" if self.oracle == "simulated" else "spread"

    @field_validator("strategies")
    @classmethod
    def _known_strategies(cls, v: list[str]) -> list[str]:
        unknown = [s for s in v if s not in STRATEGY_NAMES]
        if unknown:
            raise InputError(f"unknown strategies {unknown}; valid: {list(STRATEGY_NAMES)}")
        if not v:
            raise InputError("at least one strategy is needed")
        return _no_repeats(v)

    @model_validator(mode="after")
    def _one_way_to_cold_start(self) -> LoopConfig:
        if self.initial_strategies is None:
            return self
        if not self.initial_strategies:
            raise InputError("loop.initial_strategies is empty: list the cold starts to compare (random, spread, "
                             "kcenter) or leave it unset")
        _no_repeats(self.initial_strategies)
        if self.initial_strategy != "auto":
            raise InputError(f"loop.initial_strategy ({self.initial_strategy}) and loop.initial_strategies "
                             f"({self.initial_strategies}) are both set: keep one (initial_strategies compares "
                             "several cold starts, initial_strategy picks the one)")
        if self.oracle != "simulated":
            raise InputError(f"loop.initial_strategies compares cold starts with the simulated oracle, not "
                             f"loop.oracle: {self.oracle}: people annotate one first batch (set loop.initial_strategy)")
        return self

    @field_validator("seeds")
    @classmethod
    def _seeds(cls, v: list[int]) -> list[int]:
        if not v:
            raise InputError("at least one seed is needed")
        return _no_repeats(v)


def _no_repeats(values: list[Any]) -> list[Any]:
    repeated = sorted({str(x) for x in values if values.count(x) > 1})
    if repeated:
        raise InputError(f"{repeated} appear more than once; list each once")
    return values


class LabelStudioConfig(_Section):
    """The Label Studio server of ``loop.oracle: labelstudio``; the token is never part of the config."""

    url: str = Field("http://127.0.0.1:8080", description="The server's base URL.")
    token_env: str = Field("LABEL_STUDIO_TOKEN", min_length=1,
                           description="Name of the environment variable holding the API token.")
    project: str = Field("alges", min_length=3, description="Project title (created when missing).")
    document_root: str | None = Field(
        None, description="The server's LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT: batches are exported under "
        "DOCUMENT_ROOT/alges/ so the server can show the frames.")


class Config(_Section):
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    scoring: ScoringConfig = ScoringConfig()
    selection: SelectionConfig = SelectionConfig()
    loop: LoopConfig = LoopConfig()
    labelstudio: LabelStudioConfig = LabelStudioConfig()

    @model_validator(mode="after")
    def _labelstudio_has_a_root(self) -> Config:
        if self.loop.oracle == "labelstudio" and not self.labelstudio.document_root:
            raise InputError("loop.oracle=labelstudio needs labelstudio.document_root (the Label Studio server's "
                             "LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT, where batches are exported)")
        return self

    def check_resources(self, resources: dict[str, float], *, use_gpu: bool) -> None:
        """Refuse what the Ray cluster can never schedule (Ray Train and Ray Data would wait forever)."""
        cpus, gpus = resources.get("CPU", 0), resources.get("GPU", 0)
        t, s = self.train, self.scoring
        if t.num_workers * t.cpus_per_worker > cpus:
            raise ConfigError(f"train.num_workers={t.num_workers} x train.cpus_per_worker={t.cpus_per_worker} "
                              f"needs {t.num_workers * t.cpus_per_worker} CPUs; the Ray cluster has {cpus:g}")
        if use_gpu and t.num_workers > gpus:
            raise ConfigError(f"train.num_workers={t.num_workers} with GPUs needs {t.num_workers} GPUs; "
                              f"the Ray cluster has {gpus:g} (or set train.use_gpu: false)")
        if use_gpu and s.num_actors * s.gpus_per_actor > gpus:
            raise ConfigError(f"scoring.num_actors={s.num_actors} x scoring.gpus_per_actor={s.gpus_per_actor:g} "
                              f"needs {s.num_actors * s.gpus_per_actor:g} GPUs; the Ray cluster has {gpus:g}")
        if s.num_actors * s.cpus_per_actor + 1 > cpus:  # the read and decode tasks need a CPU beside the actors
            raise ConfigError(f"scoring.num_actors={s.num_actors} x scoring.cpus_per_actor={s.cpus_per_actor:g} "
                              f"plus one CPU for decoding needs {s.num_actors * s.cpus_per_actor + 1:g} CPUs; the Ray "
                              f"cluster has {cpus:g}")

        if isinstance(self.selection.shards, int) and self.selection.shards > 1 and any(
                STRATEGIES[name].rule in DISTANCE_RULES for name in self.loop.strategies):
            check_selection_shards(self.selection.shards, resources, setting=f"selection.shards={self.selection.shards}")

    def check_pool(self, n_pool: int, n_classes: int, source: str, n_labeled: int = 0) -> None:
        """Check the values that depend on the pool, before any work starts. ``n_labeled``: pool
        frames labeled already, which are the initial set instead of ``loop.initial_labeled``."""
        if n_classes != self.data.n_classes:
            raise ConfigError(
                f"data.n_classes={self.data.n_classes} but {source} encodes {n_classes} classes"
            )
        if n_labeled and self.loop.initial_strategies is not None:
            raise ConfigError(
                f"loop.initial_strategies={self.loop.initial_strategies} compares cold starts, but {source} has "
                f"{n_labeled} frames labeled already (they are the initial set, nothing is picked cold): leave "
                "loop.initial_strategies unset, or ingest a pool without labeled frames")
        initial = n_labeled or self.loop.initial_labeled
        needed = initial + self.loop.n_rounds * self.loop.budget
        if needed > n_pool:
            first = (f"the {n_labeled} frames {source} has labeled already" if n_labeled else
                     f"loop.initial_labeled={self.loop.initial_labeled}")
            raise ConfigError(
                f"loop.budget={self.loop.budget} x loop.n_rounds={self.loop.n_rounds} + {first} = {needed} frames, "
                f"larger than the {n_pool} pool frames of {source}"
            )


def check_selection_shards(n_shards: int, resources: dict[str, float], *, setting: str) -> None:
    """Refuse a sharded selection the cluster cannot place (its actors would wait forever).

    Each shard is one actor with one CPU, and one GPU when the cluster has GPUs
    (``distributed/sharded_selection.ShardedPool``). setting: how the count came about, for the message.
    """
    cpus, gpus = resources.get("CPU", 0), resources.get("GPU", 0)
    if gpus > 0 and n_shards > gpus:
        raise ConfigError(f"{setting}: {n_shards} selection shards need {n_shards} GPUs (one actor each); the Ray "
                          f"cluster has {gpus:g}. Set selection.shards to at most {int(gpus)}")
    if n_shards > cpus:
        raise ConfigError(f"{setting}: {n_shards} selection shards need {n_shards} CPUs (one actor each); the Ray "
                          f"cluster has {cpus:g}. Set selection.shards to at most {int(cpus)}")


def _set_dotted(tree: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node: Any = tree
    fields: Any = Config.model_fields
    for depth, part in enumerate(parts):
        if fields is not None and part not in fields:
            where = ".".join(parts[:depth]) or "the top level"
            raise ConfigError(f"unknown config key {key!r}: {part!r} is not in {where} (valid: {sorted(fields)})")
        annotation = fields[part].annotation if fields is not None else None
        fields = getattr(annotation, "model_fields", None)
        if depth == len(parts) - 1:
            node[part] = value
        else:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"config key {key!r}: {'.'.join(parts[: depth + 1])} is not a section")


def parse_override(item: str) -> tuple[str, Any]:
    """``"train.epochs=5"`` -> ``("train.epochs", 5)``; values are parsed as YAML."""
    key, sep, raw = item.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {item!r} is not of the form key.sub=value")
    try:
        return key.strip(), yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as err:
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"override {item!r}: the value is not valid YAML ({problem})") from None


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Build the config from an optional YAML file and ``key=value`` overrides."""
    tree: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file {path} does not exist")
        try:
            tree = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{path} is not valid YAML: {err}") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(tree).__name__}")
        source = str(path)
    for item in overrides:
        key, value = parse_override(item)
        _set_dotted(tree, key, value)
    try:
        return Config.model_validate(tree)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '<root>'}: {err['msg']} (got {err.get('input')!r})"
            for err in exc.errors()
        )
        raise ConfigError(f"invalid config ({source}): {problems}") from None
