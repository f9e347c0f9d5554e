"""Shared config blocks, for configs that `from common import base`: the schema itself lives in
`facejax/config_schema.py` (import it from there)."""

from facejax.config_schema import (augment, base, data, evaluate, index, keras_transfer,  # noqa: F401
                                   model, train)
