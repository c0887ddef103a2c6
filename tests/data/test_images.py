import pytest
from PIL import Image as PILImage

from kelix.data.images import ImageConfig, resize_image, target_size, to_pil, to_tensor
from kelix.data.schema import SampleError


@pytest.mark.parametrize("h, w", [(30, 30), (100, 300), (1000, 700), (2000, 4000), (57, 1500)])
def test_native_resolution_bounds(h, w):
    cfg = ImageConfig(patch_size=14, merge_size=2, min_pixels=56 * 56, max_pixels=28 * 28 * 64)
    th, tw = target_size(h, w, cfg)
    assert th % 28 == 0 and tw % 28 == 0
    assert cfg.min_pixels <= th * tw <= cfg.max_pixels
    # aspect ratio kept to within one token of rounding
    assert abs(th / tw - h / w) <= (28 / min(th, tw)) * max(1, h / w) + 1e-6


def test_exact_sizes_on_known_inputs():
    cfg = ImageConfig(patch_size=14, merge_size=2, min_pixels=56 * 56, max_pixels=28 * 28 * 64)
    assert target_size(224, 224, cfg) == (224, 224)  # already a multiple, within budget
    assert target_size(30, 30, cfg) == (56, 56)  # scaled up to min_pixels
    assert target_size(448, 448, cfg) == (224, 224)  # 256 tokens scaled down to the 64-token budget


def test_fixed_size_and_aspect_filter():
    cfg = ImageConfig(fixed_size=504, aspect_range=(0.75, 1.33))
    assert resize_image(PILImage.new("RGB", (640, 600)), cfg).size == (504, 504)
    with pytest.raises(SampleError, match=r"x.tar:k: image 1000x500 has aspect 2.00 outside \[0.75, 1.33\]"):
        resize_image(PILImage.new("RGB", (1000, 500)), cfg, where="x.tar:k")
    with pytest.raises(ValueError, match="fixed_size 500 is not a multiple"):
        ImageConfig(fixed_size=500)


def test_tensor_round_trip():
    cfg = ImageConfig()
    img = PILImage.new("RGB", (28, 56), (255, 0, 128))
    x = to_tensor(img, cfg)
    assert x.shape == (3, 56, 28) and x[0, 0, 0].item() == pytest.approx(1.0) and x[1, 0, 0].item() == pytest.approx(-1.0)
    assert to_pil(x, cfg).getpixel((0, 0)) == (255, 0, 128)
