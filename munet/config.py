"""Run configuration: one dataclass, validated, loadable from TOML/JSON files and overridable from the CLI."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from munet import __version__
from munet.errors import ConfigError, StoreError
from munet.evolution.hparams import DATA_RANGES, MODEL_RANGES, MU_POLICIES

DEVICES = ("auto", "cpu", "cuda")
LOGS = ("", "tensorboard")
EXECUTORS = ("local", "ray")
SCHEDULES = ("round_robin", "agents")
SCHEDULE_SPANS = ("child", "iteration")
RANDOM_STREAMS = ("run", "child")
AMORTISE_OVER = ("all", "started")


def generations_per_iteration(children_per_task: int, generation_size: int, separate_probes: bool) -> int:
    """Generations per task iteration: the children's, plus the probe generation when probes are separate."""
    return math.ceil(children_per_task / generation_size) + int(separate_probes)


#: Values of keys added after runs were first stored, as munet behaved before each key existed.
BEFORE_KEYS_EXISTED: dict[str, Any] = {"separate_probes": False, "probe_validations": 0, "accept_ties": False,
                                       "stop_margin": 0.0, "keep_diverged": False, "schedule": "round_robin",
                                       "schedule_span": "child", "parent_decay": 0.5,
                                       "lineage_lr_decay": 1.0, "judged_mutations": False, "mutation_twins": False,
                                       "start_twins": False,
                                       "length_ramp": 0.0,
                                       "affordable_clones": False, "given_back_adapters": False,
                                       "root_clones_only": False, "first_task_finetune": False,
                                       "accept_margin": 0.0, "affordable_gain": 1.0,
                                       "amortise_root": False, "amortise_over": "all", "frozen_bottom": 0,
                                       "remove_layers": True, "random_streams": "run"}


#: Upper bounds far past any run that could end (a month of a large machine): they stop a typo, an extra zero or
#: three, from planning a run that never finishes or hanging ``--dry-run``.
UPPER_BOUNDS: dict[str, int] = {"rounds": 100_000, "children_per_task": 10_000, "generation_size": 10_000,
                                "validations": 10_000, "steps_between_validations": 1_000_000, "batch_size": 65_536,
                                "probe_validations": 10_000, "max_val_examples": 10_000_000, "max_seeds": 10_000,
                                "max_task_population": 1_000_000, "threads": 4_096, "feature_cache_mb": 10**8,
                                "data_cache_mb": 10**8, "depth": 1_000, "max_depth": 1_000}


