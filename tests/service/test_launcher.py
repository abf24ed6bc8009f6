"""service.launcher: what a caller sees when a server does not come up, the log attached to a failure, and the
temporary log folder removed at exit."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from service.launcher import LaunchError, in_thread, launch, serving
from service.settings import Settings


@pytest.mark.slow
def test_a_server_that_exits_at_start_is_a_launch_error_with_its_log(tmp_path: Path) -> None:
    with pytest.raises(LaunchError, match="exited with 2") as exc:
        launch(["--model-repository", str(tmp_path / "nowhere")], log=tmp_path / "server.log")
    assert "model repository not found" in str(exc.value)


@pytest.mark.slow
def test_serving_stops_the_server_and_attaches_its_log_to_a_failure(tmp_path: Path) -> None:
    with pytest.raises(AssertionError) as exc, serving(env=None, log=tmp_path / "server.log") as server:
        assert httpx.get(server.url + "/v2/health/ready").status_code == 200
        process = server.proc
        raise AssertionError("a failing check")
    assert process.poll() == 0  # stopped with SIGTERM: a clean exit
    notes = "\n".join(getattr(exc.value, "__notes__", []))
    assert "last lines of bnfold's log" in notes and "Application startup complete" in notes


@pytest.mark.filterwarnings("ignore:Specified provider 'CUDAExecutionProvider'")
def test_an_in_thread_app_that_fails_its_start_up_is_a_launch_error() -> None:
    settings = Settings(providers=["cuda", "cpu"], provider_policy="strict", warmup_runs=0)
    with pytest.raises(LaunchError, match="stopped during start-up"), in_thread(settings):
        pass


def test_an_in_thread_server_keeps_its_log_lines() -> None:
    with in_thread(Settings(warmup_runs=0)) as server:
        assert "model digits version 1 ready" in server.output()


@pytest.mark.parametrize("keep", [False, True])
def test_a_launched_servers_log_folder_is_removed_when_the_launcher_exits_unless_kept(
    keep: bool, tmp_path: Path
) -> None:
    """A Python process launches a server-like command without naming a log, reads the log after stopping it, exits:
    the temporary bnfold-server-* folder goes with it, unless ``keep_log``."""
    script = (
        "import sys; from service.launcher import launch\n"
        "server = launch(command=[sys.executable, '-c', 'print(\"hello\")'], port=1, ready=(), "
        f"keep_log={keep})\n"
        "server.proc.wait(60); server.stop()\n"
        "assert 'hello' in server.output()\n"
        "print(server.log)\n"
    )
    env = {**os.environ, "TMPDIR": str(tmp_path), "PYTHONPATH": str(Path(__file__).parents[2])}
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    log = Path(done.stdout.strip())
    assert log.parent.name.startswith("bnfold-server-") and log.parent.parent == tmp_path
    assert log.exists() == keep
    assert [p.name.startswith("bnfold-server-") for p in tmp_path.iterdir()] == ([True] if keep else [])
