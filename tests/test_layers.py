"""The import layers declared in pyproject.toml ([tool.importlinter]) hold, and crossing one
breaks a contract: each case adds one upward import to the real import graph."""

from __future__ import annotations

import logging
from pathlib import Path

import grimp
import pytest
from importlinter.cli import lint_imports

CONFIG = str(Path(__file__).resolve().parents[1] / "pyproject.toml")
BROKEN = 1


@pytest.fixture(autouse=True)
def loggers_left_enabled():
    """lint_imports configures logging with dictConfig, which disables every logger that
    exists already; the tests that run later in this process read those loggers."""
    loggers = [logging.getLogger(name) for name in logging.root.manager.loggerDict]
    disabled = [logger.disabled for logger in loggers]
    yield
    for logger, was in zip(loggers, disabled, strict=True):
        logger.disabled = was


def test_the_layers_hold(capsys):
    assert lint_imports(config_filename=CONFIG, no_cache=True) == 0, capsys.readouterr().out


@pytest.mark.parametrize(
    ("importer", "imported"),
    [
        ("biencoder.kernels.infonce", "biencoder.losses.infonce"),  # kernels below losses
        ("biencoder.runtime.device", "biencoder.model.bert"),  # runtime below everything
        ("biencoder.model.biencoder", "biencoder.losses.pairwise"),  # model beside losses
        ("biencoder.data.beir", "biencoder.data.mining.negatives"),  # readers below pipelines
        ("biencoder.retrieval.bm25", "biencoder.data.beir"),  # retrieval below data
        ("biencoder.evaluation.metrics", "biencoder.training.trainer"),
        ("biencoder.train", "biencoder.eval"),  # entry points apart
    ],
)
def test_an_upward_import_breaks_a_contract(importer, imported, monkeypatch, capsys):
    build_graph = grimp.build_graph

    def with_the_import(*args, **kwargs):
        graph = build_graph(*args, **kwargs)
        assert importer in graph.modules and imported in graph.modules
        graph.add_import(importer=importer, imported=imported)
        return graph

    monkeypatch.setattr(grimp, "build_graph", with_the_import)
    assert lint_imports(config_filename=CONFIG, no_cache=True) == BROKEN
    report = capsys.readouterr().out
    assert f"{importer} -> {imported}" in report, report
