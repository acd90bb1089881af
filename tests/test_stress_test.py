"""stress_test.py end to end: real processes, real HTTP, against tests/fake_upstream.py."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator

import pytest
import requests

from scripts.processes import wait_until

ROOT = pathlib.Path(__file__).resolve().parent.parent
STRESS_TEST = ROOT / "stress_test.py"
FAKE_UPSTREAM = ROOT / "tests" / "fake_upstream.py"
FAIL_MARKER = b"FAIL503"  # uploads holding these bytes get a 503 from the fake upstream
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
LATENCY_KEYS = ["min", "mean", "p50", "p90", "p95", "p99", "max"]
Completed = subprocess.CompletedProcess


@contextlib.contextmanager
def fake_upstream(*args: str) -> Iterator[str]:
    """Run tests/fake_upstream.py with `args` in its own process; yield its base URL."""
    process = subprocess.Popen([sys.executable, str(FAKE_UPSTREAM), *args], stdout=subprocess.PIPE, text=True)
    try:
        line = process.stdout.readline()
        assert line.startswith("PORT "), f"fake upstream did not start: {line!r}"
        yield f"http://127.0.0.1:{int(line.split()[1])}"
    finally:
        process.kill()
        process.wait()


@pytest.fixture(scope="module")
def upstream() -> Iterator[str]:
    with fake_upstream("--fail-marker", FAIL_MARKER.decode()) as url:
        yield url


def image(tmp_path: pathlib.Path, name: str, fail: bool = False, code: str = "") -> pathlib.Path:
    """A file of random bytes (so its digest is unique to the test), optionally marked to fail with `code`."""
    path = tmp_path / name
    # the random tail starts with a byte that is no letter: it does not lengthen the code
    path.write_bytes(os.urandom(3000) + (FAIL_MARKER + code.encode() + b"." if fail else b"") + os.urandom(500))
    return path


def digest(path: pathlib.Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def uploads(upstream: str) -> dict:
    """What the fake upstream received: {image digest: {"count": n, "connections": k}}."""
    return requests.get(f"{upstream}/received", timeout=10).json()


def stress(tmp_path: pathlib.Path, url: str, *images: pathlib.Path, **options: object) -> tuple[Completed, dict]:
    """Run stress_test.py with --json and --plot into tmp_path; return the process and the JSON.

    `options` are further flags, `rate=40` for `--rate 40`.
    """
    out = tmp_path / "result.json"
    command = [sys.executable, STRESS_TEST, "--url", url, "--json", out, "--plot", tmp_path / "plot.png"]
    command += [arg for path in images for arg in ("--image", path)]
    command += [arg for name, value in options.items() for arg in (f"--{name}", value)]
    done = subprocess.run([str(arg) for arg in command], capture_output=True, text=True, timeout=120)
    assert done.returncode in (0, 1), done.stderr
    return done, json.loads(out.read_text())


def check_consistent(summary: dict) -> None:
    assert {"requests", "ok", "errors", "duration_s", "throughput_rps", "latency_ms"} <= summary.keys()
    assert summary["ok"] + sum(summary["errors"].values()) == summary["requests"] > 0
    assert all(isinstance(key, str) for key in summary["errors"])
    assert sum(summary["error_codes"].values()) == sum(summary["errors"].values())  # the same errors, finer
    assert list(summary["latency_ms"]) == LATENCY_KEYS
    assert summary["duration_s"] > 0 and summary["throughput_rps"] > 0


def check_plot(tmp_path: pathlib.Path) -> None:
    assert (tmp_path / "plot.png").read_bytes()[:8] == PNG_MAGIC


def test_closed_loop_sends_every_image_in_turn(upstream, tmp_path):
    images = [image(tmp_path, "a.jpg"), image(tmp_path, "b.png")]
    done, summary = stress(tmp_path, f"{upstream}/predict", *images, requests=20, concurrency=4)
    assert done.returncode == 0, done.stderr
    check_consistent(summary)
    assert summary["requests"] == summary["ok"] == 20 and summary["errors"] == {}
    latency = [summary["latency_ms"][key] for key in LATENCY_KEYS[2:]]
    assert latency == sorted(latency) and summary["latency_ms"]["min"] <= summary["latency_ms"]["mean"]
    received = [uploads(upstream)[digest(path)] for path in images]
    assert [upload["count"] for upload in received] == [10, 10]  # exact bytes, in field 'image'
    assert all(upload["connections"] <= 4 for upload in received)  # one kept-alive connection per client
    assert "requests" in done.stdout and "p99" in done.stdout
    check_plot(tmp_path)


def test_non_200_answers_count_as_errors_by_status(upstream, tmp_path):
    good, bad = image(tmp_path, "good.jpg"), image(tmp_path, "bad.jpg", fail=True)
    done, summary = stress(tmp_path, f"{upstream}/predict", good, bad, requests=10, concurrency=2)
    assert done.returncode == 1
    check_consistent(summary)
    assert summary["ok"] == 5 and summary["errors"] == {"503": 5}
    assert summary["error_codes"] == {"503 overloaded": 5}
    assert summary["latency_ms"]["max"] is not None  # 503s are answers: they have latencies
    by_status = summary["latency_ms_by_status"]
    assert set(by_status) == {"200", "503"} and all(list(stats) == LATENCY_KEYS for stats in by_status.values())
    assert min(by_status["200"]["min"], by_status["503"]["min"]) == summary["latency_ms"]["min"]
    check_plot(tmp_path)


def test_error_codes_are_read_from_the_error_bodies(upstream, tmp_path):
    images = [image(tmp_path, "ok.jpg"), image(tmp_path, "full.jpg", fail=True, code="overloaded")]
    images.append(image(tmp_path, "down.jpg", fail=True, code="unavailable"))
    done, summary = stress(tmp_path, f"{upstream}/predict", *images, requests=9, concurrency=3)
    assert done.returncode == 1
    check_consistent(summary)
    assert summary["errors"] == {"503": 6}
    assert summary["error_codes"] == {"503 overloaded": 3, "503 unavailable": 3}
    assert "503 overloaded" in done.stdout and "503 unavailable" in done.stdout


def test_more_clients_than_select_takes(upstream, tmp_path):
    """Past 1,024 connections at once, descriptors no longer fit select(): each client still gets through."""
    path = image(tmp_path, "many.jpg")
    clients = 1500
    done, summary = stress(tmp_path, f"{upstream}/predict", path, requests=2 * clients, concurrency=clients)
    assert done.returncode == 0, done.stdout + done.stderr
    assert summary["requests"] == summary["ok"] == 2 * clients
    assert uploads(upstream)[digest(path)]["connections"] >= clients  # one kept-alive connection each, at once


# A closed loop seldom leaves a connection idle long enough to be checked, so this runs the check itself,
# in a process of its own (stress_test.py patches the standard library with gevent's on import).
PEER_CLOSED_PAST_1023 = """
import socket, stress_test
stress_test.raise_open_files_limit()
pairs = [socket.socketpair() for _ in range(600)]
mine, theirs = pairs[-1]
assert mine.fileno() > 1023, mine.fileno()
print(stress_test.peer_closed(mine))
theirs.close()
print(stress_test.peer_closed(mine))
"""


def test_an_idle_connection_closed_by_the_server_is_seen_past_descriptor_1023():
    done = subprocess.run([sys.executable, "-c", PEER_CLOSED_PAST_1023], cwd=ROOT, capture_output=True, text=True)
    assert done.stdout.split() == ["False", "True"], done.stderr


def test_open_loop_sends_rate_times_duration(upstream, tmp_path):
    path = image(tmp_path, "open.jpg")
    done, summary = stress(tmp_path, f"{upstream}/predict", path, rate=40, duration=2)
    assert done.returncode == 0, done.stderr
    check_consistent(summary)
    assert 60 <= summary["requests"] <= 100  # 40/s for 2 s; generous, the machine is noisy
    assert summary["settings"]["mode"] == "open" and "schedule_lag_ms" in summary
    assert summary["waited_for_connection"] == 0 and "free connection" not in done.stderr
    assert uploads(upstream)[digest(path)]["count"] == summary["requests"]
    check_plot(tmp_path)


def test_an_open_loop_whose_connections_are_all_busy_says_it_offered_less_than_its_rate(upstream, tmp_path):
    done, summary = stress(
        tmp_path, f"{upstream}/hang", image(tmp_path, "x.jpg"), rate=20, duration=1, connections=2, timeout=2
    )
    assert done.returncode == 1
    assert summary["waited_for_connection"] >= 10  # 20 due, 2 sent at once, the rest waited for them
    assert "waited for a free connection (all 2 busy)" in done.stderr


def test_goodput_counts_the_200s_until_the_last_of_them(upstream, tmp_path):
    good, bad = image(tmp_path, "good.jpg"), image(tmp_path, "bad.jpg", fail=True)
    done, summary = stress(tmp_path, f"{upstream}/predict", good, bad, rate=40, duration=2)
    assert done.returncode == 1
    every, good_rps = summary["throughput_while_sending_rps"], summary["goodput_rps"]
    assert 0.3 * every <= good_rps <= 0.7 * every  # every other request is refused: about half are 200s
    assert good_rps >= summary["ok"] / summary["duration_s"]  # the run's duration ends at its last answer or later


def test_requests_sent_during_the_warm_up_are_left_out(upstream, tmp_path):
    path = image(tmp_path, "warm.jpg")
    done, summary = stress(tmp_path, f"{upstream}/predict", path, rate=40, duration=1.5, **{"warm-up": 1.5})
    assert done.returncode == 0, done.stderr
    check_consistent(summary)
    sent = uploads(upstream)[digest(path)]["count"]
    assert 40 <= summary["requests"] <= 80 and sent >= 2 * summary["requests"] - 10  # half of them measured
    window = summary["window"]
    assert window["from"] < window["sending_until"] <= window["until"]
    assert summary["throughput_while_sending_rps"] > 0 and summary["settings"]["warm_up_s"] == 1.5
    assert summary["warm_up_error_codes"] == {}


def test_no_server_gives_the_exception_name(tmp_path):
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))  # bound but not listening: connections are refused
        port = unused.getsockname()[1]
        done, summary = stress(tmp_path, f"http://127.0.0.1:{port}/predict", image(tmp_path, "x.jpg"), requests=3)
    assert done.returncode == 1
    check_consistent(summary)
    assert summary["errors"] == summary["error_codes"] == {"ConnectionRefusedError": 3}
    assert set(summary["latency_ms"].values()) == {None}  # nothing was answered
    assert "bottleneck" not in done.stderr  # a run of milliseconds limited nothing, whatever its CPU share
    check_plot(tmp_path)


def test_a_host_that_does_not_resolve_fails_every_request(tmp_path):
    # .invalid never resolves (RFC 6761): like a refused connection, a failure of each request, not a usage error
    url = "http://nosuchhost.invalid/predict"
    done, summary = stress(tmp_path, url, image(tmp_path, "x.jpg"), requests=3)
    assert done.returncode == 1
    # not check_consistent: failing at once, the run can end within the millisecond duration_s is rounded to
    assert summary["requests"] == 3 and summary["ok"] == 0
    assert summary["errors"] == summary["error_codes"] == {"gaierror": 3}
    assert set(summary["latency_ms"].values()) == {None}  # nothing was answered
    assert "gaierror" in done.stdout and "nosuchhost.invalid" in done.stderr  # the summary, and why
    check_plot(tmp_path)


def test_a_json_path_that_fails_at_the_end_is_one_line_of_error(tmp_path):
    out = tmp_path / ("x" * 300 + ".json")  # its folder is there and writable: the name too long, found when written
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))  # refused: a run that ends at once
        command = [sys.executable, str(STRESS_TEST), "--url", f"http://127.0.0.1:{unused.getsockname()[1]}/predict"]
        command += ["--image", str(image(tmp_path, "x.jpg")), "--requests", "1", "--json", str(out)]
        done = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert "requests" in done.stdout  # the summary still came first
    assert "Traceback" not in done.stderr and f"cannot write {out}" in done.stderr


def test_ctrl_c_reports_what_was_sent_and_exits_1(upstream, tmp_path):
    path = image(tmp_path, "x")
    command = [sys.executable, str(STRESS_TEST), "--url", f"{upstream}/predict", "--image", str(path)]
    running = subprocess.Popen(
        command + ["--duration", "60"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    wait_until(lambda: digest(path) in uploads(upstream), 30, "requests sent", running)
    running.send_signal(signal.SIGINT)
    stdout, stderr = running.communicate(timeout=60)
    assert running.returncode == 1 and "interrupted" in stdout
    assert "Ctrl-C again quits at once" in stderr  # told what it waits for, and how not to


def test_timeout_ends_a_run_against_a_hung_server(upstream, tmp_path):
    hang = f"{upstream}/hang"
    done, summary = stress(tmp_path, hang, image(tmp_path, "x.jpg"), duration=0.5, rate=4, timeout=1)
    assert done.returncode == 1
    check_consistent(summary)
    assert summary["errors"] == {"TimeoutError": summary["requests"]}


def test_a_connection_the_server_does_not_take_is_a_connect_timeout(tmp_path):
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)  # room for one pending connection, never accepted: the others cannot connect
        url = f"http://127.0.0.1:{listener.getsockname()[1]}/predict"
        done, summary = stress(tmp_path, url, image(tmp_path, "x.jpg"), requests=4, concurrency=4, timeout=1)
    assert done.returncode == 1
    check_consistent(summary)
    errors = summary["errors"]
    assert errors.get("ConnectTimeout", 0) >= 2 and set(errors) <= {"ConnectTimeout", "TimeoutError"}


def test_connections_closed_by_the_server_while_idle_are_reopened(tmp_path):
    with fake_upstream("--bare", "--idle-close", "0.2") as url:
        done, summary = stress(tmp_path, f"{url}/predict", image(tmp_path, "x.jpg"), rate=1, duration=2.5)
    assert done.returncode == 0, done.stdout
    assert summary["requests"] == summary["ok"] == 3


def answer_413_before_the_body(listener: socket.socket, connections: int) -> None:
    """Like a server with an upload limit: answer as soon as the headers are in, then close."""
    for _ in range(connections):
        conn, _ = listener.accept()
        with conn:
            head = b""
            while b"\r\n\r\n" not in head:
                head += conn.recv(65536)
            conn.sendall(b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")


def test_an_early_answer_to_a_large_upload_is_counted(tmp_path):
    big = tmp_path / "big.jpg"
    big.write_bytes(bytes(32 * 1024 * 1024))  # far more than the socket buffers take before the server closes
    with socket.create_server(("127.0.0.1", 0)) as listener:
        threading.Thread(target=answer_413_before_the_body, args=(listener, 3), daemon=True).start()
        port = listener.getsockname()[1]
        done, summary = stress(tmp_path, f"http://127.0.0.1:{port}/predict", big, requests=3)
    assert done.returncode == 1
    check_consistent(summary)
    # not ConnectionResetError: the answer came before the reset; its body has no error code
    assert summary["errors"] == summary["error_codes"] == {"413": 3}


@pytest.mark.parametrize(
    "args, message",
    [
        (["--image", "missing.jpg", "--requests", "1"], "missing.jpg"),
        (["--image", "{image}"], "--requests"),
        (["--image", "{image}", "--requests", "1", "--duration", "1"], "not allowed"),
        (["--image", "{image}", "--requests", "1", "--concurrency", "2", "--rate", "1"], "not allowed"),
        (["--image", "{image}", "--requests", "0"], "greater than 0"),
        (["--image", "{image}", "--duration", "nan"], "finite"),
        (["--image", "{image}", "--duration", "1", "--rate", "inf"], "finite"),
        (["--image", "{image}", "--requests", "1", "--timeout", "nan"], "finite"),
        (["--image", "{image}", "--requests", "1", "--warm-up", "1"], "--warm-up goes with --duration"),
        (["--image", "{image}", "--requests", "1", "--plot", "out.txt"], "must end in an image format"),
        (["--image", "{image}", "--requests", "1", "--json", "nowhere/out.json"], "no such directory"),
        (["--image", "{image}", "--requests", "1", "--json", "."], ". is a directory"),
        (["--image", "{image}", "--requests", "1", "--json", ""], "--json : name a file"),
        (["--image", "{image}", "--requests", "1", "--connections", "8"], "--connections goes with --rate"),
    ],
)
def test_usage_errors_exit_2(tmp_path, args, message):
    path = image(tmp_path, "x.jpg")
    command = [sys.executable, str(STRESS_TEST), "--url", "http://127.0.0.1:9/predict"]
    command += [arg.format(image=path) for arg in args]
    done = subprocess.run(command, capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert done.returncode == 2
    assert message in done.stderr
