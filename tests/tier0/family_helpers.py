"""Shared builders and checks for the tier-0 Qwen3-VL / Qwen3.5 strategy tests
(``test_family_qwen3_vl_strategies.py``, ``test_family_qwen3_5_strategies.py``): the tiny
video prompt, the processor's reference prompt and the strategy check against it.
Imported as ``from family_helpers import ...`` (tests/tier0 is on sys.path, like
``tiny_assets``)."""

from __future__ import annotations

import torch

from lvlm_fast.models.strategies import VideoPrompt, get_strategy

VIDEO, START, END = 251, 252, 253
FRAMES = 13  # 7 temporal units, the last padded with a repeat of frame 12
UNITS = 7
H = W = 128  # merged grid 4 x 4
G = 4
D = 128
P, Q = 3, 5
FPS = 2.0


def text_ids(s: str) -> list[int]:
    return [3 + ord(c) % 190 for c in s]


def make_prompt() -> VideoPrompt:
    """13 frames (a repeated unit at frames 6-7), prefix ``7 8 <vs>``, question ``<ve> ...``."""
    g = torch.Generator().manual_seed(1)
    pv = torch.randn(FRAMES, 3, H, W, generator=g)
    pv[6:8] = pv[4:6] + 0.01 * torch.randn(2, 3, H, W, generator=g)  # a repeated unit
    return VideoPrompt(pv, torch.tensor([[7, 8, START]]), torch.tensor([[END, 5, 6, 7, 9]]),
                       fps=FPS, text_ids=text_ids)


def reference_prompt(prompt, runs, num_frames=FRAMES, fps=FPS):
    """The processor's prompt for ``runs`` = [(unit, [(h, w), ...]), ...] in order: ids
    with ``<t seconds><vs> pads <ve>`` per run (t from transformers' own timestamp rule,
    ``Qwen3VLProcessor``, also the processor of ``qwen3_5``) and the positions of the
    documented rule: text +1 each, a block at (cur, cur + y, cur + x) then
    cur += max(h, w)."""
    from transformers.models.qwen3_vl.processing_qwen3_vl import Qwen3VLProcessor

    ts = Qwen3VLProcessor._calculate_timestamps(None, list(range(num_frames)), fps, 2)
    ids = prompt.prefix_ids[0].tolist()
    pos = [(i, i, i) for i in range(P)]
    cur = P

    def text(toks):
        nonlocal cur
        ids.extend(toks)
        pos.extend((cur + i,) * 3 for i in range(len(toks)))
        cur += len(toks)

    for u, blocks in runs:
        text([*text_ids(f"<{ts[u]:.1f} seconds>"), START])
        for h, w in blocks:
            ids.extend([VIDEO] * (h * w))
            pos.extend((cur, cur + y, cur + x) for y in range(h) for x in range(w))
            cur += max(h, w)
        text([END])
    text(prompt.question_ids[0].tolist())
    return torch.tensor([ids]), torch.tensor(pos).T.reshape(3, 1, -1)


