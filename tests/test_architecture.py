"""The import graph of sgm_jax: no cycles, and the command line's modes (sgm_jax/cli/) built in
one direction: a mode imports the setup layer and shared helpers, never another mode.

The graph is read from the source with `ast` (every import statement, those inside functions too),
so it sees imports that only run in some code paths."""
import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = "sgm_jax"
CLI = "sgm_jax.cli"
# One module per main.py mode; the other modules of sgm_jax/cli/ are layers every mode may use.
MODES = {f"{CLI}.{name}" for name in ("train", "sample", "evaluate", "train_classifier",
                                      "controllable", "import_checkpoint")}
CLI_SHARED = {CLI, f"{CLI}.setup", f"{CLI}.classifier", f"{CLI}.outputs", f"{CLI}.tuned_grid"}


def module_files(root: str = ROOT) -> dict[str, str]:
  """{dotted module name: path} of every .py file under sgm_jax/ (a package is its __init__)."""
  files = {}
  for directory, subdirs, names in os.walk(os.path.join(root, PACKAGE)):
    subdirs[:] = sorted(d for d in subdirs if not d.startswith((".", "__")))
    rel = os.path.relpath(directory, root).split(os.sep)
    for name in sorted(names):
      if name.endswith(".py"):
        parts = rel if name == "__init__.py" else rel + [name[:-3]]
        files[".".join(parts)] = os.path.join(directory, name)
  return files


def _resolve(name: str, modules: set) -> str | None:
  """The longest prefix of dotted `name` that is a module of ours (None: not ours)."""
  parts = name.split(".")
  for n in range(len(parts), 0, -1):
    candidate = ".".join(parts[:n])
    if candidate in modules:
      return candidate
  return None


def imports_of(module: str, path: str, modules: set) -> dict[str, int]:
  """{imported module of ours: first line} of one module's source. `from p import x` is module
  p.x when that is a module, else p; relative imports are resolved against `module`'s package."""
  with open(path) as f:
    tree = ast.parse(f.read(), path)
  is_package = os.path.basename(path) == "__init__.py"
  found = {}

  def add(target, line):
    if target is not None and target != module:
      found.setdefault(target, line)

  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      for alias in node.names:
        add(_resolve(alias.name, modules), node.lineno)
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        package = module.split(".") if is_package else module.split(".")[:-1]
        package = package[: len(package) - (node.level - 1)]
        base = ".".join(package + ([base] if base else []))
      for alias in node.names:
        full = f"{base}.{alias.name}" if base else alias.name
        add(full if full in modules else _resolve(base, modules), node.lineno)
  return found


def import_graph(root: str = ROOT) -> dict[str, dict[str, int]]:
  """{module: {imported module: line}} over every module of sgm_jax."""
  files = module_files(root)
  return {m: imports_of(m, path, set(files)) for m, path in files.items()}


def find_cycles(graph: dict[str, dict]) -> list[list[str]]:
  """One cycle [a, b, ..., a] per strongly connected component that has one (Tarjan)."""
  index, low, on_stack, stack, components = {}, {}, set(), [], []

  def visit(v):
    index[v] = low[v] = len(index)
    stack.append(v)
    on_stack.add(v)
    for w in sorted(graph.get(v, ())):
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on_stack:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      component = []
      while True:
        w = stack.pop()
        on_stack.discard(w)
        component.append(w)
        if w == v:
          break
      if len(component) > 1:
        components.append(set(component))

  for v in sorted(graph):
    if v not in index:
      visit(v)
  return [_cycle_in(graph, component) for component in components]


def _cycle_in(graph: dict[str, dict], component: set) -> list[str]:
  """A shortest cycle through the first module of a strongly connected component."""
  start = min(component)
  paths, seen = [[start]], {start}
  while paths:
    path = paths.pop(0)
    for w in sorted(graph[path[-1]]):
      if w == start:
        return path + [start]
      if w in component and w not in seen:
        seen.add(w)
        paths.append(path + [w])
  raise AssertionError(f"no cycle through {start}")


