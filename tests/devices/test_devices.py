"""device: auto and the per-stage overrides, resolved as pure functions (torch's view of the
hardware is monkeypatched here only; the pipeline tests run on this machine's CPU)."""

import pytest
import torch

from potstill.cli import main
from potstill.devices import resolve_device, resolve_mixed_precision
from potstill.errors import PotstillError
from potstill.recipe import load_recipe

from helpers import QUICKSTART

RECIPE = QUICKSTART / "recipe.yaml"


@pytest.fixture
def machine(monkeypatch):
    """Pretend the machine has (cuda GPUs, mps, bf16 support)."""
    def set_(cuda: int = 0, mps: bool = False, bf16: bool = False):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: cuda)
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
        monkeypatch.setattr(torch.backends.mps, "is_available", lambda: mps)
    return set_


@pytest.mark.parametrize("cuda, mps, expected", [(1, True, "cuda"), (0, True, "mps"), (0, False, "cpu")])
def test_auto_prefers_cuda_then_mps_then_cpu(machine, cuda, mps, expected):
    machine(cuda=cuda, mps=mps)
    assert resolve_device("auto") == expected
    assert resolve_device("cpu") == "cpu"


def test_a_device_the_machine_lacks_is_refused_not_replaced(machine):
    machine(cuda=2)
    assert resolve_device("cuda:1") == "cuda:1"
    with pytest.raises(PotstillError, match=r"train.device=cuda:2: there are 2 CUDA devices"):
        resolve_device("cuda:2", "train.device")
    with pytest.raises(PotstillError, match=r"eval.device=mps: MPS is not available"):
        resolve_device("mps", "eval.device")
    machine(cuda=0)
    with pytest.raises(PotstillError, match=r"--device=cuda: torch sees no CUDA GPU"):
        resolve_device("cuda", "--device")
    with pytest.raises(PotstillError, match=r"--device=gpu: not a device"):
        resolve_device("gpu", "--device")


@pytest.mark.parametrize("device, bf16, expected", [("cuda", True, "bf16"), ("cuda:1", True, "bf16"),
                                                    ("cuda", False, "no"), ("mps", True, "no"), ("cpu", True, "no")])
def test_mixed_precision_auto_is_bf16_where_the_gpu_has_it(machine, device, bf16, expected):
    machine(cuda=2, bf16=bf16)
    assert resolve_mixed_precision("auto", device) == expected
    assert resolve_mixed_precision("fp16", device) == "fp16"  # an explicit choice is kept


def test_each_stage_takes_the_top_level_device_unless_it_names_its_own(machine):
    machine(cuda=2)
    recipe = load_recipe(RECIPE)
    assert recipe.device == "auto" and [recipe.device_for(s) for s in ("teacher", "train", "eval")] == ["cuda"] * 3
    recipe = load_recipe(RECIPE, ["device=cpu", "teacher.device=cuda:1", "eval.device=auto"])
    assert [recipe.device_for(s) for s in ("teacher", "train", "eval")] == ["cuda:1", "cpu", "cuda"]
    with pytest.raises(PotstillError, match=r"train.device: String should match pattern"):
        load_recipe(RECIPE, ["train.device=gpu0"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA GPU")
def test_asking_for_a_missing_gpu_is_one_line_and_exit_2(tmp_path, capsys):
    assert main(["generate", str(RECIPE), "teacher.device=cuda", f"output_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert "teacher.device=cuda: torch sees no CUDA GPU" in err and err.count("\n") == 1


GIB = 2**30


@pytest.mark.parametrize("free_gib, vocab, hidden, dtype_bytes", [(117, 151_936, 896, 2), (60, 151_936, 3584, 4),
                                                                  (20, 32_000, 2048, 2), (3, 128_256, 4096, 2)])
def test_the_auto_chunk_is_the_largest_power_of_two_that_fits_its_share(free_gib, vocab, hidden, dtype_bytes):
    from potstill.devices import CHUNK_SHARE, chunk_bytes_per_row, pick_chunk_size

    chunk = pick_chunk_size(free_gib * GIB, vocab, hidden, dtype_bytes)
    assert chunk & (chunk - 1) == 0 and 64 <= chunk <= 8192

    def fits(rows):  # the head's float32 gradient and its copy, plus the chunk's rows
        return 8 * vocab * hidden + rows * chunk_bytes_per_row(vocab, dtype_bytes) <= CHUNK_SHARE * free_gib * GIB
    assert chunk == 8192 or (fits(chunk) and not fits(2 * chunk)) or (chunk == 64 and not fits(64))


def test_the_auto_chunk_grows_with_free_memory_and_shrinks_with_the_vocabulary():
    from potstill.devices import pick_chunk_size

    # an H200 after setup (0.5B student, 7B teacher in bf16): 4096 rows, ~18 GiB of its 117 free
    assert pick_chunk_size(117 * GIB, 151_936, 896, 2) == 4096
    sizes = [pick_chunk_size(g * GIB, 151_936, 896, 2) for g in (1, 4, 16, 64, 256, 1024)]
    assert sizes == sorted(sizes) and sizes[0] == 64 and sizes[-1] == 8192
    assert pick_chunk_size(16 * GIB, 32_000, 896, 2) > pick_chunk_size(16 * GIB, 256_000, 896, 2)
    assert pick_chunk_size(16 * GIB, 151_936, 896, 4) <= pick_chunk_size(16 * GIB, 151_936, 896, 2)


def test_auto_chunk_reads_free_cuda_memory_and_is_fixed_elsewhere(monkeypatch):
    from potstill.devices import CPU_CHUNK, pick_chunk_size, resolve_chunk_size

    asked = []
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: asked.append(device) or (40 * GIB, 80 * GIB))
    assert resolve_chunk_size("auto", "cuda:1", 151_936, 896, 2) == pick_chunk_size(40 * GIB, 151_936, 896, 2)
    assert asked == [torch.device("cuda:1")]
    assert resolve_chunk_size("auto", "cpu", 151_936, 896, 4) == resolve_chunk_size("auto", "mps", 10, 4, 4) == CPU_CHUNK
    assert resolve_chunk_size(0, "cuda", 151_936, 896, 2) == 0 and resolve_chunk_size(7, "cpu", 10, 4, 4) == 7
    assert len(asked) == 1


def test_a_chunk_from_the_cache_is_sized_by_its_own_bytes(monkeypatch):
    """Sparse targets hold 24 bytes a row and vocabulary entry (docs/memory.md's check), a dense
    teacher's logits 30 (bf16) or 36 (float32): the cache gets the larger chunk the same memory fits."""
    from potstill.devices import chunk_bytes_per_row, pick_chunk_size, resolve_chunk_size

    assert chunk_bytes_per_row(1000, 2, dense_teacher=False) == chunk_bytes_per_row(1000, 4, dense_teacher=False) == 24_000
    assert chunk_bytes_per_row(1000, 2) == 30_000 and chunk_bytes_per_row(1000, 4) == 36_000
    free = 13 * GIB  # Qwen's vocabulary in float32: a quarter, less the head's gradient, fits 439 dense rows (256), 658 cached (512)
    dense, cached = pick_chunk_size(free, 151_936, 896, 4), pick_chunk_size(free, 151_936, 896, 4, dense_teacher=False)
    assert cached == 2 * dense
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free, 80 * GIB))
    assert resolve_chunk_size("auto", "cuda", 151_936, 896, 4, dense_teacher=False) == cached
