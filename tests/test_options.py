"""ExplainOptions: every field checked once, at construction, with a one-line error naming it."""

from __future__ import annotations

import dataclasses

import pytest

from gmar_lightning import ExplainOptions, TokenLayout


@pytest.mark.parametrize(
    ("fields", "error", "pattern"),
    [
        ({"residual": 1.5}, ValueError, r"`residual` must lie in \[0.0, 1.0\], got 1.5"),
        ({"residual": "0.5"}, ValueError, r"`residual`"),
        ({"head_norm": "max"}, ValueError, r"`head_norm` must be one of 'layer', 'global'; got 'max'"),
        ({"discard_ratio": 1.0}, ValueError, r"`discard_ratio` must lie in \[0.0, 1.0\), got 1.0"),
        ({"start_layer": -1}, ValueError, r"`start_layer` must be a non-negative integer"),
        ({"chunk_size": 0}, ValueError, r"`chunk_size` must be a positive integer or None, got 0"),
        ({"token_layout": (1, 0)}, TypeError, r"`token_layout` must be a TokenLayout or None, got tuple"),
    ],
)
def test_bad_fields_fail_at_construction(fields: dict, error: type, pattern: str) -> None:
    with pytest.raises(error, match=pattern):
        ExplainOptions(**fields)


def test_from_mapping_names_an_unknown_key_and_the_valid_ones() -> None:
    with pytest.raises(ValueError, match=r"`explain_options` has unknown key 'residul'; valid keys: residual, head"):
        ExplainOptions.from_mapping({"residul": 0.3})
    with pytest.raises(TypeError, match=r"`explain_options` must be a dict or an ExplainOptions, got list"):
        ExplainOptions.from_mapping([("residual", 0.3)])  # type: ignore[arg-type]


def test_options_are_frozen_and_round_trip_as_keyword_arguments() -> None:
    options = ExplainOptions.from_mapping({"residual": 0.3, "token_layout": TokenLayout(num_prefix_tokens=2)})
    assert ExplainOptions(**options.as_kwargs()) == options
    assert ExplainOptions.from_mapping(options) is options
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.residual = 0.9  # type: ignore[misc]
