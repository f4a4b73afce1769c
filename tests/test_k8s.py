"""Offline checks of the Kubernetes manifests in k8s/.

Every YAML document in k8s/*.yaml is parsed. Each KubeRay RayJob, wherever it
sits (a file of its own, or the ConfigMap the nightly launcher reads), is
validated against KubeRay's strict RayJob schema twice: by the check-jsonschema
command, as a person would run it, and by the jsonschema library, whose errors
name the field at fault. The schema is not part of this repository: it is read
from ../shared/schemas/kuberay/ beside the checkout, and the tests that need it
skip where it is absent.

No cluster is involved, so what only the API server or the KubeRay operator
would catch is not covered, except the few operator rules restated in
test_rayjob_required_fields.
"""

from __future__ import annotations

import copy
import datetime
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from packaging.requirements import Requirement

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10 has no TOML reader; the test that needs one skips there
    tomllib = None

REPO = Path(__file__).resolve().parents[1]
K8S = REPO / "k8s"
SCHEMA_DIR = REPO.parent / "shared" / "schemas" / "kuberay"
STRICT_SCHEMA = SCHEMA_DIR / "rayjob_v1-strict.json"
# The venv's own command, beside its python; sys.executable is not resolved, as a
# venv's python is a symlink to the base interpreter.
CHECK_JSONSCHEMA = Path(sys.executable).parent / "check-jsonschema"

PLACEHOLDER = "EDIT_ME"
# KubeRay names the Ray cluster after the RayJob plus 6 characters and keeps
# cluster names to 53, so a RayJob name may have 47 (MaxRayJobNameLength).
MAX_RAYJOB_NAME = 47
DNS_1035_LABEL = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")
NIGHTLY_SUFFIX = "-YYYYMMDD"  # what the launcher appends to metadata.name
# The schema leaves submissionMode a free string; these are the modes KubeRay
# runs on its own. InteractiveMode waits for a person to submit the job.
UNATTENDED_MODES = {"K8sJobMode", "HTTPMode", "SidecarMode"}


@dataclass(frozen=True)
class Doc:
    """One YAML document and where it came from, for messages."""

    where: str
    body: dict[str, Any]
    # The file, when this document is the only one in it (check-jsonschema reads
    # one document per file).
    alone_in: Path | None
    # The YAML text holding this document alone, comments included, if any.
    text: str | None


def _docs_in(path: Path, where: str) -> list[Doc]:
    text = path.read_text()
    bodies = [b for b in yaml.safe_load_all(text) if b is not None]
    for body in bodies:
        assert isinstance(body, dict), f"{where}: a document is not a mapping"
    if len(bodies) == 1:
        return [Doc(f"{where} #1", bodies[0], path, text)]
    return [Doc(f"{where} #{i + 1}", b, None, None) for i, b in enumerate(bodies)]


def manifest_docs() -> list[Doc]:
    """Every document of every k8s/*.yaml file."""
    files = sorted([*K8S.glob("*.yaml"), *K8S.glob("*.yml")])
    return [d for f in files for d in _docs_in(f, f"k8s/{f.name}")]


def _kind(doc: Doc) -> str | None:
    return doc.body.get("kind")


def _embedded_docs(doc: Doc) -> list[Doc]:
    """Documents a ConfigMap carries, literally or from a kustomize generator."""
    found = []
    if _kind(doc) == "ConfigMap":
        name = doc.body["metadata"]["name"]
        for key, text in (doc.body.get("data") or {}).items():
            bodies = [b for b in yaml.safe_load_all(text) if isinstance(b, dict)]
            alone = text if len(bodies) == 1 else None
            for i, body in enumerate(bodies):
                where = f"ConfigMap {name}, key {key} #{i + 1}"
                found.append(Doc(where, body, None, alone))
    if _kind(doc) == "Kustomization":
        for generator in doc.body.get("configMapGenerator") or []:
            for entry in generator.get("files") or []:
                key, _, source = entry.rpartition("=")
                where = f"ConfigMap {generator['name']}, key {key or source}"
                found += _docs_in(K8S / source, f"{where} (from k8s/{source})")
    return found


