"""Static checks of docker/: the two Dockerfiles, their ignore files, the shared pip
constraints and the compose stack. No Docker engine is needed; ``docker compose config`` is
run only where a Docker CLI with the compose plugin exists.

The compose job's ``cmd-pipeline`` command lines are parsed with the real click commands, and
its ``python -m workflows.*`` options are checked against the workflow's own ``--help``, so the
job cannot silently fall behind the CLI.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import re
import shlex
import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import click
import pytest
import yaml
from packaging.requirements import Requirement

import pipeline
from pipeline.cli import main as cli_main

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"
COMPOSE = DOCKER / "compose.yaml"
CONSTRAINTS = DOCKER / "constraints.txt"
DOCKERFILES = {"cpu": DOCKER / "Dockerfile.cpu", "cuda": DOCKER / "Dockerfile.cuda"}
SCHEDULER = "tcp://scheduler:8786"
CLUSTER = ("scheduler", "worker", "job")
VERSION = pipeline.__version__
VERSION_CHECK = "import pipeline,sys; sys.exit(pipeline.__version__ != '${CMD_PIPELINE_VERSION}')"


# ------------------------------------------------------------------ Dockerfile parsing


def _instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with line continuations joined and comments dropped."""
    out: list[tuple[str, str]] = []
    buf = ""
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if line.startswith("#") or not line:
            continue
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        buf += line
        keyword, _, rest = buf.strip().partition(" ")
        out.append((keyword.upper(), rest.strip()))
        buf = ""
    assert not buf, f"{path.name}: dangling line continuation"
    return out


def _resolve(text: str, args: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: args.get(m[1] or m[2], m[0]), text)


def _stages(path: Path) -> list[dict[str, Any]]:
    """The build stages: resolved base image, name, ARG defaults in scope, instructions."""
    global_args: dict[str, str] = {}
    stages: list[dict[str, Any]] = []
    for kw, rest in _instructions(path):
        if kw == "FROM":
            parts = rest.split()
            name = parts[2] if len(parts) == 3 and parts[1].upper() == "AS" else None
            stages.append(
                {"from": _resolve(parts[0], global_args), "name": name, "args": {}, "ins": []}
            )
            continue
        if kw == "ARG":
            key, eq, default = rest.partition("=")
            scope = stages[-1]["args"] if stages else global_args
            scope[key] = default.strip('"') if eq else global_args.get(key, "")
        if stages:
            stages[-1]["ins"].append((kw, rest))
    return stages


def _final(path: Path) -> dict[str, Any]:
    return _stages(path)[-1]


def _runs(stage: dict[str, Any]) -> list[str]:
    return [rest for kw, rest in stage["ins"] if kw == "RUN"]


@pytest.fixture(scope="module", params=sorted(DOCKERFILES))
def dockerfile(request: pytest.FixtureRequest) -> Path:
    return DOCKERFILES[request.param]


# ------------------------------------------------------------------ Dockerfiles


def test_dockerfiles_pin_the_package_version(dockerfile: Path) -> None:
    pins = re.findall(
        r"^ARG CMD_PIPELINE_VERSION=(\S+)\s*$", dockerfile.read_text(encoding="utf-8"), re.M
    )
    assert pins, f"{dockerfile.name} has no ARG CMD_PIPELINE_VERSION=..."
    assert set(pins) == {VERSION}, f"{dockerfile.name} pins {pins}, pipeline is {VERSION}"
    assert _final(dockerfile)["args"]["CMD_PIPELINE_VERSION"] == VERSION


def test_dockerfiles_verify_the_version_at_build_time(dockerfile: Path) -> None:
    final = _final(dockerfile)
    runs = _runs(final)
    installs = [i for i, r in enumerate(runs) if "cmd_pipeline-${CMD_PIPELINE_VERSION}" in r]
    checks = [i for i, r in enumerate(runs) if VERSION_CHECK in r]
    assert installs, f"{dockerfile.name} does not install the versioned wheel"
    assert checks, f"{dockerfile.name} does not check pipeline.__version__ at build time"
    assert min(checks) > max(installs), "the version check must come after the install"
    labels = " ".join(rest for kw, rest in final["ins"] if kw == "LABEL")
    m = re.search(r'org\.opencontainers\.image\.version="?([^"\s]+)"?', labels)
    assert m, f"{dockerfile.name} has no org.opencontainers.image.version label"
    assert _resolve(m[1], final["args"]) == VERSION


