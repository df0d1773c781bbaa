"""CDFT_REQUIRE_SHARED=1 turns a missing ../shared item from a skip into a failure."""
import pytest

from conftest import missing


def test_missing_shared_data_skips_by_default(monkeypatch):
  monkeypatch.delenv("CDFT_REQUIRE_SHARED", raising=False)
  with pytest.raises(pytest.skip.Exception, match="golden data not found"):
    missing("golden data not found at /nowhere")


def test_missing_shared_data_fails_when_required(monkeypatch):
  monkeypatch.setenv("CDFT_REQUIRE_SHARED", "1")
  with pytest.raises(pytest.fail.Exception, match=r"golden data not found .*CDFT_REQUIRE_SHARED=1"):
    missing("golden data not found at /nowhere")