def check_strategy(vlm, prompt, name, kw, want_visual, runs, *, width, hf_first_logits):
    """Strategy ``name`` on ``vlm``: visual rows (``width`` channels) == ``want_visual``,
    the prompt (timestamps aligned with the kept units) and positions == the reference
    prompt of ``runs`` (== transformers' ``get_rope_index`` where every unit is one grid),
    first-token logits == ``hf_first_logits(vlm, ids, want_visual, pos)``. Returns the
    position plan."""
    s = get_strategy(name, **kw)
    out = s.visual_embeds(vlm, prompt)
    got, _ = out
    assert got.shape[-1] == width
    torch.testing.assert_close(got, want_visual, rtol=1e-5, atol=1e-5)
    ids, pos = reference_prompt(prompt, runs)
    fam = vlm.family
    layout = fam.visual_layout(out.blocks, got.shape[1], text_ids=text_ids)
    seq = []
    for piece in layout.pieces:
        seq += [VIDEO] * (piece[1] - piece[0]) if isinstance(piece, tuple) else piece.tolist()
    assert prompt.prefix_ids[0].tolist() + seq + prompt.question_ids[0].tolist() \
        == ids[0].tolist()  # timestamps aligned with the kept units
    plan = fam.position_plan(P, out.blocks, got.shape[1], Q, layout=layout)
    assert torch.equal(plan.chunk(0, plan.total), pos)
    if all(len(b) == 1 for _, b in runs):  # every unit one grid: transformers' own ids
        thw = torch.tensor([[1, 2 * b[0][0], 2 * b[0][1]] for _, b in runs])
        want_pos, _ = vlm.model.model.get_rope_index(ids, (ids == VIDEO).int() * 2,
                                                     video_grid_thw=thw)
        assert torch.equal(pos, want_pos)
    logits = vlm.first_token(prompt, s)
    torch.testing.assert_close(logits, hf_first_logits(vlm, ids, want_visual, pos),
                               rtol=0, atol=1e-5)
    assert vlm.last_prefill.llm_tokens == ids.shape[1]
    return plan


def random_prompt(t: int, hw: tuple[int, int], p: int = 3, q: int = 4, seed: int = 0,
                  fps: float | None = None, text_ids=None) -> VideoPrompt:
    """A ``t``-frame random video of ``hw`` pixels, a random ``p``-id prefix ending in
    ``<vs>`` and a ``q``-id question starting with ``<ve>`` (ids in [3, 250))."""
    g = torch.Generator().manual_seed(seed)
    prefix = torch.cat([torch.randint(3, 250, (1, p - 1), generator=g),
                        torch.tensor([[START]])], dim=1)
    question = torch.cat([torch.tensor([[END]]), torch.randint(3, 250, (1, q - 1),
                                                                generator=g)], dim=1)
    return VideoPrompt(torch.randn(t, 3, *hw, generator=g), prefix, question, fps=fps,
                       text_ids=text_ids)


def tiny_onevision(config: str, head_dim64: bool):
    """A tiny random LLaVA-OneVision-architecture model of ``config`` (``tiny-videoxl``,
    ``tiny-llava-onevision``); ``head_dim64``: 128 hidden, 2 heads, 1 KV head, a head dim
    the fused summary attention supports (the toy default is 16)."""
    from transformers import LlavaOnevisionForConditionalGeneration

    from lvlm_fast.models import get_config

    cfg = get_config(config)
    if head_dim64:
        tc = cfg.text_config
        tc.hidden_size, tc.num_attention_heads, tc.num_key_value_heads = 128, 2, 1
    torch.manual_seed(0)
    return LlavaOnevisionForConditionalGeneration(cfg).eval()


def small_video_prompt(t: int, seed: int = 0) -> VideoPrompt:
    """``t`` random 56 x 56 frames, a random 3-id prefix and 5-id question."""
    g = torch.Generator().manual_seed(seed)
    return VideoPrompt(torch.randn(t, 3, 56, 56, generator=g),
                       torch.randint(0, 250, (1, 3), generator=g),
                       torch.randint(0, 250, (1, 5), generator=g))


def videoxl_mask(kind: list[int], win: list[int], evict: bool) -> torch.Tensor:
    """(n, n) boolean attention mask of the Video-XL reference: causal; with ``evict`` a
    row sees the prefix (window -1), its own window and the summaries (kind 2) of earlier
    windows only."""
    n = len(kind)
    kd, wd = torch.tensor(kind), torch.tensor(win)
    causal = torch.ones(n, n).tril().bool()
    if not evict:
        return causal
    pre = (wd == -1).view(1, n)
    same = wd.view(n, 1) == wd.view(1, n)
    summ = (kd == 2).view(1, n) & (wd.view(1, n) < wd.view(n, 1))
    return causal & (pre | same | summ)