def test_torch_pins_match_the_makefile() -> None:
    pins = re.findall(r"torch==([\w.]+)", (ROOT / "Makefile").read_text(encoding="utf-8"))
    assert pins, "the Makefile pins torch"
    cpu, cuda = _final(DOCKERFILES["cpu"]), _final(DOCKERFILES["cuda"])
    assert cpu["args"]["TORCH_VERSION"] == cuda["args"]["TORCH_VERSION"] == pins[0] == "2.13.0"
    assert cpu["args"]["TORCH_INDEX_URL"] == "https://download.pytorch.org/whl/cpu"
    assert re.fullmatch(
        r"https://download\.pytorch\.org/whl/cu13\d", cuda["args"]["TORCH_INDEX_URL"]
    )
    for stage in (cpu, cuda):
        torch_runs = [_resolve(r, stage["args"]) for r in _runs(stage) if "--index-url" in r]
        assert len(torch_runs) == 1
        assert f"torch=={pins[0]}" in torch_runs[0]
        assert stage["args"]["TORCH_INDEX_URL"] in torch_runs[0]


def test_base_images_and_cuda_versions_agree() -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    assert pyproject["project"]["requires-python"] == ">=3.11"
    cpu, cuda = _stages(DOCKERFILES["cpu"]), _stages(DOCKERFILES["cuda"])
    assert cpu[-1]["from"] == "python:3.11-slim"
    assert {s["from"] for s in cpu} == {"python:3.11-slim"}
    # both build the wheel in the same builder
    assert next(s for s in cuda if s["name"] == "builder")["from"] == "python:3.11-slim"
    m = re.fullmatch(r"nvidia/cuda:(\d+)\.(\d+)\.(\d+)-runtime-ubuntu24\.04", cuda[-1]["from"])
    assert m, cuda[-1]["from"]
    cuda_major = m[1]
    # CuPy's wheel, torch's wheel and dask-cuda's extra are for the same CUDA major
    gpu_extra = [Requirement(r).name for r in pyproject["project"]["optional-dependencies"]["gpu"]]
    assert f"cupy-cuda{cuda_major}x" in gpu_extra
    assert _final(DOCKERFILES["cuda"])["args"]["TORCH_INDEX_URL"].endswith(f"/cu{cuda_major}0")
    install = " ".join(_runs(cuda[-1]))
    assert f"dask-cuda[cu{cuda_major}]" in install
    assert "[gpu,s3]" in install
    assert "[s3]" in " ".join(_runs(cpu[-1]))
    # the CUDA image installs Python PYTHON_VERSION (3.11), like the CPU base image
    assert cuda[-1]["args"]["PYTHON_VERSION"] == "3.11"


def test_dockerfiles_run_as_a_non_root_user() -> None:
    users = {}
    for kind, path in DOCKERFILES.items():
        final = _final(path)
        found = [_resolve(rest, final["args"]) for kw, rest in final["ins"] if kw == "USER"]
        assert found, f"{path.name} has no USER"
        user = found[-1].split(":")[0]
        assert user not in ("root", "0", ""), f"{path.name} runs as {found[-1]}"
        # numeric, so Kubernetes' runAsNonRoot can verify it
        assert user.isdigit() and int(user) > 0
        users[kind] = found[-1]
    # the same UID:GID, so CPU and CUDA containers can write the same volume
    assert users["cpu"] == users["cuda"]


def test_entrypoint_runs_any_command(dockerfile: Path) -> None:
    final = _final(dockerfile)
    entry = [rest for kw, rest in final["ins"] if kw == "ENTRYPOINT"]
    assert len(entry) == 1
    # exec form, tini then "--": `docker run IMAGE dask scheduler` etc. run as given
    assert yaml.safe_load(entry[0]) == ["/usr/bin/tini", "--"]
    workdir = [rest for kw, rest in final["ins"] if kw == "WORKDIR"]
    assert workdir[-1] == "/work"
    env = " ".join(rest for kw, rest in final["ins"] if kw == "ENV")
    assert "PATH=/opt/venv/bin:$PATH" in env


def test_both_images_install_with_the_shared_constraints(dockerfile: Path) -> None:
    final = _final(dockerfile)
    copies = [rest for kw, rest in final["ins"] if kw == "COPY"]
    target = next(c.split()[-1] for c in copies if c.split()[0] == "docker/constraints.txt")
    install = next(r for r in _runs(final) if "cmd_pipeline-${CMD_PIPELINE_VERSION}" in r)
    assert f"--constraint {target}" in install
    assert "pip check" in install


