"""A client process holding many HTTP connections at once: `python -m tests.many_clients URL COUNT OUT`.

COUNT greenlets (gevent, monkey-patched) each open a connection of their own and POST one digit from
samples/ as curl -F image=@digit_<n>.png would (with top_k=10), the n-th greenlet digit n % 10; none waits for
another. Once every one has its answer, OUT gets a JSON list, in greenlet order, of
{"digit", "status", "request_id" (the X-Request-ID header), "body"}, or {"digit", "error"} for a failed
connection.
"""

from gevent import monkey

monkey.patch_all()

import http.client  # noqa: E402 (after patching: its sockets must be gevent's)
import json  # noqa: E402
import sys  # noqa: E402
import urllib.parse  # noqa: E402

import gevent  # noqa: E402
import requests  # noqa: E402

from scripts.processes import REPO  # noqa: E402

DIGITS = 10


def multipart(url: str, digit: int) -> tuple[bytes, str]:
    """The body and Content-Type requests (and curl -F) send for one sample digit."""
    image = (REPO / "samples" / f"digit_{digit}.png").read_bytes()
    files = {"image": (f"digit_{digit}.png", image)}
    prepared = requests.Request("POST", url, files=files, data={"top_k": DIGITS}).prepare()
    return prepared.body, prepared.headers["Content-Type"]


def post(address: urllib.parse.SplitResult, digit: int, body: bytes, content_type: str) -> dict:
    connection = http.client.HTTPConnection(address.hostname, address.port, timeout=120)
    headers = {"Content-Type": content_type, "Connection": "close"}
    try:
        connection.request("POST", address.path, body, headers)
        response = connection.getresponse()
        return {
            "digit": digit,
            "status": response.status,
            "request_id": response.getheader("X-Request-ID"),
            "body": json.loads(response.read()),
        }
    except (OSError, http.client.HTTPException, ValueError) as exc:
        return {"digit": digit, "error": f"{type(exc).__name__}: {exc}"}
    finally:
        connection.close()


def main(url: str, count: int, out: str) -> None:
    address = urllib.parse.urlsplit(url)
    bodies = [multipart(url, digit) for digit in range(DIGITS)]
    greenlets = [gevent.spawn(post, address, n % DIGITS, *bodies[n % DIGITS]) for n in range(count)]
    gevent.joinall(greenlets)
    with open(out, "w") as f:
        json.dump([greenlet.value for greenlet in greenlets], f)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3])
