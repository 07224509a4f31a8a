"""train_data=multi: several training sets in one run, each batch from one set."""

import json
import math
from collections import Counter
from pathlib import Path

import datasets
import pytest
from configs import compose_train

from biencoder import train as train_cli
from biencoder.data.sampler import MultiSetBatchSampler, NoDuplicateBatchSampler
from biencoder.training.hydra_config import ConfigError
from biencoder.training.trainer import Trainer

SIZES = (120, 40, 64)  # examples per set: 30, 10 and 16 batches of 4
BATCH = 4


def samplers(seed: int = 0) -> list[NoDuplicateBatchSampler]:
    return [
        NoDuplicateBatchSampler(
            [(f"set{s} q{i}", f"set{s} d{i}") for i in range(n)], BATCH, seed=seed
        )
        for s, n in enumerate(SIZES)
    ]


def multi(sampling: str, seed: int = 0) -> MultiSetBatchSampler:
    return MultiSetBatchSampler(samplers(seed), sampling, seed)


def draw(sampler: MultiSetBatchSampler, count: int) -> list[list[int]]:
    """``count`` batches across epochs, as the trainer draws them."""
    batches: list[list[int]] = []
    while len(batches) < count:
        batches += list(sampler)
    return batches[:count]


def set_of(batch: list[int]) -> int:
    starts = [0, SIZES[0], SIZES[0] + SIZES[1]]
    sets = {max(s for s in range(3) if starts[s] <= i) for i in batch}
    assert len(sets) == 1, f"batch {batch} mixes sets {sets}"
    return sets.pop()


@pytest.mark.parametrize("sampling", ["proportional", "round_robin"])
def test_every_batch_comes_from_one_set_and_no_example_repeats_within_a_set_epoch(sampling):
    sampler = multi(sampling)
    batches = draw(sampler, 3 * len(sampler))
    for batch in batches:
        set_of(batch)
        assert len(batch) == BATCH and sampler.set_of(batch[0]) == set_of(batch)
    # Each set's first epoch: its own batches hold each of its examples once.
    for s, n in enumerate(SIZES):
        first_epoch = [i for b in batches if set_of(b) == s for i in b][:n]
        assert len(set(first_epoch)) == n


def test_round_robin_takes_the_sets_in_turn_until_the_smallest_runs_out():
    sampler = multi("round_robin")
    assert len(sampler) == 3 * min(SIZES) // BATCH
    assert [set_of(b) for b in draw(sampler, 100)] == [0, 1, 2] * 33 + [0]