def test_constraints_satisfy_the_project() -> None:
    pins: dict[str, str] = {}
    for line in CONSTRAINTS.read_text(encoding="utf-8").splitlines():
        line = line.split("#")[0].strip()
        if line:
            req = Requirement(line)
            (spec,) = req.specifier
            assert spec.operator == "==", line
            pins[req.name] = spec.version
    # dask-cuda pins dask and distributed together; so do we
    assert pins["dask"] == pins["distributed"]
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"][
        "dependencies"
    ]
    for dep in map(Requirement, deps):
        if dep.name in pins:
            assert dep.specifier.contains(pins[dep.name]), f"{dep} vs {dep.name}=={pins[dep.name]}"


# ------------------------------------------------------------------ ignore files


def _ignore_rules(path: Path) -> list[tuple[bool, re.Pattern[str]]]:
    rules = []
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = line.lstrip("!").strip().strip("/")
        rx, i = "", 0
        while i < len(pattern):
            if pattern.startswith("**/", i):
                rx, i = rx + "(?:.*/)?", i + 3
            elif pattern.startswith("**", i):
                rx, i = rx + ".*", i + 2
            elif pattern[i] == "*":
                rx, i = rx + "[^/]*", i + 1
            elif pattern[i] == "?":
                rx, i = rx + "[^/]", i + 1
            elif pattern[i] == "[":
                j = pattern.index("]", i)
                rx, i = rx + pattern[i : j + 1], j + 1
            else:
                rx, i = rx + re.escape(pattern[i]), i + 1
        rules.append((negate, re.compile(rx + r"\Z")))
    return rules


def _ignored(rel: str, rules: list[tuple[bool, re.Pattern[str]]]) -> bool:
    """Docker's rule: the last pattern that matches the path or one of its parents wins."""
    parts = rel.split("/")
    candidates = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    ignored = False
    for negate, rx in rules:
        if any(rx.match(c) for c in candidates):
            ignored = not negate
    return ignored


def test_dockerignore_sends_the_sources_and_nothing_else(dockerfile: Path) -> None:
    ignore = dockerfile.with_name(dockerfile.name + ".dockerignore")
    assert ignore.is_file(), f"{ignore.name} (BuildKit's per-Dockerfile ignore file) is missing"
    rules = _ignore_rules(ignore)
    sources = []
    for stage in _stages(dockerfile):
        for kw, rest in stage["ins"]:
            if kw == "COPY" and not rest.startswith("--from"):
                sources += rest.split()[:-1]
    assert sources
    for src in sources:
        path = ROOT / src
        assert path.exists(), f"{dockerfile.name} copies {src}, which does not exist"
        files = (
            [path]
            if path.is_file()
            else [p for p in path.rglob("*") if p.is_file() and "__pycache__" not in p.parts]
        )
        for f in files:
            rel = f.relative_to(ROOT).as_posix()
            assert not _ignored(rel, rules), f"{ignore.name} leaves out {rel}"
    for rel in (
        ".venv/bin/python",
        ".git/HEAD",
        "runs/cnn/epoch_0001.pt",
        "demo-output/report.html",
        "bench-output/ingest.json",
        "cnn.zarr/zarr.json",
        "pipeline/__pycache__/cli.cpython-311.pyc",
        "workflows/runs/x.pt",
        "workflows/demo.zarr/zarr.json",
        "cmd_pipeline.egg-info/PKG-INFO",
        ".pytest_cache/README.md",
        ".mypy_cache/3.11/x.json",
        ".ruff_cache/CACHEDIR.TAG",
        ".hypothesis/examples/x",
        "tests/cli/test_cli.py",
        "notebooks/walkthrough.ipynb",
    ):
        assert _ignored(rel, rules), f"{ignore.name} sends {rel} to the build"


# ------------------------------------------------------------------ compose


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))
    assert isinstance(data, dict)
    return data


def _command(svc: dict[str, Any]) -> list[str]:
    cmd = svc.get("command")
    return shlex.split(cmd) if isinstance(cmd, str) else [str(c) for c in cmd or []]


def _mounts(svc: dict[str, Any]) -> list[tuple[str, str, bool]]:
    """(source, target, read_only) of each volume entry, short or long syntax."""
    out = []
    for v in svc.get("volumes", []):
        if isinstance(v, str):
            parts = v.split(":")
            out.append((parts[0], parts[1], len(parts) > 2 and "ro" in parts[2].split(",")))
        else:
            out.append((v["source"], v["target"], bool(v.get("read_only"))))
    return out


