"""Reducing strategies (vilamp, vilamp-seed, slowfast, llamavid) on the tiny LLaVA-OneVision.

Each strategy is checked against a straightforward recomputation from every frame's full
patch features with the plain-PyTorch specs in ``lvlm_fast.reference`` (allowed in tests),
on meta tensors, for bad configs, and for not materialising all frames' patch features.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from lvlm_fast.models.strategies import VideoPrompt, get_strategy
from lvlm_fast.models.wrapper import LongVideoVLM
from lvlm_fast.nn import ContextContentPooling, DifferentialFeatureMerging
from lvlm_fast.nn.dfm import dfm_reference
from lvlm_fast.ops import SlowFastConfig
from lvlm_fast.profile.tracker import peak_live_bytes
from lvlm_fast.reference.context_content_pool import context_content_pool as ref_ccp
from lvlm_fast.reference.diff_weighted_pool import diff_weighted_pool as ref_dwp
from lvlm_fast.reference.keyframe_select import keyframe_select as ref_kfs
from lvlm_fast.reference.slowfast_pool import slowfast_pool as ref_sfp

N = 11  # ragged against the chunk of 3 frames
CHUNK = 3
TEXT_DIM = 24


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/tier0/conftest.py


@pytest.fixture(scope="module")
def vlm():
    torch.manual_seed(0)
    return LongVideoVLM.from_config("tiny-llava-onevision", vision_chunk_frames=CHUNK)


@pytest.fixture(scope="module")
def prompt():
    g = torch.Generator().manual_seed(1)
    pv = torch.randn(N, 3, 56, 56, generator=g)
    # a few near-repeated frames so that the redundancy rule has something to suppress
    pv[4] = pv[3] + 0.01 * torch.randn(3, 56, 56, generator=g)
    pv[8] = pv[7] + 0.01 * torch.randn(3, 56, 56, generator=g)
    return VideoPrompt(pv, torch.tensor([[1, 2, 3]]), torch.tensor([[5, 6, 7, 8, 9]]))


@pytest.fixture(scope="module")
def full(vlm, prompt):
    """(N, h, w, D) every frame's projector output (the reference input)."""
    return torch.cat([f for _, f in vlm.iter_patch_features(prompt.pixel_values)])


@pytest.fixture(scope="module")
def meta():
    vm = LongVideoVLM.from_config("tiny-llava-onevision", device="meta",
                                  vision_chunk_frames=CHUNK)
    pm = VideoPrompt(torch.empty(N, 3, 56, 56, device="meta"),
                     torch.zeros(1, 3, dtype=torch.long, device="meta"),
                     torch.ones(1, 5, dtype=torch.long, device="meta"))
    return vm, pm


# --------------------------------------------------------------------------- references
def ref_vilamp(vlm, full, *, k=32, tau_f=0.85, keyframe_tokens="pooled",
               diversity_query="video_mean", emb=None, query=None, floor=None, dfm=None,
               text_emb=None, dfm_tau=2.0):
    n, h, w, d = full.shape
    x = full.reshape(n, h * w, d)
    if emb is None:
        emb = full.mean(dim=(1, 2)).float()
    if query is None:
        query = emb.mean(0) if diversity_query == "video_mean" else torch.zeros(emb.shape[1])
    idx, ref_pos = ref_kfs(emb, query, k, threshold=tau_f, min_relevance=floor, fill=True)
    kf = idx.tolist()
    if dfm is None:  # parameter-free, zero query; -1 = no redundancy (same as "self")
        tok = ref_dwp(x, torch.zeros(d), x[idx], ref_pos, tau=dfm_tau)
    else:
        tok = dfm_reference(dfm, x, text_emb, kf)
    keys = vlm.pool_2x2(full) if keyframe_tokens == "pooled" else full
    rows = []
    for f in range(n):
        rows.append(keys[f].reshape(-1, d) if f in kf else tok[f:f + 1])
    rows.append(vlm.image_newline.reshape(1, d))
    return torch.cat(rows).unsqueeze(0), kf


