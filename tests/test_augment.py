"""Training augmentation (``--augment``): the per-image crop and flip of in-memory batches, how the
loop seeds and applies it (training batches only), the ImageNet reader and its worker pipeline, and
the option from the command line to the stored trial."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from typer.testing import CliRunner

from sopkit.cli import app
from sopkit.data import AUGMENTS, DATASETS, DataSplits, LoaderSplit, TensorSplit, load_dataset
from sopkit.data.augment import CropFlip, crop_flip
from sopkit.data.imagenet import IMAGENET_MEAN, IMAGENET_STD
from sopkit.errors import UserError
from sopkit.experiment.plan import build_plan
from sopkit.experiment.records import TrialSpec
from sopkit.strategies import Baseline
from sopkit.training.config import TrainConfig
from sopkit.training.loop import TrainingSession

# --------------------------------------------------------------------------------------------------
# The crop and flip of a batch
# --------------------------------------------------------------------------------------------------


def _windows(image: torch.Tensor, padding: int, fill: float) -> list[torch.Tensor]:
    """Every crop (and its mirror) of ``image`` (C, H, W) padded by ``padding`` pixels of ``fill``:
    the outputs the standard recipe may give, written with F.pad and slicing."""
    _, h, w = image.shape
    padded = F.pad(image, (padding,) * 4, value=fill)
    crops = [
        padded[:, top : top + h, left : left + w]
        for top in range(2 * padding + 1)
        for left in range(2 * padding + 1)
    ]
    return crops + [crop.flip(-1) for crop in crops]


def test_a_crop_is_a_shifted_window_of_the_padded_image_with_exact_pixels() -> None:
    image = torch.arange(1.0, 43.0).view(1, 1, 6, 7)  # pixel (r, c) holds 7r + c + 1
    shifts = torch.tensor([[2, -1]])  # two rows down, one column left
    out = crop_flip(image, shifts, torch.tensor([False]), fill=(-5.0,))
    assert out.shape == image.shape
    # Output (r, c) is input (r + 2, c - 1): inside the image for r < 4 and c >= 1.
    assert out[0, 0, 0].tolist() == [-5.0, 15.0, 16.0, 17.0, 18.0, 19.0, 20.0]
    assert out[0, 0, 3].tolist() == [-5.0, 36.0, 37.0, 38.0, 39.0, 40.0, 41.0]
    assert out[0, 0, 4:].unique().tolist() == [-5.0]  # rows 6 and 7 of the input do not exist
    padded = F.pad(image, (2, 2, 2, 2), value=-5.0)  # padding 2: offset (2, -1) is window (4, 1)
    assert torch.equal(out, padded[:, :, 4 : 4 + 6, 1 : 1 + 7])
    flipped = crop_flip(image, shifts, torch.tensor([True]), fill=(-5.0,))
    assert torch.equal(flipped, out.flip(-1))  # crop, then mirror


def test_per_channel_fill_and_the_identity_offset() -> None:
    images = torch.rand(3, 2, 5, 5)
    same = crop_flip(images, torch.zeros(3, 2, dtype=torch.long), torch.zeros(3, dtype=torch.bool))
    assert torch.equal(same, images)
    out = crop_flip(images[:1], torch.tensor([[-5, 0]]), torch.tensor([False]), fill=(1.5, -2.0))
    assert out[0, 0].unique().tolist() == [1.5] and out[0, 1].unique().tolist() == [-2.0]
    with pytest.raises(ValueError, match="3 values for 2 channels"):
        crop_flip(images, torch.zeros(3, 2, dtype=torch.long), torch.zeros(3, dtype=torch.bool),
                  fill=(0.0, 0.0, 0.0))


def test_every_image_of_a_batch_draws_its_own_crop_and_flip() -> None:
    image = torch.randn(3, 8, 8)
    batch = image.expand(64, 3, 8, 8).contiguous()  # 64 copies of one image
    out = CropFlip(padding=4, fill=(0.0,))(batch, torch.Generator().manual_seed(0))
    candidates = _windows(image, 4, 0.0)
    chosen = []
    for augmented in out:
        matches = [i for i, window in enumerate(candidates) if torch.equal(augmented, window)]
        assert len(matches) == 1  # each output is exactly one crop (or mirrored crop)
        chosen.append(matches[0])
    assert len(set(chosen)) > 40  # 162 possible; one draw for the batch would give 1
    flipped = sum(i >= 81 for i in chosen)
    assert 16 < flipped < 48  # both flipped and plain images in one batch


def test_without_flip_no_image_is_mirrored_and_offsets_cover_the_padding() -> None:
    recipe = CropFlip(padding=2, flip=False)
    shifts, flips = recipe.draw(500, torch.Generator().manual_seed(1), torch.device("cpu"))
    assert not flips.any()
    assert sorted(shifts.unique().tolist()) == [-2, -1, 0, 1, 2]
    with pytest.raises(ValueError, match="padding"):
        CropFlip(padding=-1)


def test_the_same_generator_seed_gives_the_same_batch_and_another_seed_another() -> None:
    batch = torch.randn(32, 3, 8, 8)
    recipe = CropFlip(padding=4)

    def augmented(seed: int) -> torch.Tensor:
        return recipe(batch, torch.Generator().manual_seed(seed))

    assert torch.equal(augmented(3), augmented(3))
    assert not torch.equal(augmented(3), augmented(4))


# --------------------------------------------------------------------------------------------------
# The loop: training batches only, seeded from the run, batch order unchanged
# --------------------------------------------------------------------------------------------------


class Spy(nn.Module):
    """A tiny image classifier that records every input it sees, by mode."""

    def __init__(self, classes: int) -> None:
        super().__init__()
        self.linear = nn.Linear(3 * 6 * 6, classes)
        self.seen: dict[bool, list[torch.Tensor]] = {True: [], False: []}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen[self.training].append(x.detach().clone())
        return self.linear(x.flatten(1))


class TargetSpy(Baseline):
    """The baseline, recording the labels of every training batch (the batch order)."""

    def __init__(self) -> None:
        super().__init__()
        self.targets: list[torch.Tensor] = []

    def loss(self, model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, run: Any) -> Any:
        self.targets.append(targets.clone())
        return super().loss(model, inputs, targets, run)


def _image_data() -> DataSplits:
    """30 train, 6 val and 5 test random 3x6x6 images; train labels are their indices."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(41, 3, 6, 6, generator=g)
    train = TensorSplit(x[:30], torch.arange(30))
    val = TensorSplit(x[30:36], torch.arange(6))
    test = TensorSplit(x[36:], torch.arange(5))
    return DataSplits("toy-images", (3, 6, 6), 30, train, val, test, augment=CropFlip(padding=2))


