"""Checkpoints: round trip, RNG restore, recovery from crashes at every point of a save,
state files that cannot run code, a full disk and a folder that cannot be written."""

import errno
import json
import logging
import math
import os
import pathlib
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import SafetensorError

from biencoder.model.bert import Encoder
from biencoder.model.biencoder import BiEncoder
from biencoder.model.config import EncoderConfig
from biencoder.model.weights import save_hf_weights
from biencoder.training.checkpoint import (
    CHECKPOINT_META,
    LEGACY_TRAINER_STATE,
    TRAINER_STATE,
    TRAINER_TENSORS,
    CheckpointError,
    check_writable,
    latest_checkpoint,
    load_trainer_state,
    prune_checkpoints,
    rng_state,
    save_checkpoint,
    save_trainer_state,
    set_rng_state,
)
from biencoder.training.schedules import warmup_schedule

TOKENIZER_FILES = (
    "vocab.txt",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
)
REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory, minilm_path) -> Path:
    """A random 2-layer, 32-wide encoder with MiniLM's tokenizer, as a model folder."""
    torch.manual_seed(0)
    config = EncoderConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64
    )
    folder = tmp_path_factory.mktemp("tiny")
    save_hf_weights(Encoder(config), folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps(config.to_hf_dict()))
    for name in TOKENIZER_FILES:
        shutil.copy(Path(minilm_path) / name, folder / name)
    return folder


@pytest.fixture
def tiny(tiny_model_dir) -> BiEncoder:
    return BiEncoder.from_pretrained(tiny_model_dir)


def fake_checkpoint(root: Path, name: str, step: int, *, state: bool = True) -> Path:
    """The files ``latest_checkpoint`` reads, without a model: enough to test the selection."""
    folder = root / name
    folder.mkdir(parents=True)
    (folder / CHECKPOINT_META).write_text(json.dumps({"step": step, "name": name}))
    if state:
        save_trainer_state(folder, {"step": step})
    return folder


