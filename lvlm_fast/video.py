"""Frame decoding and sampling for long videos (PyAV).

Streams frames in chunks: only the requested frames are converted to RGB and at most
``chunk_size`` of them are held at once, so an hour of video never sits in memory.

Sampling (all return sorted, unique-or-repeated frame indices into the decoded stream):
  * ``uniform``: ``count`` frames at ``round(linspace(0, n - 1, count))``.
  * ``fps``: one frame every ``1 / fps`` seconds from t = 0 (frame ``round(k * src_fps / fps)``).
  * ``segment_midpoints``: SlowFast-LLaVA's rule, ``seg = (n - 1) / count``, frame ``i`` is
    ``(round(seg * i) + round(seg * (i + 1))) // 2``.
Asking for more frames than the video has (``uniform``/``segment_midpoints`` with
``count > n``) raises ``ValueError`` by default; ``on_short="all"`` returns every frame
instead (documented policy, never silent repetition).

Host buffer for the decoded frames (:class:`HostFrameBuffer`): one contiguous
(T, 3, S, S) tensor, page-locked for fast asynchronous uploads on CUDA. Not with
``pin_memory=True``: torch's pinned caching allocator rounds every request up to the next
power of two, so 10,240 frames at 384 px in bf16 (9.06 GB) would lock 17.2 GB
(:func:`caching_allocator_pinned_bytes`). The buffer is a plain allocation registered
with ``cudaHostRegister`` instead, which locks only the pages it covers
(:func:`registered_pinned_bytes`); ``pinned_bytes`` reports what was locked.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

SAMPLING_MODES = ("uniform", "fps", "segment_midpoints")


class VideoReadError(ValueError):
    """The file is missing, unreadable, has no video stream, or has no frames."""


@dataclass(frozen=True)
class VideoInfo:
    path: str
    num_frames: int
    fps: float
    width: int
    height: int

    @property
    def duration_s(self) -> float:
        return self.num_frames / self.fps if self.fps > 0 else 0.0


def _open(path: str):
    import av  # lazy: keeps `import lvlm_fast` light

    if not os.path.isfile(path):
        raise VideoReadError(f"video file not found: {path!r}")
    try:
        container = av.open(path)
    except Exception as exc:
        raise VideoReadError(f"cannot read video {path!r}: {exc}") from exc
    if not container.streams.video:
        container.close()
        raise VideoReadError(f"{path!r} has no video stream")
    return container


def probe(path: str) -> VideoInfo:
    """Frame count, fps and size. Counts packets when the container does not say."""
    container = _open(path)
    try:
        stream = container.streams.video[0]
        fps = float(stream.average_rate or stream.guessed_rate or 0.0)
        n = int(stream.frames or 0)
        if n <= 0:  # e.g. some webm/mkv: count by demuxing (no decode)
            n = sum(1 for pkt in container.demux(stream) if pkt.size > 0)
        info = VideoInfo(path, n, fps, int(stream.width), int(stream.height))
    except VideoReadError:
        raise
    except Exception as exc:
        raise VideoReadError(f"cannot read video {path!r}: {exc}") from exc
    finally:
        container.close()
    if info.num_frames <= 0:
        raise VideoReadError(f"{path!r} has no frames (zero-length video)")
    return info


def sample_indices(
    num_frames: int,
    mode: str = "uniform",
    *,
    count: int | None = None,
    fps: float | None = None,
    source_fps: float | None = None,
    on_short: str = "error",
) -> list[int]:
    """Frame indices to decode; see the module docstring for each mode."""
    if num_frames <= 0:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    if mode not in SAMPLING_MODES:
        raise ValueError(f"mode must be one of {SAMPLING_MODES}, got {mode!r}")
    if on_short not in ("error", "all"):
        raise ValueError(f"on_short must be 'error' or 'all', got {on_short!r}")
    if mode == "fps":
        if fps is None or fps <= 0 or source_fps is None or source_fps <= 0:
            raise ValueError(f"mode='fps' needs fps > 0 and source_fps > 0, got fps={fps}, "
                             f"source_fps={source_fps}")
        step = source_fps / fps
        k = np.arange(int(np.floor((num_frames - 1) / step)) + 1)
        return np.minimum(np.rint(k * step).astype(np.int64), num_frames - 1).tolist()
    if count is None or count < 1:
        raise ValueError(f"mode={mode!r} needs count >= 1, got {count}")
    if count > num_frames:
        if on_short == "error":
            raise ValueError(f"asked for {count} frames but the video has {num_frames}; pass "
                             "on_short='all' to take every frame instead")
        return list(range(num_frames))
    if mode == "uniform":
        return np.rint(np.linspace(0, num_frames - 1, count)).astype(np.int64).tolist()
    seg = (num_frames - 1) / count
    return [(round(seg * i) + round(seg * (i + 1))) // 2 for i in range(count)]


def iter_frames(
    path: str,
    indices: list[int],
    *,
    chunk_size: int = 64,
    progress: bool = False,
) -> Iterator[tuple[list[int], torch.Tensor]]:
    """Yield ``(frame_indices, frames)`` chunks, frames uint8 (c, H, W, 3) RGB, in order.

    ``indices`` must be sorted (repeats allowed). Decodes sequentially once; frames not
    requested are skipped without RGB conversion.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if not indices:
        return
    if any(b < a for a, b in itertools.pairwise(indices)):
        raise ValueError("indices must be sorted ascending")
    if indices[0] < 0:
        raise ValueError(f"indices must be >= 0, got {indices[0]}")
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(indices), desc=f"decode {os.path.basename(path)}", unit="frame")
    container = _open(path)
    pos = 0
    frame_no = -1
    buf_idx: list[int] = []
    buf: list[np.ndarray] = []
    try:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        for frame_no, frame in enumerate(container.decode(stream)):
            if pos >= len(indices):
                break
            if indices[pos] != frame_no:
                continue
            rgb = frame.to_ndarray(format="rgb24")
            while pos < len(indices) and indices[pos] == frame_no:
                buf_idx.append(frame_no)
                buf.append(rgb)
                pos += 1
            if len(buf) >= chunk_size:
                if bar is not None:
                    bar.update(len(buf))
                yield buf_idx, torch.from_numpy(np.stack(buf))
                buf_idx, buf = [], []
        if buf:
            if bar is not None:
                bar.update(len(buf))
            yield buf_idx, torch.from_numpy(np.stack(buf))
    except VideoReadError:
        raise
    except Exception as exc:
        raise VideoReadError(f"error decoding {path!r}: {exc}") from exc
    finally:
        container.close()
        if bar is not None:
            bar.close()
    if pos < len(indices):
        raise VideoReadError(f"{path!r} ended after {frame_no + 1} frames; "
                             f"frame {indices[pos]} was requested")


