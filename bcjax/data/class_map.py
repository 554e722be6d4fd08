"""How an external set's classes are scored by a model's classes.

The rules (``bcjax.evaluate`` applies them; nothing is guessed, not even letter case):
1. ``drop``: the external images of these classes are left out.
2. ``class_map`` {external: model}: external class ``external`` is scored as the
   model's class ``model``; several external classes may map onto one.
3. Every remaining external class must then be a model class; otherwise
   ClassMapError lists both sides and what does not match.
4. A subset of the model's classes is allowed (metrics are over those present).
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["ClassMapError", "map_classes", "parse_class_map"]


class ClassMapError(ValueError):
    """An external set or class mapping that cannot be used; the message says why."""


def parse_class_map(items: Sequence[str]) -> dict[str, str]:
    """``["a=b,c=d", "e=f"]`` -> ``{"a": "b", "c": "d", "e": "f"}`` (external -> model)."""
    mapping: dict[str, str] = {}
    for item in items:
        for pair in filter(None, (p.strip() for p in item.split(","))):
            external, sep, model = (s.strip() for s in pair.partition("="))
            if not sep or not external or not model:
                raise ClassMapError(f"--class-map wants EXTERNAL=MODEL pairs, got {pair!r}")
            if external in mapping:
                raise ClassMapError(f"--class-map maps {external!r} twice")
            mapping[external] = model
    return mapping


def _listed(names) -> str:
    return ", ".join(map(repr, names)) or "(none)"


def map_classes(
    model_classes: Sequence[str],
    external_classes: Sequence[str],
    class_map: dict[str, str],
    drop: Sequence[str] = (),
) -> dict[str, str]:
    """The model class each kept external class is scored as (rules 2-4 of the module doc).

    Dropped classes are left out of the result. ClassMapError when a rule is broken.
    """
    model_classes, external_classes = tuple(model_classes), tuple(external_classes)
    named = {**{c: "--drop-class" for c in drop}, **{c: "--class-map" for c in class_map}}
    for name, flag in named.items():
        if name not in external_classes:
            raise ClassMapError(
                f"{flag} names {name!r}, which is not a class of the external "
                f"set; its classes are {_listed(external_classes)}"
            )
    both = sorted(set(drop) & set(class_map))
    if both:
        raise ClassMapError(f"{_listed(both)} both mapped and dropped; choose one")
    unknown_targets = sorted({m for m in class_map.values() if m not in model_classes})
    if unknown_targets:
        raise ClassMapError(
            f"--class-map maps onto {_listed(unknown_targets)}, not a class of "
            f"the model; its classes are {_listed(model_classes)}"
        )
    mapping = {c: class_map.get(c, c) for c in external_classes if c not in drop}
    if not mapping:
        raise ClassMapError("--drop-class leaves no class of the external set to score")
    unmatched = [c for c in mapping if mapping[c] not in model_classes]
    if unmatched:
        absent = [c for c in model_classes if c not in mapping.values()]
        raise ClassMapError(
            "the external set's classes do not match the model's.\n"
            f"  model ({len(model_classes)}): {_listed(model_classes)}\n"
            f"  external set ({len(external_classes)}): {_listed(external_classes)}\n"
            f"  not classes of the model: {_listed(unmatched)}\n"
            f"  model classes without external images: {_listed(absent)}"
            " (allowed: metrics are then over the classes present)\n"
            "Map a class with --class-map EXTERNAL=MODEL[,...] or leave its images out with "
            "--drop-class NAME."
        )
    return mapping
