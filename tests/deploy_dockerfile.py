"""A small Dockerfile and ``.dockerignore`` reader, enough for tests/test_deploy.py.

It reads what the repo's Dockerfile uses: comments, line continuations, stages (``FROM image
AS name``), ``ENV`` in ``KEY=VALUE`` form with ``$VAR``/``${VAR}`` substitution,
exec-form (JSON) ``CMD``/``ENTRYPOINT``/``HEALTHCHECK``, and ``--flag=value`` options.
Anything it cannot read (a shell-form command, an ``ENV KEY VALUE`` pair, a parser directive
other than comments) raises :class:`DockerfileError`, so the test fails rather than guessing.

``.dockerignore`` patterns follow Docker's rules for the subset used here: ``*`` within one
path segment, ``**`` across segments, ``!`` re-includes, the last matching pattern wins, and a
pattern that matches a directory matches everything under it.
"""

from __future__ import annotations

import json
import os
import re
import shlex
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "DockerfileError",
    "Instruction",
    "Stage",
    "context_files",
    "exec_form",
    "is_excluded",
    "parse_dockerfile",
    "split_options",
    "substitute",
]


class DockerfileError(ValueError):
    """The Dockerfile uses something this reader does not understand."""


@dataclass(frozen=True, slots=True)
class Instruction:
    """One instruction: upper-case keyword, the rest of its (joined) line, its first line."""

    keyword: str
    args: str
    line: int


@dataclass(slots=True)
class Stage:
    """A build stage: its base image, its ``AS`` name, and its instructions after ``FROM``."""

    base: str
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]

    def last(self, keyword: str) -> Instruction | None:
        found = self.all(keyword)
        return found[-1] if found else None

    def env(
        self,
        initial: Mapping[str, str] | None = None,
        *,
        upto: Instruction | None = None,
        rewrite: Callable[[str], str] | None = None,
    ) -> dict[str, str]:
        """The stage's ``ENV`` values, substituted in order, on top of ``initial``.

        Args:
            initial: the base image's environment.
            upto: only the ``ENV`` instructions before this one count.
            rewrite: applied to each literal value before ``$VAR`` substitution (the tests
                move absolute paths under a temporary directory with it).
        """
        values = dict(initial or {})
        for instruction in self.instructions:
            if instruction is upto:
                break
            if instruction.keyword != "ENV":
                continue
            before = dict(values)  # one ENV line sees only the values set before it
            for word in shlex.split(instruction.args):
                key, sep, value = word.partition("=")
                if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
                    raise DockerfileError(
                        f"line {instruction.line}: ENV must be KEY=VALUE pairs, got {word!r}"
                    )
                literal = rewrite(value) if rewrite is not None else value
                values[key] = substitute(literal, before)
        return values


def _logical_lines(text: str) -> Iterator[tuple[int, str]]:
    """(first line number, text) of each instruction, continuations joined, comments dropped."""
    pending: list[str] = []
    start = 0
    for number, raw in enumerate(text.splitlines(), start=1):
        stripped = raw.strip()
        if stripped.startswith("#") or (not stripped and not pending):
            continue  # comments may sit inside a continued instruction too
        if not pending:
            start = number
        if stripped.endswith("\\"):
            pending.append(stripped[:-1].strip())
            continue
        pending.append(stripped)
        yield start, " ".join(part for part in pending if part)
        pending = []
    if pending:
        raise DockerfileError(f"line {start}: the file ends inside a continued line")


def parse_dockerfile(text: str) -> list[Stage]:
    """The stages of a Dockerfile, in order."""
    stages: list[Stage] = []
    for number, line in _logical_lines(text):
        keyword, _, args = line.partition(" ")
        keyword = keyword.upper()
        args = args.strip()
        if keyword == "FROM":
            words = args.split()
            if words and words[0].startswith("--"):
                raise DockerfileError(f"line {number}: FROM options are not supported")
            if len(words) == 3 and words[1].upper() == "AS":
                stages.append(Stage(base=words[0], name=words[2]))
            elif len(words) == 1:
                stages.append(Stage(base=words[0], name=None))
            else:
                raise DockerfileError(f"line {number}: cannot read FROM {args!r}")
            continue
        if not stages:
            if keyword == "ARG":
                continue
            raise DockerfileError(f"line {number}: {keyword} before the first FROM")
        stages[-1].instructions.append(Instruction(keyword, args, number))
    if not stages:
        raise DockerfileError("no FROM instruction")
    return stages


