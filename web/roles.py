"""The roles of API keys, and where each route's least role is declared.

Roles are ordered: ``viewer`` reads, ``operator`` also acknowledges alerts and sends commands,
``admin`` also manages devices and API keys. A route declares its least role with
:func:`web.auth.requires`, which records it on the view function (:func:`declare`); this
module reads it back (:func:`required_role`) for the OpenAPI document (``x-required-role``,
``web.openapi``) and for the test that walks ``/openapi.json`` and checks every route with every
role. That one declaration is what the app enforces and what the test checks.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Final, Literal

from web.services import WebServices

Role = Literal["viewer", "operator", "admin"]

#: Name of the OpenAPI security scheme (see ``web.app``).
SECURITY_SCHEME: Final = "bearer"

#: Higher includes lower. Spelled out rather than derived from the order of
#: storage.secrets.ROLES, so that reordering that tuple cannot grant anyone more.
RANK: Final[dict[str, int]] = {"viewer": 1, "operator": 2, "admin": 3}

#: A predicate on the node's services: the role is needed only when it holds (a setting).
Condition = Callable[[WebServices], bool]

_ROLE_ATTRIBUTE: Final = "_depot_node_required_role"
_CONDITION_ATTRIBUTE: Final = "_depot_node_role_condition"


def has_role(role: str, needed: Role) -> bool:
    return RANK.get(role, 0) >= RANK[needed]


def declare(view: Callable[..., Any], role: Role, condition: Condition | None) -> None:
    setattr(view, _ROLE_ATTRIBUTE, role)
    setattr(view, _CONDITION_ATTRIBUTE, condition)


def required_role(view: Callable[..., Any], svc: WebServices) -> Role | None:
    """The least role *view* needs on a node with services *svc*; None when it is open."""
    role: Role | None = getattr(view, _ROLE_ATTRIBUTE, None)
    condition: Condition | None = getattr(view, _CONDITION_ATTRIBUTE, None)
    if role is None or (condition is not None and not condition(svc)):
        return None
    return role


def is_conditional(view: Callable[..., Any]) -> bool:
    """Whether *view*'s key requirement depends on configuration (documented per node)."""
    return getattr(view, _CONDITION_ATTRIBUTE, None) is not None
