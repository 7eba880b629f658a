"""The shape of the code, checked the way a reviewer would: import-linter's contracts (.importlinter) hold and refuse
a violation, every Prefect task lives in tasks/, flows stay short and return typed results, and importing a flow
or task module reads no config or data file."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

from charforge.settings import REPO_ROOT

LINT_IMPORTS = str(Path(sys.executable).parent / "lint-imports")
PACKAGES = ("cli", "flows", "tasks", "serving", "charforge")
CONTRACTS = ("Layers: the command line > flows > Prefect tasks > serving runtime > library",
             "The library and the serving runtime do not import Prefect",
             "Flows import no HTTP, MLflow, locking, registry or tracking code themselves")


def lint_imports(root: Path) -> subprocess.CompletedProcess:
    return subprocess.run([LINT_IMPORTS, "--no-cache"], cwd=root, capture_output=True, text=True, timeout=300,
                          env={"PYTHONPATH": str(root), "PATH": str(Path(sys.executable).parent)})


def test_import_contracts_hold_and_have_no_escape_hatches():
    settings = [line.split("=")[0].strip() for line in (REPO_ROOT / ".importlinter").read_text().splitlines()
                if not line.startswith("#")]
    assert "ignore_imports" not in settings
    result = lint_imports(REPO_ROOT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert "Contracts: 3 kept, 0 broken." in result.stdout


def test_import_contracts_refuse_a_violation_of_each(tmp_path):
    """A copy of the code with one violation per contract: the library reaching up to the command line, the library
    importing Prefect, a flow taking a file lock itself. lint-imports must fail and name all three."""
    for package in PACKAGES:
        shutil.copytree(REPO_ROOT / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO_ROOT / ".importlinter", tmp_path)
    with open(tmp_path / "charforge" / "http.py", "a") as f:
        f.write("\n\ndef _reach_up():\n    from cli import main  # noqa\n")
    with open(tmp_path / "charforge" / "io.py", "a") as f:
        f.write("\nimport prefect  # noqa\n")
    with open(tmp_path / "flows" / "curate.py", "a") as f:
        f.write("\nimport fcntl  # noqa\n")
    result = lint_imports(tmp_path)
    assert result.returncode == 1
    assert "Contracts: 0 kept, 3 broken." in result.stdout
    assert "charforge.http -> cli.main" in result.stdout
    assert "charforge.io -> prefect" in result.stdout and "flows.curate -> fcntl" in result.stdout


def functions(package: str):
    for path in sorted((REPO_ROOT / package).rglob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                yield path.relative_to(REPO_ROOT), node


def decorator_names(node) -> set[str]:
    names = set()
    for d in node.decorator_list:
        target = d.func if isinstance(d, ast.Call) else d
        names.add(target.attr if isinstance(target, ast.Attribute) else getattr(target, "id", ""))
    return names


def test_every_prefect_task_is_in_tasks_and_flows_are_short():
    tasks_elsewhere = [f"{path}:{node.name}" for package in ("cli", "flows", "serving", "charforge")
                       for path, node in functions(package) if "task" in decorator_names(node)]
    assert tasks_elsewhere == []
    assert sum("task" in decorator_names(node) for _, node in functions("tasks")) >= 40
    long = {f"{path}:{node.name}": node.end_lineno - node.lineno + 1 for path, node in functions("flows")
            if node.end_lineno - node.lineno + 1 > 60}
    assert long == {}


def untyped(annotation: str) -> bool:
    """`dict`, `dict[str, Any]`, `dict[str, object]`: a record read by string keys, not a typed map."""
    return annotation in ("dict", "Dict") or any(f"{w}]" in annotation or f"{w}," in annotation
                                                 for w in ("Any", "object"))


def test_no_flow_or_task_returns_a_bare_dict():
    """Stages hand each other typed results (charforge/results.py), never dicts read by string keys; a map of
    plain values (`dict[str, str]` of MLflow tags) is typed."""
    assert untyped("dict") and untyped("dict[str, Any]") and not untyped("dict[str, float]")
    bare = [f"{path}:{node.name} -> {ast.unparse(node.returns)}" for package in ("flows", "tasks")
            for path, node in functions(package) if node.returns is not None and untyped(ast.unparse(node.returns))]
    assert bare == []
    missing = [f"{path}:{node.name}" for package in ("flows", "tasks") for path, node in functions(package)
               if node.returns is None and not node.name.startswith("_")]
    assert missing == []  # every flow and task says what it returns


AUDIT = """
import sys
configs = {configs!r}
opened = []
sys.addaudithook(lambda event, args: opened.append(str(args[0])) if event == "open" and isinstance(args[0], str)
                 and any(args[0].startswith(c) for c in configs) else None)
import importlib, pkgutil
for package in ("flows", "tasks"):
    for info in pkgutil.iter_modules([{root!r} + "/" + package]):
        importlib.import_module(package + "." + info.name)
print(opened)
"""


def test_importing_flows_and_tasks_reads_no_config_or_data_file():
    """A broken stage config must not break `import flows.retrain` (it did: the retrain flow loaded six YAML files
    at import). Python's audit hook sees every file opened while each flow and task module is imported."""
    watched = [str(REPO_ROOT / "configs"), str(REPO_ROOT / "data"), str(REPO_ROOT / "prefect.yaml")]
    code = AUDIT.format(configs=watched, root=str(REPO_ROOT))
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=REPO_ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == "[]"


def test_stage_results_survive_prefects_result_serializers():
    """Prefect stores flow and task results with its JSON or pickle serializer; a typed result comes back equal."""
    from prefect.serializers import JSONSerializer, PickleSerializer

    from charforge.results import Evaluation, MetricSummary, Parity, RegisteredVersion, Rollout

    evaluation = Evaluation(
        mlflow_run_id="run", run_dir="/evals/x", report="/evals/x/report.md", chart="/evals/x/per_character.png",
        summaries={"candidate": {"character_mc": {"acc": MetricSummary(value=0.5, ci_low=0.1, ci_high=0.9, n=4,
                                                                        per_character={"nell_bramwick": 1.0})}}},
        targets={"candidate": "candidate-abc"}, primary="candidate",
        parity=Parity(prompts=1, tokens=2, template_source="t", first_token_agreement=1.0, prefix_agreement=1.0),
        serving={"load_s": 1.0}, registered=RegisteredVersion(name="charforge-x", version=3, uri="models:/charforge-x/3"))
    rollout = Rollout(served="charforge-x-v3", status="rolled_back", previous={"nell_bramwick": {"charforge-x-v2": 100}},
                      reason="error rate 5.0% > 1.0%")
    for serializer in (JSONSerializer(), PickleSerializer()):
        for result in (evaluation, rollout):
            assert serializer.loads(serializer.dumps(result)) == result
    assert evaluation.registered.version == "3"  # MLflow hands out int versions; results keep strings
