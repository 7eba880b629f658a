"""Loading typed YAML configs: one pydantic model per stage, `extra="forbid"`, errors that name file, key and reason."""

from __future__ import annotations

import difflib
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from charforge.errors import ConfigError

__all__ = ["ConfigError", "StageConfig", "load_yaml_model", "read_yaml", "validate_model"]

M = TypeVar("M", bound=BaseModel)


class StageConfig(BaseModel):
    """Base of every stage config: unknown keys are errors, so a typo never passes silently."""

    model_config = ConfigDict(extra="forbid", validate_default=True)


def _nested_model(annotation: Any) -> type[BaseModel] | None:
    """The model inside an annotation: `Model`, `Model | None`, `list[Model]`, `dict[str, Model]`."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _nested_model(arg)
        if found is not None:
            return found
    return None


def _field_names(model: type[BaseModel], loc: tuple) -> list[str]:
    """Names of the fields valid at `loc` (the parent of the offending key), for did-you-mean hints."""
    current: Any = model
    for part in loc[:-1]:
        if isinstance(part, int):  # an item of a list of models: same model
            continue
        field = getattr(current, "model_fields", {}).get(part)
        if field is None:
            return []
        current = _nested_model(field.annotation)
        if current is None:
            return []
    return list(getattr(current, "model_fields", {}))


def describe_validation_error(source: str, model: type[BaseModel], err: ValidationError) -> str:
    """One line per problem: `<file>: key '<a.b>': <reason>`, with a suggestion for misspelt keys."""
    lines = []
    for problem in err.errors():
        loc = tuple(problem["loc"])
        key = ".".join(str(p) for p in loc) or "<root>"
        reason = problem["msg"]
        if problem["type"] == "extra_forbidden":
            reason = "unknown key"
            close = difflib.get_close_matches(str(loc[-1]), _field_names(model, loc), n=1)
            if close:
                reason += f", did you mean '{close[0]}'?"
        elif "input" in problem and problem["type"] != "missing":
            reason += f" (got {problem['input']!r})"
        lines.append(f"{source}: key '{key}': {reason}")
    return "\n".join(lines)


def validate_model(data: Any, model: type[M], source: str) -> M:
    """Validate a mapping against `model`, raising ConfigError with readable lines."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping of keys at the top level, got {type(data).__name__}")
    try:
        return model.model_validate(data)
    except ValidationError as err:
        raise ConfigError(describe_validation_error(source, model, err)) from None


def yaml_position(err: yaml.YAMLError) -> str:
    """' at line L, column C: <problem> (<context> at line L)' on one line; PyYAML's own text spans five."""
    mark, problem = getattr(err, "problem_mark", None), getattr(err, "problem", None)
    if mark is None or problem is None:
        return ": " + " ".join(str(err).split())
    text = f" at line {mark.line + 1}, column {mark.column + 1}: {problem}"
    context, context_mark = getattr(err, "context", None), getattr(err, "context_mark", None)
    if context and context_mark is not None:
        text += f" ({context} at line {context_mark.line + 1}, column {context_mark.column + 1})"
    return text


def read_yaml(path: Path) -> Any:
    """Parse a YAML file, turning missing files and syntax errors into ConfigError."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML{yaml_position(err)}") from None


def load_yaml_model(path: Path, model: type[M]) -> M:
    """Load and validate one YAML file as `model`."""
    return validate_model(read_yaml(path) or {}, model, str(path))