# --------------------------------------------------------------------------- counts
def expected_tokens(name, n, **kw):
    k = min(kw.get("num_keyframes", 32), n)
    if name in ("vilamp", "vilamp-seed"):
        tk = 4 if kw.get("keyframe_tokens", "pooled") == "pooled" else 16
        return n - k + k * tk + 1
    if name == "slowfast":  # sf_llava on the 2x2 pooled grid: 10 slow x 2, fast 2x2
        return min(10, n) * 2 + n * 4 + 1
    if name == "llamavid":
        return 2 * n + 1
    raise AssertionError(name)


@pytest.mark.parametrize("name,kw", [
    ("vilamp", {"num_keyframes": 4}),
    ("vilamp", {"num_keyframes": 4, "keyframe_tokens": "full"}),
    ("vilamp", {}),
    ("vilamp-seed", {"num_keyframes": 4}),
    ("slowfast", {}),
    ("llamavid", {}),
])
def test_token_count_and_first_token(vlm, prompt, name, kw):
    s = get_strategy(name, **kw)
    emb, frames = s.visual_embeds(vlm, prompt)
    assert emb.shape == (1, expected_tokens(name, N, **kw), vlm.hidden_size)
    assert emb.dtype == vlm.dtype and torch.isfinite(emb).all()
    assert frames == {"vilamp": 2 * N}.get(name, N)
    logits = vlm.first_token(prompt, s)
    assert logits.shape == (1, vlm.vocab_size) and logits.dtype == torch.float32
    assert vlm.last_prefill.visual_tokens == emb.shape[1]
    assert vlm.last_prefill.llm_tokens == 3 + emb.shape[1] + 5


def test_holds_all_patch_features_flags():
    from lvlm_fast.models.strategies import STRATEGIES

    assert not STRATEGIES["vilamp"].holds_all_patch_features
    assert STRATEGIES["vilamp-seed"].holds_all_patch_features
    assert not STRATEGIES["slowfast"].holds_all_patch_features
    assert not STRATEGIES["llamavid"].holds_all_patch_features


# --------------------------------------------------------------------------- vilamp
@pytest.mark.parametrize("kw", [
    {"num_keyframes": 4},
    {"num_keyframes": 4, "tau_f": 0.3},
    {"num_keyframes": 5, "keyframe_tokens": "full", "diversity_query": "none"},
    {"num_keyframes": 3, "diversity_query": "none", "tau_f": 0.99},
    {"num_keyframes": 32},
])
def test_vilamp_matches_reference(vlm, prompt, full, kw):
    got, _ = get_strategy("vilamp", **kw).visual_embeds(vlm, prompt)
    want, kf = ref_vilamp(vlm, full, k=kw["num_keyframes"], tau_f=kw.get("tau_f", 0.85),
                          keyframe_tokens=kw.get("keyframe_tokens", "pooled"),
                          diversity_query=kw.get("diversity_query", "video_mean"))
    assert len(kf) == min(kw["num_keyframes"], N)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_vilamp_dfm_is_not_a_plain_mean(vlm, prompt, full):
    """The non-keyframe token is the DFM-weighted sum, not the patch mean (the test above
    would also pass for a wrong-but-consistent layout otherwise)."""
    got, _ = get_strategy("vilamp", num_keyframes=2, dfm_tau=0.05).visual_embeds(vlm, prompt)
    want, kf = ref_vilamp(vlm, full, k=2, dfm_tau=0.05)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    f = next(i for i in range(N) if i not in kf and i > kf[0])
    row = f + sum(1 for k in kf if k < f) * 3
    mean = full[f].reshape(-1, full.shape[-1]).mean(0)
    assert (got[0, row] - mean).abs().max() > 1e-3


