"""Fine-tune a bi-encoder, select it on a dev set, then evaluate it.

    python train.py                                      # MiniLM on SciFact train -> test
    python train.py experiment=sts                       # CoSENT on STS-B -> STS-B test
    python train.py pooling=cls loss=triplet trainer.batch_size=64 optim.lr=3e-5
    python train.py logger=wandb                         # also log to Weights & Biases
    python train.py debug=tiny                           # two steps on tiny data, in seconds
    python train.py train_data=hf train_data.path=DIR    # a 🤗 datasets folder or files
    python train.py train_data=multi +train_data@train_data.sets.a=scifact \
        +train_data@train_data.sets.b=hf train_data.sets.b.path=DIR   # several sets
    python train.py trainer.max_steps=N hydra.run.dir=DIR
    python train.py hydra.run.dir=DIR trainer.resume=true   # continue a stopped run

The run folder holds ``metrics.jsonl`` (a line per step and per dev evaluation),
``metrics.summary.json`` (the final test and best dev values), ``checkpoints/``
(``step-*``, ``best/`` and ``last/``, each a ``save_pretrained`` folder plus trainer state,
written atomically), ``hard_negatives.json`` (when negatives were mined), ``metrics.json``
(the final evaluation of the dev-selected model on ``eval_data``; of ``last`` when there is
no dev set) and ``.hydra/``.
"""

from __future__ import annotations

import copyreg
import importlib
import json
import logging
import os
import random
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import hydra
import numpy as np
import torch
import torch.utils.deterministic
from hydra import compose
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import get_method
from omegaconf import DictConfig, OmegaConf

from biencoder.data.beir import BeirDataset
from biencoder.data.eval_sets import BeirEvalSet, StsEvalSet
from biencoder.data.hf import HfTrainingSet
from biencoder.data.training_sets import (
    BeirTrainingSet,
    JsonlTrainingSet,
    MultiTrainingSet,
    StsTrainingSet,
    TrainingSet,
)
from biencoder.evaluation.config import EvalConfig
from biencoder.evaluation.scoring import STORE_FOLDER, evaluate
from biencoder.model.biencoder import BiEncoder
from biencoder.model.lora import ADAPTER_DIR, load_adapter_state
from biencoder.retrieval.store import Sharding
from biencoder.runtime import lock
from biencoder.runtime.device import resolve_device
from biencoder.runtime.files import check_free_space
from biencoder.training.checkpoint import (
    LEGACY_TRAINER_STATE,
    TRAINER_STATE,
    check_writable,
    latest_checkpoint,
    load_trainer_state,
    write_json,
)
from biencoder.training.config import TrainerConfig
from biencoder.training.distributed import Distributed, init_distributed, shutdown
from biencoder.training.hydra_config import (
    CONFIG_DIR,
    ConfigError,
    build,
    check_dims,
    check_index,
    model_width,
    naming,
    register,
    settings,
)
from biencoder.training.loggers import JsonlLogger, MultiLogger
from biencoder.training.run_folder import (
    CHANGEABLE_ON_RESUME,
    LAUNCH,
    Launch,
    changeable_on_resume,
    check_launch,
    clear_run,
    config_groups,
    config_targets,
    existing_run_files,
    override_key,
    read_launch,
    refuse_linked_run_files,
    run_lock_path,
    write_launch,
)
from biencoder.training.tasks import Task
from biencoder.training.trainer import (
    EXIT_TERMINATED,
    ShardedEncoder,
    Terminated,
    Trainer,
    compile_towers,
)

log = logging.getLogger("train")

# The joblib and submitit launchers cloudpickle main() by value, with the torch modules its
# code reaches; this one is a ModuleType subclass cloudpickle cannot pickle
# (cloudpipe/cloudpickle#405), so it travels by name and is re-imported in the worker.
copyreg.pickle(
    type(torch.utils.deterministic), lambda module: (importlib.import_module, (module.__name__,))
)

