"""Read-only JSON containers for verified claims, which verifiers cache and share.

A verifier hands every request bearing one token the same claims. A read-only view of the top
level left the nested objects (``act``, ``tctx``, ``aud``) shared and writable: an app editing
``claims["act"]`` changed what every later request with the token saw. These are ``dict`` and
``list`` subclasses, so ``json.dumps``, ``isinstance`` and comparisons with plain ones work as
before; what would change them raises TypeError, and a copy (``copy.copy``, ``copy.deepcopy``,
``dict(...)``) is an ordinary, writable one.
"""

from __future__ import annotations

import copy
from typing import Any, NoReturn

_READ_ONLY = "verified claims are read-only (shared by every request with the token): edit a copy"


def _refuse(*_: Any, **__: Any) -> NoReturn:
    raise TypeError(_READ_ONLY)


class FrozenDict(dict[str, Any]):
    """A JSON object of verified claims: a dict that refuses changes."""

    __slots__ = ()
    __setitem__ = __delitem__ = __ior__ = _refuse
    clear = pop = popitem = setdefault = update = _refuse

    def __copy__(self) -> dict[str, Any]:
        return dict(self)

    def __deepcopy__(self, memo: dict[int, Any]) -> dict[str, Any]:
        return {key: copy.deepcopy(value, memo) for key, value in self.items()}

    def __reduce__(self) -> tuple[Any, ...]:
        return (FrozenDict, (dict(self),))


class FrozenList(list[Any]):
    """A JSON array of verified claims: a list that refuses changes."""

    __slots__ = ()
    __setitem__ = __delitem__ = __iadd__ = __imul__ = _refuse
    append = extend = insert = remove = pop = clear = sort = reverse = _refuse

    def __copy__(self) -> list[Any]:
        return list(self)

    def __deepcopy__(self, memo: dict[int, Any]) -> list[Any]:
        return [copy.deepcopy(value, memo) for value in self]

    def __reduce__(self) -> tuple[Any, ...]:
        return (FrozenList, (list(self),))


_set_in_dict = dict.__setitem__
_set_in_list = list.__setitem__


def _frozen(value: dict[str, Any] | list[Any], todo: list[Any]) -> FrozenDict | FrozenList:
    frozen = FrozenDict(value) if type(value) is dict else FrozenList(value)
    todo.append(frozen)
    return frozen


def freeze_nested(claims: dict[str, Any]) -> dict[str, Any]:
    """``claims`` (a fresh JSON object, changed in place) with each dict or list in it made a
    Frozen one, at every depth; the top level is left for the caller's own read-only view.

    A loop, not recursion: nesting as deep as the JSON reader took would pass the stack."""
    todo: list[FrozenDict | FrozenList] = []
    for key, value in claims.items():
        if type(value) is dict or type(value) is list:
            claims[key] = _frozen(value, todo)  # a value replaced, no key added: safe
    while todo:
        node = todo.pop()
        if type(node) is FrozenDict:
            for key, value in node.items():
                if type(value) is dict or type(value) is list:
                    _set_in_dict(node, key, _frozen(value, todo))
        else:
            for i, value in enumerate(node):
                if type(value) is dict or type(value) is list:
                    _set_in_list(node, i, _frozen(value, todo))  # type: ignore[arg-type]
    return claims
