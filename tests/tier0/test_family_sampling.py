"""Frame sampling per family (:meth:`ModelFamily.sample_indices`): the Qwen families pick
exactly the frames their transformers video processor would for ``frames=N`` / ``fps=F``
(reference: the processor's own ``sample_frames``, run from the installed transformers
source), LLaVA-OneVision keeps the package's rule, and the pipeline uses the family's rule.

torchvision is not installed, so the processor classes cannot be imported; the reference
is the ``sample_frames`` method's source, taken out of the installed
``video_processing_qwen2_vl.py`` / ``video_processing_qwen3_vl.py`` with :mod:`ast` and run
on a stand-in ``self`` that carries the class's literal attributes (min/max frames,
temporal_patch_size, fps) plus the overrides a checkpoint config would set."""

from __future__ import annotations

import ast
import contextlib
import logging
import math
import os
import re
from types import SimpleNamespace

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers.video_utils import VideoMetadata  # noqa: E402

from lvlm_fast import video as lv  # noqa: E402
from lvlm_fast.models import pipeline  # noqa: E402
from lvlm_fast.models.families.base import DEFAULT_FRAMES, ModelFamily  # noqa: E402
from lvlm_fast.models.families.llava_onevision import LlavaOneVisionFamily  # noqa: E402
from lvlm_fast.models.families.qwen2_5_vl import Qwen25VLFamily  # noqa: E402
from lvlm_fast.models.families.qwen3_5 import Qwen35Family  # noqa: E402
from lvlm_fast.models.families.qwen3_vl import Qwen3VLFamily  # noqa: E402

TF = os.path.dirname(transformers.__file__)
QWEN2 = ("models/qwen2_vl/video_processing_qwen2_vl.py", "Qwen2VLVideoProcessor")
QWEN3 = ("models/qwen3_vl/video_processing_qwen3_vl.py", "Qwen3VLVideoProcessor")


def processor_sampler(where: tuple[str, str], **config):
    """transformers' ``<class>.sample_frames`` from the installed source (see module doc):
    returns ``f(total, video_fps, **kwargs) -> list[int]``. ``config``: the processor's
    attributes a checkpoint's preprocessing config sets (min_frames, max_frames, ...)."""
    path = os.path.join(TF, where[0])
    with open(path) as fh:
        tree = ast.parse(fh.read())
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == where[1])
    attrs = {"num_frames": None, "fps": None}  # BaseVideoProcessor's kwargs default to None
    for node in cls.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 \
                and isinstance(node.targets[0], ast.Name):
            # non-literal attributes (sizes, means) are not used by sample_frames
            with contextlib.suppress(ValueError):
                attrs[node.targets[0].id] = ast.literal_eval(node.value)
    fn = next(n for n in cls.body if isinstance(n, ast.FunctionDef)
              and n.name == "sample_frames")
    ns = {"math": math, "np": np, "torch": torch, "VideoMetadata": VideoMetadata,
          "logger": logging.getLogger("ref")}
    exec(compile(ast.Module(body=[fn], type_ignores=[]), path, "exec"), ns)
    attrs.update(config)
    self = SimpleNamespace(**attrs)

    def sample(total: int, video_fps: float | None, **kwargs) -> list[int]:
        meta = VideoMetadata(total_num_frames=total, fps=video_fps)
        return [int(i) for i in ns["sample_frames"](self, meta, **kwargs)]

    return sample


def ref_fps(indices: list[int], total: int, video_fps: float) -> float:
    """transformers' ``VideoMetadata.sampled_fps`` of those indices."""
    return VideoMetadata(total_num_frames=total, fps=video_fps,
                         frames_indices=indices).sampled_fps


# (total frames, video fps, kwargs)
QWEN2_CASES = [
    (12, 10.0, {"frames": 5}),  # odd N: rounded to 4
    (12, 10.0, {"frames": 7}),  # rounded to 8
    (12, 10.0, {"frames": 6}),
    (1000, 29.97, {"frames": 33}),
    (97, 25.0, {"frames": 10}),
    (12, 10.0, {"fps": 5}),
    (120, 30.0, {"fps": 1.7}),
    (300, 30.0, {"fps": 0.1}),  # 1 frame by fps: clamped up to min_frames 4
    (100_000, 30.0, {"fps": 2}),  # 6,667 by fps: clamped down to max_frames 768
    (3, 10.0, {"fps": 1}),  # shorter than min_frames: all frames, floored to 2
    (5, 25.0, {"fps": 0.5}),
    (7, 10.0, {"fps": 100}),  # more than the video: its frames, floored to 6
]


