"""The Docker deployment, checked without a Docker engine.

docker-compose.yml (alone, and merged with docker-compose.gpu.yml) is validated against the Compose
Specification's JSON schema, the copy check-jsonschema ships (requirements-dev.txt), so it works offline.
Then what Compose and the Dockerfile name is checked against the repo, parsed rather than listed here:
every path copied or run exists and is in the build context, every command is a real entry point,
every environment variable is a setting of settings.py, and each tier is handed every setting its
code reads. The web tier's health check is run against a web tier over real HTTP.
"""

from __future__ import annotations

import ast
import copy
import dataclasses
import functools
import json
import os
import pathlib
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from importlib import resources
from urllib.parse import urlparse

import jsonschema
import pytest
from ruamel.yaml import YAML

from scripts.processes import free_port
from settings import Settings

REPO = pathlib.Path(__file__).resolve().parent.parent
COMPOSE = REPO / "docker-compose.yml"
COMPOSE_GPU = REPO / "docker-compose.gpu.yml"
COMPOSE_MODELS = REPO / "docker-compose.models.yml"
DOCKERIGNORE = REPO / ".dockerignore"
TIERS = ("web", "model")  # the compose services built from this repo

# Variables for third-party code that the stack sets although settings.py does not read them.
THIRD_PARTY_ENV = {
    "TF_FORCE_GPU_ALLOW_GROWTH": "TensorFlow: allocate GPU memory as needed, so servers can share a GPU",
}


# ---------------------------------------------------------------- the repo, parsed


@functools.cache
def _parse(path: pathlib.Path) -> ast.Module:
    return ast.parse(path.read_text(), filename=str(path))


@functools.cache
def settings_defaults() -> dict[str, object]:
    """Every setting (a field of settings.Settings, read from the variable of its name in capitals) and its default."""
    return {f.name.upper(): f.default for f in dataclasses.fields(Settings)}


@functools.cache
def settings_properties() -> dict[str, set[str]]:
    """Settings' properties (e.g. max_upload_bytes) -> the fields each is computed from."""
    (cls,) = [n for n in _parse(REPO / "settings.py").body if isinstance(n, ast.ClassDef) and n.name == "Settings"]
    found = {}
    for node in cls.body:
        if isinstance(node, ast.FunctionDef) and any(ast.unparse(d) == "property" for d in node.decorator_list):
            found[node.name] = {
                a.attr for a in ast.walk(node) if isinstance(a, ast.Attribute) and ast.unparse(a.value) == "self"
            }
    return found


def env_read_by_code() -> set[str]:
    """Variables the repo's own code uses directly (os.environ[...], os.environ.get(...), os.getenv(...))."""
    names: set[str] = set()
    for folder, subfolders, files in os.walk(REPO):
        subfolders[:] = [name for name in subfolders if not name.startswith(".")]  # .venv, .git
        for path in (pathlib.Path(folder, name) for name in files if name.endswith(".py")):
            names |= _env_reads(path)
    return names


