"""Recipes: the stages of `tuili optimize` written down in YAML (or TOML) and checked before anything runs.

    name: prune-mlp-25+distill+w4a16
    stages:
      - analyze
      - prune: mlp=0.25                     # the stage's main setting, or a mapping of settings
      - distill: {steps: 60, lr: 1.0e-4}
      - quantize: {scheme: w4a16, method: gptq, group_size: 128}
      - benchmark: {max_tokens: 16384}      # how every stage is measured
      - save: out/model
      - export: out/model.onnx              # ONNX (checked in onnxruntime) or .gguf (read back), vs tuili's logits

Stages run in this order (prune and distill may alternate): analyze first, transformations, then
quantize (a quantized model can no longer be pruned or trained), benchmark, then save and export. Every error
names the file and line and what is allowed there. Recipes shipped with tuili sit in
`tuili/recipes/` and are found by name (`tuili recipes` lists them).
"""

from __future__ import annotations

import re
import tomllib
import types
import typing
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from tuili.errors import TuiliError
from tuili.pipeline.stages import KINDS, StageConfig, Transform


class RecipeError(TuiliError, ValueError):
    """A recipe that cannot run: the message names the file, the line and what to change."""


@dataclass(frozen=True)
class Stage:
    kind: str
    settings: dict[str, Any]  # as the recipe gives them, checked
    line: int | None = None  # 1-based line in the recipe's text
    config: StageConfig | None = None  # the stage's config, made from the settings


@dataclass(frozen=True)
class Recipe:
    name: str
    stages: tuple[Stage, ...]
    description: str = ""
    source: str = "<recipe>"

    def settings(self, kind: str) -> dict[str, Any]:
        """The settings of the (single) stage of this kind, {} when the recipe has none."""
        return next((s.settings for s in self.stages if s.kind == kind), {})

    def config(self, kind: str) -> StageConfig:
        """The config of the (single) stage of this kind; its defaults when the recipe has none."""
        found = next((s.config for s in self.stages if s.kind == kind), None)
        return found if found is not None else KINDS[kind]()  # type: ignore[call-arg]

    def transforms(self) -> list[Transform]:
        """The stages that change the model (prune, distill, quantize), as `optimize` runs them."""
        return [s.config for s in self.stages if isinstance(s.config, Transform)]

    @property
    def save_path(self) -> str | None:
        return self.settings("save").get("path")

    @property
    def export_paths(self) -> list[str]:
        return [s.settings["path"] for s in self.stages if s.kind == "export"]


def _where(source: str, line: int | None) -> str:
    return f"{source}, line {line}" if line else source


_TYPE_NAMES = {int: "a whole number", float: "a number", str: "text", bool: "true or false"}


def _check_value(kind: str, key: str, value: Any, where: str) -> Any:
    """`value` as the setting's type hint wants it (ints read as floats, numbers as text for a
    stage's main setting); RecipeError naming the setting and the type otherwise."""
    hint = KINDS[kind].settings()[key]
    options = typing.get_args(hint) if typing.get_origin(hint) in (types.UnionType, typing.Union) else (hint,)
    if value is None and type(None) in options:
        return None
    expected = next(t for t in options if t is not type(None))
    if typing.get_origin(expected) is tuple:  # batch sizes: whole numbers from 1
        if (
            not isinstance(value, list)
            or not value
            or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in value)
        ):
            raise RecipeError(f"{where}: {kind}.{key} must be a list of whole numbers from 1, got {value!r}")
        return tuple(value)
    numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
    if expected is float and numeric:
        return float(value)
    if expected is str and numeric and key == KINDS[kind].main:
        return str(value)  # prune: 0.5 (a sparsity) reads as a number
    if not isinstance(value, expected) or (expected is not bool and isinstance(value, bool)):
        raise RecipeError(f"{where}: {kind}.{key} must be {_TYPE_NAMES[expected]}, got {value!r}")
    return value


def _stage(item: Any, line: int | None, key_lines: dict[str, int], source: str) -> Stage:
    where = _where(source, line)
    if isinstance(item, str):
        kind, raw = item, None
    elif isinstance(item, dict) and len(item) == 1:
        ((kind, raw),) = item.items()
    else:
        raise RecipeError(
            f"{where}: a stage is a name (analyze) or one name with its settings "
            f"(quantize: {{scheme: w8a16}}), got {item!r}"
        )
    if kind not in KINDS:
        raise RecipeError(f"{where}: unknown stage {kind!r}; stages are {', '.join(KINDS)}")
    spec = KINDS[kind]
    fields = spec.settings()
    if raw is None:
        settings = {}
    elif isinstance(raw, dict):
        settings = dict(raw)
    elif spec.main is not None:
        settings = {spec.main: raw}
    else:
        raise RecipeError(f"{where}: {kind} takes settings as a mapping ({', '.join(fields)}), got {raw!r}")
    for key in settings:
        if key not in fields:
            raise RecipeError(
                f"{_where(source, key_lines.get(key, line))}: {kind} has no setting {key!r}; "
                f"its settings are {', '.join(fields)}"
            )
        settings[key] = _check_value(kind, key, settings[key], _where(source, key_lines.get(key, line)))
    missing = [k for k in spec.required() if k not in settings]
    if missing:
        raise RecipeError(f"{where}: {kind} needs {', '.join(missing)}")
    try:  # the config checks its values (schemes, specs, rates): a bad one is refused before anything runs
        config = spec.from_settings(settings)
    except (ValueError, KeyError, TypeError) as e:
        message = str(e.args[0] if e.args else e)
        named = message if message.startswith(f"{kind} ") else f"{kind}: {message}"  # the stage named once
        raise RecipeError(f"{where}: {named}") from None
    return Stage(kind, settings, line, config)


