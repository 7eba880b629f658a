"""The `serve up/down` record names processes by pid *and* start time: a pid the kernel handed to another process
(after a reboot, or after the supervisor died and the pid was reused) is never taken for the fleet, nor killed."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from serving import daemon

CHARFORGE = str(Path(sys.executable).parent / "charforge")


def test_serve_down_never_kills_a_process_that_reused_a_recorded_pid(tmp_path, monkeypatch):
    stranger = subprocess.Popen(["sleep", "120"])  # someone else's process that now holds the recorded pid
    try:
        state = tmp_path / "state"
        monkeypatch.setenv("CHARFORGE_STATE_DIR", str(state))
        (state / "serving").mkdir(parents=True)
        own = daemon.identity(stranger.pid)
        assert own is not None  # Linux: /proc says which process a pid is
        boot = own.split(":")[0]
        record = {"supervisor": stranger.pid, "replicas": [stranger.pid], "url": "http://127.0.0.1:1",
                  "identity": {str(stranger.pid): f"{boot}:1"}}  # the fleet's supervisor started at tick 1
        daemon.record_path().write_text(json.dumps(record))
        assert not daemon.ours(record, stranger.pid) and daemon.alive(stranger.pid)

        down = subprocess.run([CHARFORGE, "serve", "down"], capture_output=True, text=True, timeout=120)
        assert (down.returncode, down.stdout.strip()) == (0, "nothing was running"), down.stderr
        time.sleep(0.2)
        assert stranger.poll() is None  # before: SIGTERM, then SIGKILL to the stranger's process group
        assert not daemon.record_path().exists()

        record.update(identity={str(stranger.pid): own}, replicas=[])  # recorded when it was ours: stopped
        daemon.record_path().write_text(json.dumps(record))
        down = subprocess.run([CHARFORGE, "serve", "down"], capture_output=True, text=True, timeout=120)
        assert (down.returncode, down.stdout.strip()) == (0, "stopped 1 process(es)"), down.stderr
        assert stranger.wait(timeout=30) is not None
    finally:
        stranger.kill()
        stranger.wait()
