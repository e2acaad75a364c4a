"""The OpenAPI document, completed with what Litestar leaves out of the job schema's msgspec rules.

Litestar drops a constraint nested inside a list, a dict or a union (`list[Text]` loses Text's lengths) and
never says that a struct refuses unknown fields. Left out, schemathesis rightly finds bodies the schema
allows and the API refuses; here every rule of `hoppatch.spec` reaches the document, read from msgspec.
"""

from __future__ import annotations

import msgspec
from litestar import Litestar
from litestar.openapi.spec import OpenAPIType, Schema
from msgspec import inspect

from hoppatch import spec as spec_module

_BRANCH_TYPES = {
    inspect.ListType: OpenAPIType.ARRAY, inspect.DictType: OpenAPIType.OBJECT, inspect.StrType: OpenAPIType.STRING,
    inspect.IntType: OpenAPIType.INTEGER, inspect.FloatType: OpenAPIType.NUMBER,
}


def complete_schemas(app: Litestar) -> None:
    schemas = app.openapi_schema.components.schemas or {}
    for name, struct in vars(spec_module).items():
        if not (isinstance(struct, type) and issubclass(struct, msgspec.Struct)) or name not in schemas:
            continue
        schema = schemas[name]
        if struct.__struct_config__.forbid_unknown_fields:
            schema.additional_properties = False
        for field in inspect.type_info(struct).fields:
            constrain(schema.properties[field.encode_name], field.type)
    # the rules JobSpec.__post_init__ checks, which msgspec cannot state
    schemas["JobSpec"].properties["layers"].one_of[0].unique_items = True
    schemas["JobSpec"].properties["base_patches"].unique_items = True


def constrain(schema: Schema, kind: inspect.Type) -> None:
    """Copy `kind`'s constraints onto `schema`, recursing into items, values and union branches."""
    if not isinstance(schema, Schema):
        return  # a $ref: its component is completed on its own
    if isinstance(kind, inspect.UnionType):
        for branch_kind in kind.types:
            branch = _branch(schema, branch_kind)
            if branch is not None:
                constrain(branch, branch_kind)
        return
    if isinstance(kind, inspect.ListType):
        schema.min_items = schema.min_items if kind.min_length is None else kind.min_length
        schema.max_items = schema.max_items if kind.max_length is None else kind.max_length
        constrain(schema.items, kind.item_type)
    elif isinstance(kind, inspect.DictType):
        schema.max_properties = schema.max_properties if kind.max_length is None else kind.max_length
        constrain(schema.additional_properties, kind.value_type)
    elif isinstance(kind, inspect.StrType):
        schema.min_length = kind.min_length if kind.min_length is not None else schema.min_length
        schema.max_length = kind.max_length if kind.max_length is not None else schema.max_length
        schema.pattern = kind.pattern or schema.pattern
    elif isinstance(kind, (inspect.IntType, inspect.FloatType)):
        schema.minimum = kind.ge if kind.ge is not None else schema.minimum
        schema.maximum = kind.le if kind.le is not None else schema.maximum
        schema.exclusive_minimum = kind.gt if kind.gt is not None else schema.exclusive_minimum
        schema.exclusive_maximum = kind.lt if kind.lt is not None else schema.exclusive_maximum


def _branch(schema: Schema, kind: inspect.Type) -> Schema | None:
    wanted = _BRANCH_TYPES.get(type(kind))
    if wanted is None:
        return None
    if not schema.one_of:
        return schema if schema.type == wanted else None
    return next((b for b in schema.one_of if isinstance(b, Schema) and b.type == wanted), None)