def _check_order(stages: list[Stage], source: str) -> None:
    seen: dict[str, Stage] = {}
    for i, stage in enumerate(stages):
        where = _where(source, stage.line)
        if KINDS[stage.kind].once and stage.kind in seen:
            raise RecipeError(
                f"{where}: a second {stage.kind} stage (the first is at line {seen[stage.kind].line}); "
                f"a recipe has at most one"
            )
        seen.setdefault(stage.kind, stage)
        later = next((s for s in stages[:i] if KINDS[s.kind].rank > KINDS[stage.kind].rank), None)
        if later is not None:
            why = (
                " (a quantized model has integer weights: prune and distill before quantizing)"
                if later.kind == "quantize"
                else ""
            )
            raise RecipeError(
                f"{where}: {stage.kind} cannot come after {later.kind} (line {later.line}){why}; "
                f"the order is analyze, prune/distill, quantize, benchmark, save/export"
            )


def parse_recipe(text: str, source: str = "<recipe>", fmt: str = "yaml") -> Recipe:
    """A checked Recipe from YAML or TOML text; RecipeError (file, line, what is wrong) otherwise."""
    if fmt == "toml":
        try:
            document = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise RecipeError(f"{source}: not valid TOML: {e}") from None
        lines = _toml_stage_lines(text, document.get("stages"))
    else:
        try:
            root = yaml.compose(text)
            document = yaml.safe_load(text)
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            raise RecipeError(
                f"{_where(source, mark.line + 1 if mark else None)}: not valid YAML: {getattr(e, 'problem', None) or e}"
            ) from None
        lines = _yaml_stage_lines(root)
    if not isinstance(document, dict):
        raise RecipeError(f"{source}: a recipe is a mapping with 'name' and 'stages'")
    unknown = set(document) - {"name", "description", "stages"}
    if unknown:
        raise RecipeError(
            f"{source}: unknown key(s) {', '.join(sorted(map(str, unknown)))}; "
            "a recipe has name, description and stages"
        )
    items = document.get("stages")
    if not isinstance(items, list) or not items:
        raise RecipeError(f"{source}: 'stages' must be a non-empty list of stages ({', '.join(KINDS)})")
    stages = [_stage(item, *(lines[i] if i < len(lines) else (None, {})), source) for i, item in enumerate(items)]
    _check_order(stages, source)
    name = str(document.get("name") or Path(source).stem)
    return Recipe(name, tuple(stages), str(document.get("description", "")), source)


def _yaml_stage_lines(root) -> list[tuple[int, dict[str, int]]]:
    """(line of each stage item, {setting: line}) from the YAML node tree."""
    if not isinstance(root, yaml.MappingNode):
        return []
    for key, value in root.value:
        if key.value == "stages" and isinstance(value, yaml.SequenceNode):
            out = []
            for item in value.value:
                keys = {}
                if isinstance(item, yaml.MappingNode) and item.value and isinstance(item.value[0][1], yaml.MappingNode):
                    keys = {k.value: k.start_mark.line + 1 for k, _ in item.value[0][1].value}
                out.append((item.start_mark.line + 1, keys))
            return out
    return []


def _toml_stage_lines(text: str, items: Any) -> list[tuple[int, dict[str, int]]]:
    """TOML keeps no positions: each stage's line is where its name next appears as a key or string."""
    if not isinstance(items, list):
        return []
    text_lines = text.splitlines()
    start = next((i for i, t in enumerate(text_lines) if re.match(r"\s*(stages\s*=|\[\[stages\]\])", t)), 0)
    out, at = [], start
    for item in items:
        kind = item if isinstance(item, str) else next(iter(item), "") if isinstance(item, dict) else ""
        pattern = re.compile(rf"(^|[\s{{,\"']){re.escape(str(kind))}([\s=\"',}}]|$)")
        found = next((i for i in range(at, len(text_lines)) if pattern.search(text_lines[i])), None)
        if found is None:
            out.append((None, {}))
            continue
        out.append((found + 1, {}))
        at = found + 1
    return out


def shipped() -> dict[str, Recipe]:
    """The recipes that come with tuili (tuili/recipes/), by name."""
    folder = resources.files("tuili") / "recipes"
    recipes = [
        _load_file(Path(str(entry)))
        for entry in sorted(folder.iterdir(), key=lambda e: e.name)
        if entry.name.endswith((".yaml", ".yml", ".toml"))
    ]
    return {recipe.name: recipe for recipe in recipes}


def _load_file(path: Path) -> Recipe:
    return parse_recipe(path.read_text(), str(path), "toml" if path.suffix == ".toml" else "yaml")


def load_recipe(recipe: str | Path) -> Recipe:
    """A recipe file (.yaml, .yml or .toml) or the name of a shipped one."""
    path = Path(recipe)
    if path.suffix in (".yaml", ".yml", ".toml") or path.exists():
        if not path.is_file():
            raise RecipeError(f"no recipe file at {path}; shipped recipes: {', '.join(shipped())}")
        return _load_file(path)
    recipes = shipped()
    if str(recipe) not in recipes:
        raise RecipeError(
            f"no recipe named {str(recipe)!r}: give a .yaml or .toml file, or one of {', '.join(recipes)}"
        )
    return recipes[str(recipe)]


__all__ = ["KINDS", "Recipe", "RecipeError", "Stage", "load_recipe", "parse_recipe", "shipped"]
