"""Edits a tuner makes to its base model's config, undone when the last tuner using them unloads.

Two models built from one config object (`LlamaForCausalLM(cfg)` twice) share it, so a tuner on the second finds
the first one's edits already there: it must neither take them for the base's own (an `output_router_logits` written
by a tuner is not a native Mixture-of-Experts base's, which TRL would ask for router logits a dense base has not) nor
undo them while the first model still uses them. Each edit of a config is kept once, with the number of tuners using
it and what undoes it; the config is held by a weak reference (a config is unhashable: it defines `__eq__`).
"""

from __future__ import annotations

import weakref
from typing import Any

# (id(config), edit name) -> [weak reference to the config, tuners using the edit, the state that undoes it]
_EDITS: dict[tuple[int, str], list] = {}


def edited(config: Any, edit: str) -> bool:
    """Whether a tuner made `edit` on this config object and a tuner still uses it."""
    entry = _EDITS.get((id(config), edit))
    return entry is not None and entry[0]() is config


def join_edit(config: Any, edit: str, undo: Any = None) -> None:
    """Count a tuner among the users of `edit` on `config`; the first one (which made the edit) gives `undo`."""
    key = (id(config), edit)
    if edited(config, edit):
        _EDITS[key][1] += 1
        return
    _EDITS[key] = [weakref.ref(config, lambda _, key=key: _EDITS.pop(key, None)), 1, undo]


def leave_edit(config: Any, edit: str) -> tuple[bool, Any]:
    """Uncount a tuner: (whether it was the last user, so the edit is to be undone, and the `undo` state)."""
    if not edited(config, edit):
        return False, None
    entry = _EDITS[(id(config), edit)]
    entry[1] -= 1
    if entry[1] > 0:
        return False, None
    del _EDITS[(id(config), edit)]
    return True, entry[2]
