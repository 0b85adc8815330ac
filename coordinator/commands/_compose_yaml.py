"""Writing compose files: an override of a base file, and a dependency-free YAML writer.

Everything is plain data; ``to_yaml`` writes it (JSON flow style for scalars and lists, which
every YAML parser reads), so generating needs no YAML library.
"""

from __future__ import annotations

import json
import re
from typing import Any

UNUSED_PROFILE = "exegpt-unused"


def override_dict(full: dict[str, Any], base_text: str) -> dict[str, Any]:
    """An override of an exegpt-generated base file: this plan's services replace the base's
    (compose replaces ``command`` wholesale); base workers the plan does not have are moved to
    a profile nobody activates, so ``docker compose up`` does not start them."""
    base_services = set(re.findall(r"^  ([A-Za-z0-9._-]+):\s*$", _services_block(base_text),
                                   re.MULTILINE))
    services = dict(full["services"])
    for name in sorted(base_services - set(services)):
        services[name] = {"profiles": [UNUSED_PROFILE]}
    return {"x-exegpt-plan": full["x-exegpt-plan"], "services": services}


def _services_block(text: str) -> str:
    match = re.search(r"^services:\s*$(.*?)(?=^\S|\Z)", text, re.MULTILINE | re.DOTALL)
    if match is None:
        raise ValueError("the base compose file has no top-level services: block")
    return match.group(1)


def to_yaml(value: Any, indent: int = 0) -> str:
    """Block mappings, JSON flow scalars and lists (valid YAML 1.2, readable, dependency-free)."""
    pad = "  " * indent
    lines = []
    for key, item in value.items():
        if isinstance(item, dict) and item:
            lines.append(f"{pad}{key}:")
            lines.append(to_yaml(item, indent + 1))
        elif isinstance(item, list) and item and all(isinstance(i, str) for i in item) \
                and len(json.dumps(item)) > 80:
            lines.append(f"{pad}{key}:")
            lines += [f"{pad}  - {json.dumps(i)}" for i in item]
        else:
            lines.append(f"{pad}{key}: {json.dumps(item)}")
    return "\n".join(lines)
