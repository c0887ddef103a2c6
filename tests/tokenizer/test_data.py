import pytest
import torch
from PIL import Image as PILImage

from kelix.data.images import ImageConfig
from kelix.data.schema import Image, Part, Sample, SampleError, Turn
from kelix.tokenizer.data import IGNORE, TokenizerProcessor, aux_text_tokenizer

IMG = ImageConfig(patch_size=14, merge_size=2, min_pixels=56 * 56, max_pixels=112 * 112)


def _img(w=84, h=56):
    return Image("0.jpg", pixels=PILImage.new("RGB", (w, h), (10, 200, 30)))


def _decode(tok, ids):
    return tok.decode([i for i in ids if i >= 0], skip_special_tokens=False)


def test_caption_sample_loss_on_text_after_the_image():
    proc = TokenizerProcessor("builtin:bytes", IMG)
    s = Sample("k", "s.tar", "segments", [Turn(None, [Part("image", image=_img()), Part("text", text="a red circle")])])
    item = proc(s)
    tok = proc.tok
    vs, ve = tok.convert_tokens_to_ids(["<|vision_start|>", "<|vision_end|>"])
    ids, labels, mask = item["input_ids"].tolist(), item["labels"].tolist(), item["image_mask"].tolist()
    assert item["grids"] == [(2, 3)] and item["pixels"][0].shape == (3, 56, 84)
    assert ids[0] == vs and ids[7] == ve and mask == [False] + [True] * 6 + [False] * (len(ids) - 7)
    assert all(x == IGNORE for x in labels[:8])
    assert _decode(tok, labels[8:]) == "a red circle<|im_end|>"  # caption + end of text


def test_chat_sample_loss_only_on_the_assistant_answer():
    proc = TokenizerProcessor("builtin:bytes", IMG)
    turns = [Turn("user", [Part("image", image=_img(56, 56)), Part("text", text="What text?")]),
             Turn("assistant", [Part("text", text="kelix")])]
    item = proc(Sample("k", "s.tar", "messages", turns, task="ocr"))
    tok = proc.tok
    text = _decode(tok, [i for i, m in zip(item["input_ids"].tolist(), item["image_mask"].tolist()) if not m])
    assert text == ("<|im_start|>user\n<|vision_start|><|vision_end|>What text?<|im_end|>\n"
                    "<|im_start|>assistant\nkelix<|im_end|>\n")
    assert _decode(tok, item["labels"].tolist()) == "kelix<|im_end|>"
    assert int(item["image_mask"].sum()) == 4


def test_samples_without_image_or_target_are_skipped_with_a_reason():
    proc = TokenizerProcessor("builtin:bytes", IMG)
    with pytest.raises(SampleError) as e:
        proc(Sample("k", "s.tar", "segments", [Turn(None, [Part("text", text="only text")])]))
    assert e.value.reason == "no_image"
    t2i = [Turn("user", [Part("text", text="draw a cat")]), Turn("assistant", [Part("image", image=_img())])]
    with pytest.raises(SampleError) as e:
        proc(Sample("k", "s.tar", "messages", t2i))
    assert e.value.reason == "no_target"
    long = Sample("k", "s.tar", "segments", [Turn(None, [Part("text", text="x" * 50), Part("image", image=_img())])])
    with pytest.raises(SampleError) as e:
        TokenizerProcessor("builtin:bytes", IMG, max_length=20)(long)
    assert e.value.reason == "too_long"


def test_collate_pads_and_flattens_images_of_different_sizes():
    proc = TokenizerProcessor("builtin:bytes", IMG)
    a = proc(Sample("a", "s", "segments", [Turn(None, [Part("image", image=_img(84, 56)), Part("text", text="ab")])]))
    b = proc(Sample("b", "s", "segments", [Turn(None, [Part("image", image=_img(112, 112)), Part("text", text="abcdef")])]))
    batch = proc.collate([a, b])
    n = max(len(a["input_ids"]), len(b["input_ids"]))
    assert batch["input_ids"].shape == (2, n) and batch["batch_size"] == 2
    assert batch["attention_mask"].sum(1).tolist() == [len(a["input_ids"]), len(b["input_ids"])]
    assert [p.shape for p in batch["pixels"]] == [(3, 56, 84), (3, 112, 112)]
    assert batch["grids"] == [(2, 3), (4, 4)] and int(batch["image_mask"].sum()) == 6 + 16
    assert (batch["labels"][0, len(a["input_ids"]):] == IGNORE).all()


def test_processor_pickles_without_its_tokenizer():
    import pickle

    proc = TokenizerProcessor("builtin:bytes", IMG)
    proc.tok  # noqa: B018
    clone = pickle.loads(pickle.dumps(proc))
    assert clone._tok is None and clone.image == IMG


def test_vision_markers_added_once_and_kept_stable():
    tok = aux_text_tokenizer("builtin:bytes")
    assert tok.convert_tokens_to_ids(["<|vision_start|>", "<|vision_end|>"]) == [259, 260] and len(tok) == 261
    assert torch.tensor(tok("<|vision_start|>", add_special_tokens=False)["input_ids"]).tolist() == [259]
