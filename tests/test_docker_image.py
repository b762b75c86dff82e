"""The trainer image (docker/Dockerfile, .dockerignore), checked statically: there is no Docker
engine here. A small Dockerfile parser reads the instructions; the checks compare them with what
the rest of the repository says: the README's install command, the torch pin of .ci/run, the
package's console scripts, and the user, command and writable mounts of the rendered chart.
"""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
from helm_chart import CHART_DIR, CPU_TEST_VALUES, find_one, render_chart, worker_container

REPO_ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO_ROOT / "docker" / "Dockerfile"
DOCKERIGNORE = REPO_ROOT / ".dockerignore"


# ---- a small Dockerfile parser ----


@dataclass(frozen=True)
class Instruction:
    keyword: str  # upper case, e.g. "RUN"
    args: str  # the rest of the logical line, continuations joined
    line: int  # where it starts (1-based)


@dataclass
class Stage:
    base: str  # the FROM image with global ARG defaults substituted
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]


def parse_instructions(text: str) -> list[Instruction]:
    """Logical instructions: comments dropped (also inside continuations, as BuildKit does),
    lines ending in a backslash joined with the next."""
    instructions: list[Instruction] = []
    pending: list[str] = []
    start = 0
    for number, raw in enumerate(text.splitlines(), start=1):
        stripped = raw.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if not pending:
            start = number
        if stripped.endswith("\\"):
            pending.append(stripped[:-1].strip())
            continue
        pending.append(stripped)
        logical = " ".join(part for part in pending if part)
        pending = []
        keyword, _, args = logical.partition(" ")
        instructions.append(Instruction(keyword.upper(), args.strip(), start))
    assert not pending, "the Dockerfile ends inside a line continuation"
    return instructions


def substitute(text: str, variables: dict[str, str]) -> str:
    """${NAME} and $NAME from ``variables`` (unknown names stay as written)."""
    pattern = re.compile(r"\$\{(\w+)\}|\$(\w+)")
    return pattern.sub(lambda m: variables.get(m[1] or m[2], m[0]), text)


def arg_defaults(instructions: list[Instruction]) -> dict[str, str]:
    """ARG NAME=default pairs (ARGs without a default are left out)."""
    defaults: dict[str, str] = {}
    for instruction in instructions:
        if instruction.keyword == "ARG":
            name, sep, value = instruction.args.partition("=")
            if sep:
                defaults[name.strip()] = shlex.split(value)[0] if value.strip() else ""
    return defaults


def parse_dockerfile(text: str) -> list[Stage]:
    """The build stages, each FROM resolved against the ARG defaults declared before it."""
    instructions = parse_instructions(text)
    first_from = next(i for i, ins in enumerate(instructions) if ins.keyword == "FROM")
    global_args = arg_defaults(instructions[:first_from])
    stages: list[Stage] = []
    for instruction in instructions[first_from:]:
        if instruction.keyword == "FROM":
            words = [w for w in instruction.args.split() if not w.startswith("--platform")]
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            stages.append(Stage(substitute(words[0], global_args), name))
        else:
            stages[-1].instructions.append(instruction)
    return stages


def env_of(stage: Stage) -> dict[str, str]:
    """The stage's ENV in order (``ENV K=V K2=V2`` and the old ``ENV K V``), values expanded."""
    env: dict[str, str] = {}
    for instruction in stage.all("ENV"):
        words = shlex.split(instruction.args)
        if "=" not in words[0]:
            env[words[0]] = substitute(" ".join(words[1:]), env)
            continue
        for word in words:
            name, _, value = word.partition("=")
            env[name] = substitute(value, env)
    return env


def exec_form(instruction: Instruction) -> list[str]:
    """The JSON array of ENTRYPOINT/CMD; the shell form is refused (it would wrap the command
    in /bin/sh -c, which does not forward SIGTERM)."""
    value = json.loads(instruction.args)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), instruction
    return value


