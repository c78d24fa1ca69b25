"""One default per setting: the config field. The command line's flags are the fields' spellings
(`sleb.config.FLAGS`), and every flag's default is its field's."""

from __future__ import annotations

from dataclasses import fields, is_dataclass

import click
import pytest

import sleb
from sleb.cli import prune as prune_command
from sleb.config import FLAGS, PruneConfig
from sleb.settings import Budget, Racing


def _field_defaults() -> dict[str, object]:
    """Dotted setting -> its default, from the dataclasses (parts that default to None take their class's)."""
    out = {}
    for f in fields(PruneConfig):
        if f.name in ("budget", "racing"):
            part = Budget() if f.name == "budget" else Racing()
        elif f.default is not None and is_dataclass(f.default):
            part = f.default
        else:
            out[f.name] = f.default
            continue
        out.update({f"{f.name}.{p.name}": getattr(part, p.name) for p in fields(part)})
    return out


def test_every_named_flag_exists_and_defaults_to_its_field():
    options = {max(p.opts, key=len): p for p in prune_command.params if isinstance(p, click.Option)}
    defaults = _field_defaults()
    missing = sorted(flag for flag in FLAGS.values() if flag != "MODEL" and flag not in options)
    assert missing == [], f"FLAGS names flags that `sleb prune` does not have: {missing}"
    differ = []
    for setting, flag in FLAGS.items():
        option = options.get(flag)
        if option is None or option.is_flag or setting not in defaults or setting == "budget.speedup_context":
            continue
        given = option.default
        if isinstance(given, (int, float, str)) and given != defaults[setting]:  # (no default: click's sentinel)
            differ.append(f"{flag}: {option.default!r} vs {setting} = {defaults[setting]!r}")
    assert differ == [], differ


def test_search_takes_typed_options_and_keywords_override_them():
    from sleb.search import _settings

    options, racing = _settings(sleb.SearchOptions(batch_size=4), None, {"seed": 3})
    assert options == sleb.SearchOptions(batch_size=4, seed=3) and racing is None
    options, racing = _settings(None, True, {"confidence": 0.8})
    assert racing == sleb.Racing(confidence=0.8)
    with pytest.raises(sleb.BadInput, match="racing=True"):
        _settings(None, None, {"tolerance": 0.1})
    with pytest.raises(TypeError, match="nope"):
        _settings(None, None, {"nope": 1})