class TinySelector(torch.nn.Module):
    """CLIP-style: get_image_features(pixel_values) / get_text_features(input_ids), returning
    a transformers-5-style output with ``pooler_output``."""

    def __init__(self):
        super().__init__()
        self.img = torch.nn.Linear(3 * 8 * 8, TEXT_DIM)
        self.txt = torch.nn.Embedding(50, TEXT_DIM)
        self.seen_sizes = []

    def get_image_features(self, pixel_values):
        self.seen_sizes.append(tuple(pixel_values.shape[-2:]))
        x = F.adaptive_avg_pool2d(pixel_values, 8).flatten(1)

        class Out:
            pooler_output = self.img(x)
        return Out()

    def get_text_features(self, input_ids, attention_mask=None):
        return self.txt(input_ids).mean(1)


def fake_processor(text, return_tensors, padding, truncation, max_length):
    assert return_tensors == "pt" and max_length == 77
    return {"input_ids": torch.tensor([[len(t) % 50 for t in text[0].split()]])}


def _selector_emb(sel, vlm, pv):
    """The default transform: SigLIP (0.5, 0.5) -> [0, 1] -> 224 bilinear -> CLIP norm."""
    from lvlm_fast.models.strategies.vilamp import CLIP_MEAN, CLIP_STD

    x = F.interpolate(pv * 0.5 + 0.5, size=(224, 224), mode="bilinear", align_corners=False)
    x = (x - torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)) / torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    return sel.get_image_features(x).pooler_output.float()


@pytest.mark.parametrize("floor", [0.2, None, -1.0])
def test_vilamp_selector_and_learned_dfm(vlm, prompt, full, floor):
    torch.manual_seed(5)
    sel = TinySelector()
    dfm = DifferentialFeatureMerging(vlm.hidden_size, TEXT_DIM)
    with torch.no_grad():
        dfm.tau.fill_(0.1)
    s = get_strategy("vilamp", num_keyframes=3, selector=sel, selector_processor=fake_processor,
                     question="what is the man holding", floor=floor, dfm=dfm,
                     selector_chunk_frames=4)
    got, frames = s.visual_embeds(vlm, prompt)
    assert frames == N  # one vision pass with a selector
    assert set(sel.seen_sizes) == {(224, 224)}
    with torch.no_grad():
        emb = _selector_emb(sel, vlm, prompt.pixel_values)
        q = sel.get_text_features(fake_processor(["what is the man holding"], "pt", True, True,
                                                 77)["input_ids"]).reshape(-1)
        want, _ = ref_vilamp(vlm, full, k=3, emb=emb, query=q, floor=floor, dfm=dfm,
                             text_emb=q)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    # vilamp-seed agrees with the same selector and learned weights
    seed, _ = get_strategy("vilamp-seed", num_keyframes=3, selector=sel,
                           selector_processor=fake_processor,
                           question="what is the man holding", floor=floor,
                           dfm=dfm).visual_embeds(vlm, prompt)
    torch.testing.assert_close(seed, got, rtol=1e-4, atol=1e-5)


def test_vilamp_auto_finds_model_dfm(prompt):
    torch.manual_seed(0)
    vlm = LongVideoVLM.from_config("tiny-llava-onevision", vision_chunk_frames=CHUNK)
    dfm = DifferentialFeatureMerging(vlm.hidden_size, TEXT_DIM)
    q = torch.randn(TEXT_DIM)
    sel = TinySelector()
    free, _ = get_strategy("vilamp", num_keyframes=3, selector=sel,
                           query_embedding=q).visual_embeds(vlm, prompt)
    with pytest.raises(ValueError, match="dfm='learned'"):
        get_strategy("vilamp", dfm="learned", selector=sel,
                     query_embedding=q).visual_embeds(vlm, prompt)
    vlm.model.composer_projector = dfm  # as a ViLAMP checkpoint would carry it
    auto, _ = get_strategy("vilamp", num_keyframes=3, selector=sel,
                           query_embedding=q).visual_embeds(vlm, prompt)
    explicit, _ = get_strategy("vilamp", num_keyframes=3, selector=sel, query_embedding=q,
                               dfm=dfm).visual_embeds(vlm, prompt)
    torch.testing.assert_close(auto, explicit)
    assert (auto - free).abs().max() > 1e-4
    # no query -> "auto" falls back to the parameter-free form; "learned" cannot
    no_q, _ = get_strategy("vilamp", num_keyframes=3).visual_embeds(vlm, prompt)
    plain, _ = get_strategy("vilamp", num_keyframes=3, dfm="free").visual_embeds(vlm, prompt)
    torch.testing.assert_close(no_q, plain)
    with pytest.raises(ValueError, match="text embedding"):
        get_strategy("vilamp", dfm="learned").visual_embeds(vlm, prompt)