# ---- what the rest of the repository says ----


@cache
def stages() -> list[Stage]:
    return parse_dockerfile(DOCKERFILE.read_text())


def final_stage() -> Stage:
    return stages()[-1]


@cache
def pyproject() -> dict[str, Any]:
    tomllib = pytest.importorskip("tomllib", reason="reading pyproject.toml needs Python 3.11+")
    return tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())


def pinned_torch(text: str, where: str) -> str:
    """The single torch==X pin in a file's pip install commands."""
    pins = set(re.findall(r"pip install[^\n]*?\btorch==([0-9][\w.+]*)", text))
    assert len(pins) == 1, f"{where}: expected one torch==X pin, found {sorted(pins)}"
    return pins.pop()


def readme_install_spec() -> str:
    """The project spec of the README's quickstart install, e.g. "." or ".[extra]"."""
    readme = (REPO_ROOT / "README.md").read_text()
    match = re.search(r"pip install torch==\S+ -e (\S+) && rsdino train", readme)
    assert match, "README.md: the quickstart install `pip install torch==X -e SPEC` is missing"
    return match[1].strip("'\"")


def pip_installs(stage: Stage) -> list[list[str]]:
    """The argument lists of every `pip install` in the stage's RUN commands."""
    installs: list[list[str]] = []
    variables = arg_defaults(stage.instructions)
    for run in stage.all("RUN"):
        for command in re.split(r"&&|;|\|\|", run.args):
            words = shlex.split(substitute(command, variables))
            if words[:2] == ["pip", "install"] or words[1:4] == ["-m", "pip", "install"]:
                installs.append(words[words.index("install") + 1 :])
    return installs


def positional(words: list[str]) -> list[str]:
    """The requirement specs of a pip command line (its options and their values dropped)."""
    with_value = {"--index-url", "-i", "--extra-index-url", "-c", "-r", "--constraint"}
    specs: list[str] = []
    skip = False
    for word in words:
        if skip:
            skip = False
        elif word in with_value:
            skip = True
        elif not word.startswith("-"):
            specs.append(word)
    return specs


def split_extras(spec: str) -> tuple[str, frozenset[str]]:
    path, _, extras = spec.partition("[")
    return path, frozenset(e.strip() for e in extras.rstrip("]").split(",") if e.strip())


