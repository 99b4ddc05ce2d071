"""Where the training step reads device values back on the host (each such read stalls a GPU).

A CUDA kernel launch returns at once; the host only waits when it needs a value: ``.item()``,
``float(t)``, ``if t:``, ``.tolist()``, ``.cpu()``, a boolean-mask index (its size is data
dependent). One such read per step keeps the GPU idle while the host catches up, so
``engine.train_one_epoch`` allows exactly two kinds (its docstring):

- the non-finite guard: one read per step (a NaN / inf loss must never reach the weights);
- the logging read-back: one read per loss term every ``print_freq`` steps.

Two ways to count, used by ``tests/tools/test_host_sync.py`` and ``benchmarks/gpu_check.py``:

- :class:`HostReadCounter` patches those ``torch.Tensor`` methods and records the repository
  line that triggered each call. It works on CPU, where no read really waits, so the test
  suite can check the training step without a GPU. With ``device_only`` (on CUDA) only reads
  of non-CPU tensors count, which are exactly the synchronising ones.
- :func:`cuda_sync_warnings` turns on ``torch.cuda.set_sync_debug_mode("warn")``, which also
  sees synchronisations no Python method shows (a blocking host-to-device copy, ``nonzero``).

Nothing here runs on import.
"""
import contextlib
import linecache
import sys
import traceback
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine import TrainState, train_one_epoch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
READ_METHODS = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__")
MASK_METHODS = ("__getitem__", "__setitem__")

# The reads train_one_epoch's step is allowed, by kind: (file, functions, text on the line,
# library file the read came through). The functions are those of engine.py that make the read.
ALLOWED_SITES = {
    "non_finite_guard": ("engine.py", ("_finite_on_every_rank",), "isfinite", ""),
    # LossWindow.mean_losses; a dict comprehension runs in its own frame before Python 3.12.
    "logging": ("engine.py", ("mean_losses", "<dictcomp>"), ".item()", ""),
    # RetinaNet.forward validates the targets before moving them to the device: the
    # loader's targets are host tensors, so these reads cost nothing on a GPU.
    "host_side_target_checks": ("model/retinanet.py", ("_check_targets",), "", ""),
    # Adam's step counters live on the host unless the optimizer is fused or capturable
    # (utils/training/optim.py makes it fused on CUDA, where the counters move to the GPU and are not read).
    "optimizer_host_counters": ("engine.py", ("_optimizer_step",), "step(optimizer)", "torch/optim/"),
}


@dataclass
class HostRead:
    method: str
    file: str      # repository-relative path of the innermost repository frame
    line: int
    function: str
    source: str    # that line's text
    via: str       # the library file that made the call, if not the repository itself

    @property
    def kind(self) -> str:
        """A key of :data:`ALLOWED_SITES`, or "unexpected"."""
        for kind, (file, functions, text, via) in ALLOWED_SITES.items():
            if self.file == file and self.function in functions and text in self.source \
                    and self.via.startswith(via) and (via or not self.via):
                return kind
        return "unexpected"

    def where(self) -> str:
        via = f" (via {self.via})" if self.via else ""
        return f"{self.file}:{self.line} in {self.function}: {self.method}{via}: {self.source}"


def _is_mask_index(index) -> bool:
    items = index if isinstance(index, tuple) else (index,)
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in items)


class HostReadCounter:
    """Context manager recording every host read of a tensor while it is active.

    ``device_only``: count only tensors that are not on the CPU (use on CUDA); on CPU every
    read counts, since nothing tells a future device tensor from a host one.
    """

    def __init__(self, device_only: bool = False):
        self.device_only = device_only
        self.reads = []
        self._originals = {}
        self._active = False

    def _record(self, tensor, method: str) -> None:
        if self._active or (self.device_only and tensor.device.type == "cpu"):
            return
        self._active = True  # reads made while recording (str(), linecache) do not count
        try:
            frame, via = sys._getframe(2), ""
            while frame is not None:
                path = Path(frame.f_code.co_filename)
                library = "site-packages" in path.parts  # (a virtual environment may sit inside the repo)
                if not library and path.is_relative_to(REPO) and path.resolve() != Path(__file__).resolve():
                    break
                if not via and library:
                    via = "/".join(path.parts[path.parts.index("site-packages") + 1:])
                frame = frame.f_back
            if frame is None:
                return
            file = Path(frame.f_code.co_filename).relative_to(REPO).as_posix()
            source = linecache.getline(frame.f_code.co_filename, frame.f_lineno).strip()
            self.reads.append(HostRead(method, file, frame.f_lineno, frame.f_code.co_name, source, via))
        finally:
            self._active = False

    def _wrap(self, name: str, original):
        counter = self

        if name in MASK_METHODS:
            def wrapper(tensor, index, *args):
                if _is_mask_index(index):
                    counter._record(tensor, f"{name}[bool mask]")
                return original(tensor, index, *args)
        else:
            def wrapper(tensor, *args, **kwargs):
                counter._record(tensor, name)
                return original(tensor, *args, **kwargs)
        return wrapper

    def __enter__(self):
        for name in READ_METHODS + MASK_METHODS:
            self._originals[name] = torch.Tensor.__dict__.get(name)
            setattr(torch.Tensor, name, self._wrap(name, getattr(torch.Tensor, name)))
        return self

    def __exit__(self, *exc):
        for name, original in self._originals.items():
            if original is None:
                delattr(torch.Tensor, name)  # back to the inherited C method
            else:
                setattr(torch.Tensor, name, original)
        self._originals.clear()
        return False

    def by_kind(self) -> dict:
        counts = {kind: 0 for kind in (*ALLOWED_SITES, "unexpected")}
        for read in self.reads:
            counts[read.kind] += 1
        return counts

    def unexpected(self) -> list:
        return sorted({read.where() for read in self.reads if read.kind == "unexpected"})


