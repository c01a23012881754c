"""Models placed by Accelerate's big-model dispatch (``from_pretrained(device_map=...)``), pruned where they live.

A dispatched model runs each module on the device that holds it; Accelerate's hooks move the activations, and the
weights of *offloaded* modules (kept in CPU memory or on disk, their parameters on the ``meta`` device) are loaded
for each forward call and dropped after it. The pruning engine reads and writes weights between forward calls, so
:class:`OffloadedWeights` makes the weights it names resident for a while (``resident(names)``), and writes the
changed ones back copy-on-write: CPU-offloaded tensors are replaced in Accelerate's weight map, disk-offloaded
ones are written to new files in the offload folder and the index is pointed at them. The model's own files and the
original tensors are never modified, so a failed run is undone by pointing the weight map back (``rollback``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from accelerate.hooks import AlignDevicesHook, SequentialHook
from accelerate.utils import named_module_tensors, offload_weight, set_module_tensor_to_device
from torch import nn

log = logging.getLogger(__name__)


def placement(model: nn.Module) -> dict[str, str] | None:
    """Module name -> device (``"cuda:0"``, ``"cpu"``, ``"disk"``) of a dispatched model, else None."""
    device_map = getattr(model, "hf_device_map", None)
    return {name: str(device) for name, device in device_map.items()} if device_map else None


class StoredTensors(Mapping[str, torch.Tensor]):
    """A state dict of ``model`` in which each offloaded tensor (``meta`` in the model) is read from Accelerate's
    weight map when asked for, one at a time: its stored value, the pruned one once pruning wrote it back.

    Args:
        model: any module; one that is not dispatched gives its own tensors.
        state_dict: the entries to serve (default ``model.state_dict()``), e.g. less tied copies.
    """

    def __init__(self, model: nn.Module, state_dict: Mapping[str, torch.Tensor] | None = None) -> None:
        self._state_dict = model.state_dict() if state_dict is None else state_dict
        self._stored = {
            f"{name}.{tensor_name}" if name else tensor_name: (hook.weights_map, tensor_name)
            for name, module in model.named_modules()
            for hook in _offload_hooks(module)
            for tensor_name, _ in named_module_tensors(module, hook.offload_buffers, recurse=hook.place_submodules)
        }

    def __getitem__(self, name: str) -> torch.Tensor:
        tensor = self._state_dict[name]
        if tensor.device.type == "meta" and name in self._stored:
            weights_map, key = self._stored[name]
            return weights_map[key]
        return tensor

    def __iter__(self) -> Iterator[str]:
        return iter(self._state_dict)

    def __len__(self) -> int:
        return len(self._state_dict)


def _offload_hooks(module: nn.Module) -> list[AlignDevicesHook]:
    hook = getattr(module, "_hf_hook", None)
    hooks = hook.hooks if isinstance(hook, SequentialHook) else [hook]
    return [hook for hook in hooks if isinstance(hook, AlignDevicesHook) and hook.offload]


def _related(module_name: str, names: Iterable[str]) -> bool:
    """``module_name`` lies inside one of ``names`` or holds one of them."""
    return any(
        module_name == name or module_name.startswith(name + ".") or name.startswith(module_name + ".")
        for name in names
    )


class OffloadedWeights:
    """Copy-on-write residency of the offloaded weights of a dispatched model (see the module docstring).

    Use it as a context manager around pruning: on an exception every weight written back is undone, on success
    the new values stay (the files written to the offload folder replace the originals for this model).

    Args:
        model: a model dispatched by Accelerate (``from_pretrained(device_map=...)`` or ``dispatch_model``).
    """

    def __init__(self, model: nn.Module) -> None:
        self._hooks = [
            (name, module, hook) for name, module in model.named_modules() for hook in _offload_hooks(module)
        ]
        self._undo: list[tuple[Any, str, Any, tuple[str, str | None] | None]] = []

    @property
    def modules(self) -> list[str]:
        """Names of the modules whose weights are offloaded."""
        return [name for name, _, _ in self._hooks]

    def offloaded(self, name: str) -> bool:
        """Whether the module or parameter ``name`` (or part of it) is offloaded."""
        return any(_related(module, [name]) for module in self.modules)

    @property
    def folders(self) -> list[str]:
        """The offload folders the offloaded weights (and the pruned ones written back) are stored in."""
        found = {hook.weights_map.dataset.save_folder for _, _, hook in self._hooks}
        return sorted(str(folder) for folder in found if folder is not None)

    def unwritable(self, names: Iterable[str]) -> list[str]:
        """The offloaded modules holding any of the weights ``names`` whose changed values could not be stored back:
        offloaded to disk but read from the model's own checkpoint files (never changed), with no offload folder."""
        names = list(names)
        return [
            name
            for name, module, hook in self._hooks
            if hook.weights_map.dataset.save_folder is None
            and _related(name, names)
            and any(
                hook.weights_map.prefix + tensor_name not in hook.weights_map.dataset.state_dict
                for tensor_name, _ in named_module_tensors(module, hook.offload_buffers, recurse=hook.place_submodules)
            )
        ]

    @contextmanager
    def resident(self, names: Sequence[str], write_back: bool) -> Iterator[None]:
        """Load the offloaded weights of the modules or parameters ``names`` onto their execution devices for the
        duration; forward calls then use them as they are. On a normal exit, with ``write_back``, the tensors that
        changed are stored copy-on-write; then they are offloaded again."""
        chosen = [(name, module, hook) for name, module, hook in self._hooks if _related(name, names)]
        for _, module, hook in chosen:
            for tensor_name, _ in named_module_tensors(module, hook.offload_buffers, recurse=hook.place_submodules):
                value = hook.weights_map[tensor_name]
                set_module_tensor_to_device(module, tensor_name, hook.execution_device, value=value)
            hook.offload = False
        completed = False
        try:
            yield
            completed = True
        finally:
            for _, module, hook in chosen:
                for tensor_name, tensor in named_module_tensors(
                    module, hook.offload_buffers, recurse=hook.place_submodules
                ):
                    stored = hook.weights_map[tensor_name]
                    if completed and write_back and not torch.equal(tensor.detach().cpu(), stored.cpu()):
                        self._store(hook.weights_map, tensor_name, tensor.detach())
                    set_module_tensor_to_device(module, tensor_name, "meta")
                hook.offload = True

    def _store(self, weights_map: Any, name: str, tensor: torch.Tensor) -> None:
        loader, key = weights_map.dataset, weights_map.prefix + name
        if key in loader.state_dict:  # offloaded to CPU memory: replace the tensor, keep the original for undo
            self._undo.append((loader.state_dict, key, loader.state_dict[key], None))
            loader.state_dict[key] = tensor.to("cpu", copy=True)
            return
        if loader.save_folder is None:
            raise ValueError(
                f"The offloaded weight {key!r} changed but the model has no offload folder to write it to. HINT: "
                "load the model with from_pretrained(..., device_map=..., offload_folder=DIR)."
            )
        path = os.path.join(loader.save_folder, f"{key}.dat")
        backup = None
        if "safetensors_file" not in loader.index[key]:  # a file of the offload folder: keep it aside for undo
            backup = f"{path}.{len(self._undo)}.orig"
            os.replace(path, backup)
        self._undo.append((loader.index, key, loader.index[key], (path, backup)))
        offload_weight(tensor.cpu(), key, loader.save_folder, index=loader.index)

    def rollback(self) -> None:
        """Point every written-back weight at its original value again and delete the files written."""
        for mapping, key, original, files in reversed(self._undo):
            mapping[key] = original
            if files is not None:
                path, backup = files
                os.remove(path)
                if backup is not None:
                    os.replace(backup, path)
        self._undo.clear()

    def commit(self) -> None:
        """Keep the written-back weights: drop the undo records and the files kept aside."""
        for _, _, _, files in self._undo:
            if files is not None and files[1] is not None:
                os.remove(files[1])
        self._undo.clear()

    def __enter__(self) -> OffloadedWeights:
        return self

    def __exit__(self, kind: type[BaseException] | None, *_: object) -> None:
        if kind is None:
            self.commit()
        elif self._undo:
            self.rollback()
            log.info("Pruning stopped by an exception; every offloaded weight was restored.")
