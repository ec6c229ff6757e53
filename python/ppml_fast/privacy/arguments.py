"""The arguments of a private forward as the records probe sees them (:mod:`records`): the
tensors in them (:func:`leaves`, through tuples, lists, mappings and dataclasses), the key of a
verified input layout (:func:`layout`: tensors' shapes without the batch, the arguments'
structure and non-tensor values), what the probe cannot reach (:func:`hidden_tensors`: tensors
in other objects, found by a fail-closed walk, and per-record values in Python lists), and the
arguments rebuilt with one tensor replaced (:func:`replace`, :func:`check_replaced`).

Each rule here closes a way a record reached a DP step unprobed (review S9, four red-team
rounds; the numbers are one record's effect on a noise-0 step, bound C): records in a dataclass
argument (2.8 C), in a UserDict (2.8 C), in a closure, a partial, a deque, inherited slots, a
tensor attribute or deeper than four levels (2.8 C); a flag argument (2.5 C), an enum, numpy or
config-object flag (2.4 C), a 0-dim or 65-element tensor flag, -0.0 after 0.0 (1.8 C each); a
(1, D) tensor probed before the (B, D) one (2.8 C); per-record lengths in a Python list (1.6 C).
Where the walk cannot tell (an attribute that raises, deeper than :data:`_DEPTH`, an iterator
it would consume), it fails closed: the argument counts as holding a tensor and is refused.
"""

from __future__ import annotations

import collections.abc
import copy
import dataclasses
import enum
import functools
import hashlib
import itertools
import types
from typing import Any, Optional

import torch

from ppml_fast.privacy.layers import UnsupportedModuleError


def _is_dataclass(obj: Any) -> bool:
    return dataclasses.is_dataclass(obj) and not isinstance(obj, type)


_NEST = 64  # container levels leaves() follows (a list that holds itself is refused)


def _mapping(obj: Any) -> bool:
    try:
        return isinstance(obj, dict) or hasattr(obj, "values") and hasattr(obj, "keys")
    except Exception:  # a __getattr__ that raises something else than AttributeError
        return False


def leaves(obj: Any, depth: int = 0) -> list[torch.Tensor]:
    """The tensors in ``obj`` (tensors, lists, tuples, dicts, Hugging Face ModelOutputs,
    dataclass instances), in order. Tensors held by other objects are not leaves: an input that
    holds them is refused by the probe (:func:`hidden_tensors`); an output's are not outputs
    (a model's cache object: its tensors are intermediates of the listed outputs)."""
    if isinstance(obj, torch.Tensor):
        return [obj]
    if depth > _NEST:
        raise UnsupportedModuleError(
            f"the model's arguments or outputs are nested more than {_NEST} containers deep (a "
            "list that holds itself?): ppml_fast cannot list their tensors")
    if _mapping(obj):
        return [t for v in obj.values() for t in leaves(v, depth + 1)]
    if isinstance(obj, (list, tuple)):
        return [t for v in obj for t in leaves(v, depth + 1)]
    if _is_dataclass(obj):  # review S9: records in a dataclass argument were never perturbed
        return [t for f in dataclasses.fields(obj) for t in leaves(getattr(obj, f.name), depth + 1)]
    return []


def record_dim(t: torch.Tensor, batch_first: bool) -> int:
    return 0 if batch_first or t.dim() < 2 else 1


def primary(args: tuple, kwargs: dict) -> Optional[torch.Tensor]:
    """The input tensor whose leading (record) dimension gives the batch size: the first tensor
    of at least one dimension in the inputs, also inside lists, tuples, dicts and dataclasses."""
    return next((t for t in leaves(list(args) + list(kwargs.values())) if t.dim() > 0), None)


_SCALARS = (bool, int, float, complex, str, bytes, type(None), torch.dtype, torch.device,
            torch.layout, torch.memory_format)
_DEPTH = 4  # levels of objects walked; deeper structure counts as holding tensors (fail closed)
_ITEMS = 256  # items of one container walked; more count as holding tensors


def _scalar_value(obj: Any) -> Any:
    """A hashable value for scalar-like objects (enum members, numpy scalars), or the object."""
    if isinstance(obj, enum.Enum):
        return obj.value if isinstance(obj.value, _SCALARS) else id(obj)
    item = getattr(obj, "item", None)
    if type(obj).__module__ == "numpy" and callable(item) and getattr(obj, "ndim", 1) == 0:
        return item()
    return obj


_SMALL = 64  # a tensor without the records in its record dimension, at most this many
#               elements: keyed by value (a 0-dim flag tensor; review S9 round 3: 1.8 C)


