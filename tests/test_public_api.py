import ast
import functools
import inspect
import itertools
from pathlib import Path
from types import ModuleType

import pytest

import chatchain
import chatchain.budgets
import chatchain.errors
import chatchain.hooks
import chatchain.otel
import chatchain.pricing
import chatchain.prompt
import chatchain.stores
import chatchain.testing
import chatchain.usage
import chatchain.users

MODULES = [
    chatchain,
    chatchain.budgets,
    chatchain.errors,
    chatchain.hooks,
    chatchain.otel,
    chatchain.pricing,
    chatchain.prompt,
    chatchain.stores,
    chatchain.testing,
    chatchain.usage,
    chatchain.users,
]


def _public_bindings(module: ModuleType) -> set[str]:
    """The public names a module binds.

    A package's are every chatchain object it binds or loads on first use (``_LAZY``); a
    module's are the classes and functions it defines (its constants may stay unexported).
    """
    public = set()
    for name, value in vars(module).items():
        if name.startswith("_") or name == "annotations" or isinstance(value, ModuleType):
            continue
        if hasattr(module, "__path__"):
            exported = getattr(value, "__module__", module.__name__).startswith("chatchain")
        else:
            defined = inspect.isclass(value) or inspect.isroutine(value)
            exported = defined and value.__module__ == module.__name__
        if exported:
            public.add(name)
    return public | set(getattr(module, "_LAZY", ()))  # exported on first use


@functools.cache
def _attribute_docstrings() -> frozenset[str]:
    """Module-level names in chatchain's source that a string follows (``Scope = ...``)."""
    names = set()
    for path in Path(chatchain.__file__).parent.rglob("*.py"):
        body = ast.parse(path.read_text(encoding="utf-8")).body
        for statement, following in itertools.pairwise(body):
            if not (
                isinstance(following, ast.Expr)
                and isinstance(following.value, ast.Constant)
                and isinstance(following.value.value, str)
            ):
                continue
            if isinstance(statement, ast.Assign):
                targets = statement.targets
            elif isinstance(statement, ast.AnnAssign):
                targets = [statement.target]
            else:
                targets = []
            names.update(target.id for target in targets if isinstance(target, ast.Name))
    return frozenset(names)


def _own_docstring(value: object) -> str | None:
    if inspect.isclass(value):
        doc = vars(value).get("__doc__")
        # A dataclass without a docstring gets its signature as one.
        return None if not doc or doc.startswith(f"{value.__name__}(") else doc
    if inspect.isroutine(value):
        return value.__doc__
    return None


@pytest.mark.parametrize("module", MODULES, ids=lambda module: module.__name__)
def test_all_is_sorted_and_exports_exactly_the_public_names(module: ModuleType) -> None:
    assert module.__all__ == sorted(module.__all__)
    if hasattr(module, "__path__"):
        assert set(module.__all__) == _public_bindings(module)
    else:  # a module's type aliases and constants are exported by choice
        assert _public_bindings(module) <= set(module.__all__)


@pytest.mark.parametrize("module", MODULES, ids=lambda module: module.__name__)
def test_every_public_name_resolves(module: ModuleType) -> None:
    # Bound, or loaded on first use by the module's __getattr__.
    for name in module.__all__:
        assert getattr(module, name) is not None, f"{module.__name__}.{name}"


@pytest.mark.parametrize("module", MODULES, ids=lambda module: module.__name__)
def test_every_export_is_documented(module: ModuleType) -> None:
    undocumented = [
        name
        for name in module.__all__
        if not (_own_docstring(getattr(module, name)) or name in _attribute_docstrings())
    ]
    assert undocumented == [], module.__name__


def test_every_error_descends_from_the_root() -> None:
    for name in chatchain.errors.__all__:
        assert issubclass(getattr(chatchain.errors, name), chatchain.ChatChainError)
        assert getattr(chatchain, name) is getattr(chatchain.errors, name)


def test_the_package_exports_each_module_name_once() -> None:
    # A name chatchain re-exports is the object its home module exports.
    for module in MODULES[1:]:
        for name in set(module.__all__) & set(chatchain.__all__):
            assert getattr(chatchain, name) is getattr(module, name), (module.__name__, name)
