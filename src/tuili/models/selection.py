"""Which linear layers a compression step touches: by name pattern, with the language-model head and
a mixture's router left alone by default (quantization and pruning select alike)."""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Sequence

from torch import nn

DEFAULT_IGNORE = ("lm_head", "*.mlp.gate")  # the head, and a mixture's router (a few weights that pick experts)


def select_linears(
    module: nn.Module,
    targets: Sequence[str] | None = None,
    ignore: Sequence[str] = DEFAULT_IGNORE,
    where: Callable[[str, nn.Module], bool] | None = None,
) -> dict[str, nn.Linear]:
    """nn.Linear layers by name: matching a `targets` pattern (default all), no `ignore` pattern, and `where`."""

    def matches(name: str, patterns: Sequence[str]) -> bool:
        return any(fnmatch.fnmatchcase(name, p) or name.endswith("." + p) or name == p for p in patterns)

    return {
        name: m
        for name, m in module.named_modules()
        if isinstance(m, nn.Linear)
        and (targets is None or matches(name, targets))
        and not matches(name, ignore)
        and (where is None or where(name, m))
    }


def replace_module(root: nn.Module, name: str, new: nn.Module) -> None:
    """Put `new` where the submodule `name` is."""
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)