def _train(
    data: DataSplits, augment: str, seed: int, device: str = "cpu"
) -> tuple[Spy, TargetSpy]:
    models: list[Spy] = []

    def build() -> nn.Module:
        models.append(Spy(30))
        return models[-1]

    config = TrainConfig(epochs=2, batch_size=8, augment=augment)
    strategy = TargetSpy()
    TrainingSession(data, build, config, device=torch.device(device), seed=seed).train(strategy)
    return models[0], strategy


def test_the_loop_augments_training_batches_only_and_keeps_their_order() -> None:
    data = _image_data()
    plain, plain_order = _train(data, "none", seed=0)
    augmented, order = _train(data, "standard", seed=0)
    # The batch order is the shuffle generator's alone: the same with augmentation.
    assert [t.tolist() for t in order.targets] == [t.tolist() for t in plain_order.targets]
    assert len(order.targets) == 8  # 2 epochs of 4 batches
    x = data.train.x  # type: ignore[attr-defined]
    for inputs, targets in zip(plain.seen[True], plain_order.targets, strict=True):
        assert torch.equal(inputs, x[targets])  # no augmentation: the examples as they are
    changed = 0
    for inputs, targets in zip(augmented.seen[True], order.targets, strict=True):
        for image, index in zip(inputs, targets.tolist(), strict=True):
            windows = _windows(x[index], 2, 0.0)
            assert any(torch.equal(image, w) for w in windows)  # a crop/flip of *its* example
            changed += not torch.equal(image, x[index])
    assert changed > 50  # of 60 images; the identity crop is 1 of 50 choices
    # Evaluation (val and test after every epoch, and at the end) sees the examples untouched.
    evaluated = torch.cat(augmented.seen[False])
    val_x, test_x = data.val.x, data.test.x  # type: ignore[attr-defined]
    assert torch.equal(evaluated, torch.cat([val_x, test_x] * 2 + [test_x, val_x]))


