"""Reading parameter files and ``-y`` strings: flat YAML mappings of ``name: value``.

Why its own module: ``hb run``, ``load_config`` and papermill must read the same file alike, so this
uses papermill's own loader (dates stay text) and adds the one check YAML lacks: a parameter given
twice is an error, not "the last one wins". Names and types are checked later by
:mod:`hb_utils.config`; errors here are :class:`~hb_utils.errors.ConfigError` too.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from hb_utils.errors import ConfigError


class _DuplicateKey(yaml.YAMLError):
    """A mapping names the same parameter twice."""


def params_loader() -> type[yaml.SafeLoader]:
    """The YAML loader of parameter files and ``-y`` strings: papermill's own (``-f``/``-y`` read with
    ``papermill.iorw.NoDatesSafeLoader``: safe, dates stay text), so ``hb run`` and ``papermill`` read a file
    alike, refusing duplicate keys, which YAML would settle silently by keeping the last one."""
    from papermill.iorw import NoDatesSafeLoader  # imported here: papermill pulls in nbformat (seconds)

    class ParamsLoader(NoDatesSafeLoader):
        def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
            seen: dict[Any, int] = {}
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=True)
                line = key_node.start_mark.line + 1
                if key in seen:
                    raise _DuplicateKey(f"parameter {key!r} is given twice (lines {seen[key]} and {line}); "
                                        "YAML would silently keep the last. Delete one.")
                seen[key] = line
            return super().construct_mapping(node, deep=deep)

    return ParamsLoader


def parse_params_yaml(text: str, origin: str) -> dict[str, Any]:
    """A flat ``name: value`` mapping from YAML text (a parameter file or an ``-y`` string)."""
    try:
        data = yaml.load(text, Loader=params_loader()) or {}  # noqa: S506 - a SafeLoader subclass
    except _DuplicateKey as exc:
        raise ConfigError(f"{origin}: {exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{origin} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{origin} must be a flat mapping of name: value.")
    return data


def read_params_file(path: str | Path) -> dict[str, Any]:
    """Read a flat YAML parameter file (the same file papermill takes with ``-f``)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"Parameter file {str(path)!r} does not exist. "
                          "Pass a file from params/, e.g. params/smoke.yaml.")
    return parse_params_yaml(path.read_text(), f"Parameter file {str(path)!r}")
