"""The digit-named stage scripts ("03_cluster.py") as modules, for benchmarks and tests (tests/conftest.py
uses this too): each is loaded once per process and registered in sys.modules under "stage_" + its stem and
under the name a caller gives it, so DataLoader workers and pickled functions find it, and a benchmark that a
test imports shares the test's module objects."""
import importlib.util
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load(file: str, name: str | None = None):
    canonical = "stage_" + os.path.splitext(os.path.basename(file))[0]
    module = sys.modules.get(canonical)
    if module is None:
        if ROOT not in sys.path:
            sys.path.insert(0, ROOT)
        spec = importlib.util.spec_from_file_location(name or canonical, os.path.join(ROOT, file))
        module = importlib.util.module_from_spec(spec)
        sys.modules[canonical] = module
        if name:
            sys.modules[name] = module
        spec.loader.exec_module(module)
    if name:
        sys.modules.setdefault(name, module)
    return module
