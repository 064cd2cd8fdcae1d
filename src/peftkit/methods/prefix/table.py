"""One adapter's key/value prefix: trained directly, or through an MLP that ``fold`` drops."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ...layers import AdapterModule


@dataclass(frozen=True)
class KVShape:
    """What one attention layer caches per token: ``heads`` key/value heads of ``head_dim``."""

    layers: int
    heads: int
    head_dim: int
    hidden_size: int


class PrefixTable(AdapterModule):
    """Keys and values of ``length`` virtual tokens for every attention layer.

    ``forward()`` returns them as one tensor of shape (layers, 2, heads, length, head_dim), index 0 the
    keys and 1 the values, in the layout transformers' KV cache holds them.

    Plain: the table is the parameter ``key_values`` (initialised N(0, init_std²)).
    Re-parametrised (Li & Liang 2021, §4.3): an embedding E (length, hidden_size) and an MLP
        table[i] = W₂ tanh(W₁ E[i] + b₁) + b₂,  W₁: (mlp_hidden, hidden_size),
                                                W₂: (layers·2·heads·head_dim, mlp_hidden),
    each row reshaped to (layers, 2, heads, head_dim). ``fold()`` evaluates it once and keeps only
    the result, so inference carries no MLP.
    """

    def __init__(
        self,
        adapter_name: str,
        shape: KVShape,
        length: int,
        *,
        mlp_hidden: int | None,
        init_std: float,
        device: torch.device,
        dtype: torch.dtype,
    ) -> None:
        super().__init__()
        self.adapter_name = adapter_name
        self.shape = shape
        self.length = length
        self.active = True
        self.positions_after_prefix = False  # real tokens' positions count the prefix (peft's way)
        self.embedding: nn.Parameter | None = None
        self.mlp: nn.Sequential | None = None
        self.key_values: nn.Parameter | None = None
        full = (shape.layers, 2, shape.heads, length, shape.head_dim)
        if mlp_hidden is None:
            values = torch.randn(full, device=device, dtype=torch.float32) * init_std
            self.key_values = nn.Parameter(values.to(dtype))
            return
        per_token = shape.layers * 2 * shape.heads * shape.head_dim
        emb = torch.randn(length, shape.hidden_size, device=device, dtype=torch.float32) * init_std
        self.embedding = nn.Parameter(emb.to(dtype))
        self.mlp = nn.Sequential(
            nn.Linear(shape.hidden_size, mlp_hidden, device=device, dtype=dtype),
            nn.Tanh(),
            nn.Linear(mlp_hidden, per_token, device=device, dtype=dtype),
        )

    @property
    def folded(self) -> bool:
        """True when the table is a plain tensor (no MLP)."""
        return self.mlp is None

    def forward(self) -> torch.Tensor:
        """The prefix, (layers, 2, heads, length, head_dim)."""
        if self.mlp is None:
            assert self.key_values is not None
            return self.key_values
        assert self.embedding is not None
        s = self.shape
        flat: torch.Tensor = self.mlp(self.embedding)  # (length, layers·2·heads·head_dim)
        table = flat.view(self.length, s.layers, 2, s.heads, s.head_dim).permute(1, 2, 3, 0, 4)
        return table

    def values_now(self) -> torch.Tensor:
        """A detached, contiguous copy of the prefix as ``forward`` computes it now."""
        with torch.no_grad():
            table: torch.Tensor = self()
            return table.detach().clone(memory_format=torch.contiguous_format)

    def fold(self, values: torch.Tensor | None = None) -> None:
        """Replace the MLP by the plain tensor it computes (or by ``values``); a no-op when plain.

        Folding creates a new parameter: give an optimiser the adapter's parameters again afterwards.
        """
        if self.mlp is None and values is None:
            return
        ref = next(self.parameters())
        if values is None:
            table = self.values_now()
        else:
            table = values.detach().to(ref.device, ref.dtype, copy=True).contiguous()
        self.embedding = None
        self.mlp = None
        self.key_values = nn.Parameter(table, requires_grad=ref.requires_grad)

    def load(self, values: torch.Tensor) -> None:
        """Set the prefix to ``values``; an MLP is folded away (its input cannot be recovered)."""
        if self.key_values is None:
            self.fold(values)
            return
        with torch.no_grad():
            self.key_values.copy_(values)

    def extra_repr(self) -> str:
        s = self.shape
        how = "plain" if self.mlp is None else "through an MLP"
        after = ", positions after the prefix" if self.positions_after_prefix else ""
        return (
            f"adapter={self.adapter_name!r}, length={self.length}, layers={s.layers}, "
            f"heads={s.heads}, head_dim={s.head_dim}, {how}{after}"
        )
