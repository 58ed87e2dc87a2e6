"""One typed config dataclass per stage, shared by the Python API, YAML files and the CLI.

Each config field documents itself once, in ``field(metadata={"help": ...})``; the CLI flags are
generated from the dataclass (:func:`config_command`), so flags, YAML keys and Python keyword
arguments cannot drift apart. Values are layered as defaults < ``--config`` YAML < explicit flags,
and unknown YAML keys are refused by name before any work starts.

Example::

    @dataclass
    class MyConfig:
        eta: float = option(0.32, "threshold in bits", flag="--eta")

    @config_command(app, MyConfig, "run")
    def run(config: MyConfig): ...
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import inspect
import json
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import typer
import yaml

C = TypeVar("C")


def option(
    default: Any = dataclasses.MISSING,
    help: str = "",
    *,
    flag: str | None = None,
    off_flag: str | None = None,
    greedy: bool = False,
    resumable: bool = False,
    **kwargs,
):
    """A dataclass field with its help text (and optionally a shorter CLI flag) in one place.

    ``off_flag`` names the switch that sets a bool field to False (default ``--no-<flag>``),
    e.g. ``flag="--lora", off_flag="--full"``. A ``greedy`` list field also takes the bare values that
    follow its flag (``--assistants A=x B=y``), as users of nargs-style CLIs expect. A ``resumable``
    field changes how a run goes (speed, logging, where it is written), not what it produces, so
    resuming a run may change it (:func:`resumable_fields`).
    """
    metadata = {"help": help}
    if flag:
        metadata["flag"] = flag
    if greedy:
        metadata["greedy"] = True
    if resumable:
        metadata["resumable"] = True
    if off_flag:
        metadata["off_flag"] = off_flag
    if isinstance(default, (list, dict, set)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=metadata, **kwargs)
    return dataclasses.field(default=default, metadata=metadata, **kwargs)


def check_url(name: str, value: str | None) -> None:
    """A server URL option: empty, or http(s)://... (else a ValueError naming the field)."""
    if value and not value.startswith(("http://", "https://")):
        raise ValueError(f"{name} must start with http:// or https://, got {value!r}")


def resumable_fields(cls) -> frozenset[str]:
    """Names of the fields of config class ``cls`` (bases included) that a resumed run may change.

    The one list per stage: declared on each field with ``option(..., resumable=True)``.
    """
    return frozenset(f.name for f in dataclasses.fields(cls) if f.metadata.get("resumable"))


