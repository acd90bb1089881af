"""settings.Settings: read from the environment, checked, and derived where the contract says so."""

from __future__ import annotations

import pytest

from settings import Settings


def test_each_field_comes_from_the_variable_of_its_name():
    env = {"BATCH_SIZE": "8", "REQUEST_TIMEOUT_S": "2.5", "API_KEYS": " a, b ,,", "MODEL": "/m/colours.keras"}
    s = Settings.from_env(env)
    assert (s.batch_size, s.request_timeout_s, s.api_keys) == (8, 2.5, frozenset({"a", "b"}))
    assert s.model_name == "colours"  # MODEL_NAME defaults from the file's name
    assert Settings.from_env({"MODEL": "digits", "BATCH_SIZE": " "}).batch_size == 32  # blank keeps the default
    assert Settings.from_env({"MODEL_VERSION": "2026120623"}).model_version == 2026120623  # date-like versions
    assert Settings.from_env({"QUEUE_LIMIT": "1e3"}).queue_limit == 1000  # the README's plain numbers


@pytest.mark.parametrize(
    "env, says",
    [
        ({"BATCH_SIZE": "many"}, "BATCH_SIZE='many' must be a whole number"),
        ({"BATCH_SIZE": "0"}, "BATCH_SIZE=0 must be at least 1"),
        ({"REQUEST_TIMEOUT_S": "soon"}, "REQUEST_TIMEOUT_S='soon' must be a number"),
        ({"MODEL_NAME": "a b"}, "MODEL_NAME='a b'"),
        ({"DEFAULT_MODEL": "a/b"}, "DEFAULT_MODEL='a/b'"),
        ({"LOG_FORMAT": "xml"}, "LOG_FORMAT='xml'"),
        ({"MODEL_VERSION": "1" + "0" * 15}, "MODEL_VERSION=1000000000000000 must be at most 999,999,999,999,999"),
        ({"REQUEST_TIMEOUT_S": "nan"}, "REQUEST_TIMEOUT_S=nan must be a finite number"),
        ({"MAX_UPLOAD_MB": "inf"}, "MAX_UPLOAD_MB=inf must be a finite number"),
        ({"PORT": "70000"}, "PORT=70000 must be at most 65,535"),
        ({"WEB_WORKERS": "100000"}, "WEB_WORKERS=100000 must be at most 256"),
        ({"LOG_LEVEL": "loud"}, "LOG_LEVEL='LOUD' must be one of DEBUG"),
        ({"REDIS_URL": "localhost:6379"}, "REDIS_URL='localhost:6379' must start with redis://"),
        ({"REDIS_URL": "redis://localhost:abc/0"}, "port that is not a number"),
        ({"REDIS_URL": "redis://:secret@/0"}, "names no host"),
        ({"REDIS_URL": "redis://localhost:6379/first"}, "database that is not a number"),
        ({"HEARTBEAT_S": "1e300"}, "HEARTBEAT_S=1e\\+300 must be at most 86,400"),
        ({"RESULT_TTL_S": "1e300"}, "RESULT_TTL_S=1e\\+300 must be at most 86,400"),
        ({"BATCH_WAIT_MS": "99999999999999999999"}, "BATCH_WAIT_MS=99999999999999999999 must be at most 10,000"),
        ({"BATCH_SIZE": "1000000000000"}, "BATCH_SIZE=1000000000000 must be at most 4,096"),
        ({"HEARTBEAT_S": "6", "HEARTBEAT_TTL_S": "2"}, "HEARTBEAT_TTL_S=2 must be longer than HEARTBEAT_S=6"),
        ({"BATCH_SIZE": "1_0"}, "BATCH_SIZE='1_0' must be a whole number"),
        ({"PORT": "\uff17\uff13\uff11\uff10"}, "PORT='\uff17\uff13\uff11\uff10' must be a whole number"),
        ({"BATCH_SIZE": "2.5"}, "BATCH_SIZE='2.5' must be a whole number"),
        ({"BATCH_SIZE": "inf"}, "BATCH_SIZE='inf' must be a whole number"),
        ({"MODEL": "/m/my model.keras"}, "MODEL_NAME \\(from the file's name: set it\\)='my model'"),
        ({"API_KEYS": ","}, "API_KEYS=',' names none"),  # an empty template, say: not an open API
        ({"API_KEYS": "b, ключ"}, "API_KEYS: key 2 of 2 \\(sorted\\) will not work"),  # and the key is not shown
        ({"API_KEYS": "a," + "k" * 4097}, "API_KEYS: key 2 of 2"),
    ],
)
def test_a_value_that_cannot_work_stops_with_its_name(env, says):
    with pytest.raises(SystemExit, match=says):
        Settings.from_env(env)


def test_a_version_counts_as_alive_at_least_as_long_as_its_server_counts_as_live():
    assert Settings(no_server_grace_s=15, heartbeat_s=1, heartbeat_ttl_s=5).alive_ttl_s == 16
    assert Settings(no_server_grace_s=1, heartbeat_s=1, heartbeat_ttl_s=5).alive_ttl_s == 6


def test_replace_derives_the_model_name_again_unless_it_was_set():
    assert Settings(model="digits").replace(model="/m/colours.keras").model_name == "colours"
    assert Settings(model="digits", model_name="mine").replace(model="/m/colours.keras").model_name == "mine"