@pytest.mark.parametrize("total,vfps,kw", QWEN2_CASES)
def test_qwen2_5_vl_equals_processor(total, vfps, kw):
    ref = processor_sampler(QWEN2)
    want = ref(total, vfps, num_frames=kw.get("frames"), fps=kw.get("fps"))
    got, rate = Qwen25VLFamily.sample_indices(total, vfps, **kw)
    assert got == want
    assert len(got) % 2 == 0
    assert rate == pytest.approx(ref_fps(want, total, vfps), rel=1e-12)


def test_qwen2_5_vl_known_values():
    """Hand-checked values of the processor's rule (guards the reference itself)."""
    assert Qwen25VLFamily.sample_indices(12, 10.0, frames=5)[0] == [0, 3, 6, 9]
    assert Qwen25VLFamily.sample_indices(300, 30.0, fps=0.1)[0] == [0, 75, 150, 225]
    assert len(Qwen25VLFamily.sample_indices(100_000, 30.0, fps=2)[0]) == 768
    assert Qwen25VLFamily.sample_indices(3, 10.0, fps=1)[0] == [0, 1]


@pytest.mark.parametrize("total,vfps,kw", [(300, 30.0, {"fps": 0.1}), (5000, 30.0, {"fps": 2}),
                                           (40, 10.0, {"fps": 1})])
def test_qwen2_5_vl_bounds_from_preprocessing_config(total, vfps, kw):
    pre = {"min_frames": 8, "max_frames": 16, "temporal_patch_size": 2}
    ref = processor_sampler(QWEN2, min_frames=8, max_frames=16)
    want = ref(total, vfps, fps=kw["fps"])
    got, _ = Qwen25VLFamily.sample_indices(total, vfps, pre=pre, **kw)
    assert got == want and 8 <= len(got) <= 16
    assert got != Qwen25VLFamily.sample_indices(total, vfps, **kw)[0]  # the config matters


def test_qwen2_5_vl_errors_where_the_processor_fails():
    ref = processor_sampler(QWEN2)
    for total, vfps, kw, match in [(12, 10.0, {"frames": 1}, "frames=1"),
                                   (1, 10.0, {"fps": 1}, "fps=1"),
                                   (12, 10.0, {"frames": 15}, "frames=15")]:
        with pytest.raises((ValueError, ZeroDivisionError)):
            ref(total, vfps, num_frames=kw.get("frames"), fps=kw.get("fps"))
        with pytest.raises(ValueError, match=match):
            Qwen25VLFamily.sample_indices(total, vfps, **kw)
    with pytest.raises(ValueError, match="fps=2"):
        Qwen25VLFamily.sample_indices(12, None, fps=2)
    with pytest.raises(ValueError, match="total_frames"):
        Qwen25VLFamily.sample_indices(0, 10.0, frames=4)
    with pytest.raises(ValueError, match="exclusive"):
        Qwen25VLFamily.sample_indices(12, 10.0, frames=4, fps=2)


def test_qwen2_5_vl_default():
    """Neither frames nor fps: every frame of a short video (the processor without
    sampling), else DEFAULT_FRAMES by the processor's rule."""
    assert Qwen25VLFamily.sample_indices(13, 10.0)[0] == list(range(13))
    ref = processor_sampler(QWEN2)
    assert Qwen25VLFamily.sample_indices(1000, 10.0)[0] == ref(1000, 10.0,
                                                                num_frames=DEFAULT_FRAMES)


QWEN3_CASES = [
    (12, 10.0, {"frames": 5}),  # odd N kept (the last temporal patch is padded)
    (1000, 29.97, {"frames": 33}),
    (6, 10.0, {"frames": 9}),  # more than the video: frames repeat
    (12, 10.0, {"fps": 5}),
    (121, 30.0, {"fps": 1.7}),
    (300, 30.0, {"fps": 0.1}),  # clamped up to min_frames 4
    (100_000, 30.0, {"fps": 2}),  # clamped down to max_frames 768
    (3, 10.0, {"fps": 1}),  # shorter than min_frames: every frame
    (1, 10.0, {"fps": 1}),
    (50, None, {"fps": 2}),  # unknown video fps: the processor's 24
]


