"""What a launch really distributes, checked before any work.

``accelerate launch`` (or torchrun) starts WORLD_SIZE processes; each trains one shard of every
step only if a process group spans them. When none does (accelerate's distributed type NO: a
device with no collective backend, such as MPS), each process would train the whole student
alone and all would write the same folder. When the launch asks for FSDP but accelerate does not
turn it on (it does so only on an accelerator: on CPUs it runs DDP over gloo instead), the student
would not be sharded. And DeepSpeed is not supported. Each of these is refused here, in one line,
before the terms gate and before anything is written; ``describe`` is what potstill.json records.
"""

from __future__ import annotations

import os

from potstill.errors import PotstillError


class LaunchRefused(PotstillError):
    """Every process of the launch refuses alike: the main process says it for all."""


def _flag(name: str) -> bool:
    return os.environ.get(name, "false").strip().lower() in ("1", "true", "yes")


def launched_processes() -> int:
    """How many processes the launcher started (WORLD_SIZE, or an MPI launcher's size); 1 when none."""
    for name in ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE"):
        value = os.environ.get(name, "").strip()
        if value.isdigit():
            return int(value)
    return 1


def check_launch(device: str) -> dict:
    """Refuse a launch that would not distribute as it says; else accelerate's process state,
    described (``describe``). ``device`` is the train device (``recipe.device_for("train")``):
    potstill's Accelerator runs with ``cpu=True`` exactly when it is ``cpu``."""
    if _flag("ACCELERATE_USE_DEEPSPEED"):
        raise LaunchRefused("this launch asks for DeepSpeed (ACCELERATE_USE_DEEPSPEED), which potstill does not "
                            "support (its ZeRO-3 engine replaces the training loop's optimizer step and is untested "
                            "here): shard the student with FSDP2 instead (accelerate config: distributed_type FSDP, "
                            "fsdp_version 2), or replicate it with DDP (accelerate launch --multi_gpu)")
    world = launched_processes()
    if world <= 1 and not _flag("ACCELERATE_USE_FSDP"):
        return {"type": "NO", "processes": 1, "backend": None}
    from accelerate.state import PartialState

    state = PartialState(cpu=device == "cpu")  # joins the process group, as the Accelerator will
    kind = state.distributed_type.value
    if state.num_processes != world:
        why = (f"no collective backend for {device}" if state.backend is None
               else f"backend {state.backend} spans {state.num_processes}")
        raise LaunchRefused(f"this launch started {world} processes but accelerate's distributed type is {kind} "
                            f"({why}): each process would train the whole student alone and write the same folder; "
                            f"launch one process, or train on a device with a process group (cuda: nccl, cpu: gloo)")
    if _flag("ACCELERATE_USE_FSDP") and not fsdp_enabled(state):
        raise LaunchRefused(f"this launch asks for FSDP (ACCELERATE_USE_FSDP) but accelerate runs {kind} on {device}: "
                            f"it turns FSDP on only on an accelerator, so the student would not be sharded; launch "
                            f"without the FSDP config (--multi_gpu: DDP over {state.backend}), or on GPUs")
    return describe(state)


def fsdp_enabled(state) -> bool:
    """Whether accelerate will shard the model with FSDP in this process state."""
    from accelerate.utils import DistributedType

    return state.distributed_type == DistributedType.FSDP or (
        _flag("ACCELERATE_USE_FSDP") and state.distributed_type.value.startswith("MULTI_")
        and state.distributed_type != DistributedType.MULTI_CPU)


def describe(state) -> dict:
    """The distributed type, process count and backend that really ran (potstill.json "distributed")."""
    return {"type": state.distributed_type.value, "processes": state.num_processes, "backend": state.backend}