WANDB_TAG_LIMIT = 64
# Hard negatives mined for this run, reused on resume: dense mining with the resumed
# checkpoint's model would otherwise give other negatives than the run started with.
HARD_NEGATIVES = "hard_negatives.json"
TrainingSpec = (
    BeirTrainingSet | StsTrainingSet | JsonlTrainingSet | HfTrainingSet | MultiTrainingSet
)


def check_run_folder(run_dir: Path, trainer: TrainerConfig) -> None:
    """Before anything is written (but the lock): refuse to mix two runs in ``run_dir``;
    with ``trainer.overwrite``, refuse a run file that is a link (overwrite deletes nothing
    through one); fail now if it cannot be written. Every rank checks."""
    existing = existing_run_files(run_dir)
    if existing and trainer.resume is False and not trainer.overwrite:
        raise ConfigError(
            f"hydra.run.dir: {run_dir} already holds a run ({', '.join(existing)}); "
            "continue it with trainer.resume=true, or delete it and start over with "
            "trainer.overwrite=true"
        )
    if existing and trainer.resume is False:
        try:
            refuse_linked_run_files(run_dir)
        except OSError as err:
            raise ConfigError(f"trainer.overwrite: {err}") from err
    checkpoints = run_dir / "checkpoints"
    for folder in (run_dir, checkpoints) if checkpoints.is_dir() else (run_dir,):
        check_writable(folder)


def start_run_folder(
    run_dir: Path, trainer: TrainerConfig, launch: Launch | None, dist: Distributed
) -> None:
    """The run's first writes, once every check has passed: with ``trainer.overwrite`` the
    old run's files go, then launch.json of a new run. Rank 0 alone changes the folder."""
    dist.barrier()
    if dist.is_main:
        existing = existing_run_files(run_dir)
        if existing and trainer.resume is False:
            log.warning("trainer.overwrite=true: deleting %s from %s", ", ".join(existing), run_dir)
            clear_run(run_dir)
        (run_dir / "checkpoints").mkdir(exist_ok=True)
        if launch is not None and trainer.resume is False:
            write_launch(run_dir, launch)
    dist.barrier()


def checkpoint_bytes(model: BiEncoder, task: Task) -> int:
    """About what one checkpoint takes: the weights, and AdamW's two moments of each
    trained parameter."""
    params = [*model.parameters(), *task.parameters()]
    weights = sum(p.numel() * p.element_size() for p in params)
    moments = sum(2 * p.numel() * 4 for p in params if p.requires_grad)
    return weights + moments


@dataclass
class RunPlan:
    """Everything train() needs from the config, built and checked before any file is read."""

    trainer: TrainerConfig
    evaluation: EvalConfig
    task: Task
    train_data: TrainingSpec
    eval_data: BeirEvalSet | StsEvalSet | None
    optimizer: Callable[..., torch.optim.Optimizer]
    scheduler: Callable[..., torch.optim.lr_scheduler.LRScheduler]


def build_training_spec(node: DictConfig) -> TrainingSpec:
    """The ``train_data`` node built; with several sets, each is built under its own key
    (``train_data.sets.<name>``), so that a bad value names the set."""
    # "object": typed nested nodes (train_data=synthetic's synthesis) arrive as dataclasses.
    if get_method(node._target_) is not MultiTrainingSet:
        return build(node, "train_data", _convert_="object")
    if OmegaConf.is_missing(node, "sets") or not node.sets:
        raise ConfigError(
            "train_data.sets: no training set; add them as "
            "+train_data@train_data.sets.NAME=OPTION (e.g. =scifact, =hf)"
        )
    sets = {
        name: build(child, f"train_data.sets.{name}", _convert_="object")
        for name, child in node.sets.items()
    }
    # Called directly: instantiate would merge the built sets, dataclasses, back into the
    # config as nodes of their own.
    options = {k: v for k, v in node.items() if k not in ("_target_", "sets")}
    with naming("train_data", MultiTrainingSet):
        return MultiTrainingSet(sets=sets, **options)


def training_specs(spec: TrainingSpec) -> list[tuple[str, TrainingSpec]]:
    """(config key, set) for the one training set, or for each set of a several-set run."""
    if isinstance(spec, MultiTrainingSet):
        return [(f"train_data.sets.{name}", s) for name, s in spec.sets.items()]
    return [("train_data", spec)]