class OpensAFile:
    """Unpickling this creates ``marker``: a stand-in for a malicious pickle payload."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def old_format_checkpoint(root: Path, name: str, step: int, marker: Path) -> Path:
    """A checkpoint as the pickle format wrote it, whose trainer state creates ``marker``
    when unpickled."""
    folder = root / name
    folder.mkdir(parents=True)
    (folder / CHECKPOINT_META).write_text(json.dumps({"step": step, "name": name}))
    torch.save({"step": step, "payload": OpensAFile(marker)}, folder / LEGACY_TRAINER_STATE)
    return folder


class FakeModel:
    """Stands in for a BiEncoder where the weights do not matter: a file of ``size`` bytes,
    after which saving fails with ``error`` if one is given."""

    def __init__(self, size: int = 1000, error: BaseException | None = None):
        self.size, self.error = size, error

    def save_pretrained(self, path: Path) -> None:
        path.mkdir(parents=True)
        (path / "model.safetensors").write_bytes(bytes(self.size))
        if self.error is not None:
            raise self.error


def assert_same(a, b) -> None:
    """Deep equality for nested containers of tensors, arrays and plain values, types and
    dtypes included."""
    assert type(a) is type(b)
    if isinstance(a, dict):
        assert list(a.keys()) == list(b.keys())
        for key in a:
            assert_same(a[key], b[key])
        assert_same(getattr(a, "_metadata", None), getattr(b, "_metadata", None))
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            assert_same(x, y)
    elif isinstance(a, torch.Tensor):
        assert (a.dtype, a.shape) == (b.dtype, b.shape)
        assert torch.equal(a, b)
    elif isinstance(a, (np.ndarray, np.generic)):
        assert (a.dtype, a.shape) == (b.dtype, b.shape)
        assert np.array_equal(a, b, equal_nan=a.dtype.kind == "f")
    elif isinstance(a, float) and math.isnan(a):
        assert math.isnan(b)
    else:
        assert a == b


def draws() -> tuple:
    return random.random(), np.random.rand(3).tolist(), torch.rand(3).tolist()


def test_round_trip_restores_weights_state_and_rng(tmp_path, tiny):
    with torch.no_grad():  # so the checkpoint must hold these weights, not the folder's
        for param in tiny.parameters():
            param.add_(torch.randn_like(param))
    torch.manual_seed(1)
    # Shaped like AdamW's state dict (a real optimizer would import torch._dynamo: seconds).
    optimizer = {
        "state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.randn(4, 8)}},
        "param_groups": [{"lr": 1e-3, "betas": (0.9, 0.999), "params": [0]}],
    }
    state = {
        "step": 100,
        "optimizer": optimizer,
        "rng": rng_state(),
        "sampler": {"epoch": 2, "batches_done": 7},
        "best_metric": 0.5,
        "wandb_run_id": "abc123",
    }
    expected = draws()

    path = save_checkpoint(tmp_path, "step-00000100", tiny, state)

    assert path == tmp_path / "step-00000100"
    assert json.loads((path / CHECKPOINT_META).read_text()) == {
        "step": 100,
        "name": "step-00000100",
    }
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000100"]
    loaded_model = BiEncoder.from_pretrained(path)
    for (name, saved), (_, reloaded) in zip(
        tiny.state_dict().items(), loaded_model.state_dict().items(), strict=True
    ):
        assert torch.equal(saved, reloaded), name
    loaded = load_trainer_state(path)
    assert_same(loaded, state)
    draws()  # move every generator on, so the restore has something to undo
    set_rng_state(loaded["rng"])
    assert draws() == expected


def test_saving_again_replaces_the_folder_and_leaves_no_leftovers(tmp_path, tiny):
    save_checkpoint(tmp_path, "last", tiny, {"step": 1})
    save_checkpoint(tmp_path, "last", tiny, {"step": 2})
    assert [p.name for p in tmp_path.iterdir()] == ["last"]
    assert load_trainer_state(tmp_path / "last") == {"step": 2}
    assert latest_checkpoint(tmp_path) == tmp_path / "last"


def test_save_refuses_a_missing_step_and_hidden_names(tmp_path, tiny):
    with pytest.raises(ValueError, match="step"):
        save_checkpoint(tmp_path, "last", tiny, {"epoch": 1})
    with pytest.raises(ValueError, match="plain folder name"):
        save_checkpoint(tmp_path, ".tmp-last", tiny, {"step": 1})


def test_latest_picks_the_highest_step(tmp_path):
    assert latest_checkpoint(tmp_path / "missing") is None
    assert latest_checkpoint(tmp_path) is None
    fake_checkpoint(tmp_path, "step-00000100", 100)
    fake_checkpoint(tmp_path, "best", 150)
    fake_checkpoint(tmp_path, "step-00000200", 200)
    assert latest_checkpoint(tmp_path) == tmp_path / "step-00000200"


def test_half_written_tmp_folder_is_never_picked(tmp_path):
    fake_checkpoint(tmp_path, "step-00000100", 100)
    fake_checkpoint(tmp_path, ".tmp-step-00000200-0123abcd", 200)
    assert latest_checkpoint(tmp_path) == tmp_path / "step-00000100"


def test_folder_without_trainer_state_or_marker_is_skipped(tmp_path):
    fake_checkpoint(tmp_path, "step-00000100", 100)
    fake_checkpoint(tmp_path, "step-00000200", 200, state=False)
    (tmp_path / "step-00000300").mkdir()
    save_trainer_state(tmp_path / "step-00000300", {"step": 300})
    (fake_checkpoint(tmp_path, "step-00000400", 400) / TRAINER_TENSORS).unlink()
    (fake_checkpoint(tmp_path, "step-00000500", 500) / TRAINER_STATE).unlink()
    assert latest_checkpoint(tmp_path) == tmp_path / "step-00000100"


def test_crash_between_the_renames_resumes_from_the_old_folder(tmp_path):
    # Saving `last` at step 300 died after moving the step-200 `last` aside.
    fake_checkpoint(tmp_path, "step-00000100", 100)
    fake_checkpoint(tmp_path, ".old-last-0123abcd", 200)
    fake_checkpoint(tmp_path, ".tmp-last-4567cdef", 300)
    assert latest_checkpoint(tmp_path) == tmp_path / ".old-last-0123abcd"
    assert prune_checkpoints(tmp_path, keep=5) == []
    assert latest_checkpoint(tmp_path) == tmp_path / ".old-last-0123abcd"


def test_regular_folder_wins_a_step_tie_with_an_old_one(tmp_path):
    fake_checkpoint(tmp_path, ".old-last-0123abcd", 200)
    fake_checkpoint(tmp_path, "last", 200)
    assert latest_checkpoint(tmp_path) == tmp_path / "last"


def test_prune_keeps_the_newest_step_folders_and_named_ones(tmp_path):
    for step in (100, 200, 300, 400, 500):
        fake_checkpoint(tmp_path, f"step-{step:08d}", step)
    fake_checkpoint(tmp_path, "best", 200)
    fake_checkpoint(tmp_path, "last", 500)

    deleted = prune_checkpoints(tmp_path, keep=2)

    assert sorted(p.name for p in deleted) == ["step-00000100", "step-00000200", "step-00000300"]
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == ["best", "last", "step-00000400", "step-00000500"]


def test_prune_removes_stale_leftovers_only_when_something_newer_is_complete(tmp_path):
    old = fake_checkpoint(tmp_path, ".old-last-0123abcd", 200)
    marked_tmp = fake_checkpoint(tmp_path, ".tmp-step-00000300-aa", 300, state=False)
    bare_tmp = tmp_path / ".tmp-last-bb"
    bare_tmp.mkdir()
    (bare_tmp / "model.safetensors").write_bytes(b"partial")
    for folder in (old, marked_tmp, bare_tmp):
        for path in (folder, *folder.iterdir()):
            os.utime(path, (1_000, 1_000))
    fake_checkpoint(tmp_path, "step-00000250", 250)

    deleted = prune_checkpoints(tmp_path, keep=5)

    # The step-300 tmp may still become complete: a step-250 checkpoint is not newer.
    assert sorted(p.name for p in deleted) == [".old-last-0123abcd", ".tmp-last-bb"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        ".tmp-step-00000300-aa",
        "step-00000250",
    ]


def test_prune_without_any_complete_checkpoint_deletes_nothing(tmp_path):
    fake_checkpoint(tmp_path, ".tmp-last-aa", 100, state=False)
    assert prune_checkpoints(tmp_path, keep=0) == []
    with pytest.raises(ValueError, match="keep"):
        prune_checkpoints(tmp_path, keep=-1)


WRITER = textwrap.dedent(
    """
    import sys
    import time
    from pathlib import Path

    from biencoder.training import checkpoint
    from biencoder.training.checkpoint import save_checkpoint


    class BigModel:
        # Stands in for a BiEncoder: writing 64 MB of weights takes a while.
        def save_pretrained(self, path):
            path.mkdir(parents=True)
            (path / "model.safetensors").write_bytes(bytes(64 << 20))


    def stall(tensors, path):
        # Writes the trainer state's tensors after the weights: writes part of the file,
        # says so, then hangs until the test kills the process.
        Path(path).write_bytes(b"partial")
        Path(sys.argv[2]).touch()
        time.sleep(600)


    root = Path(sys.argv[1])
    save_checkpoint(root, "step-00000100", BigModel(), {"step": 100})
    save_checkpoint(root, "last", BigModel(), {"step": 100})
    checkpoint.save_file = stall
    save_checkpoint(root, "last", BigModel(), {"step": 200})
    """
)


def test_sigkilled_writer_leaves_the_previous_checkpoint(tmp_path):
    root, ready = tmp_path / "ckpt", tmp_path / "ready"
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    writer = subprocess.Popen([sys.executable, str(script), str(root), str(ready)], env=env)
    try:
        deadline = time.monotonic() + 60
        while not ready.exists():
            assert writer.poll() is None, "writer exited before stalling"
            assert time.monotonic() < deadline, "writer never reached the stall"
            time.sleep(0.01)
        os.kill(writer.pid, signal.SIGKILL)
        assert writer.wait(timeout=10) == -signal.SIGKILL
    finally:
        if writer.poll() is None:
            writer.kill()
            writer.wait()

    tmp = [p for p in root.iterdir() if p.name.startswith(".tmp-last-")]
    assert len(tmp) == 1
    assert (tmp[0] / "model.safetensors").stat().st_size == 64 << 20
    assert (tmp[0] / TRAINER_TENSORS).exists()  # killed while writing it
    assert load_trainer_state(root / "last") == {"step": 100}
    assert latest_checkpoint(root) in (root / "last", root / "step-00000100")


def test_trainer_state_round_trip_keeps_types_and_resumes_adamw_and_lambdalr(tmp_path):
    def make() -> tuple:
        torch.manual_seed(0)
        module = torch.nn.Linear(4, 3)
        optimizer = torch.optim.AdamW(module.parameters(), lr=1e-2, betas=(0.8, 0.99))
        return module, optimizer, warmup_schedule(optimizer, num_training_steps=20)

    def train(module, optimizer, scheduler, steps: range) -> None:
        for step in steps:
            inputs = torch.randn(8, 4, generator=torch.Generator().manual_seed(step))
            module(inputs).pow(2).mean().backward()
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()

    module, optimizer, scheduler = make()
    train(module, optimizer, scheduler, range(3))
    base = torch.arange(10.0)
    state = {
        "step": 3,
        "best": {"step": 2, "value": float("nan")},
        "wandb_run_id": None,
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "task": module.state_dict(),  # an OrderedDict with _metadata
        "sampler": {"epoch": 1, "batches_done": 5},
        "rng": rng_state(),
        "nested": {
            1: "an int key",
            "1": "a str key",
            (2, "b"): ["a tuple key"],
            2.5: None,
            None: (),
            "tag lookalike": {"__tuple__": [1, 2]},
            "empty": [[], {}, OrderedDict(), (1, (2.5, (None,)))],
            "floats": [math.inf, -math.inf, -0.0, 1e-300, 0.1, 2**100],
            "text": 'ünïcode "quoted" \\ ',
            "tensors": [
                torch.arange(12).view(3, 4)[:, 1],  # not contiguous
                torch.tensor(1.5, dtype=torch.bfloat16),
                torch.tensor([True, False]),
                torch.empty(0, 3, dtype=torch.float16),
                base,
                base[2:5],  # a view of base, saved once each
            ],
            "arrays": [
                np.arange(6, dtype=np.int64).reshape(2, 3),
                np.array([np.nan, 1.5], dtype=np.float32),
                np.zeros(0, dtype=bool),
                np.float64(0.25),
                np.int32(-7),
            ],
        },
    }

    save_trainer_state(tmp_path, state)
    loaded = load_trainer_state(tmp_path)

    assert sorted(p.name for p in tmp_path.iterdir()) == [TRAINER_STATE, TRAINER_TENSORS]

    def no_constants(name: str):
        raise AssertionError(f"{name} is not JSON")

    json.loads((tmp_path / TRAINER_STATE).read_text(), parse_constant=no_constants)
    assert_same(loaded, state)

    resumed, resumed_optimizer, resumed_scheduler = make()
    resumed.load_state_dict(loaded["task"])
    resumed_optimizer.load_state_dict(loaded["optimizer"])
    resumed_scheduler.load_state_dict(loaded["scheduler"])
    train(module, optimizer, scheduler, range(3, 6))
    train(resumed, resumed_optimizer, resumed_scheduler, range(3, 6))
    for name, param in module.state_dict().items():
        assert torch.equal(param, resumed.state_dict()[name]), name
    assert resumed_scheduler.get_last_lr() == scheduler.get_last_lr()
    set_rng_state(loaded["rng"])


def test_save_refuses_a_state_it_cannot_store_before_writing_anything(tmp_path):
    with pytest.raises(TypeError, match=re.escape("state['sampler']['seen']: a set")):
        save_checkpoint(tmp_path, "last", FakeModel(), {"step": 1, "sampler": {"seen": {1}}})
    assert list(tmp_path.iterdir()) == []


def test_old_pickle_format_is_refused_and_never_unpickled(tmp_path):
    proof = tmp_path / "proof"
    torch.save(OpensAFile(proof), tmp_path / "probe.pt")
    torch.load(tmp_path / "probe.pt", weights_only=False).close()
    assert proof.exists(), "the payload must run when unpickled, or this test proves nothing"
    marker = tmp_path / "pwned"
    folder = old_format_checkpoint(tmp_path / "ckpt", "last", 200, marker)

    with pytest.raises(CheckpointError) as refused:
        load_trainer_state(folder)

    message = str(refused.value)
    assert str(folder / LEGACY_TRAINER_STATE) in message
    assert "pickle" in message and "could run arbitrary code" in message
    assert not marker.exists()


def test_latest_skips_an_old_format_folder_with_a_warning(tmp_path, caplog):
    marker = tmp_path / "pwned"
    root = tmp_path / "ckpt"
    old = old_format_checkpoint(root, "step-00000300", 300, marker)
    with caplog.at_level(logging.WARNING, logger="biencoder.training.checkpoint"):
        assert latest_checkpoint(root) is None
    fake_checkpoint(root, "step-00000100", 100)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="biencoder.training.checkpoint"):
        assert latest_checkpoint(root) == root / "step-00000100"
    assert str(old) in caplog.text
    assert LEGACY_TRAINER_STATE in caplog.text and "pickle" in caplog.text
    assert not marker.exists()


@pytest.mark.parametrize("damage", ["truncate json", "truncate tensors", "mismatched pair"])
def test_corrupt_state_file_is_refused_naming_it(tmp_path, damage):
    save_trainer_state(tmp_path, {"step": 1, "optimizer": {0: torch.randn(64)}})
    if damage == "mismatched pair":
        other = tmp_path / "other"
        other.mkdir()
        save_trainer_state(other, {"step": 2, "tensors": [torch.zeros(2), torch.ones(2)]})
        shutil.copy(other / TRAINER_TENSORS, tmp_path / TRAINER_TENSORS)
        named = tmp_path / TRAINER_STATE
    else:
        named = tmp_path / (TRAINER_STATE if damage == "truncate json" else TRAINER_TENSORS)
        named.write_bytes(named.read_bytes()[: named.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=re.escape(str(named))):
        load_trainer_state(tmp_path)


def write_then_fail(error: BaseException):
    """A writer that leaves part of its file behind, then fails with ``error``."""

    def write(tensors, path, *args, **kwargs):
        Path(path).write_bytes(b"part of a file")
        raise error

    return write


@pytest.mark.parametrize("where", ["model", "tensors", "json", "fsync"])
def test_full_disk_says_so_cleans_up_and_keeps_the_previous_checkpoint(
    tmp_path, monkeypatch, where
):
    root = tmp_path / "ckpt"
    save_checkpoint(root, "last", FakeModel(), {"step": 100, "rng": rng_state()})
    enospc = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    model, code = FakeModel(), errno.ENOSPC
    if where == "model":
        model = FakeModel(error=enospc)
    elif where == "tensors":  # what safetensors raises: no OSError, the errno only in words
        error = SafetensorError(
            "Error while serializing: I/O error: No space left on device (os error 28)"
        )
        monkeypatch.setattr("biencoder.training.checkpoint.save_file", write_then_fail(error))
    elif where == "json":
        code = errno.EDQUOT
        write_text = pathlib.Path.write_text

        def fail_on_state(path, text, *args, **kwargs):
            if path.name != TRAINER_STATE:
                return write_text(path, text, *args, **kwargs)
            write_text(path, text[:10])
            raise OSError(errno.EDQUOT, os.strerror(errno.EDQUOT))

        monkeypatch.setattr(pathlib.Path, "write_text", fail_on_state)
    else:  # delayed allocation: the writes went to the page cache, fsync finds no room

        def no_room(fd):
            raise enospc

        # Where the checkpoint's files are pushed to disk (runtime.files.fsync_tree).
        monkeypatch.setattr("biencoder.runtime.files.os.fsync", no_room)

    with pytest.raises(OSError, match="no space left on device") as failed:
        save_checkpoint(root, "last", model, {"step": 200, "rng": rng_state()})

    monkeypatch.undo()  # the checks below read with the real functions
    assert failed.value.errno == code
    assert str(root / "last") in str(failed.value)
    assert sorted(p.name for p in root.iterdir()) == ["last"]
    assert load_trainer_state(root / "last")["step"] == 100
    assert latest_checkpoint(root) == root / "last"


def test_other_write_errors_clean_up_and_pass_through(tmp_path):
    with pytest.raises(ValueError, match="bad config"):
        save_checkpoint(tmp_path, "last", FakeModel(error=ValueError("bad config")), {"step": 1})
    assert list(tmp_path.iterdir()) == []


def test_save_refuses_up_front_when_free_space_is_short(tmp_path, monkeypatch):
    root = tmp_path / "ckpt"
    first = save_checkpoint(root, "last", FakeModel(5000), {"step": 1})
    size = sum(p.stat().st_size for p in first.rglob("*") if p.is_file())
    usage = shutil.disk_usage(root)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=size - 1))
    model = FakeModel(5000)
    model.save_pretrained = None  # the refusal comes before the model is written

    # By default a checkpoint is expected to take as much as the largest one already there.
    with pytest.raises(OSError, match="no space left on device") as refused:
        save_checkpoint(root, "step-00000002", model, {"step": 2})
    assert refused.value.errno == errno.ENOSPC
    assert str(root / "step-00000002") in str(refused.value)
    with pytest.raises(OSError, match="min_free_bytes"):
        save_checkpoint(root, "last", model, {"step": 2}, min_free_bytes=size)
    assert sorted(p.name for p in root.iterdir()) == ["last"]

    save_checkpoint(root, "last", FakeModel(5000), {"step": 2}, min_free_bytes=size - 1)
    assert load_trainer_state(root / "last") == {"step": 2}


def test_check_writable_creates_the_folder_and_leaves_it_empty(tmp_path):
    folder = tmp_path / "run" / "checkpoints"
    check_writable(folder)
    assert folder.is_dir()
    assert list(folder.iterdir()) == []


@pytest.mark.skipif(
    os.geteuid() == 0,
    reason="root writes into a read-only folder: the simulated test below covers it",
)
def test_check_writable_refuses_a_read_only_folder(tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        with pytest.raises(PermissionError, match=re.escape(str(folder))):
            check_writable(folder)
        with pytest.raises(PermissionError, match=re.escape(str(folder / "checkpoints"))):
            check_writable(folder / "checkpoints")
    finally:
        folder.chmod(0o700)


def test_check_writable_refuses_a_folder_where_creating_a_file_is_denied(tmp_path, monkeypatch):
    def denied(*args, dir, **kwargs):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(Path(dir, "x")))

    monkeypatch.setattr(tempfile, "mkstemp", denied)
    folder = tmp_path / "run"
    with pytest.raises(PermissionError, match=re.escape(str(folder))):
        check_writable(folder)
