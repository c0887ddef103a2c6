"""DiTProcessor: which samples are DiT samples, prompt/target extraction, filters, pre-computed fields read
from real shards, and collation with padded conditions."""

import io

import numpy as np
import pytest
import torch
from PIL import Image as PILImage

from kelix.data.schema import Image, Part, Sample, SampleError, Turn, parse_sample
from kelix.data.stream import ShardStream
from kelix.dit.data import DiTProcessor, prompt_and_target, square, vae_pixels
from tests.conftest import jpeg_bytes, write_shard


def picture(w=40, h=30, color=(255, 0, 0)):
    return PILImage.new("RGB", (w, h), color)


def caption_sample(w=40, h=30, codes=None, arrays=None):
    img = Image("0.jpg", pixels=picture(w, h), codes=codes)
    return Sample("k", "s.tar", "segments", [Turn(None, [Part("image", image=img), Part("text", text=" a red box ")])],
                  "caption", arrays=arrays or {})


def t2i_sample():
    return Sample("t", "s.tar", "messages", [Turn("user", [Part("text", text="Draw a red box.")]),
                                              Turn("assistant", [Part("image", image=Image("0.jpg", picture()))])], "t2i")


def npy(a):
    buf = io.BytesIO()
    np.save(buf, a)
    return buf.getvalue()


def test_inverted_caption_and_t2i_samples():
    assert prompt_and_target(caption_sample())[0] == "a red box"
    prompt, image = prompt_and_target(t2i_sample())
    assert prompt == "Draw a red box." and image.name == "0.jpg"
    item = DiTProcessor(target_size=16, condition="prompt")(caption_sample())
    assert item["prompt"] == "a red box" and item["pixels"].shape == (3, 16, 16) and item["pixels"].dtype == torch.uint8
    x = vae_pixels(item["pixels"])
    assert torch.allclose(x[0], torch.ones(16, 16)) and torch.allclose(x[1], -torch.ones(16, 16))


def test_understanding_samples_are_skipped():
    vqa = Sample("v", "s.tar", "messages", [Turn("user", [Part("image", image=Image("0.jpg", picture())),
                                                          Part("text", text="What color?")]),
                                            Turn("assistant", [Part("text", text="red")])], "vqa")
    with pytest.raises(SampleError, match="user turn holds an image") as e:
        DiTProcessor(condition="prompt")(vqa)
    assert e.value.reason == "not_t2i"
    two = Sample("i", "s.tar", "segments", [Turn(None, [Part("image", image=Image("0.jpg", picture())),
                                                        Part("image", image=Image("1.jpg", picture()))])])
    with pytest.raises(SampleError, match="2 target images"):
        DiTProcessor(condition="prompt")(two)


def test_aspect_and_size_filters():
    p = DiTProcessor(target_size=16, aspect_range=(0.67, 1.5), min_source_side=20, condition="prompt")
    assert p(caption_sample(40, 30))["pixels"].shape == (3, 16, 16)
    with pytest.raises(SampleError, match=r"aspect 2.00 outside \[0.67, 1.5\]"):
        p(caption_sample(60, 30))
    with pytest.raises(SampleError, match="smaller than min_source_side 20"):
        p(caption_sample(19, 19))
    big = DiTProcessor(target_size=16, max_source_side=40, condition="prompt")
    assert big(caption_sample(40, 40))["pixels"].shape == (3, 16, 16)
    with pytest.raises(SampleError, match="41x30 is larger than max_source_side 40"):
        big(caption_sample(41, 30))


def test_center_crop_keeps_the_middle():
    img = PILImage.new("RGB", (30, 10), (0, 0, 255))
    img.paste((255, 0, 0), (10, 0, 20, 10))
    assert square(img, 10, "center_crop").getpixel((5, 5)) == (255, 0, 0)
    assert square(img, 10, "resize").getpixel((0, 5)) == (0, 0, 255)


