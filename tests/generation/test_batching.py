from types import SimpleNamespace

import pytest

from capdpo.generation.batching import Batcher, Request, user_message
from capdpo.models.loading import load_vlm
from capdpo.validation.config import ValidateConfig
from capdpo.validation.validator import Validator


def _rendered(lm, request):
    """The chat template applied as transformers does it, request by request."""
    last_is_assistant = request.messages[-1]["role"] == "assistant"
    return lm.processor.apply_chat_template(
        request.messages,
        tokenize=False,
        add_generation_prompt=not last_is_assistant,
        continue_final_message=last_is_assistant,
    )


@pytest.mark.parametrize("arch", ["weak", "qwen3vl", "llava"])
def test_prompts_through_one_rendering_per_shape_equal_rendering_each(tiny_models, sample_images, arch, monkeypatch):
    lm = load_vlm(str(tiny_models[arch]))
    validator = Validator(lm, ValidateConfig(methods=["yesno", "rating", "pairwise"]))
    candidates = ["A red ball.", "  Two dogs\n play.  ", 'The sky\'s "blue" & wide.', "A <b>bold</b> {claim}."]
    requests = [j.request for i in range(2) for j in validator.jobs(f"s{i}", str(sample_images[i]), candidates)]
    requests += [
        Request(key="text-only", image=None, messages=[user_message("Describe nothing.", with_image=False)]),
        Request(
            key="continued",
            image=str(sample_images[0]),
            messages=[user_message("Describe the image."), {"role": "assistant", "content": "The image shows"}],
        ),
    ]
    batcher = Batcher(lm)
    renders = []
    render = batcher._render
    monkeypatch.setattr(batcher, "_render", lambda messages: renders.append(1) or render(messages))
    texts = [batcher.prompt_text(r) for r in requests]
    assert texts == [_rendered(lm, r) for r in requests]
    assert len(renders) < len(requests) / 2  # most prompts were filled in, not rendered


def test_a_template_that_changes_texts_is_rendered_request_by_request():
    calls = []

    def apply_chat_template(messages, tokenize, add_generation_prompt, continue_final_message):
        calls.append(1)
        return "".join(
            f"<{m['role']}>" + " ".join(p.get("text", "[img]").strip() for p in m["content"]) for m in messages
        )

    lm = SimpleNamespace(processor=SimpleNamespace(apply_chat_template=apply_chat_template))
    batcher = Batcher(lm)
    requests = [Request(key=str(i), image=None, messages=[user_message(f" Sentence {i}. ")]) for i in range(5)]
    expected = [f"<user>[img] Sentence {i}." for i in range(5)]
    assert [batcher.prompt_text(r) for r in requests] == expected
    assert list(batcher._templates.values()) == [None]  # the probes' spaces were trimmed: no placeholders
    assert len(calls) == 2 + 5  # placeholders and probes once, then every request rendered


@pytest.mark.parametrize("arch", ["weak", "qwen3vl", "llava"])
def test_rows_process_each_image_once_and_equal_the_processor(tiny_models, sample_images, arch, monkeypatch):
    import torch

    from capdpo.images import load_image

    lm = load_vlm(str(tiny_models[arch]))
    batcher = Batcher(lm)
    requests = [
        Request(key=f"{i}-{j}", image=str(sample_images[i]), messages=[user_message(f"Is sentence {j} right?")])
        for i in range(3)
        for j in range(4)
    ]
    processed = []
    image_processor = lm.processor.image_processor
    original = type(image_processor).__call__
    monkeypatch.setattr(
        type(image_processor), "__call__", lambda self, *a, **k: processed.append(1) or original(self, *a, **k)
    )
    rows = [batcher.row(r) for r in requests]
    cached = batcher._image_inputs.cache is not None
    assert cached == (arch != "llava")  # LLaVA's processor does more than expand one token: always called itself
    if cached:
        assert len(processed) == 3 + 1  # each image once, and the processor's own output once for the check
    for request, row in zip(requests, rows):
        text = batcher.prompt_text(request)
        expected = dict(lm.processor(text=[text], images=[load_image(request.image)], return_tensors="pt"))
        assert set(row) == set(expected)
        assert all(torch.equal(row[k], expected[k]) for k in expected), request.key
