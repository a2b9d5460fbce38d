"""Config dataclass fields with their help text, and click options generated from them.

Each stage's settings are one dataclass (``LoraSpec``, ``TrainSpec``,
``QuantizeOptions``, ``MeasureSpec``...): a field's default and help text are
written once, in :func:`config_field`, and validated once, in the dataclass's
``__post_init__``. The function, the recipe TOML and the CLI all go through it:
:func:`click_options` turns the fields into click options (help and shown
default from the field) and :meth:`ClickOptions.build` makes the dataclass from
what the user typed, so a bad value is refused by ``__post_init__`` with a
:class:`~lora_edge.core.errors.ConfigError` that names the option (``--rank``).

Options are generated with no click default: an option the user did not give
is left out and the dataclass's own default applies, so there is one default
per setting (shown in ``--help`` as ``[default: ...]``).

click is imported only when options are generated: stages import this module
for :func:`config_field` without it.
"""

from __future__ import annotations

import contextlib
import enum
from dataclasses import MISSING, Field, field, fields
from typing import Any, Callable, Iterable, Iterator

from lora_edge.core.errors import ConfigError, parse_enum


def config_field(default: Any, help: str, *, option: str | None = None, item: type | None = None,
                 **kwargs) -> Any:
    """A dataclass field with its help text (and CLI spelling) in its metadata.

    ``option``: the CLI option when it is not ``--<field-name>`` (``--lr`` for
    ``learning_rate``). ``item``: the element type of a list field whose
    default is empty (``int`` for block indices). Lists and dicts get a fresh
    copy of ``default`` per instance.
    """
    metadata = {"help": help, **({"option": option} if option else {}), **({"item": item} if item else {})}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=metadata, **kwargs)
    return field(default=default, metadata=metadata, **kwargs)


def same_field(spec_class: type, name: str) -> Any:
    """A field with the default and help of ``spec_class.<name>``: one setting shared by two specs."""
    spec = field_of(spec_class, name)
    return config_field(field_default(spec), spec.metadata.get("help", ""), option=spec.metadata.get("option"),
                        item=spec.metadata.get("item"))


def field_of(spec_class: type, name: str) -> Field:
    """The dataclass field ``name`` of ``spec_class``."""
    return next(f for f in fields(spec_class) if f.name == name)


def field_default(spec: Field) -> Any:
    """A field's default value (a fresh one for list and dict fields); None when it has none."""
    if spec.default_factory is not MISSING:  # type: ignore[misc]
        return spec.default_factory()  # type: ignore[misc]
    return None if spec.default is MISSING else spec.default


def field_help(spec_class: type) -> dict[str, str]:
    """Map each field of a spec dataclass to its help text."""
    return {f.name: f.metadata.get("help", "") for f in fields(spec_class)}


def format_default(value: Any) -> str | None:
    """A default as ``--help`` shows it (``0.005``, ``query,value``, ``minmax``); None: show nothing."""
    if isinstance(value, enum.Enum):
        return str(value.value)
    if isinstance(value, bool) or value is None or value == "" or value == [] or value == {}:
        return None
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, list):
        return ",".join(str(item.value if isinstance(item, enum.Enum) else item) for item in value)
    return str(value)


def option_help(spec: Field, shown: str | None) -> str:
    """A field's help text as its option shows it: the text, then ``[default: ...]`` when there is one.

    Written here rather than by click's ``show_default``: the option's click
    default is None (the dataclass's default applies), and click would show that.
    """
    text = spec.metadata.get("help", "")
    return f"{text}  [default: {shown}]" if shown is not None else text


def split_list(value: str, item: type, option: str) -> list:
    """Parse a comma-separated option value into a list of ``item``; a ConfigError names the option."""
    parts = [part.strip() for part in value.split(",") if part.strip()]
    if item is str:
        return parts
    if issubclass(item, enum.Enum):
        return [parse_enum(item, part, option, what=option.lstrip("-").rstrip("s")) for part in parts]
    try:
        return [item(part) for part in parts]
    except ValueError:
        raise ConfigError(f"'{value}' is not a comma-separated list of {item.__name__}s", option,
                          "write it like 1,2,4") from None


def _item_type(spec: Field, default: list) -> type:
    """The element type of a list field: declared, else the default's elements', else str."""
    return spec.metadata.get("item") or (type(default[0]) if default else str)


def enum_choice(enum_class: type[enum.Enum], option: str, what: str = "value"):
    """A click type listing an enum's values; it returns the member, and an unknown value is a ConfigError.

    The error names ``option`` and lists the choices (exit code 11, like any
    other bad value), where click's own Choice would give a usage error (2).
    """
    import click

    class EnumChoice(click.Choice):
        def convert(self, value, param, ctx):  # noqa: D102 - click's hook
            return parse_enum(enum_class, value, option, what=what)

    return EnumChoice([str(member.value) for member in enum_class])