def read_frames(path: str, indices: list[int]) -> torch.Tensor:
    """All requested frames at once, uint8 (len(indices), H, W, 3). For short clips."""
    chunks = [f for _, f in iter_frames(path, indices, chunk_size=max(1, len(indices)))]
    if not chunks:
        raise ValueError("indices is empty")
    return torch.cat(chunks)


def write_video(path: str, frames: torch.Tensor | np.ndarray, fps: int = 10,
                codec: str = "mpeg4", progress: bool = False) -> None:
    """Encode uint8 (T, H, W, 3) RGB frames (H, W even). Used by tests and demos."""
    import av

    arr = frames.numpy() if isinstance(frames, torch.Tensor) else np.asarray(frames)
    if arr.ndim != 4 or arr.shape[-1] != 3 or arr.dtype != np.uint8:
        raise ValueError(f"frames must be uint8 (T, H, W, 3), got {arr.dtype} {arr.shape}")
    it = range(arr.shape[0])
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(it, desc=f"encode {os.path.basename(path)}", unit="frame")
    with av.open(path, mode="w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height = arr.shape[2], arr.shape[1]
        stream.pix_fmt = "yuv420p"
        stream.options = {"qscale": "2"} if codec == "mpeg4" else {}
        for t in it:
            for packet in stream.encode(av.VideoFrame.from_ndarray(arr[t], format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


# --------------------------------------------------------------------------- host frame buffer
def page_size() -> int:
    """The host page size (the unit ``cudaHostRegister`` locks)."""
    try:
        return int(os.sysconf("SC_PAGE_SIZE"))
    except (AttributeError, ValueError, OSError):  # non-POSIX
        return 4096


def caching_allocator_pinned_bytes(nbytes: int) -> int:
    """Bytes torch's pinned caching host allocator (``pin_memory=True``) locks for one
    request of ``nbytes``: the next power of two (9.06e9 -> 2**34 = 17.2e9)."""
    if nbytes < 0:
        raise ValueError(f"nbytes must be >= 0, got {nbytes}")
    return 0 if nbytes == 0 else 1 << (nbytes - 1).bit_length()


def registered_pinned_bytes(ptr: int, nbytes: int, page: int | None = None) -> int:
    """Bytes ``cudaHostRegister(ptr, nbytes)`` locks: the whole pages that the range
    ``[ptr, ptr + nbytes)`` touches (at most one page more than ``nbytes`` at each end)."""
    if nbytes < 0 or ptr < 0:
        raise ValueError(f"ptr and nbytes must be >= 0, got {ptr}, {nbytes}")
    if nbytes == 0:
        return 0
    page = page_size() if page is None else page
    lo = ptr // page * page
    hi = -(-(ptr + nbytes) // page) * page
    return hi - lo


class HostFrameBuffer:
    """One contiguous host tensor for decoded frames, page-locked exactly on CUDA.

    ``HostFrameBuffer(shape, dtype, pin=True)``: ``tensor`` is a plain ``torch.empty``;
    with ``pin`` it is registered with ``cudaHostRegister`` (portable), so
    ``tensor.is_pinned()`` holds, ``.to(cuda, non_blocking=True)`` is asynchronous, and
    ``pinned_bytes`` = :func:`registered_pinned_bytes` (vs
    :func:`caching_allocator_pinned_bytes` with ``pin_memory=True``). If registration
    fails (e.g. a locked-memory limit) the buffer stays pageable (a warning says why;
    ``pin_method`` reports it). :meth:`release` (also on ``with`` exit) synchronizes the
    device, so no asynchronous copy still reads the pages, then unregisters them; the
    tensor stays usable as pageable memory.
    """

    def __init__(self, shape: tuple[int, ...], dtype: torch.dtype, *, pin: bool) -> None:
        if not isinstance(pin, bool):
            raise TypeError(f"pin must be a bool, got {type(pin).__name__}")
        self.tensor = torch.empty(shape, dtype=dtype)
        self.nbytes = self.tensor.numel() * self.tensor.element_size()
        self.pinned_bytes = 0
        self.pin_method = "pageable"
        self._registered: int | None = None
        if pin and self.nbytes > 0:
            self._register()

    def _register(self) -> None:
        ptr = self.tensor.data_ptr()
        err = int(torch.cuda.cudart().cudaHostRegister(ptr, self.nbytes, 1))  # 1: portable
        if err != 0:
            _clear_cuda_error()  # a failed register leaves it as the runtime's last error
            self.pin_method = f"pageable (cudaHostRegister failed with cudaError {err})"
            warnings.warn(f"could not page-lock the {self.nbytes} byte frame buffer "
                          f"(cudaHostRegister error {err}); uploads will be synchronous",
                          RuntimeWarning, stacklevel=3)
            return
        self._registered = ptr
        self.pinned_bytes = registered_pinned_bytes(ptr, self.nbytes)
        self.pin_method = "cudaHostRegister"

    def release(self) -> None:
        """Unregister the pages (after a device sync); idempotent. ``pinned_bytes`` keeps
        the amount that was locked, for the report."""
        if self._registered is None:
            return
        torch.cuda.synchronize()
        torch.cuda.cudart().cudaHostUnregister(self._registered)
        self._registered = None

    def __enter__(self) -> HostFrameBuffer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def __del__(self) -> None:  # best effort: unregister before the memory is freed
        with contextlib.suppress(Exception):  # interpreter shutdown: CUDA may be gone
            self.release()


def _clear_cuda_error() -> None:
    """Reset the CUDA runtime's last error (``cudaGetLastError``) after a failed
    ``cudaHostRegister``, so torch's next launch check does not report it."""
    import ctypes

    for name in ("libcudart.so.13", "libcudart.so.12", "libcudart.so.11.0", "libcudart.so"):
        try:
            ctypes.CDLL(name).cudaGetLastError()
            return
        except (OSError, AttributeError):
            continue
