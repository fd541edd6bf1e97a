"""Structured logs: structlog and stdlib lines are JSON, the log file rotates by size, a flood of one
repeated event is collapsed while other events pass."""

from __future__ import annotations

import io
import json
import logging

from daemon import logs


def test_structlog_and_stdlib_lines_are_json(tmp_path):
    log_file = tmp_path / "logs" / "lorad.jsonl"
    stream = io.StringIO()
    logs.configure(level="INFO", log_file=log_file, stream=stream)
    import structlog

    structlog.contextvars.bind_contextvars(job_id="j1", dataset="ohwx_alice")
    try:
        logs.get_logger().info("job.progress", step=3, total=10)
        logging.getLogger("httpx").info(
            "HTTP Request: GET https://fal.example/status 200"
        )  # per-poll chatter: dropped
        logging.getLogger("huey.consumer").warning("worker %s died", "w1")
        try:
            secret = "user-data"  # must not leak into the log as a local
            assert secret
            raise ValueError("boom")
        except ValueError:
            logs.get_logger().exception("job.crashed")
    finally:
        structlog.contextvars.clear_contextvars()
        logs.configure(level="INFO", console=False)
    lines = [json.loads(line) for line in log_file.read_text().splitlines()]
    assert [line["event"] for line in lines] == ["job.progress", "worker w1 died", "job.crashed"]
    for line in lines:
        assert line["ts"].endswith("Z") and "T" in line["ts"]
        assert line["level"] in ("info", "warning", "error")
    assert lines[0]["job_id"] == "j1" and lines[0]["dataset"] == "ohwx_alice" and lines[0]["step"] == 3
    assert lines[1]["logger"] == "huey.consumer" and lines[1]["job_id"] == "j1"
    exc = lines[2]["exception"]
    assert isinstance(exc, list) and exc[0]["exc_type"] == "ValueError"
    assert "user-data" not in log_file.read_text()
    # Not a TTY: the console gets JSON too.
    assert json.loads(stream.getvalue().splitlines()[0])["event"] == "job.progress"


def test_log_file_rotates_by_size(tmp_path):
    log_file = tmp_path / "lorad.jsonl"
    logs.configure(level="INFO", log_file=log_file, max_bytes=2000, backups=2, console=False)
    try:
        for i in range(100):
            logs.get_logger().info("tick", i=i)
    finally:
        logs.configure(level="INFO", console=False)
    assert (tmp_path / "lorad.jsonl.1").exists()
    assert log_file.stat().st_size <= 2000


def _lines(stream: io.StringIO) -> list[dict]:
    return [json.loads(line) for line in stream.getvalue().splitlines() if line.strip()]


def test_a_flood_of_one_event_is_collapsed_and_others_pass(monkeypatch):
    clock = [1000.0]
    monkeypatch.setattr(logs, "_monotonic", lambda: clock[0])
    stream = io.StringIO()
    logs.configure(level="DEBUG", stream=stream)
    try:
        log = logs.get_logger()
        log.info("job.queued", job_id="j1", dataset="ohwx_a")
        for _ in range(5000):
            logging.getLogger("asyncio").error("socket.accept() out of system resource")
        for i in range(100):
            log.info("job.queued", job_id=f"k{i}", dataset=f"ohwx_{i}")  # distinct jobs: all kept
        clock[0] += logs.REPEAT_WINDOW_S + 1
        log.info("job.done", job_id="j1", dataset="ohwx_a")
        lines = _lines(stream)
    finally:
        logs.configure(level="INFO", console=False)
    floods = [e for e in lines if e["event"] == "socket.accept() out of system resource"]
    assert len(floods) == logs.REPEAT_BURST
    (summary,) = [e for e in lines if e["event"] == "log.repeated"]
    assert summary["repeated_event"] == "socket.accept() out of system resource"
    assert summary["count"] == 5000 - logs.REPEAT_BURST
    assert f"repeated {5000 - logs.REPEAT_BURST} times" in summary["message"]
    assert len([e for e in lines if e["event"] == "job.queued"]) == 101
    assert lines[-1]["event"] == "job.done"
