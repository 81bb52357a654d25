"""Fixtures of the stage tests: a tiny project folder with its corpus, tokenizer and shards."""

from __future__ import annotations

import importlib
import shutil

import pytest


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    """A project folder with corpus, tokenizer and shards of the tiny params (built once per
    test module; the stages run in-process)."""
    from tests.stages.test_stage_errors import TINY, write_params

    root = tmp_path_factory.mktemp("proj")
    write_params(root, TINY)
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        for stage in ("fetch", "tokenizer", "pack"):
            importlib.import_module(f"stages.{stage}").main()
    return root


@pytest.fixture()
def project(packed, tmp_path):
    """A copy of :func:`packed` that a test may break."""
    root = tmp_path / "proj"
    shutil.copytree(packed, root)
    return root