def split_options(args: str) -> tuple[dict[str, str], str]:
    """Leading ``--name=value`` options of an instruction, and the rest of it."""
    options: dict[str, str] = {}
    rest = args
    while rest.startswith("--"):
        word, _, rest = rest.partition(" ")
        name, sep, value = word[2:].partition("=")
        if not sep:
            raise DockerfileError(f"option {word!r} has no =value")
        options[name] = value
        rest = rest.lstrip()
    return options, rest


def exec_form(args: str, what: str) -> list[str]:
    """A JSON array of strings (the exec form); anything else raises DockerfileError."""
    try:
        value = json.loads(args)
    except ValueError:
        value = None
    if not (isinstance(value, list) and value and all(isinstance(v, str) for v in value)):
        raise DockerfileError(f"{what} must be in exec form (a JSON array), got {args!r}")
    return list(value)


_VARIABLE = re.compile(r"\$(?:\{([A-Za-z_][A-Za-z0-9_]*)\}|([A-Za-z_][A-Za-z0-9_]*))")


def substitute(text: str, values: Mapping[str, str]) -> str:
    """``$VAR`` and ``${VAR}`` replaced by their values (unset ones by nothing), as Docker does."""
    return _VARIABLE.sub(lambda m: values.get(m.group(1) or m.group(2), ""), text)


# --------------------------------------------------------------------------------------------
# .dockerignore
# --------------------------------------------------------------------------------------------


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    parts: list[str] = []
    i = 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            parts.append("(?:.*/)?")
            i += 3
        elif pattern.startswith("**", i):
            parts.append(".*")
            i += 2
        elif pattern[i] == "*":
            parts.append("[^/]*")
            i += 1
        elif pattern[i] == "?":
            parts.append("[^/]")
            i += 1
        elif pattern[i] in "[\\":
            raise DockerfileError(f".dockerignore pattern {pattern!r}: [ and \\ not supported")
        else:
            parts.append(re.escape(pattern[i]))
            i += 1
    return re.compile("".join(parts) + r"\Z")


def _ignore_rules(text: str) -> list[tuple[bool, str, re.Pattern[str]]]:
    rules = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        include = line.startswith("!")
        pattern = (line[1:].strip() if include else line).strip("/")
        rules.append((include, pattern, _pattern_regex(pattern)))
    return rules


def _excluded(rel: str, rules: list[tuple[bool, str, re.Pattern[str]]]) -> bool:
    parts = rel.split("/")
    prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    excluded = False
    for include, _, regex in rules:
        if any(regex.match(prefix) for prefix in prefixes):
            excluded = not include
    return excluded


def _may_reinclude_below(rel: str, rules: list[tuple[bool, str, re.Pattern[str]]]) -> bool:
    """Whether some ``!`` pattern could match a path below the excluded directory ``rel``."""
    parts = rel.split("/")
    for include, pattern, _ in rules:
        if not include:
            continue
        segments = pattern.split("/")
        if len(segments) <= len(parts) and "**" not in segments:
            continue
        for segment, part in zip(segments, parts, strict=False):
            if segment == "**":
                return True
            if not _pattern_regex(segment).match(part):
                break
        else:
            return True
    return False


def context_files(root: Path, dockerignore: str) -> list[str]:
    """The files (relative POSIX paths) that ``docker build root`` would send as its context.

    Excluded directories that no ``!`` pattern reaches into are not walked (so ``.venv`` costs
    nothing).
    """
    rules = _ignore_rules(dockerignore)
    found: list[str] = []
    for directory, dirs, files in os.walk(root):
        base = Path(directory).relative_to(root).as_posix()
        prefix = "" if base == "." else base + "/"
        dirs[:] = sorted(
            d
            for d in dirs
            if not _excluded(prefix + d, rules) or _may_reinclude_below(prefix + d, rules)
        )
        found.extend(prefix + f for f in sorted(files) if not _excluded(prefix + f, rules))
    return sorted(found)


def is_excluded(rel: str, dockerignore: str) -> bool:
    """Whether the path ``rel`` (relative POSIX) is left out of the build context."""
    return _excluded(rel, _ignore_rules(dockerignore))
