"""The floors of the house: scripts on top and never imported by the library; the challenge layer (humdial/) above
the engine, which imports none of it; tools/ only for scripts and benchmarks; no import circle. And the task table
is the one home of the challenge's tasks: the prompt files, the judge prompts and the package names follow it."""
import ast
import json
from pathlib import Path

import pytest

from humdial.tasks import HUMAN_RATED, LANGUAGES, TASKS, package_file_name, task_from_name

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = {"train", "evaluate", "convert", "cli_inference", "web_demo"}
ENGINE = ["config.py", "utils.py", "metrics.py", "prompting.py", "dataset_v1.py", "inference.py", "runner.py",
          *(str(p.relative_to(ROOT)) for p in sorted((ROOT / "models").glob("*.py")))]
LIBRARY = ENGINE + [str(p.relative_to(ROOT)) for p in sorted((ROOT / "humdial").glob("*.py"))]


def module_name(path: str) -> str:
    return path.removesuffix(".py").removesuffix("/__init__").replace("/", ".")


def imported_modules(path: str) -> set[str]:
    """Every module a file imports (top level or inside functions), as dotted names."""
    tree = ast.parse((ROOT / path).read_text(encoding="utf-8"))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def first_party(path: str) -> set[str]:
    """The repo's own modules a file imports."""
    ours = {module_name(p) for p in LIBRARY} | SCRIPTS | {"tools", "scripts", "benchmarks", "humdial", "models"}
    found = set()
    for name in imported_modules(path):
        for candidate in (name, name.rsplit(".", 1)[0]):
            if candidate in ours or candidate.split(".")[0] in {"tools", "scripts", "benchmarks"}:
                found.add(candidate)
                break
    return found


@pytest.mark.parametrize("path", LIBRARY)
def test_the_library_imports_no_script_tool_or_benchmark(path):
    bad = {m for m in first_party(path) if m in SCRIPTS or m.split(".")[0] in {"tools", "scripts", "benchmarks"}}
    assert not bad, f"{path} imports {sorted(bad)}"


@pytest.mark.parametrize("path", ENGINE)
def test_the_engine_imports_no_challenge_code(path):
    bad = {m for m in first_party(path) if m.split(".")[0] == "humdial"}
    assert not bad, f"{path} imports {sorted(bad)}: hand the challenge's pieces in from the scripts instead"


def test_benchmarks_share_helpers_through_one_module():
    for path in sorted((ROOT / "benchmarks").glob("bench_*.py")) + [ROOT / "benchmarks/gpu_check.py"]:
        others = {m for m in imported_modules(str(path.relative_to(ROOT)))
                  if m.startswith("benchmarks.") and m.split(".")[1] != "common"}
        assert not others, f"{path.name} imports {sorted(others)}: move what it shares to benchmarks/common.py"


def test_no_import_circle():
    modules = {module_name(p): p for p in LIBRARY}
    graph = {name: {m if m in modules else m.rsplit(".", 1)[0] for m in first_party(path)} & set(modules) - {name}
             for name, path in modules.items()}
    graph = {name: {m for m in deps if not (name.startswith(m + ".") and m in ("models", "humdial"))}
             for name, deps in graph.items()}  # a package's __init__ is its floor, not a dependency loop
    state: dict[str, str] = {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = "open"
        for dep in sorted(graph[node]):
            assert state.get(dep) != "open", "import circle: " + " -> ".join(trail + [node, dep])
            if dep not in state:
                visit(dep, trail + [node])
        state[node] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [])


@pytest.mark.parametrize("prompt_file", ["prompts/train_prompt.json", "prompts/test_prompt.json"])
def test_every_task_has_prompts_in_both_languages(prompt_file):
    prompts = json.loads((ROOT / prompt_file).read_text(encoding="utf-8"))
    for task in TASKS:
        keys = {task: "en", f"{task}_zh": "zh"}
        assert set(keys) <= set(prompts), f"{prompt_file} lacks {sorted(set(keys) - set(prompts))}"
    assert set(LANGUAGES) == {"zh", "en"}


def test_the_judge_prompts_cover_the_task_table():
    prompts = json.loads((ROOT / "prompts/judge_prompts.json").read_text(encoding="utf-8"))
    assert set(prompts) == {"system", *TASKS}
    for name, task in TASKS.items():
        text = "\n".join(prompts[name]) if isinstance(prompts[name], list) else prompts[name]
        assert all(d in text for d in task.judge_dimensions), name
    weights = sum(t.weight for t in TASKS.values())
    assert weights + sum(HUMAN_RATED.values()) == pytest.approx(1.0)  # people rate the rest of the ranking


def test_package_names_round_trip_through_the_task_table():
    for name in TASKS:
        assert task_from_name(Path("zh") / package_file_name(name)) == name


@pytest.mark.parametrize("path", [p for p in ENGINE if p.startswith("models/")])
def test_the_model_package_imports_only_itself(path):
    """models/ is the bottom floor with its own defaults (models.MODEL_DEFAULTS): a config or a script above it
    never feeds back into it."""
    bad = {m for m in first_party(path) if m.split(".")[0] != "models"}
    assert not bad, f"{path} imports {sorted(bad)}"
