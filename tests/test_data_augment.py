"""MAE/ViP's crop-and-flip augmentation: random per (seed, sample words), hence the same
in every loader worker and after a resume, and different from step to step."""

import numpy as np
import pytest
import torch
from PIL import Image

from data.loader import PoissonReader
from data.shards import ShardLimits, write_shards
from data.sources import Example
from data.transform import CropFlip, ImageTextTransform

NUM_EXAMPLES = 24


def _tokenize(text):
    return [1, 2, 3, 0]


def _textured(i: int) -> Image.Image:
    rng = np.random.default_rng(i)
    return Image.fromarray(rng.integers(0, 256, (32, 40, 3), dtype=np.uint8))


AUGMENTED = ImageTextTransform(16, _tokenize, 4, CropFlip(seed=3))


class EveryExample:
    """Each step reads every example, in micro-batches of 5."""

    def step_batches(self, step):
        return [list(range(i, min(i + 5, NUM_EXAMPLES))) for i in range(0, NUM_EXAMPLES, 5)]


@pytest.fixture(scope="module")
def index(tmp_path_factory):
    out = tmp_path_factory.mktemp("textured")
    return write_shards((Example(_textured(i), f"c{i}") for i in range(NUM_EXAMPLES)), out, ShardLimits(max_count=7))


def test_crop_and_flip_are_random_per_sample_and_reproducible():
    image, crop = _textured(0), CropFlip(seed=3)
    outs = [np.asarray(crop(image, (step, 7))) for step in range(200)]
    assert all(np.array_equal(np.asarray(crop(image, (step, 7))), outs[step]) for step in range(5))
    assert len({o.tobytes() for o in outs}) >= 190  # a new crop almost every step (whole-image crops repeat)
    areas = np.array([o.shape[0] * o.shape[1] for o in outs]) / (32 * 40)
    # both ends of scale (0.2, 1) are reached (each missed by 200 uniform draws with probability ~1e-12)
    assert 0.18 <= areas.min() < 0.3 and areas.max() > 0.9 and areas.mean() == pytest.approx(0.6, abs=0.06)
    # a flip: the crop box read back mirrored, about half of the time
    flips = 0
    for step in range(200):
        unflipped = CropFlip(seed=3, scale=(1.0, 1.0), ratio=(0.8, 0.8))(image, (step,))
        flips += np.array_equal(np.asarray(unflipped), np.asarray(image)[:, ::-1])
    assert 70 <= flips <= 130
    assert not np.array_equal(np.asarray(CropFlip(seed=4)(image, (0, 7))), outs[0])


def test_flip_false_keeps_the_same_crops_never_mirrored():
    image = _textured(0)
    for step in range(40):
        both = np.asarray(CropFlip(seed=3)(image, (step, 7)))
        crop = np.asarray(CropFlip(seed=3, flip=False)(image, (step, 7)))
        assert np.array_equal(crop, both) or np.array_equal(crop[:, ::-1], both)
        whole = CropFlip(seed=3, scale=(1.0, 1.0), ratio=(0.8, 0.8), flip=False)(image, (step,))
        assert np.array_equal(np.asarray(whole), np.asarray(image))


def test_decode_size_keeps_the_smallest_crop_at_full_resolution():
    assert ImageTextTransform(224, _tokenize, 4).decode_size == 224
    assert ImageTextTransform(224, _tokenize, 4, CropFlip(seed=0)).decode_size == 501  # 224 / sqrt(0.2)


def test_poisson_reader_augments_the_same_way_with_workers_and_after_resume(index):
    reference = {step: list(PoissonReader(index, EveryExample(), AUGMENTED).micro_batches(step)) for step in range(3)}
    workers = PoissonReader(index, EveryExample(), AUGMENTED, num_workers=2)
    first = {step: list(workers.micro_batches(step)) for step in range(2)}
    resumed = PoissonReader(index, EveryExample(), AUGMENTED, num_workers=2)
    resumed.load_state_dict(workers.state_dict())
    got = {**first, 2: list(resumed.micro_batches(2))}
    for step in range(3):
        for a, b in zip(got[step], reference[step], strict=True):
            assert torch.equal(a.images, b.images)
    # every example is augmented anew at each step; the captions are untouched
    step0, step1 = torch.cat([b.images for b in reference[0]]), torch.cat([b.images for b in reference[1]])
    assert all(not torch.equal(x, y) for x, y in zip(step0, step1))
    assert torch.equal(torch.cat([b.tokens for b in reference[0]]), torch.cat([b.tokens for b in reference[1]]))
    plain = PoissonReader(index, EveryExample(), ImageTextTransform(16, _tokenize, 4))
    same = [torch.cat([b.images for b in plain.micro_batches(s)]) for s in range(2)]
    assert torch.equal(same[0], same[1])


def test_the_trainer_augments_vip_training_images_only():
    from trainer.common.config import load_config
    from trainer.common.inputs import transform

    vip = load_config("vip_stage2")
    assert transform(vip, None, training=True).augment == CropFlip(seed=vip.seed)
    assert transform(vip, None).augment is None  # probes, evaluation
    dpcap = load_config("dpcap_base_paper")
    assert transform(dpcap, None, training=True).augment is None  # captions name positions