def rayjobs() -> list[Doc]:
    """Every RayJob in k8s/, including those a ConfigMap carries."""
    docs = manifest_docs()
    found = [d for d in docs if _kind(d) == "RayJob"]
    found += [e for d in docs for e in _embedded_docs(d) if _kind(e) == "RayJob"]
    return found


def _one(kind: str) -> Doc:
    docs = [d for d in manifest_docs() if _kind(d) == kind]
    assert len(docs) == 1, f"expected one {kind} in k8s/, found {len(docs)}"
    return docs[0]


def _strict_schema() -> dict[str, Any]:
    if not STRICT_SCHEMA.is_file():
        pytest.skip(
            f"no KubeRay RayJob schema at {STRICT_SCHEMA}: it comes from the "
            "shared/ folder beside the repository checkout, absent here"
        )
    return json.loads(STRICT_SCHEMA.read_text())


def _schema_errors(schema: dict[str, Any], body: dict[str, Any]) -> list[str]:
    validator = jsonschema.Draft7Validator(schema)
    errors = sorted(validator.iter_errors(body), key=lambda e: e.json_path)
    return [
        f"{'.'.join(str(p) for p in e.absolute_path) or '(top)'}: {e.message}"
        for e in errors
    ]


def _run_check_jsonschema(files: list[Path]) -> subprocess.CompletedProcess[str]:
    if not CHECK_JSONSCHEMA.is_file():
        pytest.fail(
            f"{CHECK_JSONSCHEMA} is missing: install the dev extra "
            "(make install) to get check-jsonschema"
        )
    command = [CHECK_JSONSCHEMA, "--schemafile", STRICT_SCHEMA, *files]
    return subprocess.run(
        [str(word) for word in command],
        capture_output=True,
        text=True,
        timeout=120,
    )


def _files_for_cli(docs: list[Doc], tmp_path: Path) -> list[Path]:
    """What to hand check-jsonschema: the manifest's own file where it is alone
    in it, otherwise a JSON copy of the document."""
    files = []
    for i, doc in enumerate(docs):
        if doc.alone_in is not None:
            files.append(doc.alone_in)
        else:
            copy_path = tmp_path / f"embedded-{i}.json"
            copy_path.write_text(json.dumps(doc.body))
            files.append(copy_path)
    return files


def _pod_specs(rayjob: dict[str, Any]) -> dict[str, dict[str, Any]]:
    cluster = rayjob["spec"]["rayClusterSpec"]
    specs = {"head": cluster["headGroupSpec"]["template"]["spec"]}
    for group in cluster.get("workerGroupSpecs") or []:
        specs[f"worker group {group['groupName']}"] = group["template"]["spec"]
    return specs


def _gpus(pod_spec: dict[str, Any]) -> int:
    return sum(
        int((c.get("resources") or {}).get("limits", {}).get("nvidia.com/gpu", 0))
        for c in pod_spec["containers"]
    )


# -- Schema validation


def test_k8s_holds_rayjobs_including_the_launchers_copy():
    where = [d.where for d in rayjobs()]
    assert where, "no RayJob found in k8s/"
    assert any(w.startswith("ConfigMap ") for w in where), (
        f"no RayJob inside a ConfigMap, so the nightly launcher has none: {where}"
    )


def test_rayjobs_pass_strict_schema_with_check_jsonschema(tmp_path):
    _strict_schema()
    docs = rayjobs()
    result = _run_check_jsonschema(_files_for_cli(docs, tmp_path))
    assert result.returncode == 0, (
        f"check-jsonschema rejected {[d.where for d in docs]}:\n"
        f"{result.stdout}{result.stderr}"
    )


@pytest.mark.parametrize("doc", rayjobs(), ids=lambda d: d.where)
def test_rayjob_passes_strict_schema_with_jsonschema(doc):
    errors = _schema_errors(_strict_schema(), doc.body)
    listing = "\n".join(errors)
    assert not errors, f"{doc.where} breaks the strict RayJob schema:\n{listing}"


