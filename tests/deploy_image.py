"""The repo's Dockerfile replayed without Docker: its build stage in a fresh virtualenv, its
final stage's ``ENV``/``WORKDIR``/``ENTRYPOINT``/``CMD``/``HEALTHCHECK`` read for running.

Every absolute path the Dockerfile names (``WORKDIR /src``, ``VIRTUAL_ENV=/opt/pop3proxy``,
...) is moved under a temporary root. The build stage's ``COPY`` gets the files the real build
context would hold (``.dockerignore`` applied) and its ``RUN`` lines run with ``/bin/sh -c``,
with ``python`` and ``pip`` on ``PATH`` being this interpreter. Kept apart from Docker's: the
pip cache (``PIP_NO_CACHE_DIR`` is dropped, so repeated runs are fast) and the network access
pip needs to fetch build requirements and dependencies from the package index.

The final stage's ``RUN`` lines change the system (user accounts, the base image's own pip)
and are not replayed; the directories its ``VOLUME`` and ``WORKDIR`` name are created instead.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from tests.deploy_dockerfile import (
    DockerfileError,
    Stage,
    context_files,
    exec_form,
    parse_dockerfile,
    split_options,
    substitute,
)
from tests.peers.proxy import ProxyProcess

__all__ = [
    "DOCKERFILE",
    "DOCKERIGNORE",
    "IMAGE_PATH",
    "REPO_ROOT",
    "Image",
    "ImageProcess",
    "build_image",
    "duration",
    "read_stages",
]

REPO_ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO_ROOT / "Dockerfile"
DOCKERIGNORE = REPO_ROOT / ".dockerignore"

#: PATH of the official python images (``/usr/local/bin`` first).
IMAGE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

_RUN_TIMEOUT = 300.0


def read_stages() -> list[Stage]:
    return parse_dockerfile(DOCKERFILE.read_text())


def duration(text: str) -> float:
    """A Docker duration such as ``30s``, ``1m30s`` or ``500ms``, in seconds."""
    units = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
    total, number = 0.0, ""
    i = 0
    while i < len(text):
        if text[i].isdigit() or text[i] == ".":
            number += text[i]
            i += 1
            continue
        unit = "ms" if text.startswith("ms", i) else text[i]
        if unit not in units or not number:
            raise DockerfileError(f"cannot read the duration {text!r}")
        total += float(number) * units[unit]
        number = ""
        i += len(unit)
    if number:
        raise DockerfileError(f"duration {text!r} lacks a unit")
    return total


@dataclass(frozen=True)
class Image:
    """The final stage, installed under ``root``.

    Attributes:
        env: the final stage's environment, paths moved under ``root`` (``PATH`` included).
        image_env: the same environment as it is inside the image.
        workdir: the final ``WORKDIR`` (moved).
        command: ``ENTRYPOINT`` + ``CMD``.
        healthcheck: the ``HEALTHCHECK CMD`` and its ``--timeout`` in seconds.
        stop_signal: ``STOPSIGNAL``.
        user: ``USER``.
        venv: the virtualenv the build stage made (moved).
    """

    root: Path
    env: dict[str, str]
    image_env: dict[str, str]
    workdir: Path
    command: list[str]
    healthcheck: list[str]
    healthcheck_timeout: float
    stop_signal: signal.Signals
    user: str
    venv: Path

    def inside(self, path: str) -> Path:
        """Where an absolute image path ``path`` lies under ``root``."""
        return _inside(self.root, path)


def _inside(root: Path, path: str) -> Path:
    if not path.startswith("/"):
        raise DockerfileError(f"expected an absolute path, got {path!r}")
    return root / path.lstrip("/")


def _move_paths(root: Path, value: str) -> str:
    """Absolute paths among the ``:``-separated pieces of ``value`` moved under ``root``."""
    return ":".join(
        str(_inside(root, piece)) if piece.startswith("/") else piece for piece in value.split(":")
    )


def _shims(directory: Path) -> Path:
    """``python`` and ``pip`` commands that run this interpreter."""
    directory.mkdir(parents=True, exist_ok=True)
    for name, args in (("python", ""), ("pip", " -m pip")):
        shim = directory / name
        shim.write_text(f'#!/bin/sh\nexec "{sys.executable}"{args} "$@"\n')
        shim.chmod(0o755)
    return directory


def _copy(stage_env: dict[str, str], args: str, workdir: Path, root: Path, line: int) -> None:
    options, rest = split_options(args)
    if options:
        raise DockerfileError(f"line {line}: COPY options {options} in the build stage")
    words = [substitute(w, stage_env) for w in rest.split()]
    if len(words) < 2:
        raise DockerfileError(f"line {line}: COPY needs a source and a destination")
    *sources, dest = words
    target = _inside(root, dest) if dest.startswith("/") else workdir / dest
    files = context_files(REPO_ROOT, DOCKERIGNORE.read_text())
    for source in sources:
        src = source.strip("/") if source not in {".", "./"} else ""
        chosen = [f for f in files if not src or f == src or f.startswith(src + "/")]
        if not chosen:
            raise DockerfileError(f"line {line}: COPY {source}: not in the build context")
        for rel in chosen:
            if rel == src:  # a single file
                into = target / Path(rel).name if dest.endswith(("/", ".")) else target
            else:  # a directory's contents go into the destination
                into = target / (rel[len(src) + 1 :] if src else rel)
            into.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO_ROOT / rel, into)


def _replay_build(stage: Stage, root: Path, base_env: dict[str, str]) -> None:
    shims = _shims(root / ".shims")
    workdir = root
    for instruction in stage.instructions:
        env = stage.env(
            {"PATH": IMAGE_PATH}, upto=instruction, rewrite=lambda v: _move_paths(root, v)
        )
        keyword = instruction.keyword
        if keyword == "ENV":
            continue
        if keyword == "WORKDIR":
            path = substitute(instruction.args, env)
            workdir = _inside(root, path) if path.startswith("/") else workdir / path
            workdir.mkdir(parents=True, exist_ok=True)
        elif keyword == "COPY":
            _copy(env, instruction.args, workdir, root, instruction.line)
        elif keyword == "RUN":
            if instruction.args.startswith("["):
                argv = exec_form(instruction.args, "RUN")
            else:
                argv = ["/bin/sh", "-c", instruction.args]
            run_env = {**base_env, **env}
            run_env.pop("PIP_NO_CACHE_DIR", None)  # keep pip's cache: same result, faster
            run_env["PATH"] = f"{shims}:{env.get('PATH', IMAGE_PATH)}"
            result = subprocess.run(
                argv,
                cwd=workdir,
                env=run_env,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=_RUN_TIMEOUT,
                check=False,
            )
            if result.returncode != 0:
                raise DockerfileError(
                    f"line {instruction.line}: RUN failed with status {result.returncode}:\n"
                    f"{instruction.args}\n--- stdout\n{result.stdout[-3000:]}\n"
                    f"--- stderr\n{result.stderr[-3000:]}"
                )
        else:
            raise DockerfileError(
                f"line {instruction.line}: the replay does not handle {keyword} in the build stage"
            )


def build_image(root: Path) -> Image:
    """Replay the Dockerfile under ``root``; raises DockerfileError when a step fails."""
    stages = read_stages()
    if len(stages) < 2:
        raise DockerfileError("expected a build stage and a final stage")
    build, final = stages[0], stages[-1]
    base_env = {
        key: value
        for key, value in os.environ.items()
        # The machine's PIP_* settings (an index mirror, say) stay: a real build gets them
        # as build arguments. The Dockerfile's ENV overrides them.
        if not key.startswith(("POP3PROXY_", "PYTHON")) and key != "VIRTUAL_ENV"
    }
    _replay_build(build, root, base_env)

    def moved(value: str) -> str:
        return _move_paths(root, value)

    env = final.env({"PATH": IMAGE_PATH}, rewrite=moved)
    image_env = final.env({"PATH": IMAGE_PATH})
    workdir = root
    for instruction in final.instructions:
        current = final.env({"PATH": IMAGE_PATH}, upto=instruction, rewrite=moved)
        if instruction.keyword == "COPY":
            options, rest = split_options(instruction.args)
            if "from" not in options:
                raise DockerfileError(
                    f"line {instruction.line}: the final stage copies only from the build stage"
                )
            words = [substitute(w, current) for w in rest.split()]
            if len(words) != 2 or words[0] != words[1]:
                raise DockerfileError(
                    f"line {instruction.line}: COPY --from must copy one path to the same path "
                    f"(a virtualenv cannot move), got {words}"
                )
            if not Path(words[0]).exists():
                raise DockerfileError(
                    f"line {instruction.line}: the build stage made no {words[0]}"
                )
        elif instruction.keyword in {"VOLUME", "WORKDIR"}:
            path = Path(substitute(instruction.args, current))
            path.mkdir(parents=True, exist_ok=True)
            if instruction.keyword == "WORKDIR":
                workdir = path

    def last(keyword: str) -> str:
        instruction = final.last(keyword)
        if instruction is None:
            raise DockerfileError(f"the final stage has no {keyword}")
        return instruction.args

    options, health = split_options(last("HEALTHCHECK"))
    if not health.startswith("CMD "):
        raise DockerfileError(f"HEALTHCHECK must be CMD [...], got {health!r}")
    venv = Path(env["VIRTUAL_ENV"])
    return Image(
        root=root,
        env=env,
        image_env=image_env,
        workdir=workdir,
        command=exec_form(last("ENTRYPOINT"), "ENTRYPOINT") + exec_form(last("CMD"), "CMD"),
        healthcheck=exec_form(health[len("CMD ") :], "HEALTHCHECK CMD"),
        healthcheck_timeout=duration(options.get("timeout", "30s")),
        stop_signal=signal.Signals[last("STOPSIGNAL")],
        user=last("USER"),
        venv=venv,
    )


class ImageProcess(ProxyProcess):
    """The image's ``ENTRYPOINT`` + ``CMD`` as a subprocess, with exactly the given environment.

    The log handling and ``listener.started`` wait are :class:`ProxyProcess`'s.
    """

    def __init__(self, log_path: Path, image: Image, env: dict[str, str]) -> None:
        super().__init__(log_path, upstream_port=0, ca_file=None, server_name=None)
        self.image = image
        self.env = env

    def command(self) -> list[str]:
        return list(self.image.command)

    def _environment(self) -> dict[str, str]:
        return dict(self.env)

    @property
    def pid(self) -> int:
        if self._proc is None:
            raise RuntimeError("not started")
        return self._proc.pid

    def wait(self, timeout: float) -> int:
        """Wait for the process to exit by itself; its exit status."""
        if self._proc is None:
            raise RuntimeError("not started")
        return self._proc.wait(timeout=timeout)
