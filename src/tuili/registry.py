"""Config classes registered to the handlers that run them (quantization and pruning methods).

A method is a frozen dataclass of its options with a `name`; its handler class is registered for
it with `@registry.register(ThatConfig)`, and `handler_for(config)` finds it by the config's type:
adding a method adds a registration, not a branch.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Generic, TypeVar

H = TypeVar("H")


class Registry(Generic[H]):
    """Handler classes by config class, and config classes by name (the CLI's and recipes' words)."""

    def __init__(self, what: str):
        self.what = what  # "quantization method": for the errors
        self.handlers: dict[type, Callable[[Any], H]] = {}
        self.configs: dict[str, type] = {}

    def register(self, config: type) -> Callable[[type[H]], type[H]]:
        """Decorate a handler class: it runs configs of type `config`."""

        def wrap(handler: type[H]) -> type[H]:
            self.handlers[config] = handler
            self.configs[config.name] = config  # type: ignore[attr-defined]
            return handler

        return wrap

    def handler_for(self, config: object) -> H:
        """The handler of a config (a TypeError for anything else, naming what is registered)."""
        handler = self.handlers.get(type(config))
        if handler is None:
            raise TypeError(f"{config!r} is not a {self.what}; use one of {', '.join(self.configs)}")
        return handler(config)

    def named(self, name: str) -> Any:
        """The config called `name`, with its defaults."""
        if name not in self.configs:
            raise ValueError(f"unknown {self.what} {name!r}: choose one of {', '.join(self.configs)}")
        return self.configs[name]()
