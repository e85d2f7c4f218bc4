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
"""

from __future__ import annotations

import itertools
import os
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
