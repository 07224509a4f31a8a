"""Checkpoints: round trip, RNG restore, and recovery from crashes at every point of a save."""

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from model import BiEncoder, Encoder, EncoderConfig
from model.weights import save_hf_weights
from training.checkpoint import (
    CHECKPOINT_META,
    TRAINER_STATE,
    latest_checkpoint,
    load_trainer_state,
    prune_checkpoints,
    rng_state,
    save_checkpoint,
    set_rng_state,
)

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
        torch.save({"step": step}, folder / TRAINER_STATE)
    return folder


def assert_same(a, b) -> None:
    """Deep equality for nested containers of tensors, arrays and plain values."""
    assert type(a) is type(b)
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            assert_same(a[key], b[key])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            assert_same(x, y)
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b)
    elif isinstance(a, np.ndarray):
        assert np.array_equal(a, b)
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
    torch.save({"step": 300}, tmp_path / "step-00000300" / TRAINER_STATE)
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

    from training.checkpoint import save_checkpoint


    class BigModel:
        # Stands in for a BiEncoder: writing 64 MB of weights takes a while.
        def save_pretrained(self, path):
            path.mkdir(parents=True)
            (path / "model.safetensors").write_bytes(bytes(64 << 20))


    class Stall:
        # Pickled inside torch.save, after the weights and with trainer_state.pt open:
        # says so, then hangs until the test kills the process.
        def __reduce__(self):
            Path(sys.argv[2]).touch()
            time.sleep(600)


    root = Path(sys.argv[1])
    save_checkpoint(root, "step-00000100", BigModel(), {"step": 100})
    save_checkpoint(root, "last", BigModel(), {"step": 100})
    save_checkpoint(root, "last", BigModel(), {"step": 200, "stall": Stall()})
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
    assert (tmp[0] / TRAINER_STATE).exists()  # killed while writing it
    assert load_trainer_state(root / "last") == {"step": 100}
    assert latest_checkpoint(root) in (root / "last", root / "step-00000100")
