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
    if _flag("ACCELERATE_USE_FSDP") and os.environ.get("FSDP_VERSION", "1").strip() != "2":
        raise LaunchRefused(f"this launch asks for FSDP version {os.environ.get('FSDP_VERSION', '1')}; potstill trains "
                            f"under FSDP2 only (the chunked loss reads the output head as FSDP2 gathers it): set "
                            f"fsdp_version: 2 in the accelerate config")
    if _flag("ACCELERATE_USE_FSDP") and not fsdp_enabled(state):
        raise LaunchRefused(f"this launch asks for FSDP (ACCELERATE_USE_FSDP) but accelerate runs {kind} on {device}: "
                            f"it turns FSDP on only on an accelerator, so the student would not be sharded; launch "
                            f"without the FSDP config (--multi_gpu: DDP over {state.backend}), or on GPUs")
    return describe(state)


# Test-only: accelerate turns FSDP on only on an accelerator. With this variable set, an FSDP
# launch on CPUs (gloo) takes the same path a GPU launch does: potstill's Accelerator gets
# accelerate's FSDP plugin, built from the launch's FSDP_* variables as accelerate builds it,
# and accelerator.prepare shards the student with fully_shard per decoder layer over a CPU mesh.
FSDP_ON_CPU = "POTSTILL_TEST_FSDP_ON_CPU"


def fsdp_enabled(state) -> bool:
    """Whether the model will be sharded with FSDP in this process state."""
    from accelerate.utils import DistributedType

    if state.distributed_type == DistributedType.FSDP:
        return True
    if not _flag("ACCELERATE_USE_FSDP"):
        return False
    if state.distributed_type == DistributedType.MULTI_CPU:
        return _flag(FSDP_ON_CPU)
    return state.distributed_type.value.startswith("MULTI_")


def fsdp_on_cpu(accelerator) -> None:
    """Under ``POTSTILL_TEST_FSDP_ON_CPU`` in an FSDP launch on CPUs, turn accelerate's FSDP2 on as
    it does on GPUs (its state's distributed type and plugin); otherwise nothing."""
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    state = accelerator.state
    if _flag(FSDP_ON_CPU) and _flag("ACCELERATE_USE_FSDP") and state.distributed_type == DistributedType.MULTI_CPU:
        from accelerate.state import PartialState

        state.distributed_type = DistributedType.FSDP
        PartialState._shared_state["distributed_type"] = DistributedType.FSDP  # as AcceleratorState sets both
        state.fsdp_plugin = FullyShardedDataParallelPlugin()  # reads FSDP_VERSION, FSDP_AUTO_WRAP_POLICY, ...


def describe(state) -> dict:
    """The distributed type, process count and backend that really ran (potstill.json "distributed")."""
    return {"type": state.distributed_type.value, "processes": state.num_processes, "backend": state.backend}


def decoder_layers(model) -> list:
    """The modules FSDP2 shards apart, children before parents: the model's ``_no_split_modules``
    classes (its decoder layers, as accelerate finds them for the student), else the items of its
    largest ModuleList."""
    import torch

    names = set(getattr(model, "_no_split_modules", None) or ())
    found = [m for m in model.modules() if m is not model and type(m).__name__ in names]
    if not found:
        lists = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList)]
        if lists:
            found = list(max(lists, key=lambda m: sum(p.numel() for p in m.parameters())))
    return found[::-1]  # modules() lists parents first; fully_shard wants the inner ones first


def shard_teacher(teacher, student) -> int:
    """Shard the frozen online ``teacher`` in place over the processes ``student`` is sharded over
    (FSDP2), and return how many of its parameters one process holds between forwards: its share
    of the layers, and the root's whole.

    Each decoder layer is its own unit: gathered for its forward, freed after it. The rest (the
    embedding, the final norm, the output head) is the root unit, which, as the student's root
    does, stays gathered once its first forward has gathered it: the chunked loss reads the full
    head after the teacher's forward at no further communication, and those parameters, whole, are
    the price in every process. The teacher takes no gradient, so its root never reshards."""
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    layers = decoder_layers(teacher)
    if not layers:
        raise PotstillError(f"the online teacher ({type(teacher).__name__}) has no decoder layers FSDP2 could shard "
                            f"apart (no _no_split_modules, no ModuleList); train it replicated (DDP) or from the cache")
    in_layers = {id(p) for layer in layers for p in layer.parameters()}
    root = sum(p.numel() for p in teacher.parameters() if id(p) not in in_layers)  # a tied weight once
    mesh = next(p.device_mesh for p in student.parameters() if isinstance(p, DTensor))
    for layer in layers:
        fully_shard(layer, mesh=mesh, reshard_after_forward=True)
    fully_shard(teacher, mesh=mesh, reshard_after_forward=False)
    return root + sum(p.to_local().numel() for layer in layers for p in layer.parameters())