@dataclass
class RunConfig:
    """Every knob of a muNet run. Field docs are shown by ``munet run --help``.

    Attributes:
        tasks: task specs in round-robin order (registry names, ``folder:PATH``, ``npz:PATH``, ``torchvision:NAME``,
            ``hf:NAME``, ``split:TASK:a-b``).
        root: root model spec (``dinov2-imgfocus``, ``timm:NAME``, ``file:PATH[@ARCH]``, ``random[:ARCH]``).
        depth: number of root blocks kept (0: all); paths start with this many.
        max_depth: the deepest a path may grow by the ``num_layers`` mutation: an increment re-adds the root's next
            pretrained block, up to this many (the spec's layer re-addition, bounded by the root's full depth); 0:
            ``depth``, no growth. A deeper path costs more compute per image, which the core-hours show.
        image_size: default image size in pixels (a multiple of the root's patch size).
        max_image_size: largest image size evolution may reach.
        scale_factor: s of the score ``quality · s^(accounted/P)``; 1 is pure quality.
        compute_scale: s_c of µ2Net+'s compute term ``· s_c^(flops/F)``; 1 disables it.
        children_per_task: children sampled per task iteration.
        generation_size: children trained together on the same batches.
        rounds: round-robin passes over the tasks (with ``schedule = "agents"``: each agent's cycles).
        schedule: ``round_robin`` (one task iteration after another, deterministic) or ``agents`` (µ3Net: one
            agent per task, running concurrently as local processes, or Ray actors with ``executor = "ray"``; each
            reads the others' latest published paths before its cycles, so results depend on timing).
        batch_size: training batch size.
        steps_between_validations: maximum training steps between two validations.
        validations: validations per child, on average with ``length_ramp`` (training steps = the two multiplied).
        max_val_examples: size of the fixed validation subset.
        lr: the root path's ``opt_lr``, i.e. the learning rate children start from (one of the evolvable values).
        crop_area_min: the root path's ``ds_area_range_min``: random crops keep at least this share of the image's
            area (1.0: no crop; the spec's muNet default is 0.05); evolvable from there.
        flip: the root path's ``ds_flip_left_right``: random horizontal flips (the spec's muNet default: on);
            evolvable from there.
        standardise_head: a new head reads ``(cls - mu) / sigma`` with statistics frozen from 256 training images
            (munet's deviation, docs/design.md); ``false``: the spec's plain zero-initialised head on the class token.
        mutation_prob: μ (the initial μ for the evolved policies).
        clone_prob: probability of cloning (copying, then training) each frozen transformer block a child reuses
            (fixed policy), or its initial value (per_action, at most 0.3); the evolved policy draws it with its own
            μ. The frozen patch embedding, class token and position embedding clone with ``mutation_prob``.
        adapter_prob: probability that a mutated child trains an adapter of its own before each block: inserts one
            where there is none, or clones the frozen one it reuses there (fixed policy); or its initial value
            (per_action, at most 0.3); the evolved policy draws it with its own μ.
        mu_policy: ``fixed`` (muNet), ``evolved`` (µ2Net) or ``per_action`` (µ2Net+).
        mutate_adapters: allow inserting residual adapters.
        inherit_momentum: µ2Net's optimiser-state inheritance: a cloned component starts training from the momentum
            trace of the component it was cloned from (traces are stored with the run, one per trained component).
        max_task_population: keep at most this many paths per task after each generation (0: no cap).
        max_seeds: probe at most this many other tasks' paths at the start of a task iteration (0: all).
        separate_probes: probe the seeds (other tasks' paths and the root, head-only) in a generation of their own
            before the task's children, instead of in the first children's slots (the spec), so every one of the
            ``children_per_task`` children is a mutated one.
        probe_validations: validation periods each separate probe trains (0: ``validations``, as a child).
        accept_ties: accept a child whose validation score equals its parent's (µ2Net's ``>=``); muNet is strict.
        accept_margin: a child is accepted only once a validation scores more than this above the score it must
            beat (its parent's best); its later snapshots need only beat its own best. Against the optimism of a
            ratchet of children on a small validation set (0: the spec's strict test).
        stop_margin: stop a child early at a validation scoring more than this below its parent's score while it
            has nothing accepted yet (0: never), to spend the compute on other children.
        keep_diverged: a child that diverges after an accepted validation keeps that snapshot (the spec).
        schedule_span: what one warmup-cosine learning-rate schedule spans: ``child`` (the spec: every child warms
            up and decays to 0 over its own training) or ``iteration`` (the children of a task iteration train
            consecutive parts of one schedule, so later children refine their parents at lower rates).
        parent_decay: parent sampling walks the task's paths best first and takes each w.p.
            ``parent_decay ** offsprings`` (its children so far), else a seed or own path uniformly (the spec: 0.5);
            1 always extends the best path, so the budget deepens one lineage.
        lineage_lr_decay: a child of a path of its own task trains at this times its parent's learning-rate scale
            (the scale starts at 1 in a child of a probe, another task's path or the root), so a lineage's warm
            restarts peak ever lower, as one long schedule would (1: every child at its ``opt_lr``, the spec).
        judged_mutations: a child whose parent cannot judge its changes (a probe, another task's path or the root:
            any trained child beats a head-only probe) only clones blocks; hyperparameter, layer, adapter and
            other mutations wait for a trained path of the task to be measured against, and the generation's data
            hyperparameters move once the task's best path is such a path (false: the spec).
        mutation_twins: a child that draws a model hyperparameter, layer or adapter mutation trains beside a twin
            that carries only its clones (the same parent, generation, batches and data hyperparameters); both
            are judged against the parent, and the task's best path is whichever validates higher (the twin on a
            tie), so such a move is kept for what it adds over the same clones trained as long, not for the
            training any child adds to its parent. Twins are extra children: more training images (false: the
            spec).
        start_twins: ``mutation_twins`` only for a child that starts a lineage (its parent a probe, another task's
            path or the root), whose moves any trained child would carry past its parent's head-only score; a few
            extra children per task instead of one per judged move (false: the spec).
        root_clones_only: a child whose parent descends from the root through paths of its own task only (nothing
            transferred from another task) only clones blocks, and the data hyperparameters hold while the task's
            best path does: with nothing to transfer, a hyperparameter or layer change that a child's short, noisy
            validation accepts is a lottery (false: the spec).
        first_task_finetune: while the system holds no other task's path (a run's first task), the task is one
            fine-tuning run cut into children: they only clone blocks and carry their momentum (µ2Net), and the
            data hyperparameters hold; tasks with something to transfer keep the whole search (false: the spec).
        length_ramp: the children of a task iteration train ever longer: their generations' validation periods rise
            linearly from ``1 - length_ramp`` to ``1 + length_ramp`` times ``validations``, the iteration's total
            kept, so early children explore and late ones, refining a lineage, train long enough to beat it (the
            default 0.5: 2, 2, 2, 3, 3, 4, 4, 4 of 3; 0: every child trains ``validations``, the spec).
        affordable_clones: a child of its own task's path gives back the clones it drew (bottom first, reusing the
            frozen component instead) that would leave it unable to beat its parent's score even at a perfect
            validation accuracy, which a scale factor below 1 makes common (false: the spec trains such children,
            which are always rejected). No effect at s = 1.
        affordable_gain: with ``affordable_clones``, the share of its parent's validation error a child is taken to
            remove at best when it judges what it can afford (1: a perfect validation accuracy, the default). Below
            1 a child at a low scale factor keeps only the clones that would pay at an accuracy it might reach, and
            gives the rest back (for adapters, with ``given_back_adapters``) instead of training a child whose
            clones doom it whatever it learns. No effect at s = 1.
        amortise_root: under a scale factor below 1, a root component a path reuses counts as shared by all the
            run's tasks, as the benchmark counts a baseline's frozen root (false: the spec, where a root block no
            other task's retained path reuses counts fully, so once the first task's clones carry the others the
            root, with an adapter per task, looks dearer than reusing that task's specialised blocks). No effect at
            s = 1.
        amortise_over: with ``amortise_root``, the tasks a root component is split between: ``all`` the run's tasks,
            or those ``started`` (with a retained path, and the path's own task), so the first task counts the root
            fully, as in the spec (a clone costs it no more than the root block), and the k-th task splits it k ways.
        given_back_adapters: with ``affordable_clones``, each layer whose clone a child gave back gets a fresh
            residual adapter instead (bottom first, while the child can still afford it), so that layer adapts at a
            price the scale factor allows (the default; false: the layer stays frozen). No effect at s = 1.
        frozen_bottom: the root's embedding (patch embedding, class token, position embedding) and its first N blocks
            are never cloned: every path reads them frozen and shared, as a freeze-N baseline trains above them (0:
            the spec, where any frozen component may be cloned; a lineage then ends up owning block 0, since every
            child draws its clone anew and a clone is never given back).
        remove_layers: a ``num_layers`` mutation may remove a path's top layer (the spec; with a root of ``depth``
            layers and no ``max_depth`` it can do nothing else); false: it only re-adds layers (with ``max_depth``),
            and a draw that would remove one changes nothing (it is drawn all the same, so a run in which no removal
            is drawn is the spec's run, bit for bit).
        random_streams: where the evolution's parent, mutation and data-hyperparameter draws come from: ``run``, one
            stream for the whole run (the default); ``child``, a stream of their own for each generation's
            data-hyperparameter draws and each child, seeded by the seed, task iteration, generation and slot, so a
            change to some draws leaves every other child's in place: two configurations compared on one seed differ
            by their own effect more than by reshuffled later draws (common random numbers for paired comparisons).
            Fresh components are still seeded by path id and batches drawn in sequence from the task iteration's
            stream, so a lever that changes how many children a run makes, or how long they train, moves those.
        seed: seed of every random stream.
        device: ``auto`` (CUDA when present), ``cpu`` or ``cuda``.
        threads: CPU threads torch computes with (``torch.set_num_threads``); 0 leaves torch's setting (by default
            all cores). The count is recorded with the run: results may differ in the last digits between counts.
        out: output directory.
        data_dir: where online data sets are downloaded.
        feature_cache_mb: memory bound of the frozen-feature cache; a training set's features beyond it are computed
            per batch, evaluation inputs beyond it are read and evaluated per batch.
        data_cache_mb: memory bound of decoded images: a folder or ``.npz`` task whose images would exceed it is
            read per batch, keeping what fits of this bound (shared by all such tasks); smaller tasks load whole.
        shared_training: train a generation's children in lock-step, computing each shared frozen prefix once;
            ``False`` trains them one after another (the official code's way). Results are the same; together with
            ``feature_cache_mb = 0`` it measures what sharing saves.
        log: live metrics besides the terminal: ``tensorboard`` writes every child's validation curve, the
            acceptance decisions and each task's best accuracy as TensorBoard event files under ``OUT/tensorboard``
            (needs ``munet[tensorboard]``); empty: none.
        executor: where children train: ``local`` (this process) or ``ray`` (one Ray task per child, needs
            ``munet[ray]``); results are the same.
        ray_address: the Ray cluster of ``executor = "ray"`` (what ``ray start --head`` prints); unset: the cluster
            ``RAY_ADDRESS`` or a local ``ray start`` names, else a new Ray instance on this machine.
    """

    tasks: list[str] = field(default_factory=lambda: [
        "fashion_mnist", "mnist_5k", "uci_digits", "animal_silhouettes", "faces", "textures", "surfaces",
        "fashion_mnist_coarse"])
    root: str = "dinov2-imgfocus"
    depth: int = 6
    max_depth: int = 0
    image_size: int = 42
    max_image_size: int = 56
    scale_factor: float = 1.0
    compute_scale: float = 1.0
    children_per_task: int = 8
    generation_size: int = 1
    rounds: int = 1
    schedule: str = "round_robin"
    batch_size: int = 64
    steps_between_validations: int = 20
    validations: int = 3
    max_val_examples: int = 1000
    lr: float = 0.02
    crop_area_min: float = 1.0
    flip: bool = False
    standardise_head: bool = True
    mutation_prob: float = 0.03
    clone_prob: float = 0.5
    adapter_prob: float = 0.03
    mu_policy: str = "fixed"
    mutate_adapters: bool = True
    inherit_momentum: bool = False
    max_task_population: int = 0
    max_seeds: int = 3
    separate_probes: bool = True
    probe_validations: int = 1
    accept_ties: bool = False
    stop_margin: float = 0.0
    accept_margin: float = 0.0
    keep_diverged: bool = True
    schedule_span: str = "iteration"
    parent_decay: float = 0.5
    lineage_lr_decay: float = 1.0
    judged_mutations: bool = False
    mutation_twins: bool = False
    start_twins: bool = False
    root_clones_only: bool = False
    first_task_finetune: bool = False
    length_ramp: float = 0.5
    affordable_clones: bool = True
    affordable_gain: float = 1.0
    amortise_root: bool = False
    amortise_over: str = "all"
    given_back_adapters: bool = True
    frozen_bottom: int = 0
    remove_layers: bool = True
    random_streams: str = "run"
    seed: int = 0
    device: str = "auto"
    threads: int = 0
    out: str = "runs/default"
    data_dir: str = "data"
    feature_cache_mb: int = 2048
    data_cache_mb: int = 1024
    shared_training: bool = True
    log: str = ""
    executor: str = "local"
    ray_address: str | None = None

    def validate(self) -> RunConfig:
        """Raises ConfigError naming the first value outside its allowed range; returns self."""
        if not self.tasks:
            raise ConfigError("tasks: at least one task is needed")
        if not all(isinstance(t, str) and t.strip() for t in self.tasks):
            raise ConfigError(f"tasks: every task must be a non-empty spec string, got {self.tasks}")
        if len(set(self.tasks)) != len(self.tasks):
            raise ConfigError(f"tasks: duplicate entries in {self.tasks}")
        if not self.out.strip():
            raise ConfigError("out: the run directory is empty; name one, e.g. --out runs/mine")
        positive = ("children_per_task", "generation_size", "rounds", "batch_size", "steps_between_validations",
                    "validations", "max_val_examples", "image_size", "max_image_size")
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("depth", "max_depth", "max_task_population", "max_seeds", "feature_cache_mb", "data_cache_mb",
                     "probe_validations", "threads", "frozen_bottom"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name, most in UPPER_BOUNDS.items():
            if getattr(self, name) > most:
                raise ConfigError(f"{name} must be <= {most:,}, got {getattr(self, name):,}")
        for name in ("scale_factor", "compute_scale"):
            if not 0 < getattr(self, name) <= 1:
                raise ConfigError(f"{name} must be in (0, 1], got {getattr(self, name)}")
        if self.max_depth and not 0 < self.depth <= self.max_depth:
            raise ConfigError(f"max_depth {self.max_depth} needs a depth in 1..{self.max_depth} to grow from, got "
                              f"depth {self.depth}")
        if self.depth and self.frozen_bottom > (self.max_depth or self.depth):
            raise ConfigError(f"frozen_bottom {self.frozen_bottom} exceeds the {self.max_depth or self.depth} root "
                              "blocks a path can hold; at most that many")
        if not 0 <= self.length_ramp < 1:
            raise ConfigError(f"length_ramp must be in [0, 1), got {self.length_ramp}")
        if not 0 <= self.stop_margin <= 1:
            raise ConfigError(f"stop_margin must be in [0, 1], got {self.stop_margin}")
        if not 0 <= self.accept_margin <= 1:
            raise ConfigError(f"accept_margin must be in [0, 1], got {self.accept_margin}")
        for name in ("parent_decay", "lineage_lr_decay", "affordable_gain"):
            if not 0 < getattr(self, name) <= 1:
                raise ConfigError(f"{name} must be in (0, 1], got {getattr(self, name)}")
        for name in ("mutation_prob", "clone_prob", "adapter_prob"):
            if not 0 <= getattr(self, name) <= 1:
                raise ConfigError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if self.lr not in MODEL_RANGES["opt_lr"]:
            raise ConfigError(f"lr must be one of {MODEL_RANGES['opt_lr']}, got {self.lr}")
        if self.crop_area_min not in DATA_RANGES["ds_area_range_min"]:
            raise ConfigError(f"crop_area_min must be one of {DATA_RANGES['ds_area_range_min']}, got "
                              f"{self.crop_area_min}")
        if self.mu_policy not in MU_POLICIES:
            raise ConfigError(f"mu_policy must be one of {list(MU_POLICIES)}, got {self.mu_policy!r}")
        if self.device not in DEVICES:
            raise ConfigError(f"device must be one of {list(DEVICES)}, got {self.device!r}")
        if self.log not in LOGS:
            raise ConfigError(f"log must be one of {list(LOGS)} (empty: no live log), got {self.log!r}")
        if self.executor not in EXECUTORS:
            raise ConfigError(f"executor must be one of {list(EXECUTORS)}, got {self.executor!r}")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"schedule must be one of {list(SCHEDULES)}, got {self.schedule!r}")
        if self.amortise_over not in AMORTISE_OVER:
            raise ConfigError(f"amortise_over must be one of {list(AMORTISE_OVER)}, got {self.amortise_over!r}")
        if self.schedule_span not in SCHEDULE_SPANS:
            raise ConfigError(f"schedule_span must be one of {list(SCHEDULE_SPANS)}, got {self.schedule_span!r}")
        if self.random_streams not in RANDOM_STREAMS:
            raise ConfigError(f"random_streams must be one of {list(RANDOM_STREAMS)}, got {self.random_streams!r}")
        if self.ray_address and self.executor != "ray":
            raise ConfigError(f"ray_address {self.ray_address!r} is set but executor is {self.executor!r}; add "
                              "--executor ray")
        if self.first_task_finetune and self.schedule == "agents":  # an agent's first cycle is alone by timing
            raise ConfigError("first_task_finetune needs schedule = round_robin: asynchronous agents have no first "
                              "task (each starts before the others publish)")
        if self.image_size > self.max_image_size:
            raise ConfigError(f"image_size {self.image_size} exceeds max_image_size {self.max_image_size}")
        largest = 1024  # pixels; bounds the activations of a batch, which grow with the square of the image size
        if self.max_image_size > largest:
            raise ConfigError(f"max_image_size must be <= {largest} pixels, got {self.max_image_size}")
        if not 0 <= self.seed < 2**63:  # what every random stream (numpy, torch, Python) accepts as a seed
            raise ConfigError(f"seed must be in [0, 2^63), got {self.seed}")
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_stored(cls, stored: dict[str, Any]) -> RunConfig:
        """The configuration a run recorded; a key it lacks (added after the run was made) takes the value that
        reproduces how munet behaved before the key existed, not today's default.

        Raises:
            StoreError: not an object (a damaged or edited database), or a key this munet does not know (the run was
                written by a newer munet).
        """
        if not isinstance(stored, dict):
            raise StoreError(f"the run's stored configuration is a {type(stored).__name__}, not an object: the "
                             "database was damaged or edited; restore the run from a copy")
        unknown = sorted(set(stored) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise StoreError(f"the run's stored configuration has keys munet {__version__} does not know "
                             f"({', '.join(unknown)}): the run was written by a newer munet; read and resume it with "
                             "that version")
        # at s = 1 no clone is ever unaffordable, so a run of then is one of today's default too
        unscaled = stored.get("scale_factor", cls.scale_factor) == 1.0
        mu = stored.get("mutation_prob", cls.mutation_prob)  # clones and adapters were drawn with μ
        before = {**BEFORE_KEYS_EXISTED, "clone_prob": mu, "adapter_prob": mu,
                  "affordable_clones": unscaled, "given_back_adapters": unscaled}
        return cls().replace(**{**before, **stored})

    def root_depth(self) -> int | None:
        """The root blocks a run loads: ``max_depth`` when paths may grow, else ``depth`` (``None``: all)."""
        return self.max_depth or self.depth or None

    def generations(self) -> int:
        return generations_per_iteration(self.children_per_task, self.generation_size, self.separate_probes)

    def replace(self, **changes: Any) -> RunConfig:
        """A copy with ``changes`` applied; unknown keys raise ConfigError."""
        known = {f.name: f for f in dataclasses.fields(self)}
        for key, value in changes.items():
            if key not in known:
                raise ConfigError(f"unknown configuration key {key!r}; known keys: {', '.join(known)}")
            changes[key] = _coerce(key, value, getattr(self, key))
        return dataclasses.replace(self, **changes)


#: Text keys that may also be unset (``None``).
_OPTIONAL_TEXT = ("ray_address",)


def _coerce(key: str, value: Any, current: Any) -> Any:
    """Converts ``value`` to the type of the field's current value, with a clear error on failure."""
    try:
        if isinstance(current, bool):
            if isinstance(value, str):
                if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError(value)
                return value.lower() in ("true", "1", "yes")
            if value not in (0, 1):  # bool(2) or bool([]) would hide a mistake
                raise ValueError(value)
            return bool(value)
        if isinstance(current, list):
            from munet.data.registry import split_specs  # lazily: it loads torch, which --help does not need

            return split_specs(value) if isinstance(value, str) else list(value)
        if isinstance(value, bool):  # TOML's `rounds = true` would otherwise read as 1
            raise ValueError(value)
        if isinstance(current, str) or key in _OPTIONAL_TEXT:  # text or a path: str(["a"]) once named a run "['a']"
            if value is None and key in _OPTIONAL_TEXT:
                return None
            if not isinstance(value, (str, os.PathLike)):
                raise ValueError(value)
            return os.fspath(value)
        if isinstance(current, (int, float, str)) and not isinstance(value, type(current)):
            if isinstance(current, int) and isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return type(current)(value)
    except (TypeError, ValueError) as err:
        kind = "str" if key in _OPTIONAL_TEXT else type(current).__name__
        raise ConfigError(f"{key}: cannot read {value!r} as {kind}") from err
    return value


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Reads a TOML or JSON config file into a dict of overrides."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise ConfigError(f"cannot read config file {path}: {err.strerror}") from err
    except UnicodeDecodeError as err:
        raise ConfigError(f"config file {path} is not UTF-8 text (byte {err.start} cannot be decoded); save it as "
                          "UTF-8 TOML or JSON") from err
    try:
        data = json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
    except (tomllib.TOMLDecodeError, json.JSONDecodeError) as err:
        kind = "JSON" if path.suffix == ".json" else "TOML"
        raise ConfigError(f"config file {path} is not valid {kind}: {err}") from err
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a table of key = value pairs")
    return data
