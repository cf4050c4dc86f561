import pytest
import torch

from capdpo.generation.rope import mrope_positions
from capdpo.models.loading import load_vlm


def _model_positions(model, inputs):
    return model.model.get_rope_index(
        inputs["input_ids"],
        mm_token_type_ids=inputs["mm_token_type_ids"],
        image_grid_thw=inputs["image_grid_thw"],
        attention_mask=inputs.get("attention_mask"),
    )


def _assert_same(model, inputs):
    ours = mrope_positions(model, inputs)
    assert ours is not None
    theirs = _model_positions(model, inputs)
    for got, expected in zip(ours, theirs):
        assert got.dtype == expected.dtype and got.shape == expected.shape
        assert torch.equal(got, expected)


def _processor_batch(lm, sample_images, padding_side: str):
    from PIL import Image

    processor = lm.processor
    image = f"<|vision_start|>{processor.image_token}<|vision_end|>"
    texts = [
        f"Two images: {image} and {image} differ how?",  # two images of different sizes, text between
        "No image in this row, only some longer text to pad the others.",
        f"{image}",  # an image first and last
        f"Look {image}{image}",  # two images with only their vision markers between them
    ]
    images = [Image.open(p).convert("RGB") for p in (sample_images[0], sample_images[5], sample_images[2])]
    images += [Image.open(sample_images[3]).convert("RGB"), Image.open(sample_images[4]).convert("RGB")]
    processor.tokenizer.padding_side = padding_side
    try:
        batch = processor(text=texts, images=images, return_tensors="pt", padding=True)
    finally:
        processor.tokenizer.padding_side = "left"
    return dict(batch)


@pytest.mark.parametrize("arch", ["strong", "qwen3vl"])
@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_positions_equal_the_models_get_rope_index(tiny_models, sample_images, arch, padding_side):
    lm = load_vlm(str(tiny_models[arch]))
    inputs = _processor_batch(lm, sample_images, padding_side)
    assert (inputs["attention_mask"] == 0).any()  # the rows really are padded
    _assert_same(lm.model, inputs)
    _assert_same(lm.model, {k: v for k, v in inputs.items() if k != "attention_mask"})
    holes = dict(inputs)  # padding inside a row (between text and an image) is skipped like the model does
    holes["attention_mask"] = inputs["attention_mask"].clone()
    first_image = int((inputs["mm_token_type_ids"][0] == 1).nonzero()[0])
    holes["attention_mask"][0, first_image - 3 : first_image - 1] = 0
    _assert_same(lm.model, holes)


@pytest.mark.parametrize("arch", ["strong", "qwen3vl"])
def test_positions_on_random_grids(tiny_models, arch):
    """Grids with several frames and unequal sides, images anywhere in a row, rows without images."""
    lm = load_vlm(str(tiny_models[arch]))
    merge = lm.model.config.vision_config.spatial_merge_size
    g = torch.Generator().manual_seed(0)
    for trial in range(20):
        rows, types, grids = [], [], []
        for _ in range(5):
            ids, kinds = [], []
            for k in range(int(torch.randint(0, 4, (1,), generator=g))):
                text = int(torch.randint(0 if k == 0 else 1, 5, (1,), generator=g))  # images never touch
                t, h, w = (int(x) for x in torch.randint(1, 4, (3,), generator=g))
                t = 1 if trial % 2 else t
                n = t * h * w
                ids += [7] * text + [lm.model.config.image_token_id] * n
                kinds += [0] * text + [1] * n
                grids.append([t, h * merge, w * merge])
            tail = int(torch.randint(1, 4, (1,), generator=g))
            rows.append(ids + [9] * tail)
            types.append(kinds + [0] * tail)
        if not grids:
            continue
        width = max(len(r) for r in rows)
        pad = [width - len(r) for r in rows]
        inputs = {
            "input_ids": torch.tensor([[0] * p + r for p, r in zip(pad, rows)]),
            "attention_mask": torch.tensor([[0] * p + [1] * len(r) for p, r in zip(pad, rows)]),
            "mm_token_type_ids": torch.tensor([[0] * p + k for p, k in zip(pad, types)]),
            "image_grid_thw": torch.tensor(grids),
        }
        _assert_same(lm.model, inputs)


def test_what_it_does_not_cover_is_left_to_the_model(tiny_models, sample_images):
    lm = load_vlm(str(tiny_models["strong"]))
    inputs = _processor_batch(lm, sample_images, "left")
    assert mrope_positions(lm.model, {**inputs, "video_grid_thw": inputs["image_grid_thw"]}) is None
    assert mrope_positions(lm.model, {k: v for k, v in inputs.items() if k != "mm_token_type_ids"}) is None
    assert mrope_positions(lm.model, {k: v for k, v in inputs.items() if k != "image_grid_thw"}) is None
    bigger = inputs["image_grid_thw"].clone()
    bigger[0, 1] += 2 * lm.model.config.vision_config.spatial_merge_size
    assert mrope_positions(lm.model, {**inputs, "image_grid_thw": bigger}) is None  # tokens and grid disagree
    fewer = inputs["image_grid_thw"][:-1]
    assert mrope_positions(lm.model, {**inputs, "image_grid_thw": fewer}) is None
    llava = load_vlm(str(tiny_models["llava"]))
    assert mrope_positions(llava.model, inputs) is None