def _spec(obj: Any, sig: list, batch_first: bool, depth: int = 0, size: int = -1) -> Any:
    """The structure of an argument for :func:`layout`: tensors appended to ``sig`` (dtype and
    sizes other than the record dimension), scalars (also enum members and numpy scalars) by
    value, containers by type and keys, dataclasses and other objects by their attributes'
    specs, callables and what is too deep by the object itself (kept alive by the key: its id
    cannot be reused), so a flag inside a config object is part of the layout (review S9)."""
    if isinstance(obj, torch.Tensor):
        d = record_dim(obj, batch_first)
        per_record = obj.dim() > d and obj.shape[d] == size
        # the record dimension masked only where it holds the batch (a (1, D) tensor probed
        # first is not the (B, D) one: review S9 round 3, 2.8 C)
        sig.append((obj.dtype, tuple(s if i != d or not per_record else -1
                                     for i, s in enumerate(obj.shape))))
        return "T" if per_record else ("T", tensor_value(obj))
    if isinstance(obj, float):  # by its bits: -0.0 is not 0.0, a NaN equals itself
        return (float, obj.hex())
    if isinstance(obj, complex):
        return (complex, obj.real.hex(), obj.imag.hex())
    if isinstance(obj, _SCALARS):
        return (type(obj), obj)
    if isinstance(obj, enum.Enum) or type(obj).__module__ == "numpy":
        if type(obj).__name__ == "ndarray" and getattr(obj.dtype, "hasobject", True) is False:
            return (type(obj), str(obj.dtype), tuple(obj.shape), _digest(obj.tobytes()))
        value = _scalar_value(obj)
        if value is not obj:
            return _spec(value, sig, batch_first, depth, size) if isinstance(value, float) \
                else (type(obj), value)
    try:
        return _spec_object(obj, sig, batch_first, depth, size)
    except UnsupportedModuleError:
        raise
    except Exception:  # an object whose attributes raise: keyed by itself
        return (type(obj), "object", _Held(obj))


def tensor_value(t: torch.Tensor) -> tuple:
    """A key of a tensor's contents, bit for bit (a tensor that is not per record: a flag, a
    shared mask; review S9 rounds 3-4: 1.8 C for a 0-dim flag, 1.8 C for one of 65 elements):
    its bytes up to 64 elements, a 16-byte BLAKE2 digest of them beyond (a CUDA tensor is
    copied to the host for it)."""
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    raw = t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
    return (t.dtype, tuple(t.shape), raw if t.numel() <= _SMALL else _digest(raw))


def _digest(raw: bytes) -> bytes:
    return hashlib.blake2b(raw, digest_size=16).digest()


def _spec_object(obj: Any, sig: list, batch_first: bool, depth: int, size: int) -> Any:
    if depth > _DEPTH:
        return (type(obj), "object", _Held(obj))
    if isinstance(obj, (list, tuple)) and len(obj) > _ITEMS and not isinstance(obj[0], torch.Tensor):
        return (type(obj), "object", len(obj), _Held(obj))  # a long list of values: by identity
    if _mapping(obj):
        return (type(obj), tuple((k, _spec(v, sig, batch_first, depth + 1, size)) for k, v in obj.items()))
    if isinstance(obj, (list, tuple)):
        return (type(obj), tuple(_spec(v, sig, batch_first, depth + 1, size) for v in obj))
    if _is_dataclass(obj):
        return (type(obj), tuple((f.name, _spec(getattr(obj, f.name), sig, batch_first, depth + 1, size))
                                 for f in dataclasses.fields(obj)),
                _attrs_spec(obj, sig, batch_first, depth, {f.name for f in dataclasses.fields(obj)}))
    if callable(obj) or isinstance(obj, (set, frozenset)) or not _attrs(obj):
        return (type(obj), "object", _Held(obj))
    return (type(obj), "attrs", _attrs_spec(obj, sig, batch_first, depth, set()))


class _Held:
    """An object in a layout key by identity, held so that its id is not reused."""

    __slots__ = ("obj",)

    def __init__(self, obj: Any) -> None:
        self.obj = obj

    def __eq__(self, other: Any) -> bool:
        return isinstance(other, _Held) and other.obj is self.obj

    def __hash__(self) -> int:
        return id(self.obj)


def _attrs(obj: Any) -> dict:
    """An object's attributes: its ``__dict__`` and the ``__slots__`` of every class of its MRO."""
    try:
        attrs = object.__getattribute__(obj, "__dict__")
    except Exception:
        attrs = None
    out = dict(attrs) if isinstance(attrs, dict) else {}
    for cls in type(obj).__mro__:
        slots = cls.__dict__.get("__slots__", ())
        for name in ([slots] if isinstance(slots, str) else slots or ()):
            if isinstance(name, str) and name not in ("__dict__", "__weakref__"):
                try:
                    out[name] = object.__getattribute__(obj, name)
                except AttributeError:
                    pass
                except Exception:  # a property shadowing the slot raised: cannot look inside
                    out[name] = _UNKNOWN
    return out