def plan_run(cfg: DictConfig) -> RunPlan:
    """Build every cheap part of ``cfg`` and check that they fit together; a bad value
    raises a ConfigError that names its key. Nothing is loaded."""
    trainer = settings(cfg.trainer, "trainer", TrainerConfig)
    evaluation = settings(cfg.evaluation, "evaluation", EvalConfig)
    task: Task = build(cfg.loss, "loss")
    train_data = build_training_spec(cfg.train_data)
    eval_data = build(cfg.eval_data, "eval_data") if trainer.eval else None
    for key, spec in training_specs(train_data):
        # Outside the try: a set that cannot tell its type (an hf set's missing column) is
        # its own error, not the loss's.
        with naming(key, type(spec)):
            example_type = spec.example_type()
        try:
            task.check_accepts(example_type)
        except ValueError as err:
            raise ConfigError(f"loss: {err}; {key} ({type(spec).__name__}) gives those") from err
    width = model_width(cfg.model)
    check_dims("loss.matryoshka_dims", task.matryoshka_dims, width)
    check_dims("evaluation.matryoshka_dims", evaluation.matryoshka_dims, width)
    check_index(evaluation, width)
    optimizer = build(cfg.optim, "optim")
    scheduler = build(cfg.sched, "sched")
    # Both are partials: calling them once on a stand-in parameter checks their arguments now.
    with naming("optim", get_method(cfg.optim._target_)):
        probe = optimizer([torch.nn.Parameter(torch.zeros(1))])
    with naming("sched", get_method(cfg.sched._target_)):
        scheduler(probe, num_training_steps=1)
    return RunPlan(trainer, evaluation, task, train_data, eval_data, optimizer, scheduler)


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        # cuBLAS is deterministic only with a fixed workspace; read when it first starts.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)


def resume_checkpoint(resume: bool | str, checkpoints: Path) -> Path | None:
    if resume is False or resume is None:
        return None
    if resume is True:
        found = latest_checkpoint(checkpoints)
        if found is None:
            raise FileNotFoundError(
                f"trainer.resume=true but {checkpoints} holds no complete "
                "checkpoint; pass hydra.run.dir of the run to continue, "
                "or trainer.resume=PATH"
            )
        return found
    path = Path(resume)
    # An old-format folder passes here so that loading it says why it is refused.
    if not any((path / name).is_file() for name in (TRAINER_STATE, LEGACY_TRAINER_STATE)):
        raise FileNotFoundError(f"trainer.resume: {path} is not a checkpoint (no {TRAINER_STATE})")
    return path


def train_length(trainer_max_length: int | None, model: BiEncoder) -> int:
    """Tokens per text while training: ``trainer.max_length`` (the model's own limit when
    null), capped at the encoder's position limit."""
    limit = model.query_tower.encoder.config.max_tokens
    length = trainer_max_length or model.config.max_length
    if length > limit:
        log.warning(
            "trainer.max_length=%d is more than the model's %d positions: training at %d",
            length,
            limit,
            limit,
        )
    return min(length, limit)


def load_training_set(
    spec: TrainingSpec, model: BiEncoder, run_dir: Path, resumed: bool, dist: Distributed
) -> TrainingSet:
    """The training set, with the hard negatives this run mined when it started if it is a
    resumed run, so that a resumed run trains on the examples the interrupted one did
    (:func:`save_negatives` keeps them). On several ranks, rank 0 mines and the others take
    its negatives. Reads only."""
    negatives_file = run_dir / HARD_NEGATIVES
    saved = None
    if resumed and negatives_file.is_file():
        saved = json.loads(negatives_file.read_text())
    with naming("train_data", spec):
        if dist.enabled and saved is None:
            mined = spec.load(model).negatives if dist.is_main else None
            saved = dist.broadcast_object(mined)
        return spec.load(model, negatives=saved)


