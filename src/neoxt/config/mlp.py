"""The MLP width a config resolves to, by GPT-NeoX's own sizing rule.

Upstream GPT-NeoX (``megatron/model/transformer.py``, ``ParallelMLP.__init__``) sizes two matrices:
``linear1`` (hidden → both gated branches side by side) and ``linear2`` (one branch → hidden). From
a base width F (``intermediate_size``, else ``int(expansion_factor·h)``, else ``4h``) a gated
activation takes ``int(F·2/3)`` for ``linear1`` and half of that for ``linear2``; then ``linear1`` is
rounded up to a multiple of ``2·mlp_multiple_of`` and ``linear2`` to ``mlp_multiple_of``. When the
two roundings disagree (``linear1 != 2·linear2``) upstream builds the model and fails at its first
forward pass; neoxt refuses the config instead, naming both widths.

The fork (GeodesicResearch/geodesic-gpt-neox) keeps that rule only when ``intermediate_size`` is not
set: an explicit ``intermediate_size`` is each branch's width as written (HF's convention, what its
converters write), with no 2/3 scaling and no rounding. neoxt follows the fork, and says in one
warning line when upstream would build a different width from the same file.

The same keys size upstream's Mamba blocks (``mamba_width``), which have no MLP beside them.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class MlpWidths:
    """Output width of ``linear1`` and input width of ``linear2``, as GPT-NeoX allocates them."""

    linear1: int
    linear2: int
    gated: bool

    @property
    def buildable(self) -> bool:
        """Whether the activation's output (``linear1``, halved when gated) fits ``linear2``."""
        return self.linear1 == (2 * self.linear2 if self.gated else self.linear2)


def _round_up(value: int, multiple: int) -> int:
    return multiple * ((value + multiple - 1) // multiple)


def upstream_widths(
    hidden: int, gated: bool, intermediate_size: int | None, expansion_factor: float | None, multiple_of: int
) -> MlpWidths:
    """What upstream GPT-NeoX's ParallelMLP allocates for these keys (its arithmetic, step by step)."""
    if intermediate_size:
        ffn = intermediate_size
    elif expansion_factor:
        ffn = int(expansion_factor * hidden)
    else:
        ffn = 4 * hidden
    ffn_in = ffn
    if gated:
        ffn = int(ffn * 2 / 3)
        ffn_in = ffn // 2
    return MlpWidths(_round_up(ffn, 2 * multiple_of), _round_up(ffn_in, multiple_of), gated)


def fork_widths(
    hidden: int, gated: bool, intermediate_size: int | None, expansion_factor: float | None, multiple_of: int
) -> MlpWidths:
    """The fork's sizing: an explicit ``intermediate_size`` is one branch's width, unrounded."""
    if intermediate_size is not None:
        return MlpWidths(2 * intermediate_size if gated else intermediate_size, intermediate_size, gated)
    return upstream_widths(hidden, gated, None, expansion_factor, multiple_of)


def mamba_width(
    hidden: int, attention: bool, intermediate_size: int | None, expansion_factor: float | None, expand: int
) -> int:
    """Mamba block width when ``mamba_d_inner`` is not set, as upstream GPT-NeoX sizes its Mamba blocks
    (``megatron/model/mamba/mamba.py``): ``intermediate_size``, else ``expansion_factor`` x hidden,
    else ``mamba_expand`` x hidden (default 2) — in hybrid stacks too, where ``intermediate_size``
    then sizes both the MLPs and the Mamba blocks, so a GPT-NeoX hybrid config builds the same model
    and its checkpoints import. ``attention`` is kept for the caller's other checks."""
    del attention
    if intermediate_size is not None:
        return intermediate_size
    if expansion_factor is not None:
        return int(expansion_factor * hidden)
    return expand * hidden
