"""How the GPT's blocks spread over pipeline stages, and the checks of a pipeline layout."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from mpisplit.nn.module import Module


def check_pipeline(n_layer: int, pp: int) -> None:
    """ValueError when `pp` stages cannot each hold at least one of the `n_layer` blocks."""
    if n_layer < pp:
        raise ValueError(f"pipeline of pp={pp} stages needs at least {pp} blocks, the model has n_layer={n_layer}")


def stage_blocks(n_layer: int, pp: int, stage: int) -> range:
    """Global indices of the blocks of `stage`: as even as possible, the first n_layer % pp
    stages one block more (n_layer=10, pp=4: 3, 3, 2, 2)."""
    check_pipeline(n_layer, pp)
    base, extra = divmod(n_layer, pp)
    lo = stage * base + min(stage, extra)
    return range(lo, lo + base + (1 if stage < extra else 0))


class BlockList(Module):
    """The blocks one stage holds, named by their global index (h.5.attn... on any stage), so a
    parameter's name says the same weight at every pipeline layout. Iterates in order."""

    def __init__(self, blocks: dict[int, Module]) -> None:
        self.blocks = dict(sorted(blocks.items()))

    def _children(self) -> Iterator[tuple[str, Any]]:
        for i, block in self.blocks.items():
            yield str(i), block

    def __iter__(self) -> Iterator[Any]:
        return iter(self.blocks.values())

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, i: int) -> Any:
        """The block of global index i (KeyError when another stage holds it)."""
        return self.blocks[i]
