"""The package's layers, read from its source: every module belongs to a layer, imports only from
its own layer or the layers below, and no modules import each other in a circle. Imports inside
functions count as much as those at the top (they run, only later). And a module over 500 lines
says at its top why it is one module.

The order, most basic first (docs/internals.md and the README's layout table follow it):"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "picogpt"

LAYERS = (
    ("errors", "files"),  # bounded reads, atomic writes, the error family
    ("gpt2",),  # the network: the engine, the training layers, the cores
    ("tokenizers",),  # text to ids and back
    ("formats",),  # TF bundles, safetensors, the OpenAI and HF folder layouts
    ("hub",),  # a name to a folder, downloads, reading a folder, export
    ("generation",),  # sampling, the decode loop, stop strings, Model
    ("training",),  # data, the optimizer, the run folder, the loop
    ("serve",),  # OpenAI's API over Model, the HTTP transport, the page
    ("cli",),  # one module per command
    ("", "__main__"),  # the package itself (the public names) and `python -m picogpt`
)


def module_name(path, package_dir):
    """picogpt/gpt2/engine.py -> picogpt.gpt2.engine; picogpt/cli/__init__.py -> picogpt.cli."""
    parts = list(path.relative_to(package_dir.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path, name, modules):
    """The package's modules that the file at `path` (module `name`) imports, anywhere in it."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the package, up level - 1
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                # `from picogpt import files` imports the module picogpt.files
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base)
    root = name.split(".")[0]
    return {m for m in found if m == root or m.startswith(root + ".")} - {name}


def import_graph(package_dir):
    """{module: the package's modules it imports} for every .py file of the package."""
    files = {module_name(p, package_dir): p for p in package_dir.rglob("*.py")}
    return {name: imports_of(path, name, files) for name, path in files.items()}


def layer_of(module, layers=LAYERS):
    """The index of the layer `module` belongs to, by the name after the package's; None if none."""
    top = module.split(".")[1] if "." in module else ""
    return next((i for i, names in enumerate(layers) if top in names), None)


def upward_imports(graph, layers=LAYERS):
    """'a -> b' for each import of a module from a higher layer, and each module in no layer. The
    package itself (its __init__: `from picogpt import __version__`) is run before any of its
    modules, so reading a name of it is no import up; what it imports is held like the rest."""
    wrong = [f"{m}: in no layer" for m in sorted(graph) if layer_of(m, layers) is None]
    for module, targets in sorted(graph.items()):
        here = layer_of(module, layers)
        for target in sorted(t for t in targets if "." in t):
            there = layer_of(target, layers)
            if here is not None and (there is None or there > here):
                wrong.append(f"{module} -> {target}")
    return wrong


def cycles(graph):
    """The groups of modules that import each other in a circle (Tarjan's strongly connected
    components of more than one module), each sorted."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                out.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(out)


def test_every_module_imports_only_from_its_layer_or_below():
    assert upward_imports(import_graph(PACKAGE)) == []


def test_no_modules_import_each_other_in_a_circle():
    assert cycles(import_graph(PACKAGE)) == []


def test_the_layers_cover_every_folder_of_the_package():
    folders = {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()}
    named = {name for layer in LAYERS for name in layer}
    assert folders <= named, folders - named


LONG = 500  # lines: a module longer than this says at its top why it is one module


def test_a_long_module_says_why_at_its_top():
    unexplained = []
    for path in sorted(PACKAGE.rglob("*.py")):
        text = path.read_text(encoding="utf-8")
        doc = ast.get_docstring(ast.parse(text)) or ""
        if text.count("\n") > LONG and " lines" not in doc:
            unexplained.append(f"{path.relative_to(ROOT)}: {text.count(chr(10))} lines")
    assert unexplained == []


# --- the checks themselves, on a small made-up package -------------------------------------------

def write_package(root, sources):
    for rel, text in sources.items():
        path = root / "pkg" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root / "pkg"


@pytest.mark.parametrize("source", [
    "from pkg.hub import resolve\n",
    "import pkg.hub.resolve\n",
    "def late():\n    from pkg.hub.resolve import resolve\n",  # inside a function counts too
    "from ..hub import resolve\n",
])
def test_an_import_up_the_layers_is_found(tmp_path, source):
    package = write_package(tmp_path, {
        "__init__.py": "", "formats/__init__.py": "", "formats/hf.py": source,
        "hub/__init__.py": "", "hub/resolve.py": "from pkg.formats import hf\n",
    })
    graph = import_graph(package)
    assert "pkg.formats.hf -> pkg.hub.resolve" in upward_imports(graph)
    assert cycles(graph) == [["pkg.formats.hf", "pkg.hub.resolve"]]


def test_a_circle_within_one_layer_is_found(tmp_path):
    package = write_package(tmp_path, {
        "__init__.py": "", "hub/__init__.py": "",
        "hub/a.py": "from pkg.hub import b\n", "hub/b.py": "from pkg.hub import c\n",
        "hub/c.py": "def f():\n    import pkg.hub.a\n",
    })
    graph = import_graph(package)
    assert upward_imports(graph) == []
    assert cycles(graph) == [["pkg.hub.a", "pkg.hub.b", "pkg.hub.c"]]


def test_the_package_itself_may_be_read_from_below_but_not_import_upwards(tmp_path):
    package = write_package(tmp_path, {
        "__init__.py": "__version__ = '1'\ndef late():\n    from pkg.cli import main\n",
        "cli/__init__.py": "from pkg import __version__\n", "files.py": "from pkg import cli\n",
    })
    graph = import_graph(package)
    assert upward_imports(graph) == ["pkg.files -> pkg.cli"]
    assert cycles(graph) == [["pkg", "pkg.cli"]]


def test_a_module_outside_the_layers_is_found(tmp_path):
    package = write_package(tmp_path, {"__init__.py": "", "loading.py": "from pkg import files\n",
                                       "files.py": ""})
    assert upward_imports(import_graph(package)) == ["pkg.loading: in no layer"]