def test_proportional_gives_each_set_its_batches_per_epoch_in_a_shuffled_order():
    sampler = multi("proportional")
    per_epoch = [n // BATCH for n in SIZES]
    assert len(sampler) == sum(per_epoch)
    orders = [[set_of(b) for b in list(sampler)] for _ in range(40)]
    for order in orders:
        assert Counter(order) == dict(enumerate(per_epoch))
    assert len({tuple(o) for o in orders}) == len(orders)  # a new shuffle every epoch
    # Shuffled, not blocked: over the first 14 batches of every epoch the share of the largest
    # set is that of the epoch (30 of 56), within 4 standard deviations of the
    # hypergeometric count; sets taken in sequence would give 14 of 14 every epoch.
    n, total, big = 14, sum(per_epoch), per_epoch[0]
    counts = [o[:n].count(0) for o in orders]
    mean = n * big / total
    sd = math.sqrt(n * big / total * (1 - big / total) * (total - n) / (total - 1))
    assert abs(sum(counts) / len(counts) - mean) < 4 * sd / math.sqrt(len(counts))


@pytest.mark.parametrize("sampling", ["proportional", "round_robin"])
def test_the_batches_are_a_function_of_the_seed(sampling):
    assert draw(multi(sampling, seed=1), 80) == draw(multi(sampling, seed=1), 80)
    assert draw(multi(sampling, seed=1), 80) != draw(multi(sampling, seed=2), 80)


@pytest.mark.parametrize("sampling", ["proportional", "round_robin"])
@pytest.mark.parametrize("stop_after", [0, 7, 30, 61])
def test_resume_continues_the_same_sequence(sampling, stop_after):
    reference = draw(multi(sampling), 150)
    interrupted = multi(sampling)
    batches = (batch for _ in range(100) for batch in interrupted)
    for _ in range(stop_after):
        next(batches)
    # The state goes through JSON, as in a checkpoint.
    state = json.loads(json.dumps(interrupted.state_dict()))
    resumed = multi(sampling)
    resumed.load_state_dict(state)
    assert draw(resumed, 150 - stop_after) == reference[stop_after:]


def test_a_state_for_another_number_of_sets_is_refused():
    state = multi("proportional").state_dict()
    state["sets"].pop()
    with pytest.raises(ValueError, match="holds 2 training sets, this run has 3"):
        multi("proportional").load_state_dict(state)


def test_an_unknown_sampling_is_refused():
    with pytest.raises(ValueError, match="sampling: 'random' is not one of"):
        multi("random")


# ----------------------------------------------------------------------------- runs


@pytest.fixture(scope="module")
def set_files(tmp_path_factory) -> dict[str, str]:
    """Two sets of SciFact pairs: a JSONL file and a saved 🤗 dataset, no text in common."""
    from biencoder.data.beir import load_beir
    from biencoder.data.paths import TINY_DIR

    root = tmp_path_factory.mktemp("sets")
    train = load_beir(TINY_DIR, "train")
    pairs = [
        (train.queries[q], train.corpus[sorted(train.qrels[q])[0]].full_text) for q in train.qrels
    ]
    pairs = list(dict((d, (q, d)) for q, d in pairs).values())  # one query per document
    jsonl = root / "pairs.jsonl"
    jsonl.write_text("".join(json.dumps({"query": q, "positive": d}) + "\n" for q, d in pairs[:24]))
    hf = root / "hf"
    rest = pairs[24:40]
    datasets.Dataset.from_dict(
        {"anchor": [q for q, _ in rest], "positive": [d for _, d in rest]}
    ).save_to_disk(str(hf))
    return {"jsonl": str(jsonl), "hf": str(hf)}


def multi_overrides(tiny_model_path: str, files: dict[str, str], *extra: str) -> list[str]:
    """A jsonl set ``pairs`` and an hf set ``qa``, four steps of 4 on the tiny model."""
    return [
        "train_data=multi",
        "+train_data@train_data.sets.pairs=jsonl",
        f"train_data.sets.pairs.path={files['jsonl']}",
        "+train_data@train_data.sets.qa=hf",
        f"train_data.sets.qa.path={files['hf']}",
        f"model.path={tiny_model_path}",
        "model.max_length=32",
        "trainer.max_length=32",
        "trainer.batch_size=4",
        "trainer.max_steps=4",
        "trainer.eval=false",
        *extra,
    ]


def train_lines(run_dir: Path) -> list[dict]:
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [line for line in lines if "train/loss" in line]


def set_losses(line: dict) -> dict[str, float]:
    return {
        k.removeprefix("train/loss/"): v for k, v in line.items() if k.startswith("train/loss/")
    }


def test_each_sets_loss_is_logged(tmp_path, tiny_model_path, set_files):
    overrides = multi_overrides(tiny_model_path, set_files, "train_data.sampling=round_robin")
    train_cli.train(compose_train(*overrides), tmp_path)
    lines = train_lines(tmp_path)
    assert [set_losses(line) for line in lines] == [
        {"pairs": lines[0]["train/loss"]},
        {"qa": lines[1]["train/loss"]},
        {"pairs": lines[2]["train/loss"]},
        {"qa": lines[3]["train/loss"]},
    ]


def test_a_sets_loss_is_its_mean_since_the_last_line(tmp_path, tiny_model_path, set_files):
    overrides = multi_overrides(
        tiny_model_path, set_files, "train_data.sampling=round_robin", "trainer.log_every=2"
    )
    train_cli.train(compose_train(*overrides), tmp_path)
    every_step = tmp_path / "every"
    train_cli.train(
        compose_train(
            *multi_overrides(tiny_model_path, set_files, "train_data.sampling=round_robin")
        ),
        every_step,
    )
    each = [line["train/loss"] for line in train_lines(every_step)]
    lines = train_lines(tmp_path)
    assert [line["step"] for line in lines] == [2, 4]
    assert set_losses(lines[1]) == pytest.approx({"pairs": each[2], "qa": each[3]})


def test_resume_draws_the_batches_of_an_uninterrupted_run(
    tmp_path, tiny_model_path, set_files, monkeypatch
):
    overrides = multi_overrides(tiny_model_path, set_files, "trainer.deterministic=true")
    whole, stopped = tmp_path / "whole", tmp_path / "stopped"
    train_cli.train(compose_train(*overrides), whole)
    step = Trainer.train_one_step

    def interrupted_after_two(self, prepared, progress):
        if self.step == 2:
            raise KeyboardInterrupt  # saves checkpoints/last, as Ctrl-C does
        step(self, prepared, progress)

    with monkeypatch.context() as patch:
        patch.setattr(Trainer, "train_one_step", interrupted_after_two)
        with pytest.raises(KeyboardInterrupt):
            train_cli.train(compose_train(*overrides), stopped)
    train_cli.train(compose_train(*overrides, "trainer.resume=true"), stopped)
    expected = [set_losses(line) for line in train_lines(whole)]
    assert [set_losses(line) for line in train_lines(stopped)] == expected
    assert len({name for losses in expected for name in losses}) == 2  # both sets were drawn


def test_the_dev_set_is_the_first_sets_that_has_one(tmp_path, tiny_model_path, set_files):
    from biencoder.data.paths import TINY_DIR

    overrides = multi_overrides(
        tiny_model_path,
        set_files,
        "+train_data@train_data.sets.scifact=scifact",
        f"train_data.sets.scifact.path={TINY_DIR}",
        "train_data.sets.scifact.dev_queries=20",
        "train_data.sets.scifact.hard_negatives=0",
        "trainer.max_steps=1",
    )
    plan = train_cli.plan_run(compose_train(*overrides))
    loaded = plan.train_data.load()
    assert [s.name for s in loaded.sets] == ["pairs", "qa", "scifact"]
    assert len(loaded.dev.queries) == 20
    assert len(loaded.examples) == sum(len(s.examples) for s in loaded.sets)


def test_a_set_the_loss_cannot_train_on_is_named(tiny_model_path, set_files):
    from biencoder.data.paths import STSB_DIR

    overrides = multi_overrides(
        tiny_model_path,
        set_files,
        "+train_data@train_data.sets.sts=sts",
        f"train_data.sets.sts.path={STSB_DIR}",
    )
    with pytest.raises(ConfigError) as err:
        train_cli.plan_run(compose_train(*overrides))
    assert str(err.value).startswith("loss: InfoNCETask trains on Pair or Triplet examples")
    assert str(err.value).endswith(
        "not on ScoredPair examples; train_data.sets.sts (StsTrainingSet) gives those"
    )


def test_a_bad_value_in_a_set_names_the_set(tiny_model_path, set_files):
    overrides = multi_overrides(tiny_model_path, set_files, "train_data.sets.pairs.format=csv")
    with pytest.raises(ConfigError, match=r"^train_data\.sets.pairs.format: 'csv' is not one of"):
        train_cli.plan_run(compose_train(*overrides))


def test_an_empty_set_is_named_by_its_key(tmp_path, tiny_model_path, set_files):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    files = {**set_files, "jsonl": str(empty)}
    with pytest.raises(ConfigError, match=rf"^train_data\.sets\.pairs: {empty}: no records"):
        train_cli.train(compose_train(*multi_overrides(tiny_model_path, files)), tmp_path / "run")


def test_debug_tiny_trains_several_sets_on_the_tiny_data(tmp_path, tiny_model_path, set_files):
    from biencoder.data.paths import TINY_DIR

    cfg = compose_train(
        "debug=tiny",
        f"model.path={tiny_model_path}",
        "trainer.eval=false",
        "train_data=multi",
        "+train_data@train_data.sets.scifact=scifact",
        "+train_data@train_data.sets.pairs=jsonl",
        f"train_data.sets.pairs.path={set_files['jsonl']}",
        "train_data.sampling=round_robin",
    )
    assert cfg.train_data.sets.scifact.path == str(TINY_DIR)
    train_cli.train(cfg, tmp_path)
    assert [set_losses(line).keys() for line in train_lines(tmp_path)] == [{"scifact"}, {"pairs"}]


def test_a_run_without_sets_is_refused():
    with pytest.raises(ConfigError, match=r"^train_data\.sets: no training set"):
        train_cli.plan_run(compose_train("train_data=multi"))


def test_a_set_too_small_for_a_batch_is_named(tmp_path, tiny_model_path, set_files):
    overrides = multi_overrides(tiny_model_path, set_files, "trainer.batch_size=20")
    with pytest.raises(ValueError, match="training set 'qa': there are only 16 training examples"):
        train_cli.train(compose_train(*overrides), tmp_path)


def test_the_sets_and_sampling_decide_the_batches(tmp_path, tiny_model_path, set_files):
    # The knob proof of train_data.sets and train_data.sampling (tests/test_knobs.py).
    def sets_drawn(*extra: str) -> list[str]:
        run_dir = tmp_path / str(len(list(tmp_path.iterdir())))
        train_cli.train(
            compose_train(*multi_overrides(tiny_model_path, set_files, *extra)), run_dir
        )
        return [name for line in train_lines(run_dir) for name in set_losses(line)]

    proportional = sets_drawn()
    assert sets_drawn("train_data.sampling=round_robin") == ["pairs", "qa", "pairs", "qa"]
    assert proportional != ["pairs", "qa", "pairs", "qa"]
    assert sets_drawn("~train_data.sets.pairs") == ["qa"] * 4