def test_vilamp_dfm_from_released_checkpoint(vlm, prompt, tmp_path):
    """dfm=<path>: the released SigPooling tensors (model.composer_projector.*) are loaded
    with DifferentialFeatureMerging.from_released_checkpoint and used as learned DFM."""
    from safetensors.torch import save_file

    torch.manual_seed(7)
    dfm = DifferentialFeatureMerging(vlm.hidden_size, TEXT_DIM)
    with torch.no_grad():
        dfm.tau.fill_(0.2)
    sd = {f"model.composer_projector.{k}": v.detach().clone()
          for k, v in dfm.state_dict().items()}
    sd["model.layers.0.other.weight"] = torch.zeros(2)  # unrelated tensors are skipped
    path = tmp_path / "model.safetensors"
    save_file(sd, str(path))
    q = torch.randn(TEXT_DIM)
    sel = TinySelector()
    got, _ = get_strategy("vilamp", num_keyframes=3, selector=sel, query_embedding=q,
                          dfm=str(path)).visual_embeds(vlm, prompt)
    want, _ = get_strategy("vilamp", num_keyframes=3, selector=sel, query_embedding=q,
                           dfm=dfm).visual_embeds(vlm, prompt)
    torch.testing.assert_close(got, want)


def test_vilamp_parameter_free_module_uses_its_tau(vlm, prompt, full):
    free = DifferentialFeatureMerging(vlm.hidden_size, learned=False, tau=0.07)
    want, _ = ref_vilamp(vlm, full, k=3, dfm_tau=0.07)
    for name in ("vilamp", "vilamp-seed"):
        got, _ = get_strategy(name, num_keyframes=3, dfm=free).visual_embeds(vlm, prompt)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("encode", ["all_at_once", "chunked"])
@pytest.mark.parametrize("kw", [
    {"num_keyframes": 4},
    {"num_keyframes": 4, "tau_f": 0.3, "keyframe_tokens": "full"},
    {"num_keyframes": 2, "diversity_query": "none", "dfm_tau": 0.05},
])
def test_vilamp_seed_agrees_with_vilamp(vlm, prompt, encode, kw):
    a, _ = get_strategy("vilamp", **kw).visual_embeds(vlm, prompt)
    b, frames = get_strategy("vilamp-seed", encode=encode, **kw).visual_embeds(vlm, prompt)
    assert frames == N
    torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------- slowfast
@pytest.mark.parametrize("kw", [
    {},
    {"preset": "sf_llava_1_5"},
    {"input_grid": "patch", "num_slow": 4},
    {"order": "interleaved", "separator": True, "slow_stride": 3},
    {"separator": True, "fast_frames": "non_slow", "slow_mode": "avg", "fast_grid": (1, 1)},
    {"num_slow": 0},
])
def test_slowfast_matches_reference(vlm, prompt, full, kw):
    s = get_strategy("slowfast", **kw)
    got, frames = s.visual_embeds(vlm, prompt)
    assert frames == N
    cfg = s.config
    sf = cfg.resolved()
    grid = vlm.pool_2x2(full) if cfg.input_grid == "pooled" else full
    g = grid.shape[1]
    if "slow_stride" in kw:
        idx = torch.arange(0, N, kw["slow_stride"])
    else:
        idx = SlowFastConfig(**{**sf.__dict__}).slow_index(N)
    sep = vlm.image_newline.detach() if cfg.separator else None
    want = ref_sfp(grid, idx, slow_kernel=sf.slow_kernel, slow_mode=sf.slow_mode,
                   fast_grid=(min(sf.fast_grid[0], g), min(sf.fast_grid[1], g)),
                   fast_frames=sf.fast_frames, order=sf.order, separator=sep)
    want = torch.cat([want, vlm.image_newline.reshape(1, -1)]).unsqueeze(0)
    assert got.shape == want.shape == (1, s.num_tokens(vlm, N), vlm.hidden_size)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kw", [{}, {"order": "interleaved", "slow_stride": 3}])
