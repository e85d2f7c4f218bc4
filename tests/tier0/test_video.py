"""Video decoding/sampling on a real file written by the test (PyAV, mpeg4)."""

import pytest
import torch

from lvlm_fast import video


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    n = 23
    frames = torch.zeros(n, 32, 48, 3, dtype=torch.uint8)
    for t in range(n):
        frames[t] = (t * 10) % 256
    path = str(tmp_path_factory.mktemp("vid") / "clip.mp4")
    video.write_video(path, frames, fps=5)
    return path, frames


def test_probe(clip):
    path, _ = clip
    info = video.probe(path)
    assert (info.num_frames, info.width, info.height) == (23, 48, 32)
    assert info.fps == pytest.approx(5.0)
    assert info.duration_s == pytest.approx(23 / 5)


def test_stream_in_chunks_matches_content(clip):
    path, frames = clip
    idx = video.sample_indices(23, "uniform", count=7)
    assert idx == [0, 4, 7, 11, 15, 18, 22]
    got_idx, sizes = [], []
    for chunk_idx, chunk in video.iter_frames(path, idx, chunk_size=3, progress=True):
        assert chunk.dtype == torch.uint8 and chunk.shape[1:] == (32, 48, 3)
        sizes.append(chunk.shape[0])
        got_idx += chunk_idx
        want = frames[chunk_idx].float().mean(dim=(1, 2, 3))
        # lossy codec + limited-range YUV: within a few levels of the painted value
        assert torch.allclose(chunk.float().mean(dim=(1, 2, 3)), want, atol=8)
    assert got_idx == idx and sizes == [3, 3, 1]


def test_repeated_indices_and_read_frames(clip):
    path, _ = clip
    out = video.read_frames(path, [2, 2, 5])
    assert out.shape[0] == 3 and torch.equal(out[0], out[1])


def test_sampling_modes():
    assert video.sample_indices(23, "fps", fps=2, source_fps=5) == [0, 2, 5, 8, 10, 12, 15, 18, 20]
    # SlowFast-LLaVA: seg = (n-1)/T, (round(seg*i) + round(seg*(i+1))) // 2
    assert video.sample_indices(23, "segment_midpoints", count=5) == [2, 6, 11, 15, 20]
    assert video.sample_indices(1, "uniform", count=1) == [0]


def test_more_frames_than_exist_policy():
    with pytest.raises(ValueError, match="asked for 30 frames but the video has 23"):
        video.sample_indices(23, "uniform", count=30)
    assert video.sample_indices(23, "uniform", count=30, on_short="all") == list(range(23))


def test_bad_sampling_arguments():
    with pytest.raises(ValueError, match="mode"):
        video.sample_indices(10, "random", count=2)
    with pytest.raises(ValueError, match="count"):
        video.sample_indices(10, "uniform")
    with pytest.raises(ValueError, match="fps"):
        video.sample_indices(10, "fps", fps=0, source_fps=5)


def test_missing_corrupt_and_empty_files(tmp_path):
    with pytest.raises(video.VideoReadError, match="not found"):
        video.probe(str(tmp_path / "nope.mp4"))
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"this is not a video" * 10)
    with pytest.raises(video.VideoReadError, match="cannot read"):
        video.probe(str(bad))
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    with pytest.raises(video.VideoReadError):
        video.probe(str(empty))


def test_request_past_end(clip):
    path, _ = clip
    with pytest.raises(video.VideoReadError, match="ended after 23 frames"):
        list(video.iter_frames(path, [1, 40]))


def test_unsorted_indices_rejected(clip):
    with pytest.raises(ValueError, match="sorted"):
        list(video.iter_frames(clip[0], [3, 1]))


# ------------------------------------------------------------------ host frame buffer (9.15)
def test_caching_allocator_rounds_to_power_of_two_registration_does_not():
    nbytes = 10_240 * 3 * 384 * 384 * 2  # 10,240 frames at 384 px in bf16: 9.06 GB
    assert video.caching_allocator_pinned_bytes(nbytes) == 2**34  # 17.2 GB locked
    page = 4096
    for ptr in (0, 64, 4095, 4096 * 7 + 1):
        got = video.registered_pinned_bytes(ptr, nbytes, page)
        assert got % page == 0 and nbytes <= got < nbytes + 2 * page
    assert video.registered_pinned_bytes(0, 4096, 4096) == 4096
    assert video.registered_pinned_bytes(1, 4096, 4096) == 8192
    assert video.registered_pinned_bytes(5, 0, 4096) == 0
    assert video.caching_allocator_pinned_bytes(0) == 0
    assert video.caching_allocator_pinned_bytes(4097) == 8192
    with pytest.raises(ValueError, match="nbytes"):
        video.caching_allocator_pinned_bytes(-1)
    with pytest.raises(ValueError, match="nbytes"):
        video.registered_pinned_bytes(0, -1)


class _FakeCudart:
    """Records cudaHostRegister/Unregister (no CUDA on the CPU test machine)."""

    def __init__(self, err: int = 0) -> None:
        self.err, self.calls = err, []

    def cudaHostRegister(self, ptr, size, flags):
        self.calls.append(("register", ptr, size, flags))
        return self.err

    def cudaHostUnregister(self, ptr):
        self.calls.append(("unregister", ptr))
        return 0


def test_host_frame_buffer_registers_exactly_its_bytes(monkeypatch):
    fake = _FakeCudart()
    syncs = []
    monkeypatch.setattr(torch.cuda, "cudart", lambda: fake)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: syncs.append(1))
    with video.HostFrameBuffer((5, 3, 8, 8), torch.bfloat16, pin=True) as buf:
        assert buf.tensor.shape == (5, 3, 8, 8) and buf.tensor.dtype == torch.bfloat16
        assert buf.nbytes == 5 * 3 * 8 * 8 * 2
        ptr = buf.tensor.data_ptr()
        assert fake.calls == [("register", ptr, buf.nbytes, 1)]
        assert buf.pin_method == "cudaHostRegister"
        assert buf.pinned_bytes == video.registered_pinned_bytes(ptr, buf.nbytes)
    # released after a device sync, once; the report value stays
    assert syncs == [1] and fake.calls[-1] == ("unregister", ptr)
    buf.release()
    assert len(fake.calls) == 2 and buf.pinned_bytes > 0


def test_host_frame_buffer_falls_back_to_pageable(monkeypatch):
    fake = _FakeCudart(err=2)  # cudaErrorMemoryAllocation
    monkeypatch.setattr(torch.cuda, "cudart", lambda: fake)
    monkeypatch.setattr(video, "_clear_cuda_error", lambda: None)
    with pytest.warns(RuntimeWarning, match="could not page-lock"):
        buf = video.HostFrameBuffer((2, 3, 4, 4), torch.float32, pin=True)
    assert buf.pinned_bytes == 0 and "cudaHostRegister failed with cudaError 2" in buf.pin_method
    buf.release()
    assert [c[0] for c in fake.calls] == ["register"]  # nothing to unregister


def test_host_frame_buffer_unpinned_on_cpu():
    buf = video.HostFrameBuffer((3, 3, 4, 4), torch.float32, pin=False)
    assert buf.pinned_bytes == 0 and buf.pin_method == "pageable"
    assert not buf.tensor.is_pinned()
    buf.release()
    with pytest.raises(TypeError, match="pin must be a bool"):
        video.HostFrameBuffer((1,), torch.float32, pin="yes")
