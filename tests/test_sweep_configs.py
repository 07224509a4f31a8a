"""Sweep configs: the Optuna search (hparams_search=infonce_optuna) and the multirun
launchers (hydra/launcher=local|slurm) compose, and a local multirun really runs.

The plugins come with the `dev` extra (optuna sweeper, joblib launcher) or the `sweep`
extra (also submitit); a test whose plugin is missing is skipped.
"""

import subprocess
import sys

import pytest
from configs import CONF, ROOT, compose_train
from hydra.types import RunMode
from omegaconf import OmegaConf

from biencoder import train as train_cli


def test_infonce_optuna_search_space_and_objective():
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    from hydra_plugins.hydra_optuna_sweeper._impl import create_params_from_overrides
    from optuna.distributions import CategoricalDistribution, LogUniformDistribution

    cfg = compose_train("hparams_search=infonce_optuna", hydra_config=True)
    sweeper = cfg.hydra.sweeper
    assert sweeper._target_.endswith("optuna_sweeper.OptunaSweeper")
    assert sweeper.direction == "maximize"
    assert sweeper.sampler._target_ == "optuna.samplers.TPESampler"
    assert sweeper.sampler.seed is not None
    assert cfg.hydra.mode == RunMode.MULTIRUN

    # Parsed as the sweeper parses them, so the tags and bounds are checked, not the strings.
    distributions, fixed = create_params_from_overrides(
        [f"{key}={value}" for key, value in sweeper.params.items()]
    )
    assert fixed == {}
    assert distributions == {
        "loss.temperature": LogUniformDistribution(0.01, 0.1),
        "optim.lr": LogUniformDistribution(1e-5, 1e-4),
        "trainer.batch_size": CategoricalDistribution([16, 32, 64]),
    }
    for key in distributions:
        assert OmegaConf.select(cfg, key) is not None, f"{key} is not a config key"

    # The objective is a dev score, and the test set is never evaluated during the search.
    assert cfg.optimized_metric.startswith("dev/")
    assert cfg.trainer.eval is False


def test_infonce_optuna_objective_is_a_key_train_returns(tiny_run, tmp_path):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    cfg = compose_train(*tiny_run("beir", "hparams_search=infonce_optuna"))
    metrics = train_cli.train(cfg, tmp_path)
    assert cfg.optimized_metric in metrics
    assert not (tmp_path / "metrics.json").exists()


def test_slurm_launcher_composes_with_our_values():
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    launcher = compose_train("hydra/launcher=slurm", hydra_config=True).hydra.launcher
    assert launcher._target_.endswith("submitit_launcher.SlurmLauncher")
    ours = OmegaConf.load(CONF / "hydra" / "launcher" / "slurm.yaml")
    del ours.defaults
    # Ours come after the plugin's defaults (_self_ last), so every value here wins.
    assert {key: launcher[key] for key in ours} == OmegaConf.to_container(ours, resolve=True)
    assert launcher.gpus_per_node == 1 and launcher.tasks_per_node == 1
    assert launcher.partition is None


def test_slurm_launcher_submits_one_training_process_per_gpu(tmp_path, monkeypatch):
    """The sbatch script submitit would submit, built as hydra-submitit-launcher builds its
    executor: K GPUs give K tasks per node, each a rank of one DDP run."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    import submitit
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
    from submitit.slurm.slurm import SlurmExecutor

    # The executor looks for srun; writing the script needs none.
    monkeypatch.setattr(SlurmExecutor, "affinity", staticmethod(lambda: 1))

    launcher = compose_train(
        "hydra/launcher=slurm",
        "hydra.launcher.gpus_per_node=4",
        "hydra.launcher.partition=gpu",
        hydra_config=True,
    ).hydra.launcher
    params = OmegaConf.to_container(launcher, resolve=True)
    params.pop("_target_")
    executor = submitit.AutoExecutor(
        folder=tmp_path, cluster="slurm", slurm_max_num_timeout=params.pop("max_num_timeout")
    )
    params.pop("submitit_folder")
    base = set(OmegaConf.structured(BaseQueueConf).keys())
    executor.update_parameters(**{k if k in base else f"slurm_{k}": v for k, v in params.items()})
    script = executor._executor._make_submission_file_text("python -u train.py", "uid")
    for line in (
        "#SBATCH --gpus-per-node=4",
        "#SBATCH --ntasks-per-node=4",
        "#SBATCH --nodes=1",
        "#SBATCH --partition=gpu",
    ):
        assert line in script, script


def test_local_launcher_composes_to_joblib():
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher")
    launcher = compose_train("hydra/launcher=local", hydra_config=True).hydra.launcher
    assert launcher._target_.endswith("joblib_launcher.JoblibLauncher")
    assert launcher.n_jobs == 2


# `slow` (12 s): the default run's time limit (README); test_sweeps.py runs a multirun and
# the test above checks that hydra/launcher=local composes the joblib launcher.
@pytest.mark.slow
def test_local_multirun_runs_two_jobs_in_parallel(tiny_run, tmp_path):
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher")
    sweep_dir = tmp_path / "sweep"
    overrides = tiny_run(
        "beir",
        "trainer.max_steps=1",
        "trainer.eval=false",
        "hydra/launcher=local",
        "hydra.launcher.n_jobs=2",
        f"hydra.sweep.dir={sweep_dir}",
        "seed=0,1",
    )
    proc = subprocess.run(
        [sys.executable, "train.py", "-m", *overrides],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Joblib.Parallel(n_jobs=2" in proc.stdout + proc.stderr
    seeds = set()
    for job in ("0", "1"):
        run_dir = sweep_dir / job
        assert (run_dir / "metrics.jsonl").is_file()
        seeds.add(OmegaConf.load(run_dir / ".hydra" / "config.yaml").seed)
    assert seeds == {0, 1}
