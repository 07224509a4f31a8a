"""One writer per run folder, no deletion through links, and every check before the first
byte of a run: what train.py does with the folder it writes."""

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from configs import ROOT, compose_train
from hydra import initialize_config_dir
from omegaconf import OmegaConf

from biencoder import train as train_cli
from biencoder.runtime import lock
from biencoder.training.hydra_config import CONFIG_DIR, ConfigError
from biencoder.training.run_folder import (
    Launch,
    LockRunFolder,
    check_launch,
    clear_run,
    config_groups,
    config_targets,
    existing_run_files,
    read_launch,
)


def train_steps(run_dir: Path) -> list[int]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(x)["step"] for x in lines if "train/loss" in x]


def test_a_second_run_into_a_folder_being_trained_in_changes_nothing_there(tiny_run, tmp_path):
    """Two commands on one hydra.run.dir: the second stops before Hydra writes .hydra/,
    naming the first's pid; trainer.overwrite=true does not clear the live run either."""
    run_dir = tmp_path / "run"
    first = subprocess.Popen(
        [
            sys.executable,
            "train.py",
            *tiny_run("beir", "trainer.max_steps=100000", "trainer.save_every=100000"),
            "trainer.eval=false",
            "train_data.dev_queries=0",
            "seed=1",
            f"hydra.run.dir={run_dir}",
        ],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 300
        while not (run_dir / "metrics.jsonl").exists():
            assert first.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        hydra_files = {p.name: p.read_text() for p in (run_dir / ".hydra").iterdir()}
        second = subprocess.run(
            [sys.executable, "train.py", *tiny_run("beir"), "seed=2", f"hydra.run.dir={run_dir}"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert second.returncode == 1
        assert f"hydra.run.dir: {run_dir} is being written by another process: " in second.stderr
        assert f"pid {first.pid} on host" in second.stderr
        assert {p.name: p.read_text() for p in (run_dir / ".hydra").iterdir()} == hydra_files
        # In-process (no Hydra callback): train() itself takes the lock before any change.
        overwrite = compose_train(*tiny_run("beir", "trainer.overwrite=true"))
        with pytest.raises(lock.LockedError, match=f"pid {first.pid}"):
            train_cli.train(overwrite, run_dir)
        assert first.poll() is None
    finally:
        first.send_signal(signal.SIGTERM)
        _, stderr = first.communicate(timeout=300)
    assert first.returncode == train_cli.EXIT_TERMINATED, stderr.decode()[-2000:]
    steps = train_steps(run_dir)
    assert steps == list(range(1, len(steps) + 1))  # one run's lines, none interleaved
    assert not (run_dir / lock.LOCK_NAME).exists()  # released on the way out


def test_pruning_removes_a_linked_checkpoint_s_link_not_its_files(tiny_run, tmp_path):
    """A user moved an old checkpoint to another disk and linked it back; a resumed run
    with trainer.keep_checkpoints=1 prunes the link, never the files it points to."""
    run_dir, elsewhere = tmp_path / "run", tmp_path / "other-disk"
    overrides = tiny_run("beir", "trainer.eval=false", "train_data.dev_queries=0")
    train_cli.train(compose_train(*overrides), run_dir)
    step1 = run_dir / "checkpoints" / "step-00000001"
    elsewhere.mkdir()
    shutil.move(step1, elsewhere / step1.name)
    step1.symlink_to(elsewhere / step1.name, target_is_directory=True)
    kept = sorted(p.name for p in (elsewhere / step1.name).iterdir())
    assert "checkpoint.json" in kept

    resume = [
        *overrides,
        "trainer.resume=true",
        "trainer.max_steps=3",
        "trainer.keep_checkpoints=1",
    ]
    train_cli.train(compose_train(*resume), run_dir)
    assert sorted(p.name for p in (elsewhere / step1.name).iterdir()) == kept
    assert not step1.is_symlink() and not step1.exists()
    assert train_steps(run_dir) == [1, 2, 3]


def test_overwrite_refuses_a_linked_run_file_before_deleting_anything(tiny_run, tmp_path):
    run_dir, elsewhere = tmp_path / "run", tmp_path / "scratch-checkpoints"
    overrides = tiny_run("beir", "trainer.eval=false", "train_data.dev_queries=0")
    train_cli.train(compose_train(*overrides), run_dir)
    shutil.move(run_dir / "checkpoints", elsewhere)
    (run_dir / "checkpoints").symlink_to(elsewhere, target_is_directory=True)
    before = sorted(p.name for p in run_dir.iterdir())
    with pytest.raises(ConfigError, match=r"trainer.overwrite: .*checkpoints is a symbolic link"):
        train_cli.train(compose_train(*overrides, "trainer.overwrite=true"), run_dir)
    assert sorted(p.name for p in run_dir.iterdir()) == before
    assert (elsewhere / "last" / "checkpoint.json").is_file()
    with pytest.raises(OSError, match="deletes nothing through a link"):
        clear_run(run_dir)
    assert (elsewhere / "last" / "checkpoint.json").is_file()


BAD_PAIRS = {
    "a row without its positive": (
        '{"query": "q1", "positive": "p1"}\n{"query": "q2"}\n',
        r"pairs\.jsonl:2",
    ),
    "every example repeats one text": (
        '{"query": "what is x", "positive": "x is y"}\n' * 50,
        "50 examples share the text 'what is x'",
    ),
    "a line that is not JSON": (
        '{"query": "q1", "positive": "p1"}\n{"query": \n',
        r"pairs\.jsonl:2",
    ),
}


@pytest.mark.parametrize("bad", sorted(BAD_PAIRS))
def test_a_run_refused_for_its_data_does_not_block_the_corrected_rerun(bad, tiny_run, tmp_path):
    run_dir, data = tmp_path / "run", tmp_path / "pairs.jsonl"
    text, message = BAD_PAIRS[bad]
    data.write_text(text)
    overrides = tiny_run(
        "beir", "train_data=jsonl", f"train_data.path={data}", "trainer.eval=false"
    )
    with pytest.raises(ConfigError, match=message):
        train_cli.train(compose_train(*overrides), run_dir)
    assert existing_run_files(run_dir) == []
    assert not (run_dir / lock.LOCK_NAME).exists()
    rows = [{"query": f"q{i}", "positive": f"passage {i}"} for i in range(16)]
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    train_cli.train(compose_train(*overrides), run_dir)  # the same command, no overwrite
    assert train_steps(run_dir) == [1, 2]


def test_a_disk_too_full_for_a_checkpoint_fails_before_the_first_write(
    tiny_run, tmp_path, monkeypatch
):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(
        "biencoder.runtime.files.shutil.disk_usage", lambda _: usage._replace(free=1000)
    )
    with pytest.raises(OSError, match=rf"hydra.run.dir: {run_dir}/checkpoints: 0 MiB free"):
        train_cli.train(compose_train(*tiny_run("beir", "trainer.eval=false")), run_dir)
    assert existing_run_files(run_dir) == []


# ----------------------------------------------------------------- launch.json is data


def launch_file(tmp_path: Path, record) -> Path:
    (tmp_path / "launch.json").write_text(json.dumps(record))
    return tmp_path / "launch.json"


def check(launch: Launch, tmp_path: Path, command_line=()) -> None:
    check_launch(
        launch,
        tmp_path / "launch.json",
        config_groups(CONFIG_DIR),
        config_targets(CONFIG_DIR),
        list(command_line),
    )


def test_a_launch_record_a_run_wrote_is_accepted(tmp_path):
    launch = Launch(
        overrides=["debug=tiny", "optim.lr=1e-4", "loss=triplet", "+train_data.sets.a=x"],
        choices={"trainer": "cpu", "loss": "triplet", "hydra/launcher": "basic"},
    )
    check(launch, tmp_path)
    # The shipped configs' own targets may be named, e.g. to swap a loss's class.
    check(Launch(["loss._target_=biencoder.training.tasks.TripletTask"], {}), tmp_path)


@pytest.mark.parametrize(
    ("record", "message"),
    [
        ({"overrides": [], "choices": {}, "extra": 1}, "expected the keys choices and overrides"),
        ([], "expected the keys choices and overrides, found list"),
        ({"overrides": "debug=tiny", "choices": {}}, "overrides: expected a list of strings"),
        ({"overrides": [], "choices": {"trainer": 3}}, "choices: expected a mapping"),
    ],
)
def test_a_launch_record_of_the_wrong_shape_is_refused_naming_the_file(record, message, tmp_path):
    path = launch_file(tmp_path, record)
    with pytest.raises(ValueError, match=f"{path}: not a launch record: {message}"):
        read_launch(tmp_path)
    path.write_text('{"overrides": [')
    with pytest.raises(ValueError, match=f"{path}: not a launch record: invalid JSON"):
        read_launch(tmp_path)


@pytest.mark.parametrize(
    ("launch", "message"),
    [
        (Launch(["model._target_=os.system"], {}), r"overrides\[0\] 'model._target_=os.system'"),
        (Launch(["debug=tiny", "+x._args_=[rm]"], {}), r"overrides\[1\] '\+x._args_=\[rm\]'"),
        (Launch(["optim.lr=="], {}), "not a command-line override"),
        (Launch([], {"trainer": "../../evil"}), "choices.trainer: '../../evil' is not one of"),
    ],
)
def test_a_hand_edited_launch_record_is_refused_naming_the_entry(launch, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        check(launch, tmp_path)


def test_code_in_a_launch_record_runs_only_when_the_resume_command_repeats_it(tmp_path):
    custom = "loss._target_=my_lab.losses.Custom"
    with pytest.raises(ValueError, match="names code to run"):
        check(Launch([custom], {}), tmp_path)
    check(Launch([custom], {}), tmp_path, command_line=[custom])


def test_resume_refuses_a_hand_edited_launch_record_before_composing_it(tiny_run, tmp_path):
    run_dir = tmp_path / "run"
    overrides = tiny_run("beir", "trainer.eval=false", "train_data.dev_queries=0")
    train_cli.train(compose_train(*overrides), run_dir, launch=Launch(overrides, {}))
    record = json.loads((run_dir / "launch.json").read_text())
    record["overrides"].append("+loss._target_=os.system")
    (run_dir / "launch.json").write_text(json.dumps(record))
    cfg = compose_train(*overrides, "trainer.resume=true")
    refused = r"trainer.resume: .*launch.json: overrides\[\d+\]"
    with (
        initialize_config_dir(CONFIG_DIR, version_base="1.3"),
        pytest.raises(ConfigError, match=refused),
    ):
        train_cli.resumed_config(cfg, True, run_dir, ["trainer.resume=true"], {})


TORCHRUN = {"WORLD_SIZE": "2", "MASTER_ADDR": "h", "MASTER_PORT": "1"}
SLURM = {"SLURM_NTASKS": "4", "SLURM_JOB_NODELIST": "n1", "SLURM_JOB_ID": "7"}


@pytest.mark.parametrize(
    ("env", "locks"),
    [
        ({}, True),
        ({**TORCHRUN, "RANK": "0", "LOCAL_RANK": "0"}, True),
        ({**TORCHRUN, "RANK": "1", "LOCAL_RANK": "1"}, False),
        ({**SLURM, "SLURM_PROCID": "3", "SLURM_LOCALID": "3"}, False),
    ],
)
def test_the_hydra_callback_locks_the_run_folder_on_rank_0_only(env, locks, tmp_path, monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    config = OmegaConf.create({"hydra": {"run": {"dir": str(tmp_path / "run")}}})
    callback = LockRunFolder()
    callback.on_run_start(config=config)
    assert (tmp_path / "run" / lock.LOCK_NAME).exists() == locks
    callback.on_run_end(config=config)
    assert not (tmp_path / "run" / lock.LOCK_NAME).exists()