def test_llm_mode_gives_codes_or_the_condition_image():
    p = DiTProcessor(target_size=16, condition_size=56, condition="llm")
    with_codes = p(caption_sample(codes=np.ones((2, 2, 3), dtype=np.int16)))
    without = p(caption_sample())
    assert with_codes["codes"].dtype == torch.int64 and with_codes["codes"].shape == (2, 2, 3)
    assert without["cond_image"].size == (56, 56)
    batch = p.collate([with_codes, without])
    assert batch["codes"][1] is None and batch["cond_images"][0] is None and batch["prompts"] == ["a red box"] * 2


def test_pretokenized_codes_must_be_the_condition_grid(tmp_path):
    """56-px condition images of 28-px tokens: a 2x2 grid; codes of another resolution are skipped and counted."""
    def record(key, grid):
        return {"__key__": key, "json": {"messages": [
            {"role": "user", "content": [{"type": "text", "text": f"draw {key}"}]},
            {"role": "assistant", "content": [{"type": "image", "image": "0.jpg"}]}]},
                "0.jpg": jpeg_bytes((40, 30)), "0.codes.npy": npy(np.zeros((*grid, 3), np.int16))}

    shard = write_shard(tmp_path / "codes.tar", [record("ok", (2, 2)), record("native", (2, 3)),
                                                 record("big", (18, 18)), record("ok2", (2, 2))])
    stream = ShardStream(shard, processor=DiTProcessor(target_size=16, condition_size=56, condition="llm"),
                         shuffle_buffer=1, repeat=False)
    items = list(stream)
    assert [i["key"] for i in items] == ["ok", "ok2"] and all(i["codes"].shape == (2, 2, 3) for i in items)
    assert stream.stats["skipped/condition_grid"] == 2
    with pytest.raises(SampleError, match=r"codes \(18, 18, 3\) are not the 2x2 grid of a 56-px condition image"):
        DiTProcessor(target_size=16, condition_size=56, condition="llm")(caption_sample(codes=np.zeros((18, 18, 3))))
    with pytest.raises(ValueError, match="condition_size 60 is not a multiple of token_size 28"):
        DiTProcessor(condition_size=60, condition="llm")


def test_center_crop_crops_the_condition_like_the_target():
    """The codes show the whole (squashed) image: under center_crop a non-square source is tokenized from the
    same crop the target gets; a square one keeps its codes; codes without pixels cannot be cropped."""
    img = PILImage.new("RGB", (90, 30), (0, 0, 255))
    img.paste((255, 0, 0), (30, 0, 60, 30))  # the centre square is red, the sides blue
    codes = np.zeros((2, 2, 3), np.int16)
    p = DiTProcessor(target_size=16, condition_size=56, resize="center_crop", condition="llm")
    wide = p(Sample("w", "s.tar", "segments", [Turn(None, [Part("image", image=Image("0.jpg", img, codes)),
                                                           Part("text", text="red")])]))
    assert "codes" not in wide and wide["cond_image"].size == (56, 56)
    assert set(wide["cond_image"].getdata()) == {(255, 0, 0)}  # the crop, as the target
    assert torch.allclose(vae_pixels(wide["pixels"]), torch.tensor([1.0, -1.0, -1.0]).view(3, 1, 1).expand(3, 16, 16))
    sq = p(caption_sample(30, 30, codes=codes))
    assert sq["codes"].shape == (2, 2, 3) and "cond_image" not in sq
    squash = DiTProcessor(target_size=16, condition_size=56, condition="llm")  # resize: the codes match
    assert "codes" in squash(Sample("w", "s.tar", "segments", [Turn(None, [
        Part("image", image=Image("0.jpg", img, codes)), Part("text", text="red")])]))
    latents = DiTProcessor(condition_size=56, resize="center_crop", condition="llm", target="latents")
    only_codes = caption_sample(arrays={"latent.npy": np.zeros((4, 2, 2), np.float16)})
    only_codes.images[0].pixels, only_codes.images[0].codes = None, codes
    with pytest.raises(SampleError, match="codes without pixels under resize: center_crop") as e:
        latents(only_codes)
    assert e.value.reason == "condition_crop"


