"""Block layout: the visual processor's rows and markers, the chat template and the completion-only mask."""

import pytest
import torch

from kelix.data.schema import Image, Part, Sample, SampleError, Turn
from kelix.data.text import load_text_tokenizer
from kelix.llm.layout import VISUAL, BlockDoc, Layout, drop_prompt, is_t2i, t2i_doc
from kelix.llm.vocab import extend_text_tokenizer


@pytest.fixture(scope="module")
def layout():
    return Layout(extend_text_tokenizer(load_text_tokenizer("builtin:bytes")))


def ids(layout, s):
    return layout.tok(s, add_special_tokens=False)["input_ids"]


def test_2x3_grid_token_by_token(layout):
    sp = layout.ids
    codes = torch.arange(2 * 3 * 4).view(2, 3, 4)
    doc = BlockDoc()
    doc.add_text(ids(layout, "hi"), True)
    ref = layout.add_image(doc, 2, 3, train=True, codes=codes)
    want = ids(layout, "hi") + [sp["vision_start"],
                                sp["mm_pos_start"], *ids(layout, "0,3"), sp["mm_pos_end"], VISUAL, VISUAL, VISUAL,
                                sp["mm_pos_start"], *ids(layout, "1,3"), sp["mm_pos_end"], VISUAL, VISUAL, VISUAL,
                                sp["vision_end"]]
    assert doc.tokens == want
    assert len(ids(layout, "0,3")) == 3  # bytes '0' ',' '3': one text block each
    assert ref.positions == [8, 9, 10, 16, 17, 18]
    assert (ref.start, ref.end) == (2, 19)
    assert doc.tokens[ref.start] == sp["vision_start"] and doc.tokens[ref.end] == sp["vision_end"]
    c = doc.codes(4)
    assert torch.equal(c[ref.positions], codes.view(6, 4))  # raster order: row 0 then row 1
    assert (c[[i for i in range(len(doc)) if i not in ref.positions]] == -1).all()
    assert layout.tok.decode([t for t in doc.tokens if t >= 0]) == \
        "hi<|vision_start|><|mm_pos_start|>0,3<|mm_pos_end|><|mm_pos_start|>1,3<|mm_pos_end|><|vision_end|>"


def test_row_marker_format_is_configurable():
    lay = Layout(extend_text_tokenizer(load_text_tokenizer("builtin:bytes")), row_marker="r{row}/{rows}")
    doc = BlockDoc()
    lay.add_image(doc, 2, 1, train=False)
    text = lay.tok.decode([t for t in doc.tokens if t >= 0])
    assert text == "<|vision_start|><|mm_pos_start|>r0/2<|mm_pos_end|><|mm_pos_start|>r1/2<|mm_pos_end|><|vision_end|>"


def _chat(image_codes):
    img = Image("0.jpg", codes=image_codes)
    return Sample("k", "s.tar", "messages", [
        Turn("user", [Part("image", image=img), Part("text", text="Q?")]),
        Turn("assistant", [Part("text", text="ab")]),
    ], task="vqa")


def _image_fn(image, role):
    c = torch.as_tensor(image.codes)
    return c.shape[0], c.shape[1], c, None


def test_completion_only_mask_positions(layout):
    codes = torch.zeros(1, 2, 4, dtype=torch.long)
    doc = layout.build(_chat(codes), _image_fn, completion_only=True)
    sp = layout.ids
    user = ids(layout, "<|im_start|>user\n")
    image = [sp["vision_start"], sp["mm_pos_start"], *ids(layout, "0,2"), sp["mm_pos_end"], VISUAL, VISUAL,
             sp["vision_end"]]
    head = user + image + ids(layout, "Q?") + [sp["im_end"]] + ids(layout, "\n") + ids(layout, "<|im_start|>assistant\n")
    answer = ids(layout, "ab") + [sp["im_end"]]
    assert doc.tokens == head + answer + ids(layout, "\n")
    # exactly the assistant's content and its <|im_end|> are targets
    assert [i for i, t in enumerate(doc.targets) if t] == list(range(len(head), len(head) + len(answer)))


def test_without_completion_only_everything_but_the_first_block_is_trained(layout):
    doc = layout.build(_chat(torch.zeros(1, 2, 4, dtype=torch.long)), _image_fn, completion_only=False)
    assert doc.targets[0] is False and all(doc.targets[1:])


def test_segments_end_with_endoftext_and_train_images(layout):
    s = Sample("k", "s.tar", "segments", [Turn(None, [Part("text", text="x"),
                                                      Part("image", image=Image("0.jpg", codes=torch.zeros(1, 1, 4)))])])
    doc = layout.build(s, _image_fn)
    assert doc.tokens[-1] == layout.tok.get_vocab()["<|endoftext|>"]
    assert doc.images[0].target and all(doc.targets[1:])


