"""The ``ppml_fast`` operator namespace: each op's schema written once as a string, its kernel
and fake (meta) implementation registered with ``torch.library.Library``.

Why not ``torch.library.custom_op``: its kernels run under ``torch._disable_dynamo``, so the first
op call of a process imported ``torch._dynamo`` (1.3-1.7 s and ~140 MB here, measured with torch
2.13), and torch 2.4-2.6 cannot infer a schema from a ``list[torch.Tensor]`` annotation, so
``import ppml_fast`` failed there. A schema string and ``Library.impl`` work from torch 2.4 on and
cost about half of ``custom_op`` per call (DESIGN.md).

What ``custom_op`` did for us and is done here instead:

- the ``pt2_compliant_tag`` (the ops trace under ``torch.compile(fullgraph=True)``);
- a ``Meta`` kernel and a fake implementation (``torch.library.register_fake``);
- the version counters of mutated tensors are bumped (autograd then refuses a backward through a
  value the op overwrote, as for any in-place torch op): kernels call :func:`bump_versions`.

- a backward through an output of a functional op (``clip_and_accumulate``,
  ``weighted_aggregate``) raises instead of silently giving no gradient: the ops take gradients,
  they are not differentiated. The in-place ops mutate their inputs like any in-place torch op.
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch

NAMESPACE = "ppml_fast"

LIB = torch.library.Library(NAMESPACE, "DEF")


def define(schema: str, kernel: Callable, fake: Callable) -> None:
    """Define ``ppml_fast::<name>`` from ``schema`` (``"name(Tensor x, ...) -> ..."``) with one
    kernel for every device (it routes CPU and CUDA itself and names any other device in its
    error) and ``fake`` for tracing (FakeTensor, meta tensors)."""
    name = schema.split("(", 1)[0]
    LIB.define(schema, tags=(torch.Tag.pt2_compliant_tag,))
    LIB.impl(name, kernel, "CompositeExplicitAutograd")
    torch.library.register_fake(f"{NAMESPACE}::{name}", fake, lib=LIB)
    if "!" not in schema:  # functional: outputs that may require grad
        torch.library.register_autograd(f"{NAMESPACE}::{name}", _no_backward(name), lib=LIB)


def _no_backward(name: str) -> Callable:
    def backward(ctx, *grads):
        raise RuntimeError(
            f"{NAMESPACE}::{name} is not differentiable (its outputs are clipped or aggregated "
            "gradients, not functions to differentiate); detach its inputs or its outputs"
        )

    return backward


def bump_versions(tensors: Iterable[torch.Tensor]) -> None:
    """Mark ``tensors`` as modified in place (the native kernels write through raw pointers,
    which autograd cannot see)."""
    for t in tensors:
        torch.autograd.graph.increment_version(t)