def test_augmentation_is_reproducible_from_the_run_seed() -> None:
    data = _image_data()
    first, _ = _train(data, "standard", seed=5)
    again, _ = _train(data, "standard", seed=5)
    other, _ = _train(data, "standard", seed=6)
    assert all(torch.equal(a, b) for a, b in zip(first.seen[True], again.seen[True], strict=True))
    assert not torch.equal(torch.cat(first.seen[True]), torch.cat(other.seen[True]))


def test_standard_on_a_set_without_a_recipe_trains_on_the_plain_examples() -> None:
    data = _image_data()
    bare = DataSplits("bare", data.input_shape, 30, data.train, data.val, data.test)
    assert bare.training_split("standard") == (bare.train, None)
    assert data.training_split("none") == (data.train, None)
    with pytest.raises(UserError, match="Unknown augmentation 'crop'"):
        data.training_split("crop")
    assert AUGMENTS == ("none", "standard")
    with pytest.raises(UserError, match="--augment"):
        TrainConfig(augment="crop")


# --------------------------------------------------------------------------------------------------
# The plan: the default per data set, recorded with the trial, old keys kept
# --------------------------------------------------------------------------------------------------


def test_the_plan_resolves_the_data_sets_standard_augmentation() -> None:
    assert build_plan(dataset="cifar10").train["augment"] == "standard"
    assert build_plan(dataset="imagenet").train["augment"] == "standard"
    assert build_plan(dataset="cifar10", augment="none").train["augment"] == "none"
    assert build_plan(dataset="digits").train["augment"] == "none"
    # "standard" means nothing for the vector sets: recorded as none, so the key stays.
    assert build_plan(dataset="mnist1d", augment="standard").train["augment"] == "none"
    with pytest.raises(UserError, match="Unknown --augment 'flip'"):
        build_plan(dataset="cifar10", augment="flip")
    trial = build_plan(dataset="cifar10").jobs()[0].specs[0]
    assert trial.train["augment"] == "standard"


def test_the_augment_option_keeps_the_keys_of_trials_stored_before_it(tmp_path: Path) -> None:
    spec = build_plan(dataset="digits", models=["mlp-a1"], seeds=1).jobs()[0].specs[0]
    assert spec.train["augment"] == "none"
    before = {k: v for k, v in spec.train.items() if k != "augment"}  # as stored before --augment
    stored_before = TrialSpec(**{**spec.as_dict(), "train": before})
    assert spec.key == stored_before.key
    augmented = TrialSpec(**{**spec.as_dict(), "train": {**spec.train, "augment": "standard"}})
    assert augmented.key != spec.key
    preset = tmp_path / "p.toml"
    preset.write_text('dataset = "cifar10"\naugment = "none"\n')
    assert build_plan(preset=str(preset)).train["augment"] == "none"
    assert build_plan(preset=str(preset), augment="standard").train["augment"] == "standard"


# --------------------------------------------------------------------------------------------------
# ImageNet: the folder layout, the transforms, the seeded workers
# --------------------------------------------------------------------------------------------------

# The red channel tells the class apart; green and blue are gradients, so crops differ.
RED = {"n01440764": 30, "n01443537": 130, "n01484850": 230}


