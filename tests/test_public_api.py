import importlib

import chatchain
import chatchain.errors
import chatchain.stores
import chatchain.testing


def test_all_is_sorted_and_exports_exactly_the_public_names() -> None:
    for module in (chatchain, chatchain.errors, chatchain.stores, chatchain.testing):
        assert module.__all__ == sorted(module.__all__), module.__name__
        public = {
            name
            for name, value in vars(module).items()
            if not name.startswith("_")
            and not isinstance(value, type(importlib))
            and getattr(value, "__module__", module.__name__).startswith("chatchain")
        }
        public -= {"annotations"}
        public |= set(getattr(module, "_LAZY", ()))  # exported on first use
        assert set(module.__all__) == public, module.__name__


def test_every_public_name_resolves() -> None:
    for module in (chatchain, chatchain.errors, chatchain.stores, chatchain.testing):
        for name in module.__all__:
            assert getattr(module, name) is not None, f"{module.__name__}.{name}"


def test_every_error_descends_from_the_root() -> None:
    for name in chatchain.errors.__all__:
        assert issubclass(getattr(chatchain.errors, name), chatchain.ChatChainError)
        assert getattr(chatchain, name) is getattr(chatchain.errors, name)