def _describe(graph, cycle):
  return " -> ".join(f"{a} (line {graph[a][b]})" for a, b in zip(cycle, cycle[1:])) + \
      f" -> {cycle[-1]}"


@pytest.fixture(scope="module")
def graph():
  return import_graph()


def test_the_graph_sees_every_kind_of_import(tmp_path):
  pkg = tmp_path / PACKAGE
  (pkg / "sub").mkdir(parents=True)
  (pkg / "__init__.py").write_text("")
  (pkg / "a.py").write_text("from sgm_jax import b\nimport sgm_jax.sub.c as c\n")
  (pkg / "b.py").write_text("def f():\n  from sgm_jax.sub.c import thing\n  from . import a\n")
  (pkg / "sub" / "__init__.py").write_text("from .c import thing\n")
  (pkg / "e.py").write_text("import sgm_jax\n")
  (pkg / "sub" / "c.py").write_text("import os\nfrom .. import e\nfrom ..sub import d\n")
  (pkg / "sub" / "d.py").write_text("from sgm_jax.sub import thing\n")
  g = import_graph(str(tmp_path))
  assert g == {"sgm_jax": {}, "sgm_jax.a": {"sgm_jax.b": 1, "sgm_jax.sub.c": 2},
               "sgm_jax.b": {"sgm_jax.sub.c": 2, "sgm_jax.a": 3},
               "sgm_jax.sub": {"sgm_jax.sub.c": 1},
               "sgm_jax.e": {"sgm_jax": 1},
               "sgm_jax.sub.c": {"sgm_jax.e": 2, "sgm_jax.sub.d": 3},
               "sgm_jax.sub.d": {"sgm_jax.sub": 1}}
  cycles = sorted(find_cycles(g))
  assert cycles == [["sgm_jax.a", "sgm_jax.b", "sgm_jax.a"],
                    ["sgm_jax.sub", "sgm_jax.sub.c", "sgm_jax.sub.d", "sgm_jax.sub"]]
  assert _describe(g, cycles[0]).startswith("sgm_jax.a (line 1) -> sgm_jax.b (line 3)")


def test_no_import_cycles(graph):
  assert "sgm_jax.cli.setup" in graph and len(graph) > 20  # the walk found the package
  cycles = find_cycles(graph)
  assert not cycles, "import cycles:\n" + "\n".join(_describe(graph, c) for c in cycles)


def test_every_cli_module_is_a_mode_or_a_shared_layer(graph):
  cli = {m for m in graph if m == CLI or m.startswith(CLI + ".")}
  assert cli == MODES | CLI_SHARED, ("classify the new module as a mode or a shared layer in "
                                     f"tests/test_architecture.py: {sorted(cli ^ (MODES | CLI_SHARED))}")


def test_modes_do_not_import_each_other(graph):
  bad = [f"{m} imports {other} (line {line})" for m in sorted(MODES)
         for other, line in sorted(graph[m].items()) if other in MODES]
  assert not bad, "a mode imports another mode; move what they share into setup or a shared " \
      "module:\n" + "\n".join(bad)


def test_only_main_and_the_modes_import_a_mode(graph):
  bad = [f"{m} imports {other} (line {line})" for m in sorted(graph) if m not in MODES
         for other, line in sorted(graph[m].items()) if other in MODES]
  assert not bad, "\n".join(bad)


def test_no_private_names_imported_across_modules():
  bad = []
  for module, path in module_files().items():
    with open(path) as f:
      tree = ast.parse(f.read(), path)
    for node in ast.walk(tree):
      if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith(
          PACKAGE)):
        bad += [f"{module} line {node.lineno}: {alias.name}" for alias in node.names
                if alias.name.startswith("_") and not alias.name.startswith("__")]
  assert not bad, "private names imported from another module:\n" + "\n".join(bad)
