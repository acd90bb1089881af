"""Rolling out a new version under steady load, with real processes: v1 serves, v2 starts, requests move to
v2, v1 stops with SIGTERM, and no request is lost."""

from __future__ import annotations

import threading
from collections import Counter

import pytest
import requests

from scripts.processes import REPO, stop, wait_until

DIGIT = (REPO / "samples" / "digit_3.png").read_bytes()
CLIENTS = 8


class SteadyLoad:
    """CLIENTS closed-loop clients posting the same digit until stopped; every answer's (status, version)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.answers: list[tuple[int, str, str]] = []  # (status, X-Model-Version, request id)
        self._stopping = threading.Event()
        self._threads = [threading.Thread(target=self._client, daemon=True) for _ in range(CLIENTS)]

    def __enter__(self) -> SteadyLoad:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stopping.set()
        for thread in self._threads:
            thread.join(60)

    def _client(self) -> None:
        while not self._stopping.is_set():
            # A new connection each time, so every web worker gets some of the requests.
            response = requests.post(f"{self.url}/predict", files={"image": DIGIT}, timeout=60)
            version, request_id = response.headers.get("X-Model-Version", ""), response.headers.get("X-Request-ID")
            self.answers.append((response.status_code, version, request_id))

    def versions_since(self, start: int) -> Counter[str]:
        return Counter(version for _, version, _ in self.answers[start:])

    def wait_for(self, count: int, what: str, version: str | None = None) -> None:
        """Until `count` more answers came (all from `version`, if given, in a row)."""
        start = len(self.answers)

        def done() -> bool:
            recent = self.answers[start:]
            if version is None:
                return len(recent) >= count
            run = 0
            for _, answered_by, _ in recent:
                run = run + 1 if answered_by == version else 0
            return run >= count

        wait_until(done, 120, what)


@pytest.mark.processes
def test_a_rollout_moves_traffic_to_v2_and_stops_v1_without_losing_a_request(make_stack):
    stack = make_stack()
    v1 = stack.model_server(MODEL_VERSION="1")
    url = stack.web_server()

    with SteadyLoad(url) as load:
        load.wait_for(50, "v1 answering", version="1")
        stack.model_server(MODEL_VERSION="2")  # back once it takes jobs
        # The web workers see v2 within a second (serving.catalog.REFRESH_S) and send it everything.
        load.wait_for(100, "requests moved to v2", version="2")
        assert stop(v1) == 0  # SIGTERM: finishes the batch in hand, exits 0
        stopped_at = len(load.answers)
        load.wait_for(100, "v2 alone answering")

    statuses = Counter(status for status, _, _ in load.answers)
    assert statuses == {200: len(load.answers)}, statuses
    assert load.versions_since(stopped_at) == {"2": len(load.answers) - stopped_at}
    by_version = load.versions_since(0)
    assert by_version["1"] >= 50 and by_version["2"] >= 200
    # Every request computed once, by the version that answered it.
    ids = {version: sorted(i for _, v, i in load.answers if v == version) for version in ("1", "2")}
    stack.wait_logged([i for _, _, i in load.answers], timeout_s=60)
    for server, version in enumerate(("1", "2")):
        assert sorted(i for _, batch in stack.batches(server) for i in batch) == ids[version]