def _published(svc: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(host_ip, published, target) of each port entry, short or long syntax."""
    out = []
    for p in svc.get("ports", []):
        if isinstance(p, dict):
            out.append((p.get("host_ip", ""), str(p.get("published", "")), str(p["target"])))
            continue
        p = str(p).split("/")[0]
        if p.startswith("["):  # [::1]:8787:8787
            host_ip, _, rest = p[1:].partition("]:")
            published, _, target = rest.rpartition(":")
        else:
            parts = p.split(":")
            host_ip = parts[0] if len(parts) == 3 else ""
            published = parts[-2] if len(parts) >= 2 else ""
            target = parts[-1]
        out.append((host_ip, published, target))
    return out


def test_compose_has_the_cluster_services(compose: dict[str, Any]) -> None:
    # the project name fixes the volume's name (cmd-pipeline_data), whatever the directory
    assert compose["name"] == "cmd-pipeline"
    services = compose["services"]
    for name in CLUSTER:
        assert name in services
        assert "profiles" not in services[name], f"{name} must start without a profile"


def test_cluster_services_use_one_image(compose: dict[str, Any]) -> None:
    services = compose["services"]
    images = {services[name]["image"] for name in CLUSTER}
    assert images == {f"cmd-pipeline:${{CMD_PIPELINE_VERSION:-{VERSION}}}-cpu"}
    for name in CLUSTER:
        build = services[name]["build"]
        assert (COMPOSE.parent / build["context"]).resolve() == ROOT
        assert build["dockerfile"] == "docker/Dockerfile.cpu"
        assert build["args"]["CMD_PIPELINE_VERSION"] == f"${{CMD_PIPELINE_VERSION:-{VERSION}}}"
    gpu = services["cuda-worker"]
    assert gpu["profiles"] == ["gpu"]
    assert gpu["image"] == f"cmd-pipeline:${{CMD_PIPELINE_VERSION:-{VERSION}}}-cuda"
    assert gpu["build"]["dockerfile"] == "docker/Dockerfile.cuda"
    assert (COMPOSE.parent / gpu["build"]["context"]).resolve() == ROOT


def test_compose_version_defaults_match_the_package() -> None:
    defaults = re.findall(
        r"\$\{CMD_PIPELINE_VERSION:-([^}]+)\}", COMPOSE.read_text(encoding="utf-8")
    )
    assert defaults
    assert set(defaults) == {VERSION}


def test_job_and_workers_share_one_volume_at_one_path(compose: dict[str, Any]) -> None:
    services = compose["services"]
    named = set(compose.get("volumes") or {})
    users = ("job", "worker", "cuda-worker")
    mounts = {name: _mounts(services[name]) for name in users}
    for name, ms in mounts.items():
        assert len(ms) == 1, f"{name}: {ms}"
        source, _, read_only = ms[0]
        assert source in named, f"{name} mounts {source}, not a named volume"
        assert not read_only, f"{name} must be able to write the store"
    assert len({ms[0][:2] for ms in mounts.values()}) == 1, mounts
    target = mounts["job"][0][1]
    assert target == "/data"
    script = _command(services["job"])[-1]
    assert "/data/store.zarr" in script


def test_only_the_dashboard_is_published_on_loopback(compose: dict[str, Any]) -> None:
    services = compose["services"]
    ports = _published(services["scheduler"])
    assert ports == [("127.0.0.1", "8787", "8787")]
    for name, svc in services.items():
        for host_ip, published, target in _published(svc):
            assert "8786" not in (published, target), f"{name} publishes the scheduler port"
            assert host_ip in ("127.0.0.1", "::1"), f"{name} publishes {target} beyond loopback"
        if name != "scheduler":
            assert not svc.get("ports"), f"{name} publishes ports"
    cmd = _command(services["scheduler"])
    assert cmd[:2] == ["dask", "scheduler"]
    assert cmd[cmd.index("--port") + 1] == "8786"
    assert cmd[cmd.index("--dashboard-address") + 1].endswith(":8787")


def test_workers_join_the_scheduler(compose: dict[str, Any]) -> None:
    services = compose["services"]
    worker = services["worker"]
    cmd = _command(worker)
    assert cmd[:3] == ["dask", "worker", SCHEDULER]
    for opt, value in (("--nworkers", "1"), ("--nthreads", "1")):
        assert cmd[cmd.index(opt) + 1] == value
    assert "--memory-limit" in cmd
    assert worker["deploy"]["replicas"] == 2
    gpu = services["cuda-worker"]
    assert _command(gpu)[:4] == ["dask", "cuda", "worker", SCHEDULER]
    (device,) = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]


def test_everything_waits_for_a_healthy_scheduler(compose: dict[str, Any]) -> None:
    services = compose["services"]
    check = " ".join(services["scheduler"]["healthcheck"]["test"])
    assert "8787/health" in check
    for name in ("worker", "job", "cuda-worker"):
        deps = services[name]["depends_on"]
        assert deps["scheduler"]["condition"] == "service_healthy", name
    assert "worker" in services["job"]["depends_on"]


def _job_commands(compose: dict[str, Any]) -> list[list[str]]:
    """The job's script as simple commands (split at newlines, ;, && and ||)."""
    cmd = _command(compose["services"]["job"])
    assert cmd[:2] == ["sh", "-euc"], cmd
    script = cmd[2]
    # compose would interpolate $VAR itself: the script must not rely on shell variables
    assert "$" not in script
    commands: list[list[str]] = []
    for line in script.splitlines():
        lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        current: list[str] = []
        for tok in lexer:
            if tok in (";", "&&", "||"):
                commands.append(current)
                current = []
            else:
                current.append(tok)
        commands.append(current)
    return [c for c in commands if c]


def _option_names(cmd: click.Command) -> set[str]:
    names = {"--help", "-h"}
    for p in cmd.params:
        if isinstance(p, click.Option):
            names.update(p.opts)
            names.update(p.secondary_opts)
    return names


def test_job_uses_only_real_cli_commands_and_options(compose: dict[str, Any]) -> None:
    calls = [c[1:] for c in _job_commands(compose) if c[0] == "cmd-pipeline"]
    used = [args[0] for args in calls]
    assert {"ingest", "fit", "report"} <= set(used), used
    for args in calls:
        sub, rest = args[0], args[1:]
        assert sub in cli_main.commands, f"cmd-pipeline has no subcommand {sub!r}"
        cmd = cli_main.commands[sub]
        known = _option_names(cmd)
        for tok in rest:
            if tok.startswith("-"):
                assert tok.split("=")[0] in known, f"cmd-pipeline {sub} has no option {tok}"
        # let click parse the whole command line: types, choices, required options
        try:
            ctx = cmd.make_context(sub, list(rest))
        except click.ClickException as e:
            pytest.fail(f"cmd-pipeline {' '.join(args)}: {e.format_message()}")
        # every command that computes goes to the compose scheduler
        if "scheduler" in ctx.params:
            assert ctx.params["scheduler"] == SCHEDULER, f"cmd-pipeline {sub}"
        if "store" in ctx.params:
            assert ctx.params["store"].startswith("/data/")


def test_job_environment_names_the_scheduler(compose: dict[str, Any]) -> None:
    env = compose["services"]["job"]["environment"]
    option = next(p for p in cli_main.commands["fit"].params if p.name == "scheduler")
    assert option.envvar == "CMD_PIPELINE_SCHEDULER"
    assert env["CMD_PIPELINE_SCHEDULER"] == SCHEDULER


def test_job_uses_only_real_workflow_options(compose: dict[str, Any]) -> None:
    calls = [c for c in _job_commands(compose) if c[:2] == ["python", "-m"]]
    assert calls
    for call in calls:
        module = importlib.import_module(call[2])
        out = io.StringIO()
        with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exit_:
            module.main(["--help"])
        assert exit_.value.code == 0
        help_text = out.getvalue()
        for tok in call[3:]:
            if tok.startswith("--"):
                assert re.search(rf"{re.escape(tok)}\b", help_text), f"{call[2]} has no {tok}"


def _docker_compose() -> list[str] | None:
    docker = shutil.which("docker")
    if docker is None:
        return None
    try:
        probe = subprocess.run(
            [docker, "compose", "version"], capture_output=True, text=True, timeout=30
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return [docker, "compose"] if probe.returncode == 0 else None


@pytest.mark.parametrize("profile", [None, "gpu"])
def test_docker_compose_config_accepts_the_file(profile: str | None) -> None:
    base = _docker_compose()
    if base is None:
        pytest.skip("no `docker compose` here (Docker CLI or its compose plugin is missing)")
    cmd = [*base, "-f", str(COMPOSE)]
    if profile:
        cmd += ["--profile", profile]
    result = subprocess.run(
        [*cmd, "config", "-q"], capture_output=True, text=True, cwd=ROOT, timeout=60
    )
    assert result.returncode == 0, result.stderr


def test_docker_readme_documents_the_builds() -> None:
    text = (DOCKER / "README.md").read_text(encoding="utf-8")
    for needle in (
        "docker build -f docker/Dockerfile.cpu",
        "docker build -f docker/Dockerfile.cuda",
        "docker compose -f docker/compose.yaml",
        "http://127.0.0.1:8787",
        "dask cuda worker",
    ):
        assert needle in text, needle