@pytest.mark.parametrize("family", [Qwen3VLFamily, Qwen35Family])
@pytest.mark.parametrize("total,vfps,kw", QWEN3_CASES)
def test_qwen3_vl_equals_processor(family, total, vfps, kw):
    ref = processor_sampler(QWEN3)
    want = ref(total, vfps, num_frames=kw.get("frames"), fps=kw.get("fps"))
    got, rate = family.sample_indices(total, vfps, **kw)
    assert got == want
    assert rate == pytest.approx(ref_fps(want, total, vfps or 24), rel=1e-12)


def test_qwen3_vl_differs_from_qwen2_5_vl_and_reads_its_config():
    assert Qwen3VLFamily.sample_indices(12, 10.0, frames=5)[0] == [0, 3, 6, 8, 11]
    assert Qwen25VLFamily.sample_indices(12, 10.0, frames=5)[0] == [0, 3, 6, 9]
    ref = processor_sampler(QWEN3, min_frames=6, max_frames=10)
    for total, fps in [(300, 0.1), (5000, 2.0)]:
        got, _ = Qwen3VLFamily.sample_indices(total, 30.0, fps=fps,
                                              pre={"min_frames": 6, "max_frames": 10})
        assert got == ref(total, 30.0, fps=fps) and 6 <= len(got) <= 10


def test_processor_classes_of_the_families():
    """Qwen2.5-VL checkpoints use Qwen2VLVideoProcessor, Qwen3-VL and Qwen3.5 the Qwen3-VL
    one (transformers' auto mapping): the rules tested above are the right ones."""
    with open(os.path.join(TF, "models/auto/video_processing_auto.py")) as fh:
        src = fh.read()
    # (qwen3_vl: its own video_processing_qwen3_vl.py, the default by model type)
    for model_type, proc in [("qwen2_5_vl", QWEN2[1]), ("qwen3_5", QWEN3[1])]:
        # 5.24 writes ("t", {"torchvision": "P"}), older releases ("t", "P")
        pattern = rf'\("{model_type}", (\{{"torchvision": )?"{proc}"\}}?\)'
        assert re.search(pattern, src), model_type
    assert Qwen35Family.sample_indices.__func__ is Qwen3VLFamily.sample_indices.__func__


@pytest.mark.parametrize("total,vfps,kw", [(12, 10.0, {"frames": 5}), (12, 10.0, {"fps": 5}),
                                           (100, 30.0, {"fps": 2.5}), (13, 10.0, {}),
                                           (500, 24.0, {}), (40, 10.0, {"frames": 40})])
def test_llava_onevision_keeps_the_package_rule(total, vfps, kw):
    """LLaVA-OneVision (and the default ModelFamily rule) are unchanged: round(linspace)
    for frames, one every 1/F s for fps, 32 uniform or every frame by default."""
    got, rate = LlavaOneVisionFamily.sample_indices(total, vfps, **kw)
    if "fps" in kw:
        want = lv.sample_indices(total, "fps", fps=kw["fps"], source_fps=vfps)
        assert rate == kw["fps"]
    else:
        want = lv.sample_indices(total, "uniform", count=kw.get("frames", DEFAULT_FRAMES),
                                 on_short="all")
        assert rate == pytest.approx(len(want) / (total / vfps))
    assert got == want
    assert ModelFamily.sample_indices(total, vfps, **kw) == (got, rate)
    info = SimpleNamespace(num_frames=total, fps=vfps)
    assert pipeline.sample_frames(info, kw.get("frames"), kw.get("fps")) == (got, rate)
    assert LlavaOneVisionFamily.sample_indices(12, 10.0, frames=5)[0] == [0, 3, 6, 8, 11]
    with pytest.raises(ValueError, match="asked for 13 frames"):
        LlavaOneVisionFamily.sample_indices(12, 10.0, frames=13)


def test_pipeline_sample_frames_uses_the_family_rule():
    info = SimpleNamespace(num_frames=300, fps=30.0)
    pre = {"min_frames": 8, "max_frames": 16}
    assert pipeline.sample_frames(info, None, 0.1, Qwen25VLFamily, pre) == \
        Qwen25VLFamily.sample_indices(300, 30.0, fps=0.1, pre=pre)
    assert len(pipeline.sample_frames(info, None, 0.1, Qwen25VLFamily, pre)[0]) == 8
    assert pipeline.sample_frames(info, None, 0.1) == ([0], 0.1)  # no family: package rule
    with pytest.raises(ValueError, match="frames must be an int"):
        pipeline.sample_frames(info, 0, None, Qwen25VLFamily)
