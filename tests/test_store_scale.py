"""bench/store_scale.py at tiny sizes: each size in its own process, the streamed exact
search equal to the in-memory one, the tables and the projection printed; and its lazy
synthetic texts deterministic and sliceable as encode_to_store slices them."""

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def test_synthetic_texts_are_lazy_and_deterministic(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO_ROOT / "bench"))
    from store_scale import BLOCK, SyntheticIds, SyntheticTexts

    words = ["alpha", "beta", "gamma", "delta"]
    texts = SyntheticTexts(BLOCK + 10, words, seed=3, lo=2, hi=5)
    again = SyntheticTexts(BLOCK + 10, words, seed=3, lo=2, hi=5)
    assert list(texts) == [again[i] for i in range(len(again))]
    assert texts[BLOCK - 2 : BLOCK + 2] == list(texts)[BLOCK - 2 : BLOCK + 2]
    assert texts[-1] == list(texts)[-1]
    assert all(2 <= len(text.split()) <= 5 for text in texts)
    assert SyntheticTexts(5, words, seed=4, lo=2, hi=5)[:] != texts[:5]
    ids = SyntheticIds(3)
    assert list(ids) == ["d0", "d1", "d2"] and ids[1:] == ["d1", "d2"]


def test_store_scale_checks_streamed_against_in_memory(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(REPO_ROOT / "bench"))
    import store_scale

    report = tmp_path / "report.md"
    flags = "--sizes 300,600 --shard-rows 128 --queries 50 --batch-size 128"
    text, passed = store_scale.main(
        [*flags.split(), "--out", str(tmp_path / "work"), "--report", str(report)]
    )

    assert passed
    assert report.read_text() == text
    assert "Exact search, streamed against in-memory: passed." in text
    assert "| 300 | " in text and "| 600 | " in text
    assert "yes: ids equal in 50 of 50 queries" in text
    assert "## Projection to 384 dims (MiniLM)" in text
    assert "| 100 M | " in text
    # The stores are deleted without --keep; the model folder stays in --out.
    assert not list((tmp_path / "work").glob("docs-*"))