def _attrs_spec(obj: Any, sig: list, batch_first: bool, depth: int, skip: set) -> tuple:
    # tensors in attributes are refused by hidden_tensors: specs without their shapes
    return tuple((k, _spec(v, [], batch_first, depth + 1)) for k, v in _attrs(obj).items()
                 if k not in skip)


_UNKNOWN = object()  # an attribute that could not be read: counts as holding a tensor


def _holds_tensor(obj: Any) -> bool:
    """Whether an object :func:`leaves` does not look into may hold a tensor (:func:`_collect`)."""
    found: list = []
    return not _collect(obj, 0, found) or bool(found)


def tensors_in(obj: Any) -> tuple[bool, list]:
    """(whether the walk was complete, the tensors found) of :func:`_collect`."""
    found: list = []
    return _collect(obj, 0, found), found


def _collect(obj: Any, depth: int, found: list) -> bool:
    try:
        return _collect_unsafe(obj, depth, found)
    except RecursionError:
        return False
    except Exception:  # attribute access or iteration raised: cannot tell (fail closed)
        return False


def _collect_unsafe(obj: Any, depth: int, found: list) -> bool:
    """Appends to ``found`` the tensors ``obj`` holds: in its attributes (``__dict__``, the
    ``__slots__`` of its classes), in lists, tuples, sets, dicts and other collections among
    them, in a function's closure, defaults or bound ``self``, in a ``functools.partial``'s
    function and arguments. False where it cannot tell (fail closed: deeper than
    :data:`_DEPTH` levels, more than :data:`_ITEMS` items, an iterator it would consume;
    review S9 hid records five levels deep, in a closure, a partial, a deque, parent slots)."""
    if isinstance(obj, torch.Tensor):
        found.append(obj)
        return True
    if obj is _UNKNOWN:
        return False
    if isinstance(obj, _SCALARS) or isinstance(obj, (type, enum.Enum, types.ModuleType, range)):
        return True
    if type(obj).__module__ == "numpy" and getattr(getattr(obj, "dtype", None), "hasobject", True) is False:
        return True  # a numpy array or scalar of numbers
    if depth > _DEPTH:
        return False
    if isinstance(obj, (types.BuiltinFunctionType, types.BuiltinMethodType)):
        return _collect(getattr(obj, "__self__", None), depth + 1, found)
    values: list = []
    if _mapping(obj) and callable(obj.values):
        values = list(obj.values())
    elif isinstance(obj, (list, tuple, set, frozenset)):
        values = list(obj)
    elif isinstance(obj, collections.abc.Iterator):
        return False  # cannot be looked into without consuming it
    elif isinstance(obj, collections.abc.Collection):  # deque, array, ...: its items
        values = list(itertools.islice(iter(obj), _ITEMS + 1))
    elif isinstance(obj, functools.partial):
        values = [obj.func, obj.args, obj.keywords]
    elif isinstance(obj, types.MethodType):
        values = [obj.__self__, obj.__func__]
    elif isinstance(obj, types.FunctionType):
        cells = obj.__closure__ or ()
        values = [c.cell_contents for c in cells if _cell_full(c)]
        values += [obj.__defaults__ or (), obj.__kwdefaults__ or {}]
    if type(obj) not in (dict, list, tuple, set, frozenset) and not isinstance(obj, types.FunctionType):
        values += list(_attrs(obj).values())  # also a mapping's own attributes (its values may lie)
    if len(values) > _ITEMS:
        return False
    return all(_collect_unsafe(v, depth + 1, found) for v in values)


def _cell_full(cell) -> bool:
    try:
        cell.cell_contents
    except ValueError:  # an empty cell
        return False
    return True


def _per_record_values(obj: Any, size: int) -> bool:
    """A list or tuple of ``size`` numbers, or a numpy array with ``size`` entries in a
    dimension: per-record values the probe can neither perturb nor check (review S9 round 3: a
    list of lengths scaling each record by its length over the longest, 1.6 C)."""
    if size < 2:
        return False
    if type(obj).__module__ == "numpy" and hasattr(obj, "shape") and getattr(obj, "ndim", 0) >= 1:
        return size in tuple(obj.shape)
    return (isinstance(obj, (list, tuple)) and len(obj) == size
            and all(isinstance(v, (int, float, complex)) for v in obj))