def check_stale_rows_never_seen(vlm, pr: VideoPrompt, max_new: int) -> None:
    """``vlm`` (a ``stream`` wrapper) gives the same first-token logits and greedy tokens
    (exactly) when every cache row beyond the valid length is NaN from the start and the
    compacted-away tail of every compaction is poisoned with NaN: stale rows are never
    read."""
    from lvlm_fast.stream_cache import BudgetedKVCache

    clean_logits, clean_tokens = vlm.first_token(pr), vlm.generate(pr, max_new)
    orig_init, orig_compact = BudgetedKVCache.__init__, BudgetedKVCache.compact
    poisoned = []

    def init(self, *a, **k):
        orig_init(self, *a, **k)
        self.key.fill_(float("nan"))  # every row beyond the valid length, from the start
        self.value.fill_(float("nan"))

    def compact(self, **k):
        new = orig_compact(self, **k)
        self.key[:, :, :, new:] = float("nan")  # the compacted-away tail: stale rows
        self.value[:, :, :, new:] = float("nan")
        poisoned.append(new)
        return new

    BudgetedKVCache.__init__, BudgetedKVCache.compact = init, compact
    try:
        logits, tokens = vlm.first_token(pr), vlm.generate(pr, max_new)
    finally:
        BudgetedKVCache.__init__, BudgetedKVCache.compact = orig_init, orig_compact
    assert poisoned and vlm.strategy.cache.compactions > 0
    assert torch.isfinite(logits).all()
    torch.testing.assert_close(logits, clean_logits, rtol=0, atol=0)
    assert torch.equal(tokens, clean_tokens)


def hf_generate(model, kw: dict, n: int):
    """transformers' greedy ``generate`` of ``n`` tokens on processor inputs ``kw``:
    (new tokens (1, n), first-token logits (V,) fp32)."""
    with torch.no_grad():
        out = model.generate(**kw, max_new_tokens=n, do_sample=False, output_logits=True,
                             return_dict_in_generate=True, pad_token_id=0)
    return out.sequences[:, kw["input_ids"].shape[1]:], out.logits[0][0].float()


def check_full_equals_generate(vlm, model, pr: VideoPrompt, kw: dict, n: int = 6):
    """``vlm`` on ``pr`` == transformers' ``generate`` on the processor's inputs ``kw``:
    first-token logits within 1e-5, the ``n`` greedy tokens equal. Returns the prefill."""
    want_tokens, want_logits = hf_generate(model, kw, n)
    torch.testing.assert_close(vlm.first_token(pr)[0], want_logits, rtol=0, atol=1e-5)
    assert torch.equal(vlm.generate(pr, max_new_tokens=n), want_tokens)
    return vlm.last_prefill


def check_from_pretrained(model, tmp_path, family: str, pr: VideoPrompt) -> None:
    """``save_pretrained`` + ``LongVideoVLM.from_pretrained`` finds ``family`` and gives
    the in-memory model's first-token logits."""
    from lvlm_fast.models import LongVideoVLM

    model.save_pretrained(tmp_path)
    loaded = LongVideoVLM.from_pretrained(tmp_path, "full", prefill_chunk_tokens=5)
    assert loaded.family.name == family
    torch.testing.assert_close(loaded.first_token(pr), LongVideoVLM(model).first_token(pr),
                               rtol=0, atol=1e-6)


def fixed_text_prompt(frames: int, hw: tuple[int, int], fps: float | None,
                      text_ids=None) -> VideoPrompt:
    """A ``frames``-frame random video (seeded by ``frames``) of ``hw`` pixels, prefix
    ``7 8 <vs>`` and question ``<ve> 5 6 9``."""
    g = torch.Generator().manual_seed(frames)
    return VideoPrompt(torch.randn(frames, 3, *hw, generator=g),
                       torch.tensor([[7, 8, START]]), torch.tensor([[END, 5, 6, 9]]),
                       fps=fps, text_ids=text_ids)