def test_precomputed_latents_and_conditions_are_padded_with_a_mask():
    p = DiTProcessor(target="latents", condition="precomputed", max_condition_length=4)
    items = [p(caption_sample(arrays={"cond.npy": np.full((n, 6), n, np.float16),
                                      "latent.npy": np.zeros((4, 2, 2), np.float16)})) for n in (3, 6)]
    assert items[0]["cond"].dtype == torch.float16 and items[1]["cond"].shape == (4, 6)  # cut to 4
    batch = p.collate(items)
    assert batch["cond"].shape == (2, 4, 6) and batch["latents"].shape == (2, 4, 2, 2)
    assert batch["cond_mask"].tolist() == [[True] * 3 + [False], [True] * 4]
    assert batch["cond"][0, 3].abs().sum() == 0 and batch["batch_size"] == 2
    with pytest.raises(SampleError, match="needs cond.npy float") as e:
        p(caption_sample(arrays={"latent.npy": np.zeros((4, 2, 2))}))
    assert e.value.reason == "no_condition"
    with pytest.raises(SampleError, match="needs latent.npy"):
        p(caption_sample())


def test_precomputed_fields_stream_from_shards(tmp_path):
    shard = write_shard(tmp_path / "pre.tar", [
        {"__key__": f"x{i}", "json": {"task": "t2i", "segments": [{"type": "text", "text": f"prompt {i}"}]},
         "cond.npy": npy(np.full((i + 1, 6), i, np.float16)), "latent.npy": npy(np.full((4, 2, 2), i, np.float32))}
        for i in range(3)] + [{"__key__": "img", "json": {"segments": [{"type": "image", "image": "0.jpg"},
                                                                       {"type": "text", "text": "no cond"}]},
                               "0.jpg": jpeg_bytes()}])
    stream = ShardStream(shard, processor=DiTProcessor(target="latents", condition="precomputed"),
                         shuffle_buffer=1, repeat=False)
    items = list(stream)
    assert [i["prompt"] for i in items] == ["prompt 0", "prompt 1", "prompt 2"]
    assert [i["cond"].shape[0] for i in items] == [1, 2, 3] and items[2]["latents"][0, 0, 0] == 2
    assert stream.stats["skipped/no_latent"] == 1


def test_parse_sample_keeps_other_npy_fields():
    s = parse_sample({"json": {"segments": [{"type": "text", "text": "x"}]}, "cond.npy": np.zeros((1, 2))}, "s", "k")
    assert list(s.arrays) == ["cond.npy"]


def test_bad_options_fail_at_construction():
    with pytest.raises(ValueError, match="condition 'pixels' is not one of"):
        DiTProcessor(condition="pixels")
    with pytest.raises(ValueError, match="aspect_range"):
        DiTProcessor(aspect_range=(1.5, 0.67))


def test_pixels_stay_uint8_until_the_device_and_normalise_to_the_float_path():
    """The batch carries uint8 (a quarter of float32's bytes through the loader and the copy); normalised on
    the device they are bit for bit the float path's VAE input (to_tensor with mean = std = 0.5), and the
    VAE encodes them alike."""
    from kelix.data.images import ImageConfig, to_tensor
    from kelix.dit.vae import VAEConfig, load_vae

    rng = np.random.default_rng(0)
    pics = [PILImage.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in ((40, 30), (23, 61), (16, 16))]
    p = DiTProcessor(target_size=16, condition="prompt")
    items = [p(Sample(f"k{i}", "s.tar", "segments", [Turn(None, [Part("image", image=Image("0.jpg", pic)),
                                                                 Part("text", text="noise")])]))
             for i, pic in enumerate(pics)]
    batch = p.collate(items)
    assert batch["pixels"].dtype == torch.uint8 and batch["pixels"].shape == (3, 3, 16, 16)
    want = torch.stack([to_tensor(square(pic, 16, "resize"), ImageConfig()) for pic in pics])
    got = vae_pixels(batch["pixels"])
    assert got.dtype == torch.float32 and torch.equal(got, want)
    assert float(want.std()) > 0.3  # noise, not a flat picture
    assert vae_pixels(want) is want  # float pixels are taken as normalised already
    vae = load_vae(VAEConfig(seed=0))
    torch.testing.assert_close(vae.encode(got), vae.encode(want), rtol=0, atol=0)