def hidden_tensors(args: tuple, kwargs: dict, size: int = -1) -> list[str]:
    """The types of the arguments' objects that hold tensors :func:`leaves` does not reach (the
    probe could neither perturb nor check what they hold: refused by :func:`verify`): objects
    other than tuples, lists, mappings and dataclasses, a dataclass's attributes that are not
    fields, and attributes of the tensors themselves."""
    out: list[str] = []

    def walk(obj: Any, depth: int = 0) -> None:
        try:
            visit(obj, depth)
        except Exception:  # attribute access raised, or nested past any reason: fail closed
            out.append(type(obj).__qualname__)

    def visit(obj: Any, depth: int) -> None:
        if depth > _NEST:
            out.append(type(obj).__qualname__)
            return
        if isinstance(obj, torch.Tensor):
            if _attrs(obj) and _holds_tensor(_attrs(obj)):  # t.feats = records
                out.append(f"{type(obj).__qualname__} attribute")
            return
        if isinstance(obj, _SCALARS):
            return
        if _per_record_values(obj, size):
            out.append(f"{type(obj).__qualname__} of {size} numbers (per-record values?)")
            return
        if _mapping(obj):
            for v in obj.values():
                walk(v, depth + 1)
            if type(obj) is not dict:  # tensors in its attributes that its values do not list
                found: list = []
                listed = {id(t) for t in leaves(obj)}
                if not _collect(_attrs(obj), 0, found) or any(id(t) not in listed for t in found):
                    out.append(type(obj).__qualname__)
        elif isinstance(obj, (list, tuple)):
            for v in obj:
                walk(v, depth + 1)
        elif _is_dataclass(obj):
            fields = {f.name for f in dataclasses.fields(obj)}
            for name in fields:
                walk(getattr(obj, name), depth + 1)
            extra = {k: v for k, v in _attrs(obj).items() if k not in fields}
            if extra and _holds_tensor(extra):
                out.append(type(obj).__qualname__)
        elif _holds_tensor(obj):
            out.append(type(obj).__qualname__)

    walk((args, kwargs))
    return out


def hidden_refusal(hidden: list[str]) -> str:
    return (f"the model's arguments hold tensors or per-record values inside "
            f"{sorted(set(hidden))[:3]}, which ppml_fast's records probe cannot reach (it "
            "perturbs each record in every input tensor to prove that the layers' rows are "
            "records): pass tensors directly, or in lists, tuples, dicts or dataclasses, and "
            "per-record values as tensors")


def layout(args: tuple, kwargs: dict, batch_first: bool, training: bool, size: int = -1) -> tuple:
    """What identifies a verified input layout: every input tensor's rank, dtype and sizes other
    than the record dimension, the arguments' structure with their non-tensor values (review
    S9: ``model(x, center=True)`` after a probe of ``model(x, center=False)`` was never probed:
    2.5 C), and the training flag. A scalar argument that changes every call (a step counter)
    makes every call a new layout, probed again: correct, and as slow as that."""
    sig: list = []
    spec = _spec((args, kwargs), sig, batch_first, 0, size)
    return spec, tuple(sig), bool(training)


def value_key(obj: Any) -> Any:
    """A hashable key of a non-tensor argument's value, as :func:`layout` keys it (tensors in it
    by their contents)."""
    return _spec(obj, [], True)


def _swap(obj: Any, old: torch.Tensor, new: torch.Tensor) -> Any:
    if obj is old:
        return new
    if _mapping(obj):
        items = {k: _swap(v, old, new) for k, v in obj.items()}
        if all(v is obj[k] for k, v in items.items()):
            return obj
        if type(obj) is dict:
            return items
        try:  # a mapping of another type (UserDict, transformers' BatchEncoding): a copy, set
            out = copy.copy(obj)
            for k, v in items.items():
                out[k] = v
            return out
        except Exception:  # not rebuilt: _check_replaced refuses
            return obj
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # namedtuple
        return type(obj)(*(_swap(v, old, new) for v in obj))
    if isinstance(obj, (list, tuple)):
        return type(obj)(_swap(v, old, new) for v in obj)
    if _is_dataclass(obj):  # a shallow copy with the fields swapped (frozen ones too)
        fields = {f.name: _swap(getattr(obj, f.name), old, new) for f in dataclasses.fields(obj)}
        if all(fields[n] is getattr(obj, n) for n in fields):
            return obj
        out = copy.copy(obj)
        for n, v in fields.items():
            object.__setattr__(out, n, v)
        return out
    return obj


def replace(args: tuple, kwargs: dict, old: torch.Tensor, new: torch.Tensor):
    return tuple(_swap(a, old, new) for a in args), {n: _swap(a, old, new) for n, a in kwargs.items()}


def check_replaced(args: tuple, kwargs: dict, swaps: dict) -> None:
    """Fail closed: a tensor the probe replaced must be gone from the arguments it runs on
    (review S9: records in a UserDict were never replaced, 2.8 C)."""
    left = {id(t) for t in leaves(list(args) + list(kwargs.values()))} & set(swaps)
    if left:
        raise UnsupportedModuleError(
            "ppml_fast's records probe could not replace an input tensor inside the model's "
            "arguments (a container it cannot rebuild): pass tensors directly, or in tuples, "
            "lists, dicts or dataclasses")
