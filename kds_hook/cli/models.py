"""Finding and loading ``--model`` (a local ``save_pretrained`` directory or a hub id), and saying clearly why it
cannot be had: not a pipeline of the right kind, missing weights, not cached and no network, unknown to the hub.
A cached hub id is loaded without touching the network; with ``HF_HUB_OFFLINE`` nothing waits on it."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import warnings
from pathlib import Path
from typing import Callable, Iterator, List, Sequence

from .errors import EXIT_RUN_FAILED, CommandError, first_line


def model_sources(model: str, pipeline_classes: Sequence[str]) -> List[dict]:
    """``from_pretrained`` arguments to try in turn for ``--model``, checked without waiting on an absent network.

    ``pipeline_classes``: the ``model_index.json`` class names the command can load, checked where that file is
    at hand (a local directory, a cached hub id)."""
    from huggingface_hub import constants, try_to_load_from_cache

    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise CommandError(f"--model {model} is a directory without model_index.json, not a diffusers pipeline "
                               "(write one with pipe.save_pretrained(DIR))")
        _check_pipeline_class(path / "model_index.json", model, pipeline_classes)
        return [dict(pretrained_model_name_or_path=str(path), local_files_only=True)]
    if path.exists():
        raise CommandError(f"--model {model} is a file; give a pipeline directory (with model_index.json, as "
                           "save_pretrained writes it) or a hub id")
    if model.startswith((".", "/", "~")) or model.count("/") > 1 or (os.sep != "/" and os.sep in model):
        raise CommandError(f"--model {model}: no such directory")
    try:
        cached_index = try_to_load_from_cache(model, "model_index.json")
    except ValueError:  # huggingface_hub's HFValidationError: not of the form OWNER/NAME
        raise CommandError(f"--model {model} is neither a directory nor a valid hub id (OWNER/NAME)") from None
    cached = isinstance(cached_index, str)
    if cached:
        _check_pipeline_class(Path(cached_index), model, pipeline_classes)
    if not cached and constants.HF_HUB_OFFLINE:
        raise CommandError(f"model {model} is not a local directory and not in the local Hugging Face cache, and "
                           f"the hub is offline (HF_HUB_OFFLINE); {_download_hint(model)}")
    # Cached: load without touching the network; online and not (fully) cached: download.
    sources = [dict(pretrained_model_name_or_path=model, local_files_only=True)] if cached else []
    if not constants.HF_HUB_OFFLINE:
        sources.append(dict(pretrained_model_name_or_path=model))
    return sources


def _check_pipeline_class(index: Path, model: str, pipeline_classes: Sequence[str]) -> None:
    try:
        class_name = json.loads(index.read_text(encoding="utf-8")).get("_class_name")
    except (OSError, ValueError, AttributeError) as error:
        raise CommandError(f"--model {model}: cannot read its model_index.json ({first_line(error)})") from None
    if class_name not in pipeline_classes:
        raise CommandError(f"--model {model} holds a {class_name}, but this command needs a "
                           f"{' or '.join(pipeline_classes)}")


def _download_hint(model: str) -> str:
    return (f"download it once on a machine with network (`hf download {model}` or `huggingface-cli download "
            f"{model}`) into the Hugging Face cache, or pass --model a local pipeline directory")


def load_pipeline(pipeline_class, model: str, sources: List[dict], device: str, dtype):
    """The first of ``sources`` that loads, moved to ``device`` and ``dtype``; else one clear error."""
    from diffusers.utils import logging as diffusers_logging

    pipe, errors = None, []
    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()  # hide loading advice (accelerate, ...) meant for library users
    diffusers_logging.disable_progress_bar()  # the bar over components; hub downloads keep their own bars
    try:
        for kwargs in sources:
            try:
                with warnings.catch_warnings():
                    # diffusers >= 0.36 renamed torch_dtype to dtype; torch_dtype works in every version we support
                    warnings.filterwarnings("ignore", message=".*torch_dtype.*", category=FutureWarning)
                    pipe = pipeline_class.from_pretrained(**kwargs, torch_dtype=dtype)
                break
            except Exception as caught:  # noqa: BLE001 - loading fails in many library-specific ways; report all
                errors.append(caught)
    finally:
        diffusers_logging.set_verbosity(verbosity)
        diffusers_logging.enable_progress_bar()
    if pipe is None:
        raise _load_error(pipeline_class.__name__, model, sources, errors)
    try:
        pipe = pipe.to(device)
    except (RuntimeError, ValueError) as caught:
        raise CommandError(f"cannot move the model to {device}: {first_line(caught)}", EXIT_RUN_FAILED) from None
    return pipe


def _load_error(class_name: str, model: str, sources: List[dict], errors: List[BaseException]) -> CommandError:
    cause = first_line(errors[-1])
    if Path(model).expanduser().is_dir():
        return CommandError(f"cannot load {class_name} from {model} (missing or broken weights?): {cause}")
    if any(_caused_by(e, _is_network_error) for e in errors):
        return CommandError(f"model {model} is not (fully) in the local Hugging Face cache and the hub cannot be "
                            f"reached ({first_line(_root_cause(errors[-1]))}); {_download_hint(model)}")
    if any(_caused_by(e, _is_missing_repo) for e in errors):
        return CommandError(f"model {model} is not on the Hugging Face hub, or is private or gated (accept its "
                            "terms on the hub and log in with `hf auth login`); check the id, or pass --model a "
                            "local pipeline directory")
    cached = any(s.get("local_files_only") for s in sources)  # only a cached hub id is tried offline first
    where = "from the Hugging Face cache" if cached else "(not in the local Hugging Face cache) from the hub"
    return CommandError(f"cannot load model {model} {where}: {cause}; {_download_hint(model)}")


def _exception_chain(error: BaseException) -> Iterator[BaseException]:
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        error = error.__cause__ or error.__context__


def _caused_by(error: BaseException, test: Callable[[BaseException], bool]) -> bool:
    return any(test(e) for e in _exception_chain(error))


def _root_cause(error: BaseException) -> BaseException:
    return list(_exception_chain(error))[-1]


def _is_network_error(error: BaseException) -> bool:
    # requests, httpx and huggingface_hub each have their own classes; these names cover them all.
    name = type(error).__name__
    return isinstance(error, (ConnectionError, TimeoutError, socket.gaierror)) or any(
        word in name for word in ("ConnectError", "ConnectionError", "ConnectTimeout", "OfflineModeIsEnabled")
    )


def _is_missing_repo(error: BaseException) -> bool:
    return type(error).__name__ in ("RepositoryNotFoundError", "GatedRepoError", "RevisionNotFoundError")


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """Silences transformers' import-time advice (torchvision, ...), which is meant for library users."""
    try:
        from transformers.utils import logging as transformers_logging
    except ImportError:  # the pipeline import then reports what is missing
        yield
        return
    verbosity = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()
    try:
        yield
    finally:
        transformers_logging.set_verbosity(verbosity)