@dataclass
class SyncWarning:
    """One synchronisation CUDA's sync debug mode reported, with the Python stack that made it."""
    message: str
    site: str    # innermost Python frame: the library line that launched the synchronising call
    origin: str  # innermost repository frame outside this file: which of our lines led there
    in_training_step: bool  # raised inside engine.train_one_epoch (not by this harness around it)
    stack: tuple = ()  # the innermost frames, "file:line function", innermost last


@contextlib.contextmanager
def cuda_sync_warnings():
    """Yields the list of :class:`SyncWarning` CUDA's sync debug mode raises inside the block.

    The warning's own file:line is the innermost Python frame (often a torch ``__init__.py``),
    which does not say which repository line caused it, so the stack is walked when it is issued."""
    previous = torch.cuda.get_sync_debug_mode()
    found = []

    def record(message, category, filename, lineno, file=None, line=None):
        if "synchroniz" not in str(message):
            return
        stack = traceback.extract_stack()[:-1]
        origin = next((f"{Path(frame.filename).relative_to(REPO).as_posix()}:{frame.lineno} {frame.name}"
                       for frame in reversed(stack) if _is_repository_file(frame.filename)), "?")
        in_step = any(frame.name == "train_one_epoch" and Path(frame.filename).name == "engine.py" for frame in stack)
        frames = tuple(f"{Path(frame.filename).name}:{frame.lineno} {frame.name}" for frame in stack[-6:])
        found.append(SyncWarning(str(message), f"{Path(filename).name}:{lineno}", origin, in_step, frames))

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = record
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield found
        finally:
            torch.cuda.set_sync_debug_mode(previous)


def _is_repository_file(filename: str) -> bool:
    path = Path(filename)
    return ("site-packages" not in path.parts and path.is_relative_to(REPO)
            and path.resolve() != Path(__file__).resolve())


class ReplayLoader(list):
    """Ready batches ``(images, targets, bad)`` with the batch-sampler surface train_one_epoch reads."""

    class _Sampler:
        def __init__(self, n: int):
            self.start_batch, self.batch_sampler = 0, range(n)

        def __len__(self) -> int:
            return len(self.batch_sampler)

    def __init__(self, batches):
        super().__init__(batches)
        self.batch_sampler = self._Sampler(len(self))


class _Records:
    def __init__(self):
        self.records = []

    def write(self, record, step=None):
        self.records.append(record)


def train_steps(model, batches, device, optimizer, scaler, config, amp_dtype=None) -> list:
    """Run ``engine.train_one_epoch`` over ``batches`` (one step each); returns the log records."""
    writer = _Records()
    lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    train_one_epoch(model, optimizer, lr_scheduler, scaler, ReplayLoader(batches), torch.device(device),
                    TrainState(), config, writer, lambda state: None, amp_dtype=amp_dtype)
    return writer.records


def count_training_reads(model, batches, device, optimizer, scaler, config, amp_dtype=None) -> dict:
    """Host reads of ``len(batches) - 1`` training steps, after one untimed warm-up step (which fills
    the anchor cache and the optimizer state). Returns the counts by kind, what the allowed kinds
    predict, the unexpected call sites, and on CUDA the sync debug mode's count."""
    device = torch.device(device)
    train_steps(model, batches[:1], device, optimizer, scaler, config, amp_dtype)
    steps = batches[1:]
    cuda = device.type == "cuda"
    sync_context = cuda_sync_warnings() if cuda else contextlib.nullcontext([])
    with HostReadCounter(device_only=cuda) as counter, sync_context as sync_warnings:
        records = train_steps(model, steps, device, optimizer, scaler, config, amp_dtype)
    counts = counter.by_kind()
    num_terms = len([k for k in records[0] if k in ("classification", "bbox_regression")]) if records else 0
    result = {"steps": len(steps), "log_records": len(records), "reads": counts,
              "expected": {"non_finite_guard": len(steps), "logging": num_terms * len(records)},
              "unexpected_sites": counter.unexpected()}
    if cuda:
        # Only the step's own synchronisations count: on an H200 (torch 2.11) switching the debug
        # mode on (torch.cuda.set_sync_debug_mode, first call) reported one itself, which no
        # training run pays. Their stacks stay in the report.
        step = [w for w in sync_warnings if w.in_training_step]
        result["cuda_sync_debug"] = {
            "synchronisations": len(step), "sites": sorted({f"{w.origin} (via {w.site})" for w in step}),
            "allowed": len(steps) + num_terms * len(records),
            "outside_training_step": [" < ".join(reversed(w.stack)) for w in sync_warnings if not w.in_training_step]}
    return result