def test_slowfast_slow_index_uploaded_once_not_per_chunk(prompt, monkeypatch, kw):
    """(issue 9.13) One host->device upload of the slow frame numbers per call: the number
    of host-list -> tensor constructions does not grow with the number of vision chunks."""
    import lvlm_fast.models.strategies.slowfast as sfmod

    real = torch.tensor
    calls = []

    def counting(*a, **k):
        calls.append(1)
        return real(*a, **k)

    got = {}
    for chunk in (N, 1):  # 1 chunk vs N chunks
        torch.manual_seed(0)
        v = LongVideoVLM.from_config("tiny-llava-onevision", vision_chunk_frames=chunk)
        calls.clear()
        monkeypatch.setattr(sfmod.torch, "tensor", counting)
        got[chunk] = get_strategy("slowfast", **kw).visual_embeds(v, prompt)[0]
        monkeypatch.setattr(sfmod.torch, "tensor", real)
        got[f"calls{chunk}"] = len(calls)
    assert got[f"calls{N}"] == got["calls1"] <= 1
    torch.testing.assert_close(got[1], got[N], rtol=1e-5, atol=1e-6)


def test_slowfast_default_on_7b_grid():
    """The default (sf_llava on the 14x14 pooled grid of LLaVA-OneVision-7B): 98 tokens per
    slow frame, 16 per frame, one newline; the raw 27x27 grid with (1, 2) is refused."""
    vm = LongVideoVLM.from_config("llava-onevision-qwen2-7b", device="meta",
                                  dtype=torch.bfloat16)
    assert get_strategy("slowfast").num_tokens(vm, 50) == 10 * 98 + 50 * 16 + 1
    with pytest.raises(ValueError, match="slow_kernel"):
        get_strategy("slowfast", input_grid="patch").num_tokens(vm, 50)
    assert get_strategy("slowfast", input_grid="patch",
                        slow_kernel=(3, 3)).num_tokens(vm, 50) == 10 * 81 + 50 * 16 + 1


# --------------------------------------------------------------------------- llamavid
@pytest.mark.parametrize("g", [1, 2])
def test_llamavid_matches_reference(vlm, prompt, full, g):
    got, frames = get_strategy("llamavid", content_grid=g).visual_embeds(vlm, prompt)
    assert frames == N
    n, h, w, d = full.shape
    q = vlm.embed_tokens(prompt.question_ids)[0].detach()
    want = ref_ccp(full.reshape(n, h * w, d), q, scale=1 / math.sqrt(d), content_grid=g)
    want = torch.cat([want.reshape(-1, d), vlm.image_newline.reshape(1, d)]).unsqueeze(0)
    assert got.shape == (1, n * (1 + g * g) + 1, d)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_llamavid_query_module_and_pooling(vlm, prompt, full):
    n, h, w, d = full.shape
    x = full.reshape(n, h * w, d)
    q = vlm.embed_tokens(prompt.question_ids)[0].detach()
    calls = []

    def qformer(frames, question):  # per-frame queries from the frame and the question
        calls.append(frames.shape[0])
        return question[:2].unsqueeze(0) * 10 + frames[:, :2]

    got, _ = get_strategy("llamavid", query_module=qformer).visual_embeds(vlm, prompt)
    assert calls == [3, 3, 3, 2]
    want = ref_ccp(x, q[:2].unsqueeze(0) * 10 + x[:, :2], scale=1 / math.sqrt(d))
    torch.testing.assert_close(got[0, :-1], want.reshape(-1, d), rtol=1e-4, atol=1e-5)

    torch.manual_seed(2)
    pool = ContextContentPooling(d, d, content_grid=2)
    with torch.no_grad():
        got, _ = get_strategy("llamavid", pooling=pool).visual_embeds(vlm, prompt)
        want = pool(x, q)
    assert got.shape == (1, n * 5 + 1, d)
    torch.testing.assert_close(got[0, :-1], want.reshape(-1, d), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="vision_dim"):
        get_strategy("llamavid", pooling=ContextContentPooling(8, d)).visual_embeds(vlm, prompt)


