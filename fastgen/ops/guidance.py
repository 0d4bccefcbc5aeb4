"""Classifier-free guidance (Ho & Salimans 2022, eq. 6), the one definition every step uses.

A guided model output is [2B, ...]: the model evaluated on the doubled batch, the unconditional
half first (diffusers' pipelines' order), and the step uses

    m = m_u + w (m_c - m_u)

The fused kernels read both halves and combine them in registers (no extra pass); the torch and
reference paths call ``guided`` first.
"""
import torch

from fastgen import _checks


GUIDANCE_LIMIT = 1e6  # |w| beyond this turns any model's output difference into fp32 overflow noise


def guidance_scale_arg(guidance_scale):
    """None (no guidance) or w as a finite float with |w| <= GUIDANCE_LIMIT: the steps compute in fp32,
    where a w near fp32's range (3.4e38) overflows m_c - m_u into inf and NaN samples."""
    if guidance_scale is None:
        return None
    value = _checks.finite_float(guidance_scale, "guidance_scale")
    if abs(value) > GUIDANCE_LIMIT:
        raise ValueError(f"guidance_scale must be in [-{GUIDANCE_LIMIT:g}, {GUIDANCE_LIMIT:g}] (the steps compute in "
                         f"fp32; pipelines use 1-20), got {value:g}")
    return value


def check_guided_output(model_output, expected: torch.Size, guidance_scale) -> None:
    """With guidance, ``model_output`` must be [2B, ...] of the unguided shape ``expected`` [B, ...]."""
    if guidance_scale is None:
        return
    doubled = torch.Size([2 * expected[0], *expected[1:]])
    if model_output.shape != doubled:
        raise ValueError(f"model_output must be [2B, ...] = {tuple(doubled)} with guidance_scale (the model on the "
                         f"doubled batch, unconditional half first), got {tuple(model_output.shape)}")


def guided(model_output, guidance_scale):
    """m_u + w (m_c - m_u) of a [2B, ...] output, in its dtype; the output itself without guidance."""
    if guidance_scale is None:
        return model_output
    uncond, cond = model_output.chunk(2)
    return uncond + guidance_scale * (cond - uncond)
