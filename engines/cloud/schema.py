"""Endpoint schemas: which fields a cloud trainer takes, their types and ranges (pure).

An engine's table (e.g. engines/fal/endpoints.py) describes each endpoint it knows, copied from
the cloud's published schema; a user may describe more in a JSON file (`schemas` setting), in
the same shape, which is read through `schemas_from_json` (the one validating constructor).
Arguments are built from *roles* (archive, steps, trigger, learning_rate), so no field name is
guessed from an endpoint's name, and `check_arguments` refuses what the endpoint would refuse
before anything is uploaded or paid for.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

TYPES = ("url", "str", "int", "float", "bool", "enum")
ROLES = ("archive", "steps", "trigger", "learning_rate")


@dataclass(frozen=True)
class Field:
    type: str
    required: bool = False
    minimum: float | None = None
    maximum: float | None = None
    default: Any = None
    choices: tuple[str, ...] = ()
    role: str | None = None


@dataclass(frozen=True)
class Schema:
    endpoint: str
    trains: tuple[str, ...]  # lorad model ids this trainer really trains
    fields: dict[str, Field]
    usd_per_step: float | None = None  # None: no published price
    min_steps: int = 0  # the cloud bills at least this many steps
    source: str = ""

    def role(self, role: str) -> str | None:
        return next((name for name, f in self.fields.items() if f.role == role), None)


class SchemaError(ValueError):
    pass


def build_arguments(schema: Schema, archive_url: str, values: dict[str, Any]) -> dict[str, Any]:
    """The request body from role values (steps, trigger, learning_rate); a role the endpoint
    has no field for is refused when a value was given for it (it would be ignored or refused)."""
    args: dict[str, Any] = {}
    archive = schema.role("archive")
    if archive is None:
        raise SchemaError(f"{schema.endpoint}: its schema names no field for the image archive")
    args[archive] = archive_url
    for role in ("steps", "trigger", "learning_rate"):
        value = values.get(role)
        if value is None or value == "":
            continue
        name = schema.role(role)
        if name is None:
            if role == "trigger":
                continue  # captions carry the trigger; a trainer without the field needs none
            raise SchemaError(
                f"{schema.endpoint} takes no {role} (its fields: {', '.join(sorted(schema.fields))}); "
                f"remove {role} from lora.toml/READY"
            )
        args[name] = value
    return args


def check_arguments(schema: Schema, args: dict[str, Any]) -> None:
    """SchemaError naming the field and the allowed values when fal would refuse `args`."""
    for name, value in args.items():
        spec = schema.fields.get(name)
        if spec is None:
            raise SchemaError(
                f"{schema.endpoint} has no field {name!r} (its fields: {', '.join(sorted(schema.fields))})"
            )
        _check_value(schema.endpoint, name, spec, value)
    missing = [n for n, f in schema.fields.items() if f.required and n not in args]
    if missing:
        raise SchemaError(f"{schema.endpoint} needs {', '.join(missing)}")


def _check_value(endpoint: str, name: str, spec: Field, value: Any) -> None:
    kinds: dict[str, type | tuple[type, ...]] = {
        "int": int,
        "float": (int, float),
        "bool": bool,
        "str": str,
        "url": str,
        "enum": str,
    }
    if isinstance(value, bool) and spec.type in ("int", "float"):
        raise SchemaError(f"{endpoint}: {name} must be a number, not {value!r}")
    if not isinstance(value, kinds[spec.type]):
        raise SchemaError(f"{endpoint}: {name} must be {spec.type}, not {value!r}")
    if spec.type == "enum" and value not in spec.choices:
        raise SchemaError(f"{endpoint}: {name} must be one of {', '.join(spec.choices)}, not {value!r}")
    low, high = spec.minimum, spec.maximum
    number = float(value) if isinstance(value, (int, float)) else 0.0
    if spec.type in ("int", "float") and (
        (low is not None and number < low) or (high is not None and number > high)
    ):
        raise SchemaError(
            f"{endpoint}: {name} = {value:g} is outside the trainer's range {low:g}..{high:g}"
            if low is not None and high is not None
            else f"{endpoint}: {name} = {value:g} is outside the trainer's range"
        )


def field_from_json(where: str, raw: Any) -> Field:
    if not isinstance(raw, dict):
        raise SchemaError(f"{where}: must be a table")
    unknown = set(raw) - {"type", "required", "min", "max", "default", "choices", "role"}
    if unknown:
        raise SchemaError(f"{where}: unknown key {sorted(unknown)[0]!r}")
    if raw.get("type") not in TYPES:
        raise SchemaError(f"{where}.type: one of {', '.join(TYPES)}")
    if raw.get("role") not in (None, *ROLES):
        raise SchemaError(f"{where}.role: one of {', '.join(ROLES)}")
    for key in ("min", "max"):
        if raw.get(key) is not None and not isinstance(raw[key], (int, float)):
            raise SchemaError(f"{where}.{key}: a number")
    return Field(
        type=raw["type"],
        required=bool(raw.get("required", False)),
        minimum=raw.get("min"),
        maximum=raw.get("max"),
        default=raw.get("default"),
        choices=tuple(str(c) for c in raw.get("choices", ())),
        role=raw.get("role"),
    )


def schemas_from_json(text: str, where: str) -> dict[str, Schema]:
    """`{"owner/app": {"trains": [...], "fields": {...}, "usd_per_step": 0.002, "min_steps": 0}}`."""
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise SchemaError(f"{where}: not JSON ({exc})") from None
    if not isinstance(data, dict):
        raise SchemaError(f"{where}: must map endpoint ids to schemas")
    out: dict[str, Schema] = {}
    for endpoint, raw in data.items():
        at = f"{where}: {endpoint}"
        if not isinstance(raw, dict) or not isinstance(raw.get("fields"), dict):
            raise SchemaError(f"{at}: needs a 'fields' table")
        trains = raw.get("trains")
        if not isinstance(trains, list) or not all(isinstance(t, str) for t in trains) or not trains:
            raise SchemaError(f"{at}.trains: a list of lorad model ids")
        price = raw.get("usd_per_step")
        if price is not None and (not isinstance(price, (int, float)) or price < 0):
            raise SchemaError(f"{at}.usd_per_step: a number >= 0")
        fields = {name: field_from_json(f"{at}.fields.{name}", f) for name, f in raw["fields"].items()}
        out[endpoint] = Schema(
            endpoint,
            tuple(trains),
            fields,
            price,
            int(raw.get("min_steps", 0)),
            source=f"{where} (user)",
        )
    return out


@dataclass
class Resolved:
    """The endpoint a model goes to and its schema (a decision, pure)."""

    endpoint: str
    schema: Schema
    notes: list[str] = field(default_factory=list)


def resolve(
    model: str, table: dict[str, str], overrides: dict[str, str], schemas: dict[str, Schema], cloud: str
) -> Resolved:
    """The trainer for `model`, or SchemaError saying why none: an override must name an endpoint
    whose schema is known (built in or given), and the schema must say it trains this model."""
    endpoint = overrides.get(model) or table.get(model)
    if endpoint is None:
        known = ", ".join(sorted(table))
        raise SchemaError(
            f"{cloud}: no trainer for model {model!r} (known: {known}). A model that exists only locally "
            f"(like tiny-z-image) cannot train on {cloud}; to use a trainer lorad does not know, name it "
            f"and its schema in [engines.{cloud}] (endpoints and schemas)"
        )
    schema = schemas.get(endpoint)
    if schema is None:
        raise SchemaError(
            f"{cloud}: endpoint {endpoint!r} (for {model}) has no schema lorad knows; describe its fields "
            f"in a JSON file named by [engines.{cloud}] schemas"
        )
    if model not in schema.trains:
        raise SchemaError(
            f"{cloud}: {endpoint} trains {', '.join(schema.trains)}, not {model}; lorad will not send a "
            f"{model} job to it (it would train another model)"
        )
    return Resolved(endpoint, schema)