# --------------------------------------------------------------------------- meta
@pytest.mark.parametrize("name,kw", [
    ("vilamp", {"num_keyframes": 4}),
    ("vilamp", {"keyframe_tokens": "full", "diversity_query": "none"}),
    ("vilamp-seed", {"num_keyframes": 4}),
    ("vilamp-seed", {"num_keyframes": 4, "encode": "chunked"}),
    ("slowfast", {}),
    ("slowfast", {"order": "interleaved", "separator": True}),
    ("llamavid", {"content_grid": 2}),
])
def test_meta_device(meta, name, kw):
    vm, pm = meta
    emb, _ = get_strategy(name, **kw).visual_embeds(vm, pm)
    assert emb.device.type == "meta"
    kw.pop("encode", None)
    k = {"content_grid": 2}
    n_tok = (2 * N + 1 if kw != k else 5 * N + 1) if name == "llamavid" else None
    if name == "slowfast":
        n_tok = get_strategy(name, **kw).num_tokens(vm, N)
    elif n_tok is None:
        n_tok = expected_tokens(name, N, **kw)
    assert emb.shape == (1, n_tok, 64)
    logits = vm.first_token(pm, get_strategy(name, **kw))
    assert logits.device.type == "meta" and logits.shape == (1, 256)


def test_meta_vilamp_with_learned_dfm_and_selector(meta):
    vm, pm = meta
    with torch.device("meta"):
        sel = TinySelector()
        dfm = DifferentialFeatureMerging(64, TEXT_DIM)
        q = torch.empty(TEXT_DIM)
    for name in ("vilamp", "vilamp-seed"):
        emb, _ = get_strategy(name, num_keyframes=4, selector=sel, query_embedding=q,
                              dfm=dfm).visual_embeds(vm, pm)
        assert emb.device.type == "meta" and emb.shape == (1, N - 4 + 16 + 1, 64)