def _misspell(body: dict[str, Any], where: str) -> dict[str, Any]:
    """A copy of a RayJob with one field name misspelt at `where`."""
    broken = copy.deepcopy(body)
    if where == "spec":
        node = broken["spec"]
        node["shutdownAfterJobFinish"] = node.pop("shutdownAfterJobFinishes")
    else:  # deep inside a worker's container
        group = broken["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]
        node = group["template"]["spec"]["containers"][0]
        node["resource"] = node.pop("resources")
    return broken


@pytest.mark.parametrize("where", ["spec", "worker container"])
def test_strict_schema_rejects_a_misspelt_field(where, tmp_path):
    schema = _strict_schema()
    original = next(d for d in rayjobs() if d.alone_in is not None)
    broken = _misspell(original.body, where)
    typo = "shutdownAfterJobFinish" if where == "spec" else "resource"

    errors = _schema_errors(schema, broken)
    assert any(f"'{typo}'" in e and "unexpected" in e for e in errors), errors

    broken_file = tmp_path / "misspelt.yaml"
    broken_file.write_text(yaml.safe_dump(broken))
    result = _run_check_jsonschema([broken_file])
    assert result.returncode != 0, result.stdout
    assert typo in result.stdout + result.stderr


# -- What the nightly run needs


@pytest.mark.parametrize("doc", rayjobs(), ids=lambda d: d.where)
def test_rayjob_required_fields(doc):
    spec = doc.body["spec"]
    assert spec.get("shutdownAfterJobFinishes") is True, "the cluster must end"
    ttl = spec.get("ttlSecondsAfterFinished")
    assert isinstance(ttl, int) and ttl >= 0, f"ttlSecondsAfterFinished: {ttl!r}"
    deadline = spec.get("activeDeadlineSeconds")
    assert isinstance(deadline, int) and deadline > 0, f"deadline: {deadline!r}"
    retries = spec.get("backoffLimit")
    assert isinstance(retries, int) and retries >= 0, f"backoffLimit: {retries!r}"
    mode = spec.get("submissionMode")
    assert mode in UNATTENDED_MODES, f"submissionMode {mode!r}"

    for role, pod in _pod_specs(doc.body).items():
        assert pod.get("serviceAccountName"), f"{role} has no serviceAccountName"
    assert _gpus(_pod_specs(doc.body)["head"]) == 0, "the head should hold no GPU"

    groups = spec["rayClusterSpec"].get("workerGroupSpecs") or []
    gpu_groups = [g for g in groups if _gpus(g["template"]["spec"]) >= 1]
    assert gpu_groups, "no worker group asks for nvidia.com/gpu in its limits"
    for g in groups:
        counts = (
            g["minReplicas"],
            g.get("replicas", g["minReplicas"]),
            g["maxReplicas"],
        )
        assert counts == tuple(sorted(counts)), f"{g['groupName']}: replicas"

    name = doc.body["metadata"]["name"]
    assert DNS_1035_LABEL.fullmatch(name), f"{name!r} is not a DNS-1035 label"
    assert len(name + NIGHTLY_SUFFIX) <= MAX_RAYJOB_NAME, f"{name!r} is too long"


@pytest.mark.parametrize("doc", rayjobs(), ids=lambda d: d.where)
def test_rayjob_entrypoint_runs_code_notes(doc):
    words = shlex.split(doc.body["spec"]["entrypoint"])
    assert words[:2] in (
        ["python", "jobs/code_notes.py"],
        ["python3", "jobs/code_notes.py"],
    )
    options = {w: words[i + 1] for i, w in enumerate(words[:-1]) if w[:2] == "--"}
    assert set(options) >= {"--config", "--input", "--output", "--model"}, words
    for flag in ("--input", "--output", "--model"):
        assert options[flag].startswith("s3://"), f"{flag} {options[flag]}"
    assert options["--config"].startswith("configs/"), options["--config"]


@pytest.mark.parametrize("doc", rayjobs(), ids=lambda d: d.where)
def test_rayjob_config_exists_in_repo(doc):
    if not (REPO / "configs" / "cluster.yaml").is_file():
        pytest.skip(
            "configs/cluster.yaml does not exist yet (it comes with jobs/ in issue "
            "4), so the RayJob's --config cannot be checked"
        )
    words = shlex.split(doc.body["spec"]["entrypoint"])
    config = words[words.index("--config") + 1]
    assert (REPO / config).is_file(), f"{doc.where}: no {config} in the repo"


def test_rayjob_matches_the_image_and_pyproject_ray():
    dockerfile = (K8S / "Dockerfile").read_text()
    image_ray = re.search(r"^ARG RAY_VERSION=(\S+)$", dockerfile, re.M)
    assert image_ray, "k8s/Dockerfile has no ARG RAY_VERSION=..."
    pins = [
        Requirement(r)
        for r in _pyproject()["project"]["dependencies"]
        if Requirement(r).name == "ray"
    ]
    for doc in rayjobs():
        version = doc.body["spec"]["rayClusterSpec"]["rayVersion"]
        assert version == image_ray.group(1), f"{doc.where}: image has other Ray"
        assert all(p.specifier.contains(version) for p in pins), (version, pins)


def _pyproject() -> dict[str, Any]:
    if tomllib is None:
        pytest.skip("reading pyproject.toml needs Python 3.11's tomllib")
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def test_pods_use_an_irsa_service_account_from_k8s():
    accounts = {
        d.body["metadata"]["name"]: d.body
        for d in manifest_docs()
        if _kind(d) == "ServiceAccount"
    }
    for doc in rayjobs():
        for role, pod in _pod_specs(doc.body).items():
            name = pod["serviceAccountName"]
            assert name in accounts, f"{doc.where}, {role}: no account {name}"
            annotations = accounts[name]["metadata"].get("annotations") or {}
            assert "eks.amazonaws.com/role-arn" in annotations, name


# -- The other manifests


OTHER_DOCS = [d for d in manifest_docs() if _kind(d) != "RayJob"]


@pytest.mark.parametrize("doc", OTHER_DOCS, ids=lambda d: d.where)
def test_other_manifests_have_basic_fields(doc):
    assert isinstance(doc.body.get("apiVersion"), str), "no apiVersion"
    assert isinstance(doc.body.get("kind"), str), "no kind"
    metadata = doc.body.get("metadata") or {}
    assert isinstance(metadata.get("name"), str), "no metadata.name"


def test_kustomization_covers_every_manifest():
    kustomization = _one("Kustomization").body
    listed = set(kustomization.get("resources") or [])
    for generator in kustomization.get("configMapGenerator") or []:
        listed |= {e.rpartition("=")[2] for e in generator.get("files") or []}
    on_disk = {f.name for f in K8S.glob("*.y*ml")} - {"kustomization.yaml"}
    assert listed == on_disk, "kubectl apply -k k8s/ would miss or lack a file"


def test_launcher_may_only_create_get_list_rayjobs():
    role = _one("Role").body
    (rule,) = role["rules"]
    assert rule["apiGroups"] == ["ray.io"] and rule["resources"] == ["rayjobs"]
    assert sorted(rule["verbs"]) == ["create", "get", "list"]
    binding = _one("RoleBinding").body
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    pod = _launcher_pod()
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": pod["serviceAccountName"]}
    ]