def save_negatives(train_set: TrainingSet, run_dir: Path, resumed: bool, dist: Distributed) -> None:
    """Keep the negatives this run mined, for a resume to train on the same examples."""
    negatives_file = run_dir / HARD_NEGATIVES
    if train_set.negatives is not None and dist.is_main and not negatives_file.is_file():
        if resumed:
            log.warning("%s has no %s: negatives were mined again", run_dir, HARD_NEGATIVES)
        write_json(negatives_file, train_set.negatives)


def train(
    cfg: DictConfig,
    run_dir: Path,
    group: str | None = None,
    tags: Sequence[str] = (),
    launch: Launch | None = None,
    dist: Distributed | None = None,
) -> dict[str, float]:
    """Train as ``cfg`` says, writing everything into ``run_dir``.

    Returns the final evaluation metrics (none with ``trainer.eval=false``) plus
    ``dev/<metric>``, the best dev value of the selection metric when there is a dev set.
    ``group`` and ``tags`` go to the logger (W&B) unless its config sets a group; ``launch``
    (how the command line started the run) is recorded in the folder of a new run, for
    ``trainer.resume=true`` to continue with; ``dist`` is this process's place in a
    multi-process run (see :mod:`training.trainer`). Raises :class:`NonFiniteError` when
    training diverges and :class:`Terminated` on SIGTERM, both after saving what can be
    saved.
    """
    plan = plan_run(cfg)
    dist = dist or Distributed(device=resolve_device(cfg.device))
    if plan.trainer.batch_size % dist.world_size:
        raise ConfigError(
            f"trainer.batch_size: {plan.trainer.batch_size} examples cannot be split evenly "
            f"across {dist.world_size} processes; use a multiple of {dist.world_size}"
        )
    # One writer per run folder: rank 0 holds its lock (already held when Hydra started
    # this process) until the run ends.
    with lock.hold(run_lock_path(run_dir), "hydra.run.dir") if dist.is_main else nullcontext():
        return run_training(cfg, plan, run_dir, group, tags, launch, dist)