@cache
def rendered_worker() -> tuple[dict[str, Any], dict[str, Any]]:
    """The chart's worker pod spec and its `pytorch` container, for the CPU test values."""
    job = find_one(render_chart(CPU_TEST_VALUES), "PyTorchJob")
    pod = job["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]
    return pod, worker_container(job)


# ---- the parser itself ----


def test_parser_joins_continuations_and_drops_comments() -> None:
    text = (
        "# syntax=docker/dockerfile:1\n"
        "ARG BASE=img:1.2.3\n"
        "FROM ${BASE} AS build\n"
        "RUN a \\\n"
        "    # a comment inside the continuation\n"
        "    && b\n"
        'ENV A=1 \\\n    B="x y" \\\n    C=$A/c\n'
        "FROM $BASE\n"
        'ENTRYPOINT ["tool"]\n'
    )
    first, last = parse_dockerfile(text)
    assert (first.base, first.name, last.base, last.name) == (
        "img:1.2.3",
        "build",
        "img:1.2.3",
        None,
    )
    assert first.all("RUN") == [Instruction("RUN", "a && b", 4)]
    assert env_of(first) == {"A": "1", "B": "x y", "C": "1/c"}
    assert exec_form(last.all("ENTRYPOINT")[0]) == ["tool"]


# ---- the image ----


def test_every_base_image_is_pinned_to_a_version() -> None:
    names = {s.name for s in stages() if s.name}
    bases = [s.base for s in stages() if s.base not in names]
    assert bases, "no FROM image"
    for base in bases:
        image, _, digest = base.partition("@")
        assert not digest or re.fullmatch(r"sha256:[0-9a-f]{64}", digest), base
        repository, sep, tag = image.rpartition(":")
        assert sep and "/" not in tag, f"{base}: no tag (that means :latest)"
        assert tag != "latest" and re.match(r"\d+\.\d+\.\d+-", tag), (
            f"{base}: the tag must name an exact version (e.g. 13.0.2-base-ubuntu24.04)"
        )
        assert repository == "nvidia/cuda", f"{base}: the trainer runs on an NVIDIA CUDA base"


def test_runtime_stage_reuses_the_build_stage_environment() -> None:
    """The venv is built in one stage and copied into the next: both must be the same base
    image, or the venv's interpreter links would point at another Python."""
    copies = [c.args.split() for c in final_stage().all("COPY") if c.args.startswith("--from=")]
    sources = {words[0].removeprefix("--from=") for words in copies}
    assert sources, "the runtime stage copies nothing from a build stage"
    for source in sources:
        stage = next(s for s in stages() if s.name == source)
        assert stage.base == final_stage().base


def test_final_user_is_numeric_non_root_and_the_one_the_chart_runs_as() -> None:
    users = final_stage().all("USER")
    assert users, "the final stage has no USER: the image would run as root"
    user = users[-1].args
    assert re.fullmatch(r"[1-9]\d*(:[1-9]\d*)?", user), (
        f"USER {user}: must be a numeric non-zero uid[:gid] so runAsNonRoot can verify it"
    )
    uid, _, gid = user.partition(":")
    creates = " ".join(r.args for r in final_stage().all("RUN"))
    assert f"--uid {uid}" in creates and f"--gid {gid or uid}" in creates, (
        "the USER's uid/gid is not the one the image creates"
    )
    pod, _ = rendered_worker()
    security = pod["securityContext"]
    assert security["runAsNonRoot"] is True
    assert (str(security["runAsUser"]), str(security["runAsGroup"])) == (uid, gid or uid)


def test_entrypoint_and_console_scripts() -> None:
    entrypoints = final_stage().all("ENTRYPOINT")
    assert entrypoints, "no ENTRYPOINT"
    entrypoint = exec_form(entrypoints[-1])
    scripts = pyproject()["project"]["scripts"]
    assert {"rsdino", "rsdino-torchrun"} <= set(scripts), (
        f"pyproject [project.scripts] must define rsdino and rsdino-torchrun, has {sorted(scripts)}"
    )
    assert entrypoint[0] in scripts
    cmds = final_stage().all("CMD")
    assert cmds and exec_form(cmds[-1]), "no CMD in exec form"
    # The chart replaces the entrypoint with a console script, which must be on the image's PATH.
    _, container = rendered_worker()
    assert container["command"][0] in scripts
    venv = env_of(final_stage())["VIRTUAL_ENV"]
    assert f"{venv}/bin" in env_of(final_stage())["PATH"].split(":")


def test_install_steps_match_the_readme_and_the_ci_torch_pin() -> None:
    readme_pin = pinned_torch((REPO_ROOT / "README.md").read_text(), "README.md")
    ci_pin = pinned_torch((REPO_ROOT / ".ci" / "run").read_text(), ".ci/run")
    assert readme_pin == ci_pin
    build = next(s for s in stages() if s.all("RUN") and pip_installs(s))
    installs = pip_installs(build)
    torch_specs = [spec for words in installs for spec in positional(words) if "torch" in spec]
    # The image takes a CUDA build of the same release: 2.13.0 matches 2.13.0+cu130 too.
    assert torch_specs == [f"torch=={ci_pin.split('+')[0]}"], torch_specs
    project = [spec for words in installs for spec in positional(words) if "torch" not in spec]
    assert len(project) == 1, f"expected one install of the package, found {project}"
    path, extras = split_extras(project[0])
    readme_path, readme_extras = split_extras(readme_install_spec())
    assert extras == readme_extras, "the image installs other extras than the README"
    assert not any("-e" in words or "--editable" in words for words in installs), (
        "the image must not install editable (read-only root filesystem, no source tree)"
    )
    # The README installs the checkout (".") and the image the directory it copied it to.
    destinations = {PurePosixPath(c.args.split()[-1]) for c in build.all("COPY")}
    assert readme_path == "." and PurePosixPath(path) in destinations, (path, destinations)
    assert torch_index_is_pip_default_or_an_arg(build)


def torch_index_is_pip_default_or_an_arg(stage: Stage) -> bool:
    """The wheel index is a build ARG (default: pip's own), never a host baked into a RUN."""
    runs = " ".join(r.args for r in stage.all("RUN"))
    hosts = set(re.findall(r"https?://([^/\s\"']+)", runs))
    defaults = arg_defaults(stage.instructions)
    index = defaults.get("TORCH_INDEX_URL", "")
    return not hosts and (index == "" or index.startswith("https://pypi.org/simple"))


def test_the_build_context_holds_what_the_package_build_needs() -> None:
    """pyproject.toml, its readme and its package root are copied into the build stage."""
    build = next(s for s in stages() if pip_installs(s))
    copied = {word for c in build.all("COPY") for word in c.args.split()[:-1]}
    project = pyproject()
    needed = {"pyproject.toml", project["project"]["readme"]}
    needed |= set(project["tool"]["setuptools"]["packages"]["find"]["where"])
    assert needed <= copied, f"not copied: {sorted(needed - copied)}"


def test_runtime_environment_suits_a_read_only_root_filesystem() -> None:
    env = env_of(final_stage())
    assert env.get("PYTHONDONTWRITEBYTECODE") == "1"
    assert env.get("PIP_NO_CACHE_DIR") in {"1", "off", "false"}
    assert env["HOME"] == "/home/rsdino"
    assert "--home-dir /home/rsdino" in " ".join(r.args for r in final_stage().all("RUN"))
    for name in ("XDG_CACHE_HOME", "TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR", "TORCH_HOME"):
        assert PurePosixPath(env[name]).is_relative_to(env["HOME"]), name
    assert final_stage().all("WORKDIR")[-1].args == "/workspace"


def test_writable_paths_are_the_charts_emptydirs() -> None:
    """HOME, every cache and the working directory must lie on a volume the chart mounts
    writable, and a variable both set must agree, or the read-only root filesystem breaks."""
    pod, container = rendered_worker()
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    empty_dirs = {v["name"] for v in pod["volumes"] if "emptyDir" in v}
    writable = [
        PurePosixPath(m["mountPath"])
        for m in container["volumeMounts"]
        if m["name"] in empty_dirs and not m.get("readOnly")
    ]
    env = env_of(final_stage())
    paths = {
        name: value
        for name, value in env.items()
        if value.startswith("/") and re.search(r"HOME$|_CACHE_DIR$|^XDG_", name)
    }
    assert {"HOME", "XDG_CACHE_HOME", "TORCHINDUCTOR_CACHE_DIR"} <= set(paths)
    paths["WORKDIR"] = final_stage().all("WORKDIR")[-1].args
    paths["TMPDIR"] = "/tmp"
    for name, path in paths.items():
        assert any(PurePosixPath(path).is_relative_to(m) for m in writable), (
            f"{name}={path} is on the read-only root filesystem (emptyDirs: {writable})"
        )
    chart_env = {e["name"]: e["value"] for e in container["env"] if "value" in e}
    for name in set(paths) & set(chart_env):
        assert chart_env[name] == paths[name], (
            f"{name}: image {paths[name]}, chart {chart_env[name]}"
        )


def test_image_version_matches_package_and_chart() -> None:
    """The chart's default image tag is its appVersion: the image built from this tree must
    carry the same version as the package inside it."""
    version = pyproject()["project"]["version"]
    defaults = arg_defaults(final_stage().instructions)
    assert defaults["VERSION"] == version
    labels = " ".join(label.args for label in final_stage().all("LABEL"))
    for key in ("title", "version", "licenses"):
        assert f"org.opencontainers.image.{key}=" in labels, key
    chart = (CHART_DIR / "Chart.yaml").read_text()
    assert re.search(rf'^appVersion:\s*"?{re.escape(version)}"?\s*$', chart, re.M)


def test_no_secrets_in_the_image() -> None:
    names = [
        word.partition("=")[0]
        for s in stages()
        for ins in s.instructions
        if ins.keyword in {"ARG", "ENV"}
        for word in shlex.split(ins.args)
    ]
    secret = re.compile(r"SECRET|PASSWORD|TOKEN|ACCESS_KEY|CREDENTIAL", re.I)
    assert not [n for n in names if secret.search(n)]


# ---- .dockerignore ----


def ignore_patterns() -> list[tuple[bool, re.Pattern[str]]]:
    """(is_exception, regex) per line, with Docker's rules: paths relative to the context, `*`
    and `?` within one path element, `**` across any number of them, `!` re-includes."""
    patterns: list[tuple[bool, re.Pattern[str]]] = []
    for raw in DOCKERIGNORE.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        exception = line.startswith("!")
        glob = str(PurePosixPath(line.lstrip("!").strip())).lstrip("/")
        regex = ""
        i = 0
        while i < len(glob):
            if glob.startswith("**/", i):
                regex, i = regex + "(?:.*/)?", i + 3
            elif glob.startswith("**", i):
                regex, i = regex + ".*", i + 2
            elif glob[i] == "*":
                regex, i = regex + "[^/]*", i + 1
            elif glob[i] == "?":
                regex, i = regex + "[^/]", i + 1
            elif glob[i] == "[":
                end = glob.index("]", i)
                regex, i = regex + glob[i : end + 1], end + 1
            else:
                regex, i = regex + re.escape(glob[i]), i + 1
        patterns.append((exception, re.compile(regex + r"\Z")))
    return patterns


def is_ignored(path: str) -> bool:
    """Whether Docker leaves ``path`` out of the build context: the last pattern that matches
    the path or one of its parent directories decides."""
    parts = PurePosixPath(path).parts
    candidates = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    ignored = False
    for exception, pattern in ignore_patterns():
        if any(pattern.match(c) for c in candidates):
            ignored = not exception
    return ignored


@pytest.mark.parametrize(
    "path",
    [
        ".git/HEAD",
        ".git/objects/ab/cdef",
        "runs/quickstart/checkpoints/step_00000200/.metadata",
        "outputs/eval/knn.json",
        "trainer/runs/x/train_log.jsonl",
        "trainer/rsdino/__pycache__/cli.cpython-312.pyc",
        "trainer/rsdino.egg-info/PKG-INFO",
        ".venv/bin/python",
        ".pytest_cache/v/cache/nodeids",
        ".env",
        "tests/test_train.py",
        "benchmarks/results/h200/report.json",
    ],
)
def test_dockerignore_excludes(path: str) -> None:
    assert is_ignored(path)


def test_dockerignore_keeps_every_file_the_image_copies() -> None:
    build = next(s for s in stages() if pip_installs(s))
    sources = [word for c in build.all("COPY") for word in c.args.split()[:-1]]
    files = []
    for source in sources:
        path = REPO_ROOT / source
        if path.is_dir():
            # The package's modules and data files (not build leftovers such as *.egg-info).
            files += [p for p in path.rglob("*") if p.suffix in {".py", ".yaml"}]
        else:
            files.append(path)
    assert any(p.suffix == ".yaml" for p in files), "the package's config files are not copied"
    ignored = [
        str(p.relative_to(REPO_ROOT)) for p in files if is_ignored(str(p.relative_to(REPO_ROOT)))
    ]
    assert not ignored, f".dockerignore drops files the build needs: {ignored[:5]}"