def _launcher_pod() -> dict[str, Any]:
    return _one("CronJob").body["spec"]["jobTemplate"]["spec"]["template"]["spec"]


def _launcher_rayjob() -> Doc:
    """The RayJob in the ConfigMap key that RAYJOB_MANIFEST points at."""
    pod = _launcher_pod()
    (container,) = pod["containers"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    manifest = Path(env["RAYJOB_MANIFEST"])
    mounts = container["volumeMounts"]
    (mount,) = [m for m in mounts if m["mountPath"] == str(manifest.parent)]
    (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    wanted = f"ConfigMap {volume['configMap']['name']}, key {manifest.name}"
    found = [d for d in rayjobs() if d.where.startswith(wanted)]
    assert len(found) == 1, f"the launcher reads {wanted}: {len(found)} RayJobs"
    return found[0]


def test_cronjob_launches_the_rayjob_of_its_configmap():
    assert _one("CronJob").body["spec"]["concurrencyPolicy"] == "Forbid"
    assert _launcher_rayjob().text is not None, "its RayJob should stand alone"


# -- The launcher's script

# kubectl is a stand-in here: these tests check the script's own decisions
# (refusing placeholders, naming tonight's run, waiting for an earlier run), not
# its calls to the API server.
FAKE_KUBECTL = """#!/bin/sh
printf '%s\n' "$*" >> "$FAKE_DIR/calls"
case "$1 $2" in
  "get rayjob") cat "$FAKE_DIR/tonight" 2>/dev/null; exit 0 ;;
  "get rayjobs") cat "$FAKE_DIR/runs" 2>/dev/null; exit 0 ;;
  "create -n") cat > "$FAKE_DIR/created.yaml"; exit 0 ;;
esac
echo "unexpected kubectl $*" >&2
exit 1
"""


def _launch(tmp_path: Path, manifest_text: str, **answers: str):
    """Run the CronJob's command with a fake kubectl; return (result, created)."""
    if shutil.which("sh") is None:
        pytest.skip("no POSIX shell here to run the launcher script")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    kubectl = bin_dir / "kubectl"
    kubectl.write_text(FAKE_KUBECTL)
    kubectl.chmod(0o755)
    for name, text in answers.items():
        (tmp_path / name).write_text(text)
    manifest = tmp_path / "rayjob.yaml"
    manifest.write_text(manifest_text)
    (container,) = _launcher_pod()["containers"]
    env = {
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "TMPDIR": str(tmp_path),
        "FAKE_DIR": str(tmp_path),
        "POD_NAMESPACE": "notecoder",
        "RAYJOB_MANIFEST": str(manifest),
    }
    result = subprocess.run(
        [*container["command"], *container["args"]],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    created = tmp_path / "created.yaml"
    if not created.exists():
        return result, None
    return result, yaml.safe_load(created.read_text())


def _shipped_rayjob() -> tuple[str, dict[str, Any]]:
    doc = _launcher_rayjob()
    assert doc.text is not None
    return doc.text, doc.body


def _filled(text: str) -> str:
    return text.replace(PLACEHOLDER, "filled")


def test_launcher_refuses_placeholders(tmp_path):
    text, _ = _shipped_rayjob()
    result, created = _launch(tmp_path, text)
    assert result.returncode != 0
    assert PLACEHOLDER in result.stderr
    assert created is None


def test_launcher_creates_tonights_rayjob(tmp_path):
    text, body = _shipped_rayjob()
    days = {datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d")}
    result, created = _launch(
        tmp_path, _filled(text), runs="old-1=Complete\nold-2=Failed\n"
    )
    days.add(datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d"))
    assert result.returncode == 0, result.stderr
    assert created["metadata"]["name"] in {f"notecoder-nightly-{d}" for d in days}
    expected = yaml.safe_load(_filled(text))
    assert created["spec"] == expected["spec"]
    assert created["metadata"]["labels"] == body["metadata"]["labels"]


@pytest.mark.parametrize(
    "answers",
    [
        {"runs": "notecoder-nightly-20990101=Running\n"},
        {"runs": "notecoder-nightly-20990101=\n"},  # created, not yet picked up
        {"tonight": "rayjob.ray.io/notecoder-nightly-today\n"},
    ],
    ids=["earlier run going", "earlier run new", "tonight exists"],
)
def test_launcher_starts_nothing_while_a_run_exists(tmp_path, answers):
    text, _ = _shipped_rayjob()
    result, created = _launch(tmp_path, _filled(text), **answers)
    assert result.returncode == 0, result.stderr
    assert created is None, result.stdout


# -- The README


def test_readme_names_only_files_that_exist():
    readme = (K8S / "README.md").read_text()
    named = set(re.findall(r"\bk8s/([A-Za-z][\w.-]*\w)", readme))
    assert named, "k8s/README.md names no file in k8s/"
    missing = sorted(n for n in named if not (K8S / n).exists())
    assert not missing, f"k8s/README.md names missing files: {missing}"