def run_training(
    cfg: DictConfig,
    plan: RunPlan,
    run_dir: Path,
    group: str | None,
    tags: Sequence[str],
    launch: Launch | None,
    dist: Distributed,
) -> dict[str, float]:
    """train()'s work once ``run_dir`` is this process's alone."""
    trainer, evaluation, task = plan.trainer, plan.evaluation, plan.task
    # Everything that can fail on the config, the folder, the model or the data does so
    # before the folder holds a byte of this run, so a corrected command is never refused
    # as "already holds a run".
    make_logger = build(cfg.logger, "logger") if cfg.get("logger") else None
    check_run_folder(run_dir, trainer)
    checkpoints = run_dir / "checkpoints"
    device = dist.device
    seed_everything(cfg.seed, trainer.deterministic)

    resume_from = resume_checkpoint(trainer.resume, checkpoints)
    if resume_from is not None and not (resume_from / ADAPTER_DIR).is_dir():
        model = BiEncoder.from_pretrained(resume_from)
    else:
        model = build(cfg.model, "model", _convert_="object")
        if resume_from is not None:
            # A LoRA run's checkpoint is merged; it resumes on its base, whose frozen
            # weights are the run's model.path, with its adapters and heads put back.
            load_adapter_state(model, resume_from)
    model.to(device).train()
    task.to(device)
    for tower in {id(t): t for t in (model.query_tower, model.tower("doc"))}.values():
        tower.encoder.gradient_checkpointing = trainer.gradient_checkpointing
        tower.encoder.set_dropout(trainer.hidden_dropout, trainer.attention_dropout)
    if trainer.compile:
        compile_towers(model)
    max_length = train_length(trainer.max_length, model)
    log.info("training at up to %d tokens per text", max_length)
    train_set = load_training_set(plan.train_data, model, run_dir, resume_from is not None, dist)
    task.check_examples(train_set.examples)

    state = load_trainer_state(resume_from) if resume_from else None
    run_id = state.get("wandb_run_id") if state else None
    with naming("trainer", TrainerConfig):
        fitter = Trainer(
            model,
            task,
            train_set,
            trainer,
            evaluation,
            plan.optimizer,
            plan.scheduler,
            checkpoints=checkpoints,
            logger=None,
            seed=cfg.seed,
            max_length=max_length,
            run_id=run_id,
            dist=dist,
            store=run_dir / STORE_FOLDER,
        )
    if state is not None:
        fitter.load_state_dict(state)
        log.info("resumed from %s at step %d", resume_from, fitter.step)
    check_free_space(checkpoints, checkpoint_bytes(model, task), "hydra.run.dir", "a checkpoint")

    start_run_folder(run_dir, trainer, launch, dist)
    save_negatives(train_set, run_dir, resume_from is not None, dist)
    if dist.is_main:
        loggers = [JsonlLogger(run_dir / "metrics.jsonl", resume_step=state and state["step"])]
        if make_logger is not None:
            loggers.append(
                make_logger(
                    run_dir=run_dir,
                    config=OmegaConf.to_container(cfg, resolve=True),
                    name=run_dir.name,
                    run_id=run_id,
                    group=cfg.logger.get("group") or group or cfg.task_name,
                    tags=[*cfg.logger.get("tags", []), *tags],
                )
            )
        fitter.logger = MultiLogger(loggers)
        fitter.run_id = next((lg.run_id for lg in loggers if hasattr(lg, "run_id")), run_id)
    logger = fitter.logger
    best = fitter.fit()
    log.info("final model: %s", checkpoints / "last")

    final: dict[str, float] = {}
    if plan.eval_data is not None:
        selected = checkpoints / ("best" if best else "last")
        log.info("evaluating %s on %s", selected, plan.eval_data)
        selected_model = BiEncoder.from_pretrained(selected, device=device)
        if trainer.compile:
            compile_towers(selected_model)
        with naming("eval_data", plan.eval_data):
            dataset = plan.eval_data.load()
        if dist.enabled and not isinstance(dataset, BeirDataset):
            selected_model = ShardedEncoder(selected_model, dist)
        out_dir = run_dir if dist.is_main else None
        # The dev evaluation that chose this checkpoint left its corpus in the store: a
        # final evaluation on the same corpus encodes only the test queries.
        final = evaluate(
            selected_model,
            dataset,
            evaluation,
            out_dir,
            evaluation.matryoshka_dims,
            store=run_dir / STORE_FOLDER,
            sharding=Sharding(dist.rank, dist.world_size, dist.barrier),
        )
        if logger is not None:
            logger.summary({f"test/{k}": v for k, v in final.items()})
    if best is not None:
        final = {**final, f"dev/{fitter.selection}": best["value"]}
    if logger is not None:
        if best is not None:
            logger.summary({f"dev/best_{fitter.selection}": best["value"]})
        # Written by every run that reaches its end, so a finished run is told from a killed one.
        logger.summary(
            {"train/steps": fitter.step, "train/nonfinite_steps": fitter.nonfinite_steps}
        )
        logger.finish()
    return final


def sweep_identity(hydra_config, task_name: str) -> tuple[str | None, list[str]]:
    """W&B group and tags of a multirun job: every job of one sweep shares the group
    ``task_name/<sweep folder>`` and is tagged with its overrides (``pooling=cls``, ...),
    so the W&B UI groups and filters a sweep as ``compare.py`` does. (None, []) otherwise."""
    if hydra_config.mode != RunMode.MULTIRUN:
        return None, []
    group = f"{task_name}/{Path(hydra_config.sweep.dir).name}"
    # W&B refuses tags over 64 characters (paths in overrides, mostly): those stay out.
    tags = [o for o in hydra_config.overrides.task if len(o) <= WANDB_TAG_LIMIT]
    return group, tags


def log_trainer_choice(hydra_config) -> None:
    """Say which trainer profile runs and why: named on the command line, or picked for the
    machine by ``${hardware:}``."""
    choice = hydra_config.runtime.choices.get("trainer")
    if any(o.split("=", 1)[0] == "trainer" for o in hydra_config.overrides.task):
        log.info("trainer=%s (from the command line)", choice)
    else:
        reason = "CUDA is available" if torch.cuda.is_available() else "no CUDA device"
        log.info(
            "trainer=%s (picked for this machine: %s; trainer=cpu|gpu to choose)", choice, reason
        )