def test_a_sample_without_targets_is_skipped(layout):
    s = Sample("k", "s.tar", "messages", [Turn("user", [Part("text", text="hello")])])
    with pytest.raises(SampleError, match="no block is a training target"):
        layout.build(s, _image_fn, completion_only=True)


def test_t2i_doc_puts_the_image_in_the_assistant_turn(layout):
    codes = torch.zeros(2, 2, 4, dtype=torch.long)
    doc, ref = t2i_doc(layout, "a cat", codes)
    text = layout.tok.decode([t for t in doc.tokens[: ref.start] if t >= 0])
    assert text == "<|im_start|>user\na cat<|im_end|>\n<|im_start|>assistant\n"
    assert doc.tokens[ref.end + 1] == layout.ids["im_end"] and len(doc) == ref.end + 2


def _caption(codes):
    """img2dataset's caption as parse_sample reads it: ``segments`` [image, text], task ``caption``."""
    return Sample("k", "s.tar", "segments", [Turn(None, [Part("image", image=Image("jpg", codes=codes)),
                                                         Part("text", text="a red cube")])], task="caption")


def test_under_completion_only_a_caption_is_user_image_then_assistant_caption(layout):
    codes = torch.zeros(2, 2, 4, dtype=torch.long)
    doc = layout.build(_caption(codes), _image_fn, completion_only=True)
    sp, img = layout.ids, doc.images[0]
    head = ids(layout, "<|im_start|>user\n") + doc.tokens[img.start:img.end + 1] + [sp["im_end"]] + ids(layout, "\n") \
        + ids(layout, "<|im_start|>assistant\n")
    answer = ids(layout, "a red cube") + [sp["im_end"]]
    assert doc.tokens == head + answer + ids(layout, "\n")
    assert not img.target and not any(doc.targets[img.start:img.end + 1])  # no visual block is a target
    assert [i for i, t in enumerate(doc.targets) if t] == list(range(len(head), len(head) + len(answer)))
    # a caption sample is laid out as the same chat sample written by hand
    chat = Sample("k", "s.tar", "messages", [Turn("user", [Part("image", image=Image("jpg", codes=codes))]),
                                             Turn("assistant", [Part("text", text="a red cube")])])
    ref = layout.build(chat, _image_fn, completion_only=True)
    assert (ref.tokens, ref.targets) == (doc.tokens, doc.targets)


def test_without_completion_only_a_caption_trains_every_block(layout):
    doc = layout.build(_caption(torch.zeros(2, 2, 4, dtype=torch.long)), _image_fn, completion_only=False)
    assert doc.tokens[-1] == layout.tok.get_vocab()["<|endoftext|>"] and doc.images[0].target
    assert doc.targets[0] is False and all(doc.targets[1:])
    # interleaved segments keep training their images under completion_only (stage 2.1's generation data)
    s = _caption(torch.zeros(1, 1, 4, dtype=torch.long))
    s.task = "interleaved"
    assert layout.build(s, _image_fn, completion_only=True).images[0].target


def test_a_caption_without_text_after_its_image_is_skipped_under_completion_only(layout):
    s = Sample("k", "s.tar", "segments", [Turn(None, [Part("text", text="cube:"),
                                                      Part("image", image=Image("jpg", codes=torch.zeros(1, 1, 4)))])],
               task="caption")
    with pytest.raises(SampleError, match="no text after its last image") as e:
        layout.build(s, _image_fn, completion_only=True)
    assert e.value.reason == "no_targets"


def _t2i(prompt="a red cube", system=None):
    turns = [Turn("system", [Part("text", text=system)])] if system else []
    turns += [Turn("user", [Part("text", text=prompt)]),
              Turn("assistant", [Part("image", image=Image("0.jpg", codes=torch.zeros(2, 2, 4, dtype=torch.long)))])]
    return Sample("k", "s.tar", "messages", turns, task="t2i")


def test_t2i_samples_and_their_dropped_prompt(layout):
    assert is_t2i(_t2i()) and is_t2i(_t2i(system="be brief"))
    assert not is_t2i(_chat(torch.zeros(1, 1, 4)))  # an image in the user turn: understanding (or editing)
    assert not is_t2i(_caption(torch.zeros(1, 1, 4)))
    for sample in (_t2i(), _t2i(system="be brief")):
        cond = layout.build(sample, _image_fn, completion_only=True)
        uncond = layout.build(drop_prompt(sample), _image_fn, completion_only=True)
        n = len(layout.t2i_prompt(""))
        assert uncond.tokens[:n] == layout.t2i_prompt("") and uncond.tokens[n] == layout.ids["vision_start"]
        # the image and the targets after the prompt are unchanged
        m = cond.images[0].start
        assert cond.tokens[m:] == uncond.tokens[n:] and cond.targets[m:] == uncond.targets[n:]
        assert not any(uncond.targets[:n]) and uncond.images[0].target
    cond = layout.build(_t2i(), _image_fn, completion_only=True)
    assert cond.tokens[:cond.images[0].start] == layout.t2i_prompt("a red cube")
