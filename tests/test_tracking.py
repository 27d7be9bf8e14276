"""Tracking without MLflow, secrets kept out of params, and the default store's location."""

import sys
from pathlib import Path

from stbp.tracking import NullTracker, Tracker, default_tracking_uri, make_tracker, resolve_tracking_uri


def test_training_without_mlflow_installed_gets_a_null_tracker_and_one_notice(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, "mlflow", None)  # import mlflow now raises ImportError
    tracker = make_tracker(True, None, "x", pending_path=tmp_path / "p.jsonl")
    assert isinstance(tracker, NullTracker) and tracker.run_id is None
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and "MLflow is not installed" in out


def test_default_store_is_an_absolute_sqlite_file_in_the_working_directory(monkeypatch, tmp_path):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    assert default_tracking_uri() == f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"
    assert resolve_tracking_uri("sqlite:///rel.db") == f"sqlite:///{tmp_path.resolve() / 'rel.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:1")
    assert default_tracking_uri() == "http://127.0.0.1:1"


def test_secrets_never_reach_params_or_tags(tmp_path):
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    tracker = make_tracker(
        True, uri, "secrets", pending_path=tmp_path / "p.jsonl", tags={"api_token": "abc", "ok": "1"}
    )
    assert isinstance(tracker, Tracker)
    tracker.log_params({"lr": 0.1, "AWS_SECRET_ACCESS_KEY": "shh", "password": "pw"})
    tracker.finish()
    run = tracker.client.get_run(tracker.run_id)
    assert run.data.params == {"lr": "0.1"}
    assert "api_token" not in run.data.tags and run.data.tags["ok"] == "1"
    assert run.info.status == "FINISHED"
    assert Path(tmp_path / "m.db").exists()