# --------------------------------------------------------------------------- bad configs
@pytest.mark.parametrize("name,kw,err,match", [
    ("vilamp", {"num_keyframes": 0}, ValueError, "num_keyframes"),
    ("vilamp", {"num_keyframes": 2.5}, TypeError, "num_keyframes"),
    ("vilamp", {"tau_f": 1.5}, ValueError, "tau_f"),
    ("vilamp", {"floor": float("nan")}, ValueError, "floor"),
    ("vilamp", {"keyframe_tokens": "all"}, ValueError, "keyframe_tokens"),
    ("vilamp", {"diversity_query": "random"}, ValueError, "diversity_query"),
    ("vilamp", {"dfm": "/no/such/checkpoint"}, ValueError, "dfm"),
    ("vilamp", {"dfm_tau": 0.0}, ValueError, "dfm_tau"),
    ("vilamp", {"selector": 3}, TypeError, "selector"),
    ("vilamp", {"question": "why?"}, ValueError, "selector"),
    ("vilamp", {"query_embedding": torch.zeros(4)}, ValueError, "selector"),
    ("vilamp", {"vision_mean": (0.5, 0.5)}, ValueError, "vision_mean"),
    ("vilamp-seed", {"encode": "streamed"}, ValueError, "encode"),
    ("slowfast", {"preset": "sf_llava_2"}, ValueError, "preset"),
    ("slowfast", {"input_grid": "raw"}, ValueError, "input_grid"),
    ("slowfast", {"num_slow": 4, "slow_stride": 2}, ValueError, "num_slow or slow_stride"),
    ("slowfast", {"slow_stride": 0}, ValueError, "slow_stride"),
    ("slowfast", {"slow_kernel": (0, 2)}, ValueError, "slow_kernel"),
    ("slowfast", {"fast_grid": 4}, TypeError, "fast_grid"),
    ("slowfast", {"slow_mode": "min"}, ValueError, "slow_mode"),
    ("slowfast", {"order": "fast_slow"}, ValueError, "order"),
    ("llamavid", {"content_grid": 0}, ValueError, "content_grid"),
    ("llamavid", {"query_module": "qformer"}, TypeError, "query_module"),
    ("llamavid", {"pooling": torch.nn.Linear(2, 2)}, TypeError, "pooling"),
    ("llamavid", {"scale": float("inf")}, ValueError, "scale"),
    ("vilamp", {"no_such_knob": 1}, TypeError, "no_such_knob"),
])
def test_bad_config(name, kw, err, match):
    with pytest.raises(err, match=match):
        get_strategy(name, **kw)


def test_bad_config_at_run(vlm, prompt):
    with pytest.raises(ValueError, match="slow_kernel"):
        get_strategy("slowfast", slow_kernel=(3, 3)).visual_embeds(vlm, prompt)
    with pytest.raises(ValueError, match="width"):  # query not in the selector's space
        get_strategy("vilamp", selector=TinySelector(),
                     query_embedding=torch.zeros(5)).visual_embeds(vlm, prompt)
    with pytest.raises(ValueError, match="dim"):  # DFM width != the LLM width
        get_strategy("vilamp", selector=TinySelector(), query_embedding=torch.zeros(TEXT_DIM),
                     dfm=DifferentialFeatureMerging(32, TEXT_DIM)).visual_embeds(vlm, prompt)


# --------------------------------------------------------------------------- memory
def _peak(vlm, name, n, **kw):
    g = torch.Generator().manual_seed(3)
    pm = VideoPrompt(torch.randn(n, 3, 56, 56, generator=g), torch.tensor([[1, 2]]),
                     torch.tensor([[3, 4, 5]]))
    s = get_strategy(name, **kw)
    return peak_live_bytes(lambda: s.visual_embeds(vlm, pm))


