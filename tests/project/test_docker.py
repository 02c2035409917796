"""The Dockerfiles, checked without a Docker engine: a small parser of instructions (with line
continuations), pinned base images, a non-root user before the entry point, and every package the
images pip-install by name agreeing with pyproject.toml (the extras they install must exist)."""
import shlex
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[2]
DOCKERFILES = [REPO / "docker" / "Dockerfile.cpu", REPO / "docker" / "Dockerfile.gpu"]
KNOWN = {"FROM", "RUN", "CMD", "LABEL", "EXPOSE", "ENV", "ADD", "COPY", "ENTRYPOINT", "VOLUME",
         "USER", "WORKDIR", "ARG", "ONBUILD", "STOPSIGNAL", "HEALTHCHECK", "SHELL", "MAINTAINER"}
# pip options that take a value (the value is not a requirement)
PIP_VALUE_OPTS = {"--index-url", "-i", "--extra-index-url", "-c", "--constraint", "-r",
                  "--requirement", "-f", "--find-links", "--target", "-t", "--prefix", "--root"}


def parse_dockerfile(path: Path) -> list[tuple[int, str, str]]:
    """(line number, INSTRUCTION, arguments) for each instruction; backslash continuations are
    joined, comments and blank lines (also inside a continued instruction) are dropped."""
    out, buf, start = [], [], 0
    for no, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if not buf:
            start = no
        cont = line.endswith("\\")
        buf.append(line[:-1].strip() if cont else line)
        if not cont:
            text = " ".join(buf)
            word, _, args = text.partition(" ")
            out.append((start, word.upper(), args.strip()))
            buf = []
    assert not buf, f"{path}: the last instruction ends with a line continuation"
    return out


def pip_installs(args: str) -> list[str]:
    """The requirement arguments of every `pip install` in a RUN line."""
    reqs = []
    for part in args.replace("&&", ";").replace("||", ";").split(";"):
        words = shlex.split(part)
        for i in range(len(words) - 1):
            if words[i].endswith("pip") or words[i] == "pip3":
                if words[i + 1] != "install":
                    continue
                skip = False
                for w in words[i + 2:]:
                    if skip:
                        skip = False
                    elif w in PIP_VALUE_OPTS:
                        skip = True
                    elif not w.startswith("-"):
                        reqs.append(w)
    return reqs


def pyproject():
    with open(REPO / "pyproject.toml", "rb") as f:
        return tomllib.load(f)["project"]


@pytest.fixture(scope="module", params=DOCKERFILES, ids=lambda p: p.name)
def dockerfile(request):
    return request.param, parse_dockerfile(request.param)


def test_parser_joins_continuations(tmp_path):
    p = tmp_path / "Dockerfile"
    p.write_text("FROM a:1.0\n# c\nRUN x \\\n    # inside\n    && y\nuser  psa\n")
    assert parse_dockerfile(p) == [(1, "FROM", "a:1.0"), (3, "RUN", "x && y"), (6, "USER", "psa")]
    assert pip_installs("pip install -q torch==1 --index-url https://x && pip install '.[a,b]'") \
        == ["torch==1", ".[a,b]"]


def test_every_instruction_is_known(dockerfile):
    path, ins = dockerfile
    for no, word, _ in ins:
        assert word in KNOWN, f"{path}:{no}: unknown instruction {word}"


def test_base_images_are_pinned_to_a_version_tag(dockerfile):
    path, ins = dockerfile
    froms = [(no, args.split()[0]) for no, word, args in ins if word == "FROM"]
    assert froms, f"{path}: no FROM"
    for no, image in froms:
        name, _, tag = image.rpartition(":") if ":" in image.split("/")[-1] else (image, "", "")
        assert tag, f"{path}:{no}: FROM {image} has no tag"
        assert tag != "latest", f"{path}:{no}: FROM {image} uses 'latest'"
        assert any(c.isdigit() for c in tag.split("-")[0]) and "." in tag, \
            f"{path}:{no}: FROM {image}: tag {tag!r} is not an exact version"


def test_runs_as_a_non_root_user_with_psa_dist_entrypoint(dockerfile):
    path, ins = dockerfile
    words = [w for _, w, _ in ins]
    assert "ENTRYPOINT" in words, f"{path}: no ENTRYPOINT"
    entry = words.index("ENTRYPOINT")
    users = [args for _, w, args in ins[:entry] if w == "USER"]
    assert users, f"{path}: no USER before ENTRYPOINT (the container would run as root)"
    assert users[-1].split(":")[0] not in ("root", "0"), f"{path}: USER {users[-1]}"
    assert not [a for _, w, a in ins[entry:] if w == "USER"], f"{path}: USER after ENTRYPOINT"
    args = ins[entry][2]
    assert args.startswith("[") and shlex.split(args.strip("[]").replace(",", " "))[0] == "psa-dist", \
        f"{path}: ENTRYPOINT {args} (expected the exec form [\"psa-dist\"])"


def test_pip_installs_agree_with_pyproject(dockerfile):
    path, ins = dockerfile
    proj = pyproject()
    deps = {canonicalize_name(Requirement(d).name): Requirement(d) for d in proj["dependencies"]}
    extras = set(proj.get("optional-dependencies", {}))
    reqs = [r for _, w, a in ins if w == "RUN" for r in pip_installs(a)]
    assert reqs, f"{path}: installs nothing with pip"
    named = [r for r in reqs if not r.startswith((".", "/"))]
    local = [r for r in reqs if r.startswith((".", "/"))]
    assert local, f"{path}: does not install the package itself"
    for r in local:
        if "[" in r:
            wanted = set(r.split("[", 1)[1].rstrip("]").split(","))
            assert wanted <= extras, f"{path}: installs extras {sorted(wanted - extras)} that " \
                                     f"pyproject.toml does not define (has {sorted(extras)})"
    for r in named:
        req = Requirement(r)
        pins = [s.version for s in req.specifier if s.operator == "=="]
        assert pins, f"{path}: pip install {r} is not pinned with =="
        dep = deps.get(canonicalize_name(req.name))
        assert dep is not None, f"{path}: installs {req.name}, which pyproject.toml does not list"
        assert dep.specifier.contains(pins[0], prereleases=True), \
            f"{path}: {r} does not satisfy pyproject.toml's {dep}"


def test_torch_pins_match_between_images():
    pins = [{Requirement(r).name: str(Requirement(r).specifier) for _, w, a in parse_dockerfile(p)
             if w == "RUN" for r in pip_installs(a) if not r.startswith(".")} for p in DOCKERFILES]
    assert pins[0] == pins[1] == {"torch": "==2.14.1", "torchvision": "==0.29.1"}