def _field_types(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _unwrap_optional(tp):
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def _coerce(value, tp, where: str):
    """Convert a YAML/JSON value to a field's type (enums from their values, paths from strings)."""
    if value is None:
        return None
    tp = _unwrap_optional(tp)
    origin = typing.get_origin(tp)
    try:
        if inspect.isclass(tp) and issubclass(tp, enum.Enum):
            return value if isinstance(value, tp) else tp(value)
        if tp is Path:
            return Path(value)
        if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if origin in (list, tuple) and isinstance(value, (list, tuple)):
            (inner, *_) = typing.get_args(tp) or (Any,)
            return (
                type(value)(_coerce(v, inner, where) for v in value)
                if origin is list
                else tuple(_coerce(v, inner, where) for v in value)
            )
        if dataclasses.is_dataclass(tp) and isinstance(value, dict):
            return config_from_dict(tp, value, where=where)
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from err
    return value


def config_from_dict(cls: type[C], values: dict, *, where: str = "config") -> C:
    """Build ``cls`` from a mapping, refusing unknown keys by name (and nested dataclasses too)."""
    if not isinstance(values, dict):
        raise ValueError(f"{where}: expected a mapping of {cls.__name__} fields, got {type(values).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ValueError(
            f"{where}: unknown key(s) {', '.join(unknown)} for {cls.__name__}; known keys: {', '.join(sorted(names))}"
        )
    hints = _field_types(cls)
    coerced = {k: _coerce(v, hints[k], f"{where}.{k}") for k, v in values.items()}
    try:
        return cls(**coerced)
    except TypeError as err:
        raise ValueError(f"{where}: {err}") from err


def load_config(cls: type[C], path: str | Path) -> C:
    """Read a YAML (or JSON) file into ``cls``; errors name the file and the key."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ValueError(f"config file {path} is not valid YAML: {err}") from err
    return config_from_dict(cls, values, where=str(path))


def to_dict(config) -> dict:
    """A JSON-ready dict of a config (enums by value, paths as strings), saved with every artifact."""

    def plain(value):
        if isinstance(value, enum.Enum):
            return value.value
        if isinstance(value, Path):
            return str(value)
        if dataclasses.is_dataclass(value):
            return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value

    return plain(config)


def part_of(config, cls: type[C]) -> C:
    """The sub-config ``cls`` (a base of ``config``'s class) holding ``config``'s values of its fields."""
    return cls(**{f.name: getattr(config, f.name) for f in dataclasses.fields(cls) if f.init})


def save_config(config, path: str | Path) -> None:
    Path(path).write_text(json.dumps(to_dict(config), indent=2) + "\n")


def _cli_type(tp):
    tp = _unwrap_optional(tp)
    if typing.get_origin(tp) is tuple:
        return list[typing.get_args(tp)[0]]
    return tp


def config_command(
    app: typer.Typer,
    cls: type[C],
    name: str,
    *,
    help: str | None = None,
    positional: tuple[str, ...] = (),
    exclude: tuple[str, ...] = (),
) -> Callable[[Callable[[C], Any]], Callable[[C], Any]]:
    """Register ``fn(config)`` as ``app`` command ``name`` with one flag per field of ``cls``.

    ``positional`` fields become arguments; ``exclude`` fields keep their defaults (not on the CLI).
    A ``--config FILE`` option reads a YAML file first; flags given explicitly override it.
    """

    def decorator(fn: Callable[[C], Any]):
        hints = _field_types(cls)
        fields = [f for f in dataclasses.fields(cls) if f.name not in exclude and f.init]
        parameters = [
            inspect.Parameter("ctx", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=typer.Context),
        ]
        for f in sorted(fields, key=lambda f: f.name not in positional):
            has_default = f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
            default = (
                f.default
                if f.default is not dataclasses.MISSING
                else (f.default_factory() if f.default_factory is not dataclasses.MISSING else ...)
            )
            help_text = f.metadata.get("help", "")
            if f.name in positional:
                info = typer.Argument(
                    default if has_default else ..., help=help_text, show_default=has_default
                )
            else:
                flag = f.metadata.get("flag") or "--" + f.name.replace("_", "-")
                decls = [flag]
                if _unwrap_optional(hints[f.name]) is bool:
                    decls = [f"{flag}/{f.metadata.get('off_flag') or '--no-' + flag[2:]}"]
                # Required fields may come from --config, so the CLI itself never requires them.
                info = typer.Option(default if has_default else None, *decls, help=help_text)
            parameters.append(
                inspect.Parameter(
                    f.name, inspect.Parameter.KEYWORD_ONLY, default=info, annotation=_cli_type(hints[f.name])
                )
            )
        parameters.append(
            inspect.Parameter(
                "config_file",
                inspect.Parameter.KEYWORD_ONLY,
                default=typer.Option(None, "--config", help="YAML file of these options; flags override it"),
                annotation=Path | None,
            )
        )

        greedy = [f.name for f in fields if f.metadata.get("greedy")]
        if len(greedy) > 1:
            raise TypeError(f"{cls.__name__}: at most one greedy field, got {greedy}")

        @functools.wraps(fn)
        def command(ctx: typer.Context, **kwargs):
            config_file = kwargs.pop("config_file")
            if ctx.args:  # bare values after a greedy list flag (only allowed when one exists)
                kwargs[greedy[0]] = [*(kwargs[greedy[0]] or []), *ctx.args]
            values = {}
            if config_file is not None:
                values = dataclasses.asdict(load_config(cls, config_file))
            for key, value in kwargs.items():
                source = ctx.get_parameter_source(key)
                explicit = source is not None and source.name not in ("DEFAULT", "DEFAULT_MAP")
                if explicit or key not in values:
                    values[key] = value
            missing = [
                f.name
                for f in fields
                if values.get(f.name) is None
                and f.default is dataclasses.MISSING
                and f.default_factory is dataclasses.MISSING
            ]
            if missing:
                flags = ", ".join(fields_flag(cls, m) for m in missing)
                raise typer.BadParameter(f"missing required option(s): {flags}")
            config = config_from_dict(cls, values, where="options")
            return fn(config)

        command.__signature__ = inspect.Signature(parameters)
        settings = {"allow_extra_args": True} if greedy else {}
        app.command(name, help=help or (fn.__doc__ or "").strip(), context_settings=settings)(command)
        return fn

    return decorator


def config_group(
    app: typer.Typer, cls: type[C], name: str, fn: Callable[[C], Any], *, help: str | None = None, **kwargs
) -> typer.Typer:
    """Register ``name`` as a command group that also runs ``fn(config)`` when no subcommand is given.

    ``empower NAME --flags`` works like :func:`config_command`, and subcommands registered on the
    returned Typer (``empower NAME SUB ...``) run instead of ``fn`` when named. ``kwargs`` are those of
    :func:`config_command`.
    """
    scratch = typer.Typer()
    config_command(scratch, cls, name, help=help, **kwargs)(fn)
    command = scratch.registered_commands[0].callback

    @functools.wraps(command)
    def callback(ctx: typer.Context, **values):
        if ctx.invoked_subcommand is None:
            return command(ctx, **values)

    callback.__signature__ = inspect.signature(command)
    group = typer.Typer()
    group.callback(invoke_without_command=True, help=help or (fn.__doc__ or "").strip())(callback)
    app.add_typer(group, name=name)
    return group


def fields_flag(cls, name: str) -> str:
    """The CLI flag of a config field (for error messages that tell the user what to type)."""
    for f in dataclasses.fields(cls):
        if f.name == name:
            return f.metadata.get("flag") or "--" + name.replace("_", "-")
    raise KeyError(name)