def _write_imagenet(root: Path, train: int = 4, val: dict[str, int] | None = None) -> Path:
    """JPEGs of 40x48 pixels in the standard layout: ``train`` per class, ``val`` as given."""
    from PIL import Image

    val = {"n01443537": 2, "n01484850": 1} if val is None else val
    for part, counts in (("train", dict.fromkeys(RED, train)), ("val", val)):
        for wnid, n in counts.items():
            folder = root / part / wnid
            folder.mkdir(parents=True)
            for i in range(n):
                image = Image.new("RGB", (40, 48))
                image.putdata([(RED.get(wnid, 80), 5 * x, 5 * y) for y in range(48) for x in range(40)])
                image.save(folder / f"{wnid}_{i}.JPEG", quality=95)
    return root


def _epoch(split: Any, batch_size: int, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = zip(*split.batches(batch_size, **kwargs), strict=True)
    return torch.cat(xs), torch.cat(ys)


def _red(images: torch.Tensor) -> list[int]:
    """The mean red value (0..255) of each normalised image."""
    red = images[:, 0] * IMAGENET_STD[0] + IMAGENET_MEAN[0]
    return [round(v * 255) for v in red.mean(dim=(1, 2)).tolist()]


def test_imagenet_reads_the_layout_with_train_class_order_and_a_carved_val(
    tmp_path: Path,
) -> None:
    root = _write_imagenet(tmp_path)
    data = load_dataset("imagenet", data_dir=root, num_workers=0, crop_size=16, resize_size=20)
    assert data.input_shape == (3, 16, 16) and data.num_classes == 3
    assert all(isinstance(s, LoaderSplit) for s in (data.train, data.val, data.test))
    assert (len(data.train), len(data.val), len(data.test)) == (11, 1, 3)
    assert data.augment is None and data.augmented_train is not None
    # The official val (no n01440764 folder) is the test set, labelled by train's classes.
    x_test, y_test = _epoch(data.test, 2, shuffle=False)
    assert y_test.tolist() == [1, 1, 2]
    assert x_test.shape == (3, 3, 16, 16) and x_test.dtype == torch.float32
    for red, label in zip(_red(x_test), y_test.tolist(), strict=True):
        assert abs(red - list(RED.values())[label]) < 8  # normalised with ImageNet's statistics
    # Evaluation transforms are deterministic: the same pixels every pass.
    assert torch.equal(x_test, _epoch(data.test, 3, shuffle=False)[0])
    x_val, y_val = _epoch(data.val, 4, shuffle=False)
    _, y_train = _epoch(data.train, 4, shuffle=False)
    assert sorted(y_train.tolist() + y_val.tolist()) == [0] * 4 + [1] * 4 + [2] * 4
    # The centre crop of the 20-px resize: green runs 5*x over x in 12..27 of 40 source columns.
    green = x_val[0, 1] * IMAGENET_STD[1] + IMAGENET_MEAN[1]
    assert green[:, 0].mean() * 255 == pytest.approx(5 * 2 * 2 + 5 * 0.5 + 2.5, abs=6)


def test_imagenet_training_crops_are_seeded_per_sample_from_the_generator(tmp_path: Path) -> None:
    root = _write_imagenet(tmp_path)
    data = load_dataset("imagenet", data_dir=root, num_workers=0, crop_size=16, resize_size=20)
    augmented = data.augmented_train
    assert augmented is not None

    def epoch(split: Any, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        return _epoch(split, 4, shuffle=True, generator=torch.Generator().manual_seed(seed))

    x1, y1 = epoch(augmented, 0)
    x2, y2 = epoch(augmented, 0)
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    x3, _ = epoch(augmented, 1)
    assert not torch.equal(x1, x3)
    plain, plain_y = epoch(data.train, 0)
    assert torch.equal(plain_y, y1)  # the random crops do not change the batch order
    assert not torch.equal(plain, x1)
    for red, label in zip(_red(x1), y1.tolist(), strict=True):
        assert abs(red - list(RED.values())[label]) < 8  # each crop is of its own image
    # With worker processes: the same images, for the seeds travel with the indices.
    with_workers = load_dataset(
        "imagenet", data_dir=root, num_workers=2, crop_size=16, resize_size=20
    ).augmented_train
    assert with_workers is not None
    xw, yw = epoch(with_workers, 0)
    assert torch.equal(xw, x1) and torch.equal(yw, y1)
    with_workers.close()  # type: ignore[attr-defined]
    # Loading in this process leaves torch's global random stream alone.
    torch.manual_seed(9)
    expected = torch.rand(3)
    torch.manual_seed(9)
    epoch(augmented, 2)
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize(
    ("make", "missing"),
    [
        (lambda root: (root / "train" / "n01").mkdir(parents=True), "val"),
        (lambda root: _write_imagenet(root, val={"n09999999": 1}), "n09999999"),
        (lambda root: _write_imagenet(root, train=0), "Found no valid file"),
    ],
    ids=["no-val-folder", "val-class-not-in-train", "no-images"],
)
def test_imagenet_layout_errors_exit_2_naming_what_is_missing(
    tmp_path: Path, make: Any, missing: str
) -> None:
    root = tmp_path / "imagenet"
    make(root)
    with pytest.raises(UserError, match=missing):
        load_dataset("imagenet", data_dir=root, num_workers=0)
    result = CliRunner().invoke(
        app,
        ["compare", "--dataset", "imagenet", "--data-dir", str(root), "--model", "cnn2d",
         "--out", str(tmp_path / "out"), "--device", "cpu"],
    )
    assert result.exit_code == 2, result.output
    assert missing in result.output.replace("\n", "")
    assert "Expected the layout" in result.output.replace("\n", "") or missing == "n09999999"


def test_imagenet_cannot_be_downloaded_and_its_sizes_are_checked(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="cannot be downloaded"):
        load_dataset("imagenet", data_dir=tmp_path, download=True)
    with pytest.raises(UserError, match="crop_size must be a positive integer"):
        load_dataset("imagenet", data_dir=tmp_path, crop_size=0)
    _write_imagenet(tmp_path)
    with pytest.raises(UserError, match="crop size 32 is larger than the resize size 20"):
        load_dataset("imagenet", data_dir=tmp_path, crop_size=32, resize_size=20)


def test_compare_on_an_imagenet_tree_end_to_end(tmp_path: Path) -> None:
    root = _write_imagenet(tmp_path / "imagenet")
    out = tmp_path / "out"
    result = CliRunner().invoke(
        app,
        ["compare", "--dataset", "imagenet", "--data-dir", str(root), "--model", "cnn2d",
         "--strategies", "baseline", "--seeds", "1", "--epochs", "1", "--batch-size", "6",
         "--data-workers", "0", "--device", "cpu", "--out", str(out)],
    )
    assert result.exit_code == 0, result.output
    with sqlite3.connect(out / "results.sqlite") as db:
        specs = [json.loads(row[0]) for row in db.execute("SELECT spec FROM trials")]
    assert [spec["train"]["augment"] for spec in specs] == ["standard"]
    assert specs[0]["dataset"] == "imagenet" and specs[0]["train"]["epochs"] == 1
    assert "imagenet" in DATASETS


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_augmentation_on_cuda_is_reproducible_and_imagenet_takes_a_cuda_generator(
    tmp_path: Path,
) -> None:
    data = _image_data().to("cuda")
    first, _ = _train(data, "standard", seed=5, device="cuda")
    again, _ = _train(data, "standard", seed=5, device="cuda")
    assert torch.equal(torch.cat(first.seen[True]), torch.cat(again.seen[True]))
    assert first.seen[True][0].is_cuda
    root = _write_imagenet(tmp_path)
    imagenet = load_dataset(
        "imagenet", data_dir=root, num_workers=1, crop_size=16, resize_size=20
    ).to("cuda")
    assert imagenet.augmented_train is not None
    # The loop shuffles with a generator on the training device; the DataLoader needs a CPU one.
    runs = [
        _epoch(imagenet.augmented_train, 4, shuffle=True,
               generator=torch.Generator("cuda").manual_seed(0))
        for _ in range(2)
    ]
    assert runs[0][0].is_cuda and runs[0][0].dtype == torch.float32
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])