class ClickOptions:
    """The click options of one config dataclass, and the way back from their values to the dataclass.

    Use it as a decorator on a click command; in the command, :meth:`build`
    pops the options' values from the command's keyword arguments and returns
    the validated dataclass.
    """

    def __init__(self, spec_class: type, include: Iterable[str] | None = None, exclude: Iterable[str] = (),
                 rename: dict[str, str] | None = None, show_defaults: bool = True):
        names = [f.name for f in fields(spec_class)]
        wanted = list(include) if include is not None else names
        unknown = [name for name in [*wanted, *exclude, *(rename or {})] if name not in names]
        if unknown:
            raise ValueError(f"{spec_class.__name__} has no field(s) {unknown}")
        self.spec_class = spec_class
        self.fields = [field_of(spec_class, name) for name in wanted if name not in set(exclude)]
        self.rename = dict(rename or {})
        self.show_defaults = show_defaults

    def option_name(self, name: str) -> str:
        """The CLI option of field ``name``: renamed here, else its ``option`` metadata, else ``--<name>``."""
        spec = field_of(self.spec_class, name)
        return self.rename.get(name) or spec.metadata.get("option") or "--" + name.replace("_", "-")

    def __call__(self, command: Callable) -> Callable:
        for option in reversed(self.options()):
            command = option(command)
        return command

    def options(self) -> list[Callable]:
        """One click option decorator per field, in field order."""
        return [self._option(spec) for spec in self.fields]

    def _option(self, spec: Field) -> Callable:
        import click

        name, default = self.option_name(spec.name), field_default(spec)
        shown = format_default(default) if self.show_defaults else None
        kwargs: dict[str, Any] = {}
        decls = [name]
        if isinstance(default, bool):  # off: a plain flag; on: --x/--no-x, shown as "x"
            decls = [f"{name}/--no-{name.removeprefix('--')}"] if default else [name]
            kwargs.update({} if default else {"is_flag": True})
            shown = name.removeprefix("--") if default and self.show_defaults else None
        elif isinstance(default, enum.Enum):
            kwargs["type"] = enum_choice(type(default), name, what=spec.name.replace("_", " "))
        elif isinstance(default, int):
            kwargs["type"] = int
        elif isinstance(default, float):
            kwargs["type"] = float
        elif isinstance(default, list):
            kwargs["metavar"] = "N,N,..." if _item_type(spec, default) in (int, float) else "A,B,..."
        return click.option(*decls, spec.name, default=None, help=option_help(spec, shown), **kwargs)

    def given(self, values: dict[str, Any]) -> dict[str, Any]:
        """Pop this spec's options from a command's keyword arguments; keep those the user gave, parsed."""
        result = {}
        for spec in self.fields:
            value = values.pop(spec.name, None)
            if value is None:
                continue
            default = field_default(spec)
            if isinstance(default, list) and isinstance(value, str):
                value = split_list(value, _item_type(spec, default), self.option_name(spec.name))
            result[spec.name] = value
        return result

    def build(self, values: dict[str, Any], **fixed: Any) -> Any:
        """The dataclass from the options the user gave (popped from ``values``) and ``fixed`` fields.

        Validation is the dataclass's own; its ConfigError is re-worded to name
        the option (``--block-size``) instead of the field.
        """
        return self.make({**self.given(values), **fixed})

    def make(self, given: dict[str, Any]) -> Any:
        """The dataclass from field values (as :meth:`given` returns them); errors name the options."""
        with self.naming_options():
            return self.spec_class(**given)

    def value(self, values: dict[str, Any], name: str) -> Any:
        """One option's value, popped from ``values``: what the user gave, else the field's default."""
        return self.given({name: values.pop(name, None)}).get(name, field_default(field_of(self.spec_class, name)))

    @contextlib.contextmanager
    def naming_options(self) -> Iterator[None]:
        """A context in which a ConfigError that names one of these fields names its option instead."""
        try:
            yield
        except ConfigError as exc:
            option = self._option_for(exc.where)
            if option is None:
                raise
            raise ConfigError(exc.what, option, exc.fix) from None

    def _option_for(self, where: Any) -> str | None:
        """The option of the field a ConfigError's ``where`` names (``lora.rank``, ``rank``, ``--rank``)."""
        text = str(where or "")
        names = {spec.name: self.option_name(spec.name) for spec in self.fields}
        if text in names.values():
            return text
        last = text.split(".")[-1].split("[")[0]
        return names.get(last)


def click_options(spec_class: type, include: Iterable[str] | None = None, exclude: Iterable[str] = (),
                  rename: dict[str, str] | None = None, show_defaults: bool = True) -> ClickOptions:
    """Click options for the fields of ``spec_class`` (all, or ``include`` in that order, less ``exclude``).

    Field type -> option: bool -> a flag (``--x`` when off by default,
    ``--x/--no-x`` when on); int, float -> typed; an enum -> a choice of its
    values (parsed to the member); a list -> a comma-separated value; anything
    else -> text. Help is the field's, the shown default the field's default;
    ``rename`` maps a field to its option for this command only.
    """
    return ClickOptions(spec_class, include, exclude, rename, show_defaults)
