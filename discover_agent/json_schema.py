"""JSON Schema <-> `ConstructionSpec`: how a construction's shape travels over the OpenAI API.

Clients send `construction_schema(spec)` in `response_format` so any schema-aware server (vLLM, SGLang,
llama.cpp, OpenAI) returns a well-formed array; `discover serve` reads it back with `spec_from_schema` and
enforces it with the same grammar a local policy uses. Only the schemas that grammar can express are read:
an array of numbers, or an array of fixed-length arrays of numbers, with item counts and number bounds.
"""

from __future__ import annotations

import math
import sys
from typing import Any

from discover_envs.problem import ConstructionSpec

__all__ = ["MAX_BOUND", "UnsupportedSchema", "construction_schema", "out_of_spec", "spec_from_schema"]

_SUPPORTED = (
    'an array of numbers ({"type": "array", "items": {"type": "number", "minimum": .., "maximum": ..}, '
    '"minItems": .., "maxItems": ..}) or an array of fixed-length arrays of such numbers'
)
#: Largest magnitude of a number bound read: the grammar writes plain decimals (no exponent), and integers past
#: 2**53 are not exact floats anyway; a bound of 1e300 would make every number 301 digits long.
MAX_BOUND = 1e15
_NUMBER_KEYS = {"type", "minimum", "maximum", "title", "description"}
_ARRAY_KEYS = {"type", "items", "minItems", "maxItems", "title", "description"}


class UnsupportedSchema(ValueError):
    """A JSON schema that the construction grammar cannot enforce."""


def construction_schema(spec: ConstructionSpec) -> dict[str, Any]:
    """The JSON schema of a construction: array, exact or ranged length, number bounds (infinite ones left out)."""
    number: dict[str, Any] = {"type": "number"}
    if math.isfinite(spec.low):
        number["minimum"] = spec.low
    if math.isfinite(spec.high):
        number["maximum"] = spec.high
    item = number if spec.kind == "sequence" else {
        "type": "array", "items": number, "minItems": spec.arity, "maxItems": spec.arity,
    }  # fmt: skip
    return {"type": "array", "items": item, "minItems": spec.min_length, "maxItems": spec.max_length}


def _array(schema: Any, where: str) -> tuple[Any, int, int]:
    """(items schema, minItems, maxItems) of an array schema, refusing keys the grammar would ignore."""
    if not isinstance(schema, dict) or schema.get("type") != "array":
        raise UnsupportedSchema(f"{where} must be an array schema; this server supports {_SUPPORTED}")
    unknown = set(schema) - _ARRAY_KEYS
    if unknown:
        raise UnsupportedSchema(f"{where} uses unsupported keyword(s) {sorted(unknown)}; supported: {_SUPPORTED}")
    low, high = schema.get("minItems", 0), schema.get("maxItems", sys.maxsize)
    if not (isinstance(low, int) and isinstance(high, int) and 0 <= low <= high):
        raise UnsupportedSchema(f"{where} needs integer 0 <= minItems <= maxItems, got {low!r}, {high!r}")
    return schema.get("items"), low, high


def _bounds(schema: Any, where: str) -> tuple[float, float]:
    if not isinstance(schema, dict) or schema.get("type") != "number":
        raise UnsupportedSchema(f"{where} must be {{'type': 'number', ...}}; this server supports {_SUPPORTED}")
    unknown = set(schema) - _NUMBER_KEYS
    if unknown:
        raise UnsupportedSchema(f"{where} uses unsupported keyword(s) {sorted(unknown)}; supported: {_SUPPORTED}")
    low = _finite(schema["minimum"], f"{where}.minimum") if "minimum" in schema else -math.inf
    high = _finite(schema["maximum"], f"{where}.maximum") if "maximum" in schema else math.inf
    if not low <= high:
        raise UnsupportedSchema(f"{where} has minimum {low} > maximum {high}")
    return low, high


def _finite(value: Any, where: str) -> float:
    """A bound as a float within ±`MAX_BOUND` (so also finite: 10**400 and 1e309 are refused by name)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise UnsupportedSchema(f"{where} must be a number, got {value!r:.40}")
    if not -MAX_BOUND <= value <= MAX_BOUND:
        raise UnsupportedSchema(f"{where} must lie within ±{MAX_BOUND:g}, got {str(value)[:40]}")
    return float(value)


def spec_from_schema(schema: Any) -> ConstructionSpec:
    """The `ConstructionSpec` a schema describes; `UnsupportedSchema` names what the grammar cannot enforce."""
    items, min_length, max_length = _array(schema, "schema")
    if isinstance(items, dict) and items.get("type") == "array":
        numbers, arity, arity_max = _array(items, "schema.items")
        if arity != arity_max or arity < 1:
            raise UnsupportedSchema(f"schema.items needs minItems == maxItems >= 1, got {arity}, {arity_max}")
        low, high = _bounds(numbers, "schema.items.items")
        return ConstructionSpec("tuples", min_length, max_length, low, high, arity=arity)
    low, high = _bounds(items, "schema.items")
    return ConstructionSpec("sequence", min_length, max_length, low, high)


def out_of_spec(value: Any, spec: ConstructionSpec) -> bool:
    """Whether parsed JSON breaks the spec's shape or bounds (for servers that enforce only part of a schema)."""
    if not isinstance(value, list) or not spec.min_length <= len(value) <= spec.max_length:
        return True
    if spec.kind == "tuples":
        if not all(isinstance(item, list) and len(item) == spec.arity for item in value):
            return True
        value = [x for item in value for x in item]
    return not all(
        isinstance(x, (int, float)) and not isinstance(x, bool) and spec.low <= x <= spec.high for x in value
    )
