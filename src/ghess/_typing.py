"""Type aliases of the public API's signatures.

Imports nothing from ghess, so that any module may use it without an import cycle.
"""

from collections.abc import Iterable
from typing import Literal, TypeAlias

import numpy.typing as npt

__all__ = ["Batch", "Data", "Mode"]

#: one batch of inputs and targets, ``(X, y)``
Batch: TypeAlias = tuple[npt.ArrayLike, npt.ArrayLike]
#: the data of a loss: one batch ``(X, y)`` or an iterable of such batches
Data: TypeAlias = Batch | Iterable[Batch]
#: the product mode of the operators
Mode: TypeAlias = Literal["auto", "stored", "recompute"]
