import torch
from torchvision.models.detection.anchor_utils import AnchorGenerator as TVAnchorGenerator
from torchvision.models.detection.image_list import ImageList

from model.anchors import AnchorGenerator, default_anchor_sizes


def test_default_sizes_follow_torchvision_retinanet():
    sizes = default_anchor_sizes()
    assert sizes[0] == (32, 40, 50) and sizes[-1] == (512, 645, 812) and len(sizes) == 5


def test_count_and_hand_computed_coordinates_on_2x2_grid():
    gen = AnchorGenerator(sizes=((16,),), aspect_ratios=(1.0,))
    anchors = gen((16, 16), [(2, 2)])
    # stride 8; anchors 16x16 centred at (0,0), (8,0), (0,8), (8,8): row-major over y then x.
    expected = torch.tensor([[-8.0, -8, 8, 8], [0, -8, 16, 8], [-8, 0, 8, 16], [0, 0, 16, 16]])
    torch.testing.assert_close(anchors, expected)


def test_anchor_order_ratios_outer_sizes_inner():
    gen = AnchorGenerator(sizes=((10, 20),), aspect_ratios=(0.5, 2.0))
    cell = gen.cell_anchors(0)
    widths, heights = cell[:, 2] - cell[:, 0], cell[:, 3] - cell[:, 1]
    # ratio 0.5 = wide (h/w = 0.5), sizes 10 then 20; then ratio 2 = tall.
    assert (widths > heights).tolist() == [True, True, False, False]
    assert widths[1] > widths[0] and widths[3] > widths[2]


def test_full_configuration_equals_torchvision_anchor_generator():
    sizes = default_anchor_sizes()
    ratios = (0.5, 1.0, 2.0)
    ours = AnchorGenerator(sizes, ratios)
    theirs = TVAnchorGenerator(sizes, (ratios,) * len(sizes))
    image_size = (256, 384)
    feature_sizes = [(32, 48), (16, 24), (8, 12), (4, 6), (2, 3)]
    features = [torch.zeros(1, 1, h, w) for h, w in feature_sizes]
    tv = theirs(ImageList(torch.zeros(1, 3, *image_size), [image_size]), features)[0]
    mine = ours(image_size, feature_sizes)
    assert mine.shape == (sum(h * w * 9 for h, w in feature_sizes), 4)
    torch.testing.assert_close(mine, tv)
    assert ours.num_anchors_per_level(feature_sizes) == [h * w * 9 for h, w in feature_sizes]


def test_cache_returns_same_tensor_and_is_per_size():
    gen = AnchorGenerator()
    sizes = [(4, 4), (2, 2), (1, 1), (1, 1), (1, 1)]
    a = gen((32, 32), sizes)
    assert gen((32, 32), sizes) is a
    assert gen((64, 64), [(8, 8), (4, 4), (2, 2), (1, 1), (1, 1)]) is not a
