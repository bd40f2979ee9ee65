"""``max_batch_size`` for :func:`~kds_hook.diffusers.run`: the denoiser runs over row chunks of the particle batch.

Steering is untouched (the scheduler still sees the whole batch); only the network's forward is split. Every
tensor argument whose first dim is the batch is split, recursively through lists, tuples and dicts (SDXL's
``added_cond_kwargs``, ControlNet residuals); everything else passes through, except arguments a family names as
not per row (Flux's ``img_ids``/``txt_ids`` are (tokens, 3) and would be cut wrongly when the token count happens
to equal the batch). Outputs are concatenated along the batch.
"""

from __future__ import annotations

from typing import Any, Callable, Collection, List

import torch

__all__ = ["chunked"]

# Where the denoisers take their batched input when it is passed by keyword (UNets: sample; transformers:
# hidden_states).
_BATCH_KEYWORDS = ("sample", "hidden_states")


def _split(value: Any, batch: int, start: int, stop: int) -> Any:
    if isinstance(value, torch.Tensor):
        return value[start:stop] if value.ndim and value.shape[0] == batch else value
    if isinstance(value, (list, tuple)):
        parts = [_split(v, batch, start, stop) for v in value]
        return type(value)(parts) if isinstance(value, tuple) else parts
    if isinstance(value, dict):
        return {k: _split(v, batch, start, stop) for k, v in value.items()}
    return value


def _concat(parts: List[Any]) -> Any:
    first = parts[0]
    if isinstance(first, torch.Tensor) and first.ndim:
        return torch.cat(parts)
    if isinstance(first, dict):  # diffusers' BaseOutput is an ordered dict and a dataclass
        return type(first)(**{k: _concat([p[k] for p in parts]) for k in first.keys()})
    if isinstance(first, (list, tuple)):
        joined = [_concat([p[i] for p in parts]) for i in range(len(first))]
        return type(first)(joined) if isinstance(first, tuple) else joined
    return first  # not per row (None, a scalar): the first chunk's


def _batch_of(args: tuple, kwargs: dict) -> int:
    if args:
        return args[0].shape[0]
    for name in _BATCH_KEYWORDS:
        if name in kwargs:
            return kwargs[name].shape[0]
    raise TypeError(f"max_batch_size: the denoiser was called without a positional input or any of {_BATCH_KEYWORDS}")


def chunked(forward: Callable, max_batch_size: int, not_per_row: Collection[str] = ()) -> Callable:
    """``forward`` run over row chunks of at most ``max_batch_size``, outputs concatenated along the batch.

    Keyword arguments named in ``not_per_row`` are passed whole to every chunk.
    """

    def chunked_forward(*args: Any, **kwargs: Any) -> Any:
        batch = _batch_of(args, kwargs)
        if batch <= max_batch_size:
            return forward(*args, **kwargs)
        parts = []
        for start in range(0, batch, max_batch_size):
            stop = start + max_batch_size
            chunk_kwargs = {
                k: v if k in not_per_row else _split(v, batch, start, stop) for k, v in kwargs.items()
            }
            parts.append(forward(*_split(args, batch, start, stop), **chunk_kwargs))
        return _concat(parts)

    return chunked_forward