def _env_reads(path: pathlib.Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(_parse(path)):
        key = None
        if isinstance(node, ast.Subscript) and ast.unparse(node.value) == "os.environ":
            key = node.slice
        elif isinstance(node, ast.Call) and node.args and isinstance(node.func, ast.Attribute):
            if ast.unparse(node.func) in ("os.environ.get", "os.environ.setdefault", "os.getenv"):
                key = node.args[0]
        if isinstance(key, ast.Constant) and isinstance(key.value, str):
            names.add(key.value)
    return names


def _local_module(dotted: str) -> pathlib.Path | None:
    path = REPO.joinpath(*dotted.split("."))
    for candidate in (path.with_suffix(".py"), path / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def import_closure(entry: pathlib.Path) -> set[pathlib.Path]:
    """The repo's own modules that `python entry` loads, gunicorn's `python:module` configs included."""
    seen: set[pathlib.Path] = set()
    todo = [entry]
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        for node in ast.walk(_parse(path)):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
            elif isinstance(node, ast.Constant) and isinstance(node.value, str):
                names = re.findall(r"^python:([\w.]+)$", node.value)
            for dotted in names:
                parts = dotted.split(".")
                for i in range(1, len(parts) + 1):  # a package's __init__ runs before its modules
                    module = _local_module(".".join(parts[:i]))
                    if module is not None:
                        todo.append(module)
    return seen


def settings_read(entry: pathlib.Path) -> set[str]:
    """The settings that the code `python entry` runs reads, as variable names.

    A setting is read as an attribute of a Settings object: of an expression ending in `settings`
    (settings.port, self.settings.batch_size, t.settings.top_k) or of a name assigned one (s = self.settings).
    """
    read: set[str] = set()
    for path in import_closure(entry):
        tree = _parse(path)
        aliases = {
            target.id
            for node in ast.walk(tree)
            if isinstance(node, ast.Assign) and ast.unparse(node.value).endswith("settings")
            for target in node.targets
            if isinstance(target, ast.Name)
        }
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and (
                ast.unparse(node.value).endswith("settings") or ast.unparse(node.value) in aliases
            ):
                read |= settings_properties().get(node.attr, {node.attr})
    return {name.upper() for name in read} & settings_defaults().keys()


def is_entry_point(path: pathlib.Path) -> bool:
    return path.is_file() and 'if __name__ == "__main__":' in path.read_text()


# ---------------------------------------------------------------- the Dockerfile, parsed


@dataclass
class Stage:
    name: str
    base: str
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, op: str) -> list[str]:
        return [args for name, args in self.instructions if name == op]


def dockerfile_lines(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs: comments dropped, continued lines joined."""
    result, pending = [], ""
    for line in text.splitlines():
        if line.strip().startswith("#") or not line.strip():
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        op, _, args = (pending + line).strip().partition(" ")
        result.append((op.upper(), args.strip()))
        pending = ""
    return result


@functools.cache
def dockerfile(path: pathlib.Path) -> tuple[dict[str, str], dict[str, Stage]]:
    """The global ARGs (name: default) and the stages by name."""
    global_args: dict[str, str] = {}
    stages: dict[str, Stage] = {}
    stage = None
    for op, args in dockerfile_lines(path.read_text()):
        if op == "FROM":
            match = re.fullmatch(r"(?:--\S+\s+)*(\S+)(?:\s+AS\s+(\S+))?", args, re.IGNORECASE)
            assert match, f"cannot parse FROM {args}"
            stage = Stage(match[2] or f"stage{len(stages)}", match[1])
            stages[stage.name] = stage
        elif stage is None:
            assert op == "ARG", f"{path.name}: only ARG may come before the first FROM, not {op}"
            name, _, default = args.partition("=")
            global_args[name] = default
        else:
            stage.instructions.append((op, args))
    return global_args, stages


def chain(stages: dict[str, Stage], name: str) -> list[Stage]:
    """The stage and those it is built FROM, base first."""
    result = []
    while name in stages:
        result.insert(0, stages[name])
        name = stages[name].base
    return result


def words(args: str) -> list[str]:
    """An instruction's arguments, in exec (JSON) form or shell form."""
    return json.loads(args) if args.startswith("[") else shlex.split(args)


def copy_sources(args: str) -> list[str]:
    """The build-context paths a COPY takes; none for COPY --from (another stage or image)."""
    parts = words(args)
    flags = [p for p in parts if p.startswith("--")]
    if any(flag.startswith("--from") for flag in flags):
        return []
    return [p for p in parts if not p.startswith("--")][:-1]


def dockerignore_excludes(relative: str) -> bool:
    """Whether .dockerignore keeps a path (or a folder holding it) out of the build context."""
    patterns = [line.strip() for line in DOCKERIGNORE.read_text().splitlines()]
    parts = pathlib.PurePosixPath(relative).parts
    prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    excluded = False
    for pattern in patterns:
        if not pattern or pattern.startswith("#"):
            continue
        negate, pattern = pattern.startswith("!"), pattern.lstrip("!").strip("/")
        regex = "".join(
            ".*" if token == "**" else "[^/]*" if token == "*" else "[^/]" if token == "?" else re.escape(token)
            for token in re.split(r"(\*\*|\*|\?)", pattern)
        ).replace(".*/", "(.*/)?")
        if any(re.fullmatch(regex, prefix) for prefix in prefixes):
            excluded = not negate
    return excluded


# ---------------------------------------------------------------- compose files, parsed


def load_yaml(path: pathlib.Path) -> dict:
    return YAML(typ="safe", pure=True).load(path.read_text())


_INTERPOLATION = re.compile(r"\$(?:(?P<escaped>\$)|\{(?P<braced>[^}]*)\}|(?P<bare>[A-Za-z_]\w*))")


def interpolate(value: object, names: set[str]) -> object:
    """What Compose sees with none of the variables set: each ${VAR:-default} becomes its default.

    Records every variable named in `names`. A variable without a default would leave the value
    empty on a machine with no .env, so it fails the test.
    """
    if isinstance(value, dict):
        return {key: interpolate(item, names) for key, item in value.items()}
    if isinstance(value, list):
        return [interpolate(item, names) for item in value]
    if not isinstance(value, str):
        return value

    def replace(match: re.Match) -> str:
        if match["escaped"]:
            return "$"
        expression = match["braced"] if match["braced"] is not None else match["bare"]
        var = re.fullmatch(r"(?P<name>[A-Za-z_]\w*)(?::?-(?P<default>.*))?", expression)
        assert var and var["default"] is not None, f"${{{expression}}} in {value!r} needs a default: ${{NAME:-value}}"
        names.add(var["name"])
        return var["default"]

    return _INTERPOLATION.sub(replace, value)


def as_mapping(list_or_dict: list | dict | None) -> dict[str, object]:
    """Compose's list-or-dict forms (environment, build args) as one dict; a bare NAME maps to None."""
    if isinstance(list_or_dict, dict):
        return dict(list_or_dict)
    pairs = (item.partition("=") for item in list_or_dict or [])
    return {name: value if sep else None for name, sep, value in pairs}


def merge(base: object, override: object, key: str = "") -> object:
    """Compose's merge of an override file, for the kinds of values used here.

    Mappings merge key by key; environment and build args merge by variable; other sequences append.
    """
    if key in ("environment", "args"):
        return {**as_mapping(base), **as_mapping(override)}
    if isinstance(base, dict) and isinstance(override, dict):
        merged = dict(base)
        for name, value in override.items():
            merged[name] = merge(base[name], value, name) if name in base else value
        return merged
    if isinstance(base, list) and isinstance(override, list):
        return base + [item for item in override if item not in base]
    return override


@functools.cache
def compose_schema_validator() -> jsonschema.protocols.Validator:
    vendor = resources.files("check_jsonschema.builtin_schemas.vendor")
    schema = json.loads(vendor.joinpath("compose-spec.json").read_text())
    validator = jsonschema.validators.validator_for(schema)
    validator.check_schema(schema)
    return validator(schema)


def schema_errors(document: object) -> list[str]:
    errors = compose_schema_validator().iter_errors(document)
    return [f"{'/'.join(map(str, e.absolute_path)) or '(top)'}: {e.message}" for e in errors]


@functools.cache
def stack(*files: pathlib.Path) -> tuple[dict, set[str]]:
    """The merged, interpolated project and the variables it names (shared: do not modify)."""
    project: dict = {}
    names: set[str] = set()
    for path in files:
        project = merge(project, interpolate(load_yaml(path), names))
    return project, names


def duration_s(text: str) -> float:
    """A Compose duration such as 1m30s or 45s, in seconds."""
    units = {"h": 3600, "m": 60, "s": 1, "ms": 1e-3, "us": 1e-6}
    parts = re.findall(r"(\d+(?:\.\d+)?)(h|ms|us|m|s)", str(text))
    assert parts and "".join(n + u for n, u in parts) == str(text), f"not a duration: {text}"
    return sum(float(n) * units[u] for n, u in parts)


def healthcheck_words(service: dict) -> list[str]:
    test = service.get("healthcheck", {}).get("test")
    assert test, "needs a healthcheck"
    return shlex.split(test) if isinstance(test, str) else list(test)


def dockerfile_cmd(service: dict) -> list[str]:
    """What a service runs: its compose command, else its Dockerfile target's CMD."""
    if "command" in service:
        return words(service["command"]) if isinstance(service["command"], str) else service["command"]
    build = service["build"]
    _, stages = dockerfile(REPO / build.get("context", ".") / build.get("dockerfile", "Dockerfile"))
    commands = [cmd for stage in chain(stages, build["target"]) for cmd in stage.all("CMD")]
    assert commands, f"stage {build['target']} has no CMD"
    return words(commands[-1])


def requirement_files(relative: str) -> list[str]:
    """A requirements file and those it includes with -r, as repo paths."""
    path = REPO / relative
    assert path.is_file(), f"{relative}: no such file"
    included = re.findall(r"^-r\s+(\S+)", path.read_text(), re.MULTILINE)
    parent = pathlib.PurePosixPath(relative).parent
    return [relative] + [f for name in included for f in requirement_files(str(parent / name))]


def covered(relative: str, copied: list[str]) -> bool:
    """Whether one of the COPY sources brings this repo path into the image."""
    return any(relative == src or relative.startswith(src.rstrip("/") + "/") for src in copied)


STACKS = {"cpu": (COMPOSE,), "gpu": (COMPOSE, COMPOSE_GPU), "models": (COMPOSE, COMPOSE_MODELS)}


def built(project: dict) -> list[str]:
    """The services built from this repo: TIERS, and the two-model example's second model service."""
    return [name for name, service in project["services"].items() if "build" in service]


# ---------------------------------------------------------------- the tests


@pytest.mark.parametrize("path", [COMPOSE, COMPOSE_GPU, COMPOSE_MODELS], ids=lambda p: p.name)
def test_each_compose_file_matches_the_compose_specification(path):
    assert schema_errors(load_yaml(path)) == []


@pytest.mark.parametrize("variant", STACKS)
def test_the_interpolated_stack_matches_the_compose_specification(variant):
    project, _ = stack(*STACKS[variant])
    assert schema_errors(project) == []
    assert set(project["services"]) == {"redis", *built(project)} and set(TIERS) <= set(built(project))


def test_the_schema_check_catches_mistakes():
    """The validator really checks: a misspelt key or a wrong type is reported."""
    project, _ = stack(COMPOSE)
    broken = copy.deepcopy(project)
    broken["services"]["web"]["helthcheck"] = broken["services"]["web"].pop("healthcheck")
    broken["services"]["redis"]["restart"] = ["always"]
    errors = schema_errors(broken)
    assert any("helthcheck" in e for e in errors) and any(e.startswith("services/redis/restart") for e in errors)


def test_redis_is_health_checked_and_not_published():
    redis = stack(COMPOSE)[0]["services"]["redis"]
    assert redis["image"].split(":")[0] == "redis"
    assert healthcheck_words(redis)[-2:] == ["redis-cli", "ping"]
    assert "ports" not in redis and "container_name" not in redis


@pytest.mark.parametrize("variant", STACKS)
def test_tiers_wait_for_a_healthy_redis_and_can_scale(variant):
    services = stack(*STACKS[variant])[0]["services"]
    for tier in built(stack(*STACKS[variant])[0]):
        service = services[tier]
        assert service["depends_on"]["redis"]["condition"] == "service_healthy", tier
        assert "container_name" not in service, f"{tier}: a fixed container name stops --scale"
        redis_url = as_mapping(service["environment"])["REDIS_URL"]
        assert urlparse(redis_url).hostname in services, f"{tier}: REDIS_URL must name the compose service"
        assert duration_s(service["stop_grace_period"]) > 10, f"{tier}: SIGTERM needs time to finish work"
        assert tier == "web" or ("ports" not in service and "expose" not in service), tier


@pytest.mark.parametrize("variant", STACKS)
def test_the_web_tier_may_hold_ten_thousand_connections(variant):
    """A web worker holds a connection per client, up to its open-file limit (serving/gunicorn_conf.py)."""
    web = stack(*STACKS[variant])[0]["services"]["web"]
    nofile = web["ulimits"]["nofile"]
    assert int(nofile["soft"]) == int(nofile["hard"]) >= 20_000
    assert int(web["sysctls"]["net.core.somaxconn"]) >= 4096


def test_the_web_tier_publishes_its_port_and_checks_health(make_app, serve_http):
    web = stack(COMPOSE)[0]["services"]["web"]
    _, stages = dockerfile(REPO / web["build"].get("dockerfile", "Dockerfile"))
    port = settings_defaults()["PORT"]
    # The container listens on the default PORT (the compose file does not pass PORT in);
    # the host side is ${PORT:-5000}.
    assert "PORT" not in as_mapping(web["environment"])
    assert [p.split(":")[-1] for p in web["ports"]] == [str(port)]
    assert any(
        str(port) in ports.split() for stage in chain(stages, web["build"]["target"]) for ports in stage.all("EXPOSE")
    )
    check = healthcheck_words(web)
    assert check[:3] == ["CMD", "python", "-c"], "slim images have no curl: check with python"
    code = check[3]
    compile(code, "healthcheck", "exec")
    assert re.search(r"http://(localhost|127\.0\.0\.1):\{[^}]+\}/health['\"]", code), code
    imported = {a.name for n in ast.walk(ast.parse(code)) if isinstance(n, ast.Import) for a in n.names}
    assert all(_local_module(m) or m in ("urllib", "urllib.request") for m in imported)
    # It asks the web tier on the port of the PORT setting: run it against a web tier on another port.
    url = serve_http(make_app())
    healthy = {**os.environ, "PORT": str(urlparse(url).port)}
    assert subprocess.run([sys.executable, "-c", code], cwd=REPO, env=healthy, timeout=60).returncode == 0
    nobody = {**os.environ, "PORT": str(free_port())}
    down = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=nobody, capture_output=True, timeout=60)
    assert down.returncode != 0
    # In-flight requests may wait REQUEST_TIMEOUT_S for their answer; stopping must not cut them off.
    assert duration_s(web["stop_grace_period"]) > settings_defaults()["REQUEST_TIMEOUT_S"] + 5


@pytest.mark.parametrize("variant", STACKS)
def test_every_variable_is_a_setting_and_each_tier_gets_the_settings_it_reads(variant):
    project, interpolated = stack(*STACKS[variant])
    known = settings_defaults().keys()
    assert interpolated <= known, f"compose interpolates variables that are not settings: {interpolated - known}"
    for tier in built(project):
        service = project["services"][tier]
        environment = as_mapping(service["environment"])
        unknown = environment.keys() - known - THIRD_PARTY_ENV.keys()
        assert not unknown, f"{tier} sets variables that are not settings in settings.py: {unknown}"
        entry = REPO / dockerfile_cmd(service)[1]
        named = set(environment)
        for path in STACKS[variant]:
            interpolate(load_yaml(path)["services"].get(tier, {}), named)
        missing = settings_read(entry) - named
        assert not missing, f"{tier} reads settings that docker-compose.yml does not pass through: {sorted(missing)}"


@pytest.mark.parametrize("variant", STACKS)
def test_builds_name_real_files_stages_args_and_entry_points(variant):
    for tier in built(stack(*STACKS[variant])[0]):
        service = stack(*STACKS[variant])[0]["services"][tier]
        build = service["build"]
        context = REPO / build.get("context", ".")
        assert context.resolve() == REPO, f"{tier}: build from the repo root"
        path = context / build.get("dockerfile", "Dockerfile")
        assert path.is_file(), f"{tier}: {path} does not exist"
        global_args, stages = dockerfile(path)
        assert build["target"] in stages, f"{tier}: no stage {build['target']} in {path.name}"
        declared = global_args.keys() | {
            a.partition("=")[0] for s in chain(stages, build["target"]) for a in s.all("ARG")
        }
        assert as_mapping(build.get("args")).keys() <= declared, f"{tier}: build args the Dockerfile ignores"
        command = dockerfile_cmd(service)
        assert command[0] == "python" and is_entry_point(REPO / command[1]), f"{tier}: {command} is no entry point"
    assert dockerfile_cmd(stack(COMPOSE)[0]["services"]["web"])[1] == "web_server.py"
    assert dockerfile_cmd(stack(COMPOSE)[0]["services"]["model"])[1] == "model_server.py"


def test_the_dockerfile_copies_and_runs_only_what_exists_in_the_build_context():
    global_args, stages = dockerfile(REPO / "Dockerfile")
    for stage in stages.values():
        copied: list[str] = [src for s in chain(stages, stage.base) for a in s.all("COPY") for src in copy_sources(a)]
        for op, args in stage.instructions:
            if op == "COPY":
                for source in copy_sources(args):
                    assert (REPO / source).exists(), f"{stage.name}: COPY {source}: no such path in the repo"
                    assert not dockerignore_excludes(source.rstrip("/")), f"{stage.name}: .dockerignore drops {source}"
                    copied.append(source)
            if op == "RUN":
                for script in re.findall(r"\bpython3?\s+(?:-\S+\s+)*(\S+\.py)\b", args):
                    assert (REPO / script).is_file(), f"{stage.name}: RUN {script}: no such file"
                    assert covered(script, copied), f"{stage.name}: RUN {script} before it is copied in"
                for requirements in re.findall(r"[\w./-]+\.txt", args):
                    if re.search(rf">\s*{re.escape(requirements)}", args):
                        continue  # written by this RUN
                    for needed in requirement_files(requirements):
                        assert covered(needed, copied), f"{stage.name}: RUN uses {needed} before it is copied in"
        for command in stage.all("CMD"):
            argv = words(command)
            assert argv[0] == "python" and covered(argv[1], copied) and is_entry_point(REPO / argv[1])
    for ignored in (".git", ".venv"):
        assert dockerignore_excludes(ignored), f"the build context should not carry {ignored}"


@pytest.mark.parametrize("target", TIERS)
def test_each_image_holds_the_code_its_entry_point_imports(target):
    _, stages = dockerfile(REPO / "Dockerfile")
    copied = [src for s in chain(stages, target) for a in s.all("COPY") for src in copy_sources(a)]
    entry = REPO / words(chain(stages, target)[-1].all("CMD")[-1])[1]
    for module in import_closure(entry):
        relative = module.relative_to(REPO).as_posix()
        assert covered(relative, copied), f"{target}: {relative} is imported but not copied into the image"


def test_the_web_image_installs_no_tensorflow():
    _, stages = dockerfile(REPO / "Dockerfile")
    installed = [r for s in chain(stages, "web") for a in s.all("RUN") for r in re.findall(r"-r\s+(\S+)", a)]
    assert installed, "the web stage installs no requirements"
    for requirements in installed:
        lines = (REPO / requirements).read_text().splitlines()
        names = {re.split(r"[=<>\[ ]", line.strip())[0].lower() for line in lines if line.strip()[:1].isalpha()}
        assert not names & {"tensorflow", "tensorflow-cpu", "keras"}, f"{requirements}: {names}"
        assert not any(line.startswith("-r") for line in lines), f"{requirements} pulls in other files"


def test_env_set_by_the_dockerfile_is_read_by_the_code():
    _, stages = dockerfile(REPO / "Dockerfile")
    known = settings_defaults().keys() | env_read_by_code()
    for stage in stages.values():
        for args in stage.all("ENV"):
            names = {word.partition("=")[0] for word in shlex.split(args)}
            assert names <= known, f"{stage.name}: ENV {names - known} is read by nothing in the repo"


def test_the_gpu_variant_swaps_in_cuda_tensorflow_at_the_pinned_version():
    global_args, stages = dockerfile(REPO / "Dockerfile")
    cpu_model = stack(COMPOSE)[0]["services"]["model"]
    gpu_model = stack(COMPOSE, COMPOSE_GPU)[0]["services"]["model"]
    # The model stage rewrites requirements.txt's pin for the package named by its TENSORFLOW build arg.
    args = dict(a.partition("=")[::2] for s in chain(stages, "model") for a in s.all("ARG"))
    default = args["TENSORFLOW"]
    assert as_mapping(cpu_model["build"]["args"]).get("TENSORFLOW", default) == default
    assert as_mapping(gpu_model["build"]["args"])["TENSORFLOW"] == "tensorflow[and-cuda]"
    rewrites = [
        re.search(r"s/\^([\w.-]+)==/\$\{?TENSORFLOW\}?==/", a) for s in chain(stages, "model") for a in s.all("RUN")
    ]
    rewritten = {m[1] for m in rewrites if m}
    assert rewritten == {default}
    pins = [line for line in (REPO / "requirements.txt").read_text().splitlines() if line.startswith(f"{default}==")]
    assert len(pins) == 1, f"requirements.txt must pin {default} once for the model stage to swap it"
    assert gpu_model["image"] != cpu_model["image"], "the GPU build must not overwrite the CPU image's tag"


def test_only_the_gpu_variant_reserves_an_nvidia_gpu():
    assert "deploy" not in stack(COMPOSE)[0]["services"]["model"], "the CPU stack must run on hosts without GPUs"
    project, _ = stack(COMPOSE, COMPOSE_GPU)
    devices = project["services"]["model"]["deploy"]["resources"]["reservations"]["devices"]
    assert [(d["driver"], d["count"], "gpu" in d["capabilities"]) for d in devices] == [("nvidia", 1, True)]
    for name, service in project["services"].items():
        if name != "model":
            assert "deploy" not in service, f"only the model server needs a GPU, not {name}"