def _patch_budget(vlm, n0, n1):
    vc = vlm.config.vision_config
    return (n1 - n0) * (vc.image_size // vc.patch_size) ** 2 * vlm.hidden_size * 4


@pytest.mark.parametrize("name,kw", [
    ("vilamp", {"num_keyframes": 2}),
    ("slowfast", {}),
    ("llamavid", {}),
])
def test_streaming_never_holds_all_patch_features(vlm, name, kw):
    """Peak growth between 6 and 30 frames stays well below 24 frames' patch features
    (h*w*D fp32 = 4 KiB each on the tiny model)."""
    budget = _patch_budget(vlm, 6, 30)
    grow = _peak(vlm, name, 30, **kw) - _peak(vlm, name, 6, **kw)
    assert grow < 0.5 * budget, (name, grow, budget)


def test_seed_holds_all_patch_features(vlm):
    """Positive control for the check above: the seed-style pipeline exceeds the budget."""
    budget = _patch_budget(vlm, 6, 30)
    grow = (_peak(vlm, "vilamp-seed", 30, num_keyframes=2)
            - _peak(vlm, "vilamp-seed", 6, num_keyframes=2))
    assert grow > budget, (grow, budget)


# --------------------------------------------------------------------------- device placement
# (issue 9.1/9.2) On CUDA a DFM loaded from a checkpoint path (on the CPU) or host frames
# would meet a CUDA tower/op; the meta-device model stands in for the accelerator here.
def _released_ckpt(tmp_path, dim, tau=0.2, seed=7):
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    dfm = DifferentialFeatureMerging(dim, TEXT_DIM)
    with torch.no_grad():
        dfm.tau.fill_(tau)
    sd = {f"model.composer_projector.{k}": v.detach().clone()
          for k, v in dfm.state_dict().items()}
    path = tmp_path / "model.safetensors"
    save_file(sd, str(path))
    return dfm, path


@pytest.mark.parametrize("name", ["vilamp", "vilamp-seed"])
def test_meta_model_with_cpu_loaded_dfm_checkpoint(meta, tmp_path, name):
    vm, pm = meta
    _, path = _released_ckpt(tmp_path, 64)
    with torch.device("meta"):
        sel = TinySelector()
    s = get_strategy(name, num_keyframes=4, selector=sel, query_embedding=torch.randn(TEXT_DIM),
                     dfm=str(path))
    emb, _ = s.visual_embeds(vm, pm)
    assert emb.device.type == "meta" and emb.shape == (1, N - 4 + 16 + 1, 64)
    (mod,) = s._dfm_cache.values()  # loaded on the CPU by nn/dfm.py, moved once, kept there
    assert {p.device.type for p in mod.parameters()} == {"meta"}


@pytest.mark.parametrize("name", ["vilamp", "vilamp-seed"])
@pytest.mark.parametrize("learned", [True, False])
def test_meta_model_with_cpu_dfm_module_is_placed(meta, name, learned):
    vm, pm = meta
    dfm = DifferentialFeatureMerging(64, TEXT_DIM, learned=learned, tau=0.3)
    kw = {}
    if learned:
        with torch.device("meta"):
            kw["selector"] = TinySelector()
        kw["query_embedding"] = torch.randn(TEXT_DIM)
    emb, _ = get_strategy(name, num_keyframes=4, dfm=dfm, **kw).visual_embeds(vm, pm)
    assert emb.device.type == "meta"
    assert dfm.tau.device.type == "meta"
    assert {p.device.type for p in dfm.parameters()} <= {"meta"}


@pytest.mark.parametrize("dfm", ["free", "module"])
def test_vilamp_tau_is_one_device_tensor_for_every_chunk(vlm, prompt, monkeypatch, dfm):
    """tau reaches the op as one tensor on the model's device, built once per call (a Python
    float would be turned into a new device tensor, a host->device copy, in every chunk)."""
    import lvlm_fast.models.strategies.vilamp as vmod

    seen = []
    real = vmod.diff_weighted_pool

    def spy(*a, tau, **k):
        seen.append(tau)
        return real(*a, tau=tau, **k)

    monkeypatch.setattr(vmod, "diff_weighted_pool", spy)
    spec = "free" if dfm == "free" else DifferentialFeatureMerging(64, learned=False, tau=0.5)
    get_strategy("vilamp", num_keyframes=3, dfm=spec).visual_embeds(vlm, prompt)
    assert len(seen) == math.ceil(N / CHUNK)
    assert all(isinstance(t, torch.Tensor) and t.device == vlm.device for t in seen)
    assert len({id(t) for t in seen}) == 1


@pytest.mark.parametrize("encode", ["all_at_once", "chunked"])
def test_vilamp_seed_host_frames_reach_the_model_device(meta, encode):
    """Frames in host memory (as ``lvlm-fast run`` keeps them) with the model elsewhere."""
    vm, _ = meta
    pm = VideoPrompt(torch.randn(N, 3, 56, 56), torch.zeros(1, 3, dtype=torch.long),
                     torch.ones(1, 5, dtype=torch.long))
    emb, _ = get_strategy("vilamp-seed", num_keyframes=4, encode=encode).visual_embeds(vm, pm)
    assert emb.device.type == "meta" and emb.shape == (1, N - 4 + 16 + 1, 64)
