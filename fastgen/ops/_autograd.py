"""Autograd of fastgen's custom ops: what every op's backward shares.

An op's torch path is the reference, differentiated by autograd: its backward reruns the
reference's forward on the saved inputs and asks autograd for the gradients
(``reference_grads``), so they are autograd's own, bit for bit as when the reference is called
directly, a double backward works, and torch.compile traces them as plain torch ops. An op's
Triton path has a backward custom op that returns only the gradients asked for (``scattered`` puts
them back in place).
"""
import torch


def reference_grads(fn, inputs, needs, grad_outputs):
    """Autograd's gradients of ``fn(*inputs)`` (a tensor or a tuple of tensors) for the inputs
    flagged in ``needs`` (None for the others), given ``grad_outputs``, one per output; an output
    whose gradient is None takes no part (as when it is unused)."""
    grad_outputs = grad_outputs if isinstance(grad_outputs, tuple) else (grad_outputs,)
    wrt = [i for i, need in enumerate(needs) if need]
    used = [i for i, g in enumerate(grad_outputs) if g is not None]
    if not wrt or not used:
        return (None,) * len(needs)
    create_graph = torch.is_grad_enabled()  # a backward that is itself differentiated (double backward)
    with torch.enable_grad():
        args = [_own_node(t) if need else t for t, need in zip(inputs, needs)]
        outs = fn(*args)
        outs = outs if isinstance(outs, tuple) else (outs,)
        grads = torch.autograd.grad([outs[i] for i in used], [args[i] for i in wrt],
                                    [grad_outputs[i] for i in used], create_graph=create_graph, allow_unused=True)
    return scattered(needs, grads)


def _own_node(t):
    """``t`` as a new autograd node, so a tensor passed in two places gets each place's gradient
    (not their sum twice); still connected to ``t`` when ``t`` requires grad (double backward)."""
    return t.view_as(t) if t.requires_grad else t.detach().requires_grad_()


def scattered(needs, grads):
    """``grads`` (one per True in ``needs``, in order) at the places ``needs`` flags, None elsewhere."""
    grads = iter(grads)
    return tuple(next(grads) if need else None for need in needs)