def resumed_config(
    cfg: DictConfig,
    resume: bool | str,
    run_dir: Path,
    overrides: Sequence[str],
    choices: dict[str, str | None],
) -> tuple[DictConfig, Launch | None]:
    """The configuration a resumed run continues with: the one its folder's launch.json
    records (its overrides and trainer profile), plus this command line's overrides of the
    keys allowed to change (``training.run_folder.CHANGEABLE_ON_RESUME``). An override of
    any other key is an error naming it, unless it repeats the run's own value. ``cfg`` and
    ``choices`` are what this command line composed. A folder without launch.json (written
    before it existed) resumes with ``cfg``, with a warning."""
    checkpoint_dir = run_dir if resume is True else Path(resume).parent.parent
    try:
        launch = read_launch(checkpoint_dir)
        if launch is not None:
            groups, targets = config_groups(CONFIG_DIR), config_targets(CONFIG_DIR)
            check_launch(launch, checkpoint_dir / LAUNCH, groups, targets, list(overrides))
    except ValueError as err:
        raise ConfigError(f"trainer.resume: {err}") from err
    if launch is None:
        log.warning(
            "%s has no %s: resuming with this command line's config", checkpoint_dir, LAUNCH
        )
        return cfg, None
    kept = [o for o in launch.overrides if not changeable_on_resume(override_key(o))]
    changes = [o for o in overrides if changeable_on_resume(override_key(o))]
    profile = [f"trainer={launch.choices['trainer']}"] if launch.choices.get("trainer") else []
    resumed = compose("train", overrides=[*profile, *kept, *changes])
    conflicts = []
    for override in overrides:
        key = override_key(override)
        if changeable_on_resume(key):
            continue
        if key in launch.choices:
            was, wanted = launch.choices[key], choices.get(key)
        else:
            was, wanted = OmegaConf.select(resumed, key), OmegaConf.select(cfg, key)
        if wanted != was:
            conflicts.append(f"{override} (the run has {key}={was})")
    if conflicts:
        raise ConfigError(
            f"trainer.resume: {'; '.join(conflicts)}. A resumed run keeps the configuration "
            f"it was started with ({checkpoint_dir / LAUNCH}); only "
            f"{', '.join(CHANGEABLE_ON_RESUME)} may change"
        )
    return resumed, launch


@hydra.main(config_path=CONFIG_DIR, config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> dict[str, float] | float:
    hydra_config = HydraConfig.get()
    run_dir = Path(hydra_config.runtime.output_dir)
    overrides = list(hydra_config.overrides.task)
    launch = Launch(overrides=overrides, choices=dict(hydra_config.runtime.choices))
    if cfg.trainer.resume is not False:
        choices = dict(hydra_config.runtime.choices)
        cfg, launch = resumed_config(cfg, cfg.trainer.resume, run_dir, overrides, choices)
    dist = init_distributed(cfg.device)
    if dist.enabled:
        # Without hydra.run.dir, each rank dates its own folder: rank 0's is the run's.
        run_dir = Path(dist.broadcast_object(str(run_dir)))
        if not dist.is_main:
            # Rank 0 reports progress; the others speak up only for warnings and errors.
            logging.getLogger().setLevel(logging.WARNING)
    if dist.is_main:
        log_trainer_choice(hydra_config)
    group, tags = sweep_identity(hydra_config, cfg.task_name)
    try:
        metrics = train(cfg, run_dir, group, tags, launch, dist)
    except Terminated:
        log.warning("exiting with %d; continue with trainer.resume=true", EXIT_TERMINATED)
        raise SystemExit(EXIT_TERMINATED) from None
    finally:
        shutdown(dist)
    # A hyperparameter sweeper (Optuna) optimises the one number main returns.
    name = cfg.get("optimized_metric")
    if name is None:
        return metrics
    if name not in metrics:
        raise KeyError(
            f"optimized_metric: {name!r} is not among this run's metrics "
            f"({', '.join(sorted(metrics))})"
        )
    return metrics[name]


register()

if __name__ == "__main__":
    main()
